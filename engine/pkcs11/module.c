/*
 * p11agent-pkcs11.so entry points.
 *
 * State lives in one structure behind one mutex, g_lock: slots (one per
 * agent token, ids never reused), objects (handles never reused) and
 * sessions.  g_lock is never held across I/O: every agent request (LIST,
 * SIGN, UNLOCK) is made on a connection taken from a pool (common/pool.h)
 * with the lock dropped, so a SIGN that waits on a token (up to the
 * client's 35 s) or a slow LIST stalls no other thread of the caller, and
 * threads sign in parallel, each on its own connection and channel.  What
 * a request needs is copied out of the shared state first; whoever
 * retakes the lock finds sessions, slots and objects again by handle.
 * g.inflight counts requests on the wire; C_Finalize waits for them.
 *
 * The slot list and objects are refreshed from LIST at most every
 * REFRESH_MS (and always on C_Login), so `p11agent lock`, `unlock`, an
 * agent restart or a token removal show up in a running client without
 * restarting it.  The LIST is fetched unlocked and applied under the lock
 * (apply_list_locked keeps every slot id and object handle); a LIST that
 * finishes after a newer one was applied is dropped, and while one is on
 * the wire other threads use the inventory they have.
 */
#include "config.h"

#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include <openssl/rand.h>

#include "p11m.h"
#include "client.h"
#include "hashalg.h"
#include "pool.h"
#include "sigenc.h"
#include "sigin.h"
#include "uri.h"

#define P11M_EXPORT __attribute__((visibility("default")))
#define REFRESH_MS   200
#define CLIENT_NAME  "p11agent-pkcs11 " PACKAGE_VERSION
/*
 * LIST is answered from the agent's inventory at once: a short deadline
 * keeps a stopped (SIGSTOP) or wedged agent from freezing the caller.
 * SIGN and UNLOCK may wait on the token: the library's default.
 */
#define LIST_TIMEOUT_MS 5000
#define NAMED_KEYS      3     /* keys a refusal names */
/*
 * Idle agent connections kept: for SIGN and UNLOCK, as many as threads
 * sign at once (each connection keeps a signing channel per key); for
 * LIST, a few.  More are opened when needed and closed when put back.
 */
#define SIGN_POOL_MAX   64
#define CTL_POOL_MAX    4

struct slot {
	CK_SLOT_ID id;
	struct p11a_token tok;       /* tok.uri NULL: placeholder, no token seen yet */
	int present;
};

struct sess {
	CK_SESSION_HANDLE h;
	CK_SLOT_ID slot;
	CK_FLAGS flags;
	/* C_FindObjects */
	int find_active;
	int find_named;              /* the template has CKA_ID or CKA_LABEL */
	CK_OBJECT_HANDLE *found;
	size_t nfound, pos;
	/*
	 * The last search that returned a private key, when it looked keys
	 * up by CKA_ID or CKA_LABEL, matched several private keys and was
	 * ended before returning them all: its matches, of which the first
	 * npicked were returned.  See vague_pick().
	 */
	CK_OBJECT_HANDLE *vague;
	size_t nvague, npicked;
	/* C_Sign* */
	int sign_active;
	int sign_multi;              /* C_SignUpdate was called */
	CK_OBJECT_HANDLE key;
	const struct p11m_mech *mech;
	int hash, mgf1;
	uint32_t salt;
	struct p11a_sigin in;        /* the input; hash-and-sign input past the cap hashed here */
};

static struct {
	int initialized;
	pid_t pid;
	struct p11a_pool *ctl_pool;  /* LIST (LIST_TIMEOUT_MS) */
	struct p11a_pool *sign_pool; /* SIGN, UNLOCK (the library's deadline) */
	int inflight;                /* agent requests on the wire, g_lock dropped */
	int finalizing;              /* C_Finalize waits for inflight == 0 */
	int refreshing;              /* LISTs on the wire */
	uint64_t list_seq;           /* LISTs started */
	uint64_t list_applied;       /* the latest started LIST whose result is applied */
	struct slot *slots;
	size_t nslots;
	struct p11m_obj *objs;       /* handle = index + 1 */
	size_t nobjs;
	struct sess **sess;
	size_t nsess;
	CK_SESSION_HANDLE next_sess;
	int refreshed;
	int agent_up;                /* the last LIST was answered */
	uint64_t last_refresh;
	int debug;
	unsigned key_types;          /* bit (1 << enum p11a_keytype) per type shown */
} g;

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_idle = PTHREAD_COND_INITIALIZER;   /* inflight reached 0, or finalizing ended */
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void dbg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void
dbg(const char *fmt, ...)
{
	va_list ap;

	if (!g.debug)
		return;
	va_start(ap, fmt);
	fputs("p11agent-pkcs11: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
}

/* Space-padded copy of a C string into a PKCS#11 text field. */
static void
pad(unsigned char *field, size_t size, const char *s)
{
	size_t n = s ? strlen(s) : 0;

	memset(field, ' ', size);
	if (n > size) {
		n = size;
		/* do not cut a UTF-8 sequence in half */
		while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80)
			n--;
	}
	if (n > 0)
		memcpy(field, s, n);
}

/* ------------------------------------------------------------ fork */

static void atfork_prepare(void) { pthread_mutex_lock(&g_lock); }
static void atfork_parent(void) { pthread_mutex_unlock(&g_lock); }
/*
 * The child keeps the module's state: sessions and handles are local
 * bookkeeping, and the pools drop the parent's connections on their
 * first use in the child.  A child that calls C_Initialize again
 * starts from scratch (see m_Initialize).
 */
static void
atfork_child(void)
{
	/* The threads with requests on the wire stayed in the parent. */
	g.inflight = 0;
	g.refreshing = 0;
	g.finalizing = 0;
	pthread_cond_init(&g_idle, NULL);
	pthread_mutex_unlock(&g_lock);
}

