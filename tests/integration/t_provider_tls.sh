#!/bin/bash
# t_provider_tls: TLS client authentication with keys on the token, through
# the agent and the p11agent OpenSSL provider, enabled as users enable it
# (the system openssl.cnf plus the shipped snippet).
#
# Matrix: TLS 1.2 and 1.3 x RSA-2048 (PKCS#1 v1.5 in 1.2, PSS in 1.3), EC
# P-256, P-384, P-521, Ed25519 x clients: openssl s_client with the pkcs11:
# URI, openssl s_client with a key-reference file, curl and python's ssl
# with the key-reference file.  Every check reads what the server
# (openssl s_server -Verify 1 -verify_return_error -www) saw: the client
# certificate's subject and the type of the client's signature.  Then
# servers that accept only rsa_pss_rsae_sha256 or only
# ecdsa_secp384r1_sha384, keys imported without public-key objects, and
# the agent's log: every signature was asked for with the message itself.
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/tls_lib.sh
. "$lib_dir/tls_lib.sh"

require_cmd openssl curl timeout awk "$PYTHON3" softhsm2-util pkcs11-tool
require_agent_binaries
require_provider
make_token

check "agent starts on the test token" start_agent
running "$AGENT_PID" || bail_out "agent running"
check "unlock" unlock_token
check "list --json" list_json
check "server certificate from the test CA" make_server_cert
check "s_server (any signature algorithm)" start_tls_server any
check "s_server (client signatures: RSA PKCS#1 v1.5 only)" \
	start_tls_server pkcs1 -client_sigalgs RSA+SHA256:RSA+SHA384:RSA+SHA512
check "s_server (client signatures: rsa_pss_rsae_sha256 only)" \
	start_tls_server pss256 -client_sigalgs rsa_pss_rsae_sha256
check "s_server (client signatures: ecdsa_secp384r1_sha384 only)" \
	start_tls_server p384 -client_sigalgs ecdsa_secp384r1_sha384
if [ -z "${PORT[any]:-}" ] || [ -z "${PORT[pkcs1]:-}" ]; then
	bail_out "TLS servers running"
fi

declare -A URI REF
# prepare LABEL: the key's URI and its key-reference file; 1 when the
# token does not hold the key (the reason is printed).
prepare() {
	local label=$1 uri
	uri=$(json_key "$label" uri)
	if [ -z "$uri" ]; then
		return 1
	fi
	URI[$label]=$uri
	REF[$label]=$T/$label.key.pem
	if p11a export-key "$uri" --out "${REF[$label]}" 2>"$T/err"; then
		ok "$label: export-key wrote a key-reference file"
	else
		not_ok "$label: export-key wrote a key-reference file"
		diag_file "$T/err"
	fi
	return 0
}

# expected_sig LABEL TLS: the client signature type the server must see.
expected_sig() {
	case $(key_attr "$1" type) in
	RSA) if [ "$2" = 1.2 ]; then echo RSA; else echo RSA-PSS; fi ;;
	EC) echo ECDSA ;;
	Ed25519) echo ed25519 ;;
	esac
}

# one_client CLIENT LABEL TLS SERVER [SIGTYPE]: GET with the key, check what
# the server saw (SIGTYPE: the signature type expected, when not the usual one).
one_client() {
	local client=$1 label=$2 tls=$3 server=$4 want=${5:-} key desc out st=0
	[ -n "$want" ] || want=$(expected_sig "$label" "$tls")
	desc="TLS $tls $label $client"
	out=$T/out.$label.$tls.$client
	if [ "$client" = curl ] && [ -n "$CURL_SKIP" ]; then
		skip "$desc: client succeeds" "$CURL_SKIP"
		skip "$desc: server saw CN=$label" "$CURL_SKIP"
		skip "$desc: server saw a $want signature" "$CURL_SKIP"
		return
	fi
	case $client in
	s_client-uri) key=${URI[$label]} ;;
	*) key=${REF[$label]} ;;
	esac
	case $client in
	s_client-*) tls_s_client "${PORT[$server]}" "$tls" "$TOKDIR/$label.cert.pem" "$key" "$out" || st=$? ;;
	curl) tls_curl "${PORT[$server]}" "$tls" "$TOKDIR/$label.cert.pem" "$key" "$out" || st=$? ;;
	python) tls_python "${PORT[$server]}" "$tls" "$TOKDIR/$label.cert.pem" "$key" "$out" || st=$? ;;
	esac
	if [ "$st" -ne 0 ]; then
		not_ok "$desc: client succeeds"
		diag "exit status $st"
		diag_file "$out" 15
		not_ok "$desc: server saw CN=$label"
		not_ok "$desc: server saw a $want signature"
		return
	fi
	ok "$desc: client succeeds"
	handshakes=$((handshakes + 1))
	server_saw "$out" "$label" "$desc: server saw CN=$label"
	sig_type_is "$out" "$want" "$desc: server saw a $want signature"
}

