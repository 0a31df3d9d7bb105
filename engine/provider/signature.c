/*
 * Signatures by the agent: RSA PKCS#1 v1.5, RSA-PSS, ECDSA (DER out) and
 * Ed25519.
 *
 * digest-sign (TLS CertificateVerify, X.509 signing, `openssl dgst`)
 * gathers the message with common/sigin.h and sends it whole (SIGN input
 * MESSAGE), so the agent hashes and sees what it signs.  A message longer
 * than P11A_SIGN_MSG_MAX is hashed here instead and sent as DIGEST (RSA
 * and ECDSA only: Ed25519 signs the message itself).  sign (EVP_PKEY_sign, e.g. pkeyutl
 * -sign) receives a digest and sends DIGEST, or RAW for PKCS#1 v1.5
 * without a digest name.
 */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/core_names.h>
#include <openssl/asn1.h>
#include <openssl/evp.h>
#include <openssl/obj_mac.h>
#include <openssl/objects.h>
#include <openssl/params.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "provider.h"
#include "hashalg.h"
#include "sigenc.h"
#include "sigin.h"

enum { OP_NONE = 0, OP_SIGN, OP_DIGEST_SIGN };

struct sig_ctx {
	struct p11agent_prov *prov;
	int family;                     /* key type of the algorithm: RSA, EC or ED25519 */
	struct p11agent_key *key;
	int op;
	int pad;                        /* RSA_PKCS1_PADDING or RSA_PKCS1_PSS_PADDING */
	int hash;                       /* enum p11a_hash; NONE = not set */
	int mgf1;                       /* NONE = same as hash */
	int saltlen;                    /* bytes, or RSA_PSS_SALTLEN_* */
	struct p11a_sigin in;           /* digest-sign: the message, or its digest past the cap */
};

static void *
sig_newctx(void *provctx, int family)
{
	struct p11agent_prov *p = provctx;
	struct sig_ctx *s;

	if ((s = calloc(1, sizeof(*s))) == NULL) {
		p11agent_raise(p, P11AGENT_R_INTERNAL, "p11agent: out of memory");
		return NULL;
	}
	s->prov = p;
	s->family = family;
	p11a_sigin_init(&s->in, P11A_HASH_NONE, NULL);
	return s;
}

static void *
rsa_newctx(void *provctx, const char *propq)
{
	return sig_newctx(provctx, P11AGENT_KT_RSA);
}

static void *
ecdsa_newctx(void *provctx, const char *propq)
{
	return sig_newctx(provctx, P11AGENT_KT_EC);
}

static void *
ed_newctx(void *provctx, const char *propq)
{
	return sig_newctx(provctx, P11AGENT_KT_ED25519);
}

static void
msg_reset(struct sig_ctx *s)
{
	p11a_sigin_clear(&s->in);
	p11a_sigin_init(&s->in, P11A_HASH_NONE, NULL);
}

static void
sig_freectx(void *ctx)
{
	struct sig_ctx *s = ctx;

	if (s == NULL)
		return;
	msg_reset(s);
	p11agent_key_unref(s->key);
	free(s);
}

static void *
sig_dupctx(void *ctx)
{
	struct sig_ctx *s = ctx, *d;

	if ((d = malloc(sizeof(*d))) == NULL)
		return NULL;
	*d = *s;
	if (p11a_sigin_copy(&d->in, &s->in) != 0) {
		free(d);
		return NULL;
	}
	p11agent_key_ref(d->key);
	return d;
}

static int
key_family(int type)
{
	return type == P11AGENT_KT_RSA_PSS ? P11AGENT_KT_RSA : type;
}

/* ================================================================ parameters */

static int
set_digest(struct sig_ctx *s, const char *name, int *out)
{
	const struct p11a_hashalg *a;

	if (name == NULL || *name == '\0') {
		*out = P11A_HASH_NONE;
		return 1;
	}
	if ((a = p11a_hashalg_by_name(name)) == NULL) {
		p11agent_raise(s->prov, P11AGENT_R_UNSUPPORTED,
			       "p11agent: digest %s is not supported (SHA-1 and SHA-2 only)", name);
		return 0;
	}
	*out = a->id;
	return 1;
}

