/*
 * Unit tests for common/sigenc.c, checked against OpenSSL.
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
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/objects.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "p11a.h"
#include "sigenc.h"

static const int all_hashes[] = {
	P11A_HASH_SHA1, P11A_HASH_SHA224, P11A_HASH_SHA256,
	P11A_HASH_SHA384, P11A_HASH_SHA512
};
#define NHASHES (sizeof(all_hashes) / sizeof(all_hashes[0]))

static const EVP_MD *
md_of(int hash)
{
	switch (hash) {
	case P11A_HASH_SHA1:	return EVP_sha1();
	case P11A_HASH_SHA224:	return EVP_sha224();
	case P11A_HASH_SHA256:	return EVP_sha256();
	case P11A_HASH_SHA384:	return EVP_sha384();
	case P11A_HASH_SHA512:	return EVP_sha512();
	default:		return NULL;
	}
}

static int
nid_of(int hash)
{
	return EVP_MD_get_type(md_of(hash));
}

/* ------------------------------------------------------------ hashing */

static void
test_hash_data(void **state)
{
	static const uint8_t abc_sha256[32] = {
		0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde,
		0x5d, 0xae, 0x22, 0x23, 0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c,
		0xb4, 0x10, 0xff, 0x61, 0xf2, 0x00, 0x15, 0xad
	};
	uint8_t out[64], ref[64];
	unsigned int rlen;
	size_t n, i;

	assert_int_equal(p11a_hash_data(P11A_HASH_SHA256, (const uint8_t *)"abc", 3, out, &n), 0);
	assert_int_equal(n, 32);
	assert_memory_equal(out, abc_sha256, 32);
	for (i = 0; i < NHASHES; i++) {
		assert_int_equal(p11a_hash_data(all_hashes[i], (const uint8_t *)"xyz", 3, out, &n), 0);
		assert_int_equal(n, p11a_hash_len(all_hashes[i]));
		assert_int_equal(EVP_Digest("xyz", 3, ref, &rlen, md_of(all_hashes[i]), NULL), 1);
		assert_int_equal(rlen, n);
		assert_memory_equal(out, ref, n);
	}
	assert_int_equal(p11a_hash_data(P11A_HASH_SHA1, NULL, 0, out, &n), 0);
	assert_int_equal(n, 20);
	assert_int_equal(p11a_hash_data(P11A_HASH_NONE, (const uint8_t *)"a", 1, out, &n),
	    -P11A_E_BAD_REQUEST);
	assert_int_equal(p11a_hash_data(9, (const uint8_t *)"a", 1, out, &n), -P11A_E_BAD_REQUEST);
}

/* ------------------------------------------------------------ DigestInfo */

/* DigestInfo built by OpenSSL's ASN.1 code, independently of our table. */
static int
openssl_digestinfo(int hash, const uint8_t *d, size_t dlen, uint8_t **out)
{
	X509_SIG *sig = X509_SIG_new();
	X509_ALGOR *alg;
	ASN1_OCTET_STRING *oct;
	int n;

	X509_SIG_getm(sig, &alg, &oct);
	X509_ALGOR_set0(alg, OBJ_nid2obj(nid_of(hash)), V_ASN1_NULL, NULL);
	ASN1_OCTET_STRING_set(oct, d, (int)dlen);
	*out = NULL;
	n = i2d_X509_SIG(sig, out);
	X509_SIG_free(sig);
	return n;
}

