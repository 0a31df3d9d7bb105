#!/bin/bash
# t_hotplug_opensc: a smart card that comes and goes (issue 14, "Hotplug").
# OpenSC on the virtual CAC card behind a private pcscd
# (tests/tokens/setup-opensc.sh) and a SoftHSM2 token in the same agent,
# which signs all the way through in a loop of its own:
#   - card taken out between signatures: a signature fails at once as "token
#     not present", `p11agent status` and `list` say so, the SoftHSM2 token
#     signs on;
#   - card taken out while the card holds a signature's APDU: that client
#     gets "token not present", nothing hangs;
#   - card put back: listed again with no restart, seen through
#     C_WaitForSlotEvent (the helper's watcher thread, agent log), locked;
#     signing works after an unlock;
#   - pcscd stopped (by PID) and started again: the same;
#   - an agent stops at once although its watcher thread waits in
#     C_WaitForSlotEvent (C_Finalize wakes it), and after the watcher
#     switched to CKF_DONT_BLOCK polling (pcscd restarted).
# Every wait is on an event (a log line, a status field, a process exit),
# bounded by a generous deadline.
# shellcheck disable=SC2317 # functions called through poll, check and the EXIT trap
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/../integration/lib.sh"
require_agent_binaries
require_cmd openssl timeout "$PYTHON3"

# ---------------------------------------------------------------- the card
tmp_base=${TMPDIR:-/tmp}
[ "${#tmp_base}" -le 40 ] || tmp_base=/tmp
CARD=$(mktemp -d "$tmp_base/p11a-hot.XXXXXX")
# setup CMD: tests/tokens/setup-opensc.sh CMD on our card.
setup() { bash "$lib_dir/../tokens/setup-opensc.sh" "$1" "$CARD"; }
card_stop() {
	setup stop >"$CARD/stop.log" 2>&1 ||
		{ echo "# setup-opensc.sh stop failed:"; sed 's/^/#   /' "$CARD/stop.log"; }
	# pcscd and its namespace are gone: nothing is mounted under CARD.
	if [ -n "${KEEP_TMP:-}" ]; then echo "# KEEP_TMP set: kept $CARD"; else rm -rf --one-file-system "$CARD"; fi
}
# The card's daemons go before lib.sh's cleanup (which reports and exits).
trap 'st=$?; set +e; card_stop; (exit $st); cleanup' EXIT

st=0
setup start 2>"$CARD/setup.err" >"$CARD/setup.out" || st=$?
if [ "$st" -eq 77 ]; then
	# A whole-test skip with the reason (run.sh does the same).
	# shellcheck disable=SC2034 # lib.sh's cleanup reads it
	finished=yes
	printf '1..0 # SKIP %s\n' "$(tail -n 1 "$CARD/setup.err")"
	exit 0
elif [ "$st" -ne 0 ]; then
	diag_file "$CARD/setup.err" 30
	bail_out "setup-opensc.sh start (exit $st)"
fi
TOKEN_MODULE='' TOKEN_PIN=''
# shellcheck source=/dev/null
. "$CARD/token.env"
CAC=p11agent-cac
CAC_KEY="CAC ID Certificate"
make_token
SOFT=$TOKEN_LABEL
SOFT_KEY=$(key_labels | head -n 1)

# Shutdown while the watcher blocks in C_WaitForSlotEvent: an agent on the
# card alone, stopped once it is up (C_Finalize must wake the wait).
printf 'socket %s\nmodule %s\n' "$SOCK" "$TOKEN_MODULE" >"$T/card.conf"
if start_agent --config "$T/card.conf" --token "$CAC"; then
	ok "an agent on the card alone starts"
	# The watcher rests 200 ms after the first event: wait for it to block.
	waiting() { [ "$(grep -c "opensc-pkcs11.so: waiting for slot events" "$AGENT_LOG")" -ge 2 ]; }
	if wait_for "its watcher waits in C_WaitForSlotEvent" 10 waiting; then
		ok "its watcher waits in C_WaitForSlotEvent"
	fi
	if stop_agent && [ "$AGENT_RC" = 0 ]; then
		ok "it stops at once with its watcher blocked in C_WaitForSlotEvent"
	else
		not_ok "it stops at once with its watcher blocked in C_WaitForSlotEvent (rc $AGENT_RC)"
	fi
	file_lacks "$AGENT_LOG" "did not return after C_Finalize" "C_Finalize woke the blocked watcher"
	file_lacks "$AGENT_LOG" "without blocking" "the watcher was blocking (not polling)"
