/*
 * PIN and confirm dialogs of the agent's main process (see server_int.h):
 * UNLOCK_PROMPT, CONFIRM and UPDATE_ENV.
 *
 * One dialog is on screen at a time (a tty cannot show two; gpg-agent
 * queues its pinentry the same way); each token has at most one PIN
 * dialog, queued or open, and every client asking for that token waits
 * for it (up to its own deadline) and gets its outcome.  The dialog runs
 * in a thread (pinentry.c) that wakes the loop through s->wake_rd; the
 * PIN goes to the token helper as an UNLOCK does and is wiped.  A wrong
 * PIN is never retried here: the waiters get the helper's PIN_INCORRECT,
 * and the next request shows the dialog again with the error.  Cancel
 * answers every waiter CANCELLED and starts a back-off (2 s doubling to
 * 60 s, reset by a successful unlock) during which new requests for that
 * token are refused at once, so a looping client cannot flood the screen.
 *
 * CONTEXT_PIN (CKA_ALWAYS_AUTHENTICATE keys) shows a PIN dialog per
 * signature; its PIN goes to the key's helper as H_CONTEXT_PIN, a
 * one-shot PIN for that connection and key, and is wiped here.  A cancel
 * starts the same back-off, per key.
 */
#include "config.h"
#include "server_int.h"
#include "pinentry.h"
#include "log.h"
#include "audit.h"
#include "p11a.h"
#include "proto.h"
#include "uri.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BACKOFF_MIN_MS      2000
#define BACKOFF_MAX_MS      60000
#define DIALOG_GRACE_MS     5000        /* past the pinentry's own timeout: SIGKILL */
#define GRANTS_MAX          1024

enum dkind { D_UNLOCK, D_CONFIRM_ONCE, D_CONFIRM_ALWAYS, D_CONTEXT_PIN };
enum dstage { ST_QUEUED, ST_OPEN, ST_HELPER };

struct waiter {
	size_t ci;
	uint64_t serial;
	int64_t deadline;
};

struct dialog {
	uint64_t id;
	enum dkind kind;
	enum dstage stage;
	size_t helper;
	char *uri;              /* D_UNLOCK: the token's URI; confirm, context PIN: the key's */
	char *label;            /* the token's or key's label, for messages */
	char *serial;           /* the token's serial (D_UNLOCK) */
	char *token_label;      /* the key's token (confirm, context PIN) */
	pid_t pid;              /* the process that asked first */
	uint64_t start;
	char *exe;
	uint64_t conn;          /* D_CONFIRM_ALWAYS, D_CONTEXT_PIN: the connection the grant is for */
	int forwarded;          /* a forwarding = confirm dialog (the client is forwarded) */
	uint64_t started_us;    /* when it was asked for (audit) */
	struct pinentry *pe;
	int pad;                /* D_UNLOCK on a PIN pad: pe is the message, shown during C_Login */
	int64_t abort_at;
	struct waiter *w;
	size_t nw;
};

struct tok_prompt {
	char *uri;
	int64_t until;          /* no dialog before this (back-off after a cancel) */
	int backoff_ms;
	char err[300];          /* why the previous PIN failed, for SETERROR; "" none */
};

struct confirm_grant {
	pid_t pid;
	uint64_t start;
	char *key_uri;
};

/* The variables pinentry needs from the session; TTY is the terminal's name. */
static const char *const env_names[] = {
	"DISPLAY", "WAYLAND_DISPLAY", "XAUTHORITY", "DBUS_SESSION_BUS_ADDRESS", "TERM", "TTY"
};

static int
env_known(const char *entry)
{
	for (size_t i = 0; i < sizeof(env_names) / sizeof(env_names[0]); i++) {
		size_t n = strlen(env_names[i]);
		if (strncmp(entry, env_names[i], n) == 0 && entry[n] == '=')
			return 1;
	}
	return 0;
}

static void
env_clear(struct server *s)
{
	for (size_t i = 0; i < s->nenv; i++)
		free(s->env[i]);
	s->nenv = 0;
}

int
prompt_init(struct server *s)
{
	int fds[2];
	char buf[512];

	s->wake_rd = s->wake_wr = -1;
	if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0) {
		log_err("cannot create the dialogs' pipe: %s", strerror(errno));
		return -1;
	}
	s->wake_rd = fds[0];
	s->wake_wr = fds[1];
	/* The session the agent started in, until `p11agent updatestartuptty`. */
	for (size_t i = 0; i < sizeof(env_names) / sizeof(env_names[0]); i++) {
		const char *v = getenv(env_names[i]);
		if (strcmp(env_names[i], "TTY") == 0) {
			v = getenv("GPG_TTY");
			if ((v == NULL || *v == '\0') && isatty(0))
				v = ttyname(0);
		}
		if (v == NULL || *v == '\0' || s->nenv == sizeof(s->env) / sizeof(s->env[0]))
			continue;
		snprintf(buf, sizeof(buf), "%s=%s", env_names[i], v);
		if ((s->env[s->nenv] = strdup(buf)) != NULL)
			s->nenv++;
	}
	return 0;
}

static void
dialog_clear(struct dialog *d)
{
	pinentry_free(d->pe);
	free(d->uri);
	free(d->label);
	free(d->serial);
	free(d->token_label);
	free(d->exe);
	free(d->w);
	memset(d, 0, sizeof(*d));
}

void
prompt_free(struct server *s)
{
	for (size_t i = 0; i < s->ndialogs; i++)
		dialog_clear(&s->dialogs[i]);
	free(s->dialogs);
	s->dialogs = NULL;
	s->ndialogs = 0;
	for (size_t i = 0; i < s->ntprompt; i++)
		free(s->tprompt[i].uri);
	free(s->tprompt);
	s->tprompt = NULL;
	s->ntprompt = 0;
	for (size_t i = 0; i < s->ngrants; i++)
		free(s->grants[i].key_uri);
	free(s->grants);
	s->grants = NULL;
	s->ngrants = 0;
	env_clear(s);
	if (s->wake_rd >= 0)
		close(s->wake_rd);
	if (s->wake_wr >= 0)
		close(s->wake_wr);
	s->wake_rd = s->wake_wr = -1;
}

