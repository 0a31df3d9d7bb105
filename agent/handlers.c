/*
 * The agent's request handlers (see server_int.h): HELLO, STATUS, LIST,
 * HEALTH, UNLOCK, LOCK, OPEN_CHANNEL, SIGN relayed for clients without a
 * signing channel (forwarded: ssh -R, a relay), the requests forwarded to token
 * helpers and waiting for their replies, and the one error reply.
 */
#include "config.h"
#include "server_int.h"
#include "audit.h"
#include "log.h"
#include "p11a.h"
#include "proto.h"
#include "uri.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* ------------------------------------------------------------ replies */

void
send_error(struct server *s, size_t ci, int code, const char *fmt, ...)
{
	struct p11a_msg m;
	va_list ap;
	int r;

	memset(&m, 0, sizeof(m));
	va_start(ap, fmt);
	r = p11a_msg_set_error_v(&m, code, fmt, ap);
	va_end(ap);
	if (r != 0) {
		s->clients[ci].closing = 1;
		return;
	}
	log_debug("client %d: error %s: %s", s->clients[ci].fd, p11a_strerror(code),
		  m.u.error.message);
	send_msg(s, ci, &m, -1);
	p11a_msg_clear(&m);
}

void
send_ok(struct server *s, size_t ci)
{
	struct p11a_msg m = { .type = P11A_MSG_OK };
	send_msg(s, ci, &m, -1);
}

/* ------------------------------------------------------------ pending */

/* A new pending request to helper hi, with its id and deadline; NULL out of memory. */
static struct pending *
pending_new(struct server *s, size_t hi, uint8_t type, const char *what)
{
	if (s->npending == s->cpending) {
		size_t n = s->cpending ? s->cpending * 2 : 16;
		struct pending *p = realloc(s->pending, n * sizeof(*p));
		if (!p)
			return NULL;
		s->pending = p;
		s->cpending = n;
	}
	struct pending *p = &s->pending[s->npending];
	memset(p, 0, sizeof(*p));
	if (++s->next_id == 0)
		s->next_id = 1;
	p->id = s->next_id;
	p->helper = hi;
	p->type = type;
	p->deadline = p11a_now_ms() + s->cfg->sign_timeout_ms;
	p->what = strdup(what ? what : "");
	p->channel_fd = -1;
	p->started_us = audit_now_us();
	s->npending++;
	return p;
}

static struct pending *
pending_add(struct server *s, size_t ci, size_t hi, uint8_t type, const char *what)
{
	struct pending *p = pending_new(s, hi, type, what);

	if (p == NULL)
		return NULL;
	p->client = ci;
	p->serial = s->clients[ci].serial;
	s->clients[ci].waiting++;
	return p;
}

struct pending *
pending_add_dialog(struct server *s, size_t hi, uint8_t type, const char *what, uint64_t dialog)
{
	struct pending *p = pending_new(s, hi, type, what);

	if (p == NULL)
		return NULL;
	p->client = SIZE_MAX;
	p->dialog = dialog;
	return p;
}

void
client_reply_arrived(struct server *s, size_t ci, uint64_t serial, int code, const char *msg)
{
	struct client *c = &s->clients[ci];
	if (c->fd < 0 || c->serial != serial || c->waiting == 0)
		return;
	if (code != 0 && c->wait_error == 0) {
		c->wait_error = code;
		free(c->wait_error_msg);
		c->wait_error_msg = strdup(msg ? msg : "");
	}
	if (--c->waiting > 0)
		return;
	if (c->wait_error) {
		if (c->reply_fd >= 0) {
			close(c->reply_fd);
			c->reply_fd = -1;
		}
		send_error(s, ci, c->wait_error, "%s", c->wait_error_msg ? c->wait_error_msg : "");
	} else if (c->reply_fd >= 0) {
		struct p11a_msg reply = { .type = P11A_MSG_CHANNEL };
		int fd = c->reply_fd;
		c->reply_fd = -1;
		send_msg(s, ci, &reply, fd);
	} else {
		send_ok(s, ci);
	}
	c->wait_error = 0;
	free(c->wait_error_msg);
	c->wait_error_msg = NULL;
}

/* UNLOCK and LOCK outcomes go to the audit trail (never the PIN: it is not here). */
static void
pending_audit(struct server *s, const struct pending *p, int code, const char *msg)
{
	/* A dialog's UNLOCK is audited with the dialog's outcome (prompt.c); it has no client. */
	if ((p->type != P11A_MSG_UNLOCK && p->type != P11A_MSG_LOCK) || p->dialog != 0)
		return;
	const struct client *c = &s->clients[p->client];
	int same = c->fd >= 0 && c->serial == p->serial;
	uint64_t now = audit_now_us();
	audit_note(p->type == P11A_MSG_UNLOCK ? P11A_EV_UNLOCK : P11A_EV_LOCK, p->uri,
		   same ? c->pid : 0, same ? (uid_t)c->uid : s->uid, same ? c->exe : NULL, code, msg,
		   p->type == P11A_MSG_LOCK ? "request" : NULL,
		   now > p->started_us ? now - p->started_us : 0);
}

