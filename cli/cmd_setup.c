/*
 * p11agent setup: registers the PKCS#11 front-end module
 * (p11agent-pkcs11.so) with the clients that do not read p11-kit's
 * registry: NSS databases (Chromium, NSS tools) and Firefox policies.
 * GnuTLS programs (git, wget) find it through p11-kit's registration
 * (packaging/p11agent-pkcs11.module).
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cli.h"
#include "paths.h"

#define NSS_NAME "p11agent"

static const char setup_usage[] =
	"Usage: p11agent setup nss [--db DIR] [--name NAME] [--module PATH] [--remove] [--dry-run]\n"
	"       p11agent setup firefox-policy [--name NAME] [--module PATH]\n"
	"                      [--system | --file FILE] [--remove] [--dry-run]\n"
	"       p11agent setup openssl [--config FILE]\n"
	"       p11agent setup git [--key URI] [--url URL] [--system] [--dry-run]\n"
	"       p11agent setup chromium-policy --url PATTERN [--key URI] [--system] [--dry-run]\n"
	"\n"
	"Registers the PKCS#11 front-end module, through which NSS and GnuTLS\n"
	"programs use the agent's keys without a PIN prompt; checks the OpenSSL\n"
	"provider's configuration.\n"
	"\n"
	"  nss             add the module to an NSS database with modutil\n"
	"                  (Chromium reads ~/.pki/nssdb); the database is made\n"
	"                  when it does not exist\n"
	"  firefox-policy  print a policies.json fragment (SecurityDevices) for\n"
	"                  Firefox; --system merges it into\n"
	"                  /etc/firefox/policies/policies.json, --file into FILE,\n"
	"                  keeping the other policies\n"
	"  openssl         check that OpenSSL loads the p11agent provider through\n"
	"                  the installed snippet, and print how to enable it\n"
	"  git             set http[.URL].sslCert and sslKey in your ~/.gitconfig\n"
	"                  (/etc/gitconfig with --system) to the key's URIs\n"
	"  chromium-policy print an AutoSelectCertificateForUrls policy that picks\n"
	"                  the key's certificate (by issuer and subject) for PATTERN;\n"
	"                  --system writes " "/etc/chromium/policies/managed/p11agent.json\n"
	"\n"
	"git and wget (GnuTLS) load the modules registered with p11-kit, by the file\n"
	"  " P11A_P11KIT_MODULE_FILE "\n"
	"(link it into ~/.config/pkcs11/modules if p11-kit does not read its\n"
	"directory); give them the URIs that 'p11agent list' prints.\n"
	"\n"
	"Options:\n"
	"  -d, --db DIR        NSS database directory (default ~/.pki/nssdb)\n"
	"  -n, --name NAME     module name in NSS/Firefox (default " NSS_NAME ")\n"
	"  -m, --module PATH   the module (default $P11AGENT_PKCS11_MODULE, else\n"
	"                      " P11A_PKCS11_MODULE ")\n"
	"  -r, --remove        nss, firefox-policy: remove the module instead of\n"
	"                      adding it\n"
	"  -c, --config FILE   openssl: the snippet to check (default\n"
	"                      " P11A_OPENSSL_SNIPPET ")\n"
	"  -k, --key URI       git, chromium-policy: the key (default: the only key\n"
	"                      with a certificate)\n"
	"  -u, --url URL       git: only for this URL; chromium-policy: the pattern\n"
	"  -s, --system        edit the system's configuration instead of yours\n"
	"  -f, --file FILE     firefox-policy: the policies.json to edit\n"
	"      --dry-run       show what would be changed; change nothing\n"
	"  -h, --help          show this help\n";

int
cli_run_tool(char *const argv[], int quiet)
{
	pid_t pid;
	int st;

	fflush(stdout);
	if ((pid = fork()) < 0) {
		cli_err("cannot fork: %s", strerror(errno));
		return -1;
	}
	if (pid == 0) {
		int fd = quiet ? open("/dev/null", O_WRONLY) : -1;

		if (fd >= 0)
			dup2(fd, STDERR_FILENO);
		dup2(STDERR_FILENO, STDOUT_FILENO);
		execvp(argv[0], argv);
		fprintf(stderr, "p11agent: cannot run %s: %s\n", argv[0], strerror(errno));
		_exit(127);
	}
	while (waitpid(pid, &st, 0) < 0) {
		if (errno != EINTR)
			return -1;
	}
	return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* Absolute path of an existing module file. */
