/*
 * p11agent: helpers shared by the verbs (messages, agent connection,
 * input and output files, PIN entry).
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <termios.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "cli.h"
#include "uri.h"

#define CLI_CLIENT_NAME "p11agent-cli " PACKAGE_VERSION

/* ================================================================ messages */

void
cli_sanitize_token(struct p11a_token *t)
{
	p11a_text_scrub(t->uri);
	p11a_text_scrub(t->label);
	p11a_text_scrub(t->manufacturer);
	p11a_text_scrub(t->model);
	p11a_text_scrub(t->serial);
	p11a_text_scrub(t->module);
}

void
cli_sanitize_key(struct p11a_key *k)
{
	p11a_text_scrub(k->uri);
	p11a_text_scrub(k->token_uri);
	p11a_text_scrub(k->label);
	p11a_text_scrub(k->curve);
	p11a_text_scrub(k->cert_uri);
	p11a_text_scrub(k->cert_label);
}

static void
verr(const char *fmt, va_list ap)
{
	char msg[2 * P11A_TEXT_MAX + 512];

	vsnprintf(msg, sizeof(msg), fmt, ap);
	p11a_text_scrub(msg);
	fprintf(stderr, "%s: %s\n", CLI_PROG, msg);
}

void
cli_err(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	verr(fmt, ap);
	va_end(ap);
}

