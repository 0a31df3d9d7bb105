#!/bin/bash
# t_logind: lock on suspend and on screen lock (issue 13, "Locking").  A
# private dbus-daemon stands for the system bus and fake_logind.py owns
# org.freedesktop.login1 on it, emitting what logind emits: the Manager's
# PrepareForSleep(true) then (false) on Suspend, a session's Lock on
# LockSession, PropertiesChanged with LockedHint on SetLockedHint.  Our
# session (uid = ours) locking locks every token, another uid's does not;
# lock-on-suspend no ignores PrepareForSleep; both keys no: no bus at all;
# a missing bus is logged once and the agent signs normally; a bus that
# dies is survived, and the agent listens again once it is back.
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"

require_cmd openssl pkcs11-tool softhsm2-util timeout dbus-daemon dbus-send "$PYTHON3"
require_agent_binaries
if ! "$PYTHON3" -c 'import dbus, dbus.mainloop.glib; from gi.repository import GLib' 2>"$T/py.err"; then
	diag_file "$T/py.err"
	bail_out "python3-dbus and python3-gi are installed"
fi
if ! grep -q '^#define HAVE_SYSTEMD 1' "$top_builddir/config.h" 2>/dev/null; then
	skip "logind" "built without libsystemd"
	done_testing
fi
make_token
head -c 300 /dev/urandom >"$T/msg"
write_pin "$T/pin" "$USER_PIN"

OUR_UID=$(id -u)
OTHER_UID=$((OUR_UID + 4242))
BUS_SOCK=$T/system_bus_socket
export DBUS_SYSTEM_BUS_ADDRESS=unix:path=$BUS_SOCK
BUS_PID=
LOGIND_PID=

cat >"$T/bus.conf" <<EOF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=$BUS_SOCK</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <allow own="org.freedesktop.login1"/>
    <allow send_destination="*" eavesdrop="false"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
EOF

has_line() { [ -s "$1" ] && grep -qF -- "$2" "$1"; }
count_of() { grep -cF -- "$2" "$1" || true; }
at_least() { [ "$(count_of "$1" "$2")" -ge "$3" ]; }

# start_bus: dbus-daemon and the fake logind on $BUS_SOCK, both ready.
start_bus() {
	rm -f "$BUS_SOCK" "$T/bus.addr" "$T/logind.ready"
	dbus-daemon --config-file="$T/bus.conf" --print-address --nofork >"$T/bus.addr" 2>>"$T/bus.log" &
	BUS_PID=$!
	remember_pid "$BUS_PID"
	poll 10 has_line "$T/bus.addr" "unix:" || { diag_file "$T/bus.log"; return 1; }
	"$PYTHON3" "$lib_dir/fake_logind.py" "$OUR_UID" "$OTHER_UID" "$T/logind.ready" >>"$T/logind.log" 2>&1 &
	LOGIND_PID=$!
	remember_pid "$LOGIND_PID"
	poll 10 has_line "$T/logind.ready" ready || { diag_file "$T/logind.log"; return 1; }
}

stop_bus() {
	[ -z "$LOGIND_PID" ] || stop_pid "$LOGIND_PID"
	[ -z "$BUS_PID" ] || stop_pid "$BUS_PID"
	LOGIND_PID='' BUS_PID=''
}

# manager METHOD ARGS... / session OBJ METHOD ARGS...: call the fake logind as loginctl calls logind.
manager() {
	dbus-send --system --print-reply --dest=org.freedesktop.login1 /org/freedesktop/login1 \
		"org.freedesktop.login1.Manager.$1" "${@:2}" >/dev/null
}
session() {
	dbus-send --system --print-reply --dest=org.freedesktop.login1 \
		"/org/freedesktop/login1/session/$1" "org.freedesktop.login1.Session.$2" "${@:3}" >/dev/null
}

logged_in() {
	list_json >/dev/null 2>&1 && json_token logged_in "$TOKEN_LABEL"
}
is_locked() { [ "$(logged_in)" = false ]; }

sign_with() {
	run p11a sign --key "$1" --scheme ecdsa --hash sha256 --in "$T/msg" --out "$T/sig"
}
sign_locked() {
	sign_with "$2"
	rc_is 1 "$1: sign exits 1"
	stderr_has "is locked: run 'p11agent unlock'" "$1: sign says the token is locked"
}
sign_ok() {
	sign_with "$2"
	rc_is 0 "$1: sign works"
}

