/*
 * signbench: signing throughput and latency with T threads, one key.
 *
 *   signbench agent    SOCK KEY_URI            ALG THREADS SECS [COUNT]
 *   signbench provider KEY_URI                 ALG THREADS SECS [COUNT]
 *   signbench pkcs11   MODULE TOKEN LABEL PIN  ALG THREADS SECS [COUNT]
 *
 * ALG: ec (ECDSA P-256 on a SHA-256 digest) or pss (RSA-PSS SHA-256,
 * MGF1 SHA-256, salt 32).  Each thread signs in a loop for SECS seconds
 * (or, with COUNT > 0, until the threads together made COUNT signatures).
 *
 * agent:    each thread its own p11a_client (common/client.c): a main
 *           connection plus a signing channel; SIGN with input DIGEST.
 * provider: the key from OSSL_STORE (the p11agent provider, enabled by
 *           OPENSSL_CONF), one shared EVP_PKEY; each signature is
 *           EVP_DigestSignInit_ex + EVP_DigestSign on a 32-byte message,
 *           as TLS does for CertificateVerify.
 * pkcs11:   the PKCS#11 module in process, the way a good client drives
 *           it: C_Login once, a session per thread, the private key copied
 *           into a session object (C_CopyObject, CKA_TOKEN false) where
 *           the token allows it, C_SignInit + C_Sign per signature.  With
 *           MODULE = p11-kit-client.so and P11_KIT_SERVER_ADDRESS set this
 *           measures p11-kit's RPC forwarding; with MODULE =
 *           p11agent-pkcs11.so and P11AGENT_SOCK set, the agent's PKCS#11
 *           front end (which has no C_CopyObject: the agent copies keys).
 *
 * BENCH_NO_COPY=1 in the environment: sign with the token object itself.
 *
 * Prints "ops=N secs=S rate=R p50_us=X p99_us=Y" and, on stderr, how many
 * sessions used a session copy of the key.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rsa.h>
#include <openssl/store.h>

#include <p11-kit/pkcs11.h>

#include "benchutil.h"
#include "client.h"
#include "p11a.h"
#include "proto.h"

enum mode { M_AGENT, M_PROVIDER, M_PKCS11 };

static enum mode mode;
static int alg_pss;
static const char *sock_path, *key_uri;
static double secs;
static long count;                      /* 0: run for secs */
static atomic_long issued;
static EVP_PKEY *shared_pkey;
static CK_FUNCTION_LIST_PTR p11;
static CK_SLOT_ID slot;
static const char *key_label;
static atomic_int copies;
static pthread_barrier_t start_barrier;
static double t_end;

static const uint8_t digest[32] = {
	1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
	17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32
};

struct worker {
	pthread_t th;
	struct lat lat;
	double t_done;
	int failed;
};

/* Another signature to make?  Time or count bound. */
static int
more(double now)
{
	if (count > 0)
		return atomic_fetch_add(&issued, 1) < count;
	return now < t_end;
}

/* ---------------------------------------------------------------- agent */

static int
run_agent(struct worker *w)
{
	struct p11a_client *c = NULL;
	struct p11a_sign req;
	uint8_t *sig = NULL;
	size_t sig_len;
	double now;
	int r;

	memset(&req, 0, sizeof(req));
	req.key_uri = (char *)key_uri;
	req.scheme = alg_pss ? P11A_SCHEME_RSA_PSS : P11A_SCHEME_ECDSA;
	req.hash = P11A_HASH_SHA256;
	req.input = P11A_INPUT_DIGEST;
	req.salt_len = P11A_PSS_SALT_DIGEST;
	req.data = (uint8_t *)digest;
	req.data_len = sizeof(digest);
	if ((r = p11a_client_connect(sock_path, "signbench", 0, &c, NULL, 0)) < 0) {
		fprintf(stderr, "signbench: connect %s: %s\n", sock_path, p11a_strerror(-r));
		pthread_barrier_wait(&start_barrier);
		return -1;
	}
	/* Open the channel before the clock starts. */
	if ((r = p11a_client_sign(c, &req, &sig, &sig_len)) < 0) {
		fprintf(stderr, "signbench: sign: %s\n", p11a_client_last_error(c));
		pthread_barrier_wait(&start_barrier);
		p11a_client_free(c);
		return -1;
	}
	free(sig);
	pthread_barrier_wait(&start_barrier);
	now = now_s();
	while (more(now)) {
		double a = now;

		if ((r = p11a_client_sign(c, &req, &sig, &sig_len)) < 0) {
			fprintf(stderr, "signbench: sign: %s\n", p11a_client_last_error(c));
			p11a_client_free(c);
			return -1;
		}
		free(sig);
		now = now_s();
		lat_add(&w->lat, now - a);
	}
	w->t_done = now;
	p11a_client_free(c);
	return 0;
}

/* ---------------------------------------------------------------- provider */

