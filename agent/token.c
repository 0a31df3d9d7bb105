/*
 * PKCS#11 calls of the token helper.  See token.h for the contract.
 *
 * Locking:
 * - m->lock guards the slot table and everything in a slot that signing
 *   threads read: token record, keys, presence, login state, mechanisms.
 *   Only the control thread writes those, so it reads them unlocked.
 *   PKCS#11 calls are never made under m->lock.
 * - s->plock guards a slot's session pool (idle list, counts, generation).
 *
 * Session copies of keys: a pooled session keeps, per key it signed with,
 * a session object copied from the token key (C_CopyObject, CKA_TOKEN
 * false).  Tokens that keep token objects in files (SoftHSM2) re-read the
 * key file on every C_SignInit with the token object; with a session
 * object they do not.  A copy is tied to its session (closing the session
 * destroys it) and to the slot's key generation s->kgen, bumped whenever
 * the key handles may change meaning (rescan, login, logout, removal): a
 * session holding copies of an older generation is never used with them
 * and is closed when it comes back to the pool, so a stale handle never
 * reaches C_SignInit.
 *
 * Copies and inventory searches never overlap (m->copy_lock): a module
 * may build the copy attribute by attribute, starting from the token
 * object's, and SoftHSM2 does: for a moment the session object has
 * CKA_TOKEN true, label and CKA_ID of the key, and a C_FindObjects on
 * another session finds it.  The inventory then listed the key twice
 * ("AMBIGUOUS: 2 keys match").  Making a copy takes copy_lock shared,
 * an inventory search takes it exclusive; and every object a search
 * returns is checked to be CKA_TOKEN true once the search is over.
 */
#include "config.h"
#include "token.h"
#include "log.h"
#include "p11a.h"
#include "proto.h"
#include "sigenc.h"
#include "uri.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/x509.h>

#define OBJ_MAX         P11A_LIST_MAX   /* objects of one class we look at per token */
#define ATTR_MAX        P11A_FRAME_MAX  /* largest attribute value we read */
#define SLOT_MAX        256
#define ED25519_BITS    255
#define CLOSE_WAIT_MS   2000

/* Mechanisms we care about, from C_GetMechanismList. */
#define MECH_RSA_PKCS   0x01u
#define MECH_RSA_PSS    0x02u
#define MECH_RSA_X509   0x04u
#define MECH_ECDSA      0x08u
#define MECH_EDDSA      0x10u
#define MECH_ALL        0x1fu

struct tok_key {
	struct p11a_key k;              /* wire record */
	CK_OBJECT_HANDLE priv;          /* CK_INVALID_HANDLE: private key not visible */
};

/* A pooled session and the session copies of keys made in it. */
#define PCOPY_MAX 8

struct psess {
	CK_SESSION_HANDLE h;
	unsigned kgen;                  /* s->kgen the copies belong to */
	unsigned ncopy;
	struct {
		CK_OBJECT_HANDLE priv;  /* the token key */
		CK_OBJECT_HANDLE copy;  /* CK_INVALID_HANDLE: the token refused a copy */
	} copy[PCOPY_MAX];
};

struct tok_slot {
	CK_SLOT_ID id;
	atomic_uint kgen;               /* key generation (see "Session copies" above) */

	/* Under m->lock (written by the control thread only). */
	int known;                      /* tok/ti hold a token seen in this slot */
	int present;                    /* an initialized token is in the slot now */
	int logged_in;
	CK_TOKEN_INFO ti;
	struct p11a_token tok;
	struct tok_key *keys;
	size_t nkeys;
	unsigned mechs;                 /* MECH_*; MECH_ALL when the list is unknown */

	/* Control thread only. */
	int mechs_read;
	CK_SESSION_HANDLE kept;         /* multi-session tokens: the control session */
	struct psess *ctl_ps;           /* one-session tokens: the pool session lent to control */

	/* Session pool, under plock. */
	pthread_mutex_t plock;
	pthread_cond_t pcond;
	int shared;                     /* one-session token: the pool's session is the kept one */
	unsigned cap;                   /* sessions the pool may open */
	unsigned nopen;                 /* pool sessions open (idle + lent out) */
	unsigned gen;                   /* bumped when the token changes: old sessions get closed */
	unsigned nidle;
	struct psess *idle[TOKEN_POOL_MAX];
};

struct token_module {
	char *name;
	char *path;
	void *dl;
	CK_FUNCTION_LIST_PTR f;
	int wait_ms;
	unsigned pool_max;              /* session-pool: signing sessions per token at most */
	int event_fd;
	atomic_int inflight;            /* threads inside token_sign's PKCS#11 calls */
	atomic_int key_copies;          /* 0 once the module refused C_CopyObject outright */
	atomic_uint igen;               /* inventory generation (key memos); bumped under lock */
	pthread_rwlock_t copy_lock;     /* C_CopyObject shared, inventory searches exclusive */

	pthread_mutex_t lock;
	int closing;
	struct tok_slot *slots[SLOT_MAX];
	size_t nslots;
};

/* ------------------------------------------------------------ CK_RV */

static const struct {
	CK_RV rv;
	const char *name;
} ckr_names[] = {
#define R(x) { x, #x }
	R(CKR_OK), R(CKR_CANCEL), R(CKR_HOST_MEMORY), R(CKR_SLOT_ID_INVALID),
	R(CKR_GENERAL_ERROR), R(CKR_FUNCTION_FAILED), R(CKR_ARGUMENTS_BAD),
	R(CKR_NO_EVENT), R(CKR_NEED_TO_CREATE_THREADS), R(CKR_CANT_LOCK),
	R(CKR_ATTRIBUTE_READ_ONLY), R(CKR_ATTRIBUTE_SENSITIVE),
	R(CKR_ATTRIBUTE_TYPE_INVALID), R(CKR_ATTRIBUTE_VALUE_INVALID),
	R(CKR_ACTION_PROHIBITED), R(CKR_DATA_INVALID), R(CKR_DATA_LEN_RANGE),
	R(CKR_DEVICE_ERROR), R(CKR_DEVICE_MEMORY), R(CKR_DEVICE_REMOVED),
	R(CKR_ENCRYPTED_DATA_INVALID), R(CKR_ENCRYPTED_DATA_LEN_RANGE),
	R(CKR_FUNCTION_CANCELED), R(CKR_FUNCTION_NOT_PARALLEL),
	R(CKR_FUNCTION_NOT_SUPPORTED), R(CKR_KEY_HANDLE_INVALID),
	R(CKR_KEY_SIZE_RANGE), R(CKR_KEY_TYPE_INCONSISTENT),
	R(CKR_KEY_NOT_NEEDED), R(CKR_KEY_CHANGED), R(CKR_KEY_NEEDED),
	R(CKR_KEY_INDIGESTIBLE), R(CKR_KEY_FUNCTION_NOT_PERMITTED),
	R(CKR_KEY_NOT_WRAPPABLE), R(CKR_KEY_UNEXTRACTABLE),
	R(CKR_MECHANISM_INVALID), R(CKR_MECHANISM_PARAM_INVALID),
	R(CKR_OBJECT_HANDLE_INVALID), R(CKR_OPERATION_ACTIVE),
	R(CKR_OPERATION_NOT_INITIALIZED), R(CKR_PIN_INCORRECT), R(CKR_PIN_INVALID),
	R(CKR_PIN_LEN_RANGE), R(CKR_PIN_EXPIRED), R(CKR_PIN_LOCKED),
	R(CKR_SESSION_CLOSED), R(CKR_SESSION_COUNT), R(CKR_SESSION_HANDLE_INVALID),
	R(CKR_SESSION_PARALLEL_NOT_SUPPORTED), R(CKR_SESSION_READ_ONLY),
	R(CKR_SESSION_EXISTS), R(CKR_SESSION_READ_ONLY_EXISTS),
	R(CKR_SESSION_READ_WRITE_SO_EXISTS), R(CKR_SIGNATURE_INVALID),
	R(CKR_SIGNATURE_LEN_RANGE), R(CKR_TEMPLATE_INCOMPLETE),
	R(CKR_TEMPLATE_INCONSISTENT), R(CKR_TOKEN_NOT_PRESENT),
	R(CKR_TOKEN_NOT_RECOGNIZED), R(CKR_TOKEN_WRITE_PROTECTED),
	R(CKR_USER_ALREADY_LOGGED_IN), R(CKR_USER_NOT_LOGGED_IN),
	R(CKR_USER_PIN_NOT_INITIALIZED), R(CKR_USER_TYPE_INVALID),
	R(CKR_USER_ANOTHER_ALREADY_LOGGED_IN), R(CKR_USER_TOO_MANY_TYPES),
	R(CKR_RANDOM_SEED_NOT_SUPPORTED), R(CKR_RANDOM_NO_RNG),
	R(CKR_DOMAIN_PARAMS_INVALID), R(CKR_CURVE_NOT_SUPPORTED),
	R(CKR_BUFFER_TOO_SMALL), R(CKR_SAVED_STATE_INVALID),
	R(CKR_INFORMATION_SENSITIVE), R(CKR_STATE_UNSAVEABLE),
	R(CKR_CRYPTOKI_NOT_INITIALIZED), R(CKR_CRYPTOKI_ALREADY_INITIALIZED),
	R(CKR_MUTEX_BAD), R(CKR_MUTEX_NOT_LOCKED), R(CKR_FUNCTION_REJECTED),
#undef R
};

