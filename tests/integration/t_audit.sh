#!/bin/bash
# shellcheck disable=SC2317 # functions called through poll/wait_for/check
# t_audit: the audit trail (p11agentd.conf(5) audit, audit-ring; p11agent log).
#
# The test runs in a private mount namespace with a real systemd-journald
# (tmpfs over /run/systemd, /run/log and /var/log/journal, so nothing
# reaches the machine's journal; a tmpfs /dev with its own device nodes and
# /dev/log, so nothing reaches the machine's /dev or kernel log) and the
# agent's default `audit auto` finds it.  Never bind the real /dev into
# the test's directory: the cleanup's rm -rf would go through it into
# the devtmpfs every namespace shares.  The token's PIN is changed to a distinctive string first.
# Then: a wrong PIN and the right one, `p11agent sign` of a file (raw) and
# of a digest with an ordinary key, curl TLS 1.3 and 1.2 handshakes with a
# tls-only key (through the provider and a key-reference file), a tls-only
# refusal, `p11agent lock`, then SIGHUP.  `p11agent log --json` must list
# each event with its fields (program = curl's executable, content
# tls1.3/tls1.2/raw/digest, result, pid, duration), --since and -n filter,
# the journal holds the same events with their P11AGENT_* fields, and
# neither PIN appears in any output, the agent's log or the journal.  A
# second agent with `audit-ring 3` and `audit none` keeps the newest 3 and
# writes nothing to the journal; a third with `audit syslog` and
# `idle-lock 2s` reaches journald's syslog socket through /dev/log, and
# its helper reports the idle lock.
set -eu
if [ -z "${T_AUDIT_NS:-}" ] && [ "$(id -u)" = 0 ] && unshare -m --propagation private true 2>/dev/null; then
	T_AUDIT_NS=1 exec unshare -m --propagation private bash "$0" "$@"
fi
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/tls_lib.sh
. "$lib_dir/tls_lib.sh"

require_cmd openssl curl timeout "$PYTHON3" softhsm2-util pkcs11-tool
require_agent_binaries
require_provider
make_token

PIN=Zq7-audit-PIN-x4W
WRONG_PIN=Wr0ng-audit-PIN-k2
pkcs11-tool --module "$SOFTHSM2_MODULE" --token-label "$TOKEN_LABEL" --login --pin "$USER_PIN" \
	--change-pin --new-pin "$PIN" >"$T/chpin.log" 2>&1 || { diag_file "$T/chpin.log"; bail_out "change the token's PIN"; }

# ---------------------------------------------------------------- journald
JOURNAL=
JOURNAL_SKIP=
JOURNALD=/lib/systemd/systemd-journald
if [ -z "${T_AUDIT_NS:-}" ]; then
	JOURNAL_SKIP="no private mount namespace (needs root and unshare -m)"
elif [ ! -x "$JOURNALD" ]; then
	JOURNAL_SKIP="no $JOURNALD"
else
	for d in /run/systemd /run/log /var/log/journal; do
		if [ -d "$d" ]; then
			mount -t tmpfs -o mode=0755 tmpfs "$d"
		elif [ "$d" = /run/systemd ] || [ "$d" = /run/log ]; then
			JOURNAL_SKIP="no $d to mount over"
		fi
	done
	# A tmpfs /dev in the namespace with its own nodes (mknod: new inodes on
	# that tmpfs, never the machine's devtmpfs, which every namespace
	# shares) and /dev/log, a link to journald's syslog socket.  Nothing of
	# the real /dev is bound anywhere, so no removal can reach it, and
	# journald finds no /dev/kmsg: it neither reads nor writes the
	# machine's kernel log.
	if [ -z "$JOURNAL_SKIP" ] && mount -t tmpfs -o mode=0755 tmpfs /dev; then
		mknod -m 666 /dev/null c 1 3 && mknod -m 666 /dev/zero c 1 5 &&
			mknod -m 666 /dev/random c 1 8 && mknod -m 666 /dev/urandom c 1 9 &&
			mknod -m 666 /dev/tty c 5 0 ||
			JOURNAL_SKIP="cannot make device nodes in the namespace's /dev"
		ln -s /proc/self/fd /dev/fd
		ln -s /proc/self/fd/0 /dev/stdin
		ln -s /proc/self/fd/1 /dev/stdout
		ln -s /proc/self/fd/2 /dev/stderr
		mkdir /dev/shm && mount -t tmpfs -o mode=1777 tmpfs /dev/shm
		ln -s /run/systemd/journal/dev-log /dev/log
	elif [ -z "$JOURNAL_SKIP" ]; then
		JOURNAL_SKIP="cannot put a tmpfs over /dev in the namespace"
	fi
