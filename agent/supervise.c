/*
 * Token helper supervision (see server_int.h): spawn, control sockets,
 * inventory, reaping that never blocks the loop, restart with back-off.
 */
#include "config.h"
#include "server_int.h"
#include "audit.h"
#include "helper.h"
#include "log.h"
#include "systemd.h"
#include "p11a.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

/* How long shutdown waits for helpers to exit after EOF before SIGKILL. */
#define HELPER_STOP_WAIT_MS 2000

/* Keeps a module's latest failure for HEALTH (`p11agent status`). */
static void __attribute__((format(printf, 2, 3)))
helper_note_error(struct helper *h, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(h->last_error, sizeof(h->last_error), fmt, ap);
	va_end(ap);
	h->error_time = time(NULL);
}

/* Tells systemd (STATUS=) how many modules are up, when that changed. */
static void
notify_status(struct server *s)
{
	size_t up = 0, tokens = 0;

	for (size_t i = 0; i < s->nhelpers; i++) {
		up += s->helpers[i].up;
		tokens += s->helpers[i].inv.ntokens;
	}
	if (up == s->notified_up)
		return;
	s->notified_up = up;
	sysd_notify("STATUS=%zu of %zu modules up, %zu tokens", up, s->nhelpers, tokens);
}

void
helper_init(struct server *s, size_t hi, struct module_conf *mod)
{
	struct helper *h = &s->helpers[hi];

	memset(h, 0, sizeof(*h));
	h->mod = mod;
	h->fd = -1;
	h->restart_delay_ms = RESTART_DELAY_MIN_MS;
	p11a_frame_in_init(&h->in, NULL, 0);
}

void
helper_free(struct helper *h)
{
	if (h->fd >= 0)
		close(h->fd);
	h->fd = -1;
	p11a_frame_in_reset(&h->in);
	p11a_frame_out_clear(&h->out);
	p11a_list_reply_clear(&h->inv);
}

void
helper_spawn(struct server *s, size_t hi)
{
	struct helper *h = &s->helpers[hi];
	int sv[2];
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
		log_err("helper %s: socketpair: %s", h->mod->name, strerror(errno));
		h->restart_at = p11a_now_ms() + RESTART_DELAY_MAX_MS;
		return;
	}
	pid_t pid = fork();
	if (pid < 0) {
		log_err("helper %s: fork: %s", h->mod->name, strerror(errno));
		close(sv[0]);
		close(sv[1]);
		h->restart_at = p11a_now_ms() + RESTART_DELAY_MAX_MS;
		return;
	}
	if (pid == 0) {
		/* Child: keep only stdio and the control socket. */
		log_before_fd_cleanup();
		int ctrl = sv[1];
		if (ctrl != 3) {
			if (dup2(ctrl, 3) < 0)
				_exit(HELPER_EXIT_INIT);
			ctrl = 3;
		}
#ifdef HAVE_CLOSE_RANGE
		close_range(4, ~0U, 0);
#else
		for (int fd = 4; fd < 65536; fd++)
			close(fd);
#endif
		sigset_t none;
		sigemptyset(&none);
		signal(SIGTERM, SIG_DFL);
		signal(SIGINT, SIG_DFL);
		signal(SIGCHLD, SIG_DFL);
		sigprocmask(SIG_SETMASK, &none, NULL);
		char ident[96];
		snprintf(ident, sizeof(ident), "p11agentd[helper %s]", h->mod->name);
		log_after_fd_cleanup(ident);
		_exit(helper_main(h->mod, ctrl, s->cfg));
	}
	close(sv[1]);
	if (fcntl(sv[0], F_SETFL, O_NONBLOCK) != 0)
		log_warn("helper %s: O_NONBLOCK: %s", h->mod->name, strerror(errno));
	h->pid = pid;
	h->fd = sv[0];
	h->up = 0;
	h->starts++;
	h->init_error = 0;
	h->restart_at = 0;
	h->kill_at = 0;
	h->killed = 0;
	h->down_why[0] = '\0';
	h->started_ms = p11a_now_ms();
	p11a_frame_in_init(&h->in, NULL, 0);
	log_info("helper %s started (pid %ld) for %s", h->mod->name, (long)pid, h->mod->path);
}

void
helper_send(struct server *s, size_t hi, uint32_t id, const struct p11a_msg *m, int fd_to_pass)
{
	struct helper *h = &s->helpers[hi];
	struct p11a_buf *b = p11a_buf_new(P11A_FRAME_MAX);
	int r = b ? p11a_msg_encode_internal(id, m, b) : -P11A_E_NOMEM;
	if (r == 0)
		r = p11a_frame_out_push(&h->out, b, fd_to_pass);
	else if (fd_to_pass >= 0)
		close(fd_to_pass);
	p11a_buf_free(b);  /* wipes: an UNLOCK body holds a PIN */
	if (r != 0) {
		log_err("helper %s: cannot queue a request: %s", h->mod->name, p11a_strerror(r));
		return;
	}
	/* A failed write shows again at POLLOUT, where the loop takes the helper down. */
	if (p11a_frame_out_flush(&h->out, h->fd) < 0)
		log_warn("helper %s: write failed: %s", h->mod->name, strerror(errno));
}

