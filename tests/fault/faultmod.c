/*
 * A fault-injecting PKCS#11 module for the tests (tests/integration/t_faults.sh).
 *
 * It wraps a real module (P11A_FAULT_MODULE, e.g. SoftHSM2) and passes
 * every call through, except where a small control file, re-read on every
 * call, says otherwise.  Settings:
 *
 *   C_Initialize pReserved (the agent's module-init-args), space-separated:
 *     control=PATH   the control file (else $P11A_FAULT_CONTROL)
 *     label=LABEL    show only the token with this label (so that two
 *                    instances over one SoftHSM2 store show one token each)
 *     -- REST        REST (to the end, spaces and all) is passed on as the
 *                    real module's pReserved (NSS softokn needs its
 *                    configdir=... there); without "--" the real module
 *                    gets NULL: SoftHSM2 refuses a non-NULL one.
 *
 * Control file, one directive a line ('#' comments):
 *   removed=1             the token is absent: left out of C_GetSlotList
 *                         (tokenPresent), C_GetTokenInfo/C_OpenSession give
 *                         CKR_TOKEN_NOT_PRESENT, session calls
 *                         CKR_DEVICE_REMOVED.  On removal every session of
 *                         the real module is closed (as pulling a card
 *                         does: the login is lost); "removed=0" or no line
 *                         is reinsertion.
 *   pinflags=F[,F]        count_low, final_try, locked, protected
 *                         (CKF_PROTECTED_AUTHENTICATION_PATH): added to the
 *                         token info flags
 *   padpin=PIN            a C_Login with a NULL PIN (a PIN pad reader's
 *                         protected path) logs the real token in with PIN,
 *                         as if the user typed it on the reader's keypad;
 *                         without the line it fails CKR_PIN_INCORRECT.
 *                         (No reader with a keypad exists on the test
 *                         machines; SoftHSM2 refuses a NULL PIN.)
 *   FUNC=ACTION [once] [flags=F[,F]]
 *                         FUNC one of the wrapped C_* functions; ACTION
 *                         CKR_NAME or 0xHEX (return it without calling
 *                         the real module), delay:MS (sleep, then pass
 *                         through, or CKR_DEVICE_REMOVED if the token was
 *                         removed meanwhile), hang (block until a line
 *                         "unhang" appears), abort (abort the process).
 *                         shutdown:FD (shut socket FD down both ways, as
 *                         vendor code that closes descriptors it does not
 *                         own, then hang as "hang").
 *                         "once": the line is deleted from the file when
 *                         it fires.  flags=: pinflags while the line stands.
 *                         "leave-active" (C_Sign with a CKR_ error): do not
 *                         finish the real operation, as a non-conformant
 *                         module leaves its session after an error.
 *   unhang                releases hung calls
 *
 * Every C_Initialize, C_Login and C_Sign call is appended as a line to
 * CONTROL.calls ("C_Login rv=0x000000a0"), so a test can count them
 * (e.g. prove that a wrong PIN is sent once).  A context-specific login
 * (CKU_CONTEXT_SPECIFIC) is "C_Login:context rv=...", one with a NULL PIN
 * "C_Login:pad rv=...".  Never a PIN.
 */
#define _GNU_SOURCE     /* PTHREAD_RWLOCK_WRITER_NONRECURSIVE_INITIALIZER_NP */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

#define EXPORT __attribute__((visibility("default")))
#define CTL_MAX 4096

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
/*
 * Removal closes every session of the real module (removal_track) while
 * other threads may be inside it with one of those sessions, and SoftHSM2
 * then frees a session, its operation and its session objects under a
 * caller still using them (it crashed in C_Sign under t_soak).  A real
 * module handles its own token's removal; here every call that takes a
 * session into the real module holds this lock shared (real_enter/leave)
 * and the close-all holds it exclusively, writers first so that a stream
 * of signatures cannot hold off a removal.  Hangs and delays happen before
 * the lock is taken.
 */
