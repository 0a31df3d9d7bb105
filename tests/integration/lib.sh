# shellcheck shell=bash
# lib.sh: sourced by every tests/integration/t_*.sh.
#
# Gives each test:
#   - TAP output: ok/not ok lines numbered by the library, diag lines,
#     done_testing (prints the plan "1..N" at the end) and an exit status
#     that is non-zero when anything failed, the plan was not reached, or the
#     script stopped early;
#   - a private temporary directory $T with its own SoftHSM2 token store
#     (make_token), never the system one;
#   - start_agent/stop_agent for p11agentd in the foreground on $T/agent.sock
#     (SoftHSM2, another module, or a configuration naming its modules);
#   - poll/wait_for: wait on an event (a socket, a log line, a pid's exit, a
#     status field) with a deadline instead of sleeping for a guess;
#   - relay_cases: the checks of a Python driver (p11a_proto.Cases) as TAP;
#   - the helpers tls_lib.sh and pkcs11_lib.sh share: skip, free_port,
#     port_listening/wait_port, asan_env;
#   - a cleanup trap that stops only the processes this test started, by PID,
#     and removes $T.
#
# Environment (exported by `make check`; defaulted when run by hand from the
# source tree): top_builddir, top_srcdir, SOFTHSM2_MODULE, PYTHON3.
set -eu

# The environment may point every TLS client at some CA bundle; the tests
# choose their own CAs.
unset GIT_SSL_CAINFO CURL_CA_BUNDLE SSL_CERT_FILE
# A socket path from the caller's session must not leak into a test.
unset P11AGENT_SOCK P11AGENT_PID

