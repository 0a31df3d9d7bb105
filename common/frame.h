/*
 * The one framing layer: [u32 big-endian length][body] on a stream socket,
 * non-blocking and resumable (after p11-kit's rpc-transport).
 *
 * - p11a_frame_in: bytes go in (fed from memory, or received from a
 *   socket without blocking), whole frames come out.  The length is
 *   checked as soon as its 4 bytes are in, before a byte of the body is
 *   buffered.  A call that cannot finish keeps its place; the next call
 *   resumes there.
 * - p11a_frame_out: a queue of whole frames, each optionally carrying one
 *   descriptor (SCM_RIGHTS, sent with the frame's first byte), written as
 *   far as the socket takes without blocking; the next flush resumes.
 *
 * The agent's event loop and the token helper's control socket use these
 * directly; the blocking readers in proto.c are thin: p11a_frame_read()
 * is a loop of p11a_frame_in_recv() and poll(), and p11a_reader feeds its
 * buffer to p11a_frame_in_feed() and receives the rest of a body straight
 * into p11a_frame_in_space() (one recvmsg per frame), with the same
 * end-of-stream rule (p11a_frame_eof).
 */
#ifndef P11A_FRAME_H
#define P11A_FRAME_H

#include <stddef.h>
#include <stdint.h>
#include "buf.h"

/* Flags for p11a_frame_in_init(). */
#define P11A_FRAME_IN_FDS 0x1u  /* descriptors may arrive with frames (SCM_RIGHTS) */

/* Descriptor value when one was sent but could not be installed here. */
#define P11A_FD_LOST (-2)

struct p11a_frame_in {
	uint8_t hdr[4];
	size_t hdr_got;
	uint32_t body_len;          /* valid once hdr_got == 4 */
	struct p11a_buf *body;      /* the frame's body: whole (body_len bytes) once complete */
	uint8_t *dst;               /* room for the body in body, reserved at the header */
	size_t got;                 /* body bytes in so far */
	int body_owned;             /* body allocated per frame (exactly body_len) */
	size_t max;                 /* largest body accepted */
	unsigned flags;             /* P11A_FRAME_IN_* */
	int fd;                     /* descriptor received with this frame, or -1 */
	int64_t started_ms;         /* p11a_now_ms() at the frame's first byte, 0 = none yet */
};

/*
 * Prepares in.  body NULL: each frame gets a buffer of exactly its length
 * (freed by reset), for connections that are idle most of the time;
 * otherwise frames go into the caller's body (not owned, reset at each
 * frame start) and body's maximum caps the length too.
 */
void p11a_frame_in_init(struct p11a_frame_in *in, struct p11a_buf *body, unsigned flags);
/* Forgets the current frame (wiped), closes a descriptor not taken.  Idempotent. */
void p11a_frame_in_reset(struct p11a_frame_in *in);
/* 1 when bytes of a frame were taken and the frame is not complete. */
int p11a_frame_in_started(const struct p11a_frame_in *in);

/*
 * Checks a frame header: *len from h; 0, or -P11A_E_MALFORMED (length 0,
 * errno EPROTO) or -P11A_E_TOO_LARGE (over P11A_FRAME_MAX or max, errno
 * EMSGSIZE).
 */
int p11a_frame_hdr_parse(const uint8_t h[4], size_t max, uint32_t *len);
/* Writes the header of a body of len bytes. */
void p11a_frame_hdr_put(uint8_t h[4], uint32_t len);

/*
 * The end-of-stream rule every reader follows: returns -P11A_E_IO with
 * errno 0 when the peer closed before the first byte of a frame (a clean
 * close), ECONNRESET when it closed inside one.
 */
int p11a_frame_eof(int started);

/* close(fd) unless fd < 0, keeping errno as it was. */
void p11a_close_keep_errno(int fd);

/*
 * Takes bytes from p[0..n): *used says how many (never past the end of
 * the current frame).  Returns 1 when a whole frame is in in->body (its
 * descriptor in in->fd), 0 when more is needed, or a negative error from
 * p11a_frame_hdr_parse() / -P11A_E_NOMEM.  After a frame (1), call
 * p11a_frame_in_reset() before feeding the next one.
 */
int p11a_frame_in_feed(struct p11a_frame_in *in, const uint8_t *p, size_t n, size_t *used);

/*
 * For readers that receive themselves (p11a_reader's scatter read): once
 * the header is in, *p is where the next body bytes go and the return
 * value how many are still missing (0 and NULL before the header);
 * p11a_frame_in_advance() records n bytes written there and returns 1
 * when the frame is complete.
 */
size_t p11a_frame_in_space(const struct p11a_frame_in *in, uint8_t **p);
int p11a_frame_in_advance(struct p11a_frame_in *in, size_t n);

/*
 * Receives without blocking, never past the current frame's end.
 * Returns 1 when a whole frame is in in->body, 0 when the socket has no
 * more for now, -P11A_E_IO on EOF (errno by p11a_frame_eof()) or a failed
 * recv (errno kept), or a length refusal as p11a_frame_in_feed().
 * Descriptors (with P11A_FRAME_IN_FDS): the first one that arrives with
 * the frame is kept in in->fd (P11A_FD_LOST when the kernel could not
 * install it), others are closed; without the flag the kernel drops them.
 */
int p11a_frame_in_recv(struct p11a_frame_in *in, int fd);

/* ------------------------------------------------------------ writer queue */

struct p11a_frame_out_item;

struct p11a_frame_out {
	struct p11a_frame_out_item *head, *tail;
};

/*
 * Appends [u32 len][body] (copied; body 1..P11A_FRAME_MAX bytes, else
 * -P11A_E_MALFORMED / -P11A_E_TOO_LARGE).  fd_to_pass (owned from here
 * on, whatever the result: closed once sent, dropped or on error) goes
 * with the frame's first byte; -1 for none.
 */
int p11a_frame_out_push(struct p11a_frame_out *q, const struct p11a_buf *body, int fd_to_pass);
/*
 * Writes what the socket takes without blocking (never SIGPIPE).
 * Returns 0 when the queue is empty, 1 when frames are left (wait for
 * POLLOUT), -P11A_E_IO on a failed send (errno kept; the queue is left
 * as it was: clear it).
 */
int p11a_frame_out_flush(struct p11a_frame_out *q, int fd);
/* 1 when nothing is queued. */
int p11a_frame_out_empty(const struct p11a_frame_out *q);
/* Drops every queued frame (wiped) and closes their descriptors. */
void p11a_frame_out_clear(struct p11a_frame_out *q);

#endif
