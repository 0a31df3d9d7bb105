#!/bin/bash
# t_keycopy: the helper signs with a session copy of each key (C_CopyObject,
# CKA_TOKEN false), and with the token object where the token refuses a
# copy (CKA_COPYABLE false): both sign correctly, and copies never show up
# as keys.  P11AGENT_KEY_COPIES=0 turns copies off.
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"

require_cmd openssl timeout "$PYTHON3"
require_agent_binaries
make_token

# A P-256 key the token will not copy: SoftHSM2 answers C_CopyObject with
# CKR_ACTION_PROHIBITED.  pkcs11-tool cannot set CKA_COPYABLE; PyKCS11 can
# (it knows no type for it: the CK_BBOOL goes as one byte).
if "$PYTHON3" - "$SOFTHSM2_MODULE" "$TOKEN_LABEL" "$USER_PIN" >"$T/nocopy.log" 2>&1 <<'EOF'
import sys
import PyKCS11
from PyKCS11.LowLevel import CKA_COPYABLE
lib = PyKCS11.PyKCS11Lib()
lib.load(sys.argv[1])
slot = [s for s in lib.getSlotList(tokenPresent=True)
        if lib.getTokenInfo(s).label.strip() == sys.argv[2]][0]
s = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION)
s.login(sys.argv[3])
p256 = bytes([0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07])
pub = [(PyKCS11.CKA_CLASS, PyKCS11.CKO_PUBLIC_KEY), (PyKCS11.CKA_TOKEN, True),
       (PyKCS11.CKA_EC_PARAMS, p256), (PyKCS11.CKA_VERIFY, True),
       (PyKCS11.CKA_LABEL, "nocopy"), (PyKCS11.CKA_ID, (0x77,))]
prv = [(PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY), (PyKCS11.CKA_TOKEN, True),
       (PyKCS11.CKA_PRIVATE, True), (PyKCS11.CKA_SENSITIVE, True),
       (PyKCS11.CKA_SIGN, True), (PyKCS11.CKA_LABEL, "nocopy"),
       (PyKCS11.CKA_ID, (0x77,)), (CKA_COPYABLE, (0,))]
pk, sk = s.generateKeyPair(pub, prv, mecha=PyKCS11.MechanismECGENERATEKEYPAIR)
v = s.getAttributeValue(sk, [CKA_COPYABLE])[0]
if list(v) != [0]:
    sys.exit("CKA_COPYABLE reads back as %r" % (v,))
s.logout()
EOF
then
	ok "a key with CKA_COPYABLE false is on the token"
else
	not_ok "a key with CKA_COPYABLE false is on the token"
	diag_file "$T/nocopy.log" 10
	bail_out "cannot make the test key"
fi

check "agent starts on the test token" start_agent
unlock_token >/dev/null
rc_is 0 "unlock"
head -c 1000 /dev/urandom >"$T/msg"

# sign_verify LABEL DESC: three signatures with the key, each verified.
sign_verify() {
	local label=$1 key i good=0
	key=$(key_uri "$label")
	run p11a pubkey "$key" --out "$T/$label.pub"
	for i in 1 2 3; do
		run p11a sign --key "$key" --scheme ecdsa --hash sha256 --in "$T/msg" --out "$T/sig"
		if [ "$rc" -eq 0 ] &&
			openssl dgst -sha256 -verify "$T/$label.pub" -signature "$T/sig" "$T/msg" >/dev/null 2>&1; then
			good=$((good + 1))
		fi
	done
	is "$good" 3 "$2: 3 signatures with $label verify"
}

sign_verify ec256 "copyable key"
sign_verify nocopy "key the token will not copy"
if grep -q "no session copy of key 'nocopy' (CKR_ACTION_PROHIBITED)" "$AGENT_LOG"; then
	ok "the helper asked for a copy of 'nocopy', was refused, and signed with the token object"
else
	not_ok "the helper asked for a copy of 'nocopy', was refused, and signed with the token object"
	diag_file "$AGENT_LOG" 10
fi
if grep -q "session copy of key 'ec256' made" "$AGENT_LOG"; then
	ok "ec256 is signed with a session copy"
else
	not_ok "ec256 is signed with a session copy"
	diag_file "$AGENT_LOG" 10
fi
file_lacks "$AGENT_LOG" "no session copy of key 'ec256'" "no copy of ec256 was refused"
file_lacks "$AGENT_LOG" "session copy of key 'nocopy' made" "no copy of nocopy was made"

# Copies are session objects the helper's own searches can see: a rescan
# (lock, unlock) must still list each key once.
run p11a lock
run p11a unlock --pin-file "$T/pin"
rc_is 0 "unlock after lock"
list_json
count=$("$PYTHON3" -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["keys"]))' "$T/list.json")
is "$count" 9 "after signing and a rescan the listing has the 8 test keys and 'nocopy', no copies"
sign_verify ec256 "after the rescan"

stop_agent
# Copies off: same signatures, no copy ever asked for.
: >"$AGENT_LOG"
export P11AGENT_KEY_COPIES=0
check "agent starts with P11AGENT_KEY_COPIES=0" start_agent
unlock_token >/dev/null
sign_verify nocopy "P11AGENT_KEY_COPIES=0"
file_lacks "$AGENT_LOG" "session copy" "P11AGENT_KEY_COPIES=0: no copy is asked for or made"
unset P11AGENT_KEY_COPIES

done_testing
