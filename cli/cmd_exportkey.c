/*
 * p11agent export-key: writes a key-reference file, a PEM "P11AGENT KEY"
 * block that names one key held by the agent (its URI and public key) and
 * holds no secret.  With the provider in OpenSSL's configuration, programs
 * that read a private-key *file* (curl, python's ssl, nginx) sign through
 * the agent with it.  The format is in common/keyref.h and docs/provider.md.
 */
#include "config.h"

#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/bio.h>
#include <openssl/pem.h>

#include "cli.h"
#include "keyref.h"

static const char exportkey_usage[] =
	"Usage: p11agent export-key URI [--out FILE]\n"
	"\n"
	"Writes a key-reference file for the one key matching URI: a PEM\n"
	"\"P11AGENT KEY\" block holding the key's pkcs11: URI and public key,\n"
	"and no secret.  With the p11agent OpenSSL provider enabled, programs\n"
	"that read a private-key file use it in place of the key itself:\n"
	"  curl --cert client.pem --key key.pem https://...\n"
	"\n"
	"Options:\n"
	"  -o, --out FILE  write to FILE instead of standard output\n"
	"  -h, --help      show this help\n";

/* "# ..." lines before the PEM block, for people; PEM readers skip them. */
static int
append_comment(BIO *bio, const struct p11a_key *k)
{
	char desc[64], label[128];

	cli_key_desc(k, desc, sizeof(desc));
	/* A label is token data: no control characters, and no "-----" lines. */
	snprintf(label, sizeof(label), "%s", k->label != NULL ? k->label : "");
	p11a_text_scrub(label);
	return BIO_printf(bio,
			  "p11agent key reference: names a key held by p11agentd; holds no secret.\n"
			  "Key: '%s' (%s)\n",
			  label, desc) > 0;
}

int
cmd_export_key(struct cli_ctx *ctx, int argc, char **argv)
{
	static const struct option opts[] = {
		{ "out", required_argument, NULL, 'o' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 }
	};
	const char *out = NULL, *uri;
	const struct p11a_key *k;
	struct p11a_client *c = NULL;
	struct p11a_msg reply;
	uint8_t *der = NULL;
	size_t der_len = 0;
	BIO *bio = NULL;
	char *pem = NULL;
	long n;
	int ch, r, rc;

	memset(&reply, 0, sizeof(reply));
	while ((ch = getopt_long(argc, argv, "o:h", opts, NULL)) != -1) {
		switch (ch) {
		case 'o':
			out = optarg;
			break;
		case 'h':
			fputs(exportkey_usage, stdout);
			return cli_finish_stdout(CLI_EXIT_OK);
		default:
			return cli_try_help("export-key");
		}
	}
	if (optind >= argc)
		return cli_usage_err("export-key", "a key URI is required");
	if (optind + 1 < argc)
		return cli_usage_err("export-key", "unexpected argument '%s'", argv[optind + 1]);
	uri = argv[optind];

	rc = cli_connect(ctx, &c);
	if (rc != CLI_EXIT_OK)
		return rc;
	rc = cli_list(c, &reply);
	if (rc != CLI_EXIT_OK)
		goto out;
	rc = cli_find_key(&reply.u.list, uri, &k);
	if (rc != CLI_EXIT_OK)
		goto out;
	rc = CLI_EXIT_FAIL;
	if (k->spki == NULL || k->spki_len == 0) {
		cli_err("export-key: the agent knows no public key for %s", uri);
		goto out;
	}
	if ((r = p11agent_keyref_encode(k->uri, k->spki, k->spki_len, &der, &der_len)) != 0) {
		cli_err("export-key: cannot encode a reference to %s: %s", k->uri, p11a_strerror(r));
		goto out;
	}
	if (der_len > (size_t)LONG_MAX || (bio = BIO_new(BIO_s_mem())) == NULL ||
	    !append_comment(bio, k) ||
	    PEM_write_bio(bio, P11AGENT_KEYREF_PEM_LABEL, "", der, (long)der_len) <= 0 ||
	    (n = BIO_get_mem_data(bio, &pem)) <= 0 || pem == NULL) {
		cli_err("export-key: PEM encoding failed");
		goto out;
	}
	rc = cli_write_output(out, pem, (size_t)n, 0);
out:
	BIO_free(bio);
	free(der);
	p11a_msg_clear(&reply);
	p11a_client_free(c);
	return rc;
}
