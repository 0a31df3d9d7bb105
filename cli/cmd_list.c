/*
 * p11agent list: tokens, keys and their certificates, as text or JSON.
 */
#include "config.h"

#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/asn1.h>
#include <openssl/bio.h>
#include <openssl/x509.h>

#include "uri.h"
#include "uri.h"
#include "cli.h"

static const char list_usage[] =
	"Usage: p11agent list [--json]\n"
	"\n"
	"Lists every token the agent sees (label, manufacturer, model, serial,\n"
	"login state, URI) and every key (URI, type and size or curve, label,\n"
	"id, and the paired certificate's subject, issuer, expiry and URI).\n"
	"\n"
	"Options:\n"
	"  -j, --json  one JSON object {\"tokens\":[...],\"keys\":[...]}\n"
	"  -h, --help  show this help\n";

/* What the CLI shows of a paired certificate. */
struct cert_info {
	int parsed;                 /* 1 when the DER parsed as X.509 */
	char *subject;              /* RFC 2253, NULL if unavailable */
	char *issuer;
	char not_after[32];         /* ISO 8601 UTC, "" if unavailable */
	int expired;
};

static char *
name_to_text(const X509_NAME *name)
{
	/* RFC 2253 with UTF-8 left as is (control characters still escaped). */
	const unsigned long flags = XN_FLAG_RFC2253 & ~ASN1_STRFLGS_ESC_MSB;
	BIO *bio;
	char *data = NULL, *s = NULL;
	long n;

	if (name == NULL)
		return NULL;
	bio = BIO_new(BIO_s_mem());
	if (bio == NULL)
		return NULL;
	if (X509_NAME_print_ex(bio, name, 0, flags) >= 0) {
		n = BIO_get_mem_data(bio, &data);
		if (n >= 0 && data != NULL)
			s = strndup(data, (size_t)n);
	}
	BIO_free(bio);
	return s;
}

static void
cert_info_get(const uint8_t *der, size_t len, struct cert_info *ci)
{
	const unsigned char *p = der;
	const ASN1_TIME *na;
	struct tm tm;
	X509 *x;

	memset(ci, 0, sizeof(*ci));
	if (der == NULL || len == 0 || len > (size_t)LONG_MAX)
		return;
	x = d2i_X509(NULL, &p, (long)len);
	if (x == NULL)
		return;
	ci->parsed = 1;
	ci->subject = name_to_text(X509_get_subject_name(x));
	ci->issuer = name_to_text(X509_get_issuer_name(x));
	na = X509_get0_notAfter(x);
	memset(&tm, 0, sizeof(tm));
	if (na != NULL && ASN1_TIME_to_tm(na, &tm) == 1) {
		strftime(ci->not_after, sizeof(ci->not_after), "%Y-%m-%dT%H:%M:%SZ", &tm);
		/* X509_cmp_current_time: -1 before now, 1 after, 0 on error. */
		ci->expired = X509_cmp_current_time(na) < 0;
	}
	X509_free(x);
}

static void
cert_info_clear(struct cert_info *ci)
{
	free(ci->subject);
	free(ci->issuer);
	memset(ci, 0, sizeof(*ci));
}

/* ================================================================ JSON */

/* Length of the valid UTF-8 sequence at s (NUL-terminated), 0 if invalid. */
static size_t
utf8_len(const unsigned char *s)
{
	unsigned char c = s[0];
	unsigned char lo = 0x80, hi = 0xbf;
	size_t n, i;

	if (c < 0x80)
		return 1;
	if (c >= 0xc2 && c <= 0xdf)
		n = 2;
	else if (c >= 0xe0 && c <= 0xef)
		n = 3;
	else if (c >= 0xf0 && c <= 0xf4)
		n = 4;
	else
		return 0;
	/* Refuse overlong forms, surrogates and code points over U+10FFFF. */
	if (c == 0xe0)
		lo = 0xa0;
	else if (c == 0xed)
		hi = 0x9f;
	else if (c == 0xf0)
		lo = 0x90;
	else if (c == 0xf4)
		hi = 0x8f;
	if (s[1] < lo || s[1] > hi)
		return 0;
	for (i = 2; i < n; i++) {
		if (s[i] < 0x80 || s[i] > 0xbf)
			return 0;
	}
	return n;
}

