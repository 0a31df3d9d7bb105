#!/bin/bash
# check-reliability-doc: docs/reliability.md cannot drift from the tests.
#
# Every table row of docs/reliability.md names its proof as
#   `SCRIPT.sh`: "DESCRIPTION"       a TAP check of tests/integration/SCRIPT.sh
#                                     (or tests/tokens/SCRIPT.sh)
#   `fuzz_TARGET`: "SEED"             a seed in tests/fuzz/corpus/fuzz_TARGET/
# This test fails when a named script or seed is gone, when a description no
# longer appears in its script, or (when the script's log from this `make
# check` run exists) when the check did not pass in that run: an "ok N - "
# line containing the description.  A row without a proof fails too.
set -u
top_srcdir=${top_srcdir:-$(cd "$(dirname "$0")/.." && pwd)}
top_builddir=${top_builddir:-$top_srcdir}
PYTHON3=${PYTHON3:-/usr/bin/python3}

exec "$PYTHON3" - "$top_srcdir" "$top_builddir" <<'EOF'
import glob, os, re, sys

src, build = sys.argv[1], sys.argv[2]
doc = os.path.join(src, "docs", "reliability.md")
n = 0
bad = 0

def result(good, desc, why=None):
    global n, bad
    n += 1
    if not good:
        bad += 1
    print("%s %d - %s" % ("ok" if good else "not ok", n, desc))
    if why and not good:
        print("# " + why)

ref_re = re.compile(r'`([A-Za-z0-9_.-]+)`: "([^"]+)"')
try:
    lines = open(doc, encoding="utf-8").read().splitlines()
except OSError as e:
    result(False, "docs/reliability.md readable", str(e))
    print("1..%d" % n)
    sys.exit(1)

# Scripts live in tests/integration, the real-token ones in tests/tokens.
def script_dir(name):
    if os.path.isfile(os.path.join(src, "tests", "tokens", name)):
        return "tokens"
    return "integration"

logs = {}
def log_ok_lines(script):
    if script not in logs:
        path = os.path.join(build, "tests", script_dir(script), script[:-3] + ".log")
        try:
            logs[script] = [l for l in open(path, encoding="utf-8", errors="replace")
                            if re.match(r"ok \d+ - ", l)]
        except OSError:
            logs[script] = None
    return logs[script]

rows = 0
for ln, line in enumerate(lines, 1):
    if not line.startswith("|") or re.match(r"^\|[\s:|-]+\|?$", line):
        continue
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if cells and cells[0].lower() in ("fault or input", "what", "figure", "target"):
        continue   # header rows
    refs = ref_re.findall(line)
    if "`" not in line and not refs:
        continue   # a table without proofs (figures)
    rows += 1
    where = "docs/reliability.md:%d" % ln
    if not refs:
        result(False, "%s names its proof" % where, line[:120])
        continue
    for name, desc in refs:
        if name.endswith(".sh"):
            script = os.path.join(src, "tests", script_dir(name), name)
            try:
                text = open(script, encoding="utf-8").read()
            except OSError:
                result(False, "%s: %s exists" % (where, name))
                continue
            # Checks a script leaves to a Python driver it runs by name
            # (hostile.py through `hostile ...`, soak/soak.py,
            # security_cases.py, load_cases.py) count as its own.
            for py in (glob.glob(os.path.join(src, "tests", "integration", "*.py")) +
                       glob.glob(os.path.join(src, "tests", "soak", "*.py"))):
                stem = os.path.basename(py)[:-3]
                if re.search(r"(^|[\s/\"'])%s(\.py)?[\s\"']" % re.escape(stem), text, re.M):
                    text += open(py, encoding="utf-8").read()
            if desc not in text:
                result(False, "%s: %s still has the check \"%s\"" % (where, name, desc))
                continue
            ok_lines = log_ok_lines(name)
            if ok_lines is None:
                result(True, "%s: %s has the check \"%s\" (no log of a run here)" % (where, name, desc))
            else:
                passed = any(desc in l for l in ok_lines)
                result(passed, "%s: %s passed \"%s\" in this run" % (where, name, desc),
                       "no 'ok' line containing it in %s.log" % name[:-3])
        elif name.startswith("fuzz_"):
            seed = os.path.join(src, "tests", "fuzz", "corpus", name, desc)
            result(os.path.isfile(seed), "%s: %s seed %s exists" % (where, name, desc))
        else:
            result(False, "%s: unknown proof kind `%s`" % (where, name))

result(rows >= 20, "docs/reliability.md has its table (%d rows with proofs)" % rows)
print("1..%d" % n)
sys.exit(1 if bad else 0)
EOF
