/*
 * Unit tests for common/uri.c.  Most are differential: every case also
 * goes through p11-kit's URI functions (linked into this test only), the
 * way common/uri.c used them before it stopped linking p11-kit, and the
 * results must be identical: formatted strings byte for byte, parse
 * accept/reject, and every token and key match.
 *
 * Deliberate differences from p11-kit (everything else must agree):
 *  - library-version=N[.M]: p11-kit reads each number into an int that
 *    wraps, so 4294967297 reads as 1 and is accepted.  common/uri.c
 *    refuses any component of 255 or more (p11-kit's own limit), however
 *    long.  Only cases holding such a number (>= 2^32) may differ, and
 *    only in that direction; test_uri_version_deviation pins it down.
 * Kept from the pre-existing wrapper (not p11-kit, but today's behaviour):
 *  - the raw string must start with "pkcs11:" in any case, so p11-kit's
 *    whitespace stripping never reaches the scheme (" pkcs11:x=y" is
 *    refused), and it may be at most P11A_URI_MAX bytes.
 * p11-kit quirks kept on purpose, so that saved URIs mean what they
 * meant: token=%00... counts as an absent token= (matches any token);
 * "pkcs11:;token=x" ends the path at the empty attribute, so token=x is
 * read as a query attribute and ignored; " \n\r\v" are dropped anywhere,
 * even inside %-escapes; id= never matches a key whose id buffer is NULL.
 */
#include "config.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <cmocka.h>

#include <p11-kit/uri.h>

#include "p11a.h"
#include "proto.h"
#include "uri.h"

/* ------------------------------------------------------------ reference */

/*
 * The pre-existing common/uri.c, on p11-kit: the oracle.  Kept verbatim
 * in behaviour (only renamed).
 */
struct ref_matcher {
	P11KitUri *uri;
	int has_class;
	CK_OBJECT_CLASS cls;
};

static void
ref_pad_field(CK_UTF8CHAR *f, size_t size)
{
	size_t i;

	for (i = 0; i < size && f[i] != '\0'; i++)
		;
	for (; i < size; i++)
		f[i] = ' ';
}

static void
ref_normalize(CK_TOKEN_INFO *ti)
{
	ref_pad_field(ti->label, sizeof(ti->label));
	ref_pad_field(ti->manufacturerID, sizeof(ti->manufacturerID));
	ref_pad_field(ti->model, sizeof(ti->model));
	ref_pad_field(ti->serialNumber, sizeof(ti->serialNumber));
}

static char *
ref_format(P11KitUri *uri, P11KitUriType type)
{
	char *s = NULL;

	if (p11_kit_uri_format(uri, type, &s) != P11_KIT_URI_OK)
		return NULL;
	return s;
}

static char *
ref_format_token(const CK_TOKEN_INFO *ti)
{
	P11KitUri *uri;
	char *s;

	if (ti == NULL || (uri = p11_kit_uri_new()) == NULL)
		return NULL;
	memcpy(p11_kit_uri_get_token_info(uri), ti, sizeof(*ti));
	ref_normalize(p11_kit_uri_get_token_info(uri));
	s = ref_format(uri, P11_KIT_URI_FOR_TOKEN);
	p11_kit_uri_free(uri);
	return s;
}

static char *
ref_format_object(const CK_TOKEN_INFO *ti, CK_OBJECT_CLASS cls,
		  const unsigned char *id, size_t id_len, const char *label)
{
	P11KitUri *uri;
	CK_ATTRIBUTE a;
	char *s = NULL;

	if (ti == NULL || (id == NULL && id_len != 0))
		return NULL;
	if ((uri = p11_kit_uri_new()) == NULL)
		return NULL;
	memcpy(p11_kit_uri_get_token_info(uri), ti, sizeof(*ti));
	ref_normalize(p11_kit_uri_get_token_info(uri));
	a.type = CKA_CLASS;
	a.pValue = &cls;
	a.ulValueLen = sizeof(cls);
	if (p11_kit_uri_set_attribute(uri, &a) != P11_KIT_URI_OK)
		goto out;
	if (id_len != 0) {
		a.type = CKA_ID;
		a.pValue = (void *)id;
		a.ulValueLen = id_len;
		if (p11_kit_uri_set_attribute(uri, &a) != P11_KIT_URI_OK)
			goto out;
	}
	if (label != NULL && *label != '\0') {
		a.type = CKA_LABEL;
		a.pValue = (void *)label;
		a.ulValueLen = strlen(label);
		if (p11_kit_uri_set_attribute(uri, &a) != P11_KIT_URI_OK)
			goto out;
	}
	s = ref_format(uri, P11_KIT_URI_FOR_OBJECT_ON_TOKEN);
 out:
	p11_kit_uri_free(uri);
	return s;
}

static void
ref_matcher_free(struct ref_matcher *m)
{
	if (m == NULL)
		return;
	if (m->uri != NULL)
		p11_kit_uri_free(m->uri);
	free(m);
}

static struct ref_matcher *
ref_matcher_new(const char *uri)
{
	struct ref_matcher *m;
	CK_ATTRIBUTE *a;

	if (uri == NULL || strlen(uri) > P11A_URI_MAX ||
	    strncasecmp(uri, "pkcs11:", 7) != 0)
		return NULL;
	m = calloc(1, sizeof(*m));
	assert_non_null(m);
	m->uri = p11_kit_uri_new();
	assert_non_null(m->uri);
	if (p11_kit_uri_parse(uri, P11_KIT_URI_FOR_ANY, m->uri) != P11_KIT_URI_OK)
		goto fail;
	if ((a = p11_kit_uri_get_attribute(m->uri, CKA_CLASS)) != NULL) {
		if (a->pValue == NULL || a->ulValueLen != sizeof(CK_OBJECT_CLASS))
			goto fail;
		memcpy(&m->cls, a->pValue, sizeof(m->cls));
		m->has_class = 1;
	}
	return m;
 fail:
	ref_matcher_free(m);
	return NULL;
}

static void
ref_field_set(CK_UTF8CHAR *f, size_t size, const char *s)
{
	size_t n = s == NULL ? 0 : strlen(s);

	memset(f, ' ', size);
	if (n > size)
		n = size;
	if (n != 0)
		memcpy(f, s, n);
}

static int
ref_match_token(const struct ref_matcher *m, const struct p11a_token *t)
{
	CK_TOKEN_INFO ti;

	memset(&ti, 0, sizeof(ti));
	ref_field_set(ti.label, sizeof(ti.label), t->label);
	ref_field_set(ti.manufacturerID, sizeof(ti.manufacturerID), t->manufacturer);
	ref_field_set(ti.model, sizeof(ti.model), t->model);
	ref_field_set(ti.serialNumber, sizeof(ti.serialNumber), t->serial);
	return p11_kit_uri_match_token_info(m->uri, &ti) == 1;
}

static int
ref_match_id_label(const struct ref_matcher *m, const struct p11a_key *k, const char *label)
{
	CK_ATTRIBUTE attrs[2];

	if (label == NULL)
		label = "";
	attrs[0].type = CKA_ID;
	attrs[0].pValue = k->id;
	attrs[0].ulValueLen = k->id == NULL ? 0 : k->id_len;
	attrs[1].type = CKA_LABEL;
	attrs[1].pValue = (void *)label;
	attrs[1].ulValueLen = strlen(label);
	return p11_kit_uri_match_attributes(m->uri, attrs, 2) == 1;
}

