/*
 * Unit tests for common/tlsclass.c, the classifier behind tls-only keys:
 * inputs captured from real handshakes (openssl s_client through the
 * provider and the agent, RSA-2048, P-256, P-384, TLS 1.2 and 1.3: the
 * bytes the agent received in SIGN; they are also the fuzz target's seeds
 * in tests/fuzz/corpus/fuzz_tlsclass), and crafted near-misses.
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

#include "tlsclass.h"

#ifndef TLS_CORPUS
#error "TLS_CORPUS: the directory of the captured inputs"
#endif

static const char ctx_client[] = "TLS 1.3, client CertificateVerify";
static const char ctx_server[] = "TLS 1.3, server CertificateVerify";

struct blob {
	uint8_t *d;
	size_t len;
};

static struct blob
load(const char *name)
{
	char path[1024];
	struct blob b = { NULL, 0 };
	FILE *f;
	long n;

	snprintf(path, sizeof(path), "%s/%s", TLS_CORPUS, name);
	f = fopen(path, "rb");
	assert_non_null(f);
	assert_int_equal(fseek(f, 0, SEEK_END), 0);
	n = ftell(f);
	assert_true(n > 0);
	rewind(f);
	b.d = malloc((size_t)n + 64);
	assert_non_null(b.d);
	assert_int_equal(fread(b.d, 1, (size_t)n, f), (size_t)n);
	fclose(f);
	b.len = (size_t)n;
	return b;
}

static enum p11a_tlsclass
cls(const struct blob *b)
{
	return p11a_tls_classify(b->d, b->len, 0);
}

/* 64 spaces, ctx (NULL: the client's), a 0, hlen bytes of hash. */
static size_t
tls13(uint8_t *out, size_t spaces, const char *ctx, size_t hlen)
{
	size_t n = 0;

	memset(out, 0x20, spaces);
	n += spaces;
	ctx = ctx ? ctx : ctx_client;
	memcpy(out + n, ctx, strlen(ctx));
	n += strlen(ctx);
	out[n++] = 0;
	for (size_t i = 0; i < hlen; i++)
		out[n++] = (uint8_t)(i * 7 + 1);
	return n;
}

static void
test_captured(void **state)
{
	static const struct {
		const char *name;
		enum p11a_tlsclass want;
	} cases[] = {
		{ "rsa2048-tls1.2", P11A_TLS_12_CLIENT },
		{ "ec256-tls1.2", P11A_TLS_12_CLIENT },
		{ "ec384-tls1.2", P11A_TLS_12_CLIENT },
		{ "rsa2048-tls1.3", P11A_TLS_13_CLIENT },
		{ "ec256-tls1.3", P11A_TLS_13_CLIENT },
		{ "ec384-tls1.3", P11A_TLS_13_CLIENT },
	};

	(void)state;
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct blob b = load(cases[i].name);
		if (cls(&b) != cases[i].want)
			fail_msg("%s: %s, want %s", cases[i].name, p11a_tlsclass_name(cls(&b)),
				 p11a_tlsclass_name(cases[i].want));
		assert_true(p11a_tlsclass_is_client(cls(&b)));
		/* The same bytes sent as a digest cannot be told. */
		assert_int_equal(p11a_tls_classify(b.d, b.len, 1), P11A_TLS_DIGEST);
		free(b.d);
	}
}

