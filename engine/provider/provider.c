/*
 * p11agent OpenSSL 3 provider: initialisation, algorithm tables, errors,
 * keys, and the agent connections.
 *
 * Connections: a pool of idle p11a_client connections (common/pool.h),
 * filled lazily.  A signing thread takes one (or opens a new one), signs,
 * and puts it back, so threads sign in parallel on their own connections;
 * the pool's lock is never held across I/O and a forked child drops what
 * it inherited.  The module is linked -z nodelete so the pthread_atfork()
 * handlers (the pool's and g_lock's) can never point into an unloaded
 * library.  p11a_client itself reconnects once when the agent restarted.
 */
#include "config.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/un.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/params.h>
#include <openssl/provider.h>
#include <openssl/x509.h>

#include "p11a.h"
#include "proto.h"
#include "client.h"
#include "pool.h"
#include "uri.h"
#include "text.h"
#include "provider.h"

#define P11AGENT_CLIENT_NAME    "p11agent-provider " PACKAGE_VERSION
#define POOL_MAX                16

/* The lock of the lazy library context: short holds, no I/O. */
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t g_atfork_once = PTHREAD_ONCE_INIT;

static void
atfork_prepare(void)
{
	pthread_mutex_lock(&g_lock);
}

static void
atfork_release(void)
{
	pthread_mutex_unlock(&g_lock);
}

static void
atfork_register(void)
{
	(void)pthread_atfork(atfork_prepare, atfork_release, atfork_release);
}

/* ================================================================ errors */

/*
 * Reason strings are registered once per provider load; the one for a
 * missing agent names the socket, because some clients (curl) print only
 * the reason string and not the error's data.
 */
static char g_not_running_text[sizeof(((struct sockaddr_un *)0)->sun_path) + 128] =
	"agent not running";

static OSSL_ITEM reason_strings[] = {
	{ P11AGENT_R_AGENT_NOT_RUNNING, g_not_running_text },
	{ P11AGENT_R_AGENT_ERROR, "agent error" },
	{ P11AGENT_R_TOKEN_LOCKED, "token locked: run 'p11agent unlock'" },
	{ P11AGENT_R_NO_SUCH_KEY, "no such key" },
	{ P11AGENT_R_AMBIGUOUS_URI, "URI matches several keys" },
	{ P11AGENT_R_BAD_URI, "not a valid pkcs11: URI" },
	{ P11AGENT_R_BAD_KEY_REFERENCE, "bad p11agent key reference" },
	{ P11AGENT_R_UNSUPPORTED, "not supported by p11agent" },
	{ P11AGENT_R_BAD_REPLY, "bad reply from the agent" },
	{ P11AGENT_R_INTERNAL, "p11agent internal error" },
	{ P11AGENT_R_BUFFER_TOO_SMALL, "signature buffer too small" },
	{ P11AGENT_R_BAD_PARAMETER, "bad parameter" },
	{ P11AGENT_R_POLICY, "not allowed by the key's policy (p11agentd.conf: tls-only)" },
	{ 0, NULL }
};

static void
vset_error(const struct p11agent_prov *p, int reason, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	p->c_vset_error(p->handle, (uint32_t)reason, fmt, ap);
	va_end(ap);
}

void
p11agent_raise_at(const struct p11agent_prov *p, const char *file, int line,
		  const char *func, int reason, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	if (p == NULL || p->c_new_error == NULL || p->c_vset_error == NULL)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	/* Agent text carries token labels: nothing in it may drive a terminal. */
	p11a_text_scrub(msg);
	p->c_new_error(p->handle);
	if (p->c_set_error_debug != NULL)
		p->c_set_error_debug(p->handle, file, line, func);
	vset_error(p, reason, "%s", msg);
}

/* ================================================================ keys */