lib_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top_srcdir=${top_srcdir:-$(cd "$lib_dir/../.." && pwd)}
top_builddir=${top_builddir:-$top_srcdir}
SOFTHSM2_MODULE=${SOFTHSM2_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
PYTHON3=${PYTHON3:-/usr/bin/python3}
# The tests' Python imports p11a_proto (the wire protocol) from here.
PYTHONPATH=$lib_dir${PYTHONPATH:+:$PYTHONPATH}
export top_srcdir top_builddir SOFTHSM2_MODULE PYTHON3 PYTHONPATH

# P11A_INSTALLED=/usr (say): the tests run the installed programs instead
# of the build tree's (tests/packages/run.sh runs the TLS tests that way).
if [ -n "${P11A_INSTALLED:-}" ]; then
	P11AGENTD=$P11A_INSTALLED/bin/p11agentd
	P11AGENT=$P11A_INSTALLED/bin/p11agent
else
	P11AGENTD=$top_builddir/p11agentd
	P11AGENT=$top_builddir/p11agent
fi
# Upper bound on any single CLI call, so a hung agent fails a test instead
# of hanging the suite.
CLI_TIMEOUT=${CLI_TIMEOUT:-60}
# No PIN or confirm dialogs (pinentry) from a signature on a locked token:
# a test run must not pop up windows on a developer's desktop, and the
# tests of locked tokens expect the error.  t_pinentry and t_confirm unset it.
export P11AGENT_NO_PROMPT=1

TOKEN_LABEL=p11agent-test
USER_PIN=1234
# shellcheck disable=SC2034 # for the tests that source this file
SO_PIN=12345678

test_name=$(basename "$0" .sh)
test_num=0
fail_count=0
finished=no
started_pids=()
AGENT_PID=
AGENT_HELPERS=

# Keep test programs away from the terminal: no PIN prompt can hang a run.
exec </dev/null

# Socket paths must fit in sun_path (108 bytes): a long TMPDIR is no good.
tmp_base=${TMPDIR:-/tmp}
[ "${#tmp_base}" -le 40 ] || tmp_base=/tmp
T=$(mktemp -d "$tmp_base/p11agent-$test_name.XXXXXX")
SOCK=$T/agent.sock
AGENT_LOG=$T/agent.log
# tpm2-pkcs11's package registers it with p11-kit system-wide: an agent
# that reads the registry loads it, and it then looks for a TPM (the system
# bus's tpm2-abrmd, /dev/tpmrm0, a simulator on 127.0.0.1:2321, where
# another test's swtpm may listen) and makes its store in ~/.tpm2_pkcs11.
# Here it finds neither and fails C_Initialize, as on a machine without a
# TPM; tests/tokens/setup-tpm2.sh's token.env points both at its own TPM.
TPM2_PKCS11_STORE=$T/tpm2-pkcs11-none
TPM2_PKCS11_TCTI=device:$T/no-tpm
export TPM2_PKCS11_STORE TPM2_PKCS11_TCTI
# The machine's administrator's file (SYSCONFDIR/p11agent/p11agentd.conf)
# must not change a test: every agent reads $T/etc/p11agent/p11agentd.conf
# instead (absent unless a test writes it); start_agent also points the
# user's file at $T/config.  See p11agentd.conf(5).
P11AGENT_SYSCONFDIR=$T/etc
export P11AGENT_SYSCONFDIR

# ---------------------------------------------------------------- TAP

diag() {
	local line
	for line in "$@"; do
		# Every line of a multi-line message stays a TAP comment.
		printf '%s\n' "$line" | sed 's/^/# /'
	done
}

# diag_file FILE [MAXLINES]: show a file's tail as diag lines.
diag_file() {
	[ -s "$1" ] || return 0
	local n=${2:-30}
	diag "--- $(basename "$1") (last $n lines)"
	tail -n "$n" "$1" | sed 's/^/#   /'
}

ok() {
	test_num=$((test_num + 1))
	printf 'ok %d - %s\n' "$test_num" "$1"
}

not_ok() {
	test_num=$((test_num + 1))
	fail_count=$((fail_count + 1))
	printf 'not ok %d - %s\n' "$test_num" "$1"
}

# result STATUS DESC: ok when STATUS is 0.
result() {
	if [ "$1" -eq 0 ]; then
		ok "$2"
	else
		not_ok "$2"
	fi
}

# check DESC CMD...: ok when CMD succeeds; its output is shown on failure.
check() {
	local desc=$1
	shift
	if "$@" >"$T/check.out" 2>&1; then
		ok "$desc"
	else
		local st=$?
		not_ok "$desc"
		diag "command: $* (exit $st)"
		diag_file "$T/check.out"
	fi
}

# check_fails DESC CMD...: ok when CMD fails.
check_fails() {
	local desc=$1
	shift
	if "$@" >"$T/check.out" 2>&1; then
		not_ok "$desc"
		diag "command unexpectedly succeeded: $*"
		diag_file "$T/check.out"
	else
		ok "$desc"
	fi
}

# is GOT EXPECTED DESC
is() {
	if [ "$1" = "$2" ]; then
		ok "$3"
	else
		not_ok "$3"
		diag "got:      '$1'" "expected: '$2'"
	fi
}

# run CMD...: run a command and keep its exit status in $rc, its stdout in
# $T/stdout and its stderr in $T/stderr (for rc_is, stderr_has, ...).
# Standard input is the caller's (redirect it at the call: run cmd <file).
rc=0
run() {
	if "$@" >"$T/stdout" 2>"$T/stderr"; then
		rc=0
	else
		rc=$?
	fi
	last_cmd="$*"
}
last_cmd=

diag_last() {
	diag "command: $last_cmd (exit $rc)"
	diag_file "$T/stdout" 15
	diag_file "$T/stderr" 15
}

# rc_is N DESC: the last run exited N.
rc_is() {
	if [ "$rc" -eq "$1" ]; then
		ok "$2"
	else
		not_ok "$2"
		diag "expected exit status $1"
		diag_last
	fi
}

# stderr_has TEXT DESC / stdout_has TEXT DESC: fixed-string match on the
# last run's output.
stderr_has() {
	if grep -qF -- "$1" "$T/stderr"; then
		ok "$2"
	else
		not_ok "$2"
		diag "stderr lacks: $1"
		diag_last
	fi
}

stdout_has() {
	if grep -qF -- "$1" "$T/stdout"; then
		ok "$2"
	else
		not_ok "$2"
		diag "stdout lacks: $1"
		diag_last
	fi
}

# file_has FILE TEXT DESC / file_lacks FILE TEXT DESC
file_has() {
	if grep -qF -- "$2" "$1"; then
		ok "$3"
	else
		not_ok "$3"
		diag "$(basename "$1") lacks: $2"
		diag_file "$1" 15
	fi
}

file_lacks() {
	if grep -qF -- "$2" "$1"; then
		not_ok "$3"
		diag "$(basename "$1") contains: $2"
		grep -nF -- "$2" "$1" | head -n 5 | sed 's/^/#   /'
	else
		ok "$3"
	fi
}

# skip DESC REASON: a TAP check that was not run ("ok N - DESC # SKIP REASON").
skip() {
	ok "$1 # SKIP $2"
}

# plan N: announce N checks up front (optional; without it done_testing
# prints the plan at the end, which TAP allows too).
planned=
plan() {
	planned=$1
	printf '1..%d\n' "$1"
}

# done_testing: print the plan (unless announced) and end the script with
# the right status.
done_testing() {
	finished=yes
	if [ -z "$planned" ]; then
		printf '1..%d\n' "$test_num"
	elif [ "$planned" -ne "$test_num" ]; then
		diag "$test_name: planned $planned checks but ran $test_num"
		fail_count=$((fail_count + 1))
	fi
	if [ "$fail_count" -gt 0 ]; then
		diag "$test_name: $fail_count of $test_num checks failed"
		exit 1
	fi
	exit 0
}

# bail_out REASON: stop the whole test now (counts as a failure).
bail_out() {
	not_ok "$1"
	diag_file "$AGENT_LOG" 20
	done_testing
}

# require_cmd CMD...: every CMD must be there (a name in PATH or a path to
# an executable).  A missing tool is a failure, not a skip: CI installs
# everything, so a missing tool means a broken setup.
require_cmd() {
	local c missing=
	for c in "$@"; do
		command -v "$c" >/dev/null 2>&1 || missing="$missing $c"
	done
	if [ -n "$missing" ]; then
		bail_out "required tools present (missing:$missing)"
	fi
}

# require_file FILE...
require_file() {
	local f missing=
	for f in "$@"; do
		[ -e "$f" ] || missing="$missing $f"
	done
	if [ -n "$missing" ]; then
		bail_out "required files present (missing:$missing)"
	fi
}

# ---------------------------------------------------------------- processes

# remember_pid PID: a process this test started (cleanup stops it).
remember_pid() {
	started_pids+=("$1")
}

# forget_pid PID: a remembered process that has been reaped (its PID may
# be reused by someone else's process from now on).
forget_pid() {
	local p keep=()
	for p in "${started_pids[@]}"; do
		[ "$p" = "$1" ] || keep+=("$p")
	done
	started_pids=("${keep[@]}")
}

# alive PID
alive() {
	[ -n "$1" ] && kill -0 "$1" 2>/dev/null
}

# proc_state PID: the state letter from /proc/PID/stat (Z for a zombie).
proc_state() {
	local line
	read -r line 2>/dev/null <"/proc/$1/stat" || return 0
	line=${line##*) }
	printf '%s\n' "${line%% *}"
}

# running PID: alive and not a zombie.
running() {
	alive "$1" && [ "$(proc_state "$1")" != Z ]
}

# now_us: the wall clock in microseconds (bash 5's EPOCHREALTIME).
now_us() {
	local t=$EPOCHREALTIME
	printf '%s\n' "${t/[.,]/}"
}

# poll SECONDS CMD...: run CMD until it succeeds; 1 when it has not within
# SECONDS (a whole or decimal number).  CMD's output is left alone.  For
# waiting on an event (a socket, a log line, a pid's exit, a status field)
# instead of sleeping for a guess: the 0.05 s between tries is the polling
# period, never the synchronisation.
POLL_INTERVAL=${POLL_INTERVAL:-0.05}
poll() {
	local secs=$1 deadline
	shift
	deadline=$(($(now_us) + $(awk -v s="$secs" 'BEGIN { printf "%d", s * 1000000 }')))
	until "$@"; do
		[ "$(now_us)" -lt "$deadline" ] || return 1
		sleep "$POLL_INTERVAL"
	done
	return 0
}

# wait_for DESC SECONDS CMD...: poll SECONDS CMD...; when the deadline
# passes, a failed check "DESC (within SECONDS s)" and status 1.  Silent
# on success: the caller's own checks follow.
wait_for() {
	local desc=$1 secs=$2
	shift 2
	if poll "$secs" "$@"; then
		return 0
	fi
	not_ok "$desc (within $secs s)"
	diag "still false after $secs s: $*"
	return 1
}

# pid_gone PID: PID has exited (and is reaped when it is our child: a
# dead child of ours stays a zombie until waited for).
pid_gone() {
	! running "$1"
}

# wait_gone PID SECONDS: wait until PID has exited; returns 1 on timeout.
wait_gone() {
	poll "$2" pid_gone "$1"
}

# stop_pid PID: SIGTERM, then SIGKILL after 5 s.
stop_pid() {
	alive "$1" || return 0
	kill -TERM "$1" 2>/dev/null || return 0
	if ! wait_gone "$1" 5; then
		diag "pid $1 ignored SIGTERM for 5 s; sending SIGKILL"
		kill -KILL "$1" 2>/dev/null || true
		wait_gone "$1" 5 || diag "pid $1 survived SIGKILL"
	fi
	wait "$1" 2>/dev/null || true
	forget_pid "$1"
}

# child_pids PID: the direct children of PID (from /proc, no procps needed).
child_pids() {
	local f line a
	for f in /proc/[0-9]*/stat; do
		read -r line 2>/dev/null <"$f" || continue
		# comm may hold spaces and ')': the fields after the last ')'
		# are state, ppid, ...
		read -r -a a <<<"${line##*) }"
		if [ "${a[1]}" = "$1" ]; then
			f=${f#/proc/}
			printf '%s\n' "${f%/stat}"
		fi
	done
}

# child_pid_list PID: the same, on one line separated by spaces.
child_pid_list() {
	local l
	l=$(child_pids "$1" | tr '\n' ' ')
	printf '%s\n' "${l% }"
}

# at_cleanup FUNCTION: call FUNCTION when the test ends, after its
# processes are stopped and before $T is removed (an account the test
# made, say).  Functions run in the order given.
cleanup_funcs=()
at_cleanup() {
	cleanup_funcs+=("$1")
}

cleanup() {
	local st=$? pid fn
	set +e
	if [ "$finished" != yes ]; then
		test_num=$((test_num + 1))
		printf 'not ok %d - %s stopped early (exit status %d)\n' "$test_num" "$test_name" "$st"
		diag_file "$AGENT_LOG" 40
		[ -n "$planned" ] || printf '1..%d\n' "$test_num"
		st=1
	fi
	for pid in "${started_pids[@]}"; do
		stop_pid "$pid"
	done
	# Helpers the agent forked: they are ours too.  Stop them by PID only
	# when they still run our binary (PID reuse).
	for pid in $AGENT_HELPERS; do
		if alive "$pid" && [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$(readlink -f "$P11AGENTD")" ]; then
			diag "agent helper $pid outlived the agent; stopping it"
			stop_pid "$pid"
		fi
	done
	for fn in ${cleanup_funcs[@]+"${cleanup_funcs[@]}"}; do
		"$fn"
	done
	if [ -n "${KEEP_TMP:-}" ]; then
		echo "# KEEP_TMP set: kept $T" >&2
	else
		rm -rf "$T"
	fi
	exit "$st"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- loopback ports

# free_port: a TCP port on 127.0.0.1 that nobody listens on right now.
free_port() {
	"$PYTHON3" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# port_listening PORT: something listens on 127.0.0.1:PORT (from /proc, no
# tools needed, no connection made).
port_listening() {
	local hex
	hex=$(printf '%04X' "$1")
	awk -v p=":$hex" 'NR > 1 && $4 == "0A" && substr($2, length($2) - 4) == p { f = 1 } END { exit !f }' \
		/proc/net/tcp
}

# listening_or_gone PORT PID: PORT listens, or PID (the server meant to
# listen there) has exited: a poll for a server's start that ends early
# when it died.
listening_or_gone() {
	port_listening "$1" || ! running "$2"
}

# socket_or_gone PATH PID: a socket is at PATH, or PID (the process meant
# to create it) has exited.
socket_or_gone() {
	[ -S "$1" ] || ! running "$2"
}

# wait_port PORT [SECONDS]: until something listens on 127.0.0.1:PORT
# (default 10 s); 1 on timeout.
wait_port() {
	poll "${2:-10}" port_listening "$1"
}

# ---------------------------------------------------------------- sanitizer builds

# asan_env MODULE [cxx]: in a sanitizer build (configure --enable-asan)
# the programs that load MODULE (a provider or PKCS#11 module) need the
# ASan runtime loaded first: ASAN_ENV becomes the env(1) assignments that
# preload it (and, with "cxx", libstdc++ too: ASan's __cxa_throw
# interceptor must find it at start-up, or C++ clients such as PyKCS11
# abort at their first throw) and leave the clients' own leaks alone.
# Empty in an ordinary build; returns 1 then.
ASAN_ENV=()
# shellcheck disable=SC2034 # ASAN_ENV is for tls_lib.sh and pkcs11_lib.sh
asan_env() {
	local asan cxx=
	ASAN_ENV=()
	asan=$(ldd "$1" 2>/dev/null | awk '$1 ~ /^libasan\.so/ { print $3; exit }')
	[ -n "$asan" ] || return 1
	if [ "${2:-}" = cxx ]; then
		cxx=$(/sbin/ldconfig -p 2>/dev/null | awk '$1 == "libstdc++.so.6" && /x86-64/ { print $NF; exit }')
	fi
	ASAN_ENV=(LD_PRELOAD="$asan${cxx:+ $cxx}" ASAN_OPTIONS="detect_leaks=0:${ASAN_OPTIONS:-}")
}

# ---------------------------------------------------------------- token

# make_token: a fresh SoftHSM2 token store in $T/token with the test keys
# (mktoken.sh); exports SOFTHSM2_CONF.  Sets TOKDIR.
TOKDIR=$T/token
make_token() {
	if ! bash "$lib_dir/mktoken.sh" "$TOKDIR" >"$T/mktoken.log" 2>&1; then
		diag_file "$T/mktoken.log"
		bail_out "mktoken.sh made the test token"
	fi
	SOFTHSM2_CONF=$TOKDIR/softhsm2.conf
	export SOFTHSM2_CONF
}

# key_labels: every key label on the test token, in keys.tsv order.
key_labels() {
	cut -f1 "$TOKDIR/keys.tsv"
}

# key_attr LABEL FIELD: a column of keys.tsv (id type bits curve origin subject).
key_attr() {
	local col
	case $2 in
	id) col=2 ;; type) col=3 ;; bits) col=4 ;; curve) col=5 ;;
	origin) col=6 ;; subject) col=7 ;;
	*) echo "key_attr: bad field $2" >&2; return 1 ;;
	esac
	awk -F '\t' -v l="$1" -v c="$col" '$1 == l { v = $c; if (v == "-") v = ""; print v }' \
		"$TOKDIR/keys.tsv"
}

