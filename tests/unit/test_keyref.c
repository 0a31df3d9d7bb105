/*
 * Unit tests for the key-reference codec (common/keyref.c): round trips,
 * and every kind of malformed DER the decoder must refuse without reading
 * out of bounds.
 */
#include "config.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "p11a.h"
#include "keyref.h"

#define URI "pkcs11:token=t;id=%01;object=k;type=private"

/* A P-256 SubjectPublicKeyInfo (structure only matters here). */
static const uint8_t spki[] = {
	0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02,
	0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03,
	0x42, 0x00, 0x04, 0xba, 0x11, 0xa7, 0x77, 0xe8, 0x40, 0xb5, 0xb4, 0x2e,
	0xc8, 0xc7, 0x4c, 0x01, 0x36, 0x32, 0x9b, 0xa2, 0xad, 0xfa, 0xf3, 0xa3,
	0x37, 0x87, 0x1a, 0x7b, 0x1c, 0xf0, 0x50, 0xbb, 0x6c, 0x59, 0x14, 0x12,
	0xe5, 0xb7, 0x9b, 0x44, 0x65, 0xab, 0x44, 0xd4, 0x29, 0x40, 0x4a, 0x0c,
	0x9e, 0xee, 0x12, 0x16, 0x80, 0x3b, 0xb1, 0x50, 0xe1, 0x90, 0x11, 0x3b,
	0x84, 0xdb, 0x61, 0xc9, 0x8e, 0x60, 0xc5
};

static int
decode(const uint8_t *der, size_t len)
{
	struct p11agent_keyref r;
	int rc = p11agent_keyref_decode(der, len, &r);

	if (rc != 0) {
		assert_null(r.uri);
		assert_null(r.spki);
	}
	p11agent_keyref_clear(&r);
	return rc;
}

static void
test_roundtrip(void **state)
{
	struct p11agent_keyref r;
	uint8_t *der;
	size_t len;

	assert_int_equal(p11agent_keyref_encode(URI, spki, sizeof(spki), &der, &len), 0);
	assert_int_equal(p11agent_keyref_decode(der, len, &r), 0);
	assert_string_equal(r.uri, URI);
	assert_int_equal(r.spki_len, sizeof(spki));
	assert_memory_equal(r.spki, spki, sizeof(spki));
	p11agent_keyref_clear(&r);
	free(der);

	/* without the public key */
	assert_int_equal(p11agent_keyref_encode(URI, NULL, 0, &der, &len), 0);
	assert_int_equal(p11agent_keyref_decode(der, len, &r), 0);
	assert_string_equal(r.uri, URI);
	assert_null(r.spki);
	assert_int_equal(r.spki_len, 0);
	p11agent_keyref_clear(&r);
	free(der);
}

static void
test_long_uri(void **state)
{
	char uri[P11A_URI_MAX + 2];
	struct p11agent_keyref r;
	uint8_t *der;
	size_t len;

	/* The longest URI the protocol allows: a 2-byte DER length. */
	memset(uri, 'a', sizeof(uri));
	memcpy(uri, "pkcs11:object=", 14);
	uri[P11A_URI_MAX] = '\0';
	assert_int_equal(p11agent_keyref_encode(uri, spki, sizeof(spki), &der, &len), 0);
	assert_int_equal(p11agent_keyref_decode(der, len, &r), 0);
	assert_int_equal(strlen(r.uri), P11A_URI_MAX);
	p11agent_keyref_clear(&r);
	free(der);
	/* one byte more is refused both ways */
	uri[P11A_URI_MAX] = 'a';
	uri[P11A_URI_MAX + 1] = '\0';
	assert_int_equal(p11agent_keyref_encode(uri, NULL, 0, &der, &len), -P11A_E_TOO_LARGE);
	assert_null(der);
}

static void
test_encode_refuses(void **state)
{
	uint8_t *der = (uint8_t *)1;
	size_t len = 1;
	uint8_t bad[sizeof(spki)];

	assert_int_equal(p11agent_keyref_encode("file:/etc/passwd", NULL, 0, &der, &len),
			 -P11A_E_BAD_REQUEST);
	assert_null(der);
	assert_int_equal(p11agent_keyref_encode(NULL, NULL, 0, &der, &len), -P11A_E_BAD_REQUEST);
	memcpy(bad, spki, sizeof(spki));
	bad[0] = 0x31;
	assert_int_equal(p11agent_keyref_encode(URI, bad, sizeof(bad), &der, &len),
			 -P11A_E_BAD_REQUEST);
	/* an SPKI whose DER length disagrees with the buffer */
	assert_int_equal(p11agent_keyref_encode(URI, spki, sizeof(spki) - 1, &der, &len),
			 -P11A_E_BAD_REQUEST);
	assert_int_equal(p11agent_keyref_encode(URI, spki, sizeof(spki) + 0, &der, &len), 0);
	free(der);
}