static int
provider_sign_once(EVP_MD_CTX *md)
{
	EVP_PKEY_CTX *pctx = NULL;
	uint8_t sig[512];
	size_t sig_len = sizeof(sig);

	EVP_MD_CTX_reset(md);
	if (EVP_DigestSignInit_ex(md, &pctx, "SHA256", NULL, NULL, shared_pkey, NULL) != 1)
		return -1;
	if (alg_pss && (EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) != 1 ||
			EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, RSA_PSS_SALTLEN_DIGEST) != 1))
		return -1;
	if (EVP_DigestSign(md, sig, &sig_len, digest, sizeof(digest)) != 1)
		return -1;
	return 0;
}

static int
run_provider(struct worker *w)
{
	EVP_MD_CTX *md = EVP_MD_CTX_new();
	double now;
	int ok = md != NULL && provider_sign_once(md) == 0;

	pthread_barrier_wait(&start_barrier);
	if (!ok) {
		ERR_print_errors_fp(stderr);
		EVP_MD_CTX_free(md);
		return -1;
	}
	now = now_s();
	while (more(now)) {
		double a = now;

		if (provider_sign_once(md) < 0) {
			ERR_print_errors_fp(stderr);
			EVP_MD_CTX_free(md);
			return -1;
		}
		now = now_s();
		lat_add(&w->lat, now - a);
	}
	w->t_done = now;
	EVP_MD_CTX_free(md);
	return 0;
}

/* ---------------------------------------------------------------- pkcs11 */

static int
p11_find_key(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE *out)
{
	CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
	CK_ATTRIBUTE tmpl[] = {
		{ CKA_CLASS, &cls, sizeof(cls) },
		{ CKA_LABEL, (void *)key_label, strlen(key_label) },
	};
	CK_ULONG n = 0;
	CK_RV rv;

	if ((rv = p11->C_FindObjectsInit(s, tmpl, 2)) != CKR_OK)
		return -1;
	rv = p11->C_FindObjects(s, out, 1, &n);
	p11->C_FindObjectsFinal(s);
	return rv == CKR_OK && n == 1 ? 0 : -1;
}

static int
p11_sign_once(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key)
{
	CK_RSA_PKCS_PSS_PARAMS pss = { CKM_SHA256, CKG_MGF1_SHA256, 32 };
	CK_MECHANISM mech_ec = { CKM_ECDSA, NULL, 0 };
	CK_MECHANISM mech_pss = { CKM_RSA_PKCS_PSS, &pss, sizeof(pss) };
	CK_BYTE sig[512];
	CK_ULONG sig_len = sizeof(sig);

	if (p11->C_SignInit(s, alg_pss ? &mech_pss : &mech_ec, key) != CKR_OK)
		return -1;
	if (p11->C_Sign(s, (CK_BYTE_PTR)digest, sizeof(digest), sig, &sig_len) != CKR_OK)
		return -1;
	return 0;
}

static int
run_pkcs11(struct worker *w)
{
	CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
	CK_OBJECT_HANDLE key, copy;
	CK_BBOOL f = CK_FALSE;
	CK_ATTRIBUTE ct[] = { { CKA_TOKEN, &f, sizeof(f) } };
	double now;
	int ok = 0;

	if (p11->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s) == CKR_OK &&
	    p11_find_key(s, &key) == 0) {
		/* BENCH_NO_COPY=1: sign with the token object, as the agent does
		 * today (for the profile in docs/performance.md). */
		if (getenv("BENCH_NO_COPY") == NULL &&
		    p11->C_CopyObject(s, key, ct, 1, &copy) == CKR_OK) {
			key = copy;
			atomic_fetch_add(&copies, 1);
		}
		ok = p11_sign_once(s, key) == 0;
	}
	pthread_barrier_wait(&start_barrier);
	if (!ok) {
		fprintf(stderr, "signbench: PKCS#11 session set-up or first signature failed\n");
		return -1;
	}
	now = now_s();
	while (more(now)) {
		double a = now;

		if (p11_sign_once(s, key) < 0) {
			fprintf(stderr, "signbench: C_Sign failed\n");
			return -1;
		}
		now = now_s();
		lat_add(&w->lat, now - a);
	}
	w->t_done = now;
	p11->C_CloseSession(s);
	return 0;
}

static int
p11_setup(const char *module, const char *token, const char *pin, CK_SESSION_HANDLE *login)
{
	CK_C_INITIALIZE_ARGS args = { .flags = CKF_OS_LOCKING_OK };
	CK_C_GetFunctionList gfl;
	CK_SLOT_ID slots[64];
	CK_ULONG n = 64;
	CK_RV rv;
	void *h = dlopen(module, RTLD_NOW | RTLD_LOCAL);

	if (h == NULL) {
		fprintf(stderr, "signbench: %s\n", dlerror());
		return -1;
	}
	gfl = (CK_C_GetFunctionList)dlsym(h, "C_GetFunctionList");
	if (gfl == NULL || gfl(&p11) != CKR_OK)
		return -1;
	if ((rv = p11->C_Initialize(&args)) != CKR_OK) {
		fprintf(stderr, "signbench: C_Initialize: 0x%lx\n", rv);
		return -1;
	}
	if (p11->C_GetSlotList(CK_TRUE, slots, &n) != CKR_OK)
		return -1;
	for (CK_ULONG i = 0; i < n; i++) {
		CK_TOKEN_INFO ti;
		size_t l = strlen(token);

		if (p11->C_GetTokenInfo(slots[i], &ti) != CKR_OK || l > sizeof(ti.label))
			continue;
		if (memcmp(ti.label, token, l) == 0 &&
		    (l == sizeof(ti.label) || ti.label[l] == ' ' || ti.label[l] == '\0')) {
			slot = slots[i];
			if (p11->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, login) != CKR_OK)
				return -1;
			rv = p11->C_Login(*login, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin));
			if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) {
				fprintf(stderr, "signbench: C_Login: 0x%lx\n", rv);
				return -1;
			}
			return 0;
		}
	}
	fprintf(stderr, "signbench: token '%s' not found\n", token);
	return -1;
}

