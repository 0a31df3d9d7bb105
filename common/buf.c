/*
 * Bounded byte buffer, after OpenSSH's sshbuf.
 *
 * Storage: d[0..alloc); unread data is d[off..size).  Growing never uses
 * realloc(): the live bytes are copied to a new block and the old one is
 * wiped before it is freed, so no stale copy of a secret stays on the heap.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include "p11a.h"
#include "buf.h"

#define BUF_ALLOC_MIN	256

struct p11a_buf {
	uint8_t *d;
	size_t off;         /* first unread byte */
	size_t size;        /* end of data */
	size_t alloc;       /* bytes allocated at d */
	size_t max;         /* most unread bytes the buffer may hold */
	size_t dirty;       /* d[0..dirty) may hold data not yet wiped */
	int readonly;
};

struct p11a_buf *
p11a_buf_new(size_t max)
{
	struct p11a_buf *b;

	if ((b = calloc(1, sizeof(*b))) == NULL)
		return NULL;
	b->alloc = max < BUF_ALLOC_MIN ? max : BUF_ALLOC_MIN;
	if (b->alloc == 0)
		b->alloc = 1;    /* so p11a_buf_ptr() is never NULL */
	if ((b->d = calloc(1, b->alloc)) == NULL) {
		free(b);
		return NULL;
	}
	b->max = max;
	return b;
}

struct p11a_buf *
p11a_buf_from(const void *data, size_t len)
{
	struct p11a_buf *b;

	if (data == NULL && len != 0)
		return NULL;
	if ((b = calloc(1, sizeof(*b))) == NULL)
		return NULL;
	b->alloc = len == 0 ? 1 : len;
	if ((b->d = malloc(b->alloc)) == NULL) {
		free(b);
		return NULL;
	}
	if (len != 0)
		memcpy(b->d, data, len);
	b->size = len;
	b->max = len;
	b->dirty = len;
	b->readonly = 1;
	return b;
}

void
p11a_buf_free(struct p11a_buf *b)
{
	if (b == NULL)
		return;
	p11a_wipe(b->d, b->alloc);
	free(b->d);
	p11a_wipe(b, sizeof(*b));
	free(b);
}

void
p11a_buf_reset(struct p11a_buf *b)
{
	if (b == NULL)
		return;
	p11a_wipe(b->d, b->dirty);
	b->off = 0;
	b->size = 0;
	b->dirty = 0;
}

void
p11a_buf_trim(struct p11a_buf *b, size_t keep)
{
	uint8_t *d;
	size_t n;

	if (b == NULL || b->readonly)
		return;
	p11a_buf_reset(b);
	n = b->max < BUF_ALLOC_MIN ? b->max : BUF_ALLOC_MIN;
	if (n == 0)
		n = 1;
	if (b->alloc <= keep || b->alloc <= n || (d = calloc(1, n)) == NULL)
		return;
	p11a_wipe(b->d, b->alloc);
	free(b->d);
	b->d = d;
	b->alloc = n;
}

size_t
p11a_buf_len(const struct p11a_buf *b)
{
	return b->size - b->off;
}

size_t
p11a_buf_max(const struct p11a_buf *b)
{
	return b->max;
}

const uint8_t *
p11a_buf_ptr(const struct p11a_buf *b)
{
	return b->d + b->off;
}

int
p11a_buf_consume(struct p11a_buf *b, size_t n)
{
	if (p11a_buf_len(b) < n)
		return -P11A_E_TRUNCATED;
	b->off += n;
	if (b->off == b->size && !b->readonly) {
		/*
		 * Empty: later puts start at the front again.  The bytes stay
		 * (a get_string_direct pointer may still use them) and are
		 * wiped by reset, growth or free, which cover d[0..dirty).
		 */
		b->off = 0;
		b->size = 0;
	}
	return 0;
}

