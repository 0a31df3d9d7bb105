/*
 * connhold: opens N idle connections to the agent (each after HELLO, with
 * common/client.c), prints "ready N" and holds them until its standard
 * input closes.  For the agent's memory with many idle clients.
 *
 *   connhold SOCK N
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <unistd.h>

#include "client.h"
#include "p11a.h"

int
main(int argc, char **argv)
{
	struct p11a_client **c;
	struct rlimit rl;
	char b;
	int n, r;

	if (argc != 3 || (n = atoi(argv[2])) < 1) {
		fprintf(stderr, "usage: connhold SOCK N\n");
		return 2;
	}
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)n + 16) {
		rl.rlim_cur = rl.rlim_max < (rlim_t)n + 16 ? rl.rlim_max : (rlim_t)n + 16;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
	c = calloc((size_t)n, sizeof(*c));
	if (c == NULL)
		return 1;
	for (int i = 0; i < n; i++) {
		if ((r = p11a_client_connect(argv[1], "connhold", 0, &c[i], NULL, 0)) < 0) {
			fprintf(stderr, "connhold: connection %d: %s\n", i + 1, p11a_strerror(-r));
			return 1;
		}
	}
	printf("ready %d\n", n);
	fflush(stdout);
	while (read(0, &b, 1) > 0)
		;
	for (int i = 0; i < n; i++)
		p11a_client_free(c[i]);
	free(c);
	return 0;
}
