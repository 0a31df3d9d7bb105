#!/bin/bash
# t_provider_process: the provider's agent connections across fork(),
# threads and an agent restart, seen from one long-lived client process
# (python's ssl with a key-reference file, tests/integration/tls_client.py).
#   - fork: the parent handshakes (the provider connects to the agent),
#     forks, the child handshakes on connections of its own, then the parent
#     handshakes again on its old ones;
#   - threads: 8 threads handshake at once, each with its own server, all
#     with one loaded key; the agent sees several connections;
#   - restart: a handshake, the agent restarts, the same process handshakes
#     again (the provider reconnects).
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/tls_lib.sh
. "$lib_dir/tls_lib.sh"

require_cmd openssl timeout awk "$PYTHON3" softhsm2-util pkcs11-tool
require_agent_binaries
require_provider
make_token

check "agent starts on the test token" start_agent
check "unlock" unlock_token
check "list --json" list_json
check "server certificate from the test CA" make_server_cert
for label in rsa2048 ec256 ed25519; do
	check "export-key $label" p11a export-key "$(json_key "$label" uri)" --out "$T/$label.key.pem"
done
NTHREADS=8
for i in $(seq 1 "$NTHREADS"); do
	start_tls_server "s$i" || bail_out "s_server $i started"
done
ok "$NTHREADS s_server instances"
url() {
	printf 'https://localhost:%s/' "${PORT[$1]}"
}

# count_answers OUT LABEL: answers in OUT that name CN=LABEL.
count_answers() {
	grep -cE "^ *$(subject_line "$2")\$" "$1" || true
}

# ---------------------------------------------------------------- fork
for label in ec256 rsa2048; do
	st=0
	provider_env timeout 60 "$PYTHON3" "$lib_dir/tls_client.py" fork "$(url s1)" \
		"$TOKDIR/ca.pem" "$TOKDIR/$label.cert.pem" "$T/$label.key.pem" >"$T/fork.$label" 2>&1 || st=$?
	result "$st" "$label fork: parent, child and parent again all authenticate"
	[ "$st" -eq 0 ] || diag_file "$T/fork.$label" 20
	file_has "$T/fork.$label" "child ok" "$label fork: the child's handshake succeeded"
	file_has "$T/fork.$label" "parent 2 ok" "$label fork: the parent's handshake after the fork succeeded"
	is "$(count_answers "$T/fork.$label" "$label")" 3 "$label fork: the server saw CN=$label three times"
done

# ---------------------------------------------------------------- threads
urls=()
for i in $(seq 1 "$NTHREADS"); do
	urls+=("$(url "s$i")")
done
for label in ec256 ed25519; do
	before=$(grep -c ': sign pkcs11:' "$AGENT_LOG" || true)
	log_lines=$(wc -l <"$AGENT_LOG")
	st=0
	provider_env timeout 120 "$PYTHON3" "$lib_dir/tls_client.py" threads "$NTHREADS" \
		"$TOKDIR/ca.pem" "$TOKDIR/$label.cert.pem" "$T/$label.key.pem" "${urls[@]}" \
		>"$T/threads.$label" 2>&1 || st=$?
	result "$st" "$label: $NTHREADS threads handshake at once"
	[ "$st" -eq 0 ] || diag_file "$T/threads.$label" 20
	is "$(grep -c '^thread [0-9]* ok$' "$T/threads.$label" || true)" "$NTHREADS" \
		"$label: all $NTHREADS threads succeeded"
	is "$(count_answers "$T/threads.$label" "$label")" "$NTHREADS" \
		"$label: the servers saw CN=$label $NTHREADS times"
	after=$(grep -c ': sign pkcs11:' "$AGENT_LOG" || true)
	is "$((after - before))" "$NTHREADS" "$label: the agent signed $NTHREADS times"
	# Threads that sign at once use connections of their own: the agent
	# saw more than one signing channel from this one process.
	chans=$(tail -n "+$((log_lines + 1))" "$AGENT_LOG" | grep ': sign pkcs11:' |
		sed -n 's/.*channel \([0-9]*\): sign.*/\1/p' | sort -u | wc -l)
	if [ "$chans" -gt 1 ]; then
		ok "$label: the threads signed over $chans channels at once"
	else
		not_ok "$label: the threads signed over several channels at once"
		diag "channels: $chans"
	fi
done

# ---------------------------------------------------------------- agent restart
rm -f "$T/go"
provider_env timeout 120 "$PYTHON3" "$lib_dir/tls_client.py" twice "$(url s2)" \
	"$TOKDIR/ca.pem" "$TOKDIR/ed25519.cert.pem" "$T/ed25519.key.pem" "$T/go" \
	>"$T/twice" 2>&1 &
twice_pid=$!
remember_pid "$twice_pid"
# first_done: the client has done its first handshake (or has exited).
first_done() {
	grep -q "first ok" "$T/twice" 2>/dev/null || ! running "$twice_pid"
}
poll 30 first_done || true
file_has "$T/twice" "first ok" "restart: first handshake before the agent restarts"
stop_agent
is "$AGENT_RC" 0 "restart: agent stopped"
check "restart: agent starts again" start_agent
check "restart: unlock again" unlock_token
touch "$T/go"
st=0
wait "$twice_pid" || st=$?
forget_pid "$twice_pid"
result "$st" "restart: the same process authenticates again after the agent restarted"
[ "$st" -eq 0 ] || diag_file "$T/twice" 20
file_has "$T/twice" "second ok" "restart: second handshake succeeded"
is "$(count_answers "$T/twice" ed25519)" 2 "restart: the server saw CN=ed25519 twice"

stop_agent
is "$AGENT_RC" 0 "agent exits cleanly on SIGTERM"
done_testing
