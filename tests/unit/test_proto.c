/*
 * Unit tests for common/proto.c (codec and frame I/O), common/client.c
 * (against a fake agent) and common/uri.c.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <poll.h>
#include <pthread.h>
#include <time.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <cmocka.h>

#include "p11a.h"
#include "buf.h"
#include "proto.h"
#include "client.h"

/*
 * uri.h needs p11-kit's headers; they are on the include path only when
 * the test is compiled with $(P11KIT_CFLAGS).
 */
#if defined(__has_include)
# if __has_include(<p11-kit/pkcs11.h>)
#  define HAVE_URI_TESTS 1
#  include "uri.h"
# endif
#endif

/* ------------------------------------------------------------ samples */

static uint8_t key_id[] = { 0x01, 0xab, 0x00, 0xff };
static uint8_t spki[] = { 0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86 };
static uint8_t cert[] = { 0x30, 0x82, 0x01, 0x00, 0xde, 0xad };
static uint8_t sig_bytes[] = { 0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x02 };
static uint8_t sign_data[] = { 'h', 'e', 'l', 'l', 'o', 0x00, 0xff };

static struct p11a_token sample_tokens[] = {
	{ "pkcs11:token=A", "A", "Manu", "Model", "1234", "softhsm2",
	  P11A_TOKEN_PRESENT | P11A_TOKEN_LOGIN_REQUIRED },
	{ "pkcs11:token=B%20b", "B b", "", "", "", "/usr/lib/x.so", 0xffffffffu },
};

static struct p11a_key sample_keys[] = {
	{ "pkcs11:token=A;id=%01%AB%00%FF;type=private", "pkcs11:token=A", "key one",
	  key_id, sizeof(key_id), P11A_KEY_EC, 256, "P-256", spki, sizeof(spki),
	  cert, sizeof(cert), "pkcs11:token=A;type=cert", "cert one",
	  P11A_KEY_PRIVATE_VISIBLE | P11A_KEY_HAS_CERT },
	{ "pkcs11:token=A;object=r", "pkcs11:token=A", "", NULL, 0, P11A_KEY_RSA, 2048,
	  "", spki, sizeof(spki), NULL, 0, "", "", 0 },
};

static struct p11a_module_health sample_modules[] = {
	{ "softhsm2", "/usr/lib/softhsm/libsofthsm2.so", P11A_MODULE_UP, 0, 0, "" },
	{ "broken", "/opt/x.so", P11A_MODULE_FAILED, 3, 1700000000u,
	  "module /opt/x.so: C_Initialize: CKR_ARGUMENTS_BAD" },
};
static char recent_a[] = "2025-01-01 00:00:00 UTC module broken failed";
static char recent_b[] = "";
static char *sample_recent[] = { recent_a, recent_b };

static struct p11a_event sample_events[] = {
	{ 1767225600123456ull, P11A_EV_SIGN, (char *)"pkcs11:object=k", P11A_SCHEME_ECDSA, 3, 4242,
	  1000, (char *)"/usr/bin/curl", 0, 0, (char *)"", 310, (char *)"", 0 },
	{ 1767225601000000ull, P11A_EV_LOCK, (char *)"", 0, 0, 0, 1000, (char *)"", 0, 0,
	  (char *)"", 0, (char *)"SIGHUP", 0 },
	{ 1767225602000000ull, P11A_EV_REFUSED, (char *)"pkcs11:object=k", P11A_SCHEME_ECDSA, 1,
	  77, 1000, (char *)"/usr/bin/python3.11", P11A_EVENT_FORWARDED, P11A_E_POLICY,
	  (char *)"tls-only", 12, (char *)"", 0 },
	{ 1767225603000000ull, P11A_EV_DROPPED, (char *)"", 0, 0, 0, 0, (char *)"", 0, 0,
	  (char *)"", 0, (char *)"", 5 },
};

#define NSAMPLES 29

/* Fills m with sample i; every message type appears once or more. */
static char *sample_env[] = { "DISPLAY=:0", "TTY=/dev/pts/3" };

static void
sample(size_t i, struct p11a_msg *m)
{
	memset(m, 0, sizeof(*m));
	switch (i) {
	case 0:
		m->type = P11A_MSG_HELLO;
		m->u.hello.min_version = 1;
		m->u.hello.max_version = 0x0203;
		m->u.hello.client = "p11agent-cli 0.1.0";
		break;
	case 1: m->type = P11A_MSG_STATUS; break;
	case 2: m->type = P11A_MSG_LIST; break;
	case 3:
		m->type = P11A_MSG_UNLOCK;
		m->u.unlock.token_uri = "pkcs11:token=A";
		/* A PIN is a byte string: it may even hold a NUL. */
		memcpy(m->u.unlock.pin, "12\0" "345", 6);
		m->u.unlock.pin_len = 6;
		break;
	case 4:
		m->type = P11A_MSG_LOCK;
		m->u.lock.token_uri = "";
		break;
	case 5:
		m->type = P11A_MSG_OPEN_CHANNEL;
		m->u.open_channel.key_uri = "pkcs11:object=k";
		break;
	case 6:
		m->type = P11A_MSG_SIGN;
		m->u.sign.key_uri = "pkcs11:object=k";
		m->u.sign.scheme = P11A_SCHEME_RSA_PSS;
		m->u.sign.hash = P11A_HASH_SHA384;
		m->u.sign.mgf1_hash = P11A_HASH_SHA1;
		m->u.sign.input = P11A_INPUT_DIGEST;
		m->u.sign.salt_len = P11A_PSS_SALT_DIGEST;
		m->u.sign.data = sign_data;
		m->u.sign.data_len = sizeof(sign_data);
		break;
	case 7:
		m->type = P11A_MSG_H_ADOPT;
		m->u.adopt.conn = 0x0102030405060708ull;
		m->u.adopt.pid = 4242;
		m->u.adopt.exe = (char *)"/usr/bin/curl";
		break;
	case 8: m->type = P11A_MSG_H_REFRESH; break;
	case 9:
		m->type = P11A_MSG_H_INVENTORY;
		m->u.list.ntokens = 2;
		m->u.list.tokens = sample_tokens;
		m->u.list.nkeys = 2;
		m->u.list.keys = sample_keys;
		break;
	case 10: m->type = P11A_MSG_OK; break;
	case 11:
		m->type = P11A_MSG_ERROR;
		m->u.error.code = P11A_E_PIN_INCORRECT;
		m->u.error.message = "PIN incorrect, 2 tries left";
		break;
	case 12:
		m->type = P11A_MSG_HELLO_REPLY;
		m->u.hello_reply.version = 1;
		m->u.hello_reply.agent = "p11agentd 0.1.0";
		break;
	case 13:
		m->type = P11A_MSG_STATUS_REPLY;
		m->u.status.agent = "p11agentd 0.1.0";
		m->u.status.pid = 4242;
		m->u.status.modules = 3;
		m->u.status.modules_up = 2;
		m->u.status.connections = 7;
		m->u.status.ntokens = 2;
		m->u.status.tokens = sample_tokens;
		break;
	case 14:
		m->type = P11A_MSG_LIST_REPLY;
		m->u.list.ntokens = 1;
		m->u.list.tokens = sample_tokens;
		m->u.list.nkeys = 2;
		m->u.list.keys = sample_keys;
		break;
	case 15: m->type = P11A_MSG_CHANNEL; break;
	case 16:
		m->type = P11A_MSG_SIGNATURE;
		m->u.signature.sig = sig_bytes;
		m->u.signature.sig_len = sizeof(sig_bytes);
		break;
	case 17: m->type = P11A_MSG_HEALTH; break;
	case 18:
		m->type = P11A_MSG_HEALTH_REPLY;
		m->u.health.nmodules = 2;
		m->u.health.modules = sample_modules;
		m->u.health.nrecent = 2;
		m->u.health.recent = sample_recent;
		break;
	case 19:
		m->type = P11A_MSG_LOG;
		m->u.log.since_us = 1767225600000000ull;
		m->u.log.max = 10;
		break;
	case 20:
		m->type = P11A_MSG_LOG_REPLY;
		m->u.events.n = 4;
		m->u.events.ev = sample_events;
		break;
	case 21:
		m->type = P11A_MSG_H_EVENT;
		m->u.events.dropped = 3;
		m->u.events.n = 2;
		m->u.events.ev = sample_events + 1;
		break;
	case 22:
		m->type = P11A_MSG_H_SIGN;
		m->u.hsign.conn = 0x0a0b0c0d01020304ull;
		m->u.hsign.pid = 77;
		m->u.hsign.exe = (char *)"/usr/bin/ssh";
		m->u.hsign.flags = P11A_HSIGN_FORWARDED;
		m->u.hsign.sign.key_uri = "pkcs11:object=k";
		m->u.hsign.sign.scheme = P11A_SCHEME_ECDSA;
		m->u.hsign.sign.hash = P11A_HASH_SHA256;
		m->u.hsign.sign.data = sign_data;
		m->u.hsign.sign.data_len = sizeof(sign_data);
		break;
	case 23:
		m->type = P11A_MSG_UNLOCK_PROMPT;
		m->u.prompt.uri = "pkcs11:token=A;object=k";
		break;
	case 24:
		m->type = P11A_MSG_CONFIRM;
		m->u.prompt.uri = "pkcs11:object=k";
		break;
	case 25:
		m->type = P11A_MSG_UPDATE_ENV;
		m->u.env.n = 2;
		m->u.env.env = sample_env;
		break;
	case 26:
		m->type = P11A_MSG_H_GRANT;
		m->u.grant.conn = 0x0102030405060708ULL;
		m->u.grant.key_uri = "pkcs11:object=k";
		break;
	case 27:
		m->type = P11A_MSG_CONTEXT_PIN;
		m->u.prompt.uri = "pkcs11:object=piv";
		break;
	case 28:
		m->type = P11A_MSG_H_CONTEXT_PIN;
		m->u.ctx_pin.conn = 0x0807060504030201ULL;
		m->u.ctx_pin.key_uri = "pkcs11:object=piv";
		memcpy(m->u.ctx_pin.pin, "123456", 6);
		m->u.ctx_pin.pin_len = 6;
		break;
	default:
		fail();
	}
}

static void
assert_str_same(const char *a, const char *b)
{
	assert_string_equal(a == NULL ? "" : a, b == NULL ? "" : b);
}

static void
assert_bytes_same(const uint8_t *a, size_t alen, const uint8_t *b, size_t blen)
{
	assert_int_equal(alen, blen);
	if (alen != 0)
		assert_memory_equal(a, b, alen);
}

static void
assert_token_same(const struct p11a_token *a, const struct p11a_token *b)
{
	assert_str_same(a->uri, b->uri);
	assert_str_same(a->label, b->label);
	assert_str_same(a->manufacturer, b->manufacturer);
	assert_str_same(a->model, b->model);
	assert_str_same(a->serial, b->serial);
	assert_str_same(a->module, b->module);
	assert_int_equal(a->flags, b->flags);
}

static void
assert_key_same(const struct p11a_key *a, const struct p11a_key *b)
{
	assert_str_same(a->uri, b->uri);
	assert_str_same(a->token_uri, b->token_uri);
	assert_str_same(a->label, b->label);
	assert_bytes_same(a->id, a->id_len, b->id, b->id_len);
	assert_int_equal(a->type, b->type);
	assert_int_equal(a->bits, b->bits);
	assert_str_same(a->curve, b->curve);
	assert_bytes_same(a->spki, a->spki_len, b->spki, b->spki_len);
	assert_bytes_same(a->cert, a->cert_len, b->cert, b->cert_len);
	assert_str_same(a->cert_uri, b->cert_uri);
	assert_str_same(a->cert_label, b->cert_label);
	assert_int_equal(a->flags, b->flags);
}

static void
assert_msg_same(const struct p11a_msg *a, const struct p11a_msg *b)
{
	uint32_t i;

	assert_int_equal(a->type, b->type);
	switch (a->type) {
	case P11A_MSG_HELLO:
		assert_int_equal(a->u.hello.min_version, b->u.hello.min_version);
		assert_int_equal(a->u.hello.max_version, b->u.hello.max_version);
		assert_str_same(a->u.hello.client, b->u.hello.client);
		break;
	case P11A_MSG_UNLOCK:
		assert_str_same(a->u.unlock.token_uri, b->u.unlock.token_uri);
		assert_bytes_same((const uint8_t *)a->u.unlock.pin, a->u.unlock.pin_len,
		    (const uint8_t *)b->u.unlock.pin, b->u.unlock.pin_len);
		break;
	case P11A_MSG_LOCK:
		assert_str_same(a->u.lock.token_uri, b->u.lock.token_uri);
		break;
	case P11A_MSG_OPEN_CHANNEL:
		assert_str_same(a->u.open_channel.key_uri, b->u.open_channel.key_uri);
		break;
	case P11A_MSG_H_ADOPT:
		assert_true(a->u.adopt.conn == b->u.adopt.conn);
		assert_int_equal(a->u.adopt.pid, b->u.adopt.pid);
		assert_str_same(a->u.adopt.exe, b->u.adopt.exe);
		break;
	case P11A_MSG_H_SIGN:
		assert_true(a->u.hsign.conn == b->u.hsign.conn);
		assert_int_equal(a->u.hsign.pid, b->u.hsign.pid);
		assert_str_same(a->u.hsign.exe, b->u.hsign.exe);
		assert_int_equal(a->u.hsign.flags, b->u.hsign.flags);
		assert_str_same(a->u.hsign.sign.key_uri, b->u.hsign.sign.key_uri);
		assert_int_equal(a->u.hsign.sign.scheme, b->u.hsign.sign.scheme);
		assert_bytes_same(a->u.hsign.sign.data, a->u.hsign.sign.data_len,
		    b->u.hsign.sign.data, b->u.hsign.sign.data_len);
		break;
	case P11A_MSG_SIGN:
		assert_str_same(a->u.sign.key_uri, b->u.sign.key_uri);
		assert_int_equal(a->u.sign.scheme, b->u.sign.scheme);
		assert_int_equal(a->u.sign.hash, b->u.sign.hash);
		assert_int_equal(a->u.sign.mgf1_hash, b->u.sign.mgf1_hash);
		assert_int_equal(a->u.sign.input, b->u.sign.input);
		assert_int_equal(a->u.sign.salt_len, b->u.sign.salt_len);
		assert_bytes_same(a->u.sign.data, a->u.sign.data_len,
		    b->u.sign.data, b->u.sign.data_len);
		break;
	case P11A_MSG_ERROR:
		assert_int_equal(a->u.error.code, b->u.error.code);
		assert_str_same(a->u.error.message, b->u.error.message);
		break;
	case P11A_MSG_HELLO_REPLY:
		assert_int_equal(a->u.hello_reply.version, b->u.hello_reply.version);
		assert_str_same(a->u.hello_reply.agent, b->u.hello_reply.agent);
		break;
	case P11A_MSG_STATUS_REPLY:
		assert_str_same(a->u.status.agent, b->u.status.agent);
		assert_int_equal(a->u.status.pid, b->u.status.pid);
		assert_int_equal(a->u.status.modules, b->u.status.modules);
		assert_int_equal(a->u.status.modules_up, b->u.status.modules_up);
		assert_int_equal(a->u.status.connections, b->u.status.connections);
		assert_int_equal(a->u.status.ntokens, b->u.status.ntokens);
		for (i = 0; i < a->u.status.ntokens; i++)
			assert_token_same(&a->u.status.tokens[i], &b->u.status.tokens[i]);
		break;
	case P11A_MSG_LIST_REPLY:
	case P11A_MSG_H_INVENTORY:
		assert_int_equal(a->u.list.ntokens, b->u.list.ntokens);
		for (i = 0; i < a->u.list.ntokens; i++)
			assert_token_same(&a->u.list.tokens[i], &b->u.list.tokens[i]);
		assert_int_equal(a->u.list.nkeys, b->u.list.nkeys);
		for (i = 0; i < a->u.list.nkeys; i++)
			assert_key_same(&a->u.list.keys[i], &b->u.list.keys[i]);
		break;
	case P11A_MSG_SIGNATURE:
		assert_bytes_same(a->u.signature.sig, a->u.signature.sig_len,
		    b->u.signature.sig, b->u.signature.sig_len);
		break;
	case P11A_MSG_HEALTH_REPLY:
		assert_int_equal(a->u.health.nmodules, b->u.health.nmodules);
		for (i = 0; i < a->u.health.nmodules; i++) {
			const struct p11a_module_health *x = &a->u.health.modules[i];
			const struct p11a_module_health *y = &b->u.health.modules[i];
			assert_str_same(x->name, y->name);
			assert_str_same(x->path, y->path);
			assert_int_equal(x->state, y->state);
			assert_int_equal(x->restarts, y->restarts);
			assert_int_equal(x->error_time, y->error_time);
			assert_str_same(x->error, y->error);
		}
		assert_int_equal(a->u.health.nrecent, b->u.health.nrecent);
		for (i = 0; i < a->u.health.nrecent; i++)
			assert_str_same(a->u.health.recent[i], b->u.health.recent[i]);
		break;
	case P11A_MSG_LOG:
		assert_true(a->u.log.since_us == b->u.log.since_us);
		assert_int_equal(a->u.log.max, b->u.log.max);
		break;
	case P11A_MSG_LOG_REPLY:
	case P11A_MSG_H_EVENT:
		assert_int_equal(a->u.events.dropped, b->u.events.dropped);
		assert_int_equal(a->u.events.n, b->u.events.n);
		for (i = 0; i < a->u.events.n; i++) {
			const struct p11a_event *x = &a->u.events.ev[i], *y = &b->u.events.ev[i];
			assert_true(x->time_us == y->time_us);
			assert_true(x->duration_us == y->duration_us);
			assert_int_equal(x->kind, y->kind);
			assert_int_equal(x->scheme, y->scheme);
			assert_int_equal(x->content, y->content);
			assert_int_equal(x->pid, y->pid);
			assert_int_equal(x->uid, y->uid);
			assert_int_equal(x->flags, y->flags);
			assert_int_equal(x->result, y->result);
			assert_int_equal(x->count, y->count);
			assert_str_same(x->uri, y->uri);
			assert_str_same(x->exe, y->exe);
			assert_str_same(x->message, y->message);
			assert_str_same(x->reason, y->reason);
			assert_int_equal(p11a_event_wire_size(x), p11a_event_wire_size(y));
		}
		break;
	case P11A_MSG_UNLOCK_PROMPT:
	case P11A_MSG_CONFIRM:
		assert_str_same(a->u.prompt.uri, b->u.prompt.uri);
		break;
	case P11A_MSG_UPDATE_ENV:
		assert_int_equal(a->u.env.n, b->u.env.n);
		for (i = 0; i < a->u.env.n; i++)
			assert_str_same(a->u.env.env[i], b->u.env.env[i]);
		break;
	case P11A_MSG_H_GRANT:
		assert_int_equal(a->u.grant.conn, b->u.grant.conn);
		assert_str_same(a->u.grant.key_uri, b->u.grant.key_uri);
		break;
	case P11A_MSG_CONTEXT_PIN:
		assert_str_same(a->u.prompt.uri, b->u.prompt.uri);
		break;
	case P11A_MSG_H_CONTEXT_PIN:
		assert_int_equal(a->u.ctx_pin.conn, b->u.ctx_pin.conn);
		assert_str_same(a->u.ctx_pin.key_uri, b->u.ctx_pin.key_uri);
		assert_int_equal(a->u.ctx_pin.pin_len, b->u.ctx_pin.pin_len);
		assert_memory_equal(a->u.ctx_pin.pin, b->u.ctx_pin.pin, a->u.ctx_pin.pin_len);
		break;
	default:
		break;
	}
}

