// One Helix decode step's time split — attention, all-to-all + combine, GEMMs, all-reduce —
// for CP = 1 and CP = 2 (or any list) at context lengths 4K…128K, one thread per rank, on a
// random-weight model whose attention dominates at long context (Llama-3-8B-like attention:
// 32 query heads, 8 KV heads, head dim 128; hidden size 1024). The KV cache is filled with
// random values directly (no prefill), then `steps` batch-1 decode steps are timed and the
// best is kept. A barrier before each collective (timed as "skew") keeps the wait for a slower
// rank out of the collectives' own time; the step total includes it. Ranks are forked processes
// joined over Gloo on loopback, as in the engine.
// --mla 1 swaps the attention for DeepSeek-V3-shaped MLA (16 query heads as on one of 8 TP
// ranks of V3, kv_lora_rank 512 + rope 64 latent cache, qk_nope 128, v 128; absorbed decode,
// combine in the latent space). --moe 1 (with --mla) makes the FFN an MoE layer: 32 routed
// experts of 512 (top-4, sigmoid, noaux_tc over 4 groups) + 1 shared, experts dealt out whole
// to the ranks. Each row also gives this rank's KV bytes.
//   helix_bench [--contexts 4096,8192,...] [--cps 1,2] [--layers 2] [--steps 5]
//               [--kv-dtype float32|float16|bfloat16] [--mla 0|1] [--moe 0|1]
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "engine/backend/cpu/cpu_backend.h"
#include "engine/model/llama_model.h"
#include "engine/model/shard.h"
#include "engine/parallel/communicator.h"
#include "engine/parallel/launcher.h"
#include "engine/parallel/store_process.h"
#include "engine/parallel/tcp_store.h"

namespace {

using namespace helix;

struct Args {
  std::vector<int64_t> contexts = {4096, 8192, 16384, 32768, 65536, 131072};
  std::vector<int> cps = {1, 2};
  int layers = 2, steps = 5;
  bool mla = false, moe = false;
  kernels::DType kv_dtype = kernels::DType::kF32;
};

std::vector<int64_t> ParseList(const std::string& s) {
  std::vector<int64_t> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) v.push_back(std::atoll(item.c_str()));
  return v;
}

Args Parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--contexts") {
      a.contexts = ParseList(v);
    } else if (k == "--cps") {
      a.cps.clear();
      for (int64_t x : ParseList(v)) a.cps.push_back(static_cast<int>(x));
    } else if (k == "--layers") {
      a.layers = std::atoi(v.c_str());
    } else if (k == "--mla") {
      a.mla = v == "1";
    } else if (k == "--moe") {
      a.moe = v == "1";
    } else if (k == "--steps") {
      a.steps = std::atoi(v.c_str());
    } else if (k == "--kv-dtype" && kernels::DTypeFromName(v)) {
      a.kv_dtype = *kernels::DTypeFromName(v);
    } else {
      std::fprintf(stderr, "helix_bench: bad flag %s %s\n", k.c_str(), v.c_str());
      std::exit(2);
    }
  }
  return a;
}

void Fill(std::mt19937* rng, std::vector<float>* v, int64_t n) {
  std::normal_distribution<float> nd(0.0f, 0.03f);
  v->resize(static_cast<size_t>(n));
  for (float& x : *v) x = nd(*rng);
}

