"""p11a_proto.py: the p11agent wire protocol (docs/protocol.md) for the tests.

One Python codec for every test that speaks the protocol itself (soak,
security, load, lifecycle), so that none of them carries its own frame
helpers and constants.  It follows docs/protocol.md, version 1; the
constants are those of common/p11a.h and common/proto.h.

Codec (no I/O):
  frame(body)                     u32 length || body
  frame_size(header)              4 + the length in a frame's first 4 bytes
  hello(), status(), list_(), unlock(), lock(), open_channel(), sign()
                                  request bodies
  decode(body)                    any message body -> Msg (type, fields);
                                  raises Malformed like the agent would
                                  (truncated, leftover bytes, limits, NUL in
                                  text), or UnknownType
  error_code(body)                the code of an ERROR body, else None
I/O:
  read_frame(sock)                a frame body off a plain socket, None at EOF
  raw_connect(), raw_request(),   plain sockets for tests that send bad
  raw_hello(), wait_eof(), show() bytes and look at raw replies
  Conn                            a blocking stream socket with a frame
                                  reader that collects SCM_RIGHTS
                                  descriptors (recvmsg); connect(),
                                  request(), and the verbs hello(),
                                  status(), list(), unlock(), lock(),
                                  open_channel() (returns the channel as a
                                  Conn), sign().  An ERROR reply raises
                                  AgentError(code, message).
Test output:
  Cases                           the lines lib.sh's relay_cases turns
                                  into TAP checks (ok, not ok, figure,
                                  comments, done)
"""
import os
import socket
import struct
import time

VERSION = 1
FRAME_MAX = 262144          # body bytes, excluding the 4-byte length
PIN_MAX = 256
URI_MAX = 4096
TEXT_MAX = 4096
LIST_MAX = 4096
SIG_MAX = 1024

# Message types
HELLO = 0x01
STATUS = 0x02
LIST = 0x03
UNLOCK = 0x04
LOCK = 0x05
OPEN_CHANNEL = 0x06
SIGN = 0x07
H_ADOPT = 0x40
H_REFRESH = 0x41
H_INVENTORY = 0x42
H_SIGN = 0x46             # version 3 (forwarding): internal, never on a client socket
OK = 0x80
ERROR = 0x81
HELLO_REPLY = 0x82
STATUS_REPLY = 0x83
LIST_REPLY = 0x84
CHANNEL = 0x85
SIGNATURE = 0x86

TYPE_NAMES = {
    HELLO: "HELLO", STATUS: "STATUS", LIST: "LIST", UNLOCK: "UNLOCK", LOCK: "LOCK",
    OPEN_CHANNEL: "OPEN_CHANNEL", SIGN: "SIGN", H_ADOPT: "H_ADOPT", H_REFRESH: "H_REFRESH",
    H_INVENTORY: "H_INVENTORY", OK: "OK", ERROR: "ERROR", HELLO_REPLY: "HELLO_REPLY",
    STATUS_REPLY: "STATUS_REPLY", LIST_REPLY: "LIST_REPLY", CHANNEL: "CHANNEL",
    SIGNATURE: "SIGNATURE",
}

# Error codes (enum p11a_err; stable on the wire)
E_NOMEM = 1
E_TOO_LARGE = 2
E_TRUNCATED = 3
E_MALFORMED = 4
E_UNKNOWN_TYPE = 5
E_VERSION = 6
E_IO = 7
E_NOT_RUNNING = 8
E_TIMEOUT = 9
E_DENIED = 10
E_NO_SUCH_KEY = 11
E_NO_SUCH_TOKEN = 12
E_AMBIGUOUS = 13
E_LOCKED = 14
E_PIN_INCORRECT = 15
E_PIN_LOCKED = 16
E_PIN_INVALID = 17
E_TOKEN_NOT_PRESENT = 18
E_TOKEN = 19
E_UNSUPPORTED = 20
E_BAD_REQUEST = 21
E_BUSY = 22
E_HELPER = 23
E_PROTOCOL = 24
E_URI = 25
E_INTERNAL = 26
E_CRYPTO = 27
E_POLICY = 28

