#!/bin/bash
# t_provider_cli: the CLI verbs that serve the provider, and the provider
# leaving software keys alone.
#   - p11agent export-key: the key-reference file (PEM "P11AGENT KEY":
#     version 1, the agent's URI of the key, its public key; no secret),
#     usage errors;
#   - p11agent exec: OPENSSL_CONF points to a configuration that keeps the
#     caller's settings and activates default + p11agent, P11AGENT_SOCK is
#     set, the command runs (s_client and curl authenticate through it);
#   - with the provider loaded, software keys (files) work as before in
#     the same processes: s_client, curl, python, key generation, PEM/DER
#     parsing; and the shipped snippet loads the provider.
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
check "unlock" unlock_token
check "list --json" list_json
check "server certificate from the test CA" make_server_cert
check "s_server" start_tls_server any
[ -n "${PORT[any]:-}" ] || bail_out "TLS server running"
URI_EC=$(json_key ec256 uri)

# ---------------------------------------------------------------- export-key
run p11a export-key --help
rc_is 0 "export-key --help"
stdout_has "P11AGENT KEY" "export-key --help describes the file"
run p11a export-key
rc_is 2 "export-key without a URI is a usage error"
run p11a export-key "pkcs11:object=nokey"
rc_is 1 "export-key of an unknown key fails"
stderr_has "no such key" "export-key of an unknown key says so"
run p11a export-key "pkcs11:token=p11agent-test"
rc_is 1 "export-key of a URI naming several keys fails"
stderr_has "ambiguous, it matches $(key_labels | wc -l) keys" "export-key of a URI naming several keys says how many"
stderr_has "$(json_key rsa2048 uri)" "export-key of a URI naming several keys lists their URIs"
run p11a export-key "$URI_EC"
rc_is 0 "export-key to standard output"
cp "$T/stdout" "$T/ec256.stdout.pem"
check "export-key --out" p11a export-key "pkcs11:token=p11agent-test;object=ec256" --out "$T/ec256.key.pem"
check "the same file either way" cmp "$T/ec256.stdout.pem" "$T/ec256.key.pem"
file_has "$T/ec256.key.pem" "-----BEGIN P11AGENT KEY-----" "key reference: PEM block P11AGENT KEY"
file_lacks "$T/ec256.key.pem" "PRIVATE" "key reference: no private key in it"
openssl asn1parse -in "$T/ec256.key.pem" >"$T/asn1" 2>&1 || true
is "$(sed -n '2s/.*INTEGER *://p' "$T/asn1")" "01" "key reference: version 1"
is "$(sed -n 's/.*UTF8STRING *://p' "$T/asn1")" "$URI_EC" "key reference: the agent's URI of the key"
# The public key in it is the certificate's, as the provider reads it.
if provider_env openssl pkey -in "$T/ec256.key.pem" -pubout -out "$T/ec256.ref.pub" 2>"$T/err" &&
	cmp -s "$T/ec256.ref.pub" "$TOKDIR/ec256.pub.pem"; then
	ok "key reference: the provider reads the key's public half from it"
else
	not_ok "key reference: the provider reads the key's public half from it"
	diag_file "$T/err"
fi
# Without the provider, OpenSSL does not take it for a key.
check_fails "key reference: no key without the provider" \
	env -u OPENSSL_CONF openssl pkey -in "$T/ec256.key.pem" -noout

# ---------------------------------------------------------------- exec
run p11a exec --help
rc_is 0 "exec --help"
run p11a exec
rc_is 2 "exec without a command is a usage error"
run env -u XDG_RUNTIME_DIR TMPDIR="$T" "$P11AGENT" --socket "$SOCK" exec \
	--module "$PROVIDER_MODULE_DIR/p11agent.so" -- /nonexistent/program
rc_is 127 "exec of a missing program exits 127"
stderr_has "/nonexistent/program" "exec of a missing program names it"

# exec_env CMD...: p11agent exec with the module from the build tree; the
# generated configuration goes to $T/p11agent-UID (TMPDIR), not the session's.
exec_env() {
	env -u OPENSSL_CONF -u OPENSSL_MODULES -u XDG_RUNTIME_DIR TMPDIR="$T" \
		${SAN_ENV[@]+"${SAN_ENV[@]}"} timeout "$CLI_TIMEOUT" "$P11AGENT" --socket "$SOCK" \
		exec --module "$PROVIDER_MODULE_DIR/p11agent.so" -- "$@"
}
# shellcheck disable=SC2016 # expanded by the command's shell
run exec_env sh -c 'printf "%s\n%s\n" "$OPENSSL_CONF" "$P11AGENT_SOCK"'
rc_is 0 "exec runs the command"
conf=$(sed -n 1p "$T/stdout")
is "$(sed -n 2p "$T/stdout")" "$SOCK" "exec sets P11AGENT_SOCK to the agent's socket"
if [ -f "$conf" ]; then
	ok "exec sets OPENSSL_CONF to a generated file"
	is "$(dirname "$conf")" "$T/p11agent-$(id -u)" "exec writes it to a private directory (\$TMPDIR/p11agent-UID)"
	is "$(stat -c %a "$(dirname "$conf")")" 700 "that directory is mode 0700"
	file_has "$conf" ".include $(openssl_dir)/openssl.cnf" "the generated file includes the system openssl.cnf"
	file_has "$conf" "p11agent = " "the generated file lists the p11agent provider"
