/*
 * The agent's main process: one poll() loop over the listening socket,
 * client connections, token helper control sockets and a signalfd.  It
 * never calls PKCS#11 and never blocks on a token or a child: LIST and
 * STATUS come from the inventory the helpers push, UNLOCK/LOCK are
 * forwarded with a deadline, helpers are reaped on SIGCHLD
 * (supervise.c), SIGHUP and logind's suspend and screen-lock signals
 * (logind.c, on the system bus) lock every token, and SIGN never passes
 * through here (OPEN_CHANNEL hands the client a socketpair end that goes
 * straight to the helper).
 * Requests are handled in handlers.c; framing is common/frame.c's.
 */
#include "config.h"
#include "server.h"
#include "server_int.h"
#include "audit.h"
#include "log.h"
#include "systemd.h"
#include "p11a.h"
#include "proto.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

/* ------------------------------------------------------------ clients */

void
send_msg(struct server *s, size_t ci, const struct p11a_msg *m, int fd_to_pass)
{
	struct client *c = &s->clients[ci];
	struct p11a_buf *b = p11a_buf_new(P11A_FRAME_MAX);
	int r = b ? p11a_msg_encode(m, b) : -P11A_E_NOMEM;
	if (r == 0)
		r = p11a_frame_out_push(&c->out, b, fd_to_pass);
	else if (fd_to_pass >= 0)
		close(fd_to_pass);
	p11a_buf_free(b);
	if (r != 0) {
		log_err("cannot queue a reply for client %d: %s", c->fd, p11a_strerror(r));
		c->closing = 1;
		return;
	}
	if (p11a_frame_out_flush(&c->out, c->fd) < 0) {
		c->closing = 1;
		p11a_frame_out_clear(&c->out);
	}
}

/*
 * The executable of process pid, read at accept so that a pid reused
 * later cannot be mistaken for the peer (allow-programs).  NULL when it
 * cannot be read: the process is gone, is in another mount or pid
 * namespace, or is not dumpable.  A kernel's " (deleted)" suffix stays,
 * so a replaced binary matches no configured path.
 */
static char *
peer_exe(pid_t pid)
{
	char link[64], buf[PATH_MAX];
	ssize_t n;

	if (pid <= 0)
		return NULL;
	snprintf(link, sizeof(link), "/proc/%ld/exe", (long)pid);
	n = readlink(link, buf, sizeof(buf));
	if (n <= 0 || (size_t)n >= sizeof(buf) || buf[0] != '/')
		return NULL;
	buf[n] = '\0';
	return strdup(buf);
}

/*
 * A peer that is ssh or sshd forwards a connection from another host
 * (ssh -R, or sshd's end of ssh -L): descriptors cannot reach its client.
 */
static int
exe_is_ssh(const char *exe)
{
	const char *base;

	if (exe == NULL || (base = strrchr(exe, '/')) == NULL)
		return 0;
	base++;
	return strcmp(base, "ssh") == 0 || strcmp(base, "sshd") == 0;
}

/* The kernel's overflow uid (what an unmapped uid reads as), 65534 by default. */
static unsigned long
overflow_uid(void)
{
	unsigned long v = 65534;
	FILE *f = fopen("/proc/sys/kernel/overflowuid", "re");

	if (f != NULL) {
		if (fscanf(f, "%lu", &v) != 1)
			v = 65534;
		fclose(f);
	}
	return v;
}

/*
 * Logs why a peer of another uid is refused.  The overflow uid is what a
 * process in a user namespace whose uid has no mapping in ours looks
 * like (a container that does not map the user's uid): said so, since
 * "uid 65534" alone reads like the nobody account.
 */
static void
peer_uid_refused(const struct server *s, const struct ucred *cred)
{
	if ((unsigned long)cred->uid == overflow_uid())
		log_warn("refused a connection from uid %u (pid %ld): that is the kernel's overflow "
			 "uid, so the peer runs in a user namespace (a container) whose uid does not "
			 "map to ours; only uid %u may use this agent: map the user's uid into the "
			 "container (e.g. unshare -U -r, podman --userns=keep-id)",
			 (unsigned)cred->uid, (long)cred->pid, (unsigned)s->uid);
	else
		log_warn("refused a connection from uid %u (pid %ld): only uid %u may use this agent "
			 "(a peer in a user namespace shows as the uid its own uid maps to)",
			 (unsigned)cred->uid, (long)cred->pid, (unsigned)s->uid);
}