static void
once_init(void)
{
	pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

/* ------------------------------------------------------------ state */

static void
sess_reset_sign(struct sess *s)
{
	p11a_sigin_clear(&s->in);
	s->sign_active = 0;
	s->sign_multi = 0;
	s->mech = NULL;
}

static void
sess_free(struct sess *s)
{
	if (s == NULL)
		return;
	sess_reset_sign(s);
	free(s->found);
	free(s->vague);
	free(s);
}

static void
state_free_locked(void)
{
	size_t i;

	for (i = 0; i < g.nsess; i++)
		sess_free(g.sess[i]);
	free(g.sess);
	for (i = 0; i < g.nobjs; i++) {
		p11m_obj_attrs_free(&g.objs[i]);
		free(g.objs[i].key_uri);
	}
	free(g.objs);
	for (i = 0; i < g.nslots; i++)
		p11a_token_clear(&g.slots[i].tok);
	free(g.slots);
	p11a_pool_free(g.ctl_pool);
	p11a_pool_free(g.sign_pool);
	memset(&g, 0, sizeof(g));
}

static struct slot *
slot_get(CK_SLOT_ID id)
{
	return id < g.nslots ? &g.slots[id] : NULL;
}

static int
slot_logged_in(const struct slot *s)
{
	return s->present && ((s->tok.flags & P11A_TOKEN_LOGGED_IN) ||
			      !(s->tok.flags & P11A_TOKEN_LOGIN_REQUIRED));
}

static struct sess *
sess_get(CK_SESSION_HANDLE h)
{
	size_t i;

	for (i = 0; i < g.nsess; i++) {
		if (g.sess[i]->h == h)
			return g.sess[i];
	}
	return NULL;
}

static struct p11m_obj *
obj_get(CK_OBJECT_HANDLE h, CK_SLOT_ID slot)
{
	struct p11m_obj *o;

	if (h == 0 || h > g.nobjs)
		return NULL;
	o = &g.objs[h - 1];
	if (!o->live || o->slot != slot)
		return NULL;
	return o;
}

static void
agent_down_locked(void)
{
	size_t i;

	for (i = 0; i < g.nslots; i++)
		g.slots[i].present = 0;
	for (i = 0; i < g.nobjs; i++)
		g.objs[i].live = 0;
	g.agent_up = 0;
}

static struct slot *
slot_for_token(const struct p11a_token *t)
{
	struct slot *ns;
	size_t i;

	for (i = 0; i < g.nslots; i++) {
		if (g.slots[i].tok.uri != NULL && strcmp(g.slots[i].tok.uri, t->uri) == 0)
			return &g.slots[i];
	}
	for (i = 0; i < g.nslots; i++) {
		if (g.slots[i].tok.uri == NULL)
			return &g.slots[i];
	}
	if ((ns = realloc(g.slots, (g.nslots + 1) * sizeof(*ns))) == NULL)
		return NULL;
	g.slots = ns;
	memset(&g.slots[g.nslots], 0, sizeof(*ns));
	g.slots[g.nslots].id = g.nslots;
	return &g.slots[g.nslots++];
}

static void
obj_update(CK_SLOT_ID slot, CK_OBJECT_CLASS cls, const struct p11a_key *k)
{
	struct p11m_obj *o = NULL, *no;
	size_t i;

	for (i = 0; i < g.nobjs; i++) {
		if (g.objs[i].slot == slot && g.objs[i].cls == cls &&
		    strcmp(g.objs[i].key_uri, k->uri) == 0) {
			o = &g.objs[i];
			break;
		}
	}
	if (o == NULL) {
		if ((no = realloc(g.objs, (g.nobjs + 1) * sizeof(*no))) == NULL)
			return;
		g.objs = no;
		o = &g.objs[g.nobjs];
		memset(o, 0, sizeof(*o));
		if ((o->key_uri = strdup(k->uri)) == NULL)
			return;
		o->handle = g.nobjs + 1;
		o->slot = slot;
		o->cls = cls;
		g.nobjs++;
	}
	if (p11m_obj_build(o, cls, k) == CKR_OK)
		o->live = 1;
	else
		dbg("cannot describe key '%s' as a PKCS#11 object of class %lu", k->uri, cls);
}

static void
apply_list_locked(const struct p11a_list_reply *l)
{
	struct slot *s;
	size_t i, j;

	agent_down_locked();
	for (i = 0; i < l->ntokens; i++) {
		if ((s = slot_for_token(&l->tokens[i])) == NULL)
			continue;
		if (s->tok.uri == NULL || strcmp(s->tok.uri, l->tokens[i].uri) != 0 ||
		    s->tok.flags != l->tokens[i].flags) {
			struct p11a_token copy;
			if (p11a_token_copy(&copy, &l->tokens[i]) != 0)
				continue;
			p11a_token_clear(&s->tok);
			s->tok = copy;
		}
		s->present = (l->tokens[i].flags & P11A_TOKEN_PRESENT) != 0;
	}
	for (i = 0; i < l->nkeys; i++) {
		const struct p11a_key *k = &l->keys[i];

		s = NULL;
		for (j = 0; j < g.nslots; j++) {
			if (g.slots[j].tok.uri != NULL && strcmp(g.slots[j].tok.uri, k->token_uri) == 0) {
				s = &g.slots[j];
				break;
			}
		}
		if (s == NULL || !s->present || !(g.key_types & (1u << k->type)))
			continue;
		if (k->cert_len > 0)
			obj_update(s->id, CKO_CERTIFICATE, k);
		if (k->spki_len > 0)
			obj_update(s->id, CKO_PUBLIC_KEY, k);
		if ((k->flags & P11A_KEY_PRIVATE_VISIBLE) && k->spki_len > 0)
			obj_update(s->id, CKO_PRIVATE_KEY, k);
	}
}

/*
 * A connection from pool (to the socket from P11AGENT_SOCK or the
 * default): an idle one or a new one.  Called without g_lock.
 */
static int
agent_get(struct p11a_pool *pool, struct p11a_client **c)
{
	static _Atomic int warned;
	char why[1024];
	int r;

	r = p11a_pool_get(pool, c, why, sizeof(why));
	if (r == 0)
		return 0;
	dbg("cannot reach the agent: %s", why);
	/* A socket that belongs to someone else is worth one word, debug or not. */
	if (r == -P11A_E_DENIED && !atomic_exchange(&warned, 1)) {
		fprintf(stderr, "p11agent-pkcs11: %s\n", why);
	}
	return r;
}

/* Ends an agent request started with g.inflight++ (g_lock held). */
static void
inflight_done_locked(void)
{
	if (--g.inflight == 0)
		pthread_cond_broadcast(&g_idle);
}

/*
 * Brings slots and objects up to date with the agent's LIST, at most
 * every REFRESH_MS unless forced.  With the agent down every slot shows
 * no token and every object handle is invalid until it answers again.
 * Called and returns with g_lock held, but drops it while LIST is on the
 * wire: callers find sessions, slots and objects after it, not before.
 * While another LIST is on the wire an unforced call keeps the inventory
 * it has (unless none was ever applied).
 */
static void
refresh_locked(int force)
{
	struct p11a_pool *pool = g.ctl_pool;
	struct p11a_client *c = NULL;
	struct p11a_msg reply;
	uint64_t now = (uint64_t)p11a_now_ms(), seq;
	int r;

	if (!force && g.refreshed &&
	    (now - g.last_refresh < REFRESH_MS || (g.refreshing > 0 && g.list_applied > 0)))
		return;
	g.refreshed = 1;
	g.last_refresh = now;
	seq = ++g.list_seq;
	g.refreshing++;
	g.inflight++;
	pthread_mutex_unlock(&g_lock);

	memset(&reply, 0, sizeof(reply));
	if ((r = agent_get(pool, &c)) == 0 && (r = p11a_client_list(c, &reply)) != 0)
		dbg("LIST failed: %s", p11a_client_last_error(c));
	p11a_pool_put(pool, c);

	pthread_mutex_lock(&g_lock);
	g.refreshing--;
	/* A LIST started later may have been applied meanwhile: it is newer. */
	if (seq > g.list_applied) {
		g.list_applied = seq;
		if (r != 0) {
			agent_down_locked();
		} else {
			apply_list_locked(&reply.u.list);
			g.agent_up = 1;
			if (g.nslots == 0) {
				/* a placeholder slot: clients that scan slots once find it later */
				if ((g.slots = calloc(1, sizeof(*g.slots))) != NULL)
					g.nslots = 1;
			}
		}
	}
	inflight_done_locked();
	p11a_msg_clear(&reply);
}

/* ------------------------------------------------------------ general */

/*
 * P11AGENT_PKCS11_KEY_TYPES="rsa,ec" shows only those key types (default:
 * all).  libp11 0.4.12 (OpenSSL's pkcs11 engine, curl --engine pkcs11)
 * fails its whole key enumeration at the first Ed25519 key on a token.
 */
static unsigned
key_types_from_env(void)
{
	const char *v = getenv("P11AGENT_PKCS11_KEY_TYPES");
	unsigned mask = 0;
	char buf[64], *tok, *save = NULL;

	if (v == NULL || *v == '\0' || strlen(v) >= sizeof(buf))
		return ~0u;
	memcpy(buf, v, strlen(v) + 1);
	for (tok = strtok_r(buf, ", ", &save); tok != NULL; tok = strtok_r(NULL, ", ", &save)) {
		if (strcasecmp(tok, "rsa") == 0)
			mask |= 1u << P11A_KEY_RSA;
		else if (strcasecmp(tok, "ec") == 0)
			mask |= 1u << P11A_KEY_EC;
		else if (strcasecmp(tok, "ed25519") == 0)
			mask |= 1u << P11A_KEY_ED25519;
	}
	return mask != 0 ? mask : ~0u;
}

static CK_RV
m_Initialize(CK_VOID_PTR pInitArgs)
{
	CK_C_INITIALIZE_ARGS *a = pInitArgs;
	CK_RV rv = CKR_OK;

	if (a != NULL) {
		int some = a->CreateMutex || a->DestroyMutex || a->LockMutex || a->UnlockMutex;
		int all = a->CreateMutex && a->DestroyMutex && a->LockMutex && a->UnlockMutex;

		if (some && !all)
			return CKR_ARGUMENTS_BAD;
		/*
		 * Application mutex functions without CKF_OS_LOCKING_OK: we use
		 * pthreads all the same, which is what every caller needs.
		 * a->reserved: NSS passes its parameter string; nothing to read.
		 */
	}
	pthread_once(&g_once, once_init);
	pthread_mutex_lock(&g_lock);
	while (g.finalizing)
		pthread_cond_wait(&g_idle, &g_lock);
	if (g.initialized && g.pid == getpid()) {
		rv = CKR_CRYPTOKI_ALREADY_INITIALIZED;
		goto out;
	}
	if (g.initialized)
		state_free_locked();    /* a forked child initializing its own */
	g.initialized = 1;
	g.pid = getpid();
	g.next_sess = 1;
	g.debug = getenv("P11AGENT_PKCS11_DEBUG") != NULL;
	g.key_types = key_types_from_env();
	g.ctl_pool = p11a_pool_new(NULL, CLIENT_NAME, LIST_TIMEOUT_MS, CTL_POOL_MAX);
	g.sign_pool = p11a_pool_new(NULL, CLIENT_NAME, 0, SIGN_POOL_MAX);
	/* one slot from the start, so that even a first scan finds a slot */
	if (g.ctl_pool == NULL || g.sign_pool == NULL ||
	    (g.slots = calloc(1, sizeof(*g.slots))) == NULL) {
		state_free_locked();
		rv = CKR_HOST_MEMORY;
		goto out;
	}
	g.nslots = 1;
out:
	pthread_mutex_unlock(&g_lock);
	return rv;
}

static CK_RV
m_Finalize(CK_VOID_PTR pReserved)
{
	if (pReserved != NULL)
		return CKR_ARGUMENTS_BAD;
	pthread_mutex_lock(&g_lock);
	if (!g.initialized || g.finalizing) {
		pthread_mutex_unlock(&g_lock);
		return CKR_CRYPTOKI_NOT_INITIALIZED;
	}
	/*
	 * Requests on the wire hold connections of the pools and come back
	 * to this state: wait for them (PKCS#11 leaves C_Finalize during
	 * other calls undefined; new calls fail meanwhile).
	 */
	g.finalizing = 1;
	while (g.inflight > 0)
		pthread_cond_wait(&g_idle, &g_lock);
	state_free_locked();        /* clears finalizing */
	pthread_cond_broadcast(&g_idle);
	pthread_mutex_unlock(&g_lock);
	return CKR_OK;
}

static CK_RV
m_GetInfo(CK_INFO_PTR info)
{
	if (info == NULL)
		return CKR_ARGUMENTS_BAD;
	if (!g.initialized)
		return CKR_CRYPTOKI_NOT_INITIALIZED;
	memset(info, 0, sizeof(*info));
	info->cryptokiVersion.major = 2;
	info->cryptokiVersion.minor = 40;
	pad(info->manufacturerID, sizeof(info->manufacturerID), "p11agent");
	pad(info->libraryDescription, sizeof(info->libraryDescription),
	    "p11agent front-end module");
	info->libraryVersion.major = 0;
	info->libraryVersion.minor = 1;
	return CKR_OK;
}

/* Takes the lock; fails when the module is not initialized. */
#define LOCK_OR_FAIL() do { \
	pthread_mutex_lock(&g_lock); \
	if (!g.initialized || g.finalizing) { \
		pthread_mutex_unlock(&g_lock); \
		return CKR_CRYPTOKI_NOT_INITIALIZED; \
	} \
} while (0)
#define UNLOCK_RETURN(x) do { CK_RV rv_ = (x); pthread_mutex_unlock(&g_lock); return rv_; } while (0)