# ---------------------------------------------------------------- fault module

# fault_setup "TYPE ID LABEL"...: an agent configuration with two instances
# of the fault module (tests/fault/libp11afault.so, see docs/reliability.md)
# over the test's token store, as t_faults and t_soak run it.  Makes a second
# token $TWO_LABEL with these key pairs generated on it (pkcs11-tool
# --key-type TYPE); copies the module to $T/faulty.so (shows token
# $TOKEN_LABEL, obeys control file $CTL) and $T/steady.so (shows $TWO_LABEL,
# obeys $CTL_B): the agent names a module by its file name; writes
# $T/agent.conf with both, socket $SOCK and sign-timeout $SIGN_TIMEOUT (the
# caller may append settings); exports P11A_FAULT_MODULE.  After make_token.
TWO_LABEL=p11agent-two
CTL=$T/ctl-faulty
CTL_B=$T/ctl-steady
SIGN_TIMEOUT=3
fault_setup() {
	local la=$top_builddir/tests/fault/.libs/libp11afault.so
	require_file "$la"
	: >"$CTL"
	: >"$CTL_B"
	if ! token_two "$@" >"$T/two.log" 2>&1; then
		diag_file "$T/two.log"
		bail_out "second SoftHSM2 token made"
	fi
	cp "$la" "$T/faulty.so"
	cp "$la" "$T/steady.so"
	cat >"$T/agent.conf" <<EOF
socket $SOCK
sign-timeout $SIGN_TIMEOUT
module $T/faulty.so
module-init-args control=$CTL label=$TOKEN_LABEL
module $T/steady.so
module-init-args control=$CTL_B label=$TWO_LABEL
EOF
	export P11A_FAULT_MODULE=$SOFTHSM2_MODULE
}

