#!/bin/bash
# t_forward_faults: token faults on the relayed path (docs/forwarding.md).
#
# Clients behind a socat relay (descriptors do not cross it, as with
# ssh -R) sign on their main connection and the agent relays each SIGN to
# the token helper (H_SIGN).  With the fault module (docs/reliability.md):
# a C_Sign that hangs gets the relayed client TIMEOUT at sign-timeout from
# the agent, while the agent answers everybody else at once (STATUS, a
# relayed signature on the other token, a local channel) and a late
# signature is never delivered in place of the next one; a C_Sign that
# aborts the helper gets the relayed client a HELPER error that names the
# forwarded signature, and the restarted helper signs relayed again.
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"

require_cmd openssl pkcs11-tool softhsm2-util socat timeout "$PYTHON3"
require_agent_binaries
make_token
fault_setup "EC:prime256v1 21 two-ec"
echo "debug yes" >>"$T/agent.conf"
pkcs11-tool --module "$SOFTHSM2_MODULE" --token-label "$TWO_LABEL" --read-object --type pubkey \
	--id 21 -o "$T/two.pub.der" >/dev/null 2>&1 || bail_out "second token's public key read"

set_ctl() {
	printf '%s\n' "$@" >"$CTL.new"
	mv -f "$CTL.new" "$CTL"
}
# shellcheck disable=SC2317 # called through wait_for and poll
fired() {
	! grep -q "^$1=" "$CTL"
}
# shellcheck disable=SC2317
released() {
	[ "$(grep -c '^C_Sign rv=0x00000030$' "$CTL.calls" || true)" -gt "$1" ]
}
start_agent --config "$T/agent.conf" --token "$TOKEN_LABEL" --token "$TWO_LABEL" ||
	bail_out "agent lists both tokens through the fault module"
KEY_A=$(json_key ec256 uri)
KEY_B=$(json_key two-ec uri)
if [ -z "$KEY_A" ] || [ -z "$KEY_B" ]; then bail_out "both test keys listed"; fi
write_pin "$T/pin" "$USER_PIN"
check "unlock the faulty token" p11a unlock --token "pkcs11:token=$TOKEN_LABEL" --pin-file "$T/pin"
check "unlock the steady token" p11a unlock --token "pkcs11:token=$TWO_LABEL" --pin-file "$T/pin"

RELAY=$T/relay.sock
socat "UNIX-LISTEN:$RELAY,fork,mode=600" "UNIX-CONNECT:$SOCK" >"$T/socat.log" 2>&1 &
remember_pid $!
poll 10 test -S "$RELAY" || bail_out "socat relay listens"

echo "message to sign $$" >"$T/msg"
elapsed=0
# relay_sign KEY OUT [SOCKET]: p11agent sign through the relay (or SOCKET), timed.
relay_sign() {
	local t0 t1
	t0=$(date +%s%N)
	run timeout "$CLI_TIMEOUT" "$P11AGENT" --socket "${3:-$RELAY}" sign --key "$1" --scheme ecdsa \
		--hash sha256 --in "$T/msg" --out "$2"
	t1=$(date +%s%N)
	elapsed=$(((t1 - t0) / 1000000))
}
verify_a() {
	openssl dgst -sha256 -verify "$TOKDIR/ec256.pub.pem" -signature "$1" "$T/msg" >/dev/null 2>&1
}
verify_b() {
	openssl dgst -sha256 -verify "$T/two.pub.der" -keyform DER -signature "$1" "$T/msg" >/dev/null 2>&1
}

relay_sign "$KEY_A" "$T/sig.a"
if [ "$rc" -eq 0 ] && verify_a "$T/sig.a"; then ok "baseline: relayed signature verifies"; else not_ok "baseline: relayed signature verifies"; diag_last; fi
file_has "$AGENT_LOG" "forwarded: signs on its main connection" "the relay's connection is logged as forwarded"

