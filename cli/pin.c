/*
 * p11agent: PIN entry, on the terminal with echo off, from a descriptor
 * (--pin-stdin) or from a file (--pin-file).
 *
 * Security-sensitive: the PIN goes only into the caller's fixed buffer,
 * read a byte at a time with read(2) (no stdio buffer keeps a copy, and
 * nothing past the line is consumed); every failure wipes it; the
 * terminal's settings are restored on every path, a signal included.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <termios.h>
#include <unistd.h>

#include "cli.h"

static volatile sig_atomic_t pin_signo;

static void
pin_on_signal(int signo)
{
	pin_signo = signo;
}

/*
 * Reads one line from fd into pin (P11A_PIN_MAX + 1 bytes), one byte per
 * read(2) so that nothing past the line is consumed or buffered.
 * Returns 0 at the end of the line or input, 1 when a signal caught by
 * pin_on_signal() interrupted it, -1 on a read error (errno set).
 * *toolong is set when the line did not fit; the excess is discarded.
 * *eof is set when the input ended before a newline.  A "\r\n" ending
 * counts as "\n": its '\r' never counts against P11A_PIN_MAX.
 *
 * wait_mask, when not NULL, is the signal mask to wait with: the caller
 * blocks the signals pin_on_signal() catches, and they are let in only
 * while ppoll(2) waits, so that one arriving just before a wait is seen by
 * the check above it rather than left until the next key (read(2) then
 * finds a byte or the end of input waiting and does not block).
 */
static int
pin_read_line(int fd, char *pin, size_t *len, int *toolong, int *eof,
	      const sigset_t *wait_mask)
{
	size_t n = 0;
	char ch = 0;
	int rc = 0, cr = 0;

	*toolong = 0;
	*eof = 0;
	for (;;) {
		ssize_t r;

		if (pin_signo != 0) {
			rc = 1;
			break;
		}
		if (wait_mask != NULL) {
			struct pollfd pfd = { .fd = fd, .events = POLLIN };

			if (ppoll(&pfd, 1, NULL, wait_mask) < 0) {
				if (errno == EINTR)
					continue;
				rc = -1;
				break;
			}
		}
		r = read(fd, &ch, 1);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			rc = -1;
			break;
		}
		if (r == 0) {
			*eof = 1;
			break;
		}
		if (ch == '\n')
			break;
		/* A '\r' is held back until we know it does not end the line. */
		if (cr) {
			if (n < P11A_PIN_MAX)
				pin[n++] = '\r';
			else
				*toolong = 1;
		}
		cr = ch == '\r';
		if (cr)
			continue;
		if (n < P11A_PIN_MAX)
			pin[n++] = ch;
		else
			*toolong = 1;
	}
	pin[n] = '\0';
	*len = n;
	p11a_wipe(&ch, sizeof(ch));
	return rc;
}

/*
 * The verdict on one pin_read_line().  cancel_on_eof: input that ends
 * without a newline is a refusal (Ctrl-D at a prompt), not a PIN.
 */
static int
pin_check(int rc, int toolong, int eof, int cancel_on_eof, int saved_errno,
	  const char *what, char *pin, size_t *len)
{
	if (rc == 0 && !toolong && !(eof && cancel_on_eof))
		return CLI_EXIT_OK;
	p11a_wipe(pin, P11A_PIN_MAX + 1);
	*len = 0;
	if (rc < 0)
		cli_err("reading the PIN from %s: %s", what, strerror(saved_errno));
	else if (rc > 0)
		cli_err("PIN entry interrupted");
	else if (toolong)
		cli_err("PIN from %s is longer than %d bytes; nothing sent", what, P11A_PIN_MAX);
	else
		cli_err("PIN entry ended without Enter (end of input on %s); nothing sent", what);
	return CLI_EXIT_FAIL;
}