/* Field 22 of /proc/PID/stat (start time in clock ticks), 0 when unknown. */
static uint64_t
peer_start_time(pid_t pid)
{
	char path[64], buf[1024];
	unsigned long long v = 0;
	FILE *f;

	if (pid <= 0)
		return 0;
	snprintf(path, sizeof(path), "/proc/%ld/stat", (long)pid);
	if ((f = fopen(path, "re")) == NULL)
		return 0;
	size_t n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	/* The command name may hold spaces and ')': fields count from the last ')'. */
	char *p = strrchr(buf, ')');
	if (p == NULL || sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %*u %*u "
				"%*d %*d %*d %*d %*d %*d %llu", &v) != 1)
		return 0;
	return v;
}

void
client_close(struct server *s, size_t i)
{
	struct client *c = &s->clients[i];
	if (c->fd < 0)
		return;
	log_debug("client %d: closed", c->fd);
	close(c->fd);
	c->fd = -1;
	p11a_frame_in_reset(&c->in);
	p11a_frame_out_clear(&c->out);
	free(c->wait_error_msg);
	c->wait_error_msg = NULL;
	free(c->exe);
	c->exe = NULL;
	c->waiting = 0;
	if (c->reply_fd >= 0) {
		close(c->reply_fd);
		c->reply_fd = -1;
	}
	if (c->has_parked) {
		p11a_msg_clear(&c->parked);
		c->has_parked = 0;
	}
	s->open_clients--;
	/* Pending helper replies for it are dropped when they arrive (serial mismatch). */
}

static void
client_accept(struct server *s)
{
	for (;;) {
		int fd = accept4(s->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EMFILE || errno == ENFILE) {
				/* The backlog stays readable: without a pause, poll() spins. */
				log_warn("accept: %s; not accepting for %d ms", strerror(errno),
					 ACCEPT_PAUSE_MS);
				s->accept_paused_until = p11a_now_ms() + ACCEPT_PAUSE_MS;
			} else if (errno != EAGAIN && errno != EWOULDBLOCK) {
				log_warn("accept: %s", strerror(errno));
			}
			return;
		}
		struct ucred cred;
		socklen_t cl = sizeof(cred);
		if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) != 0 || cl != sizeof(cred)) {
			log_warn("refused a connection: cannot read peer credentials: %s", strerror(errno));
			close(fd);
			continue;
		}
		if (cred.uid != s->uid) {
			peer_uid_refused(s, &cred);
			close(fd);
			continue;
		}
		if (s->open_clients >= s->max_clients) {
			log_warn("refused a connection from pid %ld: %zu connections open (max-connections)",
				 (long)cred.pid, s->open_clients);
			close(fd);
			continue;
		}
		size_t i;
		for (i = 0; i < s->nclients; i++)
			if (s->clients[i].fd < 0)
				break;
		if (i == s->nclients) {
			if (s->nclients == s->cclients) {
				size_t n = s->cclients ? s->cclients * 2 : 64;
				struct client *nc = realloc(s->clients, n * sizeof(*nc));
				if (!nc) {
					log_err("out of memory accepting a connection");
					close(fd);
					return;
				}
				s->clients = nc;
				s->cclients = n;
			}
			s->nclients++;
		}
		struct client *c = &s->clients[i];
		memset(c, 0, sizeof(*c));
		c->fd = fd;
		c->serial = ++s->next_serial;
		c->uid = cred.uid;
		c->pid = cred.pid;
		c->exe = peer_exe(cred.pid);
		c->start_time = peer_start_time(cred.pid);
		c->reply_fd = -1;
		if (exe_is_ssh(c->exe))
			c->forwarded = FWD_SSH;
		p11a_frame_in_init(&c->in, NULL, 0);
		s->open_clients++;
		log_debug("client %d: connected (pid %ld, %s)%s", fd, (long)cred.pid,
			  c->exe ? c->exe : "executable unknown",
			  c->forwarded ? ", forwarded (ssh)" : "");
	}
}

