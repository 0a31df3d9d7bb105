/*
 * Token helper process: see helper.h for the contract with the agent.
 *
 * Threads: the main thread runs the control loop on ctrl_fd (UNLOCK,
 * LOCK, H_REFRESH, H_ADOPT, H_SIGN).  A relayed SIGN (H_SIGN) runs on a
 * thread of its own that writes its reply to ctrl_fd; every write to
 * ctrl_fd takes ctrl_lock.  Each
 * adopted signing channel gets a detached thread that reads SIGN, calls
 * token_sign() and answers on the channel; it never touches ctrl_fd.  A
 * channel thread that sees a token change wakes the control loop through
 * token_event_fd(); the control loop also looks for changes every few
 * seconds (token_check()) and pushes H_INVENTORY id 0 when the inventory
 * it would send differs from the last one.
 */
#include "config.h"
#include "helper.h"
#include "token/token.h"
#include "log.h"
#include "p11a.h"
#include "proto.h"
#include "tlsclass.h"

#include <errno.h>
#include <malloc.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CTRL_WRITE_MS        30000
#define CHAN_WRITE_MS        10000
#define CHECK_INTERVAL_MS    3000    /* look for token changes this often */
#define CHANNELS_MAX         4096    /* signing channels (threads) at once, at most */
#define CHANNEL_STACK_SIZE   (512 * 1024)
#define CHANNEL_BUF_KEEP     (16 * 1024)     /* an idle channel keeps at most this per buffer */
#define CHANNEL_BUF_MMAP     (64 * 1024)     /* blocks this large come from mmap */
/*
 * Descriptors kept free for the module and the token (sessions, files,
 * pcscd or daemon sockets) and for our own control traffic: channels never
 * take the last fd_reserve() descriptors under RLIMIT_NOFILE.
 */
#define FD_RESERVE_MIN       128
/*
 * Audit events wait in a queue of at most EVQ_MAX for the control thread,
 * which sends them in batches EVQ_BATCH_MS after the first (at once when
 * EVQ_URGENT are queued): a channel thread never waits for the agent, and
 * a burst of signatures costs one wake-up and one write per batch, not
 * per signature.  A full queue (the agent does not keep up) drops events
 * and counts them; the next H_EVENT carries the count.
 */
#define EVQ_MAX              2048
#define EVQ_URGENT           (EVQ_MAX / 2)   /* this many queued: send now, not after EVQ_BATCH_MS */
#define EVQ_BATCH_MS         50

struct evq {
	pthread_mutex_t mu;
	struct p11a_event ev[EVQ_MAX];
	uint32_t n;
	uint32_t dropped;               /* since the last H_EVENT */
	int woken;                      /* the control thread was woken for this batch */
	int efd;                        /* eventfd that wakes the control thread; -1 none */
	struct p11a_event batch[EVQ_MAX];       /* the control thread's copy while it sends */
};

struct helper {
	struct token_module *tm;
	int ctrl_fd;
	int sign_timeout_ms;
	int64_t idle_lock_ms;           /* idle-lock, 0 = off */
	int64_t pin_ttl_ms;             /* pin-ttl, 0 = off */
	const char *name;
	int channels_max;               /* from RLIMIT_NOFILE, at most CHANNELS_MAX */
	int per_conn_max;               /* channels one client connection may hold */
	int per_pid_max;                /* channels one client process may hold */
	struct p11a_buf *out;           /* control replies, control thread only */
	struct p11a_buf *last_inv;      /* body (without id) of the last inventory sent */
	atomic_int channels;
	atomic_int relays;              /* relayed SIGNs (H_SIGN) in progress */
	pthread_mutex_t ctrl_lock;      /* one writer at a time on ctrl_fd (relay threads) */
	pthread_mutex_t wlock;          /* guards the channel list, each channel's busy/expired, wd_* */
	struct channel *chans;          /* adopted channels, for the watchdog */
	struct relay *relays_in;        /* relayed SIGNs in progress (under wlock) */
	pthread_cond_t wd_cond;         /* wakes the watchdog (CLOCK_MONOTONIC) */
	int wd_timed;                   /* the watchdog sleeps until wd_until, not for ever */
	struct timespec wd_until;
	int wd_stop;
	struct evq evq;
	int64_t ev_flush_at;            /* control thread: send the queue then; 0 = nothing due */
};

/*
 * A channel whose thread is stuck in the module past the request's
 * deadline (a C_Sign that hangs) is answered by the watchdog thread: it
 * writes ERROR TIMEOUT and shuts the channel down, so the client is told
 * in time and opens a new channel; the stuck thread discards its late
 * result when (if ever) the module returns.
 *
 * The watchdog sleeps until the earliest deadline it knows of, or for ever
 * when no channel is busy.  Every request gets the same timeout, so a new
 * deadline is never earlier than one the watchdog already waits for: a
 * channel wakes it only when it sleeps for ever.  A signature that ends in
 * time leaves the watchdog's wake-up as it is (one spurious wake-up at
 * most per sign-timeout), which keeps the signing path free of system
 * calls for the watchdog.
 */
struct channel {
	struct helper *h;
	int fd;
	uint64_t conn;                  /* the agent's connection serial that opened it */
	uint32_t pid;                   /* that connection's peer pid (0 unknown) */
	char *exe;                      /* its executable read at accept, NULL unknown */
	struct channel *prev, *next;    /* under h->wlock */
	int busy;                       /* in token_sign(); under h->wlock */
	int expired;                    /* answered by the watchdog; under h->wlock */
	struct timespec deadline;       /* of the request in progress */
	struct token_keymemo *memo;     /* last key URI resolved (channel thread only) */
};

/* ------------------------------------------------------------ control writes */

/* Writes one whole frame to the agent; relay threads write too, so under ctrl_lock. */
static int
ctrl_write(struct helper *h, struct p11a_buf *frame)
{
	int r;

	pthread_mutex_lock(&h->ctrl_lock);
	r = p11a_frame_write(h->ctrl_fd, frame, -1, CTRL_WRITE_MS);
	pthread_mutex_unlock(&h->ctrl_lock);
	return r;
}

static int
ctrl_send(struct helper *h, uint32_t id, const struct p11a_msg *m)
{
	int r;

	p11a_buf_reset(h->out);
	if ((r = p11a_msg_encode_internal(id, m, h->out)) != 0) {
		log_err("cannot encode reply type 0x%02x: %s", m->type, p11a_strerror(r));
		return r;
	}
	r = ctrl_write(h, h->out);
	if (r != 0)
		log_err("cannot write to the agent: %s", p11a_strerror(r));
	return r;
}

