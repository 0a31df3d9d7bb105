#!/bin/bash
# t_pinentry: the agent's PIN dialogs (issue 13).  A signature on a locked
# token makes the client library ask the agent for a PIN dialog
# (UNLOCK_PROMPT); the agent runs its pinentry-program, sends the PIN to the
# token's helper and the client signs once more.
#
# The pinentry is test_pinentry.py (speaks Assuan as pinentry does, answers
# from $PDIR/behaviour, logs one line per dialog to $PDIR/log) and, in the
# last part, the real pinentry-tty on a pseudo-terminal this test owns and
# the real pinentry-curses in a tmux pane.  The
# token is SoftHSM2 behind the fault module (fault_setup), which counts
# C_Login.  Cases: a curl TLS handshake through the provider (one dialog,
# handshake completes); 8 concurrent signers (one dialog, all succeed);
# status and list answer while the dialog is open; cancel (every waiter
# gets "PIN entry cancelled", no new dialog within the back-off); a wrong
# PIN (one C_Login, never retried; the next request's dialog says why);
# P11AGENT_NO_PROMPT; updatestartuptty; pinentry-tty; pinentry-curses in
# a tmux pane.
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/tls_lib.sh
. "$lib_dir/tls_lib.sh"

require_cmd openssl curl timeout "$PYTHON3" softhsm2-util pkcs11-tool
require_agent_binaries
require_provider
make_token
fault_setup

pinentry_setup
echo "pinentry-program $T/test-pinentry" >>"$T/agent.conf"

dialog_open() {
	[ -s "$PDIR/open" ]
}

# hold_release: lets a held dialog answer; resets the hold state.
hold_release() {
	: >"$PDIR/release"
}

hold_reset() {
	rm -f "$PDIR/release" "$PDIR/open"
}

logged_in() {
	list_json 2>/dev/null && [ "$(json_token logged_in)" = true ]
}

locked() {
	list_json 2>/dev/null && [ "$(json_token logged_in)" = false ]
}

# sign_bg N OUT: a signature with ec256 in the background; pid in SIGNER.
printf 'message to sign\n' >"$T/msg"
sign_bg() {
	timeout 60 "$P11AGENT" --socket "$SOCK" sign --key "$KEY" --scheme ecdsa --in "$T/msg" \
		--out "$T/sig.$1" >"$T/sign.$1.out" 2>"$T/sign.$1.err" &
	SIGNER=$!
	remember_pid "$SIGNER"
}

behave action=pin "pin=$USER_PIN"
check "agent starts (fault module, test pinentry)" start_agent --config "$T/agent.conf"
running "$AGENT_PID" || bail_out "agent running"
check "token listed, locked" locked
KEY=$(json_key ec256 uri)
[ -n "$KEY" ] || bail_out "key ec256 listed while the token is locked"

# ------------------------------------------------------------ curl through the provider
check "server certificate from the test CA" make_server_cert
declare -A PORT
check "s_server" start_tls_server any
[ -n "${PORT[any]:-}" ] || bail_out "TLS server running"
check "export-key wrote a key-reference file" p11a export-key "$KEY" --out "$T/ec256.key.pem"
n0=$(dialogs)
st=0
# Sanitizer builds: Debian's curl hangs with libasan preloaded (tls_lib.sh);
# python's ssl takes the same provider path there.
if [ -z "${CURL_SKIP:-}" ]; then
	TLS_CLIENT=curl
	tls_curl "${PORT[any]}" 1.3 "$TOKDIR/ec256.cert.pem" "$T/ec256.key.pem" "$T/curl.out" || st=$?
else
	TLS_CLIENT=python3
	tls_python "${PORT[any]}" 1.3 "$TOKDIR/ec256.cert.pem" "$T/ec256.key.pem" "$T/curl.out" || st=$?
fi
if [ "$st" -eq 0 ]; then
	ok "locked token: $TLS_CLIENT's TLS handshake through the provider completes"
	server_saw "$T/curl.out" ec256 "locked token: the server saw CN=ec256"
else
	not_ok "locked token: $TLS_CLIENT's TLS handshake through the provider completes"
	diag "$TLS_CLIENT exit status $st"
	diag_file "$T/curl.out" 15
	not_ok "locked token: the server saw CN=ec256"
