/*
 * Slots and token state: the slot table, reading a token (identity,
 * flags, login state, mechanisms, keys) into its slot, noticing removal
 * and changes (token_refresh, token_check), and the inventory copy the
 * helper sends (token_inventory).
 */
#include "config.h"
#include "token-int.h"
#include "log.h"
#include "p11a.h"
#include "proto.h"
#include "uri.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* PKCS#11 text field -> C string: cut at the first NUL, drop trailing blanks. */
static char *
pad_text(const unsigned char *p, size_t n)
{
	size_t len = 0;
	char *s;

	while (len < n && p[len] != '\0')
		len++;
	while (len > 0 && p[len - 1] == ' ')
		len--;
	if ((s = malloc(len + 1)) == NULL)
		return NULL;
	memcpy(s, p, len);
	s[len] = '\0';
	return s;
}

static uint32_t
token_flags(const CK_TOKEN_INFO *ti, int present, int logged_in)
{
	uint32_t f = 0;

	if (present)
		f |= P11A_TOKEN_PRESENT;
	if (present && logged_in)
		f |= P11A_TOKEN_LOGGED_IN;
	if (ti->flags & CKF_LOGIN_REQUIRED)
		f |= P11A_TOKEN_LOGIN_REQUIRED;
	if (ti->flags & CKF_USER_PIN_COUNT_LOW)
		f |= P11A_TOKEN_PIN_COUNT_LOW;
	if (ti->flags & CKF_USER_PIN_FINAL_TRY)
		f |= P11A_TOKEN_PIN_FINAL_TRY;
	if (ti->flags & CKF_USER_PIN_LOCKED)
		f |= P11A_TOKEN_PIN_LOCKED;
	if (ti->flags & CKF_PROTECTED_AUTHENTICATION_PATH)
		f |= P11A_TOKEN_PROTECTED_PATH;
	return f;
}

static int
same_token(const CK_TOKEN_INFO *a, const CK_TOKEN_INFO *b)
{
	return memcmp(a->label, b->label, sizeof(a->label)) == 0 &&
	    memcmp(a->manufacturerID, b->manufacturerID, sizeof(a->manufacturerID)) == 0 &&
	    memcmp(a->model, b->model, sizeof(a->model)) == 0 &&
	    memcmp(a->serialNumber, b->serialNumber, sizeof(a->serialNumber)) == 0;
}

static unsigned
mechs_read(struct token_module *m, CK_SLOT_ID slot)
{
	CK_MECHANISM_TYPE *v = NULL;
	CK_ULONG n = 0;
	unsigned mechs = 0;
	CK_RV rv;

	rv = m->f->C_GetMechanismList(slot, NULL, &n);
	if (rv != CKR_OK || n == 0 || n > 4096)
		return MECH_ALL;        /* unknown: let C_SignInit decide */
	/*
	 * One spare element: p11-kit's RPC client (p11-kit-client.so, 0.24 in
	 * Debian 12) drops the mechanisms it cannot carry with a memmove that
	 * reads one element past the list (fixed in later p11-kit; ASan showed
	 * it in tests/tokens' p11kit column).
	 */
	if ((v = calloc(n + 1, sizeof(*v))) == NULL)
		return MECH_ALL;
	rv = m->f->C_GetMechanismList(slot, v, &n);
	if (rv != CKR_OK) {
		free(v);
		return MECH_ALL;
	}
	for (CK_ULONG i = 0; i < n; i++) {
		switch (v[i]) {
		case CKM_RSA_PKCS: mechs |= MECH_RSA_PKCS; break;
		case CKM_RSA_PKCS_PSS: mechs |= MECH_RSA_PSS; break;
		case CKM_RSA_X_509: mechs |= MECH_RSA_X509; break;
		case CKM_ECDSA: mechs |= MECH_ECDSA; break;
		case CKM_EDDSA: mechs |= MECH_EDDSA; break;
		default: break;
		}
	}
	free(v);
	return mechs;
}

