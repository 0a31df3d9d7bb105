#!/usr/bin/env bash
# run.sh: builds every fuzz target with libFuzzer + ASan + UBSan (clang) and
# runs each for FUZZ_SECONDS (default 60).  `make fuzz` calls it.
#
#   tests/fuzz/run.sh [TARGET...]      default: all targets
#
# Environment:
#   FUZZ_SECONDS  run time per target (default 60)
#   FUZZ_OUT      work directory (default $top_builddir/tests/fuzz/out):
#                 OUT/bin/TARGET, OUT/corpus/TARGET (grown corpus),
#                 OUT/TARGET.log, OUT/summary.tsv (target, seconds, executions,
#                 corpus size, status)
#   CC            a clang with libFuzzer (default clang)
#   top_builddir  where config.h is (default: the source tree)
#
# A crash leaves its reproducer in OUT/ (crash-*, leak-*, timeout-*):
# copy it into tests/fuzz/corpus/TARGET/ so `make check` replays it forever.
# Exit status: non-zero when any target found a crash or could not be built.
set -u
src=$(cd "$(dirname "$0")/../.." && pwd)
top_builddir=${top_builddir:-$src}
secs=${FUZZ_SECONDS:-60}
out=${FUZZ_OUT:-$top_builddir/tests/fuzz/out}
cc=${CC:-clang}
case $cc in gcc|cc|*/gcc|*/cc) cc=clang ;; esac

all_targets="fuzz_request fuzz_internal fuzz_reply fuzz_keyref fuzz_uri fuzz_tlsclass"
targets=${*:-$all_targets}

command -v "$cc" >/dev/null || { echo "run.sh: $cc not found (install clang and libclang-rt-14-dev)" >&2; exit 2; }
[ -f "$top_builddir/config.h" ] || { echo "run.sh: $top_builddir/config.h missing: run configure first" >&2; exit 2; }
mkdir -p "$out/bin" "$out/corpus"

# shellcheck disable=SC2207
sd=
! grep -q '^#define HAVE_SYSTEMD 1' "$top_builddir/config.h" || sd=libsystemd
# shellcheck disable=SC2207
pkg=($(pkg-config --cflags --libs libcrypto p11-kit-1 libassuan gpg-error $sd))
# shellcheck disable=SC2054 # the commas belong to -fsanitize=
cflags=(-g -O1 -fno-omit-frame-pointer -std=gnu11 -fsanitize=fuzzer,address,undefined
	-fno-sanitize-recover=undefined -DFUZZING_LIBFUZZER -D_GNU_SOURCE
	-I"$top_builddir" -I"$src/common" -I"$src/agent")
common=("$src"/common/{p11a,buf,frame,proto,sigenc,client,uri,keyref,text,hashalg,sigin,tlsclass}.c)
# The agent's sources, as FUZZ_AGENT_SOURCES in Makefile.am lists them.
agent=("$src"/agent/{server,supervise,handlers,log,audit,conf,modules,registry,systemd,logind,pinentry,prompt,helper}.c
	"$src"/agent/token/{token,rv,pool,spki,object,slot,login,sign,ctxpin}.c)

build() {
	local t=$1 extra=()
	case $t in
	fuzz_request) extra=(-DFUZZ_MODE_REQUEST "$src/tests/fuzz/fuzz_agent.c" "${agent[@]}") ;;
	fuzz_internal) extra=(-DFUZZ_MODE_INTERNAL "$src/tests/fuzz/fuzz_agent.c" "${agent[@]}") ;;
	fuzz_reply) extra=("$src/tests/fuzz/fuzz_reply.c" -pthread) ;;
	fuzz_keyref) extra=("$src/tests/fuzz/fuzz_keyref.c") ;;
	fuzz_uri) extra=("$src/tests/fuzz/fuzz_uri.c") ;;
	fuzz_tlsclass) extra=("$src/tests/fuzz/fuzz_tlsclass.c") ;;
	*) echo "run.sh: unknown target $t" >&2; return 1 ;;
	esac
	"$cc" "${cflags[@]}" "${extra[@]}" "${common[@]}" -o "$out/bin/$t" "${pkg[@]}" -ldl -lpthread
}

status=0
printf 'target\tseconds\texecutions\tcorpus\tstatus\n' >"$out/summary.tsv"
for t in $targets; do
	echo "== $t: building"
	if ! build "$t" >"$out/$t.build.log" 2>&1; then
		cat "$out/$t.build.log"
		printf '%s\t0\t0\t0\tbuild-failed\n' "$t" >>"$out/summary.tsv"
		status=1
		continue
	fi
	mkdir -p "$out/corpus/$t"
	echo "== $t: fuzzing for $secs s"
	t0=$(date +%s)
	# The grown corpus first (new inputs land there), the committed seeds second.
	(cd "$out" && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
		UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		"$out/bin/$t" -max_total_time="$secs" -timeout=20 -rss_limit_mb=2048 -max_len=8192 \
		-print_final_stats=1 -close_fd_mask=1 "$out/corpus/$t" "$src/tests/fuzz/corpus/$t") \
		>"$out/$t.log" 2>&1
	rc=$?
	t1=$(date +%s)
	execs=$(awk '/stat::number_of_executed_units/ { print $NF }' "$out/$t.log" | tail -n 1)
	ncorp=$(find "$out/corpus/$t" -type f | wc -l)
	if [ "$rc" -eq 0 ]; then st=ok; else st="crash(rc=$rc)"; status=1; tail -n 40 "$out/$t.log"; fi
	printf '%s\t%s\t%s\t%s\t%s\n' "$t" "$((t1 - t0))" "${execs:-0}" "$ncorp" "$st" >>"$out/summary.tsv"
	echo "== $t: $st, ${execs:-0} inputs in $((t1 - t0)) s"
done
column -t -s "$(printf '\t')" "$out/summary.tsv" 2>/dev/null || cat "$out/summary.tsv"
exit "$status"
