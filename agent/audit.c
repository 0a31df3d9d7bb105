/* Audit events: the ring for `p11agent log` and the journal or syslog sink (audit.h). */
#include "config.h"
#include "audit.h"
#include "log.h"
#include "p11a.h"
#include "text.h"
#include "tlsclass.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>


/* journalctl MESSAGE_ID=... finds every audit event of p11agentd. */
#define AUDIT_MESSAGE_ID "5a0b8d3c6f1e4a7b9c2d4e6f8a1b3c5d"
#define JOURNAL_SOCKET "/run/systemd/journal/socket"
#define SYSLOG_SOCKET "/dev/log"           /* glibc's _PATH_LOG */

/* ------------------------------------------------------------ ring */

struct audit_ring {
	size_t cap, len, next;          /* next: where the next event goes */
	struct p11a_event *ev;
};

struct audit_ring *
audit_ring_new(size_t cap)
{
	struct audit_ring *r;

	if (cap == 0 || (r = calloc(1, sizeof(*r))) == NULL)
		return NULL;
	if ((r->ev = calloc(cap, sizeof(*r->ev))) == NULL) {
		free(r);
		return NULL;
	}
	r->cap = cap;
	return r;
}

void
audit_ring_free(struct audit_ring *r)
{
	if (r == NULL)
		return;
	for (size_t i = 0; i < r->cap; i++)
		p11a_event_clear(&r->ev[i]);
	free(r->ev);
	free(r);
}

int
audit_ring_push(struct audit_ring *r, const struct p11a_event *e)
{
	struct p11a_event copy;
	int rc;

	if ((rc = p11a_event_copy(&copy, e)) != 0)
		return rc;
	p11a_event_clear(&r->ev[r->next]);
	r->ev[r->next] = copy;
	r->next = (r->next + 1) % r->cap;
	if (r->len < r->cap)
		r->len++;
	return 0;
}

size_t
audit_ring_len(const struct audit_ring *r)
{
	return r != NULL ? r->len : 0;
}

size_t
audit_ring_select(const struct audit_ring *r, uint64_t since_us, size_t max,
		  const struct p11a_event **out)
{
	size_t first, n = 0, skip;

	if (r == NULL || r->len == 0)
		return 0;
	first = (r->next + r->cap - r->len) % r->cap;
	for (size_t i = 0; i < r->len; i++) {
		const struct p11a_event *e = &r->ev[(first + i) % r->cap];
		if (e->time_us >= since_us)
			out[n++] = e;
	}
	if (max == 0 || n <= max)
		return n;
	/* The newest max: drop the oldest from the front. */
	skip = n - max;
	memmove(out, out + skip, max * sizeof(*out));
	return max;
}

/* ------------------------------------------------------------ the agent's trail */

enum sink { SINK_NONE, SINK_JOURNAL, SINK_SYSLOG };

static struct audit_ring *ring;
static enum sink sink;

static int sink_open(const char *path);
static void sink_close(void);

uint64_t
audit_now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

