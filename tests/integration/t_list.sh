#!/bin/bash
# t_list: status and list show the token and all eight test keys with the
# right type, size, curve and certificate, before and after unlock; pubkey
# and export-cert give back what is on the token.
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"

require_cmd openssl pkcs11-tool softhsm2-util timeout cmp "$PYTHON3"
require_agent_binaries
make_token

check "agent starts on the test token" start_agent
if [ -z "$AGENT_PID" ] || ! running "$AGENT_PID"; then
	bail_out "agent running"
fi

# ---------------------------------------------------------------- status
run p11a status
rc_is 0 "status exits 0"
stdout_has "$TOKEN_LABEL" "status names the token"

# ---------------------------------------------------------------- list (text)
run p11a list
rc_is 0 "list exits 0"
cp "$T/stdout" "$T/list.txt"
stdout_has "$TOKEN_LABEL" "list names the token"
for label in $(key_labels); do
	# A label must appear as a word of its own (ec256 is no proof of ec-imp).
	if grep -qE "(^|[^[:alnum:]_-])$label([^[:alnum:]_-]|\$)" "$T/list.txt"; then
		ok "list shows key $label"
	else
		not_ok "list shows key $label"
		diag_file "$T/list.txt"
		continue
	fi
	# The key's paragraph: from the line naming it in quotes to the next
	# blank line.  It shows the size or curve and the certificate subject.
	awk -v l="'$label'" 'index($0, l) { p = 1 } p && /^[[:space:]]*$/ { exit } p' \
		"$T/list.txt" >"$T/list.$label.txt"
	case $(key_attr "$label" type) in
	RSA) want="RSA $(key_attr "$label" bits)" ;;
	EC) want=$(key_attr "$label" curve) ;;
	*) want=Ed25519 ;;
	esac
	file_has "$T/list.$label.txt" "$want" "list shows $label as $want"
	file_has "$T/list.$label.txt" "CN=$label" "list shows the certificate subject of $label"
done

# ---------------------------------------------------------------- list --json
# check_json_keys WHEN: the JSON listing has the token and every key, with
# the attributes mktoken.sh gave them.
check_json_keys() {
	local when=$1 label want got n
	if list_json; then
		ok "list --json is valid JSON ($when)"
	else
		not_ok "list --json is valid JSON ($when)"
		diag_file "$T/list.json"
		diag_file "$T/list.err"
		return 0
	fi
	is "$(json_token label)" "$TOKEN_LABEL" "JSON lists token $TOKEN_LABEL ($when)"
	token_uri=$(json_token uri)
	case $token_uri in
	pkcs11:*) ok "token has a pkcs11: URI ($when)" ;;
	*) not_ok "token has a pkcs11: URI ($when)"; diag "uri: '$token_uri'" ;;
	esac
	is "$(json_token manufacturer)" "SoftHSM project" "token manufacturer ($when)"
	is "$(json_token model)" "SoftHSM v2" "token model ($when)"
	got=$(json_token serial)
	if [ -n "$got" ]; then ok "token serial is set ($when)"; else not_ok "token serial is set ($when)"; fi

	# Exactly eight keys on our token: the private key, public key and
	# certificate of one key are one entry, before and after login.
	n=$("$PYTHON3" -c '
import json, sys
doc = json.load(open(sys.argv[1]))
print(sum(1 for k in doc.get("keys", []) if k.get("token_uri") == sys.argv[2]))
' "$T/list.json" "$token_uri")
	is "$n" 8 "eight keys on the token, one entry each ($when)"

	for label in $(key_labels); do
		got=$(json_key "$label" uri)
		case $got in
		pkcs11:*) ok "$label: listed with a pkcs11: URI ($when)" ;;
		*)
			not_ok "$label: listed with a pkcs11: URI ($when)"
			diag "uri: '$got'"
			continue
			;;
		esac
		is "$(json_key "$label" token_uri)" "$token_uri" "$label: token_uri is the token's ($when)"
		want=$(key_attr "$label" type)
		got=$(json_key "$label" type)
		# Accept any letter case ("EC", "ec"); the value must name the type.
		is "$(echo "$got" | tr '[:upper:]' '[:lower:]')" "$(echo "$want" | tr '[:upper:]' '[:lower:]')" \
			"$label: type $want ($when)"
		want=$(key_attr "$label" bits)
		got=$(json_key "$label" bits)
		if [ "$(key_attr "$label" type)" = Ed25519 ] && [ "$got" = 256 ]; then
			# Ed25519 may be reported as 255 or 256 bits.
			got=255
		fi
		is "$got" "$want" "$label: $want bits ($when)"
		want=$(key_attr "$label" curve)
		is "$(json_key "$label" curve)" "$want" "$label: curve '${want}' ($when)"
		is "$(json_key "$label" id | tr '[:upper:]' '[:lower:]' | tr -d ':%')" "$(key_attr "$label" id)" \
			"$label: id $(key_attr "$label" id) ($when)"
		got=$(json_key "$label" subject)
		case $got in
		*"CN=$label"* | *"CN = $label"*) ok "$label: certificate subject has CN=$label ($when)" ;;
		*) not_ok "$label: certificate subject has CN=$label ($when)"; diag "subject: '$got'" ;;
		esac
		got=$(json_key "$label" issuer)
		if [ "$label" = rsa-imp ]; then want=rsa-imp; else want="p11agent test CA"; fi
		case $got in
		*"CN=$want"* | *"CN = $want"*) ok "$label: certificate issuer CN=$want ($when)" ;;
		*) not_ok "$label: certificate issuer CN=$want ($when)"; diag "issuer: '$got'" ;;
		esac
		got=$(json_key "$label" cert_uri)
		case $got in
		pkcs11:*) ok "$label: certificate has a pkcs11: URI ($when)" ;;
		*) not_ok "$label: certificate has a pkcs11: URI ($when)"; diag "cert_uri: '$got'" ;;
		esac
		got=$(json_key "$label" not_after)
		# Issued for 3650 days: the year is at least next year's.
		if echo "$got" | grep -qE '20[3-9][0-9]'; then
			ok "$label: not_after about ten years ahead ($when)"
		else
			not_ok "$label: not_after about ten years ahead ($when)"
			diag "not_after: '$got'"
		fi
	done
}