static struct tok_slot *
slot_find(struct token_module *m, CK_SLOT_ID id)
{
	for (size_t i = 0; i < m->nslots; i++) {
		if (m->slots[i]->id == id)
			return m->slots[i];
	}
	return NULL;
}

static struct tok_slot *
slot_add(struct token_module *m, CK_SLOT_ID id)
{
	struct tok_slot *s;
	pthread_condattr_t ca;

	if (m->nslots >= SLOT_MAX || (s = calloc(1, sizeof(*s))) == NULL)
		return NULL;
	s->id = id;
	s->kept = CK_INVALID_HANDLE;
	s->cap = 1;
	s->mechs = MECH_ALL;
	pthread_mutex_init(&s->plock, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&s->pcond, &ca);
	pthread_condattr_destroy(&ca);
	pthread_mutex_lock(&m->lock);
	m->slots[m->nslots++] = s;
	atomic_fetch_add(&m->igen, 1);
	pthread_mutex_unlock(&m->lock);
	return s;
}

/*
 * 1 when this process has (nearly) no descriptor left: a few must open.
 * Decisions about the token are not made on what a module says then.
 */
static int
fds_exhausted(void)
{
	int fds[4], n, bad = 0;

	for (n = 0; n < 4; n++) {
		if ((fds[n] = open("/dev/null", O_RDONLY | O_CLOEXEC)) < 0) {
			bad = errno == EMFILE || errno == ENFILE;
			break;
		}
	}
	while (n > 0)
		close(fds[--n]);
	return bad;
}

/* The token left the slot: keep listing it (and its keys) as not present. */
static void
slot_gone(struct token_module *m, struct tok_slot *s)
{
	if (!s->present)
		return;
	log_info("token '%s' in slot %lu is gone", s->tok.label ? s->tok.label : "",
		 (unsigned long)s->id);
	tok_slot_reset_sessions(m, s);
	pthread_mutex_lock(&m->lock);
	atomic_fetch_add(&s->kgen, 1);
	atomic_fetch_add(&m->igen, 1);
	s->present = 0;
	s->logged_in = 0;
	tok_login_seen(s, 0);
	s->tok.flags &= ~(P11A_TOKEN_PRESENT | P11A_TOKEN_LOGGED_IN);
	for (size_t i = 0; i < s->nkeys; i++) {
		s->keys[i].priv = CK_INVALID_HANDLE;
		s->keys[i].k.flags &= ~P11A_KEY_PRIVATE_VISIBLE;
	}
	pthread_mutex_unlock(&m->lock);
}

static int
token_record(struct token_module *m, const CK_TOKEN_INFO *ti, uint32_t flags, struct p11a_token *t)
{
	memset(t, 0, sizeof(*t));
	t->uri = p11a_uri_format_token(ti);
	t->label = pad_text(ti->label, sizeof(ti->label));
	t->manufacturer = pad_text(ti->manufacturerID, sizeof(ti->manufacturerID));
	t->model = pad_text(ti->model, sizeof(ti->model));
	t->serial = pad_text(ti->serialNumber, sizeof(ti->serialNumber));
	t->module = strdup(m->name);
	t->flags = flags;
	if (t->uri == NULL || t->label == NULL || t->manufacturer == NULL || t->model == NULL ||
	    t->serial == NULL || t->module == NULL) {
		p11a_token_clear(t);
		return -P11A_E_NOMEM;
	}
	return 0;
}

/*
 * Reads the token in s and swaps the new state in.  Returns the CK_RV
 * that stopped it (the old keys then stay).
 */
