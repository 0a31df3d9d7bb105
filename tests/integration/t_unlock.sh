#!/bin/bash
# t_unlock: unlock with a wrong PIN fails once, cleanly, without retries
# and without locking the token; unlock from a file and from stdin; lock;
# signing needs an unlocked token; the PIN leaks nowhere we can look.
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"

SPY=${PKCS11_SPY:-/usr/lib/x86_64-linux-gnu/pkcs11-spy.so}

require_cmd openssl pkcs11-tool softhsm2-util timeout "$PYTHON3"
require_agent_binaries
make_token

# A PIN of "1234" would be found by chance in any log (timestamps, pids);
# give the token distinctive PINs so that a leak check means something.
GOOD_PIN=p11a-Good-7Fq2xZ
BAD_PIN=p11a-Wrong-9Kd3Lm
check "user PIN changed to a distinctive one for this test" \
	pkcs11-tool --module "$SOFTHSM2_MODULE" --token-label "$TOKEN_LABEL" \
	--login --pin "$USER_PIN" --change-pin --new-pin "$GOOD_PIN"
USER_PIN=$GOOD_PIN

check "agent starts on the test token" start_agent
running "$AGENT_PID" || bail_out "agent running"

key=$(key_uri ec256)
case $key in
pkcs11:*) ok "ec256 has a URI in the listing" ;;
*) bail_out "ec256 has a URI in the listing (got '$key')" ;;
esac
head -c 1000 /dev/urandom >"$T/msg"

# sign_ok DESC: sign with ec256 and verify the signature.
sign_ok() {
	run p11a sign --key "$key" --scheme ecdsa --hash sha256 --in "$T/msg" --out "$T/sig"
	rc_is 0 "$1: sign exits 0"
	check "$1: signature verifies" \
		openssl dgst -sha256 -verify "$TOKDIR/ec256.pub.pem" -signature "$T/sig" "$T/msg"
}

# sign_locked DESC: signing fails and tells the user to unlock.
sign_locked() {
	rm -f "$T/sig"
	run p11a sign --key "$key" --scheme ecdsa --hash sha256 --in "$T/msg" --out "$T/sig"
	rc_is 1 "$1: sign exits 1"
	stderr_has "p11agent unlock" "$1: sign error mentions 'p11agent unlock'"
	stderr_has "p11agent: " "$1: error has the 'p11agent: ' prefix"
}

logged_in() {
	list_json >/dev/null && json_token logged_in
}

sign_locked "before unlock"
is "$(logged_in)" false "token reported not logged in before unlock"

# ---------------------------------------------------------------- wrong PIN
write_pin "$T/badpin" "$BAD_PIN"
run p11a unlock --pin-stdin <"$T/badpin"
rc_is 1 "unlock with a wrong PIN (--pin-stdin) exits 1"
stderr_has "PIN incorrect" "wrong PIN: error says 'PIN incorrect'"
is "$(logged_in)" false "token still not logged in after a wrong PIN"
sign_locked "after a wrong PIN"

check "token not locked out: pkcs11-tool logs in with the right PIN" \
	pkcs11-tool --module "$SOFTHSM2_MODULE" --token-label "$TOKEN_LABEL" \
	--login --pin "$USER_PIN" --list-objects
pkcs11-tool --module "$SOFTHSM2_MODULE" --list-token-slots >"$T/slots" 2>&1
if grep -qi "token flags" "$T/slots" && ! grep -qiE "pin (locked|final try)|locked" "$T/slots"; then
	ok "token flags show no PIN lock or final try"
else
	not_ok "token flags show no PIN lock or final try"
	diag_file "$T/slots"
fi
diag "SoftHSM2 never sets CKF_USER_PIN_COUNT_LOW/FINAL_TRY/LOCKED, so the" \
	"'tries left' wording of PIN_INCORRECT cannot be exercised here"

# ---------------------------------------------------------------- right PIN
write_pin "$T/pin" "$USER_PIN"
run p11a unlock --pin-file "$T/pin"
rc_is 0 "unlock --pin-file with the right PIN exits 0"
is "$(logged_in)" true "token logged in after unlock"
sign_ok "after unlock"

run p11a unlock --pin-file "$T/pin"
rc_is 0 "unlock again while unlocked exits 0"
sign_ok "after a second unlock"

token_uri=$(json_token uri)
run p11a unlock --token "$token_uri" --pin-file "$T/pin"
rc_is 0 "unlock --token URI exits 0"