void
helper_disconnect(struct server *s, size_t hi, const char *why)
{
	struct helper *h = &s->helpers[hi];
	if (h->fd < 0)
		return;
	close(h->fd);
	h->fd = -1;
	p11a_frame_in_reset(&h->in);
	p11a_frame_out_clear(&h->out);
	p11a_list_reply_clear(&h->inv);
	h->up = 0;
	snprintf(h->down_why, sizeof(h->down_why), "%s", why);
	/* The socket closes when the process exits; one that lingers is killed. */
	h->kill_at = p11a_now_ms() + HELPER_REAP_GRACE_MS;
	log_debug("helper %s (pid %ld): control socket closed (%s)", h->mod->name, (long)h->pid, why);
	pending_fail_helper(s, hi);
	notify_status(s);
	helpers_reap(s);
}

/* The process of helper hi ended with status st: decide between restart and giving up. */
static void
helper_exited(struct server *s, size_t hi, int st)
{
	struct helper *h = &s->helpers[hi];

	/* What it sent before exiting (an init ERROR) is still in the socket. */
	if (h->fd >= 0)
		helper_readable(s, hi);
	if (h->fd >= 0)
		helper_disconnect(s, hi, "exited");
	if (WIFEXITED(st) && WEXITSTATUS(st) == HELPER_EXIT_INIT) {
		if (!h->init_error)
			helper_note_error(h, "could not be loaded or initialized (the helper's log "
					  "says why)");
		log_err("module %s could not be loaded or initialized (%s); not using it",
			h->mod->path, h->last_error);
		h->dead_for_good = 1;
	} else {
		if (p11a_now_ms() - h->started_ms > HELPER_STABLE_MS)
			h->restart_delay_ms = RESTART_DELAY_MIN_MS;
		if (WIFSIGNALED(st))
			helper_note_error(h, "helper (pid %ld) died of signal %d (%s, %s)",
					  (long)h->pid, WTERMSIG(st), strsignal(WTERMSIG(st)), h->down_why);
		else
			helper_note_error(h, "helper (pid %ld) exited (%s)", (long)h->pid, h->down_why);
		log_err("module %s: %s; restarting in %d ms", h->mod->name, h->last_error,
			h->restart_delay_ms);
		h->restart_at = p11a_now_ms() + h->restart_delay_ms;
		h->restart_delay_ms *= 2;
		if (h->restart_delay_ms > RESTART_DELAY_MAX_MS)
			h->restart_delay_ms = RESTART_DELAY_MAX_MS;
	}
	h->pid = 0;
	h->kill_at = 0;
	notify_status(s);
}

void
helpers_reap(struct server *s)
{
	/* helper_exited() may close a socket, which calls back here. */
	static int busy;

	if (busy)
		return;
	busy = 1;
	for (size_t i = 0; i < s->nhelpers; i++) {
		struct helper *h = &s->helpers[i];
		int st = 0;
		pid_t r;

		if (h->pid <= 0)
			continue;
		do
			r = waitpid(h->pid, &st, WNOHANG);
		while (r < 0 && errno == EINTR);
		if (r == h->pid)
			helper_exited(s, i, st);
		else if (r < 0 && errno == ECHILD)
			helper_exited(s, i, 0);  /* not ours any more: treat as gone */
	}
	busy = 0;
}

int64_t
helpers_tick(struct server *s, int64_t now, int64_t next)
{
	for (size_t i = 0; i < s->nhelpers; i++) {
		struct helper *h = &s->helpers[i];

		if (h->fd >= 0) {
			if (!h->up && h->started_ms + HELPER_START_WAIT_MS < next)
				next = h->started_ms + HELPER_START_WAIT_MS;
		} else if (h->pid > 0) {
			if (h->killed || !h->kill_at)
				continue;
			if (h->kill_at <= now) {
				log_warn("helper %s (pid %ld) did not exit within %d ms of closing its "
					 "socket; killing it", h->mod->name, (long)h->pid,
					 HELPER_REAP_GRACE_MS);
				kill(h->pid, SIGKILL);  /* our own child, by PID; reaped on SIGCHLD */
				h->killed = 1;
			} else if (h->kill_at < next) {
				next = h->kill_at;
			}
		} else if (!h->dead_for_good && h->restart_at) {
			if (h->restart_at <= now)
				helper_spawn(s, i);
			else if (h->restart_at < next)
				next = h->restart_at;
			/* A failed spawn set a later restart_at. */
			if (h->fd < 0 && h->restart_at && h->restart_at < next)
				next = h->restart_at;
		}
	}
	return next;
}

int
helpers_starting(const struct server *s, int64_t now)
{
	for (size_t i = 0; i < s->nhelpers; i++) {
		const struct helper *h = &s->helpers[i];
		if (h->fd >= 0 && !h->up && now - h->started_ms < HELPER_START_WAIT_MS)
			return 1;
	}
	return 0;
}

