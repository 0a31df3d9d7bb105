#!/bin/bash
# t_socket_activation: p11agentd under systemd's protocols, without systemd
# as PID 1.  systemd-socket-activate passes a listening socket the way a
# socket unit does (LISTEN_FDS, LISTEN_PID) and starts the agent on the
# first connection; notify_listener.py is a real NOTIFY_SOCKET (an AF_UNIX
# datagram socket with SO_PASSCRED, as systemd's) that records READY=1,
# STATUS= and STOPPING=1 with the sender's pid.  Also: the socket stays
# when the agent exits; a socket in a directory others can enter, or at
# another path than the agent's, is refused; journal-stream logging; and
# the units in packaging/systemd (systemd-analyze verify and security).
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"

require_cmd systemd-socket-activate systemd-analyze timeout "$PYTHON3"
require_agent_binaries
make_token

NOTIFY=$T/notify
NOTIFY_LOG=$T/notify.log
mkdir -p "$T/config"

# ---------------------------------------------------------------- helpers

"$PYTHON3" "$lib_dir/notify_listener.py" "$NOTIFY" "$NOTIFY_LOG" &
NOTIFY_PID=$!
remember_pid "$NOTIFY_PID"
notify_listening() {
	[ -S "$NOTIFY" ] && grep -q '^listening$' "$NOTIFY_LOG" 2>/dev/null
}
poll 10 notify_listening || bail_out "notify_listener.py listens"

# activate SOCKET LOG ARGS...: systemd-socket-activate listening on SOCKET
# (mode 0600, as SocketMode=0600), running the agent with ARGS on the first
# connection; SA_PID is its pid, which becomes the agent's (it execs).
SA_PID=
activate() {
	local sock=$1 log=$2
	shift 2
	systemd-socket-activate -l "$sock" \
		-E SOFTHSM2_CONF -E P11AGENT_SYSCONFDIR -E XDG_CONFIG_HOME="$T/config" \
		-E NOTIFY_SOCKET="$NOTIFY" \
		"$P11AGENTD" "$@" >>"$log" 2>&1 &
	SA_PID=$!
	remember_pid "$SA_PID"
	if ! poll 10 socket_or_gone "$sock" "$SA_PID" || [ ! -S "$sock" ]; then
		diag "systemd-socket-activate did not listen on $sock"
		diag_file "$log"
		return 1
	fi
	chmod 0600 "$sock"
}

# notified TEXT [SECONDS]: a datagram holding TEXT reached the listener.
notified() {
	poll "${2:-10}" grep -qF -- "$1" "$NOTIFY_LOG"
}

# exe PID: what the process runs now.
exe() {
	readlink "/proc/$1/exe" 2>/dev/null || true
}

# finish PID: wait (at most 10 s) for our child PID to exit; its status in FIN_RC.
FIN_RC=
finish() {
	if wait_gone "$1" 10; then
		if wait "$1"; then FIN_RC=0; else FIN_RC=$?; fi
	else
		FIN_RC=timeout
		stop_pid "$1"
	fi
	forget_pid "$1"
}

# ---------------------------------------------------------------- activation, readiness, socket kept
mkdir -m 0700 "$T/run"
ASOCK=$T/run/agent.sock
if ! activate "$ASOCK" "$AGENT_LOG" --foreground --socket "$ASOCK" --module "$SOFTHSM2_MODULE" --debug; then
	bail_out "systemd-socket-activate listens for the agent"
fi
is "$(exe "$SA_PID")" "$(command -v systemd-socket-activate)" "before the first connection no agent runs (only the listener)"
if grep -q 'READY=1' "$NOTIFY_LOG"; then not_ok "no READY=1 before the agent runs"; else ok "no READY=1 before the agent runs"; fi

