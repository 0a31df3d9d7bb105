/* systemd: socket activation, sd_notify and journal streams. */
#include "config.h"
#include "systemd.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <syslog.h>
#include <unistd.h>

int
sysd_stderr_is_journal(void)
{
	const char *js = getenv("JOURNAL_STREAM");
	unsigned long long dev, ino;
	struct stat st;

	if (!js || sscanf(js, "%llu:%llu", &dev, &ino) != 2 || fstat(STDERR_FILENO, &st) != 0)
		return 0;
	return (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
}

#ifdef HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#include <systemd/sd-journal.h>

/* The passed socket's directory: ours, not a link, and closed to everyone else. */
static int
check_dir(const char *path)
{
	char dir[sizeof(((struct sockaddr_un *)0)->sun_path)];
	struct stat st;

	snprintf(dir, sizeof(dir), "%s", path);
	char *slash = strrchr(dir, '/');
	if (slash == dir)
		slash[1] = '\0';
	else if (slash)
		*slash = '\0';
	if (lstat(dir, &st) != 0) {
		fprintf(stderr, "p11agentd: the socket systemd passed is in %s: %s\n", dir,
			strerror(errno));
		return -1;
	}
	if (!S_ISDIR(st.st_mode)) {
		fprintf(stderr, "p11agentd: the socket systemd passed is in %s, which is not a "
			"directory\n", dir);
		return -1;
	}
	if (st.st_uid != getuid()) {
		fprintf(stderr, "p11agentd: the socket systemd passed is in %s, which belongs to "
			"uid %u, not to us\n", dir, (unsigned)st.st_uid);
		return -1;
	}
	if (st.st_mode & 077) {
		fprintf(stderr, "p11agentd: refusing the socket systemd passed: its directory %s "
			"is accessible to other users (mode %04o); set DirectoryMode=0700 in "
			"p11agentd.socket (and remove the directory so that systemd makes it "
			"again)\n", dir, (unsigned)(st.st_mode & 07777));
		return -1;
	}
	if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode) && (st.st_mode & 077))
		fprintf(stderr, "p11agentd: note: socket %s has mode %04o; p11agentd.socket "
			"should set SocketMode=0600\n", path, (unsigned)(st.st_mode & 07777));
	return 0;
}

int
sysd_listen_socket(const struct agent_config *cfg, int *fd)
{
	struct sockaddr_un sa;
	socklen_t len = sizeof(sa);
	int n = sd_listen_fds(1);

	*fd = -1;
	if (n < 0) {
		fprintf(stderr, "p11agentd: socket activation: %s\n", strerror(-n));
		return -1;
	}
	if (n == 0)
		return 0;
	if (n != 1) {
		fprintf(stderr, "p11agentd: systemd passed %d sockets; p11agentd.socket must have "
			"exactly one ListenStream=\n", n);
		return -1;
	}
	int s = SD_LISTEN_FDS_START;
	if (sd_is_socket_unix(s, SOCK_STREAM, 1, NULL, 0) <= 0) {
		fprintf(stderr, "p11agentd: the descriptor systemd passed is not a listening Unix "
			"stream socket (p11agentd.socket needs ListenStream=PATH)\n");
		return -1;
	}
	memset(&sa, 0, sizeof(sa));
	if (getsockname(s, (struct sockaddr *)&sa, &len) != 0 || len <= offsetof(struct sockaddr_un, sun_path) ||
	    sa.sun_path[0] != '/') {
		fprintf(stderr, "p11agentd: the socket systemd passed has no path (an abstract or "
			"unnamed socket); p11agentd.socket needs ListenStream=PATH\n");
		return -1;
	}
	sa.sun_path[sizeof(sa.sun_path) - 1] = '\0';
	if (strcmp(sa.sun_path, cfg->socket_path) != 0) {
		char where[4200];
		config_origin_format(&cfg->origin[SET_SOCKET], where, sizeof(where));
		fprintf(stderr, "p11agentd: systemd passed a socket at %s, but the agent's socket is "
			"%s (%s); make ListenStream= in p11agentd.socket and the socket setting "
			"(or P11AGENT_SOCK) agree\n", sa.sun_path, cfg->socket_path, where);
		return -1;
	}
	if (check_dir(sa.sun_path) != 0)
		return -1;
	int fl = fcntl(s, F_GETFL);
	if (fl < 0 || fcntl(s, F_SETFL, fl | O_NONBLOCK) != 0 || fcntl(s, F_SETFD, FD_CLOEXEC) != 0) {
		fprintf(stderr, "p11agentd: the socket systemd passed: %s\n", strerror(errno));
		return -1;
	}
	*fd = s;
	return 1;
}

void
sysd_notify(const char *fmt, ...)
{
	char text[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(text, sizeof(text), fmt, ap);
	va_end(ap);
	(void)sd_notify(0, text);
}

int
sysd_journal_stream(const char *ident)
{
	int fd = sd_journal_stream_fd(ident, LOG_INFO, 1);
	return fd < 0 ? -1 : fd;
}

#else /* !HAVE_SYSTEMD */

int
sysd_listen_socket(const struct agent_config *cfg, int *fd)
{
	const char *pid = getenv("LISTEN_PID");

	(void)cfg;
	*fd = -1;
	if (getenv("LISTEN_FDS") && pid && strtol(pid, NULL, 10) == (long)getpid()) {
		fprintf(stderr, "p11agentd: systemd passed a socket, but this p11agentd was built "
			"without systemd support (--without-systemd)\n");
		return -1;
	}
	return 0;
}

void
sysd_notify(const char *fmt, ...)
{
	(void)fmt;
}

int
sysd_journal_stream(const char *ident)
{
	(void)ident;
	return -1;
}

#endif
