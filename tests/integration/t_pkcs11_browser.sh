#!/bin/bash
# t_pkcs11_browser: headless Chromium and Firefox ESR (NSS) authenticate
# to a server that requires a client certificate, with the key reached
# through p11agent-pkcs11.so registered by `p11agent setup nss`.  No PIN
# dialog: the agent holds the login.  Chromium picks the certificate by
# an AutoSelectCertificateForUrls policy in a private mount namespace
# (never the system's /etc/chromium); Firefox loads the module from the
# SecurityDevices policy `p11agent setup firefox-policy` prints (mounted
# privately over Debian's distribution directory) and, separately, from
# its profile's NSS database; it picks the certificate by
# security.default_personal_cert.
. "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/pkcs11_lib.sh
. "$lib_dir/pkcs11_lib.sh"

CHROMIUM=${CHROMIUM:-chromium}
FIREFOX=${FIREFOX:-firefox-esr}
require_cmd "$CHROMIUM" certutil modutil unshare "$NGINX"
[ "$(id -u)" = 0 ] || bail_out "runs as root (Chromium's policy directory is mounted in a private namespace)"
pk_setup
if [ -n "$PK_SAN_SKIP" ]; then
	skip "browsers through the module" "$PK_SAN_SKIP"
	done_testing
fi
start_agent || bail_out "agent started"
unlock_token >/dev/null || bail_out "token unlocked"
pk_start_nginx || bail_out "nginx listens"

# ---------------------------------------------------------------- p11agent setup
mkdir -p "$T/chome"
run env HOME="$T/chome" "$P11AGENT" setup nss --module "$PK_MODULE"
rc_is 0 "p11agent setup nss registers the module in ~/.pki/nssdb"
run modutil -dbdir "sql:$T/chome/.pki/nssdb" -list p11agent
stdout_has "$(readlink -f "$PK_MODULE")" "modutil lists the module with its path"
run env HOME="$T/chome" "$P11AGENT" setup nss --module "$PK_MODULE"
rc_is 0 "p11agent setup nss again replaces the entry"
run "$P11AGENT" setup firefox-policy --module "$PK_MODULE"
rc_is 0 "p11agent setup firefox-policy prints a fragment"
check "the fragment is JSON with SecurityDevices.Add.p11agent = the module" "$PYTHON3" -c '
import json, sys
d = json.load(open(sys.argv[1]))
assert d["policies"]["SecurityDevices"]["Add"]["p11agent"] == sys.argv[2]' "$T/stdout" "$(readlink -f "$PK_MODULE")"
certutil -A -d "sql:$T/chome/.pki/nssdb" -n p11agent-test-ca -t "C,," -i "$TOKDIR/ca.pem"
run pk_client env HOME="$T/chome" certutil -L -d "sql:$T/chome/.pki/nssdb" -h all
stdout_has "$TOKEN_LABEL:ec256" "NSS sees the token's certificates through the module"

# ---------------------------------------------------------------- Chromium
# chromium_get ETC PORT: headless Chromium with ETC as /etc/chromium (its
# policies) and a fresh profile fetches /whoami; as run.
chromium_get() {
	rm -rf "$T/chrome-profile"
	run pk_ns "$1" /etc/chromium -- env HOME="$T/chome" timeout 90 "$CHROMIUM" --headless --no-sandbox \
		--disable-gpu --disable-background-networking --disable-component-update --disable-sync \
		--no-first-run --user-data-dir="$T/chrome-profile" --dump-dom "https://localhost:$2/whoami"
}

