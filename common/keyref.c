/*
 * Key reference codec: strict DER, three fields, nothing else accepted.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "p11a.h"
#include "keyref.h"

#define TAG_INTEGER     0x02
#define TAG_UTF8STRING  0x0c
#define TAG_SEQUENCE    0x30

int
p11agent_der_element_len(const uint8_t *p, size_t avail, size_t *total)
{
	size_t n, len = 0, hdr, i;

	*total = 0;
	if (avail < 2)
		return -P11A_E_TRUNCATED;
	if ((p[0] & 0x1f) == 0x1f)      /* multi-byte tags: none of ours */
		return -P11A_E_MALFORMED;
	if (p[1] < 0x80) {
		*total = 2 + (size_t)p[1];
		return 0;
	}
	n = p[1] & 0x7f;
	if (n == 0)                     /* indefinite length: BER, not DER */
		return -P11A_E_MALFORMED;
	if (n > 3)
		return -P11A_E_TOO_LARGE;
	hdr = 2 + n;
	if (avail < hdr)
		return -P11A_E_TRUNCATED;
	if (p[2] == 0)                  /* leading zero: not minimal */
		return -P11A_E_MALFORMED;
	for (i = 0; i < n; i++)
		len = (len << 8) | p[2 + i];
	if (len < 0x80)                 /* long form for a short length */
		return -P11A_E_MALFORMED;
	if (len > P11AGENT_KEYREF_MAX)
		return -P11A_E_TOO_LARGE;
	*total = hdr + len;
	return 0;
}

/*
 * Reads one element with the expected tag from [*p, end): *content and
 * *clen describe its contents, *p moves past it.
 */
static int
get_element(const uint8_t **p, const uint8_t *end, uint8_t tag,
	    const uint8_t **content, size_t *clen)
{
	size_t avail = (size_t)(end - *p), total, hdr;
	int r;

	if (avail == 0)
		return -P11A_E_MALFORMED;
	if ((*p)[0] != tag)
		return -P11A_E_MALFORMED;
	if ((r = p11agent_der_element_len(*p, avail, &total)) != 0)
		return r == -P11A_E_TRUNCATED ? -P11A_E_MALFORMED : r;
	if (total > avail)
		return -P11A_E_MALFORMED;
	hdr = (*p)[1] < 0x80 ? 2 : 2 + (size_t)((*p)[1] & 0x7f);
	*content = *p + hdr;
	*clen = total - hdr;
	*p += total;
	return 0;
}

static int
is_pkcs11_uri(const uint8_t *s, size_t len)
{
	return len >= 7 && strncasecmp((const char *)s, "pkcs11:", 7) == 0 &&
	    memchr(s, '\0', len) == NULL;
}

void
p11agent_keyref_clear(struct p11agent_keyref *r)
{
	if (r == NULL)
		return;
	free(r->uri);
	free(r->spki);
	memset(r, 0, sizeof(*r));
}

