#!/bin/bash
# t_pkcs11_git: git clone/fetch and wget (GnuTLS, modules from p11-kit's
# registry) and curl (OpenSSL's pkcs11 engine through p11-kit-proxy) with
# keys reached through p11agent-pkcs11.so, against a local nginx +
# git-http-backend (fcgiwrap) that requires a client certificate.  EC and
# RSA keys, TLS 1.2 and 1.3; the server's log must show the certificate.
# No PIN anywhere on the client side: the agent holds the login.
. "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/pkcs11_lib.sh
. "$lib_dir/pkcs11_lib.sh"

P11KIT_PROXY=${P11KIT_PROXY:-/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so}
require_cmd git wget curl openssl unshare "$NGINX" "$FCGIWRAP" "$GIT_HTTP_BACKEND"
require_file "$P11KIT_PROXY"
pk_setup
if [ -n "$PK_SAN_SKIP" ]; then
	# git (git-remote-https), wget and curl hang in setlocale() at start-up
	# with libasan preloaded; t_pkcs11_module covers the module under ASan.
	skip "git, wget and curl through the module" "$PK_SAN_SKIP"
	done_testing
fi
start_agent || bail_out "agent started"
unlock_token >/dev/null || bail_out "token unlocked"
# OpenSSL programs here must use the engine, not a provider from the caller's config.
unset OPENSSL_CONF

# ---------------------------------------------------------------- the server
mkdir -p "$T/repos" "$T/nginx/tmp" "$T/work"
git init -q -b main "$T/work/repo"
printf 'hello from the p11agent test repository\n' >"$T/work/repo/README"
git -C "$T/work/repo" add README
git -C "$T/work/repo" -c user.name=t -c user.email=t@example.invalid commit -q -m one
git clone -q --bare "$T/work/repo" "$T/repos/repo.git"

pk_start_nginx "$T/repos" || bail_out "nginx and fcgiwrap listen"

# The server really requires a client certificate.
run curl -sS --cacert "$T/server.pem" "https://localhost:$P13/whoami"
if grep -q "subject=CN" "$T/stdout"; then not_ok "nginx refuses a client without a certificate"; else ok "nginx refuses a client without a certificate"; fi

# seen PATTERN: the last access-log line matching the request shows PATTERN.
seen() {
	grep -F -- "$2" "$T/nginx/access.log" | tail -n 1 | grep -qF -- "$1"
}

git_env=(env GIT_CONFIG_GLOBAL=/dev/null GIT_CONFIG_NOSYSTEM=1 GIT_TERMINAL_PROMPT=0 GIT_ASKPASS=/bin/false)

# ---------------------------------------------------------------- git and wget
# gnutls_case LABEL TLSVER(1.2|1.3)
gnutls_case() {
	local k=$1 v=$2 port cert key gitver wgetver dir
	case $v in
	1.2) port=$P12 gitver=tlsv1.2 wgetver=TLSv1_2 ;;
	*) port=$P13 gitver=tlsv1.3 wgetver=TLSv1_3 ;;
	esac
	cert=$(key_uri_of "$k" cert) && key=$(key_uri_of "$k" private) || { not_ok "URIs of $k"; return; }
	dir=$T/clone-$k-$v
	: >"$T/nginx/access.log.mark"
	run pk_registry timeout 60 "${git_env[@]}" git -c http.sslCAInfo="$T/server.pem" \
		-c http.sslCert="$cert" -c http.sslKey="$key" -c http.sslVersion="$gitver" \
		clone -q "https://localhost:$port/git/repo.git" "$dir"
	rc_is 0 "git clone over TLS $v with $k through the module"
	if cmp -s "$dir/README" "$T/work/repo/README"; then ok "the clone ($k, TLS $v) has the repository's content"; else not_ok "the clone ($k, TLS $v) has the repository's content"; fi
	if seen "TLSv$v \"CN=$k,O=p11agent test\" SUCCESS" "/git/repo.git/info/refs"; then
		ok "nginx saw $k's certificate over TLS $v for git"
	else
		not_ok "nginx saw $k's certificate over TLS $v for git"
		diag_file "$T/nginx/access.log" 5
	fi
	run pk_registry timeout 60 wget -q -O "$T/wget.out" --ca-certificate="$T/server.pem" \
		--certificate="$cert" --private-key="$key" --secure-protocol="$wgetver" \
		"https://localhost:$port/whoami"
	rc_is 0 "wget over TLS $v with $k through the module"
	file_has "$T/wget.out" "subject=CN=$k,O=p11agent test protocol=TLSv$v" "wget: the server saw $k's certificate over TLS $v"
}
gnutls_case ec256 1.2
gnutls_case ec256 1.3
gnutls_case rsa2048 1.2
gnutls_case rsa2048 1.3
gnutls_case ec-imp 1.3

