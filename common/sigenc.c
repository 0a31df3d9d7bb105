/*
 * Signature encodings: hashing, DigestInfo, EMSA-PSS (RFC 8017 9.1.1),
 * ECDSA r||s <-> DER.
 */
#include "config.h"

#include <string.h>

#include <openssl/evp.h>
#include <openssl/rand.h>

#include "p11a.h"
#include "sigenc.h"

#define MOD_BITS_MIN	512
#define MOD_BITS_MAX	(P11A_SIG_MAX * 8)
#define EC_FIELD_MAX	66      /* P-521 */

const EVP_MD *
p11a_hash_md(int hash)
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

int
p11a_hash_data(int hash, const uint8_t *data, size_t len, uint8_t *out, size_t *out_len)
{
	const EVP_MD *md = p11a_hash_md(hash);
	unsigned int n = 0;

	*out_len = 0;
	if (md == NULL)
		return -P11A_E_BAD_REQUEST;
	if (data == NULL && len != 0)
		return -P11A_E_BAD_REQUEST;
	if (EVP_Digest(data == NULL ? (const void *)"" : data, len, out, &n, md, NULL) != 1)
		return -P11A_E_CRYPTO;
	*out_len = n;
	return 0;
}

/* DER of DigestInfo up to the digest's OCTET STRING contents (RFC 8017 9.2). */
static const uint8_t di_sha1[] = {
	0x30, 0x21, 0x30, 0x09, 0x06, 0x05, 0x2b, 0x0e, 0x03, 0x02, 0x1a,
	0x05, 0x00, 0x04, 0x14
};
static const uint8_t di_sha224[] = {
	0x30, 0x2d, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65,
	0x03, 0x04, 0x02, 0x04, 0x05, 0x00, 0x04, 0x1c
};
static const uint8_t di_sha256[] = {
	0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65,
	0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20
};
static const uint8_t di_sha384[] = {
	0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65,
	0x03, 0x04, 0x02, 0x02, 0x05, 0x00, 0x04, 0x30
};
static const uint8_t di_sha512[] = {
	0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65,
	0x03, 0x04, 0x02, 0x03, 0x05, 0x00, 0x04, 0x40
};

int
p11a_digestinfo(int hash, const uint8_t *digest, size_t digest_len,
		uint8_t *out, size_t out_size, size_t *out_len)
{
	const uint8_t *prefix;
	size_t plen;

	*out_len = 0;
	switch (hash) {
	case P11A_HASH_SHA1:	prefix = di_sha1; plen = sizeof(di_sha1); break;
	case P11A_HASH_SHA224:	prefix = di_sha224; plen = sizeof(di_sha224); break;
	case P11A_HASH_SHA256:	prefix = di_sha256; plen = sizeof(di_sha256); break;
	case P11A_HASH_SHA384:	prefix = di_sha384; plen = sizeof(di_sha384); break;
	case P11A_HASH_SHA512:	prefix = di_sha512; plen = sizeof(di_sha512); break;
	default:		return -P11A_E_BAD_REQUEST;
	}
	if (digest == NULL || digest_len != p11a_hash_len(hash))
		return -P11A_E_BAD_REQUEST;
	if (out_size < plen + digest_len)
		return -P11A_E_TOO_LARGE;
	memcpy(out, prefix, plen);
	memcpy(out + plen, digest, digest_len);
	*out_len = plen + digest_len;
	return 0;
}

long
p11a_pss_salt_len(int hash, uint32_t salt_len, unsigned mod_bits)
{
	size_t hlen = p11a_hash_len(hash);
	size_t em_len, room;

	if (hlen == 0)
		return -P11A_E_BAD_REQUEST;
	if (mod_bits < MOD_BITS_MIN || mod_bits > MOD_BITS_MAX)
		return -P11A_E_UNSUPPORTED;
	em_len = (mod_bits - 1 + 7) / 8;
	if (em_len < hlen + 2)
		return -P11A_E_BAD_REQUEST;     /* e.g. SHA-512 with a 512-bit key */
	room = em_len - hlen - 2;
	if (salt_len == P11A_PSS_SALT_DIGEST)
		salt_len = (uint32_t)hlen;
	else if (salt_len == P11A_PSS_SALT_MAX)
		salt_len = (uint32_t)room;
	if (salt_len > room)
		return -P11A_E_BAD_REQUEST;
	return (long)salt_len;
}

