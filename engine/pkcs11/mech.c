/*
 * Mechanisms the module offers and the SIGN request each one becomes.
 * Only signing mechanisms: no decryption, no raw RSA (CKM_RSA_X_509 would
 * be a decryption oracle).
 */
#include "config.h"

#include "p11m.h"

#define RSA_PKCS1(ckm, h)  { ckm, P11A_KEY_RSA, P11A_SCHEME_RSA_PKCS1, h, P11A_INPUT_MESSAGE, 0 }
#define RSA_PSS(ckm, h)    { ckm, P11A_KEY_RSA, P11A_SCHEME_RSA_PSS, h, P11A_INPUT_MESSAGE, 1 }
#define ECDSA(ckm, h)      { ckm, P11A_KEY_EC, P11A_SCHEME_ECDSA, h, P11A_INPUT_MESSAGE, 0 }

const struct p11m_mech p11m_mechs[] = {
	/* CKM_RSA_PKCS: the caller's DigestInfo (or TLS 1.0's MD5+SHA1) as is */
	{ CKM_RSA_PKCS, P11A_KEY_RSA, P11A_SCHEME_RSA_PKCS1, P11A_HASH_NONE, P11A_INPUT_RAW, 0 },
	/* CKM_RSA_PKCS_PSS: a digest made with the parameters' hash */
	{ CKM_RSA_PKCS_PSS, P11A_KEY_RSA, P11A_SCHEME_RSA_PSS, P11A_HASH_NONE, P11A_INPUT_DIGEST, 1 },
	RSA_PKCS1(CKM_SHA1_RSA_PKCS, P11A_HASH_SHA1),
	RSA_PKCS1(CKM_SHA224_RSA_PKCS, P11A_HASH_SHA224),
	RSA_PKCS1(CKM_SHA256_RSA_PKCS, P11A_HASH_SHA256),
	RSA_PKCS1(CKM_SHA384_RSA_PKCS, P11A_HASH_SHA384),
	RSA_PKCS1(CKM_SHA512_RSA_PKCS, P11A_HASH_SHA512),
	RSA_PSS(CKM_SHA1_RSA_PKCS_PSS, P11A_HASH_SHA1),
	RSA_PSS(CKM_SHA224_RSA_PKCS_PSS, P11A_HASH_SHA224),
	RSA_PSS(CKM_SHA256_RSA_PKCS_PSS, P11A_HASH_SHA256),
	RSA_PSS(CKM_SHA384_RSA_PKCS_PSS, P11A_HASH_SHA384),
	RSA_PSS(CKM_SHA512_RSA_PKCS_PSS, P11A_HASH_SHA512),
	/* CKM_ECDSA: a digest; its length tells the hash */
	{ CKM_ECDSA, P11A_KEY_EC, P11A_SCHEME_ECDSA, P11A_HASH_NONE, P11A_INPUT_DIGEST, 0 },
	ECDSA(CKM_ECDSA_SHA1, P11A_HASH_SHA1),
	ECDSA(CKM_ECDSA_SHA224, P11A_HASH_SHA224),
	ECDSA(CKM_ECDSA_SHA256, P11A_HASH_SHA256),
	ECDSA(CKM_ECDSA_SHA384, P11A_HASH_SHA384),
	ECDSA(CKM_ECDSA_SHA512, P11A_HASH_SHA512),
	{ CKM_EDDSA, P11A_KEY_ED25519, P11A_SCHEME_EDDSA, P11A_HASH_NONE, P11A_INPUT_MESSAGE, 0 },
};

const size_t p11m_nmechs = sizeof(p11m_mechs) / sizeof(p11m_mechs[0]);

const struct p11m_mech *
p11m_mech_find(CK_MECHANISM_TYPE type)
{
	size_t i;

	for (i = 0; i < p11m_nmechs; i++) {
		if (p11m_mechs[i].type == type)
			return &p11m_mechs[i];
	}
	return NULL;
}

void
p11m_mech_info(const struct p11m_mech *m, CK_MECHANISM_INFO *info)
{
	info->flags = CKF_HW | CKF_SIGN;
	switch (m->keytype) {
	case P11A_KEY_RSA:
		info->ulMinKeySize = 1024;
		info->ulMaxKeySize = 16384;
		break;
	case P11A_KEY_EC:
		info->ulMinKeySize = 256;
		info->ulMaxKeySize = 521;
		info->flags |= CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS;
		break;
	default:
		info->ulMinKeySize = 255;
		info->ulMaxKeySize = 255;
		break;
	}
}

CK_RV
p11m_rv_from_err(int err)
{
	if (err < 0)
		err = -err;
	switch (err) {
	case P11A_OK: return CKR_OK;
	case P11A_E_NOMEM: return CKR_HOST_MEMORY;
	case P11A_E_LOCKED: return CKR_USER_NOT_LOGGED_IN;
	case P11A_E_PIN_INCORRECT: return CKR_PIN_INCORRECT;
	case P11A_E_PIN_LOCKED: return CKR_PIN_LOCKED;
	case P11A_E_PIN_INVALID: return CKR_PIN_INVALID;
	case P11A_E_TOKEN_NOT_PRESENT: return CKR_DEVICE_REMOVED;
	case P11A_E_NO_SUCH_KEY:
	case P11A_E_AMBIGUOUS:
	case P11A_E_URI:
		return CKR_KEY_HANDLE_INVALID;
	case P11A_E_UNSUPPORTED: return CKR_MECHANISM_INVALID;
	case P11A_E_POLICY: return CKR_FUNCTION_REJECTED;
	case P11A_E_NOT_CONFIRMED: return CKR_FUNCTION_REJECTED;
	/* The agent asks for the PIN itself; the caller cannot give it one. */
	case P11A_E_CONTEXT_PIN: return CKR_FUNCTION_REJECTED;
	case P11A_E_CANCELLED: return CKR_FUNCTION_CANCELED;
	case P11A_E_BAD_REQUEST: return CKR_DATA_LEN_RANGE;
	case P11A_E_TOO_LARGE: return CKR_DATA_LEN_RANGE;
	case P11A_E_NOT_RUNNING:
	case P11A_E_IO:
	case P11A_E_TIMEOUT:
	case P11A_E_TOKEN:
	case P11A_E_HELPER:
	case P11A_E_BUSY:
	case P11A_E_DENIED:
		return CKR_DEVICE_ERROR;
	default:
		return CKR_FUNCTION_FAILED;
	}
}
