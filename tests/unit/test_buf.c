/*
 * Unit tests for common/buf.c and common/p11a.c.
 */
#include "config.h"

#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "p11a.h"
#include "buf.h"

static void
test_ints_big_endian(void **state)
{
	struct p11a_buf *b = p11a_buf_new(64);
	static const uint8_t want[] = {
		0xab, 0x12, 0x34, 0xde, 0xad, 0xbe, 0xef, 0x00, 0x00, 0x00, 0x00
	};
	uint8_t u8;
	uint16_t u16;
	uint32_t u32;

	assert_non_null(b);
	assert_int_equal(p11a_buf_put_u8(b, 0xab), 0);
	assert_int_equal(p11a_buf_put_u16(b, 0x1234), 0);
	assert_int_equal(p11a_buf_put_u32(b, 0xdeadbeef), 0);
	assert_int_equal(p11a_buf_put_u32(b, 0), 0);
	assert_int_equal(p11a_buf_len(b), sizeof(want));
	assert_memory_equal(p11a_buf_ptr(b), want, sizeof(want));
	assert_int_equal(p11a_buf_get_u8(b, &u8), 0);
	assert_int_equal(u8, 0xab);
	assert_int_equal(p11a_buf_get_u16(b, &u16), 0);
	assert_int_equal(u16, 0x1234);
	assert_int_equal(p11a_buf_get_u32(b, &u32), 0);
	assert_int_equal(u32, 0xdeadbeef);
	assert_int_equal(p11a_buf_get_u32(b, &u32), 0);
	assert_int_equal(u32, 0);
	assert_int_equal(p11a_buf_len(b), 0);
	assert_int_equal(p11a_buf_get_u8(b, &u8), -P11A_E_TRUNCATED);
	p11a_buf_free(b);
}

static void
test_strings(void **state)
{
	struct p11a_buf *b = p11a_buf_new(1024);
	const uint8_t *p;
	uint8_t *dup;
	char *s;
	size_t n;

	assert_non_null(b);
	assert_int_equal(p11a_buf_put_string(b, "abc", 3), 0);
	assert_int_equal(p11a_buf_put_cstring(b, "hello"), 0);
	assert_int_equal(p11a_buf_put_cstring(b, NULL), 0);
	assert_int_equal(p11a_buf_put_string(b, NULL, 0), 0);
	assert_int_equal(p11a_buf_len(b), 4 + 3 + 4 + 5 + 4 + 4);
	assert_memory_equal(p11a_buf_ptr(b), "\0\0\0\3abc", 7);

	assert_int_equal(p11a_buf_get_string_direct(b, &p, &n, 3), 0);
	assert_int_equal(n, 3);
	assert_memory_equal(p, "abc", 3);
	assert_int_equal(p11a_buf_get_cstring(b, &s, 100), 0);
	assert_string_equal(s, "hello");
	free(s);
	assert_int_equal(p11a_buf_get_string_dup(b, &dup, &n, 0), 0);
	assert_int_equal(n, 0);
	assert_non_null(dup);
	assert_int_equal(dup[0], 0);
	free(dup);
	assert_int_equal(p11a_buf_get_cstring(b, &s, 0), 0);
	assert_string_equal(s, "");
	free(s);
	assert_int_equal(p11a_buf_len(b), 0);
	p11a_buf_free(b);
}

static void
test_string_limits(void **state)
{
	struct p11a_buf *b = p11a_buf_new(1024);
	const uint8_t *p;
	uint8_t *dup;
	char *s;
	size_t n, before;

	assert_non_null(b);
	assert_int_equal(p11a_buf_put_string(b, "abcdef", 6), 0);
	before = p11a_buf_len(b);
	/* Over maxlen: TOO_LARGE, nothing consumed. */
	assert_int_equal(p11a_buf_get_string_direct(b, &p, &n, 5), -P11A_E_TOO_LARGE);
	assert_null(p);
	assert_int_equal(p11a_buf_get_string_dup(b, &dup, &n, 5), -P11A_E_TOO_LARGE);
	assert_null(dup);
	assert_int_equal(p11a_buf_get_cstring(b, &s, 5), -P11A_E_TOO_LARGE);
	assert_null(s);
	assert_int_equal(p11a_buf_len(b), before);
	/* Length says more than there is. */
	assert_int_equal(p11a_buf_unreserve(b, 1), 0);
	assert_int_equal(p11a_buf_get_string_direct(b, &p, &n, 100), -P11A_E_TRUNCATED);
	assert_int_equal(p11a_buf_get_string_dup(b, &dup, &n, 100), -P11A_E_TRUNCATED);
	assert_int_equal(p11a_buf_len(b), before - 1);
	p11a_buf_reset(b);
	/* A truncated length prefix. */
	assert_int_equal(p11a_buf_put(b, "\0\0\0", 3), 0);
	assert_int_equal(p11a_buf_get_string_direct(b, &p, &n, 100), -P11A_E_TRUNCATED);
	assert_int_equal(p11a_buf_len(b), 3);
	p11a_buf_free(b);
}

