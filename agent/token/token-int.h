/*
 * Internals of the token helper (agent/token/), shared by its files; the
 * public interface is token.h.  Nothing outside agent/token/ includes
 * this header.
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
#ifndef AGENT_TOKEN_INT_H
#define AGENT_TOKEN_INT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>
#include <p11-kit/pkcs11.h>

#include "token.h"
#include "proto.h"

#define SLOT_MAX        256

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
	uint8_t policy;                 /* TOK_POL_*: the key's policy, resolved once (sign.c) */
	const struct tok_programs *programs;    /* its allow-programs, NULL any (with policy) */
	uint8_t forwarding;             /* enum conf_forwarding, resolved with policy */
	uint8_t confirm;                /* enum conf_confirm, resolved with policy */
	uint8_t keep_ctx;               /* keep-context-pin, resolved with policy */
};

/* An allow-programs list (sign.c; lives as long as the process). */
struct tok_programs {
	char **paths;
	size_t n;
};

/* tok_key.policy: 0 (calloc) until sign.c resolves it, under m->lock. */
enum { TOK_POL_UNRESOLVED = 0, TOK_POL_ANY = 1, TOK_POL_TLS_ONLY = 2 };

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
	/*
	 * Signatures in C_SignInit..C_Sign on this slot, and a logout waiting
	 * for them: C_Logout destroys the private session objects (the key
	 * copies) that a signer may be using, and SoftHSM2 crashes when one
	 * goes mid-C_Sign.  slot_logout() sets logging_out, waits (bounded)
	 * for signing to reach 0, then logs out; a signer that sees
	 * logging_out does not start (the token is being locked).
	 */
	atomic_int signing;
	atomic_int logging_out;

	/* Under m->lock (written by the control thread only). */
	int known;                      /* tok/ti hold a token seen in this slot */
	int present;                    /* an initialized token is in the slot now */
	int logged_in;
	CK_TOKEN_INFO ti;
	struct p11a_token tok;
	struct tok_key *keys;
	size_t nkeys;
	unsigned mechs;                 /* MECH_*; MECH_ALL when the list is unknown */

	/*
	 * Automatic locking (idle-lock, pin-ttl; token_autolock): signing
	 * threads store the time of each successful signature with one
	 * relaxed atomic store; login_ms is when the control thread saw the
	 * login begin (p11a_now_ms(); 0 = not logged in).
	 */
	_Atomic int64_t last_sign_ms;

	/* Control thread only. */
	int64_t login_ms;
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

	/* The C_WaitForSlotEvent thread (slot.c), when it runs. */
	pthread_t watcher;
	int watching;                   /* control thread: the watcher was started */
	atomic_int watch_stop;          /* closing: the watcher returns, whatever the module said */

	pthread_mutex_t lock;
	int closing;
	struct tok_slot *slots[SLOT_MAX];
	size_t nslots;
};

/* ---------------------------------------------- rv.c: CK_RV translation */

