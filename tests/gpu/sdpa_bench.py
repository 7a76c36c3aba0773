#!/usr/bin/env python3
"""PyTorch scaled_dot_product_attention decode on the shapes of tests/gpu/attention_bench.

bf16, head_dim 128 (or --head-dim 64), 32 query heads / 8 KV heads, one query token per
sequence, KV contiguous [batch, kv_heads, tokens, head_dim] per sequence. GQA through
enable_gqa=True (PyTorch >= 2.5; older versions fall back to repeat_interleave of K/V to 32
heads, which the output says).
Timed like attention_bench: a CUDA graph of back-to-back calls cycling over copies of K/V that
add up to >= 512 MiB (so no call reads from L2), median over several replays.

  sdpa_bench.py [--csv FILE] [--ours attention_bench.csv] [--quick] [--head-dim 64|128]
                [--tokens N,N,...] [--batches N,N,...]
  sdpa_bench.py --summary --ours attention_bench.csv [--torch sdpa.csv] [--head-dim 64|128]
                (no torch needed)

Exits 0 with a note when torch or a GPU is missing.
"""
import argparse
import csv
import math
import os
import statistics
import sys

Q_HEADS, KV_HEADS, DIM = 32, 8, 128
ROTATE_BYTES = 512 << 20
TOKENS = [4096, 8192, 32768, 65536, 131072, 262144]
BATCHES = [1, 4, 16]


def kv_bytes(batch, tokens):
    return batch * tokens * KV_HEADS * DIM * 2 * 2


def int_list(text):
    try:
        vals = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}")
    if not vals or min(vals) <= 0:
        raise argparse.ArgumentTypeError(f"values must be positive: {text!r}")
    return vals


def read_csv(path):
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        return {(int(r["tokens"]), int(r["batch"])): r for r in csv.DictReader(f)}


def _f(row, key):
    try:
        return float(row[key]) if row and row.get(key) not in (None, "") else math.nan
    except ValueError:
        return math.nan


