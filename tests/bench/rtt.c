/*
 * rtt: the floor for a signature through the agent, a bare request/reply
 * round trip between two processes over an AF_UNIX stream socketpair (what
 * a signing channel is), with a 200-byte request and a 200-byte reply.
 *
 * Usage: rtt [SECONDS] [SIZE]
 * Prints one line: "ops=N secs=S rate=R p50_us=X p99_us=Y"
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "benchutil.h"

static int
io_full(int fd, void *p, size_t n, int writing)
{
	uint8_t *b = p;

	while (n > 0) {
		ssize_t r = writing ? write(fd, b, n) : read(fd, b, n);

		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		b += r;
		n -= (size_t)r;
	}
	return 0;
}

int
main(int argc, char **argv)
{
	double secs = argc > 1 ? atof(argv[1]) : 1.0;
	size_t size = argc > 2 ? (size_t)atoi(argv[2]) : 200;
	uint8_t buf[65536];
	struct lat lat;
	int sv[2];
	pid_t pid;
	double t0, end, now;

	if (size == 0 || size > sizeof(buf) || secs <= 0) {
		fprintf(stderr, "usage: rtt [SECONDS] [SIZE<=65536]\n");
		return 2;
	}
	memset(buf, 0x5a, sizeof(buf));
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
		perror("socketpair");
		return 1;
	}
	pid = fork();
	if (pid < 0) {
		perror("fork");
		return 1;
	}
	if (pid == 0) {
		close(sv[0]);
		/* Echo: read one request, write one reply of the same size. */
		while (io_full(sv[1], buf, size, 0) == 0)
			if (io_full(sv[1], buf, size, 1) < 0)
				break;
		_exit(0);
	}
	close(sv[1]);
	lat_init(&lat);
	/* Warm up: page faults, scheduler placement. */
	for (int i = 0; i < 200; i++)
		if (io_full(sv[0], buf, size, 1) < 0 || io_full(sv[0], buf, size, 0) < 0)
			return 1;
	t0 = now_s();
	end = t0 + secs;
	do {
		double a = now_s();

		if (io_full(sv[0], buf, size, 1) < 0 || io_full(sv[0], buf, size, 0) < 0) {
			fprintf(stderr, "rtt: echo process went away\n");
			return 1;
		}
		now = now_s();
		lat_add(&lat, now - a);
	} while (now < end);
	close(sv[0]);
	waitpid(pid, NULL, 0);
	lat_print(&lat, now - t0);
	lat_free(&lat);
	return 0;
}
