#!/usr/bin/env python3
"""Summarises an Nsight Compute CSV of decode_bench (`ncu --metrics gpu__time_duration.sum --csv
--print-units base`, as tests/gpu/run_engine.sh PROFILE=1 writes it): the kernels and GPU time
of each forward (a forward starts at the embedding kernel), then the last forward's time by
kernel. ncu runs the kernels one at a time with cold caches and fixed clocks, so the times are
above those of a normal run; the counts and the shares are what it is for.

    ncu_summary.py FILE.csv [--top N]

With --sections DETAILS.csv [--raw RAW.csv] (the details and raw pages of a report of a few
kernels profiled with sections, `ncu -i REPORT --csv --print-units base --page details|raw`, as
run_engine.sh's attention profiles write them): per kernel, the headline metrics of its sections
and its most frequent warp stall reasons."""
import argparse
import collections
import csv
import re


def short(name):
    name = re.sub(r"\(.*", "", name)
    for junk in ("void ", "helix::", "<unnamed>::", "kernels::cuda::"):
        name = name.replace(junk, "")
    return name[:60]


# Section metrics worth a line each (details page names).
HEADLINE = ("Duration", "DRAM Throughput", "Memory Throughput", "L2 Hit Rate",
            "Achieved Occupancy", "Theoretical Occupancy", "Registers Per Thread",
            "Block Limit Registers", "Block Limit Shared Mem", "Grid Size", "Block Size",
            "Waves Per SM", "Issued Warp Per Scheduler", "No Eligible",
            "Warp Cycles Per Issued Instruction")


def rows_of(path):
    with open(path, newline="") as f:
        return [r for r in csv.reader(f)]


def sections(details, raw):
    """Per kernel (in profile order): the HEADLINE metrics, then the largest stall reasons."""
    kernels = collections.OrderedDict()
    for row in rows_of(details):
        if len(row) < 15 or not row[0].isdigit():
            continue
        key = (int(row[0]), short(row[4]) + " " + row[8])
        kernels.setdefault(key, collections.OrderedDict())
        # Keyed by unit too: "Memory Throughput" is a % in one section, bytes/s in another.
        if row[12] in HEADLINE and (row[12], row[13]) not in kernels[key]:
            kernels[key][(row[12], row[13])] = row[14]
    stalls = {}
    if raw:
        rows = rows_of(raw)
        # The header is the first row that starts with "ID" (ncu may print notes before it).
        header = next((r for r in rows if r and r[0] == "ID"), [])
        pat = re.compile(r"smsp__average_warps?_(?:latency_)?issue_stalled_(\w+?)_per_issue_active\.ratio$")
        # "selected" is the cycle a warp issues, not a stall.
        cols = [(i, m.group(1)) for i, h in enumerate(header) for m in [pat.match(h)]
                if m and m.group(1) != "selected"]
        for row in rows[1:]:
            if not row or not row[0].isdigit():
                continue
            vals = []
            for i, name in cols:
                try:
                    vals.append((float(row[i].replace(",", "")), name))
                except (ValueError, IndexError):
                    pass
            stalls[int(row[0])] = sorted(vals, reverse=True)
    if not kernels:
        print("ncu_summary: no kernel rows in", details)
        return
    for (kid, name), metrics in kernels.items():
        print(f"{kid}: {name}")
        print("   " + "; ".join(f"{k} {v} {u}".rstrip() for (k, u), v in metrics.items()))
        top = [(v, n) for v, n in stalls.get(kid, []) if v > 0][:6]
        if top:
            total = sum(v for v, _ in stalls[kid])
            print("   stalls (cycles per issued instruction): " +
                  ", ".join(f"{n} {v:.2f}" for v, n in top) + f" (all reasons {total:.2f})")
        elif raw:
            print("   stalls: no stall metrics in", raw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv", nargs="?")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--sections", help="details-page CSV of a report profiled with sections")
    ap.add_argument("--raw", help="raw-page CSV of the same report (stall reasons)")
    a = ap.parse_args()
    if a.sections:
        sections(a.sections, a.raw)
        return
    if not a.csv:
        ap.error("a CSV file or --sections is needed")
    forwards = []
    for row in rows_of(a.csv):
        if len(row) < 15 or not row[0].isdigit() or row[12] != "gpu__time_duration.sum":
            continue
        ns = float(row[14].replace(",", ""))
        if "EmbeddingKernel" in row[4] or not forwards:
            forwards.append([])
        forwards[-1].append((short(row[4]), ns))
    if not forwards:
        print("ncu_summary: no kernel rows in", a.csv)
        return
    for i, fw in enumerate(forwards):
        print(f"forward {i}: {len(fw)} kernels, {sum(ns for _, ns in fw) / 1e3:.1f} us GPU time")
    last = forwards[-1]
    agg = collections.defaultdict(lambda: [0, 0.0])
    for name, ns in last:
        agg[name][0] += 1
        agg[name][1] += ns
    print(f"forward {len(forwards) - 1} by kernel (us total, launches, us each):")
    for name, (n, ns) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:a.top]:
        print(f"  {ns / 1e3:9.1f} {n:5d} {ns / n / 1e3:8.2f}  {name}")


if __name__ == "__main__":
    main()