/* ------------------------------------------------------------ bookkeeping */

static struct tok_prompt *
tprompt_find(struct server *s, const char *uri)
{
	for (size_t i = 0; i < s->ntprompt; i++)
		if (strcmp(s->tprompt[i].uri, uri) == 0)
			return &s->tprompt[i];
	return NULL;
}

static struct tok_prompt *
tprompt_get(struct server *s, const char *uri)
{
	struct tok_prompt *n = tprompt_find(s, uri);
	if (n != NULL)
		return n;
	n = realloc(s->tprompt, (s->ntprompt + 1) * sizeof(*n));
	if (n == NULL)
		return NULL;
	s->tprompt = n;
	n += s->ntprompt;
	memset(n, 0, sizeof(*n));
	if ((n->uri = strdup(uri)) == NULL)
		return NULL;
	s->ntprompt++;
	return n;
}

static size_t
dialog_index(const struct server *s, uint64_t id)
{
	for (size_t i = 0; i < s->ndialogs; i++)
		if (s->dialogs[i].id == id)
			return i;
	return SIZE_MAX;
}

static void
dialog_remove(struct server *s, size_t di)
{
	dialog_clear(&s->dialogs[di]);
	memmove(&s->dialogs[di], &s->dialogs[di + 1], (s->ndialogs - di - 1) * sizeof(*s->dialogs));
	s->ndialogs--;
}

/* Every waiter of dialog di gets code/msg (0 = OK); the dialog goes. */
static void
dialog_finish(struct server *s, size_t di, int code, const char *msg)
{
	struct dialog *d = &s->dialogs[di];

	/* The outcome goes to the audit trail, unless no dialog was needed after all. */
	if (d->stage != ST_QUEUED || code != 0) {
		struct p11a_event e;
		uint64_t now = audit_now_us();

		memset(&e, 0, sizeof(e));
		e.time_us = now;
		e.kind = d->kind == D_UNLOCK || d->kind == D_CONTEXT_PIN ? P11A_EV_PIN_DIALOG :
			 P11A_EV_CONFIRM;
		e.uri = d->uri;
		e.pid = d->pid > 0 ? (uint32_t)d->pid : 0;
		e.uid = (uint32_t)s->uid;
		e.exe = d->exe;
		e.flags = d->forwarded ? P11A_EVENT_FORWARDED : 0;
		e.result = code < 0 ? (uint32_t)-code : (uint32_t)code;
		e.message = code != 0 ? (char *)msg : NULL;
		e.duration_us = now > d->started_us ? now - d->started_us : 0;
		audit_record(&e);
	}
	for (size_t i = 0; i < d->nw; i++)
		client_reply_arrived(s, d->w[i].ci, d->w[i].serial, code, msg);
	d->nw = 0;
	dialog_remove(s, di);
}

/*
 * A request refused during a back-off (after a cancelled PIN dialog or a
 * confirm answered no): audited as a dialog outcome that showed no
 * dialog, then answered with code.
 */
static void
backoff_refuse(struct server *s, size_t ci, uint8_t event_kind, int code, char *uri, char *msg)
{
	const struct client *c = &s->clients[ci];
	struct p11a_event e;

	memset(&e, 0, sizeof(e));
	e.time_us = audit_now_us();
	e.kind = event_kind;
	e.uri = uri;
	e.pid = c->pid > 0 ? (uint32_t)c->pid : 0;
	e.uid = (uint32_t)s->uid;
	e.exe = c->exe;
	e.flags = c->forwarded ? P11A_EVENT_FORWARDED : 0;
	e.result = (uint32_t)code;
	e.message = msg;
	audit_record(&e);
	send_error(s, ci, code, "%s", msg);
}

static int
waiter_add(struct server *s, struct dialog *d, size_t ci)
{
	struct waiter *w = realloc(d->w, (d->nw + 1) * sizeof(*w));
	if (w == NULL)
		return -1;
	d->w = w;
	w[d->nw++] = (struct waiter){ ci, s->clients[ci].serial,
				      p11a_now_ms() + P11A_PROMPT_TIMEOUT_MS };
	s->clients[ci].waiting++;
	return 0;
}

/* A new queued dialog for client ci (its first waiter); NULL when out of memory (answered). */
static struct dialog *
dialog_new(struct server *s, size_t ci, enum dkind kind, size_t hi, const char *uri,
	   const char *label)
{
	struct client *c = &s->clients[ci];
	if (s->ndialogs == s->cdialogs) {
		size_t n = s->cdialogs ? s->cdialogs * 2 : 8;
		struct dialog *nd = realloc(s->dialogs, n * sizeof(*nd));
		if (nd == NULL)
			goto nomem;
		s->dialogs = nd;
		s->cdialogs = n;
	}
	struct dialog *d = &s->dialogs[s->ndialogs];
	memset(d, 0, sizeof(*d));
	d->id = ++s->next_dialog;
	d->kind = kind;
	d->helper = hi;
	d->pid = c->pid;
	d->start = c->start_time;
	d->conn = c->serial;
	d->started_us = audit_now_us();
	if ((d->uri = strdup(uri)) == NULL || (d->label = strdup(label ? label : "")) == NULL ||
	    (c->exe != NULL && (d->exe = strdup(c->exe)) == NULL)) {
		dialog_clear(d);
		goto nomem;
	}
	s->ndialogs++;
	if (waiter_add(s, d, ci) != 0) {
		dialog_remove(s, s->ndialogs - 1);
		goto nomem;
	}
	return d;
nomem:
	send_error(s, ci, P11A_E_NOMEM, "out of memory");
	return NULL;
}

