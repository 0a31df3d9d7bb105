/*
 * Unit tests for the front-end module's object attributes
 * (engine/pkcs11/attrs.c) and mechanism table (engine/pkcs11/mech.c),
 * on keys and certificates made here with OpenSSL.
 */
#include "config.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include <openssl/bn.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include "p11m.h"
#include "hashalg.h"

/* A key record as LIST would carry it: SPKI and a self-signed certificate. */
struct fixture {
	EVP_PKEY *pkey;
	X509 *cert;
	struct p11a_key k;
};

static void
make_key(struct fixture *f, const char *alg, const char *param, int type, unsigned bits,
	 const char *curve)
{
	X509_NAME *name;
	unsigned char *der = NULL;
	int len;

	memset(f, 0, sizeof(*f));
	if (strcmp(alg, "RSA") == 0)
		f->pkey = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)bits);
	else if (strcmp(alg, "EC") == 0)
		f->pkey = EVP_PKEY_Q_keygen(NULL, NULL, "EC", param);
	else
		f->pkey = EVP_PKEY_Q_keygen(NULL, NULL, alg);
	assert_non_null(f->pkey);

	len = i2d_PUBKEY(f->pkey, &der);
	assert_true(len > 0);
	f->k.spki = der;
	f->k.spki_len = (size_t)len;

	f->cert = X509_new();
	assert_non_null(f->cert);
	X509_set_version(f->cert, 2);
	ASN1_INTEGER_set(X509_get_serialNumber(f->cert), 0x1234);
	X509_gmtime_adj(X509_getm_notBefore(f->cert), 0);
	X509_gmtime_adj(X509_getm_notAfter(f->cert), 3600);
	name = X509_get_subject_name(f->cert);
	X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)"unit", -1, -1, 0);
	X509_set_issuer_name(f->cert, name);
	X509_set_pubkey(f->cert, f->pkey);
	assert_true(X509_sign(f->cert, f->pkey, type == P11A_KEY_ED25519 ? NULL : EVP_sha256()) > 0);
	der = NULL;
	len = i2d_X509(f->cert, &der);
	assert_true(len > 0);
	f->k.cert = der;
	f->k.cert_len = (size_t)len;

	f->k.uri = (char *)"pkcs11:token=t;object=k;type=private";
	f->k.label = (char *)"k";
	f->k.cert_label = (char *)"k-cert";
	f->k.id = (uint8_t *)"\x02";
	f->k.id_len = 1;
	f->k.type = (uint8_t)type;
	f->k.bits = bits;
	f->k.curve = (char *)curve;
	f->k.flags = P11A_KEY_PRIVATE_VISIBLE | P11A_KEY_HAS_CERT;
}

static void
free_key(struct fixture *f)
{
	OPENSSL_free(f->k.spki);
	OPENSSL_free(f->k.cert);
	X509_free(f->cert);
	EVP_PKEY_free(f->pkey);
}

static const struct p11m_attr *
need(const struct p11m_obj *o, CK_ATTRIBUTE_TYPE t)
{
	const struct p11m_attr *a = p11m_obj_attr(o, t);

	assert_non_null(a);
	return a;
}

static CK_ULONG
ulong_of(const struct p11m_obj *o, CK_ATTRIBUTE_TYPE t)
{
	const struct p11m_attr *a = need(o, t);
	CK_ULONG v;

	assert_int_equal(a->len, sizeof(v));
	memcpy(&v, a->val, sizeof(v));
	return v;
}

static int
bool_of(const struct p11m_obj *o, CK_ATTRIBUTE_TYPE t)
{
	const struct p11m_attr *a = need(o, t);

	assert_int_equal(a->len, 1);
	return a->val[0] == CK_TRUE;
}

