#!/bin/bash
# t_faults: token faults injected by tests/fault/libp11afault.so, a PKCS#11
# module that wraps SoftHSM2 and fails chosen calls as a control file says.
#
# Two instances of it run in the agent, each showing one token of the same
# SoftHSM2 store: "faulty" (token p11agent-test, control file $CTL) takes
# the faults; "steady" (token p11agent-two, no faults) proves the agent
# keeps serving other tokens.  For every fault: the agent stays up, the
# affected client gets a specific error before its deadline, the other
# token keeps signing, and the faulty token signs again afterwards (after
# an unlock where the token lost its login).  The agent runs with
# sign-timeout 3.
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"

require_cmd openssl pkcs11-tool softhsm2-util timeout "$PYTHON3"
require_agent_binaries
make_token
fault_setup "EC:prime256v1 21 two-ec"
echo "debug yes" >>"$T/agent.conf"
pkcs11-tool --module "$SOFTHSM2_MODULE" --token-label "$TWO_LABEL" --read-object --type pubkey \
	--id 21 -o "$T/two.pub.der" >/dev/null 2>&1 || bail_out "second token's public key read"

# ---------------------------------------------------------------- helpers

# set_ctl LINE...: the faulty module's control file, replaced at once.
set_ctl() {
	printf '%s\n' "$@" >"$CTL.new"
	mv -f "$CTL.new" "$CTL"
}

# tok FIELD [LABEL]: a field of a token in a fresh `list --json`.
tok() {
	list_json && json_token "$1" "${2:-}"
}

# tok_is FIELD VALUE [LABEL]: the token's FIELD is VALUE in a fresh listing.
tok_is() {
	[ "$(tok "$1" "${3:-}" 2>/dev/null)" = "$2" ]
}

# wait_tok FIELD VALUE SECONDS [LABEL]: until the token's FIELD is VALUE.
wait_tok() {
	poll "$3" tok_is "$1" "$2" "${4:-}"
}

# fired FUNC: the faulty module has taken FUNC's "once" rule (it deletes
# the line from the control file when the call comes in, before a delay
# or a hang begins).
fired() {
	! grep -q "^$1=" "$CTL"
}

# returned FUNC RV N: the faulty module has logged more than N calls of
# FUNC that returned RV (0x%08lx, as in CONTROL.calls).
returned() {
	[ "$(grep -c "^$1 rv=$2\$" "$CTL.calls" 2>/dev/null || true)" -gt "$3" ]
}

echo "message to sign $$" >"$T/msg"

# sign_a / sign_b: sign $T/msg with the faulty / steady key;
# $rc, $T/stdout, $T/stderr as run; $elapsed in ms.
elapsed=0
timed_run() {
	local t0 t1
	t0=$(date +%s%N)
	run "$@"
	t1=$(date +%s%N)
	elapsed=$(((t1 - t0) / 1000000))
}
sign_a() {
	timed_run timeout "$CLI_TIMEOUT" "$P11AGENT" --socket "$SOCK" sign --key "$KEY_A" \
		--scheme ecdsa --hash sha256 --in "$T/msg" --out "$T/sig.a"
}
sign_b() {
	timed_run timeout "$CLI_TIMEOUT" "$P11AGENT" --socket "$SOCK" sign --key "$KEY_B" \
		--scheme ecdsa --hash sha256 --in "$T/msg" --out "$T/sig.b"
}
verify_a() {
	openssl dgst -sha256 -verify "$TOKDIR/ec256.pub.pem" -signature "$T/sig.a" "$T/msg"
}
verify_b() {
	openssl dgst -sha256 -verify "$T/two.pub.der" -keyform DER -signature "$T/sig.b" "$T/msg"
}

# still_serving WHAT: the agent runs and the steady token signs (fast).
still_serving() {
	check "$1: agent still running" running "$AGENT_PID"
	sign_b
	if [ "$rc" -eq 0 ] && verify_b >/dev/null 2>&1 && [ "$elapsed" -lt 2000 ]; then
		ok "$1: the other token still signs (${elapsed} ms)"
	else
		not_ok "$1: the other token still signs"
		diag "elapsed ${elapsed} ms"
		diag_last
	fi
}

# sign_ok WHAT: the faulty token signs and the signature verifies.
sign_ok() {
	sign_a
	if [ "$rc" -eq 0 ] && verify_a >/dev/null 2>&1; then
		ok "$1"
	else
		not_ok "$1"
		diag_last
	fi
}

