/*
 * Key management for keys held by the agent: RSA, RSA-PSS, EC, Ed25519.
 *
 * A key comes from load() (an object reference made by our store or
 * decoder) and answers for its public half through the default provider.
 *
 * Two rules make OpenSSL 3.0 use these keys right:
 * - export() refuses any selection with the private key.  OpenSSL 3.0
 *   first tries to run an operation in whichever provider a plain fetch
 *   returns, exporting the key there with OSSL_KEYMGMT_SELECT_ALL; if that
 *   export succeeded, the default provider would try to sign with a
 *   public key.  Refusing sends OpenSSL to this provider's signature.
 * - import() accepts public keys (never private key material), so that
 *   EVP_PKEY_eq() / X509_check_private_key() can bring the certificate's
 *   public key here and compare with match().
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/x509.h>

#include "provider.h"

static void *
key_new(void *provctx, int type)
{
	struct p11agent_prov *p = provctx;
	struct p11agent_key *k;

	if ((k = calloc(1, sizeof(*k))) == NULL) {
		p11agent_raise(p, P11AGENT_R_INTERNAL, "p11agent: out of memory");
		return NULL;
	}
	k->prov = p;
	k->type = type;
	atomic_init(&k->refs, 1);
	return k;
}

static void *
key_load(const void *reference, size_t reference_sz, int type)
{
	const struct p11agent_objref *ref = reference;

	if (ref == NULL || reference_sz != sizeof(*ref) ||
	    memcmp(ref->magic, P11AGENT_OBJREF_MAGIC, sizeof(P11AGENT_OBJREF_MAGIC)) != 0 ||
	    ref->key == NULL)
		return NULL;
	if (ref->key->type != type) {
		p11agent_raise(ref->key->prov, P11AGENT_R_BAD_KEY_REFERENCE,
			       "p11agent: key %s is %s, not %s", ref->key->uri != NULL ? ref->key->uri : "",
			       p11agent_kt_name(ref->key->type), p11agent_kt_name(type));
		return NULL;
	}
	return p11agent_key_ref(ref->key);
}

static void
key_free(void *keydata)
{
	p11agent_key_unref(keydata);
}

static void *
key_dup(const void *keydata, int selection)
{
	/* Keys never change once made: a new reference is a copy. */
	return p11agent_key_ref((struct p11agent_key *)keydata);
}

static int
key_has(const void *keydata, int selection)
{
	const struct p11agent_key *k = keydata;
	int ok = 1;

	if (k == NULL)
		return 0;
	if ((selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY) != 0)
		ok = ok && k->pub != NULL;
	if ((selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) != 0)
		ok = ok && k->uri != NULL && k->pub != NULL;
	if ((selection & OSSL_KEYMGMT_SELECT_DOMAIN_PARAMETERS) != 0 && k->type == P11AGENT_KT_EC)
		ok = ok && k->pub != NULL;
	return ok;
}

static int
key_match(const void *keydata1, const void *keydata2, int selection)
{
	const struct p11agent_key *a = keydata1, *b = keydata2;

	if (a == NULL || b == NULL || a->pub == NULL || b->pub == NULL || a->type != b->type)
		return 0;
	if ((selection & OSSL_KEYMGMT_SELECT_KEYPAIR) != 0)
		return EVP_PKEY_eq(a->pub, b->pub) == 1;
	if ((selection & OSSL_KEYMGMT_SELECT_DOMAIN_PARAMETERS) != 0 && a->type == P11AGENT_KT_EC)
		return EVP_PKEY_parameters_eq(a->pub, b->pub) == 1;
	return 1;
}

static int
key_get_params(void *keydata, OSSL_PARAM params[])
{
	struct p11agent_key *k = keydata;

	if (k == NULL || k->pub == NULL)
		return 0;
	/*
	 * The public key has every public parameter OpenSSL asks for (bits,
	 * security bits, max size, EC group name and point format, default
	 * digest) and no private ones to leak.
	 */
	return EVP_PKEY_get_params(k->pub, params) == 1;
}

