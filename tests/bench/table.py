#!/usr/bin/python3
"""Prints the benchmark table from run.sh's raw measurements.

usage: table.py HEADER RAW

RAW lines: item group variant rep rate p50_us p99_us (tab-separated).
A ratio is taken inside one repetition (the variants of a repetition ran
one right after the other), then the median over repetitions is shown with
[min..max].  Targets are from the benchmark issue; "met" / "NOT met" is a
report, never a failure.
"""
import statistics
import sys
from collections import defaultdict

header, raw = sys.argv[1], sys.argv[2]
data = defaultdict(dict)   # (item, group) -> variant -> rep -> (rate, p50, p99)
for line in open(raw):
    f = line.rstrip("\n").split("\t")
    if len(f) != 7:
        continue
    item, group, variant, rep = f[0], f[1], f[2], int(f[3])
    data[(item, group)].setdefault(variant, {})[rep] = tuple(float(x) for x in f[4:7])


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def spread(xs, fmt="{:.0f}"):
    if not xs:
        return "-"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return (fmt + " [" + fmt + ".." + fmt + "]").format(med(xs), min(xs), max(xs))


def col(item, group, variant, k):
    reps = data.get((item, group), {}).get(variant, {})
    return [v[k] for _, v in sorted(reps.items())]


def ratios(item, group, a, b, k=0, invert=False):
    """Per-repetition a/b of field k (b/a with invert), over reps both have."""
    ra = data.get((item, group), {}).get(a, {})
    rb = data.get((item, group), {}).get(b, {})
    out = []
    for r in sorted(set(ra) & set(rb)):
        x, y = ra[r][k], rb[r][k]
        if invert:
            x, y = y, x
        if y > 0:
            out.append(x / y)
    return out


def verdict(xs, ok):
    if not xs:
        return "not measured"
    return "met" if ok(med(xs)) else "NOT met"


print(open(header).read().rstrip())
print()

# ---------------------------------------------------------------- 1
rtt = col("1", "rtt", "rtt", 1)
print("1. Floor: bare Unix-socket round trip, 200 bytes, two processes")
print(f"   round trip p50 {spread(rtt, '{:.1f}')} us, p99 {spread(col('1', 'rtt', 'rtt', 2), '{:.1f}')} us,"
      f" {spread(col('1', 'rtt', 'rtt', 0))} round trips/s")
print()

# ---------------------------------------------------------------- 2
groups2 = sorted({g for (i, g) in data if i == "2"},
                 key=lambda g: (g.split("/")[0], int(g.split("/")[1])))
if groups2:
    print("2. Signing: throughput (signatures/s) and latency (us), median [min..max] over repetitions")
    names = {"ec": "ECDSA P-256", "pss": "RSA-2048 PSS"}
    variants = ["inproc", "agent", "provider", "module", "p11kit"]
    print(f"   {'alg':<13} {'clients':>7}  {'variant':<9} {'sig/s':>24}  {'p50 us':>9}  {'p99 us':>9}")
    for g in groups2:
        alg, t = g.split("/")
        for v in variants:
            rate = col("2", g, v, 0)
            if not rate:
                continue
            print(f"   {names.get(alg, alg):<13} {t:>7}  {v:<9} {spread(rate):>24}"
                  f"  {med(col('2', g, v, 1)):9.1f}  {med(col('2', g, v, 2)):9.1f}")
    print()
    print("   Ratios of throughput, per repetition (side by side), median [min..max]:")
    print(f"   {'alg':<13} {'clients':>7}  {'agent/inproc':>20} {'provider/inproc':>20}"
          f" {'module/inproc':>20} {'p11kit/inproc':>20} {'agent/p11kit':>20} {'provider/p11kit':>20}")
    for g in groups2:
        alg, t = g.split("/")
        cells = [spread(ratios("2", g, a, b), "{:.2f}") for a, b in
                 (("agent", "inproc"), ("provider", "inproc"), ("module", "inproc"), ("p11kit", "inproc"),
                  ("agent", "p11kit"), ("provider", "p11kit"))]
        print(f"   {names.get(alg, alg):<13} {t:>7}  " + " ".join(f"{c:>20}" for c in cells))
    print()

