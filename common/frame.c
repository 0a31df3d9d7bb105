/* The framing layer: see frame.h. */
#include "config.h"
#include "frame.h"
#include "p11a.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define FD_PASS_MAX 8   /* descriptors taken per recvmsg; extras are closed */

void
p11a_close_keep_errno(int fd)
{
	int saved = errno;

	if (fd >= 0)
		close(fd);
	errno = saved;
}

void
p11a_frame_hdr_put(uint8_t h[4], uint32_t len)
{
	h[0] = (uint8_t)(len >> 24);
	h[1] = (uint8_t)(len >> 16);
	h[2] = (uint8_t)(len >> 8);
	h[3] = (uint8_t)len;
}

int
p11a_frame_hdr_parse(const uint8_t h[4], size_t max, uint32_t *len)
{
	*len = ((uint32_t)h[0] << 24) | ((uint32_t)h[1] << 16) |
	    ((uint32_t)h[2] << 8) | (uint32_t)h[3];
	if (*len == 0) {
		errno = EPROTO;
		return -P11A_E_MALFORMED;
	}
	if (*len > P11A_FRAME_MAX || *len > max) {
		errno = EMSGSIZE;
		return -P11A_E_TOO_LARGE;
	}
	return 0;
}

int
p11a_frame_eof(int started)
{
	errno = started ? ECONNRESET : 0;
	return -P11A_E_IO;
}

void
p11a_frame_in_init(struct p11a_frame_in *in, struct p11a_buf *body, unsigned flags)
{
	memset(in, 0, sizeof(*in));
	in->body = body;
	in->body_owned = body == NULL;
	in->max = body != NULL ? p11a_buf_max(body) : P11A_FRAME_MAX;
	in->flags = flags;
	in->fd = -1;
}

void
p11a_frame_in_reset(struct p11a_frame_in *in)
{
	if (in->body_owned) {
		p11a_buf_free(in->body);
		in->body = NULL;
	} else if (in->body != NULL) {
		p11a_buf_reset(in->body);
	}
	if (in->fd >= 0)
		p11a_close_keep_errno(in->fd);
	in->fd = -1;
	p11a_wipe(in->hdr, sizeof(in->hdr));
	in->hdr_got = 0;
	in->body_len = 0;
	in->got = 0;
	in->dst = NULL;
	in->started_ms = 0;
}

int
p11a_frame_in_started(const struct p11a_frame_in *in)
{
	return in->hdr_got > 0;
}

/* The header is complete: check it and make room for the body. */
static int
frame_in_hdr_done(struct p11a_frame_in *in)
{
	int r;

	if ((r = p11a_frame_hdr_parse(in->hdr, in->max, &in->body_len)) != 0)
		return r;
	if (in->body_owned) {
		if ((in->body = p11a_buf_new(in->body_len)) == NULL)
			return -P11A_E_NOMEM;
	} else {
		p11a_buf_reset(in->body);
	}
	/* Room for the whole body at once: bytes land there as they come. */
	return p11a_buf_reserve(in->body, in->body_len, &in->dst);
}

static int
frame_in_complete(const struct p11a_frame_in *in)
{
	return in->hdr_got == 4 && in->got == in->body_len;
}

size_t
p11a_frame_in_space(const struct p11a_frame_in *in, uint8_t **p)
{
	if (in->hdr_got < 4) {
		*p = NULL;
		return 0;
	}
	*p = in->dst + in->got;
	return in->body_len - in->got;
}

int
p11a_frame_in_advance(struct p11a_frame_in *in, size_t n)
{
	in->got += n;
	return frame_in_complete(in);
}

/* Bytes of the first byte of a frame arrived. */
static void
frame_in_mark_start(struct p11a_frame_in *in)
{
	if (in->hdr_got == 0 && in->started_ms == 0)
		in->started_ms = p11a_now_ms();
}

int
p11a_frame_in_feed(struct p11a_frame_in *in, const uint8_t *p, size_t n, size_t *used)
{
	size_t k;
	int r;

	*used = 0;
	if (in->hdr_got < 4) {
		if (n == 0)
			return 0;
		frame_in_mark_start(in);
		k = 4 - in->hdr_got < n ? 4 - in->hdr_got : n;
		memcpy(in->hdr + in->hdr_got, p, k);
		in->hdr_got += k;
		*used += k;
		p += k;
		n -= k;
		if (in->hdr_got < 4)
			return 0;
		if ((r = frame_in_hdr_done(in)) != 0)
			return r;
	}
	k = in->body_len - in->got;
	if (k > n)
		k = n;
	if (k > 0) {
		memcpy(in->dst + in->got, p, k);
		in->got += k;
		*used += k;
	}
	return frame_in_complete(in);
}

/* Keeps the first descriptor that came in mh, closes the others. */
static void
frame_in_take_fds(struct p11a_frame_in *in, struct msghdr *mh)
{
	struct cmsghdr *c;
	size_t i, nfds;
	int fd;

	for (c = CMSG_FIRSTHDR(mh); c != NULL; c = CMSG_NXTHDR(mh, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS ||
		    c->cmsg_len < CMSG_LEN(0))
			continue;
		nfds = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (i = 0; i < nfds; i++) {
			memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
			if (in->fd < 0)
				in->fd = fd;
			else
				p11a_close_keep_errno(fd);
		}
	}
	/* A descriptor was sent, but this process had no slot left for it. */
	if ((mh->msg_flags & MSG_CTRUNC) && in->fd < 0)
		in->fd = P11A_FD_LOST;
}