static int
set_pad(struct sig_ctx *s, const OSSL_PARAM *p)
{
	int pad = 0;

	if (p->data_type == OSSL_PARAM_UTF8_STRING) {
		const char *v = p->data;

		if (v == NULL)
			return 0;
		if (strcmp(v, OSSL_PKEY_RSA_PAD_MODE_PKCSV15) == 0)
			pad = RSA_PKCS1_PADDING;
		else if (strcmp(v, OSSL_PKEY_RSA_PAD_MODE_PSS) == 0)
			pad = RSA_PKCS1_PSS_PADDING;
		else
			pad = -1;
	} else if (!OSSL_PARAM_get_int(p, &pad)) {
		return 0;
	}
	if (pad != RSA_PKCS1_PADDING && pad != RSA_PKCS1_PSS_PADDING) {
		p11agent_raise(s->prov, P11AGENT_R_UNSUPPORTED,
			       "p11agent: RSA padding mode %d is not supported (pkcs1 and pss only)", pad);
		return 0;
	}
	if (s->key != NULL && s->key->type == P11AGENT_KT_RSA_PSS && pad != RSA_PKCS1_PSS_PADDING) {
		p11agent_raise(s->prov, P11AGENT_R_UNSUPPORTED,
			       "p11agent: an RSA-PSS key signs only with PSS padding");
		return 0;
	}
	s->pad = pad;
	return 1;
}

static int
set_saltlen(struct sig_ctx *s, const OSSL_PARAM *p)
{
	int v = 0;

	if (p->data_type == OSSL_PARAM_UTF8_STRING) {
		const char *str = p->data;
		char *end;
		long l;

		if (str == NULL)
			return 0;
		if (strcmp(str, OSSL_PKEY_RSA_PSS_SALT_LEN_DIGEST) == 0) {
			v = RSA_PSS_SALTLEN_DIGEST;
		} else if (strcmp(str, OSSL_PKEY_RSA_PSS_SALT_LEN_MAX) == 0) {
			v = RSA_PSS_SALTLEN_MAX;
		} else if (strcmp(str, OSSL_PKEY_RSA_PSS_SALT_LEN_AUTO) == 0) {
			v = RSA_PSS_SALTLEN_AUTO;
		} else {
			l = strtol(str, &end, 10);
			if (*str == '\0' || *end != '\0' || l < RSA_PSS_SALTLEN_MAX || l > 4096) {
				p11agent_raise(s->prov, P11AGENT_R_BAD_PARAMETER,
					       "p11agent: bad PSS salt length '%s'", str);
				return 0;
			}
			v = (int)l;
		}
	} else if (!OSSL_PARAM_get_int(p, &v)) {
		return 0;
	}
	if (v < RSA_PSS_SALTLEN_MAX) {
		p11agent_raise(s->prov, P11AGENT_R_BAD_PARAMETER,
			       "p11agent: PSS salt length %d is not supported", v);
		return 0;
	}
	s->saltlen = v;
	return 1;
}

static int
sig_set_ctx_params(void *ctx, const OSSL_PARAM params[])
{
	struct sig_ctx *s = ctx;
	const OSSL_PARAM *p;
	int h;

	if (s == NULL)
		return 0;
	if (params == NULL)
		return 1;
	if ((p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_DIGEST)) != NULL) {
		const char *name = NULL;

		if (!OSSL_PARAM_get_utf8_string_ptr(p, &name) || !set_digest(s, name, &h))
			return 0;
		if (s->family == P11AGENT_KT_ED25519 && h != P11A_HASH_NONE) {
			p11agent_raise(s->prov, P11AGENT_R_UNSUPPORTED,
				       "p11agent: Ed25519 signs the message itself, without a digest");
			return 0;
		}
		/* The message buffer (or local hash) belongs to the digest it started with. */
		if (p11a_sigin_started(&s->in) && h != s->hash)
			return 0;
		s->hash = h;
	}
	if (s->family != P11AGENT_KT_RSA)
		return 1;
	if ((p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_PAD_MODE)) != NULL &&
	    !set_pad(s, p))
		return 0;
	if ((p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_PSS_SALTLEN)) != NULL &&
	    !set_saltlen(s, p))
		return 0;
	if ((p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_MGF1_DIGEST)) != NULL) {
		const char *name = NULL;

		if (!OSSL_PARAM_get_utf8_string_ptr(p, &name) || !set_digest(s, name, &h))
			return 0;
		s->mgf1 = h;
	}
	return 1;
}

