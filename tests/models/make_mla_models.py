#!/usr/bin/env python3
"""Writes two tiny random-weight DeepSeek checkpoints (MLA attention + MoE) and their float64
reference outputs, for the DeepSeek V2/V3 loader and forward tests.

Usage: make_mla_models.py OUT_DIR

Writes, with fixed seeds:
  OUT_DIR/deepseek_v3_tiny/{config.json, model.safetensors}  DeepseekV3ForCausalLM: q_lora
      (q_a_proj, q_a_layernorm, q_b_proj), noaux_tc routing over sigmoid scores with a non-zero
      e_score_correction_bias, norm_topk_prob, routed_scaling_factor 2.5, one dense layer.
  OUT_DIR/deepseek_v2_tiny/{config.json, model.safetensors}  DeepseekV2ForCausalLM: no q_lora
      (q_proj), group_limited_greedy routing over softmax scores, norm_topk_prob false,
      two shared experts, qk_nope_head_dim != v_head_dim.
  OUT_DIR/mla_prompt.txt                the prompt both models are run on (token ids, spaces)
  OUT_DIR/<model>_logits.f64            float64 logits of the prompt, [prompt_len][vocab] raw
                                        little-endian, row-major
  OUT_DIR/<model>_greedy.txt            the 16 token ids the float64 model appends to the prompt
                                        when decoding greedily (prompt not repeated)
All tensors are F32 under Hugging Face's checkpoint names; their values are rounded so that
float16 and bfloat16 hold them exactly.

The reference is a naive, non-absorbed float64 forward pass that follows DeepSeek's own remote
code (modeling_deepseek.py of the DeepSeek-V3 and DeepSeek-V2(-Lite) Hugging Face repositories)
and agrees with transformers' native DeepseekV3 (rope_interleave=True):
  * RMSNorm x * rsqrt(mean(x^2) + eps) * w. q_a_layernorm and kv_a_layernorm are built without an
    eps argument in both codes, so they use the class default 1e-6, not config.rms_norm_eps.
  * q = q_b_proj(q_a_layernorm(q_a_proj(x))) (or q_proj(x)), per head [nope | rope].
    kv_a_proj_with_mqa(x) = [compressed_kv (kv_lora_rank) | k_pe (rope)]; kv_b_proj of the normed
    compressed_kv gives per head [k_nope | v]; the single k_pe is shared by all heads.
  * RoPE pairs: the remote code views the rope part as (d/2, 2), transposes to [even | odd] and
    applies rotate_half with cos = cat(freqs, freqs) (transformers' V3 does the same under
    rope_interleave; its V2 multiplies view_as_complex pairs). Either way pair (x[2i], x[2i+1]) is
    rotated by angle pos * inv_freq[i], i.e. GPT-J-style interleaved RoPE; the remote code leaves
    the result in the permuted [even | odd] order, but that permutation is the same for q and k,
    so q.k is unchanged. rope_check() asserts this equivalence.
  * YaRN: inv_freq blends base^(-2i/d) (extrapolation) and that / factor (interpolation) with the
    mask 1 - clamp((i - low) / (high - low), 0, 1), low = floor, high = ceil of the correction
    dims for beta_fast, beta_slow at original_max_position_embeddings, clamped to [0, d - 1];
    cos and sin are multiplied by mscale(factor, mscale) / mscale(factor, mscale_all_dim), and the
    softmax scale is (nope + rope)^-0.5 * mscale(factor, mscale_all_dim)^2, with
    mscale(s, m) = 0.1 m ln(s) + 1 (1 when s <= 1). (transformers' native DeepseekV2 leaves the
    mscale^2 out of its softmax scale; DeepSeek's V2 remote code, which we follow, has it.)
  * MoE gate: logits in float64, sigmoid or softmax scores.
      noaux_tc: choice = score + e_score_correction_bias; group score = sum of the group's two
        largest choice values; keep the topk_group best groups; the other experts' choice values
        become 0.0 (masked_fill, as the source); pick the top num_experts_per_tok; weights are the
        unbiased scores, divided by their sum + 1e-20 if norm_topk_prob, then (V3) always times
        routed_scaling_factor.
      group_limited_greedy: group score = the group's largest score; keep topk_group groups,
        masked scores 0.0, top-k; weights are those scores. V2's rule: if norm_topk_prob (and
        top_k > 1) divide by the sum + 1e-20 and do NOT scale, else multiply by
        routed_scaling_factor.
    Output = sum_k w_k expert_k(x) + shared_experts(x) (intermediate moe_intermediate_size *
    n_shared_experts). A layer is MoE when layer >= first_k_dense_replace and
    layer % moe_layer_freq == 0, else a dense SwiGLU MLP of intermediate_size.
The script prints, per model, the smallest margins that keep the references unambiguous: top-1
minus top-2 logit over the prompt rows and over the greedy steps, and the smallest gap between
the last chosen and the first rejected group and expert over every token and MoE layer.
"""
import json
import math
import os
import sys

