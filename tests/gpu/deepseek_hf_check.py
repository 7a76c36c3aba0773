#!/usr/bin/env python3
"""Checks our float64 DeepSeek references against a forward pass we did not write: transformers'
native DeepseekV3 / DeepseekV2 (no trust_remote_code, nothing downloaded).

Usage: deepseek_hf_check.py MODELS_DIR [--models NAME,...] [--engine-logits NAME=PATH ...]
                            [--fp32-device cuda|cpu|none]

MODELS_DIR is what tests/models/make_mla_models.py writes: <name>/{config.json,
model.safetensors} (Hugging Face names, float32), mla_prompt.txt (token ids) and
<name>_logits.f64 (our float64 reference logits of the prompt, [prompt_len][vocab], little-endian;
the C++ engine matches it to ~1e-6 in CI). For each model this script
  * loads it with AutoModelForCausalLM.from_pretrained in float64 on the CPU (eager attention and,
    where transformers has the choice, eager experts). Recent transformers fuse the routed experts
    into 3-D tensors and convert the per-expert checkpoint while loading; the script relies on
    that conversion, then checks on its own that every model tensor equals the checkpoint tensor(s)
    it came from and that every checkpoint tensor was used. Missing, unexpected or mismatched keys
    fail the run;
  * prints what transformers built against what DeepSeek's code does (softmax scale with the yarn
    mscale^2, cos/sin mscale, yarn inv_freq, interleaved RoPE pairs, routed-weight rule);
  * runs the prompt and compares the logits with the reference: max over rows of
    max |ours - theirs| / max |reference| (the row's largest logit magnitude), and top-1 agreement;
  * repeats it in float32 on CUDA when a device is visible (or on --fp32-device; reported, no
    limit);
  * compares an engine dump (raw float32 [prompt_len][vocab]) when given one.
transformers computes a few things in float32 even in a float64 model (RMSNorm variance, router
logits, RoPE tables, the eager softmax, V2's rotation), so agreement is ~1e-6, not 1e-12.

Exit status: 1 when a model fails to load cleanly, or when deepseek_v3_tiny differs from the
reference by more than 1e-4 in float64; 2 when torch or transformers cannot be imported; 0
otherwise. deepseek_v2_tiny is reported only: transformers' native DeepseekV2 is not DeepSeek's V2
code. It always multiplies the routed weights by routed_scaling_factor and never normalises them
(DeepSeek: normalise and do not scale when norm_topk_prob, else scale; our tiny V2 has
norm_topk_prob false, so both scale), and 4.x versions leave the yarn mscale^2 out of the softmax
scale (5.x have it). When the scale differs, the script reruns V2 with DeepSeek's scale patched in,
to show whether that alone explains the difference. transformers 4.x's DeepseekV3MoE cannot run in
float64 as is (its float32 accumulator refuses float64 expert outputs): the script then casts the
routed weights to float64 and says so.
"""
import argparse
import json
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

V3_LIMIT = 1e-4
MODELS = ["deepseek_v3_tiny", "deepseek_v2_tiny"]


