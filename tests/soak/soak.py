#!/usr/bin/python3
"""soak.py: good clients against hostile ones, with token faults, for a bounded time.

Run by tests/integration/t_soak.sh against an agent with two tokens behind
two instances of the fault module (tests/fault/faultmod.c): --faulty (its
control file --faulty-control takes hang and removal faults) and --steady
(never faulted; locked and unlocked in a loop).  Speaks the protocol through
tests/integration/p11a_proto.py.

Good clients (every answer is checked):
  signers      per token, keep a channel per key and sign with every key and
               scheme (message and digest input), verifying each signature
               with the SubjectPublicKeyInfo from LIST (python3-cryptography);
               now and then they reopen a channel, as a new process would
  one-shot     per token, connect, HELLO, OPEN_CHANNEL, SIGN, close, again
  lister       LIST: no key twice (same token, CKA_ID and label), every key
               there, tokens present unless removed
  locker       LOCK and UNLOCK of the steady token, in a loop
Hostile clients (their own errors are expected and only counted):
  hog          OPEN_CHANNEL on one connection until refused; holds them a few
               seconds, closes them, again (from 60 % of the time on, so that
               what it breaks does not hide the rest)
  pipeliners   SIGN (on channels) and LIST (on main connections) sent until
               the socket is full, never read
  malformed    bad lengths, leftover bytes, runaway strings, unknown types,
               random bytes, on main connections and channels
  half frames  part of a frame, then close; or part, then silence
  storm        connect/close cycles: bare, after HELLO, mid-frame, channels
Fault schedule on the faulty token, in cycles while time remains:
  hang (all)   C_Sign=hang for sign-timeout + 1 s: there TIMEOUT is the right
               answer; the steady token must not notice
  hang (one)   C_Sign=hang once, caught by a channel whose client does not
               read: it is sent exactly as many non-SIGN frames as fill the
               helper's send buffer with their ERROR replies (measured first
               on another channel), then one SIGN, so the watchdog's TIMEOUT
               meets a full socket; the same token's other channels must keep
               signing meanwhile
  removal      removed=1, then reinsertion and UNLOCK: TOKEN_NOT_PRESENT and
               LOCKED are right answers until the UNLOCK succeeds

Each good answer is classified against the windows in which a fault or a
lock was in force (overlapping the request's send..reply interval); anything
else counts against one of the CHECKS below, by kind (what failed where),
with the first sample of each kind.
Afterwards descriptors, threads and RSS of the agent and its helpers must
come back near their values before the soak.

Output, one line each (tab-separated), read by t_soak.sh:
  ok<TAB>DESC | not ok<TAB>DESC | #<TAB>TEXT | figure<TAB>NAME<TAB>VALUE | done
Exit 0 when every check passed, 1 when one failed.
"""
import argparse
import collections
import fcntl
import hashlib
import os
import random
import re
import resource
import socket
import struct
import sys
import termios
import threading
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import p11a_proto as P  # noqa: E402

from cryptography.exceptions import InvalidSignature  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils  # noqa: E402

T0 = time.monotonic()


def now():
    return time.monotonic() - T0


_out_lock = threading.Lock()


def emit(*fields):
    line = "\t".join(str(f).replace("\t", " ").replace("\n", " ") for f in fields)
    with _out_lock:
        print(line, flush=True)


def diag(text):
    emit("#", text)


def figure(name, value):
    emit("figure", name, value)


# ---------------------------------------------------------------- checks and tallies

CHECKS = collections.OrderedDict([
    ("verify", "every signature a good client got verifies with the key's public key from LIST"),
    ("keys", "no AMBIGUOUS or NO_SUCH_KEY for a key URI taken from LIST"),
    ("busy", "good clients never get BUSY, whatever a hostile client holds"),
    ("timeout", "no false TIMEOUT: TIMEOUT only on a token whose C_Sign hangs"),
    ("stall", "every good request answered within sign-timeout outside a hang"),
    ("token", "no TOKEN error or 'no longer on token': a SIGN racing LOCK gets LOCKED"),
    ("lockstate", "LOCKED only while the token is locked, and no signature while it is locked"),
    ("present", "TOKEN_NOT_PRESENT, or a token listed absent, only while it is removed"),
    ("other", "no other failure of a good client (connect, HELPER, channel closed "
              "without a reply, bad reply)"),
    ("listdup", "LIST never shows a key twice (same token, CKA_ID and label)"),
    ("listmiss", "LIST always shows every key of both tokens"),
    ("lockops", "every LOCK and UNLOCK of the steady token succeeds"),
])


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = collections.Counter()         # good outcomes and expected errors
        self.bad = collections.Counter()            # check -> count
        self.kinds = collections.defaultdict(collections.Counter)   # check -> kind -> count
        self.samples = {}                           # (check, kind) -> first sample
        self.hostile = collections.Counter()        # hostile actions and what they met

    def good(self, kind, n=1):
        with self.lock:
            self.counts[kind] += n

    def unexpected(self, check, kind, sample=None):
        """A wrong answer: counted per check and per kind (what went wrong where,
        e.g. "SIGN on TOKEN: TIMEOUT"); the first sample of each kind is kept."""
        assert check in CHECKS, check
        with self.lock:
            self.bad[check] += 1
            self.kinds[check][kind] += 1
            if (check, kind) not in self.samples:
                self.samples[(check, kind)] = "t=%.1fs %s" % (now(), sample or kind)

    def report(self, check, most=8):
        """Lines for a failed check: count, kind and first sample of each kind."""
        out = []
        kinds = self.kinds[check].most_common()
        for kind, n in kinds[:most]:
            out.append("%dx %s; first: %s" % (n, kind, self.samples[(check, kind)]))
        if len(kinds) > most:
            out.append("... and %d more kinds" % (len(kinds) - most))
        return out

    def h(self, kind, n=1):
        with self.lock:
            self.hostile[kind] += n


tally = Tally()


