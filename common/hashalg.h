/*
 * The hash algorithms SIGN knows, one row each: the protocol's id and
 * name, OpenSSL's name and digest, the PKCS#11 digest mechanism and MGF1
 * id, and the digest length.  Every client (the provider, the PKCS#11
 * module, the CLI) and the agent's token code translate between these
 * vocabularies through this one table.
 */
#ifndef P11A_HASHALG_H
#define P11A_HASHALG_H

#include <stddef.h>
#include <p11-kit/pkcs11.h>
#include <openssl/types.h>

struct p11a_hashalg {
	int id;                         /* enum p11a_hash (wire value), never NONE */
	const char *name;               /* the protocol's and the CLI's name: "sha256" */
	const char *ossl_name;          /* OpenSSL's canonical name (EVP_MD_fetch): "SHA2-256" */
	size_t len;                     /* digest bytes */
	CK_MECHANISM_TYPE ckm;          /* PKCS#11 digest mechanism: CKM_SHA256 */
	CK_RSA_PKCS_MGF_TYPE mgf;       /* PKCS#11 MGF1 id: CKG_MGF1_SHA256 */
	const EVP_MD *(*md)(void);      /* OpenSSL's built-in digest: EVP_sha256 */
};

/*
 * Lookups.  Each returns the row, or NULL when nothing matches (P11A_HASH_NONE
 * included: it is no algorithm).  The rows are static; never freed.
 */
const struct p11a_hashalg *p11a_hashalg_by_id(int id);
const struct p11a_hashalg *p11a_hashalg_by_ckm(CK_MECHANISM_TYPE ckm);
const struct p11a_hashalg *p11a_hashalg_by_mgf(CK_RSA_PKCS_MGF_TYPE mgf);
/* The digest length names the hash (20, 28, 32, 48, 64 bytes). */
const struct p11a_hashalg *p11a_hashalg_by_len(size_t len);
/*
 * Case-insensitive: the protocol's name ("sha256"), OpenSSL's names and
 * aliases ("SHA256", "SHA2-256", "SHA-256") and the dotted OID
 * ("2.16.840.1.101.3.4.2.1").  NULL name: NULL.
 */
const struct p11a_hashalg *p11a_hashalg_by_name(const char *name);

/* Shorthands for callers that keep the id: the id, or -1 when nothing matches. */
int p11a_hash_from_ckm(CK_MECHANISM_TYPE ckm);
int p11a_hash_from_mgf(CK_RSA_PKCS_MGF_TYPE mgf);
int p11a_hash_from_len(size_t len);

#endif
