#!/bin/bash
# t_pkcs11_module: the PKCS#11 front-end module (p11agent-pkcs11.so) with a
# real agent and SoftHSM2 token behind it: slots and objects as pkcs11-tool
# and p11tool see them, login forwarded as UNLOCK, every signing
# mechanism checked with openssl, pkcs11-tool --test, gnutls-cli client
# authentication (EC, RSA, Ed25519; TLS 1.2 and 1.3), and a client process
# that lives through lock, agent stop and agent restart.
. "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/pkcs11_lib.sh
. "$lib_dir/pkcs11_lib.sh"

require_cmd pkcs11-tool p11tool gnutls-cli openssl nm unshare
pk_setup
start_agent || bail_out "agent started"
M=$PK_MODULE
P11T=(pk_client timeout 60 pkcs11-tool --module "$M")

# ---------------------------------------------------------------- the library
exports=$(nm -D --defined-only "$M" | awk '$2 == "T" { print $3 }' | tr '\n' ' ')
is "$exports" "C_GetFunctionList " "the module exports C_GetFunctionList only"

# ---------------------------------------------------------------- locked token
run "${P11T[@]}" --list-token-slots
rc_is 0 "pkcs11-tool lists the module's slots"
stdout_has "token label        : $TOKEN_LABEL" "the slot holds the agent's token"
stdout_has "login required" "a locked agent token reports CKF_LOGIN_REQUIRED"
run "${P11T[@]}" --list-objects
stdout_has "Certificate Object; type = X.509 cert" "certificates are listed while locked"
if grep -q "Private Key Object" "$T/stdout"; then not_ok "no private key objects while locked"; diag_last; else ok "no private key objects while locked"; fi

run "${P11T[@]}" --login --pin 9999 --list-objects
rc_is 1 "a wrong PIN fails C_Login"
stderr_has CKR_PIN_INCORRECT "the wrong PIN is reported as CKR_PIN_INCORRECT"
list_json
is "$(json_token logged_in)" false "the agent's token stays locked after a wrong PIN"

run "${P11T[@]}" --login --pin "$USER_PIN" --list-objects --type privkey
rc_is 0 "C_Login with the right PIN is forwarded as UNLOCK"
list_json
is "$(json_token logged_in)" true "the agent's token is logged in after C_Login through the module"

# ---------------------------------------------------------------- unlocked token
run "${P11T[@]}" --list-token-slots
if grep -q "login required" "$T/stdout"; then not_ok "an unlocked token reports no login required"; diag_last; else ok "an unlocked token reports no login required"; fi
run "${P11T[@]}" --list-objects --type privkey
is "$(grep -c '^Private Key Object' "$T/stdout")" "$(key_labels | wc -l)" "every agent key has a private key object"
stdout_has "Access:     sensitive, always sensitive, never extractable" "private keys are sensitive and never extractable"
run "${P11T[@]}" --list-objects --type cert
is "$(grep -c '^Certificate Object' "$T/stdout")" "$(key_labels | wc -l)" "every key's certificate is an object"
run "${P11T[@]}" --list-objects --type pubkey
is "$(grep -c '^Public Key Object' "$T/stdout")" "$(key_labels | wc -l)" "every key has a public key object"
stdout_has "EC_PARAMS:  06082a8648ce3d030107" "P-256 public keys carry CKA_EC_PARAMS as the named-curve OID"

# certificate value, id and label match the token's
run "${P11T[@]}" --read-object --type cert --label ec-imp -o "$T/ec-imp.cert.der"
check "CKA_VALUE of a certificate is the certificate on the token" same_cert "$TOKDIR/ec-imp.cert.pem" "$T/ec-imp.cert.der"
run "${P11T[@]}" --read-object --type pubkey --label rsa-imp -o "$T/rsa-imp.pub.der"
check "a public key object is made for an imported key from its SPKI" same_pub "$TOKDIR/rsa-imp.pub.pem" "$T/rsa-imp.pub.der"

run "${P11T[@]}" --test
rc_is 0 "pkcs11-tool --test passes"
stdout_has "No errors" "pkcs11-tool --test reports no errors"
run "${P11T[@]}" --test --login --pin "$USER_PIN"
stdout_has "No errors" "pkcs11-tool --test --login (C_Login on a logged-in token) reports no errors"

# ---------------------------------------------------------------- signatures
printf 'p11agent pkcs11 module test message\n' >"$T/msg"
openssl dgst -sha384 -binary "$T/msg" >"$T/msg.sha384"
openssl dgst -sha512 -binary "$T/msg" >"$T/msg.sha512"

# sign_ok DESC LABEL MECH INPUT [pkcs11-tool options]: sign through the module.
sign_ok() {
	local desc=$1 label=$2 mech=$3 in=$4
	shift 4
	run "${P11T[@]}" --sign --id "$(key_attr "$label" id)" -m "$mech" -i "$in" -o "$T/sig" "$@"
	rc_is 0 "$desc: pkcs11-tool signs"
}
pub() { printf '%s\n' "$TOKDIR/$1.pub.pem"; }