static int
ref_key_has_cert(const struct p11a_key *k)
{
	return (k->flags & P11A_KEY_HAS_CERT) || k->cert_len != 0 ||
	    (k->cert_uri != NULL && *k->cert_uri != '\0');
}

static int
ref_match_key(const struct ref_matcher *m, const struct p11a_token *t,
	      const struct p11a_key *k)
{
	if (!ref_match_token(m, t))
		return 0;
	if (m->has_class) {
		switch (m->cls) {
		case CKO_PRIVATE_KEY:
		case CKO_PUBLIC_KEY:
			return ref_match_id_label(m, k, k->label);
		case CKO_CERTIFICATE:
			return ref_key_has_cert(k) && ref_match_id_label(m, k, k->cert_label);
		default:
			return 0;
		}
	}
	if (ref_match_id_label(m, k, k->label))
		return 1;
	return ref_key_has_cert(k) && ref_match_id_label(m, k, k->cert_label);
}

/* ------------------------------------------------------------ helpers */

static uint64_t rng = 0x9e3779b97f4a7c15ull;

/* xorshift64*: the corpus is the same on every run. */
static uint32_t
rnd(uint32_t n)
{
	rng ^= rng >> 12;
	rng ^= rng << 25;
	rng ^= rng >> 27;
	return n == 0 ? 0 : (uint32_t)((rng * 0x2545f4914f6cdd1dull) >> 32) % n;
}

struct counts {
	unsigned long format;       /* format calls compared */
	unsigned long parse;        /* URIs compared */
	unsigned long accepted;     /* ... that both accepted */
	unsigned long deviations;   /* ... that differ as documented */
	unsigned long matches;      /* match calls compared */
	unsigned long positive;     /* ... that matched */
};
static struct counts counts;

static void
pad(CK_UTF8CHAR *f, size_t n, const char *s)
{
	memset(f, ' ', n);
	memcpy(f, s, strlen(s));
}

static void
sample_token_info(CK_TOKEN_INFO *ti)
{
	memset(ti, 0, sizeof(*ti));
	pad(ti->label, sizeof(ti->label), "My Token");
	pad(ti->manufacturerID, sizeof(ti->manufacturerID), "SoftHSM project");
	pad(ti->model, sizeof(ti->model), "SoftHSM v2");
	pad(ti->serialNumber, sizeof(ti->serialNumber), "abc123");
}

static void
compare_strings(const char *what, char *ours, char *ref)
{
	if ((ours == NULL) != (ref == NULL) ||
	    (ours != NULL && strcmp(ours, ref) != 0))
		fail_msg("%s: ours %s, p11-kit %s", what, ours ? ours : "(null)",
		    ref ? ref : "(null)");
	counts.format++;
	free(ours);
	free(ref);
}

static void
compare_format_token(const CK_TOKEN_INFO *ti)
{
	compare_strings("format token", p11a_uri_format_token(ti), ref_format_token(ti));
}

static void
compare_format_object(const CK_TOKEN_INFO *ti, CK_OBJECT_CLASS cls,
		      const unsigned char *id, size_t id_len, const char *label)
{
	compare_strings("format object", p11a_uri_format_object(ti, cls, id, id_len, label),
	    ref_format_object(ti, cls, id, id_len, label));
}

/* ------------------------------------------------------------ format: fixed */

static char *
fmt_object(CK_OBJECT_CLASS cls, const void *id, size_t id_len, const char *label)
{
	CK_TOKEN_INFO ti;

	sample_token_info(&ti);
	return p11a_uri_format_object(&ti, cls, id, id_len, label);
}

static void
expect_uri(char *got, const char *want)
{
	assert_non_null(got);
	assert_string_equal(got, want);
	free(got);
}

/* Exact strings (as p11-kit 0.24 writes them), independent of p11-kit. */
static void
test_uri_format_fixed(void **state)
{
	CK_TOKEN_INFO ti;
	const unsigned char allbytes[] = { 0x00, 0x7f, 0x80, 0xff, 'a', 'Z' };
	char label[3] = { (char)0xff, '/', '\0' };

	sample_token_info(&ti);
	expect_uri(p11a_uri_format_token(&ti),
	    "pkcs11:model=SoftHSM%20v2;manufacturer=SoftHSM%20project;"
	    "serial=abc123;token=My%20Token");
	expect_uri(fmt_object(CKO_PRIVATE_KEY, "\x01\xab", 2, "key 1"),
	    "pkcs11:model=SoftHSM%20v2;manufacturer=SoftHSM%20project;"
	    "serial=abc123;token=My%20Token;id=%01%AB;object=key%201;type=private");
	expect_uri(fmt_object(CKO_CERTIFICATE, allbytes, sizeof(allbytes), "a-b_c.d/e~"),
	    "pkcs11:model=SoftHSM%20v2;manufacturer=SoftHSM%20project;"
	    "serial=abc123;token=My%20Token;id=%00%7F%80%FF%61%5A;"
	    "object=a-b_c.d%2Fe%7E;type=cert");
	expect_uri(fmt_object(CKO_PUBLIC_KEY, NULL, 0, NULL),
	    "pkcs11:model=SoftHSM%20v2;manufacturer=SoftHSM%20project;"
	    "serial=abc123;token=My%20Token;type=public");
	expect_uri(fmt_object(CKO_SECRET_KEY, NULL, 0, label),
	    "pkcs11:model=SoftHSM%20v2;manufacturer=SoftHSM%20project;"
	    "serial=abc123;token=My%20Token;object=%FF%2F;type=secret-key");
	expect_uri(fmt_object(CKO_DATA, NULL, 0, ""),
	    "pkcs11:model=SoftHSM%20v2;manufacturer=SoftHSM%20project;"
	    "serial=abc123;token=My%20Token;type=data");
	/* Vendor classes have no type= name. */
	expect_uri(fmt_object(CKO_VENDOR_DEFINED | 1, "\x10", 1, "x"),
	    "pkcs11:model=SoftHSM%20v2;manufacturer=SoftHSM%20project;"
	    "serial=abc123;token=My%20Token;id=%10;object=x");

	/* Empty fields stay in the URI, padded with NULs or spaces. */
	memset(&ti, 0, sizeof(ti));
	expect_uri(p11a_uri_format_token(&ti),
	    "pkcs11:model=;manufacturer=;serial=;token=");
	memset(&ti, ' ', sizeof(ti));
	expect_uri(p11a_uri_format_token(&ti),
	    "pkcs11:model=;manufacturer=;serial=;token=");
	/* Leading spaces stay; from the first NUL on is padding. */
	memset(&ti, ' ', sizeof(ti));
	memcpy(ti.label, "  a\0b", 5);
	memcpy(ti.model, "\tm\t", 3);
	expect_uri(p11a_uri_format_token(&ti),
	    "pkcs11:model=%09m%09;manufacturer=;serial=;token=%20%20a");
	/* Full-width fields, no padding at all. */
	memset(ti.label, 'L', sizeof(ti.label));
	memset(ti.manufacturerID, 'M', sizeof(ti.manufacturerID));
	memset(ti.model, 'o', sizeof(ti.model));
	memset(ti.serialNumber, '9', sizeof(ti.serialNumber));
	expect_uri(p11a_uri_format_token(&ti),
	    "pkcs11:model=oooooooooooooooo;manufacturer=MMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMM;"
	    "serial=9999999999999999;token=LLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLL");

	assert_null(p11a_uri_format_token(NULL));
	assert_null(p11a_uri_format_object(NULL, CKO_PRIVATE_KEY, NULL, 0, NULL));
	sample_token_info(&ti);
	assert_null(p11a_uri_format_object(&ti, CKO_PRIVATE_KEY, NULL, 3, NULL));
}

