#!/bin/bash
# tests/bench/run.sh: what the agent costs against in-process PKCS#11,
# measured side by side.  Run by `make bench` (which builds the programs
# first); prints one table (tests/bench/table.py) and never fails on a
# number, only when something could not be measured at all.
#
# Every comparison is interleaved: for each repetition the variants run
# one after the other (A, B, C, A, B, C, ...), a ratio is taken inside each
# repetition, and the table shows the median over repetitions with min and
# max.  Absolute numbers on a shared machine drift; ratios much less so.
#
# Item 2 measures four paths to the same SoftHSM2 key: the module in
# process (inproc), the agent's client library (agent), the OpenSSL
# provider (provider), and the PKCS#11 front-end module p11agent-pkcs11.so
# (module), driven exactly as inproc is (signbench's pkcs11 mode: a
# session per thread, C_SignInit + C_Sign), plus p11-kit's RPC when
# installed.
#
# Environment (defaults in brackets):
#   BENCH_REPS      repetitions of every interleaved group [3]
#   BENCH_SECS      seconds per throughput measurement [1]
#   BENCH_THREADS   concurrency levels for item 2 ["1 2 8 64"]
#   BENCH_ALGS      "ec pss" (ECDSA P-256, RSA-2048 PSS) [both]
#   BENCH_RUNS      runs of each short-lived process, item 4 [20]
#   BENCH_CONNS     idle connections for item 5 [1000]
#   BENCH_SIGS      signatures for item 5 [100000]
#   BENCH_ITEMS     which items to run ["1 2 3 4 5 6"]
#   BENCH_RAW       also keep the raw measurements in this file
#   SOFTHSM2_MODULE, P11KIT_CLIENT, top_srcdir, top_builddir
#
# Everything runs in a private temporary directory with its own SoftHSM2
# token store (tests/integration/mktoken.sh); every process started here
# is stopped by PID.
set -u

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top_srcdir=${top_srcdir:-$(cd "$here/../.." && pwd)}
top_builddir=${top_builddir:-$top_srcdir}
B=$top_builddir/tests/bench
SOFTHSM2_MODULE=${SOFTHSM2_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
P11KIT_CLIENT=${P11KIT_CLIENT:-$(ls /usr/lib/*/pkcs11/p11-kit-client.so 2>/dev/null | head -n 1)}
REPS=${BENCH_REPS:-3}
SECS=${BENCH_SECS:-1}
THREADS=${BENCH_THREADS:-"1 2 8 64"}
ALGS=${BENCH_ALGS:-"ec pss"}
RUNS=${BENCH_RUNS:-20}
CONNS=${BENCH_CONNS:-1000}
SIGS=${BENCH_SIGS:-100000}
ITEMS=${BENCH_ITEMS:-"1 2 3 4 5 6"}
PIN=1234
TOKEN=p11agent-test
export SOFTHSM2_MODULE

unset GIT_SSL_CAINFO CURL_CA_BUNDLE SSL_CERT_FILE P11AGENT_SOCK OPENSSL_CONF OPENSSL_MODULES
exec </dev/null

tmp_base=${TMPDIR:-/tmp}
[ "${#tmp_base}" -le 40 ] || tmp_base=/tmp
T=$(mktemp -d "$tmp_base/p11a-bench.XXXXXX")
RAW=$T/raw.tsv
: >"$RAW"
pids=()

log() { echo "bench: $*" >&2; }

cleanup() {
	local p
	for p in ${pids[@]+"${pids[@]}"} $AGENT_HELPERS; do
		kill -TERM "$p" 2>/dev/null
	done
	for p in ${pids[@]+"${pids[@]}"}; do
		wait "$p" 2>/dev/null
	done
	[ -z "${BENCH_RAW:-}" ] || cp "$RAW" "$BENCH_RAW"
	if [ -n "${KEEP_TMP:-}" ]; then log "kept $T"; else rm -rf "$T"; fi
}
AGENT_HELPERS=
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

die() {
	log "$*"
	exit 1
}

for p in rtt signbench tlsbench connhold; do
	[ -x "$B/$p" ] || die "$B/$p not built (run 'make bench')"
done
PK_MODULE=$top_builddir/.libs/p11agent-pkcs11.so
[ -x "$top_builddir/p11agentd" ] && [ -f "$top_builddir/.libs/p11agent.so" ] && [ -f "$PK_MODULE" ] ||
	die "p11agentd, the provider and the PKCS#11 module must be built first"

# record ITEM GROUP VARIANT REP LINE: one measurement ("ops=... rate=... p50_us=... p99_us=...").
record() {
	local rate p50 p99
	rate=$(sed -n 's/.*rate=\([0-9.]*\).*/\1/p' <<<"$5")
	p50=$(sed -n 's/.*p50_us=\([0-9.]*\).*/\1/p' <<<"$5")
	p99=$(sed -n 's/.*p99_us=\([0-9.]*\).*/\1/p' <<<"$5")
	if [ -z "$rate" ]; then
		log "no result for $1 $2 $3 rep $4"
		return
	fi
	printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$rate" "$p50" "$p99" >>"$RAW"
}

# measure ITEM GROUP VARIANT REP CMD...: run CMD (stdout: the result line).
measure() {
	local item=$1 group=$2 variant=$3 rep=$4 out
	shift 4
	if ! out=$(timeout 300 "$@" 2>>"$T/errors.log"); then
		log "$item/$group/$variant rep $rep failed (see errors below)"
		tail -n 5 "$T/errors.log" >&2
	fi
	record "$item" "$group" "$variant" "$rep" "$out"
}

# ---------------------------------------------------------------- set-up
log "making the SoftHSM2 token in $T/token"
bash "$top_srcdir/tests/integration/mktoken.sh" "$T/token" >"$T/mktoken.log" 2>&1 ||
	{ cat "$T/mktoken.log" >&2; die "mktoken.sh failed"; }
export SOFTHSM2_CONF=$T/token/softhsm2.conf
TOK=$T/token
# libp11 0.4.12 (Debian 12's engine) cannot enumerate the private keys of a
# token that holds Ed25519 keys ("Unable to enumerate private keys"): the
# benchmark token does without them.
for l in ed25519 ed-imp; do
	for ty in privkey pubkey; do
		pkcs11-tool --module "$SOFTHSM2_MODULE" --token-label "$TOKEN" --login --pin "$PIN" \
			--delete-object --type "$ty" --label "$l" >/dev/null 2>&1 || true
	done
done

# The agent, as users run it.  Enough descriptors for item 5.
ulimit -n 4096 2>/dev/null || ulimit -n "$(ulimit -Hn)"
SOCK=$T/agent.sock
"$top_builddir/p11agentd" --foreground --socket "$SOCK" --module "$SOFTHSM2_MODULE" \
	>"$T/agent.log" 2>&1 &
AGENT_PID=$!
pids+=("$AGENT_PID")
printf '%s\n' "$PIN" >"$T/pin"
chmod 600 "$T/pin"
for _ in $(seq 1 100); do
	"$top_builddir/p11agent" --socket "$SOCK" unlock --pin-file "$T/pin" >/dev/null 2>&1 && break
	sleep 0.1
done
"$top_builddir/p11agent" --socket "$SOCK" list 2>/dev/null | grep -q "logged in: *yes" ||
	{ cat "$T/agent.log" >&2; die "agent did not start or unlock"; }
AGENT_HELPERS=$(awk -v p="$AGENT_PID" '$4 == p { print $1 }' /proc/[0-9]*/stat 2>/dev/null | tr '\n' ' ')

# The provider, enabled as users enable it.
PROV_CONF=$T/openssl-p11agent.cnf
{
	sys="$(openssl version -d | sed -n 's/^OPENSSLDIR: "\(.*\)"$/\1/p')/openssl.cnf"
	[ ! -f "$sys" ] || printf '.include %s\n' "$sys"
	printf '.include %s\n' "$T/p11agent-openssl.cnf"
} >"$PROV_CONF"
# The shipped snippet, naming the module of the build tree.
sed -e "s|@PROVIDER_MODULE@|$top_builddir/.libs/p11agent.so|g" \
	"$top_srcdir/packaging/p11agent-openssl.cnf.in" >"$T/p11agent-openssl.cnf"
PROV=(env OPENSSL_CONF="$PROV_CONF" OPENSSL_MODULES="$top_builddir/.libs" P11AGENT_SOCK="$SOCK")
# libp11's engine, as an openssl.cnf engine section.
ENGINE_CONF=$T/openssl-engine.cnf
ENGINE_SO=$(ls /usr/lib/*/engines-3/pkcs11.so 2>/dev/null | head -n 1)
cat >"$ENGINE_CONF" <<EOF
openssl_conf = init
[init]
engines = engines
[engines]
pkcs11 = pkcs11_sect
[pkcs11_sect]
engine_id = pkcs11
dynamic_path = $ENGINE_SO
MODULE_PATH = $SOFTHSM2_MODULE
PIN = $PIN
init = 0
EOF
ENGT=(env BENCH_ENGINE_MODULE="$SOFTHSM2_MODULE" BENCH_ENGINE_PIN="$PIN")

# p11-kit's RPC forwarding of the same module and token.
P11KIT_SOCK=$T/p11kit.sock
if [ -n "$P11KIT_CLIENT" ] && command -v p11-kit >/dev/null; then
	p11-kit server -f -n "$P11KIT_SOCK" --provider "$SOFTHSM2_MODULE" "pkcs11:token=$TOKEN" \
		>"$T/p11kit.log" 2>&1 &
	pids+=("$!")
	for _ in $(seq 1 50); do [ -S "$P11KIT_SOCK" ] && break; sleep 0.1; done
else
	log "p11-kit server or p11-kit-client.so missing: no p11-kit column"
fi

uri() { printf 'pkcs11:token=%s;object=%s;type=private' "$TOKEN" "$1"; }

# ---------------------------------------------------------------- 1: the floor
if [[ " $ITEMS " == *" 1 "* ]]; then
	log "1: bare Unix-socket round trip, 200 bytes"
	for r in $(seq 1 "$REPS"); do
		measure 1 rtt rtt "$r" "$B/rtt" "$SECS" 200
	done
fi

# ---------------------------------------------------------------- 2: signing
if [[ " $ITEMS " == *" 2 "* ]]; then
	for alg in $ALGS; do
		case $alg in
		ec) label=ec256 ;;
		pss) label=rsa2048 ;;
		esac
		for t in $THREADS; do
			log "2: $alg, $t clients"
			for r in $(seq 1 "$REPS"); do
				measure 2 "$alg/$t" inproc "$r" "$B/signbench" pkcs11 "$SOFTHSM2_MODULE" \
					"$TOKEN" "$label" "$PIN" "$alg" "$t" "$SECS"
				measure 2 "$alg/$t" agent "$r" "$B/signbench" agent "$SOCK" "$(uri "$label")" \
					"$alg" "$t" "$SECS"
				measure 2 "$alg/$t" provider "$r" "${PROV[@]}" "$B/signbench" provider "$(uri "$label")" \
					"$alg" "$t" "$SECS"
				measure 2 "$alg/$t" module "$r" env P11AGENT_SOCK="$SOCK" "$B/signbench" pkcs11 \
					"$PK_MODULE" "$TOKEN" "$label" "$PIN" "$alg" "$t" "$SECS"
				if [ -S "$P11KIT_SOCK" ]; then
					measure 2 "$alg/$t" p11kit "$r" env P11_KIT_SERVER_ADDRESS="unix:path=$P11KIT_SOCK" \
						"$B/signbench" pkcs11 "$P11KIT_CLIENT" "$TOKEN" "$label" "$PIN" "$alg" "$t" "$SECS"
				fi
			done
		done
	done
fi

# ---------------------------------------------------------------- 6: forwarded
# A client behind a stream relay (socat, as ssh -R: no descriptor crosses
# it) signs on its main connection and the agent relays to the helper
# (protocol version 3), against a local client on its signing channel.
if [[ " $ITEMS " == *" 6 "* ]]; then
	if command -v socat >/dev/null; then
		socat "UNIX-LISTEN:$T/relay.sock,fork,mode=600" "UNIX-CONNECT:$SOCK" 2>>"$T/errors.log" &
		pids+=("$!")
		for _ in $(seq 1 50); do [ -S "$T/relay.sock" ] && break; sleep 0.1; done
		for t in 1 8; do
			log "6: ECDSA, $t clients, local channel against relayed through socat"
			for r in $(seq 1 "$REPS"); do
				measure 6 "ec/$t" local "$r" "$B/signbench" agent "$SOCK" "$(uri ec256)" ec "$t" "$SECS"
				measure 6 "ec/$t" relayed "$r" "$B/signbench" agent "$T/relay.sock" "$(uri ec256)" \
					ec "$t" "$SECS"
			done
		done
	else
		log "socat missing: no item 6 (forwarded)"
	fi
fi

# ---------------------------------------------------------------- TLS server material
printf 'subjectAltName = DNS:localhost, IP:127.0.0.1\nextendedKeyUsage = serverAuth\n' >"$T/server.ext"
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$T/server.key" \
	-subj "/CN=localhost" -out "$T/server.csr" >/dev/null 2>&1 &&
	openssl x509 -req -in "$T/server.csr" -CA "$TOK/ca.pem" -CAkey "$TOK/ca.key" -set_serial 4242 \
		-days 30 -extfile "$T/server.ext" -out "$T/server.pem" >/dev/null 2>&1 ||
	die "server certificate"
# The client key for items 3 and 4: ec-imp, a P-256 key that exists both on
# the token and as a PEM file (it was imported).
CKEY=ec-imp
CCERT=$TOK/$CKEY.cert.pem
CPEM=$TOK/private/$CKEY.key

# ---------------------------------------------------------------- 3: handshakes
if [[ " $ITEMS " == *" 3 "* ]]; then
	for v in 1.3 1.2; do
		log "3: TLS $v mutual-TLS handshakes"
		for r in $(seq 1 "$REPS"); do
			measure 3 "tls$v" pem "$r" "$B/tlsbench" pem "$v" "$SECS" "$CCERT" "$CPEM" \
				"$TOK/ca.pem" "$T/server.pem" "$T/server.key"
			# The same PEM key with the provider loaded (OPENSSL_CONF as
			# users set it): what loading the provider alone costs.
			measure 3 "tls$v" pem+prov "$r" "${PROV[@]}" "$B/tlsbench" pem "$v" "$SECS" "$CCERT" "$CPEM" \
				"$TOK/ca.pem" "$T/server.pem" "$T/server.key"
			measure 3 "tls$v" provider "$r" "${PROV[@]}" "$B/tlsbench" provider "$v" "$SECS" "$CCERT" \
				"$(uri $CKEY)" "$TOK/ca.pem" "$T/server.pem" "$T/server.key"
			measure 3 "tls$v" engine "$r" "${ENGT[@]}" "$B/tlsbench" engine "$v" "$SECS" "$CCERT" \
				"$(uri $CKEY)" "$TOK/ca.pem" "$T/server.pem" "$T/server.key"
		done
	done
fi

# ---------------------------------------------------------------- 4: short-lived processes
# wall_us CMD...: wall time of CMD in microseconds (fails when CMD fails).
wall_us() {
	local a b
	a=$(date +%s%N)
	"$@" >/dev/null 2>>"$T/errors.log" || return 1
	b=$(date +%s%N)
	echo $(((b - a) / 1000))
}

# record_wall ITEM GROUP VARIANT REP CMD...: one wall-time sample (rate = 1e6/us).
record_wall() {
	local item=$1 group=$2 variant=$3 rep=$4 us
	shift 4
	if us=$(wall_us "$@"); then
		printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$item" "$group" "$variant" "$rep" \
			"$(awk -v u="$us" 'BEGIN { printf "%.3f", 1e6 / u }')" "$us" "$us" >>"$RAW"
	else
		log "$item/$group/$variant run $rep failed"
		tail -n 3 "$T/errors.log" >&2
	fi
}

if [[ " $ITEMS " == *" 4 "* ]]; then
	log "4: short-lived processes, $RUNS runs each"
	head -c 32 /dev/urandom >"$T/dgst"
	SPORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
	openssl s_server -accept "127.0.0.1:$SPORT" -cert "$T/server.pem" -key "$T/server.key" \
		-CAfile "$TOK/ca.pem" -Verify 1 -verify_return_error -naccept 100000 -quiet \
		>"$T/s_server.log" 2>&1 &
	pids+=("$!")
	sleep 0.5
	# One handshake; standard input is /dev/null, so s_client closes at once.
	SC=(openssl s_client -connect "127.0.0.1:$SPORT" -CAfile "$TOK/ca.pem" -verify_return_error
		-cert "$CCERT")
	ENG_URI="$(uri $CKEY);pin-value=$PIN"
	ENG=(env OPENSSL_CONF="$ENGINE_CONF")
	for r in $(seq 1 "$RUNS"); do
		record_wall 4 pkeyutl pem "$r" openssl pkeyutl -sign -inkey "$CPEM" -in "$T/dgst"
		record_wall 4 pkeyutl pem+prov "$r" "${PROV[@]}" openssl pkeyutl -sign -inkey "$CPEM" -in "$T/dgst"
		record_wall 4 pkeyutl provider "$r" "${PROV[@]}" openssl pkeyutl -sign -inkey "$(uri $CKEY)" -in "$T/dgst"
		record_wall 4 pkeyutl engine "$r" "${ENG[@]}" openssl pkeyutl -sign \
			-engine pkcs11 -keyform engine -inkey "$ENG_URI" -in "$T/dgst"
		record_wall 4 s_client pem "$r" "${SC[@]}" -key "$CPEM"
		record_wall 4 s_client pem+prov "$r" "${PROV[@]}" "${SC[@]}" -key "$CPEM"
		record_wall 4 s_client provider "$r" "${PROV[@]}" "${SC[@]}" -key "$(uri $CKEY)"
		record_wall 4 s_client engine "$r" "${ENG[@]}" "${SC[@]}" -engine pkcs11 -keyform engine \
			-key "$ENG_URI"
	done
fi

# ---------------------------------------------------------------- 5: agent memory
# mem_kib PID: "RSS PSS ANON" in KiB.  RSS counts every shared-library page
# the process touched (libcrypto, libc: shared with every other process);
# PSS divides shared pages among their users; ANON is the process's own
# heap, stacks and data.
mem_kib() {
	local rss anon pss
	rss=$(awk '$1 == "VmRSS:" { print $2 }' "/proc/$1/status" 2>/dev/null)
	anon=$(awk '$1 == "RssAnon:" { print $2 }' "/proc/$1/status" 2>/dev/null)
	pss=$(awk '$1 == "Pss:" { print $2 }' "/proc/$1/smaps_rollup" 2>/dev/null)
	echo "${rss:-0} ${pss:-0} ${anon:-0}"
}
# rss_all STATE: one line per agent process and the total into the raw file
# (fields rate, p50, p99 hold RSS, PSS, ANON).
rss_all() {
	local p i=0 name rss pss anon trss=0 tpss=0 tanon=0
	for p in $AGENT_PID $AGENT_HELPERS; do
		read -r rss pss anon <<<"$(mem_kib "$p")"
		trss=$((trss + rss)) tpss=$((tpss + pss)) tanon=$((tanon + anon))
		if [ "$p" = "$AGENT_PID" ]; then
			name=main
		else
			i=$((i + 1))
			name=helper$i
		fi
		printf '5\t%s\t%s\t1\t%s\t%s\t%s\n' "$1" "$name" "$rss" "$pss" "$anon" >>"$RAW"
	done
	printf '5\t%s\ttotal\t1\t%s\t%s\t%s\n' "$1" "$trss" "$tpss" "$tanon" >>"$RAW"
}

if [[ " $ITEMS " == *" 5 "* ]]; then
	log "5: agent memory"
	# A fresh agent: the figures are about this one token, not the
	# benchmarks above.
	kill -TERM "$AGENT_PID" 2>/dev/null
	wait "$AGENT_PID" 2>/dev/null
	sleep 0.3
	"$top_builddir/p11agentd" --foreground --socket "$SOCK" --module "$SOFTHSM2_MODULE" \
		>>"$T/agent.log" 2>&1 &
	AGENT_PID=$!
	pids+=("$AGENT_PID")
	for _ in $(seq 1 100); do
		"$top_builddir/p11agent" --socket "$SOCK" unlock --pin-file "$T/pin" >/dev/null 2>&1 && break
		sleep 0.1
	done
	AGENT_HELPERS=$(awk -v p="$AGENT_PID" '$4 == p { print $1 }' /proc/[0-9]*/stat 2>/dev/null | tr '\n' ' ')
	sleep 0.5
	rss_all idle
	# CONNS idle connections, held by one process through a FIFO.
	mkfifo "$T/hold"
	"$B/connhold" "$SOCK" "$CONNS" <"$T/hold" >"$T/connhold.out" 2>&1 &
	HOLD_PID=$!
	pids+=("$HOLD_PID")
	exec 9>"$T/hold"
	for _ in $(seq 1 300); do grep -q ready "$T/connhold.out" 2>/dev/null && break; sleep 0.1; done
	if grep -q ready "$T/connhold.out"; then
		rss_all "conns$CONNS"
	else
		log "connhold did not get $CONNS connections: $(cat "$T/connhold.out")"
	fi
	exec 9>&-
	wait "$HOLD_PID" 2>/dev/null
	sleep 0.3
	# Signatures in batches, RSS after each: flat or growing?
	n=0
	step=$((SIGS / 4))
	for b in 1 2 3 4; do
		"$B/signbench" agent "$SOCK" "$(uri ec256)" ec 2 0 "$step" >/dev/null 2>>"$T/errors.log" ||
			log "signing for item 5 failed"
		n=$((n + step))
		rss_all "sigs$n"
	done
fi

# ---------------------------------------------------------------- the table
{
	echo "# p11agent benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')"
	echo "# machine: $(nproc) CPUs, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1),"\
		"$(uname -sr), load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
	echo "# reps=$REPS secs=$SECS threads='$THREADS' runs=$RUNS conns=$CONNS sigs=$SIGS"
	echo "# $(openssl version); SoftHSM2 $(softhsm2-util --version 2>/dev/null);"\
		"p11-kit $(dpkg-query -W -f '${Version}' p11-kit 2>/dev/null);"\
		"libp11 $(dpkg-query -W -f '${Version}' libengine-pkcs11-openssl 2>/dev/null)"
} >"$T/header"
python3 "$here/table.py" "$T/header" "$RAW"
