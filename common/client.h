/*
 * Client side of the agent protocol, shared by the CLI, the OpenSSL
 * provider and the PKCS#11 front-end module.
 *
 * A p11a_client is one connection to the agent (after HELLO).  It is not
 * thread-safe: one request at a time; callers that sign from several
 * threads use one client each (or their own lock).  Signing goes over a
 * signing channel that the agent hands out per key (OPEN_CHANNEL); the
 * client opens it on first use and keeps it.
 */
#ifndef P11A_CLIENT_H
#define P11A_CLIENT_H

#include <stddef.h>
#include <stdint.h>
#include "proto.h"

struct p11a_client;

/* P11A_CLIENT_TIMEOUT_MS (p11a.h): the per-request deadline, derived from the agent's. */

/*
 * Socket path the client should use: $P11AGENT_SOCK, else
 * $XDG_RUNTIME_DIR/p11agent/agent.sock, else /run/user/UID/p11agent/agent.sock.
 * Writes into out (size out_size); -P11A_E_TOO_LARGE if it does not fit.
 */
int p11a_default_socket_path(char *out, size_t out_size);

/*
 * Connects to path (NULL = default), checks that the socket's owner is
 * our own uid or root before sending anything (SO_PEERCRED), sends HELLO,
 * checks the version.  client_name is sent in HELLO.  timeout_ms bounds
 * each request (0 = default).  Errors: -P11A_E_NOT_RUNNING (nothing
 * listens / no socket), -P11A_E_DENIED (the socket belongs to another
 * user, refused by the agent, or permission denied), -P11A_E_VERSION,
 * -P11A_E_IO, -P11A_E_TIMEOUT.  On error *out is NULL and, when why is
 * not NULL, why (size why_size) holds a message for the user that names
 * the socket and the cause.  The same owner check guards every later
 * reconnection of the client.
 */
int p11a_client_connect(const char *path, const char *client_name, int timeout_ms,
			struct p11a_client **out, char *why, size_t why_size);
void p11a_client_free(struct p11a_client *c);
const char *p11a_client_path(const struct p11a_client *c);

/*
 * Human text of the last ERROR the agent sent (or of the last local
 * failure), valid until the next call on c.  Never NULL.
 */
const char *p11a_client_last_error(const struct p11a_client *c);

/*
 * Sends one request and reads one reply.  An ERROR reply is turned into
 * its negative code (text in p11a_client_last_error()); on success
 * *reply holds the reply (caller clears it).  fd_received as in
 * p11a_frame_read().  A main connection found closed is reopened (with
 * HELLO) before the request; STATUS, LIST, LOCK and OPEN_CHANNEL are
 * sent once more on a new connection if the agent closed the old one
 * under the request; UNLOCK never is.
 */
int p11a_client_call(struct p11a_client *c, const struct p11a_msg *req,
		     struct p11a_msg *reply, int *fd_received);

/* Convenience requests; replies owned by the caller (p11a_msg_clear). */
int p11a_client_status(struct p11a_client *c, struct p11a_msg *reply);
/*
 * HEALTH (protocol version 2): each module's state and last error, and the
 * agent's latest warnings.  -P11A_E_UNSUPPORTED, without a round trip,
 * when the agent chose version 1.
 */
int p11a_client_health(struct p11a_client *c, struct p11a_msg *reply);
int p11a_client_list(struct p11a_client *c, struct p11a_msg *reply);
/*
 * LOG (protocol version 3): the agent's audit events at or after since_us
 * (µs since the epoch, 0 = all), the newest max (0 = as many as fit),
 * oldest first, in reply->u.events.  -P11A_E_UNSUPPORTED, without a round
 * trip, when the agent chose an older version.
 */
int p11a_client_log(struct p11a_client *c, uint64_t since_us, uint32_t max, struct p11a_msg *reply);
/* token_uri NULL or "" = the only token that needs a login; pin is not kept. */
int p11a_client_unlock(struct p11a_client *c, const char *token_uri,
		       const char *pin, size_t pin_len);
int p11a_client_lock(struct p11a_client *c, const char *token_uri);

/*
 * Protocol version 3 (-P11A_E_UNSUPPORTED, without a round trip, for an
 * older agent).  UNLOCK_PROMPT: the agent asks for the PIN of the token
 * of uri (a key or token URI; "" = the only token that needs one) with
 * its pinentry; CONFIRM: it asks the user to allow a signature with
 * key_uri.  Both wait for a person: their deadline is
 * P11A_CLIENT_PROMPT_TIMEOUT_MS.  Errors include -P11A_E_CANCELLED,
 * -P11A_E_PIN_INCORRECT (never retried) and -P11A_E_NOT_CONFIRMED.
 * UPDATE_ENV: the session (display, terminal) for the agent's dialogs,
 * "NAME=value" each.
 */
int p11a_client_unlock_prompt(struct p11a_client *c, const char *uri);
int p11a_client_confirm(struct p11a_client *c, const char *key_uri);
/*
 * CONTEXT_PIN: the agent asks for the PIN of key_uri (a key with
 * CKA_ALWAYS_AUTHENTICATE) for one signature of this connection, which
 * the next SIGN for that key on it spends.  Errors as UNLOCK_PROMPT.
 */
int p11a_client_context_pin(struct p11a_client *c, const char *key_uri);
int p11a_client_update_env(struct p11a_client *c, char *const *env, size_t n);

/*
 * Signs: opens (or reuses) the signing channel for key_uri, sends SIGN,
 * returns the signature in a malloc'd block (*sig, *sig_len).  req->key_uri
 * is the key.  If the channel turns out closed (agent restarted) it is
 * reopened once, with a fresh main connection if needed.  A locked token
 * (LOCKED) makes it ask the agent for a PIN dialog (UNLOCK_PROMPT) and a
 * key that needs a yes (NOT_CONFIRMED) for a confirm dialog (CONFIRM),
 * and a key that wants its PIN for every signature (error CONTEXT_PIN)
 * for a PIN dialog (CONTEXT_PIN), each at most once, and sign again;
 * not when P11AGENT_NO_PROMPT is set (to anything but "" or "0") or the
 * agent is older than version 3.
 */
int p11a_client_sign(struct p11a_client *c, const struct p11a_sign *req,
		     uint8_t **sig, size_t *sig_len);

/*
 * A value that differs in a child from what it was in the parent at
 * fork(), for callers that keep descriptors across calls and must not use
 * them in a forked child (a child would read replies meant for the
 * parent).  Costs no system call: a pthread_atfork() child handler,
 * registered on the first call, bumps it.  Call it once before any fork
 * that matters (p11a_client_connect() does).  If the handler cannot be
 * registered, the value is made from getpid().
 */
uint64_t p11a_fork_generation(void);

#endif
