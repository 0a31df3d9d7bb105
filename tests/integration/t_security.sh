#!/bin/bash
# t_security: socket permissions, the SO_PEERCRED uid check, no core dumps
# and no dumpable agent, and a protocol front door that drops bad frames
# (only the offending connection) while other clients keep working.
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"

NOBODY=65534

require_cmd openssl pkcs11-tool softhsm2-util timeout setpriv stat gdb "$PYTHON3"
require_agent_binaries
make_token

# A client or program run as nobody gets a HOME and TMPDIR it owns, and
# copies of the binaries it can reach ($T is 0700 until we open it up).
NB=$T/nobody
mkdir -p "$NB/home" "$NB/tmp" "$NB/bin"
cp "$P11AGENT" "$P11AGENTD" "$NB/bin/"
chmod 0755 "$NB" "$NB/bin" "$NB/bin/p11agent" "$NB/bin/p11agentd"
chown "$NOBODY:$NOBODY" "$NB/home" "$NB/tmp"

# as_nobody CMD...: run CMD as uid/gid 65534 with its own HOME and TMPDIR.
# In the background, use "${AS_NOBODY[@]}" CMD & instead, so that $! is the
# process itself (setpriv and env exec it) and not a subshell of ours.
AS_NOBODY=(setpriv --reuid="$NOBODY" --regid="$NOBODY" --clear-groups
	env HOME="$NB/home" TMPDIR="$NB/tmp" XDG_RUNTIME_DIR="$NB/tmp")
as_nobody() {
	"${AS_NOBODY[@]}" "$@"
}

# ---------------------------------------------------------------- default socket path and modes
XDG=$T/xdg
mkdir -m 0700 "$XDG"
export XDG_RUNTIME_DIR=$XDG
SOCK=$XDG/p11agent/agent.sock
AGENT_DEFAULT_SOCKET=yes
check "agent starts with its default socket under XDG_RUNTIME_DIR" start_agent
running "$AGENT_PID" || bail_out "agent running"
AGENT_DEFAULT_SOCKET=no

check "socket is at \$XDG_RUNTIME_DIR/p11agent/agent.sock" test -S "$SOCK"
is "$(stat -c %a "$XDG/p11agent")" 700 "socket directory mode is 0700"
is "$(stat -c %a "$SOCK")" 600 "socket mode is 0600"
is "$(stat -c %u "$SOCK")" 0 "socket owned by the agent's uid"
run env -u P11AGENT_SOCK "$P11AGENT" status
rc_is 0 "CLI finds the agent at the default path without --socket"
run env P11AGENT_SOCK="$SOCK" XDG_RUNTIME_DIR=/nonexistent "$P11AGENT" status
rc_is 0 "CLI honours P11AGENT_SOCK"

check "unlock" unlock_token

# ---------------------------------------------------------------- hardening: no core dumps
agent_procs="$AGENT_PID $(child_pid_list "$AGENT_PID")"
diag "agent processes: $agent_procs"
for pid in $agent_procs; do
	if grep -qE '^Max core file size +0 +0 ' "/proc/$pid/limits"; then
		ok "RLIMIT_CORE is 0 for agent process $pid"
	else
		not_ok "RLIMIT_CORE is 0 for agent process $pid"
		grep -E '^(Limit|Max core)' "/proc/$pid/limits" | sed 's/^/#   /'
	fi
	run as_nobody cat "/proc/$pid/environ"
	if [ "$rc" -ne 0 ] && grep -qi "permission denied" "$T/stderr"; then
		ok "nobody cannot read /proc/$pid/environ of the agent"
	else
		not_ok "nobody cannot read /proc/$pid/environ of the agent"
		diag_last
	fi
done
diag "/proc/PID/status has no Dumpable line; PR_SET_DUMPABLE is checked below" \
	"with an agent run as nobody, whose /proc files nobody may read only if dumpable"

# ---------------------------------------------------------------- PR_SET_DUMPABLE, as nobody
# A process that called PR_SET_DUMPABLE 0 has its /proc/PID files owned by
# root, so its own uid cannot read /proc/PID/environ; an ordinary process
# of the same uid can (the control).
NBT=$NB/token
cp -a "$TOKDIR" "$NBT"
sed -i "s|^directories.tokendir = .*|directories.tokendir = $NBT/tokens|" "$NBT/softhsm2.conf"
mkdir -m 0700 "$NB/xdg"
chown -R "$NOBODY:$NOBODY" "$NBT" "$NB/xdg"
chmod 0711 "$T"
"${AS_NOBODY[@]}" SOFTHSM2_CONF="$NBT/softhsm2.conf" "$NB/bin/p11agentd" --foreground \
	--socket "$NB/xdg/agent.sock" --module "$SOFTHSM2_MODULE" --debug >"$T/nobody-agent.log" 2>&1 &
