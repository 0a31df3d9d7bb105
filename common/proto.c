/*
 * The p11agent wire protocol codec and frame I/O (docs/protocol.md).
 */
#include "config.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "p11a.h"
#include "buf.h"
#include "proto.h"

/* Smallest encodings of list items: every string empty. */
#define TOKEN_MIN_WIRE	(6 * 4 + 4)
#define KEY_MIN_WIRE	(4 * 4 + 1 + 4 + 4 * 5 + 4)
#define MODULE_MIN_WIRE	(4 + 4 + 1 + 4 + 4 + 4)
#define TEXT_MIN_WIRE	4
#define EVENT_MIN_WIRE	(8 + 1 + 4 + 1 + 1 + 4 + 4 + 4 + 1 + 4 + 4 + 8 + 4 + 4)

/* ------------------------------------------------------------ encoding */

static int
put_text(struct p11a_buf *b, const char *s, size_t max)
{
	size_t n = s == NULL ? 0 : strlen(s);

	if (n > max)
		return -P11A_E_TOO_LARGE;
	return p11a_buf_put_string(b, s, n);
}

static int
put_bytes(struct p11a_buf *b, const uint8_t *p, size_t n, size_t max)
{
	if (n > max)
		return -P11A_E_TOO_LARGE;
	if (n != 0 && p == NULL)
		return -P11A_E_INTERNAL;
	return p11a_buf_put_string(b, p, n);
}

static int
put_token(struct p11a_buf *b, const struct p11a_token *t)
{
	int r;

	if ((r = put_text(b, t->uri, P11A_URI_MAX)) != 0 ||
	    (r = put_text(b, t->label, P11A_TEXT_MAX)) != 0 ||
	    (r = put_text(b, t->manufacturer, P11A_TEXT_MAX)) != 0 ||
	    (r = put_text(b, t->model, P11A_TEXT_MAX)) != 0 ||
	    (r = put_text(b, t->serial, P11A_TEXT_MAX)) != 0 ||
	    (r = put_text(b, t->module, P11A_TEXT_MAX)) != 0 ||
	    (r = p11a_buf_put_u32(b, t->flags)) != 0)
		return r;
	return 0;
}

static int
put_key(struct p11a_buf *b, const struct p11a_key *k)
{
	int r;

	if ((r = put_text(b, k->uri, P11A_URI_MAX)) != 0 ||
	    (r = put_text(b, k->token_uri, P11A_URI_MAX)) != 0 ||
	    (r = put_text(b, k->label, P11A_TEXT_MAX)) != 0 ||
	    (r = put_bytes(b, k->id, k->id_len, P11A_FRAME_MAX)) != 0 ||
	    (r = p11a_buf_put_u8(b, k->type)) != 0 ||
	    (r = p11a_buf_put_u32(b, k->bits)) != 0 ||
	    (r = put_text(b, k->curve, P11A_TEXT_MAX)) != 0 ||
	    (r = put_bytes(b, k->spki, k->spki_len, P11A_FRAME_MAX)) != 0 ||
	    (r = put_bytes(b, k->cert, k->cert_len, P11A_FRAME_MAX)) != 0 ||
	    (r = put_text(b, k->cert_uri, P11A_URI_MAX)) != 0 ||
	    (r = put_text(b, k->cert_label, P11A_TEXT_MAX)) != 0 ||
	    (r = p11a_buf_put_u32(b, k->flags)) != 0)
		return r;
	return 0;
}

static int
put_tokens(struct p11a_buf *b, uint32_t n, const struct p11a_token *tokens)
{
	uint32_t i;
	int r;

	if (n > P11A_LIST_MAX)
		return -P11A_E_TOO_LARGE;
	if (n != 0 && tokens == NULL)
		return -P11A_E_INTERNAL;
	if ((r = p11a_buf_put_u32(b, n)) != 0)
		return r;
	for (i = 0; i < n; i++) {
		if ((r = put_token(b, &tokens[i])) != 0)
			return r;
	}
	return 0;
}

static int
put_keys(struct p11a_buf *b, uint32_t n, const struct p11a_key *keys)
{
	uint32_t i;
	int r;

	if (n > P11A_LIST_MAX)
		return -P11A_E_TOO_LARGE;
	if (n != 0 && keys == NULL)
		return -P11A_E_INTERNAL;
	if ((r = p11a_buf_put_u32(b, n)) != 0)
		return r;
	for (i = 0; i < n; i++) {
		if ((r = put_key(b, &keys[i])) != 0)
			return r;
	}
	return 0;
}

static int
put_health(struct p11a_buf *b, const struct p11a_health_reply *h)
{
	uint32_t i;
	int r;

	if (h->nmodules > P11A_LIST_MAX || h->nrecent > P11A_LIST_MAX)
		return -P11A_E_TOO_LARGE;
	if ((h->nmodules != 0 && h->modules == NULL) || (h->nrecent != 0 && h->recent == NULL))
		return -P11A_E_INTERNAL;
	if ((r = p11a_buf_put_u32(b, h->nmodules)) != 0)
		return r;
	for (i = 0; i < h->nmodules; i++) {
		const struct p11a_module_health *m = &h->modules[i];
		if ((r = put_text(b, m->name, P11A_TEXT_MAX)) != 0 ||
		    (r = put_text(b, m->path, P11A_TEXT_MAX)) != 0 ||
		    (r = p11a_buf_put_u8(b, m->state)) != 0 ||
		    (r = p11a_buf_put_u32(b, m->restarts)) != 0 ||
		    (r = p11a_buf_put_u32(b, m->error_time)) != 0 ||
		    (r = put_text(b, m->error, P11A_TEXT_MAX)) != 0)
			return r;
	}
	if ((r = p11a_buf_put_u32(b, h->nrecent)) != 0)
		return r;
	for (i = 0; i < h->nrecent; i++)
		if ((r = put_text(b, h->recent[i], P11A_TEXT_MAX)) != 0)
			return r;
	return 0;
}

static int
put_event(struct p11a_buf *b, const struct p11a_event *e)
{
	int r;

	if (e->kind == 0 || e->kind > P11A_EV_KIND_MAX || e->content > P11A_CONTENT_MAX)
		return -P11A_E_INTERNAL;
	if ((r = p11a_buf_put_u64(b, e->time_us)) != 0 ||
	    (r = p11a_buf_put_u8(b, e->kind)) != 0 ||
	    (r = put_text(b, e->uri, P11A_URI_MAX)) != 0 ||
	    (r = p11a_buf_put_u8(b, e->scheme)) != 0 ||
	    (r = p11a_buf_put_u8(b, e->content)) != 0 ||
	    (r = p11a_buf_put_u32(b, e->pid)) != 0 ||
	    (r = p11a_buf_put_u32(b, e->uid)) != 0 ||
	    (r = put_text(b, e->exe, P11A_TEXT_MAX)) != 0 ||
	    (r = p11a_buf_put_u8(b, e->flags)) != 0 ||
	    (r = p11a_buf_put_u32(b, e->result)) != 0 ||
	    (r = put_text(b, e->message, P11A_TEXT_MAX)) != 0 ||
	    (r = p11a_buf_put_u64(b, e->duration_us)) != 0 ||
	    (r = put_text(b, e->reason, P11A_TEXT_MAX)) != 0 ||
	    (r = p11a_buf_put_u32(b, e->count)) != 0)
		return r;
	return 0;
}

