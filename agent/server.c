/*
 * The agent's main process: one poll() loop over the listening socket,
 * client connections, token helper control sockets and a signalfd.  It
 * never calls PKCS#11 and never blocks on a token: LIST and STATUS come
 * from the inventory the helpers push, UNLOCK/LOCK are forwarded with a
 * deadline, and SIGN never passes through here (OPEN_CHANNEL hands the
 * client a socketpair end that goes straight to the helper).
 */
#include "config.h"
#include "server.h"
#include "helper.h"
#include "log.h"
#include "systemd.h"
#include "p11a.h"
#include "proto.h"
#include "uri.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdarg.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define HALF_FRAME_DEADLINE_MS 10000
#define RESTART_DELAY_MIN_MS   500
#define RESTART_DELAY_MAX_MS   30000
#define HELPER_STABLE_MS       60000
/* How long a request that needs the inventory waits for starting helpers. */
#define HELPER_START_WAIT_MS   10000
#define ACCEPT_PAUSE_MS        200     /* out of descriptors: how long accept() rests */

/* ------------------------------------------------------------ out queue */

struct outframe {
	struct outframe *next;
	struct p11a_buf *data;      /* [u32 len][body], consumed as written */
	int fd;                     /* descriptor to pass with the first byte, or -1 */
};

struct outq {
	struct outframe *head, *tail;
};

static void
outq_clear(struct outq *q)
{
	struct outframe *f = q->head;
	while (f) {
		struct outframe *n = f->next;
		p11a_buf_free(f->data);
		if (f->fd >= 0)
			close(f->fd);
		free(f);
		f = n;
	}
	q->head = q->tail = NULL;
}

/* Takes ownership of fd_to_pass (closed once sent or dropped). */
static int
outq_push(struct outq *q, const struct p11a_buf *body, int fd_to_pass)
{
	struct outframe *f = calloc(1, sizeof(*f));
	size_t len = p11a_buf_len(body);
	int r = -P11A_E_NOMEM;
	if (!f)
		goto fail;
	f->fd = fd_to_pass;
	if (!(f->data = p11a_buf_new(len + 4)))
		goto fail;
	if ((r = p11a_buf_put_u32(f->data, (uint32_t)len)) != 0 ||
	    (r = p11a_buf_put(f->data, p11a_buf_ptr(body), len)) != 0)
		goto fail;
	if (q->tail)
		q->tail->next = f;
	else
		q->head = f;
	q->tail = f;
	return 0;
fail:
	if (f)
		p11a_buf_free(f->data);
	free(f);
	if (fd_to_pass >= 0)
		close(fd_to_pass);
	return r;
}

/* Writes what it can without blocking: 0 (maybe more left), -1 on error. */
static int
outq_flush(struct outq *q, int fd)
{
	while (q->head) {
		struct outframe *f = q->head;
		struct iovec iov = { (void *)p11a_buf_ptr(f->data), p11a_buf_len(f->data) };
		struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
		union {
			char buf[CMSG_SPACE(sizeof(int))];
			struct cmsghdr align;
		} cm;
		if (f->fd >= 0) {
			memset(&cm, 0, sizeof(cm));
			mh.msg_control = cm.buf;
			mh.msg_controllen = sizeof(cm.buf);
			struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
			c->cmsg_level = SOL_SOCKET;
			c->cmsg_type = SCM_RIGHTS;
			c->cmsg_len = CMSG_LEN(sizeof(int));
			memcpy(CMSG_DATA(c), &f->fd, sizeof(int));
		}
		ssize_t n = sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 0;
			return -1;
		}
		if (f->fd >= 0) {
			close(f->fd);
			f->fd = -1;
		}
		p11a_buf_consume(f->data, (size_t)n);
		if (p11a_buf_len(f->data) == 0) {
			q->head = f->next;
			if (!q->head)
				q->tail = NULL;
			p11a_buf_free(f->data);
			free(f);
		}
	}
	return 0;
}

/* ------------------------------------------------------------ frame reader */

struct inframe {
	uint8_t hdr[4];
	size_t hdr_got;
	uint32_t body_len;
	struct p11a_buf *body;     /* allocated once the length is known */
	int64_t started_ms;        /* first byte of the current frame, 0 = none */
	int passed_fd;             /* descriptor received with the frame (helpers never send one) */
};

static void
inframe_reset(struct inframe *in)
{
	p11a_buf_free(in->body);
	in->body = NULL;
	in->hdr_got = 0;
	in->body_len = 0;
	in->started_ms = 0;
}

/*
 * Reads without blocking.  Returns 1 when a whole frame is in in->body,
 * 0 when more is needed, -1 on EOF/error, -2 on a refused length.
 */
