#!/bin/bash
# t_provider_nginx: the provider's clients against nginx with
# ssl_verify_client on (nginx verifies the client certificate against the
# test CA and answers with $ssl_client_s_dn and $ssl_client_verify).
# Keys RSA-2048, EC P-384 and Ed25519, TLS 1.2 and 1.3, clients openssl
# s_client (URI and key reference), curl and python (key reference).  A
# client without a certificate is refused, so the checks can fail.
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=tests/integration/tls_lib.sh
. "$lib_dir/tls_lib.sh"

require_cmd nginx openssl curl timeout awk "$PYTHON3" softhsm2-util pkcs11-tool
require_agent_binaries
require_provider
make_token

check "agent starts on the test token" start_agent
check "unlock" unlock_token
check "list --json" list_json
check "server certificate from the test CA" make_server_cert

# ---------------------------------------------------------------- nginx
N=$T/nginx
mkdir -p "$N/tmp"
port=$(free_port)
# One process, no user switch: the test's files stay private to the test.
cat >"$N/nginx.conf" <<EOF
daemon off;
master_process off;
pid $N/nginx.pid;
error_log $N/error.log info;
events { worker_connections 64; }
http {
    access_log $N/access.log;
    client_body_temp_path $N/tmp/body;
    proxy_temp_path $N/tmp/proxy;
    fastcgi_temp_path $N/tmp/fastcgi;
    uwsgi_temp_path $N/tmp/uwsgi;
    scgi_temp_path $N/tmp/scgi;
    server {
        listen 127.0.0.1:$port ssl;
        server_name localhost;
        ssl_certificate $T/server.pem;
        ssl_certificate_key $T/server.key;
        ssl_client_certificate $TOKDIR/ca.pem;
        ssl_verify_client on;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {
            default_type text/plain;
            return 200 "client: \$ssl_client_s_dn\nverify: \$ssl_client_verify\nprotocol: \$ssl_protocol\n";
        }
    }
}
EOF
env -u OPENSSL_CONF -u OPENSSL_MODULES nginx -p "$N" -c "$N/nginx.conf" >"$N/stdout" 2>&1 &
nginx_pid=$!
remember_pid "$nginx_pid"
poll 10 listening_or_gone "$port" "$nginx_pid" || true
if port_listening "$port"; then
	ok "nginx with ssl_verify_client on listens on port $port"
else
	diag_file "$N/stdout"
	diag_file "$N/error.log"
	bail_out "nginx with ssl_verify_client on listens"
fi

# A client without a certificate is refused.  Plain curl: no provider (and
# so no libasan preload, which hangs curl in sanitizer builds) is needed.
timeout "$TLS_TIMEOUT" curl -sS --cacert "$TOKDIR/ca.pem" "https://localhost:$port/" \
	>"$T/nocert" 2>&1 || true
file_has "$T/nocert" "No required SSL certificate was sent" "nginx refuses a client without a certificate"

# nginx_saw OUT LABEL TLS DESC
nginx_saw() {
	local out=$1 label=$2 tls=$3 desc=$4
	if grep -qx "client: CN=$label,O=p11agent test" "$out" && grep -qx "verify: SUCCESS" "$out" &&
		grep -qx "protocol: TLSv$tls" "$out"; then
		ok "$desc"
	else
		not_ok "$desc"
		diag_file "$out" 12
	fi
}

for label in rsa2048 ec384 ed25519; do
	uri=$(json_key "$label" uri)
	if [ -z "$uri" ]; then
		skip "nginx: $label" "the agent lists no key '$label' (SoftHSM2 cannot hold it here)"
		continue
	fi
	check "$label: export-key" p11a export-key "$uri" --out "$T/$label.key.pem"
	for tls in 1.2 1.3; do
		for client in s_client-uri s_client-ref curl python; do
			desc="nginx TLS $tls $label $client: nginx verified CN=$label"
			out=$T/nginx.$label.$tls.$client
			case $client in
			s_client-uri) tls_s_client "$port" "$tls" "$TOKDIR/$label.cert.pem" "$uri" "$out" || true ;;
			s_client-ref) tls_s_client "$port" "$tls" "$TOKDIR/$label.cert.pem" "$T/$label.key.pem" "$out" || true ;;
			curl)
				if [ -n "$CURL_SKIP" ]; then
					skip "$desc" "$CURL_SKIP"
					continue
				fi
				tls_curl "$port" "$tls" "$TOKDIR/$label.cert.pem" "$T/$label.key.pem" "$out" || true
				;;
			python) tls_python "$port" "$tls" "$TOKDIR/$label.cert.pem" "$T/$label.key.pem" "$out" || true ;;
			esac
			nginx_saw "$out" "$label" "$tls" "$desc"
		done
	done
done

stop_pid "$nginx_pid"
stop_agent
is "$AGENT_RC" 0 "agent exits cleanly on SIGTERM"
done_testing
