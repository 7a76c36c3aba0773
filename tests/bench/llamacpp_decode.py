#!/usr/bin/env python3
"""llama.cpp's decode throughput on the same protocol as decode_bench (batch 1): a random
prompt of CONTEXT tokens (fixed seed, ids 3..vocab-1) prefilled, then STEPS greedy decode
steps timed one token at a time. Prints one key=value line like decode_bench.

Usage: llamacpp_decode.py MODEL.gguf CONTEXT STEPS THREADS
Needs PyPI's llama-cpp-python (which builds llama.cpp from source).
"""
import sys
import time

import numpy as np
from llama_cpp import Llama


def last_logits(m):
    """The logits llama.cpp computed for the last token of the last eval (the only row
    requested without logits_all)."""
    return np.ctypeslib.as_array(m._ctx.get_logits(), shape=(m.n_vocab(),))


def main():
    model, context, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(
        sys.argv[4])
    m = Llama(model, n_ctx=context + steps + 16, n_threads=threads, n_threads_batch=threads,
              n_batch=512, verbose=False)
    rng = np.random.default_rng(1234)
    prompt = rng.integers(3, m.n_vocab(), size=context).tolist()
    t0 = time.perf_counter()
    m.eval(prompt)
    t1 = time.perf_counter()
    tok = int(np.argmax(last_logits(m)))
    for _ in range(steps - 1):
        m.eval([tok])
        tok = int(np.argmax(last_logits(m)))
    t2 = time.perf_counter()
    print(f"engine=llama.cpp model={model} context={context} batch=1 steps={steps} kv_dtype=f16 "
          f"prefill_s={t1 - t0:.3f} decode_tok_s={(steps - 1) / (t2 - t1):.2f} "
          f"ms_per_step={1e3 * (t2 - t1) / (steps - 1):.3f}")


if __name__ == "__main__":
    main()
