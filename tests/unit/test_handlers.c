/*
 * The agent's request handlers (agent/handlers.c) against a made-up
 * inventory, with the connection and helper I/O (server.c, supervise.c)
 * replaced by recorders: LOCK and UNLOCK over many tokens (no cap: the
 * agent used to stop at 256), the forwarded request's exact URI, the one
 * reply a client gets after every helper answered.
 */
#include "config.h"
#include "server_int.h"
#include "audit.h"
#include "log.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

/* ------------------------------------------------------------ recorders */

struct sent {
	size_t helper;
	uint32_t id;
	uint8_t type;
	char uri[128];
	size_t pin_len;
};

static struct sent *fwd;
static size_t nfwd, cfwd;
static int replies, last_reply_type, last_error_code;
static uint32_t log_n;                  /* LOG_REPLY: events, the last one's uri and reason */
static char log_last_uri[64], log_last_reason[32];

void
send_msg(struct server *s, size_t ci, const struct p11a_msg *m, int fd_to_pass)
{
	(void)s;
	(void)ci;
	if (fd_to_pass >= 0)
		close(fd_to_pass);
	replies++;
	last_reply_type = m->type;
	last_error_code = m->type == P11A_MSG_ERROR ? (int)m->u.error.code : 0;
	if (m->type == P11A_MSG_LOG_REPLY) {
		const struct p11a_event *e = m->u.events.n ? &m->u.events.ev[m->u.events.n - 1] : NULL;
		log_n = m->u.events.n;
		/* Its last characters: the URIs may be long. */
		snprintf(log_last_uri, sizeof(log_last_uri), "%s", e == NULL ? "" :
			 e->uri + (strlen(e->uri) > 60 ? strlen(e->uri) - 60 : 0));
		snprintf(log_last_reason, sizeof(log_last_reason), "%s", e ? e->reason : "");
		for (uint32_t i = 1; i < m->u.events.n; i++)    /* oldest first */
			assert_true(m->u.events.ev[i - 1].time_us <= m->u.events.ev[i].time_us);
	}
}

void
helper_send(struct server *s, size_t hi, uint32_t id, const struct p11a_msg *m, int fd_to_pass)
{
	(void)s;
	if (fd_to_pass >= 0)
		close(fd_to_pass);
	if (nfwd == cfwd) {
		cfwd = cfwd ? cfwd * 2 : 64;
		fwd = realloc(fwd, cfwd * sizeof(*fwd));
		assert_non_null(fwd);
	}
	struct sent *f = &fwd[nfwd++];
	memset(f, 0, sizeof(*f));
	f->helper = hi;
	f->id = id;
	f->type = m->type;
	const char *u = m->type == P11A_MSG_UNLOCK ? m->u.unlock.token_uri : m->u.lock.token_uri;
	snprintf(f->uri, sizeof(f->uri), "%s", u ? u : "(null)");
	if (m->type == P11A_MSG_UNLOCK)
		f->pin_len = m->u.unlock.pin_len;
}

int
helpers_starting(const struct server *s, int64_t now)
{
	(void)s;
	(void)now;
	return 0;
}

void
client_close(struct server *s, size_t ci)
{
	s->clients[ci].fd = -1;
}

/* ------------------------------------------------------------ fixture */

static struct agent_config cfg;
static struct module_conf mods[2];