nb_agent=$!
remember_pid "$nb_agent"
"${AS_NOBODY[@]}" sleep 60 &
nb_control=$!
remember_pid "$nb_control"
i=0
until as_nobody "$NB/bin/p11agent" --socket "$NB/xdg/agent.sock" status >/dev/null 2>&1; do
	i=$((i + 1))
	if [ "$i" -gt 100 ] || ! running "$nb_agent"; then
		break
	fi
	sleep 0.1
done
if running "$nb_agent" && [ -S "$NB/xdg/agent.sock" ]; then
	ok "agent runs as nobody on a copy of the token"
	is "$(readlink "/proc/$nb_agent/exe")" "$NB/bin/p11agentd" "the nobody agent's pid is p11agentd itself"
	is "$(stat -c %u "/proc/$nb_agent")" "$NOBODY" "the nobody agent runs as uid $NOBODY"
	# setpriv execs: the agent is $nb_agent itself.
	check "control: nobody reads /proc/PID/environ of its own ordinary process" \
		as_nobody cat "/proc/$nb_control/environ"
	for pid in "$nb_agent" $(child_pids "$nb_agent"); do
		run as_nobody cat "/proc/$pid/environ"
		if [ "$rc" -ne 0 ]; then
			ok "agent process $pid as nobody is not dumpable (its own uid cannot read /proc/$pid/environ)"
		else
			not_ok "agent process $pid as nobody is not dumpable (its own uid cannot read /proc/$pid/environ)"
		fi
		is "$(stat -c %u "/proc/$pid/environ")" 0 "/proc/$pid/environ of the nobody agent is owned by root (PR_SET_DUMPABLE 0)"
	done
	run as_nobody timeout 30 gdb -batch -nx -p "$nb_control" -ex 'info registers rip'
	if grep -q '^rip ' "$T/stdout"; then
		ok "control: gdb -p as nobody attaches to nobody's ordinary process"
	else
		not_ok "control: gdb -p as nobody attaches to nobody's ordinary process"
		diag_last
	fi
	run as_nobody timeout 30 gdb -batch -nx -p "$nb_agent" -ex 'info registers rip'
	if grep -q '^rip ' "$T/stdout"; then
		not_ok "gdb -p as nobody cannot attach to the agent run as nobody"
		diag_last
	else
		ok "gdb -p as nobody cannot attach to the agent run as nobody"
	fi
else
	not_ok "agent runs as nobody on a copy of the token"
	diag_file "$T/nobody-agent.log"
fi
stop_pid "$nb_control"
stop_pid "$nb_agent"
chmod 0700 "$T"

# ---------------------------------------------------------------- other uid: refused at the filesystem
# $T and $XDG traversable, the agent's 0700 directory is what stops nobody.
chmod 0711 "$T" "$XDG"
run as_nobody "$NB/bin/p11agent" --socket "$SOCK" status
rc_is 1 "nobody's CLI fails against the 0700 socket directory"
if grep -qi "permission denied" "$T/stderr"; then
	ok "nobody's CLI reports permission denied"
else
	not_ok "nobody's CLI reports permission denied"
	diag_last
fi
run as_nobody "$PYTHON3" -c '
import errno, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(errno.errorcode.get(e.errno, e.errno))
    sys.exit(0 if e.errno == errno.EACCES else 1)
print("connected")
sys.exit(1)' "$SOCK"
rc_is 0 "nobody's connect() fails with EACCES at the filesystem"

# ---------------------------------------------------------------- other uid: refused by SO_PEERCRED
# Test only: open the directory and the socket to everyone.  The agent
# must refuse the peer by its uid.
chmod 0711 "$XDG/p11agent"
chmod 0666 "$SOCK"
run as_nobody "$PYTHON3" -c '
import socket, sys
import p11a_proto as P
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
print("connected")
try:
    s.sendall(P.frame(P.hello("t_security nobody")))
    data = s.recv(4096)
except (ConnectionResetError, BrokenPipeError):
    data = b""