static pthread_rwlock_t real_lock = PTHREAD_RWLOCK_WRITER_NONRECURSIVE_INITIALIZER_NP;
static void *real_dl;
static CK_FUNCTION_LIST_PTR real;
static CK_FUNCTION_LIST fl;
static char control[1024];
static char label[33];          /* padded to 32 with blanks; "" = every token */
static int was_removed;
static char pass_on[2048];      /* the real module's pReserved ("" = NULL) */

struct state {
	int removed;
	int unhang;
	CK_FLAGS pinflags;
	int has_padpin;
	char padpin[256];
	/* the rule for the function asked about */
	int has_rule;
	char action[64];
	int once;
	int leave_active;               /* C_Sign: keep the real operation open */
	char line[256];
};

/* The calling thread's last rule said "leave-active". */
static __thread int fault_leave_active;

static const struct {
	const char *name;
	CK_RV rv;
} rvs[] = {
	{ "CKR_OK", CKR_OK },
	{ "CKR_GENERAL_ERROR", CKR_GENERAL_ERROR },
	{ "CKR_FUNCTION_FAILED", CKR_FUNCTION_FAILED },
	{ "CKR_DEVICE_ERROR", CKR_DEVICE_ERROR },
	{ "CKR_DEVICE_MEMORY", CKR_DEVICE_MEMORY },
	{ "CKR_DEVICE_REMOVED", CKR_DEVICE_REMOVED },
	{ "CKR_TOKEN_NOT_PRESENT", CKR_TOKEN_NOT_PRESENT },
	{ "CKR_SESSION_HANDLE_INVALID", CKR_SESSION_HANDLE_INVALID },
	{ "CKR_SESSION_CLOSED", CKR_SESSION_CLOSED },
	{ "CKR_SESSION_COUNT", CKR_SESSION_COUNT },
	{ "CKR_USER_NOT_LOGGED_IN", CKR_USER_NOT_LOGGED_IN },
	{ "CKR_PIN_INCORRECT", CKR_PIN_INCORRECT },
	{ "CKR_PIN_LOCKED", CKR_PIN_LOCKED },
	{ "CKR_PIN_EXPIRED", CKR_PIN_EXPIRED },
	{ "CKR_KEY_HANDLE_INVALID", CKR_KEY_HANDLE_INVALID },
	{ "CKR_OBJECT_HANDLE_INVALID", CKR_OBJECT_HANDLE_INVALID },
	{ "CKR_CRYPTOKI_NOT_INITIALIZED", CKR_CRYPTOKI_NOT_INITIALIZED },
};

static void
sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };

	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

static void
calls_log(const char *fn, CK_RV rv)
{
	char path[1100], line[80];
	int fd, n;

	if (control[0] == '\0')
		return;
	snprintf(path, sizeof(path), "%s.calls", control);
	fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
	if (fd < 0)
		return;
	n = snprintf(line, sizeof(line), "%s rv=0x%08lx\n", fn, (unsigned long)rv);
	if (write(fd, line, (size_t)n) != n) {
		/* nothing to do: the test will see a missing line */
	}
	close(fd);
}

static CK_FLAGS
parse_flags(const char *s)
{
	CK_FLAGS f = 0;

	if (strstr(s, "count_low"))
		f |= CKF_USER_PIN_COUNT_LOW;
	if (strstr(s, "final_try"))
		f |= CKF_USER_PIN_FINAL_TRY;
	if (strstr(s, "locked"))
		f |= CKF_USER_PIN_LOCKED;
	if (strstr(s, "protected"))
		f |= CKF_PROTECTED_AUTHENTICATION_PATH;
	return f;
}