static int
is_zero(const void *p, size_t n)
{
	const uint8_t *b = p;
	size_t i;

	for (i = 0; i < n; i++) {
		if (b[i] != 0)
			return 0;
	}
	return 1;
}

static struct p11a_buf *
encode_sample(size_t i)
{
	struct p11a_buf *b = p11a_buf_new(P11A_FRAME_MAX);
	struct p11a_msg m;

	assert_non_null(b);
	sample(i, &m);
	assert_int_equal(p11a_msg_encode(&m, b), 0);
	return b;
}

/* ------------------------------------------------------------ codec */

static void
test_roundtrip_all_types(void **state)
{
	struct p11a_buf *b, *b2;
	struct p11a_msg m, d;
	size_t i;

	for (i = 0; i < NSAMPLES; i++) {
		sample(i, &m);
		b = encode_sample(i);
		assert_int_equal(p11a_buf_ptr(b)[0], m.type);
		assert_int_equal(p11a_msg_decode(p11a_buf_ptr(b), p11a_buf_len(b), &d), 0);
		assert_msg_same(&m, &d);
		/* Re-encoding the decoded message gives the same bytes. */
		b2 = p11a_buf_new(P11A_FRAME_MAX);
		assert_non_null(b2);
		assert_int_equal(p11a_msg_encode(&d, b2), 0);
		assert_int_equal(p11a_buf_len(b2), p11a_buf_len(b));
		assert_memory_equal(p11a_buf_ptr(b2), p11a_buf_ptr(b), p11a_buf_len(b));
		p11a_msg_clear(&d);
		assert_true(is_zero(&d, sizeof(d)));
		p11a_buf_free(b);
		p11a_buf_free(b2);
	}
}

/* Audit events: a bad kind or content makes the frame malformed; the size helper is exact. */
static void
test_event_values(void **state)
{
	struct p11a_event e = sample_events[0];
	struct p11a_msg m, d;
	struct p11a_buf *b = p11a_buf_new(P11A_FRAME_MAX);
	const uint8_t bad_kinds[] = { 0, P11A_EV_KIND_MAX + 1, 0xff };
	size_t kind_at, content_at;

	(void)state;
	assert_non_null(b);
	memset(&m, 0, sizeof(m));
	m.type = P11A_MSG_LOG_REPLY;
	m.u.events.n = 1;
	m.u.events.ev = &e;
	assert_int_equal(p11a_msg_encode(&m, b), 0);
	/* type, count, then the event */
	assert_int_equal(p11a_buf_len(b), 1 + 4 + p11a_event_wire_size(&e));
	kind_at = 1 + 4 + 8;
	content_at = kind_at + 1 + 4 + strlen(e.uri) + 1;
	for (size_t i = 0; i < sizeof(bad_kinds); i++) {
		uint8_t *p = (uint8_t *)p11a_buf_ptr(b);
		uint8_t keep = p[kind_at];
		p[kind_at] = bad_kinds[i];
		assert_int_equal(p11a_msg_decode(p, p11a_buf_len(b), &d), -P11A_E_MALFORMED);
		p[kind_at] = keep;
	}
	{
		uint8_t *p = (uint8_t *)p11a_buf_ptr(b);
		p[content_at] = P11A_CONTENT_MAX + 1;
		assert_int_equal(p11a_msg_decode(p, p11a_buf_len(b), &d), -P11A_E_MALFORMED);
		p[content_at] = P11A_CONTENT_MAX;
		assert_int_equal(p11a_msg_decode(p, p11a_buf_len(b), &d), 0);
		assert_int_equal(d.u.events.ev[0].content, P11A_CONTENT_MAX);
		p11a_msg_clear(&d);
	}
	/* The encoder refuses what the decoder would. */
	e.kind = 0;
	p11a_buf_reset(b);
	assert_int_equal(p11a_msg_encode(&m, b), -P11A_E_INTERNAL);
	assert_int_equal(p11a_buf_len(b), 0);
	assert_string_equal(p11a_event_kind_name(P11A_EV_PIN_DIALOG), "pin-dialog");
	assert_null(p11a_event_kind_name(99));
	assert_string_equal(p11a_errname(P11A_E_POLICY), "POLICY");
	assert_string_equal(p11a_errname(-P11A_E_PIN_INCORRECT), "PIN_INCORRECT");
	assert_string_equal(p11a_errname(0), "OK");
	assert_string_equal(p11a_errname(1000), "UNKNOWN");
	p11a_buf_free(b);
}

/* Byte layouts written out by hand from docs/protocol.md. */
static void
test_wire_layout(void **state)
{
	static const uint8_t hello[] = {
		0x01, 0x00, 0x01, 0x02, 0x03, 0, 0, 0, 18,
		'p', '1', '1', 'a', 'g', 'e', 'n', 't', '-', 'c', 'l', 'i', ' ',
		'0', '.', '1', '.', '0'
	};
	static const uint8_t sign[] = {
		0x07, 0, 0, 0, 15, 'p', 'k', 'c', 's', '1', '1', ':', 'o', 'b', 'j', 'e',
		'c', 't', '=', 'k', 0x02, 0x04, 0x01, 0x01, 0xff, 0xff, 0xff, 0xff,
		0, 0, 0, 7, 'h', 'e', 'l', 'l', 'o', 0x00, 0xff
	};
	static const uint8_t unlock[] = {
		0x04, 0, 0, 0, 14, 'p', 'k', 'c', 's', '1', '1', ':', 't', 'o', 'k', 'e',
		'n', '=', 'A', 0, 0, 0, 6, '1', '2', 0, '3', '4', '5'
	};
	static const uint8_t error[] = {
		0x81, 0, 0, 0, 15, 0, 0, 0, 27, 'P', 'I', 'N', ' ', 'i', 'n', 'c',
		'o', 'r', 'r', 'e', 'c', 't', ',', ' ', '2', ' ', 't', 'r', 'i', 'e',
		's', ' ', 'l', 'e', 'f', 't'
	};
	struct p11a_buf *b;

	b = encode_sample(0);
	assert_int_equal(p11a_buf_len(b), sizeof(hello));
	assert_memory_equal(p11a_buf_ptr(b), hello, sizeof(hello));
	p11a_buf_free(b);
	b = encode_sample(6);
	assert_int_equal(p11a_buf_len(b), sizeof(sign));
	assert_memory_equal(p11a_buf_ptr(b), sign, sizeof(sign));
	p11a_buf_free(b);
	b = encode_sample(3);
	assert_int_equal(p11a_buf_len(b), sizeof(unlock));
	assert_memory_equal(p11a_buf_ptr(b), unlock, sizeof(unlock));
	p11a_buf_free(b);
	b = encode_sample(11);
	assert_int_equal(p11a_buf_len(b), sizeof(error));
	assert_memory_equal(p11a_buf_ptr(b), error, sizeof(error));
	p11a_buf_free(b);
}

static void
test_key_field_order(void **state)
{
	/* A key record with one byte per field, so each field's place shows. */
	struct p11a_key k = {
		"U", "T", "L", (uint8_t *)"I", 1, 9, 0x01020304, "C", (uint8_t *)"S", 1,
		(uint8_t *)"X", 1, "V", "W", 0x0a0b0c0d
	};
	struct p11a_msg m;
	struct p11a_buf *b = p11a_buf_new(P11A_FRAME_MAX);
	static const uint8_t want[] = {
		0x84, 0, 0, 0, 0, 0, 0, 0, 1,
		0, 0, 0, 1, 'U', 0, 0, 0, 1, 'T', 0, 0, 0, 1, 'L', 0, 0, 0, 1, 'I',
		9, 1, 2, 3, 4, 0, 0, 0, 1, 'C', 0, 0, 0, 1, 'S', 0, 0, 0, 1, 'X',
		0, 0, 0, 1, 'V', 0, 0, 0, 1, 'W', 0x0a, 0x0b, 0x0c, 0x0d
	};

	assert_non_null(b);
	memset(&m, 0, sizeof(m));
	m.type = P11A_MSG_LIST_REPLY;
	m.u.list.nkeys = 1;
	m.u.list.keys = &k;
	assert_int_equal(p11a_msg_encode(&m, b), 0);
	assert_int_equal(p11a_buf_len(b), sizeof(want));
	assert_memory_equal(p11a_buf_ptr(b), want, sizeof(want));
	p11a_buf_free(b);
}

static void
test_truncated_every_offset(void **state)
{
	struct p11a_msg d;
	struct p11a_buf *b;
	size_t i, cut;

	for (i = 0; i < NSAMPLES; i++) {
		b = encode_sample(i);
		for (cut = 0; cut < p11a_buf_len(b); cut++) {
			int r = p11a_msg_decode(p11a_buf_ptr(b), cut, &d);

			if (r != -P11A_E_TRUNCATED)
				print_error("sample %zu cut at %zu: %d\n", i, cut, r);
			assert_int_equal(r, -P11A_E_TRUNCATED);
			assert_true(is_zero(&d, sizeof(d)));
		}
		p11a_buf_free(b);
	}
}

static void
test_leftover_bytes(void **state)
{
	struct p11a_msg d;
	struct p11a_buf *b;
	size_t i;

	for (i = 0; i < NSAMPLES; i++) {
		b = encode_sample(i);
		assert_int_equal(p11a_buf_put_u8(b, 0), 0);
		assert_int_equal(p11a_msg_decode(p11a_buf_ptr(b), p11a_buf_len(b), &d),
		    -P11A_E_MALFORMED);
		assert_true(is_zero(&d, sizeof(d)));
		assert_int_equal(p11a_buf_put(b, "abc", 3), 0);
		assert_int_equal(p11a_msg_decode(p11a_buf_ptr(b), p11a_buf_len(b), &d),
		    -P11A_E_MALFORMED);
		p11a_buf_free(b);
	}
}

static void
test_unknown_type(void **state)
{
	static const uint8_t types[] = { 0x00, 0x0e, 0x3f, 0x43, 0x7f, 0xbf, 0xff };
	struct p11a_buf *b = p11a_buf_new(100);
	struct p11a_msg m, d;
	uint8_t body[8];
	size_t i;

	assert_non_null(b);
	for (i = 0; i < sizeof(types); i++) {
		memset(body, 0x41, sizeof(body));
		body[0] = types[i];
		assert_int_equal(p11a_msg_decode(body, sizeof(body), &d), -P11A_E_UNKNOWN_TYPE);
		assert_true(is_zero(&d, sizeof(d)));
		assert_int_equal(p11a_msg_decode(body, 1, &d), -P11A_E_UNKNOWN_TYPE);
		/* The caller still has the type byte to name in its ERROR reply. */
		assert_int_equal(body[0], types[i]);

		memset(&m, 0, sizeof(m));
		m.type = types[i];
		assert_int_equal(p11a_buf_put(b, "xy", 2), 0);
		assert_int_equal(p11a_msg_encode(&m, b), -P11A_E_UNKNOWN_TYPE);
		assert_int_equal(p11a_buf_len(b), 2);
		p11a_buf_reset(b);
	}
	p11a_buf_free(b);
}

/* UPDATE_ENV (version 3): NAME=value entries, at most P11A_ENV_MAX. */
static void
test_update_env_limits(void **state)
{
	struct p11a_buf *b = p11a_buf_new(100);
	struct p11a_msg m, d;
	char *bad[] = { "DISPLAY" };
	char *many[P11A_ENV_MAX + 1];
	uint8_t raw[] = { P11A_MSG_UPDATE_ENV, 0, 0, 0, 1, 0, 0, 0, 2, '=', 'x' };
	uint8_t huge[] = { P11A_MSG_UPDATE_ENV, 0, 0, 0, P11A_ENV_MAX + 1 };

	(void)state;
	assert_non_null(b);
	memset(&m, 0, sizeof(m));
	m.type = P11A_MSG_UPDATE_ENV;
	m.u.env.n = 1;
	m.u.env.env = bad;
	assert_int_equal(p11a_msg_encode(&m, b), -P11A_E_MALFORMED);
	p11a_buf_reset(b);
	for (size_t i = 0; i < P11A_ENV_MAX + 1; i++)
		many[i] = "TERM=x";
	m.u.env.n = P11A_ENV_MAX + 1;
	m.u.env.env = many;
	assert_int_equal(p11a_msg_encode(&m, b), -P11A_E_TOO_LARGE);
	/* "=x": no name. */
	assert_int_equal(p11a_msg_decode(raw, sizeof(raw), &d), -P11A_E_MALFORMED);
	assert_int_equal(p11a_msg_decode(huge, sizeof(huge), &d), -P11A_E_TOO_LARGE);
	p11a_buf_free(b);
}

static void
test_utf8(void **state)
{
	static const char *good[] = {
		"", "pkcs11:token=abc", "caf\xc3\xa9", "\xe2\x82\xac", "\xf0\x9f\x94\x91",
		"\xed\x9f\xbf", "\xf4\x8f\xbf\xbf",
	};
	static const char *bad[] = {
		"\x80", "\xc3", "caf\xc3(", "\xc0\xaf", "\xe0\x80\xaf", "\xed\xa0\x80",
		"\xf4\x90\x80\x80", "\xf5\x80\x80\x80", "\xff", "pkcs11:object=\xe9t\xe9",
	};
	struct p11a_msg m;
	size_t i;

	(void)state;
	for (i = 0; i < sizeof(good) / sizeof(good[0]); i++)
		assert_int_equal(p11a_utf8_valid(good[i]), 1);
	for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		assert_int_equal(p11a_utf8_valid(bad[i]), 0);
	memset(&m, 0, sizeof(m));
	m.type = P11A_MSG_OPEN_CHANNEL;
	m.u.open_channel.key_uri = (char *)"pkcs11:object=\xe9";
	assert_string_equal(p11a_msg_bad_text(&m), "key URI");
	m.u.open_channel.key_uri = (char *)"pkcs11:object=%E9";
	assert_null(p11a_msg_bad_text(&m));
	m.type = P11A_MSG_SIGN;
	m.u.sign.key_uri = (char *)"\xc3";
	assert_string_equal(p11a_msg_bad_text(&m), "key URI");
	m.type = P11A_MSG_STATUS;
	assert_null(p11a_msg_bad_text(&m));
}

static void
test_empty_and_fieldless(void **state)
{
	static const uint8_t fieldless[] = {
		P11A_MSG_STATUS, P11A_MSG_LIST, P11A_MSG_H_REFRESH,
		P11A_MSG_OK, P11A_MSG_CHANNEL
	};
	struct p11a_msg d;
	uint8_t body[2] = { 0, 0 };
	size_t i;

	assert_int_equal(p11a_msg_decode(body, 0, &d), -P11A_E_TRUNCATED);
	assert_int_equal(p11a_msg_decode(NULL, 0, &d), -P11A_E_TRUNCATED);
	for (i = 0; i < sizeof(fieldless); i++) {
		body[0] = fieldless[i];
		body[1] = 0;
		assert_int_equal(p11a_msg_decode(body, 1, &d), 0);
		assert_int_equal(d.type, fieldless[i]);
		p11a_msg_clear(&d);
		assert_int_equal(p11a_msg_decode(body, 2, &d), -P11A_E_MALFORMED);
	}
}

