/*
 * Signing: resolving a key URI (with a channel's key memo), the session
 * copy of a key to sign with, the mechanism and input for a request, and
 * C_SignInit/C_Sign with the recovery from stale handles, refused PSS
 * parameters and a LOCK in between.
 */
#include "config.h"
#include "token-int.h"
#include "hashalg.h"
#include "log.h"
#include "p11a.h"
#include "proto.h"
#include "sigenc.h"
#include "tlsclass.h"
#include "uri.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/*
 * After a generic module error, how long a signature waits to learn that
 * the card was pulled out meanwhile: OpenSC re-reads a slot's state once
 * a second, pcscd sees a removal within its polling period.
 */
#define GONE_WAIT_MS    1500

/* What a signing thread needs of a key, copied out under m->lock. */
struct sign_key {
	struct tok_slot *s;
	unsigned kgen;                  /* s->kgen when priv was read */
	CK_OBJECT_HANDLE priv;
	int type;
	uint32_t bits;
	uint32_t flags;
	unsigned mechs;
	int present, logged_in;
	uint8_t *id;
	size_t id_len;
	char label[256];
	char token_label[64];
	uint8_t policy;                 /* TOK_POL_* */
	const struct tok_programs *programs;    /* allow-programs; NULL any program */
	uint8_t forwarding;             /* enum conf_forwarding */
	uint8_t confirm;                /* enum conf_confirm */
	uint8_t keep_ctx;               /* keep-context-pin */
	uint32_t tok_flags;             /* the token's P11A_TOKEN_* at look-up */
	char *uri;                      /* the key's URI in the inventory (confirm grants, context PINs) */
};

/* A context-specific login (CKA_ALWAYS_AUTHENTICATE) between C_SignInit and C_Sign. */
struct ctx_login {
	const char *pin;                /* NULL: no login (an ordinary key) */
	size_t len;
	CK_RV failed;                   /* CKR_OK, or the C_Login failure: never tried twice */
};

/*
 * The configuration's per-key policy, set once by token_set_policy()
 * before any signing thread (one helper process serves one module).
 */
struct pol_sec {
	struct p11a_uri_matcher *um;
	int tls_only;                   /* -1 not set in this section */
	int confirm;                    /* -1 not set in this section */
	int programs_set;
	struct tok_programs programs;
	int forwarding;                 /* -1 not set in this section */
	int keep_ctx;                   /* -1 not set in this section */
};
static struct {
	int tls_only;                   /* the default */
	int forwarding;                 /* the default */
	int confirm;                    /* the default */
	int programs_set;               /* the default allow-programs is set */
	struct tok_programs programs;
	struct pol_sec *secs;
	size_t nsecs;
} policy;

/* A copy of the configuration's paths (kept for the life of the process); -1 out of memory. */
static int
programs_from(struct tok_programs *tp, const struct conf_programs *cp)
{
	tp->paths = NULL;
	tp->n = 0;
	if (cp->n == 0)
		return 0;
	if ((tp->paths = calloc(cp->n, sizeof(*tp->paths))) == NULL)
		return -1;
	for (size_t i = 0; i < cp->n; i++) {
		if ((tp->paths[i] = strdup(cp->paths[i])) == NULL)
			return -1;
		tp->n = i + 1;
	}
	return 0;
}

int
token_set_policy(const struct agent_config *cfg, char *msg, size_t msg_size)
{
	int err = 0;

	policy.tls_only = cfg->tls_only;
	policy.forwarding = cfg->forwarding;
	policy.confirm = cfg->confirm;
	policy.programs_set = cfg->allow_programs.set;
	if (programs_from(&policy.programs, &cfg->allow_programs) != 0) {
		tok_set_msg(msg, msg_size, "out of memory");
		return -1;
	}
	if (cfg->nkeysecs == 0)
		return 0;
	if ((policy.secs = calloc(cfg->nkeysecs, sizeof(*policy.secs))) == NULL) {
		tok_set_msg(msg, msg_size, "out of memory");
		return -1;
	}
	for (size_t i = 0; i < cfg->nkeysecs; i++) {
		policy.secs[i].tls_only = cfg->keysecs[i].tls_only;
		policy.secs[i].forwarding = cfg->keysecs[i].forwarding;
		policy.secs[i].confirm = cfg->keysecs[i].confirm;
		policy.secs[i].keep_ctx = cfg->keysecs[i].keep_context_pin;
		policy.secs[i].programs_set = cfg->keysecs[i].programs.set;
		if (programs_from(&policy.secs[i].programs, &cfg->keysecs[i].programs) != 0) {
			tok_set_msg(msg, msg_size, "out of memory");
			return -1;
		}
		if ((policy.secs[i].um = p11a_uri_matcher_new(cfg->keysecs[i].pattern, &err)) == NULL) {
			tok_set_msg(msg, msg_size, "[key %.300s]: not a valid pkcs11: URI",
				    cfg->keysecs[i].pattern);
			return -1;
		}
		policy.nsecs = i + 1;
	}
	return 0;
}

/*
 * The policy of key k of slot s, into k: of each setting, the last
 * section matching it that sets it, else the default.
 */
static void
policy_resolve(const struct tok_slot *s, struct tok_key *k)
{
	int tls_only = policy.tls_only, fwd = policy.forwarding, confirm = policy.confirm, keep = 0;
	const struct tok_programs *progs = policy.programs_set ? &policy.programs : NULL;

	for (size_t i = 0; i < policy.nsecs; i++) {
		const struct pol_sec *ps = &policy.secs[i];
		if (ps->tls_only < 0 && !ps->programs_set && ps->forwarding < 0 && ps->confirm < 0 &&
		    ps->keep_ctx < 0)
			continue;
		if (p11a_uri_match_key(ps->um, &s->tok, &k->k) != 1)
			continue;
		if (ps->tls_only >= 0)
			tls_only = ps->tls_only;
		if (ps->confirm >= 0)
			confirm = ps->confirm;
		if (ps->keep_ctx >= 0)
			keep = ps->keep_ctx;
		if (ps->programs_set)
			progs = &ps->programs;
		if (ps->forwarding >= 0)
			fwd = ps->forwarding;
	}
	k->policy = tls_only ? TOK_POL_TLS_ONLY : TOK_POL_ANY;
	k->programs = progs;
	k->forwarding = (uint8_t)fwd;
	k->confirm = (uint8_t)confirm;
	k->keep_ctx = (uint8_t)keep;
}

