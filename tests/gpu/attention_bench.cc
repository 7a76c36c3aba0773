// Decode attention bandwidth on the GPU: PagedAttentionCuda (bf16 KV, head_dim 128 or 64, 32 query
// heads / 8 KV heads, 1 layer, 32 tokens per block, blocks shuffled in the pool, pseudo-random
// K/V) for KV 4K..256K tokens x batch 1, 4, 16, against two references over the same byte
// count measured in the same run: a pure-read kernel (the main reference: attention only reads
// the KV) and a device-to-device cudaMemcpy (read + write counted). Everything is timed as CUDA
// graphs of back-to-back iterations that cycle over enough copies of the data to keep every
// iteration out of L2. With variants on (the default), a few settings of the kernel
// (PagedAttentionCudaTuning) are timed side by side and their outputs checked against the
// default's.
//
// --mla times MlaAttentionCuda instead (DeepSeek V2/V3 absorbed decode: bf16 rows of latent 512 +
// rope 64, 64 tokens per block, blocks shuffled) for 16 and 128 heads per rank, KV 4K..128K
// tokens x batch 1, 4, 16, against the same two references, and also reports TFLOP/s (2 x heads
// x (576 + 512) per cached row) against an fp32 FMA throughput kernel timed in the same run: at
// these head counts the kernel does ~30-240 flops per KV byte, so it is compute bound.
//
// --prefill times one causal prompt of 1K..32K tokens (bf16 KV, 32 / 8 heads, head dims 128 and
// 64) on the default kernel (up to 8K) and on the tensor-core prefill kernel, with TFLOP/s.
//
// Usage: attention_bench [--mla | --prefill] [--csv FILE] [--quick] [--no-variants]
// [--head-dim 64|128] [--tokens N,N,...] [--batches N,N,...] (the last three: the decode mode;
// --head-dim 64 is Llama-3.2-1B's shape, the end-to-end benchmark's). Exits 0 with a note when no
// GPU is visible.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/attention.h"
#include "kernels/cuda/attention_cuda.h"
#include "kernels/cuda/mla_attention_cuda.h"
#include "kernels/mla_attention.h"
#include "tests/gpu/bench_kernels.h"
#include "tests/gpu/gpu_test_util.h"