int
cli_usage_err(const char *verb, const char *fmt, ...)
{
	char msg[P11A_URI_MAX + 512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (verb != NULL)
		cli_err("%s: %s", verb, msg);
	else
		cli_err("%s", msg);
	if (verb != NULL)
		fprintf(stderr, "Try '%s %s --help'.\n", CLI_PROG, verb);
	else
		fprintf(stderr, "Try '%s --help'.\n", CLI_PROG);
	return CLI_EXIT_USAGE;
}

int
cli_try_help(const char *verb)
{
	fprintf(stderr, "Try '%s %s --help'.\n", CLI_PROG, verb);
	return CLI_EXIT_USAGE;
}

int
cli_fail(struct p11a_client *c, int err, const char *fmt, ...)
{
	char what[P11A_URI_MAX + 256];
	const char *why = NULL;
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(what, sizeof(what), fmt, ap);
	va_end(ap);
	if (c != NULL)
		why = p11a_client_last_error(c);
	if (why == NULL || *why == '\0')
		why = p11a_strerror(err);
	cli_err("%s: %s", what, why);
	return CLI_EXIT_FAIL;
}

/* ================================================================ agent */

int
cli_connect(const struct cli_ctx *ctx, struct p11a_client **out)
{
	char why[1024];
	int r;

	*out = NULL;
	r = p11a_client_connect(ctx->socket_path, CLI_CLIENT_NAME, ctx->timeout_ms, out,
				why, sizeof(why));
	if (r == 0)
		return CLI_EXIT_OK;
	*out = NULL;
	cli_err("%s", why);
	return CLI_EXIT_FAIL;
}

int
cli_list(struct p11a_client *c, struct p11a_msg *reply)
{
	int r;

	r = p11a_client_list(c, reply);
	if (r != 0)
		return cli_fail(c, r, "list");
	if (reply->type != P11A_MSG_LIST_REPLY) {
		p11a_msg_clear(reply);
		cli_err("list: unexpected reply from the agent");
		return CLI_EXIT_FAIL;
	}
	return CLI_EXIT_OK;
}

int
cli_find_key(const struct p11a_list_reply *l, const char *uri,
	     const struct p11a_key **out)
{
	uint32_t idx[P11A_LIST_MAX];
	size_t i, n = 0;
	int r;

	*out = NULL;
	r = p11a_list_match_keys(l, uri, idx, P11A_LIST_MAX, &n);
	if (r == -P11A_E_URI) {
		cli_err("'%s': not a valid pkcs11: URI", uri);
		return CLI_EXIT_USAGE;
	}
	if (r != 0) {
		cli_err("'%s': %s", uri, p11a_strerror(r));
		return CLI_EXIT_FAIL;
	}
	if (n == 0) {
		cli_err("%s: no such key", uri);
		return CLI_EXIT_FAIL;
	}
	if (n > 1) {
		cli_err("%s: ambiguous, it matches %zu keys:", uri, n);
		for (i = 0; i < n && i < P11A_LIST_MAX; i++) {
			char line[P11A_URI_MAX + 16];

			snprintf(line, sizeof(line), "  %s", l->keys[idx[i]].uri ? l->keys[idx[i]].uri : "");
			p11a_text_scrub(line);
			fprintf(stderr, "%s\n", line);
		}
		return CLI_EXIT_FAIL;
	}
	*out = &l->keys[idx[0]];
	return CLI_EXIT_OK;
}

void
cli_key_desc(const struct p11a_key *k, char *out, size_t out_size)
{
	const char *curve = k->curve != NULL ? k->curve : "";

	switch (k->type) {
	case P11A_KEY_RSA:
		snprintf(out, out_size, "RSA %u", (unsigned)k->bits);
		break;
	case P11A_KEY_EC:
		if (*curve != '\0')
			snprintf(out, out_size, "EC %s", curve);
		else
			snprintf(out, out_size, "EC %u-bit", (unsigned)k->bits);
		break;
	case P11A_KEY_ED25519:
		snprintf(out, out_size, "Ed25519");
		break;
	default:
		snprintf(out, out_size, "unknown key type %u", (unsigned)k->type);
		break;
	}
}

char *
cli_hex(const uint8_t *data, size_t len)
{
	static const char digits[] = "0123456789abcdef";
	char *s;
	size_t i;

	if (len > (SIZE_MAX - 1) / 2)
		return NULL;
	s = malloc(2 * len + 1);
	if (s == NULL)
		return NULL;
	for (i = 0; i < len; i++) {
		s[2 * i] = digits[data[i] >> 4];
		s[2 * i + 1] = digits[data[i] & 0x0f];
	}
	s[2 * len] = '\0';
	return s;
}

/* ================================================================ files */

static int
is_stdio_name(const char *path)
{
	return path == NULL || strcmp(path, "-") == 0;
}

/* Hashes what is in buf, then the rest of fd, into a new digest block. */
static int
hash_rest(int fd, const char *name, int hash, uint8_t *buf, size_t used, size_t cap,
	  uint8_t **data, size_t *len)
{
	unsigned char md_out[EVP_MAX_MD_SIZE];
	unsigned int md_len = 0;
	EVP_MD_CTX *ctx = NULL;
	EVP_MD *md = NULL;
	int rc = CLI_EXIT_FAIL;

	md = EVP_MD_fetch(NULL, p11a_hash_name(hash), NULL);
	ctx = EVP_MD_CTX_new();
	if (md == NULL || ctx == NULL || EVP_DigestInit_ex(ctx, md, NULL) != 1 ||
	    EVP_DigestUpdate(ctx, buf, used) != 1)
		goto crypto;
	for (;;) {
		ssize_t n = read(fd, buf, cap);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			cli_err("%s: %s", name, strerror(errno));
			goto out;
		}
		if (n == 0)
			break;
		if (EVP_DigestUpdate(ctx, buf, (size_t)n) != 1)
			goto crypto;
	}
	if (EVP_DigestFinal_ex(ctx, md_out, &md_len) != 1 || md_len != p11a_hash_len(hash))
		goto crypto;
	*data = malloc(md_len);
	if (*data == NULL) {
		cli_err("%s: %s", name, strerror(ENOMEM));
		goto out;
	}
	memcpy(*data, md_out, md_len);
	*len = md_len;
	rc = CLI_EXIT_OK;
	goto out;
crypto:
	cli_err("%s: hashing with %s failed", name, p11a_hash_name(hash));
out:
	EVP_MD_CTX_free(ctx);
	EVP_MD_free(md);
	return rc;
}

int
cli_read_input(const char *path, size_t max, int hash_if_larger,
	       uint8_t **data, size_t *len, int *hashed)
{
	const char *name = is_stdio_name(path) ? "standard input" : path;
	uint8_t *buf = NULL;
	size_t used = 0, cap = 0;
	int fd, rc = CLI_EXIT_FAIL;

	*data = NULL;
	*len = 0;
	*hashed = 0;
	if (is_stdio_name(path)) {
		fd = STDIN_FILENO;
	} else {
		fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
		if (fd < 0) {
			cli_err("%s: %s", path, strerror(errno));
			return CLI_EXIT_FAIL;
		}
	}
	for (;;) {
		ssize_t n;

		if (used == cap) {
			/* Grow to max + 1 at most: one byte more tells "too large". */
			size_t ncap = cap == 0 ? 4096 : cap * 2;
			uint8_t *nbuf;

			if (ncap > max + 1 || ncap < cap)
				ncap = max + 1;
			nbuf = realloc(buf, ncap);
			if (nbuf == NULL) {
				cli_err("%s: %s", name, strerror(ENOMEM));
				goto out;
			}
			buf = nbuf;
			cap = ncap;
		}
		n = read(fd, buf + used, cap - used);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			cli_err("%s: %s", name, strerror(errno));
			goto out;
		}
		if (n == 0)
			break;
		used += (size_t)n;
		if (used > max)
			goto too_large;
	}
	if (buf == NULL) {
		buf = malloc(1);
		if (buf == NULL) {
			cli_err("%s: %s", name, strerror(ENOMEM));
			goto out;
		}
	}
	*data = buf;
	*len = used;
	buf = NULL;
	rc = CLI_EXIT_OK;
	goto out;
