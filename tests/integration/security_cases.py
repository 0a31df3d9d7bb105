"""security_cases.py SOCKET KEY_URI: t_security's raw protocol cases.

A protocol front door that drops bad frames (only the offending
connection) while other clients keep working.  Prints p11a_proto.Cases
lines for lib.sh's relay_cases.
"""
import os
import socket
import sys
import threading
import time

import p11a_proto as P

SOCK, KEY_URI = sys.argv[1], sys.argv[2]
NAME = "t_security security_cases.py"
R = P.Cases()
out, case = R.out, R.case
frame, read_frame, error_code, show = P.frame, P.read_frame, P.error_code, P.show
wait_eof = P.wait_eof


def connect(timeout=20):
    return P.raw_connect(SOCK, timeout)


def hello(s):
    return P.raw_hello(s, NAME)


request = P.raw_request


def sign_body(data):
    return P.sign(KEY_URI, P.SCHEME_ECDSA, P.HASH_SHA256, data)


# ---- a client that keeps working while the bad ones are dropped
held_ok = 0
held_errors = []
stop = threading.Event()
held_answering = threading.Event()


def held_client():
    global held_ok
    try:
        s = connect()
        hello(s)
        while not stop.is_set():
            r = request(s, P.list_())
            if r is None or r[0] != P.LIST_REPLY:
                held_errors.append("LIST answered %s" % show(r))
                return
            held_ok += 1
            held_answering.set()
            time.sleep(0.05)    # the held client's pace: LIST 20 times a second
        s.close()
    except Exception as e:  # noqa: BLE001 - any failure is a test failure
        held_errors.append(repr(e))
    finally:
        held_answering.set()


held = threading.Thread(target=held_client)
held.start()
# The cases start once the held connection has answered its first LIST.
if not held_answering.wait(20):
    held_errors.append("no LIST answered within 20 s")


def dropped(payload, after_hello=False, limit=5, close_write=False):
    def fn():
        s = connect()
        if after_hello:
            hello(s)
        s.sendall(payload)
        if close_write:
            s.shutdown(socket.SHUT_WR)
        good, why = wait_eof(s, limit)
        s.close()
        return good, why if not good else "closed after %.1f s" % why
    return fn


# (1) length 0, (2) length over the cap: refused as soon as the length is read
case("frame of length 0 is dropped", dropped(b"\0\0\0\0"))
case("frame of length 0 after HELLO is dropped", dropped(b"\0\0\0\0", after_hello=True))
case("frame of length 262145 is dropped at once", dropped(P.u32(P.FRAME_MAX + 1)))
case("frame of length 0xffffffff after HELLO is dropped",
     dropped(b"\xff\xff\xff\xff" + b"A" * 100, after_hello=True))

# (3) garbage after a valid HELLO
case("LIST with leftover bytes after HELLO is dropped (malformed)",
     dropped(frame(P.list_() + b"garbage"), after_hello=True))
case("UNLOCK whose string runs past the frame is dropped",
     dropped(frame(P.u8(P.UNLOCK) + P.u32(1000) + b"pkcs11:"), after_hello=True))
case("OPEN_CHANNEL with a 4 GiB string length is dropped",
     dropped(frame(P.u8(P.OPEN_CHANNEL) + b"\xff\xff\xff\xff"), after_hello=True))
rnd = bytearray(os.urandom(4096))
rnd[0] = 0x7f  # a length over the cap: refused before buffering anything
case("4 KiB of random bytes after HELLO are dropped", dropped(bytes(rnd), after_hello=True))
rnd2 = os.urandom(4096)
case("4 KiB of random bytes after HELLO, then EOF, are dropped",
     dropped(P.u32(64) + rnd2, after_hello=True, limit=15, close_write=True))


# (4) a truncated frame, then close: nothing to read, the agent must cope
def truncated():
    s = connect()
    hello(s)
    s.sendall(P.u32(100) + P.list_() + b"x" * 9)
    s.close()
    s2 = connect()
    hello(s2)
    r = request(s2, P.status())
    s2.close()
    return (r is not None and r[0] == P.STATUS_REPLY), "STATUS after a truncated frame: %s" % show(r)


case("truncated frame then close: agent answers the next client", truncated)


# (5) half a frame, then silence: dropped at the 10 s half-frame deadline
def half_frame():
    s = connect()
    hello(s)
    s.sendall(P.u32(100) + P.list_() + b"y" * 49)
    good, why = wait_eof(s, 25)
    s.close()
    if not good:
        return False, why
    return True, "closed after %.1f s" % why


case("half a frame then silence is dropped by the deadline (<= 25 s)", half_frame)


# HELLO must come first; versions must overlap
def not_hello_first():
    s = connect()
    r = request(s, P.list_())
    s.close()
    return error_code(r) == P.E_PROTOCOL, "LIST before HELLO answered %s" % show(r)


case("LIST before HELLO gets ERROR PROTOCOL (24)", not_hello_first)


