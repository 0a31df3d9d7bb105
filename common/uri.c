/*
 * RFC 7512 pkcs11: URIs, formatted and matched with p11-kit.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <p11-kit/uri.h>

#include "p11a.h"
#include "uri.h"

struct p11a_uri_matcher {
	P11KitUri *uri;
	int has_class;
	CK_OBJECT_CLASS cls;
};

/*
 * Some tokens pad their text fields with NULs (tpm2-pkcs11); the URI and
 * every comparison want spaces.
 */
static void
pad_field(CK_UTF8CHAR *f, size_t size)
{
	size_t i;

	for (i = 0; i < size && f[i] != '\0'; i++)
		;
	for (; i < size; i++)
		f[i] = ' ';
}

static void
token_info_normalize(CK_TOKEN_INFO *ti)
{
	pad_field(ti->label, sizeof(ti->label));
	pad_field(ti->manufacturerID, sizeof(ti->manufacturerID));
	pad_field(ti->model, sizeof(ti->model));
	pad_field(ti->serialNumber, sizeof(ti->serialNumber));
}

static char *
uri_format(P11KitUri *uri, P11KitUriType type)
{
	char *s = NULL;

	if (p11_kit_uri_format(uri, type, &s) != P11_KIT_URI_OK)
		return NULL;
	return s;
}

char *
p11a_uri_format_token(const CK_TOKEN_INFO *ti)
{
	P11KitUri *uri;
	CK_TOKEN_INFO *uti;
	char *s;

	if (ti == NULL || (uri = p11_kit_uri_new()) == NULL)
		return NULL;
	uti = p11_kit_uri_get_token_info(uri);
	memcpy(uti, ti, sizeof(*uti));
	token_info_normalize(uti);
	s = uri_format(uri, P11_KIT_URI_FOR_TOKEN);
	p11_kit_uri_free(uri);
	return s;
}

char *
p11a_uri_format_object(const CK_TOKEN_INFO *ti, CK_OBJECT_CLASS cls,
		       const unsigned char *id, size_t id_len, const char *label)
{
	P11KitUri *uri;
	CK_TOKEN_INFO *uti;
	CK_ATTRIBUTE a;
	char *s = NULL;

	if (ti == NULL || (id == NULL && id_len != 0))
		return NULL;
	if ((uri = p11_kit_uri_new()) == NULL)
		return NULL;
	uti = p11_kit_uri_get_token_info(uri);
	memcpy(uti, ti, sizeof(*uti));
	token_info_normalize(uti);

	a.type = CKA_CLASS;
	a.pValue = &cls;
	a.ulValueLen = sizeof(cls);
	if (p11_kit_uri_set_attribute(uri, &a) != P11_KIT_URI_OK)
		goto out;
	if (id_len != 0) {
		a.type = CKA_ID;
		a.pValue = (void *)id;
		a.ulValueLen = id_len;
		if (p11_kit_uri_set_attribute(uri, &a) != P11_KIT_URI_OK)
			goto out;
	}
	if (label != NULL && *label != '\0') {
		a.type = CKA_LABEL;
		a.pValue = (void *)label;
		a.ulValueLen = strlen(label);
		if (p11_kit_uri_set_attribute(uri, &a) != P11_KIT_URI_OK)
			goto out;
	}
	s = uri_format(uri, P11_KIT_URI_FOR_OBJECT_ON_TOKEN);
 out:
	p11_kit_uri_free(uri);
	return s;
}

struct p11a_uri_matcher *
p11a_uri_matcher_new(const char *uri, int *err)
{
	struct p11a_uri_matcher *m = NULL;
	CK_ATTRIBUTE *a;
	int r = -P11A_E_URI;

	if (uri == NULL || strlen(uri) > P11A_URI_MAX ||
	    strncasecmp(uri, "pkcs11:", 7) != 0)
		goto fail;
	if ((m = calloc(1, sizeof(*m))) == NULL || (m->uri = p11_kit_uri_new()) == NULL) {
		r = -P11A_E_NOMEM;
		goto fail;
	}
	if (p11_kit_uri_parse(uri, P11_KIT_URI_FOR_ANY, m->uri) != P11_KIT_URI_OK)
		goto fail;
	if ((a = p11_kit_uri_get_attribute(m->uri, CKA_CLASS)) != NULL) {
		if (a->pValue == NULL || a->ulValueLen != sizeof(CK_OBJECT_CLASS))
			goto fail;
		memcpy(&m->cls, a->pValue, sizeof(m->cls));
		m->has_class = 1;
	}
	if (err != NULL)
		*err = 0;
	return m;
 fail:
	p11a_uri_matcher_free(m);
	if (err != NULL)
		*err = r;
	return NULL;
}