static const OSSL_PARAM *
rsa_settable_ctx_params(void *ctx, void *provctx)
{
	static const OSSL_PARAM params[] = {
		OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, NULL, 0),
		OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PROPERTIES, NULL, 0),
		OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PAD_MODE, NULL, 0),
		OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_MGF1_DIGEST, NULL, 0),
		OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_MGF1_PROPERTIES, NULL, 0),
		OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PSS_SALTLEN, NULL, 0),
		OSSL_PARAM_END
	};

	return params;
}

static const OSSL_PARAM *
ecdsa_settable_ctx_params(void *ctx, void *provctx)
{
	static const OSSL_PARAM params[] = {
		OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, NULL, 0),
		OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PROPERTIES, NULL, 0),
		OSSL_PARAM_END
	};

	return params;
}

/*
 * RSASSA-PSS AlgorithmIdentifier (RFC 4055): the hash, MGF1 with its hash
 * and the salt length the agent will use; defaults (SHA-1, 20) omitted as
 * DER requires.
 */
static int
pss_algorithm_id(const struct sig_ctx *s, unsigned char **der, int *der_len)
{
	RSA_PSS_PARAMS *pss = NULL;
	X509_ALGOR *alg = NULL, *mgfmd = NULL;
	ASN1_STRING *params = NULL, *mgfparams = NULL;
	int mgf1 = s->mgf1 != P11A_HASH_NONE ? s->mgf1 : s->hash, ok = 0;
	long hlen = (long)p11a_hash_len(s->hash), salt;
	int bits = EVP_PKEY_get_bits(s->key->pub);

	if (p11a_hash_md(s->hash) == NULL || p11a_hash_md(mgf1) == NULL || bits <= 0)
		return 0;
	if (s->saltlen >= 0)
		salt = s->saltlen;
	else if (s->saltlen == RSA_PSS_SALTLEN_DIGEST)
		salt = hlen;
	else    /* max: emLen - hLen - 2, emLen = ceil((modBits - 1) / 8) */
		salt = (bits - 1 + 7) / 8 - hlen - 2;
	if (salt < 0 || (pss = RSA_PSS_PARAMS_new()) == NULL)
		return 0;
	if (s->hash != P11A_HASH_SHA1) {
		if ((pss->hashAlgorithm = X509_ALGOR_new()) == NULL)
			goto out;
		X509_ALGOR_set_md(pss->hashAlgorithm, p11a_hash_md(s->hash));
	}
	if (mgf1 != P11A_HASH_SHA1) {
		if ((mgfmd = X509_ALGOR_new()) == NULL)
			goto out;
		X509_ALGOR_set_md(mgfmd, p11a_hash_md(mgf1));
		if (ASN1_item_pack(mgfmd, ASN1_ITEM_rptr(X509_ALGOR), &mgfparams) == NULL ||
		    (pss->maskGenAlgorithm = X509_ALGOR_new()) == NULL ||
		    X509_ALGOR_set0(pss->maskGenAlgorithm, OBJ_nid2obj(NID_mgf1),
				    V_ASN1_SEQUENCE, mgfparams) != 1)
			goto out;
		mgfparams = NULL;
	}
	if (salt != 20) {
		if ((pss->saltLength = ASN1_INTEGER_new()) == NULL ||
		    ASN1_INTEGER_set(pss->saltLength, salt) != 1)
			goto out;
	}
	if (ASN1_item_pack(pss, ASN1_ITEM_rptr(RSA_PSS_PARAMS), &params) == NULL ||
	    (alg = X509_ALGOR_new()) == NULL ||
	    X509_ALGOR_set0(alg, OBJ_nid2obj(NID_rsassaPss), V_ASN1_SEQUENCE, params) != 1)
		goto out;
	params = NULL;
	if ((*der_len = i2d_X509_ALGOR(alg, der)) <= 0) {
		*der = NULL;
		goto out;
	}
	ok = 1;
out:
	ASN1_STRING_free(params);
	ASN1_STRING_free(mgfparams);
	X509_ALGOR_free(mgfmd);
	X509_ALGOR_free(alg);
	RSA_PSS_PARAMS_free(pss);
	return ok;
}