static void
test_digestinfo_prefixes(void **state)
{
	/* RFC 8017 section 9.2, note 1. */
	static const char *const prefixes[] = {
		"3021300906052b0e03021a05000414",
		"302d300d06096086480165030402040500041c",
		"3031300d060960864801650304020105000420",
		"3041300d060960864801650304020205000430",
		"3051300d060960864801650304020305000440",
	};
	uint8_t digest[64], out[19 + 64], want[19];
	size_t i, j, n, plen;

	for (i = 0; i < sizeof(digest); i++)
		digest[i] = (uint8_t)(0xa0 + i);
	for (i = 0; i < NHASHES; i++) {
		int h = all_hashes[i];
		size_t dlen = p11a_hash_len(h);
		uint8_t *ref;
		int rlen;

		plen = strlen(prefixes[i]) / 2;
		for (j = 0; j < plen; j++) {
			unsigned int byte;

			sscanf(prefixes[i] + 2 * j, "%2x", &byte);
			want[j] = (uint8_t)byte;
		}
		assert_int_equal(p11a_digestinfo(h, digest, dlen, out, sizeof(out), &n), 0);
		assert_int_equal(n, plen + dlen);
		assert_memory_equal(out, want, plen);
		assert_memory_equal(out + plen, digest, dlen);

		rlen = openssl_digestinfo(h, digest, dlen, &ref);
		assert_int_equal((size_t)rlen, n);
		assert_memory_equal(out, ref, n);
		OPENSSL_free(ref);

		/* Wrong digest length, short output. */
		assert_int_equal(p11a_digestinfo(h, digest, dlen - 1, out, sizeof(out), &n),
		    -P11A_E_BAD_REQUEST);
		assert_int_equal(p11a_digestinfo(h, digest, dlen + 1, out, sizeof(out), &n),
		    -P11A_E_BAD_REQUEST);
		assert_true(p11a_digestinfo(h, digest, dlen, out, plen + dlen - 1, &n) < 0);
	}
	assert_int_equal(p11a_digestinfo(P11A_HASH_NONE, digest, 0, out, sizeof(out), &n),
	    -P11A_E_BAD_REQUEST);
}

/* ------------------------------------------------------------ RSA keys */

struct keys {
	EVP_PKEY *rsa2048;
	EVP_PKEY *rsa2047;
	EVP_PKEY *rsa2049;
	EVP_PKEY *rsa1024;
};

static int
setup_keys(void **state)
{
	struct keys *k = calloc(1, sizeof(*k));

	if (k == NULL)
		return -1;
	k->rsa2048 = EVP_RSA_gen(2048);
	k->rsa2047 = EVP_RSA_gen(2047);
	k->rsa2049 = EVP_RSA_gen(2049);
	k->rsa1024 = EVP_RSA_gen(1024);
	if (!k->rsa2048 || !k->rsa2047 || !k->rsa2049 || !k->rsa1024)
		return -1;
	*state = k;
	return 0;
}

static int
teardown_keys(void **state)
{
	struct keys *k = *state;

	EVP_PKEY_free(k->rsa2048);
	EVP_PKEY_free(k->rsa2047);
	EVP_PKEY_free(k->rsa2049);
	EVP_PKEY_free(k->rsa1024);
	free(k);
	return 0;
}

/* Raw RSA private operation on a k-byte block, as CKM_RSA_X_509 does. */
static size_t
rsa_raw_sign(EVP_PKEY *pkey, const uint8_t *block, size_t len, uint8_t *sig, size_t sig_size)
{
	EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(pkey, NULL);
	size_t n = sig_size;

	assert_non_null(ctx);
	assert_int_equal(EVP_PKEY_sign_init(ctx), 1);
	assert_int_equal(EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_NO_PADDING), 1);
	assert_int_equal(EVP_PKEY_sign(ctx, sig, &n, block, len), 1);
	EVP_PKEY_CTX_free(ctx);
	return n;
}

static int
pss_verify(EVP_PKEY *pkey, int hash, int mgf1, int salt, const uint8_t *mhash, size_t mlen,
	   const uint8_t *sig, size_t sig_len)
{
	EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(pkey, NULL);
	int r;

	assert_non_null(ctx);
	assert_int_equal(EVP_PKEY_verify_init(ctx), 1);
	assert_int_equal(EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_PSS_PADDING), 1);
	assert_int_equal(EVP_PKEY_CTX_set_signature_md(ctx, md_of(hash)), 1);
	assert_int_equal(EVP_PKEY_CTX_set_rsa_mgf1_md(ctx, md_of(mgf1)), 1);
	assert_int_equal(EVP_PKEY_CTX_set_rsa_pss_saltlen(ctx, salt), 1);
	r = EVP_PKEY_verify(ctx, sig, sig_len, mhash, mlen);
	EVP_PKEY_CTX_free(ctx);
	return r;
}

