/*
 * The pinentry client: one thread per dialog, libassuan for the protocol
 * (see pinentry.h).  Everything libassuan allocates is wiped when freed
 * (its line buffers see the PIN); our own copy of the PIN stays in the
 * dialog's locked page.
 */
#include "config.h"
#include "pinentry.h"
#include "log.h"
#include "p11a.h"

#include <assuan.h>
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <termios.h>
#include <unistd.h>

#define PIN_BUF 512     /* a PIN of P11A_PIN_MAX bytes and room to notice a longer one */

struct pinentry {
	/* In the locked page: */
	char pin[PIN_BUF];
	size_t pin_len;
	int pin_too_long;
	/* The request (copies; no secret): */
	enum pinentry_kind kind;
	char *program, *title, *desc, *prompt, *error, *ok, *cancel;
	char *env[PINENTRY_ENV_MAX];
	size_t nenv;
	int timeout_s;
	int wake_fd;
	pthread_t thread;
	int joined;
	pthread_mutex_t lock;           /* guards pid */
	pid_t pid;                      /* the program while it runs, else 0 */
	int aborted;                    /* under lock */
	_Atomic int result;             /* enum pinentry_result, set last by the thread */
	char msg[512];                  /* why it failed */
};

/* ------------------------------------------------------------ wiping allocator */

static void *
wipe_malloc(size_t n)
{
	return malloc(n);
}

static void
wipe_free(void *p)
{
	if (p == NULL)
		return;
	p11a_wipe(p, malloc_usable_size(p));
	free(p);
}

/* A plain realloc() could leave the old block, PIN and all, unwiped. */
static void *
wipe_realloc(void *p, size_t n)
{
	void *q;
	size_t old;

	if (p == NULL)
		return malloc(n);
	if (n == 0) {
		wipe_free(p);
		return NULL;
	}
	if ((q = malloc(n)) == NULL)
		return NULL;
	old = malloc_usable_size(p);
	memcpy(q, p, old < n ? old : n);
	wipe_free(p);
	return q;
}

static struct assuan_malloc_hooks wipe_hooks = { wipe_malloc, wipe_realloc, wipe_free };

/* libassuan logs nothing of ours: a line may hold the PIN. */
static int
no_log(assuan_context_t ctx, void *arg, unsigned cat, const char *msg)
{
	(void)ctx;
	(void)arg;
	(void)cat;
	(void)msg;
	return 0;
}

/* ------------------------------------------------------------ the conversation */

/* "CMD text" with text percent-escaped as Assuan wants, cut to fit one line. */
static void
cmd_format(char *out, size_t out_size, const char *cmd, const char *text)
{
	size_t cl = strlen(cmd);
	/* "OPTION ttyname=" takes its value right after the '='. */
	size_t n = (size_t)snprintf(out, out_size, "%s%s", cmd, cl && cmd[cl - 1] == '=' ? "" : " ");

	for (const unsigned char *s = (const unsigned char *)text; *s && n + 4 < out_size; s++) {
		if (*s == '%' || *s == '\r' || *s == '\n' || *s < 0x20) {
			snprintf(out + n, out_size - n, "%%%02X", *s);
			n += 3;
		} else {
			out[n++] = (char)*s;
		}
	}
	/* Never end inside a UTF-8 sequence. */
	while (n > 0 && ((unsigned char)out[n - 1] & 0xC0) == 0x80) {
		size_t k = n;
		while (k > 0 && ((unsigned char)out[k - 1] & 0xC0) == 0x80)
			k--;
		if (k > 0) {
			unsigned char lead = (unsigned char)out[k - 1];
			size_t want = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
			if (n - (k - 1) == want)
				break;
			n = k - 1;
		} else {
			n = 0;
		}
	}
	out[n] = '\0';
}

static gpg_error_t
pin_data(void *arg, const void *buf, size_t len)
{
	struct pinentry *p = arg;

	if (len > P11A_PIN_MAX - p->pin_len) {
		p->pin_too_long = 1;
		return 0;       /* read the rest; refused afterwards */
	}
	memcpy(p->pin + p->pin_len, buf, len);
	p->pin_len += len;
	p->pin[p->pin_len] = '\0';
	return 0;
}

static gpg_error_t
say(assuan_context_t ctx, const char *cmd, const char *text)
{
	char line[ASSUAN_LINELENGTH];

	if (text == NULL || *text == '\0')
		return 0;
	cmd_format(line, sizeof(line) - 2, cmd, text);
	return assuan_transact(ctx, line, NULL, NULL, NULL, NULL, NULL, NULL);
}