static int
inframe_read(struct inframe *in, int fd)
{
	for (;;) {
		if (in->hdr_got < 4) {
			ssize_t n = recv(fd, in->hdr + in->hdr_got, 4 - in->hdr_got, MSG_DONTWAIT);
			if (n == 0)
				return -1;
			if (n < 0)
				return (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? 0 : -1;
			if (in->started_ms == 0)
				in->started_ms = p11a_now_ms();
			in->hdr_got += (size_t)n;
			if (in->hdr_got < 4)
				continue;
			in->body_len = (uint32_t)in->hdr[0] << 24 | (uint32_t)in->hdr[1] << 16 |
				       (uint32_t)in->hdr[2] << 8 | in->hdr[3];
			/* Refuse before buffering anything. */
			if (in->body_len == 0 || in->body_len > P11A_FRAME_MAX)
				return -2;
			if (!(in->body = p11a_buf_new(in->body_len)))
				return -1;
		}
		size_t have = p11a_buf_len(in->body);
		if (have == in->body_len)
			return 1;
		uint8_t *dst;
		size_t want = in->body_len - have;
		if (p11a_buf_reserve(in->body, want, &dst) != 0)
			return -1;
		ssize_t n = recv(fd, dst, want, MSG_DONTWAIT);
		p11a_buf_unreserve(in->body, want - (n > 0 ? (size_t)n : 0));
		if (n == 0)
			return -1;
		if (n < 0)
			return (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? 0 : -1;
	}
}

/* ------------------------------------------------------------ state */

struct helper {
	struct module_conf *mod;
	pid_t pid;
	int fd;
	struct inframe in;
	struct outq out;
	int up;                    /* first inventory received */
	int dead_for_good;         /* module failed to initialize */
	struct p11a_list_reply inv;
	int64_t restart_at;        /* 0 = not scheduled */
	int64_t started_ms;
	int restart_delay_ms;
	unsigned starts;           /* times the helper was started */
	int init_error;            /* this run's helper reported why it could not start */
	char last_error[512];      /* the module's latest failure, for HEALTH; "" = none */
	time_t error_time;
};

struct client {
	int fd;
	uint64_t serial;           /* tells a reused slot apart */
	int hello_done;
	uint16_t version;          /* protocol version chosen at HELLO */
	int closing;               /* close once the out queue is empty */
	int waiting;               /* replies still expected from helpers */
	int wait_error;            /* first error code among them, 0 = none */
	char *wait_error_msg;
	uint32_t uid;
	pid_t pid;
	struct inframe in;
	struct outq out;
	int reply_fd;              /* descriptor for the awaited CHANNEL reply, or -1 */
	int has_parked;            /* a request waits for helpers to come up */
	struct p11a_msg parked;
};

struct pending {
	uint32_t id;
	size_t client;             /* index */
	uint64_t serial;
	size_t helper;
	int64_t deadline;
	uint8_t type;              /* request forwarded */
	char *what;                /* for timeout messages */
	int channel_fd;            /* H_ADOPT: the client's end of the channel, or -1 */
};

struct server {
	const struct agent_config *cfg;
	int listen_fd;
	int sig_fd;
	int stop;
	uid_t uid;
	size_t nhelpers;
	struct helper *helpers;
	size_t nclients, cclients;
	struct client *clients;    /* slots; fd -1 = free */
	uint64_t next_serial;
	size_t npending, cpending;
	struct pending *pending;
	uint32_t next_id;
	size_t open_clients;
	size_t max_clients;        /* max-connections, within RLIMIT_NOFILE */
	size_t notified_up;        /* modules up in the last STATUS= sent to systemd */
	int64_t accept_paused_until;       /* out of descriptors: listen again at this time */
};

static void client_close(struct server *s, size_t i);

/* ------------------------------------------------------------ replies */

static void
send_msg(struct server *s, size_t ci, const struct p11a_msg *m, int fd_to_pass)
{
	struct client *c = &s->clients[ci];
	struct p11a_buf *b = p11a_buf_new(P11A_FRAME_MAX);
	int r = b ? p11a_msg_encode(m, b) : -P11A_E_NOMEM;
	if (r == 0)
		r = outq_push(&c->out, b, fd_to_pass);
	else if (fd_to_pass >= 0)
		close(fd_to_pass);
	p11a_buf_free(b);
	if (r != 0) {
		log_err("cannot queue a reply for client %d: %s", c->fd, p11a_strerror(r));
		c->closing = 1;
		return;
	}
	if (outq_flush(&c->out, c->fd) != 0) {
		c->closing = 1;
		outq_clear(&c->out);
	}
}

static void
send_error(struct server *s, size_t ci, int code, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

static void
send_error(struct server *s, size_t ci, int code, const char *fmt, ...)
{
	char text[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(text, sizeof(text), fmt, ap);
	va_end(ap);
	struct p11a_msg m;
	memset(&m, 0, sizeof(m));
	if (p11a_msg_set_error(&m, code, "%s", text) != 0) {
		s->clients[ci].closing = 1;
		return;
	}
	log_debug("client %d: error %s: %s", s->clients[ci].fd, p11a_strerror(code), text);
	send_msg(s, ci, &m, -1);
	p11a_msg_clear(&m);
}

static void
send_ok(struct server *s, size_t ci)
{
	struct p11a_msg m = { .type = P11A_MSG_OK };
	send_msg(s, ci, &m, -1);
}

/* ------------------------------------------------------------ helpers */

static void
helper_send(struct server *s, size_t hi, uint32_t id, const struct p11a_msg *m, int fd_to_pass)
{
	struct helper *h = &s->helpers[hi];
	struct p11a_buf *b = p11a_buf_new(P11A_FRAME_MAX);
	int r = b ? p11a_msg_encode_internal(id, m, b) : -P11A_E_NOMEM;
	if (r == 0)
		r = outq_push(&h->out, b, fd_to_pass);
	else if (fd_to_pass >= 0)
		close(fd_to_pass);
	p11a_buf_free(b);  /* wipes: an UNLOCK body holds a PIN */
	if (r != 0) {
		log_err("helper %s: cannot queue a request: %s", h->mod->name, p11a_strerror(r));
		return;
	}
	if (outq_flush(&h->out, h->fd) != 0)
		log_warn("helper %s: write failed: %s", h->mod->name, strerror(errno));
}

static void
inventory_clear(struct p11a_list_reply *inv)
{
	for (uint32_t i = 0; i < inv->ntokens; i++)
		p11a_token_clear(&inv->tokens[i]);
	for (uint32_t i = 0; i < inv->nkeys; i++)
		p11a_key_clear(&inv->keys[i]);
	free(inv->tokens);
	free(inv->keys);
	memset(inv, 0, sizeof(*inv));
}

static void
helper_spawn(struct server *s, size_t hi)
{
	struct helper *h = &s->helpers[hi];
	int sv[2];
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
		log_err("helper %s: socketpair: %s", h->mod->name, strerror(errno));
		h->restart_at = p11a_now_ms() + RESTART_DELAY_MAX_MS;
		return;
	}
	pid_t pid = fork();
	if (pid < 0) {
		log_err("helper %s: fork: %s", h->mod->name, strerror(errno));
		close(sv[0]);
		close(sv[1]);
		h->restart_at = p11a_now_ms() + RESTART_DELAY_MAX_MS;
		return;
	}
	if (pid == 0) {
		/* Child: keep only stdio and the control socket. */
		log_before_fd_cleanup();
		int ctrl = sv[1];
		if (ctrl != 3) {
			if (dup2(ctrl, 3) < 0)
				_exit(HELPER_EXIT_INIT);
			ctrl = 3;
		}
#ifdef HAVE_CLOSE_RANGE
		close_range(4, ~0U, 0);
#else
		for (int fd = 4; fd < 65536; fd++)
			close(fd);
#endif
		sigset_t none;
		sigemptyset(&none);
		signal(SIGTERM, SIG_DFL);
		signal(SIGINT, SIG_DFL);
		signal(SIGCHLD, SIG_DFL);
		sigprocmask(SIG_SETMASK, &none, NULL);
		char ident[96];
		snprintf(ident, sizeof(ident), "p11agentd[helper %s]", h->mod->name);
		log_after_fd_cleanup(ident);
		_exit(helper_main(h->mod, ctrl, s->cfg));
	}
	close(sv[1]);
	if (fcntl(sv[0], F_SETFL, O_NONBLOCK) != 0)
		log_warn("helper %s: O_NONBLOCK: %s", h->mod->name, strerror(errno));
	h->pid = pid;
	h->fd = sv[0];
	h->up = 0;
	h->starts++;
	h->init_error = 0;
	h->restart_at = 0;
	h->started_ms = p11a_now_ms();
	memset(&h->in, 0, sizeof(h->in));
	log_info("helper %s started (pid %ld) for %s", h->mod->name, (long)pid, h->mod->path);
}

static void pending_fail_helper(struct server *s, size_t hi);

/* Keeps a module's latest failure for HEALTH (`p11agent status`). */
static void __attribute__((format(printf, 2, 3)))
helper_note_error(struct helper *h, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(h->last_error, sizeof(h->last_error), fmt, ap);
	va_end(ap);
	h->error_time = time(NULL);
}

/* Tells systemd (STATUS=) how many modules are up, when that changed. */
static void
notify_status(struct server *s)
{
	size_t up = 0, tokens = 0;

	for (size_t i = 0; i < s->nhelpers; i++) {
		up += s->helpers[i].up;
		tokens += s->helpers[i].inv.ntokens;
	}
	if (up == s->notified_up)
		return;
	s->notified_up = up;
	sysd_notify("STATUS=%zu of %zu modules up, %zu tokens", up, s->nhelpers, tokens);
}

/* The helper's socket closed or failed: reap, fail its requests, schedule a restart. */
static void
helper_down(struct server *s, size_t hi, const char *why)
{
	struct helper *h = &s->helpers[hi];
	if (h->fd < 0)
		return;
	close(h->fd);
	h->fd = -1;
	inframe_reset(&h->in);
	outq_clear(&h->out);
	inventory_clear(&h->inv);
	h->up = 0;
	int st = 0;
	pid_t r;
	/* The socket closes when the process exits; give it a moment to be reapable. */
	for (int i = 0; i < 50; i++) {
		r = waitpid(h->pid, &st, WNOHANG);
		if (r != 0)
			break;
		if (i == 20)
			kill(h->pid, SIGKILL);  /* our own child, by PID */
		struct timespec ts = { 0, 10 * 1000 * 1000 };
		nanosleep(&ts, NULL);
	}
	if (WIFEXITED(st) && WEXITSTATUS(st) == HELPER_EXIT_INIT) {
		if (!h->init_error)
			helper_note_error(h, "could not be loaded or initialized (the helper's log "
					  "says why)");
		log_err("module %s could not be loaded or initialized (%s); not using it",
			h->mod->path, h->last_error);
		h->dead_for_good = 1;
	} else {
		if (p11a_now_ms() - h->started_ms > HELPER_STABLE_MS)
			h->restart_delay_ms = RESTART_DELAY_MIN_MS;
		if (WIFSIGNALED(st))
			helper_note_error(h, "helper (pid %ld) died of signal %d (%s, %s)",
					  (long)h->pid, WTERMSIG(st), strsignal(WTERMSIG(st)), why);
		else
			helper_note_error(h, "helper (pid %ld) exited (%s)", (long)h->pid, why);
		log_err("module %s: %s; restarting in %d ms", h->mod->name, h->last_error,
			h->restart_delay_ms);
		h->restart_at = p11a_now_ms() + h->restart_delay_ms;
		h->restart_delay_ms *= 2;
		if (h->restart_delay_ms > RESTART_DELAY_MAX_MS)
			h->restart_delay_ms = RESTART_DELAY_MAX_MS;
	}
	h->pid = 0;
	pending_fail_helper(s, hi);
	notify_status(s);
}

/* ------------------------------------------------------------ pending */

static struct pending *
pending_add(struct server *s, size_t ci, size_t hi, uint8_t type, const char *what)
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
	p->client = ci;
	p->serial = s->clients[ci].serial;
	p->helper = hi;
	p->type = type;
	p->deadline = p11a_now_ms() + s->cfg->sign_timeout_ms;
	p->what = strdup(what ? what : "");
	p->channel_fd = -1;
	s->npending++;
	s->clients[ci].waiting++;
	return p;
}

/* One awaited reply arrived (code 0 = OK) for a client; answer once all did. */
static void
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

static void
pending_remove(struct server *s, size_t pi)
{
	free(s->pending[pi].what);
	if (s->pending[pi].channel_fd >= 0)
		close(s->pending[pi].channel_fd);
	s->pending[pi] = s->pending[--s->npending];
}

static void
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
		client_reply_arrived(s, p->client, p->serial, P11A_E_HELPER, msg);
		pending_remove(s, i);
	}
}

