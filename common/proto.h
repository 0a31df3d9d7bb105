/*
 * The p11agent wire protocol: message structures and their codec.
 * docs/protocol.md is the normative description; this is its only
 * implementation.  Nothing outside common/ reads bytes off the wire.
 *
 * A frame is a u32 big-endian body length (1..P11A_FRAME_MAX) then the
 * body; the body's first byte is the message type.
 */
#ifndef P11A_PROTO_H
#define P11A_PROTO_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include "p11a.h"
#include "buf.h"
#include "frame.h"

enum p11a_msg_type {
	/* requests, client -> agent (main connection) */
	P11A_MSG_HELLO = 0x01,
	P11A_MSG_STATUS = 0x02,
	P11A_MSG_LIST = 0x03,
	P11A_MSG_UNLOCK = 0x04,
	P11A_MSG_LOCK = 0x05,
	P11A_MSG_OPEN_CHANNEL = 0x06,
	/* request on a signing channel (client -> token helper); from version 3
	 * also on a main connection, relayed (a client without a channel) */
	P11A_MSG_SIGN = 0x07,
	/* protocol version 2 */
	P11A_MSG_HEALTH = 0x08,
	/* protocol version 3: audit */
	P11A_MSG_LOG = 0x0C,
	/* protocol version 3: PIN entry and confirm */
	P11A_MSG_UNLOCK_PROMPT = 0x09,   /* unlock the token of a key/token URI with a PIN dialog */
	P11A_MSG_CONFIRM = 0x0A,         /* ask the user to allow a signature with a key */
	P11A_MSG_UPDATE_ENV = 0x0B,      /* the session's display/tty for pinentry */
	P11A_MSG_CONTEXT_PIN = 0x0D,     /* a PIN dialog for one signature with an always-auth key */

	/* internal, agent main process <-> token helper only */
	P11A_MSG_H_ADOPT = 0x40,     /* main -> helper: a signing channel fd is attached */
	P11A_MSG_H_REFRESH = 0x41,   /* main -> helper: re-enumerate, answer INVENTORY */
	P11A_MSG_H_INVENTORY = 0x42, /* helper -> main: this module's tokens and keys */
	P11A_MSG_H_EVENT = 0x45,     /* helper -> main: audit events (id 0) */
	/* protocol version 3 (forwarding): a SIGN relayed by the main process */
	P11A_MSG_H_SIGN = 0x46,      /* main -> helper: SIGN of a client without a channel */
	P11A_MSG_H_GRANT = 0x44,     /* main -> helper: one confirmed signature for a connection */
	P11A_MSG_H_CONTEXT_PIN = 0x47, /* main -> helper: a context PIN for one signature */

	/* replies */
	P11A_MSG_OK = 0x80,
	P11A_MSG_ERROR = 0x81,
	P11A_MSG_HELLO_REPLY = 0x82,
	P11A_MSG_STATUS_REPLY = 0x83,
	P11A_MSG_LIST_REPLY = 0x84,
	P11A_MSG_CHANNEL = 0x85,     /* a signing channel fd is attached (SCM_RIGHTS) */
	P11A_MSG_SIGNATURE = 0x86,
	P11A_MSG_HEALTH_REPLY = 0x87,    /* version 2 */
	P11A_MSG_LOG_REPLY = 0x88        /* version 3 */
};

/* Audit event kinds (docs/protocol.md, "Version 3: audit"). */
enum p11a_event_kind {
	P11A_EV_SIGN = 1,            /* a signature, made or failed */
	P11A_EV_UNLOCK = 2,          /* a login attempt (never the PIN) */
	P11A_EV_LOCK = 3,            /* a logout; reason says why */
	P11A_EV_REFUSED = 4,         /* a request the key's policy refused */
	P11A_EV_PIN_DIALOG = 5,      /* a PIN dialog's outcome */
	P11A_EV_CONFIRM = 6,         /* a confirmation dialog's outcome */
	P11A_EV_DROPPED = 7          /* count events were lost on the way (helper queue full) */
};
#define P11A_EV_KIND_MAX P11A_EV_DROPPED

/*
 * What was signed: 0 nothing (not a signature), else 1 + enum
 * p11a_tlsclass (common/tlsclass.h): 1 raw, 2 digest, 3 tls1.3,
 * 4 tls1.3-server, 5 tls1.2, 6 tls1.0/1.1.
 */
#define P11A_CONTENT_NONE 0
#define P11A_CONTENT_MAX  6

#define P11A_EVENT_FORWARDED 0x1u   /* the client came through a forwarded socket */

