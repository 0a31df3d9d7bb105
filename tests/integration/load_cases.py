"""load_cases.py SOCKET KEY AGENT_PID IDLE SIGNERS SIGNS_EACH CYCLES HALF EVIL:
t_load's load driver (see t_load.sh).  Prints p11a_proto.Cases lines
(checks and figures) for lib.sh's relay_cases.
"""
import os
import resource
import socket
import sys
import threading
import time

import p11a_proto as P

SOCK, KEY, AGENT_PID = sys.argv[1], sys.argv[2], int(sys.argv[3])
IDLE, SIGNERS, SIGNS_EACH, CYCLES, HALF = (int(x) for x in sys.argv[4:9])
FRAME_MAX = P.FRAME_MAX

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

R = P.Cases()
out, figure = R.out, R.figure
frame, read_frame, err_code, show = P.frame, P.read_frame, P.error_code, P.show
request = P.raw_request


def connect(timeout=30):
    return P.raw_connect(SOCK, timeout)


def hello(s):
    P.raw_hello(s, "t_load")


def status_connections():
    with P.client(SOCK, "t_load") as c:
        return c.status().connections - 1   # not counting this one


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


peak_rss = [rss_kb(AGENT_PID)]

# ---- 0. the front door at its limits
# A frame of exactly the cap is read whole and decoded (SIGN is not allowed
# on a main connection: ERROR PROTOCOL, connection kept).
s = connect()
hello(s)
pad = FRAME_MAX - (1 + 4 + len(KEY.encode()) + 4 + 4 + 4)
body = P.sign(KEY, P.SCHEME_ECDSA, P.HASH_SHA256, b"c" * pad)
assert len(body) == FRAME_MAX
r = request(s, body)
r2 = request(s, P.status())
out(err_code(r) == P.E_PROTOCOL and r2 is not None and r2[0] == P.STATUS_REPLY,
    "a frame of exactly the cap (262144 bytes) is read and answered; the connection stays usable",
    "answered %s, then %s" % (show(r), show(r2)))
s.close()

# URIs with every odd character, and URIs that name a module or a PIN source:
# errors, never a module loaded or a file read.
EVIL = sys.argv[9]
odd = "pkcs11:" + "".join("%%%02x" % b for b in range(256)) + ";object=" + \
      "".join(chr(c) for c in range(1, 128) if c not in (0,)) + ";id=%zz%;;==;type=private"
uris = [odd,
        "pkcs11:token=x?module-path=%s" % EVIL,
        "pkcs11:token=x;module-name=evil?module-path=%s&pin-source=file:/etc/shadow" % EVIL,
        "pkcs11:object=%00%00%00",
        "p11-kit:module-path=%s" % EVIL,
        "pkcs11:" + "%41" * 1300]
s = connect()
hello(s)
codes = []
for u in uris:
    codes.append(err_code(request(s, P.open_channel(u))))
    # A token URI with no token attribute names every token (UNLOCK would
    # log in, LOCK log out): those only as OPEN_CHANNEL.
    if "token=" in u or not u.startswith("pkcs11:"):
        codes.append(err_code(request(s, P.unlock(u, "1234"))))
        codes.append(err_code(request(s, P.lock(u))))
r2 = request(s, P.status())
s.close()
out(all(c in (P.E_NO_SUCH_KEY, P.E_NO_SUCH_TOKEN, P.E_AMBIGUOUS, P.E_URI) for c in codes) and
    r2 is not None and r2[0] == P.STATUS_REPLY,
    "odd and module-naming URIs in OPEN_CHANNEL, UNLOCK, LOCK get NO_SUCH_KEY/NO_SUCH_TOKEN/URI errors; connection stays usable",
    "error codes %r" % codes)

# ---- 1. connect/disconnect cycles: a third bare, a third after HELLO, a third mid-frame
t0 = time.monotonic()
errors = 0
for i in range(CYCLES):
    try:
        s = connect()
        if i % 3 == 1:
            hello(s)
        elif i % 3 == 2:
            s.sendall(P.u32(100) + P.list_())
        s.close()
    except OSError as e:
        errors += 1
        if errors < 5:
            R.note("cycle %d: %r" % (i, e))
    if i % 1000 == 0:
        peak_rss[0] = max(peak_rss[0], rss_kb(AGENT_PID))
dt = time.monotonic() - t0
out(errors == 0, "%d connect/disconnect cycles without an error" % CYCLES, "%d errors" % errors)
figure("cycles", CYCLES)
figure("cycles_seconds", "%.1f" % dt)
deadline = time.monotonic() + 10
n = None
while time.monotonic() < deadline:
    n = status_connections()
    if n == 0:
        break
    time.sleep(0.2)     # polling period of a 10 s deadline
out(n == 0, "after the cycles the agent counts no connection left open", "STATUS says %r" % n)

# ---- 2. idle connections, half frames, busy signers at once
idle = []
t0 = time.monotonic()
try:
    for i in range(IDLE):
        s = connect()
        hello(s)
        idle.append(s)
