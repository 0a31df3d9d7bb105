/*
 * Login and lock: picking the tokens a URI names, C_Login once per
 * UNLOCK (never retried), C_Logout per LOCK, and the automatic locks
 * (idle-lock, pin-ttl) the helper's control loop asks for.
 */
#include "config.h"
#include "token-int.h"
#include "log.h"
#include "p11a.h"
#include "uri.h"

#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>


/*
 * Tokens that uri names.  For "" and want_login: the one token that needs
 * a login and lacks it (*n = 0 and 0 returned when all are logged in).
 * For "" otherwise: every present token.
 */
static int
tokens_pick(struct token_module *m, const char *uri, int want_login, struct tok_slot **sel,
	    size_t *n, char *msg, size_t msg_size)
{
	struct p11a_uri_matcher *um;
	struct tok_slot *absent = NULL;
	size_t i, need = 0, login_tokens = 0;
	int err = 0;

	*n = 0;
	if (uri == NULL || uri[0] == '\0') {
		for (i = 0; i < m->nslots; i++) {
			struct tok_slot *s = m->slots[i];
			if (!s->present) {
				if (s->known && (s->ti.flags & CKF_LOGIN_REQUIRED))
					absent = s;
				continue;
			}
			if (!want_login) {
				sel[(*n)++] = s;
				continue;
			}
			if (!(s->ti.flags & CKF_LOGIN_REQUIRED))
				continue;
			login_tokens++;
			if (!s->logged_in) {
				need++;
				sel[0] = s;
			}
		}
		if (!want_login)
			return 0;
		if (need > 1) {
			tok_set_msg(msg, msg_size, "%zu tokens of module %s need a login; "
				"name one with a pkcs11: URI", need, m->name);
			return -P11A_E_AMBIGUOUS;
		}
		if (need == 0 && login_tokens == 0 && absent != NULL) {
			tok_set_msg(msg, msg_size, "token '%s' is not present", absent->tok.label);
			return -P11A_E_TOKEN_NOT_PRESENT;
		}
		if (need == 0 && login_tokens == 0) {
			tok_set_msg(msg, msg_size, "no token of module %s needs a login", m->name);
			return -P11A_E_NO_SUCH_TOKEN;
		}
		*n = need;
		return 0;
	}
	if ((um = p11a_uri_matcher_new(uri, &err)) == NULL) {
		tok_set_msg(msg, msg_size, "'%.200s' is not a valid pkcs11: URI", uri);
		return err != 0 ? err : -P11A_E_URI;
	}
	for (i = 0; i < m->nslots; i++) {
		struct tok_slot *s = m->slots[i];
		if (s->known && p11a_uri_match_token(um, &s->tok) == 1)
			sel[(*n)++] = s;
	}
	p11a_uri_matcher_free(um);
	if (*n == 0) {
		tok_set_msg(msg, msg_size, "no token of module %s matches %.200s", m->name, uri);
		return -P11A_E_NO_SUCH_TOKEN;
	}
	if (want_login && *n > 1) {
		tok_set_msg(msg, msg_size, "%zu tokens match %.200s", *n, uri);
		return -P11A_E_AMBIGUOUS;
	}
	return 0;
}