static void
test_huge_length_no_alloc(void **state)
{
	/* 0xffffffff with SIZE_MAX allowed must fail on the data check, not in malloc. */
	static const uint8_t d[] = { 0xff, 0xff, 0xff, 0xff, 'x' };
	struct p11a_buf *b = p11a_buf_from(d, sizeof(d));
	uint8_t *dup;
	char *s;
	size_t n;

	assert_non_null(b);
	assert_int_equal(p11a_buf_get_string_dup(b, &dup, &n, SIZE_MAX), -P11A_E_TRUNCATED);
	assert_null(dup);
	assert_int_equal(p11a_buf_get_cstring(b, &s, SIZE_MAX), -P11A_E_TRUNCATED);
	assert_int_equal(p11a_buf_len(b), sizeof(d));
	p11a_buf_free(b);
}

static void
test_cstring_nul(void **state)
{
	struct p11a_buf *b = p11a_buf_new(64);
	char *s = (char *)1;

	assert_non_null(b);
	assert_int_equal(p11a_buf_put_string(b, "ab\0cd", 5), 0);
	assert_int_equal(p11a_buf_get_cstring(b, &s, 64), -P11A_E_MALFORMED);
	assert_null(s);
	assert_int_equal(p11a_buf_len(b), 9);
	p11a_buf_reset(b);
	assert_int_equal(p11a_buf_put_string(b, "abcd\0", 5), 0);
	assert_int_equal(p11a_buf_get_cstring(b, &s, 64), -P11A_E_MALFORMED);
	p11a_buf_free(b);
}

static void
test_max_enforced(void **state)
{
	struct p11a_buf *b = p11a_buf_new(10);
	uint8_t *p;

	assert_non_null(b);
	assert_int_equal(p11a_buf_max(b), 10);
	assert_int_equal(p11a_buf_put(b, "12345678", 8), 0);
	assert_int_equal(p11a_buf_put_u32(b, 1), -P11A_E_TOO_LARGE);
	assert_int_equal(p11a_buf_put_string(b, "", 0), -P11A_E_TOO_LARGE);
	assert_int_equal(p11a_buf_len(b), 8);
	assert_memory_equal(p11a_buf_ptr(b), "12345678", 8);
	assert_int_equal(p11a_buf_put_u16(b, 0x3930), 0);
	assert_int_equal(p11a_buf_put_u8(b, 0), -P11A_E_TOO_LARGE);
	assert_int_equal(p11a_buf_reserve(b, 1, &p), -P11A_E_TOO_LARGE);
	assert_null(p);
	assert_int_equal(p11a_buf_reserve(b, SIZE_MAX, &p), -P11A_E_TOO_LARGE);
	/* The limit is on unread bytes: consuming makes room again. */
	assert_int_equal(p11a_buf_consume(b, 4), 0);
	assert_int_equal(p11a_buf_put_u32(b, 0x41424344), 0);
	assert_int_equal(p11a_buf_len(b), 10);
	assert_memory_equal(p11a_buf_ptr(b), "567890ABCD", 10);
	assert_int_equal(p11a_buf_consume(b, 11), -P11A_E_TRUNCATED);
	assert_int_equal(p11a_buf_len(b), 10);
	p11a_buf_free(b);

	b = p11a_buf_new(0);
	assert_non_null(b);
	assert_non_null(p11a_buf_ptr(b));
	assert_int_equal(p11a_buf_put_u8(b, 1), -P11A_E_TOO_LARGE);
	assert_int_equal(p11a_buf_put(b, NULL, 0), 0);
	p11a_buf_free(b);
}