static int
put_sign(struct p11a_buf *b, const struct p11a_sign *sg)
{
	int r;

	if ((r = put_text(b, sg->key_uri, P11A_URI_MAX)) != 0 ||
	    (r = p11a_buf_put_u8(b, sg->scheme)) != 0 ||
	    (r = p11a_buf_put_u8(b, sg->hash)) != 0 ||
	    (r = p11a_buf_put_u8(b, sg->mgf1_hash)) != 0 ||
	    (r = p11a_buf_put_u8(b, sg->input)) != 0 ||
	    (r = p11a_buf_put_u32(b, sg->salt_len)) != 0 ||
	    (r = put_bytes(b, sg->data, sg->data_len, P11A_FRAME_MAX)) != 0)
		return r;
	return 0;
}

static int
put_events(struct p11a_buf *b, const struct p11a_events *ev, int with_dropped)
{
	int r;

	if (ev->n > P11A_LIST_MAX)
		return -P11A_E_TOO_LARGE;
	if (ev->n != 0 && ev->ev == NULL)
		return -P11A_E_INTERNAL;
	if (with_dropped && (r = p11a_buf_put_u32(b, ev->dropped)) != 0)
		return r;
	if ((r = p11a_buf_put_u32(b, ev->n)) != 0)
		return r;
	for (uint32_t i = 0; i < ev->n; i++)
		if ((r = put_event(b, &ev->ev[i])) != 0)
			return r;
	return 0;
}

static size_t
text_wire(const char *s)
{
	return 4 + (s != NULL ? strlen(s) : 0);
}

size_t
p11a_event_wire_size(const struct p11a_event *e)
{
	return EVENT_MIN_WIRE - 4 * 4 + text_wire(e->uri) + text_wire(e->exe) +
	    text_wire(e->message) + text_wire(e->reason);
}

static int
encode_fields(const struct p11a_msg *m, struct p11a_buf *b)
{
	int r;

	if ((r = p11a_buf_put_u8(b, m->type)) != 0)
		return r;
	switch (m->type) {
	case P11A_MSG_STATUS:
	case P11A_MSG_LIST:
	case P11A_MSG_HEALTH:
	case P11A_MSG_H_REFRESH:
	case P11A_MSG_OK:
	case P11A_MSG_CHANNEL:
		return 0;
	case P11A_MSG_H_ADOPT:
		if ((r = p11a_buf_put_u64(b, m->u.adopt.conn)) != 0)
			return r;
		if ((r = p11a_buf_put_u32(b, m->u.adopt.pid)) != 0)
			return r;
		if (m->u.adopt.exe != NULL && m->u.adopt.exe[0] != '\0' && m->u.adopt.exe[0] != '/')
			return -P11A_E_INTERNAL;
		return put_text(b, m->u.adopt.exe, P11A_TEXT_MAX);
	case P11A_MSG_HELLO:
		if ((r = p11a_buf_put_u16(b, m->u.hello.min_version)) != 0 ||
		    (r = p11a_buf_put_u16(b, m->u.hello.max_version)) != 0 ||
		    (r = put_text(b, m->u.hello.client, P11A_TEXT_MAX)) != 0)
			return r;
		return 0;
	case P11A_MSG_UNLOCK:
		if (m->u.unlock.pin_len > P11A_PIN_MAX)
			return -P11A_E_TOO_LARGE;
		if ((r = put_text(b, m->u.unlock.token_uri, P11A_URI_MAX)) != 0 ||
		    (r = p11a_buf_put_string(b, m->u.unlock.pin, m->u.unlock.pin_len)) != 0)
			return r;
		return 0;
	case P11A_MSG_LOCK:
		return put_text(b, m->u.lock.token_uri, P11A_URI_MAX);
	case P11A_MSG_OPEN_CHANNEL:
		return put_text(b, m->u.open_channel.key_uri, P11A_URI_MAX);
	case P11A_MSG_UNLOCK_PROMPT:
	case P11A_MSG_CONFIRM:
	case P11A_MSG_CONTEXT_PIN:
		return put_text(b, m->u.prompt.uri, P11A_URI_MAX);
	case P11A_MSG_UPDATE_ENV:
		if (m->u.env.n > P11A_ENV_MAX)
			return -P11A_E_TOO_LARGE;
		if ((r = p11a_buf_put_u32(b, m->u.env.n)) != 0)
			return r;
		for (uint32_t i = 0; i < m->u.env.n; i++) {
			if (m->u.env.env[i] == NULL || strchr(m->u.env.env[i], '=') == NULL)
				return -P11A_E_MALFORMED;
			if ((r = put_text(b, m->u.env.env[i], P11A_TEXT_MAX)) != 0)
				return r;
		}
		return 0;
	case P11A_MSG_H_GRANT:
		if ((r = p11a_buf_put_u64(b, m->u.grant.conn)) != 0)
			return r;
		return put_text(b, m->u.grant.key_uri, P11A_URI_MAX);
	case P11A_MSG_H_CONTEXT_PIN:
		if (m->u.ctx_pin.pin_len > P11A_PIN_MAX)
			return -P11A_E_TOO_LARGE;
		if ((r = p11a_buf_put_u64(b, m->u.ctx_pin.conn)) != 0 ||
		    (r = put_text(b, m->u.ctx_pin.key_uri, P11A_URI_MAX)) != 0)
			return r;
		return p11a_buf_put_string(b, m->u.ctx_pin.pin, m->u.ctx_pin.pin_len);
	case P11A_MSG_SIGN:
		return put_sign(b, &m->u.sign);
	case P11A_MSG_H_SIGN:
		if ((r = p11a_buf_put_u64(b, m->u.hsign.conn)) != 0 ||
		    (r = p11a_buf_put_u32(b, m->u.hsign.pid)) != 0)
			return r;
		if (m->u.hsign.exe != NULL && m->u.hsign.exe[0] != '\0' && m->u.hsign.exe[0] != '/')
			return -P11A_E_INTERNAL;
		if ((m->u.hsign.flags & ~P11A_HSIGN_FORWARDED) != 0)
			return -P11A_E_INTERNAL;
		if ((r = put_text(b, m->u.hsign.exe, P11A_TEXT_MAX)) != 0 ||
		    (r = p11a_buf_put_u8(b, m->u.hsign.flags)) != 0)
			return r;
		return put_sign(b, &m->u.hsign.sign);
	case P11A_MSG_ERROR:
		if (m->u.error.code == 0)
			return -P11A_E_INTERNAL;
		if ((r = p11a_buf_put_u32(b, m->u.error.code)) != 0 ||
		    (r = put_text(b, m->u.error.message, P11A_TEXT_MAX)) != 0)
			return r;
		return 0;
	case P11A_MSG_HELLO_REPLY:
		if ((r = p11a_buf_put_u16(b, m->u.hello_reply.version)) != 0 ||
		    (r = put_text(b, m->u.hello_reply.agent, P11A_TEXT_MAX)) != 0)
			return r;
		return 0;
	case P11A_MSG_STATUS_REPLY:
		if ((r = put_text(b, m->u.status.agent, P11A_TEXT_MAX)) != 0 ||
		    (r = p11a_buf_put_u32(b, m->u.status.pid)) != 0 ||
		    (r = p11a_buf_put_u32(b, m->u.status.modules)) != 0 ||
		    (r = p11a_buf_put_u32(b, m->u.status.modules_up)) != 0 ||
		    (r = p11a_buf_put_u32(b, m->u.status.connections)) != 0 ||
		    (r = put_tokens(b, m->u.status.ntokens, m->u.status.tokens)) != 0)
			return r;
		return 0;
	case P11A_MSG_HEALTH_REPLY:
		return put_health(b, &m->u.health);
	case P11A_MSG_LIST_REPLY:
	case P11A_MSG_H_INVENTORY:
		if ((r = put_tokens(b, m->u.list.ntokens, m->u.list.tokens)) != 0 ||
		    (r = put_keys(b, m->u.list.nkeys, m->u.list.keys)) != 0)
			return r;
		return 0;
	case P11A_MSG_SIGNATURE:
		return put_bytes(b, m->u.signature.sig, m->u.signature.sig_len, P11A_SIG_MAX);
	case P11A_MSG_LOG:
		if ((r = p11a_buf_put_u64(b, m->u.log.since_us)) != 0 ||
		    (r = p11a_buf_put_u32(b, m->u.log.max)) != 0)
			return r;
		return 0;
	case P11A_MSG_LOG_REPLY:
		return put_events(b, &m->u.events, 0);
	case P11A_MSG_H_EVENT:
		return put_events(b, &m->u.events, 1);
	default:
		return -P11A_E_UNKNOWN_TYPE;
	}
}