# git fetch of a new commit, in the clone made above
git -C "$T/work/repo" -c user.name=t -c user.email=t@example.invalid commit -q --allow-empty -m two
git -C "$T/work/repo" push -q "$T/repos/repo.git" main
want=$(git -C "$T/work/repo" rev-parse HEAD)
cert=$(key_uri_of rsa2048 cert)
key=$(key_uri_of rsa2048 private)
run pk_registry timeout 60 "${git_env[@]}" git -C "$T/clone-rsa2048-1.3" -c http.sslCAInfo="$T/server.pem" \
	-c http.sslCert="$cert" -c http.sslKey="$key" fetch -q origin
rc_is 0 "git fetch with rsa2048 through the module"
is "$(git -C "$T/clone-rsa2048-1.3" rev-parse origin/main 2>&1)" "$want" "git fetch brought the new commit"

# A locked agent: git fails (no prompt, no hang), and works again after unlock.
p11a lock >/dev/null
run pk_registry timeout 60 "${git_env[@]}" git -C "$T/clone-rsa2048-1.3" -c http.sslCAInfo="$T/server.pem" \
	-c http.sslCert="$cert" -c http.sslKey="$key" fetch -q origin
if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ]; then ok "git fails at once while the agent's token is locked"; else not_ok "git fails at once while the agent's token is locked"; diag_last; fi
unlock_token >/dev/null
run pk_registry timeout 60 "${git_env[@]}" git -C "$T/clone-rsa2048-1.3" -c http.sslCAInfo="$T/server.pem" \
	-c http.sslCert="$cert" -c http.sslKey="$key" fetch -q origin
rc_is 0 "git works again after 'p11agent unlock'"

# ---------------------------------------------------------------- p11agent setup git
# The user's git configuration (GIT_CONFIG_GLOBAL stands in for
# ~/.gitconfig) gets the key's URIs; git then needs no -c for them.
GITCFG=$T/gitconfig-setup
KEY_EC=$(key_uri_of ec256 private)
run env GIT_CONFIG_GLOBAL="$GITCFG" "$P11AGENT" --socket "$SOCK" setup git --key "$KEY_EC" \
	--url "https://localhost:$P13/" --dry-run
rc_is 0 "setup git --dry-run"
stdout_has "git config --global http.https://localhost:$P13/.sslKey '$KEY_EC'" \
	"setup git --dry-run shows the sslKey it would set"
if [ ! -e "$GITCFG" ]; then ok "setup git --dry-run changed nothing"; else not_ok "setup git --dry-run changed nothing"; fi
run env GIT_CONFIG_GLOBAL="$GITCFG" "$P11AGENT" --socket "$SOCK" setup git --key "$KEY_EC" \
	--url "https://localhost:$P13/"
rc_is 0 "setup git"
is "$(git config --file "$GITCFG" "http.https://localhost:$P13/.sslcert")" "$(key_uri_of ec256 cert)" \
	"setup git set sslCert to the key's certificate URI"
: >"$T/nginx/access.log.mark"
run pk_registry timeout 60 env GIT_CONFIG_GLOBAL="$GITCFG" GIT_CONFIG_NOSYSTEM=1 GIT_TERMINAL_PROMPT=0 \
	git -c http.sslCAInfo="$T/server.pem" clone -q "https://localhost:$P13/git/repo.git" "$T/clone-setup"
rc_is 0 "git clone with only what 'p11agent setup git' configured"
if seen "TLSv1.3 \"CN=ec256,O=p11agent test\" SUCCESS" "/git/repo.git/info/refs"; then
	ok "nginx saw ec256's certificate for the clone set up by 'p11agent setup git'"
else
	not_ok "nginx saw ec256's certificate for the clone set up by 'p11agent setup git'"
	diag_file "$T/nginx/access.log" 5
fi

# ---------------------------------------------------------------- curl: engine + p11-kit-proxy
# curl_case LABEL TLSVER
curl_case() {
	local k=$1 v=$2 port cert key
	case $v in 1.2) port=$P12 ;; *) port=$P13 ;; esac
	cert=$(key_uri_of "$k" cert) && key=$(key_uri_of "$k" private) || { not_ok "URIs of $k"; return; }
	# libp11 0.4.12 stops at the token's Ed25519 keys: hide them (docs/pkcs11-module.md).
	run pk_registry env PKCS11_MODULE_PATH="$P11KIT_PROXY" P11AGENT_PKCS11_KEY_TYPES=rsa,ec \
		timeout 60 curl -sS --cacert "$T/server.pem" \
		--engine pkcs11 --key-type ENG --key "$key" --cert-type ENG --cert "$cert" \
		"https://localhost:$port/whoami"
	rc_is 0 "curl with the pkcs11 engine and p11-kit-proxy, $k, TLS $v"
	stdout_has "subject=CN=$k,O=p11agent test protocol=TLSv$v" "curl: the server saw $k's certificate over TLS $v"
}
curl_case ec256 1.3
curl_case rsa2048 1.2
curl_case rsa2048 1.3

done_testing