# chromium_case LABEL VERSION(1.2|1.3)
chromium_case() {
	local k=$1 v=$2 port etc=$T/etc-chromium-$1
	case $v in 1.2) port=$P12 ;; *) port=$P13 ;; esac
	mkdir -p "$etc/policies/managed"
	[ ! -f /etc/chromium/master_preferences ] || cp /etc/chromium/master_preferences "$etc/"
	printf '{"AutoSelectCertificateForUrls": ["{\\"pattern\\":\\"https://localhost:%s\\",\\"filter\\":{\\"SUBJECT\\":{\\"CN\\":\\"%s\\"}}}"]}\n' \
		"$port" "$k" >"$etc/policies/managed/p11agent-test.json"
	chromium_get "$etc" "$port"
	if grep -qF "subject=CN=$k,O=p11agent test protocol=TLSv$v" "$T/stdout"; then
		ok "Chromium shows the page for $k over TLS $v (the server saw CN=$k)"
	else
		not_ok "Chromium shows the page for $k over TLS $v (the server saw CN=$k)"
		diag_last
		diag_file "$T/nginx/access.log" 5
	fi
}
chromium_case ec256 1.3
chromium_case rsa2048 1.3
chromium_case rsa2048 1.2
chromium_case ec-imp 1.2

# The policy as 'p11agent setup chromium-policy --system' writes it, in the
# private mount of /etc/chromium: by the issuer of the key's certificate.
etc=$T/etc-chromium-setup
mkdir -p "$etc"
[ ! -f /etc/chromium/master_preferences ] || cp /etc/chromium/master_preferences "$etc/"
run pk_ns "$etc" /etc/chromium -- "$P11AGENT" --socket "$SOCK" setup chromium-policy --system \
	--dry-run --key "$(key_uri_of ec256 private)" --url "https://localhost:$P13"
stdout_has '\"filter\":{\"ISSUER\":{\"CN\":\"p11agent test CA\"},\"SUBJECT\":{\"CN\":\"ec256\"}}' \
	"setup chromium-policy --dry-run shows a policy selecting by the certificate's issuer and subject"
if [ ! -e "$etc/policies/managed/p11agent.json" ]; then ok "setup chromium-policy --dry-run wrote nothing"; else not_ok "setup chromium-policy --dry-run wrote nothing"; fi
run pk_ns "$etc" /etc/chromium -- "$P11AGENT" --socket "$SOCK" setup chromium-policy --system \
	--key "$(key_uri_of ec256 private)" --url "https://localhost:$P13"
rc_is 0 "setup chromium-policy --system"
check "setup chromium-policy --system wrote policies/managed/p11agent.json" \
	"$PYTHON3" -c 'import json, sys
p = json.loads(json.load(open(sys.argv[1]))["AutoSelectCertificateForUrls"][0])
assert p == {"pattern": sys.argv[2],
             "filter": {"ISSUER": {"CN": "p11agent test CA"}, "SUBJECT": {"CN": "ec256"}}}, p' \
	"$etc/policies/managed/p11agent.json" "https://localhost:$P13"
chromium_get "$etc" "$P13"
if grep -qF "subject=CN=ec256,O=p11agent test protocol=TLSv1.3" "$T/stdout"; then
	ok "Chromium presents ec256 under the policy 'p11agent setup chromium-policy' wrote"
else
	not_ok "Chromium presents ec256 under the policy 'p11agent setup chromium-policy' wrote"
	diag_last
fi

