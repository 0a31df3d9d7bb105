/*
 * Signature encodings shared by the agent's token helper and (later) the
 * PKCS#11 front-end module.  Pure functions over byte arrays, OpenSSL only
 * for hashing.
 */
#ifndef P11A_SIGENC_H
#define P11A_SIGENC_H

#include <stddef.h>
#include <stdint.h>

#include <openssl/types.h>

/* Hashes data with hash (enum p11a_hash) into out (>= 64 bytes); *out_len set. */
int p11a_hash_data(int hash, const uint8_t *data, size_t len, uint8_t *out, size_t *out_len);

/* OpenSSL's digest for a P11A_HASH_* value, or NULL. */
const EVP_MD *p11a_hash_md(int hash);

/*
 * RSASSA-PKCS1-v1_5 DigestInfo: DER prefix for hash then the digest.
 * out must hold 19 + 64 bytes; digest_len must equal the hash length
 * (-P11A_E_BAD_REQUEST otherwise).
 */
int p11a_digestinfo(int hash, const uint8_t *digest, size_t digest_len,
		    uint8_t *out, size_t out_size, size_t *out_len);

/*
 * EMSA-PSS-ENCODE (RFC 8017 9.1.1) of an mHash for a modulus of mod_bits
 * bits, written as a k-byte block (k = ceil(mod_bits/8)) ready for raw RSA
 * (CKM_RSA_X_509).  salt_len may be P11A_PSS_SALT_DIGEST or
 * P11A_PSS_SALT_MAX.  mgf1_hash NONE means same as hash.  Salt from
 * RAND_bytes.  out_size must be >= k.
 */
int p11a_pss_encode(int hash, int mgf1_hash, uint32_t salt_len,
		    const uint8_t *mhash, size_t mhash_len, unsigned mod_bits,
		    uint8_t *out, size_t out_size, size_t *out_len);

/*
 * Resolves a PSS salt length special for a given hash and modulus; returns
 * the byte count or a negative error if it cannot fit.
 */
long p11a_pss_salt_len(int hash, uint32_t salt_len, unsigned mod_bits);

/* ECDSA r||s (each half raw_len/2 bytes) <-> DER Ecdsa-Sig-Value. */
int p11a_ecdsa_raw_to_der(const uint8_t *raw, size_t raw_len,
			  uint8_t *out, size_t out_size, size_t *out_len);
/* field_len: bytes of each of r and s in the output (32, 48, 66). */
int p11a_ecdsa_der_to_raw(const uint8_t *der, size_t der_len, size_t field_len,
			  uint8_t *out, size_t out_size, size_t *out_len);

#endif
