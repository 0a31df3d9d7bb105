#!/bin/bash
# t_allow_programs: `allow-programs` (p11agentd.conf(5)) lets only the named
# executables (by the client's /proc/PID/exe, read when it connects) sign
# with a key.
#
# The administrator's file locks allow-programs; ec256 may be used by curl
# only; ec384 is tls-only and may be used by the python interpreter (the
# PKCS#11 client runs in it); ec521 is tls-only with no list.  Then: curl's
# TLS 1.2 and 1.3 handshakes through the provider sign with ec256, python's
# ssl handshake and `p11agent sign` are refused with the policy message
# naming the key, the allowed programs and the program that asked; the
# agent's log has each refusal with the pid and the executable.  Through
# p11agent-pkcs11.so (python): C_Sign(CKM_ECDSA, a digest) with tls-only
# ec384 is signed (its allow-programs names python), with tls-only ec521
# refused (CKR_FUNCTION_REJECTED); a message that is no TLS content stays
# refused for ec384.  The user's file cannot change the locked setting; bad
# values stop the agent with FILE:LINE.  A second agent: a global
# allow-programs (two lines: they add up) applies to a key no section names.
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/tls_lib.sh
. "$lib_dir/tls_lib.sh"
# shellcheck source=tests/integration/pkcs11_lib.sh
. "$lib_dir/pkcs11_lib.sh"

require_cmd openssl curl timeout awk readlink "$PYTHON3" softhsm2-util pkcs11-tool
require_agent_binaries
require_provider
make_token
require_file "$PK_MODULE"
pk_san_env
mkdir -p "$T/empty-tokens" "$T/etc/p11agent" "$T/config/p11agent"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' \
	"$T/empty-tokens" >"$T/empty-softhsm2.conf"

# What /proc/PID/exe shows for the clients: the real paths of the programs.
CURL_EXE=$(readlink -f "$(command -v curl)")
PY_EXE=$(readlink -f "$(command -v "$PYTHON3")")
if [ ! -x "$CURL_EXE" ] || [ ! -x "$PY_EXE" ]; then
	bail_out "the real paths of curl and $PYTHON3"
fi
diag "curl is $CURL_EXE, python is $PY_EXE"

ADMIN=$T/etc/p11agent/p11agentd.conf
cat >"$ADMIN" <<CONF
# t_allow_programs
lock allow-programs
[key pkcs11:token=$TOKEN_LABEL;object=ec256]
allow-programs $CURL_EXE
[key pkcs11:token=$TOKEN_LABEL;object=ec384]
tls-only yes
allow-programs $PY_EXE
[key pkcs11:token=$TOKEN_LABEL;object=ec521]
tls-only yes
CONF

# ---------------------------------------------------------------- configuration errors
# bad_conf DESC LINE EXPECTED FILE-CONTENT: the agent does not start, says FILE:LINE: EXPECTED.
bad_conf() {
	local desc=$1 line=$2 want=$3
	printf '%s\n' "$4" >"$T/bad/p11agent/p11agentd.conf"
	run env XDG_CONFIG_HOME="$T/bad" "$P11AGENTD" --print-config --socket "$SOCK" \
		--module "$SOFTHSM2_MODULE"
	rc_is 1 "$desc: the agent does not start"
	stderr_has "$T/bad/p11agent/p11agentd.conf:$line: $want" "$desc: FILE:LINE: reason"
}
mkdir -p "$T/bad/p11agent"
bad_conf "user's global allow-programs under the lock" 1 \
	"'allow-programs' is locked by the administrator ($ADMIN:2)" "allow-programs $PY_EXE"
bad_conf "user's [key] allow-programs under the lock (widening)" 2 \
	"'allow-programs' is locked by the administrator ($ADMIN:2)" \
	"[key pkcs11:token=$TOKEN_LABEL;object=ec256]
allow-programs $PY_EXE"
bad_conf "user's [key] allow-programs under the lock (another key)" 2 \
	"'allow-programs' is locked by the administrator ($ADMIN:2)" \
	"[key pkcs11:object=rsa2048]
allow-programs $CURL_EXE"
mv "$ADMIN" "$ADMIN.locked"
bad_conf "relative allow-programs path" 2 \
	"allow-programs takes absolute paths of executables" \
	"[key pkcs11:object=rsa2048]
allow-programs /usr/bin/true curl"
bad_conf "relative global allow-programs path" 1 "allow-programs takes absolute paths of executables" \
	"allow-programs ./curl"
