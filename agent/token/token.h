/*
 * PKCS#11 access for the token helper (agent/helper.c): module loading,
 * token and key enumeration, login/logout and signing.  agent/token/ is
 * the only code in the project that calls a PKCS#11 function, and
 * agent/token/rv.c holds the only CK_RV -> P11A_E_* translation.
 *
 * Threads: token_module_load(), token_refresh(), token_check(),
 * token_unlock(), token_lock() and token_module_close() belong to the
 * helper's control thread (one caller at a time).  token_sign() and
 * token_inventory() may be called from any thread, concurrently with each
 * other and with the control thread.
 *
 * Per token the module keeps one long-lived session (it keeps the login
 * alive and serves the control thread) and a pool of signing sessions:
 * up to TOKEN_POOL_MAX at once on a token that allows several sessions,
 * one queue on a token that allows one (there the kept session is the
 * pool's only session and the control thread queues for it too).
 *
 * Errors are negative P11A_E_* values.  Functions that take msg/msg_size
 * write a message for the user there on failure ("token 'X' is locked:
 * run 'p11agent unlock'"); it is never a PIN or signed data.
 */
#ifndef AGENT_TOKEN_H
#define AGENT_TOKEN_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>
#include "conf.h"
#include "proto.h"

#define TOKEN_POOL_MAX 32       /* signing sessions per token at most */
#define TOKEN_MSG_MAX 1024      /* enough for any message these functions write */

struct token_module;

/*
 * dlopen()s mod->load_path (else mod->path; RTLD_NOW | RTLD_LOCAL), gets
 * its function list and calls C_Initialize with CKF_OS_LOCKING_OK and
 * pReserved = mod->init_args.  Each token's signing pool holds at most
 * mod->session_pool sessions (TOKEN_POOL_MAX when 0).  wait_ms bounds how
 * long the control thread queues for the session of a one-session token
 * that is busy signing.  On failure logs why, writes it to msg too (for
 * the agent's status) and returns -P11A_E_TOKEN (nothing to free); *out
 * is set on success.  Does not enumerate: call token_refresh() next.
 */
int token_module_load(const struct module_conf *mod, int wait_ms, struct token_module **out,
		      char *msg, size_t msg_size);

/*
 * Stops signing (later token_sign() calls fail with -P11A_E_HELPER),
 * waits up to 2 s for signatures in progress, then calls C_Finalize if
 * none is left (never while another thread is inside the module).  The
 * module stays mapped: channel threads may still look at it.
 */
void token_module_close(struct token_module *m);

/*
 * Re-enumerates slots, tokens, keys and certificates and replaces the
 * inventory.  A token that disappeared stays listed with its keys and
 * P11A_TOKEN_PRESENT clear until another token takes its slot.  Returns 0
 * or -P11A_E_TOKEN when the slot list cannot be read (the old inventory
 * then stays).
 */
int token_refresh(struct token_module *m);

/*
 * Cheap look for changes since the last token_refresh(): slots gained or
 * lost, token identity or flags, login state.  1 when something changed
 * (call token_refresh()), else 0.  Does not touch objects.
 */
int token_check(struct token_module *m);

/*
 * A descriptor that becomes readable when a signing thread saw a sign of
 * a changed token (removal, lost login, stale handle); the control thread
 * polls it, calls token_event_clear() and then token_refresh().
 */
int token_event_fd(const struct token_module *m);
void token_event_clear(struct token_module *m);

/*
 * Slot events: a thread blocked in C_WaitForSlotEvent makes the event
 * descriptor readable when a token comes or goes, so a card put back is
 * listed at once instead of at the next poll.  A module without it
 * (CKR_FUNCTION_NOT_SUPPORTED: SoftHSM2, NSS softokn) ends the thread and
 * the helper's poll stays the only way.  Started by the control thread
 * after the first token_refresh(); token_module_close() ends it.
 */
void token_watch_start(struct token_module *m);

/*
 * Deep copy of the current inventory into out (zeroed first; the caller
 * releases it with p11a_msg_clear() on a message holding it, or by hand
 * with p11a_token_clear/p11a_key_clear and free).  -P11A_E_NOMEM.
 */
int token_inventory(struct token_module *m, struct p11a_list_reply *out);

/*
 * C_Login(CKU_USER) on the token that token_uri names ("" = the one
 * token that requires a login and is not logged in).  Called once, never
 * retried.  Already logged in is success.  pin is not kept or copied.
 * Errors: -P11A_E_URI, -P11A_E_NO_SUCH_TOKEN, -P11A_E_AMBIGUOUS,
 * -P11A_E_TOKEN_NOT_PRESENT, -P11A_E_PIN_INCORRECT (message names the
 * token and "PIN count low" / "final try"), -P11A_E_PIN_LOCKED,
 * -P11A_E_PIN_INVALID, -P11A_E_TOKEN, -P11A_E_TIMEOUT.  *tried is set
 * to 1 when C_Login was called (the token's state may have changed: a
 * login, or a PIN counter), 0 when nothing was asked of the token.
 */
int token_unlock(struct token_module *m, const char *token_uri,
		 const char *pin, size_t pin_len, int *tried, char *msg, size_t msg_size);

