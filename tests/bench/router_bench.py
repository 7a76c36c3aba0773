#!/usr/bin/env python3
"""Load generator for the router's OpenAI endpoint (standard library only): at each
concurrency, that many clients stream /v1/completions (greedy, ignore_eos, fixed length) for
a number of rounds; prints time to first token and inter-token latency (p50/p99, ms) and
output tokens/s.

  tests/bench/router_bench.py --url http://127.0.0.1:8000 --model NAME
      [--concurrency 1,4,16,64] [--tokens 64] [--rounds 2] [--prompt TEXT]
"""
import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def one(url, model, prompt, tokens, out):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": tokens,
                       "temperature": 0, "ignore_eos": True, "stream": True})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]}")
    stamps = []
    buf = b""
    while True:
        chunk = r.read1(65536) if hasattr(r, "read1") else r.read(1)
        if not chunk:
            break
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            if event == b"data: [DONE]":
                continue
            data = json.loads(event[len(b"data: "):])
            if data.get("choices") and data["choices"][0].get("finish_reason") is None:
                stamps.append(time.perf_counter())
    conn.close()
    out.append((t0, stamps))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", required=True)
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt", default="Once upon a time, in a small village,")
    a = ap.parse_args()
    print(f"# router_bench: {a.url} model {a.model}, {a.tokens} tokens per request, "
          f"{a.rounds} rounds")
    print(f"{'conc':>5} {'ttft_p50':>9} {'ttft_p99':>9} {'itl_p50':>8} {'itl_p99':>8} "
          f"{'tokens/s':>9}")
    for conc in [int(c) for c in a.concurrency.split(",")]:
        one(a.url, a.model, a.prompt, 4, [])  # warm-up
        traces = []
        t0 = time.perf_counter()
        for _ in range(a.rounds):
            th = [threading.Thread(target=one, args=(a.url, a.model, a.prompt, a.tokens, traces))
                  for _ in range(conc)]
            for t in th:
                t.start()
            for t in th:
                t.join()
        wall = time.perf_counter() - t0
        ttft = [(s[0] - start) * 1e3 for start, s in traces if s]
        itl = [(b - a_) * 1e3 for _, s in traces for a_, b in zip(s, s[1:])]
        n = sum(len(s) for _, s in traces)
        print(f"{conc:5d} {pct(ttft, .5):9.2f} {pct(ttft, .99):9.2f} {pct(itl, .5):8.2f} "
              f"{pct(itl, .99):8.2f} {n / wall:9.1f}", flush=True)


if __name__ == "__main__":
    main()