void
p11a_uri_matcher_free(struct p11a_uri_matcher *m)
{
	if (m == NULL)
		return;
	if (m->uri != NULL)
		p11_kit_uri_free(m->uri);
	free(m);
}

/* Copies a trimmed C string into a space-padded PKCS#11 text field. */
static void
field_set(CK_UTF8CHAR *f, size_t size, const char *s)
{
	size_t n = s == NULL ? 0 : strlen(s);

	memset(f, ' ', size);
	if (n > size)
		n = size;
	if (n != 0)
		memcpy(f, s, n);
}

int
p11a_uri_match_token(const struct p11a_uri_matcher *m, const struct p11a_token *t)
{
	CK_TOKEN_INFO ti;

	if (m == NULL || t == NULL)
		return 0;
	memset(&ti, 0, sizeof(ti));
	field_set(ti.label, sizeof(ti.label), t->label);
	field_set(ti.manufacturerID, sizeof(ti.manufacturerID), t->manufacturer);
	field_set(ti.model, sizeof(ti.model), t->model);
	field_set(ti.serialNumber, sizeof(ti.serialNumber), t->serial);
	return p11_kit_uri_match_token_info(m->uri, &ti) == 1;
}

/* id= and object= against the key's CKA_ID and one label. */
static int
match_id_label(const struct p11a_uri_matcher *m, const struct p11a_key *k, const char *label)
{
	CK_ATTRIBUTE attrs[2];

	if (label == NULL)
		label = "";
	/*
	 * p11-kit only checks the URI attributes whose type appears in attrs,
	 * so both are always passed, even when empty.
	 */
	attrs[0].type = CKA_ID;
	attrs[0].pValue = k->id;
	attrs[0].ulValueLen = k->id == NULL ? 0 : k->id_len;
	attrs[1].type = CKA_LABEL;
	attrs[1].pValue = (void *)label;
	attrs[1].ulValueLen = strlen(label);
	return p11_kit_uri_match_attributes(m->uri, attrs, 2) == 1;
}

static int
key_has_cert(const struct p11a_key *k)
{
	return (k->flags & P11A_KEY_HAS_CERT) || k->cert_len != 0 ||
	    (k->cert_uri != NULL && *k->cert_uri != '\0');
}

int
p11a_uri_match_key(const struct p11a_uri_matcher *m, const struct p11a_token *t,
		   const struct p11a_key *k)
{
	if (m == NULL || k == NULL || !p11a_uri_match_token(m, t))
		return 0;
	if (m->has_class) {
		switch (m->cls) {
		case CKO_PRIVATE_KEY:
		case CKO_PUBLIC_KEY:
			return match_id_label(m, k, k->label);
		case CKO_CERTIFICATE:
			/* type=cert names the certificate object: there must be one. */
			return key_has_cert(k) && match_id_label(m, k, k->cert_label);
		default:
			return 0;
		}
	}
	if (match_id_label(m, k, k->label))
		return 1;
	return key_has_cert(k) && match_id_label(m, k, k->cert_label);
}

const struct p11a_token *
p11a_list_find_token(const struct p11a_list_reply *l, const char *token_uri)
{
	uint32_t i;

	if (l == NULL || token_uri == NULL)
		return NULL;
	for (i = 0; i < l->ntokens; i++) {
		if (l->tokens[i].uri != NULL && strcmp(l->tokens[i].uri, token_uri) == 0)
			return &l->tokens[i];
	}
	return NULL;
}

int
p11a_list_match_keys(const struct p11a_list_reply *l, const char *uri,
		     uint32_t *idx, size_t max, size_t *n)
{
	struct p11a_uri_matcher *m;
	const struct p11a_token *t;
	uint32_t i;
	int err = 0;

	*n = 0;
	if (uri == NULL || (m = p11a_uri_matcher_new(uri, &err)) == NULL)
		return err != 0 ? err : -P11A_E_URI;
	for (i = 0; l != NULL && i < l->nkeys; i++) {
		const struct p11a_key *k = &l->keys[i];

		if ((t = p11a_list_find_token(l, k->token_uri)) == NULL || k->uri == NULL)
			continue;
		if (p11a_uri_match_key(m, t, k) != 1)
			continue;
		if (*n < max && idx != NULL)
			idx[*n] = i;
		(*n)++;
	}
	p11a_uri_matcher_free(m);
	return 0;
}