void
client_readable(struct server *s, size_t ci)
{
	struct client *c = &s->clients[ci];
	int r = p11a_frame_in_recv(&c->in, c->fd);
	if (r == 0)
		return;
	if (r < 0 && r != -P11A_E_IO) {
		log_warn("client %d (pid %ld): frame length %u refused (1..%u); dropping the connection",
			 c->fd, (long)c->pid, c->in.body_len, P11A_FRAME_MAX);
		client_close(s, ci);
		return;
	}
	if (r < 0) {
		client_close(s, ci);
		return;
	}
	client_request(s, ci);
}

/* ------------------------------------------------------------ loop */

/* The poll set's entries before the helpers': signalfd, listener, system bus, dialogs. */
#define POLL_FIXED 4

static int
handle_signals(struct server *s)
{
	struct signalfd_siginfo si;
	while (read(s->sig_fd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
		if (si.ssi_signo == SIGTERM || si.ssi_signo == SIGINT) {
			log_info("signal %u: shutting down", si.ssi_signo);
			s->stop = 1;
		} else if (si.ssi_signo == SIGCHLD) {
			helpers_reap(s);
		} else if (si.ssi_signo == SIGHUP) {
			tokens_lock_all(s, "SIGHUP");
		}
	}
	return 0;
}

/* logind (logind.c) saw the machine suspend or our session lock. */
static void
logind_lock(void *arg, const char *why)
{
	tokens_lock_all(arg, why);
}

/*
 * Connections we can hold: max-connections, less what RLIMIT_NOFILE
 * cannot give (a reserve for helpers, signals, channel set-up and logs).
 */
static size_t
max_clients_for_nofile(const struct agent_config *cfg)
{
	struct rlimit rl;
	size_t want = (size_t)cfg->max_connections, reserve = 32 + 2 * cfg->nmodules;

	if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY ||
	    rl.rlim_cur >= want + reserve)
		return want;
	want = rl.rlim_cur > reserve + 16 ? rl.rlim_cur - reserve : 16;
	log_warn("max-connections %d is more than the descriptor limit (%lu) allows: %zu",
		 cfg->max_connections, (unsigned long)rl.rlim_cur, want);
	return want;
}

