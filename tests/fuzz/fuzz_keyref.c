/*
 * Fuzz target for the key-reference decoder of the OpenSSL provider
 * (common/keyref.c): the DER a "P11AGENT KEY" PEM file holds, which any
 * program that reads a key file may be handed.  A decoded reference must
 * encode again and decode to the same URI and public key.
 */
#include "config.h"
#include "keyref.h"
#include "p11a.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct p11agent_keyref ref, again;
	size_t total = 0;
	uint8_t *der = NULL;
	size_t der_len = 0;

	(void)p11agent_der_element_len(data, size, &total);
	if (p11agent_keyref_decode(data, size, &ref) != 0)
		return 0;
	if (ref.uri == NULL || strncasecmp(ref.uri, "pkcs11:", 7) != 0)
		abort();
	if (p11agent_keyref_encode(ref.uri, ref.spki, ref.spki_len, &der, &der_len) == 0) {
		if (p11agent_keyref_decode(der, der_len, &again) != 0)
			abort();
		if (strcmp(again.uri, ref.uri) != 0 || again.spki_len != ref.spki_len ||
		    (ref.spki_len && memcmp(again.spki, ref.spki, ref.spki_len) != 0))
			abort();
		p11agent_keyref_clear(&again);
		free(der);
	}
	p11agent_keyref_clear(&ref);
	return 0;
}