/* Name of a CK_RV for messages; unknown values as hex in buf. */
static const char *
ckr_name(CK_RV rv, char *buf, size_t size)
{
	for (size_t i = 0; i < sizeof(ckr_names) / sizeof(ckr_names[0]); i++) {
		if (ckr_names[i].rv == rv)
			return ckr_names[i].name;
	}
	if (rv >= CKR_VENDOR_DEFINED)
		snprintf(buf, size, "CKR_VENDOR_DEFINED+0x%lx", (unsigned long)(rv - CKR_VENDOR_DEFINED));
	else
		snprintf(buf, size, "CKR 0x%lx", (unsigned long)rv);
	return buf;
}

/*
 * The project's one CK_RV -> P11A_E translation.  Callers that know more
 * (a wrong PIN, a stale handle) act on the CK_RV before they get here but
 * take the code from here.
 */
static int
rv_err(CK_RV rv)
{
	switch (rv) {
	case CKR_OK:
		return 0;
	case CKR_HOST_MEMORY:
		return -P11A_E_NOMEM;
	case CKR_USER_NOT_LOGGED_IN:
		return -P11A_E_LOCKED;
	case CKR_PIN_INCORRECT:
		return -P11A_E_PIN_INCORRECT;
	case CKR_PIN_LOCKED:
		return -P11A_E_PIN_LOCKED;
	case CKR_PIN_INVALID:
	case CKR_PIN_LEN_RANGE:
		return -P11A_E_PIN_INVALID;
	case CKR_DEVICE_REMOVED:
	case CKR_TOKEN_NOT_PRESENT:
	case CKR_TOKEN_NOT_RECOGNIZED:
	case CKR_SLOT_ID_INVALID:
		return -P11A_E_TOKEN_NOT_PRESENT;
	case CKR_MECHANISM_INVALID:
	case CKR_MECHANISM_PARAM_INVALID:
	case CKR_KEY_TYPE_INCONSISTENT:
	case CKR_KEY_FUNCTION_NOT_PERMITTED:
	case CKR_KEY_SIZE_RANGE:
	case CKR_FUNCTION_NOT_SUPPORTED:
		return -P11A_E_UNSUPPORTED;
	case CKR_DATA_LEN_RANGE:
	case CKR_DATA_INVALID:
		return -P11A_E_BAD_REQUEST;
	case CKR_SESSION_COUNT:
		return -P11A_E_BUSY;
	default:
		return -P11A_E_TOKEN;
	}
}

/* The session is unusable after this return value: close it, open a new one. */
static int
rv_session_gone(CK_RV rv)
{
	return rv == CKR_SESSION_HANDLE_INVALID || rv == CKR_SESSION_CLOSED ||
	    rv == CKR_DEVICE_REMOVED || rv == CKR_TOKEN_NOT_PRESENT;
}

static int
rv_token_gone(CK_RV rv)
{
	return rv == CKR_DEVICE_REMOVED || rv == CKR_TOKEN_NOT_PRESENT ||
	    rv == CKR_TOKEN_NOT_RECOGNIZED || rv == CKR_SLOT_ID_INVALID;
}

static void __attribute__((format(printf, 3, 4)))
set_msg(char *msg, size_t size, const char *fmt, ...)
{
	va_list ap;

	if (msg == NULL || size == 0)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, size, fmt, ap);
	va_end(ap);
}

/* Message "token 'LABEL': WHAT: CKR_X" and the code for rv. */
static int
fail_rv(char *msg, size_t size, const char *label, const char *what, CK_RV rv)
{
	char nb[48];

	set_msg(msg, size, "token '%s': %s: %s", label, what, ckr_name(rv, nb, sizeof(nb)));
	return rv_err(rv);
}

/* ------------------------------------------------------------ small helpers */

/* PKCS#11 text field -> C string: cut at the first NUL, drop trailing blanks. */
static char *
pad_text(const unsigned char *p, size_t n)
{
	size_t len = 0;
	char *s;

	while (len < n && p[len] != '\0')
		len++;
	while (len > 0 && p[len - 1] == ' ')
		len--;
	if ((s = malloc(len + 1)) == NULL)
		return NULL;
	memcpy(s, p, len);
	s[len] = '\0';
	return s;
}

static uint8_t *
dup_bytes(const uint8_t *p, size_t n)
{
	uint8_t *d;

	if (n == 0)
		return NULL;
	if ((d = malloc(n)) == NULL)
		return NULL;
	memcpy(d, p, n);
	return d;
}

static void
ts_after_ms(struct timespec *ts, int ms)
{
	clock_gettime(CLOCK_MONOTONIC, ts);
	ts->tv_sec += ms / 1000;
	ts->tv_nsec += (long)(ms % 1000) * 1000000L;
	if (ts->tv_nsec >= 1000000000L) {
		ts->tv_sec++;
		ts->tv_nsec -= 1000000000L;
	}
}

static void
notify(struct token_module *m)
{
	uint64_t one = 1;
	ssize_t n = write(m->event_fd, &one, sizeof(one));

	(void)n;        /* EAGAIN: a wake-up is pending already */
}

static uint32_t
token_flags(const CK_TOKEN_INFO *ti, int present, int logged_in)
{
	uint32_t f = 0;

	if (present)
		f |= P11A_TOKEN_PRESENT;
	if (present && logged_in)
		f |= P11A_TOKEN_LOGGED_IN;
	if (ti->flags & CKF_LOGIN_REQUIRED)
		f |= P11A_TOKEN_LOGIN_REQUIRED;
	if (ti->flags & CKF_USER_PIN_COUNT_LOW)
		f |= P11A_TOKEN_PIN_COUNT_LOW;
	if (ti->flags & CKF_USER_PIN_FINAL_TRY)
		f |= P11A_TOKEN_PIN_FINAL_TRY;
	if (ti->flags & CKF_USER_PIN_LOCKED)
		f |= P11A_TOKEN_PIN_LOCKED;
	if (ti->flags & CKF_PROTECTED_AUTHENTICATION_PATH)
		f |= P11A_TOKEN_PROTECTED_PATH;
	return f;
}

static int
same_token(const CK_TOKEN_INFO *a, const CK_TOKEN_INFO *b)
{
	return memcmp(a->label, b->label, sizeof(a->label)) == 0 &&
	    memcmp(a->manufacturerID, b->manufacturerID, sizeof(a->manufacturerID)) == 0 &&
	    memcmp(a->model, b->model, sizeof(a->model)) == 0 &&
	    memcmp(a->serialNumber, b->serialNumber, sizeof(a->serialNumber)) == 0;
}

static int
state_logged_in(CK_STATE st)
{
	return st == CKS_RO_USER_FUNCTIONS || st == CKS_RW_USER_FUNCTIONS;
}

/* ------------------------------------------------------------ session pool */

/*
 * Borrows a session of s, opening one while the pool is below its cap,
 * else waiting until deadline.  *gen tells pool_put() which token
 * generation the session belongs to.
 */
static int
pool_get(struct token_module *m, struct tok_slot *s, const struct timespec *deadline,
	 struct psess **out, unsigned *gen, CK_RV *rv_out)
{
	struct psess *ps;
	CK_RV rv;
	unsigned g;
	int r;

	*rv_out = CKR_OK;
	*out = NULL;
	pthread_mutex_lock(&s->plock);
	for (;;) {
		if (s->nidle > 0) {
			*out = s->idle[--s->nidle];
			*gen = s->gen;
			pthread_mutex_unlock(&s->plock);
			return 0;
		}
		if (s->nopen < s->cap) {
			s->nopen++;
			g = s->gen;
			pthread_mutex_unlock(&s->plock);
			if ((ps = calloc(1, sizeof(*ps))) == NULL) {
				rv = CKR_HOST_MEMORY;
			} else {
				ps->kgen = atomic_load(&s->kgen);
				rv = m->f->C_OpenSession(s->id, CKF_SERIAL_SESSION, NULL, NULL, &ps->h);
				if (rv == CKR_OK) {
					*out = ps;
					*gen = g;
					return 0;
				}
				free(ps);
			}
			pthread_mutex_lock(&s->plock);
			if (g != s->gen) {
				/* The token changed meanwhile; the count was reset. */
				pthread_cond_broadcast(&s->pcond);
				pthread_mutex_unlock(&s->plock);
				*rv_out = rv;
				return rv_err(rv);
			}
			s->nopen--;
			if (rv == CKR_SESSION_COUNT && s->nopen > 0) {
				/* Others use the token too: make do with what we have. */
				log_debug("slot %lu: session limit reached at %u", (unsigned long)s->id,
					  s->nopen);
				s->cap = s->nopen;
				continue;
			}
			pthread_cond_broadcast(&s->pcond);
			pthread_mutex_unlock(&s->plock);
			*rv_out = rv;
			return rv_err(rv);
		}
		r = pthread_cond_timedwait(&s->pcond, &s->plock, deadline);
		if (r == ETIMEDOUT) {
			pthread_mutex_unlock(&s->plock);
			return -P11A_E_TIMEOUT;
		}
	}
}

/* Non-blocking: an idle session or nothing (1 = got one). */
static int
pool_try_get(struct tok_slot *s, struct psess **ps, unsigned *gen)
{
	int got = 0;

	pthread_mutex_lock(&s->plock);
	if (s->nidle > 0) {
		*ps = s->idle[--s->nidle];
		*gen = s->gen;
		got = 1;
	}
	pthread_mutex_unlock(&s->plock);
	return got;
}

static void
psess_close(struct token_module *m, struct psess *ps)
{
	/* Closing the session destroys its session objects: the key copies. */
	(void)m->f->C_CloseSession(ps->h);
	free(ps);
}

/*
 * Returns a borrowed session; drop closes it (it failed or the token
 * changed).  A session holding key copies of an older key generation is
 * closed too: its copies may no longer be what their handles say.
 */
