// MLA decode-attention throughput on the CPU: one decode step of MlaAttentionCpu (DeepSeek
// V2/V3 rows: latent 512 + rope 64, bf16 pool, 64-token blocks) at 16 heads per rank and at
// 128, contexts 4K / 16K / 64K, batch 1 and 4, as GB/s of KV read and GFLOP/s. Next to each
// line, PagedAttentionCpu on a GQA shape with the same KV bytes per token (the same query
// heads over 2 KV heads of 144 dims: K + V = 576 elements), and a read-only memory bandwidth
// and an fp32 FMA peak measured in the same run with the same threads. MLA does 2 * heads * (576 +
// 512) flops per cached row against the GQA shape's 2 * heads * 288, so it is compute bound much
// sooner.
//   mla_attention_bench [--threads N] [--reps R] [--quick]
// --quick: contexts 4K and 16K, two repetitions.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/attention.h"
#include "kernels/mla_attention.h"
#include "kernels/thread_pool.h"

namespace {

using Clock = std::chrono::steady_clock;
using helix::kernels::DType;
using helix::kernels::KvPoolView;

constexpr int64_t kLatent = 512, kRope = 64, kRow = kLatent + kRope;
constexpr int64_t kTpb = 64;
// The GQA shape of the same bytes per token: 2 planes x 2 KV heads x 144 dims = kRow.
constexpr int64_t kGqaKvHeads = 2, kGqaDim = 144;
static_assert(2 * kGqaKvHeads * kGqaDim == kRow);

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Best of `reps` runs of fn().
template <typename F>
double BestSeconds(int reps, F&& fn) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    fn();
    best = std::min(best, Seconds(t0, Clock::now()));
  }
  return best;
}

struct Args {
  int threads = 0;
  int reps = 3;
  bool quick = false;
};

Args Parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    if (k == "--quick") {
      a.quick = true;
      a.reps = std::min(a.reps, 2);
    } else if (k == "--threads" && i + 1 < argc) {
      a.threads = std::atoi(argv[++i]);
    } else if (k == "--reps" && i + 1 < argc) {
      a.reps = std::max(1, std::atoi(argv[++i]));
    } else {
      std::fprintf(stderr, "usage: mla_attention_bench [--threads N] [--reps R] [--quick]\n");
      std::exit(2);
    }
  }
  return a;
}

// A decode batch: `batch` sequences of `ctx` tokens on shuffled blocks of the pool.
struct Batch {
  std::vector<int32_t> tables, firsts, kv_lens, q_seq, q_pos;
  int64_t max_blocks;
};

Batch MakeBatch(int64_t batch, int64_t ctx, const std::vector<int32_t>& ids) {
  Batch b;
  b.max_blocks = (ctx + kTpb - 1) / kTpb;
  for (int64_t s = 0; s < batch; ++s) {
    for (int64_t j = 0; j < b.max_blocks; ++j) {
      b.tables.push_back(ids[s * b.max_blocks + j]);
      b.firsts.push_back(static_cast<int32_t>(j * kTpb));
    }
    b.kv_lens.push_back(static_cast<int32_t>(ctx));
    b.q_seq.push_back(static_cast<int32_t>(s));
    b.q_pos.push_back(static_cast<int32_t>(ctx - 1));
  }
  return b;
}

// Split-KV chunks that give every thread about four items at batch 1 (as attention_bench).
int64_t SplitTokens(int64_t ctx, int64_t batch, int threads) {
  if (threads <= 1 || batch >= 2 * threads) {
    return 0;
  }
  const int64_t split = (ctx * batch / (threads * 4) + kTpb - 1) / kTpb * kTpb;
  return std::max(split, kTpb);
}

}  // namespace

