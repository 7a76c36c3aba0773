#!/usr/bin/env python3
"""Writes the tiny random-weight models the loader tests read, in every format we load.

Usage: make_test_models.py OUT_DIR [SHARED_DIR]

One set of weights (fixed seed) is written as a llama2.c checkpoint, as GGUF files (with
PyPI's `gguf`, llama.cpp's own writer and quantisers, so our reader is checked against a
writer we did not write) and as Hugging Face safetensors directories (one file and a sharded
index). A float64 NumPy forward pass with Hugging Face semantics writes the reference logits
every format must reproduce. Weights are rounded to values that fp16 and bf16 hold exactly,
so the F16/BF16 files describe the very same model.

make_mla_models.py then adds the DeepSeek V2/V3 (MLA + MoE) models.

Also written: each ggml type the loader dequantises next to gguf-py's own dequantisation of
it (Q4_K and Q6_K, which gguf-py cannot quantise, from random well-formed blocks), and a few
broken files for the error tests.
"""
import json
import os
import struct
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT
from safetensors.numpy import save_file

import make_mla_models  # same folder: the DeepSeek models, and exact_weights
from make_mla_models import exact_weights

SEED = 20261125
# Inner dimensions are multiples of 256 so that every quantised type (K-quants use 256-element
# super-blocks along a row) can hold every matrix.
DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB, SEQ = 256, 512, 2, 4, 2, 512, 128
HD = DIM // HEADS
EPS = 1e-5
PROMPT = [1, 317, 45, 290, 7, 411, 99, 260, 301, 18, 502, 263, 77, 480, 3, 259, 345, 128, 64, 33]


def make_weights(rng, qwen2):
    w = {"embed": exact_weights(rng, (VOCAB, DIM), 1.0), "layers": []}
    for _ in range(LAYERS):
        lw = {
            "attn_norm": exact_weights(rng, (DIM,), 0.2, 1.0),
            "wq": exact_weights(rng, (HEADS * HD, DIM), DIM ** -0.5),
            "wk": exact_weights(rng, (KV_HEADS * HD, DIM), DIM ** -0.5),
            "wv": exact_weights(rng, (KV_HEADS * HD, DIM), DIM ** -0.5),
            "wo": exact_weights(rng, (DIM, HEADS * HD), DIM ** -0.5),
            "ffn_norm": exact_weights(rng, (DIM,), 0.2, 1.0),
            "w1": exact_weights(rng, (HIDDEN, DIM), DIM ** -0.5),
            "w2": exact_weights(rng, (DIM, HIDDEN), HIDDEN ** -0.5),
            "w3": exact_weights(rng, (HIDDEN, DIM), DIM ** -0.5),
        }
        if qwen2:
            lw["bq"] = exact_weights(rng, (HEADS * HD,), 0.5)
            lw["bk"] = exact_weights(rng, (KV_HEADS * HD,), 0.5)
            lw["bv"] = exact_weights(rng, (KV_HEADS * HD,), 0.5)
        w["layers"].append(lw)
    w["final_norm"] = exact_weights(rng, (DIM,), 0.2, 1.0)
    w["lm_head"] = None if qwen2 else exact_weights(rng, (VOCAB, DIM), DIM ** -0.5)
    return w


def to_interleaved(m, n_heads):
    """Hugging Face q/k rows (rotate-half pairs (i, i + hd/2)) -> the interleaved pairs
    (2i, 2i + 1) of llama2.c and GGUF `llama` files: llama.cpp's converter permutation."""
    return m.reshape(n_heads, 2, m.shape[0] // n_heads // 2, *m.shape[1:]).swapaxes(1, 2).reshape(
        m.shape)


