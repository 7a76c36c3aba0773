// Decode throughput of the engine: `batch` requests, each with a `context`-token prompt,
// prefilled together, then `warmup` untimed decode steps (first-use allocations, cuBLAS's
// heuristics, CUDA graph captures) and `steps` timed ones; prints one line of key=value pairs
// with the decode tokens/s (all requests together) and the prefill time. Greedy sampling, EOS
// ignored, so every request runs all its steps.
//   decode_bench --model PATH [--tokenizer PATH] [--context N] [--batch B] [--steps S]
//                [--warmup W] [--threads T] [--kv-dtype float32|float16|bfloat16]
//                [--tokens-per-block N] [--weight-dtype auto|float32|float16|bfloat16]
//                [--backend cpu|cuda] [--cuda-graphs 0|1] [--gemv 0|1] [--pdl 0|1] [--fold 0|1]
//                [--attn-mma 0|1] [--split-argmax 0|1] [--norm-sums 0|1] [--gemv-rope 0|1]
//                [--l2-prefetch-mb N] [--attn-min-chunk N]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <random>
#include <string>

#include "engine/engine.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Args {
  std::string model, tokenizer, kv_dtype = "float32", weight_dtype = "auto", backend = "cpu";
  bool cuda_graphs = false, gemv = true, pdl = true, fold = true, attn_mma = true,
       split_argmax = false, norm_sums = false, gemv_rope = false, attn_early_kv = false;
  int64_t context = 512, batch = 1, steps = 64, warmup = 8, threads = 0, tokens_per_block = 32;
  int64_t l2_prefetch_mb = 0, attn_min_chunk = 0;
};

[[noreturn]] void Usage(const std::string& why) {
  std::fprintf(stderr,
               "decode_bench: %s\nusage: decode_bench --model PATH [--tokenizer PATH] "
               "[--context N] [--batch B] [--steps S] [--warmup W] [--threads T] [--kv-dtype D] "
               "[--tokens-per-block N] [--weight-dtype D] [--backend cpu|cuda] [--cuda-graphs 0|1] "
               "[--gemv 0|1] [--pdl 0|1] [--fold 0|1] [--attn-mma 0|1] [--split-argmax 0|1] "
               "[--norm-sums 0|1] [--gemv-rope 0|1] [--l2-prefetch-mb N] "
               "[--attn-min-chunk N] [--attn-early-kv 0|1]\n",
               why.c_str());
  std::exit(2);
}

Args Parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; i += 2) {
    const std::string k = argv[i];
    if (i + 1 >= argc) Usage(k + " needs a value");
    const std::string v = argv[i + 1];
    if (k == "--model") {
      a.model = v;
    } else if (k == "--tokenizer") {
      a.tokenizer = v;
    } else if (k == "--weight-dtype") {
      a.weight_dtype = v;
    } else if (k == "--backend") {
      a.backend = v;
    } else if (k == "--cuda-graphs") {
      a.cuda_graphs = v == "1";
    } else if (k == "--gemv") {
      a.gemv = v == "1";
    } else if (k == "--pdl") {
      a.pdl = v == "1";
    } else if (k == "--fold") {
      a.fold = v == "1";
    } else if (k == "--attn-mma") {
      a.attn_mma = v == "1";
    } else if (k == "--split-argmax") {
      a.split_argmax = v == "1";
    } else if (k == "--norm-sums") {
      a.norm_sums = v == "1";
    } else if (k == "--gemv-rope") {
      a.gemv_rope = v == "1";
    } else if (k == "--l2-prefetch-mb") {
      a.l2_prefetch_mb = std::atoll(v.c_str());
    } else if (k == "--attn-early-kv") {
      a.attn_early_kv = v == "1";
    } else if (k == "--attn-min-chunk") {
      a.attn_min_chunk = std::atoll(v.c_str());
    } else if (k == "--kv-dtype") {
      a.kv_dtype = v;
    } else if (k == "--context") {
      a.context = std::atoll(v.c_str());
    } else if (k == "--batch") {
      a.batch = std::atoll(v.c_str());
    } else if (k == "--steps") {
      a.steps = std::atoll(v.c_str());
    } else if (k == "--warmup") {
      a.warmup = std::atoll(v.c_str());
    } else if (k == "--threads") {
      a.threads = std::atoll(v.c_str());
    } else if (k == "--tokens-per-block") {
      a.tokens_per_block = std::atoll(v.c_str());
    } else {
      Usage("unknown flag " + k);
    }
  }
  if (a.model.empty()) Usage("--model is required");
  if (a.context < 1 || a.batch < 1 || a.steps < 1 || a.warmup < 0 || a.l2_prefetch_mb < 0 ||
      a.l2_prefetch_mb > (int64_t{1} << 20) || a.attn_min_chunk < 0)
    Usage(
        "need context >= 1, batch >= 1, steps >= 1, warmup >= 0, 0 <= l2-prefetch-mb <= 2^20, "
        "attn-min-chunk >= 0");
  return a;
}

}  // namespace