/* DER AlgorithmIdentifier of the signature, for X.509 signing.  0 when we cannot name it. */
static int
algorithm_id(const struct sig_ctx *s, unsigned char **der, int *der_len)
{
	static const struct {
		int family, hash, nid;
	} map[] = {
		{ P11AGENT_KT_RSA, P11A_HASH_SHA1, NID_sha1WithRSAEncryption },
		{ P11AGENT_KT_RSA, P11A_HASH_SHA224, NID_sha224WithRSAEncryption },
		{ P11AGENT_KT_RSA, P11A_HASH_SHA256, NID_sha256WithRSAEncryption },
		{ P11AGENT_KT_RSA, P11A_HASH_SHA384, NID_sha384WithRSAEncryption },
		{ P11AGENT_KT_RSA, P11A_HASH_SHA512, NID_sha512WithRSAEncryption },
		{ P11AGENT_KT_EC, P11A_HASH_SHA1, NID_ecdsa_with_SHA1 },
		{ P11AGENT_KT_EC, P11A_HASH_SHA224, NID_ecdsa_with_SHA224 },
		{ P11AGENT_KT_EC, P11A_HASH_SHA256, NID_ecdsa_with_SHA256 },
		{ P11AGENT_KT_EC, P11A_HASH_SHA384, NID_ecdsa_with_SHA384 },
		{ P11AGENT_KT_EC, P11A_HASH_SHA512, NID_ecdsa_with_SHA512 },
		{ P11AGENT_KT_ED25519, P11A_HASH_NONE, NID_ED25519 },
	};
	X509_ALGOR *alg;
	size_t i;
	int nid = NID_undef, ptype;

	*der = NULL;
	*der_len = 0;
	if (s->family == P11AGENT_KT_RSA && s->pad == RSA_PKCS1_PSS_PADDING)
		return pss_algorithm_id(s, der, der_len);
	for (i = 0; i < sizeof(map) / sizeof(map[0]); i++) {
		if (map[i].family == s->family && map[i].hash == s->hash)
			nid = map[i].nid;
	}
	if (nid == NID_undef || (alg = X509_ALGOR_new()) == NULL)
		return 0;
	ptype = s->family == P11AGENT_KT_RSA ? V_ASN1_NULL : V_ASN1_UNDEF;
	if (X509_ALGOR_set0(alg, OBJ_nid2obj(nid), ptype, NULL) != 1 ||
	    (*der_len = i2d_X509_ALGOR(alg, der)) <= 0) {
		X509_ALGOR_free(alg);
		*der = NULL;
		return 0;
	}
	X509_ALGOR_free(alg);
	return 1;
}

