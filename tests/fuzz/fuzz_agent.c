/*
 * Fuzz targets for the agent's main process (agent/server.c,
 * agent/supervise.c, agent/handlers.c, common/frame.c).
 *
 * Entry points: the main process's internal API (agent/server_int.h):
 * client_readable() (the framing layer's p11a_frame_in_recv() then
 * client_request()/client_dispatch() in handlers.c), helper_readable()
 * (supervise.c), pending_expire() and clients_unpark().  A fake server is set up
 * with one client connection and one token helper, each a socketpair
 * whose other end belongs to the harness; nothing listens and nothing is
 * forked (the fake helper's pid is one that cannot exist, so the agent's
 * kill()/waitpid() on a misbehaving helper hit nobody).
 *
 * FUZZ_MODE_REQUEST (fuzz_request): the input is the byte stream a client
 * sends on its main connection: a sequence of frames, cut anywhere,
 * decoded by p11a_frame_in_recv()/client_request() and dispatched exactly as in
 * the event loop.  The fake helper holds a fixed inventory and answers
 * every forwarded request (UNLOCK, LOCK) with OK or ERROR, a relayed SIGN
 * (H_SIGN, version 3) with SIGNATURE or ERROR, or lets it time out, so the
 * pending-request paths run too.
 *
 * FUZZ_MODE_INTERNAL (fuzz_internal): the input is the byte stream a token
 * helper sends the agent (internal frames: H_INVENTORY, OK, ERROR, with
 * request ids).  After each helper frame a client sends LIST, STATUS,
 * OPEN_CHANNEL, UNLOCK, LOCK and a relayed SIGN (version 3), so that the inventory the fuzzer made is
 * used (URI matching, list replies).
 */
#include "config.h"
#include "server_int.h"
#include "audit.h"
#include "log.h"
#include "p11a.h"
#include "proto.h"

#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <stdint.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

#define FAKE_HELPER_PID ((pid_t)INT_MAX)   /* above any pid_max: kill() gets ESRCH */

static struct agent_config fz_cfg;
static int fz_ready;

static const char tok_uri[] =
	"pkcs11:model=SoftHSM%20v2;manufacturer=SoftHSM%20project;serial=0123456789abcdef;token=fuzz";
static const char key_uri[] =
	"pkcs11:model=SoftHSM%20v2;manufacturer=SoftHSM%20project;serial=0123456789abcdef;"
	"token=fuzz;id=%02;object=ec256;type=private";

static void
fz_setup(void)
{
	if (fz_ready)
		return;
	fz_ready = 1;
	signal(SIGPIPE, SIG_IGN);
	static const struct conf_origin fz_origin = { .layer = CONF_FLAG, .note = "--module" };

	config_init(&fz_cfg);
	fz_cfg.socket_path = strdup("/nonexistent/fuzz.sock");
	fz_cfg.sign_timeout_ms = 1000;
	fz_cfg.max_connections = 16;
	if (config_add_module(&fz_cfg, "/nonexistent/fuzz-module.so", "fuzz", NULL, &fz_origin) != 0)
		abort();
	/* Dialogs fail at once: no pinentry program runs under a fuzzer. */
	fz_cfg.pinentry_program = strdup("/nonexistent/pinentry");
	/* A small ring, so it wraps; no journal or syslog from a fuzzer. */
	fz_cfg.audit = CONF_AUDIT_NONE;
	fz_cfg.audit_ring = 8;
	if (audit_init(&fz_cfg) != 0)
		abort();
#ifdef FUZZING_LIBFUZZER
	/* Millions of "malformed message" warnings: keep them off the fuzzer's stderr. */
	log_init("fuzz", LOG_MODE_SYSLOG, 0);
#else
	log_init("fuzz", LOG_MODE_STDERR, getenv("FUZZ_DEBUG") != NULL);
#endif
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	fz_setup();
	return 0;
}

static void
fz_nonblock(int fd)
{
	int fl = fcntl(fd, F_GETFL);

	if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) != 0)
		abort();
}