static void
test_ec_objects(void **state)
{
	static const uint8_t p256_oid[] = { 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07 };
	struct fixture f;
	struct p11m_obj o;
	const struct p11m_attr *a;
	unsigned char *der = NULL;
	int len;

	make_key(&f, "EC", "P-256", P11A_KEY_EC, 256, "P-256");
	memset(&o, 0, sizeof(o));

	assert_int_equal(p11m_obj_build(&o, CKO_PRIVATE_KEY, &f.k), CKR_OK);
	assert_int_equal(ulong_of(&o, CKA_CLASS), CKO_PRIVATE_KEY);
	assert_int_equal(ulong_of(&o, CKA_KEY_TYPE), CKK_EC);
	assert_true(bool_of(&o, CKA_SIGN));
	assert_false(bool_of(&o, CKA_DECRYPT));
	assert_false(bool_of(&o, CKA_EXTRACTABLE));
	assert_true(bool_of(&o, CKA_SENSITIVE));
	assert_false(bool_of(&o, CKA_ALWAYS_AUTHENTICATE));
	assert_true(bool_of(&o, CKA_PRIVATE));
	a = need(&o, CKA_EC_PARAMS);
	assert_int_equal(a->len, sizeof(p256_oid));
	assert_memory_equal(a->val, p256_oid, sizeof(p256_oid));
	a = need(&o, CKA_EC_POINT);
	assert_int_equal(a->len, 2 + 65);            /* OCTET STRING of an uncompressed point */
	assert_int_equal(a->val[0], 0x04);
	assert_int_equal(a->val[1], 65);
	assert_int_equal(a->val[2], 0x04);
	a = need(&o, CKA_ID);
	assert_int_equal(a->len, 1);
	assert_int_equal(a->val[0], 0x02);
	a = need(&o, CKA_LABEL);
	assert_int_equal(a->len, 1);
	assert_null(p11m_obj_attr(&o, CKA_VALUE));
	assert_true(p11m_attr_is_sensitive(CKO_PRIVATE_KEY, CKA_VALUE));
	assert_false(p11m_attr_is_sensitive(CKO_CERTIFICATE, CKA_VALUE));
	assert_int_equal(o.sig_len, 64);
	assert_int_equal(o.field_len, 32);

	/* the certificate: value, subject, DER serial, its own label */
	assert_int_equal(p11m_obj_build(&o, CKO_CERTIFICATE, &f.k), CKR_OK);
	assert_int_equal(ulong_of(&o, CKA_CLASS), CKO_CERTIFICATE);
	assert_int_equal(ulong_of(&o, CKA_CERTIFICATE_TYPE), CKC_X_509);
	a = need(&o, CKA_VALUE);
	assert_int_equal(a->len, f.k.cert_len);
	assert_memory_equal(a->val, f.k.cert, f.k.cert_len);
	a = need(&o, CKA_SERIAL_NUMBER);
	assert_int_equal(a->len, 4);
	assert_memory_equal(a->val, "\x02\x02\x12\x34", 4);
	len = i2d_X509_NAME(X509_get_subject_name(f.cert), &der);
	a = need(&o, CKA_SUBJECT);
	assert_int_equal(a->len, (size_t)len);
	assert_memory_equal(a->val, der, (size_t)len);
	OPENSSL_free(der);
	a = need(&o, CKA_LABEL);
	assert_int_equal(a->len, strlen("k-cert"));
	assert_false(bool_of(&o, CKA_PRIVATE));

	/* a public key */
	assert_int_equal(p11m_obj_build(&o, CKO_PUBLIC_KEY, &f.k), CKR_OK);
	assert_true(bool_of(&o, CKA_VERIFY));
	a = need(&o, CKA_PUBLIC_KEY_INFO);
	assert_memory_equal(a->val, f.k.spki, f.k.spki_len);

	p11m_obj_attrs_free(&o);
	free_key(&f);
}

static void
test_rsa_objects(void **state)
{
	struct fixture f;
	struct p11m_obj o;
	const struct p11m_attr *a;
	BIGNUM *n = NULL;
	unsigned char buf[256];

	make_key(&f, "RSA", NULL, P11A_KEY_RSA, 2048, "");
	memset(&o, 0, sizeof(o));
	assert_int_equal(p11m_obj_build(&o, CKO_PRIVATE_KEY, &f.k), CKR_OK);
	assert_int_equal(ulong_of(&o, CKA_KEY_TYPE), CKK_RSA);
	assert_true(EVP_PKEY_get_bn_param(f.pkey, "n", &n));
	assert_int_equal(BN_bn2bin(n, buf), 256);
	a = need(&o, CKA_MODULUS);
	assert_int_equal(a->len, 256);
	assert_memory_equal(a->val, buf, 256);
	a = need(&o, CKA_PUBLIC_EXPONENT);
	assert_int_equal(a->len, 3);
	assert_memory_equal(a->val, "\x01\x00\x01", 3);
	assert_int_equal(o.sig_len, 256);
	assert_null(p11m_obj_attr(&o, CKA_EC_PARAMS));
	BN_free(n);
	p11m_obj_attrs_free(&o);
	free_key(&f);
}

