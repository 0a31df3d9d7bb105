#!/usr/bin/env bash
# setup-opensc.sh: OpenSC (opensc-pkcs11.so) on a virtual CAC smart card
# behind a real pcscd, for the token tests (tests/tokens/checks.sh).
#
#   setup-opensc.sh start DIR     card, pcscd and bridge up; writes DIR/token.env
#   setup-opensc.sh stop DIR      stops what start started, by PID
#   setup-opensc.sh remove DIR    takes the card out of the reader (hotplug)
#   setup-opensc.sh insert DIR    puts it back
#   setup-opensc.sh hold DIR      the card leaves the next command APDU
#                                 unanswered until remove (DIR/bridge.log
#                                 says "held" when one arrives)
#   setup-opensc.sh stop-pcscd DIR / start-pcscd DIR
#                                 the reader goes away with pcscd and comes back
#
# Exit 77 with the reason on stderr when this machine cannot run it.
#
# The stack, nothing of it system-wide:
#   - an NSS database DIR/nssdb (its password is the card's PIN) with two
#     RSA 2048 keys and certificates signed by a test CA (DIR/ca.pem);
#   - pcscd -f in a private mount and network namespace: its /run is a
#     tmpfs (no system pcscd, no udev readers), /run/pcscd is DIR/run (so
#     clients reach it as DIR/run/pcscd.comm: PCSCLITE_CSOCK_NAME), its
#     reader.conf.d is DIR/reader.conf.d with vsmartcard's vpcd driver
#     listening on 127.0.0.1:35963 inside that netns;
#   - tests/tokens/vcard_bridge in the same netns: libcacard's CAC card
#     on the NSS database, connected to vpcd (SIGUSR1 out, SIGUSR2 in).
# OpenSC reads DIR/opensc.conf (OPENSC_CONF): no file cache, since every
# libcacard card has the same serial number.
set -eu