# sign_fails_with TEXT WITHIN_MS WHAT: the faulty key's SIGN fails, saying TEXT, in time.
sign_fails_with() {
	sign_a
	if [ "$rc" -ne 0 ] && grep -qiF -- "$1" "$T/stderr" && [ "$elapsed" -lt "$2" ]; then
		ok "$3"
		diag "$(grep -v ': warning: ' "$T/stderr" | head -n 1) (${elapsed} ms)"
	else
		not_ok "$3"
		diag "expected a failure saying '$1' within $2 ms; took ${elapsed} ms"
		diag_last
	fi
}

unlock_a() {
	write_pin "$T/pin" "$USER_PIN"
	run p11a unlock --token "pkcs11:token=$TOKEN_LABEL" --pin-file "$T/pin"
}

helpers_now() {
	child_pid_list "$AGENT_PID"
}

# ---------------------------------------------------------------- start
start_agent --config "$T/agent.conf" --token "$TOKEN_LABEL" --token "$TWO_LABEL" ||
	bail_out "agent lists both tokens through the fault module"
ok "agent lists both tokens through the fault module"
KEY_A=$(json_key ec256 uri)
KEY_B=$(json_key two-ec uri)
if [ -z "$KEY_A" ] || [ -z "$KEY_B" ]; then
	bail_out "both test keys listed"
fi
is "$(tok module)" faulty.so "token $TOKEN_LABEL comes through the faulty module"
is "$(tok module "$TWO_LABEL")" steady.so "token $TWO_LABEL comes through the steady module"

unlock_a
rc_is 0 "unlock the faulty token"
run p11a unlock --token "pkcs11:token=$TWO_LABEL" --pin-file "$T/pin"
rc_is 0 "unlock the steady token"
sign_ok "baseline: the faulty token signs"
still_serving "baseline"

# ---------------------------------------------------------------- device removed in C_Sign
set_ctl "C_Sign=CKR_DEVICE_REMOVED once"
sign_fails_with "not present" 5000 "C_Sign CKR_DEVICE_REMOVED: client gets 'not present'"
still_serving "C_Sign CKR_DEVICE_REMOVED"
# The token did not really go: the next request finds it again.
sign_a_ok() {
	sign_a
	[ "$rc" -eq 0 ]
}
if poll 5 sign_a_ok; then ok_after=yes; else ok_after=no; fi
is "$ok_after" yes "C_Sign CKR_DEVICE_REMOVED: the token signs again when it answers again"

# ---------------------------------------------------------------- token not present in C_SignInit
set_ctl "C_SignInit=CKR_TOKEN_NOT_PRESENT once"
sign_fails_with "not present" 5000 "C_SignInit CKR_TOKEN_NOT_PRESENT: client gets 'not present'"
still_serving "C_SignInit CKR_TOKEN_NOT_PRESENT"
wait_tok present true 10 || true
sign_ok "C_SignInit CKR_TOKEN_NOT_PRESENT: the token signs again"

# ---------------------------------------------------------------- session lost
set_ctl "C_Sign=CKR_SESSION_HANDLE_INVALID once"
sign_fails_with "session" 5000 "C_Sign CKR_SESSION_HANDLE_INVALID: client gets 'session lost'"
sign_ok "CKR_SESSION_HANDLE_INVALID: the next signature works on a new session"
set_ctl "C_SignInit=CKR_SESSION_CLOSED once"
sign_fails_with "session" 5000 "C_SignInit CKR_SESSION_CLOSED: client gets 'session lost'"
sign_ok "CKR_SESSION_CLOSED: the next signature works on a new session"
still_serving "session lost"

# ---------------------------------------------------------------- C_Sign fails, operation left open
# "leave-active": the fault module answers without finishing SoftHSM2's
# operation, so the real session keeps it active, as a non-conformant
# module would after an error: that session must not be lent out again.
set_ctl "C_Sign=CKR_FUNCTION_FAILED once leave-active"
sign_fails_with "CKR_FUNCTION_FAILED" 5000 "C_Sign CKR_FUNCTION_FAILED: client gets the PKCS#11 error"
sign_ok "C_Sign CKR_FUNCTION_FAILED: the next signature works (the session was not reused)"
sign_ok "C_Sign CKR_FUNCTION_FAILED: and the one after"

