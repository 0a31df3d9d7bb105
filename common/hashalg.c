/*
 * The hash table; see hashalg.h.
 */
#include "config.h"

#include <strings.h>

#include <openssl/evp.h>

#include "p11a.h"
#include "hashalg.h"

#define NALIAS 3

static const struct row {
	struct p11a_hashalg a;
	const char *alias[NALIAS];      /* other spellings; NULL-padded */
} rows[] = {
	{ { P11A_HASH_SHA1, "sha1", "SHA1", 20, CKM_SHA_1, CKG_MGF1_SHA1, EVP_sha1 },
	  { "SHA-1", "1.3.14.3.2.26", NULL } },
	{ { P11A_HASH_SHA224, "sha224", "SHA2-224", 28, CKM_SHA224, CKG_MGF1_SHA224, EVP_sha224 },
	  { "SHA-224", "2.16.840.1.101.3.4.2.4", NULL } },
	{ { P11A_HASH_SHA256, "sha256", "SHA2-256", 32, CKM_SHA256, CKG_MGF1_SHA256, EVP_sha256 },
	  { "SHA-256", "2.16.840.1.101.3.4.2.1", NULL } },
	{ { P11A_HASH_SHA384, "sha384", "SHA2-384", 48, CKM_SHA384, CKG_MGF1_SHA384, EVP_sha384 },
	  { "SHA-384", "2.16.840.1.101.3.4.2.2", NULL } },
	{ { P11A_HASH_SHA512, "sha512", "SHA2-512", 64, CKM_SHA512, CKG_MGF1_SHA512, EVP_sha512 },
	  { "SHA-512", "2.16.840.1.101.3.4.2.3", NULL } },
};

#define NROWS (sizeof(rows) / sizeof(rows[0]))

const struct p11a_hashalg *
p11a_hashalg_by_id(int id)
{
	size_t i;

	for (i = 0; i < NROWS; i++) {
		if (rows[i].a.id == id)
			return &rows[i].a;
	}
	return NULL;
}

const struct p11a_hashalg *
p11a_hashalg_by_ckm(CK_MECHANISM_TYPE ckm)
{
	size_t i;

	for (i = 0; i < NROWS; i++) {
		if (rows[i].a.ckm == ckm)
			return &rows[i].a;
	}
	return NULL;
}

const struct p11a_hashalg *
p11a_hashalg_by_mgf(CK_RSA_PKCS_MGF_TYPE mgf)
{
	size_t i;

	for (i = 0; i < NROWS; i++) {
		if (rows[i].a.mgf == mgf)
			return &rows[i].a;
	}
	return NULL;
}

const struct p11a_hashalg *
p11a_hashalg_by_len(size_t len)
{
	size_t i;

	for (i = 0; i < NROWS; i++) {
		if (rows[i].a.len == len)
			return &rows[i].a;
	}
	return NULL;
}

const struct p11a_hashalg *
p11a_hashalg_by_name(const char *name)
{
	size_t i, j;

	if (name == NULL)
		return NULL;
	for (i = 0; i < NROWS; i++) {
		if (strcasecmp(name, rows[i].a.name) == 0 ||
		    strcasecmp(name, rows[i].a.ossl_name) == 0)
			return &rows[i].a;
		for (j = 0; j < NALIAS && rows[i].alias[j] != NULL; j++) {
			if (strcasecmp(name, rows[i].alias[j]) == 0)
				return &rows[i].a;
		}
	}
	return NULL;
}

static int
id_of(const struct p11a_hashalg *a)
{
	return a != NULL ? a->id : -1;
}

int
p11a_hash_from_ckm(CK_MECHANISM_TYPE ckm)
{
	return id_of(p11a_hashalg_by_ckm(ckm));
}

int
p11a_hash_from_mgf(CK_RSA_PKCS_MGF_TYPE mgf)
{
	return id_of(p11a_hashalg_by_mgf(mgf));
}

int
p11a_hash_from_len(size_t len)
{
	return id_of(p11a_hashalg_by_len(len));
}