/* ------------------------------------------------------------ slots */

static CK_RV
m_GetSlotList(CK_BBOOL tokenPresent, CK_SLOT_ID_PTR list, CK_ULONG_PTR count)
{
	CK_ULONG n = 0;
	size_t i;
	CK_RV rv = CKR_OK;

	if (count == NULL)
		return CKR_ARGUMENTS_BAD;
	LOCK_OR_FAIL();
	/* Rate-limited, so a sizing call and the next one see the same list. */
	refresh_locked(0);
	for (i = 0; i < g.nslots; i++) {
		if (tokenPresent && !g.slots[i].present)
			continue;
		if (list != NULL && n < *count)
			list[n] = g.slots[i].id;
		n++;
	}
	if (list != NULL && n > *count)
		rv = CKR_BUFFER_TOO_SMALL;
	*count = n;
	UNLOCK_RETURN(rv);
}

static CK_RV
m_GetSlotInfo(CK_SLOT_ID id, CK_SLOT_INFO_PTR info)
{
	struct slot *s;
	char desc[160];

	if (info == NULL)
		return CKR_ARGUMENTS_BAD;
	LOCK_OR_FAIL();
	refresh_locked(0);
	if ((s = slot_get(id)) == NULL)
		UNLOCK_RETURN(CKR_SLOT_ID_INVALID);
	memset(info, 0, sizeof(*info));
	snprintf(desc, sizeof(desc), "p11agent: %s",
		 s->tok.label != NULL ? s->tok.label : "(no token)");
	pad(info->slotDescription, sizeof(info->slotDescription), desc);
	pad(info->manufacturerID, sizeof(info->manufacturerID), "p11agent");
	info->flags = CKF_REMOVABLE_DEVICE | (s->present ? CKF_TOKEN_PRESENT : 0);
	UNLOCK_RETURN(CKR_OK);
}

static CK_RV
m_GetTokenInfo(CK_SLOT_ID id, CK_TOKEN_INFO_PTR info)
{
	struct slot *s;
	uint32_t f;

	if (info == NULL)
		return CKR_ARGUMENTS_BAD;
	LOCK_OR_FAIL();
	refresh_locked(0);
	if ((s = slot_get(id)) == NULL)
		UNLOCK_RETURN(CKR_SLOT_ID_INVALID);
	if (!s->present)
		UNLOCK_RETURN(CKR_TOKEN_NOT_PRESENT);
	memset(info, 0, sizeof(*info));
	/*
	 * The token's own label, manufacturer, model and serial: the URIs
	 * that `p11agent list` prints select the same token here.
	 */
	pad(info->label, sizeof(info->label), s->tok.label);
	pad(info->manufacturerID, sizeof(info->manufacturerID), s->tok.manufacturer);
	pad(info->model, sizeof(info->model), s->tok.model);
	pad(info->serialNumber, sizeof(info->serialNumber), s->tok.serial);
	f = s->tok.flags;
	info->flags = CKF_TOKEN_INITIALIZED | CKF_USER_PIN_INITIALIZED | CKF_WRITE_PROTECTED;
	if (!slot_logged_in(s))
		info->flags |= CKF_LOGIN_REQUIRED;
	if (f & P11A_TOKEN_PIN_COUNT_LOW)
		info->flags |= CKF_USER_PIN_COUNT_LOW;
	if (f & P11A_TOKEN_PIN_FINAL_TRY)
		info->flags |= CKF_USER_PIN_FINAL_TRY;
	if (f & P11A_TOKEN_PIN_LOCKED)
		info->flags |= CKF_USER_PIN_LOCKED;
	info->ulMaxSessionCount = CK_EFFECTIVELY_INFINITE;
	info->ulSessionCount = CK_UNAVAILABLE_INFORMATION;
	info->ulMaxRwSessionCount = CK_EFFECTIVELY_INFINITE;
	info->ulRwSessionCount = CK_UNAVAILABLE_INFORMATION;
	info->ulMaxPinLen = P11A_PIN_MAX;
	info->ulMinPinLen = 1;
	info->ulTotalPublicMemory = CK_UNAVAILABLE_INFORMATION;
	info->ulFreePublicMemory = CK_UNAVAILABLE_INFORMATION;
	info->ulTotalPrivateMemory = CK_UNAVAILABLE_INFORMATION;
	info->ulFreePrivateMemory = CK_UNAVAILABLE_INFORMATION;
	info->firmwareVersion.major = 0;
	info->firmwareVersion.minor = 1;
	memset(info->utcTime, ' ', sizeof(info->utcTime));
	UNLOCK_RETURN(CKR_OK);
}

