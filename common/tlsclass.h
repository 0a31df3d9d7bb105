/*
 * What a SIGN request's input is, for the tls-only key policy
 * (docs/p11agentd.conf.5): TLS client authentication content, or
 * anything else.  Pure code, no allocation; the input may be hostile.
 *
 * The rules, exactly:
 *
 * - A digest (input DIGEST or RAW) cannot be classified: P11A_TLS_DIGEST.
 *
 * - TLS 1.3 (RFC 8446 4.4.3): 64 bytes 0x20, the context string
 *   "TLS 1.3, client CertificateVerify" (or "..., server ..."), one 0x00,
 *   then the transcript hash, 32 bytes (SHA-256, SM3) or 48 (SHA-384):
 *   the hashes of TLS 1.3's cipher suites.  Exactly that, nothing after:
 *   P11A_TLS_13_CLIENT, or P11A_TLS_13_SERVER for the server's context
 *   string (which a client key must never sign).
 *
 * - TLS 1.0 to 1.2 (RFC 5246 7.4.8): what OpenSSL's client signs is the
 *   handshake transcript, every handshake message from the ClientHello to
 *   the ClientKeyExchange, each with its 4-byte header (type, 24-bit
 *   length).  The input must split exactly into complete messages (no
 *   trailing bytes), in this order:
 *     ClientHello (1), its body at least 38 bytes and its legacy_version
 *       3.1 to 3.3;
 *     ServerHello (2), version 3.1 to 3.3 (which picks the class);
 *     any of Certificate (11), ServerKeyExchange (12), CertificateStatus
 *       (22), with exactly one CertificateRequest (13) among them;
 *     ServerHelloDone (14);
 *     the client's Certificate (11);
 *     ClientKeyExchange (16), the last message.
 *   P11A_TLS_12_CLIENT (ServerHello 3.3) or P11A_TLS_10_CLIENT (3.1, 3.2).
 *
 * - Anything else: P11A_TLS_RAW.
 */
#ifndef P11A_TLSCLASS_H
#define P11A_TLSCLASS_H

#include <stddef.h>
#include <stdint.h>

enum p11a_tlsclass {
	P11A_TLS_RAW = 0,               /* not TLS client authentication content */
	P11A_TLS_DIGEST,                /* a digest: cannot tell */
	P11A_TLS_13_CLIENT,             /* TLS 1.3 client CertificateVerify content */
	P11A_TLS_13_SERVER,             /* TLS 1.3 server CertificateVerify content */
	P11A_TLS_12_CLIENT,             /* TLS 1.2 client handshake transcript */
	P11A_TLS_10_CLIENT              /* TLS 1.0/1.1 client handshake transcript */
};

/* is_digest: the request carries a digest (input DIGEST or RAW), not the message. */
enum p11a_tlsclass p11a_tls_classify(const uint8_t *data, size_t len, int is_digest);

/* "tls1.3", "tls1.3-server", "tls1.2", "tls1.0/1.1", "raw", "digest". */
const char *p11a_tlsclass_name(enum p11a_tlsclass c);

/* 1 for the classes a tls-only key signs (client content of TLS 1.0..1.3). */
int p11a_tlsclass_is_client(enum p11a_tlsclass c);

#endif
