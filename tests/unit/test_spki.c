/*
 * Unit tests for agent/token/spki.c: SubjectPublicKeyInfo built from the
 * attribute values a token gives (CKA_MODULUS/CKA_PUBLIC_EXPONENT,
 * CKA_EC_PARAMS/CKA_EC_POINT), checked against keys OpenSSL generates
 * here.  No token, no PKCS#11.
 */
#include "config.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include <openssl/asn1.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/objects.h>
#include <openssl/x509.h>

#include "p11a.h"
#include "spki.h"

/* ------------------------------------------------------------ helpers */

/* DER of the SPKI OpenSSL itself writes for pk. */
static uint8_t *
ref_spki(EVP_PKEY *pk, size_t *len)
{
	unsigned char *der = NULL;
	int n = i2d_PUBKEY(pk, &der);

	assert_true(n > 0);
	*len = (size_t)n;
	return der;
}

/*
 * spki must be a DER SPKI that parses back, completely, to the public
 * half of ref, and be the bytes OpenSSL writes for ref.
 */
static void
check_spki(const uint8_t *spki, size_t spki_len, EVP_PKEY *ref)
{
	const unsigned char *p = spki;
	EVP_PKEY *got = d2i_PUBKEY(NULL, &p, (long)spki_len);
	uint8_t *want;
	size_t want_len;

	assert_non_null(got);
	assert_ptr_equal(p, spki + spki_len);
	assert_int_equal(EVP_PKEY_eq(got, ref), 1);
	want = ref_spki(ref, &want_len);
	assert_int_equal(spki_len, want_len);
	assert_memory_equal(spki, want, want_len);
	OPENSSL_free(want);
	EVP_PKEY_free(got);
}

/* CKA_EC_PARAMS of a named curve: the DER OBJECT IDENTIFIER. */
static size_t
curve_oid(int nid, uint8_t *out, size_t size)
{
	unsigned char *p = out;
	int n = i2d_ASN1_OBJECT(OBJ_nid2obj(nid), NULL);

	assert_true(n > 0 && (size_t)n <= size);
	assert_int_equal(i2d_ASN1_OBJECT(OBJ_nid2obj(nid), &p), n);
	return (size_t)n;
}

/* CKA_EC_POINT as the standard has it: the point in a DER OCTET STRING. */
static size_t
octet_wrap(const uint8_t *pt, size_t pt_len, uint8_t *out, size_t size)
{
	ASN1_OCTET_STRING *os = ASN1_OCTET_STRING_new();
	unsigned char *p = out;
	int n;

	assert_non_null(os);
	assert_int_equal(ASN1_OCTET_STRING_set(os, pt, (int)pt_len), 1);
	n = i2d_ASN1_OCTET_STRING(os, NULL);
	assert_true(n > 0 && (size_t)n <= size);
	assert_int_equal(i2d_ASN1_OCTET_STRING(os, &p), n);
	ASN1_OCTET_STRING_free(os);
	return (size_t)n;
}

/* The public point of an EC key, uncompressed or compressed. */
static size_t
ec_point_of(EVP_PKEY *pk, int compressed, uint8_t *out, size_t size)
{
	EVP_PKEY *dup = EVP_PKEY_dup(pk);
	size_t n = 0;

	assert_non_null(dup);
	assert_int_equal(EVP_PKEY_set_utf8_string_param(dup, OSSL_PKEY_PARAM_EC_POINT_CONVERSION_FORMAT,
							 compressed ? "compressed" : "uncompressed"), 1);
	assert_int_equal(EVP_PKEY_get_octet_string_param(dup, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY,
							 out, size, &n), 1);
	EVP_PKEY_free(dup);
	return n;
}

/* The SPKI for key attributes as obj_read_key() builds it: params, point. */
static int
spki_from_ec_attrs(const uint8_t *params, size_t params_len, const uint8_t *point, size_t point_len,
		   const struct tok_curve **cp, uint8_t **out, size_t *out_len)
{
	const struct tok_curve *c = tok_curve_by_params(params, params_len);
	const uint8_t *pt;
	size_t pt_len;

	*out = NULL;
	*out_len = 0;
	if (cp != NULL)
		*cp = c;
	if (c == NULL)
		return -2;
	if (tok_ec_point_raw(c, point, point_len, &pt, &pt_len) != 0)
		return -3;
	return tok_spki_ec(c, pt, pt_len, out, out_len);
}

/* ------------------------------------------------------------ RSA */