/* Reads and discards what is there, closing any descriptor passed along. */
static void
fz_drain(int fd)
{
	for (;;) {
		char buf[65536];
		union {
			char b[CMSG_SPACE(sizeof(int) * 4)];
			struct cmsghdr align;
		} cm;
		struct iovec iov = { buf, sizeof(buf) };
		struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1,
				     .msg_control = cm.b, .msg_controllen = sizeof(cm.b) };
		ssize_t n = recvmsg(fd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
		if (n <= 0)
			return;
		for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
			if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
				size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
				for (size_t i = 0; i < k; i++) {
					int pfd;
					memcpy(&pfd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
					close(pfd);
				}
			}
		}
	}
}

static void
fz_inventory(struct p11a_list_reply *inv)
{
	static const uint8_t id[] = { 0x02 };

	memset(inv, 0, sizeof(*inv));
	inv->tokens = calloc(1, sizeof(*inv->tokens));
	inv->keys = calloc(1, sizeof(*inv->keys));
	if (!inv->tokens || !inv->keys)
		abort();
	inv->ntokens = 1;
	inv->tokens[0].uri = strdup(tok_uri);
	inv->tokens[0].label = strdup("fuzz");
	inv->tokens[0].manufacturer = strdup("SoftHSM project");
	inv->tokens[0].model = strdup("SoftHSM v2");
	inv->tokens[0].serial = strdup("0123456789abcdef");
	inv->tokens[0].module = strdup("fuzz");
	inv->tokens[0].flags = P11A_TOKEN_PRESENT | P11A_TOKEN_LOGIN_REQUIRED;
	inv->nkeys = 1;
	inv->keys[0].uri = strdup(key_uri);
	inv->keys[0].token_uri = strdup(tok_uri);
	inv->keys[0].label = strdup("ec256");
	inv->keys[0].id = malloc(1);
	memcpy(inv->keys[0].id, id, 1);
	inv->keys[0].id_len = 1;
	inv->keys[0].type = P11A_KEY_EC;
	inv->keys[0].bits = 256;
	inv->keys[0].curve = strdup("P-256");
	inv->keys[0].cert_uri = strdup("");
	inv->keys[0].cert_label = strdup("");
}

struct fz {
	struct server srv;
	int client_peer;
	int helper_peer;
};

static void
fz_start(struct fz *z, int with_inventory, int hello_done)
{
	struct server *s = &z->srv;
	int cv[2], hv[2];

	memset(z, 0, sizeof(*z));
	s->cfg = &fz_cfg;
	s->listen_fd = -1;
	s->sig_fd = -1;
	s->uid = getuid();
	/* The dialogs' wake-up pipe (UNLOCK_PROMPT, CONFIRM, CONTEXT_PIN start dialogs). */
	if (prompt_init(s) != 0)
		abort();
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, cv) != 0 ||
	    socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, hv) != 0)
		abort();
	fz_nonblock(cv[0]);
	fz_nonblock(cv[1]);
	fz_nonblock(hv[0]);
	fz_nonblock(hv[1]);

	s->nhelpers = 1;
	if (!(s->helpers = calloc(1, sizeof(*s->helpers))))
		abort();
	struct helper *h = &s->helpers[0];
	helper_init(s, 0, &fz_cfg.modules[0]);
	h->fd = hv[0];
	h->pid = FAKE_HELPER_PID;
	h->up = with_inventory;
	h->started_ms = p11a_now_ms() - HELPER_START_WAIT_MS - 1;
	if (with_inventory)
		fz_inventory(&h->inv);
	z->helper_peer = hv[1];

	s->cclients = s->nclients = 1;
	if (!(s->clients = calloc(1, sizeof(*s->clients))))
		abort();
	struct client *c = &s->clients[0];
	c->fd = cv[0];
	c->serial = ++s->next_serial;
	c->uid = s->uid;
	c->pid = getpid();
	c->hello_done = hello_done;
	c->version = hello_done ? P11A_PROTO_VERSION : 0;
	c->reply_fd = -1;
	p11a_frame_in_init(&c->in, NULL, 0);
	s->open_clients = 1;
	z->client_peer = cv[1];
}

static void
fz_stop(struct fz *z)
{
	struct server *s = &z->srv;

	for (size_t i = 0; i < s->nclients; i++)
		client_close(s, i);
	free(s->clients);
	pending_free_all(s);
	prompt_free(s);         /* ends the dialogs the input started (their threads joined) */
	for (size_t i = 0; i < s->nhelpers; i++)
		helper_free(&s->helpers[i]);
	free(s->helpers);
	fz_drain(z->client_peer);
	fz_drain(z->helper_peer);
	close(z->client_peer);
	close(z->helper_peer);
}