# calls FUNC: how often the fault module saw FUNC (C_Login, C_Sign,
# C_Initialize), from $CTL.calls.
calls() {
	local n=0
	[ ! -f "$CTL.calls" ] || n=$(grep -c "^$1 " "$CTL.calls" || true)
	printf '%s\n' "$n"
}

token_two() {
	local spec ktype kid klabel
	softhsm2-util --init-token --free --label "$TWO_LABEL" --pin "$USER_PIN" --so-pin "$SO_PIN" || return 1
	for spec in "$@"; do
		read -r ktype kid klabel <<<"$spec"
		pkcs11-tool --module "$SOFTHSM2_MODULE" --token-label "$TWO_LABEL" --login --pin "$USER_PIN" \
			--keypairgen --key-type "$ktype" --id "$kid" --label "$klabel" || return 1
	done
}

# ---------------------------------------------------------------- agent

# ---------------------------------------------------------------- the test pinentry
# pinentry_setup: dialogs go to test_pinentry.py, copied to $T/test-pinentry
# (the caller names it as pinentry-program); it answers from
# $PDIR/behaviour and logs one line per dialog to $PDIR/log.  Lets the
# agent prompt (unsets P11AGENT_NO_PROMPT).
PDIR=$T/pinentry
pinentry_setup() {
	mkdir -p "$PDIR"
	export TEST_PINENTRY_DIR=$PDIR
	unset P11AGENT_NO_PROMPT
	cp "$lib_dir/test_pinentry.py" "$T/test-pinentry"
	chmod 755 "$T/test-pinentry"
}

