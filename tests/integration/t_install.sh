#!/bin/bash
# t_install.sh: a user's own `./configure --prefix=... && make install`,
# then the README's "Use" section against what it installed.
#
# Everything user-side runs as an unprivileged user (nobody, through
# setpriv, when the suite runs as root) with its own HOME, TMPDIR and
# XDG_RUNTIME_DIR, on a copy of the release tree (`make distdir`):
#   - configure with a decoy prefix and build, then configure with the
#     real one and `make install`: what embeds paths is rebuilt (the
#     installed CLI names the real prefix, never the decoy);
#   - make install succeeds without write access outside the prefix, puts
#     each piece where configure's summary said, no libtool .la files,
#     the snippet and the module file name the installed files;
#   - README "Use": eval "$(p11agentd)" (modules from the p11-kit
#     registry), unlock, list, sign, pubkey, openssl dgst -verify, lock;
#   - OpenSSL: the lines `p11agent setup openssl` prints (and configure's
#     summary) load the installed provider both ways, OPENSSL_CONF and
#     .include from openssl.cnf; s_client with the URI and curl with an
#     export-key reference authenticate to a server; `p11agent exec` uses
#     the installed provider;
#   - p11-kit: after the summary's `ln -s` into ~/.config/pkcs11/modules,
#     p11-kit lists the agent's token under p11agent-pkcs11 and
#     `p11tool --list-tokens` sees it.
. "$(dirname "$0")/lib.sh"
. "$lib_dir/tls_lib.sh"

require_cmd setpriv openssl curl p11-kit p11tool make
U=$T/u
PREFIX=$U/prefix
DECOY=$U/decoy
mkdir -p "$U/home" "$U/tmp" "$U/run" "$U/src"
chmod 0700 "$U/run"
run_as=()
if [ "$(id -u)" = 0 ]; then
	# nobody must reach $U through $T, and own it.
	chmod 0711 "$T"
	run_as=(setpriv --reuid=65534 --regid=65534 --clear-groups)
fi

# as_user CMD...: CMD as the user, in a clean environment (P11AGENT_SOCK
# once the agent runs); the current directory is the tree.
USER_SOCK=
as_user() {
	local e=(HOME="$U/home" TMPDIR="$U/tmp" XDG_RUNTIME_DIR="$U/run" LANG=C.UTF-8
		PATH="$PREFIX/bin:/usr/local/bin:/usr/bin:/bin" SOFTHSM2_CONF="$U/token/softhsm2.conf")
	[ -z "$USER_SOCK" ] || e+=(P11AGENT_SOCK="$USER_SOCK")
	(cd "$U/src" && ${run_as[@]+"${run_as[@]}"} env -i "${e[@]}" "$@")
}

# ---------------------------------------------------------------- build and install
check "make distdir: the release tree" make -C "$top_builddir" distdir distdir="$U/src"
[ "$(id -u)" != 0 ] || chown -R 65534:65534 "$U"
check "as the user: mktoken.sh makes a SoftHSM2 token in the user's directory" \
	as_user env SOFTHSM2_MODULE="$SOFTHSM2_MODULE" bash "$U/src/tests/integration/mktoken.sh" "$U/token"
TOKDIR=$U/token
check "as the user: ./configure --prefix=DECOY && make" \
	as_user sh -c "./configure --prefix='$DECOY' >'$U/configure-decoy.out' 2>&1 && make -j2 >'$U/make-decoy.out' 2>&1"
check "as the user: ./configure --prefix=PREFIX" \
	as_user sh -c "./configure --prefix='$PREFIX' >'$U/configure.out' 2>&1"
check "as the user: make install (no write access outside the prefix)" \
	as_user sh -c "make -j2 install >'$U/install.out' 2>&1"
[ -x "$PREFIX/bin/p11agent" ] || { diag_file "$U/install.out"; bail_out "make install installed p11agent"; }

# configure's summary says where each piece goes: it is there.
summary_path() {
	sed -n "s|^  $1 *||p" "$U/configure.out"
}
provider=$PREFIX/lib/ossl-modules/p11agent.so
snippet=$PREFIX/etc/ssl/p11agent-openssl.cnf
pkcs11=$PREFIX/lib/pkcs11/p11agent-pkcs11.so
modfile=$PREFIX/share/p11-kit/modules/p11agent-pkcs11.module
is "$(summary_path "OpenSSL provider")" "$provider" "configure's summary: the provider under the prefix"
is "$(summary_path "OpenSSL snippet")" "$snippet" "configure's summary: the snippet under the prefix"
is "$(summary_path "PKCS#11 module")" "$pkcs11" "configure's summary: the PKCS#11 module under the prefix"
is "$(summary_path "p11-kit module file")" "$modfile" "configure's summary: the p11-kit module file under the prefix"
for f in "$PREFIX/bin/p11agentd" "$provider" "$snippet" "$pkcs11" "$modfile" \
	"$PREFIX/share/man/man1/p11agent.1" "$PREFIX/share/man/man8/p11agentd.8" \
	"$PREFIX/share/man/man7/p11agent-provider.7" "$PREFIX/share/man/man5/p11agentd.conf.5" \
	"$PREFIX/lib/systemd/user/p11agentd.service" "$PREFIX/lib/systemd/user/p11agentd.socket" \
	"$PREFIX/lib/environment.d/50-p11agent.conf"; do
	if [ -f "$f" ]; then ok "installed: ${f#"$PREFIX"/}"; else not_ok "installed: ${f#"$PREFIX"/}"; fi
