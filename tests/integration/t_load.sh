#!/bin/bash
# t_load: the agent under connection load.  10,000 connect/disconnect
# cycles; 1,000 idle connections held open while 64 clients sign at once;
# 20 half-sent frames among them dropped at the 10 s deadline while the
# idle ones stay; and afterwards the agent's descriptors are all back and
# its memory stayed bounded.  (t_security checks one half frame and 64
# simultaneous LISTs; this is the same front door under volume.)
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"

IDLE=${LOAD_IDLE:-1000}
SIGNERS=${LOAD_SIGNERS:-64}
SIGNS_EACH=${LOAD_SIGNS_EACH:-20}
CYCLES=${LOAD_CYCLES:-10000}
HALF=20
RSS_GROWTH_MAX_KB=${LOAD_RSS_GROWTH_MAX_KB:-16384}   # after the load, over the baseline
RSS_PEAK_MAX_KB=${LOAD_RSS_PEAK_MAX_KB:-131072}      # during the load

require_cmd openssl pkcs11-tool softhsm2-util timeout "$PYTHON3"
# An ASan build keeps freed blocks in its quarantine (256 MiB by default)
# and in per-size-class caches with redzones instead of reusing them, so
# RSS after thousands of audited signatures (each a few short-lived
# strings) measures the sanitizer's allocator, not the agent (an ordinary
# build grows by about 1 MiB here): the quarantine is kept small and the
# bound after the load is 32 MiB there; 16 MiB in an ordinary build.
export ASAN_OPTIONS="quarantine_size_mb=4${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
if asan_env "$P11AGENTD" && [ -z "${LOAD_RSS_GROWTH_MAX_KB:-}" ]; then
	RSS_GROWTH_MAX_KB=32768
	diag "sanitizer build: RSS bound after the load $((RSS_GROWTH_MAX_KB / 1024)) MiB"
fi
require_agent_binaries
make_token

# The agent's default max-connections (1024) is below what this test holds.
need_fds=$((IDLE + SIGNERS * 2 + HALF + 256))
if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt "$need_fds" ]; then
	bail_out "descriptor limit allows $need_fds (hard limit $(ulimit -Hn))"
fi
ulimit -Sn "$need_fds"
cat >"$T/agent.conf" <<EOF
max-connections $((IDLE + SIGNERS + HALF + 64))
EOF
AGENT_ARGS=(--config "$T/agent.conf")
check "agent starts with max-connections $((IDLE + SIGNERS + HALF + 64))" start_agent
running "$AGENT_PID" || bail_out "agent running"
check "unlock" unlock_token
KEY=$(key_uri ec256)

# fd_count PID / rss_kb PID
fd_count() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
helpers_fds() {
	local n=0 p
	for p in $(child_pids "$AGENT_PID"); do n=$((n + $(fd_count "$p"))); done
	echo "$n"
}

# Warm up (first channel, first signatures), then take the baseline.
p11a sign --key "$KEY" --scheme ecdsa --hash sha256 --in "$T/agent.conf" --out "$T/sig" >/dev/null
# settled: the agent counts only the asking connection (the warm-up's are
# closed) and the helpers' descriptors hold still over 0.2 s (the warm-up's
# channel thread has ended).
settled() {
	local h0
	p11a status >"$T/status.out" 2>/dev/null && grep -qE '^connections: +1$' "$T/status.out" || return 1
	h0=$(helpers_fds)
	sleep 0.2	# the interval over which "still" is judged
	[ "$(helpers_fds)" = "$h0" ]
}
wait_for "the agent settles after the warm-up signature" 10 settled || true
base_fds=$(fd_count "$AGENT_PID")
base_hfds=$(helpers_fds)
base_rss=$(rss_kb "$AGENT_PID")
diag "baseline: agent $base_fds fds, ${base_rss} kB RSS; helpers $base_hfds fds"


t0=$(date +%s)
# A PKCS#11 module no request may load (its name appears in the URIs above).
EVIL=$T/evil-module.so
cp "$SOFTHSM2_MODULE" "$EVIL"
if timeout 600 "$PYTHON3" "$lib_dir/load_cases.py" "$SOCK" "$KEY" "$AGENT_PID" "$IDLE" "$SIGNERS" "$SIGNS_EACH" \
	"$CYCLES" "$HALF" "$EVIL" >"$T/load.out" 2>"$T/load.err"; then
	load_rc=0
else
	load_rc=$?
fi
t1=$(date +%s)
relay_cases "$T/load.out"
peak_rss=${FIGURE[agent_rss_peak_kb]:-}
if [ "$load_rc" -eq 0 ] && [ -n "$CASES_DONE" ]; then
	ok "load_cases.py ran to the end ($((t1 - t0)) s)"
else
	not_ok "load_cases.py ran to the end (exit $load_rc)"
	diag_file "$T/load.err"
fi

evil_maps=
for p in "$AGENT_PID" $(child_pids "$AGENT_PID"); do
	if grep -q "evil-module" "/proc/$p/maps" 2>/dev/null; then evil_maps="$evil_maps $p"; fi
done
is "${evil_maps:-none}" none "no agent process mapped the module named in request URIs"

# ---------------------------------------------------------------- resources afterwards
check "agent still running after the load" running "$AGENT_PID"
# Channel threads in the helper end when their client closes: wait for that.
fds_back() {
	[ "$(fd_count "$AGENT_PID")" -le "$base_fds" ] && [ "$(helpers_fds)" -le "$base_hfds" ]
}
if poll 10 fds_back; then fds_back=yes; else fds_back=no; fi
after_fds=$(fd_count "$AGENT_PID")
after_hfds=$(helpers_fds)
if [ "$fds_back" = yes ]; then
	ok "no descriptor leak: agent back to $after_fds fds (was $base_fds), helpers $after_hfds (was $base_hfds)"
else
	not_ok "no descriptor leak: agent back to its baseline fds"
	diag "agent $after_fds fds (baseline $base_fds); helpers $after_hfds (baseline $base_hfds)"
	# shellcheck disable=SC2012 # a diagnostic listing of /proc links
	ls -l "/proc/$AGENT_PID/fd" | sed 's/^/#   /' | tail -n 20
fi
after_rss=$(rss_kb "$AGENT_PID")
diag "agent RSS: baseline ${base_rss} kB, peak ${peak_rss:-?} kB, after ${after_rss} kB"
if [ $((after_rss - base_rss)) -le "$RSS_GROWTH_MAX_KB" ]; then
	ok "agent memory bounded: RSS after the load within $((RSS_GROWTH_MAX_KB / 1024)) MiB of the baseline"
else
	not_ok "agent memory bounded: RSS after the load within $((RSS_GROWTH_MAX_KB / 1024)) MiB of the baseline"
fi
if [ -n "$peak_rss" ] && [ "$peak_rss" -le "$RSS_PEAK_MAX_KB" ]; then
	ok "agent memory bounded: peak RSS during the load under $((RSS_PEAK_MAX_KB / 1024)) MiB"
else
	not_ok "agent memory bounded: peak RSS during the load under $((RSS_PEAK_MAX_KB / 1024)) MiB"
fi
run p11a sign --key "$KEY" --scheme ecdsa --hash sha256 --in "$T/load.out" --out "$T/sig"
rc_is 0 "agent still signs after the load"
check "that signature verifies" \
	openssl dgst -sha256 -verify "$TOKDIR/ec256.pub.pem" -signature "$T/sig" "$T/load.out"
stop_agent
is "$AGENT_RC" 0 "agent exits 0 on SIGTERM after the load"
done_testing
