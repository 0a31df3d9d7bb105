#!/bin/bash
# mktoken.sh DIR: make a SoftHSM2 token store with the p11agent test keys.
#
# Creates DIR (it must not exist or be empty) with:
#   DIR/softhsm2.conf         SoftHSM2 configuration; export SOFTHSM2_CONF=DIR/softhsm2.conf
#   DIR/tokens/               the token store (never the system one)
#   DIR/ca.pem, DIR/ca.key    a small test CA
#   DIR/LABEL.cert.pem        the certificate stored on the token with key LABEL
#   DIR/LABEL.pub.pem         that key's public key
#   DIR/keys.tsv              one line per key: label id type bits curve origin subject
#   DIR/README                what was made
#   DIR/private/              the imported private keys as made by openssl (mode 0700)
#
# Token label "p11agent-test", user PIN 1234, SO PIN 12345678.
# Keys generated on the token (with public-key objects), each with a
# certificate issued by the CA for the public key read off the token:
#   rsa2048 (01) RSA-2048, ec256 (02) P-256, ec384 (03) P-384,
#   ec521 (04) P-521, ed25519 (05) Ed25519
# Keys made with openssl and imported (private key + certificate, no
# public-key object):
#   rsa-imp (11) RSA-2048, self-signed certificate
#   ec-imp (12) P-256, certificate issued by the CA
#   ed-imp (13) Ed25519 (imported with import_ed25519.py), issued by the CA
#
# Environment: SOFTHSM2_MODULE (default /usr/lib/softhsm/libsofthsm2.so),
# PYTHON3 (default /usr/bin/python3, which has python3-pykcs11).
set -eu

TOKEN_LABEL=p11agent-test
USER_PIN=1234
SO_PIN=12345678

