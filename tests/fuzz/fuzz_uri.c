/*
 * Fuzz target for common/uri.c, the RFC 7512 parser and matcher every
 * client and the agent run on URIs users and programs hand them.
 *
 * Input: the first byte picks the check, the rest is data.
 * - parse: the bytes as a URI; a parsed URI is matched against a fixed
 *   token and key (it must not crash, and matching never says more than 1).
 * - round trip: the bytes become a token's fields, a key's CKA_ID and
 *   label; the object URI formatted from them must parse and match that
 *   same token and key.
 */
#include "config.h"
#include "p11a.h"
#include "uri.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define IN_MAX 8192

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* A field of ti from data: padded with spaces, as tokens do. */
static void
field_put(CK_UTF8CHAR *f, size_t size, const uint8_t **data, size_t *left)
{
	size_t n = 0;

	memset(f, ' ', size);
	if (*left > 0) {
		n = (*data)[0] % (size + 1);
		(*data)++;
		(*left)--;
	}
	if (n > *left)
		n = *left;
	memcpy(f, *data, n);
	*data += n;
	*left -= n;
}

/* The field as the agent stores it: up to the first NUL, trailing spaces trimmed. */
static char *
field_text(const CK_UTF8CHAR *f, size_t size)
{
	size_t n = 0;
	char *s;

	while (n < size && f[n] != '\0')
		n++;
	while (n > 0 && f[n - 1] == ' ')
		n--;
	if ((s = malloc(n + 1)) == NULL)
		abort();
	memcpy(s, f, n);
	s[n] = '\0';
	return s;
}

static void
check_parse(const uint8_t *data, size_t size)
{
	struct p11a_token t = { .label = (char *)"tok", .manufacturer = (char *)"m",
				.model = (char *)"x", .serial = (char *)"1" };
	uint8_t id[1] = { 1 };
	struct p11a_key k = { .label = (char *)"key", .id = id, .id_len = 1,
			      .cert_label = (char *)"key" };
	struct p11a_uri_matcher *m;
	char *uri;
	int err = 0, r;

	if (size > IN_MAX)
		size = IN_MAX;
	if ((uri = malloc(size + 1)) == NULL)
		abort();
	memcpy(uri, data, size);
	uri[size] = '\0';
	m = p11a_uri_matcher_new(uri, &err);
	if (m == NULL) {
		if (err == 0)
			abort();
	} else {
		r = p11a_uri_match_token(m, &t);
		if (r < 0 || r > 1)
			abort();
		r = p11a_uri_match_key(m, &t, &k);
		if (r < 0 || r > 1)
			abort();
		p11a_uri_matcher_free(m);
	}
	free(uri);
}

static void
check_round_trip(const uint8_t *data, size_t size)
{
	CK_TOKEN_INFO ti;
	struct p11a_token t;
	struct p11a_key k;
	struct p11a_uri_matcher *m;
	size_t id_len = 0, label_len = 0;
	char *uri, *label;
	int err = 0;

	memset(&ti, 0, sizeof(ti));
	field_put(ti.label, sizeof(ti.label), &data, &size);
	field_put(ti.manufacturerID, sizeof(ti.manufacturerID), &data, &size);
	field_put(ti.model, sizeof(ti.model), &data, &size);
	field_put(ti.serialNumber, sizeof(ti.serialNumber), &data, &size);
	if (size > 0) {
		id_len = data[0] % 65;
		data++;
		size--;
	}
	if (id_len > size)
		id_len = size;
	label_len = size - id_len;
	if (label_len > 256)
		label_len = 256;
	/* Labels are text: no NUL inside. */
	for (size_t i = 0; i < label_len; i++)
		if (data[id_len + i] == '\0')
			label_len = i;
	if ((label = malloc(label_len + 1)) == NULL)
		abort();
	memcpy(label, data + id_len, label_len);
	label[label_len] = '\0';

	uri = p11a_uri_format_object(&ti, CKO_PRIVATE_KEY, data, id_len, label);
	if (uri == NULL)
		abort();
	memset(&t, 0, sizeof(t));
	t.label = field_text(ti.label, sizeof(ti.label));
	t.manufacturer = field_text(ti.manufacturerID, sizeof(ti.manufacturerID));
	t.model = field_text(ti.model, sizeof(ti.model));
	t.serial = field_text(ti.serialNumber, sizeof(ti.serialNumber));
	memset(&k, 0, sizeof(k));
	k.label = label;
	k.id = (uint8_t *)(uintptr_t)data;
	k.id_len = id_len;
	k.cert_label = (char *)"";
	if ((m = p11a_uri_matcher_new(uri, &err)) == NULL)
		abort();        /* our own output must parse */
	/* A NULL id never matches id= (p11-kit's rule); the agent gives keys without CKA_ID no id=. */
	if (id_len > 0 && p11a_uri_match_key(m, &t, &k) != 1)
		abort();        /* ... and match what it was made from */
	p11a_uri_matcher_free(m);
	free(uri);
	free(label);
	free(t.label);
	free(t.manufacturer);
	free(t.model);
	free(t.serial);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size == 0)
		return 0;
	if (data[0] & 1)
		check_round_trip(data + 1, size - 1);
	else
		check_parse(data + 1, size - 1);
	return 0;
}