sign_ok "ECDSA-SHA256 with ec256" ec256 ECDSA-SHA256 "$T/msg" --signature-format openssl
check "ECDSA-SHA256 signature verifies" openssl dgst -sha256 -verify "$(pub ec256)" -signature "$T/sig" "$T/msg"
sign_ok "CKM_ECDSA on a SHA-512 digest with ec521" ec521 ECDSA "$T/msg.sha512" --signature-format openssl
check "CKM_ECDSA P-521 signature verifies" openssl pkeyutl -verify -pubin -inkey "$(pub ec521)" -in "$T/msg.sha512" -sigfile "$T/sig"
sign_ok "ECDSA-SHA384 with ec-imp (imported, no public-key object on the token)" ec-imp ECDSA-SHA384 "$T/msg" --signature-format openssl
check "ec-imp signature verifies" openssl dgst -sha384 -verify "$(pub ec-imp)" -signature "$T/sig" "$T/msg"
sign_ok "SHA256-RSA-PKCS with rsa2048" rsa2048 SHA256-RSA-PKCS "$T/msg"
check "SHA256-RSA-PKCS signature verifies" openssl dgst -sha256 -verify "$(pub rsa2048)" -signature "$T/sig" "$T/msg"
sign_ok "CKM_RSA_PKCS_PSS on a SHA-384 digest with rsa-imp" rsa-imp RSA-PKCS-PSS "$T/msg.sha384" \
	--hash-algorithm SHA384 --mgf MGF1-SHA384 --salt-len -1
check "CKM_RSA_PKCS_PSS signature verifies" openssl pkeyutl -verify -pubin -inkey "$(pub rsa-imp)" \
	-in "$T/msg.sha384" -sigfile "$T/sig" -pkeyopt rsa_padding_mode:pss -pkeyopt digest:sha384 \
	-pkeyopt rsa_pss_saltlen:48
sign_ok "SHA512-RSA-PKCS-PSS with rsa2048" rsa2048 SHA512-RSA-PKCS-PSS "$T/msg" \
	--mgf MGF1-SHA512 --salt-len -1
check "SHA512-RSA-PKCS-PSS signature verifies" openssl dgst -sha512 -verify "$(pub rsa2048)" \
	-sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:-1 -signature "$T/sig" "$T/msg"
sign_ok "EDDSA with ed25519 (generated)" ed25519 EDDSA "$T/msg"
check "Ed25519 signature verifies" openssl pkeyutl -verify -pubin -inkey "$(pub ed25519)" -rawin -in "$T/msg" -sigfile "$T/sig"
sign_ok "EDDSA with ed-imp (imported)" ed-imp EDDSA "$T/msg"
check "ed-imp signature verifies" openssl pkeyutl -verify -pubin -inkey "$(pub ed-imp)" -rawin -in "$T/msg" -sigfile "$T/sig"
run "${P11T[@]}" --sign --id "$(key_attr ec256 id)" -m SHA256-RSA-PKCS -i "$T/msg" -o "$T/sig"
stderr_has CKR_KEY_TYPE_INCONSISTENT "an RSA mechanism on an EC key is refused"

# ---------------------------------------------------------------- GnuTLS
run pk_client p11tool --provider "$M" --list-all "pkcs11:token=$TOKEN_LABEL"
rc_is 0 "p11tool --list-all through the module"
is "$(grep -c 'type=private$' "$T/stdout")" "$(key_labels | wc -l)" "p11tool shows a private key URL for every key"
run pk_registry p11tool --list-token-urls
stdout_has "token=$TOKEN_LABEL" "p11tool finds the token through a p11-kit registration of the module"

# The agent never loads its own front end, even when p11-kit lists it
# (agent/modules.c skips the name; the shipped file also says disable-in).
mkdir -p "$T/reg" "$T/agent2"
chmod 0700 "$T/agent2"
printf 'module: %s\n' "$PK_MODULE" >"$T/reg/p11agent-pkcs11.module"
run pk_ns "$T/reg" "$PK_SYS_MODULES" -- timeout 3 "$P11AGENTD" --foreground --debug --socket "$T/agent2/agent.sock"
stderr_has "skipping module $(readlink -f "$PK_MODULE" 2>/dev/null || echo "$PK_MODULE")" "an agent reading p11-kit's registry skips p11agent-pkcs11.so"
if grep -q "skipping module $PK_MODULE\|skipping module $(readlink -f "$PK_MODULE")" "$T/stderr" && ! grep -qi "helper.*p11agent-pkcs11" "$T/stderr"; then
	ok "no token helper is started for the front-end module"
else
	not_ok "no token helper is started for the front-end module"
	diag_last
fi