static int
sig_get_ctx_params(void *ctx, OSSL_PARAM params[])
{
	const struct p11a_hashalg *a;
	struct sig_ctx *s = ctx;
	OSSL_PARAM *p;

	if (s == NULL)
		return 0;
	if ((p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_ALGORITHM_ID)) != NULL) {
		unsigned char *der = NULL;
		int len = 0, ok;

		if (!algorithm_id(s, &der, &len)) {
			p11agent_raise(s->prov, P11AGENT_R_UNSUPPORTED,
				       "p11agent: no AlgorithmIdentifier for this %s signature",
				       p11agent_kt_name(s->family));
			return 0;
		}
		ok = OSSL_PARAM_set_octet_string(p, der, (size_t)len);
		OPENSSL_free(der);
		if (!ok)
			return 0;
	}
	if ((p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_DIGEST)) != NULL &&
	    !OSSL_PARAM_set_utf8_string(p, (a = p11a_hashalg_by_id(s->hash)) == NULL ? "" :
					a->ossl_name))
		return 0;
	if (s->family != P11AGENT_KT_RSA)
		return 1;
	if ((p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_PAD_MODE)) != NULL) {
		if (p->data_type == OSSL_PARAM_UTF8_STRING) {
			if (!OSSL_PARAM_set_utf8_string(p, s->pad == RSA_PKCS1_PSS_PADDING ?
							OSSL_PKEY_RSA_PAD_MODE_PSS :
							OSSL_PKEY_RSA_PAD_MODE_PKCSV15))
				return 0;
		} else if (!OSSL_PARAM_set_int(p, s->pad)) {
			return 0;
		}
	}
	if ((p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_PSS_SALTLEN)) != NULL) {
		if (p->data_type == OSSL_PARAM_UTF8_STRING) {
			char buf[16];
			const char *v = buf;

			if (s->saltlen == RSA_PSS_SALTLEN_DIGEST)
				v = OSSL_PKEY_RSA_PSS_SALT_LEN_DIGEST;
			else if (s->saltlen == RSA_PSS_SALTLEN_MAX)
				v = OSSL_PKEY_RSA_PSS_SALT_LEN_MAX;
			else if (s->saltlen == RSA_PSS_SALTLEN_AUTO)
				v = OSSL_PKEY_RSA_PSS_SALT_LEN_AUTO;
			else
				snprintf(buf, sizeof(buf), "%d", s->saltlen);
			if (!OSSL_PARAM_set_utf8_string(p, v))
				return 0;
		} else if (!OSSL_PARAM_set_int(p, s->saltlen)) {
			return 0;
		}
	}
	return 1;
}

static const OSSL_PARAM *
sig_gettable_ctx_params(void *ctx, void *provctx)
{
	static const OSSL_PARAM params[] = {
		OSSL_PARAM_octet_string(OSSL_SIGNATURE_PARAM_ALGORITHM_ID, NULL, 0),
		OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, NULL, 0),
		OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PAD_MODE, NULL, 0),
		OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PSS_SALTLEN, NULL, 0),
		OSSL_PARAM_END
	};

	return params;
}

/* ================================================================ init */

static int
sig_init(struct sig_ctx *s, void *keydata, const char *mdname, int op,
	 const OSSL_PARAM params[])
{
	struct p11agent_key *k = keydata;

	if (s == NULL)
		return 0;
	if (k == NULL && s->key == NULL)
		return 0;
	if (k != NULL) {
		if (key_family(k->type) != s->family) {
			p11agent_raise(s->prov, P11AGENT_R_INTERNAL,
				       "p11agent: %s key given to a %s signature",
				       p11agent_kt_name(k->type), p11agent_kt_name(s->family));
			return 0;
		}
		if (k->uri == NULL || k->pub == NULL) {
			p11agent_raise(s->prov, P11AGENT_R_UNSUPPORTED,
				       "p11agent: this key has no private half on a token (public key only)");
			return 0;
		}
		p11agent_key_unref(s->key);
		s->key = p11agent_key_ref(k);
	}
	msg_reset(s);
	s->op = op;
	s->hash = P11A_HASH_NONE;
	s->mgf1 = P11A_HASH_NONE;
	s->pad = s->key->type == P11AGENT_KT_RSA_PSS ? RSA_PKCS1_PSS_PADDING : RSA_PKCS1_PADDING;
	/* OpenSSL 3.0 signs with the largest salt unless told otherwise. */
	s->saltlen = RSA_PSS_SALTLEN_AUTO;
	if (mdname != NULL && !set_digest(s, mdname, &s->hash))
		return 0;
	if (s->family == P11AGENT_KT_ED25519 && s->hash != P11A_HASH_NONE) {
		p11agent_raise(s->prov, P11AGENT_R_UNSUPPORTED,
			       "p11agent: Ed25519 signs the message itself, without a digest");
		return 0;
	}
	/* digest-sign without a digest name: the key's default, as OpenSSL does. */
	if (op == OP_DIGEST_SIGN && s->family != P11AGENT_KT_ED25519 && s->hash == P11A_HASH_NONE)
		s->hash = P11A_HASH_SHA256;
	return sig_set_ctx_params(s, params);
}

static int
sig_sign_init(void *ctx, void *keydata, const OSSL_PARAM params[])
{
	return sig_init(ctx, keydata, NULL, OP_SIGN, params);
}