too_large:
	if (hash_if_larger != P11A_HASH_NONE && p11a_hash_len(hash_if_larger) != 0) {
		rc = hash_rest(fd, name, hash_if_larger, buf, used, cap, data, len);
		if (rc == CLI_EXIT_OK)
			*hashed = 1;
		goto out;
	}
	cli_err("%s: larger than the limit of %zu bytes", name, max);
out:
	free(buf);
	if (fd != STDIN_FILENO)
		close(fd);
	return rc;
}

static int
write_all(int fd, const void *data, size_t len)
{
	const uint8_t *p = data;

	while (len > 0) {
		ssize_t n = write(fd, p, len);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

int
cli_refuse_binary_tty(const char *path, const char *what)
{
	if (is_stdio_name(path) && isatty(STDOUT_FILENO)) {
		cli_err("refusing to write %s to a terminal; use --out FILE or redirect standard output",
			what);
		return 1;
	}
	return 0;
}

int
cli_write_output(const char *path, const void *data, size_t len, int binary)
{
	int fd, saved_errno;

	if (is_stdio_name(path)) {
		if (binary && cli_refuse_binary_tty(path, "binary data"))
			return CLI_EXIT_FAIL;
		/* Anything printed through stdio goes first. */
		if (fflush(stdout) != 0)
			return cli_finish_stdout(CLI_EXIT_FAIL);
		if (write_all(STDOUT_FILENO, data, len) != 0) {
			if (errno != EPIPE)
				cli_err("writing to standard output: %s", strerror(errno));
			return CLI_EXIT_FAIL;
		}
		return CLI_EXIT_OK;
	}
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOCTTY, 0666);
	if (fd < 0) {
		cli_err("%s: %s", path, strerror(errno));
		return CLI_EXIT_FAIL;
	}
	if (write_all(fd, data, len) != 0) {
		saved_errno = errno;
		(void)close(fd);
		goto fail;
	}
	if (close(fd) != 0) {
		saved_errno = errno;
		goto fail;
	}
	return CLI_EXIT_OK;
fail:
	cli_err("%s: %s", path, strerror(saved_errno));
	/* Leave no truncated signature or key behind. */
	(void)unlink(path);
	return CLI_EXIT_FAIL;
}

int
cli_finish_stdout(int rc)
{
	errno = 0;
	if (fflush(stdout) != 0 || ferror(stdout)) {
		if (errno != EPIPE)
			cli_err("writing to standard output: %s",
				errno != 0 ? strerror(errno) : "write error");
		return CLI_EXIT_FAIL;
	}
	return rc;
}

/* ================================================================ PINs */

static volatile sig_atomic_t pin_signo;

static void
pin_on_signal(int signo)
{
	pin_signo = signo;
}

/*
 * Reads one line from fd into pin (P11A_PIN_MAX + 1 bytes), one byte per
 * read(2) so that nothing past the line is consumed or buffered.
 * Returns 0 at the end of the line or input, 1 when a signal caught by
 * pin_on_signal() interrupted it, -1 on a read error (errno set).
 * *toolong is set when the line did not fit; the excess is discarded.
 */
static int
pin_read_line(int fd, char *pin, size_t *len, int *toolong)
{
	size_t n = 0;
	char ch = 0;
	int rc = 0;

	*toolong = 0;
	for (;;) {
		ssize_t r;

		if (pin_signo != 0) {
			rc = 1;
			break;
		}
		r = read(fd, &ch, 1);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			rc = -1;
			break;
		}
		if (r == 0 || ch == '\n')
			break;
		if (n < P11A_PIN_MAX)
			pin[n++] = ch;
		else
			*toolong = 1;
	}
	if (n > 0 && pin[n - 1] == '\r')
		n--;
	pin[n] = '\0';
	*len = n;
	p11a_wipe(&ch, sizeof(ch));
	return rc;
}

