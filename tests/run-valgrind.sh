#!/usr/bin/env bash
# run-valgrind.sh: the integration tests with the agent and its token
# helpers under valgrind memcheck (lib.sh's P11AGENTD_WRAPPER), then a scan
# of valgrind's per-process logs.  Fails on any invalid access, use of
# uninitialised memory or definite leak, in the agent or a helper, except
# in the helper that t_faults deliberately kills with abort() inside
# C_Sign (a process that dies of SIGABRT frees nothing).
#
#   tests/run-valgrind.sh [t_NAME...]     default: the agent's tests below
#
# Environment: top_builddir (default: the source tree), VALGRIND_OUT
# (default $top_builddir/tests/valgrind: TEST.tap and vg.PID.log files).
set -u
src=$(cd "$(dirname "$0")/.." && pwd)
build=${top_builddir:-$src}
out=${VALGRIND_OUT:-$build/tests/valgrind}
tests=${*:-t_list t_unlock t_sign t_lifecycle t_security t_faults t_load t_keycopy t_audit t_pinentry t_always_auth t_confirm t_forward_faults}

command -v valgrind >/dev/null || { echo "run-valgrind.sh: valgrind not found" >&2; exit 2; }
rm -rf "$out"
mkdir -p "$out"
export top_builddir=$build top_srcdir=$src
export SOFTHSM2_MODULE=${SOFTHSM2_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
export P11AGENTD_WRAPPER="valgrind --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite --show-leak-kinds=definite --num-callers=30 --log-file=$out/vg.%p.log"
# valgrind's own memory counts in the agent's RSS: t_load's bounds are for the agent alone.
export LOAD_RSS_GROWTH_MAX_KB=${LOAD_RSS_GROWTH_MAX_KB:-131072}
export LOAD_RSS_PEAK_MAX_KB=${LOAD_RSS_PEAK_MAX_KB:-524288}
# Everything is 20-50 times slower.
export CLI_TIMEOUT=${CLI_TIMEOUT:-180}

status=0
for t in $tests; do
	t=${t%.sh}
	t0=$(date +%s)
	if bash "$src/tests/integration/$t.sh" >"$out/$t.tap" 2>&1; then
		echo "PASS: $t under valgrind ($(($(date +%s) - t0)) s)"
	else
		echo "FAIL: $t under valgrind ($(($(date +%s) - t0)) s)"
		grep '^not ok' "$out/$t.tap" | head -n 10
		status=1
	fi
done

# Scan: invalid accesses and uninitialised uses anywhere fail; a definite
# leak fails when our code made the allocation (the allocator's caller is
# a file of agent/, common/ or tests/fault/) in a process that ended
# normally: a process killed by a signal (the helper t_faults aborts, a
# helper that gets SIGTERM when the agent is SIGKILLed) frees nothing.
cat >"$out/scan.py" <<'EOF'
import glob, os, re, sys
out, src = sys.argv[1], sys.argv[2]
ours = set()
for d in ("agent", "common", "tests/fault"):
    ours.update(f for f in os.listdir(os.path.join(src, d)) if f.endswith(".c"))
alloc = re.compile(r"\b(malloc|calloc|realloc|CRYPTO_\w*alloc|strdup|strndup)\b")
procs = bad = 0
for path in sorted(glob.glob(os.path.join(out, "vg.*.log"))):
    procs += 1
    lines = open(path, errors="replace").read().splitlines()
    killed = any("terminating with default action of signal" in l for l in lines)
    problems = []
    for i, l in enumerate(lines):
        if re.search(r"== (Invalid (read|write|free)|Conditional jump|Use of uninitialised|"
                     r"Syscall param|Mismatched free|Source and destination overlap)", l):
            problems.append("\n".join(lines[i:i + 8]))
        elif "definitely lost in loss record" in l and not killed:
            block = []
            for b in lines[i + 1:]:
                if not re.search(r"==\s+(at|by) ", b):
                    break
                block.append(b)
            first = next((b for b in block if not alloc.search(b)), "")
            m = re.search(r"\((\w[\w.-]*\.c):\d+\)", first)
            if m and m.group(1) in ours:
                problems.append("\n".join([l] + block))
    if problems:
        bad += 1
        print("---- %s%s" % (os.path.basename(path), " (killed by a signal)" if killed else ""))
        for p in problems[:5]:
            print(p)
print("valgrind: %d agent/helper processes checked, %d with errors from our code" % (procs, bad))
sys.exit(1 if bad or procs == 0 else 0)
EOF
"${PYTHON3:-/usr/bin/python3}" "$out/scan.py" "$out" "$src" || status=1
exit "$status"