/* ------------------------------------------------------------ showing dialogs */

static void dialogs_run(struct server *s);

static void
program_text(const struct dialog *d, char *out, size_t size)
{
	if (d->pid > 0)
		snprintf(out, size, "%s (pid %ld)", d->exe ? d->exe : "an unknown program",
			 (long)d->pid);
	else
		snprintf(out, size, "%s", d->exe ? d->exe : "an unknown program");
}

static void unlock_send(struct server *s, size_t di);

/*
 * A token with a protected authentication path (a PIN pad reader): the
 * helper calls C_Login with a NULL PIN, which waits for the PIN typed on
 * the reader's keypad, while a message (pinentry MESSAGE, one button, as
 * gpg-agent's pinpad pop-up) tells the user so; the agent closes it when
 * the login is over.  The message is decoration: a pinentry that cannot
 * run does not stop the login.
 */
static void
pad_open(struct server *s, size_t di, struct pinentry_req *req, const char *prog)
{
	struct dialog *d = &s->dialogs[di];
	char desc[1200], msg[600];

	snprintf(desc, sizeof(desc),
		 "Please enter the PIN of token '%.200s'%s%.100s%s on the reader's keypad.\n\n"
		 "Requested by %.400s.", d->label, d->serial && *d->serial ? " (serial " : "",
		 d->serial && *d->serial ? d->serial : "", d->serial && *d->serial ? ")" : "", prog);
	req->kind = PINENTRY_MESSAGE;
	req->title = "p11agent: PIN pad";
	req->desc = desc;
	req->ok = "OK";
	if (pinentry_start(req, s->wake_wr, &d->pe, msg, sizeof(msg)) != 0) {
		log_warn("cannot show the PIN pad message for token '%s': %s", d->label, msg);
		d->pe = NULL;
	}
	d->pad = 1;
	log_info("token '%s' has a PIN pad: the PIN is typed on the reader (asked by %s)",
		 d->label, prog);
	unlock_send(s, di);
}

/* Opens the dialog of s->dialogs[di]; on failure its waiters are answered and it is gone. */
static void
dialog_open(struct server *s, size_t di)
{
	struct dialog *d = &s->dialogs[di];
	struct pinentry_req req;
	char desc[1200], prog[PATH_MAX + 32], err[400], msg[600];
	struct tok_prompt *tp = NULL;
	uint32_t flags = 0;

	memset(&req, 0, sizeof(req));
	program_text(d, prog, sizeof(prog));
	req.program = s->cfg->pinentry_program ? s->cfg->pinentry_program : PINENTRY_DEFAULT;
	req.timeout_s = P11A_PROMPT_TIMEOUT_MS / 1000;
	for (size_t i = 0; i < s->nenv && i < PINENTRY_ENV_MAX; i++)
		req.env[req.nenv++] = s->env[i];
	if (d->kind == D_UNLOCK) {
		struct token_ref *refs = NULL;
		int n = find_tokens(s, d->uri, &refs);
		if (n == 1)
			flags = refs[0].token->flags;
		free(refs);
		if (n == 1 && (flags & P11A_TOKEN_LOGGED_IN)) {
			/* Unlocked meanwhile (p11agent unlock): no dialog needed. */
			dialog_finish(s, di, 0, NULL);
			return;
		}
		if (flags & P11A_TOKEN_PROTECTED_PATH) {
			pad_open(s, di, &req, prog);
			return;
		}
		tp = tprompt_get(s, d->uri);
		snprintf(desc, sizeof(desc),
			 "Please enter the PIN of token '%.200s'%s%.100s%s.\n\nRequested by %.400s.%s",
			 d->label, d->serial && *d->serial ? " (serial " : "",
			 d->serial && *d->serial ? d->serial : "", d->serial && *d->serial ? ")" : "",
			 prog,
			 (flags & P11A_TOKEN_PIN_FINAL_TRY) ?
			 "\n\nThis is the FINAL try: one more wrong PIN locks the token." :
			 (flags & P11A_TOKEN_PIN_COUNT_LOW) ?
			 "\n\nFew PIN tries are left: the token locks after a few more wrong PINs." :
			 "");
		err[0] = '\0';
		if (tp != NULL && tp->err[0])
			snprintf(err, sizeof(err), "%s", tp->err);
		req.kind = PINENTRY_GETPIN;
		req.title = "p11agent: PIN";
		req.desc = desc;
		req.prompt = "PIN:";
		req.error = err[0] ? err : NULL;
	} else if (d->kind == D_CONTEXT_PIN) {
		tp = tprompt_get(s, d->uri);
		snprintf(desc, sizeof(desc),
			 "Please enter the PIN for one signature with key '%.200s' on token '%.200s'.\n\n"
			 "Requested by %.400s.\n\nThis key asks for the PIN before every signature.",
			 d->label, d->token_label ? d->token_label : "", prog);
		err[0] = '\0';
		if (tp != NULL && tp->err[0])
			snprintf(err, sizeof(err), "%s", tp->err);
		req.kind = PINENTRY_GETPIN;
		req.title = "p11agent: PIN for a signature";
		req.desc = desc;
		req.prompt = "PIN:";
		req.error = err[0] ? err : NULL;
	} else {
		snprintf(desc, sizeof(desc),
			 "Allow %.400s to sign with key '%.200s'%s%.200s%s?%s",
			 prog, d->label, d->token_label ? " on token '" : "",
			 d->token_label ? d->token_label : "", d->token_label ? "'" : "",
			 d->kind == D_CONFIRM_ONCE ? "\n\n(Asked once for this program.)" :
			 d->forwarded ? "\n\nThe request comes through a forwarded connection "
			 "(ssh -R or a relay): a program on another host asks. (Asked for every "
			 "forwarded signature with this key.)" :
			 "\n\n(Asked for every signature with this key.)");
		req.kind = PINENTRY_CONFIRM;
		req.title = "p11agent: confirm";
		req.desc = desc;
		req.ok = "Allow";
		req.cancel = "Refuse";
	}
	if (pinentry_start(&req, s->wake_wr, &d->pe, msg, sizeof(msg)) != 0) {
		char text[800];
		snprintf(text, sizeof(text), "cannot show a dialog: %s", msg);
		dialog_finish(s, di, d->kind == D_UNLOCK ? P11A_E_LOCKED :
			      d->kind == D_CONTEXT_PIN ? P11A_E_CONTEXT_PIN : P11A_E_NOT_CONFIRMED, text);
		return;
	}
	d->stage = ST_OPEN;
	d->abort_at = p11a_now_ms() + P11A_PROMPT_TIMEOUT_MS + DIALOG_GRACE_MS;
	log_info("%s dialog for %s '%s' shown (asked by %s)",
		 d->kind == D_UNLOCK ? "PIN" : d->kind == D_CONTEXT_PIN ? "signature PIN" : "confirm",
		 d->kind == D_UNLOCK ? "token" : "key", d->label, prog);
}