int
token_unlock(struct token_module *m, const char *token_uri, const char *pin, size_t pin_len,
	     int *tried, char *msg, size_t msg_size)
{
	struct tok_slot *sel[SLOT_MAX], *s;
	CK_SESSION_HANDLE h;
	CK_TOKEN_INFO ti;
	const char *label;
	unsigned gen;
	size_t n;
	int r, logged_in = 0, drop = 0, before_known = 0, after_known, refused;
	CK_FLAGS pin_before = 0;
	char nb[48];
	CK_RV rv;

	*tried = 0;
	if ((r = tokens_pick(m, token_uri, 1, sel, &n, msg, msg_size)) != 0)
		return r;
	if (n == 0)
		return 0;       /* every token that needs a login has one */
	s = sel[0];
	label = s->tok.label;
	if (!s->present) {
		tok_set_msg(msg, msg_size, "token '%s' is not present", label);
		return -P11A_E_TOKEN_NOT_PRESENT;
	}
	rv = tok_ctl_session_state(m, s, &h, &gen, &logged_in);
	if (rv == CKR_FUNCTION_CANCELED) {
		tok_set_msg(msg, msg_size, "token '%s' is busy; try again", label);
		return -P11A_E_TIMEOUT;
	}
	if (rv != CKR_OK)
		return tok_fail_rv(msg, msg_size, label, "cannot open a session", rv);
	if (logged_in) {
		tok_ctl_session_put(m, s, h, gen, 0);
		return 0;
	}
	/* The PIN flags before the one C_Login, to tell afterwards what it cost. */
	if (m->f->C_GetTokenInfo(s->id, &ti) == CKR_OK) {
		before_known = 1;
		pin_before = ti.flags;
	}
	*tried = 1;
	if ((s->ti.flags & CKF_PROTECTED_AUTHENTICATION_PATH) && pin_len == 0) {
		log_info("token '%s': PIN entry on the reader's keypad", label);
		rv = m->f->C_Login(h, CKU_USER, NULL, 0);
	} else {
		/* The module reads the PIN in place; no copy to wipe. */
		rv = m->f->C_Login(h, CKU_USER, (CK_UTF8CHAR_PTR)(uintptr_t)pin, (CK_ULONG)pin_len);
	}
	switch (rv) {
	case CKR_OK:
	case CKR_USER_ALREADY_LOGGED_IN:
		atomic_fetch_add(&s->kgen, 1);
		s->login_ms = p11a_now_ms();    /* pin-ttl and idle-lock count from here */
		log_info("token '%s' logged in", label);
		r = 0;
		break;
	case CKR_PIN_LEN_RANGE:
	case CKR_PIN_INVALID:
		if (s->ti.ulMaxPinLen != CK_UNAVAILABLE_INFORMATION && s->ti.ulMaxPinLen != 0)
			tok_set_msg(msg, msg_size, "PIN for token '%s' has an invalid length or "
				"characters (%lu to %lu characters)", label,
				(unsigned long)s->ti.ulMinPinLen, (unsigned long)s->ti.ulMaxPinLen);
		else
			tok_set_msg(msg, msg_size, "PIN for token '%s' has an invalid length or characters",
				label);
		r = tok_rv_err(rv);
		break;
	default:
		drop = tok_rv_session_gone(rv);
		if (tok_rv_token_gone(rv)) {
			r = tok_rv_err(rv);
			tok_set_msg(msg, msg_size, "token '%s' is not present", label);
			break;
		}
		/*
		 * Was it the PIN?  The code alone may not say (OpenSC gives
		 * CKR_GENERAL_ERROR on some cards): compare the PIN flags.
		 */
		after_known = before_known &&
		    m->f->C_GetTokenInfo(s->id, &ti) == CKR_OK;
		r = tok_login_failure(rv, after_known, pin_before, after_known ? ti.flags : 0, label,
				      msg, msg_size, &refused);
		if (refused)
			log_warn("%s", msg);
		else
			log_warn("token '%s': C_Login failed: %s", label,
				 tok_ckr_name(rv, nb, sizeof(nb)));
		break;
	}
	tok_ctl_session_put(m, s, h, gen, drop);
	return r;
}

/*
 * C_Logout on s when it is logged in (the key generation is bumped first:
 * logging out destroys private session objects, the key copies).  Sets
 * *was_in.  CKR_OK also when it was not logged in or the session is gone
 * (nothing is logged in then either); CKR_FUNCTION_CANCELED when the
 * token stayed busy.
 */
/* How long a logout waits for signatures in flight (a smartcard takes ~1 s). */
#define LOGOUT_WAIT_MS 2000

static CK_RV
slot_logout(struct token_module *m, struct tok_slot *s, int *was_in)
{
	CK_SESSION_HANDLE h;
	unsigned gen;
	int logged_in = 0;
	CK_RV rv;

	*was_in = 0;
	rv = tok_ctl_session_state(m, s, &h, &gen, &logged_in);
	if (rv != CKR_OK)
		return rv == CKR_FUNCTION_CANCELED ? rv : CKR_OK;
	if (logged_in) {
		int64_t until = p11a_now_ms() + LOGOUT_WAIT_MS;

		atomic_fetch_add(&s->kgen, 1);
		/* No signer may be inside C_Sign with a copy C_Logout destroys. */
		atomic_store(&s->logging_out, 1);
		while (atomic_load(&s->signing) > 0 && p11a_now_ms() < until) {
			struct timespec ts = { 0, 1000000 };

			nanosleep(&ts, NULL);
		}
		if (atomic_load(&s->signing) > 0)
			log_warn("token '%s': a signature still runs after %d ms; logging out anyway",
				 s->tok.label, LOGOUT_WAIT_MS);
		rv = m->f->C_Logout(h);
		atomic_store(&s->logging_out, 0);
	}
	tok_ctl_session_put(m, s, h, gen, tok_rv_session_gone(rv));
	if (rv == CKR_OK || rv == CKR_USER_NOT_LOGGED_IN || tok_rv_session_gone(rv)) {
		*was_in = logged_in;
		s->login_ms = 0;
		return CKR_OK;
	}
	return rv;
}