except OSError as e:
    out(False, "%d idle connections opened" % IDLE, "after %d: %r" % (len(idle), e))
else:
    out(True, "%d idle connections opened (HELLO done on each)" % IDLE)
figure("idle_connections", len(idle))

half = []
half_t0 = time.monotonic()
for i in range(HALF):
    s = connect()
    hello(s)
    s.sendall(P.u32(100) + P.list_() + b"z" * 20)
    half.append(s)



def open_channel():
    c = P.client(SOCK, "t_load", 30)
    return c.sock, c.open_channel(KEY, timeout=60).sock



def sign_body(data):
    return P.sign(KEY, P.SCHEME_ECDSA, P.HASH_SHA256, data)

sig_ok = [0]
sig_bad = []
lat = []
lock = threading.Lock()
go = threading.Event()
ready = [0]                 # signers with their channel open (or failed)
all_ready = threading.Event()


def signer_ready():
    with lock:
        ready[0] += 1
        if ready[0] == SIGNERS:
            all_ready.set()




def signer(k):
    try:
        try:
            s, ch = open_channel()
        finally:
            signer_ready()
        go.wait()
        for j in range(SIGNS_EACH):
            t = time.monotonic()
            ch.sendall(frame(sign_body(b"load %d %d" % (k, j))))
            r = read_frame(ch)
            d = time.monotonic() - t
            with lock:
                if r is not None and r[0] == P.SIGNATURE:
                    sig_ok[0] += 1
                    lat.append(d)
                else:
                    sig_bad.append("signer %d: %r" % (k, r[:40] if r else r))
        ch.close()
        s.close()
    except Exception as e:  # noqa: BLE001
        with lock:
            sig_bad.append("signer %d: %r" % (k, e))

threads = [threading.Thread(target=signer, args=(k,)) for k in range(SIGNERS)]
for t in threads:
    t.start()
# Every signer has its channel (OPEN_CHANNEL answered) before the count.
all_ready.wait(60)
deadline = time.monotonic() + 5
while True:
    held = status_connections()
    if held >= IDLE + HALF + SIGNERS or time.monotonic() > deadline:
        break
    time.sleep(0.1)     # polling period of a 5 s deadline
figure("connections_held", held)
fds_during = fd_count(AGENT_PID)
figure("agent_fds_during", fds_during)
out(held >= IDLE + HALF + SIGNERS,
    "agent holds %d idle + %d half-frame + %d signer connections at once" % (IDLE, HALF, SIGNERS),
    "STATUS counts %d" % held)
t0 = time.monotonic()
go.set()
for t in threads:
    t.join(120)
    peak_rss[0] = max(peak_rss[0], rss_kb(AGENT_PID))
dt = time.monotonic() - t0
total = SIGNERS * SIGNS_EACH
out(sig_ok[0] == total and not sig_bad,
    "%d signers x %d signatures, all good, with %d idle connections open" % (SIGNERS, SIGNS_EACH, IDLE),
    "%d good, errors: %s" % (sig_ok[0], sig_bad[:3]))
figure("signatures", sig_ok[0])
figure("signatures_per_second", "%.0f" % (sig_ok[0] / dt if dt > 0 else 0))
lat.sort()
if lat:
    figure("sign_latency_p50_ms", "%.1f" % (lat[len(lat) // 2] * 1000))
    figure("sign_latency_p99_ms", "%.1f" % (lat[int(len(lat) * 0.99)] * 1000))

# Half frames: dropped at the 10 s deadline (not before, not much after).
closed_at = []
for s in half:
    s.settimeout(max(0.1, half_t0 + 20 - time.monotonic()))
    try:
        d = s.recv(1)
        closed_at.append(time.monotonic() - half_t0 if d == b"" else None)
    except (socket.timeout, OSError):
        closed_at.append(None)
good = all(c is not None and 9.0 <= c <= 13.0 for c in closed_at)
out(good, "%d half-sent frames dropped at the 10 s deadline, during the load" % HALF,
    "closed after %s s" % [None if c is None else round(c, 1) for c in closed_at][:5])
figure("half_frame_drop_seconds", "%.1f" % max(c for c in closed_at if c is not None) if any(closed_at) else "none")

# The idle connections outlived the half frames and still answer.
bad = 0
for s in idle[::50]:
    try:
        s.sendall(frame(P.status()))
        r = read_frame(s)
        if r is None or r[0] != P.STATUS_REPLY:
            bad += 1
    except OSError:
        bad += 1
out(bad == 0, "idle connections still answer STATUS after the half frames were dropped",
    "%d of %d failed" % (bad, len(idle[::50])))
figure("agent_rss_peak_kb", max(peak_rss[0], rss_kb(AGENT_PID)))
for s in idle + half:
    s.close()
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    n = status_connections()
    if n == 0:
        break
    time.sleep(0.2)     # polling period of a 10 s deadline
out(n == 0, "all load connections closed: the agent counts none left", "STATUS says %r" % n)
R.done()
