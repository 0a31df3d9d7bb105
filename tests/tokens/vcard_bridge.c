/*
 * vcard_bridge: a virtual CAC smart card (libcacard, keys and certificates
 * in an NSS database) put into vsmartcard's vpcd reader driver inside
 * pcscd.  A test tool: it makes a real pcscd + OpenSC stack see a card.
 *
 *   vcard_bridge --db DIR --port PORT [--host ADDR] NICK [NICK...]
 *
 * vpcd listens on TCP PORT; the card connects to it.  vpcd's wire format:
 * every message is a 2-byte big-endian length and that many bytes.  A
 * 1-byte message from vpcd is a control: 0 power off, 1 power on, 2 reset
 * (no answer to those three), 4 "send the ATR" (answered with the ATR as
 * a message).  Any longer message is a command APDU, answered with the
 * response APDU.  A closed connection is a card taken out of the reader.
 *
 * Hotplug, for tests: "remove" on stdin or SIGUSR1 closes the connection
 * (vpcd reports the card gone), "insert" or SIGUSR2 connects again.
 * "hold" or SIGWINCH: the next command APDU gets no answer ("held" is
 * printed when it arrives) until "remove", so a test can take the card
 * out while a signature is under way.
 * When vpcd goes away (pcscd stopped) the bridge keeps trying to connect
 * every 100 ms while the card is "inserted".  "quit", EOF on stdin only
 * when --stdin is given, SIGTERM and SIGINT end it.  Each state change
 * is printed on stdout ("connected", "removed", ...) for the test to wait on.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <libcacard.h>

#define READER_NAME     "p11agent virtual CAC"
#define MSG_MAX         65536
#define RECONNECT_MS    100

enum { CTRL_OFF = 0, CTRL_ON = 1, CTRL_RESET = 2, CTRL_ATR = 4 };

struct bridge {
	VReader *reader;
	const char *host;
	int port;
	int fd;                 /* connection to vpcd, -1 none */
	int inserted;           /* the test wants the card in the reader */
	int powered;            /* vpcd powered the card on since we connected */
	int hold;               /* the next command APDU is left unanswered */
	int holding;            /* one is: vpcd is not read until the card goes */
	unsigned char atr[64];
	int atr_len;
};

static void
say(const char *what)
{
	printf("%s\n", what);
	fflush(stdout);
}

static int
read_full(int fd, unsigned char *buf, size_t n)
{
	size_t got = 0;

	while (got < n) {
		ssize_t r = read(fd, buf + got, n - got);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		got += (size_t)r;
	}
	return 0;
}

static int
send_msg(int fd, const unsigned char *data, size_t len)
{
	unsigned char hdr[2] = { (unsigned char)(len >> 8), (unsigned char)len };
	struct iovec iov[2] = { { hdr, 2 }, { (void *)(uintptr_t)data, len } };
	struct msghdr mh = { .msg_iov = iov, .msg_iovlen = 2 };
	ssize_t w;

	do
		w = sendmsg(fd, &mh, MSG_NOSIGNAL);
	while (w < 0 && errno == EINTR);
	return w == (ssize_t)(len + 2) ? 0 : -1;
}

static void
disconnect(struct bridge *b)
{
	if (b->fd < 0)
		return;
	close(b->fd);
	b->fd = -1;
	/* A card taken out loses its power and its login. */
	vreader_power_off(b->reader);
}

static void
try_connect(struct bridge *b)
{
	struct sockaddr_in sa;
	int fd, one = 1;

	memset(&sa, 0, sizeof(sa));
	sa.sin_family = AF_INET;
	sa.sin_port = htons((uint16_t)b->port);
	if (inet_pton(AF_INET, b->host, &sa.sin_addr) != 1)
		return;
	if ((fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0)
		return;
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
		close(fd);
		return;
	}
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	b->fd = fd;
	b->powered = 0;
	say("connected");
}

static void
quickack(int fd)
{
	int one = 1;

	(void)setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof(one));
}