ERROR_NAMES = {
    E_NOMEM: "NOMEM", E_TOO_LARGE: "TOO_LARGE", E_TRUNCATED: "TRUNCATED",
    E_MALFORMED: "MALFORMED", E_UNKNOWN_TYPE: "UNKNOWN_TYPE", E_VERSION: "VERSION",
    E_IO: "IO", E_NOT_RUNNING: "NOT_RUNNING", E_TIMEOUT: "TIMEOUT", E_DENIED: "DENIED",
    E_NO_SUCH_KEY: "NO_SUCH_KEY", E_NO_SUCH_TOKEN: "NO_SUCH_TOKEN", E_AMBIGUOUS: "AMBIGUOUS",
    E_LOCKED: "LOCKED", E_PIN_INCORRECT: "PIN_INCORRECT", E_PIN_LOCKED: "PIN_LOCKED",
    E_PIN_INVALID: "PIN_INVALID", E_TOKEN_NOT_PRESENT: "TOKEN_NOT_PRESENT", E_TOKEN: "TOKEN",
    E_UNSUPPORTED: "UNSUPPORTED", E_BAD_REQUEST: "BAD_REQUEST", E_BUSY: "BUSY",
    E_HELPER: "HELPER", E_PROTOCOL: "PROTOCOL", E_URI: "URI", E_INTERNAL: "INTERNAL",
    E_CRYPTO: "CRYPTO", E_POLICY: "POLICY",
}

# Signature schemes, hashes, inputs
SCHEME_RSA_PKCS1 = 1
SCHEME_RSA_PSS = 2
SCHEME_ECDSA = 3
SCHEME_EDDSA = 4
HASH_NONE = 0
HASH_SHA1 = 1
HASH_SHA224 = 2
HASH_SHA256 = 3
HASH_SHA384 = 4
HASH_SHA512 = 5
HASH_NAMES = {HASH_NONE: "none", HASH_SHA1: "sha1", HASH_SHA224: "sha224",
              HASH_SHA256: "sha256", HASH_SHA384: "sha384", HASH_SHA512: "sha512"}
INPUT_MESSAGE = 0
INPUT_DIGEST = 1
INPUT_RAW = 2
PSS_SALT_DIGEST = 0xFFFFFFFF
PSS_SALT_MAX = 0xFFFFFFFE

# Key types and flags
KEY_RSA = 1
KEY_EC = 2
KEY_ED25519 = 3
TOKEN_PRESENT = 0x01
TOKEN_LOGGED_IN = 0x02
TOKEN_LOGIN_REQUIRED = 0x04
TOKEN_PIN_COUNT_LOW = 0x08
TOKEN_PIN_FINAL_TRY = 0x10
TOKEN_PIN_LOCKED = 0x20
TOKEN_PROTECTED_PATH = 0x40
KEY_PRIVATE_VISIBLE = 0x01
KEY_HAS_CERT = 0x02
KEY_ALWAYS_AUTH = 0x04


def error_name(code):
    return ERROR_NAMES.get(code, "E%d" % code)


class Malformed(ValueError):
    """A frame or body the agent's decoder would refuse."""


class UnknownType(Malformed):
    """A well-formed frame of an unknown message type."""


class Closed(ConnectionError):
    """The peer closed the connection (at a frame boundary or mid-frame)."""


class AgentError(Exception):
    """An ERROR reply: code (int), name, message."""

    def __init__(self, code, message):
        super().__init__("%s: %s" % (error_name(code), message))
        self.code = code
        self.name = error_name(code)
        self.message = message


# ---------------------------------------------------------------- encoding

def u8(v):
    return struct.pack(">B", v)