fi
is "$(($(dialogs) - n0))" 1 "$TLS_CLIENT on a locked token: exactly one PIN dialog"
d=$(last_dialog)
case $d in
GETPIN*"$TOKEN_LABEL"*) ok "the dialog names token '$TOKEN_LABEL'" ;;
*) not_ok "the dialog names token '$TOKEN_LABEL'"; diag "$d" ;;
esac
serial=$(json_token serial)
case $d in
*"serial $serial"*) ok "the dialog names the token's serial $serial" ;;
*) not_ok "the dialog names the token's serial $serial"; diag "$d" ;;
esac
case $d in
*"$TLS_CLIENT"*"(pid "[0-9]*) ok "the dialog names the program ($TLS_CLIENT) and its pid" ;;
*) not_ok "the dialog names the program ($TLS_CLIENT) and its pid"; diag "$d" ;;
esac
check "the token is logged in after the dialog" logged_in

# ------------------------------------------------------------ 8 signers, one dialog
check "lock" p11a lock
hold_reset
behave action=pin "pin=$USER_PIN" hold=1
n0=$(dialogs)
signers=()
for i in 1 2 3 4 5 6 7 8; do
	sign_bg "c$i"
	signers+=("$SIGNER")
done
if poll 20 dialog_open; then
	ok "8 signers on a locked token: a dialog opens"
else
	not_ok "8 signers on a locked token: a dialog opens"
	diag_file "$AGENT_LOG" 20
fi
# The main loop answers while the dialog is open.
t0=$(now_us)
st=0
p11a status >"$T/status.out" 2>&1 || st=$?
p11a list >"$T/list.out" 2>&1 || st=$?
t1=$(now_us)
if [ "$st" -eq 0 ] && [ $((t1 - t0)) -lt 3000000 ]; then
	ok "status and list answer while the PIN dialog is open ($(((t1 - t0) / 1000)) ms)"
else
	not_ok "status and list answer while the PIN dialog is open"
	diag "status $st after $(((t1 - t0) / 1000)) ms"
	diag_file "$T/status.out"
fi
sleep 1
hold_release
bad=0
for i in 1 2 3 4 5 6 7 8; do
	if ! wait "${signers[$((i - 1))]}" || [ ! -s "$T/sig.c$i" ]; then
		bad=$((bad + 1))
		diag_file "$T/sign.c$i.err"
	fi
	forget_pid "${signers[$((i - 1))]}"
done
is "$bad" 0 "8 concurrent signers on a locked token all succeed"
is "$(($(dialogs) - n0))" 1 "8 concurrent signers: exactly one PIN dialog"
hold_reset

# ------------------------------------------------------------ cancel and back-off
check "lock" p11a lock
behave action=cancel hold=1
n0=$(dialogs)
bg_signers 4 "$KEY" x
poll 20 dialog_open || diag "no cancel dialog opened"
sleep 1
hold_release
bg_signers_refused x "PIN entry cancelled"
is "$BG_BAD" 0 "cancel: every waiting signer fails with 'PIN entry cancelled'"
is "$(($(dialogs) - n0))" 1 "cancel: one dialog for the four of them"
hold_reset
behave action=pin "pin=$USER_PIN"
run p11a sign --key "$KEY" --scheme ecdsa --in "$T/msg" --out "$T/sig.backoff"
rc_is 1 "a signature right after the cancel fails (back-off)"
stderr_has "cancelled" "and says the PIN entry was cancelled"
is "$(($(dialogs) - n0))" 1 "no new dialog within the back-off"
check "token still locked" locked
sleep 2.5
run p11a sign --key "$KEY" --scheme ecdsa --in "$T/msg" --out "$T/sig.after"
rc_is 0 "after the back-off a signature shows the dialog again and succeeds"
is "$(($(dialogs) - n0))" 2 "one more dialog after the back-off"

# ------------------------------------------------------------ wrong PIN
check "lock" p11a lock
behave action=pin pin=99999999
l0=$(calls C_Login)
n0=$(dialogs)
run p11a sign --key "$KEY" --scheme ecdsa --in "$T/msg" --out "$T/sig.wrong"
rc_is 1 "a wrong PIN in the dialog: the signature fails"
stderr_has "PIN incorrect" "and says the PIN is incorrect"
is "$(calls C_Login)" "$((l0 + 1))" "a wrong PIN reached C_Login once (never retried by the agent)"
is "$(($(dialogs) - n0))" 1 "a wrong PIN: one dialog, not a second one on its own"
behave action=pin "pin=$USER_PIN"
run p11a sign --key "$KEY" --scheme ecdsa --in "$T/msg" --out "$T/sig.right"
rc_is 0 "the next request shows the dialog again and the right PIN signs"
d=$(last_dialog)
case $d in
*"error="*[Ii]ncorrect*) ok "the second dialog says why the last PIN failed (SETERROR)" ;;
*) not_ok "the second dialog says why the last PIN failed (SETERROR)"; diag "$d" ;;
esac
is "$(calls C_Login)" "$((l0 + 2))" "two dialogs, two C_Login"
# The token's flags are said in the dialog.
check "lock" p11a lock
printf '%s\n' "pinflags=final_try" >"$CTL"
behave action=pin pin=99999999
run p11a sign --key "$KEY" --scheme ecdsa --in "$T/msg" --out "$T/sig.final"
rc_is 1 "a wrong PIN on a token with CKF_USER_PIN_FINAL_TRY fails"
behave action=pin "pin=$USER_PIN"
run p11a sign --key "$KEY" --scheme ecdsa --in "$T/msg" --out "$T/sig.final2"
rc_is 0 "the next dialog signs"
: >"$CTL"
case $(last_dialog) in
*"desc="*FINAL*) ok "the dialog warns about the final try" ;;
*) not_ok "the dialog warns about the final try"; diag "$(last_dialog)" ;;
esac