static int
ctrl_send_error(struct helper *h, uint32_t id, int code, const char *msg)
{
	struct p11a_msg m;
	int r;

	/* An empty msg gets the code's own text (p11a_msg_set_error). */
	if ((r = p11a_msg_set_error(&m, code, "%s", msg != NULL ? msg : "")) != 0)
		return r;
	r = ctrl_send(h, id, &m);
	p11a_msg_clear(&m);
	return r;
}

static int
ctrl_send_ok(struct helper *h, uint32_t id)
{
	struct p11a_msg m = { .type = P11A_MSG_OK };

	return ctrl_send(h, id, &m);
}

/*
 * Sends H_INVENTORY.  With id 0 and !force it is sent only when it
 * differs from the last one sent.  An inventory over the frame cap goes
 * out without certificates rather than not at all.
 */
static int
send_inventory(struct helper *h, uint32_t id, int force)
{
	struct p11a_msg m;
	const uint8_t *body;
	size_t len;
	int r;

	memset(&m, 0, sizeof(m));
	m.type = P11A_MSG_H_INVENTORY;
	if ((r = token_inventory(h->tm, &m.u.list)) != 0) {
		log_err("cannot copy the inventory: %s", p11a_strerror(r));
		if (id != 0)
			return ctrl_send_error(h, id, r, "cannot copy the inventory");
		return r;
	}
	p11a_buf_reset(h->out);
	r = p11a_msg_encode_internal(id, &m, h->out);
	if (r == -P11A_E_TOO_LARGE) {
		log_warn("inventory over %u bytes: sending it without certificates", P11A_FRAME_MAX);
		for (uint32_t i = 0; i < m.u.list.nkeys; i++) {
			free(m.u.list.keys[i].cert);
			m.u.list.keys[i].cert = NULL;
			m.u.list.keys[i].cert_len = 0;
		}
		p11a_buf_reset(h->out);
		r = p11a_msg_encode_internal(id, &m, h->out);
	}
	p11a_msg_clear(&m);
	if (r != 0) {
		log_err("cannot encode the inventory: %s", p11a_strerror(r));
		if (id != 0)
			return ctrl_send_error(h, id, r, "cannot encode the inventory");
		return r;
	}
	/* Skip the 4-byte id: compare what the agent would store. */
	body = p11a_buf_ptr(h->out) + 4;
	len = p11a_buf_len(h->out) - 4;
	if (id == 0 && !force && p11a_buf_len(h->last_inv) == len &&
	    memcmp(p11a_buf_ptr(h->last_inv), body, len) == 0)
		return 0;
	p11a_buf_reset(h->last_inv);
	if (p11a_buf_put(h->last_inv, body, len) != 0)
		p11a_buf_reset(h->last_inv);
	r = ctrl_write(h, h->out);
	if (r != 0)
		log_err("cannot write to the agent: %s", p11a_strerror(r));
	else if (id == 0)
		log_debug("inventory sent");
	return r;
}

static int
refresh_and_push(struct helper *h, int force)
{
	(void)token_refresh(h->tm);
	return send_inventory(h, 0, force);
}

/* ------------------------------------------------------------ channels */

static int
chan_reply_error(struct channel *c, struct p11a_buf *out, int code, const char *msg)
{
	struct p11a_msg m;
	int r;

	r = p11a_msg_set_error(&m, code, "%s", msg != NULL ? msg : "");
	if (r == 0) {
		p11a_buf_reset(out);
		r = p11a_msg_encode(&m, out);
	}
	p11a_msg_clear(&m);
	if (r != 0)
		return r;
	return p11a_frame_write(c->fd, out, -1, CHAN_WRITE_MS);
}

static int
ts_before(const struct timespec *a, const struct timespec *b)
{
	return a->tv_sec < b->tv_sec || (a->tv_sec == b->tv_sec && a->tv_nsec < b->tv_nsec);
}

static long
us_since(const struct timespec *t0)
{
	struct timespec t1;

	clock_gettime(CLOCK_MONOTONIC, &t1);
	return (long)(t1.tv_sec - t0->tv_sec) * 1000000L + (t1.tv_nsec - t0->tv_nsec) / 1000;
}

/*
 * Queues an audit event for the control thread (never the data, only what
 * kind of content it was).  Channel threads and the control thread call
 * it; it never waits for the agent.  Strings are copied; out of memory or
 * a full queue counts the event as dropped.
 */
static void
evq_push(struct helper *h, const struct p11a_event *e)
{
	struct evq *q = &h->evq;
	int wake = 0;

	pthread_mutex_lock(&q->mu);
	if (q->n == EVQ_MAX || p11a_event_copy(&q->ev[q->n], e) != 0) {
		q->dropped++;
	} else {
		q->n++;
	}
	if (!q->woken || q->n == EVQ_URGENT) {
		q->woken = 1;
		wake = 1;
	}
	pthread_mutex_unlock(&q->mu);
	if (wake && q->efd >= 0) {
		uint64_t one = 1;
		ssize_t w = write(q->efd, &one, sizeof(one));
		(void)w;        /* a counter that is already non-zero wakes the loop anyway */
	}
}

static uint64_t
realtime_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* A signature or a refusal, for the audit trail (never the data). */
static void
sign_audit(struct helper *h, uint32_t pid, const char *exe, uint8_t flags,
	   const struct p11a_sign *req, int r, const char *msg, long us)
{
	struct p11a_event e;
	enum p11a_tlsclass tc = p11a_tls_classify(req->data, req->data_len,
						  req->input != P11A_INPUT_MESSAGE);

	memset(&e, 0, sizeof(e));
	e.time_us = realtime_us();
	e.kind = r == -P11A_E_POLICY ? P11A_EV_REFUSED : P11A_EV_SIGN;
	e.uri = req->key_uri;
	e.scheme = req->scheme;
	e.content = (uint8_t)(tc + 1);
	e.pid = pid;
	e.exe = (char *)exe;
	e.flags = flags;
	e.result = r < 0 ? (uint32_t)-r : (uint32_t)r;
	e.message = r != 0 ? (char *)msg : NULL;
	e.duration_us = us > 0 ? (uint64_t)us : 0;
	evq_push(h, &e);
}

static void
chan_audit(const struct channel *c, const struct p11a_sign *req, int r, const char *msg, long us)
{
	sign_audit(c->h, c->pid, c->exe, 0, req, r, msg, us);
}

/* A lock the helper made itself (idle-lock, pin-ttl): token_autolock()'s hook. */
static void
autolock_audit(void *arg, const char *token_uri, const char *reason)
{
	struct p11a_event e;

	memset(&e, 0, sizeof(e));
	e.time_us = realtime_us();
	e.kind = P11A_EV_LOCK;
	e.uri = (char *)token_uri;
	e.reason = (char *)reason;
	evq_push(arg, &e);
}

