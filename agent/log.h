/*
 * Agent logging: stderr in the foreground, syslog when daemonized.
 * Never pass a PIN or other secret to these functions.
 */
#ifndef AGENT_LOG_H
#define AGENT_LOG_H

#include <syslog.h>

/* to_syslog: 0 = stderr; debug: log LOG_DEBUG too. ident e.g. "p11agentd". */
void log_init(const char *ident, int to_syslog, int debug);
/* Changes the prefix (helpers log as "p11agentd[helper softhsm2]"). */
void log_set_ident(const char *ident);
int log_debug_enabled(void);
/*
 * A forked child that closes inherited descriptors must call the first
 * before (so syslog's socket is not left dangling and later reused by
 * another descriptor) and the second after, with its new ident.
 */
void log_before_fd_cleanup(void);
void log_after_fd_cleanup(const char *ident);
void log_msg(int prio, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_err(...)   log_msg(LOG_ERR, __VA_ARGS__)
#define log_warn(...)  log_msg(LOG_WARNING, __VA_ARGS__)
#define log_info(...)  log_msg(LOG_INFO, __VA_ARGS__)
#define log_debug(...) do { if (log_debug_enabled()) log_msg(LOG_DEBUG, __VA_ARGS__); } while (0)

#endif
