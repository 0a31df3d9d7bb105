/*
 * Audit events of the agent main process: who signed, unlocked, locked or
 * was refused what, and when.  Each event goes to a bounded in-memory ring
 * (`p11agent log`, protocol LOG) and to a sink: the journal with
 * structured P11AGENT_* fields (the journal's native protocol), syslog
 * (authpriv) where there is no journal, or nowhere (`audit none`, or
 * neither socket exists).  Token helpers
 * report their events (signatures, tls-only and allow-programs refusals,
 * idle and pin-ttl locks) with H_EVENT; the main process records them
 * here.
 *
 * Never pass a PIN or signed data: events carry URIs, names, codes and
 * times only.  Main process only (not thread-safe); never blocks: one
 * non-blocking datagram per event, and an event the daemon's socket does
 * not take at once is counted and left out of the sink (not the ring).
 */
#ifndef AGENT_AUDIT_H
#define AGENT_AUDIT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "conf.h"
#include "proto.h"

/* ---- the ring (pure: no I/O; tests/unit/test_audit.c) */

struct audit_ring;

/* A ring of cap events (cap >= 1); NULL when out of memory. */
struct audit_ring *audit_ring_new(size_t cap);
void audit_ring_free(struct audit_ring *r);
/* Copies e in; the oldest event goes when the ring is full.  -P11A_E_NOMEM (ring unchanged). */
int audit_ring_push(struct audit_ring *r, const struct p11a_event *e);
size_t audit_ring_len(const struct audit_ring *r);
/*
 * The newest max events (0 = no limit) whose time_us >= since_us, oldest
 * first, as pointers into the ring (valid until the next push) in out,
 * which has room for audit_ring_len() entries.  Returns how many.
 */
size_t audit_ring_select(const struct audit_ring *r, uint64_t since_us, size_t max,
			 const struct p11a_event **out);

/* ---- the agent's audit trail */

/*
 * Sets up the ring (cfg->audit_ring events) and picks the sink from
 * cfg->audit: auto = the journal when its socket exists, else syslog when
 * /dev/log exists, else none.
 * Call again after a configuration change; the ring is kept when its size
 * is unchanged.  -P11A_E_NOMEM.
 */
int audit_init(const struct agent_config *cfg);
void audit_free(void);

/*
 * Records e (copied; time_us 0 = now) in the ring and sends it to the
 * sink.  A DROPPED event is written as "N events dropped".
 */
void audit_record(const struct p11a_event *e);

/*
 * The one-liner for handlers: an event of kind about uri for the client
 * (pid, uid, exe; pid 0 = the agent itself), result 0 or a P11A_E_* (either
 * sign) with its message, reason (LOCK: "request", "idle", "pin-ttl",
 * "suspend", "screen-lock", "SIGHUP", "exit"; else NULL) and the time it
 * took (0 unknown).
 */
void audit_note(uint8_t kind, const char *uri, pid_t pid, uid_t uid, const char *exe, int result,
		const char *message, const char *reason, uint64_t duration_us);

/* See audit_ring_select(); out has room for audit_len() entries. */
size_t audit_len(void);
size_t audit_select(uint64_t since_us, size_t max, const struct p11a_event **out);

/* CLOCK_REALTIME in microseconds. */
uint64_t audit_now_us(void);

/* One line for people: "sign by /usr/bin/curl[42]: pkcs11:... ecdsa tls1.3: ok (310 us)". */
void audit_format(const struct p11a_event *e, char *out, size_t size);

#endif