def u16(v):
    return struct.pack(">H", v)


def u32(v):
    return struct.pack(">I", v)


def string(b):
    """A length-prefixed byte string (no limit checked: tests send bad ones)."""
    return u32(len(b)) + b


def text(s):
    return string(s.encode() if isinstance(s, str) else s)


def frame(body):
    return u32(len(body)) + body


def frame_size(header):
    """Bytes of a whole frame, length prefix included, from its first 4 bytes."""
    return 4 + struct.unpack(">I", header[:4])[0]


def hello(client="p11a_proto.py", min_version=VERSION, max_version=VERSION):
    return u8(HELLO) + u16(min_version) + u16(max_version) + text(client)


def status():
    return u8(STATUS)


def list_():
    return u8(LIST)


def unlock(token_uri, pin):
    return u8(UNLOCK) + text(token_uri) + string(pin.encode() if isinstance(pin, str) else pin)


def lock(token_uri=""):
    return u8(LOCK) + text(token_uri)


def open_channel(key_uri):
    return u8(OPEN_CHANNEL) + text(key_uri)


def sign(key_uri, scheme, hash_, data, input_=INPUT_MESSAGE, mgf1_hash=HASH_NONE, salt_len=0):
    return (u8(SIGN) + text(key_uri) + u8(scheme) + u8(hash_) + u8(mgf1_hash) + u8(input_) +
            u32(salt_len) + string(data))


def error(code, message):
    return u8(ERROR) + u32(code) + text(message)


# ---------------------------------------------------------------- decoding

class Token:
    __slots__ = ("uri", "label", "manufacturer", "model", "serial", "module", "flags")

    def __init__(self, **kw):
        for k in self.__slots__:
            setattr(self, k, kw[k])

    @property
    def present(self):
        return bool(self.flags & TOKEN_PRESENT)

    @property
    def logged_in(self):
        return bool(self.flags & TOKEN_LOGGED_IN)

    def __repr__(self):
        return "Token(%r, %r, flags=0x%x)" % (self.label, self.module, self.flags)


class Key:
    __slots__ = ("uri", "token_uri", "label", "id", "type", "bits", "curve", "spki", "cert",
                 "cert_uri", "cert_label", "flags")

    def __init__(self, **kw):
        for k in self.__slots__:
            setattr(self, k, kw[k])

    def __repr__(self):
        return "Key(%r, id=%s, %s)" % (self.label, self.id.hex(), self.uri)


class Msg:
    """A decoded message: .type, .name and the fields of docs/protocol.md as attributes."""

    def __init__(self, type_, **fields):
        self.type = type_
        self.name = TYPE_NAMES.get(type_, "0x%02x" % type_)
        self.fds = []
        self.__dict__.update(fields)

    def __repr__(self):
        f = ", ".join("%s=%r" % (k, v) for k, v in self.__dict__.items()
                      if k not in ("type", "name", "fds"))
        return "%s(%s)" % (self.name, f)


class _Reader:
    def __init__(self, body):
        self.b = body
        self.o = 0

    def take(self, n):
        if len(self.b) - self.o < n:
            raise Malformed("truncated: %d bytes wanted at offset %d of %d" % (n, self.o, len(self.b)))
        v = self.b[self.o:self.o + n]
        self.o += n
        return v

    def u8(self):
        return self.take(1)[0]

    def u16(self):
        return struct.unpack(">H", self.take(2))[0]

    def u32(self):
        return struct.unpack(">I", self.take(4))[0]

    def string(self, limit=FRAME_MAX):
        n = self.u32()
        if n > limit:
            raise Malformed("string of %d bytes over its limit %d" % (n, limit))
        return bytes(self.take(n))

    def text(self, limit=TEXT_MAX):
        b = self.string(limit)
        if b"\0" in b:
            raise Malformed("text with a NUL byte")
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Malformed("text is not UTF-8: %s" % e) from None

    def count(self):
        n = self.u32()
        if n > LIST_MAX:
            raise Malformed("list of %d items over the limit %d" % (n, LIST_MAX))
        return n

    def end(self):
        if self.o != len(self.b):
            raise Malformed("%d leftover bytes" % (len(self.b) - self.o))