static char *
module_path(const char *opt)
{
	const char *m = opt;
	char *abs;

	if (m == NULL)
		m = getenv("P11AGENT_PKCS11_MODULE");
	if (m == NULL || *m == '\0')
		m = P11A_PKCS11_MODULE;
	if ((abs = realpath(m, NULL)) == NULL)
		cli_err("module %s: %s", m, strerror(errno));
	return abs;
}

static int
setup_nss(const char *db, const char *name, const char *mod_opt, int remove, int dry_run)
{
	char *dbdir = NULL, *sqldb = NULL, *mod = NULL, *home_db = NULL;
	struct stat st;
	int rc = CLI_EXIT_FAIL, r;

	if (db == NULL) {
		const char *home = getenv("HOME");

		if (home == NULL || *home == '\0') {
			cli_err("HOME is not set; give --db DIR");
			return CLI_EXIT_FAIL;
		}
		if (asprintf(&home_db, "%s/.pki/nssdb", home) < 0) {
			cli_err("out of memory");
			return CLI_EXIT_FAIL;
		}
		db = home_db;
	}
	if (strncmp(db, "sql:", 4) == 0)
		db += 4;
	if ((dbdir = strdup(db)) == NULL || asprintf(&sqldb, "sql:%s", dbdir) < 0) {
		cli_err("out of memory");
		goto out;
	}
	if (!remove && (mod = module_path(mod_opt)) == NULL)
		goto out;
	if (dry_run) {
		printf("# p11agent setup nss would run (nothing changed):\n");
		if (!remove && access(dbdir, F_OK) != 0)
			printf("mkdir -p -m 0700 '%s'\ncertutil -N -d '%s' --empty-password\n", dbdir, sqldb);
		printf("modutil -dbdir '%s' -delete '%s' -force\n", sqldb, name);
		if (!remove)
			printf("modutil -dbdir '%s' -add '%s' -libfile '%s' -force\n", sqldb, name, mod);
		rc = CLI_EXIT_OK;
		goto out;
	}

	if (stat(dbdir, &st) != 0 || !S_ISDIR(st.st_mode)) {
		char *mk[] = { "mkdir", "-p", "-m", "0700", dbdir, NULL };

		if (remove) {
			cli_err("NSS database %s does not exist", dbdir);
			goto out;
		}
		if (cli_run_tool(mk, 0) != 0)
			goto out;
	}
	if (stat(dbdir, &st) == 0) {
		char *path = NULL;

		if (asprintf(&path, "%s/cert9.db", dbdir) < 0)
			goto out;
		if (!remove && access(path, F_OK) != 0) {
			char *mk[] = { "certutil", "-N", "-d", sqldb, "--empty-password", NULL };

			if (cli_run_tool(mk, 0) != 0) {
				cli_err("certutil could not create the NSS database %s (is libnss3-tools installed?)",
					dbdir);
				free(path);
				goto out;
			}
		}
		free(path);
	}
	if (remove) {
		char *del[] = { "modutil", "-dbdir", sqldb, "-delete", (char *)name, "-force", NULL };

		if ((r = cli_run_tool(del, 0)) != 0) {
			cli_err("modutil could not remove module '%s' from %s (exit %d)", name, dbdir, r);
			goto out;
		}
		printf("Removed module '%s' from the NSS database %s.\n", name, dbdir);
		rc = CLI_EXIT_OK;
		goto out;
	}
	{
		/* Already there (same name): replace, so that a new path takes effect. */
		char *del[] = { "modutil", "-dbdir", sqldb, "-delete", (char *)name, "-force", NULL };
		char *add[] = { "modutil", "-dbdir", sqldb, "-add", (char *)name,
				"-libfile", mod, "-force", NULL };

		(void)cli_run_tool(del, 1);
		if ((r = cli_run_tool(add, 0)) != 0) {
			cli_err("modutil could not add %s to %s (exit %d; is libnss3-tools installed?)",
				mod, dbdir, r);
			goto out;
		}
	}
	printf("Added module '%s' (%s) to the NSS database %s.\n"
	       "Chromium and NSS tools using this database now see the agent's tokens.\n",
	       name, mod, dbdir);
	rc = CLI_EXIT_OK;
out:
	free(home_db);
	free(dbdir);
	free(sqldb);
	free(mod);
	return cli_finish_stdout(rc);
}

