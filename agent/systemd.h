/*
 * systemd integration (docs/p11agentd.8, "SYSTEMD"): the listening socket
 * of socket activation, readiness and status notifications, and journal
 * streams.  Built with --without-systemd, no socket is taken (a passed one
 * is refused with a message), notifications are not sent and there is no
 * journal stream.
 */
#ifndef AGENT_SYSTEMD_H
#define AGENT_SYSTEMD_H

#include "conf.h"

/*
 * When systemd passed this process a socket (LISTEN_FDS, LISTEN_PID):
 * checks that it is one listening AF_UNIX stream socket bound to
 * cfg->socket_path, in a directory of ours that no other user can enter,
 * makes it non-blocking and close-on-exec, and stores it in *fd.  The
 * LISTEN_* variables are removed from the environment.
 * Returns 1 (taken), 0 (none passed) or -1 (refused; printed to stderr).
 */
int sysd_listen_socket(const struct agent_config *cfg, int *fd);

/* sd_notify() text ("READY=1\nSTATUS=..."); nothing without NOTIFY_SOCKET. */
void sysd_notify(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* 1 when standard error is a journal stream (JOURNAL_STREAM names it). */
int sysd_stderr_is_journal(void);

/* A new journal stream (for a detached agent's stderr), or -1 when there is no journal. */
int sysd_journal_stream(const char *ident);

#endif