/* Builds a body from a type and raw pieces. */
static struct p11a_buf *
body_new(uint8_t type)
{
	struct p11a_buf *b = p11a_buf_new(2 * P11A_FRAME_MAX);

	assert_non_null(b);
	assert_int_equal(p11a_buf_put_u8(b, type), 0);
	return b;
}

static int
decode_buf(struct p11a_buf *b)
{
	struct p11a_msg d;
	int r = p11a_msg_decode(p11a_buf_ptr(b), p11a_buf_len(b), &d);

	if (r == 0)
		p11a_msg_clear(&d);
	else
		assert_true(is_zero(&d, sizeof(d)));
	p11a_buf_free(b);
	return r;
}

static char *
filled(size_t n)
{
	char *s = malloc(n + 1);

	assert_non_null(s);
	memset(s, 'a', n);
	s[n] = '\0';
	return s;
}

static void
test_decode_oversize(void **state)
{
	struct p11a_buf *b;
	char *big = filled(P11A_FRAME_MAX);
	uint32_t i;

	/* URI at the limit, and one over. */
	b = body_new(P11A_MSG_OPEN_CHANNEL);
	assert_int_equal(p11a_buf_put_string(b, big, P11A_URI_MAX), 0);
	assert_int_equal(decode_buf(b), 0);
	b = body_new(P11A_MSG_OPEN_CHANNEL);
	assert_int_equal(p11a_buf_put_string(b, big, P11A_URI_MAX + 1), 0);
	assert_int_equal(decode_buf(b), -P11A_E_TOO_LARGE);
	/* Other text. */
	b = body_new(P11A_MSG_HELLO);
	assert_int_equal(p11a_buf_put_u32(b, 0x00010001), 0);
	assert_int_equal(p11a_buf_put_string(b, big, P11A_TEXT_MAX + 1), 0);
	assert_int_equal(decode_buf(b), -P11A_E_TOO_LARGE);
	/* PIN. */
	b = body_new(P11A_MSG_UNLOCK);
	assert_int_equal(p11a_buf_put_cstring(b, ""), 0);
	assert_int_equal(p11a_buf_put_string(b, big, P11A_PIN_MAX), 0);
	assert_int_equal(decode_buf(b), 0);
	b = body_new(P11A_MSG_UNLOCK);
	assert_int_equal(p11a_buf_put_cstring(b, ""), 0);
	assert_int_equal(p11a_buf_put_string(b, big, P11A_PIN_MAX + 1), 0);
	assert_int_equal(decode_buf(b), -P11A_E_TOO_LARGE);
	/* Signature. */
	b = body_new(P11A_MSG_SIGNATURE);
	assert_int_equal(p11a_buf_put_string(b, big, P11A_SIG_MAX), 0);
	assert_int_equal(decode_buf(b), 0);
	b = body_new(P11A_MSG_SIGNATURE);
	assert_int_equal(p11a_buf_put_string(b, big, P11A_SIG_MAX + 1), 0);
	assert_int_equal(decode_buf(b), -P11A_E_TOO_LARGE);
	/* Lists: one over the limit, absurd counts, a count with nothing behind it. */
	b = body_new(P11A_MSG_LIST_REPLY);
	assert_int_equal(p11a_buf_put_u32(b, P11A_LIST_MAX + 1), 0);
	assert_int_equal(decode_buf(b), -P11A_E_TOO_LARGE);
	b = body_new(P11A_MSG_LIST_REPLY);
	assert_int_equal(p11a_buf_put_u32(b, 0xffffffff), 0);
	assert_int_equal(p11a_buf_put_u32(b, 0), 0);
	assert_int_equal(decode_buf(b), -P11A_E_TOO_LARGE);
	b = body_new(P11A_MSG_LIST_REPLY);
	assert_int_equal(p11a_buf_put_u32(b, 0), 0);
	assert_int_equal(p11a_buf_put_u32(b, 0x7fffffff), 0);
	assert_int_equal(decode_buf(b), -P11A_E_TOO_LARGE);
	b = body_new(P11A_MSG_STATUS_REPLY);
	assert_int_equal(p11a_buf_put_cstring(b, "x"), 0);
	for (i = 0; i < 4; i++)
		assert_int_equal(p11a_buf_put_u32(b, 0), 0);
	assert_int_equal(p11a_buf_put_u32(b, 0x80000000), 0);
	assert_int_equal(decode_buf(b), -P11A_E_TOO_LARGE);
	b = body_new(P11A_MSG_LIST_REPLY);
	assert_int_equal(p11a_buf_put_u32(b, P11A_LIST_MAX), 0);
	assert_int_equal(decode_buf(b), -P11A_E_TRUNCATED);
	/* A list of the maximum length of empty keys decodes. */
	b = body_new(P11A_MSG_LIST_REPLY);
	assert_int_equal(p11a_buf_put_u32(b, 0), 0);
	assert_int_equal(p11a_buf_put_u32(b, P11A_LIST_MAX), 0);
	for (i = 0; i < P11A_LIST_MAX; i++) {
		assert_int_equal(p11a_buf_put(b, big, 0), 0);
		assert_int_equal(p11a_buf_put(b, "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0", 16), 0);
		assert_int_equal(p11a_buf_put(b, "\1\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0", 13), 0);
		assert_int_equal(p11a_buf_put(b, "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0", 16), 0);
	}
	assert_int_equal(decode_buf(b), 0);
	/* A byte string whose length runs far past the end. */
	b = body_new(P11A_MSG_SIGN);
	assert_int_equal(p11a_buf_put_cstring(b, "pkcs11:"), 0);
	assert_int_equal(p11a_buf_put(b, "\1\3\0\0\0\0\0\0", 8), 0);
	assert_int_equal(p11a_buf_put_u32(b, 0xfffffff0), 0);
	assert_int_equal(decode_buf(b), -P11A_E_TOO_LARGE);
	b = body_new(P11A_MSG_SIGN);
	assert_int_equal(p11a_buf_put_cstring(b, "pkcs11:"), 0);
	assert_int_equal(p11a_buf_put(b, "\1\3\0\0\0\0\0\0", 8), 0);
	assert_int_equal(p11a_buf_put_u32(b, 1000), 0);
	assert_int_equal(p11a_buf_put(b, big, 999), 0);
	assert_int_equal(decode_buf(b), -P11A_E_TRUNCATED);
	/* A body over the frame cap. */
	b = body_new(P11A_MSG_SIGNATURE);
	assert_int_equal(p11a_buf_put(b, big, P11A_FRAME_MAX), 0);
	assert_int_equal(decode_buf(b), -P11A_E_TOO_LARGE);
	free(big);
}

static void
test_decode_bad_values(void **state)
{
	struct p11a_buf *b;

	/* NUL inside text: in a top-level field and deep inside a key record. */
	b = body_new(P11A_MSG_HELLO);
	assert_int_equal(p11a_buf_put_u32(b, 0x00010001), 0);
	assert_int_equal(p11a_buf_put_string(b, "a\0b", 3), 0);
	assert_int_equal(decode_buf(b), -P11A_E_MALFORMED);
	b = body_new(P11A_MSG_LOCK);
	assert_int_equal(p11a_buf_put_string(b, "\0", 1), 0);
	assert_int_equal(decode_buf(b), -P11A_E_MALFORMED);
	{
		struct p11a_key k = sample_keys[0];
		struct p11a_msg m;
		struct p11a_buf *e = p11a_buf_new(P11A_FRAME_MAX);
		uint8_t *p;
		size_t n, j;

		/* Encode a good LIST_REPLY, then plant a NUL in the cert_label text. */
		memset(&m, 0, sizeof(m));
		m.type = P11A_MSG_LIST_REPLY;
		m.u.list.ntokens = 2;
		m.u.list.tokens = sample_tokens;
		m.u.list.nkeys = 1;
		m.u.list.keys = &k;
		k.cert_label = "cert\001one";
		assert_non_null(e);
		assert_int_equal(p11a_msg_encode(&m, e), 0);
		n = p11a_buf_len(e);
		assert_int_equal(p11a_buf_reserve(e, 0, &p), 0);
		p = (uint8_t *)p11a_buf_ptr(e);
		for (j = 0; j + 1 < n; j++) {
			if (p[j] == 't' && p[j + 1] == 1)
				p[j + 1] = 0;
		}
		b = body_new(0);
		p11a_buf_reset(b);
		assert_int_equal(p11a_buf_put(b, p, n), 0);
		assert_int_equal(decode_buf(b), -P11A_E_MALFORMED);
		p11a_buf_free(e);
	}
	/* H_ADOPT: the peer's executable is absolute or "" (unknown); no NUL inside. */
	{
		static const char *const exes[] = { "/usr/bin/curl", "" };
		static const char *const bad[] = { "curl", "./curl", " /usr/bin/curl" };
		struct p11a_msg d;

		for (size_t i = 0; i < 2; i++) {
			b = body_new(P11A_MSG_H_ADOPT);
			assert_int_equal(p11a_buf_put_u64(b, 7), 0);
			assert_int_equal(p11a_buf_put_u32(b, 42), 0);
			assert_int_equal(p11a_buf_put_cstring(b, exes[i]), 0);
			assert_int_equal(p11a_msg_decode(p11a_buf_ptr(b), p11a_buf_len(b), &d), 0);
			assert_string_equal(d.u.adopt.exe, exes[i]);
			assert_int_equal(d.u.adopt.pid, 42);
			p11a_msg_clear(&d);
			p11a_buf_free(b);
		}
		for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
			b = body_new(P11A_MSG_H_ADOPT);
			assert_int_equal(p11a_buf_put_u64(b, 7), 0);
			assert_int_equal(p11a_buf_put_u32(b, 42), 0);
			assert_int_equal(p11a_buf_put_cstring(b, bad[i]), 0);
			assert_int_equal(decode_buf(b), -P11A_E_MALFORMED);
		}
		b = body_new(P11A_MSG_H_ADOPT);
		assert_int_equal(p11a_buf_put_u64(b, 7), 0);
		assert_int_equal(p11a_buf_put_u32(b, 42), 0);
		assert_int_equal(p11a_buf_put_string(b, "/usr/bin\0/x", 11), 0);
		assert_int_equal(decode_buf(b), -P11A_E_MALFORMED);
		/* The old layout (no executable) is cut short. */
		b = body_new(P11A_MSG_H_ADOPT);
		assert_int_equal(p11a_buf_put_u64(b, 7), 0);
		assert_int_equal(p11a_buf_put_u32(b, 42), 0);
		assert_int_equal(decode_buf(b), -P11A_E_TRUNCATED);
		/* The encoder refuses a relative path too. */
		memset(&d, 0, sizeof(d));
		d.type = P11A_MSG_H_ADOPT;
		d.u.adopt.exe = (char *)"curl";
		b = p11a_buf_new(P11A_FRAME_MAX);
		assert_non_null(b);
		assert_int_equal(p11a_msg_encode(&d, b), -P11A_E_INTERNAL);
		p11a_buf_free(b);
	}
	/* H_SIGN (version 3): executable as in H_ADOPT; unknown flag bits are malformed. */
	{
		static const uint8_t flags[] = { 0, P11A_HSIGN_FORWARDED, 0x02, 0x81 };
		struct p11a_msg d;

		for (size_t i = 0; i < sizeof(flags); i++) {
			for (int rel = 0; rel < 2; rel++) {
				b = body_new(P11A_MSG_H_SIGN);
				assert_int_equal(p11a_buf_put_u64(b, 7), 0);
				assert_int_equal(p11a_buf_put_u32(b, 42), 0);
				assert_int_equal(p11a_buf_put_cstring(b, rel ? "ssh" : "/usr/bin/ssh"), 0);
				assert_int_equal(p11a_buf_put_u8(b, flags[i]), 0);
				assert_int_equal(p11a_buf_put_cstring(b, "pkcs11:object=k"), 0);
				for (int k = 0; k < 4; k++)
					assert_int_equal(p11a_buf_put_u8(b, 3), 0);
				assert_int_equal(p11a_buf_put_u32(b, 0), 0);
				assert_int_equal(p11a_buf_put_string(b, "data", 4), 0);
				if (flags[i] <= P11A_HSIGN_FORWARDED && !rel) {
					assert_int_equal(p11a_msg_decode(p11a_buf_ptr(b), p11a_buf_len(b), &d), 0);
					assert_int_equal(d.u.hsign.flags, flags[i]);
					assert_string_equal(d.u.hsign.sign.key_uri, "pkcs11:object=k");
					p11a_msg_clear(&d);
					p11a_buf_free(b);
				} else {
					assert_int_equal(decode_buf(b), -P11A_E_MALFORMED);
				}
			}
		}
		memset(&d, 0, sizeof(d));
		d.type = P11A_MSG_H_SIGN;
		d.u.hsign.flags = 0x04;
		b = p11a_buf_new(P11A_FRAME_MAX);
		assert_non_null(b);
		assert_int_equal(p11a_msg_encode(&d, b), -P11A_E_INTERNAL);
		p11a_buf_free(b);
	}
	/* ERROR with code 0 would read as success. */
	b = body_new(P11A_MSG_ERROR);
	assert_int_equal(p11a_buf_put_u32(b, 0), 0);
	assert_int_equal(p11a_buf_put_cstring(b, "x"), 0);
	assert_int_equal(decode_buf(b), -P11A_E_MALFORMED);
}

static void
test_encode_oversize(void **state)
{
	struct p11a_buf *b = p11a_buf_new(2 * P11A_FRAME_MAX);
	char *big = filled(P11A_FRAME_MAX + 10);
	struct p11a_msg m;

	assert_non_null(b);
	/* out keeps its old content whenever encode fails. */
	assert_int_equal(p11a_buf_put(b, "keep", 4), 0);

	memset(&m, 0, sizeof(m));
	m.type = P11A_MSG_OPEN_CHANNEL;
	big[P11A_URI_MAX + 1] = '\0';
	m.u.open_channel.key_uri = big;
	assert_int_equal(p11a_msg_encode(&m, b), -P11A_E_TOO_LARGE);
	assert_int_equal(p11a_buf_len(b), 4);
	big[P11A_URI_MAX + 1] = 'a';
	big[P11A_URI_MAX] = '\0';
	assert_int_equal(p11a_msg_encode(&m, b), 0);
	p11a_buf_reset(b);
	assert_int_equal(p11a_buf_put(b, "keep", 4), 0);
	big[P11A_URI_MAX] = 'a';

	memset(&m, 0, sizeof(m));
	m.type = P11A_MSG_UNLOCK;
	m.u.unlock.pin_len = P11A_PIN_MAX + 1;
	assert_int_equal(p11a_msg_encode(&m, b), -P11A_E_TOO_LARGE);
	assert_int_equal(p11a_buf_len(b), 4);

	memset(&m, 0, sizeof(m));
	m.type = P11A_MSG_SIGNATURE;
	m.u.signature.sig = (uint8_t *)big;
	m.u.signature.sig_len = P11A_SIG_MAX + 1;
	assert_int_equal(p11a_msg_encode(&m, b), -P11A_E_TOO_LARGE);
	assert_int_equal(p11a_buf_len(b), 4);

	memset(&m, 0, sizeof(m));
	m.type = P11A_MSG_LIST_REPLY;
	m.u.list.ntokens = P11A_LIST_MAX + 1;
	m.u.list.tokens = sample_tokens;
	assert_int_equal(p11a_msg_encode(&m, b), -P11A_E_TOO_LARGE);
	assert_int_equal(p11a_buf_len(b), 4);

	/* The whole body over the frame cap: data near the cap plus the header fields. */
	memset(&m, 0, sizeof(m));
	m.type = P11A_MSG_SIGN;
	m.u.sign.key_uri = "pkcs11:object=k";
	m.u.sign.data = (uint8_t *)big;
	m.u.sign.data_len = P11A_FRAME_MAX - 20;
	assert_int_equal(p11a_msg_encode(&m, b), -P11A_E_TOO_LARGE);
	assert_int_equal(p11a_buf_len(b), 4);
	assert_memory_equal(p11a_buf_ptr(b), "keep", 4);
	/* Exactly at the cap it fits and decodes. */
	m.u.sign.data_len = P11A_FRAME_MAX - (1 + 4 + 15 + 8 + 4);
	p11a_buf_reset(b);
	assert_int_equal(p11a_msg_encode(&m, b), 0);
	assert_int_equal(p11a_buf_len(b), P11A_FRAME_MAX);
	{
		struct p11a_msg d;

		assert_int_equal(p11a_msg_decode(p11a_buf_ptr(b), p11a_buf_len(b), &d), 0);
		assert_int_equal(d.u.sign.data_len, m.u.sign.data_len);
		p11a_msg_clear(&d);
	}
	/* The output buffer's own limit. */
	p11a_buf_free(b);
	b = p11a_buf_new(10);
	assert_non_null(b);
	sample(0, &m);
	assert_int_equal(p11a_msg_encode(&m, b), -P11A_E_TOO_LARGE);
	assert_int_equal(p11a_buf_len(b), 0);
	p11a_buf_free(b);
	free(big);
}

