/*
 * The module: loading and C_Initialize, closing and C_Finalize, and the
 * event descriptor signing threads use to tell the control thread that a
 * token changed.  See token.h for the contract and token-int.h for the
 * structures and their locking; the rest of the token helper:
 * rv.c (CK_RV), pool.c (sessions), spki.c (public keys), object.c
 * (objects and pairing), slot.c (slots, token state, inventory),
 * login.c (login and lock), sign.c (key look-up, key copies, signing).
 */
#include "config.h"
#include "token-int.h"
#include "log.h"

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#define CLOSE_WAIT_MS   2000

/* P11AGENT_KEY_COPIES=0 in the agent's environment: sign with token objects only. */
static int
key_copies_wanted(void)
{
	const char *v = getenv("P11AGENT_KEY_COPIES");

	return v == NULL || strcmp(v, "0") != 0;
}

/* Says why loading failed, in msg and in the log, and gives up. */
#define LOAD_FAIL(...) do { \
		snprintf(msg, msg_size, __VA_ARGS__); \
		log_err("%s", msg); \
		goto fail; \
	} while (0)

int
token_module_load(const struct module_conf *mod, int wait_ms, struct token_module **out,
		  char *msg, size_t msg_size)
{
	struct token_module *m;
	CK_C_GetFunctionList get_list;
	CK_C_INITIALIZE_ARGS args;
	char nb[48];
	CK_RV rv;

	*out = NULL;
	if ((m = calloc(1, sizeof(*m))) == NULL) {
		snprintf(msg, msg_size, "out of memory");
		log_err("out of memory");
		return -P11A_E_TOKEN;
	}
	m->event_fd = -1;
	m->wait_ms = wait_ms > 0 ? wait_ms : P11A_SIGN_TIMEOUT_MS;
	atomic_init(&m->key_copies, key_copies_wanted());
	/* The real path modules_resolve() checked, not one a link could redirect. */
	m->path = strdup(mod->load_path != NULL ? mod->load_path : mod->path);
	m->pool_max = mod->session_pool > 0 && mod->session_pool < TOKEN_POOL_MAX ?
	    (unsigned)mod->session_pool : TOKEN_POOL_MAX;
	m->name = strdup(mod->name != NULL ? mod->name : mod->path);
	pthread_mutex_init(&m->lock, NULL);
	pthread_rwlock_init(&m->copy_lock, NULL);
	atomic_init(&m->inflight, 0);
	if (m->path == NULL || m->name == NULL)
		LOAD_FAIL("out of memory");
	m->event_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (m->event_fd < 0)
		LOAD_FAIL("eventfd: %s", strerror(errno));
	m->dl = dlopen(m->path, RTLD_NOW | RTLD_LOCAL);
	if (m->dl == NULL)
		LOAD_FAIL("cannot load module %s: %s", m->path, dlerror());
	*(void **)&get_list = dlsym(m->dl, "C_GetFunctionList");
	if (get_list == NULL)
		LOAD_FAIL("module %s has no C_GetFunctionList: not a PKCS#11 module", m->path);
	rv = get_list(&m->f);
	if (rv != CKR_OK || m->f == NULL)
		LOAD_FAIL("module %s: C_GetFunctionList: %s", m->path, tok_ckr_name(rv, nb, sizeof(nb)));
	if (m->f->version.major < 2)
		LOAD_FAIL("module %s: PKCS#11 version %u.%u is too old", m->path,
			  m->f->version.major, m->f->version.minor);
	memset(&args, 0, sizeof(args));
	args.flags = CKF_OS_LOCKING_OK;
	args.pReserved = mod->init_args;
	rv = m->f->C_Initialize(&args);
	if (rv == CKR_CRYPTOKI_ALREADY_INITIALIZED) {
		log_warn("module %s was initialized already", m->path);
	} else if (rv != CKR_OK) {
		LOAD_FAIL("module %s: C_Initialize: %s", m->path, tok_ckr_name(rv, nb, sizeof(nb)));
	}
	log_debug("module %s loaded (PKCS#11 %u.%u)", m->path, m->f->version.major,
		  m->f->version.minor);
	*out = m;
	return 0;
 fail:
	/* The helper exits after this; no dlclose of a half-initialized module. */
	if (m->event_fd >= 0)
		close(m->event_fd);
	free(m->path);
	free(m->name);
	free(m);
	return -P11A_E_TOKEN;
}
#undef LOAD_FAIL

void
token_module_close(struct token_module *m)
{
	struct timespec ts = { 0, 10 * 1000 * 1000 };
	int waited = 0;

	if (m == NULL)
		return;
	pthread_mutex_lock(&m->lock);
	m->closing = 1;
	pthread_mutex_unlock(&m->lock);
	while (atomic_load(&m->inflight) > 0 && waited < CLOSE_WAIT_MS) {
		nanosleep(&ts, NULL);
		waited += 10;
	}
	if (atomic_load(&m->inflight) > 0) {
		log_warn("a signature is still in progress; not finalizing the module");
		return;
	}
	/* Closing the sessions logs the tokens out (PKCS#11 login is per application). */
	atomic_store(&m->watch_stop, 1);
	(void)m->f->C_Finalize(NULL);
	/* C_Finalize wakes a thread in C_WaitForSlotEvent (PKCS#11 2.40 5.4). */
	tok_watch_join(m);
	log_debug("module %s finalized", m->path);
}

int
token_event_fd(const struct token_module *m)
{
	return m->event_fd;
}

void
token_event_clear(struct token_module *m)
{
	uint64_t v;
	ssize_t n = read(m->event_fd, &v, sizeof(v));

	(void)n;
}

void
tok_notify(struct token_module *m)
{
	uint64_t one = 1;
	ssize_t n = write(m->event_fd, &one, sizeof(one));

	(void)n;        /* EAGAIN: a wake-up is pending already */
}