static void
rsa_case(unsigned bits)
{
	EVP_PKEY *pk = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)bits);
	BIGNUM *n = NULL, *e = NULL;
	uint8_t mod[1 + 4096 / 8], exp[8], *spki;
	size_t mod_len, exp_len, spki_len;

	assert_non_null(pk);
	assert_int_equal(EVP_PKEY_get_bn_param(pk, OSSL_PKEY_PARAM_RSA_N, &n), 1);
	assert_int_equal(EVP_PKEY_get_bn_param(pk, OSSL_PKEY_PARAM_RSA_E, &e), 1);
	/* CKA_MODULUS and CKA_PUBLIC_EXPONENT: big-endian, no sign byte. */
	mod_len = (size_t)BN_num_bytes(n);
	exp_len = (size_t)BN_num_bytes(e);
	assert_true(mod_len + 1 <= sizeof(mod) && exp_len <= sizeof(exp));
	BN_bn2bin(n, mod + 1);
	BN_bn2bin(e, exp);

	assert_int_equal(tok_bits_of(mod + 1, mod_len), bits);
	assert_int_equal(tok_spki_rsa(mod + 1, mod_len, exp, exp_len, &spki, &spki_len), 0);
	check_spki(spki, spki_len, pk);
	free(spki);

	/* Some tokens keep a leading zero byte: same key, same size. */
	mod[0] = 0;
	assert_int_equal(tok_bits_of(mod, mod_len + 1), bits);
	assert_int_equal(tok_spki_rsa(mod, mod_len + 1, exp, exp_len, &spki, &spki_len), 0);
	check_spki(spki, spki_len, pk);
	free(spki);

	BN_free(n);
	BN_free(e);
	EVP_PKEY_free(pk);
}

static void
test_rsa(void **state)
{
	rsa_case(2048);
	rsa_case(3072);
}

static void
test_bits_of(void **state)
{
	static const uint8_t zero[4] = { 0 };
	static const uint8_t v1[] = { 0x01 };
	static const uint8_t v255[] = { 0x00, 0xff };
	static const uint8_t v256[] = { 0x00, 0x01, 0x00 };

	assert_int_equal(tok_bits_of(zero, 0), 0);
	assert_int_equal(tok_bits_of(zero, sizeof(zero)), 0);
	assert_int_equal(tok_bits_of(v1, sizeof(v1)), 1);
	assert_int_equal(tok_bits_of(v255, sizeof(v255)), 8);
	assert_int_equal(tok_bits_of(v256, sizeof(v256)), 9);
}

/* ------------------------------------------------------------ EC */

static void
ec_case(const char *curve, int nid, const char *wire, const char *group, uint32_t bits)
{
	EVP_PKEY *pk = EVP_PKEY_Q_keygen(NULL, NULL, "EC", curve);
	const struct tok_curve *c = NULL;
	uint8_t params[16], pt[1 + 2 * 66], wrapped[4 + sizeof(pt)], *spki;
	size_t params_len, pt_len, wrapped_len, spki_len;

	assert_non_null(pk);
	params_len = curve_oid(nid, params, sizeof(params));

	for (int compressed = 0; compressed < 2; compressed++) {
		pt_len = ec_point_of(pk, compressed, pt, sizeof(pt));
		/* The standard's CKA_EC_POINT: a DER OCTET STRING. */
		wrapped_len = octet_wrap(pt, pt_len, wrapped, sizeof(wrapped));
		assert_int_equal(spki_from_ec_attrs(params, params_len, wrapped, wrapped_len, &c, &spki,
						    &spki_len), 0);
		assert_non_null(c);
		assert_int_equal(c->type, P11A_KEY_EC);
		assert_string_equal(c->name, wire);
		assert_string_equal(c->group, group);
		assert_int_equal(c->bits, bits);
		check_spki(spki, spki_len, pk);
		free(spki);
		/* Some modules store the raw point. */
		assert_int_equal(spki_from_ec_attrs(params, params_len, pt, pt_len, NULL, &spki,
						    &spki_len), 0);
		check_spki(spki, spki_len, pk);
		free(spki);
	}
	/* A certificate's key names its curve by OpenSSL group. */
	assert_ptr_equal(tok_curve_by_group(group), c);
	EVP_PKEY_free(pk);
}

static void
test_ec(void **state)
{
	ec_case("P-256", NID_X9_62_prime256v1, "P-256", "prime256v1", 256);
	ec_case("P-384", NID_secp384r1, "P-384", "secp384r1", 384);
	ec_case("P-521", NID_secp521r1, "P-521", "secp521r1", 521);
}

/* ------------------------------------------------------------ Ed25519 */

