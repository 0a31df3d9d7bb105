/*
 * p11agent unlock / lock: log in to a token with its PIN, log out again.
 *
 * The PIN lives only in a fixed array on this stack frame: read with
 * read(2) from /dev/tty (echo off), stdin or a file, sent once in UNLOCK,
 * then wiped.  It never reaches argv, the environment or a message.
 */
#include "config.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <unistd.h>

#include "cli.h"
#include "uri.h"

static const char unlock_usage[] =
	"Usage: p11agent unlock [--token URI] [--pin-stdin | --pin-file FILE]\n"
	"\n"
	"Logs the agent in to a token.  Without --token, the token that needs a\n"
	"PIN is chosen (it is an error when several do).  Without --pin-stdin or\n"
	"--pin-file the PIN is asked for on the terminal with echo off.\n"
	"\n"
	"Options:\n"
	"  -t, --token URI      the token to unlock (a pkcs11: URI)\n"
	"      --pin-stdin      read the PIN from the first line of standard input\n"
	"      --pin-file FILE  read the PIN from the first line of FILE\n"
	"  -h, --help           show this help\n";

static const char lock_usage[] =
	"Usage: p11agent lock [--token URI]\n"
	"\n"
	"Logs the agent out of the tokens matching URI, or of every token, and\n"
	"makes it forget any PIN it kept.  Signing then needs 'p11agent unlock'.\n"
	"\n"
	"Options:\n"
	"  -t, --token URI  the token to lock (a pkcs11: URI); default: all\n"
	"  -h, --help       show this help\n";

enum { OPT_PIN_STDIN = 0x100, OPT_PIN_FILE };

static int
needs_pin(const struct p11a_token *t)
{
	const uint32_t f = t->flags;

	return (f & P11A_TOKEN_PRESENT) && (f & P11A_TOKEN_LOGIN_REQUIRED) &&
	       !(f & P11A_TOKEN_LOGGED_IN);
}

static void
print_tokens_to_stderr(const struct p11a_list_reply *l,
		       int (*pick)(const struct p11a_token *, const void *), const void *arg)
{
	uint32_t i;

	for (i = 0; i < l->ntokens; i++) {
		const struct p11a_token *t = &l->tokens[i];

		if (pick(t, arg))
			fprintf(stderr, "  '%s'  %s\n", t->label ? t->label : "",
				t->uri ? t->uri : "");
	}
}

static int
pick_needs_pin(const struct p11a_token *t, const void *arg)
{
	(void)arg;
	return needs_pin(t);
}

static int
pick_matching(const struct p11a_token *t, const void *arg)
{
	return p11a_uri_match_token(arg, t) == 1;
}

/*
 * Chooses the token to unlock.  Returns CLI_EXIT_OK with *out set, or
 * CLI_EXIT_OK with *out NULL when there is nothing to do (message
 * printed), or CLI_EXIT_FAIL after printing why.
 */
static int
unlock_select(const struct p11a_list_reply *l, const char *uri,
	      const struct p11a_uri_matcher *m, const struct p11a_token **out)
{
	const struct p11a_token *found = NULL;
	uint32_t i, n = 0, unlocked = 0, present = 0;

	*out = NULL;
	if (m != NULL) {
		for (i = 0; i < l->ntokens; i++) {
			if (p11a_uri_match_token(m, &l->tokens[i]) == 1 && n++ == 0)
				found = &l->tokens[i];
		}
		if (n == 0) {
			cli_err("%s: no such token", uri);
			return CLI_EXIT_FAIL;
		}
		if (n > 1) {
			cli_err("%s: ambiguous, it matches %u tokens:", uri, n);
			print_tokens_to_stderr(l, pick_matching, m);
			return CLI_EXIT_FAIL;
		}
		*out = found;
		return CLI_EXIT_OK;
	}

	for (i = 0; i < l->ntokens; i++) {
		const struct p11a_token *t = &l->tokens[i];

		if (needs_pin(t) && n++ == 0)
			found = t;
		if (t->flags & P11A_TOKEN_PRESENT)
			present++;
		if ((t->flags & P11A_TOKEN_PRESENT) && (t->flags & P11A_TOKEN_LOGGED_IN) &&
		    (t->flags & P11A_TOKEN_LOGIN_REQUIRED))
			unlocked++;
	}
	if (n == 1) {
		*out = found;
		return CLI_EXIT_OK;
	}
	if (n > 1) {
		cli_err("unlock: %u tokens need a PIN; choose one with --token URI:", n);
		print_tokens_to_stderr(l, pick_needs_pin, NULL);
		return CLI_EXIT_FAIL;
	}
	if (unlocked > 0) {
		for (i = 0; i < l->ntokens; i++) {
			const struct p11a_token *t = &l->tokens[i];

			if ((t->flags & P11A_TOKEN_PRESENT) && (t->flags & P11A_TOKEN_LOGGED_IN) &&
			    (t->flags & P11A_TOKEN_LOGIN_REQUIRED))
				printf("token '%s' is already unlocked\n", t->label ? t->label : "");
		}
		return CLI_EXIT_OK;
	}
	if (present == 0) {
		cli_err("unlock: no token is present");
		return CLI_EXIT_FAIL;
	}
	printf("no token needs a PIN\n");
	return CLI_EXIT_OK;
}

