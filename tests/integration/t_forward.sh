#!/bin/bash
# t_forward: the agent's socket forwarded with `ssh -R` to another account,
# through a socat relay, and into a user namespace (docs/forwarding.md).
#
# A real sshd (openssh-server) on 127.0.0.1 with throwaway host and user
# keys, started here and stopped by PID; a second local account made here
# (removed at the end) is the "remote" user; `ssh -R REMOTE.sock:$SOCK`
# from the agent's user.  On the remote side, as that account: `p11agent
# list`, `p11agent sign` verified with openssl, lock and unlock, curl and
# python with a key-reference file and openssl s_client with the key's
# URI through the provider against openssl s_server -Verify 1 (the page
# shows the client certificate), and git clone over https through the
# PKCS#11 front-end module registered in that account's
# ~/.config/pkcs11/modules (nginx's log shows the certificate).  No
# descriptor crosses ssh: every signature is relayed by the agent
# (H_SIGN), and the agent logs the connection as forwarded.
#
# Policy: `forwarding deny` on a key refuses forwarded signatures with a
# message that says so while local clients sign on; `confirm` is refused
# until a dialog exists; a global deny with a per-key allow.  A socat
# relay (descriptors lost like ssh's) is recognised from its relayed SIGN.
# Hostile input over the ssh forward: malformed frames and a half frame
# drop that connection only (forward_cases.py).  Containers: a client in a
# user namespace with the socket bind-mounted signs with channels; a peer
# whose uid maps to another uid, or to the overflow uid, is refused with a
# log line that says why.
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/tls_lib.sh
. "$lib_dir/tls_lib.sh"
# shellcheck source=tests/integration/pkcs11_lib.sh
. "$lib_dir/pkcs11_lib.sh"

SSHD=${SSHD:-/usr/sbin/sshd}
if [ "$(id -u)" != 0 ]; then
	skip "forwarding through sshd to a second account" "needs root (useradd, sshd)"
	done_testing
fi
require_cmd ssh ssh-keygen socat useradd userdel usermod setpriv unshare openssl curl git \
	"$PYTHON3" "$NGINX" "$FCGIWRAP" "$GIT_HTTP_BACKEND"
require_file "$SSHD"
require_provider
pk_setup
unset OPENSSL_CONF
# Sanitizer builds: curl and git hang in setlocale() with libasan
# preloaded (pkcs11_lib.sh); the rest runs.

# ---------------------------------------------------------------- the agent
# ec256: default (allow); ec384: forwarding deny; rsa2048: forwarding confirm.
# Dialogs (forwarding confirm, a PIN on first use) go to the test pinentry,
# which answers from $PDIR/behaviour and logs one line per dialog.
pinentry_setup
# The dialogs here are confirms only: a locked token is not prompted for.
export P11AGENT_NO_PROMPT=1
printf 'action=cancel\n' >"$PDIR/behaviour"
cat >"$T/agent.conf" <<EOF
socket $SOCK
module $SOFTHSM2_MODULE
pinentry-program $T/test-pinentry
[key pkcs11:token=$TOKEN_LABEL;object=ec384]
forwarding deny
[key pkcs11:token=$TOKEN_LABEL;object=rsa2048]
forwarding confirm
EOF
run env XDG_CONFIG_HOME="$T/config" "$P11AGENTD" --print-config --config "$T/agent.conf"
rc_is 0 "--print-config with forwarding settings"
stdout_has "forwarding deny	# $T/agent.conf:5" "--print-config: the [key] section's forwarding and its line"
stdout_has "forwarding allow	# default" "--print-config: the default is allow"
printf '[key pkcs11:object=ec256]\nforwarding maybe\n' >"$T/bad.conf"
run env XDG_CONFIG_HOME="$T/config" "$P11AGENTD" --print-config --config "$T/bad.conf" \
	--module "$SOFTHSM2_MODULE"
rc_is 1 "a bad forwarding value stops the agent"
stderr_has "$T/bad.conf:2: forwarding must be allow, confirm or deny, not 'maybe'" "bad value: FILE:LINE: reason"