CLIENTS="s_client-uri s_client-ref curl python"
handshakes=0
for label in rsa2048 ec256 ec384 ec521 ed25519; do
	type=$(key_attr "$label" type)
	curve=$(key_attr "$label" curve)
	if ! prepare "$label"; then
		# SoftHSM2 builds without EdDSA or some curves cannot hold these keys.
		for tls in 1.2 1.3; do
			for client in $CLIENTS; do
				skip "TLS $tls $label $client" "SoftHSM2 cannot hold $type${curve:+ $curve} keys here (the agent lists no key '$label')"
			done
		done
		continue
	fi
	for tls in 1.2 1.3; do
		server=any
		# RSA in TLS 1.2 through PKCS#1 v1.5: a server that allows nothing else.
		[ "$type" != RSA ] || [ "$tls" != 1.2 ] || server=pkcs1
		for client in $CLIENTS; do
			one_client "$client" "$label" "$tls" "$server"
		done
	done
done

# ---------------------------------------------------------------- restricted servers
# digest_is OUT NAME: the server saw a client signature made with that digest.
digest_is() {
	if grep -qx "Peer signing digest: $2" "$1"; then
		ok "$3"
	else
		not_ok "$3"
		diag "saw: $(grep -a 'Peer signing digest' "$1" || echo nothing)"
	fi
}

if [ -n "${URI[rsa2048]:-}" ]; then
	for tls in 1.2 1.3; do
		for client in s_client-ref curl; do
			one_client "$client" rsa2048 "$tls" pss256 RSA-PSS
			[ "$client" != curl ] || [ -z "$CURL_SKIP" ] || continue
			digest_is "$T/out.rsa2048.$tls.$client" SHA256 \
				"TLS $tls rsa2048 $client: rsa_pss_rsae_sha256-only server saw SHA256"
		done
	done
fi
if [ -n "${URI[ec384]:-}" ]; then
	for tls in 1.2 1.3; do
		for client in s_client-uri python; do
			one_client "$client" ec384 "$tls" p384
			digest_is "$T/out.ec384.$tls.$client" SHA384 \
				"TLS $tls ec384 $client: ecdsa_secp384r1_sha384-only server saw SHA384"
		done
	done
fi
if [ -n "${URI[ec256]:-}" ]; then
	# TLS 1.3 binds the curve to the signature algorithm: P-256 cannot do ecdsa_secp384r1_sha384.
	if tls_s_client "${PORT[p384]}" 1.3 "$TOKDIR/ec256.cert.pem" "${URI[ec256]}" "$T/out.ec256.p384"; then
		not_ok "TLS 1.3 ec256: the ecdsa_secp384r1_sha384-only server refuses a P-256 key"
		diag_file "$T/out.ec256.p384"
	else
		ok "TLS 1.3 ec256: the ecdsa_secp384r1_sha384-only server refuses a P-256 key"
	fi
fi

# ---------------------------------------------------------------- imported keys
# No public-key object on the token: the public key comes from the certificate.
for label in ec-imp ed-imp; do
	if ! prepare "$label"; then
		skip "TLS 1.3 $label s_client-uri" "the agent lists no key '$label'"
		continue
	fi
	one_client s_client-uri "$label" 1.3 any
	one_client curl "$label" 1.2 any
done

# ---------------------------------------------------------------- what the agent signed
# Every TLS signature above was a digest-sign: the agent must have been
# sent the message (input 0), never a digest made by the client.
signs=$(grep -c ': sign pkcs11:' "$AGENT_LOG" || true)
is "$signs" "$handshakes" "the agent signed once per handshake ($handshakes)"
if [ "$signs" -gt 0 ] && ! grep ': sign pkcs11:' "$AGENT_LOG" | grep -v ' input 0,' >"$T/non-message"; then
	ok "the agent was sent the message itself for all $signs signatures"
else
	not_ok "the agent was sent the message itself for every signature"
	diag "signatures logged: $signs"
	diag_file "$T/non-message" 5
fi

stop_agent
is "$AGENT_RC" 0 "agent exits cleanly on SIGTERM"
done_testing