static int
key_export(void *keydata, int selection, OSSL_CALLBACK *cb, void *cbarg)
{
	struct p11agent_key *k = keydata;

	/* The private half stays on the token; see the comment at the top. */
	if (k == NULL || k->pub == NULL || (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) != 0)
		return 0;
	return EVP_PKEY_export(k->pub, selection, cb, cbarg) == 1;
}

/* Parameters that carry private key material. */
static int
has_private_material(const OSSL_PARAM params[])
{
	static const char *const names[] = {
		OSSL_PKEY_PARAM_PRIV_KEY, OSSL_PKEY_PARAM_RSA_D,
		OSSL_PKEY_PARAM_RSA_FACTOR1, OSSL_PKEY_PARAM_RSA_EXPONENT1,
		OSSL_PKEY_PARAM_RSA_COEFFICIENT1
	};
	size_t i;

	for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		if (OSSL_PARAM_locate_const(params, names[i]) != NULL)
			return 1;
	}
	return 0;
}

static int
key_import(void *keydata, int selection, const OSSL_PARAM params[])
{
	struct p11agent_key *k = keydata;
	EVP_PKEY_CTX *pctx = NULL;
	EVP_PKEY *pub = NULL;
	OSSL_LIB_CTX *lc;
	unsigned char *der = NULL;
	int len, size, ok = 0;

	/* Only a fresh key from new(), only public data. */
	if (k == NULL || k->pub != NULL || k->uri != NULL || has_private_material(params))
		return 0;
	if ((selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY) == 0)
		return 0;
	if ((lc = p11agent_pub_libctx(k->prov)) == NULL)
		return 0;
	if ((pctx = EVP_PKEY_CTX_new_from_name(lc, p11agent_kt_name(k->type), NULL)) == NULL ||
	    EVP_PKEY_fromdata_init(pctx) != 1 ||
	    EVP_PKEY_fromdata(pctx, &pub, EVP_PKEY_PUBLIC_KEY, (OSSL_PARAM *)params) != 1)
		goto out;
	if ((len = i2d_PUBKEY(pub, &der)) <= 0 || (size = EVP_PKEY_get_size(pub)) <= 0)
		goto out;
	k->spki = der;
	k->spki_len = (size_t)len;
	k->sig_size = (size_t)size;
	k->pub = pub;
	der = NULL;
	pub = NULL;
	ok = 1;
out:
	OPENSSL_free(der);
	EVP_PKEY_free(pub);
	EVP_PKEY_CTX_free(pctx);
	return ok;
}

static const OSSL_PARAM types_rsa[] = {
	OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_N, NULL, 0),
	OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_E, NULL, 0),
	OSSL_PARAM_END
};

static const OSSL_PARAM types_ec[] = {
	OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, NULL, 0),
	OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_EC_POINT_CONVERSION_FORMAT, NULL, 0),
	OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_EC_ENCODING, NULL, 0),
	OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, NULL, 0),
	OSSL_PARAM_END
};

static const OSSL_PARAM types_ed[] = {
	OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, NULL, 0),
	OSSL_PARAM_END
};

static const OSSL_PARAM types_none[] = {
	OSSL_PARAM_END
};

static const OSSL_PARAM *
types_for(int type, int selection)
{
	if ((selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY) == 0) {
		if (type == P11AGENT_KT_EC && (selection & OSSL_KEYMGMT_SELECT_ALL_PARAMETERS) != 0)
			return types_ec;
		return types_none;
	}
	switch (type) {
	case P11AGENT_KT_RSA:
	case P11AGENT_KT_RSA_PSS:
		return types_rsa;
	case P11AGENT_KT_EC:
		return types_ec;
	default:
		return types_ed;
	}
}

static const OSSL_PARAM gettable_rsa[] = {
	OSSL_PARAM_int(OSSL_PKEY_PARAM_BITS, NULL),
	OSSL_PARAM_int(OSSL_PKEY_PARAM_SECURITY_BITS, NULL),
	OSSL_PARAM_int(OSSL_PKEY_PARAM_MAX_SIZE, NULL),
	OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_DEFAULT_DIGEST, NULL, 0),
	OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_N, NULL, 0),
	OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_E, NULL, 0),
	OSSL_PARAM_END
};