static void
pool_put(struct token_module *m, struct tok_slot *s, struct psess *ps, unsigned gen, int drop)
{
	if (ps->ncopy > 0 && ps->kgen != atomic_load(&s->kgen))
		drop = 1;
	pthread_mutex_lock(&s->plock);
	if (!drop && gen == s->gen && s->nopen <= s->cap && s->nidle < TOKEN_POOL_MAX) {
		s->idle[s->nidle++] = ps;
		pthread_cond_signal(&s->pcond);
		pthread_mutex_unlock(&s->plock);
		return;
	}
	if (gen == s->gen)
		s->nopen--;
	pthread_cond_broadcast(&s->pcond);
	pthread_mutex_unlock(&s->plock);
	psess_close(m, ps);
}

static int
pool_shared(struct tok_slot *s)
{
	int shared;

	pthread_mutex_lock(&s->plock);
	shared = s->shared;
	pthread_mutex_unlock(&s->plock);
	return shared;
}

/*
 * The token in s changed (removed, replaced): close idle sessions, make
 * lent-out ones close on return, and forget the kept session.
 */
static void
slot_reset_sessions(struct token_module *m, struct tok_slot *s)
{
	struct psess *old[TOKEN_POOL_MAX];
	unsigned n;

	atomic_fetch_add(&s->kgen, 1);
	pthread_mutex_lock(&s->plock);
	n = s->nidle;
	memcpy(old, s->idle, n * sizeof(old[0]));
	s->nidle = 0;
	s->nopen = 0;
	s->gen++;
	pthread_cond_broadcast(&s->pcond);
	pthread_mutex_unlock(&s->plock);
	for (unsigned i = 0; i < n; i++)
		psess_close(m, old[i]);
	if (s->kept != CK_INVALID_HANDLE) {
		(void)m->f->C_CloseSession(s->kept);
		s->kept = CK_INVALID_HANDLE;
	}
	s->mechs_read = 0;
}

/* Sizes the pool from ulMaxSessionCount (the kept session takes one) and session-pool. */
static void
slot_configure_pool(struct tok_slot *s, const CK_TOKEN_INFO *ti, unsigned pool_max)
{
	CK_ULONG max = ti->ulMaxSessionCount;
	unsigned cap;
	int shared;

	if (max == CK_EFFECTIVELY_INFINITE || max == CK_UNAVAILABLE_INFORMATION) {
		shared = 0;
		cap = pool_max;
	} else if (max <= 1) {
		shared = 1;
		cap = 1;
	} else {
		shared = 0;
		cap = max - 1 > pool_max ? pool_max : (unsigned)(max - 1);
	}
	pthread_mutex_lock(&s->plock);
	unsigned before = s->cap;
	if (s->shared != shared) {
		s->shared = shared;
		s->cap = cap;
	} else if (s->nopen == 0 || cap < s->cap) {
		/* Raise the cap only while nothing is open: CKR_SESSION_COUNT may have lowered it. */
		s->cap = cap;
	}
	cap = s->cap;
	pthread_mutex_unlock(&s->plock);
	if (cap != before)
		log_debug("slot %lu: up to %u signing session%s%s", (unsigned long)s->id, cap,
			  cap == 1 ? "" : "s", shared ? " (one-session token: shared with control)" : "");
}

/* The control thread's session: the kept one, or the pool's only one. */
static CK_RV
ctl_session_get(struct token_module *m, struct tok_slot *s, CK_SESSION_HANDLE *h, unsigned *gen)
{
	struct timespec dl;
	CK_RV rv = CKR_OK;
	int r;

	if (s->shared) {
		ts_after_ms(&dl, m->wait_ms);
		r = pool_get(m, s, &dl, &s->ctl_ps, gen, &rv);
		if (r == -P11A_E_TIMEOUT)
			return CKR_FUNCTION_CANCELED;   /* stands for "busy" here */
		if (r != 0)
			return rv != CKR_OK ? rv : CKR_GENERAL_ERROR;
		*h = s->ctl_ps->h;
		return CKR_OK;
	}
	*gen = 0;
	if (s->kept == CK_INVALID_HANDLE) {
		rv = m->f->C_OpenSession(s->id, CKF_SERIAL_SESSION, NULL, NULL, &s->kept);
		if (rv != CKR_OK) {
			s->kept = CK_INVALID_HANDLE;
			return rv;
		}
	}
	*h = s->kept;
	return CKR_OK;
}

static void
ctl_session_put(struct token_module *m, struct tok_slot *s, CK_SESSION_HANDLE h, unsigned gen, int drop)
{
	if (s->shared) {
		if (s->ctl_ps != NULL && s->ctl_ps->h == h) {
			pool_put(m, s, s->ctl_ps, gen, drop);
			s->ctl_ps = NULL;
		}
		return;
	}
	if (drop && s->kept == h) {
		(void)m->f->C_CloseSession(h);
		s->kept = CK_INVALID_HANDLE;
	}
}

/*
 * Opens (or re-opens once, when stale) the control session and reads the
 * login state from it.
 */
static CK_RV
ctl_session_state(struct token_module *m, struct tok_slot *s, CK_SESSION_HANDLE *h,
		  unsigned *gen, int *logged_in)
{
	CK_SESSION_INFO si;
	CK_RV rv;

	for (int attempt = 0; attempt < 2; attempt++) {
		if ((rv = ctl_session_get(m, s, h, gen)) != CKR_OK)
			return rv;
		rv = m->f->C_GetSessionInfo(*h, &si);
		if (rv == CKR_OK) {
			*logged_in = state_logged_in(si.state);
			return CKR_OK;
		}
		ctl_session_put(m, s, *h, *gen, 1);
		if (!rv_session_gone(rv) || rv_token_gone(rv))
			return rv;
	}
	return rv;
}

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

static CK_RV
find_objects(struct token_module *m, CK_SESSION_HANDLE h, CK_ATTRIBUTE *tmpl, CK_ULONG ntmpl,
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

/* ------------------------------------------------------------ public keys */

static const uint8_t oid_p256[] = { 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07 };
static const uint8_t oid_p384[] = { 0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22 };
static const uint8_t oid_p521[] = { 0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23 };
static const uint8_t oid_ed25519[] = { 0x06, 0x03, 0x2b, 0x65, 0x70 };
/* GnuPG's pre-RFC 8410 Ed25519 curve OID 1.3.6.1.4.1.11591.15.1 */
static const uint8_t oid_ed25519_gnu[] = { 0x06, 0x09, 0x2b, 0x06, 0x01, 0x04, 0x01, 0xda, 0x47, 0x0f, 0x01 };
/* PrintableString "edwards25519", as SoftHSM2 writes for generated keys */
static const uint8_t str_ed25519[] = { 0x13, 0x0c, 'e', 'd', 'w', 'a', 'r', 'd', 's', '2', '5', '5', '1', '9' };

struct curve {
	const uint8_t *der;
	size_t der_len;
	int type;                       /* P11A_KEY_EC or P11A_KEY_ED25519 */
	const char *name;               /* wire name */
	const char *group;              /* OpenSSL group name (EC) */
	uint32_t bits;
	size_t field_len;               /* bytes of a coordinate / of the Ed25519 key */
};

static const struct curve curves[] = {
	{ oid_p256, sizeof(oid_p256), P11A_KEY_EC, "P-256", "prime256v1", 256, 32 },
	{ oid_p384, sizeof(oid_p384), P11A_KEY_EC, "P-384", "secp384r1", 384, 48 },
	{ oid_p521, sizeof(oid_p521), P11A_KEY_EC, "P-521", "secp521r1", 521, 66 },
	{ oid_ed25519, sizeof(oid_ed25519), P11A_KEY_ED25519, "Ed25519", NULL, ED25519_BITS, 32 },
	{ oid_ed25519_gnu, sizeof(oid_ed25519_gnu), P11A_KEY_ED25519, "Ed25519", NULL, ED25519_BITS, 32 },
	{ str_ed25519, sizeof(str_ed25519), P11A_KEY_ED25519, "Ed25519", NULL, ED25519_BITS, 32 },
};

static const struct curve *
curve_by_params(const uint8_t *p, size_t n)
{
	for (size_t i = 0; i < sizeof(curves) / sizeof(curves[0]); i++) {
		if (curves[i].der_len == n && memcmp(curves[i].der, p, n) == 0)
			return &curves[i];
	}
	return NULL;
}

static const struct curve *
curve_by_group(const char *group)
{
	for (size_t i = 0; i < sizeof(curves) / sizeof(curves[0]); i++) {
		if (curves[i].group != NULL && strcmp(curves[i].group, group) == 0)
			return &curves[i];
	}
	return NULL;
}

/*
 * CKA_EC_POINT is a DER OCTET STRING per the standard, but some modules
 * store the raw point.  Returns the raw point of a key on curve c.
 */
static int
ec_point_raw(const struct curve *c, const uint8_t *p, size_t n, const uint8_t **pt, size_t *pt_len)
{
	size_t l, hl;

	if (c->type == P11A_KEY_ED25519) {
		if (n == c->field_len) {
			*pt = p;
			*pt_len = n;
			return 0;
		}
	} else if ((n == 1 + 2 * c->field_len && p[0] == 0x04) ||
		   (n == 1 + c->field_len && (p[0] == 0x02 || p[0] == 0x03))) {
		*pt = p;
		*pt_len = n;
		return 0;
	}
	if (n < 2 || p[0] != 0x04)
		return -1;
	if (p[1] < 0x80) {
		l = p[1];
		hl = 2;
	} else if (p[1] == 0x81 && n >= 3) {
		l = p[2];
		hl = 3;
	} else if (p[1] == 0x82 && n >= 4) {
		l = ((size_t)p[2] << 8) | p[3];
		hl = 4;
	} else {
		return -1;
	}
	if (hl + l != n)
		return -1;
	if (c->type == P11A_KEY_ED25519 ? l != c->field_len :
	    !((l == 1 + 2 * c->field_len && p[hl] == 0x04) ||
	      (l == 1 + c->field_len && (p[hl] == 0x02 || p[hl] == 0x03))))
		return -1;
	*pt = p + hl;
	*pt_len = l;
	return 0;
}

static int
spki_of(EVP_PKEY *pk, uint8_t **out, size_t *out_len)
{
	unsigned char *der = NULL;
	int n;

	*out = NULL;
	*out_len = 0;
	if (pk == NULL)
		return -1;
	n = i2d_PUBKEY(pk, &der);
	if (n <= 0)
		return -1;
	*out = malloc((size_t)n);
	if (*out == NULL) {
		OPENSSL_free(der);
		return -1;
	}
	memcpy(*out, der, (size_t)n);
	*out_len = (size_t)n;
	OPENSSL_free(der);
	return 0;
}

static EVP_PKEY *
pkey_fromdata(const char *alg, OSSL_PARAM *params)
{
	EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(NULL, alg, NULL);
	EVP_PKEY *pk = NULL;

	if (ctx == NULL)
		return NULL;
	if (EVP_PKEY_fromdata_init(ctx) != 1 ||
	    EVP_PKEY_fromdata(ctx, &pk, EVP_PKEY_PUBLIC_KEY, params) != 1)
		pk = NULL;
	EVP_PKEY_CTX_free(ctx);
	return pk;
}

static int
spki_rsa(const uint8_t *mod, size_t mod_len, const uint8_t *exp, size_t exp_len,
	 uint8_t **out, size_t *out_len)
{
	OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
	OSSL_PARAM *params = NULL;
	BIGNUM *n = BN_bin2bn(mod, (int)mod_len, NULL);
	BIGNUM *e = BN_bin2bn(exp, (int)exp_len, NULL);
	EVP_PKEY *pk = NULL;
	int r = -1;

	if (bld == NULL || n == NULL || e == NULL ||
	    OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, n) != 1 ||
	    OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, e) != 1 ||
	    (params = OSSL_PARAM_BLD_to_param(bld)) == NULL)
		goto out;
	pk = pkey_fromdata("RSA", params);
	r = spki_of(pk, out, out_len);
 out:
	EVP_PKEY_free(pk);
	OSSL_PARAM_free(params);
	OSSL_PARAM_BLD_free(bld);
	BN_free(n);
	BN_free(e);
	return r;
}

