/*
 * pkcs11_parallel: does a PKCS#11 call of one thread wait for another
 * thread's signature?  Run by t_pkcs11_parallel.sh against the front-end
 * module with the agent signing through tests/fault/ (control file CTL).
 *
 *   pkcs11_parallel MODULE CTL TOKEN KEY_LABEL PIN [AGENT_PID]
 *
 * Thread A signs with KEY_LABEL (ECDSA P-256) after "C_Sign=hang once" is
 * written to CTL, so its C_Sign hangs in the token.  Once the fault module
 * has taken the rule (the line is gone from CTL: A is in the token's
 * C_Sign), thread B lists slots, opens a second session, logs in on it
 * (C_Login always refreshes from the agent's LIST), finds the key and
 * signs with it.  Only when B is done, or A came back by itself, is
 * "unhang" written to CTL.  The check is an ordering, never a time: B's
 * calls all return while A is still inside C_Sign.
 *
 * With AGENT_PID, a second part: the agent's main process is stopped
 * (SIGSTOP), so a LIST gets no answer; thread X calls C_Login on a new
 * session (a forced LIST) and, once X sleeps in that request (its state
 * in /proc/self/task is 'S'; nothing else can put it to sleep), thread Y
 * signs on A's session, which needs only its signing channel to the
 * token's helper.  Y must return before X does; then the agent is
 * continued (SIGCONT).
 *
 * Prints one line per check: "ok<TAB>WHAT" or "not ok<TAB>WHAT<TAB>WHY";
 * exits 0 when it could run the checks at all.
 */
#define _GNU_SOURCE     /* gettid */
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <pthread.h>
#include <stdarg.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

static CK_FUNCTION_LIST_PTR p;
static const char *ctl, *token, *label, *pin;
static CK_SLOT_ID slot;
static CK_OBJECT_HANDLE key_a;
static CK_SESSION_HANDLE sess_a;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int a_done, b_done, x_done, y_done;
static pid_t x_tid;
static CK_RV x_rv, y_rv;
static CK_RV a_rv;

static const CK_BYTE digest[32] = {
	0x70, 0x31, 0x31, 0x61, 0x67, 0x65, 0x6e, 0x74, 1, 2, 3, 4, 5, 6, 7, 8,
	9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24
};

static void
check(int cond, const char *what, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void
check(int cond, const char *what, const char *fmt, ...)
{
	va_list ap;

	if (cond) {
		printf("ok\t%s\n", what);
	} else {
		printf("not ok\t%s\t", what);
		va_start(ap, fmt);
		vprintf(fmt, ap);
		va_end(ap);
		putchar('\n');
	}
	fflush(stdout);
}

static void
die(const char *what, CK_RV rv)
{
	printf("not ok\t%s\tCK_RV 0x%lx\n", what, rv);
	exit(1);
}

static int
a_is_done(void)
{
	int d;

	pthread_mutex_lock(&mu);
	d = a_done;
	pthread_mutex_unlock(&mu);
	return d;
}

static void
ctl_write(const char *text)
{
	char tmp[4096];
	FILE *f;

	snprintf(tmp, sizeof(tmp), "%s.parallel", ctl);
	if ((f = fopen(tmp, "w")) == NULL || fputs(text, f) < 0 || fclose(f) != 0 ||
	    rename(tmp, ctl) != 0) {
		printf("not ok\twrite the control file %s\n", ctl);
		exit(1);
	}
}

/* 1 while CTL still holds a C_Sign rule (the fault module has not taken it). */
static int
ctl_has_rule(void)
{
	char buf[4096];
	size_t n;
	FILE *f = fopen(ctl, "r");

	if (f == NULL)
		return 0;
	n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	return strstr(buf, "C_Sign=") != NULL;
}

static CK_RV
find_key(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE *out)
{
	CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
	CK_ATTRIBUTE t[] = {
		{ CKA_CLASS, &cls, sizeof(cls) },
		{ CKA_LABEL, (void *)label, strlen(label) },
	};
	CK_ULONG n = 0;
	CK_RV rv;

	if ((rv = p->C_FindObjectsInit(s, t, 2)) != CKR_OK)
		return rv;
	rv = p->C_FindObjects(s, out, 1, &n);
	(void)p->C_FindObjectsFinal(s);
	if (rv == CKR_OK && n != 1)
		rv = CKR_OBJECT_HANDLE_INVALID;
	return rv;
}

static CK_RV
sign(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE k, CK_ULONG *len)
{
	CK_MECHANISM m = { CKM_ECDSA, NULL, 0 };
	CK_BYTE sig[256];
	CK_RV rv;

	*len = sizeof(sig);
	if ((rv = p->C_SignInit(s, &m, k)) != CKR_OK)
		return rv;
	return p->C_Sign(s, (CK_BYTE_PTR)digest, sizeof(digest), sig, len);
}

static void *
thread_a(void *arg)
{
	CK_ULONG len;
	CK_RV rv = sign(sess_a, key_a, &len);

	(void)arg;
	pthread_mutex_lock(&mu);
	a_rv = rv;
	a_done = 1;
	pthread_cond_broadcast(&cv);
	pthread_mutex_unlock(&mu);
	return NULL;
}

/* Each of B's steps notes whether A had come back by then. */
static void
b_step(const char *what, CK_RV rv, int cond)
{
	int a = a_is_done();
	char desc[256];

	snprintf(desc, sizeof(desc), "while A hangs in C_Sign, B: %s", what);
	if (rv != CKR_OK || !cond)
		check(0, desc, "CK_RV 0x%lx%s", rv, a ? " (after A came back)" : "");
	else
		check(!a, desc, "returned only after A's C_Sign came back: B waited for A");
}

static void *
thread_b(void *arg)
{
	CK_SLOT_ID slots[16];
	CK_ULONG n = 16, len = 0;
	CK_SESSION_HANDLE s2 = CK_INVALID_HANDLE;
	CK_OBJECT_HANDLE k2 = CK_INVALID_HANDLE;
	CK_RV rv;

	(void)arg;
	rv = p->C_GetSlotList(CK_TRUE, slots, &n);
	b_step("C_GetSlotList", rv, n > 0);
	rv = p->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s2);
	b_step("C_OpenSession (a second session)", rv, 1);
	/* Logged in already: C_Login answers OK after a forced LIST. */
	rv = p->C_Login(s2, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin));
	b_step("C_Login (refreshes from the agent's LIST)", rv, 1);
	rv = find_key(s2, &k2);
	b_step("C_FindObjects finds the key, same handle as A's", rv, k2 == key_a);
	rv = sign(s2, k2, &len);
	b_step("C_SignInit + C_Sign on the second session", rv, len == 64);
	(void)p->C_CloseSession(s2);
	pthread_mutex_lock(&mu);
	b_done = 1;
	pthread_cond_broadcast(&cv);
	pthread_mutex_unlock(&mu);
	return NULL;
}