/* Keeps the PIN out of core files and away from ptrace by other processes. */
static void
harden_process(void)
{
	const struct rlimit none = { 0, 0 };

	(void)setrlimit(RLIMIT_CORE, &none);
	(void)prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
}

int
cmd_unlock(struct cli_ctx *ctx, int argc, char **argv)
{
	static const struct option opts[] = {
		{ "token", required_argument, NULL, 't' },
		{ "pin-stdin", no_argument, NULL, OPT_PIN_STDIN },
		{ "pin-file", required_argument, NULL, OPT_PIN_FILE },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 }
	};
	char pin[P11A_PIN_MAX + 1];
	size_t pin_len = 0;
	const char *token_uri = NULL, *pin_file = NULL;
	const struct p11a_token *t;
	struct p11a_uri_matcher *m = NULL;
	struct p11a_client *c = NULL;
	struct p11a_msg reply;
	char *label = NULL, *uri = NULL;
	uint32_t i;
	int ch, r, rc, pin_stdin = 0, pinpad = 0, locked_mem;

	memset(&reply, 0, sizeof(reply));
	while ((ch = getopt_long(argc, argv, "t:h", opts, NULL)) != -1) {
		switch (ch) {
		case 't':
			token_uri = optarg;
			break;
		case OPT_PIN_STDIN:
			pin_stdin = 1;
			break;
		case OPT_PIN_FILE:
			pin_file = optarg;
			break;
		case 'h':
			fputs(unlock_usage, stdout);
			return cli_finish_stdout(CLI_EXIT_OK);
		default:
			return cli_try_help("unlock");
		}
	}
	if (optind < argc)
		return cli_usage_err("unlock", "unexpected argument '%s'", argv[optind]);
	if (pin_stdin && pin_file != NULL)
		return cli_usage_err("unlock", "--pin-stdin and --pin-file exclude each other");
	if (pin_stdin && isatty(STDIN_FILENO)) {
		cli_err("unlock: standard input is a terminal, where the PIN would be echoed;"
			" run without --pin-stdin to be asked with echo off");
		return CLI_EXIT_USAGE;
	}
	if (token_uri != NULL) {
		int err = 0;

		m = p11a_uri_matcher_new(token_uri, &err);
		if (m == NULL) {
			if (err == -P11A_E_URI || err == 0)
				return cli_usage_err("unlock", "--token: '%s' is not a valid pkcs11: URI",
						     token_uri);
			cli_err("unlock: %s", p11a_strerror(err));
			return CLI_EXIT_FAIL;
		}
	}

	harden_process();
	locked_mem = mlock(pin, sizeof(pin)) == 0;
	p11a_wipe(pin, sizeof(pin));

	/*
	 * LIST on one connection, UNLOCK on another: the connection does not
	 * sit idle in the agent (holding a slot) while a person types.
	 */
	rc = cli_connect(ctx, &c);
	if (rc != CLI_EXIT_OK)
		goto out;
	rc = cli_list(c, &reply);
	p11a_client_free(c);
	c = NULL;
	if (rc != CLI_EXIT_OK)
		goto out;
	for (i = 0; i < reply.u.list.ntokens; i++)
		cli_sanitize_token(&reply.u.list.tokens[i]);

	rc = unlock_select(&reply.u.list, token_uri, m, &t);
	if (rc != CLI_EXIT_OK || t == NULL)
		goto out;
	label = strdup(t->label != NULL ? t->label : "");
	uri = strdup(t->uri != NULL ? t->uri : "");
	if (label == NULL || uri == NULL) {
		cli_err("unlock: out of memory");
		rc = CLI_EXIT_FAIL;
		goto out;
	}
	if (!(t->flags & P11A_TOKEN_PRESENT)) {
		cli_err("unlock: token '%s' is not present", label);
		rc = CLI_EXIT_FAIL;
		goto out;
	}
	if (t->flags & P11A_TOKEN_PIN_LOCKED) {
		cli_err("unlock: token '%s': the PIN is locked (reset it with the token's tools)",
			label);
		rc = CLI_EXIT_FAIL;
		goto out;
	}
	if (t->flags & P11A_TOKEN_LOGGED_IN) {
		printf("token '%s' is already unlocked\n", label);
		rc = CLI_EXIT_OK;
		goto out;
	}
	if (t->flags & P11A_TOKEN_PIN_FINAL_TRY)
		cli_err("warning: token '%s' allows one more PIN try; a wrong PIN locks it", label);
	else if (t->flags & P11A_TOKEN_PIN_COUNT_LOW)
		cli_err("warning: token '%s' reports few PIN tries left", label);

	if (pin_file != NULL) {
		rc = cli_read_pin_file(pin_file, pin, &pin_len);
	} else if (pin_stdin) {
		rc = cli_read_pin_fd(STDIN_FILENO, "standard input", pin, &pin_len);
	} else if (t->flags & P11A_TOKEN_PROTECTED_PATH) {
		/* The reader asks for the PIN itself; an empty PIN tells the agent so. */
		fprintf(stderr, "Enter the PIN for token '%s' on the reader's PIN pad.\n", label);
		pinpad = 1;
		rc = CLI_EXIT_OK;
	} else {
		char prompt[P11A_TEXT_MAX + 32];

		snprintf(prompt, sizeof(prompt), "PIN for token '%s': ", label);
		rc = cli_read_pin_tty(prompt, pin, &pin_len);
	}
	if (rc != CLI_EXIT_OK)
		goto out;
	/* An empty PIN would cost a try on some tokens for nothing. */
	if (pin_len == 0 && !pinpad) {
		cli_err("unlock: empty PIN, nothing sent to token '%s'", label);
		rc = CLI_EXIT_FAIL;
		goto out;
	}

	rc = cli_connect(ctx, &c);
	if (rc != CLI_EXIT_OK)
		goto out;
	r = p11a_client_unlock(c, uri, pin, pin_len);
	p11a_wipe(pin, sizeof(pin));
	pin_len = 0;
	if (r != 0) {
		rc = cli_fail(c, r, "unlock token '%s'", label);
		goto out;
	}
	printf("token '%s' unlocked\n", label);
	rc = CLI_EXIT_OK;
