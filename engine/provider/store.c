/*
 * OSSL_STORE loader for pkcs11: URIs (`openssl ... -key pkcs11:...`,
 * OSSL_STORE_open()).  One LIST from the agent; the URI selects keys and
 * certificates as RFC 7512 says (type=private, public, cert, or all).
 * Private keys are handed over as references to keys of this provider;
 * certificates and public keys as DER, which OpenSSL decodes itself.
 * Other schemes are not ours: open() declines them without an error.
 *
 * The URI must name one of the agent's keys: its private key, public key
 * and certificate together are one identity, but objects of two keys are
 * an error that names them.  Callers (openssl's apps, curl, OSSL_STORE
 * users generally) take the first key or certificate a store yields, and
 * a TLS client must never present an identity the user did not name.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/core_names.h>
#include <openssl/core_object.h>
#include <openssl/params.h>
#include <openssl/store.h>

#include "uri.h"
#include "provider.h"

enum obj_kind { OBJ_KEY, OBJ_PUBKEY, OBJ_CERT };

struct obj {
	enum obj_kind kind;
	uint32_t key;                   /* index into list.keys */
};

struct store_ctx {
	struct p11agent_prov *prov;
	char *uri;
	int expect;                     /* OSSL_STORE_INFO_* or 0 */
	int listed;                     /* objs computed */
	int failed;
	struct p11a_msg list;
	struct obj *objs;
	size_t nobjs, next;
};

static void *
store_open(void *provctx, const char *uri)
{
	struct p11agent_prov *p = provctx;
	struct p11a_uri_matcher *m;
	struct store_ctx *s;
	int err = 0;

	if (uri == NULL || strncasecmp(uri, "pkcs11:", 7) != 0)
		return NULL;
	if ((m = p11a_uri_matcher_new(uri, &err)) == NULL) {
		p11agent_raise(p, P11AGENT_R_BAD_URI, "p11agent: not a valid pkcs11: URI: %s", uri);
		return NULL;
	}
	p11a_uri_matcher_free(m);
	if ((s = calloc(1, sizeof(*s))) == NULL || (s->uri = strdup(uri)) == NULL) {
		free(s);
		p11agent_raise(p, P11AGENT_R_INTERNAL, "p11agent: out of memory");
		return NULL;
	}
	s->prov = p;
	return s;
}

static const OSSL_PARAM *
store_settable_ctx_params(void *provctx)
{
	static const OSSL_PARAM params[] = {
		OSSL_PARAM_int(OSSL_STORE_PARAM_EXPECT, NULL),
		OSSL_PARAM_END
	};

	return params;
}

static int
store_set_ctx_params(void *ctx, const OSSL_PARAM params[])
{
	struct store_ctx *s = ctx;
	const OSSL_PARAM *p;

	if (params == NULL)
		return 1;
	if ((p = OSSL_PARAM_locate_const(params, OSSL_STORE_PARAM_EXPECT)) != NULL &&
	    !OSSL_PARAM_get_int(p, &s->expect))
		return 0;
	return 1;
}

static const struct p11a_token *
token_of(const struct p11a_list_reply *l, const struct p11a_key *k)
{
	uint32_t i;

	for (i = 0; i < l->ntokens; i++) {
		if (l->tokens[i].uri != NULL && k->token_uri != NULL &&
		    strcmp(l->tokens[i].uri, k->token_uri) == 0)
			return &l->tokens[i];
	}
	return NULL;
}

/*
 * A key can sign when its private object is visible, or when its token is
 * not logged in yet (then we cannot see it, and signing will say to unlock).
 */
static int
may_have_private(const struct p11a_list_reply *l, const struct p11a_key *k)
{
	const struct p11a_token *t = token_of(l, k);

	if ((k->flags & P11A_KEY_PRIVATE_VISIBLE) != 0)
		return 1;
	return t != NULL && (t->flags & P11A_TOKEN_LOGGED_IN) == 0;
}

#define WANT(kind)      (1u << (kind))

/* The objects of key k (WANT() bits) that a selection asking for want yields. */
static unsigned
objs_of(const struct p11a_list_reply *l, const struct p11a_key *k, unsigned want)
{
	unsigned have = 0;

	if (k->spki_len > 0 && may_have_private(l, k))
		have |= WANT(OBJ_KEY);
	if (k->spki_len > 0)
		have |= WANT(OBJ_PUBKEY);
	if (k->cert_len > 0)
		have |= WANT(OBJ_CERT);
	return have & want;
}