/* Appends m to out; body_max bounds what this call adds. */
static int
encode_bounded(const struct p11a_msg *m, struct p11a_buf *out, size_t body_max)
{
	size_t start = p11a_buf_len(out);
	int r;

	r = encode_fields(m, out);
	if (r == 0 && p11a_buf_len(out) - start > body_max)
		r = -P11A_E_TOO_LARGE;
	if (r != 0)
		(void)p11a_buf_unreserve(out, p11a_buf_len(out) - start); /* also wipes */
	return r;
}

int
p11a_msg_encode(const struct p11a_msg *m, struct p11a_buf *out)
{
	return encode_bounded(m, out, P11A_FRAME_MAX);
}

int
p11a_msg_encode_internal(uint32_t id, const struct p11a_msg *m, struct p11a_buf *out)
{
	size_t start = p11a_buf_len(out);
	int r;

	if ((r = p11a_buf_put_u32(out, id)) != 0)
		return r;
	if ((r = encode_bounded(m, out, P11A_FRAME_MAX - 4)) != 0)
		(void)p11a_buf_unreserve(out, p11a_buf_len(out) - start);
	return r;
}

/* ------------------------------------------------------------ decoding */

static int
get_bytes(struct p11a_buf *b, uint8_t **p, size_t *n, size_t max)
{
	return p11a_buf_get_string_dup(b, p, n, max);
}

static int
get_token(struct p11a_buf *b, struct p11a_token *t)
{
	int r;

	if ((r = p11a_buf_get_cstring(b, &t->uri, P11A_URI_MAX)) != 0 ||
	    (r = p11a_buf_get_cstring(b, &t->label, P11A_TEXT_MAX)) != 0 ||
	    (r = p11a_buf_get_cstring(b, &t->manufacturer, P11A_TEXT_MAX)) != 0 ||
	    (r = p11a_buf_get_cstring(b, &t->model, P11A_TEXT_MAX)) != 0 ||
	    (r = p11a_buf_get_cstring(b, &t->serial, P11A_TEXT_MAX)) != 0 ||
	    (r = p11a_buf_get_cstring(b, &t->module, P11A_TEXT_MAX)) != 0 ||
	    (r = p11a_buf_get_u32(b, &t->flags)) != 0)
		return r;
	return 0;
}

static int
get_key(struct p11a_buf *b, struct p11a_key *k)
{
	int r;

	if ((r = p11a_buf_get_cstring(b, &k->uri, P11A_URI_MAX)) != 0 ||
	    (r = p11a_buf_get_cstring(b, &k->token_uri, P11A_URI_MAX)) != 0 ||
	    (r = p11a_buf_get_cstring(b, &k->label, P11A_TEXT_MAX)) != 0 ||
	    (r = get_bytes(b, &k->id, &k->id_len, P11A_FRAME_MAX)) != 0 ||
	    (r = p11a_buf_get_u8(b, &k->type)) != 0 ||
	    (r = p11a_buf_get_u32(b, &k->bits)) != 0 ||
	    (r = p11a_buf_get_cstring(b, &k->curve, P11A_TEXT_MAX)) != 0 ||
	    (r = get_bytes(b, &k->spki, &k->spki_len, P11A_FRAME_MAX)) != 0 ||
	    (r = get_bytes(b, &k->cert, &k->cert_len, P11A_FRAME_MAX)) != 0 ||
	    (r = p11a_buf_get_cstring(b, &k->cert_uri, P11A_URI_MAX)) != 0 ||
	    (r = p11a_buf_get_cstring(b, &k->cert_label, P11A_TEXT_MAX)) != 0 ||
	    (r = p11a_buf_get_u32(b, &k->flags)) != 0)
		return r;
	return 0;
}

/*
 * Reads a list count and allocates its items.  The count is checked
 * against the limit and against the bytes left before anything is
 * allocated, so a forged count cannot make us allocate much.
 */
static int
get_count(struct p11a_buf *b, uint32_t *n, size_t item_min)
{
	int r;

	*n = 0;
	if ((r = p11a_buf_get_u32(b, n)) != 0)
		return r;
	if (*n > P11A_LIST_MAX) {
		*n = 0;
		return -P11A_E_TOO_LARGE;
	}
	if (p11a_buf_len(b) / item_min < *n) {
		*n = 0;
		return -P11A_E_TRUNCATED;
	}
	return 0;
}

static int
get_tokens(struct p11a_buf *b, uint32_t *np, struct p11a_token **out)
{
	uint32_t n, i;
	int r;

	if ((r = get_count(b, &n, TOKEN_MIN_WIRE)) != 0)
		return r;
	if (n == 0)
		return 0;
	if ((*out = calloc(n, sizeof(**out))) == NULL)
		return -P11A_E_NOMEM;
	*np = n;    /* from here on, clear() frees whatever was decoded */
	for (i = 0; i < n; i++) {
		if ((r = get_token(b, &(*out)[i])) != 0)
			return r;
	}
	return 0;
}

static int
get_keys(struct p11a_buf *b, uint32_t *np, struct p11a_key **out)
{
	uint32_t n, i;
	int r;

	if ((r = get_count(b, &n, KEY_MIN_WIRE)) != 0)
		return r;
	if (n == 0)
		return 0;
	if ((*out = calloc(n, sizeof(**out))) == NULL)
		return -P11A_E_NOMEM;
	*np = n;
	for (i = 0; i < n; i++) {
		if ((r = get_key(b, &(*out)[i])) != 0)
			return r;
	}
	return 0;
}

static int
get_health(struct p11a_buf *b, struct p11a_health_reply *h)
{
	uint32_t n, i;
	int r;

	if ((r = get_count(b, &n, MODULE_MIN_WIRE)) != 0)
		return r;
	if (n != 0) {
		if ((h->modules = calloc(n, sizeof(*h->modules))) == NULL)
			return -P11A_E_NOMEM;
		h->nmodules = n;    /* from here on, clear() frees whatever was decoded */
		for (i = 0; i < n; i++) {
			struct p11a_module_health *m = &h->modules[i];
			if ((r = p11a_buf_get_cstring(b, &m->name, P11A_TEXT_MAX)) != 0 ||
			    (r = p11a_buf_get_cstring(b, &m->path, P11A_TEXT_MAX)) != 0 ||
			    (r = p11a_buf_get_u8(b, &m->state)) != 0 ||
			    (r = p11a_buf_get_u32(b, &m->restarts)) != 0 ||
			    (r = p11a_buf_get_u32(b, &m->error_time)) != 0 ||
			    (r = p11a_buf_get_cstring(b, &m->error, P11A_TEXT_MAX)) != 0)
				return r;
		}
	}
	if ((r = get_count(b, &n, TEXT_MIN_WIRE)) != 0)
		return r;
	if (n == 0)
		return 0;
	if ((h->recent = calloc(n, sizeof(*h->recent))) == NULL)
		return -P11A_E_NOMEM;
	h->nrecent = n;
	for (i = 0; i < n; i++)
		if ((r = p11a_buf_get_cstring(b, &h->recent[i], P11A_TEXT_MAX)) != 0)
			return r;
	return 0;
}