static const char *
env_get(const struct pinentry *p, const char *name)
{
	size_t n = strlen(name);

	for (size_t i = 0; i < p->nenv; i++)
		if (strncmp(p->env[i], name, n) == 0 && p->env[i][n] == '=')
			return p->env[i] + n + 1;
	return NULL;
}

/*
 * In the child, between fork and exec: the session's variables instead of
 * the agent's, and the signal state a program expects (the agent blocks
 * SIGTERM and friends for its signalfd and ignores SIGPIPE).
 */
static void
child_setup(void *arg, int reserved)
{
	static const char *const vars[] = {
		"DISPLAY", "WAYLAND_DISPLAY", "XAUTHORITY", "DBUS_SESSION_BUS_ADDRESS", "TERM",
		"GPG_TTY"
	};
	struct pinentry *p = arg;
	sigset_t none;

	(void)reserved;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	signal(SIGPIPE, SIG_DFL);
	if (p->nenv == 0)
		return;         /* the agent's own environment at start */
	for (size_t i = 0; i < sizeof(vars) / sizeof(vars[0]); i++)
		unsetenv(vars[i]);
	for (size_t i = 0; i < p->nenv; i++) {
		char *eq = strchr(p->env[i], '=');
		if (eq == NULL || strncmp(p->env[i], "TTY=", 4) == 0)
			continue;
		*eq = '\0';
		setenv(p->env[i], eq + 1, 1);
		*eq = '=';
	}
}

/*
 * The terminal of a pinentry that draws on the user's tty (pinentry-tty,
 * -curses): its settings are saved before the program starts and put back
 * when the agent had to kill it (a PIN pad message closed by the login, a
 * dialog past its time limit, the agent stopping), since a killed pinentry
 * leaves the user's shell without echo and canonical mode.  fd -1: no tty.
 */
struct tty_guard {
	int fd;
	struct termios saved;
};

