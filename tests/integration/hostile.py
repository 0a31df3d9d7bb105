#!/usr/bin/env python3
"""hostile.py: hostile clients against a running agent, for t_hostile.sh
and t_faults.sh.  Each check prints "ok<TAB>desc" or
"not ok<TAB>desc<TAB>why" (the shell turns them into TAP), and "#<TAB>text"
for diagnostics.

  hostile.py caps SOCK KEY P11AGENT
      One process takes signing channels until it is refused: per
      connection, then per process.  Another process still signs meanwhile.
  hostile.py fdcap SOCK KEY P11AGENT HELPER_PID
      (agent under a low RLIMIT_NOFILE, per-process cap raised) Channels
      from many connections until the helper refuses them: BUSY, never
      PROTOCOL; the token stays present while they are held; after they
      are released it signs again.
  hostile.py bufmem SOCK KEY HELPER_PID
      200 channels each send one large SIGN and stay open: the helper's
      memory must not keep a large buffer per idle channel.
  hostile.py stall SOCK KEY CTL
      (fault module, sign-timeout 3) A channel that pipelines SIGNs and
      never reads, then one C_Sign that hangs: the watchdog answers it
      while a healthy channel of the same helper keeps signing without a
      single error.
  hostile.py unlocks SOCK TOKEN_URI N
      N UNLOCKs sent on the wire for a token that is logged in.
  hostile.py badtext SOCK KEY
      URIs that are not UTF-8 in OPEN_CHANNEL, LOCK, UNLOCK and SIGN: a
      BAD_REQUEST that does not echo them, the connection kept.
  hostile.py race|race-unlock SOCK TOKEN_URI KEY... SECONDS
      Signers on several keys, LIST, back-to-back UNLOCKs and (race)
      LOCK/UNLOCK loops at once: LIST
      never shows a key twice, a correct URI never gets AMBIGUOUS, and a
      SIGN that meets a LOCK hears LOCKED, nothing else.
"""
import fcntl
import os
import socket
import struct
import subprocess
import sys
import termios
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import p11a_proto as P  # noqa: E402

PIN = "1234"
failed = 0


def out(good, desc, why=""):
    global failed
    if good:
        print("ok\t%s" % desc, flush=True)
    else:
        failed += 1
        print("not ok\t%s\t%s" % (desc, str(why).replace("\t", " ").replace("\n", " ")), flush=True)


def diag(text):
    print("#\t%s" % text, flush=True)


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def sign_once(sock, key, data=b"hostile.py"):
    """A fresh connection and channel, one ECDSA signature."""
    with P.client(sock, "hostile.py good") as c:
        ch = c.open_channel(key)
        try:
            return ch.sign(key, P.SCHEME_ECDSA, P.HASH_SHA256, data)
        finally:
            ch.close()