/*
 * confirm = always: one-shot grants the agent hands over (H_GRANT) after
 * the user said yes, per client connection and key; each lets one SIGN
 * through and lapses unused after GRANT_TTL_MS.
 */
#define GRANTS_MAX   256
#define GRANT_TTL_MS 60000
static struct {
	pthread_mutex_t lock;
	struct grant { uint64_t conn; char *uri; int64_t until; } g[GRANTS_MAX];
	size_t n;
} grants = { .lock = PTHREAD_MUTEX_INITIALIZER };

int
token_grant_add(uint64_t conn, const char *key_uri)
{
	char *u = strdup(key_uri);
	int64_t now = p11a_now_ms();

	if (u == NULL)
		return -P11A_E_NOMEM;
	pthread_mutex_lock(&grants.lock);
	for (size_t i = 0; i < grants.n;) {
		if (grants.g[i].until <= now) {
			free(grants.g[i].uri);
			grants.g[i] = grants.g[--grants.n];
		} else {
			i++;
		}
	}
	if (grants.n == GRANTS_MAX) {
		free(grants.g[0].uri);
		grants.g[0] = grants.g[--grants.n];
	}
	grants.g[grants.n++] = (struct grant){ conn, u, now + GRANT_TTL_MS };
	pthread_mutex_unlock(&grants.lock);
	return 0;
}

/* Takes the grant for (conn, uri): 1 when there was one, else 0. */
static int
grant_take(uint64_t conn, const char *uri)
{
	int64_t now = p11a_now_ms();
	int r = 0;

	pthread_mutex_lock(&grants.lock);
	for (size_t i = 0; i < grants.n; i++) {
		if (grants.g[i].conn == conn && grants.g[i].until > now &&
		    strcmp(grants.g[i].uri, uri) == 0) {
			free(grants.g[i].uri);
			grants.g[i] = grants.g[--grants.n];
			r = 1;
			break;
		}
	}
	pthread_mutex_unlock(&grants.lock);
	return r;
}

/* 1 when exe (NULL unknown) is one of the paths. */
static int
programs_has(const struct tok_programs *tp, const char *exe)
{
	if (exe == NULL)
		return 0;
	for (size_t i = 0; i < tp->n; i++)
		if (strcmp(tp->paths[i], exe) == 0)
			return 1;
	return 0;
}

/* "/usr/bin/curl, /usr/bin/ssh" into out, cut short with "..." when it does not fit. */
static void
programs_format(const struct tok_programs *tp, char *out, size_t out_size)
{
	size_t len = 0;

	out[0] = '\0';
	for (size_t i = 0; i < tp->n; i++) {
		int w = snprintf(out + len, out_size - len, "%s%s", i ? ", " : "", tp->paths[i]);
		if (w < 0 || (size_t)w >= out_size - len) {
			if (out_size > 4)
				memcpy(out + out_size - 4, "...", 4);
			return;
		}
		len += (size_t)w;
	}
}

struct token_keymemo {
	char *uri;
	unsigned igen;                  /* m->igen when resolved */
	size_t slot, key;               /* m->slots[slot]->keys[key] */
};

void
token_keymemo_free(struct token_keymemo *memo)
{
	if (memo == NULL)
		return;
	free(memo->uri);
	free(memo);
}

/* Remembers that uri resolved to m->slots[si]->keys[ki] (under m->lock). */
static void
keymemo_store(struct token_module *m, struct token_keymemo **memo, const char *uri,
	      size_t si, size_t ki)
{
	struct token_keymemo *km;
	char *u;

	if (memo == NULL)
		return;
	km = *memo;
	if (km == NULL || strcmp(km->uri, uri) != 0) {
		if ((u = strdup(uri)) == NULL)
			return;         /* no memo: the next SIGN matches again */
		if (km == NULL && (km = calloc(1, sizeof(*km))) == NULL) {
			free(u);
			return;
		}
		free(km->uri);
		km->uri = u;
		*memo = km;
	}
	km->igen = atomic_load(&m->igen);
	km->slot = si;
	km->key = ki;
}

/* The memo's key when it still stands for uri (under m->lock), else NULL. */
static struct tok_key *
keymemo_hit(struct token_module *m, const struct token_keymemo *km, const char *uri,
	    struct tok_slot **sp)
{
	struct tok_slot *s;

	if (km == NULL || km->igen != atomic_load(&m->igen) || km->slot >= m->nslots ||
	    strcmp(km->uri, uri) != 0)
		return NULL;
	s = m->slots[km->slot];
	if (!s->known || km->key >= s->nkeys)
		return NULL;
	*sp = s;
	return &s->keys[km->key];
}

static int
key_lookup(struct token_module *m, struct token_keymemo **memo, const char *uri,
	   struct sign_key *sk, char *msg, size_t msg_size)
{
	struct p11a_uri_matcher *um = NULL;
	struct tok_key *found = NULL;
	struct tok_slot *fs = NULL;
	size_t matches = 0, fsi = 0, fki = 0;
	int err = 0, r = 0;

	memset(sk, 0, sizeof(*sk));
	pthread_mutex_lock(&m->lock);
	if (m->closing) {
		tok_set_msg(msg, msg_size, "token helper for module %s is shutting down", m->name);
		r = -P11A_E_HELPER;
		goto out;
	}
	if (memo != NULL && (found = keymemo_hit(m, *memo, uri, &fs)) != NULL)
		goto fill;
	pthread_mutex_unlock(&m->lock);

