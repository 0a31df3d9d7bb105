/*
 * A pool of idle agent connections (p11a_client) for a multi-threaded
 * client: the OpenSSL provider and the PKCS#11 front-end module.
 *
 * A thread takes a connection (an idle one, or a new one), makes its
 * requests on it alone, and puts it back, so threads talk to the agent in
 * parallel on their own connections and a slow request (a SIGN waiting on
 * a token) stalls nobody else.  The pool's lock is held only to move a
 * pointer: never across I/O, connect or free.
 *
 * fork(): a child must not use its parent's descriptors.  The pool
 * remembers the fork generation (p11a_fork_generation()) that filled it;
 * in a child the first get drops (closes the child's copies of) every
 * inherited idle connection, and a put of a connection taken before the
 * fork frees it.  The lock is one static mutex for every pool, kept
 * consistent across fork() by a pthread_atfork() handler, so a pool needs
 * no handler of its own and may be freed at any time.
 */
#ifndef P11A_POOL_H
#define P11A_POOL_H

#include <stddef.h>
#include "client.h"

struct p11a_pool;

/*
 * A pool for the agent at path (NULL: p11a_default_socket_path() at each
 * connect), naming itself client_name in HELLO, with timeout_ms per
 * request (0 = the client library's default) and at most max_idle idle
 * connections kept (more are freed when put back).  NULL when out of
 * memory.
 */
struct p11a_pool *p11a_pool_new(const char *path, const char *client_name, int timeout_ms,
				size_t max_idle);

/*
 * Frees the pool and closes its idle connections.  Connections taken and
 * not yet put back are the takers' (put them into no pool; free them).
 */
void p11a_pool_free(struct p11a_pool *pool);

/*
 * *out: an idle connection, or a new one (p11a_client_connect()).
 * Returns 0, or p11a_client_connect()'s error with *out NULL and, when why
 * is not NULL, its message in why (size why_size).
 */
int p11a_pool_get(struct p11a_pool *pool, struct p11a_client **out, char *why, size_t why_size);

/* Gives c (may be NULL) back to the pool, or frees it when the pool is full or c predates a fork. */
void p11a_pool_put(struct p11a_pool *pool, struct p11a_client *c);

#endif