static void *
thread_x(void *arg)
{
	CK_SESSION_HANDLE s;
	CK_RV rv;

	(void)arg;
	pthread_mutex_lock(&mu);
	x_tid = gettid();
	pthread_mutex_unlock(&mu);
	rv = p->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s);
	if (rv == CKR_OK) {
		rv = p->C_Login(s, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin));
		(void)p->C_CloseSession(s);
	}
	pthread_mutex_lock(&mu);
	x_rv = rv;
	x_done = 1;
	pthread_cond_broadcast(&cv);
	pthread_mutex_unlock(&mu);
	return NULL;
}

static void *
thread_y(void *arg)
{
	CK_ULONG len = 0;
	CK_RV rv = sign(sess_a, key_a, &len);
	int x;

	(void)arg;
	pthread_mutex_lock(&mu);
	x = x_done;
	y_rv = rv == CKR_OK && len != 64 ? CKR_GENERAL_ERROR : rv;
	y_done = 1;
	pthread_cond_broadcast(&cv);
	pthread_mutex_unlock(&mu);
	if (y_rv != CKR_OK)
		check(0, "while X waits for LIST, Y: C_SignInit + C_Sign", "CK_RV 0x%lx%s", y_rv,
		      x ? " (after X came back)" : "");
	else
		check(!x, "while X waits for LIST, Y: C_SignInit + C_Sign", "%s",
		      "returned only after X's C_Login came back: Y waited for X's LIST");
	return NULL;
}

/* Thread tid's state letter from /proc (no stdio, no malloc: nothing X could wait for). */
static char
task_state(pid_t tid)
{
	char path[64], buf[512], *r;
	ssize_t n;
	int fd;

	snprintf(path, sizeof(path), "/proc/self/task/%d/stat", (int)tid);
	if ((fd = open(path, O_RDONLY | O_CLOEXEC)) < 0)
		return '?';
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return '?';
	buf[n] = '\0';
	if ((r = strrchr(buf, ')')) == NULL || r[1] != ' ')
		return '?';
	return r[2];
}

/* The LIST part: a stopped agent main process stalls no signature. */
static void
list_part(pid_t agent)
{
	pthread_t tx, ty;
	pid_t tid = 0;
	int waited, x_first;

	if (kill(agent, SIGSTOP) != 0) {
		check(0, "stop the agent's main process", "kill: %s", strerror(errno));
		return;
	}
	pthread_create(&tx, NULL, thread_x, NULL);
	for (waited = 0; waited < 60000; waited += 1) {
		struct timespec ts = { 0, 1000 * 1000 };

		pthread_mutex_lock(&mu);
		tid = x_tid;
		pthread_mutex_unlock(&mu);
		if ((tid != 0 && task_state(tid) == 'S'))
			break;
		nanosleep(&ts, NULL);
	}
	pthread_mutex_lock(&mu);
	if (x_done) {
		pthread_mutex_unlock(&mu);
		check(0, "X's C_Login waits for the stopped agent's LIST", "X came back: CK_RV 0x%lx", x_rv);
		kill(agent, SIGCONT);
		pthread_join(tx, NULL);
		return;
	}
	pthread_mutex_unlock(&mu);
	check(tid != 0 && task_state(tid) == 'S', "X's C_Login waits for the stopped agent's LIST",
	      "X never slept");
	pthread_create(&ty, NULL, thread_y, NULL);
	pthread_mutex_lock(&mu);
	while (!y_done && !x_done)
		pthread_cond_wait(&cv, &mu);
	x_first = x_done;
	pthread_mutex_unlock(&mu);
	check(!x_first, "Y's signature returned while X was still waiting for LIST", "%s",
	      "X came back first: Y waited for X's LIST");
	kill(agent, SIGCONT);
	pthread_join(ty, NULL);
	pthread_join(tx, NULL);
	check(x_rv == CKR_OK, "X's C_Login returns OK once the agent answers LIST", "CK_RV 0x%lx", x_rv);
}