static CK_RV
slot_scan(struct token_module *m, struct tok_slot *s)
{
	CK_TOKEN_INFO ti;
	CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
	struct p11a_token tok;
	struct tok_key *keys = NULL, *old_keys;
	size_t nkeys = 0, old_n;
	unsigned gen = 0, mechs;
	int logged_in = 0, visible;
	CK_RV rv;

	rv = m->f->C_GetTokenInfo(s->id, &ti);
	if (tok_rv_token_gone(rv) || (rv == CKR_OK && !(ti.flags & CKF_TOKEN_INITIALIZED))) {
		slot_gone(m, s);
		return CKR_OK;
	}
	/* Any other failure says nothing about the card: keep what we know. */
	if (rv != CKR_OK)
		return rv;
	if (!s->present || !s->known || !same_token(&s->ti, &ti))
		tok_slot_reset_sessions(m, s);
	tok_slot_configure_pool(s, &ti, m->pool_max);
	if ((rv = tok_ctl_session_state(m, s, &h, &gen, &logged_in)) != CKR_OK)
		goto fail;
	if (!s->mechs_read) {
		mechs = mechs_read(m, s->id);
		s->mechs_read = 1;
		pthread_mutex_lock(&m->lock);
		s->mechs = mechs;
		atomic_fetch_add(&m->igen, 1);
		pthread_mutex_unlock(&m->lock);
	}
	if (token_record(m, &ti, token_flags(&ti, 1, logged_in), &tok) != 0) {
		tok_ctl_session_put(m, s, h, gen, 0);
		return CKR_HOST_MEMORY;
	}
	visible = logged_in || !(ti.flags & CKF_LOGIN_REQUIRED);
	rv = tok_keys_read(m, h, &ti, tok.uri, visible, &keys, &nkeys);
	tok_ctl_session_put(m, s, h, gen, tok_rv_session_gone(rv));
	if (rv != CKR_OK) {
		p11a_token_clear(&tok);
		goto fail;
	}
	if (!s->present)
		log_info("token '%s' in slot %lu: %zu key(s)%s", tok.label, (unsigned long)s->id,
			 nkeys, logged_in ? ", logged in" : "");
	pthread_mutex_lock(&m->lock);
	/* Handles may mean other keys now: session copies and key memos start over. */
	atomic_fetch_add(&s->kgen, 1);
	atomic_fetch_add(&m->igen, 1);
	p11a_token_clear(&s->tok);
	s->tok = tok;
	s->ti = ti;
	s->known = 1;
	s->present = 1;
	s->logged_in = logged_in;
	tok_login_seen(s, logged_in);
	old_keys = s->keys;
	old_n = s->nkeys;
	s->keys = keys;
	s->nkeys = nkeys;
	pthread_mutex_unlock(&m->lock);
	tok_keys_free(old_keys, old_n);
	return CKR_OK;
 fail:
	if (tok_rv_token_gone(rv)) {
		slot_gone(m, s);
		return CKR_OK;
	}
	return rv;
}

static CK_RV
slot_list(struct token_module *m, CK_SLOT_ID **out, CK_ULONG *count)
{
	CK_SLOT_ID *v = NULL, *nv;
	CK_ULONG n = 0;
	CK_RV rv;

	*out = NULL;
	*count = 0;
	for (int attempt = 0; attempt < 4; attempt++) {
		rv = m->f->C_GetSlotList(CK_TRUE, NULL, &n);
		if (rv != CKR_OK)
			break;
		if (n == 0) {
			free(v);
			return CKR_OK;
		}
		if (n > SLOT_MAX)
			n = SLOT_MAX;
		if ((nv = realloc(v, n * sizeof(*v))) == NULL) {
			rv = CKR_HOST_MEMORY;
			break;
		}
		v = nv;
		rv = m->f->C_GetSlotList(CK_TRUE, v, &n);
		if (rv == CKR_OK) {
			*out = v;
			*count = n;
			return CKR_OK;
		}
		if (rv != CKR_BUFFER_TOO_SMALL)
			break;
	}
	free(v);
	return rv;
}