/* Opens the oldest queued dialog when none is open. */
static void
dialogs_run(struct server *s)
{
	for (;;) {
		size_t i, before = s->ndialogs;
		for (i = 0; i < s->ndialogs; i++)
			if (s->dialogs[i].stage == ST_OPEN || s->dialogs[i].pad)
				return;
		for (i = 0; i < s->ndialogs; i++)
			if (s->dialogs[i].stage == ST_QUEUED)
				break;
		if (i == s->ndialogs)
			return;
		dialog_open(s, i);
		if (s->ndialogs == before)
			return;         /* opened; else it ended at once: try the next */
	}
}

/* ------------------------------------------------------------ outcomes */

/*
 * Confirm refusals have a back-off too, per program (executable) and key:
 * after a "no", that program's further requests for that key get the
 * refusal at once (2 s doubling to 60 s, reset by a "yes"), and its other
 * queued dialogs for the key are answered with the same "no", so a looping
 * or flooding program cannot keep the screen busy; other programs still
 * get their dialogs.  The entries live in the tok_prompt list under a key
 * no URI can equal (it starts with a newline); one is made only by a
 * user's "no".
 */
static struct tok_prompt *
confirm_backoff_get(struct server *s, const char *exe, const char *key_uri, int create)
{
	char *k = NULL;
	struct tok_prompt *tp;

	if (asprintf(&k, "\nconfirm\n%s\n%s", exe ? exe : "", key_uri) < 0)
		return NULL;
	tp = create ? tprompt_get(s, k) : tprompt_find(s, k);
	free(k);
	return tp;
}

static void
backoff_start(struct tok_prompt *tp)
{
	if (tp == NULL)
		return;
	tp->backoff_ms = tp->backoff_ms ? tp->backoff_ms * 2 : BACKOFF_MIN_MS;
	if (tp->backoff_ms > BACKOFF_MAX_MS)
		tp->backoff_ms = BACKOFF_MAX_MS;
	tp->until = p11a_now_ms() + tp->backoff_ms;
}

static void
confirm_refused(struct server *s, size_t di)
{
	struct dialog *d = &s->dialogs[di];
	struct tok_prompt *tp = confirm_backoff_get(s, d->exe, d->uri, 1);
	char text[600], other[700];
	uint64_t id = d->id;

	backoff_start(tp);
	log_info("confirm dialog for key '%s': refused; no new dialog for %s for %d s", d->label,
		 d->exe ? d->exe : "the program", tp ? tp->backoff_ms / 1000 : 0);
	snprintf(text, sizeof(text), "signature with key '%s' refused by the user", d->label);
	snprintf(other, sizeof(other), "signature with key '%s' refused by the user (in a dialog for "
		 "another request of the same program)", d->label);
	/* The same program's other queued dialogs for this key get the same answer. */
	for (size_t i = 0; i < s->ndialogs;) {
		struct dialog *q = &s->dialogs[i];
		if (q->id != id && q->stage == ST_QUEUED &&
		    (q->kind == D_CONFIRM_ONCE || q->kind == D_CONFIRM_ALWAYS) &&
		    strcmp(q->uri, d->uri) == 0 &&
		    strcmp(q->exe ? q->exe : "", d->exe ? d->exe : "") == 0) {
			dialog_finish(s, i, P11A_E_NOT_CONFIRMED, other);
			continue;
		}
		i++;
	}
	size_t at = dialog_index(s, id);
	if (at != SIZE_MAX)
		dialog_finish(s, at, P11A_E_NOT_CONFIRMED, text);
}

static void
unlock_cancelled(struct server *s, size_t di)
{
	struct dialog *d = &s->dialogs[di];
	struct tok_prompt *tp = tprompt_get(s, d->uri);
	char text[600];

	backoff_start(tp);
	if (d->kind == D_CONTEXT_PIN)
		snprintf(text, sizeof(text), "PIN entry cancelled: no signature with key '%s'",
			 d->label);
	else
		snprintf(text, sizeof(text), "PIN entry cancelled: token '%s' stays locked", d->label);
	log_info("PIN dialog for %s '%s' cancelled; no new dialog for %d s",
		 d->kind == D_CONTEXT_PIN ? "key" : "token", d->label, tp ? tp->backoff_ms / 1000 : 0);
	dialog_finish(s, di, P11A_E_CANCELLED, text);
}

