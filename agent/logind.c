/* logind on the system bus: lock on suspend and on screen lock (see logind.h). */
#include "config.h"
#include "logind.h"
#include "log.h"
#include "p11a.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#ifdef HAVE_SYSTEMD
#include <poll.h>
#include <systemd/sd-bus.h>

#define LOGIND_NAME        "org.freedesktop.login1"
#define LOGIND_PATH        "/org/freedesktop/login1"
#define LOGIND_MANAGER     "org.freedesktop.login1.Manager"
#define LOGIND_SESSION     "org.freedesktop.login1.Session"
#define LOGIND_SESSIONS    "/org/freedesktop/login1/session"
#define RETRY_MIN_MS       1000
#define RETRY_MAX_MS       60000

struct logind {
	int on_suspend, on_screen_lock;
	uid_t uid;
	logind_lock_fn fn;
	void *arg;
	sd_bus *bus;               /* NULL = not connected */
	int matches_wanted, matches_done;
	int64_t retry_at;          /* not connected: try again at this time */
	int retry_ms;
	int failed_logged;         /* the bus is gone: said once, quiet until it is back */
};

/* A session whose owner we ask before locking: what happened to it. */
struct session_query {
	struct logind *l;
	char id[64];               /* logind's session id ("3") */
	const char *event;         /* "locked", "LockedHint" */
};

/* No flush: nothing we send matters, and a stalled bus must not stall the loop. */
static void
bus_close(struct logind *l)
{
	if (l->bus) {
		sd_bus_close(l->bus);
		l->bus = sd_bus_unref(l->bus);
	}
}

static void
bus_drop(struct logind *l, const char *why, int err)
{
	if (!l->failed_logged) {
		log_warn("system bus: %s: %s; going on without logind (no lock on %s%s%s) and "
			 "trying again now and then", why, strerror(err),
			 l->on_suspend ? "suspend" : "", l->on_suspend && l->on_screen_lock ? " or " : "",
			 l->on_screen_lock ? "screen lock" : "");
		l->failed_logged = 1;
	} else {
		log_debug("system bus: %s: %s", why, strerror(err));
	}
	bus_close(l);
	l->retry_at = p11a_now_ms() + l->retry_ms;
	l->retry_ms = l->retry_ms * 2 > RETRY_MAX_MS ? RETRY_MAX_MS : l->retry_ms * 2;
}

/* The reply to Properties.Get(Session, "User"): lock when the session is ours. */
static int
on_session_user(sd_bus_message *m, void *userdata, sd_bus_error *ret_error)
{
	struct session_query *q = userdata;
	uint32_t uid;
	const char *upath;
	int r;

	(void)ret_error;
	if (sd_bus_message_is_method_error(m, NULL)) {
		const sd_bus_error *e = sd_bus_message_get_error(m);
		log_debug("logind: session %s: cannot read its User: %s", q->id,
			  e && e->message ? e->message : "error");
		return 0;
	}
	r = sd_bus_message_enter_container(m, 'v', "(uo)");
	if (r >= 0)
		r = sd_bus_message_read(m, "(uo)", &uid, &upath);
	if (r < 0) {
		log_debug("logind: session %s: its User is not (uo): %s", q->id, strerror(-r));
		return 0;
	}
	if ((uid_t)uid != q->l->uid) {
		log_debug("logind: session %s of uid %u %s: not ours", q->id, (unsigned)uid,
			  q->event);
		return 0;
	}
	char why[128];
	snprintf(why, sizeof(why), "session %s %s", q->id, q->event);
	q->l->fn(q->l->arg, why);
	return 0;
}