static void
test_unlock_pin(void **state)
{
	struct p11a_buf *b;
	struct p11a_msg m, d;
	char *pin = filled(P11A_PIN_MAX);

	memset(&m, 0, sizeof(m));
	m.type = P11A_MSG_UNLOCK;
	memcpy(m.u.unlock.pin, pin, P11A_PIN_MAX);
	m.u.unlock.pin_len = P11A_PIN_MAX;
	b = p11a_buf_new(P11A_FRAME_MAX);
	assert_non_null(b);
	assert_int_equal(p11a_msg_encode(&m, b), 0);
	assert_int_equal(p11a_msg_decode(p11a_buf_ptr(b), p11a_buf_len(b), &d), 0);
	assert_string_equal(d.u.unlock.token_uri, "");
	assert_int_equal(d.u.unlock.pin_len, P11A_PIN_MAX);
	assert_memory_equal(d.u.unlock.pin, pin, P11A_PIN_MAX);
	assert_int_equal(d.u.unlock.pin[P11A_PIN_MAX], '\0');
	p11a_msg_clear(&d);
	assert_true(is_zero(d.u.unlock.pin, sizeof(d.u.unlock.pin)));
	p11a_buf_free(b);
	free(pin);
}

static void
test_internal(void **state)
{
	struct p11a_buf *b = p11a_buf_new(P11A_FRAME_MAX);
	struct p11a_msg m, d;
	uint32_t id;
	char *big;

	assert_non_null(b);
	sample(9, &m);
	assert_int_equal(p11a_msg_encode_internal(0xdeadbeef, &m, b), 0);
	assert_memory_equal(p11a_buf_ptr(b), "\xde\xad\xbe\xef\x42", 5);
	assert_int_equal(p11a_msg_decode_internal(p11a_buf_ptr(b), p11a_buf_len(b), &id, &d), 0);
	assert_int_equal(id, 0xdeadbeef);
	assert_msg_same(&m, &d);
	p11a_msg_clear(&d);
	/* The id comes back even when the body is bad. */
	p11a_buf_reset(b);
	assert_int_equal(p11a_buf_put(b, "\0\0\0\x07\x7f", 5), 0);
	assert_int_equal(p11a_msg_decode_internal(p11a_buf_ptr(b), p11a_buf_len(b), &id, &d),
	    -P11A_E_UNKNOWN_TYPE);
	assert_int_equal(id, 7);
	assert_int_equal(p11a_msg_decode_internal(p11a_buf_ptr(b), 4, &id, &d), -P11A_E_TRUNCATED);
	assert_int_equal(p11a_msg_decode_internal(p11a_buf_ptr(b), 3, &id, &d), -P11A_E_TRUNCATED);
	/* id + body share the frame cap. */
	p11a_buf_reset(b);
	big = filled(P11A_FRAME_MAX);
	memset(&m, 0, sizeof(m));
	m.type = P11A_MSG_SIGN;
	m.u.sign.key_uri = "";
	m.u.sign.data = (uint8_t *)big;
	m.u.sign.data_len = P11A_FRAME_MAX - (1 + 4 + 8 + 4);
	assert_int_equal(p11a_msg_encode_internal(1, &m, b), -P11A_E_TOO_LARGE);
	assert_int_equal(p11a_buf_len(b), 0);
	m.u.sign.data_len -= 4;
	assert_int_equal(p11a_msg_encode_internal(1, &m, b), 0);
	assert_int_equal(p11a_buf_len(b), P11A_FRAME_MAX);
	free(big);
	p11a_buf_free(b);
}

static void
test_set_error(void **state)
{
	struct p11a_msg m;
	char *big;

	assert_int_equal(p11a_msg_set_error(&m, -P11A_E_NO_SUCH_KEY, "no key matches '%s'", "x"), 0);
	assert_int_equal(m.type, P11A_MSG_ERROR);
	assert_int_equal(m.u.error.code, P11A_E_NO_SUCH_KEY);
	assert_string_equal(m.u.error.message, "no key matches 'x'");
	p11a_msg_clear(&m);
	assert_int_equal(p11a_msg_set_error(&m, P11A_E_BUSY, NULL), 0);
	assert_int_equal(m.u.error.code, P11A_E_BUSY);
	assert_string_equal(m.u.error.message, p11a_strerror(P11A_E_BUSY));
	p11a_msg_clear(&m);
	assert_int_equal(p11a_msg_set_error(&m, 0, "%s", "oops"), 0);
	assert_int_equal(m.u.error.code, P11A_E_INTERNAL);
	p11a_msg_clear(&m);
	/* A reason that formats to "" gets the code's text: callers need no fallback. */
	assert_int_equal(p11a_msg_set_error(&m, P11A_E_TOKEN, "%s", ""), 0);
	assert_string_equal(m.u.error.message, p11a_strerror(P11A_E_TOKEN));
	p11a_msg_clear(&m);
	/* Over-long text is cut so the message still encodes, not inside a UTF-8 sequence. */
	big = filled(P11A_TEXT_MAX + 10);
	memcpy(big + P11A_TEXT_MAX - 1, "\xc3\xa9", 2);
	assert_int_equal(p11a_msg_set_error(&m, P11A_E_TOKEN, "%s", big), 0);
	assert_int_equal(strlen(m.u.error.message), P11A_TEXT_MAX - 1);
	{
		struct p11a_buf *b = p11a_buf_new(P11A_FRAME_MAX);

		assert_non_null(b);
		assert_int_equal(p11a_msg_encode(&m, b), 0);
		p11a_buf_free(b);
	}
	p11a_msg_clear(&m);
	free(big);
}

static void
test_copy_clear(void **state)
{
	struct p11a_token t;
	struct p11a_key k;
	size_t i;

	for (i = 0; i < 2; i++) {
		assert_int_equal(p11a_token_copy(&t, &sample_tokens[i]), 0);
		assert_token_same(&t, &sample_tokens[i]);
		assert_ptr_not_equal(t.uri, sample_tokens[i].uri);
		p11a_token_clear(&t);
		assert_true(is_zero(&t, sizeof(t)));

		assert_int_equal(p11a_key_copy(&k, &sample_keys[i]), 0);
		assert_key_same(&k, &sample_keys[i]);
		if (sample_keys[i].id != NULL)
			assert_ptr_not_equal(k.id, sample_keys[i].id);
		p11a_key_clear(&k);
		assert_true(is_zero(&k, sizeof(k)));
	}
	p11a_token_clear(NULL);
	p11a_key_clear(NULL);
	p11a_msg_clear(NULL);
}

/* ------------------------------------------------------------ frames */

static void
spair(int sv[2])
{
	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
}

/*
 * Forked children report on a pipe rather than through their exit status,
 * which valgrind replaces with its own when it finds leaks in the child.
 */
static void
child_report(int wfd, int ok)
{
	char c = ok ? 'Y' : 'N';

	_exit(write(wfd, &c, 1) == 1 ? 0 : 1);
}

static void
child_wait(pid_t pid, int rfd)
{
	char c = 0;

	assert_int_equal(read(rfd, &c, 1), 1);
	assert_int_equal(c, 'Y');
	close(rfd);
	assert_int_equal(waitpid(pid, NULL, 0), pid);
}

static void
test_frame_roundtrip_fd(void **state)
{
	struct p11a_buf *out = encode_sample(6), *in = p11a_buf_new(P11A_FRAME_MAX);
	int sv[2], pfd[2], got = -2, i;
	char c;

	assert_non_null(in);
	spair(sv);
	assert_int_equal(pipe(pfd), 0);
	/* Three frames back to back, each with its own descriptor. */
	for (i = 0; i < 3; i++)
		assert_int_equal(p11a_frame_write(sv[0], out, pfd[1], 1000), 0);
	assert_int_equal(p11a_frame_write(sv[0], out, -1, 1000), 0);
	close(pfd[1]);
	for (i = 0; i < 3; i++) {
		assert_int_equal(p11a_frame_read(sv[1], in, &got, 1000), 0);
		assert_int_equal(p11a_buf_len(in), p11a_buf_len(out));
		assert_memory_equal(p11a_buf_ptr(in), p11a_buf_ptr(out), p11a_buf_len(out));
		assert_true(got >= 0);
		assert_true(fcntl(got, F_GETFD) & FD_CLOEXEC);
		c = (char)('0' + i);
		assert_int_equal(write(got, &c, 1), 1);
		close(got);
	}
	/* No descriptor on the last one. */
	assert_int_equal(p11a_frame_read(sv[1], in, &got, 1000), 0);
	assert_int_equal(got, -1);
	/* Every passed copy went through and is closed: the pipe reads "012" then EOF. */
	{
		char buf[8];

		assert_int_equal(read(pfd[0], buf, sizeof(buf)), 3);
		assert_memory_equal(buf, "012", 3);
		assert_int_equal(read(pfd[0], buf, sizeof(buf)), 0);
	}
	close(pfd[0]);
	close(sv[0]);
	close(sv[1]);
	p11a_buf_free(out);
	p11a_buf_free(in);
}

static void
test_frame_fd_dropped(void **state)
{
	struct p11a_buf *out = encode_sample(15), *in = p11a_buf_new(100);
	int sv[2], pfd[2];
	char buf[4];

	assert_non_null(in);
	spair(sv);
	assert_int_equal(pipe(pfd), 0);
	assert_int_equal(p11a_frame_write(sv[0], out, pfd[1], 1000), 0);
	close(pfd[1]);
	/* Not asked for: the descriptor is closed, so the pipe sees EOF. */
	assert_int_equal(p11a_frame_read(sv[1], in, NULL, 1000), 0);
	assert_int_equal(p11a_buf_ptr(in)[0], P11A_MSG_CHANNEL);
	assert_int_equal(read(pfd[0], buf, sizeof(buf)), 0);
	close(pfd[0]);
	close(sv[0]);
	close(sv[1]);
	p11a_buf_free(out);
	p11a_buf_free(in);
}

static void
check_refused_length(uint32_t len, int want)
{
	struct p11a_buf *in = p11a_buf_new(P11A_FRAME_MAX);
	uint8_t raw[8] = {
		(uint8_t)(len >> 24), (uint8_t)(len >> 16), (uint8_t)(len >> 8), (uint8_t)len,
		'W', 'X', 'Y', 'Z'
	};
	int sv[2], fd = 5;
	char rest[8];

	assert_non_null(in);
	spair(sv);
	assert_int_equal(write(sv[0], raw, sizeof(raw)), (ssize_t)sizeof(raw));
	assert_int_equal(p11a_frame_read(sv[1], in, &fd, 1000), want);
	assert_int_equal(fd, -1);
	assert_int_equal(p11a_buf_len(in), 0);
	/* Refused after the 4 length bytes: the body was not read. */
	assert_int_equal(recv(sv[1], rest, sizeof(rest), MSG_DONTWAIT), 4);
	assert_memory_equal(rest, "WXYZ", 4);
	close(sv[0]);
	close(sv[1]);
	p11a_buf_free(in);
}

static void
test_frame_refuses_lengths(void **state)
{
	check_refused_length(0, -P11A_E_MALFORMED);
	check_refused_length(P11A_FRAME_MAX + 1, -P11A_E_TOO_LARGE);
	check_refused_length(0xffffffff, -P11A_E_TOO_LARGE);
}

static void
test_frame_max(void **state)
{
	struct p11a_buf *out = p11a_buf_new(P11A_FRAME_MAX + 1);
	struct p11a_buf *in = p11a_buf_new(P11A_FRAME_MAX), *small = p11a_buf_new(100);
	uint8_t *p;
	int sv[2], res[2];
	pid_t pid;
	size_t i;

	assert_non_null(out);
	assert_non_null(in);
	assert_non_null(small);
	assert_int_equal(p11a_buf_reserve(out, P11A_FRAME_MAX, &p), 0);
	for (i = 0; i < P11A_FRAME_MAX; i++)
		p[i] = (uint8_t)(i * 31);
	spair(sv);
	assert_int_equal(pipe(res), 0);
	/* The socket buffer is smaller than a full frame: write from another process. */
	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		close(sv[1]);
		close(res[0]);
		if (p11a_frame_write(sv[0], out, -1, 5000) != 0)
			child_report(res[1], 0);
		/* The reader refuses this one and hangs up: EPIPE here. */
		child_report(res[1], p11a_frame_write(sv[0], out, -1, 5000) == -P11A_E_IO);
	}
	close(res[1]);
	close(sv[0]);
	assert_int_equal(p11a_frame_read(sv[1], in, NULL, 5000), 0);
	assert_int_equal(p11a_buf_len(in), P11A_FRAME_MAX);
	assert_memory_equal(p11a_buf_ptr(in), p11a_buf_ptr(out), P11A_FRAME_MAX);
	/* A receiver whose buffer is smaller refuses before reading the body. */
	assert_int_equal(p11a_frame_read(sv[1], small, NULL, 5000), -P11A_E_TOO_LARGE);
	close(sv[1]);
	child_wait(pid, res[0]);

	/* The writer refuses what a reader would refuse. */
	spair(sv);
	assert_int_equal(p11a_buf_put_u8(out, 0), 0);
	assert_int_equal(p11a_frame_write(sv[0], out, -1, 100), -P11A_E_TOO_LARGE);
	p11a_buf_reset(out);
	assert_int_equal(p11a_frame_write(sv[0], out, -1, 100), -P11A_E_MALFORMED);
	close(sv[0]);
	close(sv[1]);
	p11a_buf_free(out);
	p11a_buf_free(in);
	p11a_buf_free(small);
}

static void
test_frame_eof_timeout(void **state)
{
	struct p11a_buf *in = p11a_buf_new(P11A_FRAME_MAX), *out;
	int sv[2];

	assert_non_null(in);
	/* Nothing arrives. */
	spair(sv);
	assert_int_equal(p11a_frame_read(sv[1], in, NULL, 50), -P11A_E_TIMEOUT);
	/* Half a header, then nothing. */
	assert_int_equal(write(sv[0], "\0\0", 2), 2);
	assert_int_equal(p11a_frame_read(sv[1], in, NULL, 50), -P11A_E_TIMEOUT);
	close(sv[0]);
	close(sv[1]);

	/* Clean close before a frame: errno 0. */
	spair(sv);
	close(sv[0]);
	errno = EINVAL;
	assert_int_equal(p11a_frame_read(sv[1], in, NULL, 1000), -P11A_E_IO);
	assert_int_equal(errno, 0);
	close(sv[1]);
	/* Close inside the header and inside the body: ECONNRESET. */
	spair(sv);
	assert_int_equal(write(sv[0], "\0\0", 2), 2);
	close(sv[0]);
	assert_int_equal(p11a_frame_read(sv[1], in, NULL, 1000), -P11A_E_IO);
	assert_int_equal(errno, ECONNRESET);
	close(sv[1]);
	spair(sv);
	assert_int_equal(write(sv[0], "\0\0\0\x05\x80\x80", 6), 6);
	close(sv[0]);
	assert_int_equal(p11a_frame_read(sv[1], in, NULL, 1000), -P11A_E_IO);
	assert_int_equal(errno, ECONNRESET);
	assert_int_equal(p11a_buf_len(in), 0);
	close(sv[1]);

	/* Writing to a closed peer fails without SIGPIPE. */
	out = encode_sample(10);
	spair(sv);
	close(sv[1]);
	assert_int_equal(p11a_frame_write(sv[0], out, -1, 1000), -P11A_E_IO);
	assert_int_equal(errno, EPIPE);
	close(sv[0]);
	p11a_buf_free(out);

	/* A peer that does not read: the write times out. */
	out = p11a_buf_new(P11A_FRAME_MAX);
	assert_non_null(out);
	{
		uint8_t *p;

		assert_int_equal(p11a_buf_reserve(out, P11A_FRAME_MAX, &p), 0);
		memset(p, 1, P11A_FRAME_MAX);
	}
	spair(sv);
	{
		int sz = 4096;

		(void)setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz));
		(void)setsockopt(sv[1], SOL_SOCKET, SO_RCVBUF, &sz, sizeof(sz));
	}
	assert_int_equal(p11a_frame_write(sv[0], out, -1, 50), -P11A_E_TIMEOUT);
	close(sv[0]);
	close(sv[1]);
	p11a_buf_free(out);
	p11a_buf_free(in);
}

/* ------------------------------------------------------------ buffered reader */

static int64_t
mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Writes [u32 n][body of n bytes made from seed] at dst; returns 4 + n. */
static size_t
raw_frame(uint8_t *dst, size_t n, unsigned seed)
{
	size_t i;

	dst[0] = (uint8_t)(n >> 24);
	dst[1] = (uint8_t)(n >> 16);
	dst[2] = (uint8_t)(n >> 8);
	dst[3] = (uint8_t)n;
	for (i = 0; i < n; i++)
		dst[4 + i] = (uint8_t)(seed + i * 7);
	return 4 + n;
}

