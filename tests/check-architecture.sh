#!/bin/bash
# check-architecture: docs/architecture.md's source map cannot drift from
# the tree, and no include crosses a boundary the map forbids.
#
# The map is the section "## Source map" of docs/architecture.md.  Each
# component is a heading
#   ### `DIR/` ... (may include: `DIR/`, `DIR/`, ...)
# followed by a table whose rows start with | `PATH` | (a source file).
# This test fails when
#   - a C source or header under agent/, common/, engine/ or cli/ is missing
#     from the map, or the map names a file that is gone;
#   - a file of one component includes (#include "...") a header of a
#     directory its heading does not list (a component may always include
#     its own files; config.h and paths.h, made by configure and make, are
#     everybody's);
#   - a heading names no "may include" list.
# Components are matched by the longest directory prefix, so
# engine/pkcs11/ and engine/provider/ are components of their own.
set -u
top_srcdir=${top_srcdir:-$(cd "$(dirname "$0")/.." && pwd)}
PYTHON3=${PYTHON3:-/usr/bin/python3}

exec "$PYTHON3" - "$top_srcdir" <<'EOF'
import os, re, sys

src = sys.argv[1]
doc = os.path.join(src, "docs", "architecture.md")
ROOTS = ("agent", "common", "engine", "cli")
GENERATED = {"config.h", "paths.h"}
n = bad = 0

def result(good, desc, why=()):
    global n, bad
    n += 1
    bad += 0 if good else 1
    print("%s %d - %s" % ("ok" if good else "not ok", n, desc))
    if not good:
        for w in why:
            print("# " + w)

text = open(doc, encoding="utf-8").read()
m = re.search(r"^## Source map\n(.*?)(?=^## |\Z)", text, re.S | re.M)
if not m:
    print("1..1")
    print("not ok 1 - docs/architecture.md has a '## Source map' section")
    sys.exit(1)
section = m.group(1)

components = {}        # dir -> set of allowed dirs
mapped = {}            # path -> component dir
current = None
for line in section.splitlines():
    h = re.match(r"^### `([^`]+/)`(.*)$", line)
    if h:
        current = h.group(1)
        allow = re.search(r"may include:([^)]*)\)", h.group(2))
        ok_heading = allow is not None
        result(ok_heading, "the map's component %s says what it may include" % current,
               ["heading: " + line])
        components[current] = set(re.findall(r"`([^`]+/)`", allow.group(1))) if allow else set()
        components[current].add(current)
        continue
    r = re.match(r"^\|\s*`([^`]+)`\s*\|", line)
    if r and current:
        path = r.group(1)
        if path.endswith("/"):
            continue
        mapped[path] = current

tree = set()
for root in ROOTS:
    for d, _, files in os.walk(os.path.join(src, root)):
        for f in files:
            if f.endswith((".c", ".h")) and f not in GENERATED:
                tree.add(os.path.relpath(os.path.join(d, f), src))

missing = sorted(tree - set(mapped))
gone = sorted(set(mapped) - tree)
result(not missing, "every source file is in the map (%d files)" % len(tree),
       ["not in docs/architecture.md's source map: " + p for p in missing])
result(not gone, "the map names no file that is gone",
       ["in the map but not in the tree: " + p for p in gone])

def component_of(path):
    best = None
    for c in components:
        if path.startswith(c) and (best is None or len(c) > len(best)):
            best = c
    return best

wrong_place = [p for p, c in mapped.items() if p in tree and component_of(p) != c]
result(not wrong_place, "each file is listed under its own directory's component",
       ["%s is listed under %s" % (p, mapped[p]) for p in wrong_place])

crossings = []
inc_re = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)
for path in sorted(tree):
    comp = component_of(path)
    if comp is None:
        crossings.append("%s: no component in the map holds it" % path)
        continue
    body = open(os.path.join(src, path), encoding="utf-8", errors="replace").read()
    for inc in inc_re.findall(body):
        if os.path.basename(inc) in GENERATED and "/" not in inc:
            continue
        # As the compiler looks: beside the file, then -I common.
        cands = [os.path.normpath(os.path.join(os.path.dirname(path), inc)),
                 os.path.normpath(os.path.join("common", inc)),
                 os.path.normpath(inc)]
        target = next((c for c in cands if c in tree), None)
        if target is None and "/" not in inc:
            # Found only through some other -I: the tree's file of that name.
            same = [t for t in tree if os.path.basename(t) == inc]
            target = same[0] if len(same) == 1 else None
        if target is None:
            # A header outside the four roots (system, generated ones).
            continue
        tcomp = component_of(target)
        if tcomp is None or not any(tcomp.startswith(a) or tcomp == a for a in components[comp]):
            crossings.append("%s includes %s (%s may include %s)" %
                             (path, target, comp, ", ".join(sorted(components[comp]))))
result(not crossings, "no include crosses a component boundary", crossings)

print("1..%d" % n)
sys.exit(1 if bad else 0)
EOF