static CK_RV
m_GetMechanismList(CK_SLOT_ID id, CK_MECHANISM_TYPE_PTR list, CK_ULONG_PTR count)
{
	CK_RV rv = CKR_OK;
	size_t i;

	if (count == NULL)
		return CKR_ARGUMENTS_BAD;
	LOCK_OR_FAIL();
	if (slot_get(id) == NULL)
		UNLOCK_RETURN(CKR_SLOT_ID_INVALID);
	if (list != NULL) {
		if (*count < p11m_nmechs)
			rv = CKR_BUFFER_TOO_SMALL;
		else
			for (i = 0; i < p11m_nmechs; i++)
				list[i] = p11m_mechs[i].type;
	}
	*count = p11m_nmechs;
	UNLOCK_RETURN(rv);
}

static CK_RV
m_GetMechanismInfo(CK_SLOT_ID id, CK_MECHANISM_TYPE type, CK_MECHANISM_INFO_PTR info)
{
	const struct p11m_mech *m;

	if (info == NULL)
		return CKR_ARGUMENTS_BAD;
	LOCK_OR_FAIL();
	if (slot_get(id) == NULL)
		UNLOCK_RETURN(CKR_SLOT_ID_INVALID);
	if ((m = p11m_mech_find(type)) == NULL)
		UNLOCK_RETURN(CKR_MECHANISM_INVALID);
	p11m_mech_info(m, info);
	UNLOCK_RETURN(CKR_OK);
}

static CK_RV
m_InitToken(CK_SLOT_ID id, CK_UTF8CHAR_PTR pin, CK_ULONG len, CK_UTF8CHAR_PTR label)
{
	return CKR_TOKEN_WRITE_PROTECTED;
}

static CK_RV
m_InitPIN(CK_SESSION_HANDLE h, CK_UTF8CHAR_PTR pin, CK_ULONG len)
{
	return CKR_TOKEN_WRITE_PROTECTED;
}

static CK_RV
m_SetPIN(CK_SESSION_HANDLE h, CK_UTF8CHAR_PTR o, CK_ULONG ol, CK_UTF8CHAR_PTR n, CK_ULONG nl)
{
	return CKR_TOKEN_WRITE_PROTECTED;
}

/* ------------------------------------------------------------ sessions */

static CK_RV
m_OpenSession(CK_SLOT_ID id, CK_FLAGS flags, CK_VOID_PTR app, CK_NOTIFY notify,
	      CK_SESSION_HANDLE_PTR out)
{
	struct slot *s;
	struct sess *ns, **arr;

	if (out == NULL)
		return CKR_ARGUMENTS_BAD;
	if (!(flags & CKF_SERIAL_SESSION))
		return CKR_SESSION_PARALLEL_NOT_SUPPORTED;
	LOCK_OR_FAIL();
	refresh_locked(0);
	if ((s = slot_get(id)) == NULL)
		UNLOCK_RETURN(CKR_SLOT_ID_INVALID);
	if (!s->present)
		UNLOCK_RETURN(CKR_TOKEN_NOT_PRESENT);
	if ((ns = calloc(1, sizeof(*ns))) == NULL)
		UNLOCK_RETURN(CKR_HOST_MEMORY);
	if ((arr = realloc(g.sess, (g.nsess + 1) * sizeof(*arr))) == NULL) {
		free(ns);
		UNLOCK_RETURN(CKR_HOST_MEMORY);
	}
	g.sess = arr;
	ns->h = g.next_sess++;
	ns->slot = id;
	/* RW sessions are allowed; every write still fails (write-protected token). */
	ns->flags = flags & (CKF_SERIAL_SESSION | CKF_RW_SESSION);
	g.sess[g.nsess++] = ns;
	*out = ns->h;
	UNLOCK_RETURN(CKR_OK);
}

static void
sess_remove_locked(size_t i)
{
	sess_free(g.sess[i]);
	g.sess[i] = g.sess[--g.nsess];
}

static CK_RV
m_CloseSession(CK_SESSION_HANDLE h)
{
	size_t i;

	LOCK_OR_FAIL();
	for (i = 0; i < g.nsess; i++) {
		if (g.sess[i]->h == h) {
			sess_remove_locked(i);
			UNLOCK_RETURN(CKR_OK);
		}
	}
	UNLOCK_RETURN(CKR_SESSION_HANDLE_INVALID);
}

static CK_RV
m_CloseAllSessions(CK_SLOT_ID id)
{
	size_t i;

	LOCK_OR_FAIL();
	if (slot_get(id) == NULL)
		UNLOCK_RETURN(CKR_SLOT_ID_INVALID);
	for (i = g.nsess; i > 0; i--) {
		if (g.sess[i - 1]->slot == id)
			sess_remove_locked(i - 1);
	}
	UNLOCK_RETURN(CKR_OK);
}

static CK_RV
m_GetSessionInfo(CK_SESSION_HANDLE h, CK_SESSION_INFO_PTR info)
{
	struct sess *s;
	struct slot *sl;
	int rw;

	if (info == NULL)
		return CKR_ARGUMENTS_BAD;
	LOCK_OR_FAIL();
	refresh_locked(0);
	if ((s = sess_get(h)) == NULL)
		UNLOCK_RETURN(CKR_SESSION_HANDLE_INVALID);
	sl = slot_get(s->slot);
	memset(info, 0, sizeof(*info));
	info->slotID = s->slot;
	info->flags = s->flags;
	rw = (s->flags & CKF_RW_SESSION) != 0;
	if (sl != NULL && slot_logged_in(sl))
		info->state = rw ? CKS_RW_USER_FUNCTIONS : CKS_RO_USER_FUNCTIONS;
	else
		info->state = rw ? CKS_RW_PUBLIC_SESSION : CKS_RO_PUBLIC_SESSION;
	UNLOCK_RETURN(CKR_OK);
}

static CK_RV
m_GetOperationState(CK_SESSION_HANDLE h, CK_BYTE_PTR st, CK_ULONG_PTR len)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

static CK_RV
m_SetOperationState(CK_SESSION_HANDLE h, CK_BYTE_PTR st, CK_ULONG len,
		    CK_OBJECT_HANDLE ek, CK_OBJECT_HANDLE ak)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

/*
 * C_Login is forwarded as UNLOCK: the agent logs in once, for every
 * client.  While the agent's token is logged in there is nothing to do.
 */