/*
 * C_Logout on every token token_uri matches ("" = every token).  Not
 * logged in is success.  Errors: -P11A_E_URI, -P11A_E_NO_SUCH_TOKEN, and
 * the first failure of C_Logout.
 */
int token_lock(struct token_module *m, const char *token_uri, char *msg, size_t msg_size);

/*
 * Automatic locking (control thread): C_Logout, as token_lock() does, on
 * every logged-in token whose last signature (or login, when none came
 * since) is idle_ms old or more, or whose login is ttl_ms old or more (0
 * = that rule is off); each lock is logged with the token and the
 * reason.  now is p11a_now_ms().  Returns how many tokens it logged out
 * (push the inventory then) and lowers *next to the time it has to run
 * again (unchanged when no token is logged in).  Each lock is also told to
 * locked(arg, token URI, "idle" or "pin-ttl") when locked is not NULL (the
 * audit trail).
 */
int token_autolock(struct token_module *m, int64_t now, int64_t idle_ms, int64_t ttl_ms,
		   int64_t *next, void (*locked)(void *arg, const char *token_uri,
						 const char *reason), void *arg);

/*
 * Signs per docs/protocol.md (SIGN): finds req->key_uri among the keys,
 * hashes/encodes as the scheme and input require, waits for a free
 * session of the key's token until deadline (CLOCK_MONOTONIC), calls
 * C_SignInit/C_Sign and writes the wire signature (ECDSA as DER) to
 * sig[0..sig_size), its length to *sig_len.  sig_size >= P11A_SIG_MAX.
 * Errors: -P11A_E_URI, -P11A_E_NO_SUCH_KEY, -P11A_E_AMBIGUOUS,
 * -P11A_E_LOCKED, -P11A_E_TOKEN_NOT_PRESENT, -P11A_E_UNSUPPORTED,
 * -P11A_E_BAD_REQUEST, -P11A_E_TIMEOUT, -P11A_E_TOKEN, -P11A_E_CRYPTO,
 * -P11A_E_TOO_LARGE, -P11A_E_HELPER (closing), -P11A_E_NOMEM, -P11A_E_POLICY (a
 * key whose allow-programs does not name peer->exe, or a tls-only key and
 * no TLS client content: common/tlsclass.h; a digest passes for a tls-only
 * key whose allow-programs names peer->exe).
 */
struct token_keymemo;

/* The process a channel belongs to, as the agent saw it at accept (allow-programs). */
struct token_peer {
	uint64_t conn;                  /* the agent's serial of the connection that opened it */
	uint32_t pid;                   /* 0 unknown */
	const char *exe;                /* /proc/PID/exe at accept; NULL unknown */
	int forwarded;                  /* a forwarded connection (ssh, a relay): forwarding applies */
};

/*
 * The per-key policy of the configuration ([key URI-PATTERN] sections,
 * tls-only, allow-programs, forwarding: docs/p11agentd.conf.5), for every later token_sign() of this
 * process.  Call once, before any signing thread starts.  Each key record
 * resolves its policy on its first SIGN and keeps it until the inventory
 * changes.  -1 (msg set) when a pattern does not parse or out of memory.
 */
int token_set_policy(const struct agent_config *cfg, char *msg, size_t msg_size);

/*
 * confirm = always (H_GRANT): lets one later SIGN for key_uri (the
 * inventory's URI) on a channel of connection conn through, within a
 * minute.  Any thread.  -P11A_E_NOMEM.
 */
int token_grant_add(uint64_t conn, const char *key_uri);

/*
 * A CKA_ALWAYS_AUTHENTICATE key (H_CONTEXT_PIN): the PIN for one later
 * SIGN for key_uri (the inventory's URI) of connection conn, which logs
 * in with CKU_CONTEXT_SPECIFIC and wipes it.  Kept in locked memory and
 * wiped unused after 30 s (token_ctxpin_sweep).  Any thread.
 * -P11A_E_NOMEM, -P11A_E_BUSY (64 PINs already wait), -P11A_E_PIN_INVALID.
 */
int token_ctxpin_add(uint64_t conn, const char *key_uri, const char *pin, size_t pin_len);
/* keep-context-pin: wipes the kept PIN of key_uri, or every kept PIN (NULL): on a lock. */
void token_ctxpin_forget(const char *key_uri);
/* Wipes the context PINs past their time; the next one's deadline (INT64_MAX none). */
int64_t token_ctxpin_sweep(int64_t now);

int token_sign(struct token_module *m, struct token_keymemo **memo,
	       const struct token_peer *peer, const struct p11a_sign *req, const struct timespec *deadline,
	       uint8_t *sig, size_t sig_size, size_t *sig_len, char *msg, size_t msg_size);

/*
 * A channel's memo of the last key URI it resolved, so repeated SIGNs for
 * the same key skip parsing and matching while the inventory is
 * unchanged.  token_sign() creates it in *memo (NULL at first; memo may
 * be NULL: no memo); the channel frees it when it closes.
 */
void token_keymemo_free(struct token_keymemo *memo);

#endif