else
	not_ok "an agent on the card alone starts"
fi

{
	printf 'socket %s\n' "$SOCK"
	printf 'module %s\n' "$TOKEN_MODULE"
	printf 'module %s\n' "$SOFTHSM2_MODULE"
} >"$T/agent.conf"
if ! start_agent --config "$T/agent.conf" --token "$CAC" --token "$SOFT"; then
	bail_out "agent starts on OpenSC and SoftHSM2 and lists both tokens"
fi
ok "agent starts on OpenSC and SoftHSM2 and lists both tokens"

write_pin "$T/cac.pin" "$TOKEN_PIN"
write_pin "$T/soft.pin" "$USER_PIN"
check "unlock the card" p11a unlock --token "pkcs11:token=$CAC" --pin-file "$T/cac.pin"
check "unlock the SoftHSM2 token" p11a unlock --token "pkcs11:token=$SOFT" --pin-file "$T/soft.pin"
list_json || bail_out "list --json"
CAC_URI=$(json_key "$CAC_KEY" uri)
SOFT_URI=$(json_key "$SOFT_KEY" uri)
{ [ -n "$CAC_URI" ] && [ -n "$SOFT_URI" ]; } || bail_out "list shows '$CAC_KEY' and '$SOFT_KEY'"
head -c 200 /dev/urandom >"$T/msg"

# sign_with URI SCHEME OUT: one signature of $T/msg (stderr to OUT.err).
sign_with() {
	local args=(--scheme "$2" --hash sha256)
	p11a sign --key "$1" "${args[@]}" --in "$T/msg" --out "$3" 2>"$3.err"
}

check "the card signs" sign_with "$CAC_URI" rsa-pkcs1 "$T/cac.sig"
SOFT_SCHEME=rsa-pkcs1
case $(key_attr "$SOFT_KEY" type) in [Ee][Cc]) SOFT_SCHEME=ecdsa ;; esac

# ---------------------------------------------------------------- SoftHSM2 signs throughout
# One line per signature in $T/soft.log: "ok" or "FAIL <message>".
soft_loop() {
	local i=0
	while [ ! -e "$T/soft.stop" ]; do
		i=$((i + 1))
		if sign_with "$SOFT_URI" "$SOFT_SCHEME" "$T/soft.$((i % 2)).sig"; then
			echo ok
		else
			echo "FAIL $(tr '\n' ' ' <"$T/soft.$((i % 2)).sig.err")"
		fi
		sleep 0.05      # a pace for a shared machine, no synchronisation
	done >>"$T/soft.log"
}
: >"$T/soft.log"
soft_loop &
SOFT_LOOP=$!
remember_pid "$SOFT_LOOP"

soft_oks() { grep -c '^ok$' "$T/soft.log" || :; }
# soft_signed_since N: the loop has signed at least twice more since it had N.
soft_signed_since() { [ "$(soft_oks)" -ge $(($1 + 2)) ]; }
# soft_goes_on WHEN: a check that the SoftHSM2 token kept signing.
soft_goes_on() {
	local n
	n=$(soft_oks)
	if poll 20 soft_signed_since "$n"; then
		ok "SoftHSM2 token signs on $1"
	else
		not_ok "SoftHSM2 token signs on $1"
		diag_file "$T/soft.log" 5
	fi
}

# ---------------------------------------------------------------- helpers
# cac_state STATE: `p11agent status` shows the card's line with STATE.
cac_state() {
	p11a status >"$T/status.out" 2>&1 && grep -F -- "$CAC" "$T/status.out" | grep -qF -- "$1"
}
cac_listed() {
	list_json 2>/dev/null && [ "$(json_token present "$CAC")" = "$1" ]
}
# log_mark / logged_since TEXT: the agent log gained TEXT since the mark.
log_mark() { AGENT_MARK=$(stat -c %s "$AGENT_LOG"); }
# (grep reads it all: with pipefail an early exit would fail on SIGPIPE)
logged_since() { tail -c +"$((AGENT_MARK + 1))" "$AGENT_LOG" | grep -F -- "$1" >/dev/null; }

# gone_checks WHAT: after the card went (WHAT), the agent says so everywhere.
gone_checks() {
	wait_for "$1: status shows the card not present" 10 cac_state "not present" &&
		ok "$1: status shows the card not present"
	check "$1: list shows the card not present" cac_listed false
	if sign_with "$CAC_URI" rsa-pkcs1 "$T/gone.sig"; then
		not_ok "$1: a signature with the card's key fails"
	else
		ok "$1: a signature with the card's key fails"
	fi
	file_has "$T/gone.sig.err" "not present" "$1: the client is told the token is not present"
	soft_goes_on "while the card is out ($1)"
}