static CK_RV
m_Login(CK_SESSION_HANDLE h, CK_USER_TYPE type, CK_UTF8CHAR_PTR pin, CK_ULONG len)
{
	char buf[P11A_PIN_MAX + 1];
	struct p11a_pool *pool;
	struct p11a_client *c = NULL;
	struct sess *s;
	struct slot *sl;
	char *token_uri;
	int r = 0, connected;

	LOCK_OR_FAIL();
	if (sess_get(h) == NULL)
		UNLOCK_RETURN(CKR_SESSION_HANDLE_INVALID);
	refresh_locked(1);
	/* The lock was dropped for LIST: the session may be gone. */
	if ((s = sess_get(h)) == NULL)
		UNLOCK_RETURN(CKR_SESSION_HANDLE_INVALID);
	sl = slot_get(s->slot);
	if (sl == NULL || !sl->present)
		UNLOCK_RETURN(CKR_DEVICE_REMOVED);
	if (type == CKU_SO)
		UNLOCK_RETURN(CKR_USER_TYPE_INVALID);
	if (type != CKU_USER && type != CKU_CONTEXT_SPECIFIC)
		UNLOCK_RETURN(CKR_USER_TYPE_INVALID);
	/*
	 * Logged in at the agent: CKR_OK rather than
	 * CKR_USER_ALREADY_LOGGED_IN, which some callers (pkcs11-tool) treat
	 * as fatal.  The PIN is not checked or sent: the agent's login is
	 * what counts, and a try could only cost a PIN retry.
	 */
	if (slot_logged_in(sl))
		UNLOCK_RETURN(CKR_OK);
	if (type == CKU_CONTEXT_SPECIFIC)
		UNLOCK_RETURN(CKR_USER_NOT_LOGGED_IN);
	/* No protected authentication path: a NULL PIN is never sent as a try. */
	if (pin == NULL)
		UNLOCK_RETURN(CKR_ARGUMENTS_BAD);
	if (len == 0 || len > P11A_PIN_MAX)
		UNLOCK_RETURN(CKR_PIN_LEN_RANGE);
	if ((token_uri = strdup(sl->tok.uri)) == NULL)
		UNLOCK_RETURN(CKR_HOST_MEMORY);
	memcpy(buf, pin, len);
	buf[len] = '\0';
	/* UNLOCK may wait on the token: not under the lock. */
	pool = g.sign_pool;
	g.inflight++;
	pthread_mutex_unlock(&g_lock);
	if ((connected = agent_get(pool, &c) == 0)) {
		r = p11a_client_unlock(c, token_uri, buf, len);
		if (r != 0)
			dbg("UNLOCK failed: %s", p11a_client_last_error(c));
		p11a_pool_put(pool, c);
	}
	p11a_wipe(buf, sizeof(buf));
	free(token_uri);
	pthread_mutex_lock(&g_lock);
	inflight_done_locked();
	if (!connected)
		UNLOCK_RETURN(CKR_DEVICE_ERROR);
	if (r != 0) {
		if (r == -P11A_E_TOKEN_NOT_PRESENT)
			UNLOCK_RETURN(CKR_DEVICE_REMOVED);
		UNLOCK_RETURN(p11m_rv_from_err(r));
	}
	refresh_locked(1);
	UNLOCK_RETURN(CKR_OK);
}

/*
 * C_Logout does not lock the agent's token: other clients share the
 * login.  Use `p11agent lock` for that.
 */
static CK_RV
m_Logout(CK_SESSION_HANDLE h)
{
	struct sess *s;
	struct slot *sl;

	LOCK_OR_FAIL();
	if ((s = sess_get(h)) == NULL)
		UNLOCK_RETURN(CKR_SESSION_HANDLE_INVALID);
	sl = slot_get(s->slot);
	if (sl == NULL || !slot_logged_in(sl))
		UNLOCK_RETURN(CKR_USER_NOT_LOGGED_IN);
	UNLOCK_RETURN(CKR_OK);
}

/* ------------------------------------------------------------ objects */

static CK_RV
m_CreateObject(CK_SESSION_HANDLE h, CK_ATTRIBUTE_PTR t, CK_ULONG n, CK_OBJECT_HANDLE_PTR o)
{
	return CKR_TOKEN_WRITE_PROTECTED;
}

static CK_RV
m_CopyObject(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_PTR t, CK_ULONG n,
	     CK_OBJECT_HANDLE_PTR no)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

static CK_RV
m_DestroyObject(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o)
{
	return CKR_TOKEN_WRITE_PROTECTED;
}

static CK_RV
m_GetObjectSize(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE oh, CK_ULONG_PTR size)
{
	struct sess *s;
	struct p11m_obj *o;
	CK_ULONG n = 0;
	size_t i;

	if (size == NULL)
		return CKR_ARGUMENTS_BAD;
	LOCK_OR_FAIL();
	if ((s = sess_get(h)) == NULL)
		UNLOCK_RETURN(CKR_SESSION_HANDLE_INVALID);
	if ((o = obj_get(oh, s->slot)) == NULL)
		UNLOCK_RETURN(CKR_OBJECT_HANDLE_INVALID);
	for (i = 0; i < o->nattrs; i++)
		n += o->attrs[i].len;
	*size = n;
	UNLOCK_RETURN(CKR_OK);
}

static CK_RV
m_GetAttributeValue(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE oh, CK_ATTRIBUTE_PTR t, CK_ULONG n)
{
	const struct p11m_attr *a;
	struct sess *s;
	struct p11m_obj *o;
	CK_RV rv = CKR_OK;
	CK_ULONG i;

	if (t == NULL && n > 0)
		return CKR_ARGUMENTS_BAD;
	LOCK_OR_FAIL();
	if ((s = sess_get(h)) == NULL)
		UNLOCK_RETURN(CKR_SESSION_HANDLE_INVALID);
	if ((o = obj_get(oh, s->slot)) == NULL)
		UNLOCK_RETURN(CKR_OBJECT_HANDLE_INVALID);
	/* Every entry is answered; the return value reports the last problem. */
	for (i = 0; i < n; i++) {
		if (p11m_attr_is_sensitive(o->cls, t[i].type)) {
			t[i].ulValueLen = CK_UNAVAILABLE_INFORMATION;
			rv = CKR_ATTRIBUTE_SENSITIVE;
			continue;
		}
		if ((a = p11m_obj_attr(o, t[i].type)) == NULL) {
			t[i].ulValueLen = CK_UNAVAILABLE_INFORMATION;
			rv = CKR_ATTRIBUTE_TYPE_INVALID;
			continue;
		}
		if (t[i].pValue == NULL) {
			t[i].ulValueLen = a->len;
		} else if (t[i].ulValueLen < a->len) {
			t[i].ulValueLen = CK_UNAVAILABLE_INFORMATION;
			rv = CKR_BUFFER_TOO_SMALL;
		} else {
			memcpy(t[i].pValue, a->val, a->len);
			t[i].ulValueLen = a->len;
		}
	}
	UNLOCK_RETURN(rv);
}

static CK_RV
m_SetAttributeValue(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_PTR t, CK_ULONG n)
{
	return CKR_TOKEN_WRITE_PROTECTED;
}

static int
obj_matches(const struct p11m_obj *o, const CK_ATTRIBUTE *t, CK_ULONG n)
{
	const struct p11m_attr *a;
	CK_ULONG i;

	for (i = 0; i < n; i++) {
		if ((a = p11m_obj_attr(o, t[i].type)) == NULL)
			return 0;
		if (a->len != t[i].ulValueLen)
			return 0;
		if (a->len > 0 && (t[i].pValue == NULL || memcmp(a->val, t[i].pValue, a->len) != 0))
			return 0;
	}
	return 1;
}

static int
template_names(const CK_ATTRIBUTE *t, CK_ULONG n)
{
	CK_ULONG i;

	for (i = 0; i < n; i++) {
		if (t[i].type == CKA_ID || t[i].type == CKA_LABEL)
			return 1;
	}
	return 0;
}

static CK_RV
m_FindObjectsInit(CK_SESSION_HANDLE h, CK_ATTRIBUTE_PTR t, CK_ULONG n)
{
	struct sess *s;
	size_t i;

	if (t == NULL && n > 0)
		return CKR_ARGUMENTS_BAD;
	LOCK_OR_FAIL();
	refresh_locked(0);      /* may drop the lock: before finding anything */
	if ((s = sess_get(h)) == NULL)
		UNLOCK_RETURN(CKR_SESSION_HANDLE_INVALID);
	if (s->find_active)
		UNLOCK_RETURN(CKR_OPERATION_ACTIVE);
	free(s->found);
	s->found = NULL;
	s->nfound = s->pos = 0;
	if (g.nobjs > 0 && (s->found = calloc(g.nobjs, sizeof(*s->found))) == NULL)
		UNLOCK_RETURN(CKR_HOST_MEMORY);
	for (i = 0; i < g.nobjs; i++) {
		const struct p11m_obj *o = &g.objs[i];

		if (o->live && o->slot == s->slot && obj_matches(o, t, n))
			s->found[s->nfound++] = o->handle;
	}
	s->find_named = template_names(t, n);
	s->find_active = 1;
	UNLOCK_RETURN(CKR_OK);
}

static CK_RV
m_FindObjects(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE_PTR out, CK_ULONG max, CK_ULONG_PTR count)
{
	struct sess *s;
	CK_ULONG n = 0;

	if (out == NULL || count == NULL)
		return CKR_ARGUMENTS_BAD;
	LOCK_OR_FAIL();
	if ((s = sess_get(h)) == NULL)
		UNLOCK_RETURN(CKR_SESSION_HANDLE_INVALID);
	if (!s->find_active)
		UNLOCK_RETURN(CKR_OPERATION_NOT_INITIALIZED);
	while (n < max && s->pos < s->nfound)
		out[n++] = s->found[s->pos++];
	*count = n;
	UNLOCK_RETURN(CKR_OK);
}