/* Hand-made encodings: SEQUENCE { INTEGER v, UTF8String uri [, extra] } */
static size_t
build(uint8_t *out, uint8_t seqtag, const uint8_t *ver, size_t verlen, uint8_t uritag,
      const char *uri, const uint8_t *extra, size_t extralen)
{
	size_t ulen = strlen(uri), body = verlen + 2 + ulen + extralen, n = 0;

	out[n++] = seqtag;
	out[n++] = (uint8_t)body;
	memcpy(out + n, ver, verlen);
	n += verlen;
	out[n++] = uritag;
	out[n++] = (uint8_t)ulen;
	memcpy(out + n, uri, ulen);
	n += ulen;
	if (extralen != 0)
		memcpy(out + n, extra, extralen);
	return n + extralen;
}

static void
test_malformed(void **state)
{
	static const uint8_t v1[] = { 0x02, 0x01, 0x01 };
	static const uint8_t v2[] = { 0x02, 0x01, 0x02 };
	static const uint8_t v0[] = { 0x02, 0x01, 0x00 };
	static const uint8_t vneg[] = { 0x02, 0x01, 0xff };
	static const uint8_t vlong[] = { 0x02, 0x02, 0x00, 0x01 };
	static const uint8_t vempty[] = { 0x02, 0x00 };
	static const uint8_t seq_empty[] = { 0x30, 0x00 };
	static const uint8_t set_spki[] = { 0x31, 0x00 };
	uint8_t buf[256];
	size_t n;

	assert_int_equal(decode(NULL, 0), -P11A_E_MALFORMED);
	assert_int_equal(decode((const uint8_t *)"", 0), -P11A_E_MALFORMED);

	n = build(buf, 0x30, v1, sizeof(v1), 0x0c, URI, NULL, 0);
	assert_int_equal(decode(buf, n), 0);
	/* not a SEQUENCE */
	n = build(buf, 0x31, v1, sizeof(v1), 0x0c, URI, NULL, 0);
	assert_int_equal(decode(buf, n), -P11A_E_MALFORMED);
	/* other versions */
	n = build(buf, 0x30, v2, sizeof(v2), 0x0c, URI, NULL, 0);
	assert_int_equal(decode(buf, n), -P11A_E_UNSUPPORTED);
	n = build(buf, 0x30, v0, sizeof(v0), 0x0c, URI, NULL, 0);
	assert_int_not_equal(decode(buf, n), 0);
	n = build(buf, 0x30, vneg, sizeof(vneg), 0x0c, URI, NULL, 0);
	assert_int_equal(decode(buf, n), -P11A_E_MALFORMED);
	n = build(buf, 0x30, vlong, sizeof(vlong), 0x0c, URI, NULL, 0);
	assert_int_equal(decode(buf, n), -P11A_E_MALFORMED);
	n = build(buf, 0x30, vempty, sizeof(vempty), 0x0c, URI, NULL, 0);
	assert_int_equal(decode(buf, n), -P11A_E_MALFORMED);
	/* the URI: wrong string type, wrong scheme, NUL inside, empty */
	n = build(buf, 0x30, v1, sizeof(v1), 0x16, URI, NULL, 0);
	assert_int_equal(decode(buf, n), -P11A_E_MALFORMED);
	n = build(buf, 0x30, v1, sizeof(v1), 0x0c, "file:/x", NULL, 0);
	assert_int_equal(decode(buf, n), -P11A_E_MALFORMED);
	n = build(buf, 0x30, v1, sizeof(v1), 0x0c, "pkcs11:objectXk", NULL, 0);
	buf[n - 2] = '\0';
	assert_int_equal(decode(buf, n), -P11A_E_MALFORMED);
	n = build(buf, 0x30, v1, sizeof(v1), 0x0c, "", NULL, 0);
	assert_int_equal(decode(buf, n), -P11A_E_MALFORMED);
	/* public key: empty SEQUENCE, a SET, junk after it */
	n = build(buf, 0x30, v1, sizeof(v1), 0x0c, URI, seq_empty, sizeof(seq_empty));
	assert_int_equal(decode(buf, n), -P11A_E_MALFORMED);
	n = build(buf, 0x30, v1, sizeof(v1), 0x0c, URI, set_spki, sizeof(set_spki));
	assert_int_equal(decode(buf, n), -P11A_E_MALFORMED);
	/* bytes after the outer SEQUENCE */
	n = build(buf, 0x30, v1, sizeof(v1), 0x0c, URI, NULL, 0);
	buf[n++] = 0x00;
	assert_int_equal(decode(buf, n), -P11A_E_MALFORMED);
	/* outer length larger than the data */
	n = build(buf, 0x30, v1, sizeof(v1), 0x0c, URI, NULL, 0);
	buf[1]++;
	assert_int_equal(decode(buf, n), -P11A_E_MALFORMED);
	/* outer length smaller: the URI runs past the SEQUENCE */
	n = build(buf, 0x30, v1, sizeof(v1), 0x0c, URI, NULL, 0);
	buf[1]--;
	assert_int_equal(decode(buf, n), -P11A_E_MALFORMED);
}