OSSL_LIB_CTX *
p11agent_pub_libctx(struct p11agent_prov *p)
{
	OSSL_LIB_CTX *lc;
	OSSL_PROVIDER *dp = NULL;

	pthread_mutex_lock(&g_lock);
	if ((lc = p->pub_libctx) == NULL) {
		/* A context of our own: the default provider, never this one. */
		if ((lc = OSSL_LIB_CTX_new()) != NULL &&
		    (dp = OSSL_PROVIDER_load(lc, "default")) == NULL) {
			OSSL_LIB_CTX_free(lc);
			lc = NULL;
		}
		p->pub_libctx = lc;
		p->pub_default = dp;
	}
	pthread_mutex_unlock(&g_lock);
	if (lc == NULL)
		p11agent_raise(p, P11AGENT_R_INTERNAL,
			       "p11agent: cannot load OpenSSL's default provider for public keys");
	return lc;
}

static int
pub_type(EVP_PKEY *pub)
{
	if (EVP_PKEY_is_a(pub, "RSA-PSS"))
		return P11AGENT_KT_RSA_PSS;
	if (EVP_PKEY_is_a(pub, "RSA"))
		return P11AGENT_KT_RSA;
	if (EVP_PKEY_is_a(pub, "EC"))
		return P11AGENT_KT_EC;
	if (EVP_PKEY_is_a(pub, "ED25519"))
		return P11AGENT_KT_ED25519;
	return P11AGENT_KT_NONE;
}

struct p11agent_key *
p11agent_key_new(struct p11agent_prov *p, const char *uri,
		 const uint8_t *spki, size_t spki_len, int want_type)
{
	struct p11agent_key *k = NULL;
	OSSL_LIB_CTX *lc;
	const unsigned char *q = spki;
	EVP_PKEY *pub = NULL;
	char group[64];
	size_t glen = 0;
	int type, size;

	if ((lc = p11agent_pub_libctx(p)) == NULL)
		return NULL;
	if (spki == NULL || spki_len == 0 || spki_len > (size_t)LONG_MAX ||
	    (pub = d2i_PUBKEY_ex(NULL, &q, (long)spki_len, lc, NULL)) == NULL ||
	    q != spki + spki_len) {
		p11agent_raise(p, P11AGENT_R_BAD_KEY_REFERENCE,
			       "p11agent: the public key of %s cannot be decoded",
			       uri != NULL ? uri : "the key");
		goto fail;
	}
	if ((type = pub_type(pub)) == P11AGENT_KT_NONE) {
		p11agent_raise(p, P11AGENT_R_UNSUPPORTED,
			       "p11agent: key %s has type %s, which p11agent cannot use",
			       uri != NULL ? uri : "", EVP_PKEY_get0_type_name(pub));
		goto fail;
	}
	if (want_type != P11AGENT_KT_NONE && want_type != type) {
		p11agent_raise(p, P11AGENT_R_BAD_KEY_REFERENCE,
			       "p11agent: key %s is %s, not %s", uri != NULL ? uri : "",
			       p11agent_kt_name(type), p11agent_kt_name(want_type));
		goto fail;
	}
	/* TLS needs a named curve (FIELD-NOTES: explicit parameters are rejected). */
	if (type == P11AGENT_KT_EC &&
	    EVP_PKEY_get_group_name(pub, group, sizeof(group), &glen) != 1) {
		p11agent_raise(p, P11AGENT_R_UNSUPPORTED,
			       "p11agent: EC key %s does not use a named curve", uri != NULL ? uri : "");
		goto fail;
	}
	if ((size = EVP_PKEY_get_size(pub)) <= 0) {
		p11agent_raise(p, P11AGENT_R_INTERNAL, "p11agent: cannot size key %s",
			       uri != NULL ? uri : "");
		goto fail;
	}
	if ((k = calloc(1, sizeof(*k))) == NULL ||
	    (k->spki = malloc(spki_len)) == NULL ||
	    (uri != NULL && (k->uri = strdup(uri)) == NULL)) {
		p11agent_raise(p, P11AGENT_R_INTERNAL, "p11agent: out of memory");
		goto fail;
	}
	memcpy(k->spki, spki, spki_len);
	k->spki_len = spki_len;
	k->prov = p;
	k->type = type;
	k->pub = pub;
	k->sig_size = (size_t)size;
	atomic_init(&k->refs, 1);
	return k;
fail:
	if (k != NULL) {
		free(k->spki);
		free(k->uri);
		free(k);
	}
	EVP_PKEY_free(pub);
	return NULL;
}