/* A relayed SIGN's SIGNATURE: sent to the client as the helper made it. */
static void
client_signature_arrived(struct server *s, size_t ci, uint64_t serial, const struct p11a_msg *m)
{
	struct client *c = &s->clients[ci];

	if (c->fd < 0 || c->serial != serial || c->waiting == 0)
		return;
	/* One H_SIGN per request: nothing else is awaited with it. */
	c->waiting = 0;
	c->wait_error = 0;
	free(c->wait_error_msg);
	c->wait_error_msg = NULL;
	send_msg(s, ci, m, -1);
}

/* Where a helper's answer (or its failure) goes: the client, or the dialog that asked. */
static void
pending_deliver(struct server *s, const struct pending *p, int code, const char *msg)
{
	if (p->dialog != 0)
		prompt_helper_reply(s, p->dialog, code, msg);
	else
		client_reply_arrived(s, p->client, p->serial, code, msg);
}

static void
pending_remove(struct server *s, size_t pi)
{
	free(s->pending[pi].uri);
	free(s->pending[pi].what);
	if (s->pending[pi].channel_fd >= 0)
		close(s->pending[pi].channel_fd);
	s->pending[pi] = s->pending[--s->npending];
}

void
pending_fail_helper(struct server *s, size_t hi)
{
	for (size_t i = 0; i < s->npending;) {
		struct pending *p = &s->pending[i];
		if (p->helper != hi) {
			i++;
			continue;
		}
		char msg[512];
		snprintf(msg, sizeof(msg), "token helper for module %s stopped during %s; it is being restarted",
			 s->helpers[hi].mod->name, p->what);
		pending_audit(s, p, P11A_E_HELPER, msg);
		struct pending copy = *p;
		pending_deliver(s, &copy, P11A_E_HELPER, msg);
		pending_remove(s, i);
	}
}

void
pending_expire(struct server *s, int64_t now)
{
	for (size_t i = 0; i < s->npending;) {
		struct pending *p = &s->pending[i];
		if (p->deadline > now) {
			i++;
			continue;
		}
		char msg[512];
		/*
		 * The helper still holds the request and may carry it out: a
		 * login or logout that ends later must not have been reported
		 * as a plain failure.
		 */
		const char *still = p->type == P11A_MSG_UNLOCK ?
		    "; the unlock is still in progress and may yet succeed: "
		    "'p11agent status' shows the outcome" :
		    p->type == P11A_MSG_LOCK ?
		    "; the lock is still in progress: 'p11agent status' shows the outcome" : "";
		snprintf(msg, sizeof(msg), "%s: module %s did not answer within %d s%s", p->what,
			 s->helpers[p->helper].mod->name, s->cfg->sign_timeout_ms / 1000, still);
		pending_audit(s, p, P11A_E_TIMEOUT, msg);
		struct pending copy = *p;
		pending_deliver(s, &copy, P11A_E_TIMEOUT, msg);
		pending_remove(s, i);
	}
}

void
pending_reply(struct server *s, size_t hi, uint32_t id, const struct p11a_msg *m)
{
	for (size_t i = 0; i < s->npending; i++) {
		struct pending *p = &s->pending[i];
		if (p->id != id || p->helper != hi)
			continue;
		if (p->dialog != 0) {
			struct pending copy = *p;
			pending_remove(s, i);
			if (m->type == P11A_MSG_OK)
				prompt_helper_reply(s, copy.dialog, 0, NULL);
			else if (m->type == P11A_MSG_ERROR)
				prompt_helper_reply(s, copy.dialog, (int)m->u.error.code,
						    m->u.error.message);
			else
				prompt_helper_reply(s, copy.dialog, P11A_E_INTERNAL,
						    "unexpected reply from token helper");
			return;
		}
		if (m->type == P11A_MSG_ERROR)
			pending_audit(s, p, (int)m->u.error.code, m->u.error.message);
		else
			pending_audit(s, p, m->type == P11A_MSG_OK ? 0 : P11A_E_INTERNAL,
				      "unexpected reply from token helper");
		if (p->type == P11A_MSG_H_SIGN && m->type == P11A_MSG_SIGNATURE) {
			client_signature_arrived(s, p->client, p->serial, m);
		} else if (p->type == P11A_MSG_H_SIGN && m->type != P11A_MSG_ERROR) {
			client_reply_arrived(s, p->client, p->serial, P11A_E_INTERNAL,
					     "unexpected reply from token helper to a forwarded signature");
		} else if (m->type == P11A_MSG_OK && p->channel_fd >= 0) {
			/* The helper serves the channel now: hand the other end over. */
			struct client *c = &s->clients[p->client];
			if (c->fd >= 0 && c->serial == p->serial && c->reply_fd < 0) {
				c->reply_fd = p->channel_fd;
				p->channel_fd = -1;
			}
			client_reply_arrived(s, p->client, p->serial, 0, NULL);
		} else if (m->type == P11A_MSG_OK)
			client_reply_arrived(s, p->client, p->serial, 0, NULL);
		else if (m->type == P11A_MSG_ERROR)
			client_reply_arrived(s, p->client, p->serial, (int)m->u.error.code,
					     m->u.error.message);
		else
			client_reply_arrived(s, p->client, p->serial, P11A_E_INTERNAL,
					     "unexpected reply from token helper");
		pending_remove(s, i);
		return;
	}
	/* Late replies after a timeout land here. */
	log_debug("helper %s: reply type 0x%02x for id %u ignored", s->helpers[hi].mod->name,
		  m->type, id);
}