namespace helix {
namespace {

using gpu_testing::DeviceBuffer;
using kernels::DType;
using kernels::KvPoolView;
using kernels::MergeStatesParams;
using kernels::MlaAttentionParams;
using kernels::PagedAttentionParams;
using kernels::cuda::PagedAttentionCudaTuning;

// Kernel settings timed side by side; the first is the default and the reported "ours".
// sequential: the same kernel with every sequence's blocks in pool order (not shuffled), to
// show what the paged layout costs; diagnostic: output not checked (load_only); early_kv:
// PagedAttentionParams::kv_settled_below_q (true here: nothing writes the KV, q or the tables,
// so each iteration's first KV copies overlap the kernel before it, the last one's merge).
struct Variant {
  const char* name;
  PagedAttentionCudaTuning tuning;
  bool sequential = false;
  bool diagnostic = false;
  bool early_kv = false;
};
const Variant kVariants[] = {
    {"ours", {}},
    {"pf2", {.prefetch_steps = 2}},
    {"w4s3", {.warps_per_block = 4, .stages = 3}},
    {"w4s4", {.warps_per_block = 4, .stages = 4}},
    {"w8s3", {.warps_per_block = 8, .stages = 3}},
    {"bulk", {.bulk_copy = true}},
    {"mma", {.tensor_cores = true}},
    {"mma8w", {.warps_per_block = 8, .stages = 3, .tensor_cores = true}},
    {"ek", {}, false, false, true},
    {"mmaek", {.tensor_cores = true}, false, false, true},
    // Fewer, longer split-KV chunks than the one-wave default (fewer partial rows to merge; at
    // 4K x 1 mc4k is no split at all).
    {"mc512", {.min_chunk_tokens = 512}},
    {"mc2k", {.min_chunk_tokens = 2048}},
    {"mc4k", {.min_chunk_tokens = 4096}},
    {"loadonly", {.load_only = true}, false, true},
    {"bulkload", {.load_only = true, .bulk_copy = true}, false, true},
};

constexpr int64_t kQHeads = 32, kKvHeads = 8, kTpb = 32;
// The decode mode's head dim (--head-dim: 128, the default, or 64, Llama-3.2-1B's).
int64_t g_dim = 128;
constexpr int64_t kElem = 2;  // bf16
// Every timed iteration touches fresh data: iterations cycle over copies of the KV (and of
// the copy's source and destination) adding up to at least this many bytes (H200 L2: 50 MB).
constexpr int64_t kRotateBytes = 512ll << 20;

int64_t KvBytes(int64_t batch, int64_t tokens) {
  return batch * tokens * kKvHeads * g_dim * kElem * 2;
}

// Median time of one iteration of `graph` (which runs `iters` of them) over `runs` launches.
// The largest pool any (tokens, batch) shape needs: enough replicas of its KV bytes to cover
// kRotateBytes, so that the timed launches cycle through more memory than the L2 holds.
int64_t RotatedPoolBytes(const std::vector<int64_t>& token_counts,
                         const std::vector<int64_t>& batches,
                         int64_t (*kv_bytes)(int64_t batch, int64_t tokens)) {
  int64_t max_pool = 0;
  for (int64_t t : token_counts) {
    for (int64_t b : batches) {
      const int64_t bytes = kv_bytes(b, t);
      const int64_t reps = std::max<int64_t>(1, (kRotateBytes + bytes - 1) / bytes);
      max_pool = std::max(max_pool, reps * bytes);
    }
  }
  return max_pool;
}

// n draws, uniform in [-1, 1): the queries.
std::vector<float> UniformVector(std::mt19937& rng, int64_t n) {
  std::vector<float> v(n);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  for (float& x : v) {
    x = dist(rng);
  }
  return v;
}

double TimeGraph(cudaGraphExec_t graph, int iters, int runs, cudaStream_t s) {
  cudaEvent_t a, b;
  HELIX_CUDA_OK(cudaEventCreate(&a));
  HELIX_CUDA_OK(cudaEventCreate(&b));
  HELIX_CUDA_OK(cudaGraphLaunch(graph, s));  // warm-up
  HELIX_CUDA_OK(cudaStreamSynchronize(s));
  std::vector<double> ms;
  for (int r = 0; r < runs; ++r) {
    HELIX_CUDA_OK(cudaEventRecord(a, s));
    HELIX_CUDA_OK(cudaGraphLaunch(graph, s));
    HELIX_CUDA_OK(cudaEventRecord(b, s));
    HELIX_CUDA_OK(cudaEventSynchronize(b));
    float t = 0;
    HELIX_CUDA_OK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(static_cast<double>(t) / iters);
  }
  HELIX_CUDA_OK(cudaEventDestroy(a));
  HELIX_CUDA_OK(cudaEventDestroy(b));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

template <typename F>
cudaGraphExec_t Capture(cudaStream_t s, int iters, F&& body) {
  cudaGraph_t g;
  HELIX_CUDA_OK(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed));
  for (int i = 0; i < iters; ++i) {
    body(i);
  }
  HELIX_CUDA_OK(cudaStreamEndCapture(s, &g));
  cudaGraphExec_t exec;
  HELIX_CUDA_OK(cudaGraphInstantiate(&exec, g, 0));
  HELIX_CUDA_OK(cudaGraphDestroy(g));
  return exec;
}

// ---------------------------------------------------------------------------------------------
// MLA mode

constexpr int64_t kMlaLatent = 512, kMlaRope = 64, kMlaRow = kMlaLatent + kMlaRope, kMlaTpb = 64;

int64_t MlaKvBytes(int64_t batch, int64_t tokens) { return batch * tokens * kMlaRow * kElem; }

// Milliseconds of one direct launch of `launch` (after one warm-up), to size the graphs.
template <typename F>
double TimeOnce(cudaStream_t s, F&& launch) {
  cudaEvent_t a, b;
  HELIX_CUDA_OK(cudaEventCreate(&a));
  HELIX_CUDA_OK(cudaEventCreate(&b));
  launch();
  HELIX_CUDA_OK(cudaEventRecord(a, s));
  launch();
  HELIX_CUDA_OK(cudaEventRecord(b, s));
  HELIX_CUDA_OK(cudaEventSynchronize(b));
  float t = 0;
  HELIX_CUDA_OK(cudaEventElapsedTime(&t, a, b));
  HELIX_CUDA_OK(cudaEventDestroy(a));
  HELIX_CUDA_OK(cudaEventDestroy(b));
  return static_cast<double>(t);
}

// Practical fp32 FMA throughput of the device in TFLOP/s (best of a few ~20 ms launches).
double MeasureFmaPeak(cudaStream_t s) {
  DeviceBuffer<float> sink(1);
  double flops = 0.0;
  const auto launch = [&](int iters) {
    HELIX_CUDA_OK(gpu_testing::LaunchFmaPeak(iters, sink.get(), &flops, s));
  };
  int iters = 64;
  double ms = TimeOnce(s, [&] { launch(iters); });
  iters = static_cast<int>(std::clamp(iters * 20.0 / std::max(ms, 1e-3), 64.0, 1e6));
  double best = 0.0;
  for (int r = 0; r < 3; ++r) {
    ms = TimeOnce(s, [&] { launch(iters); });
    best = std::max(best, flops / (ms * 1e9));
  }
  return best;
}

int MlaMain(const std::string& csv_path, bool quick) {
  cudaDeviceProp prop;
  HELIX_CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s (%d SMs, %.0f MiB, L2 %.0f MiB)\n", prop.name, prop.multiProcessorCount,
              prop.totalGlobalMem / 1048576.0, prop.l2CacheSize / 1048576.0);
  cudaStream_t stream;
  HELIX_CUDA_OK(cudaStreamCreate(&stream));
  const double fma_tflops = MeasureFmaPeak(stream);
  std::printf(
      "MLA decode (MlaAttentionCuda): bf16 pool rows of latent %lld + rope %lld, 1 layer, %lld "
      "tokens/block, blocks shuffled, 1 query token per sequence, split-KV as "
      "MlaAttentionCudaSplitTokens chooses\n",
      static_cast<long long>(kMlaLatent), static_cast<long long>(kMlaRope),
      static_cast<long long>(kMlaTpb));
  std::printf(
      "GB/s = KV bytes (each cached row counted once, though every 16-head group reads it) / time; "
      "/read = GB/s over a streaming-read kernel's GB/s on the same bytes; /D2D = GB/s over a D2D "
      "cudaMemcpy's GB/s (read + write counted) on the same bytes; TFLOP/s = 2 x heads x (%lld + "
      "%lld) flops per cached row / time; /FMA = over an fp32 FMA kernel's %.1f TFLOP/s measured "
      "in this run\n",
      static_cast<long long>(kMlaRow), static_cast<long long>(kMlaLatent), fma_tflops);

  std::vector<int64_t> token_counts = {4096, 16384, 32768, 65536, 131072};
  std::vector<int64_t> batches = {1, 4, 16};
  const std::vector<int64_t> head_counts = {16, 128};
  if (quick) {
    token_counts = {4096, 32768};
    batches = {1, 4};
  }
  const int64_t max_pool = RotatedPoolBytes(token_counts, batches, MlaKvBytes);
  DeviceBuffer<unsigned char> pool(static_cast<size_t>(max_pool));
  DeviceBuffer<unsigned char> copy_dst(static_cast<size_t>(max_pool));
  DeviceBuffer<unsigned> sink(1);
  HELIX_CUDA_OK(gpu_testing::LaunchFillBf16(pool.get(), pool.size() / 2, 11, stream));
  HELIX_CUDA_OK(cudaMemsetAsync(copy_dst.get(), 0, copy_dst.size(), stream));
  HELIX_CUDA_OK(cudaStreamSynchronize(stream));

