#!/bin/bash
# t_confirm: confirm = once | always per [key URI] section (issue 13).  A
# signature with such a key makes the client library ask the agent for a
# confirm dialog (CONFIRM) and sign once more.  once: one yes per program
# (process) and key; always: one yes per signature.  The pinentry is
# test_pinentry.py (answers from $PDIR/behaviour, logs one line per dialog).
# One process making two signatures is curl fetching from two TLS servers
# (two handshakes, each signs with the client key, through the provider).
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/tls_lib.sh
. "$lib_dir/tls_lib.sh"

require_cmd openssl curl timeout "$PYTHON3" softhsm2-util
require_agent_binaries
require_provider
make_token

pinentry_setup
cat >"$T/agent.conf" <<EOF
socket $SOCK
module $SOFTHSM2_MODULE
pinentry-program $T/test-pinentry

[key pkcs11:object=ec256]
confirm once

[key pkcs11:object=ec384]
confirm always
EOF

printf 'message to sign\n' >"$T/msg"
# sign LABEL OUT [env...]: `p11agent sign` with key LABEL.
sign() {
	local label=$1 out=$2
	shift 2
	run env "$@" timeout "$CLI_TIMEOUT" "$P11AGENT" --socket "$SOCK" sign \
		--key "${URI[$label]}" --scheme "$(scheme "$label")" --in "$T/msg" --out "$out"
}

scheme() {
	case $1 in rsa*) echo rsa-pkcs1 ;; *) echo ecdsa ;; esac
}

# curl2 LABEL OUT: one client process, two TLS servers: two client signatures.
# curl, or in sanitizer builds (Debian's curl hangs with libasan preloaded,
# tls_lib.sh) python's ssl with two handshakes in one process.
if [ -z "${CURL_SKIP:-}" ]; then TLS_CLIENT=curl; else TLS_CLIENT=python3; fi
curl2() {
	if [ "$TLS_CLIENT" = curl ]; then
		provider_env timeout "$TLS_TIMEOUT" curl -sS --tlsv1.3 --cacert "$TOKDIR/ca.pem" \
			--cert "$TOKDIR/$1.cert.pem" --key "${REF[$1]}" \
			"https://localhost:${PORT[a]}/" "https://localhost:${PORT[b]}/" >"$2" 2>&1
	else
		provider_env timeout "$TLS_TIMEOUT" "$PYTHON3" "$lib_dir/tls_client.py" threads 2 \
			"$TOKDIR/ca.pem" "$TOKDIR/$1.cert.pem" "${REF[$1]}" \
			"https://localhost:${PORT[a]}/" "https://localhost:${PORT[b]}/" >"$2" 2>&1
	fi
}

# saw_twice OUT LABEL: both servers named the client certificate.
saw_twice() {
	[ "$(grep -cE "^ *$(subject_line "$2")\$" "$1")" -eq 2 ]
}

# curl2_check LABEL OUT DESC: a check that curl2 with LABEL succeeds and
# both servers named the client certificate.
curl2_check() {
	local st=0
	curl2 "$1" "$2" || st=$?
	if [ "$st" -eq 0 ] && saw_twice "$2" "$1"; then
		ok "$3"
	else
		not_ok "$3"
		diag "$TLS_CLIENT exit status $st"
		diag_file "$2" 15
	fi
}

behave action=yes
check "agent starts (confirm once for ec256, always for ec384)" start_agent --config "$T/agent.conf"
running "$AGENT_PID" || bail_out "agent running"
check "unlock" unlock_token
check "list --json" list_json
declare -A URI REF PORT
for label in ec256 ec384 rsa2048; do
	URI[$label]=$(json_key "$label" uri)
	[ -n "${URI[$label]}" ] || bail_out "key $label listed"
	REF[$label]=$T/$label.key.pem
	check "export-key $label" p11a export-key "${URI[$label]}" --out "${REF[$label]}"
done
check "server certificate from the test CA" make_server_cert
check "s_server a" start_tls_server a
check "s_server b" start_tls_server b
if [ -z "${PORT[a]:-}" ] || [ -z "${PORT[b]:-}" ]; then
	bail_out "TLS servers running"
fi

# ------------------------------------------------------------ confirm = once
n0=$(dialogs CONFIRM)
curl2_check ec256 "$T/curl.once" "confirm once, yes: $TLS_CLIENT's two handshakes with ec256 complete"
is "$(($(dialogs CONFIRM) - n0))" 1 "confirm once: one dialog for the two signatures of one program"
d=$(last_dialog)
case $d in
CONFIRM*ec256*) ok "the confirm dialog names key ec256" ;;
*) not_ok "the confirm dialog names key ec256"; diag "$d" ;;
esac
case $d in
*"$TLS_CLIENT"*"(pid "[0-9]*) ok "the confirm dialog names the program ($TLS_CLIENT) and its pid" ;;
*) not_ok "the confirm dialog names the program ($TLS_CLIENT) and its pid"; diag "$d" ;;
esac
sign ec256 "$T/sig.once2"
rc_is 0 "confirm once: another program signs after its own yes"
is "$(($(dialogs CONFIRM) - n0))" 2 "confirm once: another program gets its own dialog"