# ---------------------------------------------------------------- not logged in
set_ctl "C_Sign=CKR_USER_NOT_LOGGED_IN once"
sign_fails_with "unlock" 5000 "C_Sign CKR_USER_NOT_LOGGED_IN: client is told to unlock"
still_serving "C_Sign CKR_USER_NOT_LOGGED_IN"
unlock_a
rc_is 0 "CKR_USER_NOT_LOGGED_IN: unlock succeeds"
sign_ok "CKR_USER_NOT_LOGGED_IN: signs after the unlock"

# ---------------------------------------------------------------- pulled between signs
helpers_before=$(helpers_now)
init_before=$(calls C_Initialize)
set_ctl "removed=1"
if wait_tok present false 10; then
	ok "token pulled between signs: listed as not present within 10 s"
else
	not_ok "token pulled between signs: listed as not present within 10 s"
	diag_file "$T/list.json" 5
fi
is "$(json_key ec256 uri)" "$KEY_A" "token pulled: its key stays listed (sticky state)"
sign_fails_with "not present" 2000 "token pulled: SIGN fails fast with 'not present'"
unlock_a
if [ "$rc" -ne 0 ] && grep -qi "not present" "$T/stderr"; then
	ok "token pulled: unlock fails with 'not present'"
else
	not_ok "token pulled: unlock fails with 'not present'"
	diag_last
fi
still_serving "token pulled"

# ---------------------------------------------------------------- reinsertion
set_ctl ""
if wait_tok present true 10; then
	ok "token reinserted: listed as present within 10 s"
else
	not_ok "token reinserted: listed as present within 10 s"
fi
is "$(tok logged_in)" false "token reinserted: not logged in (a pulled card forgets its login)"
sign_fails_with "unlock" 5000 "token reinserted: SIGN says CKR_USER_NOT_LOGGED_IN as 'run p11agent unlock'"
unlock_a
rc_is 0 "token reinserted: unlock succeeds"
sign_ok "token reinserted: signs again after unlock"
is "$(helpers_now)" "$helpers_before" "token pulled and reinserted: no helper was restarted"
is "$(calls C_Initialize)" "$init_before" "token pulled and reinserted: the module was not initialized again"

# ---------------------------------------------------------------- pulled mid-sign
set_ctl "C_Sign=delay:1500 once"
sign_a &
bg=$!
# Pull the token while that C_Sign is in its delay.
wait_for "token pulled mid-sign: the delayed C_Sign began" 10 fired C_Sign || true
set_ctl "removed=1"
wait "$bg" || true
# The background run left its result in $T/stderr; read it as sign_fails_with would.
if grep -qiF "not present" "$T/stderr"; then
	ok "token pulled mid-sign: that client gets 'not present'"
	diag "$(grep -v ': warning: ' "$T/stderr" | head -n 1)"
else
	not_ok "token pulled mid-sign: that client gets 'not present'"
	diag_file "$T/stderr"
fi
wait_tok present false 10 || true
sign_fails_with "not present" 2000 "token pulled mid-sign: the next SIGN fails fast"
still_serving "token pulled mid-sign"
set_ctl ""
wait_tok present true 10 || true
unlock_a
rc_is 0 "token pulled mid-sign, reinserted: unlock succeeds"
sign_ok "token pulled mid-sign, reinserted: signs again"

# ---------------------------------------------------------------- PINs
run p11a lock --token "pkcs11:token=$TOKEN_LABEL"
rc_is 0 "lock the faulty token for the PIN cases"
n0=$(calls C_Login)
set_ctl "C_Login=CKR_PIN_INCORRECT flags=count_low"
unlock_a
if [ "$rc" -ne 0 ] && grep -qi "PIN incorrect" "$T/stderr" && grep -qi "count low" "$T/stderr"; then
	ok "CKR_PIN_INCORRECT with CKF_USER_PIN_COUNT_LOW: 'PIN incorrect ... count low'"
	diag "$(grep -v ': warning: ' "$T/stderr" | head -n 1)"
else
	not_ok "CKR_PIN_INCORRECT with CKF_USER_PIN_COUNT_LOW: 'PIN incorrect ... count low'"
	diag_last
fi
is "$(tok pin_count_low)" true "count low: the token is listed with pin_count_low"
set_ctl "C_Login=CKR_PIN_INCORRECT flags=final_try"
unlock_a
if [ "$rc" -ne 0 ] && grep -qi "final try" "$T/stderr"; then
	ok "CKR_PIN_INCORRECT with CKF_USER_PIN_FINAL_TRY: 'final try'"
	diag "$(grep -v ': warning: ' "$T/stderr" | head -n 1)"
