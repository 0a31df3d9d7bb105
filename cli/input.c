/*
 * p11agent: input and output files, and the signing input read from one
 * (whole up to P11A_SIGN_MSG_MAX, hashed here past it: common/sigin.h).
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "sigin.h"

#define READ_CHUNK 65536

static int
is_stdio_name(const char *path)
{
	return path == NULL || strcmp(path, "-") == 0;
}

int
cli_read_input(const char *path, int hash_if_larger, uint8_t **data, size_t *len, int *hashed)
{
	const char *name = is_stdio_name(path) ? "standard input" : path;
	struct p11a_sigin in;
	const uint8_t *got;
	uint8_t *chunk = NULL;
	size_t got_len;
	int fd, r, rc = CLI_EXIT_FAIL;

	*data = NULL;
	*len = 0;
	*hashed = 0;
	p11a_sigin_init(&in, hash_if_larger, NULL);
	if (is_stdio_name(path)) {
		fd = STDIN_FILENO;
	} else {
		fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
		if (fd < 0) {
			cli_err("%s: %s", path, strerror(errno));
			return CLI_EXIT_FAIL;
		}
	}
	if ((chunk = malloc(READ_CHUNK)) == NULL) {
		r = -P11A_E_NOMEM;
		goto fail;
	}
	for (;;) {
		ssize_t n = read(fd, chunk, READ_CHUNK);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			cli_err("%s: %s", name, strerror(errno));
			goto out;
		}
		if (n == 0)
			break;
		if ((r = p11a_sigin_update(&in, chunk, (size_t)n)) != 0)
			goto fail;
	}
	if ((r = p11a_sigin_final(&in, &got, &got_len, hashed)) != 0)
		goto fail;
	/* malloc(0) may be NULL: one byte more, so an empty message is not an error. */
	if ((*data = malloc(got_len + 1)) == NULL) {
		r = -P11A_E_NOMEM;
		*hashed = 0;
		goto fail;
	}
	memcpy(*data, got, got_len);
	*len = got_len;
	rc = CLI_EXIT_OK;
	goto out;
fail:
	if (r == -P11A_E_TOO_LARGE)
		cli_err("%s: larger than the limit of %u bytes", name, (unsigned)P11A_SIGN_MSG_MAX);
	else if (r == -P11A_E_NOMEM)
		cli_err("%s: %s", name, strerror(ENOMEM));
	else
		cli_err("%s: hashing with %s failed", name, p11a_hash_name(hash_if_larger));
out:
	if (chunk != NULL) {
		p11a_wipe(chunk, READ_CHUNK);
		free(chunk);
	}
	p11a_sigin_clear(&in);
	if (fd != STDIN_FILENO)
		close(fd);
	return rc;
}

int
cli_write_all(int fd, const void *data, size_t len)
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
		if (cli_write_all(STDOUT_FILENO, data, len) != 0) {
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
	if (cli_write_all(fd, data, len) != 0) {
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