/* ------------------------------------------------------------ format: differential */

/* Fills a text field in one of the ways tokens really do, and some they don't. */
static void
gen_field(CK_UTF8CHAR *f, size_t size)
{
	static const char syntax[] = ";?/&=%:#@+,\t\n\r\v\"'<>[]\\^`{|}~!$()*";
	size_t n = rnd((uint32_t)size + 1), i;
	int how = (int)rnd(9);

	memset(f, ' ', size);
	switch (how) {
	case 0:                 /* printable ASCII, space padded */
		for (i = 0; i < n; i++)
			f[i] = (CK_UTF8CHAR)(' ' + rnd(95));
		break;
	case 1:                 /* any byte but NUL */
		for (i = 0; i < n; i++)
			f[i] = (CK_UTF8CHAR)(1 + rnd(255));
		break;
	case 2:                 /* full width */
		for (i = 0; i < size; i++)
			f[i] = (CK_UTF8CHAR)(1 + rnd(255));
		break;
	case 3:                 /* NUL padded (tpm2-pkcs11) */
		for (i = 0; i < n; i++)
			f[i] = (CK_UTF8CHAR)('a' + rnd(26));
		for (; i < size; i++)
			f[i] = 0;
		break;
	case 4:                 /* all NUL */
		memset(f, 0, size);
		break;
	case 5:                 /* spaces around and inside */
		for (i = 0; i < n; i++)
			f[i] = rnd(3) == 0 ? ' ' : (CK_UTF8CHAR)('A' + rnd(26));
		break;
	case 6:                 /* a NUL inside, garbage after it */
		for (i = 0; i < size; i++)
			f[i] = (CK_UTF8CHAR)rnd(256);
		f[rnd((uint32_t)size)] = 0;
		break;
	case 7:                 /* URI syntax characters */
		for (i = 0; i < n; i++)
			f[i] = (CK_UTF8CHAR)syntax[rnd(sizeof(syntax) - 1)];
		break;
	default:                /* any byte at all */
		for (i = 0; i < size; i++)
			f[i] = (CK_UTF8CHAR)rnd(256);
		break;
	}
}

static void
gen_token_info(CK_TOKEN_INFO *ti)
{
	memset(ti, 0, sizeof(*ti));
	gen_field(ti->label, sizeof(ti->label));
	gen_field(ti->manufacturerID, sizeof(ti->manufacturerID));
	gen_field(ti->model, sizeof(ti->model));
	gen_field(ti->serialNumber, sizeof(ti->serialNumber));
}

static const CK_OBJECT_CLASS classes[] = {
	CKO_PRIVATE_KEY, CKO_PUBLIC_KEY, CKO_CERTIFICATE, CKO_SECRET_KEY, CKO_DATA,
	CKO_HW_FEATURE, CKO_VENDOR_DEFINED, (CK_OBJECT_CLASS)-1,
};
#define NCLASSES (sizeof(classes) / sizeof(classes[0]))

static void
test_uri_format_differential(void **state)
{
	CK_TOKEN_INFO ti;
	unsigned char id[1024];
	char label[6000];
	unsigned int b, i, k;
	size_t n, id_len;

	/* Every byte value in every position class of every field. */
	for (b = 0; b < 256; b++) {
		memset(&ti, ' ', sizeof(ti));
		ti.label[0] = (CK_UTF8CHAR)b;
		ti.manufacturerID[31] = (CK_UTF8CHAR)b;
		ti.model[7] = (CK_UTF8CHAR)b;
		memset(ti.serialNumber, (int)b, sizeof(ti.serialNumber));
		compare_format_token(&ti);
		id[0] = (unsigned char)b;
		label[0] = (char)(b == 0 ? 'z' : b);
		label[1] = (char)(b == 0 ? 'z' : b);
		label[2] = '\0';
		for (k = 0; k < NCLASSES; k++)
			compare_format_object(&ti, classes[k], id, 1, label);
	}
	/* All 256 byte values in one id, and 255 in one label. */
	for (b = 0; b < 256; b++) {
		id[b] = (unsigned char)b;
		label[b] = (char)(b + 1);
	}
	label[255] = '\0';
	sample_token_info(&ti);
	compare_format_object(&ti, CKO_PRIVATE_KEY, id, 256, label);
	compare_format_object(&ti, CKO_CERTIFICATE, id, 0, NULL);
	compare_format_object(&ti, CKO_CERTIFICATE, NULL, 0, "");
	/* Long labels and ids (the output grows to ~3 bytes per byte). */
	memset(label, 'x', sizeof(label) - 1);
	label[sizeof(label) - 1] = '\0';
	compare_format_object(&ti, CKO_PUBLIC_KEY, id, sizeof(id), label);
	memset(label, '/', sizeof(label) - 1);
	compare_format_object(&ti, CKO_PUBLIC_KEY, id, sizeof(id), label);

	/* Generated. */
	for (i = 0; i < 3000; i++) {
		gen_token_info(&ti);
		compare_format_token(&ti);
		id_len = rnd(4) == 0 ? 0 : rnd(rnd(8) == 0 ? sizeof(id) : 40);
		for (b = 0; b < id_len; b++)
			id[b] = (unsigned char)rnd(256);
		n = rnd(rnd(8) == 0 ? 2000 : 40);
		for (b = 0; b < n; b++)
			label[b] = (char)(1 + rnd(255));
		label[n] = '\0';
		/* id NULL with a length is refused by both. */
		compare_format_object(&ti, classes[rnd(NCLASSES)], rnd(10) == 0 ? NULL : id,
		    id_len, rnd(10) == 0 ? NULL : label);
	}
	print_message("# format: %lu cases identical to p11-kit\n", counts.format);
}

/* ------------------------------------------------------------ parse and match: differential */

/* The same string with " \n\r\v" dropped, as p11-kit reads it. */
static void
strip_ws(const char *s, char *out, size_t size)
{
	size_t j = 0;

	for (; *s != '\0' && j + 1 < size; s++) {
		if (strchr(" \n\r\v", *s) == NULL)
			out[j++] = *s;
	}
	out[j] = '\0';
}

/*
 * 1 when the URI holds a library-version number of 2^32 or more: the only
 * place where we may refuse what p11-kit accepts (see the top comment).
 */
static int
has_huge_version(const char *uri)
{
	static char buf[2 * P11A_URI_MAX];
	const char *p = buf;
	uint64_t v;

	strip_ws(uri, buf, sizeof(buf));
	while ((p = strstr(p, "library-version=")) != NULL) {
		p += strlen("library-version=");
		for (;;) {
			for (v = 0; *p >= '0' && *p <= '9'; p++) {
				v = v * 10 + (uint64_t)(*p - '0');
				if (v >= (1ull << 32))
					return 1;
			}
			if (*p != '.')
				break;
			p++;
		}
	}
	return 0;
}

