/*
 * p11agent: shared definitions (errors, limits, scheme names).
 *
 * Every function in common/ returns 0 on success or a negative
 * P11A_E_* value; p11a_strerror() accepts either sign.  The same codes
 * travel on the wire (positive) in ERROR replies, so they are stable:
 * never renumber, only append.
 */
#ifndef P11A_H
#define P11A_H

#include <stddef.h>
#include <stdint.h>

#define P11A_PROTO_VERSION      3       /* highest protocol version we speak */
#define P11A_PROTO_VERSION_MIN  1       /* lowest one we accept */
#define P11A_FRAME_MAX          (256u * 1024u)  /* body bytes, excluding the 4-byte length */
#define P11A_PIN_MAX            256     /* bytes of a PIN, excluding NUL */
#define P11A_URI_MAX            4096    /* bytes of a pkcs11: URI */
#define P11A_TEXT_MAX           4096    /* bytes of any other text field */
#define P11A_LIST_MAX           4096    /* entries in any list */
#define P11A_SIG_MAX            1024    /* bytes of a signature (RSA-8192) */

/* Protocol deadlines (docs/protocol.md), named once. */
/* A frame whose first byte arrived must be whole within this (agent, helper). */
#define P11A_HALF_FRAME_MS      10000
/* Default deadline of a request the agent hands a token (sign-timeout). */
#define P11A_SIGN_TIMEOUT_MS    30000
/*
 * A client's per-request deadline: a little over the agent's, so that the
 * agent's TIMEOUT reply arrives before the client gives up.
 */
#define P11A_CLIENT_TIMEOUT_MS  (P11A_SIGN_TIMEOUT_MS + 5000)
/* How long the agent keeps a PIN or confirm dialog open (a person is typing). */
#define P11A_PROMPT_TIMEOUT_MS  (300 * 1000)
/* A client's deadline for UNLOCK_PROMPT and CONFIRM: the dialog's and a little more. */
#define P11A_CLIENT_PROMPT_TIMEOUT_MS (P11A_PROMPT_TIMEOUT_MS + P11A_CLIENT_TIMEOUT_MS)

enum p11a_err {
	P11A_OK = 0,
	P11A_E_NOMEM = 1,            /* out of memory */
	P11A_E_TOO_LARGE = 2,        /* message or field exceeds its size limit */
	P11A_E_TRUNCATED = 3,        /* message ends before its last field */
	P11A_E_MALFORMED = 4,        /* bad field value, bad length, leftover bytes */
	P11A_E_UNKNOWN_TYPE = 5,     /* unknown message type */
	P11A_E_VERSION = 6,          /* no common protocol version */
	P11A_E_IO = 7,               /* connection read/write failed or closed */
	P11A_E_NOT_RUNNING = 8,      /* nothing listens at the socket */
	P11A_E_TIMEOUT = 9,          /* deadline passed */
	P11A_E_DENIED = 10,          /* peer not allowed */
	P11A_E_NO_SUCH_KEY = 11,     /* no key matches the URI */
	P11A_E_NO_SUCH_TOKEN = 12,   /* no token matches the URI */
	P11A_E_AMBIGUOUS = 13,       /* URI matches more than one key or token */
	P11A_E_LOCKED = 14,          /* token is not logged in: run 'p11agent unlock' */
	P11A_E_PIN_INCORRECT = 15,   /* token rejected the PIN */
	P11A_E_PIN_LOCKED = 16,      /* token's user PIN is locked */
	P11A_E_PIN_INVALID = 17,     /* PIN has invalid characters or length */
	P11A_E_TOKEN_NOT_PRESENT = 18, /* token removed */
	P11A_E_TOKEN = 19,           /* token or module failed (device error) */
	P11A_E_UNSUPPORTED = 20,     /* scheme/hash not supported for this key */
	P11A_E_BAD_REQUEST = 21,     /* request well-formed but invalid (e.g. digest length) */
	P11A_E_BUSY = 22,            /* too many connections or requests */
	P11A_E_HELPER = 23,          /* token helper process died or is restarting */
	P11A_E_PROTOCOL = 24,        /* unexpected message in this state */
	P11A_E_URI = 25,             /* not a valid pkcs11: URI */
	P11A_E_INTERNAL = 26,        /* bug or unexpected library failure */
	P11A_E_CRYPTO = 27,          /* local crypto (hashing, encoding) failed */
	P11A_E_POLICY = 28,          /* the key's policy refuses this request (tls-only) */
	P11A_E_CANCELLED = 29,       /* the user cancelled the PIN dialog (version 3) */
	P11A_E_NOT_CONFIRMED = 30,   /* the key needs the user's confirmation, or the user said no */
	P11A_E_CONTEXT_PIN = 31,     /* the key wants its PIN for this signature (CKA_ALWAYS_AUTHENTICATE) */
	P11A_E__MAX = 32
};

