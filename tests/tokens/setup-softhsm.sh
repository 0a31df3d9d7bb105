#!/bin/bash
# setup-softhsm.sh start|stop DIR: a SoftHSM2 token in DIR for
# tests/tokens/checks.sh (the interface is in tests/tokens/README).
#
# The token is tests/integration/mktoken.sh's (RSA-2048, EC P-256/384/521,
# Ed25519, generated and imported, each with a certificate from a test CA)
# in a private store (SOFTHSM2_CONF); no daemon, so stop has nothing to stop.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
module=${SOFTHSM2_MODULE:-/usr/lib/softhsm/libsofthsm2.so}

die() {
	echo "setup-softhsm.sh: $*" >&2
	exit 1
}
cannot() {
	echo "setup-softhsm.sh: cannot run here: $*" >&2
	exit 77
}

[ $# -eq 2 ] || die "usage: setup-softhsm.sh start|stop DIR"
dir=$2
case $1 in
start) ;;
stop) exit 0 ;;
*) die "usage: setup-softhsm.sh start|stop DIR" ;;
esac

[ -f "$module" ] || cannot "SoftHSM2 module $module not found (apt-get install softhsm2)"
for c in softhsm2-util pkcs11-tool openssl; do
	command -v "$c" >/dev/null 2>&1 || cannot "$c not found (apt-get install softhsm2 opensc openssl)"
done
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
SOFTHSM2_MODULE=$module bash "$here/../integration/mktoken.sh" "$dir/token" >"$dir/setup.log" 2>&1 ||
	{ cat "$dir/setup.log" >&2; die "mktoken.sh failed"; }

cat >"$dir/token.env" <<ENV
# SoftHSM2 token made by setup-softhsm.sh
TOKEN_NAME=softhsm2
TOKEN_MODULE=$module
TOKEN_INIT_ARGS=
TOKEN_PIN=1234
TOKEN_URI='pkcs11:token=p11agent-test'
TOKEN_KEYS='rsa:rsa2048 ec:ec256 ed25519:ed25519'
TOKEN_CA=$dir/token/ca.pem
TOKEN_WRONG_PIN_SAFE=1
export SOFTHSM2_CONF=$dir/token/softhsm2.conf
ENV