struct p11a_event {
	uint64_t time_us;           /* CLOCK_REALTIME, microseconds since the epoch */
	uint8_t kind;               /* enum p11a_event_kind */
	char *uri;                  /* key or token URI, "" none */
	uint8_t scheme;             /* enum p11a_scheme, 0 none */
	uint8_t content;            /* P11A_CONTENT_* */
	uint32_t pid;               /* the client's pid, 0 none (the agent itself) */
	uint32_t uid;
	char *exe;                  /* the client's executable, "" unknown */
	uint8_t flags;              /* P11A_EVENT_* */
	uint32_t result;            /* 0 ok, else a P11A_E_* code */
	char *message;              /* the error text, "" when ok */
	uint64_t duration_us;
	char *reason;               /* LOCK: request, idle, pin-ttl, suspend, screen-lock, SIGHUP, exit */
	uint32_t count;             /* DROPPED: how many events were lost */
};

struct p11a_log {                   /* LOG (version 3) */
	uint64_t since_us;          /* events at or after this time, 0 = all */
	uint32_t max;               /* the newest max events at most, 0 = as many as fit */
};

struct p11a_events {                /* LOG_REPLY and H_EVENT */
	uint32_t dropped;           /* H_EVENT: events the helper lost before these; LOG_REPLY 0 */
	uint32_t n;
	struct p11a_event *ev;      /* oldest first */
};

/* The state of a module in HEALTH_REPLY. */
enum p11a_module_state {
	P11A_MODULE_UP = 1,          /* helper running, tokens reported */
	P11A_MODULE_STARTING = 2,    /* helper started, no inventory yet */
	P11A_MODULE_RESTARTING = 3,  /* helper died; it will be started again */
	P11A_MODULE_FAILED = 4,      /* could not be loaded or initialized; not restarted */
	P11A_MODULE_NOT_USED = 5     /* found but left out by the configuration */
};

struct p11a_hello {                 /* HELLO */
	uint16_t min_version;
	uint16_t max_version;
	char *client;               /* free text naming the client, e.g. "p11agent-cli 0.1.0" */
};

struct p11a_hello_reply {           /* HELLO_REPLY */
	uint16_t version;           /* chosen version */
	char *agent;                /* e.g. "p11agentd 0.1.0" */
};

struct p11a_error {                 /* ERROR */
	uint32_t code;              /* enum p11a_err, positive */
	char *message;              /* human-readable, names the thing and the cause */
};

struct p11a_token {
	char *uri;                  /* pkcs11: URI of the token */
	char *label;                /* trimmed of padding */
	char *manufacturer;
	char *model;
	char *serial;
	char *module;               /* module path or name, for display */
	uint32_t flags;             /* P11A_TOKEN_* */
};

struct p11a_key {
	char *uri;                  /* pkcs11: URI of the private key (type=private) */
	char *token_uri;
	char *label;                /* CKA_LABEL, may be empty */
	uint8_t *id;                /* CKA_ID bytes */
	size_t id_len;
	uint8_t type;               /* enum p11a_keytype */
	uint32_t bits;              /* modulus bits or curve bits */
	char *curve;                /* "P-256", "P-384", "P-521", "Ed25519" or "" for RSA */
	uint8_t *spki;              /* SubjectPublicKeyInfo DER */
	size_t spki_len;
	uint8_t *cert;              /* paired certificate DER, or NULL/0 */
	size_t cert_len;
	char *cert_uri;             /* URI of the paired certificate, or "" */
	char *cert_label;           /* CKA_LABEL of the certificate, or "" */
	uint32_t flags;             /* P11A_KEY_* */
};

struct p11a_status_reply {          /* STATUS_REPLY */
	char *agent;                /* version text */
	uint32_t pid;
	uint32_t modules;           /* modules configured */
	uint32_t modules_up;        /* helpers running and initialized */
	uint32_t connections;       /* client connections open now */
	uint32_t ntokens;
	struct p11a_token *tokens;
};

struct p11a_module_health {
	char *name;
	char *path;
	uint8_t state;              /* enum p11a_module_state */
	uint32_t restarts;          /* times the helper was started again */
	uint32_t error_time;        /* Unix time of error, 0 when there is none */
	char *error;                /* the module's last error, or why it is not used; "" = none */
};

struct p11a_health_reply {          /* HEALTH_REPLY (version 2) */
	uint32_t nmodules;
	struct p11a_module_health *modules;
	uint32_t nrecent;
	char **recent;              /* the agent's latest warnings and errors, oldest first */
};

