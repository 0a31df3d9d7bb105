/*
 * RFC 7512 pkcs11: URIs, formatted, parsed and matched exactly as p11-kit
 * 0.24 did it for us, without linking libp11-kit (and libffi with it)
 * into every process that loads the provider or the PKCS#11 module.
 * tests/unit/test_uri.c compares this file against p11-kit itself.
 */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "p11a.h"
#include "uri.h"

#define URI_SCHEME      "pkcs11:"
#define URI_SCHEME_LEN  (sizeof(URI_SCHEME) - 1)
/* p11-kit drops these anywhere in a URI before parsing it (not '\t'). */
#define URI_WHITESPACE  " \n\r\v"

/* Bytes written as themselves; every other byte is %XX (upper case). */
static const char verbatim[] =
	"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.";
static const char hexdigits[] = "0123456789ABCDEF";

struct p11a_uri_matcher {
	/*
	 * Set, as by p11-kit, for an unknown path attribute, an unknown
	 * type= or a value too long for its CK_TOKEN_INFO field: the URI
	 * parses but matches nothing.
	 */
	int unrecognized;
	/* Token fields as p11-kit keeps them: zero if absent, else space-padded. */
	CK_TOKEN_INFO ti;
	unsigned char *id;          /* decoded id=, when has_id */
	size_t id_len;
	int has_id;
	unsigned char *label;       /* decoded object=, when has_label */
	size_t label_len;
	int has_label;
	int has_class;
	CK_OBJECT_CLASS cls;
};

/* ------------------------------------------------------------ formatting */

struct out {
	char *p;
	size_t len;
	size_t cap;                 /* bytes of p, including room for the NUL */
};

static int
out_put(struct out *o, const void *s, size_t n)
{
	if (o->cap - o->len <= n)
		return -1;
	memcpy(o->p + o->len, s, n);
	o->len += n;
	o->p[o->len] = '\0';
	return 0;
}

static int
out_put_encoded(struct out *o, const unsigned char *v, size_t n, int force)
{
	char hex[3];
	size_t i;

	for (i = 0; i < n; i++) {
		if (!force && v[i] != '\0' && strchr(verbatim, v[i]) != NULL) {
			if (out_put(o, &v[i], 1) != 0)
				return -1;
			continue;
		}
		hex[0] = '%';
		hex[1] = hexdigits[v[i] >> 4];
		hex[2] = hexdigits[v[i] & 0x0f];
		if (out_put(o, hex, 3) != 0)
			return -1;
	}
	return 0;
}

/* Writes ";name=" (no ';' before the first attribute) and the value. */
static int
out_attr(struct out *o, const char *name, const unsigned char *v, size_t n, int force)
{
	if ((o->len > URI_SCHEME_LEN && out_put(o, ";", 1) != 0) ||
	    out_put(o, name, strlen(name)) != 0 || out_put(o, "=", 1) != 0)
		return -1;
	return out_put_encoded(o, v, n, force);
}

/*
 * A space-padded text field, trailing spaces dropped (all spaces give an
 * empty value, which p11-kit still writes).  Some tokens pad with NULs
 * (tpm2-pkcs11): everything from the first NUL on counts as padding.
 */
static int
out_field(struct out *o, const char *name, const CK_UTF8CHAR *f, size_t size)
{
	size_t n = 0;

	while (n < size && f[n] != '\0')
		n++;
	while (n > 0 && f[n - 1] == ' ')
		n--;
	return out_attr(o, name, f, n, 0);
}

/* p11-kit's attribute order: model, manufacturer, serial, token. */
static int
out_token(struct out *o, const CK_TOKEN_INFO *ti)
{
	if (out_field(o, "model", ti->model, sizeof(ti->model)) != 0 ||
	    out_field(o, "manufacturer", ti->manufacturerID, sizeof(ti->manufacturerID)) != 0 ||
	    out_field(o, "serial", ti->serialNumber, sizeof(ti->serialNumber)) != 0 ||
	    out_field(o, "token", ti->label, sizeof(ti->label)) != 0)
		return -1;
	return 0;
}

/* Room for the scheme, the names and every token field fully escaped. */
#define TOKEN_URI_MAX (URI_SCHEME_LEN + 64 + 3 * (16 + 32 + 16 + 32) + 1)

