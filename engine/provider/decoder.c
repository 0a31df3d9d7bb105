/*
 * Decoders for key-reference files (`p11agent export-key`), so that
 * programs that only read a key *file* (curl, python's ssl, nginx) use a
 * key held by the agent.
 *
 *   PEM "P11AGENT KEY"  --(DER decoder, input=pem)-->  DER P11AgentKey
 *   DER P11AgentKey     --(RSA/RSA-PSS/EC/ED25519 decoders, input=der,
 *                          structure=p11agent-key)-->  key reference
 *
 * Every decoder declines, silently and without consuming anything that
 * matters, input that is not a key reference: software keys in the same
 * process keep going to the default provider's decoders.  Only a PEM
 * block labelled "P11AGENT KEY" whose contents are broken stops decoding
 * with an error: that input is ours and no other decoder can read it.
 */
#include "config.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/bio.h>
#include <openssl/core_names.h>
#include <openssl/core_object.h>
#include <openssl/err.h>
#include <openssl/params.h>
#include <openssl/pem.h>

#include "provider.h"

struct dec_ctx {
	struct p11agent_prov *prov;
	int type;                       /* key decoders: the key type this one produces */
};

/* ================================================================ core BIO as a BIO */

struct corebio {
	const struct p11agent_prov *prov;
	OSSL_CORE_BIO *in;
};

static int
corebio_read_ex(BIO *b, char *data, size_t len, size_t *readbytes)
{
	struct corebio *cb = BIO_get_data(b);

	return cb->prov->c_bio_read_ex(cb->in, data, len, readbytes);
}

static int
corebio_gets(BIO *b, char *buf, int size)
{
	struct corebio *cb = BIO_get_data(b);
	size_t got;
	int n = 0;

	if (cb->prov->c_bio_gets != NULL)
		return cb->prov->c_bio_gets(cb->in, buf, size);
	/* One byte at a time, so that nothing past the line is consumed. */
	while (n < size - 1) {
		if (cb->prov->c_bio_read_ex(cb->in, buf + n, 1, &got) != 1 || got != 1)
			break;
		if (buf[n++] == '\n')
			break;
	}
	if (size > 0)
		buf[n] = '\0';
	return n;
}

static long
corebio_ctrl(BIO *b, int cmd, long num, void *ptr)
{
	return cmd == BIO_CTRL_FLUSH ? 1 : 0;
}

static int
corebio_create(BIO *b)
{
	BIO_set_init(b, 1);
	return 1;
}

static BIO_METHOD *g_corebio_method;
static pthread_once_t g_corebio_once = PTHREAD_ONCE_INIT;

static void
corebio_method_init(void)
{
	BIO_METHOD *m;

	if ((m = BIO_meth_new(BIO_TYPE_SOURCE_SINK | BIO_get_new_index(), "p11agent core BIO")) == NULL)
		return;
	if (BIO_meth_set_read_ex(m, corebio_read_ex) != 1 ||
	    BIO_meth_set_gets(m, corebio_gets) != 1 ||
	    BIO_meth_set_ctrl(m, corebio_ctrl) != 1 ||
	    BIO_meth_set_create(m, corebio_create) != 1) {
		BIO_meth_free(m);
		return;
	}
	g_corebio_method = m;   /* lives as long as the module, which is never unloaded */
}

static BIO *
corebio_new(struct corebio *cb)
{
	BIO *b;

	pthread_once(&g_corebio_once, corebio_method_init);
	if (g_corebio_method == NULL || (b = BIO_new(g_corebio_method)) == NULL)
		return NULL;
	BIO_set_data(b, cb);
	return b;
}

/* ================================================================ contexts */

static void *
dec_newctx(void *provctx, int type)
{
	struct dec_ctx *d;

	if ((d = calloc(1, sizeof(*d))) == NULL)
		return NULL;
	d->prov = provctx;
	d->type = type;
	return d;
}

static void
dec_freectx(void *ctx)
{
	free(ctx);
}

static int
dec_does_selection(void *provctx, int selection)
{
	if (selection == 0)
		return 1;
	return (selection & (OSSL_KEYMGMT_SELECT_PRIVATE_KEY | OSSL_KEYMGMT_SELECT_PUBLIC_KEY)) != 0;
}

/*
 * Another provider's keymgmt would get only the public half of a key held
 * by the agent; better no key than a key that cannot sign.
 */
static int
dec_export_object(void *ctx, const void *objref, size_t objref_sz,
		  OSSL_CALLBACK *export_cb, void *export_cbarg)
{
	return 0;
}

/* ================================================================ PEM -> DER */