/* Reads the control file; fills st with the global state and fn's rule. */
static void
state_read(const char *fn, struct state *st)
{
	char buf[CTL_MAX + 1], *line, *save = NULL;
	size_t fnl = fn ? strlen(fn) : 0;
	ssize_t n;
	int fd;

	memset(st, 0, sizeof(*st));
	if (control[0] == '\0' || (fd = open(control, O_RDONLY | O_CLOEXEC)) < 0)
		return;
	n = read(fd, buf, CTL_MAX);
	close(fd);
	if (n <= 0)
		return;
	buf[n] = '\0';
	for (line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		char *f;
		if (line[0] == '#')
			continue;
		if (strcmp(line, "removed=1") == 0) {
			st->removed = 1;
		} else if (strcmp(line, "unhang") == 0) {
			st->unhang = 1;
		} else if (strncmp(line, "pinflags=", 9) == 0) {
			st->pinflags |= parse_flags(line + 9);
		} else if (strncmp(line, "padpin=", 7) == 0) {
			st->has_padpin = 1;
			snprintf(st->padpin, sizeof(st->padpin), "%s", line + 7);
		} else if (strncmp(line, "C_", 2) == 0) {
			if ((f = strstr(line, " flags=")) != NULL)
				st->pinflags |= parse_flags(f + 7);
			if (fn && !st->has_rule && strncmp(line, fn, fnl) == 0 && line[fnl] == '=') {
				st->has_rule = 1;
				snprintf(st->line, sizeof(st->line), "%s", line);
				snprintf(st->action, sizeof(st->action), "%.*s",
					 (int)strcspn(line + fnl + 1, " "), line + fnl + 1);
				st->once = strstr(line + fnl, " once") != NULL;
				st->leave_active = strstr(line + fnl, " leave-active") != NULL;
			}
		}
	}
}

/* Deletes the first line equal to 'line' from the control file. */
static void
rule_consume(const char *line)
{
	char buf[CTL_MAX + 1], out[CTL_MAX + 1], tmp[1100], *l, *save = NULL;
	size_t o = 0;
	ssize_t n;
	int fd, done = 0;

	pthread_mutex_lock(&lock);
	if ((fd = open(control, O_RDONLY | O_CLOEXEC)) < 0)
		goto out;
	n = read(fd, buf, CTL_MAX);
	close(fd);
	if (n < 0)
		goto out;
	buf[n] = '\0';
	for (l = strtok_r(buf, "\n", &save); l; l = strtok_r(NULL, "\n", &save)) {
		if (!done && strcmp(l, line) == 0) {
			done = 1;
			continue;
		}
		o += (size_t)snprintf(out + o, sizeof(out) - o, "%s\n", l);
	}
	snprintf(tmp, sizeof(tmp), "%s.tmp%ld", control, (long)getpid());
	if ((fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600)) < 0)
		goto out;
	if (write(fd, out, o) != (ssize_t)o) {
		close(fd);
		unlink(tmp);
		goto out;
	}
	close(fd);
	if (rename(tmp, control) != 0)
		unlink(tmp);
 out:
	pthread_mutex_unlock(&lock);
}

/*
 * Removal bookkeeping: on the first call that sees removed=1 close every
 * session of the real module (a pulled card forgets its login).
 */
static void
removal_track(const struct state *st)
{
	CK_SLOT_ID ids[64];
	CK_ULONG n = 64;
	int close_all = 0;

	pthread_mutex_lock(&lock);
	if (st->removed && !was_removed)
		close_all = 1;
	was_removed = st->removed;
	pthread_mutex_unlock(&lock);
	if (close_all && real && real->C_GetSlotList(CK_FALSE, ids, &n) == CKR_OK) {
		pthread_rwlock_wrlock(&real_lock);
		for (CK_ULONG i = 0; i < n; i++)
			(void)real->C_CloseAllSessions(ids[i]);
		pthread_rwlock_unlock(&real_lock);
	}
}

static void
real_enter(void)
{
	pthread_rwlock_rdlock(&real_lock);
}

static void
real_leave(void)
{
	pthread_rwlock_unlock(&real_lock);
}

/*
 * Applies fn's rule.  Returns 1 with *rv set when the call must return
 * *rv without reaching the real module, 0 to pass through.
 */
