#!/bin/bash
# checks.sh DIR: every check of issue 14 against the token that a
# tests/tokens/setup-NAME.sh brought up in DIR (DIR/token.env; see
# tests/tokens/README), through a real p11agentd started on that token's
# module alone.  TAP on stdout (tests/integration/lib.sh).
#
#   list        `p11agent list` shows the token, every key of TOKEN_KEYS and
#               its paired certificate (JSON and text)
#   sign        for every key: `p11agent sign` with each scheme of its type
#               (RSA: PKCS#1 v1.5 and PSS; EC: ECDSA; Ed25519: EdDSA),
#               verified by openssl with the public key of the certificate
#               the agent paired with it (export-cert); a scheme of
#               TOKEN_NO_SCHEMES is refused with "cannot sign with SCHEME"
#               and that key's TLS checks are skipped with the reason
#   provider    curl, TLS 1.2 and 1.3, with the key-reference file from
#               `p11agent export-key`, against openssl s_server -Verify 1
#               -verify_return_error -www trusting only TOKEN_CA: the page
#               shows the token's certificate
#   module      gnutls-cli through the PKCS#11 front-end module
#               (p11agent-pkcs11.so), TLS 1.2 and 1.3, same server
#   lock        lock, a signature is refused as locked, unlock with the
#               right PIN, sign again
#   wrong PIN   a second agent on the token through the fault module
#               (tests/fault, pass-through, counts calls): one wrong PIN is
#               exactly one C_Login on the token, the error says it was the
#               PIN (and the tries left when the token reports a PIN
#               counter flag); where the token keeps its own failure
#               counter (TOKEN_FAIL_COUNT: tpm2's lockout counter) it rose
#               by exactly one; the right PIN then unlocks and signs.
#               Skipped (with the reason) when TOKEN_WRONG_PIN_SAFE=0.
set -eu
[ $# -eq 1 ] || { echo "usage: checks.sh DIR" >&2; exit 2; }
TOKDIR_IN=$(cd "$1" && pwd)
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/../integration/lib.sh"
test_name=checks-$(basename "$TOKDIR_IN")
# shellcheck source=tests/integration/tls_lib.sh
. "$lib_dir/tls_lib.sh"
# shellcheck source=tests/integration/pkcs11_lib.sh
. "$lib_dir/pkcs11_lib.sh"

require_file "$TOKDIR_IN/token.env"
TOKEN_NAME='' TOKEN_MODULE='' TOKEN_INIT_ARGS='' TOKEN_PIN='' TOKEN_URI='' TOKEN_KEYS='' TOKEN_CA='' TOKEN_NO_SCHEMES=''
TOKEN_WRONG_PIN_SAFE=1 TOKEN_FAIL_COUNT=''
# shellcheck source=/dev/null
. "$TOKDIR_IN/token.env"
for v in TOKEN_NAME TOKEN_MODULE TOKEN_PIN TOKEN_URI TOKEN_KEYS TOKEN_CA; do
	[ -n "${!v}" ] || bail_out "token.env defines $v"
done
require_cmd openssl curl gnutls-cli timeout "$PYTHON3"
require_agent_binaries
require_provider
require_file "$TOKEN_MODULE" "$TOKEN_CA" "$PK_MODULE"
pk_san_env
diag "token $TOKEN_NAME: module $TOKEN_MODULE, $TOKEN_URI, keys $TOKEN_KEYS"

# The token's label, from its URI (lib.sh's agent_ready and json_token use
# TOKEN_LABEL).
TOKEN_LABEL=$("$PYTHON3" -c '
import sys, urllib.parse
for a in sys.argv[1][len("pkcs11:"):].split(";"):
    k, _, v = a.partition("=")
    if k == "token":
        print(urllib.parse.unquote(v))' "$TOKEN_URI")
[ -n "$TOKEN_LABEL" ] || bail_out "TOKEN_URI names the token (token=...)"

# key_label TYPE:LABEL: the label, %XX decoded (TOKEN_KEYS is split on
# blanks; OpenSC names CAC keys "CAC ID Certificate").
key_label() {
	local l=${1#*:}
	printf '%b' "${l//%/\\x}"
}

# agent_conf FILE MODULE INIT-ARGS: a configuration naming one module.
agent_conf() {
	{
		printf 'socket %s\nmodule %s\n' "$SOCK" "$2"
		[ -z "$3" ] || printf 'module-init-args %s\n' "$3"
	} >"$1"
}

agent_conf "$T/agent.conf" "$TOKEN_MODULE" "$TOKEN_INIT_ARGS"
if ! start_agent --config "$T/agent.conf" --token "$TOKEN_LABEL"; then
	bail_out "agent starts on $TOKEN_NAME and lists token '$TOKEN_LABEL'"
fi
ok "agent starts on $TOKEN_NAME and lists token '$TOKEN_LABEL'"

# ---------------------------------------------------------------- list
run p11a list
rc_is 0 "list"
stdout_has "$TOKEN_LABEL" "list names the token"
check "list --json" list_json
for spec in $TOKEN_KEYS; do
	ktype=${spec%%:*} label=$(key_label "$spec")
	case $ktype in
	rsa) want=RSA ;; ec) want=EC ;; ed25519) want=Ed25519 ;;
	*) bail_out "TOKEN_KEYS: unknown key type '$ktype'" ;;
	esac
	if grep -qF -- "$label" "$T/stdout"; then ok "list shows key $label"; else not_ok "list shows key $label"; diag_last; fi
	is "$(json_key "$label" type)" "$want" "list --json: $label is $want"
	is "$(json_key "$label" token_label)" "$TOKEN_LABEL" "list --json: $label is on token $TOKEN_LABEL"
	is "$(json_key "$label" has_certificate)" "true" "list --json: $label has a paired certificate"
	cert_uri=$(json_key "$label" cert_uri)
	case $cert_uri in
	pkcs11:*) ok "list --json: certificate of $label has a pkcs11: URI" ;;
	*) not_ok "list --json: certificate of $label has a pkcs11: URI"; diag "cert_uri '$cert_uri'" ;;
	esac
	# The text listing shows the id in hex, and as text when every byte
	# is printable (tpm2_ptool stores --id 01 as the bytes "01").
	hex=$(json_key "$label" id)
	want_id="id:           $hex"
	text=$("$PYTHON3" -c '
import sys
b = bytes.fromhex(sys.argv[1])
if b and all(0x21 <= c <= 0x7e and c != 0x22 for c in b):
    print(b.decode())' "$hex")
	[ -z "$text" ] || want_id="$want_id (\"$text\")"
	if awk -v l="'$label'" 'index($0, "key " l) { p = 1 } p && /id:/ { print; exit }' "$T/stdout" |
		grep -qxF -- "    $want_id"; then
		ok "list shows the id of $label as '$want_id'"
	else
		not_ok "list shows the id of $label as '$want_id'"
		diag_last
	fi
	diag "$label: $(json_key "$label" uri) subject $(json_key "$label" subject)"
done

# ---------------------------------------------------------------- unlock and sign
write_pin "$T/pin" "$TOKEN_PIN"
check "unlock with the right PIN" p11a unlock --token "$TOKEN_URI" --pin-file "$T/pin"

head -c 1000 /dev/urandom >"$T/msg"
declare -A URI CERT
for spec in $TOKEN_KEYS; do
	label=$(key_label "$spec")
	URI[$label]=$(json_key "$label" uri)
	CERT[$label]=$T/$label.cert.pem
	check "export-cert $label" p11a export-cert "${URI[$label]}" --out "${CERT[$label]}"
	openssl x509 -in "${CERT[$label]}" -noout -pubkey >"$T/$label.pub.pem" 2>/dev/null || :
done

# verify SCHEME PUB SIG: openssl's verdict on $T/msg.
# shellcheck disable=SC2317 # called through check
verify() {
	case $1 in
	eddsa) openssl pkeyutl -verify -pubin -inkey "$2" -rawin -in "$T/msg" -sigfile "$3" ;;
	rsa-pss) openssl dgst -sha256 -sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:32 \
		-verify "$2" -signature "$3" "$T/msg" ;;
	*) openssl dgst -sha256 -verify "$2" -signature "$3" "$T/msg" ;;
	esac
}

