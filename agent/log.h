/*
 * Agent logging: stderr in the foreground, the journal where there is one
 * (a journal stream on stderr: under systemd, or opened when the agent
 * detaches), syslog otherwise.  The main process also keeps its latest
 * warnings and errors in memory, so that `p11agent status` can show them
 * on a machine where neither journal nor syslog keeps them.
 * Never pass a PIN or other secret to these functions.
 */
#ifndef AGENT_LOG_H
#define AGENT_LOG_H

#include <stddef.h>
#include <syslog.h>

enum log_mode {
	LOG_MODE_STDERR,        /* "HH:MM:SS ident[pid]: level: message" lines */
	LOG_MODE_SYSLOG,
	LOG_MODE_JOURNAL        /* stderr is a journal stream: "<N>" priority prefixes */
};

/* debug: log LOG_DEBUG too. ident e.g. "p11agentd". */
void log_init(const char *ident, enum log_mode mode, int debug);
/* Changes the prefix (helpers log as "p11agentd[helper softhsm2]"). */
void log_set_ident(const char *ident);
int log_debug_enabled(void);
/*
 * A forked child that closes inherited descriptors must call the first
 * before (so syslog's socket is not left dangling and later reused by
 * another descriptor) and the second after, with its new ident.  Standard
 * error, and with it a journal stream, stays open across the cleanup.
 */
void log_before_fd_cleanup(void);
void log_after_fd_cleanup(const char *ident);
void log_msg(int prio, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define LOG_RECENT_MAX 8
/*
 * The latest LOG_WARNING-or-worse messages of this process, oldest first,
 * each "YYYY-MM-DD HH:MM:SS UTC message"; returns how many (at most max),
 * pointers valid until the next log call.
 */
size_t log_recent(const char **out, size_t max);

#define log_err(...)   log_msg(LOG_ERR, __VA_ARGS__)
#define log_warn(...)  log_msg(LOG_WARNING, __VA_ARGS__)
#define log_info(...)  log_msg(LOG_INFO, __VA_ARGS__)
#define log_debug(...) do { if (log_debug_enabled()) log_msg(LOG_DEBUG, __VA_ARGS__); } while (0)

#endif