/*
 * Control thread: sends what the queue holds as H_EVENT frames (id 0),
 * each under the frame cap, the dropped count with the first.
 */
static int
evq_flush(struct helper *h)
{
	struct evq *q = &h->evq;
	struct p11a_event *batch = q->batch;
	struct p11a_msg m;
	uint32_t n, dropped, i = 0;
	uint64_t one;
	int r = 0;

	if (q->efd >= 0 && read(q->efd, &one, sizeof(one)) < 0 && errno != EAGAIN)
		log_debug("audit eventfd: %s", strerror(errno));
	pthread_mutex_lock(&q->mu);
	n = q->n;
	memcpy(batch, q->ev, n * sizeof(*batch));
	dropped = q->dropped;
	q->n = 0;
	q->dropped = 0;
	q->woken = 0;
	pthread_mutex_unlock(&q->mu);
	do {
		size_t bytes = 64;
		uint32_t k = 0;

		while (i + k < n && bytes + p11a_event_wire_size(&batch[i + k]) < P11A_FRAME_MAX - 4) {
			bytes += p11a_event_wire_size(&batch[i + k]);
			k++;
		}
		if (k == 0 && i < n) {
			dropped++;      /* cannot be: every field is bounded far below the cap */
			p11a_event_clear(&batch[i++]);
			continue;
		}
		memset(&m, 0, sizeof(m));
		m.type = P11A_MSG_H_EVENT;
		m.u.events.dropped = dropped;
		m.u.events.n = k;
		m.u.events.ev = batch + i;
		p11a_buf_reset(h->out);
		if (p11a_msg_encode_internal(0, &m, h->out) == 0)
			r = p11a_frame_write(h->ctrl_fd, h->out, -1, CTRL_WRITE_MS);
		else
			log_warn("cannot encode %u audit events; dropped", k);
		for (uint32_t j = 0; j < k; j++)
			p11a_event_clear(&batch[i + j]);
		i += k;
		dropped = 0;
	} while (i < n && r == 0);
	for (; i < n; i++)
		p11a_event_clear(&batch[i]);
	if (r != 0)
		log_err("cannot write to the agent: %s", p11a_strerror(r));
	return r;
}

static int
chan_sign(struct channel *c, const struct p11a_sign *req, const struct timespec *t0,
	  struct p11a_buf *out)
{
	struct helper *h = c->h;
	struct timespec deadline = *t0;
	uint8_t sig[P11A_SIG_MAX];
	long ns;
	size_t sig_len = 0;
	char msg[TOKEN_MSG_MAX];
	struct p11a_msg rep;
	struct token_peer peer;
	long us;
	int r, wr;

	/* The deadline counts from the request's arrival. */
	ns = deadline.tv_nsec + (long)(h->sign_timeout_ms % 1000) * 1000000L;
	deadline.tv_sec += h->sign_timeout_ms / 1000 + ns / 1000000000L;
	deadline.tv_nsec = ns % 1000000000L;
	msg[0] = '\0';
	pthread_mutex_lock(&h->wlock);
	c->busy = 1;
	c->deadline = deadline;
	if (!h->wd_timed || ts_before(&deadline, &h->wd_until)) {
		h->wd_timed = 1;
		h->wd_until = deadline;
		pthread_cond_signal(&h->wd_cond);
	}
	pthread_mutex_unlock(&h->wlock);
	peer.conn = c->conn;
	peer.pid = c->pid;
	peer.exe = c->exe;
	peer.forwarded = 0;     /* a channel's descriptor reached its client: local */
	r = token_sign(h->tm, &c->memo, &peer, req, &deadline, sig, sizeof(sig), &sig_len, msg,
		       sizeof(msg));
	pthread_mutex_lock(&h->wlock);
	c->busy = 0;
	if (c->expired) {
		/* The watchdog answered for us and closed the channel. */
		pthread_mutex_unlock(&h->wlock);
		p11a_wipe(sig, sizeof(sig));
		log_warn("channel %d: the module returned after %ld ms, past the deadline; result dropped",
			 c->fd, us_since(t0) / 1000);
		chan_audit(c, req, -P11A_E_TIMEOUT, "the token did not answer in time", us_since(t0));
		return -P11A_E_TIMEOUT;
	}
	pthread_mutex_unlock(&h->wlock);
	if (log_debug_enabled()) {
		const char *sn = p11a_scheme_name(req->scheme), *hn = p11a_hash_name(req->hash);
		log_debug("channel %d: sign %.300s %s/%s input %u, %zu bytes: %s (%ld us)", c->fd,
			  req->key_uri, sn ? sn : "?", hn ? hn : "?", req->input, req->data_len,
			  r == 0 ? "ok" : msg[0] ? msg : p11a_strerror(r), us_since(t0));
	}
	if (r == -P11A_E_POLICY)
		log_warn("channel %d: pid %lu: refused %.300s: %s (executable %s)", c->fd,
			 (unsigned long)c->pid, req->key_uri, msg, c->exe != NULL ? c->exe : "unknown");
	/* The client hears first; the audit event costs it nothing. */
	us = us_since(t0);
	if (r != 0) {
		wr = chan_reply_error(c, out, r, msg);
	} else {
		memset(&rep, 0, sizeof(rep));
		rep.type = P11A_MSG_SIGNATURE;
		rep.u.signature.sig = sig;
		rep.u.signature.sig_len = sig_len;
		p11a_buf_reset(out);
		if ((wr = p11a_msg_encode(&rep, out)) != 0) {
			r = wr;
			snprintf(msg, sizeof(msg), "cannot encode the signature");
			wr = chan_reply_error(c, out, r, msg);
		} else {
			wr = p11a_frame_write(c->fd, out, -1, CHAN_WRITE_MS);
		}
		p11a_wipe(sig, sizeof(sig));
	}
	chan_audit(c, req, r, msg, us);
	return wr;
}