	/* Parsed outside the lock; the inventory may change meanwhile, the match sees one state. */
	if ((um = p11a_uri_matcher_new(uri, &err)) == NULL) {
		tok_set_msg(msg, msg_size, "'%.200s' is not a valid pkcs11: URI", uri);
		return err != 0 ? err : -P11A_E_URI;
	}
	pthread_mutex_lock(&m->lock);
	if (m->closing) {
		tok_set_msg(msg, msg_size, "token helper for module %s is shutting down", m->name);
		r = -P11A_E_HELPER;
		goto out;
	}
	for (size_t i = 0; i < m->nslots; i++) {
		struct tok_slot *s = m->slots[i];
		if (!s->known)
			continue;
		for (size_t j = 0; j < s->nkeys; j++) {
			if (p11a_uri_match_key(um, &s->tok, &s->keys[j].k) == 1) {
				matches++;
				found = &s->keys[j];
				fs = s;
				fsi = i;
				fki = j;
			}
		}
	}
	if (matches == 0) {
		tok_set_msg(msg, msg_size, "no key matches %.300s", uri);
		r = -P11A_E_NO_SUCH_KEY;
		goto out;
	}
	if (matches > 1) {
		tok_set_msg(msg, msg_size, "%zu keys match %.300s", matches, uri);
		r = -P11A_E_AMBIGUOUS;
		goto out;
	}
	keymemo_store(m, memo, uri, fsi, fki);
 fill:
	sk->s = fs;
	sk->kgen = atomic_load(&fs->kgen);
	sk->priv = found->priv;
	sk->type = found->k.type;
	sk->bits = found->k.bits;
	sk->flags = found->k.flags;
	sk->mechs = fs->mechs;
	sk->present = fs->present;
	sk->logged_in = fs->logged_in;
	/* Resolved once per key record: a new inventory has new records. */
	if (found->policy == TOK_POL_UNRESOLVED)
		policy_resolve(fs, found);
	sk->policy = found->policy;
	sk->programs = found->programs;
	sk->forwarding = found->forwarding;
	sk->confirm = found->confirm;
	sk->keep_ctx = found->keep_ctx;
	sk->tok_flags = fs->tok.flags;
	snprintf(sk->label, sizeof(sk->label), "%s", found->k.label);
	snprintf(sk->token_label, sizeof(sk->token_label), "%s", fs->tok.label);
	if (found->k.id_len > 0) {
		if ((sk->id = tok_dup_bytes(found->k.id, found->k.id_len)) == NULL) {
			r = -P11A_E_NOMEM;
			goto out;
		}
		sk->id_len = found->k.id_len;
	}
	if ((sk->confirm == CONFIRM_ALWAYS || sk->forwarding == CONF_FORWARDING_CONFIRM ||
	     (found->k.flags & P11A_KEY_ALWAYS_AUTH)) &&
	    (sk->uri = strdup(found->k.uri)) == NULL) {
		free(sk->id);
		sk->id = NULL;
		r = -P11A_E_NOMEM;
		goto out;
	}
	/* Counted before the lock drops, so token_module_close() cannot miss us. */
	atomic_fetch_add(&m->inflight, 1);
 out:
	pthread_mutex_unlock(&m->lock);
	if (um != NULL)
		p11a_uri_matcher_free(um);
	return r;
}

/*
 * The key handle to sign with in session ps: this session's copy of the
 * token key, made now if need be, or the token key itself when copies are
 * off, refused, or of another key generation.  *is_copy says which.
 */
static CK_OBJECT_HANDLE
psess_key(struct token_module *m, struct psess *ps, const struct sign_key *sk, int *is_copy)
{
	CK_BBOOL no = CK_FALSE;
	CK_ATTRIBUTE tmpl[1] = { { CKA_TOKEN, &no, sizeof(no) } };
	CK_OBJECT_HANDLE copy = CK_INVALID_HANDLE;
	unsigned i, cur = atomic_load(&sk->s->kgen);
	char nb[48];
	CK_RV rv;

	*is_copy = 0;
	if (sk->kgen != cur || !atomic_load(&m->key_copies) || (sk->flags & P11A_KEY_ALWAYS_AUTH))
		return sk->priv;
	if (ps->kgen != cur) {
		if (ps->ncopy > 0)
			return sk->priv;        /* stale copies: the pool closes this session */
		ps->kgen = cur;
	}
	for (i = 0; i < ps->ncopy; i++) {
		if (ps->copy[i].priv == sk->priv) {
			if (ps->copy[i].copy == CK_INVALID_HANDLE)
				return sk->priv;
			*is_copy = 1;
			return ps->copy[i].copy;
		}
	}
	/*
	 * Full: sign with the token object.  Never C_DestroyObject here: a
	 * handle gone stale meanwhile might name another object by then.
	 */
	if (ps->ncopy >= PCOPY_MAX)
		return sk->priv;
	pthread_rwlock_rdlock(&m->copy_lock);
	rv = m->f->C_CopyObject(ps->h, sk->priv, tmpl, 1, &copy);
	pthread_rwlock_unlock(&m->copy_lock);
	if (rv == CKR_FUNCTION_NOT_SUPPORTED) {
		atomic_store(&m->key_copies, 0);
		log_debug("module %s has no C_CopyObject: signing with token objects", m->name);
		return sk->priv;
	}
	if (rv != CKR_OK) {
		/* E.g. CKA_COPYABLE false: remembered, so it is asked once per session. */
		log_debug("token '%s': no session copy of key '%s' (%s)", sk->token_label, sk->label,
			  tok_ckr_name(rv, nb, sizeof(nb)));
		copy = CK_INVALID_HANDLE;
	}
	i = ps->ncopy++;
	ps->copy[i].priv = sk->priv;
	ps->copy[i].copy = copy;
	if (copy == CK_INVALID_HANDLE)
		return sk->priv;
	log_debug("token '%s': session copy of key '%s' made", sk->token_label, sk->label);
	*is_copy = 1;
	return copy;
}

