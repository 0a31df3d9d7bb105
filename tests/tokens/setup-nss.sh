#!/bin/bash
# setup-nss.sh start|stop DIR: an NSS softokn database in DIR for
# tests/tokens/checks.sh (tests/tokens/README).
#
# DIR/nssdb (sql:) with password = user PIN; an RSA-2048 and an EC P-256
# key made by openssl with certificates from a test CA, imported with
# pk12util (nicknames nss-rsa, nss-ec).  The module is libsoftokn3.so, which
# needs its database directory in C_Initialize's pReserved (FIELD-NOTES
# "Other tokens"): TOKEN_INIT_ARGS.  No daemon: stop has nothing to stop.
set -eu

softokn=${NSS_SOFTOKN_MODULE:-/usr/lib/x86_64-linux-gnu/libsoftokn3.so}
PIN=nss-pin-1234

die() {
	echo "setup-nss.sh: $*" >&2
	exit 1
}
cannot() {
	echo "setup-nss.sh: cannot run here: $*" >&2
	exit 77
}

[ $# -eq 2 ] || die "usage: setup-nss.sh start|stop DIR"
dir=$2
case $1 in
start) ;;
stop) exit 0 ;;
*) die "usage: setup-nss.sh start|stop DIR" ;;
esac

[ -f "$softokn" ] || cannot "NSS softokn $softokn not found (apt-get install libnss3, or set NSS_SOFTOKN_MODULE)"
for c in certutil pk12util openssl; do
	command -v "$c" >/dev/null 2>&1 || cannot "$c not found (apt-get install libnss3-tools openssl)"
done
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
w=$dir/work
db=$dir/nssdb
mkdir -p "$w" "$db"
log=$dir/setup.log
: >"$log"

run() {
	if ! "$@" >>"$log" 2>&1; then
		cat "$log" >&2
		die "failed: $*"
	fi
}

umask 077
printf '%s\n' "$PIN" >"$w/pw"
printf 'p12pass\n' >"$w/p12pw"
run certutil -N -d "sql:$db" -f "$w/pw"

run openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
	-keyout "$w/ca.key" -out "$dir/ca.pem" -days 30 -sha256 \
	-subj "/O=p11agent test/CN=p11agent NSS test CA" \
	-addext "basicConstraints=critical,CA:true" -addext "keyUsage=critical,keyCertSign,cRLSign"
cat >"$w/leaf.ext" <<'EXT'
basicConstraints = critical,CA:false
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EXT

# key NAME GENPKEY-ARGS...: a key, a CA-issued certificate, into the database.
serial=10
key() {
	local name=$1
	shift
	serial=$((serial + 1))
	run openssl genpkey "$@" -out "$w/$name.key"
	run openssl req -new -key "$w/$name.key" -subj "/O=p11agent test/CN=$name" -out "$w/$name.csr"
	run openssl x509 -req -in "$w/$name.csr" -CA "$dir/ca.pem" -CAkey "$w/ca.key" \
		-set_serial "$serial" -days 30 -extfile "$w/leaf.ext" -out "$dir/$name.cert.pem"
	run openssl pkcs12 -export -inkey "$w/$name.key" -in "$dir/$name.cert.pem" -name "$name" \
		-passout "file:$w/p12pw" -out "$w/$name.p12"
	run pk12util -i "$w/$name.p12" -d "sql:$db" -k "$w/pw" -w "$w/p12pw"
}
key nss-rsa -algorithm RSA -pkeyopt rsa_keygen_bits:2048
key nss-ec -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -pkeyopt ec_param_enc:named_curve
run certutil -L -d "sql:$db"
rm -rf "$w"

cat >"$dir/token.env" <<ENV
# NSS softokn database made by setup-nss.sh
TOKEN_NAME=nss
TOKEN_MODULE=$softokn
TOKEN_INIT_ARGS="configdir='sql:$db' certPrefix='' keyPrefix='' secmod='secmod.db' flags="
TOKEN_PIN=$PIN
TOKEN_URI='pkcs11:token=NSS%20Certificate%20DB'
TOKEN_KEYS='rsa:nss-rsa ec:nss-ec'
TOKEN_CA=$dir/ca.pem
TOKEN_WRONG_PIN_SAFE=1
ENV