/* XORs MGF1(seed) over mask[0..mask_len) (RFC 8017 B.2.1). */
static int
mgf1_xor(const EVP_MD *md, const uint8_t *seed, size_t seed_len,
	 uint8_t *mask, size_t mask_len)
{
	EVP_MD_CTX *ctx = NULL;
	uint8_t t[EVP_MAX_MD_SIZE], c[4];
	unsigned int tlen;
	uint32_t counter;
	size_t done = 0, i, n;
	int r = -P11A_E_CRYPTO;

	if ((ctx = EVP_MD_CTX_new()) == NULL)
		return -P11A_E_NOMEM;
	for (counter = 0; done < mask_len; counter++) {
		c[0] = (uint8_t)(counter >> 24);
		c[1] = (uint8_t)(counter >> 16);
		c[2] = (uint8_t)(counter >> 8);
		c[3] = (uint8_t)counter;
		if (EVP_DigestInit_ex(ctx, md, NULL) != 1 ||
		    EVP_DigestUpdate(ctx, seed, seed_len) != 1 ||
		    EVP_DigestUpdate(ctx, c, sizeof(c)) != 1 ||
		    EVP_DigestFinal_ex(ctx, t, &tlen) != 1)
			goto out;
		n = mask_len - done < tlen ? mask_len - done : tlen;
		for (i = 0; i < n; i++)
			mask[done + i] ^= t[i];
		done += n;
	}
	r = 0;
 out:
	EVP_MD_CTX_free(ctx);
	return r;
}

int
p11a_pss_encode(int hash, int mgf1_hash, uint32_t salt_len,
		const uint8_t *mhash, size_t mhash_len, unsigned mod_bits,
		uint8_t *out, size_t out_size, size_t *out_len)
{
	static const uint8_t zeros[8];
	const EVP_MD *md = p11a_hash_md(hash), *mgf_md;
	EVP_MD_CTX *ctx = NULL;
	size_t k, em_len, hlen, db_len, ps_len;
	unsigned int h_out;
	uint8_t *em, *db, *h, *salt;
	long slen;
	int r;

	*out_len = 0;
	if (md == NULL)
		return -P11A_E_BAD_REQUEST;
	if (mgf1_hash == P11A_HASH_NONE)
		mgf1_hash = hash;
	if ((mgf_md = p11a_hash_md(mgf1_hash)) == NULL)
		return -P11A_E_BAD_REQUEST;
	hlen = p11a_hash_len(hash);
	if (mhash == NULL || mhash_len != hlen)
		return -P11A_E_BAD_REQUEST;
	if ((slen = p11a_pss_salt_len(hash, salt_len, mod_bits)) < 0)
		return (int)slen;
	k = (mod_bits + 7) / 8;
	if (out_size < k)
		return -P11A_E_TOO_LARGE;

	/*
	 * emBits = modBits - 1, so EM is one byte shorter than the modulus
	 * when modBits = 8n + 1; the block for raw RSA then starts with 0.
	 */
	em_len = (mod_bits - 1 + 7) / 8;
	memset(out, 0, k);
	em = out + (k - em_len);
	db_len = em_len - hlen - 1;
	db = em;
	h = em + db_len;
	ps_len = em_len - (size_t)slen - hlen - 2;
	salt = db + ps_len + 1;

	/* DB = PS || 0x01 || salt, built in place; H = Hash(0^8 || mHash || salt). */
	db[ps_len] = 0x01;
	if (slen > 0 && RAND_bytes(salt, (int)slen) != 1) {
		r = -P11A_E_CRYPTO;
		goto out;
	}
	if ((ctx = EVP_MD_CTX_new()) == NULL) {
		r = -P11A_E_NOMEM;
		goto out;
	}
	if (EVP_DigestInit_ex(ctx, md, NULL) != 1 ||
	    EVP_DigestUpdate(ctx, zeros, sizeof(zeros)) != 1 ||
	    EVP_DigestUpdate(ctx, mhash, mhash_len) != 1 ||
	    EVP_DigestUpdate(ctx, salt, (size_t)slen) != 1 ||
	    EVP_DigestFinal_ex(ctx, h, &h_out) != 1 || h_out != hlen) {
		r = -P11A_E_CRYPTO;
		goto out;
	}
	if ((r = mgf1_xor(mgf_md, h, hlen, db, db_len)) != 0)
		goto out;
	/* Clear the top 8*emLen - emBits bits so EM < 2^emBits. */
	db[0] &= (uint8_t)(0xFF >> (8 * em_len - (mod_bits - 1)));
	em[em_len - 1] = 0xbc;
	*out_len = k;
	r = 0;
 out:
	EVP_MD_CTX_free(ctx);
	if (r != 0)
		p11a_wipe(out, k);
	return r;
}