static void *
chan_main(void *arg)
{
	struct channel *c = arg;
	struct p11a_buf *in = p11a_buf_new(P11A_FRAME_MAX);
	struct p11a_buf *out = p11a_buf_new(P11A_FRAME_MAX);
	/* No descriptors on a channel: the reader passes no control buffer. */
	struct p11a_reader *rd = p11a_reader_new(c->fd, 0);
	struct p11a_msg req;
	struct timespec t0;
	int r;

	if (in == NULL || out == NULL || rd == NULL) {
		log_err("channel %d: out of memory", c->fd);
		goto out;
	}
	for (;;) {
		/* Idle channels wait for ever; a started frame gets P11A_HALF_FRAME_MS. */
		r = p11a_reader_read(rd, in, NULL, -1, P11A_HALF_FRAME_MS);
		if (r != 0) {
			if (r != -P11A_E_IO || errno != 0)
				log_debug("channel %d: closing: %s", c->fd, p11a_strerror(r));
			break;
		}
		clock_gettime(CLOCK_MONOTONIC, &t0);
		r = p11a_msg_decode(p11a_buf_ptr(in), p11a_buf_len(in), &req);
		if (r == -P11A_E_UNKNOWN_TYPE) {
			r = chan_reply_error(c, out, P11A_E_UNKNOWN_TYPE, "unknown message type");
		} else if (r != 0) {
			log_warn("channel %d: malformed message: %s; closing it", c->fd, p11a_strerror(r));
			break;
		} else if (req.type != P11A_MSG_SIGN) {
			p11a_msg_clear(&req);
			r = chan_reply_error(c, out, P11A_E_PROTOCOL, "a signing channel accepts only SIGN");
		} else if (p11a_msg_bad_text(&req) != NULL) {
			p11a_msg_clear(&req);
			r = chan_reply_error(c, out, P11A_E_BAD_REQUEST, "the key URI is not valid UTF-8");
		} else {
			r = chan_sign(c, &req.u.sign, &t0, out);
			p11a_msg_clear(&req);
		}
		if (r != 0) {
			log_debug("channel %d: cannot answer: %s", c->fd, p11a_strerror(r));
			break;
		}
		/* Thousands of idle channels must not each keep a 256 KiB frame. */
		p11a_buf_trim(in, CHANNEL_BUF_KEEP);
		p11a_buf_trim(out, CHANNEL_BUF_KEEP);
	}
 out:
	p11a_reader_free(rd);
	p11a_buf_free(in);
	p11a_buf_free(out);
	pthread_mutex_lock(&c->h->wlock);
	if (c->prev != NULL)
		c->prev->next = c->next;
	else
		c->h->chans = c->next;
	if (c->next != NULL)
		c->next->prev = c->prev;
	pthread_mutex_unlock(&c->h->wlock);
	close(c->fd);
	atomic_fetch_sub(&c->h->channels, 1);
	token_keymemo_free(c->memo);
	free(c->exe);
	free(c);
	return NULL;
}

static int
ts_passed(const struct timespec *now, const struct timespec *t)
{
	return now->tv_sec > t->tv_sec || (now->tv_sec == t->tv_sec && now->tv_nsec >= t->tv_nsec);
}

/*
 * Tells the client of a channel stuck in the module that it timed out, and
 * closes the channel for it.  Called without h->wlock: fd is the
 * watchdog's own duplicate, so the channel thread may close its descriptor
 * meanwhile.  The write never waits: a client that does not read its
 * channel just gets the shutdown.
 */
static void
wd_answer(struct helper *h, int fd, struct p11a_buf *out)
{
	char text[256];
	struct p11a_msg m;

	snprintf(text, sizeof(text), "module %s did not finish signing within %d s "
		 "(the token does not answer); the signing channel is closed",
		 h->name, h->sign_timeout_ms / 1000);
	log_err("channel %d: %s", fd, text);
	memset(&m, 0, sizeof(m));
	if (p11a_msg_set_error(&m, P11A_E_TIMEOUT, "%s", text) == 0) {
		p11a_buf_reset(out);
		if (p11a_msg_encode(&m, out) == 0 && p11a_frame_write(fd, out, -1, 0) != 0)
			log_debug("channel %d: the client does not read; closed without the reply", fd);
	}
	p11a_msg_clear(&m);
	shutdown(fd, SHUT_RDWR);
	close(fd);
}

#define WD_BATCH 64     /* channels answered per pass; more wait for the next */

/* Answers channels stuck in the module past their deadline (see struct channel). */
static void *
watchdog_main(void *arg)
{
	struct helper *h = arg;
	struct p11a_buf *out = p11a_buf_new(P11A_FRAME_MAX);
	struct timespec now;
	int fds[WD_BATCH];
	size_t n;

	if (out == NULL) {
		log_err("watchdog: out of memory; stuck signatures will not be answered");
		return NULL;
	}
	pthread_mutex_lock(&h->wlock);
	while (!h->wd_stop) {
		if (h->wd_timed) {
			/* A copy: channels change wd_until while we wait (and then wake us). */
			struct timespec until = h->wd_until;

			(void)pthread_cond_timedwait(&h->wd_cond, &h->wlock, &until);
		} else {
			(void)pthread_cond_wait(&h->wd_cond, &h->wlock);
		}
		if (h->wd_stop)
			break;
		clock_gettime(CLOCK_MONOTONIC, &now);
		if (h->wd_timed && !ts_passed(&now, &h->wd_until))
			continue;       /* woken early: a new deadline, or spuriously */
		/* Collect what is past its deadline; sleep until the next one. */
		h->wd_timed = 0;
		n = 0;
		for (struct channel *c = h->chans; c != NULL; c = c->next) {
			if (!c->busy || c->expired)
				continue;
			if (!ts_passed(&now, &c->deadline) || n == WD_BATCH) {
				if (!h->wd_timed || ts_before(&c->deadline, &h->wd_until)) {
					h->wd_timed = 1;
					h->wd_until = n == WD_BATCH ? now : c->deadline;
				}
				continue;
			}
			c->expired = 1;
			/*
			 * The channel thread is inside the module and will only
			 * close c->fd, never write it.  A duplicate keeps the
			 * socket ours after we let go of the lock.  Without one
			 * (no descriptor left), shut it down without a reply.
			 */
			if ((fds[n] = fcntl(c->fd, F_DUPFD_CLOEXEC, 0)) >= 0) {
				n++;
			} else {
				log_err("channel %d: module %s did not finish signing within %d s; "
					"closed without a reply (%s)", c->fd, h->name,
					h->sign_timeout_ms / 1000, strerror(errno));
				shutdown(c->fd, SHUT_RDWR);
			}
		}
		/* No client I/O under the lock that every channel and adoption needs. */
		pthread_mutex_unlock(&h->wlock);
		for (size_t i = 0; i < n; i++)
			wd_answer(h, fds[i], out);
		pthread_mutex_lock(&h->wlock);
	}
	pthread_mutex_unlock(&h->wlock);
	p11a_buf_free(out);
	return NULL;
}

/*
 * Signing channels this process may hold: the descriptor limit less a
 * reserve for the module and the token (a quarter, at least
 * FD_RESERVE_MIN), at most CHANNELS_MAX.
 */
static int
channels_max_for_nofile(void)
{
	struct rlimit rl;
	rlim_t n, reserve;

	if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY)
		return CHANNELS_MAX;
	n = rl.rlim_cur;
	reserve = n / 4 > FD_RESERVE_MIN ? n / 4 : FD_RESERVE_MIN;
	if (n <= reserve + 16)
		return 16;
	n -= reserve;
	return n > CHANNELS_MAX ? CHANNELS_MAX : (int)n;
}

