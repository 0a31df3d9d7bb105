/*
 * p11agent exec -- CMD [ARGS]: runs CMD with OpenSSL configured to use the
 * p11agent provider, without touching the system's openssl.cnf.
 *
 * It writes a configuration that includes the one OpenSSL would have read
 * (OPENSSL_CONF, else the system file), keeps that file's settings, and
 * activates the default and p11agent providers; points OPENSSL_CONF at
 * it and P11AGENT_SOCK at the agent; then execvp()s CMD.  The file goes
 * to a directory only this user can write ($XDG_RUNTIME_DIR/p11agent, else
 * $TMPDIR/p11agent-UID), named after a hash of its contents, so that
 * concurrent runs with different settings never share one.  Before it
 * runs CMD it loads that file itself and checks that the provider is
 * active: a module that does not load is an error here, not a key that
 * CMD cannot find later.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/conf.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>

#include "cli.h"
#include "paths.h"

#define EXEC_INIT       "p11agent_exec_init"
#define EXEC_PROVIDERS  "p11agent_exec_providers"
#define EXEC_DEFAULT    "p11agent_exec_default"
#define EXEC_P11AGENT   "p11agent_exec_p11agent"

static const char exec_usage[] =
	"Usage: p11agent exec [--module PATH] [--] COMMAND [ARGS...]\n"
	"\n"
	"Runs COMMAND with OpenSSL configured to use keys held by the agent:\n"
	"sets OPENSSL_CONF to a generated configuration that includes the one\n"
	"OpenSSL would read ($OPENSSL_CONF, else the system openssl.cnf) and\n"
	"activates the default and p11agent providers, and sets P11AGENT_SOCK.\n"
	"Then  openssl s_client -key 'pkcs11:...'  or  curl --key KEYREF.pem\n"
	"(see 'p11agent export-key') sign through the agent.\n"
	"\n"
	"Options:\n"
	"  -m, --module PATH  the provider module (default: the one installed\n"
	"                     with p11agent, " P11A_PROVIDER_MODULE ")\n"
	"  -h, --help         show this help\n";

/* Appends fmt to the growing configuration text. */
static int
emit(BIO *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static int
emit(BIO *b, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = BIO_vprintf(b, fmt, ap);
	va_end(ap);
	return n >= 0;
}

/* A value as the configuration parser reads it back: escape what it would interpret. */
static int
emit_value(BIO *b, const char *v)
{
	for (; *v != '\0'; v++) {
		switch (*v) {
		case '\\':
		case '$':
		case '#':
		case '"':
		case '\'':
			if (BIO_printf(b, "\\%c", *v) < 0)
				return 0;
			break;
		case '\n':
			if (BIO_puts(b, "\\n") < 0)
				return 0;
			break;
		case '\r':
			if (BIO_puts(b, "\\r") < 0)
				return 0;
			break;
		default:
			if (BIO_write(b, v, 1) != 1)
				return 0;
			break;
		}
	}
	return BIO_puts(b, "\n") >= 0;
}

/* Names we copy must read back as the same name. */
static int
plain_name(const char *s)
{
	if (*s == '\0')
		return 0;
	for (; *s != '\0'; s++) {
		if (!strchr("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-", *s))
			return 0;
	}
	return 1;
}

/* Copies section name of conf into b, minus the keys in skip (NULL-terminated). */
static int
copy_section(BIO *b, CONF *conf, const char *name, const char *const *skip)
{
	STACK_OF(CONF_VALUE) *sk;
	int i, j;

	if (conf == NULL || name == NULL || (sk = NCONF_get_section(conf, name)) == NULL)
		return 1;
	for (i = 0; i < sk_CONF_VALUE_num(sk); i++) {
		CONF_VALUE *cv = sk_CONF_VALUE_value(sk, i);
		int skipped = 0;

		for (j = 0; skip[j] != NULL; j++) {
			if (strcmp(cv->name, skip[j]) == 0)
				skipped = 1;
		}
		if (skipped)
			continue;
		if (!plain_name(cv->name)) {
			cli_err("exec: warning: not copying setting '%s' of section [%s]", cv->name, name);
			continue;
		}
		if (!emit(b, "%s = ", cv->name) || !emit_value(b, cv->value))
			return 0;
	}
	return 1;
}

/*
 * The configuration text.  base is the file to include (NULL: none);
 * conf its parsed contents.
 */
static int
build_config(BIO *b, const char *base, CONF *conf, const char *module)
{
	static const char *const skip_init[] = { "providers", NULL };
	static const char *const skip_provs[] = { "default", "p11agent", NULL };
	static const char *const skip_default[] = { "activate", NULL };
	const char *init = NULL, *provs = NULL, *deflt = NULL;

	if (conf != NULL) {
		init = NCONF_get_string(conf, NULL, "openssl_conf");
		if (init != NULL)
			provs = NCONF_get_string(conf, init, "providers");
		if (provs != NULL)
			deflt = NCONF_get_string(conf, provs, "default");
		ERR_clear_error();      /* absent settings are not errors */
	}
	if (!emit(b, "# Written by 'p11agent exec': %s plus the p11agent provider.\n",
		  base != NULL ? base : "OpenSSL's defaults"))
		return 0;
	if (base != NULL && (!emit(b, ".include ") || !emit_value(b, base)))
		return 0;
	if (!emit(b, "\n[default]\nopenssl_conf = " EXEC_INIT "\n\n[" EXEC_INIT "]\n") ||
	    !copy_section(b, conf, init, skip_init) ||
	    !emit(b, "providers = " EXEC_PROVIDERS "\n\n[" EXEC_PROVIDERS "]\n") ||
	    !copy_section(b, conf, provs, skip_provs) ||
	    !emit(b, "default = " EXEC_DEFAULT "\np11agent = " EXEC_P11AGENT "\n\n[" EXEC_DEFAULT "]\n") ||
	    !copy_section(b, conf, deflt, skip_default) ||
	    !emit(b, "activate = 1\n\n[" EXEC_P11AGENT "]\nactivate = 1\nmodule = ") ||
	    !emit_value(b, module))
		return 0;
	return 1;
}

/* A directory only we can write, for the generated file. */
static int
private_dir(char *out, size_t size)
{
	const char *xdg = secure_getenv("XDG_RUNTIME_DIR");
	const char *tmp = secure_getenv("TMPDIR");
	struct stat st;
	int n;

	if (xdg != NULL && *xdg == '/')
		n = snprintf(out, size, "%s/p11agent", xdg);
	else
		n = snprintf(out, size, "%s/p11agent-%lu", tmp != NULL && *tmp == '/' ? tmp : "/tmp",
			     (unsigned long)getuid());
	if (n < 0 || (size_t)n >= size) {
		cli_err("exec: directory name too long");
		return -1;
	}
	if (mkdir(out, 0700) != 0 && errno != EEXIST) {
		cli_err("exec: cannot create %s: %s", out, strerror(errno));
		return -1;
	}
	if (lstat(out, &st) != 0) {
		cli_err("exec: %s: %s", out, strerror(errno));
		return -1;
	}
	if (!S_ISDIR(st.st_mode) || st.st_uid != getuid() || (st.st_mode & 0022) != 0) {
		cli_err("exec: %s is not a directory that only you can write", out);
		return -1;
	}
	return 0;
}

/* Writes text to DIR/openssl-HASH.cnf (atomically); the path into out. */
static int
write_config(const char *text, size_t len, char *out, size_t size)
{
	char dir[PATH_MAX], tmp[PATH_MAX + 32];
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned int mdlen = 0;
	size_t off;
	ssize_t w;
	int fd, n;

	if (private_dir(dir, sizeof(dir)) != 0)
		return -1;
	if (EVP_Digest(text, len, md, &mdlen, EVP_sha256(), NULL) != 1 || mdlen < 8) {
		cli_err("exec: cannot hash the configuration");
		return -1;
	}
	n = snprintf(out, size, "%s/openssl-%02x%02x%02x%02x%02x%02x%02x%02x.cnf", dir,
		     md[0], md[1], md[2], md[3], md[4], md[5], md[6], md[7]);
	if (n < 0 || (size_t)n >= size ||
	    snprintf(tmp, sizeof(tmp), "%s/.openssl-XXXXXX", dir) >= (int)sizeof(tmp)) {
		cli_err("exec: path too long");
		return -1;
	}
	if ((fd = mkstemp(tmp)) < 0) {
		cli_err("exec: cannot create a file in %s: %s", dir, strerror(errno));
		return -1;
	}
	for (off = 0; off < len; off += (size_t)w) {
		w = write(fd, text + off, len - off);
		if (w < 0 && errno == EINTR) {
			w = 0;
			continue;
		}
		if (w <= 0) {
			cli_err("exec: writing %s: %s", tmp, strerror(errno));
			(void)close(fd);
			(void)unlink(tmp);
			return -1;
		}
	}
	if (fchmod(fd, 0644) != 0 || close(fd) != 0 || rename(tmp, out) != 0) {
		cli_err("exec: writing %s: %s", out, strerror(errno));
		(void)unlink(tmp);
		return -1;
	}
	return 0;
}

int
cmd_exec(struct cli_ctx *ctx, int argc, char **argv)
{
	static const struct option opts[] = {
		{ "module", required_argument, NULL, 'm' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 }
	};
	const char *module = P11A_PROVIDER_MODULE, *env;
	char *base = NULL, *text = NULL, *sock = NULL, *cwd = NULL, *conf_module = NULL;
	char path[PATH_MAX + 64];
	CONF *conf = NULL;
	BIO *b = NULL;
	long eline = -1, n;
	int ch, rc = CLI_EXIT_FAIL, saved;

	/* '+': options end at COMMAND; its own options are its own. */
	while ((ch = getopt_long(argc, argv, "+m:h", opts, NULL)) != -1) {
		switch (ch) {
		case 'm':
			if (*optarg == '\0')
				return cli_usage_err("exec", "--module: empty path");
			module = optarg;
			break;
		case 'h':
			fputs(exec_usage, stdout);
			return cli_finish_stdout(CLI_EXIT_OK);
		default:
			return cli_try_help("exec");
		}
	}
	if (optind >= argc)
		return cli_usage_err("exec", "a command to run is required");

	/* The configuration OpenSSL would have read, to keep its settings. */
	env = getenv("OPENSSL_CONF");
	if (env != NULL && *env != '\0')
		base = OPENSSL_strdup(env);
	else
		base = CONF_get1_default_config_file();
	if (base != NULL && access(base, R_OK) != 0) {
		if (env != NULL && *env != '\0') {
			cli_err("exec: OPENSSL_CONF=%s: %s", base, strerror(errno));
			goto out;
		}
		OPENSSL_free(base);     /* no system file: OpenSSL's defaults */
		base = NULL;
	}
	if (base != NULL) {
		if ((conf = NCONF_new(NULL)) == NULL || NCONF_load(conf, base, &eline) != 1) {
			cli_err("exec: cannot read %s%s", base, eline > 0 ? " (syntax error)" : "");
			goto out;
		}
		/* Already a p11agent exec configuration: use it as it is. */
		if ((env = NCONF_get_string(conf, NULL, "openssl_conf")) != NULL &&
		    strcmp(env, EXEC_INIT) == 0) {
			snprintf(path, sizeof(path), "%s", base);
			conf_module = cli_ossl_module(path);
			if (cli_ossl_check("exec", path, conf_module != NULL ? conf_module : "its module") != 0)
				goto out;
			goto run;
		}
		ERR_clear_error();
	}
	if ((b = BIO_new(BIO_s_mem())) == NULL || !build_config(b, base, conf, module) ||
	    (n = BIO_get_mem_data(b, &text)) <= 0 || text == NULL) {
		cli_err("exec: cannot build the OpenSSL configuration");
		goto out;
	}
	if (write_config(text, (size_t)n, path, sizeof(path)) != 0 ||
	    cli_ossl_check("exec", path, module) != 0)
		goto out;
run:
	/* The socket as an absolute path: COMMAND may change directory. */
	if (ctx->socket_path[0] != '/') {
		size_t len;

		if ((cwd = getcwd(NULL, 0)) == NULL) {
			cli_err("exec: current directory unknown: %s", strerror(errno));
			goto out;
		}
		len = strlen(cwd) + strlen(ctx->socket_path) + 2;
		if ((sock = malloc(len)) == NULL) {
			cli_err("exec: out of memory");
			goto out;
		}
		snprintf(sock, len, "%s/%s", cwd, ctx->socket_path);
	}
	if (setenv("OPENSSL_CONF", path, 1) != 0 ||
	    setenv("P11AGENT_SOCK", sock != NULL ? sock : ctx->socket_path, 1) != 0) {
		cli_err("exec: cannot set the environment: %s", strerror(errno));
		goto out;
	}
	fflush(NULL);
	execvp(argv[optind], argv + optind);
	saved = errno;
	cli_err("exec: %s: %s", argv[optind], strerror(saved));
	rc = saved == ENOENT ? 127 : 126;
out:
	BIO_free(b);
	NCONF_free(conf);
	OPENSSL_free(base);
	free(sock);
	free(cwd);
	free(conf_module);
	return rc;
}
