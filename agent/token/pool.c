/*
 * Session pool of a slot: signing sessions borrowed and returned, the
 * pool's size, and the control thread's session (the kept one, or the
 * pool's only one on a one-session token).  Locking and key generations:
 * token-int.h.
 */
#include "config.h"
#include "token-int.h"
#include "log.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void
ts_after_ms(struct timespec *ts, int ms)
{
	clock_gettime(CLOCK_MONOTONIC, ts);
	ts->tv_sec += ms / 1000;
	ts->tv_nsec += (long)(ms % 1000) * 1000000L;
	if (ts->tv_nsec >= 1000000000L) {
		ts->tv_sec++;
		ts->tv_nsec -= 1000000000L;
	}
}

int
tok_state_logged_in(CK_STATE st)
{
	return st == CKS_RO_USER_FUNCTIONS || st == CKS_RW_USER_FUNCTIONS;
}


/*
 * Borrows a session of s, opening one while the pool is below its cap,
 * else waiting until deadline.  *gen tells tok_pool_put() which token
 * generation the session belongs to.
 */
int
tok_pool_get(struct token_module *m, struct tok_slot *s, const struct timespec *deadline,
	     struct psess **out, unsigned *gen, CK_RV *rv_out)
{
	struct psess *ps;
	CK_RV rv;
	unsigned g;
	int r;

	*rv_out = CKR_OK;
	*out = NULL;
	pthread_mutex_lock(&s->plock);
	for (;;) {
		if (s->nidle > 0) {
			*out = s->idle[--s->nidle];
			*gen = s->gen;
			pthread_mutex_unlock(&s->plock);
			return 0;
		}
		if (s->nopen < s->cap) {
			s->nopen++;
			g = s->gen;
			pthread_mutex_unlock(&s->plock);
			if ((ps = calloc(1, sizeof(*ps))) == NULL) {
				rv = CKR_HOST_MEMORY;
			} else {
				ps->kgen = atomic_load(&s->kgen);
				rv = m->f->C_OpenSession(s->id, CKF_SERIAL_SESSION, NULL, NULL, &ps->h);
				if (rv == CKR_OK) {
					*out = ps;
					*gen = g;
					return 0;
				}
				free(ps);
			}
			pthread_mutex_lock(&s->plock);
			if (g != s->gen) {
				/* The token changed meanwhile; the count was reset. */
				pthread_cond_broadcast(&s->pcond);
				pthread_mutex_unlock(&s->plock);
				*rv_out = rv;
				return tok_rv_err(rv);
			}
			s->nopen--;
			if (rv == CKR_SESSION_COUNT && s->nopen > 0) {
				/* Others use the token too: make do with what we have. */
				log_debug("slot %lu: session limit reached at %u", (unsigned long)s->id,
					  s->nopen);
				s->cap = s->nopen;
				continue;
			}
			pthread_cond_broadcast(&s->pcond);
			pthread_mutex_unlock(&s->plock);
			*rv_out = rv;
			return tok_rv_err(rv);
		}
		r = pthread_cond_timedwait(&s->pcond, &s->plock, deadline);
		if (r == ETIMEDOUT) {
			pthread_mutex_unlock(&s->plock);
			return -P11A_E_TIMEOUT;
		}
	}
}

/* Non-blocking: an idle session or nothing (1 = got one). */
int
tok_pool_try_get(struct tok_slot *s, struct psess **ps, unsigned *gen)
{
	int got = 0;

	pthread_mutex_lock(&s->plock);
	if (s->nidle > 0) {
		*ps = s->idle[--s->nidle];
		*gen = s->gen;
		got = 1;
	}
	pthread_mutex_unlock(&s->plock);
	return got;
}

static void
psess_close(struct token_module *m, struct psess *ps)
{
	/* Closing the session destroys its session objects: the key copies. */
	(void)m->f->C_CloseSession(ps->h);
	free(ps);
}

/*
 * Returns a borrowed session; drop closes it (it failed or the token
 * changed).  A session holding key copies of an older key generation is
 * closed too: its copies may no longer be what their handles say.
 */
void
tok_pool_put(struct token_module *m, struct tok_slot *s, struct psess *ps, unsigned gen, int drop)
{
	if (ps->ncopy > 0 && ps->kgen != atomic_load(&s->kgen))
		drop = 1;
	pthread_mutex_lock(&s->plock);
	if (!drop && gen == s->gen && s->nopen <= s->cap && s->nidle < TOKEN_POOL_MAX) {
		s->idle[s->nidle++] = ps;
		pthread_cond_signal(&s->pcond);
		pthread_mutex_unlock(&s->plock);
		return;
	}
	if (gen == s->gen)
		s->nopen--;
	pthread_cond_broadcast(&s->pcond);
	pthread_mutex_unlock(&s->plock);
	psess_close(m, ps);
}

int
tok_pool_shared(struct tok_slot *s)
{
	int shared;

	pthread_mutex_lock(&s->plock);
	shared = s->shared;
	pthread_mutex_unlock(&s->plock);
	return shared;
}

