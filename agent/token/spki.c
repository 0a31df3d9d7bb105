/*
 * SubjectPublicKeyInfo from the attribute values a token gives.  Pure
 * code: no PKCS#11 call, no token state.  See spki.h.
 */
#include "config.h"
#include "spki.h"
#include "p11a.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/x509.h>

static const uint8_t oid_p256[] = { 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07 };
static const uint8_t oid_p384[] = { 0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22 };
static const uint8_t oid_p521[] = { 0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23 };
static const uint8_t oid_ed25519[] = { 0x06, 0x03, 0x2b, 0x65, 0x70 };
/* GnuPG's pre-RFC 8410 Ed25519 curve OID 1.3.6.1.4.1.11591.15.1 */
static const uint8_t oid_ed25519_gnu[] = { 0x06, 0x09, 0x2b, 0x06, 0x01, 0x04, 0x01, 0xda, 0x47, 0x0f, 0x01 };
/* PrintableString "edwards25519", as SoftHSM2 writes for generated keys */
static const uint8_t str_ed25519[] = { 0x13, 0x0c, 'e', 'd', 'w', 'a', 'r', 'd', 's', '2', '5', '5', '1', '9' };

static const struct tok_curve curves[] = {
	{ oid_p256, sizeof(oid_p256), P11A_KEY_EC, "P-256", "prime256v1", 256, 32 },
	{ oid_p384, sizeof(oid_p384), P11A_KEY_EC, "P-384", "secp384r1", 384, 48 },
	{ oid_p521, sizeof(oid_p521), P11A_KEY_EC, "P-521", "secp521r1", 521, 66 },
	{ oid_ed25519, sizeof(oid_ed25519), P11A_KEY_ED25519, "Ed25519", NULL, ED25519_BITS, 32 },
	{ oid_ed25519_gnu, sizeof(oid_ed25519_gnu), P11A_KEY_ED25519, "Ed25519", NULL, ED25519_BITS, 32 },
	{ str_ed25519, sizeof(str_ed25519), P11A_KEY_ED25519, "Ed25519", NULL, ED25519_BITS, 32 },
};

const struct tok_curve *
tok_curve_by_params(const uint8_t *p, size_t n)
{
	for (size_t i = 0; i < sizeof(curves) / sizeof(curves[0]); i++) {
		if (curves[i].der_len == n && memcmp(curves[i].der, p, n) == 0)
			return &curves[i];
	}
	return NULL;
}

const struct tok_curve *
tok_curve_by_group(const char *group)
{
	for (size_t i = 0; i < sizeof(curves) / sizeof(curves[0]); i++) {
		if (curves[i].group != NULL && strcmp(curves[i].group, group) == 0)
			return &curves[i];
	}
	return NULL;
}

/*
 * CKA_EC_POINT is a DER OCTET STRING per the standard, but some modules
 * store the raw point.  Returns the raw point of a key on curve c.
 */
int
tok_ec_point_raw(const struct tok_curve *c, const uint8_t *p, size_t n, const uint8_t **pt,
		 size_t *pt_len)
{
	size_t l, hl;

	if (c->type == P11A_KEY_ED25519) {
		if (n == c->field_len) {
			*pt = p;
			*pt_len = n;
			return 0;
		}
	} else if ((n == 1 + 2 * c->field_len && p[0] == 0x04) ||
		   (n == 1 + c->field_len && (p[0] == 0x02 || p[0] == 0x03))) {
		*pt = p;
		*pt_len = n;
		return 0;
	}
	if (n < 2 || p[0] != 0x04)
		return -1;
	if (p[1] < 0x80) {
		l = p[1];
		hl = 2;
	} else if (p[1] == 0x81 && n >= 3) {
		l = p[2];
		hl = 3;
	} else if (p[1] == 0x82 && n >= 4) {
		l = ((size_t)p[2] << 8) | p[3];
		hl = 4;
	} else {
		return -1;
	}
	if (hl + l != n)
		return -1;
	if (c->type == P11A_KEY_ED25519 ? l != c->field_len :
	    !((l == 1 + 2 * c->field_len && p[hl] == 0x04) ||
	      (l == 1 + c->field_len && (p[hl] == 0x02 || p[hl] == 0x03))))
		return -1;
	*pt = p + hl;
	*pt_len = l;
	return 0;
}

int
tok_spki_of(EVP_PKEY *pk, uint8_t **out, size_t *out_len)
{
	unsigned char *der = NULL;
	int n;

	*out = NULL;
	*out_len = 0;
	if (pk == NULL)
		return -1;
	n = i2d_PUBKEY(pk, &der);
	if (n <= 0)
		return -1;
	*out = malloc((size_t)n);
	if (*out == NULL) {
		OPENSSL_free(der);
		return -1;
	}
	memcpy(*out, der, (size_t)n);
	*out_len = (size_t)n;
	OPENSSL_free(der);
	return 0;
}

static EVP_PKEY *
pkey_fromdata(const char *alg, OSSL_PARAM *params)
{
	EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(NULL, alg, NULL);
	EVP_PKEY *pk = NULL;

	if (ctx == NULL)
		return NULL;
	if (EVP_PKEY_fromdata_init(ctx) != 1 ||
	    EVP_PKEY_fromdata(ctx, &pk, EVP_PKEY_PUBLIC_KEY, params) != 1)
		pk = NULL;
	EVP_PKEY_CTX_free(ctx);
	return pk;
}

int
tok_spki_rsa(const uint8_t *mod, size_t mod_len, const uint8_t *exp, size_t exp_len,
	     uint8_t **out, size_t *out_len)
{
	OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
	OSSL_PARAM *params = NULL;
	BIGNUM *n = BN_bin2bn(mod, (int)mod_len, NULL);
	BIGNUM *e = BN_bin2bn(exp, (int)exp_len, NULL);
	EVP_PKEY *pk = NULL;
	int r = -1;

	*out = NULL;
	*out_len = 0;
	/* An empty or zero modulus or exponent is no key (OpenSSL would encode it). */
	if (bld == NULL || n == NULL || e == NULL || BN_is_zero(n) || BN_is_zero(e) ||
	    OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, n) != 1 ||
	    OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, e) != 1 ||
	    (params = OSSL_PARAM_BLD_to_param(bld)) == NULL)
		goto out;
	pk = pkey_fromdata("RSA", params);
	r = tok_spki_of(pk, out, out_len);
 out:
	EVP_PKEY_free(pk);
	OSSL_PARAM_free(params);
	OSSL_PARAM_BLD_free(bld);
	BN_free(n);
	BN_free(e);
	return r;
}

int
tok_spki_ec(const struct tok_curve *c, const uint8_t *pt, size_t pt_len, uint8_t **out,
	    size_t *out_len)
{
	EVP_PKEY *pk;
	int r;

	if (c->type == P11A_KEY_ED25519) {
		pk = EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, NULL, pt, pt_len);
	} else {
		OSSL_PARAM params[] = {
			OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, (char *)c->group, 0),
			OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, (void *)pt, pt_len),
			OSSL_PARAM_END
		};
		pk = pkey_fromdata("EC", params);
	}
	r = tok_spki_of(pk, out, out_len);
	EVP_PKEY_free(pk);
	return r;
}

uint32_t
tok_bits_of(const uint8_t *p, size_t n)
{
	while (n > 0 && *p == 0) {
		p++;
		n--;
	}
	if (n == 0)
		return 0;
	uint32_t bits = (uint32_t)(n - 1) * 8;
	for (uint8_t top = *p; top != 0; top >>= 1)
		bits++;
	return bits;
}