# $T is opened (0711) for the remote account below; the agent's socket
# directory must stay 0700.
SOCK=$T/agent/agent.sock
mkdir -m 0700 "$T/agent"
sed -i "s|^socket .*|socket $SOCK|" "$T/agent.conf"
start_agent --config "$T/agent.conf" || bail_out "agent started"
unlock_token >/dev/null || bail_out "token unlocked"
declare -A URI CERT_URI
for k in ec256 ec384 rsa2048; do
	URI[$k]=$(key_uri_of "$k" private)
	CERT_URI[$k]=$(key_uri_of "$k" cert)
done

# ---------------------------------------------------------------- the remote account
FWD_USER=p11fwd$$
# shellcheck disable=SC2317 # called by lib.sh's cleanup (at_cleanup)
remove_account() {
	if id "$FWD_USER" >/dev/null 2>&1 && ! userdel "$FWD_USER" 2>"$T/userdel.err"; then
		echo "# t_forward: userdel $FWD_USER failed: $(cat "$T/userdel.err")" >&2
	fi
}
useradd -M -d "$T/home" -s /bin/bash -U "$FWD_USER" || bail_out "useradd $FWD_USER"
at_cleanup remove_account
# "*": no password, and not locked ("!"), which sshd without PAM refuses.
usermod -p '*' "$FWD_USER"
FWD_UID=$(id -u "$FWD_USER")
FWD_GID=$(id -g "$FWD_USER")
chmod 711 "$T"
mkdir -p "$T/home/.config/pkcs11/modules" "$T/r"
# The account's p11-kit registry: the front-end module only (as pk_registry
# does for a user), so GnuTLS programs reach the agent and no SoftHSM2.
sed "s|^module:.*|module: $PK_MODULE|" "$top_srcdir/packaging/p11agent-pkcs11.module.in" \
	>"$T/home/.config/pkcs11/modules/p11agent-pkcs11.module"
printf 'user-config: override\n' >"$T/home/.config/pkcs11/pkcs11.conf"
chown -R "$FWD_USER:" "$T/home" "$T/r"
chmod 700 "$T/r"
RSOCK=$T/r/agent.sock

# ---------------------------------------------------------------- sshd
mkdir -p "$T/ssh"
chmod 755 "$T/ssh"
ssh-keygen -q -t ed25519 -N '' -C t_forward-host -f "$T/ssh/host_key"
ssh-keygen -q -t ed25519 -N '' -C t_forward-user -f "$T/ssh/id"
cp "$T/ssh/id.pub" "$T/ssh/authorized_keys"
chmod 644 "$T/ssh/authorized_keys"
SSH_PORT=$(free_port)
printf '[127.0.0.1]:%s %s\n' "$SSH_PORT" "$(cut -d' ' -f1,2 "$T/ssh/host_key.pub")" >"$T/ssh/known_hosts"
cat >"$T/ssh/sshd_config" <<EOF
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $T/ssh/host_key
PidFile $T/ssh/sshd.pid
AuthorizedKeysFile $T/ssh/authorized_keys
AllowUsers $FWD_USER
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin no
AllowStreamLocalForwarding yes
StreamLocalBindUnlink yes
X11Forwarding no
PrintMotd no
LogLevel DEBUG1
EOF
# sshd's privilege-separation directory, which the package's init script makes.
[ -d /run/sshd ] || mkdir -m 0755 /run/sshd
"$SSHD" -D -e -f "$T/ssh/sshd_config" >"$T/sshd.log" 2>&1 &
SSHD_PID=$!
remember_pid "$SSHD_PID"
if ! wait_port "$SSH_PORT" 10; then
	diag_file "$T/sshd.log"
	bail_out "sshd listens on 127.0.0.1:$SSH_PORT"
fi
SSH=(ssh -F /dev/null -i "$T/ssh/id" -o IdentitiesOnly=yes -o BatchMode=yes
	-o UserKnownHostsFile="$T/ssh/known_hosts" -o StrictHostKeyChecking=yes
	-o LogLevel=ERROR -p "$SSH_PORT" "$FWD_USER@127.0.0.1")

# The forward, as a user sets it up: ssh -R REMOTE:LOCAL (docs/forwarding.md).
"${SSH[@]}" -N -o ExitOnForwardFailure=yes -o StreamLocalBindUnlink=yes \
	-R "$RSOCK:$SOCK" >"$T/ssh-forward.log" 2>&1 &
