#!/bin/bash
# demo_curl.sh TOKDIR [LABEL]: curl authenticates with a key on the token,
# through the agent and the p11agent OpenSSL provider.
#
# Needs a running, unlocked agent at $P11AGENT_SOCK whose token was made by
# tests/integration/mktoken.sh TOKDIR (LABEL: a key there, default ec256).
# Starts `openssl s_server -Verify 1 -verify_return_error -www` on a free
# loopback port with a certificate from TOKDIR's test CA, writes a
# key-reference file with `p11agent export-key`, runs
#   p11agent exec -- curl --cert LABEL.cert.pem --key KEYREF https://localhost:PORT/
# and prints the part of the server's answer that names the client
# certificate.  Stops the server by PID.  Exit status 0 when the server saw
# the client certificate of LABEL.
#
# Uses the p11agent binary and provider module of the build tree when run
# from it, else the installed ones (P11AGENT and P11AGENT_MODULE override).
set -eu
unset CURL_CA_BUNDLE SSL_CERT_FILE OPENSSL_CONF

die() {
	echo "demo_curl.sh: $*" >&2
	exit 1
}

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
	die "usage: demo_curl.sh TOKDIR [LABEL]"
fi
tokdir=$(cd "$1" && pwd) || die "no directory $1"
label=${2:-ec256}
[ -n "${P11AGENT_SOCK:-}" ] || die "P11AGENT_SOCK is not set (eval \"\$(p11agent env)\")"
for f in ca.pem ca.key "$label.cert.pem"; do
	[ -f "$tokdir/$f" ] || die "$tokdir/$f not found (make the token with tests/integration/mktoken.sh)"
done
for c in openssl curl python3; do
	command -v "$c" >/dev/null 2>&1 || die "$c not found"
done

top=$(cd "$(dirname "$0")/../.." && pwd)
p11agent=${P11AGENT:-}
module=${P11AGENT_MODULE:-}
if [ -z "$p11agent" ]; then
	if [ -x "$top/p11agent" ]; then p11agent=$top/p11agent; else p11agent=p11agent; fi
fi
if [ -z "$module" ] && [ -f "$top/.libs/p11agent.so" ]; then
	module=$top/.libs/p11agent.so
fi
exec_args=()
[ -z "$module" ] || exec_args=(--module "$module")

work=$(mktemp -d "${TMPDIR:-/tmp}/p11agent-demo-curl.XXXXXX")
server_pid=
cleanup() {
	if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
		kill "$server_pid" 2>/dev/null || true
		wait "$server_pid" 2>/dev/null || true
	fi
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A server certificate for localhost from the token's test CA.
printf 'subjectAltName = DNS:localhost, IP:127.0.0.1\nextendedKeyUsage = serverAuth\n' >"$work/server.ext"
if ! openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$work/server.key" \
	-subj "/O=p11agent demo/CN=localhost" -out "$work/server.csr" >"$work/log" 2>&1 ||
	! openssl x509 -req -in "$work/server.csr" -CA "$tokdir/ca.pem" -CAkey "$tokdir/ca.key" \
		-set_serial 7 -days 1 -extfile "$work/server.ext" -out "$work/server.pem" >>"$work/log" 2>&1; then
	cat "$work/log" >&2
	die "cannot make the server certificate"
fi

# listening PORT: something listens on 127.0.0.1:PORT.
listening() {
	awk -v p=":$(printf '%04X' "$1")" \
		'NR > 1 && $4 == "0A" && substr($2, length($2) - 4) == p { f = 1 } END { exit !f }' /proc/net/tcp
}
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
openssl s_server -accept "127.0.0.1:$port" -cert "$work/server.pem" -key "$work/server.key" \
	-CAfile "$tokdir/ca.pem" -Verify 1 -verify_return_error -www </dev/null >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 100); do
	listening "$port" && break
	kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; die "s_server did not start"; }
	sleep 0.1
done
listening "$port" || die "s_server does not listen on port $port"

uri="pkcs11:token=p11agent-test;object=$label;type=private"
echo "\$ p11agent export-key '$uri' --out key.pem"
"$p11agent" export-key "$uri" --out "$work/key.pem" || die "export-key failed"
sed 's/^/  /' "$work/key.pem"
echo "\$ p11agent exec -- curl --cacert ca.pem --cert $label.cert.pem --key key.pem https://localhost:$port/"
st=0
"$p11agent" exec ${exec_args[@]+"${exec_args[@]}"} -- curl -sS --cacert "$tokdir/ca.pem" \
	--cert "$tokdir/$label.cert.pem" --key "$work/key.pem" "https://localhost:$port/" \
	>"$work/answer" 2>"$work/curl.err" || st=$?
if [ "$st" -ne 0 ]; then
	cat "$work/curl.err" >&2
	die "curl failed (exit status $st)"
fi
echo "The server's answer (openssl s_server -www), the client certificate part:"
grep -aE '^ *(Protocol|Cipher) *:|^Peer sig|^Client certificate|^ *(Subject|Issuer):' "$work/answer" |
	sed 's/^ */  /'
if grep -qE "^ *Subject: O=p11agent test, CN=$label\$" "$work/answer"; then
	echo "The server verified the client certificate CN=$label: curl signed with the key on the token."
else
	die "the server's answer does not name CN=$label"
fi