static void
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
		client_reply_arrived(s, p->client, p->serial, P11A_E_TIMEOUT, msg);
		pending_remove(s, i);
	}
}

static void
helper_message(struct server *s, size_t hi, uint32_t id, struct p11a_msg *m)
{
	struct helper *h = &s->helpers[hi];
	if (m->type == P11A_MSG_H_INVENTORY && id == 0) {
		inventory_clear(&h->inv);
		h->inv = m->u.list;
		memset(&m->u.list, 0, sizeof(m->u.list));
		if (!h->up)
			log_info("helper %s up: %u token(s), %u key(s)", h->mod->name,
				 h->inv.ntokens, h->inv.nkeys);
		else
			log_debug("helper %s: inventory %u token(s), %u key(s)", h->mod->name,
				  h->inv.ntokens, h->inv.nkeys);
		h->up = 1;
		notify_status(s);
		return;
	}
	if (m->type == P11A_MSG_ERROR && id == 0) {
		/* The helper says why it cannot go on (it exits next). */
		helper_note_error(h, "%s", m->u.error.message ? m->u.error.message : "");
		h->init_error = 1;
		return;
	}
	for (size_t i = 0; i < s->npending; i++) {
		struct pending *p = &s->pending[i];
		if (p->id != id || p->helper != hi)
			continue;
		if (m->type == P11A_MSG_OK && p->channel_fd >= 0) {
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
	log_debug("helper %s: reply type 0x%02x for id %u ignored", h->mod->name, m->type, id);
}

static void
helper_readable(struct server *s, size_t hi)
{
	struct helper *h = &s->helpers[hi];
	for (;;) {
		int r = inframe_read(&h->in, h->fd);
		if (r == 0)
			return;
		if (r < 0) {
			helper_down(s, hi, r == -2 ? "bad frame length" : "connection closed");
			return;
		}
		uint32_t id;
		struct p11a_msg m;
		int d = p11a_msg_decode_internal(p11a_buf_ptr(h->in.body), p11a_buf_len(h->in.body),
						 &id, &m);
		inframe_reset(&h->in);
		if (d != 0) {
			log_err("helper %s sent a bad frame: %s", h->mod->name, p11a_strerror(d));
			kill(h->pid, SIGKILL);
			helper_down(s, hi, "protocol error");
			return;
		}
		helper_message(s, hi, id, &m);
		p11a_msg_clear(&m);
		if (h->fd < 0)
			return;
	}
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

/* Tokens matching uri ("" = all): calls fn for each; returns matches or a negative error. */
struct token_ref {
	size_t helper;
	const struct p11a_token *token;
};

static int
find_tokens(struct server *s, const char *uri, struct token_ref *out, size_t max)
{
	struct p11a_uri_matcher *mt = NULL;
	int err = 0;
	if (uri && *uri && !(mt = p11a_uri_matcher_new(uri, &err)))
		return err ? err : -P11A_E_URI;
	size_t n = 0;
	for (size_t i = 0; i < s->nhelpers; i++) {
		const struct p11a_list_reply *inv = &s->helpers[i].inv;
		for (uint32_t t = 0; t < inv->ntokens; t++) {
			if (mt && p11a_uri_match_token(mt, &inv->tokens[t]) != 1)
				continue;
			if (n < max)
				out[n] = (struct token_ref){ i, &inv->tokens[t] };
			n++;
		}
	}
	p11a_uri_matcher_free(mt);
	return (int)(n > INT_MAX ? INT_MAX : n);
}

#define MAX_REFS 256

static void
handle_unlock(struct server *s, size_t ci, struct p11a_msg *req)
{
	struct token_ref refs[MAX_REFS];
	const char *uri = req->u.unlock.token_uri ? req->u.unlock.token_uri : "";
	int n = find_tokens(s, uri, refs, MAX_REFS);
	if (n < 0) {
		send_error(s, ci, -n, "'%s' is not a valid pkcs11: token URI", uri);
		return;
	}
	if (n > MAX_REFS)
		n = MAX_REFS;
	const struct token_ref *pick = NULL;
	int candidates = 0;
	for (int i = 0; i < n; i++) {
		uint32_t f = refs[i].token->flags;
		if (*uri) {
			candidates++;
			pick = &refs[i];
		} else if ((f & P11A_TOKEN_LOGIN_REQUIRED) && !(f & P11A_TOKEN_LOGGED_IN)) {
			candidates++;
			pick = &refs[i];
		}
	}
	if (n == 0) {
		if (*uri)
			send_error(s, ci, P11A_E_NO_SUCH_TOKEN, "no token matches %s", uri);
		else
			send_error(s, ci, P11A_E_NO_SUCH_TOKEN, "no token is present");
		return;
	}
	if (candidates == 0) {
		send_ok(s, ci);  /* every token is already logged in */
		return;
	}
	if (candidates > 1) {
		send_error(s, ci, P11A_E_AMBIGUOUS,
			   "%d tokens %s; name one with its URI (p11agent unlock --token URI)",
			   candidates, *uri ? "match" : "need a PIN");
		return;
	}
	char what[600];
	snprintf(what, sizeof(what), "unlock of token '%s'", pick->token->label);
	struct pending *p = pending_add(s, ci, pick->helper, P11A_MSG_UNLOCK, what);
	if (!p) {
		send_error(s, ci, P11A_E_NOMEM, "out of memory");
		return;
	}
	/* Forward with the exact token URI; the PIN stays in the fixed array. */
	char *orig = req->u.unlock.token_uri;
	req->u.unlock.token_uri = pick->token->uri;
	log_info("client %d: unlock of token '%s'", s->clients[ci].fd, pick->token->label);
	helper_send(s, pick->helper, p->id, req, -1);
	req->u.unlock.token_uri = orig;
}

static void
handle_lock(struct server *s, size_t ci, struct p11a_msg *req)
{
	struct token_ref refs[MAX_REFS];
	const char *uri = req->u.lock.token_uri ? req->u.lock.token_uri : "";
	int n = find_tokens(s, uri, refs, MAX_REFS);
	if (n < 0) {
		send_error(s, ci, -n, "'%s' is not a valid pkcs11: token URI", uri);
		return;
	}
	if (n > MAX_REFS)
		n = MAX_REFS;
	if (n == 0) {
		send_error(s, ci, P11A_E_NO_SUCH_TOKEN,
			   *uri ? "no token matches the URI" : "no token is present");
		return;
	}
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
		log_info("client %d: lock of token '%s'", s->clients[ci].fd, refs[i].token->label);
		helper_send(s, refs[i].helper, p->id, &fwd, -1);
	}
}

static void
handle_open_channel(struct server *s, size_t ci, const struct p11a_open_channel *oc)
{
	const char *uri = oc->key_uri ? oc->key_uri : "";
	size_t found = 0, hi = 0, n;
	/* An empty list only checks that the URI parses. */
	if (p11a_list_match_keys(NULL, uri, NULL, 0, &n) != 0) {
		send_error(s, ci, P11A_E_URI, "'%s' is not a valid pkcs11: URI", uri);
		return;
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
				return;
			}
		}
		send_error(s, ci, P11A_E_NO_SUCH_KEY, "no such key: %s", uri);
		return;
	}
	if (found > 1) {
		send_error(s, ci, P11A_E_AMBIGUOUS,
			   "%zu keys match %s; add id= or object= to the URI", found, uri);
		return;
	}
	struct helper *h = &s->helpers[hi];
	if (h->fd < 0 || !h->up) {
		send_error(s, ci, P11A_E_HELPER, "token helper for module %s is restarting",
			   h->mod->name);
		return;
	}
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
	log_debug("client %d: signing channel to helper %s for %s", s->clients[ci].fd,
		  h->mod->name, uri);
	helper_send(s, hi, p->id, &adopt, sv[0]);
}