# ---------------------------------------------------------------- C_Sign hangs
# One connection over the relay: SIGN that hangs, TIMEOUT at sign-timeout;
# the same connection's next SIGN gets its own signature, never the late one.
cat >"$T/hang.py" <<'EOF'
import sys, time
import p11a_proto as P
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
relay, key, pub = sys.argv[1], sys.argv[2], sys.argv[3]
pk = serialization.load_pem_public_key(open(pub, "rb").read())
s = P.raw_connect(relay, 30)
r = P.raw_request(s, P.hello("t_forward_faults hang.py", 1, 3))
t0 = time.monotonic()
r = P.raw_request(s, P.sign(key, P.SCHEME_ECDSA, P.HASH_SHA256, b"hung"))
took = time.monotonic() - t0
code = P.error_code(r)
msg = P.decode(r).message if code else ""
print("first\t%s\t%.1f\t%s" % (code, took, msg), flush=True)
open(sys.argv[4], "w").close()         # tells the shell to release the hang
time.sleep(float(sys.argv[5]))
r = P.raw_request(s, P.sign(key, P.SCHEME_ECDSA, P.HASH_SHA256, b"after"))
good = False
if r is not None and r[0] == P.SIGNATURE:
    try:
        pk.verify(P.decode(r).signature, b"after", ec.ECDSA(hashes.SHA256()))
        good = True
    except Exception:
        pass
print("second\t%s" % ("verifies" if good else "bad: %s" % P.show(r)), flush=True)
EOF
set_ctl "C_Sign=hang once"
"$PYTHON3" "$T/hang.py" "$RELAY" "$KEY_A" "$TOKDIR/ec256.pub.pem" "$T/hang.first" 2 \
	>"$T/hang.out" 2>"$T/hang.err" &
hang_pid=$!
remember_pid "$hang_pid"
wait_for "the relayed C_Sign took the hang" 10 fired C_Sign || true
# Meanwhile, within the 3 s the hang lasts: the agent answers at once.
t0=$(date +%s%N)
run p11a status
t1=$(date +%s%N)
if [ "$rc" -eq 0 ] && [ $(((t1 - t0) / 1000000)) -lt 1000 ]; then
	ok "while a relayed C_Sign hangs: STATUS answers at once ($(((t1 - t0) / 1000000)) ms)"
else
	not_ok "while a relayed C_Sign hangs: STATUS answers at once"
	diag_last
fi
relay_sign "$KEY_B" "$T/sig.b"
if [ "$rc" -eq 0 ] && verify_b "$T/sig.b" && [ "$elapsed" -lt 2000 ]; then
	ok "while a relayed C_Sign hangs: a relayed signature on the other token ($elapsed ms)"
else
	not_ok "while a relayed C_Sign hangs: a relayed signature on the other token"
	diag "elapsed $elapsed ms"
	diag_last
fi
relay_sign "$KEY_A" "$T/sig.local" "$SOCK"
if [ "$rc" -eq 0 ] && verify_a "$T/sig.local"; then
	ok "while a relayed C_Sign hangs: a local client signs with the same token on a channel"
else
	not_ok "while a relayed C_Sign hangs: a local client signs with the same token on a channel"
	diag_last
fi
poll 15 test -e "$T/hang.first" || true
hung_done=$(grep -c '^C_Sign rv=0x00000030$' "$CTL.calls" || true)
set_ctl "unhang"
poll 10 released "$hung_done" || true
set_ctl ""
wait_gone "$hang_pid" 30 || true
IFS=$'\t' read -r _ code took msg < <(grep '^first' "$T/hang.out" || printf 'first\t\t\t\n')
if [ "$code" = 9 ] && awk -v t="$took" -v s="$SIGN_TIMEOUT" 'BEGIN { exit !(t >= s - 0.5 && t < s + 3) }' &&
	[[ $msg == *"forwarded signature"*"did not answer within $SIGN_TIMEOUT s"* ]]; then
	ok "relayed C_Sign hangs: TIMEOUT from the agent at sign-timeout (${took} s)"
	diag "$msg"
else
	not_ok "relayed C_Sign hangs: TIMEOUT from the agent at sign-timeout"
	diag_file "$T/hang.out"
	diag_file "$T/hang.err"
fi
is "$(grep '^second' "$T/hang.out" | cut -f2)" verifies \
	"the same connection's next SIGN gets its own signature, not the late one"

# ---------------------------------------------------------------- relays count against the process cap
# max-channels-per-process 2: one process with three connections that each
# relay a SIGN into a hanging C_Sign.  Two wait in the module (TIMEOUT at
# sign-timeout); the third is refused BUSY at once, naming the setting.
cat >"$T/cap.py" <<'EOF'
import sys, threading, time
import p11a_proto as P
sock, key = sys.argv[1], sys.argv[2]
res = {}
def one(i, delay):
    time.sleep(delay)
    s = P.raw_connect(sock, 30)
    P.raw_request(s, P.hello("t_forward_faults cap.py", 1, 3))
    t0 = time.monotonic()
    r = P.raw_request(s, P.sign(key, P.SCHEME_ECDSA, P.HASH_SHA256, b"cap%d" % i))
    res[i] = (P.error_code(r), time.monotonic() - t0, P.decode(r).message if P.error_code(r) else "")
