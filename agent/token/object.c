/*
 * Objects of a token and their pairing: attributes read with the two-call
 * size pattern, private keys, public keys and certificates read and paired
 * (CKA_ID, then public key) into the key records of one token.
 */
#include "config.h"
#include "token-int.h"
#include "spki.h"
#include "log.h"
#include "p11a.h"
#include "proto.h"
#include "uri.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#define OBJ_MAX         P11A_LIST_MAX   /* objects of one class we look at per token */
#define ATTR_MAX        P11A_FRAME_MAX  /* largest attribute value we read */

/* ------------------------------------------------------------ attributes */

/*
 * Reads one attribute into a new buffer (a NUL appended, not counted).
 * CKR_ATTRIBUTE_TYPE_INVALID also stands for "unavailable" and "too big".
 */
static CK_RV
attr_get(struct token_module *m, CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o,
	 CK_ATTRIBUTE_TYPE type, uint8_t **out, size_t *len)
{
	CK_ATTRIBUTE a = { type, NULL, 0 };
	uint8_t *buf;
	CK_RV rv;

	*out = NULL;
	*len = 0;
	rv = m->f->C_GetAttributeValue(h, o, &a, 1);
	if (rv != CKR_OK)
		return rv;
	if (a.ulValueLen == CK_UNAVAILABLE_INFORMATION || a.ulValueLen > ATTR_MAX)
		return CKR_ATTRIBUTE_TYPE_INVALID;
	if ((buf = malloc(a.ulValueLen + 1)) == NULL)
		return CKR_HOST_MEMORY;
	a.pValue = buf;
	rv = m->f->C_GetAttributeValue(h, o, &a, 1);
	if (rv == CKR_OK && (a.ulValueLen == CK_UNAVAILABLE_INFORMATION || a.ulValueLen > ATTR_MAX))
		rv = CKR_ATTRIBUTE_TYPE_INVALID;
	if (rv != CKR_OK) {
		free(buf);
		return rv;
	}
	buf[a.ulValueLen] = '\0';
	*out = buf;
	*len = a.ulValueLen;
	return CKR_OK;
}

static CK_RV
attr_ulong(struct token_module *m, CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o,
	   CK_ATTRIBUTE_TYPE type, CK_ULONG *v)
{
	CK_ATTRIBUTE a = { type, v, sizeof(*v) };
	CK_RV rv = m->f->C_GetAttributeValue(h, o, &a, 1);

	if (rv == CKR_OK && a.ulValueLen != sizeof(*v))
		rv = CKR_ATTRIBUTE_TYPE_INVALID;
	return rv;
}

static int
attr_bool(struct token_module *m, CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_TYPE type)
{
	CK_BBOOL v = CK_FALSE;
	CK_ATTRIBUTE a = { type, &v, sizeof(v) };

	if (m->f->C_GetAttributeValue(h, o, &a, 1) != CKR_OK || a.ulValueLen != sizeof(v))
		return 0;
	return v == CK_TRUE;
}

/* Attribute failures that mean "this object lacks it" rather than "stop". */
static int
rv_attr_absent(CK_RV rv)
{
	return rv == CKR_ATTRIBUTE_TYPE_INVALID || rv == CKR_ATTRIBUTE_SENSITIVE ||
	    rv == CKR_ATTRIBUTE_VALUE_INVALID || rv == CKR_FUNCTION_FAILED ||
	    rv == CKR_GENERAL_ERROR;
}

CK_RV
tok_find_objects(struct token_module *m, CK_SESSION_HANDLE h, CK_ATTRIBUTE *tmpl, CK_ULONG ntmpl,
	         CK_OBJECT_HANDLE **out, size_t *count)
{
	CK_OBJECT_HANDLE *v = NULL, *nv, batch[64];
	size_t n = 0;
	CK_ULONG got;
	CK_RV rv, rv2;

	*out = NULL;
	*count = 0;
	if ((rv = m->f->C_FindObjectsInit(h, tmpl, ntmpl)) != CKR_OK)
		return rv;
	for (;;) {
		got = 0;
		rv = m->f->C_FindObjects(h, batch, sizeof(batch) / sizeof(batch[0]), &got);
		if (rv != CKR_OK || got == 0)
			break;
		if (got > sizeof(batch) / sizeof(batch[0]) || n + got > OBJ_MAX)
			break;
		if ((nv = realloc(v, (n + got) * sizeof(*v))) == NULL) {
			rv = CKR_HOST_MEMORY;
			break;
		}
		v = nv;
		memcpy(v + n, batch, got * sizeof(*v));
		n += got;
	}
	rv2 = m->f->C_FindObjectsFinal(h);
	if (rv == CKR_OK)
		rv = rv2;
	if (rv != CKR_OK) {
		free(v);
		return rv;
	}
	*out = v;
	*count = n;
	return CKR_OK;
}