static int
out_init(struct out *o, size_t cap)
{
	o->len = 0;
	o->cap = cap;
	if ((o->p = malloc(cap)) == NULL)
		return -1;
	memcpy(o->p, URI_SCHEME, URI_SCHEME_LEN + 1);
	o->len = URI_SCHEME_LEN;
	return 0;
}

char *
p11a_uri_format_token(const CK_TOKEN_INFO *ti)
{
	struct out o;

	if (ti == NULL || out_init(&o, TOKEN_URI_MAX) != 0)
		return NULL;
	if (out_token(&o, ti) != 0) {
		free(o.p);
		return NULL;
	}
	return o.p;
}

static const char *
class_name(CK_OBJECT_CLASS cls)
{
	switch (cls) {
	case CKO_DATA: return "data";
	case CKO_SECRET_KEY: return "secret-key";
	case CKO_CERTIFICATE: return "cert";
	case CKO_PUBLIC_KEY: return "public";
	case CKO_PRIVATE_KEY: return "private";
	default: return NULL;
	}
}

char *
p11a_uri_format_object(const CK_TOKEN_INFO *ti, CK_OBJECT_CLASS cls,
		       const unsigned char *id, size_t id_len, const char *label)
{
	struct out o;
	size_t label_len = label == NULL ? 0 : strlen(label);
	const char *type = class_name(cls);

	if (ti == NULL || (id == NULL && id_len != 0))
		return NULL;
	/* Each byte takes at most 3; these bounds keep the sum from wrapping. */
	if (id_len > SIZE_MAX / 8 || label_len > SIZE_MAX / 8)
		return NULL;
	if (out_init(&o, TOKEN_URI_MAX + 64 + 3 * id_len + 3 * label_len) != 0)
		return NULL;
	if (out_token(&o, ti) != 0 ||
	    (id_len != 0 && out_attr(&o, "id", id, id_len, 1) != 0) ||
	    (label_len != 0 &&
	     out_attr(&o, "object", (const unsigned char *)label, label_len, 0) != 0) ||
	    (type != NULL &&
	     out_attr(&o, "type", (const unsigned char *)type, strlen(type), 0) != 0)) {
		free(o.p);
		return NULL;
	}
	return o.p;
}

/* ------------------------------------------------------------ parsing */

/* Inside [s, e) while parsing: a name or a value, never NUL-terminated. */
struct span {
	const char *s;
	const char *e;
};

static int
span_is(struct span sp, const char *lit)
{
	size_t n = strlen(lit);

	return (size_t)(sp.e - sp.s) == n && memcmp(sp.s, lit, n) == 0;
}

