#!/bin/bash
# t_always_auth: keys with CKA_ALWAYS_AUTHENTICATE (PIV signature keys),
# issue 13.  Each signature needs a context-specific login: the helper
# answers CONTEXT_PIN, the client library asks the agent for a PIN dialog
# (CONTEXT_PIN request), the agent hands the PIN to the helper for that one
# signature, the client signs again, and the helper calls C_SignInit,
# C_Login(CKU_CONTEXT_SPECIFIC), C_Sign.
#
# The token is SoftHSM2 (which implements CKA_ALWAYS_AUTHENTICATE and
# CKU_CONTEXT_SPECIFIC) behind the fault module, which counts C_Login calls
# ("C_Login:context" for context-specific ones); the key is made with
# pkcs11-tool --keypairgen --always-auth.  The pinentry is test_pinentry.py
# (answers from $PDIR/behaviour, one log line per dialog).  Cases: one
# dialog per signature and the signature verifies; two signatures, two
# dialogs; cancel refuses that signature; a wrong PIN fails it with one
# context-specific C_Login, never retried; an ordinary key of the same token
# shows no dialog; P11AGENT_NO_PROMPT gets the CONTEXT_PIN error; `p11agent
# list` flags the key; the dialogs are audit events.
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"

require_cmd openssl timeout "$PYTHON3" softhsm2-util pkcs11-tool
require_agent_binaries
make_token
fault_setup

pinentry_setup
echo "pinentry-program $T/test-pinentry" >>"$T/agent.conf"

# The always-auth key, generated on the token the fault module shows.
if pkcs11-tool --module "$SOFTHSM2_MODULE" --token-label "$TOKEN_LABEL" --login --pin "$USER_PIN" \
	--keypairgen --key-type EC:prime256v1 --id a1 --label aa256 --always-auth \
	>"$T/keygen.log" 2>&1; then
	ok "pkcs11-tool made an always-auth P-256 key on the token"
else
	diag_file "$T/keygen.log"
	bail_out "always-auth key made"
fi
pkcs11-tool --module "$SOFTHSM2_MODULE" --token-label "$TOKEN_LABEL" --login --pin "$USER_PIN" \
	--list-objects --type privkey >"$T/objects.txt" 2>&1 || true
if grep -A8 'label: *aa256' "$T/objects.txt" | grep -qi 'always authenticate'; then
	ok "pkcs11-tool --list-objects shows CKA_ALWAYS_AUTHENTICATE on aa256"
else
	not_ok "pkcs11-tool --list-objects shows CKA_ALWAYS_AUTHENTICATE on aa256"
	diag_file "$T/objects.txt" 30
fi

behave action=pin "pin=$USER_PIN"
check "agent starts (fault module, test pinentry)" start_agent --config "$T/agent.conf"
running "$AGENT_PID" || bail_out "agent running"
write_pin "$T/pin" "$USER_PIN"
check "unlock the token (p11agent unlock)" p11a unlock --token "pkcs11:token=$TOKEN_LABEL" \
	--pin-file "$T/pin"
list_json || bail_out "list --json"
AA=$(json_key aa256 uri)
EC=$(json_key ec256 uri)
if [ -z "$AA" ] || [ -z "$EC" ]; then
	bail_out "keys aa256 and ec256 listed"
fi
is "$(json_key aa256 always_authenticate)" true "list --json: aa256 has always_authenticate"
is "$(json_key ec256 always_authenticate)" false "list --json: ec256 does not"
p11a list >"$T/list.txt" 2>&1 || true
if grep -A8 "aa256" "$T/list.txt" | grep -q "always-auth"; then
	ok "p11agent list flags aa256 always-auth"
else
	not_ok "p11agent list flags aa256 always-auth"
	diag_file "$T/list.txt" 40
fi
check "public key of aa256" p11a pubkey "$AA" --out "$T/aa.pub"
openssl pkey -pubin -in "$T/aa.pub" -out "$T/aa.pub.pem" 2>/dev/null ||
	openssl pkey -pubin -inform DER -in "$T/aa.pub" -out "$T/aa.pub.pem"

printf 'message to sign\n' >"$T/msg"
# sign KEY OUT [env...]
sign() {
	local key=$1 out=$2
	shift 2
	run env "$@" timeout "$CLI_TIMEOUT" "$P11AGENT" --socket "$SOCK" sign \
		--key "$key" --scheme ecdsa --in "$T/msg" --out "$out"
}

# ------------------------------------------------------------ one signature, one dialog
n0=$(dialogs)
c0=$(calls C_Login:context)
sign "$AA" "$T/sig1"
rc_is 0 "always-auth key: the signature succeeds with the PIN from the dialog"
is "$(($(dialogs) - n0))" 1 "one PIN dialog for the signature"
is "$(calls C_Login:context)" "$((c0 + 1))" "one C_Login(CKU_CONTEXT_SPECIFIC)"
if openssl dgst -sha256 -verify "$T/aa.pub.pem" -signature "$T/sig1" "$T/msg" >/dev/null 2>&1; then
	ok "the signature verifies with openssl"
else
	not_ok "the signature verifies with openssl"
fi
d=$(last_dialog)
case $d in
GETPIN*aa256*"$TOKEN_LABEL"*) ok "the dialog names key aa256 and token '$TOKEN_LABEL'" ;;
*) not_ok "the dialog names key aa256 and token '$TOKEN_LABEL'"; diag "$d" ;;
esac
case $d in
*p11agent*"(pid "[0-9]*) ok "the dialog names the program and its pid" ;;
*) not_ok "the dialog names the program and its pid"; diag "$d" ;;
esac