static int
add_obj(struct store_ctx *s, enum obj_kind kind, uint32_t key)
{
	struct obj *n;

	if ((n = realloc(s->objs, (s->nobjs + 1) * sizeof(*n))) == NULL)
		return 0;
	s->objs = n;
	s->objs[s->nobjs].kind = kind;
	s->objs[s->nobjs].key = key;
	s->nobjs++;
	return 1;
}

/*
 * LIST once, and pick the objects this URI and the expected type ask for:
 * those of one key, or an error when they belong to several.
 */
static int
store_select(struct store_ctx *s)
{
	const struct p11a_list_reply *l;
	uint32_t *idx = NULL;
	size_t n = 0, nsel = 0, i;
	unsigned want;
	int cls, r;

	if (!p11agent_agent_list(s->prov, &s->list))
		return 0;
	l = &s->list.u.list;
	if (l->nkeys > 0 && (idx = calloc(l->nkeys, sizeof(*idx))) == NULL) {
		p11agent_raise(s->prov, P11AGENT_R_INTERNAL, "p11agent: out of memory");
		return 0;
	}
	if ((r = p11a_list_match_keys(l, s->uri, idx, l->nkeys, &n)) != 0) {
		free(idx);
		p11agent_raise(s->prov, P11AGENT_R_BAD_URI, "p11agent: not a valid pkcs11: URI: %s",
			       s->uri);
		return 0;
	}
	cls = p11agent_uri_class(s->uri);
	switch (cls) {
	case P11AGENT_URI_ANY:
		want = WANT(OBJ_KEY) | WANT(OBJ_CERT);
		break;
	case P11AGENT_URI_PRIVATE:
		want = WANT(OBJ_KEY);
		break;
	case P11AGENT_URI_PUBLIC:
		want = WANT(OBJ_PUBKEY);
		break;
	case P11AGENT_URI_CERT:
		want = WANT(OBJ_CERT);
		break;
	default:
		want = 0;
		break;
	}
	switch (s->expect) {
	case OSSL_STORE_INFO_PKEY:
		want &= WANT(OBJ_KEY);
		break;
	case OSSL_STORE_INFO_PUBKEY:
		/* The public half of whatever key the URI names. */
		want = cls != P11AGENT_URI_CERT && cls != P11AGENT_URI_OTHER ? WANT(OBJ_PUBKEY) : 0;
		break;
	case OSSL_STORE_INFO_CERT:
		want &= WANT(OBJ_CERT);
		break;
	case 0:
		break;
	default:
		want = 0;
		break;
	}
	/* Keep the matches that have an object to yield, compacting idx. */
	for (i = 0; i < n && i < l->nkeys; i++) {
		if (objs_of(l, &l->keys[idx[i]], want) != 0)
			idx[nsel++] = idx[i];
	}
	if (nsel > 1) {
		p11agent_raise_ambiguous(s->prov, s->uri, l, idx, P11AGENT_NAMED_MATCHES, nsel,
					 want == WANT(OBJ_CERT));
		free(idx);
		return 0;
	}
	for (i = 0; i < nsel; i++) {
		unsigned objs = objs_of(l, &l->keys[idx[i]], want);
		int ok = 1;

		if ((objs & WANT(OBJ_KEY)) != 0)
			ok = add_obj(s, OBJ_KEY, idx[i]);
		if (ok && (objs & WANT(OBJ_PUBKEY)) != 0)
			ok = add_obj(s, OBJ_PUBKEY, idx[i]);
		if (ok && (objs & WANT(OBJ_CERT)) != 0)
			ok = add_obj(s, OBJ_CERT, idx[i]);
		if (!ok) {
			free(idx);
			p11agent_raise(s->prov, P11AGENT_R_INTERNAL, "p11agent: out of memory");
			return 0;
		}
	}
	free(idx);
	if (s->nobjs == 0) {
		const char *what = s->expect == OSSL_STORE_INFO_CERT || cls == P11AGENT_URI_CERT ?
			"no such certificate" : "no such key";

		p11agent_raise(s->prov, P11AGENT_R_NO_SUCH_KEY, "p11agent: %s: %s", what, s->uri);
		return 0;
	}
	return 1;
}