# back_checks WHAT [EVENT]: the card came back (WHAT): listed (seen through
# the watcher when EVENT is given: a card put back; after a pcscd restart
# OpenSC's wait may only see it late and the helper's poll finds it),
# locked, and it signs after an unlock.
back_checks() {
	wait_for "$1: list shows the card present again" 20 cac_listed true &&
		ok "$1: list shows the card present again, no restart"
	if [ -n "${2:-}" ]; then
		# The 3 s poll may list it first while the watcher rests after
		# the last event: wait for the event too.
		wait_for "$1: the helper saw it through C_WaitForSlotEvent" 10 \
			logged_since "opensc-pkcs11.so: slot " &&
			ok "$1: the helper saw it through C_WaitForSlotEvent"
	fi
	if sign_with "$CAC_URI" rsa-pkcs1 "$T/back.sig"; then
		not_ok "$1: the card is locked until unlocked"
	else
		file_has "$T/back.sig.err" "locked" "$1: the card is locked until unlocked"
	fi
	check "$1: unlock the card" p11a unlock --token "pkcs11:token=$CAC" --pin-file "$T/cac.pin"
	check "$1: the card signs again" sign_with "$CAC_URI" rsa-pkcs1 "$T/back.sig"
	check "$1: the signature verifies" openssl dgst -sha256 -verify <(openssl x509 -in "$CARD/id.pem" -noout -pubkey) \
		-signature "$T/back.sig" "$T/msg"
	soft_goes_on "after the card came back ($1)"
}

# ---------------------------------------------------------------- removed between signatures
log_mark
check "card taken out (bridge)" setup remove
wait_for "removal: the helper saw it through C_WaitForSlotEvent" 10 logged_since "opensc-pkcs11.so: slot " &&
	ok "removal: the helper saw it through C_WaitForSlotEvent"
gone_checks "removed between signatures"
log_mark
check "card put back" setup insert
back_checks "put back" event

# ---------------------------------------------------------------- removed during a signature
check "the card holds the next APDU" setup hold
sign_with "$CAC_URI" rsa-pkcs1 "$T/during.sig" &
DURING=$!
remember_pid "$DURING"
card_holds() { grep -qx held "$CARD/bridge.log"; }
wait_for "a signature is under way on the card (APDU held)" 20 card_holds &&
	ok "a signature is under way on the card (APDU held)"
if pid_gone "$DURING"; then
	not_ok "the signature waits for the card"
else
	ok "the signature waits for the card"
fi
log_mark
check "card taken out during the signature" setup remove
if wait_gone "$DURING" 20; then
	ok "the signature under way ends when the card goes"
	if wait "$DURING"; then not_ok "that signature fails"; else ok "that signature fails"; fi
	file_has "$T/during.sig.err" "not present" "the client is told the token is not present"
else
	not_ok "the signature under way ends when the card goes (within 20 s)"
fi
forget_pid "$DURING"
gone_checks "removed during a signature"
log_mark
check "card put back" setup insert
back_checks "put back after a signature" event

# ---------------------------------------------------------------- pcscd restarted
check "pcscd stopped (by PID)" setup stop-pcscd
gone_checks "pcscd stopped"
log_mark
check "pcscd started again" setup start-pcscd
back_checks "pcscd restarted"
log_mark
check "card taken out after the pcscd restart" setup remove
wait_for "after the pcscd restart: status shows the card not present" 10 cac_state "not present" &&
	ok "after the pcscd restart: status shows the card not present"
check "card put back after the pcscd restart" setup insert
back_checks "put back after the pcscd restart" event

# ---------------------------------------------------------------- the end
touch "$T/soft.stop"
wait_gone "$SOFT_LOOP" 20 || diag "the SoftHSM2 loop did not stop"
forget_pid "$SOFT_LOOP"
is "$(grep -c '^FAIL' "$T/soft.log" || :)" 0 "no SoftHSM2 signature failed ($(soft_oks) made)"
grep '^FAIL' "$T/soft.log" | head -n 3 | while read -r l; do diag "$l"; done
if stop_agent && [ "$AGENT_RC" = 0 ]; then
	ok "the agent stops cleanly (its watcher polling since pcscd went)"
else
	not_ok "the agent stops cleanly (its watcher polling since pcscd went) (rc $AGENT_RC)"
fi
file_lacks "$AGENT_LOG" "did not return after C_Finalize" "the watcher ended after C_Finalize"
done_testing