else
	not_ok "exec sets OPENSSL_CONF to a generated file"
	diag "OPENSSL_CONF=$conf"
fi
run exec_env openssl list -providers
rc_is 0 "exec: openssl list -providers"
stdout_has "p11agent: keys on PKCS#11 tokens" "exec: the p11agent provider is active"
stdout_has "OpenSSL Default Provider" "exec: the default provider is active"
# exec loads the provider itself first: a module that does not load stops
# it before the command runs.
run env -u OPENSSL_CONF -u XDG_RUNTIME_DIR TMPDIR="$T" "$P11AGENT" --socket "$SOCK" \
	exec --module /nonexistent/p11agent.so -- touch "$T/exec-ran"
rc_is 1 "exec with a module that does not load fails"
stderr_has "exec: the p11agent provider did not load from /nonexistent/p11agent.so: " \
	"exec says the provider did not load, and from where"
if [ -e "$T/exec-ran" ]; then not_ok "exec does not run the command then"; else ok "exec does not run the command then"; fi
run env -u OPENSSL_CONF -u XDG_RUNTIME_DIR TMPDIR="$T" "$P11AGENT" --socket "$SOCK" \
	exec --module "$PROVIDER_MODULE_DIR/p11agent-pkcs11.so" -- true
rc_is 1 "exec with a library that is no provider (the PKCS#11 module) fails"
stderr_has "is not an OpenSSL provider" "exec says that file is no provider"

# The shipped snippet works both ways: as OPENSSL_CONF alone and included
# from openssl.cnf (PROVIDER_CONF, see tls_lib.sh).
run env -u OPENSSL_MODULES ${SAN_ENV[@]+"${SAN_ENV[@]}"} OPENSSL_CONF="$PROVIDER_SNIPPET" openssl list -providers
stdout_has "p11agent: keys on PKCS#11 tokens" "the snippet as OPENSSL_CONF activates p11agent"
stdout_has "OpenSSL Default Provider" "the snippet as OPENSSL_CONF activates the default provider"
run env -u OPENSSL_MODULES ${SAN_ENV[@]+"${SAN_ENV[@]}"} OPENSSL_CONF="$PROVIDER_CONF" openssl list -providers
stdout_has "p11agent: keys on PKCS#11 tokens" "the snippet included from openssl.cnf activates p11agent"
stdout_has "OpenSSL Default Provider" "the snippet included from openssl.cnf activates the default provider"

# setup openssl: the same check on the snippet, then the lines to add.
run env -u OPENSSL_CONF "$P11AGENT" setup openssl --config "$PROVIDER_SNIPPET"
rc_is 0 "setup openssl with a working snippet"
stdout_has "OpenSSL loads the p11agent provider $PROVIDER_MODULE_DIR/p11agent.so" "setup openssl names the module it loaded"
stdout_has "    .include $PROVIDER_SNIPPET" "setup openssl prints the .include line"
stdout_has "    export OPENSSL_CONF=$PROVIDER_SNIPPET" "setup openssl prints the OPENSSL_CONF line"
sed "s|^module = .*|module = /nonexistent/p11agent.so|" "$PROVIDER_SNIPPET" >"$T/broken-snippet.cnf"
run env -u OPENSSL_CONF "$P11AGENT" setup openssl --config "$T/broken-snippet.cnf"
rc_is 1 "setup openssl with a snippet whose module does not load fails"
stderr_has "setup openssl: the p11agent provider did not load from /nonexistent/p11agent.so: " \
	"setup openssl says the provider did not load, and from where"
run "$P11AGENT" setup openssl --config "$T/nonexistent.cnf"
rc_is 1 "setup openssl without the snippet fails"
stderr_has "$T/nonexistent.cnf: No such file or directory" "setup openssl names the missing snippet"
run "$P11AGENT" setup openssl --module /x
rc_is 2 "setup openssl --module is a usage error"
# The caller's own configuration is kept (here: it loads the legacy provider).
cat >"$T/mine.cnf" <<'EOF'
openssl_conf = my_init
[my_init]
providers = my_providers
[my_providers]
legacy = my_legacy
default = my_default
[my_legacy]
activate = 1
[my_default]
activate = 1
EOF
run env -u OPENSSL_MODULES -u XDG_RUNTIME_DIR OPENSSL_CONF="$T/mine.cnf" TMPDIR="$T" \
	${SAN_ENV[@]+"${SAN_ENV[@]}"} "$P11AGENT" --socket "$SOCK" exec --module "$PROVIDER_MODULE_DIR/p11agent.so" -- openssl list -providers
