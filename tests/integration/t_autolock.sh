#!/bin/bash
# t_autolock: automatic locking (issue 13, "Locking").  idle-lock locks a
# token after a time without a signature, and a steady signer keeps it
# unlocked; pin-ttl locks a time after the unlock whatever the use; both
# are off by default; a bad duration is FILE:LINE and no start; SIGHUP
# and `p11agent lock` lock every token of every module at once and the
# agent goes on serving; `p11agent unlock` works again after each.
#
# Waiting out an idle time or a PIN's time is the subject here, so those
# waits are real time; every wait for the agent's reaction is a poll.
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"

require_cmd openssl pkcs11-tool softhsm2-util timeout awk "$PYTHON3"
require_agent_binaries
make_token
head -c 300 /dev/urandom >"$T/msg"
write_pin "$T/pin" "$USER_PIN"

THREE_LABEL=p11agent-three
CTL_C=$T/ctl-third

# logged_in [LABEL]: true/false for the token in a fresh listing.
logged_in() {
	list_json >/dev/null 2>&1 && json_token logged_in "${1:-$TOKEN_LABEL}"
}
is_locked() { [ "$(logged_in "${1:-}")" = false ]; }

# sign_with URI: one ECDSA signature (run: $rc, $T/stderr).
sign_with() {
	run p11a sign --key "$1" --scheme ecdsa --hash sha256 --in "$T/msg" --out "$T/sig"
}

# sign_locked DESC URI: signing is refused as after `p11agent lock`.
sign_locked() {
	sign_with "$2"
	rc_is 1 "$1: sign exits 1"
	stderr_has "is locked: run 'p11agent unlock'" "$1: sign says the token is locked"
}

# ms_since START_US: milliseconds from START_US (now_us) to now.
ms_since() {
	echo $((($(now_us) - $1) / 1000))
}

# ---------------------------------------------------------------- configuration

A=$P11AGENT_SYSCONFDIR/p11agent/p11agentd.conf
U=$T/user.conf
mkdir -p "$(dirname "$A")"
: >"$U"
run "$P11AGENTD" --config "$U" --print-config
rc_is 0 "--print-config with no setting exits 0"
stdout_has "idle-lock off	# default" "idle-lock is off by default"
stdout_has "pin-ttl off	# default" "pin-ttl is off by default"

printf 'debug no\nidle-lock 5\npin-ttl 90s\n' >"$U"
run "$P11AGENTD" --config "$U" --print-config
rc_is 0 "--print-config with idle-lock and pin-ttl exits 0"
stdout_has "idle-lock 5m	# $U:2" "a plain number is minutes, shown with its line"
stdout_has "pin-ttl 90s	# $U:3" "seconds with 's', shown with its line"

for bad in 5x 1.5m -1 on 169h 2ms; do
	printf 'debug no\nidle-lock %s\n' "$bad" >"$U"
	run "$P11AGENTD" --config "$U" --print-config
	if [ "$rc" -ne 0 ] && grep -qF "$U:2: idle-lock must be" "$T/stderr"; then
		ok "idle-lock '$bad' refused as FILE:LINE"
	else
		not_ok "idle-lock '$bad' refused as FILE:LINE"
		diag_last
	fi
done
printf '\n\npin-ttl forever\n' >"$U"
run "$P11AGENTD" --config "$U" --print-config
stderr_has "$U:3: pin-ttl must be" "pin-ttl 'forever' refused as FILE:LINE"

# A bad duration keeps the agent from starting at all.
printf 'idle-lock 2 s\n' >"$U"
run timeout 20 "$P11AGENTD" --foreground --config "$U" --socket "$T/bad.sock" --module "$SOFTHSM2_MODULE"
if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && [ ! -e "$T/bad.sock" ]; then
	ok "the agent does not start with a bad idle-lock"
else
	not_ok "the agent does not start with a bad idle-lock"
	diag_last
fi
stderr_has "$U:1: idle-lock must be" "the agent names the file and line"

# The administrator's values and locks.
printf 'idle-lock 10m\npin-ttl 8h\nlock idle-lock pin-ttl\n' >"$A"
: >"$U"
run "$P11AGENTD" --config "$U" --print-config
stdout_has "idle-lock 10m	# $A:1; locked at $A:3" "the administrator's idle-lock and its lock"
stdout_has "pin-ttl 8h	# $A:2; locked at $A:3" "the administrator's pin-ttl and its lock"
printf 'debug no\npin-ttl off\n' >"$U"
run "$P11AGENTD" --config "$U" --print-config
if [ "$rc" -ne 0 ] && grep -qF "$U:2: 'pin-ttl' is locked by the administrator ($A:3)" "$T/stderr"; then
	ok "a user's pin-ttl against the administrator's lock is refused"
else
	not_ok "a user's pin-ttl against the administrator's lock is refused"
	diag_last
fi
rm -f "$A" "$U"