struct p11agent_key *
p11agent_key_ref(struct p11agent_key *k)
{
	if (k != NULL)
		atomic_fetch_add(&k->refs, 1);
	return k;
}

void
p11agent_key_unref(struct p11agent_key *k)
{
	if (k == NULL || atomic_fetch_sub(&k->refs, 1) != 1)
		return;
	EVP_PKEY_free(k->pub);
	free(k->uri);
	free(k->spki);
	free(k);
}

/* ================================================================ agent */

static const char *
socket_path(const struct p11agent_prov *p, char *buf, size_t size)
{
	if (p->socket_path != NULL)
		return p->socket_path;
	if (p11a_default_socket_path(buf, size) != 0)
		return "(socket path too long)";
	return buf;
}

/*
 * Reports a failed request.  c is NULL when the connection failed; then
 * why is the client library's account of it (it names the socket).
 */
static void
raise_agent(struct p11agent_prov *p, struct p11a_client *c, int r, const char *why,
	    const char *what)
{
	char buf[sizeof(((struct sockaddr_un *)0)->sun_path) + 64];
	const char *path = c != NULL ? p11a_client_path(c) : socket_path(p, buf, sizeof(buf));
	const char *msg = c != NULL ? p11a_client_last_error(c) : why;

	if (msg == NULL || *msg == '\0')
		msg = p11a_strerror(r);
	switch (-r) {
	case P11A_E_NOT_RUNNING:
		p11agent_raise(p, P11AGENT_R_AGENT_NOT_RUNNING,
			       "p11agent: agent not running at %s (start p11agentd, or set P11AGENT_SOCK)",
			       path);
		break;
	case P11A_E_LOCKED:
		p11agent_raise(p, P11AGENT_R_TOKEN_LOCKED, "p11agent: %s", msg);
		break;
	case P11A_E_NO_SUCH_KEY:
		p11agent_raise(p, P11AGENT_R_NO_SUCH_KEY, "p11agent: %s", msg);
		break;
	case P11A_E_AMBIGUOUS:
		p11agent_raise(p, P11AGENT_R_AMBIGUOUS_URI, "p11agent: %s", msg);
		break;
	case P11A_E_URI:
		p11agent_raise(p, P11AGENT_R_BAD_URI, "p11agent: %s", msg);
		break;
	case P11A_E_POLICY:
		p11agent_raise(p, P11AGENT_R_POLICY, "p11agent: %s", msg);
		break;
	case P11A_E_IO:
		if (c != NULL) {
			p11agent_raise(p, P11AGENT_R_AGENT_ERROR, "p11agent: %s: agent at %s: %s",
				       what, path, msg);
			break;
		}
		/* FALLTHROUGH */
	default:
		p11agent_raise(p, P11AGENT_R_AGENT_ERROR, "p11agent: %s: %s", what, msg);
		break;
	}
}

/* A connection from the pool, or a new one.  0 on failure (raised). */
static int
client_get(struct p11agent_prov *p, struct p11a_client **out)
{
	char why[1024];
	int r;

	if ((r = p11a_pool_get(p->pool, out, why, sizeof(why))) != 0) {
		raise_agent(p, NULL, r, why, "connecting");
		return 0;
	}
	return 1;
}

static void
client_put(struct p11agent_prov *p, struct p11a_client *c)
{
	p11a_pool_put(p->pool, c);
}

int
p11agent_agent_list(struct p11agent_prov *p, struct p11a_msg *reply)
{
	struct p11a_client *c;
	int r;

	memset(reply, 0, sizeof(*reply));
	if (!client_get(p, &c))
		return 0;
	errno = 0;
	r = p11a_client_list(c, reply);
	if (r != 0)
		raise_agent(p, c, r, NULL, "listing keys");
	client_put(p, c);
	return r == 0;
}

int
p11agent_agent_sign(struct p11agent_prov *p, const struct p11a_sign *req,
		    uint8_t **sig, size_t *sig_len)
{
	struct p11a_client *c;
	int r;

	*sig = NULL;
	*sig_len = 0;
	if (!client_get(p, &c))
		return 0;
	errno = 0;
	r = p11a_client_sign(c, req, sig, sig_len);
	if (r != 0)
		raise_agent(p, c, r, NULL, "signing");
	client_put(p, c);
	return r == 0;
}