done
is "$(find "$PREFIX" -name '*.la' | wc -l)" 0 "no libtool .la files installed"
file_has "$modfile" "module: $pkcs11" "the p11-kit module file names the installed module by its full path"
file_has "$snippet" "module = $provider" "the snippet names the installed provider by its full path"
file_has "$PREFIX/share/man/man7/p11agent-provider.7" "export OPENSSL_CONF=$snippet" \
	"p11agent-provider(7) names the installed snippet"
file_has "$PREFIX/lib/systemd/user/p11agentd.service" "ExecStart=$PREFIX/bin/p11agentd" \
	"the user service runs the installed agent"
# Built first for the decoy prefix: make rebuilt what names paths.
as_user p11agent setup --help >"$T/setup-help" 2>&1
as_user p11agent exec --help >>"$T/setup-help" 2>&1
file_has "$T/setup-help" "$pkcs11" "after ./configure with a new prefix, make rebuilt the CLI: it names the new PKCS#11 module"
file_has "$T/setup-help" "$provider" "... and the new provider"
file_lacks "$T/setup-help" "$DECOY" "... and nothing of the old prefix"

# ---------------------------------------------------------------- README "Use"
# eval "$(p11agentd)", then the commands, as the README shows them (the
# PIN from a file instead of the terminal).
printf '%s\n' "$USER_PIN" >"$U/pin"
chmod 0600 "$U/pin"
[ "$(id -u)" != 0 ] || chown 65534:65534 "$U/pin"
# shellcheck disable=SC2016 # expanded by the user's shell
check "README: eval \"\$(p11agentd)\" starts the installed agent (modules from the p11-kit registry)" \
	as_user sh -c 'eval "$(p11agentd)" && printf "%s\n%s\n" "$P11AGENT_SOCK" "$P11AGENT_PID" >"$1"' sh "$U/agent.env"
USER_SOCK=$(sed -n 1p "$U/agent.env" 2>/dev/null)
AGENT_PID=$(sed -n 2p "$U/agent.env" 2>/dev/null)
P11AGENTD=$PREFIX/bin/p11agentd
if [ -n "$AGENT_PID" ] && running "$AGENT_PID"; then
	remember_pid "$AGENT_PID"
	AGENT_HELPERS=$(child_pid_list "$AGENT_PID")
	ok "the agent runs (pid $AGENT_PID)"
else
	bail_out "the agent runs"
fi
is "$USER_SOCK" "$U/run/p11agent/agent.sock" "P11AGENT_SOCK is \$XDG_RUNTIME_DIR/p11agent/agent.sock"
uri="pkcs11:token=$TOKEN_LABEL;object=ec256"
# user_lists_token: the user's agent lists the test token (its helper is up).
user_lists_token() {
	as_user p11agent list >"$T/list.out" 2>&1 && grep -qF "token=$TOKEN_LABEL" "$T/list.out"
}
poll 10 user_lists_token || true
check "README: p11agent unlock" as_user p11agent unlock --pin-file "$U/pin"
run as_user p11agent list
stdout_has "token=$TOKEN_LABEL;id=%02;object=ec256;type=private" "README: p11agent list shows the key's URI"
printf 'hello from t_install\n' >"$U/tmp/msg"
[ "$(id -u)" != 0 ] || chown 65534:65534 "$U/tmp/msg"
check "README: p11agent sign --scheme ecdsa" \
	as_user p11agent sign --key "$uri;type=private" --scheme ecdsa --in "$U/tmp/msg" --out "$U/tmp/msg.sig"
check "README: p11agent pubkey > pub.pem" as_user sh -c 'p11agent pubkey "$1" >"$2"' sh "$uri" "$U/tmp/pub.pem"
check "README: openssl dgst -sha256 -verify pub.pem -signature msg.sig msg" \
	as_user openssl dgst -sha256 -verify "$U/tmp/pub.pem" -signature "$U/tmp/msg.sig" "$U/tmp/msg"