int
token_refresh(struct token_module *m)
{
	CK_SLOT_ID *ids = NULL;
	CK_ULONG n = 0, i;
	struct tok_slot *s;
	char nb[48];
	CK_RV rv;
	size_t j;

	/*
	 * Out of descriptors, a module fails in its own words (SoftHSM2:
	 * CKR_GENERAL_ERROR, or no token in a directory it cannot open) and
	 * may not recover: look again once descriptors are back.
	 */
	if (fds_exhausted()) {
		log_warn("out of file descriptors: token state not read now");
		return -P11A_E_BUSY;
	}
	rv = slot_list(m, &ids, &n);
	if (rv != CKR_OK) {
		log_err("C_GetSlotList: %s", tok_ckr_name(rv, nb, sizeof(nb)));
		return -P11A_E_TOKEN;
	}
	for (i = 0; i < n; i++) {
		if ((s = slot_find(m, ids[i])) == NULL && (s = slot_add(m, ids[i])) == NULL) {
			log_warn("slot %lu: too many slots or out of memory", (unsigned long)ids[i]);
			continue;
		}
		rv = slot_scan(m, s);
		if (tok_rv_session_gone(rv))
			rv = slot_scan(m, s);   /* the kept session went stale; once more */
		if (rv != CKR_OK)
			log_warn("slot %lu: cannot read the token: %s", (unsigned long)s->id,
				 tok_ckr_name(rv, nb, sizeof(nb)));
	}
	/* Slots no longer listed as holding a token. */
	for (j = 0; j < m->nslots; j++) {
		int listed = 0;
		for (i = 0; i < n && !listed; i++)
			listed = ids[i] == m->slots[j]->id;
		if (!listed)
			slot_gone(m, m->slots[j]);
	}
	free(ids);
	return 0;
}

int
token_check(struct token_module *m)
{
	CK_SLOT_ID *ids = NULL;
	CK_ULONG n = 0, i;
	CK_TOKEN_INFO ti;
	CK_SESSION_INFO si;
	struct tok_slot *s;
	unsigned gen;
	size_t j, npresent = 0;
	int changed = 0, logged_in;
	CK_RV rv;

	if (fds_exhausted() || slot_list(m, &ids, &n) != CKR_OK)
		return 0;
	for (i = 0; i < n && !changed; i++) {
		if ((s = slot_find(m, ids[i])) == NULL) {
			changed = 1;
			break;
		}
		rv = m->f->C_GetTokenInfo(s->id, &ti);
		if (rv != CKR_OK || !(ti.flags & CKF_TOKEN_INITIALIZED)) {
			changed = s->present;
			continue;
		}
		npresent++;
		if (!s->present || !same_token(&s->ti, &ti) ||
		    (token_flags(&ti, 1, 0) & ~P11A_TOKEN_LOGGED_IN) !=
		    (s->tok.flags & ~P11A_TOKEN_LOGGED_IN)) {
			changed = 1;
			break;
		}
		/* Login state, from a session nobody else uses right now. */
		if (s->shared) {
			struct psess *ps;

			if (!tok_pool_try_get(s, &ps, &gen))
				continue;
			rv = m->f->C_GetSessionInfo(ps->h, &si);
			tok_pool_put(m, s, ps, gen, rv != CKR_OK && tok_rv_session_gone(rv));
		} else if (s->kept != CK_INVALID_HANDLE) {
			rv = m->f->C_GetSessionInfo(s->kept, &si);
		} else {
			changed = 1;
			break;
		}
		logged_in = rv == CKR_OK && tok_state_logged_in(si.state);
		if (rv != CKR_OK || logged_in != s->logged_in)
			changed = 1;
	}
	if (!changed) {
		/* A present token whose slot is not listed any more. */
		size_t was = 0;
		for (j = 0; j < m->nslots; j++)
			was += m->slots[j]->present ? 1 : 0;
		changed = was != npresent;
	}
	free(ids);
	return changed;
}