static void *
pem_newctx(void *provctx)
{
	return dec_newctx(provctx, P11AGENT_KT_NONE);
}

static int
pem_decode(void *ctx, OSSL_CORE_BIO *in, int selection, OSSL_CALLBACK *data_cb,
	   void *data_cbarg, OSSL_PASSPHRASE_CALLBACK *pw_cb, void *pw_cbarg)
{
	struct dec_ctx *d = ctx;
	struct corebio cb = { d->prov, in };
	struct p11agent_keyref ref;
	OSSL_PARAM params[4];
	char *name = NULL, *header = NULL;
	unsigned char *der = NULL;
	long len = 0;
	BIO *b;
	int objtype = OSSL_OBJECT_PKEY, ok = 1, r;

	if ((b = corebio_new(&cb)) == NULL)
		return 1;
	/* Not PEM at all is not an error here: someone else's input. */
	ERR_set_mark();
	r = PEM_read_bio(b, &name, &header, &der, &len);
	ERR_pop_to_mark();
	BIO_free(b);
	if (r != 1 || name == NULL || strcmp(name, P11AGENT_KEYREF_PEM_LABEL) != 0)
		goto out;
	r = len <= 0 ? -P11A_E_MALFORMED : p11agent_keyref_decode(der, (size_t)len, &ref);
	if (r != 0) {
		p11agent_raise(d->prov, P11AGENT_R_BAD_KEY_REFERENCE,
			       "p11agent: the \"" P11AGENT_KEYREF_PEM_LABEL "\" PEM block is not a valid key reference (%s)",
			       p11a_strerror(r));
		ok = 0;
		goto out;
	}
	p11agent_keyref_clear(&ref);
	params[0] = OSSL_PARAM_construct_int(OSSL_OBJECT_PARAM_TYPE, &objtype);
	params[1] = OSSL_PARAM_construct_utf8_string(OSSL_OBJECT_PARAM_DATA_STRUCTURE,
						     (char *)P11AGENT_KEYREF_STRUCTURE, 0);
	params[2] = OSSL_PARAM_construct_octet_string(OSSL_OBJECT_PARAM_DATA, der, (size_t)len);
	params[3] = OSSL_PARAM_construct_end();
	ok = data_cb(params, data_cbarg);
out:
	OPENSSL_free(name);
	OPENSSL_free(header);
	OPENSSL_free(der);
	return ok;
}

/* ================================================================ DER -> key */

/*
 * Reads one DER element (at most P11AGENT_KEYREF_MAX bytes) into *out, or
 * leaves *out NULL when the input is not a candidate.
 */
static void
read_element(struct dec_ctx *d, OSSL_CORE_BIO *in, uint8_t **out, size_t *out_len)
{
	uint8_t hdr[6], *buf;
	size_t have = 0, got, total = 0;
	int r;

	*out = NULL;
	*out_len = 0;
	/* Our structure is a SEQUENCE: look at the header before reading more. */
	for (;;) {
		if (d->prov->c_bio_read_ex(in, hdr + have, 1, &got) != 1 || got != 1)
			return;
		have++;
		if (hdr[0] != 0x30)
			return;
		r = p11agent_der_element_len(hdr, have, &total);
		if (r == 0)
			break;
		if (r != -P11A_E_TRUNCATED || have >= sizeof(hdr))
			return;
	}
	if (total <= have || total > P11AGENT_KEYREF_MAX || (buf = malloc(total)) == NULL)
		return;
	memcpy(buf, hdr, have);
	while (have < total) {
		if (d->prov->c_bio_read_ex(in, buf + have, total - have, &got) != 1 || got == 0) {
			free(buf);
			return;
		}
		have += got;
	}
	*out = buf;
	*out_len = total;
}

/*
 * 0 (raised) when uri names several of the agent's keys.  export-key
 * writes the agent's own URI of one key, but a file can say anything, and
 * a reference carrying its public key would otherwise reach the agent
 * only when signing, after a TLS client has sent the certificate.  When
 * the agent cannot be asked now or knows no such key, the reference
 * stands: signing reports that, as for any reference.
 */
static int
ref_names_one_key(struct p11agent_prov *p, const char *uri)
{
	struct p11a_msg reply;
	const struct p11a_key *k;
	int r;

	ERR_set_mark();
	r = p11agent_agent_find_key(p, uri, &reply, &k);
	p11a_msg_clear(&reply);
	if (r == P11AGENT_R_AMBIGUOUS_URI) {
		ERR_clear_last_mark();
		return 0;
	}
	ERR_pop_to_mark();
	return 1;
}