def bad_version():
    s = connect()
    r = request(s, P.hello("future", 7, 9))
    if error_code(r) != P.E_VERSION:
        return False, "HELLO 7..9 answered %s" % show(r)
    good, why = wait_eof(s, 5)
    s.close()
    return good, "connection not closed after ERROR VERSION: %s" % why


case("HELLO for versions 7..9 gets ERROR VERSION (6) and a close", bad_version)


# Unknown message type: ERROR UNKNOWN_TYPE, connection stays usable
def unknown_type():
    s = connect()
    hello(s)
    r = request(s, bytes([0x3f]) + b"whatever")
    if r is None or r[0] != P.ERROR:
        return False, "unknown type answered %s" % show(r)
    if error_code(r) != P.E_UNKNOWN_TYPE:
        return False, "ERROR code %r, expected 5 (UNKNOWN_TYPE)" % error_code(r)
    r = request(s, P.list_())
    s.close()
    return (r is not None and r[0] == P.LIST_REPLY), "LIST after the ERROR answered %s" % show(r)


case("unknown message type 0x3f after HELLO gets ERROR 0x81 UNKNOWN_TYPE; connection still usable",
     unknown_type)


def sign_on_main():
    s = connect()
    hello(s)
    r = request(s, sign_body(b"msg"))
    if error_code(r) != P.E_PROTOCOL:
        return False, "SIGN on the main connection answered %s" % show(r)
    r = request(s, P.status())
    s.close()
    return (r is not None and r[0] == P.STATUS_REPLY), "STATUS afterwards answered %s" % show(r)


case("SIGN on a main connection gets ERROR PROTOCOL (24); connection still usable", sign_on_main)


# ---- signing channel: a valid SIGN works, garbage drops only that channel
def open_channel():
    c = P.client(SOCK, NAME, 20)
    return c.sock, c.open_channel(KEY_URI).sock


def channel_sign():
    s, ch = open_channel()
    r = request(ch, sign_body(b"hello channel"))
    ch.close()
    s.close()
    return (r is not None and r[0] == P.SIGNATURE), "SIGN answered %s" % show(r)


case("OPEN_CHANNEL + SIGN on the channel gives a SIGNATURE", channel_sign)


def channel_garbage():
    s, ch = open_channel()
    ch.sendall(frame(sign_body(b"x")[:-2]))  # string runs past the end
    good, why = wait_eof(ch, 5)
    ch.close()
    if not good:
        s.close()
        return False, "malformed SIGN did not close the channel: %s" % why
    s.close()
    s2, ch2 = open_channel()
    r = request(ch2, sign_body(b"after garbage"))
    ch2.close()
    s2.close()
    return (r is not None and r[0] == P.SIGNATURE), "SIGN on a new channel answered %s" % show(r)


case("malformed SIGN drops that channel; a new channel still signs", channel_garbage)


def channel_zero_len():
    s, ch = open_channel()
    ch.sendall(b"\0\0\0\0")
    good, why = wait_eof(ch, 5)
    ch.close()
    s.close()
    return good, why


case("frame of length 0 on a signing channel drops the channel", channel_zero_len)


def channel_unknown():
    s, ch = open_channel()
    r = request(ch, P.list_())
    ch.close()
    s.close()
    return (r is not None and r[0] == P.ERROR) or r is None, "LIST on a channel answered %s" % show(r)


case("a non-SIGN request on a channel gets an ERROR or a close, not a hang", channel_unknown)


# ---- many clients at once
def many():
    socks = []
    try:
        for _ in range(64):
            s = connect()
            hello(s)
            socks.append(s)
        for s in socks:
            s.sendall(frame(P.list_()))
        bad = 0
        for s in socks:
            r = read_frame(s)
            if r is None or r[0] != P.LIST_REPLY:
                bad += 1
        return bad == 0, "%d of 64 LISTs failed" % bad
    finally:
        for s in socks:
            s.close()


case("64 simultaneous connections each get a LIST_REPLY", many)

stop.set()
held.join(30)
out(not held_errors and held_ok > 10,
    "a connection held through all of the above kept answering LIST",
    "%d LISTs, errors: %s" % (held_ok, held_errors))
R.note("held connection answered %d LISTs" % held_ok)


# Every dropped connection is gone: STATUS counts this one alone
def connections_count():
    s = connect()
    hello(s)
    r = request(s, P.status())
    s.close()
    if r is None or r[0] != P.STATUS_REPLY:
        raise ValueError("STATUS answered %s" % show(r))
    return P.decode(r).connections


deadline = time.monotonic() + 5
n = None
while time.monotonic() < deadline:
    try:
        n = connections_count()
    except Exception as e:  # noqa: BLE001
        n = repr(e)
        break
    if n == 1:
        break
    time.sleep(0.2)     # polling period of a 5 s deadline
out(n == 1, "agent counts one open connection once the bad ones are gone",
    "STATUS connections = %r" % (n,))
R.done()
