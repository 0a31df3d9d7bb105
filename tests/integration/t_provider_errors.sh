#!/bin/bash
# t_provider_errors: what TLS clients say when the provider cannot sign.
#   - agent not running: an OpenSSL error that names the socket, quickly,
#     no crash and no hang (openssl s_client with a URI and with a key
#     reference, curl, python);
#   - token locked: the error says to run 'p11agent unlock';
#   - unknown key: "no such key" (URI, and a key reference without a public
#     key, which the provider looks up);
#   - a URI or key reference that names several keys (or certificates):
#     refused by the store and the decoder with the matches named
#     (s_client -key/-cert, pkeyutl, curl, nginx -t); the server sees no
#     client certificate, the agent no signing request; a key with its
#     certificate is not ambiguous;
#   - a broken key-reference file; a key that does not match the certificate.
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/tls_lib.sh
. "$lib_dir/tls_lib.sh"

require_cmd openssl curl nginx timeout awk base64 "$PYTHON3" softhsm2-util pkcs11-tool
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

# attempt CLIENT KEY OUT [CERT]: runs one client (pkeyutl signs $T/msg);
# sets st and secs.
attempt() {
	local start=$SECONDS
	st=0
	case $1 in
	s_client) tls_s_client "${PORT[any]}" 1.3 "${4:-$CERT}" "$2" "$3" || st=$? ;;
	pkeyutl)
		provider_env timeout "$TLS_TIMEOUT" openssl pkeyutl -sign -inkey "$2" -in "$T/msg" \
			-out "$T/pkeyutl.sig" >"$3" 2>&1 || st=$?
		;;
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
"$PYTHON3" "$lib_dir/proto_client.py" stale-socket "$SOCK"
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
# keyref_with_uri IN URI OUT: the key reference IN (as export-key writes
# it, with the public key) naming URI instead.
keyref_with_uri() {
	"$PYTHON3" "$lib_dir/keyref_uri.py" "$@"
}
# A key reference to a key the token no longer has: signing says so.
# (References written by export-key carry the public key; the provider
# asks the agent while reading one only whether its URI names several
# keys, so a key that is gone is first reported when signing.)
GONE=${URI_EC/object=ec256/object=ec999}
check "a key reference to a key the token lacks" keyref_with_uri "$T/ec256.key.pem" "$GONE" "$T/gone.key.pem"
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

# ---------------------------------------------------------------- URIs naming several keys
# A TLS client must never present an identity the user did not name: a
# URI or key reference that matches several keys (or, for a certificate,
# several certificates) is refused where it is read, with an error that
# names some of the matches and says how to name one.  The server then
# sees no client certificate and the agent is never asked to sign.
VAGUE="pkcs11:token=$TOKEN_LABEL"
NKEYS=$(key_labels | wc -l)
URI_RSA=$(json_key rsa2048 uri)
CERT_URI_RSA=$(json_key rsa2048 cert_uri)
# server_certs: how many client certificates the server has verified so far.
server_certs() {
	awk '/^depth=0 / { n++ } END { print n + 0 }' "$T/server-any.log"
}
# channel_requests URI: how many signing channels the agent was asked to
# open for exactly URI (opened, or refused as naming several keys).
channel_requests() {
	awk -v u="$1" '
		index($0, "signing channel to helper") && substr($0, length($0) - length(u) + 1) == u { n++ }
		index($0, "keys match " u "; ") { n++ }
		END { print n + 0 }' "$AGENT_LOG"
}
# names_matches OUT URI WHAT DESC: the error counts URI's matches (WHAT:
# keys, certificates) and says how to name one.
names_matches() {
	file_has "$1" "$2 matches $NKEYS $3" "$4: the error counts the matching $3"
	file_has "$1" "add object= or id=" "$4: the error says how to name one"
}

seen=$(server_certs)
attempt s_client "$VAGUE" "$T/vague.s_client-key"
client_fails "URI naming several keys, s_client -key" "$st" "$T/vague.s_client-key" "$secs" \
	"URI matches several keys"
names_matches "$T/vague.s_client-key" "$VAGUE" keys "URI naming several keys, s_client -key"
file_has "$T/vague.s_client-key" "$URI_RSA" "URI naming several keys, s_client -key: the error names a matching key's URI"
is "$(server_certs)" "$seen" "URI naming several keys, s_client -key: the server saw no client certificate"

seen=$(server_certs)
attempt s_client "$VAGUE" "$T/vague.s_client-both" "$VAGUE;type=cert"
client_fails "URIs naming several keys and certificates, s_client -cert and -key" "$st" \
	"$T/vague.s_client-both" "$secs" "URI matches several keys"
is "$(server_certs)" "$seen" \
	"URIs naming several keys and certificates, s_client -cert and -key: the server saw no client certificate"

