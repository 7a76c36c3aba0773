#!/usr/bin/env python3
"""Writes a random-weight model of a given Llama shape in llama2.c format (float32, tied
classifier) plus a llama2.c tokenizer of placeholder pieces, for decode_bench on a machine
that has only numpy (the lent GPU machine). The weights are random (fixed seed): good for
timing, not for text.

    make_bench_model.py OUT_DIR [--shape smollm2-135m|llama3-1b] [--seq 40960]

Writes OUT_DIR/model.bin and OUT_DIR/tok.bin. Shapes (dim, hidden, layers, heads, kv_heads,
vocab): smollm2-135m = SmolLM2-135M-Instruct's (576, 1536, 30, 9, 3, 49152);
llama3-1b = Llama-3.2-1B's (2048, 8192, 16, 32, 8, 128256)."""
import argparse
import os
import struct

import numpy as np

SHAPES = {
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152),
    "llama3-1b": (2048, 8192, 16, 32, 8, 128256),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--seq", type=int, default=40960)
    a = ap.parse_args()
    dim, hidden, layers, heads, kv_heads, vocab = SHAPES[a.shape]
    hd = dim // heads
    os.makedirs(a.out, exist_ok=True)
    rng = np.random.default_rng(7)

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)).astype(
            np.float32)

    with open(os.path.join(a.out, "model.bin"), "wb") as f:
        f.write(struct.pack("<7i", dim, hidden, layers, heads, kv_heads, vocab, a.seq))
        f.write(mat(vocab, dim).tobytes())
        ones = np.ones(dim, dtype=np.float32).tobytes()
        for shape in [None, (heads * hd, dim), (kv_heads * hd, dim), (kv_heads * hd, dim),
                      (dim, heads * hd), None, (hidden, dim), (dim, hidden), (hidden, dim)]:
            for _ in range(layers):
                f.write(ones if shape is None else mat(*shape).tobytes())
        f.write(ones)
        f.write(np.zeros(a.seq * hd, dtype=np.float32).tobytes())  # old RoPE tables (skipped)
    with open(os.path.join(a.out, "tok.bin"), "wb") as f:
        pieces = [f"<t{i}>".encode() for i in range(vocab)]
        f.write(struct.pack("<i", max(len(p) for p in pieces)))
        for i, p in enumerate(pieces):
            f.write(struct.pack("<fi", -float(i), len(p)))
            f.write(p)
    print(f"wrote {a.out}/model.bin ({a.shape}: dim {dim}, hidden {hidden}, {layers} layers, "
          f"{heads}/{kv_heads} heads, vocab {vocab}) and {a.out}/tok.bin")


if __name__ == "__main__":
    main()