int main(int argc, char** argv) {
  const Args a = Parse(argc, argv);
  helix::EngineOptions o;
  o.model_path = a.model;
  o.tokenizer_path = a.tokenizer;
  o.num_threads = static_cast<int>(a.threads);
  o.backend = a.backend;
  o.cuda_graphs = a.cuda_graphs;
  o.cuda_decode_gemv = a.gemv;
  o.cuda_programmatic_launch = a.pdl;
  o.cuda_fold_norms = a.fold;
  o.cuda_attention_tensor_cores = a.attn_mma;
  o.cuda_split_argmax = a.split_argmax;
  o.cuda_norm_sums = a.norm_sums;
  o.cuda_gemv_rope_kv = a.gemv_rope;
  o.cuda_l2_prefetch_bytes = a.l2_prefetch_mb << 20;
  o.cuda_attention_min_chunk_tokens = a.attn_min_chunk;
  o.cuda_attention_early_kv = a.attn_early_kv;
  o.tokens_per_block = a.tokens_per_block;
  o.max_batch_size = a.batch;
  // Tokens per request: the prefill's first, the warm-up steps', the timed steps'.
  const int64_t tokens = 1 + a.warmup + a.steps;
  o.max_seq_len = a.context + tokens;
  o.max_num_tokens = a.batch * a.context;
  o.kv_max_tokens = a.batch * (a.context + tokens + a.tokens_per_block);
  if (auto t = helix::kernels::DTypeFromName(a.kv_dtype)) {
    o.kv_dtype = *t;
  } else {
    Usage("--kv-dtype " + a.kv_dtype + ": expected float32, float16 or bfloat16");
  }
  if (a.weight_dtype != "auto") {
    o.weight_dtype = helix::kernels::DTypeFromName(a.weight_dtype);
    if (!o.weight_dtype) Usage("--weight-dtype " + a.weight_dtype + ": expected auto or a dtype");
  }
  auto engine = helix::Engine::Create(o);
  if (!engine.ok()) {
    std::fprintf(stderr, "decode_bench: %s\n", engine.status().ToString().c_str());
    return 1;
  }
  const int64_t vocab = (*engine)->tokenizer().vocab_size();
  if (a.context + tokens > (*engine)->max_seq_len()) {
    std::fprintf(stderr,
                 "decode_bench: context + 1 + warmup + steps = %lld exceeds the model's %lld\n",
                 static_cast<long long>(a.context + tokens),
                 static_cast<long long>((*engine)->max_seq_len()));
    return 2;
  }
  // Random prompts from a fixed seed (ids 3.. avoid the usual control tokens).
  std::mt19937 rng(1234);
  std::uniform_int_distribution<int32_t> tok(3, static_cast<int32_t>(vocab - 1));
  int64_t generated = 0, errors = 0;
  for (int64_t b = 0; b < a.batch; ++b) {
    helix::GenerateRequest r;
    for (int64_t i = 0; i < a.context; ++i) r.prompt_tokens.push_back(tok(rng));
    r.max_tokens = static_cast<int32_t>(tokens);
    r.ignore_eos = true;
    r.sampling.temperature = 0;
    r.sink = [&](const helix::TokenEvent& ev) {
      if (ev.token >= 0) ++generated;
      if (ev.finished && ev.finish_reason == helix::FinishReason::kError) ++errors;
    };
    auto id = (*engine)->Submit(std::move(r));
    if (!id.ok()) {
      std::fprintf(stderr, "decode_bench: %s\n", id.status().ToString().c_str());
      return 1;
    }
  }
  // The first step prefills every prompt (and samples each request's first token); the rest
  // are decode steps of `batch` tokens each: `warmup` untimed, then the timed ones.
  const auto t0 = Clock::now();
  (*engine)->Step();
  const auto t1 = Clock::now();
  const int64_t after_prefill = generated;
  for (int64_t i = 0; i < a.warmup && (*engine)->HasWork(); ++i) (*engine)->Step();
  const int64_t after_warmup = generated;
  const helix::ForwardTimings before = (*engine)->model_timings();
  const auto t2 = Clock::now();
  int64_t timed_steps = 0;
  while ((*engine)->HasWork()) {
    (*engine)->Step();
    ++timed_steps;
  }
  const auto t3 = Clock::now();
  const helix::ForwardTimings after = (*engine)->model_timings();
  if (errors > 0 || after_prefill != a.batch || generated != a.batch * tokens ||
      timed_steps != a.steps) {
    std::fprintf(stderr, "decode_bench: %lld errors, %lld tokens after prefill, %lld in all\n",
                 static_cast<long long>(errors), static_cast<long long>(after_prefill),
                 static_cast<long long>(generated));
    return 1;
  }
  // What one decode step must read at least (Llama-family GQA models): every weight matrix once
  // (classifier included) and the KV cache of every request at the mean decode context. Divided
  // by a measured copy bandwidth this is the step's roofline.
  const helix::ModelConfig& c = (*engine)->model_config();
  const std::optional<helix::kernels::DType> wd = helix::kernels::DTypeFromName(a.weight_dtype);
  const double w_elem = wd ? helix::kernels::DTypeSize(*wd) : 4.0;  // auto: f32 for llama2.c
  const double kv_elem =
      helix::kernels::DTypeSize(helix::kernels::DTypeFromName(a.kv_dtype).value());
  const double matrix_elems = static_cast<double>(c.n_layers) *
                                  (c.dim * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim +
                                   c.n_heads * c.head_dim * c.dim + 3.0 * c.dim * c.hidden_dim) +
                              static_cast<double>(c.vocab_size) * c.dim;
  const double weight_bytes = matrix_elems * w_elem;
  const double kv_read_bytes = static_cast<double>(a.batch) *
                               (a.context + 1 + a.warmup + (a.steps - 1) / 2.0) * c.n_layers * 2.0 *
                               c.n_kv_heads * c.head_dim * kv_elem;
  const double prefill_s = std::chrono::duration<double>(t1 - t0).count();
  const double decode_s = std::chrono::duration<double>(t3 - t2).count();
  const double decode_tokens = static_cast<double>(generated - after_warmup);
  std::printf(
      "engine=helix backend=%s cuda_graphs=%d gemv=%d pdl=%d fold=%d attn_mma=%d split_argmax=%d "
      "norm_sums=%d gemv_rope=%d l2_prefetch_mb=%lld attn_min_chunk=%lld attn_early_kv=%d "
      "model=%s "
      "context=%lld "
      "batch=%lld "
      "steps=%lld "
      "warmup=%lld kv_dtype=%s weight_dtype=%s prefill_s=%.3f decode_tok_s=%.2f ms_per_step=%.3f "
      "graph_replays=%lld graph_captures=%lld weight_bytes=%.0f kv_read_bytes=%.0f\n",
      a.backend.c_str(), a.cuda_graphs ? 1 : 0, a.gemv ? 1 : 0, a.pdl ? 1 : 0, a.fold ? 1 : 0,
      a.attn_mma ? 1 : 0, a.split_argmax ? 1 : 0, a.norm_sums ? 1 : 0, a.gemv_rope ? 1 : 0,
      static_cast<long long>(a.l2_prefetch_mb), static_cast<long long>(a.attn_min_chunk),
      a.attn_early_kv ? 1 : 0, a.model.c_str(), static_cast<long long>(a.context),
      static_cast<long long>(a.batch), static_cast<long long>(a.steps),
      static_cast<long long>(a.warmup), a.kv_dtype.c_str(), a.weight_dtype.c_str(), prefill_s,
      decode_tokens / decode_s, 1e3 * decode_s / static_cast<double>(a.steps),
      static_cast<long long>(after.graph_replays - before.graph_replays),
      static_cast<long long>(after.graph_captures - before.graph_captures), weight_bytes,
      kv_read_bytes);
  return 0;
}
