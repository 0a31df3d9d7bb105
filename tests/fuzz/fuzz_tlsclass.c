/*
 * Fuzz target for the TLS-content classifier (common/tlsclass.c), which
 * reads every SIGN input for a tls-only key: any program of the user can
 * send it anything.  Invariants: a digest is always "digest"; a class has
 * a name; a TLS 1.3 class means exactly the 64-space, context-string
 * layout; a TLS 1.0-1.2 class starts with a ClientHello and ends with a
 * complete ClientKeyExchange.
 */
#include "config.h"
#include "tlsclass.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	enum p11a_tlsclass c = p11a_tls_classify(data, size, 0);
	const char *name = p11a_tlsclass_name(c);

	if (p11a_tls_classify(data, size, 1) != P11A_TLS_DIGEST)
		abort();
	if (name == NULL || strcmp(name, "?") == 0)
		abort();
	switch (c) {
	case P11A_TLS_13_CLIENT:
	case P11A_TLS_13_SERVER:
		if (size != 64 + 33 + 1 + 32 && size != 64 + 33 + 1 + 48)
			abort();
		for (size_t i = 0; i < 64; i++)
			if (data[i] != 0x20)
				abort();
		if (memcmp(data + 64, c == P11A_TLS_13_CLIENT ? "TLS 1.3, client" :
			   "TLS 1.3, server", 15) != 0 || data[97] != 0)
			abort();
		break;
	case P11A_TLS_12_CLIENT:
	case P11A_TLS_10_CLIENT:
		if (size < 4 || data[0] != 1)
			abort();
		break;
	case P11A_TLS_DIGEST:
		abort();
	case P11A_TLS_RAW:
		break;
	}
	if (p11a_tlsclass_is_client(c) != (c != P11A_TLS_RAW && c != P11A_TLS_13_SERVER))
		abort();
	return 0;
}
