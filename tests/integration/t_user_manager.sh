#!/bin/bash
# t_user_manager: p11agentd.socket and p11agentd.service under a real
# systemd user manager (/lib/systemd/systemd --user), as a desktop session
# runs them: the socket listening from the start (installed: enabled for
# every user by the package, through sockets.target), P11AGENT_SOCK in the
# manager's environment from environment.d, the first connection starting
# the service, the service's sandbox in force (no new privileges, seccomp,
# no capabilities, private /tmp), unlock and a verified signature through
# it, a stopped service started again by the next connection (the token
# locked again), the socket removed when it stops.
#
# The build tree's units (ExecStart rewritten to the build's p11agentd)
# are put in the manager's ~/.config/systemd/user; with P11A_INSTALLED
# (tests/packages/run.sh) the installed units and environment.d snippet
# are used as they are.
#
# The manager runs in a private mount namespace (root only): a tmpfs holds
# its runtime directory, home and token (the service's /tmp is private, so
# nothing it needs can live there), and /run/systemd/system exists there
# because a user manager refuses to start on a machine not booted with
# systemd.  A sandbox setting that this machine's kernel cannot apply
# (probed with a one-shot unit holding that setting alone) is turned off by
# a drop-in and named in the output; every other one stays.
set -u
if [ "$(id -u)" != 0 ] || ! command -v unshare >/dev/null || [ ! -x /lib/systemd/systemd ]; then
	echo "1..0 # SKIP needs root, unshare and systemd (a user manager in a private mount namespace)"
	exit 0
fi
if [ -z "${P11A_UM_NS:-}" ]; then
	exec unshare -m --propagation private env P11A_UM_NS=1 bash "$0" "$@"
fi
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"

require_cmd systemctl openssl mount "$PYTHON3"
require_agent_binaries

# ---------------------------------------------------------------- the namespace
# Nothing the service reads may be under /tmp (PrivateTmp=yes): T is, so
# the manager's files live on a tmpfs mounted over /mnt in this namespace.
mount -t tmpfs -o mode=0755 p11a-test /mnt || bail_out "tmpfs over /mnt"
mkdir -p /mnt/run-systemd/system /run/systemd
mount --bind /mnt/run-systemd /run/systemd || bail_out "/run/systemd/system in the namespace"
RT=/mnt/rt
CFG=/mnt/config
mkdir -m 0700 "$RT"
mkdir -p /mnt/home "$CFG/environment.d" "$CFG/p11agent" "$CFG/systemd/user"
TOKDIR=/mnt/token
make_token

INSTALLED=${P11A_INSTALLED:-}
if [ -n "$INSTALLED" ]; then
	UNITDIR=/usr/lib/systemd/user
	require_file "$UNITDIR/p11agentd.service" "$UNITDIR/p11agentd.socket" /usr/lib/environment.d/50-p11agent.conf
	AGENTD=$INSTALLED/bin/p11agentd
else
	UNITDIR=$CFG/systemd/user
	# The service's /tmp is private (PrivateTmp=yes) and a build tree may
	# be under /tmp: the service runs a copy of the build's agent from the
	# tmpfs, as it would run /usr/bin/p11agentd.
	mkdir -p /mnt/bin
	cp "$(readlink -f "$P11AGENTD")" /mnt/bin/p11agentd
	AGENTD=/mnt/bin/p11agentd
	sed "s|^ExecStart=.*|ExecStart=$AGENTD --foreground|" \
		"$top_srcdir/packaging/systemd/p11agentd.service.in" >"$UNITDIR/p11agentd.service"
	cp "$top_srcdir/packaging/systemd/p11agentd.socket" "$UNITDIR/"
	cp "$top_srcdir/packaging/systemd/50-p11agent.conf" "$CFG/environment.d/"
fi
# The user's own settings, as a user would write them.
printf 'SOFTHSM2_CONF=%s\n' "$SOFTHSM2_CONF" >"$CFG/environment.d/60-test-token.conf"
printf 'module %s\n' "$(readlink -f "$SOFTHSM2_MODULE")" >"$CFG/p11agent/p11agentd.conf"

