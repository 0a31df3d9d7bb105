#!/bin/bash
# setup-p11kit.sh start|stop DIR: a token reached through p11-kit's RPC,
# for tests/tokens/checks.sh (the interface is in tests/tokens/README).
#
# The fifth implementation the agent talks to: p11-kit-client.so, the
# module a host or container uses to reach a token that `p11-kit server`
# exports over a Unix socket.  Behind the server is setup-softhsm.sh's
# token (DIR/softhsm); the server runs in the foreground on DIR/p11kit.sock
# and is remembered by PID in DIR/pids; the client module finds it through
# P11_KIT_SERVER_ADDRESS.  Every PKCS#11 call the agent makes crosses the
# RPC, so this column shows what a proxy module changes against the same
# token called directly: p11-kit 0.24's RPC leaves CKM_EDDSA out of the
# mechanism list (it cannot carry that mechanism), so the Ed25519 keys are
# listed but cannot sign (TOKEN_NO_SCHEMES).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
client=${P11KIT_CLIENT_MODULE:-/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so}

die() {
	echo "setup-p11kit.sh: $*" >&2
	exit 1
}
cannot() {
	echo "setup-p11kit.sh: cannot run here: $*" >&2
	exit 77
}

# shellcheck source=tests/tokens/setup-lib.sh
. "$(dirname "$0")/setup-lib.sh"

[ $# -eq 2 ] || die "usage: setup-p11kit.sh start|stop DIR"
dir=$2
case $1 in
start) ;;
stop)
	stop_recorded "$dir" setup-p11kit.sh
	exit 0
	;;
*) die "usage: setup-p11kit.sh start|stop DIR" ;;
esac

[ -f "$client" ] || cannot "p11-kit client module $client not found (apt-get install p11-kit-modules)"
command -v p11-kit >/dev/null 2>&1 || cannot "p11-kit not found (apt-get install p11-kit)"
p11-kit server --help 2>&1 | grep -q -- '--provider' ||
	cannot "this p11-kit has no 'server --provider'"
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

# The token behind the server: SoftHSM2's, with its keys and certificates.
bash "$here/setup-softhsm.sh" start "$dir/softhsm" || die "setup-softhsm.sh failed"
# shellcheck disable=SC1091 # written just above
. "$dir/softhsm/token.env"
export SOFTHSM2_CONF

sock=$dir/p11kit.sock
p11-kit server --foreground --provider "$TOKEN_MODULE" --name "$sock" "$TOKEN_URI" \
	>"$dir/server.out" 2>"$dir/server.err" &
echo "$! p11-kit-server" >>"$dir/pids"
for _ in $(seq 100); do
	[ -S "$sock" ] && break
	kill -0 "$!" 2>/dev/null || { cat "$dir/server.err" >&2; die "p11-kit server exited"; }
	sleep 0.1
done
[ -S "$sock" ] || { cat "$dir/server.err" >&2; die "p11-kit server made no socket $sock in 10 s"; }

cat >"$dir/token.env" <<ENV
# SoftHSM2's token through p11-kit server and p11-kit-client.so (setup-p11kit.sh)
TOKEN_NAME=p11kit
TOKEN_MODULE=$client
TOKEN_INIT_ARGS=
TOKEN_PIN=$TOKEN_PIN
TOKEN_URI='$TOKEN_URI'
TOKEN_KEYS='$TOKEN_KEYS'
TOKEN_CA=$TOKEN_CA
TOKEN_WRONG_PIN_SAFE=1
TOKEN_NO_SCHEMES=eddsa
export P11_KIT_SERVER_ADDRESS=unix:path=$sock
ENV