static void
expect_frame(struct p11a_reader *rd, struct p11a_buf *in, const uint8_t *raw, int timeout_ms)
{
	size_t n = ((size_t)raw[0] << 24) | ((size_t)raw[1] << 16) | ((size_t)raw[2] << 8) | raw[3];

	assert_int_equal(p11a_reader_read(rd, in, NULL, timeout_ms, timeout_ms), 0);
	assert_int_equal(p11a_buf_len(in), n);
	assert_memory_equal(p11a_buf_ptr(in), raw + 4, n);
}

/*
 * A writer thread that sends a byte stream in pieces cut at the given
 * offsets, each piece only after the reader has taken every byte of the
 * one before (the socket's queue is empty), so that each cut is a cut the
 * reader sees.
 */
struct piecewise {
	int wfd, rfd;
	const uint8_t *p;
	size_t n;
	const size_t *cuts;     /* ascending, inside (0, n) */
	size_t ncuts;
	int delay_ms;           /* before the first piece */
	int failed;
};

static void
queue_drained(int rfd)
{
	int q;

	for (;;) {
		if (ioctl(rfd, FIONREAD, &q) != 0 || q == 0)
			return;
		usleep(20);
	}
}

static void *
piecewise_main(void *arg)
{
	struct piecewise *w = arg;
	size_t from = 0, to, i;

	if (w->delay_ms > 0)
		usleep((useconds_t)w->delay_ms * 1000);
	for (i = 0; i <= w->ncuts; i++) {
		to = i < w->ncuts ? w->cuts[i] : w->n;
		while (from < to) {
			ssize_t k = write(w->wfd, w->p + from, to - from);

			if (k <= 0) {
				w->failed = 1;
				return NULL;
			}
			from += (size_t)k;
		}
		if (i < w->ncuts)
			queue_drained(w->rfd);
	}
	return NULL;
}

/* ------------------------------------------------------------ framing layer (frame.c) */

/* A frame [u32 len][body of n bytes, value v] in a fresh buffer. */
static struct p11a_buf *
framed(size_t n, uint8_t v)
{
	struct p11a_buf *b = p11a_buf_new(n + 4);
	uint8_t hdr[4], *p;

	assert_non_null(b);
	p11a_frame_hdr_put(hdr, (uint32_t)n);
	assert_int_equal(p11a_buf_put(b, hdr, 4), 0);
	assert_int_equal(p11a_buf_reserve(b, n, &p), 0);
	memset(p, v, n);
	return b;
}

/* Two frames fed one byte at a time: each comes out whole, exactly at its last byte. */
static void
test_frame_in_feed_bytewise(void **state)
{
	struct p11a_frame_in in;
	struct p11a_buf *a = framed(5, 0xaa), *b = framed(300, 0xbb);
	size_t used;
	(void)state;

	p11a_frame_in_init(&in, NULL, 0);
	for (int f = 0; f < 2; f++) {
		struct p11a_buf *src = f == 0 ? a : b;
		const uint8_t *p = p11a_buf_ptr(src);
		size_t n = p11a_buf_len(src);
		for (size_t i = 0; i < n; i++) {
			int r = p11a_frame_in_feed(&in, p + i, 1, &used);
			assert_int_equal(used, 1);
			assert_int_equal(r, i + 1 == n ? 1 : 0);
			assert_int_equal(p11a_frame_in_started(&in), 1);
			assert_true(in.started_ms > 0);
		}
		assert_int_equal(p11a_buf_len(in.body), n - 4);
		assert_int_equal(p11a_buf_ptr(in.body)[n - 5], f == 0 ? 0xaa : 0xbb);
		p11a_frame_in_reset(&in);
		assert_int_equal(p11a_frame_in_started(&in), 0);
		assert_int_equal(in.started_ms, 0);
	}
	/* Fed at once, it stops at the end of the first frame. */
	{
		uint8_t two[9 + 304];
		memcpy(two, p11a_buf_ptr(a), 9);
		memcpy(two + 9, p11a_buf_ptr(b), 304);
		assert_int_equal(p11a_frame_in_feed(&in, two, sizeof(two), &used), 1);
		assert_int_equal(used, 9);
		p11a_frame_in_reset(&in);
		assert_int_equal(p11a_frame_in_feed(&in, two + 9, sizeof(two) - 9, &used), 1);
		assert_int_equal(used, 304);
		p11a_frame_in_reset(&in);
	}
	p11a_buf_free(a);
	p11a_buf_free(b);
}

/* Lengths 0 and over the cap are refused at the header, before any body byte. */
static void
test_frame_in_refuses(void **state)
{
	struct p11a_frame_in in;
	struct p11a_buf *small = p11a_buf_new(16);
	uint8_t h[4];
	size_t used;
	uint32_t len;
	(void)state;

	p11a_frame_in_init(&in, NULL, 0);
	p11a_frame_hdr_put(h, P11A_FRAME_MAX + 1);
	assert_int_equal(p11a_frame_in_feed(&in, h, 3, &used), 0);
	assert_int_equal(p11a_frame_in_feed(&in, h + 3, 1, &used), -P11A_E_TOO_LARGE);
	assert_int_equal(errno, EMSGSIZE);
	assert_null(in.body);                  /* nothing buffered */
	p11a_frame_in_reset(&in);
	p11a_frame_hdr_put(h, 0);
	assert_int_equal(p11a_frame_in_feed(&in, h, 4, &used), -P11A_E_MALFORMED);
	assert_int_equal(errno, EPROTO);
	p11a_frame_in_reset(&in);
	p11a_frame_hdr_put(h, P11A_FRAME_MAX);
	assert_int_equal(p11a_frame_in_feed(&in, h, 4, &used), 0);
	p11a_frame_in_reset(&in);
	/* A caller's buffer caps the length too. */
	p11a_frame_in_init(&in, small, 0);
	p11a_frame_hdr_put(h, 17);
	assert_int_equal(p11a_frame_in_feed(&in, h, 4, &used), -P11A_E_TOO_LARGE);
	p11a_frame_in_reset(&in);
	assert_int_equal(p11a_frame_hdr_parse((const uint8_t[]){ 0, 0, 0, 16 }, 16, &len), 0);
	assert_int_equal(len, 16);
	p11a_buf_free(small);
}

/* recv: half a frame leaves 0 (resumable); EOF mid-frame is ECONNRESET, before one errno 0. */
static void
test_frame_in_recv_eof(void **state)
{
	struct p11a_frame_in in;
	struct p11a_buf *f = framed(100, 0x42);
	int sv[2];
	(void)state;

	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv), 0);
	p11a_frame_in_init(&in, NULL, 0);
	assert_int_equal(p11a_frame_in_recv(&in, sv[0]), 0);        /* nothing yet */
	assert_int_equal(p11a_frame_in_started(&in), 0);
	assert_int_equal(write(sv[1], p11a_buf_ptr(f), 2), 2);
	assert_int_equal(p11a_frame_in_recv(&in, sv[0]), 0);
	assert_int_equal(write(sv[1], p11a_buf_ptr(f) + 2, 50), 50);
	assert_int_equal(p11a_frame_in_recv(&in, sv[0]), 0);
	assert_int_equal(in.got, 48);
	assert_int_equal(write(sv[1], p11a_buf_ptr(f) + 52, 52), 52);
	assert_int_equal(p11a_frame_in_recv(&in, sv[0]), 1);
	assert_int_equal(p11a_buf_len(in.body), 100);
	p11a_frame_in_reset(&in);
	/* Cut inside the next frame. */
	assert_int_equal(write(sv[1], p11a_buf_ptr(f), 10), 10);
	shutdown(sv[1], SHUT_WR);
	assert_int_equal(p11a_frame_in_recv(&in, sv[0]), -P11A_E_IO);
	assert_int_equal(errno, ECONNRESET);
	p11a_frame_in_reset(&in);
	/* A clean close between frames. */
	assert_int_equal(p11a_frame_in_recv(&in, sv[0]), -P11A_E_IO);
	assert_int_equal(errno, 0);
	p11a_frame_in_reset(&in);
	close(sv[0]);
	close(sv[1]);
	/* The blocking reader follows the same rule. */
	{
		struct p11a_buf *out = p11a_buf_new(P11A_FRAME_MAX);
		assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
		assert_int_equal(write(sv[1], p11a_buf_ptr(f), 7), 7);
		shutdown(sv[1], SHUT_WR);
		assert_int_equal(p11a_frame_read(sv[0], out, NULL, 1000), -P11A_E_IO);
		assert_int_equal(errno, ECONNRESET);
		assert_int_equal(p11a_buf_len(out), 0);
		p11a_buf_free(out);
		close(sv[0]);
		close(sv[1]);
	}
	p11a_buf_free(f);
}

/*
 * The writer queue against a small send buffer: a flush writes part,
 * says more is left, resumes where it stopped; the descriptor arrives
 * with the first frame; frames come out intact and in order.
 */
static void
test_frame_out_partial_flush(void **state)
{
	struct p11a_frame_out q = { 0 };
	struct p11a_frame_in in;
	struct p11a_buf *body[3];
	int sv[2], pipefd[2], sndbuf = 4096, partial = 0, got = 0, r;
	(void)state;

	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv), 0);
	assert_int_equal(setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf)), 0);
	assert_int_equal(pipe(pipefd), 0);
	for (int i = 0; i < 3; i++) {
		uint8_t *p;
		size_t n = i == 1 ? 200000 : 1000;
		body[i] = p11a_buf_new(n);
		assert_int_equal(p11a_buf_reserve(body[i], n, &p), 0);
		for (size_t k = 0; k < n; k++)
			p[k] = (uint8_t)(k * 7 + (size_t)i);
	}
	assert_int_equal(p11a_frame_out_push(&q, body[0], pipefd[0]), 0);  /* fd owned by q now */
	assert_int_equal(p11a_frame_out_push(&q, body[1], -1), 0);
	assert_int_equal(p11a_frame_out_push(&q, body[2], -1), 0);
	{
		struct p11a_buf *empty = p11a_buf_new(4);
		assert_int_equal(p11a_frame_out_push(&q, empty, -1), -P11A_E_MALFORMED);
		p11a_buf_free(empty);
	}
	p11a_frame_in_init(&in, NULL, P11A_FRAME_IN_FDS);
	while (got < 3) {
		r = p11a_frame_out_flush(&q, sv[0]);
		assert_true(r == 0 || r == 1);
		if (r == 1) {
			partial++;
			assert_int_equal(p11a_frame_out_empty(&q), 0);
		}
		while ((r = p11a_frame_in_recv(&in, sv[1])) == 1) {
			assert_int_equal(p11a_buf_len(in.body), p11a_buf_len(body[got]));
			assert_memory_equal(p11a_buf_ptr(in.body), p11a_buf_ptr(body[got]),
					    p11a_buf_len(body[got]));
			if (got == 0) {
				struct stat st;
				assert_true(in.fd >= 0);
				assert_int_equal(fstat(in.fd, &st), 0);
				assert_true(S_ISFIFO(st.st_mode));
				assert_true(fcntl(in.fd, F_GETFD) & FD_CLOEXEC);
			} else {
				assert_int_equal(in.fd, -1);
			}
			p11a_frame_in_reset(&in);  /* closes the received descriptor */
			got++;
		}
		assert_int_equal(r, 0);
	}
	assert_true(partial > 0);                 /* the 200 kB frame did not fit at once */
	assert_int_equal(p11a_frame_out_flush(&q, sv[0]), 0);
	assert_int_equal(p11a_frame_out_empty(&q), 1);
	/* A peer that is gone: -P11A_E_IO, no SIGPIPE; clear drops what is left. */
	assert_int_equal(p11a_frame_out_push(&q, body[2], -1), 0);
	close(sv[1]);
	assert_int_equal(p11a_frame_out_flush(&q, sv[0]), -P11A_E_IO);
	assert_int_equal(errno, EPIPE);
	p11a_frame_out_clear(&q);
	assert_int_equal(p11a_frame_out_empty(&q), 1);
	close(sv[0]);
	close(pipefd[1]);
	for (int i = 0; i < 3; i++)
		p11a_buf_free(body[i]);
}

static void
test_reader_two_frames_one_read(void **state)
{
	struct p11a_buf *in = p11a_buf_new(P11A_FRAME_MAX);
	struct p11a_reader *rd;
	uint8_t raw[64], peek;
	size_t a, b;
	int sv[2], fd = 5;

	assert_non_null(in);
	a = raw_frame(raw, 5, 1);
	b = raw_frame(raw + a, 20, 2);
	spair(sv);
	assert_non_null(rd = p11a_reader_new(sv[1], 0));
	assert_int_equal(p11a_reader_pending(rd), 0);
	/* Both frames in one write: one recvmsg takes them both. */
	assert_int_equal(write(sv[0], raw, a + b), (ssize_t)(a + b));
	assert_int_equal(p11a_reader_read(rd, in, &fd, 1000, 1000), 0);
	assert_int_equal(fd, -1);
	assert_int_equal(p11a_buf_len(in), 5);
	assert_memory_equal(p11a_buf_ptr(in), raw + 4, 5);
	/* The second one waits in the reader, not in the socket. */
	assert_int_equal(p11a_reader_pending(rd), b);
	assert_int_equal(recv(sv[1], &peek, 1, MSG_DONTWAIT | MSG_PEEK), -1);
	assert_true(errno == EAGAIN || errno == EWOULDBLOCK);
	/* It is not lost when the peer goes away... */
	close(sv[0]);
	expect_frame(rd, in, raw + a, 1000);
	assert_int_equal(p11a_reader_pending(rd), 0);
	/* ...and then the reader sees a clean close. */
	errno = EINVAL;
	assert_int_equal(p11a_reader_read(rd, in, NULL, 1000, 1000), -P11A_E_IO);
	assert_int_equal(errno, 0);
	p11a_reader_free(rd);
	close(sv[1]);
	p11a_buf_free(in);
}

/* Three frames (the last longer than the reader's own buffer), cut as given. */
static void
reader_stream_cut(const size_t *cuts, size_t ncuts, uint8_t *raw, size_t n, const size_t *starts,
		  size_t nframes, struct p11a_buf *in)
{
	struct piecewise w;
	struct p11a_reader *rd;
	pthread_t t;
	size_t i;
	int sv[2];

	spair(sv);
	assert_non_null(rd = p11a_reader_new(sv[1], 0));
	memset(&w, 0, sizeof(w));
	w.wfd = sv[0];
	w.rfd = sv[1];
	w.p = raw;
	w.n = n;
	w.cuts = cuts;
	w.ncuts = ncuts;
	assert_int_equal(pthread_create(&t, NULL, piecewise_main, &w), 0);
	for (i = 0; i < nframes; i++)
		expect_frame(rd, in, raw + starts[i], 5000);
	assert_int_equal(pthread_join(t, NULL), 0);
	assert_int_equal(w.failed, 0);
	assert_int_equal(p11a_reader_pending(rd), 0);
	close(sv[0]);
	errno = EINVAL;
	assert_int_equal(p11a_reader_read(rd, in, NULL, 1000, 1000), -P11A_E_IO);
	assert_int_equal(errno, 0);
	p11a_reader_free(rd);
	close(sv[1]);
}

static void
test_reader_split_everywhere(void **state)
{
	struct p11a_buf *in = p11a_buf_new(P11A_FRAME_MAX);
	size_t big = P11A_READER_SIZE + 100, n = 0, starts[3], cut, i, *cuts;
	uint8_t *raw = malloc(3 * 4 + 5 + 300 + big);

	assert_non_null(in);
	assert_non_null(raw);
	starts[0] = n;
	n += raw_frame(raw + n, 5, 3);
	starts[1] = n;
	n += raw_frame(raw + n, 300, 4);
	starts[2] = n;
	n += raw_frame(raw + n, big, 5);
	/* One cut, at every offset of the first two frames and around the third's edges. */
	for (cut = 1; cut < n; cut++) {
		if (cut > starts[2] + 8 && cut < n - 8 &&
		    cut != starts[2] + 4 + P11A_READER_SIZE && cut % 97 != 0)
			continue;
		reader_stream_cut(&cut, 1, raw, n, starts, 3, in);
	}
	/* Every byte on its own. */
	assert_non_null(cuts = malloc((n - 1) * sizeof(*cuts)));
	for (i = 0; i < n - 1; i++)
		cuts[i] = i + 1;
	reader_stream_cut(cuts, n - 1, raw, n, starts, 3, in);
	free(cuts);
	free(raw);
	p11a_buf_free(in);
}

/* sendmsg() of bytes with the given descriptors attached. */
static void
send_fds(int fd, const void *p, size_t n, const int *fds, size_t nfds)
{
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(4 * sizeof(int))];
	} cm;
	struct iovec iov = { .iov_base = (void *)p, .iov_len = n };
	struct msghdr mh;
	struct cmsghdr *cmsg;

	assert_true(nfds >= 1 && nfds <= 4);
	memset(&mh, 0, sizeof(mh));
	memset(&cm, 0, sizeof(cm));
	mh.msg_iov = &iov;
	mh.msg_iovlen = 1;
	mh.msg_control = cm.buf;
	mh.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
	cmsg = CMSG_FIRSTHDR(&mh);
	cmsg->cmsg_level = SOL_SOCKET;
	cmsg->cmsg_type = SCM_RIGHTS;
	cmsg->cmsg_len = CMSG_LEN(nfds * sizeof(int));
	memcpy(CMSG_DATA(cmsg), fds, nfds * sizeof(int));
	assert_int_equal(sendmsg(fd, &mh, MSG_NOSIGNAL), (ssize_t)n);
}