/* Short human text for an error code (either sign); never NULL. */
const char *p11a_strerror(int err);
/* The code's stable name as docs/protocol.md lists it ("PIN_INCORRECT"); "OK" for 0, "UNKNOWN" past the table. */
const char *p11a_errname(int err);

/* Signature schemes (wire values). */
enum p11a_scheme {
	P11A_SCHEME_RSA_PKCS1 = 1,   /* RSASSA-PKCS1-v1_5 */
	P11A_SCHEME_RSA_PSS = 2,     /* RSASSA-PSS */
	P11A_SCHEME_ECDSA = 3,       /* ECDSA; signature returned DER-encoded */
	P11A_SCHEME_EDDSA = 4        /* pure Ed25519; input must be the message */
};

/* Hash algorithms (wire values). */
enum p11a_hash {
	P11A_HASH_NONE = 0,          /* only with P11A_INPUT_RAW */
	P11A_HASH_SHA1 = 1,
	P11A_HASH_SHA224 = 2,
	P11A_HASH_SHA256 = 3,
	P11A_HASH_SHA384 = 4,
	P11A_HASH_SHA512 = 5
};

/* What the SIGN data is. */
enum p11a_input {
	P11A_INPUT_MESSAGE = 0,      /* the message; the agent hashes it */
	P11A_INPUT_DIGEST = 1,       /* a digest made with 'hash'; length must match */
	P11A_INPUT_RAW = 2           /* rsa-pkcs1 only: the DigestInfo (or other data) as is, hash NONE */
};

/* PSS salt length specials (wire values of salt_len). */
#define P11A_PSS_SALT_DIGEST  0xFFFFFFFFu  /* salt length = digest length */
#define P11A_PSS_SALT_MAX     0xFFFFFFFEu  /* largest salt the modulus allows */

/* Key types (wire values). */
enum p11a_keytype {
	P11A_KEY_RSA = 1,
	P11A_KEY_EC = 2,
	P11A_KEY_ED25519 = 3
};

/* Token flags (wire bit values). */
#define P11A_TOKEN_PRESENT          0x0001u
#define P11A_TOKEN_LOGGED_IN        0x0002u
#define P11A_TOKEN_LOGIN_REQUIRED   0x0004u
#define P11A_TOKEN_PIN_COUNT_LOW    0x0008u
#define P11A_TOKEN_PIN_FINAL_TRY    0x0010u
#define P11A_TOKEN_PIN_LOCKED       0x0020u
#define P11A_TOKEN_PROTECTED_PATH   0x0040u

/* Key flags (wire bit values). */
#define P11A_KEY_PRIVATE_VISIBLE    0x0001u  /* private key object seen (token logged in) */
#define P11A_KEY_HAS_CERT           0x0002u
#define P11A_KEY_ALWAYS_AUTH        0x0004u

/* Names <-> values; return NULL / negative error on unknown. */
const char *p11a_scheme_name(int scheme);
int p11a_scheme_from_name(const char *name);      /* "rsa-pkcs1", "rsa-pss", "ecdsa", "eddsa" */
const char *p11a_hash_name(int hash);
int p11a_hash_from_name(const char *name);        /* "sha1", "sha224", "sha256", "sha384", "sha512", "none" */
size_t p11a_hash_len(int hash);                   /* 0 for NONE/unknown */
const char *p11a_keytype_name(int type);          /* "RSA", "EC", "Ed25519" */

/* Wipe memory that held a secret; never optimised away. */
void p11a_wipe(void *p, size_t n);
/* Milliseconds on CLOCK_MONOTONIC: the one clock of every deadline. */
int64_t p11a_now_ms(void);

/*
 * Signing input (common/sigin.h): a client sends a message of up to this
 * many bytes whole (SIGN input MESSAGE, so the agent sees what it signs)
 * and hashes a longer one itself (input DIGEST).  The rest of the frame
 * is room for the key URI and SIGN's other fields.
 */
#define P11A_SIGN_MSG_MAX       (P11A_FRAME_MAX - P11A_URI_MAX - 1024u)

#endif