int64_t
pending_next_deadline(const struct server *s, int64_t next)
{
	for (size_t i = 0; i < s->npending; i++)
		if (s->pending[i].deadline < next)
			next = s->pending[i].deadline;
	return next;
}

void
pending_free_all(struct server *s)
{
	while (s->npending > 0)
		pending_remove(s, s->npending - 1);
	free(s->pending);
	s->pending = NULL;
	s->cpending = 0;
}

/* ------------------------------------------------------------ requests */

static void
handle_hello(struct server *s, size_t ci, const struct p11a_hello *hello)
{
	struct client *c = &s->clients[ci];
	uint16_t lo = hello->min_version > P11A_PROTO_VERSION_MIN ? hello->min_version : P11A_PROTO_VERSION_MIN;
	uint16_t hi = hello->max_version < P11A_PROTO_VERSION ? hello->max_version : P11A_PROTO_VERSION;
	if (lo > hi) {
		send_error(s, ci, P11A_E_VERSION,
			   "client speaks protocol versions %u..%u, agent speaks %u..%u",
			   hello->min_version, hello->max_version, P11A_PROTO_VERSION_MIN,
			   P11A_PROTO_VERSION);
		c->closing = 1;
		return;
	}
	log_debug("client %d: hello from '%s' (pid %ld), version %u", c->fd,
		  hello->client ? hello->client : "", (long)c->pid, hi);
	c->hello_done = 1;
	c->version = hi;
	struct p11a_msg m = { .type = P11A_MSG_HELLO_REPLY };
	m.u.hello_reply.version = hi;
	m.u.hello_reply.agent = (char *)"p11agentd " PACKAGE_VERSION;
	send_msg(s, ci, &m, -1);
}

/* Gathers every token (and key) of every running helper; views only, nothing copied. */
static void
handle_list(struct server *s, size_t ci, int with_keys)
{
	struct p11a_msg m;
	memset(&m, 0, sizeof(m));
	size_t nt = 0, nk = 0;
	for (size_t i = 0; i < s->nhelpers; i++) {
		nt += s->helpers[i].inv.ntokens;
		nk += s->helpers[i].inv.nkeys;
	}
	struct p11a_token *tokens = calloc(nt ? nt : 1, sizeof(*tokens));
	struct p11a_key *keys = calloc(nk ? nk : 1, sizeof(*keys));
	if (!tokens || !keys) {
		free(tokens);
		free(keys);
		send_error(s, ci, P11A_E_NOMEM, "out of memory");
		return;
	}
	nt = nk = 0;
	for (size_t i = 0; i < s->nhelpers; i++) {
		const struct p11a_list_reply *inv = &s->helpers[i].inv;
		if (inv->ntokens)
			memcpy(tokens + nt, inv->tokens, inv->ntokens * sizeof(*tokens));
		nt += inv->ntokens;
		if (inv->nkeys)
			memcpy(keys + nk, inv->keys, inv->nkeys * sizeof(*keys));
		nk += inv->nkeys;
	}
	if (with_keys) {
		m.type = P11A_MSG_LIST_REPLY;
		m.u.list.ntokens = (uint32_t)nt;
		m.u.list.tokens = tokens;
		m.u.list.nkeys = (uint32_t)nk;
		m.u.list.keys = keys;
	} else {
		size_t up = 0;
		for (size_t i = 0; i < s->nhelpers; i++)
			up += s->helpers[i].up;
		m.type = P11A_MSG_STATUS_REPLY;
		m.u.status.agent = (char *)"p11agentd " PACKAGE_VERSION;
		m.u.status.pid = (uint32_t)getpid();
		m.u.status.modules = (uint32_t)s->nhelpers;
		m.u.status.modules_up = (uint32_t)up;
		m.u.status.connections = (uint32_t)s->open_clients;
		m.u.status.ntokens = (uint32_t)nt;
		m.u.status.tokens = tokens;
	}
	send_msg(s, ci, &m, -1);
	free(tokens);
	free(keys);
}

