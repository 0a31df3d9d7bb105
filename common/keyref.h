/*
 * Key reference: a small DER structure that names a key held by the agent.
 * `p11agent export-key` writes it as PEM ("P11AGENT KEY"); the provider's
 * decoder reads it back; the provider also uses the same bytes as the
 * object reference it hands to OpenSSL (store and decoder -> keymgmt load).
 *
 *   P11AgentKey ::= SEQUENCE {
 *       version    INTEGER,                       -- 1
 *       uri        UTF8String,                    -- pkcs11: URI of the key
 *       publicKey  SubjectPublicKeyInfo OPTIONAL  -- the key's public half
 *   }
 *
 * It holds no secret.  docs/provider.md describes it for users.  Pure code
 * (no OpenSSL, no I/O) so that the unit tests can feed it anything.
 */
#ifndef P11AGENT_KEYREF_H
#define P11AGENT_KEYREF_H

#include <stddef.h>
#include <stdint.h>

#define P11AGENT_KEYREF_PEM_LABEL   "P11AGENT KEY"
#define P11AGENT_KEYREF_STRUCTURE   "p11agent-key"
#define P11AGENT_KEYREF_VERSION     1
/* Bound on a whole reference: a 4096-byte URI plus an RSA-16384 SPKI. */
#define P11AGENT_KEYREF_MAX         (16u * 1024u)

struct p11agent_keyref {
	char *uri;          /* NUL-terminated, starts with "pkcs11:" */
	uint8_t *spki;      /* DER SubjectPublicKeyInfo, or NULL */
	size_t spki_len;
};

/*
 * Length of the DER element (tag, length and contents) that starts at p,
 * from its header alone: 0 with *total set, -P11A_E_TRUNCATED when avail
 * bytes do not hold the whole header yet, -P11A_E_MALFORMED for an
 * indefinite, non-minimal or over-long length (only single-byte tags,
 * lengths up to P11AGENT_KEYREF_MAX; larger is -P11A_E_TOO_LARGE).
 */
int p11agent_der_element_len(const uint8_t *p, size_t avail, size_t *total);

/*
 * Decodes exactly one P11AgentKey occupying der[0..len).  *out is zeroed
 * first; on success the caller owns its fields (p11agent_keyref_clear).
 * Errors: -P11A_E_MALFORMED (not this structure, bad DER, trailing bytes,
 * a URI that is not "pkcs11:" text), -P11A_E_UNSUPPORTED (another
 * version), -P11A_E_TOO_LARGE, -P11A_E_NOMEM.
 */
int p11agent_keyref_decode(const uint8_t *der, size_t len, struct p11agent_keyref *out);

/*
 * Encodes a reference; spki may be NULL (spki_len 0).  *der is malloc'd.
 * Errors: -P11A_E_BAD_REQUEST (uri not "pkcs11:..." or has NUL bytes,
 * spki not a DER SEQUENCE), -P11A_E_TOO_LARGE, -P11A_E_NOMEM.
 */
int p11agent_keyref_encode(const char *uri, const uint8_t *spki, size_t spki_len,
			   uint8_t **der, size_t *der_len);

void p11agent_keyref_clear(struct p11agent_keyref *r);

#endif
