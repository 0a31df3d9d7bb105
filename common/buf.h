/*
 * Bounded byte buffer, after OpenSSH's sshbuf.
 *
 * A buffer holds at most 'max' bytes; every put that would exceed it fails
 * with -P11A_E_TOO_LARGE and leaves the buffer unchanged.  Gets read from
 * the front and advance; a get that would read past the end fails with
 * -P11A_E_TRUNCATED and consumes nothing.  Integers are big-endian.
 * A "string" is a u32 length followed by that many bytes.
 * p11a_buf_free() wipes the storage before freeing it.
 */
#ifndef P11A_BUF_H
#define P11A_BUF_H

#include <stddef.h>
#include <stdint.h>

struct p11a_buf;

/* New empty buffer that may grow up to max bytes. NULL on allocation failure. */
struct p11a_buf *p11a_buf_new(size_t max);
/* Read-only buffer over a copy of data[0..len). NULL on failure. */
struct p11a_buf *p11a_buf_from(const void *data, size_t len);
/* Wipes and frees; NULL is fine. */
void p11a_buf_free(struct p11a_buf *b);
/* Empties (wipes the old bytes) and keeps the allocation. */
void p11a_buf_reset(struct p11a_buf *b);
/*
 * Resets b (wiped) and, when its storage grew past keep bytes, gives the
 * storage back: an idle buffer that once held a large frame does not keep
 * it.  On allocation failure b keeps its old (wiped) storage.
 */
void p11a_buf_trim(struct p11a_buf *b, size_t keep);

size_t p11a_buf_len(const struct p11a_buf *b);       /* unread bytes */
size_t p11a_buf_max(const struct p11a_buf *b);
const uint8_t *p11a_buf_ptr(const struct p11a_buf *b); /* first unread byte */
/* Drops n unread bytes from the front; -P11A_E_TRUNCATED if fewer. */
int p11a_buf_consume(struct p11a_buf *b, size_t n);
/*
 * Reserves n writable bytes at the end and returns them in *out (for
 * read(2) into the buffer); the bytes count as data once reserved, so a
 * short read must be followed by p11a_buf_unreserve(b, n - got).
 */
int p11a_buf_reserve(struct p11a_buf *b, size_t n, uint8_t **out);
int p11a_buf_unreserve(struct p11a_buf *b, size_t n);

int p11a_buf_put(struct p11a_buf *b, const void *data, size_t len);
int p11a_buf_put_u8(struct p11a_buf *b, uint8_t v);
int p11a_buf_put_u16(struct p11a_buf *b, uint16_t v);
int p11a_buf_put_u32(struct p11a_buf *b, uint32_t v);
int p11a_buf_put_u64(struct p11a_buf *b, uint64_t v);
int p11a_buf_put_string(struct p11a_buf *b, const void *data, size_t len);
/* NUL-terminated text as a string; NULL puts an empty string. */
int p11a_buf_put_cstring(struct p11a_buf *b, const char *s);

int p11a_buf_get(struct p11a_buf *b, void *out, size_t len);
int p11a_buf_get_u8(struct p11a_buf *b, uint8_t *v);
int p11a_buf_get_u16(struct p11a_buf *b, uint16_t *v);
int p11a_buf_get_u32(struct p11a_buf *b, uint32_t *v);
int p11a_buf_get_u64(struct p11a_buf *b, uint64_t *v);
/*
 * String without copying: *ptr points into the buffer (valid until the
 * next change to b), *len its length.  Fails with -P11A_E_TOO_LARGE when
 * the length exceeds maxlen, -P11A_E_TRUNCATED when fewer bytes remain.
 */
int p11a_buf_get_string_direct(struct p11a_buf *b, const uint8_t **ptr, size_t *len, size_t maxlen);
/* String copied into a new malloc'd block (NUL appended, *len excludes it). */
int p11a_buf_get_string_dup(struct p11a_buf *b, uint8_t **out, size_t *len, size_t maxlen);
/*
 * Text: like get_string_dup, and fails with -P11A_E_MALFORMED if the bytes
 * contain a NUL (text fields are NUL-free UTF-8, not checked further).
 */
int p11a_buf_get_cstring(struct p11a_buf *b, char **out, size_t maxlen);

#endif