/* The PIN of dialog di goes to its helper as an UNLOCK; the waiters wait for the answer. */
static void
unlock_send(struct server *s, size_t di)
{
	struct dialog *d = &s->dialogs[di];
	struct helper *h = &s->helpers[d->helper];
	struct p11a_msg m;
	struct pending *p;
	const char *pin;
	size_t len;
	char what[600];

	if (d->pad) {
		pin = "";       /* an empty PIN on a PIN pad token: C_Login(NULL) */
		len = 0;
	} else {
		pin = pinentry_pin(d->pe, &len);
	}
	if (h->fd < 0 || !h->up) {
		snprintf(what, sizeof(what), "token helper for module %s is restarting; "
			 "token '%s' was not unlocked", h->mod->name, d->label);
		dialog_finish(s, di, P11A_E_HELPER, what);
		return;
	}
	snprintf(what, sizeof(what), "unlock of token '%s'", d->label);
	if ((p = pending_add_dialog(s, d->helper, P11A_MSG_UNLOCK, what, d->id)) == NULL) {
		dialog_finish(s, di, P11A_E_NOMEM, "out of memory");
		return;
	}
	memset(&m, 0, sizeof(m));
	m.type = P11A_MSG_UNLOCK;
	m.u.unlock.token_uri = d->uri;          /* borrowed */
	memcpy(m.u.unlock.pin, pin, len);
	m.u.unlock.pin_len = len;
	helper_send(s, d->helper, p->id, &m, -1);
	p11a_wipe(&m, sizeof(m));
	d->stage = ST_HELPER;
	if (d->pad)
		return;                         /* the message stays up during C_Login */
	pinentry_free(d->pe);                   /* wipes the PIN's page */
	d->pe = NULL;
	log_info("PIN from the dialog sent for token '%s'", d->label);
}

/* The PIN of context-PIN dialog di goes to its helper for one signature of its connection. */
static void
ctxpin_send(struct server *s, size_t di)
{
	struct dialog *d = &s->dialogs[di];
	struct helper *h = &s->helpers[d->helper];
	struct p11a_msg m;
	struct pending *p;
	const char *pin;
	size_t len;
	char what[600];

	pin = pinentry_pin(d->pe, &len);
	if (h->fd < 0 || !h->up) {
		snprintf(what, sizeof(what), "token helper for module %s is restarting; "
			 "no signature with key '%s'", h->mod->name, d->label);
		dialog_finish(s, di, P11A_E_HELPER, what);
		return;
	}
	snprintf(what, sizeof(what), "PIN for a signature with key '%s'", d->label);
	if ((p = pending_add_dialog(s, d->helper, P11A_MSG_H_CONTEXT_PIN, what, d->id)) == NULL) {
		dialog_finish(s, di, P11A_E_NOMEM, "out of memory");
		return;
	}
	memset(&m, 0, sizeof(m));
	m.type = P11A_MSG_H_CONTEXT_PIN;
	m.u.ctx_pin.conn = d->conn;
	m.u.ctx_pin.key_uri = d->uri;           /* borrowed */
	memcpy(m.u.ctx_pin.pin, pin, len);
	m.u.ctx_pin.pin_len = len;
	helper_send(s, d->helper, p->id, &m, -1);
	p11a_wipe(&m, sizeof(m));
	pinentry_free(d->pe);                   /* wipes the PIN's page */
	d->pe = NULL;
	d->stage = ST_HELPER;
}

static int
grant_add(struct server *s, pid_t pid, uint64_t start, const char *key_uri)
{
	if (s->ngrants == GRANTS_MAX) {
		free(s->grants[0].key_uri);
		memmove(&s->grants[0], &s->grants[1], (s->ngrants - 1) * sizeof(*s->grants));
		s->ngrants--;
	}
	struct confirm_grant *g = realloc(s->grants, (s->ngrants + 1) * sizeof(*g));
	if (g == NULL)
		return -1;
	s->grants = g;
	g += s->ngrants;
	if ((g->key_uri = strdup(key_uri)) == NULL)
		return -1;
	g->pid = pid;
	g->start = start;
	s->ngrants++;
	return 0;
}

static void
confirm_yes(struct server *s, size_t di)
{
	struct dialog *d = &s->dialogs[di];
	char what[600];

	log_info("confirm dialog for key '%s': allowed", d->label);
	struct tok_prompt *tp = confirm_backoff_get(s, d->exe, d->uri, 0);
	if (tp != NULL)
		tp->until = tp->backoff_ms = 0;
	if (d->kind == D_CONFIRM_ONCE) {
		if (d->pid <= 0 || grant_add(s, d->pid, d->start, d->uri) != 0) {
			dialog_finish(s, di, P11A_E_NOMEM, "out of memory");
			return;
		}
		dialog_finish(s, di, 0, NULL);
		return;
	}
	/* always: one signature on this connection's channels; the helper holds the grant. */
	struct helper *h = &s->helpers[d->helper];
	if (h->fd < 0 || !h->up) {
		snprintf(what, sizeof(what), "token helper for module %s is restarting", h->mod->name);
		dialog_finish(s, di, P11A_E_HELPER, what);
		return;
	}
	snprintf(what, sizeof(what), "confirmation of key '%s'", d->label);
	struct pending *p = pending_add_dialog(s, d->helper, P11A_MSG_H_GRANT, what, d->id);
	if (p == NULL) {
		dialog_finish(s, di, P11A_E_NOMEM, "out of memory");
		return;
	}
	struct p11a_msg m = { .type = P11A_MSG_H_GRANT };
	m.u.grant.conn = d->conn;
	m.u.grant.key_uri = d->uri;
	helper_send(s, d->helper, p->id, &m, -1);
	pinentry_free(d->pe);
	d->pe = NULL;
	d->stage = ST_HELPER;
}

