#!/bin/bash
# t_tls_only: keys with `tls-only yes` (p11agentd.conf(5)) sign TLS client
# authentication only.
#
# The administrator's file makes rsa2048 and ec256 tls-only (one [key]
# section each) and locks tls-only; ec384 is named by no section.  Then:
# TLS 1.2 and 1.3 handshakes through the provider (openssl s_client with the
# pkcs11: URI, curl and python's ssl with a key-reference file) work with
# both tls-only keys; `p11agent sign` of a file, a TLS 1.3-looking message
# with the server's context string, one with 63 spaces and a digest are
# refused with the policy error (a well-formed client TLS 1.3 content is
# signed); so is openssl dgst -sign through the provider; the helper logs
# each refusal with the client's pid and the input's class; the PKCS#11
# module's C_Sign with a digest (CKM_ECDSA) or a message is refused with
# CKR_FUNCTION_REJECTED; ec384 signs anything; the user's file cannot turn
# off the locked tls-only, and bad [key] lines stop the agent with
# FILE:LINE.  Then a global tls-only yes with a [key] exception.
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/tls_lib.sh
. "$lib_dir/tls_lib.sh"
# shellcheck source=tests/integration/pkcs11_lib.sh
. "$lib_dir/pkcs11_lib.sh"

require_cmd openssl curl timeout awk "$PYTHON3" softhsm2-util pkcs11-tool
require_agent_binaries
require_provider
make_token
require_file "$PK_MODULE"
pk_san_env
mkdir -p "$T/empty-tokens" "$T/etc/p11agent" "$T/config/p11agent"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' \
	"$T/empty-tokens" >"$T/empty-softhsm2.conf"

ADMIN=$T/etc/p11agent/p11agentd.conf
cat >"$ADMIN" <<CONF
# t_tls_only: the two client-authentication keys sign TLS handshakes only
lock tls-only
[key pkcs11:token=$TOKEN_LABEL;object=rsa2048]
tls-only yes
[key pkcs11:token=$TOKEN_LABEL;object=ec256]
tls-only yes
CONF

# ---------------------------------------------------------------- configuration errors
# bad_conf DESC LINE EXPECTED FILE-CONTENT: the agent does not start, says FILE:LINE: EXPECTED.
bad_conf() {
	local desc=$1 line=$2 want=$3
	printf '%s\n' "$4" >"$T/bad/p11agent/p11agentd.conf"
	run env XDG_CONFIG_HOME="$T/bad" "$P11AGENTD" --print-config --socket "$SOCK" \
		--module "$SOFTHSM2_MODULE"
	rc_is 1 "$desc: the agent does not start"
	stderr_has "$T/bad/p11agent/p11agentd.conf:$line: $want" "$desc: FILE:LINE: reason"
}
mkdir -p "$T/bad/p11agent"
bad_conf "user's global tls-only under the lock" 1 "'tls-only' is locked by the administrator ($ADMIN:2)" \
	"tls-only no"
bad_conf "user's [key] tls-only under the lock" 2 "'tls-only' is locked by the administrator ($ADMIN:2)" \
	"[key pkcs11:token=$TOKEN_LABEL;object=rsa2048]
tls-only no"
mv "$ADMIN" "$ADMIN.locked"
bad_conf "tls-only value" 2 "tls-only must be yes or no, not 'maybe'" \
	"[key pkcs11:object=rsa2048]
tls-only maybe"
bad_conf "[key] without a pattern" 1 "[key] needs a pkcs11: URI pattern" "[key]"
bad_conf "[key] with no URI" 1 "[key nothing]: not a valid pkcs11: URI" "[key nothing]"
bad_conf "unknown [key] setting" 2 "'frobnicate' is not a [key] setting (tls-only, allow-programs, forwarding, confirm, keep-context-pin)" \
	"[key pkcs11:object=rsa2048]
frobnicate yes"
mv "$ADMIN.locked" "$ADMIN"
run env XDG_CONFIG_HOME="$T/config" "$P11AGENTD" --print-config --socket "$SOCK" \
	--module "$SOFTHSM2_MODULE"
rc_is 0 "--print-config with the [key] sections"
stdout_has "tls-only yes	# $ADMIN:4; locked at $ADMIN:2" "--print-config: the section's tls-only, its line and the lock"