/* One message from vpcd; -1 when the connection is over. */
static int
serve_one(struct bridge *b)
{
	static unsigned char in[MSG_MAX], out[MSG_MAX];
	unsigned char hdr[2];
	size_t len;
	int out_len, atr_len;

	/*
	 * vpcd writes the length and the message in two send()s without
	 * TCP_NODELAY: Nagle holds the second one until our ACK of the
	 * first, which the kernel delays by 40 ms.  Quick ACKs (re-armed
	 * before each read, the kernel clears them) make an APDU cost a round
	 * trip instead of ~90 ms, and OpenSC reads a CAC card in hundreds.
	 */
	quickack(b->fd);
	if (read_full(b->fd, hdr, 2) != 0)
		return -1;
	quickack(b->fd);
	len = ((size_t)hdr[0] << 8) | hdr[1];
	if (len == 0 || read_full(b->fd, in, len) != 0)
		return -1;
	if (len == 1) {
		switch (in[0]) {
		case CTRL_OFF:
			vreader_power_off(b->reader);
			return 0;
		case CTRL_ON:
		case CTRL_RESET:
			atr_len = (int)sizeof(b->atr);
			if (vreader_power_on(b->reader, b->atr, &atr_len) == VREADER_OK)
				b->atr_len = atr_len;
			if (!b->powered) {
				b->powered = 1;
				say("powered");
			}
			return 0;
		case CTRL_ATR:
			return send_msg(b->fd, b->atr, (size_t)b->atr_len);
		default:
			fprintf(stderr, "vcard_bridge: unknown control 0x%02x from vpcd\n", in[0]);
			return 0;
		}
	}
	if (b->hold) {
		b->holding = 1;
		say("held");
		return 0;
	}
	out_len = (int)sizeof(out);
	if (vreader_xfr_bytes(b->reader, in, (int)len, out, &out_len) != VREADER_OK) {
		/* No card answer: say "no precise diagnosis" rather than nothing. */
		out[0] = 0x6f;
		out[1] = 0x00;
		out_len = 2;
	}
	return send_msg(b->fd, out, (size_t)out_len);
}

static int
command(struct bridge *b, const char *line)
{
	if (strcmp(line, "remove") == 0) {
		b->inserted = 0;
		b->hold = b->holding = 0;
		disconnect(b);
		say("removed");
	} else if (strcmp(line, "insert") == 0) {
		b->inserted = 1;
		if (b->fd < 0)
			try_connect(b);
		say("inserted");
	} else if (strcmp(line, "hold") == 0) {
		b->hold = 1;
		say("holding");
	} else if (strcmp(line, "quit") == 0) {
		return 1;
	} else if (line[0] != '\0') {
		fprintf(stderr, "vcard_bridge: unknown command '%s' (remove, insert, hold, quit)\n", line);
	}
	return 0;
}

static void
usage(void)
{
	fprintf(stderr, "usage: vcard_bridge --db DIR --port PORT [--host ADDR] [--stdin] "
		"NICK [NICK [NICK]]\n");
	exit(2);
}