void
prompt_wake(struct server *s)
{
	char buf[64];

	while (read(s->wake_rd, buf, sizeof(buf)) > 0)
		;
	for (size_t i = 0; i < s->ndialogs; i++) {
		struct dialog *d = &s->dialogs[i];
		if (d->stage != ST_OPEN)
			continue;
		enum pinentry_result r = pinentry_result(d->pe);
		if (r == PINENTRY_RUNNING)
			continue;
		if (r == PINENTRY_OK && d->kind == D_UNLOCK) {
			unlock_send(s, i);
		} else if (r == PINENTRY_OK && d->kind == D_CONTEXT_PIN) {
			ctxpin_send(s, i);
		} else if (r == PINENTRY_OK) {
			confirm_yes(s, i);
		} else if (r == PINENTRY_CANCELLED &&
			   (d->kind == D_UNLOCK || d->kind == D_CONTEXT_PIN)) {
			unlock_cancelled(s, i);
		} else if (r == PINENTRY_CANCELLED) {
			confirm_refused(s, i);
		} else {
			char text[1000];
			log_warn("%s dialog for '%s' failed: %s", d->kind == D_CONFIRM_ONCE ||
				 d->kind == D_CONFIRM_ALWAYS ? "confirm" : "PIN",
				 d->label, pinentry_message(d->pe));
			if (d->kind == D_CONTEXT_PIN)
				snprintf(text, sizeof(text), "key '%s' needs its PIN for each signature "
					 "and the PIN dialog failed: %s", d->label,
					 pinentry_message(d->pe));
			else if (d->kind == D_UNLOCK)
				snprintf(text, sizeof(text), "token '%s' is locked and the PIN dialog "
					 "failed: %s; run 'p11agent unlock'", d->label,
					 pinentry_message(d->pe));
			else
				snprintf(text, sizeof(text), "key '%s' needs confirmation and the "
					 "dialog failed: %s", d->label, pinentry_message(d->pe));
			dialog_finish(s, i, d->kind == D_UNLOCK ? P11A_E_LOCKED :
				      d->kind == D_CONTEXT_PIN ? P11A_E_CONTEXT_PIN : P11A_E_NOT_CONFIRMED,
				      text);
		}
		break;  /* one dialog is open at a time; the array may have changed */
	}
	dialogs_run(s);
}

void
prompt_helper_reply(struct server *s, uint64_t id, int code, const char *msg)
{
	size_t di = dialog_index(s, id);
	if (di == SIZE_MAX)
		return;
	struct dialog *d = &s->dialogs[di];
	if (d->pad && d->pe != NULL)
		pinentry_abort(d->pe);          /* the login is over: close the message */
	if (d->kind == D_CONTEXT_PIN) {
		/* The helper holds the PIN; the client's retry spends it. */
		struct tok_prompt *tp = tprompt_get(s, d->uri);
		if (tp != NULL && code == 0) {
			tp->backoff_ms = 0;
			tp->until = 0;
		}
	} else if (d->kind == D_UNLOCK) {
		struct tok_prompt *tp = tprompt_get(s, d->uri);
		if (tp != NULL) {
			if (code == 0) {
				tp->backoff_ms = 0;
				tp->until = 0;
				tp->err[0] = '\0';
			} else if (code == P11A_E_PIN_INCORRECT || code == P11A_E_PIN_INVALID) {
				/* Shown by the next dialog, which only a new request opens. */
				snprintf(tp->err, sizeof(tp->err), "%s", msg && *msg ? msg :
					 p11a_strerror(code));
			}
		}
		log_info("unlock of token '%s' from the PIN dialog: %s", d->label,
			 code == 0 ? "done" : p11a_strerror(code));
	}
	dialog_finish(s, di, code, msg);
	dialogs_run(s);
}

int64_t
prompt_tick(struct server *s, int64_t now, int64_t next)
{
	for (size_t i = 0; i < s->ndialogs;) {
		struct dialog *d = &s->dialogs[i];
		for (size_t j = 0; j < d->nw;) {
			if (d->w[j].deadline > now) {
				if (d->w[j].deadline < next)
					next = d->w[j].deadline;
				j++;
				continue;
			}
			client_reply_arrived(s, d->w[j].ci, d->w[j].serial, P11A_E_TIMEOUT,
					     d->kind == D_UNLOCK || d->kind == D_CONTEXT_PIN ?
					     "nobody entered the PIN in time" :
					     "nobody answered the confirm dialog in time");
			d->w[j] = d->w[--d->nw];
		}
		if (d->stage == ST_QUEUED && d->nw == 0) {
			dialog_remove(s, i);
			continue;
		}
		if (d->stage == ST_OPEN) {
			if (d->abort_at <= now)
				pinentry_abort(d->pe);
			else if (d->abort_at < next)
				next = d->abort_at;
		}
		i++;
	}
	return next;
}

/* ------------------------------------------------------------ requests */

/*
 * The token a URI names for UNLOCK_PROMPT: a key's token (a client sends
 * the key it wants to sign with), else a token; "" is the only token that
 * needs a login.  0 with *hi and *tok set, else the client is answered.
 */
static int
prompt_token(struct server *s, size_t ci, const char *uri, size_t *hi, const struct p11a_token **tok)
{
	struct p11a_uri_matcher *um = NULL;
	const struct p11a_token *found = NULL;
	size_t fh = 0, ntok = 0;
	int err = 0;

	if (*uri && (um = p11a_uri_matcher_new(uri, &err)) == NULL) {
		send_error(s, ci, P11A_E_URI, "'%s' is not a valid pkcs11: URI", uri);
		return -1;
	}
	/* Keys first: every key the URI matches must be on one token. */
	for (size_t i = 0; um != NULL && i < s->nhelpers; i++) {
		const struct p11a_list_reply *inv = &s->helpers[i].inv;
		for (uint32_t k = 0; k < inv->nkeys; k++) {
			const struct p11a_token *t = p11a_list_find_token(inv, inv->keys[k].token_uri);
			if (t == NULL || p11a_uri_match_key(um, t, &inv->keys[k]) != 1)
				continue;
			if (found != NULL && found != t) {
				p11a_uri_matcher_free(um);
				send_error(s, ci, P11A_E_AMBIGUOUS, "keys on several tokens match %s; "
					   "name the token", uri);
				return -1;
			}
			found = t;
			fh = i;
		}
	}
	for (size_t i = 0; found == NULL && i < s->nhelpers; i++) {
		const struct p11a_list_reply *inv = &s->helpers[i].inv;
		for (uint32_t t = 0; t < inv->ntokens; t++) {
			uint32_t f = inv->tokens[t].flags;
			if (um != NULL ? p11a_uri_match_token(um, &inv->tokens[t]) != 1 :
			    !((f & P11A_TOKEN_LOGIN_REQUIRED) && !(f & P11A_TOKEN_LOGGED_IN)))
				continue;
			ntok++;
			*tok = &inv->tokens[t];
			*hi = i;
		}
	}
	p11a_uri_matcher_free(um);
	if (found != NULL) {
		*tok = found;
		*hi = fh;
		return 0;
	}
	if (ntok == 1)
		return 0;
	if (ntok > 1)
		send_error(s, ci, P11A_E_AMBIGUOUS, "%zu tokens %s; name one with its URI", ntok,
			   *uri ? "match" : "need a PIN");
	else if (*uri)
		send_error(s, ci, P11A_E_NO_SUCH_TOKEN, "no key or token matches %s", uri);
	else
		send_error(s, ci, P11A_E_NO_SUCH_TOKEN, "no token needs a PIN");
	return -1;
}

