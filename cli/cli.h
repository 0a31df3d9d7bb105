/*
 * p11agent command-line tool: shared declarations.
 *
 * Each verb lives in its own cmd_*.c and is called with argv[0] set to
 * "p11agent VERB" (getopt's name in its messages) and optind reset to 0;
 * it parses its own options with getopt_long and returns an exit status: CLI_EXIT_OK,
 * CLI_EXIT_FAIL or CLI_EXIT_USAGE.  Verbs print their own errors through
 * cli_err() and friends, which write "p11agent: <what>: <why>" to stderr.
 */
#ifndef P11A_CLI_H
#define P11A_CLI_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "p11a.h"
#include "proto.h"
#include "client.h"
#include "text.h"

#define CLI_EXIT_OK     0
#define CLI_EXIT_FAIL   1
#define CLI_EXIT_USAGE  2

#define CLI_PROG "p11agent"

/* Global options, set by main() before the verb runs. */
struct cli_ctx {
	const char *socket_path;    /* --socket, or the default path */
	int timeout_ms;             /* --timeout in ms, 0 = library default */
};

/* Verb entry points (cmd_*.c). */
int cmd_status(struct cli_ctx *ctx, int argc, char **argv);
int cmd_log(struct cli_ctx *ctx, int argc, char **argv);
int cmd_list(struct cli_ctx *ctx, int argc, char **argv);
int cmd_unlock(struct cli_ctx *ctx, int argc, char **argv);
int cmd_lock(struct cli_ctx *ctx, int argc, char **argv);
int cmd_sign(struct cli_ctx *ctx, int argc, char **argv);
int cmd_pubkey(struct cli_ctx *ctx, int argc, char **argv);
int cmd_export_cert(struct cli_ctx *ctx, int argc, char **argv);
int cmd_env(struct cli_ctx *ctx, int argc, char **argv);
int cmd_export_key(struct cli_ctx *ctx, int argc, char **argv);
int cmd_exec(struct cli_ctx *ctx, int argc, char **argv);
int cmd_setup(struct cli_ctx *ctx, int argc, char **argv);
int cmd_updatestartuptty(struct cli_ctx *ctx, int argc, char **argv);
/* 'p11agent setup openssl' (cmd_setup_openssl.c); conf NULL: the installed snippet. */
int cli_setup_openssl(const char *conf);
/* firefox-policy: print (file NULL, !system) or merge into policies.json. */
int cli_setup_firefox(const char *name, const char *mod, const char *file, int system,
		      int remove, int dry_run);
/* setup git / chromium-policy (cmd_setup_client.c); see 'p11agent setup --help'. */
int cli_setup_git(const struct cli_ctx *ctx, const char *key_uri, const char *url, int system,
		  int dry_run);
int cli_setup_chromium(const struct cli_ctx *ctx, const char *key_uri, const char *url,
		       int system, int dry_run);
/* Runs argv (no shell), its output on stderr (none when quiet); its exit status or -1. */
int cli_run_tool(char *const argv[], int quiet);

/* ------------------------------------------------------------ OpenSSL configuration */

/*
 * Loads the OpenSSL configuration file conf into a private library
 * context, as a program run with OPENSSL_CONF=conf would, and checks that
 * it activates the p11agent and default providers.  Returns 0, or prints
 * "VERB: the p11agent provider did not load from MODULE: why" and
 * returns -1.  module only names the provider file in the message.
 */
int cli_ossl_check(const char *verb, const char *conf, const char *module);

/*
 * The "module" setting of the p11agent provider in configuration conf
 * (openssl_conf -> providers -> p11agent -> module), malloc'd; NULL when
 * the file does not set one.
 */
char *cli_ossl_module(const char *conf);

/* ------------------------------------------------------------ messages (util.c) */

/*
 * Prints "p11agent: " fmt "\n" to stderr.  Control characters in the
 * result (which may carry token labels or agent text) are shown as '?'
 * so that nothing a token says can drive the terminal.
 */
