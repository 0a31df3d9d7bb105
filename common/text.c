/*
 * Scrubbing agent-supplied text before it is shown.
 */
#include "config.h"

#include <stddef.h>

#include "text.h"

void
p11a_text_scrub(char *s)
{
	if (s == NULL)
		return;
	for (; *s != '\0'; s++) {
		unsigned char ch = (unsigned char)*s;

		if (ch < 0x20 || ch == 0x7f)
			*s = '?';
	}
}