/* Asks who owns the session at path; locks in on_session_user() when we do. */
static void
session_check(struct logind *l, const char *path, const char *event)
{
	struct session_query *q = calloc(1, sizeof(*q));
	char *id = NULL;
	sd_bus_slot *slot = NULL;
	int r;

	if (!q) {
		log_err("logind: out of memory");
		return;
	}
	q->l = l;
	q->event = event;
	if (sd_bus_path_decode(path, LOGIND_SESSIONS, &id) > 0 && id) {
		snprintf(q->id, sizeof(q->id), "%s", id);
		free(id);
	} else {
		snprintf(q->id, sizeof(q->id), "%s", path);
	}
	r = sd_bus_call_method_async(l->bus, &slot, LOGIND_NAME, path,
				     "org.freedesktop.DBus.Properties", "Get", on_session_user, q,
				     "ss", LOGIND_SESSION, "User");
	if (r < 0) {
		log_warn("logind: session %s %s: cannot ask whose it is: %s", q->id, event,
			 strerror(-r));
		free(q);
		return;
	}
	/* The bus keeps the call; q goes with it (reply, error or disconnect). */
	sd_bus_slot_set_destroy_callback(slot, free);
	sd_bus_slot_set_floating(slot, 1);
	sd_bus_slot_unref(slot);
}

static int
on_prepare_for_sleep(sd_bus_message *m, void *userdata, sd_bus_error *ret_error)
{
	struct logind *l = userdata;
	int start;

	(void)ret_error;
	if (sd_bus_message_read(m, "b", &start) < 0) {
		log_debug("logind: PrepareForSleep without a boolean: ignored");
		return 0;
	}
	log_debug("logind: PrepareForSleep(%s)", start ? "true" : "false");
	if (start)
		l->fn(l->arg, "PrepareForSleep");
	return 0;
}

static int
on_session_lock(sd_bus_message *m, void *userdata, sd_bus_error *ret_error)
{
	(void)ret_error;
	session_check(userdata, sd_bus_message_get_path(m), "locked");
	return 0;
}

/* PropertiesChanged of a session: its LockedHint turned true. */
static int
on_session_properties(sd_bus_message *m, void *userdata, sd_bus_error *ret_error)
{
	const char *iface, *name;
	int r, locked = 0;

	(void)ret_error;
	if ((r = sd_bus_message_read(m, "s", &iface)) < 0 || strcmp(iface, LOGIND_SESSION) != 0)
		return 0;
	if ((r = sd_bus_message_enter_container(m, 'a', "{sv}")) < 0)
		return 0;
	while ((r = sd_bus_message_enter_container(m, 'e', "sv")) > 0) {
		if (sd_bus_message_read(m, "s", &name) < 0)
			return 0;
		if (strcmp(name, "LockedHint") == 0) {
			if (sd_bus_message_read(m, "v", "b", &locked) < 0)
				return 0;
		} else if (sd_bus_message_skip(m, "v") < 0) {
			return 0;
		}
		if (sd_bus_message_exit_container(m) < 0)
			return 0;
	}
	if (locked)
		session_check(userdata, sd_bus_message_get_path(m), "locked (LockedHint)");
	return 0;
}

/* One match installed (or refused): once all are, say we listen. */
static int
on_match_installed(sd_bus_message *m, void *userdata, sd_bus_error *ret_error)
{
	struct logind *l = userdata;

	(void)ret_error;
	if (sd_bus_message_is_method_error(m, NULL)) {
		const sd_bus_error *e = sd_bus_message_get_error(m);
		log_warn("system bus: a match for logind's signals was refused: %s",
			 e && e->message ? e->message : "error");
		return 0;
	}
	if (++l->matches_done == l->matches_wanted)
		log_info("logind: listening on the system bus (lock on %s%s%s)",
			 l->on_suspend ? "suspend" : "",
			 l->on_suspend && l->on_screen_lock ? " and " : "",
			 l->on_screen_lock ? "screen lock" : "");
	return 0;
}

static int
add_match(struct logind *l, const char *rule, sd_bus_message_handler_t cb)
{
	int r = sd_bus_add_match_async(l->bus, NULL, rule, cb, on_match_installed, l);
	if (r >= 0)
		l->matches_wanted++;
	return r;
}