static void
test_growth_and_compaction(void **state)
{
	struct p11a_buf *b = p11a_buf_new(1 << 20);
	uint8_t chunk[1000], out[1000];
	size_t i, j;

	assert_non_null(b);
	/* Write 100 KiB in odd chunks, read back half, write more, check order. */
	for (i = 0; i < 100; i++) {
		for (j = 0; j < sizeof(chunk); j++)
			chunk[j] = (uint8_t)(i * 7 + j);
		assert_int_equal(p11a_buf_put(b, chunk, sizeof(chunk) - (i % 3)), 0);
	}
	for (i = 0; i < 50; i++) {
		assert_int_equal(p11a_buf_get(b, out, sizeof(chunk) - (i % 3)), 0);
		for (j = 0; j < sizeof(chunk) - (i % 3); j++)
			assert_int_equal(out[j], (uint8_t)(i * 7 + j));
	}
	for (i = 100; i < 300; i++) {
		for (j = 0; j < sizeof(chunk); j++)
			chunk[j] = (uint8_t)(i * 7 + j);
		assert_int_equal(p11a_buf_put(b, chunk, sizeof(chunk) - (i % 3)), 0);
	}
	for (i = 50; i < 300; i++) {
		assert_int_equal(p11a_buf_get(b, out, sizeof(chunk) - (i % 3)), 0);
		for (j = 0; j < sizeof(chunk) - (i % 3); j++)
			assert_int_equal(out[j], (uint8_t)(i * 7 + j));
	}
	assert_int_equal(p11a_buf_len(b), 0);

	/* Small buffer: consumed prefix is reused rather than grown. */
	p11a_buf_free(b);
	b = p11a_buf_new(8);
	assert_non_null(b);
	for (i = 0; i < 100; i++) {
		uint32_t v;

		assert_int_equal(p11a_buf_put_u32(b, (uint32_t)i), 0);
		assert_int_equal(p11a_buf_put_u32(b, (uint32_t)i + 1), 0);
		assert_int_equal(p11a_buf_get_u32(b, &v), 0);
		assert_int_equal(v, i);
		assert_int_equal(p11a_buf_put_u32(b, (uint32_t)i + 2), 0);
		assert_int_equal(p11a_buf_get_u32(b, &v), 0);
		assert_int_equal(v, i + 1);
		assert_int_equal(p11a_buf_get_u32(b, &v), 0);
		assert_int_equal(v, i + 2);
	}
	p11a_buf_free(b);
}

static void
test_reserve_unreserve(void **state)
{
	struct p11a_buf *b = p11a_buf_new(100);
	uint8_t *p;

	assert_non_null(b);
	assert_int_equal(p11a_buf_put(b, "ab", 2), 0);
	assert_int_equal(p11a_buf_reserve(b, 10, &p), 0);
	assert_non_null(p);
	memcpy(p, "cdef", 4);
	assert_int_equal(p11a_buf_len(b), 12);
	assert_int_equal(p11a_buf_unreserve(b, 6), 0);
	assert_int_equal(p11a_buf_len(b), 6);
	assert_memory_equal(p11a_buf_ptr(b), "abcdef", 6);
	assert_int_equal(p11a_buf_unreserve(b, 7), -P11A_E_TRUNCATED);
	assert_int_equal(p11a_buf_len(b), 6);
	p11a_buf_free(b);
}

static void
test_from_is_readonly(void **state)
{
	struct p11a_buf *b = p11a_buf_from("\x01\x02", 2);
	uint16_t v;

	assert_non_null(b);
	assert_int_equal(p11a_buf_len(b), 2);
	assert_true(p11a_buf_put_u8(b, 1) < 0);
	assert_int_equal(p11a_buf_get_u16(b, &v), 0);
	assert_int_equal(v, 0x0102);
	assert_true(p11a_buf_put_u8(b, 1) < 0);
	p11a_buf_free(b);

	b = p11a_buf_from(NULL, 0);
	assert_non_null(b);
	assert_int_equal(p11a_buf_len(b), 0);
	p11a_buf_free(b);
	p11a_buf_free(NULL);
}

static void
test_reset(void **state)
{
	struct p11a_buf *b = p11a_buf_new(100);
	uint8_t *p;

	assert_non_null(b);
	assert_int_equal(p11a_buf_put(b, "secret", 6), 0);
	p11a_buf_reset(b);
	assert_int_equal(p11a_buf_len(b), 0);
	/* Storage is reused and the old bytes are gone. */
	assert_int_equal(p11a_buf_reserve(b, 6, &p), 0);
	assert_memory_equal(p, "\0\0\0\0\0\0", 6);
	p11a_buf_free(b);
}

