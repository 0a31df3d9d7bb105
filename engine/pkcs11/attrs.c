/*
 * Object attributes built from the agent's LIST record of a key: its
 * SubjectPublicKeyInfo and paired certificate are all the module knows,
 * and all that NSS and GnuTLS read.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/objects.h>
#include <openssl/x509.h>

#include "p11m.h"

struct alist {
	struct p11m_attr *a;
	size_t n, cap;
	int err;
};

static void
add_bytes(struct alist *l, CK_ATTRIBUTE_TYPE type, const void *val, size_t len)
{
	struct p11m_attr *na;
	uint8_t *copy;

	if (l->err)
		return;
	if (l->n == l->cap) {
		size_t cap = l->cap ? l->cap * 2 : 32;
		if ((na = realloc(l->a, cap * sizeof(*na))) == NULL) {
			l->err = 1;
			return;
		}
		l->a = na;
		l->cap = cap;
	}
	/* One byte more than needed so that empty values still own a block. */
	if ((copy = malloc(len + 1)) == NULL) {
		l->err = 1;
		return;
	}
	if (len > 0)
		memcpy(copy, val, len);
	l->a[l->n].type = type;
	l->a[l->n].val = copy;
	l->a[l->n].len = len;
	l->n++;
}

static void
add_bool(struct alist *l, CK_ATTRIBUTE_TYPE type, int v)
{
	CK_BBOOL b = v ? CK_TRUE : CK_FALSE;
	add_bytes(l, type, &b, sizeof(b));
}

static void
add_ulong(struct alist *l, CK_ATTRIBUTE_TYPE type, CK_ULONG v)
{
	add_bytes(l, type, &v, sizeof(v));
}

static void
add_str(struct alist *l, CK_ATTRIBUTE_TYPE type, const char *s)
{
	add_bytes(l, type, s, s ? strlen(s) : 0);
}

/* i2d of a name or integer into the list; a NULL input adds nothing. */
static void
add_name(struct alist *l, CK_ATTRIBUTE_TYPE type, const X509_NAME *name)
{
	unsigned char *der = NULL;
	int len;

	if (name == NULL || (len = i2d_X509_NAME(name, &der)) <= 0) {
		l->err = l->err || name != NULL;
		return;
	}
	add_bytes(l, type, der, (size_t)len);
	OPENSSL_free(der);
}

/* A BIGNUM parameter of pkey as big-endian bytes. */
static void
add_bn(struct alist *l, CK_ATTRIBUTE_TYPE type, const EVP_PKEY *pkey, const char *param)
{
	BIGNUM *bn = NULL;
	unsigned char *buf;
	int len;

	if (!EVP_PKEY_get_bn_param(pkey, param, &bn)) {
		l->err = 1;
		return;
	}
	len = BN_num_bytes(bn);
	if ((buf = malloc(len > 0 ? (size_t)len : 1)) == NULL) {
		BN_free(bn);
		l->err = 1;
		return;
	}
	BN_bn2bin(bn, buf);
	add_bytes(l, type, buf, (size_t)len);
	free(buf);
	BN_free(bn);
}

/* DER OCTET STRING around a point (CKA_EC_POINT, as SoftHSM2 and NSS store it). */
static void
add_octet_string(struct alist *l, CK_ATTRIBUTE_TYPE type, const uint8_t *p, size_t len)
{
	uint8_t buf[8 + 200];
	size_t h = 0;

	if (len > 200) {
		l->err = 1;
		return;
	}
	buf[h++] = 0x04;
	if (len < 0x80) {
		buf[h++] = (uint8_t)len;
	} else {
		buf[h++] = 0x81;
		buf[h++] = (uint8_t)len;
	}
	memcpy(buf + h, p, len);
	add_bytes(l, type, buf, h + len);
}

void
p11m_obj_attrs_free(struct p11m_obj *o)
{
	size_t i;

	for (i = 0; i < o->nattrs; i++)
		free(o->attrs[i].val);
	free(o->attrs);
	o->attrs = NULL;
	o->nattrs = 0;
}

const struct p11m_attr *
p11m_obj_attr(const struct p11m_obj *o, CK_ATTRIBUTE_TYPE type)
{
	size_t i;

	for (i = 0; i < o->nattrs; i++) {
		if (o->attrs[i].type == type)
			return &o->attrs[i];
	}
	return NULL;
}