else
	not_ok "CKR_PIN_INCORRECT with CKF_USER_PIN_FINAL_TRY: 'final try'"
	diag_last
fi
set_ctl "C_Login=CKR_PIN_LOCKED flags=locked"
unlock_a
if [ "$rc" -ne 0 ] && grep -qi "locked" "$T/stderr" && ! grep -qi "PIN incorrect" "$T/stderr"; then
	ok "CKR_PIN_LOCKED: 'PIN ... locked'"
	diag "$(grep -v ': warning: ' "$T/stderr" | head -n 1)"
else
	not_ok "CKR_PIN_LOCKED: 'PIN ... locked'"
	diag_last
fi
is "$(tok pin_locked)" true "PIN locked: the token is listed with pin_locked"
# Time for the helper's periodic checks: a wrong PIN must not be retried by
# anybody.  This sleep is the test (nothing happens that could be awaited).
sleep $((SIGN_TIMEOUT + 4))
is "$(calls C_Login)" "$((n0 + 3))" "three failed unlocks reached C_Login exactly three times (a wrong PIN is never sent twice)"
still_serving "wrong PINs"
set_ctl ""
# The CLI refuses to send a PIN to a token listed as PIN-locked: wait for the
# agent's periodic check to see the flag go.
if wait_tok pin_locked false 10; then
	ok "PIN lock cleared on the token: the agent lists it without pin_locked within 10 s"
else
	not_ok "PIN lock cleared on the token: the agent lists it without pin_locked within 10 s"
fi
unlock_a
rc_is 0 "after the PIN faults, the right PIN unlocks"
is "$(calls C_Login)" "$((n0 + 4))" "and that was one more C_Login"
sign_ok "after the PIN faults, the token signs"

# ---------------------------------------------------------------- C_Sign hangs
set_ctl "C_Sign=hang once"
hang_t0=$(date +%s%N)
(
	if timeout 40 "$P11AGENT" --socket "$SOCK" --timeout 20 sign --key "$KEY_A" --scheme ecdsa \
		--hash sha256 --in "$T/msg" --out "$T/sig.hang" >"$T/hang.out" 2>"$T/hang.err"; then
		echo 0 >"$T/hang.rc"
	else
		echo $? >"$T/hang.rc"
	fi
	date +%s%N >"$T/hang.t1"
) &
hang_bg=$!
wait_for "C_Sign hangs: the C_Sign took the hang" 10 fired C_Sign || true
still_serving "C_Sign hangs"
sign_ok "C_Sign hangs in one session: the same token signs on another session"
wait "$hang_bg" || true
hang_ms=$((($(cat "$T/hang.t1") - hang_t0) / 1000000))
hang_rc=$(cat "$T/hang.rc")
if [ "$hang_rc" -ne 0 ] && [ "$hang_ms" -lt $(((SIGN_TIMEOUT + 3) * 1000)) ] &&
	grep -qiE "did not finish signing within|did not answer|deadline" "$T/hang.err"; then
	ok "C_Sign hangs: the client gets a timeout error from the agent near sign-timeout ${SIGN_TIMEOUT} s, before its own 20 s (${hang_ms} ms)"
	diag "$(head -n 1 "$T/hang.err")"
else
	not_ok "C_Sign hangs: the client gets a timeout error from the agent near sign-timeout ${SIGN_TIMEOUT} s, before its own 20 s (${hang_ms} ms)"
	diag "exit $hang_rc after ${hang_ms} ms"
	diag_file "$T/hang.err"
fi
# CKR_DEVICE_ERROR (0x30) is what a released hang returns.
hung_done=$(grep -c '^C_Sign rv=0x00000030$' "$CTL.calls" || true)
set_ctl "unhang"
wait_for "C_Sign released: the hung call returns" 10 returned C_Sign 0x00000030 "$hung_done" || true
set_ctl ""
sign_ok "C_Sign released: the token signs"

# ---------------------------------------------------------------- UNLOCK past the deadline
# The agent answers TIMEOUT at sign-timeout while the helper is still in
# C_Login: the answer must not claim a plain failure, and the login that
# ends later shows in the token's state.
check "lock before the slow unlock" p11a lock --token "pkcs11:token=$TOKEN_LABEL"
set_ctl "C_Login=delay:$(((SIGN_TIMEOUT + 2) * 1000)) once"
write_pin "$T/pin" "$USER_PIN"
run p11a unlock --token "pkcs11:token=$TOKEN_LABEL" --pin-file "$T/pin"
rc_is 1 "UNLOCK whose C_Login takes longer than sign-timeout fails at the deadline"
stderr_has "still in progress and may yet succeed" "UNLOCK past the deadline says it may still complete"
if wait_tok logged_in true 10; then
	ok "the unlock that timed out completed later: the token is listed as logged in"