# ---------------------------------------------------------------- the agent
check "agent starts on the test token" start_agent
running "$AGENT_PID" || bail_out "agent running"
check "unlock" unlock_token
check "list --json" list_json
check "server certificate from the test CA" make_server_cert
check "s_server (any signature algorithm)" start_tls_server any
check "s_server (client signatures: RSA PKCS#1 v1.5 only)" \
	start_tls_server pkcs1 -client_sigalgs RSA+SHA256:RSA+SHA384:RSA+SHA512
if [ -z "${PORT[any]:-}" ] || [ -z "${PORT[pkcs1]:-}" ]; then
	bail_out "TLS servers running"
fi

declare -A URI REF
for label in rsa2048 ec256 ec384; do
	URI[$label]=$(json_key "$label" uri)
	[ -n "${URI[$label]}" ] || bail_out "the agent lists key $label"
	REF[$label]=$T/$label.key.pem
	check "$label: export-key" p11a export-key "${URI[$label]}" --out "${REF[$label]}"
done

# ---------------------------------------------------------------- handshakes of tls-only keys
handshake() {
	local client=$1 label=$2 tls=$3 server=$4 out st=0
	out=$T/out.$label.$tls.$client
	if [ "$client" = curl ] && [ -n "$CURL_SKIP" ]; then
		skip "tls-only $label: TLS $tls $client handshake" "$CURL_SKIP"
		return
	fi
	case $client in
	s_client) tls_s_client "${PORT[$server]}" "$tls" "$TOKDIR/$label.cert.pem" "${URI[$label]}" "$out" || st=$? ;;
	curl) tls_curl "${PORT[$server]}" "$tls" "$TOKDIR/$label.cert.pem" "${REF[$label]}" "$out" || st=$? ;;
	python) tls_python "${PORT[$server]}" "$tls" "$TOKDIR/$label.cert.pem" "${REF[$label]}" "$out" || st=$? ;;
	esac
	if [ "$st" -eq 0 ] && grep -qE "^ *$(subject_line "$label")\$" "$out"; then
		ok "tls-only $label: TLS $tls $client handshake"
	else
		not_ok "tls-only $label: TLS $tls $client handshake"
		diag "exit status $st"
		diag_file "$out" 12
	fi
}
for label in rsa2048 ec256; do
	for tls in 1.2 1.3; do
		server=any
		[ "$label" != rsa2048 ] || [ "$tls" != 1.2 ] || server=pkcs1
		for client in s_client curl python; do
			handshake "$client" "$label" "$tls" "$server"
		done
	done
done

# ---------------------------------------------------------------- refusals
# refused DESC LABEL SCHEME FILE CLASS: p11agent sign of FILE is refused with the policy error.
refused() {
	run p11a sign --key "${URI[$2]}" --scheme "$3" --hash sha256 --in "$4" --out "$T/sig"
	rc_is 1 "$1: refused"
	stderr_has "not allowed by policy: key '$2' on token '$TOKEN_LABEL' is tls-only and this is not a TLS client handshake (input: $5)" \
		"$1: the policy error names the key and the class"
}
printf 'a document to sign\n' >"$T/doc"
refused "sign a file with tls-only rsa2048" rsa2048 rsa-pkcs1 "$T/doc" raw
refused "sign a file with tls-only ec256" ec256 ecdsa "$T/doc" raw
"$PYTHON3" - "$T" <<'PY'
import sys
t = sys.argv[1]
h = bytes(range(32))
client = b"TLS 1.3, client CertificateVerify"
server = b"TLS 1.3, server CertificateVerify"
open(t + "/tls13-server", "wb").write(b" " * 64 + server + b"\0" + h)
open(t + "/tls13-63", "wb").write(b" " * 63 + client + b"\0" + h)
open(t + "/tls13-client", "wb").write(b" " * 64 + client + b"\0" + h)
PY
refused "a TLS 1.3 message with the server's context string" ec256 ecdsa "$T/tls13-server" tls1.3-server
refused "a TLS 1.3 message with 63 spaces" ec256 ecdsa "$T/tls13-63" raw
# Through the provider: openssl dgst -sign of a file.
run provider_env openssl dgst -sha256 -sign "${URI[ec256]}" -out "$T/sig" "$T/doc"
if [ "$rc" -ne 0 ]; then ok "provider: openssl dgst -sign of a file with tls-only ec256 fails"; else not_ok "provider: openssl dgst -sign of a file with tls-only ec256 fails"; fi
stderr_has "not allowed by policy: key 'ec256'" "provider: the error is the agent's policy error"
# The CLI's message.
run p11a sign --key "${URI[ec256]}" --scheme ecdsa --hash sha256 --in "$T/doc" --out "$T/sig"
stderr_has "p11agent: sign with ${URI[ec256]}: not allowed by policy" "the CLI names the command, the key and the agent's reason"
stderr_has "p11agent: the agent's configuration makes this key tls-only" "the CLI says where the policy comes from"
# A digest from the CLI cannot be classified.
head -c 32 /dev/urandom >"$T/digest"
run p11a sign --key "${URI[ec256]}" --scheme ecdsa --hash sha256 --digest --in "$T/digest" --out "$T/sig"
rc_is 1 "a digest for tls-only ec256: refused"
stderr_has "(input: digest)" "a digest for tls-only ec256: the class is digest"
run p11a sign --key "${URI[ec256]}" --scheme ecdsa --hash sha256 --in "$T/tls13-client" --out "$T/sig"
rc_is 0 "a well-formed client TLS 1.3 content is signed by tls-only ec256"
# log_has REGEX DESC: the agent's log has a line matching REGEX.
log_has() {
	if grep -qE -- "$1" "$AGENT_LOG"; then
		ok "$2"
	else
		not_ok "$2"
		diag "the agent's log lacks: $1"
		diag_file "$AGENT_LOG" 15
	fi
}
log_has "refused pkcs11:.*not allowed by policy: key 'ec256'.*\\(input: tls1\\.3-server\\)" \
	"the helper logs the refusal with the key and the class"