/* The pipe's reader sees exactly want (NULL: nothing), then EOF: every write end is closed. */
static void
pipe_says(int rfd, const char *want)
{
	char buf[16];
	size_t n = want != NULL ? strlen(want) : 0;

	if (n > 0) {
		assert_int_equal(read(rfd, buf, sizeof(buf)), (ssize_t)n);
		assert_memory_equal(buf, want, n);
	}
	assert_int_equal(read(rfd, buf, sizeof(buf)), 0);
	close(rfd);
}

static void
test_reader_fds(void **state)
{
	struct p11a_buf *out = encode_sample(15), *in = p11a_buf_new(P11A_FRAME_MAX);
	struct p11a_reader *rd;
	uint8_t raw[32];
	size_t n;
	int sv[2], pa[2], pb[2], pc[2], pd[2], two[2], got = -2;

	assert_non_null(in);
	spair(sv);
	assert_non_null(rd = p11a_reader_new(sv[1], P11A_READER_FDS));
	assert_int_equal(pipe(pa), 0);
	assert_int_equal(pipe(pb), 0);
	/*
	 * All sent before the first read: a descriptor stays with its own
	 * frame even when one recvmsg() returns it with an earlier frame.
	 */
	assert_int_equal(p11a_frame_write(sv[0], out, -1, 1000), 0);
	assert_int_equal(p11a_frame_write(sv[0], out, pa[1], 1000), 0);
	assert_int_equal(p11a_frame_write(sv[0], out, -1, 1000), 0);
	assert_int_equal(p11a_frame_write(sv[0], out, pb[1], 1000), 0);
	close(pa[1]);
	close(pb[1]);
	assert_int_equal(p11a_reader_read(rd, in, &got, 1000, 1000), 0);
	assert_int_equal(got, -1);
	assert_int_equal(p11a_reader_read(rd, in, &got, 1000, 1000), 0);
	assert_true(got >= 0);
	assert_true(fcntl(got, F_GETFD) & FD_CLOEXEC);
	assert_int_equal(write(got, "B", 1), 1);
	close(got);
	assert_int_equal(p11a_reader_read(rd, in, &got, 1000, 1000), 0);
	assert_int_equal(got, -1);
	assert_memory_equal(p11a_buf_ptr(in), p11a_buf_ptr(out), p11a_buf_len(out));
	/* Not asked for: closed. */
	assert_int_equal(p11a_reader_read(rd, in, NULL, 1000, 1000), 0);
	pipe_says(pa[0], "B");
	pipe_says(pb[0], NULL);

	/* Two descriptors with one frame: the first is kept, the other closed. */
	assert_int_equal(pipe(pc), 0);
	assert_int_equal(pipe(pd), 0);
	two[0] = pc[1];
	two[1] = pd[1];
	n = raw_frame(raw, 10, 6);
	send_fds(sv[0], raw, n, two, 2);
	close(pc[1]);
	close(pd[1]);
	assert_int_equal(p11a_reader_read(rd, in, &got, 1000, 1000), 0);
	assert_true(got >= 0);
	assert_int_equal(write(got, "C", 1), 1);
	close(got);
	pipe_says(pc[0], "C");
	pipe_says(pd[0], NULL);

	/* The descriptor of a frame that never completes is closed. */
	assert_int_equal(pipe(pa), 0);
	send_fds(sv[0], raw, 6, &pa[1], 1);    /* a frame cut short */
	close(pa[1]);
	assert_int_equal(p11a_reader_read(rd, in, &got, 50, 50), -P11A_E_TIMEOUT);
	assert_int_equal(got, -1);
	pipe_says(pa[0], NULL);
	p11a_reader_free(rd);
	close(sv[0]);
	close(sv[1]);

	/* A reader for a channel passes no control buffer: the kernel drops the descriptor. */
	spair(sv);
	assert_non_null(rd = p11a_reader_new(sv[1], 0));
	assert_int_equal(pipe(pa), 0);
	assert_int_equal(p11a_frame_write(sv[0], out, pa[1], 1000), 0);
	close(pa[1]);
	assert_int_equal(p11a_reader_read(rd, in, &got, 1000, 1000), 0);
	assert_int_equal(got, -1);
	assert_memory_equal(p11a_buf_ptr(in), p11a_buf_ptr(out), p11a_buf_len(out));
	pipe_says(pa[0], NULL);
	p11a_reader_free(rd);
	close(sv[0]);
	close(sv[1]);
	p11a_buf_free(out);
	p11a_buf_free(in);
}

static void
reader_refused_length(uint32_t len, size_t out_max, int want)
{
	struct p11a_buf *in = p11a_buf_new(out_max);
	struct p11a_reader *rd;
	uint8_t raw[8] = {
		(uint8_t)(len >> 24), (uint8_t)(len >> 16), (uint8_t)(len >> 8), (uint8_t)len,
		'W', 'X', 'Y', 'Z'
	};
	int sv[2];

	assert_non_null(in);
	spair(sv);
	assert_non_null(rd = p11a_reader_new(sv[1], 0));
	assert_int_equal(write(sv[0], raw, sizeof(raw)), (ssize_t)sizeof(raw));
	assert_int_equal(p11a_reader_read(rd, in, NULL, 1000, 1000), want);
	assert_int_equal(p11a_buf_len(in), 0);
	p11a_reader_free(rd);
	close(sv[0]);
	close(sv[1]);
	p11a_buf_free(in);
}

static void *
write_all_main(void *arg)
{
	struct piecewise *w = arg;

	w->ncuts = 0;
	return piecewise_main(w);
}

static void
test_reader_limits(void **state)
{
	struct p11a_buf *in = p11a_buf_new(P11A_FRAME_MAX);
	struct p11a_reader *rd;
	struct piecewise w;
	pthread_t t;
	size_t n, second;
	uint8_t *raw;
	int sv[2];

	reader_refused_length(0, P11A_FRAME_MAX, -P11A_E_MALFORMED);
	reader_refused_length(P11A_FRAME_MAX + 1, P11A_FRAME_MAX, -P11A_E_TOO_LARGE);
	reader_refused_length(0xffffffff, P11A_FRAME_MAX, -P11A_E_TOO_LARGE);
	reader_refused_length(101, 100, -P11A_E_TOO_LARGE);

	/* A frame of exactly the cap, then a small one right behind it. */
	assert_non_null(in);
	assert_non_null(raw = malloc(4 + P11A_FRAME_MAX + 4 + 10));
	n = raw_frame(raw, P11A_FRAME_MAX, 7);
	second = n;
	n += raw_frame(raw + n, 10, 8);
	spair(sv);
	assert_non_null(rd = p11a_reader_new(sv[1], 0));
	memset(&w, 0, sizeof(w));
	w.wfd = sv[0];
	w.rfd = sv[1];
	w.p = raw;
	w.n = n;
	assert_int_equal(pthread_create(&t, NULL, write_all_main, &w), 0);
	expect_frame(rd, in, raw, 5000);
	expect_frame(rd, in, raw + second, 5000);
	assert_int_equal(pthread_join(t, NULL), 0);
	assert_int_equal(w.failed, 0);
	p11a_reader_free(rd);
	close(sv[0]);
	close(sv[1]);
	free(raw);
	p11a_buf_free(in);
}

static void
test_reader_eof(void **state)
{
	struct p11a_buf *in = p11a_buf_new(P11A_FRAME_MAX);
	struct p11a_reader *rd;
	uint8_t raw[32];
	size_t n = raw_frame(raw, 10, 9);
	size_t cut;
	int sv[2];

	assert_non_null(in);
	/* EOF before a frame: a clean close. */
	spair(sv);
	assert_non_null(rd = p11a_reader_new(sv[1], 0));
	close(sv[0]);
	errno = EINVAL;
	assert_int_equal(p11a_reader_read(rd, in, NULL, 1000, 1000), -P11A_E_IO);
	assert_int_equal(errno, 0);
	p11a_reader_free(rd);
	close(sv[1]);
	/* EOF after any part of a frame: a cut frame. */
	for (cut = 1; cut < n; cut++) {
		spair(sv);
		assert_non_null(rd = p11a_reader_new(sv[1], 0));
		assert_int_equal(write(sv[0], raw, cut), (ssize_t)cut);
		close(sv[0]);
		errno = 0;
		assert_int_equal(p11a_reader_read(rd, in, NULL, 1000, 1000), -P11A_E_IO);
		assert_int_equal(errno, ECONNRESET);
		assert_int_equal(p11a_buf_len(in), 0);
		p11a_reader_free(rd);
		close(sv[1]);
	}
	/* The same when the cut frame's first bytes came with the frame before it. */
	spair(sv);
	assert_non_null(rd = p11a_reader_new(sv[1], 0));
	assert_int_equal(write(sv[0], raw, n), (ssize_t)n);
	assert_int_equal(write(sv[0], raw, 7), 7);
	close(sv[0]);
	expect_frame(rd, in, raw, 1000);
	errno = 0;
	assert_int_equal(p11a_reader_read(rd, in, NULL, 1000, 1000), -P11A_E_IO);
	assert_int_equal(errno, ECONNRESET);
	p11a_reader_free(rd);
	close(sv[1]);
	p11a_buf_free(in);
}

static void
test_reader_deadlines(void **state)
{
	struct p11a_buf *in = p11a_buf_new(P11A_FRAME_MAX);
	struct p11a_reader *rd;
	struct piecewise w;
	pthread_t t;
	uint8_t raw[32];
	size_t n = raw_frame(raw, 10, 10);
	int64_t t0, dt;
	int sv[2];

	/* A limit that does not hold would hang here: fail instead. */
	alarm(30);
	assert_non_null(in);
	/* Idle: the half-frame limit does not apply, only the call's. */
	spair(sv);
	assert_non_null(rd = p11a_reader_new(sv[1], 0));
	t0 = mono_ms();
	assert_int_equal(p11a_reader_read(rd, in, NULL, 200, 20), -P11A_E_TIMEOUT);
	dt = mono_ms() - t0;
	assert_true(dt >= 190);
	p11a_reader_free(rd);
	/* A started frame must end within frame_ms, even with no limit on the call. */
	assert_non_null(rd = p11a_reader_new(sv[1], 0));
	assert_int_equal(write(sv[0], raw, 2), 2);
	t0 = mono_ms();
	assert_int_equal(p11a_reader_read(rd, in, NULL, -1, 50), -P11A_E_TIMEOUT);
	dt = mono_ms() - t0;
	assert_true(dt >= 45 && dt < 2000);
	p11a_reader_free(rd);
	close(sv[0]);
	close(sv[1]);
	/* Inside the body too; and the call's limit still holds inside a frame. */
	spair(sv);
	assert_non_null(rd = p11a_reader_new(sv[1], 0));
	assert_int_equal(write(sv[0], raw, 9), 9);
	assert_int_equal(p11a_reader_read(rd, in, NULL, -1, 50), -P11A_E_TIMEOUT);
	p11a_reader_free(rd);
	assert_non_null(rd = p11a_reader_new(sv[1], 0));
	assert_int_equal(write(sv[0], raw, 9), 9);
	t0 = mono_ms();
	assert_int_equal(p11a_reader_read(rd, in, NULL, 50, 60000), -P11A_E_TIMEOUT);
	dt = mono_ms() - t0;
	assert_true(dt >= 45 && dt < 2000);
	p11a_reader_free(rd);
	close(sv[0]);
	close(sv[1]);
	/* A frame whose first bytes came with the one before it has started too. */
	spair(sv);
	assert_non_null(rd = p11a_reader_new(sv[1], 0));
	assert_int_equal(write(sv[0], raw, n), (ssize_t)n);
	assert_int_equal(write(sv[0], raw, 3), 3);
	expect_frame(rd, in, raw, 1000);
	assert_int_equal(p11a_reader_pending(rd), 3);
	assert_int_equal(p11a_reader_read(rd, in, NULL, -1, 50), -P11A_E_TIMEOUT);
	p11a_reader_free(rd);
	close(sv[0]);
	close(sv[1]);

	/* A frame that comes later, on a non-blocking descriptor, with no limit. */
	spair(sv);
	assert_int_equal(fcntl(sv[1], F_SETFL, O_NONBLOCK), 0);
	assert_non_null(rd = p11a_reader_new(sv[1], 0));
	memset(&w, 0, sizeof(w));
	w.wfd = sv[0];
	w.rfd = sv[1];
	w.p = raw;
	w.n = n;
	w.delay_ms = 50;
	assert_int_equal(pthread_create(&t, NULL, write_all_main, &w), 0);
	assert_int_equal(p11a_reader_read(rd, in, NULL, -1, -1), 0);
	assert_int_equal(p11a_buf_len(in), 10);
	assert_int_equal(pthread_join(t, NULL), 0);
	p11a_reader_free(rd);
	close(sv[0]);
	close(sv[1]);
	p11a_buf_free(in);
	alarm(0);
}

static void
test_fork_generation(void **state)
{
	uint64_t g = p11a_fork_generation();
	int res[2];
	pid_t pid;

	assert_int_equal(p11a_fork_generation(), g);
	assert_int_equal(pipe(res), 0);
	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		close(res[0]);
		child_report(res[1], p11a_fork_generation() != g);
	}
	close(res[1]);
	child_wait(pid, res[0]);
	assert_int_equal(p11a_fork_generation(), g);
}

/* ------------------------------------------------------------ URIs */

#ifdef HAVE_URI_TESTS
static void
pad(CK_UTF8CHAR *f, size_t n, const char *s)
{
	memset(f, ' ', n);
	memcpy(f, s, strlen(s));
}

static void
sample_token_info(CK_TOKEN_INFO *ti)
{
	memset(ti, 0, sizeof(*ti));
	pad(ti->label, sizeof(ti->label), "My Token");
	pad(ti->manufacturerID, sizeof(ti->manufacturerID), "SoftHSM project");
	pad(ti->model, sizeof(ti->model), "SoftHSM v2");
	pad(ti->serialNumber, sizeof(ti->serialNumber), "abc123");
}

static struct p11a_token uri_token = {
	"", "My Token", "SoftHSM project", "SoftHSM v2", "abc123", "softhsm2", 1
};
static struct p11a_token uri_other = {
	"", "Other", "SoftHSM project", "SoftHSM v2", "zzz", "softhsm2", 1
};
static uint8_t uri_id[] = { 0x01, 0xab };
static struct p11a_key uri_key = {
	"", "", "key 1", uri_id, sizeof(uri_id), P11A_KEY_RSA, 2048, "", NULL, 0,
	(uint8_t *)"c", 1, "", "cert 1", P11A_KEY_HAS_CERT
};
static struct p11a_key uri_key_nocert = {
	"", "", "key 2", uri_id, sizeof(uri_id), P11A_KEY_EC, 256, "P-256", NULL, 0,
	NULL, 0, "", "", 0
};

static int
matches_key(const char *uri, const struct p11a_token *t, const struct p11a_key *k)
{
	int err = 1, r;
	struct p11a_uri_matcher *m = p11a_uri_matcher_new(uri, &err);

	if (m == NULL)
		print_error("cannot parse %s\n", uri);
	assert_non_null(m);
	assert_int_equal(err, 0);
	r = p11a_uri_match_key(m, t, k);
	p11a_uri_matcher_free(m);
	return r;
}

static int
matches_token(const char *uri, const struct p11a_token *t)
{
	int err, r;
	struct p11a_uri_matcher *m = p11a_uri_matcher_new(uri, &err);

	assert_non_null(m);
	r = p11a_uri_match_token(m, t);
	p11a_uri_matcher_free(m);
	return r;
}

static void
test_uri_format(void **state)
{
	CK_TOKEN_INFO ti;
	char *s, *s2;

	sample_token_info(&ti);
	s = p11a_uri_format_token(&ti);
	assert_non_null(s);
	assert_true(strncmp(s, "pkcs11:", 7) == 0);
	assert_non_null(strstr(s, "token=My%20Token"));
	assert_non_null(strstr(s, "manufacturer=SoftHSM%20project"));
	assert_non_null(strstr(s, "model=SoftHSM%20v2"));
	assert_non_null(strstr(s, "serial=abc123"));
	assert_null(strstr(s, "type="));
	assert_int_equal(matches_token(s, &uri_token), 1);
	assert_int_equal(matches_token(s, &uri_other), 0);
	/* NUL padding (tpm2-pkcs11) gives the same URI. */
	memset(ti.label + 8, 0, sizeof(ti.label) - 8);
	s2 = p11a_uri_format_token(&ti);
	assert_non_null(s2);
	assert_string_equal(s, s2);
	free(s);
	free(s2);

	sample_token_info(&ti);
	s = p11a_uri_format_object(&ti, CKO_PRIVATE_KEY, uri_id, sizeof(uri_id), "key 1");
	assert_non_null(s);
	assert_non_null(strstr(s, "token=My%20Token"));
	assert_non_null(strstr(s, "object=key%201"));
	assert_non_null(strstr(s, "type=private"));
	assert_true(strstr(s, "id=%01%ab") != NULL || strstr(s, "id=%01%AB") != NULL);
	assert_int_equal(matches_key(s, &uri_token, &uri_key), 1);
	assert_int_equal(matches_key(s, &uri_other, &uri_key), 0);
	assert_int_equal(matches_key(s, &uri_token, &uri_key_nocert), 0);
	free(s);
	s = p11a_uri_format_object(&ti, CKO_CERTIFICATE, uri_id, sizeof(uri_id), "cert 1");
	assert_non_null(s);
	assert_non_null(strstr(s, "type=cert"));
	assert_int_equal(matches_key(s, &uri_token, &uri_key), 1);
	free(s);
	s = p11a_uri_format_object(&ti, CKO_PUBLIC_KEY, NULL, 0, NULL);
	assert_non_null(s);
	assert_non_null(strstr(s, "type=public"));
	assert_null(strstr(s, "id="));
	assert_null(strstr(s, "object="));
	assert_int_equal(matches_key(s, &uri_token, &uri_key), 1);
	assert_int_equal(matches_key(s, &uri_token, &uri_key_nocert), 1);
	free(s);
}

