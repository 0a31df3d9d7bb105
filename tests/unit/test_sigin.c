/*
 * Unit tests for common/sigin.c: the message whole up to
 * P11A_SIGN_MSG_MAX, its digest past it, however it is cut into updates.
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
#include <openssl/provider.h>

#include "p11a.h"
#include "sigin.h"

#define BIG (P11A_SIGN_MSG_MAX + 5000u)

static uint8_t *msg;            /* BIG bytes of a pattern */

static int
setup(void **state)
{
	size_t i;

	(void)state;
	if ((msg = malloc(BIG)) == NULL)
		return -1;
	for (i = 0; i < BIG; i++)
		msg[i] = (uint8_t)(i * 7 + i / 251);
	return 0;
}

static int
teardown(void **state)
{
	(void)state;
	free(msg);
	return 0;
}

/* Feeds msg[0..len) in pieces of step bytes (the last one shorter). */
static int
feed(struct p11a_sigin *in, size_t len, size_t step)
{
	size_t off, n;
	int r;

	for (off = 0; off < len; off += n) {
		n = len - off < step ? len - off : step;
		if ((r = p11a_sigin_update(in, msg + off, n)) != 0)
			return r;
	}
	return 0;
}

static void
check_digest(const EVP_MD *md, size_t len, const uint8_t *got, size_t got_len)
{
	uint8_t want[EVP_MAX_MD_SIZE];
	unsigned int want_len = 0;

	assert_int_equal(EVP_Digest(msg, len, want, &want_len, md, NULL), 1);
	assert_int_equal(got_len, want_len);
	assert_memory_equal(got, want, want_len);
}

static void
test_small_whole(void **state)
{
	struct p11a_sigin in;
	const uint8_t *data;
	size_t len;
	int hashed;

	(void)state;
	p11a_sigin_init(&in, P11A_HASH_SHA256, NULL);
	assert_false(p11a_sigin_started(&in));
	assert_int_equal(p11a_sigin_update(&in, NULL, 0), 0);
	assert_false(p11a_sigin_started(&in));
	assert_int_equal(feed(&in, 1000, 7), 0);
	assert_true(p11a_sigin_started(&in));
	assert_int_equal(p11a_sigin_final(&in, &data, &len, &hashed), 0);
	assert_int_equal(hashed, 0);
	assert_int_equal(len, 1000);
	assert_memory_equal(data, msg, 1000);
	/* final again: the same answer; more input: refused */
	assert_int_equal(p11a_sigin_final(&in, &data, &len, &hashed), 0);
	assert_int_equal(len, 1000);
	assert_int_equal(p11a_sigin_update(&in, msg, 1), -P11A_E_PROTOCOL);
	p11a_sigin_clear(&in);
}

static void
test_empty(void **state)
{
	struct p11a_sigin in;
	const uint8_t *data = NULL;
	size_t len = 1;
	int hashed = 1;

	(void)state;
	p11a_sigin_init(&in, P11A_HASH_NONE, NULL);
	assert_int_equal(p11a_sigin_final(&in, &data, &len, &hashed), 0);
	assert_non_null(data);
	assert_int_equal(len, 0);
	assert_int_equal(hashed, 0);
	p11a_sigin_clear(&in);
}

/* Exactly the cap is sent whole; one byte more is hashed, in any cut. */
static void
test_cap_boundary(void **state)
{
	static const size_t steps[] = { P11A_SIGN_MSG_MAX + 1, 65536, 4093, 1 };
	struct p11a_sigin in;
	const uint8_t *data;
	size_t len, i;
	int hashed;

	(void)state;
	for (i = 0; i < sizeof(steps) / sizeof(steps[0]); i++) {
		p11a_sigin_init(&in, P11A_HASH_SHA384, NULL);
		assert_int_equal(feed(&in, P11A_SIGN_MSG_MAX, steps[i]), 0);
		assert_int_equal(p11a_sigin_final(&in, &data, &len, &hashed), 0);
		assert_int_equal(hashed, 0);
		assert_int_equal(len, P11A_SIGN_MSG_MAX);
		assert_memory_equal(data, msg, len);
		p11a_sigin_clear(&in);

		p11a_sigin_init(&in, P11A_HASH_SHA384, NULL);
		assert_int_equal(feed(&in, P11A_SIGN_MSG_MAX + 1, steps[i]), 0);
		assert_int_equal(p11a_sigin_final(&in, &data, &len, &hashed), 0);
		assert_int_equal(hashed, 1);
		check_digest(EVP_sha384(), P11A_SIGN_MSG_MAX + 1, data, len);
		p11a_sigin_clear(&in);
	}
	/* Each hash the table knows. */
	for (i = P11A_HASH_SHA1; i <= P11A_HASH_SHA512; i++) {
		static const EVP_MD *(*const mds[])(void) = {
			NULL, EVP_sha1, EVP_sha224, EVP_sha256, EVP_sha384, EVP_sha512
		};

		p11a_sigin_init(&in, (int)i, NULL);
		assert_int_equal(feed(&in, BIG, 100000), 0);
		assert_int_equal(p11a_sigin_final(&in, &data, &len, &hashed), 0);
		assert_int_equal(hashed, 1);
		check_digest(mds[i](), BIG, data, len);
		p11a_sigin_clear(&in);
	}
}