# ---------------------------------------------------------------- idle-lock

cat >"$T/idle.conf" <<EOF
module $SOFTHSM2_MODULE
idle-lock 2s
EOF
start_agent --config "$T/idle.conf" || bail_out "agent starts with idle-lock 2s"
ok "agent starts with idle-lock 2s"
key=$(key_uri ec256)

# Unlocked and left alone: locked once 2 s have passed, not before.
t0=$(now_us)
check "idle-lock: unlock" unlock_token
if wait_for "idle-lock: the unused token is locked" 10 is_locked; then
	ms=$(ms_since "$t0")
	ok "idle-lock: the unused token is locked"
	if [ "$ms" -ge 1800 ]; then
		ok "idle-lock: not before the idle time ($ms ms)"
	else
		not_ok "idle-lock: not before the idle time ($ms ms)"
	fi
fi
file_has "$AGENT_LOG" "token '$TOKEN_LABEL' locked: idle for 2s" "idle-lock: the log names the token and why"
sign_locked "idle-lock" "$key"

# A steady signer (a signature every 0.4 s) keeps it unlocked for 5 s, more than twice the idle time.
check "idle-lock: unlock again after the automatic lock" unlock_token
t0=$(now_us)
signs=0 failed=0
while [ "$(ms_since "$t0")" -lt 5000 ]; do
	sign_with "$key"
	if [ "$rc" -eq 0 ]; then signs=$((signs + 1)); else failed=$((failed + 1)); diag_last; fi
	sleep 0.4
done
is "$failed" 0 "idle-lock: every signature of the steady signer succeeded ($signs in 5 s)"
is "$(logged_in)" true "idle-lock: the token is still unlocked after 5 s of steady signing"
check "idle-lock: the last signature verifies" \
	openssl dgst -sha256 -verify "$TOKDIR/ec256.pub.pem" -signature "$T/sig" "$T/msg"
# The signer stops: locked 2 s after its last signature.
t0=$(now_us)
if wait_for "idle-lock: locked once the signer stops" 10 is_locked; then
	ok "idle-lock: locked once the signer stops ($(ms_since "$t0") ms)"
fi
sign_locked "idle-lock after the signer stopped" "$key"
stop_agent

# ---------------------------------------------------------------- pin-ttl

cat >"$T/ttl.conf" <<EOF
module $SOFTHSM2_MODULE
pin-ttl 3s
EOF
start_agent --config "$T/ttl.conf" || bail_out "agent starts with pin-ttl 3s"
ok "agent starts with pin-ttl 3s"
check "pin-ttl: unlock" unlock_token
t0=$(now_us)
signs=0 refused=0 locked_at=
# Sign every 0.3 s: the token is locked 3 s after the unlock all the same.
while [ "$(ms_since "$t0")" -lt 12000 ]; do
	sign_with "$key"
	if [ "$rc" -eq 0 ]; then
		signs=$((signs + 1))
	elif grep -qF "is locked: run 'p11agent unlock'" "$T/stderr"; then
		locked_at=$(ms_since "$t0")
		break
	else
		refused=$((refused + 1))
		diag_last
	fi
	sleep 0.3
done
is "$refused" 0 "pin-ttl: no signature failed for another reason"
if [ -n "$locked_at" ] && [ "$locked_at" -ge 2500 ] && [ "$signs" -ge 4 ]; then
	ok "pin-ttl: locked under steady signing after $locked_at ms ($signs signatures before)"
else
	not_ok "pin-ttl: locked under steady signing about 3 s after the unlock"
	diag "locked after: ${locked_at:-never} ms; signatures before: $signs"
	diag_file "$AGENT_LOG" 20
fi
is "$(logged_in)" false "pin-ttl: list shows the token locked"
file_has "$AGENT_LOG" "token '$TOKEN_LABEL' locked: PIN kept 3s" "pin-ttl: the log names the token and why"
check "pin-ttl: unlock again after the automatic lock" unlock_token
sign_with "$key"
rc_is 0 "pin-ttl: signing works after the new unlock"
stop_agent

# ---------------------------------------------------------------- lock everything

# Three modules (the fault module over SoftHSM2, passing everything
# through), one token each; no idle-lock, no pin-ttl.
fault_setup "EC:prime256v1 21 two-ec"
if ! TWO_LABEL=$THREE_LABEL token_two "EC:prime256v1 31 three-ec" >"$T/three.log" 2>&1; then
	diag_file "$T/three.log"
	bail_out "third SoftHSM2 token made"
fi
: >"$CTL_C"
cp "$T/faulty.so" "$T/third.so"
cat >>"$T/agent.conf" <<EOF
module $T/third.so
module-init-args control=$CTL_C label=$THREE_LABEL
EOF
log_mark=$(wc -l <"$AGENT_LOG")
start_agent --config "$T/agent.conf" --token "$TOKEN_LABEL" --token "$TWO_LABEL" --token "$THREE_LABEL" ||
	bail_out "agent starts with three modules"