fi
if [ -z "$JOURNAL_SKIP" ]; then
	mkdir -p /run/systemd/journal /run/log/journal
	"$JOURNALD" >"$T/journald.log" 2>&1 &
	JOURNALD_PID=$!
	remember_pid "$JOURNALD_PID"
	if poll 10 test -S /run/systemd/journal/socket; then
		JOURNAL=/run/log/journal
	else
		diag_file "$T/journald.log"
		JOURNAL_SKIP="systemd-journald did not start in the namespace"
	fi
fi
[ -z "$JOURNAL_SKIP" ] || diag "journal checks skipped: $JOURNAL_SKIP"

# journal_json FILE: every p11agentd audit event in the journal, one JSON object a line.
journal_json() {
	journalctl -D "$JOURNAL" -o json --no-pager MESSAGE_ID=5a0b8d3c6f1e4a7b9c2d4e6f8a1b3c5d >"$1" 2>"$T/journalctl.err"
}

# ---------------------------------------------------------------- configuration
# The administrator can lock the audit trail on; bad values name FILE:LINE.
mkdir -p "$T/etc/p11agent" "$T/locked/p11agent"
printf 'lock audit\naudit journal\n' >"$T/etc/p11agent/p11agentd.conf"
printf 'audit none\n' >"$T/locked/p11agent/p11agentd.conf"
run env XDG_CONFIG_HOME="$T/locked" "$P11AGENTD" --print-config --socket "$SOCK" --module "$SOFTHSM2_MODULE"
rc_is 1 "a user's 'audit none' under the administrator's lock: the agent does not start"
stderr_has "$T/locked/p11agent/p11agentd.conf:1: 'audit' is locked by the administrator ($T/etc/p11agent/p11agentd.conf:1)" \
	"the lock's error names both files"
rm "$T/etc/p11agent/p11agentd.conf"
printf 'audit-ring 0\n' >"$T/locked/p11agent/p11agentd.conf"
run env XDG_CONFIG_HOME="$T/locked" "$P11AGENTD" --print-config --socket "$SOCK" --module "$SOFTHSM2_MODULE"
stderr_has "p11agentd.conf:1: audit-ring must be 1..100000 events, not '0'" "audit-ring 0 is refused"
printf 'audit loud\n' >"$T/locked/p11agent/p11agentd.conf"
run env XDG_CONFIG_HOME="$T/locked" "$P11AGENTD" --print-config --socket "$SOCK" --module "$SOFTHSM2_MODULE"
stderr_has "p11agentd.conf:1: audit must be auto, journal, syslog or none, not 'loud'" "audit loud is refused"
printf 'audit syslog\naudit-ring 50\n' >"$T/locked/p11agent/p11agentd.conf"
run env XDG_CONFIG_HOME="$T/locked" "$P11AGENTD" --print-config --socket "$SOCK" --module "$SOFTHSM2_MODULE"
stdout_has "audit syslog	# $T/locked/p11agent/p11agentd.conf:1" "--print-config: audit and where it comes from"
stdout_has "audit-ring 50	# $T/locked/p11agent/p11agentd.conf:2" "--print-config: audit-ring"

mkdir -p "$T/config/p11agent"
CONF=$T/config/p11agent/p11agentd.conf
write_conf() {
	cat >"$CONF" <<CONF
lock-on-suspend no
lock-on-screen-lock no
$*
[key pkcs11:token=$TOKEN_LABEL;object=ec256]
tls-only yes
CONF
}
write_conf ""

check "agent starts" start_agent
running "$AGENT_PID" || bail_out "agent running"
printf '%s\n' "$WRONG_PIN" >"$T/wrong-pin"
printf '%s\n' "$PIN" >"$T/good-pin"
chmod 600 "$T/wrong-pin" "$T/good-pin"
check_fails "a wrong PIN is refused" p11a unlock --pin-file "$T/wrong-pin"
check "the right PIN unlocks" p11a unlock --pin-file "$T/good-pin"
check "list --json" list_json
EC256=$(json_key ec256 uri)
EC384=$(json_key ec384 uri)
if [ -z "$EC256" ] || [ -z "$EC384" ]; then
	bail_out "the agent lists ec256 and ec384"
fi