void
p11agent_raise_ambiguous(struct p11agent_prov *p, const char *uri,
			 const struct p11a_list_reply *l, const uint32_t *idx,
			 size_t nidx, size_t n, int certs)
{
	/* Room for a few whole URIs; the raised text is capped at 1024 bytes. */
	char names[600] = "", more[48] = "";
	size_t named = 0, i;

	for (i = 0; i < nidx && i < n; i++) {
		const struct p11a_key *k = &l->keys[idx[i]];

		if (p11a_uri_list_add(names, sizeof(names), certs ? k->cert_uri : k->uri) == 0)
			named++;
	}
	if (named < n)
		snprintf(more, sizeof(more), "%s%zu more", named > 0 ? " and " : "", n - named);
	p11agent_raise(p, P11AGENT_R_AMBIGUOUS_URI,
		       "p11agent: %.256s matches %zu %s (%s%s); name one: add object= or id= "
		       "('p11agent list' shows every URI)",
		       uri, n, certs ? "certificates" : "keys", names, more);
}

int
p11agent_agent_find_key(struct p11agent_prov *p, const char *uri, struct p11a_msg *reply,
			const struct p11a_key **key)
{
	uint32_t idx[P11AGENT_NAMED_MATCHES];
	size_t n = 0;

	*key = NULL;
	if (!p11agent_agent_list(p, reply))
		return P11AGENT_R_AGENT_ERROR;
	if (p11a_list_match_keys(&reply->u.list, uri, idx, P11AGENT_NAMED_MATCHES, &n) != 0) {
		p11agent_raise(p, P11AGENT_R_BAD_URI, "p11agent: not a valid pkcs11: URI: %s", uri);
		return P11AGENT_R_BAD_URI;
	}
	if (n == 0) {
		p11agent_raise(p, P11AGENT_R_NO_SUCH_KEY, "p11agent: no such key: %s", uri);
		return P11AGENT_R_NO_SUCH_KEY;
	}
	if (n > 1) {
		p11agent_raise_ambiguous(p, uri, &reply->u.list, idx, P11AGENT_NAMED_MATCHES, n, 0);
		return P11AGENT_R_AMBIGUOUS_URI;
	}
	*key = &reply->u.list.keys[idx[0]];
	return 0;
}

int
p11agent_agent_spki(struct p11agent_prov *p, const char *uri,
		    uint8_t **spki, size_t *spki_len, char **key_uri)
{
	struct p11a_msg reply;
	const struct p11a_key *k;
	int ok = 0;

	*spki = NULL;
	*spki_len = 0;
	*key_uri = NULL;
	if (p11agent_agent_find_key(p, uri, &reply, &k) != 0)
		goto out;
	if (k->spki == NULL || k->spki_len == 0) {
		p11agent_raise(p, P11AGENT_R_NO_SUCH_KEY,
			       "p11agent: the agent knows no public key for %s", uri);
		goto out;
	}
	if ((*spki = malloc(k->spki_len)) == NULL || (*key_uri = strdup(k->uri)) == NULL) {
		free(*spki);
		*spki = NULL;
		p11agent_raise(p, P11AGENT_R_INTERNAL, "p11agent: out of memory");
		goto out;
	}
	memcpy(*spki, k->spki, k->spki_len);
	*spki_len = k->spki_len;
	ok = 1;
out:
	p11a_msg_clear(&reply);
	return ok;
}

/* ================================================================ provider */

static const OSSL_ALGORITHM keymgmt_algs[] = {
	{ P11AGENT_NAMES_RSA, P11AGENT_PROPS, p11agent_keymgmt_rsa_functions,
	  "RSA key held by p11agent" },
	{ P11AGENT_NAMES_RSA_PSS, P11AGENT_PROPS, p11agent_keymgmt_rsapss_functions,
	  "RSA-PSS key held by p11agent" },
	{ P11AGENT_NAMES_EC, P11AGENT_PROPS, p11agent_keymgmt_ec_functions,
	  "EC key held by p11agent" },
	{ P11AGENT_NAMES_ED25519, P11AGENT_PROPS, p11agent_keymgmt_ed25519_functions,
	  "Ed25519 key held by p11agent" },
	{ NULL, NULL, NULL, NULL }
};