/*
 * Refuses a channel that would pass a cap (BUSY, text in msg); counts
 * under h->wlock.  The per-connection and per-process caps keep one
 * runaway client from taking every channel; the helper-wide cap keeps the
 * descriptors the module needs.
 */
static int relays_of_pid_locked(const struct helper *h, uint32_t pid);

static int
chan_admit_locked(struct helper *h, uint64_t conn, uint32_t pid, char *msg, size_t msg_size)
{
	int nconn = 0, npid = 0, n = atomic_load(&h->channels);
	int max = channels_max_for_nofile();    /* the limit may be changed under us (prlimit) */

	h->channels_max = max;
	if (n >= h->channels_max) {
		snprintf(msg, msg_size, "token helper for module %s has %d signing channels open, "
			 "as many as its descriptor limit allows; close some and try again",
			 h->name, n);
		return -P11A_E_BUSY;
	}
	for (const struct channel *c = h->chans; c != NULL; c = c->next) {
		nconn += c->conn == conn;
		npid += pid != 0 && c->pid == pid;
	}
	npid += relays_of_pid_locked(h, pid);
	if (nconn >= h->per_conn_max) {
		snprintf(msg, msg_size, "this connection holds %d signing channels to module %s "
			 "(max-channels-per-connection %d); close some", nconn, h->name,
			 h->per_conn_max);
		return -P11A_E_BUSY;
	}
	if (npid >= h->per_pid_max) {
		snprintf(msg, msg_size, "process %lu holds %d signing channels to module %s "
			 "(max-channels-per-process %d); close some", (unsigned long)pid, npid,
			 h->name, h->per_pid_max);
		return -P11A_E_BUSY;
	}
	return 0;
}

static int
chan_adopt(struct helper *h, int fd, const struct p11a_adopt *owner, char *msg, size_t msg_size)
{
	struct channel *c;
	pthread_attr_t attr;
	pthread_t t;
	int r;

	if ((c = calloc(1, sizeof(*c))) == NULL) {
		snprintf(msg, msg_size, "out of memory");
		return -P11A_E_NOMEM;
	}
	c->h = h;
	c->fd = fd;
	c->conn = owner->conn;
	c->pid = owner->pid;
	if (owner->exe != NULL && owner->exe[0] != '\0' && (c->exe = strdup(owner->exe)) == NULL) {
		free(c);
		snprintf(msg, msg_size, "out of memory");
		return -P11A_E_NOMEM;
	}
	pthread_mutex_lock(&h->wlock);
	if ((r = chan_admit_locked(h, c->conn, c->pid, msg, msg_size)) != 0) {
		pthread_mutex_unlock(&h->wlock);
		free(c->exe);
		free(c);
		return r;
	}
	c->next = h->chans;
	if (h->chans != NULL)
		h->chans->prev = c;
	h->chans = c;
	atomic_fetch_add(&h->channels, 1);
	pthread_mutex_unlock(&h->wlock);
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	/* Many channels may be open; vendor C_Sign needs far less than 8 MiB. */
	pthread_attr_setstacksize(&attr, CHANNEL_STACK_SIZE);
	r = pthread_create(&t, &attr, chan_main, c);
	pthread_attr_destroy(&attr);
	if (r != 0) {
		atomic_fetch_sub(&h->channels, 1);
		pthread_mutex_lock(&h->wlock);
		h->chans = c->next;
		if (c->next != NULL)
			c->next->prev = NULL;
		pthread_mutex_unlock(&h->wlock);
		free(c->exe);
		free(c);
		snprintf(msg, msg_size, "cannot start a channel thread: %s", strerror(r));
		return -P11A_E_BUSY;
	}
	log_debug("channel %d adopted (%d open)", fd, atomic_load(&h->channels));
	return 0;
}

/* ------------------------------------------------------------ relayed SIGN */

/*
 * A SIGN the agent relays for a client without a signing channel
 * (H_SIGN, protocol version 3: ssh -R, a stream relay).  Each runs on a
 * thread of its own, as a channel's SIGN does, so that the control loop
 * never waits for the token; the answer goes back on the control socket
 * with the request's id.  A module that hangs costs the thread: the agent
 * answers its client TIMEOUT at the request's deadline and drops the late
 * reply.  The agent sends one request per connection at a time; relays
 * count against the helper's channel cap all the same.
 */
struct relay {
	struct helper *h;
	uint32_t id;
	struct p11a_msg m;              /* H_SIGN, owned */
	struct timespec t0;             /* arrival: the deadline counts from here */
	struct relay *prev, *next;      /* h->relays_in, under h->wlock */
};

static void *
relay_main(void *arg)
{
	struct relay *rl = arg;
	struct helper *h = rl->h;
	const struct p11a_hsign *hs = &rl->m.u.hsign;
	struct timespec deadline = rl->t0;
	struct token_peer peer;
	struct p11a_msg rep;
	struct p11a_buf *out = p11a_buf_new(P11A_FRAME_MAX);
	uint8_t sig[P11A_SIG_MAX];
	char msg[TOKEN_MSG_MAX];
	size_t sig_len = 0;
	long ns;
	int r;

	ns = deadline.tv_nsec + (long)(h->sign_timeout_ms % 1000) * 1000000L;
	deadline.tv_sec += h->sign_timeout_ms / 1000 + ns / 1000000000L;
	deadline.tv_nsec = ns % 1000000000L;
	msg[0] = '\0';
	peer.conn = hs->conn;
	peer.pid = hs->pid;
	peer.exe = hs->exe != NULL && hs->exe[0] != '\0' ? hs->exe : NULL;
	peer.forwarded = (hs->flags & P11A_HSIGN_FORWARDED) != 0;
	if (out == NULL) {
		r = -P11A_E_NOMEM;
		snprintf(msg, sizeof(msg), "out of memory");
	} else {
		r = token_sign(h->tm, NULL, &peer, &hs->sign, &deadline, sig, sizeof(sig), &sig_len,
			       msg, sizeof(msg));
	}
	if (log_debug_enabled()) {
		const char *sn = p11a_scheme_name(hs->sign.scheme), *hn = p11a_hash_name(hs->sign.hash);
		log_debug("request %u: forwarded sign %.300s %s/%s input %u, %zu bytes: %s (%ld us)",
			  rl->id, hs->sign.key_uri, sn ? sn : "?", hn ? hn : "?", hs->sign.input,
			  hs->sign.data_len, r == 0 ? "ok" : msg[0] ? msg : p11a_strerror(r),
			  us_since(&rl->t0));
	}
	sign_audit(h, hs->pid, peer.exe, peer.forwarded ? P11A_EVENT_FORWARDED : 0, &hs->sign, r,
		   msg, us_since(&rl->t0));
	if (r == -P11A_E_POLICY)
		log_warn("forwarded connection, pid %lu: refused %.300s: %s (executable %s)",
			 (unsigned long)hs->pid, hs->sign.key_uri, msg,
			 peer.exe != NULL ? peer.exe : "unknown");
	if (out != NULL) {
		memset(&rep, 0, sizeof(rep));
		if (r == 0) {
			rep.type = P11A_MSG_SIGNATURE;
			rep.u.signature.sig = sig;
			rep.u.signature.sig_len = sig_len;
			r = p11a_msg_encode_internal(rl->id, &rep, out);
			if (r != 0)
				snprintf(msg, sizeof(msg), "cannot encode the signature");
		}
		if (r != 0 && p11a_msg_set_error(&rep, r, "%s", msg) == 0) {
			p11a_buf_reset(out);
			if (p11a_msg_encode_internal(rl->id, &rep, out) != 0)
				p11a_buf_reset(out);
			p11a_msg_clear(&rep);
		}
		if (p11a_buf_len(out) > 0 && ctrl_write(h, out) != 0)
			log_err("request %u: cannot write the forwarded signature's reply to the agent",
				rl->id);
	}
	p11a_wipe(sig, sizeof(sig));
	p11a_buf_free(out);
	pthread_mutex_lock(&h->wlock);
	if (rl->prev != NULL)
		rl->prev->next = rl->next;
	else
		h->relays_in = rl->next;
	if (rl->next != NULL)
		rl->next->prev = rl->prev;
	pthread_mutex_unlock(&h->wlock);
	p11a_msg_clear(&rl->m);
	free(rl);
	atomic_fetch_sub(&h->relays, 1);
	return NULL;
}

