/*
 * p11agent sign: signs a message (or a digest) with a key on a token.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "uri.h"

static const char sign_usage[] =
	"Usage: p11agent sign --key URI --scheme SCHEME [--hash HASH]\n"
	"                     [--salt-len N|digest|max] [--digest]\n"
	"                     [--in FILE] [--out FILE]\n"
	"\n"
	"Signs the message in FILE (default: standard input) and writes the raw\n"
	"signature to --out (default: standard output, never a terminal).\n"
	"ECDSA signatures are DER-encoded, as 'openssl dgst -verify' expects.\n"
	"The agent hashes the message; one too large for a request (over\n"
	"251 KiB) is hashed here instead, except for eddsa.\n"
	"\n"
	"Options:\n"
	"  -k, --key URI          the key (a pkcs11: URI, see 'p11agent list')\n"
	"  -s, --scheme SCHEME    rsa-pkcs1, rsa-pss, ecdsa or eddsa\n"
	"  -H, --hash HASH        sha256 (default), sha384, sha512, sha224, sha1;\n"
	"                         not with eddsa, which signs the message itself\n"
	"      --salt-len LEN     rsa-pss salt: bytes, 'digest' (default) or 'max'\n"
	"  -d, --digest           the input is already a HASH digest (raw bytes)\n"
	"  -i, --in FILE          read the input from FILE ('-': standard input)\n"
	"  -o, --out FILE         write the signature to FILE ('-': standard output)\n"
	"  -h, --help             show this help\n";

enum { OPT_SALT_LEN = 0x100 };

static int
parse_salt(const char *s, uint32_t *out)
{
	char *end;
	unsigned long v;

	if (strcmp(s, "digest") == 0) {
		*out = P11A_PSS_SALT_DIGEST;
		return 0;
	}
	if (strcmp(s, "max") == 0) {
		*out = P11A_PSS_SALT_MAX;
		return 0;
	}
	if (*s < '0' || *s > '9')
		return -1;
	errno = 0;
	v = strtoul(s, &end, 10);
	/* No salt can be as long as the largest signature. */
	if (errno != 0 || *end != '\0' || v >= P11A_SIG_MAX)
		return -1;
	*out = (uint32_t)v;
	return 0;
}

