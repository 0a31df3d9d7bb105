/*
 * p11agent setup git | chromium-policy: what a client needs to present one
 * of the agent's keys, worked out from LIST (the key's URI, its
 * certificate's URI and issuer), then applied or only shown (--dry-run).
 * Nothing system-wide is written unless --system is given.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/objects.h>
#include <openssl/x509.h>

#include "cli.h"
#include "paths.h"

#define CHROMIUM_POLICY_DIR "/etc/chromium/policies/managed"
#define CHROMIUM_POLICY_FILE CHROMIUM_POLICY_DIR "/p11agent.json"

/*
 * The key to set up: the one --key names, or without --key the only key
 * that has a certificate.  Needs the certificate (a TLS client sends it).
 */
static int
pick_key(const struct p11a_list_reply *l, const char *uri, const struct p11a_key **out)
{
	const struct p11a_key *k = NULL;
	size_t n = 0;
	int rc;

	*out = NULL;
	if (uri != NULL) {
		if ((rc = cli_find_key(l, uri, &k)) != CLI_EXIT_OK)
			return rc;
	} else {
		for (uint32_t i = 0; i < l->nkeys; i++) {
			if (l->keys[i].cert_len > 0) {
				k = &l->keys[i];
				n++;
			}
		}
		if (n != 1) {
			cli_err("%s; name one with --key URI ('p11agent list' shows them)",
				n == 0 ? "no key of the agent has a certificate" :
				"several keys have a certificate");
			return CLI_EXIT_FAIL;
		}
	}
	if (k->cert_len == 0 || k->cert_uri == NULL || k->cert_uri[0] == '\0') {
		cli_err("key '%s' has no certificate on its token: a TLS client needs one",
			k->label != NULL ? k->label : "");
		return CLI_EXIT_FAIL;
	}
	*out = k;
	return CLI_EXIT_OK;
}

/*
 * Connects, fetches LIST into *reply and picks the key (pick_key).  The
 * caller frees *c and clears *reply whatever the result.
 */
static int
setup_key(const struct cli_ctx *ctx, const char *uri, struct p11a_client **c,
	  struct p11a_msg *reply, const struct p11a_key **out)
{
	int rc;

	memset(reply, 0, sizeof(*reply));
	if ((rc = cli_connect(ctx, c)) != CLI_EXIT_OK ||
	    (rc = cli_list(*c, reply)) != CLI_EXIT_OK)
		return rc;
	return pick_key(&reply->u.list, uri, out);
}

/* Prints s as one shell word in single quotes. */
static void
shell_word(FILE *f, const char *s)
{
	fputc('\'', f);
	for (; *s != '\0'; s++) {
		if (*s == '\'')
			fputs("'\\''", f);
		else
			fputc(*s, f);
	}
	fputc('\'', f);
}

/* git config [--global|--system] NAME VALUE, shown or run. */
static int
git_set(int system, int dry_run, const char *name, const char *value)
{
	char *argv[] = { "git", "config", system ? "--system" : "--global", (char *)name,
			 (char *)value, NULL };
	int r;

	if (dry_run) {
		printf("git config %s %s ", argv[2], name);
		shell_word(stdout, value);
		putchar('\n');
		return CLI_EXIT_OK;
	}
	if ((r = cli_run_tool(argv, 0)) != 0) {
		cli_err("git config %s %s failed (exit %d)", argv[2], name, r);
		return CLI_EXIT_FAIL;
	}
	return CLI_EXIT_OK;
}