void cli_err(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* As cli_err(), then "Try 'p11agent VERB --help'."; returns CLI_EXIT_USAGE. */
int cli_usage_err(const char *verb, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

/* Prints "Try 'p11agent VERB --help'." after getopt's own complaint; returns CLI_EXIT_USAGE. */
int cli_try_help(const char *verb);

/*
 * Reports a failed request as "p11agent: <what>: <why>" where why is the
 * agent's ERROR text (p11a_client_last_error) when c is not NULL and has
 * one, else p11a_strerror(err).  Returns CLI_EXIT_FAIL.
 */
int cli_fail(struct p11a_client *c, int err, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* p11a_text_scrub() (text.h) on every text field of a LIST or STATUS reply. */
void cli_sanitize_token(struct p11a_token *t);
void cli_sanitize_key(struct p11a_key *k);

/* ------------------------------------------------------------ agent (util.c) */

/*
 * Connects to the agent at ctx->socket_path and says HELLO.  On failure
 * prints why ("agent not running at PATH", ...) and returns CLI_EXIT_FAIL
 * with *out NULL; on success returns CLI_EXIT_OK.
 */
int cli_connect(const struct cli_ctx *ctx, struct p11a_client **out);

/*
 * Fetches LIST into *reply (cleared by the caller with p11a_msg_clear).
 * Prints the error and returns CLI_EXIT_FAIL on failure.
 */
int cli_list(struct p11a_client *c, struct p11a_msg *reply);

/*
 * Finds the one key of l that matches uri (p11a_uri_match_key).  Returns
 * CLI_EXIT_OK with *out set, CLI_EXIT_USAGE for a URI that does not
 * parse, CLI_EXIT_FAIL for none or several matches; errors are printed.
 */
int cli_find_key(const struct p11a_list_reply *l, const char *uri,
		 const struct p11a_key **out);

/* "RSA 2048", "EC P-256", "Ed25519" into out. */
void cli_key_desc(const struct p11a_key *k, char *out, size_t out_size);

/* Lower-case hex of data into a new string (malloc); NULL on ENOMEM. */
char *cli_hex(const uint8_t *data, size_t len);

/* ------------------------------------------------------------ files (input.c) */

/*
 * Reads all of path (NULL or "-" = stdin) into a malloc'd block, as
 * signing input (common/sigin.h): input longer than P11A_SIGN_MSG_MAX
 * bytes is an error, unless hash_if_larger names a hash (enum p11a_hash,
 * not NONE): then the whole input is hashed with it here, *data holds the
 * digest and *hashed is set.  Prints the error and returns
 * CLI_EXIT_FAIL; CLI_EXIT_OK with *data (caller frees) and *len.
 */
int cli_read_input(const char *path, int hash_if_larger, uint8_t **data, size_t *len,
		   int *hashed);

/* write(2) until all of data is written (EINTR retried); 0, or -1 with errno. */
int cli_write_all(int fd, const void *data, size_t len);

/*
 * Writes data to path (NULL or "-" = stdout).  When binary is set and
 * the output would be a terminal it refuses (check that early with
 * cli_refuse_binary_tty()).  Prints the error and returns CLI_EXIT_FAIL.
 */
int cli_write_output(const char *path, const void *data, size_t len, int binary);

/*
 * 1 (after printing why) if path names stdout and stdout is a terminal,
 * so binary output would land on it; 0 otherwise.
 */
int cli_refuse_binary_tty(const char *path, const char *what);

/*
 * Flushes stdout and reports a write error; returns rc unchanged when
 * everything was written, CLI_EXIT_FAIL otherwise.  A reader that went
 * away (EPIPE) fails silently, like a program killed by SIGPIPE.
 */
int cli_finish_stdout(int rc);

/* ------------------------------------------------------------ PINs (pin.c) */

/*
 * PINs are read into a caller's char pin[P11A_PIN_MAX + 1] with raw
 * read(2) (no stdio buffers that would keep a copy), NUL-terminated,
 * trailing "\n" or "\r\n" stripped; *len excludes the NUL.  On failure
 * the buffer is wiped, the reason printed, CLI_EXIT_FAIL returned.  The
 * caller wipes the buffer with p11a_wipe() after use.
 */

/*
 * Prompts on /dev/tty with echo off.  The terminal state is restored on
 * every path; a SIGINT/SIGTERM/SIGHUP/SIGQUIT during the prompt restores
 * it and then takes its usual effect; SIGTSTP restores, stops, and asks
 * again after SIGCONT.  Only Enter ends the PIN: end of input (Ctrl-D)
 * first is a failure.  A PIN longer than P11A_PIN_MAX is refused, never
 * cut short.
 */
int cli_read_pin_tty(const char *prompt, char *pin, size_t *len);
/* First line of fd (e.g. stdin); the end of input ends it too. */
int cli_read_pin_fd(int fd, const char *what, char *pin, size_t *len);
/* First line of a file; warns when others may read it. */
int cli_read_pin_file(const char *path, char *pin, size_t *len);

#endif