def cli_sign(p11agent, sock, key):
    r = subprocess.run([p11agent, "--socket", sock, "sign", "--key", key, "--scheme", "ecdsa",
                        "--in", "/proc/self/cmdline", "--out", "/dev/null"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    return r.returncode, r.stdout.decode(errors="replace").strip()


def take_channels(conn, key, limit):
    """Channels on conn until refused or limit; (channels, AgentError or None)."""
    chans = []
    while len(chans) < limit:
        try:
            chans.append(conn.open_channel(key))
        except P.AgentError as e:
            return chans, e
    return chans, None


# ------------------------------------------------------------------ caps
def cmd_caps(sock, key, p11agent):
    main = P.client(sock, "hostile.py hog")
    held, conns = [], [main]
    chans, err = take_channels(main, key, 1000)
    held += chans
    out(err is not None and err.code == P.E_BUSY and "max-channels-per-connection" in err.message,
        "one connection is refused a channel with BUSY past max-channels-per-connection",
        err)
    diag("one connection got %d channels: %s" % (len(chans), err))
    out(len(chans) == 64, "one connection holds exactly 64 channels (the default)", len(chans))
    out(main.status().pid > 0, "the refused connection still answers STATUS")
    perr = None
    for _ in range(16):
        c = P.client(sock, "hostile.py hog")
        conns.append(c)
        chans, perr = take_channels(c, key, 1000)
        held += chans
        if perr is not None and "max-channels-per-connection" not in perr.message:
            break
    out(perr is not None and perr.code == P.E_BUSY and "max-channels-per-process" in perr.message,
        "one process is refused a channel with BUSY past max-channels-per-process", perr)
    out(len(held) == 256, "one process holds exactly 256 channels (the default)", len(held))
    rc, text = cli_sign(p11agent, sock, key)
    out(rc == 0, "another process signs while the hog holds its channels", text)
    for ch in held:
        ch.close()
    held = []
    # The helper sees the closes asynchronously: a new channel is the event to wait for.
    deadline = time.time() + 10
    while True:
        try:
            held.append(main.open_channel(key))
            break
        except P.AgentError as e:
            if e.code != P.E_BUSY or time.time() > deadline:
                break
            time.sleep(0.05)
    out(len(held) == 1, "after closing its channels the hog may open one again")
    for x in held + conns:
        x.close()


# ------------------------------------------------------------------ fdcap
def cmd_fdcap(sock, key, p11agent, helper_pid):
    main = P.client(sock, "hostile.py fd")
    conns, held, last = [main], [], None
    while True:
        c = P.client(sock, "hostile.py fd")
        conns.append(c)
        chans, last = take_channels(c, key, 64)
        held += chans
        if last is not None and "max-channels-per-connection" not in last.message:
            break
        if len(held) > 8192:
            break
    diag("%d channels, then: %s" % (len(held), last))
    out(last is not None and last.code == P.E_BUSY and "descriptor limit" in last.message,
        "channels past the helper's descriptor budget are refused with BUSY naming the limit",
        last)
    out(last is None or last.code != P.E_PROTOCOL,
        "never PROTOCOL 'H_ADOPT without a descriptor'", last)
    nfd = len(os.listdir("/proc/%d/fd" % helper_pid))
    with open("/proc/%d/limits" % helper_pid) as f:
        lim = [ln for ln in f if ln.startswith("Max open files")][0].split()[3]
    diag("helper: %d descriptors open, soft limit %s" % (nfd, lim))
    out(nfd <= int(lim) - 128, "the helper keeps at least 128 descriptors free", "%d of %s" % (nfd, lim))
    # Requests that make the helper read the token, while the channels are held.
    try:
        main.lock("")
        main.unlock("", PIN)
        lk = None
    except P.AgentError as e:
        lk = e
    out(lk is None, "LOCK and UNLOCK work while the channels are held", lk)
    toks = main.list().tokens
    out(all(t.present for t in toks), "the token is listed as present while they are held",
        [(t.label, t.flags) for t in toks])
    for ch in held:
        ch.close()
    for c in conns[1:]:
        c.close()
    deadline = time.time() + 15
    while True:
        rc, text = cli_sign(p11agent, sock, key)
        if rc == 0 or time.time() > deadline:
            break
        time.sleep(0.2)
    out(rc == 0, "after the channels are closed the token signs, no restart", text)
    main.close()


# ------------------------------------------------------------------ bufmem
def cmd_bufmem(sock, key, helper_pid):
    big = os.urandom(200 * 1024)
    conns, chans = [], []
    for _ in range(4):
        c = P.client(sock, "hostile.py mem")
        conns.append(c)
        chans += take_channels(c, key, 50)[0]
    out(len(chans) == 200, "200 channels opened", len(chans))
    before = rss_kib(helper_pid)
    bad = 0
    for ch in chans:
        try:
            ch.sign(key, P.SCHEME_ECDSA, P.HASH_SHA256, big)
        except Exception as e:  # noqa: BLE001 - counted and reported
            bad += 1
            last = e
    out(bad == 0, "200 signatures over 200 KiB messages", bad and last)
    after = rss_kib(helper_pid)
    grew = (after - before) // 1024
    diag("helper RSS %d KiB -> %d KiB with 200 idle channels (+%d MiB)" % (before, after, grew))
    # Kept buffers would be 200 x 200 KiB = 39 MiB.
    out(grew < 16, "200 idle channels that each sent 200 KiB hold less than 16 MiB", "%d MiB" % grew)
    for x in chans + conns:
        x.close()


# ------------------------------------------------------------------ stall
def queued(conn):
    """Bytes waiting to be read on conn (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(conn.sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def wait_queued(conn, want, timeout):
    """Until FIONREAD reaches want; the last value seen."""
    end = time.time() + timeout
    while True:
        n = queued(conn)
        if n >= want or time.time() > end:
            return n
        time.sleep(0.005)


def fill_replies(conn, req, limit):
    """Sends req one at a time without reading; each reply must queue up.
    The number of replies queued before one did not arrive (the helper's
    write to us blocked), and the size of one reply."""
    per, n = 0, 0
    while n < limit:
        before = queued(conn)
        conn.sock.sendall(req)
        got = wait_queued(conn, before + 1, 0.5)
        if got <= before:
            return n, per
        got = wait_queued(conn, before + (per or 1), 0.5) if per else got
        per = per or got - before
        n += 1
    return n, per


def ctl_write(ctl, text):
    with open(ctl + ".new", "w") as f:
        f.write(text)
    os.rename(ctl + ".new", ctl)


def cmd_stall(sock, key, ctl):
    # A SIGN for a key that does not exist: the helper answers it (an
    # error) without calling the module.
    miss = key.replace("type=private", "object=no-such-key-" + "x" * 200 + ";type=private")
    bad = P.frame(P.sign(miss, P.SCHEME_ECDSA, P.HASH_SHA256, b"x"))
    hog_main = P.client(sock, "hostile.py stall")
    # Pass 1: how many of those replies fit before the helper's write blocks.
    probe = hog_main.open_channel(key)
    fit, per = fill_replies(probe, bad, 100000)
    probe.close()
    diag("%d replies of %d bytes fit before the helper's write blocked" % (fit, per))
    out(0 < fit < 100000, "the helper's write to a client that does not read blocks (calibration)")
    # Pass 2: exactly that many, all queued, so the socket is full but no
    # write is waiting; then a SIGN whose C_Sign hangs.
    hog = hog_main.open_channel(key)
    for _ in range(fit):
        hog.sock.sendall(bad)
    wait_queued(hog, fit * per, 10)
    ctl_write(ctl, "C_Sign=hang once\n")
    hog.send(P.sign(key, P.SCHEME_ECDSA, P.HASH_SHA256, b"hangs"))
    deadline = time.time() + 10
    while "hang" in open(ctl).read() and time.time() < deadline:
        time.sleep(0.02)
    out("hang" not in open(ctl).read(), "the stalled channel's C_Sign took the hang")
    good_main = P.client(sock, "hostile.py good")
    good = good_main.open_channel(key)
    # The watchdog answers the hung one at sign-timeout (3 s); keep signing
    # past that and past the 10 s a blocking write to the hog could take.
    errors, n = [], 0
    t_end = time.time() + 12
    while time.time() < t_end:
        try:
            good.sign(key, P.SCHEME_ECDSA, P.HASH_SHA256, b"healthy %d" % n)
            n += 1
        except Exception as e:  # noqa: BLE001 - every error here is the defect
            errors.append(str(e))
            try:
                good.close()
                good = good_main.open_channel(key)
            except Exception as e2:  # noqa: BLE001
                errors.append("reopen: %s" % e2)
                break
        time.sleep(0.05)
    diag("healthy channel: %d signatures, %d errors %s" % (n, len(errors), errors[:2]))
    out(not errors and n > 0,
        "a healthy channel of the same helper signs throughout: no error, no false TIMEOUT",
        errors[:2])
    try:
        sign_once(sock, key)
        oc = None
    except Exception as e:  # noqa: BLE001
        oc = e
    out(oc is None, "OPEN_CHANNEL and SIGN on a new connection work meanwhile", oc)
    ctl_write(ctl, "unhang\n")
    for x in (hog, hog_main, good, good_main):
        x.close()


# ------------------------------------------------------------------ badtext
def cmd_badtext(sock, key):
    bad = b"pkcs11:token=\xff\xfe;object=caf\xe9"
    with P.client(sock, "hostile.py text") as c:
        for what, body in (("OPEN_CHANNEL", P.u8(P.OPEN_CHANNEL) + P.string(bad)),
                           ("LOCK", P.u8(P.LOCK) + P.string(bad)),
                           ("UNLOCK", P.u8(P.UNLOCK) + P.string(bad) + P.string(b"1234"))):
            try:
                c.request(body)
                err = None
            except P.AgentError as e:
                err = e
            except P.Malformed as e:
                err = e      # the reply echoed bytes that are not UTF-8
            out(isinstance(err, P.AgentError) and err.code == P.E_BAD_REQUEST and
                "UTF-8" in err.message,
                "%s with a URI that is not UTF-8 gets BAD_REQUEST, not echoed" % what, err)
        out(c.status().pid > 0, "the connection stays usable after them")
        ch = c.open_channel(key)
        try:
            ch.request(P.u8(P.SIGN) + P.string(bad) + bytes([P.SCHEME_ECDSA, P.HASH_SHA256, 0, 0]) +
                       P.u32(0) + P.string(b"x"))
            err = None
        except P.AgentError as e:
            err = e
        except P.Malformed as e:
            err = e
        out(isinstance(err, P.AgentError) and err.code == P.E_BAD_REQUEST,
            "SIGN on a channel with a key URI that is not UTF-8 gets BAD_REQUEST", err)
        sig = ch.sign(key, P.SCHEME_ECDSA, P.HASH_SHA256, b"after")
        out(len(sig) > 0, "the channel still signs after it")
        ch.close()


# ------------------------------------------------------------------ unlocks
def cmd_unlocks(sock, token_uri, n):
    """n UNLOCKs on the wire (the CLI skips a token LIST shows unlocked)."""
    with P.client(sock, "hostile.py unlocks") as c:
        for _ in range(n):
            c.unlock(token_uri, PIN)
    out(True, "%d UNLOCKs of a logged-in token answered OK" % n)


# ------------------------------------------------------------------ race
def cmd_race(sock, token_uri, keys, seconds, with_locker):
    stop = time.time() + seconds
    stats = {"sig": 0, "locked": 0, "lists": 0, "dups": 0, "locks": 0, "unlocks": 0}
    bad = []
    lock = threading.Lock()

    def note(k, n=1):
        with lock:
            stats[k] += n

    def signer(key):
        c = P.client(sock, "race signer")
        ch = None
        while time.time() < stop:
            try:
                if ch is None:
                    ch = c.open_channel(key)
                ch.sign(key, P.SCHEME_ECDSA, P.HASH_SHA256, b"race")
                note("sig")
            except P.AgentError as e:
                if e.code == P.E_LOCKED:
                    note("locked")
                else:
                    with lock:
                        bad.append("sign %s: %s" % (key, e))
                if ch is not None and e.code not in (P.E_LOCKED,):
                    ch.close()
                    ch = None
            except Exception as e:  # noqa: BLE001 - a lost channel is a defect here
                with lock:
                    bad.append("sign %s: %r" % (key, e))
                ch = None
        c.close()

    def lister():
        c = P.client(sock, "race lister")
        while time.time() < stop:
            keys_seen = {}
            for k in c.list().keys:
                ident = (k.token_uri, k.id, k.label)
                keys_seen[ident] = keys_seen.get(ident, 0) + 1
            dup = [i for i, n in keys_seen.items() if n > 1]
            note("lists")
            if dup:
                note("dups")
                with lock:
                    bad.append("LIST shows twice: %s" % (dup[0][2],))
        c.close()

    def locker():
        c = P.client(sock, "race locker")
        while time.time() < stop:
            try:
                c.lock(token_uri)
                note("locks")
                c.unlock(token_uri, PIN)
                note("unlocks")
            except P.AgentError as e:
                with lock:
                    bad.append("lock/unlock: %s" % e)
        c.close()

    def unlocker():
        # UNLOCK of a token that is logged in: the agent once rescanned on each.
        c = P.client(sock, "race unlocker")
        while time.time() < stop:
            try:
                c.unlock(token_uri, PIN)
                note("unlocks")
            except P.AgentError as e:
                if e.code not in (P.E_PIN_INCORRECT,):
                    with lock:
                        bad.append("unlock: %s" % e)
        c.close()

    threads = [threading.Thread(target=signer, args=(k,)) for k in keys for _ in range(2)]
    threads += [threading.Thread(target=lister), threading.Thread(target=unlocker)]
    if with_locker:
        threads.append(threading.Thread(target=locker))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    diag("race: %s" % stats)
    amb = [b for b in bad if "AMBIGUOUS" in b]
    out(stats["dups"] == 0, "LIST never shows a key twice (%d lists)" % stats["lists"],
        "%d lists with duplicates" % stats["dups"])
    out(not amb, "a correct URI never gets AMBIGUOUS", "%d: %s" % (len(amb), amb[:1]))
    out(not bad, "every SIGN got a signature or LOCKED, every LOCK and UNLOCK OK",
        "%d: %s" % (len(bad), bad[:3]))
    if with_locker:
        out(stats["sig"] > 0 and stats["locked"] > 0 and stats["locks"] > 0,
            "the race ran: signatures, LOCKED answers and locks all seen", stats)
    else:
        out(stats["sig"] > 0 and stats["unlocks"] > 0,
            "the race ran: signatures and unlocks seen", stats)
    # The key copies are made after each rescan: the helper must have rescanned.
    with P.client(sock, "race after") as c:
        c.unlock(token_uri, PIN)
        for key in keys:
            ch = c.open_channel(key)
            ch.sign(key, P.SCHEME_ECDSA, P.HASH_SHA256, b"after")
            ch.close()


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    try:
        if cmd == "caps":
            cmd_caps(args[0], args[1], args[2])
        elif cmd == "fdcap":
            cmd_fdcap(args[0], args[1], args[2], int(args[3]))
        elif cmd == "bufmem":
            cmd_bufmem(args[0], args[1], int(args[2]))
        elif cmd == "unlocks":
            cmd_unlocks(args[0], args[1], int(args[2]))
        elif cmd == "badtext":
            cmd_badtext(args[0], args[1])
        elif cmd == "stall":
            cmd_stall(args[0], args[1], args[2])
        elif cmd == "race":
            cmd_race(args[0], args[1], args[2:-1], float(args[-1]), True)
        elif cmd == "race-unlock":
            cmd_race(args[0], args[1], args[2:-1], float(args[-1]), False)
        else:
            sys.exit("hostile.py: unknown command %s" % cmd)
    except Exception as e:  # noqa: BLE001 - a crash is a failed check, with its reason
        out(False, "hostile.py %s ran to the end" % cmd, repr(e))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