/* HEALTH: every module's state and last error, and the latest warnings of this process. */
static void
handle_health(struct server *s, size_t ci)
{
	const struct agent_config *cfg = s->cfg;
	size_t n = s->nhelpers + cfg->ndropped, k = 0;
	struct p11a_module_health *mods = calloc(n ? n : 1, sizeof(*mods));
	const char *recent[LOG_RECENT_MAX];
	struct p11a_msg m;

	if (!mods) {
		send_error(s, ci, P11A_E_NOMEM, "out of memory");
		return;
	}
	for (size_t i = 0; i < s->nhelpers; i++, k++) {
		const struct helper *h = &s->helpers[i];
		mods[k].name = h->mod->name;
		mods[k].path = h->mod->path;
		mods[k].state = h->dead_for_good ? P11A_MODULE_FAILED : h->up ? P11A_MODULE_UP :
		    h->fd >= 0 ? P11A_MODULE_STARTING : P11A_MODULE_RESTARTING;
		mods[k].restarts = h->starts > 1 ? h->starts - 1 : 0;
		mods[k].error_time = (uint32_t)h->error_time;
		mods[k].error = (char *)h->last_error;
	}
	for (size_t i = 0; i < cfg->ndropped; i++, k++) {
		mods[k].name = cfg->dropped[i].name;
		mods[k].path = cfg->dropped[i].path;
		mods[k].state = P11A_MODULE_NOT_USED;
		mods[k].error = cfg->dropped[i].why;
	}
	memset(&m, 0, sizeof(m));
	m.type = P11A_MSG_HEALTH_REPLY;
	m.u.health.nmodules = (uint32_t)n;
	m.u.health.modules = mods;
	m.u.health.nrecent = (uint32_t)log_recent(recent, LOG_RECENT_MAX);
	m.u.health.recent = (char **)recent;
	send_msg(s, ci, &m, -1);
	free(mods);
}

int
find_tokens(const struct server *s, const char *uri, struct token_ref **out)
{
	struct p11a_uri_matcher *mt = NULL;
	struct token_ref *refs = NULL;
	size_t n = 0, total = 0;
	int err = 0;

	*out = NULL;
	if (uri && *uri && !(mt = p11a_uri_matcher_new(uri, &err)))
		return err ? err : -P11A_E_URI;
	for (size_t i = 0; i < s->nhelpers; i++)
		total += s->helpers[i].inv.ntokens;
	if (total > INT_MAX || (total && !(refs = calloc(total, sizeof(*refs))))) {
		p11a_uri_matcher_free(mt);
		return -P11A_E_NOMEM;
	}
	for (size_t i = 0; i < s->nhelpers; i++) {
		const struct p11a_list_reply *inv = &s->helpers[i].inv;
		for (uint32_t t = 0; t < inv->ntokens; t++) {
			if (mt && p11a_uri_match_token(mt, &inv->tokens[t]) != 1)
				continue;
			refs[n++] = (struct token_ref){ i, &inv->tokens[t] };
		}
	}
	p11a_uri_matcher_free(mt);
	if (n == 0) {
		free(refs);
		refs = NULL;
	}
	*out = refs;
	return (int)n;
}

/*
 * The tokens an UNLOCK or LOCK names (uri "" = all).  Answers the client
 * itself when there are none or the URI is bad, and returns -1 then.
 */
static int
request_tokens(struct server *s, size_t ci, const char *uri, struct token_ref **refs)
{
	int n = find_tokens(s, uri, refs);

	if (n == -P11A_E_NOMEM) {
		send_error(s, ci, P11A_E_NOMEM, "out of memory");
		return -1;
	}
	if (n < 0) {
		send_error(s, ci, -n, "'%s' is not a valid pkcs11: token URI", uri);
		return -1;
	}
	if (n == 0) {
		if (*uri)
			send_error(s, ci, P11A_E_NO_SUCH_TOKEN, "no token matches %s", uri);
		else
			send_error(s, ci, P11A_E_NO_SUCH_TOKEN, "no token is present");
		return -1;
	}
	return n;
}