int
token_inventory(struct token_module *m, struct p11a_list_reply *out)
{
	size_t nt = 0, nk = 0, i, j;
	int r = 0;

	memset(out, 0, sizeof(*out));
	pthread_mutex_lock(&m->lock);
	for (i = 0; i < m->nslots; i++) {
		if (m->slots[i]->known) {
			nt++;
			nk += m->slots[i]->nkeys;
		}
	}
	if (nt > P11A_LIST_MAX)
		nt = P11A_LIST_MAX;
	if (nk > P11A_LIST_MAX)
		nk = P11A_LIST_MAX;
	if ((nt > 0 && (out->tokens = calloc(nt, sizeof(*out->tokens))) == NULL) ||
	    (nk > 0 && (out->keys = calloc(nk, sizeof(*out->keys))) == NULL)) {
		r = -P11A_E_NOMEM;
		goto out;
	}
	for (i = 0; i < m->nslots; i++) {
		struct tok_slot *s = m->slots[i];
		if (!s->known || out->ntokens >= nt)
			continue;
		if ((r = p11a_token_copy(&out->tokens[out->ntokens], &s->tok)) != 0)
			goto out;
		out->ntokens++;
		for (j = 0; j < s->nkeys && out->nkeys < nk; j++) {
			if ((r = p11a_key_copy(&out->keys[out->nkeys], &s->keys[j].k)) != 0)
				goto out;
			out->nkeys++;
		}
	}
 out:
	pthread_mutex_unlock(&m->lock);
	if (r != 0) {
		for (i = 0; i < out->ntokens; i++)
			p11a_token_clear(&out->tokens[i]);
		for (i = 0; i < out->nkeys; i++)
			p11a_key_clear(&out->keys[i]);
		free(out->tokens);
		free(out->keys);
		memset(out, 0, sizeof(*out));
	}
	return r;
}

/* ------------------------------------------------------------ slot events */

/*
 * A card pulled out while the module talks to it fails the call in the
 * module's own words (OpenSC on a CAC card: C_Sign CKR_GENERAL_ERROR), and
 * the reader reports the removal a little later (pcscd polls it; OpenSC
 * caches the slot state for a second).  Looks until the slot says, or the
 * helper saw, that the token left, for at most wait_ms and not past the
 * deadline (CLOCK_MONOTONIC).  A signing thread only.
 */
#define GONE_STEP_MS    50

int
tok_slot_went(struct token_module *m, struct tok_slot *s, int wait_ms,
	      const struct timespec *deadline)
{
	int64_t until = p11a_now_ms() + wait_ms;
	CK_SLOT_INFO si;
	CK_RV rv;
	int present;

	if (deadline != NULL) {
		int64_t d = (int64_t)deadline->tv_sec * 1000 + deadline->tv_nsec / 1000000;
		if (d < until)
			until = d;
	}
	for (;;) {
		pthread_mutex_lock(&m->lock);
		present = s->present;
		pthread_mutex_unlock(&m->lock);
		if (!present)
			return 1;
		rv = m->f->C_GetSlotInfo(s->id, &si);
		if (rv == CKR_SLOT_ID_INVALID || tok_rv_token_gone(rv) ||
		    (rv == CKR_OK && !(si.flags & CKF_TOKEN_PRESENT))) {
			tok_notify(m);
			return 1;
		}
		if (p11a_now_ms() + GONE_STEP_MS > until)
			return 0;
		{
			struct timespec ts = { 0, GONE_STEP_MS * 1000000L };
			while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
				;
		}
	}
}

/*
 * Between two events the watcher rests this long: a module that reports
 * one event after another must not spin, and a burst of events is one
 * refresh anyway (the event descriptor counts, the control thread reads
 * it once).
 *
 * The watcher blocks in C_WaitForSlotEvent until the module fails it once
 * (pcscd stopped, a reader gone).  From then on it asks with
 * CKF_DONT_BLOCK every WATCH_POLL_MS: OpenSC's blocking wait stays on the
 * dead pcscd's context and never sees the reader come back, while its
 * non-blocking one looks for readers again.  Such a look costs pcscd a
 * status query, no APDU: cheap for the card.
 */
#define WATCH_REST_MS   200
#define WATCH_POLL_MS   1000
#define WATCH_STEP_MS   50
#define WATCH_JOIN_MS   2000

