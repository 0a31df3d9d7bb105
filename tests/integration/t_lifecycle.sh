#!/bin/bash
# t_lifecycle: the CLI without an agent, clean exit on SIGTERM, daemon mode
# and its eval-able output, a second agent on a live socket, a crashed
# helper, a stopped agent and --timeout, and --help/usage exit codes.
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"

require_cmd openssl pkcs11-tool softhsm2-util timeout "$PYTHON3"
require_agent_binaries
make_token

# ---------------------------------------------------------------- --help and usage errors
run "$P11AGENT" --help
rc_is 0 "p11agent --help exits 0"
stdout_has "Usage" "p11agent --help prints a usage text"
for verb in status list unlock lock sign pubkey export-cert env; do
	run "$P11AGENT" "$verb" --help
	rc_is 0 "p11agent $verb --help exits 0"
	if [ -s "$T/stdout" ]; then ok "p11agent $verb --help prints help on stdout"; else not_ok "p11agent $verb --help prints help on stdout"; fi
done
run "$P11AGENTD" --help
rc_is 0 "p11agentd --help exits 0"
stdout_has "--foreground" "p11agentd --help mentions --foreground"
run "$P11AGENT" --version
rc_is 0 "p11agent --version exits 0"
run "$P11AGENTD" --version
rc_is 0 "p11agentd --version exits 0"

# usage_error DESC ARGS...: the CLI exits 2 (whether or not an agent runs).
usage_error() {
	local desc=$1
	shift
	run "$P11AGENT" --socket "$T/none.sock" "$@"
	rc_is 2 "usage error exits 2: $desc"
	if [ "$rc" -eq 2 ]; then
		stderr_has "p11agent" "usage error says so on stderr: $desc"
	fi
}
usage_error "no command"
usage_error "unknown command" frobnicate
usage_error "unknown global option" --no-such-option status
usage_error "unknown verb option" list --no-such-option
usage_error "sign without --key" sign --scheme ecdsa
usage_error "sign without --scheme" sign --key "pkcs11:object=ec256"
usage_error "sign with an unknown scheme" sign --key "pkcs11:object=ec256" --scheme rot13
usage_error "sign with an unknown hash" sign --key "pkcs11:object=ec256" --scheme ecdsa --hash md5
usage_error "sign with a bad --salt-len" sign --key "pkcs11:object=rsa2048" --scheme rsa-pss --salt-len lots
usage_error "pubkey without a URI" pubkey
usage_error "export-cert without a URI" export-cert
usage_error "status with an extra argument" status extra
usage_error "--timeout not a number" --timeout soon status
run "$P11AGENTD" --no-such-option
rc_is 2 "p11agentd with an unknown option exits 2"
check "no socket left by the usage errors" test ! -e "$T/none.sock"

# ---------------------------------------------------------------- no agent
write_pin "$T/pin" "$USER_PIN"
: >"$T/msg"
# not_running DESC PATH: every verb says "agent not running at PATH", exit 1.
not_running() {
	local desc=$1 path=$2 verb
	for verb in status list "unlock --pin-file $T/pin" lock \
		"sign --key pkcs11:object=ec256 --scheme ecdsa --hash sha256 --in $T/msg --out $T/sig" \
		"pubkey pkcs11:object=ec256" "export-cert pkcs11:object=ec256"; do
		# shellcheck disable=SC2086 # the verb strings are split on purpose
		run "$P11AGENT" --socket "$path" $verb
		rc_is 1 "$desc: '${verb%% *}' exits 1"
		stderr_has "agent not running at $path" "$desc: '${verb%% *}' says 'agent not running at $path'"
	done
}
not_running "socket missing" "$T/missing.sock"

# A socket file nobody listens on (an agent that crashed leaves one).
"$PYTHON3" "$lib_dir/proto_client.py" stale-socket "$T/stale.sock"
check "a stale socket file exists" test -S "$T/stale.sock"
not_running "nothing listening" "$T/stale.sock"