/* Writes what the agent queued for its client and helper; drains both. */
static void
fz_flush(struct fz *z)
{
	struct server *s = &z->srv;
	struct client *c = &s->clients[0];
	struct helper *h = &s->helpers[0];

	for (int round = 0; round < 64; round++) {
		if (c->fd >= 0 && p11a_frame_out_flush(&c->out, c->fd) < 0)
			client_close(s, 0);
		if (h->fd >= 0 && p11a_frame_out_flush(&h->out, h->fd) < 0)
			helper_disconnect(s, 0, "write failed");
		fz_drain(z->client_peer);
		if (!(c->fd >= 0 && !p11a_frame_out_empty(&c->out)) &&
		    !(h->fd >= 0 && !p11a_frame_out_empty(&h->out)))
			break;
	}
	if (c->fd >= 0 && c->closing && p11a_frame_out_empty(&c->out))
		client_close(s, 0);
}

#ifdef FUZZ_MODE_REQUEST
/*
 * The fake helper answers each request it was sent: OK for odd ids, an
 * ERROR for even ones; every third one is left to time out instead.
 */
static void
fz_helper_answers(struct fz *z)
{
	struct server *s = &z->srv;
	struct helper *h = &s->helpers[0];
	struct p11a_buf *in = p11a_buf_new(P11A_FRAME_MAX);
	struct p11a_buf *out = p11a_buf_new(P11A_FRAME_MAX);
	int answered = 0;

	if (!in || !out)
		abort();
	for (;;) {
		int rfd = -1;
		uint32_t id;
		struct p11a_msg m, rep;
		if (p11a_frame_read(z->helper_peer, in, &rfd, 0) != 0)
			break;
		if (rfd >= 0)
			close(rfd);
		if (p11a_msg_decode_internal(p11a_buf_ptr(in), p11a_buf_len(in), &id, &m) != 0)
			abort();   /* the agent must never send a malformed internal frame */
		int relayed = m.type == P11A_MSG_H_SIGN;
		p11a_msg_clear(&m);
		if (id % 3 == 0)
			continue;
		memset(&rep, 0, sizeof(rep));
		if (relayed && id % 2) {
			/* A relayed SIGN (version 3) gets a signature (borrowed bytes). */
			static uint8_t fake_sig[] = { 0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01 };
			rep.type = P11A_MSG_SIGNATURE;
			rep.u.signature.sig = fake_sig;
			rep.u.signature.sig_len = sizeof(fake_sig);
			p11a_buf_reset(out);
			if (p11a_msg_encode_internal(id, &rep, out) != 0 ||
			    p11a_frame_write(z->helper_peer, out, -1, 1000) != 0)
				abort();
			answered++;
			continue;
		}
		if (id % 2)
			rep.type = P11A_MSG_OK;
		else if (p11a_msg_set_error(&rep, P11A_E_PIN_INCORRECT, "PIN incorrect (fuzz)") != 0)
			abort();
		p11a_buf_reset(out);
		if (p11a_msg_encode_internal(id, &rep, out) != 0 ||
		    p11a_frame_write(z->helper_peer, out, -1, 1000) != 0)
			abort();
		p11a_msg_clear(&rep);
		answered++;
	}
	p11a_buf_free(in);
	p11a_buf_free(out);
	if (answered && h->fd >= 0)
		helper_readable(s, 0);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct fz z;
	size_t off = 0;
	int shut = 0;

	int waited = 0;

	fz_setup();
	fz_start(&z, 1, 0);
	struct server *s = &z.srv;
	for (int iter = 0; iter < 100000; iter++) {
		struct client *c = &s->clients[0];
		if (c->fd < 0)
			break;
		if (off < size) {
			ssize_t n = send(z.client_peer, data + off, size - off, MSG_DONTWAIT | MSG_NOSIGNAL);
			if (n > 0)
				off += (size_t)n;
		} else if (!shut) {
			shutdown(z.client_peer, SHUT_WR);
			shut = 1;
		}
		/* As the event loop: read only once the last request is answered. */
		if (!c->waiting && !c->has_parked && p11a_frame_out_empty(&c->out) && !c->closing)
			client_readable(s, 0);
		fz_flush(&z);
		if (c->fd >= 0 && c->waiting) {
			fz_helper_answers(&z);
			pending_expire(s, INT64_MAX);
			fz_flush(&z);
			/*
			 * A dialog the input started ends at once (its pinentry
			 * cannot start) and wakes the loop as in the agent; a
			 * client still waiting for one after that gets its
			 * deadline, so that no input spins here (a slow input
			 * was a libFuzzer timeout on a busy machine).
			 */
			prompt_wake(s);
			if (c->waiting && ++waited > 64) {
				(void)prompt_tick(s, INT64_MAX, INT64_MAX);
				waited = 0;
			}
			fz_flush(&z);
		} else {
			waited = 0;
		}
		clients_unpark(s, p11a_now_ms());
		fz_flush(&z);
	}
	fz_stop(&z);
	return 0;
}
#endif