/* A JSON string; invalid UTF-8 becomes U+FFFD so the output always parses. */
static void
json_str(const char *s)
{
	const unsigned char *p = (const unsigned char *)(s != NULL ? s : "");

	putchar('"');
	while (*p != '\0') {
		size_t n;

		switch (*p) {
		case '"':
			fputs("\\\"", stdout);
			p++;
			continue;
		case '\\':
			fputs("\\\\", stdout);
			p++;
			continue;
		case '\b':
			fputs("\\b", stdout);
			p++;
			continue;
		case '\f':
			fputs("\\f", stdout);
			p++;
			continue;
		case '\n':
			fputs("\\n", stdout);
			p++;
			continue;
		case '\r':
			fputs("\\r", stdout);
			p++;
			continue;
		case '\t':
			fputs("\\t", stdout);
			p++;
			continue;
		default:
			break;
		}
		if (*p < 0x20 || *p == 0x7f) {
			printf("\\u%04x", (unsigned)*p);
			p++;
			continue;
		}
		n = utf8_len(p);
		if (n == 0) {
			fputs("\\ufffd", stdout);
			p++;
			continue;
		}
		fwrite(p, 1, n, stdout);
		p += n;
	}
	putchar('"');
}

static void
json_field_str(const char *sep, const char *name, const char *value)
{
	printf("%s\"%s\":", sep, name);
	json_str(value);
}

static void
json_field_str_or_null(const char *name, const char *value)
{
	printf(",\"%s\":", name);
	if (value != NULL)
		json_str(value);
	else
		fputs("null", stdout);
}

static void
json_field_bool(const char *name, int value)
{
	printf(",\"%s\":%s", name, value ? "true" : "false");
}

static int
list_json(const struct p11a_list_reply *l)
{
	uint32_t i;

	fputs("{\"tokens\":[", stdout);
	for (i = 0; i < l->ntokens; i++) {
		const struct p11a_token *t = &l->tokens[i];

		fputs(i > 0 ? ",{" : "{", stdout);
		json_field_str("", "uri", t->uri);
		json_field_str(",", "label", t->label);
		json_field_str(",", "manufacturer", t->manufacturer);
		json_field_str(",", "model", t->model);
		json_field_str(",", "serial", t->serial);
		json_field_str(",", "module", t->module);
		json_field_bool("present", t->flags & P11A_TOKEN_PRESENT);
		json_field_bool("logged_in", t->flags & P11A_TOKEN_LOGGED_IN);
		json_field_bool("login_required", t->flags & P11A_TOKEN_LOGIN_REQUIRED);
		json_field_bool("pin_count_low", t->flags & P11A_TOKEN_PIN_COUNT_LOW);
		json_field_bool("pin_final_try", t->flags & P11A_TOKEN_PIN_FINAL_TRY);
		json_field_bool("pin_locked", t->flags & P11A_TOKEN_PIN_LOCKED);
		json_field_bool("protected_authentication_path",
				t->flags & P11A_TOKEN_PROTECTED_PATH);
		putchar('}');
	}
	fputs("],\"keys\":[", stdout);
	for (i = 0; i < l->nkeys; i++) {
		const struct p11a_key *k = &l->keys[i];
		const struct p11a_token *t = p11a_list_find_token(l, k->token_uri);
		struct cert_info ci;
		char desc[64];
		char *id;

		id = cli_hex(k->id, k->id_len);
		if (id == NULL) {
			cli_err("list: out of memory");
			return CLI_EXIT_FAIL;
		}
		cli_key_desc(k, desc, sizeof(desc));
		fputs(i > 0 ? ",{" : "{", stdout);
		json_field_str("", "uri", k->uri);
		json_field_str(",", "token_uri", k->token_uri);
		json_field_str(",", "token_label", t != NULL ? t->label : "");
		json_field_str(",", "label", k->label);
		json_field_str(",", "id", id);
		json_field_str(",", "type", p11a_keytype_name(k->type) != NULL ?
			       p11a_keytype_name(k->type) : "unknown");
		printf(",\"bits\":%u", (unsigned)k->bits);
		json_field_str(",", "curve", k->curve);
		json_field_str(",", "description", desc);
		json_field_bool("private_key_visible", k->flags & P11A_KEY_PRIVATE_VISIBLE);
		json_field_bool("always_authenticate", k->flags & P11A_KEY_ALWAYS_AUTH);
		json_field_bool("has_certificate", k->cert_len > 0);
		free(id);
		/* The paired certificate, flat: null fields when there is none. */
		cert_info_get(k->cert, k->cert_len, &ci);
		json_field_str(",", "cert_uri", k->cert_uri);
		json_field_str(",", "cert_label", k->cert_label);
		json_field_str_or_null("subject", ci.subject);
		json_field_str_or_null("issuer", ci.issuer);
		json_field_str_or_null("not_after", ci.not_after[0] != '\0' ? ci.not_after : NULL);
		json_field_bool("cert_expired", ci.expired);
		cert_info_clear(&ci);
		putchar('}');
	}
	fputs("]}\n", stdout);
	return CLI_EXIT_OK;
}