static void
test_ed25519(void **state)
{
	/* RFC 8410's OID, GnuPG's older OID, and SoftHSM2's PrintableString. */
	static const uint8_t p_rfc8410[] = { 0x06, 0x03, 0x2b, 0x65, 0x70 };
	static const uint8_t p_gnu[] = { 0x06, 0x09, 0x2b, 0x06, 0x01, 0x04, 0x01, 0xda, 0x47, 0x0f, 0x01 };
	static const uint8_t p_str[] = { 0x13, 0x0c, 'e', 'd', 'w', 'a', 'r', 'd', 's', '2', '5', '5', '1', '9' };
	const struct { const uint8_t *p; size_t n; } params[] = {
		{ p_rfc8410, sizeof(p_rfc8410) }, { p_gnu, sizeof(p_gnu) }, { p_str, sizeof(p_str) },
	};
	EVP_PKEY *pk = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
	const struct tok_curve *c;
	uint8_t pt[32], wrapped[2 + 32], *spki;
	size_t pt_len = sizeof(pt), wrapped_len, spki_len;

	if (pk == NULL)
		skip();         /* an OpenSSL without Ed25519 */
	assert_int_equal(EVP_PKEY_get_raw_public_key(pk, pt, &pt_len), 1);
	assert_int_equal(pt_len, 32);
	wrapped_len = octet_wrap(pt, pt_len, wrapped, sizeof(wrapped));
	assert_int_equal(wrapped_len, 34);
	for (size_t i = 0; i < sizeof(params) / sizeof(params[0]); i++) {
		assert_int_equal(spki_from_ec_attrs(params[i].p, params[i].n, wrapped, wrapped_len, &c,
						    &spki, &spki_len), 0);
		assert_int_equal(c->type, P11A_KEY_ED25519);
		assert_string_equal(c->name, "Ed25519");
		assert_int_equal(c->bits, ED25519_BITS);
		check_spki(spki, spki_len, pk);
		free(spki);
		assert_int_equal(spki_from_ec_attrs(params[i].p, params[i].n, pt, pt_len, NULL, &spki,
						    &spki_len), 0);
		check_spki(spki, spki_len, pk);
		free(spki);
	}
	EVP_PKEY_free(pk);
}

/* ------------------------------------------------------------ malformed input */

static void
test_malformed_rsa(void **state)
{
	static const uint8_t mod[] = { 0xc5, 0x01, 0x02, 0x03 };
	static const uint8_t exp[] = { 0x01, 0x00, 0x01 };
	static const uint8_t zero[] = { 0x00, 0x00 };
	uint8_t *spki = (uint8_t *)"x";
	size_t spki_len = 1;

	/* A zero-length (or zero) modulus or exponent is no key. */
	assert_int_equal(tok_spki_rsa(mod, 0, exp, sizeof(exp), &spki, &spki_len), -1);
	assert_null(spki);
	assert_int_equal(spki_len, 0);
	assert_int_equal(tok_spki_rsa(zero, sizeof(zero), exp, sizeof(exp), &spki, &spki_len), -1);
	assert_null(spki);
	assert_int_equal(tok_spki_rsa(mod, sizeof(mod), exp, 0, &spki, &spki_len), -1);
	assert_null(spki);
	/* No key at all. */
	assert_int_equal(tok_spki_of(NULL, &spki, &spki_len), -1);
	assert_null(spki);
	assert_int_equal(spki_len, 0);
}