static void
test_strerror(void **state)
{
	int i;

	for (i = 0; i < P11A_E__MAX; i++) {
		const char *s = p11a_strerror(i);

		assert_non_null(s);
		assert_string_not_equal(s, "unknown error");
		assert_string_equal(s, p11a_strerror(-i));
	}
	assert_string_equal(p11a_strerror(P11A_E__MAX), "unknown error");
	assert_string_equal(p11a_strerror(-1000), "unknown error");
	assert_string_equal(p11a_strerror(INT_MIN), "unknown error");
	assert_string_equal(p11a_strerror(INT_MAX), "unknown error");
	assert_string_equal(p11a_strerror(-P11A_E_LOCKED),
	    "token is locked: run 'p11agent unlock'");
}

static void
test_names(void **state)
{
	static const struct { const char *name; int v; size_t len; } hashes[] = {
		{ "none", P11A_HASH_NONE, 0 },
		{ "sha1", P11A_HASH_SHA1, 20 },
		{ "sha224", P11A_HASH_SHA224, 28 },
		{ "sha256", P11A_HASH_SHA256, 32 },
		{ "sha384", P11A_HASH_SHA384, 48 },
		{ "sha512", P11A_HASH_SHA512, 64 },
	};
	static const char *const schemes[] = { NULL, "rsa-pkcs1", "rsa-pss", "ecdsa", "eddsa" };
	size_t i;

	for (i = 0; i < sizeof(hashes) / sizeof(hashes[0]); i++) {
		assert_string_equal(p11a_hash_name(hashes[i].v), hashes[i].name);
		assert_int_equal(p11a_hash_from_name(hashes[i].name), hashes[i].v);
		assert_int_equal(p11a_hash_len(hashes[i].v), hashes[i].len);
	}
	assert_int_equal(p11a_hash_from_name("SHA-256"), P11A_HASH_SHA256);
	assert_int_equal(p11a_hash_from_name("SHA384"), P11A_HASH_SHA384);
	assert_true(p11a_hash_from_name("md5") < 0);
	assert_true(p11a_hash_from_name("") < 0);
	assert_true(p11a_hash_from_name(NULL) < 0);
	assert_null(p11a_hash_name(6));
	assert_null(p11a_hash_name(-1));
	assert_int_equal(p11a_hash_len(6), 0);
	assert_int_equal(p11a_hash_len(-1), 0);

	for (i = 1; i < 5; i++) {
		assert_string_equal(p11a_scheme_name((int)i), schemes[i]);
		assert_int_equal(p11a_scheme_from_name(schemes[i]), (int)i);
	}
	assert_null(p11a_scheme_name(0));
	assert_null(p11a_scheme_name(5));
	assert_true(p11a_scheme_from_name("rsa") < 0);
	assert_true(p11a_scheme_from_name(NULL) < 0);

	assert_string_equal(p11a_keytype_name(P11A_KEY_RSA), "RSA");
	assert_string_equal(p11a_keytype_name(P11A_KEY_EC), "EC");
	assert_string_equal(p11a_keytype_name(P11A_KEY_ED25519), "Ed25519");
	assert_null(p11a_keytype_name(0));
	assert_null(p11a_keytype_name(4));
}

static void
test_wipe(void **state)
{
	uint8_t x[32];

	memset(x, 0xaa, sizeof(x));
	p11a_wipe(x, sizeof(x));
	for (size_t i = 0; i < sizeof(x); i++)
		assert_int_equal(x[i], 0);
	p11a_wipe(NULL, 10);
	p11a_wipe(x, 0);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_ints_big_endian),
		cmocka_unit_test(test_strings),
		cmocka_unit_test(test_string_limits),
		cmocka_unit_test(test_huge_length_no_alloc),
		cmocka_unit_test(test_cstring_nul),
		cmocka_unit_test(test_max_enforced),
		cmocka_unit_test(test_growth_and_compaction),
		cmocka_unit_test(test_reserve_unreserve),
		cmocka_unit_test(test_from_is_readonly),
		cmocka_unit_test(test_reset),
		cmocka_unit_test(test_strerror),
		cmocka_unit_test(test_names),
		cmocka_unit_test(test_wipe),
	};

	return cmocka_run_group_tests_name("buf", tests, NULL, NULL);
}
