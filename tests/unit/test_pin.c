/*
 * Unit tests for cli/pin.c, PIN entry.
 *
 * The terminal cases run cli_read_pin_tty() in a child whose controlling
 * terminal is the slave side of a pty (openpty(3)); the test types on the
 * master side as a person would, and watches the slave's termios: echo
 * off while the prompt is open, restored after, on every path (a signal
 * included, and a stop and continue).  The descriptor cases feed cli_read_pin_fd() through a pipe,
 * as --pin-stdin does.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pty.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>
#include <cmocka.h>

#include "p11a.h"
#include "cli.h"

#define PROMPT "PIN for token 'test': "
#define WAIT_MS 10000

/* What the child reports through a pipe. */
struct result {
	int rc;
	size_t len;
	char pin[P11A_PIN_MAX + 1];
};

struct pty_child {
	int master, slave;      /* the slave stays open here to read its termios */
	int res;                /* read end of the child's result pipe */
	pid_t pid;              /* the process at the prompt */
	pid_t leader;           /* the session leader: pid, or its parent (a job) */
	char out[8192];         /* everything the child wrote on the terminal */
	size_t out_len;
};

/* Reads from the master until want appears in the output (or fails the test). */
static void
wait_output(struct pty_child *c, const char *want)
{
	int64_t deadline = p11a_now_ms() + WAIT_MS;

	for (;;) {
		struct pollfd pfd = { .fd = c->master, .events = POLLIN };
		ssize_t n;

		c->out[c->out_len] = '\0';
		if (strstr(c->out, want) != NULL)
			return;
		assert_true(p11a_now_ms() < deadline);
		if (poll(&pfd, 1, 100) <= 0)
			continue;
		n = read(c->master, c->out + c->out_len, sizeof(c->out) - 1 - c->out_len);
		if (n <= 0)
			fail_msg("terminal closed before '%s' appeared", want);
		c->out_len += (size_t)n;
	}
}

/* Reads whatever else the child wrote, without waiting for more. */
static void
drain_output(struct pty_child *c)
{
	for (;;) {
		struct pollfd pfd = { .fd = c->master, .events = POLLIN };
		ssize_t n;

		if (poll(&pfd, 1, 50) <= 0 || c->out_len >= sizeof(c->out) - 1)
			break;
		n = read(c->master, c->out + c->out_len, sizeof(c->out) - 1 - c->out_len);
		if (n <= 0)
			break;
		c->out_len += (size_t)n;
	}
	c->out[c->out_len] = '\0';
}

/* waitpid() with a deadline: a child stuck at the prompt fails the test, never hangs it. */
static void
wait_exit(pid_t pid, int *status)
{
	int64_t deadline = p11a_now_ms() + WAIT_MS;
	pid_t r;

	while ((r = waitpid(pid, status, WNOHANG)) == 0) {
		if (p11a_now_ms() >= deadline) {
			(void)kill(pid, SIGKILL);
			(void)waitpid(pid, status, 0);
			fail_msg("process %d did not end", (int)pid);
		}
		usleep(10000);
	}
	assert_int_equal(r, pid);
}

static int
echo_on(int fd)
{
	struct termios t;

	assert_int_equal(tcgetattr(fd, &t), 0);
	return (t.c_lflag & ECHO) != 0;
}

/* SIGHUP's disposition in the prompting child: SIG_DFL, or SIG_IGN as under nohup. */
static void (*prompt_sighup)(int) = SIG_DFL;

static void
prompt_and_report(int res)
{
	struct result r;

	/* The dispositions the tests start from, whatever the runner's (nohup). */
	(void)signal(SIGHUP, prompt_sighup);
	(void)signal(SIGINT, SIG_DFL);
	(void)signal(SIGTERM, SIG_DFL);
	memset(&r, 0x55, sizeof(r));
	r.rc = cli_read_pin_tty(PROMPT, r.pin, &r.len);
	if (write(res, &r, sizeof(r)) != (ssize_t)sizeof(r))
		_exit(91);
	_exit(0);
}