/* ================================================================ text */

/*
 * Some tools store the id a user typed as text: tpm2_ptool --id 01 makes
 * CKA_ID the two bytes "01", listed as 3031.  Show such an id as text too,
 * so that the user finds the id they gave.
 */
static int
id_is_text(const uint8_t *id, size_t len)
{
	if (len == 0 || len > 64)
		return 0;
	for (size_t i = 0; i < len; i++)
		if (id[i] < 0x21 || id[i] > 0x7e || id[i] == '"')
			return 0;
	return 1;
}

static int
print_key(const struct p11a_key *k)
{
	char desc[64];
	char *id;

	id = cli_hex(k->id, k->id_len);
	if (id == NULL) {
		cli_err("list: out of memory");
		return CLI_EXIT_FAIL;
	}
	cli_key_desc(k, desc, sizeof(desc));
	if (k->label != NULL && *k->label != '\0')
		printf("\n  key '%s'\n", k->label);
	else
		printf("\n  key (no label)\n");
	printf("    URI:          %s\n", k->uri ? k->uri : "");
	printf("    type:         %s\n", desc);
	printf("    id:           %s", *id != '\0' ? id : "(none)");
	if (id_is_text(k->id, k->id_len))
		printf(" (\"%.*s\")", (int)k->id_len, (const char *)k->id);
	putchar('\n');
	free(id);
	if (!(k->flags & P11A_KEY_PRIVATE_VISIBLE))
		printf("    private key:  not visible until the token is unlocked\n");
	if (k->flags & P11A_KEY_ALWAYS_AUTH)
		printf("    note:         always-auth: a PIN dialog for every signature\n");
	if (k->cert_len > 0) {
		struct cert_info ci;

		cert_info_get(k->cert, k->cert_len, &ci);
		if (ci.parsed) {
			p11a_text_scrub(ci.subject);
			p11a_text_scrub(ci.issuer);
			printf("    subject:      %s\n", ci.subject ? ci.subject : "(unreadable)");
			printf("    issuer:       %s\n", ci.issuer ? ci.issuer : "(unreadable)");
			printf("    expires:      %s%s\n",
			       ci.not_after[0] != '\0' ? ci.not_after : "(unreadable)",
			       ci.expired ? " (expired)" : "");
		} else {
			printf("    certificate:  %zu bytes, not a readable X.509 certificate\n",
			       k->cert_len);
		}
		if (k->cert_uri != NULL && *k->cert_uri != '\0')
			printf("    cert URI:     %s\n", k->cert_uri);
		cert_info_clear(&ci);
	} else {
		printf("    certificate:  none\n");
	}
	return CLI_EXIT_OK;
}