static void
handle_unlock(struct server *s, size_t ci, struct p11a_msg *req)
{
	struct token_ref *refs = NULL;
	const char *uri = req->u.unlock.token_uri ? req->u.unlock.token_uri : "";
	int n = request_tokens(s, ci, uri, &refs);
	if (n < 0)
		return;
	const struct token_ref *pick = NULL;
	int candidates = 0;
	for (int i = 0; i < n; i++) {
		uint32_t f = refs[i].token->flags;
		/* A named token is unlocked whatever its flags; "" picks the one that needs a PIN. */
		if (*uri || ((f & P11A_TOKEN_LOGIN_REQUIRED) && !(f & P11A_TOKEN_LOGGED_IN))) {
			candidates++;
			pick = &refs[i];
		}
	}
	if (candidates == 0) {
		send_ok(s, ci);  /* every token is already logged in */
		goto out;
	}
	if (candidates > 1) {
		send_error(s, ci, P11A_E_AMBIGUOUS,
			   "%d tokens %s; name one with its URI (p11agent unlock --token URI)",
			   candidates, *uri ? "match" : "need a PIN");
		goto out;
	}
	/* Forward with the exact token URI; the PIN stays in the request's fixed array. */
	char *exact = strdup(pick->token->uri ? pick->token->uri : "");
	if (!exact) {
		send_error(s, ci, P11A_E_NOMEM, "out of memory");
		goto out;
	}
	free(req->u.unlock.token_uri);
	req->u.unlock.token_uri = exact;
	char what[600];
	snprintf(what, sizeof(what), "unlock of token '%s'", pick->token->label);
	struct pending *p = pending_add(s, ci, pick->helper, P11A_MSG_UNLOCK, what);
	if (!p) {
		send_error(s, ci, P11A_E_NOMEM, "out of memory");
		goto out;
	}
	p->uri = strdup(exact);
	log_info("client %d: unlock of token '%s'", s->clients[ci].fd, pick->token->label);
	helper_send(s, pick->helper, p->id, req, -1);
out:
	free(refs);
}

static void
handle_lock(struct server *s, size_t ci, const struct p11a_msg *req)
{
	struct token_ref *refs = NULL;
	const char *uri = req->u.lock.token_uri ? req->u.lock.token_uri : "";
	int n = request_tokens(s, ci, uri, &refs);
	if (n < 0)
		return;
	for (int i = 0; i < n; i++) {
		char what[600];
		snprintf(what, sizeof(what), "lock of token '%s'", refs[i].token->label);
		struct pending *p = pending_add(s, ci, refs[i].helper, P11A_MSG_LOCK, what);
		if (!p) {
			client_reply_arrived(s, ci, s->clients[ci].serial, P11A_E_NOMEM, "out of memory");
			continue;
		}
		struct p11a_msg fwd = { .type = P11A_MSG_LOCK };
		fwd.u.lock.token_uri = refs[i].token->uri;
		p->uri = strdup(refs[i].token->uri ? refs[i].token->uri : "");
		log_info("client %d: lock of token '%s'", s->clients[ci].fd, refs[i].token->label);
		helper_send(s, refs[i].helper, p->id, &fwd, -1);
	}
	free(refs);
}

/*
 * Locks every token of every module at once (SIGHUP; the entry point a
 * session-lock or suspend listener calls too): LOCK "" to each helper
 * that runs.  No client waits: the helpers answer with ids no pending
 * request has (dropped by pending_reply) and push their new inventory.
 */
/* The reason an event names: logind's words (logind.c) become suspend and screen-lock. */
static const char *
audit_lock_reason(const char *why)
{
	if (strcmp(why, "PrepareForSleep") == 0)
		return "suspend";
	if (strncmp(why, "session ", 8) == 0)
		return "screen-lock";
	return why;
}

void
tokens_lock_all(struct server *s, const char *why)
{
	size_t n = 0;

	for (size_t i = 0; i < s->nhelpers; i++) {
		struct p11a_msg m = { .type = P11A_MSG_LOCK };

		if (s->helpers[i].fd < 0)
			continue;
		m.u.lock.token_uri = (char *)"";
		if (++s->next_id == 0)
			s->next_id = 1;
		helper_send(s, i, s->next_id, &m, -1);
		n++;
	}
	log_info("%s: locking every token (%zu module(s))", why, n);
	audit_note(P11A_EV_LOCK, "", 0, s->uid, NULL, 0, NULL, audit_lock_reason(why), 0);
}

/*
 * The helper that holds the one key uri names, or -1 after answering the
 * client with the reason (a bad URI, no such key, several, the helper
 * restarting).  OPEN_CHANNEL and a relayed SIGN find their key alike.
 */