here=$(cd "$(dirname "$0")" && pwd)
module=${SOFTHSM2_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
python3=${PYTHON3:-/usr/bin/python3}

die() {
	echo "mktoken.sh: $*" >&2
	exit 1
}

[ $# -eq 1 ] || die "usage: mktoken.sh DIR"
for c in softhsm2-util pkcs11-tool openssl; do
	command -v "$c" >/dev/null 2>&1 || die "$c not found (install softhsm2, opensc, openssl)"
done
[ -f "$module" ] || die "SoftHSM2 module $module not found (set SOFTHSM2_MODULE)"
[ -x "$python3" ] || die "$python3 not found (install python3-pykcs11)"

mkdir -p "$1"
dir=$(cd "$1" && pwd)
if [ -n "$(ls -A "$dir")" ]; then
	die "$dir is not empty"
fi

umask 077
mkdir "$dir/tokens" "$dir/private" "$dir/work"
cat >"$dir/softhsm2.conf" <<EOF
# SoftHSM2 configuration written by mktoken.sh (p11agent tests)
directories.tokendir = $dir/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
EOF
SOFTHSM2_CONF=$dir/softhsm2.conf
export SOFTHSM2_CONF
w=$dir/work

say() {
	echo "mktoken: $*"
}

# Quiet runner: show the output only when the command fails.
run() {
	if ! "$@" >"$w/out" 2>&1; then
		cat "$w/out" >&2
		die "failed: $*"
	fi
}

p11() {
	run pkcs11-tool --module "$module" --token-label "$TOKEN_LABEL" "$@"
}

say "token store $dir/tokens (SOFTHSM2_CONF=$SOFTHSM2_CONF)"
run softhsm2-util --init-token --free --label "$TOKEN_LABEL" \
	--pin "$USER_PIN" --so-pin "$SO_PIN"
say "initialised token '$TOKEN_LABEL' (user PIN $USER_PIN, SO PIN $SO_PIN)"

# ---------------------------------------------------------------- the CA
run openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
	-keyout "$dir/ca.key" -out "$dir/ca.pem" -days 3650 -sha256 \
	-subj "/O=p11agent test/CN=p11agent test CA" \
	-addext "basicConstraints=critical,CA:true" \
	-addext "keyUsage=critical,keyCertSign,cRLSign"
say "test CA: $dir/ca.pem"

cat >"$w/leaf.ext" <<'EOF'
basicConstraints = critical,CA:false
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth,serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
cat >"$w/self.ext" <<'EOF'
basicConstraints = critical,CA:false
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth,serverAuth
subjectKeyIdentifier = hash
EOF

serial=100
: >"$dir/keys.tsv"

# subject_for LABEL
subject_for() {
	echo "/O=p11agent test/CN=$1"
}

# issue LABEL PUB.pem: a CA-signed certificate for a public key we do not
# hold the private half of.  x509 -req needs a CSR; any key can sign it,
# -force_pubkey then puts the token's public key in the certificate.
issue() {
	serial=$((serial + 1))
	run openssl req -new -key "$dir/ca.key" -subj "$(subject_for "$1")" -out "$w/$1.csr"
	run openssl x509 -req -in "$w/$1.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
		-set_serial "$serial" -days 3650 -force_pubkey "$2" \
		-extfile "$w/leaf.ext" -out "$dir/$1.cert.pem"
}

# store_cert LABEL ID: write DIR/LABEL.cert.pem to the token beside the key.
store_cert() {
	run openssl x509 -in "$dir/$1.cert.pem" -outform DER -out "$w/$1.cert.der"
	p11 --login --pin "$USER_PIN" --write-object "$w/$1.cert.der" --type cert \
		--id "$2" --label "$1"
}

# record LABEL ID TYPE BITS CURVE ORIGIN
record() {
	printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:--}" "$6" \
		"$(subject_for "$1")" >>"$dir/keys.tsv"
}

# ---------------------------------------------------------------- generated keys
# token_pubkey LABEL ID CURVE: the public-key object LABEL/ID as PEM in
# DIR/LABEL.pub.pem.  pkcs11-tool --read-object fails on P-384 keys here
# ("cannot create EVP_PKEY") and writes Ed25519 keys as PEM, so EC and
# Ed25519 keys are rebuilt from the CKA_EC_PARAMS and CKA_EC_POINT that
# --list-objects prints: SubjectPublicKeyInfo = fixed prefix || point.
token_pubkey() {
	if [ -z "$3" ]; then
		p11 --read-object --type pubkey --id "$2" -o "$w/$1.pub.der"
		run openssl pkey -pubin -inform DER -in "$w/$1.pub.der" -out "$dir/$1.pub.pem"
		return
	fi
	case $3 in
	P-256) params=06082a8648ce3d030107 octet=0441
		spki=3059301306072a8648ce3d020106082a8648ce3d030107034200 ;;
	P-384) params=06052b81040022 octet=0461
		spki=3076301006072a8648ce3d020106052b81040022036200 ;;
	P-521) params=06052b81040023 octet=048185
		spki=30819b301006072a8648ce3d020106052b8104002303818600 ;;
	Ed25519) params=130c656477617264733235353139 octet=0420 # PrintableString "edwards25519"
		spki=302a300506032b6570032100 ;;
	*) die "unknown curve $3" ;;
	esac
	# --id does not filter --list-objects: pick the object block by its ID.
	p11 --list-objects --type pubkey
	awk -v id="$2" '
		/^[A-Z].* Object;/ { p = ""; q = "" }
		$1 == "EC_POINT:" { p = $2 }
		$1 == "EC_PARAMS:" { q = $2 }
		$1 == "ID:" && $2 == id { print q, p }
	' "$w/out" >"$w/ec"
	read -r got_params point <"$w/ec" || die "$1: no public-key object with id $2"
	[ "$got_params" = "$params" ] || die "$1: CKA_EC_PARAMS is '$got_params', expected $params ($3)"
	case $point in
	"$octet"*) point=${point#"$octet"} ;;
	*) die "$1: unexpected CKA_EC_POINT '$point'" ;;
	esac
	"$python3" -c 'import sys; sys.stdout.buffer.write(bytes.fromhex(sys.argv[1]))' \
		"$spki$point" >"$w/$1.pub.der"
	run openssl pkey -pubin -inform DER -in "$w/$1.pub.der" -out "$dir/$1.pub.pem"
}

# gen LABEL ID KEYTYPE TYPE BITS CURVE
gen() {
	p11 --login --pin "$USER_PIN" --keypairgen --key-type "$3" --label "$1" --id "$2"
	token_pubkey "$1" "$2" "$6"
	issue "$1" "$dir/$1.pub.pem"
	store_cert "$1" "$2"
	record "$1" "$2" "$4" "$5" "$6" generated
	case $4 in
	EC) what="EC $6" ;;
	*) what=$4 ;;
	esac
	say "generated $what key '$1' (id $2) on the token, certificate $1.cert.pem issued by the test CA"
}

gen rsa2048 01 rsa:2048 RSA 2048 ""
gen ec256 02 EC:prime256v1 EC 256 P-256
gen ec384 03 EC:secp384r1 EC 384 P-384
gen ec521 04 EC:secp521r1 EC 521 P-521
gen ed25519 05 EC:edwards25519 Ed25519 255 Ed25519