static int
hexval(unsigned char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/*
 * Percent-decodes v into out, which has room for as many bytes as v (the
 * result is never longer); out may be NULL to validate and measure only.
 * -1 for a '%' not followed by two hex digits (either case).
 */
static int
span_decode(struct span v, unsigned char *out, size_t *len)
{
	const char *p = v.s;
	size_t n = 0;
	int hi, lo;

	while (p < v.e) {
		if (*p != '%') {
			if (out != NULL)
				out[n] = (unsigned char)*p;
			n++;
			p++;
			continue;
		}
		if (v.e - p < 3 || (hi = hexval((unsigned char)p[1])) < 0 ||
		    (lo = hexval((unsigned char)p[2])) < 0)
			return -1;
		if (out != NULL)
			out[n] = (unsigned char)(hi << 4 | lo);
		n++;
		p += 3;
	}
	if (len != NULL)
		*len = n;
	return 0;
}

/* A later id= or object= replaces an earlier one, as in p11-kit. */
static int
parse_bytes(struct span v, unsigned char **p, size_t *len, int *has)
{
	unsigned char *nv;
	size_t n;

	if (span_decode(v, NULL, &n) != 0)
		return -P11A_E_URI;
	/* +1: malloc(0) may return NULL, and "present" needs a buffer. */
	if ((nv = malloc(n + 1)) == NULL)
		return -P11A_E_NOMEM;
	(void)span_decode(v, nv, NULL);
	free(*p);
	*p = nv;
	*len = n;
	*has = 1;
	return 0;
}

/*
 * A text field: decoded, padded with spaces.  Too long for the field
 * means the URI names nothing that exists (p11-kit: unrecognized).
 * f is NULL for fields that are checked but never matched (slot,
 * library).
 */
static int
parse_field(struct p11a_uri_matcher *m, struct span v, CK_UTF8CHAR *f, size_t size)
{
	size_t n;

	if (span_decode(v, NULL, &n) != 0)
		return -P11A_E_URI;
	if (n > size) {
		m->unrecognized = 1;
		return 0;
	}
	if (f != NULL) {
		memset(f, ' ', size);
		(void)span_decode(v, f, NULL);
	}
	return 0;
}

static int
span_all_digits(struct span v)
{
	const char *p;

	for (p = v.s; p < v.e; p++) {
		if (*p < '0' || *p > '9')
			return 0;
	}
	return 1;
}

/*
 * One component of library-version: one or more digits, below 255.
 * p11-kit reads it into an int that wraps, so it also takes, say,
 * 4294967297 as 1; we refuse values that large (the only deliberate
 * difference, documented in test_uri.c).
 */
static int
version_part_ok(struct span v)
{
	unsigned int val = 0;
	const char *p;

	if (v.s == v.e || !span_all_digits(v))
		return 0;
	for (p = v.s; p < v.e; p++) {
		val = val * 10 + (unsigned int)(*p - '0');
		if (val >= 255)
			return 0;
	}
	return 1;
}

static int
parse_version(struct span v)
{
	const char *dot = memchr(v.s, '.', (size_t)(v.e - v.s));
	struct span major = { v.s, dot != NULL ? dot : v.e };
	struct span minor = { dot != NULL ? dot + 1 : v.e, v.e };

	if (!version_part_ok(major) || (dot != NULL && !version_part_ok(minor)))
		return -P11A_E_URI;
	return 0;
}

static int
parse_class(struct p11a_uri_matcher *m, struct span v)
{
	static const struct {
		const char *name;
		CK_OBJECT_CLASS cls;
	} classes[] = {
		{ "cert", CKO_CERTIFICATE },
		{ "public", CKO_PUBLIC_KEY },
		{ "private", CKO_PRIVATE_KEY },
		{ "secretkey", CKO_SECRET_KEY },
		{ "secret-key", CKO_SECRET_KEY },
		{ "data", CKO_DATA },
	};
	size_t i;

	/* p11-kit compares type= undecoded: type=%70rivate is unknown. */
	for (i = 0; i < sizeof(classes) / sizeof(classes[0]); i++) {
		if (span_is(v, classes[i].name)) {
			m->cls = classes[i].cls;
			m->has_class = 1;
			return 0;
		}
	}
	m->unrecognized = 1;
	return 0;
}

static int
parse_path_attr(struct p11a_uri_matcher *m, struct span name, struct span v)
{
	CK_SLOT_INFO si;
	CK_INFO li;

	if (span_is(name, "id"))
		return parse_bytes(v, &m->id, &m->id_len, &m->has_id);
	if (span_is(name, "object"))
		return parse_bytes(v, &m->label, &m->label_len, &m->has_label);
	if (span_is(name, "type") || span_is(name, "object-type") ||
	    span_is(name, "objecttype"))
		return parse_class(m, v);
	if (span_is(name, "model"))
		return parse_field(m, v, m->ti.model, sizeof(m->ti.model));
	if (span_is(name, "manufacturer"))
		return parse_field(m, v, m->ti.manufacturerID, sizeof(m->ti.manufacturerID));
	if (span_is(name, "serial"))
		return parse_field(m, v, m->ti.serialNumber, sizeof(m->ti.serialNumber));
	if (span_is(name, "token"))
		return parse_field(m, v, m->ti.label, sizeof(m->ti.label));
	/* Slot and library parts are checked, never matched. */
	if (span_is(name, "slot-description"))
		return parse_field(m, v, NULL, sizeof(si.slotDescription));
	if (span_is(name, "slot-manufacturer"))
		return parse_field(m, v, NULL, sizeof(si.manufacturerID));
	if (span_is(name, "library-description"))
		return parse_field(m, v, NULL, sizeof(li.libraryDescription));
	if (span_is(name, "library-manufacturer"))
		return parse_field(m, v, NULL, sizeof(li.manufacturerID));
	/* As p11-kit: any run of digits, even none (the value is unused). */
	if (span_is(name, "slot-id"))
		return span_all_digits(v) ? 0 : -P11A_E_URI;
	if (span_is(name, "library-version"))
		return parse_version(v);
	/* Query attributes that p11-kit also takes in the path. */
	if (span_is(name, "pin-value") || span_is(name, "pin-source") ||
	    span_is(name, "pinfile"))
		return span_decode(v, NULL, NULL) != 0 ? -P11A_E_URI : 0;
	m->unrecognized = 1;
	return 0;
}

/* p11-kit 0.24 refuses query names with anything but [a-z0-9_-]. */
static int
query_name_ok(struct span name)
{
	const char *p;

	for (p = name.s; p < name.e; p++) {
		if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') ||
		    *p == '-' || *p == '_'))
			return 0;
	}
	return 1;
}

