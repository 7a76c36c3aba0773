// Decode-attention bandwidth on the CPU: one decode step (batch 1) of paged attention over
// 4K…128K tokens of KV, as bytes of KV read per second, next to a memory-copy bandwidth and a
// read-only bandwidth measured in the same run with the same threads.
//   attention_bench [--threads N] [--max-ctx TOKENS] [--dtype f32|bf16|f16|all] [--reps R]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kernels/attention.h"
#include "kernels/thread_pool.h"

namespace {

using Clock = std::chrono::steady_clock;
using helix::kernels::DType;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Best of `reps` runs of fn().
template <typename F>
double BestSeconds(int reps, F&& fn) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    auto t0 = Clock::now();
    fn();
    best = std::min(best, Seconds(t0, Clock::now()));
  }
  return best;
}

struct Args {
  int threads = 0;
  int64_t max_ctx = 131072;
  std::string dtype = "all";
  int reps = 5;
};

Args Parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i];
    if (k == "--threads")
      a.threads = std::atoi(argv[i + 1]);
    else if (k == "--max-ctx")
      a.max_ctx = std::atoll(argv[i + 1]);
    else if (k == "--dtype")
      a.dtype = argv[i + 1];
    else if (k == "--reps")
      a.reps = std::atoi(argv[i + 1]);
    else {
      std::fprintf(stderr, "unknown flag %s\n", k.c_str());
      std::exit(2);
    }
  }
  return a;
}

}  // namespace

int main(int argc, char** argv) {
  Args args = Parse(argc, argv);
  helix::kernels::ThreadPool pool(args.threads);
  const int threads = pool.size();
  // Llama-3-8B-like attention layer: 32 query heads, 8 KV heads, head_dim 128.
  const int64_t Hq = 32, Hkv = 8, hd = 128, tpb = 32;
  const int64_t max_blocks = (args.max_ctx + tpb - 1) / tpb;

  // Reference bandwidths over a buffer as large as the biggest fp32 KV.
  const size_t ref_bytes = static_cast<size_t>(max_blocks * tpb * Hkv * hd * 2 * 4);
  std::vector<char> src(ref_bytes, 1), dst(ref_bytes, 0);
  auto copy = [&] {
    pool.ParallelFor(static_cast<int64_t>(ref_bytes / 4096), [&](int64_t b, int64_t e) {
      std::memcpy(dst.data() + b * 4096, src.data() + b * 4096, (e - b) * 4096);
    });
  };
  copy();
  const double copy_s = BestSeconds(args.reps, copy);
  const double copy_bw = 2.0 * ref_bytes / copy_s;  // read + write
  std::vector<double> partial(threads * 16, 0);
  auto read = [&] {
    const float* f = reinterpret_cast<const float*>(src.data());
    const int64_t n = static_cast<int64_t>(ref_bytes / 4);
    std::atomic<int> slot{0};
    pool.ParallelFor(n / 1024, [&](int64_t b, int64_t e) {
      float acc[16] = {};
      for (int64_t i = b * 1024; i < e * 1024; i += 16) {
        for (int j = 0; j < 16; ++j) acc[j] += f[i + j];
      }
      float s = 0;
      for (float x : acc) s += x;
      partial[(slot++ % threads) * 16] += s;
    });
  };
  read();
  const double read_s = BestSeconds(args.reps, read);
  const double read_bw = ref_bytes / read_s;
  std::printf("# threads %d; reference buffer %.2f GiB\n", threads, ref_bytes / 1073741824.0);
  std::printf("# copy bandwidth (read+write) %.2f GB/s; read-only bandwidth %.2f GB/s\n",
              copy_bw / 1e9, read_bw / 1e9);
  std::printf("%-6s %8s %10s %10s %10s %12s %12s\n", "dtype", "ctx", "KV MiB", "ms/step", "KV GB/s",
              "/copy bw", "/read bw");

  std::vector<DType> dtypes;
  if (args.dtype == "all" || args.dtype == "f32") dtypes.push_back(DType::kF32);
  if (args.dtype == "all" || args.dtype == "bf16") dtypes.push_back(DType::kBF16);
  if (args.dtype == "all" || args.dtype == "f16") dtypes.push_back(DType::kF16);

  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1, 1);
  std::vector<float> q(Hq * hd), out(Hq * hd), lse(Hq);
  for (float& x : q) x = u(rng);

  for (DType dt : dtypes) {
    helix::kernels::KvPoolView kv{};
    kv.dtype = dt;
    kv.num_layers = 1;
    kv.num_kv_heads = Hkv;
    kv.tokens_per_block = tpb;
    kv.head_dim = hd;
    const size_t pool_bytes = max_blocks * kv.block_elems() * helix::kernels::DTypeSize(dt);
    std::vector<char> kvmem(pool_bytes);
    kv.base = kvmem.data();
    // Random K/V (written through the same conversion the engine uses).
    std::vector<float> kt(Hkv * hd), vt(Hkv * hd);
    for (int64_t b = 0; b < max_blocks; ++b) {
      for (int64_t t = 0; t < tpb; ++t) {
        for (auto& x : kt) x = u(rng);
        for (auto& x : vt) x = u(rng);
        helix::kernels::WriteKv(kv, b, 0, t, kt.data(), vt.data());
      }
    }
    // Blocks in a shuffled order, as a real pool hands them out over time.
    std::vector<int32_t> table(max_blocks), first(max_blocks);
    for (int64_t b = 0; b < max_blocks; ++b) table[b] = static_cast<int32_t>(b);
    std::shuffle(table.begin(), table.end(), rng);
    for (int64_t b = 0; b < max_blocks; ++b) first[b] = static_cast<int32_t>(b * tpb);

    for (int64_t ctx = 4096; ctx <= args.max_ctx; ctx *= 2) {
      int32_t q_seq = 0, q_pos = static_cast<int32_t>(ctx - 1), kv_len = static_cast<int32_t>(ctx);
      helix::kernels::PagedAttentionParams p{};
      p.q = q.data();
      p.q_seq = &q_seq;
      p.q_pos = &q_pos;
      p.kv = kv;
      p.layer = 0;
      p.block_tables = table.data();
      p.block_first_pos = first.data();
      p.kv_lens = &kv_len;
      p.max_blocks_per_seq = max_blocks;
      p.num_seqs = 1;
      p.num_q_tokens = 1;
      p.num_q_heads = Hq;
      p.num_kv_heads = Hkv;
      p.head_dim = hd;
      p.scale = 1.0f / std::sqrt(static_cast<float>(hd));
      p.out = out.data();
      p.lse = lse.data();
      // Split the KV so every thread has work at batch 1 (split-KV + merge).
      int64_t split = (ctx / (threads * 4) + tpb - 1) / tpb * tpb;
      p.kv_split_tokens = threads > 1 ? std::max<int64_t>(split, tpb) : 0;
      std::vector<char> ws(helix::kernels::PagedAttentionWorkspaceBytes(p) + 64);
      auto step = [&] { helix::kernels::PagedAttentionCpu(p, ws.data(), &pool); };
      step();
      const double s = BestSeconds(args.reps, step);
      const double bytes = static_cast<double>(ctx) * Hkv * hd * 2 * helix::kernels::DTypeSize(dt);
      std::printf("%-6s %8lld %10.1f %10.3f %10.2f %12.2f %12.2f\n", helix::kernels::DTypeName(dt),
                  static_cast<long long>(ctx), bytes / 1048576.0, s * 1e3, bytes / s / 1e9,
                  bytes / s / copy_bw, bytes / s / read_bw);
    }
  }
  return 0;
}