static void
bus_connect(struct logind *l)
{
	int r;

	l->matches_wanted = l->matches_done = 0;
	/* Authentication and Hello go on in the loop: nothing here waits for the bus. */
	r = sd_bus_open_system(&l->bus);
	if (r < 0) {
		l->bus = NULL;
		bus_drop(l, "cannot connect", -r);
		return;
	}
	/* A lost bus is noticed, logged and retried; it never ends the agent. */
	(void)sd_bus_set_exit_on_disconnect(l->bus, 0);
	if (l->on_suspend && (r = add_match(l, "type='signal',sender='" LOGIND_NAME "',path='"
					    LOGIND_PATH "',interface='" LOGIND_MANAGER "',"
					    "member='PrepareForSleep'", on_prepare_for_sleep)) < 0)
		goto fail;
	if (l->on_screen_lock &&
	    ((r = add_match(l, "type='signal',sender='" LOGIND_NAME "',path_namespace='"
			    LOGIND_SESSIONS "',interface='" LOGIND_SESSION "',member='Lock'",
			    on_session_lock)) < 0 ||
	     (r = add_match(l, "type='signal',sender='" LOGIND_NAME "',path_namespace='"
			    LOGIND_SESSIONS "',interface='org.freedesktop.DBus.Properties',"
			    "member='PropertiesChanged',arg0='" LOGIND_SESSION "'",
			    on_session_properties)) < 0))
		goto fail;
	log_debug("system bus: connecting");
	return;
fail:
	bus_drop(l, "cannot add a match for logind's signals", -r);
}

struct logind *
logind_new(const struct agent_config *cfg, uid_t uid, logind_lock_fn fn, void *arg)
{
	struct logind *l;

	if (!cfg->lock_on_suspend && !cfg->lock_on_screen_lock)
		return NULL;
	if (!(l = calloc(1, sizeof(*l)))) {
		log_err("logind: out of memory");
		return NULL;
	}
	l->on_suspend = cfg->lock_on_suspend;
	l->on_screen_lock = cfg->lock_on_screen_lock;
	l->uid = uid;
	l->fn = fn;
	l->arg = arg;
	l->retry_ms = RETRY_MIN_MS;
	bus_connect(l);
	return l;
}

void
logind_free(struct logind *l)
{
	if (!l)
		return;
	bus_close(l);
	free(l);
}

int
logind_poll_fd(struct logind *l, short *events, int64_t *next)
{
	uint64_t usec;
	int fd, ev;

	*events = 0;
	if (!l)
		return -1;
	if (!l->bus) {
		if (l->retry_at < *next)
			*next = l->retry_at;
		return -1;
	}
	fd = sd_bus_get_fd(l->bus);
	ev = sd_bus_get_events(l->bus);
	if (fd < 0 || ev < 0) {
		/* Closed: logind_process() notices and schedules the retry. */
		*next = 0;
		return -1;
	}
	*events = (short)ev;
	if (sd_bus_get_timeout(l->bus, &usec) >= 0 && usec != UINT64_MAX) {
		int64_t ms = (int64_t)((usec + 999) / 1000);
		if (ms < *next)
			*next = ms;
	}
	return fd;
}

void
logind_process(struct logind *l, int64_t now)
{
	int r;

	if (!l)
		return;
	if (!l->bus) {
		if (now >= l->retry_at)
			bus_connect(l);
		return;
	}
	/*
	 * What the bus sent, a bounded batch per pass so a flood cannot starve
	 * the clients; what is left makes sd_bus_get_timeout() say "now".
	 */
	int budget = 64;
	while ((r = sd_bus_process(l->bus, NULL)) > 0 && --budget > 0)
		;
	if (r < 0) {
		bus_drop(l, "lost the connection", -r);
		return;
	}
	if (!sd_bus_is_open(l->bus)) {
		bus_drop(l, "lost the connection", ECONNRESET);
		return;
	}
	if (l->failed_logged && l->matches_done == l->matches_wanted) {
		log_info("system bus: connected again");
		l->failed_logged = 0;
		l->retry_ms = RETRY_MIN_MS;
	}
}

#else /* !HAVE_SYSTEMD */

struct logind *
logind_new(const struct agent_config *cfg, uid_t uid, logind_lock_fn fn, void *arg)
{
	(void)uid;
	(void)fn;
	(void)arg;
	if (cfg->lock_on_suspend || cfg->lock_on_screen_lock)
		log_debug("built without libsystemd: no lock on suspend or screen lock");
	return NULL;
}

void
logind_free(struct logind *l)
{
	(void)l;
}

int
logind_poll_fd(struct logind *l, short *events, int64_t *next)
{
	(void)l;
	(void)next;
	*events = 0;
	return -1;
}

void
logind_process(struct logind *l, int64_t now)
{
	(void)l;
	(void)now;
}

#endif