uint8_t *
tok_dup_bytes(const uint8_t *p, size_t n)
{
	uint8_t *d;

	if (n == 0)
		return NULL;
	if ((d = malloc(n)) == NULL)
		return NULL;
	memcpy(d, p, n);
	return d;
}

/* ------------------------------------------------------------ objects and pairing */

struct obj {
	CK_OBJECT_CLASS cls;
	CK_OBJECT_HANDLE h;
	uint8_t *id;
	size_t id_len;
	char *label;                    /* never NULL after obj_read */
	int type;                       /* P11A_KEY_*, 0 = unknown or unsupported */
	uint32_t bits;
	const char *curve;              /* wire name, "" for RSA */
	uint8_t *spki;                  /* NULL when this object does not give the public key */
	size_t spki_len;
	uint8_t *cert;                  /* certificates: the DER */
	size_t cert_len;
	int always_auth;
	int taken;                      /* already paired into an entry */
};

static void
obj_free(struct obj *o)
{
	free(o->id);
	free(o->label);
	free(o->spki);
	free(o->cert);
	memset(o, 0, sizeof(*o));
}

/* Fatal attribute failures abort the token's enumeration. */
#define ATTR_CHECK(rv) do { if ((rv) != CKR_OK && !rv_attr_absent(rv)) return (rv); } while (0)

static CK_RV
obj_read_key(struct token_module *m, CK_SESSION_HANDLE h, struct obj *o)
{
	uint8_t *a = NULL, *b = NULL;
	size_t al = 0, bl = 0;
	const struct tok_curve *c;
	const uint8_t *pt;
	size_t pt_len;
	CK_ULONG kt;
	CK_RV rv;

	rv = attr_ulong(m, h, o->h, CKA_KEY_TYPE, &kt);
	ATTR_CHECK(rv);
	if (rv != CKR_OK)
		return CKR_OK;
	if (kt == CKK_RSA) {
		o->type = P11A_KEY_RSA;
		o->curve = "";
		rv = attr_get(m, h, o->h, CKA_MODULUS, &a, &al);
		ATTR_CHECK(rv);
		if (rv == CKR_OK)
			o->bits = tok_bits_of(a, al);
		if (rv == CKR_OK && (rv = attr_get(m, h, o->h, CKA_PUBLIC_EXPONENT, &b, &bl)) == CKR_OK) {
			if (tok_spki_rsa(a, al, b, bl, &o->spki, &o->spki_len) != 0)
				log_debug("RSA key '%s': cannot encode the public key", o->label);
		}
		free(a);
		free(b);
		if (rv != CKR_OK && !rv_attr_absent(rv))
			return rv;
		return CKR_OK;
	}
	if (kt != CKK_EC && kt != CKK_EC_EDWARDS)
		return CKR_OK;
	rv = attr_get(m, h, o->h, CKA_EC_PARAMS, &a, &al);
	ATTR_CHECK(rv);
	if (rv != CKR_OK)
		return CKR_OK;
	c = tok_curve_by_params(a, al);
	free(a);
	if (c == NULL) {
		log_debug("key '%s': curve not supported", o->label);
		return CKR_OK;
	}
	o->type = c->type;
	o->curve = c->name;
	o->bits = c->bits;
	rv = attr_get(m, h, o->h, CKA_EC_POINT, &b, &bl);
	ATTR_CHECK(rv);
	if (rv == CKR_OK) {
		if (tok_ec_point_raw(c, b, bl, &pt, &pt_len) != 0 ||
		    tok_spki_ec(c, pt, pt_len, &o->spki, &o->spki_len) != 0)
			log_warn("key '%s': CKA_EC_POINT not usable for %s", o->label, c->name);
	}
	free(b);
	return CKR_OK;
}

