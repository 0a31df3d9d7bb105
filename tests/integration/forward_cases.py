"""forward_cases.py RELAY_SOCK DIRECT_SOCK KEY_URI: t_forward's raw protocol
cases over a forwarded connection (ssh -R or a socat relay: no descriptor
crosses it).

A version-3 client that got CHANNEL without a descriptor signs on its main
connection and the agent relays (docs/protocol.md, "Version 3:
forwarding").  Over the relay: SIGN on the main connection is answered
and verifies; it is still refused on a version-1 connection; two pipelined
SIGNs are answered one after the other; the malformed-frame and half-frame
cases of t_security drop that connection only.  Meanwhile one client on
the agent's own socket signs through a channel and one on the relay signs
on its main connection, without a single failure.  Prints p11a_proto.Cases
lines for lib.sh's relay_cases.
"""
import os
import socket
import sys
import threading
import time

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

import p11a_proto as P

RELAY, DIRECT, KEY_URI = sys.argv[1], sys.argv[2], sys.argv[3]
NAME = "t_forward forward_cases.py"
R = P.Cases()
out, case = R.out, R.case
frame, read_frame, error_code, show, wait_eof = P.frame, P.read_frame, P.error_code, P.show, P.wait_eof
request = P.raw_request


def connect(path=RELAY, timeout=20):
    return P.raw_connect(path, timeout)


def hello3(s):
    r = request(s, P.hello(NAME, 1, 3))
    if r is None or r[0] != P.HELLO_REPLY:
        raise P.Malformed("HELLO answered %s" % show(r))
    return P.decode(r).version


def sign_body(data, uri=KEY_URI):
    return P.sign(uri, P.SCHEME_ECDSA, P.HASH_SHA256, data)


def public_key():
    s = connect()
    hello3(s)
    r = request(s, P.list_())
    s.close()
    for k in P.decode(r).keys:
        if k.uri == KEY_URI:
            return serialization.load_der_public_key(k.spki)
    raise ValueError("key %s not listed over the relay" % KEY_URI)


PUB = public_key()


def verifies(sig, data):
    try:
        PUB.verify(sig, data, ec.ECDSA(hashes.SHA256()))
        return True
    except Exception:  # noqa: BLE001 - InvalidSignature or a bad encoding
        return False


# ---- clients that keep working while the bad ones are dropped
stop = threading.Event()
counts = {"channel": 0, "relayed": 0}
errors = []
started = threading.Barrier(3)


def channel_signer():
    """A local client: its own channel on the agent's socket."""
    try:
        c = P.client(DIRECT, NAME + " local", 20)
        ch = c.open_channel(KEY_URI)
        started.wait(20)
        while not stop.is_set():
            ch.sign(KEY_URI, P.SCHEME_ECDSA, P.HASH_SHA256, b"local")
            counts["channel"] += 1
            time.sleep(0.02)    # the local signer's pace
        ch.close()
        c.close()
    except Exception as e:  # noqa: BLE001 - any failure is a test failure
        errors.append("local channel: %r" % e)
        started.abort()


def relayed_signer():
    """A forwarded client signing on its main connection all along."""
    try:
        s = connect()
        hello3(s)
        started.wait(20)
        while not stop.is_set():
            r = request(s, sign_body(b"relayed"))
            if r is None or r[0] != P.SIGNATURE:
                errors.append("relayed SIGN answered %s" % show(r))
                return
            counts["relayed"] += 1
            time.sleep(0.02)    # the relayed signer's pace
        s.close()
    except Exception as e:  # noqa: BLE001
        errors.append("relayed: %r" % e)
        started.abort()


threads = [threading.Thread(target=channel_signer), threading.Thread(target=relayed_signer)]
for t in threads:
    t.start()
try:
    started.wait(20)
except threading.BrokenBarrierError:
    errors.append("the held signers did not start")


# ---- the relayed path itself
def version3():
    s = connect()
    v = hello3(s)
    s.close()
    return v == 3, "HELLO 1..3 over the relay chose version %r" % v


case("HELLO 1..3 over the relay: the agent chooses version 3", version3)


def channel_then_sign():
    c = P.Conn.connect(RELAY, 20)
    c.request(P.hello(NAME, 1, 3), P.HELLO_REPLY)
    c.send(P.open_channel(KEY_URI))
    body, fds = c.recv_frame()
    crossed = len(fds)
    for fd in fds:
        os.close(fd)
    if body is None or body[0] != P.CHANNEL:
        c.close()
        return False, "OPEN_CHANNEL over the relay answered %s" % show(body)
    data = b"signed over the relay"
    c.send(sign_body(data))
    r, _ = c.recv_frame()
    c.close()
    if r is None or r[0] != P.SIGNATURE:
        return False, "SIGN on the main connection answered %s" % show(r)
    if crossed:
        return False, "a descriptor crossed the relay: this is no forwarded connection"
    return verifies(P.decode(r).signature, data), "the signature does not verify"