/* No hash (Ed25519, a digest, a DigestInfo): input past the cap is refused, not hashed. */
static void
test_no_hash_refuses(void **state)
{
	struct p11a_sigin in;
	const uint8_t *data;
	size_t len;
	int hashed;

	(void)state;
	p11a_sigin_init(&in, P11A_HASH_NONE, NULL);
	assert_int_equal(feed(&in, P11A_SIGN_MSG_MAX, 50000), 0);
	assert_int_equal(p11a_sigin_update(&in, msg, 1), -P11A_E_TOO_LARGE);
	assert_int_equal(p11a_sigin_update(&in, msg, 0), -P11A_E_TOO_LARGE);
	assert_int_equal(p11a_sigin_final(&in, &data, &len, &hashed), -P11A_E_TOO_LARGE);
	assert_null(data);
	/* reset starts over with the same settings */
	p11a_sigin_reset(&in);
	assert_false(p11a_sigin_started(&in));
	assert_int_equal(feed(&in, 10, 10), 0);
	assert_int_equal(p11a_sigin_final(&in, &data, &len, &hashed), 0);
	assert_int_equal(len, 10);
	p11a_sigin_clear(&in);

	/* a size_t that would wrap the length check */
	p11a_sigin_init(&in, P11A_HASH_NONE, NULL);
	assert_int_equal(feed(&in, 100, 100), 0);
	assert_int_equal(p11a_sigin_update(&in, msg, SIZE_MAX - 50), -P11A_E_TOO_LARGE);
	p11a_sigin_clear(&in);
}

/* A copy goes on independently, before and after the switch to hashing. */
static void
test_copy(void **state)
{
	struct p11a_sigin a, b, c;
	const uint8_t *data;
	size_t len;
	int hashed;

	(void)state;
	p11a_sigin_init(&a, P11A_HASH_SHA256, NULL);
	assert_int_equal(feed(&a, 3000, 1000), 0);
	assert_int_equal(p11a_sigin_copy(&b, &a), 0);
	assert_int_equal(p11a_sigin_update(&a, msg + 3000, BIG - 3000), 0);
	assert_int_equal(p11a_sigin_copy(&c, &a), 0);
	assert_int_equal(p11a_sigin_final(&b, &data, &len, &hashed), 0);
	assert_int_equal(hashed, 0);
	assert_int_equal(len, 3000);
	assert_memory_equal(data, msg, 3000);
	p11a_sigin_clear(&b);
	assert_int_equal(p11a_sigin_final(&a, &data, &len, &hashed), 0);
	assert_int_equal(hashed, 1);
	check_digest(EVP_sha256(), BIG, data, len);
	p11a_sigin_clear(&a);
	assert_int_equal(p11a_sigin_final(&c, &data, &len, &hashed), 0);
	assert_int_equal(hashed, 1);
	check_digest(EVP_sha256(), BIG, data, len);
	p11a_sigin_clear(&c);
}

/* The digest comes from the library context given (the provider's own). */
static void
test_libctx(void **state)
{
	OSSL_LIB_CTX *lc = OSSL_LIB_CTX_new();
	OSSL_PROVIDER *base;
	struct p11a_sigin in;
	const uint8_t *data;
	size_t len;
	int hashed;

	(void)state;
	assert_non_null(lc);
	/* Only the base provider (no digests) in lc: fetching there fails, and says so. */
	base = OSSL_PROVIDER_load(lc, "base");
	assert_non_null(base);
	p11a_sigin_init(&in, P11A_HASH_SHA256, lc);
	assert_int_equal(feed(&in, P11A_SIGN_MSG_MAX, 1 << 16), 0);
	assert_int_equal(p11a_sigin_update(&in, msg, 1), -P11A_E_CRYPTO);
	assert_int_equal(p11a_sigin_final(&in, &data, &len, &hashed), -P11A_E_CRYPTO);
	p11a_sigin_clear(&in);
	OSSL_PROVIDER_unload(base);
	OSSL_LIB_CTX_free(lc);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_small_whole),
		cmocka_unit_test(test_empty),
		cmocka_unit_test(test_cap_boundary),
		cmocka_unit_test(test_no_hash_refuses),
		cmocka_unit_test(test_copy),
		cmocka_unit_test(test_libctx),
	};

	return cmocka_run_group_tests(tests, setup, teardown);
}