printf 'a document\n' >"$T/doc"
check "sign a file with ec384" p11a sign --key "$EC384" --scheme ecdsa --hash sha256 --in "$T/doc" --out "$T/sig1"
openssl dgst -sha256 -binary "$T/doc" >"$T/doc.sha256"
check "sign a digest with ec384" p11a sign --key "$EC384" --scheme ecdsa --hash sha256 --digest \
	--in "$T/doc.sha256" --out "$T/sig2"
check_fails "tls-only ec256 refuses a file" p11a sign --key "$EC256" --scheme ecdsa --hash sha256 \
	--in "$T/doc" --out "$T/sig3"

CURL_EXE=$(readlink -f "$(command -v curl)")
check "server certificate" make_server_cert
check "s_server" start_tls_server any
check "ec256: export-key" p11a export-key "$EC256" --out "$T/ec256.key.pem"
if [ -n "$CURL_SKIP" ]; then
	skip "curl TLS 1.3 with tls-only ec256" "$CURL_SKIP"
	skip "curl TLS 1.2 with tls-only ec256" "$CURL_SKIP"
else
	check "curl TLS 1.3 with tls-only ec256" tls_curl "${PORT[any]}" 1.3 "$TOKDIR/ec256.cert.pem" "$T/ec256.key.pem" "$T/curl13.out"
	check "curl TLS 1.2 with tls-only ec256" tls_curl "${PORT[any]}" 1.2 "$TOKDIR/ec256.cert.pem" "$T/ec256.key.pem" "$T/curl12.out"
fi

# An executable whose path holds a newline: the journal field takes the
# binary-safe form of the native protocol, the one-line MESSAGE a '?'.
NL_EXE="$T/odd
p11agent"
cp "$P11AGENT" "$NL_EXE"
check "sign from an executable with a newline in its path" timeout "$CLI_TIMEOUT" "$NL_EXE" --socket "$SOCK" \
	sign --key "$EC384" --scheme ecdsa --hash sha256 --in "$T/doc" --out "$T/sig4"
# And one whose path is not UTF-8: --json must still be JSON (UTF-8).
BAD_EXE=$T/bad$'\xff'p11agent
cp "$P11AGENT" "$BAD_EXE"
check "sign from an executable whose path is not UTF-8" timeout "$CLI_TIMEOUT" "$BAD_EXE" --socket "$SOCK" \
	sign --key "$EC384" --scheme ecdsa --hash sha256 --in "$T/doc" --out "$T/sig5"

# The second part starts a second later: --since must tell them apart.
sleep 1.1
MID=$(date +%s)
sleep 1.1
check "p11agent lock" p11a lock
check "unlock again" p11a unlock --pin-file "$T/good-pin"
kill -HUP "$AGENT_PID"

# stdout_matches ERE DESC: a line of the last run's stdout matches.
stdout_matches() {
	if grep -qE -- "$1" "$T/stdout"; then
		ok "$2"
	else
		not_ok "$2"
		diag "stdout has no line matching: $1"
		diag_last
	fi
}

# log_has N: at least N events are listed.
log_has() {
	p11a log --json >"$T/log.json" 2>"$T/log.err" &&
		"$PYTHON3" -c 'import json,sys; sys.exit(0 if len(json.load(open(sys.argv[1]))) >= int(sys.argv[2]) else 1)' "$T/log.json" "$1"
}
# unlock x3 (wrong, right, again), sign x4, refused x1, lock request, SIGHUP; curl x2
want=10
[ -n "$CURL_SKIP" ] || want=$((want + 2))
wait_for "p11agent log lists $want events" 10 log_has "$want" && ok "p11agent log lists $want events"

# event_check DESC PYTHON-EXPR: one event of `p11agent log --json` makes EXPR true.
"$PYTHON3" - "$T/log.json" "$CURL_EXE" "${CURL_SKIP:+skip}" "$NL_EXE" "$T" >"$T/log.check" 2>&1 <<'PY' || true
import json, sys
ev = json.load(open(sys.argv[1]))
curl = sys.argv[2]
curl_skip = sys.argv[3] == "skip"
nl_exe = sys.argv[4]
tdir = sys.argv[5]
def one(desc, pred):
    hits = [e for e in ev if pred(e)]
    print(("ok" if hits else "FAIL") + " " + desc)
    if not hits:
        print("  events: " + json.dumps(ev)[:3000])