static void
test_ed25519_objects(void **state)
{
	struct fixture f;
	struct p11m_obj o;
	const struct p11m_attr *a;

	make_key(&f, "ED25519", NULL, P11A_KEY_ED25519, 255, "Ed25519");
	memset(&o, 0, sizeof(o));
	assert_int_equal(p11m_obj_build(&o, CKO_PUBLIC_KEY, &f.k), CKR_OK);
	assert_int_equal(ulong_of(&o, CKA_KEY_TYPE), CKK_EC_EDWARDS);
	a = need(&o, CKA_EC_PARAMS);
	assert_int_equal(a->len, 5);
	assert_memory_equal(a->val, "\x06\x03\x2b\x65\x70", 5);
	a = need(&o, CKA_EC_POINT);
	assert_int_equal(a->len, 34);
	assert_int_equal(a->val[1], 32);
	assert_int_equal(o.sig_len, 64);
	p11m_obj_attrs_free(&o);
	free_key(&f);
}

static void
test_bad_records(void **state)
{
	struct fixture f;
	struct p11m_obj o;
	uint8_t junk[8] = { 0x30, 0x06, 1, 2, 3, 4, 5, 6 };

	make_key(&f, "EC", "P-384", P11A_KEY_EC, 384, "P-384");
	memset(&o, 0, sizeof(o));
	/* a garbled certificate leaves the object undescribed, not half built */
	{
		uint8_t *cert = f.k.cert;
		size_t cert_len = f.k.cert_len;

		f.k.cert = junk;
		f.k.cert_len = sizeof(junk);
		assert_int_equal(p11m_obj_build(&o, CKO_CERTIFICATE, &f.k), CKR_GENERAL_ERROR);
		assert_int_equal(o.nattrs, 0);
		f.k.cert = cert;
		f.k.cert_len = cert_len;
	}
	/* a key without SPKI cannot be a key object */
	{
		size_t spki_len = f.k.spki_len;

		f.k.spki_len = 0;
		assert_int_equal(p11m_obj_build(&o, CKO_PRIVATE_KEY, &f.k), CKR_GENERAL_ERROR);
		f.k.spki_len = spki_len;
	}
	/* unknown key type */
	f.k.type = 99;
	assert_int_equal(p11m_obj_build(&o, CKO_PUBLIC_KEY, &f.k), CKR_GENERAL_ERROR);
	p11m_obj_attrs_free(&o);
	free_key(&f);
}

static void
test_mechanisms(void **state)
{
	const struct p11m_mech *m;
	CK_MECHANISM_INFO info;
	size_t i;

	for (i = 0; i < p11m_nmechs; i++) {
		assert_ptr_equal(p11m_mech_find(p11m_mechs[i].type), &p11m_mechs[i]);
		p11m_mech_info(&p11m_mechs[i], &info);
		assert_true(info.flags & CKF_SIGN);
		assert_false(info.flags & (CKF_DECRYPT | CKF_ENCRYPT | CKF_UNWRAP));
	}
	assert_null(p11m_mech_find(CKM_RSA_X_509));
	assert_null(p11m_mech_find(CKM_RSA_PKCS_OAEP));
	m = p11m_mech_find(CKM_RSA_PKCS_PSS);
	assert_non_null(m);
	assert_int_equal(m->scheme, P11A_SCHEME_RSA_PSS);
	assert_int_equal(m->input, P11A_INPUT_DIGEST);
	assert_true(m->pss_params);
	m = p11m_mech_find(CKM_ECDSA_SHA384);
	assert_int_equal(m->hash, P11A_HASH_SHA384);
	assert_int_equal(m->input, P11A_INPUT_MESSAGE);
	m = p11m_mech_find(CKM_RSA_PKCS);
	assert_int_equal(m->input, P11A_INPUT_RAW);
	/* The module's hash lookups (common/hashalg.c). */
	assert_int_equal(p11a_hash_from_len(48), P11A_HASH_SHA384);
	assert_int_equal(p11a_hash_from_len(33), -1);
	assert_int_equal(p11a_hash_from_mgf(CKG_MGF1_SHA224), P11A_HASH_SHA224);
	assert_int_equal(p11a_hash_from_ckm(CKM_SHA512), P11A_HASH_SHA512);
	assert_int_equal(p11a_hash_from_ckm(CKM_MD5), -1);
	assert_int_equal(p11m_rv_from_err(-P11A_E_LOCKED), CKR_USER_NOT_LOGGED_IN);
	assert_int_equal(p11m_rv_from_err(-P11A_E_NOT_RUNNING), CKR_DEVICE_ERROR);
	assert_int_equal(p11m_rv_from_err(P11A_E_PIN_INCORRECT), CKR_PIN_INCORRECT);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_ec_objects),
		cmocka_unit_test(test_rsa_objects),
		cmocka_unit_test(test_ed25519_objects),
		cmocka_unit_test(test_bad_records),
		cmocka_unit_test(test_mechanisms),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