static void
check_pss(EVP_PKEY *pkey, int hash, int mgf1, uint32_t salt_len)
{
	unsigned bits = (unsigned)EVP_PKEY_get_bits(pkey);
	size_t k = (bits + 7) / 8, n, sig_len, mlen;
	uint8_t mhash[64], block[512], sig[512];
	long slen;

	assert_int_equal(p11a_hash_data(hash, (const uint8_t *)"message", 7, mhash, &mlen), 0);
	slen = p11a_pss_salt_len(hash, salt_len, bits);
	assert_true(slen >= 0);
	assert_int_equal(p11a_pss_encode(hash, mgf1, salt_len, mhash, mlen, bits,
	    block, sizeof(block), &n), 0);
	assert_int_equal(n, k);
	/* The block must be below the modulus: top bits clear. */
	if (bits % 8 == 1)
		assert_int_equal(block[0], 0);
	sig_len = rsa_raw_sign(pkey, block, n, sig, sizeof(sig));
	assert_int_equal(sig_len, k);
	assert_int_equal(pss_verify(pkey, hash, mgf1 == P11A_HASH_NONE ? hash : mgf1,
	    (int)slen, mhash, mlen, sig, sig_len), 1);
	/* And it is not a verifier that accepts anything. */
	mhash[0] ^= 1;
	assert_int_not_equal(pss_verify(pkey, hash, mgf1 == P11A_HASH_NONE ? hash : mgf1,
	    (int)slen, mhash, mlen, sig, sig_len), 1);
}

static void
test_pss_verifies(void **state)
{
	struct keys *k = *state;
	EVP_PKEY *keys[] = { k->rsa2048, k->rsa2047, k->rsa2049 };
	const uint32_t salts[] = { 0, 20, 32, P11A_PSS_SALT_DIGEST, P11A_PSS_SALT_MAX };
	size_t i, j, s;

	for (i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
		for (j = 0; j < NHASHES; j++) {
			for (s = 0; s < sizeof(salts) / sizeof(salts[0]); s++)
				check_pss(keys[i], all_hashes[j], P11A_HASH_NONE, salts[s]);
		}
	}
	/* MGF1 with a different hash than the message hash. */
	check_pss(k->rsa2048, P11A_HASH_SHA256, P11A_HASH_SHA1, P11A_PSS_SALT_DIGEST);
	check_pss(k->rsa2047, P11A_HASH_SHA384, P11A_HASH_SHA512, 0);
	check_pss(k->rsa2049, P11A_HASH_SHA512, P11A_HASH_SHA224, P11A_PSS_SALT_MAX);
	/* A small key with the largest hash and salt. */
	check_pss(k->rsa1024, P11A_HASH_SHA512, P11A_HASH_NONE, P11A_PSS_SALT_MAX);
	check_pss(k->rsa1024, P11A_HASH_SHA384, P11A_HASH_NONE, P11A_PSS_SALT_DIGEST);
	/* 64 + 64 + 2 > 128: a digest-length salt does not fit. */
	assert_int_equal(p11a_pss_salt_len(P11A_HASH_SHA512, P11A_PSS_SALT_DIGEST, 1024),
	    -P11A_E_BAD_REQUEST);
}

