# shellcheck shell=bash
# pkcs11_lib.sh: sourced after lib.sh by tests/integration/t_pkcs11_*.sh.
#
# PK_MODULE is the built front-end module.  Clients run through pk_client
# (or pk_registry for programs that read p11-kit's registry) see the agent
# only: their SOFTHSM2_CONF points at an empty token store, so a signature
# that works went through the agent and not through SoftHSM2 loaded in the
# client.

PK_MODULE=${PK_MODULE:-$top_builddir/.libs/p11agent-pkcs11.so}

# PK_SAN_ENV: the ASan preload (lib.sh's asan_env, with libstdc++ for
# PyKCS11) for the programs that load the module; empty in an ordinary
# build.  PK_SAN_SKIP says why t_pkcs11_git and t_pkcs11_browser are
# skipped there: Debian 12's curl, wget and git (git-remote-https) hang in
# setlocale() at start-up with libasan preloaded (see tls_lib.sh), and
# browsers are not built for it.  free_port, wait_port and skip are
# lib.sh's.
PK_SAN_ENV=()
PK_SAN_SKIP=
pk_san_env() {
	PK_SAN_ENV=()
	if asan_env "$PK_MODULE" cxx; then
		PK_SAN_ENV=("${ASAN_ENV[@]}")
		PK_SAN_SKIP="sanitizer build"
	fi
}

# pk_setup: the module, the token, an agent; a client-side empty SoftHSM2
# store; a TLS server certificate for localhost issued by the test CA.
pk_setup() {
	require_agent_binaries
	require_file "$PK_MODULE"
	pk_san_env
	make_token
	mkdir -p "$T/empty-tokens"
	printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' \
		"$T/empty-tokens" >"$T/empty-softhsm2.conf"
	openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
		-keyout "$T/server.key" -subj /CN=localhost -out "$T/server.csr" 2>/dev/null
	printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$T/server.ext"
	openssl x509 -req -in "$T/server.csr" -CA "$TOKDIR/ca.pem" -CAkey "$TOKDIR/ca.key" \
		-set_serial 9001 -days 2 -extfile "$T/server.ext" -out "$T/server.pem" 2>/dev/null
}

# pk_client CMD...: CMD with the agent's socket and without direct access
# to the test token.
pk_client() {
	env ${PK_SAN_ENV[@]+"${PK_SAN_ENV[@]}"} SOFTHSM2_CONF="$T/empty-softhsm2.conf" \
		P11AGENT_SOCK="$SOCK" "$@"
}

# pk_registry CMD...: as pk_client, with p11-kit's registry holding only
# the front-end module (and p11-kit-trust when installed).  As root,
# ~/.config/pkcs11 is ignored by p11-kit, so CMD runs in a private mount
# namespace where $T/p11kit-modules is mounted over the system module
# directory: nothing outside this command sees it, nothing to clean up.
# As another user, a private HOME with ~/.config/pkcs11/modules does it.
PK_SYS_MODULES=/usr/share/p11-kit/modules
pk_registry() {
	local dir=$T/p11kit-modules
	if [ ! -d "$dir" ]; then
		mkdir -p "$dir"
		# The shipped registration, pointed at the built module.
		sed "s|^module:.*|module: $PK_MODULE|" "$top_srcdir/packaging/p11agent-pkcs11.module.in" \
			>"$dir/p11agent-pkcs11.module"
		# p11-kit-trust's destructor deadlocks in freelocale() with
		# libasan preloaded: leave it out of sanitizer runs.
		[ ! -f "$PK_SYS_MODULES/p11-kit-trust.module" ] || [ -n "$PK_SAN_SKIP" ] ||
			cp "$PK_SYS_MODULES/p11-kit-trust.module" "$dir/"
	fi
	if [ "$(id -u)" = 0 ]; then
		# shellcheck disable=SC2016 # expanded by the inner shell
		pk_client unshare -m sh -c '
			mount --bind "$1" "$2" || exit 125
			if [ -d /etc/pkcs11/modules ]; then mount --bind "$1" /etc/pkcs11/modules || exit 125; fi
			shift 2; exec "$@"' sh "$dir" "$PK_SYS_MODULES" "$@"
	else
		mkdir -p "$T/home/.config/pkcs11"
		rm -rf "$T/home/.config/pkcs11/modules"
		cp -r "$dir" "$T/home/.config/pkcs11/modules"
		printf 'user-config: override\n' >"$T/home/.config/pkcs11/pkcs11.conf"
		pk_client env HOME="$T/home" "$@"
	fi
}