run env -u P11AGENT_SOCK XDG_RUNTIME_DIR="$T/xdg-none" "$P11AGENT" status
rc_is 1 "default socket path without an agent exits 1"
stderr_has "agent not running at $T/xdg-none/p11agent/agent.sock" \
	"default path: says 'agent not running at \$XDG_RUNTIME_DIR/p11agent/agent.sock'"

# ---------------------------------------------------------------- foreground, SIGTERM
check "agent starts in the foreground" start_agent
running "$AGENT_PID" || bail_out "agent running"
check "socket exists while the agent runs" test -S "$SOCK"
helpers=$AGENT_HELPERS
if [ -n "$helpers" ]; then
	ok "agent has helper processes ($helpers)"
else
	not_ok "agent has helper processes (one per module)"
fi
run p11a status
rc_is 0 "status answers"

# Hold a client connection open across SIGTERM: it must not delay the exit.
"$PYTHON3" "$lib_dir/proto_client.py" hold "$SOCK" "$T/held.ready" &
held=$!
remember_pid "$held"
poll 10 test -e "$T/held.ready" || true
check "a client holds a connection (HELLO answered)" test -e "$T/held.ready"

t0=$(date +%s)
stop_agent
t1=$(date +%s)
is "$AGENT_RC" 0 "agent exits 0 on SIGTERM (with a client connected)"
if [ $((t1 - t0)) -le 5 ]; then ok "agent exits within 5 s of SIGTERM"; else not_ok "agent exits within 5 s of SIGTERM ($((t1 - t0)) s)"; fi
check "SIGTERM removed the socket" test ! -e "$SOCK"
stop_pid "$held"
gone=yes
for pid in $helpers; do
	if wait_gone "$pid" 5; then :; else gone="no (pid $pid still runs)"; fi
done
is "$gone" yes "helper processes exit with the agent"
run p11a status
rc_is 1 "CLI after SIGTERM exits 1"
stderr_has "agent not running at $SOCK" "CLI after SIGTERM says 'agent not running at $SOCK'"

# ---------------------------------------------------------------- daemon mode
if timeout 20 "$P11AGENTD" --socket "$T/d.sock" --module "$SOFTHSM2_MODULE" \
	>"$T/daemon.out" 2>"$T/daemon.err"; then
	ok "p11agentd (daemon mode) returns 0 and releases its stdout"
else
	not_ok "p11agentd (daemon mode) returns 0 and releases its stdout (exit $?)"
	diag_file "$T/daemon.err"
fi
diag "daemon output:"
diag_file "$T/daemon.out"
file_has "$T/daemon.out" "P11AGENT_SOCK=$T/d.sock; export P11AGENT_SOCK;" "daemon prints P11AGENT_SOCK=...; export P11AGENT_SOCK;"
if grep -qE '^P11AGENT_PID=[0-9]+; export P11AGENT_PID;$' "$T/daemon.out"; then
	ok "daemon prints P11AGENT_PID=N; export P11AGENT_PID;"
else
	not_ok "daemon prints P11AGENT_PID=N; export P11AGENT_PID;"
fi
daemon_pid=$(sed -n 's/^P11AGENT_PID=\([0-9][0-9]*\);.*/\1/p' "$T/daemon.out")
if [ -n "$daemon_pid" ]; then
	remember_pid "$daemon_pid"
	is "$(readlink "/proc/$daemon_pid/exe")" "$(readlink -f "$P11AGENTD")" "P11AGENT_PID is a running p11agentd"
	run bash -c 'eval "$(cat "$1")" >/dev/null && "$2" status && [ "$P11AGENT_PID" = "$3" ]' sh \
		"$T/daemon.out" "$P11AGENT" "$daemon_pid"
	rc_is 0 "eval of the daemon's output lets 'p11agent status' find it"
	run env P11AGENT_SOCK="$T/d.sock" "$P11AGENT" env
	rc_is 0 "p11agent env exits 0"
	stdout_has "P11AGENT_SOCK=$T/d.sock" "p11agent env prints P11AGENT_SOCK"
	check "the daemon is not in our session" \
		test "$(awk '{sub(/^.*\) /, ""); print $4}' "/proc/$daemon_pid/stat")" != "$(awk '{sub(/^.*\) /, ""); print $4}' /proc/$$/stat)"
	kill -TERM "$daemon_pid"
	if wait_gone "$daemon_pid" 10; then
		ok "daemon exits on SIGTERM to P11AGENT_PID"
		forget_pid "$daemon_pid"
	else
		not_ok "daemon exits on SIGTERM to P11AGENT_PID"
	fi
	check "daemon removed its socket" test ! -e "$T/d.sock"
