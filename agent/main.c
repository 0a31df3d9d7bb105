/* p11agentd: start-up, options, hardening, daemonizing. */
#include "config.h"
#include "audit.h"
#include "conf.h"
#include "paths.h"
#include "log.h"
#include "modules.h"
#include "p11a.h"
#include "client.h"
#include "server.h"
#include "systemd.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

static void
usage(FILE *out)
{
	fprintf(out,
		"Usage: p11agentd [OPTION]...\n"
		"Keep PKCS#11 tokens logged in and sign for your programs over a Unix socket.\n"
		"\n"
		"  -f, --foreground     stay in the foreground and log to stderr (or the journal)\n"
		"  -s, --socket PATH    listen on PATH (default: $P11AGENT_SOCK, else\n"
		"                       $XDG_RUNTIME_DIR/p11agent/agent.sock)\n"
		"  -m, --module PATH    use this PKCS#11 module (repeatable); default: the\n"
		"                       modules registered with p11-kit\n"
		"  -c, --config FILE    read FILE instead of ~/.config/p11agent/p11agentd.conf\n"
		"      --print-config   print every effective setting and where it comes from\n"
		"  -d, --debug          log every request (never PINs or data)\n"
		"  -h, --help           show this help\n"
		"  -V, --version        show the version\n"
		"\n"
		"Settings: " P11A_SYSCONFDIR "/p11agent/p11agentd.conf (administrator), then\n"
		"~/.config/p11agent/p11agentd.conf, then options; see p11agentd.conf(5).\n"
		"Without --foreground the agent detaches and prints shell commands that set\n"
		"P11AGENT_SOCK, like ssh-agent -s:  eval \"$(p11agentd)\"\n"
		"Started by systemd socket activation (p11agentd.socket) it uses that socket.\n");
}

static void
harden(void)
{
	/* No core files, no ptrace by same-uid processes, no /proc/PID/mem. */
	struct rlimit rl = { 0, 0 };
	setrlimit(RLIMIT_CORE, &rl);
	prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
	signal(SIGPIPE, SIG_IGN);
	/* Room for many idle clients. */
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max > 65536 ? 65536 : rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
}

static int
daemonize(const char *sock)
{
	int p[2];
	if (pipe2(p, O_CLOEXEC) != 0)
		return -1;
	pid_t pid = fork();
	if (pid < 0)
		return -1;
	if (pid > 0) {
		/* Parent: wait until the child is detached, then print the shell lines. */
		char c;
		close(p[1]);
		ssize_t n = read(p[0], &c, 1);
		close(p[0]);
		if (n != 1)
			_exit(1);
		printf("P11AGENT_SOCK=%s; export P11AGENT_SOCK;\n", sock);
		printf("P11AGENT_PID=%ld; export P11AGENT_PID;\n", (long)pid);
		printf("echo Agent pid %ld;\n", (long)pid);
		fflush(stdout);
		_exit(0);
	}
	close(p[0]);
	if (setsid() < 0)
		return -1;
	if (chdir("/") != 0)
		return -1;
	int null = open("/dev/null", O_RDWR | O_CLOEXEC);
	if (null < 0)
		return -1;
	dup2(null, STDIN_FILENO);
	dup2(null, STDOUT_FILENO);
	dup2(null, STDERR_FILENO);
	if (null > STDERR_FILENO)
		close(null);
	if (write(p[1], "", 1) != 1)
		return -1;
	close(p[1]);
	return 0;
}

/*
 * The default socket: $P11AGENT_SOCK (unless the administrator locked the
 * socket), $XDG_RUNTIME_DIR/p11agent/agent.sock, /run/user/UID/... when
 * that directory is ours, else a private directory made under $TMPDIR or
 * /tmp (as ssh-agent does), which only P11AGENT_SOCK leads clients to.
 * With make_tmpdir 0 the last case is only described, for --print-config,
 * and 1 is returned: call again with make_tmpdir 1 to make the directory.
 * 0 when cfg->socket_path is set; -1 (printed) on error.
 */