seen=$(server_certs)
attempt s_client "$URI_EC" "$T/vague.s_client-cert" "$VAGUE;type=cert"
client_fails "URI naming several certificates, s_client -cert" "$st" "$T/vague.s_client-cert" "$secs" \
	"URI matches several keys"
names_matches "$T/vague.s_client-cert" "$VAGUE;type=cert" certificates "URI naming several certificates, s_client -cert"
file_has "$T/vague.s_client-cert" "$CERT_URI_RSA" \
	"URI naming several certificates, s_client -cert: the error names a matching certificate's URI"
is "$(server_certs)" "$seen" "URI naming several certificates, s_client -cert: the server saw no client certificate"

printf 'p11agent: sign me\n' >"$T/msg"
rm -f "$T/pkeyutl.sig"
attempt pkeyutl "$VAGUE" "$T/vague.pkeyutl"
client_fails "URI naming several keys, pkeyutl -sign" "$st" "$T/vague.pkeyutl" "$secs" \
	"URI matches several keys"
names_matches "$T/vague.pkeyutl" "$VAGUE" keys "URI naming several keys, pkeyutl -sign"
if [ -s "$T/pkeyutl.sig" ]; then
	not_ok "URI naming several keys, pkeyutl -sign: no signature written"
else
	ok "URI naming several keys, pkeyutl -sign: no signature written"
fi
is "$(channel_requests "$VAGUE")" 0 "URIs naming several keys: the agent was never asked to sign with one"

# One key with its certificate is one identity, not two matches.
st=0
tls_s_client "${PORT[any]}" 1.3 "$VAGUE;object=ec256" "$VAGUE;object=ec256" "$T/pair.out" || st=$?
result "$st" "a URI naming one key and its certificate (no type=) is not ambiguous: s_client succeeds"
server_saw "$T/pair.out" ec256 "a URI naming one key and its certificate: server saw CN=ec256"

# Key references: the decoder asks the agent whether the URI names one key,
# also when the reference carries the public key.  OpenSSL 3.0's store and
# curl drop a decoder's reason; nginx prints it.
check "a key reference (with the public key) naming several keys" \
	keyref_with_uri "$T/ec256.key.pem" "$VAGUE" "$T/vague-pub.key.pem"
seen=$(server_certs)
attempt s_client "$T/vague-pub.key.pem" "$T/vague-ref.s_client"
client_fails "key reference naming several keys, s_client" "$st" "$T/vague-ref.s_client" "$secs" \
	"Could not read client certificate private key"
is "$(server_certs)" "$seen" "key reference naming several keys, s_client: the server saw no client certificate"
attempt curl "$T/vague-pub.key.pem" "$T/vague-ref.curl"
client_fails "key reference naming several keys (with the public key), curl" "$st" "$T/vague-ref.curl" \
	"$secs" "unable to set private key file"
is "$(channel_requests "$VAGUE")" 0 "key reference naming several keys: the agent was never asked to sign with it"

# nginx_t KEY OUT: `nginx -t` with KEY as its certificate key, through the provider.
nginx_t() {
	local n=$T/nginx-t
	mkdir -p "$n"
	printf 'daemon off;\npid %s/nginx.pid;\nerror_log %s/error.log;\nevents { }\nhttp {\n  access_log off;\n  server {\n    listen 127.0.0.1:%s ssl;\n    ssl_certificate %s;\n    ssl_certificate_key %s;\n  }\n}\n' \
		"$n" "$n" "$(free_port)" "$TOKDIR/ec256.cert.pem" "$1" >"$n/nginx.conf"
	provider_env timeout "$TLS_TIMEOUT" nginx -t -p "$n" -c "$n/nginx.conf" >"$2" 2>&1
}
# nginx_refuses KEY OUT DESC: `nginx -t` refuses KEY, counting the matches.
nginx_refuses() {
	st=0
	nginx_t "$1" "$2" || st=$?
	result $((st == 0)) "$3: refused"
	names_matches "$2" "$VAGUE" keys "$3"
}
check "nginx -t takes a key reference that names one key" nginx_t "$T/ec256.key.pem" "$T/nginx-t.one"
nginx_refuses "$T/vague-pub.key.pem" "$T/nginx-t.vague-pub" \
	"key reference (with the public key) naming several keys, nginx -t"
file_has "$T/nginx-t.vague-pub" "$URI_RSA" \
	"key reference (with the public key) naming several keys, nginx -t: the error names a matching key's URI"
nginx_refuses "$T/all.key.pem" "$T/nginx-t.all" \
	"key reference (without the public key) naming several keys, nginx -t"
file_has "$T/nginx-t.all" "$URI_RSA" \
	"key reference (without the public key) naming several keys, nginx -t: the error names a matching key's URI"

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