# sign_once LABEL SCHEME: `run` a signature of $T/msg into $T/sig.
sign_once() {
	local label=$1 scheme=$2 args=(--scheme "$2")
	case $scheme in
	rsa-pss) args+=(--hash sha256 --salt-len digest) ;;
	eddsa) ;;
	*) args+=(--hash sha256) ;;
	esac
	rm -f "$T/sig"
	run p11a sign --key "${URI[$label]}" "${args[@]}" --in "$T/msg" --out "$T/sig"
}

# sign_verify LABEL SCHEME: sign $T/msg through the agent; openssl verifies.
sign_verify() {
	local label=$1 scheme=$2
	sign_once "$label" "$scheme"
	rc_is 0 "$label: sign $scheme"
	check "$label: $scheme signature verifies with the certificate's key (openssl)" \
		verify "$scheme" "$T/$label.pub.pem" "$T/sig"
}

# schemes TYPE
schemes() {
	case $1 in
	rsa) echo rsa-pkcs1 rsa-pss ;;
	ec) echo ecdsa ;;
	ed25519) echo eddsa ;;
	esac
}

# no_scheme SCHEME: the module offers no mechanism for SCHEME (TOKEN_NO_SCHEMES).
no_scheme() {
	case " ${TOKEN_NO_SCHEMES:-} " in *" $1 "*) return 0 ;; esac
	return 1
}

