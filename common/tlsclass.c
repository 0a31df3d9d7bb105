/* The TLS-content classifier (the rules are in tlsclass.h). */
#include "config.h"
#include "tlsclass.h"

#include <string.h>

#define TLS13_PAD 64
static const char ctx_client[] = "TLS 1.3, client CertificateVerify";
static const char ctx_server[] = "TLS 1.3, server CertificateVerify";

enum {
	HS_CLIENT_HELLO = 1,
	HS_SERVER_HELLO = 2,
	HS_CERTIFICATE = 11,
	HS_SERVER_KEY_EXCHANGE = 12,
	HS_CERTIFICATE_REQUEST = 13,
	HS_SERVER_HELLO_DONE = 14,
	HS_CLIENT_KEY_EXCHANGE = 16,
	HS_CERTIFICATE_STATUS = 22
};

static enum p11a_tlsclass
classify13(const uint8_t *d, size_t len)
{
	const size_t clen = sizeof(ctx_client) - 1;     /* both strings have this length */
	size_t hlen;

	if (len < TLS13_PAD + clen + 1)
		return P11A_TLS_RAW;
	for (size_t i = 0; i < TLS13_PAD; i++)
		if (d[i] != 0x20)
			return P11A_TLS_RAW;
	hlen = len - TLS13_PAD - clen - 1;
	if (d[TLS13_PAD + clen] != 0x00 || (hlen != 32 && hlen != 48))
		return P11A_TLS_RAW;
	if (memcmp(d + TLS13_PAD, ctx_client, clen) == 0)
		return P11A_TLS_13_CLIENT;
	if (memcmp(d + TLS13_PAD, ctx_server, clen) == 0)
		return P11A_TLS_13_SERVER;
	return P11A_TLS_RAW;
}

/* The version at body[0..1] is 3.1..3.3; returns its minor, else -1. */
static int
tls_minor(const uint8_t *body, size_t blen)
{
	if (blen < 2 || body[0] != 3 || body[1] < 1 || body[1] > 3)
		return -1;
	return body[1];
}

static enum p11a_tlsclass
classify12(const uint8_t *d, size_t len)
{
	/* The types in order, at most this many messages (a handshake has about 8). */
	enum { MAXMSG = 64 };
	uint8_t type[MAXMSG];
	size_t n = 0, off = 0, nreq = 0;
	int minor = -1;

	while (off < len) {
		size_t blen;

		if (len - off < 4 || n == MAXMSG)
			return P11A_TLS_RAW;
		blen = (size_t)d[off + 1] << 16 | (size_t)d[off + 2] << 8 | d[off + 3];
		if (blen > len - off - 4)
			return P11A_TLS_RAW;
		const uint8_t *body = d + off + 4;
		if (n == 0 && (d[off] != HS_CLIENT_HELLO || blen < 38 || tls_minor(body, blen) < 0))
			return P11A_TLS_RAW;
		if (n == 1) {
			if (d[off] != HS_SERVER_HELLO || blen < 38 ||
			    (minor = tls_minor(body, blen)) < 0)
				return P11A_TLS_RAW;
		}
		type[n++] = d[off];
		off += 4 + blen;
	}
	/* ClientHello, ServerHello, (middle), ServerHelloDone, Certificate, ClientKeyExchange. */
	if (n < 6 || type[n - 1] != HS_CLIENT_KEY_EXCHANGE || type[n - 2] != HS_CERTIFICATE ||
	    type[n - 3] != HS_SERVER_HELLO_DONE)
		return P11A_TLS_RAW;
	for (size_t i = 2; i < n - 3; i++) {
		switch (type[i]) {
		case HS_CERTIFICATE_REQUEST:
			nreq++;
			break;
		case HS_CERTIFICATE:
		case HS_SERVER_KEY_EXCHANGE:
		case HS_CERTIFICATE_STATUS:
			break;
		default:
			return P11A_TLS_RAW;
		}
	}
	if (nreq != 1)
		return P11A_TLS_RAW;
	return minor == 3 ? P11A_TLS_12_CLIENT : P11A_TLS_10_CLIENT;
}

enum p11a_tlsclass
p11a_tls_classify(const uint8_t *data, size_t len, int is_digest)
{
	enum p11a_tlsclass c;

	if (is_digest)
		return P11A_TLS_DIGEST;
	if (data == NULL || len == 0)
		return P11A_TLS_RAW;
	if (data[0] == 0x20)
		return classify13(data, len);
	if ((c = classify12(data, len)) != P11A_TLS_RAW)
		return c;
	return P11A_TLS_RAW;
}

const char *
p11a_tlsclass_name(enum p11a_tlsclass c)
{
	switch (c) {
	case P11A_TLS_RAW: return "raw";
	case P11A_TLS_DIGEST: return "digest";
	case P11A_TLS_13_CLIENT: return "tls1.3";
	case P11A_TLS_13_SERVER: return "tls1.3-server";
	case P11A_TLS_12_CLIENT: return "tls1.2";
	case P11A_TLS_10_CLIENT: return "tls1.0/1.1";
	}
	return "?";
}

int
p11a_tlsclass_is_client(enum p11a_tlsclass c)
{
	return c == P11A_TLS_13_CLIENT || c == P11A_TLS_12_CLIENT || c == P11A_TLS_10_CLIENT;
}