# behave LINE...: what the test pinentry answers next.
behave() {
	printf '%s\n' "$@" >"$PDIR/behaviour.new"
	mv -f "$PDIR/behaviour.new" "$PDIR/behaviour"
}

# dialogs [KIND]: how many dialogs (of KIND: GETPIN, CONFIRM, MESSAGE) the
# test pinentry has shown.
dialogs() {
	local n=0
	[ ! -f "$PDIR/log" ] || n=$(grep -c "^${1:-}" "$PDIR/log" || true)
	printf '%s\n' "$n"
}

# last_dialog: the log line of the last dialog.
last_dialog() {
	tail -n 1 "$PDIR/log" 2>/dev/null
}

# bg_signers N KEY TAG: N `p11agent sign` (ecdsa) of $T/msg with KEY at
# once, in the background (remembered); signer i writes $T/sig.TAGi and
# its stderr to $T/sign.TAGi.err.  bg_signers_refused TAG TEXT: waits for
# them all; BG_BAD is how many did not fail with TEXT in their error (a
# diag for each).
BG_SIGNERS=() BG_BAD=0
bg_signers() {
	local i
	BG_SIGNERS=()
	for i in $(seq "$1"); do
		timeout "$CLI_TIMEOUT" "$P11AGENT" --socket "$SOCK" sign --key "$2" --scheme ecdsa \
			--in "$T/msg" --out "$T/sig.$3$i" >/dev/null 2>"$T/sign.$3$i.err" &
		BG_SIGNERS+=("$!")
		remember_pid "$!"
	done
}
bg_signers_refused() {
	local i st
	BG_BAD=0
	for i in "${!BG_SIGNERS[@]}"; do
		st=0
		wait "${BG_SIGNERS[$i]}" || st=$?
		forget_pid "${BG_SIGNERS[$i]}"
		if [ "$st" -eq 0 ] || ! grep -q -- "$2" "$T/sign.$1$((i + 1)).err"; then
			BG_BAD=$((BG_BAD + 1))
			diag "signer $1$((i + 1)): exit $st"
			diag_file "$T/sign.$1$((i + 1)).err"
		fi
	done
}