print("reply bytes:", len(data))
sys.exit(0 if data == b"" else 1)' "$SOCK"
rc_is 0 "nobody connects to the opened socket but the agent closes it without a reply"
stdout_has "connected" "nobody's connect() itself succeeded (the uid check did the refusing)"
run as_nobody "$NB/bin/p11agent" --socket "$SOCK" list
rc_is 1 "nobody's 'p11agent list' fails"
stderr_has "p11agent: " "nobody's CLI error has the 'p11agent: ' prefix"
if grep -q "$NOBODY" "$AGENT_LOG"; then
	ok "agent log records refusing uid $NOBODY"
	grep "$NOBODY" "$AGENT_LOG" | head -n 3 | sed 's/^/#   /'
else
	not_ok "agent log records refusing uid $NOBODY"
	diag_file "$AGENT_LOG" 15
fi
run p11a list
rc_is 0 "the agent keeps serving root"
check "agent still running after refusing nobody" running "$AGENT_PID"
chmod 0700 "$XDG/p11agent" "$XDG" "$T"
chmod 0600 "$SOCK"

# ---------------------------------------------------------------- bad frames
cat >"$T/proto.py" <<'EOF'
# Raw protocol client for t_security: each case prints "ok<TAB>desc" or
# "not ok<TAB>desc<TAB>why".
import os, socket, struct, sys, threading, time

import p11a_proto as P

SOCK, KEY_URI = sys.argv[1], sys.argv[2]
FRAME_MAX = P.FRAME_MAX

cases_run = 0

def out(good, desc, why=""):
    global cases_run
    cases_run += 1
    print(("ok\t%s" if good else "not ok\t%s\t" + why.replace("\t", " ")) % desc, flush=True)

text, frame, read_frame, error_code = P.text, P.frame, P.read_frame, P.error_code
HELLO = P.hello("t_security proto.py")

def connect(timeout=20):
    return P.Conn.connect(SOCK, timeout).sock

def hello(s):
    s.sendall(frame(HELLO))
    r = read_frame(s)
    if r is None or r[0] != P.HELLO_REPLY:
        raise ValueError("HELLO answered with %r" % (r[:8] if r else r))
    return r

def request(s, body):
    s.sendall(frame(body))
    return read_frame(s)

def sign_body(data):
    return P.sign(KEY_URI, P.SCHEME_ECDSA, P.HASH_SHA256, data)

def wait_eof(s, limit):
    """True when the peer closes within limit seconds; skips ERROR frames."""
    s.settimeout(limit)
    t0 = time.monotonic()
    try:
        while True:
            r = read_frame(s)
            if r is None:
                return True, time.monotonic() - t0
            if r[0] != P.ERROR:
                return False, "got a non-ERROR reply type 0x%02x" % r[0]
    except socket.timeout:
        return False, "still open after %d s" % limit
    except (ValueError, OSError) as e:
        return False, str(e)

# ---- a client that keeps working while the bad ones are dropped
held_ok = 0
held_errors = []
stop = threading.Event()

def held_client():
    global held_ok
    try:
        s = connect()
        hello(s)
        while not stop.is_set():
            r = request(s, P.list_())
            if r is None or r[0] != P.LIST_REPLY:
                held_errors.append("LIST answered %r" % (r[:8] if r else r))
                return
            held_ok += 1
            time.sleep(0.05)
        s.close()
    except Exception as e:  # noqa: BLE001 - any failure is a test failure
        held_errors.append(repr(e))

held = threading.Thread(target=held_client)
held.start()
time.sleep(0.3)

def case(desc, fn):
    try:
        good, why = fn()
    except Exception as e:  # noqa: BLE001
        good, why = False, "exception %r" % e
    out(good, desc, str(why))

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
case("frame of length 262145 is dropped at once", dropped(struct.pack(">I", FRAME_MAX + 1)))
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
     dropped(struct.pack(">I", 64) + rnd2, after_hello=True, limit=15, close_write=True))

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
    return (r is not None and r[0] == P.STATUS_REPLY), "STATUS after a truncated frame: %r" % (r[:8] if r else r)
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
    return error_code(r) == P.E_PROTOCOL, "LIST before HELLO answered %r" % (r[:8] if r else r)
case("LIST before HELLO gets ERROR PROTOCOL (24)", not_hello_first)

def bad_version():
    s = connect()
    r = request(s, P.hello("future", 7, 9))
    if error_code(r) != P.E_VERSION:
        return False, "HELLO 7..9 answered %r" % (r[:8] if r else r)
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
        return False, "unknown type answered %r" % (r[:8] if r else r)
    if error_code(r) != P.E_UNKNOWN_TYPE:
        return False, "ERROR code %r, expected 5 (UNKNOWN_TYPE)" % error_code(r)
    r = request(s, P.list_())
    s.close()
    return (r is not None and r[0] == P.LIST_REPLY), "LIST after the ERROR answered %r" % (r[:8] if r else r)