/*
 * A relayed SIGN counts against the peer process's cap as a channel does
 * (max-channels-per-process): behind ssh every remote client has the
 * same peer, the local ssh.  Only relays stuck in a module pile up (the
 * agent sends one per connection at a time).  Under h->wlock.
 */
static int
relays_of_pid_locked(const struct helper *h, uint32_t pid)
{
	int n = 0;

	if (pid == 0)
		return 0;
	for (const struct relay *r = h->relays_in; r != NULL; r = r->next)
		n += r->m.u.hsign.pid == pid;
	return n;
}

static int
relay_admit_locked(struct helper *h, uint32_t pid, char *msg, size_t msg_size)
{
	int npid;

	if (pid == 0)
		return 0;
	npid = relays_of_pid_locked(h, pid);
	for (const struct channel *c = h->chans; c != NULL; c = c->next)
		npid += c->pid == pid;
	if (npid >= h->per_pid_max) {
		snprintf(msg, msg_size, "process %lu holds %d signing channels and forwarded "
			 "signatures in progress on module %s (max-channels-per-process %d); "
			 "try again", (unsigned long)pid, npid, h->name, h->per_pid_max);
		return -P11A_E_BUSY;
	}
	return 0;
}

/* Takes *m (H_SIGN) over and starts its thread; on failure answers the agent itself. */
static void
relay_start(struct helper *h, uint32_t id, struct p11a_msg *m)
{
	struct relay *rl;
	pthread_attr_t attr;
	pthread_t t;
	char msg[256];
	int r;

	/* A module that hangs must not collect threads without bound: the channel cap holds. */
	if (atomic_fetch_add(&h->relays, 1) + atomic_load(&h->channels) >= channels_max_for_nofile()) {
		atomic_fetch_sub(&h->relays, 1);
		p11a_msg_clear(m);
		snprintf(msg, sizeof(msg), "token helper for module %s has as many signatures in "
			 "progress as its descriptor limit allows; try again", h->name);
		(void)ctrl_send_error(h, id, P11A_E_BUSY, msg);
		return;
	}
	if ((rl = calloc(1, sizeof(*rl))) == NULL) {
		atomic_fetch_sub(&h->relays, 1);
		p11a_msg_clear(m);
		(void)ctrl_send_error(h, id, P11A_E_NOMEM, "out of memory");
		return;
	}
	rl->h = h;
	rl->id = id;
	rl->m = *m;
	memset(m, 0, sizeof(*m));
	clock_gettime(CLOCK_MONOTONIC, &rl->t0);
	pthread_mutex_lock(&h->wlock);
	if ((r = relay_admit_locked(h, rl->m.u.hsign.pid, msg, sizeof(msg))) != 0) {
		pthread_mutex_unlock(&h->wlock);
		atomic_fetch_sub(&h->relays, 1);
		p11a_msg_clear(&rl->m);
		free(rl);
		(void)ctrl_send_error(h, id, r, msg);
		return;
	}
	rl->next = h->relays_in;
	if (h->relays_in != NULL)
		h->relays_in->prev = rl;
	h->relays_in = rl;
	pthread_mutex_unlock(&h->wlock);
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	pthread_attr_setstacksize(&attr, CHANNEL_STACK_SIZE);
	r = pthread_create(&t, &attr, relay_main, rl);
	pthread_attr_destroy(&attr);
	if (r != 0) {
		pthread_mutex_lock(&h->wlock);
		h->relays_in = rl->next;
		if (rl->next != NULL)
			rl->next->prev = NULL;
		pthread_mutex_unlock(&h->wlock);
		atomic_fetch_sub(&h->relays, 1);
		p11a_msg_clear(&rl->m);
		free(rl);
		snprintf(msg, sizeof(msg), "cannot start a thread for a forwarded signature: %s",
			 strerror(r));
		(void)ctrl_send_error(h, id, P11A_E_BUSY, msg);
	}
}

/* ------------------------------------------------------------ control loop */

/*
 * Reads what the control socket has (never waiting) and handles a whole
 * frame; 1 when the agent went away or the socket failed (end the helper).
 */