run timeout 30 "$P11AGENT" --socket "$ASOCK" status
rc_is 0 "the first connection starts the agent and 'p11agent status' works"
stdout_has "agent:        p11agentd" "status answered by p11agentd"
is "$(exe "$SA_PID")" "$(readlink -f "$P11AGENTD")" "the agent runs in the process systemd-socket-activate started"
file_has "$AGENT_LOG" "listening on $ASOCK (socket from systemd)" "the agent took the socket it was passed"
if notified "READY=1"; then ok "READY=1 arrives on NOTIFY_SOCKET"; else not_ok "READY=1 arrives on NOTIFY_SOCKET"; diag_file "$NOTIFY_LOG"; fi
if grep -qF "pid=$SA_PID	READY=1" "$NOTIFY_LOG"; then
	ok "READY=1 comes from the main process (NotifyAccess=main)"
else
	not_ok "READY=1 comes from the main process (NotifyAccess=main)"
	diag "agent pid $SA_PID"
	diag_file "$NOTIFY_LOG"
fi
if notified "STATUS=1 of 1 modules up"; then
	ok "STATUS= says when the module is up"
else
	not_ok "STATUS= says when the module is up"
	diag_file "$NOTIFY_LOG"
fi
SOCK=$ASOCK
if list_json && [ "$(json_token label)" = "$TOKEN_LABEL" ]; then
	ok "the activated agent lists the test token"
else
	not_ok "the activated agent lists the test token"
	diag_file "$T/list.err"
fi
if unlock_token >/dev/null 2>&1; then ok "unlock through the activated agent"; else not_ok "unlock through the activated agent"; fi
printf 'message to sign\n' >"$T/msg"
run p11a sign --key "pkcs11:token=$TOKEN_LABEL;object=ec256;type=private" --scheme ecdsa --hash sha256 \
	--in "$T/msg" --out "$T/sig"
rc_is 0 "a signature through the activated agent"

kill -TERM "$SA_PID"
finish "$SA_PID"
is "$FIN_RC" 0 "the activated agent exits 0 on SIGTERM"
if notified "STOPPING=1" 5; then ok "STOPPING=1 arrives on NOTIFY_SOCKET"; else not_ok "STOPPING=1 arrives on NOTIFY_SOCKET"; diag_file "$NOTIFY_LOG"; fi
check "the socket systemd owns is left in place" test -S "$ASOCK"
check "its directory too" test -d "$T/run"

# ---------------------------------------------------------------- a socket others can reach is refused
mkdir -m 0755 "$T/open"
: >"$T/open.log"
if activate "$T/open/agent.sock" "$T/open.log" --foreground --socket "$T/open/agent.sock" --module "$SOFTHSM2_MODULE"; then
	before=$(grep -c 'READY=1' "$NOTIFY_LOG" || true)
	run timeout 30 "$P11AGENT" --socket "$T/open/agent.sock" status
	if [ "$rc" -ne 0 ]; then ok "no status from an agent whose socket directory others can enter"; else not_ok "no status from an agent whose socket directory others can enter"; fi
	finish "$SA_PID"
	is "$FIN_RC" 1 "the agent refuses to start (exit 1)"
	file_has "$T/open.log" "its directory $T/open is accessible to other users (mode 0755); set DirectoryMode=0700" \
		"the refusal says which directory, its mode and what to set"
	is "$(grep -c 'READY=1' "$NOTIFY_LOG" || true)" "$before" "no READY=1 from the refusing agent"
else
	not_ok "systemd-socket-activate listens in $T/open"
fi

# ---------------------------------------------------------------- a socket at another path is refused
mkdir -m 0700 "$T/other"
: >"$T/other.log"
if activate "$T/other/agent.sock" "$T/other.log" --foreground --socket "$T/other/else.sock" --module "$SOFTHSM2_MODULE"; then
	run timeout 30 "$P11AGENT" --socket "$T/other/agent.sock" status
	finish "$SA_PID"
	is "$FIN_RC" 1 "a passed socket at another path than the agent's: exit 1"
	file_has "$T/other.log" "systemd passed a socket at $T/other/agent.sock, but the agent's socket is $T/other/else.sock (--socket)" \
		"the refusal names both paths and where the agent's comes from"
	check "the agent made no socket of its own" test ! -e "$T/other/else.sock"