case("unknown message type 0x3f after HELLO gets ERROR 0x81 UNKNOWN_TYPE; connection still usable",
     unknown_type)

def sign_on_main():
    s = connect()
    hello(s)
    r = request(s, sign_body(b"msg"))
    if error_code(r) != P.E_PROTOCOL:
        return False, "SIGN on the main connection answered %r" % (r[:8] if r else r)
    r = request(s, P.status())
    s.close()
    return (r is not None and r[0] == P.STATUS_REPLY), "STATUS afterwards answered %r" % (r[:8] if r else r)
case("SIGN on a main connection gets ERROR PROTOCOL (24); connection still usable", sign_on_main)

# ---- signing channel: a valid SIGN works, garbage drops only that channel
def open_channel():
    c = P.client(SOCK, "t_security proto.py", 20)
    return c.sock, c.open_channel(KEY_URI).sock

def channel_sign():
    s, ch = open_channel()
    r = request(ch, sign_body(b"hello channel"))
    ch.close()
    s.close()
    return (r is not None and r[0] == P.SIGNATURE), "SIGN answered %r" % (r[:8] if r else r)
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
    return (r is not None and r[0] == P.SIGNATURE), "SIGN on a new channel answered %r" % (r[:8] if r else r)
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
    return (r is not None and r[0] == P.ERROR) or r is None, "LIST on a channel answered %r" % (r[:8] if r else r)
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
print("# held connection answered %d LISTs" % held_ok)

# Every dropped connection is gone: STATUS counts this one alone
def connections_count():
    s = connect()
    hello(s)
    r = request(s, P.status())
    s.close()
    if r is None or r[0] != P.STATUS_REPLY:
        raise ValueError("STATUS answered %r" % (r[:8] if r else r))
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
    time.sleep(0.2)
out(n == 1, "agent counts one open connection once the bad ones are gone",
    "STATUS connections = %r" % (n,))
print("done\t%d cases" % cases_run)
EOF

key=$(key_uri ec256)
# A CLI client in a loop, in parallel with the raw cases.
(
	while [ ! -e "$T/stop-loop" ]; do
		if "$P11AGENT" --socket "$SOCK" list >/dev/null 2>>"$T/loop.err"; then
			echo ok >>"$T/loop.res"
		else
			echo fail >>"$T/loop.res"
		fi
		sleep 0.1
	done
) &
loop_pid=$!
remember_pid "$loop_pid"

if timeout 300 "$PYTHON3" "$T/proto.py" "$SOCK" "$key" >"$T/proto.out" 2>"$T/proto.err"; then
	proto_rc=0
else
	proto_rc=$?
fi
touch "$T/stop-loop"
wait "$loop_pid"
forget_pid "$loop_pid"

finished_cases=
while IFS="$(printf '\t')" read -r verdict desc why; do
	case $verdict in
	ok) ok "$desc" ;;
	"not ok") not_ok "$desc"; [ -z "$why" ] || diag "$why" ;;
	done) finished_cases=$desc ;;
	"#"*) diag "${verdict#\# }" ;;
	esac
done <"$T/proto.out"
if [ "$proto_rc" -eq 0 ] && [ -n "$finished_cases" ]; then
	ok "proto.py ran to the end ($finished_cases)"
else
	not_ok "proto.py ran to the end (exit $proto_rc)"
	diag_file "$T/proto.err"
fi

touch "$T/loop.res"
loop_ok=$(awk '$1 == "ok" { n++ } END { print n + 0 }' "$T/loop.res")
loop_fail=$(awk '$1 == "fail" { n++ } END { print n + 0 }' "$T/loop.res")
if [ "$loop_fail" -eq 0 ] && [ "$loop_ok" -gt 10 ]; then
	ok "'p11agent list' in a loop kept working during the bad frames ($loop_ok runs)"
else
	not_ok "'p11agent list' in a loop kept working during the bad frames ($loop_ok ok, $loop_fail failed)"
	diag_file "$T/loop.err" 10
fi

check "agent still running after the bad frames" running "$AGENT_PID"
run p11a sign --key "$key" --scheme ecdsa --hash sha256 --in "$T/proto.py" --out "$T/sig"
rc_is 0 "agent still signs after the bad frames"
check "that signature verifies" \
	openssl dgst -sha256 -verify "$TOKDIR/ec256.pub.pem" -signature "$T/sig" "$T/proto.py"

stop_agent
is "$AGENT_RC" 0 "agent exits 0 on SIGTERM"
done_testing