int
p11a_frame_in_recv(struct p11a_frame_in *in, int fd)
{
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(FD_PASS_MAX * sizeof(int))];
	} cm;
	struct iovec iov;
	struct msghdr mh;
	uint8_t *dst;
	ssize_t n;
	int flags, r;

	for (;;) {
		if (in->hdr_got < 4) {
			iov.iov_base = in->hdr + in->hdr_got;
			iov.iov_len = 4 - in->hdr_got;
		} else {
			if (frame_in_complete(in))
				return 1;
			iov.iov_len = p11a_frame_in_space(in, &dst);
			iov.iov_base = dst;
		}
		memset(&mh, 0, sizeof(mh));
		mh.msg_iov = &iov;
		mh.msg_iovlen = 1;
		flags = MSG_DONTWAIT;
		if (in->flags & P11A_FRAME_IN_FDS) {
			mh.msg_control = cm.buf;
			mh.msg_controllen = sizeof(cm.buf);
			flags |= MSG_CMSG_CLOEXEC;
		}
		n = recvmsg(fd, &mh, flags);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 0;
			return -P11A_E_IO;
		}
		if (in->flags & P11A_FRAME_IN_FDS)
			frame_in_take_fds(in, &mh);
		if (n == 0)
			return p11a_frame_eof(p11a_frame_in_started(in));
		if (in->hdr_got < 4) {
			frame_in_mark_start(in);
			in->hdr_got += (size_t)n;
			if (in->hdr_got == 4 && (r = frame_in_hdr_done(in)) != 0)
				return r;
		} else {
			in->got += (size_t)n;
		}
	}
}

/* ------------------------------------------------------------ writer queue */

struct p11a_frame_out_item {
	struct p11a_frame_out_item *next;
	struct p11a_buf *data;      /* [u32 len][body], consumed as written */
	int fd;                     /* descriptor to pass with the first byte, or -1 */
};

int
p11a_frame_out_push(struct p11a_frame_out *q, const struct p11a_buf *body, int fd_to_pass)
{
	struct p11a_frame_out_item *f = NULL;
	size_t len = p11a_buf_len(body);
	uint8_t hdr[4];
	int r;

	if (len == 0) {
		r = -P11A_E_MALFORMED;
		goto fail;
	}
	if (len > P11A_FRAME_MAX) {
		r = -P11A_E_TOO_LARGE;
		goto fail;
	}
	r = -P11A_E_NOMEM;
	if ((f = calloc(1, sizeof(*f))) == NULL || (f->data = p11a_buf_new(len + 4)) == NULL)
		goto fail;
	p11a_frame_hdr_put(hdr, (uint32_t)len);
	if ((r = p11a_buf_put(f->data, hdr, 4)) != 0 ||
	    (r = p11a_buf_put(f->data, p11a_buf_ptr(body), len)) != 0)
		goto fail;
	f->fd = fd_to_pass;
	if (q->tail != NULL)
		q->tail->next = f;
	else
		q->head = f;
	q->tail = f;
	return 0;
 fail:
	if (f != NULL)
		p11a_buf_free(f->data);
	free(f);
	p11a_close_keep_errno(fd_to_pass);
	return r;
}

static void
frame_out_pop(struct p11a_frame_out *q)
{
	struct p11a_frame_out_item *f = q->head;

	q->head = f->next;
	if (q->head == NULL)
		q->tail = NULL;
	p11a_buf_free(f->data);
	p11a_close_keep_errno(f->fd);
	free(f);
}

int
p11a_frame_out_flush(struct p11a_frame_out *q, int fd)
{
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(sizeof(int))];
	} cm;
	struct p11a_frame_out_item *f;
	struct iovec iov;
	struct msghdr mh;
	struct cmsghdr *c;
	ssize_t n;

	while ((f = q->head) != NULL) {
		memset(&mh, 0, sizeof(mh));
		iov.iov_base = (void *)p11a_buf_ptr(f->data);
		iov.iov_len = p11a_buf_len(f->data);
		mh.msg_iov = &iov;
		mh.msg_iovlen = 1;
		if (f->fd >= 0) {
			memset(&cm, 0, sizeof(cm));
			mh.msg_control = cm.buf;
			mh.msg_controllen = sizeof(cm.buf);
			c = CMSG_FIRSTHDR(&mh);
			c->cmsg_level = SOL_SOCKET;
			c->cmsg_type = SCM_RIGHTS;
			c->cmsg_len = CMSG_LEN(sizeof(int));
			memcpy(CMSG_DATA(c), &f->fd, sizeof(int));
		}
		n = sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 1;
			return -P11A_E_IO;
		}
		/* The descriptor went with the first byte. */
		if (f->fd >= 0) {
			p11a_close_keep_errno(f->fd);
			f->fd = -1;
		}
		(void)p11a_buf_consume(f->data, (size_t)n);
		if (p11a_buf_len(f->data) == 0)
			frame_out_pop(q);
	}
	return 0;
}

int
p11a_frame_out_empty(const struct p11a_frame_out *q)
{
	return q->head == NULL;
}

void
p11a_frame_out_clear(struct p11a_frame_out *q)
{
	while (q->head != NULL)
		frame_out_pop(q);
}
