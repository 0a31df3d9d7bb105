#!/bin/bash
# setup-tpm2.sh start|stop DIR: a tpm2-pkcs11 token on swtpm in DIR for
# tests/tokens/checks.sh (tests/tokens/README).
#
# swtpm and tpm2-abrmd run together in a private network namespace (swtpm
# listens on that namespace's 127.0.0.1; nothing on the machine's loopback);
# tpm2-abrmd registers on a private dbus-daemon whose socket is a file in
# DIR (a path, not an abstract socket, so clients outside the namespace
# reach it).  The TPM's dictionary-attack lockout is raised to 32 tries so
# one wrong PIN is safe (swtpm locks after 3 by default, for every token on
# the TPM).  tpm2_ptool makes the store (TPM2_PKCS11_STORE=DIR/store), a
# token and RSA-2048, EC P-256 and EC P-384 keys; certificates from a test CA are
# issued for the public keys read off the token (openssl x509 -force_pubkey)
# and stored with tpm2_ptool addcert.  Stop: every daemon by its PID, kept
# in DIR/pids.
set -eu

module=${TPM2_PKCS11_MODULE:-/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so}
PYTHON3=${PYTHON3:-/usr/bin/python3}
LABEL=p11agent-tpm
PIN=tpm-pin-1234
SOPIN=tpm-so-5678

die() {
	echo "setup-tpm2.sh: $*" >&2
	exit 1
}
cannot() {
	echo "setup-tpm2.sh: cannot run here: $*" >&2
	exit 77
}

[ $# -eq 2 ] || die "usage: setup-tpm2.sh start|stop DIR"
dir=$2

# shellcheck source=tests/tokens/setup-lib.sh
. "$(dirname "$0")/setup-lib.sh"

case $1 in
start) ;;
stop)
	# Last started first: tpm2-abrmd, swtpm, dbus-daemon (the private bus's
	# address in their environment names DIR).
	stop_recorded "$dir" setup-tpm2.sh
	exit 0
	;;
*) die "usage: setup-tpm2.sh start|stop DIR" ;;
esac

[ -f "$module" ] || cannot "tpm2-pkcs11 module $module not found (apt-get install libtpm2-pkcs11-1)"
for c in swtpm tpm2-abrmd dbus-daemon tpm2_ptool tpm2_startup tpm2_dictionarylockout openssl unshare ip; do
	command -v "$c" >/dev/null 2>&1 ||
		cannot "$c not found (apt-get install swtpm swtpm-tools tpm2-abrmd libtss2-tcti-tabrmd0 libtpm2-pkcs11-tools tpm2-tools dbus-daemon iproute2)"
done
"$PYTHON3" -c 'import PyKCS11, cryptography' 2>/dev/null ||
	cannot "$PYTHON3 lacks PyKCS11 or cryptography (apt-get install python3-pykcs11 python3-cryptography)"