static int
list_text(struct p11a_list_reply *l)
{
	uint32_t i, j, orphans = 0;

	for (i = 0; i < l->ntokens; i++)
		cli_sanitize_token(&l->tokens[i]);
	for (j = 0; j < l->nkeys; j++)
		cli_sanitize_key(&l->keys[j]);

	if (l->ntokens == 0)
		printf("no tokens\n");
	for (i = 0; i < l->ntokens; i++) {
		const struct p11a_token *t = &l->tokens[i];
		const char *login;

		if (!(t->flags & P11A_TOKEN_PRESENT))
			login = "no (not present)";
		else if (t->flags & P11A_TOKEN_LOGGED_IN)
			login = "yes";
		else if (t->flags & P11A_TOKEN_LOGIN_REQUIRED)
			login = "no (locked)";
		else
			login = "no (no login required)";
		printf("%stoken '%s'\n", i > 0 ? "\n" : "", t->label ? t->label : "");
		printf("  manufacturer: %s\n", t->manufacturer ? t->manufacturer : "");
		printf("  model:        %s\n", t->model ? t->model : "");
		printf("  serial:       %s\n", t->serial ? t->serial : "");
		printf("  logged in:    %s\n", login);
		if (t->module != NULL && *t->module != '\0')
			printf("  module:       %s\n", t->module);
		printf("  URI:          %s\n", t->uri ? t->uri : "");
		for (j = 0; j < l->nkeys; j++) {
			const struct p11a_key *k = &l->keys[j];

			if (k->token_uri == NULL || t->uri == NULL ||
			    strcmp(k->token_uri, t->uri) != 0)
				continue;
			if (print_key(k) != CLI_EXIT_OK)
				return CLI_EXIT_FAIL;
		}
	}
	/* Keys whose token record is missing (should not happen) still show. */
	for (j = 0; j < l->nkeys; j++) {
		const struct p11a_key *k = &l->keys[j];

		if (p11a_list_find_token(l, k->token_uri) != NULL)
			continue;
		if (orphans++ == 0)
			printf("\nkeys on tokens not listed\n");
		if (print_key(k) != CLI_EXIT_OK)
			return CLI_EXIT_FAIL;
	}
	return CLI_EXIT_OK;
}

int
cmd_list(struct cli_ctx *ctx, int argc, char **argv)
{
	static const struct option opts[] = {
		{ "json", no_argument, NULL, 'j' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 }
	};
	struct p11a_client *c = NULL;
	struct p11a_msg reply;
	int ch, rc, json = 0;

	memset(&reply, 0, sizeof(reply));
	while ((ch = getopt_long(argc, argv, "jh", opts, NULL)) != -1) {
		switch (ch) {
		case 'j':
			json = 1;
			break;
		case 'h':
			fputs(list_usage, stdout);
			return cli_finish_stdout(CLI_EXIT_OK);
		default:
			return cli_try_help("list");
		}
	}
	if (optind < argc)
		return cli_usage_err("list", "unexpected argument '%s'", argv[optind]);

	rc = cli_connect(ctx, &c);
	if (rc != CLI_EXIT_OK)
		return rc;
	rc = cli_list(c, &reply);
	if (rc != CLI_EXIT_OK)
		goto out;
	if (json)
		rc = list_json(&reply.u.list);
	else
		rc = list_text(&reply.u.list);
	rc = cli_finish_stdout(rc);
out:
	p11a_msg_clear(&reply);
	p11a_client_free(c);
	return rc;
}