else
	not_ok "daemon's P11AGENT_PID found"
fi

# ssh-agent style in one go: start, eval, unlock at once.  The token must be
# usable as soon as the agent has said where it is.
run bash -c '
	eval "$(timeout 20 "$1" --socket "$2" --module "$3")" >/dev/null || exit 9
	echo "$P11AGENT_PID" >"$2.pid"
	"$4" unlock --pin-file "$5"
	st=$?
	"$4" list --json >"$2.json"
	kill -TERM "$P11AGENT_PID"
	exit $st' sh "$P11AGENTD" "$T/e.sock" "$SOFTHSM2_MODULE" "$P11AGENT" "$T/pin"
rc_is 0 "eval \"\$(p11agentd ...)\" then 'p11agent unlock' at once: the token is there"
if [ -s "$T/e.sock.pid" ]; then
	e_pid=$(cat "$T/e.sock.pid")
	wait_gone "$e_pid" 10 || { remember_pid "$e_pid"; diag "daemon $e_pid did not stop"; }
fi
if [ -s "$T/e.sock.json" ]; then
	is "$("$PYTHON3" -c 'import json, sys; print([t["logged_in"] for t in json.load(open(sys.argv[1]))["tokens"]])' "$T/e.sock.json")" \
		"[True]" "and 'p11agent list' right after shows it logged in"
else
	not_ok "and 'p11agent list' right after shows it logged in (no listing)"
fi

# ---------------------------------------------------------------- second agent on a live socket
check "agent starts again on the same socket" start_agent
running "$AGENT_PID" || bail_out "agent running"
first=$AGENT_PID
if timeout 20 "$P11AGENTD" --foreground --socket "$SOCK" --module "$SOFTHSM2_MODULE" \
	>"$T/second.out" 2>"$T/second.err"; then
	second_rc=0
else
	second_rc=$?
fi
if [ "$second_rc" -ne 0 ] && [ "$second_rc" -ne 124 ]; then
	ok "a second agent on a live socket exits non-zero at once (exit $second_rc)"
else
	not_ok "a second agent on a live socket exits non-zero at once (exit $second_rc)"
fi
if grep -qiE "already|in use|running|$SOCK" "$T/second.err"; then
	ok "the second agent says why (socket in use)"
	diag "$(head -n 2 "$T/second.err")"
else
	not_ok "the second agent says why (socket in use)"
	diag_file "$T/second.err"
fi
check "the first agent still runs" running "$first"
check "the socket is still there" test -S "$SOCK"
run p11a list
rc_is 0 "the first agent still answers"

# ---------------------------------------------------------------- a crashed helper
check "unlock" unlock_token
key=$(key_uri ec256)
head -c 100 /dev/urandom >"$T/msg"
old_helpers=$(child_pid_list "$AGENT_PID")
if [ -n "$old_helpers" ]; then
	for pid in $old_helpers; do
		kill -KILL "$pid"
	done
	ok "killed helper(s) $old_helpers with SIGKILL"
	check "agent survives its helper's death" running "$AGENT_PID"
	# The agent restarts the helper; the token comes back (logged out).
	# Waits for the new helper first: right after the kill the agent may
	# still list the old helper's inventory (it has not read the EOF yet).
	new_helper() {
		local now
		now=$(child_pid_list "$AGENT_PID")
		[ -n "$now" ] && [ "$now" != "$old_helpers" ]
	}
	if poll 10 new_helper && poll 10 token_has_key ec256; then back=yes; else back=no; fi
	is "$back" yes "token and keys listed again within 10 s of the helper crash"
	new_helpers=$(child_pid_list "$AGENT_PID")
	if [ -n "$new_helpers" ] && [ "$new_helpers" != "$old_helpers" ]; then
		ok "agent started a new helper ($new_helpers)"
	else
		not_ok "agent started a new helper (before: $old_helpers, now: '$new_helpers')"
	fi
	AGENT_HELPERS="$AGENT_HELPERS $new_helpers"
	check "unlock after the helper restart" unlock_token
	run p11a sign --key "$key" --scheme ecdsa --hash sha256 --in "$T/msg" --out "$T/sig"
	rc_is 0 "sign works after the helper restart"
	check "that signature verifies" \
		openssl dgst -sha256 -verify "$TOKDIR/ec256.pub.pem" -signature "$T/sig" "$T/msg"