/* n tokens over two helpers (even on helper 0, odd on helper 1); login_needed: flags. */
static void
server_make(struct server *s, size_t n, int login_needed)
{
	memset(s, 0, sizeof(*s));
	memset(&cfg, 0, sizeof(cfg));
	cfg.sign_timeout_ms = 1000;
	mods[0].name = (char *)"mod-a";
	mods[1].name = (char *)"mod-b";
	s->cfg = &cfg;
	s->nhelpers = 2;
	s->helpers = calloc(2, sizeof(*s->helpers));
	assert_non_null(s->helpers);
	for (size_t h = 0; h < 2; h++) {
		s->helpers[h].mod = &mods[h];
		s->helpers[h].fd = -1;
		s->helpers[h].up = 1;
		s->helpers[h].inv.tokens = calloc(n, sizeof(struct p11a_token));
		assert_non_null(s->helpers[h].inv.tokens);
	}
	for (size_t i = 0; i < n; i++) {
		struct p11a_list_reply *inv = &s->helpers[i % 2].inv;
		struct p11a_token *t = &inv->tokens[inv->ntokens++];
		char label[32], uri[64];
		snprintf(label, sizeof(label), "tok%zu", i);
		snprintf(uri, sizeof(uri), "pkcs11:token=tok%zu", i);
		t->label = strdup(label);
		t->uri = strdup(uri);
		t->manufacturer = strdup("m");
		t->model = strdup("m");
		t->serial = strdup(label);
		t->module = strdup(mods[i % 2].name);
		t->flags = P11A_TOKEN_PRESENT | (login_needed ? P11A_TOKEN_LOGIN_REQUIRED : P11A_TOKEN_LOGGED_IN);
	}
	s->nclients = s->cclients = 1;
	s->clients = calloc(1, sizeof(*s->clients));
	assert_non_null(s->clients);
	s->clients[0].fd = 100;          /* never used for I/O: send_msg is recorded */
	s->clients[0].serial = 1;
	s->clients[0].hello_done = 1;
	s->clients[0].version = 2;
	s->clients[0].reply_fd = -1;
	nfwd = 0;
	replies = 0;
	last_reply_type = 0;
	last_error_code = 0;
}

static void
server_free(struct server *s)
{
	pending_free_all(s);
	for (size_t h = 0; h < s->nhelpers; h++)
		p11a_list_reply_clear(&s->helpers[h].inv);
	free(s->helpers);
	free(s->clients[0].wait_error_msg);
	free(s->clients);
}

static void
dispatch_lock(struct server *s, const char *uri)
{
	struct p11a_msg m = { .type = P11A_MSG_LOCK };
	m.u.lock.token_uri = strdup(uri);
	client_dispatch(s, 0, &m);
}

static void
dispatch_unlock(struct server *s, const char *uri)
{
	struct p11a_msg m = { .type = P11A_MSG_UNLOCK };
	m.u.unlock.token_uri = strdup(uri);
	memcpy(m.u.unlock.pin, "1234", 4);
	m.u.unlock.pin_len = 4;
	client_dispatch(s, 0, &m);
}

static void
helpers_answer_ok(struct server *s)
{
	struct p11a_msg ok = { .type = P11A_MSG_OK };
	for (size_t i = 0; i < nfwd; i++)
		pending_reply(s, fwd[i].helper, fwd[i].id, &ok);
}

/* ------------------------------------------------------------ tests */

static void
test_lock_all_past_256(void **state)
{
	struct server s;
	(void)state;

	server_make(&s, 300, 0);
	dispatch_lock(&s, "");
	assert_int_equal(nfwd, 300);           /* every token, none dropped */
	assert_int_equal(s.npending, 300);
	assert_int_equal(s.clients[0].waiting, 300);
	assert_int_equal(replies, 0);          /* answered once all helpers did */
	size_t per[2] = { 0, 0 };
	for (size_t i = 0; i < nfwd; i++) {
		assert_int_equal(fwd[i].type, P11A_MSG_LOCK);
		per[fwd[i].helper]++;
	}
	assert_int_equal(per[0], 150);
	assert_int_equal(per[1], 150);
	/* The last token's exact URI went to its own helper. */
	int seen = 0;
	for (size_t i = 0; i < nfwd; i++)
		if (strcmp(fwd[i].uri, "pkcs11:token=tok299") == 0) {
			assert_int_equal(fwd[i].helper, 1);
			seen = 1;
		}
	assert_true(seen);
	helpers_answer_ok(&s);
	assert_int_equal(replies, 1);
	assert_int_equal(last_reply_type, P11A_MSG_OK);
	assert_int_equal(s.npending, 0);
	server_free(&s);
}

static void
test_unlock_named_past_256(void **state)
{
	struct server s;
	(void)state;

	server_make(&s, 300, 1);
	dispatch_unlock(&s, "pkcs11:token=tok290");
	assert_int_equal(nfwd, 1);
	assert_int_equal(fwd[0].type, P11A_MSG_UNLOCK);
	assert_int_equal(fwd[0].helper, 0);
	/* Forwarded with the token's exact URI (its own copy, not a borrowed pointer). */
	assert_string_equal(fwd[0].uri, "pkcs11:token=tok290");
	assert_int_equal(fwd[0].pin_len, 4);
	helpers_answer_ok(&s);
	assert_int_equal(replies, 1);
	assert_int_equal(last_reply_type, P11A_MSG_OK);
	server_free(&s);
}