stderr_has "not './curl'" "relative global allow-programs path: the message names the word"
bad_conf "empty allow-programs" 2 "'allow-programs' needs a value" \
	"[key pkcs11:object=rsa2048]
allow-programs"
mv "$ADMIN.locked" "$ADMIN"
run env XDG_CONFIG_HOME="$T/config" "$P11AGENTD" --print-config --socket "$SOCK" \
	--module "$SOFTHSM2_MODULE"
rc_is 0 "--print-config with allow-programs"
stdout_has "allow-programs $CURL_EXE	# $ADMIN:4; locked at $ADMIN:2" \
	"--print-config: the section's allow-programs, its line and the lock"
stdout_has "# allow-programs not set: any program	# default; locked at $ADMIN:2" \
	"--print-config: no default list"

# ---------------------------------------------------------------- the agent
check "agent starts on the test token" start_agent
running "$AGENT_PID" || bail_out "agent running"
check "unlock" unlock_token
check "list --json" list_json
check "server certificate from the test CA" make_server_cert
check "s_server (any signature algorithm)" start_tls_server any
[ -n "${PORT[any]:-}" ] || bail_out "TLS server running"

declare -A URI REF
for label in rsa2048 ec256 ec384 ec521; do
	URI[$label]=$(json_key "$label" uri)
	[ -n "${URI[$label]}" ] || bail_out "the agent lists key $label"
	REF[$label]=$T/$label.key.pem
	check "$label: export-key" p11a export-key "${URI[$label]}" --out "${REF[$label]}"
done

# handshake CLIENT LABEL TLS: one GET with the client certificate; sets st, out.
handshake() {
	local client=$1 label=$2 tls=$3
	out=$T/out.$label.$tls.$client
	st=0
	case $client in
	curl) tls_curl "${PORT[any]}" "$tls" "$TOKDIR/$label.cert.pem" "${REF[$label]}" "$out" || st=$? ;;
	python) tls_python "${PORT[any]}" "$tls" "$TOKDIR/$label.cert.pem" "${REF[$label]}" "$out" || st=$? ;;
	esac
}
# log_has REGEX DESC: the agent's log has a line matching REGEX.
log_has() {
	if grep -qE -- "$1" "$AGENT_LOG"; then
		ok "$2"
	else
		not_ok "$2"
		diag "the agent's log lacks: $1"
		diag_file "$AGENT_LOG" 15
	fi
}
# ere TEXT: TEXT quoted for grep -E.
ere() {
	printf '%s' "$1" | sed 's/[.[*^$+?(){}|\\]/\\&/g'
}

# ---------------------------------------------------------------- curl allowed, python refused
for tls in 1.2 1.3; do
	if [ -n "$CURL_SKIP" ]; then
		skip "allow-programs curl: ec256 TLS $tls curl handshake" "$CURL_SKIP"
		continue
	fi
	handshake curl ec256 "$tls"
	if [ "$st" -eq 0 ] && grep -qE "^ *$(subject_line ec256)\$" "$out"; then
		ok "allow-programs curl: ec256 TLS $tls curl handshake"
	else
		not_ok "allow-programs curl: ec256 TLS $tls curl handshake"
		diag "exit status $st"
		diag_file "$out" 12
	fi
done
handshake python ec256 1.3
if [ "$st" -ne 0 ] && ! grep -qE "^ *$(subject_line ec256)\$" "$out"; then
	ok "allow-programs curl: ec256 python ssl handshake fails"
else
	not_ok "allow-programs curl: ec256 python ssl handshake fails"
	diag_file "$out" 12
fi
MSG="not allowed for this program: key 'ec256' on token '$TOKEN_LABEL' may be used by $CURL_EXE;"
log_has ": pid [1-9][0-9]*: refused pkcs11:[^ ]*object=ec256[^ ]*: $(ere "$MSG") $(ere "$PY_EXE") \\(pid [1-9][0-9]*\\) asked \\(executable $(ere "$PY_EXE")\\)" \
	"the python refusal is logged with the key URI, the pid and the executable"

run p11a sign --key "${URI[ec256]}" --scheme ecdsa --hash sha256 --in "$TOKDIR/ca.pem" --out "$T/sig"
rc_is 1 "allow-programs curl: p11agent sign with ec256 refused"
stderr_has "$MSG" "p11agent sign: the policy message names the key and the allowed program"
if grep -qE "may be used by $(ere "$CURL_EXE"); /[^ ]*p11agent[^ ]* \\(pid [1-9][0-9]*\\) asked" "$T/stderr"; then
	ok "p11agent sign: the policy message names the program that asked and its pid"
