#!/bin/bash
# t_peer_owner: every client (the CLI, the OpenSSL provider, the PKCS#11
# front-end module) checks who owns the agent's socket right after
# connect() and sends nothing, the PIN above all, to a listener that runs
# as another uid (docs/reliability.md, "PIN to the wrong listener").
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/tls_lib.sh
. "$lib_dir/tls_lib.sh"
# shellcheck source=tests/integration/pkcs11_lib.sh
. "$lib_dir/pkcs11_lib.sh"

NOBODY=65534
[ "$(id -u)" -eq 0 ] || { echo "1..0 # SKIP needs root to run a listener as uid $NOBODY"; exit 0; }
require_cmd openssl pkcs11-tool "$PYTHON3"
require_provider
pk_setup

check "agent starts" start_agent
check "unlock through the real agent" unlock_token
KEY=$(key_uri ec256)
printf 'hello' >"$T/msg"

# Control: each client works against the real agent with the same calls.
run p11a list
rc_is 0 "control: list through the real agent"
run p11a sign --key "$KEY" --scheme ecdsa --in "$T/msg" --out "$T/msg.sig"
rc_is 0 "control: sign through the real agent"
run provider_env openssl pkeyutl -sign -inkey "$KEY" -in "$T/msg" -out "$T/msg.psig" -rawin -digest sha256
rc_is 0 "control: provider signs through the real agent"
run pk_client pkcs11-tool --module "$PK_MODULE" --list-slots
stdout_has "$TOKEN_LABEL" "control: the module shows the token from the real agent"

# The impostor: a socket in a directory anyone may enter, owned by nobody.
EVIL=$T/evil
mkdir -m 0711 "$EVIL"
chmod 0711 "$T"
EVIL_SOCK=$EVIL/agent.sock
: >"$T/evil.log"
"$PYTHON3" "$lib_dir/owner_listener.py" "$EVIL_SOCK" "$T/evil.log" "$NOBODY" &
remember_pid $!
poll 5 test -S "$EVIL_SOCK" || true
check "the impostor listens at $EVIL_SOCK" test -S "$EVIL_SOCK"
is "$(stat -c %u "$EVIL_SOCK")" 0 "the socket file itself is root's: only the listener is nobody's"

ev() { timeout "$CLI_TIMEOUT" "$P11AGENT" --socket "$EVIL_SOCK" "$@"; }
refused() {   # refused DESC: the last run failed naming the socket and the uid
	if grep -q "$EVIL_SOCK runs as uid $NOBODY" "$T/stderr" "$T/stdout"; then
		ok "$1: refused, naming the socket and uid $NOBODY"
	else
		not_ok "$1: refused, naming the socket and uid $NOBODY"
		diag_last
	fi
}

run ev unlock --pin-stdin <<<"$USER_PIN"
rc_is 1 "unlock against the impostor fails"
refused "unlock"
file_lacks "$T/stdout" unlocked "unlock does not claim success"
run ev list
rc_is 1 "list against the impostor fails"
refused "list"
run ev sign --key "$KEY" --scheme ecdsa --in "$T/msg" --out "$T/evil.sig"
rc_is 1 "sign against the impostor fails"
refused "sign"
run ev status
refused "status"
run env P11AGENT_SOCK="$EVIL_SOCK" timeout "$CLI_TIMEOUT" "$P11AGENT" list
refused "list with P11AGENT_SOCK pointing at the impostor"

run env ${SAN_ENV[@]+"${SAN_ENV[@]}"} OPENSSL_CONF="$PROVIDER_CONF" OPENSSL_MODULES="$PROVIDER_MODULE_DIR" \
	P11AGENT_SOCK="$EVIL_SOCK" openssl pkeyutl -sign -inkey "$KEY" -in "$T/msg" -out "$T/evil.psig" \
	-rawin -digest sha256
rc_is 1 "provider: openssl pkeyutl against the impostor fails"
refused "provider"

run env ${PK_SAN_ENV[@]+"${PK_SAN_ENV[@]}"} SOFTHSM2_CONF="$T/empty-softhsm2.conf" P11AGENT_SOCK="$EVIL_SOCK" \
	pkcs11-tool --module "$PK_MODULE" --login --pin "$USER_PIN" --list-objects
if grep -q "$TOKEN_LABEL" "$T/stdout"; then not_ok "module: shows no token from the impostor"; else ok "module: shows no token from the impostor"; fi
refused "module"

# Every client connected (the refusal came after connect) and sent nothing.
# evil_conns N: the impostor has logged at least N connections.
evil_conns() {
	[ "$(wc -l <"$T/evil.log")" -ge "$1" ]
}
poll 10 evil_conns 7 || true
conns=$(wc -l <"$T/evil.log")
bytes=$(awk '{ n += $4 } END { print n + 0 }' "$T/evil.log")
diag "impostor: $conns connections, $bytes bytes received"
if [ "$conns" -ge 7 ]; then ok "every client connected to the impostor ($conns connections)"; else not_ok "every client connected to the impostor ($conns connections)"; fi
is "$bytes" 0 "the impostor received not one byte (no HELLO, no PIN)"

done_testing