ts = [threading.Thread(target=one, args=(i, 0.0 if i < 2 else 1.0)) for i in range(3)]
for t in ts:
    t.start()
for t in ts:
    t.join()
for i in sorted(res):
    print("%d\t%s\t%.1f\t%s" % (i, res[i][0], res[i][1], res[i][2]), flush=True)
EOF
stop_agent
printf 'max-channels-per-process 2\n' >>"$T/agent.conf"
start_agent --config "$T/agent.conf" --token "$TOKEN_LABEL" --token "$TWO_LABEL" ||
	bail_out "agent restarted with max-channels-per-process 2"
check "unlock the faulty token again" p11a unlock --token "pkcs11:token=$TOKEN_LABEL" --pin-file "$T/pin"
check "unlock the steady token again" p11a unlock --token "pkcs11:token=$TWO_LABEL" --pin-file "$T/pin"
set_ctl "C_Sign=hang"
run timeout 60 "$PYTHON3" "$T/cap.py" "$SOCK" "$KEY_A"
rc_is 0 "cap.py ran"
cp "$T/stdout" "$T/cap.out"
hung=$(awk -F '\t' '$2 == 9' "$T/cap.out" | wc -l)
busy=$(awk -F '\t' '$2 == 22 && $3 < 1.0 && $4 ~ /max-channels-per-process 2/' "$T/cap.out" | wc -l)
if [ "$hung" -eq 2 ] && [ "$busy" -eq 1 ]; then
	ok "two relayed SIGNs wait in a hung module; the third from the same process is BUSY at once"
	diag "$(awk -F '\t' '$2 == 22 { print $4 }' "$T/cap.out")"
else
	not_ok "two relayed SIGNs wait in a hung module; the third from the same process is BUSY at once"
	diag_file "$T/cap.out"
fi
hung_done=$(grep -c '^C_Sign rv=0x00000030$' "$CTL.calls" || true)
set_ctl "unhang"
poll 10 released "$((hung_done + 1))" || true
set_ctl ""
relay_sign "$KEY_A" "$T/sig.cap"
if [ "$rc" -eq 0 ] && verify_a "$T/sig.cap"; then ok "after the hang: relayed signature verifies"; else not_ok "after the hang: relayed signature verifies"; diag_last; fi

# ---------------------------------------------------------------- C_Sign aborts the helper
helpers_before=$(child_pid_list "$AGENT_PID")
init_before=$(calls C_Initialize)
set_ctl "C_Sign=abort once"
relay_sign "$KEY_A" "$T/sig.abort"
if [ "$rc" -ne 0 ] && [ "$elapsed" -lt 10000 ] &&
	grep -q "stopped during a forwarded signature" "$T/stderr"; then
	ok "relayed C_Sign aborts the helper: a HELPER error naming the forwarded signature (${elapsed} ms)"
	diag "$(head -n 1 "$T/stderr")"
else
	not_ok "relayed C_Sign aborts the helper: a HELPER error naming the forwarded signature"
	diag "elapsed $elapsed ms"
	diag_last
fi
set_ctl ""
# shellcheck disable=SC2317 # called through poll
helper_back() {
	[ "$(calls C_Initialize)" -gt "$init_before" ] && list_json && [ "$(json_token present)" = true ]
}
check "the helper is restarted" poll 15 helper_back
AGENT_HELPERS=$(child_pid_list "$AGENT_PID")
if [ "$AGENT_HELPERS" != "$helpers_before" ]; then ok "the faulty module's helper has a new pid"; else not_ok "the faulty module's helper has a new pid"; fi
check "after the restart: unlock" p11a unlock --token "pkcs11:token=$TOKEN_LABEL" --pin-file "$T/pin"
relay_sign "$KEY_A" "$T/sig.after"
if [ "$rc" -eq 0 ] && verify_a "$T/sig.after"; then ok "after the restart: relayed signature verifies"; else not_ok "after the restart: relayed signature verifies"; diag_last; fi
relay_sign "$KEY_B" "$T/sig.b2"
if [ "$rc" -eq 0 ] && verify_b "$T/sig.b2"; then ok "the steady token signs relayed throughout"; else not_ok "the steady token signs relayed throughout"; diag_last; fi

stop_agent
is "$AGENT_RC" 0 "the agent exits cleanly"
file_lacks "$AGENT_LOG" "Sanitizer" "no sanitizer report in the agent's log (its helpers included)"
done_testing