# ---------------------------------------------------------------- a terminal in tmux
# For the real terminal pinentries (pinentry-curses): a tmux server of the
# test's own on $T/tmux.sock (stopped at cleanup, by PID) with one 100x30
# pane "p11a" that ran `p11agent updatestartuptty`, so the agent's dialogs
# draw there.  The test reads the pane with screen_text and types with
# tmux_cmd send-keys -t p11a.
TMUX_TTY=
TMUX_SERVER_PID=
tmux_cmd() {
	tmux -S "$T/tmux.sock" "$@"
}
screen_text() {
	tmux_cmd capture-pane -p -t p11a 2>/dev/null
}
# tmux_start: the pane is up and updatestartuptty ran there (within 20 s);
# its terminal is $TMUX_TTY.
tmux_start() {
	rm -f "$T/tmux.ready" "$T/tmux.tty"
	tmux_cmd -f /dev/null new-session -d -s p11a -x 100 -y 30 \
		"tty >$T/tmux.tty && $P11AGENT --socket $SOCK updatestartuptty && touch $T/tmux.ready; exec sleep 300" ||
		return 1
	TMUX_SERVER_PID=$(tmux_cmd display-message -p '#{pid}' 2>/dev/null || true)
	[ -z "$TMUX_SERVER_PID" ] || remember_pid "$TMUX_SERVER_PID"
	poll 20 test -e "$T/tmux.ready" || return 1
	TMUX_TTY=$(cat "$T/tmux.tty")
}
tmux_stop() {
	tmux_cmd kill-server 2>/dev/null || true
	if [ -n "$TMUX_SERVER_PID" ]; then
		wait_gone "$TMUX_SERVER_PID" 10 || true
		forget_pid "$TMUX_SERVER_PID"
	fi
	TMUX_SERVER_PID=
}
# screen_has TEXT: the pane shows TEXT.
screen_has() {
	screen_text | grep -qF -- "$1"
}
# tty_sane: the pane's terminal echoes and is in canonical mode.
tty_sane() {
	local a
	a=" $(stty -F "$TMUX_TTY" -a 2>/dev/null | tr '\n;' '  ') "
	case $a in *" echo "*) ;; *) return 1 ;; esac
	case $a in *" icanon "*) ;; *) return 1 ;; esac
}
# screen_shows TEXT DESC: a check that the pane shows TEXT within 30 s.
screen_shows() {
	if poll 30 screen_has "$1"; then
		ok "$2"
	else
		not_ok "$2"
		diag "$(screen_text)"
	fi
}

# dialog_sign KEY OUT: `p11agent sign` (ecdsa) of $T/msg into OUT in the
# background (remembered; its stderr in OUT.err), for a dialog to answer
# meanwhile.  dialog_sign_done DESC: waits for it; a check that it exited 0
# and wrote OUT.
DIALOG_SIGN_PID='' DIALOG_SIGN_OUT=''
dialog_sign() {
	DIALOG_SIGN_OUT=$2
	p11a sign --key "$1" --scheme ecdsa --in "$T/msg" --out "$2" >/dev/null 2>"$2.err" &
	DIALOG_SIGN_PID=$!
	remember_pid "$DIALOG_SIGN_PID"
}
dialog_sign_done() {
	local st=0
	wait "$DIALOG_SIGN_PID" || st=$?
	forget_pid "$DIALOG_SIGN_PID"
	if [ "$st" -eq 0 ] && [ -s "$DIALOG_SIGN_OUT" ]; then
		ok "$1"
	else
		not_ok "$1"
		diag "exit status $st"
		diag_file "$DIALOG_SIGN_OUT.err"
	fi
}

# relay_cases FILE: turns the lines a Python case driver printed (see
# p11a_proto.Cases) into TAP checks: "ok<TAB>DESC", "not ok<TAB>DESC<TAB>WHY",
# "#<TAB>TEXT" or "# TEXT" (diag), "figure<TAB>NAME<TAB>VALUE" (a diag line;
# FIGURE[NAME]=VALUE), "done<TAB>TEXT" (CASES_DONE=TEXT, or "done" alone).
declare -A FIGURE=()
CASES_DONE=
# shellcheck disable=SC2034 # FIGURE and CASES_DONE are for the tests
relay_cases() {
	local line tab='	'
	CASES_DONE=
	while IFS= read -r line; do
		case $line in
		"ok$tab"*) ok "${line#ok"$tab"}" ;;
		"not ok$tab"*)
			line=${line#not ok"$tab"}
			not_ok "${line%%"$tab"*}"
			[ "${line#*"$tab"}" = "$line" ] || [ -z "${line#*"$tab"}" ] || diag "${line#*"$tab"}"
			;;
		"figure$tab"*)
			line=${line#figure"$tab"}
			FIGURE[${line%%"$tab"*}]=${line#*"$tab"}
			diag "figure: ${line%%"$tab"*} = ${line#*"$tab"}"
			;;
		"done") CASES_DONE="done" ;;
		"done$tab"*) CASES_DONE=${line#"done$tab"} ;;
		"#$tab"*) diag "${line#\#"$tab"}" ;;
		"# "*) diag "${line#\# }" ;;
		"") ;;
		*) diag "$line" ;;
		esac
	done <"$1"
}