static void
tty_guard_save(struct tty_guard *g, const char *tty)
{
	struct stat st;

	g->fd = -1;
	/* The path comes from the session (updatestartuptty): only a terminal device is opened. */
	if (tty == NULL || strncmp(tty, "/dev/", 5) != 0 || stat(tty, &st) != 0 || !S_ISCHR(st.st_mode))
		return;
	g->fd = open(tty, O_RDWR | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
	if (g->fd >= 0 && (!isatty(g->fd) || tcgetattr(g->fd, &g->saved) != 0)) {
		close(g->fd);
		g->fd = -1;
	}
}

static void
tty_guard_end(struct tty_guard *g, int restore)
{
	if (g->fd < 0)
		return;
	if (restore) {
		if (tcsetattr(g->fd, TCSANOW, &g->saved) != 0)
			log_warn("could not restore the terminal settings of the killed pinentry: %s",
				 strerror(errno));
		else
			log_debug("terminal settings restored after the pinentry was killed");
	}
	close(g->fd);
	g->fd = -1;
}

static enum pinentry_result
converse(struct pinentry *p)
{
	struct tty_guard tty = { .fd = -1 };
	assuan_context_t ctx = NULL;
	const char *argv[2] = { p->program, NULL };
	assuan_fd_t keep[] = { 2, ASSUAN_INVALID_FD };
	char line[ASSUAN_LINELENGTH];
	enum pinentry_result res = PINENTRY_FAILED;
	gpg_error_t e;
	const char *v;

	if ((e = assuan_new_ext(&ctx, GPG_ERR_SOURCE_DEFAULT, &wipe_hooks, no_log, NULL)) != 0) {
		snprintf(p->msg, sizeof(p->msg), "cannot start a pinentry: %s", gpg_strerror(e));
		return PINENTRY_FAILED;
	}
	assuan_set_flag(ctx, ASSUAN_NO_LOGGING, 1);
	if (access(p->program, X_OK) != 0) {
		snprintf(p->msg, sizeof(p->msg), "pinentry program %s cannot run: %s "
			 "(pinentry-program in p11agentd.conf)", p->program, strerror(errno));
		goto out;
	}
	tty_guard_save(&tty, env_get(p, "TTY"));
	e = assuan_pipe_connect(ctx, p->program, argv, keep, child_setup, p, 0);
	if (e != 0) {
		snprintf(p->msg, sizeof(p->msg), "cannot run pinentry program %s: %s", p->program,
			 gpg_strerror(e));
		goto out;
	}
	pthread_mutex_lock(&p->lock);
	p->pid = assuan_get_pid(ctx);
	if (p->aborted && p->pid > 0)
		kill(p->pid, SIGKILL);
	pthread_mutex_unlock(&p->lock);
	if ((v = env_get(p, "TTY")) != NULL && (e = say(ctx, "OPTION ttyname=", v)) != 0)
		goto failed;
	if ((v = env_get(p, "TERM")) != NULL && (e = say(ctx, "OPTION ttytype=", v)) != 0)
		goto failed;
	if ((v = env_get(p, "DISPLAY")) != NULL && (e = say(ctx, "OPTION display=", v)) != 0)
		goto failed;
	if (p->timeout_s > 0) {
		snprintf(line, sizeof(line), "SETTIMEOUT %d", p->timeout_s);
		if ((e = assuan_transact(ctx, line, NULL, NULL, NULL, NULL, NULL, NULL)) != 0)
			goto failed;
	}
	if ((e = say(ctx, "SETTITLE", p->title)) != 0 || (e = say(ctx, "SETDESC", p->desc)) != 0 ||
	    (e = say(ctx, "SETPROMPT", p->kind == PINENTRY_GETPIN ? p->prompt : NULL)) != 0 ||
	    (e = say(ctx, "SETERROR", p->error)) != 0 || (e = say(ctx, "SETOK", p->ok)) != 0 ||
	    (e = say(ctx, p->kind == PINENTRY_CONFIRM ? "SETNOTOK" : "SETCANCEL", p->cancel)) != 0)
		goto failed;
	if (p->kind == PINENTRY_GETPIN)
		e = assuan_transact(ctx, "GETPIN", pin_data, p, NULL, NULL, NULL, NULL);
	else if (p->kind == PINENTRY_MESSAGE)
		e = assuan_transact(ctx, "MESSAGE", NULL, NULL, NULL, NULL, NULL, NULL);
	else
		e = assuan_transact(ctx, "CONFIRM", NULL, NULL, NULL, NULL, NULL, NULL);
	if (e == 0 && p->pin_too_long) {
		snprintf(p->msg, sizeof(p->msg), "the PIN is longer than %d bytes", P11A_PIN_MAX);
		p11a_wipe(p->pin, sizeof(p->pin));
		p->pin_len = 0;
		goto out;
	}
	if (e == 0) {
		res = PINENTRY_OK;
		goto out;
	}
failed:
	switch (gpg_err_code(e)) {
	case GPG_ERR_CANCELED:
	case GPG_ERR_FULLY_CANCELED:
	case GPG_ERR_NOT_CONFIRMED:
	case GPG_ERR_ASS_CANCELED:
		res = PINENTRY_CANCELLED;
		snprintf(p->msg, sizeof(p->msg), "%s", p->kind == PINENTRY_GETPIN ?
			 "PIN entry cancelled" : "refused by the user");
		break;
	case GPG_ERR_TIMEOUT:
		snprintf(p->msg, sizeof(p->msg), "nobody answered the %s dialog within %d s",
			 p->kind == PINENTRY_GETPIN ? "PIN" : "confirm", p->timeout_s);
		break;
	default:
		pthread_mutex_lock(&p->lock);
		if (p->aborted)
			snprintf(p->msg, sizeof(p->msg), "the dialog was closed by the agent");
		else
			snprintf(p->msg, sizeof(p->msg), "pinentry program %s failed: %s", p->program,
				 gpg_strerror(e));
		pthread_mutex_unlock(&p->lock);
		break;
	}
	p11a_wipe(p->pin, sizeof(p->pin));
	p->pin_len = 0;
out:
	/* The program is reaped by assuan_release(): no kill() after this point. */
	pthread_mutex_lock(&p->lock);
	p->pid = 0;
	int killed = p->aborted;
	pthread_mutex_unlock(&p->lock);
	assuan_release(ctx);
	tty_guard_end(&tty, killed);
	return res;
}

static void *
dialog_thread(void *arg)
{
	struct pinentry *p = arg;
	enum pinentry_result r = converse(p);
	ssize_t w;

	atomic_store(&p->result, (int)r);
	do {
		w = write(p->wake_fd, "", 1);
	} while (w < 0 && errno == EINTR);
	/* A full pipe is fine: the loop looks at every dialog when it wakes. */
	return NULL;
}

/* ------------------------------------------------------------ the API */

static char *
dup_or_null(const char *s, int *fail)
{
	char *c;

	if (s == NULL)
		return NULL;
	if ((c = strdup(s)) == NULL)
		*fail = 1;
	return c;
}

static void
req_free(struct pinentry *p)
{
	free(p->program);
	free(p->title);
	free(p->desc);
	free(p->prompt);
	free(p->error);
	free(p->ok);
	free(p->cancel);
	for (size_t i = 0; i < p->nenv; i++) {
		if (p->env[i] != NULL)
			p11a_wipe(p->env[i], strlen(p->env[i]));
		free(p->env[i]);
	}
}

static void
page_free(struct pinentry *p)
{
	size_t size = (sizeof(*p) + 4095) & ~(size_t)4095;

	p11a_wipe(p, sizeof(*p));
	munlock(p, size);
	munmap(p, size);
}

int
pinentry_start(const struct pinentry_req *req, int wake_fd, struct pinentry **out,
	       char *msg, size_t msg_size)
{
	size_t size = (sizeof(struct pinentry) + 4095) & ~(size_t)4095;
	struct pinentry *p;
	pthread_attr_t attr;
	int fail = 0, r;

	*out = NULL;
	p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		snprintf(msg, msg_size, "out of memory");
		return -1;
	}
	/* Best effort: RLIMIT_MEMLOCK may be 0; a core dump is off for the agent anyway. */
	if (mlock(p, size) != 0)
		log_debug("pinentry: cannot lock the PIN's page in memory: %s", strerror(errno));
	(void)madvise(p, size, MADV_DONTDUMP);
	memset(p, 0, sizeof(*p));
	p->kind = req->kind;
	p->program = dup_or_null(req->program ? req->program : "/usr/bin/pinentry", &fail);
	p->title = dup_or_null(req->title, &fail);
	p->desc = dup_or_null(req->desc, &fail);
	p->prompt = dup_or_null(req->prompt, &fail);
	p->error = dup_or_null(req->error, &fail);
	p->ok = dup_or_null(req->ok, &fail);
	p->cancel = dup_or_null(req->cancel, &fail);
	for (size_t i = 0; i < req->nenv && i < PINENTRY_ENV_MAX; i++) {
		p->env[i] = dup_or_null(req->env[i], &fail);
		p->nenv = i + 1;
	}
	p->timeout_s = req->timeout_s;
	p->wake_fd = wake_fd;
	pthread_mutex_init(&p->lock, NULL);
	atomic_init(&p->result, PINENTRY_RUNNING);
	if (fail) {
		snprintf(msg, msg_size, "out of memory");
		goto fail;
	}
	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, 256 * 1024);
	r = pthread_create(&p->thread, &attr, dialog_thread, p);
	pthread_attr_destroy(&attr);
	if (r != 0) {
		snprintf(msg, msg_size, "cannot start the dialog's thread: %s", strerror(r));
		goto fail;
	}
	*out = p;
	return 0;