else
	not_ok "agent has a helper to kill"
fi

running "$AGENT_PID" || bail_out "agent still running after the helper crash"

# ---------------------------------------------------------------- a hung helper
# The main process never waits on a token: with the helper stopped,
# status and list still answer at once; a signature fails by the
# client's deadline, and all is well again once the helper runs.
hung=$(child_pid_list "$AGENT_PID")
if [ -n "$hung" ]; then
	for pid in $hung; do kill -STOP "$pid"; done
	t0=$(date +%s)
	run p11a --timeout 5 list
	rc_is 0 "list answers while the helper is stopped"
	run p11a --timeout 5 status
	rc_is 0 "status answers while the helper is stopped"
	t1=$(date +%s)
	if [ $((t1 - t0)) -le 3 ]; then ok "they answer at once ($((t1 - t0)) s)"; else not_ok "they answer at once ($((t1 - t0)) s)"; fi
	t0=$(date +%s)
	run p11a --timeout 3 sign --key "$key" --scheme ecdsa --hash sha256 --in "$T/msg" --out "$T/sig"
	t1=$(date +%s)
	rc_is 1 "sign with --timeout 3 against a stopped helper exits 1"
	if [ $((t1 - t0)) -le 10 ]; then ok "and gives up within 10 s ($((t1 - t0)) s)"; else not_ok "and gives up within 10 s ($((t1 - t0)) s)"; fi
	for pid in $hung; do kill -CONT "$pid"; done
	run p11a sign --key "$key" --scheme ecdsa --hash sha256 --in "$T/msg" --out "$T/sig"
	rc_is 0 "sign works again once the helper runs"
else
	not_ok "agent has a helper to stop"
fi

# ---------------------------------------------------------------- a stopped agent and --timeout
kill -STOP "$AGENT_PID"
t0=$(date +%s)
run p11a --timeout 2 status
t1=$(date +%s)
kill -CONT "$AGENT_PID"
rc_is 1 "status with --timeout 2 against a stopped agent exits 1"
if [ $((t1 - t0)) -le 10 ]; then ok "--timeout 2 gives up within 10 s ($((t1 - t0)) s)"; else not_ok "--timeout 2 gives up within 10 s ($((t1 - t0)) s)"; fi
stderr_has "p11agent: " "timeout error has the 'p11agent: ' prefix"
run p11a status
rc_is 0 "the agent answers again after SIGCONT"

# ---------------------------------------------------------------- crash and restart on the stale socket
crash_helpers=$(child_pid_list "$AGENT_PID")
AGENT_HELPERS="$AGENT_HELPERS $crash_helpers"
kill -KILL "$AGENT_PID"
wait "$AGENT_PID" 2>/dev/null || true
forget_pid "$AGENT_PID"
AGENT_PID=
gone=yes
for pid in $crash_helpers; do
	wait_gone "$pid" 10 || gone="no (pid $pid)"
done
is "$gone" yes "helpers exit by themselves within 10 s when the agent is killed"
run p11a status
rc_is 1 "CLI against a killed agent's stale socket exits 1"
stderr_has "agent not running at $SOCK" "killed agent: 'agent not running at $SOCK'"
check "a new agent starts on the stale socket of a killed one" start_agent
run p11a status
rc_is 0 "the new agent answers"
stop_agent
is "$AGENT_RC" 0 "agent exits 0 on SIGTERM"

done_testing
