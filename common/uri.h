/*
 * RFC 7512 pkcs11: URIs for tokens and objects, built, parsed and matched
 * as p11-kit 0.24's URI functions do, but without linking libp11-kit
 * (only its pkcs11.h).  Used by the agent (on its inventory), its token
 * helpers (on what they enumerate) and clients (on a LIST reply).
 */
#ifndef P11A_URI_H
#define P11A_URI_H

#include <stddef.h>
#include <p11-kit/pkcs11.h>
#include "proto.h"

/*
 * Formats a token URI (model, manufacturer, serial, token) or an object
 * URI (those plus id, object label, type).  class is CKO_PRIVATE_KEY,
 * CKO_PUBLIC_KEY or CKO_CERTIFICATE.  Returns a malloc'd string or NULL.
 */
char *p11a_uri_format_token(const CK_TOKEN_INFO *ti);
char *p11a_uri_format_object(const CK_TOKEN_INFO *ti, CK_OBJECT_CLASS cls,
			const unsigned char *id, size_t id_len, const char *label);

/*
 * Parses uri once for repeated matching.  Returns NULL with *err set to
 * -P11A_E_URI when it is not a pkcs11: URI (-P11A_E_NOMEM when out of
 * memory).  As in p11-kit, a URI with an unknown path attribute, an
 * unknown type= or a value too long for its field parses but matches
 * nothing; query attributes (?pin-value=...) are checked and ignored.
 */
struct p11a_uri_matcher;
struct p11a_uri_matcher *p11a_uri_matcher_new(const char *uri, int *err);
void p11a_uri_matcher_free(struct p11a_uri_matcher *m);

/* 1 if the token record matches the URI's token part. */
int p11a_uri_match_token(const struct p11a_uri_matcher *m, const struct p11a_token *t);
/*
 * 1 if the key (on token t) matches: token part, CKA_ID (id=), label
 * (object=) and type= if given.  type=private and type=public match the
 * key's label; type=cert matches the certificate's label (cert_label);
 * no type= matches either label.  Other types never match.
 */
int p11a_uri_match_key(const struct p11a_uri_matcher *m, const struct p11a_token *t,
		  const struct p11a_key *k);

/* The token record of l whose uri equals token_uri, or NULL. */
const struct p11a_token *p11a_list_find_token(const struct p11a_list_reply *l,
					      const char *token_uri);
/*
 * Keys of l matching uri (p11a_uri_match_key against each key's token
 * record; a key whose token is not in l never matches): writes up to max
 * indexes into idx and the full count into *n (which may exceed max).
 * -P11A_E_URI when uri is not a pkcs11: URI (*n is then 0).
 */
int p11a_list_match_keys(const struct p11a_list_reply *l, const char *uri,
			 uint32_t *idx, size_t max, size_t *n);

/*
 * For errors that name a few of the objects a URI matches: appends uri to
 * the list in buf (size bytes, NUL-terminated), after ", " unless the
 * list is empty, when it fits whole.  0 if it did; -1 if not (buf is then
 * unchanged), or for a NULL or empty uri.
 */
int p11a_uri_list_add(char *buf, size_t size, const char *uri);

#endif
