/*
 * p11agent setup openssl: checks that OpenSSL loads the p11agent provider
 * through the configuration snippet installed with this p11agent, and
 * prints the lines that enable it (system-wide, per user, per command).
 * It changes no file: the system openssl.cnf is the administrator's.
 */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "cli.h"
#include "paths.h"

int
cli_setup_openssl(const char *conf)
{
	const char *dir;
	char *module;
	int rc = CLI_EXIT_FAIL;

	if (conf == NULL)
		conf = P11A_OPENSSL_SNIPPET;
	if (access(conf, R_OK) != 0) {
		cli_err("setup openssl: %s: %s (installed by 'make install' or the p11agent-provider package)",
			conf, strerror(errno));
		return CLI_EXIT_FAIL;
	}
	if ((module = cli_ossl_module(conf)) == NULL) {
		cli_err("setup openssl: %s does not configure a p11agent provider module", conf);
		return CLI_EXIT_FAIL;
	}
	if (cli_ossl_check("setup openssl", conf, module) != 0)
		goto out;
	dir = OPENSSL_info(OPENSSL_INFO_CONFIG_DIR);
	printf("OpenSSL loads the p11agent provider %s\n"
	       "through %s.\n"
	       "\n"
	       "For every OpenSSL program, add as the last line of %s/openssl.cnf:\n"
	       "    .include %s\n"
	       "For your own programs (instead of the system openssl.cnf), e.g. in ~/.profile:\n"
	       "    export OPENSSL_CONF=%s\n"
	       "For one command (the system openssl.cnf plus the provider):\n"
	       "    p11agent exec -- COMMAND\n",
	       module, conf, dir != NULL ? dir : "OPENSSLDIR", conf, conf);
	rc = CLI_EXIT_OK;
out:
	free(module);
	return cli_finish_stdout(rc);
}