check_json_keys "locked"
is "$(json_token logged_in)" false "token not logged in before unlock"

# ---------------------------------------------------------------- pubkey / export-cert
# check_pubkey_cert WHEN: pubkey equals the certificate's public key and
# export-cert returns the certificate stored on the token.
check_pubkey_cert() {
	local when=$1 label uri
	for label in $(key_labels); do
		uri=$(json_key "$label" uri)
		cert_pub_der "$TOKDIR/$label.cert.pem" "$T/$label.certpub.der"
		run p11a pubkey "$uri" --out "$T/$label.pub"
		rc_is 0 "$label: pubkey exits 0 ($when)"
		if pub_der "$T/$label.pub" "$T/$label.pub.der" 2>"$T/openssl.err" &&
			cmp -s "$T/$label.pub.der" "$T/$label.certpub.der"; then
			ok "$label: pubkey equals the certificate's public key ($when)"
		else
			not_ok "$label: pubkey equals the certificate's public key ($when)"
			diag_file "$T/openssl.err"
			openssl pkey -pubin -in "$T/$label.pub" -noout -text 2>&1 | head -n 5 | sed 's/^/#   /'
		fi

		cert_der "$TOKDIR/$label.cert.pem" "$T/$label.cert.der"
		run p11a export-cert "$uri" --out "$T/$label.exported"
		rc_is 0 "$label: export-cert exits 0 ($when)"
		if cert_der "$T/$label.exported" "$T/$label.exported.der" 2>"$T/openssl.err" &&
			cmp -s "$T/$label.exported.der" "$T/$label.cert.der"; then
			ok "$label: export-cert returns the certificate on the token ($when)"
		else
			not_ok "$label: export-cert returns the certificate on the token ($when)"
			diag_file "$T/openssl.err"
		fi
	done
}

check_pubkey_cert "locked"

# Without --out, pubkey and export-cert write to stdout.
uri=$(json_key ec256 uri)
run p11a pubkey "$uri"
rc_is 0 "pubkey to stdout exits 0"
cp "$T/stdout" "$T/ec256.stdout.pub"
check "pubkey on stdout equals the certificate's public key" same_pub "$T/ec256.stdout.pub" "$T/ec256.certpub.der"
run p11a export-cert "$uri"
rc_is 0 "export-cert to stdout exits 0"
cp "$T/stdout" "$T/ec256.stdout.crt"
check "export-cert on stdout is the certificate" same_cert "$T/ec256.stdout.crt" "$T/ec256.cert.der"

# A URI written by hand selects the same key as the agent's URI.
run p11a pubkey "pkcs11:token=$TOKEN_LABEL;object=ec384;type=private"
rc_is 0 "pubkey with a hand-written URI (token, object, type=private) exits 0"
check "hand-written URI selects ec384" same_pub "$T/stdout" "$T/ec384.certpub.der"
run p11a pubkey "pkcs11:token=$TOKEN_LABEL;id=%13"
rc_is 0 "pubkey with a hand-written URI (token, id=%13) exits 0"
check "id=%13 selects ed-imp" same_pub "$T/stdout" "$T/ed-imp.certpub.der"

run p11a pubkey "pkcs11:token=$TOKEN_LABEL;object=no-such-key"
rc_is 1 "pubkey of an unknown key exits 1"
stderr_has "no such key" "pubkey of an unknown key says 'no such key'"
run p11a export-cert "pkcs11:token=$TOKEN_LABEL;object=no-such-key"
rc_is 1 "export-cert of an unknown key exits 1"

# ---------------------------------------------------------------- after unlock
check "unlock with the right PIN" unlock_token
check_json_keys "unlocked"
is "$(json_token logged_in)" true "token logged in after unlock"
check_pubkey_cert "unlocked"

run p11a status
rc_is 0 "status exits 0 after unlock"

check "agent still running" running "$AGENT_PID"
stop_agent
is "$AGENT_RC" 0 "agent exits 0 on SIGTERM"
done_testing
