#include "config.h"
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int log_to_syslog;
static int log_debug_on;
static char log_ident[64] = "p11agentd";

void
log_init(const char *ident, int to_syslog, int debug)
{
	log_to_syslog = to_syslog;
	log_debug_on = debug;
	log_set_ident(ident);
	if (to_syslog)
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
	if (log_to_syslog)
		closelog();
}

void
log_after_fd_cleanup(const char *ident)
{
	log_set_ident(ident);
	if (log_to_syslog)
		openlog(log_ident, LOG_PID | LOG_NDELAY, LOG_DAEMON);
}

int
log_debug_enabled(void)
{
	return log_debug_on;
}

void
log_msg(int prio, const char *fmt, ...)
{
	va_list ap;
	char line[1024];

	if (prio == LOG_DEBUG && !log_debug_on)
		return;
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	if (log_to_syslog) {
		syslog(prio, "%s", line);
		return;
	}
	/* One write per line so helper and agent lines do not interleave. */
	char out[1200];
	static const char *names[] = { "emerg", "alert", "crit", "error",
				       "warning", "notice", "info", "debug" };
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	struct tm tm;
	gmtime_r(&ts.tv_sec, &tm);
	int n = snprintf(out, sizeof(out), "%02d:%02d:%02d.%03ld %s[%ld]: %s: %s\n",
			 tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000,
			 log_ident, (long)getpid(), names[prio & 7], line);
	if (n > 0) {
		size_t len = (size_t)n < sizeof(out) ? (size_t)n : sizeof(out) - 1;
		ssize_t w = write(STDERR_FILENO, out, len);
		(void)w;
	}
}