static int
spki_ec(const struct curve *c, const uint8_t *pt, size_t pt_len, uint8_t **out, size_t *out_len)
{
	EVP_PKEY *pk;
	int r;

	if (c->type == P11A_KEY_ED25519) {
		pk = EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, NULL, pt, pt_len);
	} else {
		OSSL_PARAM params[] = {
			OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, (char *)c->group, 0),
			OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, (void *)pt, pt_len),
			OSSL_PARAM_END
		};
		pk = pkey_fromdata("EC", params);
	}
	r = spki_of(pk, out, out_len);
	EVP_PKEY_free(pk);
	return r;
}

static uint32_t
bits_of(const uint8_t *p, size_t n)
{
	while (n > 0 && *p == 0) {
		p++;
		n--;
	}
	if (n == 0)
		return 0;
	uint32_t bits = (uint32_t)(n - 1) * 8;
	for (uint8_t top = *p; top != 0; top >>= 1)
		bits++;
	return bits;
}

/* ------------------------------------------------------------ enumeration */

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
	const struct curve *c;
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
			o->bits = bits_of(a, al);
		if (rv == CKR_OK && (rv = attr_get(m, h, o->h, CKA_PUBLIC_EXPONENT, &b, &bl)) == CKR_OK) {
			if (spki_rsa(a, al, b, bl, &o->spki, &o->spki_len) != 0)
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
	c = curve_by_params(a, al);
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
		if (ec_point_raw(c, b, bl, &pt, &pt_len) != 0 ||
		    spki_ec(c, pt, pt_len, &o->spki, &o->spki_len) != 0)
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
	const struct curve *c;
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
		    (c = curve_by_group(group)) == NULL)
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
	if (spki_of(pk, &o->spki, &o->spki_len) != 0)
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
	rv = find_objects(m, h, tmpl, cls == CKO_CERTIFICATE ? 3 : 2, &hs, &n);
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

static void
keys_free(struct tok_key *keys, size_t n)
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
	k->id = dup_bytes(is->id, is->id_len);
	k->type = (uint8_t)ks->type;
	k->bits = ks->bits;
	k->curve = strdup(ks->curve != NULL ? ks->curve : "");
	if (ss != NULL) {
		k->spki = dup_bytes(ss->spki, ss->spki_len);
		k->spki_len = ss->spki_len;
	}
	if (e->cert != NULL) {
		k->cert = dup_bytes(e->cert->cert, e->cert->cert_len);
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
static CK_RV
keys_read(struct token_module *m, CK_SESSION_HANDLE h, const CK_TOKEN_INFO *ti,
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
	keys_free(keys, nkeys);
	free(ents);
	for (c = 0; c < 3; c++) {
		for (i = 0; i < nobjs[c]; i++)
			obj_free(&objs[c][i]);
		free(objs[c]);
	}
	return rv;
}

static unsigned
mechs_read(struct token_module *m, CK_SLOT_ID slot)
{
	CK_MECHANISM_TYPE *v = NULL;
	CK_ULONG n = 0;
	unsigned mechs = 0;
	CK_RV rv;

	rv = m->f->C_GetMechanismList(slot, NULL, &n);
	if (rv != CKR_OK || n == 0 || n > 4096)
		return MECH_ALL;        /* unknown: let C_SignInit decide */
	if ((v = calloc(n, sizeof(*v))) == NULL)
		return MECH_ALL;
	rv = m->f->C_GetMechanismList(slot, v, &n);
	if (rv != CKR_OK) {
		free(v);
		return MECH_ALL;
	}
	for (CK_ULONG i = 0; i < n; i++) {
		switch (v[i]) {
		case CKM_RSA_PKCS: mechs |= MECH_RSA_PKCS; break;
		case CKM_RSA_PKCS_PSS: mechs |= MECH_RSA_PSS; break;
		case CKM_RSA_X_509: mechs |= MECH_RSA_X509; break;
		case CKM_ECDSA: mechs |= MECH_ECDSA; break;
		case CKM_EDDSA: mechs |= MECH_EDDSA; break;
		default: break;
		}
	}
	free(v);
	return mechs;
}

static struct tok_slot *
slot_find(struct token_module *m, CK_SLOT_ID id)
{
	for (size_t i = 0; i < m->nslots; i++) {
		if (m->slots[i]->id == id)
			return m->slots[i];
	}
	return NULL;
}

static struct tok_slot *
slot_add(struct token_module *m, CK_SLOT_ID id)
{
	struct tok_slot *s;
	pthread_condattr_t ca;

	if (m->nslots >= SLOT_MAX || (s = calloc(1, sizeof(*s))) == NULL)
		return NULL;
	s->id = id;
	s->kept = CK_INVALID_HANDLE;
	s->cap = 1;
	s->mechs = MECH_ALL;
	pthread_mutex_init(&s->plock, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&s->pcond, &ca);
	pthread_condattr_destroy(&ca);
	pthread_mutex_lock(&m->lock);
	m->slots[m->nslots++] = s;
	atomic_fetch_add(&m->igen, 1);
	pthread_mutex_unlock(&m->lock);
	return s;
}

/*
 * 1 when this process has (nearly) no descriptor left: a few must open.
 * Decisions about the token are not made on what a module says then.
 */
static int
fds_exhausted(void)
{
	int fds[4], n, bad = 0;

	for (n = 0; n < 4; n++) {
		if ((fds[n] = open("/dev/null", O_RDONLY | O_CLOEXEC)) < 0) {
			bad = errno == EMFILE || errno == ENFILE;
			break;
		}
	}
	while (n > 0)
		close(fds[--n]);
	return bad;
}

/* The token left the slot: keep listing it (and its keys) as not present. */
static void
slot_gone(struct token_module *m, struct tok_slot *s)
{
	if (!s->present)
		return;
	log_info("token '%s' in slot %lu is gone", s->tok.label ? s->tok.label : "",
		 (unsigned long)s->id);
	slot_reset_sessions(m, s);
	pthread_mutex_lock(&m->lock);
	atomic_fetch_add(&s->kgen, 1);
	atomic_fetch_add(&m->igen, 1);
	s->present = 0;
	s->logged_in = 0;
	s->tok.flags &= ~(P11A_TOKEN_PRESENT | P11A_TOKEN_LOGGED_IN);
	for (size_t i = 0; i < s->nkeys; i++) {
		s->keys[i].priv = CK_INVALID_HANDLE;
		s->keys[i].k.flags &= ~P11A_KEY_PRIVATE_VISIBLE;
	}
	pthread_mutex_unlock(&m->lock);
}

static int
token_record(struct token_module *m, const CK_TOKEN_INFO *ti, uint32_t flags, struct p11a_token *t)
{
	memset(t, 0, sizeof(*t));
	t->uri = p11a_uri_format_token(ti);
	t->label = pad_text(ti->label, sizeof(ti->label));
	t->manufacturer = pad_text(ti->manufacturerID, sizeof(ti->manufacturerID));
	t->model = pad_text(ti->model, sizeof(ti->model));
	t->serial = pad_text(ti->serialNumber, sizeof(ti->serialNumber));
	t->module = strdup(m->name);
	t->flags = flags;
	if (t->uri == NULL || t->label == NULL || t->manufacturer == NULL || t->model == NULL ||
	    t->serial == NULL || t->module == NULL) {
		p11a_token_clear(t);
		return -P11A_E_NOMEM;
	}
	return 0;
}

/*
 * Reads the token in s and swaps the new state in.  Returns the CK_RV
 * that stopped it (the old keys then stay).
 */
static CK_RV
slot_scan(struct token_module *m, struct tok_slot *s)
{
	CK_TOKEN_INFO ti;
	CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
	struct p11a_token tok;
	struct tok_key *keys = NULL, *old_keys;
	size_t nkeys = 0, old_n;
	unsigned gen = 0, mechs;
	int logged_in = 0, visible;
	CK_RV rv;

	rv = m->f->C_GetTokenInfo(s->id, &ti);
	if (rv_token_gone(rv) || (rv == CKR_OK && !(ti.flags & CKF_TOKEN_INITIALIZED))) {
		slot_gone(m, s);
		return CKR_OK;
	}
	/* Any other failure says nothing about the card: keep what we know. */
	if (rv != CKR_OK)
		return rv;
	if (!s->present || !s->known || !same_token(&s->ti, &ti))
		slot_reset_sessions(m, s);
	slot_configure_pool(s, &ti, m->pool_max);
	if ((rv = ctl_session_state(m, s, &h, &gen, &logged_in)) != CKR_OK)
		goto fail;
	if (!s->mechs_read) {
		mechs = mechs_read(m, s->id);
		s->mechs_read = 1;
		pthread_mutex_lock(&m->lock);
		s->mechs = mechs;
		atomic_fetch_add(&m->igen, 1);
		pthread_mutex_unlock(&m->lock);
	}
	if (token_record(m, &ti, token_flags(&ti, 1, logged_in), &tok) != 0) {
		ctl_session_put(m, s, h, gen, 0);
		return CKR_HOST_MEMORY;
	}
	visible = logged_in || !(ti.flags & CKF_LOGIN_REQUIRED);
	rv = keys_read(m, h, &ti, tok.uri, visible, &keys, &nkeys);
	ctl_session_put(m, s, h, gen, rv_session_gone(rv));
	if (rv != CKR_OK) {
		p11a_token_clear(&tok);
		goto fail;
	}
	if (!s->present)
		log_info("token '%s' in slot %lu: %zu key(s)%s", tok.label, (unsigned long)s->id,
			 nkeys, logged_in ? ", logged in" : "");
	pthread_mutex_lock(&m->lock);
	/* Handles may mean other keys now: session copies and key memos start over. */
	atomic_fetch_add(&s->kgen, 1);
	atomic_fetch_add(&m->igen, 1);
	p11a_token_clear(&s->tok);
	s->tok = tok;
	s->ti = ti;
	s->known = 1;
	s->present = 1;
	s->logged_in = logged_in;
	old_keys = s->keys;
	old_n = s->nkeys;
	s->keys = keys;
	s->nkeys = nkeys;
	pthread_mutex_unlock(&m->lock);
	keys_free(old_keys, old_n);
	return CKR_OK;
 fail:
	if (rv_token_gone(rv)) {
		slot_gone(m, s);
		return CKR_OK;
	}
	return rv;
}

/* ------------------------------------------------------------ module */

/* P11AGENT_KEY_COPIES=0 in the agent's environment: sign with token objects only. */
static int
key_copies_wanted(void)
{
	const char *v = getenv("P11AGENT_KEY_COPIES");

	return v == NULL || strcmp(v, "0") != 0;
}

/* Says why loading failed, in msg and in the log, and gives up. */
#define LOAD_FAIL(...) do { \
		snprintf(msg, msg_size, __VA_ARGS__); \
		log_err("%s", msg); \
		goto fail; \
	} while (0)