  FILE* csv = csv_path.empty() ? nullptr : std::fopen(csv_path.c_str(), "w");
  if (csv != nullptr) {
    std::fprintf(csv,
                 "tokens,batch,heads,kv_mb,splits,ms,gbps,read_gbps,frac_read,copy_gbps,frac_copy,"
                 "tflops,fma_tflops,frac_fma\n");
  }
  std::printf("%8s %5s %5s %8s %6s %9s %6s %9s %6s %8s %6s %7s %6s\n", "tokens", "batch", "heads",
              "KV MiB", "splits", "ms", "GB/s", "read GB/s", "/read", "D2D GB/s", "/D2D", "TFLOP/s",
              "/FMA");
  std::mt19937 rng(2);
  const int runs = quick ? 3 : 5;
  for (int64_t tokens : token_counts) {
    for (int64_t batch : batches) {
      const int64_t bytes = MlaKvBytes(batch, tokens);
      const int64_t reps = std::max<int64_t>(1, (kRotateBytes + bytes - 1) / bytes);
      const int64_t blocks_per_seq = tokens / kMlaTpb;
      const int64_t blocks_per_rep = batch * blocks_per_seq;
      std::vector<int32_t> tables(reps * blocks_per_rep);
      for (int64_t r = 0; r < reps; ++r) {
        std::vector<int32_t> ids(blocks_per_rep);
        std::iota(ids.begin(), ids.end(), static_cast<int32_t>(r * blocks_per_rep));
        std::shuffle(ids.begin(), ids.end(), rng);
        std::copy(ids.begin(), ids.end(), tables.begin() + r * blocks_per_rep);
      }
      std::vector<int32_t> firsts(blocks_per_rep);
      for (int64_t s = 0; s < batch; ++s) {
        for (int64_t j = 0; j < blocks_per_seq; ++j) {
          firsts[s * blocks_per_seq + j] = static_cast<int32_t>(j * kMlaTpb);
        }
      }
      std::vector<int32_t> q_seq(batch), q_pos(batch, static_cast<int32_t>(tokens - 1)),
          lens(batch, static_cast<int32_t>(tokens));
      std::iota(q_seq.begin(), q_seq.end(), 0);
      DeviceBuffer<int32_t> d_tables(tables), d_firsts(firsts), d_seq(q_seq), d_pos(q_pos),
          d_lens(lens);

      // The references depend on the bytes only: timed once for both head counts.
      const auto copy_body = [&](int i) {
        const int64_t off = (i % reps) * bytes;
        HELIX_CUDA_OK(cudaMemcpyAsync(copy_dst.get() + off, pool.get() + off,
                                      static_cast<size_t>(bytes), cudaMemcpyDeviceToDevice,
                                      stream));
      };
      const auto read_body = [&](int i) {
        HELIX_CUDA_OK(gpu_testing::LaunchReadReduce(
            pool.get() + (i % reps) * bytes, static_cast<size_t>(bytes), sink.get(), stream));
      };
      // Enough iterations per graph for ~2 ms at 4 TB/s, at least one per replica.
      const int ref_iters = static_cast<int>(
          std::clamp<int64_t>((8ll << 30) / std::max<int64_t>(bytes, 1), reps, 200));
      cudaGraphExec_t copy = Capture(stream, ref_iters, copy_body);
      cudaGraphExec_t read = Capture(stream, ref_iters, read_body);
      const double copy_ms = TimeGraph(copy, ref_iters, runs, stream);
      const double read_ms = TimeGraph(read, ref_iters, runs, stream);
      HELIX_CUDA_OK(cudaGraphExecDestroy(copy));
      HELIX_CUDA_OK(cudaGraphExecDestroy(read));
      const double read_gbps = bytes / (read_ms * 1e6);
      const double copy_gbps = 2.0 * bytes / (copy_ms * 1e6);

      for (int64_t heads : head_counts) {
        const std::vector<float> q = UniformVector(rng, batch * heads * kMlaRow);
        DeviceBuffer<float> d_q(q), d_out(batch * heads * kMlaLatent), d_lse(batch * heads);
        MlaAttentionParams p{.q = d_q.get(),
                             .q_seq = d_seq.get(),
                             .q_pos = d_pos.get(),
                             .kv = KvPoolView{pool.get(), DType::kBF16, 1, 1, kMlaTpb, kMlaRow, 1},
                             .layer = 0,
                             .block_tables = d_tables.get(),
                             .block_first_pos = d_firsts.get(),
                             .kv_lens = d_lens.get(),
                             .max_blocks_per_seq = blocks_per_seq,
                             .num_seqs = batch,
                             .num_q_tokens = batch,
                             .num_heads = heads,
                             .latent_dim = kMlaLatent,
                             .rope_dim = kMlaRope,
                             // DeepSeek V3: 192^-0.5 x yarn mscale(40, 1)^2.
                             .scale = 0.1352f,
                             .out = d_out.get(),
                             .lse = d_lse.get(),
                             .kv_split_tokens = 0};
        p.kv_split_tokens = kernels::cuda::MlaAttentionCudaSplitTokens(p);
        const int64_t splits =
            p.kv_split_tokens > 0 ? (tokens + p.kv_split_tokens - 1) / p.kv_split_tokens : 1;
        DeviceBuffer<unsigned char> ws(kernels::cuda::MlaAttentionCudaWorkspaceBytes(p));
        HELIX_CUDA_OK(cudaMemsetAsync(d_out.get(), 0xff, d_out.size() * sizeof(float), stream));
        const double once_ms = TimeOnce(
            stream, [&] { HELIX_CUDA_OK(kernels::cuda::MlaAttentionCuda(p, ws.get(), stream)); });
        bool bad = false;
        for (float x : d_out.Download()) {
          bad = bad || !std::isfinite(x);
        }
        for (float x : d_lse.Download()) {
          bad = bad || !std::isfinite(x);
        }
        // Compute bound at many heads: size the graph by the measured time (~3 ms), not the
        // bytes, but still cycle through every replica.
        const int iters = static_cast<int>(std::clamp<int64_t>(
            static_cast<int64_t>(std::ceil(3.0 / std::max(once_ms, 1e-3))), reps, 400));
        cudaGraphExec_t attn = Capture(stream, iters, [&](int i) {
          MlaAttentionParams pi = p;
          pi.block_tables = d_tables.get() + (i % reps) * blocks_per_rep;
          HELIX_CUDA_OK(kernels::cuda::MlaAttentionCuda(pi, ws.get(), stream));
        });
        const double ms = TimeGraph(attn, iters, runs, stream);
        HELIX_CUDA_OK(cudaGraphExecDestroy(attn));

        const double gbps = bytes / (ms * 1e6);
        const double tflops =
            2.0 * heads * (kMlaRow + kMlaLatent) * static_cast<double>(batch * tokens) / (ms * 1e9);
        std::printf(
            "%8lld %5lld %5lld %8.1f %6lld %9.4f %6.0f %9.0f %6.3f %8.0f %6.3f %7.1f %6.3f%s\n",
            static_cast<long long>(tokens), static_cast<long long>(batch),
            static_cast<long long>(heads), bytes / 1048576.0, static_cast<long long>(splits), ms,
            gbps, read_gbps, gbps / read_gbps, copy_gbps, gbps / copy_gbps, tflops,
            tflops / fma_tflops, bad ? "  NON-FINITE OUTPUT" : "");
        std::fflush(stdout);
        if (csv != nullptr) {
          std::fprintf(csv,
                       "%lld,%lld,%lld,%.1f,%lld,%.5f,%.1f,%.1f,%.4f,%.1f,%.4f,%.2f,%.2f,%.4f\n",
                       static_cast<long long>(tokens), static_cast<long long>(batch),
                       static_cast<long long>(heads), bytes / 1048576.0,
                       static_cast<long long>(splits), ms, gbps, read_gbps, gbps / read_gbps,
                       copy_gbps, gbps / copy_gbps, tflops, fma_tflops, tflops / fma_tflops);
        }
      }
    }
  }
  if (csv != nullptr) {
    std::fclose(csv);
  }
  HELIX_CUDA_OK(cudaStreamDestroy(stream));
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Prefill mode: one causal prompt of L tokens (every token queries positions 0..itself), bf16 KV,
// 32 query / 8 KV heads, head dims 128 and 64, 32 tokens per block, blocks shuffled. The default
// kernel reads the KV once per query token; the tensor-core prefill kernel
// (PagedAttentionCudaTuning::tensor_cores) once per 64 (query token, head) rows. TFLOP/s counts
// 4 x heads x head_dim flops per visible (query, key) pair (q.k and p.v).

int PrefillMain(const std::string& csv_path, bool quick) {
  cudaDeviceProp prop;
  HELIX_CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s (%d SMs)\n", prop.name, prop.multiProcessorCount);
  std::printf(
      "prefill: one causal prompt, bf16 KV, %lld q heads / %lld kv heads, %lld tokens/block; "
      "default = PagedAttentionCuda's default kernel (run up to 8K tokens: it reads the KV once "
      "per query token), mma = its tensor-core prefill kernel; ms = median of 3 launches; "
      "maxdiff = largest |default - mma| over the outputs\n",
      static_cast<long long>(kQHeads), static_cast<long long>(kKvHeads),
      static_cast<long long>(kTpb));
  std::vector<int64_t> lengths = {1024, 4096, 8192, 16384, 32768};
  if (quick) {
    lengths = {4096, 16384};
  }
  cudaStream_t stream;
  HELIX_CUDA_OK(cudaStreamCreate(&stream));
  FILE* csv = csv_path.empty() ? nullptr : std::fopen(csv_path.c_str(), "w");
  if (csv != nullptr) {
    std::fprintf(csv, "tokens,head_dim,default_ms,mma_ms,mma_tflops,speedup,maxdiff\n");
  }
  std::printf("%8s %8s %11s %9s %11s %8s %9s\n", "tokens", "head_dim", "default ms", "mma ms",
              "mma TFLOP/s", "speedup", "maxdiff");
  std::mt19937 rng(2);
  for (int64_t d : {int64_t{128}, int64_t{64}}) {
    for (int64_t len : lengths) {
      const int64_t blocks = len / kTpb;
      KvPoolView view{nullptr, DType::kBF16, 1, kKvHeads, kTpb, d};
      DeviceBuffer<unsigned char> pool(static_cast<size_t>(blocks * view.block_elems() * kElem));
      HELIX_CUDA_OK(gpu_testing::LaunchFillBf16(pool.get(), pool.size() / 2, 11, stream));
      view.base = pool.get();
      std::vector<int32_t> tables(blocks), firsts(blocks);
      std::iota(tables.begin(), tables.end(), 0);
      std::shuffle(tables.begin(), tables.end(), rng);
      for (int64_t j = 0; j < blocks; ++j) {
        firsts[j] = static_cast<int32_t>(j * kTpb);
      }
      std::vector<int32_t> q_seq(len, 0), q_pos(len), lens(1, static_cast<int32_t>(len));
      std::iota(q_pos.begin(), q_pos.end(), 0);
      const std::vector<float> q = UniformVector(rng, len * kQHeads * d);
      DeviceBuffer<int32_t> d_tables(tables), d_firsts(firsts), d_seq(q_seq), d_pos(q_pos),
          d_lens(lens);
      DeviceBuffer<float> d_q(q), d_out(q.size()), d_lse(len * kQHeads);
      PagedAttentionParams p{.q = d_q.get(),
                             .q_seq = d_seq.get(),
                             .q_pos = d_pos.get(),
                             .kv = view,
                             .layer = 0,
                             .block_tables = d_tables.get(),
                             .block_first_pos = d_firsts.get(),
                             .kv_lens = d_lens.get(),
                             .max_blocks_per_seq = blocks,
                             .num_seqs = 1,
                             .num_q_tokens = len,
                             .num_q_heads = kQHeads,
                             .num_kv_heads = kKvHeads,
                             .head_dim = d,
                             .scale = 1.0f / std::sqrt(static_cast<float>(d)),
                             .out = d_out.get(),
                             .lse = d_lse.get(),
                             .kv_split_tokens = 0};
      // Median of 3 timed launches; the outputs of the last.
      const auto run = [&](bool mma, std::vector<float>* out) {
        kernels::cuda::SetPagedAttentionCudaTuningForTesting({.tensor_cores = mma});
        PagedAttentionParams pp = p;
        pp.kv_split_tokens = kernels::cuda::PagedAttentionCudaSplitTokens(pp);
        DeviceBuffer<unsigned char> ws(kernels::cuda::PagedAttentionCudaWorkspaceBytes(pp));
        const std::string name = kernels::cuda::PagedAttentionCudaKernelName(pp);
        if (mma && name != "mma_prefill") {
          std::printf("attention_bench: expected the prefill kernel, got %s\n", name.c_str());
        }
        std::vector<double> ms;
        for (int r = 0; r < 3; ++r) {  // each: one untimed launch, then one timed
          ms.push_back(TimeOnce(stream, [&] {
            HELIX_CUDA_OK(kernels::cuda::PagedAttentionCuda(pp, ws.get(), stream));
          }));
        }
        out->resize(q.size());
        HELIX_CUDA_OK(cudaStreamSynchronize(stream));
        HELIX_CUDA_OK(cudaMemcpy(out->data(), d_out.get(), out->size() * sizeof(float),
                                 cudaMemcpyDeviceToHost));
        kernels::cuda::SetPagedAttentionCudaTuningForTesting({});
        std::sort(ms.begin(), ms.end());
        return ms[ms.size() / 2];
      };
      std::vector<float> out_default, out_mma;
      const double mma_ms = run(true, &out_mma);
      const double default_ms = len <= 8192 ? run(false, &out_default) : NAN;
      double max_diff = NAN;
      if (!out_default.empty()) {
        max_diff = 0.0;
        for (size_t k = 0; k < out_mma.size(); ++k) {
          const double df = std::fabs(static_cast<double>(out_mma[k]) - out_default[k]);
          max_diff = std::isnan(df) ? INFINITY : std::max(max_diff, df);
        }
      }
      const double flops = 4.0 * static_cast<double>(len) * static_cast<double>(len + 1) / 2.0 *
                           static_cast<double>(kQHeads * d);
      const double tflops = flops / (mma_ms * 1e9);
      std::printf("%8lld %8lld %11.3f %9.3f %11.1f %8.1f %9.2e\n", static_cast<long long>(len),
                  static_cast<long long>(d), default_ms, mma_ms, tflops, default_ms / mma_ms,
                  max_diff);
      std::fflush(stdout);
      if (csv != nullptr) {
        std::fprintf(csv, "%lld,%lld,%.4f,%.4f,%.2f,%.2f,%.3g\n", static_cast<long long>(len),
                     static_cast<long long>(d), default_ms, mma_ms, tflops, default_ms / mma_ms,
                     max_diff);
        std::fflush(csv);
      }
    }
  }
  if (csv != nullptr) {
    std::fclose(csv);
  }
  HELIX_CUDA_OK(cudaStreamDestroy(stream));
  return 0;
}

// The comma-separated items of `text` (empty ones included).
std::vector<std::string> SplitCommas(const std::string& text) {
  std::vector<std::string> items;
  for (size_t i = 0; i <= text.size();) {
    const size_t j = std::min(text.find(',', i), text.size());
    items.push_back(text.substr(i, j - i));
    i = j + 1;
  }
  return items;
}

// A comma-separated list of positive integers into *out; false when it is not one.
bool ParseList(const char* text, std::vector<int64_t>* out) {
  out->clear();
  for (const std::string& item : SplitCommas(text)) {
    char* end = nullptr;
    const long long v = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || v <= 0) {
      return false;
    }
    out->push_back(v);
  }
  return !out->empty();
}

int Main(int argc, char** argv) {
  std::string csv_path;
  bool quick = false;
  std::vector<int64_t> tokens_arg, batches_arg;
  std::vector<std::string> variant_names;  // --variants: these only (besides "ours")
  bool once = false;
  bool variants = true;
  bool mla = false;
  bool prefill = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--csv") == 0 && i + 1 < argc) {
      csv_path = argv[++i];
    } else if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else if (std::strcmp(argv[i], "--no-variants") == 0) {
      variants = false;
    } else if (std::strcmp(argv[i], "--variants") == 0 && i + 1 < argc) {
      variant_names = SplitCommas(argv[++i]);
    } else if (std::strcmp(argv[i], "--once") == 0) {
      once = true;
    } else if (std::strcmp(argv[i], "--mla") == 0) {
      mla = true;
    } else if (std::strcmp(argv[i], "--prefill") == 0) {
      prefill = true;
    } else if (std::strcmp(argv[i], "--head-dim") == 0 && i + 1 < argc &&
               (std::strcmp(argv[i + 1], "64") == 0 || std::strcmp(argv[i + 1], "128") == 0)) {
      g_dim = std::atoi(argv[++i]);
    } else if (std::strcmp(argv[i], "--tokens") == 0 && i + 1 < argc &&
               ParseList(argv[i + 1], &tokens_arg)) {
      ++i;
    } else if (std::strcmp(argv[i], "--batches") == 0 && i + 1 < argc &&
               ParseList(argv[i + 1], &batches_arg)) {
      ++i;
    } else {
      std::fprintf(stderr,
                   "usage: %s [--mla | --prefill] [--csv FILE] [--quick] [--no-variants] "
                   "[--variants NAME,...] [--once] [--head-dim 64|128] [--tokens N,N,...] "
                   "[--batches N,N,...]\n"
                   "(--head-dim, --tokens, --batches, --variants and --once: the decode mode; "
                   "tokens are multiples of %lld; --once: each variant's call once, untimed, for "
                   "a profiler)\n",
                   argv[0], static_cast<long long>(kTpb));
      return 2;
    }
  }
  for (const std::string& name : variant_names) {
    if (std::none_of(std::begin(kVariants) + 1, std::end(kVariants),
                     [&](const Variant& v) { return name == v.name; })) {
      std::fprintf(stderr, "attention_bench: --variants: no variant named '%s'\n", name.c_str());
      return 2;
    }
  }
  for (const int64_t t : tokens_arg) {
    if (t % kTpb != 0) {
      std::fprintf(stderr, "attention_bench: --tokens %lld is not a multiple of %lld\n",
                   static_cast<long long>(t), static_cast<long long>(kTpb));
      return 2;
    }
  }
  const std::string why = gpu_testing::NoGpuReason();
  if (!why.empty()) {
    std::printf("attention_bench: skipped: %s\n", why.c_str());
    return 0;
  }
  if (mla) {
    return MlaMain(csv_path, quick);
  }
  if (prefill) {
    return PrefillMain(csv_path, quick);
  }
  const int64_t dim = g_dim;
  cudaDeviceProp prop;
  HELIX_CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s (%d SMs, %.0f MiB, L2 %.0f MiB)\n", prop.name, prop.multiProcessorCount,
              prop.totalGlobalMem / 1048576.0, prop.l2CacheSize / 1048576.0);
  std::printf(
      "shapes: bf16 KV, head_dim %lld, %lld q heads / %lld kv heads (GQA group %lld), "
      "1 layer, %lld tokens/block, 1 query token per sequence; KV blocks shuffled\n",
      static_cast<long long>(dim), static_cast<long long>(kQHeads),
      static_cast<long long>(kKvHeads), static_cast<long long>(kQHeads / kKvHeads),
      static_cast<long long>(kTpb));
  std::printf(
      "GB/s = KV bytes read / time; read GB/s = the same bytes read by a plain streaming-read "
      "kernel; frac = GB/s / read GB/s; D2D GB/s = 2 x bytes / time of a D2D cudaMemcpy of the "
      "same bytes (read + write)\n");
  // The variants run: "ours" first, then all of them, the --variants list or none.
  std::vector<const Variant*> vars = {&kVariants[0]};
  for (size_t v = 1; variants && v < std::size(kVariants); ++v) {
    const std::string name = kVariants[v].name;
    if (variant_names.empty() ||
        std::find(variant_names.begin(), variant_names.end(), name) != variant_names.end()) {
      vars.push_back(&kVariants[v]);
    }
  }
  const size_t num_variants = vars.size();
  if (num_variants > 1) {
    std::printf("variants (ms; maxdiff = largest |out - ours out| over them):");
    for (size_t v = 1; v < num_variants; ++v) {
      const PagedAttentionCudaTuning& t = vars[v]->tuning;
      std::printf(
          " %s = {warps %d, stages %d, prefetch %d, min chunk %lld%s%s%s%s%s}%s", vars[v]->name,
          t.warps_per_block, t.stages, t.prefetch_steps, static_cast<long long>(t.min_chunk_tokens),
          vars[v]->sequential ? ", blocks in pool order" : "",
          t.bulk_copy ? ", TMA bulk copies per warp step" : "",
          t.load_only ? ", copies only (no math; output not checked)" : "",
          t.tensor_cores ? ", tensor-core math (mma.sync)" : "",
          vars[v]->early_kv ? ", first KV copies before the launch wait (kv_settled_below_q)" : "",
          v + 1 < num_variants ? ";" : "");
    }
    std::printf(" (0 = default)\n");
  }

  std::vector<int64_t> token_counts = {4096, 8192, 32768, 65536, 131072, 262144};
  std::vector<int64_t> batches = {1, 4, 16};
  if (quick) {
    token_counts = {4096, 32768};
    batches = {1, 4};
  }
  if (!tokens_arg.empty()) {
    token_counts = tokens_arg;
  }
  if (!batches_arg.empty()) {
    batches = batches_arg;
  }
  const int64_t max_pool = RotatedPoolBytes(token_counts, batches, KvBytes);
  // The pool (all replicas) doubles as the references' source; the copy's destination is as
  // big.
  DeviceBuffer<unsigned char> pool(static_cast<size_t>(max_pool));
  DeviceBuffer<unsigned char> copy_dst(static_cast<size_t>(max_pool));
  DeviceBuffer<unsigned> sink(1);
  cudaStream_t stream;
  HELIX_CUDA_OK(cudaStreamCreate(&stream));
  HELIX_CUDA_OK(gpu_testing::LaunchFillBf16(pool.get(), pool.size() / 2, 7, stream));
  HELIX_CUDA_OK(cudaMemsetAsync(copy_dst.get(), 0, copy_dst.size(), stream));
  HELIX_CUDA_OK(cudaStreamSynchronize(stream));

  FILE* csv = csv_path.empty() ? nullptr : std::fopen(csv_path.c_str(), "w");
  if (csv != nullptr) {
    std::fprintf(csv, "tokens,batch,kv_mb,ours_ms,ours_gbps,read_gbps,frac,copy_gbps,splits");
    for (size_t v = 1; v < num_variants; ++v) {
      std::fprintf(csv, ",%s_ms", vars[v]->name);
    }
    std::fprintf(csv, ",merge_ms,merge2p_ms,maxdiff\n");
  }
  std::printf("%8s %5s %8s %6s %9s %6s %8s %6s %8s", "tokens", "batch", "KV MiB", "splits",
              "ours ms", "GB/s", "read GB/s", "frac", "D2D GB/s");
  for (size_t v = 1; v < num_variants; ++v) {
    std::printf(" %8s", vars[v]->name);
  }
  std::printf(" %8s %8s%s\n", "merge", "merge2p", num_variants > 1 ? "  maxdiff" : "");
  std::mt19937 rng(1);
  for (int64_t tokens : token_counts) {
    for (int64_t batch : batches) {
      const int64_t bytes = KvBytes(batch, tokens);
      const int64_t reps = std::max<int64_t>(1, (kRotateBytes + bytes - 1) / bytes);
      const int64_t blocks_per_seq = tokens / kTpb;
      const int64_t blocks_per_rep = batch * blocks_per_seq;
      // Block tables of every replica: the replica's blocks in a random order.
      std::vector<int32_t> tables(reps * batch * blocks_per_seq);
      for (int64_t r = 0; r < reps; ++r) {
        std::vector<int32_t> ids(blocks_per_rep);
        std::iota(ids.begin(), ids.end(), static_cast<int32_t>(r * blocks_per_rep));
        std::shuffle(ids.begin(), ids.end(), rng);
        std::copy(ids.begin(), ids.end(), tables.begin() + r * blocks_per_rep);
      }
      std::vector<int32_t> firsts(batch * blocks_per_seq);
      for (int64_t s = 0; s < batch; ++s) {
        for (int64_t j = 0; j < blocks_per_seq; ++j) {
          firsts[s * blocks_per_seq + j] = static_cast<int32_t>(j * kTpb);
        }
      }
      std::vector<int32_t> q_seq(batch), q_pos(batch, static_cast<int32_t>(tokens - 1)),
          lens(batch, static_cast<int32_t>(tokens));
      std::iota(q_seq.begin(), q_seq.end(), 0);
      const std::vector<float> q = UniformVector(rng, batch * kQHeads * dim);
      std::vector<int32_t> seq_tables(tables.size());
      std::iota(seq_tables.begin(), seq_tables.end(), 0);
      DeviceBuffer<int32_t> d_tables(tables), d_seq_tables(seq_tables), d_firsts(firsts),
          d_seq(q_seq), d_pos(q_pos), d_lens(lens);
      DeviceBuffer<float> d_q(q), d_out(batch * kQHeads * dim), d_lse(batch * kQHeads);
      const KvPoolView kv{pool.get(), DType::kBF16, 1, kKvHeads, kTpb, dim};
      const PagedAttentionParams base{.q = d_q.get(),
                                      .q_seq = d_seq.get(),
                                      .q_pos = d_pos.get(),
                                      .kv = kv,
                                      .layer = 0,
                                      .block_tables = d_tables.get(),
                                      .block_first_pos = d_firsts.get(),
                                      .kv_lens = d_lens.get(),
                                      .max_blocks_per_seq = blocks_per_seq,
                                      .num_seqs = batch,
                                      .num_q_tokens = batch,
                                      .num_q_heads = kQHeads,
                                      .num_kv_heads = kKvHeads,
                                      .head_dim = dim,
                                      .scale = 1.0f / std::sqrt(static_cast<float>(dim)),
                                      .out = d_out.get(),
                                      .lse = d_lse.get(),
                                      .kv_split_tokens = 0};
      // Enough iterations per graph for ~2 ms of work at 4 TB/s, at least one per replica.
      const int iters = static_cast<int>(
          std::clamp<int64_t>((8ll << 30) / std::max<int64_t>(bytes, 1), reps, 200));
      const int runs = quick ? 3 : 7;

      // The references (not with --once: each variant's calls once, untimed, for a profiler).
      double copy_ms = 0.0, read_ms = 0.0;
      if (!once) {
        cudaGraphExec_t copy = Capture(stream, iters, [&](int i) {
          const int64_t off = (i % reps) * bytes;
          HELIX_CUDA_OK(cudaMemcpyAsync(copy_dst.get() + off, pool.get() + off,
                                        static_cast<size_t>(bytes), cudaMemcpyDeviceToDevice,
                                        stream));
        });
        cudaGraphExec_t read = Capture(stream, iters, [&](int i) {
          HELIX_CUDA_OK(gpu_testing::LaunchReadReduce(
              pool.get() + (i % reps) * bytes, static_cast<size_t>(bytes), sink.get(), stream));
        });
        copy_ms = TimeGraph(copy, iters, runs, stream);
        read_ms = TimeGraph(read, iters, runs, stream);
        HELIX_CUDA_OK(cudaGraphExecDestroy(copy));
        HELIX_CUDA_OK(cudaGraphExecDestroy(read));
      }

      std::vector<double> ms(num_variants);
      int64_t splits = 1;
      std::vector<float> ref_out, got_out(batch * kQHeads * dim);
      double max_diff = 0.0;
      for (size_t v = 0; v < num_variants; ++v) {
        kernels::cuda::SetPagedAttentionCudaTuningForTesting(vars[v]->tuning);
        const int32_t* var_tables = vars[v]->sequential ? d_seq_tables.get() : d_tables.get();
        PagedAttentionParams p = base;
        p.block_tables = var_tables;
        p.kv_settled_below_q = vars[v]->early_kv;
        p.kv_split_tokens = kernels::cuda::PagedAttentionCudaSplitTokens(p);
        if (v == 0) {
          splits = p.kv_split_tokens > 0 ? (tokens + p.kv_split_tokens - 1) / p.kv_split_tokens : 1;
        }
        DeviceBuffer<unsigned char> ws(kernels::cuda::PagedAttentionCudaWorkspaceBytes(p));
        HELIX_CUDA_OK(cudaMemsetAsync(d_out.get(), 0xff, d_out.size() * sizeof(float), stream));
        HELIX_CUDA_OK(kernels::cuda::PagedAttentionCuda(p, ws.get(), stream));  // attributes
        HELIX_CUDA_OK(cudaStreamSynchronize(stream));
        HELIX_CUDA_OK(cudaMemcpy(got_out.data(), d_out.get(), got_out.size() * sizeof(float),
                                 cudaMemcpyDeviceToHost));
        if (once) {
          std::printf("once: %lld tokens, batch %lld: %s (%s, split %lld tokens)\n",
                      static_cast<long long>(tokens), static_cast<long long>(batch), vars[v]->name,
                      kernels::cuda::PagedAttentionCudaKernelName(p),
                      static_cast<long long>(p.kv_split_tokens));
          continue;
        }
        if (v == 0) {
          ref_out = got_out;
        } else if (!vars[v]->diagnostic && !vars[v]->sequential) {
          for (size_t k = 0; k < got_out.size(); ++k) {
            const double d = std::fabs(static_cast<double>(got_out[k]) - ref_out[k]);
            max_diff = std::isnan(d) ? INFINITY : std::max(max_diff, d);
          }
        }
        cudaGraphExec_t attn = Capture(stream, iters, [&](int i) {
          PagedAttentionParams pi = p;
          pi.block_tables = var_tables + (i % reps) * batch * blocks_per_seq;
          HELIX_CUDA_OK(kernels::cuda::PagedAttentionCuda(pi, ws.get(), stream));
        });
        ms[v] = TimeGraph(attn, iters, runs, stream);
        HELIX_CUDA_OK(cudaGraphExecDestroy(attn));
      }
      kernels::cuda::SetPagedAttentionCudaTuningForTesting({});
      if (once) continue;
      // The default's split-KV merge alone (MergeStatesCuda over its parts), for its share of
      // "ours", on the one-pass kernel where the parts fit it (the default) and on the two-pass
      // one (PagedAttentionCudaTuning::merge_two_pass); 0 without a split.
      double merge_ms = 0.0, merge2p_ms = 0.0;
      if (splits > 1) {
        const int64_t rows = batch * kQHeads;
        DeviceBuffer<float> parts(static_cast<size_t>(splits * rows * (dim + 1)));
        HELIX_CUDA_OK(cudaMemsetAsync(parts.get(), 0, parts.size() * sizeof(float), stream));
        const MergeStatesParams mp{.o = parts.get(),
                                   .lse = parts.get() + splits * rows * dim,
                                   .out = d_out.get(),
                                   .out_lse = d_lse.get(),
                                   .num_parts = splits,
                                   .rows = rows,
                                   .head_dim = dim};
        for (bool two_pass : {false, true}) {
          kernels::cuda::SetPagedAttentionCudaTuningForTesting({.merge_two_pass = two_pass});
          cudaGraphExec_t merge = Capture(stream, iters, [&](int) {
            HELIX_CUDA_OK(kernels::cuda::MergeStatesCuda(mp, stream));
          });
          (two_pass ? merge2p_ms : merge_ms) = TimeGraph(merge, iters, runs, stream);
          HELIX_CUDA_OK(cudaGraphExecDestroy(merge));
        }
        kernels::cuda::SetPagedAttentionCudaTuningForTesting({});
      }
      bool bad = false;
      for (float x : ref_out) {
        bad = bad || !std::isfinite(x);
      }
      const double gbps = bytes / (ms[0] * 1e6);
      const double read_gbps = bytes / (read_ms * 1e6);
      const double copy_gbps = 2.0 * bytes / (copy_ms * 1e6);
      std::printf("%8lld %5lld %8.1f %6lld %9.4f %6.0f %8.0f %6.3f %8.0f",
                  static_cast<long long>(tokens), static_cast<long long>(batch), bytes / 1048576.0,
                  static_cast<long long>(splits), ms[0], gbps, read_gbps, gbps / read_gbps,
                  copy_gbps);
      for (size_t v = 1; v < num_variants; ++v) {
        std::printf(" %8.4f", ms[v]);
      }
      std::printf(" %8.4f %8.4f", merge_ms, merge2p_ms);
      if (num_variants > 1) {
        std::printf("  %.2e", max_diff);
      }
      std::printf("%s\n", bad ? "  NON-FINITE OUTPUT" : "");
      std::fflush(stdout);
      if (csv != nullptr) {
        std::fprintf(csv, "%lld,%lld,%.1f,%.5f,%.1f,%.1f,%.4f,%.1f,%lld",
                     static_cast<long long>(tokens), static_cast<long long>(batch),
                     bytes / 1048576.0, ms[0], gbps, read_gbps, gbps / read_gbps, copy_gbps,
                     static_cast<long long>(splits));
        for (size_t v = 1; v < num_variants; ++v) {
          std::fprintf(csv, ",%.5f", ms[v]);
        }
        std::fprintf(csv, ",%.5f,%.5f,%.3g\n", merge_ms, merge2p_ms, max_diff);
        std::fflush(csv);  // a row survives a step timeout (run_engine.sh, run_all.sh)
      }
    }
  }
  if (csv != nullptr) {
    std::fclose(csv);
  }
  HELIX_CUDA_OK(cudaStreamDestroy(stream));
  return 0;
}

}  // namespace
}  // namespace helix

int main(int argc, char** argv) { return helix::Main(argc, argv); }
