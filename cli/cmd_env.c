/*
 * p11agent env: prints the shell command that points P11AGENT_SOCK at
 * the agent in use, as 'ssh-agent -s' does, once the agent has answered.
 */
#include "config.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"

static const char env_usage[] =
	"Usage: p11agent env\n"
	"\n"
	"Checks that the agent answers and prints\n"
	"  P11AGENT_SOCK=PATH; export P11AGENT_SOCK;\n"
	"for a Bourne-style shell:  eval \"$(p11agent env)\"\n"
	"\n"
	"Options:\n"
	"  -h, --help  show this help\n";

/* Characters a POSIX shell takes literally in an unquoted word. */
static int
shell_safe(const char *s)
{
	for (; *s != '\0'; s++) {
		if (!strchr("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
			    "0123456789/._-+:,@%", *s))
			return 0;
	}
	return 1;
}

static void
print_shell_word(const char *s)
{
	if (*s != '\0' && shell_safe(s)) {
		fputs(s, stdout);
		return;
	}
	/* Single quotes keep everything; a quote itself is '\''. */
	putchar('\'');
	for (; *s != '\0'; s++) {
		if (*s == '\'')
			fputs("'\\''", stdout);
		else
			putchar(*s);
	}
	putchar('\'');
}

int
cmd_env(struct cli_ctx *ctx, int argc, char **argv)
{
	static const struct option opts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 }
	};
	struct p11a_client *c = NULL;
	const char *path;
	char *abs = NULL, *cwd = NULL;
	int ch, rc;

	while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
		switch (ch) {
		case 'h':
			fputs(env_usage, stdout);
			return cli_finish_stdout(CLI_EXIT_OK);
		default:
			return cli_try_help("env");
		}
	}
	if (optind < argc)
		return cli_usage_err("env", "unexpected argument '%s'", argv[optind]);

	/* HELLO is the check that an agent answers there. */
	rc = cli_connect(ctx, &c);
	if (rc != CLI_EXIT_OK)
		return rc;
	path = p11a_client_path(c);
	if (path == NULL || *path == '\0')
		path = ctx->socket_path;

	/* The variable must keep working after a cd. */
	if (path[0] != '/') {
		size_t n;

		cwd = getcwd(NULL, 0);
		if (cwd == NULL) {
			cli_err("env: cannot make %s absolute: current directory unknown", path);
			rc = CLI_EXIT_FAIL;
			goto out;
		}
		n = strlen(cwd) + 1 + strlen(path) + 1;
		abs = malloc(n);
		if (abs == NULL) {
			cli_err("env: out of memory");
			rc = CLI_EXIT_FAIL;
			goto out;
		}
		snprintf(abs, n, "%s/%s", cwd, path);
		path = abs;
	}
	fputs("P11AGENT_SOCK=", stdout);
	print_shell_word(path);
	fputs("; export P11AGENT_SOCK;\n", stdout);
	rc = cli_finish_stdout(CLI_EXIT_OK);
out:
	free(abs);
	free(cwd);
	p11a_client_free(c);
	return rc;
}