class Windows:
    """Intervals during which a fault or a lock was in force, per token and kind.

    kinds: "hang" (C_Sign hangs for every caller), "locked" (from LOCK sent,
    or removal, to the UNLOCK that succeeded), "removed" (from removal to the
    UNLOCK after reinsertion), "surelocked" (from LOCK answered to UNLOCK
    sent: no signature may come out of that)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.w = collections.defaultdict(list)

    def open(self, token, kind, t=None):
        with self.lock:
            iv = [now() if t is None else t, None]
            self.w[(token, kind)].append(iv)
            return iv

    def close(self, iv, t=None):
        with self.lock:
            iv[1] = now() if t is None else t

    def overlaps(self, token, kind, t0, t1):
        with self.lock:
            for a, b in self.w[(token, kind)]:
                if a <= t1 and (b is None or b >= t0):
                    return True
        return False

    def within(self, token, kind, t0, t1):
        """[t0, t1] lies wholly inside one window."""
        with self.lock:
            for a, b in self.w[(token, kind)]:
                if a <= t0 and (b is None or t1 <= b):
                    return True
        return False


windows = Windows()


# ---------------------------------------------------------------- keys and signatures

HASHES = {P.HASH_SHA256: (hashes.SHA256, hashlib.sha256),
          P.HASH_SHA384: (hashes.SHA384, hashlib.sha384),
          P.HASH_SHA512: (hashes.SHA512, hashlib.sha512)}
SCHEME_NAMES = {P.SCHEME_RSA_PKCS1: "rsa-pkcs1", P.SCHEME_RSA_PSS: "rsa-pss",
                P.SCHEME_ECDSA: "ecdsa", P.SCHEME_EDDSA: "eddsa"}

# (scheme, hash, input) per key type
CASES = {
    P.KEY_RSA: [(P.SCHEME_RSA_PKCS1, P.HASH_SHA256, P.INPUT_MESSAGE),
                (P.SCHEME_RSA_PSS, P.HASH_SHA256, P.INPUT_MESSAGE),
                (P.SCHEME_RSA_PKCS1, P.HASH_SHA384, P.INPUT_DIGEST),
                (P.SCHEME_RSA_PSS, P.HASH_SHA512, P.INPUT_DIGEST)],
    P.KEY_EC: [(P.SCHEME_ECDSA, P.HASH_SHA256, P.INPUT_MESSAGE),
               (P.SCHEME_ECDSA, P.HASH_SHA384, P.INPUT_DIGEST),
               (P.SCHEME_ECDSA, P.HASH_SHA512, P.INPUT_MESSAGE)],
    P.KEY_ED25519: [(P.SCHEME_EDDSA, P.HASH_NONE, P.INPUT_MESSAGE)],
}


class KeyInfo:
    def __init__(self, k, token_label):
        self.uri = k.uri
        self.label = k.label
        self.token = token_label
        self.type = k.type
        self.pub = serialization.load_der_public_key(k.spki)
        self.cases = CASES[k.type]


def case_name(case):
    scheme, h, inp = case
    return "%s/%s%s" % (SCHEME_NAMES[scheme], P.HASH_NAMES[h], "/digest" if inp == P.INPUT_DIGEST else "")


def sign_request(key, case, message):
    """The SIGN body for key and case over message, and a verifier of the answer."""
    scheme, h, inp = case
    kw = {"input_": inp}
    data = message
    if inp == P.INPUT_DIGEST:
        data = HASHES[h][1](message).digest()
    if scheme == P.SCHEME_RSA_PSS:
        kw["salt_len"] = P.PSS_SALT_DIGEST
    body = P.sign(key.uri, scheme, h, data, **kw)

    def verify(sig):
        try:
            if scheme == P.SCHEME_EDDSA:
                key.pub.verify(sig, message)
                return True
            halg = HASHES[h][0]()
            alg = utils.Prehashed(halg) if inp == P.INPUT_DIGEST else halg
            if scheme == P.SCHEME_ECDSA:
                key.pub.verify(sig, data, ec.ECDSA(alg))
            elif scheme == P.SCHEME_RSA_PKCS1:
                key.pub.verify(sig, data, padding.PKCS1v15(), alg)
            else:
                key.pub.verify(sig, data, padding.PSS(mgf=padding.MGF1(halg),
                                                      salt_length=halg.digest_size), alg)
            return True
        except InvalidSignature:
            return False
    return body, verify


# ---------------------------------------------------------------- processes

def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                st = f.read()
        except OSError:
            continue
        if int(st.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(d))
    return sorted(out)


def proc_res(pid):
    """(descriptors, threads, RSS kB) of pid, or None when it is gone."""
    try:
        fds = len(os.listdir("/proc/%d/fd" % pid))
        threads = rss = 0
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("Threads:"):
                    threads = int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
        return fds, threads, rss
    except OSError:
        return None


# ---------------------------------------------------------------- the soak

class Gate:
    """Lets the scheduler stop the faulty token's good signers for a moment:
    close() waits until no request of theirs is in flight."""

    def __init__(self):
        self.cv = threading.Condition()
        self.open_ = True
        self.inflight = 0

    def enter(self, stop):
        with self.cv:
            while not self.open_ and not stop.is_set():
                self.cv.wait(0.5)
            self.inflight += 1

    def leave(self):
        with self.cv:
            self.inflight -= 1
            self.cv.notify_all()

    def close(self, limit):
        end = time.monotonic() + limit
        with self.cv:
            self.open_ = False
            while self.inflight > 0:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self.cv.wait(left)
        return True

    def reopen(self):
        with self.cv:
            self.open_ = True
            self.cv.notify_all()


class Soak:
    def __init__(self, a):
        self.a = a
        self.stop = threading.Event()          # good and hostile clients stop
        self.sched_done = threading.Event()
        self.st = a.sign_timeout
        self.gate = {a.faulty: Gate(), a.steady: Gate()}
        self.threads = []
        self.lat = collections.defaultdict(list)
        self.lat_lock = threading.Lock()
        self.rng = random.Random(a.seed)
        self.faults_done = collections.Counter()

    # ------------------------------------------------------------ helpers
    def connect(self, name, timeout=None):
        return P.client(self.a.socket, "soak " + name, self.st + 12 if timeout is None else timeout)

    def token_uri(self, label):
        return self.tokens[label].uri

    def ctl_write(self, text):
        tmp = self.a.faulty_control + ".new"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.a.faulty_control)

    def ctl_read(self):
        with open(self.a.faulty_control) as f:
            return f.read()

    def spawn(self, name, fn, *args):
        def run():
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - a harness bug must show, not hang the soak
                emit("#", "thread %s died: %s" % (name, traceback.format_exc().replace("\n", " | ")))
                tally.unexpected("other", "harness thread %s died (see above)" % name)
        t = threading.Thread(target=run, name=name, daemon=True)
        t.start()
        self.threads.append(t)
        return t

    # ------------------------------------------------------------ classification
    def classify_error(self, op, token, code, message, t0, t1, what):
        """Counts an ERROR a good client got; returns True when it was a right answer."""
        name = P.error_name(code)
        sample = "%s %s on %s: %s: %s (%.0f ms)" % (op, what, token, name, message[:200], (t1 - t0) * 1000)
        kind = "%s on %s: %s" % (op, token, name)
        if code not in (P.E_TIMEOUT, P.E_LOCKED, P.E_TOKEN_NOT_PRESENT):
            # The message tells the kinds apart (C_SignInit vs 'no longer on token'):
            # without names in quotes and numbers.
            kind += " " + re.sub(r"\d+", "N", re.sub(r"'[^']*'", "'…'", message))[:90]
        if code == P.E_TIMEOUT:
            if windows.overlaps(token, "hang", t0, t1):
                tally.good("expected TIMEOUT (C_Sign hangs)")
                return True
            tally.unexpected("timeout", kind, sample)
        elif code == P.E_LOCKED:
            if windows.overlaps(token, "locked", t0, t1):
                tally.good("expected LOCKED (token locked)")
                return True
            tally.unexpected("lockstate", kind, sample)
        elif code == P.E_TOKEN_NOT_PRESENT:
            if windows.overlaps(token, "removed", t0, t1):
                tally.good("expected TOKEN_NOT_PRESENT (token removed)")
                return True
            tally.unexpected("present", kind, sample)
        elif code == P.E_NO_SUCH_KEY and "no longer on token" in message:
            tally.unexpected("token", kind, sample)     # the helper lost the key: a rescan race
        elif code in (P.E_AMBIGUOUS, P.E_NO_SUCH_KEY):
            tally.unexpected("keys", kind, sample)
        elif code == P.E_BUSY:
            tally.unexpected("busy", kind, sample)
        elif code == P.E_TOKEN:
            if "CKR_DEVICE_ERROR" in message and windows.overlaps(token, "hang", t0, t1):
                # What the fault module's hung C_Sign returns when released.
                tally.good("expected TOKEN CKR_DEVICE_ERROR (hung C_Sign released)")
                return True
            tally.unexpected("token", kind, sample)
        else:
            tally.unexpected("other", kind, sample)
        return False

    def late(self, token, t0, t1):
        """An answer later than sign-timeout (+1 s) outside a hang or removal."""
        return (t1 - t0 > self.st + 1.0 and not windows.overlaps(token, "hang", t0, t1)
                and not windows.overlaps(token, "removed", t0, t1))

    # ------------------------------------------------------------ inventory
    def inventory(self):
        with self.connect("inventory") as c:
            lst = c.list()
        self.tokens = {}
        for t in lst.tokens:
            self.tokens[t.label] = t
        for label in (self.a.faulty, self.a.steady):
            if label not in self.tokens:
                raise SystemExit("token %s not listed" % label)
        by_uri = {t.uri: t.label for t in lst.tokens}
        self.keys = collections.defaultdict(list)
        self.expected = set()
        for k in lst.keys:
            label = by_uri.get(k.token_uri)
            if label is None:
                continue
            self.keys[label].append(KeyInfo(k, label))
            self.expected.add((k.token_uri, k.id, k.label))
        for label in (self.a.faulty, self.a.steady):
            diag("token %s: %d keys (%s)" % (label, len(self.keys[label]),
                                             ", ".join(k.label for k in self.keys[label])))
        self.slow_key = next(k for k in self.keys[self.a.faulty] if k.type == P.KEY_EC)

    def unlock_all(self):
        with self.connect("unlock") as c:
            for label in (self.a.faulty, self.a.steady):
                c.unlock(self.token_uri(label), self.a.pin)

    def sign_once(self, ch, key, case, tag):
        msg = b"soak %s %s %d" % (tag.encode(), key.label.encode(), self.rng.getrandbits(64))
        body, verify = sign_request(key, case, msg)
        m = ch.request(body, P.SIGNATURE)
        return verify(m.signature)

    def warm_up(self):
        """Every key and case once (sessions, key copies), channels closed again."""
        bad = []
        with self.connect("warm-up") as c:
            for label in (self.a.faulty, self.a.steady):
                for key in self.keys[label]:
                    with c.open_channel(key.uri) as ch:
                        for case in key.cases:
                            try:
                                if not self.sign_once(ch, key, case, "warm-up"):
                                    bad.append("%s %s: does not verify" % (key.label, case_name(case)))
                            except (P.AgentError, OSError, P.Malformed) as e:
                                bad.append("%s %s: %s" % (key.label, case_name(case), e))
        return bad

    # ------------------------------------------------------------ resources
    def sample(self):
        agent = proc_res(self.a.agent_pid)
        helpers = {pid: proc_res(pid) for pid in children(self.a.agent_pid)}
        return agent, helpers

    def baseline(self):
        """Resources once the warm-up's channel threads are gone: the helpers'
        thread counts stop falling (sampled every 0.1 s, at most 10 s)."""
        last, same = None, 0
        end = time.monotonic() + 10
        while time.monotonic() < end:
            agent, helpers = self.sample()
            key = (agent[0], tuple(sorted((p, r[0], r[1]) for p, r in helpers.items() if r)))
            same = same + 1 if key == last else 0
            last = key
            if same >= 5:
                break
            time.sleep(0.1)
        return self.sample()

    def sampler(self):
        while not self.stop.is_set():
            agent, helpers = self.sample()
            if agent:
                for i, n in enumerate(("fds", "threads", "rss")):
                    self.peak["agent " + n] = max(self.peak["agent " + n], agent[i])
            for pid, r in helpers.items():
                if r:
                    for i, n in enumerate(("fds", "threads", "rss")):
                        self.peak["helper %d %s" % (pid, n)] = max(self.peak["helper %d %s" % (pid, n)], r[i])
            self.stop.wait(0.25)

    # ------------------------------------------------------------ good clients
    def good_signer(self, name, label, oneshot=False):
        keys = self.keys[label]
        gate = self.gate[label]
        rng = random.Random("%s %d" % (name, self.a.seed))
        conn = None
        chans = {}

        def drop(uri):
            ch = chans.pop(uri, None)
            if ch is not None:
                ch.close()

        while not self.stop.is_set():
            key = rng.choice(keys)
            case = rng.choice(key.cases)
            what = "%s %s" % (key.label, case_name(case))
            gate.enter(self.stop)
            try:
                if self.stop.is_set():
                    break
                if oneshot or rng.random() < 0.05:
                    drop(key.uri)       # a new process: a new channel
                # -- main connection
                if conn is None:
                    t0 = now()
                    try:
                        conn = self.connect(name)
                    except (OSError, P.AgentError, P.Malformed) as e:
                        tally.unexpected("other", "connect/HELLO: %s" % type(e).__name__, "connect/HELLO (%s): %r" % (name, e))
                        conn = None
                        self.stop.wait(0.2)
                        continue
                # -- channel
                ch = chans.get(key.uri)
                if ch is None:
                    t0 = now()
                    try:
                        ch = conn.open_channel(key.uri)
                        tally.good("channels opened")
                        chans[key.uri] = ch
                    except P.AgentError as e:
                        self.classify_error("OPEN_CHANNEL", label, e.code, e.message, t0, now(), key.label)
                        self.stop.wait(0.02)
                        continue
                    except (OSError, P.Malformed) as e:
                        t1 = now()
                        if isinstance(e, socket.timeout):
                            tally.unexpected("stall", "OPEN_CHANNEL on %s: no answer" % label,
                                             "OPEN_CHANNEL %s on %s: no answer in %.0f s" %
                                             (key.label, label, t1 - t0))
                        else:
                            tally.unexpected("other", "OPEN_CHANNEL on %s: %s" % (label, type(e).__name__),
                                             "OPEN_CHANNEL %s on %s: %r" % (key.label, label, e))
                        conn.close()
                        conn = None
                        self.stop.wait(0.02)
                        continue
                    if self.late(label, t0, now()):
                        tally.unexpected("stall", "OPEN_CHANNEL on %s: late answer" % label,
                                         "OPEN_CHANNEL %s on %s answered after %.1f s" %
                                         (key.label, label, now() - t0))
                # -- SIGN
                msg = b"soak %s %d" % (name.encode(), rng.getrandbits(64))
                body, verify = sign_request(key, case, msg)
                t0 = now()
                try:
                    ch.send(body)
                    m = ch.recv_msg()
                    t1 = now()
                except socket.timeout:
                    t1 = now()
                    tally.unexpected("stall", "SIGN on %s: no answer" % label,
                                     "SIGN %s on %s: no answer in %.0f s" % (what, label, t1 - t0))
                    drop(key.uri)
                    self.stop.wait(0.02)
                    continue
                except (OSError, P.Closed) as e:
                    t1 = now()
                    tally.unexpected("other", "SIGN on %s: channel failed without a reply: %s" % (label, type(e).__name__),
                                     "SIGN %s on %s: channel failed without a reply: %r (%.0f ms)" %
                                     (what, label, e, (t1 - t0) * 1000))
                    drop(key.uri)
                    self.stop.wait(0.02)
                    continue
                except P.Malformed as e:
                    tally.unexpected("other", "SIGN on %s: bad reply" % label, "SIGN %s on %s: bad reply: %s" % (what, label, e))
                    drop(key.uri)
                    continue
                with self.lat_lock:
                    self.lat[label].append(t1 - t0)
                if m.type == P.SIGNATURE:
                    if not verify(m.signature):
                        tally.unexpected("verify", "SIGN on %s: bad signature" % label,
                                         "SIGN %s on %s: %d-byte signature does not verify" %
                                         (what, label, len(m.signature)))
                    elif windows.within(label, "surelocked", t0, t1):
                        tally.unexpected("lockstate", "SIGN on %s: signature while locked" % label,
                                         "SIGN %s on %s: signed while the token was locked" %
                                         (what, label))
                    else:
                        tally.good("signatures verified")
                        tally.good("signatures verified on " + label)
                    if self.late(label, t0, t1):
                        tally.unexpected("stall", "SIGN on %s: late signature" % label,
                                         "SIGN %s on %s: signature after %.1f s" % (what, label, t1 - t0))
                elif m.type == P.ERROR:
                    right = self.classify_error("SIGN", label, m.code, m.message, t0, t1, what)
                    if right and self.late(label, t0, t1):
                        tally.unexpected("stall", "SIGN on %s: late %s" % (label, P.error_name(m.code)),
                                         "SIGN %s on %s: %s after %.1f s" %
                                         (what, label, P.error_name(m.code), t1 - t0))
                    if m.code != P.E_LOCKED:
                        drop(key.uri)       # TIMEOUT closes it; others: start afresh
                    self.stop.wait(0.02)    # errors come fast: count cases, not spins
                else:
                    tally.unexpected("other", "SIGN on %s: reply %s" % (label, m.name))
                    drop(key.uri)
            finally:
                gate.leave()
            if oneshot:
                drop(key.uri)
                if conn is not None:
                    conn.close()
                    conn = None
        for uri in list(chans):
            drop(uri)
        if conn is not None:
            conn.close()

    def lister(self):
        conn = None
        while not self.stop.is_set():
            t0 = now()
            try:
                if conn is None:
                    conn = self.connect("lister")
                lst = conn.list()
            except P.AgentError as e:
                self.classify_error("LIST", "-", e.code, e.message, t0, now(), "")
                self.stop.wait(0.1)
                continue
            except (OSError, P.Malformed) as e:
                tally.unexpected("other", "LIST: %s" % type(e).__name__, "LIST: %r" % e)
                if conn is not None:
                    conn.close()
                conn = None
                self.stop.wait(0.1)
                continue
            t1 = now()
            tally.good("lists")
            seen = collections.Counter((k.token_uri, k.id, k.label) for k in lst.keys)
            for ident, n in seen.items():
                if n > 1:
                    tally.unexpected("listdup", "LIST shows a key twice", "LIST shows key '%s' (id %s) %d times" %
                                     (ident[2], ident[1].hex(), n))
            for ident in self.expected - set(seen):
                tally.unexpected("listmiss", "LIST lacks a key", "LIST lacks key '%s' (id %s)" % (ident[2], ident[1].hex()))
            present = {t.label: t.present for t in lst.tokens}
            for label in (self.a.faulty, self.a.steady):
                if label not in present:
                    tally.unexpected("listmiss", "LIST lacks token %s" % label)
                elif not present[label] and not windows.overlaps(label, "removed", t0, t1):
                    tally.unexpected("present", "LIST shows %s not present" % label)
            if self.late("-", t0, t1):
                tally.unexpected("stall", "LIST: late answer", "LIST answered after %.1f s" % (t1 - t0))
            self.stop.wait(0.05)
        if conn is not None:
            conn.close()

    def locker(self, label):
        """LOCK and UNLOCK of one token in a loop; the windows say when LOCKED is right."""
        uri = self.token_uri(label)
        rng = random.Random("locker %d" % self.a.seed)
        conn = [None]

        def call(what, fn):
            try:
                if conn[0] is None:
                    conn[0] = self.connect("locker")
                fn(conn[0])
                return True
            except P.AgentError as e:
                tally.unexpected("lockops", "%s %s: %s" % (what, label, e.name), "%s %s: %s" % (what, label, e))
            except (OSError, P.Malformed) as e:
                tally.unexpected("other", "%s %s: %s" % (what, label, type(e).__name__), "%s %s: %r" % (what, label, e))
                if conn[0] is not None:
                    conn[0].close()
                conn[0] = None
            self.stop.wait(0.2)
            return False

        while not self.stop.is_set():
            locked = windows.open(label, "locked")
            if call("LOCK", lambda c: c.lock(uri)):
                tally.good("locks")
                sure = windows.open(label, "surelocked")
                self.stop.wait(rng.uniform(0.05, 0.4))
                windows.close(sure)
            # Until an UNLOCK works the token may be locked: LOCKED stays a right answer.
            while not call("UNLOCK", lambda c: c.unlock(uri, self.a.pin)):
                if self.stop.is_set():
                    break
            else:
                tally.good("unlocks")
            windows.close(locked)
            self.stop.wait(rng.uniform(0.1, 0.6))
        if conn[0] is not None:
            conn[0].close()

    # ------------------------------------------------------------ hostile clients
    def hog(self):
        """Takes signing channels on one connection until refused; holds them.
        From 60 % of the time on: what it may break should not hide the rest."""
        keys = self.keys[self.a.steady]
        self.stop.wait(self.a.seconds * 0.6)
        while not self.stop.is_set():
            held = []
            conn = None
            why = "its own limit, 4096"
            try:
                conn = self.connect("hog")
                while len(held) < 4096:
                    if self.stop.is_set():
                        why = "the end of the soak"
                        break
                    held.append(conn.open_channel(keys[len(held) % len(keys)].uri))
            except P.AgentError as e:
                why = "%s: %s" % (e.name, e.message[:120])
            except OSError as e:
                why = "local: %r" % e
            tally.h("hog channels", len(held))
            self.hog_runs.append((round(now(), 1), len(held), why))
            self.stop.wait(min(4.0, max(2.0, self.a.seconds * 0.05)))
            for ch in held:
                ch.close()
            if conn is not None:
                conn.close()
            self.stop.wait(min(8.0, max(3.0, self.a.seconds * 0.1)))

    def pipeliner(self):
        """SIGNs (on a steady channel) or LISTs (on a main connection) until the
        socket is full, never read; held for a moment, then closed."""
        keys = self.keys[self.a.steady]
        rng = random.Random("pipeliner %d" % self.a.seed)
        while not self.stop.is_set():
            conn = ch = None
            try:
                conn = self.connect("pipeliner")
                if rng.random() < 0.7:
                    key = rng.choice(keys)
                    ch = conn.open_channel(key.uri)
                    body, _ = sign_request(key, key.cases[0], b"never read")
                    target, what = ch, "SIGN"
                else:
                    body, target, what = P.list_(), conn, "LIST"
                target.sock.setblocking(False)
                data = P.frame(body) * 64
                sent = 0
                try:
                    while sent < 8 << 20:
                        sent += target.sock.send(data)
                except BlockingIOError:
                    pass
                tally.h("pipelined %s frames" % what, sent // len(P.frame(body)))
            except (OSError, P.AgentError, P.Malformed) as e:
                tally.h("pipeliner refused: %s" % type(e).__name__)
            self.stop.wait(rng.uniform(1.0, 3.0))
            for c in (ch, conn):
                if c is not None:
                    c.close()

    def malformed(self):
        keys = self.keys[self.a.steady]
        rng = random.Random("malformed %d" % self.a.seed)
        key = keys[0]
        good_sign = sign_request(key, key.cases[0], b"x")[0]
        main_cases = [
            b"\0\0\0\0",
            P.u32(P.FRAME_MAX + 1),
            b"\xff\xff\xff\xff" + b"A" * 64,
            P.frame(P.list_() + b"leftover"),
            P.frame(P.u8(P.UNLOCK) + P.u32(1000) + b"pkcs11:"),
            P.frame(P.u8(P.OPEN_CHANNEL) + b"\xff\xff\xff\xff"),
            P.frame(P.u8(0x3f) + b"unknown"),
            P.frame(P.u8(P.H_ADOPT)),
            P.frame(P.u8(P.H_INVENTORY) + P.u32(1) + P.u32(0)),
            P.frame(P.u8(P.LOCK) + P.text(b"pkcs11:token=\0nul")),
            P.frame(good_sign),
        ]
        chan_cases = [
            b"\0\0\0\0",
            P.u32(P.FRAME_MAX + 1),
            P.frame(good_sign[:-2]),
            P.frame(good_sign + b"x"),
            P.frame(P.u8(0x3f)),
            P.frame(P.list_()),
            P.frame(P.u8(P.SIGN) + P.text(key.uri) + b"\1\3"),
        ]
        while not self.stop.is_set():
            on_chan = rng.random() < 0.4
            conn = ch = None
            try:
                if on_chan:
                    conn = self.connect("malformed")
                    ch = conn.open_channel(rng.choice(keys).uri)
                    target, payload = ch, rng.choice(chan_cases)
                else:
                    conn = P.Conn.connect(self.a.socket, 5)
                    if rng.random() < 0.8:
                        conn.hello("soak malformed")
                    target = conn
                    payload = rng.choice(main_cases + [bytes([rng.randrange(256) for _ in range(64)])])
                target.send_raw(payload)
                target.settimeout(2)
                try:
                    while True:
                        target.recv_frame()
                except (OSError, P.Closed, P.Malformed):
                    pass
                tally.h("malformed frames sent")
            except (OSError, P.AgentError, P.Malformed) as e:
                tally.h("malformed refused: %s" % type(e).__name__)
            for c in (ch, conn):
                if c is not None:
                    c.close()
            self.stop.wait(0.02)

    def half_frames(self):
        keys = self.keys[self.a.steady]
        rng = random.Random("half %d" % self.a.seed)
        held = collections.deque()
        while not self.stop.is_set():
            conn = ch = None
            try:
                conn = P.Conn.connect(self.a.socket, 5)
                body = P.frame(P.hello("soak half frame"))
                if rng.random() < 0.5:
                    conn.hello("soak half frame")
                    if rng.random() < 0.5:
                        ch = conn.open_channel(rng.choice(keys).uri)
                        body = P.frame(sign_request(keys[0], keys[0].cases[0], b"half")[0])
                    else:
                        body = P.frame(P.list_() + b"\0" * 100)
                (ch or conn).send_raw(body[:rng.randrange(1, len(body))])
                tally.h("half frames sent")
                if len(held) < 20 and rng.random() < 0.1:
                    held.append((time.monotonic(), conn, ch))   # silence until the agent drops it
                    conn = ch = None
            except (OSError, P.AgentError, P.Malformed) as e:
                tally.h("half frame refused: %s" % type(e).__name__)
            for c in (ch, conn):
                if c is not None:
                    c.close()
            while held and time.monotonic() - held[0][0] > 12:
                _, c1, c2 = held.popleft()
                for c in (c2, c1):
                    if c is not None:
                        c.close()
            self.stop.wait(0.03)
        for _, c1, c2 in held:
            for c in (c2, c1):
                if c is not None:
                    c.close()

    def storm(self):
        keys = self.keys[self.a.steady]
        i = 0
        while not self.stop.is_set():
            for _ in range(50):
                i += 1
                try:
                    c = P.Conn.connect(self.a.socket, 5)
                    try:
                        if i % 4 == 1:
                            c.hello("soak storm")
                        elif i % 4 == 2:
                            c.send_raw(P.u32(100) + b"\x03")
                        elif i % 4 == 3:
                            c.hello("soak storm")
                            c.open_channel(keys[i % len(keys)].uri).close()
                    finally:
                        c.close()
                    tally.h("storm connections")
                except (OSError, P.AgentError, P.Malformed) as e:
                    tally.h("storm refused: %s" % type(e).__name__)
            self.stop.wait(0.05)

    # ------------------------------------------------------------ fault schedule
    def wait_listed(self, label, present, limit):
        end = time.monotonic() + limit
        while time.monotonic() < end:
            try:
                with self.connect("scheduler") as c:
                    for t in c.list().tokens:
                        if t.label == label and t.present == present:
                            return True
            except (OSError, P.AgentError, P.Malformed):
                pass
            time.sleep(0.2)
        return False

    def calibrate_full(self):
        """How many channel replies fill a helper's send buffer: a channel is
        sent LIST frames (each answered at once with ERROR PROTOCOL, no token
        call) and never read; the replies that got through stop growing when
        the helper's channel thread blocks in its write."""
        key = self.slow_key
        with self.connect("calibrate") as c, c.open_channel(key.uri) as ch:
            ch.sock.sendall(P.frame(P.list_()) * 4000)
            last, same = -1, 0
            end = time.monotonic() + 10
            while time.monotonic() < end and same < 5:
                time.sleep(0.05)
                n = struct.unpack("i", fcntl.ioctl(ch.sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]
                same = same + 1 if n == last else 0
                last = n
            head = ch.sock.recv(4, socket.MSG_PEEK)
            size = P.frame_size(head)
            return last // size, last % size

    def hang_one(self):
        """C_Sign hangs in one channel whose client reads nothing: the
        watchdog's TIMEOUT for it meets a full socket.  The other channels of
        the same token must keep signing."""
        label = self.a.faulty
        if self.full_replies is None:
            self.full_replies, rest = self.calibrate_full()
            diag("a channel's send buffer in the helper holds %d replies (%d bytes left over)" %
                 (self.full_replies, rest))
        n = self.full_replies
        gate = self.gate[label]
        if not gate.close(self.st + 15):
            diag("hang (one channel): the faulty token's signers did not pause; skipped")
            gate.reopen()
            return
        slow = None
        caught = False
        try:
            self.ctl_write("C_Sign=hang once\n")
            conn = self.connect("slow reader")
            ch = conn.open_channel(self.slow_key.uri)
            slow = (conn, ch)
            body, _ = sign_request(self.slow_key, self.slow_key.cases[0], b"slow reader")
            # n replies fill the buffer, then the SIGN hangs: nothing is ever read.
            ch.sock.sendall(P.frame(P.list_()) * n + P.frame(body))
            end = time.monotonic() + 10
            while time.monotonic() < end:
                if "C_Sign=hang" not in self.ctl_read():
                    caught = True
                    break
                time.sleep(0.02)
        finally:
            gate.reopen()
        t_hang = now()
        if caught:
            self.faults_done["hang (one channel)"] += 1
            self.hang_one_caught += 1
        else:
            diag("hang (one channel): no C_Sign reached the fault module in 10 s")
        self.stop.wait(self.st + 4)
        self.ctl_write("unhang\n")
        diag("fault: one C_Sign on %s hangs (the slow reader's) from t=%.1fs to t=%.1fs" % (label, t_hang, now()))
        if slow:
            slow[1].close()
            slow[0].close()

    def hang_all(self):
        label = self.a.faulty
        w = windows.open(label, "hang")
        self.ctl_write("C_Sign=hang\n")
        self.stop.wait(self.st + 1)
        self.ctl_write("unhang\n")
        windows.close(w)
        diag("fault: every C_Sign on %s hangs from t=%.1fs to t=%.1fs" % (label, w[0], w[1]))
        self.faults_done["hang (every C_Sign)"] += 1

    def removal(self):
        label = self.a.faulty
        removed = windows.open(label, "removed")
        locked = windows.open(label, "locked")
        self.ctl_write("unhang\nremoved=1\n")
        if not self.wait_listed(label, False, 15):
            diag("removal: token %s not listed as absent within 15 s" % label)
        self.stop.wait(1.0)
        self.ctl_write("unhang\n")
        t_back = now()
        back = self.wait_listed(label, True, 15)
        if not back:
            tally.unexpected("present", "token %s not listed as present within 15 s of reinsertion" % label)
        end = time.monotonic() + 15
        while True:
            t0 = now()
            try:
                with self.connect("scheduler") as c:
                    c.unlock(self.token_uri(label), self.a.pin)
                break
            except P.AgentError as e:
                if time.monotonic() > end:
                    tally.unexpected("present", "UNLOCK %s after reinsertion: %s" % (label, e.name),
                                     "UNLOCK %s after reinsertion: %s" % (label, e))
                    break
                if e.code not in (P.E_TOKEN_NOT_PRESENT, P.E_LOCKED):
                    self.classify_error("UNLOCK", label, e.code, e.message, t0, now(), "after reinsertion")
            except (OSError, P.Malformed) as e:
                tally.unexpected("other", "UNLOCK %s after reinsertion: %s" % (label, type(e).__name__),
                                 "UNLOCK %s after reinsertion: %r" % (label, e))
                break
            time.sleep(0.2)
        windows.close(removed)
        windows.close(locked)
        diag("fault: %s removed at t=%.1fs, reinserted at t=%.1fs, listed again: %s, unlocked at t=%.1fs" %
             (label, removed[0], t_back, "yes" if back else "no", removed[1]))
        self.faults_done["removal and reinsertion"] += 1

    def scheduler(self):
        """Fault cycles on the faulty token while time remains (one at least)."""
        quiet = max(1.0, min(5.0, self.a.seconds * 0.03))
        cycle = 0
        try:
            while True:
                cycle += 1
                t_cycle = now()
                self.stop.wait(quiet)
                self.hang_all()
                self.stop.wait(quiet)
                self.hang_one()
                self.stop.wait(quiet)
                self.removal()
                took = now() - t_cycle
                if now() + took + quiet > self.a.seconds:
                    break
        finally:
            self.ctl_write("unhang\n")
            self.sched_done.set()

    # ------------------------------------------------------------ run
    def run(self):
        a = self.a
        self.full_replies = None
        self.hang_one_caught = 0
        self.hog_runs = []
        self.peak = collections.Counter()

        self.inventory()
        self.unlock_all()
        bad = self.warm_up()
        emit("not ok" if bad else "ok", "warm-up: every key signs with every scheme, and verifies")
        for b in bad[:5]:
            diag(b)
        base_agent, base_helpers = self.baseline()
        diag("baseline: agent %d fds, %d threads, %d kB; helpers %s" % (base_agent + (
            ", ".join("%d: %d fds, %d threads, %d kB" % ((p,) + r) for p, r in base_helpers.items() if r),)))

        self.spawn("sampler", self.sampler)
        for label in (a.faulty, a.steady):
            for i in range(a.signers):
                self.spawn("signer %s %d" % (label, i), self.good_signer, "signer-%s-%d" % (label, i), label)
            self.spawn("oneshot %s" % label, self.good_signer, "oneshot-%s" % label, label, True)
        self.spawn("lister", self.lister)
        self.spawn("locker", self.locker, a.steady)
        if not a.no_hostile:
            self.spawn("hog", self.hog)
            self.spawn("pipeliner", self.pipeliner)
            self.spawn("malformed", self.malformed)
            self.spawn("half frames", self.half_frames)
            self.spawn("storm", self.storm)
        sched = self.spawn("scheduler", self.scheduler)

        # Each fault phase is bounded: the scheduler ends on its own.
        sched.join(a.seconds * 3 + 180)
        if sched.is_alive():
            tally.unexpected("stall", "the fault schedule did not end")
        self.stop.wait(max(0.0, T0 + a.seconds - time.monotonic()))
        t_stop = now()
        self.stop.set()
        for t in self.threads:
            t.join(a.sign_timeout + 20)
            if t.is_alive():
                tally.unexpected("stall", "client thread still running after the end",
                                 "client thread %s still running %d s after the end" %
                                 (t.name, a.sign_timeout + 20))
        diag("soak ran %.1f s; clients stopped at t=%.1fs" % (now(), t_stop))
        return self.report(base_agent, base_helpers)

    def report(self, base_agent, base_helpers):
        a = self.a
        failed = 0

        def check(good, desc, lines=()):
            nonlocal failed
            emit("ok" if good else "not ok", desc)
            if not good:
                failed += 1
                for line in lines:
                    diag(line)

        def rss_check(good, desc, lines=()):
            # ASan keeps freed blocks in quarantine: RSS says nothing there.
            if a.no_rss:
                emit("ok", desc + " # SKIP sanitizer build (freed memory is quarantined)")
            else:
                check(good, desc, lines)

        # -- did the soak do what it claims?
        c = tally.counts
        check(c["signatures verified on " + a.faulty] > 0 and c["signatures verified on " + a.steady] > 0,
              "good clients got verified signatures on both tokens",
              ["%s: %d, %s: %d" % (a.faulty, c["signatures verified on " + a.faulty],
                                   a.steady, c["signatures verified on " + a.steady])])
        check(c["locks"] > 0 and c["unlocks"] > 0 and c["lists"] > 0,
              "good clients listed, locked and unlocked",
              ["lists %d, locks %d, unlocks %d" % (c["lists"], c["locks"], c["unlocks"])])
        check(self.faults_done["hang (every C_Sign)"] > 0 and self.faults_done["removal and reinsertion"] > 0,
              "fault schedule ran: C_Sign hang and token removal on %s" % a.faulty,
              ["%r" % dict(self.faults_done)])
        check(self.hang_one_caught > 0,
              "the one-channel hang caught the channel whose client does not read",
              ["the 'C_Sign=hang once' rule was never consumed by the slow reader's SIGN"])
        if not a.no_hostile:
            check(len(self.hog_runs) > 0 and tally.hostile["malformed frames sent"] > 0 and
                  tally.hostile["half frames sent"] > 0 and tally.hostile["storm connections"] > 0,
                  "hostile clients ran (hog, pipeliners, malformed and half frames, storm)",
                  ["%r" % dict(tally.hostile)])

        # -- every good answer right
        for key, desc in CHECKS.items():
            n = tally.bad[key]
            check(n == 0, "%s%s" % (desc, "" if n == 0 else " (%d failures)" % n),
                  tally.report(key))

        # -- resources back
        agent_now = helpers_now = None
        end = time.monotonic() + 30
        ok_back = False
        same_helpers = sorted(base_helpers) == children(a.agent_pid)
        while time.monotonic() < end:
            agent_now, helpers_now = self.sample()
            if agent_now is None:
                break
            ok_back = (agent_now[0] <= base_agent[0] + 2 and same_helpers and
                       all(helpers_now.get(p) and helpers_now[p][0] <= r[0] + 8 and
                           helpers_now[p][1] <= r[1] + 4 for p, r in base_helpers.items() if r))
            if ok_back:
                break
            time.sleep(0.2)
        if agent_now is None:
            diag("the agent is gone")
            helpers_now = {}
        check(same_helpers, "no token helper was restarted during the soak",
              ["helpers before %s, after %s" % (sorted(base_helpers), children(a.agent_pid))])

        def res(r):
            return "%d fds, %d threads, %d kB" % r if r else "gone"
        lines = ["agent: before %s, after %s" % (res(base_agent), res(agent_now))]
        lines += ["helper %d: before %s, after %s" % (p, res(r), res(helpers_now.get(p)))
                  for p, r in base_helpers.items()]
        if agent_now:
            check(agent_now[0] <= base_agent[0] + 2,
                  "agent descriptors back within 2 of the baseline after the clients closed (30 s)", lines)
            rss_check(agent_now[2] <= base_agent[2] + 16384,
                      "agent RSS back within 16 MiB of the baseline", lines)
        hp_fds = all(helpers_now.get(p) and helpers_now[p][0] <= r[0] + 8 for p, r in base_helpers.items() if r)
        hp_thr = all(helpers_now.get(p) and helpers_now[p][1] <= r[1] + 4 for p, r in base_helpers.items() if r)
        hp_rss = all(helpers_now.get(p) and helpers_now[p][2] <= r[2] + 65536 for p, r in base_helpers.items() if r)
        check(hp_fds, "helper descriptors back within 8 of the baseline (30 s)", lines)
        check(hp_thr, "helper threads back within 4 of the baseline (30 s)", lines)
        rss_check(hp_rss, "helper RSS back within 64 MiB of the baseline", lines)
        for line in lines:
            diag(line)

        # -- both tokens usable afterwards
        ok_after, last = False, ""
        end = time.monotonic() + 15
        while time.monotonic() < end and not ok_after:
            try:
                self.unlock_all()
                ok_after = all(self.sign_once_fresh(k) for label in (a.faulty, a.steady)
                               for k in self.keys[label])
                last = "a signature did not verify"
            except (OSError, P.AgentError, P.Malformed) as e:
                last = "%r" % e
            if not ok_after:
                time.sleep(0.5)
        check(ok_after, "after the soak every key of both tokens signs again (within 15 s)", ["last: " + last])

        # -- figures and summary
        for label in (a.faulty, a.steady):
            lat = sorted(self.lat[label])
            if lat:
                figure("sign latency %s p50/p99/max ms" % label, "%.1f / %.1f / %.1f" % (
                    lat[len(lat) // 2] * 1000, lat[int(len(lat) * 0.99)] * 1000, lat[-1] * 1000))
        for run in self.hog_runs:
            figure("hog at t=%.1fs held channels" % run[0], "%d, stopped by %s" % (run[1], run[2]))
        for k in sorted(self.peak):
            figure("peak " + k, self.peak[k])
        for k in sorted(tally.counts):
            if not k.startswith("signatures verified on"):
                figure(k, tally.counts[k])
        for k in sorted(tally.hostile):
            figure("hostile: " + k, tally.hostile[k])
        expected = {k[len("expected "):]: v for k, v in tally.counts.items() if k.startswith("expected ")}
        unexpected = sum(tally.bad.values())
        diag("summary: %ds, signatures verified %d, lists %d, locks %d, unlocks %d, channels opened %d, "
             "expected errors %s, unexpected %d%s" % (
                 a.seconds, c["signatures verified"], c["lists"], c["locks"], c["unlocks"],
                 c["channels opened"],
                 ", ".join("%s %d" % kv for kv in sorted(expected.items())) or "none", unexpected,
                 (" (" + ", ".join("%s %d" % (k, tally.bad[k]) for k in CHECKS if tally.bad[k]) + ")")
                 if unexpected else ""))
        emit("done")
        return failed

    def sign_once_fresh(self, key):
        with self.connect("after") as c, c.open_channel(key.uri) as ch:
            return all(self.sign_once(ch, key, case, "after") for case in key.cases)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--socket", required=True)
    ap.add_argument("--agent-pid", type=int, required=True)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--no-rss", action="store_true",
                    help="skip the RSS checks (sanitizer builds quarantine freed memory)")
    ap.add_argument("--sign-timeout", type=int, default=3, help="the agent's sign-timeout")
    ap.add_argument("--pin", required=True)
    ap.add_argument("--faulty", required=True, help="label of the token that takes the faults")
    ap.add_argument("--faulty-control", required=True, help="its fault module control file")
    ap.add_argument("--steady", required=True, help="label of the token that is locked and unlocked")
    ap.add_argument("--signers", type=int, default=3, help="long-lived signers per token")
    ap.add_argument("--seed", type=int, default=int(os.environ.get("SOAK_SEED", "0")) or os.getpid())
    ap.add_argument("--no-hostile", action="store_true", help="good clients and faults only")
    a = ap.parse_args()
    # The hog holds thousands of channels.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    diag("seed %d (SOAK_SEED=%d repeats the clients' choices)" % (a.seed, a.seed))
    return 1 if Soak(a).run() else 0


if __name__ == "__main__":
    sys.exit(main())