/* Makes room for n more bytes at the end. */
static int
buf_make_room(struct p11a_buf *b, size_t n)
{
	size_t used = p11a_buf_len(b);
	size_t need, nalloc;
	uint8_t *nd;

	if (b->readonly)
		return -P11A_E_INTERNAL;
	/* used <= max always holds, so this cannot wrap. */
	if (b->max - used < n)
		return -P11A_E_TOO_LARGE;
	if (b->alloc - b->size >= n)
		return 0;
	need = used + n;
	if (need <= b->alloc) {
		/* Enough space once the consumed prefix is dropped. */
		memmove(b->d, b->d + b->off, used);
		b->off = 0;
		b->size = used;
		return 0;
	}
	nalloc = b->alloc <= b->max / 2 ? b->alloc * 2 : b->max;
	if (nalloc < need)
		nalloc = need;
	if ((nd = malloc(nalloc)) == NULL)
		return -P11A_E_NOMEM;
	memcpy(nd, b->d + b->off, used);
	p11a_wipe(b->d, b->dirty);
	free(b->d);
	b->d = nd;
	b->alloc = nalloc;
	b->off = 0;
	b->size = used;
	b->dirty = used;
	return 0;
}

int
p11a_buf_reserve(struct p11a_buf *b, size_t n, uint8_t **out)
{
	int r;

	*out = NULL;
	if ((r = buf_make_room(b, n)) != 0)
		return r;
	*out = b->d + b->size;
	b->size += n;
	if (b->dirty < b->size)
		b->dirty = b->size;
	return 0;
}

int
p11a_buf_unreserve(struct p11a_buf *b, size_t n)
{
	if (p11a_buf_len(b) < n)
		return -P11A_E_TRUNCATED;
	b->size -= n;
	p11a_wipe(b->d + b->size, n);
	return 0;
}

int
p11a_buf_put(struct p11a_buf *b, const void *data, size_t len)
{
	uint8_t *p;
	int r;

	if (len == 0)
		return b->readonly ? -P11A_E_INTERNAL : 0;
	if (data == NULL)
		return -P11A_E_INTERNAL;
	if ((r = p11a_buf_reserve(b, len, &p)) != 0)
		return r;
	memcpy(p, data, len);
	return 0;
}

int
p11a_buf_put_u8(struct p11a_buf *b, uint8_t v)
{
	return p11a_buf_put(b, &v, 1);
}

int
p11a_buf_put_u16(struct p11a_buf *b, uint16_t v)
{
	uint8_t x[2] = { (uint8_t)(v >> 8), (uint8_t)v };

	return p11a_buf_put(b, x, sizeof(x));
}

int
p11a_buf_put_u32(struct p11a_buf *b, uint32_t v)
{
	uint8_t x[4] = {
		(uint8_t)(v >> 24), (uint8_t)(v >> 16), (uint8_t)(v >> 8), (uint8_t)v
	};

	return p11a_buf_put(b, x, sizeof(x));
}

int
p11a_buf_put_u64(struct p11a_buf *b, uint64_t v)
{
	uint8_t x[8];

	for (int i = 0; i < 8; i++)
		x[i] = (uint8_t)(v >> (56 - 8 * i));
	return p11a_buf_put(b, x, sizeof(x));
}

int
p11a_buf_put_string(struct p11a_buf *b, const void *data, size_t len)
{
	uint8_t *p;
	int r;

	if (len > UINT32_MAX || (len != 0 && data == NULL))
		return len > UINT32_MAX ? -P11A_E_TOO_LARGE : -P11A_E_INTERNAL;
	/* One reservation so a failure leaves b unchanged. */
	if (len > SIZE_MAX - 4)
		return -P11A_E_TOO_LARGE;
	if ((r = p11a_buf_reserve(b, 4 + len, &p)) != 0)
		return r;
	p[0] = (uint8_t)(len >> 24);
	p[1] = (uint8_t)(len >> 16);
	p[2] = (uint8_t)(len >> 8);
	p[3] = (uint8_t)len;
	if (len != 0)
		memcpy(p + 4, data, len);
	return 0;
}

int
p11a_buf_put_cstring(struct p11a_buf *b, const char *s)
{
	if (s == NULL)
		s = "";
	return p11a_buf_put_string(b, s, strlen(s));
}