LISTENING="logind: listening on the system bus"

# ---------------------------------------------------------------- configuration

U=$T/user.conf
: >"$U"
run "$P11AGENTD" --config "$U" --print-config
stdout_has "lock-on-suspend yes	# default" "lock-on-suspend is yes by default"
stdout_has "lock-on-screen-lock yes	# default" "lock-on-screen-lock is yes by default"
printf 'debug no\nlock-on-suspend no\nlock-on-screen-lock no\n' >"$U"
run "$P11AGENTD" --config "$U" --print-config
stdout_has "lock-on-suspend no	# $U:2" "lock-on-suspend no, with its line"
stdout_has "lock-on-screen-lock no	# $U:3" "lock-on-screen-lock no, with its line"
printf 'lock-on-suspend maybe\n' >"$U"
run "$P11AGENTD" --config "$U" --print-config
if [ "$rc" -ne 0 ] && grep -qF "$U:1: lock-on-suspend must be yes or no, not 'maybe'" "$T/stderr"; then
	ok "lock-on-suspend 'maybe' refused as FILE:LINE"
else
	not_ok "lock-on-suspend 'maybe' refused as FILE:LINE"
	diag_last
fi
A=$P11AGENT_SYSCONFDIR/p11agent/p11agentd.conf
mkdir -p "$(dirname "$A")"
printf 'lock-on-screen-lock yes\nlock lock-on-screen-lock\n' >"$A"
printf 'lock-on-screen-lock no\n' >"$U"
run "$P11AGENTD" --config "$U" --print-config
if [ "$rc" -ne 0 ] && grep -qF "$U:1: 'lock-on-screen-lock' is locked by the administrator ($A:2)" "$T/stderr"; then
	ok "a user's lock-on-screen-lock against the administrator's lock is refused"
else
	not_ok "a user's lock-on-screen-lock against the administrator's lock is refused"
	diag_last
fi
rm -f "$A" "$U"

# ---------------------------------------------------------------- defaults: both events

start_bus || bail_out "dbus-daemon and the fake logind start"
ok "dbus-daemon and the fake logind start"
start_agent || bail_out "agent starts with a system bus"
key=$(key_uri ec256)
wait_for "the agent listens to logind" 10 has_line "$AGENT_LOG" "$LISTENING" &&
	ok "the agent listens to logind"

check "suspend: unlock" unlock_token
sign_ok "suspend: before" "$key"
check "suspend: logind's Suspend" manager Suspend boolean:true
wait_for "suspend: the token is locked" 10 is_locked && ok "suspend: the token is locked"
file_has "$AGENT_LOG" "PrepareForSleep: locking every token" "suspend: logged with its reason"
sign_locked "suspend" "$key"
check "suspend: unlock again" unlock_token
sign_ok "suspend: after unlock" "$key"
# PrepareForSleep(false) (the resume) locked nothing more.
is "$(count_of "$AGENT_LOG" "PrepareForSleep: locking")" 1 "suspend: one lock for one sleep"

# Another uid's session locks: not ours, the token stays unlocked.
check "other uid: logind's LockSession 2" manager LockSession string:2
wait_for "other uid: the agent saw it" 10 has_line "$AGENT_LOG" "session 2 of uid $OTHER_UID locked: not ours" &&
	ok "other uid: the agent saw it and found it is not ours"
is "$(logged_in)" true "other uid: the token is still unlocked"
sign_ok "other uid" "$key"
file_lacks "$AGENT_LOG" "session 2 locked" "other uid: no lock logged"

# Our session's Lock.
check "our session: logind's LockSession 1" manager LockSession string:1
wait_for "our session: the token is locked" 10 is_locked && ok "our session: the token is locked"
file_has "$AGENT_LOG" "session 1 locked: locking every token" "our session: logged with its reason"
sign_locked "our session" "$key"
check "our session: unlock again" unlock_token
sign_ok "our session: after unlock" "$key"

# LockedHint: another uid's, then ours.
check "other uid: SetLockedHint true" session _32 SetLockedHint boolean:true
wait_for "other uid's LockedHint: the agent saw it" 10 has_line "$AGENT_LOG" \
	"session 2 of uid $OTHER_UID locked (LockedHint): not ours" && ok "other uid's LockedHint: not ours"