static long
key_helper(struct server *s, size_t ci, const char *uri)
{
	size_t found = 0, hi = 0, n;
	/* An empty list only checks that the URI parses. */
	if (p11a_list_match_keys(NULL, uri, NULL, 0, &n) != 0) {
		send_error(s, ci, P11A_E_URI, "'%s' is not a valid pkcs11: URI", uri);
		return -1;
	}
	for (size_t i = 0; i < s->nhelpers; i++) {
		if (p11a_list_match_keys(&s->helpers[i].inv, uri, NULL, 0, &n) == 0 && n > 0) {
			found += n;
			hi = i;
		}
	}
	if (found == 0) {
		/* A helper that is down has no inventory: its keys are not gone, they are unknown. */
		for (size_t i = 0; i < s->nhelpers; i++) {
			const struct helper *dh = &s->helpers[i];
			if (!dh->dead_for_good && (dh->fd < 0 || !dh->up)) {
				send_error(s, ci, P11A_E_HELPER,
					   "no key matches %s while the token helper for module %s "
					   "is restarting; try again", uri, dh->mod->name);
				return -1;
			}
		}
		send_error(s, ci, P11A_E_NO_SUCH_KEY, "no such key: %s", uri);
		return -1;
	}
	if (found > 1) {
		send_error(s, ci, P11A_E_AMBIGUOUS,
			   "%zu keys match %s; add id= or object= to the URI", found, uri);
		return -1;
	}
	struct helper *h = &s->helpers[hi];
	if (h->fd < 0 || !h->up) {
		send_error(s, ci, P11A_E_HELPER, "token helper for module %s is restarting",
			   h->mod->name);
		return -1;
	}
	return (long)hi;
}

/*
 * confirm = once: a process says yes (CONFIRM) before its first signature
 * with the key, on a channel or relayed.  1 after answering the client
 * NOT_CONFIRMED, else 0.
 */
static int
confirm_once_refused(struct server *s, size_t ci, const struct helper *h, const char *uri)
{
	uint32_t ki;
	size_t n;

	if (p11a_list_match_keys(&h->inv, uri, &ki, 1, &n) != 0 || n != 1)
		return 0;
	const struct p11a_key *k = &h->inv.keys[ki];
	const struct p11a_token *t = p11a_list_find_token(&h->inv, k->token_uri);
	if (t == NULL || config_key_confirm(s->cfg, t, k) != CONFIRM_ONCE ||
	    prompt_process_confirmed(s, ci, k->uri))
		return 0;
	send_error(s, ci, P11A_E_NOT_CONFIRMED,
		   "key '%s' needs your confirmation for this program (confirm = once)",
		   k->label && *k->label ? k->label : k->uri);
	return 1;
}

static void
handle_open_channel(struct server *s, size_t ci, const struct p11a_open_channel *oc)
{
	const char *uri = oc->key_uri ? oc->key_uri : "";
	struct client *c = &s->clients[ci];
	long li = key_helper(s, ci, uri);

	if (li < 0)
		return;
	size_t hi = (size_t)li;
	struct helper *h = &s->helpers[hi];
	/*
	 * A connection that relayed a SIGN cannot carry a descriptor: CHANNEL
	 * without one tells a version-3 client to sign here again
	 * (docs/protocol.md, version 3), and no helper thread waits on a
	 * channel nobody gets.  An ssh peer still gets a real channel: when
	 * it is ssh itself that signs (PKCS11Provider with our module), the
	 * descriptor reaches it and it is a local client; when ssh forwards,
	 * the descriptor is dropped on the way and the client relays.
	 */
	if (c->forwarded == FWD_RELAY && c->version >= 3) {
		struct p11a_msg reply = { .type = P11A_MSG_CHANNEL };
		log_debug("client %d: forwarded: CHANNEL without a descriptor for %s", c->fd, uri);
		send_msg(s, ci, &reply, -1);
		return;
	}
	if (confirm_once_refused(s, ci, h, uri))
		return;
	int sv[2];
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
		send_error(s, ci, P11A_E_BUSY, "cannot create a signing channel: %s", strerror(errno));
		return;
	}
	/*
	 * The client gets its end only once the helper has taken the other
	 * (H_ADOPT answered OK): a helper that is dying but not yet noticed
	 * gives a clear HELPER error here, not a dead channel.  This costs one
	 * helper wake-up per channel, not per signature.
	 */
	char what[160];
	snprintf(what, sizeof(what), "opening a signing channel");
	struct pending *p = pending_add(s, ci, hi, P11A_MSG_H_ADOPT, what);
	if (!p) {
		close(sv[0]);
		close(sv[1]);
		send_error(s, ci, P11A_E_NOMEM, "out of memory");
		return;
	}
	p->channel_fd = sv[1];
	struct p11a_msg adopt = { .type = P11A_MSG_H_ADOPT };
	adopt.u.adopt.conn = s->clients[ci].serial;
	adopt.u.adopt.pid = s->clients[ci].pid > 0 ? (uint32_t)s->clients[ci].pid : 0;
	adopt.u.adopt.exe = s->clients[ci].exe;    /* borrowed: not cleared */
	log_debug("client %d: signing channel to helper %s for %s", s->clients[ci].fd,
		  h->mod->name, uri);
	helper_send(s, hi, p->id, &adopt, sv[0]);
}

