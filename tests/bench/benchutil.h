/*
 * Small helpers shared by the benchmark programs (tests/bench/): a
 * monotonic clock and a latency recorder that prints the one result line
 * run.sh parses:
 *   ops=N secs=S rate=R p50_us=X p99_us=Y
 * Header-only so that each program is one .c file plus this.
 */
#ifndef P11A_BENCHUTIL_H
#define P11A_BENCHUTIL_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static inline double
now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Latencies in seconds, as float to halve the memory of long runs. */
struct lat {
	float *v;
	size_t n, cap;
};

static inline void
lat_init(struct lat *l)
{
	l->v = NULL;
	l->n = l->cap = 0;
}

static inline void
lat_add(struct lat *l, double s)
{
	if (l->n == l->cap) {
		size_t cap = l->cap ? l->cap * 2 : 4096;
		float *v = realloc(l->v, cap * sizeof(*v));

		if (v == NULL) {
			fprintf(stderr, "bench: out of memory\n");
			exit(1);
		}
		l->v = v;
		l->cap = cap;
	}
	l->v[l->n++] = (float)s;
}

/* Appends every sample of src to dst. */
static inline void
lat_merge(struct lat *dst, const struct lat *src)
{
	for (size_t i = 0; i < src->n; i++)
		lat_add(dst, src->v[i]);
}

static inline int
lat_cmp(const void *a, const void *b)
{
	float x = *(const float *)a, y = *(const float *)b;

	return (x > y) - (x < y);
}

static inline double
lat_pct(struct lat *l, double p)
{
	size_t i;

	if (l->n == 0)
		return 0;
	i = (size_t)(p * (double)(l->n - 1) + 0.5);
	return l->v[i];
}

/* Sorts l and prints the result line for l->n operations in secs. */
static inline void
lat_print(struct lat *l, double secs)
{
	qsort(l->v, l->n, sizeof(*l->v), lat_cmp);
	printf("ops=%zu secs=%.4f rate=%.1f p50_us=%.2f p99_us=%.2f\n", l->n, secs,
	       secs > 0 ? (double)l->n / secs : 0.0, lat_pct(l, 0.50) * 1e6,
	       lat_pct(l, 0.99) * 1e6);
	fflush(stdout);
}

static inline void
lat_free(struct lat *l)
{
	free(l->v);
	lat_init(l);
}

#ifdef OPENSSL_STORE_H
/* The first private key OSSL_STORE finds at uri (a pkcs11: URI through the provider), or NULL. */
static inline EVP_PKEY *
bench_store_load(const char *uri)
{
	OSSL_STORE_CTX *s = OSSL_STORE_open(uri, NULL, NULL, NULL, NULL);
	EVP_PKEY *pkey = NULL;

	if (s == NULL)
		return NULL;
	OSSL_STORE_expect(s, OSSL_STORE_INFO_PKEY);
	while (pkey == NULL && !OSSL_STORE_eof(s)) {
		OSSL_STORE_INFO *info = OSSL_STORE_load(s);

		if (info == NULL)
			break;
		if (OSSL_STORE_INFO_get_type(info) == OSSL_STORE_INFO_PKEY)
			pkey = OSSL_STORE_INFO_get1_PKEY(info);
		OSSL_STORE_INFO_free(info);
	}
	OSSL_STORE_close(s);
	return pkey;
}
#endif

#endif