int
audit_init(const struct agent_config *cfg)
{
	size_t cap = cfg->audit_ring > 0 ? (size_t)cfg->audit_ring : CONFIG_AUDIT_RING_DEFAULT;

	if (ring == NULL || ring->cap != cap) {
		struct audit_ring *r = audit_ring_new(cap);
		if (r == NULL)
			return -P11A_E_NOMEM;
		/* Keep what we have, the newest first, in the new size. */
		if (ring != NULL) {
			const struct p11a_event **v = calloc(ring->len ? ring->len : 1, sizeof(*v));
			size_t n = v != NULL ? audit_ring_select(ring, 0, cap, v) : 0;
			for (size_t i = 0; i < n; i++)
				(void)audit_ring_push(r, v[i]);
			free(v);
			audit_ring_free(ring);
		}
		ring = r;
	}
	switch (cfg->audit) {
	case CONF_AUDIT_NONE:
		sink = SINK_NONE;
		break;
	case CONF_AUDIT_SYSLOG:
		sink = SINK_SYSLOG;
		break;
	case CONF_AUDIT_JOURNAL:
		sink = SINK_JOURNAL;
		break;
	default:
		/* Where nothing listens: the ring alone (p11agent log). */
		if (access(JOURNAL_SOCKET, W_OK) == 0)
			sink = SINK_JOURNAL;
		else
			sink = access(SYSLOG_SOCKET, W_OK) == 0 ? SINK_SYSLOG : SINK_NONE;
		break;
	}
	sink_close();
	if (sink != SINK_NONE && sink_open(sink == SINK_JOURNAL ? JOURNAL_SOCKET : SYSLOG_SOCKET) != 0) {
		log_warn("audit: cannot make a socket: %s; events are kept for 'p11agent log' only",
			 strerror(errno));
		sink = SINK_NONE;
	}
	log_info("audit: the latest %zu events kept for 'p11agent log'%s", cap,
		 sink == SINK_JOURNAL ? ", each sent to the journal" : sink == SINK_SYSLOG ?
		 ", each sent to syslog" : cfg->audit == CONF_AUDIT_NONE ? "" :
		 "; neither a journal nor syslog (" SYSLOG_SOCKET ") to send them to");
	return 0;
}

void
audit_free(void)
{
	sink_close();
	audit_ring_free(ring);
	ring = NULL;
}

size_t
audit_len(void)
{
	return audit_ring_len(ring);
}

size_t
audit_select(uint64_t since_us, size_t max, const struct p11a_event **out)
{
	return audit_ring_select(ring, since_us, max, out);
}

static const char *
content_name(uint8_t content)
{
	return content == P11A_CONTENT_NONE ? "" :
	    p11a_tlsclass_name((enum p11a_tlsclass)(content - 1));
}

void
audit_format(const struct p11a_event *e, char *out, size_t size)
{
	const char *kind = p11a_event_kind_name(e->kind);
	const char *scheme = e->scheme ? p11a_scheme_name(e->scheme) : NULL;
	const char *content = content_name(e->content);
	char who[300] = "", what[400] = "", result[600];
	int n;

	if (e->kind == P11A_EV_DROPPED) {
		snprintf(out, size, "%" PRIu32 " audit events dropped (the token helper's queue "
			 "was full)", e->count);
		return;
	}
	if (e->pid != 0)
		snprintf(who, sizeof(who), " by %.256s[%" PRIu32 "]",
			 e->exe && *e->exe ? e->exe : "(unknown program)", e->pid);
	else if (e->reason != NULL && *e->reason)
		snprintf(who, sizeof(who), " (%.100s)", e->reason);
	n = snprintf(what, sizeof(what), "%.300s", e->uri && *e->uri ? e->uri : "every token");
	if (scheme != NULL && n > 0 && (size_t)n < sizeof(what))
		n += snprintf(what + n, sizeof(what) - (size_t)n, " %s", scheme);
	if (*content && n > 0 && (size_t)n < sizeof(what))
		snprintf(what + n, sizeof(what) - (size_t)n, " %s", content);
	if (e->result == 0)
		snprintf(result, sizeof(result), "ok");
	else
		snprintf(result, sizeof(result), "%s: %.500s", p11a_errname((int)e->result),
			 e->message && *e->message ? e->message : p11a_strerror((int)e->result));
	if (e->duration_us != 0)
		snprintf(out, size, "%s%s: %s: %s (%" PRIu64 " us)", kind ? kind : "event", who, what,
			 result, e->duration_us);
	else
		snprintf(out, size, "%s%s: %s: %s", kind ? kind : "event", who, what, result);
}

static int
priority_of(const struct p11a_event *e)
{
	if (e->result == 0)
		return e->kind == P11A_EV_DROPPED ? LOG_WARNING : LOG_INFO;
	if (e->kind == P11A_EV_REFUSED || e->result == P11A_E_PIN_INCORRECT ||
	    e->result == P11A_E_PIN_LOCKED || e->result == P11A_E_POLICY)
		return LOG_WARNING;
	return LOG_NOTICE;
}