int
token_module_load(const struct module_conf *mod, int wait_ms, struct token_module **out,
		  char *msg, size_t msg_size)
{
	struct token_module *m;
	CK_C_GetFunctionList get_list;
	CK_C_INITIALIZE_ARGS args;
	char nb[48];
	CK_RV rv;

	*out = NULL;
	if ((m = calloc(1, sizeof(*m))) == NULL) {
		snprintf(msg, msg_size, "out of memory");
		log_err("out of memory");
		return -P11A_E_TOKEN;
	}
	m->event_fd = -1;
	m->wait_ms = wait_ms > 0 ? wait_ms : 30000;
	atomic_init(&m->key_copies, key_copies_wanted());
	/* The real path modules_resolve() checked, not one a link could redirect. */
	m->path = strdup(mod->load_path != NULL ? mod->load_path : mod->path);
	m->pool_max = mod->session_pool > 0 && mod->session_pool < TOKEN_POOL_MAX ?
	    (unsigned)mod->session_pool : TOKEN_POOL_MAX;
	m->name = strdup(mod->name != NULL ? mod->name : mod->path);
	pthread_mutex_init(&m->lock, NULL);
	pthread_rwlock_init(&m->copy_lock, NULL);
	atomic_init(&m->inflight, 0);
	if (m->path == NULL || m->name == NULL)
		LOAD_FAIL("out of memory");
	m->event_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (m->event_fd < 0)
		LOAD_FAIL("eventfd: %s", strerror(errno));
	m->dl = dlopen(m->path, RTLD_NOW | RTLD_LOCAL);
	if (m->dl == NULL)
		LOAD_FAIL("cannot load module %s: %s", m->path, dlerror());
	*(void **)&get_list = dlsym(m->dl, "C_GetFunctionList");
	if (get_list == NULL)
		LOAD_FAIL("module %s has no C_GetFunctionList: not a PKCS#11 module", m->path);
	rv = get_list(&m->f);
	if (rv != CKR_OK || m->f == NULL)
		LOAD_FAIL("module %s: C_GetFunctionList: %s", m->path, ckr_name(rv, nb, sizeof(nb)));
	if (m->f->version.major < 2)
		LOAD_FAIL("module %s: PKCS#11 version %u.%u is too old", m->path,
			  m->f->version.major, m->f->version.minor);
	memset(&args, 0, sizeof(args));
	args.flags = CKF_OS_LOCKING_OK;
	args.pReserved = mod->init_args;
	rv = m->f->C_Initialize(&args);
	if (rv == CKR_CRYPTOKI_ALREADY_INITIALIZED) {
		log_warn("module %s was initialized already", m->path);
	} else if (rv != CKR_OK) {
		LOAD_FAIL("module %s: C_Initialize: %s", m->path, ckr_name(rv, nb, sizeof(nb)));
	}
	log_debug("module %s loaded (PKCS#11 %u.%u)", m->path, m->f->version.major,
		  m->f->version.minor);
	*out = m;
	return 0;
 fail:
	/* The helper exits after this; no dlclose of a half-initialized module. */
	if (m->event_fd >= 0)
		close(m->event_fd);
	free(m->path);
	free(m->name);
	free(m);
	return -P11A_E_TOKEN;
}
#undef LOAD_FAIL

void
token_module_close(struct token_module *m)
{
	struct timespec ts = { 0, 10 * 1000 * 1000 };
	int waited = 0;

	if (m == NULL)
		return;
	pthread_mutex_lock(&m->lock);
	m->closing = 1;
	pthread_mutex_unlock(&m->lock);
	while (atomic_load(&m->inflight) > 0 && waited < CLOSE_WAIT_MS) {
		nanosleep(&ts, NULL);
		waited += 10;
	}
	if (atomic_load(&m->inflight) > 0) {
		log_warn("a signature is still in progress; not finalizing the module");
		return;
	}
	/* Closing the sessions logs the tokens out (PKCS#11 login is per application). */
	(void)m->f->C_Finalize(NULL);
	log_debug("module %s finalized", m->path);
}

int
token_event_fd(const struct token_module *m)
{
	return m->event_fd;
}

void
token_event_clear(struct token_module *m)
{
	uint64_t v;
	ssize_t n = read(m->event_fd, &v, sizeof(v));

	(void)n;
}

static CK_RV
slot_list(struct token_module *m, CK_SLOT_ID **out, CK_ULONG *count)
{
	CK_SLOT_ID *v = NULL, *nv;
	CK_ULONG n = 0;
	CK_RV rv;

	*out = NULL;
	*count = 0;
	for (int attempt = 0; attempt < 4; attempt++) {
		rv = m->f->C_GetSlotList(CK_TRUE, NULL, &n);
		if (rv != CKR_OK)
			break;
		if (n == 0) {
			free(v);
			return CKR_OK;
		}
		if (n > SLOT_MAX)
			n = SLOT_MAX;
		if ((nv = realloc(v, n * sizeof(*v))) == NULL) {
			rv = CKR_HOST_MEMORY;
			break;
		}
		v = nv;
		rv = m->f->C_GetSlotList(CK_TRUE, v, &n);
		if (rv == CKR_OK) {
			*out = v;
			*count = n;
			return CKR_OK;
		}
		if (rv != CKR_BUFFER_TOO_SMALL)
			break;
	}
	free(v);
	return rv;
}