is "$(logged_in)" true "other uid's LockedHint: the token is still unlocked"
check "our session: SetLockedHint true" session _31 SetLockedHint boolean:true
wait_for "our LockedHint: the token is locked" 10 is_locked && ok "our LockedHint: the token is locked"
file_has "$AGENT_LOG" "session 1 locked (LockedHint): locking every token" "our LockedHint: logged"
check "our LockedHint: unlock again" unlock_token
check "our session: SetLockedHint false" session _31 SetLockedHint boolean:false
sign_ok "LockedHint false" "$key"
is "$(logged_in)" true "LockedHint false: the token stays unlocked"

# The bus dies under the agent: it goes on serving, and listens again once the bus is back.
{
	kill -KILL "$BUS_PID"
	wait_gone "$BUS_PID" 10 || true
	wait "$BUS_PID" || true
} 2>/dev/null   # not bash's "Killed" notice
forget_pid "$BUS_PID"
BUS_PID=
wait_for "bus killed: the agent notices" 10 has_line "$AGENT_LOG" "system bus: lost the connection" &&
	ok "bus killed: the agent notices and logs it"
check "bus killed: the agent is still running" running "$AGENT_PID"
check "bus killed: status answers" p11a status
sign_ok "bus killed" "$key"
stop_bus
start_bus || bail_out "the bus starts again"
wait_for "bus back: the agent listens again" 20 at_least "$AGENT_LOG" "$LISTENING" 2 &&
	ok "bus back: the agent listens again"
check "bus back: logind's Suspend" manager Suspend boolean:true
wait_for "bus back: suspend locks" 10 is_locked && ok "bus back: suspend locks"
stop_agent
is "$AGENT_RC" 0 "the agent stops cleanly"

# ---------------------------------------------------------------- lock-on-suspend no

printf 'module %s\nlock-on-suspend no\n' "$SOFTHSM2_MODULE" >"$T/nosuspend.conf"
: >"$AGENT_LOG"
start_agent --config "$T/nosuspend.conf" || bail_out "agent starts with lock-on-suspend no"
wait_for "lock-on-suspend no: the agent listens" 10 has_line "$AGENT_LOG" "$LISTENING" &&
	ok "lock-on-suspend no: the agent listens (screen lock only)"
check "lock-on-suspend no: unlock" unlock_token
check "lock-on-suspend no: logind's Suspend" manager Suspend boolean:true
# Signals reach the agent in order: once our session's Lock has locked,
# the PrepareForSleep before it was there to be seen.
check "lock-on-suspend no: logind's LockSession 1" manager LockSession string:1
wait_for "lock-on-suspend no: the screen lock still locks" 10 is_locked &&
	ok "lock-on-suspend no: the screen lock still locks"
file_lacks "$AGENT_LOG" "PrepareForSleep" "lock-on-suspend no: PrepareForSleep ignored"
is "$(count_of "$AGENT_LOG" "locking every token")" 1 "lock-on-suspend no: one lock, the screen's"
stop_agent

# ---------------------------------------------------------------- both no: no bus at all

printf 'module %s\nlock-on-suspend no\nlock-on-screen-lock no\n' "$SOFTHSM2_MODULE" >"$T/none.conf"
: >"$AGENT_LOG"
start_agent --config "$T/none.conf" || bail_out "agent starts with both keys no"
check "both no: unlock" unlock_token
check "both no: logind's Suspend" manager Suspend boolean:true
check "both no: logind's LockSession 1" manager LockSession string:1
sign_ok "both no" "$key"
is "$(logged_in)" true "both no: the token stays unlocked"
file_lacks "$AGENT_LOG" "system bus" "both no: the agent does not use the bus"
stop_agent
stop_bus

# ---------------------------------------------------------------- no bus

export DBUS_SYSTEM_BUS_ADDRESS=unix:path=$T/no-such-bus
: >"$AGENT_LOG"
start_agent || bail_out "agent starts with no system bus"
ok "no bus: the agent starts"
# A retry (logged at debug) has happened: the warning is still the only one.
wait_for "no bus: the agent tries again" 10 at_least "$AGENT_LOG" "system bus: cannot connect" 2 &&
	ok "no bus: the agent tries again"
is "$(count_of "$AGENT_LOG" "going on without logind")" 1 "no bus: logged once"
check "no bus: unlock" unlock_token
sign_ok "no bus" "$key"
check "no bus: the signature verifies" \
	openssl dgst -sha256 -verify "$TOKDIR/ec256.pub.pem" -signature "$T/sig" "$T/msg"
stop_agent
is "$AGENT_RC" 0 "no bus: the agent stops cleanly"

done_testing
