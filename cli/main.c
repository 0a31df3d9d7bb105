/*
 * p11agent: command-line client of p11agentd.  Global options, then a
 * verb; each verb parses its own options (cmd_*.c).
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

struct verb {
	const char *name;
	int (*run)(struct cli_ctx *ctx, int argc, char **argv);
	const char *summary;
};

static const struct verb verbs[] = {
	{ "status", cmd_status, "show the agent, its modules and tokens" },
	{ "list", cmd_list, "list tokens, keys and certificates" },
	{ "unlock", cmd_unlock, "log in to a token with its PIN" },
	{ "lock", cmd_lock, "log out of one token or all of them" },
	{ "log", cmd_log, "show recent audit events: who signed, unlocked, locked what" },
	{ "updatestartuptty", cmd_updatestartuptty, "show the agent's PIN dialogs in this session" },
	{ "sign", cmd_sign, "sign a message or digest with a key" },
	{ "pubkey", cmd_pubkey, "write a key's public key (PEM or DER)" },
	{ "export-cert", cmd_export_cert, "write a key's certificate (PEM or DER)" },
	{ "env", cmd_env, "print shell commands that set P11AGENT_SOCK" },
	{ "export-key", cmd_export_key, "write a key-reference file for OpenSSL programs" },
	{ "exec", cmd_exec, "run a command with the OpenSSL provider enabled" },
	{ "setup", cmd_setup, "register the PKCS#11 module (NSS, Firefox); check OpenSSL's setup" },
};

#define NVERBS (sizeof(verbs) / sizeof(verbs[0]))

static void
usage(FILE *f)
{
	size_t i;

	fprintf(f,
		"Usage: %s [--socket PATH] [--timeout SECONDS] COMMAND [ARGS]\n"
		"       %s --help | --version\n"
		"\n"
		"Uses keys on PKCS#11 tokens through the p11agentd agent.\n"
		"\n"
		"Commands:\n", CLI_PROG, CLI_PROG);
	for (i = 0; i < NVERBS; i++)
		fprintf(f, "  %-12s %s\n", verbs[i].name, verbs[i].summary);
	fprintf(f,
		"\n"
		"Options:\n"
		"  -s, --socket PATH      agent socket (default: $P11AGENT_SOCK,\n"
		"                         else $XDG_RUNTIME_DIR/p11agent/agent.sock)\n"
		"  -t, --timeout SECONDS  deadline for each request (default %d)\n"
		"  -h, --help             show this help\n"
		"  -V, --version          show the version\n"
		"\n"
		"Run '%s COMMAND --help' for a command's options.\n",
		P11A_CLIENT_TIMEOUT_MS / 1000, CLI_PROG);
}

static const struct verb *
find_verb(const char *name)
{
	size_t i;

	for (i = 0; i < NVERBS; i++) {
		if (strcmp(verbs[i].name, name) == 0)
			return &verbs[i];
	}
	return NULL;
}

static int
parse_timeout(const char *s, int *ms)
{
	char *end;
	unsigned long v;

	if (*s < '0' || *s > '9')
		return -1;
	errno = 0;
	v = strtoul(s, &end, 10);
	if (errno != 0 || *end != '\0' || v == 0 || v > (unsigned long)(INT_MAX / 1000))
		return -1;
	*ms = (int)v * 1000;
	return 0;
}

int
main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "socket", required_argument, NULL, 's' },
		{ "timeout", required_argument, NULL, 't' },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ NULL, 0, NULL, 0 }
	};
	static char default_path[4096];
	static char progname[64];
	struct cli_ctx ctx = { NULL, 0 };
	const struct verb *v;
	int ch, r;

	/* A closed agent socket or pipe is an error to report, not a kill. */
	signal(SIGPIPE, SIG_IGN);

	/* '+': stop at the verb; its options are its own. */
	while ((ch = getopt_long(argc, argv, "+s:t:hV", opts, NULL)) != -1) {
		switch (ch) {
		case 's':
			if (*optarg == '\0')
				return cli_usage_err(NULL, "--socket: empty path");
			ctx.socket_path = optarg;
			break;
		case 't':
			if (parse_timeout(optarg, &ctx.timeout_ms) != 0)
				return cli_usage_err(NULL, "--timeout: '%s' is not a number of seconds (1 to %d)",
						     optarg, INT_MAX / 1000);
			break;
		case 'h':
			usage(stdout);
			return cli_finish_stdout(CLI_EXIT_OK);
		case 'V':
			printf("%s %s\n", CLI_PROG, PACKAGE_VERSION);
			return cli_finish_stdout(CLI_EXIT_OK);
		default:
			fprintf(stderr, "Try '%s --help'.\n", CLI_PROG);
			return CLI_EXIT_USAGE;
		}
	}
	if (optind >= argc) {
		usage(stderr);
		return CLI_EXIT_USAGE;
	}

	/* "p11agent help [VERB]" as a synonym for --help. */
	if (strcmp(argv[optind], "help") == 0) {
		if (optind + 1 >= argc) {
			usage(stdout);
			return cli_finish_stdout(CLI_EXIT_OK);
		}
		v = find_verb(argv[optind + 1]);
		if (v == NULL)
			return cli_usage_err(NULL, "unknown command '%s'", argv[optind + 1]);
		{
			char *hargv[] = { progname, (char *)"--help", NULL };

			snprintf(progname, sizeof(progname), "%s %s", CLI_PROG, v->name);
			optind = 0;
			return v->run(&ctx, 2, hargv);
		}
	}

	v = find_verb(argv[optind]);
	if (v == NULL)
		return cli_usage_err(NULL, "unknown command '%s'", argv[optind]);

	if (ctx.socket_path == NULL) {
		r = p11a_default_socket_path(default_path, sizeof(default_path));
		if (r != 0) {
			cli_err("cannot find the agent socket: %s (set P11AGENT_SOCK or use --socket)",
				p11a_strerror(r));
			return CLI_EXIT_FAIL;
		}
		ctx.socket_path = default_path;
	}

	argc -= optind;
	argv += optind;
	/* getopt names the program by argv[0] in its messages. */
	snprintf(progname, sizeof(progname), "%s %s", CLI_PROG, v->name);
	argv[0] = progname;
	optind = 0;   /* glibc: full re-initialisation for the verb's getopt */
	return v->run(&ctx, argc, argv);
}