/*
 * LOG (version 3): the ring's events since since_us, the newest max, as
 * many as fit one frame (the oldest are left out first).
 */
static void
handle_log(struct server *s, size_t ci, const struct p11a_log *lg)
{
	size_t n = audit_len(), first, bytes = 64;
	const struct p11a_event **v = calloc(n ? n : 1, sizeof(*v));
	struct p11a_event *ev = NULL;
	struct p11a_msg m;

	if (v == NULL) {
		send_error(s, ci, P11A_E_NOMEM, "out of memory");
		return;
	}
	n = audit_select(lg->since_us, lg->max, v);
	first = n;
	while (first > 0 && n - first < P11A_LIST_MAX) {
		size_t sz = p11a_event_wire_size(v[first - 1]);
		if (bytes + sz > P11A_FRAME_MAX)
			break;
		bytes += sz;
		first--;
	}
	if ((ev = calloc(n - first ? n - first : 1, sizeof(*ev))) == NULL) {
		free(v);
		send_error(s, ci, P11A_E_NOMEM, "out of memory");
		return;
	}
	for (size_t i = first; i < n; i++)
		ev[i - first] = *v[i];          /* views: the ring keeps the strings */
	memset(&m, 0, sizeof(m));
	m.type = P11A_MSG_LOG_REPLY;
	m.u.events.n = (uint32_t)(n - first);
	m.u.events.ev = ev;
	send_msg(s, ci, &m, -1);
	free(ev);
	free(v);
}

static const char *
forwarded_how(const struct client *c)
{
	return c->forwarded == FWD_SSH ? "peer is ssh" : "signs through the agent";
}

/*
 * SIGN on a main connection (version 3): the client got no descriptor
 * (ssh -R, a stream relay), so the agent relays its signatures to the
 * helper (H_SIGN) with the peer it checked at accept.  The helper applies
 * the very checks of a channel (allow-programs, tls-only) and the key's
 * forwarding setting; the agent applies every limit of the main
 * connection (one request at a time, frame cap, half-frame and request
 * deadlines) and never waits for the helper.
 */
static void
handle_sign(struct server *s, size_t ci, const struct p11a_sign *sg)
{
	struct client *c = &s->clients[ci];
	const char *uri = sg->key_uri ? sg->key_uri : "";

	if (c->version < 3) {
		send_error(s, ci, P11A_E_PROTOCOL,
			   "SIGN goes on a signing channel: send OPEN_CHANNEL first");
		return;
	}
	if (!c->forwarded) {
		c->forwarded = FWD_RELAY;
		log_info("client %d (pid %ld, %s): forwarded: signs on its main connection "
			 "(it got no descriptor: a relay such as socat or ssh in between)",
			 c->fd, (long)c->pid, c->exe ? c->exe : "executable unknown");
	}
	long li = key_helper(s, ci, uri);
	if (li < 0 || confirm_once_refused(s, ci, &s->helpers[li], uri))
		return;
	char what[160];
	snprintf(what, sizeof(what), "a forwarded signature");
	struct pending *p = pending_add(s, ci, (size_t)li, P11A_MSG_H_SIGN, what);
	if (!p) {
		send_error(s, ci, P11A_E_NOMEM, "out of memory");
		return;
	}
	struct p11a_msg fwd = { .type = P11A_MSG_H_SIGN };
	fwd.u.hsign.conn = c->serial;
	fwd.u.hsign.pid = c->pid > 0 ? (uint32_t)c->pid : 0;
	fwd.u.hsign.exe = c->exe;          /* borrowed, as the sign fields: not cleared */
	fwd.u.hsign.flags = P11A_HSIGN_FORWARDED;
	fwd.u.hsign.sign = *sg;
	log_debug("client %d: forwarded (%s): sign %.300s relayed to helper %s", c->fd,
		  forwarded_how(c), uri, s->helpers[li].mod->name);
	helper_send(s, (size_t)li, p->id, &fwd, -1);
}