int
token_refresh(struct token_module *m)
{
	CK_SLOT_ID *ids = NULL;
	CK_ULONG n = 0, i;
	struct tok_slot *s;
	char nb[48];
	CK_RV rv;
	size_t j;

	/*
	 * Out of descriptors, a module fails in its own words (SoftHSM2:
	 * CKR_GENERAL_ERROR, or no token in a directory it cannot open) and
	 * may not recover: look again once descriptors are back.
	 */
	if (fds_exhausted()) {
		log_warn("out of file descriptors: token state not read now");
		return -P11A_E_BUSY;
	}
	rv = slot_list(m, &ids, &n);
	if (rv != CKR_OK) {
		log_err("C_GetSlotList: %s", ckr_name(rv, nb, sizeof(nb)));
		return -P11A_E_TOKEN;
	}
	for (i = 0; i < n; i++) {
		if ((s = slot_find(m, ids[i])) == NULL && (s = slot_add(m, ids[i])) == NULL) {
			log_warn("slot %lu: too many slots or out of memory", (unsigned long)ids[i]);
			continue;
		}
		rv = slot_scan(m, s);
		if (rv_session_gone(rv))
			rv = slot_scan(m, s);   /* the kept session went stale; once more */
		if (rv != CKR_OK)
			log_warn("slot %lu: cannot read the token: %s", (unsigned long)s->id,
				 ckr_name(rv, nb, sizeof(nb)));
	}
	/* Slots no longer listed as holding a token. */
	for (j = 0; j < m->nslots; j++) {
		int listed = 0;
		for (i = 0; i < n && !listed; i++)
			listed = ids[i] == m->slots[j]->id;
		if (!listed)
			slot_gone(m, m->slots[j]);
	}
	free(ids);
	return 0;
}

int
token_check(struct token_module *m)
{
	CK_SLOT_ID *ids = NULL;
	CK_ULONG n = 0, i;
	CK_TOKEN_INFO ti;
	CK_SESSION_INFO si;
	struct tok_slot *s;
	unsigned gen;
	size_t j, npresent = 0;
	int changed = 0, logged_in;
	CK_RV rv;

	if (fds_exhausted() || slot_list(m, &ids, &n) != CKR_OK)
		return 0;
	for (i = 0; i < n && !changed; i++) {
		if ((s = slot_find(m, ids[i])) == NULL) {
			changed = 1;
			break;
		}
		rv = m->f->C_GetTokenInfo(s->id, &ti);
		if (rv != CKR_OK || !(ti.flags & CKF_TOKEN_INITIALIZED)) {
			changed = s->present;
			continue;
		}
		npresent++;
		if (!s->present || !same_token(&s->ti, &ti) ||
		    (token_flags(&ti, 1, 0) & ~P11A_TOKEN_LOGGED_IN) !=
		    (s->tok.flags & ~P11A_TOKEN_LOGGED_IN)) {
			changed = 1;
			break;
		}
		/* Login state, from a session nobody else uses right now. */
		if (s->shared) {
			struct psess *ps;

			if (!pool_try_get(s, &ps, &gen))
				continue;
			rv = m->f->C_GetSessionInfo(ps->h, &si);
			pool_put(m, s, ps, gen, rv != CKR_OK && rv_session_gone(rv));
		} else if (s->kept != CK_INVALID_HANDLE) {
			rv = m->f->C_GetSessionInfo(s->kept, &si);
		} else {
			changed = 1;
			break;
		}
		logged_in = rv == CKR_OK && state_logged_in(si.state);
		if (rv != CKR_OK || logged_in != s->logged_in)
			changed = 1;
	}
	if (!changed) {
		/* A present token whose slot is not listed any more. */
		size_t was = 0;
		for (j = 0; j < m->nslots; j++)
			was += m->slots[j]->present ? 1 : 0;
		changed = was != npresent;
	}
	free(ids);
	return changed;
}

int
token_inventory(struct token_module *m, struct p11a_list_reply *out)
{
	size_t nt = 0, nk = 0, i, j;
	int r = 0;

	memset(out, 0, sizeof(*out));
	pthread_mutex_lock(&m->lock);
	for (i = 0; i < m->nslots; i++) {
		if (m->slots[i]->known) {
			nt++;
			nk += m->slots[i]->nkeys;
		}
	}
	if (nt > P11A_LIST_MAX)
		nt = P11A_LIST_MAX;
	if (nk > P11A_LIST_MAX)
		nk = P11A_LIST_MAX;
	if ((nt > 0 && (out->tokens = calloc(nt, sizeof(*out->tokens))) == NULL) ||
	    (nk > 0 && (out->keys = calloc(nk, sizeof(*out->keys))) == NULL)) {
		r = -P11A_E_NOMEM;
		goto out;
	}
	for (i = 0; i < m->nslots; i++) {
		struct tok_slot *s = m->slots[i];
		if (!s->known || out->ntokens >= nt)
			continue;
		if ((r = p11a_token_copy(&out->tokens[out->ntokens], &s->tok)) != 0)
			goto out;
		out->ntokens++;
		for (j = 0; j < s->nkeys && out->nkeys < nk; j++) {
			if ((r = p11a_key_copy(&out->keys[out->nkeys], &s->keys[j].k)) != 0)
				goto out;
			out->nkeys++;
		}
	}
 out:
	pthread_mutex_unlock(&m->lock);
	if (r != 0) {
		for (i = 0; i < out->ntokens; i++)
			p11a_token_clear(&out->tokens[i]);
		for (i = 0; i < out->nkeys; i++)
			p11a_key_clear(&out->keys[i]);
		free(out->tokens);
		free(out->keys);
		memset(out, 0, sizeof(*out));
	}
	return r;
}

/* ------------------------------------------------------------ login */

/*
 * Tokens that uri names.  For "" and want_login: the one token that needs
 * a login and lacks it (*n = 0 and 0 returned when all are logged in).
 * For "" otherwise: every present token.
 */
static int
tokens_pick(struct token_module *m, const char *uri, int want_login, struct tok_slot **sel,
	    size_t *n, char *msg, size_t msg_size)
{
	struct p11a_uri_matcher *um;
	struct tok_slot *absent = NULL;
	size_t i, need = 0, login_tokens = 0;
	int err = 0;

	*n = 0;
	if (uri == NULL || uri[0] == '\0') {
		for (i = 0; i < m->nslots; i++) {
			struct tok_slot *s = m->slots[i];
			if (!s->present) {
				if (s->known && (s->ti.flags & CKF_LOGIN_REQUIRED))
					absent = s;
				continue;
			}
			if (!want_login) {
				sel[(*n)++] = s;
				continue;
			}
			if (!(s->ti.flags & CKF_LOGIN_REQUIRED))
				continue;
			login_tokens++;
			if (!s->logged_in) {
				need++;
				sel[0] = s;
			}
		}
		if (!want_login)
			return 0;
		if (need > 1) {
			set_msg(msg, msg_size, "%zu tokens of module %s need a login; "
				"name one with a pkcs11: URI", need, m->name);
			return -P11A_E_AMBIGUOUS;
		}
		if (need == 0 && login_tokens == 0 && absent != NULL) {
			set_msg(msg, msg_size, "token '%s' is not present", absent->tok.label);
			return -P11A_E_TOKEN_NOT_PRESENT;
		}
		if (need == 0 && login_tokens == 0) {
			set_msg(msg, msg_size, "no token of module %s needs a login", m->name);
			return -P11A_E_NO_SUCH_TOKEN;
		}
		*n = need;
		return 0;
	}
	if ((um = p11a_uri_matcher_new(uri, &err)) == NULL) {
		set_msg(msg, msg_size, "'%.200s' is not a valid pkcs11: URI", uri);
		return err != 0 ? err : -P11A_E_URI;
	}
	for (i = 0; i < m->nslots; i++) {
		struct tok_slot *s = m->slots[i];
		if (s->known && p11a_uri_match_token(um, &s->tok) == 1)
			sel[(*n)++] = s;
	}
	p11a_uri_matcher_free(um);
	if (*n == 0) {
		set_msg(msg, msg_size, "no token of module %s matches %.200s", m->name, uri);
		return -P11A_E_NO_SUCH_TOKEN;
	}
	if (want_login && *n > 1) {
		set_msg(msg, msg_size, "%zu tokens match %.200s", *n, uri);
		return -P11A_E_AMBIGUOUS;
	}
	return 0;
}