static void
test_tls13_crafted(void **state)
{
	uint8_t m[256];
	size_t n;

	(void)state;
	n = tls13(m, 64, NULL, 32);
	assert_int_equal(p11a_tls_classify(m, n, 0), P11A_TLS_13_CLIENT);
	n = tls13(m, 64, NULL, 48);
	assert_int_equal(p11a_tls_classify(m, n, 0), P11A_TLS_13_CLIENT);
	/* The server's context string: never a client's. */
	n = tls13(m, 64, ctx_server, 32);
	assert_int_equal(p11a_tls_classify(m, n, 0), P11A_TLS_13_SERVER);
	assert_false(p11a_tlsclass_is_client(P11A_TLS_13_SERVER));
	/* 63 and 65 spaces. */
	n = tls13(m, 63, NULL, 32);
	assert_int_equal(p11a_tls_classify(m, n, 0), P11A_TLS_RAW);
	n = tls13(m, 65, NULL, 32);
	assert_int_equal(p11a_tls_classify(m, n, 0), P11A_TLS_RAW);
	/* Hash lengths of no TLS 1.3 suite. */
	for (size_t h = 0; h < 80; h++) {
		n = tls13(m, 64, NULL, h);
		assert_int_equal(p11a_tls_classify(m, n, 0),
				 h == 32 || h == 48 ? P11A_TLS_13_CLIENT : P11A_TLS_RAW);
	}
	/* No 0 after the context; another context string; a space less in it. */
	n = tls13(m, 64, NULL, 32);
	m[64 + strlen(ctx_client)] = 1;
	assert_int_equal(p11a_tls_classify(m, n, 0), P11A_TLS_RAW);
	n = tls13(m, 64, "TLS 1.3, client CertificateVerifY", 32);
	assert_int_equal(p11a_tls_classify(m, n, 0), P11A_TLS_RAW);
	n = tls13(m, 64, "TLS 1.3,client CertificateVerify ", 32);
	assert_int_equal(p11a_tls_classify(m, n, 0), P11A_TLS_RAW);
	/* A non-space in the padding. */
	n = tls13(m, 64, NULL, 32);
	m[40] = 0x21;
	assert_int_equal(p11a_tls_classify(m, n, 0), P11A_TLS_RAW);
	/* Every truncation. */
	n = tls13(m, 64, NULL, 32);
	for (size_t k = 0; k < n; k++)
		assert_int_equal(p11a_tls_classify(m, k, 0), P11A_TLS_RAW);
	/* A captured message with one byte more. */
	struct blob b = load("ec256-tls1.3");
	b.d[b.len] = 0;
	assert_int_equal(p11a_tls_classify(b.d, b.len + 1, 0), P11A_TLS_RAW);
	free(b.d);
}

static void
test_tls12_crafted(void **state)
{
	struct blob b = load("rsa2048-tls1.2");
	size_t first;

	(void)state;
	/* Trailing garbage, a truncated last message, every shorter prefix. */
	b.d[b.len] = 0x16;
	assert_int_equal(p11a_tls_classify(b.d, b.len + 1, 0), P11A_TLS_RAW);
	memcpy(b.d + b.len, "\x10\x00\x00\x00", 4);
	assert_int_equal(p11a_tls_classify(b.d, b.len + 4, 0), P11A_TLS_RAW);
	for (size_t k = 0; k < b.len; k++)
		assert_int_equal(p11a_tls_classify(b.d, k, 0), P11A_TLS_RAW);
	/* Not starting with a ClientHello: without it, or with its type changed. */
	first = 4 + ((size_t)b.d[1] << 16 | (size_t)b.d[2] << 8 | b.d[3]);
	assert_int_equal(p11a_tls_classify(b.d + first, b.len - first, 0), P11A_TLS_RAW);
	b.d[0] = 2;
	assert_int_equal(p11a_tls_classify(b.d, b.len, 0), P11A_TLS_RAW);
	b.d[0] = 1;
	/* Implausible versions: SSL 3.0, TLS 1.3's wire 3.4, 2.x. */
	b.d[5] = 0;
	assert_int_equal(p11a_tls_classify(b.d, b.len, 0), P11A_TLS_RAW);
	b.d[5] = 4;
	assert_int_equal(p11a_tls_classify(b.d, b.len, 0), P11A_TLS_RAW);
	b.d[5] = 3;
	b.d[4] = 2;
	assert_int_equal(p11a_tls_classify(b.d, b.len, 0), P11A_TLS_RAW);
	b.d[4] = 3;
	assert_int_equal(p11a_tls_classify(b.d, b.len, 0), P11A_TLS_12_CLIENT);
	/* The ServerHello's version picks the class: 3.1 is TLS 1.0. */
	b.d[first + 5] = 1;
	assert_int_equal(p11a_tls_classify(b.d, b.len, 0), P11A_TLS_10_CLIENT);
	b.d[first + 5] = 3;
	/* Without the client's Certificate: the 7th message (11) becomes a 4th type. */
	size_t off = 0;
	int idx = 0;
	while (off < b.len) {
		size_t l = (size_t)b.d[off + 1] << 16 | (size_t)b.d[off + 2] << 8 | b.d[off + 3];
		if (idx == 4) {         /* the CertificateRequest (13) */
			b.d[off] = 12;
			assert_int_equal(p11a_tls_classify(b.d, b.len, 0), P11A_TLS_RAW);
			b.d[off] = 13;
		}
		if (idx == 6) {         /* the client's Certificate */
			b.d[off] = 15;
			assert_int_equal(p11a_tls_classify(b.d, b.len, 0), P11A_TLS_RAW);
			b.d[off] = 11;
		}
		off += 4 + l;
		idx++;
	}
	assert_int_equal(p11a_tls_classify(b.d, b.len, 0), P11A_TLS_12_CLIENT);
	free(b.d);
}