log_has ": pid [1-9][0-9]*: refused pkcs11:" "the helper logs the client's pid"

# ---------------------------------------------------------------- a key no section names
run p11a sign --key "${URI[ec384]}" --scheme ecdsa --hash sha256 --in "$T/doc" --out "$T/sig"
rc_is 0 "ec384 (no [key] section) signs a file"
run p11a sign --key "${URI[ec384]}" --scheme ecdsa --hash sha256 --in "$T/tls13-server" --out "$T/sig"
rc_is 0 "ec384 (no [key] section) signs anything"

# ---------------------------------------------------------------- the PKCS#11 module: digests
pk_out=$(printf 'open\nsign ec256 ECDSA\nsign ec384 ECDSA\nsign ec256 ECDSA-SHA256\nquit\n' |
	pk_client timeout 60 "$PYTHON3" "$lib_dir/pkcs11_client.py" "$PK_MODULE" 2>"$T/pk.err" || true)
is "$(echo "$pk_out" | sed -n 2p)" CKR_FUNCTION_REJECTED \
	"module C_Sign(CKM_ECDSA, a digest) with tls-only ec256: CKR_FUNCTION_REJECTED"
is "$(echo "$pk_out" | sed -n 3p | cut -d' ' -f1)" ok "module C_Sign(CKM_ECDSA) with ec384: signed"
is "$(echo "$pk_out" | sed -n 4p)" CKR_FUNCTION_REJECTED \
	"module C_Sign(CKM_ECDSA_SHA256, a message) with tls-only ec256: CKR_FUNCTION_REJECTED"

stop_agent
is "$AGENT_RC" 0 "agent exits cleanly on SIGTERM"

# ---------------------------------------------------------------- the default and exceptions
# Every key tls-only by default, ec384 excepted by the user's file (nothing locked).
cat >"$ADMIN" <<CONF
tls-only yes
CONF
cat >"$T/config/p11agent/p11agentd.conf" <<CONF
[key pkcs11:token=$TOKEN_LABEL]
[key pkcs11:object=ec384]
tls-only no
CONF
check "agent starts with tls-only yes by default" start_agent
check "unlock" unlock_token
run p11a sign --key "${URI[ec256]}" --scheme ecdsa --hash sha256 --in "$T/doc" --out "$T/sig"
rc_is 1 "default tls-only yes: ec256 refuses a file"
stderr_has "(input: raw)" "default tls-only yes: the policy error"
run p11a sign --key "${URI[ec384]}" --scheme ecdsa --hash sha256 --in "$T/doc" --out "$T/sig"
rc_is 0 "the user's [key] section with tls-only no: ec384 signs a file"
handshake s_client ec256 1.3 any
stop_agent
is "$AGENT_RC" 0 "agent exits cleanly on SIGTERM"
done_testing
