/*
 * Fuzz target for the client side (common/client.c, common/proto.c): what
 * the CLI, the OpenSSL provider and the front-end module do with whatever
 * an agent sends back.
 *
 * Input: u16 big-endian L, then L bytes the fake agent sends on the main
 * connection, then the bytes it sends on every signing channel it hands
 * out.  The fake agent (a thread on a listening socket in a private
 * directory) reads one request frame, then sends the next frame of its
 * stream (a CHANNEL frame, type 0x85, goes with a descriptor: a
 * socketpair whose other end holds the channel bytes); bytes that do not
 * parse as a frame go out as they are; then it closes.  Later connections
 * (the client reconnects after a close) are closed at once.  The client
 * runs connect (HELLO), STATUS, LIST, UNLOCK, LOCK, LOG (when the agent
 * chose version 3) and SIGN.
 */
#include "config.h"
#include "client.h"
#include "p11a.h"
#include "proto.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

#define CLIENT_TIMEOUT_MS 2000
#define MAX_CHANNELS 16

static char sock_dir[64];
static char sock_path[128];
static int listen_fd = -1;

static void
cleanup_dir(void)
{
	if (sock_path[0])
		unlink(sock_path);
	if (sock_dir[0])
		rmdir(sock_dir);
}

static void
setup(void)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };

	if (listen_fd >= 0)
		return;
	signal(SIGPIPE, SIG_IGN);
	snprintf(sock_dir, sizeof(sock_dir), "/tmp/p11a-fuzz-reply.XXXXXX");
	if (!mkdtemp(sock_dir))
		abort();
	snprintf(sock_path, sizeof(sock_path), "%s/agent.sock", sock_dir);
	atexit(cleanup_dir);
	memcpy(sa.sun_path, sock_path, strlen(sock_path) + 1);
	listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (listen_fd < 0 || bind(listen_fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 ||
	    listen(listen_fd, 16) != 0)
		abort();
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	setup();
	return 0;
}

struct agent_script {
	const uint8_t *main;
	size_t main_len;
	const uint8_t *chan;
	size_t chan_len;
	volatile int done;
	int chan_peers[MAX_CHANNELS];
	int nchan;
};

static int
accept_one(struct agent_script *a)
{
	while (!a->done) {
		struct pollfd p = { listen_fd, POLLIN, 0 };
		if (poll(&p, 1, 10) > 0) {
			int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
			if (fd >= 0)
				return fd;
		}
	}
	return -1;
}

static int
send_with_fd(int fd, const uint8_t *p, size_t n, int pass)
{
	union {
		char b[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} cm;
	struct iovec iov = { (void *)p, n };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
	ssize_t w;

	if (pass >= 0) {
		memset(&cm, 0, sizeof(cm));
		mh.msg_control = cm.b;
		mh.msg_controllen = sizeof(cm.b);
		struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(c), &pass, sizeof(int));
	}
	w = sendmsg(fd, &mh, MSG_NOSIGNAL);
	if (w <= 0)
		return -1;
	if ((size_t)w < n)
		return send_with_fd(fd, p + w, n - (size_t)w, -1);
	return 0;
}

/* A signing channel: our end gets the channel bytes, then EOF for writing. */
static int
new_channel(struct agent_script *a)
{
	int sv[2];

	if (a->nchan >= MAX_CHANNELS || socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
		return -1;
	if (a->chan_len)
		(void)send(sv[0], a->chan, a->chan_len, MSG_DONTWAIT | MSG_NOSIGNAL);
	shutdown(sv[0], SHUT_WR);
	a->chan_peers[a->nchan++] = sv[0];
	return sv[1];
}

static void *
agent_thread(void *arg)
{
	struct agent_script *a = arg;
	struct p11a_buf *req = p11a_buf_new(P11A_FRAME_MAX);
	size_t off = 0;
	int fd;

	if (!req)
		abort();
	if ((fd = accept_one(a)) < 0)
		goto out;
	while (off < a->main_len) {
		/* One request in, one reply out, as an agent does. */
		if (p11a_frame_read(fd, req, NULL, CLIENT_TIMEOUT_MS) != 0)
			break;
		size_t left = a->main_len - off;
		const uint8_t *p = a->main + off;
		size_t n = left;
		int pass = -1;
		if (left >= 5) {
			uint32_t len = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
			if (len >= 1 && len <= left - 4) {
				n = 4 + len;
				if (p[4] == P11A_MSG_CHANNEL)
					pass = new_channel(a);
			}
		}
		int r = send_with_fd(fd, p, n, pass);
		if (pass >= 0)
			close(pass);
		if (r != 0)
			break;
		off += n;
	}
	close(fd);
	/* Reconnections find a closed door. */
	while ((fd = accept_one(a)) >= 0)
		close(fd);
 out:
	p11a_buf_free(req);
	return NULL;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct agent_script a;
	struct p11a_client *c = NULL;
	struct p11a_msg reply;
	pthread_t t;
	size_t l;

	setup();
	if (size < 2)
		return 0;
	l = (size_t)data[0] << 8 | data[1];
	if (l > size - 2)
		l = size - 2;
	memset(&a, 0, sizeof(a));
	a.main = data + 2;
	a.main_len = l;
	a.chan = data + 2 + l;
	a.chan_len = size - 2 - l;
	if (pthread_create(&t, NULL, agent_thread, &a) != 0)
		abort();

	if (p11a_client_connect(sock_path, "fuzz_reply", CLIENT_TIMEOUT_MS, &c, NULL, 0) == 0) {
		uint8_t *sig = NULL;
		size_t sig_len = 0;
		struct p11a_sign sr;

		(void)p11a_client_last_error(c);
		if (p11a_client_status(c, &reply) == 0)
			p11a_msg_clear(&reply);
		if (p11a_client_list(c, &reply) == 0)
			p11a_msg_clear(&reply);
		(void)p11a_client_unlock(c, NULL, "1234", 4);
		(void)p11a_client_lock(c, "");
		/* LOG goes out only when the agent chose version 3. */
		if (p11a_client_log(c, 0, 0, &reply) == 0)
			p11a_msg_clear(&reply);
		memset(&sr, 0, sizeof(sr));
		sr.key_uri = (char *)"pkcs11:object=ec256;type=private";
		sr.scheme = P11A_SCHEME_ECDSA;
		sr.hash = P11A_HASH_SHA256;
		sr.input = P11A_INPUT_MESSAGE;
		sr.data = (uint8_t *)"fuzz";
		sr.data_len = 4;
		if (p11a_client_sign(c, &sr, &sig, &sig_len) == 0)
			free(sig);
		(void)p11a_client_last_error(c);
		p11a_client_free(c);
	}
	a.done = 1;
	pthread_join(t, NULL);
	for (int i = 0; i < a.nchan; i++)
		close(a.chan_peers[i]);
	/* Whatever the reconnections left in the backlog. */
	for (int fd; (fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC)) >= 0;)
		close(fd);
	return 0;
}