static void
test_unlock_ambiguous_and_missing(void **state)
{
	struct server s;
	(void)state;

	server_make(&s, 300, 1);
	dispatch_unlock(&s, "");              /* 300 tokens need a PIN */
	assert_int_equal(nfwd, 0);
	assert_int_equal(last_reply_type, P11A_MSG_ERROR);
	assert_int_equal(last_error_code, P11A_E_AMBIGUOUS);
	dispatch_unlock(&s, "pkcs11:token=nope");
	assert_int_equal(last_error_code, P11A_E_NO_SUCH_TOKEN);
	dispatch_lock(&s, "pkcs11:token=nope");
	assert_int_equal(last_error_code, P11A_E_NO_SUCH_TOKEN);
	dispatch_lock(&s, "not-a-uri");
	assert_int_equal(last_error_code, P11A_E_URI);
	assert_int_equal(nfwd, 0);
	server_free(&s);

	server_make(&s, 3, 0);
	dispatch_unlock(&s, "");              /* all logged in: OK at once */
	assert_int_equal(nfwd, 0);
	assert_int_equal(last_reply_type, P11A_MSG_OK);
	server_free(&s);
}

static void
test_find_tokens(void **state)
{
	struct server s;
	struct token_ref *refs;
	(void)state;

	server_make(&s, 600, 0);
	assert_int_equal(find_tokens(&s, "", &refs), 600);
	assert_non_null(refs);
	assert_string_equal(refs[599].token->label, "tok599");
	free(refs);
	assert_int_equal(find_tokens(&s, "pkcs11:token=tok577", &refs), 1);
	assert_int_equal(refs[0].helper, 1);
	free(refs);
	assert_int_equal(find_tokens(&s, "pkcs11:token=none", &refs), 0);
	assert_null(refs);
	assert_true(find_tokens(&s, "http://x", &refs) < 0);
	assert_null(refs);
	server_free(&s);
}

/* A helper's error reaches the client with its text; an empty text gets the code's. */
static const struct p11a_event *
ring_last(size_t back)
{
	const struct p11a_event **v = calloc(audit_len() + 1, sizeof(*v));
	const struct p11a_event *e;
	size_t n;

	assert_non_null(v);
	n = audit_select(0, 0, v);
	assert_true(n > back);
	e = v[n - 1 - back];
	free(v);
	return e;
}

static void
dispatch_log(struct server *s, uint64_t since, uint32_t max)
{
	struct p11a_msg m = { .type = P11A_MSG_LOG };
	m.u.log.since_us = since;
	m.u.log.max = max;
	client_dispatch(s, 0, &m);
}