behave action=no
sign ec256 "$T/sig.once.no"
rc_is 1 "confirm once, no: the signature fails"
stderr_has "refused" "and says the user refused it"
if [ -s "$T/sig.once.no" ]; then
	not_ok "confirm once, no: no signature written"
else
	ok "confirm once, no: no signature written"
fi
is "$(($(dialogs CONFIRM) - n0))" 3 "confirm once, no: one dialog"

# ------------------------------------------------------------ confirm = always
behave action=yes
n0=$(dialogs CONFIRM)
curl2_check ec384 "$T/curl.always" "confirm always, yes: $TLS_CLIENT's two handshakes with ec384 complete"
is "$(($(dialogs CONFIRM) - n0))" 2 "confirm always: a dialog for each of the two signatures"
behave action=no
sign ec384 "$T/sig.always.no"
rc_is 1 "confirm always, no: the signature fails"
stderr_has "refused" "and says the user refused it"
if [ -s "$T/sig.always.no" ]; then
	not_ok "confirm always, no: no signature written"
else
	ok "confirm always, no: no signature written"
fi
is "$(($(dialogs CONFIRM) - n0))" 3 "confirm always, no: one dialog"

# ------------------------------------------------------------ after a no: the back-off
# A "no" holds the same program's further requests for that key back for
# a while (2 s, doubling), with no dialog; other programs still ask.
sign ec384 "$T/sig.always.again"
rc_is 1 "right after a no: the same program's next signature with that key is refused"
stderr_has "no new dialog" "and says no new dialog is shown for it for a while"
is "$(($(dialogs CONFIRM) - n0))" 3 "right after a no: no dialog for the same program"
behave action=yes
curl2_check ec384 "$T/curl.other" "meanwhile another program ($TLS_CLIENT) gets its dialogs and signs"
is "$(($(dialogs CONFIRM) - n0))" 5 "the other program's two dialogs were shown"
p11a log --json >"$T/log.json"
if "$PYTHON3" -c '
import json, sys
print(sum(1 for e in json.load(open(sys.argv[1]))
          if e.get("event") == "confirm" and e.get("result") == "NOT_CONFIRMED"
          and "no new dialog" in (e.get("error") or "")))' "$T/log.json" | grep -qx 1; then
	ok "p11agent log: the refusal in the back-off is an audit event"
else
	not_ok "p11agent log: the refusal in the back-off is an audit event"
	diag_file "$T/log.json" 10
fi

# A program that floods: four requests at once, the first dialog answered
# no while the other three wait in the queue; they get that no without a
# dialog of their own.  First the back-off of the no above ends: a
# signature answered yes (which also resets it).
signs_again() {
	timeout "$CLI_TIMEOUT" "$P11AGENT" --socket "$SOCK" sign --key "${URI[ec384]}" --scheme ecdsa \
		--in "$T/msg" --out "$T/sig.again" >/dev/null 2>&1
}
check "after the back-off the program gets its dialog again (answered yes)" poll 20 signs_again
behave action=no hold=1
rm -f "$PDIR/release" "$PDIR/open"
n1=$(dialogs CONFIRM)
queued() { grep -c "confirm dialog for key 'ec384' queued" "$AGENT_LOG" || true; }
q0=$(queued)
four_queued() { [ "$(($(queued) - q0))" -ge 4 ]; }
bg_signers 4 "${URI[ec384]}" flood
poll 20 test -s "$PDIR/open" || diag "no dialog opened for the flood"
check "flood: the four requests are queued for a dialog" poll 20 four_queued
touch "$PDIR/release"
bg_signers_refused flood "refused"
is "$BG_BAD" 0 "flood: all four requests are refused"
is "$(cat "$T"/sign.flood?.err | grep -c "another request of the same program")" 3 \
	"flood: three of them by the no given in the first one's dialog"
is "$(($(dialogs CONFIRM) - n1))" 1 "flood: one dialog for the four (the no answers the program's queued ones)"
behave action=yes

# ------------------------------------------------------------ no confirm, no prompt
n0=$(dialogs CONFIRM)
sign rsa2048 "$T/sig.plain"
rc_is 0 "a key without confirm signs"
is "$(($(dialogs CONFIRM) - n0))" 0 "a key without confirm: no dialog"
sign ec384 "$T/sig.noprompt" P11AGENT_NO_PROMPT=1
rc_is 1 "P11AGENT_NO_PROMPT=1: a key with confirm = always does not sign"
stderr_has "confirmation" "and says the key needs a confirmation"
is "$(($(dialogs CONFIRM) - n0))" 0 "P11AGENT_NO_PROMPT=1: no dialog"

stop_agent
is "$AGENT_RC" 0 "agent exits cleanly"
done_testing