/*
 * As a shell runs a job: the session leader forks the process that asks
 * for the PIN in a process group of its own, in the terminal's
 * foreground, so that a stop signal really stops it (in an orphaned
 * process group, as the leader's own is, the kernel discards them).
 */
static void
start_prompt_job(struct pty_child *c)
{
	int fds[2], go[2], info[2], status;
	pid_t g;

	memset(c, 0, sizeof(*c));
	assert_int_equal(openpty(&c->master, &c->slave, NULL, NULL, NULL), 0);
	assert_int_equal(pipe(fds), 0);
	assert_int_equal(pipe(info), 0);
	c->leader = fork();
	assert_true(c->leader >= 0);
	if (c->leader == 0) {
		close(c->master);
		close(fds[0]);
		close(info[0]);
		if (setsid() < 0 || ioctl(c->slave, TIOCSCTTY, 0) != 0 || pipe(go) != 0)
			_exit(90);
		if ((g = fork()) < 0)
			_exit(90);
		if (g == 0) {
			char b;

			close(go[1]);
			(void)setpgid(0, 0);
			if (read(go[0], &b, 1) != 1)
				_exit(92);
			prompt_and_report(fds[1]);
		}
		close(go[0]);
		if (setpgid(g, g) != 0 || tcsetpgrp(c->slave, g) != 0 ||
		    write(info[1], &g, sizeof(g)) != (ssize_t)sizeof(g) || write(go[1], "", 1) != 1)
			_exit(93);
		if (waitpid(g, &status, 0) != g)
			_exit(94);
		_exit(WIFEXITED(status) ? WEXITSTATUS(status) : 95);
	}
	close(fds[1]);
	close(info[1]);
	c->res = fds[0];
	assert_int_equal(read(info[0], &c->pid, sizeof(c->pid)), (ssize_t)sizeof(c->pid));
	close(info[0]);
	wait_output(c, PROMPT);
}

/* The state letter of /proc/PID/stat ('T': stopped). */
static char
proc_state(pid_t pid)
{
	char path[64], buf[512], *p;
	FILE *f;
	size_t n;

	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	if ((f = fopen(path, "r")) == NULL)
		return '?';
	n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	p = strrchr(buf, ')');
	return p != NULL && p[1] == ' ' ? p[2] : '?';
}

/*
 * Starts a child that makes the pty its controlling terminal and asks for
 * the PIN there; returns once the prompt is on the screen.
 */
static void
start_prompt(struct pty_child *c)
{
	int fds[2];

	memset(c, 0, sizeof(*c));
	assert_int_equal(openpty(&c->master, &c->slave, NULL, NULL, NULL), 0);
	assert_true(echo_on(c->slave));
	assert_int_equal(pipe(fds), 0);
	c->pid = fork();
	assert_true(c->pid >= 0);
	if (c->pid == 0) {
		close(c->master);
		close(fds[0]);
		if (setsid() < 0 || ioctl(c->slave, TIOCSCTTY, 0) != 0)
			_exit(90);
		prompt_and_report(fds[1]);
	}
	c->leader = c->pid;
	close(fds[1]);
	c->res = fds[0];
	wait_output(c, PROMPT);
}

static void
type(struct pty_child *c, const void *s, size_t n)
{
	assert_int_equal(write(c->master, s, n), (ssize_t)n);
}

/* The child's answer and exit; the terminal's echo is back on. */
static void
finish_prompt(struct pty_child *c, struct result *r)
{
	struct pollfd pfd = { .fd = c->res, .events = POLLIN };
	int status;

	if (poll(&pfd, 1, WAIT_MS) != 1) {
		(void)kill(c->pid, SIGKILL);
		(void)kill(c->leader, SIGKILL);
		fail_msg("no answer from the prompt");
	}
	assert_int_equal(read(c->res, r, sizeof(*r)), (ssize_t)sizeof(*r));
	wait_exit(c->leader, &status);
	assert_true(WIFEXITED(status));
	assert_int_equal(WEXITSTATUS(status), 0);
	drain_output(c);
	assert_true(echo_on(c->slave));
	close(c->res);
	close(c->master);
	close(c->slave);
}