static void
obj_read_cert_key(struct obj *o)
{
	const unsigned char *p = o->cert;
	X509 *x = d2i_X509(NULL, &p, (long)o->cert_len);
	EVP_PKEY *pk;
	const struct tok_curve *c;
	char group[64];

	if (x == NULL || p != o->cert + o->cert_len) {
		log_debug("certificate '%s': not DER X.509", o->label);
		X509_free(x);
		return;
	}
	pk = X509_get0_pubkey(x);
	if (pk == NULL)
		goto out;
	switch (EVP_PKEY_get_base_id(pk)) {
	case EVP_PKEY_RSA:
	case EVP_PKEY_RSA_PSS:
		o->type = P11A_KEY_RSA;
		o->curve = "";
		o->bits = (uint32_t)EVP_PKEY_get_bits(pk);
		break;
	case EVP_PKEY_EC:
		if (EVP_PKEY_get_utf8_string_param(pk, OSSL_PKEY_PARAM_GROUP_NAME, group,
						   sizeof(group), NULL) != 1 ||
		    (c = tok_curve_by_group(group)) == NULL)
			goto out;
		o->type = P11A_KEY_EC;
		o->curve = c->name;
		o->bits = c->bits;
		break;
	case EVP_PKEY_ED25519:
		o->type = P11A_KEY_ED25519;
		o->curve = "Ed25519";
		o->bits = ED25519_BITS;
		break;
	default:
		goto out;
	}
	if (tok_spki_of(pk, &o->spki, &o->spki_len) != 0)
		o->type = 0;
 out:
	X509_free(x);
}

static CK_RV
obj_read(struct token_module *m, CK_SESSION_HANDLE h, CK_OBJECT_CLASS cls,
	 CK_OBJECT_HANDLE oh, struct obj *o)
{
	uint8_t *lab = NULL;
	size_t lab_len = 0;
	CK_RV rv;

	memset(o, 0, sizeof(*o));
	o->cls = cls;
	o->h = oh;
	rv = attr_get(m, h, oh, CKA_ID, &o->id, &o->id_len);
	ATTR_CHECK(rv);
	rv = attr_get(m, h, oh, CKA_LABEL, &lab, &lab_len);
	ATTR_CHECK(rv);
	/* CKA_LABEL is bytes; the wire wants NUL-free text: cut at a NUL. */
	o->label = lab != NULL ? (char *)lab : strdup("");
	if (o->label == NULL)
		return CKR_HOST_MEMORY;
	if (cls == CKO_CERTIFICATE) {
		rv = attr_get(m, h, oh, CKA_VALUE, &o->cert, &o->cert_len);
		ATTR_CHECK(rv);
		if (o->cert_len > 0)
			obj_read_cert_key(o);
		return CKR_OK;
	}
	if (cls == CKO_PRIVATE_KEY)
		o->always_auth = attr_bool(m, h, oh, CKA_ALWAYS_AUTHENTICATE);
	return obj_read_key(m, h, o);
}

/* 1 when the module says plainly that o is a session object (CKA_TOKEN false). */
static int
is_session_object(struct token_module *m, CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o)
{
	CK_BBOOL v = CK_TRUE;
	CK_ATTRIBUTE a = { CKA_TOKEN, &v, sizeof(v) };

	return m->f->C_GetAttributeValue(h, o, &a, 1) == CKR_OK && a.ulValueLen == sizeof(v) &&
	    v == CK_FALSE;
}

/* Reads every object of class cls (X.509 only for certificates). */
static CK_RV
objs_read(struct token_module *m, CK_SESSION_HANDLE h, CK_OBJECT_CLASS cls,
	  struct obj **out, size_t *count)
{
	CK_CERTIFICATE_TYPE ct = CKC_X_509;
	CK_BBOOL on_token = CK_TRUE;
	/* Token objects only: our own session copies of keys are visible here too. */
	CK_ATTRIBUTE tmpl[3] = {
		{ CKA_CLASS, &cls, sizeof(cls) },
		{ CKA_TOKEN, &on_token, sizeof(on_token) },
		{ CKA_CERTIFICATE_TYPE, &ct, sizeof(ct) },
	};
	CK_OBJECT_HANDLE *hs = NULL;
	struct obj *v = NULL;
	size_t n = 0, i, kept;
	CK_RV rv;

	*out = NULL;
	*count = 0;
	pthread_rwlock_wrlock(&m->copy_lock);
	rv = tok_find_objects(m, h, tmpl, cls == CKO_CERTIFICATE ? 3 : 2, &hs, &n);
	pthread_rwlock_unlock(&m->copy_lock);
	if (rv != CKR_OK)
		return rv;
	if (n > 0 && (v = calloc(n, sizeof(*v))) == NULL) {
		free(hs);
		return CKR_HOST_MEMORY;
	}
	for (i = 0, kept = 0; i < n; i++) {
		/* Only token objects are keys to list; never a session copy. */
		if (is_session_object(m, h, hs[i])) {
			log_debug("object handle %lu: not a token object; skipped", (unsigned long)hs[i]);
			continue;
		}
		rv = obj_read(m, h, cls, hs[i], &v[kept]);
		if (rv == CKR_OBJECT_HANDLE_INVALID) {
			/* Deleted under us: skip it. */
			obj_free(&v[kept]);
			rv = CKR_OK;
			continue;
		}
		if (rv != CKR_OK)
			break;
		kept++;
	}
	free(hs);
	if (rv != CKR_OK) {
		for (size_t j = 0; j < n; j++)
			obj_free(&v[j]);
		free(v);
		return rv;
	}
	*out = v;
	*count = kept;
	return CKR_OK;
}

