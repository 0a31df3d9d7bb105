#!/bin/bash
# t_provider_errors: what TLS clients say when the provider cannot sign.
#   - agent not running: an OpenSSL error that names the socket, quickly,
#     no crash and no hang (openssl s_client with a URI and with a key
#     reference, curl, python);
#   - token locked: the error says to run 'p11agent unlock';
#   - unknown key: "no such key" (URI, and a key reference without a public
#     key, which the provider looks up); a URI that names several keys;
#   - a broken key-reference file; a key that does not match the certificate.
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/tls_lib.sh
. "$lib_dir/tls_lib.sh"

require_cmd openssl curl timeout awk base64 "$PYTHON3" softhsm2-util pkcs11-tool
require_agent_binaries
require_provider
make_token

check "agent starts on the test token" start_agent
check "unlock" unlock_token
check "list --json" list_json
URI_EC=$(json_key ec256 uri)
check "export-key ec256" p11a export-key "$URI_EC" --out "$T/ec256.key.pem"
check "export-key rsa2048" p11a export-key "$(json_key rsa2048 uri)" --out "$T/rsa2048.key.pem"
check "server certificate from the test CA" make_server_cert
check "s_server" start_tls_server any
[ -n "${PORT[any]:-}" ] || bail_out "TLS server running"
CERT=$TOKDIR/ec256.cert.pem

# client_fails DESC RC OUT SECONDS TEXT: the client failed by itself (not
# killed by the timeout, no signal) within SECONDS, and said TEXT.
client_fails() {
	local desc=$1 st=$2 out=$3 secs=$4 text=$5
	if [ "$st" = skip ]; then
		skip "$desc: the client fails cleanly" "$CURL_SKIP"
		skip "$desc: within 10 s" "$CURL_SKIP"
		skip "$desc: the error says \"$text\"" "$CURL_SKIP"
		return
	fi
	if [ "$st" -eq 0 ]; then
		not_ok "$desc: the client fails"
		diag_file "$out" 10
		return
	fi
	if [ "$st" -eq 124 ] || [ "$st" -gt 128 ]; then
		not_ok "$desc: the client fails cleanly (exit status $st: timeout or signal)"
		diag_file "$out" 10
		return
	fi
	ok "$desc: the client fails cleanly (exit status $st)"
	if [ "$secs" -le 10 ]; then
		ok "$desc: within 10 s ($secs s)"
	else
		not_ok "$desc: within 10 s ($secs s)"
	fi
	file_has "$out" "$text" "$desc: the error says \"$text\""
}

# attempt CLIENT KEY OUT: runs one client; sets st and secs.
attempt() {
	local start=$SECONDS
	st=0
	case $1 in
	s_client) tls_s_client "${PORT[any]}" 1.3 "$CERT" "$2" "$3" || st=$? ;;
	curl)
		if [ -n "$CURL_SKIP" ]; then
			st=skip
		else
			tls_curl "${PORT[any]}" 1.3 "$CERT" "$2" "$3" || st=$?
		fi
		;;
	python) tls_python "${PORT[any]}" 1.3 "$CERT" "$2" "$3" || st=$? ;;
	esac
	secs=$((SECONDS - start))
}

# ---------------------------------------------------------------- agent not running
stop_agent
running "${AGENT_PID:-}" && bail_out "agent stopped"
attempt s_client "$T/ec256.key.pem" "$T/down.s_client-ref"
client_fails "agent down, s_client with a key reference" "$st" "$T/down.s_client-ref" "$secs" \
	"agent not running at $SOCK"
attempt s_client "$URI_EC" "$T/down.s_client-uri"
client_fails "agent down, s_client with the URI" "$st" "$T/down.s_client-uri" "$secs" \
	"agent not running at $SOCK"
attempt curl "$T/ec256.key.pem" "$T/down.curl"
client_fails "agent down, curl" "$st" "$T/down.curl" "$secs" "agent not running at $SOCK"
attempt python "$T/ec256.key.pem" "$T/down.python"
# python's ssl reports only the last error on OpenSSL's stack (an SSL one).
client_fails "agent down, python" "$st" "$T/down.python" "$secs" "SSL"
# A socket file with nobody behind it (the agent crashed).
"$PYTHON3" -c 'import socket, sys; s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1])' "$SOCK"
attempt s_client "$T/ec256.key.pem" "$T/stale.s_client-ref"
client_fails "stale socket, s_client with a key reference" "$st" "$T/stale.s_client-ref" "$secs" \
	"agent not running at $SOCK"
rm -f "$SOCK"

# ---------------------------------------------------------------- token locked
check "agent starts again (token locked)" start_agent
attempt s_client "$URI_EC" "$T/locked.s_client-uri"
client_fails "token locked, s_client with the URI" "$st" "$T/locked.s_client-uri" "$secs" \
	"is locked: run 'p11agent unlock'"