static void
assert_wiped(const struct result *r)
{
	size_t i;

	assert_int_equal(r->len, 0);
	for (i = 0; i < sizeof(r->pin); i++)
		assert_int_equal(r->pin[i], 0);
}

static void
test_tty_no_echo(void **state)
{
	struct pty_child c;
	struct result r;

	(void)state;
	start_prompt(&c);
	/* The prompt is up: echo is off before the first key. */
	assert_false(echo_on(c.slave));
	type(&c, "s3cr3t-PIN\n", 11);
	finish_prompt(&c, &r);
	assert_int_equal(r.rc, CLI_EXIT_OK);
	assert_int_equal(r.len, 10);
	assert_string_equal(r.pin, "s3cr3t-PIN");
	/* Nothing typed was shown. */
	assert_null(strstr(c.out, "s3cr3t"));
}

static void
test_tty_longest(void **state)
{
	struct pty_child c;
	struct result r;
	char line[P11A_PIN_MAX + 1];

	(void)state;
	memset(line, 'x', P11A_PIN_MAX);
	line[P11A_PIN_MAX] = '\n';
	start_prompt(&c);
	type(&c, line, sizeof(line));
	finish_prompt(&c, &r);
	assert_int_equal(r.rc, CLI_EXIT_OK);
	assert_int_equal(r.len, P11A_PIN_MAX);
	assert_memory_equal(r.pin, line, P11A_PIN_MAX);
	assert_int_equal(r.pin[P11A_PIN_MAX], '\0');
}

/* One byte more than fits: refused and wiped, never cut to the first 256. */
static void
test_tty_too_long(void **state)
{
	struct pty_child c;
	struct result r;
	char line[P11A_PIN_MAX + 2];

	(void)state;
	memset(line, 'y', P11A_PIN_MAX + 1);
	line[P11A_PIN_MAX + 1] = '\n';
	start_prompt(&c);
	type(&c, line, sizeof(line));
	finish_prompt(&c, &r);
	assert_int_equal(r.rc, CLI_EXIT_FAIL);
	assert_wiped(&r);
}

/* Ctrl-D at the prompt: a clear failure, not an empty PIN. */
static void
test_tty_eof(void **state)
{
	struct pty_child c;
	struct result r;
	char veof;
	struct termios t;

	(void)state;
	start_prompt(&c);
	assert_int_equal(tcgetattr(c.slave, &t), 0);
	veof = (char)t.c_cc[VEOF];
	type(&c, &veof, 1);
	finish_prompt(&c, &r);
	assert_int_equal(r.rc, CLI_EXIT_FAIL);
	assert_wiped(&r);

	/* Typed, then Ctrl-D twice (no Enter): not confirmed, nothing returned. */
	start_prompt(&c);
	type(&c, "12", 2);
	type(&c, &veof, 1);
	type(&c, &veof, 1);
	finish_prompt(&c, &r);
	assert_int_equal(r.rc, CLI_EXIT_FAIL);
	assert_wiped(&r);
}

/* A signal during the prompt: the terminal is restored, then the signal takes effect. */
static void
test_tty_signal(void **state)
{
	static const int sigs[] = { SIGINT, SIGTERM, SIGHUP };
	struct pty_child c;
	size_t i;
	int status;

	(void)state;
	for (i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++) {
		start_prompt(&c);
		type(&c, "12", 2);
		assert_false(echo_on(c.slave));
		assert_int_equal(kill(c.pid, sigs[i]), 0);
		wait_exit(c.pid, &status);
		assert_true(WIFSIGNALED(status));
		assert_int_equal(WTERMSIG(status), sigs[i]);
		assert_true(echo_on(c.slave));
		close(c.res);
		close(c.master);
		close(c.slave);
	}
}