# ---------------------------------------------------------------- Firefox ESR
# ff_profile DIR: a fresh profile (an NSS database) that trusts the test CA
# and picks a client certificate without asking.
ff_profile() {
	mkdir -p "$1"
	certutil -N -d "sql:$1" --empty-password
	certutil -A -d "sql:$1" -n p11agent-test-ca -t "C,," -i "$TOKDIR/ca.pem"
	cat >"$1/user.js" <<UJS
user_pref("security.default_personal_cert", "Select Automatically");
user_pref("browser.shell.checkDefaultBrowser", false);
user_pref("browser.aboutwelcome.enabled", false);
user_pref("datareporting.policy.dataSubmissionEnabled", false);
user_pref("toolkit.telemetry.reportingpolicy.firstRun", false);
user_pref("app.update.enabled", false);
user_pref("network.connectivity-service.enabled", false);
user_pref("network.captive-portal-service.enabled", false);
UJS
}
# ff_check DESC: the last /whoami request came with a token certificate
# over TLS 1.3 ("Select Automatically" takes any token certificate the
# server's CA list allows).
ff_check() {
	if grep -q '^TLSv1.3 "CN=[^"]*,O=p11agent test" SUCCESS /whoami 200$' "$T/nginx/access.log"; then
		ok "$1"
	else
		not_ok "$1"
		diag_last
		diag_file "$T/nginx/access.log" 5
	fi
}
FF_ARGS=(--headless --no-remote --screenshot "$T/ff.png" "https://localhost:$P13/whoami")
FF_DIST=/usr/share/firefox-esr/distribution
if command -v "$FIREFOX" >/dev/null 2>&1; then
	# 0. control: without the module Firefox has no certificate to send
	ff_profile "$T/ff-none"
	: >"$T/nginx/access.log"
	run pk_client env HOME="$T/chome" timeout 90 "$FIREFOX" --profile "$T/ff-none" "${FF_ARGS[@]}"
	if grep -q 'SUCCESS /whoami' "$T/nginx/access.log"; then
		not_ok "control: Firefox without the module sends no client certificate"
		diag_file "$T/nginx/access.log" 5
	else
		ok "control: Firefox without the module sends no client certificate"
	fi
	# 1. the SecurityDevices policy printed by `p11agent setup firefox-policy`,
	#    in distribution/policies.json (a private mount over Debian's directory)
	if [ -d "$FF_DIST" ]; then
		ff_profile "$T/ff-policy"
		mkdir -p "$T/ffdist"
		for f in "$FF_DIST"/*; do [ -e "$f" ] && ln -s "$f" "$T/ffdist/"; done
		"$P11AGENT" setup firefox-policy --module "$PK_MODULE" >"$T/ffdist/policies.json"
		: >"$T/nginx/access.log"
		run pk_ns "$T/ffdist" "$FF_DIST" -- env HOME="$T/chome" timeout 90 "$FIREFOX" \
			--profile "$T/ff-policy" "${FF_ARGS[@]}"
		ff_check "Firefox ESR with the SecurityDevices policy authenticates with a token certificate"
	else
		not_ok "Firefox ESR's distribution directory $FF_DIST exists"
	fi
	# 1b. `p11agent setup firefox-policy --system`, merged into
	#     /etc/firefox/policies/policies.json (the file Debian's firefox-esr
	#     reads), in a private mount namespace with an overlay over /etc
	ff_profile "$T/ff-system"
	mkdir -p "$T/ffovl"
	: >"$T/nginx/access.log"
	# shellcheck disable=SC2016 # expanded by the inner shell
	run pk_client unshare -m sh -c 'mount -t tmpfs p11a-test "$1" && mkdir "$1/up" "$1/work" &&
		mount -t overlay p11a-test -o "lowerdir=/etc,upperdir=$1/up,workdir=$1/work" /etc ||
		exit 125
		"$2" setup firefox-policy --system --module "$3" >&2 || exit 126
		shift 3
		exec "$@"' sh "$T/ffovl" "$P11AGENT" "$PK_MODULE" \
		env HOME="$T/chome" timeout 90 "$FIREFOX" --profile "$T/ff-system" "${FF_ARGS[@]}"
	ff_check "Firefox ESR with 'setup firefox-policy --system' (/etc/firefox/policies) authenticates with a token certificate"
	# 2. the module in the profile's own NSS database (`p11agent setup nss --db`)
	ff_profile "$T/ff-nss"
	run env HOME="$T/chome" "$P11AGENT" setup nss --db "$T/ff-nss" --module "$PK_MODULE"
	rc_is 0 "p11agent setup nss registers the module in a Firefox profile"
	: >"$T/nginx/access.log"
	run pk_client env HOME="$T/chome" timeout 90 "$FIREFOX" --profile "$T/ff-nss" "${FF_ARGS[@]}"
	ff_check "Firefox ESR with the module in its profile authenticates with a token certificate"
else
	diag "$FIREFOX not installed: Firefox cases not run"
fi

done_testing