# ------------------------------------------------------------ two signatures, two dialogs
n0=$(dialogs)
sign "$AA" "$T/sig2"
rc_is 0 "a second signature succeeds"
sign "$AA" "$T/sig3"
rc_is 0 "a third signature succeeds"
is "$(($(dialogs) - n0))" 2 "two signatures: two dialogs (the PIN is not kept)"

# ------------------------------------------------------------ an ordinary key: no dialog
n0=$(dialogs)
sign "$EC" "$T/sig.ec"
rc_is 0 "ordinary key ec256 on the same token signs"
is "$(($(dialogs) - n0))" 0 "ordinary key: no dialog"

# ------------------------------------------------------------ cancel
behave action=cancel
n0=$(dialogs)
c0=$(calls C_Login:context)
sign "$AA" "$T/sig.cancel"
rc_is 1 "cancel: the signature is refused"
stderr_has "cancelled" "and says the PIN entry was cancelled"
is "$(($(dialogs) - n0))" 1 "cancel: one dialog"
is "$(calls C_Login:context)" "$c0" "cancel: no C_Login"
sleep 2.5       # the cancel back-off (2 s)

# ------------------------------------------------------------ wrong PIN
behave action=pin pin=99999999
n0=$(dialogs)
c0=$(calls C_Login:context)
sign "$AA" "$T/sig.wrong"
rc_is 1 "a wrong PIN: the signature fails"
stderr_has "wrong PIN" "and says the PIN is wrong"
is "$(calls C_Login:context)" "$((c0 + 1))" "a wrong PIN reached C_Login(CONTEXT_SPECIFIC) once (never retried)"
is "$(($(dialogs) - n0))" 1 "a wrong PIN: one dialog, not a second one on its own"
behave action=pin "pin=$USER_PIN"
sign "$AA" "$T/sig.after"
rc_is 0 "the next signature asks again and the right PIN signs"
logged_in() {
	list_json 2>/dev/null && [ "$(json_token logged_in)" = true ]
}
check "the token stays logged in after the wrong context PIN" logged_in

# ------------------------------------------------------------ no prompt
n0=$(dialogs)
sign "$AA" "$T/sig.noprompt" P11AGENT_NO_PROMPT=1
rc_is 1 "P11AGENT_NO_PROMPT: the signature fails"
stderr_has "PIN for each signature" "with the CONTEXT_PIN reason"
is "$(($(dialogs) - n0))" 0 "P11AGENT_NO_PROMPT: no dialog"

# ------------------------------------------------------------ audit
pin_events() {
	p11a log --json | "$PYTHON3" -c '
import json, sys
print(sum(1 for e in json.load(sys.stdin)
          if e.get("event") == "pin-dialog" and "aa256" in e.get("uri", "")))'
}
is "$(pin_events)" 6 "p11agent log: a pin-dialog event per context PIN dialog"
file_lacks "$AGENT_LOG" "99999999" "the wrong PIN is nowhere in the agent's log"
stop_agent
is "$AGENT_RC" 0 "agent exits cleanly"

# ------------------------------------------------------------ keep-context-pin
# The administrator lets the agent keep the PIN of aa256: one dialog, then
# none until the token is locked; not used while the token reports few tries.
cp "$T/agent.conf" "$T/keep.conf"
printf '\n[key pkcs11:object=aa256]\nkeep-context-pin yes\n' >>"$T/keep.conf"
run "$P11AGENTD" --config "$T/keep.conf" --print-config
stdout_has "keep-context-pin yes" "--print-config shows keep-context-pin"
check "agent starts with keep-context-pin yes for aa256" start_agent --config "$T/keep.conf"
check "unlock" p11a unlock --token "pkcs11:token=$TOKEN_LABEL" --pin-file "$T/pin"
n0=$(dialogs)
c0=$(calls C_Login:context)
sign "$AA" "$T/keep1"
rc_is 0 "keep-context-pin: the first signature signs after a dialog"
sign "$AA" "$T/keep2"
rc_is 0 "keep-context-pin: the second signature signs"
is "$(($(dialogs) - n0))" 1 "keep-context-pin: one dialog for two signatures"
is "$(calls C_Login:context)" "$((c0 + 2))" "keep-context-pin: a context login per signature"
if openssl dgst -sha256 -verify "$T/aa.pub.pem" -signature "$T/keep2" "$T/msg" >/dev/null 2>&1; then
	ok "keep-context-pin: the signature with the kept PIN verifies"
else
	not_ok "keep-context-pin: the signature with the kept PIN verifies"
fi
printf '%s\n' "pinflags=count_low" >"$CTL"
count_low() {
	list_json 2>/dev/null && [ "$(json_token pin_count_low)" = true ]
}
if wait_for "the agent sees the token report PIN count low" 15 count_low; then
	ok "the agent sees the token report PIN count low"
fi
n0=$(dialogs)
sign "$AA" "$T/keep3"
rc_is 0 "keep-context-pin, PIN count low: the signature signs"
is "$(($(dialogs) - n0))" 1 "keep-context-pin, PIN count low: the kept PIN is not used (a dialog)"
: >"$CTL"
check "lock" p11a lock
check "unlock" p11a unlock --token "pkcs11:token=$TOKEN_LABEL" --pin-file "$T/pin"
n0=$(dialogs)
sign "$AA" "$T/keep4"
rc_is 0 "keep-context-pin after a lock: the signature signs"
is "$(($(dialogs) - n0))" 1 "keep-context-pin: the lock wiped the kept PIN (a dialog again)"
stop_agent
is "$AGENT_RC" 0 "agent exits cleanly (keep-context-pin)"
done_testing