/* A C string of a p11-kit text field: the bytes before the first NUL. */
static char *
field_cstr(const CK_UTF8CHAR *f, size_t size)
{
	char *s = calloc(1, size + 1);
	size_t i;

	assert_non_null(s);
	for (i = 0; i < size && f[i] != 0; i++)
		s[i] = (char)f[i];
	return s;
}

static char *
attr_cstr(P11KitUri *u, CK_ATTRIBUTE_TYPE type)
{
	CK_ATTRIBUTE *a = p11_kit_uri_get_attribute(u, type);
	char *s;

	if (a == NULL || a->pValue == NULL)
		return NULL;
	s = calloc(1, a->ulValueLen + 1);
	assert_non_null(s);
	memcpy(s, a->pValue, a->ulValueLen);
	return s;
}

static uint8_t key_id[] = { 0x01, 0xab };
static uint8_t empty_id[1];

static struct p11a_token fixed_tokens[] = {
	{ "t0", "My Token", "SoftHSM project", "SoftHSM v2", "abc123", "m", 1 },
	{ "t1", "", "", "", "", "m", 1 },
	{ "t2", "a", "a", "a", "a", "m", 1 },
	{ "t3", "a ", "b  ", "c", "d", "m", 1 },
	{ "t4", "01234567890123456789012345678901", "x", "x", "x", "m", 1 },
	{ "t5", "012345678901234567890123456789012345", "x", "0123456789abcdefXYZ", "x", "m", 1 },
	{ "t6", NULL, NULL, NULL, NULL, NULL, 0 },
};
#define NFIXED_TOKENS (sizeof(fixed_tokens) / sizeof(fixed_tokens[0]))

static struct p11a_key fixed_keys[] = {
	{ "k0", "t0", "key 1", key_id, sizeof(key_id), P11A_KEY_RSA, 2048, "", NULL, 0,
	  (uint8_t *)"c", 1, "", "cert 1", P11A_KEY_HAS_CERT },
	{ "k1", "t0", "key 2", key_id, sizeof(key_id), P11A_KEY_EC, 256, "P-256", NULL, 0,
	  NULL, 0, "", "", 0 },
	{ "k2", "t1", "", NULL, 0, P11A_KEY_EC, 256, "P-256", NULL, 0, NULL, 0, NULL, NULL, 0 },
	{ "k3", "t1", "", empty_id, 0, P11A_KEY_EC, 256, "P-256", NULL, 0, NULL, 0,
	  "pkcs11:x", "", 0 },
	{ "k4", "t2", "a", (uint8_t *)"a", 1, P11A_KEY_RSA, 2048, "", NULL, 0, NULL, 0,
	  "", "a", P11A_KEY_HAS_CERT },
	{ "k5", "t2", NULL, (uint8_t *)"a", 1, P11A_KEY_RSA, 2048, "", NULL, 0, NULL, 0,
	  NULL, "b", 0 },
};
#define NFIXED_KEYS (sizeof(fixed_keys) / sizeof(fixed_keys[0]))

static void
compare_match(const char *uri, int ours, int ref)
{
	if (ours != ref)
		fail_msg("match %s: ours %d, p11-kit %d", uri, ours, ref);
	counts.matches++;
	counts.positive += ref != 0;
}

/*
 * Parses uri both ways; when both accept, matches it against the fixed
 * tokens and keys and against ones built from what p11-kit parsed (so
 * that positive matches are common).
 */
static void
compare_uri(const char *uri)
{
	struct p11a_uri_matcher *m;
	struct ref_matcher *rm;
	struct p11a_token dt;
	struct p11a_key dk[4];
	CK_TOKEN_INFO *uti;
	CK_ATTRIBUTE *ida;
	size_t i, j;
	int err = 12345;

	m = p11a_uri_matcher_new(uri, &err);
	rm = ref_matcher_new(uri);
	counts.parse++;
	if (m == NULL)
		assert_int_equal(err, -P11A_E_URI);
	else
		assert_int_equal(err, 0);
	if ((m == NULL) != (rm == NULL)) {
		if (m == NULL && has_huge_version(uri)) {
			counts.deviations++;
			ref_matcher_free(rm);
			return;
		}
		fail_msg("parse \"%s\": ours %s, p11-kit %s", uri,
		    m ? "accepts" : "refuses", rm ? "accepts" : "refuses");
	}
	if (m == NULL)
		return;
	counts.accepted++;

	uti = p11_kit_uri_get_token_info(rm->uri);
	dt.uri = "derived";
	dt.label = field_cstr(uti->label, sizeof(uti->label));
	dt.manufacturer = field_cstr(uti->manufacturerID, sizeof(uti->manufacturerID));
	dt.model = field_cstr(uti->model, sizeof(uti->model));
	dt.serial = field_cstr(uti->serialNumber, sizeof(uti->serialNumber));
	dt.module = "m";
	dt.flags = 1;
	ida = p11_kit_uri_get_attribute(rm->uri, CKA_ID);
	memset(dk, 0, sizeof(dk));
	for (i = 0; i < 4; i++) {
		dk[i].uri = "derived";
		dk[i].token_uri = "derived";
		dk[i].label = attr_cstr(rm->uri, CKA_LABEL);
		dk[i].cert_label = attr_cstr(rm->uri, CKA_LABEL);
		if (ida != NULL) {
			dk[i].id = malloc(ida->ulValueLen + 1);
			assert_non_null(dk[i].id);
			memcpy(dk[i].id, ida->pValue, ida->ulValueLen);
			dk[i].id_len = ida->ulValueLen;
		}
	}
	dk[1].flags = P11A_KEY_HAS_CERT;         /* the label on the certificate too */
	free(dk[2].label);                      /* the label on the certificate only */
	dk[2].label = NULL;
	dk[2].cert_uri = "pkcs11:c";
	free(dk[3].id);                         /* no id buffer at all */
	dk[3].id = NULL;
	dk[3].id_len = 0;

	compare_match(uri, p11a_uri_match_token(m, &dt), ref_match_token(rm, &dt));
	for (j = 0; j < 4; j++)
		compare_match(uri, p11a_uri_match_key(m, &dt, &dk[j]), ref_match_key(rm, &dt, &dk[j]));
	for (i = 0; i < NFIXED_TOKENS; i++) {
		compare_match(uri, p11a_uri_match_token(m, &fixed_tokens[i]),
		    ref_match_token(rm, &fixed_tokens[i]));
		for (j = 0; j < NFIXED_KEYS; j++)
			compare_match(uri, p11a_uri_match_key(m, &fixed_tokens[i], &fixed_keys[j]),
			    ref_match_key(rm, &fixed_tokens[i], &fixed_keys[j]));
		for (j = 0; j < 4; j++)
			compare_match(uri, p11a_uri_match_key(m, &fixed_tokens[i], &dk[j]),
			    ref_match_key(rm, &fixed_tokens[i], &dk[j]));
	}

	free(dt.label);
	free(dt.manufacturer);
	free(dt.model);
	free(dt.serial);
	for (i = 0; i < 4; i++) {
		free(dk[i].label);
		free(dk[i].cert_label);
		free(dk[i].id);
	}
	p11a_uri_matcher_free(m);
	ref_matcher_free(rm);
}