for spec in $TOKEN_KEYS; do
	for scheme in $(schemes "${spec%%:*}"); do
		label=$(key_label "$spec")
		if no_scheme "$scheme"; then
			# The agent must say so, not try and fail on the token.
			sign_once "$label" "$scheme"
			rc_is 1 "$label: sign $scheme is refused ($TOKEN_NAME offers no $scheme mechanism)"
			stderr_has "cannot sign with $scheme" "$label: the error says the token cannot sign with $scheme"
		else
			sign_verify "$label" "$scheme"
		fi
	done
done

# tls_skip SPEC: why the TLS checks of key SPEC cannot run, or nothing.
tls_skip() {
	local sch
	for sch in $(schemes "${1%%:*}"); do
		if no_scheme "$sch"; then
			echo "$TOKEN_NAME offers no $sch mechanism (TOKEN_NO_SCHEMES)"
			return
		fi
	done
}

# ---------------------------------------------------------------- TLS
# The server trusts only the token's CA for client certificates; its own
# certificate comes from a CA made here.  tls_lib.sh reads both CAs from
# $TOKDIR/ca.pem and signs the server's certificate with $TOKDIR/ca.key.
TOKDIR=$T/ca
mkdir -p "$TOKDIR"
openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$TOKDIR/ca.key" \
	-out "$T/server-ca.pem" -days 2 -subj "/CN=p11agent checks server CA" >"$T/ca.log" 2>&1 ||
	bail_out "server CA made"
# server-ca first: make_server_cert signs with the first certificate in it.
cat "$T/server-ca.pem" "$TOKEN_CA" >"$TOKDIR/ca.pem"
check "server certificate" make_server_cert
start_tls_server srv || bail_out "openssl s_server requiring a client certificate listens"

# server_saw_cert OUT LABEL DESC: the page the server answered shows the
# token's certificate of LABEL (its PEM; s_server may end the page before
# the Subject lines, FIELD-NOTES "This machine").
server_saw_cert() {
	local line
	line=$(sed -n 2p "${CERT[$2]}")
	if [ -n "$line" ] && grep -qF -- "$line" "$1"; then
		ok "$3"
	else
		not_ok "$3"
		diag_file "$1" 12
		diag_file "$T/server-srv.log" 8
	fi
}

for spec in $TOKEN_KEYS; do
	label=$(key_label "$spec")
	REF=$T/$label.key.pem
	check "$label: export-key writes a key-reference file" p11a export-key "${URI[$label]}" --out "$REF"
	for tls in 1.2 1.3; do
		out=$T/curl.$label.$tls
		if [ -n "$(tls_skip "$spec")" ]; then
			skip "$label: curl TLS $tls through the provider" "$(tls_skip "$spec")"
			continue
		fi
		if [ -n "$CURL_SKIP" ]; then
			skip "$label: curl TLS $tls through the provider" "$CURL_SKIP"
			continue
		fi
		if tls_curl "${PORT[srv]}" "$tls" "${CERT[$label]}" "$REF" "$out"; then
			server_saw_cert "$out" "$label" "$label: curl TLS $tls through the provider; the server saw the token's certificate"
		else
			not_ok "$label: curl TLS $tls through the provider; the server saw the token's certificate"
			diag_file "$out" 12
		fi
	done
done