int
main(int argc, char **argv)
{
	struct bridge b = { .host = "127.0.0.1", .port = 35963, .fd = -1, .inserted = 1 };
	const char *db = NULL, *nicks[3] = { "", "", "" };
	char opts[4096], line[256];
	size_t nnick = 0, line_len = 0;
	int use_stdin = 0, sfd, done = 0;
	sigset_t mask;
	VCardEmulOptions *eo;

	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--db") == 0 && i + 1 < argc)
			db = argv[++i];
		else if (strcmp(argv[i], "--port") == 0 && i + 1 < argc)
			b.port = atoi(argv[++i]);
		else if (strcmp(argv[i], "--host") == 0 && i + 1 < argc)
			b.host = argv[++i];
		else if (strcmp(argv[i], "--stdin") == 0)
			use_stdin = 1;
		else if (argv[i][0] == '-' || nnick == 3)
			usage();
		else
			nicks[nnick++] = argv[i];
	}
	if (db == NULL || nnick == 0 || b.port <= 0 || b.port > 65535)
		usage();
	/* Nicknames and the path go inside soft=(...) and db="...": no separators in them. */
	for (size_t i = 0; i < nnick; i++)
		if (strpbrk(nicks[i], ",() \"\n") != NULL)
			usage();
	if (strpbrk(db, "\" \n") != NULL)
		usage();
	if ((size_t)snprintf(opts, sizeof(opts),
			     "use_hw=no db=\"sql:%s\" soft=(,%s,CAC,,%s,%s,%s)", db, READER_NAME,
			     nicks[0], nicks[1], nicks[2]) >= sizeof(opts))
		usage();
	if ((eo = vcard_emul_options(opts)) == NULL) {
		fprintf(stderr, "vcard_bridge: libcacard rejected the options: %s\n", opts);
		return 1;
	}
	if (vcard_emul_init(eo) != VCARD_EMUL_OK) {
		fprintf(stderr, "vcard_bridge: vcard_emul_init failed (NSS database %s, "
			"certificates %s %s %s)\n", db, nicks[0], nicks[1], nicks[2]);
		return 1;
	}
	if ((b.reader = vreader_get_reader_by_name(READER_NAME)) == NULL ||
	    vreader_card_is_present(b.reader) != VREADER_OK) {
		fprintf(stderr, "vcard_bridge: no virtual card (are the certificates and their "
			"keys in the database?)\n");
		return 1;
	}
	b.atr_len = (int)sizeof(b.atr);
	if (vreader_power_on(b.reader, b.atr, &b.atr_len) != VREADER_OK) {
		fprintf(stderr, "vcard_bridge: the virtual card does not power on\n");
		return 1;
	}

	sigemptyset(&mask);
	sigaddset(&mask, SIGUSR1);
	sigaddset(&mask, SIGUSR2);
	sigaddset(&mask, SIGWINCH);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGINT);
	sigaddset(&mask, SIGHUP);
	if (sigprocmask(SIG_BLOCK, &mask, NULL) != 0 ||
	    (sfd = signalfd(-1, &mask, SFD_CLOEXEC)) < 0) {
		perror("vcard_bridge: signalfd");
		return 1;
	}
	say("ready");
	try_connect(&b);
	while (!done) {
		struct pollfd p[3] = {
			{ .fd = sfd, .events = POLLIN },
			{ .fd = use_stdin ? 0 : -1, .events = POLLIN },
			{ .fd = b.holding ? -1 : b.fd, .events = POLLIN },
		};
		int timeout = (b.inserted && b.fd < 0) ? RECONNECT_MS : -1;
		int n = poll(p, 3, timeout);

		if (n < 0 && errno != EINTR) {
			perror("vcard_bridge: poll");
			break;
		}
		if (n <= 0) {
			if (b.inserted && b.fd < 0)
				try_connect(&b);
			continue;
		}
		if (p[0].revents & POLLIN) {
			struct signalfd_siginfo si;

			if (read(sfd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
				if (si.ssi_signo == SIGUSR1)
					command(&b, "remove");
				else if (si.ssi_signo == SIGUSR2)
					command(&b, "insert");
				else if (si.ssi_signo == SIGWINCH)
					command(&b, "hold");
				else
					done = 1;
			}
		}
		if (p[1].revents & (POLLIN | POLLHUP)) {
			ssize_t r = read(0, line + line_len, sizeof(line) - 1 - line_len);

			if (r <= 0) {
				done = 1;
			} else {
				char *nl;

				line_len += (size_t)r;
				line[line_len] = '\0';
				while (!done && (nl = strchr(line, '\n')) != NULL) {
					*nl = '\0';
					done = command(&b, line);
					line_len -= (size_t)(nl + 1 - line);
					memmove(line, nl + 1, line_len + 1);
				}
				if (line_len == sizeof(line) - 1)
					line_len = 0;   /* an overlong line: dropped */
			}
		}
		if (b.fd >= 0 && p[2].fd == b.fd && (p[2].revents & (POLLIN | POLLHUP | POLLERR))) {
			if (serve_one(&b) != 0) {
				disconnect(&b);
				say("disconnected");
			}
		}
	}
	disconnect(&b);
	vreader_free(b.reader);
	vcard_emul_finalize();
	return 0;
}
