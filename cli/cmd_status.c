/*
 * p11agent status: the agent, its modules, connections and tokens.
 */
#include "config.h"

#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "cli.h"

static const char status_usage[] =
	"Usage: p11agent status\n"
	"\n"
	"Shows the agent's version and pid, the socket, how many PKCS#11\n"
	"modules are configured and running, open connections, and every\n"
	"token with its state and URI.\n"
	"\n"
	"Options:\n"
	"  -h, --help  show this help\n";

/* "logged in", "locked, PIN count low", "not present", ... */
static void
token_state(uint32_t flags, char *out, size_t out_size)
{
	const char *state;

	if (!(flags & P11A_TOKEN_PRESENT))
		state = "not present";
	else if (flags & P11A_TOKEN_LOGGED_IN)
		state = "logged in";
	else if (flags & P11A_TOKEN_LOGIN_REQUIRED)
		state = "locked";
	else
		state = "no login required";
	snprintf(out, out_size, "%s%s%s%s%s", state,
		 (flags & P11A_TOKEN_PIN_LOCKED) ? ", PIN locked" : "",
		 (flags & P11A_TOKEN_PIN_FINAL_TRY) ? ", PIN final try" : "",
		 (flags & P11A_TOKEN_PIN_COUNT_LOW) ? ", PIN count low" : "",
		 (flags & P11A_TOKEN_PROTECTED_PATH) ? ", PIN pad" : "");
}

int
cmd_status(struct cli_ctx *ctx, int argc, char **argv)
{
	static const struct option opts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 }
	};
	struct p11a_client *c = NULL;
	struct p11a_msg reply;
	struct p11a_status_reply *st;
	uint32_t i;
	int ch, r, rc;

	memset(&reply, 0, sizeof(reply));
	while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
		switch (ch) {
		case 'h':
			fputs(status_usage, stdout);
			return cli_finish_stdout(CLI_EXIT_OK);
		default:
			return cli_try_help("status");
		}
	}
	if (optind < argc)
		return cli_usage_err("status", "unexpected argument '%s'", argv[optind]);

	rc = cli_connect(ctx, &c);
	if (rc != CLI_EXIT_OK)
		return rc;
	r = p11a_client_status(c, &reply);
	if (r != 0) {
		rc = cli_fail(c, r, "status");
		goto out;
	}
	if (reply.type != P11A_MSG_STATUS_REPLY) {
		cli_err("status: unexpected reply from the agent");
		rc = CLI_EXIT_FAIL;
		goto out;
	}
	st = &reply.u.status;
	cli_sanitize(st->agent);
	printf("agent:        %s\n", st->agent ? st->agent : "");
	printf("pid:          %u\n", (unsigned)st->pid);
	printf("socket:       %s\n", p11a_client_path(c));
	printf("modules:      %u up, %u configured\n",
	       (unsigned)st->modules_up, (unsigned)st->modules);
	printf("connections:  %u\n", (unsigned)st->connections);
	printf("tokens:       %u\n", (unsigned)st->ntokens);
	for (i = 0; i < st->ntokens; i++) {
		struct p11a_token *t = &st->tokens[i];
		char state[128];

		cli_sanitize_token(t);
		token_state(t->flags, state, sizeof(state));
		printf("\ntoken '%s': %s\n", t->label ? t->label : "", state);
		if (t->module != NULL && *t->module != '\0')
			printf("  module: %s\n", t->module);
		printf("  URI:    %s\n", t->uri ? t->uri : "");
	}
	rc = cli_finish_stdout(CLI_EXIT_OK);
out:
	p11a_msg_clear(&reply);
	p11a_client_free(c);
	return rc;
}
