#!/usr/bin/python3
"""Import an Ed25519 private key into a PKCS#11 token with C_CreateObject.

pkcs11-tool --write-object --type privkey cannot import Ed25519 keys into
SoftHSM2 (see FIELD-NOTES.md); C_CreateObject with CKK_EC_EDWARDS,
CKA_EC_PARAMS = DER OID 1.3.101.112 and CKA_VALUE = the 32-byte seed works.

Usage:
  import_ed25519.py --module LIB --token LABEL --pin PIN \
                    --key KEY.der --id HEX --label LABEL

KEY.der is the PKCS#8 DER private key that `openssl genpkey -algorithm
ed25519 -outform DER` writes.  The PIN is read from the environment
variable named by --pin-env (default P11A_IMPORT_PIN) when --pin is not
given, so that it does not have to appear on a command line.

Run it with /usr/bin/python3 (python3-pykcs11 lives there).
"""

import argparse
import os
import sys

import PyKCS11 as P

# DER of PKCS#8 PrivateKeyInfo for Ed25519 up to the seed (RFC 8410):
# SEQ { INTEGER 0, SEQ { OID 1.3.101.112 }, OCTET STRING { OCTET STRING(32) } }
PKCS8_ED25519_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
ED25519_OID_DER = bytes.fromhex("06032b6570")


def read_seed(path):
    with open(path, "rb") as f:
        der = f.read()
    if len(der) != len(PKCS8_ED25519_PREFIX) + 32 or not der.startswith(PKCS8_ED25519_PREFIX):
        sys.exit("import_ed25519.py: %s: not a PKCS#8 DER Ed25519 private key" % path)
    return der[len(PKCS8_ED25519_PREFIX):]


def find_slot(lib, label):
    for slot in lib.getSlotList(tokenPresent=True):
        info = lib.getTokenInfo(slot)
        if info.label.strip().rstrip("\0") == label:
            return slot
    sys.exit("import_ed25519.py: no token labelled %r" % label)


def main():
    ap = argparse.ArgumentParser(description="Import an Ed25519 key with C_CreateObject")
    ap.add_argument("--module", required=True)
    ap.add_argument("--token", required=True, help="token label")
    ap.add_argument("--pin", help="user PIN (else from --pin-env)")
    ap.add_argument("--pin-env", default="P11A_IMPORT_PIN")
    ap.add_argument("--key", required=True, help="PKCS#8 DER Ed25519 private key")
    ap.add_argument("--id", required=True, help="CKA_ID in hex")
    ap.add_argument("--label", required=True)
    args = ap.parse_args()

    pin = args.pin if args.pin is not None else os.environ.get(args.pin_env)
    if not pin:
        sys.exit("import_ed25519.py: no PIN (use --pin or set %s)" % args.pin_env)
    seed = read_seed(args.key)

    lib = P.PyKCS11Lib()
    lib.load(args.module)
    slot = find_slot(lib, args.token)
    session = lib.openSession(slot, P.CKF_SERIAL_SESSION | P.CKF_RW_SESSION)
    session.login(pin)
    try:
        template = [
            (P.CKA_CLASS, P.CKO_PRIVATE_KEY),
            (P.CKA_KEY_TYPE, P.CKK_EC_EDWARDS),
            (P.CKA_TOKEN, P.CK_TRUE),
            (P.CKA_PRIVATE, P.CK_TRUE),
            (P.CKA_SENSITIVE, P.CK_TRUE),
            (P.CKA_SIGN, P.CK_TRUE),
            (P.CKA_EC_PARAMS, ED25519_OID_DER),
            (P.CKA_VALUE, seed),
            (P.CKA_ID, bytes.fromhex(args.id)),
            (P.CKA_LABEL, args.label),
        ]
        handle = session.createObject(template)
        print("imported Ed25519 private key label=%s id=%s handle=%s"
              % (args.label, args.id, handle))
    finally:
        session.logout()
        session.closeSession()


if __name__ == "__main__":
    main()