# start_s_server: openssl s_server that requires a client certificate from
# the test CA and answers GET with a page showing it (FIELD-NOTES); sets
# S_PORT and S_PID.
start_s_server() {
	S_PORT=$(free_port)
	openssl s_server -accept "127.0.0.1:$S_PORT" -cert "$T/server.pem" -key "$T/server.key" \
		-CAfile "$TOKDIR/ca.pem" -Verify 1 -verify_return_error -www \
		>"$T/s_server.log" 2>&1 &
	S_PID=$!
	remember_pid "$S_PID"
	wait_port "$S_PORT" 10
}

# key_uri_of LABEL private|cert: a key's or its certificate's URI as
# `p11agent list` prints it (the module shows the same token identity, so
# these are the URIs a user pastes into git and wget).
key_uri_of() {
	list_json || return 1
	case $2 in
	private) json_key "$1" uri ;;
	cert) json_key "$1" cert_uri ;;
	*) return 1 ;;
	esac
}

# pk_start_nginx [GIT_PROJECT_ROOT]: nginx on 127.0.0.1:$P12 (TLS 1.2 only)
# and :$P13 (TLS 1.3 only), requiring a client certificate from the test
# CA.  /whoami answers "subject=<client DN> protocol=<TLS version>"; with a
# project root, /git/ serves its repositories through git-http-backend
# (fcgiwrap).  $T/nginx/access.log records the protocol and the client
# certificate's DN of every request.
NGINX=${NGINX:-/usr/sbin/nginx}
FCGIWRAP=${FCGIWRAP:-/usr/sbin/fcgiwrap}
GIT_HTTP_BACKEND=${GIT_HTTP_BACKEND:-/usr/lib/git-core/git-http-backend}
pk_start_nginx() {
	local git_root=${1:-} user_line='' git_loc=''
	mkdir -p "$T/nginx/tmp"
	if [ -n "$git_root" ]; then
		"$FCGIWRAP" -c 1 -s "unix:$T/fcgi.sock" >"$T/fcgiwrap.log" 2>&1 &
		FCGI_PID=$!
		remember_pid "$FCGI_PID"
		git_loc="location ~ ^/git(/.*)\$ {
			include /etc/nginx/fastcgi_params;
			fastcgi_pass unix:$T/fcgi.sock;
			fastcgi_param SCRIPT_FILENAME $GIT_HTTP_BACKEND;
			fastcgi_param GIT_PROJECT_ROOT $git_root;
			fastcgi_param GIT_HTTP_EXPORT_ALL 1;
			fastcgi_param PATH_INFO \$1;
		}"
	fi
	P12=$(free_port)
	P13=$(free_port)
	[ "$(id -u)" != 0 ] || user_line="user root root;"
	{
		printf '%s\nworker_processes 1;\npid %s;\nerror_log %s info;\n' \
			"$user_line" "$T/nginx/nginx.pid" "$T/nginx/error.log"
		printf 'events { worker_connections 64; }\nhttp {\n'
		printf '\tlog_format p11 %s;\n' "'\$ssl_protocol \"\$ssl_client_s_dn\" \$ssl_client_verify \$request_uri \$status'"
		printf '\taccess_log %s p11;\n' "$T/nginx/access.log"
		for d in client_body fastcgi proxy uwsgi scgi; do
			printf '\t%s_temp_path %s;\n' "$d" "$T/nginx/tmp/$d"
		done
		for p in "$P12 TLSv1.2" "$P13 TLSv1.3"; do
			cat <<EOF
	server {
		listen 127.0.0.1:${p% *} ssl;
		ssl_protocols ${p#* };
		ssl_certificate $T/server.pem;
		ssl_certificate_key $T/server.key;
		ssl_client_certificate $TOKDIR/ca.pem;
		ssl_verify_client on;
		location = /whoami {
			default_type text/html;
			return 200 "<html><body><p id=who>subject=\$ssl_client_s_dn protocol=\$ssl_protocol</p></body></html>\n";
		}
		$git_loc
	}
EOF
		done
		printf '}\n'
	} >"$T/nginx/nginx.conf"
	"$NGINX" -e "$T/nginx/error.log" -p "$T/nginx" -c "$T/nginx/nginx.conf" -g 'daemon off;' &
	NGINX_PID=$!
	remember_pid "$NGINX_PID"
	if ! wait_port "$P12" 10 || ! wait_port "$P13" 10; then
		diag_file "$T/nginx/error.log"
		return 1
	fi
}

# pk_ns SRC DST [SRC DST ...] -- CMD...: as pk_client, in a private mount
# namespace where each directory SRC is mounted over DST (root only; the
# mounts vanish with CMD).
pk_ns() {
	local mounts=()
	while [ $# -gt 0 ] && [ "$1" != -- ]; do
		mounts+=("$1")
		shift
	done
	shift
	# shellcheck disable=SC2016 # expanded by the inner shell
	pk_client unshare -m sh -c '
		while [ "$1" != -- ]; do mount --bind "$1" "$2" || exit 125; shift 2; done
		shift; exec "$@"' sh "${mounts[@]}" -- "$@"
}