static int
ctrl_handle(struct helper *h, struct p11a_frame_in *cin)
{
	char msg[TOKEN_MSG_MAX];
	struct p11a_msg m;
	uint32_t id = 0;
	int fd, tried, r;

	r = p11a_frame_in_recv(cin, h->ctrl_fd);
	if (r == 0)
		return 0;   /* the rest of the frame comes later (P11A_HALF_FRAME_MS) */
	if (r < 0) {
		if (r == -P11A_E_IO && errno == 0)
			log_debug("agent closed the control socket");
		else
			log_err("control socket: %s", p11a_strerror(r));
		return 1;
	}
	fd = cin->fd;
	cin->fd = -1;
	r = p11a_msg_decode_internal(p11a_buf_ptr(cin->body), p11a_buf_len(cin->body), &id, &m);
	/* The frame may hold a PIN: wipe it now that it is decoded. */
	p11a_frame_in_reset(cin);
	if (r != 0) {
		if (fd >= 0)
			close(fd);
		log_warn("bad control frame (id %u): %s", id, p11a_strerror(r));
		(void)ctrl_send_error(h, id, r, r == -P11A_E_UNKNOWN_TYPE ?
				      "unknown message type" : "malformed message");
		return 0;
	}
	if (fd >= 0 && m.type != P11A_MSG_H_ADOPT) {
		close(fd);
		fd = -1;
	}
	msg[0] = '\0';
	switch (m.type) {
	case P11A_MSG_UNLOCK:
		log_debug("request %u: unlock %s", id,
			  m.u.unlock.token_uri[0] ? m.u.unlock.token_uri : "(the token that needs it)");
		r = token_unlock(h->tm, m.u.unlock.token_uri, m.u.unlock.pin, m.u.unlock.pin_len,
				 &tried, msg, sizeof(msg));
		p11a_msg_clear(&m);     /* wipes the PIN */
		/*
		 * Inventory first: the agent answers its client on our reply and
		 * must already list the new login state by then.  An UNLOCK that
		 * asked nothing of the token (already logged in) changes nothing:
		 * no rescan, whatever a client sends in a loop.
		 */
		if (tried)
			(void)refresh_and_push(h, 1);
		if (r == 0)
			(void)ctrl_send_ok(h, id);
		else
			(void)ctrl_send_error(h, id, r, msg);
		break;
	case P11A_MSG_LOCK:
		log_debug("request %u: lock %s", id, m.u.lock.token_uri[0] ? m.u.lock.token_uri : "(all)");
		r = token_lock(h->tm, m.u.lock.token_uri, msg, sizeof(msg));
		p11a_msg_clear(&m);
		token_ctxpin_forget(NULL);      /* keep-context-pin: wiped on lock */
		(void)refresh_and_push(h, 1);
		if (r == 0)
			(void)ctrl_send_ok(h, id);
		else
			(void)ctrl_send_error(h, id, r, msg);
		break;
	case P11A_MSG_H_GRANT:
		log_debug("request %u: a confirmed signature for connection %llu", id,
			  (unsigned long long)m.u.grant.conn);
		r = token_grant_add(m.u.grant.conn, m.u.grant.key_uri);
		p11a_msg_clear(&m);
		if (r == 0)
			(void)ctrl_send_ok(h, id);
		else
			(void)ctrl_send_error(h, id, r, "out of memory");
		break;
	case P11A_MSG_H_CONTEXT_PIN:
		log_debug("request %u: a context PIN for connection %llu", id,
			  (unsigned long long)m.u.ctx_pin.conn);
		r = token_ctxpin_add(m.u.ctx_pin.conn, m.u.ctx_pin.key_uri, m.u.ctx_pin.pin,
				     m.u.ctx_pin.pin_len);
		p11a_msg_clear(&m);     /* wipes the PIN */
		if (r == 0)
			(void)ctrl_send_ok(h, id);
		else
			(void)ctrl_send_error(h, id, r, r == -P11A_E_BUSY ? "too many context PINs "
					      "wait for their signature" : p11a_strerror(r));
		break;
	case P11A_MSG_H_REFRESH:
		log_debug("request %u: refresh", id);
		p11a_msg_clear(&m);
		(void)token_refresh(h->tm);
		(void)send_inventory(h, id, 1);
		break;
	case P11A_MSG_H_ADOPT:
		if (fd == P11A_FD_LOST) {
			log_err("request %u: no descriptor left to take a signing channel", id);
			snprintf(msg, sizeof(msg), "token helper for module %s is out of descriptors "
				 "(RLIMIT_NOFILE); close some signing channels", h->name);
			(void)ctrl_send_error(h, id, P11A_E_BUSY, msg);
			p11a_msg_clear(&m);
			break;
		}
		if (fd < 0) {
			(void)ctrl_send_error(h, id, P11A_E_PROTOCOL, "H_ADOPT without a descriptor");
			p11a_msg_clear(&m);
			break;
		}
		r = chan_adopt(h, fd, &m.u.adopt, msg, sizeof(msg));
		p11a_msg_clear(&m);     /* the channel keeps its own copy of the executable */
		if (r != 0) {
			close(fd);
			(void)ctrl_send_error(h, id, r, msg);
		} else {
			(void)ctrl_send_ok(h, id);
		}
		break;
	case P11A_MSG_H_SIGN:
		relay_start(h, id, &m);
		break;
	default:
		log_warn("request %u: message type 0x%02x is not for a token helper", id, m.type);
		p11a_msg_clear(&m);
		(void)ctrl_send_error(h, id, P11A_E_PROTOCOL, "message not accepted by a token helper");
		break;
	}
	return 0;
}

/* Static: detached channel threads may still look at it while the process exits. */
static struct helper the_helper;