int main(int argc, char** argv) {
  const Args args = Parse(argc, argv);
  helix::kernels::ThreadPool pool(args.threads);
  const int threads = pool.size();
  const std::vector<int64_t> contexts =
      args.quick ? std::vector<int64_t>{4096, 16384} : std::vector<int64_t>{4096, 16384, 65536};
  const std::vector<int64_t> batches = {1, 4};
  const std::vector<int64_t> head_counts = {16, 128};
  const int64_t max_tokens = contexts.back() * batches.back();
  const int64_t num_blocks = max_tokens / kTpb;

  // One bf16 buffer serves both views: an MLA block and a GQA block of this shape have the
  // same kTpb * kRow elements.
  std::vector<uint16_t> kv(static_cast<size_t>(num_blocks * kTpb * kRow));
  uint32_t state = 12345;
  for (uint16_t& x : kv) {
    state = state * 1664525u + 1013904223u;
    x = helix::kernels::FloatToBf16(static_cast<float>(state >> 8) * (2.0f / 16777216.0f) - 1.0f);
  }
  std::vector<int32_t> ids(num_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), std::mt19937(7));

  // Read-only bandwidth over the whole buffer, and the fp32 FMA peak, with the same threads.
  std::vector<uint64_t> sink(threads * 8, 0);
  const auto read = [&] {
    const auto* words = reinterpret_cast<const uint64_t*>(kv.data());
    const int64_t n = static_cast<int64_t>(kv.size()) / 4 / 16;  // 16-word groups
    pool.ParallelFor(threads, [&](int64_t b, int64_t e) {
      for (int64_t w = b; w < e; ++w) {
        uint64_t acc[16] = {};
        for (int64_t i = n * w / threads * 16; i < n * (w + 1) / threads * 16; i += 16) {
          for (int j = 0; j < 16; ++j) acc[j] += words[i + j];
        }
        sink[w * 8] = std::accumulate(acc, acc + 16, uint64_t{0});
      }
    });
  };
  read();
  const double read_bw = static_cast<double>(kv.size() * 2) / BestSeconds(args.reps, read);
  constexpr int64_t kFmaIters = 20000000;
  std::vector<float> fsink(threads * 16, 0.0f);
  const auto fma = [&] {
    pool.ParallelFor(threads, [&](int64_t b, int64_t e) {
      for (int64_t w = b; w < e; ++w) {
        alignas(32) float x[96];  // 12 independent 8-lane chains: the FMA ports, not latency
        for (int i = 0; i < 96; ++i) x[i] = 1e-3f * i;
        for (int64_t k = 0; k < kFmaIters; ++k) {
          for (int i = 0; i < 96; ++i) x[i] = std::fma(x[i], 0.9999f, 1e-4f);
        }
        fsink[w * 16] = std::accumulate(x, x + 96, 0.0f);
      }
    });
  };
  const double peak = 2.0 * 96 * kFmaIters * threads / BestSeconds(2, fma);
  std::printf(
      "# threads %d; KV buffer %.2f GiB; read-only bandwidth %.2f GB/s; fp32 FMA peak "
      "%.1f GFLOP/s\n",
      threads, kv.size() * 2 / 1073741824.0, read_bw / 1e9, peak / 1e9);
  std::printf(
      "# mla: latent %lld + rope %lld, bf16, %lld tokens/block; gqa: same heads over %lld "
      "KV heads x %lld dims, bf16 (the same bytes per token)\n",
      static_cast<long long>(kLatent), static_cast<long long>(kRope), static_cast<long long>(kTpb),
      static_cast<long long>(kGqaKvHeads), static_cast<long long>(kGqaDim));
  std::printf("%-6s %5s %5s %7s %8s %8s %9s %8s %8s %7s %7s\n", "kernel", "heads", "batch", "ctx",
              "KV MiB", "split", "ms/step", "KV GB/s", "GFLOP/s", "/read", "/peak");

  std::mt19937 rng(11);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (int64_t heads : head_counts) {
    std::vector<float> q_mla(batches.back() * heads * kRow),
        q_gqa(batches.back() * heads * kGqaDim);
    for (float& x : q_mla) x = u(rng);
    for (float& x : q_gqa) x = u(rng);
    std::vector<float> out(batches.back() * heads * kLatent), lse(batches.back() * heads);
    for (int64_t ctx : contexts) {
      for (int64_t batch : batches) {
        const Batch b = MakeBatch(batch, ctx, ids);
        const int64_t split = SplitTokens(ctx, batch, threads);
        const double bytes = static_cast<double>(batch * ctx * kRow * 2);
        const auto report = [&](const char* name, double s, double flops_per_row) {
          const double flops = flops_per_row * batch * ctx / s;
          std::printf("%-6s %5lld %5lld %7lld %8.1f %8lld %9.3f %8.2f %8.1f %7.2f %7.2f\n", name,
                      static_cast<long long>(heads), static_cast<long long>(batch),
                      static_cast<long long>(ctx), bytes / 1048576.0, static_cast<long long>(split),
                      s * 1e3, bytes / s / 1e9, flops / 1e9, bytes / s / read_bw, flops / peak);
          std::fflush(stdout);
        };

        helix::kernels::MlaAttentionParams mp{.q = q_mla.data(),
                                              .q_seq = b.q_seq.data(),
                                              .q_pos = b.q_pos.data(),
                                              .kv = KvPoolView{.base = kv.data(),
                                                               .dtype = DType::kBF16,
                                                               .num_layers = 1,
                                                               .num_kv_heads = 1,
                                                               .tokens_per_block = kTpb,
                                                               .head_dim = kRow,
                                                               .num_planes = 1},
                                              .layer = 0,
                                              .block_tables = b.tables.data(),
                                              .block_first_pos = b.firsts.data(),
                                              .kv_lens = b.kv_lens.data(),
                                              .max_blocks_per_seq = b.max_blocks,
                                              .num_seqs = batch,
                                              .num_q_tokens = batch,
                                              .num_heads = heads,
                                              .latent_dim = kLatent,
                                              .rope_dim = kRope,
                                              .scale = 1.0f / std::sqrt(192.0f),
                                              .out = out.data(),
                                              .lse = lse.data(),
                                              .kv_split_tokens = split};
        std::vector<float> ws(helix::kernels::MlaAttentionWorkspaceBytes(mp) / 4 + 16);
        const auto mla = [&] { helix::kernels::MlaAttentionCpu(mp, ws.data(), &pool); };
        mla();
        report("mla", BestSeconds(args.reps, mla), 2.0 * heads * (kRow + kLatent));

        helix::kernels::PagedAttentionParams gp{
            .q = q_gqa.data(),
            .q_seq = b.q_seq.data(),
            .q_pos = b.q_pos.data(),
            .kv = KvPoolView{.base = kv.data(),
                             .dtype = DType::kBF16,
                             .num_layers = 1,
                             .num_kv_heads = kGqaKvHeads,
                             .tokens_per_block = kTpb,
                             .head_dim = kGqaDim},
            .layer = 0,
            .block_tables = b.tables.data(),
            .block_first_pos = b.firsts.data(),
            .kv_lens = b.kv_lens.data(),
            .max_blocks_per_seq = b.max_blocks,
            .num_seqs = batch,
            .num_q_tokens = batch,
            .num_q_heads = heads,
            .num_kv_heads = kGqaKvHeads,
            .head_dim = kGqaDim,
            .scale = 1.0f / std::sqrt(static_cast<float>(kGqaDim)),
            .out = out.data(),
            .lse = lse.data(),
            .kv_split_tokens = split};
        std::vector<float> gws(helix::kernels::PagedAttentionWorkspaceBytes(gp) / 4 + 16);
        const auto gqa = [&] { helix::kernels::PagedAttentionCpu(gp, gws.data(), &pool); };
        gqa();
        report("gqa", BestSeconds(args.reps, gqa), 2.0 * heads * 2 * kGqaDim);
      }
    }
  }
  return 0;
}