static int
pin_check(int rc, int toolong, int saved_errno, const char *what,
	  char *pin, size_t *len)
{
	if (rc == 0 && !toolong)
		return CLI_EXIT_OK;
	p11a_wipe(pin, P11A_PIN_MAX + 1);
	*len = 0;
	if (rc < 0)
		cli_err("reading the PIN from %s: %s", what, strerror(saved_errno));
	else if (rc > 0)
		cli_err("PIN entry interrupted");
	else
		cli_err("PIN from %s is longer than %d bytes", what, P11A_PIN_MAX);
	return CLI_EXIT_FAIL;
}

int
cli_read_pin_tty(const char *prompt, char *pin, size_t *len)
{
	/* Signals that would otherwise leave the terminal without echo. */
	static const int sigs[] = {
		SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGTSTP, SIGTTIN, SIGTTOU
	};
	enum { NSIGS = sizeof(sigs) / sizeof(sigs[0]) };
	struct sigaction sa, old[NSIGS];
	struct termios saved, quiet;
	int fd, rc, toolong = 0, saved_errno = 0, signo;
	size_t i;

	*len = 0;
	pin[0] = '\0';
	fd = open("/dev/tty", O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (fd < 0) {
		cli_err("cannot open /dev/tty to ask for the PIN: %s (use --pin-stdin or --pin-file)",
			strerror(errno));
		return CLI_EXIT_FAIL;
	}
again:
	pin_signo = 0;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = pin_on_signal;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = 0;            /* no SA_RESTART: read(2) must return EINTR */
	for (i = 0; i < NSIGS; i++)
		(void)sigaction(sigs[i], &sa, &old[i]);

	if (tcgetattr(fd, &saved) != 0) {
		saved_errno = errno;
		for (i = 0; i < NSIGS; i++)
			(void)sigaction(sigs[i], &old[i], NULL);
		close(fd);
		cli_err("/dev/tty: %s", strerror(saved_errno));
		return CLI_EXIT_FAIL;
	}
	quiet = saved;
	quiet.c_lflag &= ~(tcflag_t)(ECHO | ECHOE | ECHOK | ECHONL);
	if (tcsetattr(fd, TCSAFLUSH, &quiet) != 0) {
		rc = -1;
		saved_errno = errno;
	} else {
		rc = write_all(fd, prompt, strlen(prompt));
		saved_errno = errno;
		if (rc == 0) {
			rc = pin_read_line(fd, pin, len, &toolong);
			saved_errno = errno;
		}
		/* The user's Enter was not echoed. */
		(void)write_all(fd, "\n", 1);
	}
	/* Restore on every path: success, error, or a signal. */
	while (tcsetattr(fd, TCSAFLUSH, &saved) != 0 && errno == EINTR)
		;
	for (i = 0; i < NSIGS; i++)
		(void)sigaction(sigs[i], &old[i], NULL);

	signo = pin_signo;
	if (signo != 0) {
		p11a_wipe(pin, P11A_PIN_MAX + 1);
		*len = 0;
		toolong = 0;
		/* Now with the caller's disposition: usually terminates or stops. */
		(void)kill(getpid(), signo);
		if (signo == SIGTSTP || signo == SIGTTIN || signo == SIGTTOU)
			goto again;   /* continued after a stop: ask again */
		rc = 1;
	}
	close(fd);
	return pin_check(rc, toolong, saved_errno, "/dev/tty", pin, len);
}

int
cli_read_pin_fd(int fd, const char *what, char *pin, size_t *len)
{
	int rc, toolong = 0;

	*len = 0;
	pin[0] = '\0';
	pin_signo = 0;
	rc = pin_read_line(fd, pin, len, &toolong);
	return pin_check(rc, toolong, errno, what, pin, len);
}

int
cli_read_pin_file(const char *path, char *pin, size_t *len)
{
	struct stat st;
	int fd, rc;

	*len = 0;
	pin[0] = '\0';
	fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
	if (fd < 0) {
		cli_err("%s: %s", path, strerror(errno));
		return CLI_EXIT_FAIL;
	}
	if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
	    (st.st_mode & (S_IRWXG | S_IRWXO)) != 0)
		cli_err("warning: PIN file %s is accessible by other users (mode %04o)",
			path, (unsigned)(st.st_mode & 07777));
	rc = cli_read_pin_fd(fd, path, pin, len);
	close(fd);
	return rc;
}