int
p11agent_keyref_decode(const uint8_t *der, size_t len, struct p11agent_keyref *out)
{
	const uint8_t *p = der, *end = der + len, *seq, *c, *spki = NULL;
	const uint8_t *send;
	size_t seqlen, clen, spki_len = 0;
	char *uri = NULL;
	uint8_t *spki_copy = NULL;
	int r;

	memset(out, 0, sizeof(*out));
	if (der == NULL || len == 0)
		return -P11A_E_MALFORMED;
	if (len > P11AGENT_KEYREF_MAX)
		return -P11A_E_TOO_LARGE;
	if ((r = get_element(&p, end, TAG_SEQUENCE, &seq, &seqlen)) != 0)
		return r;
	if (p != end)                   /* bytes after the SEQUENCE */
		return -P11A_E_MALFORMED;
	p = seq;
	send = seq + seqlen;

	/* version: a one-byte INTEGER; 0 and negatives are not versions */
	if ((r = get_element(&p, send, TAG_INTEGER, &c, &clen)) != 0)
		return r;
	if (clen == 0 || (c[0] & 0x80) != 0)
		return -P11A_E_MALFORMED;
	if (clen > 1 && c[0] == 0 && (c[1] & 0x80) == 0)
		return -P11A_E_MALFORMED;   /* non-minimal INTEGER */
	if (clen != 1 || c[0] != P11AGENT_KEYREF_VERSION)
		return -P11A_E_UNSUPPORTED;

	/* uri */
	if ((r = get_element(&p, send, TAG_UTF8STRING, &c, &clen)) != 0)
		return r;
	if (clen > P11A_URI_MAX)
		return -P11A_E_TOO_LARGE;
	if (!is_pkcs11_uri(c, clen))
		return -P11A_E_MALFORMED;

	/* publicKey OPTIONAL: a SEQUENCE, kept as a whole element */
	if (p != send) {
		const uint8_t *start = p, *inner;
		size_t inner_len;

		if ((r = get_element(&p, send, TAG_SEQUENCE, &inner, &inner_len)) != 0)
			return r;
		if (inner_len == 0 || p != send)
			return -P11A_E_MALFORMED;
		spki = start;
		spki_len = (size_t)(p - start);
	}

	if ((uri = malloc(clen + 1)) == NULL)
		return -P11A_E_NOMEM;
	memcpy(uri, c, clen);
	uri[clen] = '\0';
	if (spki != NULL) {
		if ((spki_copy = malloc(spki_len)) == NULL) {
			free(uri);
			return -P11A_E_NOMEM;
		}
		memcpy(spki_copy, spki, spki_len);
	}
	out->uri = uri;
	out->spki = spki_copy;
	out->spki_len = spki != NULL ? spki_len : 0;
	return 0;
}

/* Writes a DER header for tag and len at out (room for 5 bytes); returns its size. */
static size_t
put_header(uint8_t *out, uint8_t tag, size_t len)
{
	out[0] = tag;
	if (len < 0x80) {
		out[1] = (uint8_t)len;
		return 2;
	}
	if (len <= 0xff) {
		out[1] = 0x81;
		out[2] = (uint8_t)len;
		return 3;
	}
	if (len <= 0xffff) {
		out[1] = 0x82;
		out[2] = (uint8_t)(len >> 8);
		out[3] = (uint8_t)len;
		return 4;
	}
	out[1] = 0x83;
	out[2] = (uint8_t)(len >> 16);
	out[3] = (uint8_t)(len >> 8);
	out[4] = (uint8_t)len;
	return 5;
}

int
p11agent_keyref_encode(const char *uri, const uint8_t *spki, size_t spki_len,
		       uint8_t **der, size_t *der_len)
{
	uint8_t hdr[5], *buf, *w;
	size_t ulen, body, total, total_spki;
	int r;

	*der = NULL;
	*der_len = 0;
	if (uri == NULL)
		return -P11A_E_BAD_REQUEST;
	ulen = strlen(uri);
	if (!is_pkcs11_uri((const uint8_t *)uri, ulen))
		return -P11A_E_BAD_REQUEST;
	if (ulen > P11A_URI_MAX)
		return -P11A_E_TOO_LARGE;
	if (spki == NULL)
		spki_len = 0;
	if (spki_len != 0) {
		if (spki[0] != TAG_SEQUENCE)
			return -P11A_E_BAD_REQUEST;
		if ((r = p11agent_der_element_len(spki, spki_len, &total_spki)) != 0)
			return r == -P11A_E_TOO_LARGE ? r : -P11A_E_BAD_REQUEST;
		if (total_spki != spki_len)
			return -P11A_E_BAD_REQUEST;
	}
	body = 3 + put_header(hdr, TAG_UTF8STRING, ulen) + ulen + spki_len;
	total = put_header(hdr, TAG_SEQUENCE, body) + body;
	if (total > P11AGENT_KEYREF_MAX)
		return -P11A_E_TOO_LARGE;
	if ((buf = malloc(total)) == NULL)
		return -P11A_E_NOMEM;
	w = buf;
	w += put_header(w, TAG_SEQUENCE, body);
	*w++ = TAG_INTEGER;
	*w++ = 1;
	*w++ = P11AGENT_KEYREF_VERSION;
	w += put_header(w, TAG_UTF8STRING, ulen);
	memcpy(w, uri, ulen);
	w += ulen;
	if (spki_len != 0) {
		memcpy(w, spki, spki_len);
		w += spki_len;
	}
	*der = buf;
	*der_len = (size_t)(w - buf);
	return 0;
}
