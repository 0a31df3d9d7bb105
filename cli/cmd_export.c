/*
 * p11agent pubkey / export-cert: a key's public half or its paired
 * certificate, as PEM or DER.  Both come from LIST; nothing is read from
 * the token here.
 */
#include "config.h"

#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include <openssl/bio.h>
#include <openssl/pem.h>

#include "cli.h"

static const char pubkey_usage[] =
	"Usage: p11agent pubkey URI [--out FILE] [--der]\n"
	"\n"
	"Writes the public key of the one key matching URI as a PEM\n"
	"\"PUBLIC KEY\" (SubjectPublicKeyInfo), or as DER with --der.\n"
	"\n"
	"Options:\n"
	"  -o, --out FILE  write to FILE instead of standard output\n"
	"      --der       DER instead of PEM (never to a terminal)\n"
	"  -h, --help      show this help\n";

static const char export_cert_usage[] =
	"Usage: p11agent export-cert URI [--out FILE] [--der]\n"
	"\n"
	"Writes the certificate paired with the one key matching URI, as PEM\n"
	"or as DER with --der.\n"
	"\n"
	"Options:\n"
	"  -o, --out FILE  write to FILE instead of standard output\n"
	"      --der       DER instead of PEM (never to a terminal)\n"
	"  -h, --help      show this help\n";

enum { OPT_DER = 0x100 };

/* DER -> PEM with the given label, then out. */
static int
write_pem(const char *out, const char *pem_name, const uint8_t *der, size_t der_len)
{
	BIO *bio;
	char *pem = NULL;
	long n;
	int rc = CLI_EXIT_FAIL;

	if (der_len > (size_t)LONG_MAX)
		goto fail;
	bio = BIO_new(BIO_s_mem());
	if (bio == NULL)
		goto fail;
	if (PEM_write_bio(bio, pem_name, "", der, (long)der_len) <= 0) {
		BIO_free(bio);
		goto fail;
	}
	n = BIO_get_mem_data(bio, &pem);
	if (n < 0 || pem == NULL) {
		BIO_free(bio);
		goto fail;
	}
	rc = cli_write_output(out, pem, (size_t)n, 0);
	BIO_free(bio);
	return rc;
fail:
	cli_err("PEM encoding failed");
	return rc;
}

static int
export_run(struct cli_ctx *ctx, int argc, char **argv, int cert)
{
	static const struct option opts[] = {
		{ "out", required_argument, NULL, 'o' },
		{ "der", no_argument, NULL, OPT_DER },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 }
	};
	const char *verb = cert ? "export-cert" : "pubkey";
	const char *out = NULL, *uri;
	const struct p11a_key *k;
	struct p11a_client *c = NULL;
	struct p11a_msg reply;
	const uint8_t *der;
	size_t der_len;
	int ch, rc, as_der = 0;

	memset(&reply, 0, sizeof(reply));
	while ((ch = getopt_long(argc, argv, "o:h", opts, NULL)) != -1) {
		switch (ch) {
		case 'o':
			out = optarg;
			break;
		case OPT_DER:
			as_der = 1;
			break;
		case 'h':
			fputs(cert ? export_cert_usage : pubkey_usage, stdout);
			return cli_finish_stdout(CLI_EXIT_OK);
		default:
			return cli_try_help(verb);
		}
	}
	if (optind >= argc)
		return cli_usage_err(verb, "a key URI is required");
	if (optind + 1 < argc)
		return cli_usage_err(verb, "unexpected argument '%s'", argv[optind + 1]);
	uri = argv[optind];
	if (as_der && cli_refuse_binary_tty(out, "DER"))
		return CLI_EXIT_FAIL;

	rc = cli_connect(ctx, &c);
	if (rc != CLI_EXIT_OK)
		return rc;
	rc = cli_list(c, &reply);
	if (rc != CLI_EXIT_OK)
		goto out;
	rc = cli_find_key(&reply.u.list, uri, &k);
	if (rc != CLI_EXIT_OK)
		goto out;

	if (cert) {
		der = k->cert;
		der_len = k->cert_len;
		if (der == NULL || der_len == 0) {
			cli_err("no certificate for key %s", uri);
			rc = CLI_EXIT_FAIL;
			goto out;
		}
	} else {
		der = k->spki;
		der_len = k->spki_len;
		if (der == NULL || der_len == 0) {
			cli_err("no public key known for key %s", uri);
			rc = CLI_EXIT_FAIL;
			goto out;
		}
	}
	if (as_der)
		rc = cli_write_output(out, der, der_len, 1);
	else
		rc = write_pem(out, cert ? "CERTIFICATE" : "PUBLIC KEY", der, der_len);
out:
	p11a_msg_clear(&reply);
	p11a_client_free(c);
	return rc;
}

int
cmd_pubkey(struct cli_ctx *ctx, int argc, char **argv)
{
	return export_run(ctx, argc, argv, 0);
}

int
cmd_export_cert(struct cli_ctx *ctx, int argc, char **argv)
{
	return export_run(ctx, argc, argv, 1);
}