struct p11a_list_reply {            /* LIST_REPLY and H_INVENTORY */
	uint32_t ntokens;
	struct p11a_token *tokens;
	uint32_t nkeys;
	struct p11a_key *keys;
};

struct p11a_unlock {                /* UNLOCK */
	char *token_uri;            /* "" = the only token that needs a login */
	char pin[P11A_PIN_MAX + 1]; /* fixed storage; wiped by p11a_msg_clear */
	size_t pin_len;
};

struct p11a_lock {                  /* LOCK */
	char *token_uri;            /* "" = every token */
};

struct p11a_open_channel {          /* OPEN_CHANNEL */
	char *key_uri;              /* key the client means to sign with */
};

struct p11a_adopt {                 /* H_ADOPT (internal; the channel's descriptor rides along) */
	uint64_t conn;              /* the agent's serial of the connection that asked */
	uint32_t pid;               /* that connection's peer pid (SO_PEERCRED; 0 unknown) */
	char *exe;                  /* its /proc/PID/exe read at accept: absolute, or "" (NULL
				     * encodes as "") when unknown */
};

struct p11a_prompt {                /* UNLOCK_PROMPT, CONFIRM, CONTEXT_PIN (version 3) */
	char *uri;                  /* UNLOCK_PROMPT: a key or token URI; CONFIRM: the key URI */
};

#define P11A_ENV_MAX 32             /* entries of an UPDATE_ENV at most */

struct p11a_update_env {            /* UPDATE_ENV (version 3) */
	uint32_t n;
	char **env;                 /* "NAME=value" each */
};

struct p11a_grant {                 /* H_GRANT (internal) */
	uint64_t conn;              /* the agent's serial of the connection the grant is for */
	char *key_uri;              /* the key as the client named it in CONFIRM */
};

struct p11a_ctx_pin {               /* H_CONTEXT_PIN (internal) */
	uint64_t conn;              /* the agent's serial of the connection the PIN is for */
	char *key_uri;              /* the key as the client named it in CONTEXT_PIN */
	char pin[P11A_PIN_MAX + 1]; /* fixed storage; wiped by p11a_msg_clear */
	size_t pin_len;
};

struct p11a_sign {                  /* SIGN */
	char *key_uri;
	uint8_t scheme;             /* enum p11a_scheme */
	uint8_t hash;               /* enum p11a_hash */
	uint8_t mgf1_hash;          /* rsa-pss: MGF1 hash; NONE = same as hash */
	uint8_t input;              /* enum p11a_input */
	uint32_t salt_len;          /* rsa-pss: bytes, or P11A_PSS_SALT_DIGEST/MAX */
	uint8_t *data;
	size_t data_len;
};

/* H_SIGN flags */
#define P11A_HSIGN_FORWARDED 0x1u   /* the connection is forwarded (ssh, a relay) */

/*
 * H_SIGN (internal, version 3): a SIGN that arrived on a main connection,
 * relayed to the helper with the peer the agent checked at accept.  The
 * helper answers SIGNATURE or ERROR with the request's id.
 */
struct p11a_hsign {
	uint64_t conn;              /* the agent's serial of the connection that asked */
	uint32_t pid;               /* that connection's peer pid (0 unknown) */
	char *exe;                  /* as in H_ADOPT: absolute, or "" unknown */
	uint8_t flags;              /* P11A_HSIGN_*; unknown bits are MALFORMED */
	struct p11a_sign sign;
};

struct p11a_signature {             /* SIGNATURE */
	uint8_t *sig;               /* ECDSA: DER; others: raw */
	size_t sig_len;
};

struct p11a_msg {
	uint8_t type;               /* enum p11a_msg_type */
	union {
		struct p11a_hello hello;
		struct p11a_hello_reply hello_reply;
		struct p11a_error error;
		struct p11a_status_reply status;
		struct p11a_health_reply health;
		struct p11a_list_reply list;        /* LIST_REPLY, H_INVENTORY */
		struct p11a_unlock unlock;
		struct p11a_lock lock;
		struct p11a_open_channel open_channel;
		struct p11a_adopt adopt;
		struct p11a_prompt prompt;          /* UNLOCK_PROMPT, CONFIRM */
		struct p11a_update_env env;         /* UPDATE_ENV */
		struct p11a_grant grant;            /* H_GRANT */
		struct p11a_ctx_pin ctx_pin;        /* H_CONTEXT_PIN */
		struct p11a_sign sign;
		struct p11a_hsign hsign;
		struct p11a_signature signature;
		struct p11a_log log;
		struct p11a_events events;          /* LOG_REPLY, H_EVENT */
	} u;
	/* STATUS, LIST, HEALTH, OK, CHANNEL, H_REFRESH carry no fields. */
};

