#!/bin/bash
# t_token_absent: tpm2-pkcs11 on a machine without a TPM (its package
# registers it with p11-kit system-wide, so every agent that reads the
# registry loads it): C_Initialize fails; the agent says so in one line,
# shows it as failed in status, and serves the other module's token.
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/../integration/lib.sh"

TPM2_MODULE=${TPM2_PKCS11_MODULE:-/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so}
if [ ! -f "$TPM2_MODULE" ]; then
	why="tpm2-pkcs11 not installed ($TPM2_MODULE; apt-get install libtpm2-pkcs11-1)"
	# P11A_REQUIRE_TOKENS: see tests/tokens/run.sh.
	finished=yes
	case " ${P11A_REQUIRE_TOKENS:-} " in
	*" all "* | *[\ ,]tpm2[\ ,]*)
		printf '1..1\nnot ok 1 - P11A_REQUIRE_TOKENS requires tpm2: %s\n' "$why"
		exit 1
		;;
	esac
	printf '1..0 # SKIP %s\n' "$why"
	exit 0
fi
require_agent_binaries
make_token
# lib.sh points tpm2-pkcs11 at a device that does not exist: no TPM here.
printf 'socket %s\nmodule %s\nmodule %s\n' "$SOCK" "$TPM2_MODULE" "$SOFTHSM2_MODULE" >"$T/agent.conf"
check "agent starts with a module that fails C_Initialize and SoftHSM2" start_agent --config "$T/agent.conf"
check "unlock SoftHSM2's token" unlock_token
head -c 100 /dev/urandom >"$T/msg"
run p11a sign --key "$(key_uri ec256)" --scheme ecdsa --hash sha256 --in "$T/msg" --out "$T/sig"
rc_is 0 "SoftHSM2's token signs"
wait_for "the failure is logged" 10 grep -q "libtpm2_pkcs11.so could not be loaded or initialized" "$AGENT_LOG" || :
is "$(grep -c "libtpm2_pkcs11.so could not be loaded or initialized" "$AGENT_LOG")" 1 \
	"one agent line says tpm2-pkcs11 could not be initialized"
file_has "$AGENT_LOG" "C_Initialize: CKR_GENERAL_ERROR); not using it" "the line names C_Initialize, the code and the consequence"
run p11a status
rc_is 0 "status"
if grep -qE "libtpm2_pkcs11.so +failed" "$T/stdout"; then ok "status shows tpm2-pkcs11 as failed"; else not_ok "status shows tpm2-pkcs11 as failed"; diag_last; fi
stdout_has "C_Initialize: CKR_GENERAL_ERROR" "status shows why"
if running "$AGENT_PID"; then ok "the agent still runs"; else not_ok "the agent still runs"; fi
stop_agent
done_testing