static const OSSL_ALGORITHM signature_algs[] = {
	{ P11AGENT_NAMES_RSA, P11AGENT_PROPS, p11agent_signature_rsa_functions,
	  "RSA PKCS#1 v1.5 and PSS signatures by p11agent" },
	{ P11AGENT_NAMES_ECDSA, P11AGENT_PROPS, p11agent_signature_ecdsa_functions,
	  "ECDSA signatures by p11agent" },
	{ P11AGENT_NAMES_ED25519, P11AGENT_PROPS, p11agent_signature_ed25519_functions,
	  "Ed25519 signatures by p11agent" },
	{ NULL, NULL, NULL, NULL }
};

static const OSSL_ALGORITHM store_algs[] = {
	{ "pkcs11", P11AGENT_PROPS, p11agent_store_functions,
	  "pkcs11: URIs of keys held by p11agent" },
	{ NULL, NULL, NULL, NULL }
};

#define DECODER_DER_PROPS P11AGENT_PROPS ",input=der,structure=" P11AGENT_KEYREF_STRUCTURE
static const OSSL_ALGORITHM decoder_algs[] = {
	{ "DER", P11AGENT_PROPS ",input=pem", p11agent_decoder_pem_functions,
	  "PEM 'P11AGENT KEY' to DER" },
	{ P11AGENT_NAMES_RSA, DECODER_DER_PROPS, p11agent_decoder_rsa_functions,
	  "p11agent key reference to an RSA key" },
	{ P11AGENT_NAMES_RSA_PSS, DECODER_DER_PROPS, p11agent_decoder_rsapss_functions,
	  "p11agent key reference to an RSA-PSS key" },
	{ P11AGENT_NAMES_EC, DECODER_DER_PROPS, p11agent_decoder_ec_functions,
	  "p11agent key reference to an EC key" },
	{ P11AGENT_NAMES_ED25519, DECODER_DER_PROPS, p11agent_decoder_ed25519_functions,
	  "p11agent key reference to an Ed25519 key" },
	{ NULL, NULL, NULL, NULL }
};

static const OSSL_ALGORITHM *
prov_query(void *provctx, int operation_id, int *no_cache)
{
	*no_cache = 0;
	switch (operation_id) {
	case OSSL_OP_KEYMGMT:
		return keymgmt_algs;
	case OSSL_OP_SIGNATURE:
		return signature_algs;
	case OSSL_OP_STORE:
		return store_algs;
	case OSSL_OP_DECODER:
		return decoder_algs;
	default:
		return NULL;
	}
}

static const OSSL_PARAM *
prov_gettable_params(void *provctx)
{
	static const OSSL_PARAM params[] = {
		OSSL_PARAM_DEFN(OSSL_PROV_PARAM_NAME, OSSL_PARAM_UTF8_PTR, NULL, 0),
		OSSL_PARAM_DEFN(OSSL_PROV_PARAM_VERSION, OSSL_PARAM_UTF8_PTR, NULL, 0),
		OSSL_PARAM_DEFN(OSSL_PROV_PARAM_BUILDINFO, OSSL_PARAM_UTF8_PTR, NULL, 0),
		OSSL_PARAM_DEFN(OSSL_PROV_PARAM_STATUS, OSSL_PARAM_INTEGER, NULL, 0),
		OSSL_PARAM_END
	};

	return params;
}

static int
prov_get_params(void *provctx, OSSL_PARAM params[])
{
	OSSL_PARAM *p;

	if ((p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_NAME)) != NULL &&
	    !OSSL_PARAM_set_utf8_ptr(p, "p11agent: keys on PKCS#11 tokens through p11agentd"))
		return 0;
	if ((p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_VERSION)) != NULL &&
	    !OSSL_PARAM_set_utf8_ptr(p, PACKAGE_VERSION))
		return 0;
	if ((p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_BUILDINFO)) != NULL &&
	    !OSSL_PARAM_set_utf8_ptr(p, "p11agent " PACKAGE_VERSION))
		return 0;
	if ((p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_STATUS)) != NULL &&
	    !OSSL_PARAM_set_int(p, 1))
		return 0;
	return 1;
}