# ---------------------------------------------------------------- 3
groups3 = [g for g in ("tls1.3", "tls1.2") if ("3", g) in data]
if groups3:
    print("3. Full mutual-TLS handshakes/s, one client process, loopback server; client key ec-imp (P-256)")
    print("   (pem+prov: the PEM key with the provider loaded by OPENSSL_CONF, no agent involved)")
    print(f"   {'TLS':<7} {'pem':>18} {'pem+prov':>18} {'provider':>18} {'engine':>18}"
          f" {'provider/engine':>18} {'provider/pem':>18} {'pem+prov/pem':>18}")
    for g in groups3:
        print(f"   {g[3:]:<7} {spread(col('3', g, 'pem', 0)):>18} {spread(col('3', g, 'pem+prov', 0)):>18}"
              f" {spread(col('3', g, 'provider', 0)):>18} {spread(col('3', g, 'engine', 0)):>18}"
              f" {spread(ratios('3', g, 'provider', 'engine'), '{:.2f}'):>18}"
              f" {spread(ratios('3', g, 'provider', 'pem'), '{:.2f}'):>18}"
              f" {spread(ratios('3', g, 'pem+prov', 'pem'), '{:.2f}'):>18}")
    print()

# ---------------------------------------------------------------- 4
groups4 = [g for g in ("pkeyutl", "s_client") if ("4", g) in data]
if groups4:
    print("4. One short-lived process: wall time (ms), median [min..max] of interleaved runs")
    print("   (pem+prov: the PEM key with the provider loaded by OPENSSL_CONF, no agent involved)")
    print(f"   {'command':<16} {'pem':>18} {'pem+prov':>18} {'provider':>18} {'engine':>18}"
          f" {'provider/pem':>18} {'provider/engine':>18} {'pem+prov/pem':>18}")
    for g in groups4:
        ms = {v: [x / 1000 for x in col("4", g, v, 1)] for v in ("pem", "pem+prov", "provider", "engine")}
        n = len(ms["provider"])
        print(f"   {g + ' (n=' + str(n) + ')':<16} {spread(ms['pem'], '{:.1f}'):>18}"
              f" {spread(ms['pem+prov'], '{:.1f}'):>18}"
              f" {spread(ms['provider'], '{:.1f}'):>18} {spread(ms['engine'], '{:.1f}'):>18}"
              f" {spread(ratios('4', g, 'provider', 'pem', 1), '{:.2f}'):>18}"
              f" {spread(ratios('4', g, 'provider', 'engine', 1), '{:.2f}'):>18}"
              f" {spread(ratios('4', g, 'pem+prov', 'pem', 1), '{:.2f}'):>18}")
    print()

# ---------------------------------------------------------------- 5
states5 = [g for (i, g) in data if i == "5"]
if states5:
    procs = []
    for s in states5:
        for v in data[("5", s)]:
            if v not in procs:
                procs.append(v)
    procs = sorted(procs, key=lambda p: (p == "total", p))
    print("5. Agent memory (KiB) of every agent process: RSS / PSS / private anonymous")
    print("   (RSS counts shared library pages, libcrypto and libc, in full; PSS shares them out)")
    print(f"   {'state':<14} " + " ".join(f"{p:>22}" for p in procs))
    for s in states5:
        cells = []
        for p in procs:
            v = data[("5", s)].get(p, {}).get(1)
            cells.append(f"{v[0]:.0f} / {v[1]:.0f} / {v[2]:.0f}" if v else "-")
        print(f"   {s:<14} " + " ".join(f"{c:>22}" for c in cells))
    print()

# ---------------------------------------------------------------- 6
groups6 = [g for g in ("ec/1", "ec/8") if ("6", g) in data]
if groups6:
    print("6. Forwarded: ECDSA P-256 through a socat stream relay (no descriptor crosses it, as with")
    print("   ssh -R: the agent relays each SIGN to the helper) against a local signing channel")
    print(f"   {'clients':>7}  {'variant':<8} {'sig/s':>24}  {'p50 us':>9}  {'p99 us':>9}")
    for g in groups6:
        for v in ("local", "relayed"):
            rate = col("6", g, v, 0)
            if rate:
                print(f"   {g.split('/')[1]:>7}  {v:<8} {spread(rate):>24}"
                      f"  {med(col('6', g, v, 1)):9.1f}  {med(col('6', g, v, 2)):9.1f}")
    print("   Added latency of the relayed path (relayed p50 - local p50, per repetition), and throughput ratio:")
    for g in groups6:
        loc, rel = col("6", g, "local", 1), col("6", g, "relayed", 1)
        added = [b - a for a, b in zip(loc, rel)]
        in_rtt = f" = {spread([x / med(rtt) for x in added], '{:.2f}')}x the bare round trip" if rtt else ""
        print(f"   {g.split('/')[1]:>7} clients: +{spread(added, '{:.1f}')} us{in_rtt};"
              f" relayed/local sig/s {spread(ratios('6', g, 'relayed', 'local'), '{:.2f}')}")
    print()