# ---------------------------------------------------------------- OpenSSL, as printed
run as_user p11agent setup openssl
rc_is 0 "p11agent setup openssl: the installed snippet loads the installed provider"
stdout_has "OpenSSL loads the p11agent provider $provider" "setup openssl names the installed provider"
include_line=$(sed -n 's/^    \(\.include .*\)$/\1/p' "$T/stdout")
export_line=$(sed -n 's/^    export \(OPENSSL_CONF=.*\)$/\1/p' "$T/stdout")
is "$include_line" ".include $snippet" "setup openssl prints the .include line for the installed snippet"
is "$export_line" "OPENSSL_CONF=$snippet" "setup openssl prints the OPENSSL_CONF line"
file_has "$U/configure.out" "      $include_line" "configure's summary prints the same .include line"
file_has "$U/configure.out" "export $export_line" "configure's summary prints the same OPENSSL_CONF line"
# Way 1: the exported OPENSSL_CONF.  Way 2: openssl.cnf with the .include line at its end.
{ cat "$(openssl_dir)/openssl.cnf"; printf '%s\n' "$include_line"; } >"$U/tmp/openssl.cnf"
chmod 0644 "$U/tmp/openssl.cnf"
run as_user env "$export_line" openssl list -providers
stdout_has "p11agent: keys on PKCS#11 tokens" "OPENSSL_CONF=snippet: openssl loads the installed provider"
stdout_has "OpenSSL Default Provider" "OPENSSL_CONF=snippet: and the default provider"
run as_user env OPENSSL_CONF="$U/tmp/openssl.cnf" openssl list -providers
stdout_has "p11agent: keys on PKCS#11 tokens" "openssl.cnf + .include snippet: openssl loads the installed provider"
stdout_has "OpenSSL Default Provider" "openssl.cnf + .include snippet: and the default provider"
run as_user p11agent exec -- openssl list -providers
stdout_has "p11agent: keys on PKCS#11 tokens" "p11agent exec (no --module) loads the installed provider"

make_server_cert || bail_out "server certificate"
start_tls_server use || bail_out "s_server"
tls_request | as_user env "$export_line" timeout "$TLS_TIMEOUT" openssl s_client \
	-connect "127.0.0.1:${PORT[use]}" -servername localhost -CAfile "$TOKDIR/ca.pem" \
	-cert "$TOKDIR/ec256.cert.pem" -key "$uri" -quiet >"$T/s_client.out" 2>&1 || diag "s_client exited $?"
server_saw "$T/s_client.out" ec256 "README: openssl s_client -key pkcs11:... (OPENSSL_CONF=snippet) authenticates"
check "README: p11agent export-key --out mykey.ref.pem" \
	as_user p11agent export-key "$uri" --out "$U/tmp/mykey.ref.pem"
as_user env OPENSSL_CONF="$U/tmp/openssl.cnf" timeout "$TLS_TIMEOUT" curl -sS --cacert "$TOKDIR/ca.pem" \
	--cert "$TOKDIR/ec256.cert.pem" --key "$U/tmp/mykey.ref.pem" "https://localhost:${PORT[use]}/" \
	>"$T/curl.out" 2>&1 || diag "curl exited $?"
server_saw "$T/curl.out" ec256 "README: curl --key mykey.ref.pem (openssl.cnf + .include) authenticates"

# ---------------------------------------------------------------- p11-kit, as printed
# configure's summary: "mkdir -p ~/.config/pkcs11/modules" and "ln -s ... ~/.config/pkcs11/modules/".
mk_line=$(sed -n 's/^      \(mkdir -p ~\/\.config\/pkcs11\/modules\)$/\1/p' "$U/configure.out")
ln_line=$(sed -n 's/^      \(ln -s .*p11agent-pkcs11\.module ~\/\.config\/pkcs11\/modules\/\)$/\1/p' "$U/configure.out")
is "$ln_line" "ln -s $modfile ~/.config/pkcs11/modules/" "configure's summary says how p11-kit finds the module file"
check "the summary's mkdir and ln -s, as the user" as_user sh -c "$mk_line && $ln_line"
# The client sees an empty SoftHSM2 store: the token it sees is the agent's.
mkdir -p "$U/tmp/empty"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$U/tmp/empty" >"$U/tmp/empty.conf"
[ "$(id -u)" != 0 ] || chown -R 65534:65534 "$U/tmp"
run as_user env SOFTHSM2_CONF="$U/tmp/empty.conf" p11-kit list-modules
awk '/^[^ ]/ { m = $1 } m == "p11agent-pkcs11:" && $1 == "token:" { print $2 }' "$T/stdout" >"$T/pk-tokens"
file_has "$T/pk-tokens" "$TOKEN_LABEL" "p11-kit lists the agent's token under p11agent-pkcs11 (the installed module file)"
run as_user env SOFTHSM2_CONF="$U/tmp/empty.conf" p11tool --list-tokens
stdout_has "token=$TOKEN_LABEL" "p11tool --list-tokens sees the agent's token"

check "README: p11agent lock" as_user p11agent lock
# Not our child (it detached): stop it by PID and watch it go.
kill -TERM "$AGENT_PID"
if wait_gone "$AGENT_PID" 10; then ok "the agent stops on SIGTERM"; forget_pid "$AGENT_PID"; else not_ok "the agent stops on SIGTERM"; fi
done_testing
