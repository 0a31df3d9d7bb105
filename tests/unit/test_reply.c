/*
 * Unit tests for what the provider makes of the agent's replies
 * (engine/provider/reply.c): which listed keys a URI names, on well-formed and on
 * damaged LIST replies, and which SIGNATURE replies are refused.
 */
#include "config.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "p11a.h"
#include "buf.h"
#include "proto.h"
#include "uri.h"
#include "hashalg.h"
#include "../../engine/provider/provider.h"

#define TOK_URI "pkcs11:model=SoftHSM%20v2;manufacturer=SoftHSM%20project;serial=abc;token=tok1"

static uint8_t id1[] = { 0x01 }, id2[] = { 0x02 }, id3[] = { 0x03 };
static uint8_t der_stub[] = { 0x30, 0x03, 0x02, 0x01, 0x01 };

static struct p11a_token tokens[] = {
	{ (char *)TOK_URI, (char *)"tok1", (char *)"SoftHSM project", (char *)"SoftHSM v2",
	  (char *)"abc", (char *)"libsofthsm2.so", P11A_TOKEN_PRESENT | P11A_TOKEN_LOGGED_IN },
};

static struct p11a_key keys[] = {
	{ (char *)TOK_URI ";id=%01;object=rsa;type=private", (char *)TOK_URI, (char *)"rsa",
	  id1, 1, P11A_KEY_RSA, 2048, (char *)"", der_stub, sizeof(der_stub), der_stub,
	  sizeof(der_stub), (char *)TOK_URI ";id=%01;object=rsa;type=cert", (char *)"rsa-cert",
	  P11A_KEY_PRIVATE_VISIBLE | P11A_KEY_HAS_CERT },
	{ (char *)TOK_URI ";id=%02;object=ec;type=private", (char *)TOK_URI, (char *)"ec",
	  id2, 1, P11A_KEY_EC, 256, (char *)"P-256", der_stub, sizeof(der_stub), NULL, 0,
	  (char *)"", (char *)"", P11A_KEY_PRIVATE_VISIBLE },
	/* a key whose token is not in the reply: never matched */
	{ (char *)"pkcs11:token=gone;id=%03;object=ec;type=private", (char *)"pkcs11:token=gone",
	  (char *)"ec", id3, 1, P11A_KEY_EC, 256, (char *)"P-256", der_stub, sizeof(der_stub),
	  NULL, 0, (char *)"", (char *)"", P11A_KEY_PRIVATE_VISIBLE },
};

static struct p11a_list_reply list = { 1, tokens, 3, keys };

static size_t
count(const struct p11a_list_reply *l, const char *uri, int *rc)
{
	uint32_t idx[8];
	size_t n = 99;

	*rc = p11a_list_match_keys(l, uri, idx, 8, &n);
	return n;
}

static void
test_match(void **state)
{
	uint32_t idx[1];
	size_t n;
	int rc;

	assert_int_equal(count(&list, "pkcs11:object=rsa", &rc), 1);
	assert_int_equal(rc, 0);
	assert_int_equal(count(&list, "pkcs11:object=rsa-cert", &rc), 1);     /* by the certificate's label */
	assert_int_equal(count(&list, "pkcs11:object=rsa-cert;type=private", &rc), 0);
	assert_int_equal(count(&list, "pkcs11:object=ec", &rc), 1);           /* not the orphan */
	assert_int_equal(count(&list, "pkcs11:id=%02", &rc), 1);
	assert_int_equal(count(&list, "pkcs11:token=tok1", &rc), 2);
	assert_int_equal(count(&list, "pkcs11:token=other", &rc), 0);
	assert_int_equal(count(&list, "pkcs11:", &rc), 2);
	assert_int_equal(count(&list, "pkcs11:object=nokey", &rc), 0);
	assert_int_equal(count(&list, "pkcs11:object=%ZZ", &rc), 0);
	assert_int_equal(rc, -P11A_E_URI);
	assert_int_equal(count(&list, "file:/etc/passwd", &rc), 0);
	assert_int_equal(rc, -P11A_E_URI);
	/* more matches than room: the count is still right, nothing written past max */
	assert_int_equal(p11a_list_match_keys(&list, "pkcs11:token=tok1", idx, 1, &n), 0);
	assert_int_equal(n, 2);
	assert_int_equal(idx[0], 0);
	/* an empty or absent reply */
	assert_int_equal(count(NULL, "pkcs11:", &rc), 0);
	assert_int_equal(rc, 0);
}

static void
test_match_damaged_records(void **state)
{
	struct p11a_key k[2];
	struct p11a_token t = tokens[0];
	struct p11a_list_reply l = { 1, &t, 2, k };
	int rc;

	memcpy(&k[0], &keys[0], sizeof(k[0]));
	memcpy(&k[1], &keys[1], sizeof(k[1]));
	k[0].uri = NULL;                        /* no URI: never a match */
	k[1].token_uri = NULL;                  /* no token: never a match */
	assert_int_equal(count(&l, "pkcs11:", &rc), 0);
	assert_int_equal(rc, 0);
	k[1].token_uri = (char *)TOK_URI;
	k[1].label = NULL;
	k[1].id = NULL;
	k[1].id_len = 0;
	assert_int_equal(count(&l, "pkcs11:object=ec", &rc), 0);
	assert_int_equal(count(&l, "pkcs11:token=tok1", &rc), 1);
	t.uri = NULL;
	assert_int_equal(count(&l, "pkcs11:token=tok1", &rc), 0);
}