static void
test_uri_match_rules(void **state)
{
	const struct p11a_token *t = &uri_token;
	const struct p11a_key *k = &uri_key, *n = &uri_key_nocert;

	/* Token part. */
	assert_int_equal(matches_token("pkcs11:", t), 1);
	assert_int_equal(matches_token("pkcs11:token=My%20Token", t), 1);
	assert_int_equal(matches_token("pkcs11:token=My%20Token;serial=abc123", t), 1);
	assert_int_equal(matches_token("pkcs11:token=My%20Token;serial=abc124", t), 0);
	assert_int_equal(matches_token("pkcs11:token=My", t), 0);
	assert_int_equal(matches_token("pkcs11:model=SoftHSM%20v2;manufacturer=SoftHSM%20project", t), 1);
	assert_int_equal(matches_token("pkcs11:token=Other", &uri_other), 1);
	/* Labels: no type= matches either label. */
	assert_int_equal(matches_key("pkcs11:", t, k), 1);
	assert_int_equal(matches_key("pkcs11:object=key%201", t, k), 1);
	assert_int_equal(matches_key("pkcs11:object=cert%201", t, k), 1);
	assert_int_equal(matches_key("pkcs11:object=key", t, k), 0);
	/* type=private / public: the key's label only. */
	assert_int_equal(matches_key("pkcs11:object=key%201;type=private", t, k), 1);
	assert_int_equal(matches_key("pkcs11:object=key%201;type=public", t, k), 1);
	assert_int_equal(matches_key("pkcs11:object=cert%201;type=private", t, k), 0);
	assert_int_equal(matches_key("pkcs11:object=cert%201;type=public", t, k), 0);
	/* type=cert: the certificate's label, and there must be a certificate. */
	assert_int_equal(matches_key("pkcs11:object=cert%201;type=cert", t, k), 1);
	assert_int_equal(matches_key("pkcs11:object=key%201;type=cert", t, k), 0);
	assert_int_equal(matches_key("pkcs11:type=cert", t, k), 1);
	assert_int_equal(matches_key("pkcs11:type=cert", t, n), 0);
	assert_int_equal(matches_key("pkcs11:object=key%202", t, n), 1);
	assert_int_equal(matches_key("pkcs11:object=", t, n), 0);
	/* Other types never match. */
	assert_int_equal(matches_key("pkcs11:type=data", t, k), 0);
	assert_int_equal(matches_key("pkcs11:type=secret-key", t, k), 0);
	/* id. */
	assert_int_equal(matches_key("pkcs11:id=%01%ab", t, k), 1);
	assert_int_equal(matches_key("pkcs11:id=%01%AB;type=private", t, k), 1);
	assert_int_equal(matches_key("pkcs11:id=%01", t, k), 0);
	assert_int_equal(matches_key("pkcs11:id=%01%ab%00", t, k), 0);
	/* Token and object together. */
	assert_int_equal(matches_key("pkcs11:token=My%20Token;id=%01%ab;object=key%201", t, k), 1);
	assert_int_equal(matches_key("pkcs11:token=Other;object=key%201", t, k), 0);
	assert_int_equal(matches_key("pkcs11:token=My%20Token;object=key%201", &uri_other, k), 0);
	/* Attributes p11-kit does not know match nothing. */
	assert_int_equal(matches_key("pkcs11:x-vendor=1", t, k), 0);
}

static void
test_uri_bad(void **state)
{
	static const char *const bad[] = {
		"", "pkcs11", "http://example.com/", "file:///x", "pkcs12:token=a",
		"pkcs11:id=%zz", "pkcs11:token=%4",
	};
	char *longuri;
	size_t i;
	int err;

	for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		err = 0;
		if (p11a_uri_matcher_new(bad[i], &err) != NULL)
			print_error("accepted %s\n", bad[i]);
		assert_null(p11a_uri_matcher_new(bad[i], &err));
		assert_int_equal(err, -P11A_E_URI);
	}
	err = 0;
	assert_null(p11a_uri_matcher_new(NULL, &err));
	assert_int_equal(err, -P11A_E_URI);
	longuri = filled(P11A_URI_MAX + 1);
	memcpy(longuri, "pkcs11:object=", 14);
	err = 0;
	assert_null(p11a_uri_matcher_new(longuri, &err));
	assert_int_equal(err, -P11A_E_URI);
	free(longuri);
	assert_int_equal(p11a_uri_match_key(NULL, &uri_token, &uri_key), 0);
	p11a_uri_matcher_free(NULL);
}
#endif

/* ------------------------------------------------------------ client */

/*
 * A fake agent in a child process: HELLO, STATUS, LIST, UNLOCK (PIN
 * "1234"), LOCK, OPEN_CHANNEL (a socketpair end), and SIGN on channels.
 * SIGN data "die-once" closes the channel once, "restart-once" closes
 * every connection once (an agent restart), "locked" gets ERROR LOCKED,
 * "twice" gets its reply twice (a peer out of step); otherwise the
 * signature is "sig(DATA)#N", N the channels opened so far.
 */
#define FAKE_MAX 64

struct fake {
	int fd[FAKE_MAX];
	int chan[FAKE_MAX];
	int fwd[FAKE_MAX];          /* as if forwarded: CHANNEL comes without a descriptor */
	int n;
	int opens;
	int died, restarted;
};

static void
fake_add(struct fake *f, int fd, int chan)
{
	if (f->n == FAKE_MAX) {
		close(fd);
		return;
	}
	f->fd[f->n] = fd;
	f->chan[f->n] = chan;
	f->fwd[f->n] = 0;
	f->n++;
}

static void
fake_del(struct fake *f, int i)
{
	close(f->fd[i]);
	f->fd[i] = f->fd[f->n - 1];
	f->chan[i] = f->chan[f->n - 1];
	f->fwd[i] = f->fwd[f->n - 1];
	f->n--;
}

static int
fake_reply(int fd, struct p11a_msg *r, int pass_fd)
{
	struct p11a_buf *b = p11a_buf_new(P11A_FRAME_MAX);
	int rc = -1;

	if (b != NULL && p11a_msg_encode(r, b) == 0)
		rc = p11a_frame_write(fd, b, pass_fd, 1000);
	p11a_buf_free(b);
	p11a_msg_clear(r);
	return rc;
}

/* Returns 1 to drop connection i; 2 to drop every connection. */
static int
fake_serve(struct fake *f, int i)
{
	struct p11a_buf *in = p11a_buf_new(P11A_FRAME_MAX);
	struct p11a_msg m, r;
	int fd = f->fd[i], sv[2], rc = 0;
	char text[300];

	memset(&r, 0, sizeof(r));
	if (in == NULL || p11a_frame_read(fd, in, NULL, 1000) != 0 ||
	    p11a_msg_decode(p11a_buf_ptr(in), p11a_buf_len(in), &m) != 0) {
		p11a_buf_free(in);
		return 1;
	}
	p11a_buf_free(in);
	switch (m.type) {
	case P11A_MSG_HELLO:
		r.type = P11A_MSG_HELLO_REPLY;
		r.u.hello_reply.version = 1;
		/* "fwd-client": a forwarded client of a version-3 agent; "fwd-old": of a version-1 one. */
		if (strcmp(m.u.hello.client, "fwd-client") == 0 || strcmp(m.u.hello.client, "fwd-old") == 0) {
			f->fwd[i] = 1;
			if (strcmp(m.u.hello.client, "fwd-client") == 0)
				r.u.hello_reply.version = 3;
		}
		r.u.hello_reply.agent = strdup("fake agent");
		break;
	case P11A_MSG_STATUS:
		r.type = P11A_MSG_STATUS_REPLY;
		r.u.status.agent = strdup("fake agent");
		r.u.status.pid = (uint32_t)getpid();
		r.u.status.ntokens = 1;
		r.u.status.tokens = calloc(1, sizeof(struct p11a_token));
		(void)p11a_token_copy(r.u.status.tokens, &sample_tokens[0]);
		break;
	case P11A_MSG_LIST:
		r.type = P11A_MSG_LIST_REPLY;
		r.u.list.ntokens = 1;
		r.u.list.tokens = calloc(1, sizeof(struct p11a_token));
		(void)p11a_token_copy(r.u.list.tokens, &sample_tokens[0]);
		r.u.list.nkeys = 2;
		r.u.list.keys = calloc(2, sizeof(struct p11a_key));
		(void)p11a_key_copy(&r.u.list.keys[0], &sample_keys[0]);
		(void)p11a_key_copy(&r.u.list.keys[1], &sample_keys[1]);
		break;
	case P11A_MSG_UNLOCK:
		if (m.u.unlock.pin_len == 4 && memcmp(m.u.unlock.pin, "1234", 4) == 0 &&
		    strcmp(m.u.unlock.token_uri, "") == 0)
			r.type = P11A_MSG_OK;
		else
			(void)p11a_msg_set_error(&r, P11A_E_PIN_INCORRECT,
			    "PIN incorrect, %d tries left", 2);
		break;
	case P11A_MSG_LOCK:
		r.type = P11A_MSG_OK;
		break;
	case P11A_MSG_OPEN_CHANNEL:
		if (strcmp(m.u.open_channel.key_uri, "pkcs11:object=nokey") == 0) {
			(void)p11a_msg_set_error(&r, P11A_E_NO_SUCH_KEY, "no key matches '%s'",
			    m.u.open_channel.key_uri);
			break;
		}
		if (f->fwd[i]) {
			r.type = P11A_MSG_CHANNEL;      /* the descriptor is lost on the way */
			break;
		}
		if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
			(void)p11a_msg_set_error(&r, P11A_E_INTERNAL, NULL);
			break;
		}
		f->opens++;
		r.type = P11A_MSG_CHANNEL;
		(void)fake_reply(fd, &r, sv[1]);
		close(sv[1]);
		fake_add(f, sv[0], 1);
		p11a_msg_clear(&m);
		return 0;
	case P11A_MSG_SIGN:
		if (!f->chan[i] && !f->fwd[i]) {
			(void)p11a_msg_set_error(&r, P11A_E_PROTOCOL, "SIGN on a main connection");
			break;
		}
		if (m.u.sign.data_len == 8 && memcmp(m.u.sign.data, "die-once", 8) == 0 &&
		    !f->died) {
			f->died = 1;
			rc = 1;
			goto out;
		}
		if (m.u.sign.data_len == 12 && memcmp(m.u.sign.data, "restart-once", 12) == 0 &&
		    !f->restarted) {
			f->restarted = 1;
			rc = 2;
			goto out;
		}
		if (m.u.sign.data_len == 6 && memcmp(m.u.sign.data, "locked", 6) == 0) {
			(void)p11a_msg_set_error(&r, P11A_E_LOCKED, "token 'A' is locked");
			break;
		}
		snprintf(text, sizeof(text), "sig(%.*s)#%d", (int)m.u.sign.data_len,
		    (const char *)m.u.sign.data, f->opens);
		r.type = P11A_MSG_SIGNATURE;
		r.u.signature.sig = (uint8_t *)strdup(text);
		r.u.signature.sig_len = strlen(text);
		if (m.u.sign.data_len == 5 && memcmp(m.u.sign.data, "twice", 5) == 0) {
			/* Both in one write: the client reads them in one go. */
			struct p11a_buf *b = p11a_buf_new(P11A_FRAME_MAX);
			uint8_t two[2 * 64];
			size_t n;

			if (b == NULL || p11a_msg_encode(&r, b) != 0 ||
			    (n = p11a_buf_len(b)) > sizeof(two) / 2 - 4) {
				p11a_buf_free(b);
				rc = 1;
				goto out;
			}
			two[0] = two[1] = two[2] = 0;
			two[3] = (uint8_t)n;
			memcpy(two + 4, p11a_buf_ptr(b), n);
			memcpy(two + 4 + n, two, 4 + n);
			if (write(fd, two, 2 * (4 + n)) != (ssize_t)(2 * (4 + n)))
				rc = 1;
			p11a_buf_free(b);
			goto out;
		}
		break;
	default:
		(void)p11a_msg_set_error(&r, P11A_E_UNKNOWN_TYPE, "unknown type");
		break;
	}
	if (fake_reply(fd, &r, -1) != 0)
		rc = 1;
 out:
	p11a_msg_clear(&m);
	p11a_msg_clear(&r);
	return rc;
}

static void
fake_agent(int lfd)
{
	struct fake f;
	struct pollfd pfd[FAKE_MAX + 1];
	int i, n, r;

	memset(&f, 0, sizeof(f));
	for (;;) {
		pfd[0].fd = lfd;
		pfd[0].events = POLLIN;
		for (i = 0; i < f.n; i++) {
			pfd[i + 1].fd = f.fd[i];
			pfd[i + 1].events = POLLIN;
		}
		n = poll(pfd, (nfds_t)f.n + 1, -1);
		if (n < 0)
			continue;
		if (pfd[0].revents & POLLIN) {
			int c = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);

			if (c >= 0)
				fake_add(&f, c, 0);
			continue;
		}
		for (i = f.n - 1; i >= 0; i--) {
			if (!(pfd[i + 1].revents & (POLLIN | POLLHUP | POLLERR)))
				continue;
			r = fake_serve(&f, i);
			if (r == 1) {
				fake_del(&f, i);
			} else if (r == 2) {
				while (f.n > 0)
					fake_del(&f, 0);
			}
			break;      /* indices moved: poll again */
		}
	}
}

struct agent_env {
	char dir[64];
	char path[128];
	pid_t pid;
};

static int
listen_at(const char *path)
{
	struct sockaddr_un sa;
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	assert_true(fd >= 0);
	memset(&sa, 0, sizeof(sa));
	sa.sun_family = AF_UNIX;
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	assert_int_equal(listen(fd, 16), 0);
	return fd;
}

static int
setup_agent(void **state)
{
	struct agent_env *e = calloc(1, sizeof(*e));
	int lfd;

	if (e == NULL)
		return -1;
	snprintf(e->dir, sizeof(e->dir), "/tmp/p11a-test-XXXXXX");
	if (mkdtemp(e->dir) == NULL)
		return -1;
	snprintf(e->path, sizeof(e->path), "%s/agent.sock", e->dir);
	lfd = listen_at(e->path);
	e->pid = fork();
	if (e->pid < 0)
		return -1;
	if (e->pid == 0)
		fake_agent(lfd);
	close(lfd);
	*state = e;
	return 0;
}

static int
teardown_agent(void **state)
{
	struct agent_env *e = *state;

	kill(e->pid, SIGKILL);
	waitpid(e->pid, NULL, 0);
	unlink(e->path);
	rmdir(e->dir);
	free(e);
	return 0;
}

static void
sign_expect(struct p11a_client *c, const char *key, const char *data, const char *want)
{
	struct p11a_sign s;
	uint8_t *sig = NULL;
	size_t len = 0;
	int r;

	memset(&s, 0, sizeof(s));
	s.key_uri = (char *)key;
	s.scheme = P11A_SCHEME_ECDSA;
	s.hash = P11A_HASH_SHA256;
	s.data = (uint8_t *)data;
	s.data_len = strlen(data);
	r = p11a_client_sign(c, &s, &sig, &len);
	if (r != 0)
		print_error("sign %s: %d %s\n", data, r, p11a_client_last_error(c));
	assert_int_equal(r, 0);
	assert_int_equal(len, strlen(want));
	assert_memory_equal(sig, want, len);
	free(sig);
}

