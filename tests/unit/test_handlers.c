/*
 * The agent's request handlers (agent/handlers.c) against a made-up
 * inventory, with the connection and helper I/O (server.c, supervise.c)
 * replaced by recorders: LOCK and UNLOCK over many tokens (no cap: the
 * agent used to stop at 256), the forwarded request's exact URI, the one
 * reply a client gets after every helper answered.
 */
#include "config.h"
#include "server_int.h"
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
	};
	log_init("test_handlers", LOG_MODE_STDERR, 0);
	return cmocka_run_group_tests(tests, NULL, NULL);
}