out:
	p11a_wipe(pin, sizeof(pin));
	if (locked_mem)
		(void)munlock(pin, sizeof(pin));
	free(label);
	free(uri);
	p11a_msg_clear(&reply);
	p11a_client_free(c);
	p11a_uri_matcher_free(m);
	return cli_finish_stdout(rc);
}

int
cmd_lock(struct cli_ctx *ctx, int argc, char **argv)
{
	static const struct option opts[] = {
		{ "token", required_argument, NULL, 't' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 }
	};
	const char *token_uri = NULL;
	struct p11a_uri_matcher *m = NULL;
	struct p11a_client *c = NULL;
	struct p11a_msg reply;
	struct p11a_list_reply *l;
	uint32_t i, n = 0;
	int ch, r, rc;

	memset(&reply, 0, sizeof(reply));
	while ((ch = getopt_long(argc, argv, "t:h", opts, NULL)) != -1) {
		switch (ch) {
		case 't':
			token_uri = optarg;
			break;
		case 'h':
			fputs(lock_usage, stdout);
			return cli_finish_stdout(CLI_EXIT_OK);
		default:
			return cli_try_help("lock");
		}
	}
	if (optind < argc)
		return cli_usage_err("lock", "unexpected argument '%s'", argv[optind]);
	if (token_uri != NULL) {
		int err = 0;

		m = p11a_uri_matcher_new(token_uri, &err);
		if (m == NULL) {
			if (err == -P11A_E_URI || err == 0)
				return cli_usage_err("lock", "--token: '%s' is not a valid pkcs11: URI",
						     token_uri);
			cli_err("lock: %s", p11a_strerror(err));
			return CLI_EXIT_FAIL;
		}
	}

	rc = cli_connect(ctx, &c);
	if (rc != CLI_EXIT_OK)
		goto out;
	/* LIST first, to say what was locked. */
	rc = cli_list(c, &reply);
	if (rc != CLI_EXIT_OK)
		goto out;
	l = &reply.u.list;
	for (i = 0; i < l->ntokens; i++)
		cli_sanitize_token(&l->tokens[i]);

	if (m == NULL) {
		r = p11a_client_lock(c, "");
		if (r != 0) {
			rc = cli_fail(c, r, "lock");
			goto out;
		}
		for (i = 0; i < l->ntokens; i++) {
			const struct p11a_token *t = &l->tokens[i];

			if (t->flags & P11A_TOKEN_LOGGED_IN) {
				printf("token '%s' locked\n", t->label ? t->label : "");
				n++;
			}
		}
		if (n == 0)
			printf("no token was unlocked; all are locked\n");
		rc = CLI_EXIT_OK;
		goto out;
	}

	rc = CLI_EXIT_OK;
	for (i = 0; i < l->ntokens; i++) {
		const struct p11a_token *t = &l->tokens[i];
		const char *label = t->label ? t->label : "";

		if (p11a_uri_match_token(m, t) != 1)
			continue;
		n++;
		r = p11a_client_lock(c, t->uri ? t->uri : "");
		if (r != 0) {
			rc = cli_fail(c, r, "lock token '%s'", label);
			continue;
		}
		if (t->flags & P11A_TOKEN_LOGGED_IN)
			printf("token '%s' locked\n", label);
		else
			printf("token '%s' locked (it was not unlocked)\n", label);
	}
	if (n == 0) {
		cli_err("%s: no such token", token_uri);
		rc = CLI_EXIT_FAIL;
	}
out:
	p11a_msg_clear(&reply);
	p11a_client_free(c);
	p11a_uri_matcher_free(m);
	return cli_finish_stdout(rc);
}