else
	not_ok "the unlock that timed out completed later: the token is listed as logged in"
fi
set_ctl ""
sign_ok "after the slow unlock: the token signs"

# ---------------------------------------------------------------- a client that never reads, and a hang
# The watchdog answers the stuck channel without writing under the lock
# that every other channel of the helper needs (hostile.py stall).
set_ctl ""
hostile stall "$SOCK" "$KEY_A" "$CTL"
set_ctl ""
still_serving "a stalled reader and a hung C_Sign"
sign_ok "after the stalled reader: the token signs"

# ---------------------------------------------------------------- C_Sign aborts the process
helpers_before=$(helpers_now)
init_before=$(calls C_Initialize)
set_ctl "C_Sign=abort once"
sign_a
# The client's retry on a new channel gets the agent's HELPER error.  Two
# races end in a local I/O error instead, both immediate: the client saw
# the channel reset rather than closed (no retry; seen under ASan), or its
# one retry got a channel to the dying helper (Broken pipe; seen once under
# a loaded full `make check`).  Never "no such key".
if [ "$rc" -ne 0 ] && [ "$elapsed" -lt 10000 ] &&
	grep -qiE "token helper .* (is restarting|is being restarted)|reset by peer|broken pipe" "$T/stderr" &&
	! grep -qi "no such key" "$T/stderr"; then
	ok "C_Sign aborts the helper: the client gets a 'token helper restarting' error at once (${elapsed} ms)"
	diag "$(grep -v ': warning: ' "$T/stderr" | head -n 1)"
else
	not_ok "C_Sign aborts the helper: the client gets a 'token helper restarting' error at once"
	diag "elapsed ${elapsed} ms"
	diag_last
fi
still_serving "C_Sign aborts the helper"
# helper_back: the faulty module was initialized again and shows its token.
helper_back() {
	[ "$(calls C_Initialize)" -gt "$init_before" ] && tok_is present true
}
if poll 10 helper_back; then restarted=yes; else restarted=no; fi
is "$restarted" yes "C_Sign aborts the helper: the helper is restarted and lists the token again"
if [ "$(helpers_now)" != "$helpers_before" ]; then
	ok "the faulty module's helper has a new pid"
else
	not_ok "the faulty module's helper has a new pid"
fi
AGENT_HELPERS=$(helpers_now)
if ls "$T"/core* "$top_builddir"/core* >/dev/null 2>&1; then
	not_ok "no core file after the helper aborted"
else
	ok "no core file after the helper aborted"
fi
unlock_a
rc_is 0 "after the restart: unlock"
sign_ok "after the restart: the token signs"

# ---------------------------------------------------------------- slow token
set_ctl "C_Sign=delay:100"
t0=$(date +%s%N)
slow_fail=0
for _ in 1 2 3 4 5; do
	sign_a
	[ "$rc" -eq 0 ] || slow_fail=$((slow_fail + 1))
done
t1=$(date +%s%N)
slow_ms=$(((t1 - t0) / 1000000))
if [ "$slow_fail" -eq 0 ] && [ "$slow_ms" -ge 500 ]; then
	ok "slow token (100 ms per C_Sign): 5 signatures, all good (${slow_ms} ms)"
else
	not_ok "slow token (100 ms per C_Sign): 5 signatures, all good"
	diag "$slow_fail failed, ${slow_ms} ms"
fi
# Four slow signers in parallel with the other token.
for i in 1 2 3 4; do
	(
		for _ in 1 2 3; do
			timeout "$CLI_TIMEOUT" "$P11AGENT" --socket "$SOCK" sign --key "$KEY_A" --scheme ecdsa \
				--hash sha256 --in "$T/msg" --out "$T/sig.par$i" || exit 1
		done
	) &
	eval "par$i=\$!"
done
still_serving "slow token with 4 parallel signers"
par_fail=0
for i in 1 2 3 4; do
	eval "p=\$par$i"
	wait "$p" || par_fail=$((par_fail + 1))
done
is "$par_fail" 0 "slow token: 4 parallel signers x 3 signatures all succeed"
set_ctl ""

check "agent still running after every fault" running "$AGENT_PID"
stop_agent
is "$AGENT_RC" 0 "agent exits 0 on SIGTERM after the faults"
done_testing