int
cli_setup_git(const struct cli_ctx *ctx, const char *key_uri, const char *url, int system,
	      int dry_run)
{
	struct p11a_client *c = NULL;
	struct p11a_msg reply;
	const struct p11a_key *k;
	char *cert_name = NULL, *key_name = NULL;
	int rc;

	if (url != NULL && strncmp(url, "https://", 8) != 0)
		return cli_usage_err("setup", "--url: '%s' is not an https:// URL", url);
	if ((rc = setup_key(ctx, key_uri, &c, &reply, &k)) != CLI_EXIT_OK)
		goto out;
	rc = CLI_EXIT_FAIL;
	if (asprintf(&cert_name, "http.%s%ssslCert", url ? url : "", url ? "." : "") < 0 ||
	    asprintf(&key_name, "http.%s%ssslKey", url ? url : "", url ? "." : "") < 0) {
		cert_name = key_name = NULL;
		cli_err("out of memory");
		goto out;
	}
	if (dry_run)
		printf("# p11agent setup git would run (nothing changed):\n");
	if ((rc = git_set(system, dry_run, cert_name, k->cert_uri)) != CLI_EXIT_OK ||
	    (rc = git_set(system, dry_run, key_name, k->uri)) != CLI_EXIT_OK)
		goto out;
	if (!dry_run)
		printf("git (%s configuration) now presents key '%s' and its certificate%s%s.\n",
		       system ? "system" : "your", k->label ? k->label : "",
		       url ? " to " : " to every HTTPS server", url ? url : "");
	/* GnuTLS finds the module through p11-kit's registry. */
	if (access(P11A_P11KIT_MODULE_FILE, R_OK) != 0)
		fprintf(stderr, "p11agent: note: git's GnuTLS loads the agent's PKCS#11 module through "
			"p11-kit, and %s is missing: link it into ~/.config/pkcs11/modules/\n",
			P11A_P11KIT_MODULE_FILE);
 out:
	free(cert_name);
	free(key_name);
	p11a_msg_clear(&reply);
	p11a_client_free(c);
	return cli_finish_stdout(rc);
}

/* Appends s to b as the body of a JSON string (no quotes). */
static int
json_escape(char *b, size_t size, size_t *len, const char *s)
{
	for (; *s != '\0'; s++) {
		unsigned char ch = (unsigned char)*s;
		int n;

		if (ch == '"' || ch == '\\')
			n = snprintf(b + *len, size - *len, "\\%c", ch);
		else if (ch < 0x20)
			n = snprintf(b + *len, size - *len, "\\u%04x", ch);
		else
			n = snprintf(b + *len, size - *len, "%c", ch);
		if (n < 0 || (size_t)n >= size - *len)
			return -1;
		*len += (size_t)n;
	}
	return 0;
}

/* Appends s to b as it is. */
static int
json_raw(char *b, size_t size, size_t *len, const char *s)
{
	int n = snprintf(b + *len, size - *len, "%s", s);

	if (n < 0 || (size_t)n >= size - *len)
		return -1;
	*len += (size_t)n;
	return 0;
}

/*
 * The common names of a DER certificate's issuer and subject into the two
 * buffers; -1 without an issuer CN.  A subject without a CN leaves "".
 */
static int
cert_cns(const uint8_t *der, size_t len, char *issuer, size_t isize, char *subject, size_t ssize)
{
	const unsigned char *p = der;
	X509 *x = d2i_X509(NULL, &p, (long)len);
	int n = -1;

	subject[0] = '\0';
	if (x != NULL) {
		n = X509_NAME_get_text_by_NID(X509_get_issuer_name(x), NID_commonName, issuer,
					      (int)isize);
		if (X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, subject,
					      (int)ssize) <= 0)
			subject[0] = '\0';
	}
	X509_free(x);
	return n > 0 ? 0 : -1;
}

/* Writes text to path through a temporary file in the same directory. */
static int
write_file(const char *path, const char *text)
{
	char tmp[4096];
	FILE *f;
	int fd;

	if (snprintf(tmp, sizeof(tmp), "%s.XXXXXX", path) >= (int)sizeof(tmp) ||
	    (fd = mkstemp(tmp)) < 0)
		return -1;
	if (fchmod(fd, 0644) != 0 || (f = fdopen(fd, "w")) == NULL) {
		close(fd);
		unlink(tmp);
		return -1;
	}
	if (fputs(text, f) == EOF || fclose(f) != 0 || rename(tmp, path) != 0) {
		unlink(tmp);
		return -1;
	}
	return 0;
}