// DeepSeek-V3-shaped MLA attention (per TP-8 rank: 16 heads) with a dense FFN.
std::unique_ptr<LoadedModel> RandomMlaModel(int layers, bool moe) {
  auto m = std::make_unique<LoadedModel>();
  ModelConfig& c = m->config;
  c.architecture = "deepseek_v3";
  c.attention = AttentionKind::kMla;
  c.dim = 1024;
  c.hidden_dim = 1024;
  c.n_layers = layers;
  c.n_heads = 16;
  c.kv_lora_rank = 512;
  c.qk_rope_head_dim = 64;
  c.qk_nope_head_dim = 128;
  c.v_head_dim = 128;
  c.n_kv_heads = 1;
  c.head_dim = c.kv_lora_rank + c.qk_rope_head_dim;
  c.vocab_size = 512;
  c.max_seq_len = 1 << 20;
  c.rope_theta = 10000.0f;
  c.rope_style = kernels::RopeStyle::kInterleaved;
  if (moe) {
    c.n_routed_experts = 32;
    c.n_shared_experts = 1;
    c.experts_per_token = 4;
    c.moe_hidden_dim = 512;
    c.topk_method = TopkMethod::kNoauxTc;
    c.scoring = ScoringFunc::kSigmoid;
    c.n_group = 4;
    c.topk_group = 2;
    c.norm_topk_prob = true;
    c.routed_scaling_factor = 2.5;
  }
  std::mt19937 rng(7);
  const int64_t D = c.dim, F = c.hidden_dim, H = c.n_heads;
  Fill(&rng, &m->weights.token_embedding, c.vocab_size * D);
  m->weights.final_norm.assign(D, 1.0f);
  m->weights.layers.resize(layers);
  for (LayerWeights& l : m->weights.layers) {
    l.attn_norm.assign(D, 1.0f);
    l.ffn_norm.assign(D, 1.0f);
    l.kv_a_norm.assign(c.kv_lora_rank, 1.0f);
    Fill(&rng, &l.wq.f32, H * c.qk_head_dim() * D);
    Fill(&rng, &l.wkv_a.f32, c.head_dim * D);
    Fill(&rng, &l.wkv_b, H * (c.qk_nope_head_dim + c.v_head_dim) * c.kv_lora_rank);
    Fill(&rng, &l.wo.f32, D * H * c.v_head_dim);
    const int64_t S = moe ? c.n_shared_experts * c.moe_hidden_dim : F;
    Fill(&rng, &l.w1.f32, S * D);
    Fill(&rng, &l.w2.f32, D * S);
    Fill(&rng, &l.w3.f32, S * D);
    if (moe) {
      const int64_t M = c.moe_hidden_dim;
      Fill(&rng, &l.gate, c.n_routed_experts * D);
      Fill(&rng, &l.gate_bias, c.n_routed_experts);
      l.experts.resize(c.n_routed_experts);
      for (LayerWeights::Expert& e : l.experts) {
        Fill(&rng, &e.w1.f32, M * D);
        Fill(&rng, &e.w2.f32, D * M);
        Fill(&rng, &e.w3.f32, M * D);
      }
    }
  }
  return m;
}

std::unique_ptr<LoadedModel> RandomModel(int layers) {
  auto m = std::make_unique<LoadedModel>();
  ModelConfig& c = m->config;
  c.architecture = "llama";
  c.dim = 1024;
  c.hidden_dim = 1024;
  c.n_layers = layers;
  c.n_heads = 32;
  c.n_kv_heads = 8;
  c.head_dim = 128;
  c.vocab_size = 512;
  c.max_seq_len = 1 << 20;
  c.rope_theta = 500000.0f;
  std::mt19937 rng(7);
  const int64_t D = c.dim, F = c.hidden_dim, qd = c.n_heads * c.head_dim,
                kvd = c.n_kv_heads * c.head_dim;
  Fill(&rng, &m->weights.token_embedding, c.vocab_size * D);
  m->weights.final_norm.assign(D, 1.0f);
  m->weights.layers.resize(layers);
  for (LayerWeights& l : m->weights.layers) {
    l.attn_norm.assign(D, 1.0f);
    l.ffn_norm.assign(D, 1.0f);
    Fill(&rng, &l.wq.f32, qd * D);
    Fill(&rng, &l.wk.f32, kvd * D);
    Fill(&rng, &l.wv.f32, kvd * D);
    Fill(&rng, &l.wo.f32, D * qd);
    Fill(&rng, &l.w1.f32, F * D);
    Fill(&rng, &l.w2.f32, D * F);
    Fill(&rng, &l.w3.f32, F * D);
  }
  return m;
}