static const char *const handwritten[] = {
	"pkcs11:", "PKCS11:", "Pkcs11:token=a", "pKcS11:", "pkcs11", "pkcs11x:token=a",
	"xpkcs11:", " pkcs11:token=a", "pkcs11 :token=a", "pkcs:", "", ":", "pkcs11::",
	"pkcs11:token=a b", "pkcs11:token=a\tb", "pkcs11:token=", "pkcs11:token",
	"pkcs11:=a", "pkcs11:token=a;", "pkcs11:;token=a", "pkcs11:token=a;;x=1",
	"pkcs11:foo=bar", "pkcs11:token=%zz", "pkcs11:token=%4", "pkcs11:token=%4a",
	"pkcs11:token=%4A", "pkcs11:token=%", "pkcs11:token=%%", "pkcs11:token=%%41",
	"pkcs11:token=%2 0", "pkcs11:token=%2\n0", "pkcs11:token=%\r41",
	"pkcs11:type=bogus", "pkcs11:type=private", "pkcs11:type=public", "pkcs11:type=cert",
	"pkcs11:type=data", "pkcs11:type=secret-key", "pkcs11:type=secretkey",
	"pkcs11:type=Private", "pkcs11:type=", "pkcs11:object-type=cert",
	"pkcs11:objecttype=cert", "pkcs11:type=%70rivate", "pkcs11:type=private;type=cert",
	"pkcs11:type=bogus;type=private", "pkcs11:type=private;type=bogus",
	"pkcs11:slot-id=", "pkcs11:slot-id=12", "pkcs11:slot-id=-1", "pkcs11:slot-id=+1",
	"pkcs11:slot-id=9223372036854775808", "pkcs11:slot-id=18446744073709551616",
	"pkcs11:slot-id=99999999999999999999999999999999999999", "pkcs11:slot-id=%31",
	"pkcs11:slot-id=1.2", "pkcs11:slot-id= 12",
	"pkcs11:library-version=", "pkcs11:library-version=1", "pkcs11:library-version=1.",
	"pkcs11:library-version=.1", "pkcs11:library-version=255", "pkcs11:library-version=254.254",
	"pkcs11:library-version=254.255", "pkcs11:library-version=0254.0000000000000000001",
	"pkcs11:library-version=1.2.3", "pkcs11:library-version=1..2", "pkcs11:library-version=a",
	"pkcs11:library-version=%31", "pkcs11:library-version=1. 2", "pkcs11:library-version=2147483648",
	"pkcs11:library-version=-1", "pkcs11:library-version=1;library-version=x",
	"pkcs11:library-description=%zz", "pkcs11:library-description=x",
	"pkcs11:library-manufacturer=0123456789012345678901234567890123",
	"pkcs11:slot-description=%zz",
	"pkcs11:slot-description=0123456789012345678901234567890123456789012345678901234567890123",
	"pkcs11:slot-description=01234567890123456789012345678901234567890123456789012345678901234",
	"pkcs11:slot-manufacturer=x", "pkcs11:pin-value=1234", "pkcs11:pinfile=x",
	"pkcs11:pin-source=x", "pkcs11:pin-value=%zz", "pkcs11:module-name=x",
	"pkcs11:module-path=x", "pkcs11:?pin-value=1234", "pkcs11:?module-name=x",
	"pkcs11:?module-path=/usr/lib/x.so", "pkcs11:?pinfile=x", "pkcs11:?foo=bar", "pkcs11:?foo",
	"pkcs11:?", "pkcs11:??", "pkcs11:?&", "pkcs11:?a=b&", "pkcs11:?a=b&&c=d", "pkcs11:?=b",
	"pkcs11:?a=%zz", "pkcs11:?pin-value=%zz", "pkcs11:?x=a?b", "pkcs11:?a=b;c",
	"pkcs11:?a;b=c", "pkcs11:?a=", "pkcs11:?a==", "pkcs11:?A=b", "pkcs11:?x.y=b",
	"pkcs11:?x_y-z0=b", "pkcs11:?-=b", "pkcs11:?%61=b", "pkcs11:? a\n=b", "pkcs11:?Pin-value=1",
	"pkcs11:;A=b", "pkcs11:;a=b", "pkcs11:token=a?b=c;d=e",
	"pkcs11:token=a=b", "pkcs11:token=a/b", "pkcs11:token=a:b", "pkcs11:a:b",
	"pkcs11:token=My%20Token", "pkcs11:token=My Token", "pkcs11:token=my%20token",
	"pkcs11:token=My%20Token%20", "pkcs11:token=%20My%20Token",
	"pkcs11:token=My%20Token;serial=abc123;model=SoftHSM%20v2;manufacturer=SoftHSM%20project",
	"pkcs11:token=0123456789012345678901234567890123", "pkcs11:token=01234567890123456789012345678901",
	"pkcs11:token=012345678901234567890123456789012", "pkcs11:model=0123456789abcdef",
	"pkcs11:model=0123456789abcdefX", "pkcs11:serial=%30%31%32%33%34%35%36%37%38%39%30%31%32%33%34%35",
	"pkcs11:token=%00", "pkcs11:token=%00abc", "pkcs11:token=a%00", "pkcs11:id=%zz",
	"pkcs11:object=%zz", "pkcs11:token=a;token=b", "pkcs11:token=b;token=a",
	"pkcs11:token=a;token=0123456789012345678901234567890123", "pkcs11:TOKEN=a",
	"pkcs11:Token=a", "pkcs11:token=a;foo=%zz", "pkcs11:foo=%zz", "pkcs11:token=a?",
	"pkcs11:token=a?&", "pkcs11:token=\v\r\na", "pkcs11:?pin-value=a&pin-value=%zz",
	"pkcs11:?module-path=a&=", "pkcs11:tok en=a", "pkcs11:to\nken=a", "pkcs11:token=a\t",
	"pkcs11:id=", "pkcs11:id=%01%ab", "pkcs11:id=%01%AB", "pkcs11:id=%01%Ab;id=",
	"pkcs11:id=a", "pkcs11:id=%61", "pkcs11:object=", "pkcs11:object=key%201",
	"pkcs11:object=key 1", "pkcs11:object=cert%201", "pkcs11:object=key%201;type=cert",
	"pkcs11:object=cert%201;type=cert", "pkcs11:object=cert%201;type=private",
	"pkcs11:object=a;type=cert", "pkcs11:object=b;type=cert", "pkcs11:object=a%00",
	"pkcs11:object=key%201;object=key%202", "pkcs11:id=;object=;type=public",
	"pkcs11:token=My%20Token;id=%01%AB;object=key%201;type=private",
	"pkcs11:token=My%20Token;id=%01%AB;object=key%201;type=private?pin-value=1234",
	"pkcs11:token=My%20Token/../x", "pkcs11:token=%E2%82%AC", "pkcs11:token=\xe2\x82\xac",
	"pkcs11:token=\xff", "pkcs11:\x01=\x02", "pkcs11:token=a;\x7f", "pkcs11:;", "pkcs11:;;",
	"pkcs11:;?", "pkcs11:&", "pkcs11:token=a&b", "pkcs11:=", "pkcs11:==", "pkcs11:a==",
	"pkcs11:token==a", "pkcs11:model=;manufacturer=;serial=;token=",
	"pkcs11:model=a;manufacturer=a;serial=a;token=a",
	"pkcs11:model=SoftHSM%20v2;manufacturer=SoftHSM%20project;serial=abc123;token=My%20Token",
};