FWD_PID=$!
remember_pid "$FWD_PID"
if ! poll 15 test -S "$RSOCK"; then
	diag_file "$T/ssh-forward.log"
	diag_file "$T/sshd.log"
	bail_out "ssh -R made $RSOCK on the remote side"
fi
is "$(stat -c %U "$RSOCK")" "$FWD_USER" "the forwarded socket belongs to the remote account"

# remote CMD...: CMD in an ssh session of the remote account, with the
# forwarded socket as its agent and no SoftHSM2 token store of its own.
# shellcheck disable=SC2317 # called through run and poll
remote() {
	local q
	q=$(printf '%q ' env P11AGENT_SOCK="$RSOCK" SOFTHSM2_CONF="$T/empty-softhsm2.conf" "$@")
	"${SSH[@]}" -- "$q"
}

# ---------------------------------------------------------------- remote: the CLI
run remote timeout 30 "$P11AGENT" list
rc_is 0 "remote: p11agent list through ssh -R"
stdout_has "ec256" "remote: the list shows the token's keys"
printf 'signed on the remote host\n' >"$T/msg"
chmod 644 "$T/msg"
n_relayed() { grep -c 'forwarded sign .*: ok' "$AGENT_LOG" || true; }
before=$(n_relayed)
run remote timeout 30 "$P11AGENT" sign --key "${URI[ec256]}" --scheme ecdsa --in "$T/msg" --out "$T/r/sig"
rc_is 0 "remote: p11agent sign through ssh -R"
run openssl dgst -sha256 -verify "$TOKDIR/ec256.pub.pem" -signature "$T/r/sig" "$T/msg"
rc_is 0 "remote: the signature verifies with openssl against the key's public half"
is "$(($(n_relayed) - before))" 1 "the helper signed it as a forwarded (relayed) signature"
file_has "$AGENT_LOG" "/usr/bin/ssh), forwarded (ssh)" "the agent logs the ssh peer's connection as forwarded"
# The audit trail marks the relayed signature as forwarded (p11agent log).
fwd_events() {
	p11a log --json | python3 -c '
import json, sys
print(sum(1 for e in json.load(sys.stdin)
          if e.get("event") == "sign" and e.get("forwarded") is True and e.get("result") == "ok"))'
}
# Events reach the agent's ring in batches (within 50 ms): wait for it.
# shellcheck disable=SC2317 # called through wait_for
fwd_one() { [ "$(fwd_events)" -ge 1 ]; }
if wait_for "p11agent log: a sign event marked forwarded" 10 fwd_one; then
	is "$(fwd_events)" 1 "p11agent log: the relayed signature is one sign event marked forwarded"
fi

# lock and unlock from the remote side: the PIN goes through the forward.
run remote timeout 30 "$P11AGENT" lock
rc_is 0 "remote: p11agent lock"
run remote timeout 30 "$P11AGENT" sign --key "${URI[ec256]}" --scheme ecdsa --in "$T/msg" --out "$T/r/sig-locked"
rc_is 1 "remote: sign while locked fails"
stderr_has "PIN entry cancelled" "remote: a locked token asks for the PIN on this machine (the test pinentry cancels)"
printf '%s\n' "$USER_PIN" >"$T/r/pin"
chown "$FWD_USER:" "$T/r/pin"
chmod 600 "$T/r/pin"
run remote timeout 30 "$P11AGENT" unlock --pin-file "$T/r/pin"
rc_is 0 "remote: p11agent unlock through the forward"
run remote timeout 30 "$P11AGENT" sign --key "${URI[ec256]}" --scheme ecdsa --in "$T/msg" --out "$T/r/sig-unlocked"
rc_is 0 "remote: sign after the remote unlock"

