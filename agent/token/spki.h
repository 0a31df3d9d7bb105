/*
 * SubjectPublicKeyInfo (DER) from the attribute values a token gives:
 * CKA_MODULUS and CKA_PUBLIC_EXPONENT of an RSA key, CKA_EC_PARAMS and
 * CKA_EC_POINT of an EC or Ed25519 key.  Pure code on OpenSSL: it calls
 * no PKCS#11 function and keeps no state, so tests link spki.c alone
 * (tests/unit/test_spki.c).
 */
#ifndef AGENT_TOKEN_SPKI_H
#define AGENT_TOKEN_SPKI_H

#include <stddef.h>
#include <stdint.h>
#include <openssl/types.h>

#define ED25519_BITS    255

/* A curve we know by its CKA_EC_PARAMS. */
struct tok_curve {
	const uint8_t *der;
	size_t der_len;
	int type;                       /* P11A_KEY_EC or P11A_KEY_ED25519 */
	const char *name;               /* wire name */
	const char *group;              /* OpenSSL group name (EC) */
	uint32_t bits;
	size_t field_len;               /* bytes of a coordinate / of the Ed25519 key */
};

/*
 * The curve whose CKA_EC_PARAMS are p[0..n) (a named-curve OID, or
 * SoftHSM2's PrintableString "edwards25519"), NULL when not supported.
 */
const struct tok_curve *tok_curve_by_params(const uint8_t *p, size_t n);

/* The curve of OpenSSL group name group ("prime256v1"), NULL when not supported. */
const struct tok_curve *tok_curve_by_group(const char *group);

/*
 * The raw point in CKA_EC_POINT p[0..n) of a key on curve c, DER OCTET
 * STRING wrapped or not: *pt points into p.  0, or -1 when p is no point
 * of c's size.
 */
int tok_ec_point_raw(const struct tok_curve *c, const uint8_t *p, size_t n, const uint8_t **pt,
		     size_t *pt_len);

/*
 * SPKI DER of pk (NULL allowed: error) into a new buffer *out (free()).
 * 0 or -1; *out is NULL after -1.
 */
int tok_spki_of(EVP_PKEY *pk, uint8_t **out, size_t *out_len);

/*
 * SPKI of the RSA key with big-endian modulus and exponent; as
 * tok_spki_of().  An empty or zero modulus or exponent is an error.
 */
int tok_spki_rsa(const uint8_t *mod, size_t mod_len, const uint8_t *exp, size_t exp_len,
		 uint8_t **out, size_t *out_len);

/* SPKI of the key with raw point pt (from tok_ec_point_raw) on curve c; as tok_spki_of(). */
int tok_spki_ec(const struct tok_curve *c, const uint8_t *pt, size_t pt_len, uint8_t **out,
		size_t *out_len);

/* Bit length of the big-endian unsigned integer p[0..n) (0 for zero). */
uint32_t tok_bits_of(const uint8_t *p, size_t n);

#endif
