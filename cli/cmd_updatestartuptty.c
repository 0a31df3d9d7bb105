/*
 * p11agent updatestartuptty: tells the agent which session its PIN and
 * confirm dialogs belong to (as gpg-agent's updatestartuptty does): this
 * terminal and the display, from the caller's environment.
 */
#include "config.h"
#include "cli.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char usage[] =
	"Usage: p11agent updatestartuptty\n"
	"\n"
	"Makes the agent show its PIN and confirm dialogs (pinentry) in this session: it\n"
	"sends this terminal's name (standard input) and DISPLAY, WAYLAND_DISPLAY,\n"
	"XAUTHORITY, DBUS_SESSION_BUS_ADDRESS and TERM from the environment, replacing\n"
	"those the agent had (its own at start).\n"
	"\n"
	"  -h, --help   show this help\n";

int
cmd_updatestartuptty(struct cli_ctx *ctx, int argc, char **argv)
{
	static const struct option opts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 }
	};
	static const char *const names[] = {
		"DISPLAY", "WAYLAND_DISPLAY", "XAUTHORITY", "DBUS_SESSION_BUS_ADDRESS", "TERM"
	};
	char *env[8];
	size_t n = 0;
	struct p11a_client *c = NULL;
	const char *tty;
	int ch, r, rc;

	while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
		switch (ch) {
		case 'h':
			fputs(usage, stdout);
			return cli_finish_stdout(CLI_EXIT_OK);
		default:
			return cli_try_help("updatestartuptty");
		}
	}
	if (optind < argc)
		return cli_usage_err("updatestartuptty", "unexpected argument '%s'", argv[optind]);
	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		const char *v = getenv(names[i]);
		if (v == NULL || *v == '\0')
			continue;
		size_t len = strlen(names[i]) + strlen(v) + 2;
		if ((env[n] = malloc(len)) == NULL)
			goto nomem;
		snprintf(env[n++], len, "%s=%s", names[i], v);
	}
	if ((tty = ttyname(0)) != NULL) {
		size_t len = strlen(tty) + 5;
		if ((env[n] = malloc(len)) == NULL)
			goto nomem;
		snprintf(env[n++], len, "TTY=%s", tty);
	}
	rc = cli_connect(ctx, &c);
	if (rc == CLI_EXIT_OK && (r = p11a_client_update_env(c, env, n)) != 0) {
		cli_err("updatestartuptty: %s", p11a_client_last_error(c));
		rc = CLI_EXIT_FAIL;
	}
	p11a_client_free(c);
	for (size_t i = 0; i < n; i++)
		free(env[i]);
	return rc;
nomem:
	for (size_t i = 0; i < n; i++)
		free(env[i]);
	cli_err("updatestartuptty: out of memory");
	return CLI_EXIT_FAIL;
}
