/*
 * p11agent: helpers shared by the verbs: messages and the agent
 * connection.  Input and output files are in input.c, PIN entry in pin.c.
 */
#include "config.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "uri.h"

#define CLI_CLIENT_NAME "p11agent-cli " PACKAGE_VERSION

/* ================================================================ messages */

void
cli_sanitize_token(struct p11a_token *t)
{
	p11a_text_scrub(t->uri);
	p11a_text_scrub(t->label);
	p11a_text_scrub(t->manufacturer);
	p11a_text_scrub(t->model);
	p11a_text_scrub(t->serial);
	p11a_text_scrub(t->module);
}

void
cli_sanitize_key(struct p11a_key *k)
{
	p11a_text_scrub(k->uri);
	p11a_text_scrub(k->token_uri);
	p11a_text_scrub(k->label);
	p11a_text_scrub(k->curve);
	p11a_text_scrub(k->cert_uri);
	p11a_text_scrub(k->cert_label);
}

static void
verr(const char *fmt, va_list ap)
{
	char msg[2 * P11A_TEXT_MAX + 512];

	vsnprintf(msg, sizeof(msg), fmt, ap);
	p11a_text_scrub(msg);
	fprintf(stderr, "%s: %s\n", CLI_PROG, msg);
}

void
cli_err(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	verr(fmt, ap);
	va_end(ap);
}

int
cli_usage_err(const char *verb, const char *fmt, ...)
{
	char msg[P11A_URI_MAX + 512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (verb != NULL)
		cli_err("%s: %s", verb, msg);
	else
		cli_err("%s", msg);
	if (verb != NULL)
		fprintf(stderr, "Try '%s %s --help'.\n", CLI_PROG, verb);
	else
		fprintf(stderr, "Try '%s --help'.\n", CLI_PROG);
	return CLI_EXIT_USAGE;
}

int
cli_try_help(const char *verb)
{
	fprintf(stderr, "Try '%s %s --help'.\n", CLI_PROG, verb);
	return CLI_EXIT_USAGE;
}

int
cli_fail(struct p11a_client *c, int err, const char *fmt, ...)
{
	char what[P11A_URI_MAX + 256];
	const char *why = NULL;
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(what, sizeof(what), fmt, ap);
	va_end(ap);
	if (c != NULL)
		why = p11a_client_last_error(c);
	if (why == NULL || *why == '\0')
		why = p11a_strerror(err);
	cli_err("%s: %s", what, why);
	return CLI_EXIT_FAIL;
}

/* ================================================================ agent */

int
cli_connect(const struct cli_ctx *ctx, struct p11a_client **out)
{
	char why[1024];
	int r;

	*out = NULL;
	r = p11a_client_connect(ctx->socket_path, CLI_CLIENT_NAME, ctx->timeout_ms, out,
				why, sizeof(why));
	if (r == 0)
		return CLI_EXIT_OK;
	*out = NULL;
	cli_err("%s", why);
	return CLI_EXIT_FAIL;
}

int
cli_list(struct p11a_client *c, struct p11a_msg *reply)
{
	int r;

	r = p11a_client_list(c, reply);
	if (r != 0)
		return cli_fail(c, r, "list");
	if (reply->type != P11A_MSG_LIST_REPLY) {
		p11a_msg_clear(reply);
		cli_err("list: unexpected reply from the agent");
		return CLI_EXIT_FAIL;
	}
	return CLI_EXIT_OK;
}

int
cli_find_key(const struct p11a_list_reply *l, const char *uri,
	     const struct p11a_key **out)
{
	uint32_t idx[P11A_LIST_MAX];
	size_t i, n = 0;
	int r;

	*out = NULL;
	r = p11a_list_match_keys(l, uri, idx, P11A_LIST_MAX, &n);
	if (r == -P11A_E_URI) {
		cli_err("'%s': not a valid pkcs11: URI", uri);
		return CLI_EXIT_USAGE;
	}
	if (r != 0) {
		cli_err("'%s': %s", uri, p11a_strerror(r));
		return CLI_EXIT_FAIL;
	}
	if (n == 0) {
		cli_err("%s: no such key", uri);
		return CLI_EXIT_FAIL;
	}
	if (n > 1) {
		cli_err("%s: ambiguous, it matches %zu keys:", uri, n);
		for (i = 0; i < n && i < P11A_LIST_MAX; i++) {
			char line[P11A_URI_MAX + 16];

			snprintf(line, sizeof(line), "  %s", l->keys[idx[i]].uri ? l->keys[idx[i]].uri : "");
			p11a_text_scrub(line);
			fprintf(stderr, "%s\n", line);
		}
		return CLI_EXIT_FAIL;
	}
	*out = &l->keys[idx[0]];
	return CLI_EXIT_OK;
}

void
cli_key_desc(const struct p11a_key *k, char *out, size_t out_size)
{
	const char *curve = k->curve != NULL ? k->curve : "";

	switch (k->type) {
	case P11A_KEY_RSA:
		snprintf(out, out_size, "RSA %u", (unsigned)k->bits);
		break;
	case P11A_KEY_EC:
		if (*curve != '\0')
			snprintf(out, out_size, "EC %s", curve);
		else
			snprintf(out, out_size, "EC %u-bit", (unsigned)k->bits);
		break;
	case P11A_KEY_ED25519:
		snprintf(out, out_size, "Ed25519");
		break;
	default:
		snprintf(out, out_size, "unknown key type %u", (unsigned)k->type);
		break;
	}
}

char *
cli_hex(const uint8_t *data, size_t len)
{
	static const char digits[] = "0123456789abcdef";
	char *s;
	size_t i;

	if (len > (SIZE_MAX - 1) / 2)
		return NULL;
	s = malloc(2 * len + 1);
	if (s == NULL)
		return NULL;
	for (i = 0; i < len; i++) {
		s[2 * i] = digits[data[i] >> 4];
		s[2 * i + 1] = digits[data[i] & 0x0f];
	}
	s[2 * len] = '\0';
	return s;
}
