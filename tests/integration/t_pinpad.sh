#!/bin/bash
# t_pinpad: tokens with a protected authentication path (a PIN pad reader,
# CKF_PROTECTED_AUTHENTICATION_PATH), issue 13.  A signature on such a
# locked token makes the agent show a message (pinentry MESSAGE, one
# button) that says to type the PIN on the reader's keypad while its helper
# calls C_Login with a NULL PIN, and close it when the login is over;
# `p11agent unlock` needs no PIN either.  Last, the message from the real
# pinentry-curses in a tmux pane: the user's terminal is given back as it
# was when the agent closes it.
#
# A small fake: no reader with a keypad exists on the test machines, and
# SoftHSM2 refuses a NULL PIN.  The fault module (tests/fault) sets
# CKF_PROTECTED_AUTHENTICATION_PATH (control line pinflags=protected) and
# answers C_Login(NULL, 0) by logging the SoftHSM2 token in with the PIN of
# its control line padpin= (the "keypad"); without that line the keypad PIN
# is wrong; C_Login=delay:1500 is the time the user takes to type it.  It logs those logins as "C_Login:pad".  The pinentry is
# test_pinentry.py (one log line per dialog, hold=1 keeps a dialog open).
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"

require_cmd timeout "$PYTHON3" softhsm2-util pkcs11-tool
require_agent_binaries
make_token
fault_setup

pinentry_setup
echo "pinentry-program $T/test-pinentry" >>"$T/agent.conf"

logged_in() {
	list_json 2>/dev/null && [ "$(json_token logged_in)" = true ]
}

# message_closed: every MESSAGE pinentry that was held open is gone.
message_closed() {
	local pid
	[ -s "$PDIR/open" ] || return 1
	while read -r pid; do
		! kill -0 "$pid" 2>/dev/null || return 1
	done <"$PDIR/open"
}

# C_Login=delay: the user takes a moment to type on the keypad.
printf '%s\n' "pinflags=protected" "padpin=$USER_PIN" "C_Login=delay:1500" >"$CTL"
behave action=pin hold=1
check "agent starts (fault module with a PIN pad, test pinentry)" start_agent --config "$T/agent.conf"
running "$AGENT_PID" || bail_out "agent running"
list_json || bail_out "list --json"
is "$(json_token protected_authentication_path)" true "list: the token has a protected authentication path"
is "$(json_token logged_in)" false "the token is locked"
KEY=$(json_key ec256 uri)
[ -n "$KEY" ] || bail_out "key ec256 listed"

printf 'message to sign\n' >"$T/msg"
sign() {
	run timeout "$CLI_TIMEOUT" "$P11AGENT" --socket "$SOCK" sign --key "$KEY" --scheme ecdsa \
		--in "$T/msg" --out "$1"
}

# ------------------------------------------------------------ signature, keypad message
p0=$(calls C_Login:pad)
l0=$(calls C_Login)
sign "$T/sig1"
rc_is 0 "a signature on the locked PIN pad token succeeds"
is "$(calls C_Login:pad)" "$((p0 + 1))" "the helper called C_Login with a NULL PIN once"
is "$(calls C_Login)" "$l0" "and no C_Login with a PIN"
is "$(dialogs MESSAGE)" 1 "one message dialog"
is "$(dialogs GETPIN)" 0 "no PIN dialog (the PIN is typed on the reader)"
case $(grep '^MESSAGE' "$PDIR/log" | tail -n 1) in
*keypad*"$TOKEN_LABEL"*|*"$TOKEN_LABEL"*keypad*) ok "the message names the token and the reader's keypad" ;;
*) not_ok "the message names the token and the reader's keypad"; diag_file "$PDIR/log" ;;
esac
if poll 10 message_closed; then
	ok "the agent closes the message once the login is over"
else
	not_ok "the agent closes the message once the login is over"
fi
check "the token is logged in" logged_in

# ------------------------------------------------------------ a wrong PIN on the keypad
check "lock" p11a lock
rm -f "$PDIR/open"
printf '%s\n' "pinflags=protected" "C_Login=delay:1500" >"$CTL"
p0=$(calls C_Login:pad)
sign "$T/sig.wrong"
rc_is 1 "a wrong PIN on the keypad: the signature fails"
stderr_has "PIN incorrect" "and says the PIN is incorrect"
is "$(calls C_Login:pad)" "$((p0 + 1))" "one C_Login(NULL), never retried"
is "$(dialogs MESSAGE)" 2 "one more message dialog"
is "$(dialogs GETPIN)" 0 "still no PIN dialog"

# ------------------------------------------------------------ p11agent unlock
printf '%s\n' "pinflags=protected" "padpin=$USER_PIN" >"$CTL"
p0=$(calls C_Login:pad)
run p11a unlock --token "pkcs11:token=$TOKEN_LABEL"
rc_is 0 "p11agent unlock on the PIN pad token needs no PIN"
stderr_has "PIN pad" "and tells the user to use the PIN pad"
is "$(calls C_Login:pad)" "$((p0 + 1))" "p11agent unlock: one C_Login(NULL)"
check "the token is logged in" logged_in

# ------------------------------------------------------------ the real pinentry-curses
# The keypad message drawn by the real pinentry-curses in a tmux pane
# (tmux_start, lib.sh).  It waits for a key the user never presses: the
# agent kills it when the login is over, and must then give the user's
# terminal back as it was (a killed pinentry-curses leaves it without echo
# and canonical mode).
curses_checks=("the keypad message appeared on the tmux pane" "the signature succeeded"
	"the message was closed: the terminal has its echo and canonical mode back")
if [ ! -x /usr/bin/pinentry-curses ] || ! command -v tmux >/dev/null; then
	for c in "${curses_checks[@]}"; do
		skip "pinentry-curses: $c" "pinentry-curses or tmux not installed"
	done
else
	stop_agent
	sed -i "s|^pinentry-program .*|pinentry-program /usr/bin/pinentry-curses|" "$T/agent.conf"
	printf '%s\n' "pinflags=protected" "padpin=$USER_PIN" "C_Login=delay:1500" >"$CTL"
	check "agent restarts with pinentry-curses (token locked)" start_agent --config "$T/agent.conf"
	check "a tmux pane ran updatestartuptty" tmux_start
	check "the pane's terminal echoes before the dialog" tty_sane
	dialog_sign "$KEY" "$T/sig.curses"
	screen_shows "keypad" "pinentry-curses: ${curses_checks[0]}"
	dialog_sign_done "pinentry-curses: ${curses_checks[1]}"
	if poll 10 tty_sane; then
		ok "pinentry-curses: ${curses_checks[2]}"
	else
		not_ok "pinentry-curses: ${curses_checks[2]}"
		diag "$(stty -F "$TMUX_TTY" -a 2>&1)"
	fi
	tmux_stop
fi

stop_agent
is "$AGENT_RC" 0 "agent exits cleanly"
done_testing