int
cmd_setup(struct cli_ctx *ctx, int argc, char **argv)
{
	static const struct option opts[] = {
		{ "db", required_argument, NULL, 'd' },
		{ "name", required_argument, NULL, 'n' },
		{ "module", required_argument, NULL, 'm' },
		{ "remove", no_argument, NULL, 'r' },
		{ "config", required_argument, NULL, 'c' },
		{ "key", required_argument, NULL, 'k' },
		{ "url", required_argument, NULL, 'u' },
		{ "system", no_argument, NULL, 's' },
		{ "file", required_argument, NULL, 'f' },
		{ "dry-run", no_argument, NULL, 'D' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 }
	};
	const char *db = NULL, *name = NULL, *mod = NULL, *config = NULL, *what;
	const char *key = NULL, *url = NULL, *file = NULL;
	int ch, remove = 0, system = 0, dry_run = 0;

	while ((ch = getopt_long(argc, argv, "d:n:m:rc:k:u:sf:h", opts, NULL)) != -1) {
		switch (ch) {
		case 'd':
			db = optarg;
			break;
		case 'n':
			if (*optarg == '\0')
				return cli_usage_err("setup", "--name: empty name");
			name = optarg;
			break;
		case 'm':
			mod = optarg;
			break;
		case 'r':
			remove = 1;
			break;
		case 'c':
			config = optarg;
			break;
		case 'k':
			key = optarg;
			break;
		case 'u':
			url = optarg;
			break;
		case 's':
			system = 1;
			break;
		case 'f':
			file = optarg;
			break;
		case 'D':
			dry_run = 1;
			break;
		case 'h':
			fputs(setup_usage, stdout);
			return cli_finish_stdout(CLI_EXIT_OK);
		default:
			return cli_try_help("setup");
		}
	}
	if (optind >= argc)
		return cli_usage_err("setup", "missing target: nss, firefox-policy, openssl, git or "
				     "chromium-policy");
	what = argv[optind++];
	if (optind < argc)
		return cli_usage_err("setup", "unexpected argument '%s'", argv[optind]);
	if (strcmp(what, "git") == 0 || strcmp(what, "chromium-policy") == 0) {
		if (db != NULL || name != NULL || mod != NULL || remove || config != NULL || file != NULL)
			return cli_usage_err("setup", "'setup %s' takes --key, --url, --system and "
					     "--dry-run", what);
		if (what[0] == 'g')
			return cli_setup_git(ctx, key, url, system, dry_run);
		return cli_setup_chromium(ctx, key, url, system, dry_run);
	}
	if (strcmp(what, "firefox-policy") == 0) {
		char *abs = NULL;
		int rc;

		if (db != NULL || key != NULL || url != NULL || config != NULL)
			return cli_usage_err("setup", "'setup firefox-policy' takes --name, --module, "
					     "--system, --file, --remove and --dry-run");
		if (system && file != NULL)
			return cli_usage_err("setup", "give --system or --file, not both");
		if ((remove || dry_run) && !system && file == NULL)
			return cli_usage_err("setup", "--remove and --dry-run need --system or --file "
					     "(without them nothing is written)");
		if (!remove && (abs = module_path(mod)) == NULL)
			return CLI_EXIT_FAIL;
		rc = cli_setup_firefox(name != NULL ? name : NSS_NAME, abs, file, system, remove,
				       dry_run);
		free(abs);
		return rc;
	}
	if (file != NULL)
		return cli_usage_err("setup", "--file applies to 'setup firefox-policy' only");
	if (key != NULL || url != NULL || system)
		return cli_usage_err("setup", "--key, --url and --system apply to 'setup git', "
				     "'setup chromium-policy' and 'setup firefox-policy'");
	if (strcmp(what, "openssl") == 0) {
		if (db != NULL || name != NULL || mod != NULL || remove)
			return cli_usage_err("setup", "'setup openssl' takes --config only");
		return cli_setup_openssl(config);
	}
	if (config != NULL)
		return cli_usage_err("setup", "--config applies to 'setup openssl' only");
	if (name == NULL)
		name = NSS_NAME;
	if (strcmp(what, "nss") == 0)
		return setup_nss(db, name, mod, remove, dry_run);
	return cli_usage_err("setup", "unknown target '%s' (nss, firefox-policy, openssl, git or "
			     "chromium-policy)", what);
}