/* Whether PID has a signal pending (its own or its process's). */
static int
signal_pending(pid_t pid)
{
	char path[64], line[128];
	FILE *f;
	int pending = 0;

	snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
	if ((f = fopen(path, "r")) == NULL)
		return 0;
	while (fgets(line, sizeof(line), f) != NULL)
		if ((strncmp(line, "SigPnd:", 7) == 0 || strncmp(line, "ShdPnd:", 7) == 0) &&
		    strspn(line + 7, "\t 0") != strlen(line + 7) - 1)
			pending = 1;
	fclose(f);
	return pending;
}

/* A signal the caller ignores (nohup's SIGHUP) does not end the prompt. */
static void
test_tty_signal_ignored(void **state)
{
	struct pty_child c;
	struct result r;

	(void)state;
	prompt_sighup = SIG_IGN;
	start_prompt(&c);
	prompt_sighup = SIG_DFL;
	type(&c, "12", 2);
	assert_int_equal(kill(c.pid, SIGHUP), 0);
	/* The rest is typed once the signal has had its effect: none pending
	 * and the child asleep waiting for a key (or gone). */
	while (signal_pending(c.pid) || proc_state(c.pid) == 'R')
		(void)poll(NULL, 0, 10);
	type(&c, "34\n", 3);
	finish_prompt(&c, &r);
	assert_int_equal(r.rc, CLI_EXIT_OK);
	assert_int_equal(r.len, 4);
	assert_string_equal(r.pin, "1234");
}

/*
 * Ctrl-Z at the prompt: the terminal gets its echo back while the job is
 * stopped; after fg (SIGCONT) the prompt asks again, echo off, and the PIN
 * typed then is the one read (nothing typed before the stop leaks in).
 */
static void
test_tty_stop(void **state)
{
	struct pty_child c;
	struct result r;
	int64_t deadline;
	const char *second;

	(void)state;
	start_prompt_job(&c);
	assert_false(echo_on(c.slave));
	type(&c, "99", 2);
	assert_int_equal(kill(c.pid, SIGTSTP), 0);
	deadline = p11a_now_ms() + WAIT_MS;
	while (proc_state(c.pid) != 'T') {
		assert_true(p11a_now_ms() < deadline);
		usleep(10000);
	}
	assert_true(echo_on(c.slave));
	assert_int_equal(kill(c.pid, SIGCONT), 0);
	/* The prompt again, after the first one. */
	deadline = p11a_now_ms() + WAIT_MS;
	for (;;) {
		drain_output(&c);
		second = strstr(c.out, PROMPT);
		if (second != NULL && strstr(second + 1, PROMPT) != NULL)
			break;
		assert_true(p11a_now_ms() < deadline);
	}
	assert_false(echo_on(c.slave));
	type(&c, "4321\n", 5);
	finish_prompt(&c, &r);
	assert_int_equal(r.rc, CLI_EXIT_OK);
	assert_string_equal(r.pin, "4321");
	assert_null(strstr(c.out, "4321"));
}

/* ------------------------------------------------------------ --pin-stdin */

/* Runs cli_read_pin_fd() on a pipe holding data; *rest gets what it left unread. */
static int
pin_from_pipe(const char *data, size_t n, char *pin, size_t *len, char *rest, size_t rest_size)
{
	int fds[2], rc;
	ssize_t got;

	assert_int_equal(pipe(fds), 0);
	assert_int_equal(write(fds[1], data, n), (ssize_t)n);
	close(fds[1]);
	memset(pin, 0x55, P11A_PIN_MAX + 1);
	rc = cli_read_pin_fd(fds[0], "standard input", pin, len);
	got = read(fds[0], rest, rest_size - 1);
	rest[got > 0 ? got : 0] = '\0';
	close(fds[0]);
	return rc;
}