agent_pid_ok = lambda e: isinstance(e["pid"], int) and e["pid"] > 0 and e["uid"] >= 0
one("unlock with the wrong PIN: PIN_INCORRECT", lambda e: e["event"] == "unlock" and e["result"] == "PIN_INCORRECT" and e["uri"].startswith("pkcs11:") and agent_pid_ok(e) and e["program"] == "p11agent")
one("unlock with the right PIN: ok", lambda e: e["event"] == "unlock" and e["result"] == "ok" and e["duration_us"] > 0)
one("sign of a file: raw, ecdsa, ok", lambda e: e["event"] == "sign" and e["content"] == "raw" and e["scheme"] == "ecdsa" and e["result"] == "ok" and "object=ec384" in e["uri"] and e["program"] == "p11agent" and agent_pid_ok(e) and e["duration_us"] > 0)
one("sign of a digest: digest, ok", lambda e: e["event"] == "sign" and e["content"] == "digest" and e["result"] == "ok")
one("tls-only refusal: refused, raw, POLICY", lambda e: e["event"] == "refused" and e["content"] == "raw" and e["result"] == "POLICY" and "tls-only" in (e["error"] or "") and "object=ec256" in e["uri"])
if not curl_skip:
    one("curl TLS 1.3: sign, tls1.3, program curl", lambda e: e["event"] == "sign" and e["content"] == "tls1.3" and e["exe"] == curl and e["program"] == "curl" and e["result"] == "ok" and agent_pid_ok(e))
    one("curl TLS 1.2: sign, tls1.2, program curl", lambda e: e["event"] == "sign" and e["content"] == "tls1.2" and e["exe"] == curl and e["result"] == "ok")
one("an executable with a newline in its path", lambda e: e["event"] == "sign" and e["exe"] == nl_exe)
one("an executable whose path is not UTF-8: '?' for the byte", lambda e: e["event"] == "sign" and e["exe"] == tdir + "/bad?p11agent")
one("p11agent lock: lock, reason request", lambda e: e["event"] == "lock" and e["reason"] == "request" and e["result"] == "ok" and e["program"] == "p11agent")
one("SIGHUP: lock, reason SIGHUP", lambda e: e["event"] == "lock" and e["reason"] == "SIGHUP" and e["pid"] is None)
times = [e["time_us"] for e in ev]
print(("ok" if times == sorted(times) else "FAIL") + " events oldest first")
PY
while read -r st desc; do
	case $st in
	ok) ok "log --json: $desc" ;;
	FAIL) not_ok "log --json: $desc" ;;
	*) diag "$st $desc" ;;
	esac
done <"$T/log.check"
grep -q '^ok events oldest first' "$T/log.check" || { not_ok "the log check ran"; diag_file "$T/log.check"; }

# --since and -n
run p11a log --json --since "@$MID"
rc_is 0 "log --since @TIME"
if "$PYTHON3" -c '
import json, sys
ev = json.load(open(sys.argv[1])); mid = int(sys.argv[2]) * 1000000
assert ev and all(e["time_us"] >= mid for e in ev), ev
kinds = sorted(e["event"] for e in ev)
assert kinds == ["lock", "lock", "unlock"], kinds
' "$T/stdout" "$MID" >"$T/since.err" 2>&1; then
	ok "--since: only the later lock, unlock and SIGHUP lock"
else
	not_ok "--since: only the later lock, unlock and SIGHUP lock"
	diag_file "$T/since.err"
fi
run p11a log --json --since 1h
rc_is 0 "log --since 1h"
is "$("$PYTHON3" -c 'import json,sys; print(len(json.load(open(sys.argv[1]))))' "$T/stdout")" "$want" "--since 1h: every event"
run p11a log --json -n 2
is "$("$PYTHON3" -c 'import json,sys; print(" ".join(e["reason"] or e["event"] for e in json.load(open(sys.argv[1]))))' "$T/stdout")" "unlock SIGHUP" "-n 2: the newest two"
run p11a log --since 'not a time'
rc_is 2 "--since with a bad time is a usage error"
run p11a log
rc_is 0 "p11agent log (human format)"
if [ -z "$CURL_SKIP" ]; then
	stdout_matches "curl\[[0-9]+\] +sign +pkcs11:.*object=ec256.*  ecdsa tls1\.3  ok  \([0-9]+ us\)" "human format: program, pid, event, key, content, result, duration"
else
	skip "human format: curl's line" "$CURL_SKIP"
fi
stdout_matches "p11agent\[[0-9]+\] +unlock +pkcs11:.*  PIN_INCORRECT: " "human format: the wrong PIN's unlock"
cp "$T/stdout" "$T/log.txt"

