#!/bin/bash
# t_load: the agent under connection load.  10,000 connect/disconnect
# cycles; 1,000 idle connections held open while 64 clients sign at once;
# 20 half-sent frames among them dropped at the 10 s deadline while the
# idle ones stay; and afterwards the agent's descriptors are all back and
# its memory stayed bounded.  (t_security checks one half frame and 64
# simultaneous LISTs; this is the same front door under volume.)
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"

IDLE=${LOAD_IDLE:-1000}
SIGNERS=${LOAD_SIGNERS:-64}
SIGNS_EACH=${LOAD_SIGNS_EACH:-20}
CYCLES=${LOAD_CYCLES:-10000}
HALF=20
RSS_GROWTH_MAX_KB=${LOAD_RSS_GROWTH_MAX_KB:-16384}   # after the load, over the baseline
RSS_PEAK_MAX_KB=${LOAD_RSS_PEAK_MAX_KB:-131072}      # during the load

require_cmd openssl pkcs11-tool softhsm2-util timeout "$PYTHON3"
require_agent_binaries
make_token

# The agent's default max-connections (1024) is below what this test holds.
need_fds=$((IDLE + SIGNERS * 2 + HALF + 256))
if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt "$need_fds" ]; then
	bail_out "descriptor limit allows $need_fds (hard limit $(ulimit -Hn))"
fi
ulimit -Sn "$need_fds"
cat >"$T/agent.conf" <<EOF
max-connections $((IDLE + SIGNERS + HALF + 64))
EOF
AGENT_ARGS=(--config "$T/agent.conf")
check "agent starts with max-connections $((IDLE + SIGNERS + HALF + 64))" start_agent
running "$AGENT_PID" || bail_out "agent running"
check "unlock" unlock_token
KEY=$(key_uri ec256)

# fd_count PID / rss_kb PID
fd_count() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
helpers_fds() {
	local n=0 p
	for p in $(child_pids "$AGENT_PID"); do n=$((n + $(fd_count "$p"))); done
	echo "$n"
}

# Warm up (first channel, first signatures), then take the baseline.
p11a sign --key "$KEY" --scheme ecdsa --hash sha256 --in "$T/agent.conf" --out "$T/sig" >/dev/null
sleep 0.5
base_fds=$(fd_count "$AGENT_PID")
base_hfds=$(helpers_fds)
base_rss=$(rss_kb "$AGENT_PID")
diag "baseline: agent $base_fds fds, ${base_rss} kB RSS; helpers $base_hfds fds"

cat >"$T/load.py" <<'EOF'
# Load driver for t_load: prints "ok<TAB>desc", "not ok<TAB>desc<TAB>why",
# "figure<TAB>name<TAB>value" lines.
import os, resource, socket, sys, threading, time

import p11a_proto as P

SOCK, KEY, AGENT_PID = sys.argv[1], sys.argv[2], int(sys.argv[3])
IDLE, SIGNERS, SIGNS_EACH, CYCLES, HALF = (int(x) for x in sys.argv[4:9])
FRAME_MAX = P.FRAME_MAX

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

def out(good, desc, why=""):
    print(("ok\t%s" if good else "not ok\t%s\t" + str(why).replace("\t", " ")) % desc, flush=True)

def figure(name, value):
    print("figure\t%s\t%s" % (name, value), flush=True)

text, frame, read_frame, err_code = P.text, P.frame, P.read_frame, P.error_code
HELLO = frame(P.hello("t_load"))

def connect(timeout=30):
    return P.Conn.connect(SOCK, timeout).sock

def hello(s):
    s.sendall(HELLO)
    r = read_frame(s)
    if r is None or r[0] != P.HELLO_REPLY:
        raise ValueError("HELLO answered %r" % (r[:8] if r else r))

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
def request(s, body):
    s.sendall(frame(body))
    return read_frame(s)

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
    "answered %r, then %r" % (r[:8] if r else r, r2[:8] if r2 else r2))
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
            print("# cycle %d: %r" % (i, e))
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
    time.sleep(0.2)
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

def signer(k):
    try:
        s, ch = open_channel()
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
time.sleep(0.5)
held = status_connections()
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
    time.sleep(0.2)
out(n == 0, "all load connections closed: the agent counts none left", "STATUS says %r" % n)
print("done")
EOF

