/*
 * Token helper process: see helper.h for the contract with the agent.
 *
 * Threads: the main thread runs the control loop on ctrl_fd (UNLOCK,
 * LOCK, H_REFRESH, H_ADOPT) and is the only writer to ctrl_fd.  Each
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
	pthread_mutex_t wlock;          /* guards the channel list, each channel's busy/expired, wd_* */
	struct channel *chans;          /* adopted channels, for the watchdog */
	pthread_cond_t wd_cond;         /* wakes the watchdog (CLOCK_MONOTONIC) */
	int wd_timed;                   /* the watchdog sleeps until wd_until, not for ever */
	struct timespec wd_until;
	int wd_stop;
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

static int
ctrl_send(struct helper *h, uint32_t id, const struct p11a_msg *m)
{
	int r;

	p11a_buf_reset(h->out);
	if ((r = p11a_msg_encode_internal(id, m, h->out)) != 0) {
		log_err("cannot encode reply type 0x%02x: %s", m->type, p11a_strerror(r));
		return r;
	}
	r = p11a_frame_write(h->ctrl_fd, h->out, -1, CTRL_WRITE_MS);
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
	r = p11a_frame_write(h->ctrl_fd, h->out, -1, CTRL_WRITE_MS);
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
	int r;

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
	peer.pid = c->pid;
	peer.exe = c->exe;
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
	if (r != 0)
		return chan_reply_error(c, out, r, msg);
	memset(&rep, 0, sizeof(rep));
	rep.type = P11A_MSG_SIGNATURE;
	rep.u.signature.sig = sig;
	rep.u.signature.sig_len = sig_len;
	p11a_buf_reset(out);
	if ((r = p11a_msg_encode(&rep, out)) != 0)
		return chan_reply_error(c, out, r, "cannot encode the signature");
	return p11a_frame_write(c->fd, out, -1, CHAN_WRITE_MS);
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
		(void)refresh_and_push(h, 1);
		if (r == 0)
			(void)ctrl_send_ok(h, id);
		else
			(void)ctrl_send_error(h, id, r, msg);
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
	struct pollfd pfd[2];
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
	h->idle_lock_ms = cfg->idle_lock_ms;
	h->pin_ttl_ms = cfg->pin_ttl_ms;
	log_debug("module %s: up to %d signing channels, %d per connection, %d per process",
		  h->name, h->channels_max, h->per_conn_max, h->per_pid_max);
	atomic_init(&h->channels, 0);
	pthread_mutex_init(&h->wlock, NULL);
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

			if (token_autolock(h->tm, now, h->idle_lock_ms, h->pin_ttl_ms, &due) > 0 &&
			    refresh_and_push(h, 1) != 0)
				break;
			if (due < wake)
				wake = due;
		}
		pfd[0].fd = ctrl_fd;
		pfd[0].events = POLLIN;
		pfd[0].revents = 0;
		pfd[1].fd = token_event_fd(h->tm);
		pfd[1].events = POLLIN;
		pfd[1].revents = 0;
		n = poll(pfd, 2, wake > now ? (int)(wake - now) : 0);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			log_err("poll: %s", strerror(errno));
			break;
		}
		if (n == 0)
			continue;
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
