/*
 * CK_RV translation: names of return values for messages, the project's
 * one CK_RV -> P11A_E_* mapping, and the messages built from them.
 */
#include "config.h"
#include "token-int.h"

#include <stdarg.h>
#include <stdio.h>


static const struct {
	CK_RV rv;
	const char *name;
} ckr_names[] = {
#define R(x) { x, #x }
	R(CKR_OK), R(CKR_CANCEL), R(CKR_HOST_MEMORY), R(CKR_SLOT_ID_INVALID),
	R(CKR_GENERAL_ERROR), R(CKR_FUNCTION_FAILED), R(CKR_ARGUMENTS_BAD),
	R(CKR_NO_EVENT), R(CKR_NEED_TO_CREATE_THREADS), R(CKR_CANT_LOCK),
	R(CKR_ATTRIBUTE_READ_ONLY), R(CKR_ATTRIBUTE_SENSITIVE),
	R(CKR_ATTRIBUTE_TYPE_INVALID), R(CKR_ATTRIBUTE_VALUE_INVALID),
	R(CKR_ACTION_PROHIBITED), R(CKR_DATA_INVALID), R(CKR_DATA_LEN_RANGE),
	R(CKR_DEVICE_ERROR), R(CKR_DEVICE_MEMORY), R(CKR_DEVICE_REMOVED),
	R(CKR_ENCRYPTED_DATA_INVALID), R(CKR_ENCRYPTED_DATA_LEN_RANGE),
	R(CKR_FUNCTION_CANCELED), R(CKR_FUNCTION_NOT_PARALLEL),
	R(CKR_FUNCTION_NOT_SUPPORTED), R(CKR_KEY_HANDLE_INVALID),
	R(CKR_KEY_SIZE_RANGE), R(CKR_KEY_TYPE_INCONSISTENT),
	R(CKR_KEY_NOT_NEEDED), R(CKR_KEY_CHANGED), R(CKR_KEY_NEEDED),
	R(CKR_KEY_INDIGESTIBLE), R(CKR_KEY_FUNCTION_NOT_PERMITTED),
	R(CKR_KEY_NOT_WRAPPABLE), R(CKR_KEY_UNEXTRACTABLE),
	R(CKR_MECHANISM_INVALID), R(CKR_MECHANISM_PARAM_INVALID),
	R(CKR_OBJECT_HANDLE_INVALID), R(CKR_OPERATION_ACTIVE),
	R(CKR_OPERATION_NOT_INITIALIZED), R(CKR_PIN_INCORRECT), R(CKR_PIN_INVALID),
	R(CKR_PIN_LEN_RANGE), R(CKR_PIN_EXPIRED), R(CKR_PIN_LOCKED),
	R(CKR_SESSION_CLOSED), R(CKR_SESSION_COUNT), R(CKR_SESSION_HANDLE_INVALID),
	R(CKR_SESSION_PARALLEL_NOT_SUPPORTED), R(CKR_SESSION_READ_ONLY),
	R(CKR_SESSION_EXISTS), R(CKR_SESSION_READ_ONLY_EXISTS),
	R(CKR_SESSION_READ_WRITE_SO_EXISTS), R(CKR_SIGNATURE_INVALID),
	R(CKR_SIGNATURE_LEN_RANGE), R(CKR_TEMPLATE_INCOMPLETE),
	R(CKR_TEMPLATE_INCONSISTENT), R(CKR_TOKEN_NOT_PRESENT),
	R(CKR_TOKEN_NOT_RECOGNIZED), R(CKR_TOKEN_WRITE_PROTECTED),
	R(CKR_USER_ALREADY_LOGGED_IN), R(CKR_USER_NOT_LOGGED_IN),
	R(CKR_USER_PIN_NOT_INITIALIZED), R(CKR_USER_TYPE_INVALID),
	R(CKR_USER_ANOTHER_ALREADY_LOGGED_IN), R(CKR_USER_TOO_MANY_TYPES),
	R(CKR_RANDOM_SEED_NOT_SUPPORTED), R(CKR_RANDOM_NO_RNG),
	R(CKR_DOMAIN_PARAMS_INVALID), R(CKR_CURVE_NOT_SUPPORTED),
	R(CKR_BUFFER_TOO_SMALL), R(CKR_SAVED_STATE_INVALID),
	R(CKR_INFORMATION_SENSITIVE), R(CKR_STATE_UNSAVEABLE),
	R(CKR_CRYPTOKI_NOT_INITIALIZED), R(CKR_CRYPTOKI_ALREADY_INITIALIZED),
	R(CKR_MUTEX_BAD), R(CKR_MUTEX_NOT_LOCKED), R(CKR_FUNCTION_REJECTED),
#undef R
};