int
main(int argc, char **argv)
{
	CK_C_INITIALIZE_ARGS args = { .flags = CKF_OS_LOCKING_OK };
	CK_C_GetFunctionList gfl;
	CK_SLOT_ID slots[16];
	CK_ULONG n = 16, len;
	CK_SESSION_HANDLE s0;
	pthread_t ta, tb;
	CK_RV rv;
	void *h;
	int i, waited;

	if (argc != 6 && argc != 7) {
		fprintf(stderr, "usage: pkcs11_parallel MODULE CTL TOKEN KEY_LABEL PIN [AGENT_PID]\n");
		return 2;
	}
	ctl = argv[2];
	token = argv[3];
	label = argv[4];
	pin = argv[5];
	if ((h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL)) == NULL ||
	    (gfl = (CK_C_GetFunctionList)dlsym(h, "C_GetFunctionList")) == NULL || gfl(&p) != CKR_OK) {
		printf("not ok\tload %s\t%s\n", argv[1], dlerror());
		return 1;
	}
	if ((rv = p->C_Initialize(&args)) != CKR_OK)
		die("C_Initialize", rv);
	if ((rv = p->C_GetSlotList(CK_TRUE, slots, &n)) != CKR_OK)
		die("C_GetSlotList", rv);
	for (i = 0; i < (int)n; i++) {
		CK_TOKEN_INFO ti;
		size_t l = strlen(token);

		if (p->C_GetTokenInfo(slots[i], &ti) == CKR_OK && l <= sizeof(ti.label) &&
		    memcmp(ti.label, token, l) == 0 && (l == sizeof(ti.label) || ti.label[l] == ' '))
			break;
	}
	if (i == (int)n)
		die("the token is a slot of the module", CKR_TOKEN_NOT_PRESENT);
	slot = slots[i];
	if ((rv = p->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s0)) != CKR_OK)
		die("C_OpenSession", rv);
	if ((rv = p->C_Login(s0, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin))) != CKR_OK)
		die("C_Login", rv);
	if ((rv = p->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &sess_a)) != CKR_OK)
		die("C_OpenSession for A", rv);
	if ((rv = find_key(sess_a, &key_a)) != CKR_OK)
		die("find the key for A", rv);
	rv = sign(sess_a, key_a, &len);
	check(rv == CKR_OK && len == 64, "baseline: the key signs through the module", "CK_RV 0x%lx", rv);

	ctl_write("C_Sign=hang once\n");
	pthread_create(&ta, NULL, thread_a, NULL);
	/* Wait for the event itself: the fault module took the rule, so A is in the token's C_Sign. */
	for (waited = 0; ctl_has_rule() && !a_is_done() && waited < 60000; waited += 10) {
		struct timespec ts = { 0, 10 * 1000 * 1000 };
		nanosleep(&ts, NULL);
	}
	if (ctl_has_rule() || a_is_done()) {
		check(0, "A's C_Sign reaches the token and hangs there", "%s",
		      a_is_done() ? "A came back" : "the fault module never took the rule");
		ctl_write("unhang\n");
		pthread_join(ta, NULL);
		return 1;
	}
	check(1, "A's C_Sign reaches the token and hangs there", "-");

	pthread_create(&tb, NULL, thread_b, NULL);
	/* Until B is done, or A came back by itself (the client's deadline): then release A. */
	pthread_mutex_lock(&mu);
	while (!b_done && !a_done)
		pthread_cond_wait(&cv, &mu);
	pthread_mutex_unlock(&mu);
	check(!a_is_done(), "B's calls all returned while A was still in C_Sign", "%s",
	      "A came back first: B's calls waited for A's signature");
	ctl_write("unhang\n");
	pthread_join(tb, NULL);
	pthread_join(ta, NULL);
	check(a_rv != CKR_OK, "A's C_Sign fails once the token's C_Sign is released with an error",
	      "CK_RV 0x%lx", a_rv);
	rv = sign(sess_a, key_a, &len);
	check(rv == CKR_OK && len == 64, "A's session signs again afterwards", "CK_RV 0x%lx", rv);
	if (argc == 7)
		list_part((pid_t)atoi(argv[6]));
	rv = p->C_Finalize(NULL);
	check(rv == CKR_OK, "C_Finalize", "CK_RV 0x%lx", rv);
	return 0;
}