# hostile CMD ARGS...: runs hostile.py (hostile clients, see its header)
# and turns its lines into TAP checks.
hostile() {
	local st=0
	"$PYTHON3" "$lib_dir/hostile.py" "$@" >"$T/hostile.out" 2>"$T/hostile.err" || st=$?
	relay_cases "$T/hostile.out"
	if [ "$st" -ne 0 ] && ! grep -q '^not ok' "$T/hostile.out"; then
		not_ok "hostile.py $1 exited $st"
		diag_file "$T/hostile.err"
	fi
}

# p11a ARGS...: the CLI against this test's agent, bounded in time.
p11a() {
	timeout "$CLI_TIMEOUT" "$P11AGENT" --socket "$SOCK" "$@"
}

# start_agent [--module PATH | --config FILE] [--token LABEL]... [--wrap CMDLINE] [--no-debug]:
# p11agentd in the foreground on $SOCK with --debug, logging to $AGENT_LOG
# (plus the arguments in the array AGENT_ARGS; its user's file is
# $T/config/p11agent/p11agentd.conf).  The module is the SoftHSM2 one
# unless --module names another or --config FILE gives a configuration
# that names its modules (the agent then gets --config FILE and no
# --module).  Returns once `p11agent status` answers and `p11agent list`
# shows the test token (at most 20 s): the agent answers before its
# helpers have reported their tokens, and these tests are not about that
# start-up window (t_lifecycle is).  With --token LABEL (repeatable) it
# waits instead for each LABEL listed and present.  --wrap CMDLINE is put
# right before the agent (after P11AGENTD_WRAPPER), e.g. "prlimit
# --nofile=256".  --no-debug leaves out --debug (a configuration may still
# set it).  Sets AGENT_PID and AGENT_HELPERS.
# With AGENT_DEFAULT_SOCKET=yes the agent gets no --socket and picks its
# default path, which the caller has put in $SOCK.  P11AGENTD_WRAPPER, when
# set, is a command line put before the agent (e.g. valgrind, see
# docs/reliability.md).  With AGENT_REGISTRY=yes the agent gets no --module
# and uses the p11-kit registry.
AGENT_ARGS=()
AGENT_DEFAULT_SOCKET=no
AGENT_REGISTRY=no
start_agent() {
	local sockarg=(--socket "$SOCK") modarg=(--module "$SOFTHSM2_MODULE") tokens=() wrap='' debug=--debug
	while [ $# -gt 0 ]; do
		case $1 in
		--module) modarg=(--module "$2"); shift 2 ;;
		--config) modarg=(--config "$2"); shift 2 ;;
		--token) tokens+=("$2"); shift 2 ;;
		--wrap) wrap=$2; shift 2 ;;
		--no-debug) debug=; shift ;;
		*) diag "start_agent: unknown argument $1"; return 1 ;;
		esac
	done
	[ "$AGENT_DEFAULT_SOCKET" != yes ] || sockarg=()
	[ "$AGENT_REGISTRY" != yes ] || modarg=()
	# shellcheck disable=SC2086 # P11AGENTD_WRAPPER and wrap are command lines, e.g. "valgrind -q"
	XDG_CONFIG_HOME=$T/config ${P11AGENTD_WRAPPER:-} $wrap "$P11AGENTD" --foreground ${sockarg[@]+"${sockarg[@]}"} ${modarg[@]+"${modarg[@]}"} $debug \
		${AGENT_ARGS[@]+"${AGENT_ARGS[@]}"} >>"$AGENT_LOG" 2>&1 &
	AGENT_PID=$!
	remember_pid "$AGENT_PID"
	# agent_ready ends the poll early when the agent exits: check that too.
	if ! poll 20 agent_ready ${tokens[@]+"${tokens[@]}"} || ! running "$AGENT_PID"; then
		if running "$AGENT_PID"; then
			diag "p11agentd did not answer status with token(s) '${tokens[*]:-$TOKEN_LABEL}' listed within 20 s"
		else
			diag "p11agentd exited during start-up"
		fi
		diag_file "$AGENT_LOG"
		return 1
	fi
	AGENT_HELPERS=$(child_pid_list "$AGENT_PID")
	return 0
}