/*
 * The sinks write datagrams themselves, non-blocking: sd_journal_sendv()
 * and syslog(3) send on a blocking socket, and a journal or syslog daemon
 * that falls behind would then stop the agent's event loop.  An event the
 * socket does not take at once is counted and left out (the ring still has
 * it); the count is logged when the socket takes events again.
 */
static int sink_fd = -1;
static struct sockaddr_un sink_addr;
static unsigned long sink_dropped;
static int64_t sink_warned_ms;          /* the last "not sent" warning: at most one per 10 s */

static int
sink_open(const char *path)
{
	if (sink_fd < 0)
		sink_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (sink_fd < 0)
		return -1;
	memset(&sink_addr, 0, sizeof(sink_addr));
	sink_addr.sun_family = AF_UNIX;
	snprintf(sink_addr.sun_path, sizeof(sink_addr.sun_path), "%s", path);
	return 0;
}

static void
sink_close(void)
{
	if (sink_fd >= 0)
		close(sink_fd);
	sink_fd = -1;
}

/* 0 sent, 1 left out (the daemon is behind), -1 nobody listens. */
static int
sink_send(const void *p, size_t n)
{
	ssize_t w;

	if (sink_fd < 0)
		return -1;
	w = sendto(sink_fd, p, n, MSG_DONTWAIT | MSG_NOSIGNAL, (const struct sockaddr *)&sink_addr,
		   sizeof(sink_addr));
	if (w == (ssize_t)n) {
		if (sink_dropped != 0 && p11a_now_ms() - sink_warned_ms >= 10000) {
			log_warn("audit: %lu events were not sent to %s (it did not keep up); "
				 "'p11agent log' has them", sink_dropped, sink_addr.sun_path);
			sink_dropped = 0;
			sink_warned_ms = p11a_now_ms();
		}
		return 0;
	}
	if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS)) {
		sink_dropped++;
		return 1;
	}
	return -1;
}

/*
 * The journal's native protocol (systemd's journal-native-protocol): a
 * datagram of fields, "KEY=value\n", or "KEY\n", the value's length as a
 * little-endian u64, the value and "\n" when the value holds a newline.
 */
struct jbuf {
	char b[3 * P11A_TEXT_MAX + 2048];
	size_t n;
	int full;
};

static void
jput(struct jbuf *j, const void *p, size_t n)
{
	if (j->full || sizeof(j->b) - j->n < n) {
		j->full = 1;
		return;
	}
	memcpy(j->b + j->n, p, n);
	j->n += n;
}

static void
jfield(struct jbuf *j, const char *key, const char *val)
{
	size_t len;

	if (val == NULL || *val == '\0')
		return;
	len = strlen(val);
	jput(j, key, strlen(key));
	if (memchr(val, '\n', len) == NULL) {
		jput(j, "=", 1);
	} else {
		uint8_t le[9];
		le[0] = '\n';
		for (int i = 0; i < 8; i++)
			le[1 + i] = (uint8_t)((uint64_t)len >> (8 * i));
		jput(j, le, sizeof(le));
	}
	jput(j, val, len);
	jput(j, "\n", 1);
}

static void
jfield_u64(struct jbuf *j, const char *key, uint64_t v)
{
	char num[24];

	snprintf(num, sizeof(num), "%" PRIu64, v);
	jfield(j, key, num);
}

