/*
 * What the provider makes of the agent's replies: which listed keys a URI
 * names, and whether a signature has the shape that was asked for.  Pure
 * functions (no agent, no OpenSSL state) so that the unit tests can feed
 * them malformed replies.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "p11a.h"
#include "proto.h"
#include "uri.h"
#include "provider.h"

const char *
p11agent_kt_name(int type)
{
	switch (type) {
	case P11AGENT_KT_RSA:
		return "RSA";
	case P11AGENT_KT_RSA_PSS:
		return "RSA-PSS";
	case P11AGENT_KT_EC:
		return "EC";
	case P11AGENT_KT_ED25519:
		return "ED25519";
	default:
		return NULL;
	}
}

/*
 * RFC 7512: path attributes come before '?', separated by ';'.  Only
 * type= matters here; its value may be percent-encoded but the ones we
 * know are plain words.
 */
int
p11agent_uri_class(const char *uri)
{
	const char *p, *end, *attr;
	size_t alen;

	if (uri == NULL || strncasecmp(uri, "pkcs11:", 7) != 0)
		return P11AGENT_URI_OTHER;
	p = uri + 7;
	end = p + strcspn(p, "?");
	while (p < end) {
		attr = p;
		alen = strcspn(p, ";?");
		if (attr + alen > end)
			alen = (size_t)(end - attr);
		if (alen > 5 && strncmp(attr, "type=", 5) == 0) {
			const char *v = attr + 5;
			size_t vlen = alen - 5;

			if (vlen == 7 && strncmp(v, "private", 7) == 0)
				return P11AGENT_URI_PRIVATE;
			if (vlen == 6 && strncmp(v, "public", 6) == 0)
				return P11AGENT_URI_PUBLIC;
			if (vlen == 4 && strncmp(v, "cert", 4) == 0)
				return P11AGENT_URI_CERT;
			return P11AGENT_URI_OTHER;
		}
		p = attr + alen;
		if (p < end && *p == ';')
			p++;
	}
	return P11AGENT_URI_ANY;
}

/* One DER INTEGER at [*p, end) holding a positive value in minimal form. */
static int
der_positive_integer(const uint8_t **p, const uint8_t *end)
{
	size_t avail = (size_t)(end - *p), len;

	if (avail < 2 || (*p)[0] != 0x02)
		return -1;
	if ((*p)[1] < 0x80) {
		len = (*p)[1];
		*p += 2;
	} else if ((*p)[1] == 0x81) {
		if (avail < 3 || (*p)[2] < 0x80)
			return -1;
		len = (*p)[2];
		*p += 3;
	} else {
		return -1;              /* no ECDSA integer needs more */
	}
	if (len == 0 || (size_t)(end - *p) < len)
		return -1;
	if (((*p)[0] & 0x80) != 0)              /* negative */
		return -1;
	if (len > 1 && (*p)[0] == 0 && ((*p)[1] & 0x80) == 0)
		return -1;                      /* not minimal */
	if (len == 1 && (*p)[0] == 0)           /* r and s are never 0 */
		return -1;
	*p += len;
	return 0;
}

static int
ecdsa_der_ok(const uint8_t *sig, size_t len)
{
	const uint8_t *p = sig, *end;
	size_t clen;

	if (len < 8 || sig[0] != 0x30)
		return 0;
	if (sig[1] < 0x80) {
		clen = sig[1];
		p += 2;
	} else if (sig[1] == 0x81) {
		if (sig[2] < 0x80)
			return 0;
		clen = sig[2];
		p += 3;
	} else {
		return 0;
	}
	if ((size_t)(sig + len - p) != clen)
		return 0;
	end = p + clen;
	if (der_positive_integer(&p, end) != 0 || der_positive_integer(&p, end) != 0)
		return 0;
	return p == end;
}

int
p11agent_check_signature(int scheme, const uint8_t *sig, size_t sig_len,
			 size_t expect_len, size_t sigsize)
{
	if (sig == NULL || sig_len == 0)
		return -P11A_E_MALFORMED;
	if (sig_len > sigsize)
		return -P11A_E_TOO_LARGE;
	switch (scheme) {
	case P11A_SCHEME_RSA_PKCS1:
	case P11A_SCHEME_RSA_PSS:
		return sig_len == expect_len ? 0 : -P11A_E_MALFORMED;
	case P11A_SCHEME_ECDSA:
		if (sig_len > expect_len)
			return -P11A_E_MALFORMED;
		return ecdsa_der_ok(sig, sig_len) ? 0 : -P11A_E_MALFORMED;
	case P11A_SCHEME_EDDSA:
		return sig_len == 64 ? 0 : -P11A_E_MALFORMED;
	default:
		return -P11A_E_MALFORMED;
	}
}