static int
key_decode(void *ctx, OSSL_CORE_BIO *in, int selection, OSSL_CALLBACK *data_cb,
	   void *data_cbarg, OSSL_PASSPHRASE_CALLBACK *pw_cb, void *pw_cbarg)
{
	struct dec_ctx *d = ctx;
	struct p11agent_keyref ref;
	struct p11agent_objref oref;
	struct p11agent_key *key = NULL;
	OSSL_PARAM params[5];
	uint8_t *der = NULL, *spki = NULL;
	size_t der_len = 0, spki_len = 0;
	char *uri = NULL;
	int objtype = OSSL_OBJECT_PKEY, ok = 1;

	memset(&ref, 0, sizeof(ref));
	read_element(d, in, &der, &der_len);
	if (der == NULL || p11agent_keyref_decode(der, der_len, &ref) != 0)
		goto out;       /* not a key reference: someone else's DER */
	if (ref.spki != NULL) {
		key = p11agent_key_new(d->prov, ref.uri, ref.spki, ref.spki_len, P11AGENT_KT_NONE);
	} else {
		/* A reference without the public key: ask the agent for it. */
		if (!p11agent_agent_spki(d->prov, ref.uri, &spki, &spki_len, &uri)) {
			ok = 0;
			goto out;
		}
		key = p11agent_key_new(d->prov, uri, spki, spki_len, P11AGENT_KT_NONE);
	}
	if (key == NULL) {
		ok = 0;
		goto out;
	}
	if (key->type != d->type)
		goto out;       /* the decoder for that key type takes it */
	if (ref.spki != NULL && !ref_names_one_key(d->prov, ref.uri)) {
		ok = 0;
		goto out;
	}
	memset(&oref, 0, sizeof(oref));
	memcpy(oref.magic, P11AGENT_OBJREF_MAGIC, sizeof(P11AGENT_OBJREF_MAGIC));
	oref.key = key;
	params[0] = OSSL_PARAM_construct_int(OSSL_OBJECT_PARAM_TYPE, &objtype);
	params[1] = OSSL_PARAM_construct_utf8_string(OSSL_OBJECT_PARAM_DATA_TYPE,
						     (char *)p11agent_kt_name(key->type), 0);
	params[2] = OSSL_PARAM_construct_octet_string(OSSL_OBJECT_PARAM_REFERENCE, &oref, sizeof(oref));
	params[3] = OSSL_PARAM_construct_utf8_string(OSSL_OBJECT_PARAM_DESC, key->uri, 0);
	params[4] = OSSL_PARAM_construct_end();
	ok = data_cb(params, data_cbarg);
out:
	p11agent_key_unref(key);
	p11agent_keyref_clear(&ref);
	free(der);
	free(spki);
	free(uri);
	return ok;
}

#define KEY_DECODER(name, TYPE)                                                         \
	static void *name##_dec_newctx(void *provctx)                                   \
	{                                                                               \
		return dec_newctx(provctx, TYPE);                                       \
	}                                                                               \
	const OSSL_DISPATCH p11agent_decoder_##name##_functions[] = {                   \
		{ OSSL_FUNC_DECODER_NEWCTX, (void (*)(void))name##_dec_newctx },        \
		{ OSSL_FUNC_DECODER_FREECTX, (void (*)(void))dec_freectx },             \
		{ OSSL_FUNC_DECODER_DOES_SELECTION, (void (*)(void))dec_does_selection }, \
		{ OSSL_FUNC_DECODER_DECODE, (void (*)(void))key_decode },               \
		{ OSSL_FUNC_DECODER_EXPORT_OBJECT, (void (*)(void))dec_export_object }, \
		{ 0, NULL }                                                             \
	};

KEY_DECODER(rsa, P11AGENT_KT_RSA)
KEY_DECODER(rsapss, P11AGENT_KT_RSA_PSS)
KEY_DECODER(ec, P11AGENT_KT_EC)
KEY_DECODER(ed25519, P11AGENT_KT_ED25519)

const OSSL_DISPATCH p11agent_decoder_pem_functions[] = {
	{ OSSL_FUNC_DECODER_NEWCTX, (void (*)(void))pem_newctx },
	{ OSSL_FUNC_DECODER_FREECTX, (void (*)(void))dec_freectx },
	{ OSSL_FUNC_DECODER_DOES_SELECTION, (void (*)(void))dec_does_selection },
	{ OSSL_FUNC_DECODER_DECODE, (void (*)(void))pem_decode },
	{ OSSL_FUNC_DECODER_EXPORT_OBJECT, (void (*)(void))dec_export_object },
	{ 0, NULL }
};