# ---------------------------------------------------------------- targets
print("Targets (the benchmark issue)")
rows = []
if rtt and ("2", "ec/1") in data:
    inproc = col("2", "ec/1", "inproc", 1)
    agent = col("2", "ec/1", "agent", 1)
    added = [(a - i) / med(rtt) for a, i in zip(agent, inproc)]
    rows.append(("ECDSA added latency at 1 client <= 1.3x bare round trip",
                 spread(added, "{:.2f}") + "x", verdict(added, lambda x: x <= 1.3)))
    added = [(a - i) for a, i in zip(agent, inproc)]
    rows.append(("  (agent p50 - in-process p50, us; round trip p50 %.1f us)" % med(rtt),
                 spread(added, "{:.1f}"), ""))
# The PKCS#11 front-end module against the same module in process.
for g in ("ec/1", "pss/1"):
    if not rtt or ("2", g) not in data:
        continue
    inproc = col("2", g, "inproc", 1)
    module = col("2", g, "module", 1)
    if not module:
        continue
    alg = {"ec": "ECDSA", "pss": "RSA-PSS"}[g.split("/")[0]]
    added = [(m - i) / med(rtt) for m, i in zip(module, inproc)]
    rows.append((f"{alg} module added latency at 1 client <= 1.3x bare round trip",
                 spread(added, "{:.2f}") + "x", verdict(added, lambda x: x <= 1.3)))
    added = [(m - i) for m, i in zip(module, inproc)]
    rows.append(("  (module p50 - in-process p50, us)", spread(added, "{:.1f}"), ""))
for g in groups2:
    alg, t = g.split("/")
    if t == "1":
        continue
    for v in ("agent", "provider", "module"):
        r = ratios("2", g, v, "inproc")
        if r:
            rows.append((f"{g} {v} >= 0.85x in-process", spread(r, "{:.2f}") + "x",
                         verdict(r, lambda x: x >= 0.85)))
        r = ratios("2", g, v, "p11kit")
        if r and v != "module":
            rows.append((f"{g} {v} >= 2x p11-kit", spread(r, "{:.2f}") + "x",
                         verdict(r, lambda x: x >= 2.0)))
for g in groups3:
    r = ratios("3", g, "provider", "engine")
    rows.append((f"{g} handshakes provider >= 0.90x engine", spread(r, "{:.2f}") + "x",
                 verdict(r, lambda x: x >= 0.90)))
for g in groups4:
    r = ratios("4", g, "provider", "pem", 1)
    rows.append((f"{g} process provider <= 1.10x PEM", spread(r, "{:.2f}") + "x",
                 verdict(r, lambda x: x <= 1.10)))
    r = ratios("4", g, "provider", "engine", 1)
    rows.append((f"{g} process provider faster than engine", spread(r, "{:.2f}") + "x",
                 verdict(r, lambda x: x < 1.0)))
for s in states5:
    d = data[("5", s)]
    per = [v[1][0] for p, v in d.items() if p != "total"]
    tot = d.get("total", {}).get(1, (0,))[0]
    if s == "idle":
        rows.append(("idle RSS <= 4 MiB per process", f"max {max(per) / 1024:.1f} MiB",
                     "met" if max(per) <= 4096 else "NOT met"))
        pss = [v[1][1] for p, v in d.items() if p != "total"]
        rows.append(("  (idle PSS, per process)", f"max {max(pss) / 1024:.1f} MiB",
                     "met" if max(pss) <= 4096 else "NOT met"))
    elif s.startswith("conns"):
        rows.append((f"{s[5:]} connections RSS <= 16 MiB in all", f"{tot / 1024:.1f} MiB",
                     "met" if tot <= 16384 else "NOT met"))
sig_states = [s for s in states5 if s.startswith("sigs")]
if len(sig_states) >= 2:
    first = data[("5", sig_states[0])]["total"][1][0]
    last = data[("5", sig_states[-1])]["total"][1][0]
    rows.append((f"RSS flat from {sig_states[0][4:]} to {sig_states[-1][4:]} signatures",
                 f"{(last - first):+.0f} KiB", "met" if last - first <= 256 else "NOT met"))
w = max(len(r[0]) for r in rows) if rows else 0
for name, val, v in rows:
    print(f"   {name:<{w}}  {val:>22}  {v}")