static int
sig_digest_sign_init(void *ctx, const char *mdname, void *keydata, const OSSL_PARAM params[])
{
	return sig_init(ctx, keydata, mdname, OP_DIGEST_SIGN, params);
}

/* ================================================================ signing */

static uint32_t
wire_saltlen(int saltlen)
{
	if (saltlen >= 0)
		return (uint32_t)saltlen;
	if (saltlen == RSA_PSS_SALTLEN_DIGEST)
		return P11A_PSS_SALT_DIGEST;
	/* RSA_PSS_SALTLEN_MAX, and AUTO, which OpenSSL 3.0 signs as MAX */
	return P11A_PSS_SALT_MAX;
}

/*
 * Sends one SIGN and checks the answer.  scheme/hash/input describe data.
 */
static int
do_sign(struct sig_ctx *s, int input, int hash, const unsigned char *data, size_t data_len,
	unsigned char *sig, size_t *siglen, size_t sigsize)
{
	struct p11a_sign req;
	uint8_t *out = NULL;
	size_t out_len = 0;
	int r;

	memset(&req, 0, sizeof(req));
	req.key_uri = s->key->uri;
	req.input = (uint8_t)input;
	req.hash = (uint8_t)hash;
	req.data = (uint8_t *)data;
	req.data_len = data_len;
	switch (s->family) {
	case P11AGENT_KT_RSA:
		if (s->pad == RSA_PKCS1_PSS_PADDING) {
			req.scheme = P11A_SCHEME_RSA_PSS;
			req.mgf1_hash = (uint8_t)s->mgf1;
			req.salt_len = wire_saltlen(s->saltlen);
		} else {
			req.scheme = P11A_SCHEME_RSA_PKCS1;
		}
		break;
	case P11AGENT_KT_EC:
		req.scheme = P11A_SCHEME_ECDSA;
		break;
	default:
		req.scheme = P11A_SCHEME_EDDSA;
		break;
	}
	if (!p11agent_agent_sign(s->prov, &req, &out, &out_len))
		return 0;
	r = p11agent_check_signature(req.scheme, out, out_len, s->key->sig_size, sigsize);
	if (r != 0) {
		p11agent_raise(s->prov, P11AGENT_R_BAD_REPLY,
			       "p11agent: the agent returned a malformed %s signature (%zu bytes) for %s",
			       p11a_scheme_name(req.scheme), out_len, s->key->uri);
		free(out);
		return 0;
	}
	memcpy(sig, out, out_len);
	*siglen = out_len;
	OPENSSL_cleanse(out, out_len);
	free(out);
	return 1;
}

/* Common front of every signing call: size query, state and buffer checks. */
static int
sign_prologue(struct sig_ctx *s, int op, unsigned char *sig, size_t *siglen,
	      size_t sigsize, int *done)
{
	*done = 0;
	if (s == NULL || s->key == NULL || s->op != op) {
		if (s != NULL)
			p11agent_raise(s->prov, P11AGENT_R_INTERNAL,
				       "p11agent: signature operation not initialised");
		return 0;
	}
	if (sig == NULL) {
		*siglen = s->key->sig_size;
		*done = 1;
		return 1;
	}
	if (sigsize < s->key->sig_size) {
		p11agent_raise(s->prov, P11AGENT_R_BUFFER_TOO_SMALL,
			       "p11agent: %zu-byte buffer for a signature of up to %zu bytes",
			       sigsize, s->key->sig_size);
		return 0;
	}
	return 1;
}

static int
sig_sign(void *ctx, unsigned char *sig, size_t *siglen, size_t sigsize,
	 const unsigned char *tbs, size_t tbslen)
{
	struct sig_ctx *s = ctx;
	int hash, done;

	if (!sign_prologue(s, OP_SIGN, sig, siglen, sigsize, &done) || done)
		return done;
	if (s->family == P11AGENT_KT_RSA && s->pad == RSA_PKCS1_PADDING &&
	    s->hash == P11A_HASH_NONE)
		/* PKCS#1 v1.5 over caller-made data (a DigestInfo): raw. */
		return do_sign(s, P11A_INPUT_RAW, P11A_HASH_NONE, tbs, tbslen, sig, siglen, sigsize);
	hash = s->hash != P11A_HASH_NONE ? s->hash : p11a_hash_from_len(tbslen);
	if (hash < 0 || p11a_hash_len(hash) != tbslen) {
		p11agent_raise(s->prov, P11AGENT_R_BAD_PARAMETER,
			       "p11agent: a %zu-byte input is not a %s digest", tbslen,
			       hash < 0 ? "SHA-1 or SHA-2" : p11a_hash_name(hash));
		return 0;
	}
	return do_sign(s, P11A_INPUT_DIGEST, hash, tbs, tbslen, sig, siglen, sigsize);
}