/* 1 while a helper was started less than HELPER_START_WAIT_MS ago and has not reported. */
static int
helpers_starting(const struct server *s, int64_t now)
{
	for (size_t i = 0; i < s->nhelpers; i++) {
		const struct helper *h = &s->helpers[i];
		if (h->fd >= 0 && !h->up && now - h->started_ms < HELPER_START_WAIT_MS)
			return 1;
	}
	return 0;
}

static void client_dispatch(struct server *s, size_t ci, struct p11a_msg *req);

static void
client_request(struct server *s, size_t ci)
{
	struct client *c = &s->clients[ci];
	struct p11a_msg m;
	const uint8_t *body = p11a_buf_ptr(c->in.body);
	size_t len = p11a_buf_len(c->in.body);
	uint8_t type = body[0];
	int r = p11a_msg_decode(body, len, &m);
	inframe_reset(&c->in);
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

static void
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
	case P11A_MSG_UNLOCK:
		handle_unlock(s, ci, &m);
		break;
	case P11A_MSG_LOCK:
		handle_lock(s, ci, &m);
		break;
	case P11A_MSG_OPEN_CHANNEL:
		handle_open_channel(s, ci, &m.u.open_channel);
		break;
	case P11A_MSG_SIGN:
		send_error(s, ci, P11A_E_PROTOCOL,
			   "SIGN goes on a signing channel: send OPEN_CHANNEL first");
		break;
	default:
		send_error(s, ci, P11A_E_PROTOCOL, "message type 0x%02x is not a request", m.type);
		break;
	}
	p11a_msg_clear(&m);  /* wipes an UNLOCK's PIN */
}