int
token_lock(struct token_module *m, const char *token_uri, char *msg, size_t msg_size)
{
	struct tok_slot *sel[SLOT_MAX], *s;
	size_t n, i;
	int r, first = 0, was_in;
	CK_RV rv;

	if ((r = tokens_pick(m, token_uri, 0, sel, &n, msg, msg_size)) != 0)
		return r;
	for (i = 0; i < n; i++) {
		s = sel[i];
		if (!s->present)
			continue;
		rv = slot_logout(m, s, &was_in);
		if (rv == CKR_OK) {
			if (was_in)
				log_info("token '%s' logged out", s->tok.label);
			continue;
		}
		if (first != 0)
			continue;
		if (rv == CKR_FUNCTION_CANCELED) {
			tok_set_msg(msg, msg_size, "token '%s' is busy; try again", s->tok.label);
			first = -P11A_E_TIMEOUT;
		} else {
			first = tok_fail_rv(msg, msg_size, s->tok.label, "C_Logout", rv);
		}
	}
	return first;
}

/* ------------------------------------------------------------ automatic locking */

void
tok_login_seen(struct tok_slot *s, int logged_in)
{
	if (!logged_in)
		s->login_ms = 0;
	else if (s->login_ms == 0)
		s->login_ms = p11a_now_ms();
}

#define AUTOLOCK_RETRY_MS 1000  /* a token busy signing: try to lock it again this soon */

int
token_autolock(struct token_module *m, int64_t now, int64_t idle_ms, int64_t ttl_ms,
	       int64_t *next, void (*locked_cb)(void *arg, const char *token_uri, const char *reason),
	       void *arg)
{
	int locked = 0, was_in;

	if (idle_ms <= 0 && ttl_ms <= 0)
		return 0;
	/* The slot table and login state are the control thread's: no m->lock to read them. */
	for (size_t i = 0; i < m->nslots; i++) {
		struct tok_slot *s = m->slots[i];
		int64_t idle_at = INT64_MAX, ttl_at = INT64_MAX, last;
		char d[32], why[64];
		CK_RV rv;

		if (!s->present || !s->logged_in || s->login_ms == 0)
			continue;
		if (ttl_ms > 0)
			ttl_at = s->login_ms + ttl_ms;
		if (idle_ms > 0) {
			last = atomic_load_explicit(&s->last_sign_ms, memory_order_relaxed);
			idle_at = (last > s->login_ms ? last : s->login_ms) + idle_ms;
		}
		if (now < ttl_at && now < idle_at) {
			int64_t at = ttl_at < idle_at ? ttl_at : idle_at;
			if (at < *next)
				*next = at;
			continue;
		}
		if (now >= ttl_at) {
			config_format_duration(ttl_ms, d, sizeof(d));
			snprintf(why, sizeof(why), "PIN kept %s (pin-ttl)", d);
		} else {
			config_format_duration(idle_ms, d, sizeof(d));
			snprintf(why, sizeof(why), "idle for %s (idle-lock)", d);
		}
		rv = slot_logout(m, s, &was_in);
		if (rv == CKR_OK) {
			log_info("token '%s' locked: %s", s->tok.label, why);
			if (locked_cb != NULL)
				locked_cb(arg, s->tok.uri, now >= ttl_at ? "pin-ttl" : "idle");
			locked++;
			continue;
		}
		char nb[48];
		log_warn("token '%s': cannot lock it (%s): %s; trying again", s->tok.label, why,
			 rv == CKR_FUNCTION_CANCELED ? "busy" : tok_ckr_name(rv, nb, sizeof(nb)));
		if (now + AUTOLOCK_RETRY_MS < *next)
			*next = now + AUTOLOCK_RETRY_MS;
	}
	return locked;
}