/* Errors after which a session copy is not trusted again: sign with the token key. */
static int
rv_copy_suspect(CK_RV rv)
{
	return rv == CKR_KEY_HANDLE_INVALID || rv == CKR_OBJECT_HANDLE_INVALID ||
	    rv == CKR_KEY_TYPE_INCONSISTENT || rv == CKR_KEY_FUNCTION_NOT_PERMITTED;
}

/* The private key again, after the token said its handle went stale. */
static CK_OBJECT_HANDLE
key_refind(struct token_module *m, CK_SESSION_HANDLE h, const struct sign_key *sk)
{
	CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
	CK_BBOOL on_token = CK_TRUE;
	CK_ATTRIBUTE tmpl[3] = {
		{ CKA_CLASS, &cls, sizeof(cls) },
		{ CKA_TOKEN, &on_token, sizeof(on_token) },
	};
	CK_OBJECT_HANDLE *v = NULL, found = CK_INVALID_HANDLE;
	size_t n = 0;

	if (sk->id_len > 0) {
		tmpl[2].type = CKA_ID;
		tmpl[2].pValue = sk->id;
		tmpl[2].ulValueLen = sk->id_len;
	} else if (sk->label[0] != '\0') {
		tmpl[2].type = CKA_LABEL;
		tmpl[2].pValue = (void *)sk->label;
		tmpl[2].ulValueLen = strlen(sk->label);
	} else {
		return CK_INVALID_HANDLE;
	}
	if (tok_find_objects(m, h, tmpl, 3, &v, &n) == CKR_OK && n == 1)
		found = v[0];
	free(v);
	return found;
}

/* The PKCS#11 digest mechanism and MGF1 id of a hash (common/hashalg.h). */
static CK_MECHANISM_TYPE
hash_mech(int hash)
{
	const struct p11a_hashalg *h = p11a_hashalg_by_id(hash);

	return h != NULL ? h->ckm : CK_UNAVAILABLE_INFORMATION;
}

static CK_RSA_PKCS_MGF_TYPE
hash_mgf(int hash)
{
	const struct p11a_hashalg *h = p11a_hashalg_by_id(hash);

	return h != NULL ? h->mgf : 0;
}

static const char *
scheme_needs(int scheme)
{
	switch (scheme) {
	case P11A_SCHEME_RSA_PKCS1:
	case P11A_SCHEME_RSA_PSS:
		return "an RSA key";
	case P11A_SCHEME_ECDSA:
		return "an EC key";
	default:
		return "an Ed25519 key";
	}
}

static int
scheme_fits(int scheme, int type)
{
	switch (scheme) {
	case P11A_SCHEME_RSA_PKCS1:
	case P11A_SCHEME_RSA_PSS:
		return type == P11A_KEY_RSA;
	case P11A_SCHEME_ECDSA:
		return type == P11A_KEY_EC;
	case P11A_SCHEME_EDDSA:
		return type == P11A_KEY_ED25519;
	default:
		return 0;
	}
}

/* The input the token signs, and the mechanism, for one request. */
struct sign_plan {
	CK_MECHANISM mech;
	CK_RSA_PKCS_PSS_PARAMS pss;
	const uint8_t *in;
	size_t in_len;
	uint8_t buf[P11A_SIG_MAX + 128];        /* DigestInfo or an EMSA-PSS block */
	uint8_t digest[64];
};

/* pss_raw: encode EMSA-PSS here even when the token has CKM_RSA_PKCS_PSS. */
static int
sign_plan(const struct p11a_sign *req, const struct sign_key *sk, int pss_raw,
	  struct sign_plan *p, char *msg, size_t msg_size)
{
	const char *scheme = p11a_scheme_name(req->scheme);
	const uint8_t *dg;
	size_t dg_len = 0, n;
	int mgf1, r;
	long salt;