case("over the relay: OPEN_CHANNEL answers CHANNEL, SIGN on the main connection gives a "
     "SIGNATURE that verifies", channel_then_sign)


def version1_refused():
    s = connect()
    P.raw_hello(s, NAME)        # version 1 only
    r = request(s, sign_body(b"v1"))
    s.close()
    return error_code(r) == P.E_PROTOCOL, "SIGN on a version-1 connection answered %s" % show(r)


case("SIGN on a main connection that chose version 1 still gets ERROR PROTOCOL", version1_refused)


def pipelined():
    s = connect()
    hello3(s)
    s.sendall(frame(sign_body(b"one")) + frame(sign_body(b"two")))
    a, b = read_frame(s), read_frame(s)
    s.close()
    if a is None or b is None or a[0] != P.SIGNATURE or b[0] != P.SIGNATURE:
        return False, "replies %s, %s" % (show(a), show(b))
    return (verifies(P.decode(a).signature, b"one") and verifies(P.decode(b).signature, b"two"),
            "the replies do not match the requests in order")


case("two SIGNs sent at once are answered one after the other, in order", pipelined)


def bad_uri():
    s = connect()
    hello3(s)
    r1 = request(s, sign_body(b"x", "not-a-uri"))
    r2 = request(s, sign_body(b"x", "pkcs11:object=no-such-key"))
    r3 = request(s, sign_body(b"after"))
    s.close()
    good = (error_code(r1) == P.E_URI and error_code(r2) == P.E_NO_SUCH_KEY and
            r3 is not None and r3[0] == P.SIGNATURE)
    return good, "answers %s, %s, %s" % (show(r1), show(r2), show(r3))


case("relayed SIGN with a bad URI gets URI, an unknown key NO_SUCH_KEY; the connection signs after",
     bad_uri)


# ---- hostile input over the relay: only that connection is dropped
def dropped(payload, limit=5, close_write=False):
    def fn():
        s = connect()
        hello3(s)
        s.sendall(payload)
        if close_write:
            s.shutdown(socket.SHUT_WR)
        good, why = wait_eof(s, limit)
        s.close()
        return good, why if not good else "closed after %.1f s" % why
    return fn


case("frame of length 0 over the relay is dropped", dropped(b"\0\0\0\0"))
case("frame of length 262145 over the relay is dropped", dropped(P.u32(P.FRAME_MAX + 1)))
case("frame of length 0xffffffff over the relay is dropped", dropped(b"\xff\xff\xff\xff" + b"A" * 100))
case("SIGN with leftover bytes over the relay is dropped",
     dropped(frame(sign_body(b"x") + b"garbage")))
case("SIGN whose data string runs past the frame over the relay is dropped",
     dropped(frame(sign_body(b"x")[:-2])))
case("SIGN with a 4 GiB URI length over the relay is dropped",
     dropped(frame(P.u8(P.SIGN) + b"\xff\xff\xff\xff")))


def h_sign_from_client():
    s = connect()
    hello3(s)
    body = P.u8(P.H_SIGN) + bytes(12) + P.text("") + P.u8(1) + sign_body(b"h")[1:]
    r = request(s, body)
    r2 = request(s, P.status())
    s.close()
    return (error_code(r) == P.E_PROTOCOL and r2 is not None and r2[0] == P.STATUS_REPLY,
            "H_SIGN answered %s, STATUS then %s" % (show(r), show(r2)))


case("H_SIGN (internal) from a client over the relay gets ERROR PROTOCOL, not a relay",
     h_sign_from_client)
rnd = bytearray(os.urandom(4096))
rnd[0] = 0x7f
case("4 KiB of random bytes over the relay are dropped", dropped(bytes(rnd)))
case("4 KiB of random bytes then EOF over the relay are dropped",
     dropped(P.u32(64) + os.urandom(4096), limit=15, close_write=True))


def half_frame():
    s = connect()
    hello3(s)
    body = sign_body(b"half")
    s.sendall(P.u32(len(body)) + body[:len(body) // 2])
    good, why = wait_eof(s, 25)
    s.close()
    return good, why if not good else "closed after %.1f s" % why


case("half a SIGN frame then silence over the relay is dropped by the deadline (<= 25 s)",
     half_frame)

stop.set()
for t in threads:
    t.join(30)
out(not errors and counts["channel"] > 10 and counts["relayed"] > 10,
    "a local channel client and a relayed client signed all along without an error",
    "%r, errors: %s" % (counts, errors))
R.note("held signers: %d local, %d relayed signatures" % (counts["channel"], counts["relayed"]))
R.done()