file_has "$T/locked.s_client-uri" "token 'p11agent-test'" "token locked: the error names the token"
attempt curl "$T/ec256.key.pem" "$T/locked.curl"
client_fails "token locked, curl" "$st" "$T/locked.curl" "$secs" "run 'p11agent unlock'"
attempt python "$T/ec256.key.pem" "$T/locked.python"
client_fails "token locked, python" "$st" "$T/locked.python" "$secs" "SSL"

# ---------------------------------------------------------------- unknown keys
check "unlock" unlock_token
NOKEY="pkcs11:token=p11agent-test;object=nokey"
attempt s_client "$NOKEY" "$T/nokey.s_client-uri"
client_fails "unknown URI, s_client" "$st" "$T/nokey.s_client-uri" "$secs" "no such key: $NOKEY"

# keyref_file URI OUT: a key reference without a public key, made by hand.
keyref_file() {
	printf 'asn1 = SEQUENCE:ref\n[ref]\nversion = INTEGER:1\nuri = UTF8String:%s\n' "$1" >"$T/ref.conf"
	openssl asn1parse -genconf "$T/ref.conf" -noout -out "$T/ref.der" >/dev/null &&
		{
			echo "-----BEGIN P11AGENT KEY-----"
			base64 -w 64 "$T/ref.der"
			echo "-----END P11AGENT KEY-----"
		} >"$2"
}
# A key reference to a key the token no longer has: signing says so.
# (References written by export-key carry the public key, so the agent is
# first asked when signing; its answer reaches the client.)
"$PYTHON3" - "$T/ec256.key.pem" "$T/gone.key.pem" <<'PYEOF'
import base64, re, sys
pem = open(sys.argv[1]).read()
b64 = re.search(r"-----BEGIN P11AGENT KEY-----\n(.*?)-----END", pem, re.S).group(1)
der = base64.b64decode(b64).replace(b"object=ec256", b"object=ec999")
out = base64.encodebytes(der).decode()
open(sys.argv[2], "w").write("-----BEGIN P11AGENT KEY-----\n" + out + "-----END P11AGENT KEY-----\n")
PYEOF
GONE=$(openssl asn1parse -in "$T/gone.key.pem" | sed -n 's/.*UTF8STRING *://p')
attempt s_client "$T/gone.key.pem" "$T/gone.s_client-ref"
client_fails "key reference to a key the token lacks, s_client" "$st" "$T/gone.s_client-ref" "$secs" \
	"no such key: $GONE"
attempt curl "$T/gone.key.pem" "$T/gone.curl"
client_fails "key reference to a key the token lacks, curl" "$st" "$T/gone.curl" "$secs" "no such key"
# Without the public key the provider must ask the agent while OpenSSL
# reads the file; OpenSSL's file reader drops the reason then, but the
# client must still fail cleanly.
check "a key reference without a public key, to no key" keyref_file "$NOKEY" "$T/nokey.key.pem"
attempt s_client "$T/nokey.key.pem" "$T/nokey.s_client-ref"
client_fails "key reference (no public key) to no key, s_client" "$st" "$T/nokey.s_client-ref" "$secs" \
	"Could not read client certificate private key"
check "a key reference to the whole token" keyref_file "pkcs11:token=p11agent-test" "$T/all.key.pem"
attempt curl "$T/all.key.pem" "$T/all.curl"
client_fails "key reference naming several keys, curl" "$st" "$T/all.curl" "$secs" \
	"unable to set private key file"
# ...and one that names the key without its public key works: the provider asks the agent.
check "a key reference with the URI only" keyref_file "pkcs11:token=p11agent-test;object=ec256;type=private" "$T/uri-only.key.pem"
attempt s_client "$T/uri-only.key.pem" "$T/uri-only.out"
result "$st" "key reference without a public key: s_client succeeds"
server_saw "$T/uri-only.out" ec256 "key reference without a public key: server saw CN=ec256"

# ---------------------------------------------------------------- broken files, wrong keys
{
	echo "-----BEGIN P11AGENT KEY-----"
	echo "MAMCAQE="          # SEQUENCE { INTEGER 1 }: no URI
	echo "-----END P11AGENT KEY-----"
} >"$T/broken.key.pem"
attempt s_client "$T/broken.key.pem" "$T/broken.out"
client_fails "broken key reference, s_client" "$st" "$T/broken.out" "$secs" "not a valid key reference"
# The RSA key with the EC certificate: OpenSSL must see that they do not match.
attempt s_client "$T/rsa2048.key.pem" "$T/mismatch.out"
client_fails "key that does not match the certificate, s_client" "$st" "$T/mismatch.out" "$secs" \
	"does not match the certificate"
attempt curl "$T/rsa2048.key.pem" "$T/mismatch.curl"
client_fails "key that does not match the certificate, curl" "$st" "$T/mismatch.curl" "$secs" \
	"does not match"

stop_agent
is "$AGENT_RC" 0 "agent exits cleanly on SIGTERM"
done_testing