else
	not_ok "systemd-socket-activate listens in $T/other"
fi

# ---------------------------------------------------------------- logging to a journal stream
# Under systemd, stderr is a journal stream and JOURNAL_STREAM names it
# (device:inode): the agent then writes "<PRIORITY>message" lines and
# leaves time, name and pid to the journal.
JLOG=$T/journal.log
: >"$JLOG"
SOCK=$T/j.sock
AGENT_LOG=$JLOG
OUTER_WRAPPER=${P11AGENTD_WRAPPER:-}
P11AGENTD_WRAPPER="env JOURNAL_STREAM=$(stat -c '%d:%i' "$JLOG") $OUTER_WRAPPER"
if start_agent; then
	ok "an agent whose stderr is a journal stream starts"
else
	not_ok "an agent whose stderr is a journal stream starts"
fi
stop_agent
file_has "$JLOG" "<6>listening on $SOCK" "journal stream: priority prefix, no time or name of our own"
file_has "$JLOG" "<6>p11agentd[helper libsofthsm2.so][" "journal stream: a helper's lines name the helper and its pid"
file_lacks "$JLOG" "info: listening" "journal stream: not the terminal format"
AGENT_LOG=$T/agent.log
P11AGENTD_WRAPPER=$OUTER_WRAPPER

# ---------------------------------------------------------------- the units
U=$T/units
mkdir -p "$U" "$T/xdg-run"
sed -e "s|@bindir@|$top_builddir|g" "$top_srcdir/packaging/systemd/p11agentd.service.in" >"$U/p11agentd.service"
cp "$top_srcdir/packaging/systemd/p11agentd.socket" "$U/"
# systemd-analyze needs a runtime directory for --user, and a real one for
# nothing else: a temporary one is fine.
run env XDG_RUNTIME_DIR="$T/xdg-run" systemd-analyze verify --man=no --user "$U/p11agentd.socket" "$U/p11agentd.service"
rc_is 0 "systemd-analyze verify accepts the units"
if [ -s "$T/stdout" ] || [ -s "$T/stderr" ]; then
	not_ok "systemd-analyze verify has nothing to say about the units"
	diag_last
else
	ok "systemd-analyze verify has nothing to say about the units"
fi
run env XDG_RUNTIME_DIR="$T/xdg-run" systemd-analyze security --offline=true --user "$U/p11agentd.service"
rc_is 0 "systemd-analyze security runs on the service"
score=$(sed -n 's/.*Overall exposure level for p11agentd.service: \([0-9.]*\).*/\1/p' "$T/stdout")
diag "systemd-analyze security --offline=true --user: exposure ${score:-?}"
if [ -n "$score" ] && awk -v s="$score" 'BEGIN { exit !(s <= 1.5) }'; then
	ok "the service's exposure stays at 1.5 or less (it is ${score})"
else
	not_ok "the service's exposure stays at 1.5 or less (it is ${score:-unknown})"
	diag_last
fi
listen=$(sed -n 's/^ListenStream=//p' "$U/p11agentd.socket")
envsock=$(sed -n 's/^P11AGENT_SOCK=//p' "$top_srcdir/packaging/systemd/50-p11agent.conf")
is "${listen//%t/\$\{XDG_RUNTIME_DIR\}}" "$envsock" "environment.d's P11AGENT_SOCK is the socket unit's ListenStream="
is "$(sed -n 's/^DirectoryMode=//p' "$U/p11agentd.socket") $(sed -n 's/^SocketMode=//p' "$U/p11agentd.socket")" \
	"0700 0600" "the socket unit makes a 0700 directory and a 0600 socket"
is "$(sed -n 's/^Type=//p' "$U/p11agentd.service")" notify "the service is Type=notify"

done_testing