export XDG_RUNTIME_DIR=$RT XDG_CONFIG_HOME=$CFG HOME=/mnt/home
unset DBUS_SESSION_BUS_ADDRESS
sc() { timeout 30 systemctl --user --no-pager "$@"; }

# ---------------------------------------------------------------- the manager
/lib/systemd/systemd --user >"$T/manager.log" 2>&1 &
MGR=$!
remember_pid "$MGR"
i=0
until [ -S "$RT/systemd/private" ]; do
	i=$((i + 1))
	if [ "$i" -gt 300 ] || ! running "$MGR"; then
		diag_file "$T/manager.log"
		bail_out "the systemd user manager listens"
	fi
	sleep 0.1
done
state=$(sc is-system-running --wait 2>&1)
case $state in
running | degraded) ;;
*) diag_file "$T/manager.log"; bail_out "the systemd user manager finished starting (state: $state)" ;;
esac
ok "a systemd user manager runs ($(sc --version | head -1))"

# Sandbox settings of the shipped service, probed one by one.
grep -E '^[A-Za-z]+=' "$UNITDIR/p11agentd.service" |
	grep -Ev '^(Description|Documentation|Requires|After|Type|ExecStart|Restart|Also)=' >"$T/settings"
: >"$T/dropin"
off=
n=0
while IFS= read -r line; do
	n=$((n + 1))
	key=${line%%=*}
	printf '[Service]\nType=oneshot\nExecStart=/bin/true\n%s\n' "$line" >"$CFG/systemd/user/p11a-probe-$n.service"
	sc daemon-reload
	if ! sc start "p11a-probe-$n.service" >/dev/null 2>&1; then
		case $key in
		ProtectSystem | ProtectHome) reset="$key=no" ;;
		ProtectProc) reset="$key=default" ;;
		KeyringMode) reset="$key=inherit" ;;
		CapabilityBoundingSet) reset="$key=~" ;;
		UMask | LimitCORE) reset="$key=" ;;
		SystemCallFilter | SystemCallArchitectures | RestrictAddressFamilies) reset="$key=" ;;
		*) reset="$key=no" ;;
		esac
		printf '%s\n' "$reset" >>"$T/dropin"
		off="$off $key"
	fi
	rm -f "$CFG/systemd/user/p11a-probe-$n.service"
done <"$T/settings"
if [ -n "$off" ]; then
	diag "this machine cannot apply:$off (a one-shot unit with that setting alone fails); turned off here"
	mkdir -p "$CFG/systemd/user/p11agentd.service.d"
	{ echo '[Service]'; cat "$T/dropin"; } >"$CFG/systemd/user/p11agentd.service.d/50-this-machine.conf"
fi
for key in NoNewPrivileges SystemCallFilter PrivateTmp PrivateUsers CapabilityBoundingSet; do
	case " $off " in
	*" $key "*) not_ok "the sandbox's $key applies on this machine" ;;
	*) ok "the sandbox's $key applies on this machine" ;;
	esac
done
sc daemon-reload

# ---------------------------------------------------------------- the socket
if [ -n "$INSTALLED" ]; then
	is "$(sc is-enabled p11agentd.socket 2>&1)" enabled "p11agentd.socket is enabled for every user (by the package)"
	i=0
	until [ "$(sc is-active p11agentd.socket 2>&1)" = active ]; do
		i=$((i + 1))
		[ "$i" -le 100 ] || break
		sleep 0.1
	done
	is "$(sc is-active p11agentd.socket 2>&1)" active "the socket listens from the session's start (sockets.target)"
else
	check "systemctl --user enable --now p11agentd.socket" sc enable --now p11agentd.socket
fi
SOCK=$RT/p11agent/agent.sock
check "the socket is at \$XDG_RUNTIME_DIR/p11agent/agent.sock" test -S "$SOCK"
is "$(stat -c %a "$RT/p11agent") $(stat -c %a "$SOCK")" "700 600" "socket directory 0700, socket 0600"
run sc show-environment
stdout_has "P11AGENT_SOCK=$SOCK" "the session's environment names the socket (environment.d)"
is "$(sc is-active p11agentd.service 2>&1)" inactive "no agent runs before the first connection"

