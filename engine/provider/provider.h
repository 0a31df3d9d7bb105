/*
 * p11agent OpenSSL 3 provider: what the operation files share.
 *
 * The provider holds no private key and never calls PKCS#11.  A key is a
 * pkcs11: URI plus its public half (SubjectPublicKeyInfo from the agent's
 * LIST reply or from a key-reference file); signing sends SIGN to the
 * agent over common/client.c.  Everything that needs the public key
 * (parameters, export, match) uses the default provider in a private
 * library context, never this provider, so nothing can recurse.
 *
 * Entry points follow OpenSSL's conventions: 1 on success, 0 on failure
 * with the reason on OpenSSL's error stack (p11agent_raise).
 */
#ifndef P11AGENT_PROVIDER_H
#define P11AGENT_PROVIDER_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include <openssl/core.h>
#include <openssl/core_dispatch.h>
#include <openssl/evp.h>

#include "p11a.h"
#include "proto.h"
#include "keyref.h"

#define P11AGENT_PROV_NAME      "p11agent"
#define P11AGENT_PROPS          "provider=p11agent"

/* Algorithm names: exactly the default provider's, so that EVP_PKEY_is_a() and TLS agree. */
#define P11AGENT_NAMES_RSA      "RSA:rsaEncryption:1.2.840.113549.1.1.1"
#define P11AGENT_NAMES_RSA_PSS  "RSA-PSS:RSASSA-PSS:1.2.840.113549.1.1.10"
#define P11AGENT_NAMES_EC       "EC:id-ecPublicKey:1.2.840.10045.2.1"
#define P11AGENT_NAMES_ED25519  "ED25519:1.3.101.112"
#define P11AGENT_NAMES_ECDSA    "ECDSA"

/* Key types as the provider sees them (RSA-PSS is an RSA key restricted to PSS). */
enum p11agent_kt {
	P11AGENT_KT_NONE = 0,
	P11AGENT_KT_RSA = 1,
	P11AGENT_KT_RSA_PSS = 2,
	P11AGENT_KT_EC = 3,
	P11AGENT_KT_ED25519 = 4
};

/* Reason codes on OpenSSL's error stack (text in provider.c). */
enum p11agent_reason {
	P11AGENT_R_AGENT_NOT_RUNNING = 1,
	P11AGENT_R_AGENT_ERROR = 2,
	P11AGENT_R_TOKEN_LOCKED = 3,
	P11AGENT_R_NO_SUCH_KEY = 4,
	P11AGENT_R_AMBIGUOUS_URI = 5,
	P11AGENT_R_BAD_URI = 6,
	P11AGENT_R_BAD_KEY_REFERENCE = 7,
	P11AGENT_R_UNSUPPORTED = 8,
	P11AGENT_R_BAD_REPLY = 9,
	P11AGENT_R_INTERNAL = 10,
	P11AGENT_R_BUFFER_TOO_SMALL = 11,
	P11AGENT_R_BAD_PARAMETER = 12,
	P11AGENT_R_POLICY = 13
};

/* The provider context: one per provider instance (library context). */
struct p11agent_prov {
	const OSSL_CORE_HANDLE *handle;
	char *socket_path;              /* "socket" from the config section, or NULL */
	OSSL_FUNC_core_new_error_fn *c_new_error;
	OSSL_FUNC_core_set_error_debug_fn *c_set_error_debug;
	OSSL_FUNC_core_vset_error_fn *c_vset_error;
	OSSL_FUNC_BIO_read_ex_fn *c_bio_read_ex;
	OSSL_FUNC_BIO_gets_fn *c_bio_gets;
	OSSL_LIB_CTX *pub_libctx;       /* default provider only; see p11agent_pub_libctx() */
	OSSL_PROVIDER *pub_default;     /* the default provider loaded there */
	struct p11a_pool *pool;         /* idle agent connections (common/pool.h) */
};

/* A key: immutable after creation, shared by reference count. */
struct p11agent_key {
	struct p11agent_prov *prov;
	atomic_int refs;
	int type;                       /* enum p11agent_kt */
	char *uri;                      /* the agent's pkcs11: URI of the private key */
	uint8_t *spki;                  /* DER SubjectPublicKeyInfo */
	size_t spki_len;
	EVP_PKEY *pub;                  /* spki decoded in prov->pub_libctx */
	size_t sig_size;                /* largest signature (EVP_PKEY_get_size) */
};

/*
 * The object reference the store and the decoder hand to OpenSSL, which
 * passes it to keymgmt load() of this provider: a borrowed pointer to a
 * key, valid for the duration of the callback (load takes a reference).
 */
#define P11AGENT_OBJREF_MAGIC   "p11akey"
struct p11agent_objref {
	char magic[8];                  /* P11AGENT_OBJREF_MAGIC with its NUL */
	struct p11agent_key *key;
};

/* ---------------------------------------------------------------- provider.c */

/* Puts reason and a formatted message on OpenSSL's error stack. */
void p11agent_raise_at(const struct p11agent_prov *p, const char *file, int line,
		       const char *func, int reason, const char *fmt, ...)
	__attribute__((format(printf, 6, 7)));