int
p11m_attr_is_sensitive(CK_OBJECT_CLASS cls, CK_ATTRIBUTE_TYPE type)
{
	if (cls != CKO_PRIVATE_KEY)
		return 0;
	switch (type) {
	case CKA_VALUE:
	case CKA_PRIVATE_EXPONENT:
	case CKA_PRIME_1:
	case CKA_PRIME_2:
	case CKA_EXPONENT_1:
	case CKA_EXPONENT_2:
	case CKA_COEFFICIENT:
		return 1;
	default:
		return 0;
	}
}

CK_RV
p11m_obj_build(struct p11m_obj *o, CK_OBJECT_CLASS cls, const struct p11a_key *k)
{
	struct alist l = { NULL, 0, 0, 0 };
	const unsigned char *p;
	X509 *cert = NULL;
	X509_PUBKEY *xpk = NULL;
	EVP_PKEY *pkey = NULL;
	const unsigned char *pk_bytes = NULL;
	int pk_len = 0;
	X509_ALGOR *alg = NULL;
	const ASN1_OBJECT *aoid = NULL;
	const void *aparam = NULL;
	int aptype = 0;
	CK_KEY_TYPE ckk;
	const char *label;
	CK_RV rv = CKR_GENERAL_ERROR;

	if (k->cert_len > 0) {
		p = k->cert;
		if ((cert = d2i_X509(NULL, &p, (long)k->cert_len)) == NULL)
			goto out;
	}
	if (cls != CKO_CERTIFICATE || cert == NULL) {
		if (k->spki_len == 0)
			goto out;
	}
	if (k->spki_len > 0) {
		p = k->spki;
		if ((xpk = d2i_X509_PUBKEY(NULL, &p, (long)k->spki_len)) == NULL)
			goto out;
		if (!X509_PUBKEY_get0_param(NULL, &pk_bytes, &pk_len, &alg, xpk))
			goto out;
		X509_ALGOR_get0(&aoid, &aptype, &aparam, alg);
		p = k->spki;
		if ((pkey = d2i_PUBKEY(NULL, &p, (long)k->spki_len)) == NULL)
			goto out;
	}

	o->keytype = k->type;
	o->bits = k->bits;
	switch (k->type) {
	case P11A_KEY_RSA:
		ckk = CKK_RSA;
		o->sig_len = (k->bits + 7) / 8;
		o->field_len = 0;
		break;
	case P11A_KEY_EC:
		ckk = CKK_EC;
		o->field_len = (k->bits + 7) / 8;
		o->sig_len = 2 * o->field_len;
		break;
	case P11A_KEY_ED25519:
		ckk = CKK_EC_EDWARDS;
		o->field_len = 0;
		o->sig_len = 64;
		break;
	default:
		goto out;
	}

	add_ulong(&l, CKA_CLASS, cls);
	add_bool(&l, CKA_TOKEN, 1);
	add_bool(&l, CKA_PRIVATE, cls == CKO_PRIVATE_KEY);
	add_bool(&l, CKA_MODIFIABLE, 0);
	add_bool(&l, CKA_COPYABLE, 0);
	add_bool(&l, CKA_DESTROYABLE, 0);
	label = k->label;
	if (cls == CKO_CERTIFICATE && k->cert_label != NULL && *k->cert_label != '\0')
		label = k->cert_label;
	add_str(&l, CKA_LABEL, label);
	add_bytes(&l, CKA_ID, k->id, k->id_len);

	if (cls == CKO_CERTIFICATE) {
		const ASN1_INTEGER *serial;
		unsigned char *der = NULL;
		int len;

		if (cert == NULL)
			goto out;
		add_ulong(&l, CKA_CERTIFICATE_TYPE, CKC_X_509);
		add_bool(&l, CKA_TRUSTED, 0);
		add_ulong(&l, CKA_CERTIFICATE_CATEGORY, 1); /* token user */
		add_bytes(&l, CKA_VALUE, k->cert, k->cert_len);
		add_name(&l, CKA_SUBJECT, X509_get_subject_name(cert));
		add_name(&l, CKA_ISSUER, X509_get_issuer_name(cert));
		serial = X509_get0_serialNumber(cert);
		if ((len = i2d_ASN1_INTEGER(serial, &der)) <= 0)
			goto out;
		add_bytes(&l, CKA_SERIAL_NUMBER, der, (size_t)len);
		OPENSSL_free(der);
		add_bytes(&l, CKA_START_DATE, "", 0);
		add_bytes(&l, CKA_END_DATE, "", 0);
		if (k->spki_len > 0)
			add_bytes(&l, CKA_PUBLIC_KEY_INFO, k->spki, k->spki_len);
		goto done;
	}

	/* Keys */
	add_ulong(&l, CKA_KEY_TYPE, ckk);
	add_bytes(&l, CKA_START_DATE, "", 0);
	add_bytes(&l, CKA_END_DATE, "", 0);
	add_bool(&l, CKA_DERIVE, 0);
	add_bool(&l, CKA_LOCAL, 0);
	add_ulong(&l, CKA_KEY_GEN_MECHANISM, CK_UNAVAILABLE_INFORMATION);
	if (cert != NULL)
		add_name(&l, CKA_SUBJECT, X509_get_subject_name(cert));
	else
		add_bytes(&l, CKA_SUBJECT, "", 0);
	add_bytes(&l, CKA_PUBLIC_KEY_INFO, k->spki, k->spki_len);
	if (cls == CKO_PUBLIC_KEY) {
		add_bool(&l, CKA_ENCRYPT, 0);
		add_bool(&l, CKA_VERIFY, 1);
		add_bool(&l, CKA_VERIFY_RECOVER, 0);
		add_bool(&l, CKA_WRAP, 0);
		add_bool(&l, CKA_TRUSTED, 0);
	} else {
		add_bool(&l, CKA_SENSITIVE, 1);
		add_bool(&l, CKA_DECRYPT, 0);
		add_bool(&l, CKA_SIGN, 1);
		add_bool(&l, CKA_SIGN_RECOVER, 0);
		add_bool(&l, CKA_UNWRAP, 0);
		add_bool(&l, CKA_EXTRACTABLE, 0);
		add_bool(&l, CKA_ALWAYS_SENSITIVE, 1);
		add_bool(&l, CKA_NEVER_EXTRACTABLE, 1);
		add_bool(&l, CKA_WRAP_WITH_TRUSTED, 0);
		add_bool(&l, CKA_ALWAYS_AUTHENTICATE, 0);
	}
	switch (k->type) {
	case P11A_KEY_RSA:
		add_bn(&l, CKA_MODULUS, pkey, OSSL_PKEY_PARAM_RSA_N);
		add_bn(&l, CKA_PUBLIC_EXPONENT, pkey, OSSL_PKEY_PARAM_RSA_E);
		if (cls == CKO_PUBLIC_KEY)
			add_ulong(&l, CKA_MODULUS_BITS, k->bits);
		break;
	case P11A_KEY_EC:
	case P11A_KEY_ED25519: {
		unsigned char *der = NULL;
		int len;

		if (k->type == P11A_KEY_EC) {
			/* id-ecPublicKey's parameter is the named curve OID */
			if (aptype != V_ASN1_OBJECT || aparam == NULL)
				goto out;
			len = i2d_ASN1_OBJECT((const ASN1_OBJECT *)aparam, &der);
		} else {
			/* RFC 8410: the algorithm OID names the curve (1.3.101.112) */
			len = i2d_ASN1_OBJECT(aoid, &der);
		}
		if (len <= 0)
			goto out;
		add_bytes(&l, CKA_EC_PARAMS, der, (size_t)len);
		OPENSSL_free(der);
		add_octet_string(&l, CKA_EC_POINT, pk_bytes, (size_t)pk_len);
		break;
	}
	}
done:
	if (l.err) {
		rv = CKR_HOST_MEMORY;
		goto out;
	}
	p11m_obj_attrs_free(o);
	o->attrs = l.a;
	o->nattrs = l.n;
	o->cls = cls;
	l.a = NULL;
	l.n = 0;
	rv = CKR_OK;
out:
	if (l.a != NULL) {
		struct p11m_obj tmp = { .attrs = l.a, .nattrs = l.n };
		p11m_obj_attrs_free(&tmp);
	}
	X509_free(cert);
	X509_PUBKEY_free(xpk);
	EVP_PKEY_free(pkey);
	return rv;
}
