/* Audit events: the ring for `p11agent log` and the journal or syslog sink (audit.h). */
#include "config.h"
#include "audit.h"
#include "log.h"
#include "p11a.h"
#include "text.h"
#include "tlsclass.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#ifdef HAVE_SYSTEMD
#include <systemd/sd-journal.h>
#endif

/* journalctl MESSAGE_ID=... finds every audit event of p11agentd. */
#define AUDIT_MESSAGE_ID "MESSAGE_ID=5a0b8d3c6f1e4a7b9c2d4e6f8a1b3c5d"
#define JOURNAL_SOCKET "/run/systemd/journal/socket"

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
#ifdef HAVE_SYSTEMD
		sink = SINK_JOURNAL;
#else
		log_warn("audit journal: built without libsystemd; audit events go to syslog");
		sink = SINK_SYSLOG;
#endif
		break;
	default:
#ifdef HAVE_SYSTEMD
		sink = access(JOURNAL_SOCKET, W_OK) == 0 ? SINK_JOURNAL : SINK_SYSLOG;
#else
		sink = SINK_SYSLOG;
#endif
		break;
	}
	log_debug("audit: %zu events kept, sent to %s", cap,
		  sink == SINK_JOURNAL ? "the journal" : sink == SINK_SYSLOG ? "syslog" : "nowhere");
	return 0;
}

void
audit_free(void)
{
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

#ifdef HAVE_SYSTEMD
#define JFIELDS 20

/* One "KEY=value" field; values may hold any byte but NUL (sd_journal_sendv frames them). */
static void
jfield(struct iovec *iov, char (*buf)[600], size_t *n, const char *key, const char *val)
{
	int len;

	if (val == NULL || *val == '\0' || *n >= JFIELDS)
		return;
	len = snprintf(buf[*n], sizeof(buf[0]), "%s=%s", key, val);
	if (len < 0)
		return;
	iov[*n].iov_base = buf[*n];
	iov[*n].iov_len = (size_t)len < sizeof(buf[0]) ? (size_t)len : sizeof(buf[0]) - 1;
	(*n)++;
}

static void
journal_send(const struct p11a_event *e, const char *line)
{
	static char buf[JFIELDS][600];
	struct iovec iov[JFIELDS];
	char num[32];
	const char *uri_key = e->kind == P11A_EV_UNLOCK || e->kind == P11A_EV_LOCK ||
	    e->kind == P11A_EV_PIN_DIALOG ? "P11AGENT_TOKEN_URI" : "P11AGENT_KEY_URI";
	size_t n = 0;
	int r;

	jfield(iov, buf, &n, "MESSAGE", line);
	snprintf(num, sizeof(num), "%d", priority_of(e));
	jfield(iov, buf, &n, "PRIORITY", num);
	jfield(iov, buf, &n, "SYSLOG_IDENTIFIER", "p11agentd");
	jfield(iov, buf, &n, "SYSLOG_FACILITY", "10");     /* authpriv */
	iov[n].iov_base = (char *)AUDIT_MESSAGE_ID;
	iov[n++].iov_len = strlen(AUDIT_MESSAGE_ID);
	jfield(iov, buf, &n, "P11AGENT_EVENT", p11a_event_kind_name(e->kind));
	jfield(iov, buf, &n, uri_key, e->uri);
	jfield(iov, buf, &n, "P11AGENT_SCHEME", e->scheme ? p11a_scheme_name(e->scheme) : NULL);
	jfield(iov, buf, &n, "P11AGENT_CONTENT", content_name(e->content));
	if (e->pid != 0) {
		snprintf(num, sizeof(num), "%" PRIu32, e->pid);
		jfield(iov, buf, &n, "P11AGENT_PID", num);
		snprintf(num, sizeof(num), "%" PRIu32, e->uid);
		jfield(iov, buf, &n, "P11AGENT_UID", num);
	}
	jfield(iov, buf, &n, "P11AGENT_EXE", e->exe);
	jfield(iov, buf, &n, "P11AGENT_FORWARDED", e->flags & P11A_EVENT_FORWARDED ? "yes" : NULL);
	jfield(iov, buf, &n, "P11AGENT_RESULT", e->result == 0 ? "ok" : p11a_errname((int)e->result));
	jfield(iov, buf, &n, "P11AGENT_ERROR", e->result != 0 ? e->message : NULL);
	if (e->duration_us != 0) {
		snprintf(num, sizeof(num), "%" PRIu64, e->duration_us);
		jfield(iov, buf, &n, "P11AGENT_DURATION_US", num);
	}
	jfield(iov, buf, &n, "P11AGENT_REASON", e->reason);
	if (e->kind == P11A_EV_DROPPED) {
		snprintf(num, sizeof(num), "%" PRIu32, e->count);
		jfield(iov, buf, &n, "P11AGENT_DROPPED", num);
	}
	if ((r = sd_journal_sendv(iov, (int)n)) < 0) {
		/* No journal after all (it went away): syslog keeps the event. */
		syslog(LOG_AUTHPRIV | priority_of(e), "%s", line);
	}
	for (size_t i = 0; i < n; i++)
		if (iov[i].iov_base != (char *)AUDIT_MESSAGE_ID)
			p11a_wipe(iov[i].iov_base, iov[i].iov_len);
}
#endif

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
#ifdef HAVE_SYSTEMD
	if (sink == SINK_JOURNAL) {
		journal_send(&ev, line);
		return;
	}
#endif
	syslog(LOG_AUTHPRIV | priority_of(&ev), "%s", line);
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