static void
test_pss_salt_len(void **state)
{
	uint8_t mhash[64] = { 0 }, out[512];
	size_t n;

	assert_int_equal(p11a_pss_salt_len(P11A_HASH_SHA256, P11A_PSS_SALT_DIGEST, 2048), 32);
	assert_int_equal(p11a_pss_salt_len(P11A_HASH_SHA256, P11A_PSS_SALT_MAX, 2048), 256 - 32 - 2);
	assert_int_equal(p11a_pss_salt_len(P11A_HASH_SHA256, P11A_PSS_SALT_MAX, 2047), 256 - 32 - 2);
	/* emBits = 2048 for a 2049-bit modulus: still 256 bytes of EM. */
	assert_int_equal(p11a_pss_salt_len(P11A_HASH_SHA256, P11A_PSS_SALT_MAX, 2049), 256 - 32 - 2);
	assert_int_equal(p11a_pss_salt_len(P11A_HASH_SHA256, P11A_PSS_SALT_MAX, 2041), 255 - 32 - 2);
	assert_int_equal(p11a_pss_salt_len(P11A_HASH_SHA512, P11A_PSS_SALT_MAX, 1024), 128 - 64 - 2);
	assert_int_equal(p11a_pss_salt_len(P11A_HASH_SHA1, 17, 1024), 17);
	assert_int_equal(p11a_pss_salt_len(P11A_HASH_SHA512, 63, 1024), -P11A_E_BAD_REQUEST);
	assert_int_equal(p11a_pss_salt_len(P11A_HASH_SHA512, P11A_PSS_SALT_MAX, 512), -P11A_E_BAD_REQUEST);
	assert_true(p11a_pss_salt_len(P11A_HASH_NONE, 0, 2048) < 0);
	assert_true(p11a_pss_salt_len(P11A_HASH_SHA256, 0, 100) < 0);

	/* Encode refuses bad input. */
	assert_int_equal(p11a_pss_encode(P11A_HASH_SHA256, 0, 0, mhash, 31, 2048, out, sizeof(out), &n),
	    -P11A_E_BAD_REQUEST);
	assert_int_equal(p11a_pss_encode(P11A_HASH_NONE, 0, 0, mhash, 0, 2048, out, sizeof(out), &n),
	    -P11A_E_BAD_REQUEST);
	assert_int_equal(p11a_pss_encode(P11A_HASH_SHA256, 9, 0, mhash, 32, 2048, out, sizeof(out), &n),
	    -P11A_E_BAD_REQUEST);
	assert_true(p11a_pss_encode(P11A_HASH_SHA256, 0, 0, mhash, 32, 2048, out, 255, &n) < 0);
	assert_true(p11a_pss_encode(P11A_HASH_SHA512, 0, 100, mhash, 64, 1024, out, sizeof(out), &n) < 0);
}

static void
test_pss_randomized(void **state)
{
	uint8_t mhash[32] = { 1, 2, 3 }, a[256], b[256];
	size_t n;

	assert_int_equal(p11a_pss_encode(P11A_HASH_SHA256, 0, 32, mhash, 32, 2048, a, sizeof(a), &n), 0);
	assert_int_equal(p11a_pss_encode(P11A_HASH_SHA256, 0, 32, mhash, 32, 2048, b, sizeof(b), &n), 0);
	assert_memory_not_equal(a, b, sizeof(a));
	assert_int_equal(a[255], 0xbc);
	/* No salt: deterministic. */
	assert_int_equal(p11a_pss_encode(P11A_HASH_SHA256, 0, 0, mhash, 32, 2048, a, sizeof(a), &n), 0);
	assert_int_equal(p11a_pss_encode(P11A_HASH_SHA256, 0, 0, mhash, 32, 2048, b, sizeof(b), &n), 0);
	assert_memory_equal(a, b, sizeof(a));
	/* emBits = 2047: the top bit of EM is clear. */
	assert_int_equal(a[0] & 0x80, 0);
}