/* One key being assembled from its objects. */
struct entry {
	struct obj *priv, *pub, *cert;
};

static const struct obj *
entry_keysrc(const struct entry *e)
{
	/* Key type and size: the private key says best, then the public key, then the cert. */
	if (e->priv != NULL && e->priv->type != 0)
		return e->priv;
	if (e->pub != NULL && e->pub->type != 0)
		return e->pub;
	if (e->cert != NULL && e->cert->type != 0)
		return e->cert;
	return NULL;
}

static const struct obj *
entry_spkisrc(const struct entry *e)
{
	if (e->pub != NULL && e->pub->spki != NULL)
		return e->pub;
	if (e->cert != NULL && e->cert->spki != NULL)
		return e->cert;
	if (e->priv != NULL && e->priv->spki != NULL)
		return e->priv;
	return NULL;
}

static const struct obj *
entry_idsrc(const struct entry *e)
{
	return e->priv != NULL ? e->priv : e->pub != NULL ? e->pub : e->cert;
}

static int
same_id(const struct obj *a, const struct obj *b)
{
	return a->id_len > 0 && a->id_len == b->id_len && memcmp(a->id, b->id, a->id_len) == 0;
}

static int
same_spki(const struct obj *a, const struct obj *b)
{
	return a != NULL && b != NULL && a->spki != NULL && b->spki != NULL &&
	    a->spki_len == b->spki_len && memcmp(a->spki, b->spki, a->spki_len) == 0;
}

/*
 * Pairs o (a public key or certificate) with an entry lacking that part:
 * same CKA_ID first, then same public key.  Returns the entry or NULL.
 */
static struct entry *
entry_pair(struct entry *ents, size_t n, const struct obj *o)
{
	const int is_cert = o->cls == CKO_CERTIFICATE;
	size_t i;

	for (i = 0; i < n; i++) {
		struct obj *have = is_cert ? ents[i].cert : ents[i].pub;
		if (have == NULL && same_id(entry_idsrc(&ents[i]), o))
			return &ents[i];
	}
	for (i = 0; i < n; i++) {
		struct obj *have = is_cert ? ents[i].cert : ents[i].pub;
		if (have == NULL && same_spki(entry_spkisrc(&ents[i]), o))
			return &ents[i];
	}
	return NULL;
}

static void
tok_key_free(struct tok_key *k)
{
	p11a_key_clear(&k->k);
}

void
tok_keys_free(struct tok_key *keys, size_t n)
{
	for (size_t i = 0; i < n; i++)
		tok_key_free(&keys[i]);
	free(keys);
}

static int
key_build(const CK_TOKEN_INFO *ti, const char *token_uri, const struct entry *e, struct tok_key *tk)
{
	const struct obj *ks = entry_keysrc(e), *ss = entry_spkisrc(e), *is = entry_idsrc(e);
	const char *label;
	struct p11a_key *k = &tk->k;

	memset(tk, 0, sizeof(*tk));
	tk->priv = e->priv != NULL ? e->priv->h : CK_INVALID_HANDLE;
	label = e->priv != NULL && e->priv->label[0] ? e->priv->label :
	    e->pub != NULL && e->pub->label[0] ? e->pub->label :
	    e->cert != NULL ? e->cert->label : "";
	k->uri = p11a_uri_format_object(ti, CKO_PRIVATE_KEY, is->id, is->id_len, label);
	k->token_uri = strdup(token_uri);
	k->label = strdup(label);
	k->id_len = is->id_len;
	k->id = tok_dup_bytes(is->id, is->id_len);
	k->type = (uint8_t)ks->type;
	k->bits = ks->bits;
	k->curve = strdup(ks->curve != NULL ? ks->curve : "");
	if (ss != NULL) {
		k->spki = tok_dup_bytes(ss->spki, ss->spki_len);
		k->spki_len = ss->spki_len;
	}
	if (e->cert != NULL) {
		k->cert = tok_dup_bytes(e->cert->cert, e->cert->cert_len);
		k->cert_len = e->cert->cert_len;
		k->cert_uri = p11a_uri_format_object(ti, CKO_CERTIFICATE, e->cert->id,
						     e->cert->id_len, e->cert->label);
		k->cert_label = strdup(e->cert->label);
		k->flags |= P11A_KEY_HAS_CERT;
	} else {
		k->cert_uri = strdup("");
		k->cert_label = strdup("");
	}
	if (e->priv != NULL) {
		k->flags |= P11A_KEY_PRIVATE_VISIBLE;
		if (e->priv->always_auth)
			k->flags |= P11A_KEY_ALWAYS_AUTH;
	}
	if (k->uri == NULL || k->token_uri == NULL || k->label == NULL || k->curve == NULL ||
	    (k->id_len > 0 && k->id == NULL) || (ss != NULL && k->spki == NULL) ||
	    (e->cert != NULL && k->cert == NULL) || k->cert_uri == NULL || k->cert_label == NULL) {
		tok_key_free(tk);
		return -P11A_E_NOMEM;
	}
	return 0;
}