static int
is_private(CK_OBJECT_HANDLE h)
{
	return h != 0 && h <= g.nobjs && g.objs[h - 1].cls == CKO_PRIVATE_KEY;
}

/*
 * Ends s's search.  One that returned a private key becomes the
 * session's latest choice of a key: kept in s->vague when it was vague,
 * i.e. named keys (CKA_ID, CKA_LABEL), matched several private keys and
 * was ended before returning them all.
 */
static void
search_end_locked(struct sess *s)
{
	size_t i, nret = 0, nrest = 0;

	for (i = 0; i < s->nfound; i++) {
		if (!is_private(s->found[i]))
			continue;
		if (i < s->pos)
			nret++;
		else
			nrest++;
	}
	if (nret > 0) {
		free(s->vague);
		s->vague = NULL;
		s->nvague = s->npicked = 0;
		if (s->find_named && nrest > 0) {
			s->vague = s->found;
			s->nvague = s->nfound;
			s->npicked = s->pos;
			s->found = NULL;
		}
	}
	free(s->found);
	s->found = NULL;
	s->nfound = s->pos = 0;
}

static CK_RV
m_FindObjectsFinal(CK_SESSION_HANDLE h)
{
	struct sess *s;

	LOCK_OR_FAIL();
	if ((s = sess_get(h)) == NULL)
		UNLOCK_RETURN(CKR_SESSION_HANDLE_INVALID);
	if (!s->find_active)
		UNLOCK_RETURN(CKR_OPERATION_NOT_INITIALIZED);
	search_end_locked(s);
	s->find_active = 0;
	UNLOCK_RETURN(CKR_OK);
}

/* ------------------------------------------------------------ signing */

/*
 * Why a handle the client holds does not work now: the agent is down
 * (CKR_DEVICE_ERROR), the token is gone (CKR_DEVICE_REMOVED), the token
 * was locked (CKR_USER_NOT_LOGGED_IN: private keys come back with the
 * same handle after unlock), or it never was a key of this slot.
 */
static CK_RV
gone_rv(CK_OBJECT_HANDLE h, CK_SLOT_ID slot)
{
	struct slot *sl = slot_get(slot);
	struct p11m_obj *o;

	if (h == 0 || h > g.nobjs || g.objs[h - 1].slot != slot)
		return CKR_KEY_HANDLE_INVALID;
	o = &g.objs[h - 1];
	if (!g.agent_up)
		return CKR_DEVICE_ERROR;
	if (sl == NULL || !sl->present)
		return CKR_DEVICE_REMOVED;
	if (o->cls == CKO_PRIVATE_KEY && !slot_logged_in(sl))
		return CKR_USER_NOT_LOGGED_IN;
	return CKR_KEY_HANDLE_INVALID;
}

/*
 * 1 (and says so on stderr) when key came from s's latest vague search:
 * GnuTLS resolves a URI such as pkcs11:token=T;object=L;type=private
 * itself and takes the first object C_FindObjects returns, so a URI that
 * names several keys signs with whichever the module listed first.  The
 * module never sees the URI; this search pattern is the one trace of it
 * (docs/pkcs11-module.md, "URIs that match several keys").
 */
static int
vague_pick(const struct sess *s, CK_OBJECT_HANDLE key)
{
	char names[600] = "";
	size_t i, nkeys = 0, named = 0;
	int picked = 0;

	for (i = 0; i < s->npicked && !picked; i++)
		picked = s->vague[i] == key;
	if (!picked)
		return 0;
	for (i = 0; i < s->nvague; i++) {
		if (!is_private(s->vague[i]))
			continue;
		nkeys++;
		if (named < NAMED_KEYS &&
		    p11a_uri_list_add(names, sizeof(names), g.objs[s->vague[i] - 1].key_uri) == 0)
			named++;
	}
	fprintf(stderr, "p11agent-pkcs11: not signing: the key was picked from %zu private keys "
		"that the caller's search by id= or object= matched (%s%s); name one: add id= and "
		"object= ('p11agent list' shows every URI)\n",
		nkeys, names, named < nkeys ? ", ..." : "");
	return 1;
}

/* Optional CK_EDDSA_PARAMS (PKCS#11 3.0); p11-kit's header lacks it. */
struct eddsa_params {
	CK_BBOOL ph_flag;
	CK_ULONG context_len;
	CK_BYTE_PTR context;
};

static CK_RV
m_SignInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR mech, CK_OBJECT_HANDLE key)
{
	const struct p11m_mech *m;
	struct sess *s;
	struct p11m_obj *o;
	int hash, mgf1 = P11A_HASH_NONE;
	uint32_t salt = 0;

	if (mech == NULL)
		return CKR_ARGUMENTS_BAD;
	LOCK_OR_FAIL();
	refresh_locked(0);      /* may drop the lock: before finding anything */
	if ((s = sess_get(h)) == NULL)
		UNLOCK_RETURN(CKR_SESSION_HANDLE_INVALID);
	if (s->sign_active)
		UNLOCK_RETURN(CKR_OPERATION_ACTIVE);
	if ((o = obj_get(key, s->slot)) == NULL)
		UNLOCK_RETURN(gone_rv(key, s->slot));
	if (o->cls != CKO_PRIVATE_KEY)
		UNLOCK_RETURN(CKR_KEY_FUNCTION_NOT_PERMITTED);
	if (vague_pick(s, key))
		UNLOCK_RETURN(CKR_KEY_HANDLE_INVALID);
	if ((m = p11m_mech_find(mech->mechanism)) == NULL)
		UNLOCK_RETURN(CKR_MECHANISM_INVALID);
	if (m->keytype != o->keytype)
		UNLOCK_RETURN(CKR_KEY_TYPE_INCONSISTENT);
	hash = m->hash;
	if (m->pss_params) {
		const CK_RSA_PKCS_PSS_PARAMS *pp = mech->pParameter;
		int ph;

		if (pp == NULL || mech->ulParameterLen != sizeof(*pp))
			UNLOCK_RETURN(CKR_MECHANISM_PARAM_INVALID);
		ph = p11a_hash_from_ckm(pp->hashAlg);
		mgf1 = p11a_hash_from_mgf(pp->mgf);
		if (ph < 0 || mgf1 < 0 || (hash != P11A_HASH_NONE && ph != hash))
			UNLOCK_RETURN(CKR_MECHANISM_PARAM_INVALID);
		hash = ph;
		salt = (uint32_t)pp->sLen;
		if (pp->sLen > 4096)
			UNLOCK_RETURN(CKR_MECHANISM_PARAM_INVALID);
	} else if (m->scheme == P11A_SCHEME_EDDSA) {
		const struct eddsa_params *ep = mech->pParameter;

		if (ep != NULL && mech->ulParameterLen == sizeof(*ep)) {
			if (ep->ph_flag || ep->context_len != 0)
				UNLOCK_RETURN(CKR_MECHANISM_PARAM_INVALID);
		} else if (ep != NULL || mech->ulParameterLen != 0) {
			UNLOCK_RETURN(CKR_MECHANISM_PARAM_INVALID);
		}
	}
	sess_reset_sign(s);
	s->sign_active = 1;
	s->key = key;
	s->mech = m;
	s->hash = hash;
	s->mgf1 = mgf1;
	s->salt = salt;
	/* Only a message may be hashed here; a digest or DigestInfo past the cap is refused. */
	p11a_sigin_init(&s->in, m->input == P11A_INPUT_MESSAGE ? hash : P11A_HASH_NONE, NULL);
	UNLOCK_RETURN(CKR_OK);
}

