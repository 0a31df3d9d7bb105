/*
 * The built provider module in a private library context, without an
 * agent: its decoders turn key-reference files (PEM and DER) into keys
 * and refuse broken ones with a clear error, decline everything else
 * (software keys still decode through the default provider), the store
 * takes only pkcs11: URIs, and signing without an agent fails with an
 * error that names the socket.
 */
#include "config.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include <openssl/core_names.h>
#include <openssl/decoder.h>
#include <openssl/encoder.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/provider.h>
#include <openssl/store.h>
#include <openssl/x509.h>

#include "p11a.h"
#include "keyref.h"

#ifndef P11AGENT_MODULE_DIR
#error P11AGENT_MODULE_DIR must name the directory holding p11agent.so
#endif

#define NO_AGENT "/nonexistent-p11agent-test/agent.sock"
#define KEY_URI "pkcs11:token=t;id=%01;object=k;type=private"

static OSSL_LIB_CTX *lc;
static OSSL_PROVIDER *prov_default, *prov_p11agent;

static int
setup(void **state)
{
	setenv("P11AGENT_SOCK", NO_AGENT, 1);
	if ((lc = OSSL_LIB_CTX_new()) == NULL ||
	    (prov_default = OSSL_PROVIDER_load(lc, "default")) == NULL ||
	    OSSL_PROVIDER_set_default_search_path(lc, P11AGENT_MODULE_DIR) != 1 ||
	    (prov_p11agent = OSSL_PROVIDER_load(lc, "p11agent")) == NULL) {
		ERR_print_errors_fp(stderr);
		return -1;
	}
	return 0;
}

static int
teardown(void **state)
{
	OSSL_PROVIDER_unload(prov_p11agent);
	OSSL_PROVIDER_unload(prov_default);
	OSSL_LIB_CTX_free(lc);
	return 0;
}

static EVP_PKEY *
gen_key(const char *alg, const char *curve)
{
	EVP_PKEY_CTX *c = EVP_PKEY_CTX_new_from_name(lc, alg, "provider=default");
	EVP_PKEY *k = NULL;

	assert_non_null(c);
	assert_int_equal(EVP_PKEY_keygen_init(c), 1);
	if (curve != NULL)
		assert_int_equal(EVP_PKEY_CTX_set_group_name(c, curve), 1);
	assert_int_equal(EVP_PKEY_generate(c, &k), 1);
	EVP_PKEY_CTX_free(c);
	return k;
}

/* DER key reference for key's public half under KEY_URI. */
static uint8_t *
make_ref(EVP_PKEY *key, size_t *len)
{
	unsigned char *spki = NULL;
	uint8_t *der;
	int n = i2d_PUBKEY(key, &spki);

	assert_true(n > 0);
	assert_int_equal(p11agent_keyref_encode(KEY_URI, spki, (size_t)n, &der, len), 0);
	OPENSSL_free(spki);
	return der;
}

static char *
to_pem(const char *label, const uint8_t *der, size_t len)
{
	BIO *b = BIO_new(BIO_s_mem());
	char *p, *out;
	long n;

	assert_non_null(b);
	assert_true(PEM_write_bio(b, label, "", der, (long)len) > 0);
	n = BIO_get_mem_data(b, &p);
	out = calloc(1, (size_t)n + 1);
	memcpy(out, p, (size_t)n);
	BIO_free(b);
	return out;
}

/* Decodes data as a private key ("PEM" or "DER", optional structure); NULL on failure. */
static EVP_PKEY *
decode(const char *type, const char *structure, const void *data, size_t len)
{
	OSSL_DECODER_CTX *d;
	EVP_PKEY *k = NULL;
	const unsigned char *p = data;
	size_t left = len;

	d = OSSL_DECODER_CTX_new_for_pkey(&k, type, structure, NULL, EVP_PKEY_KEYPAIR, lc, NULL);
	assert_non_null(d);
	(void)OSSL_DECODER_from_data(d, &p, &left);
	OSSL_DECODER_CTX_free(d);
	return k;
}

static const char *
provider_of(const EVP_PKEY *k)
{
	return OSSL_PROVIDER_get0_name(EVP_PKEY_get0_provider(k));
}

/* 1 if the error queue holds text. */
static int
errors_have(const char *text)
{
	unsigned long e;
	const char *data = NULL, *file, *func;
	char buf[512];
	int line, flags, found = 0;

	while ((e = ERR_get_error_all(&file, &line, &func, &data, &flags)) != 0) {
		ERR_error_string_n(e, buf, sizeof(buf));
		if (strstr(buf, text) != NULL || (data != NULL && strstr(data, text) != NULL))
			found = 1;
	}
	return found;
}