ls /usr/lib/*/libtss2-tcti-tabrmd.so.0 >/dev/null 2>&1 || cannot "libtss2-tcti-tabrmd.so.0 not found (apt-get install libtss2-tcti-tabrmd0)"
unshare -n true 2>/dev/null || cannot "no network namespace (unshare -n failed)"

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
w=$dir/work
mkdir -p "$w" "$dir/tpm" "$dir/store"
: >"$dir/pids"
log=$dir/setup.log
: >"$log"

run() {
	if ! "$@" >>"$log" 2>&1; then
		tail -n 40 "$log" >&2
		die "failed: $*"
	fi
}

# wait_until SECONDS CMD...
wait_until() {
	local n=$(($1 * 10))
	shift
	until "$@"; do
		n=$((n - 1))
		[ "$n" -gt 0 ] || return 1
		sleep 0.1
	done
}

# The private bus.
dbus-daemon --session --nofork --nopidfile --address="unix:path=$dir/bus" \
	--print-address=3 3>"$dir/bus.address" >"$dir/dbus.log" 2>&1 &
echo "$! dbus-daemon" >>"$dir/pids"
wait_until 10 test -s "$dir/bus.address" || { cat "$dir/dbus.log" >&2; die "dbus-daemon did not start"; }
DBUS_SESSION_BUS_ADDRESS=unix:path=$dir/bus
export DBUS_SESSION_BUS_ADDRESS

# swtpm and tpm2-abrmd in their own network namespace.  The inner shell
# prints swtpm's PID (its own is tpm2-abrmd's after exec).
cat >"$w/tpmns.sh" <<'NS'
dir=$1
ip link set lo up || exit 1
swtpm socket --tpm2 --tpmstate "dir=$dir/tpm" --server type=tcp,port=2321,bindaddr=127.0.0.1 \
	--ctrl type=tcp,port=2322,bindaddr=127.0.0.1 --flags not-need-init,startup-clear \
	--log "file=$dir/swtpm.log" &
echo "$! swtpm" >>"$dir/pids"
i=0
until (exec 3<>/dev/tcp/127.0.0.1/2321) 2>/dev/null; do
	i=$((i + 1)); [ "$i" -lt 100 ] || exit 1; sleep 0.1
done
exec tpm2-abrmd --session --allow-root --flush-all --tcti="swtpm:host=127.0.0.1,port=2321"
NS
DBUS_SESSION_BUS_ADDRESS=$DBUS_SESSION_BUS_ADDRESS unshare -n bash "$w/tpmns.sh" "$dir" >"$dir/abrmd.log" 2>&1 &
echo "$! tpm2-abrmd" >>"$dir/pids"

TCTI=tabrmd:bus_type=session
export TPM2TOOLS_TCTI=$TCTI TPM2_PKCS11_TCTI=$TCTI TPM2_PKCS11_STORE=$dir/store
wait_until 20 tpm2_getcap properties-fixed >/dev/null 2>&1 || { cat "$dir/abrmd.log" >&2; die "tpm2-abrmd did not answer on the private bus"; }

# One wrong PIN must not lock the TPM (3 tries by default).  A failure is
# forgotten only after 600 s, so the counter that checks.sh reads before and
# after a wrong PIN (TOKEN_FAIL_COUNT) cannot drop in between.
run tpm2_dictionarylockout --setup-parameters --max-tries=32 --recovery-time=600 --lockout-recovery-time=1 --clear-lockout
cat >"$dir/failcount.sh" <<'SH'
# The TPM's dictionary-attack counter (TPM2_PT_LOCKOUT_COUNTER): every
# wrong PIN on any tpm2-pkcs11 token of this TPM raises it by one.
v=$(tpm2_getcap properties-variable | sed -n 's/^TPM2_PT_LOCKOUT_COUNTER: *//p')
[ -n "$v" ] && echo "$((v))"
SH

run tpm2_ptool init --path="$dir/store"
run tpm2_ptool addtoken --path="$dir/store" --pid=1 --label="$LABEL" --sopin="$SOPIN" --userpin="$PIN"
run tpm2_ptool addkey --path="$dir/store" --label="$LABEL" --key-label=tpm-rsa --id=01 --userpin="$PIN" --algorithm=rsa2048
run tpm2_ptool addkey --path="$dir/store" --label="$LABEL" --key-label=tpm-ec --id=02 --userpin="$PIN" --algorithm=ecc256
run tpm2_ptool addkey --path="$dir/store" --label="$LABEL" --key-label=tpm-ec384 --id=03 --userpin="$PIN" --algorithm=ecc384

run openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
	-keyout "$w/ca.key" -out "$dir/ca.pem" -days 30 -sha256 \
	-subj "/O=p11agent test/CN=p11agent TPM test CA" \
	-addext "basicConstraints=critical,CA:true" -addext "keyUsage=critical,keyCertSign,cRLSign"
cat >"$w/leaf.ext" <<'EXT'
basicConstraints = critical,CA:false
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EXT

# pubkey.py MODULE TOKEN LABEL OUT: the public key object LABEL as PEM.
# (OpenSC 0.23's pkcs11-tool --read-object fails on tpm2-pkcs11's P-384
# public key with "cannot create EVP_PKEY"; the attributes are sound.)
cat >"$w/pubkey.py" <<'PY'
import sys
import PyKCS11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key