#ifdef FUZZ_MODE_INTERNAL
/* A client's requests against whatever inventory the helper reported. */
static void
fz_client_round(struct fz *z)
{
	struct server *s = &z->srv;
	struct helper *h = &s->helpers[0];
	struct p11a_msg m;
	const char *k = h->inv.nkeys && h->inv.keys[0].uri ? h->inv.keys[0].uri : key_uri;
	const char *t = h->inv.ntokens && h->inv.tokens[0].uri ? h->inv.tokens[0].uri : "";

	for (int what = 0; what < 9; what++) {
		struct client *c = &s->clients[0];
		if (c->fd < 0 || c->waiting)
			break;
		memset(&m, 0, sizeof(m));
		switch (what) {
		case 0: m.type = P11A_MSG_LIST; break;
		case 1: m.type = P11A_MSG_STATUS; break;
		case 2:
			m.type = P11A_MSG_OPEN_CHANNEL;
			m.u.open_channel.key_uri = strdup(k);
			break;
		case 3:
			m.type = P11A_MSG_OPEN_CHANNEL;
			m.u.open_channel.key_uri = strdup("pkcs11:object=ec256");
			break;
		case 4:
			m.type = P11A_MSG_UNLOCK;
			m.u.unlock.token_uri = strdup("");
			memcpy(m.u.unlock.pin, "1234", 4);
			m.u.unlock.pin_len = 4;
			break;
		case 5:
			m.type = P11A_MSG_UNLOCK;
			m.u.unlock.token_uri = strdup(t);
			memcpy(m.u.unlock.pin, "1234", 4);
			m.u.unlock.pin_len = 4;
			break;
		case 6:
			m.type = P11A_MSG_LOCK;
			m.u.lock.token_uri = strdup("");
			break;
		case 7:
			/* The ring holds whatever events the helper reported. */
			m.type = P11A_MSG_LOG;
			break;
		default:
			/* A forwarded client's SIGN on its main connection (version 3). */
			c->version = 3;
			m.type = P11A_MSG_SIGN;
			m.u.sign.key_uri = strdup(k);
			m.u.sign.scheme = P11A_SCHEME_ECDSA;
			m.u.sign.hash = P11A_HASH_SHA256;
			m.u.sign.data = (uint8_t *)strdup("fuzz");
			m.u.sign.data_len = 4;
			break;
		}
		client_dispatch(s, 0, &m);
		fz_flush(z);
		fz_drain(z->helper_peer);
		if (c->fd >= 0 && c->waiting)
			return;     /* answered by the helper's next frames, or timed out below */
	}
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct fz z;
	size_t off = 0;

	fz_setup();
	fz_start(&z, 0, 1);
	struct server *s = &z.srv;
	struct helper *h = &s->helpers[0];
	for (int iter = 0; iter < 100000 && h->fd >= 0; iter++) {
		int progress = 0;
		if (off < size) {
			ssize_t n = send(z.helper_peer, data + off, size - off, MSG_DONTWAIT | MSG_NOSIGNAL);
			if (n > 0) {
				off += (size_t)n;
				progress = 1;
			}
		} else {
			shutdown(z.helper_peer, SHUT_WR);
		}
		helper_readable(s, 0);
		fz_flush(&z);
		if (h->fd >= 0 && h->up)
			fz_client_round(&z);
		if (!progress && off >= size)
			pending_expire(s, INT64_MAX);
		fz_flush(&z);
		if (s->clients[0].fd < 0)
			break;
	}
	fz_stop(&z);
	return 0;
}
#endif