start_s_server || bail_out "openssl s_server listens"
# tls_case LABEL VERSION PRIORITY
tls_case() {
	local cert key
	cert=$(key_uri_of "$1" cert) && key=$(key_uri_of "$1" private) || { not_ok "URIs of $1"; return; }
	printf 'GET / HTTP/1.0\r\n\r\n' | pk_client timeout 30 gnutls-cli --provider "$M" --priority "$3" \
		--x509cafile "$T/server.pem" --x509certfile "$cert" --x509keyfile "$key" \
		-p "$S_PORT" localhost >"$T/gnutls.out" 2>&1 || true
	if grep -q "Subject: O=p11agent test, CN=$1\$" "$T/gnutls.out" && grep -q "Protocol  : $2" "$T/gnutls.out"; then
		ok "gnutls-cli authenticates with $1 over $2 (the server saw CN=$1)"
	else
		not_ok "gnutls-cli authenticates with $1 over $2 (the server saw CN=$1)"
		diag_file "$T/gnutls.out" 20
		diag_file "$T/s_server.log" 10
	fi
}
tls_case ec256 TLSv1.2 NORMAL:-VERS-ALL:+VERS-TLS1.2
tls_case ec256 TLSv1.3 NORMAL:-VERS-ALL:+VERS-TLS1.3
tls_case rsa2048 TLSv1.2 NORMAL:-VERS-ALL:+VERS-TLS1.2
tls_case rsa2048 TLSv1.3 NORMAL:-VERS-ALL:+VERS-TLS1.3
tls_case ec384 TLSv1.3 NORMAL:-VERS-ALL:+VERS-TLS1.3
tls_case ec-imp TLSv1.2 NORMAL:-VERS-ALL:+VERS-TLS1.2
tls_case ed25519 TLSv1.3 NORMAL:-VERS-ALL:+VERS-TLS1.3

# ---------------------------------------------------------------- one client, agent events
coproc PK (pk_client "$PYTHON3" "$lib_dir/pkcs11_client.py" "$M" 2>"$T/pkclient.err")
PK_PID_=$PK_PID
remember_pid "$PK_PID_"
# ask CMD: one line to the client, its one-line answer in $answer (10 s at most).
answer=
ask() {
	answer=
	printf '%s\n' "$1" >&"${PK[1]}" || return 1
	IFS= read -r -t 10 answer <&"${PK[0]}" || answer="(no answer within 10 s)"
}
ask open
is "$answer" ok "long-lived client: opens a session"
ask "sign ec256 ECDSA-SHA256"
is "$answer" "ok 64" "long-lived client: signs with ec256"
ask "sign rsa2048 SHA256-RSA-PKCS-PSS"
is "$answer" "ok 256" "long-lived client: signs with RSA-PSS"
ask "forksign ec256 ECDSA-SHA256"
is "$answer" child-ok "a forked child signs with the inherited session"
ask "sign ec256 ECDSA-SHA256"
is "$answer" "ok 64" "the parent still signs after its child did"

p11a lock >/dev/null
sleep 0.3
ask "sign ec256 ECDSA-SHA256"
is "$answer" CKR_USER_NOT_LOGGED_IN "after 'p11agent lock' the held key handle gives CKR_USER_NOT_LOGGED_IN"
ask tokinfo
is "$(( ${answer#flags=} & 0x4 ))" 4 "after 'p11agent lock' the token reports CKF_LOGIN_REQUIRED"
ask "login $USER_PIN"
is "$answer" ok "C_Login in the running client unlocks the agent"
ask "sign ec256 ECDSA-SHA256"
is "$answer" "ok 64" "the same key handle signs again after the login"

stop_agent
start=$(date +%s)
ask "sign ec256 ECDSA-SHA256"
is "$answer" CKR_DEVICE_ERROR "with the agent stopped, signing fails with CKR_DEVICE_ERROR"
sleep 0.3
ask tokinfo
is "$answer" CKR_TOKEN_NOT_PRESENT "with the agent stopped, C_GetTokenInfo gives CKR_TOKEN_NOT_PRESENT"
ask slots
is "$answer" 0 "with the agent stopped, no slot has a token"
end=$(date +%s)
result $(( end - start > 5 )) "the agent being down is reported at once (took $((end - start)) s)"

start_agent || bail_out "agent restarted"
sleep 0.3
ask slots
is "$answer" 1 "after the agent restarts the slot has its token again"
ask "sign ec256 ECDSA-SHA256"
is "$answer" CKR_USER_NOT_LOGGED_IN "the restarted agent's token is locked: CKR_USER_NOT_LOGGED_IN"
unlock_token >/dev/null
sleep 0.3
ask "sign ec256 ECDSA-SHA256"
is "$answer" "ok 64" "the client process signs again with the same handle after restart and unlock"
ask "sign ed25519 EDDSA"
is "$answer" "ok 64" "and with another key"
ask quit
is "$answer" bye "the client exits"
if wait "$PK_PID_"; then st=0; else st=$?; fi
forget_pid "$PK_PID_"
is "$st" 0 "the client's C_Finalize and exit are clean"
diag_file "$T/pkclient.err" 10

done_testing