#define p11agent_raise(p, reason, ...) \
	p11agent_raise_at((p), __FILE__, __LINE__, __func__, (reason), __VA_ARGS__)

/* Library context with only the default provider (created on first use); NULL on failure (raised). */
OSSL_LIB_CTX *p11agent_pub_libctx(struct p11agent_prov *p);

/*
 * Builds a key from its URI and SPKI (both copied).  The key type comes
 * from the SPKI; want_type, when not NONE, must match it.  NULL on failure
 * (raised).
 */
struct p11agent_key *p11agent_key_new(struct p11agent_prov *p, const char *uri,
				      const uint8_t *spki, size_t spki_len, int want_type);
struct p11agent_key *p11agent_key_ref(struct p11agent_key *k);
void p11agent_key_unref(struct p11agent_key *k);

/*
 * The agent's LIST reply (caller clears it).  0 on failure, with the
 * reason raised ("agent not running at PATH", ...).
 */
int p11agent_agent_list(struct p11agent_prov *p, struct p11a_msg *reply);

/*
 * Signs with the agent; *sig is malloc'd (caller frees).  0 on failure,
 * with the agent's reason raised (locked token, no such key, ...).
 */
int p11agent_agent_sign(struct p11agent_prov *p, const struct p11a_sign *req,
			uint8_t **sig, size_t *sig_len);

/*
 * The one key the agent lists under uri: LISTs into *reply (which the
 * caller clears, whatever the result) and points *key into it.  0 on
 * success; else a reason raised: P11AGENT_R_BAD_URI, P11AGENT_R_NO_SUCH_KEY,
 * P11AGENT_R_AMBIGUOUS_URI (several keys match: the error names a few), or
 * P11AGENT_R_AGENT_ERROR for any failure to LIST (the precise reason is the
 * one raised).
 */
int p11agent_agent_find_key(struct p11agent_prov *p, const char *uri,
			    struct p11a_msg *reply, const struct p11a_key **key);

/*
 * The SPKI of the one key the agent lists under uri (for a key reference
 * without one).  0 on failure (raised).
 */
int p11agent_agent_spki(struct p11agent_prov *p, const char *uri,
			uint8_t **spki, size_t *spki_len, char **key_uri);

/*
 * Raises P11AGENT_R_AMBIGUOUS_URI for uri, which matches n keys of l: names
 * the first of them (idx[0..nidx), as many as fit; their certificates' URIs
 * when certs is set) and says how to name one.  A TLS client must never
 * present an identity the user did not name, so every way into the
 * provider refuses such a URI rather than take the first match.
 */
void p11agent_raise_ambiguous(struct p11agent_prov *p, const char *uri,
			      const struct p11a_list_reply *l, const uint32_t *idx,
			      size_t nidx, size_t n, int certs);
/* How many matches an ambiguity error names (its nidx). */
#define P11AGENT_NAMED_MATCHES  3

/* ---------------------------------------------------------------- reply.c (pure) */

/* Key type name for OpenSSL ("RSA", "RSA-PSS", "EC", "ED25519"), or NULL. */
const char *p11agent_kt_name(int type);

/* What a URI's type= asks for. */
enum p11agent_uri_class {
	P11AGENT_URI_ANY = 0,           /* no type= */
	P11AGENT_URI_PRIVATE = 1,
	P11AGENT_URI_PUBLIC = 2,
	P11AGENT_URI_CERT = 3,
	P11AGENT_URI_OTHER = 4          /* secret-key, data, ...: nothing we have */
};
int p11agent_uri_class(const char *uri);

/*
 * Checks a SIGNATURE reply against what was asked: RSA exactly
 * expect_len bytes (the modulus size), ECDSA a DER SEQUENCE of two
 * INTEGERs of at most expect_len bytes in all, Ed25519 64 bytes; and
 * never more than sigsize.  0 or -P11A_E_MALFORMED / -P11A_E_TOO_LARGE.
 */
int p11agent_check_signature(int scheme, const uint8_t *sig, size_t sig_len,
			     size_t expect_len, size_t sigsize);

/* ---------------------------------------------------------------- dispatch tables */

extern const OSSL_DISPATCH p11agent_keymgmt_rsa_functions[];
extern const OSSL_DISPATCH p11agent_keymgmt_rsapss_functions[];
extern const OSSL_DISPATCH p11agent_keymgmt_ec_functions[];
extern const OSSL_DISPATCH p11agent_keymgmt_ed25519_functions[];
extern const OSSL_DISPATCH p11agent_signature_rsa_functions[];
extern const OSSL_DISPATCH p11agent_signature_ecdsa_functions[];
extern const OSSL_DISPATCH p11agent_signature_ed25519_functions[];
extern const OSSL_DISPATCH p11agent_store_functions[];
extern const OSSL_DISPATCH p11agent_decoder_pem_functions[];
extern const OSSL_DISPATCH p11agent_decoder_rsa_functions[];
extern const OSSL_DISPATCH p11agent_decoder_rsapss_functions[];
extern const OSSL_DISPATCH p11agent_decoder_ec_functions[];
extern const OSSL_DISPATCH p11agent_decoder_ed25519_functions[];

#endif