# ---------------------------------------------------------------- remote: curl through the provider
if [ -z "$PK_SAN_SKIP" ]; then
	check "export-key ec256 (key-reference file)" p11a export-key "${URI[ec256]}" --out "$T/ec256.ref"
	chmod 644 "$T/ec256.ref"
	start_tls_server fwd || bail_out "s_server started"
	# saw_cert OUT LABEL DESC: the s_server page names the client certificate
	# (or shows its PEM: the page may end early, FIELD-NOTES).
	saw_cert() {
		local pem_line
		pem_line=$(sed -n 2p "$TOKDIR/$2.cert.pem")
		if grep -qE "^ *$(subject_line "$2")\$" "$1" || grep -qF -- "$pem_line" "$1"; then
			ok "$3"
		else
			not_ok "$3"
			diag_file "$1" 12
		fi
	}
	run remote timeout 60 env OPENSSL_CONF="$PROVIDER_CONF" OPENSSL_MODULES="$PROVIDER_MODULE_DIR" \
		curl -sS --tlsv1.3 --cacert "$TOKDIR/ca.pem" --cert "$TOKDIR/ec256.cert.pem" \
		--key "$T/ec256.ref" "https://localhost:${PORT[fwd]}/"
	rc_is 0 "remote: curl with a key-reference file through the provider (TLS 1.3)"
	cp "$T/stdout" "$T/curl.out"
	saw_cert "$T/curl.out" ec256 "remote: s_server saw ec256's certificate from curl"
	run remote timeout 60 env OPENSSL_CONF="$PROVIDER_CONF" OPENSSL_MODULES="$PROVIDER_MODULE_DIR" \
		curl -sS --tlsv1.2 --tls-max 1.2 --cacert "$TOKDIR/ca.pem" --cert "$TOKDIR/ec256.cert.pem" \
		--key "$T/ec256.ref" "https://localhost:${PORT[fwd]}/"
	rc_is 0 "remote: curl through the provider (TLS 1.2)"
	# openssl s_client with the key's pkcs11: URI (the provider's store), and python's ssl.
	run remote timeout 60 env OPENSSL_CONF="$PROVIDER_CONF" OPENSSL_MODULES="$PROVIDER_MODULE_DIR" \
		sh -c 'printf "GET / HTTP/1.0\r\n\r\n" | exec openssl s_client -quiet -tls1_3 -servername localhost "$@"' \
		sh -connect "127.0.0.1:${PORT[fwd]}" -CAfile "$TOKDIR/ca.pem" \
		-cert "$TOKDIR/ec256.cert.pem" -key "${URI[ec256]}"
	cp "$T/stdout" "$T/s_client.out"
	saw_cert "$T/s_client.out" ec256 "remote: openssl s_client with the pkcs11: URI through the provider"
	run remote timeout 60 env OPENSSL_CONF="$PROVIDER_CONF" OPENSSL_MODULES="$PROVIDER_MODULE_DIR" \
		"$PYTHON3" "$lib_dir/tls_client.py" get "https://localhost:${PORT[fwd]}/" "$TOKDIR/ca.pem" \
		"$TOKDIR/ec256.cert.pem" "$T/ec256.ref" --tls 1.3
	rc_is 0 "remote: python's ssl with the key-reference file through the provider"
	cp "$T/stdout" "$T/python.out"
	saw_cert "$T/python.out" ec256 "remote: s_server saw ec256's certificate from python"

	# ---------------------------------------------------------------- remote: git through the PKCS#11 module
	mkdir -p "$T/repos" "$T/work"
	git init -q -b main "$T/work/repo"
	printf 'hello from the forwarded test repository\n' >"$T/work/repo/README"
	git -C "$T/work/repo" add README
	git -C "$T/work/repo" -c user.name=t -c user.email=t@example.invalid commit -q -m one
	git clone -q --bare "$T/work/repo" "$T/repos/repo.git"
	pk_start_nginx "$T/repos" || bail_out "nginx and fcgiwrap listen"
	chmod 644 "$T/server.pem"
	run remote timeout 90 env GIT_CONFIG_GLOBAL=/dev/null GIT_CONFIG_NOSYSTEM=1 GIT_TERMINAL_PROMPT=0 \
		git -c http.sslCAInfo="$T/server.pem" -c http.sslCert="${CERT_URI[ec256]}" \
		-c http.sslKey="${URI[ec256]}" clone -q "https://localhost:$P13/git/repo.git" "$T/r/clone"
	rc_is 0 "remote: git clone over https with the key through the PKCS#11 module (GnuTLS)"
	if cmp -s "$T/r/clone/README" "$T/work/repo/README"; then
		ok "remote: the clone has the repository's content"
	else
		not_ok "remote: the clone has the repository's content"
	fi
	if grep -F "/git/repo.git/info/refs" "$T/nginx/access.log" | tail -n 1 |
		grep -qF "TLSv1.3 \"CN=ec256,O=p11agent test\" SUCCESS"; then
		ok "nginx saw ec256's certificate for the remote git clone"
	else
		not_ok "nginx saw ec256's certificate for the remote git clone"
		diag_file "$T/nginx/access.log" 5
	fi