mkdir -p "$T/empty-tokens"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' \
	"$T/empty-tokens" >"$T/empty-softhsm2.conf"
# With libasan preloaded (a sanitizer build), gnutls-cli never exits after
# the page: libp11-kit's destructor deadlocks in freelocale() (seen with
# gdb; pkcs11_lib.sh has the same for p11-kit-trust).  There the page
# alone proves the handshake, each handshake costs its whole deadline, so
# the deadline is shorter and only the first key of each type is tried.
gnutls_timeout=$TLS_TIMEOUT
[ -z "$PK_SAN_SKIP" ] || gnutls_timeout=10
declare -A gnutls_type_done
for spec in $TOKEN_KEYS; do
	label=$(key_label "$spec")
	key=${URI[$label]}
	cert=$(json_key "$label" cert_uri)
	for tls in 1.2 1.3; do
		out=$T/gnutls.$label.$tls
		desc="$label: gnutls-cli TLS $tls through p11agent-pkcs11.so; the server saw the token's certificate"
		if [ -n "$(tls_skip "$spec")" ]; then
			skip "$desc" "$(tls_skip "$spec")"
			continue
		fi
		if [ -n "$PK_SAN_SKIP" ] && [ "${gnutls_type_done[${spec%%:*}]:-$label}" != "$label" ]; then
			skip "$desc" "$PK_SAN_SKIP: gnutls-cli hangs at exit; one key of each type is tried"
			continue
		fi
		gnutls_type_done[${spec%%:*}]=$label
		st=0
		tls_request | pk_client timeout "$gnutls_timeout" gnutls-cli --provider "$PK_MODULE" \
			--priority "NORMAL:-VERS-ALL:+VERS-TLS$tls" --x509cafile "$T/server-ca.pem" \
			--x509certfile "$cert" --x509keyfile "$key" -p "${PORT[srv]}" localhost \
			>"$out" 2>&1 || st=$?
		if [ "$st" -eq 124 ] && [ -n "$PK_SAN_SKIP" ] && grep -q "Protocol  : TLSv$tls" "$out"; then
			diag "$label TLS $tls: gnutls-cli did not exit after the page ($PK_SAN_SKIP: p11-kit's destructor)"
			server_saw_cert "$out" "$label" "$desc"
		elif [ "$st" -eq 0 ] && grep -q "Protocol  : TLSv$tls" "$out"; then
			server_saw_cert "$out" "$label" "$desc"
		else
			not_ok "$desc"
			diag "gnutls-cli exit status $st"
			diag_file "$out" 15
		fi
	done
done

# ---------------------------------------------------------------- lock and unlock
first=${TOKEN_KEYS%% *}
first=$(key_label "$first")
first_scheme=$(schemes "${TOKEN_KEYS%%:*}")
first_scheme=${first_scheme%% *}
check "lock" p11a lock --token "$TOKEN_URI"
list_json
is "$(json_token logged_in)" false "after lock the token is not logged in"
sign_once "$first" "$first_scheme"
if [ "$rc" -ne 0 ] && grep -qi "lock" "$T/stderr"; then
	ok "after lock a signature is refused as locked"
else
	not_ok "after lock a signature is refused as locked"
	diag_last
fi
check "unlock again with the right PIN" p11a unlock --token "$TOKEN_URI" --pin-file "$T/pin"
sign_verify "$first" "$first_scheme"
stop_agent

# ---------------------------------------------------------------- wrong PIN
if [ "$TOKEN_WRONG_PIN_SAFE" != 1 ]; then
	for d in "wrong PIN is refused" "wrong PIN costs exactly one C_Login" \
		"the error says the PIN was wrong" "the error says how many tries are left" \
		${TOKEN_FAIL_COUNT:+"the token's own failure counter rose by exactly one"} \
		"the right PIN then unlocks" "the right PIN is one C_Login" \
		"$first: sign $first_scheme" "$first: $first_scheme signature verifies"; do
		skip "$d" "TOKEN_WRONG_PIN_SAFE=$TOKEN_WRONG_PIN_SAFE: a wrong PIN is not safe on $TOKEN_NAME"
	done
	done_testing
fi