int
token_unlock(struct token_module *m, const char *token_uri, const char *pin, size_t pin_len,
	     int *tried, char *msg, size_t msg_size)
{
	struct tok_slot *sel[SLOT_MAX], *s;
	CK_SESSION_HANDLE h;
	CK_TOKEN_INFO ti;
	const char *label;
	unsigned gen;
	size_t n;
	int r, logged_in = 0, drop = 0;
	CK_RV rv;

	*tried = 0;
	if ((r = tokens_pick(m, token_uri, 1, sel, &n, msg, msg_size)) != 0)
		return r;
	if (n == 0)
		return 0;       /* every token that needs a login has one */
	s = sel[0];
	label = s->tok.label;
	if (!s->present) {
		set_msg(msg, msg_size, "token '%s' is not present", label);
		return -P11A_E_TOKEN_NOT_PRESENT;
	}
	rv = ctl_session_state(m, s, &h, &gen, &logged_in);
	if (rv == CKR_FUNCTION_CANCELED) {
		set_msg(msg, msg_size, "token '%s' is busy; try again", label);
		return -P11A_E_TIMEOUT;
	}
	if (rv != CKR_OK)
		return fail_rv(msg, msg_size, label, "cannot open a session", rv);
	if (logged_in) {
		ctl_session_put(m, s, h, gen, 0);
		return 0;
	}
	*tried = 1;
	if ((s->ti.flags & CKF_PROTECTED_AUTHENTICATION_PATH) && pin_len == 0) {
		log_info("token '%s': PIN entry on the reader's keypad", label);
		rv = m->f->C_Login(h, CKU_USER, NULL, 0);
	} else {
		/* The module reads the PIN in place; no copy to wipe. */
		rv = m->f->C_Login(h, CKU_USER, (CK_UTF8CHAR_PTR)(uintptr_t)pin, (CK_ULONG)pin_len);
	}
	switch (rv) {
	case CKR_OK:
	case CKR_USER_ALREADY_LOGGED_IN:
		atomic_fetch_add(&s->kgen, 1);
		log_info("token '%s' logged in", label);
		r = 0;
		break;
	case CKR_PIN_INCORRECT: {
		const char *note = "";
		if (m->f->C_GetTokenInfo(s->id, &ti) == CKR_OK) {
			if (ti.flags & CKF_USER_PIN_LOCKED)
				note = " (the PIN is now locked)";
			else if (ti.flags & CKF_USER_PIN_FINAL_TRY)
				note = " (final try before the PIN locks)";
			else if (ti.flags & CKF_USER_PIN_COUNT_LOW)
				note = " (PIN count low)";
		}
		set_msg(msg, msg_size, "PIN incorrect for token '%s'%s", label, note);
		log_warn("token '%s': PIN incorrect%s", label, note);
		r = rv_err(rv);
		break;
	}
	case CKR_PIN_LOCKED:
		set_msg(msg, msg_size, "the user PIN of token '%s' is locked", label);
		r = rv_err(rv);
		break;
	case CKR_PIN_LEN_RANGE:
	case CKR_PIN_INVALID:
		if (s->ti.ulMaxPinLen != CK_UNAVAILABLE_INFORMATION && s->ti.ulMaxPinLen != 0)
			set_msg(msg, msg_size, "PIN for token '%s' has an invalid length or "
				"characters (%lu to %lu characters)", label,
				(unsigned long)s->ti.ulMinPinLen, (unsigned long)s->ti.ulMaxPinLen);
		else
			set_msg(msg, msg_size, "PIN for token '%s' has an invalid length or characters",
				label);
		r = rv_err(rv);
		break;
	default:
		drop = rv_session_gone(rv);
		r = fail_rv(msg, msg_size, label, "C_Login", rv);
		if (rv_token_gone(rv))
			set_msg(msg, msg_size, "token '%s' is not present", label);
		break;
	}
	ctl_session_put(m, s, h, gen, drop);
	return r;
}

int
token_lock(struct token_module *m, const char *token_uri, char *msg, size_t msg_size)
{
	struct tok_slot *sel[SLOT_MAX], *s;
	CK_SESSION_HANDLE h;
	unsigned gen;
	size_t n, i;
	int r, first = 0, logged_in;
	CK_RV rv;

	if ((r = tokens_pick(m, token_uri, 0, sel, &n, msg, msg_size)) != 0)
		return r;
	for (i = 0; i < n; i++) {
		s = sel[i];
		if (!s->present)
			continue;
		rv = ctl_session_state(m, s, &h, &gen, &logged_in);
		if (rv != CKR_OK) {
			/* No session left: nothing is logged in either. */
			if (rv == CKR_FUNCTION_CANCELED && first == 0) {
				set_msg(msg, msg_size, "token '%s' is busy; try again", s->tok.label);
				first = -P11A_E_TIMEOUT;
			}
			continue;
		}
		if (logged_in) {
			/* Logging out destroys private session objects: the key copies. */
			atomic_fetch_add(&s->kgen, 1);
			rv = m->f->C_Logout(h);
		} else {
			rv = CKR_OK;
		}
		ctl_session_put(m, s, h, gen, rv_session_gone(rv));
		if (rv == CKR_OK || rv == CKR_USER_NOT_LOGGED_IN || rv_session_gone(rv)) {
			if (logged_in)
				log_info("token '%s' logged out", s->tok.label);
			continue;
		}
		if (first == 0)
			first = fail_rv(msg, msg_size, s->tok.label, "C_Logout", rv);
	}
	return first;
}

/* ------------------------------------------------------------ signing */

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
};

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
static const struct tok_key *
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
	const struct tok_key *found = NULL;
	struct tok_slot *fs = NULL;
	size_t matches = 0, fsi = 0, fki = 0;
	int err = 0, r = 0;

	memset(sk, 0, sizeof(*sk));
	pthread_mutex_lock(&m->lock);
	if (m->closing) {
		set_msg(msg, msg_size, "token helper for module %s is shutting down", m->name);
		r = -P11A_E_HELPER;
		goto out;
	}
	if (memo != NULL && (found = keymemo_hit(m, *memo, uri, &fs)) != NULL)
		goto fill;
	pthread_mutex_unlock(&m->lock);

	/* Parsed outside the lock; the inventory may change meanwhile, the match sees one state. */
	if ((um = p11a_uri_matcher_new(uri, &err)) == NULL) {
		set_msg(msg, msg_size, "'%.200s' is not a valid pkcs11: URI", uri);
		return err != 0 ? err : -P11A_E_URI;
	}
	pthread_mutex_lock(&m->lock);
	if (m->closing) {
		set_msg(msg, msg_size, "token helper for module %s is shutting down", m->name);
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
		set_msg(msg, msg_size, "no key matches %.300s", uri);
		r = -P11A_E_NO_SUCH_KEY;
		goto out;
	}
	if (matches > 1) {
		set_msg(msg, msg_size, "%zu keys match %.300s", matches, uri);
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
	snprintf(sk->label, sizeof(sk->label), "%s", found->k.label);
	snprintf(sk->token_label, sizeof(sk->token_label), "%s", fs->tok.label);
	if (found->k.id_len > 0) {
		if ((sk->id = dup_bytes(found->k.id, found->k.id_len)) == NULL) {
			r = -P11A_E_NOMEM;
			goto out;
		}
		sk->id_len = found->k.id_len;
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
			  ckr_name(rv, nb, sizeof(nb)));
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
	if (find_objects(m, h, tmpl, 3, &v, &n) == CKR_OK && n == 1)
		found = v[0];
	free(v);
	return found;
}

static CK_MECHANISM_TYPE
hash_mech(int hash)
{
	switch (hash) {
	case P11A_HASH_SHA1: return CKM_SHA_1;
	case P11A_HASH_SHA224: return CKM_SHA224;
	case P11A_HASH_SHA256: return CKM_SHA256;
	case P11A_HASH_SHA384: return CKM_SHA384;
	case P11A_HASH_SHA512: return CKM_SHA512;
	default: return CK_UNAVAILABLE_INFORMATION;
	}
}