# ------------------------------------------------------------ the audit trail
# Every dialog's outcome is an audit event (p11agent log): the cancel, the
# wrong PIN and the good ones, with the program that asked.
# dialog_events RESULT [TEXT]: how many pin-dialog events of p11agent log
# ended with RESULT (and have TEXT in their error).
dialog_events() {
	p11a log --json | "$PYTHON3" -c '
import json, sys
text = sys.argv[2] if len(sys.argv) > 2 else ""
print(sum(1 for e in json.load(sys.stdin)
          if e.get("event") == "pin-dialog" and e.get("result") == sys.argv[1]
          and e.get("pid") and e.get("exe") and text in (e.get("error") or "")))' "$@"
}
has_dialog_events() { [ "$(dialog_events CANCELLED)" -ge 1 ] && [ "$(dialog_events PIN_INCORRECT)" -ge 2 ]; }
if wait_for "p11agent log: pin-dialog events" 10 has_dialog_events; then
	is "$(dialog_events CANCELLED)" 2 "p11agent log: one cancelled PIN dialog (the waiters shared it) and one refusal in its back-off"
	is "$(dialog_events CANCELLED "no new dialog for")" 1 "p11agent log: the request refused in the back-off, with why"
	is "$(dialog_events PIN_INCORRECT)" 2 "p11agent log: two PIN dialogs ended with a wrong PIN"
	ok_n=$(dialog_events ok)
	if [ "$ok_n" -ge 4 ]; then ok "p11agent log: the successful PIN dialogs ($ok_n)"; else not_ok "p11agent log: the successful PIN dialogs"; diag "got $ok_n"; fi
fi
p11a log >"$T/log.txt"
file_lacks "$T/log.txt" "99999999" "p11agent log never shows the wrong PIN (t_audit checks the right one)"

# ------------------------------------------------------------ P11AGENT_NO_PROMPT
check "lock" p11a lock
n0=$(dialogs)
run env P11AGENT_NO_PROMPT=1 timeout "$CLI_TIMEOUT" "$P11AGENT" --socket "$SOCK" sign \
	--key "$KEY" --scheme ecdsa --in "$T/msg" --out "$T/sig.noprompt"
rc_is 1 "P11AGENT_NO_PROMPT=1: a signature on a locked token fails"
stderr_has "locked" "and says the token is locked"
is "$(($(dialogs) - n0))" 0 "P11AGENT_NO_PROMPT=1: no dialog"

# ------------------------------------------------------------ updatestartuptty
run env DISPLAY=:77 TERM=test-term timeout "$CLI_TIMEOUT" "$P11AGENT" --socket "$SOCK" updatestartuptty
rc_is 0 "updatestartuptty"
run p11a sign --key "$KEY" --scheme ecdsa --in "$T/msg" --out "$T/sig.tty"
rc_is 0 "a signature after updatestartuptty"
case $(last_dialog) in
*"display=:77"*) ok "the dialog got the display updatestartuptty sent" ;;
*) not_ok "the dialog got the display updatestartuptty sent"; diag "$(last_dialog)" ;;
esac

# ------------------------------------------------------------ the real pinentry-tty
if [ ! -x /usr/bin/pinentry-tty ]; then
	skip "pinentry-tty: PIN typed on the terminal, signature made" "pinentry-tty not installed"
	skip "pinentry-tty: the terminal showed the token's name" "pinentry-tty not installed"
else
	stop_agent
	sed -i "s|^pinentry-program .*|pinentry-program /usr/bin/pinentry-tty|" "$T/agent.conf"
	check "agent restarts with pinentry-tty" start_agent --config "$T/agent.conf"
	"$PYTHON3" - "$P11AGENT" "$SOCK" "$KEY" "$USER_PIN" "$T/msg" "$T/sig.pty" "$TOKEN_LABEL" \
		>"$T/pty.out" 2>"$T/pty.err" <<'EOF' || diag_file "$T/pty.err"