static void
test_lengths(void **state)
{
	static const uint8_t indefinite[] = { 0x30, 0x80, 0x00, 0x00 };
	static const uint8_t nonminimal[] = { 0x30, 0x81, 0x05, 0x02, 0x01, 0x01, 0x0c, 0x00 };
	static const uint8_t leading0[] = { 0x30, 0x82, 0x00, 0x85 };
	static const uint8_t huge[] = { 0x30, 0x84, 0x7f, 0xff, 0xff, 0xff };
	static const uint8_t big[] = { 0x30, 0x83, 0x01, 0x00, 0x00 };
	static const uint8_t multibyte_tag[] = { 0x3f, 0x81, 0x01, 0x00 };
	size_t total;

	assert_int_equal(decode(indefinite, sizeof(indefinite)), -P11A_E_MALFORMED);
	assert_int_equal(decode(nonminimal, sizeof(nonminimal)), -P11A_E_MALFORMED);
	assert_int_equal(decode(leading0, sizeof(leading0)), -P11A_E_MALFORMED);
	assert_int_equal(decode(huge, sizeof(huge)), -P11A_E_TOO_LARGE);
	assert_int_equal(decode(big, sizeof(big)), -P11A_E_TOO_LARGE);
	assert_int_equal(decode(multibyte_tag, sizeof(multibyte_tag)), -P11A_E_MALFORMED);

	assert_int_equal(p11agent_der_element_len((const uint8_t *)"\x30", 1, &total),
			 -P11A_E_TRUNCATED);
	assert_int_equal(p11agent_der_element_len((const uint8_t *)"\x30\x82\x01", 3, &total),
			 -P11A_E_TRUNCATED);
	assert_int_equal(p11agent_der_element_len((const uint8_t *)"\x30\x05", 2, &total), 0);
	assert_int_equal(total, 7);
	assert_int_equal(p11agent_der_element_len((const uint8_t *)"\x30\x82\x01\x00", 4, &total), 0);
	assert_int_equal(total, 4 + 256);
}

/* Every prefix and every one-byte change of a valid encoding: no crash, no overread (ASan). */
static void
test_mutations(void **state)
{
	uint8_t *der, *copy;
	size_t len, i;
	unsigned v;
	int ok = 0;

	assert_int_equal(p11agent_keyref_encode(URI, spki, sizeof(spki), &der, &len), 0);
	for (i = 0; i < len; i++) {
		copy = malloc(i == 0 ? 1 : i);     /* exact size, so ASan sees overreads */
		assert_non_null(copy);
		memcpy(copy, der, i);
		assert_int_not_equal(decode(copy, i), 0);
		free(copy);
	}
	copy = malloc(len);
	assert_non_null(copy);
	for (i = 0; i < len; i++) {
		for (v = 0; v < 256; v += 17) {
			memcpy(copy, der, len);
			copy[i] ^= (uint8_t)(v | 1);
			if (decode(copy, len) == 0)
				ok++;   /* a change inside the URI or the key can still be valid */
		}
	}
	assert_true(ok > 0);
	free(copy);
	free(der);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_roundtrip),
		cmocka_unit_test(test_long_uri),
		cmocka_unit_test(test_encode_refuses),
		cmocka_unit_test(test_malformed),
		cmocka_unit_test(test_lengths),
		cmocka_unit_test(test_mutations),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