# ---------------------------------------------------------------- the journal
if [ -n "$JOURNAL_SKIP" ]; then
	for d in "journal: sign tls1.3 by curl" "journal: refusal" "journal: wrong PIN" "journal: locks" \
		"journal: a newline in the executable's path" "journal: PRIORITY"; do
		skip "$d" "$JOURNAL_SKIP"
	done
else
	# journald may take a moment to write what it received.
	jhas() { journal_json "$T/journal.json" && [ "$(wc -l <"$T/journal.json")" -ge "$want" ]; }
	poll 10 jhas || diag "journal has $(wc -l <"$T/journal.json") audit events, want $want"
	"$PYTHON3" - "$T/journal.json" "$CURL_EXE" "$AGENT_PID" "${CURL_SKIP:+skip}" "$NL_EXE" >"$T/journal.check" 2>&1 <<'PY' || true
import json, sys
ev = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
curl, agent, curl_skip, nl_exe = sys.argv[2], sys.argv[3], sys.argv[4] == "skip", sys.argv[5]
def one(desc, pred):
    hits = [e for e in ev if pred(e)]
    print(("ok" if hits else "FAIL") + " " + desc)
    if not hits:
        print("  events: " + json.dumps(ev)[:3000])
# journalctl -o json gives a value with unprintable bytes as an array of numbers.
g = lambda e, k: e.get(k) if isinstance(e.get(k), str) else bytes(e[k]).decode("utf-8", "replace") if isinstance(e.get(k), list) else None
if curl_skip:
    print("skip journal: sign tls1.3 by curl")
else:
    one("journal: sign tls1.3 by curl", lambda e: g(e, "P11AGENT_EVENT") == "sign" and g(e, "P11AGENT_CONTENT") == "tls1.3" and g(e, "P11AGENT_EXE") == curl and g(e, "P11AGENT_SCHEME") == "ecdsa" and g(e, "P11AGENT_RESULT") == "ok" and (g(e, "P11AGENT_PID") or "").isdigit() and (g(e, "P11AGENT_UID") or "").isdigit() and int(g(e, "P11AGENT_DURATION_US") or 0) > 0 and "object=ec256" in (g(e, "P11AGENT_KEY_URI") or "") and g(e, "_PID") == agent and g(e, "SYSLOG_IDENTIFIER") == "p11agentd" and "sign by " + curl in g(e, "MESSAGE"))
one("journal: refusal", lambda e: g(e, "P11AGENT_EVENT") == "refused" and g(e, "P11AGENT_RESULT") == "POLICY" and g(e, "P11AGENT_CONTENT") == "raw" and g(e, "PRIORITY") == "4")
one("journal: wrong PIN", lambda e: g(e, "P11AGENT_EVENT") == "unlock" and g(e, "P11AGENT_RESULT") == "PIN_INCORRECT" and (g(e, "P11AGENT_TOKEN_URI") or "").startswith("pkcs11:"))
one("journal: locks", lambda e: g(e, "P11AGENT_EVENT") == "lock" and g(e, "P11AGENT_REASON") == "SIGHUP")
one("journal: a newline in the executable's path (binary field, MESSAGE scrubbed)", lambda e: g(e, "P11AGENT_EXE") == nl_exe and "\n" not in g(e, "MESSAGE") and "odd?p11agent" in g(e, "MESSAGE"))
one("journal: PRIORITY", lambda e: g(e, "P11AGENT_EVENT") == "unlock" and g(e, "P11AGENT_RESULT") == "ok" and g(e, "PRIORITY") == "6")
PY
	while read -r st desc; do
		case $st in
		ok) ok "$desc" ;;
		FAIL) not_ok "$desc" ;;
		skip) skip "$desc" "$CURL_SKIP" ;;
		*) diag "$st $desc" ;;
		esac
	done <"$T/journal.check"
	[ "$(grep -c '^\(ok\|FAIL\|skip\) ' "$T/journal.check")" = 6 ] || { not_ok "the journal check ran"; diag_file "$T/journal.check"; }
fi

# ---------------------------------------------------------------- no PIN anywhere
pin_nowhere() {
	local f
	for f in "$@"; do
		if grep -aqF -e "$PIN" -e "$WRONG_PIN" "$f"; then
			diag "a PIN is in $f"
			return 1
		fi
	done
}
files=("$T/log.json" "$T/log.txt" "$AGENT_LOG")
if [ -n "$JOURNAL" ]; then
	journalctl -D "$JOURNAL" -o export --no-pager >"$T/journal.export" 2>/dev/null
	files+=("$T/journal.export")
	# The check can fail: the journal holds what we put there.
	grep -aqF "P11AGENT_EVENT=unlock" "$T/journal.export" || not_ok "the journal export holds the unlock events"