/* Sleeps ms, in steps, and returns 1 early when the module is closing. */
static int
watch_sleep(struct token_module *m, int ms)
{
	while (ms > 0) {
		struct timespec ts = { 0, (long)(ms < WATCH_STEP_MS ? ms : WATCH_STEP_MS) * 1000000L };

		if (atomic_load(&m->watch_stop))
			return 1;
		while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
			;
		ms -= WATCH_STEP_MS;
	}
	return atomic_load(&m->watch_stop);
}

static void *
watch_main(void *arg)
{
	struct token_module *m = arg;
	int polling = 0, failing = 0;
	int64_t last_event = INT64_MIN / 2;
	CK_SLOT_ID slot;
	char nb[48];
	CK_RV rv;

	while (!atomic_load(&m->watch_stop)) {
		/* An output, but modules (pkcs11-spy) read it first: never uninitialised. */
		slot = (CK_SLOT_ID)-1;
		if (!polling)
			log_debug("module %s: waiting for slot events", m->name);
		rv = m->f->C_WaitForSlotEvent(polling ? CKF_DONT_BLOCK : 0, &slot, NULL);
		if (atomic_load(&m->watch_stop))
			break;
		if (rv == CKR_OK) {
			int64_t now = p11a_now_ms();
			/*
			 * Each event costs a refresh (the token re-read): events
			 * coming faster than one a second, a module that reports
			 * one at every call, are taken once a second.
			 */
			int rest = polling || now - last_event < WATCH_POLL_MS ? WATCH_POLL_MS :
			    WATCH_REST_MS;

			last_event = now;
			failing = 0;
			log_debug("module %s: slot %lu event", m->name, (unsigned long)slot);
			tok_notify(m);
			if (watch_sleep(m, rest))
				break;
			continue;
		}
		if (rv == CKR_NO_EVENT && polling) {
			failing = 0;
			if (watch_sleep(m, WATCH_POLL_MS))
				break;
			continue;
		}
		if (rv == CKR_FUNCTION_NOT_SUPPORTED || rv == CKR_CRYPTOKI_NOT_INITIALIZED) {
			if (rv == CKR_FUNCTION_NOT_SUPPORTED)
				log_debug("module %s has no C_WaitForSlotEvent: tokens are polled",
					  m->name);
			break;
		}
		/* pcscd stopped, or the module lost its reader: the refresh sees the token go. */
		if (!failing++)
			log_info("module %s: C_WaitForSlotEvent: %s; %s every %d ms", m->name,
				 tok_ckr_name(rv, nb, sizeof(nb)),
				 polling ? "asking again" : "asking without blocking from now on",
				 WATCH_POLL_MS);
		polling = 1;
		tok_notify(m);
		if (watch_sleep(m, WATCH_POLL_MS))
			break;
	}
	return NULL;
}

void
token_watch_start(struct token_module *m)
{
	pthread_attr_t attr;
	sigset_t all, old;

	if (m->watching || m->f->C_WaitForSlotEvent == NULL)
		return;
	pthread_attr_init(&attr);
	/* Signals stay with the control thread. */
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	if (pthread_create(&m->watcher, &attr, watch_main, m) == 0)
		m->watching = 1;
	else
		log_warn("module %s: cannot start the slot-event thread; tokens are polled", m->name);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	pthread_attr_destroy(&attr);
}

void
tok_watch_join(struct token_module *m)
{
	struct timespec until;

	if (!m->watching)
		return;
	clock_gettime(CLOCK_REALTIME, &until);
	until.tv_sec += WATCH_JOIN_MS / 1000;
	if (pthread_timedjoin_np(m->watcher, NULL, &until) != 0) {
		/* Still inside the module: it goes with the process. */
		log_warn("module %s: C_WaitForSlotEvent did not return after C_Finalize", m->name);
		pthread_detach(m->watcher);
	}
	m->watching = 0;
}
