/*
 * Unit tests for tok_login_failure (agent/token/rv.c): what a failed
 * C_Login tells the user, from its return value and the token's user-PIN
 * flags before and after it.  A wrong PIN is said to be one only on
 * evidence: a PIN code, or a PIN counter flag that appeared.
 */
#include "config.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "token-int.h"
#include "p11a.h"

static char msg[512];
static int refused;

static int
login_fails(CK_RV rv, int known, CK_FLAGS before, CK_FLAGS after)
{
	memset(msg, 0, sizeof(msg));
	refused = -1;
	return tok_login_failure(rv, known, before, after, "card", msg, sizeof(msg), &refused);
}

static void
test_pin_incorrect(void **state)
{
	(void)state;
	assert_int_equal(login_fails(CKR_PIN_INCORRECT, 1, 0, 0), -P11A_E_PIN_INCORRECT);
	assert_int_equal(refused, 1);
	assert_string_equal(msg, "PIN incorrect for token 'card': the token refused the PIN");
	assert_int_equal(login_fails(CKR_PIN_INCORRECT, 0, 0, 0), -P11A_E_PIN_INCORRECT);
	assert_int_equal(refused, 1);
	/* Tries left, from the flags after. */
	login_fails(CKR_PIN_INCORRECT, 1, 0, CKF_USER_PIN_COUNT_LOW);
	assert_non_null(strstr(msg, "PIN count low"));
	login_fails(CKR_PIN_INCORRECT, 1, CKF_USER_PIN_COUNT_LOW,
	     CKF_USER_PIN_COUNT_LOW | CKF_USER_PIN_FINAL_TRY);
	assert_non_null(strstr(msg, "final try before the PIN locks: one try left"));
	login_fails(CKR_PIN_INCORRECT, 1, 0, CKF_USER_PIN_LOCKED);
	assert_non_null(strstr(msg, "no tries left"));
}

static void
test_pin_locked(void **state)
{
	(void)state;
	assert_int_equal(login_fails(CKR_PIN_LOCKED, 1, CKF_USER_PIN_LOCKED, CKF_USER_PIN_LOCKED),
			 -P11A_E_PIN_LOCKED);
	assert_int_equal(refused, 1);
	assert_string_equal(msg, "the user PIN of token 'card' is locked");
}

/* A general error while a PIN counter flag appears: the token counted a wrong PIN. */
static void
test_general_error_counter_moved(void **state)
{
	(void)state;
	assert_int_equal(login_fails(CKR_GENERAL_ERROR, 1, CKF_LOGIN_REQUIRED,
			      CKF_LOGIN_REQUIRED | CKF_USER_PIN_COUNT_LOW), -P11A_E_PIN_INCORRECT);
	assert_int_equal(refused, 1);
	assert_non_null(strstr(msg, "PIN incorrect for token 'card': the token refused the PIN"));
	assert_non_null(strstr(msg, "PIN count low"));
	assert_non_null(strstr(msg, "CKR_GENERAL_ERROR"));
	assert_int_equal(login_fails(CKR_FUNCTION_FAILED, 1, CKF_USER_PIN_COUNT_LOW,
			      CKF_USER_PIN_COUNT_LOW | CKF_USER_PIN_FINAL_TRY), -P11A_E_PIN_INCORRECT);
	assert_non_null(strstr(msg, "one try left"));
	assert_int_equal(login_fails(CKR_DEVICE_ERROR, 1, CKF_USER_PIN_FINAL_TRY, CKF_USER_PIN_LOCKED),
			 -P11A_E_PIN_LOCKED);
	assert_int_equal(refused, 1);
	assert_non_null(strstr(msg, "locked"));
}

/* The same error with no flag change: never called a wrong PIN. */
static void
test_general_error_no_evidence(void **state)
{
	(void)state;
	assert_int_equal(login_fails(CKR_GENERAL_ERROR, 1, CKF_LOGIN_REQUIRED, CKF_LOGIN_REQUIRED),
			 -P11A_E_TOKEN);
	assert_int_equal(refused, 0);
	assert_null(strstr(msg, "PIN incorrect"));
	assert_null(strstr(msg, "refused the PIN"));
	assert_non_null(strstr(msg, "C_Login: CKR_GENERAL_ERROR"));
	assert_non_null(strstr(msg, "the PIN may be wrong"));
	/* A flag that was already set before is no news. */
	login_fails(CKR_GENERAL_ERROR, 1, CKF_USER_PIN_COUNT_LOW, CKF_USER_PIN_COUNT_LOW);
	assert_int_equal(refused, 0);
	/* Flags unknown: the bare error. */
	login_fails(CKR_GENERAL_ERROR, 0, 0, CKF_USER_PIN_LOCKED);
	assert_int_equal(refused, 0);
	assert_string_equal(msg, "token 'card': C_Login: CKR_GENERAL_ERROR");
	/* Other errors are what they are, with no PIN guess. */
	assert_int_equal(login_fails(CKR_HOST_MEMORY, 1, 0, 0), -P11A_E_NOMEM);
	assert_int_equal(refused, 0);
	assert_string_equal(msg, "token 'card': C_Login: CKR_HOST_MEMORY");
	login_fails(CKR_USER_TYPE_INVALID, 1, 0, 0);
	assert_null(strstr(msg, "PIN"));
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_pin_incorrect),
		cmocka_unit_test(test_pin_locked),
		cmocka_unit_test(test_general_error_counter_moved),
		cmocka_unit_test(test_general_error_no_evidence),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