def reference_logits(w, theta):
    """Float64 forward pass with Hugging Face semantics (rotate-half RoPE on HF weights)."""
    f = lambda a: np.asarray(a, dtype=np.float64)
    T = len(PROMPT)
    x = f(w["embed"])[PROMPT]
    pos = np.arange(T, dtype=np.float64)
    inv = 1.0 / theta ** (np.arange(0, HD, 2, dtype=np.float64) / HD)
    ang = np.outer(pos, inv)
    cos = np.concatenate([np.cos(ang)] * 2, axis=1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, axis=1)[:, None, :]

    def rope(t):
        half = np.concatenate([-t[..., HD // 2:], t[..., :HD // 2]], axis=-1)
        return t * cos + half * sin

    def rms(v, g):
        return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + EPS) * f(g)

    mask = np.triu(np.full((T, T), -np.inf), 1)
    for lw in w["layers"]:
        h = rms(x, lw["attn_norm"])
        q = h @ f(lw["wq"]).T + (f(lw["bq"]) if "bq" in lw else 0)
        k = h @ f(lw["wk"]).T + (f(lw["bk"]) if "bk" in lw else 0)
        v = h @ f(lw["wv"]).T + (f(lw["bv"]) if "bv" in lw else 0)
        q = rope(q.reshape(T, HEADS, HD))
        k = rope(k.reshape(T, KV_HEADS, HD))
        v = v.reshape(T, KV_HEADS, HD)
        out = np.zeros((T, HEADS, HD))
        for hh in range(HEADS):
            kv = hh // (HEADS // KV_HEADS)
            s = q[:, hh, :] @ k[:, kv, :].T / np.sqrt(HD) + mask
            p = np.exp(s - s.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            out[:, hh, :] = p @ v[:, kv, :]
        x = x + out.reshape(T, HEADS * HD) @ f(lw["wo"]).T
        h = rms(x, lw["ffn_norm"])
        g = h @ f(lw["w1"]).T
        x = x + ((g / (1.0 + np.exp(-g))) * (h @ f(lw["w3"]).T)) @ f(lw["w2"]).T
    h = rms(x, w["final_norm"])
    head = w["lm_head"] if w["lm_head"] is not None else w["embed"]
    return h @ f(head).T


def write_llama2c(path, w, seq=SEQ, heads=HEADS, kv_heads=KV_HEADS):
    """llama2.c checkpoint: interleaved q/k, negative vocab = separate classifier."""
    tied = w["lm_head"] is None
    dim, hidden = w["embed"].shape[1], w["layers"][0]["w1"].shape[0]
    hd = dim // heads
    with open(path, "wb") as out:
        out.write(struct.pack("<7i", dim, hidden, len(w["layers"]), heads, kv_heads,
                              VOCAB if tied else -VOCAB, seq))
        out.write(w["embed"].tobytes())
        layers = w["layers"]
        for key, fn in [("attn_norm", None), ("wq", heads), ("wk", kv_heads), ("wv", None),
                        ("wo", None), ("ffn_norm", None), ("w1", None), ("w2", None),
                        ("w3", None)]:
            for lw in layers:
                m = lw[key] if fn is None else to_interleaved(lw[key], fn)
                out.write(np.ascontiguousarray(m).tobytes())
        out.write(w["final_norm"].tobytes())
        out.write(np.zeros(seq * hd, dtype=np.float32).tobytes())  # old RoPE tables, skipped
        if not tied:
            out.write(w["lm_head"].tobytes())


def read_llama2c_vocab(shared):
    path = os.path.join(shared, "models", "stories260K", "tok512.bin")
    b = open(path, "rb").read()
    off, toks, scores = 4, [], []
    for _ in range(VOCAB):
        s, n = struct.unpack_from("<fi", b, off)
        off += 8
        toks.append(b[off:off + n].decode("utf-8"))
        scores.append(s)
        off += n
    return toks, scores


def write_gguf(path, arch, w, wtype, vocab=None, extra=None):
    interleave = arch == "llama"
    g = gguf.GGUFWriter(path, arch)
    g.add_block_count(LAYERS)
    g.add_context_length(SEQ)
    g.add_embedding_length(DIM)
    g.add_feed_forward_length(HIDDEN)
    g.add_head_count(HEADS)
    g.add_head_count_kv(KV_HEADS)
    g.add_layer_norm_rms_eps(EPS)
    g.add_rope_freq_base(THETA[arch])
    g.add_rope_dimension_count(HD)
    if vocab is not None:
        toks, scores = vocab
        g.add_tokenizer_model("llama")
        g.add_token_list([t.replace(" ", "\u2581") for t in toks])
        g.add_token_scores(scores)
        types = [gguf.TokenType.NORMAL] * len(toks)
        types[0] = gguf.TokenType.UNKNOWN
        types[1] = types[2] = gguf.TokenType.CONTROL
        for i in range(3, 259):
            types[i] = gguf.TokenType.BYTE
        g.add_token_types(types)
        g.add_bos_token_id(1)
        g.add_eos_token_id(2)
        g.add_unk_token_id(0)
        g.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for k, v in (extra or {}).items():
        v(g)

    def put(name, m, quantise=True):
        m = np.ascontiguousarray(m, dtype=np.float32)
        t = wtype if (quantise and m.ndim == 2) else QT.F32
        if t == QT.F32:
            g.add_tensor(name, m)
        elif t == QT.F16:
            g.add_tensor(name, m.astype(np.float16))
        else:
            g.add_tensor(name, gguf.quants.quantize(m, t), raw_dtype=t)

    put("token_embd.weight", w["embed"])
    for i, lw in enumerate(w["layers"]):
        b = f"blk.{i}."
        put(b + "attn_norm.weight", lw["attn_norm"])
        put(b + "attn_q.weight", to_interleaved(lw["wq"], HEADS) if interleave else lw["wq"])
        put(b + "attn_k.weight", to_interleaved(lw["wk"], KV_HEADS) if interleave else lw["wk"])
        put(b + "attn_v.weight", lw["wv"])
        if "bq" in lw:
            put(b + "attn_q.bias", lw["bq"])
            put(b + "attn_k.bias", lw["bk"])
            put(b + "attn_v.bias", lw["bv"])
        put(b + "attn_output.weight", lw["wo"])
        put(b + "ffn_norm.weight", lw["ffn_norm"])
        put(b + "ffn_gate.weight", lw["w1"])
        put(b + "ffn_down.weight", lw["w2"])
        put(b + "ffn_up.weight", lw["w3"])
    put("output_norm.weight", w["final_norm"])
    if w["lm_head"] is not None:
        put("output.weight", w["lm_head"])
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()


def hf_tensors(w, dtype):
    t = {"model.embed_tokens.weight": w["embed"], "model.norm.weight": w["final_norm"]}
    for i, lw in enumerate(w["layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = lw["attn_norm"]
        t[p + "post_attention_layernorm.weight"] = lw["ffn_norm"]
        for ours, theirs in [("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"),
                             ("wo", "o_proj")]:
            t[p + "self_attn." + theirs + ".weight"] = lw[ours]
        for ours, theirs in [("bq", "q_proj"), ("bk", "k_proj"), ("bv", "v_proj")]:
            if ours in lw:
                t[p + "self_attn." + theirs + ".bias"] = lw[ours]
        t[p + "mlp.gate_proj.weight"] = lw["w1"]
        t[p + "mlp.down_proj.weight"] = lw["w2"]
        t[p + "mlp.up_proj.weight"] = lw["w3"]
    if w["lm_head"] is not None:
        t["lm_head.weight"] = w["lm_head"]
    conv = {"F32": lambda a: a, "F16": lambda a: a.astype(np.float16)}
    return {k: np.ascontiguousarray(conv[dtype](v)) for k, v in t.items()}


def bf16_tensors(t):
    """safetensors.numpy cannot write bfloat16 (NumPy has no such dtype): write the header
    and the upper halves of the float32 bits ourselves."""
    header, blobs, off = {}, [], 0
    for k in sorted(t):
        b = (t[k].astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[k] = {"dtype": "BF16", "shape": list(t[k].shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def write_hf(dirname, arch, w, dtype="F32", shards=1):
    os.makedirs(dirname, exist_ok=True)
    cfg = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": arch, "hidden_size": DIM, "intermediate_size": HIDDEN,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": SEQ,
        "rms_norm_eps": EPS, "rope_theta": THETA[arch], "hidden_act": "silu",
        "tie_word_embeddings": w["lm_head"] is None, "rope_scaling": None,
        "torch_dtype": {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype],
    }
    if arch == "qwen2":
        cfg["use_sliding_window"] = False
    with open(os.path.join(dirname, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    t = hf_tensors(w, "F32" if dtype == "BF16" else dtype)
    if dtype == "BF16":
        with open(os.path.join(dirname, "model.safetensors"), "wb") as f:
            f.write(bf16_tensors(t))
        return
    if shards == 1:
        save_file(t, os.path.join(dirname, "model.safetensors"))
        return
    names = sorted(t)
    index = {"metadata": {}, "weight_map": {}}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: t[n] for n in names[s::shards]}
        save_file(part, os.path.join(dirname, fname))
        index["weight_map"].update({n: fname for n in part})
    with open(os.path.join(dirname, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=1)


THETA = {"llama": 10000.0, "qwen2": 1000000.0}


def write_quant_checks(out, rng):
    """quant_TYPE.gguf holds one [8, 512] tensor 'w' of that type; quant_TYPE.f32 is gguf-py's
    dequantisation of it (raw little-endian float32)."""
    rows, cols = 8, 512
    src = (rng.standard_normal((rows, cols)) * 0.7).astype(np.float32)
    for t in [QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q6_K]:
        block, nbytes = gguf.GGML_QUANT_SIZES[t]
        if t in (QT.Q4_K, QT.Q6_K):
            # gguf-py has no quantiser for these: random bytes make well-formed blocks once the
            # fp16 scales are set to finite values.
            raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
            scales = (rng.random((rows, cols // block, 2)) * 0.02 + 0.001).astype(np.float16)
            if t == QT.Q4_K:  # d, dmin lead the block
                raw[:, :, 0:4] = scales.view(np.uint8).reshape(rows, cols // block, 4)
            else:  # Q6_K: ql[128], qh[64], int8 scales[16], then fp16 d
                raw[:, :, nbytes - 2:] = scales[:, :, :1].view(np.uint8).reshape(
                    rows, cols // block, 2)
            data = raw.reshape(rows, cols // block * nbytes)
        elif t == QT.F16:
            data = src.astype(np.float16)
        else:
            data = gguf.quants.quantize(src, t)
        ref = gguf.quants.dequantize(data, t).astype(np.float32)
        assert ref.shape == (rows, cols) and np.all(np.isfinite(ref)), t.name
        g = gguf.GGUFWriter(os.path.join(out, f"quant_{t.name}.gguf"), "llama")
        if t == QT.F16:
            g.add_tensor("w", data)
        else:
            g.add_tensor("w", data, raw_dtype=t)
        g.write_header_to_file()
        g.write_kv_data_to_file()
        g.write_tensors_to_file()
        g.close()
        ref.tofile(os.path.join(out, f"quant_{t.name}.f32"))


def main():
    out = sys.argv[1]
    shared = sys.argv[2] if len(sys.argv) > 2 else os.path.join(
        os.path.dirname(__file__), "..", "..", "..", "shared")
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(SEED)
    llama = make_weights(rng, qwen2=False)
    qwen = make_weights(rng, qwen2=True)
    vocab = read_llama2c_vocab(shared)

    write_llama2c(os.path.join(out, "llama.bin"), llama)
    for t in [QT.F32, QT.F16, QT.BF16]:
        write_gguf(os.path.join(out, f"llama_{t.name}.gguf"), "llama", llama, t, vocab)
    write_gguf(os.path.join(out, "llama_Q8_0.gguf"), "llama", llama, QT.Q8_0, vocab)
    write_hf(os.path.join(out, "llama_hf"), "llama", llama)
    write_hf(os.path.join(out, "llama_hf_sharded"), "llama", llama, shards=3)
    write_hf(os.path.join(out, "llama_hf_f16"), "llama", llama, dtype="F16")
    write_hf(os.path.join(out, "llama_hf_bf16"), "llama", llama, dtype="BF16")
    write_gguf(os.path.join(out, "qwen2_F32.gguf"), "qwen2", qwen, QT.F32)
    write_hf(os.path.join(out, "qwen2_hf"), "qwen2", qwen)

    ref = {"llama": reference_logits(llama, THETA["llama"]),
           "qwen2": reference_logits(qwen, THETA["qwen2"])}
    for k, v in ref.items():
        v.astype(np.float64).tofile(os.path.join(out, f"{k}_logits.f64"))
    with open(os.path.join(out, "prompt.txt"), "w") as f:
        f.write(" ".join(map(str, PROMPT)) + "\n")

    write_quant_checks(out, rng)

    # A small model with a long context for the Helix long-prompt test (20K-token prompts).
    lr = np.random.default_rng(SEED + 1)
    long_w = {"embed": exact_weights(lr, (VOCAB, 64), 1.0), "final_norm": exact_weights(
        lr, (64,), 0.2, 1.0), "lm_head": None, "layers": [{
            "attn_norm": exact_weights(lr, (64,), 0.2, 1.0),
            "wq": exact_weights(lr, (64, 64), 0.5), "wk": exact_weights(lr, (32, 64), 0.5),
            "wv": exact_weights(lr, (32, 64), 0.125), "wo": exact_weights(lr, (64, 64), 0.125),
            "ffn_norm": exact_weights(lr, (64,), 0.2, 1.0),
            "w1": exact_weights(lr, (128, 64), 0.125), "w2": exact_weights(lr, (64, 128), 0.09),
            "w3": exact_weights(lr, (128, 64), 0.125)} for _ in range(2)]}
    write_llama2c(os.path.join(out, "long.bin"), long_w, seq=32768, heads=4, kv_heads=2)

    # Broken inputs for the error tests.
    good = open(os.path.join(out, "llama_F32.gguf"), "rb").read()
    open(os.path.join(out, "truncated.gguf"), "wb").write(good[: len(good) // 2])
    open(os.path.join(out, "header_only.gguf"), "wb").write(good[:40])
    write_gguf(os.path.join(out, "unsupported_type.gguf"), "llama", llama, QT.Q5_0, vocab)
    g = gguf.GGUFWriter(os.path.join(out, "unsupported_arch.gguf"), "gptneox")
    g.add_tensor("w", np.zeros((4, 32), dtype=np.float32))
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()
    bad = os.path.join(out, "hf_truncated")
    write_hf(bad, "llama", llama)
    st = open(os.path.join(bad, "model.safetensors"), "rb").read()
    open(os.path.join(bad, "model.safetensors"), "wb").write(st[: len(st) - 1000])
    # Headers that describe less than the file holds: a tensor count one short (every tensor
    # would be read from the wrong place), a block_count one short (a layer dropped).
    n_tensors = struct.unpack_from("<Q", good, 8)[0]
    open(os.path.join(out, "short_count.gguf"), "wb").write(
        good[:8] + struct.pack("<Q", n_tensors - 1) + good[16:])
    key = b"llama.block_count"
    at = good.index(key) + len(key)
    vtype = struct.unpack_from("<I", good, at)[0]
    fmt = {4: "<I", 5: "<i", 10: "<Q", 11: "<q"}[vtype]  # GGUF uint32, int32, uint64, int64
    layers = struct.unpack_from(fmt, good, at + 4)[0]
    fewer = bytearray(good)
    struct.pack_into(fmt, fewer, at + 4, layers - 1)
    open(os.path.join(out, "fewer_layers.gguf"), "wb").write(bytes(fewer))
    # An embedded vocabulary whose BOS id is past its tokens.
    key = b"tokenizer.ggml.bos_token_id"
    at = good.index(key) + len(key)
    fmt = {4: "<I", 5: "<i", 10: "<Q", 11: "<q"}[struct.unpack_from("<I", good, at)[0]]
    bad_bos = bytearray(good)
    struct.pack_into(fmt, bad_bos, at + 4, 100000)
    open(os.path.join(out, "bad_bos.gguf"), "wb").write(bytes(bad_bos))
    bad = os.path.join(out, "hf_fewer_layers")
    write_hf(bad, "llama", llama)
    cfg = json.load(open(os.path.join(bad, "config.json")))
    cfg["num_hidden_layers"] -= 1
    json.dump(cfg, open(os.path.join(bad, "config.json"), "w"))
    # An untied output projection (tie_word_embeddings false) whose tensor is missing.
    bad = os.path.join(out, "hf_no_lm_head")
    no_head = dict(llama)
    no_head["lm_head"] = None
    write_hf(bad, "llama", no_head)
    cfg = json.load(open(os.path.join(bad, "config.json")))
    cfg["tie_word_embeddings"] = False
    json.dump(cfg, open(os.path.join(bad, "config.json"), "w"))
    bad = os.path.join(out, "hf_bad_arch")
    write_hf(bad, "llama", llama)
    cfg = json.load(open(os.path.join(bad, "config.json")))
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    json.dump(cfg, open(os.path.join(bad, "config.json"), "w"))
    # The DeepSeek V2/V3 (MLA + MoE) models and their float64 references.
    make_mla_models.write_all(out)
    print(f"make_test_models: wrote {len(os.listdir(out))} entries to {out}")


if __name__ == "__main__":
    main()