int
p11a_buf_get(struct p11a_buf *b, void *out, size_t len)
{
	if (p11a_buf_len(b) < len)
		return -P11A_E_TRUNCATED;
	if (len != 0)
		memcpy(out, p11a_buf_ptr(b), len);
	return p11a_buf_consume(b, len);
}

int
p11a_buf_get_u8(struct p11a_buf *b, uint8_t *v)
{
	return p11a_buf_get(b, v, 1);
}

int
p11a_buf_get_u16(struct p11a_buf *b, uint16_t *v)
{
	uint8_t x[2];
	int r;

	if ((r = p11a_buf_get(b, x, sizeof(x))) != 0)
		return r;
	*v = (uint16_t)((x[0] << 8) | x[1]);
	return 0;
}

static uint32_t
peek_u32(const uint8_t *p)
{
	return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) |
	    ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

int
p11a_buf_get_u32(struct p11a_buf *b, uint32_t *v)
{
	uint8_t x[4];
	int r;

	if ((r = p11a_buf_get(b, x, sizeof(x))) != 0)
		return r;
	*v = peek_u32(x);
	return 0;
}

int
p11a_buf_get_u64(struct p11a_buf *b, uint64_t *v)
{
	uint8_t x[8];
	int r;

	if ((r = p11a_buf_get(b, x, sizeof(x))) != 0)
		return r;
	*v = (uint64_t)peek_u32(x) << 32 | peek_u32(x + 4);
	return 0;
}

/* Checks the string at the front of b without consuming it. */
static int
buf_peek_string(const struct p11a_buf *b, const uint8_t **ptr, size_t *len, size_t maxlen)
{
	uint32_t n;

	*ptr = NULL;
	*len = 0;
	if (p11a_buf_len(b) < 4)
		return -P11A_E_TRUNCATED;
	n = peek_u32(p11a_buf_ptr(b));
	if (n > maxlen)
		return -P11A_E_TOO_LARGE;
	if (p11a_buf_len(b) - 4 < n)
		return -P11A_E_TRUNCATED;
	*ptr = p11a_buf_ptr(b) + 4;
	*len = n;
	return 0;
}

int
p11a_buf_get_string_direct(struct p11a_buf *b, const uint8_t **ptr, size_t *len, size_t maxlen)
{
	const uint8_t *p;
	size_t n;
	int r;

	*ptr = NULL;
	*len = 0;
	if ((r = buf_peek_string(b, &p, &n, maxlen)) != 0)
		return r;
	if ((r = p11a_buf_consume(b, 4 + n)) != 0)
		return r;
	*ptr = p;
	*len = n;
	return 0;
}

int
p11a_buf_get_string_dup(struct p11a_buf *b, uint8_t **out, size_t *len, size_t maxlen)
{
	const uint8_t *p;
	uint8_t *copy;
	size_t n;
	int r;

	*out = NULL;
	if (len != NULL)
		*len = 0;
	/* The length is checked against the data before anything is allocated. */
	if ((r = buf_peek_string(b, &p, &n, maxlen)) != 0)
		return r;
	if ((copy = malloc(n + 1)) == NULL)
		return -P11A_E_NOMEM;
	if (n != 0)
		memcpy(copy, p, n);
	copy[n] = '\0';
	if ((r = p11a_buf_consume(b, 4 + n)) != 0) {
		free(copy);
		return r;
	}
	*out = copy;
	if (len != NULL)
		*len = n;
	return 0;
}

int
p11a_buf_get_cstring(struct p11a_buf *b, char **out, size_t maxlen)
{
	const uint8_t *p;
	uint8_t *copy;
	size_t n;
	int r;

	*out = NULL;
	if ((r = buf_peek_string(b, &p, &n, maxlen)) != 0)
		return r;
	if (n != 0 && memchr(p, '\0', n) != NULL)
		return -P11A_E_MALFORMED;
	if ((r = p11a_buf_get_string_dup(b, &copy, NULL, maxlen)) != 0)
		return r;
	*out = (char *)copy;
	return 0;
}