/*
 * Appends the body of m (type byte and fields, no length prefix) to out.
 * Fails with -P11A_E_UNKNOWN_TYPE for an unknown type, -P11A_E_TOO_LARGE
 * when a field exceeds its limit or the body P11A_FRAME_MAX; out is
 * unchanged on failure.
 */
int p11a_msg_encode(const struct p11a_msg *m, struct p11a_buf *out);

/*
 * Decodes one whole body.  *m is zeroed first; on success the caller owns
 * everything m points to and releases it with p11a_msg_clear().  Fails
 * with -P11A_E_TRUNCATED, -P11A_E_MALFORMED (bad value, leftover bytes,
 * text with NUL), -P11A_E_TOO_LARGE (a field over its limit) or
 * -P11A_E_UNKNOWN_TYPE; on failure *m holds nothing to free.
 */
int p11a_msg_decode(const uint8_t *body, size_t len, struct p11a_msg *m);

/* 1 when s is well-formed UTF-8 (no overlong forms, surrogates or code points past U+10FFFF). */
int p11a_utf8_valid(const char *s);
/*
 * The name of a text field of request m that is not UTF-8 ("key URI",
 * "token URI", "client name"), or NULL when every one is.  protocol.md
 * says text is UTF-8: such a request is answered BAD_REQUEST, and the
 * text is never echoed back.
 */
const char *p11a_msg_bad_text(const struct p11a_msg *m);

/* Frees the tokens and keys of a LIST_REPLY / H_INVENTORY body and zeroes it.  NULL is fine. */
void p11a_list_reply_clear(struct p11a_list_reply *l);

/* Frees what m owns, wipes the PIN, and zeroes m.  NULL is fine. */
void p11a_msg_clear(struct p11a_msg *m);

/*
 * Builds an ERROR message (message is copied); code is a P11A_E_* (either
 * sign; 0 becomes P11A_E_INTERNAL).  m is overwritten, not cleared first:
 * it must hold nothing.  fmt NULL or "", or text that formats to "",
 * uses p11a_strerror(code): callers pass a reason that may be empty as
 * "%s" and need no fallback of their own.  Text longer than
 * P11A_TEXT_MAX is cut at a UTF-8 boundary.  Errors: -P11A_E_NOMEM.
 */
