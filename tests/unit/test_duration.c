/*
 * Unit tests for the durations of agent/conf.c (idle-lock, pin-ttl):
 * config_parse_duration and config_format_duration.
 */
#include "config.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "conf.h"

static int64_t
parse(const char *text)
{
	int64_t ms = -12345;

	assert_int_equal(config_parse_duration(text, &ms), 0);
	return ms;
}

static void
test_good(void **state)
{
	(void)state;
	assert_int_equal(parse("off"), 0);
	assert_int_equal(parse("0"), 0);
	assert_int_equal(parse("0s"), 0);
	assert_int_equal(parse("5"), 5 * 60 * 1000);        /* a plain number is minutes */
	assert_int_equal(parse("2s"), 2000);
	assert_int_equal(parse("90s"), 90000);
	assert_int_equal(parse("15m"), 15 * 60 * 1000);
	assert_int_equal(parse("2h"), 2 * 3600 * 1000);
	assert_int_equal(parse("168h"), CONFIG_DURATION_MAX_MS);
	assert_int_equal(parse("10080"), CONFIG_DURATION_MAX_MS);
	assert_int_equal(parse("007s"), 7000);
}

static void
test_bad(void **state)
{
	static const char *const bad[] = {
		"", "on", "no", "-1", "+5", " 5", "5 ", "5x", "5ms", "5S", "1.5m", "m", "s5",
		"169h", "10081", "604801s", "99999999999999999999", "5mm", "0x10", "5\n",
	};
	(void)state;
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		int64_t ms = -7;

		if (config_parse_duration(bad[i], &ms) != -1)
			fail_msg("'%s' accepted as %lld ms", bad[i], (long long)ms);
		assert_int_equal(ms, -7);       /* untouched */
	}
}

static void
test_format(void **state)
{
	char b[32];
	static const struct { int64_t ms; const char *text; } cases[] = {
		{ 0, "off" }, { 2000, "2s" }, { 90000, "90s" }, { 120000, "2m" },
		{ 3600000, "1h" }, { 5400000, "90m" }, { 1500, "2s" },
	};
	(void)state;
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		config_format_duration(cases[i].ms, b, sizeof(b));
		assert_string_equal(b, cases[i].text);
	}
	/* What it prints reads back as the same duration. */
	for (int64_t ms = 1000; ms <= CONFIG_DURATION_MAX_MS; ms *= 7) {
		int64_t back;
		int64_t whole = ms / 1000 * 1000;

		config_format_duration(whole, b, sizeof(b));
		assert_int_equal(config_parse_duration(b, &back), 0);
		assert_int_equal(back, whole);
	}
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_good),
		cmocka_unit_test(test_bad),
		cmocka_unit_test(test_format),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