static CK_RSA_PKCS_MGF_TYPE
hash_mgf(int hash)
{
	switch (hash) {
	case P11A_HASH_SHA1: return CKG_MGF1_SHA1;
	case P11A_HASH_SHA224: return CKG_MGF1_SHA224;
	case P11A_HASH_SHA256: return CKG_MGF1_SHA256;
	case P11A_HASH_SHA384: return CKG_MGF1_SHA384;
	case P11A_HASH_SHA512: return CKG_MGF1_SHA512;
	default: return 0;
	}
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
		set_msg(msg, msg_size, "unknown scheme, hash or input kind");
		return -P11A_E_BAD_REQUEST;
	}
	if (!scheme_fits(req->scheme, sk->type)) {
		set_msg(msg, msg_size, "key '%s' is %s; %s needs %s", sk->label,
			p11a_keytype_name(sk->type) ? p11a_keytype_name(sk->type) : "of unknown type",
			scheme, scheme_needs(req->scheme));
		return -P11A_E_UNSUPPORTED;
	}
	if (req->scheme == P11A_SCHEME_EDDSA) {
		if (req->input != P11A_INPUT_MESSAGE || req->hash != P11A_HASH_NONE) {
			set_msg(msg, msg_size, "eddsa signs the message itself (input message, hash none)");
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
			set_msg(msg, msg_size, "raw input is for rsa-pkcs1 with hash none only");
			return -P11A_E_BAD_REQUEST;
		}
		if (sk->bits != 0 && req->data_len + 11 > (sk->bits + 7) / 8) {
			set_msg(msg, msg_size, "%zu bytes are too many for rsa-pkcs1 with a %u-bit key",
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
		set_msg(msg, msg_size, "%s needs a hash (none is only for raw input)", scheme);
		return -P11A_E_BAD_REQUEST;
	}
	if (req->input == P11A_INPUT_DIGEST) {
		if (req->data_len != p11a_hash_len(req->hash)) {
			set_msg(msg, msg_size, "a %s digest is %zu bytes, not %zu",
				p11a_hash_name(req->hash), p11a_hash_len(req->hash), req->data_len);
			return -P11A_E_BAD_REQUEST;
		}
		dg = req->data;
		dg_len = req->data_len;
	} else {
		if ((r = p11a_hash_data(req->hash, req->data, req->data_len, p->digest, &dg_len)) != 0) {
			set_msg(msg, msg_size, "cannot hash the message with %s", p11a_hash_name(req->hash));
			return r;
		}
		dg = p->digest;
	}
	switch (req->scheme) {
	case P11A_SCHEME_RSA_PKCS1:
		if (!(sk->mechs & MECH_RSA_PKCS))
			goto no_mech;
		if ((r = p11a_digestinfo(req->hash, dg, dg_len, p->buf, sizeof(p->buf), &n)) != 0) {
			set_msg(msg, msg_size, "cannot encode the DigestInfo");
			return r;
		}
		p->mech.mechanism = CKM_RSA_PKCS;
		p->in = p->buf;
		p->in_len = n;
		return 0;
	case P11A_SCHEME_RSA_PSS:
		mgf1 = req->mgf1_hash != P11A_HASH_NONE ? req->mgf1_hash : req->hash;
		if (p11a_hash_len(mgf1) == 0) {
			set_msg(msg, msg_size, "unknown MGF1 hash");
			return -P11A_E_BAD_REQUEST;
		}
		if (sk->bits == 0) {
			set_msg(msg, msg_size, "the modulus size of key '%s' is unknown", sk->label);
			return -P11A_E_UNSUPPORTED;
		}
		salt = p11a_pss_salt_len(req->hash, req->salt_len, sk->bits);
		if (salt < 0) {
			set_msg(msg, msg_size, "a PSS salt of %u bytes does not fit a %u-bit key with %s",
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
			set_msg(msg, msg_size, "cannot encode EMSA-PSS for a %u-bit key", sk->bits);
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
	set_msg(msg, msg_size, "token '%s' cannot sign with %s", sk->token_label, scheme);
	return -P11A_E_UNSUPPORTED;
}

/*
 * C_SignInit + C_Sign into out (size *out_len in, length out).  A
 * signature bigger than out is finished into a scratch buffer and
 * reported as CKR_BUFFER_TOO_SMALL, so the session stays clean.
 */
static CK_RV
sign_once(struct token_module *m, CK_SESSION_HANDLE h, CK_MECHANISM *mech, CK_OBJECT_HANDLE key,
	  const uint8_t *in, size_t in_len, uint8_t *out, size_t *out_len, const char **what)
{
	CK_ULONG n = *out_len;
	CK_RV rv;

	*what = "C_SignInit";
	rv = m->f->C_SignInit(h, mech, key);
	if (rv != CKR_OK)
		return rv;
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

int
token_sign(struct token_module *m, struct token_keymemo **memo, const struct p11a_sign *req,
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
	int r, drop = 0, have_session = 0, is_copy = 0;

	*sig_len = 0;
	if (msg != NULL && msg_size > 0)
		msg[0] = '\0';
	if ((r = key_lookup(m, memo, req->key_uri, &sk, msg, msg_size)) != 0)
		return r;
	/* From here on this thread counts in m->inflight. */
	if (!sk.present) {
		set_msg(msg, msg_size, "token '%s' is not present", sk.token_label);
		r = -P11A_E_TOKEN_NOT_PRESENT;
		goto out;
	}
	if (sk.priv == CK_INVALID_HANDLE) {
		set_msg(msg, msg_size, "token '%s' is locked: run 'p11agent unlock'", sk.token_label);
		r = -P11A_E_LOCKED;
		goto out;
	}
	if ((plan = malloc(sizeof(*plan))) == NULL) {
		r = -P11A_E_NOMEM;
		goto out;
	}
	if ((r = sign_plan(req, &sk, 0, plan, msg, msg_size)) != 0)
		goto out;

	r = pool_get(m, sk.s, deadline, &ps, &gen, &prv);
	if (r == -P11A_E_TIMEOUT) {
		set_msg(msg, msg_size, "token '%s' stayed busy until the deadline", sk.token_label);
	} else if (r != 0) {
		r = fail_rv(msg, msg_size, sk.token_label, "cannot open a session", prv);
		if (rv_token_gone(prv))
			notify(m);
	} else {
		have_session = 1;
		h = ps->h;
		key = psess_key(m, ps, &sk, &is_copy);
		rv = sign_once(m, h, &plan->mech, key, plan->in, plan->in_len, raw, &raw_len, &what);
		if (is_copy && rv_copy_suspect(rv)) {
			/* The copy misbehaves: sign with the token key; the session and its copies go. */
			char nb[48];
			log_debug("token '%s': session copy of key '%s' failed (%s); using the token key",
				  sk.token_label, sk.label, ckr_name(rv, nb, sizeof(nb)));
			drop = 1;
			key = sk.priv;
			raw_len = sizeof(raw);
			rv = sign_once(m, h, &plan->mech, key, plan->in, plan->in_len, raw, &raw_len, &what);
		}
		if (rv == CKR_KEY_HANDLE_INVALID || rv == CKR_OBJECT_HANDLE_INVALID) {
			/* The token renumbered its objects: look the key up once more. */
			notify(m);
			key = key_refind(m, h, &sk);
			/* Logged out, and maybe in again, meanwhile: look once more. */
			if (key == CK_INVALID_HANDLE && atomic_load(&sk.s->kgen) != sk.kgen)
				key = key_refind(m, h, &sk);
			log_debug("token '%s': handle of key '%s' went stale; %s", sk.token_label,
				  sk.label, key != CK_INVALID_HANDLE ? "found it again" : "key is gone");
			if (key != CK_INVALID_HANDLE) {
				raw_len = sizeof(raw);
				rv = sign_once(m, h, &plan->mech, key, plan->in, plan->in_len, raw,
					       &raw_len, &what);
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
				  sk.token_label, ckr_name(rv, nb, sizeof(nb)));
			if (sign_plan(req, &sk, 1, plan, msg, msg_size) == 0) {
				raw_len = sizeof(raw);
				rv = sign_once(m, h, &plan->mech, key, plan->in, plan->in_len, raw,
					       &raw_len, &what);
			}
		}
	}
	if (have_session && rv != CKR_OK && rv != CKR_BUFFER_TOO_SMALL &&
	    rv != CKR_USER_NOT_LOGGED_IN && !rv_token_gone(rv) && !rv_session_gone(rv) &&
	    sk.logged_in) {
		/*
		 * A LOCK (C_Logout) between our look-up and C_Sign: the copy is
		 * gone, private objects hide, and modules say so in their own
		 * words (CKR_KEY_HANDLE_INVALID, CKR_GENERAL_ERROR, ...).  The
		 * session's state tells the truth: the client hears LOCKED.
		 */
		CK_SESSION_INFO si;
		char nb[48];

		if (m->f->C_GetSessionInfo(h, &si) == CKR_OK && !state_logged_in(si.state)) {
			log_debug("token '%s': %s failed with %s after a logout: locked", sk.token_label,
				  what, ckr_name(rv, nb, sizeof(nb)));
			rv = CKR_USER_NOT_LOGGED_IN;
		}
	}
	if (have_session) {
		drop = drop || rv_session_gone(rv) || rv == CKR_OPERATION_ACTIVE;
		/*
		 * A failed C_Sign ends the operation (PKCS#11 5.13), but a module
		 * that does not would fail every later C_SignInit on this session:
		 * failures are rare, a new session is cheap.
		 */
		if (rv != CKR_OK && rv != CKR_BUFFER_TOO_SMALL && strcmp(what, "C_Sign") == 0)
			drop = 1;
		/* A key that wants its PIN per signature may leave the operation open. */
		if (rv == CKR_USER_NOT_LOGGED_IN && (sk.flags & P11A_KEY_ALWAYS_AUTH) && !pool_shared(sk.s))
			drop = 1;
		pool_put(m, sk.s, ps, gen, drop);
	}
	if (r != 0)
		goto out;

	switch (rv) {
	case CKR_OK:
		break;
	case CKR_USER_NOT_LOGGED_IN:
		if ((sk.flags & P11A_KEY_ALWAYS_AUTH) && sk.logged_in) {
			set_msg(msg, msg_size, "key '%s' on token '%s' wants the PIN for every signature "
				"(CKA_ALWAYS_AUTHENTICATE), which the agent does not support yet",
				sk.label, sk.token_label);
			r = -P11A_E_UNSUPPORTED;
		} else {
			notify(m);
			set_msg(msg, msg_size, "token '%s' is locked: run 'p11agent unlock'", sk.token_label);
			r = rv_err(rv);
		}
		goto out;
	case CKR_DEVICE_REMOVED:
	case CKR_TOKEN_NOT_PRESENT:
		notify(m);
		set_msg(msg, msg_size, "token '%s' is not present", sk.token_label);
		r = rv_err(rv);
		goto out;
	case CKR_SESSION_HANDLE_INVALID:
	case CKR_SESSION_CLOSED:
		notify(m);
		r = fail_rv(msg, msg_size, sk.token_label, "session lost; try again", rv);
		goto out;
	case CKR_BUFFER_TOO_SMALL:
		set_msg(msg, msg_size, "token '%s': signature larger than %d bytes", sk.token_label,
			P11A_SIG_MAX);
		r = -P11A_E_TOO_LARGE;
		goto out;
	case CKR_KEY_HANDLE_INVALID:
	case CKR_OBJECT_HANDLE_INVALID:
		if (atomic_load(&sk.s->kgen) != sk.kgen && sk.logged_in) {
			/* A LOCK (and maybe an UNLOCK) came between look-up and C_Sign. */
			set_msg(msg, msg_size, "token '%s' was locked while signing: run 'p11agent "
				"unlock' if it still is, and try again", sk.token_label);
			r = -P11A_E_LOCKED;
			goto out;
		}
		/* Still stale after looking again: the key left the token. */
		set_msg(msg, msg_size, "key '%s' is no longer on token '%s'", sk.label, sk.token_label);
		r = -P11A_E_NO_SUCH_KEY;
		goto out;
	default:
		r = fail_rv(msg, msg_size, sk.token_label, what, rv);
		goto out;
	}

	if (req->scheme == P11A_SCHEME_ECDSA) {
		r = p11a_ecdsa_raw_to_der(raw, raw_len, sig, sig_size, sig_len);
		if (r != 0)
			set_msg(msg, msg_size, "token '%s' returned a malformed ECDSA signature (%zu bytes)",
				sk.token_label, raw_len);
	} else if (raw_len > sig_size) {
		set_msg(msg, msg_size, "signature larger than %zu bytes", sig_size);
		r = -P11A_E_TOO_LARGE;
	} else {
		memcpy(sig, raw, raw_len);
		*sig_len = raw_len;
	}
 out:
	atomic_fetch_sub(&m->inflight, 1);
	if (plan != NULL) {
		p11a_wipe(plan, sizeof(*plan));
		free(plan);
	}
	free(sk.id);
	return r;
}