static int
yield_key(struct store_ctx *s, const struct p11a_key *k, OSSL_CALLBACK *cb, void *cbarg)
{
	struct p11agent_objref ref;
	struct p11agent_key *key;
	OSSL_PARAM params[5];
	int type = OSSL_OBJECT_PKEY, ok;

	if ((key = p11agent_key_new(s->prov, k->uri, k->spki, k->spki_len, P11AGENT_KT_NONE)) == NULL)
		return 0;
	memset(&ref, 0, sizeof(ref));
	memcpy(ref.magic, P11AGENT_OBJREF_MAGIC, sizeof(P11AGENT_OBJREF_MAGIC));
	ref.key = key;
	params[0] = OSSL_PARAM_construct_int(OSSL_OBJECT_PARAM_TYPE, &type);
	params[1] = OSSL_PARAM_construct_utf8_string(OSSL_OBJECT_PARAM_DATA_TYPE,
						     (char *)p11agent_kt_name(key->type), 0);
	params[2] = OSSL_PARAM_construct_octet_string(OSSL_OBJECT_PARAM_REFERENCE, &ref, sizeof(ref));
	params[3] = OSSL_PARAM_construct_utf8_string(OSSL_OBJECT_PARAM_DESC, k->uri, 0);
	params[4] = OSSL_PARAM_construct_end();
	ok = cb(params, cbarg);
	p11agent_key_unref(key);
	return ok;
}

static int
yield_der(int type, const char *structure, const char *data_type, const uint8_t *der,
	  size_t der_len, const char *desc, OSSL_CALLBACK *cb, void *cbarg)
{
	OSSL_PARAM params[6], *p = params;

	*p++ = OSSL_PARAM_construct_int(OSSL_OBJECT_PARAM_TYPE, &type);
	if (data_type != NULL)
		*p++ = OSSL_PARAM_construct_utf8_string(OSSL_OBJECT_PARAM_DATA_TYPE,
							(char *)data_type, 0);
	*p++ = OSSL_PARAM_construct_utf8_string(OSSL_OBJECT_PARAM_DATA_STRUCTURE,
						(char *)structure, 0);
	*p++ = OSSL_PARAM_construct_octet_string(OSSL_OBJECT_PARAM_DATA, (void *)der, der_len);
	*p++ = OSSL_PARAM_construct_utf8_string(OSSL_OBJECT_PARAM_DESC, (char *)desc, 0);
	*p = OSSL_PARAM_construct_end();
	return cb(params, cbarg);
}

static int
store_load(void *ctx, OSSL_CALLBACK *object_cb, void *object_cbarg,
	   OSSL_PASSPHRASE_CALLBACK *pw_cb, void *pw_cbarg)
{
	struct store_ctx *s = ctx;
	const struct p11a_key *k;
	const struct obj *o;

	if (s->failed)
		return 0;
	if (!s->listed) {
		s->listed = 1;
		if (!store_select(s)) {
			s->failed = 1;
			return 0;
		}
	}
	if (s->next >= s->nobjs)
		return 0;
	o = &s->objs[s->next++];
	k = &s->list.u.list.keys[o->key];
	switch (o->kind) {
	case OBJ_KEY:
		return yield_key(s, k, object_cb, object_cbarg);
	case OBJ_PUBKEY:
		return yield_der(OSSL_OBJECT_PKEY, "SubjectPublicKeyInfo", NULL, k->spki,
				 k->spki_len, k->uri, object_cb, object_cbarg);
	default:
		return yield_der(OSSL_OBJECT_CERT, "Certificate", NULL, k->cert, k->cert_len,
				 k->cert_uri, object_cb, object_cbarg);
	}
}

static int
store_eof(void *ctx)
{
	struct store_ctx *s = ctx;

	return s->failed || (s->listed && s->next >= s->nobjs);
}

static int
store_close(void *ctx)
{
	struct store_ctx *s = ctx;

	if (s == NULL)
		return 1;
	p11a_msg_clear(&s->list);
	free(s->objs);
	free(s->uri);
	free(s);
	return 1;
}

const OSSL_DISPATCH p11agent_store_functions[] = {
	{ OSSL_FUNC_STORE_OPEN, (void (*)(void))store_open },
	{ OSSL_FUNC_STORE_SETTABLE_CTX_PARAMS, (void (*)(void))store_settable_ctx_params },
	{ OSSL_FUNC_STORE_SET_CTX_PARAMS, (void (*)(void))store_set_ctx_params },
	{ OSSL_FUNC_STORE_LOAD, (void (*)(void))store_load },
	{ OSSL_FUNC_STORE_EOF, (void (*)(void))store_eof },
	{ OSSL_FUNC_STORE_CLOSE, (void (*)(void))store_close },
	{ 0, NULL }
};
