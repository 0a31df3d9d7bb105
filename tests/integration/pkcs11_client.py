#!/usr/bin/python3
"""pkcs11_client.py MODULE: a long-lived PKCS#11 client for the tests.

Loads MODULE once (PyKCS11), then reads one command per line on stdin and
answers one line on stdout, so a test can stop, lock and restart the
agent under a client process that keeps running:

  slots                 number of slots with a token present
  tokinfo               "flags=0x..." of the first slot, or the CKR name
  open                  (re)opens a session on the first slot with a token
  find CLASS LABEL      "handle=N" or "none" (CLASS: cert, public, private)
  sign LABEL MECH       "ok LEN" or the CKR name; the private key handle is
                        looked up once and kept, so a later sign reuses it
  forksign LABEL MECH   signs in a forked child with the inherited session:
                        "child-ok" or "child-fail"
  login PIN             "ok" or the CKR name
  quit
"""
import os
import sys

import PyKCS11
from PyKCS11 import LowLevel

CLASSES = {"cert": PyKCS11.CKO_CERTIFICATE, "public": PyKCS11.CKO_PUBLIC_KEY,
           "private": PyKCS11.CKO_PRIVATE_KEY}
MECHS = {
    "ECDSA-SHA256": PyKCS11.Mechanism(PyKCS11.CKM_ECDSA_SHA256, None),
    "SHA256-RSA-PKCS": PyKCS11.Mechanism(PyKCS11.CKM_SHA256_RSA_PKCS, None),
    "SHA256-RSA-PKCS-PSS": PyKCS11.RSA_PSS_Mechanism(
        PyKCS11.CKM_SHA256_RSA_PKCS_PSS, PyKCS11.CKM_SHA256, PyKCS11.CKG_MGF1_SHA256, 32),
    "EDDSA": PyKCS11.Mechanism(PyKCS11.CKM_EDDSA, None),
    # Digest-only: the module sends the agent a digest (input DIGEST).
    "ECDSA": PyKCS11.Mechanism(PyKCS11.CKM_ECDSA, None),
}


def ckr(e):
    return PyKCS11.CKR.get(e.value, "CKR_0x%x" % e.value)


def main():
    lib = PyKCS11.PyKCS11Lib()
    lib.load(sys.argv[1])
    session = None
    keys = {}

    def first_slot():
        slots = lib.getSlotList(tokenPresent=True)
        return slots[0] if slots else None

    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        cmd = words[0]
        try:
            if cmd == "quit":
                print("bye", flush=True)
                break
            if cmd == "slots":
                out = str(len(lib.getSlotList(tokenPresent=True)))
            elif cmd == "tokinfo":
                slot = lib.getSlotList()[0]
                out = "flags=0x%x" % lib.getTokenInfo(slot).flags
            elif cmd == "open":
                slot = first_slot()
                if slot is None:
                    out = "no-token"
                else:
                    session = lib.openSession(slot)
                    out = "ok"
            elif cmd == "find":
                objs = session.findObjects([(PyKCS11.CKA_CLASS, CLASSES[words[1]]),
                                            (PyKCS11.CKA_LABEL, words[2])])
                out = "handle=%d" % objs[0].value() if objs else "none"
            elif cmd in ("sign", "forksign"):
                label = words[1]
                if label not in keys:
                    objs = session.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY),
                                                (PyKCS11.CKA_LABEL, label)])
                    if not objs:
                        print("no-key", flush=True)
                        continue
                    keys[label] = objs[0]
                if cmd == "sign":
                    sig = session.sign(keys[label], b"p11agent pkcs11 test", MECHS[words[2]])
                    out = "ok %d" % len(sig)
                else:
                    sys.stdout.flush()
                    pid = os.fork()
                    if pid == 0:
                        try:
                            session.sign(keys[label], b"child", MECHS[words[2]])
                            os._exit(0)
                        except BaseException:  # noqa: BLE001
                            os._exit(1)
                    _, st = os.waitpid(pid, 0)
                    ok = os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0
                    out = "child-ok" if ok else "child-fail"

            elif cmd == "login":
                session.login(words[1])
                out = "ok"
            else:
                out = "bad-command"
        except PyKCS11.PyKCS11Error as e:
            out = ckr(e)
        except Exception as e:  # noqa: BLE001 - the test wants one line whatever happens
            out = "exception %s" % type(e).__name__
        print(out, flush=True)


if __name__ == "__main__":
    main()
