#!/bin/bash
# demo.sh: p11agent from nothing to a verified signature.
#
# On a fresh Debian 12 machine, as root, from a clone of the project:
#   ./demo.sh
# It installs what it needs, builds the tree, makes a SoftHSM2 demo token in
# a private directory (never the system token store), starts the agent on
# it, unlocks it, lists the keys, signs a message with the token's EC P-256
# key through the agent and checks the signature with openssl, then has curl
# authenticate to a local TLS server with that key, through the agent's
# OpenSSL provider.
#
# Environment: P11AGENT_DEMO_KEEP=1 keeps the demo directory at the end.
set -eu -o pipefail

cd "$(dirname "$0")"
top=$(pwd)

TOKEN_LABEL=p11agent-test
PIN=1234
KEY_URI="pkcs11:token=$TOKEN_LABEL;object=ec256;type=private"

# TLS clients in later steps must use the CAs this demo chooses.
unset GIT_SSL_CAINFO CURL_CA_BUNDLE SSL_CERT_FILE P11AGENT_SOCK P11AGENT_PID

step_no=0
step() {
	step_no=$((step_no + 1))
	printf '\n==> Step %d: %s\n' "$step_no" "$*"
}

say() {
	printf '    %s\n' "$*"
}

# show CMD...: print a command as the user would type it (our binaries by
# their name in the tree, arguments with shell characters in single quotes), then run
# it with its output indented.
show() {
	local line=${1#"$top"/} a
	for a in "${@:2}"; do
		case $a in
		*[\;\ \&\|\$\'\"\<\>\(\)\*\?]*) line="$line '$a'" ;;
		*) line="$line $a" ;;
		esac
	done
	printf '    $ %s\n' "$line"
	"$@" 2>&1 | sed 's/^/      /'
}

die() {
	printf '\ndemo.sh: %s\n' "$*" >&2
	exit 1
}

demo_dir=
agent_pid=
cleanup() {
	local st=$?
	set +e
	if [ -n "$agent_pid" ] && kill -0 "$agent_pid" 2>/dev/null; then
		kill -TERM "$agent_pid"
		for _ in $(seq 1 50); do
			kill -0 "$agent_pid" 2>/dev/null || break
			sleep 0.1
		done
	fi
	if [ -n "$demo_dir" ] && [ -d "$demo_dir" ]; then
		if [ -n "${P11AGENT_DEMO_KEEP:-}" ]; then
			printf '\nThe demo directory %s is kept (P11AGENT_DEMO_KEEP is set).\n' "$demo_dir"
		else
			rm -rf "$demo_dir"
		fi
	fi
	if [ "$st" -ne 0 ]; then
		printf '\nThe demo stopped at step %d (exit status %d).\n' "$step_no" "$st" >&2
	fi
	exit "$st"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- packages
step "Install the packages the build and the demo need"
"$top/tests/install-deps.sh" demo || die "could not install the packages: see above"
say "Present: $("$top/tests/install-deps.sh" --list demo)"

# ---------------------------------------------------------------- build
step "Build p11agentd (the agent) and p11agent (the command-line tool)"
if [ ! -f Makefile ]; then
	if [ ! -x configure ]; then
		printf '    $ ./autogen.sh\n'
		./autogen.sh >/dev/null 2>&1 || die "./autogen.sh failed"
	fi
	printf '    $ ./configure\n'
	./configure --quiet >"${TMPDIR:-/tmp}/p11agent-demo-configure.log" 2>&1 ||
		die "./configure failed; see ${TMPDIR:-/tmp}/p11agent-demo-configure.log"
	rm -f "${TMPDIR:-/tmp}/p11agent-demo-configure.log"
fi
printf '    $ make p11agentd p11agent p11agent.la\n'
if ! make -j"$(nproc)" p11agentd p11agent p11agent.la >"${TMPDIR:-/tmp}/p11agent-demo-make.log" 2>&1; then
	tail -n 30 "${TMPDIR:-/tmp}/p11agent-demo-make.log" >&2
	die "the build failed; see ${TMPDIR:-/tmp}/p11agent-demo-make.log"
fi
rm -f "${TMPDIR:-/tmp}/p11agent-demo-make.log"
P11AGENTD=$top/p11agentd
P11AGENT=$top/p11agent
if [ ! -x "$P11AGENTD" ] || [ ! -x "$P11AGENT" ]; then
	die "the build did not produce p11agentd and p11agent"
fi

module=
for d in /usr/lib/softhsm /usr/lib/x86_64-linux-gnu/softhsm /usr/lib64/softhsm /usr/local/lib/softhsm; do
	if [ -f "$d/libsofthsm2.so" ]; then
		module=$d/libsofthsm2.so
		break
	fi
done
[ -n "$module" ] || die "SoftHSM2's PKCS#11 module libsofthsm2.so not found"

# ---------------------------------------------------------------- token
step "Create a demo token in a private directory (SoftHSM2, not the system token store)"
demo_dir=$(mktemp -d "${TMPDIR:-/tmp}/p11agent-demo.XXXXXX")
say "Demo directory: $demo_dir (mode 0700)"
SOFTHSM2_MODULE=$module bash "$top/tests/integration/mktoken.sh" "$demo_dir/token" | sed 's/^/    /'
SOFTHSM2_CONF=$demo_dir/token/softhsm2.conf
export SOFTHSM2_CONF
say "The token '$TOKEN_LABEL' (user PIN $PIN) now holds RSA, EC and Ed25519 keys,"
say "each with a certificate from a small test CA; see $demo_dir/token/README."

# ---------------------------------------------------------------- agent
step "Start the agent on that token, the way ssh-agent starts"
say "p11agentd loads the SoftHSM2 module, forks into the background and prints"
say "the shell lines that tell clients where its socket is:"
# shellcheck disable=SC2016 # printed for the reader, not expanded
printf '    $ eval "$(p11agentd --socket %s --module %s)"\n' "$demo_dir/agent.sock" "$module"
"$P11AGENTD" --socket "$demo_dir/agent.sock" --module "$module" >"$demo_dir/agent.env" ||
	die "p11agentd did not start"
sed 's/^/    /' "$demo_dir/agent.env"
eval "$(cat "$demo_dir/agent.env")" >/dev/null
agent_pid=${P11AGENT_PID:-}
if [ -z "${P11AGENT_SOCK:-}" ] || [ -z "$agent_pid" ]; then
	die "p11agentd did not print P11AGENT_SOCK and P11AGENT_PID"
fi
say "The agent runs as process $agent_pid; its socket is $P11AGENT_SOCK."

# The agent answers at once; its token helper reports the token a moment
# later.
for _ in $(seq 1 100); do
	if "$P11AGENT" list --json 2>/dev/null | /usr/bin/python3 -c '
import json, sys
sys.exit(0 if any(t.get("label") == sys.argv[1] for t in json.load(sys.stdin)["tokens"]) else 1)' \
		"$TOKEN_LABEL"; then
		break
	fi
	sleep 0.1
done

step "Ask the agent for its status"
show "$P11AGENT" status

# ---------------------------------------------------------------- unlock
step "Unlock the token: one PIN entry, and the token stays logged in"
say "(the PIN goes to the agent over the socket, here from standard input)"
printf '    $ echo %s | p11agent unlock --pin-stdin\n' "$PIN"
printf '%s\n' "$PIN" | "$P11AGENT" unlock --pin-stdin 2>&1 | sed 's/^/      /'
say "Unlocked."

# ---------------------------------------------------------------- list
step "List the tokens, keys and certificates the agent offers"
show "$P11AGENT" list

# ---------------------------------------------------------------- sign and verify
step "Sign a message with the EC P-256 key, through the agent"
msg=$demo_dir/message.txt
printf 'Hello from p11agent, %s\n' "$(date -u '+%Y-%m-%d %H:%M:%S UTC')" >"$msg"
say "Message: $(cat "$msg")"
show "$P11AGENT" sign --key "$KEY_URI" --scheme ecdsa --hash sha256 --in "$msg" --out "$msg.sig"
say "Signature: $(wc -c <"$msg.sig") bytes, DER-encoded ECDSA, in $msg.sig"

step "Check the signature with openssl, against the key's public key and its certificate"
show "$P11AGENT" pubkey "$KEY_URI" --out "$demo_dir/ec256.pub.pem"
show openssl dgst -sha256 -verify "$demo_dir/ec256.pub.pem" -signature "$msg.sig" "$msg"
show "$P11AGENT" export-cert "$KEY_URI" --out "$demo_dir/ec256.crt"
openssl x509 -in "$demo_dir/ec256.crt" -noout -subject -issuer | sed 's/^/    /'
openssl x509 -in "$demo_dir/ec256.crt" -noout -pubkey >"$demo_dir/ec256.crt.pub.pem"
show openssl dgst -sha256 -verify "$demo_dir/ec256.crt.pub.pem" -signature "$msg.sig" "$msg"
say "openssl accepts the signature: the private key never left the token,"
say "and this shell never loaded the PKCS#11 module."

# ---------------------------------------------------------------- TLS with curl
step "curl authenticates to a TLS server with the token key, through the agent"
say "A local 'openssl s_server' demands a client certificate (signed by the test CA)."
say "curl gets the certificate as a file and, as its key, a key-reference file from"
say "'p11agent export-key' (it names the key, holds no secret); the p11agent OpenSSL"
say "provider, enabled by 'p11agent exec', sends the TLS signature to the agent:"
bash "$top/tests/integration/demo_curl.sh" "$demo_dir/token" ec256 2>&1 | sed 's/^/      /'
say "The server's answer names the client certificate: curl authenticated with the"
say "key on the token, and curl never loaded the PKCS#11 module or saw the PIN."

# ---------------------------------------------------------------- stop
step "Stop the agent"
show kill -TERM "$agent_pid"
for _ in $(seq 1 50); do
	kill -0 "$agent_pid" 2>/dev/null || break
	sleep 0.1
done
if kill -0 "$agent_pid" 2>/dev/null; then
	die "the agent (pid $agent_pid) did not stop"
fi
agent_pid=
if [ -e "$P11AGENT_SOCK" ]; then
	die "the agent left its socket $P11AGENT_SOCK behind"
fi
say "The agent exited and removed its socket; the token logged out with it."

printf '\nDemo finished: the agent signed for a command-line client and for curl'"'"'s TLS handshake.\n'