else
	skip "remote: curl through the provider, git through the PKCS#11 module" "$PK_SAN_SKIP"
fi

# ---------------------------------------------------------------- policy: deny and confirm
run remote timeout 30 "$P11AGENT" sign --key "${URI[ec384]}" --scheme ecdsa --in "$T/msg" --out "$T/r/sig384"
rc_is 1 "remote: ec384 (forwarding deny) is refused"
stderr_has "forwarding is denied for key 'ec384'" "remote: the error says forwarding is denied for this key"
file_has "$AGENT_LOG" "forwarded connection, pid" "the helper logs the refusal as forwarded"
run p11a sign --key "${URI[ec384]}" --scheme ecdsa --hash sha384 --in "$T/msg" --out "$T/sig384"
rc_is 0 "local: ec384 signs (forwarding deny concerns forwarded connections only)"
# forwarding confirm: each forwarded signature asks on this machine.
n_confirms() { grep -c '^CONFIRM' "$PDIR/log" 2>/dev/null || true; }
c0=$(n_confirms)
printf 'action=no\n' >"$PDIR/behaviour"
run remote timeout 30 "$P11AGENT" sign --key "${URI[rsa2048]}" --scheme rsa-pkcs1 --in "$T/msg" --out "$T/r/sigrsa"
rc_is 1 "remote: rsa2048 (forwarding confirm) answered no is refused"
stderr_has "refused by the user" "remote: the error says the user refused"
is "$(($(n_confirms) - c0))" 1 "remote: one confirm dialog for the refused signature"
file_has "$PDIR/log" "forwarded connection" "the dialog says the request is forwarded"
printf 'action=yes\n' >"$PDIR/behaviour"
# Right after a no, the same program (here the local ssh) gets no new
# dialog for that key for 2 s: refused at once, in words.
run remote timeout 30 "$P11AGENT" sign --key "${URI[rsa2048]}" --scheme rsa-pkcs1 --in "$T/msg" --out "$T/r/sigrsa"
rc_is 1 "remote: right after the no, the next forwarded signature is refused without a dialog"
stderr_has "no new dialog" "remote: the error says no new dialog is shown for a while"
is "$(($(n_confirms) - c0))" 1 "remote: no dialog during the back-off"
# Once the back-off is over (2 s), the next one gets its dialog, answered yes.
remote_signs() {
	remote timeout 30 "$P11AGENT" sign --key "${URI[rsa2048]}" --scheme rsa-pkcs1 --in "$T/msg" \
		--out "$T/r/sigrsa" >/dev/null 2>&1
}
check "remote: rsa2048 (forwarding confirm) answered yes signs" poll 20 remote_signs
run openssl dgst -sha256 -verify "$TOKDIR/rsa2048.pub.pem" -signature "$T/r/sigrsa" "$T/msg"
rc_is 0 "remote: the confirmed signature verifies"
run remote timeout 30 "$P11AGENT" sign --key "${URI[rsa2048]}" --scheme rsa-pkcs1 --in "$T/msg" --out "$T/r/sigrsa2"
rc_is 0 "remote: a second forwarded signature, confirmed again"
is "$(($(n_confirms) - c0))" 3 "remote: one dialog per forwarded signature (3 in all)"
run p11a sign --key "${URI[rsa2048]}" --scheme rsa-pkcs1 --in "$T/msg" --out "$T/sigrsa"
rc_is 0 "local: rsa2048 signs"
is "$(($(n_confirms) - c0))" 3 "local: no dialog for a local client (forwarding confirm concerns forwarded ones)"
printf 'action=cancel\n' >"$PDIR/behaviour"
if [ -z "$PK_SAN_SKIP" ]; then
	run remote timeout 60 env OPENSSL_CONF="$PROVIDER_CONF" OPENSSL_MODULES="$PROVIDER_MODULE_DIR" \
		curl -sS --tlsv1.3 --cacert "$TOKDIR/ca.pem" --cert "$TOKDIR/ec256.cert.pem" \
		--key "$T/ec256.ref" "https://localhost:${PORT[fwd]}/"
	rc_is 0 "remote: curl with ec256 still works next to the refusals"