static const OSSL_ITEM *
prov_reason_strings(void *provctx)
{
	return reason_strings;
}

static void
prov_free(struct p11agent_prov *p)
{
	if (p == NULL)
		return;
	p11a_pool_free(p->pool);
	if (p->pub_default != NULL)
		OSSL_PROVIDER_unload(p->pub_default);
	OSSL_LIB_CTX_free(p->pub_libctx);
	free(p->socket_path);
	free(p);
}

static void
prov_teardown(void *provctx)
{
	prov_free(provctx);
}

static const OSSL_DISPATCH prov_functions[] = {
	{ OSSL_FUNC_PROVIDER_TEARDOWN, (void (*)(void))prov_teardown },
	{ OSSL_FUNC_PROVIDER_GETTABLE_PARAMS, (void (*)(void))prov_gettable_params },
	{ OSSL_FUNC_PROVIDER_GET_PARAMS, (void (*)(void))prov_get_params },
	{ OSSL_FUNC_PROVIDER_QUERY_OPERATION, (void (*)(void))prov_query },
	{ OSSL_FUNC_PROVIDER_GET_REASON_STRINGS, (void (*)(void))prov_reason_strings },
	{ 0, NULL }
};

__attribute__((visibility("default")))
int OSSL_provider_init(const OSSL_CORE_HANDLE *handle, const OSSL_DISPATCH *in,
		       const OSSL_DISPATCH **out, void **provctx);

int
OSSL_provider_init(const OSSL_CORE_HANDLE *handle, const OSSL_DISPATCH *in,
		   const OSSL_DISPATCH **out, void **provctx)
{
	OSSL_FUNC_core_get_params_fn *c_get_params = NULL;
	struct p11agent_prov *p;
	const char *sock = NULL;
	char buf[sizeof(((struct sockaddr_un *)0)->sun_path) + 64];
	OSSL_PARAM core_params[2];

	*provctx = NULL;
	if ((p = calloc(1, sizeof(*p))) == NULL)
		return 0;
	p->handle = handle;
	for (; in != NULL && in->function_id != 0; in++) {
		switch (in->function_id) {
		case OSSL_FUNC_CORE_GET_PARAMS:
			c_get_params = OSSL_FUNC_core_get_params(in);
			break;
		case OSSL_FUNC_CORE_NEW_ERROR:
			p->c_new_error = OSSL_FUNC_core_new_error(in);
			break;
		case OSSL_FUNC_CORE_SET_ERROR_DEBUG:
			p->c_set_error_debug = OSSL_FUNC_core_set_error_debug(in);
			break;
		case OSSL_FUNC_CORE_VSET_ERROR:
			p->c_vset_error = OSSL_FUNC_core_vset_error(in);
			break;
		case OSSL_FUNC_BIO_READ_EX:
			p->c_bio_read_ex = OSSL_FUNC_BIO_read_ex(in);
			break;
		case OSSL_FUNC_BIO_GETS:
			p->c_bio_gets = OSSL_FUNC_BIO_gets(in);
			break;
		default:
			break;
		}
	}
	if (p->c_bio_read_ex == NULL) {
		prov_free(p);
		return 0;
	}
	/* "socket = PATH" in the provider's configuration section. */
	if (c_get_params != NULL) {
		core_params[0] = OSSL_PARAM_construct_utf8_ptr("socket", (char **)&sock, 0);
		core_params[1] = OSSL_PARAM_construct_end();
		if (c_get_params(handle, core_params) != 1)
			sock = NULL;
		if (sock != NULL && *sock != '\0' && (p->socket_path = strdup(sock)) == NULL) {
			prov_free(p);
			return 0;
		}
	}
	if ((p->pool = p11a_pool_new(p->socket_path, P11AGENT_CLIENT_NAME, 0, POOL_MAX)) == NULL) {
		prov_free(p);
		return 0;
	}
	snprintf(g_not_running_text, sizeof(g_not_running_text), "agent not running at %s",
		 socket_path(p, buf, sizeof(buf)));
	pthread_once(&g_atfork_once, atfork_register);
	*out = prov_functions;
	*provctx = p;
	return 1;
}
