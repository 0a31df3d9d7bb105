/*
 * logind on the system bus (docs/p11agentd.8, "SYSTEMD"): the agent locks
 * every token when the machine is about to suspend (the Manager's
 * PrepareForSleep(true)) and when one of the user's sessions is locked
 * (the Session's Lock signal, or its LockedHint turning true).  A session
 * is ours when its User property names our uid; that is asked
 * asynchronously, so nothing here ever blocks the loop.
 *
 * A system bus that is missing, or that goes away, is logged once and the
 * agent goes on without it, trying again with a back-off.  Built without
 * libsystemd, logind_new() returns NULL and the rest does nothing.
 */
#ifndef AGENT_LOGIND_H
#define AGENT_LOGIND_H

#include <stdint.h>
#include <sys/types.h>

#include "conf.h"

struct logind;

/* Called for each lock event; why is the cause for the log ("PrepareForSleep"). */
typedef void (*logind_lock_fn)(void *arg, const char *why);

/*
 * Starts listening (connects now, or later when the bus is not there):
 * NULL when cfg turns both lock-on-suspend and lock-on-screen-lock off,
 * without libsystemd, or when out of memory (logged).  uid: the user
 * whose sessions count.
 */
struct logind *logind_new(const struct agent_config *cfg, uid_t uid, logind_lock_fn fn,
			  void *arg);
void logind_free(struct logind *l);

/*
 * The descriptor to poll (-1 when not connected) and its events; *next
 * (CLOCK_MONOTONIC milliseconds, as p11a_now_ms()) is lowered to when
 * logind_process() must run even without an event.  NULL l: -1.
 */
int logind_poll_fd(struct logind *l, short *events, int64_t *next);

/* After poll(): reads and dispatches what the bus sent, reconnects when due. */
void logind_process(struct logind *l, int64_t now);

#endif