int
cli_setup_chromium(const struct cli_ctx *ctx, const char *key_uri, const char *url, int system,
		   int dry_run)
{
	struct p11a_client *c = NULL;
	struct p11a_msg reply;
	const struct p11a_key *k;
	char cn[256], subj[256], inner[2048], text[4096];
	size_t ilen = 0, tlen = 0;
	int rc;

	if (url == NULL)
		return cli_usage_err("setup", "chromium-policy needs --url PATTERN "
				     "(e.g. https://[*.]example.com)");
	if ((rc = setup_key(ctx, key_uri, &c, &reply, &k)) != CLI_EXIT_OK)
		goto out;
	rc = CLI_EXIT_FAIL;
	if (cert_cns(k->cert, k->cert_len, cn, sizeof(cn), subj, sizeof(subj)) != 0) {
		cli_err("the certificate of key '%s' has no issuer common name to select it by",
			k->label ? k->label : "");
		goto out;
	}
	/*
	 * The policy's list holds JSON objects as strings: the values are
	 * escaped in the object, and the whole object once more in the list.
	 * Issuer and subject CN together: Chromium selects nothing when
	 * several of the token's certificates match (one CA issues them all).
	 */
	if (json_raw(inner, sizeof(inner), &ilen, "{\"pattern\":\"") != 0 ||
	    json_escape(inner, sizeof(inner), &ilen, url) != 0 ||
	    json_raw(inner, sizeof(inner), &ilen, "\",\"filter\":{\"ISSUER\":{\"CN\":\"") != 0 ||
	    json_escape(inner, sizeof(inner), &ilen, cn) != 0 ||
	    json_raw(inner, sizeof(inner), &ilen, subj[0] ? "\"},\"SUBJECT\":{\"CN\":\"" : "") != 0 ||
	    json_escape(inner, sizeof(inner), &ilen, subj) != 0 ||
	    json_raw(inner, sizeof(inner), &ilen, subj[0] ? "\"}}}" : "\"}}}") != 0) {
		cli_err("--url or the issuer name is too long");
		goto out;
	}
	inner[ilen] = '\0';
	tlen = (size_t)snprintf(text, sizeof(text), "{\"AutoSelectCertificateForUrls\": [\"");
	if (json_escape(text, sizeof(text), &tlen, inner) != 0 ||
	    tlen + 5 >= sizeof(text)) {
		cli_err("--url or the issuer name is too long");
		goto out;
	}
	memcpy(text + tlen, "\"]}\n", 5);
	if (!system) {
		fputs(text, stdout);
		rc = CLI_EXIT_OK;
		goto out;
	}
	if (dry_run) {
		printf("# p11agent setup chromium-policy --system would write %s (nothing changed):\n%s",
		       CHROMIUM_POLICY_FILE, text);
		rc = CLI_EXIT_OK;
		goto out;
	}
	if ((mkdir("/etc/chromium", 0755) != 0 && errno != EEXIST) ||
	    (mkdir("/etc/chromium/policies", 0755) != 0 && errno != EEXIST) ||
	    (mkdir(CHROMIUM_POLICY_DIR, 0755) != 0 && errno != EEXIST) ||
	    write_file(CHROMIUM_POLICY_FILE, text) != 0) {
		cli_err("cannot write %s: %s", CHROMIUM_POLICY_FILE, strerror(errno));
		goto out;
	}
	printf("Wrote %s: Chromium presents key '%s' (certificate of '%s' issued by '%s') to %s "
	       "without asking.\n", CHROMIUM_POLICY_FILE, k->label ? k->label : "", subj, cn, url);
	rc = CLI_EXIT_OK;
 out:
	p11a_msg_clear(&reply);
	p11a_client_free(c);
	return cli_finish_stdout(rc);
}