/* Dispatches parked requests once no helper is still starting. */
static void
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

/* ------------------------------------------------------------ clients */

static void
client_close(struct server *s, size_t i)
{
	struct client *c = &s->clients[i];
	if (c->fd < 0)
		return;
	log_debug("client %d: closed", c->fd);
	close(c->fd);
	c->fd = -1;
	inframe_reset(&c->in);
	outq_clear(&c->out);
	free(c->wait_error_msg);
	c->wait_error_msg = NULL;
	c->waiting = 0;
	if (c->reply_fd >= 0) {
		close(c->reply_fd);
		c->reply_fd = -1;
	}
	if (c->has_parked) {
		p11a_msg_clear(&c->parked);
		c->has_parked = 0;
	}
	s->open_clients--;
	/* Pending helper replies for it are dropped when they arrive (serial mismatch). */
}

static void
client_accept(struct server *s)
{
	for (;;) {
		int fd = accept4(s->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EMFILE || errno == ENFILE) {
				/* The backlog stays readable: without a pause, poll() spins. */
				log_warn("accept: %s; not accepting for %d ms", strerror(errno),
					 ACCEPT_PAUSE_MS);
				s->accept_paused_until = p11a_now_ms() + ACCEPT_PAUSE_MS;
			} else if (errno != EAGAIN && errno != EWOULDBLOCK) {
				log_warn("accept: %s", strerror(errno));
			}
			return;
		}
		struct ucred cred;
		socklen_t cl = sizeof(cred);
		if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) != 0 || cl != sizeof(cred)) {
			log_warn("refused a connection: cannot read peer credentials: %s", strerror(errno));
			close(fd);
			continue;
		}
		if (cred.uid != s->uid) {
			log_warn("refused a connection from uid %u (pid %ld): only uid %u may use this agent",
				 (unsigned)cred.uid, (long)cred.pid, (unsigned)s->uid);
			close(fd);
			continue;
		}
		if (s->open_clients >= s->max_clients) {
			log_warn("refused a connection from pid %ld: %zu connections open (max-connections)",
				 (long)cred.pid, s->open_clients);
			close(fd);
			continue;
		}
		size_t i;
		for (i = 0; i < s->nclients; i++)
			if (s->clients[i].fd < 0)
				break;
		if (i == s->nclients) {
			if (s->nclients == s->cclients) {
				size_t n = s->cclients ? s->cclients * 2 : 64;
				struct client *nc = realloc(s->clients, n * sizeof(*nc));
				if (!nc) {
					log_err("out of memory accepting a connection");
					close(fd);
					return;
				}
				s->clients = nc;
				s->cclients = n;
			}
			s->nclients++;
		}
		struct client *c = &s->clients[i];
		memset(c, 0, sizeof(*c));
		c->fd = fd;
		c->serial = ++s->next_serial;
		c->uid = cred.uid;
		c->pid = cred.pid;
		c->reply_fd = -1;
		s->open_clients++;
		log_debug("client %d: connected (pid %ld)", fd, (long)cred.pid);
	}
}

