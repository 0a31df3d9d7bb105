#!/usr/bin/env bash
# The whole test suite: builds the tree if needed, runs `make check`
# (unit tests and integration tests against a real SoftHSM2 token, a real
# agent and real clients) and ends with a line "N passed, N failed".
#
#   tests/run-suite.sh            install missing packages (tests/install-deps.sh),
#                                 configure (if needed), build, test
#   CONFIGURE_FLAGS="--enable-asan" BUILD_DIR=build-asan tests/run-suite.sh
set -u
src=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$src}
case "$build" in /*) ;; *) build="$src/$build" ;; esac
log=$(mktemp)
trap 'rm -f "$log"' EXIT

summary() { echo "$1 passed, $2 failed"; }

# A fresh Debian 12 machine has none of the build or test packages.
# P11AGENT_SKIP_DEPS=1 skips this (a machine set up by other means).
if [ "${P11AGENT_SKIP_DEPS:-0}" != 1 ]; then
	"$src/tests/install-deps.sh" "${P11AGENT_DEPS:-test}" ||
		{ echo "installing the test dependencies failed"; summary 0 1; exit 1; }
fi

if [ ! -x "$src/configure" ]; then
	(cd "$src" && ./autogen.sh) >"$log" 2>&1 ||
		{ cat "$log"; echo "autogen.sh failed"; summary 0 1; exit 1; }
fi
mkdir -p "$build"
if [ ! -f "$build/Makefile" ]; then
	# shellcheck disable=SC2086
	(cd "$build" && "$src/configure" ${CONFIGURE_FLAGS:-}) >"$log" 2>&1 ||
		{ cat "$log"; echo "configure failed"; summary 0 1; exit 1; }
fi
if ! make -C "$build" -j"$(nproc)" >"$log" 2>&1; then
	cat "$log"; echo "build failed"; summary 0 1; exit 1
fi
make -C "$build" -j"$(nproc)" check 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
count() { awk -v k="# $1:" 'index($0, k) == 1 { n += $3 } END { print n + 0 }' "$log"; }
pass=$(count PASS)
fail=$(( $(count FAIL) + $(count ERROR) + $(count XPASS) ))
if [ "$status" -ne 0 ]; then
	for f in "$build"/tests/*/*.log; do
		[ -f "$f" ] || continue
		case "$f" in *test-suite.log) continue ;; esac
		if grep -q '^not ok\|^# FAIL\|^ERROR' "$f" 2>/dev/null; then
			echo "---- $f"; tail -n 60 "$f"
		fi
	done
	[ "$fail" -eq 0 ] && fail=1
fi
summary "$pass" "$fail"
[ "$status" -eq 0 ] && [ "$fail" -eq 0 ]