rc_is 0 "exec with the caller's OPENSSL_CONF"
stdout_has "OpenSSL Legacy Provider" "exec keeps the providers of the caller's configuration"
stdout_has "p11agent: keys on PKCS#11 tokens" "exec adds p11agent to the caller's configuration"
# Authentication through exec: s_client with the URI, curl with the key reference.
tls_request | exec_env openssl s_client -connect "127.0.0.1:${PORT[any]}" -servername localhost \
	-CAfile "$TOKDIR/ca.pem" -cert "$TOKDIR/ec256.cert.pem" -key "$URI_EC" -quiet >"$T/exec.s_client" 2>&1 || true
server_saw "$T/exec.s_client" ec256 "exec: s_client with the URI authenticates (server saw CN=ec256)"
if [ -n "$CURL_SKIP" ]; then
	skip "exec: curl with the key reference authenticates" "$CURL_SKIP"
else
	exec_env curl -sS --cacert "$TOKDIR/ca.pem" --cert "$TOKDIR/ec256.cert.pem" --key "$T/ec256.key.pem" \
		"https://localhost:${PORT[any]}/" >"$T/exec.curl" 2>&1 || true
	server_saw "$T/exec.curl" ec256 "exec: curl with the key reference authenticates (server saw CN=ec256)"
fi

# ---------------------------------------------------------------- software keys
run provider_env openssl list -providers
stdout_has "p11agent: keys on PKCS#11 tokens" "the shipped snippet loads the p11agent provider"
stdout_has "OpenSSL Default Provider" "the shipped snippet keeps the default provider"
SOFT_KEY=$TOKDIR/private/ec-imp.key
SOFT_CERT=$TOKDIR/ec-imp.cert.pem
st=0
tls_s_client "${PORT[any]}" 1.3 "$SOFT_CERT" "$SOFT_KEY" "$T/soft.s_client" -groups P-256 || st=$?
result "$st" "software key with the provider loaded: s_client (P-256 key share)"
server_saw "$T/soft.s_client" ec-imp "software key: s_client authenticates (server saw CN=ec-imp)"
if [ -n "$CURL_SKIP" ]; then
	skip "software key: curl authenticates" "$CURL_SKIP"
else
	tls_curl "${PORT[any]}" 1.2 "$SOFT_CERT" "$SOFT_KEY" "$T/soft.curl" || true
	server_saw "$T/soft.curl" ec-imp "software key: curl authenticates (server saw CN=ec-imp)"
fi
st=0
tls_python "${PORT[any]}" 1.3 "$SOFT_CERT" "$SOFT_KEY" "$T/soft.python" || st=$?
server_saw "$T/soft.python" ec-imp "software key: python authenticates (server saw CN=ec-imp)"
check "software keys: EC key generation" provider_env openssl genpkey -algorithm EC \
	-pkeyopt ec_paramgen_curve:P-384 -out "$T/gen.key"
check "software keys: RSA key generation" provider_env openssl genpkey -algorithm RSA \
	-pkeyopt rsa_keygen_bits:2048 -out "$T/gen-rsa.key"
openssl pkey -in "$TOKDIR/private/rsa-imp.key" -outform DER -out "$T/rsa.der"
check "software keys: DER private key" provider_env openssl pkey -inform DER -in "$T/rsa.der" -noout
echo hello >"$T/msg"
check "software keys: sign with a file key" provider_env openssl dgst -sha256 -sign "$TOKDIR/private/rsa-imp.key" \
	-out "$T/msg.sig" "$T/msg"
check "software keys: verify" provider_env openssl dgst -sha256 -verify "$TOKDIR/rsa-imp.pub.pem" \
	-signature "$T/msg.sig" "$T/msg"
# A token key signs for `openssl dgst` too, and the default provider verifies.
check "token key: openssl dgst -sign with the URI" provider_env openssl dgst -sha384 -sign "$URI_EC" \
	-out "$T/tok.sig" "$T/msg"
check "token key: the signature verifies with the certificate's key" \
	env -u OPENSSL_CONF openssl dgst -sha384 -verify "$TOKDIR/ec256.pub.pem" -signature "$T/tok.sig" "$T/msg"

# X.509 signing (the signature's AlgorithmIdentifier): CSRs signed on the token.
for spec in "ec256:" "ed25519:" "rsa2048:" "rsa2048:-sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:digest -sha384"; do
	label=${spec%%:*}
	opts=${spec#*:}
	# shellcheck disable=SC2086 # opts are words
	if provider_env openssl req -new -key "$(json_key "$label" uri)" $opts -subj "/CN=csr-$label" \
		-out "$T/csr.pem" >"$T/err" 2>&1 &&
		env -u OPENSSL_CONF openssl req -in "$T/csr.pem" -verify -noout >>"$T/err" 2>&1; then
		ok "token key: openssl req signs a CSR that verifies ($label${opts:+ $opts})"
	else
		not_ok "token key: openssl req signs a CSR that verifies ($label${opts:+ $opts})"
		diag_file "$T/err"
	fi
done

stop_agent
is "$AGENT_RC" 0 "agent exits cleanly on SIGTERM"
done_testing
