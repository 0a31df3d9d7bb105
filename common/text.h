/*
 * Text from the agent (token labels, error messages, module names) on its
 * way to a terminal or a log: one scrubber for every client.
 */
#ifndef P11A_TEXT_H
#define P11A_TEXT_H

/*
 * Replaces, in place, every byte of s that could drive a terminal (the C0
 * controls 0x00-0x1f, including TAB, CR, LF and ESC, and DEL 0x7f) with
 * '?'.  Other bytes, UTF-8 sequences included, are kept as they are.
 * s may be NULL.
 */
void p11a_text_scrub(char *s);

#endif
