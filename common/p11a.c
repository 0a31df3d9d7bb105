/*
 * p11agent: error texts, name tables, secret wiping.
 */
#include "config.h"

#include <string.h>
#include <time.h>
#include <strings.h>

#include <openssl/crypto.h>

#include "p11a.h"

static const char *const err_text[P11A_E__MAX] = {
	[P11A_OK] = "success",
	[P11A_E_NOMEM] = "out of memory",
	[P11A_E_TOO_LARGE] = "message or field too large",
	[P11A_E_TRUNCATED] = "message truncated",
	[P11A_E_MALFORMED] = "malformed message",
	[P11A_E_UNKNOWN_TYPE] = "unknown message type",
	[P11A_E_VERSION] = "no common protocol version",
	[P11A_E_IO] = "connection failed",
	[P11A_E_NOT_RUNNING] = "agent is not running",
	[P11A_E_TIMEOUT] = "timed out",
	[P11A_E_DENIED] = "permission denied",
	[P11A_E_NO_SUCH_KEY] = "no such key",
	[P11A_E_NO_SUCH_TOKEN] = "no such token",
	[P11A_E_AMBIGUOUS] = "URI matches more than one object",
	[P11A_E_LOCKED] = "token is locked: run 'p11agent unlock'",
	[P11A_E_PIN_INCORRECT] = "PIN incorrect",
	[P11A_E_PIN_LOCKED] = "PIN locked",
	[P11A_E_PIN_INVALID] = "PIN has invalid length or characters",
	[P11A_E_TOKEN_NOT_PRESENT] = "token not present",
	[P11A_E_TOKEN] = "token or module failure",
	[P11A_E_UNSUPPORTED] = "not supported for this key or token",
	[P11A_E_BAD_REQUEST] = "invalid request",
	[P11A_E_BUSY] = "agent busy",
	[P11A_E_HELPER] = "token helper failed or is restarting",
	[P11A_E_PROTOCOL] = "protocol error",
	[P11A_E_URI] = "not a valid pkcs11: URI",
	[P11A_E_INTERNAL] = "internal error",
	[P11A_E_CRYPTO] = "cryptographic operation failed",
	[P11A_E_POLICY] = "not allowed by the key's policy",
	[P11A_E_CANCELLED] = "PIN entry cancelled",
	[P11A_E_NOT_CONFIRMED] = "signature not confirmed by the user",
	[P11A_E_CONTEXT_PIN] = "the key needs its PIN for each signature",
};

const char *
p11a_strerror(int err)
{
	/* Negate in unsigned arithmetic: -INT_MIN is undefined. */
	unsigned int e = err < 0 ? 0u - (unsigned int)err : (unsigned int)err;

	if (e >= P11A_E__MAX || err_text[e] == NULL)
		return "unknown error";
	return err_text[e];
}

static const char *const err_names[] = {
	"OK", "NOMEM", "TOO_LARGE", "TRUNCATED", "MALFORMED", "UNKNOWN_TYPE", "VERSION", "IO",
	"NOT_RUNNING", "TIMEOUT", "DENIED", "NO_SUCH_KEY", "NO_SUCH_TOKEN", "AMBIGUOUS", "LOCKED",
	"PIN_INCORRECT", "PIN_LOCKED", "PIN_INVALID", "TOKEN_NOT_PRESENT", "TOKEN", "UNSUPPORTED",
	"BAD_REQUEST", "BUSY", "HELPER", "PROTOCOL", "URI", "INTERNAL", "CRYPTO", "POLICY",
	"CANCELLED", "NOT_CONFIRMED", "CONTEXT_PIN",
};

const char *
p11a_errname(int err)
{
	unsigned int e = err < 0 ? 0u - (unsigned int)err : (unsigned int)err;

	_Static_assert(sizeof(err_names) / sizeof(err_names[0]) == P11A_E__MAX, "err_names");
	return e < P11A_E__MAX ? err_names[e] : "UNKNOWN";
}

static const char *const scheme_names[] = {
	[P11A_SCHEME_RSA_PKCS1] = "rsa-pkcs1",
	[P11A_SCHEME_RSA_PSS] = "rsa-pss",
	[P11A_SCHEME_ECDSA] = "ecdsa",
	[P11A_SCHEME_EDDSA] = "eddsa",
};

static const struct {
	const char *name;
	size_t len;
} hash_table[] = {
	[P11A_HASH_NONE] = { "none", 0 },
	[P11A_HASH_SHA1] = { "sha1", 20 },
	[P11A_HASH_SHA224] = { "sha224", 28 },
	[P11A_HASH_SHA256] = { "sha256", 32 },
	[P11A_HASH_SHA384] = { "sha384", 48 },
	[P11A_HASH_SHA512] = { "sha512", 64 },
};

static const char *const keytype_names[] = {
	[P11A_KEY_RSA] = "RSA",
	[P11A_KEY_EC] = "EC",
	[P11A_KEY_ED25519] = "Ed25519",
};

#define NELEM(a) (sizeof(a) / sizeof((a)[0]))

const char *
p11a_scheme_name(int scheme)
{
	if (scheme < 0 || (size_t)scheme >= NELEM(scheme_names))
		return NULL;
	return scheme_names[scheme];
}

int
p11a_scheme_from_name(const char *name)
{
	size_t i;

	if (name == NULL)
		return -P11A_E_BAD_REQUEST;
	for (i = 0; i < NELEM(scheme_names); i++) {
		if (scheme_names[i] != NULL && strcasecmp(name, scheme_names[i]) == 0)
			return (int)i;
	}
	return -P11A_E_BAD_REQUEST;
}

const char *
p11a_hash_name(int hash)
{
	if (hash < 0 || (size_t)hash >= NELEM(hash_table))
		return NULL;
	return hash_table[hash].name;
}

int
p11a_hash_from_name(const char *name)
{
	size_t i;

	if (name == NULL)
		return -P11A_E_BAD_REQUEST;
	for (i = 0; i < NELEM(hash_table); i++) {
		if (strcasecmp(name, hash_table[i].name) == 0)
			return (int)i;
	}
	/* Also accept the spelling OpenSSL and RFCs use ("SHA-256"). */
	if (strncasecmp(name, "sha-", 4) == 0) {
		for (i = 1; i < NELEM(hash_table); i++) {
			if (strcasecmp(name + 4, hash_table[i].name + 3) == 0)
				return (int)i;
		}
	}
	return -P11A_E_BAD_REQUEST;
}

size_t
p11a_hash_len(int hash)
{
	if (hash < 0 || (size_t)hash >= NELEM(hash_table))
		return 0;
	return hash_table[hash].len;
}

const char *
p11a_keytype_name(int type)
{
	if (type < 0 || (size_t)type >= NELEM(keytype_names))
		return NULL;
	return keytype_names[type];
}

void
p11a_wipe(void *p, size_t n)
{
	if (p == NULL || n == 0)
		return;
#ifdef HAVE_EXPLICIT_BZERO
	explicit_bzero(p, n);
#else
	OPENSSL_cleanse(p, n);
#endif
}

int64_t
p11a_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}
