#!/usr/bin/env python3
"""Summarises an Nsight Systems GPU trace of decode_bench (tests/gpu/run_engine.sh, PROFILE=1).

Input: the CSV of `nsys stats --report cuda_gpu_trace --format csv` over a run profiled with
`--cuda-graph-trace=node` (each kernel of a replayed CUDA graph its own row, with its real start
and duration: programmatic dependent launches overlap, unlike under ncu, which runs one kernel
at a time). The kernels are cut into steps where the GPU idles longer than --gap-us (the host
reads the sampled tokens between decode steps); the steps with the most common kernel count are
the decode steps, and of those the last --steps are summarised: the step's time from its first
kernel's start to its last kernel's end, the sum of its kernels' durations, and per kernel name
and grid width (which tells the products of one GEMV kernel apart) the count per step, the mean
duration and the mean gap from the end of the kernel before it to its start (negative: it
started before that one ended, its launch wait overlapping it).

Usage: nsys_summary.py TRACE.csv [--gap-us 15] [--steps 4] [--top 20]
"""
import argparse
import collections
import csv
import re
import statistics
import sys


def column(header, *prefixes):
    for i, h in enumerate(header):
        for p in prefixes:
            if h.strip().lower().startswith(p):
                return i
    raise SystemExit(f"nsys_summary: no column starting with {prefixes} in {header}")


def short_name(name):
    """The kernel's function name without its namespace, template arguments or parameters."""
    base = name.strip().replace("(anonymous namespace)", "anon")
    depth, out = 0, []
    for ch in base:  # drop <...> (nested)
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    base = re.sub(r"\(.*$", "", "".join(out)).strip()  # the parameters
    base = base.split()[-1] if base.split() else name
    return base.split("::")[-1]


def read_kernels(path):
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    # Skip anything before the header (nsys may print notes first).
    for k, r in enumerate(rows):
        if any(c.strip().lower().startswith("start") for c in r) and any(
                c.strip().lower() == "name" for c in r):
            header, body = r, rows[k + 1:]
            break
    else:
        raise SystemExit(f"nsys_summary: no header with Start and Name in {path}")
    i_start = column(header, "start")
    i_dur = column(header, "duration")
    i_name = [i for i, h in enumerate(header) if h.strip().lower() == "name"][0]
    # The grid's x size (when the report has it) tells the products of one kernel apart.
    i_grid = next((i for i, h in enumerate(header) if h.strip().lower() == "grdx"), None)
    kernels = []
    for r in body:
        if len(r) <= max(i_start, i_dur, i_name):
            continue
        name = r[i_name]
        if name.startswith("[") or not r[i_start].strip():  # memcpy / memset rows
            continue
        try:
            start, dur = float(r[i_start]), float(r[i_dur])
        except ValueError:
            continue
        label = short_name(name)
        if i_grid is not None and i_grid < len(r) and r[i_grid].strip():
            label += f" [{r[i_grid].strip()}]"
        kernels.append((start, dur, label))
    kernels.sort()
    return kernels


def steps_of(kernels, gap_ns):
    steps, cur, end = [], [], 0.0  # end: the latest end of a kernel in cur
    for k in kernels:
        if cur and k[0] - end > gap_ns:
            steps.append(cur)
            cur = []
        end = max(end, k[0] + k[1]) if cur else k[0] + k[1]
        cur.append(k)
    if cur:
        steps.append(cur)
    return steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--gap-us", type=float, default=15.0)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--top", type=int, default=20)
    a = ap.parse_args()
    kernels = read_kernels(a.trace)
    if not kernels:
        print("nsys_summary: no kernels in the trace")
        return 1
    steps = steps_of(kernels, a.gap_us * 1e3)
    counts = collections.Counter(len(s) for s in steps)
    n, _ = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
    decode = [s for s in steps if len(s) == n][-a.steps:]
    print(f"{len(kernels)} kernels in {len(steps)} stretches of GPU work; {len(decode)} decode "
          f"steps of {n} kernels summarised")
    walls = [(s[-1][0] + s[-1][1] - s[0][0]) / 1e3 for s in decode]
    busy = [sum(k[1] for k in s) / 1e3 for s in decode]
    print(f"step: {statistics.mean(walls):.1f} us first start to last end "
          f"(min {min(walls):.1f}), kernel durations summed {statistics.mean(busy):.1f} us")
    per = collections.OrderedDict()
    for s in decode:
        prev_end = None
        for start, dur, name in s:
            e = per.setdefault(name, {"n": 0, "dur": [], "gap": []})
            e["n"] += 1
            e["dur"].append(dur / 1e3)
            if prev_end is not None:
                e["gap"].append((start - prev_end) / 1e3)
            prev_end = start + dur
    rows = sorted(per.items(), key=lambda kv: -sum(kv[1]["dur"]))[:a.top]
    print(f"  {'kernel [grid x]':<40} {'per step':>8} {'mean us':>8} {'us/step':>8} {'gap us':>7}")
    for name, e in rows:
        gap = statistics.mean(e["gap"]) if e["gap"] else float("nan")
        print(f"  {name[:40]:<40} {e['n'] / len(decode):>8.1f} {statistics.mean(e['dur']):>8.2f} "
              f"{sum(e['dur']) / len(decode):>8.1f} {gap:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