static void
client_readable(struct server *s, size_t ci)
{
	struct client *c = &s->clients[ci];
	int r = inframe_read(&c->in, c->fd);
	if (r == 0)
		return;
	if (r == -2) {
		log_warn("client %d (pid %ld): frame length %u refused (1..%u); dropping the connection",
			 c->fd, (long)c->pid, c->in.body_len, P11A_FRAME_MAX);
		client_close(s, ci);
		return;
	}
	if (r < 0) {
		client_close(s, ci);
		return;
	}
	client_request(s, ci);
}

/* ------------------------------------------------------------ loop */

static int
handle_signals(struct server *s)
{
	struct signalfd_siginfo si;
	while (read(s->sig_fd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
		if (si.ssi_signo == SIGTERM || si.ssi_signo == SIGINT) {
			log_info("signal %u: shutting down", si.ssi_signo);
			s->stop = 1;
		} else if (si.ssi_signo == SIGCHLD) {
			/* Helpers are reaped when their socket closes (helper_down). */
		}
	}
	return 0;
}

/*
 * Connections we can hold: max-connections, less what RLIMIT_NOFILE
 * cannot give (a reserve for helpers, signals, channel set-up and logs).
 */
static size_t
max_clients_for_nofile(const struct agent_config *cfg)
{
	struct rlimit rl;
	size_t want = (size_t)cfg->max_connections, reserve = 32 + 2 * cfg->nmodules;

	if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY ||
	    rl.rlim_cur >= want + reserve)
		return want;
	want = rl.rlim_cur > reserve + 16 ? rl.rlim_cur - reserve : 16;
	log_warn("max-connections %d is more than the descriptor limit (%lu) allows: %zu",
		 cfg->max_connections, (unsigned long)rl.rlim_cur, want);
	return want;
}

