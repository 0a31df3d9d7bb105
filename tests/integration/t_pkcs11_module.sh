#!/bin/bash
# t_pkcs11_module: the PKCS#11 front-end module (p11agent-pkcs11.so) with a
# real agent and SoftHSM2 token behind it: slots and objects as pkcs11-tool
# and p11tool see them, login forwarded as UNLOCK, every signing
# mechanism checked with openssl, pkcs11-tool --test, gnutls-cli client
# authentication (EC, RSA, Ed25519; TLS 1.2 and 1.3), a client process
# that lives through lock, agent stop and agent restart, and what becomes
# of URIs that match several keys (GnuTLS refuses some itself; the module
# refuses to sign with a key a lookup by id=/object= picked from several).
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
stderr_has "not using module p11agent-pkcs11 ($PK_MODULE): p11agent's own front end" \
	"an agent reading p11-kit's registry skips p11agent-pkcs11.so"
if grep -q "not using module p11agent-pkcs11 " "$T/stderr" && ! grep -qi "helper.*p11agent-pkcs11" "$T/stderr"; then
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
# answer_is WANT CMD: ask CMD; its answer is WANT.
answer_is() {
	ask "$2" && [ "$answer" = "$1" ]
}
# ask_until SECONDS WANT CMD: ask CMD until it answers WANT (the module
# refreshes its view of the agent every 200 ms: wait for that, not a
# guess); $answer is the last answer, for the check that follows.
ask_until() {
	poll "$1" answer_is "$2" "$3" || true
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
ask_until 5 CKR_USER_NOT_LOGGED_IN "sign ec256 ECDSA-SHA256"
is "$answer" CKR_USER_NOT_LOGGED_IN "after 'p11agent lock' the held key handle gives CKR_USER_NOT_LOGGED_IN"
# The signature's error comes from the agent; the token flags from the
# module's own view, refreshed every 200 ms: wait for that refresh.
login_required() {
	ask tokinfo && case $answer in flags=*) [ $((${answer#flags=} & 0x4)) -eq 4 ] ;; *) false ;; esac
}
poll 5 login_required || true
is "$(( ${answer#flags=} & 0x4 ))" 4 "after 'p11agent lock' the token reports CKF_LOGIN_REQUIRED"
ask "login $USER_PIN"
is "$answer" ok "C_Login in the running client unlocks the agent"
ask "sign ec256 ECDSA-SHA256"
is "$answer" "ok 64" "the same key handle signs again after the login"

stop_agent
start=$(date +%s)
ask "sign ec256 ECDSA-SHA256"
is "$answer" CKR_DEVICE_ERROR "with the agent stopped, signing fails with CKR_DEVICE_ERROR"
ask_until 5 CKR_TOKEN_NOT_PRESENT tokinfo
is "$answer" CKR_TOKEN_NOT_PRESENT "with the agent stopped, C_GetTokenInfo gives CKR_TOKEN_NOT_PRESENT"
ask slots
is "$answer" 0 "with the agent stopped, no slot has a token"
end=$(date +%s)
result $(( end - start > 5 )) "the agent being down is reported at once (took $((end - start)) s)"

start_agent || bail_out "agent restarted"
ask_until 5 1 slots
is "$answer" 1 "after the agent restarts the slot has its token again"
ask "sign ec256 ECDSA-SHA256"
is "$answer" CKR_USER_NOT_LOGGED_IN "the restarted agent's token is locked: CKR_USER_NOT_LOGGED_IN"
unlock_token >/dev/null
ask_until 5 "ok 64" "sign ec256 ECDSA-SHA256"
is "$answer" "ok 64" "the client process signs again with the same handle after restart and unlock"
ask "sign ed25519 EDDSA"
is "$answer" "ok 64" "and with another key"
ask quit
is "$answer" bye "the client exits"
if wait "$PK_PID_"; then st=0; else st=$?; fi
forget_pid "$PK_PID_"
is "$st" 0 "the client's C_Finalize and exit are clean"
diag_file "$T/pkclient.err" 10

# ---------------------------------------------------------------- URIs that match several keys
# The module never sees a URI: GnuTLS parses it, matches its token part
# against C_GetTokenInfo itself and searches each token with CKA_CLASS
# plus the URI's id= and object=, taking the first object C_FindObjects
# returns.  GnuTLS 3.7 refuses a URL without id= or object= before it
# searches.  A search by id= or object= that matches several private keys
# and is ended after the first is the one trace of a vague URI the module
# gets: it then refuses to sign with the key so picked in that session
# (docs/pkcs11-module.md, "URIs that match several keys").
SPY=${PKCS11_SPY:-/usr/lib/x86_64-linux-gnu/pkcs11-spy.so}
require_file "$SPY"
VAGUE="pkcs11:token=$TOKEN_LABEL"
# server_certs: client certificates s_server has verified so far.
server_certs() {
	awk '/^depth=0 / { n++ } END { print n + 0 }' "$T/s_server.log"
}
# gnutls_get CERT KEY OUT [MODULE]: one GET with gnutls-cli; sets st.
gnutls_get() {
	st=0
	printf 'GET / HTTP/1.0\r\n\r\n' | pk_client timeout 30 gnutls-cli --provider "${4:-$M}" \
		--x509cafile "$T/server.pem" --x509certfile "$1" --x509keyfile "$2" \
		-p "$S_PORT" localhost >"$3" 2>&1 || st=$?
}
# refused DESC OUT TEXT: gnutls-cli failed (no timeout) saying TEXT.
refused() {
	if [ "$st" -eq 124 ] && [ -n "$PK_SAN_SKIP" ]; then
		# Seen only with libasan preloaded: gnutls-cli prints its error,
		# then does not exit; the message and the server are checked below.
		skip "$1: gnutls-cli fails" "$PK_SAN_SKIP: gnutls-cli hangs after the error"
	elif [ "$st" -ne 0 ] && [ "$st" -ne 124 ]; then
		ok "$1: gnutls-cli fails (exit status $st)"
	else
		not_ok "$1: gnutls-cli fails (exit status $st)"
		diag_file "$2" 10
	fi
	file_has "$2" "$3" "$1: it says \"$3\""
}

seen=$(server_certs)
rm -f "$T/spy-vague.log"
PKCS11SPY=$M PKCS11SPY_OUTPUT=$T/spy-vague.log gnutls_get "$TOKDIR/ec256.cert.pem" "$VAGUE" \
	"$T/gnutls-vague-key.out" "$SPY"
refused "key URL without id= or object= (pkcs11:token=...)" "$T/gnutls-vague-key.out" "Error loading url"
is "$(server_certs)" "$seen" "key URL without id= or object=: the server saw no client certificate"
if [ -s "$T/spy-vague.log" ] && ! grep -q C_FindObjectsInit "$T/spy-vague.log"; then
	ok "GnuTLS refuses that URL itself: the module got no C_FindObjectsInit"
else
	not_ok "GnuTLS refuses that URL itself: the module got no C_FindObjectsInit"
	diag_file "$T/spy-vague.log" 20
fi
seen=$(server_certs)
gnutls_get "$VAGUE;type=cert" "$(key_uri_of ec256 private)" "$T/gnutls-vague-cert.out"
refused "certificate URL without id= or object= (pkcs11:token=...;type=cert)" \
	"$T/gnutls-vague-cert.out" "Error loading cert file"
is "$(server_certs)" "$seen" "certificate URL without id= or object=: the server saw no client certificate"

# A second key labelled ec256 (id 21, certificate CN=ec256-dup) on the
# same token: pkcs11:token=...;object=ec256 now names two keys.
stop_agent
dup=$T/ec256-dup
printf 'basicConstraints = critical,CA:false\nkeyUsage = critical,digitalSignature\nextendedKeyUsage = clientAuth\n' \
	>"$dup.ext"
if openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dup.key" 2>"$dup.log" &&
	openssl req -new -key "$dup.key" -subj "/O=p11agent test/CN=ec256-dup" -out "$dup.csr" 2>>"$dup.log" &&
	openssl x509 -req -in "$dup.csr" -CA "$TOKDIR/ca.pem" -CAkey "$TOKDIR/ca.key" -set_serial 9100 \
		-days 2 -extfile "$dup.ext" -outform DER -out "$dup.cert.der" 2>>"$dup.log" &&
	openssl pkey -in "$dup.key" -outform DER -out "$dup.key.der" 2>>"$dup.log" &&
	pkcs11-tool --module "$SOFTHSM2_MODULE" --token-label "$TOKEN_LABEL" --login --pin "$USER_PIN" \
		--write-object "$dup.key.der" --type privkey --id 21 --label ec256 --usage-sign >>"$dup.log" 2>&1 &&
	pkcs11-tool --module "$SOFTHSM2_MODULE" --token-label "$TOKEN_LABEL" --login --pin "$USER_PIN" \
		--write-object "$dup.cert.der" --type cert --id 21 --label ec256 >>"$dup.log" 2>&1; then
	ok "a second key labelled ec256, with its certificate, on the token"
else
	not_ok "a second key labelled ec256, with its certificate, on the token"
	diag_file "$dup.log"
fi
start_agent || bail_out "agent restarted with the second ec256 key"
unlock_token >/dev/null
list_json
is "$("$PYTHON3" -c 'import json, sys; print(sum(k.get("label") == "ec256" for k in json.load(open(sys.argv[1]))["keys"]))' "$T/list.json")" \
	2 "the agent lists two keys labelled ec256"

NAMED2="$VAGUE;object=ec256"
run p11a export-key "$NAMED2;type=private"
rc_is 1 "p11agent export-key refuses a URI naming both ec256 keys"
seen=$(server_certs)
gnutls_get "$NAMED2;type=cert" "$NAMED2;type=private" "$T/gnutls-two.out"
refused "URLs naming two keys by object= (GnuTLS takes the first match)" "$T/gnutls-two.out" \
	"p11agent-pkcs11: not signing: the key was picked from 2 private keys"
is "$(server_certs)" "$seen" "URLs naming two keys by object=: the server saw no client certificate"
file_has "$T/gnutls-two.out" "id=%21;object=ec256;type=private" \
	"URLs naming two keys by object=: the module names the matching keys"
file_has "$T/gnutls-two.out" "add id= and object=" "URLs naming two keys by object=: the module says how to name one"
gnutls_get "$NAMED2;id=%02;type=cert" "$NAMED2;id=%02;type=private" "$T/gnutls-one.out"
if grep -q "Subject: O=p11agent test, CN=ec256\$" "$T/gnutls-one.out"; then
	ok "a URL naming one of them by id= and object= still authenticates (the server saw CN=ec256)"
else
	not_ok "a URL naming one of them by id= and object= still authenticates (the server saw CN=ec256)"
	diag_file "$T/gnutls-one.out" 20
fi
run "${P11T[@]}" --test
stdout_has "No errors" "pkcs11-tool --test (keys walked by CKA_CLASS alone) still passes with both keys"

done_testing