/*
 * Parses the part after "pkcs11:" (whitespace already dropped) with
 * p11-kit's loops: path attributes up to the first empty one, a '?' or
 * the end; then, after one separator character, '&'-separated query
 * attributes (pin-value, pin-source, module-name, module-path or any
 * other [a-z0-9_-] name), whose values must decode but are otherwise
 * ignored.
 */
static int
parse_body(struct p11a_uri_matcher *m, const char *s)
{
	const char *spos, *epos;
	struct span name, v;

	for (;;) {
		int r;

		spos = s + strcspn(s, ";?");
		if (spos == s)
			break;
		epos = memchr(s, '=', (size_t)(spos - s));
		if (epos == NULL || epos == s)
			return -P11A_E_URI;
		name.s = s;
		name.e = epos;
		v.s = epos + 1;
		v.e = spos;
		if ((r = parse_path_attr(m, name, v)) != 0)
			return r;
		s = spos;
		if (*s == '\0' || *s == '?')
			break;
		s++;
	}
	while (*s != '\0') {
		s++;
		if ((spos = strchr(s, '&')) == NULL) {
			spos = s + strlen(s);
			if (spos == s)
				break;
		}
		/* Also refuses an empty attribute ("&&"): memchr finds nothing. */
		epos = memchr(s, '=', (size_t)(spos - s));
		if (epos == NULL || epos == s)
			return -P11A_E_URI;
		name.s = s;
		name.e = epos;
		v.s = epos + 1;
		v.e = spos;
		if (!query_name_ok(name) || span_decode(v, NULL, NULL) != 0)
			return -P11A_E_URI;
		s = spos;
	}
	return 0;
}

struct p11a_uri_matcher *
p11a_uri_matcher_new(const char *uri, int *err)
{
	struct p11a_uri_matcher *m = NULL;
	char *copy = NULL;
	size_t len, i, j;
	int r = -P11A_E_URI;

	if (uri == NULL || (len = strnlen(uri, P11A_URI_MAX + 1)) > P11A_URI_MAX ||
	    strncasecmp(uri, URI_SCHEME, URI_SCHEME_LEN) != 0)
		goto out;
	if ((m = calloc(1, sizeof(*m))) == NULL || (copy = malloc(len + 1)) == NULL) {
		r = -P11A_E_NOMEM;
		goto out;
	}
	for (i = j = 0; i < len; i++) {
		if (strchr(URI_WHITESPACE, uri[i]) == NULL)
			copy[j++] = uri[i];
	}
	copy[j] = '\0';
	r = parse_body(m, copy + URI_SCHEME_LEN);
 out:
	free(copy);
	if (r != 0) {
		p11a_uri_matcher_free(m);
		m = NULL;
	}
	if (err != NULL)
		*err = r;
	return m;
}

void
p11a_uri_matcher_free(struct p11a_uri_matcher *m)
{
	if (m == NULL)
		return;
	free(m->id);
	free(m->label);
	free(m);
}

/* ------------------------------------------------------------ matching */

/* Copies a trimmed C string into a space-padded PKCS#11 text field. */
static void
field_set(CK_UTF8CHAR *f, size_t size, const char *s)
{
	size_t n = s == NULL ? 0 : strlen(s);

	memset(f, ' ', size);
	if (n > size)
		n = size;
	if (n != 0)
		memcpy(f, s, n);
}

/*
 * p11-kit's rule: a URI field whose first byte is 0 is absent and
 * matches anything (so token=%00... does too); else all bytes count.
 */
static int
field_match(const CK_UTF8CHAR *inuri, const CK_UTF8CHAR *real, size_t size)
{
	return inuri[0] == 0 || memcmp(inuri, real, size) == 0;
}