/* One value in the style of name: text, type, number or version. */
static void
gen_value(char *out, size_t size, int kind)
{
	static const char *const types[] = {
		"private", "public", "cert", "data", "secret-key", "secretkey", "Private",
		"PUBLIC", "certificate", "%70rivate", "", "x", "private;",
	};
	static const char *const pieces[] = {
		"a", "Z", "0", "-", ".", "_", "~", "%20", "%2F", "%2f", "%3B", "%3b", "%00",
		"%FF", "%ff", "%Ab", "%aB", "%4", "%", "%G0", "%0G", "%zz", "%%", "%2 0",
		"%2\n0", ";", "?", "/", "&", "=", ":", "#", "@", "+", ",", " ", "\t", "\n",
		"\r", "\v", "\x80", "\xff", "\xc3\xa9", "My", "Token", "key", "1", "%01%AB",
		"'", "\"", "\\", "*", "(", ")", "!", "$", "[", "]",
	};
	size_t n = 0, len;
	const char *p;
	char num[64];
	unsigned int i, parts;

	out[0] = '\0';
	if (kind == 1) {
		p = types[rnd(sizeof(types) / sizeof(types[0]))];
		snprintf(out, size, "%s", p);
		return;
	}
	if (kind == 2 || kind == 3) {
		parts = kind == 3 ? 1 + rnd(3) : 1;
		for (i = 0; i < parts; i++) {
			switch (rnd(8)) {
			case 0: snprintf(num, sizeof(num), "%s", ""); break;
			case 1: snprintf(num, sizeof(num), "%u", rnd(300)); break;
			case 2: snprintf(num, sizeof(num), "%u%u%u", rnd(100000), rnd(100000), rnd(1000000)); break;
			case 3: snprintf(num, sizeof(num), "%llu", 4294967296ull + rnd(600)); break;
			case 4: snprintf(num, sizeof(num), "000%u", rnd(256)); break;
			case 5: snprintf(num, sizeof(num), "%s", rnd(2) ? "-1" : "1a"); break;
			case 6: snprintf(num, sizeof(num), "18446744073709551%03u", rnd(1000)); break;
			default: snprintf(num, sizeof(num), "%u", rnd(10)); break;
			}
			len = strlen(num);
			if (n + len + 2 >= size)
				break;
			if (i != 0)
				out[n++] = '.';
			memcpy(out + n, num, len + 1);
			n += len;
		}
		return;
	}
	/* Text: sometimes sized to the field limits, in escapes or not. */
	if (rnd(5) == 0) {
		static const size_t widths[] = { 15, 16, 17, 31, 32, 33, 63, 64, 65 };
		size_t w = widths[rnd(sizeof(widths) / sizeof(widths[0]))];
		int esc = (int)rnd(2);

		for (i = 0; i < w && n + 4 < size; i++) {
			memcpy(out + n, esc ? "%41" : "A", esc ? 3 : 1);
			n += esc ? 3 : 1;
		}
		if (rnd(2) && n + 4 < size) {
			memcpy(out + n, "%20", 3);
			n += 3;
		}
		out[n] = '\0';
		return;
	}
	parts = rnd(8);
	for (i = 0; i < parts; i++) {
		p = pieces[rnd(sizeof(pieces) / sizeof(pieces[0]))];
		len = strlen(p);
		if (n + len + 1 >= size)
			break;
		memcpy(out + n, p, len + 1);
		n += len;
	}
}

static void
gen_uri(char *out, size_t size)
{
	static const char *const prefixes[] = {
		"pkcs11:", "pkcs11:", "pkcs11:", "pkcs11:", "pkcs11:", "pkcs11:", "pkcs11:",
		"PKCS11:", "Pkcs11:", "pkcs11", " pkcs11:", "pkcs11 :", "pkcs1:", "pkcs11::",
		"\npkcs11:",
	};
	/* kind: 0 text, 1 type, 2 number, 3 version. */
	static const struct {
		const char *name;
		int kind;
	} names[] = {
		{ "token", 0 }, { "token", 0 }, { "manufacturer", 0 }, { "serial", 0 },
		{ "model", 0 }, { "object", 0 }, { "object", 0 }, { "id", 0 }, { "id", 0 },
		{ "type", 1 }, { "type", 1 }, { "object-type", 1 }, { "objecttype", 1 },
		{ "library-description", 0 }, { "library-manufacturer", 0 },
		{ "library-version", 3 }, { "slot-description", 0 }, { "slot-manufacturer", 0 },
		{ "slot-id", 2 }, { "pin-value", 0 }, { "pin-source", 0 }, { "pinfile", 0 },
		{ "module-name", 0 }, { "module-path", 0 }, { "x-vendor", 0 }, { "TOKEN", 0 },
		{ "Token", 0 }, { "", 0 }, { "to ken", 0 }, { "tok%65n", 0 }, { "token ", 0 },
		{ "x.y", 0 }, { "x_y-1", 0 }, { "\xc3\xa9", 0 },
	};
	static const char *const seps[] = { ";", ";", ";", ";", ";;", "?", "&", "", "=" };
	char value[400];
	size_t n;
	unsigned int i, segs, which;

	n = (size_t)snprintf(out, size, "%s", prefixes[rnd(sizeof(prefixes) / sizeof(prefixes[0]))]);
	segs = rnd(7);
	for (i = 0; i < segs && n < size; i++) {
		which = rnd(sizeof(names) / sizeof(names[0]));
		gen_value(value, sizeof(value), names[which].kind);
		n += (size_t)snprintf(out + n, size - n, "%s%s=%s",
		    i == 0 ? "" : seps[rnd(sizeof(seps) / sizeof(seps[0]))],
		    names[which].name, value);
	}
	if (rnd(4) == 0 && n < size) {
		segs = rnd(4);
		n += (size_t)snprintf(out + n, size - n, "?");
		for (i = 0; i < segs && n < size; i++) {
			which = rnd(sizeof(names) / sizeof(names[0]));
			gen_value(value, sizeof(value), 0);
			n += (size_t)snprintf(out + n, size - n, "%s%s=%s", i == 0 ? "" : "&",
			    names[which].name, value);
		}
	}
	if (rnd(20) == 0 && n < size)
		snprintf(out + n, size - n, "%s", seps[rnd(sizeof(seps) / sizeof(seps[0]))]);
}

static void
test_uri_parse_differential(void **state)
{
	char uri[8192];
	CK_TOKEN_INFO ti;
	unsigned char id[40];
	char label[40], *s;
	size_t i, j, n, len;

	memset(&counts, 0, sizeof(counts));
	for (i = 0; i < sizeof(handwritten) / sizeof(handwritten[0]); i++)
		compare_uri(handwritten[i]);
	for (i = 0; i < 20000; i++) {
		gen_uri(uri, sizeof(uri));
		compare_uri(uri);
	}
	/* What we format must parse back and match what it was made from. */
	for (i = 0; i < 500; i++) {
		gen_token_info(&ti);
		n = rnd(sizeof(id));
		for (j = 0; j < n; j++)
			id[j] = (unsigned char)rnd(256);
		len = rnd(sizeof(label));
		for (j = 0; j < len; j++)
			label[j] = (char)(1 + rnd(255));
		label[len] = '\0';
		s = p11a_uri_format_object(&ti, classes[rnd(NCLASSES)], id, n, label);
		assert_non_null(s);
		compare_uri(s);
		free(s);
		s = p11a_uri_format_token(&ti);
		assert_non_null(s);
		compare_uri(s);
		free(s);
	}
	print_message("# parse: %lu URIs, %lu accepted by both, %lu documented deviations; "
	    "match: %lu calls identical to p11-kit, %lu positive\n", counts.parse,
	    counts.accepted, counts.deviations, counts.matches, counts.positive);
	/* The corpus must exercise both outcomes, or it proves little. */
	assert_true(counts.accepted > counts.parse / 4);
	assert_true(counts.accepted < counts.parse);
	assert_true(counts.positive > counts.matches / 20);
	assert_true(counts.deviations > 0);
}

