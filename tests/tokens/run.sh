#!/bin/bash
# run.sh NAME: one token's TAP test: tests/tokens/setup-NAME.sh start in a
# temporary directory, tests/tokens/checks.sh on it, setup-NAME.sh stop
# (also when the checks fail or the test is interrupted).  A setup that
# cannot run on this machine (exit 77) makes the whole test a TAP skip with
# its reason; any other setup failure is a failed test.
set -u
name=$1
here=$(cd "$(dirname "$0")" && pwd)
tmp_base=${TMPDIR:-/tmp}
[ "${#tmp_base}" -le 40 ] || tmp_base=/tmp
dir=$(mktemp -d "$tmp_base/p11a-tok-$name.XXXXXX")
stopped=no
# shellcheck disable=SC2317 # the EXIT trap calls it
stop() {
	[ "$stopped" = no ] || return 0
	stopped=yes
	bash "$here/setup-$name.sh" stop "$dir" >"$dir/stop.log" 2>&1 ||
		{ echo "# setup-$name.sh stop failed:"; sed 's/^/#   /' "$dir/stop.log"; }
	if [ -n "${KEEP_TMP:-}" ]; then echo "# KEEP_TMP set: kept $dir"; else rm -rf "$dir"; fi
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

st=0
bash "$here/setup-$name.sh" start "$dir" 2>"$dir/setup.err" >"$dir/setup.out" || st=$?
if [ "$st" -eq 77 ]; then
	printf '1..0 # SKIP %s\n' "$(tail -n 1 "$dir/setup.err")"
	exit 0
elif [ "$st" -ne 0 ]; then
	printf '1..1\nnot ok 1 - setup-%s.sh start (exit %d)\n' "$name" "$st"
	tail -n 30 "$dir/setup.err" | sed 's/^/#   /'
	exit 1
fi
st=0
bash "$here/checks.sh" "$dir" || st=$?
exit "$st"