FAULT_LA=$top_builddir/tests/fault/.libs/libp11afault.so
require_file "$FAULT_LA"
# The agent names a module by its file name: call the wrapper after the token.
cp "$FAULT_LA" "$T/$TOKEN_NAME-counted.so"
CTLF=$T/ctl
: >"$CTLF"
P11A_FAULT_MODULE=$TOKEN_MODULE
export P11A_FAULT_MODULE
agent_conf "$T/agent-counted.conf" "$T/$TOKEN_NAME-counted.so" \
	"control=$CTLF${TOKEN_INIT_ARGS:+ -- $TOKEN_INIT_ARGS}"
if ! start_agent --config "$T/agent-counted.conf" --token "$TOKEN_LABEL"; then
	bail_out "agent starts on $TOKEN_NAME through the counting wrapper"
fi
logins() {
	grep -c '^C_Login' "$CTLF.calls" 2>/dev/null || :
}
list_json
flags_before=$(json_token pin_count_low),$(json_token pin_final_try),$(json_token pin_locked)
# A wrong PIN of the right length: the last character changed.
case $TOKEN_PIN in
*0) wrong=${TOKEN_PIN%?}1 ;;
*) wrong=${TOKEN_PIN%?}0 ;;
esac
write_pin "$T/wrong" "$wrong"
if [ -n "$TOKEN_FAIL_COUNT" ]; then
	fails_before=$(bash "$TOKEN_FAIL_COUNT" 2>>"$T/failcount.err") ||
		bail_out "TOKEN_FAIL_COUNT $TOKEN_FAIL_COUNT reads the token's failure counter"
	diag "the token's failure counter before the wrong PIN: $fails_before"
fi
before=$(logins)
run p11a unlock --token "$TOKEN_URI" --pin-file "$T/wrong"
if [ "$rc" -ne 0 ]; then ok "wrong PIN is refused (exit $rc)"; else not_ok "wrong PIN is refused"; diag_last; fi
after=$(logins)
is "$((${after:-0} - ${before:-0}))" 1 "wrong PIN costs exactly one C_Login on the token"
if [ -n "$TOKEN_FAIL_COUNT" ]; then
	is "$(bash "$TOKEN_FAIL_COUNT" 2>>"$T/failcount.err")" "$((fails_before + 1))" \
		"the token's own failure counter rose by exactly one ($(basename "$TOKEN_FAIL_COUNT"))"
fi
diag "the user is told: $(tr '\n' ' ' <"$T/stderr")"
if [ -n "${TOKEN_WRONG_PIN_RV:-}" ]; then
	# The module answers a wrong PIN with TOKEN_WRONG_PIN_RV and moves no
	# PIN flag (OpenSC on the virtual CAC card): nothing tells the agent it
	# was the PIN, so the error must name the module's code and say the PIN
	# may be wrong, and must not claim that the token refused it.
	if grep -qF -- "$TOKEN_WRONG_PIN_RV" "$T/stderr" && grep -qi 'PIN may be wrong' "$T/stderr" &&
		! grep -qiE 'PIN incorrect|refused the PIN' "$T/stderr"; then
		ok "the error names $TOKEN_WRONG_PIN_RV and says the PIN may be wrong (no PIN evidence from $TOKEN_NAME)"
	else
		not_ok "the error names $TOKEN_WRONG_PIN_RV and says the PIN may be wrong (no PIN evidence from $TOKEN_NAME)"
		diag_last
	fi
elif grep -qiE 'PIN (is )?(incorrect|wrong)|(incorrect|wrong) PIN' "$T/stderr"; then
	ok "the error says the PIN was wrong"
else
	not_ok "the error says the PIN was wrong"
	diag_last
fi
list_json
flags_after=$(json_token pin_count_low),$(json_token pin_final_try),$(json_token pin_locked)
diag "PIN flags (count_low,final_try,locked) before: $flags_before after: $flags_after"
case $flags_after in
*true*)
	if grep -qiE 'tr(y|ies) left|final try|last try|locked|count low|few tries' "$T/stderr"; then
		ok "the error says how many tries are left"
	else
		not_ok "the error says how many tries are left"
		diag_last
	fi
	;;
*) skip "the error says how many tries are left" "$TOKEN_NAME reports no PIN counter flag after a wrong PIN" ;;
esac
before=$(logins)
check "the right PIN then unlocks" p11a unlock --token "$TOKEN_URI" --pin-file "$T/pin"
is "$(($(logins) - ${before:-0}))" 1 "the right PIN is one C_Login"
sign_verify "$first" "$first_scheme"
stop_agent

done_testing
