#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets: tests/fuzz/corpus/<target>/<name>.

Each seed is a valid (or deliberately borderline) encoding per
docs/protocol.md, so the fuzzers start from messages the agent and the
clients really exchange.  Re-run after a protocol change:

    python3 tests/fuzz/mkcorpus.py            (writes next to this script)
"""
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "corpus")
FRAME_MAX = 262144

TOK = ("pkcs11:model=SoftHSM%20v2;manufacturer=SoftHSM%20project;"
       "serial=0123456789abcdef;token=fuzz")
KEY = TOK + ";id=%02;object=ec256;type=private"
# An EC P-256 SubjectPublicKeyInfo (any valid one will do).
SPKI = bytes.fromhex(
    "3059301306072a8648ce3d020106082a8648ce3d03010703420004"
    "6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296"
    "4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5")


def u8(v): return struct.pack(">B", v)
def u16(v): return struct.pack(">H", v)
def u32(v): return struct.pack(">I", v)
def u64(v): return struct.pack(">Q", v)


def s(b):
    b = b.encode() if isinstance(b, str) else b
    return u32(len(b)) + b


def frame(body):
    return u32(len(body)) + body


def hello(lo=1, hi=1, name="fuzz"):
    return u8(0x01) + u16(lo) + u16(hi) + s(name)


def sign(uri=KEY, scheme=3, hsh=3, mgf=0, inp=0, salt=0, data=b"hello"):
    return u8(0x07) + s(uri) + u8(scheme) + u8(hsh) + u8(mgf) + u8(inp) + u32(salt) + s(data)


def token(uri=TOK, label="fuzz", flags=0x5):
    return (s(uri) + s(label) + s("SoftHSM project") + s("SoftHSM v2") +
            s("0123456789abcdef") + s("libsofthsm2.so") + u32(flags))


def key(uri=KEY, tok=TOK, label="ec256", kid=b"\x02", ktype=2, bits=256,
        curve="P-256", spki=SPKI, cert=b"", flags=0x1):
    return (s(uri) + s(tok) + s(label) + s(kid) + u8(ktype) + u32(bits) + s(curve) +
            s(spki) + s(cert) + s("") + s("") + u32(flags))


def list_body(tokens, keys):
    return u32(len(tokens)) + b"".join(tokens) + u32(len(keys)) + b"".join(keys)


def event(kind=1, uri=KEY, scheme=3, content=3, pid=4242, uid=1000, exe="/usr/bin/curl",
          flags=0, result=0, msg="", dur=310, reason="", count=0, t=1767225600000000):
    return (u64(t) + u8(kind) + s(uri) + u8(scheme) + u8(content) + u32(pid) + u32(uid) +
            s(exe) + u8(flags) + u32(result) + s(msg) + u64(dur) + s(reason) + u32(count))


def events(evs, dropped=None):
    head = b"" if dropped is None else u32(dropped)
    return head + u32(len(evs)) + b"".join(evs)


def error(code, msg):
    return u8(0x81) + u32(code) + s(msg)


def write(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


H = frame(hello())

# ---------------------------------------------------------------- fuzz_request
req = {
    "hello": H,
    "hello-status-list": H + frame(u8(0x02)) + frame(u8(0x03)),
    "unlock-any": H + frame(u8(0x04) + s("") + s("1234")),
    "unlock-token": H + frame(u8(0x04) + s(TOK) + s("1234")),
    "unlock-bad-uri": H + frame(u8(0x04) + s("http://x") + s("1234")),
    "lock-all": H + frame(u8(0x05) + s("")),
    "lock-token": H + frame(u8(0x05) + s(TOK)),
    "open-channel": H + frame(u8(0x06) + s(KEY)),
    "open-channel-label": H + frame(u8(0x06) + s("pkcs11:object=ec256")),
    "open-channel-odd-uri": H + frame(u8(0x06) + s(
        "pkcs11:object=%00%ff%25%3b;id=%zz;type=private;;==;token=" + "%41" * 40 +
        "?pin-value=1234&module-path=/tmp/x.so")),
    "sign-on-main": H + frame(sign()),
    "unknown-type": H + frame(u8(0x3f) + b"whatever") + frame(u8(0x03)),
    "internal-type": H + frame(u8(0x42) + list_body([], [])),
    # H_ADOPT (connection serial, peer pid, peer executable) is internal: refused here.
    "adopt-on-main": H + frame(u8(0x40) + u64(7) + u32(4242) + s("/usr/bin/curl")),
    "reply-type": H + frame(u8(0x80)),
    "list-before-hello": frame(u8(0x03)) + H,
    "version-mismatch": frame(hello(7, 9)),
    "len-zero": H + u32(0),
    "len-over-cap": H + u32(FRAME_MAX + 1),
    "truncated": H + u32(100) + u8(0x03) + b"x" * 9,
    "leftover": H + frame(u8(0x03) + b"garbage"),
    "huge-count": H + frame(u8(0x06) + b"\xff\xff\xff\xff"),
    "pin-too-long": H + frame(u8(0x04) + s("") + s("1" * 257)),
    "text-with-nul": H + frame(u8(0x06) + s(b"pkcs11:object=a\x00b")),
    "health-v2": frame(hello(1, 2)) + frame(u8(0x08)) + frame(u8(0x02)),
    "health-on-v1": H + frame(u8(0x08)) + frame(u8(0x03)),
    # Version 3: LOG (u64 since, u32 max); on a version-1/2 connection UNKNOWN_TYPE.
    "log-v3": frame(hello(1, 3)) + frame(u8(0x0C) + u64(0) + u32(0)) +
              frame(u8(0x04) + s("") + s("0000")) + frame(u8(0x0C) + u64(1) + u32(2)),
    "log-on-v1": H + frame(u8(0x0C) + u64(0) + u32(0)) + frame(u8(0x03)),
    "log-short": frame(hello(1, 3)) + frame(u8(0x0C) + u64(0)),
    "log-reply-as-request": frame(hello(1, 3)) + frame(u8(0x88) + u32(0)),
    "event-as-request": frame(hello(1, 3)) + frame(u8(0x45) + events([event()], 0)),
    # Version 3 (forwarding): SIGN on the main connection is relayed to the helper.
    "sign-on-main-v3": frame(hello(1, 3)) + frame(sign()) + frame(sign(data=b"two")),
    "sign-on-main-v3-after-channel": frame(hello(1, 3)) + frame(u8(0x06) + s(KEY)) + frame(sign()),
    "sign-on-main-v3-no-key": frame(hello(1, 3)) + frame(sign(uri="pkcs11:object=none")) +
                              frame(sign(uri="not-a-uri")) + frame(u8(0x03)),
    "sign-on-main-v3-rsa-pss": frame(hello(1, 3)) + frame(sign(scheme=2, hsh=4, mgf=3, salt=0xFFFFFFFE,
                                                                 data=b"x" * 300)),
    "sign-on-main-v3-leftover": frame(hello(1, 3)) + frame(sign() + b"junk"),
    "sign-on-main-v3-half": frame(hello(1, 3)) + u32(200) + sign()[:40],
    # H_SIGN is internal: a client sending it gets an error, never a relay.
    "hsign-on-main": frame(hello(1, 3)) + frame(u8(0x46) + u64(7) + u32(4242) + s("/usr/bin/ssh") +
                                                u8(1) + sign()[1:]),
    "many-requests": H + b"".join(frame(u8(t)) for t in (2, 3, 2, 3)) +
                     frame(u8(0x05) + s("")) + frame(u8(0x04) + s("") + s("0000")),
}
for n, d in req.items():
    write("fuzz_request", n, d)

# ---------------------------------------------------------------- fuzz_internal
def internal(rid, body):
    return frame(u32(rid) + body)


inv = u8(0x42) + list_body([token()], [key()])
inv2 = u8(0x42) + list_body([token(flags=0x7), token(uri=TOK + "2", label="two", flags=0x1)],
                            [key(), key(uri=KEY + "2", tok=TOK + "2", label="two", cert=b"\x30\x00")])
intl = {
    "inventory": internal(0, inv),
    "inventory-empty": internal(0, u8(0x42) + list_body([], [])),
    "inventory-two": internal(0, inv2),
    "inventory-then-ok": internal(0, inv) + internal(1, u8(0x80)) + internal(2, u8(0x80)),
    "inventory-then-error": internal(0, inv) + internal(1, error(15, "PIN incorrect")),
    "inventory-twice": internal(0, inv) + internal(0, inv2) + internal(3, u8(0x80)),
    "bad-frame": internal(0, inv) + frame(b"\x00\x00"),
    "unknown-reply": internal(0, inv) + internal(1, u8(0x86) + s(b"\x01" * 64)),
    "len-zero": internal(0, inv) + u32(0),
    "orphan-id": internal(0, inv) + internal(77, u8(0x80)),
    "module-error": internal(0, error(19, "module /x.so: C_Initialize: CKR_ARGUMENTS_BAD")) +
                    internal(0, inv),
    # H_ADOPT goes agent -> helper; from a helper it is a protocol error.  The
    # executable is absolute or "" (unknown); a relative one is malformed.
    "adopt-exe": internal(0, inv) + internal(1, u8(0x40) + u64(7) + u32(4242) + s("/usr/bin/curl")),
    "adopt-exe-unknown": internal(0, inv) + internal(1, u8(0x40) + u64(7) + u32(0) + s("")),
    "adopt-exe-relative": internal(0, inv) + internal(1, u8(0x40) + u64(7) + u32(1) + s("curl")),
    "adopt-old-layout": internal(0, inv) + internal(1, u8(0x40) + u64(7) + u32(1)),
    # H_EVENT (version 3): u32 dropped, list of event; id 0.
    "event-sign": internal(0, inv) + internal(0, u8(0x45) + events([event()], 0)),
    "event-many": internal(0, inv) + internal(0, u8(0x45) + events(
        [event(kind=4, content=1, result=28, msg="tls-only"), event(kind=3, uri=TOK, scheme=0,
         content=0, pid=0, exe="", reason="idle"), event(kind=1, content=2)] * 4, 3)),
    "event-bad-kind": internal(0, inv) + internal(0, u8(0x45) + events([event(kind=9)], 0)),
    "event-foreign-kind": internal(0, inv) + internal(0, u8(0x45) + events([event(kind=2)], 0)),
    "event-bad-content": internal(0, inv) + internal(0, u8(0x45) + events([event(content=7)], 0)),
    "event-huge-count": internal(0, inv) + internal(0, u8(0x45) + u32(0) + b"\xff\xff\xff\xff"),
    "event-exe-nl": internal(0, inv) + internal(0, u8(0x45) + events(
        [event(exe="/tmp/a\nP11AGENT_RESULT=ok", uri="pkcs11:object=a%0a")], 0xffffffff)),
    # Version 3: a helper's answers to relayed SIGNs (H_SIGN): SIGNATURE or
    # ERROR by id; SIGNATURE to a request that was no H_SIGN is an error.
    "hsign-signature": internal(0, inv) + internal(8, u8(0x86) + s(b"\x30\x06\x02\x01\x01\x02\x01\x01")),
    "hsign-error": internal(0, inv) + internal(8, error(28, "forwarding is denied for key 'ec256'")),
    "hsign-ok-unexpected": internal(0, inv) + internal(8, u8(0x80)) + internal(9, u8(0x80)),
    "hsign-big-signature": internal(0, inv) + internal(8, u8(0x86) + s(b"\x01" * 1025)),
    # H_SIGN goes agent -> helper; from a helper it is refused.
    "hsign-from-helper": internal(0, inv) + internal(1, u8(0x46) + u64(7) + u32(1) + s("/usr/bin/ssh") +
                                                    u8(1) + sign()[1:]),
    "hsign-bad-flags": internal(0, inv) + internal(1, u8(0x46) + u64(7) + u32(1) + s("") +
                                                  u8(0x80) + sign()[1:]),
}
for n, d in intl.items():
    write("fuzz_internal", n, d)

# ---------------------------------------------------------------- fuzz_reply
def reply_input(main, chan=b""):
    return u16(len(main)) + main + chan


HR = frame(u8(0x82) + u16(1) + s("p11agentd 0.1.0"))
status = frame(u8(0x83) + s("p11agentd 0.1.0") + u32(1234) + u32(1) + u32(1) + u32(2) +
               u32(1) + token())
lst = frame(u8(0x84) + list_body([token()], [key()]))
ok = frame(u8(0x80))
chan = frame(u8(0x85))
sig = frame(u8(0x86) + s(b"\x30\x06\x02\x01\x01\x02\x01\x01"))
rep = {
    "hello-only": reply_input(HR),
    "full-session": reply_input(HR + status + lst + ok + ok + chan, sig),
    "errors": reply_input(HR + frame(error(14, "token is locked")) +
                          frame(error(22, "busy")) + frame(error(15, "PIN incorrect")) +
                          frame(error(0xffffffff, "")) + frame(error(11, "no such key"))),
    "wrong-types": reply_input(HR + ok + chan + lst + status + HR, frame(u8(0x80))),
    "bad-version": reply_input(frame(u8(0x82) + u16(9) + s("future"))),
    "hello-error": reply_input(frame(error(6, "no common version"))),
    "channel-error": reply_input(HR + status + lst + ok + ok + chan,
                                 frame(error(14, "locked"))),
    "channel-garbage": reply_input(HR + status + lst + ok + ok + chan, u32(5) + b"\x86\x00"),
    "len-zero": reply_input(HR + u32(0)),
    "len-over-cap": reply_input(HR + u32(FRAME_MAX + 1)),
    "leftover": reply_input(HR + frame(u8(0x80) + b"junk")),
    "huge-count": reply_input(HR + frame(u8(0x84) + b"\xff\xff\xff\xff")),
    # Version 3: the client sends LOG after LOCK; LOG_REPLY is a list of event.
    "log-reply": reply_input(frame(u8(0x82) + u16(3) + s("p11agentd 0.2")) + status + lst + ok + ok +
                             frame(u8(0x88) + events([event(), event(kind=7, count=5)])) + chan, sig),
    "log-reply-bad": reply_input(frame(u8(0x82) + u16(3) + s("p11agentd 0.2")) + status + lst + ok + ok +
                                 frame(u8(0x88) + events([event(kind=0)]))),
    "log-reply-error": reply_input(frame(u8(0x82) + u16(3) + s("p11agentd 0.2")) + status + lst + ok + ok +
                                   frame(error(5, "unknown message type"))),
}
for n, d in rep.items():
    write("fuzz_reply", n, d)

# ---------------------------------------------------------------- fuzz_keyref
def der_len(n):
    if n < 0x80:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def tlv(tag, body):
    return bytes([tag]) + der_len(len(body)) + body


def keyref(uri, spki=None, version=1):
    body = tlv(0x02, bytes([version])) + tlv(0x0c, uri.encode())
    if spki is not None:
        body += spki
    return tlv(0x30, body)


kr = {
    "uri-only": keyref(KEY),
    "uri-spki": keyref(KEY, SPKI),
    "short-uri": keyref("pkcs11:"),
    "long-uri": keyref("pkcs11:object=" + "a" * 3000, SPKI),
    "version-2": keyref(KEY, version=2),
    "not-pkcs11": keyref("file:/etc/passwd"),
    "trailing": keyref(KEY) + b"\x00",
    "truncated": keyref(KEY, SPKI)[:-10],
    "indefinite": b"\x30\x80" + keyref(KEY)[2:],
    "empty": b"",
}
for n, d in kr.items():
    write("fuzz_keyref", n, d)

# ---------------------------------------------------------------- fuzz_uri
# First byte even: the rest is a URI to parse; odd: token fields, id and
# label for a format/parse/match round trip (tests/fuzz/fuzz_uri.c).
for n, d in {
    "key-uri": b"\x00pkcs11:model=SoftHSM%20v2;manufacturer=SoftHSM%20project;"
               b"serial=2eaa0f19d9b8df71;token=p11agent-test;id=%02;object=ec256;type=private",
    "token-uri": b"\x00pkcs11:token=tok;manufacturer=m;model=x;serial=1",
    "query": b"\x00pkcs11:object=key;id=%01?pin-value=1234&module-name=softhsm2",
    "bad-escape": b"\x00pkcs11:object=%4",
    "upper-scheme": b"\x00PKCS11:object=key",
    "library": b"\x00pkcs11:library-version=2.40;library-manufacturer=x;slot-id=0;slot-description=s",
    "empty": b"\x00pkcs11:",
    "not-uri": b"\x00file:/etc/passwd",
    "round-trip": b"\x01\x0ap11agent-t\x04Soft\x02v2\x03abc\x02\x01\x02ec256",
    "round-trip-bytes": b"\x01\x20" + bytes(range(32)) + b"\x00\x00\x00\x05" +
                        bytes([0, 255, 37, 59, 63]) + b"a;b?c%d/e",
}.items():
    write("fuzz_uri", n, d)

print("corpus written to", OUT)