/* Raises the reason a sigin call failed. */
static int
sigin_failed(struct sig_ctx *s, int r)
{
	if (r == -P11A_E_TOO_LARGE)
		p11agent_raise(s->prov, P11AGENT_R_UNSUPPORTED, "p11agent: %smessage larger than %u bytes",
			       s->family == P11AGENT_KT_ED25519 ? "Ed25519 " : "",
			       (unsigned)P11A_SIGN_MSG_MAX);
	else if (r == -P11A_E_NOMEM)
		p11agent_raise(s->prov, P11AGENT_R_INTERNAL, "p11agent: out of memory");
	else
		p11agent_raise(s->prov, P11AGENT_R_INTERNAL, "p11agent: cannot hash the message");
	return 0;
}

static int
sig_digest_sign_update(void *ctx, const unsigned char *data, size_t datalen)
{
	struct sig_ctx *s = ctx;
	OSSL_LIB_CTX *lc;
	int r;

	if (s == NULL || s->op != OP_DIGEST_SIGN)
		return 0;
	if (datalen == 0)
		return 1;
	if (!p11a_sigin_started(&s->in)) {
		/* The digest (past the cap) comes from our own context, never this provider's. */
		if ((lc = p11agent_pub_libctx(s->prov)) == NULL)
			return 0;
		p11a_sigin_clear(&s->in);
		p11a_sigin_init(&s->in, s->hash, lc);
	}
	if ((r = p11a_sigin_update(&s->in, data, datalen)) != 0)
		return sigin_failed(s, r);
	return 1;
}

static int
sig_digest_sign_final(void *ctx, unsigned char *sig, size_t *siglen, size_t sigsize)
{
	struct sig_ctx *s = ctx;
	const uint8_t *data;
	size_t len;
	int done, hashed, r;

	if (!sign_prologue(s, OP_DIGEST_SIGN, sig, siglen, sigsize, &done) || done)
		return done;
	if ((r = p11a_sigin_final(&s->in, &data, &len, &hashed)) != 0)
		return sigin_failed(s, r);
	return do_sign(s, hashed ? P11A_INPUT_DIGEST : P11A_INPUT_MESSAGE, s->hash, data, len,
		       sig, siglen, sigsize);
}

static int
sig_digest_sign(void *ctx, unsigned char *sig, size_t *siglen, size_t sigsize,
		const unsigned char *tbs, size_t tbslen)
{
	struct sig_ctx *s = ctx;
	int done;

	if (!sign_prologue(s, OP_DIGEST_SIGN, sig, siglen, sigsize, &done) || done)
		return done;
	if (!p11a_sigin_started(&s->in) && tbslen <= P11A_SIGN_MSG_MAX)
		return do_sign(s, P11A_INPUT_MESSAGE, s->hash,
			       tbs != NULL ? tbs : (const unsigned char *)"", tbslen,
			       sig, siglen, sigsize);
	if (!sig_digest_sign_update(s, tbs, tbslen))
		return 0;
	return sig_digest_sign_final(s, sig, siglen, sigsize);
}

/* ================================================================ tables */

