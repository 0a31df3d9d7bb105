#!/bin/bash
# t_pkcs11_parallel: the PKCS#11 front-end module never holds its lock
# across a request to the agent.  One thread's C_Sign hangs in the token
# (tests/fault/, "C_Sign=hang once"); meanwhile a second thread lists
# slots, opens a session, logs in (a forced LIST), finds the key and signs
# with it on its own session, and all of that returns before the first
# thread's C_Sign is released.  Then the agent's main process is stopped
# (SIGSTOP) under a thread whose C_Login waits for LIST, and another
# thread's signature (on its channel to the token's helper) must return
# first.  tests/integration/pkcs11_parallel.c does the calls and checks
# the order of events, never a time.  PK_MODULE=PATH
# runs it against another build of the module.
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/pkcs11_lib.sh
. "$lib_dir/pkcs11_lib.sh"

PARALLEL=$top_builddir/tests/integration/pkcs11_parallel
require_agent_binaries
require_file "$PK_MODULE" "$PARALLEL"
pk_san_env
make_token
fault_setup "EC:prime256v1 21 two-ec"
# The hung C_Sign is released by the test, not by the agent's deadline:
# longer than the client library's 35 s.
sed -i 's/^sign-timeout .*/sign-timeout 60/' "$T/agent.conf"
AGENT_REGISTRY=yes
AGENT_ARGS=(--config "$T/agent.conf")
start_agent || bail_out "agent started with the fault module"

# Up to the client's 35 s deadline when the module serializes (old code).
st=0
pk_client timeout 120 "$PARALLEL" "$PK_MODULE" "$CTL" "$TOKEN_LABEL" ec256 "$USER_PIN" "$AGENT_PID" \
	>"$T/parallel.out" 2>"$T/parallel.err" || st=$?
# The program continues the agent itself; this is for a program that died first.
kill -CONT "$AGENT_PID" 2>/dev/null || true
while IFS= read -r line; do
	case $line in
	"ok	"*) ok "${line#ok	}" ;;
	"not ok	"*)
		line=${line#not ok	}
		not_ok "${line%%	*}"
		diag "${line#*	}"
		;;
	esac
done <"$T/parallel.out"
if [ "$st" -ne 0 ]; then
	not_ok "pkcs11_parallel exited $st"
	diag_file "$T/parallel.err"
fi
check "the agent still runs" running "$AGENT_PID"
done_testing