int
cmd_sign(struct cli_ctx *ctx, int argc, char **argv)
{
	static const struct option opts[] = {
		{ "key", required_argument, NULL, 'k' },
		{ "scheme", required_argument, NULL, 's' },
		{ "hash", required_argument, NULL, 'H' },
		{ "salt-len", required_argument, NULL, OPT_SALT_LEN },
		{ "digest", no_argument, NULL, 'd' },
		{ "in", required_argument, NULL, 'i' },
		{ "out", required_argument, NULL, 'o' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 }
	};
	const char *key = NULL, *scheme_name = NULL, *hash_name = NULL;
	const char *salt_name = NULL, *in = NULL, *out = NULL;
	struct p11a_uri_matcher *m;
	struct p11a_client *c = NULL;
	struct p11a_sign req;
	uint8_t *data = NULL, *sig = NULL;
	size_t data_len = 0, sig_len = 0;
	uint32_t salt = P11A_PSS_SALT_DIGEST;
	int ch, r, rc, scheme, hash, digest = 0, hashed = 0, err = 0;

	while ((ch = getopt_long(argc, argv, "k:s:H:di:o:h", opts, NULL)) != -1) {
		switch (ch) {
		case 'k':
			key = optarg;
			break;
		case 's':
			scheme_name = optarg;
			break;
		case 'H':
			hash_name = optarg;
			break;
		case OPT_SALT_LEN:
			salt_name = optarg;
			break;
		case 'd':
			digest = 1;
			break;
		case 'i':
			in = optarg;
			break;
		case 'o':
			out = optarg;
			break;
		case 'h':
			fputs(sign_usage, stdout);
			return cli_finish_stdout(CLI_EXIT_OK);
		default:
			return cli_try_help("sign");
		}
	}
	if (optind < argc)
		return cli_usage_err("sign", "unexpected argument '%s'", argv[optind]);
	if (key == NULL)
		return cli_usage_err("sign", "--key URI is required");
	if (scheme_name == NULL)
		return cli_usage_err("sign", "--scheme is required (rsa-pkcs1, rsa-pss, ecdsa or eddsa)");

	scheme = p11a_scheme_from_name(scheme_name);
	if (scheme < 0)
		return cli_usage_err("sign", "unknown scheme '%s' (rsa-pkcs1, rsa-pss, ecdsa or eddsa)",
				     scheme_name);
	if (scheme == P11A_SCHEME_EDDSA) {
		if (hash_name != NULL)
			return cli_usage_err("sign", "--hash does not apply to eddsa, which signs the message itself");
		if (digest)
			return cli_usage_err("sign", "--digest does not apply to eddsa, which signs the message itself");
		hash = P11A_HASH_NONE;
	} else if (hash_name == NULL) {
		hash = P11A_HASH_SHA256;
	} else {
		hash = p11a_hash_from_name(hash_name);
		if (hash <= P11A_HASH_NONE)
			return cli_usage_err("sign", "unknown hash '%s' (sha256, sha384, sha512, sha224 or sha1)",
					     hash_name);
	}
	if (salt_name != NULL) {
		if (scheme != P11A_SCHEME_RSA_PSS)
			return cli_usage_err("sign", "--salt-len applies only to rsa-pss");
		if (parse_salt(salt_name, &salt) != 0)
			return cli_usage_err("sign", "--salt-len: '%s' is not a byte count below %d, 'digest' or 'max'",
					     salt_name, P11A_SIG_MAX);
	}
	if (strlen(key) > P11A_URI_MAX)
		return cli_usage_err("sign", "--key: URI longer than %d bytes", P11A_URI_MAX);
	m = p11a_uri_matcher_new(key, &err);
	if (m == NULL) {
		if (err == -P11A_E_URI || err == 0)
			return cli_usage_err("sign", "--key: '%s' is not a valid pkcs11: URI", key);
		cli_err("sign: %s", p11a_strerror(err));
		return CLI_EXIT_FAIL;
	}
	p11a_uri_matcher_free(m);

	/* Before reading input or asking the token for anything. */
	if (cli_refuse_binary_tty(out, "a binary signature"))
		return CLI_EXIT_FAIL;

	/*
	 * The agent hashes the message itself, so that it sees what it signs;
	 * a message too large for one request is hashed here instead (not
	 * possible for Ed25519, which needs the whole message).
	 */
	rc = cli_read_input(in, digest ? P11A_HASH_NONE : hash, &data, &data_len, &hashed);
	if (rc != CLI_EXIT_OK)
		return rc;
	if (hashed)
		digest = 1;
	if (digest && data_len != p11a_hash_len(hash)) {
		cli_err("sign: the input is %zu bytes, but a %s digest has %zu",
			data_len, p11a_hash_name(hash), p11a_hash_len(hash));
		rc = CLI_EXIT_FAIL;
		goto done;
	}

	memset(&req, 0, sizeof(req));
	req.key_uri = (char *)key;
	req.scheme = (uint8_t)scheme;
	req.hash = (uint8_t)hash;
	req.mgf1_hash = P11A_HASH_NONE;      /* MGF1 with the same hash */
	req.input = digest ? P11A_INPUT_DIGEST : P11A_INPUT_MESSAGE;
	req.salt_len = scheme == P11A_SCHEME_RSA_PSS ? salt : 0;
	req.data = data;
	req.data_len = data_len;

	rc = cli_connect(ctx, &c);
	if (rc != CLI_EXIT_OK)
		goto done;
	r = p11a_client_sign(c, &req, &sig, &sig_len);
	if (r != 0) {
		rc = cli_fail(c, r, "sign with %s", key);
		if (r == -P11A_E_POLICY && strstr(p11a_client_last_error(c) ? p11a_client_last_error(c) : "",
						  "not allowed for this program") != NULL)
			cli_err("the agent's configuration lets only the programs its allow-programs "
				"names use this key (p11agentd.conf(5), KEY SECTIONS)");
		else if (r == -P11A_E_POLICY)
			cli_err("the agent's configuration makes this key tls-only: it signs TLS "
				"client handshakes only (p11agentd.conf(5), KEY SECTIONS)");
		goto done;
	}
	rc = cli_write_output(out, sig, sig_len, 1);
done:
	free(sig);
	free(data);
	p11a_client_free(c);
	return rc;
}