import os, pty, select, subprocess, sys, time
agent_cli, sock, key, pin, msg, sig, label = sys.argv[1:8]
master, slave = pty.openpty()
env = dict(os.environ, TERM="dumb")
env.pop("DISPLAY", None)
r = subprocess.run([agent_cli, "--socket", sock, "updatestartuptty"], stdin=slave,
                   env=env, timeout=20)
print(("ok" if r.returncode == 0 else "not ok") + "\tpinentry-tty: updatestartuptty on the pty")
signer = subprocess.Popen([agent_cli, "--socket", sock, "sign", "--key", key, "--scheme",
                           "ecdsa", "--in", msg, "--out", sig], stdin=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
buf = b""
deadline = time.time() + 30
while b"PIN:" not in buf and time.time() < deadline:
    rd, _, _ = select.select([master], [], [], 0.5)
    if rd:
        buf += os.read(master, 4096)
if b"PIN:" in buf:
    print("ok\tpinentry-tty: the PIN prompt appeared on the terminal")
else:
    print("not ok\tpinentry-tty: the PIN prompt appeared on the terminal\t%r" % buf[-300:])
os.write(master, pin.encode() + b"\n")
try:
    _, err = signer.communicate(timeout=30)
except subprocess.TimeoutExpired:
    signer.kill()
    _, err = signer.communicate()
good = signer.returncode == 0 and os.path.getsize(sig) > 0
print(("ok" if good else "not ok") + "\tpinentry-tty: PIN typed on the terminal, signature made"
      + ("" if good else "\t" + err.decode(errors="replace")))
text = buf.decode(errors="replace")
print(("ok" if label in text else "not ok") + "\tpinentry-tty: the terminal showed the token's name"
      + ("" if label in text else "\t" + text[-300:]))
print(("ok" if pin.encode() not in buf else "not ok") + "\tpinentry-tty: the PIN was not echoed")
EOF
	relay_cases "$T/pty.out"
fi

# ------------------------------------------------------------ the real pinentry-curses
# The pane of tmux_start (lib.sh) gives pinentry-curses a terminal.
if [ ! -x /usr/bin/pinentry-curses ] || ! command -v tmux >/dev/null; then
	for c in "the dialog appeared on the tmux pane" "PIN typed into the dialog, signature made" \
		"the dialog showed the token's name" "a second dialog appeared on the pane" \
		"killed at the agent's exit, the terminal has its echo and canonical mode back"; do
		skip "pinentry-curses: $c" "pinentry-curses or tmux not installed"
	done
else
	stop_agent
	sed -i "s|^pinentry-program .*|pinentry-program /usr/bin/pinentry-curses|" "$T/agent.conf"
	check "agent restarts with pinentry-curses (token locked)" start_agent --config "$T/agent.conf"
	check "a tmux pane ran updatestartuptty" tmux_start
	dialog_sign "$KEY" "$T/sig.curses"
	screen_shows "PIN" "pinentry-curses: the dialog appeared on the tmux pane"
	screen=$(screen_text)
	tmux_cmd send-keys -t p11a -l "$USER_PIN"
	tmux_cmd send-keys -t p11a Enter
	dialog_sign_done "pinentry-curses: PIN typed into the dialog, signature made"
	case $screen in
	*"$TOKEN_LABEL"*) ok "pinentry-curses: the dialog showed the token's name" ;;
	*) not_ok "pinentry-curses: the dialog showed the token's name"; diag "$screen" ;;
	esac
	# The agent stops with a dialog open: it kills pinentry-curses, which
	# cannot clean up, and gives the terminal its settings back.
	check "lock" p11a lock
	poll 10 tty_sane || diag "the pane's terminal is not sane before the second dialog"
	dialog_sign "$KEY" "$T/sig.curses2"
	screen_shows "PIN" "pinentry-curses: a second dialog appeared on the pane"
	stop_agent
	is "$AGENT_RC" 0 "the agent exits cleanly with a dialog open"
	wait "$DIALOG_SIGN_PID" 2>/dev/null || true
	forget_pid "$DIALOG_SIGN_PID"
	if poll 10 tty_sane; then
		ok "pinentry-curses: killed at the agent's exit, the terminal has its echo and canonical mode back"
	else
		not_ok "pinentry-curses: killed at the agent's exit, the terminal has its echo and canonical mode back"
		diag "$(stty -F "$TMUX_TTY" -a 2>&1)"
	fi
	tmux_stop
	check "agent starts again" start_agent --config "$T/agent.conf"
fi

file_lacks "$AGENT_LOG" "99999999" "the wrong PIN is nowhere in the agent's log"
stop_agent
is "$AGENT_RC" 0 "agent exits cleanly"
done_testing