static int
fault(const char *fn, int session_call, int slot_call, CK_RV *rv)
{
	struct state st;

	state_read(fn, &st);
	removal_track(&st);
	if (st.removed && session_call) {
		*rv = CKR_DEVICE_REMOVED;
		return 1;
	}
	if (st.removed && slot_call) {
		*rv = CKR_TOKEN_NOT_PRESENT;
		return 1;
	}
	if (!st.has_rule)
		return 0;
	if (st.once)
		rule_consume(st.line);
	fault_leave_active = st.leave_active;
	if (strcmp(st.action, "abort") == 0) {
		abort();
	} else if (strcmp(st.action, "hang") == 0) {
		for (;;) {
			sleep_ms(100);
			state_read(NULL, &st);
			if (st.unhang)
				break;
		}
		*rv = CKR_DEVICE_ERROR;
		return 1;
	} else if (strncmp(st.action, "shutdown:", 9) == 0) {
		(void)shutdown(atoi(st.action + 9), SHUT_RDWR);
		for (;;) {
			sleep_ms(100);
			state_read(NULL, &st);
			if (st.unhang)
				break;
		}
		*rv = CKR_DEVICE_ERROR;
		return 1;
	} else if (strncmp(st.action, "delay:", 6) == 0) {
		sleep_ms(atol(st.action + 6));
		state_read(NULL, &st);
		removal_track(&st);
		if (st.removed && (session_call || slot_call)) {
			*rv = session_call ? CKR_DEVICE_REMOVED : CKR_TOKEN_NOT_PRESENT;
			return 1;
		}
		return 0;
	}
	for (size_t i = 0; i < sizeof(rvs) / sizeof(rvs[0]); i++) {
		if (strcmp(st.action, rvs[i].name) == 0) {
			*rv = rvs[i].rv;
			return 1;
		}
	}
	if (strncmp(st.action, "0x", 2) == 0) {
		*rv = (CK_RV)strtoul(st.action, NULL, 16);
		return 1;
	}
	return 0;
}

static int
slot_shown(CK_SLOT_ID id)
{
	CK_TOKEN_INFO ti;

	if (label[0] == '\0')
		return 1;
	if (real->C_GetTokenInfo(id, &ti) != CKR_OK)
		return 0;
	return memcmp(ti.label, label, 32) == 0;
}

/* ------------------------------------------------------------ wrappers */

static CK_RV
w_Initialize(CK_VOID_PTR p)
{
	CK_C_INITIALIZE_ARGS args, *in = p;
	const char *env = getenv("P11A_FAULT_CONTROL");
	CK_RV rv;

	if (env)
		snprintf(control, sizeof(control), "%s", env);
	memset(label, 0, sizeof(label));
	pass_on[0] = '\0';
	if (in && in->pReserved) {
		char spec[2048], *tok, *save = NULL, *rest;
		snprintf(spec, sizeof(spec), "%s", (const char *)in->pReserved);
		if (strncmp(spec, "-- ", 3) == 0)
			rest = spec;
		else if ((rest = strstr(spec, " -- ")) != NULL)
			rest++;
		if (rest) {
			snprintf(pass_on, sizeof(pass_on), "%s", rest + 3);
			*rest = '\0';
		}
		for (tok = strtok_r(spec, " ", &save); tok; tok = strtok_r(NULL, " ", &save)) {
			if (strncmp(tok, "control=", 8) == 0)
				snprintf(control, sizeof(control), "%s", tok + 8);
			else if (strncmp(tok, "label=", 6) == 0) {
				memset(label, ' ', 32);
				memcpy(label, tok + 6, strnlen(tok + 6, 32));
			}
		}
	}
	if (in) {
		args = *in;
		args.pReserved = pass_on[0] ? pass_on : NULL;
		p = &args;
	}
	if (!fault("C_Initialize", 0, 0, &rv))
		rv = real->C_Initialize(p);
	calls_log("C_Initialize", rv);
	return rv;
}

static CK_RV
w_GetSlotList(CK_BBOOL present, CK_SLOT_ID_PTR list, CK_ULONG_PTR count)
{
	CK_SLOT_ID ids[64];
	CK_ULONG n = 64, k = 0;
	CK_RV rv;
	struct state st;

	if (fault("C_GetSlotList", 0, 0, &rv))
		return rv;
	state_read(NULL, &st);
	if ((rv = real->C_GetSlotList(present, ids, &n)) != CKR_OK)
		return rv;
	for (CK_ULONG i = 0; i < n; i++) {
		if (!slot_shown(ids[i]) || (present && st.removed))
			continue;
		if (list && k < *count)
			list[k] = ids[i];
		k++;
	}
	if (list && k > *count) {
		*count = k;
		return CKR_BUFFER_TOO_SMALL;
	}
	*count = k;
	return CKR_OK;
}