run p11a unlock --token "pkcs11:token=no-such-token" --pin-file "$T/pin"
rc_is 1 "unlock of an unknown token exits 1"

# ---------------------------------------------------------------- lock
run p11a lock
rc_is 0 "lock exits 0"
is "$(logged_in)" false "token not logged in after lock"
sign_locked "after lock"

run p11a lock
rc_is 0 "lock while locked exits 0"

# Unlock again, from stdin, with a PIN file lacking the final newline.
write_pin "$T/pin.nonl" "$USER_PIN" nonl
run p11a unlock --pin-stdin <"$T/pin.nonl"
rc_is 0 "unlock --pin-stdin (no trailing newline) exits 0"
sign_ok "after unlocking again"

# The helper signs with session copies of keys (C_CopyObject, CKA_TOKEN
# false); they are visible to the helper's own searches and must never show
# up as keys of their own after a lock/unlock rescan.
nkeys_listed() {
	list_json && "$PYTHON3" -c 'import json,sys; print(sum(1 for k in json.load(open(sys.argv[1]))["keys"] if k.get("label") == "ec256"))' "$T/list.json"
}
is "$(nkeys_listed)" 1 "after signing and a lock/unlock cycle, ec256 is listed once"
run p11a lock
run p11a unlock --pin-file "$T/pin"
is "$(nkeys_listed)" 1 "after another lock/unlock cycle, ec256 is still listed once"
sign_ok "with one ec256 key listed"

run p11a lock --token "$token_uri"
rc_is 0 "lock --token URI exits 0"
sign_locked "after lock --token"
run p11a unlock --pin-file "$T/pin.nonl"
rc_is 0 "unlock --pin-file (no trailing newline) exits 0"
sign_ok "after the last unlock"

# LIST must agree with what UNLOCK and LOCK just answered: a client that
# unlocks and then lists must see the token logged in and its private keys.
# The CLI is called directly (no timeout wrapper) to keep the gap small;
# its own --timeout bounds each call.
cli() {
	"$P11AGENT" --socket "$SOCK" --timeout 20 "$@"
}
for i in $(seq 1 30); do
	if ! { cli lock >/dev/null && cli list --json >"$T/round$i.locked.json" &&
		cli unlock --pin-file "$T/pin" >/dev/null && cli list --json >"$T/round$i.unlocked.json"; } \
		2>>"$T/rounds.err"; then
		echo "round $i: a command failed" >>"$T/rounds.err"
	fi
done
"$PYTHON3" - "$T" 30 >"$T/rounds.out" 2>&1 <<'EOF2'
import json, sys
t, n = sys.argv[1], int(sys.argv[2])
stale = 0
for i in range(1, n + 1):
    for state, want in (("locked", False), ("unlocked", True)):
        try:
            d = json.load(open("%s/round%d.%s.json" % (t, i, state)))
            got = d["tokens"][0]["logged_in"]
            vis = sum(1 for k in d["keys"] if k.get("private_key_visible"))
        except Exception as e:  # noqa: BLE001
            got, vis = repr(e), None
        if got != want or vis != (8 if want else 0):
            stale += 1
            print("round %d, right after %s: logged_in=%s, %s private keys visible"
                  % (i, "unlock" if want else "lock", got, vis))
print("stale=%d" % stale)
EOF2
if grep -qx 'stale=0' "$T/rounds.out" && [ ! -s "$T/rounds.err" ]; then
	ok "30 lock/unlock rounds: list right after each agrees with it"
else
	not_ok "30 lock/unlock rounds: list right after each agrees with it"
	diag_file "$T/rounds.out" 10
	diag_file "$T/rounds.err" 10
fi
sign_ok "after the lock/unlock rounds"

# ---------------------------------------------------------------- no PIN leaks
file_lacks "$AGENT_LOG" "$USER_PIN" "right PIN not in the agent's --debug log"
file_lacks "$AGENT_LOG" "$BAD_PIN" "wrong PIN not in the agent's --debug log"
if [ -s "$AGENT_LOG" ]; then
	ok "agent --debug log is not empty (the leak check looked at something)"
else
	not_ok "agent --debug log is not empty (the leak check looked at something)"
fi

agent_procs="$AGENT_PID $(child_pid_list "$AGENT_PID")"
diag "agent processes: $agent_procs"
for pid in $agent_procs; do
	for f in cmdline environ; do
		if tr '\0' '\n' <"/proc/$pid/$f" >"$T/$f.$pid" && [ -s "$T/$f.$pid" ]; then
			file_lacks "$T/$f.$pid" "$USER_PIN" "PIN not in /proc/$pid/$f"
		else
			not_ok "PIN not in /proc/$pid/$f (could not read it)"
		fi
	done