static int
get_event(struct p11a_buf *b, struct p11a_event *e)
{
	int r;

	if ((r = p11a_buf_get_u64(b, &e->time_us)) != 0 ||
	    (r = p11a_buf_get_u8(b, &e->kind)) != 0 ||
	    (r = p11a_buf_get_cstring(b, &e->uri, P11A_URI_MAX)) != 0 ||
	    (r = p11a_buf_get_u8(b, &e->scheme)) != 0 ||
	    (r = p11a_buf_get_u8(b, &e->content)) != 0 ||
	    (r = p11a_buf_get_u32(b, &e->pid)) != 0 ||
	    (r = p11a_buf_get_u32(b, &e->uid)) != 0 ||
	    (r = p11a_buf_get_cstring(b, &e->exe, P11A_TEXT_MAX)) != 0 ||
	    (r = p11a_buf_get_u8(b, &e->flags)) != 0 ||
	    (r = p11a_buf_get_u32(b, &e->result)) != 0 ||
	    (r = p11a_buf_get_cstring(b, &e->message, P11A_TEXT_MAX)) != 0 ||
	    (r = p11a_buf_get_u64(b, &e->duration_us)) != 0 ||
	    (r = p11a_buf_get_cstring(b, &e->reason, P11A_TEXT_MAX)) != 0 ||
	    (r = p11a_buf_get_u32(b, &e->count)) != 0)
		return r;
	if (e->kind == 0 || e->kind > P11A_EV_KIND_MAX || e->content > P11A_CONTENT_MAX)
		return -P11A_E_MALFORMED;
	return 0;
}

static int
get_events(struct p11a_buf *b, struct p11a_events *ev, int with_dropped)
{
	uint32_t n, i;
	int r;

	if (with_dropped && (r = p11a_buf_get_u32(b, &ev->dropped)) != 0)
		return r;
	if ((r = get_count(b, &n, EVENT_MIN_WIRE)) != 0)
		return r;
	if (n == 0)
		return 0;
	if ((ev->ev = calloc(n, sizeof(*ev->ev))) == NULL)
		return -P11A_E_NOMEM;
	ev->n = n;    /* from here on, clear() frees whatever was decoded */
	for (i = 0; i < n; i++)
		if ((r = get_event(b, &ev->ev[i])) != 0)
			return r;
	return 0;
}

static int
get_sign(struct p11a_buf *b, struct p11a_sign *sg)
{
	int r;

	if ((r = p11a_buf_get_cstring(b, &sg->key_uri, P11A_URI_MAX)) != 0 ||
	    (r = p11a_buf_get_u8(b, &sg->scheme)) != 0 ||
	    (r = p11a_buf_get_u8(b, &sg->hash)) != 0 ||
	    (r = p11a_buf_get_u8(b, &sg->mgf1_hash)) != 0 ||
	    (r = p11a_buf_get_u8(b, &sg->input)) != 0 ||
	    (r = p11a_buf_get_u32(b, &sg->salt_len)) != 0 ||
	    (r = get_bytes(b, &sg->data, &sg->data_len, P11A_FRAME_MAX)) != 0)
		return r;
	return 0;
}

static int
decode_fields(struct p11a_buf *b, struct p11a_msg *m)
{
	const uint8_t *pin;
	size_t pin_len;
	int r;

	switch (m->type) {
	case P11A_MSG_STATUS:
	case P11A_MSG_LIST:
	case P11A_MSG_HEALTH:
	case P11A_MSG_H_REFRESH:
	case P11A_MSG_OK:
	case P11A_MSG_CHANNEL:
		return 0;
	case P11A_MSG_HEALTH_REPLY:
		return get_health(b, &m->u.health);
	case P11A_MSG_H_ADOPT:
		if ((r = p11a_buf_get_u64(b, &m->u.adopt.conn)) != 0)
			return r;
		if ((r = p11a_buf_get_u32(b, &m->u.adopt.pid)) != 0 ||
		    (r = p11a_buf_get_cstring(b, &m->u.adopt.exe, P11A_TEXT_MAX)) != 0)
			return r;
		/* An executable's path is absolute; "" = unknown. */
		if (m->u.adopt.exe[0] != '\0' && m->u.adopt.exe[0] != '/')
			return -P11A_E_MALFORMED;
		return 0;
	case P11A_MSG_HELLO:
		if ((r = p11a_buf_get_u16(b, &m->u.hello.min_version)) != 0 ||
		    (r = p11a_buf_get_u16(b, &m->u.hello.max_version)) != 0 ||
		    (r = p11a_buf_get_cstring(b, &m->u.hello.client, P11A_TEXT_MAX)) != 0)
			return r;
		return 0;
	case P11A_MSG_UNLOCK:
		if ((r = p11a_buf_get_cstring(b, &m->u.unlock.token_uri, P11A_URI_MAX)) != 0)
			return r;
		/* Straight into the fixed array: no heap copy of the PIN. */
		if ((r = p11a_buf_get_string_direct(b, &pin, &pin_len, P11A_PIN_MAX)) != 0)
			return r;
		if (pin_len != 0)
			memcpy(m->u.unlock.pin, pin, pin_len);
		m->u.unlock.pin[pin_len] = '\0';
		m->u.unlock.pin_len = pin_len;
		return 0;
	case P11A_MSG_LOCK:
		return p11a_buf_get_cstring(b, &m->u.lock.token_uri, P11A_URI_MAX);
	case P11A_MSG_OPEN_CHANNEL:
		return p11a_buf_get_cstring(b, &m->u.open_channel.key_uri, P11A_URI_MAX);
	case P11A_MSG_UNLOCK_PROMPT:
	case P11A_MSG_CONFIRM:
	case P11A_MSG_CONTEXT_PIN:
		return p11a_buf_get_cstring(b, &m->u.prompt.uri, P11A_URI_MAX);
	case P11A_MSG_UPDATE_ENV: {
		uint32_t n;

		if ((r = p11a_buf_get_u32(b, &n)) != 0)
			return r;
		if (n > P11A_ENV_MAX)
			return -P11A_E_TOO_LARGE;
		if (n == 0)
			return 0;
		if ((m->u.env.env = calloc(n, sizeof(*m->u.env.env))) == NULL)
			return -P11A_E_NOMEM;
		for (uint32_t i = 0; i < n; i++) {
			if ((r = p11a_buf_get_cstring(b, &m->u.env.env[i], P11A_TEXT_MAX)) != 0)
				return r;
			m->u.env.n = i + 1;
			/* NAME=value, NAME not empty */
			if (strchr(m->u.env.env[i], '=') == NULL || m->u.env.env[i][0] == '=')
				return -P11A_E_MALFORMED;
		}
		return 0;
	}
	case P11A_MSG_H_GRANT:
		if ((r = p11a_buf_get_u64(b, &m->u.grant.conn)) != 0)
			return r;
		return p11a_buf_get_cstring(b, &m->u.grant.key_uri, P11A_URI_MAX);
	case P11A_MSG_H_CONTEXT_PIN:
		if ((r = p11a_buf_get_u64(b, &m->u.ctx_pin.conn)) != 0 ||
		    (r = p11a_buf_get_cstring(b, &m->u.ctx_pin.key_uri, P11A_URI_MAX)) != 0)
			return r;
		/* Straight into the fixed array: no heap copy of the PIN. */
		if ((r = p11a_buf_get_string_direct(b, &pin, &pin_len, P11A_PIN_MAX)) != 0)
			return r;
		if (pin_len != 0)
			memcpy(m->u.ctx_pin.pin, pin, pin_len);
		m->u.ctx_pin.pin[pin_len] = '\0';
		m->u.ctx_pin.pin_len = pin_len;
		return 0;
	case P11A_MSG_SIGN:
		return get_sign(b, &m->u.sign);
	case P11A_MSG_H_SIGN:
		if ((r = p11a_buf_get_u64(b, &m->u.hsign.conn)) != 0 ||
		    (r = p11a_buf_get_u32(b, &m->u.hsign.pid)) != 0 ||
		    (r = p11a_buf_get_cstring(b, &m->u.hsign.exe, P11A_TEXT_MAX)) != 0 ||
		    (r = p11a_buf_get_u8(b, &m->u.hsign.flags)) != 0)
			return r;
		if (m->u.hsign.exe[0] != '\0' && m->u.hsign.exe[0] != '/')
			return -P11A_E_MALFORMED;
		if ((m->u.hsign.flags & ~P11A_HSIGN_FORWARDED) != 0)
			return -P11A_E_MALFORMED;
		return get_sign(b, &m->u.hsign.sign);
	case P11A_MSG_ERROR:
		if ((r = p11a_buf_get_u32(b, &m->u.error.code)) != 0)
			return r;
		/* Code 0 would read as success to whoever maps it to -code. */
		if (m->u.error.code == 0)
			return -P11A_E_MALFORMED;
		return p11a_buf_get_cstring(b, &m->u.error.message, P11A_TEXT_MAX);
	case P11A_MSG_HELLO_REPLY:
		if ((r = p11a_buf_get_u16(b, &m->u.hello_reply.version)) != 0 ||
		    (r = p11a_buf_get_cstring(b, &m->u.hello_reply.agent, P11A_TEXT_MAX)) != 0)
			return r;
		return 0;
	case P11A_MSG_STATUS_REPLY:
		if ((r = p11a_buf_get_cstring(b, &m->u.status.agent, P11A_TEXT_MAX)) != 0 ||
		    (r = p11a_buf_get_u32(b, &m->u.status.pid)) != 0 ||
		    (r = p11a_buf_get_u32(b, &m->u.status.modules)) != 0 ||
		    (r = p11a_buf_get_u32(b, &m->u.status.modules_up)) != 0 ||
		    (r = p11a_buf_get_u32(b, &m->u.status.connections)) != 0 ||
		    (r = get_tokens(b, &m->u.status.ntokens, &m->u.status.tokens)) != 0)
			return r;
		return 0;
	case P11A_MSG_LIST_REPLY:
	case P11A_MSG_H_INVENTORY:
		if ((r = get_tokens(b, &m->u.list.ntokens, &m->u.list.tokens)) != 0 ||
		    (r = get_keys(b, &m->u.list.nkeys, &m->u.list.keys)) != 0)
			return r;
		return 0;
	case P11A_MSG_SIGNATURE:
		return get_bytes(b, &m->u.signature.sig, &m->u.signature.sig_len, P11A_SIG_MAX);
	case P11A_MSG_LOG:
		if ((r = p11a_buf_get_u64(b, &m->u.log.since_us)) != 0 ||
		    (r = p11a_buf_get_u32(b, &m->u.log.max)) != 0)
			return r;
		return 0;
	case P11A_MSG_LOG_REPLY:
		return get_events(b, &m->u.events, 0);
	case P11A_MSG_H_EVENT:
		return get_events(b, &m->u.events, 1);
	default:
		return -P11A_E_UNKNOWN_TYPE;
	}
}