int p11a_msg_set_error(struct p11a_msg *m, int code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
/* The same with a va_list, for callers that take a format themselves. */
int p11a_msg_set_error_v(struct p11a_msg *m, int code, const char *fmt, va_list ap)
	__attribute__((format(printf, 3, 0)));

/*
 * Internal frames between the agent and a token helper carry a u32
 * request id before the body: [u32 id][body].  id 0 marks an unsolicited
 * message (INVENTORY after a change).
 */
int p11a_msg_encode_internal(uint32_t id, const struct p11a_msg *m, struct p11a_buf *out);
/* *id is set whenever len >= 4, even when the body fails to decode. */
int p11a_msg_decode_internal(const uint8_t *body, size_t len, uint32_t *id, struct p11a_msg *m);

/* Frees what an event owns and zeroes it.  NULL is fine. */
void p11a_event_clear(struct p11a_event *e);
/* Deep copy (strings NULL become ""); -P11A_E_NOMEM with dst cleared. */
int p11a_event_copy(struct p11a_event *dst, const struct p11a_event *src);
/* Names: "sign", "unlock", "lock", "refused", "pin-dialog", "confirm", "dropped"; NULL unknown. */
const char *p11a_event_kind_name(uint8_t kind);
/* Bytes an event takes on the wire (for filling a reply up to the frame cap). */
size_t p11a_event_wire_size(const struct p11a_event *e);

/* Deep copies; clear() the destination afterwards. */
int p11a_token_copy(struct p11a_token *dst, const struct p11a_token *src);
int p11a_key_copy(struct p11a_key *dst, const struct p11a_key *src);
void p11a_token_clear(struct p11a_token *t);
void p11a_key_clear(struct p11a_key *k);

/*
 * Frame I/O on a blocking or non-blocking fd.
 *
 * p11a_frame_write(): writes [u32 len][body] wholly (retrying on EINTR
 * and partial writes, waiting with poll() up to timeout_ms; -1 = forever);
 * when fd_to_pass >= 0 it is attached to the first byte with SCM_RIGHTS.
 * p11a_frame_read(): reads one frame into out (reset first), refusing a
 * length of 0 or over P11A_FRAME_MAX before reading the body
 * (-P11A_E_TOO_LARGE / -P11A_E_MALFORMED); if fd_received is not NULL,
 * a descriptor passed with the frame is returned there (else -1, or
 * P11A_FD_LOST when one was sent but the kernel could not install it:
 * this process is out of descriptors), and any descriptor received when
 * fd_received is NULL is closed.
 * Errors: -P11A_E_IO (closed or failed; errno kept), -P11A_E_TIMEOUT.
 * On -P11A_E_IO from p11a_frame_read(), errno is 0 when the peer closed
 * the connection cleanly before the first byte of a frame, ECONNRESET when
 * it closed in the middle of one.  p11a_frame_write() refuses an empty
 * body (-P11A_E_MALFORMED) or one over P11A_FRAME_MAX (-P11A_E_TOO_LARGE)
 * and never raises SIGPIPE (a closed peer gives -P11A_E_IO, errno EPIPE).
 * Both use MSG_DONTWAIT and poll(), so the fd's blocking mode does not
 * matter.  Received descriptors have FD_CLOEXEC set.
 */
int p11a_frame_write(int fd, const struct p11a_buf *body, int fd_to_pass, int timeout_ms);
int p11a_frame_read(int fd, struct p11a_buf *out, int *fd_received, int timeout_ms);

/*
 * Buffered frame reader: one per connection, for the hot paths (signing
 * channels on both sides, the client's main connection).  It waits with
 * poll() and then one recvmsg() takes a frame's length and body together;
 * bytes of the frames after it (a peer may send several back to back) stay
 * in the reader for the next call and are never lost, and a frame already
 * buffered whole costs no system call.  The reader holds at most
 * P11A_READER_SIZE bytes itself; a longer body is received straight into
 * the caller's buffer.
 *
 * Limits and errors are p11a_frame_read()'s: the length is checked as soon
 * as its 4 bytes are in, before any byte of the body goes to out (0:
 * -P11A_E_MALFORMED, over P11A_FRAME_MAX or over out's maximum:
 * -P11A_E_TOO_LARGE); EOF before the first byte of a frame is -P11A_E_IO
 * with errno 0, EOF inside one -P11A_E_IO with errno ECONNRESET; a passed
 * time limit -P11A_E_TIMEOUT (errno ETIMEDOUT).  The fd's blocking mode
 * does not matter.  After any error the connection is out of step: the
 * caller closes it and frees the reader.
 */
#define P11A_READER_SIZE 4096

/* Flags for p11a_reader_new(). */
#define P11A_READER_FDS  0x1u   /* descriptors may arrive with frames (SCM_RIGHTS) */

struct p11a_reader;

/*
 * New reader for fd (not owned: the caller still closes fd, after freeing
 * the reader).  Without P11A_READER_FDS no control buffer is passed to
 * recvmsg(), so a descriptor sent on fd is discarded by the kernel.  NULL
 * on allocation failure.
 */
struct p11a_reader *p11a_reader_new(int fd, unsigned flags);
/* Wipes what is buffered, closes descriptors not handed out, frees.  NULL is fine. */
void p11a_reader_free(struct p11a_reader *rd);
/*
 * Bytes received and not yet returned in a frame.  Between exchanges of a
 * request/reply protocol this is 0; more means the peer sent what nobody
 * asked for.
 */
size_t p11a_reader_pending(const struct p11a_reader *rd);
/*
 * Reads one frame into out (reset first).  timeout_ms bounds the whole
 * call (-1: none).  frame_ms bounds a frame from its first byte (from the
 * call, when its first bytes were already buffered); -1: none.  An idle
 * connection with timeout_ms -1 waits for ever; with frame_ms set, a
 * started frame must still arrive whole in time (the half-frame deadline).
 *
 * With P11A_READER_FDS, a descriptor belongs to the frame it was sent with
 * (p11a_frame_write() sends it with the frame's first bytes): it is
 * returned in *fd_received with that frame (else -1), only the first one
 * per frame is kept, extra ones and all of them when fd_received is NULL
 * are closed.  Received descriptors have FD_CLOEXEC set.  Without
 * P11A_READER_FDS *fd_received is always -1.
 */
int p11a_reader_read(struct p11a_reader *rd, struct p11a_buf *out, int *fd_received,
		     int timeout_ms, int frame_ms);

#endif
