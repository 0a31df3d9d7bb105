/* p11agentd: start-up, options, hardening, daemonizing. */
#include "config.h"
#include "conf.h"
#include "log.h"
#include "modules.h"
#include "p11a.h"
#include "client.h"
#include "server.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

static void
usage(FILE *out)
{
	fprintf(out,
		"Usage: p11agentd [OPTION]...\n"
		"Keep PKCS#11 tokens logged in and sign for your programs over a Unix socket.\n"
		"\n"
		"  -f, --foreground     stay in the foreground and log to stderr\n"
		"  -s, --socket PATH    listen on PATH (default: $P11AGENT_SOCK, else\n"
		"                       $XDG_RUNTIME_DIR/p11agent/agent.sock)\n"
		"  -m, --module PATH    use this PKCS#11 module (repeatable); default: the\n"
		"                       modules registered with p11-kit\n"
		"  -c, --config FILE    read settings from FILE (see p11agentd(8))\n"
		"  -d, --debug          log every request (never PINs or data)\n"
		"  -h, --help           show this help\n"
		"  -V, --version        show the version\n"
		"\n"
		"Without --foreground the agent detaches and prints shell commands that set\n"
		"P11AGENT_SOCK, like ssh-agent -s:  eval \"$(p11agentd)\"\n");
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

int
main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "foreground", no_argument, NULL, 'f' },
		{ "socket", required_argument, NULL, 's' },
		{ "module", required_argument, NULL, 'm' },
		{ "config", required_argument, NULL, 'c' },
		{ "debug", no_argument, NULL, 'd' },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ NULL, 0, NULL, 0 }
	};
	struct agent_config cfg, cli_mods;
	const char *config_file = NULL, *socket_opt = NULL;
	int foreground = 0, debug = 0, opt;

	harden();
	config_init(&cfg);
	config_init(&cli_mods);
	while ((opt = getopt_long(argc, argv, "fs:m:c:dhV", opts, NULL)) != -1) {
		switch (opt) {
		case 'f':
			foreground = 1;
			break;
		case 's':
			socket_opt = optarg;
			break;
		case 'm':
			if (config_add_module(&cli_mods, optarg, NULL, NULL) != 0)
				return 2;
			break;
		case 'c':
			config_file = optarg;
			break;
		case 'd':
			debug = 1;
			break;
		case 'h':
			usage(stdout);
			return 0;
		case 'V':
			printf("p11agentd %s\n", PACKAGE_VERSION);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind != argc) {
		fprintf(stderr, "p11agentd: unexpected argument '%s'\n", argv[optind]);
		usage(stderr);
		return 2;
	}
	if (config_file && config_load_file(&cfg, config_file) != 0)
		return 1;
	if (cli_mods.nmodules) {
		/* Modules on the command line replace those of the config file. */
		for (size_t i = 0; i < cfg.nmodules; i++) {
			free(cfg.modules[i].path);
			free(cfg.modules[i].name);
			free(cfg.modules[i].init_args);
		}
		memcpy(cfg.modules, cli_mods.modules, sizeof(cfg.modules));
		cfg.nmodules = cli_mods.nmodules;
		cli_mods.nmodules = 0;
	}
	config_free(&cli_mods);
	if (socket_opt) {
		free(cfg.socket_path);
		cfg.socket_path = strdup(socket_opt);
	}
	if (!cfg.socket_path) {
		char path[4096];
		int r = p11a_default_socket_path(path, sizeof(path));
		if (r != 0) {
			fprintf(stderr, "p11agentd: no socket path: %s\n", p11a_strerror(r));
			return 1;
		}
		cfg.socket_path = strdup(path);
	}
	if (!cfg.socket_path) {
		fprintf(stderr, "p11agentd: out of memory\n");
		return 1;
	}
	if (cfg.socket_path[0] != '/') {
		fprintf(stderr, "p11agentd: socket path must be absolute: %s\n", cfg.socket_path);
		return 2;
	}
	cfg.debug |= debug;
	cfg.foreground = foreground;
	log_init("p11agentd", 0, cfg.debug);

	for (size_t i = 0; i < cfg.nmodules; i++) {
		if (modules_is_forbidden(cfg.modules[i].path)) {
			fprintf(stderr, "p11agentd: refusing module %s: it is p11agent's own front end "
				"and would make the agent call itself\n", cfg.modules[i].path);
			return 1;
		}
		if (access(cfg.modules[i].path, R_OK) != 0) {
			fprintf(stderr, "p11agentd: module %s: %s\n", cfg.modules[i].path, strerror(errno));
			return 1;
		}
	}
	if (cfg.nmodules == 0) {
		cfg.modules_from_registry = 1;
		if (modules_discover(&cfg) < 0)
			fprintf(stderr, "p11agentd: cannot read the p11-kit module registry\n");
	}

	int lfd = server_listen(&cfg);
	if (lfd < 0)
		return 1;
	if (!foreground) {
		if (daemonize(cfg.socket_path) != 0) {
			fprintf(stderr, "p11agentd: cannot detach: %s\n", strerror(errno));
			return 1;
		}
		log_init("p11agentd", 1, cfg.debug);
	}
	for (size_t i = 0; i < cfg.nmodules; i++)
		log_info("module %s: %s", cfg.modules[i].name, cfg.modules[i].path);
	log_info("listening on %s", cfg.socket_path);
	int rc = server_run(&cfg, lfd);
	close(lfd);
	config_free(&cfg);
	return rc;
}