/*
 * The token in s changed (removed, replaced): close idle sessions, make
 * lent-out ones close on return, and forget the kept session.
 */
void
tok_slot_reset_sessions(struct token_module *m, struct tok_slot *s)
{
	struct psess *old[TOKEN_POOL_MAX];
	unsigned n;

	atomic_fetch_add(&s->kgen, 1);
	pthread_mutex_lock(&s->plock);
	n = s->nidle;
	memcpy(old, s->idle, n * sizeof(old[0]));
	s->nidle = 0;
	s->nopen = 0;
	s->gen++;
	pthread_cond_broadcast(&s->pcond);
	pthread_mutex_unlock(&s->plock);
	for (unsigned i = 0; i < n; i++)
		psess_close(m, old[i]);
	if (s->kept != CK_INVALID_HANDLE) {
		(void)m->f->C_CloseSession(s->kept);
		s->kept = CK_INVALID_HANDLE;
	}
	s->mechs_read = 0;
}

/* Sizes the pool from ulMaxSessionCount (the kept session takes one) and session-pool. */
void
tok_slot_configure_pool(struct tok_slot *s, const CK_TOKEN_INFO *ti, unsigned pool_max)
{
	CK_ULONG max = ti->ulMaxSessionCount;
	unsigned cap;
	int shared;

	if (max == CK_EFFECTIVELY_INFINITE || max == CK_UNAVAILABLE_INFORMATION) {
		shared = 0;
		cap = pool_max;
	} else if (max <= 1) {
		shared = 1;
		cap = 1;
	} else {
		shared = 0;
		cap = max - 1 > pool_max ? pool_max : (unsigned)(max - 1);
	}
	pthread_mutex_lock(&s->plock);
	unsigned before = s->cap;
	if (s->shared != shared) {
		s->shared = shared;
		s->cap = cap;
	} else if (s->nopen == 0 || cap < s->cap) {
		/* Raise the cap only while nothing is open: CKR_SESSION_COUNT may have lowered it. */
		s->cap = cap;
	}
	cap = s->cap;
	pthread_mutex_unlock(&s->plock);
	if (cap != before)
		log_debug("slot %lu: up to %u signing session%s%s", (unsigned long)s->id, cap,
			  cap == 1 ? "" : "s", shared ? " (one-session token: shared with control)" : "");
}

/* The control thread's session: the kept one, or the pool's only one. */
static CK_RV
ctl_session_get(struct token_module *m, struct tok_slot *s, CK_SESSION_HANDLE *h, unsigned *gen)
{
	struct timespec dl;
	CK_RV rv = CKR_OK;
	int r;

	if (s->shared) {
		ts_after_ms(&dl, m->wait_ms);
		r = tok_pool_get(m, s, &dl, &s->ctl_ps, gen, &rv);
		if (r == -P11A_E_TIMEOUT)
			return CKR_FUNCTION_CANCELED;   /* stands for "busy" here */
		if (r != 0)
			return rv != CKR_OK ? rv : CKR_GENERAL_ERROR;
		*h = s->ctl_ps->h;
		return CKR_OK;
	}
	*gen = 0;
	if (s->kept == CK_INVALID_HANDLE) {
		rv = m->f->C_OpenSession(s->id, CKF_SERIAL_SESSION, NULL, NULL, &s->kept);
		if (rv != CKR_OK) {
			s->kept = CK_INVALID_HANDLE;
			return rv;
		}
	}
	*h = s->kept;
	return CKR_OK;
}

void
tok_ctl_session_put(struct token_module *m, struct tok_slot *s, CK_SESSION_HANDLE h, unsigned gen,
		    int drop)
{
	if (s->shared) {
		if (s->ctl_ps != NULL && s->ctl_ps->h == h) {
			tok_pool_put(m, s, s->ctl_ps, gen, drop);
			s->ctl_ps = NULL;
		}
		return;
	}
	if (drop && s->kept == h) {
		(void)m->f->C_CloseSession(h);
		s->kept = CK_INVALID_HANDLE;
	}
}

/*
 * Opens (or re-opens once, when stale) the control session and reads the
 * login state from it.
 */
CK_RV
tok_ctl_session_state(struct token_module *m, struct tok_slot *s, CK_SESSION_HANDLE *h,
		      unsigned *gen, int *logged_in)
{
	CK_SESSION_INFO si;
	CK_RV rv;

	for (int attempt = 0; attempt < 2; attempt++) {
		if ((rv = ctl_session_get(m, s, h, gen)) != CKR_OK)
			return rv;
		rv = m->f->C_GetSessionInfo(*h, &si);
		if (rv == CKR_OK) {
			*logged_in = tok_state_logged_in(si.state);
			return CKR_OK;
		}
		tok_ctl_session_put(m, s, *h, *gen, 1);
		if (!tok_rv_session_gone(rv) || tok_rv_token_gone(rv))
			return rv;
	}
	return rv;
}