/* UNLOCK and LOCK outcomes and lock-all become audit events; LOG needs version 3 and fits a frame. */
static void
test_audit_events_and_log(void **state)
{
	struct server s;
	struct p11a_msg err;
	const struct p11a_event *e;
	char uri[4100];
	(void)state;

	server_make(&s, 2, 1);
	cfg.audit = CONF_AUDIT_NONE;
	cfg.audit_ring = 200;
	assert_int_equal(audit_init(&cfg), 0);
	s.uid = 1000;
	s.clients[0].pid = 4242;
	s.clients[0].uid = 1000;
	s.clients[0].exe = (char *)"/usr/bin/example";

	dispatch_unlock(&s, "pkcs11:token=tok0");
	assert_int_equal(nfwd, 1);
	assert_int_equal(p11a_msg_set_error(&err, P11A_E_PIN_INCORRECT, "PIN incorrect"), 0);
	pending_reply(&s, fwd[0].helper, fwd[0].id, &err);
	p11a_msg_clear(&err);
	e = ring_last(0);
	assert_int_equal(e->kind, P11A_EV_UNLOCK);
	assert_int_equal(e->result, P11A_E_PIN_INCORRECT);
	assert_string_equal(e->message, "PIN incorrect");
	assert_string_equal(e->uri, "pkcs11:token=tok0");
	assert_int_equal(e->pid, 4242);
	assert_int_equal(e->uid, 1000);
	assert_string_equal(e->exe, "/usr/bin/example");

	nfwd = 0;
	dispatch_lock(&s, "");
	helpers_answer_ok(&s);
	assert_int_equal(ring_last(0)->kind, P11A_EV_LOCK);
	assert_string_equal(ring_last(0)->reason, "request");
	assert_int_equal(ring_last(0)->result, 0);
	assert_int_equal(ring_last(1)->kind, P11A_EV_LOCK);

	s.helpers[0].fd = s.helpers[1].fd = 99;    /* running: lock-all sends them LOCK */
	tokens_lock_all(&s, "PrepareForSleep");
	assert_string_equal(ring_last(0)->reason, "suspend");
	assert_int_equal(ring_last(0)->pid, 0);
	tokens_lock_all(&s, "session 3 locked");
	assert_string_equal(ring_last(0)->reason, "screen-lock");
	tokens_lock_all(&s, "SIGHUP");
	assert_string_equal(ring_last(0)->reason, "SIGHUP");
	s.helpers[0].fd = s.helpers[1].fd = -1;

	/* Version 2: LOG is an unknown type there. */
	replies = 0;
	dispatch_log(&s, 0, 0);
	assert_int_equal(last_reply_type, P11A_MSG_ERROR);
	assert_int_equal(last_error_code, P11A_E_UNKNOWN_TYPE);
	s.clients[0].version = 3;
	dispatch_log(&s, 0, 0);
	assert_int_equal(last_reply_type, P11A_MSG_LOG_REPLY);
	assert_int_equal(log_n, 6);
	assert_string_equal(log_last_reason, "SIGHUP");
	dispatch_log(&s, 0, 2);
	assert_int_equal(log_n, 2);
	dispatch_log(&s, ring_last(0)->time_us + 1, 0);
	assert_int_equal(log_n, 0);

	/* 100 events of 4 KiB URIs do not fit one frame: the newest do. */
	for (int i = 0; i < 100; i++) {
		memset(uri, 'a', sizeof(uri));
		snprintf(uri + 4000, 20, "%03d", i);
		audit_note(P11A_EV_SIGN, uri, 1, 1000, "/usr/bin/x", 0, NULL, NULL, 5);
	}
	dispatch_log(&s, 0, 0);
	assert_int_equal(last_reply_type, P11A_MSG_LOG_REPLY);
	assert_true(log_n > 0 && log_n < 100);
	assert_true(log_n * 4000 < P11A_FRAME_MAX);
	assert_string_equal(log_last_uri + strlen(log_last_uri) - 3, "099");
	audit_free();
	server_free(&s);
}

static void
test_error_reply(void **state)
{
	struct server s;
	struct p11a_msg err;
	(void)state;

	server_make(&s, 2, 0);
	dispatch_lock(&s, "");
	assert_int_equal(nfwd, 2);
	struct p11a_msg ok = { .type = P11A_MSG_OK };
	assert_int_equal(p11a_msg_set_error(&err, P11A_E_TOKEN, "%s", ""), 0);
	assert_string_equal(err.u.error.message, p11a_strerror(P11A_E_TOKEN));
	pending_reply(&s, fwd[0].helper, fwd[0].id, &err);
	pending_reply(&s, fwd[1].helper, fwd[1].id, &ok);
	p11a_msg_clear(&err);
	assert_int_equal(replies, 1);
	assert_int_equal(last_reply_type, P11A_MSG_ERROR);
	assert_int_equal(last_error_code, P11A_E_TOKEN);
	server_free(&s);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_lock_all_past_256),
		cmocka_unit_test(test_unlock_named_past_256),
		cmocka_unit_test(test_unlock_ambiguous_and_missing),
		cmocka_unit_test(test_find_tokens),
		cmocka_unit_test(test_error_reply),
		cmocka_unit_test(test_audit_events_and_log),
	};
	log_init("test_handlers", LOG_MODE_STDERR, 0);
	return cmocka_run_group_tests(tests, NULL, NULL);
}