int
p11a_msg_decode(const uint8_t *body, size_t len, struct p11a_msg *m)
{
	struct p11a_buf *b = NULL;
	int r;

	memset(m, 0, sizeof(*m));
	if (len == 0 || body == NULL)
		return -P11A_E_TRUNCATED;
	if (len > P11A_FRAME_MAX)
		return -P11A_E_TOO_LARGE;
	if ((b = p11a_buf_from(body, len)) == NULL)
		return -P11A_E_NOMEM;
	if ((r = p11a_buf_get_u8(b, &m->type)) != 0)
		goto out;
	if ((r = decode_fields(b, m)) != 0)
		goto out;
	if (p11a_buf_len(b) != 0)
		r = -P11A_E_MALFORMED;
 out:
	/* The copy may hold a PIN; free() wipes it. */
	p11a_buf_free(b);
	if (r != 0)
		p11a_msg_clear(m);
	return r;
}

int
p11a_msg_decode_internal(const uint8_t *body, size_t len, uint32_t *id, struct p11a_msg *m)
{
	*id = 0;
	memset(m, 0, sizeof(*m));
	if (body == NULL || len < 4)
		return -P11A_E_TRUNCATED;
	/* The id is returned even when the body fails, so the helper can answer it. */
	*id = ((uint32_t)body[0] << 24) | ((uint32_t)body[1] << 16) |
	    ((uint32_t)body[2] << 8) | (uint32_t)body[3];
	return p11a_msg_decode(body + 4, len - 4, m);
}

/* ------------------------------------------------------------ ownership */

void
p11a_token_clear(struct p11a_token *t)
{
	if (t == NULL)
		return;
	free(t->uri);
	free(t->label);
	free(t->manufacturer);
	free(t->model);
	free(t->serial);
	free(t->module);
	memset(t, 0, sizeof(*t));
}

void
p11a_key_clear(struct p11a_key *k)
{
	if (k == NULL)
		return;
	free(k->uri);
	free(k->token_uri);
	free(k->label);
	free(k->id);
	free(k->curve);
	free(k->spki);
	free(k->cert);
	free(k->cert_uri);
	free(k->cert_label);
	memset(k, 0, sizeof(*k));
}

static void
tokens_free(struct p11a_token *t, uint32_t n)
{
	uint32_t i;

	if (t == NULL)
		return;
	for (i = 0; i < n; i++)
		p11a_token_clear(&t[i]);
	free(t);
}

static void
keys_free(struct p11a_key *k, uint32_t n)
{
	uint32_t i;

	if (k == NULL)
		return;
	for (i = 0; i < n; i++)
		p11a_key_clear(&k[i]);
	free(k);
}

void
p11a_list_reply_clear(struct p11a_list_reply *l)
{
	if (l == NULL)
		return;
	tokens_free(l->tokens, l->ntokens);
	keys_free(l->keys, l->nkeys);
	memset(l, 0, sizeof(*l));
}

void
p11a_event_clear(struct p11a_event *e)
{
	if (e == NULL)
		return;
	free(e->uri);
	free(e->exe);
	free(e->message);
	free(e->reason);
	memset(e, 0, sizeof(*e));
}

const char *
p11a_event_kind_name(uint8_t kind)
{
	static const char *const names[] = { NULL, "sign", "unlock", "lock", "refused",
					     "pin-dialog", "confirm", "dropped" };

	return kind <= P11A_EV_KIND_MAX ? names[kind] : NULL;
}

