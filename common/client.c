/*
 * Client side of the agent protocol: one main connection plus a small
 * cache of signing channels, one per key URI.
 */
#include "config.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>

#include "p11a.h"
#include "buf.h"
#include "proto.h"
#include "client.h"

#define CHAN_CACHE	8

struct chan {
	char *key_uri;      /* NULL: slot free */
	int fd;
	struct p11a_reader *rd;
	uint64_t used;      /* for least-recently-used eviction */
};

struct p11a_client {
	int fd;             /* main connection, -1 when closed */
	struct p11a_reader *rd;     /* its reader (descriptors arrive there) */
	uint64_t fork_gen;  /* descriptors are not shared with a forked child */
	char *path;
	char *name;
	int timeout_ms;     /* -1: no deadline */
	uint64_t tick;
	uint16_t version;   /* protocol version the agent chose at HELLO */
	int relay;          /* CHANNEL came without a descriptor: sign on the main connection */
	struct chan chans[CHAN_CACHE];
	char last_error[512];
};

static void
set_error(struct p11a_client *c, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

static void
set_error(struct p11a_client *c, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(c->last_error, sizeof(c->last_error), fmt, ap);
	va_end(ap);
}

/* Message for a local failure, with errno where it says more. */
static int
local_error(struct p11a_client *c, int r, const char *what)
{
	if ((r == -P11A_E_IO || r == -P11A_E_NOT_RUNNING || r == -P11A_E_DENIED) &&
	    errno != 0)
		set_error(c, "%s: %s (%s)", what, p11a_strerror(r), strerror(errno));
	else if (r == -P11A_E_IO)
		set_error(c, "%s: connection closed by the agent", what);
	else
		set_error(c, "%s: %s", what, p11a_strerror(r));
	return r;
}

int
p11a_default_socket_path(char *out, size_t out_size)
{
	const char *s;
	int n;

	if ((s = secure_getenv("P11AGENT_SOCK")) != NULL && *s != '\0')
		n = snprintf(out, out_size, "%s", s);
	else if ((s = secure_getenv("XDG_RUNTIME_DIR")) != NULL && *s != '\0')
		n = snprintf(out, out_size, "%s/p11agent/agent.sock", s);
	else
		n = snprintf(out, out_size, "/run/user/%lu/p11agent/agent.sock",
		    (unsigned long)getuid());
	if (n < 0 || (size_t)n >= out_size) {
		if (out_size > 0)
			out[0] = '\0';
		return -P11A_E_TOO_LARGE;
	}
	return 0;
}

static void
fd_close(int *fd)
{
	int saved = errno;

	if (*fd >= 0)
		close(*fd);
	*fd = -1;
	errno = saved;
}

static void
chan_drop(struct p11a_client *c, size_t i)
{
	p11a_reader_free(c->chans[i].rd);
	c->chans[i].rd = NULL;
	fd_close(&c->chans[i].fd);
	free(c->chans[i].key_uri);
	c->chans[i].key_uri = NULL;
	c->chans[i].used = 0;
}

static void
main_close(struct p11a_client *c)
{
	p11a_reader_free(c->rd);
	c->rd = NULL;
	fd_close(&c->fd);
}

/*
 * Fork detection without a getpid() system call on every request: a
 * counter that a pthread_atfork() child handler bumps.  Counter and
 * handler are in the same object (this convenience library is linked into
 * each program and module that uses it), so they go away together: glibc
 * drops a DSO's atfork handlers at dlclose(), and a copy loaded again
 * starts with a fresh counter and registers its own handler.
 */
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static int fork_hooked;                 /* written once, under fork_once */
static _Atomic uint64_t fork_gen;

static void
fork_child(void)
{
	atomic_fetch_add_explicit(&fork_gen, 1, memory_order_relaxed);
}

static void
fork_hook(void)
{
	fork_hooked = pthread_atfork(NULL, NULL, fork_child) == 0;
}

uint64_t
p11a_fork_generation(void)
{
	(void)pthread_once(&fork_once, fork_hook);
	if (!fork_hooked)
		return ((uint64_t)1 << 63) | (uint64_t)getpid();
	return atomic_load_explicit(&fork_gen, memory_order_relaxed);
}

/*
 * After fork() the descriptors are shared with the parent: replies would
 * go to whichever process reads first.  The child starts over.
 */
static void
fork_check(struct p11a_client *c)
{
	uint64_t gen = p11a_fork_generation();
	size_t i;

	if (c->fork_gen == gen)
		return;
	main_close(c);
	for (i = 0; i < CHAN_CACHE; i++)
		chan_drop(c, i);
	c->fork_gen = gen;
}

static int
reader_new(int fd, unsigned flags, struct p11a_reader **out)
{
	if ((*out = p11a_reader_new(fd, flags)) == NULL) {
		errno = ENOMEM;
		return -P11A_E_NOMEM;
	}
	return 0;
}

/*
 * An idle connection has nothing to read: readable or hung up means the
 * agent closed it (or broke the one-reply rule).
 */
static int
conn_alive(int fd)
{
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	int n;

	do {
		n = poll(&pfd, 1, 0);
	} while (n < 0 && errno == EINTR);
	return n == 0;
}

/*
 * Whoever listens at the path gets everything we send, a PIN included:
 * the listener must be our own uid (or root) before a byte leaves.  A
 * directory we do not control, or P11AGENT_SOCK pointing elsewhere, must
 * not hand the PIN to another user.
 */
static uid_t
peer_uid(int fd)
{
	struct ucred cr;
	socklen_t len = sizeof(cr);

	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &len) != 0 || len != sizeof(cr))
		return (uid_t)-1;
	return cr.uid;
}