/* ---------------------------------------------------------------- main */

static void *
worker_main(void *arg)
{
	struct worker *w = arg;
	int r;

	switch (mode) {
	case M_AGENT: r = run_agent(w); break;
	case M_PROVIDER: r = run_provider(w); break;
	default: r = run_pkcs11(w); break;
	}
	w->failed = r < 0;
	return NULL;
}

static void
usage(void)
{
	fprintf(stderr,
		"usage: signbench agent SOCK KEY_URI ALG THREADS SECS [COUNT]\n"
		"       signbench provider KEY_URI ALG THREADS SECS [COUNT]\n"
		"       signbench pkcs11 MODULE TOKEN LABEL PIN ALG THREADS SECS [COUNT]\n"
		"ALG: ec or pss\n");
	exit(2);
}

int
main(int argc, char **argv)
{
	CK_SESSION_HANDLE login = CK_INVALID_HANDLE;
	struct worker *w;
	struct lat all;
	int nthreads, a, failed = 0;
	double t0, t_last = 0;

	if (argc < 2)
		usage();
	if (strcmp(argv[1], "agent") == 0) {
		if (argc < 7)
			usage();
		mode = M_AGENT;
		sock_path = argv[2];
		key_uri = argv[3];
		a = 4;
	} else if (strcmp(argv[1], "provider") == 0) {
		if (argc < 6)
			usage();
		mode = M_PROVIDER;
		key_uri = argv[2];
		a = 3;
	} else if (strcmp(argv[1], "pkcs11") == 0) {
		if (argc < 9)
			usage();
		mode = M_PKCS11;
		key_label = argv[4];
		if (p11_setup(argv[2], argv[3], argv[5], &login) < 0)
			return 1;
		a = 6;
	} else {
		usage();
	}
	if (strcmp(argv[a], "ec") == 0)
		alg_pss = 0;
	else if (strcmp(argv[a], "pss") == 0)
		alg_pss = 1;
	else
		usage();
	nthreads = atoi(argv[a + 1]);
	secs = atof(argv[a + 2]);
	count = argc > a + 3 ? atol(argv[a + 3]) : 0;
	if (nthreads < 1 || nthreads > 1024 || (secs <= 0 && count <= 0))
		usage();
	if (mode == M_PROVIDER && (shared_pkey = bench_store_load(key_uri)) == NULL) {
		fprintf(stderr, "signbench: cannot load %s through OSSL_STORE\n", key_uri);
		ERR_print_errors_fp(stderr);
		return 1;
	}

	w = calloc((size_t)nthreads, sizeof(*w));
	if (w == NULL)
		return 1;
	pthread_barrier_init(&start_barrier, NULL, (unsigned)nthreads + 1);
	t_end = 1e300;   /* threads read it only after the barrier */
	for (int i = 0; i < nthreads; i++) {
		lat_init(&w[i].lat);
		if (pthread_create(&w[i].th, NULL, worker_main, &w[i]) != 0) {
			fprintf(stderr, "signbench: pthread_create failed\n");
			return 1;
		}
	}
	/* Everybody is connected and has signed once: start the clock.  t_end
	 * is set before the barrier opens, so every thread sees it. */
	t0 = now_s();
	t_end = count > 0 ? 1e300 : t0 + secs;
	pthread_barrier_wait(&start_barrier);
	lat_init(&all);
	for (int i = 0; i < nthreads; i++) {
		pthread_join(w[i].th, NULL);
		failed |= w[i].failed;
		if (w[i].t_done > t_last)
			t_last = w[i].t_done;
		lat_merge(&all, &w[i].lat);
		lat_free(&w[i].lat);
	}
	if (mode == M_PKCS11) {
		fprintf(stderr, "signbench: %d of %d sessions signed with a session copy of the key\n",
			atomic_load(&copies), nthreads);
		/* No C_Finalize: SoftHSM2 can crash in it (FIELD-NOTES). */
		p11->C_CloseSession(login);
	}
	if (failed)
		return 1;
	lat_print(&all, t_last - t0);
	lat_free(&all);
	EVP_PKEY_free(shared_pkey);
	free(w);
	return 0;
}