ok "agent starts with three modules, one token each"
declare -A KEY=([$TOKEN_LABEL]=ec256 [$TWO_LABEL]=two-ec [$THREE_LABEL]=three-ec)
declare -A URI=()
for l in "$TOKEN_LABEL" "$TWO_LABEL" "$THREE_LABEL"; do
	URI[$l]=$(key_uri "${KEY[$l]}")
done
labels=("$TOKEN_LABEL" "$TWO_LABEL" "$THREE_LABEL")

unlock_all() {
	local l
	for l in "${labels[@]}"; do
		run p11a unlock --token "pkcs11:token=$l" --pin-file "$T/pin"
		rc_is 0 "$1: unlock $l"
	done
}
all_locked() {
	local l
	list_json >/dev/null 2>&1 || return 1
	for l in "${labels[@]}"; do
		[ "$(json_token logged_in "$l")" = false ] || return 1
	done
}
all_unlocked() {
	local l
	list_json >/dev/null 2>&1 || return 1
	for l in "${labels[@]}"; do
		[ "$(json_token logged_in "$l")" = true ] || return 1
	done
}

unlock_all "defaults"
# Off by default: longer than any idle time above, nothing is locked.
sleep 4
check "defaults: every token is still unlocked after 4 s without a signature" all_unlocked
tail -n +$((log_mark + 1)) "$AGENT_LOG" >"$T/log3"
file_lacks "$T/log3" "locked: " "defaults: no automatic lock in the log"

# SIGHUP locks every token of every module, and the agent goes on.
kill -HUP "$AGENT_PID"
if wait_for "SIGHUP: every token locked" 10 all_locked; then
	ok "SIGHUP: every token of the three modules is locked"
fi
check "SIGHUP: the agent is still running" running "$AGENT_PID"
check "SIGHUP: the agent still answers status" p11a status
file_has "$AGENT_LOG" "SIGHUP: locking every token (3 module(s))" "SIGHUP: logged"
for l in "${labels[@]}"; do
	sign_locked "SIGHUP, $l" "${URI[$l]}"
done
unlock_all "after SIGHUP"
for l in "${labels[@]}"; do
	sign_with "${URI[$l]}"
	rc_is 0 "after SIGHUP and unlock: $l signs"
done
is "$(child_pid_list "$AGENT_PID")" "$AGENT_HELPERS" "after SIGHUP: the helpers were not restarted"

# `p11agent lock` with no --token: every token of every module.
run p11a lock
rc_is 0 "lock with no --token exits 0"
check "lock with no --token: every token of the three modules is locked" all_locked
for l in "${labels[@]}"; do
	sign_locked "lock, $l" "${URI[$l]}"
done
unlock_all "after lock"
check "after lock and unlock: every token is unlocked" all_unlocked
stop_agent
is "$AGENT_RC" 0 "the agent stops cleanly on SIGTERM"

# ---------------------------------------------------------------- per module
# idle-lock and pin-ttl in a [module] section: that module's tokens only,
# over the global value; shown per module by --print-config.
cat >"$T/permod.conf" <<EOF
debug no
module $SOFTHSM2_MODULE
idle-lock off
pin-ttl 8h

[module $SOFTHSM2_MODULE]
idle-lock 2s
EOF
run "$P11AGENTD" --config "$T/permod.conf" --print-config
rc_is 0 "--print-config with a [module] idle-lock exits 0"
stdout_has "idle-lock 2s	# $T/permod.conf:7" "the module's idle-lock, with its line"
stdout_has "pin-ttl 8h	# $T/permod.conf:4" "the module inherits the global pin-ttl"
printf '[module %s]\npin-ttl forever\n' "$SOFTHSM2_MODULE" >"$T/permod-bad.conf"
run "$P11AGENTD" --config "$T/permod-bad.conf" --print-config
stderr_has "$T/permod-bad.conf:2: pin-ttl must be" "a bad [module] pin-ttl is refused as FILE:LINE"
idle_lines() { grep -c "token '$TOKEN_LABEL' locked: idle for 2s" "$AGENT_LOG" || true; }
n0=$(idle_lines)
start_agent --config "$T/permod.conf" || bail_out "agent starts with a [module] idle-lock"
ok "agent starts with idle-lock off and a [module] idle-lock 2s"
write_pin "$T/pin" "$USER_PIN"
check "per module: unlock" p11a unlock --token "pkcs11:token=$TOKEN_LABEL" --pin-file "$T/pin"
if wait_for "per module: the unused token is locked by its module's idle-lock" 10 is_locked; then
	ok "per module: the unused token is locked by its module's idle-lock"
fi
is "$(idle_lines)" "$((n0 + 1))" "per module: the log names the token and why"
stop_agent
is "$AGENT_RC" 0 "per module: the agent stops cleanly"

done_testing