// One rank of a CP group: builds its shard and KV, times decode steps; returns the best step's
// timings (rank 0 prints them).
int RunRank(const Args& a, int64_t ctx, int cp, int rank, int port, ForwardTimings* best_out,
            int64_t* kv_bytes_out) {
  std::unique_ptr<parallel::TcpStore> store;
  std::unique_ptr<parallel::Communicator> comm;
  parallel::HelixLayout layout = parallel::HelixLayout::ForRank(rank, 1, cp);
  if (cp > 1) {
    auto s = parallel::TcpStore::Connect("127.0.0.1", port, std::chrono::milliseconds(60000));
    if (!s.ok()) return 2;
    store = std::move(*s);
    parallel::GlooOptions g;
    g.timeout = std::chrono::milliseconds(120000);
    auto c = parallel::CreateGlooCommunicator(
        store.get(), "bench" + std::to_string(ctx) + "_" + std::to_string(cp), rank, cp, g);
    if (!c.ok()) {
      std::fprintf(stderr, "%s\n", c.status().ToString().c_str());
      return 3;
    }
    comm = std::move(*c);
  }
  std::unique_ptr<LoadedModel> model =
      a.mla ? RandomMlaModel(a.layers, a.moe) : RandomModel(a.layers);
  const ModelConfig cfg = model->config;
  ShardWeights(cfg, layout, &model->weights);
  const ShardDims dims = ComputeShardDims(cfg, layout);
  const int64_t tpb = 32;
  // This rank's blocks for positions [0, ctx] (the new token is at position ctx).
  std::vector<int32_t> table, first_pos;
  for (int64_t g = 0; g * tpb <= ctx; ++g) {
    if (g % cp != layout.cp_rank) continue;
    table.push_back(static_cast<int32_t>(table.size()));
    first_pos.push_back(static_cast<int32_t>(g * tpb));
  }
  kernels::KvPoolView kv{};
  kv.dtype = a.kv_dtype;
  kv.num_layers = cfg.n_layers;
  kv.num_kv_heads = dims.kv_heads;
  kv.tokens_per_block = tpb;
  kv.head_dim = cfg.head_dim;
  kv.num_planes = cfg.kv_planes();
  const size_t elems = table.size() * static_cast<size_t>(kv.block_elems());
  std::vector<uint16_t> pool16;
  std::vector<float> pool32;
  std::mt19937 rng(11 + rank);
  std::uniform_real_distribution<float> ud(-1.0f, 1.0f);
  // Random values, tiled from a 1 MiB pattern (the contents do not change the timing).
  if (a.kv_dtype == kernels::DType::kF32) {
    pool32.resize(elems);
    std::vector<float> pat(1 << 18);
    for (float& x : pat) x = ud(rng);
    for (size_t i = 0; i < elems; i += pat.size()) {
      std::copy_n(pat.begin(), std::min(pat.size(), elems - i), pool32.begin() + i);
    }
    kv.base = pool32.data();
  } else {
    pool16.resize(elems);
    std::vector<uint16_t> pat(1 << 19);
    for (uint16_t& x : pat) {
      x = a.kv_dtype == kernels::DType::kF16 ? kernels::FloatToHalf(ud(rng))
                                             : kernels::FloatToBf16(ud(rng));
    }
    for (size_t i = 0; i < elems; i += pat.size()) {
      std::copy_n(pat.begin(), std::min(pat.size(), elems - i), pool16.begin() + i);
    }
    kv.base = pool16.data();
  }
  CpuBackend backend(1);
  ParallelContext par;
  par.layout = layout;
  par.world = comm.get();
  par.cp = comm.get();
  par.barrier_before_collectives = true;
  LlamaModel m(std::move(model), &backend, kv, par);

  ForwardBatch b;
  b.tokens = {5};
  b.positions = {static_cast<int32_t>(ctx)};
  b.token_seq = {0};
  const int64_t owner_block = ctx / tpb;
  const bool mine = owner_block % cp == layout.cp_rank;
  b.kv_block = {mine ? table.back() : -1};
  b.kv_slot = {mine ? static_cast<int32_t>(ctx % tpb) : -1};
  b.num_seqs = 1;
  b.max_blocks = static_cast<int64_t>(table.size());
  b.block_tables = table;
  b.block_first_pos = first_pos;
  // Local tokens: every local block full except possibly the one holding position ctx.
  int64_t local = 0;
  for (int32_t fp : first_pos) local += std::min<int64_t>(tpb, ctx + 1 - fp);
  b.kv_lens = {static_cast<int32_t>(local)};
  *kv_bytes_out = local * cfg.KvBytesPerToken(dims.kv_heads, kernels::DTypeSize(a.kv_dtype));
  b.logits_rows = {0};
  std::vector<float> logits;
  ForwardTimings best;
  double best_total = 1e30;
  for (int s = 0; s < a.steps + 1; ++s) {  // the first step warms up
    m.ResetTimings();
    const auto t0 = std::chrono::steady_clock::now();
    if (!m.Forward(b, &logits).ok()) return 4;
    const double total =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (s > 0 && total < best_total) {
      best_total = total;
      best = m.timings();
    }
  }
  *best_out = best;
  return 0;
}