int
server_run(const struct agent_config *cfg, int listen_fd)
{
	struct server srv;
	struct server *s = &srv;
	memset(s, 0, sizeof(*s));
	s->cfg = cfg;
	s->listen_fd = listen_fd;
	s->uid = getuid();
	int rc = 1;

	sigset_t mask;
	sigemptyset(&mask);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGINT);
	sigaddset(&mask, SIGCHLD);
	sigprocmask(SIG_BLOCK, &mask, NULL);
	s->sig_fd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
	if (s->sig_fd < 0) {
		log_err("signalfd: %s", strerror(errno));
		return 1;
	}

	s->nhelpers = cfg->nmodules;
	s->max_clients = max_clients_for_nofile(cfg);
	s->helpers = calloc(s->nhelpers ? s->nhelpers : 1, sizeof(*s->helpers));
	if (!s->helpers) {
		log_err("out of memory");
		goto out;
	}
	for (size_t i = 0; i < s->nhelpers; i++) {
		s->helpers[i].mod = (struct module_conf *)&cfg->modules[i];
		s->helpers[i].fd = -1;
		s->helpers[i].restart_delay_ms = RESTART_DELAY_MIN_MS;
		helper_spawn(s, i);
	}
	if (s->nhelpers == 0)
		log_warn("no PKCS#11 module to use: give --module PATH or register one with p11-kit");
	/* Clients can connect from now on; requests wait for starting helpers themselves. */
	sysd_notify("READY=1\nSTATUS=listening on %s, %zu module(s) starting", cfg->socket_path,
		    s->nhelpers);

	struct pollfd *pfd = NULL;
	size_t cpfd = 0;
	while (!s->stop) {
		size_t need = 2 + s->nhelpers + s->nclients;
		if (need > cpfd) {
			struct pollfd *np = realloc(pfd, need * sizeof(*np));
			if (!np) {
				log_err("out of memory");
				break;
			}
			pfd = np;
			cpfd = need;
		}
		size_t n = 0;
		int64_t now = p11a_now_ms();
		int64_t next = now + 1000;
		pfd[n++] = (struct pollfd){ s->sig_fd, POLLIN, 0 };
		if (s->accept_paused_until > now) {
			pfd[n++] = (struct pollfd){ -1, 0, 0 };
			if (s->accept_paused_until < next)
				next = s->accept_paused_until;
		} else {
			pfd[n++] = (struct pollfd){ s->listen_fd, POLLIN, 0 };
		}
		for (size_t i = 0; i < s->nhelpers; i++) {
			struct helper *h = &s->helpers[i];
			short ev = 0;
			if (h->fd >= 0)
				ev = POLLIN | (h->out.head ? POLLOUT : 0);
			else if (h->restart_at && h->restart_at < next)
				next = h->restart_at;
			pfd[n++] = (struct pollfd){ ev ? h->fd : -1, ev, 0 };
		}
		for (size_t i = 0; i < s->nclients; i++) {
			struct client *c = &s->clients[i];
			short ev = 0;
			if (c->fd >= 0) {
				/* One outstanding request: read again only once answered. */
				if (!c->waiting && !c->has_parked && !c->out.head && !c->closing)
					ev |= POLLIN;
				if (c->out.head)
					ev |= POLLOUT;
				if (c->in.started_ms && c->in.started_ms + HALF_FRAME_DEADLINE_MS < next)
					next = c->in.started_ms + HALF_FRAME_DEADLINE_MS;
			}
			pfd[n++] = (struct pollfd){ ev ? c->fd : -1, ev, 0 };
		}
		for (size_t i = 0; i < s->npending; i++)
			if (s->pending[i].deadline < next)
				next = s->pending[i].deadline;
		for (size_t i = 0; i < s->nhelpers; i++) {
			struct helper *h = &s->helpers[i];
			if (h->fd >= 0 && !h->up && h->started_ms + HELPER_START_WAIT_MS < next)
				next = h->started_ms + HELPER_START_WAIT_MS;
		}
		int timeout = next > now ? (int)(next - now) : 0;
		int pr = poll(pfd, n, timeout);
		if (pr < 0 && errno != EINTR) {
			log_err("poll: %s", strerror(errno));
			break;
		}
		if (pr > 0) {
			if (pfd[0].revents)
				handle_signals(s);
			if (pfd[1].revents & POLLIN)
				client_accept(s);
			for (size_t i = 0; i < s->nhelpers; i++) {
				struct helper *h = &s->helpers[i];
				short re = pfd[2 + i].revents;
				if (h->fd < 0 || !re)
					continue;
				if (re & POLLOUT && outq_flush(&h->out, h->fd) != 0) {
					helper_down(s, i, "write failed");
					continue;
				}
				if (re & (POLLIN | POLLHUP | POLLERR))
					helper_readable(s, i);
			}
			/* Clients accepted during this round have no pollfd entry yet. */
			size_t polled = n - 2 - s->nhelpers;
			for (size_t i = 0; i < polled && i < s->nclients; i++) {
				struct client *c = &s->clients[i];
				short re = pfd[2 + s->nhelpers + i].revents;
				if (c->fd < 0 || !re)
					continue;
				if (re & POLLOUT && outq_flush(&c->out, c->fd) != 0) {
					client_close(s, i);
					continue;
				}
				if (re & POLLIN)
					client_readable(s, i);
				else if (re & (POLLHUP | POLLERR))
					client_close(s, i);
			}
		}
		now = p11a_now_ms();
		for (size_t i = 0; i < s->nclients; i++) {
			struct client *c = &s->clients[i];
			if (c->fd < 0)
				continue;
			if (c->closing && !c->out.head) {
				client_close(s, i);
			} else if (c->in.started_ms && now - c->in.started_ms > HALF_FRAME_DEADLINE_MS) {
				log_warn("client %d (pid %ld): frame not completed within %d s; dropping the connection",
					 c->fd, (long)c->pid, HALF_FRAME_DEADLINE_MS / 1000);
				client_close(s, i);
			}
		}
		pending_expire(s, now);
		clients_unpark(s, now);
		for (size_t i = 0; i < s->nhelpers; i++) {
			struct helper *h = &s->helpers[i];
			if (h->fd < 0 && !h->dead_for_good && h->restart_at && h->restart_at <= now)
				helper_spawn(s, i);
		}
	}
	rc = 0;
	free(pfd);
	sysd_notify("STOPPING=1\nSTATUS=shutting down");
