/*
 * Unit tests for common/text.c: what agent text may carry to a terminal.
 */
#include "config.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "text.h"

static void
scrubbed(const char *in, const char *want)
{
	char buf[256];

	assert_true(strlen(in) < sizeof(buf));
	strcpy(buf, in);
	p11a_text_scrub(buf);
	assert_string_equal(buf, want);
}

static void
test_controls(void **state)
{
	char all[0x21];
	size_t i;

	(void)state;
	/* An escape sequence that would recolour the terminal, a title change, a bell. */
	scrubbed("\x1b[31mred\x1b[0m", "?[31mred?[0m");
	scrubbed("\x1b]0;owned\x07", "?]0;owned?");
	scrubbed("line\r\nnext\ttab\b", "line??next?tab?");
	scrubbed("del\x7f", "del?");
	for (i = 1; i < 0x20; i++)
		all[i - 1] = (char)i;
	all[0x1f] = 0x7f;
	all[0x20] = '\0';
	p11a_text_scrub(all);
	for (i = 0; i < 0x20; i++)
		assert_int_equal(all[i], '?');
}

static void
test_kept(void **state)
{
	(void)state;
	scrubbed("", "");
	scrubbed("PIV Card: Key 9a (ECC P-256) ~!@#$%^&*()_+{}|:\"<>?",
		 "PIV Card: Key 9a (ECC P-256) ~!@#$%^&*()_+{}|:\"<>?");
	/* UTF-8 labels stay readable. */
	scrubbed("Jos\xc3\xa9's token \xe2\x82\xac \xf0\x9f\x94\x91", "Jos\xc3\xa9's token \xe2\x82\xac \xf0\x9f\x94\x91");
	p11a_text_scrub(NULL);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_controls),
		cmocka_unit_test(test_kept),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