	memset(&p->mech, 0, sizeof(p->mech));
	if (scheme == NULL || req->input > P11A_INPUT_RAW ||
	    (req->hash != P11A_HASH_NONE && p11a_hash_len(req->hash) == 0)) {
		tok_set_msg(msg, msg_size, "unknown scheme, hash or input kind");
		return -P11A_E_BAD_REQUEST;
	}
	if (!scheme_fits(req->scheme, sk->type)) {
		tok_set_msg(msg, msg_size, "key '%s' is %s; %s needs %s", sk->label,
			p11a_keytype_name(sk->type) ? p11a_keytype_name(sk->type) : "of unknown type",
			scheme, scheme_needs(req->scheme));
		return -P11A_E_UNSUPPORTED;
	}
	if (req->scheme == P11A_SCHEME_EDDSA) {
		if (req->input != P11A_INPUT_MESSAGE || req->hash != P11A_HASH_NONE) {
			tok_set_msg(msg, msg_size, "eddsa signs the message itself (input message, hash none)");
			return -P11A_E_BAD_REQUEST;
		}
		if (!(sk->mechs & MECH_EDDSA))
			goto no_mech;
		p->mech.mechanism = CKM_EDDSA;
		p->in = req->data;
		p->in_len = req->data_len;
		return 0;
	}
	if (req->input == P11A_INPUT_RAW) {
		if (req->scheme != P11A_SCHEME_RSA_PKCS1 || req->hash != P11A_HASH_NONE) {
			tok_set_msg(msg, msg_size, "raw input is for rsa-pkcs1 with hash none only");
			return -P11A_E_BAD_REQUEST;
		}
		if (sk->bits != 0 && req->data_len + 11 > (sk->bits + 7) / 8) {
			tok_set_msg(msg, msg_size, "%zu bytes are too many for rsa-pkcs1 with a %u-bit key",
				req->data_len, sk->bits);
			return -P11A_E_BAD_REQUEST;
		}
		if (!(sk->mechs & MECH_RSA_PKCS))
			goto no_mech;
		p->mech.mechanism = CKM_RSA_PKCS;
		p->in = req->data;
		p->in_len = req->data_len;
		return 0;
	}
	if (req->hash == P11A_HASH_NONE) {
		tok_set_msg(msg, msg_size, "%s needs a hash (none is only for raw input)", scheme);
		return -P11A_E_BAD_REQUEST;
	}
	if (req->input == P11A_INPUT_DIGEST) {
		if (req->data_len != p11a_hash_len(req->hash)) {
			tok_set_msg(msg, msg_size, "a %s digest is %zu bytes, not %zu",
				p11a_hash_name(req->hash), p11a_hash_len(req->hash), req->data_len);
			return -P11A_E_BAD_REQUEST;
		}
		dg = req->data;
		dg_len = req->data_len;
	} else {
		if ((r = p11a_hash_data(req->hash, req->data, req->data_len, p->digest, &dg_len)) != 0) {
			tok_set_msg(msg, msg_size, "cannot hash the message with %s", p11a_hash_name(req->hash));
			return r;
		}
		dg = p->digest;
	}
	switch (req->scheme) {
	case P11A_SCHEME_RSA_PKCS1:
		if (!(sk->mechs & MECH_RSA_PKCS))
			goto no_mech;
		if ((r = p11a_digestinfo(req->hash, dg, dg_len, p->buf, sizeof(p->buf), &n)) != 0) {
			tok_set_msg(msg, msg_size, "cannot encode the DigestInfo");
			return r;
		}
		p->mech.mechanism = CKM_RSA_PKCS;
		p->in = p->buf;
		p->in_len = n;
		return 0;
	case P11A_SCHEME_RSA_PSS:
		mgf1 = req->mgf1_hash != P11A_HASH_NONE ? req->mgf1_hash : req->hash;
		if (p11a_hash_len(mgf1) == 0) {
			tok_set_msg(msg, msg_size, "unknown MGF1 hash");
			return -P11A_E_BAD_REQUEST;
		}
		if (sk->bits == 0) {
			tok_set_msg(msg, msg_size, "the modulus size of key '%s' is unknown", sk->label);
			return -P11A_E_UNSUPPORTED;
		}
		salt = p11a_pss_salt_len(req->hash, req->salt_len, sk->bits);
		if (salt < 0) {
			tok_set_msg(msg, msg_size, "a PSS salt of %u bytes does not fit a %u-bit key with %s",
				req->salt_len, sk->bits, p11a_hash_name(req->hash));
			return -P11A_E_BAD_REQUEST;
		}
		if ((sk->mechs & MECH_RSA_PSS) && !pss_raw) {
			p->pss.hashAlg = hash_mech(req->hash);
			p->pss.mgf = hash_mgf(mgf1);
			p->pss.sLen = (CK_ULONG)salt;
			p->mech.mechanism = CKM_RSA_PKCS_PSS;
			p->mech.pParameter = &p->pss;
			p->mech.ulParameterLen = sizeof(p->pss);
			p->in = dg;
			p->in_len = dg_len;
			return 0;
		}
		if (!(sk->mechs & MECH_RSA_X509))
			goto no_mech;
		/* No CKM_RSA_PKCS_PSS: encode EMSA-PSS here and sign it raw. */
		r = p11a_pss_encode(req->hash, mgf1, (uint32_t)salt, dg, dg_len, sk->bits,
				    p->buf, sizeof(p->buf), &n);
		if (r != 0) {
			tok_set_msg(msg, msg_size, "cannot encode EMSA-PSS for a %u-bit key", sk->bits);
			return r;
		}
		p->mech.mechanism = CKM_RSA_X_509;
		p->in = p->buf;
		p->in_len = n;
		return 0;
	case P11A_SCHEME_ECDSA:
		if (!(sk->mechs & MECH_ECDSA))
			goto no_mech;
		p->mech.mechanism = CKM_ECDSA;
		p->in = dg;
		p->in_len = dg_len;
		return 0;
	default:
		break;
	}
 no_mech:
	tok_set_msg(msg, msg_size, "token '%s' cannot sign with %s", sk->token_label, scheme);
	return -P11A_E_UNSUPPORTED;
}

/*
 * C_SignInit + C_Sign into out (size *out_len in, length out).  A
 * signature bigger than out is finished into a scratch buffer and
 * reported as CKR_BUFFER_TOO_SMALL, so the session stays clean.
 */
static CK_RV
sign_once_raw(struct token_module *m, CK_SESSION_HANDLE h, CK_MECHANISM *mech, CK_OBJECT_HANDLE key,
	      const uint8_t *in, size_t in_len, uint8_t *out, size_t *out_len, const char **what,
	      struct ctx_login *cl)
{
	CK_ULONG n = *out_len;
	CK_RV rv;

	if (cl != NULL && cl->pin != NULL && cl->failed != CKR_OK) {
		*what = "C_Login";
		return cl->failed;      /* a refused PIN is never tried again */
	}
	*what = "C_SignInit";
	rv = m->f->C_SignInit(h, mech, key);
	if (rv != CKR_OK)
		return rv;
	if (cl != NULL && cl->pin != NULL) {
		/* PKCS#11 v2.40 5.10: the context-specific login follows C_SignInit. */
		*what = "C_Login";
		rv = m->f->C_Login(h, CKU_CONTEXT_SPECIFIC, (CK_UTF8CHAR_PTR)(uintptr_t)cl->pin,
				   (CK_ULONG)cl->len);
		if (rv != CKR_OK) {
			cl->failed = rv;
			return rv;      /* the operation stays active: the caller drops the session */
		}
	}
	*what = "C_Sign";
	rv = m->f->C_Sign(h, (CK_BYTE_PTR)(uintptr_t)in, (CK_ULONG)in_len, out, &n);
	if (rv == CKR_BUFFER_TOO_SMALL) {
		/* Finish the operation (it stays active after this error) and drop the result. */
		uint8_t *big = n > 0 && n <= 65536 ? malloc(n) : NULL;
		if (big != NULL) {
			(void)m->f->C_Sign(h, (CK_BYTE_PTR)(uintptr_t)in, (CK_ULONG)in_len, big, &n);
			free(big);
			return CKR_BUFFER_TOO_SMALL;
		}
		return CKR_OPERATION_ACTIVE;    /* the caller drops the session */
	}
	if (rv == CKR_OK)
		*out_len = n;
	return rv;
}