/* ------------------------------------------------------------ fixed semantics */

static int
uri_accepts(const char *uri)
{
	int err = 1;
	struct p11a_uri_matcher *m = p11a_uri_matcher_new(uri, &err);

	p11a_uri_matcher_free(m);
	if (m == NULL)
		assert_int_equal(err, -P11A_E_URI);
	return m != NULL;
}

static int
token_matches(const char *uri, const struct p11a_token *t)
{
	int err, r;
	struct p11a_uri_matcher *m = p11a_uri_matcher_new(uri, &err);

	if (m == NULL)
		fail_msg("cannot parse %s", uri);
	r = p11a_uri_match_token(m, t);
	p11a_uri_matcher_free(m);
	return r;
}

static int
key_matches(const char *uri, const struct p11a_token *t, const struct p11a_key *k)
{
	int err, r;
	struct p11a_uri_matcher *m = p11a_uri_matcher_new(uri, &err);

	if (m == NULL)
		fail_msg("cannot parse %s", uri);
	r = p11a_uri_match_key(m, t, k);
	p11a_uri_matcher_free(m);
	return r;
}

/* The rules themselves, written out, so they hold even without p11-kit. */
static void
test_uri_rules(void **state)
{
	const struct p11a_token *t0 = &fixed_tokens[0], *t1 = &fixed_tokens[1];
	const struct p11a_key *k0 = &fixed_keys[0], *k1 = &fixed_keys[1];

	/* Scheme: any case, at the very start. */
	assert_true(uri_accepts("pkcs11:"));
	assert_true(uri_accepts("PKCS11:token=a"));
	assert_false(uri_accepts(" pkcs11:"));
	assert_false(uri_accepts("pkcs11"));
	assert_false(uri_accepts("pkcs11x:"));
	assert_false(uri_accepts(""));
	assert_false(uri_accepts(NULL));
	/* Escapes: two hex digits, either case. */
	assert_true(uri_accepts("pkcs11:token=%4a%4A"));
	assert_false(uri_accepts("pkcs11:token=%4"));
	assert_false(uri_accepts("pkcs11:token=%"));
	assert_false(uri_accepts("pkcs11:token=%g0"));
	assert_false(uri_accepts("pkcs11:id=%zz"));
	assert_false(uri_accepts("pkcs11:?module-path=%zz"));
	/* Unknown path names parse but match nothing; unknown queries are ignored. */
	assert_true(uri_accepts("pkcs11:foo=%zz"));
	assert_int_equal(token_matches("pkcs11:foo=bar", t0), 0);
	assert_int_equal(token_matches("pkcs11:token=My%20Token?foo=bar", t0), 1);
	assert_int_equal(token_matches("pkcs11:token=My%20Token;type=bogus", t0), 0);
	assert_int_equal(token_matches("pkcs11:module-name=x", t0), 0);
	assert_int_equal(token_matches("pkcs11:pin-value=1234", t0), 1);
	/* Too long for the field: matches nothing, even a truncated label. */
	assert_int_equal(token_matches("pkcs11:token=012345678901234567890123456789012",
	    &fixed_tokens[5]), 0);
	assert_int_equal(token_matches("pkcs11:token=01234567890123456789012345678901",
	    &fixed_tokens[5]), 1);
	/* Absent matches anything; empty matches only empty; padding is ignored. */
	assert_int_equal(token_matches("pkcs11:", t1), 1);
	assert_int_equal(token_matches("pkcs11:token=", t1), 1);
	assert_int_equal(token_matches("pkcs11:token=", t0), 0);
	assert_int_equal(token_matches("pkcs11:token=My%20Token%20%20", t0), 1);
	assert_int_equal(token_matches("pkcs11:token=%20My%20Token", t0), 0);
	assert_int_equal(token_matches("pkcs11:token=my%20token", t0), 0);
	assert_int_equal(token_matches("pkcs11:to ken=My %20Token", t0), 1);
	assert_int_equal(token_matches("pkcs11:token=%00xyz", t0), 1);
	/* The later of two values wins. */
	assert_int_equal(token_matches("pkcs11:token=x;token=My%20Token", t0), 1);
	assert_int_equal(token_matches("pkcs11:token=My%20Token;token=x", t0), 0);
	/* An empty attribute ends the path: the rest is query, ignored. */
	assert_int_equal(token_matches("pkcs11:;token=x", t0), 1);
	/* Keys: no type= matches either label; type=cert needs a certificate. */
	assert_int_equal(key_matches("pkcs11:object=cert%201", t0, k0), 1);
	assert_int_equal(key_matches("pkcs11:object=cert%201;type=private", t0, k0), 0);
	assert_int_equal(key_matches("pkcs11:object=key%201;type=cert", t0, k0), 0);
	assert_int_equal(key_matches("pkcs11:type=cert", t0, k1), 0);
	assert_int_equal(key_matches("pkcs11:type=data", t0, k0), 0);
	assert_int_equal(key_matches("pkcs11:id=%01%aB;type=public", t0, k0), 1);
	assert_int_equal(key_matches("pkcs11:id=%01", t0, k0), 0);
	/* id= (empty) matches an empty id buffer, not a missing one. */
	assert_int_equal(key_matches("pkcs11:id=", t1, &fixed_keys[3]), 1);
	assert_int_equal(key_matches("pkcs11:id=", t1, &fixed_keys[2]), 0);
	assert_int_equal(key_matches("pkcs11:object=", t1, &fixed_keys[2]), 1);
	/* Not a URI: NULL arguments never match. */
	assert_int_equal(p11a_uri_match_token(NULL, t0), 0);
	assert_int_equal(p11a_uri_match_key(NULL, t0, k0), 0);
}

static void
test_uri_version_deviation(void **state)
{
	P11KitUri *u = p11_kit_uri_new();

	assert_non_null(u);
	/* p11-kit wraps 4294967297 to 1 and accepts it; we refuse. */
	assert_int_equal(p11_kit_uri_parse("pkcs11:library-version=4294967297",
	    P11_KIT_URI_FOR_ANY, u), P11_KIT_URI_OK);
	assert_false(uri_accepts("pkcs11:library-version=4294967297"));
	assert_false(uri_accepts("pkcs11:library-version=1.4294967297"));
	assert_false(uri_accepts("pkcs11:library-version=255"));
	assert_false(uri_accepts("pkcs11:library-version=99999999999999999999999999"));
	/* Leading zeros are not "large". */
	assert_true(uri_accepts("pkcs11:library-version=000000000000000000000254.0001"));
	p11_kit_uri_free(u);
}

/* ------------------------------------------------------------ limits */

