# shellcheck shell=bash
# shellcheck disable=SC2034 # PORT, CURL_SKIP: for the tests that source this file
# tls_lib.sh: sourced after lib.sh by the t_provider_*.sh tests.
#
#   require_provider             the built module is there
#   provider_env CMD...          CMD with the p11agent provider enabled the
#                                way users enable it: the system openssl.cnf
#                                plus the shipped snippet (.include) made
#                                for the module of the build tree,
#                                P11AGENT_SOCK=$SOCK
#   make_server_cert             $T/server.pem and $T/server.key for
#                                localhost / 127.0.0.1, issued by the test CA
#   start_tls_server NAME ARGS   openssl s_server -Verify 1
#                                -verify_return_error -www on a free loopback
#                                port (PORT[NAME]); stopped by the cleanup trap
#   tls_s_client / tls_curl / tls_python PORT TLS CERT KEY OUT
#                                one GET with the client certificate; the
#                                client's exit status is returned, its output
#                                (the server's answer) is in OUT
#   server_saw OUT LABEL DESC    check: the server's answer names the client
#                                certificate of key LABEL
#   sig_type_is OUT TYPE DESC    check: the server saw a client signature of
#                                TYPE ("RSA", "RSA-PSS", "ECDSA", "ed25519")
#   CURL_SKIP                    non-empty (the reason) when curl cannot load
#                                the module (sanitizer builds)
#
# free_port, port_listening, wait_port, skip and asan_env are lib.sh's.

: "${top_srcdir:?}" "${top_builddir:?}" "${lib_dir:?}"
PROVIDER_MODULE_DIR=${PROVIDER_MODULE_DIR:-$top_builddir/.libs}
# packaging/p11agent-openssl.cnf.in as `make install` writes it, but naming
# the module in $PROVIDER_MODULE_DIR (require_provider writes it).
PROVIDER_SNIPPET_IN=$top_srcdir/packaging/p11agent-openssl.cnf.in
PROVIDER_SNIPPET=$T/p11agent-openssl.cnf
# How long one TLS client may take: a hang fails the check instead of the suite.
TLS_TIMEOUT=${TLS_TIMEOUT:-30}
declare -A PORT=()

# OpenSSL's own directory, where the system openssl.cnf lives.
openssl_dir() {
	openssl version -d | sed -n 's/^OPENSSLDIR: "\(.*\)"$/\1/p'
}

# write_provider_conf FILE: the configuration a user gets by adding the
# shipped snippet to the system openssl.cnf.
write_provider_conf() {
	local sys
	sys="$(openssl_dir)/openssl.cnf"
	{
		echo "# p11agent tests: the system configuration plus the shipped snippet"
		[ ! -f "$sys" ] || printf '.include %s\n' "$sys"
		printf '.include %s\n' "$PROVIDER_SNIPPET"
	} >"$1"
}

# SAN_ENV: the ASan preload (lib.sh's asan_env) for the programs that load
# the provider (openssl, curl, python); empty in an ordinary build.
# Debian 12's curl deadlocks in setlocale() at start-up when libasan is
# preloaded (with or without this provider), so sanitizer builds skip the
# curl checks; CURL_SKIP says why.
SAN_ENV=()
CURL_SKIP=
san_env_for_module() {
	SAN_ENV=()
	if asan_env "$1"; then
		SAN_ENV=("${ASAN_ENV[@]}")
		CURL_SKIP="sanitizer build: curl hangs in setlocale() with libasan preloaded"
	fi
}

require_provider() {
	if [ -n "${P11A_INSTALLED_SNIPPET:-}" ]; then
		# The installed snippet, naming the installed provider.
		require_file "$P11A_INSTALLED_SNIPPET"
		PROVIDER_SNIPPET=$P11A_INSTALLED_SNIPPET
		PROVIDER_MODULE_DIR=$(dirname "$(awk '$1 == "module" { print $3; exit }' "$PROVIDER_SNIPPET")")
	else
		require_file "$PROVIDER_MODULE_DIR/p11agent.so" "$PROVIDER_SNIPPET_IN"
		sed -e "s|@PROVIDER_MODULE@|$PROVIDER_MODULE_DIR/p11agent.so|g" \
			-e "s|@OPENSSL_SNIPPET@|$PROVIDER_SNIPPET|g" "$PROVIDER_SNIPPET_IN" >"$PROVIDER_SNIPPET"
	fi
	PROVIDER_CONF=$T/openssl-p11agent.cnf
	write_provider_conf "$PROVIDER_CONF"
	san_env_for_module "$PROVIDER_MODULE_DIR/p11agent.so"
}