fail:
	req_free(p);
	pthread_mutex_destroy(&p->lock);
	page_free(p);
	return -1;
}

enum pinentry_result
pinentry_result(const struct pinentry *p)
{
	return (enum pinentry_result)atomic_load(&((struct pinentry *)p)->result);
}

const char *
pinentry_pin(const struct pinentry *p, size_t *len)
{
	*len = 0;
	if (pinentry_result(p) != PINENTRY_OK || p->kind != PINENTRY_GETPIN)
		return NULL;
	*len = p->pin_len;
	return p->pin;
}

const char *
pinentry_message(const struct pinentry *p)
{
	return p->msg;
}

void
pinentry_wipe_pin(struct pinentry *p)
{
	p11a_wipe(p->pin, sizeof(p->pin));
	p->pin_len = 0;
}

void
pinentry_abort(struct pinentry *p)
{
	pthread_mutex_lock(&p->lock);
	p->aborted = 1;
	if (p->pid > 0)
		kill(p->pid, SIGKILL);
	pthread_mutex_unlock(&p->lock);
}

void
pinentry_free(struct pinentry *p)
{
	if (p == NULL)
		return;
	if (!p->joined) {
		if (pinentry_result(p) == PINENTRY_RUNNING)
			pinentry_abort(p);
		pthread_join(p->thread, NULL);
		p->joined = 1;
	}
	req_free(p);
	pthread_mutex_destroy(&p->lock);
	page_free(p);
}
