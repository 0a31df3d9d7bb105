#include "config.h"
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static enum log_mode log_mode;
static int log_debug_on;
static char log_ident[64] = "p11agentd";

static char recent[LOG_RECENT_MAX][320];
static size_t recent_next, recent_count;

void
log_init(const char *ident, enum log_mode mode, int debug)
{
	if (log_mode == LOG_MODE_SYSLOG && mode != LOG_MODE_SYSLOG)
		closelog();
	log_mode = mode;
	log_debug_on = debug;
	log_set_ident(ident);
	if (mode == LOG_MODE_SYSLOG)
		openlog(log_ident, LOG_PID | LOG_NDELAY, LOG_DAEMON);
}

void
log_set_ident(const char *ident)
{
	snprintf(log_ident, sizeof(log_ident), "%s", ident);
}

void
log_before_fd_cleanup(void)
{
	if (log_mode == LOG_MODE_SYSLOG)
		closelog();
}

void
log_after_fd_cleanup(const char *ident)
{
	log_set_ident(ident);
	recent_count = recent_next = 0;
	if (log_mode == LOG_MODE_SYSLOG)
		openlog(log_ident, LOG_PID | LOG_NDELAY, LOG_DAEMON);
}

int
log_debug_enabled(void)
{
	return log_debug_on;
}

size_t
log_recent(const char **out, size_t max)
{
	size_t n = recent_count < max ? recent_count : max;
	size_t first = (recent_next + LOG_RECENT_MAX - n) % LOG_RECENT_MAX;

	for (size_t i = 0; i < n; i++)
		out[i] = recent[(first + i) % LOG_RECENT_MAX];
	return n;
}

static void
write_line(const char *out, int n, size_t size)
{
	if (n > 0) {
		size_t len = (size_t)n < size ? (size_t)n : size - 1;
		ssize_t w = write(STDERR_FILENO, out, len);
		(void)w;
	}
}

void
log_msg(int prio, const char *fmt, ...)
{
	va_list ap;
	char line[1024];
	struct timespec ts;
	struct tm tm;

	if (prio == LOG_DEBUG && !log_debug_on)
		return;
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	if (prio <= LOG_WARNING) {
		char *r = recent[recent_next];
		size_t used = strftime(r, sizeof(recent[0]), "%Y-%m-%d %H:%M:%S UTC ", &tm);
		/* Cut long messages: these are for a glance at `p11agent status`. */
		snprintf(r + used, sizeof(recent[0]) - used, "%.*s",
			 (int)(sizeof(recent[0]) - used - 1), line);
		recent_next = (recent_next + 1) % LOG_RECENT_MAX;
		if (recent_count < LOG_RECENT_MAX)
			recent_count++;
	}
	/* One write per line so helper and agent lines do not interleave. */
	char out[1200];
	int n;
	switch (log_mode) {
	case LOG_MODE_SYSLOG:
		syslog(prio, "%s", line);
		return;
	case LOG_MODE_JOURNAL:
		/* The journal adds time, identifier and pid (the stream's); helpers name themselves. */
		if (strcmp(log_ident, "p11agentd") == 0)
			n = snprintf(out, sizeof(out), "<%d>%s\n", prio & 7, line);
		else
			n = snprintf(out, sizeof(out), "<%d>%s[%ld]: %s\n", prio & 7, log_ident,
				     (long)getpid(), line);
		write_line(out, n, sizeof(out));
		return;
	case LOG_MODE_STDERR:
		break;
	}
	static const char *names[] = { "emerg", "alert", "crit", "error",
				       "warning", "notice", "info", "debug" };
	n = snprintf(out, sizeof(out), "%02d:%02d:%02d.%03ld %s[%ld]: %s: %s\n",
		     tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000,
		     log_ident, (long)getpid(), names[prio & 7], line);
	write_line(out, n, sizeof(out));
}