/*
 * LIST replies as they come off the wire, cut short and with bytes
 * changed: whatever p11a_msg_decode() accepts, matching must cope with.
 */
static void
test_match_wire_mutations(void **state)
{
	struct p11a_msg m, d;
	struct p11a_buf *b;
	const uint8_t *body;
	uint8_t *copy;
	size_t len, i;
	unsigned v;
	int decoded = 0, rc;

	memset(&m, 0, sizeof(m));
	m.type = P11A_MSG_LIST_REPLY;
	m.u.list = list;
	assert_non_null(b = p11a_buf_new(P11A_FRAME_MAX));
	assert_int_equal(p11a_msg_encode(&m, b), 0);
	body = p11a_buf_ptr(b);
	len = p11a_buf_len(b);
	assert_non_null(copy = malloc(len));
	for (i = 0; i < len; i++) {
		for (v = 1; v < 256; v += 36) {
			memcpy(copy, body, len);
			copy[i] ^= (uint8_t)v;
			if (p11a_msg_decode(copy, len, &d) != 0)
				continue;
			decoded++;
			if (d.type == P11A_MSG_LIST_REPLY) {
				(void)count(&d.u.list, "pkcs11:object=rsa", &rc);
				(void)count(&d.u.list, "pkcs11:", &rc);
			}
			p11a_msg_clear(&d);
		}
		/* prefixes never decode */
		assert_int_not_equal(p11a_msg_decode(body, i, &d), 0);
	}
	assert_true(decoded > 0);
	free(copy);
	p11a_buf_free(b);
}

static void
test_uri_class(void **state)
{
	assert_int_equal(p11agent_uri_class("pkcs11:object=a"), P11AGENT_URI_ANY);
	assert_int_equal(p11agent_uri_class("pkcs11:object=a;type=private"), P11AGENT_URI_PRIVATE);
	assert_int_equal(p11agent_uri_class("pkcs11:type=public;object=a"), P11AGENT_URI_PUBLIC);
	assert_int_equal(p11agent_uri_class("pkcs11:type=cert"), P11AGENT_URI_CERT);
	assert_int_equal(p11agent_uri_class("pkcs11:type=secret-key"), P11AGENT_URI_OTHER);
	assert_int_equal(p11agent_uri_class("PKCS11:object=a;type=cert"), P11AGENT_URI_CERT);
	/* query attributes are not the object's type */
	assert_int_equal(p11agent_uri_class("pkcs11:object=a?type=cert"), P11AGENT_URI_ANY);
	assert_int_equal(p11agent_uri_class("pkcs11:object=type=cert"), P11AGENT_URI_ANY);
	assert_int_equal(p11agent_uri_class("pkcs11:xtype=cert"), P11AGENT_URI_ANY);
	assert_int_equal(p11agent_uri_class("pkcs11:type="), P11AGENT_URI_ANY);
	assert_int_equal(p11agent_uri_class("pkcs11:"), P11AGENT_URI_ANY);
	assert_int_equal(p11agent_uri_class("file:x"), P11AGENT_URI_OTHER);
	assert_int_equal(p11agent_uri_class(NULL), P11AGENT_URI_OTHER);
}

static void
test_hash_names(void **state)
{
	/* The digest names OpenSSL hands the provider (the table is common/hashalg.c). */
	assert_int_equal(p11a_hashalg_by_name("SHA256")->id, P11A_HASH_SHA256);
	assert_int_equal(p11a_hashalg_by_name("SHA2-256")->id, P11A_HASH_SHA256);
	assert_int_equal(p11a_hashalg_by_name("sha-384")->id, P11A_HASH_SHA384);
	assert_int_equal(p11a_hashalg_by_name("SHA1")->id, P11A_HASH_SHA1);
	assert_int_equal(p11a_hashalg_by_name("2.16.840.1.101.3.4.2.3")->id, P11A_HASH_SHA512);
	assert_null(p11a_hashalg_by_name("MD5"));
	assert_null(p11a_hashalg_by_name("SHA3-256"));
	assert_null(p11a_hashalg_by_name(""));
	assert_null(p11a_hashalg_by_name(NULL));
	assert_string_equal(p11a_hashalg_by_id(P11A_HASH_SHA224)->ossl_name, "SHA2-224");
	assert_null(p11a_hashalg_by_id(P11A_HASH_NONE));
	assert_int_equal(p11a_hash_from_len(32), P11A_HASH_SHA256);
	assert_int_equal(p11a_hash_from_len(33), -1);
	assert_string_equal(p11agent_kt_name(P11AGENT_KT_ED25519), "ED25519");
	assert_null(p11agent_kt_name(99));
}

