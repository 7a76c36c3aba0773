#!/usr/bin/env python3
"""Summarises an Nsight Compute CSV of decode_bench (`ncu --metrics gpu__time_duration.sum --csv
--print-units base`, as tests/gpu/run_engine.sh PROFILE=1 writes it): the kernels and GPU time
of each forward (a forward starts at the embedding kernel), then the last forward's time by
kernel. ncu runs the kernels one at a time with cold caches and fixed clocks, so the times are
above those of a normal run; the counts and the shares are what it is for.

    ncu_summary.py FILE.csv [--top N]"""
import argparse
import collections
import csv
import re


def short(name):
    name = re.sub(r"\(.*", "", name)
    for junk in ("void ", "helix::", "<unnamed>::", "kernels::cuda::"):
        name = name.replace(junk, "")
    return name[:60]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    forwards = []
    with open(a.csv, newline="") as f:
        for row in csv.reader(f):
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