/* Name of a CK_RV for messages; unknown values as hex in buf. */
const char *
tok_ckr_name(CK_RV rv, char *buf, size_t size)
{
	for (size_t i = 0; i < sizeof(ckr_names) / sizeof(ckr_names[0]); i++) {
		if (ckr_names[i].rv == rv)
			return ckr_names[i].name;
	}
	if (rv >= CKR_VENDOR_DEFINED)
		snprintf(buf, size, "CKR_VENDOR_DEFINED+0x%lx", (unsigned long)(rv - CKR_VENDOR_DEFINED));
	else
		snprintf(buf, size, "CKR 0x%lx", (unsigned long)rv);
	return buf;
}

/*
 * The project's one CK_RV -> P11A_E translation.  Callers that know more
 * (a wrong PIN, a stale handle) act on the CK_RV before they get here but
 * take the code from here.
 */
int
tok_rv_err(CK_RV rv)
{
	switch (rv) {
	case CKR_OK:
		return 0;
	case CKR_HOST_MEMORY:
		return -P11A_E_NOMEM;
	case CKR_USER_NOT_LOGGED_IN:
		return -P11A_E_LOCKED;
	case CKR_PIN_INCORRECT:
		return -P11A_E_PIN_INCORRECT;
	case CKR_PIN_LOCKED:
		return -P11A_E_PIN_LOCKED;
	case CKR_PIN_INVALID:
	case CKR_PIN_LEN_RANGE:
		return -P11A_E_PIN_INVALID;
	case CKR_DEVICE_REMOVED:
	case CKR_TOKEN_NOT_PRESENT:
	case CKR_TOKEN_NOT_RECOGNIZED:
	case CKR_SLOT_ID_INVALID:
		return -P11A_E_TOKEN_NOT_PRESENT;
	case CKR_MECHANISM_INVALID:
	case CKR_MECHANISM_PARAM_INVALID:
	case CKR_KEY_TYPE_INCONSISTENT:
	case CKR_KEY_FUNCTION_NOT_PERMITTED:
	case CKR_KEY_SIZE_RANGE:
	case CKR_FUNCTION_NOT_SUPPORTED:
		return -P11A_E_UNSUPPORTED;
	case CKR_DATA_LEN_RANGE:
	case CKR_DATA_INVALID:
		return -P11A_E_BAD_REQUEST;
	case CKR_SESSION_COUNT:
		return -P11A_E_BUSY;
	default:
		return -P11A_E_TOKEN;
	}
}

/* The session is unusable after this return value: close it, open a new one. */
int
tok_rv_session_gone(CK_RV rv)
{
	return rv == CKR_SESSION_HANDLE_INVALID || rv == CKR_SESSION_CLOSED ||
	    rv == CKR_DEVICE_REMOVED || rv == CKR_TOKEN_NOT_PRESENT;
}

int
tok_rv_token_gone(CK_RV rv)
{
	return rv == CKR_DEVICE_REMOVED || rv == CKR_TOKEN_NOT_PRESENT ||
	    rv == CKR_TOKEN_NOT_RECOGNIZED || rv == CKR_SLOT_ID_INVALID;
}