/*
 * sign_once_raw() counted in s->signing, so that a logout of the slot
 * waits for it (token-int.h); a slot being logged out signs nothing and
 * says CKR_USER_NOT_LOGGED_IN (the client hears LOCKED).
 */
static CK_RV
sign_once(struct token_module *m, struct tok_slot *s, CK_SESSION_HANDLE h, CK_MECHANISM *mech,
	  CK_OBJECT_HANDLE key, const uint8_t *in, size_t in_len, uint8_t *out, size_t *out_len,
	  const char **what, struct ctx_login *cl)
{
	CK_RV rv;

	atomic_fetch_add(&s->signing, 1);
	if (atomic_load(&s->logging_out)) {
		atomic_fetch_sub(&s->signing, 1);
		*what = "C_SignInit";
		return CKR_USER_NOT_LOGGED_IN;
	}
	rv = sign_once_raw(m, h, mech, key, in, in_len, out, out_len, what, cl);
	atomic_fetch_sub(&s->signing, 1);
	return rv;
}

int
token_sign(struct token_module *m, struct token_keymemo **memo, const struct token_peer *peer,
	   const struct p11a_sign *req,
	   const struct timespec *deadline,
	   uint8_t *sig, size_t sig_size, size_t *sig_len, char *msg, size_t msg_size)
{
	struct sign_key sk;
	struct sign_plan *plan = NULL;
	uint8_t raw[P11A_SIG_MAX];
	size_t raw_len = sizeof(raw);
	struct psess *ps = NULL;
	CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
	CK_OBJECT_HANDLE key;
	CK_RV rv = CKR_OK, prv;
	const char *what = "C_Sign";
	unsigned gen = 0;
	int r, drop = 0, have_session = 0, is_copy = 0, listed = 0, ctx_slot = -1, ctx_kept = 0;
	struct ctx_login cl = { NULL, 0, CKR_OK };

	*sig_len = 0;
	if (msg != NULL && msg_size > 0)
		msg[0] = '\0';
	if ((r = key_lookup(m, memo, req->key_uri, &sk, msg, msg_size)) != 0)
		return r;
	/* From here on this thread counts in m->inflight. */
	if (peer != NULL && peer->forwarded && sk.forwarding != CONF_FORWARDING_ALLOW) {
		if (sk.forwarding == CONF_FORWARDING_DENY) {
			tok_set_msg(msg, msg_size, "not allowed by policy: forwarding is denied for "
				    "key '%s' on token '%s' (forwarding = deny) and this connection is "
				    "forwarded (ssh or a relay)", sk.label, sk.token_label);
			r = -P11A_E_POLICY;
			goto out;
		}
	}
	if (sk.programs != NULL) {
		const char *exe = peer != NULL ? peer->exe : NULL;
		if (!(listed = programs_has(sk.programs, exe))) {
			char list[600];
			programs_format(sk.programs, list, sizeof(list));
			tok_set_msg(msg, msg_size, "not allowed for this program: key '%s' on token "
				    "'%s' may be used by %s; %s (pid %lu) asked", sk.label,
				    sk.token_label, list, exe != NULL ? exe : "an unknown executable",
				    peer != NULL ? (unsigned long)peer->pid : 0ul);
			r = -P11A_E_POLICY;
			goto out;
		}
	}
	if (sk.policy == TOK_POL_TLS_ONLY) {
		enum p11a_tlsclass tc = p11a_tls_classify(req->data, req->data_len,
							  req->input != P11A_INPUT_MESSAGE);
		/*
		 * A digest cannot be classified: refused, unless the key's
		 * allow-programs names the program (NSS, some GnuTLS paths).
		 */
		if (!p11a_tlsclass_is_client(tc) && !(tc == P11A_TLS_DIGEST && listed)) {
			tok_set_msg(msg, msg_size, "not allowed by policy: key '%s' on token '%s' is "
				    "tls-only and this is not a TLS client handshake (input: %s)%s",
				    sk.label, sk.token_label, p11a_tlsclass_name(tc),
				    tc == P11A_TLS_DIGEST ? "; a digest is signed only for a program the "
				    "key's allow-programs names" : "");
			r = -P11A_E_POLICY;
			goto out;
		}
	}
	if (!sk.present) {
		if (sk.keep_ctx && sk.uri != NULL)
			token_ctxpin_forget(sk.uri);
		tok_set_msg(msg, msg_size, "token '%s' is not present", sk.token_label);
		r = -P11A_E_TOKEN_NOT_PRESENT;
		goto out;
	}
	if (sk.priv == CK_INVALID_HANDLE) {
		tok_set_msg(msg, msg_size, "token '%s' is locked: run 'p11agent unlock'", sk.token_label);
		r = -P11A_E_LOCKED;
		goto out;
	}
	/* Last of the checks: a grant is spent only on a signature that can be made. */
	int fwd_confirm = peer != NULL && peer->forwarded &&
			  sk.forwarding == CONF_FORWARDING_CONFIRM;
	if ((sk.confirm == CONFIRM_ALWAYS || fwd_confirm) &&
	    (peer == NULL || sk.uri == NULL || !grant_take(peer->conn, sk.uri))) {
		tok_set_msg(msg, msg_size, "key '%s' on token '%s' needs your confirmation for "
			    "each signature (%s)", sk.label, sk.token_label,
			    sk.confirm == CONFIRM_ALWAYS ? "confirm = always" :
			    "forwarding = confirm, and this connection is forwarded");
		r = -P11A_E_NOT_CONFIRMED;
		goto out;
	}
	/*
	 * CKA_ALWAYS_AUTHENTICATE: the PIN the user typed for this signature
	 * (CONTEXT_PIN, H_CONTEXT_PIN), taken now and wiped at the end.
	 */
	if ((sk.flags & P11A_KEY_ALWAYS_AUTH) && !sk.logged_in && sk.keep_ctx && sk.uri != NULL)
		token_ctxpin_forget(sk.uri);    /* locked meanwhile: a kept PIN goes */
	if ((sk.flags & P11A_KEY_ALWAYS_AUTH) && sk.logged_in) {
		if (peer != NULL && sk.uri != NULL)
			ctx_slot = tok_ctxpin_take(peer->conn, sk.uri, &cl.pin, &cl.len);
		/* keep-context-pin: not while the token reports few tries left. */
		if (ctx_slot < 0 && sk.keep_ctx && sk.uri != NULL &&
		    !(sk.tok_flags & (P11A_TOKEN_PIN_COUNT_LOW | P11A_TOKEN_PIN_FINAL_TRY)) &&
		    (ctx_slot = tok_ctxpin_kept_take(sk.uri, &cl.pin, &cl.len)) >= 0)
			ctx_kept = 1;
		if (ctx_slot < 0) {
			tok_set_msg(msg, msg_size, "key '%s' on token '%s' needs its PIN for each "
				    "signature (CKA_ALWAYS_AUTHENTICATE)", sk.label, sk.token_label);
			r = -P11A_E_CONTEXT_PIN;
			goto out;
		}
	}
	if ((plan = malloc(sizeof(*plan))) == NULL) {
		r = -P11A_E_NOMEM;
		goto out;
	}
	if ((r = sign_plan(req, &sk, 0, plan, msg, msg_size)) != 0)
		goto out;

	r = tok_pool_get(m, sk.s, deadline, &ps, &gen, &prv);
	if (r == -P11A_E_TIMEOUT) {
		tok_set_msg(msg, msg_size, "token '%s' stayed busy until the deadline", sk.token_label);
	} else if (r != 0) {
		r = tok_fail_rv(msg, msg_size, sk.token_label, "cannot open a session", prv);
		if (tok_rv_token_gone(prv))
			tok_notify(m);
	} else {
		have_session = 1;
		h = ps->h;
		key = psess_key(m, ps, &sk, &is_copy);
		rv = sign_once(m, sk.s, h, &plan->mech, key, plan->in, plan->in_len, raw, &raw_len, &what, &cl);
		if (is_copy && rv_copy_suspect(rv)) {
			/* The copy misbehaves: sign with the token key; the session and its copies go. */
			char nb[48];
			log_debug("token '%s': session copy of key '%s' failed (%s); using the token key",
				  sk.token_label, sk.label, tok_ckr_name(rv, nb, sizeof(nb)));
			drop = 1;
			key = sk.priv;
			raw_len = sizeof(raw);
			rv = sign_once(m, sk.s, h, &plan->mech, key, plan->in, plan->in_len, raw, &raw_len, &what, &cl);
		}
		if (rv == CKR_KEY_HANDLE_INVALID || rv == CKR_OBJECT_HANDLE_INVALID) {
			/* The token renumbered its objects: look the key up once more. */
			tok_notify(m);
			key = key_refind(m, h, &sk);
			/* Logged out, and maybe in again, meanwhile: look once more. */
			if (key == CK_INVALID_HANDLE && atomic_load(&sk.s->kgen) != sk.kgen)
				key = key_refind(m, h, &sk);
			log_debug("token '%s': handle of key '%s' went stale; %s", sk.token_label,
				  sk.label, key != CK_INVALID_HANDLE ? "found it again" : "key is gone");
			if (key != CK_INVALID_HANDLE) {
				raw_len = sizeof(raw);
				rv = sign_once(m, sk.s, h, &plan->mech, key, plan->in, plan->in_len, raw,
					       &raw_len, &what, &cl);
			}
		}
		if (plan->mech.mechanism == CKM_RSA_PKCS_PSS && (sk.mechs & MECH_RSA_X509) &&
		    (rv == CKR_MECHANISM_PARAM_INVALID || rv == CKR_ARGUMENTS_BAD ||
		     rv == CKR_MECHANISM_INVALID)) {
			/*
			 * Some tokens take only some PSS parameters (SoftHSM2: MGF1
			 * hash = hash); the raw mechanism takes any.
			 */
			char nb[48];
			log_debug("token '%s' refused CKM_RSA_PKCS_PSS (%s): encoding PSS here",
				  sk.token_label, tok_ckr_name(rv, nb, sizeof(nb)));
			if (sign_plan(req, &sk, 1, plan, msg, msg_size) == 0) {
				raw_len = sizeof(raw);
				rv = sign_once(m, sk.s, h, &plan->mech, key, plan->in, plan->in_len, raw,
					       &raw_len, &what, &cl);
			}
		}
	}
	if (have_session && rv != CKR_OK && rv != CKR_BUFFER_TOO_SMALL &&
	    rv != CKR_USER_NOT_LOGGED_IN && !tok_rv_token_gone(rv) && !tok_rv_session_gone(rv) &&
	    sk.logged_in) {
		/*
		 * A LOCK (C_Logout) between our look-up and C_Sign: the copy is
		 * gone, private objects hide, and modules say so in their own
		 * words (CKR_KEY_HANDLE_INVALID, CKR_GENERAL_ERROR, ...).  The
		 * session's state tells the truth: the client hears LOCKED.
		 */
		CK_SESSION_INFO si;
		char nb[48];

		if (m->f->C_GetSessionInfo(h, &si) == CKR_OK && !tok_state_logged_in(si.state)) {
			log_debug("token '%s': %s failed with %s after a logout: locked", sk.token_label,
				  what, tok_ckr_name(rv, nb, sizeof(nb)));
			rv = CKR_USER_NOT_LOGGED_IN;
		}
	}
	if (have_session && (rv == CKR_GENERAL_ERROR || rv == CKR_DEVICE_ERROR ||
			     rv == CKR_FUNCTION_FAILED) && tok_slot_went(m, sk.s, GONE_WAIT_MS, deadline)) {
		/* The card was pulled out during the call: say so, not the module's generic error. */
		char nb[48];

		log_debug("token '%s': %s failed with %s as the token left: not present",
			  sk.token_label, what, tok_ckr_name(rv, nb, sizeof(nb)));
		rv = CKR_DEVICE_REMOVED;
	}
	if (have_session) {
		drop = drop || tok_rv_session_gone(rv) || rv == CKR_OPERATION_ACTIVE;
		/*
		 * A failed C_Sign ends the operation (PKCS#11 5.13), but a module
		 * that does not would fail every later C_SignInit on this session:
		 * failures are rare, a new session is cheap.
		 */
		if (rv != CKR_OK && rv != CKR_BUFFER_TOO_SMALL &&
		    (strcmp(what, "C_Sign") == 0 || strcmp(what, "C_Login") == 0))
			drop = 1;
		/* A key that wants its PIN per signature may leave the operation open. */
		if (rv == CKR_USER_NOT_LOGGED_IN && (sk.flags & P11A_KEY_ALWAYS_AUTH) && !tok_pool_shared(sk.s))
			drop = 1;
		tok_pool_put(m, sk.s, ps, gen, drop);
	}
	if (r != 0)
		goto out;
	if (ctx_slot >= 0 && sk.keep_ctx && sk.uri != NULL) {
		if (rv == CKR_OK && !ctx_kept)
			tok_ctxpin_keep(sk.uri, cl.pin, cl.len);
		else if (cl.failed != CKR_OK)
			token_ctxpin_forget(sk.uri);    /* a refused kept PIN is not tried again */
	}

	switch (rv) {
	case CKR_OK:
		atomic_store_explicit(&sk.s->last_sign_ms, p11a_now_ms(), memory_order_relaxed);
		break;
	case CKR_USER_NOT_LOGGED_IN:
		if ((sk.flags & P11A_KEY_ALWAYS_AUTH) && sk.logged_in && cl.pin == NULL) {
			tok_set_msg(msg, msg_size, "key '%s' on token '%s' needs its PIN for each "
				    "signature (CKA_ALWAYS_AUTHENTICATE)", sk.label, sk.token_label);
			r = -P11A_E_CONTEXT_PIN;
		} else {
			tok_notify(m);
			tok_set_msg(msg, msg_size, "token '%s' is locked: run 'p11agent unlock'", sk.token_label);
			r = tok_rv_err(rv);
		}
		goto out;
	case CKR_PIN_INCORRECT:
	case CKR_PIN_INVALID:
	case CKR_PIN_LEN_RANGE:
	case CKR_PIN_LOCKED:
		/* The context-specific login: never retried; a rescan shows the tries left. */
		tok_notify(m);
		r = tok_rv_err(rv);
		tok_set_msg(msg, msg_size, "%s for key '%s' on token '%s' (the PIN this signature "
			    "asked for; not retried)", rv == CKR_PIN_LOCKED ? "PIN locked" :
			    rv == CKR_PIN_INCORRECT ? "wrong PIN" : "PIN not valid", sk.label,
			    sk.token_label);
		goto out;
	case CKR_DEVICE_REMOVED:
	case CKR_TOKEN_NOT_PRESENT:
		tok_notify(m);
		tok_set_msg(msg, msg_size, "token '%s' is not present", sk.token_label);
		r = tok_rv_err(rv);
		goto out;
	case CKR_SESSION_HANDLE_INVALID:
	case CKR_SESSION_CLOSED:
		tok_notify(m);
		r = tok_fail_rv(msg, msg_size, sk.token_label, "session lost; try again", rv);
		goto out;
	case CKR_BUFFER_TOO_SMALL:
		tok_set_msg(msg, msg_size, "token '%s': signature larger than %d bytes", sk.token_label,
			P11A_SIG_MAX);
		r = -P11A_E_TOO_LARGE;
		goto out;
	case CKR_KEY_HANDLE_INVALID:
	case CKR_OBJECT_HANDLE_INVALID:
		if (atomic_load(&sk.s->kgen) != sk.kgen && sk.logged_in) {
			/* A LOCK (and maybe an UNLOCK) came between look-up and C_Sign. */
			tok_set_msg(msg, msg_size, "token '%s' was locked while signing: run 'p11agent "
				"unlock' if it still is, and try again", sk.token_label);
			r = -P11A_E_LOCKED;
			goto out;
		}
		/* Still stale after looking again: the key left the token. */
		tok_set_msg(msg, msg_size, "key '%s' is no longer on token '%s'", sk.label, sk.token_label);
		r = -P11A_E_NO_SUCH_KEY;
		goto out;
	default:
		r = tok_fail_rv(msg, msg_size, sk.token_label, what, rv);
		goto out;
	}

	if (req->scheme == P11A_SCHEME_ECDSA) {
		r = p11a_ecdsa_raw_to_der(raw, raw_len, sig, sig_size, sig_len);
		if (r != 0)
			tok_set_msg(msg, msg_size, "token '%s' returned a malformed ECDSA signature (%zu bytes)",
				sk.token_label, raw_len);
	} else if (raw_len > sig_size) {
		tok_set_msg(msg, msg_size, "signature larger than %zu bytes", sig_size);
		r = -P11A_E_TOO_LARGE;
	} else {
		memcpy(sig, raw, raw_len);
		*sig_len = raw_len;
	}
 out:
	atomic_fetch_sub(&m->inflight, 1);
	if (ctx_slot >= 0)
		tok_ctxpin_release(ctx_slot);   /* wipes the PIN */
	if (plan != NULL) {
		p11a_wipe(plan, sizeof(*plan));
		free(plan);
	}
	free(sk.id);
	free(sk.uri);
	return r;
}