module, token, label, out = sys.argv[1:]
lib = PyKCS11.PyKCS11Lib()
lib.load(module)
slot = next(s for s in lib.getSlotList(tokenPresent=True)
            if lib.getTokenInfo(s).label.rstrip(" \0") == token)
se = lib.openSession(slot)
objs = se.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_PUBLIC_KEY), (PyKCS11.CKA_LABEL, label)])
if len(objs) != 1:
    sys.exit("%d public key objects labelled %s" % (len(objs), label))
kt = se.getAttributeValue(objs[0], [PyKCS11.CKA_KEY_TYPE])[0]
if kt == PyKCS11.CKK_RSA:
    n, e = se.getAttributeValue(objs[0], [PyKCS11.CKA_MODULUS, PyKCS11.CKA_PUBLIC_EXPONENT])
    key = rsa.RSAPublicNumbers(int.from_bytes(bytes(e), "big"), int.from_bytes(bytes(n), "big")).public_key()
elif kt == PyKCS11.CKK_EC:
    params, point = (bytes(v) for v in se.getAttributeValue(
        objs[0], [PyKCS11.CKA_EC_PARAMS, PyKCS11.CKA_EC_POINT]))
    if point[0] != 0x04 or len(point) < 2:
        sys.exit("CKA_EC_POINT is not a DER OCTET STRING")
    # Skip the OCTET STRING header (short or long length form).
    hdr = 2 if point[1] < 0x80 else 2 + (point[1] & 0x7F)
    # SubjectPublicKeyInfo: id-ecPublicKey with the named curve, the point.
    algid = b"\x06\x07\x2a\x86\x48\xce\x3d\x02\x01" + params
    def der(tag, body):
        n = len(body)
        ln = bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes((n.bit_length() + 7) // 8, "big")
        return bytes([tag]) + ln + body
    spki = der(0x30, der(0x30, algid) + der(0x03, b"\x00" + point[hdr:]))
    key = load_der_public_key(spki)
else:
    sys.exit("key type %d" % kt)
with open(out, "wb") as f:
    f.write(key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
se.closeSession()
PY

serial=20
for name in tpm-rsa tpm-ec tpm-ec384; do
	serial=$((serial + 1))
	run "$PYTHON3" "$w/pubkey.py" "$module" "$LABEL" "$name" "$w/$name.pub.pem"
	run openssl req -new -key "$w/ca.key" -subj "/O=p11agent test/CN=$name" -out "$w/$name.csr"
	run openssl x509 -req -in "$w/$name.csr" -CA "$dir/ca.pem" -CAkey "$w/ca.key" \
		-set_serial "$serial" -days 30 -force_pubkey "$w/$name.pub.pem" \
		-extfile "$w/leaf.ext" -out "$dir/$name.cert.pem"
	run tpm2_ptool addcert --path="$dir/store" --label="$LABEL" --key-label="$name" "$dir/$name.cert.pem"
done
rm -rf "$w"

cat >"$dir/token.env" <<ENV
# tpm2-pkcs11 token on swtpm made by setup-tpm2.sh
TOKEN_NAME=tpm2
TOKEN_MODULE=$module
TOKEN_INIT_ARGS=
TOKEN_PIN=$PIN
TOKEN_URI='pkcs11:token=$LABEL'
TOKEN_KEYS='rsa:tpm-rsa ec:tpm-ec ec:tpm-ec384'
TOKEN_CA=$dir/ca.pem
# swtpm's dictionary-attack threshold was raised to 32 tries.
TOKEN_WRONG_PIN_SAFE=1
TOKEN_FAIL_COUNT=$dir/failcount.sh
export DBUS_SESSION_BUS_ADDRESS=$DBUS_SESSION_BUS_ADDRESS
export TPM2_PKCS11_STORE=$dir/store
export TPM2_PKCS11_TCTI=$TCTI
export TPM2TOOLS_TCTI=$TCTI
ENV
