/*
 * Signing input: whole message up to the cap, a local digest past it.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "p11a.h"
#include "hashalg.h"
#include "sigin.h"

#define BUF_START 4096u

void
p11a_sigin_init(struct p11a_sigin *in, int hash, OSSL_LIB_CTX *libctx)
{
	memset(in, 0, sizeof(*in));
	in->hash = hash;
	in->libctx = libctx;
}

static void
drop_buf(struct p11a_sigin *in)
{
	if (in->buf != NULL) {
		p11a_wipe(in->buf, in->cap);
		free(in->buf);
	}
	in->buf = NULL;
	in->len = in->cap = 0;
}

void
p11a_sigin_clear(struct p11a_sigin *in)
{
	if (in == NULL)
		return;
	drop_buf(in);
	EVP_MD_CTX_free(in->md);        /* wipes the digest state */
	p11a_wipe(in, sizeof(*in));
}

void
p11a_sigin_reset(struct p11a_sigin *in)
{
	int hash = in->hash;
	OSSL_LIB_CTX *libctx = in->libctx;

	p11a_sigin_clear(in);
	p11a_sigin_init(in, hash, libctx);
}

int
p11a_sigin_started(const struct p11a_sigin *in)
{
	return in->len > 0 || in->md != NULL || in->err != 0;
}

/* Past the cap: from here on the input is hashed, starting with what was kept. */
static int
start_hash(struct p11a_sigin *in)
{
	const struct p11a_hashalg *a = p11a_hashalg_by_id(in->hash);
	EVP_MD *md = NULL;
	int r = -P11A_E_CRYPTO;

	if (a == NULL)
		return -P11A_E_TOO_LARGE;
	if ((md = EVP_MD_fetch(in->libctx, a->ossl_name, NULL)) == NULL ||
	    (in->md = EVP_MD_CTX_new()) == NULL ||
	    EVP_DigestInit_ex2(in->md, md, NULL) != 1 ||
	    (in->len > 0 && EVP_DigestUpdate(in->md, in->buf, in->len) != 1)) {
		EVP_MD_CTX_free(in->md);
		in->md = NULL;
		goto out;
	}
	drop_buf(in);
	r = 0;
out:
	EVP_MD_free(md);
	return r;
}

/* Room for n more bytes, n <= P11A_SIGN_MSG_MAX - len.  Not realloc: the old buffer is wiped. */
static int
grow(struct p11a_sigin *in, size_t n)
{
	size_t cap = in->cap != 0 ? in->cap : BUF_START, len;
	uint8_t *nb;

	while (cap - in->len < n)
		cap *= 2;
	if (cap > P11A_SIGN_MSG_MAX)
		cap = P11A_SIGN_MSG_MAX;
	if ((nb = malloc(cap)) == NULL)
		return -P11A_E_NOMEM;
	len = in->len;
	if (len > 0)
		memcpy(nb, in->buf, len);
	drop_buf(in);
	in->buf = nb;
	in->len = len;
	in->cap = cap;
	return 0;
}

int
p11a_sigin_update(struct p11a_sigin *in, const void *data, size_t n)
{
	int r;

	if (in->err != 0)
		return in->err;
	if (in->final)
		return -P11A_E_PROTOCOL;
	if (n == 0)
		return 0;
	if (in->md == NULL && n > P11A_SIGN_MSG_MAX - in->len && (r = start_hash(in)) != 0)
		goto fail;
	if (in->md != NULL) {
		if (EVP_DigestUpdate(in->md, data, n) != 1) {
			r = -P11A_E_CRYPTO;
			goto fail;
		}
		return 0;
	}
	if (n > in->cap - in->len && (r = grow(in, n)) != 0)
		goto fail;
	memcpy(in->buf + in->len, data, n);
	in->len += n;
	return 0;
fail:
	in->err = r;
	return r;
}

int
p11a_sigin_final(struct p11a_sigin *in, const uint8_t **data, size_t *len, int *hashed)
{
	unsigned int dlen = 0;

	*data = NULL;
	*len = 0;
	*hashed = 0;
	if (in->err != 0)
		return in->err;
	if (!in->final && in->md != NULL) {
		if (EVP_DigestFinal_ex(in->md, in->digest, &dlen) != 1) {
			in->err = -P11A_E_CRYPTO;
			return in->err;
		}
		in->digest_len = dlen;
	}
	in->final = 1;
	if (in->md != NULL) {
		*data = in->digest;
		*len = in->digest_len;
		*hashed = 1;
	} else {
		*data = in->buf != NULL ? in->buf : (const uint8_t *)"";
		*len = in->len;
	}
	return 0;
}

int
p11a_sigin_copy(struct p11a_sigin *dst, const struct p11a_sigin *src)
{
	*dst = *src;
	dst->buf = NULL;
	dst->md = NULL;
	if (src->buf != NULL) {
		if ((dst->buf = malloc(src->cap)) == NULL) {
			p11a_sigin_clear(dst);
			return -P11A_E_NOMEM;
		}
		memcpy(dst->buf, src->buf, src->len);
	}
	if (src->md != NULL &&
	    ((dst->md = EVP_MD_CTX_new()) == NULL || EVP_MD_CTX_copy_ex(dst->md, src->md) != 1)) {
		p11a_sigin_clear(dst);
		return -P11A_E_CRYPTO;
	}
	return 0;
}