int
server_run(const struct agent_config *cfg, int listen_fd)
{
	struct server srv;
	struct server *s = &srv;
	memset(s, 0, sizeof(*s));
	s->wake_rd = s->wake_wr = -1;
	s->cfg = cfg;
	s->listen_fd = listen_fd;
	s->uid = getuid();
	int rc = 1;

	sigset_t mask;
	sigemptyset(&mask);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGINT);
	sigaddset(&mask, SIGCHLD);
	sigaddset(&mask, SIGHUP);       /* locks every token */
	sigprocmask(SIG_BLOCK, &mask, NULL);
	s->sig_fd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
	if (s->sig_fd < 0) {
		log_err("signalfd: %s", strerror(errno));
		return 1;
	}

	s->nhelpers = cfg->nmodules;
	s->max_clients = max_clients_for_nofile(cfg);
	s->helpers = calloc(s->nhelpers ? s->nhelpers : 1, sizeof(*s->helpers));
	if (!s->helpers) {
		log_err("out of memory");
		goto out;
	}
	for (size_t i = 0; i < s->nhelpers; i++) {
		helper_init(s, i, (struct module_conf *)&cfg->modules[i]);
		helper_spawn(s, i);
	}
	if (s->nhelpers == 0)
		log_warn("no PKCS#11 module to use: give --module PATH or register one with p11-kit");
	s->logind = logind_new(cfg, s->uid, logind_lock, s);
	if (prompt_init(s) != 0)
		goto out;
	/* Clients can connect from now on; requests wait for starting helpers themselves. */
	sysd_notify("READY=1\nSTATUS=listening on %s, %zu module(s) starting", cfg->socket_path,
		    s->nhelpers);

	while (!s->stop) {
		/* pfd: signals, listener, the system bus, helpers, clients. */
		size_t need = POLL_FIXED + s->nhelpers + s->nclients;
		if (need > s->cpfd) {
			struct pollfd *np = realloc(s->pfd, need * sizeof(*np));
			if (!np) {
				log_err("out of memory");
				break;
			}
			s->pfd = np;
			s->cpfd = need;
		}
		struct pollfd *pfd = s->pfd;
		size_t n = 0;
		int64_t now = p11a_now_ms();
		int64_t next = now + 1000;
		pfd[n++] = (struct pollfd){ s->sig_fd, POLLIN, 0 };
		if (s->accept_paused_until > now) {
			pfd[n++] = (struct pollfd){ -1, 0, 0 };
			if (s->accept_paused_until < next)
				next = s->accept_paused_until;
		} else {
			pfd[n++] = (struct pollfd){ s->listen_fd, POLLIN, 0 };
		}
		short bus_ev;
		int bus_fd = logind_poll_fd(s->logind, &bus_ev, &next);
		pfd[n++] = (struct pollfd){ bus_fd, bus_ev, 0 };
		pfd[n++] = (struct pollfd){ s->wake_rd, POLLIN, 0 };
		for (size_t i = 0; i < s->nhelpers; i++) {
			struct helper *h = &s->helpers[i];
			short ev = 0;
			if (h->fd >= 0)
				ev = POLLIN | (p11a_frame_out_empty(&h->out) ? 0 : POLLOUT);
			pfd[n++] = (struct pollfd){ ev ? h->fd : -1, ev, 0 };
		}
		for (size_t i = 0; i < s->nclients; i++) {
			struct client *c = &s->clients[i];
			short ev = 0;
			if (c->fd >= 0) {
				int queued = !p11a_frame_out_empty(&c->out);
				/* One outstanding request: read again only once answered. */
				if (!c->waiting && !c->has_parked && !queued && !c->closing)
					ev |= POLLIN;
				if (queued)
					ev |= POLLOUT;
				if (c->in.started_ms && c->in.started_ms + P11A_HALF_FRAME_MS < next)
					next = c->in.started_ms + P11A_HALF_FRAME_MS;
			}
			pfd[n++] = (struct pollfd){ ev ? c->fd : -1, ev, 0 };
		}
		next = pending_next_deadline(s, next);
		next = prompt_tick(s, now, next);
		next = helpers_tick(s, now, next);
		int timeout = next > now ? (int)(next - now) : 0;
		int pr = poll(pfd, n, timeout);
		if (pr < 0 && errno != EINTR) {
			log_err("poll: %s", strerror(errno));
			break;
		}
		if (pr > 0) {
			if (pfd[0].revents)
				handle_signals(s);
			if (pfd[1].revents & POLLIN)
				client_accept(s);
			if (pfd[3].revents & POLLIN)
				prompt_wake(s);
			for (size_t i = 0; i < s->nhelpers; i++) {
				struct helper *h = &s->helpers[i];
				short re = pfd[POLL_FIXED + i].revents;
				if (h->fd < 0 || !re)
					continue;
				if (re & POLLOUT && p11a_frame_out_flush(&h->out, h->fd) < 0) {
					helper_disconnect(s, i, "write failed");
					continue;
				}
				if (re & (POLLIN | POLLHUP | POLLERR))
					helper_readable(s, i);
			}
			/* Clients accepted during this round have no pollfd entry yet. */
			size_t polled = n - POLL_FIXED - s->nhelpers;
			for (size_t i = 0; i < polled && i < s->nclients; i++) {
				struct client *c = &s->clients[i];
				short re = pfd[POLL_FIXED + s->nhelpers + i].revents;
				if (c->fd < 0 || !re)
					continue;
				if (re & POLLOUT && p11a_frame_out_flush(&c->out, c->fd) < 0) {
					client_close(s, i);
					continue;
				}
				if (re & POLLIN)
					client_readable(s, i);
				else if (re & (POLLHUP | POLLERR))
					client_close(s, i);
			}
		}
		now = p11a_now_ms();
		/* The bus's messages, its timeouts, or a reconnection that is due. */
		if (s->logind)
			logind_process(s->logind, now);
		for (size_t i = 0; i < s->nclients; i++) {
			struct client *c = &s->clients[i];
			if (c->fd < 0)
				continue;
			if (c->closing && p11a_frame_out_empty(&c->out)) {
				client_close(s, i);
			} else if (c->in.started_ms && now - c->in.started_ms > P11A_HALF_FRAME_MS) {
				log_warn("client %d (pid %ld): frame not completed within %d s; dropping the connection",
					 c->fd, (long)c->pid, P11A_HALF_FRAME_MS / 1000);
				client_close(s, i);
			}
		}
		pending_expire(s, now);
		(void)prompt_tick(s, now, now);
		clients_unpark(s, now);
		(void)helpers_tick(s, now, now);
	}
	rc = 0;
	sysd_notify("STOPPING=1\nSTATUS=shutting down");