void
handle_unlock_prompt(struct server *s, size_t ci, const char *uri)
{
	const struct p11a_token *t = NULL;
	size_t hi = 0;

	if (prompt_token(s, ci, uri, &hi, &t) != 0)
		return;
	if (!(t->flags & P11A_TOKEN_PRESENT)) {
		send_error(s, ci, P11A_E_TOKEN_NOT_PRESENT, "token '%s' is not present", t->label);
		return;
	}
	if ((t->flags & P11A_TOKEN_LOGGED_IN) || !(t->flags & P11A_TOKEN_LOGIN_REQUIRED)) {
		send_ok(s, ci);
		return;
	}
	if (t->flags & P11A_TOKEN_PIN_LOCKED) {
		send_error(s, ci, P11A_E_PIN_LOCKED, "the user PIN of token '%s' is locked; "
			   "no PIN dialog is shown", t->label);
		return;
	}
	/* Already asked: wait for that dialog. */
	for (size_t i = 0; i < s->ndialogs; i++) {
		struct dialog *d = &s->dialogs[i];
		if (d->kind == D_UNLOCK && strcmp(d->uri, t->uri) == 0) {
			if (waiter_add(s, d, ci) != 0)
				send_error(s, ci, P11A_E_NOMEM, "out of memory");
			else
				log_debug("client %d: waits for the PIN dialog of token '%s'",
					  s->clients[ci].fd, t->label);
			return;
		}
	}
	struct tok_prompt *tp = tprompt_get(s, t->uri);
	int64_t now = p11a_now_ms();
	if (tp != NULL && tp->until > now) {
		char msg[512];

		snprintf(msg, sizeof(msg), "PIN entry for token '%s' was cancelled; no new "
			 "dialog for %lld s (or run 'p11agent unlock')", t->label,
			 (long long)((tp->until - now + 999) / 1000));
		backoff_refuse(s, ci, P11A_EV_PIN_DIALOG, P11A_E_CANCELLED, t->uri, msg);
		return;
	}
	struct dialog *d = dialog_new(s, ci, D_UNLOCK, hi, t->uri, t->label);
	if (d == NULL)
		return;
	if (t->serial && (d->serial = strdup(t->serial)) == NULL) {
		/* The serial only decorates the dialog. */
	}
	dialogs_run(s);
}

/*
 * The one key uri names, with its token and helper; -1 after answering the
 * client (a bad URI, no such key, several).
 */
static int
one_key(struct server *s, size_t ci, const char *uri, size_t *hi,
	const struct p11a_token **tok, const struct p11a_key **key)
{
	struct p11a_uri_matcher *um;
	size_t n = 0;
	int err = 0;

	if ((um = p11a_uri_matcher_new(uri, &err)) == NULL) {
		send_error(s, ci, P11A_E_URI, "'%s' is not a valid pkcs11: URI", uri);
		return -1;
	}
	for (size_t i = 0; i < s->nhelpers; i++) {
		const struct p11a_list_reply *inv = &s->helpers[i].inv;
		for (uint32_t k = 0; k < inv->nkeys; k++) {
			const struct p11a_token *t = p11a_list_find_token(inv, inv->keys[k].token_uri);
			if (t == NULL || p11a_uri_match_key(um, t, &inv->keys[k]) != 1)
				continue;
			n++;
			*key = &inv->keys[k];
			*tok = t;
			*hi = i;
		}
	}
	p11a_uri_matcher_free(um);
	if (n == 1)
		return 0;
	if (n == 0)
		send_error(s, ci, P11A_E_NO_SUCH_KEY, "no such key: %s", uri);
	else
		send_error(s, ci, P11A_E_AMBIGUOUS, "%zu keys match %s", n, uri);
	return -1;
}