static void
test_pkcs1_digestinfo_verifies(void **state)
{
	struct keys *k = *state;
	uint8_t digest[64], di[19 + 64], sig[256];
	size_t i, dlen, dilen, sig_len;
	EVP_PKEY_CTX *ctx;

	for (i = 0; i < NHASHES; i++) {
		int h = all_hashes[i];

		assert_int_equal(p11a_hash_data(h, (const uint8_t *)"m", 1, digest, &dlen), 0);
		assert_int_equal(p11a_digestinfo(h, digest, dlen, di, sizeof(di), &dilen), 0);
		/* CKM_RSA_PKCS over the DigestInfo: PKCS#1 padding, no md. */
		ctx = EVP_PKEY_CTX_new(k->rsa2048, NULL);
		assert_non_null(ctx);
		assert_int_equal(EVP_PKEY_sign_init(ctx), 1);
		assert_int_equal(EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_PADDING), 1);
		sig_len = sizeof(sig);
		assert_int_equal(EVP_PKEY_sign(ctx, sig, &sig_len, di, dilen), 1);
		EVP_PKEY_CTX_free(ctx);

		ctx = EVP_PKEY_CTX_new(k->rsa2048, NULL);
		assert_non_null(ctx);
		assert_int_equal(EVP_PKEY_verify_init(ctx), 1);
		assert_int_equal(EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_PADDING), 1);
		assert_int_equal(EVP_PKEY_CTX_set_signature_md(ctx, md_of(h)), 1);
		assert_int_equal(EVP_PKEY_verify(ctx, sig, sig_len, digest, dlen), 1);
		EVP_PKEY_CTX_free(ctx);
	}
}

/* ------------------------------------------------------------ ECDSA */

static void
hex(const char *s, uint8_t *out, size_t *n)
{
	size_t i, len = strlen(s) / 2;

	for (i = 0; i < len; i++) {
		unsigned int byte;

		sscanf(s + 2 * i, "%2x", &byte);
		out[i] = (uint8_t)byte;
	}
	*n = len;
}

static void
test_ecdsa_raw_to_der_vectors(void **state)
{
	static const struct {
		const char *raw;
		const char *der;
	} v[] = {
		/* small values, leading zeros stripped */
		{ "00000001" "00000002", "3006020101020102" },
		/* high bit set: a 0x00 is prepended */
		{ "80000000" "7fffffff", "300d0205008000000002047fffffff" },
		/* zero */
		{ "00000000" "00000000", "3006020100020100" },
		/* zero followed by a high-bit byte keeps one zero */
		{ "00ff0000" "000080ff", "300b020400ff000002030080ff" },
	};
	uint8_t raw[200], der[200], want[200], back[200];
	size_t i, rlen, dlen, wlen, blen;

	for (i = 0; i < sizeof(v) / sizeof(v[0]); i++) {
		hex(v[i].raw, raw, &rlen);
		hex(v[i].der, want, &wlen);
		assert_int_equal(p11a_ecdsa_raw_to_der(raw, rlen, der, sizeof(der), &dlen), 0);
		assert_int_equal(dlen, wlen);
		assert_memory_equal(der, want, wlen);
		assert_int_equal(p11a_ecdsa_der_to_raw(der, dlen, rlen / 2, back, sizeof(back), &blen), 0);
		assert_int_equal(blen, rlen);
		assert_memory_equal(back, raw, rlen);
	}
	/* Odd length, empty, output too small. */
	assert_true(p11a_ecdsa_raw_to_der(raw, 63, der, sizeof(der), &dlen) < 0);
	assert_true(p11a_ecdsa_raw_to_der(raw, 0, der, sizeof(der), &dlen) < 0);
	hex("8000000080000000", raw, &rlen);
	assert_true(p11a_ecdsa_raw_to_der(raw, rlen, der, 15, &dlen) < 0);
	assert_int_equal(p11a_ecdsa_raw_to_der(raw, rlen, der, 16, &dlen), 0);
	/* The field is too small for the integer in the DER. */
	assert_true(p11a_ecdsa_der_to_raw(der, dlen, 3, back, sizeof(back), &blen) < 0);
	/* Output too small for 2 * field_len. */
	assert_true(p11a_ecdsa_der_to_raw(der, dlen, 4, back, 7, &blen) < 0);
}