# ---------------------------------------------------------------- imported keys
# rsa-imp: RSA-2048, self-signed certificate
run openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$dir/private/rsa-imp.key"
run openssl pkey -in "$dir/private/rsa-imp.key" -pubout -out "$dir/rsa-imp.pub.pem"
run openssl req -x509 -new -key "$dir/private/rsa-imp.key" -subj "$(subject_for rsa-imp)" \
	-days 3650 -sha256 -set_serial 200 -extensions v3_self -config /dev/stdin \
	-out "$dir/rsa-imp.cert.pem" <<EOF
[ req ]
distinguished_name = dn
[ dn ]
[ v3_self ]
$(cat "$w/self.ext")
EOF
run openssl pkey -in "$dir/private/rsa-imp.key" -outform DER -out "$w/rsa-imp.key.der"
p11 --login --pin "$USER_PIN" --write-object "$w/rsa-imp.key.der" --type privkey \
	--id 11 --label rsa-imp --usage-sign
store_cert rsa-imp 11
record rsa-imp 11 RSA 2048 "" imported
say "imported RSA key 'rsa-imp' (id 11) made with openssl, self-signed certificate rsa-imp.cert.pem"

# ec-imp: P-256, CA-signed certificate
run openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
	-pkeyopt ec_param_enc:named_curve -out "$dir/private/ec-imp.key"
run openssl pkey -in "$dir/private/ec-imp.key" -pubout -out "$dir/ec-imp.pub.pem"
issue ec-imp "$dir/ec-imp.pub.pem"
run openssl pkey -in "$dir/private/ec-imp.key" -outform DER -out "$w/ec-imp.key.der"
p11 --login --pin "$USER_PIN" --write-object "$w/ec-imp.key.der" --type privkey \
	--id 12 --label ec-imp --usage-sign
store_cert ec-imp 12
record ec-imp 12 EC 256 P-256 imported
say "imported EC P-256 key 'ec-imp' (id 12) made with openssl, certificate ec-imp.cert.pem issued by the test CA"

# ed-imp: Ed25519 through C_CreateObject (pkcs11-tool cannot import it)
run openssl genpkey -algorithm ed25519 -out "$dir/private/ed-imp.key"
run openssl pkey -in "$dir/private/ed-imp.key" -pubout -out "$dir/ed-imp.pub.pem"
issue ed-imp "$dir/ed-imp.pub.pem"
run openssl pkey -in "$dir/private/ed-imp.key" -outform DER -out "$w/ed-imp.key.der"
P11A_IMPORT_PIN=$USER_PIN run "$python3" "$here/import_ed25519.py" --module "$module" \
	--token "$TOKEN_LABEL" --key "$w/ed-imp.key.der" --id 13 --label ed-imp
store_cert ed-imp 13
record ed-imp 13 Ed25519 255 Ed25519 imported
say "imported Ed25519 key 'ed-imp' (id 13) with import_ed25519.py, certificate ed-imp.cert.pem issued by the test CA"

# Each certificate must hold the public key we meant it to hold.
while IFS="$(printf '\t')" read -r label _; do
	openssl x509 -in "$dir/$label.cert.pem" -noout -pubkey >"$w/check.pem"
	cmp -s "$w/check.pem" "$dir/$label.pub.pem" || die "certificate of $label does not hold its public key"
done <"$dir/keys.tsv"

rm -rf "$w"
chmod 0755 "$dir"
chmod 0644 "$dir"/*.pem "$dir/keys.tsv" "$dir/softhsm2.conf"

cat >"$dir/README" <<EOF
SoftHSM2 token store made by tests/integration/mktoken.sh on $(date -u '+%Y-%m-%d %H:%M UTC').

  export SOFTHSM2_CONF=$dir/softhsm2.conf
  module: $module
  token label: $TOKEN_LABEL   user PIN: $USER_PIN   SO PIN: $SO_PIN

Keys (label, CKA_ID, type, bits, curve, origin, certificate subject):
$(sed 's/^/  /' "$dir/keys.tsv")

Every key has a certificate on the token with the same CKA_ID and label;
PEM copies are LABEL.cert.pem, public keys LABEL.pub.pem.  Generated keys
have public-key objects on the token; imported keys (origin "imported")
have only the private key and the certificate.  The test CA is ca.pem.
EOF
chmod 0644 "$dir/README"
say "done; see $dir/README"