int
p11a_uri_match_token(const struct p11a_uri_matcher *m, const struct p11a_token *t)
{
	CK_TOKEN_INFO ti;

	if (m == NULL || t == NULL || m->unrecognized)
		return 0;
	memset(&ti, 0, sizeof(ti));
	field_set(ti.label, sizeof(ti.label), t->label);
	field_set(ti.manufacturerID, sizeof(ti.manufacturerID), t->manufacturer);
	field_set(ti.model, sizeof(ti.model), t->model);
	field_set(ti.serialNumber, sizeof(ti.serialNumber), t->serial);
	return field_match(m->ti.label, ti.label, sizeof(ti.label)) &&
	    field_match(m->ti.manufacturerID, ti.manufacturerID, sizeof(ti.manufacturerID)) &&
	    field_match(m->ti.model, ti.model, sizeof(ti.model)) &&
	    field_match(m->ti.serialNumber, ti.serialNumber, sizeof(ti.serialNumber));
}

/*
 * id= and object= against the key's CKA_ID and one label, with
 * p11-kit's attribute equality: same length and same bytes, where a key
 * without an id buffer (NULL) equals no id=, not even an empty one.
 */
static int
match_id_label(const struct p11a_uri_matcher *m, const struct p11a_key *k, const char *label)
{
	if (label == NULL)
		label = "";
	if (m->has_id) {
		if (k->id == NULL || k->id_len != m->id_len ||
		    memcmp(k->id, m->id, m->id_len) != 0)
			return 0;
	}
	if (m->has_label) {
		size_t n = strlen(label);

		if (n != m->label_len || memcmp(label, m->label, n) != 0)
			return 0;
	}
	return 1;
}

static int
key_has_cert(const struct p11a_key *k)
{
	return (k->flags & P11A_KEY_HAS_CERT) || k->cert_len != 0 ||
	    (k->cert_uri != NULL && *k->cert_uri != '\0');
}

int
p11a_uri_match_key(const struct p11a_uri_matcher *m, const struct p11a_token *t,
		   const struct p11a_key *k)
{
	if (m == NULL || k == NULL || !p11a_uri_match_token(m, t))
		return 0;
	if (m->has_class) {
		switch (m->cls) {
		case CKO_PRIVATE_KEY:
		case CKO_PUBLIC_KEY:
			return match_id_label(m, k, k->label);
		case CKO_CERTIFICATE:
			/* type=cert names the certificate object: there must be one. */
			return key_has_cert(k) && match_id_label(m, k, k->cert_label);
		default:
			return 0;
		}
	}
	if (match_id_label(m, k, k->label))
		return 1;
	return key_has_cert(k) && match_id_label(m, k, k->cert_label);
}

const struct p11a_token *
p11a_list_find_token(const struct p11a_list_reply *l, const char *token_uri)
{
	uint32_t i;

	if (l == NULL || token_uri == NULL)
		return NULL;
	for (i = 0; i < l->ntokens; i++) {
		if (l->tokens[i].uri != NULL && strcmp(l->tokens[i].uri, token_uri) == 0)
			return &l->tokens[i];
	}
	return NULL;
}

int
p11a_list_match_keys(const struct p11a_list_reply *l, const char *uri,
		     uint32_t *idx, size_t max, size_t *n)
{
	struct p11a_uri_matcher *m;
	uint32_t i;
	int err = 0;

	*n = 0;
	if (uri == NULL || (m = p11a_uri_matcher_new(uri, &err)) == NULL)
		return err != 0 ? err : -P11A_E_URI;
	for (i = 0; l != NULL && i < l->nkeys; i++) {
		const struct p11a_key *k = &l->keys[i];
		const struct p11a_token *t;

		if ((t = p11a_list_find_token(l, k->token_uri)) == NULL || k->uri == NULL)
			continue;
		if (p11a_uri_match_key(m, t, k) != 1)
			continue;
		if (*n < max && idx != NULL)
			idx[*n] = i;
		(*n)++;
	}
	p11a_uri_matcher_free(m);
	return 0;
}

int
p11a_uri_list_add(char *buf, size_t size, const char *uri)
{
	size_t used, n;
	int w;

	if (buf == NULL || size == 0 || uri == NULL || *uri == '\0')
		return -1;
	used = strnlen(buf, size - 1);
	n = size - used;
	w = snprintf(buf + used, n, "%s%s", used > 0 ? ", " : "", uri);
	if (w < 0 || (size_t)w >= n) {
		buf[used] = '\0';
		return -1;
	}
	return 0;
}