# ---------------------------------------------------------------- first connection
run env P11AGENT_SOCK="$SOCK" timeout 30 "$P11AGENT" status
rc_is 0 "the first connection starts the agent; 'p11agent status' works with P11AGENT_SOCK"
stdout_has "agent:        p11agentd" "status is answered by p11agentd"
is "$(sc is-active p11agentd.service 2>&1)" active "p11agentd.service is active"
PID1=$(sc show -p MainPID --value p11agentd.service)
if [ "$PID1" = 0 ] || [ ! -d "/proc/$PID1" ]; then
	sc status p11agentd.service >"$T/service.status" 2>&1
	diag_file "$T/service.status" 20
	bail_out "p11agentd.service runs (MainPID $PID1)"
fi
is "$(readlink "/proc/$PID1/exe")" "$AGENTD" "the service runs $AGENTD"
# The status text follows the modules as they come up (READY=1 comes first).
status_up() { [ "$(sc show -p StatusText --value p11agentd.service)" = "1 of 1 modules up, 1 tokens" ]; }
poll 20 status_up || :   # the check is the next line
is "$(sc show -p Type --value p11agentd.service) $(sc show -p StatusText --value p11agentd.service)" \
	"notify 1 of 1 modules up, 1 tokens" "Type=notify: READY=1 and the status text reach the manager"

# The sandbox, as the kernel sees it.
status=$(cat "/proc/$PID1/status")
is "$(printf '%s\n' "$status" | awk '/^NoNewPrivs:/ {print $2}')" 1 "the agent runs with no_new_privs"
is "$(printf '%s\n' "$status" | awk '/^Seccomp:/ {print $2}')" 2 "the agent runs under a seccomp filter"
is "$(printf '%s\n' "$status" | awk '/^CapBnd:/ {print $2}')" 0000000000000000 "the agent's capability bounding set is empty"
touch /tmp/p11a-um-marker-$$
if [ -e "/proc/$PID1/root/tmp/p11a-um-marker-$$" ]; then
	not_ok "the agent has a private /tmp"
else
	ok "the agent has a private /tmp"
fi
rm -f /tmp/p11a-um-marker-$$

# ---------------------------------------------------------------- sign
if unlock_token >"$T/unlock.out" 2>&1; then
	ok "unlock through the service"
else
	not_ok "unlock through the service"
	diag_file "$T/unlock.out"
fi
printf 'signed by the session agent\n' >"$T/msg"
run p11a sign --key "pkcs11:token=$TOKEN_LABEL;object=ec256;type=private" --scheme ecdsa --hash sha256 \
	--in "$T/msg" --out "$T/sig"
rc_is 0 "a signature through the service"
check "openssl verifies it with the certificate's key" \
	openssl dgst -sha256 -verify "$TOKDIR/ec256.pub.pem" -signature "$T/sig" "$T/msg"

# ---------------------------------------------------------------- stop, start again
check "systemctl --user stop p11agentd.service" sc stop p11agentd.service
is "$(sc is-active p11agentd.socket 2>&1)" active "the socket keeps listening without the agent"
check "the socket file stays" test -S "$SOCK"
run p11a sign --key "pkcs11:token=$TOKEN_LABEL;object=ec256;type=private" --scheme ecdsa --hash sha256 \
	--in "$T/msg" --out "$T/sig2"
PID2=$(sc show -p MainPID --value p11agentd.service)
if [ "$PID2" != 0 ] && [ "$PID2" != "$PID1" ]; then
	ok "the next connection starts a new agent"
else
	not_ok "the next connection starts a new agent"
	diag "MainPID before $PID1, after $PID2"
fi
if [ "$rc" -ne 0 ] && grep -qi "locked\|not logged in\|unlock" "$T/stderr"; then
	ok "the new agent's token is locked: the signature is refused and says so"
else
	not_ok "the new agent's token is locked: the signature is refused and says so"
	diag_last
fi
check "systemctl --user stop p11agentd.socket p11agentd.service" sc stop p11agentd.socket p11agentd.service
if [ -e "$SOCK" ]; then not_ok "the socket is removed when it stops"; else ok "the socket is removed when it stops"; fi

kill -TERM "$MGR"
if wait_gone "$MGR" 20; then ok "the user manager exits on SIGTERM"; else not_ok "the user manager exits on SIGTERM"; fi
forget_pid "$MGR"
done_testing
