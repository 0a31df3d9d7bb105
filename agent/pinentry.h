/*
 * A pinentry client (the Assuan protocol, through libassuan): the PIN and
 * confirm dialogs of the agent's main process (agent/prompt.c).
 *
 * Each dialog runs in its own thread, which starts the pinentry program,
 * holds the whole Assuan conversation and writes one byte to a wake-up
 * descriptor when it ends; the main loop never blocks on a person.  The
 * PIN lives in the dialog's own page, locked in memory and left out of
 * core dumps, and is wiped by pinentry_free() (and by
 * pinentry_wipe_pin() as soon as it has been sent on).
 */
#ifndef AGENT_PINENTRY_H
#define AGENT_PINENTRY_H

#include <stddef.h>

#define PINENTRY_ENV_MAX 16

enum pinentry_kind {
	PINENTRY_GETPIN,
	PINENTRY_CONFIRM,
	PINENTRY_MESSAGE         /* MESSAGE: one button (a PIN pad's "use the keypad") */
};

enum pinentry_result {
	PINENTRY_RUNNING = 0,
	PINENTRY_OK,             /* GETPIN: a PIN; CONFIRM: yes */
	PINENTRY_CANCELLED,      /* cancel or close; CONFIRM: no */
	PINENTRY_FAILED          /* the program could not run or broke off; msg says why */
};

struct pinentry_req {
	enum pinentry_kind kind;
	const char *program;     /* absolute path */
	const char *title;       /* SETTITLE */
	const char *desc;        /* SETDESC: names the token or key and the program that asked */
	const char *prompt;      /* SETPROMPT ("PIN:"), GETPIN only */
	const char *error;       /* SETERROR, or NULL: why the dialog is shown again */
	const char *ok;          /* SETOK, or NULL */
	const char *cancel;      /* SETNOTOK (CONFIRM) or SETCANCEL, or NULL */
	int timeout_s;           /* SETTIMEOUT; 0 = none */
	/*
	 * The session, "NAME=value": TTY (OPTION ttyname), TERM (ttytype),
	 * DISPLAY (display) and others (DISPLAY, WAYLAND_DISPLAY, XAUTHORITY,
	 * DBUS_SESSION_BUS_ADDRESS) go into the program's environment.
	 */
	const char *env[PINENTRY_ENV_MAX];
	size_t nenv;
};

struct pinentry;

/*
 * Copies req and starts the dialog's thread; wake_fd (a non-blocking
 * pipe's write end, not owned) gets one byte when the dialog has ended.
 * 0, or -1 with msg set (nothing to free).
 */
int pinentry_start(const struct pinentry_req *req, int wake_fd, struct pinentry **out,
		   char *msg, size_t msg_size);

/* The result so far: PINENTRY_RUNNING until the thread has finished. */
enum pinentry_result pinentry_result(const struct pinentry *p);

/*
 * After the result is in: the PIN of a GETPIN that ended PINENTRY_OK
 * (NUL-terminated, in locked memory; valid until pinentry_wipe_pin() or
 * pinentry_free()), else NULL; *len its length.  msg: why it failed.
 */
const char *pinentry_pin(const struct pinentry *p, size_t *len);
const char *pinentry_message(const struct pinentry *p);
void pinentry_wipe_pin(struct pinentry *p);

/*
 * Ends a running dialog (its program gets SIGKILL); the thread then
 * finishes by itself with PINENTRY_FAILED.  Never blocks.
 */
void pinentry_abort(struct pinentry *p);

/*
 * Waits for the thread (call after the result is in, or after
 * pinentry_abort()), wipes and frees.  NULL is fine.
 */
void pinentry_free(struct pinentry *p);

#endif