die77() { echo "setup-opensc: $*" >&2; exit 77; }
die() { echo "setup-opensc: $*" >&2; exit 1; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top_builddir=${top_builddir:-$(cd "$here/../.." && pwd)}
BRIDGE=$top_builddir/tests/tokens/vcard_bridge
VPCD_DRIVER=/usr/lib/pcsc/drivers/serial/libifdvpcd.so
OPENSC_MODULE=${OPENSC_MODULE:-/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so}
[ -e "$OPENSC_MODULE" ] || OPENSC_MODULE=/usr/lib/$(uname -m)-linux-gnu/opensc-pkcs11.so
VPCD_PORT=35963         # vpcd's default; the netns is ours, nothing else binds it
PIN=24681357            # CAC PINs are 4 to 8 characters
TOKEN_LABEL=p11agent-cac        # OpenSC names a CAC token after its first certificate's CN

cmd=${1:-}
DIR=${2:-}
if [ -z "$cmd" ] || [ -z "$DIR" ]; then
	echo "usage: $0 start|stop|remove|insert|hold|stop-pcscd|start-pcscd DIR" >&2
	exit 2
fi

# pid_of NAME: the PID in DIR/NAME.pid when that process still runs.
pid_of() {
	local p
	[ -s "$DIR/$1.pid" ] || return 1
	p=$(cat "$DIR/$1.pid")
	[ -d "/proc/$p" ] || return 1
	echo "$p"
}

# wait_until SECONDS CMD...: poll CMD every 50 ms.
wait_until() {
	local n=$(($1 * 20))
	shift
	while [ "$n" -gt 0 ]; do
		"$@" && return 0
		sleep 0.05
		n=$((n - 1))
	done
	return 1
}

# stop_by_pid NAME: TERM, then KILL after 5 s; only the PID we recorded.
stop_by_pid() {
	local p
	p=$(pid_of "$1") || { rm -f "$DIR/$1.pid"; return 0; }
	kill -TERM "$p" 2>/dev/null || true
	wait_until 5 eval "[ ! -d /proc/$p ]" || { kill -KILL "$p" 2>/dev/null || true; wait_until 2 eval "[ ! -d /proc/$p ]" || true; }
	rm -f "$DIR/$1.pid"
}

check_machine() {
	local c
	for c in pcscd unshare nsenter ip openssl certutil pk12util; do
		command -v "$c" >/dev/null 2>&1 || die77 "$c is not installed (tests/install-deps.sh test)"
	done
	[ -e "$VPCD_DRIVER" ] || die77 "vsmartcard-vpcd is not installed ($VPCD_DRIVER)"
	[ -e "$OPENSC_MODULE" ] || die77 "opensc-pkcs11 is not installed ($OPENSC_MODULE)"
	[ -x "$BRIDGE" ] || die77 "$BRIDGE is not built (it needs libcacard-dev at configure time; make check builds it)"
	[ "$(id -u)" -eq 0 ] || unshare -r true 2>/dev/null ||
		die77 "neither root nor user namespaces: cannot give pcscd private mount and network namespaces"
	unshare -m -n true 2>/dev/null || die77 "unshare -m -n fails here (no mount/network namespaces)"
}

make_card() {
	mkdir -p "$DIR/pki" "$DIR/nssdb"
	local p=$DIR/pki n
	cat >"$p/openssl.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical,CA:true
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[user]
basicConstraints = critical,CA:false
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
EOF
	openssl req -x509 -newkey rsa:2048 -nodes -keyout "$p/ca.key" -out "$DIR/ca.pem" \
		-subj "/CN=p11agent test CA" -days 30 -config "$p/openssl.cnf" -extensions ca 2>/dev/null
	# The first certificate's CN becomes the token label.
	for n in id sig; do
		local cn=$TOKEN_LABEL
		[ "$n" = sig ] && cn="p11agent-cac signature"
		openssl req -newkey rsa:2048 -nodes -keyout "$p/$n.key" -out "$p/$n.csr" \
			-subj "/CN=$cn" -config "$p/openssl.cnf" 2>/dev/null
		openssl x509 -req -in "$p/$n.csr" -CA "$DIR/ca.pem" -CAkey "$p/ca.key" -CAcreateserial \
			-out "$DIR/$n.pem" -days 30 -extfile "$p/openssl.cnf" -extensions user 2>/dev/null
		openssl pkcs12 -export -inkey "$p/$n.key" -in "$DIR/$n.pem" -name "$n" \
			-passout pass:p12 -out "$p/$n.p12"
	done
	(umask 077; printf '%s\n' "$PIN" >"$p/pin"; printf 'p12\n' >"$p/p12pw")
	certutil -N -d "sql:$DIR/nssdb" -f "$p/pin" >/dev/null
	for n in id sig; do
		pk12util -i "$p/$n.p12" -d "sql:$DIR/nssdb" -k "$p/pin" -w "$p/p12pw" >/dev/null
	done
	# The keys live in the NSS database now; the PEM private keys go.
	rm -f "$p"/*.key "$p"/*.p12 "$p"/*.csr
	cat >"$DIR/opensc.conf" <<'EOF'
app default {
	framework pkcs15 {
		use_file_caching = no;
	}
}
EOF
}

start_pcscd() {
	local netns_of=${1:-} p
	mkdir -p "$DIR/run" "$DIR/reader.conf.d"
	rm -f "$DIR/run/pcscd.comm"
	printf 'FRIENDLYNAME "Virtual PCD"\nDEVICENAME   /dev/null:%s\nLIBPATH      %s\nCHANNELID    %s\n' \
		"$VPCD_PORT" "$VPCD_DRIVER" "$VPCD_PORT" >"$DIR/reader.conf.d/vpcd"
	# shellcheck disable=SC2016 # expanded by the inner sh
	local inner='mount -t tmpfs -o mode=0755 p11agent-run /run && mkdir /run/pcscd &&
		mount --bind "$1/run" /run/pcscd && exec pcscd -f -i -c "$1/reader.conf.d"'
	if [ -z "$netns_of" ]; then
		# A new netns: its lo must be up for vpcd's TCP port.
		unshare -m -n sh -c "ip link set lo up && $inner" sh "$DIR" \
			>>"$DIR/pcscd.log" 2>&1 </dev/null &
	else
		# Back into the bridge's netns (pcscd restarted).
		nsenter --net="/proc/$netns_of/ns/net" unshare -m sh -c "$inner" sh "$DIR" \
			>>"$DIR/pcscd.log" 2>&1 </dev/null &
	fi
	p=$!
	echo "$p" >"$DIR/pcscd.pid"
	wait_until 10 test -S "$DIR/run/pcscd.comm" || die "pcscd did not come up (see $DIR/pcscd.log)"
}

# bridge_says WORD: the bridge printed WORD since the log was marked.
bridge_says() {
	tail -c +"$(($(cat "$DIR/bridge.mark") + 1))" "$DIR/bridge.log" | grep -qx "$1"
}

bridge_mark() {
	stat -c %s "$DIR/bridge.log" >"$DIR/bridge.mark"
}

write_env() {
	cat >"$DIR/token.env" <<EOF
TOKEN_NAME=opensc
TOKEN_MODULE=$OPENSC_MODULE
TOKEN_INIT_ARGS=
TOKEN_PIN=$PIN
TOKEN_URI='pkcs11:token=$TOKEN_LABEL'
TOKEN_KEYS='rsa:CAC%20ID%20Certificate rsa:CAC%20Email%20Signature%20Certificate'
TOKEN_CA=$DIR/ca.pem
TOKEN_WRONG_PIN_SAFE=1
TOKEN_WRONG_PIN_RV=CKR_GENERAL_ERROR
export PCSCLITE_CSOCK_NAME=$DIR/run/pcscd.comm
export OPENSC_CONF=$DIR/opensc.conf
EOF
}

case "$cmd" in
start)
	check_machine
	mkdir -p "$DIR"
	DIR=$(cd "$DIR" && pwd)
	[ "${#DIR}" -le 80 ] || die77 "$DIR is too long for pcscd's socket path"
	make_card
	start_pcscd
	: >"$DIR/bridge.log"
	bridge_mark
	nsenter --net="/proc/$(pid_of pcscd)/ns/net" "$BRIDGE" --db "$DIR/nssdb" --port "$VPCD_PORT" id sig \
		>>"$DIR/bridge.log" 2>&1 </dev/null &
	echo $! >"$DIR/bridge.pid"
	# Ready when pcscd has powered the card on: it saw it inserted.
	wait_until 10 bridge_says powered || { stop_by_pid bridge; stop_by_pid pcscd;
		die "the virtual card did not come up (see $DIR/bridge.log, $DIR/pcscd.log)"; }
	write_env
	;;
stop)
	stop_by_pid bridge
	stop_by_pid pcscd
	;;
remove)
	p=$(pid_of bridge) || die "the card bridge is not running"
	bridge_mark
	kill -USR1 "$p"
	wait_until 5 bridge_says removed || die "the bridge did not take the card out"
	;;
insert)
	p=$(pid_of bridge) || die "the card bridge is not running"
	bridge_mark
	kill -USR2 "$p"
	wait_until 10 bridge_says powered || die "pcscd did not power the card on after insertion"
	;;
hold)
	p=$(pid_of bridge) || die "the card bridge is not running"
	bridge_mark
	kill -WINCH "$p"
	wait_until 5 bridge_says holding || die "the bridge did not take the hold command"
	;;
stop-pcscd)
	stop_by_pid pcscd
	;;
start-pcscd)
	p=$(pid_of bridge) || die "the card bridge is not running"
	bridge_mark
	start_pcscd "$p"
	wait_until 10 bridge_says powered || die "the new pcscd did not power the card on"
	;;
*)
	echo "usage: $0 start|stop|remove|insert|hold|stop-pcscd|start-pcscd DIR" >&2
	exit 2
	;;
esac