void
p11a_msg_clear(struct p11a_msg *m)
{
	if (m == NULL)
		return;
	switch (m->type) {
	case P11A_MSG_HELLO:
		free(m->u.hello.client);
		break;
	case P11A_MSG_HELLO_REPLY:
		free(m->u.hello_reply.agent);
		break;
	case P11A_MSG_ERROR:
		free(m->u.error.message);
		break;
	case P11A_MSG_STATUS_REPLY:
		free(m->u.status.agent);
		tokens_free(m->u.status.tokens, m->u.status.ntokens);
		break;
	case P11A_MSG_HEALTH_REPLY:
		for (uint32_t i = 0; i < m->u.health.nmodules; i++) {
			free(m->u.health.modules[i].name);
			free(m->u.health.modules[i].path);
			free(m->u.health.modules[i].error);
		}
		free(m->u.health.modules);
		for (uint32_t i = 0; i < m->u.health.nrecent; i++)
			free(m->u.health.recent[i]);
		free(m->u.health.recent);
		break;
	case P11A_MSG_LIST_REPLY:
	case P11A_MSG_H_INVENTORY:
		p11a_list_reply_clear(&m->u.list);
		break;
	case P11A_MSG_UNLOCK:
		free(m->u.unlock.token_uri);
		break;
	case P11A_MSG_LOCK:
		free(m->u.lock.token_uri);
		break;
	case P11A_MSG_OPEN_CHANNEL:
		free(m->u.open_channel.key_uri);
		break;
	case P11A_MSG_H_ADOPT:
		free(m->u.adopt.exe);
		break;
	case P11A_MSG_UNLOCK_PROMPT:
	case P11A_MSG_CONFIRM:
	case P11A_MSG_CONTEXT_PIN:
		free(m->u.prompt.uri);
		break;
	case P11A_MSG_UPDATE_ENV:
		for (uint32_t i = 0; i < m->u.env.n; i++)
			free(m->u.env.env[i]);
		free(m->u.env.env);
		break;
	case P11A_MSG_H_GRANT:
		free(m->u.grant.key_uri);
		break;
	case P11A_MSG_H_CONTEXT_PIN:
		free(m->u.ctx_pin.key_uri);
		break;
	case P11A_MSG_SIGN:
		free(m->u.sign.key_uri);
		free(m->u.sign.data);
		break;
	case P11A_MSG_H_SIGN:
		free(m->u.hsign.exe);
		free(m->u.hsign.sign.key_uri);
		free(m->u.hsign.sign.data);
		break;
	case P11A_MSG_SIGNATURE:
		free(m->u.signature.sig);
		break;
	case P11A_MSG_LOG_REPLY:
	case P11A_MSG_H_EVENT:
		for (uint32_t i = 0; i < m->u.events.n; i++)
			p11a_event_clear(&m->u.events.ev[i]);
		free(m->u.events.ev);
		break;
	default:
		break;
	}
	/* Wipes the PIN array (and zeroes everything else). */
	p11a_wipe(m, sizeof(*m));
}

int
p11a_utf8_valid(const char *s)
{
	const unsigned char *p = (const unsigned char *)s;

	while (*p != 0) {
		unsigned c = *p, n, i;
		uint32_t cp;

		if (c < 0x80) {
			p++;
			continue;
		}
		if (c >= 0xC2 && c <= 0xDF) {
			n = 1;
			cp = c & 0x1F;
		} else if (c >= 0xE0 && c <= 0xEF) {
			n = 2;
			cp = c & 0x0F;
		} else if (c >= 0xF0 && c <= 0xF4) {
			n = 3;
			cp = c & 0x07;
		} else {
			return 0;       /* a continuation byte first, C0/C1, or over U+10FFFF */
		}
		for (i = 1; i <= n; i++) {
			if ((p[i] & 0xC0) != 0x80)
				return 0;       /* cut short (the NUL ends up here too) */
			cp = cp << 6 | (p[i] & 0x3F);
		}
		if ((n == 2 && cp < 0x800) || (n == 3 && (cp < 0x10000 || cp > 0x10FFFF)) ||
		    (cp >= 0xD800 && cp <= 0xDFFF))
			return 0;       /* overlong, out of range, or a surrogate */
		p += n + 1;
	}
	return 1;
}

const char *
p11a_msg_bad_text(const struct p11a_msg *m)
{
	const char *s = NULL, *what = NULL;

	switch (m->type) {
	case P11A_MSG_HELLO:
		s = m->u.hello.client;
		what = "client name";
		break;
	case P11A_MSG_UNLOCK:
		s = m->u.unlock.token_uri;
		what = "token URI";
		break;
	case P11A_MSG_LOCK:
		s = m->u.lock.token_uri;
		what = "token URI";
		break;
	case P11A_MSG_OPEN_CHANNEL:
		s = m->u.open_channel.key_uri;
		what = "key URI";
		break;
	case P11A_MSG_SIGN:
		s = m->u.sign.key_uri;
		what = "key URI";
		break;
	case P11A_MSG_H_SIGN:
		s = m->u.hsign.sign.key_uri;
		what = "key URI";
		break;
	case P11A_MSG_UNLOCK_PROMPT:
	case P11A_MSG_CONFIRM:
	case P11A_MSG_CONTEXT_PIN:
		s = m->u.prompt.uri;
		what = "URI";
		break;
	case P11A_MSG_UPDATE_ENV:
		for (uint32_t i = 0; i < m->u.env.n; i++)
			if (!p11a_utf8_valid(m->u.env.env[i]))
				return "environment";
		break;
	default:
		break;
	}
	return s != NULL && !p11a_utf8_valid(s) ? what : NULL;
}

/* Cuts s to at most max bytes without splitting a UTF-8 sequence. */
static void
utf8_truncate(char *s, size_t max)
{
	size_t n = strlen(s);

	if (n <= max)
		return;
	n = max;
	while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80)
		n--;
	s[n] = '\0';
}

int
p11a_msg_set_error_v(struct p11a_msg *m, int code, const char *fmt, va_list ap)
{
	unsigned int c = code < 0 ? 0u - (unsigned int)code : (unsigned int)code;
	char *text = NULL;

	memset(m, 0, sizeof(*m));
	if (c == 0)
		c = P11A_E_INTERNAL;
	if (fmt != NULL && *fmt != '\0' && vasprintf(&text, fmt, ap) < 0)
		return -P11A_E_NOMEM;
	/* No text, or text that came out empty: the code's own. */
	if (text == NULL || *text == '\0') {
		free(text);
		text = strdup(p11a_strerror((int)c));
	}
	if (text == NULL)
		return -P11A_E_NOMEM;
	utf8_truncate(text, P11A_TEXT_MAX);
	m->type = P11A_MSG_ERROR;
	m->u.error.code = c;
	m->u.error.message = text;
	return 0;
}

int
p11a_msg_set_error(struct p11a_msg *m, int code, const char *fmt, ...)
{
	va_list ap;
	int r;

	va_start(ap, fmt);
	r = p11a_msg_set_error_v(m, code, fmt, ap);
	va_end(ap);
	return r;
}

static char *
dup_text(const char *s, int *failed)
{
	char *d;

	if (s == NULL)
		return NULL;
	if ((d = strdup(s)) == NULL)
		*failed = 1;
	return d;
}

static uint8_t *
dup_bytes(const uint8_t *p, size_t n, int *failed)
{
	uint8_t *d;

	if (p == NULL)
		return NULL;
	if ((d = malloc(n == 0 ? 1 : n)) == NULL) {
		*failed = 1;
		return NULL;
	}
	if (n != 0)
		memcpy(d, p, n);
	return d;
}