double Total(const ForwardTimings& t) {
  return t.gemm + t.attention + t.combine + t.all_reduce + t.logits + t.other + t.wait;
}

}  // namespace

int main(int argc, char** argv) {
  const Args a = Parse(argc, argv);
  if (a.mla) {
    std::printf(
        "# helix_bench: %d layers, MLA 16 heads, latent 512 + rope 64, qk_nope 128, v 128, dim "
        "1024, %s, KV %s, 1 thread per rank, best of %d steps (ms)\n",
        a.layers, a.moe ? "MoE 32x512 top-4 + 1 shared" : "dense FFN 1024",
        kernels::DTypeName(a.kv_dtype), a.steps);
  } else {
    std::printf(
        "# helix_bench: %d layers, 32 q / 8 kv heads, head dim 128, dim 1024, KV %s, "
        "1 thread per rank, best of %d steps (ms)\n",
        a.layers, kernels::DTypeName(a.kv_dtype), a.steps);
  }
  std::printf("%8s %3s %9s %10s %10s %8s %10s %8s %8s %8s %12s\n", "context", "cp", "step",
              "attention", "a2a+comb", "gemm", "allreduce", "skew", "other", "comb%",
              "KV MiB/rank");
  for (int64_t ctx : a.contexts) {
    std::vector<double> attention_by_cp;
    for (int cp : a.cps) {
      // The store runs in its own process: the ranks are forked from this one while it has no
      // other thread (fork copies only the calling thread; a lock another held would stay
      // held in the child).
      std::optional<parallel::StoreProcess> store;
      int port = 0;
      if (cp > 1) {
        store.emplace();
        port = store->port();
        if (port <= 0 || testing::ThreadsOnceSettled() != 1) {
          std::fprintf(stderr,
                       "helix_bench: the rendezvous store did not start, or this "
                       "process has other threads to fork beside\n");
          return 1;
        }
      }
      std::vector<pid_t> pids;
      for (int r = 1; r < cp; ++r) {
        const pid_t pid = fork();
        if (pid == 0) {
          ForwardTimings t;
          int64_t kvb = 0;
          _exit(RunRank(a, ctx, cp, r, port, &t, &kvb));
        }
        pids.push_back(pid);
      }
      ForwardTimings t;
      int64_t kv_bytes = 0;
      const int rc = RunRank(a, ctx, cp, 0, port, &t, &kv_bytes);
      for (pid_t pid : pids) waitpid(pid, nullptr, 0);
      if (rc != 0) {
        std::fprintf(stderr, "helix_bench: context %lld cp %d failed (%d)\n",
                     static_cast<long long>(ctx), cp, rc);
        return 1;
      }
      const double total = Total(t);
      std::printf("%8lld %3d %9.3f %10.3f %10.3f %8.3f %10.3f %8.3f %8.3f %7.2f%% %12.2f\n",
                  static_cast<long long>(ctx), cp, 1e3 * total, 1e3 * t.attention, 1e3 * t.combine,
                  1e3 * t.gemm, 1e3 * t.all_reduce, 1e3 * t.wait, 1e3 * (t.other + t.logits),
                  100.0 * t.combine / total, static_cast<double>(kv_bytes) / (1 << 20));
      std::fflush(stdout);
      attention_by_cp.push_back(t.attention);
    }
    if (attention_by_cp.size() >= 2) {
      std::printf("# context %lld: attention cp%d / cp%d = %.3f\n", static_cast<long long>(ctx),
                  a.cps[1], a.cps[0], attention_by_cp[1] / attention_by_cp[0]);
    }
  }
  return 0;
}