# agent_ready [LABEL...]: the agent answers status and lists the test token
# (or: lists each LABEL, present).  Stops a poll early once the agent is
# gone (its exit is not going to make it ready).
agent_ready() {
	local l
	running "$AGENT_PID" || return 0
	[ -S "$SOCK" ] && "$P11AGENT" --socket "$SOCK" status >/dev/null 2>&1 && list_json 2>/dev/null || return 1
	if [ $# -eq 0 ]; then
		[ "$(json_token label)" = "$TOKEN_LABEL" ]
		return
	fi
	for l in "$@"; do
		[ "$(json_token present "$l")" = true ] || return 1
	done
}

# stop_agent: SIGTERM by PID and wait; AGENT_RC gets the exit status
# (124 when it did not exit within 10 s and had to be killed).
AGENT_RC=
# shellcheck disable=SC2034 # AGENT_RC is read by the tests
stop_agent() {
	[ -n "$AGENT_PID" ] || return 0
	kill -TERM "$AGENT_PID" 2>/dev/null || true
	if wait_gone "$AGENT_PID" 10; then
		if wait "$AGENT_PID"; then AGENT_RC=0; else AGENT_RC=$?; fi
	else
		diag "p11agentd ignored SIGTERM for 10 s; killing it"
		kill -KILL "$AGENT_PID" 2>/dev/null || true
		wait "$AGENT_PID" 2>/dev/null || true
		AGENT_RC=124
	fi
	forget_pid "$AGENT_PID"
	AGENT_PID=
}

# list_json: `p11agent list --json` into $T/list.json; fails when the CLI
# fails or the output is not JSON.
list_json() {
	p11a list --json >"$T/list.json" 2>"$T/list.err" &&
		"$PYTHON3" -c 'import json,sys; json.load(open(sys.argv[1]))' "$T/list.json"
}

# json_key LABEL FIELD: a field of the key with that label in $T/list.json
# (empty when absent; lists and objects as JSON).
json_key() {
	"$PYTHON3" - "$T/list.json" "$1" "$2" <<'EOF'
import json, sys
doc = json.load(open(sys.argv[1]))
for k in doc.get("keys", []):
    if k.get("label") == sys.argv[2]:
        v = k.get(sys.argv[3])
        if v is None:
            v = ""
        print(v if isinstance(v, (str, int)) and not isinstance(v, bool) else json.dumps(v))
        break
EOF
}

# json_token FIELD [LABEL]: a field of the token with that label (default
# $TOKEN_LABEL) in $T/list.json.
json_token() {
	"$PYTHON3" - "$T/list.json" "${2:-$TOKEN_LABEL}" "$1" <<'EOF'
import json, sys
doc = json.load(open(sys.argv[1]))
for t in doc.get("tokens", []):
    if t.get("label") == sys.argv[2]:
        v = t.get(sys.argv[3])
        print(json.dumps(v) if isinstance(v, (bool, list, dict)) or v is None else v)
        break
EOF
}

# token_has_key LABEL: a fresh `list --json` shows the test token and a
# key LABEL on it (for polls: a helper restarted, a token back).
token_has_key() {
	list_json 2>/dev/null && [ "$(json_token label)" = "$TOKEN_LABEL" ] &&
		[ -n "$(json_key "$1" uri)" ]
}

# key_uri LABEL: the agent's URI for a key (from a fresh list --json).
key_uri() {
	list_json && json_key "$1" uri
}

# write_pin FILE PIN [NONL]: a PIN file only its owner can read (the CLI
# warns about others), with a final newline unless NONL is given.
write_pin() {
	(
		umask 077
		if [ $# -gt 2 ]; then printf '%s' "$2"; else printf '%s\n' "$2"; fi >"$1"
	)
}

# unlock_token: unlock with the right PIN from a file.
unlock_token() {
	write_pin "$T/pin" "$USER_PIN"
	p11a unlock --pin-file "$T/pin"
}

# pub_der IN OUT: a public key (PEM or DER SubjectPublicKeyInfo) as DER.
pub_der() {
	openssl pkey -pubin -in "$1" -outform DER -out "$2"
}

# cert_pub_der CERT OUT: a certificate's (PEM or DER) public key as DER.
cert_pub_der() {
	cert_der "$1" "$T/cert_pub.tmp" &&
		openssl x509 -inform DER -in "$T/cert_pub.tmp" -noout -pubkey |
		openssl pkey -pubin -outform DER -out "$2"
}

# cert_der IN OUT: a certificate (PEM or DER) as DER.
cert_der() {
	openssl x509 -in "$1" -outform DER -out "$2" 2>/dev/null ||
		openssl x509 -inform DER -in "$1" -outform DER -out "$2"
}

# same_pub KEY DER / same_cert CERT DER: KEY (PEM or DER public key) or
# CERT (PEM or DER certificate) is, as DER, byte for byte the file DER.
same_pub() {
	pub_der "$1" "$T/same.der" && cmp "$T/same.der" "$2"
}

same_cert() {
	cert_der "$1" "$T/same.der" && cmp "$T/same.der" "$2"
}

# require_agent_binaries: both binaries built.
require_agent_binaries() {
	require_file "$P11AGENTD" "$P11AGENT"
}