static CK_RV
w_GetSlotInfo(CK_SLOT_ID id, CK_SLOT_INFO_PTR info)
{
	CK_RV rv;
	struct state st;

	if (fault("C_GetSlotInfo", 0, 0, &rv))
		return rv;
	rv = real->C_GetSlotInfo(id, info);
	state_read(NULL, &st);
	if (rv == CKR_OK && st.removed)
		info->flags &= ~CKF_TOKEN_PRESENT;
	return rv;
}

static CK_RV
w_GetTokenInfo(CK_SLOT_ID id, CK_TOKEN_INFO_PTR ti)
{
	CK_RV rv;
	struct state st;

	if (fault("C_GetTokenInfo", 0, 1, &rv))
		return rv;
	rv = real->C_GetTokenInfo(id, ti);
	state_read(NULL, &st);
	if (rv == CKR_OK)
		ti->flags |= st.pinflags;
	return rv;
}

static CK_RV
w_GetMechanismList(CK_SLOT_ID id, CK_MECHANISM_TYPE_PTR l, CK_ULONG_PTR n)
{
	CK_RV rv;

	if (fault("C_GetMechanismList", 0, 1, &rv))
		return rv;
	return real->C_GetMechanismList(id, l, n);
}

static CK_RV
w_OpenSession(CK_SLOT_ID id, CK_FLAGS flags, CK_VOID_PTR app, CK_NOTIFY notify,
	      CK_SESSION_HANDLE_PTR h)
{
	CK_RV rv;

	if (fault("C_OpenSession", 0, 1, &rv))
		return rv;
	return real->C_OpenSession(id, flags, app, notify, h);
}

static CK_RV
w_GetSessionInfo(CK_SESSION_HANDLE h, CK_SESSION_INFO_PTR si)
{
	CK_RV rv;

	if (fault("C_GetSessionInfo", 1, 0, &rv))
		return rv;
	real_enter();
	rv = real->C_GetSessionInfo(h, si);
	real_leave();
	return rv;
}

static CK_RV
w_Login(CK_SESSION_HANDLE h, CK_USER_TYPE ut, CK_UTF8CHAR_PTR pin, CK_ULONG len)
{
	CK_RV rv;

	if (!fault("C_Login", 1, 0, &rv)) {
		if (pin == NULL) {
			/* The reader's keypad: the PIN from the control file, or a wrong one. */
			struct state st;
			state_read(NULL, &st);
			if (!st.has_padpin) {
				rv = CKR_PIN_INCORRECT;
			} else {
				real_enter();
				rv = real->C_Login(h, ut, (CK_UTF8CHAR_PTR)st.padpin,
						   (CK_ULONG)strlen(st.padpin));
				real_leave();
			}
			memset(&st, 0, sizeof(st));
		} else {
			real_enter();
			rv = real->C_Login(h, ut, pin, len);
			real_leave();
		}
	}
	calls_log(pin == NULL ? "C_Login:pad" : ut == CKU_CONTEXT_SPECIFIC ? "C_Login:context" :
		  "C_Login", rv);
	return rv;
}

static CK_RV
w_Logout(CK_SESSION_HANDLE h)
{
	CK_RV rv;

	if (fault("C_Logout", 1, 0, &rv))
		return rv;
	real_enter();
	rv = real->C_Logout(h);
	real_leave();
	return rv;
}

static CK_RV
w_FindObjectsInit(CK_SESSION_HANDLE h, CK_ATTRIBUTE_PTR t, CK_ULONG n)
{
	CK_RV rv;

	if (fault("C_FindObjectsInit", 1, 0, &rv))
		return rv;
	real_enter();
	rv = real->C_FindObjectsInit(h, t, n);
	real_leave();
	return rv;
}

static CK_RV
w_FindObjects(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE_PTR o, CK_ULONG max, CK_ULONG_PTR n)
{
	CK_RV rv;

	if (fault("C_FindObjects", 1, 0, &rv))
		return rv;
	real_enter();
	rv = real->C_FindObjects(h, o, max, n);
	real_leave();
	return rv;
}

