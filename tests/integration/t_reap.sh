#!/bin/bash
# t_reap: taking a token helper down never stops the agent's event loop.
#
# The faulty module (tests/fault/libp11afault.so, as t_faults runs it) is
# told to shut the helper's control socket (fd 3) down from inside C_Sign
# and then hang: the agent sees its helper's socket close while the
# process is still alive and not exiting.  A client that polls STATUS
# meanwhile must get answers in that window: a STATUS reply that already
# shows the module down must arrive while the helper process still runs
# and before the agent logs the helper's exit.  (An agent that waits for
# the child inside the loop answers only once the helper is reaped.)
# Then the helper is killed after its grace period, reaped, restarted, and
# its token signs again.
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"

require_cmd openssl pkcs11-tool softhsm2-util timeout "$PYTHON3"
require_agent_binaries
make_token
fault_setup "EC:prime256v1 21 two-ec"
echo "debug yes" >>"$T/agent.conf"

set_ctl() {
	printf '%s\n' "$@" >"$CTL.new"
	mv -f "$CTL.new" "$CTL"
}
tok() {
	list_json && json_token "$1" "${2:-}"
}
# helper_pid NAME: the pid of the latest helper started for module NAME (from the agent's log).
helper_pid() {
	sed -n "s/.*helper $1 started (pid \([0-9]*\)).*/\1/p" "$AGENT_LOG" | tail -n 1
}

# shellcheck disable=SC2086 # a command line, as in lib.sh's start_agent
${P11AGENTD_WRAPPER:-} "$P11AGENTD" --foreground --config "$T/agent.conf" >>"$AGENT_LOG" 2>&1 &
AGENT_PID=$!
remember_pid "$AGENT_PID"
started=no
for _ in $(seq 1 200); do
	running "$AGENT_PID" || break
	if [ "$(tok present 2>/dev/null)" = true ] && [ "$(tok present "$TWO_LABEL" 2>/dev/null)" = true ]; then
		started=yes
		break
	fi
	sleep 0.1
done
[ "$started" = yes ] || bail_out "agent lists both tokens through the fault module"
ok "agent lists both tokens through the fault module"
KEY_A=$(json_key ec256 uri)
[ -n "$KEY_A" ] || bail_out "the faulty token's key is listed"
HPID=$(helper_pid faulty.so)
[ -n "$HPID" ] && running "$HPID" || bail_out "the faulty module's helper runs"

# The client: unlock, open a channel to the faulty key, arm the fault, send
# SIGN without waiting, and poll STATUS on the main connection.  At the
# first reply that shows a module down it notes whether the helper process
# still runs (not reaped, not a zombie) and whether the agent has logged
# its exit yet.
"$PYTHON3" - "$SOCK" "$KEY_A" "$TOKEN_LABEL" "$USER_PIN" "$CTL" "$HPID" "$AGENT_LOG" \
	>"$T/reap.out" 2>"$T/reap.err" <<'EOF' || true
import os, sys, time
import p11a_proto as P

sock, key, label, pin, ctl, hpid, log = sys.argv[1:8]

def helper_state():
    try:
        with open("/proc/%s/stat" % hpid) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"

def exit_logged():
    with open(log, errors="replace") as f:
        text = f.read()
    return ("(pid %s) died" % hpid) in text or ("(pid %s) exited" % hpid) in text

c = P.client(sock, "t_reap")
c.unlock("pkcs11:token=" + label, pin.encode())
ch = c.open_channel(key)
before = c.status().modules_up
with open(ctl + ".new", "w") as f:
    f.write("C_Sign=shutdown:3\n")
os.rename(ctl + ".new", ctl)
ch.send(P.sign(key, P.SCHEME_ECDSA, P.HASH_SHA256, b"t_reap"))
print("modules_up_before=%d" % before)
deadline = time.monotonic() + 20
polls = 0
while time.monotonic() < deadline:
    st = c.status()
    polls += 1
    if st.modules_up < before:
        # Both observations right after the reply that shows the module down.
        print("helper_state=%s" % helper_state())
        print("exit_logged=%s" % ("yes" if exit_logged() else "no"))
        break
print("polls=%d" % polls)
# The signer gets an error or EOF, not a hang.
try:
    ch.settimeout(20)
    ch.recv_msg()
    print("sign=answered")
except P.Closed:
    print("sign=closed")
except Exception as e:
    print("sign=%s" % type(e).__name__)
EOF
diag_file "$T/reap.out"
[ ! -s "$T/reap.err" ] || diag_file "$T/reap.err"
val() { sed -n "s/^$1=//p" "$T/reap.out"; }

is "$(val modules_up_before)" 2 "both modules up before the fault"
st=$(val helper_state)
if [ -n "$st" ] && [ "$st" != gone ] && [ "$st" != Z ]; then
	ok "STATUS answered while the helper that closed its socket still ran (state $st)"
else
	not_ok "STATUS answered while the helper that closed its socket still ran"
	diag "helper state when the loop answered again: '${st:-no answer showed the module down}'"
fi
is "$(val exit_logged)" no "that answer came before the agent logged the helper's exit"
case $(val sign) in
answered | closed) ok "the signer got an answer or EOF ($(val sign))" ;;
*) not_ok "the signer got an answer or EOF ($(val sign))" ;;
esac

set_ctl ""
if wait_gone "$HPID" 10; then
	ok "the hung helper is gone (killed after its grace period)"
else
	not_ok "the hung helper is gone (killed after its grace period)"
fi
if grep -q "helper faulty.so (pid $HPID) did not exit within" "$AGENT_LOG"; then
	ok "the agent says it killed the helper that would not exit"
else
	not_ok "the agent says it killed the helper that would not exit"
	diag_file "$AGENT_LOG" 30
fi
restarted=no
for _ in $(seq 1 100); do
	if [ "$(tok present 2>/dev/null)" = true ]; then
		restarted=yes
		break
	fi
	sleep 0.1
done
is "$restarted" yes "the faulty module's helper is restarted and lists its token again"
NPID=$(helper_pid faulty.so)
check "a new helper process runs" test -n "$NPID" -a "$NPID" != "$HPID"

echo "message $$" >"$T/msg"
write_pin "$T/pin" "$USER_PIN"
run p11a unlock --token "pkcs11:token=$TOKEN_LABEL" --pin-file "$T/pin"
rc_is 0 "unlock after the restart"
run p11a sign --key "$KEY_A" --scheme ecdsa --hash sha256 --in "$T/msg" --out "$T/sig"
rc_is 0 "the restarted helper signs"

check "agent still running" running "$AGENT_PID"
stop_agent
is "$AGENT_RC" 0 "agent exits 0 on SIGTERM"
done_testing