const OSSL_DISPATCH p11agent_signature_rsa_functions[] = {
	{ OSSL_FUNC_SIGNATURE_NEWCTX, (void (*)(void))rsa_newctx },
	{ OSSL_FUNC_SIGNATURE_FREECTX, (void (*)(void))sig_freectx },
	{ OSSL_FUNC_SIGNATURE_DUPCTX, (void (*)(void))sig_dupctx },
	{ OSSL_FUNC_SIGNATURE_SIGN_INIT, (void (*)(void))sig_sign_init },
	{ OSSL_FUNC_SIGNATURE_SIGN, (void (*)(void))sig_sign },
	{ OSSL_FUNC_SIGNATURE_DIGEST_SIGN_INIT, (void (*)(void))sig_digest_sign_init },
	{ OSSL_FUNC_SIGNATURE_DIGEST_SIGN_UPDATE, (void (*)(void))sig_digest_sign_update },
	{ OSSL_FUNC_SIGNATURE_DIGEST_SIGN_FINAL, (void (*)(void))sig_digest_sign_final },
	{ OSSL_FUNC_SIGNATURE_DIGEST_SIGN, (void (*)(void))sig_digest_sign },
	{ OSSL_FUNC_SIGNATURE_GET_CTX_PARAMS, (void (*)(void))sig_get_ctx_params },
	{ OSSL_FUNC_SIGNATURE_GETTABLE_CTX_PARAMS, (void (*)(void))sig_gettable_ctx_params },
	{ OSSL_FUNC_SIGNATURE_SET_CTX_PARAMS, (void (*)(void))sig_set_ctx_params },
	{ OSSL_FUNC_SIGNATURE_SETTABLE_CTX_PARAMS, (void (*)(void))rsa_settable_ctx_params },
	{ 0, NULL }
};

const OSSL_DISPATCH p11agent_signature_ecdsa_functions[] = {
	{ OSSL_FUNC_SIGNATURE_NEWCTX, (void (*)(void))ecdsa_newctx },
	{ OSSL_FUNC_SIGNATURE_FREECTX, (void (*)(void))sig_freectx },
	{ OSSL_FUNC_SIGNATURE_DUPCTX, (void (*)(void))sig_dupctx },
	{ OSSL_FUNC_SIGNATURE_SIGN_INIT, (void (*)(void))sig_sign_init },
	{ OSSL_FUNC_SIGNATURE_SIGN, (void (*)(void))sig_sign },
	{ OSSL_FUNC_SIGNATURE_DIGEST_SIGN_INIT, (void (*)(void))sig_digest_sign_init },
	{ OSSL_FUNC_SIGNATURE_DIGEST_SIGN_UPDATE, (void (*)(void))sig_digest_sign_update },
	{ OSSL_FUNC_SIGNATURE_DIGEST_SIGN_FINAL, (void (*)(void))sig_digest_sign_final },
	{ OSSL_FUNC_SIGNATURE_DIGEST_SIGN, (void (*)(void))sig_digest_sign },
	{ OSSL_FUNC_SIGNATURE_GET_CTX_PARAMS, (void (*)(void))sig_get_ctx_params },
	{ OSSL_FUNC_SIGNATURE_GETTABLE_CTX_PARAMS, (void (*)(void))sig_gettable_ctx_params },
	{ OSSL_FUNC_SIGNATURE_SET_CTX_PARAMS, (void (*)(void))sig_set_ctx_params },
	{ OSSL_FUNC_SIGNATURE_SETTABLE_CTX_PARAMS, (void (*)(void))ecdsa_settable_ctx_params },
	{ 0, NULL }
};

/* Ed25519 signs in one shot only, as in the default provider. */
const OSSL_DISPATCH p11agent_signature_ed25519_functions[] = {
	{ OSSL_FUNC_SIGNATURE_NEWCTX, (void (*)(void))ed_newctx },
	{ OSSL_FUNC_SIGNATURE_FREECTX, (void (*)(void))sig_freectx },
	{ OSSL_FUNC_SIGNATURE_DUPCTX, (void (*)(void))sig_dupctx },
	{ OSSL_FUNC_SIGNATURE_DIGEST_SIGN_INIT, (void (*)(void))sig_digest_sign_init },
	{ OSSL_FUNC_SIGNATURE_DIGEST_SIGN, (void (*)(void))sig_digest_sign },
	{ OSSL_FUNC_SIGNATURE_GET_CTX_PARAMS, (void (*)(void))sig_get_ctx_params },
	{ OSSL_FUNC_SIGNATURE_GETTABLE_CTX_PARAMS, (void (*)(void))sig_gettable_ctx_params },
	{ 0, NULL }
};