fi

# ---------------------------------------------------------------- a socat relay
socat "UNIX-LISTEN:$T/relay.sock,fork,mode=600" "UNIX-CONNECT:$SOCK" >"$T/socat.log" 2>&1 &
SOCAT_PID=$!
remember_pid "$SOCAT_PID"
poll 10 test -S "$T/relay.sock" || bail_out "socat relay listens"
run timeout 30 "$P11AGENT" --socket "$T/relay.sock" sign --key "${URI[ec256]}" --scheme ecdsa \
	--in "$T/msg" --out "$T/sig-socat"
rc_is 0 "socat relay: p11agent sign works (no descriptor crosses it)"
run openssl dgst -sha256 -verify "$TOKDIR/ec256.pub.pem" -signature "$T/sig-socat" "$T/msg"
rc_is 0 "socat relay: the signature verifies"
file_has "$AGENT_LOG" "/usr/bin/socat): forwarded: signs on its main connection" \
	"the agent logs the relay's connection as forwarded from its first relayed SIGN"
run timeout 30 "$P11AGENT" --socket "$T/relay.sock" sign --key "${URI[ec384]}" --scheme ecdsa \
	--in "$T/msg" --out "$T/sig-socat384"
rc_is 1 "socat relay: ec384 (forwarding deny) is refused"
stderr_has "forwarding is denied" "socat relay: the error says forwarding is denied"
run provider_env timeout 30 env P11AGENT_SOCK="$T/relay.sock" openssl pkeyutl -sign \
	-inkey "${URI[ec256]}" -in "$T/msg" -rawin -digest sha256 -out "$T/sig-prov"
rc_is 0 "socat relay: openssl pkeyutl through the provider signs"

# ---------------------------------------------------------------- hostile input over the ssh forward
before_helpers=$(child_pid_list "$AGENT_PID")
if timeout 200 "$PYTHON3" "$lib_dir/forward_cases.py" "$RSOCK" "$SOCK" "${URI[ec256]}" \
	>"$T/fc.out" 2>"$T/fc.err"; then fc_rc=0; else fc_rc=$?; fi
relay_cases "$T/fc.out"
if [ "$fc_rc" -eq 0 ] && [ "$CASES_DONE" != "" ]; then
	ok "forward_cases.py ran to the end ($CASES_DONE)"
else
	not_ok "forward_cases.py ran to the end (exit $fc_rc)"
	diag_file "$T/fc.err"
fi
is "$(child_pid_list "$AGENT_PID")" "$before_helpers" "no token helper restarted during the hostile cases"
run p11a sign --key "${URI[ec256]}" --scheme ecdsa --in "$T/msg" --out "$T/sig-after"
rc_is 0 "local: p11agent sign works after the hostile cases"
run remote timeout 30 "$P11AGENT" sign --key "${URI[ec256]}" --scheme ecdsa --in "$T/msg" --out "$T/r/sig2"
rc_is 0 "remote: p11agent sign works after the hostile cases"

# ---------------------------------------------------------------- global deny, per-key allow
stop_pid "$FWD_PID"
stop_agent
cat >"$T/agent.conf" <<EOF
socket $SOCK
module $SOFTHSM2_MODULE
forwarding deny
[key pkcs11:token=$TOKEN_LABEL;object=ec256]
forwarding allow
EOF
start_agent --config "$T/agent.conf" || bail_out "agent restarted with forwarding deny"
unlock_token >/dev/null || bail_out "token unlocked"
"${SSH[@]}" -N -o ExitOnForwardFailure=yes -o StreamLocalBindUnlink=yes \
	-R "$RSOCK:$SOCK" >"$T/ssh-forward.log" 2>&1 &