/* Appends input (common/sigin.h). */
static CK_RV
sign_feed(struct sess *s, const uint8_t *p, size_t n)
{
	switch (p11a_sigin_update(&s->in, p, n)) {
	case 0: return CKR_OK;
	case -P11A_E_TOO_LARGE: return CKR_DATA_LEN_RANGE;
	case -P11A_E_NOMEM: return CKR_HOST_MEMORY;
	default: return CKR_FUNCTION_FAILED;
	}
}

/*
 * Ends a sign operation: length query and CKR_BUFFER_TOO_SMALL leave it
 * active (PKCS#11 5.2), anything else ends it.  Called with g_lock held;
 * returns with it released.  The operation is ended and the request
 * copied out before the lock is dropped for SIGN, so nothing of s is
 * touched while the agent signs.
 */
static CK_RV
sign_finish_unlock(struct sess *s, CK_BYTE_PTR out, CK_ULONG_PTR out_len)
{
	struct p11a_sign req;
	struct p11m_obj *o;
	struct p11a_pool *pool;
	struct p11a_client *c = NULL;
	const uint8_t *in;
	uint8_t *sig = NULL, *data = NULL;
	char *uri = NULL;
	size_t sig_len = 0, raw_len, data_len = 0, in_len, want_len, field_len;
	int keytype;
	CK_RV rv;
	int r, hashed;

	memset(&req, 0, sizeof(req));
	if ((o = obj_get(s->key, s->slot)) == NULL) {
		rv = gone_rv(s->key, s->slot);
		goto out_locked;
	}
	if (out == NULL) {
		*out_len = o->sig_len;
		UNLOCK_RETURN(CKR_OK);
	}
	if (*out_len < o->sig_len) {
		*out_len = o->sig_len;
		UNLOCK_RETURN(CKR_BUFFER_TOO_SMALL);
	}
	req.key_uri = o->key_uri;
	req.scheme = s->mech->scheme;
	req.input = s->mech->input;
	req.hash = (uint8_t)s->hash;
	req.mgf1_hash = (uint8_t)s->mgf1;
	req.salt_len = s->salt;
	if (p11a_sigin_final(&s->in, &in, &in_len, &hashed) != 0) {
		rv = CKR_FUNCTION_FAILED;
		goto out_locked;
	}
	req.data = (uint8_t *)in;
	req.data_len = in_len;
	if (hashed)
		req.input = P11A_INPUT_DIGEST;
	if (req.scheme == P11A_SCHEME_ECDSA && req.input == P11A_INPUT_DIGEST && !hashed) {
		/* CKM_ECDSA: the digest's length names its hash */
		if ((r = p11a_hash_from_len(req.data_len)) < 0) {
			rv = CKR_DATA_LEN_RANGE;
			goto out_locked;
		}
		req.hash = (uint8_t)r;
	}
	if (req.input == P11A_INPUT_DIGEST && req.data_len != p11a_hash_len(req.hash)) {
		rv = CKR_DATA_LEN_RANGE;
		goto out_locked;
	}
	if (req.data_len == 0 && req.input != P11A_INPUT_MESSAGE) {
		rv = CKR_DATA_LEN_RANGE;
		goto out_locked;
	}
	/* Copies of what the round trip needs: the lock is dropped for it. */
	data_len = req.data_len;
	if ((uri = strdup(o->key_uri)) == NULL ||
	    (data_len > 0 && (data = malloc(data_len)) == NULL)) {
		rv = CKR_HOST_MEMORY;
		goto out_locked;
	}
	if (data_len > 0)
		memcpy(data, req.data, data_len);
	req.data = data;
	req.key_uri = uri;
	keytype = o->keytype;
	want_len = o->sig_len;
	field_len = o->field_len;
	sess_reset_sign(s);
	pool = g.sign_pool;
	g.inflight++;
	pthread_mutex_unlock(&g_lock);

	if ((r = agent_get(pool, &c)) != 0) {
		rv = CKR_DEVICE_ERROR;
		goto out;
	}
	if ((r = p11a_client_sign(c, &req, &sig, &sig_len)) != 0) {
		dbg("SIGN with %s failed: %s", req.key_uri, p11a_client_last_error(c));
		rv = p11m_rv_from_err(r);
		goto out;
	}
	if (keytype == P11A_KEY_EC) {
		r = p11a_ecdsa_der_to_raw(sig, sig_len, field_len, out, *out_len, &raw_len);
		if (r != 0 || raw_len != want_len) {
			rv = CKR_DEVICE_ERROR;
			goto out;
		}
		*out_len = raw_len;
	} else {
		if (sig_len != want_len) {
			rv = CKR_DEVICE_ERROR;
			goto out;
		}
		memcpy(out, sig, sig_len);
		*out_len = sig_len;
	}
	rv = CKR_OK;
out:
	p11a_pool_put(pool, c);
	free(sig);
	if (data != NULL) {
		p11a_wipe(data, data_len);
		free(data);
	}
	free(uri);
	pthread_mutex_lock(&g_lock);
	inflight_done_locked();
	pthread_mutex_unlock(&g_lock);
	return rv;
out_locked:
	if (data != NULL) {
		p11a_wipe(data, data_len);
		free(data);
	}
	free(uri);
	sess_reset_sign(s);
	UNLOCK_RETURN(rv);
}

static CK_RV
m_Sign(CK_SESSION_HANDLE h, CK_BYTE_PTR data, CK_ULONG len, CK_BYTE_PTR sig, CK_ULONG_PTR sig_len)
{
	struct sess *s;
	CK_RV rv;

	if (sig_len == NULL || (data == NULL && len > 0))
		return CKR_ARGUMENTS_BAD;
	LOCK_OR_FAIL();
	if ((s = sess_get(h)) == NULL)
		UNLOCK_RETURN(CKR_SESSION_HANDLE_INVALID);
	if (!s->sign_active)
		UNLOCK_RETURN(CKR_OPERATION_NOT_INITIALIZED);
	if (s->sign_multi) {
		sess_reset_sign(s);
		UNLOCK_RETURN(CKR_OPERATION_ACTIVE);
	}
	/* A length query must not keep the data: the real call passes it again. */
	if (sig != NULL) {
		p11a_sigin_reset(&s->in);
		if ((rv = sign_feed(s, data, len)) != CKR_OK) {
			sess_reset_sign(s);
			UNLOCK_RETURN(rv);
		}
	}
	return sign_finish_unlock(s, sig, sig_len);
}

static CK_RV
m_SignUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR data, CK_ULONG len)
{
	struct sess *s;
	CK_RV rv;

	if (data == NULL && len > 0)
		return CKR_ARGUMENTS_BAD;
	LOCK_OR_FAIL();
	if ((s = sess_get(h)) == NULL)
		UNLOCK_RETURN(CKR_SESSION_HANDLE_INVALID);
	if (!s->sign_active)
		UNLOCK_RETURN(CKR_OPERATION_NOT_INITIALIZED);
	s->sign_multi = 1;
	if ((rv = sign_feed(s, data, len)) != CKR_OK)
		sess_reset_sign(s);
	UNLOCK_RETURN(rv);
}

static CK_RV
m_SignFinal(CK_SESSION_HANDLE h, CK_BYTE_PTR sig, CK_ULONG_PTR sig_len)
{
	struct sess *s;

	if (sig_len == NULL)
		return CKR_ARGUMENTS_BAD;
	LOCK_OR_FAIL();
	if ((s = sess_get(h)) == NULL)
		UNLOCK_RETURN(CKR_SESSION_HANDLE_INVALID);
	if (!s->sign_active)
		UNLOCK_RETURN(CKR_OPERATION_NOT_INITIALIZED);
	s->sign_multi = 1;
	return sign_finish_unlock(s, sig, sig_len);
}

/* ------------------------------------------------------------ not supported */

#define NOT_SUPPORTED(name, ...) \
	static CK_RV name(__VA_ARGS__) { return CKR_FUNCTION_NOT_SUPPORTED; }

