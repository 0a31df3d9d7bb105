/*
 * tlsbench: full mutual-TLS handshakes per second from one client process
 * against a loopback server (a forked child of this program, key in a
 * file, client certificate required, no session tickets, no resumption).
 *
 *   tlsbench pem|provider|engine TLS SECS CERT KEY CA SERVER_CERT SERVER_KEY
 *
 * TLS: 1.2 or 1.3.  KEY is a PEM file (pem), or a pkcs11: URI loaded
 * through OSSL_STORE with the p11agent provider enabled by OPENSSL_CONF
 * (provider), or through libp11's engine "pkcs11" (engine; the module from
 * $BENCH_ENGINE_MODULE, the PIN from $BENCH_ENGINE_PIN).
 *
 * Each handshake: connect, SSL_connect, read the one byte the server
 * writes once its SSL_accept returned (so in TLS 1.3 the server has
 * checked the client's CertificateVerify), close.
 * Prints "ops=N secs=S rate=R p50_us=X p99_us=Y".
 */
#define OPENSSL_SUPPRESS_DEPRECATED 1   /* the ENGINE API, for libp11 */

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <openssl/engine.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/store.h>

#include "benchutil.h"

static pid_t server = -1;

/* Fails the run; the server child, if any, goes too (it holds our stdout). */
static void
die(const char *what)
{
	fprintf(stderr, "tlsbench: %s\n", what);
	ERR_print_errors_fp(stderr);
	if (server > 0) {
		kill(server, SIGTERM);
		waitpid(server, NULL, 0);
	}
	exit(1);
}

static void
serve(int lfd, const char *cert, const char *key, const char *ca)
{
	SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
	int one = 1;

	if (ctx == NULL || SSL_CTX_use_certificate_chain_file(ctx, cert) != 1 ||
	    SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1 ||
	    SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1)
		die("server set-up");
	SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
	SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
	SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
	SSL_CTX_set_num_tickets(ctx, 0);
	for (;;) {
		int fd = accept(lfd, NULL, NULL);
		SSL *s;

		if (fd < 0) {
			if (errno == EINTR)
				continue;
			_exit(1);
		}
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		s = SSL_new(ctx);
		SSL_set_fd(s, fd);
		if (SSL_accept(s) == 1) {
			SSL_write(s, "x", 1);
			SSL_shutdown(s);
		} else {
			ERR_print_errors_fp(stderr);
		}
		SSL_free(s);
		close(fd);
	}
}

static EVP_PKEY *
load_engine(const char *uri)
{
	const char *module = getenv("BENCH_ENGINE_MODULE");
	const char *pin = getenv("BENCH_ENGINE_PIN");
	ENGINE *e;

	ENGINE_load_dynamic();
	e = ENGINE_by_id("pkcs11");
	if (e == NULL)
		die("no engine 'pkcs11' (install libengine-pkcs11-openssl)");
	if (module != NULL && ENGINE_ctrl_cmd_string(e, "MODULE_PATH", module, 0) != 1)
		die("engine MODULE_PATH");
	if (pin != NULL && ENGINE_ctrl_cmd_string(e, "PIN", pin, 0) != 1)
		die("engine PIN");
	if (ENGINE_init(e) != 1)
		die("engine init");
	return ENGINE_load_private_key(e, uri, NULL, NULL);
}

int
main(int argc, char **argv)
{
	struct sockaddr_in sa;
	socklen_t sl = sizeof(sa);
	SSL_CTX *ctx;
	EVP_PKEY *pkey = NULL;
	struct lat lat;
	const char *mode, *cert, *key, *ca;
	double secs, t0, end, now;
	int lfd, tls13, one = 1;

	if (argc != 9) {
		fprintf(stderr, "usage: tlsbench pem|provider|engine 1.2|1.3 SECS CERT KEY CA "
			"SERVER_CERT SERVER_KEY\n");
		return 2;
	}
	mode = argv[1];
	tls13 = strcmp(argv[2], "1.3") == 0;
	secs = atof(argv[3]);
	cert = argv[4];
	key = argv[5];
	ca = argv[6];

	lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	memset(&sa, 0, sizeof(sa));
	sa.sin_family = AF_INET;
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(lfd, 128) < 0 ||
	    getsockname(lfd, (struct sockaddr *)&sa, &sl) < 0)
		die("listen");
	/* The server forks before the client touches any key: nothing
	 * PKCS#11 (engine) or agent-connected (provider) crosses fork(). */
	server = fork();
	if (server < 0)
		die("fork");
	if (server == 0) {
		server = -1;
		/* Dies with the client, whatever way it exits. */
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		/* The server is the same in every run: plain OpenSSL, neither
		 * the provider nor the engine (no OpenSSL call was made yet, so
		 * the configuration is not loaded). */
		unsetenv("OPENSSL_CONF");
		unsetenv("OPENSSL_MODULES");
		serve(lfd, argv[7], argv[8], ca);
	}
	close(lfd);

	ctx = SSL_CTX_new(TLS_client_method());
	if (ctx == NULL)
		die("SSL_CTX_new");
	SSL_CTX_set_min_proto_version(ctx, tls13 ? TLS1_3_VERSION : TLS1_2_VERSION);
	SSL_CTX_set_max_proto_version(ctx, tls13 ? TLS1_3_VERSION : TLS1_2_VERSION);
	SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
	if (SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1)
		die("client CA");
	SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
	if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1)
		die("client certificate");
	if (strcmp(mode, "pem") == 0) {
		if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1)
			die("client key file");
	} else {
		pkey = strcmp(mode, "engine") == 0 ? load_engine(key) : bench_store_load(key);
		if (pkey == NULL || SSL_CTX_use_PrivateKey(ctx, pkey) != 1)
			die("client key");
	}

	lat_init(&lat);
	t0 = now_s();
	end = t0 + secs;
	for (int i = -3;; i++) {          /* three warm-up handshakes */
		int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
		double a = now_s();
		char b;
		SSL *s;

		if (i == 0)
			t0 = a, end = t0 + secs;
		if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
			die("connect");
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		s = SSL_new(ctx);
		SSL_set_fd(s, fd);
		if (SSL_connect(s) != 1 || SSL_read(s, &b, 1) != 1)
			die("handshake");
		SSL_free(s);
		close(fd);
		now = now_s();
		if (i >= 0)
			lat_add(&lat, now - a);
		if (i >= 0 && now >= end)
			break;
	}
	kill(server, SIGTERM);
	waitpid(server, NULL, 0);
	lat_print(&lat, now - t0);
	lat_free(&lat);
	EVP_PKEY_free(pkey);
	SSL_CTX_free(ctx);
	return 0;
}