void
handle_confirm(struct server *s, size_t ci, const char *uri)
{
	const struct p11a_key *key = NULL;
	const struct p11a_token *tok = NULL;
	size_t hi = 0;

	if (one_key(s, ci, uri, &hi, &tok, &key) != 0)
		return;
	int mode = config_key_confirm(s->cfg, tok, key);
	struct client *c = &s->clients[ci];
	/*
	 * forwarding = confirm: every signature of a forwarded connection is
	 * confirmed here, on the machine the user sits at (the helper holds a
	 * one-shot grant per connection and key, as for confirm = always).
	 */
	int fwd_confirm = c->forwarded &&
			  config_key_forwarding(s->cfg, tok, key) == CONF_FORWARDING_CONFIRM;
	if (fwd_confirm)
		mode = CONFIRM_ALWAYS;
	if (mode == CONFIRM_NO) {
		send_ok(s, ci);         /* nothing to confirm */
		return;
	}
	if (mode == CONFIRM_ONCE) {
		if (prompt_process_confirmed(s, ci, key->uri)) {
			send_ok(s, ci);
			return;
		}
		for (size_t i = 0; i < s->ndialogs; i++) {
			struct dialog *d = &s->dialogs[i];
			if (d->kind == D_CONFIRM_ONCE && d->pid == c->pid && d->start == c->start_time &&
			    strcmp(d->uri, key->uri) == 0) {
				if (waiter_add(s, d, ci) != 0)
					send_error(s, ci, P11A_E_NOMEM, "out of memory");
				return;
			}
		}
	}
	const char *label = key->label && *key->label ? key->label : key->uri;
	struct tok_prompt *tp = confirm_backoff_get(s, c->exe, key->uri, 0);
	int64_t now = p11a_now_ms();
	if (tp != NULL && tp->until > now) {
		char msg[800];

		snprintf(msg, sizeof(msg), "signature with key '%s' refused by the user a moment ago; "
			 "no new dialog for %s for %lld s", label, c->exe ? c->exe : "this program",
			 (long long)((tp->until - now + 999) / 1000));
		backoff_refuse(s, ci, P11A_EV_CONFIRM, P11A_E_NOT_CONFIRMED, key->uri, msg);
		return;
	}
	struct dialog *d = dialog_new(s, ci, mode == CONFIRM_ONCE ? D_CONFIRM_ONCE : D_CONFIRM_ALWAYS,
				      hi, key->uri, label);
	if (d == NULL)
		return;
	d->token_label = tok->label ? strdup(tok->label) : NULL;
	d->forwarded = fwd_confirm;
	log_debug("client %d: confirm dialog for key '%s' queued", c->fd, label);
	dialogs_run(s);
}

/*
 * CONTEXT_PIN: a PIN dialog for one signature with a CKA_ALWAYS_AUTHENTICATE
 * key.  Every request gets its own dialog (each signature needs its PIN);
 * a cancel holds new ones back as for UNLOCK_PROMPT.
 */
void
handle_context_pin(struct server *s, size_t ci, const char *uri)
{
	const struct p11a_key *key = NULL;
	const struct p11a_token *tok = NULL;
	size_t hi = 0;

	if (one_key(s, ci, uri, &hi, &tok, &key) != 0)
		return;
	if (!(key->flags & P11A_KEY_ALWAYS_AUTH)) {
		send_ok(s, ci);         /* an ordinary key: its token's login is enough */
		return;
	}
	if (!(tok->flags & P11A_TOKEN_PRESENT)) {
		send_error(s, ci, P11A_E_TOKEN_NOT_PRESENT, "token '%s' is not present", tok->label);
		return;
	}
	if (tok->flags & P11A_TOKEN_PIN_LOCKED) {
		send_error(s, ci, P11A_E_PIN_LOCKED, "the user PIN of token '%s' is locked; "
			   "no PIN dialog is shown", tok->label);
		return;
	}
	if ((tok->flags & P11A_TOKEN_LOGIN_REQUIRED) && !(tok->flags & P11A_TOKEN_LOGGED_IN)) {
		send_error(s, ci, P11A_E_LOCKED, "token '%s' is locked: unlock it first (UNLOCK_PROMPT "
			   "or 'p11agent unlock')", tok->label);
		return;
	}
	struct tok_prompt *tp = tprompt_get(s, key->uri);
	int64_t now = p11a_now_ms();
	if (tp != NULL && tp->until > now) {
		char msg[512];

		snprintf(msg, sizeof(msg), "PIN entry for key '%s' was cancelled; no new "
			 "dialog for %lld s", key->label && *key->label ? key->label : key->uri,
			 (long long)((tp->until - now + 999) / 1000));
		backoff_refuse(s, ci, P11A_EV_PIN_DIALOG, P11A_E_CANCELLED, key->uri, msg);
		return;
	}
	const char *label = key->label && *key->label ? key->label : key->uri;
	struct dialog *d = dialog_new(s, ci, D_CONTEXT_PIN, hi, key->uri, label);
	if (d == NULL)
		return;
	d->token_label = tok->label ? strdup(tok->label) : NULL;
	dialogs_run(s);
}

int
prompt_process_confirmed(const struct server *s, size_t ci, const char *key_uri)
{
	const struct client *c = &s->clients[ci];

	if (c->pid <= 0)
		return 0;
	for (size_t i = 0; i < s->ngrants; i++)
		if (s->grants[i].pid == c->pid && s->grants[i].start == c->start_time &&
		    strcmp(s->grants[i].key_uri, key_uri) == 0)
			return 1;
	return 0;
}

void
handle_update_env(struct server *s, size_t ci, const struct p11a_update_env *env)
{
	char *copy[sizeof(s->env) / sizeof(s->env[0])];
	size_t n = 0;

	for (uint32_t i = 0; i < env->n; i++) {
		if (!env_known(env->env[i])) {
			char name[64];
			size_t len = strcspn(env->env[i], "=");
			snprintf(name, sizeof(name), "%.*s", (int)(len < 60 ? len : 60), env->env[i]);
			for (size_t j = 0; j < n; j++)
				free(copy[j]);
			send_error(s, ci, P11A_E_BAD_REQUEST, "%s is not a session variable the agent "
				   "passes to pinentry (DISPLAY, WAYLAND_DISPLAY, XAUTHORITY, "
				   "DBUS_SESSION_BUS_ADDRESS, TERM, TTY)", name);
			return;
		}
		if (n == sizeof(copy) / sizeof(copy[0]) || (copy[n] = strdup(env->env[i])) == NULL) {
			for (size_t j = 0; j < n; j++)
				free(copy[j]);
			send_error(s, ci, P11A_E_NOMEM, "out of memory");
			return;
		}
		n++;
	}
	env_clear(s);
	memcpy(s->env, copy, n * sizeof(copy[0]));
	s->nenv = n;
	log_info("client %d (pid %ld): the session for PIN dialogs is now: %zu variable(s)",
		 s->clients[ci].fd, (long)s->clients[ci].pid, n);
	send_ok(s, ci);
}