/* Name of a CK_RV for messages; unknown values as hex in buf. */
const char *tok_ckr_name(CK_RV rv, char *buf, size_t size);
/* The project's one CK_RV -> P11A_E translation (0 for CKR_OK). */
int tok_rv_err(CK_RV rv);
/* The session is unusable after rv: close it, open a new one. */
int tok_rv_session_gone(CK_RV rv);
/* rv says the token left its slot. */
int tok_rv_token_gone(CK_RV rv);
/* printf into msg[0..size); nothing when msg is NULL or size 0. */
void tok_set_msg(char *msg, size_t size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Message "token 'LABEL': WHAT: CKR_X" and the code for rv. */
int tok_fail_rv(char *msg, size_t size, const char *label, const char *what, CK_RV rv);
/*
 * A C_Login that failed with rv, and the token's user-PIN flags read just
 * before and just after it (flags_known: both C_GetTokenInfo calls worked):
 * the user's message in msg and the code.  *pin_refused is 1 when the token
 * refused the PIN: a PIN code, or COUNT_LOW / FINAL_TRY / LOCKED appearing
 * across the call whatever the code (the tries left are then in the
 * message).  A module error with no PIN evidence is reported as that error,
 * never as a wrong PIN.  Pure: no PKCS#11 calls.
 */
int tok_login_failure(CK_RV rv, int flags_known, CK_FLAGS before, CK_FLAGS after, const char *label,
		      char *msg, size_t size, int *pin_refused);

/* ---------------------------------------------- pool.c: session pool */

/* 1 when a session in state st is logged in as the user. */
int tok_state_logged_in(CK_STATE st);
/*
 * Borrows a session of s until deadline (0, -P11A_E_TIMEOUT, or the
 * code of the C_OpenSession failure, which is in *rv_out); give it back
 * with tok_pool_put() and the *gen it came with.
 */
int tok_pool_get(struct token_module *m, struct tok_slot *s, const struct timespec *deadline,
		 struct psess **out, unsigned *gen, CK_RV *rv_out);
/* Non-blocking: an idle session or nothing (1 = got one). */
int tok_pool_try_get(struct tok_slot *s, struct psess **ps, unsigned *gen);
/* Returns a borrowed session; drop closes it. */
void tok_pool_put(struct token_module *m, struct tok_slot *s, struct psess *ps, unsigned gen,
		  int drop);
/* 1 on a one-session token (the pool's session is the control session). */
int tok_pool_shared(struct tok_slot *s);
/* The token in s changed: sessions close, copies and the kept session go (control thread). */
void tok_slot_reset_sessions(struct token_module *m, struct tok_slot *s);
/* Sizes the pool of s from ti and the module's session-pool. */
void tok_slot_configure_pool(struct tok_slot *s, const CK_TOKEN_INFO *ti, unsigned pool_max);
/*
 * The control thread's session of s with its login state (CKR_FUNCTION_CANCELED:
 * busy past m->wait_ms); give it back with tok_ctl_session_put().
 */
CK_RV tok_ctl_session_state(struct token_module *m, struct tok_slot *s, CK_SESSION_HANDLE *h,
			    unsigned *gen, int *logged_in);
void tok_ctl_session_put(struct token_module *m, struct tok_slot *s, CK_SESSION_HANDLE h,
			 unsigned gen, int drop);

/* ---------------------------------------------- slot.c */

/*
 * 1 when the token in s left (the slot says so, or the control thread saw
 * it go) within wait_ms and before deadline (CLOCK_MONOTONIC, or NULL):
 * for a call that failed with a module's generic error while a card was
 * pulled out.  Signing threads.
 */
int tok_slot_went(struct token_module *m, struct tok_slot *s, int wait_ms,
		  const struct timespec *deadline);

/* Ends the C_WaitForSlotEvent thread after C_Finalize woke it (bounded wait). */
void tok_watch_join(struct token_module *m);

/* ---------------------------------------------- login.c */

/* The token in s logged in or out as seen by a scan: keeps s->login_ms (control thread). */
void tok_login_seen(struct tok_slot *s, int logged_in);

/* ---------------------------------------------- object.c: objects and pairing */

/* Copy of p[0..n) (NULL when n is 0 or out of memory). */
uint8_t *tok_dup_bytes(const uint8_t *p, size_t n);
/* Handles of the objects tmpl matches (at most P11A_LIST_MAX); *out freed by the caller. */
CK_RV tok_find_objects(struct token_module *m, CK_SESSION_HANDLE h, CK_ATTRIBUTE *tmpl,
		       CK_ULONG ntmpl, CK_OBJECT_HANDLE **out, size_t *count);
/* The keys of the token in session h, sorted; free with tok_keys_free(). */
CK_RV tok_keys_read(struct token_module *m, CK_SESSION_HANDLE h, const CK_TOKEN_INFO *ti,
		    const char *token_uri, int private_visible, struct tok_key **out, size_t *count);
void tok_keys_free(struct tok_key *keys, size_t n);

/* ---------------------------------------------- ctxpin.c: context PINs */

#define TOK_CTXPIN_MAX          64      /* PINs waiting for their signature at most */
#define TOK_CTXPIN_TTL_MS       30000   /* one nobody takes is wiped after this */

/*
 * Takes the context PIN for (conn, key_uri): its slot (>= 0) with *pin
 * pointing into locked memory, valid until tok_ctxpin_release(slot),
 * which wipes it; -1 when there is none.
 */
int tok_ctxpin_take(uint64_t conn, const char *key_uri, const char **pin, size_t *pin_len);
void tok_ctxpin_release(int slot);
/*
 * keep-context-pin: the kept PIN of key_uri (a slot as tok_ctxpin_take,
 * shared by concurrent signers; -1 none), and keeping one that signed.
 */
int tok_ctxpin_kept_take(const char *key_uri, const char **pin, size_t *pin_len);
void tok_ctxpin_keep(const char *key_uri, const char *pin, size_t pin_len);

/* ---------------------------------------------- token.c: the module */

/* Wakes the control thread (token_event_fd): a token may have changed. */
void tok_notify(struct token_module *m);

#endif