static const OSSL_PARAM gettable_ec[] = {
	OSSL_PARAM_int(OSSL_PKEY_PARAM_BITS, NULL),
	OSSL_PARAM_int(OSSL_PKEY_PARAM_SECURITY_BITS, NULL),
	OSSL_PARAM_int(OSSL_PKEY_PARAM_MAX_SIZE, NULL),
	OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_DEFAULT_DIGEST, NULL, 0),
	OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, NULL, 0),
	OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_EC_POINT_CONVERSION_FORMAT, NULL, 0),
	OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_EC_ENCODING, NULL, 0),
	OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, NULL, 0),
	OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, NULL, 0),
	OSSL_PARAM_END
};

static const OSSL_PARAM gettable_ed[] = {
	OSSL_PARAM_int(OSSL_PKEY_PARAM_BITS, NULL),
	OSSL_PARAM_int(OSSL_PKEY_PARAM_SECURITY_BITS, NULL),
	OSSL_PARAM_int(OSSL_PKEY_PARAM_MAX_SIZE, NULL),
	OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_MANDATORY_DIGEST, NULL, 0),
	OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, NULL, 0),
	OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, NULL, 0),
	OSSL_PARAM_END
};

/* One set of entry points per key type; only the type differs. */
#define KEYMGMT_TYPE(name, TYPE, gettable, opname)                                    \
	static void *name##_new(void *provctx)                                      \
	{                                                                           \
		return key_new(provctx, TYPE);                                      \
	}                                                                           \
	static void *name##_load(const void *ref, size_t ref_sz)                    \
	{                                                                           \
		return key_load(ref, ref_sz, TYPE);                                 \
	}                                                                           \
	static const OSSL_PARAM *name##_gettable(void *provctx)                     \
	{                                                                           \
		return gettable;                                                    \
	}                                                                           \
	static const OSSL_PARAM *name##_types(int selection)                        \
	{                                                                           \
		return types_for(TYPE, selection);                                  \
	}                                                                           \
	static const char *name##_opname(int operation_id)                          \
	{                                                                           \
		return operation_id == OSSL_OP_SIGNATURE ? opname : NULL;           \
	}                                                                           \
	const OSSL_DISPATCH p11agent_keymgmt_##name##_functions[] = {               \
		{ OSSL_FUNC_KEYMGMT_NEW, (void (*)(void))name##_new },              \
		{ OSSL_FUNC_KEYMGMT_LOAD, (void (*)(void))name##_load },            \
		{ OSSL_FUNC_KEYMGMT_FREE, (void (*)(void))key_free },               \
		{ OSSL_FUNC_KEYMGMT_DUP, (void (*)(void))key_dup },                 \
		{ OSSL_FUNC_KEYMGMT_HAS, (void (*)(void))key_has },                 \
		{ OSSL_FUNC_KEYMGMT_MATCH, (void (*)(void))key_match },             \
		{ OSSL_FUNC_KEYMGMT_GET_PARAMS, (void (*)(void))key_get_params },   \
		{ OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS, (void (*)(void))name##_gettable }, \
		{ OSSL_FUNC_KEYMGMT_IMPORT, (void (*)(void))key_import },           \
		{ OSSL_FUNC_KEYMGMT_IMPORT_TYPES, (void (*)(void))name##_types },   \
		{ OSSL_FUNC_KEYMGMT_EXPORT, (void (*)(void))key_export },           \
		{ OSSL_FUNC_KEYMGMT_EXPORT_TYPES, (void (*)(void))name##_types },   \
		{ OSSL_FUNC_KEYMGMT_QUERY_OPERATION_NAME, (void (*)(void))name##_opname }, \
		{ 0, NULL }                                                         \
	};

KEYMGMT_TYPE(rsa, P11AGENT_KT_RSA, gettable_rsa, "RSA")
KEYMGMT_TYPE(rsapss, P11AGENT_KT_RSA_PSS, gettable_rsa, "RSA")
KEYMGMT_TYPE(ec, P11AGENT_KT_EC, gettable_ec, "ECDSA")
KEYMGMT_TYPE(ed25519, P11AGENT_KT_ED25519, gettable_ed, "ED25519")