static void
test_client_requests(void **state)
{
	struct agent_env *e = *state;
	struct p11a_client *c = NULL;
	struct p11a_msg reply, req;
	char pin[P11A_PIN_MAX + 2];
	int fd;

	assert_int_equal(p11a_client_connect(e->path, "test_proto", 2000, &c, NULL, 0), 0);
	assert_non_null(c);
	assert_string_equal(p11a_client_path(c), e->path);
	assert_string_equal(p11a_client_last_error(c), "");

	assert_int_equal(p11a_client_status(c, &reply), 0);
	assert_int_equal(reply.type, P11A_MSG_STATUS_REPLY);
	assert_int_equal(reply.u.status.pid, (uint32_t)e->pid);
	assert_int_equal(reply.u.status.ntokens, 1);
	assert_token_same(&reply.u.status.tokens[0], &sample_tokens[0]);
	p11a_msg_clear(&reply);

	assert_int_equal(p11a_client_list(c, &reply), 0);
	assert_int_equal(reply.u.list.nkeys, 2);
	assert_key_same(&reply.u.list.keys[0], &sample_keys[0]);
	assert_key_same(&reply.u.list.keys[1], &sample_keys[1]);
	p11a_msg_clear(&reply);

	assert_int_equal(p11a_client_unlock(c, NULL, "0000", 4), -P11A_E_PIN_INCORRECT);
	assert_string_equal(p11a_client_last_error(c), "PIN incorrect, 2 tries left");
	assert_int_equal(p11a_client_unlock(c, "", "1234", 4), 0);
	memset(pin, '1', sizeof(pin));
	assert_int_equal(p11a_client_unlock(c, NULL, pin, P11A_PIN_MAX + 1), -P11A_E_PIN_INVALID);
	assert_int_equal(p11a_client_lock(c, NULL), 0);

	/* A raw call: ERROR is mapped, and the connection stays usable. */
	memset(&req, 0, sizeof(req));
	req.type = P11A_MSG_H_REFRESH;
	assert_int_equal(p11a_client_call(c, &req, &reply, &fd), -P11A_E_UNKNOWN_TYPE);
	assert_int_equal(fd, -1);
	assert_true(is_zero(&reply, sizeof(reply)));
	assert_string_equal(p11a_client_last_error(c), "unknown type");
	req.type = 0x7f;    /* not encodable */
	assert_int_equal(p11a_client_call(c, &req, &reply, NULL), -P11A_E_UNKNOWN_TYPE);
	assert_int_equal(p11a_client_lock(c, "pkcs11:token=A"), 0);

	/* The child of a fork() gets its own connection. */
	{
		int res[2];
		pid_t pid;

		assert_int_equal(pipe(res), 0);
		pid = fork();
		assert_true(pid >= 0);
		if (pid == 0) {
			struct p11a_msg r2;
			int ok;

			close(res[0]);
			ok = p11a_client_status(c, &r2) == 0;
			p11a_msg_clear(&r2);
			p11a_client_free(c);
			child_report(res[1], ok);
		}
		close(res[1]);
		assert_int_equal(p11a_client_status(c, &reply), 0);
		p11a_msg_clear(&reply);
		child_wait(pid, res[0]);
		assert_int_equal(p11a_client_status(c, &reply), 0);
		p11a_msg_clear(&reply);
	}
	p11a_client_free(c);
}

/*
 * Forwarded (protocol version 3): CHANNEL comes without a descriptor, and
 * the client signs on its main connection with the channel path's error
 * handling and retry; no channel is ever opened ("#0").  Against a
 * version-1 agent the same CHANNEL is an error that says why.
 */
static void
test_client_sign_relayed(void **state)
{
	struct agent_env *e = *state;
	struct p11a_client *c = NULL;
	struct p11a_sign s;
	uint8_t *sig = (uint8_t *)1;
	size_t len = 1;

	assert_int_equal(p11a_client_connect(e->path, "fwd-client", 0, &c, NULL, 0), 0);
	sign_expect(c, "pkcs11:object=one", "hello", "sig(hello)#0");
	sign_expect(c, "pkcs11:object=two", "two", "sig(two)#0");
	memset(&s, 0, sizeof(s));
	s.key_uri = "pkcs11:object=one";
	s.data = (uint8_t *)"locked";
	s.data_len = 6;
	/* No PIN dialog (UNLOCK_PROMPT, which this fake agent does not know). */
	setenv("P11AGENT_NO_PROMPT", "1", 1);
	assert_int_equal(p11a_client_sign(c, &s, &sig, &len), -P11A_E_LOCKED);
	unsetenv("P11AGENT_NO_PROMPT");
	assert_null(sig);
	assert_string_equal(p11a_client_last_error(c), "token 'A' is locked");
	/* The connection stays after an ERROR; the agent goes away once: retried. */
	sign_expect(c, "pkcs11:object=one", "after", "sig(after)#0");
	sign_expect(c, "pkcs11:object=one", "die-once", "sig(die-once)#0");
	sign_expect(c, "pkcs11:object=one", "restart-once", "sig(restart-once)#0");
	/* Other requests share the main connection in turn. */
	{
		struct p11a_msg reply;

		assert_int_equal(p11a_client_list(c, &reply), 0);
		p11a_msg_clear(&reply);
	}
	sign_expect(c, "pkcs11:object=one", "last", "sig(last)#0");
	p11a_client_free(c);

	assert_int_equal(p11a_client_connect(e->path, "fwd-old", 0, &c, NULL, 0), 0);
	s.data = (uint8_t *)"x";
	s.data_len = 1;
	sig = (uint8_t *)1;
	assert_int_equal(p11a_client_sign(c, &s, &sig, &len), -P11A_E_PROTOCOL);
	assert_null(sig);
	assert_non_null(strstr(p11a_client_last_error(c), "needs version 3"));
	p11a_client_free(c);
}

static void
test_client_sign_channels(void **state)
{
	struct agent_env *e = *state;
	struct p11a_client *c = NULL;
	struct p11a_sign s;
	uint8_t *sig = (uint8_t *)1;
	size_t len = 1;
	int base;

	assert_int_equal(p11a_client_connect(e->path, NULL, 0, &c, NULL, 0), 0);
	/* Channels opened by earlier tests count too: learn the base. */
	{
		struct p11a_sign probe;
		uint8_t *p = NULL;
		size_t n = 0;

		memset(&probe, 0, sizeof(probe));
		probe.key_uri = "pkcs11:object=probe";
		probe.data = (uint8_t *)"p";
		probe.data_len = 1;
		assert_int_equal(p11a_client_sign(c, &probe, &p, &n), 0);
		assert_true(n > 7);
		base = atoi((const char *)memchr(p, '#', n) + 1);
		free(p);
	}
	{
		char want[64];

		snprintf(want, sizeof(want), "sig(hello)#%d", base + 1);
		sign_expect(c, "pkcs11:object=one", "hello", want);
		/* Reused: no new channel. */
		snprintf(want, sizeof(want), "sig(again)#%d", base + 1);
		sign_expect(c, "pkcs11:object=one", "again", want);
		snprintf(want, sizeof(want), "sig(two)#%d", base + 2);
		sign_expect(c, "pkcs11:object=two", "two", want);
		snprintf(want, sizeof(want), "sig(one)#%d", base + 2);
		sign_expect(c, "pkcs11:object=one", "one", want);

		/* An ERROR on a channel keeps the channel. */
		memset(&s, 0, sizeof(s));
		s.key_uri = "pkcs11:object=one";
		s.data = (uint8_t *)"locked";
		s.data_len = 6;
		assert_int_equal(p11a_client_sign(c, &s, &sig, &len), -P11A_E_LOCKED);
		assert_null(sig);
		assert_int_equal(len, 0);
		assert_string_equal(p11a_client_last_error(c), "token 'A' is locked");
		snprintf(want, sizeof(want), "sig(x)#%d", base + 2);
		sign_expect(c, "pkcs11:object=one", "x", want);

		/* No such key: the agent's ERROR comes through OPEN_CHANNEL. */
		s.key_uri = "pkcs11:object=nokey";
		assert_int_equal(p11a_client_sign(c, &s, &sig, &len), -P11A_E_NO_SUCH_KEY);
		assert_string_equal(p11a_client_last_error(c), "no key matches 'pkcs11:object=nokey'");
		s.key_uri = "";
		assert_int_equal(p11a_client_sign(c, &s, &sig, &len), -P11A_E_BAD_REQUEST);

		/* The helper dies once: the channel is reopened and SIGN retried. */
		snprintf(want, sizeof(want), "sig(die-once)#%d", base + 3);
		sign_expect(c, "pkcs11:object=one", "die-once", want);
		/* The agent restarts: channel and main connection both reopened. */
		snprintf(want, sizeof(want), "sig(restart-once)#%d", base + 4);
		sign_expect(c, "pkcs11:object=one", "restart-once", want);
		/* The other key's channel died in the restart too. */
		snprintf(want, sizeof(want), "sig(two)#%d", base + 5);
		sign_expect(c, "pkcs11:object=two", "two", want);
	}
	/* Many keys: the cache evicts and keeps working. */
	{
		char key[64], want[64];
		int i;

		for (i = 0; i < 20; i++) {
			snprintf(key, sizeof(key), "pkcs11:object=k%d", i);
			snprintf(want, sizeof(want), "sig(m)#%d", base + 6 + i);
			sign_expect(c, key, "m", want);
		}
		/*
		 * A reply nobody asked for, read with the one asked for: the
		 * channel is out of step and is replaced before the next SIGN,
		 * whose reply is its own.
		 */
		snprintf(want, sizeof(want), "sig(twice)#%d", base + 25);
		sign_expect(c, key, "twice", want);
		snprintf(want, sizeof(want), "sig(next)#%d", base + 26);
		sign_expect(c, key, "next", want);
	}
	p11a_client_free(c);
}

static void
test_client_connect_errors(void **state)
{
	struct agent_env *e = *state;
	struct p11a_client *c = (struct p11a_client *)1;
	char path[160], longpath[200];
	int lfd;
	pid_t pid;

	snprintf(path, sizeof(path), "%s/other.sock", e->dir);
	assert_int_equal(p11a_client_connect(path, "t", 500, &c, NULL, 0), -P11A_E_NOT_RUNNING);
	assert_null(c);
	/* A socket file with no listener behind it. */
	lfd = listen_at(path);
	close(lfd);
	assert_int_equal(p11a_client_connect(path, "t", 500, &c, NULL, 0), -P11A_E_NOT_RUNNING);
	unlink(path);
	/* A listener that never answers. */
	lfd = listen_at(path);
	assert_int_equal(p11a_client_connect(path, "t", 100, &c, NULL, 0), -P11A_E_TIMEOUT);
	assert_null(c);
	close(lfd);
	unlink(path);
	/*
	 * A listener that closes at once, as the agent does for another uid.
	 * Here the uid is ours, so it cannot be told apart from a crash: IO.
	 */
	lfd = listen_at(path);
	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		int x = accept(lfd, NULL, NULL);

		if (x >= 0)
			close(x);
		_exit(0);
	}
	close(lfd);
	assert_int_equal(p11a_client_connect(path, "t", 2000, &c, NULL, 0), -P11A_E_IO);
	assert_null(c);
	waitpid(pid, NULL, 0);
	unlink(path);
	/* A path longer than sun_path. */
	memset(longpath, 'a', sizeof(longpath) - 1);
	longpath[0] = '/';
	longpath[sizeof(longpath) - 1] = '\0';
	assert_true(p11a_client_connect(longpath, "t", 100, &c, NULL, 0) < 0);
	assert_null(c);
}

/*
 * A listener that runs as another uid gets nothing: not even HELLO.  Needs
 * root to make a listener owned by uid 65534 (SO_PEERCRED reports the
 * credentials at listen()); skipped otherwise.
 */
static void
test_client_refuses_other_owner(void **state)
{
	struct agent_env *e = *state;
	struct p11a_client *c = (struct p11a_client *)1;
	struct sockaddr_un sa;
	char path[100], why[512];
	int lfd, pfd[2];
	ssize_t got = -1;
	pid_t pid;

	if (geteuid() != 0)
		skip();
	snprintf(path, sizeof(path), "%s/owned.sock", e->dir);
	assert_int_equal(pipe(pfd), 0);
	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		char b[256];
		ssize_t n, total = 0;
		int x;

		close(pfd[0]);
		lfd = socket(AF_UNIX, SOCK_STREAM, 0);
		memset(&sa, 0, sizeof(sa));
		sa.sun_family = AF_UNIX;
		snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
		if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) != 0 ||
		    setresgid(65534, 65534, 65534) != 0 || setresuid(65534, 65534, 65534) != 0 ||
		    listen(lfd, 4) != 0 || (x = accept(lfd, NULL, NULL)) < 0)
			_exit(1);
		while ((n = read(x, b, sizeof(b))) > 0)
			total += n;
		if (write(pfd[1], &total, sizeof(total)) != (ssize_t)sizeof(total))
			_exit(1);
		_exit(0);
	}
	close(pfd[1]);
	/* Wait for listen(): connect until it stops failing with ENOENT/ECONNREFUSED. */
	for (int i = 0; i < 200; i++) {
		int r = p11a_client_connect(path, "t", 2000, &c, why, sizeof(why));

		if (r != -P11A_E_NOT_RUNNING) {
			assert_int_equal(r, -P11A_E_DENIED);
			break;
		}
		usleep(10000);
	}
	assert_null(c);
	assert_non_null(strstr(why, "runs as uid 65534"));
	assert_non_null(strstr(why, path));
	assert_int_equal(read(pfd[0], &got, sizeof(got)), (ssize_t)sizeof(got));
	assert_int_equal(got, 0);       /* the listener read EOF, not HELLO */
	close(pfd[0]);
	waitpid(pid, NULL, 0);
	unlink(path);
}

static void
test_default_socket_path(void **state)
{
	char buf[256], small[8];

	setenv("P11AGENT_SOCK", "/x/y.sock", 1);
	assert_int_equal(p11a_default_socket_path(buf, sizeof(buf)), 0);
	assert_string_equal(buf, "/x/y.sock");
	assert_int_equal(p11a_default_socket_path(small, sizeof(small)), -P11A_E_TOO_LARGE);
	unsetenv("P11AGENT_SOCK");
	setenv("XDG_RUNTIME_DIR", "/run/user/77", 1);
	assert_int_equal(p11a_default_socket_path(buf, sizeof(buf)), 0);
	assert_string_equal(buf, "/run/user/77/p11agent/agent.sock");
	unsetenv("XDG_RUNTIME_DIR");
	assert_int_equal(p11a_default_socket_path(buf, sizeof(buf)), 0);
	{
		char want[64];

		snprintf(want, sizeof(want), "/run/user/%lu/p11agent/agent.sock",
		    (unsigned long)getuid());
		assert_string_equal(buf, want);
	}
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_roundtrip_all_types),
		cmocka_unit_test(test_event_values),
		cmocka_unit_test(test_wire_layout),
		cmocka_unit_test(test_key_field_order),
		cmocka_unit_test(test_truncated_every_offset),
		cmocka_unit_test(test_leftover_bytes),
		cmocka_unit_test(test_unknown_type),
		cmocka_unit_test(test_update_env_limits),
		cmocka_unit_test(test_utf8),
		cmocka_unit_test(test_empty_and_fieldless),
		cmocka_unit_test(test_decode_oversize),
		cmocka_unit_test(test_decode_bad_values),
		cmocka_unit_test(test_encode_oversize),
		cmocka_unit_test(test_unlock_pin),
		cmocka_unit_test(test_internal),
		cmocka_unit_test(test_set_error),
		cmocka_unit_test(test_copy_clear),
		cmocka_unit_test(test_frame_roundtrip_fd),
		cmocka_unit_test(test_frame_fd_dropped),
		cmocka_unit_test(test_frame_refuses_lengths),
		cmocka_unit_test(test_frame_max),
		cmocka_unit_test(test_frame_eof_timeout),
		cmocka_unit_test(test_frame_in_feed_bytewise),
		cmocka_unit_test(test_frame_in_refuses),
		cmocka_unit_test(test_frame_in_recv_eof),
		cmocka_unit_test(test_frame_out_partial_flush),
		cmocka_unit_test(test_reader_two_frames_one_read),
		cmocka_unit_test(test_reader_split_everywhere),
		cmocka_unit_test(test_reader_fds),
		cmocka_unit_test(test_reader_limits),
		cmocka_unit_test(test_reader_eof),
		cmocka_unit_test(test_reader_deadlines),
		cmocka_unit_test(test_fork_generation),
#ifdef HAVE_URI_TESTS
		cmocka_unit_test(test_uri_format),
		cmocka_unit_test(test_uri_match_rules),
		cmocka_unit_test(test_uri_bad),
#endif
		cmocka_unit_test(test_default_socket_path),
		/* Each client test gets a fresh fake agent. */
		cmocka_unit_test_setup_teardown(test_client_requests, setup_agent, teardown_agent),
		cmocka_unit_test_setup_teardown(test_client_sign_channels, setup_agent, teardown_agent),
		cmocka_unit_test_setup_teardown(test_client_sign_relayed, setup_agent, teardown_agent),
		cmocka_unit_test_setup_teardown(test_client_connect_errors, setup_agent, teardown_agent),
		cmocka_unit_test_setup_teardown(test_client_refuses_other_owner, setup_agent, teardown_agent),
	};

#ifndef HAVE_URI_TESTS
	/*
	 * Not a SKIP result: automake's TAP driver counts "not ok # SKIP" as
	 * a failure.  A TAP comment keeps the gap visible.
	 */
	printf("# uri tests not built: compile test_proto with $(P11KIT_CFLAGS)\n");
	fflush(stdout);
#endif
	/* One group: automake's TAP driver rejects a second plan. */
	return cmocka_run_group_tests_name("proto", tests, NULL, NULL);
}