def _token(r):
    return Token(uri=r.text(URI_MAX), label=r.text(), manufacturer=r.text(), model=r.text(),
                 serial=r.text(), module=r.text(), flags=r.u32())


def _key(r):
    return Key(uri=r.text(URI_MAX), token_uri=r.text(URI_MAX), label=r.text(), id=r.string(),
               type=r.u8(), bits=r.u32(), curve=r.text(), spki=r.string(), cert=r.string(),
               cert_uri=r.text(URI_MAX), cert_label=r.text(), flags=r.u32())


def _tokens(r):
    return [_token(r) for _ in range(r.count())]


def decode(body):
    """Decodes one message body (type byte and fields) into a Msg."""
    if len(body) == 0:
        raise Malformed("empty body")
    if len(body) > FRAME_MAX:
        raise Malformed("body of %d bytes over the cap" % len(body))
    t = body[0]
    r = _Reader(memoryview(body)[1:])
    if t == HELLO:
        m = Msg(t, min_version=r.u16(), max_version=r.u16(), client=r.text())
    elif t in (STATUS, LIST, H_ADOPT, H_REFRESH, OK, CHANNEL):
        m = Msg(t)
    elif t == UNLOCK:
        m = Msg(t, token_uri=r.text(URI_MAX), pin=r.string(PIN_MAX))
    elif t == LOCK:
        m = Msg(t, token_uri=r.text(URI_MAX))
    elif t == OPEN_CHANNEL:
        m = Msg(t, key_uri=r.text(URI_MAX))
    elif t == SIGN:
        m = Msg(t, key_uri=r.text(URI_MAX), scheme=r.u8(), hash=r.u8(), mgf1_hash=r.u8(),
                input=r.u8(), salt_len=r.u32(), data=r.string())
    elif t == ERROR:
        m = Msg(t, code=r.u32(), message=r.text())
    elif t == HELLO_REPLY:
        m = Msg(t, version=r.u16(), agent=r.text())
    elif t == STATUS_REPLY:
        m = Msg(t, agent=r.text(), pid=r.u32(), modules=r.u32(), modules_up=r.u32(),
                connections=r.u32(), tokens=_tokens(r))
    elif t in (LIST_REPLY, H_INVENTORY):
        tokens = _tokens(r)
        m = Msg(t, tokens=tokens, keys=[_key(r) for _ in range(r.count())])
    elif t == SIGNATURE:
        m = Msg(t, signature=r.string(SIG_MAX))
    else:
        raise UnknownType("unknown message type 0x%02x" % t)
    r.end()
    return m


def error_code(body):
    """The code of an ERROR body, else None (also for None: no reply)."""
    if body is None or len(body) < 5 or body[0] != ERROR:
        return None
    return struct.unpack(">I", body[1:5])[0]


# ---------------------------------------------------------------- I/O

def read_frame(sock):
    """The next frame body from a plain socket (no descriptors), or None when
    the peer closes or resets it, even mid-frame; Malformed for a length of 0
    or over the cap.  For tests that look at raw bytes; Conn is the client."""
    def exact(n):
        buf = b""
        while len(buf) < n:
            try:
                d = sock.recv(n - len(buf))
            except ConnectionResetError:
                d = b""
            if not d:
                return None
            buf += d
        return buf
    h = exact(4)
    if h is None:
        return None
    (n,) = struct.unpack(">I", h)
    if n == 0 or n > FRAME_MAX:
        raise Malformed("frame length %d" % n)
    return exact(n)


def raw_connect(path, timeout=20.0):
    """A plain connected socket (no HELLO) with timeout on every call."""
    return Conn.connect(path, timeout).sock