NOT_SUPPORTED(m_EncryptInit, CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c)
NOT_SUPPORTED(m_Encrypt, CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e)
NOT_SUPPORTED(m_EncryptUpdate, CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e)
NOT_SUPPORTED(m_EncryptFinal, CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG_PTR c)
NOT_SUPPORTED(m_DecryptInit, CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c)
NOT_SUPPORTED(m_Decrypt, CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e)
NOT_SUPPORTED(m_DecryptUpdate, CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e)
NOT_SUPPORTED(m_DecryptFinal, CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG_PTR c)
NOT_SUPPORTED(m_DigestInit, CK_SESSION_HANDLE a, CK_MECHANISM_PTR b)
NOT_SUPPORTED(m_Digest, CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e)
NOT_SUPPORTED(m_DigestUpdate, CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c)
NOT_SUPPORTED(m_DigestKey, CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b)
NOT_SUPPORTED(m_DigestFinal, CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG_PTR c)
NOT_SUPPORTED(m_SignRecoverInit, CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c)
NOT_SUPPORTED(m_SignRecover, CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e)
NOT_SUPPORTED(m_VerifyInit, CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c)
NOT_SUPPORTED(m_Verify, CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG e)
NOT_SUPPORTED(m_VerifyUpdate, CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c)
NOT_SUPPORTED(m_VerifyFinal, CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c)
NOT_SUPPORTED(m_VerifyRecoverInit, CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c)
NOT_SUPPORTED(m_VerifyRecover, CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e)
NOT_SUPPORTED(m_DigestEncryptUpdate, CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e)
NOT_SUPPORTED(m_DecryptDigestUpdate, CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e)
NOT_SUPPORTED(m_SignEncryptUpdate, CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e)
NOT_SUPPORTED(m_DecryptVerifyUpdate, CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e)
NOT_SUPPORTED(m_GenerateKey, CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_ATTRIBUTE_PTR c, CK_ULONG d, CK_OBJECT_HANDLE_PTR e)
NOT_SUPPORTED(m_GenerateKeyPair, CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_ATTRIBUTE_PTR c, CK_ULONG d,
	      CK_ATTRIBUTE_PTR e, CK_ULONG f, CK_OBJECT_HANDLE_PTR g_, CK_OBJECT_HANDLE_PTR h)
NOT_SUPPORTED(m_WrapKey, CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c, CK_OBJECT_HANDLE d,
	      CK_BYTE_PTR e, CK_ULONG_PTR f)
NOT_SUPPORTED(m_UnwrapKey, CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c, CK_BYTE_PTR d,
	      CK_ULONG e, CK_ATTRIBUTE_PTR f, CK_ULONG g_, CK_OBJECT_HANDLE_PTR h)
NOT_SUPPORTED(m_DeriveKey, CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c, CK_ATTRIBUTE_PTR d,
	      CK_ULONG e, CK_OBJECT_HANDLE_PTR f)
NOT_SUPPORTED(m_WaitForSlotEvent, CK_FLAGS a, CK_SLOT_ID_PTR b, CK_VOID_PTR c)

static CK_RV
m_SeedRandom(CK_SESSION_HANDLE h, CK_BYTE_PTR s, CK_ULONG n)
{
	return CKR_RANDOM_SEED_NOT_SUPPORTED;
}

/* The host's generator: callers (pkcs11-tool --test) expect one per session. */
static CK_RV
m_GenerateRandom(CK_SESSION_HANDLE h, CK_BYTE_PTR out, CK_ULONG n)
{
	CK_RV rv = CKR_OK;

	if (out == NULL && n > 0)
		return CKR_ARGUMENTS_BAD;
	LOCK_OR_FAIL();
	if (sess_get(h) == NULL)
		rv = CKR_SESSION_HANDLE_INVALID;
	else if (n > INT_MAX || (n > 0 && RAND_bytes(out, (int)n) != 1))
		rv = CKR_FUNCTION_FAILED;
	UNLOCK_RETURN(rv);
}

static CK_RV
m_GetFunctionStatus(CK_SESSION_HANDLE h)
{
	return CKR_FUNCTION_NOT_PARALLEL;
}

static CK_RV
m_CancelFunction(CK_SESSION_HANDLE h)
{
	return CKR_FUNCTION_NOT_PARALLEL;
}

static CK_RV m_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list);

static CK_FUNCTION_LIST function_list = {
	.version = { 2, 40 },
	.C_Initialize = m_Initialize,
	.C_Finalize = m_Finalize,
	.C_GetInfo = m_GetInfo,
	.C_GetFunctionList = m_GetFunctionList,
	.C_GetSlotList = m_GetSlotList,
	.C_GetSlotInfo = m_GetSlotInfo,
	.C_GetTokenInfo = m_GetTokenInfo,
	.C_GetMechanismList = m_GetMechanismList,
	.C_GetMechanismInfo = m_GetMechanismInfo,
	.C_InitToken = m_InitToken,
	.C_InitPIN = m_InitPIN,
	.C_SetPIN = m_SetPIN,
	.C_OpenSession = m_OpenSession,
	.C_CloseSession = m_CloseSession,
	.C_CloseAllSessions = m_CloseAllSessions,
	.C_GetSessionInfo = m_GetSessionInfo,
	.C_GetOperationState = m_GetOperationState,
	.C_SetOperationState = m_SetOperationState,
	.C_Login = m_Login,
	.C_Logout = m_Logout,
	.C_CreateObject = m_CreateObject,
	.C_CopyObject = m_CopyObject,
	.C_DestroyObject = m_DestroyObject,
	.C_GetObjectSize = m_GetObjectSize,
	.C_GetAttributeValue = m_GetAttributeValue,
	.C_SetAttributeValue = m_SetAttributeValue,
	.C_FindObjectsInit = m_FindObjectsInit,
	.C_FindObjects = m_FindObjects,
	.C_FindObjectsFinal = m_FindObjectsFinal,
	.C_EncryptInit = m_EncryptInit,
	.C_Encrypt = m_Encrypt,
	.C_EncryptUpdate = m_EncryptUpdate,
	.C_EncryptFinal = m_EncryptFinal,
	.C_DecryptInit = m_DecryptInit,
	.C_Decrypt = m_Decrypt,
	.C_DecryptUpdate = m_DecryptUpdate,
	.C_DecryptFinal = m_DecryptFinal,
	.C_DigestInit = m_DigestInit,
	.C_Digest = m_Digest,
	.C_DigestUpdate = m_DigestUpdate,
	.C_DigestKey = m_DigestKey,
	.C_DigestFinal = m_DigestFinal,
	.C_SignInit = m_SignInit,
	.C_Sign = m_Sign,
	.C_SignUpdate = m_SignUpdate,
	.C_SignFinal = m_SignFinal,
	.C_SignRecoverInit = m_SignRecoverInit,
	.C_SignRecover = m_SignRecover,
	.C_VerifyInit = m_VerifyInit,
	.C_Verify = m_Verify,
	.C_VerifyUpdate = m_VerifyUpdate,
	.C_VerifyFinal = m_VerifyFinal,
	.C_VerifyRecoverInit = m_VerifyRecoverInit,
	.C_VerifyRecover = m_VerifyRecover,
	.C_DigestEncryptUpdate = m_DigestEncryptUpdate,
	.C_DecryptDigestUpdate = m_DecryptDigestUpdate,
	.C_SignEncryptUpdate = m_SignEncryptUpdate,
	.C_DecryptVerifyUpdate = m_DecryptVerifyUpdate,
	.C_GenerateKey = m_GenerateKey,
	.C_GenerateKeyPair = m_GenerateKeyPair,
	.C_WrapKey = m_WrapKey,
	.C_UnwrapKey = m_UnwrapKey,
	.C_DeriveKey = m_DeriveKey,
	.C_SeedRandom = m_SeedRandom,
	.C_GenerateRandom = m_GenerateRandom,
	.C_GetFunctionStatus = m_GetFunctionStatus,
	.C_CancelFunction = m_CancelFunction,
	.C_WaitForSlotEvent = m_WaitForSlotEvent,
};

static CK_RV
m_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list)
{
	if (list == NULL)
		return CKR_ARGUMENTS_BAD;
	*list = &function_list;
	return CKR_OK;
}

P11M_EXPORT CK_RV
C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list)
{
	return m_GetFunctionList(list);
}