static void
test_other(void **state)
{
	static const uint8_t hs_min[] = {
		/* The shortest transcript the rule takes: bodies of the least sizes. */
		1, 0, 0, 38, 3, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
		0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
		2, 0, 0, 38, 3, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
		0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
		13, 0, 0, 0, 14, 0, 0, 0, 11, 0, 0, 0, 16, 0, 0, 0,
	};
	uint8_t two[sizeof(hs_min) + 4];

	(void)state;
	assert_int_equal(p11a_tls_classify(NULL, 0, 0), P11A_TLS_RAW);
	assert_int_equal(p11a_tls_classify((const uint8_t *)"", 0, 0), P11A_TLS_RAW);
	assert_int_equal(p11a_tls_classify((const uint8_t *)"hello, world\n", 13, 0), P11A_TLS_RAW);
	assert_int_equal(p11a_tls_classify((const uint8_t *)"eyJhbGciOiJFUzI1NiJ9.e30", 24, 0),
			 P11A_TLS_RAW);
	assert_int_equal(p11a_tls_classify(NULL, 0, 1), P11A_TLS_DIGEST);
	assert_int_equal(p11a_tls_classify(hs_min, sizeof(hs_min), 0), P11A_TLS_12_CLIENT);
	/* Two CertificateRequests. */
	memcpy(two, hs_min, 84);
	memcpy(two + 84, "\x0d\x00\x00\x00", 4);
	memcpy(two + 88, hs_min + 84, sizeof(hs_min) - 84);
	assert_int_equal(p11a_tls_classify(two, sizeof(two), 0), P11A_TLS_RAW);
	/* A ClientHello body one byte short. */
	uint8_t shortch[sizeof(hs_min)];
	memcpy(shortch, hs_min, sizeof(hs_min));
	shortch[3] = 37;
	assert_int_equal(p11a_tls_classify(shortch, sizeof(shortch), 0), P11A_TLS_RAW);
	assert_string_equal(p11a_tlsclass_name(P11A_TLS_13_CLIENT), "tls1.3");
	assert_string_equal(p11a_tlsclass_name(P11A_TLS_13_SERVER), "tls1.3-server");
	assert_string_equal(p11a_tlsclass_name(P11A_TLS_12_CLIENT), "tls1.2");
	assert_string_equal(p11a_tlsclass_name(P11A_TLS_RAW), "raw");
	assert_string_equal(p11a_tlsclass_name(P11A_TLS_DIGEST), "digest");
	assert_false(p11a_tlsclass_is_client(P11A_TLS_RAW));
	assert_false(p11a_tlsclass_is_client(P11A_TLS_DIGEST));
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_captured),
		cmocka_unit_test(test_tls13_crafted),
		cmocka_unit_test(test_tls12_crafted),
		cmocka_unit_test(test_other),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