int
p11a_event_copy(struct p11a_event *dst, const struct p11a_event *src)
{
	int failed = 0;

	*dst = *src;
	dst->uri = dup_text(src->uri != NULL ? src->uri : "", &failed);
	dst->exe = dup_text(src->exe != NULL ? src->exe : "", &failed);
	dst->message = dup_text(src->message != NULL ? src->message : "", &failed);
	dst->reason = dup_text(src->reason != NULL ? src->reason : "", &failed);
	if (failed) {
		p11a_event_clear(dst);
		return -P11A_E_NOMEM;
	}
	return 0;
}

int
p11a_token_copy(struct p11a_token *dst, const struct p11a_token *src)
{
	int failed = 0;

	memset(dst, 0, sizeof(*dst));
	dst->uri = dup_text(src->uri, &failed);
	dst->label = dup_text(src->label, &failed);
	dst->manufacturer = dup_text(src->manufacturer, &failed);
	dst->model = dup_text(src->model, &failed);
	dst->serial = dup_text(src->serial, &failed);
	dst->module = dup_text(src->module, &failed);
	dst->flags = src->flags;
	if (failed) {
		p11a_token_clear(dst);
		return -P11A_E_NOMEM;
	}
	return 0;
}

int
p11a_key_copy(struct p11a_key *dst, const struct p11a_key *src)
{
	int failed = 0;

	memset(dst, 0, sizeof(*dst));
	dst->uri = dup_text(src->uri != NULL ? src->uri : "", &failed);
	dst->token_uri = dup_text(src->token_uri, &failed);
	dst->label = dup_text(src->label, &failed);
	dst->id = dup_bytes(src->id, src->id_len, &failed);
	dst->id_len = dst->id != NULL ? src->id_len : 0;
	dst->type = src->type;
	dst->bits = src->bits;
	dst->curve = dup_text(src->curve, &failed);
	dst->spki = dup_bytes(src->spki, src->spki_len, &failed);
	dst->spki_len = dst->spki != NULL ? src->spki_len : 0;
	dst->cert = dup_bytes(src->cert, src->cert_len, &failed);
	dst->cert_len = dst->cert != NULL ? src->cert_len : 0;
	dst->cert_uri = dup_text(src->cert_uri, &failed);
	dst->cert_label = dup_text(src->cert_label, &failed);
	dst->flags = src->flags;
	if (failed) {
		p11a_key_clear(dst);
		return -P11A_E_NOMEM;
	}
	return 0;
}

/* ------------------------------------------------------------ frame I/O */

#define FD_PASS_MAX 8   /* descriptors we take per recvmsg; extras are closed */

static int64_t
deadline_from(int timeout_ms)
{
	return timeout_ms < 0 ? -1 : p11a_now_ms() + timeout_ms;
}

/* Waits until fd is ready for events or the deadline (-1: none) passes. */
static int
wait_fd(int fd, short events, int64_t deadline)
{
	struct pollfd pfd;
	int64_t left;
	int n;

	for (;;) {
		if (deadline < 0) {
			left = -1;
		} else {
			left = deadline - p11a_now_ms();
			if (left < 0)
				left = 0;
		}
		pfd.fd = fd;
		pfd.events = events;
		pfd.revents = 0;
		n = poll(&pfd, 1, left > INT32_MAX ? INT32_MAX : (int)left);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -P11A_E_IO;
		}
		if (n == 0) {
			if (deadline >= 0 && p11a_now_ms() >= deadline) {
				errno = ETIMEDOUT;
				return -P11A_E_TIMEOUT;
			}
			continue;
		}
		if (pfd.revents & POLLNVAL) {
			errno = EBADF;
			return -P11A_E_IO;
		}
		/* POLLHUP/POLLERR: the next send/recv reports what happened. */
		return 0;
	}
}

int
p11a_frame_write(int fd, const struct p11a_buf *body, int fd_to_pass, int timeout_ms)
{
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(sizeof(int))];
	} cm;
	size_t len = p11a_buf_len(body);
	size_t total = 4 + len, done = 0, off;
	int64_t deadline = deadline_from(timeout_ms);
	uint8_t hdr[4];
	struct iovec iov[2];
	struct msghdr mh;
	struct cmsghdr *cmsg;
	ssize_t n;
	int r;

	if (len == 0)
		return -P11A_E_MALFORMED;
	if (len > P11A_FRAME_MAX)
		return -P11A_E_TOO_LARGE;
	p11a_frame_hdr_put(hdr, (uint32_t)len);

	while (done < total) {
		memset(&mh, 0, sizeof(mh));
		if (done < 4) {
			iov[0].iov_base = hdr + done;
			iov[0].iov_len = 4 - done;
			iov[1].iov_base = (void *)p11a_buf_ptr(body);
			iov[1].iov_len = len;
			mh.msg_iovlen = 2;
		} else {
			off = done - 4;
			iov[0].iov_base = (void *)(p11a_buf_ptr(body) + off);
			iov[0].iov_len = len - off;
			mh.msg_iovlen = 1;
		}
		mh.msg_iov = iov;
		/* The descriptor rides on the first byte, i.e. the first send. */
		if (done == 0 && fd_to_pass >= 0) {
			memset(&cm, 0, sizeof(cm));
			mh.msg_control = cm.buf;
			mh.msg_controllen = sizeof(cm.buf);
			cmsg = CMSG_FIRSTHDR(&mh);
			cmsg->cmsg_level = SOL_SOCKET;
			cmsg->cmsg_type = SCM_RIGHTS;
			cmsg->cmsg_len = CMSG_LEN(sizeof(int));
			memcpy(CMSG_DATA(cmsg), &fd_to_pass, sizeof(int));
		}
		n = sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK) {
				if ((r = wait_fd(fd, POLLOUT, deadline)) != 0)
					return r;
				continue;
			}
			return -P11A_E_IO;
		}
		done += (size_t)n;
	}
	return 0;
}

/* Calls each(arg, fd) for every descriptor that came in mh (SCM_RIGHTS). */
static void
cmsg_each_fd(struct msghdr *mh, void (*each)(void *arg, int fd), void *arg)
{
	struct cmsghdr *cmsg;
	size_t i, nfds;
	int fd;

	for (cmsg = CMSG_FIRSTHDR(mh); cmsg != NULL; cmsg = CMSG_NXTHDR(mh, cmsg)) {
		if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS ||
		    cmsg->cmsg_len < CMSG_LEN(0))
			continue;
		nfds = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (i = 0; i < nfds; i++) {
			memcpy(&fd, CMSG_DATA(cmsg) + i * sizeof(int), sizeof(int));
			each(arg, fd);
		}
	}
}

/* A blocking read is the non-blocking framing layer plus poll(). */
int
p11a_frame_read(int fd, struct p11a_buf *out, int *fd_received, int timeout_ms)
{
	int64_t deadline = deadline_from(timeout_ms);
	struct p11a_frame_in in;
	int r;

	if (fd_received != NULL)
		*fd_received = -1;
	p11a_buf_reset(out);
	p11a_frame_in_init(&in, out, fd_received != NULL ? P11A_FRAME_IN_FDS : 0);
	while ((r = p11a_frame_in_recv(&in, fd)) == 0) {
		if ((r = wait_fd(fd, POLLIN, deadline)) != 0)
			break;
	}
	if (r == 1) {
		if (fd_received != NULL) {
			*fd_received = in.fd;
			in.fd = -1;
		}
		return 0;
	}
	{
		int saved = errno;

		p11a_frame_in_reset(&in);
		errno = saved;
	}
	return r;
}

/* ------------------------------------------------------------ buffered reader */

struct held_fd {
	uint64_t at;        /* stream offset of a byte of the frame it came with */
	int fd;
};