static int
peer_check(struct p11a_client *c, int fd)
{
	uid_t uid = peer_uid(fd), me = geteuid();

	if (uid == (uid_t)-1) {
		set_error(c, "agent at %s: cannot read the owner of the socket (%s); nothing sent",
		    c->path, strerror(errno));
		return -P11A_E_DENIED;
	}
	if (uid != me && uid != 0) {
		set_error(c, "agent at %s runs as uid %lu, not as you (uid %lu) or root: "
		    "refusing to talk to it; nothing was sent", c->path,
		    (unsigned long)uid, (unsigned long)me);
		errno = 0;
		return -P11A_E_DENIED;
	}
	return 0;
}

/* Connects c->fd to c->path; on failure c->last_error says why. */
static int
sock_connect(struct p11a_client *c)
{
	struct sockaddr_un sa;
	struct timeval tv;
	size_t plen = strlen(c->path);
	int fd, r;

	c->fd = -1;
	memset(&sa, 0, sizeof(sa));
	sa.sun_family = AF_UNIX;
	if (plen >= sizeof(sa.sun_path)) {
		set_error(c, "socket path %s is too long (%zu bytes, at most %zu)", c->path, plen,
		    sizeof(sa.sun_path) - 1);
		errno = ENAMETOOLONG;
		return -P11A_E_TOO_LARGE;
	}
	memcpy(sa.sun_path, c->path, plen);
	if ((fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0)
		return local_error(c, -P11A_E_IO, "cannot create a socket");
	/* Bounds connect() when the agent's backlog is full. */
	if (c->timeout_ms > 0) {
		tv.tv_sec = c->timeout_ms / 1000;
		tv.tv_usec = (c->timeout_ms % 1000) * 1000;
		(void)setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	}
	do {
		r = connect(fd, (struct sockaddr *)&sa, sizeof(sa));
	} while (r < 0 && errno == EINTR);
	if (r < 0) {
		switch (errno) {
		case ENOENT:
		case ECONNREFUSED:
		case ENOTDIR:
			set_error(c, "agent not running at %s (%s)", c->path, strerror(errno));
			r = -P11A_E_NOT_RUNNING;
			break;
		case EACCES:
		case EPERM:
			set_error(c, "agent at %s: permission denied (%s)", c->path, strerror(errno));
			r = -P11A_E_DENIED;
			break;
		case EAGAIN:
		case ETIMEDOUT:
			set_error(c, "agent at %s: connection timed out (the agent is busy)", c->path);
			r = -P11A_E_TIMEOUT;
			break;
		default:
			set_error(c, "agent at %s: cannot connect: %s", c->path, strerror(errno));
			r = -P11A_E_IO;
			break;
		}
		fd_close(&fd);
		return r;
	}
	if ((r = peer_check(c, fd)) != 0) {
		fd_close(&fd);
		return r;
	}
	c->fd = fd;
	return 0;
}

/* How an exchange ended, beyond its return code. */
enum xstate {
	XS_OK,           /* reply received */
	XS_UNSENT,       /* failed before sending: the connection is untouched */
	XS_REMOTE,       /* ERROR reply: the connection is still in step */
	XS_CLOSED,       /* the peer had closed the connection (EOF, EPIPE, reset) */
	XS_FAILED        /* anything else: the connection is out of step */
};

static enum xstate
io_state(int r)
{
	if (r == -P11A_E_IO && (errno == 0 || errno == EPIPE || errno == ECONNRESET))
		return XS_CLOSED;
	return XS_FAILED;
}

/*
 * One request and one reply on fd within the client's deadline.  On
 * success *reply holds the reply; an ERROR reply becomes its negative code.
 */
static int
exchange(struct p11a_client *c, int fd, struct p11a_reader *rd, const struct p11a_msg *req,
	 struct p11a_msg *reply, int *fd_received, enum xstate *how)
{
	struct p11a_buf *out = NULL, *in = NULL;
	int64_t deadline = c->timeout_ms < 0 ? -1 : p11a_now_ms() + c->timeout_ms;
	int rfd = -1, left, r;

	memset(reply, 0, sizeof(*reply));
	*how = XS_UNSENT;
	if (fd_received != NULL)
		*fd_received = -1;
	if ((out = p11a_buf_new(P11A_FRAME_MAX)) == NULL ||
	    (in = p11a_buf_new(P11A_FRAME_MAX)) == NULL) {
		r = -P11A_E_NOMEM;
		set_error(c, "%s", p11a_strerror(r));
		goto out;
	}
	if ((r = p11a_msg_encode(req, out)) != 0) {
		set_error(c, "cannot encode request: %s", p11a_strerror(r));
		goto out;
	}
	if ((r = p11a_frame_write(fd, out, -1, c->timeout_ms)) != 0) {
		*how = io_state(r);
		local_error(c, r, "sending request to the agent");
		goto out;
	}
	*how = XS_FAILED;   /* from here on a failure leaves the connection out of step */
	if (deadline < 0) {
		left = -1;
	} else {
		int64_t l = deadline - p11a_now_ms();

		left = l < 0 ? 0 : (int)l;
	}
	if ((r = p11a_reader_read(rd, in, &rfd, left, -1)) != 0) {
		*how = io_state(r);
		local_error(c, r, "reading reply from the agent");
		goto out;
	}
	if ((r = p11a_msg_decode(p11a_buf_ptr(in), p11a_buf_len(in), reply)) != 0) {
		set_error(c, "bad reply from the agent: %s", p11a_strerror(r));
		goto out;
	}
	if (reply->type == P11A_MSG_ERROR) {
		uint32_t code = reply->u.error.code;

		r = code > (uint32_t)INT32_MAX ? -P11A_E_INTERNAL : -(int)code;
		if (reply->u.error.message != NULL && *reply->u.error.message != '\0')
			set_error(c, "%s", reply->u.error.message);
		else
			set_error(c, "%s", p11a_strerror(r));
		p11a_msg_clear(reply);
		*how = XS_REMOTE;
		goto out;
	}
	if (fd_received != NULL) {
		*fd_received = rfd;
		rfd = -1;
	}
	*how = XS_OK;
	r = 0;
 out:
	fd_close(&rfd);
	p11a_buf_free(out);     /* wipes: the request may be an UNLOCK */
	p11a_buf_free(in);
	return r;
}

static int
client_hello(struct p11a_client *c)
{
	struct p11a_msg req, reply;
	enum xstate how;
	int r;

	memset(&req, 0, sizeof(req));
	req.type = P11A_MSG_HELLO;
	req.u.hello.min_version = P11A_PROTO_VERSION_MIN;
	req.u.hello.max_version = P11A_PROTO_VERSION;
	req.u.hello.client = c->name;
	r = exchange(c, c->fd, c->rd, &req, &reply, NULL, &how);
	/* peer_check let through our uid or root; a root agent serves only root. */
	if (how == XS_CLOSED && peer_uid(c->fd) == 0 && geteuid() != 0) {
		set_error(c, "agent at %s runs as root and closed the connection: "
		    "it serves only root", c->path);
		return -P11A_E_DENIED;
	}
	if (r != 0)
		return r;
	if (reply.type != P11A_MSG_HELLO_REPLY) {
		set_error(c, "agent answered HELLO with message type 0x%02x", reply.type);
		r = -P11A_E_PROTOCOL;
	} else if (reply.u.hello_reply.version < P11A_PROTO_VERSION_MIN ||
	    reply.u.hello_reply.version > P11A_PROTO_VERSION) {
		set_error(c, "agent chose protocol version %u, we speak %u..%u",
		    reply.u.hello_reply.version, P11A_PROTO_VERSION_MIN, P11A_PROTO_VERSION);
		r = -P11A_E_VERSION;
	} else {
		c->version = reply.u.hello_reply.version;
	}
	p11a_msg_clear(&reply);
	return r;
}

/* (Re)opens the main connection. */
static int
client_open(struct p11a_client *c)
{
	int r;

	main_close(c);
	/* A new connection may reach the agent another way: ask for a channel again. */
	c->relay = 0;
	if ((r = sock_connect(c)) != 0)
		return r;
	if ((r = reader_new(c->fd, P11A_READER_FDS, &c->rd)) != 0) {
		local_error(c, r, c->path);
		main_close(c);
		return r;
	}
	if ((r = client_hello(c)) != 0)
		main_close(c);
	return r;
}

int
p11a_client_connect(const char *path, const char *client_name, int timeout_ms,
		    struct p11a_client **out, char *why, size_t why_size)
{
	struct p11a_client *c;
	char def[sizeof(((struct sockaddr_un *)0)->sun_path) + 64];
	size_t i;
	int r;

	*out = NULL;
	if (why != NULL && why_size > 0)
		why[0] = '\0';
	if (path == NULL) {
		if ((r = p11a_default_socket_path(def, sizeof(def))) != 0) {
			if (why != NULL)
				snprintf(why, why_size, "the agent's socket path is too long "
				    "(P11AGENT_SOCK or XDG_RUNTIME_DIR)");
			return r;
		}
		path = def;
	}
	if ((c = calloc(1, sizeof(*c))) == NULL) {
		if (why != NULL)
			snprintf(why, why_size, "%s", p11a_strerror(-P11A_E_NOMEM));
		return -P11A_E_NOMEM;
	}
	c->fd = -1;
	for (i = 0; i < CHAN_CACHE; i++)
		c->chans[i].fd = -1;
	c->fork_gen = p11a_fork_generation();
	c->timeout_ms = timeout_ms == 0 ? P11A_CLIENT_TIMEOUT_MS :
	    timeout_ms < 0 ? -1 : timeout_ms;
	c->path = strdup(path);
	c->name = strdup(client_name != NULL ? client_name : "libp11acommon");
	if (c->path == NULL || c->name == NULL) {
		r = -P11A_E_NOMEM;
		set_error(c, "%s", p11a_strerror(r));
	} else {
		r = client_open(c);
	}
	if (r != 0) {
		if (why != NULL)
			snprintf(why, why_size, "%s", c->last_error[0] != '\0' ?
			    c->last_error : p11a_strerror(r));
		p11a_client_free(c);
		return r;
	}
	*out = c;
	return 0;
}

void
p11a_client_free(struct p11a_client *c)
{
	size_t i;

	if (c == NULL)
		return;
	/* After fork() these are our copies: closing them spares the parent. */
	main_close(c);
	for (i = 0; i < CHAN_CACHE; i++)
		chan_drop(c, i);
	free(c->path);
	free(c->name);
	free(c);
}

const char *
p11a_client_path(const struct p11a_client *c)
{
	return c->path;
}

const char *
p11a_client_last_error(const struct p11a_client *c)
{
	return c->last_error;
}

/* Requests that may be sent twice when the first reply is lost. */
static int
idempotent(uint8_t type)
{
	switch (type) {
	case P11A_MSG_STATUS:
	case P11A_MSG_LIST:
	case P11A_MSG_LOCK:
	case P11A_MSG_OPEN_CHANNEL:
		return 1;
	default:
		return 0;   /* UNLOCK above all: a PIN try is never repeated */
	}
}

int
p11a_client_call(struct p11a_client *c, const struct p11a_msg *req,
		 struct p11a_msg *reply, int *fd_received)
{
	enum xstate how;
	int attempt, r;

	memset(reply, 0, sizeof(*reply));
	if (fd_received != NULL)
		*fd_received = -1;
	c->last_error[0] = '\0';
	fork_check(c);
	for (attempt = 0;; attempt++) {
		/*
		 * Reconnecting before a request is safe: nothing was sent yet.
		 * Bytes nobody asked for mean the connection is out of step.
		 */
		if (c->fd >= 0 && (p11a_reader_pending(c->rd) != 0 || !conn_alive(c->fd)))
			main_close(c);
		if (c->fd < 0 && (r = client_open(c)) != 0)
			return r;
		r = exchange(c, c->fd, c->rd, req, reply, fd_received, &how);
		if (how == XS_OK || how == XS_REMOTE || how == XS_UNSENT)
			return r;
		/* After a local failure a late reply could be mistaken for the next one. */
		main_close(c);
		/*
		 * The agent may have gone away between our liveness check and
		 * the request (a restart): one more try on a new connection.
		 */
		if (how != XS_CLOSED || attempt > 0 || !idempotent(req->type))
			return r;
	}
}

/* A request without fields whose reply must have type want. */
static int
call_expect(struct p11a_client *c, const struct p11a_msg *req, uint8_t want,
	    struct p11a_msg *reply)
{
	int r;

	if ((r = p11a_client_call(c, req, reply, NULL)) != 0)
		return r;
	if (reply->type != want) {
		set_error(c, "agent answered with message type 0x%02x, expected 0x%02x",
		    reply->type, want);
		p11a_msg_clear(reply);
		main_close(c);
		return -P11A_E_PROTOCOL;
	}
	return 0;
}

int
p11a_client_status(struct p11a_client *c, struct p11a_msg *reply)
{
	struct p11a_msg req;

	memset(&req, 0, sizeof(req));
	req.type = P11A_MSG_STATUS;
	return call_expect(c, &req, P11A_MSG_STATUS_REPLY, reply);
}

int
p11a_client_health(struct p11a_client *c, struct p11a_msg *reply)
{
	struct p11a_msg req;

	memset(reply, 0, sizeof(*reply));
	if (c->version < 2) {
		set_error(c, "the agent speaks protocol version %u, which has no HEALTH request "
		    "(an older p11agentd)", c->version);
		return -P11A_E_UNSUPPORTED;
	}
	memset(&req, 0, sizeof(req));
	req.type = P11A_MSG_HEALTH;
	return call_expect(c, &req, P11A_MSG_HEALTH_REPLY, reply);
}

int
p11a_client_log(struct p11a_client *c, uint64_t since_us, uint32_t max, struct p11a_msg *reply)
{
	struct p11a_msg req;

	memset(reply, 0, sizeof(*reply));
	if (c->version < 3) {
		set_error(c, "the agent speaks protocol version %u, which has no LOG request "
		    "(an older p11agentd)", c->version);
		return -P11A_E_UNSUPPORTED;
	}
	memset(&req, 0, sizeof(req));
	req.type = P11A_MSG_LOG;
	req.u.log.since_us = since_us;
	req.u.log.max = max;
	return call_expect(c, &req, P11A_MSG_LOG_REPLY, reply);
}

int
p11a_client_list(struct p11a_client *c, struct p11a_msg *reply)
{
	struct p11a_msg req;

	memset(&req, 0, sizeof(req));
	req.type = P11A_MSG_LIST;
	return call_expect(c, &req, P11A_MSG_LIST_REPLY, reply);
}

int
p11a_client_unlock(struct p11a_client *c, const char *token_uri,
		   const char *pin, size_t pin_len)
{
	struct p11a_msg req, reply;
	int r;

	c->last_error[0] = '\0';
	if (pin == NULL && pin_len != 0) {
		set_error(c, "no PIN given");
		return -P11A_E_BAD_REQUEST;
	}
	if (pin_len > P11A_PIN_MAX) {
		set_error(c, "PIN is longer than %d bytes", P11A_PIN_MAX);
		return -P11A_E_PIN_INVALID;
	}
	memset(&req, 0, sizeof(req));
	req.type = P11A_MSG_UNLOCK;
	req.u.unlock.token_uri = (char *)(token_uri != NULL ? token_uri : "");
	if (pin_len != 0)
		memcpy(req.u.unlock.pin, pin, pin_len);
	req.u.unlock.pin_len = pin_len;
	r = call_expect(c, &req, P11A_MSG_OK, &reply);
	p11a_wipe(&req, sizeof(req));
	p11a_msg_clear(&reply);
	return r;
}

int
p11a_client_lock(struct p11a_client *c, const char *token_uri)
{
	struct p11a_msg req, reply;
	int r;

	memset(&req, 0, sizeof(req));
	req.type = P11A_MSG_LOCK;
	req.u.lock.token_uri = (char *)(token_uri != NULL ? token_uri : "");
	r = call_expect(c, &req, P11A_MSG_OK, &reply);
	p11a_msg_clear(&reply);
	return r;
}

/*
 * Index of the cached channel for key_uri, opening one if needed.  1 (no
 * slot) when the agent's CHANNEL came without a descriptor: a relay in
 * between (ssh -R, socat) that carries none; c->relay is set and the
 * caller signs on the main connection (protocol version 3).
 */
static int
chan_get(struct p11a_client *c, const char *key_uri, size_t *slot)
{
	struct p11a_msg req, reply;
	struct p11a_reader *rd;
	size_t i, victim = 0;
	char *copy;
	int fd = -1, r;

	for (i = 0; i < CHAN_CACHE; i++) {
		if (c->chans[i].key_uri != NULL && strcmp(c->chans[i].key_uri, key_uri) == 0) {
			/* Unasked-for bytes: out of step, open a new one. */
			if (p11a_reader_pending(c->chans[i].rd) != 0) {
				chan_drop(c, i);
				break;
			}
			c->chans[i].used = ++c->tick;
			*slot = i;
			return 0;
		}
	}
	memset(&req, 0, sizeof(req));
	req.type = P11A_MSG_OPEN_CHANNEL;
	req.u.open_channel.key_uri = (char *)key_uri;
	if ((r = p11a_client_call(c, &req, &reply, &fd)) != 0)
		return r;
	if (reply.type == P11A_MSG_CHANNEL && fd < 0 && c->version >= 3) {
		p11a_msg_clear(&reply);
		c->relay = 1;
		return 1;
	}
	if (reply.type != P11A_MSG_CHANNEL || fd < 0) {
		if (reply.type == P11A_MSG_CHANNEL)
			set_error(c, "agent answered OPEN_CHANNEL without a descriptor (a forwarded "
			    "socket carries none), and it speaks protocol version %u: signing through "
			    "a forwarded socket needs version 3 (a newer p11agentd)", c->version);
		else
			set_error(c, "agent answered OPEN_CHANNEL with message type 0x%02x%s",
			    reply.type, fd < 0 ? " and no descriptor" : "");
		p11a_msg_clear(&reply);
		fd_close(&fd);
		main_close(c);
		return -P11A_E_PROTOCOL;
	}
	p11a_msg_clear(&reply);
	if ((copy = strdup(key_uri)) == NULL) {
		fd_close(&fd);
		return -P11A_E_NOMEM;
	}
	/* Channels carry no descriptors: their reader passes no control buffer. */
	if ((r = reader_new(fd, 0, &rd)) != 0) {
		local_error(c, r, "opening a signing channel");
		free(copy);
		fd_close(&fd);
		return r;
	}
	for (i = 0; i < CHAN_CACHE; i++) {
		if (c->chans[i].key_uri == NULL) {
			victim = i;
			break;
		}
		if (c->chans[i].used < c->chans[victim].used)
			victim = i;
	}
	chan_drop(c, victim);
	c->chans[victim].key_uri = copy;
	c->chans[victim].fd = fd;
	c->chans[victim].rd = rd;
	c->chans[victim].used = ++c->tick;
	*slot = victim;
	return 0;
}

/*
 * UNLOCK_PROMPT or CONFIRM: a person answers a dialog, so the deadline is
 * the dialog's, not the usual one.  Neither is sent twice on a new
 * connection (each shows a dialog).
 */
static int
call_prompt(struct p11a_client *c, uint8_t type, const char *uri)
{
	struct p11a_msg req, reply;
	int saved = c->timeout_ms, r;

	if (c->version < 3) {
		set_error(c, "the agent speaks protocol version %u, which has no PIN or confirm "
		    "dialogs (an older p11agentd)", c->version);
		return -P11A_E_UNSUPPORTED;
	}
	memset(&req, 0, sizeof(req));
	req.type = type;
	req.u.prompt.uri = (char *)(uri != NULL ? uri : "");
	if (c->timeout_ms >= 0 && c->timeout_ms < P11A_CLIENT_PROMPT_TIMEOUT_MS)
		c->timeout_ms = P11A_CLIENT_PROMPT_TIMEOUT_MS;
	r = call_expect(c, &req, P11A_MSG_OK, &reply);
	c->timeout_ms = saved;
	p11a_msg_clear(&reply);
	return r;
}

int
p11a_client_unlock_prompt(struct p11a_client *c, const char *uri)
{
	c->last_error[0] = '\0';
	return call_prompt(c, P11A_MSG_UNLOCK_PROMPT, uri);
}

int
p11a_client_confirm(struct p11a_client *c, const char *key_uri)
{
	c->last_error[0] = '\0';
	return call_prompt(c, P11A_MSG_CONFIRM, key_uri);
}

int
p11a_client_context_pin(struct p11a_client *c, const char *key_uri)
{
	c->last_error[0] = '\0';
	return call_prompt(c, P11A_MSG_CONTEXT_PIN, key_uri);
}

int
p11a_client_update_env(struct p11a_client *c, char *const *env, size_t n)
{
	struct p11a_msg req, reply;
	int r;

	c->last_error[0] = '\0';
	if (c->version < 3) {
		set_error(c, "the agent speaks protocol version %u, which has no UPDATE_ENV "
		    "(an older p11agentd)", c->version);
		return -P11A_E_UNSUPPORTED;
	}
	if (n > P11A_ENV_MAX) {
		set_error(c, "more than %d variables", P11A_ENV_MAX);
		return -P11A_E_TOO_LARGE;
	}
	memset(&req, 0, sizeof(req));
	req.type = P11A_MSG_UPDATE_ENV;
	req.u.env.n = (uint32_t)n;
	req.u.env.env = (char **)env;
	r = call_expect(c, &req, P11A_MSG_OK, &reply);
	p11a_msg_clear(&reply);
	return r;
}

/* P11AGENT_NO_PROMPT=1 (or any value but 0 and ""): no dialogs on behalf of this program. */
static int
prompt_allowed(const struct p11a_client *c)
{
	const char *v = secure_getenv("P11AGENT_NO_PROMPT");

	if (c->version < 3)
		return 0;
	return v == NULL || *v == '\0' || strcmp(v, "0") == 0;
}

static int sign_once(struct p11a_client *c, const struct p11a_sign *req, uint8_t **sig,
		     size_t *sig_len);

int
p11a_client_sign(struct p11a_client *c, const struct p11a_sign *req,
		 uint8_t **sig, size_t *sig_len)
{
	int unlocked = 0, confirmed = 0, ctx_pin = 0, r, r2;

	for (;;) {
		r = sign_once(c, req, sig, sig_len);
		/*
		 * A locked token or a key that needs a yes: the agent shows the
		 * dialog (on the main connection) and the signature is tried once
		 * more.  The dialog's own error (cancelled, refused, a wrong PIN)
		 * is what the caller gets.
		 */
		if (r == -P11A_E_LOCKED && !unlocked && prompt_allowed(c)) {
			unlocked = 1;
			if ((r2 = p11a_client_unlock_prompt(c, req->key_uri)) != 0)
				return r2;
			continue;
		}
		if (r == -P11A_E_NOT_CONFIRMED && !confirmed && prompt_allowed(c)) {
			confirmed = 1;
			if ((r2 = p11a_client_confirm(c, req->key_uri)) != 0)
				return r2;
			continue;
		}
		/* An always-auth key: one PIN dialog for this signature, never two. */
		if (r == -P11A_E_CONTEXT_PIN && !ctx_pin && prompt_allowed(c)) {
			ctx_pin = 1;
			if ((r2 = p11a_client_context_pin(c, req->key_uri)) != 0)
				return r2;
			continue;
		}
		return r;
	}
}

static int
sign_once(struct p11a_client *c, const struct p11a_sign *req, uint8_t **sig, size_t *sig_len)
{
	struct p11a_msg m, reply;
	size_t slot = CHAN_CACHE;   /* CHAN_CACHE: the main connection (relayed) */
	enum xstate how;
	int attempt, r;

	*sig = NULL;
	*sig_len = 0;
	c->last_error[0] = '\0';
	if (req == NULL || req->key_uri == NULL || *req->key_uri == '\0') {
		set_error(c, "no key URI given");
		return -P11A_E_BAD_REQUEST;
	}
	fork_check(c);
	memset(&m, 0, sizeof(m));
	m.type = P11A_MSG_SIGN;
	m.u.sign = *req;
	for (attempt = 0;; attempt++) {
		if (!c->relay || c->fd < 0) {
			if ((r = chan_get(c, req->key_uri, &slot)) < 0)
				return r;
		}
		if (c->relay) {
			/* Forwarded: the agent relays SIGN to the token helper. */
			slot = CHAN_CACHE;
			if (c->fd >= 0 && (p11a_reader_pending(c->rd) != 0 || !conn_alive(c->fd)))
				main_close(c);
			if (c->fd < 0) {
				r = -P11A_E_IO;
				how = XS_CLOSED;
			} else {
				r = exchange(c, c->fd, c->rd, &m, &reply, NULL, &how);
			}
		} else {
			r = exchange(c, c->chans[slot].fd, c->chans[slot].rd, &m, &reply, NULL, &how);
		}
		if (how == XS_OK || how == XS_REMOTE || how == XS_UNSENT)
			break;
		/* Any local failure leaves the channel (or connection) out of step: drop it. */
		if (slot < CHAN_CACHE)
			chan_drop(c, slot);
		else
			main_close(c);
		if (how != XS_CLOSED || attempt > 0) {
			if (slot == CHAN_CACHE && c->last_error[0] == '\0')
				set_error(c, "the connection to the agent closed");
			return r;
		}
		/*
		 * The helper or the agent went away.  chan_get() asks for a new
		 * channel through p11a_client_call(), which reconnects first
		 * when the main connection is dead too.
		 */
	}
	if (r != 0)
		return r;
	if (reply.type != P11A_MSG_SIGNATURE) {
		set_error(c, "%s answered SIGN with message type 0x%02x",
		    slot < CHAN_CACHE ? "signing channel" : "agent", reply.type);
		p11a_msg_clear(&reply);
		if (slot < CHAN_CACHE)
			chan_drop(c, slot);
		else
			main_close(c);
		return -P11A_E_PROTOCOL;
	}
	*sig = reply.u.signature.sig;
	*sig_len = reply.u.signature.sig_len;
	reply.u.signature.sig = NULL;
	p11a_msg_clear(&reply);
	if (*sig == NULL) {
		/* decode always allocates; an empty signature is still a block */
		return -P11A_E_INTERNAL;
	}
	return 0;
}