static int
journal_send(const struct p11a_event *e, const char *line)
{
	static struct jbuf j;
	const char *uri_key = e->kind == P11A_EV_UNLOCK || e->kind == P11A_EV_LOCK ||
	    e->kind == P11A_EV_PIN_DIALOG ? "P11AGENT_TOKEN_URI" : "P11AGENT_KEY_URI";
	int r;

	j.n = 0;
	j.full = 0;
	jfield(&j, "MESSAGE", line);
	jfield_u64(&j, "PRIORITY", (uint64_t)priority_of(e));
	jfield(&j, "SYSLOG_IDENTIFIER", "p11agentd");
	jfield_u64(&j, "SYSLOG_FACILITY", LOG_AUTHPRIV >> 3);
	jfield_u64(&j, "SYSLOG_PID", (uint64_t)getpid());
	jfield(&j, "MESSAGE_ID", AUDIT_MESSAGE_ID);
	jfield(&j, "P11AGENT_EVENT", p11a_event_kind_name(e->kind));
	jfield(&j, uri_key, e->uri);
	jfield(&j, "P11AGENT_SCHEME", e->scheme ? p11a_scheme_name(e->scheme) : NULL);
	jfield(&j, "P11AGENT_CONTENT", content_name(e->content));
	if (e->pid != 0) {
		jfield_u64(&j, "P11AGENT_PID", e->pid);
		jfield_u64(&j, "P11AGENT_UID", e->uid);
	}
	jfield(&j, "P11AGENT_EXE", e->exe);
	jfield(&j, "P11AGENT_FORWARDED", e->flags & P11A_EVENT_FORWARDED ? "yes" : NULL);
	jfield(&j, "P11AGENT_RESULT", e->result == 0 ? "ok" : p11a_errname((int)e->result));
	jfield(&j, "P11AGENT_ERROR", e->result != 0 ? e->message : NULL);
	if (e->duration_us != 0)
		jfield_u64(&j, "P11AGENT_DURATION_US", e->duration_us);
	jfield(&j, "P11AGENT_REASON", e->reason);
	if (e->kind == P11A_EV_DROPPED)
		jfield_u64(&j, "P11AGENT_DROPPED", e->count);
	if (j.full) {
		log_warn("audit: an event is too large for the journal");
		return 1;
	}
	r = sink_send(j.b, j.n);
	p11a_wipe(j.b, j.n);
	return r;
}

/* RFC 3164 as syslog(3) writes it: "<PRI>Mmm dd hh:mm:ss p11agentd[PID]: text". */
static int
syslog_send(const struct p11a_event *e, const char *line)
{
	char out[1400], stamp[32];
	time_t now = time(NULL);
	struct tm tm;
	int n;

	localtime_r(&now, &tm);
	strftime(stamp, sizeof(stamp), "%b %e %H:%M:%S", &tm);
	n = snprintf(out, sizeof(out), "<%d>%s p11agentd[%ld]: %s", LOG_AUTHPRIV | priority_of(e),
		     stamp, (long)getpid(), line);
	if (n < 0)
		return 1;
	return sink_send(out, (size_t)n < sizeof(out) ? (size_t)n : sizeof(out) - 1);
}

void
audit_record(const struct p11a_event *e)
{
	struct p11a_event ev = *e;
	char line[1200];

	if (ev.time_us == 0)
		ev.time_us = audit_now_us();
	if (ring != NULL && audit_ring_push(ring, &ev) != 0)
		log_warn("audit: out of memory; an event is missing from 'p11agent log'");
	if (sink == SINK_NONE)
		return;
	audit_format(&ev, line, sizeof(line));
	p11a_text_scrub(line);
	if ((sink == SINK_JOURNAL ? journal_send(&ev, line) : syslog_send(&ev, line)) < 0) {
		/* The daemon went away: say so once, and keep the ring. */
		log_warn("audit: cannot send events to %s: %s; 'p11agent log' still has them",
			 sink_addr.sun_path, strerror(errno));
		sink = SINK_NONE;
		sink_close();
	}
}

void
audit_note(uint8_t kind, const char *uri, pid_t pid, uid_t uid, const char *exe, int result,
	   const char *message, const char *reason, uint64_t duration_us)
{
	struct p11a_event e;

	memset(&e, 0, sizeof(e));
	e.kind = kind;
	e.uri = (char *)(uri != NULL ? uri : "");
	e.pid = pid > 0 ? (uint32_t)pid : 0;
	e.uid = (uint32_t)uid;
	e.exe = (char *)(exe != NULL ? exe : "");
	e.result = result < 0 ? (uint32_t)-result : (uint32_t)result;
	e.message = (char *)(result != 0 && message != NULL ? message : "");
	e.reason = (char *)(reason != NULL ? reason : "");
	e.duration_us = duration_us;
	audit_record(&e);
}