/* Keys in CKA_ID order, then label: the inventory does not churn with find order. */
static int
key_cmp(const void *a, const void *b)
{
	const struct p11a_key *x = &((const struct tok_key *)a)->k;
	const struct p11a_key *y = &((const struct tok_key *)b)->k;
	size_t n = x->id_len < y->id_len ? x->id_len : y->id_len;
	int c = n > 0 ? memcmp(x->id, y->id, n) : 0;

	if (c != 0)
		return c;
	if (x->id_len != y->id_len)
		return x->id_len < y->id_len ? -1 : 1;
	return strcmp(x->label, y->label);
}

/*
 * Lists the keys of the token in s: one entry per private key, public key
 * or certificate that belongs together (CKA_ID, else equal public key).
 * When private objects are visible (logged in, or no login needed), a
 * public key or certificate without a private key is no key of ours.
 */
CK_RV
tok_keys_read(struct token_module *m, CK_SESSION_HANDLE h, const CK_TOKEN_INFO *ti,
	      const char *token_uri, int private_visible, struct tok_key **out, size_t *count)
{
	struct obj *objs[3] = { NULL, NULL, NULL };
	size_t nobjs[3] = { 0, 0, 0 };
	static const CK_OBJECT_CLASS classes[3] = { CKO_PRIVATE_KEY, CKO_PUBLIC_KEY, CKO_CERTIFICATE };
	struct entry *ents = NULL;
	struct tok_key *keys = NULL;
	size_t nents = 0, nkeys = 0, total, c, i;
	CK_RV rv = CKR_OK;

	*out = NULL;
	*count = 0;
	for (c = 0; c < 3; c++) {
		if ((rv = objs_read(m, h, classes[c], &objs[c], &nobjs[c])) != CKR_OK)
			goto out;
	}
	total = nobjs[0] + nobjs[1] + nobjs[2];
	if (total == 0)
		goto out;
	if ((ents = calloc(total, sizeof(*ents))) == NULL ||
	    (keys = calloc(total, sizeof(*keys))) == NULL) {
		rv = CKR_HOST_MEMORY;
		goto out;
	}
	for (i = 0; i < nobjs[0]; i++)
		ents[nents++].priv = &objs[0][i];
	for (c = 1; c < 3; c++) {
		for (i = 0; i < nobjs[c]; i++) {
			struct obj *o = &objs[c][i];
			struct entry *e = entry_pair(ents, nents, o);
			if (e == NULL) {
				if (c == 2) {
					/* A second certificate for a paired key is not another key. */
					int dup = 0;
					for (size_t j = 0; j < nents && !dup; j++)
						dup = ents[j].cert != NULL && same_id(ents[j].cert, o);
					if (dup)
						continue;
				}
				e = &ents[nents++];
			}
			if (c == 1)
				e->pub = o;
			else
				e->cert = o;
		}
	}
	for (i = 0; i < nents; i++) {
		const struct obj *ks = entry_keysrc(&ents[i]);
		if (ks == NULL) {
			log_debug("object '%s': key type not supported, not listed",
				  entry_idsrc(&ents[i])->label);
			continue;
		}
		if (ents[i].priv == NULL && private_visible)
			continue;
		if (key_build(ti, token_uri, &ents[i], &keys[nkeys]) != 0) {
			rv = CKR_HOST_MEMORY;
			goto out;
		}
		nkeys++;
	}
	if (nkeys > 1)
		qsort(keys, nkeys, sizeof(*keys), key_cmp);
	*out = keys;
	*count = nkeys;
	keys = NULL;
	nkeys = 0;
 out:
	tok_keys_free(keys, nkeys);
	free(ents);
	for (c = 0; c < 3; c++) {
		for (i = 0; i < nobjs[c]; i++)
			obj_free(&objs[c][i]);
		free(objs[c]);
	}
	return rv;
}