static void
test_ecdsa_roundtrip_random(void **state)
{
	const size_t fields[] = { 32, 48, 66 };
	uint8_t raw[132], der[200], back[132];
	size_t f, i, dlen, blen;

	for (f = 0; f < 3; f++) {
		size_t fl = fields[f];

		for (i = 0; i < 200; i++) {
			assert_int_equal(RAND_bytes(raw, (int)(2 * fl)), 1);
			/* Exercise leading zeros and high bits. */
			if (i % 4 == 1)
				memset(raw, 0, i % 17);
			if (i % 4 == 2)
				raw[fl] |= 0x80;
			if (i % 4 == 3)
				memset(raw + fl, 0, 1 + i % 9);
			if (fl == 66) {
				raw[0] &= 1;   /* P-521 values are 521 bits */
				raw[fl] &= 1;
			}
			assert_int_equal(p11a_ecdsa_raw_to_der(raw, 2 * fl, der, sizeof(der), &dlen), 0);
			assert_int_equal(der[0], 0x30);
			assert_int_equal(p11a_ecdsa_der_to_raw(der, dlen, fl, back, sizeof(back), &blen), 0);
			assert_int_equal(blen, 2 * fl);
			assert_memory_equal(back, raw, 2 * fl);
			/* OpenSSL reads our DER and writes the same bytes back. */
			{
				const unsigned char *p = der;
				ECDSA_SIG *s = d2i_ECDSA_SIG(NULL, &p, (long)dlen);
				unsigned char *re = NULL;
				int relen;

				assert_non_null(s);
				relen = i2d_ECDSA_SIG(s, &re);
				assert_int_equal((size_t)relen, dlen);
				assert_memory_equal(re, der, dlen);
				OPENSSL_free(re);
				ECDSA_SIG_free(s);
			}
		}
	}
}

static void
test_ecdsa_der_malformed(void **state)
{
	static const char *const bad[] = {
		"",                                 /* empty */
		"30",                               /* no length */
		"3106020101020102",                 /* SET, not SEQUENCE */
		"3006020101020102" "00",            /* trailing byte */
		"3007020101020102",                 /* length runs past the end */
		"3005020101020102",                 /* length too short */
		"308106020101020102",               /* long form where short suffices */
		"30820006020101020102",             /* two-byte length */
		"3080020101020102" "0000",          /* indefinite length */
		"3006030101020102",                 /* BIT STRING, not INTEGER */
		"3006020101040102",                 /* second not INTEGER */
		"300602010102018f",                 /* negative s */
		"3006020181020101",                 /* negative r */
		"300702020001020101",               /* superfluous leading zero */
		"3005020002020101",                 /* zero-length INTEGER */
		"3003020101",                       /* only one INTEGER */
		"3009020101020102020103",           /* three INTEGERs */
		"300802810101020102",               /* long-form INTEGER length */
		"3008020101020102" "0000",          /* extra bytes inside SEQUENCE */
		/* r is 33 bytes without a sign byte: too big for 32 */
		"3026" "0221" "01" "0000000000000000000000000000000000000000000000000000000000000000"
		"020101",
	};
	uint8_t der[200], out[132];
	size_t i, dlen, olen;

	for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		int r;

		hex(bad[i], der, &dlen);
		r = p11a_ecdsa_der_to_raw(der, dlen, 32, out, sizeof(out), &olen);
		if (r != -P11A_E_MALFORMED)
			print_error("case %zu (%s) gave %d\n", i, bad[i], r);
		assert_int_equal(r, -P11A_E_MALFORMED);
		assert_int_equal(olen, 0);
	}
	/* A needed sign byte is fine. */
	hex("3007020200ff020101", der, &dlen);
	assert_int_equal(p11a_ecdsa_der_to_raw(der, dlen, 32, out, sizeof(out), &olen), 0);
	assert_int_equal(out[31], 0xff);
	/* 33 bytes with a sign byte is fine for a 32-byte field. */
	hex("3026" "0221" "00ff00000000000000000000000000000000000000000000000000000000000000"
	    "020101", der, &dlen);
	assert_int_equal(p11a_ecdsa_der_to_raw(der, dlen, 32, out, sizeof(out), &olen), 0);
	assert_int_equal(out[0], 0xff);
	assert_int_equal(out[63], 1);
	/* P-521 signatures need the 0x81 long form. */
	{
		uint8_t raw[132];

		memset(raw, 0xff, sizeof(raw));
		raw[0] = 1;
		raw[66] = 1;
		assert_int_equal(p11a_ecdsa_raw_to_der(raw, 132, der, sizeof(der), &dlen), 0);
		assert_int_equal(der[1], 0x81);
		assert_int_equal(p11a_ecdsa_der_to_raw(der, dlen, 66, out, sizeof(out), &olen), 0);
		assert_memory_equal(out, raw, 132);
	}
}