else
	not_ok "p11agent sign: the policy message names the program that asked and its pid"
	diag_last
fi
stderr_has "allow-programs" "p11agent sign: the CLI points at allow-programs"

# ---------------------------------------------------------------- tls-only: the digest exception
pk_out=$(printf 'open\nsign ec384 ECDSA\nsign ec521 ECDSA\nsign ec384 ECDSA-SHA256\nsign ec256 ECDSA\nquit\n' |
	pk_client timeout 60 "$PYTHON3" "$lib_dir/pkcs11_client.py" "$PK_MODULE" 2>"$T/pk.err" || true)
is "$(echo "$pk_out" | sed -n 2p | cut -d' ' -f1)" ok \
	"module C_Sign(CKM_ECDSA, a digest), tls-only ec384 allowing python: signed"
is "$(echo "$pk_out" | sed -n 3p)" CKR_FUNCTION_REJECTED \
	"module C_Sign(CKM_ECDSA, a digest), tls-only ec521 without allow-programs: CKR_FUNCTION_REJECTED"
is "$(echo "$pk_out" | sed -n 4p)" CKR_FUNCTION_REJECTED \
	"module C_Sign(CKM_ECDSA_SHA256, a message), tls-only ec384 allowing python: still refused"
is "$(echo "$pk_out" | sed -n 5p)" CKR_FUNCTION_REJECTED \
	"module C_Sign(CKM_ECDSA) with ec256 (curl only) from python: CKR_FUNCTION_REJECTED"
log_has "refused pkcs11:[^ ]*object=ec521[^ ]*: not allowed by policy: key 'ec521'.*\\(input: digest\\); a digest is signed only for a program" \
	"the digest refusal for ec521 is logged and says why"
log_has "refused pkcs11:[^ ]*object=ec384[^ ]*: not allowed by policy: key 'ec384'.*\\(input: raw\\)" \
	"the message refusal for ec384 is logged"
head -c 48 /dev/urandom >"$T/digest"
run p11a sign --key "${URI[ec384]}" --scheme ecdsa --hash sha384 --digest --in "$T/digest" --out "$T/sig"
rc_is 1 "a digest for ec384 from p11agent sign (not python): refused"
stderr_has "not allowed for this program: key 'ec384' on token '$TOKEN_LABEL' may be used by $PY_EXE;" \
	"a digest for ec384 from p11agent sign: the program policy message"
run p11a sign --key "${URI[rsa2048]}" --scheme rsa-pkcs1 --hash sha256 \
	--in "$TOKDIR/ca.pem" --out "$T/sig"
rc_is 0 "rsa2048 (no section, no default) signs for any program"

stop_agent
is "$AGENT_RC" 0 "agent exits cleanly on SIGTERM"

# ---------------------------------------------------------------- the global default
cat >"$ADMIN" <<CONF
allow-programs /nonexistent/bin/prog
allow-programs $CURL_EXE
[key pkcs11:token=$TOKEN_LABEL;object=ec256]
allow-programs $PY_EXE
CONF
: >"$T/config/p11agent/p11agentd.conf"
check "agent starts with a default allow-programs" start_agent
check "unlock" unlock_token
run p11a sign --key "${URI[ec384]}" --scheme ecdsa --hash sha256 --in "$TOKDIR/ca.pem" --out "$T/sig"
rc_is 1 "default allow-programs: ec384 (no section) refuses p11agent sign"
stderr_has "not allowed for this program: key 'ec384' on token '$TOKEN_LABEL' may be used by /nonexistent/bin/prog, $CURL_EXE;" \
	"default allow-programs: two lines add up"
if [ -n "$CURL_SKIP" ]; then
	skip "default allow-programs: ec384 curl handshake" "$CURL_SKIP"
else
	handshake curl ec384 1.3
	if [ "$st" -eq 0 ] && grep -qE "^ *$(subject_line ec384)\$" "$out"; then
		ok "default allow-programs: ec384 curl handshake"
	else
		not_ok "default allow-programs: ec384 curl handshake"
		diag_file "$out" 12
	fi
fi
handshake python ec256 1.3
if [ "$st" -eq 0 ] && grep -qE "^ *$(subject_line ec256)\$" "$out"; then
	ok "a [key] section's list replaces the default: ec256 python handshake"
else
	not_ok "a [key] section's list replaces the default: ec256 python handshake"
	diag_file "$out" 12
fi
stop_agent
is "$AGENT_RC" 0 "agent exits cleanly on SIGTERM"
done_testing