static void
test_keyref_pem_and_der(void **state)
{
	static const struct {
		const char *alg, *curve, *type;
		int bits;
	} kinds[] = {
		{ "EC", "P-256", "EC", 256 },
		{ "EC", "P-384", "EC", 384 },
		{ "RSA", NULL, "RSA", 2048 },
		{ "RSA-PSS", NULL, "RSA-PSS", 2048 },
		{ "ED25519", NULL, "ED25519", 256 },
	};
	size_t i, len;

	for (i = 0; i < sizeof(kinds) / sizeof(kinds[0]); i++) {
		EVP_PKEY *soft = gen_key(kinds[i].alg, kinds[i].curve), *k;
		uint8_t *der = make_ref(soft, &len);
		char *pem = to_pem(P11AGENT_KEYREF_PEM_LABEL, der, len);
		char group[64];
		size_t glen;

		/* PEM, as curl and python read key files */
		k = decode("PEM", NULL, pem, strlen(pem));
		assert_non_null(k);
		assert_string_equal(provider_of(k), "p11agent");
		assert_true(EVP_PKEY_is_a(k, kinds[i].type));
		assert_int_equal(EVP_PKEY_get_bits(k), kinds[i].bits);
		assert_true(EVP_PKEY_get_size(k) > 0);
		assert_true(EVP_PKEY_get_security_bits(k) > 0);
		if (kinds[i].curve != NULL) {
			assert_int_equal(EVP_PKEY_get_group_name(k, group, sizeof(group), &glen), 1);
		}
		/* the certificate's key matches (X509_check_private_key does this) */
		assert_int_equal(EVP_PKEY_eq(soft, k), 1);
		assert_int_equal(EVP_PKEY_eq(k, soft), 1);
		EVP_PKEY_free(k);

		/* DER, with and without the structure name */
		k = decode("DER", P11AGENT_KEYREF_STRUCTURE, der, len);
		assert_non_null(k);
		assert_string_equal(provider_of(k), "p11agent");
		EVP_PKEY_free(k);
		k = decode(NULL, NULL, der, len);
		assert_non_null(k);
		assert_string_equal(provider_of(k), "p11agent");
		EVP_PKEY_free(k);

		free(pem);
		free(der);
		EVP_PKEY_free(soft);
	}
	ERR_clear_error();
}

static void
test_other_key_does_not_match(void **state)
{
	EVP_PKEY *a = gen_key("EC", "P-256"), *b = gen_key("EC", "P-256"), *k;
	size_t len;
	uint8_t *der = make_ref(a, &len);

	k = decode("DER", NULL, der, len);
	assert_non_null(k);
	assert_int_not_equal(EVP_PKEY_eq(b, k), 1);
	assert_int_equal(EVP_PKEY_eq(a, k), 1);
	EVP_PKEY_free(k);
	free(der);
	EVP_PKEY_free(a);
	EVP_PKEY_free(b);
	ERR_clear_error();
}

static void
test_sign_without_agent(void **state)
{
	EVP_PKEY *soft = gen_key("EC", "P-256"), *k;
	EVP_MD_CTX *md = EVP_MD_CTX_new();
	unsigned char sig[256];
	size_t len, siglen = sizeof(sig);
	uint8_t *der = make_ref(soft, &len);

	k = decode("DER", NULL, der, len);
	assert_non_null(k);
	ERR_clear_error();
	assert_int_equal(EVP_DigestSignInit_ex(md, NULL, "SHA256", lc, NULL, k, NULL), 1);
	assert_int_not_equal(EVP_DigestSign(md, sig, &siglen, (const unsigned char *)"hi", 2), 1);
	assert_true(errors_have("agent not running at " NO_AGENT));
	EVP_MD_CTX_free(md);
	EVP_PKEY_free(k);
	free(der);
	EVP_PKEY_free(soft);
}

static void
test_broken_keyref_pem(void **state)
{
	static const char garbage[] =
		"-----BEGIN " P11AGENT_KEYREF_PEM_LABEL "-----\n"
		"MAMCAQI=\n"    /* SEQUENCE { INTEGER 2 } */
		"-----END " P11AGENT_KEYREF_PEM_LABEL "-----\n";
	static const uint8_t v2[] = { 0x30, 0x0c, 0x02, 0x01, 0x02, 0x0c, 0x07,
				      'p', 'k', 'c', 's', '1', '1', ':' };
	EVP_PKEY *k;
	char *pem;

	ERR_clear_error();
	k = decode("PEM", NULL, garbage, sizeof(garbage) - 1);
	assert_null(k);
	assert_true(errors_have("not a valid key reference"));

	pem = to_pem(P11AGENT_KEYREF_PEM_LABEL, v2, sizeof(v2));
	k = decode("PEM", NULL, pem, strlen(pem));
	assert_null(k);
	assert_true(errors_have("not supported"));
	free(pem);
}