out:
	for (size_t i = 0; i < s->nclients; i++)
		client_close(s, i);
	free(s->clients);
	for (size_t i = 0; i < s->npending; i++)
		free(s->pending[i].what);
	free(s->pending);
	for (size_t i = 0; i < s->nhelpers; i++) {
		struct helper *h = &s->helpers[i];
		if (h->fd >= 0) {
			close(h->fd);   /* EOF tells the helper to finish */
			h->fd = -1;
			int st;
			int64_t until = p11a_now_ms() + 2000;
			while (waitpid(h->pid, &st, WNOHANG) == 0) {
				if (p11a_now_ms() > until) {
					kill(h->pid, SIGKILL);
					waitpid(h->pid, &st, 0);
					break;
				}
				struct timespec ts = { 0, 10 * 1000 * 1000 };
				nanosleep(&ts, NULL);
			}
		}
		inframe_reset(&h->in);
		outq_clear(&h->out);
		inventory_clear(&h->inv);
	}
	free(s->helpers);
	close(s->sig_fd);
	/* systemd's socket stays: the next connection starts the agent again. */
	if (!cfg->socket_activated && unlink(cfg->socket_path) != 0 && errno != ENOENT)
		log_warn("cannot remove %s: %s", cfg->socket_path, strerror(errno));
	log_info("stopped");
	return rc;
}

/* ------------------------------------------------------------ listen */

int
server_listen(const struct agent_config *cfg)
{
	const char *path = cfg->socket_path;
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof(sa.sun_path)) {
		fprintf(stderr, "p11agentd: socket path too long: %s\n", path);
		return -1;
	}
	memcpy(sa.sun_path, path, strlen(path) + 1);

	char dir[sizeof(sa.sun_path)];
	snprintf(dir, sizeof(dir), "%s", path);
	char *slash = strrchr(dir, '/');
	if (slash == dir)
		slash[1] = '\0';
	else if (slash)
		*slash = '\0';
	else
		snprintf(dir, sizeof(dir), ".");

	struct stat st;
	if (lstat(dir, &st) != 0) {
		if (errno != ENOENT || mkdir(dir, 0700) != 0 || lstat(dir, &st) != 0) {
			fprintf(stderr, "p11agentd: cannot create socket directory %s: %s\n", dir,
				strerror(errno));
			return -1;
		}
	}
	if (!S_ISDIR(st.st_mode)) {
		fprintf(stderr, "p11agentd: %s is not a directory\n", dir);
		return -1;
	}
	if (st.st_uid != getuid()) {
		fprintf(stderr, "p11agentd: socket directory %s belongs to uid %u, not to us\n", dir,
			(unsigned)st.st_uid);
		return -1;
	}
	if (st.st_mode & 077) {
		fprintf(stderr,
			"p11agentd: socket directory %s is accessible to other users (mode %04o); "
			"it must be 0700\n", dir, (unsigned)(st.st_mode & 07777));
		return -1;
	}

	if (lstat(path, &st) == 0) {
		if (!S_ISSOCK(st.st_mode)) {
			fprintf(stderr, "p11agentd: %s exists and is not a socket\n", path);
			return -1;
		}
		int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (probe >= 0 && connect(probe, (struct sockaddr *)&sa, sizeof(sa)) == 0) {
			close(probe);
			fprintf(stderr, "p11agentd: an agent is already running at %s\n", path);
			return -1;
		}
		if (probe >= 0)
			close(probe);
		if (unlink(path) != 0) {
			fprintf(stderr, "p11agentd: cannot remove stale socket %s: %s\n", path,
				strerror(errno));
			return -1;
		}
	}

	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0) {
		fprintf(stderr, "p11agentd: socket: %s\n", strerror(errno));
		return -1;
	}
	mode_t old = umask(0177);
	int b = bind(fd, (struct sockaddr *)&sa, sizeof(sa));
	umask(old);
	if (b != 0 || chmod(path, 0600) != 0 || listen(fd, 128) != 0) {
		fprintf(stderr, "p11agentd: cannot listen on %s: %s\n", path, strerror(errno));
		close(fd);
		return -1;
	}
	return fd;
}