void __attribute__((format(printf, 3, 4)))
tok_set_msg(char *msg, size_t size, const char *fmt, ...)
{
	va_list ap;

	if (msg == NULL || size == 0)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, size, fmt, ap);
	va_end(ap);
}

/* Message "token 'LABEL': WHAT: CKR_X" and the code for rv. */
int
tok_fail_rv(char *msg, size_t size, const char *label, const char *what, CK_RV rv)
{
	char nb[48];

	tok_set_msg(msg, size, "token '%s': %s: %s", label, what, tok_ckr_name(rv, nb, sizeof(nb)));
	return tok_rv_err(rv);
}

#define PIN_COUNTER_FLAGS (CKF_USER_PIN_COUNT_LOW | CKF_USER_PIN_FINAL_TRY | CKF_USER_PIN_LOCKED)

/* What the user-PIN flags say about the tries left ("" when nothing). */
static const char *
tries_note(CK_FLAGS f)
{
	if (f & CKF_USER_PIN_LOCKED)
		return "the PIN is now locked: no tries left";
	if (f & CKF_USER_PIN_FINAL_TRY)
		return "final try before the PIN locks: one try left";
	if (f & CKF_USER_PIN_COUNT_LOW)
		return "PIN count low: fewer tries left than the token allows";
	return "";
}

int
tok_login_failure(CK_RV rv, int flags_known, CK_FLAGS before, CK_FLAGS after, const char *label,
		  char *msg, size_t size, int *pin_refused)
{
	CK_FLAGS moved = flags_known ? (after & ~before & PIN_COUNTER_FLAGS) : 0;
	const char *note = flags_known ? tries_note(after) : "";
	char nb[48];
	const char *name = tok_ckr_name(rv, nb, sizeof(nb));

	*pin_refused = 0;
	if (rv == CKR_PIN_LOCKED) {
		*pin_refused = 1;
		tok_set_msg(msg, size, "the user PIN of token '%s' is locked", label);
		return -P11A_E_PIN_LOCKED;
	}
	if (rv == CKR_PIN_INCORRECT) {
		*pin_refused = 1;
		if (note[0] != '\0')
			tok_set_msg(msg, size, "PIN incorrect for token '%s': the token refused the PIN (%s)",
				    label, note);
		else
			tok_set_msg(msg, size, "PIN incorrect for token '%s': the token refused the PIN",
				    label);
		return -P11A_E_PIN_INCORRECT;
	}
	if (moved != 0) {
		/*
		 * Not a PIN code, but the token's PIN counter moved during this
		 * one C_Login: the token counted a wrong PIN.
		 */
		*pin_refused = 1;
		tok_set_msg(msg, size, "PIN incorrect for token '%s': the token refused the PIN (%s; "
			    "the module said %s, but the token's PIN counter moved)", label, note, name);
		return (after & CKF_USER_PIN_LOCKED) ? -P11A_E_PIN_LOCKED : -P11A_E_PIN_INCORRECT;
	}
	if (flags_known && (rv == CKR_GENERAL_ERROR || rv == CKR_FUNCTION_FAILED ||
			    rv == CKR_DEVICE_ERROR)) {
		/*
		 * OpenSC on some cards (CAC) says CKR_GENERAL_ERROR for a wrong
		 * PIN, and the card keeps no counter it reports: nothing tells
		 * a wrong PIN from a failure.  Say both, claim neither.
		 */
		tok_set_msg(msg, size, "token '%s': C_Login: %s; the PIN may be wrong: some modules "
			    "report a wrong PIN with this code, and the token's PIN state did not "
			    "change (it reports no tries count)", label, name);
		return tok_rv_err(rv);
	}
	tok_set_msg(msg, size, "token '%s': C_Login: %s", label, name);
	return tok_rv_err(rv);
}