FWD_PID=$!
remember_pid "$FWD_PID"
poll 15 remote test -S "$RSOCK" || bail_out "ssh -R again"
run remote timeout 30 "$P11AGENT" sign --key "${URI[ec256]}" --scheme ecdsa --in "$T/msg" --out "$T/r/sig3"
rc_is 0 "global deny: remote ec256 (forwarding allow) signs"
run remote timeout 30 "$P11AGENT" sign --key "${URI[rsa2048]}" --scheme rsa-pkcs1 --in "$T/msg" --out "$T/r/sig4"
rc_is 1 "global deny: remote rsa2048 is refused"
stderr_has "forwarding is denied for key 'rsa2048'" "global deny: the error names the key"
run remote timeout 30 "$P11AGENT" list
rc_is 0 "global deny: remote p11agent list still works (no key is used)"
run p11a sign --key "${URI[rsa2048]}" --scheme rsa-pkcs1 --in "$T/msg" --out "$T/sig5"
rc_is 0 "global deny: local rsa2048 signs"
stop_pid "$FWD_PID"

# ---------------------------------------------------------------- containers (user namespaces)
relayed_before=$(grep -c "forwarded: signs on its main connection" "$AGENT_LOG" || true)
mkdir -p "$T/c"
: >"$T/c/agent.sock"
# shellcheck disable=SC2016 # expanded by the inner shell
run timeout 30 unshare -U -r -m sh -c 'mount --bind "$1" "$2" || exit 125; shift 2; exec "$@"' sh \
	"$SOCK" "$T/c/agent.sock" "$P11AGENT" --socket "$T/c/agent.sock" sign --key "${URI[rsa2048]}" \
	--scheme rsa-pkcs1 --in "$T/msg" --out "$T/sig-ns"
if [ "$rc" = 125 ]; then
	skip "container: the socket bind-mounted into a user namespace" "cannot bind-mount in a user namespace here"
else
	rc_is 0 "container: p11agent sign in a user namespace with the socket bind-mounted"
	run openssl dgst -sha256 -verify "$TOKDIR/rsa2048.pub.pem" -signature "$T/sig-ns" "$T/msg"
	rc_is 0 "container: the signature verifies"
	is "$(grep -c "forwarded: signs on its main connection" "$AGENT_LOG" || true)" "$relayed_before" \
		"container: it signed on a channel (descriptors pass into the namespace), not relayed"
fi
# A container that maps its root to the second account's uid (as
# subordinate ids do): the agent sees that uid and refuses it.  The socket
# is opened up for this case only, so that the uid check is what refuses.
chmod 711 "$T/agent"
chmod 666 "$SOCK"
run timeout 30 setpriv --reuid="$FWD_UID" --regid="$FWD_GID" --clear-groups \
	unshare -U -r "$P11AGENT" --socket "$SOCK" status
rc_is 1 "container mapped to another uid: refused"
file_has "$AGENT_LOG" "refused a connection from uid $FWD_UID" "the agent logs the refusal with the uid"
file_has "$AGENT_LOG" "a peer in a user namespace shows as the uid its own uid maps to" \
	"the log line says why (a user namespace maps to that uid)"
# An agent inside a user namespace that maps only its own uid: any other
# peer reads as the kernel's overflow uid, and the log says so.
stop_agent
chmod 700 "$T/agent"
start_agent --config "$T/agent.conf" --wrap "unshare -U -r" || bail_out "agent in a user namespace"
chmod 711 "$T/agent"
chmod 666 "$SOCK"
run timeout 30 setpriv --reuid="$FWD_UID" --regid="$FWD_GID" --clear-groups "$P11AGENT" --socket "$SOCK" status
rc_is 1 "a peer whose uid does not map into the agent's namespace: refused"
ovf=$(cat /proc/sys/kernel/overflowuid)
file_has "$AGENT_LOG" "refused a connection from uid $ovf (pid" "the agent sees the overflow uid $ovf"
file_has "$AGENT_LOG" "that is the kernel's overflow uid" "the log line names the overflow uid case"
check "the agent's own user unlocks the namespaced agent" unlock_token
run p11a sign --key "${URI[ec256]}" --scheme ecdsa --in "$T/msg" --out "$T/sig-ovf"
rc_is 0 "the agent's own user still signs"

stop_agent
is "$AGENT_RC" 0 "the agent exits cleanly"
file_lacks "$AGENT_LOG" "Sanitizer" "no sanitizer report in the agent's log (its helpers included)"
done_testing
