/*
 * p11agent-pkcs11.so: a PKCS#11 front-end module that forwards to
 * p11agentd.  GnuTLS (git, wget), NSS (Chromium, Firefox) and anything
 * else that loads PKCS#11 modules sees one slot per agent token, with the
 * certificates, public keys and private keys the agent lists; signing is
 * one SIGN request to the agent.  The module never calls another PKCS#11
 * module, never decrypts, and holds no key material.
 *
 * Files: module.c (entry points, slots, sessions, refresh from LIST),
 * attrs.c (object attributes built from a LIST key record), mech.c
 * (mechanisms and their mapping onto SIGN schemes).
 */
#ifndef P11M_H
#define P11M_H

#include <stddef.h>
#include <stdint.h>
#include <p11-kit/pkcs11.h>

#include "p11a.h"
#include "proto.h"

/* One attribute value as the module reports it (CK_BBOOL, CK_ULONG or bytes). */
struct p11m_attr {
	CK_ATTRIBUTE_TYPE type;
	uint8_t *val;
	size_t len;
};

/*
 * One object: a certificate, public key or private key of an agent key.
 * Objects keep their handle for the life of the module (identity is slot,
 * class and the agent's key URI); one the agent stops listing is marked
 * not live and its handle becomes invalid until it comes back.
 */
struct p11m_obj {
	CK_OBJECT_HANDLE handle;
	CK_SLOT_ID slot;
	CK_OBJECT_CLASS cls;
	char *key_uri;               /* the agent's private-key URI: SIGN names it */
	int live;
	int keytype;                 /* enum p11a_keytype */
	unsigned bits;
	size_t sig_len;              /* exact PKCS#11 signature size */
	size_t field_len;            /* ECDSA: bytes of r and of s */
	struct p11m_attr *attrs;
	size_t nattrs;
};

/*
 * Fills o->attrs (freeing the old ones), o->keytype, o->bits, o->sig_len
 * and o->field_len for class cls of key k.  Returns CKR_OK,
 * CKR_HOST_MEMORY, or CKR_GENERAL_ERROR when the key's SPKI or certificate
 * cannot be parsed (the caller skips the object).
 */
CK_RV p11m_obj_build(struct p11m_obj *o, CK_OBJECT_CLASS cls, const struct p11a_key *k);
void p11m_obj_attrs_free(struct p11m_obj *o);
const struct p11m_attr *p11m_obj_attr(const struct p11m_obj *o, CK_ATTRIBUTE_TYPE type);
/* 1 when type is secret material of a private key (CKR_ATTRIBUTE_SENSITIVE). */
int p11m_attr_is_sensitive(CK_OBJECT_CLASS cls, CK_ATTRIBUTE_TYPE type);

/* A mechanism and how it maps onto a SIGN request. */
struct p11m_mech {
	CK_MECHANISM_TYPE type;
	int keytype;                 /* enum p11a_keytype */
	uint8_t scheme;              /* enum p11a_scheme */
	uint8_t hash;                /* enum p11a_hash; NONE = from parameters or data */
	uint8_t input;               /* enum p11a_input */
	int pss_params;              /* CK_RSA_PKCS_PSS_PARAMS required */
};

extern const struct p11m_mech p11m_mechs[];
extern const size_t p11m_nmechs;
const struct p11m_mech *p11m_mech_find(CK_MECHANISM_TYPE type);
void p11m_mech_info(const struct p11m_mech *m, CK_MECHANISM_INFO *info);

/* Agent error (negative or positive P11A_E_*) -> CK_RV for a signing call. */
CK_RV p11m_rv_from_err(int err);

#endif
