/*
 * Checks that an OpenSSL configuration really loads the p11agent provider,
 * for 'p11agent exec' (before it runs the command) and 'p11agent setup
 * openssl'.  A configuration that names a missing or broken module would
 * otherwise only show up later, as a program that cannot find a key.
 */
#include "config.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/conf.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/provider.h>

#include "cli.h"

/* The oldest error on OpenSSL's stack (the cause), as "reason (data)". */
static void
first_error(char *out, size_t size)
{
	const char *data = NULL;
	unsigned long e;
	int flags = 0;
	char reason[256];

	snprintf(out, size, "no reason given");
	e = ERR_get_error_all(NULL, NULL, NULL, &data, &flags);
	if (e == 0)
		return;
	ERR_error_string_n(e, reason, sizeof(reason));
	if (ERR_reason_error_string(e) != NULL)
		snprintf(reason, sizeof(reason), "%s", ERR_reason_error_string(e));
	if (data != NULL && (flags & ERR_TXT_STRING) && *data != '\0')
		snprintf(out, size, "%s (%s)", reason, data);
	else
		snprintf(out, size, "%s", reason);
	ERR_clear_error();
}

/*
 * Why module did not activate.  OpenSSL 3.0 drops a provider that fails
 * to load from its configuration without an error, so ask the dynamic
 * loader the same question.
 */
static void
module_error(const char *module, const char *conf, char *out, size_t size)
{
	void *h;

	if (strchr(module, '/') != NULL) {
		if ((h = dlopen(module, RTLD_NOW | RTLD_LOCAL)) == NULL) {
			const char *e = dlerror();

			snprintf(out, size, "%s", e != NULL ? e : "it cannot be loaded");
			return;
		}
		if (dlsym(h, "OSSL_provider_init") == NULL) {
			snprintf(out, size, "it is not an OpenSSL provider (no OSSL_provider_init)");
			(void)dlclose(h);
			return;
		}
		(void)dlclose(h);
	}
	snprintf(out, size, "OpenSSL did not activate it through %s", conf);
}

int
cli_ossl_check(const char *verb, const char *conf, const char *module)
{
	OSSL_LIB_CTX *lib;
	char why[768];
	int rc = -1;

	ERR_clear_error();
	if ((lib = OSSL_LIB_CTX_new()) == NULL) {
		cli_err("%s: out of memory", verb);
		return -1;
	}
	if (OSSL_LIB_CTX_load_config(lib, conf) != 1) {
		first_error(why, sizeof(why));
		cli_err("%s: the p11agent provider did not load from %s: %s (configuration %s)",
			verb, module, why, conf);
		goto out;
	}
	if (OSSL_PROVIDER_available(lib, "p11agent") != 1) {
		if (ERR_peek_error() != 0)
			first_error(why, sizeof(why));
		else
			module_error(module, conf, why, sizeof(why));
		cli_err("%s: the p11agent provider did not load from %s: %s", verb, module, why);
		goto out;
	}
	if (OSSL_PROVIDER_available(lib, "default") != 1) {
		cli_err("%s: configuration %s activates p11agent but not OpenSSL's default provider",
			verb, conf);
		goto out;
	}
	rc = 0;
out:
	ERR_clear_error();
	OSSL_LIB_CTX_free(lib);
	return rc;
}

char *
cli_ossl_module(const char *conf)
{
	const char *init, *provs, *sect, *mod;
	char *res = NULL;
	CONF *c;
	long eline = -1;

	if ((c = NCONF_new(NULL)) == NULL)
		return NULL;
	if (NCONF_load(c, conf, &eline) == 1 &&
	    (init = NCONF_get_string(c, NULL, "openssl_conf")) != NULL &&
	    (provs = NCONF_get_string(c, init, "providers")) != NULL &&
	    (sect = NCONF_get_string(c, provs, "p11agent")) != NULL &&
	    (mod = NCONF_get_string(c, sect, "module")) != NULL)
		res = strdup(mod);
	ERR_clear_error();      /* absent settings are not errors */
	NCONF_free(c);
	return res;
}