provider_env() {
	env ${SAN_ENV[@]+"${SAN_ENV[@]}"} OPENSSL_CONF="$PROVIDER_CONF" \
		OPENSSL_MODULES="$PROVIDER_MODULE_DIR" P11AGENT_SOCK="$SOCK" "$@"
}

make_server_cert() {
	printf 'subjectAltName = DNS:localhost, IP:127.0.0.1\nextendedKeyUsage = serverAuth\n' >"$T/server.ext"
	env -u OPENSSL_CONF openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
		-keyout "$T/server.key" -subj "/O=p11agent test/CN=localhost" -out "$T/server.csr" \
		>"$T/server-cert.log" 2>&1 &&
		env -u OPENSSL_CONF openssl x509 -req -in "$T/server.csr" -CA "$TOKDIR/ca.pem" \
			-CAkey "$TOKDIR/ca.key" -set_serial 4242 -days 30 -extfile "$T/server.ext" \
			-out "$T/server.pem" >>"$T/server-cert.log" 2>&1
}

# start_tls_server NAME [extra s_server args]: never with the provider; the
# server's key is a file.
start_tls_server() {
	local name=$1 port pid
	shift
	port=$(free_port)
	env -u OPENSSL_CONF -u OPENSSL_MODULES openssl s_server -accept "127.0.0.1:$port" \
		-cert "$T/server.pem" -key "$T/server.key" -CAfile "$TOKDIR/ca.pem" \
		-Verify 1 -verify_return_error -www "$@" >"$T/server-$name.log" 2>&1 &
	pid=$!
	remember_pid "$pid"
	if poll 10 listening_or_gone "$port" "$pid" && port_listening "$port"; then
		PORT[$name]=$port
		return 0
	fi
	diag "s_server $name did not start"
	diag_file "$T/server-$name.log"
	return 1
}

# The request every client sends; s_server -www answers it and closes.
tls_request() {
	printf 'GET / HTTP/1.0\r\n\r\n'
}

# tls_s_client PORT TLS CERT KEY OUT [extra args]: KEY is a pkcs11: URI or a file.
tls_s_client() {
	local port=$1 tls=$2 cert=$3 key=$4 out=$5
	shift 5
	tls_request | provider_env timeout "$TLS_TIMEOUT" openssl s_client \
		-connect "127.0.0.1:$port" -servername localhost "-tls${tls/./_}" \
		-CAfile "$TOKDIR/ca.pem" -cert "$cert" -key "$key" -quiet "$@" >"$out" 2>&1
}

tls_curl() {
	local port=$1 tls=$2 cert=$3 key=$4 out=$5 v
	case $tls in
	1.2) v=(--tlsv1.2 --tls-max 1.2) ;;
	*) v=(--tlsv1.3) ;;
	esac
	provider_env timeout "$TLS_TIMEOUT" curl -sS "${v[@]}" --cacert "$TOKDIR/ca.pem" \
		--cert "$cert" --key "$key" "https://localhost:$port/" >"$out" 2>&1
}

tls_python() {
	local port=$1 tls=$2 cert=$3 key=$4 out=$5
	provider_env timeout "$TLS_TIMEOUT" "$PYTHON3" "$lib_dir/tls_client.py" get \
		"https://localhost:$port/" "$TOKDIR/ca.pem" "$cert" "$key" --tls "$tls" >"$out" 2>&1
}

# subject_line LABEL: how s_server -www prints the client certificate's subject.
subject_line() {
	printf 'Subject: O=p11agent test, CN=%s' "$1"
}

server_saw() {
	if grep -qE "^ *$(subject_line "$2")\$" "$1"; then
		ok "$3"
	else
		not_ok "$3"
		diag "the server's answer does not name CN=$2"
		diag_file "$1" 12
	fi
}

sig_type_is() {
	if grep -qx "Peer signature type: $2" "$1"; then
		ok "$3"
	else
		not_ok "$3"
		diag "expected the server to see a $2 client signature; it saw: $(grep -a 'Peer signature type' "$1" || echo nothing)"
		diag_file "$1" 8
	fi
}
