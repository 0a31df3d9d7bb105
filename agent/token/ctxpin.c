/*
 * Context PINs for CKA_ALWAYS_AUTHENTICATE keys (H_CONTEXT_PIN): the PIN
 * the user typed in the agent's dialog for one signature, per client
 * connection and key.  A SIGN of that connection for that key takes it,
 * logs in with CKU_CONTEXT_SPECIFIC between C_SignInit and C_Sign, and
 * the PIN is wiped; one nobody takes is wiped when its TTL passes
 * (token_ctxpin_sweep() from the helper's loop).  The PINs live in one
 * page-aligned block locked in memory (best effort: RLIMIT_MEMLOCK may be
 * 0) and left out of core dumps; the URIs, which are no secret, live on
 * the heap.
 *
 * keep-context-pin: a PIN that signed is kept for its key (one per key,
 * no TTL) in the same block, shared by concurrent signers (users), until
 * the token is locked (token_ctxpin_forget from the helper's LOCK and
 * automatic locks, or a SIGN that finds the token logged out) or the
 * token refuses it once; one being used when it is forgotten is wiped by
 * its last user.
 */
#include "config.h"
#include "token-int.h"
#include "log.h"
#include "p11a.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

struct ctxpin_secret {
	size_t len;
	char pin[P11A_PIN_MAX + 1];
};

struct ctxpin_meta {
	int used;                       /* 1 waiting, 2 taken (a signer holds it), 3 kept */
	int users;                      /* kept: signers using it now */
	int doomed;                     /* kept: wipe when the last user is done */
	uint64_t conn;
	char *uri;
	int64_t until;
};

static struct {
	pthread_mutex_t lock;
	struct ctxpin_secret *sec;      /* TOK_CTXPIN_MAX entries, locked page(s) */
	size_t sec_size;
	struct ctxpin_meta meta[TOK_CTXPIN_MAX];
} cp = { .lock = PTHREAD_MUTEX_INITIALIZER };

/* Under cp.lock. */
static int
ctxpin_pages(void)
{
	void *p;
	size_t size;

	if (cp.sec != NULL)
		return 0;
	size = (TOK_CTXPIN_MAX * sizeof(struct ctxpin_secret) + 4095) & ~(size_t)4095;
	p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return -P11A_E_NOMEM;
	if (mlock(p, size) != 0)
		log_debug("context PINs: cannot lock their page in memory: %s", strerror(errno));
	(void)madvise(p, size, MADV_DONTDUMP);
	cp.sec = p;
	cp.sec_size = size;
	return 0;
}

/* Under cp.lock. */
static void
ctxpin_wipe(size_t i)
{
	p11a_wipe(&cp.sec[i], sizeof(cp.sec[i]));
	free(cp.meta[i].uri);
	memset(&cp.meta[i], 0, sizeof(cp.meta[i]));
}

int
token_ctxpin_add(uint64_t conn, const char *key_uri, const char *pin, size_t pin_len)
{
	int64_t now = p11a_now_ms();
	size_t i, free_i = TOK_CTXPIN_MAX, oldest = TOK_CTXPIN_MAX;
	char *u;
	int r;

	if (pin_len > P11A_PIN_MAX)
		return -P11A_E_PIN_INVALID;
	if ((u = strdup(key_uri)) == NULL)
		return -P11A_E_NOMEM;
	pthread_mutex_lock(&cp.lock);
	if ((r = ctxpin_pages()) != 0) {
		pthread_mutex_unlock(&cp.lock);
		free(u);
		return r;
	}
	for (i = 0; i < TOK_CTXPIN_MAX; i++) {
		struct ctxpin_meta *e = &cp.meta[i];
		/* A newer PIN for the same connection and key replaces one not yet taken. */
		if (e->used == 1 && (e->until <= now ||
				     (e->conn == conn && strcmp(e->uri, key_uri) == 0)))
			ctxpin_wipe(i);
		if (e->used == 0 && free_i == TOK_CTXPIN_MAX)
			free_i = i;
		if (e->used == 1 && (oldest == TOK_CTXPIN_MAX || e->until < cp.meta[oldest].until))
			oldest = i;
	}
	if (free_i == TOK_CTXPIN_MAX && oldest != TOK_CTXPIN_MAX) {
		ctxpin_wipe(oldest);
		free_i = oldest;
	}
	if (free_i == TOK_CTXPIN_MAX) {
		pthread_mutex_unlock(&cp.lock);
		free(u);
		return -P11A_E_BUSY;
	}
	cp.meta[free_i] = (struct ctxpin_meta){ .used = 1, .conn = conn, .uri = u,
						.until = now + TOK_CTXPIN_TTL_MS };
	memcpy(cp.sec[free_i].pin, pin, pin_len);
	cp.sec[free_i].pin[pin_len] = '\0';
	cp.sec[free_i].len = pin_len;
	pthread_mutex_unlock(&cp.lock);
	return 0;
}

