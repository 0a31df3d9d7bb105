/*
 * Pool of idle agent connections; the contract is in pool.h.
 */
#include "config.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pool.h"

struct p11a_pool {
	char *path;                     /* NULL: the default socket */
	char *name;
	int timeout_ms;
	size_t max_idle;
	struct p11a_client **idle;
	size_t nidle;
	uint64_t fork_gen;              /* p11a_fork_generation() of the process that filled idle */
};

/* One lock for every pool: short holds, no I/O; consistent across fork(). */
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;

static void atfork_prepare(void) { pthread_mutex_lock(&pool_lock); }
static void atfork_release(void) { pthread_mutex_unlock(&pool_lock); }

static void
atfork_register(void)
{
	(void)pthread_atfork(atfork_prepare, atfork_release, atfork_release);
}

struct p11a_pool *
p11a_pool_new(const char *path, const char *client_name, int timeout_ms, size_t max_idle)
{
	struct p11a_pool *pool;

	pthread_once(&pool_once, atfork_register);
	if ((pool = calloc(1, sizeof(*pool))) == NULL)
		return NULL;
	if ((path != NULL && (pool->path = strdup(path)) == NULL) ||
	    (pool->name = strdup(client_name != NULL ? client_name : "p11agent")) == NULL ||
	    (max_idle > 0 && (pool->idle = calloc(max_idle, sizeof(*pool->idle))) == NULL)) {
		p11a_pool_free(pool);
		return NULL;
	}
	pool->timeout_ms = timeout_ms;
	pool->max_idle = max_idle;
	pool->fork_gen = p11a_fork_generation();
	return pool;
}

void
p11a_pool_free(struct p11a_pool *pool)
{
	size_t i;

	if (pool == NULL)
		return;
	/* After fork() the idle connections are this process's copies: closing them is right. */
	for (i = 0; i < pool->nidle; i++)
		p11a_client_free(pool->idle[i]);
	free(pool->idle);
	free(pool->path);
	free(pool->name);
	free(pool);
}

int
p11a_pool_get(struct p11a_pool *pool, struct p11a_client **out, char *why, size_t why_size)
{
	struct p11a_client *c = NULL, **stale = NULL;
	size_t nstale = 0, i;
	uint64_t gen = p11a_fork_generation();

	*out = NULL;
	pthread_mutex_lock(&pool_lock);
	if (pool->fork_gen != gen) {
		/* Inherited across fork(): these descriptors are the parent's too. */
		stale = pool->idle;
		nstale = pool->nidle;
		pool->idle = NULL;
		pool->nidle = 0;
		pool->fork_gen = gen;
	}
	if (pool->nidle > 0)
		c = pool->idle[--pool->nidle];
	pthread_mutex_unlock(&pool_lock);
	if (stale != NULL) {
		for (i = 0; i < nstale; i++)
			p11a_client_free(stale[i]);     /* closes only this process's copies */
		/* The array goes back for reuse, or is freed if a racing get already made one. */
		pthread_mutex_lock(&pool_lock);
		if (pool->idle == NULL) {
			pool->idle = stale;
			stale = NULL;
		}
		pthread_mutex_unlock(&pool_lock);
		free(stale);
	}
	if (c != NULL) {
		*out = c;
		return 0;
	}
	return p11a_client_connect(pool->path, pool->name, pool->timeout_ms, out, why, why_size);
}

void
p11a_pool_put(struct p11a_pool *pool, struct p11a_client *c)
{
	uint64_t gen;

	if (c == NULL)
		return;
	gen = p11a_fork_generation();
	pthread_mutex_lock(&pool_lock);
	if (pool->fork_gen == gen && pool->idle != NULL && pool->nidle < pool->max_idle) {
		pool->idle[pool->nidle++] = c;
		c = NULL;
	}
	pthread_mutex_unlock(&pool_lock);
	p11a_client_free(c);
}
