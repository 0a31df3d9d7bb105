/*
 * p11agent status: the agent, its modules, connections and tokens.
 */
#include "config.h"

#include <getopt.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "cli.h"

static const char status_usage[] =
	"Usage: p11agent status\n"
	"\n"
	"Shows the agent's version and pid, the socket, each PKCS#11 module\n"
	"with its state and last error (and the modules the configuration\n"
	"leaves out, with the reason), open connections, every token with its\n"
	"state and URI, and the agent's latest warnings.\n"
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

static const char *
module_state(uint8_t state)
{
	switch (state) {
	case P11A_MODULE_UP:
		return "up";
	case P11A_MODULE_STARTING:
		return "starting";
	case P11A_MODULE_RESTARTING:
		return "restarting";
	case P11A_MODULE_FAILED:
		return "failed";
	case P11A_MODULE_NOT_USED:
		return "not used";
	default:
		return "?";
	}
}

/* One line per module; the last error (or why it is not used) under it. */
static void
print_modules(const struct p11a_health_reply *h)
{
	for (uint32_t i = 0; i < h->nmodules; i++) {
		struct p11a_module_health *m = &h->modules[i];
		p11a_text_scrub(m->name);
		p11a_text_scrub(m->path);
		p11a_text_scrub(m->error);
		printf("  %-20s %-10s %s\n", m->name ? m->name : "", module_state(m->state),
		       m->path ? m->path : "");
		if (m->restarts)
			printf("  %-20s restarted %u time%s\n", "", (unsigned)m->restarts,
			       m->restarts == 1 ? "" : "s");
		if (m->error && *m->error) {
			char when[64] = "";
			if (m->error_time) {
				time_t t = (time_t)m->error_time;
				struct tm tm;
				gmtime_r(&t, &tm);
				strftime(when, sizeof(when), " (%Y-%m-%d %H:%M:%S UTC)", &tm);
			}
			printf("  %-20s %s%s: %s\n", "",
			       m->state == P11A_MODULE_NOT_USED ? "why" : "last error", when, m->error);
		}
	}
}

int
cmd_status(struct cli_ctx *ctx, int argc, char **argv)
{
	static const struct option opts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 }
	};
	struct p11a_client *c = NULL;
	struct p11a_msg reply, health;
	struct p11a_status_reply *st;
	uint32_t i;
	int ch, r, rc;

	memset(&reply, 0, sizeof(reply));
	memset(&health, 0, sizeof(health));
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
	/* An agent of protocol version 1 has no HEALTH: the counts only. */
	r = p11a_client_health(c, &health);
	if (r != 0 && r != -P11A_E_UNSUPPORTED) {
		rc = cli_fail(c, r, "status");
		goto out;
	}
	p11a_text_scrub(st->agent);
	printf("agent:        %s\n", st->agent ? st->agent : "");
	printf("pid:          %u\n", (unsigned)st->pid);
	printf("socket:       %s\n", p11a_client_path(c));
	printf("modules:      %u up, %u configured\n",
	       (unsigned)st->modules_up, (unsigned)st->modules);
	if (health.type == P11A_MSG_HEALTH_REPLY)
		print_modules(&health.u.health);
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
	if (health.type == P11A_MSG_HEALTH_REPLY && health.u.health.nrecent) {
		printf("\nrecent warnings:\n");
		for (i = 0; i < health.u.health.nrecent; i++) {
			p11a_text_scrub(health.u.health.recent[i]);
			printf("  %s\n", health.u.health.recent[i]);
		}
	}
	rc = cli_finish_stdout(CLI_EXIT_OK);
out:
	p11a_msg_clear(&health);
	p11a_msg_clear(&reply);
	p11a_client_free(c);
	return rc;
}
