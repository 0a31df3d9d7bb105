/*
 * Unit tests for common/hashalg.c: one row per hash, every vocabulary
 * agreeing with the others and with OpenSSL.
 */
#include "config.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include <openssl/evp.h>

#include "p11a.h"
#include "hashalg.h"
#include "sigenc.h"

static const struct {
	int id;
	CK_MECHANISM_TYPE ckm;
	CK_RSA_PKCS_MGF_TYPE mgf;
	size_t len;
	const char *names[4];
} want[] = {
	{ P11A_HASH_SHA1, CKM_SHA_1, CKG_MGF1_SHA1, 20,
	  { "sha1", "SHA1", "SHA-1", "1.3.14.3.2.26" } },
	{ P11A_HASH_SHA224, CKM_SHA224, CKG_MGF1_SHA224, 28,
	  { "sha224", "SHA2-224", "SHA-224", "2.16.840.1.101.3.4.2.4" } },
	{ P11A_HASH_SHA256, CKM_SHA256, CKG_MGF1_SHA256, 32,
	  { "sha256", "SHA2-256", "sha-256", "2.16.840.1.101.3.4.2.1" } },
	{ P11A_HASH_SHA384, CKM_SHA384, CKG_MGF1_SHA384, 48,
	  { "SHA384", "sha2-384", "SHA-384", "2.16.840.1.101.3.4.2.2" } },
	{ P11A_HASH_SHA512, CKM_SHA512, CKG_MGF1_SHA512, 64,
	  { "sha512", "SHA2-512", "SHA-512", "2.16.840.1.101.3.4.2.3" } },
};
#define NWANT (sizeof(want) / sizeof(want[0]))

static void
test_rows(void **state)
{
	size_t i, j;

	(void)state;
	for (i = 0; i < NWANT; i++) {
		const struct p11a_hashalg *a = p11a_hashalg_by_id(want[i].id);
		EVP_MD *fetched;

		assert_non_null(a);
		assert_int_equal(a->id, want[i].id);
		assert_ptr_equal(p11a_hashalg_by_ckm(want[i].ckm), a);
		assert_ptr_equal(p11a_hashalg_by_mgf(want[i].mgf), a);
		assert_ptr_equal(p11a_hashalg_by_len(want[i].len), a);
		for (j = 0; j < 4; j++)
			assert_ptr_equal(p11a_hashalg_by_name(want[i].names[j]), a);
		assert_int_equal(p11a_hash_from_ckm(want[i].ckm), want[i].id);
		assert_int_equal(p11a_hash_from_mgf(want[i].mgf), want[i].id);
		assert_int_equal(p11a_hash_from_len(want[i].len), want[i].id);
		/* The protocol's own name and length (p11a.c) and digest (sigenc.c) agree. */
		assert_string_equal(a->name, p11a_hash_name(a->id));
		assert_int_equal(a->len, p11a_hash_len(a->id));
		assert_ptr_equal(a->md(), p11a_hash_md(a->id));
		assert_int_equal((size_t)EVP_MD_get_size(a->md()), a->len);
		fetched = EVP_MD_fetch(NULL, a->ossl_name, NULL);
		assert_non_null(fetched);
		assert_int_equal((size_t)EVP_MD_get_size(fetched), a->len);
		assert_true(EVP_MD_is_a(fetched, a->name));
		EVP_MD_free(fetched);
	}
}

/* One miss value everywhere: NULL, or -1 from the id shorthands. */
static void
test_misses(void **state)
{
	(void)state;
	assert_null(p11a_hashalg_by_id(P11A_HASH_NONE));
	assert_null(p11a_hashalg_by_id(6));
	assert_null(p11a_hashalg_by_id(-1));
	assert_null(p11a_hashalg_by_ckm(CKM_MD5));
	assert_null(p11a_hashalg_by_ckm(CKM_SHA256_RSA_PKCS));
	assert_null(p11a_hashalg_by_mgf(0));
	assert_null(p11a_hashalg_by_len(0));
	assert_null(p11a_hashalg_by_len(33));
	assert_null(p11a_hashalg_by_name(NULL));
	assert_null(p11a_hashalg_by_name(""));
	assert_null(p11a_hashalg_by_name("none"));
	assert_null(p11a_hashalg_by_name("MD5"));
	assert_null(p11a_hashalg_by_name("SHA3-256"));
	assert_null(p11a_hashalg_by_name("SHA2-256 "));
	assert_int_equal(p11a_hash_from_ckm(CKM_MD5), -1);
	assert_int_equal(p11a_hash_from_mgf(0), -1);
	assert_int_equal(p11a_hash_from_len(33), -1);
	assert_int_equal(p11a_hash_from_len(0), -1);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_rows),
		cmocka_unit_test(test_misses),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