t0=$(date +%s)
# A PKCS#11 module no request may load (its name appears in the URIs above).
EVIL=$T/evil-module.so
cp "$SOFTHSM2_MODULE" "$EVIL"
if timeout 600 "$PYTHON3" "$T/load.py" "$SOCK" "$KEY" "$AGENT_PID" "$IDLE" "$SIGNERS" "$SIGNS_EACH" \
	"$CYCLES" "$HALF" "$EVIL" >"$T/load.out" 2>"$T/load.err"; then
	load_rc=0
else
	load_rc=$?
fi
t1=$(date +%s)
finished_load=no
peak_rss=
while IFS="$(printf '\t')" read -r verdict desc why; do
	case $verdict in
	ok) ok "$desc" ;;
	"not ok") not_ok "$desc"; [ -z "$why" ] || diag "$why" ;;
	figure)
		diag "figure: $desc = $why"
		[ "$desc" != agent_rss_peak_kb ] || peak_rss=$why
		;;
	done) finished_load=yes ;;
	"#"*) diag "${verdict#\# }" ;;
	esac
done <"$T/load.out"
if [ "$load_rc" -eq 0 ] && [ "$finished_load" = yes ]; then
	ok "load.py ran to the end ($((t1 - t0)) s)"
else
	not_ok "load.py ran to the end (exit $load_rc)"
	diag_file "$T/load.err"
fi

evil_maps=
for p in "$AGENT_PID" $(child_pids "$AGENT_PID"); do
	if grep -q "evil-module" "/proc/$p/maps" 2>/dev/null; then evil_maps="$evil_maps $p"; fi
done
is "${evil_maps:-none}" none "no agent process mapped the module named in request URIs"

# ---------------------------------------------------------------- resources afterwards
check "agent still running after the load" running "$AGENT_PID"
# Channel threads in the helper end when their client closes; give them a moment.
fds_back=no
for _ in $(seq 1 50); do
	if [ "$(fd_count "$AGENT_PID")" -le "$base_fds" ] && [ "$(helpers_fds)" -le "$base_hfds" ]; then
		fds_back=yes
		break
	fi
	sleep 0.2
done
after_fds=$(fd_count "$AGENT_PID")
after_hfds=$(helpers_fds)
if [ "$fds_back" = yes ]; then
	ok "no descriptor leak: agent back to $after_fds fds (was $base_fds), helpers $after_hfds (was $base_hfds)"
else
	not_ok "no descriptor leak: agent back to its baseline fds"
	diag "agent $after_fds fds (baseline $base_fds); helpers $after_hfds (baseline $base_hfds)"
	# shellcheck disable=SC2012 # a diagnostic listing of /proc links
	ls -l "/proc/$AGENT_PID/fd" | sed 's/^/#   /' | tail -n 20
fi
after_rss=$(rss_kb "$AGENT_PID")
diag "agent RSS: baseline ${base_rss} kB, peak ${peak_rss:-?} kB, after ${after_rss} kB"
if [ $((after_rss - base_rss)) -le "$RSS_GROWTH_MAX_KB" ]; then
	ok "agent memory bounded: RSS after the load within $((RSS_GROWTH_MAX_KB / 1024)) MiB of the baseline"
else
	not_ok "agent memory bounded: RSS after the load within $((RSS_GROWTH_MAX_KB / 1024)) MiB of the baseline"
fi
if [ -n "$peak_rss" ] && [ "$peak_rss" -le "$RSS_PEAK_MAX_KB" ]; then
	ok "agent memory bounded: peak RSS during the load under $((RSS_PEAK_MAX_KB / 1024)) MiB"
else
	not_ok "agent memory bounded: peak RSS during the load under $((RSS_PEAK_MAX_KB / 1024)) MiB"
fi
run p11a sign --key "$KEY" --scheme ecdsa --hash sha256 --in "$T/load.py" --out "$T/sig"
rc_is 0 "agent still signs after the load"
check "that signature verifies" \
	openssl dgst -sha256 -verify "$TOKDIR/ec256.pub.pem" -signature "$T/sig" "$T/load.py"
stop_agent
is "$AGENT_RC" 0 "agent exits 0 on SIGTERM after the load"
done_testing