int
tok_ctxpin_take(uint64_t conn, const char *key_uri, const char **pin, size_t *pin_len)
{
	int64_t now = p11a_now_ms();
	int r = -1;

	*pin = NULL;
	*pin_len = 0;
	pthread_mutex_lock(&cp.lock);
	for (size_t i = 0; cp.sec != NULL && i < TOK_CTXPIN_MAX; i++) {
		struct ctxpin_meta *e = &cp.meta[i];
		if (e->used == 1 && e->until > now && e->conn == conn && strcmp(e->uri, key_uri) == 0) {
			e->used = 2;
			*pin = cp.sec[i].pin;
			*pin_len = cp.sec[i].len;
			r = (int)i;
			break;
		}
	}
	pthread_mutex_unlock(&cp.lock);
	return r;
}

void
tok_ctxpin_release(int slot)
{
	if (slot < 0 || slot >= TOK_CTXPIN_MAX)
		return;
	pthread_mutex_lock(&cp.lock);
	if (cp.meta[slot].used == 2)
		ctxpin_wipe((size_t)slot);
	else if (cp.meta[slot].used == 3 && --cp.meta[slot].users <= 0 && cp.meta[slot].doomed)
		ctxpin_wipe((size_t)slot);
	pthread_mutex_unlock(&cp.lock);
}

/* Under cp.lock: the kept PIN in slot i goes now, or with its last user. */
static void
kept_forget(size_t i)
{
	if (cp.meta[i].users > 0)
		cp.meta[i].doomed = 1;
	else
		ctxpin_wipe(i);
}

int
tok_ctxpin_kept_take(const char *key_uri, const char **pin, size_t *pin_len)
{
	int r = -1;

	*pin = NULL;
	*pin_len = 0;
	pthread_mutex_lock(&cp.lock);
	for (size_t i = 0; cp.sec != NULL && i < TOK_CTXPIN_MAX; i++) {
		struct ctxpin_meta *e = &cp.meta[i];
		if (e->used == 3 && !e->doomed && strcmp(e->uri, key_uri) == 0) {
			e->users++;
			*pin = cp.sec[i].pin;
			*pin_len = cp.sec[i].len;
			r = (int)i;
			break;
		}
	}
	pthread_mutex_unlock(&cp.lock);
	return r;
}

void
tok_ctxpin_keep(const char *key_uri, const char *pin, size_t pin_len)
{
	size_t i, free_i = TOK_CTXPIN_MAX;
	char *u;

	if (pin_len > P11A_PIN_MAX || (u = strdup(key_uri)) == NULL)
		return;         /* not kept: the next signature asks */
	pthread_mutex_lock(&cp.lock);
	for (i = 0; cp.sec != NULL && i < TOK_CTXPIN_MAX; i++) {
		if (cp.meta[i].used == 3 && !cp.meta[i].doomed && strcmp(cp.meta[i].uri, key_uri) == 0)
			kept_forget(i);
		if (cp.meta[i].used == 0 && free_i == TOK_CTXPIN_MAX)
			free_i = i;
	}
	if (cp.sec == NULL || free_i == TOK_CTXPIN_MAX) {
		pthread_mutex_unlock(&cp.lock);
		free(u);
		return;
	}
	cp.meta[free_i] = (struct ctxpin_meta){ .used = 3, .uri = u, .until = INT64_MAX };
	memcpy(cp.sec[free_i].pin, pin, pin_len);
	cp.sec[free_i].pin[pin_len] = '\0';
	cp.sec[free_i].len = pin_len;
	pthread_mutex_unlock(&cp.lock);
}

void
token_ctxpin_forget(const char *key_uri)
{
	pthread_mutex_lock(&cp.lock);
	for (size_t i = 0; cp.sec != NULL && i < TOK_CTXPIN_MAX; i++)
		if (cp.meta[i].used == 3 && (key_uri == NULL || strcmp(cp.meta[i].uri, key_uri) == 0))
			kept_forget(i);
	pthread_mutex_unlock(&cp.lock);
}

int64_t
token_ctxpin_sweep(int64_t now)
{
	int64_t next = INT64_MAX;

	pthread_mutex_lock(&cp.lock);
	for (size_t i = 0; cp.sec != NULL && i < TOK_CTXPIN_MAX; i++) {
		if (cp.meta[i].used != 1)
			continue;
		if (cp.meta[i].until <= now)
			ctxpin_wipe(i);
		else if (cp.meta[i].until < next)
			next = cp.meta[i].until;
	}
	pthread_mutex_unlock(&cp.lock);
	return next;
}