/*
 * Audit events a helper reports (H_EVENT): signatures, refusals and its
 * own locks.  A helper runs vendor code, so it is believed only about
 * those kinds; the uid is ours (every client is checked against it).
 */
static void
helper_events(struct server *s, const struct helper *h, const struct p11a_events *evs)
{
	if (evs->dropped != 0) {
		struct p11a_event d = { .kind = P11A_EV_DROPPED, .count = evs->dropped };

		log_warn("helper %s: %u audit events dropped (its queue was full: the agent did not "
			 "read them in time)",
			 h->mod->name, evs->dropped);
		audit_record(&d);
	}
	for (uint32_t i = 0; i < evs->n; i++) {
		struct p11a_event e = evs->ev[i];

		if (e.kind != P11A_EV_SIGN && e.kind != P11A_EV_REFUSED && e.kind != P11A_EV_LOCK) {
			log_warn("helper %s: audit event of kind %u ignored", h->mod->name, e.kind);
			continue;
		}
		e.uid = (uint32_t)s->uid;
		audit_record(&e);
	}
}

static void
helper_message(struct server *s, size_t hi, uint32_t id, struct p11a_msg *m)
{
	struct helper *h = &s->helpers[hi];
	if (m->type == P11A_MSG_H_INVENTORY && id == 0) {
		p11a_list_reply_clear(&h->inv);
		h->inv = m->u.list;
		memset(&m->u.list, 0, sizeof(m->u.list));
		if (!h->up)
			log_info("helper %s up: %u token(s), %u key(s)", h->mod->name,
				 h->inv.ntokens, h->inv.nkeys);
		else
			log_debug("helper %s: inventory %u token(s), %u key(s)", h->mod->name,
				  h->inv.ntokens, h->inv.nkeys);
		h->up = 1;
		notify_status(s);
		return;
	}
	if (m->type == P11A_MSG_H_EVENT && id == 0) {
		helper_events(s, h, &m->u.events);
		return;
	}
	if (m->type == P11A_MSG_ERROR && id == 0) {
		/* The helper says why it cannot go on (it exits next). */
		helper_note_error(h, "%s", m->u.error.message ? m->u.error.message : "");
		h->init_error = 1;
		return;
	}
	pending_reply(s, hi, id, m);
}

void
helper_readable(struct server *s, size_t hi)
{
	struct helper *h = &s->helpers[hi];
	for (;;) {
		int r = p11a_frame_in_recv(&h->in, h->fd);
		if (r == 0)
			return;
		if (r < 0) {
			helper_disconnect(s, hi, r == -P11A_E_IO ? "connection closed" : "bad frame length");
			return;
		}
		uint32_t id;
		struct p11a_msg m;
		int d = p11a_msg_decode_internal(p11a_buf_ptr(h->in.body), p11a_buf_len(h->in.body),
						 &id, &m);
		p11a_frame_in_reset(&h->in);
		if (d != 0) {
			log_err("helper %s sent a bad frame: %s", h->mod->name, p11a_strerror(d));
			kill(h->pid, SIGKILL);
			h->killed = 1;
			helper_disconnect(s, hi, "protocol error");
			return;
		}
		helper_message(s, hi, id, &m);
		p11a_msg_clear(&m);
		if (h->fd < 0)
			return;
	}
}

void
helpers_stop(struct server *s)
{
	int64_t until = p11a_now_ms() + HELPER_STOP_WAIT_MS;
	size_t left = 0;

	/* EOF tells every helper to finish; they wind down in parallel. */
	for (size_t i = 0; i < s->nhelpers; i++) {
		struct helper *h = &s->helpers[i];
		if (h->fd >= 0) {
			close(h->fd);
			h->fd = -1;
		}
	}
	for (;;) {
		left = 0;
		for (size_t i = 0; i < s->nhelpers; i++) {
			struct helper *h = &s->helpers[i];
			int st;
			if (h->pid > 0 && waitpid(h->pid, &st, WNOHANG) != 0)
				h->pid = 0;
			left += h->pid > 0;
		}
		int64_t now = p11a_now_ms();
		if (left == 0 || now >= until)
			break;
		/* SIGCHLD arrives on the signalfd; no sleeping in steps. */
		struct pollfd pfd = { s->sig_fd, POLLIN, 0 };
		if (s->sig_fd < 0 || poll(&pfd, 1, (int)(until - now)) < 0) {
			if (s->sig_fd >= 0 && errno == EINTR)
				continue;
			break;
		}
		if (pfd.revents & POLLIN) {
			struct signalfd_siginfo si;
			while (read(s->sig_fd, &si, sizeof(si)) == (ssize_t)sizeof(si))
				;
		}
	}
	for (size_t i = 0; i < s->nhelpers; i++) {
		struct helper *h = &s->helpers[i];
		int st;
		if (h->pid > 0) {
			kill(h->pid, SIGKILL);
			waitpid(h->pid, &st, 0);
			h->pid = 0;
		}
		helper_free(h);
	}
}