struct p11a_reader {
	int fd;
	unsigned flags;             /* P11A_READER_* */
	uint64_t pos;               /* stream offset of buf[off] */
	size_t off, len;            /* buffered bytes: buf[off .. off + len) */
	size_t nheld;
	struct held_fd held[FD_PASS_MAX];
	uint8_t buf[P11A_READER_SIZE];
};

struct p11a_reader *
p11a_reader_new(int fd, unsigned flags)
{
	struct p11a_reader *rd;

	if ((rd = calloc(1, sizeof(*rd))) == NULL)
		return NULL;
	rd->fd = fd;
	rd->flags = flags;
	return rd;
}

/* Forgets everything buffered (wiped) and closes every held descriptor. */
static void
reader_clear(struct p11a_reader *rd)
{
	while (rd->nheld > 0)
		p11a_close_keep_errno(rd->held[--rd->nheld].fd);
	p11a_wipe(rd->buf, sizeof(rd->buf));
	rd->pos += rd->len;
	rd->off = 0;
	rd->len = 0;
}

void
p11a_reader_free(struct p11a_reader *rd)
{
	if (rd == NULL)
		return;
	reader_clear(rd);
	p11a_wipe(rd, sizeof(*rd));
	free(rd);
}

size_t
p11a_reader_pending(const struct p11a_reader *rd)
{
	return rd->len;
}

static void
reader_consume(struct p11a_reader *rd, size_t n)
{
	p11a_wipe(rd->buf + rd->off, n);
	rd->off += n;
	rd->len -= n;
	rd->pos += n;
	if (rd->len == 0)
		rd->off = 0;
}

struct hold_at {
	struct p11a_reader *rd;
	uint64_t at;
};

static void
hold_fd(void *arg, int fd)
{
	struct hold_at *h = arg;
	struct p11a_reader *rd = h->rd;

	if (rd->nheld < FD_PASS_MAX) {
		rd->held[rd->nheld].at = h->at;
		rd->held[rd->nheld].fd = fd;
		rd->nheld++;
	} else {
		p11a_close_keep_errno(fd);
	}
}

/* Holds the descriptors that came with the byte at stream offset at. */
static void
reader_hold_fds(struct p11a_reader *rd, struct msghdr *mh, uint64_t at)
{
	struct hold_at h = { rd, at };

	cmsg_each_fd(mh, hold_fd, &h);
}

/*
 * The frame that ended at stream offset end is complete: the first of its
 * descriptors goes to *keep (when keep is not NULL), the others are
 * closed; later frames' descriptors stay held.
 */
static void
reader_claim_fds(struct p11a_reader *rd, uint64_t end, int *keep)
{
	size_t i, j = 0;

	for (i = 0; i < rd->nheld; i++) {
		if (rd->held[i].at >= end)
			rd->held[j++] = rd->held[i];
		else if (keep != NULL && *keep < 0)
			*keep = rd->held[i].fd;
		else
			p11a_close_keep_errno(rd->held[i].fd);
	}
	rd->nheld = j;
}

/*
 * Waits for data with poll(), then takes what is there with one
 * non-blocking recvmsg() into iov, the first byte landing at stream offset
 * at.  Returns the byte count (0 at EOF) or a negative error.
 *
 * Not a blocking recvmsg(): on a Unix stream socket a reader blocked there
 * is also woken each time the peer consumes what this side sent (the
 * write-space wake-up is not filtered by event), which on a request/reply
 * channel is most replies; poll(POLLIN) sleeps through those.  Measured:
 * 1.15-1.3 wake-ups and ~5 us more CPU per round trip on each side with a
 * blocking recvmsg(), exactly 1 with poll() + recvmsg().
 *
 * Descriptors: Linux ends a stream recvmsg() right after the data of a
 * message that carried descriptors, and p11a_frame_write() sends them
 * with a frame's first bytes, so descriptors belong to the frame holding
 * the last byte this call returns.
 */
static ssize_t
reader_recv(struct p11a_reader *rd, struct iovec *iov, size_t iovcnt, uint64_t at,
	    int64_t deadline)
{
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(FD_PASS_MAX * sizeof(int))];
	} cm;
	struct msghdr mh;
	ssize_t k;
	int flags, r;

	for (;;) {
		if ((r = wait_fd(rd->fd, POLLIN, deadline)) != 0)
			return r;
		memset(&mh, 0, sizeof(mh));
		mh.msg_iov = iov;
		mh.msg_iovlen = iovcnt;
		flags = MSG_DONTWAIT;
		if (rd->flags & P11A_READER_FDS) {
			mh.msg_control = cm.buf;
			mh.msg_controllen = sizeof(cm.buf);
			flags |= MSG_CMSG_CLOEXEC;
		}
		k = recvmsg(rd->fd, &mh, flags);
		if (k < 0) {
			if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)
				continue;
			return -P11A_E_IO;
		}
		if (mh.msg_controllen > 0)
			reader_hold_fds(rd, &mh, at + (k > 0 ? (uint64_t)k - 1 : 0));
		return k;
	}
}

static int64_t
frame_deadline(int64_t deadline, int frame_ms)
{
	int64_t d;

	if (frame_ms < 0)
		return deadline;
	d = p11a_now_ms() + frame_ms;
	return deadline < 0 || d < deadline ? d : deadline;
}

int
p11a_reader_read(struct p11a_reader *rd, struct p11a_buf *out, int *fd_received,
		 int timeout_ms, int frame_ms)
{
	int64_t deadline = deadline_from(timeout_ms);
	struct p11a_frame_in in;
	uint8_t *p;
	size_t used, want, n, niov;
	struct iovec iov[2];
	ssize_t k;
	int started = rd->len > 0, r;

	if (fd_received != NULL)
		*fd_received = -1;
	p11a_buf_reset(out);
	/* The parse is the framing layer's; this reader only brings the bytes. */
	p11a_frame_in_init(&in, out, 0);
	if (started)
		deadline = frame_deadline(deadline, frame_ms);
	for (;;) {
		if (rd->len > 0) {
			/* Refused at the header, before a byte of the body goes to out. */
			r = p11a_frame_in_feed(&in, rd->buf + rd->off, rd->len, &used);
			reader_consume(rd, used);
			if (r < 0)
				goto fail;
			if (r == 1)
				break;
		}
		/*
		 * More is needed and the buffer is empty: the rest of the body
		 * goes straight to out, what follows it to the buffer.
		 */
		niov = 0;
		if ((want = p11a_frame_in_space(&in, &p)) > 0) {
			iov[niov].iov_base = p;
			iov[niov++].iov_len = want;
		}
		iov[niov].iov_base = rd->buf;
		iov[niov++].iov_len = sizeof(rd->buf);
		k = reader_recv(rd, iov, niov, rd->pos, deadline);
		if (k < 0) {
			r = (int)k;
			goto fail;
		}
		if (k == 0) {
			r = p11a_frame_eof(started);
			goto fail;
		}
		if (!started) {
			started = 1;
			deadline = frame_deadline(deadline, frame_ms);
		}
		n = (size_t)k < want ? (size_t)k : want;
		if (n > 0 && p11a_frame_in_advance(&in, n) == 1 && (size_t)k == n) {
			rd->pos += n;
			break;
		}
		rd->pos += n;
		rd->off = 0;
		rd->len = (size_t)k - n;
	}
	reader_claim_fds(rd, rd->pos, fd_received);
	return 0;
 fail:
	{
		int saved = errno;

		in.body = NULL;         /* out is the caller's: reset below, not freed */
		p11a_frame_in_reset(&in);
		p11a_buf_reset(out);
		reader_clear(rd);
		errno = saved;
	}
	return r;
}