int
helper_main(const struct module_conf *mod, int ctrl_fd, const struct agent_config *cfg)
{
	int sign_timeout_ms = cfg->sign_timeout_ms;
	struct helper *h = &the_helper;
	struct p11a_buf *in = NULL;
	struct p11a_frame_in cin;
	struct pollfd pfd[3];
	int64_t next_check;
	int n;

	/* Die with the agent; no core dumps or ptrace of a process that sees PINs. */
	prctl(PR_SET_PDEATHSIG, SIGTERM, 0, 0, 0);
	prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
	signal(SIGPIPE, SIG_IGN);
	/* A hangup is the agent's to act on (it locks every token), not a reason to die. */
	signal(SIGHUP, SIG_IGN);

	/*
	 * A fixed threshold (glibc otherwise raises it after the first free
	 * of a large block): buffers that grew for a large frame come from
	 * mmap and go back to the system when a channel trims them, instead
	 * of staying in a thread's arena.
	 */
	(void)mallopt(M_MMAP_THRESHOLD, CHANNEL_BUF_MMAP);
	memset(h, 0, sizeof(*h));
	h->ctrl_fd = ctrl_fd;
	h->sign_timeout_ms = sign_timeout_ms > 0 ? sign_timeout_ms : P11A_SIGN_TIMEOUT_MS;
	h->name = mod->name != NULL ? mod->name : mod->path;
	h->channels_max = channels_max_for_nofile();
	h->per_conn_max = cfg->max_channels_per_connection;
	h->per_pid_max = cfg->max_channels_per_process;
	/* The module's own (a [module] section), else the global setting. */
	h->idle_lock_ms = mod->idle_lock_ms;
	h->pin_ttl_ms = mod->pin_ttl_ms;
	log_debug("module %s: up to %d signing channels, %d per connection, %d per process",
		  h->name, h->channels_max, h->per_conn_max, h->per_pid_max);
	atomic_init(&h->channels, 0);
	atomic_init(&h->relays, 0);
	pthread_mutex_init(&h->ctrl_lock, NULL);
	pthread_mutex_init(&h->wlock, NULL);
	pthread_mutex_init(&h->evq.mu, NULL);
	h->evq.efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (h->evq.efd < 0)
		log_warn("eventfd: %s; audit events are sent every few seconds only", strerror(errno));
	{
		pthread_condattr_t ca;

		/* Deadlines are CLOCK_MONOTONIC, as token_sign() takes them. */
		pthread_condattr_init(&ca);
		pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
		pthread_cond_init(&h->wd_cond, &ca);
		pthread_condattr_destroy(&ca);
	}
	in = p11a_buf_new(P11A_FRAME_MAX);
	h->out = p11a_buf_new(P11A_FRAME_MAX);
	h->last_inv = p11a_buf_new(P11A_FRAME_MAX);
	if (in == NULL || h->out == NULL || h->last_inv == NULL) {
		log_err("out of memory");
		_exit(HELPER_EXIT_INIT);
	}
	/* Descriptors come with H_ADOPT. */
	p11a_frame_in_init(&cin, in, P11A_FRAME_IN_FDS);
	{
		char why[TOKEN_MSG_MAX];

		if (token_module_load(mod, h->sign_timeout_ms, &h->tm, why, sizeof(why)) != 0) {
			/* The agent keeps the reason for `p11agent status` (ERROR with id 0). */
			(void)ctrl_send_error(h, 0, P11A_E_TOKEN, why);
			log_err("module %s: not usable, helper exits", mod->path);
			_exit(HELPER_EXIT_INIT);
		}
		if (token_set_policy(cfg, why, sizeof(why)) != 0) {
			(void)ctrl_send_error(h, 0, P11A_E_INTERNAL, why);
			log_err("module %s: %s; helper exits", mod->path, why);
			_exit(HELPER_EXIT_INIT);
		}
	}
	{
		pthread_attr_t attr;
		pthread_t t;
		pthread_attr_init(&attr);
		pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
		if (pthread_create(&t, &attr, watchdog_main, h) != 0)
			log_err("cannot start the watchdog thread; stuck signatures will not be answered");
		pthread_attr_destroy(&attr);
	}
	(void)token_refresh(h->tm);
	/* Cards coming and going are seen at once where the module reports them. */
	token_watch_start(h->tm);
	/* The first inventory marks the helper up. */
	if (send_inventory(h, 0, 1) != 0)
		goto out;

	next_check = p11a_now_ms() + CHECK_INTERVAL_MS;
	for (;;) {
		int64_t now = p11a_now_ms();
		int64_t wake = next_check;

		/* A control frame that started must be whole in time. */
		if (cin.started_ms && now - cin.started_ms > P11A_HALF_FRAME_MS) {
			log_err("control socket: frame not completed within %d s",
				P11A_HALF_FRAME_MS / 1000);
			break;
		}
		if (cin.started_ms && cin.started_ms + P11A_HALF_FRAME_MS < wake)
			wake = cin.started_ms + P11A_HALF_FRAME_MS + 1;

		/*
		 * Look for token changes every CHECK_INTERVAL_MS whatever the
		 * traffic: a client opening a channel every second must not
		 * keep a removal or a reinsertion from being seen.
		 */
		if (now >= next_check) {
			next_check = now + CHECK_INTERVAL_MS;
			if (h->evq.efd < 0)
				h->ev_flush_at = now;   /* no eventfd: batches every check */
			if (token_check(h->tm) && refresh_and_push(h, 0) != 0)
				break;
			continue;
		}
		/*
		 * idle-lock and pin-ttl: lock what is due, and wake up when the
		 * next token is.  Signatures meanwhile only push an idle
		 * deadline later: waking at the old one finds that out.
		 */
		if (h->idle_lock_ms > 0 || h->pin_ttl_ms > 0) {
			int64_t due = INT64_MAX;

			int locked = token_autolock(h->tm, now, h->idle_lock_ms, h->pin_ttl_ms, &due,
						    autolock_audit, h);
			if (locked > 0)
				token_ctxpin_forget(NULL);      /* keep-context-pin: wiped on lock */
			if (locked > 0 && refresh_and_push(h, 1) != 0)
				break;
			if (due < wake)
				wake = due;
		}
		/* Context PINs nobody took are wiped when their time is up. */
		{
			int64_t due = token_ctxpin_sweep(now);
			if (due < wake)
				wake = due;
		}
		/* Audit events go out in batches (EVQ_BATCH_MS after the first one). */
		if (h->ev_flush_at != 0 && now >= h->ev_flush_at) {
			h->ev_flush_at = 0;
			if (evq_flush(h) != 0)
				break;
			continue;
		}
		if (h->ev_flush_at != 0 && h->ev_flush_at < wake)
			wake = h->ev_flush_at;
		pfd[0].fd = ctrl_fd;
		pfd[0].events = POLLIN;
		pfd[0].revents = 0;
		pfd[1].fd = token_event_fd(h->tm);
		pfd[1].events = POLLIN;
		pfd[1].revents = 0;
		pfd[2].fd = h->evq.efd;
		pfd[2].events = POLLIN;
		pfd[2].revents = 0;
		n = poll(pfd, h->evq.efd >= 0 ? 3 : 2, wake > now ? (int)(wake - now) : 0);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			log_err("poll: %s", strerror(errno));
			break;
		}
		if (n == 0)
			continue;
		if (h->evq.efd >= 0 && (pfd[2].revents & POLLIN)) {
			uint64_t cnt;

			uint32_t queued;

			if (read(h->evq.efd, &cnt, sizeof(cnt)) < 0 && errno != EAGAIN)
				log_debug("audit eventfd: %s", strerror(errno));
			pthread_mutex_lock(&h->evq.mu);
			queued = h->evq.n;
			pthread_mutex_unlock(&h->evq.mu);
			if (queued >= EVQ_URGENT)
				h->ev_flush_at = p11a_now_ms();
			else if (h->ev_flush_at == 0)
				h->ev_flush_at = p11a_now_ms() + EVQ_BATCH_MS;
		}
		if (pfd[1].revents & POLLIN) {
			token_event_clear(h->tm);
			if (refresh_and_push(h, 0) != 0)
				break;
		}
		if (pfd[0].revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL)) {
			if (ctrl_handle(h, &cin) != 0)
				break;
		}
	}
 out:
	pthread_mutex_lock(&h->wlock);
	h->wd_stop = 1;
	pthread_cond_signal(&h->wd_cond);
	pthread_mutex_unlock(&h->wlock);
	p11a_frame_in_reset(&cin);
	token_module_close(h->tm);
	p11a_buf_free(in);
	p11a_buf_free(h->out);
	p11a_buf_free(h->last_inv);
	return 0;
}