done

# The PIN is wiped from every buffer once used: scan the memory of the
# agent and its helpers (root can read a non-dumpable process's memory
# only with CAP_SYS_PTRACE; without it the scan is skipped).
memscan() {
	timeout 120 "$PYTHON3" - "$1" "$2" <<'EOF'
import re, sys
pid, needle = sys.argv[1], sys.argv[2].encode()
CHUNK = 1 << 20
BIG = 1 << 32  # sanitizer shadow and reserved regions: terabytes of zeros
hits = readable = skipped = 0
try:
    maps = open("/proc/%s/maps" % pid).read().splitlines()
    mem = open("/proc/%s/mem" % pid, "rb", 0)
except OSError as e:
    print("unreadable: %s" % e)
    sys.exit(2)
for line in maps:
    m = re.match(r"([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)", line)
    if not m or m.group(3)[0] != "r" or m.group(4) in ("[vvar]", "[vsyscall]"):
        continue
    lo, hi = int(m.group(1), 16), int(m.group(2), 16)
    if hi - lo > BIG:
        skipped += 1
        continue
    tail = b""
    addr = lo
    ok_any = False
    while addr < hi:
        try:
            mem.seek(addr)
            data = mem.read(min(CHUNK, hi - addr))
        except OSError:
            break
        if not data:
            break
        ok_any = True
        buf = tail + data
        if needle in buf:
            hits += 1
            print("found in %s %s" % (m.group(0)[:60], m.group(4)))
            break
        tail = buf[-(len(needle) - 1):]
        addr += len(data)
    readable += ok_any
if skipped:
    print("skipped %d mappings over 4 GiB" % skipped)
if readable == 0:
    print("no readable mapping")
    sys.exit(2)
sys.exit(1 if hits else 0)
EOF
}

for pid in $agent_procs; do
	if memscan "$pid" "$USER_PIN" >"$T/memscan.$pid" 2>&1; then
		ok "PIN not in the memory of agent process $pid (logged in)"
		[ ! -s "$T/memscan.$pid" ] || diag "$(cat "$T/memscan.$pid")"
	else
		st=$?
		if [ "$st" -eq 2 ]; then
			ok "PIN not in the memory of agent process $pid # SKIP cannot read its memory: $(head -n 1 "$T/memscan.$pid")"
		else
			not_ok "PIN not in the memory of agent process $pid (logged in)"
			diag_file "$T/memscan.$pid"
		fi
	fi
done

stop_agent
is "$AGENT_RC" 0 "agent exits 0 on SIGTERM"

# ---------------------------------------------------------------- one C_Login per wrong PIN
# Through OpenSC's pkcs11-spy, which logs every PKCS#11 call: a wrong PIN
# must cost exactly one C_Login (never retried).
if [ -f "$SPY" ]; then
	PKCS11SPY=$SOFTHSM2_MODULE PKCS11SPY_OUTPUT=$T/spy.log
	export PKCS11SPY PKCS11SPY_OUTPUT
	SOCK=$T/spy.sock
	sm=$SOFTHSM2_MODULE
	SOFTHSM2_MODULE=$SPY
	if start_agent; then
		ok "agent starts with pkcs11-spy in front of SoftHSM2"
		run p11a unlock --pin-stdin <"$T/badpin"
		rc_is 1 "wrong PIN through pkcs11-spy exits 1"
		stderr_has "PIN incorrect" "wrong PIN through pkcs11-spy: 'PIN incorrect'"
		if [ -f "$T/spy.log" ]; then
			is "$(awk '/C_Login/ { n++ } END { print n + 0 }' "$T/spy.log")" 1 \
				"a wrong PIN costs exactly one C_Login"
		else
			not_ok "a wrong PIN costs exactly one C_Login (no pkcs11-spy log)"
		fi
		stop_agent
	else
		not_ok "agent starts with pkcs11-spy in front of SoftHSM2"
		diag "(the agent must pass PKCS11SPY/PKCS11SPY_OUTPUT to its helper)"
	fi
	SOFTHSM2_MODULE=$sm
	unset PKCS11SPY PKCS11SPY_OUTPUT
else
	not_ok "pkcs11-spy ($SPY, package opensc-pkcs11) present"
fi

done_testing