static void
test_check_signature(void **state)
{
	/* SEQUENCE { INTEGER 1..., INTEGER 2... } */
	static const uint8_t ok_ec[] = { 0x30, 0x08, 0x02, 0x02, 0x01, 0x02, 0x02, 0x02, 0x03, 0x04 };
	static const uint8_t neg_ec[] = { 0x30, 0x08, 0x02, 0x02, 0x81, 0x02, 0x02, 0x02, 0x03, 0x04 };
	static const uint8_t pad_ec[] = { 0x30, 0x08, 0x02, 0x02, 0x00, 0x02, 0x02, 0x02, 0x03, 0x04 };
	static const uint8_t zero_ec[] = { 0x30, 0x07, 0x02, 0x01, 0x00, 0x02, 0x02, 0x03, 0x04 };
	static const uint8_t short_ec[] = { 0x30, 0x09, 0x02, 0x02, 0x01, 0x02, 0x02, 0x02, 0x03, 0x04 };
	static const uint8_t trail_ec[] = { 0x30, 0x08, 0x02, 0x02, 0x01, 0x02, 0x02, 0x02, 0x03, 0x04, 0x00 };
	static const uint8_t one_ec[] = { 0x30, 0x04, 0x02, 0x02, 0x01, 0x02 };
	static const uint8_t three_ec[] = { 0x30, 0x0c, 0x02, 0x02, 0x01, 0x02, 0x02, 0x02, 0x03, 0x04,
					    0x02, 0x02, 0x05, 0x06 };
	uint8_t rsa[256], ed[64];
	size_t i;

	memset(rsa, 0x5a, sizeof(rsa));
	memset(ed, 0x5a, sizeof(ed));
	assert_int_equal(p11agent_check_signature(P11A_SCHEME_RSA_PKCS1, rsa, 256, 256, 256), 0);
	assert_int_equal(p11agent_check_signature(P11A_SCHEME_RSA_PSS, rsa, 255, 256, 256), -P11A_E_MALFORMED);
	assert_int_equal(p11agent_check_signature(P11A_SCHEME_RSA_PSS, rsa, 256, 256, 100), -P11A_E_TOO_LARGE);
	assert_int_equal(p11agent_check_signature(P11A_SCHEME_EDDSA, ed, 64, 64, 64), 0);
	assert_int_equal(p11agent_check_signature(P11A_SCHEME_EDDSA, ed, 63, 64, 64), -P11A_E_MALFORMED);
	assert_int_equal(p11agent_check_signature(P11A_SCHEME_ECDSA, ok_ec, sizeof(ok_ec), 72, 72), 0);
	assert_int_equal(p11agent_check_signature(P11A_SCHEME_ECDSA, ok_ec, sizeof(ok_ec), 8, 72), -P11A_E_MALFORMED);
	assert_int_equal(p11agent_check_signature(P11A_SCHEME_ECDSA, neg_ec, sizeof(neg_ec), 72, 72), -P11A_E_MALFORMED);
	assert_int_equal(p11agent_check_signature(P11A_SCHEME_ECDSA, pad_ec, sizeof(pad_ec), 72, 72), -P11A_E_MALFORMED);
	assert_int_equal(p11agent_check_signature(P11A_SCHEME_ECDSA, zero_ec, sizeof(zero_ec), 72, 72), -P11A_E_MALFORMED);
	assert_int_equal(p11agent_check_signature(P11A_SCHEME_ECDSA, short_ec, sizeof(short_ec), 72, 72), -P11A_E_MALFORMED);
	assert_int_equal(p11agent_check_signature(P11A_SCHEME_ECDSA, trail_ec, sizeof(trail_ec), 72, 72), -P11A_E_MALFORMED);
	assert_int_equal(p11agent_check_signature(P11A_SCHEME_ECDSA, one_ec, sizeof(one_ec), 72, 72), -P11A_E_MALFORMED);
	assert_int_equal(p11agent_check_signature(P11A_SCHEME_ECDSA, three_ec, sizeof(three_ec), 72, 72), -P11A_E_MALFORMED);
	assert_int_equal(p11agent_check_signature(P11A_SCHEME_ECDSA, rsa, 72, 72, 72), -P11A_E_MALFORMED);
	assert_int_equal(p11agent_check_signature(P11A_SCHEME_ECDSA, NULL, 0, 72, 72), -P11A_E_MALFORMED);
	assert_int_equal(p11agent_check_signature(99, rsa, 256, 256, 256), -P11A_E_MALFORMED);
	/* every prefix of a good ECDSA signature is refused */
	for (i = 0; i < sizeof(ok_ec); i++)
		assert_int_not_equal(p11agent_check_signature(P11A_SCHEME_ECDSA, ok_ec, i, 72, 72), 0);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_match),
		cmocka_unit_test(test_match_damaged_records),
		cmocka_unit_test(test_match_wire_mutations),
		cmocka_unit_test(test_uri_class),
		cmocka_unit_test(test_hash_names),
		cmocka_unit_test(test_check_signature),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