def raw_request(sock, body):
    """Sends one frame, returns the reply body (None when the peer closed)."""
    sock.sendall(frame(body))
    return read_frame(sock)


def raw_hello(sock, client="p11a_proto.py"):
    """HELLO on a plain socket; Malformed unless the reply is HELLO_REPLY."""
    r = raw_request(sock, hello(client))
    if r is None or r[0] != HELLO_REPLY:
        raise Malformed("HELLO answered with %s" % show(r))
    return r


def show(body):
    """A reply body for a failure message: its first bytes, or None."""
    return repr(body[:8] if body else body)


def wait_eof(sock, limit):
    """(True, seconds) when the peer closes within limit seconds, skipping
    ERROR frames; (False, why) otherwise."""
    sock.settimeout(limit)
    t0 = time.monotonic()
    try:
        while True:
            r = read_frame(sock)
            if r is None:
                return True, time.monotonic() - t0
            if r[0] != ERROR:
                return False, "got a non-ERROR reply type 0x%02x" % r[0]
    except socket.timeout:
        return False, "still open after %d s" % limit
    except (ValueError, OSError) as e:
        return False, str(e)


_FDS_MAX = 8        # descriptors taken per recvmsg, as common/proto.c


class Conn:
    """A frame connection on a blocking stream socket (main connection or channel).

    Reads go through recvmsg so that descriptors passed with SCM_RIGHTS are
    collected; recv_msg() hands them to the message they came with (one
    outstanding request per connection).  timeout (seconds, None = for
    ever) bounds every read and write; socket.timeout is raised past it.
    """

    def __init__(self, sock, timeout=30.0):
        self.sock = sock
        self.sock.settimeout(timeout)
        self.buf = bytearray()
        self.fds = []
        self.eof = False

    @classmethod
    def connect(cls, path, timeout=30.0):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            s.connect(path)
        except BaseException:
            s.close()
            raise
        return cls(s, timeout)

    def settimeout(self, timeout):
        self.sock.settimeout(timeout)

    def fileno(self):
        return self.sock.fileno()

    def close(self):
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- raw
    def send_raw(self, data):
        self.sock.sendall(data)

    def send(self, body):
        self.sock.sendall(frame(body))

    def _fill(self):
        """One recvmsg into the buffer; False at EOF."""
        data, anc, flags, _ = self.sock.recvmsg(
            65536, socket.CMSG_SPACE(_FDS_MAX * struct.calcsize("i")))
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                n = len(cdata) - len(cdata) % struct.calcsize("i")
                self.fds.extend(struct.unpack("%di" % (n // 4), cdata[:n]))
        if flags & socket.MSG_CTRUNC:
            raise Malformed("descriptors lost (MSG_CTRUNC)")
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def recv_frame(self):
        """The next frame body and the descriptors that came with it.

        Raises Closed at EOF (its args say whether mid-frame), Malformed for
        a length of 0 or over the cap."""
        while len(self.buf) < 4:
            if not self._fill():
                raise Closed("closed" if not self.buf else "closed mid-frame")
        (n,) = struct.unpack(">I", self.buf[:4])
        if n == 0 or n > FRAME_MAX:
            raise Malformed("frame length %d" % n)
        while len(self.buf) < 4 + n:
            if not self._fill():
                raise Closed("closed mid-frame")
        body = bytes(self.buf[4:4 + n])
        del self.buf[:4 + n]
        fds, self.fds = self.fds, []
        return body, fds

    def recv_exact_frame(self):
        """Reads exactly one frame's bytes off the socket, nothing beyond it
        (a reader that frees exactly one reply's worth of the peer's send
        buffer).  No descriptors."""
        def exact(k):
            out = b""
            while len(out) < k:
                d = self.sock.recv(k - len(out))
                if not d:
                    raise Closed("closed" if not out else "closed mid-frame")
                out += d
            return out
        assert not self.buf
        (n,) = struct.unpack(">I", exact(4))
        if n == 0 or n > FRAME_MAX:
            raise Malformed("frame length %d" % n)
        return exact(n)

    def recv_msg(self):
        """The next message, decoded; its descriptors in .fds (caller owns them)."""
        body, fds = self.recv_frame()
        try:
            m = decode(body)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        m.fds = fds
        return m

    def request(self, body, expect=None):
        """Sends a request and reads its reply.  ERROR raises AgentError;
        with expect (a type), any other reply raises Malformed."""
        self.send(body)
        m = self.recv_msg()
        if m.type != CHANNEL and m.fds:
            for fd in m.fds:
                os.close(fd)
            m.fds = []
            raise Malformed("%s came with a descriptor" % m.name)
        if m.type == ERROR:
            raise AgentError(m.code, m.message)
        if expect is not None and m.type != expect:
            for fd in m.fds:
                os.close(fd)
            raise Malformed("expected %s, got %s" % (TYPE_NAMES[expect], m.name))
        return m

    # -- verbs
    def hello(self, client="p11a_proto.py"):
        return self.request(hello(client), HELLO_REPLY)

    def status(self):
        return self.request(status(), STATUS_REPLY)

    def list(self):
        return self.request(list_(), LIST_REPLY)

    def unlock(self, token_uri, pin):
        return self.request(unlock(token_uri, pin), OK)

    def lock(self, token_uri=""):
        return self.request(lock(token_uri), OK)

    def open_channel(self, key_uri, timeout=None):
        """A signing channel (a Conn) for key_uri."""
        m = self.request(open_channel(key_uri), CHANNEL)
        if len(m.fds) != 1:
            for fd in m.fds:
                os.close(fd)
            raise Malformed("CHANNEL came with %d descriptors" % len(m.fds))
        s = socket.socket(fileno=m.fds[0])
        if s.family != socket.AF_UNIX or s.type != socket.SOCK_STREAM:
            s.close()
            raise Malformed("CHANNEL descriptor is not a Unix stream socket")
        return Conn(s, self.sock.gettimeout() if timeout is None else timeout)

    def sign(self, key_uri, scheme, hash_, data, **kw):
        """SIGN on a channel; the signature bytes."""
        return self.request(sign(key_uri, scheme, hash_, data, **kw), SIGNATURE).signature


def client(path, name="p11a_proto.py", timeout=30.0):
    """A main connection with HELLO done."""
    c = Conn.connect(path, timeout)
    try:
        c.hello(name)
    except BaseException:
        c.close()
        raise
    return c



# ---------------------------------------------------------------- test output

class Cases:
    """Checks as lines for lib.sh's relay_cases: "ok<TAB>desc",
    "not ok<TAB>desc<TAB>why", "figure<TAB>name<TAB>value", "# text",
    "done<TAB>text".  Flushed at once, so a driver that dies half-way has
    reported what it checked."""

    def __init__(self, stream=None):
        import sys
        self.stream = stream or sys.stdout
        self.count = 0

    def _line(self, *fields):
        print("\t".join(str(f).replace("\t", " ").replace("\n", " ") for f in fields),
              file=self.stream, flush=True)

    def out(self, good, desc, why=""):
        self.count += 1
        if good:
            self._line("ok", desc)
        else:
            self._line("not ok", desc, why)

    def case(self, desc, fn):
        """Runs fn() -> (good, why); an exception is a failure."""
        try:
            good, why = fn()
        except Exception as e:  # noqa: BLE001 - any failure is a test failure
            good, why = False, "exception %r" % e
        self.out(good, desc, str(why))

    def figure(self, name, value):
        self._line("figure", name, value)

    def note(self, text):
        print("# " + str(text).replace("\n", " "), file=self.stream, flush=True)

    def done(self, text=None):
        self._line("done", "%d cases" % self.count if text is None else text)
