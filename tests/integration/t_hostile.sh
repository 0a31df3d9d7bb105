#!/bin/bash
# t_hostile: clients that try to take what others need (docs/reliability.md,
# "Hostile clients"): every signing channel, every descriptor of the token
# helper, memory per idle channel, and the helper while a C_Sign hangs and
# a client does not read (that part is in t_faults.sh, which has the fault
# module); plus the race of signers, LIST and LOCK/UNLOCK loops that once
# listed keys twice.
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"

require_cmd openssl prlimit "$PYTHON3"
require_agent_binaries
make_token

helper_pid() {
	child_pid_list "$AGENT_PID" | awk '{ print $1 }'
}

# ---------------------------------------------------------------- per-client caps (defaults)
check "agent starts" start_agent
check "unlock" unlock_token
KEY=$(key_uri ec256)
hostile caps "$SOCK" "$KEY" "$P11AGENT"

# ---------------------------------------------------------------- text that is not UTF-8
hostile badtext "$SOCK" "$KEY"

# ---------------------------------------------------------------- memory of idle channels
# ASan's allocator keeps freed blocks in quarantine: RSS says nothing there.
if ldd "$P11AGENTD" 2>/dev/null | grep -q libasan; then
	ok "200 idle channels that each sent 200 KiB hold less than 16 MiB # SKIP sanitizer build (freed memory is quarantined)"
else
	hostile bufmem "$SOCK" "$KEY" "$(helper_pid)"
fi

# ---------------------------------------------------------------- UNLOCK of a logged-in token
# It asks nothing of the token: no rescan, no inventory pushed.
TOKEN_URI=$(list_json && json_token uri)
inv_before=$(grep -c "inventory sent" "$AGENT_LOG")
hostile unlocks "$SOCK" "$TOKEN_URI" 10
inv_after=$(grep -c "inventory sent" "$AGENT_LOG")
is "$((inv_after - inv_before))" 0 "10 UNLOCKs of a logged-in token made the helper rescan 0 times"

# ---------------------------------------------------------------- signers, LIST, LOCK/UNLOCK
RACE_KEYS=("$KEY" "$(key_uri ec384)" "$(key_uri ec521)")
hostile race-unlock "$SOCK" "$TOKEN_URI" "${RACE_KEYS[@]}" "${RACE_SECONDS:-8}"
hostile race "$SOCK" "$TOKEN_URI" "${RACE_KEYS[@]}" "${RACE_SECONDS:-8}"
if grep -q "session copy of key" "$AGENT_LOG"; then
	ok "the race made session copies of keys (the path that listed keys twice)"
else
	not_ok "the race made session copies of keys (the path that listed keys twice)"
fi
stop_agent

# ---------------------------------------------------------------- a 1024-descriptor desktop limit
# max-channels-per-process raised so that only the helper's own budget stops them.
printf 'max-channels-per-process 4096\n' >"$T/fd.conf"
AGENT_ARGS=(--config "$T/fd.conf")
P11AGENTD_WRAPPER="prlimit --nofile=1024:1024"
check "agent starts under RLIMIT_NOFILE 1024" start_agent
P11AGENTD_WRAPPER=
check "unlock" unlock_token
is "$(awk '/^Max open files/ { print $4 }' "/proc/$(helper_pid)/limits")" 1024 "the helper's limit is 1024"
hostile fdcap "$SOCK" "$KEY" "$P11AGENT" "$(helper_pid)"
check "agent still running" running "$AGENT_PID"
stop_agent

done_testing