static void
test_malformed_ec(void **state)
{
	/* secp256k1 and brainpoolP256r1: well-formed OIDs of curves we do not take. */
	static const uint8_t k1[] = { 0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x0a };
	static const uint8_t bp256[] = { 0x06, 0x09, 0x2b, 0x24, 0x03, 0x03, 0x02, 0x08, 0x01, 0x01, 0x07 };
	EVP_PKEY *pk = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
	EVP_PKEY *pk384 = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-384");
	const struct tok_curve *c256, *c384;
	uint8_t p256[16], p384[16], pt[1 + 2 * 48], pt384[1 + 2 * 48], wrapped[4 + sizeof(pt)];
	uint8_t bad[sizeof(wrapped)], *spki;
	size_t p256_len, p384_len, pt_len, pt384_len, wrapped_len, spki_len;
	const uint8_t *raw;
	size_t raw_len;

	assert_non_null(pk);
	assert_non_null(pk384);
	p256_len = curve_oid(NID_X9_62_prime256v1, p256, sizeof(p256));
	p384_len = curve_oid(NID_secp384r1, p384, sizeof(p384));
	pt_len = ec_point_of(pk, 0, pt, sizeof(pt));
	pt384_len = ec_point_of(pk384, 0, pt384, sizeof(pt384));
	wrapped_len = octet_wrap(pt, pt_len, wrapped, sizeof(wrapped));
	c256 = tok_curve_by_params(p256, p256_len);
	c384 = tok_curve_by_params(p384, p384_len);
	assert_non_null(c256);
	assert_non_null(c384);

	/* Wrong curve OID: an unknown curve, a cut or lengthened OID, no OID. */
	assert_null(tok_curve_by_params(k1, sizeof(k1)));
	assert_null(tok_curve_by_params(bp256, sizeof(bp256)));
	assert_null(tok_curve_by_params(p256, p256_len - 1));
	memcpy(bad, p256, p256_len);
	bad[p256_len] = 0x01;
	assert_null(tok_curve_by_params(bad, p256_len + 1));
	assert_null(tok_curve_by_params(p256, 0));
	assert_null(tok_curve_by_group("secp256k1"));
	assert_int_equal(spki_from_ec_attrs(k1, sizeof(k1), wrapped, wrapped_len, NULL, &spki, &spki_len),
			 -2);

	/* Truncated points: the OCTET STRING cut short, the raw point one byte short. */
	assert_int_not_equal(tok_ec_point_raw(c256, wrapped, wrapped_len - 1, &raw, &raw_len), 0);
	assert_int_not_equal(tok_ec_point_raw(c256, wrapped, 2, &raw, &raw_len), 0);
	assert_int_not_equal(tok_ec_point_raw(c256, wrapped, 1, &raw, &raw_len), 0);
	assert_int_not_equal(tok_ec_point_raw(c256, wrapped, 0, &raw, &raw_len), 0);
	assert_int_not_equal(tok_ec_point_raw(c256, pt, pt_len - 1, &raw, &raw_len), 0);
	/* The OCTET STRING's length says more than is there, or less. */
	memcpy(bad, wrapped, wrapped_len);
	bad[1]++;
	assert_int_not_equal(tok_ec_point_raw(c256, bad, wrapped_len, &raw, &raw_len), 0);
	bad[1] -= 2;
	assert_int_not_equal(tok_ec_point_raw(c256, bad, wrapped_len, &raw, &raw_len), 0);
	/* Not an OCTET STRING, or not a point encoding inside. */
	memcpy(bad, wrapped, wrapped_len);
	bad[0] = 0x03;
	assert_int_not_equal(tok_ec_point_raw(c256, bad, wrapped_len, &raw, &raw_len), 0);
	memcpy(bad, wrapped, wrapped_len);
	bad[2] = 0x05;
	assert_int_not_equal(tok_ec_point_raw(c256, bad, wrapped_len, &raw, &raw_len), 0);

	/* A P-384 point under P-256 parameters, and the other way round. */
	assert_int_not_equal(tok_ec_point_raw(c256, pt384, pt384_len, &raw, &raw_len), 0);
	assert_int_not_equal(tok_ec_point_raw(c384, pt, pt_len, &raw, &raw_len), 0);
	assert_int_equal(spki_from_ec_attrs(p384, p384_len, wrapped, wrapped_len, NULL, &spki, &spki_len),
			 -3);

	/* The right size, but not on the curve: OpenSSL refuses it. */
	memcpy(bad, pt, pt_len);
	bad[pt_len - 1] ^= 0x01;
	assert_int_equal(tok_spki_ec(c256, bad, pt_len, &spki, &spki_len), -1);
	assert_null(spki);

	EVP_PKEY_free(pk);
	EVP_PKEY_free(pk384);
}

static void
test_malformed_ed25519(void **state)
{
	static const uint8_t p_ed[] = { 0x06, 0x03, 0x2b, 0x65, 0x70 };
	static const uint8_t key[33] = { 0x04, 0x1f };
	const struct tok_curve *c = tok_curve_by_params(p_ed, sizeof(p_ed));
	const uint8_t *raw;
	size_t raw_len;

	assert_non_null(c);
	/* 31 bytes raw, or an OCTET STRING of 31 bytes: not an Ed25519 key. */
	assert_int_not_equal(tok_ec_point_raw(c, key + 2, 31, &raw, &raw_len), 0);
	assert_int_not_equal(tok_ec_point_raw(c, key, 33, &raw, &raw_len), 0);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_rsa),
		cmocka_unit_test(test_bits_of),
		cmocka_unit_test(test_ec),
		cmocka_unit_test(test_ed25519),
		cmocka_unit_test(test_malformed_rsa),
		cmocka_unit_test(test_malformed_ec),
		cmocka_unit_test(test_malformed_ed25519),
	};

	return cmocka_run_group_tests_name("spki", tests, NULL, NULL);
}