static void
ecdsa_real(const char *curve, int hash, size_t field)
{
	EVP_PKEY *pkey = EVP_EC_gen(curve);
	EVP_PKEY_CTX *ctx;
	uint8_t digest[64], der[200], raw[132], der2[200];
	size_t dlen, der_len, raw_len, der2_len;
	int i;

	assert_non_null(pkey);
	assert_int_equal(p11a_hash_data(hash, (const uint8_t *)"to be signed", 12, digest, &dlen), 0);
	for (i = 0; i < 20; i++) {
		ctx = EVP_PKEY_CTX_new(pkey, NULL);
		assert_non_null(ctx);
		assert_int_equal(EVP_PKEY_sign_init(ctx), 1);
		der_len = sizeof(der);
		assert_int_equal(EVP_PKEY_sign(ctx, der, &der_len, digest, dlen), 1);
		EVP_PKEY_CTX_free(ctx);

		/* OpenSSL DER -> raw, compared with OpenSSL's own parse. */
		assert_int_equal(p11a_ecdsa_der_to_raw(der, der_len, field, raw, sizeof(raw), &raw_len), 0);
		assert_int_equal(raw_len, 2 * field);
		{
			const unsigned char *p = der;
			ECDSA_SIG *s = d2i_ECDSA_SIG(NULL, &p, (long)der_len);
			uint8_t ref[132];

			assert_non_null(s);
			assert_int_equal(BN_bn2binpad(ECDSA_SIG_get0_r(s), ref, (int)field), (int)field);
			assert_int_equal(BN_bn2binpad(ECDSA_SIG_get0_s(s), ref + field, (int)field), (int)field);
			assert_memory_equal(raw, ref, 2 * field);
			ECDSA_SIG_free(s);
		}
		/* raw -> DER is byte-identical and verifies. */
		assert_int_equal(p11a_ecdsa_raw_to_der(raw, raw_len, der2, sizeof(der2), &der2_len), 0);
		assert_int_equal(der2_len, der_len);
		assert_memory_equal(der2, der, der_len);
		ctx = EVP_PKEY_CTX_new(pkey, NULL);
		assert_non_null(ctx);
		assert_int_equal(EVP_PKEY_verify_init(ctx), 1);
		assert_int_equal(EVP_PKEY_verify(ctx, der2, der2_len, digest, dlen), 1);
		EVP_PKEY_CTX_free(ctx);
	}
	EVP_PKEY_free(pkey);
}

static void
test_ecdsa_openssl(void **state)
{
	ecdsa_real("P-256", P11A_HASH_SHA256, 32);
	ecdsa_real("P-384", P11A_HASH_SHA384, 48);
	ecdsa_real("P-521", P11A_HASH_SHA512, 66);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_hash_data),
		cmocka_unit_test(test_digestinfo_prefixes),
		cmocka_unit_test(test_pkcs1_digestinfo_verifies),
		cmocka_unit_test(test_pss_verifies),
		cmocka_unit_test(test_pss_salt_len),
		cmocka_unit_test(test_pss_randomized),
		cmocka_unit_test(test_ecdsa_raw_to_der_vectors),
		cmocka_unit_test(test_ecdsa_roundtrip_random),
		cmocka_unit_test(test_ecdsa_der_malformed),
		cmocka_unit_test(test_ecdsa_openssl),
	};

	return cmocka_run_group_tests_name("sigenc", tests, setup_keys, teardown_keys);
}