static CK_RV
w_GetAttributeValue(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_PTR t, CK_ULONG n)
{
	CK_RV rv;

	if (fault("C_GetAttributeValue", 1, 0, &rv))
		return rv;
	real_enter();
	rv = real->C_GetAttributeValue(h, o, t, n);
	real_leave();
	return rv;
}

static CK_RV
w_SignInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k)
{
	CK_RV rv;

	if (fault("C_SignInit", 1, 0, &rv))
		return rv;
	real_enter();
	rv = real->C_SignInit(h, m, k);
	real_leave();
	return rv;
}

static CK_RV
w_Sign(CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dl, CK_BYTE_PTR s, CK_ULONG_PTR sl)
{
	CK_RV rv;

	if (!fault("C_Sign", 1, 0, &rv)) {
		real_enter();
		rv = real->C_Sign(h, d, dl, s, sl);
		real_leave();
	} else if (rv != CKR_OK && !fault_leave_active) {
		/*
		 * A failed C_Sign ends the signing operation (PKCS#11 5.13);
		 * finish the real one so the session is as a token leaves it
		 * (unless the rule says "leave-active": a non-conformant module).
		 */
		CK_BYTE scratch[2048];
		CK_ULONG n = sizeof(scratch);
		real_enter();
		(void)real->C_Sign(h, d, dl, scratch, &n);
		real_leave();
	}
	calls_log("C_Sign", rv);
	return rv;
}

/* Session calls without faults of their own: only the lock (see real_lock). */
static CK_RV
w_CloseSession(CK_SESSION_HANDLE h)
{
	CK_RV rv;

	real_enter();
	rv = real->C_CloseSession(h);
	real_leave();
	return rv;
}

static CK_RV
w_FindObjectsFinal(CK_SESSION_HANDLE h)
{
	CK_RV rv;

	real_enter();
	rv = real->C_FindObjectsFinal(h);
	real_leave();
	return rv;
}

static CK_RV
w_CopyObject(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_PTR t, CK_ULONG n,
	     CK_OBJECT_HANDLE_PTR out)
{
	CK_RV rv;

	real_enter();
	rv = real->C_CopyObject(h, o, t, n, out);
	real_leave();
	return rv;
}

EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR out);

CK_RV
C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR out)
{
	CK_C_GetFunctionList get;
	const char *path = getenv("P11A_FAULT_MODULE");

	if (out == NULL)
		return CKR_ARGUMENTS_BAD;
	pthread_mutex_lock(&lock);
	if (real == NULL) {
		if (path == NULL || (real_dl = dlopen(path, RTLD_NOW | RTLD_LOCAL)) == NULL ||
		    (get = (CK_C_GetFunctionList)dlsym(real_dl, "C_GetFunctionList")) == NULL ||
		    get(&real) != CKR_OK) {
			fprintf(stderr, "faultmod: cannot load P11A_FAULT_MODULE=%s: %s\n",
				path ? path : "(unset)", dlerror());
			real = NULL;
			pthread_mutex_unlock(&lock);
			return CKR_GENERAL_ERROR;
		}
		fl = *real;
		fl.C_Initialize = w_Initialize;
		fl.C_GetSlotList = w_GetSlotList;
		fl.C_GetSlotInfo = w_GetSlotInfo;
		fl.C_GetTokenInfo = w_GetTokenInfo;
		fl.C_GetMechanismList = w_GetMechanismList;
		fl.C_OpenSession = w_OpenSession;
		fl.C_GetSessionInfo = w_GetSessionInfo;
		fl.C_Login = w_Login;
		fl.C_Logout = w_Logout;
		fl.C_FindObjectsInit = w_FindObjectsInit;
		fl.C_FindObjects = w_FindObjects;
		fl.C_GetAttributeValue = w_GetAttributeValue;
		fl.C_SignInit = w_SignInit;
		fl.C_Sign = w_Sign;
		fl.C_CloseSession = w_CloseSession;
		fl.C_FindObjectsFinal = w_FindObjectsFinal;
		fl.C_CopyObject = w_CopyObject;
		fl.C_GetFunctionList = C_GetFunctionList;
	}
	pthread_mutex_unlock(&lock);
	*out = &fl;
	return CKR_OK;
}