def yarn_mscale(scale, m):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def deepseek_rope(c):
    """What DeepSeek's code (and make_mla_models.py) uses: inv_freq [rope/2], the cos/sin factor
    and the softmax scale."""
    d, base = c["qk_rope_head_dim"], float(c.get("rope_theta", 10000.0))
    inv = 1.0 / base ** (np.arange(0, d, 2, dtype=np.float64) / d)
    scale = (c["qk_nope_head_dim"] + d) ** -0.5
    rs, attn = c.get("rope_scaling"), 1.0
    if rs:
        f, orig = rs["factor"], rs["original_max_position_embeddings"]

        def corr_dim(rot):
            return d * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(corr_dim(rs.get("beta_fast", 32))), 0)
        high = min(math.ceil(corr_dim(rs.get("beta_slow", 1))), d - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
        inv = inv / f * ramp + inv * (1.0 - ramp)
        attn = yarn_mscale(f, rs.get("mscale", 1)) / yarn_mscale(f, rs.get("mscale_all_dim", 0))
        if rs.get("mscale_all_dim", 0):
            scale *= yarn_mscale(f, rs["mscale_all_dim"]) ** 2
    return inv, attn, scale


def rel_err(got, ref):
    """max over rows of max |got - ref| / max |ref|; inf when got has a non-finite value."""
    got = np.asarray(got, dtype=np.float64)
    if got.shape != ref.shape:
        raise ValueError(f"shape {got.shape} != reference {ref.shape}")
    if not np.all(np.isfinite(got)):
        return math.inf
    return float(np.max(np.max(np.abs(got - ref), axis=1) / np.max(np.abs(ref), axis=1)))


def top1(got, ref):
    return int(np.sum(np.argmax(got, axis=1) == np.argmax(ref, axis=1)))


def version_tuple(v):
    out = []
    for part in v.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


class Checker:
    def __init__(self, args):
        import torch
        import transformers

        self.torch = torch
        self.transformers = transformers
        self.args = args
        self.tf_version = version_tuple(transformers.__version__)
        self.rows = []  # (model, run, err, top1, limit, verdict)
        self.failures = []
        self.notes = []
        with open(os.path.join(args.models_dir, "mla_prompt.txt")) as f:
            self.prompt = [int(t) for t in f.read().split()]

    def load(self, path, dtype):
        torch, tf = self.torch, self.transformers
        kw = dict(local_files_only=True, trust_remote_code=False, attn_implementation="eager",
                  output_loading_info=True)
        # `dtype` replaced `torch_dtype` in 4.56; an unknown keyword would be silently ignored.
        kw["dtype" if self.tf_version >= (4, 56) else "torch_dtype"] = dtype
        model, info = tf.AutoModelForCausalLM.from_pretrained(path, **kw)
        if hasattr(model, "set_experts_implementation"):
            try:
                model.set_experts_implementation("eager")
            except Exception as e:  # noqa: BLE001 - only a preference; report and go on
                print(f"  note: set_experts_implementation('eager') failed: {e}")
        model.eval()
        got = model.lm_head.weight.dtype
        if got != dtype:
            raise RuntimeError(f"asked for {dtype}, lm_head.weight is {got}")
        return model, info

    def check_loading(self, name, model, info, ckpt):
        """Loading report of transformers, then our own tensor-by-tensor check. Returns problems."""
        problems = []
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
            vals = sorted(str(v) for v in (info.get(key) or []))
            print(f"  from_pretrained {key}: {len(vals)}" + (f" {vals[:8]}" if vals else ""))
            if vals:
                problems.append(f"{key}: {vals[:8]}{' ...' if len(vals) > 8 else ''}")
        torch = self.torch
        used = set()
        fused = 0
        for pname, t in model.state_dict().items():
            if "rotary_emb." in pname:  # derived from the config, not a weight
                continue
            t = t.detach().to("cpu", torch.float64)
            sources = None
            if pname in ckpt:
                sources = [pname]
                want = ckpt[pname].to(torch.float64)
            elif pname.endswith(".experts.gate_up_proj") or pname.endswith(".experts.down_proj"):
                prefix, kind = pname.rsplit(".", 1)
                parts = ["gate_proj", "up_proj"] if kind == "gate_up_proj" else ["down_proj"]
                sources, stacked = [], []
                for e in range(t.shape[0]):
                    names = [f"{prefix}.{e}.{p}.weight" for p in parts]
                    if not all(n in ckpt for n in names):
                        sources = None
                        break
                    sources += names
                    stacked.append(torch.cat([ckpt[n].to(torch.float64) for n in names], dim=0))
                if sources is not None:
                    want = torch.stack(stacked)
                    if want.shape != t.shape and want.transpose(1, 2).shape == t.shape:
                        want = want.transpose(1, 2)
                    fused += 1
            if sources is None:
                problems.append(f"model tensor {pname} {tuple(t.shape)} has no checkpoint source "
                                "(it would keep its random initialisation)")
                continue
            used.update(sources)
            if want.shape != t.shape or not torch.equal(want, t):
                problems.append(f"model tensor {pname} differs from checkpoint {sources[:2]}")
        unused = sorted(set(ckpt) - used)
        if unused:
            problems.append(f"{len(unused)} checkpoint tensors unused: {unused[:8]}")
        print(f"  own check: {len(used)} of {len(ckpt)} checkpoint tensors matched model tensors "
              f"exactly ({fused} fused expert tensors rebuilt from per-expert weights)")
        for p in problems:
            print(f"  LOAD PROBLEM ({name}): {p}")
        return problems

    def describe(self, name, c, model):
        """What transformers built, against DeepSeek's code. Returns DeepSeek's softmax scale and
        whether transformers' differs."""
        inv, attn, scale = deepseek_rope(c)
        rs = c.get("rope_scaling") or {}
        if rs and c.get("max_position_embeddings") and rs.get("original_max_position_embeddings"):
            ratio = c["max_position_embeddings"] / rs["original_max_position_embeddings"]
            ok = abs(ratio - rs["factor"]) < 1e-12
            print(f"  yarn factor {rs['factor']} {'==' if ok else '!='} max_position_embeddings / "
                  f"original_max_position_embeddings = {ratio:g}"
                  + ("" if ok else " (transformers 4.5x took the ratio as the factor: differs)"))
        attn_mod = model.model.layers[0].self_attn
        hf_scale = float(getattr(attn_mod, "scaling", float("nan")))
        scale_differs = not abs(hf_scale - scale) <= 1e-12 * scale
        print(f"  softmax scale: transformers {hf_scale:.10f}, DeepSeek {scale:.10f} "
              f"((nope + rope)^-0.5 x yarn mscale(factor, mscale_all_dim)^2)"
              + ("  <-- DIFFERS" if scale_differs else ""))
        rot = getattr(model.model, "rotary_emb", None)
        if rot is not None:
            hf_attn = float(getattr(rot, "attention_scaling", float("nan")))
            hf_inv = getattr(rot, "inv_freq", None)
            line = f"  cos/sin factor: transformers {hf_attn:.10f}, DeepSeek {attn:.10f}"
            if hf_inv is not None:
                hf_inv = hf_inv.detach().to("cpu", self.torch.float64).numpy()
                if hf_inv.shape == inv.shape:
                    diff = np.max(np.abs(hf_inv - inv) / inv)
                    line += f"; yarn inv_freq max rel diff {diff:.2e} (transformers: float32)"
                else:
                    line += f"; inv_freq shape {hf_inv.shape} != {inv.shape}"
            print(line)
        if c["model_type"] == "deepseek_v3":
            inter = getattr(model.config, "rope_interleave", None)
            print(f"  rope_interleave: {inter} (config.json omits it; DeepSeek rotates interleaved "
                  "pairs (x[2i], x[2i+1]), which transformers' V3 does only when it is true)")
            if inter is not True:
                self.failures.append(f"{name}: rope_interleave is {inter}, expected True")
        else:
            print("  RoPE: transformers' V2 rotates view_as_complex pairs, i.e. interleaved "
                  "(x[2i], x[2i+1]), as DeepSeek's code")
            if c.get("norm_topk_prob"):
                print("  routed weights: DeepSeek V2 normalises and does not scale "
                      "(norm_topk_prob true); transformers scales by routed_scaling_factor and "
                      "does not normalise: expect a difference")
            else:
                print("  routed weights: norm_topk_prob false, so DeepSeek V2 and transformers "
                      f"both multiply by routed_scaling_factor {c.get('routed_scaling_factor')}")
        return scale, scale_differs

    def logits(self, model, device):
        torch = self.torch
        ids = torch.tensor([self.prompt], dtype=torch.long, device=device)
        with torch.no_grad():
            try:
                out = model(input_ids=ids, use_cache=False)
            except RuntimeError as e:
                # transformers 4.x DeepseekV3MoE.moe accumulates in the router's float32 and
                # index_add_s the float64 expert outputs into it, which torch refuses.
                if "index_add_" not in str(e) or not self.patch_moe_dtype(model):
                    raise
                out = model(input_ids=ids, use_cache=False)
        return out.logits[0].detach().to("cpu", torch.float64).numpy()

    def patch_moe_dtype(self, model):
        """Makes each MoE block's moe() take the routed weights in the activations' dtype (the
        float32 weights converted exactly). Returns how many blocks were patched."""
        n = 0
        for m in model.modules():
            f = getattr(m, "moe", None)
            if callable(f) and hasattr(m, "gate") and not getattr(m, "_hf_check_patched", False):
                def moe(hidden_states, topk_indices, topk_weights, _f=f):
                    return _f(hidden_states, topk_indices, topk_weights.to(hidden_states.dtype))
                m.moe = moe
                m._hf_check_patched = True
                n += 1
        if n:
            print(f"  note: this transformers' MoE cannot run in float64 as is (float32 index_add_ "
                  f"target); routed weights cast to the activations' dtype in {n} MoE blocks")
            self.notes.append("transformers' DeepseekV3MoE.moe patched to run in float64 (its "
                              "float32 accumulator refuses float64 expert outputs)")
        return n

    def add(self, name, run, got, ref, limit=None):
        err = rel_err(got, ref)
        agree = top1(got, ref)
        if limit is None:
            verdict = "report"
        else:
            verdict = "ok" if err <= limit else "FAIL"
            if err > limit:
                self.failures.append(f"{name} {run}: max rel err {err:.3e} > {limit:g}")
        self.rows.append((name, run, err, f"{agree}/{len(ref)}", limit, verdict))
        print(f"  {run}: max rel err {err:.3e}, top-1 agrees on {agree}/{len(ref)} rows")
        return err

    def check_model(self, name):
        torch = self.torch
        from safetensors.torch import load_file

        mdir = os.path.join(self.args.models_dir, name)
        with open(os.path.join(mdir, "config.json")) as f:
            c = json.load(f)
        ref = np.fromfile(os.path.join(self.args.models_dir, f"{name}_logits.f64"), dtype="<f8")
        ref = ref.reshape(len(self.prompt), -1)
        is_v3 = c["model_type"] == "deepseek_v3"
        print(f"== {name} ({c['architectures'][0]}, model_type {c['model_type']})")
        ckpt = load_file(os.path.join(mdir, "model.safetensors"))
        try:
            model, info = self.load(mdir, torch.float64)
        except Exception as e:  # noqa: BLE001 - any load failure is the result
            msg = f"{name}: from_pretrained failed: {type(e).__name__}: {e}"
            print(f"  LOAD FAILED: {msg}")
            self.failures.append(msg)
            self.rows.append((name, "load", math.inf, "-", None, "FAIL"))
            return
        print(f"  loaded {type(model).__name__}, dtype {model.lm_head.weight.dtype}, attention "
              f"{getattr(model.config, '_attn_implementation', '?')}, experts "
              f"{getattr(model.config, '_experts_implementation', 'n/a')}")
        problems = self.check_loading(name, model, info, ckpt)
        if problems:
            self.failures.append(f"{name}: {len(problems)} loading problems (see above)")
        scale, scale_differs = self.describe(name, c, model)

        got64 = self.logits(model, "cpu")
        self.add(name, "transformers fp64 cpu vs ref", got64, ref, V3_LIMIT if is_v3 else None)
        if not is_v3 and scale_differs:
            for layer in model.model.layers:
                layer.self_attn.scaling = scale
            patched = self.logits(model, "cpu")
            err = self.add(name, "  same, DeepSeek softmax scale", patched, ref)
            self.notes.append(
                f"{name}: transformers' softmax scale differs from DeepSeek's (yarn mscale^2 "
                f"missing); with DeepSeek's scale patched in the max rel err is {err:.2e}"
                + (", so the scale explains the difference" if err <= V3_LIMIT else
                   ", so something else differs too"))
        elif not is_v3:
            self.notes.append(f"{name}: transformers' softmax scale equals DeepSeek's in this "
                              f"transformers version; any remaining difference is not the scale")

        for spec in self.args.engine_logits:
            model_name, _, path = spec.partition("=")
            if model_name != name:
                continue
            eng = np.fromfile(path, dtype="<f4").astype(np.float64)
            if eng.size != ref.size:
                msg = f"{name}: engine logits {path} hold {eng.size} floats, expected {ref.size}"
                print(f"  {msg}")
                self.failures.append(msg)
                continue
            eng = eng.reshape(ref.shape)
            self.add(name, "engine (file) vs ref", eng, ref)
            self.add(name, "engine (file) vs transformers fp64", eng, got64)
        del model

        dev = self.args.fp32_device
        if dev == "cpu" or (dev == "cuda" and torch.cuda.is_available()):
            try:
                model32, _ = self.load(mdir, torch.float32)
                model32.to(dev)
                if not is_v3 and scale_differs:
                    for layer in model32.model.layers:
                        layer.self_attn.scaling = scale
                got32 = self.logits(model32, dev)
                run = f"transformers fp32 {dev} vs ref" + (
                    " (DeepSeek scale)" if not is_v3 and scale_differs else "")
                self.add(name, run, got32, ref)
                del model32
            except Exception as e:  # noqa: BLE001 - reported, not a failure
                print(f"  fp32 {dev} run failed: {type(e).__name__}: {e}")
                self.rows.append((name, f"transformers fp32 {dev}", math.inf, "-", None, "error"))

    def summary(self):
        print()
        print(f"==== deepseek_hf_check summary (transformers {self.transformers.__version__}, "
              f"torch {self.torch.__version__}) ====")
        print(f"{'model':18} {'run':46} {'max rel err':>11} {'top-1':>7} {'limit':>7}  verdict")
        for name, run, err, agree, limit, verdict in self.rows:
            lim = f"{limit:.0e}" if limit is not None else "-"
            print(f"{name:18} {run:46} {err:11.3e} {agree:>7} {lim:>7}  {verdict}")
        print("max rel err = max over prompt rows of max |a - b| / max |reference| (row max "
              "|logit|); reference = our float64 make_mla_models.py logits")
        for n in self.notes:
            print(f"note: {n}")
        for f in self.failures:
            print(f"FAILED: {f}")
        print("deepseek_hf_check: " + ("FAILED" if self.failures else "ok"))
        return 1 if self.failures else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models_dir", help="output folder of tests/models/make_mla_models.py")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated model names")
    ap.add_argument("--engine-logits", action="append", default=[], metavar="NAME=PATH",
                    help="raw float32 [prompt_len][vocab] logits of model NAME from the engine")
    ap.add_argument("--fp32-device", choices=["cuda", "cpu", "none"], default="cuda",
                    help="where to run the float32 pass (cuda: only when a device is visible)")
    args = ap.parse_args()
    for spec in args.engine_logits:
        if "=" not in spec:
            ap.error(f"--engine-logits wants NAME=PATH, got {spec!r}")
    try:
        chk = Checker(args)
    except ImportError as e:
        print(f"deepseek_hf_check: cannot import torch/transformers: {e}")
        return 2
    torch = chk.torch
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    print(f"transformers {chk.transformers.__version__}, torch {torch.__version__}, "
          f"cuda {'yes: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no'}")
    for name in [m for m in args.models.split(",") if m]:
        try:
            chk.check_model(name)
        except Exception as e:  # noqa: BLE001 - keep going to the summary
            import traceback

            traceback.print_exc()
            chk.failures.append(f"{name}: {type(e).__name__}: {e}")
            chk.rows.append((name, "(crashed)", math.inf, "-", None, "FAIL"))
    return chk.summary()


if __name__ == "__main__":
    sys.exit(main())