import numpy as np
from safetensors.numpy import save_file

PROMPT = [
    283, 37, 458, 120, 391, 7, 244, 505, 66, 172, 318, 429, 95, 12, 367, 211, 480, 53, 139, 300,
    27, 446, 188, 259, 401, 74, 333, 160, 498, 229, 15, 352, 107, 275, 463, 41, 198, 384, 86, 312,
]
GREEDY_STEPS = 16
LORA_NORM_EPS = 1e-6  # DeepseekV{2,3}RMSNorm's default, used by q_a_layernorm and kv_a_layernorm

V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 512,
    "hidden_size": 256,
    "intermediate_size": 384,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_nextn_predict_layers": 0,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "q_lora_rank": 96,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "n_routed_experts": 16,
    "n_shared_experts": 1,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "ep_size": 1,
    "aux_loss_alpha": 0.001,
    "seq_aux": True,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8},
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "use_cache": True,
    "torch_dtype": "float32",
}

# V2 differs from V3 in the gate and in what DeepSeek-V2 checkpoints look like: no q_lora
# (V2-Lite), softmax scores, group-limited greedy choice (V2), no weight normalisation,
# two shared experts. Head shapes differ on purpose (nope 48 != v 32, 4 heads, k = 3).
# V2-Lite itself has routed_scaling_factor 1.0 (with topk_method greedy, n_group 1) and V2
# 16.0 (group_limited_greedy, n_group 8): we take 3.0 so that the factor is seen at all.
V2_CONFIG = dict(V3_CONFIG)
V2_CONFIG.update({
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": None,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 48,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "n_routed_experts": 16,
    "n_shared_experts": 2,
    "num_experts_per_tok": 3,
    "n_group": 4,
    "topk_group": 2,
    "topk_method": "group_limited_greedy",
    "scoring_func": "softmax",
    "norm_topk_prob": False,
    "routed_scaling_factor": 3.0,
    "rope_scaling": {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
})
del V2_CONFIG["num_nextn_predict_layers"]

# Weight seeds picked (from a few hundred, resp. a few thousand) for the margins main() prints:
# random gates put some token's k-th and (k+1)-th expert within 1e-3 more often than not.
MODELS = [("deepseek_v3_tiny", V3_CONFIG, 20260626), ("deepseek_v2_tiny", V2_CONFIG, 20264923)]


def exact_weights(rng, shape, std, mean=0.0):
    """Random values that float16 and bfloat16 both represent exactly (make_test_models.py uses
    this one too)."""
    w = (rng.standard_normal(shape) * std + mean).astype(np.float32)
    bits = w.view(np.uint32)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round to bf16
    w = bits.view(np.float32).copy()
    w[np.abs(w) < 2.0 ** -12] = 0.0  # below fp16's normal range the mantissa would shrink
    assert np.array_equal(w.astype(np.float16).astype(np.float32), w)
    return w


def is_moe_layer(c, i):
    return (c["n_routed_experts"] is not None and i >= c["first_k_dense_replace"]
            and i % c["moe_layer_freq"] == 0)


def make_weights(c, rng):
    """Hugging Face tensor name -> float32 array. Scales keep activations O(1)."""
    D, H = c["hidden_size"], c["num_attention_heads"]
    nope, rope, vd = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    R, E, V = c["kv_lora_rank"], c["n_routed_experts"], c["vocab_size"]
    norm = lambda n: exact_weights(rng, (n,), 0.2, 1.0)
    lin = lambda o, i, gain=1.0: exact_weights(rng, (o, i), gain * i ** -0.5)
    t = {"model.embed_tokens.weight": exact_weights(rng, (V, D), 1.0)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm(D)
        if c["q_lora_rank"] is None:
            t[p + "self_attn.q_proj.weight"] = lin(H * (nope + rope), D, 1.5)
        else:
            t[p + "self_attn.q_a_proj.weight"] = lin(c["q_lora_rank"], D)
            t[p + "self_attn.q_a_layernorm.weight"] = norm(c["q_lora_rank"])
            t[p + "self_attn.q_b_proj.weight"] = lin(H * (nope + rope), c["q_lora_rank"], 1.5)
        t[p + "self_attn.kv_a_proj_with_mqa.weight"] = lin(R + rope, D, 1.5)
        t[p + "self_attn.kv_a_layernorm.weight"] = norm(R)
        t[p + "self_attn.kv_b_proj.weight"] = lin(H * (nope + vd), R, 1.5)
        t[p + "self_attn.o_proj.weight"] = lin(D, H * vd)
        t[p + "post_attention_layernorm.weight"] = norm(D)
        if not is_moe_layer(c, i):
            F = c["intermediate_size"]
            t[p + "mlp.gate_proj.weight"] = lin(F, D)
            t[p + "mlp.up_proj.weight"] = lin(F, D)
            t[p + "mlp.down_proj.weight"] = lin(D, F)
            continue
        # Gate logits of std ~2 (sigmoid) or ~1.5 (softmax) spread the scores near the top-k cut
        # the most; a larger gain saturates sigmoid and concentrates softmax on one expert.
        t[p + "mlp.gate.weight"] = lin(E, D, 2.0 if c["scoring_func"] == "sigmoid" else 1.5)
        if c["topk_method"] == "noaux_tc":
            # Non-negative, so that the source's masked_fill(0.0) never competes with a chosen
            # expert; about the size of the score differences, so that it changes choices.
            t[p + "mlp.gate.e_score_correction_bias"] = np.abs(exact_weights(rng, (E,), 0.15))
        F = c["moe_intermediate_size"]
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            t[q + "gate_proj.weight"] = lin(F, D)
            t[q + "up_proj.weight"] = lin(F, D)
            t[q + "down_proj.weight"] = lin(D, F)
        Fs = F * c["n_shared_experts"]
        t[p + "mlp.shared_experts.gate_proj.weight"] = lin(Fs, D)
        t[p + "mlp.shared_experts.up_proj.weight"] = lin(Fs, D)
        t[p + "mlp.shared_experts.down_proj.weight"] = lin(D, Fs)
    t["model.norm.weight"] = norm(D)
    t["lm_head.weight"] = lin(V, D, 3.0)
    return t


def yarn_mscale(scale, m):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def rope_tables(c, positions):
    """cos, sin of shape [T, rope/2] (one angle per interleaved pair), yarn mscale applied, and
    the softmax scale."""
    d, base = c["qk_rope_head_dim"], float(c["rope_theta"])
    inv = 1.0 / base ** (np.arange(0, d, 2, dtype=np.float64) / d)
    scale = (c["qk_nope_head_dim"] + d) ** -0.5
    rs, attn = c.get("rope_scaling"), 1.0
    if rs is not None:
        assert rs["type"] == "yarn"
        f, orig = rs["factor"], rs["original_max_position_embeddings"]

        def corr_dim(rot):
            return d * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(corr_dim(rs["beta_fast"])), 0)
        high = min(math.ceil(corr_dim(rs["beta_slow"])), d - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
        extra = 1.0 - ramp  # 1: keep the original frequency, 0: interpolate by factor
        inv = inv / f * (1.0 - extra) + inv * extra
        attn = yarn_mscale(f, rs.get("mscale", 1)) / yarn_mscale(f, rs.get("mscale_all_dim", 0))
        if rs.get("mscale_all_dim", 0):
            scale *= yarn_mscale(f, rs["mscale_all_dim"]) ** 2
    ang = np.outer(np.asarray(positions, dtype=np.float64), inv)
    return np.cos(ang) * attn, np.sin(ang) * attn, scale


def rope(x, cos, sin):
    """GPT-J-style: pair (x[2i], x[2i+1]) rotated by angle i. x: [T, ..., d]; cos/sin: [T, d/2]."""
    shape = (cos.shape[0],) + (1,) * (x.ndim - 2) + (cos.shape[1],)
    cos, sin = cos.reshape(shape), sin.reshape(shape)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = b * cos + a * sin
    return out


def rope_remote_style(x, cos, sin):
    """DeepSeek remote code: de-interleave to [even | odd], then rotate_half with cat(f, f)."""
    shape = (cos.shape[0],) + (1,) * (x.ndim - 2) + (cos.shape[1],)
    c2 = np.concatenate([cos, cos], axis=-1).reshape(shape[:-1] + (-1,))
    s2 = np.concatenate([sin, sin], axis=-1).reshape(shape[:-1] + (-1,))
    d = x.shape[-1]
    y = x.reshape(x.shape[:-1] + (d // 2, 2)).swapaxes(-1, -2).reshape(x.shape)
    half = np.concatenate([-y[..., d // 2:], y[..., :d // 2]], axis=-1)
    return y * c2 + half * s2


def rope_check(c):
    """The interleaved rotation and the remote code's permuted one give the same q.k."""
    rng = np.random.default_rng(1)
    T, d = 24, c["qk_rope_head_dim"]
    q, k = rng.standard_normal((T, 3, d)), rng.standard_normal((T, d))
    cos, sin, _ = rope_tables(c, np.arange(T) * 37)
    s1 = np.einsum("thd,sd->hts", rope(q, cos, sin), rope(k, cos, sin))
    s2 = np.einsum("thd,sd->hts", rope_remote_style(q, cos, sin), rope_remote_style(k, cos, sin))
    assert np.allclose(s1, s2, rtol=0, atol=1e-12)


def rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def swiglu(x, w, p):
    g = x @ w[p + "gate_proj.weight"].T
    act = (g / (1.0 + np.exp(-g))) * (x @ w[p + "up_proj.weight"].T)
    return act @ w[p + "down_proj.weight"].T


def route(c, logits, bias, stats):
    """Expert ids [T, k] and weights [T, k] from the gate logits [T, E] (float64)."""
    T, E = logits.shape
    G, K, KG = c["n_group"], c["num_experts_per_tok"], c["topk_group"]
    if c["scoring_func"] == "sigmoid":
        scores = 1.0 / (1.0 + np.exp(-logits))
    elif c["scoring_func"] == "softmax":
        z = np.exp(logits - logits.max(axis=-1, keepdims=True))
        scores = z / z.sum(axis=-1, keepdims=True)
    else:
        raise ValueError(c["scoring_func"])
    method = c["topk_method"]
    choice = scores + bias if method == "noaux_tc" else scores
    grouped = np.sort(choice.reshape(T, G, E // G), axis=-1)
    if method == "noaux_tc":
        group_score = grouped[..., -2:].sum(axis=-1)
    elif method == "group_limited_greedy":
        group_score = grouped[..., -1]
    elif method == "greedy":
        group_score, KG = np.zeros((T, G)), G
    else:
        raise ValueError(method)
    if KG < G:
        gs = -np.sort(-group_score, axis=-1)
        gap = float(np.min(gs[:, KG - 1] - gs[:, KG]))
        stats["group_gap"] = min(stats.get("group_gap", np.inf), gap)
    keep = np.zeros((T, G), dtype=bool)
    np.put_along_axis(keep, np.argsort(-group_score, axis=-1, kind="stable")[:, :KG], True, axis=-1)
    masked = np.where(np.repeat(keep, E // G, axis=-1), choice, 0.0)  # masked_fill(~mask, 0.0)
    order = np.argsort(-masked, axis=-1, kind="stable")
    idx = order[:, :K]
    ms = np.take_along_axis(masked, order, axis=-1)
    stats["decisions"] = stats.get("decisions", 0) + T
    gap = float(np.min(ms[:, K - 1] - ms[:, K]))
    stats["expert_gap"] = min(stats.get("expert_gap", np.inf), gap)
    assert np.all(ms[:, K - 1] > 0.0), "a masked-out expert (0.0) would tie with a chosen one"
    if method == "noaux_tc":  # does the correction bias change any choice?
        unb = np.where(np.repeat(keep, E // G, axis=-1), scores, 0.0)
        plain = np.sort(np.argsort(-unb, axis=-1, kind="stable")[:, :K], axis=-1)
        stats["bias_changed"] = stats.get("bias_changed", 0) + int(
            np.sum(np.any(plain != np.sort(idx, axis=-1), axis=-1)))
    wts = np.take_along_axis(scores, idx, axis=-1)
    norm = c["norm_topk_prob"] and K > 1
    if norm:
        wts = wts / (wts.sum(axis=-1, keepdims=True) + 1e-20)
    if c["model_type"] == "deepseek_v3" or not norm:
        # V3 always scales; V2's remote code scales only when it does not normalise.
        wts = wts * c["routed_scaling_factor"]
    return idx, wts


def forward(c, w, tokens, stats):
    """Naive MLA: kv_b_proj expanded into per-head K and V, full causal softmax in float64."""
    T = len(tokens)
    H, nope, rd, vd = (c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"],
                       c["v_head_dim"])
    R, eps = c["kv_lora_rank"], c["rms_norm_eps"]
    cos, sin, scale = rope_tables(c, np.arange(T))
    mask = np.triu(np.full((T, T), -np.inf), 1)
    x = w["model.embed_tokens.weight"][tokens]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        h = rms(x, w[p + "input_layernorm.weight"], eps)
        if c["q_lora_rank"] is None:
            q = h @ w[a + "q_proj.weight"].T
        else:
            qa = rms(h @ w[a + "q_a_proj.weight"].T, w[a + "q_a_layernorm.weight"], LORA_NORM_EPS)
            q = qa @ w[a + "q_b_proj.weight"].T
        q = q.reshape(T, H, nope + rd)
        ckv = h @ w[a + "kv_a_proj_with_mqa.weight"].T
        kv = rms(ckv[:, :R], w[a + "kv_a_layernorm.weight"], LORA_NORM_EPS)
        kv = (kv @ w[a + "kv_b_proj.weight"].T).reshape(T, H, nope + vd)
        q_pe = rope(q[..., nope:], cos, sin)
        k_pe = rope(ckv[:, R:], cos, sin)
        qf = np.concatenate([q[..., :nope], q_pe], axis=-1)
        k_pe = np.broadcast_to(k_pe[:, None, :], (T, H, rd))  # one k_pe shared by all heads
        kf = np.concatenate([kv[..., :nope], k_pe], axis=-1)
        s = np.einsum("thd,shd->hts", qf, kf) * scale + mask
        pr = np.exp(s - s.max(axis=-1, keepdims=True))
        pr /= pr.sum(axis=-1, keepdims=True)
        o = np.einsum("hts,shd->thd", pr, kv[..., nope:])
        x = x + o.reshape(T, H * vd) @ w[a + "o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"], eps)
        if not is_moe_layer(c, i):
            x = x + swiglu(h, w, p + "mlp.")
            continue
        bias = w.get(p + "mlp.gate.e_score_correction_bias", 0.0)
        idx, wts = route(c, h @ w[p + "mlp.gate.weight"].T, bias, stats)
        y = swiglu(h, w, p + "mlp.shared_experts.")
        for e in np.unique(idx):
            rows, slot = np.nonzero(idx == e)
            y[rows] += wts[rows, slot][:, None] * swiglu(h[rows], w, f"{p}mlp.experts.{e}.")
        x = x + y
        stats["max_abs_hidden"] = max(stats.get("max_abs_hidden", 0.0), float(np.abs(x).max()))
    h = rms(x, w["model.norm.weight"], eps)
    return h @ w["lm_head.weight"].T


def top2_margin(rows):
    s = -np.sort(-rows, axis=-1)
    return s[..., 0] - s[..., 1]


def write_model(out, name, c, t):
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(c, f, indent=1)
    save_file({k: np.ascontiguousarray(v) for k, v in t.items()},
              os.path.join(d, "model.safetensors"), metadata={"format": "pt"})


def reference(c, w):
    """Prompt logits, greedy continuation, and the margins that make them unambiguous."""
    logits = forward(c, w, PROMPT, {})
    seq, greedy_margin = list(PROMPT), []
    for _ in range(GREEDY_STEPS):
        last = forward(c, w, seq, {})[-1]
        greedy_margin.append(top2_margin(last))
        seq.append(int(np.argmax(last)))
    # Causal, so one pass over all but the last token sees every routing decision made above.
    stats = {}
    forward(c, w, seq[:-1], stats)
    stats["prompt_margin"] = float(top2_margin(logits).min())
    stats["greedy_margin"] = float(min(greedy_margin))
    return logits, seq[len(PROMPT):], stats


def write_all(out):
    """Writes both models, the prompt and the references into OUT (make_test_models.py calls
    this too)."""
    os.makedirs(out, exist_ok=True)
    assert all(1 <= t < 512 for t in PROMPT) and len(PROMPT) == 40
    with open(os.path.join(out, "mla_prompt.txt"), "w") as f:
        f.write(" ".join(map(str, PROMPT)) + "\n")
    for name, c, seed in MODELS:
        rope_check(c)
        t = make_weights(c, np.random.default_rng(seed))
        write_model(out, name, c, t)
        logits, gen, st = reference(c, {k: v.astype(np.float64) for k, v in t.items()})
        logits.astype("<f8").tofile(os.path.join(out, f"{name}_logits.f64"))
        with open(os.path.join(out, f"{name}_greedy.txt"), "w") as f:
            f.write(" ".join(map(str, gen)) + "\n")
        print(f"{name}: logits std {logits.std():.3f}, max |hidden| {st['max_abs_hidden']:.2f}; "
              f"top-1 minus top-2 logit: prompt rows >= {st['prompt_margin']:.4f}, "
              f"greedy steps >= {st['greedy_margin']:.4f}")
        print(f"  routing, last chosen minus first rejected: expert >= {st['expert_gap']:.5f}, "
              f"group >= {st.get('group_gap', float('nan')):.5f}"
              + (f"; the correction bias changes {st['bias_changed']} of "
                 f"{st['decisions']} token choices" if "bias_changed" in st else ""))
        print(f"  greedy: {' '.join(map(str, gen))}")
    print(f"make_mla_models: wrote {len(os.listdir(out))} entries to {out}")


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: make_mla_models.py OUT_DIR")
    write_all(sys.argv[1])


if __name__ == "__main__":
    main()