int
cli_read_pin_tty(const char *prompt, char *pin, size_t *len)
{
	/*
	 * Signals that would otherwise leave the terminal without echo.  The
	 * first NASYNC come from outside at any time and are blocked but
	 * while waiting for a key; SIGTTIN and SIGTTOU come from our own
	 * terminal calls (made from the background) and interrupt them.
	 */
	static const int sigs[] = {
		SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGTSTP, SIGTTIN, SIGTTOU
	};
	enum { NSIGS = sizeof(sigs) / sizeof(sigs[0]), NASYNC = 5 };
	struct sigaction sa, old[NSIGS];
	sigset_t async, orig;
	struct termios saved, quiet;
	int fd, rc, toolong = 0, eof = 0, saved_errno = 0, signo;
	size_t i;

	*len = 0;
	pin[0] = '\0';
	fd = open("/dev/tty", O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (fd < 0) {
		cli_err("cannot open /dev/tty to ask for the PIN: %s (use --pin-stdin or --pin-file)",
			strerror(errno));
		return CLI_EXIT_FAIL;
	}
again:
	pin_signo = 0;
	sigemptyset(&async);
	for (i = 0; i < NASYNC; i++)
		sigaddset(&async, sigs[i]);
	(void)sigprocmask(SIG_BLOCK, &async, &orig);
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = pin_on_signal;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = 0;            /* no SA_RESTART: read(2) must return EINTR */
	/* A signal the caller ignores (nohup's SIGHUP) stays ignored. */
	for (i = 0; i < NSIGS; i++)
		if (sigaction(sigs[i], NULL, &old[i]) == 0 && old[i].sa_handler != SIG_IGN)
			(void)sigaction(sigs[i], &sa, NULL);

	if (tcgetattr(fd, &saved) != 0) {
		saved_errno = errno;
		for (i = 0; i < NSIGS; i++)
			(void)sigaction(sigs[i], &old[i], NULL);
		(void)sigprocmask(SIG_SETMASK, &orig, NULL);
		close(fd);
		cli_err("/dev/tty: %s", strerror(saved_errno));
		return CLI_EXIT_FAIL;
	}
	quiet = saved;
	quiet.c_lflag &= ~(tcflag_t)(ECHO | ECHOE | ECHOK | ECHONL);
	if (tcsetattr(fd, TCSAFLUSH, &quiet) != 0) {
		rc = -1;
		saved_errno = errno;
	} else {
		rc = cli_write_all(fd, prompt, strlen(prompt));
		saved_errno = errno;
		if (rc == 0) {
			rc = pin_read_line(fd, pin, len, &toolong, &eof, &orig);
			saved_errno = errno;
		}
		/* The user's Enter was not echoed. */
		(void)cli_write_all(fd, "\n", 1);
	}
	/* Restore on every path: success, error, or a signal. */
	while (tcsetattr(fd, TCSAFLUSH, &saved) != 0 && errno == EINTR)
		;
	for (i = 0; i < NSIGS; i++)
		(void)sigaction(sigs[i], &old[i], NULL);
	/* A signal still pending takes its usual effect here, the terminal restored. */
	(void)sigprocmask(SIG_SETMASK, &orig, NULL);

	signo = pin_signo;
	if (signo != 0) {
		p11a_wipe(pin, P11A_PIN_MAX + 1);
		*len = 0;
		toolong = 0;
		eof = 0;
		/* Now with the caller's disposition: usually terminates or stops. */
		(void)kill(getpid(), signo);
		if (signo == SIGTSTP || signo == SIGTTIN || signo == SIGTTOU)
			goto again;   /* continued after a stop: ask again */
		rc = 1;
	}
	close(fd);
	return pin_check(rc, toolong, eof, 1, saved_errno, "/dev/tty", pin, len);
}

int
cli_read_pin_fd(int fd, const char *what, char *pin, size_t *len)
{
	int rc, toolong = 0, eof = 0;

	*len = 0;
	pin[0] = '\0';
	pin_signo = 0;
	rc = pin_read_line(fd, pin, len, &toolong, &eof, NULL);
	/* A file or pipe may end without a newline: that ends the PIN. */
	return pin_check(rc, toolong, eof, 0, errno, what, pin, len);
}

int
cli_read_pin_file(const char *path, char *pin, size_t *len)
{
	struct stat st;
	int fd, rc;

	*len = 0;
	pin[0] = '\0';
	fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
	if (fd < 0) {
		cli_err("%s: %s", path, strerror(errno));
		return CLI_EXIT_FAIL;
	}
	if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
	    (st.st_mode & (S_IRWXG | S_IRWXO)) != 0)
		cli_err("warning: PIN file %s is accessible by other users (mode %04o)",
			path, (unsigned)(st.st_mode & 07777));
	rc = cli_read_pin_fd(fd, path, pin, len);
	close(fd);
	return rc;
}
