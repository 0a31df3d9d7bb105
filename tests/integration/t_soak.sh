#!/bin/bash
# t_soak: good clients against hostile ones, with token faults, for a
# bounded time (tests/soak/soak.py on tests/integration/p11a_proto.py).
#
# The agent runs under a low descriptor limit (prlimit --nofile, SOAK_NOFILE,
# default 512, inherited by its token helpers) with two instances of the
# fault module, as in t_faults: "faulty.so" (token p11agent-test, takes the
# hang and removal faults from its control file) and "steady.so" (token
# p11agent-two, never faulted, locked and unlocked in a loop).  For
# SOAK_SECONDS (default 20; .ci/run sets a few minutes) good clients sign
# with every key and scheme and verify each signature against the public
# key from LIST, list, lock and unlock, while hostile clients take channels
# until refused, pipeline without reading, send malformed and half frames,
# disconnect mid-frame and storm the socket.  Every good answer must be a
# signature that verifies or the right error (LOCKED while locked,
# TIMEOUT only where C_Sign hangs, TOKEN_NOT_PRESENT only while removed);
# afterwards descriptors, threads and memory of the agent and its helpers
# come back.  soak.py prints one TAP check per property with counts and
# sample messages.
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"

SOAK_SECONDS=${SOAK_SECONDS:-20}
SOAK_NOFILE=${SOAK_NOFILE:-512}
SOAK_PY=$top_srcdir/tests/soak/soak.py

require_cmd openssl pkcs11-tool softhsm2-util timeout prlimit "$PYTHON3"
require_agent_binaries
require_file "$SOAK_PY" "$lib_dir/p11a_proto.py"
if ! "$PYTHON3" -c 'import cryptography.hazmat.primitives.asymmetric.ed25519' 2>"$T/py.err"; then
	diag_file "$T/py.err"
	bail_out "python3 cryptography importable (Debian: python3-cryptography)"
fi
make_token
# The second token with an EC, an RSA and an Ed25519 key.
fault_setup "EC:prime256v1 21 two-ec" "RSA:2048 22 two-rsa" "EC:edwards25519 23 two-ed"

# prlimit execs the agent: $! is the agent's pid.  No --debug: one log line
# per signature would be most of the soak's work.
started=yes
start_agent --config "$T/agent.conf" --token "$TOKEN_LABEL" --token "$TWO_LABEL" \
	--wrap "prlimit --nofile=$SOAK_NOFILE" --no-debug || started=no
[ "$started" = yes ] || bail_out "agent lists both tokens (descriptor limit $SOAK_NOFILE)"
ok "agent lists both tokens through the fault module, descriptor limit $SOAK_NOFILE"
is "$(awk '/^Max open files/ { print $4 }' "/proc/$AGENT_PID/limits")" "$SOAK_NOFILE" \
	"the agent runs with RLIMIT_NOFILE $SOAK_NOFILE"

SAN_ARGS=()
! ldd "$P11AGENTD" 2>/dev/null | grep -q libasan || SAN_ARGS=(--no-rss)
t0=$(date +%s)
# SOAK_ARGS: more soak.py options (e.g. --no-hostile, --seed N), split at spaces.
# shellcheck disable=SC2086
# soak.py bounds its own run; timeout is the backstop for a harness that hangs.
if timeout $((SOAK_SECONDS * 3 + 240)) "$PYTHON3" "$SOAK_PY" --socket "$SOCK" --agent-pid "$AGENT_PID" \
	--seconds "$SOAK_SECONDS" --sign-timeout "$SIGN_TIMEOUT" --pin "$USER_PIN" \
	--faulty "$TOKEN_LABEL" --faulty-control "$CTL" --steady "$TWO_LABEL" ${SAN_ARGS[@]+"${SAN_ARGS[@]}"} ${SOAK_ARGS:-} \
	>"$T/soak.out" 2>"$T/soak.err"; then
	soak_rc=0
else
	soak_rc=$?
fi
t1=$(date +%s)
relay_cases "$T/soak.out"
if [ -n "$CASES_DONE" ] && [ "$soak_rc" -le 1 ]; then
	ok "soak.py ran to the end ($((t1 - t0)) s)"
else
	not_ok "soak.py ran to the end (exit $soak_rc after $((t1 - t0)) s)"
	diag_file "$T/soak.err" 40
fi
[ ! -s "$T/soak.err" ] || diag_file "$T/soak.err" 20

check "agent still running after the soak" running "$AGENT_PID"
if [ "$fail_count" -gt 0 ]; then
	diag "agent log: warnings and errors by kind (numbers as N), most frequent first:"
	grep -E ': (warning|error): ' "$AGENT_LOG" |
		sed -E 's/^[0-9:.]+ //; s/\b[0-9]+\b/N/g' | sort | uniq -c | sort -rn | head -n 20 | sed 's/^/#   /'
fi
stop_agent
is "$AGENT_RC" 0 "agent exits 0 on SIGTERM after the soak"
done_testing