/* ------------------------------------------------------------ ECDSA */

/* Writes one minimal DER INTEGER for the unsigned big-endian v[0..n). */
static size_t
der_put_uint(uint8_t *p, const uint8_t *v, size_t n)
{
	size_t len, o = 0;

	while (n > 1 && v[0] == 0) {
		v++;
		n--;
	}
	len = n + ((v[0] & 0x80) ? 1 : 0);
	p[o++] = 0x02;
	p[o++] = (uint8_t)len;
	if (v[0] & 0x80)
		p[o++] = 0x00;
	memcpy(p + o, v, n);
	return o + n;
}

static size_t
der_uint_len(const uint8_t *v, size_t n)
{
	while (n > 1 && v[0] == 0) {
		v++;
		n--;
	}
	return 2 + n + ((v[0] & 0x80) ? 1 : 0);
}

int
p11a_ecdsa_raw_to_der(const uint8_t *raw, size_t raw_len,
		      uint8_t *out, size_t out_size, size_t *out_len)
{
	size_t half, lr, ls, body, total, o = 0;

	*out_len = 0;
	if (raw == NULL || raw_len == 0 || raw_len % 2 != 0 || raw_len / 2 > EC_FIELD_MAX)
		return -P11A_E_BAD_REQUEST;
	half = raw_len / 2;
	lr = der_uint_len(raw, half);
	ls = der_uint_len(raw + half, half);
	body = lr + ls;     /* <= 2 * (2 + 67): fits the one-byte long form */
	total = (body < 0x80 ? 2 : 3) + body;
	if (out_size < total)
		return -P11A_E_TOO_LARGE;
	out[o++] = 0x30;
	if (body >= 0x80)
		out[o++] = 0x81;
	out[o++] = (uint8_t)body;
	o += der_put_uint(out + o, raw, half);
	o += der_put_uint(out + o, raw + half, half);
	*out_len = o;
	return 0;
}

/*
 * Reads one DER INTEGER at der[*pos..end) into out[0..field_len),
 * right-aligned.  Only the strict minimal, non-negative form is accepted.
 */
static int
der_get_uint(const uint8_t *der, size_t *pos, size_t end, uint8_t *out, size_t field_len)
{
	size_t p = *pos, len;

	if (end - p < 2 || der[p] != 0x02)
		return -P11A_E_MALFORMED;
	len = der[p + 1];
	p += 2;
	/* Integers here are < 128 bytes, so only the short form is minimal. */
	if (len == 0 || len >= 0x80 || end - p < len)
		return -P11A_E_MALFORMED;
	if (der[p] & 0x80)
		return -P11A_E_MALFORMED;     /* negative */
	if (der[p] == 0 && len > 1) {
		if (!(der[p + 1] & 0x80))
			return -P11A_E_MALFORMED;     /* superfluous leading zero */
		p++;
		len--;
	}
	if (len > field_len)
		return -P11A_E_MALFORMED;     /* bigger than the curve allows */
	memset(out, 0, field_len - len);
	memcpy(out + field_len - len, der + p, len);
	*pos = p + len;
	return 0;
}

int
p11a_ecdsa_der_to_raw(const uint8_t *der, size_t der_len, size_t field_len,
		      uint8_t *out, size_t out_size, size_t *out_len)
{
	size_t pos = 0, body;
	int r;

	*out_len = 0;
	if (field_len == 0 || field_len > EC_FIELD_MAX)
		return -P11A_E_BAD_REQUEST;
	if (out_size < 2 * field_len)
		return -P11A_E_TOO_LARGE;
	if (der == NULL || der_len < 2 || der[0] != 0x30)
		return -P11A_E_MALFORMED;
	body = der[1];
	pos = 2;
	if (body == 0x81) {
		if (der_len < 3 || der[2] < 0x80)
			return -P11A_E_MALFORMED;     /* long form where short suffices */
		body = der[2];
		pos = 3;
	} else if (body >= 0x80) {
		return -P11A_E_MALFORMED;     /* indefinite or needlessly long */
	}
	if (der_len - pos != body)
		return -P11A_E_MALFORMED;     /* cut short or trailing bytes */
	if ((r = der_get_uint(der, &pos, der_len, out, field_len)) != 0 ||
	    (r = der_get_uint(der, &pos, der_len, out + field_len, field_len)) != 0)
		goto fail;
	if (pos != der_len) {
		r = -P11A_E_MALFORMED;
		goto fail;
	}
	*out_len = 2 * field_len;
	return 0;
 fail:
	memset(out, 0, 2 * field_len);
	return r;
}
