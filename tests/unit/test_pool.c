/*
 * Unit tests for common/pool.c against a stand-in agent: a thread that
 * accepts on a Unix socket, answers HELLO and keeps each connection open,
 * counting them, so a test sees whether a take reused a connection or
 * opened one.
 */
#include "config.h"

#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <cmocka.h>

#include "p11a.h"
#include "buf.h"
#include "proto.h"
#include "client.h"
#include "pool.h"

static char dir[32], sock[64];
static int lfd = -1;
static pthread_t srv;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int accepted;
static int conns[256];

static void *
serve(void *arg)
{
	(void)arg;
	for (;;) {
		struct p11a_buf *in = p11a_buf_new(P11A_FRAME_MAX), *out = p11a_buf_new(P11A_FRAME_MAX);
		struct p11a_msg m;
		int fd = accept(lfd, NULL, NULL);

		if (fd < 0) {
			p11a_buf_free(in);
			p11a_buf_free(out);
			return NULL;
		}
		memset(&m, 0, sizeof(m));
		/* Counted before the answer: a take that connected sees itself counted. */
		pthread_mutex_lock(&mu);
		if (accepted < 256)
			conns[accepted] = fd;
		accepted++;
		pthread_mutex_unlock(&mu);
		if (p11a_frame_read(fd, in, NULL, 5000) == 0) {
			m.type = P11A_MSG_HELLO_REPLY;
			m.u.hello_reply.version = P11A_PROTO_VERSION;
			m.u.hello_reply.agent = "stand-in";
			if (p11a_msg_encode(&m, out) == 0)
				(void)p11a_frame_write(fd, out, -1, 5000);
		}
		p11a_buf_free(in);
		p11a_buf_free(out);
	}
}

static int
count(void)
{
	int n;

	pthread_mutex_lock(&mu);
	n = accepted;
	pthread_mutex_unlock(&mu);
	return n;
}

static int
setup(void **state)
{
	struct sockaddr_un sa;

	(void)state;
	snprintf(dir, sizeof(dir), "/tmp/p11a-pool.XXXXXX");
	assert_non_null(mkdtemp(dir));
	snprintf(sock, sizeof(sock), "%s/agent.sock", dir);
	memset(&sa, 0, sizeof(sa));
	sa.sun_family = AF_UNIX;
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", sock);
	lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	assert_true(lfd >= 0);
	assert_int_equal(bind(lfd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	assert_int_equal(listen(lfd, 64), 0);
	assert_int_equal(pthread_create(&srv, NULL, serve, NULL), 0);
	return 0;
}

static int
teardown(void **state)
{
	(void)state;
	shutdown(lfd, SHUT_RDWR);
	pthread_join(srv, NULL);
	close(lfd);
	for (int i = 0; i < accepted && i < 256; i++)
		close(conns[i]);
	unlink(sock);
	rmdir(dir);
	return 0;
}

static void
test_no_agent(void **state)
{
	char path[160], why[512];
	struct p11a_pool *pool;
	struct p11a_client *c = (struct p11a_client *)1;

	(void)state;
	snprintf(path, sizeof(path), "%s/nobody.sock", dir);
	assert_non_null(pool = p11a_pool_new(path, "test", 1000, 4));
	assert_int_equal(p11a_pool_get(pool, &c, why, sizeof(why)), -P11A_E_NOT_RUNNING);
	assert_null(c);
	assert_non_null(strstr(why, path));
	p11a_pool_put(pool, NULL);
	p11a_pool_free(pool);
}

static void
test_reuse(void **state)
{
	struct p11a_pool *pool;
	struct p11a_client *a, *b, *c;
	int n0 = count();

	(void)state;
	assert_non_null(pool = p11a_pool_new(sock, "test", 1000, 1));
	assert_int_equal(p11a_pool_get(pool, &a, NULL, 0), 0);
	assert_int_equal(count(), n0 + 1);
	p11a_pool_put(pool, a);
	/* An idle connection is taken again: no new connection. */
	assert_int_equal(p11a_pool_get(pool, &b, NULL, 0), 0);
	assert_ptr_equal(a, b);
	assert_int_equal(count(), n0 + 1);
	/* Two at once: two connections. */
	assert_int_equal(p11a_pool_get(pool, &c, NULL, 0), 0);
	assert_ptr_not_equal(b, c);
	assert_int_equal(count(), n0 + 2);
	/* max_idle 1: the second put closes its connection. */
	p11a_pool_put(pool, b);
	p11a_pool_put(pool, c);
	assert_int_equal(p11a_pool_get(pool, &a, NULL, 0), 0);
	assert_ptr_equal(a, b);
	assert_int_equal(p11a_pool_get(pool, &c, NULL, 0), 0);
	assert_int_equal(count(), n0 + 3);
	p11a_pool_put(pool, a);
	p11a_pool_put(pool, c);
	p11a_pool_free(pool);
}

static void
test_fork(void **state)
{
	struct p11a_pool *pool;
	struct p11a_client *a, *b;
	int n0, st;
	pid_t pid;

	(void)state;
	assert_non_null(pool = p11a_pool_new(sock, "test", 1000, 4));
	assert_int_equal(p11a_pool_get(pool, &a, NULL, 0), 0);
	p11a_pool_put(pool, a);
	n0 = count();
	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		/* The child never takes the parent's connection: it opens its own. */
		struct p11a_client *c;

		if (p11a_pool_get(pool, &c, NULL, 0) != 0)
			_exit(1);
		p11a_pool_put(pool, c);
		p11a_pool_free(pool);
		_exit(0);
	}
	assert_int_equal(waitpid(pid, &st, 0), pid);
	assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
	assert_int_equal(count(), n0 + 1);
	/* The parent's idle connection is still its own. */
	assert_int_equal(p11a_pool_get(pool, &b, NULL, 0), 0);
	assert_ptr_equal(a, b);
	assert_int_equal(count(), n0 + 1);
	p11a_pool_put(pool, b);
	p11a_pool_free(pool);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_no_agent),
		cmocka_unit_test(test_reuse),
		cmocka_unit_test(test_fork),
	};

	return cmocka_run_group_tests(tests, setup, teardown);
}