static void
test_software_keys_unaffected(void **state)
{
	static const char *algs[][2] = { { "EC", "P-256" }, { "RSA", NULL }, { "ED25519", NULL } };
	size_t i;

	for (i = 0; i < sizeof(algs) / sizeof(algs[0]); i++) {
		EVP_PKEY *soft = gen_key(algs[i][0], algs[i][1]), *k;
		OSSL_ENCODER_CTX *e;
		unsigned char *out = NULL;
		size_t outlen = 0;

		/* PEM PKCS#8 */
		e = OSSL_ENCODER_CTX_new_for_pkey(soft, EVP_PKEY_KEYPAIR, "PEM", NULL, NULL);
		assert_non_null(e);
		assert_int_equal(OSSL_ENCODER_to_data(e, &out, &outlen), 1);
		OSSL_ENCODER_CTX_free(e);
		k = decode("PEM", NULL, out, outlen);
		assert_non_null(k);
		assert_string_equal(provider_of(k), "default");
		assert_int_equal(EVP_PKEY_eq(soft, k), 1);
		EVP_PKEY_free(k);
		OPENSSL_free(out);
		/* DER */
		out = NULL;
		e = OSSL_ENCODER_CTX_new_for_pkey(soft, EVP_PKEY_KEYPAIR, "DER", NULL, NULL);
		assert_non_null(e);
		assert_int_equal(OSSL_ENCODER_to_data(e, &out, &outlen), 1);
		OSSL_ENCODER_CTX_free(e);
		k = decode("DER", NULL, out, outlen);
		assert_non_null(k);
		assert_string_equal(provider_of(k), "default");
		EVP_PKEY_free(k);
		OPENSSL_free(out);
		EVP_PKEY_free(soft);
	}
	/* a PEM block of another kind is not ours */
	{
		static const uint8_t junk[] = { 0x30, 0x03, 0x02, 0x01, 0x01 };
		char *pem = to_pem("SOMETHING ELSE", junk, sizeof(junk));

		assert_null(decode("PEM", NULL, pem, strlen(pem)));
		free(pem);
	}
	ERR_clear_error();
}

/* Prefixes and byte changes of a key reference, as PEM and as DER: no crash. */
static void
test_mutations(void **state)
{
	EVP_PKEY *soft = gen_key("EC", "P-256"), *k;
	size_t len, i;
	uint8_t *der = make_ref(soft, &len), *copy;
	char *pem = to_pem(P11AGENT_KEYREF_PEM_LABEL, der, len);
	size_t plen = strlen(pem);

	for (i = 0; i < len; i += 3) {
		copy = malloc(len);
		memcpy(copy, der, len);
		k = decode("DER", NULL, copy, i);
		assert_null(k);
		copy[i] ^= 0x41;
		k = decode("DER", NULL, copy, len);
		EVP_PKEY_free(k);       /* may still be a key: a changed byte in the URI */
		free(copy);
	}
	for (i = 0; i < plen; i += 7) {
		char *c = malloc(plen);

		memcpy(c, pem, plen);
		k = decode("PEM", NULL, c, i);
		assert_null(k);
		c[i] = c[i] == 'A' ? 'B' : 'A';
		k = decode("PEM", NULL, c, plen);
		EVP_PKEY_free(k);
		free(c);
	}
	ERR_clear_error();
	free(pem);
	free(der);
	EVP_PKEY_free(soft);
}

static void
test_store(void **state)
{
	OSSL_STORE_CTX *s;

	/* not a pkcs11: URI: our loader is not even asked */
	ERR_clear_error();
	s = OSSL_STORE_open_ex("pkcs11:object=%ZZ", lc, NULL, NULL, NULL, NULL, NULL, NULL);
	assert_null(s);
	assert_true(errors_have("not a valid pkcs11: URI"));

	s = OSSL_STORE_open_ex("pkcs11:object=k", lc, NULL, NULL, NULL, NULL, NULL, NULL);
	assert_non_null(s);
	assert_null(OSSL_STORE_load(s));
	assert_true(errors_have("agent not running at " NO_AGENT));
	OSSL_STORE_close(s);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_keyref_pem_and_der),
		cmocka_unit_test(test_other_key_does_not_match),
		cmocka_unit_test(test_sign_without_agent),
		cmocka_unit_test(test_broken_keyref_pem),
		cmocka_unit_test(test_software_keys_unaffected),
		cmocka_unit_test(test_mutations),
		cmocka_unit_test(test_store),
	};

	return cmocka_run_group_tests(tests, setup, teardown);
}
