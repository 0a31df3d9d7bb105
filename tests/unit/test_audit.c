/* The audit ring (agent/audit.c): wrap-around, the since filter, the bounds. */
#include "config.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "audit.h"
#include "p11a.h"
#include "proto.h"

static void
push(struct audit_ring *r, uint64_t t)
{
	struct p11a_event e;
	char uri[64];

	memset(&e, 0, sizeof(e));
	snprintf(uri, sizeof(uri), "pkcs11:object=k%llu", (unsigned long long)t);
	e.time_us = t;
	e.kind = P11A_EV_SIGN;
	e.uri = uri;
	assert_int_equal(audit_ring_push(r, &e), 0);
}

static void
test_empty(void **state)
{
	struct audit_ring *r = audit_ring_new(4);
	const struct p11a_event *v[4];

	(void)state;
	assert_non_null(r);
	assert_int_equal(audit_ring_len(r), 0);
	assert_int_equal(audit_ring_select(r, 0, 0, v), 0);
	assert_null(audit_ring_new(0));
	audit_ring_free(r);
	audit_ring_free(NULL);
}

static void
test_wrap(void **state)
{
	struct audit_ring *r = audit_ring_new(3);
	const struct p11a_event *v[3];
	size_t n;

	(void)state;
	for (uint64_t t = 1; t <= 7; t++) {
		push(r, t);
		assert_true(audit_ring_len(r) <= 3);
	}
	assert_int_equal(audit_ring_len(r), 3);
	n = audit_ring_select(r, 0, 0, v);
	assert_int_equal(n, 3);
	/* The newest three, oldest first, with their own copies of the strings. */
	assert_int_equal(v[0]->time_us, 5);
	assert_int_equal(v[1]->time_us, 6);
	assert_int_equal(v[2]->time_us, 7);
	assert_string_equal(v[2]->uri, "pkcs11:object=k7");
	assert_string_equal(v[0]->exe, "");
	audit_ring_free(r);
}

static void
test_since_and_max(void **state)
{
	struct audit_ring *r = audit_ring_new(10);
	const struct p11a_event *v[10];
	size_t n;

	(void)state;
	for (uint64_t t = 10; t <= 100; t += 10)
		push(r, t);
	n = audit_ring_select(r, 55, 0, v);
	assert_int_equal(n, 5);
	assert_int_equal(v[0]->time_us, 60);
	assert_int_equal(v[4]->time_us, 100);
	/* since is inclusive */
	n = audit_ring_select(r, 60, 0, v);
	assert_int_equal(n, 5);
	/* max keeps the newest */
	n = audit_ring_select(r, 0, 2, v);
	assert_int_equal(n, 2);
	assert_int_equal(v[0]->time_us, 90);
	assert_int_equal(v[1]->time_us, 100);
	n = audit_ring_select(r, 55, 3, v);
	assert_int_equal(n, 3);
	assert_int_equal(v[0]->time_us, 80);
	/* a since in the future: nothing */
	assert_int_equal(audit_ring_select(r, 101, 0, v), 0);
	/* max larger than what there is */
	assert_int_equal(audit_ring_select(r, 0, 1000, v), 10);
	/* wrap-around and since together */
	for (uint64_t t = 110; t <= 150; t += 10)
		push(r, t);
	n = audit_ring_select(r, 0, 0, v);
	assert_int_equal(n, 10);
	assert_int_equal(v[0]->time_us, 60);
	assert_int_equal(v[9]->time_us, 150);
	n = audit_ring_select(r, 125, 0, v);
	assert_int_equal(n, 3);
	assert_int_equal(v[0]->time_us, 130);
	audit_ring_free(r);
}

static void
test_format(void **state)
{
	struct p11a_event e;
	char line[512];

	(void)state;
	memset(&e, 0, sizeof(e));
	e.kind = P11A_EV_SIGN;
	e.uri = (char *)"pkcs11:object=a";
	e.scheme = P11A_SCHEME_ECDSA;
	e.content = 3;  /* tls1.3 */
	e.pid = 42;
	e.exe = (char *)"/usr/bin/curl";
	e.duration_us = 310;
	audit_format(&e, line, sizeof(line));
	assert_string_equal(line, "sign by /usr/bin/curl[42]: pkcs11:object=a ecdsa tls1.3: ok (310 us)");
	e.kind = P11A_EV_REFUSED;
	e.result = P11A_E_POLICY;
	e.message = (char *)"tls-only";
	e.content = 1;
	e.duration_us = 0;
	audit_format(&e, line, sizeof(line));
	assert_string_equal(line, "refused by /usr/bin/curl[42]: pkcs11:object=a ecdsa raw: POLICY: tls-only");
	memset(&e, 0, sizeof(e));
	e.kind = P11A_EV_DROPPED;
	e.count = 7;
	audit_format(&e, line, sizeof(line));
	assert_non_null(strstr(line, "7 audit events dropped"));
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_empty),
		cmocka_unit_test(test_wrap),
		cmocka_unit_test(test_since_and_max),
		cmocka_unit_test(test_format),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