def print_side_by_side(ours, torch_rows):
    """ours (attention_bench.csv) beside torch; frac = ours GB/s / pure-read GB/s of the same
    bytes (same run); D2D = cudaMemcpy GB/s counting read + write; variant columns in ms."""
    variants = []
    for o in ours.values():
        variants = [k[:-3] for k in o if k.endswith("_ms") and k != "ours_ms"]
        break
    print(f"{'tokens':>7} {'batch':>5} {'KV MiB':>7} {'ours ms':>8} {'GB/s':>6} "
          f"{'read GB/s':>9} {'frac':>6} {'D2D GB/s':>8} | {'torch ms':>8} {'torch GB/s':>10} "
          f"{'torch/ours':>10}" + ("  | " + " ".join(f"{v:>8}" for v in variants)
                                  if variants else ""))
    for key in sorted(set(ours) | set(torch_rows)):
        o, t = ours.get(key), torch_rows.get(key)
        nbytes = kv_bytes(key[1], key[0])
        ours_ms = _f(o, "ours_ms")
        gbps = _f(o, "ours_gbps")
        read = _f(o, "read_gbps")
        frac = gbps / read if read == read else math.nan
        copy = _f(o, "copy_gbps")
        torch_ms = _f(t, "torch_ms")
        torch_gbps = nbytes / (torch_ms * 1e6) if torch_ms == torch_ms else math.nan
        ratio = torch_ms / ours_ms if ours_ms == ours_ms and torch_ms == torch_ms else math.nan
        line = (f"{key[0]:>7} {key[1]:>5} {nbytes / 2**20:>7.0f} {ours_ms:>8.4f} {gbps:>6.0f} "
                f"{read:>9.0f} {frac:>6.3f} {copy:>8.0f} | {torch_ms:>8.4f} {torch_gbps:>10.0f} "
                f"{ratio:>10.2f}")
        if variants:
            line += "  | " + " ".join(f"{_f(o, v + '_ms'):>8.4f}" for v in variants)
            line += f"  maxdiff {_f(o, 'maxdiff'):.1e}"
        print(line)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv")
    ap.add_argument("--ours")
    ap.add_argument("--torch")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--summary", action="store_true")
    ap.add_argument("--head-dim", type=int, choices=[64, 128], default=128)
    ap.add_argument("--tokens", type=int_list)
    ap.add_argument("--batches", type=int_list)
    args = ap.parse_args()
    global DIM
    DIM = args.head_dim
    if args.summary:
        print_side_by_side(read_csv(args.ours), read_csv(args.torch))
        return 0

    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("sdpa_bench: skipped: torch is not installed")
        return 0
    if not torch.cuda.is_available():
        print("sdpa_bench: skipped: no CUDA device visible to torch")
        return 0
    dev = torch.device("cuda")
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name(0)}, head_dim {DIM}")
    tokens_list, batches = (TOKENS, BATCHES) if not args.quick else ([4096, 32768], [1, 4])
    tokens_list = args.tokens or tokens_list
    batches = args.batches or batches

    def sdpa(q, k, v, gqa):
        if gqa == "enable_gqa":
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k.repeat_interleave(Q_HEADS // KV_HEADS, 1),
                                              v.repeat_interleave(Q_HEADS // KV_HEADS, 1))

    gqa_mode = "enable_gqa"
    try:
        t = torch.zeros(1, Q_HEADS, 1, DIM, device=dev, dtype=torch.bfloat16)
        kk = torch.zeros(1, KV_HEADS, 64, DIM, device=dev, dtype=torch.bfloat16)
        sdpa(t, kk, kk, gqa_mode)
    except (TypeError, RuntimeError) as e:
        gqa_mode = "repeat_interleave"
        print(f"enable_gqa unavailable ({type(e).__name__}): K/V repeat_interleave'd per call "
              "(its copy is timed too)")
    print(f"GQA mode: {gqa_mode}; backend: PyTorch's default dispatch")

    rows = []
    print(f"{'tokens':>7} {'batch':>5} {'KV MiB':>8} {'torch ms':>9} {'GB/s':>7}")
    for tokens in tokens_list:
        for batch in batches:
            nbytes = kv_bytes(batch, tokens)
            reps = max(1, -(-ROTATE_BYTES // nbytes))
            torch_ms = None
            note = ""
            g = k = v = q = run = None
            try:
                k = torch.randn(reps, batch, KV_HEADS, tokens, DIM, device=dev,
                                dtype=torch.bfloat16)
                v = torch.randn_like(k)
                q = torch.randn(batch, Q_HEADS, 1, DIM, device=dev, dtype=torch.bfloat16)
                iters = max(reps, min(200, (8 << 30) // nbytes))
                runs = 3 if args.quick else 7
                for i in range(reps):  # warm-up (and kernel selection) outside the graph
                    sdpa(q, k[i], v[i], gqa_mode)
                torch.cuda.synchronize()
                try:
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        for i in range(iters):
                            sdpa(q, k[i % reps], v[i % reps], gqa_mode)
                    run = g.replay
                except RuntimeError as e:  # not capturable: time eagerly
                    note = f"eager ({type(e).__name__})"

                    def run():
                        for i in range(iters):
                            sdpa(q, k[i % reps], v[i % reps], gqa_mode)
                run()
                torch.cuda.synchronize()
                times = []
                for _ in range(runs):
                    a = torch.cuda.Event(enable_timing=True)
                    b = torch.cuda.Event(enable_timing=True)
                    a.record()
                    run()
                    b.record()
                    b.synchronize()
                    times.append(a.elapsed_time(b) / iters)
                torch_ms = statistics.median(times)
            except torch.cuda.OutOfMemoryError:
                note = "out of memory"
            g = k = v = q = run = None
            torch.cuda.empty_cache()
            gbps = nbytes / (torch_ms * 1e6) if torch_ms else math.nan
            ms_txt = f"{torch_ms:.4f}" if torch_ms else "-"
            print(f"{tokens:>7} {batch:>5} {nbytes / 2**20:>8.0f} {ms_txt:>9} {gbps:>7.0f} {note}",
                  flush=True)
            rows.append({"tokens": tokens, "batch": batch,
                         "torch_ms": f"{torch_ms:.5f}" if torch_ms else "",
                         "gqa": gqa_mode, "note": note})
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["tokens", "batch", "torch_ms", "gqa", "note"])
            w.writeheader()
            w.writerows(rows)
    if args.ours:
        print()
        print_side_by_side(read_csv(args.ours),
                           {(r["tokens"], r["batch"]): r for r in rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