static void
test_fd(void **state)
{
	char pin[P11A_PIN_MAX + 1], rest[64], big[P11A_PIN_MAX + 8];
	size_t len, i;

	(void)state;
	/* One line only: what follows stays for the next reader. */
	assert_int_equal(pin_from_pipe("1234\nnext line\n", 15, pin, &len, rest, sizeof(rest)),
			 CLI_EXIT_OK);
	assert_int_equal(len, 4);
	assert_string_equal(pin, "1234");
	assert_string_equal(rest, "next line\n");
	/* No newline at the end of input: the PIN all the same (echo -n | --pin-stdin). */
	assert_int_equal(pin_from_pipe("5678", 4, pin, &len, rest, sizeof(rest)), CLI_EXIT_OK);
	assert_string_equal(pin, "5678");
	/* CRLF (a file from Windows) and a lone CR at the end are not part of the PIN ... */
	assert_int_equal(pin_from_pipe("abc\r\n", 5, pin, &len, rest, sizeof(rest)), CLI_EXIT_OK);
	assert_int_equal(len, 3);
	assert_int_equal(pin_from_pipe("abc\r", 4, pin, &len, rest, sizeof(rest)), CLI_EXIT_OK);
	assert_int_equal(len, 3);
	/* ... but a CR inside it is. */
	assert_int_equal(pin_from_pipe("a\rb\n", 4, pin, &len, rest, sizeof(rest)), CLI_EXIT_OK);
	assert_int_equal(len, 3);
	assert_memory_equal(pin, "a\rb", 4);
	/* Empty input: an empty PIN (the caller refuses to send it). */
	assert_int_equal(pin_from_pipe("", 0, pin, &len, rest, sizeof(rest)), CLI_EXIT_OK);
	assert_int_equal(len, 0);

	/* The longest PIN, with "\n" and with "\r\n". */
	memset(big, 'z', sizeof(big));
	big[P11A_PIN_MAX] = '\n';
	assert_int_equal(pin_from_pipe(big, P11A_PIN_MAX + 1, pin, &len, rest, sizeof(rest)),
			 CLI_EXIT_OK);
	assert_int_equal(len, P11A_PIN_MAX);
	big[P11A_PIN_MAX] = '\r';
	big[P11A_PIN_MAX + 1] = '\n';
	assert_int_equal(pin_from_pipe(big, P11A_PIN_MAX + 2, pin, &len, rest, sizeof(rest)),
			 CLI_EXIT_OK);
	assert_int_equal(len, P11A_PIN_MAX);
	assert_int_equal(pin[P11A_PIN_MAX], '\0');
	/* One byte more: refused and wiped, the rest of the line consumed, the next kept. */
	big[P11A_PIN_MAX] = 'z';
	big[P11A_PIN_MAX + 1] = '\n';
	memcpy(big + P11A_PIN_MAX + 2, "next", 4);
	assert_int_equal(pin_from_pipe(big, P11A_PIN_MAX + 6, pin, &len, rest, sizeof(rest)),
			 CLI_EXIT_FAIL);
	assert_int_equal(len, 0);
	for (i = 0; i < sizeof(pin); i++)
		assert_int_equal(pin[i], 0);
	assert_string_equal(rest, "next");
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_tty_no_echo),
		cmocka_unit_test(test_tty_longest),
		cmocka_unit_test(test_tty_too_long),
		cmocka_unit_test(test_tty_eof),
		cmocka_unit_test(test_tty_signal),
		cmocka_unit_test(test_tty_signal_ignored),
		cmocka_unit_test(test_tty_stop),
		cmocka_unit_test(test_fd),
	};

	/* cli_err() goes to stderr; the TAP output on stdout stays clean. */
	return cmocka_run_group_tests(tests, NULL, NULL);
}
