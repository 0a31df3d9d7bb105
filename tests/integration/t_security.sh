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
# An ordinary process of nobody's to compare with (it only has to exist).
"${AS_NOBODY[@]}" sleep 60 &
nb_control=$!
remember_pid "$nb_control"
# nobody_agent_up: the nobody agent answers status (or has exited: no use waiting).
nobody_agent_up() {
	! running "$nb_agent" || as_nobody "$NB/bin/p11agent" --socket "$NB/xdg/agent.sock" status >/dev/null 2>&1
}
poll 10 nobody_agent_up || true
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
run as_nobody "$PYTHON3" "$lib_dir/proto_client.py" connect-fails "$SOCK" EACCES
rc_is 0 "nobody's connect() fails with EACCES at the filesystem"

# ---------------------------------------------------------------- other uid: refused by SO_PEERCRED
# Test only: open the directory and the socket to everyone.  The agent
# must refuse the peer by its uid.
chmod 0711 "$XDG/p11agent"
chmod 0666 "$SOCK"
run as_nobody "$PYTHON3" "$lib_dir/proto_client.py" refused "$SOCK"
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
# The raw protocol cases are security_cases.py, in parallel with a CLI loop.
key=$(key_uri ec256)
# A CLI client in a loop, in parallel with the raw cases.
(
	while [ ! -e "$T/stop-loop" ]; do
		if "$P11AGENT" --socket "$SOCK" list >/dev/null 2>>"$T/loop.err"; then
			echo ok >>"$T/loop.res"
		else
			echo fail >>"$T/loop.res"
		fi
		sleep 0.1	# the loop's pace, not a wait for anything
	done
) &
loop_pid=$!
remember_pid "$loop_pid"

if timeout 300 "$PYTHON3" "$lib_dir/security_cases.py" "$SOCK" "$key" >"$T/proto.out" 2>"$T/proto.err"; then
	proto_rc=0
else
	proto_rc=$?
fi
touch "$T/stop-loop"
wait "$loop_pid"
forget_pid "$loop_pid"

relay_cases "$T/proto.out"
if [ "$proto_rc" -eq 0 ] && [ -n "$CASES_DONE" ]; then
	ok "security_cases.py ran to the end ($CASES_DONE)"
else
	not_ok "security_cases.py ran to the end (exit $proto_rc)"
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
run p11a sign --key "$key" --scheme ecdsa --hash sha256 --in "$T/proto.out" --out "$T/sig"
rc_is 0 "agent still signs after the bad frames"
check "that signature verifies" \
	openssl dgst -sha256 -verify "$TOKDIR/ec256.pub.pem" -signature "$T/sig" "$T/proto.out"

stop_agent
is "$AGENT_RC" 0 "agent exits 0 on SIGTERM"
done_testing