static int
default_socket(struct agent_config *cfg, int make_tmpdir)
{
	char path[4096], rundir[64];
	const char *v;
	struct stat st;
	struct conf_origin *o = &cfg->origin[SET_SOCKET];
	int n;

	o->layer = CONF_DEFAULT;
	if (!cfg->locked[SET_SOCKET] && (v = secure_getenv("P11AGENT_SOCK")) && *v) {
		if (v[0] != '/') {
			fprintf(stderr, "p11agentd: P11AGENT_SOCK must be an absolute path: %s\n", v);
			return -1;
		}
		n = snprintf(path, sizeof(path), "%s", v);
		o->note = "$P11AGENT_SOCK";
	} else if ((v = secure_getenv("XDG_RUNTIME_DIR")) && *v) {
		n = snprintf(path, sizeof(path), "%s/p11agent/agent.sock", v);
		o->note = "$XDG_RUNTIME_DIR";
	} else {
		snprintf(rundir, sizeof(rundir), "/run/user/%lu", (unsigned long)getuid());
		int there = lstat(rundir, &st) == 0;
		if (there && S_ISDIR(st.st_mode) && st.st_uid == getuid() && !(st.st_mode & 077)) {
			n = snprintf(path, sizeof(path), "%s/p11agent/agent.sock", rundir);
			o->note = "XDG_RUNTIME_DIR is not set; /run/user/UID";
		} else if (!make_tmpdir) {
			free(cfg->socket_path);
			if (!(cfg->socket_path = strdup("(a private directory made at start)/agent.sock")))
				goto nomem;
			o->note = "XDG_RUNTIME_DIR is not set and /run/user/UID is missing";
			return 1;
		} else {
			const char *tmp = (v = secure_getenv("TMPDIR")) && v[0] == '/' ? v : "/tmp";
			char dir[4096];
			/* sun_path is 108 bytes: a long TMPDIR is no good. */
			if (strlen(tmp) > 60)
				tmp = "/tmp";
			snprintf(dir, sizeof(dir), "%s/p11agent-XXXXXX", tmp);
			if (!mkdtemp(dir)) {
				fprintf(stderr, "p11agentd: XDG_RUNTIME_DIR is not set, %s %s, and no "
					"private directory could be made in %s: %s\n", rundir,
					there ? "is not a private directory of ours" : "does not exist",
					tmp, strerror(errno));
				return -1;
			}
			if (!(cfg->socket_tmpdir = strdup(dir)))
				goto nomem;
			n = snprintf(path, sizeof(path), "%s/agent.sock", dir);
			o->note = "XDG_RUNTIME_DIR is not set; a private directory";
			fprintf(stderr, "p11agentd: XDG_RUNTIME_DIR is not set and %s %s: using the "
				"private directory %s (clients find the socket through "
				"P11AGENT_SOCK)\n", rundir,
				there ? "is not a private directory of ours" : "does not exist", dir);
		}
	}
	if (n < 0 || (size_t)n >= sizeof(struct sockaddr_un) - offsetof(struct sockaddr_un, sun_path)) {
		fprintf(stderr, "p11agentd: default socket path too long: %s\n", path);
		return -1;
	}
	free(cfg->socket_path);
	if ((cfg->socket_path = strdup(path)))
		return 0;
nomem:
	fprintf(stderr, "p11agentd: out of memory\n");
	return -1;
}

/* Reads the administrator's file, then the user's (or --config FILE). */
static int
load_files(struct agent_config *cfg, const char *config_file)
{
	char path[4096];

	if (config_admin_path(path, sizeof(path)) != 0) {
		fprintf(stderr, "p11agentd: the administrator's configuration path is too long\n");
		return -1;
	}
	if (config_load_file(cfg, path, CONF_ADMIN, 0) != 0)
		return -1;
	if (config_file)
		return config_load_file(cfg, config_file, CONF_USER, 1);
	if (config_user_path(path, sizeof(path)) != 0)
		return 0;   /* no home directory: no user's file */
	return config_load_file(cfg, path, CONF_USER, 0);
}

/* Where log lines go once the agent runs: the journal, stderr or syslog. */
static void
log_start(const struct agent_config *cfg, int detached)
{
	if (!detached) {
		log_init("p11agentd", sysd_stderr_is_journal() ? LOG_MODE_JOURNAL : LOG_MODE_STDERR,
			 cfg->debug);
		return;
	}
	int fd = sysd_journal_stream("p11agentd");
	if (fd >= 0) {
		/* Helpers keep stderr: their lines reach the journal too. */
		if (fd != STDERR_FILENO) {
			dup2(fd, STDERR_FILENO);
			close(fd);
		}
		log_init("p11agentd", LOG_MODE_JOURNAL, cfg->debug);
	} else {
		log_init("p11agentd", LOG_MODE_SYSLOG, cfg->debug);
	}
}