void
client_request(struct server *s, size_t ci)
{
	struct client *c = &s->clients[ci];
	struct p11a_msg m;
	const uint8_t *body = p11a_buf_ptr(c->in.body);
	size_t len = p11a_buf_len(c->in.body);
	uint8_t type = body[0];
	int r = p11a_msg_decode(body, len, &m);
	p11a_frame_in_reset(&c->in);
	if (r == -P11A_E_UNKNOWN_TYPE) {
		send_error(s, ci, P11A_E_UNKNOWN_TYPE, "unknown message type 0x%02x", type);
		return;
	}
	if (r != 0) {
		log_warn("client %d (pid %ld): malformed message type 0x%02x: %s; dropping the connection",
			 c->fd, (long)c->pid, type, p11a_strerror(r));
		client_close(s, ci);
		return;
	}
	if (!c->hello_done && m.type != P11A_MSG_HELLO) {
		send_error(s, ci, P11A_E_PROTOCOL, "the first request must be HELLO");
		p11a_msg_clear(&m);
		return;
	}
	switch (m.type) {
	case P11A_MSG_LIST:
	case P11A_MSG_UNLOCK:
	case P11A_MSG_LOCK:
	case P11A_MSG_OPEN_CHANNEL:
	case P11A_MSG_SIGN:
	case P11A_MSG_UNLOCK_PROMPT:
	case P11A_MSG_CONFIRM:
	case P11A_MSG_CONTEXT_PIN:
		/*
		 * These need the inventory: right after start-up (or a helper
		 * restart) wait for the helpers to report rather than answer
		 * "no token".  The PIN of a parked UNLOCK stays in the fixed
		 * array of the decoded message.
		 */
		if (helpers_starting(s, p11a_now_ms())) {
			c->parked = m;
			c->has_parked = 1;
			log_debug("client %d: request 0x%02x waits for token helpers to start",
				  c->fd, m.type);
			return;
		}
		break;
	default:
		break;
	}
	client_dispatch(s, ci, &m);
}

void
client_dispatch(struct server *s, size_t ci, struct p11a_msg *req)
{
	struct p11a_msg m = *req;
	const char *bad;
	memset(req, 0, sizeof(*req));
	if ((bad = p11a_msg_bad_text(&m)) != NULL) {
		send_error(s, ci, P11A_E_BAD_REQUEST, "the %s is not valid UTF-8", bad);
		p11a_msg_clear(&m);
		return;
	}
	switch (m.type) {
	case P11A_MSG_HELLO:
		handle_hello(s, ci, &m.u.hello);
		break;
	case P11A_MSG_STATUS:
		handle_list(s, ci, 0);
		break;
	case P11A_MSG_HEALTH:
		if (s->clients[ci].version < 2)
			send_error(s, ci, P11A_E_UNKNOWN_TYPE,
				   "message type 0x%02x needs protocol version 2", m.type);
		else
			handle_health(s, ci);
		break;
	case P11A_MSG_LIST:
		handle_list(s, ci, 1);
		break;
	case P11A_MSG_LOG:
		if (s->clients[ci].version < 3)
			send_error(s, ci, P11A_E_UNKNOWN_TYPE,
				   "message type 0x%02x needs protocol version 3", m.type);
		else
			handle_log(s, ci, &m.u.log);
		break;
	case P11A_MSG_UNLOCK:
		handle_unlock(s, ci, &m);
		break;
	case P11A_MSG_LOCK:
		handle_lock(s, ci, &m);
		break;
	case P11A_MSG_OPEN_CHANNEL:
		handle_open_channel(s, ci, &m.u.open_channel);
		break;
	case P11A_MSG_UNLOCK_PROMPT:
	case P11A_MSG_CONFIRM:
	case P11A_MSG_CONTEXT_PIN:
	case P11A_MSG_UPDATE_ENV:
		if (s->clients[ci].version < 3)
			send_error(s, ci, P11A_E_UNKNOWN_TYPE,
				   "message type 0x%02x needs protocol version 3", m.type);
		else if (m.type == P11A_MSG_UNLOCK_PROMPT)
			handle_unlock_prompt(s, ci, m.u.prompt.uri ? m.u.prompt.uri : "");
		else if (m.type == P11A_MSG_CONFIRM)
			handle_confirm(s, ci, m.u.prompt.uri ? m.u.prompt.uri : "");
		else if (m.type == P11A_MSG_CONTEXT_PIN)
			handle_context_pin(s, ci, m.u.prompt.uri ? m.u.prompt.uri : "");
		else
			handle_update_env(s, ci, &m.u.env);
		break;
	case P11A_MSG_SIGN:
		handle_sign(s, ci, &m.u.sign);
		break;
	default:
		send_error(s, ci, P11A_E_PROTOCOL, "message type 0x%02x is not a request", m.type);
		break;
	}
	p11a_msg_clear(&m);  /* wipes an UNLOCK's PIN */
}

/* Dispatches parked requests once no helper is still starting. */
void
clients_unpark(struct server *s, int64_t now)
{
	if (helpers_starting(s, now))
		return;
	for (size_t i = 0; i < s->nclients; i++) {
		struct client *c = &s->clients[i];
		if (c->fd >= 0 && c->has_parked) {
			c->has_parked = 0;
			client_dispatch(s, i, &c->parked);
		}
	}
}