static void
test_uri_limits(void **state)
{
	char *uri = malloc(P11A_URI_MAX + 2);
	size_t i;

	assert_non_null(uri);
	/* Exactly P11A_URI_MAX bytes: accepted; one more: refused. */
	memcpy(uri, "pkcs11:object=", 14);
	memset(uri + 14, 'a', P11A_URI_MAX - 14);
	uri[P11A_URI_MAX] = '\0';
	assert_true(uri_accepts(uri));
	uri[P11A_URI_MAX] = 'a';
	uri[P11A_URI_MAX + 1] = '\0';
	assert_false(uri_accepts(uri));

	/* Worst cases for the loops: all separators, all escapes, all '='. */
	memcpy(uri, "pkcs11:", 7);
	memset(uri + 7, ';', P11A_URI_MAX - 7);
	uri[P11A_URI_MAX] = '\0';
	compare_uri(uri);
	memset(uri + 7, '&', P11A_URI_MAX - 7);
	compare_uri(uri);
	memset(uri + 7, '=', P11A_URI_MAX - 7);
	compare_uri(uri);
	memset(uri + 7, ' ', P11A_URI_MAX - 7);
	compare_uri(uri);
	for (i = 7; i + 8 <= P11A_URI_MAX; i += 8)
		memcpy(uri + i, "token=a;", 8);
	uri[i] = '\0';
	compare_uri(uri);
	uri[7] = '?';
	for (i = 8; i + 4 <= P11A_URI_MAX; i += 4)
		memcpy(uri + i, "a=b&", 4);
	uri[i] = '\0';
	compare_uri(uri);
	memcpy(uri, "pkcs11:id=", 10);
	for (i = 10; i + 3 <= P11A_URI_MAX; i += 3)
		memcpy(uri + i, "%ff", 3);
	uri[i] = '\0';
	compare_uri(uri);
	memcpy(uri, "pkcs11:slot-id=", 15);
	memset(uri + 15, '9', P11A_URI_MAX - 15);
	uri[P11A_URI_MAX] = '\0';
	compare_uri(uri);
	memcpy(uri, "pkcs11:library-version=", 23);
	memset(uri + 23, '0', P11A_URI_MAX - 23);
	uri[P11A_URI_MAX - 1] = '7';
	compare_uri(uri);
	assert_true(uri_accepts(uri));
	free(uri);
}

/* ------------------------------------------------------------ list helpers */

static void
test_uri_list(void **state)
{
	struct p11a_token tokens[2] = {
		{ "pkcs11:token=A", "A", "M", "m", "1", "x", 1 },
		{ "pkcs11:token=B", "B", "M", "m", "2", "x", 1 },
	};
	struct p11a_key keys[4] = {
		{ "pkcs11:token=A;object=k", "pkcs11:token=A", "k", key_id, 2, 0, 0, "", NULL, 0,
		  NULL, 0, "", "", 0 },
		{ "pkcs11:token=B;object=k", "pkcs11:token=B", "k", key_id, 2, 0, 0, "", NULL, 0,
		  NULL, 0, "", "", 0 },
		{ "pkcs11:token=C;object=k", "pkcs11:token=C", "k", key_id, 2, 0, 0, "", NULL, 0,
		  NULL, 0, "", "", 0 },
		{ NULL, "pkcs11:token=A", "k", key_id, 2, 0, 0, "", NULL, 0, NULL, 0, "", "", 0 },
	};
	struct p11a_list_reply l;
	uint32_t idx[4];
	size_t n = 99;

	memset(&l, 0, sizeof(l));
	l.ntokens = 2;
	l.tokens = tokens;
	l.nkeys = 4;
	l.keys = keys;
	assert_ptr_equal(p11a_list_find_token(&l, "pkcs11:token=B"), &tokens[1]);
	assert_null(p11a_list_find_token(&l, "pkcs11:token=b"));
	assert_null(p11a_list_find_token(&l, NULL));
	assert_null(p11a_list_find_token(NULL, "pkcs11:token=A"));

	/* Key 2's token is not listed and key 3 has no URI: neither counts. */
	assert_int_equal(p11a_list_match_keys(&l, "pkcs11:object=k", idx, 4, &n), 0);
	assert_int_equal(n, 2);
	assert_int_equal(idx[0], 0);
	assert_int_equal(idx[1], 1);
	/* The full count even when only max indexes fit. */
	idx[0] = 77;
	assert_int_equal(p11a_list_match_keys(&l, "pkcs11:object=k", idx, 0, &n), 0);
	assert_int_equal(n, 2);
	assert_int_equal(idx[0], 77);
	assert_int_equal(p11a_list_match_keys(&l, "pkcs11:token=B", idx, 4, &n), 0);
	assert_int_equal(n, 1);
	assert_int_equal(idx[0], 1);
	assert_int_equal(p11a_list_match_keys(&l, "pkcs11:token=B;foo=1", idx, 4, &n), 0);
	assert_int_equal(n, 0);
	n = 5;
	assert_int_equal(p11a_list_match_keys(&l, "pkcs11:token=%zz", idx, 4, &n), -P11A_E_URI);
	assert_int_equal(n, 0);
	assert_int_equal(p11a_list_match_keys(&l, NULL, idx, 4, &n), -P11A_E_URI);
	assert_int_equal(p11a_list_match_keys(NULL, "pkcs11:", idx, 4, &n), 0);
	assert_int_equal(n, 0);
}

/* p11a_uri_list_add: whole URIs only, ", " between them, buf untouched when one does not fit. */
static void
test_uri_list_add(void **state)
{
	char buf[24] = "";

	assert_int_equal(p11a_uri_list_add(buf, sizeof(buf), "pkcs11:object=a"), 0);
	assert_string_equal(buf, "pkcs11:object=a");
	/* ", pkcs11:object=b" would need 40 bytes with the NUL. */
	assert_int_equal(p11a_uri_list_add(buf, sizeof(buf), "pkcs11:object=b"), -1);
	assert_string_equal(buf, "pkcs11:object=a");
	assert_int_equal(p11a_uri_list_add(buf, sizeof(buf), "x"), 0);
	assert_string_equal(buf, "pkcs11:object=a, x");
	/* Exactly full: 23 characters and the NUL. */
	assert_int_equal(p11a_uri_list_add(buf, sizeof(buf), "yyy"), 0);
	assert_string_equal(buf, "pkcs11:object=a, x, yyy");
	assert_int_equal(p11a_uri_list_add(buf, sizeof(buf), "z"), -1);
	assert_int_equal(p11a_uri_list_add(buf, sizeof(buf), ""), -1);
	assert_int_equal(p11a_uri_list_add(buf, sizeof(buf), NULL), -1);
	assert_string_equal(buf, "pkcs11:object=a, x, yyy");
	assert_int_equal(p11a_uri_list_add(buf, 0, "a"), -1);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_uri_format_fixed),
		cmocka_unit_test(test_uri_format_differential),
		cmocka_unit_test(test_uri_parse_differential),
		cmocka_unit_test(test_uri_rules),
		cmocka_unit_test(test_uri_version_deviation),
		cmocka_unit_test(test_uri_limits),
		cmocka_unit_test(test_uri_list),
		cmocka_unit_test(test_uri_list_add),
	};

	return cmocka_run_group_tests_name("uri", tests, NULL, NULL);
}