int
main(int argc, char **argv)
{
	enum { OPT_PRINT_CONFIG = 256 };
	static const struct option opts[] = {
		{ "foreground", no_argument, NULL, 'f' },
		{ "socket", required_argument, NULL, 's' },
		{ "module", required_argument, NULL, 'm' },
		{ "config", required_argument, NULL, 'c' },
		{ "print-config", no_argument, NULL, OPT_PRINT_CONFIG },
		{ "debug", no_argument, NULL, 'd' },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ NULL, 0, NULL, 0 }
	};
	struct agent_config cfg;
	const char *config_file = NULL, *socket_opt = NULL;
	char **module_opts = NULL;
	size_t nmodule_opts = 0;
	int foreground = 0, debug = 0, print_config = 0, tmpdir_pending = 0, opt, rc = 1, lfd = -1;

	harden();
	config_init(&cfg);
	if (!(module_opts = calloc((size_t)argc + 1, sizeof(*module_opts)))) {
		fprintf(stderr, "p11agentd: out of memory\n");
		return 1;
	}
	while ((opt = getopt_long(argc, argv, "fs:m:c:dhV", opts, NULL)) != -1) {
		switch (opt) {
		case 'f':
			foreground = 1;
			break;
		case 's':
			socket_opt = optarg;
			break;
		case 'm':
			module_opts[nmodule_opts++] = optarg;
			break;
		case 'c':
			config_file = optarg;
			break;
		case OPT_PRINT_CONFIG:
			print_config = 1;
			break;
		case 'd':
			debug = 1;
			break;
		case 'h':
			usage(stdout);
			rc = 0;
			goto out;
		case 'V':
			printf("p11agentd %s\n", PACKAGE_VERSION);
			rc = 0;
			goto out;
		default:
			usage(stderr);
			rc = 2;
			goto out;
		}
	}
	if (optind != argc) {
		fprintf(stderr, "p11agentd: unexpected argument '%s'\n", argv[optind]);
		usage(stderr);
		rc = 2;
		goto out;
	}
	/* Start-up messages (a module left out, ...) go to stderr until the agent runs. */
	log_init("p11agentd", LOG_MODE_STDERR, debug);

	/* Files, then flags: a flag overrides a file unless the administrator locked it. */
	if (load_files(&cfg, config_file) != 0)
		goto out;
	if (socket_opt && config_flag_socket(&cfg, socket_opt, "--socket") != 0)
		goto out;
	for (size_t i = 0; i < nmodule_opts; i++)
		if (config_flag_module(&cfg, module_opts[i], "--module") != 0)
			goto out;
	if (debug && config_flag_debug(&cfg, "--debug") != 0)
		goto out;
	log_init("p11agentd", LOG_MODE_STDERR, cfg.debug);
	if (modules_resolve(&cfg) != 0)
		goto out;
	if (!cfg.socket_path && (tmpdir_pending = default_socket(&cfg, 0)) < 0)
		goto out;
	if (print_config) {
		config_print(&cfg, stdout);
		rc = fflush(stdout) == 0 ? 0 : 1;
		goto out;
	}

	int r = sysd_listen_socket(&cfg, &lfd);
	if (r < 0)
		goto out;
	if (r > 0) {
		cfg.socket_activated = 1;
		foreground = 1;   /* systemd supervises this process: never detach */
	} else {
		if (tmpdir_pending && default_socket(&cfg, 1) != 0)
			goto out;
		if ((lfd = server_listen(&cfg)) < 0)
			goto out;
	}
	cfg.foreground = foreground;
	if (!foreground && daemonize(cfg.socket_path) != 0) {
		fprintf(stderr, "p11agentd: cannot detach: %s\n", strerror(errno));
		goto out;
	}
	log_start(&cfg, !foreground);
	if (audit_init(&cfg) != 0) {
		log_err("out of memory for the audit ring (audit-ring %d)", cfg.audit_ring);
		goto out;
	}
	for (size_t i = 0; i < cfg.nmodules; i++)
		log_info("module %s: %s", cfg.modules[i].name, cfg.modules[i].path);
	for (size_t i = 0; i < cfg.ndropped; i++)
		log_info("not using module %s (%s): %s", cfg.dropped[i].name, cfg.dropped[i].path,
			 cfg.dropped[i].why);
	log_info("listening on %s%s", cfg.socket_path,
		 cfg.socket_activated ? " (socket from systemd)" : "");
	rc = server_run(&cfg, lfd);
	audit_free();
	if (cfg.socket_tmpdir && rmdir(cfg.socket_tmpdir) != 0)
		log_warn("cannot remove %s: %s", cfg.socket_tmpdir, strerror(errno));
out:
	if (lfd >= 0)
		close(lfd);
	/* A private socket directory made for an agent that did not start. */
	if (rc != 0 && cfg.socket_tmpdir)
		(void)rmdir(cfg.socket_tmpdir);
	free(module_opts);
	config_free(&cfg);
	return rc;
}