out:
	for (size_t i = 0; i < s->nclients; i++)
		client_close(s, i);
	free(s->clients);
	prompt_free(s);
	pending_free_all(s);
	free(s->pfd);
	logind_free(s->logind);
	if (s->helpers) {
		helpers_stop(s);
		/* The helpers logged out (C_Finalize) as they exited. */
		if (s->nhelpers > 0)
			audit_note(P11A_EV_LOCK, "", 0, s->uid, NULL, 0, NULL, "exit", 0);
	}
	free(s->helpers);
	close(s->sig_fd);
	/* systemd's socket stays: the next connection starts the agent again. */
	if (!cfg->socket_activated && unlink(cfg->socket_path) != 0 && errno != ENOENT)
		log_warn("cannot remove %s: %s", cfg->socket_path, strerror(errno));
	log_info("stopped");
	return rc;
}

/* ------------------------------------------------------------ listen */

int
server_listen(const struct agent_config *cfg)
{
	const char *path = cfg->socket_path;
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof(sa.sun_path)) {
		fprintf(stderr, "p11agentd: socket path too long: %s\n", path);
		return -1;
	}
	memcpy(sa.sun_path, path, strlen(path) + 1);

	char dir[sizeof(sa.sun_path)];
	snprintf(dir, sizeof(dir), "%s", path);
	char *slash = strrchr(dir, '/');
	if (slash == dir)
		slash[1] = '\0';
	else if (slash)
		*slash = '\0';
	else
		snprintf(dir, sizeof(dir), ".");

	struct stat st;
	if (lstat(dir, &st) != 0) {
		if (errno != ENOENT || mkdir(dir, 0700) != 0 || lstat(dir, &st) != 0) {
			fprintf(stderr, "p11agentd: cannot create socket directory %s: %s\n", dir,
				strerror(errno));
			return -1;
		}
	}
	if (!S_ISDIR(st.st_mode)) {
		fprintf(stderr, "p11agentd: %s is not a directory\n", dir);
		return -1;
	}
	if (st.st_uid != getuid()) {
		fprintf(stderr, "p11agentd: socket directory %s belongs to uid %u, not to us\n", dir,
			(unsigned)st.st_uid);
		return -1;
	}
	if (st.st_mode & 077) {
		fprintf(stderr,
			"p11agentd: socket directory %s is accessible to other users (mode %04o); "
			"it must be 0700\n", dir, (unsigned)(st.st_mode & 07777));
		return -1;
	}

	if (lstat(path, &st) == 0) {
		if (!S_ISSOCK(st.st_mode)) {
			fprintf(stderr, "p11agentd: %s exists and is not a socket\n", path);
			return -1;
		}
		int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (probe >= 0 && connect(probe, (struct sockaddr *)&sa, sizeof(sa)) == 0) {
			close(probe);
			fprintf(stderr, "p11agentd: an agent is already running at %s\n", path);
			return -1;
		}
		if (probe >= 0)
			close(probe);
		if (unlink(path) != 0) {
			fprintf(stderr, "p11agentd: cannot remove stale socket %s: %s\n", path,
				strerror(errno));
			return -1;
		}
	}

	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0) {
		fprintf(stderr, "p11agentd: socket: %s\n", strerror(errno));
		return -1;
	}
	mode_t old = umask(0177);
	int b = bind(fd, (struct sockaddr *)&sa, sizeof(sa));
	umask(old);
	if (b != 0 || chmod(path, 0600) != 0 || listen(fd, 128) != 0) {
		fprintf(stderr, "p11agentd: cannot listen on %s: %s\n", path, strerror(errno));
		close(fd);
		return -1;
	}
	return fd;
}
