/*
 * Signing input as a client gathers it for one SIGN: the message is kept
 * whole up to P11A_SIGN_MSG_MAX bytes, so that the agent hashes it and
 * sees what it signs; past that it is hashed here and SIGN carries the
 * digest.  The provider's digest-sign, the PKCS#11 module's
 * C_SignUpdate/C_SignFinal and `p11agent sign` all gather input this way.
 *
 * Every buffer that held input is wiped before it is freed (the message
 * may be secret).  Not thread-safe: one sigin per operation.
 */
#ifndef P11A_SIGIN_H
#define P11A_SIGIN_H

#include <stddef.h>
#include <stdint.h>

#include <openssl/evp.h>

struct p11a_sigin {
	/* private: use the functions below */
	int hash;                       /* enum p11a_hash for input past the cap; NONE: refuse it */
	OSSL_LIB_CTX *libctx;           /* where the digest is fetched; NULL: OpenSSL's default */
	uint8_t *buf;                   /* the message so far, while it fits */
	size_t len, cap;
	EVP_MD_CTX *md;                 /* hashing here, once past the cap */
	int final;                      /* p11a_sigin_final() was called */
	int err;                        /* the first error, kept: negative P11A_E_* */
	uint8_t digest[EVP_MAX_MD_SIZE];
	size_t digest_len;
};

/*
 * Starts gathering.  hash (enum p11a_hash) hashes input past the cap;
 * P11A_HASH_NONE when the input must not be hashed here (Ed25519 signs
 * the message itself; a caller-made digest or DigestInfo is not a
 * message), so that longer input is refused.  libctx is kept (not
 * owned) for fetching the digest.
 */
void p11a_sigin_init(struct p11a_sigin *in, int hash, OSSL_LIB_CTX *libctx);

/*
 * Appends n bytes (data may be NULL when n is 0).  Errors, after which the
 * sigin is unusable until p11a_sigin_reset(): -P11A_E_TOO_LARGE (past the
 * cap without a hash), -P11A_E_NOMEM, -P11A_E_CRYPTO (the digest could not
 * be fetched or run), -P11A_E_PROTOCOL (after p11a_sigin_final()).
 */
int p11a_sigin_update(struct p11a_sigin *in, const void *data, size_t n);

/*
 * Ends the input.  *data and *len: the whole message (*hashed 0; never a
 * NULL pointer, even for an empty message) or its digest with the init
 * hash (*hashed 1).  They point into in and stay valid until the next
 * reset or clear; calling final again gives the same answer.  Errors:
 * -P11A_E_CRYPTO; an earlier update error again.
 */
int p11a_sigin_final(struct p11a_sigin *in, const uint8_t **data, size_t *len, int *hashed);

/* 1 once any input was given (or an update failed), 0 otherwise. */
int p11a_sigin_started(const struct p11a_sigin *in);

/* Drops (and wipes) the input; keeps hash and libctx. */
void p11a_sigin_reset(struct p11a_sigin *in);

/* Makes dst (uninitialised) an independent copy of src.  -P11A_E_NOMEM, -P11A_E_CRYPTO. */
int p11a_sigin_copy(struct p11a_sigin *dst, const struct p11a_sigin *src);

/* Wipes and frees everything; in may then be initialised again. */
void p11a_sigin_clear(struct p11a_sigin *in);

#endif