fi
check "neither PIN in the log, the agent's log or the journal" pin_nowhere "${files[@]}"

# ---------------------------------------------------------------- the ring's bound, audit none
stop_agent
write_conf "audit-ring 3
audit none"
check "agent with audit-ring 3, audit none" start_agent
p11a unlock --pin-file "$T/good-pin" >/dev/null 2>&1 || true
for i in 1 2 3 4 5; do
	printf 'doc %s\n' "$i" >"$T/doc$i"
	p11a sign --key "$EC384" --scheme ecdsa --hash sha256 --in "$T/doc$i" --out "$T/sig$i" || not_ok "sign $i"
done
signs3() {
	p11a log --json >"$T/ring.json" &&
		"$PYTHON3" -c 'import json,sys; ev=json.load(open(sys.argv[1])); sys.exit(0 if [e["event"] for e in ev] == ["sign"]*3 else 1)' "$T/ring.json"
}
wait_for "audit-ring 3: the newest three signatures" 10 signs3 && ok "audit-ring 3: the newest three signatures"
if [ -n "$JOURNAL" ]; then
	journal_json "$T/journal2.json"
	is "$(grep -c "\"_PID\":\"$AGENT_PID\"" "$T/journal2.json" || true)" 0 "audit none: nothing in the journal"
else
	skip "audit none: nothing in the journal" "$JOURNAL_SKIP"
fi

# ---------------------------------------------------------------- syslog
SYSLOG_SKIP=$JOURNAL_SKIP
if [ -n "$SYSLOG_SKIP" ]; then
	skip "audit syslog: the event reaches syslog" "$SYSLOG_SKIP"
	skip "audit syslog: facility authpriv" "$SYSLOG_SKIP"
	skip "idle-lock: a lock event, reason idle, from the helper" "$SYSLOG_SKIP"
	skip "idle-lock: the lock reaches syslog" "$SYSLOG_SKIP"
	skip "neither PIN in the syslog records or the agent's log" "$SYSLOG_SKIP"
else
	stop_agent
	write_conf "audit syslog
idle-lock 2s"
	check "agent with audit syslog, idle-lock 2s" start_agent
	p11a unlock --pin-file "$T/good-pin" >/dev/null 2>&1 || true
	check "sign (syslog)" p11a sign --key "$EC384" --scheme ecdsa --hash sha256 --in "$T/doc" --out "$T/sig9"
	slog() {
		journalctl -D "$JOURNAL" -o json --no-pager _TRANSPORT=syslog SYSLOG_IDENTIFIER=p11agentd >"$T/syslog.json" 2>/dev/null &&
			grep -q 'sign by [^"]*p11agent\[[0-9]*\]: pkcs11:[^"]*object=ec384[^"]* ecdsa raw: ok' "$T/syslog.json"
	}
	wait_for "audit syslog: the event reaches syslog" 10 slog && ok "audit syslog: the event reaches syslog"
	file_has "$T/syslog.json" '"SYSLOG_FACILITY":"10"' "audit syslog: facility authpriv"
	# The helper locks the idle token itself and reports it (H_EVENT).
	idle_locked() {
		p11a log --json >"$T/idle.json" &&
			"$PYTHON3" -c 'import json,sys; sys.exit(0 if any(e["event"] == "lock" and e["reason"] == "idle" and e["pid"] is None and e["uri"].startswith("pkcs11:") for e in json.load(open(sys.argv[1]))) else 1)' "$T/idle.json"
	}
	wait_for "idle-lock: a lock event, reason idle, from the helper" 15 idle_locked &&
		ok "idle-lock: a lock event, reason idle, from the helper"
	islog() {
		journalctl -D "$JOURNAL" -o json --no-pager _TRANSPORT=syslog SYSLOG_IDENTIFIER=p11agentd >"$T/syslog.json" 2>/dev/null &&
			grep -q 'lock (idle): pkcs11:[^"]*: ok' "$T/syslog.json"
	}
	wait_for "idle-lock: the lock reaches syslog" 10 islog && ok "idle-lock: the lock reaches syslog"
	journalctl -D "$JOURNAL" -o export --no-pager >"$T/journal-all.export" 2>/dev/null
	check "neither PIN in the syslog records or the agent's log" pin_nowhere "$T/syslog.json" \
		"$T/journal-all.export" "$AGENT_LOG"
fi

done_testing
