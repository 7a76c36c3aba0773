// Decode GEMMs with bf16 weights (the layer shapes of Llama-3.2-1B and SmolLM2-135M, 1 and 4
// rows of x), several ways in one run: cuBLAS after converting x (GemmCuda), cuBLAS on an x
// already in bf16 (GemmCuda with x_lowp, as after a fused RMSNorm), GemvCuda (fp32 x, no
// conversion), RmsNormCuda then GemvCuda against GemvCuda with the norm fused (GemmFusion), and
// for the gate|up shapes GemvCuda then SiluMulCuda against the fused GemvSiluMulCuda; the norm
// taken from a producer's partial sums of squares instead (GemmFusion::norm_sums_in, as many
// partials as a down projection of width k leaves), and the residual-adding GEMV with and
// without writing those partials (norm_sums_out); for the q|k|v shapes GemvCuda then
// RopeWriteKvCuda against GemvRopeKvCuda (RoPE and the K/V write in the GEMV's epilogue, bf16
// pool); each against a pure-read kernel over the same weight bytes. Weights are cycled through
// enough copies to exceed the L2 cache, so every call reads them from memory; each figure is the
// best of 5 timings of 50 back-to-back calls. One line per shape, key=value. The GEMV, RMSNorm and
// SiLU·mul kernels are launched as the engine launches them, programmatic dependents (--pdl 0:
// ordinary launches), so back-to-back calls overlap a little (the GEMV loads its first weights
// before waiting for the call before it); the read reference and cuBLAS are ordinary launches,
// which is how a GEMV can exceed the read kernel's bandwidth.
//   gemv_bench [--pdl 0|1]
// Exits 0 with a note when no GPU is visible.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <vector>

#include "kernels/cuda/gemm_cuda.h"
#include "kernels/cuda/gemv_cuda.h"
#include "kernels/cuda/ops_cuda.h"
#include "kernels/gemm.h"
#include "kernels/rmsnorm.h"
#include "tests/gpu/bench_kernels.h"

namespace {

namespace kc = helix::kernels::cuda;
using helix::kernels::DType;
using helix::kernels::GemmParams;

bool Ok(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return true;
  std::fprintf(stderr, "gemv_bench: %s: %s\n", what, cudaGetErrorString(e));
  return false;
}

struct Shape {
  const char* name;
  int64_t n, k;
  int64_t q_heads = 0, kv_heads = 0, head_dim = 0;  // q|k|v shapes
};

constexpr int kCalls = 50;

// Best of 5 timings of kCalls calls of f(call index), in microseconds per call.
double TimeUs(cudaStream_t s, const std::function<cudaError_t(int)>& f, bool* ok) {
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  double best = 1e30;
  for (int rep = 0; rep < 6 && *ok; ++rep) {
    cudaEventRecord(e0, s);
    for (int c = 0; c < kCalls && *ok; ++c) *ok = Ok(f(rep * kCalls + c), "kernel");
    cudaEventRecord(e1, s);
    *ok = *ok && Ok(cudaEventSynchronize(e1), "sync");
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    if (rep > 0) best = std::min(best, 1e3 * ms / kCalls);  // the first is a warm-up
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  bool pdl = true;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--pdl") == 0 && i + 1 < argc) {
      pdl = std::strcmp(argv[++i], "0") != 0;
    } else {
      std::fprintf(stderr, "usage: gemv_bench [--pdl 0|1]\n");
      return 2;
    }
  }
  kc::SetProgrammaticLaunch(pdl);
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("gemv_bench: no CUDA device visible\n");
    return 0;
  }
  const Shape shapes[] = {
      {"llama3-1b.qkv", 3072, 2048, 32, 8, 64}, {"llama3-1b.o", 2048, 2048},
      {"llama3-1b.gate_up", 16384, 2048},       {"llama3-1b.down", 2048, 8192},
      {"llama3-1b.lm_head", 128256, 2048},      {"smollm2-135m.qkv", 960, 576, 9, 3, 64},
      {"smollm2-135m.gate_up", 3072, 576},      {"smollm2-135m.down", 576, 1536},
      {"smollm2-135m.lm_head", 49152, 576},
  };
  cudaStream_t s = nullptr;
  cublasHandle_t cublas = nullptr;
  unsigned* sink = nullptr;
  if (!Ok(cudaStreamCreate(&s), "stream") || cublasCreate(&cublas) != CUBLAS_STATUS_SUCCESS ||
      !Ok(cudaMalloc(&sink, sizeof(unsigned)), "sink")) {
    return 1;
  }
  // Copies of each weight matrix past 256 MiB in all (the H100's L2 is 50 MB).
  constexpr size_t kCycleBytes = size_t{256} << 20;
  bool ok = true;
  for (const Shape& sh : shapes) {
    const size_t wbytes = static_cast<size_t>(sh.n * sh.k) * 2;
    const int copies = static_cast<int>(std::max<size_t>(1, (kCycleBytes + wbytes - 1) / wbytes));
    void* w = nullptr;
    float *x = nullptr, *y = nullptr, *glu_out = nullptr, *xn = nullptr, *norm_w = nullptr;
    void *x16 = nullptr, *ws = nullptr;
    double* sums = nullptr;  // partial sums of squares, [rows][parts] (zeros)
    GemmParams down_like{};  // a product writing a stream of width k: k / 2 partials a row
    down_like.m = 1;
    down_like.n = sh.k;
    down_like.k = 8192;
    const int64_t parts = kc::GemvNormSumParts(down_like);
    const int64_t max_m = kc::kGemvMaxRows;
    ok =
        Ok(cudaMalloc(&w, wbytes * copies), "weights") &&
        Ok(cudaMalloc(&x, max_m * sh.k * sizeof(float)), "x") &&
        Ok(cudaMalloc(&x16, max_m * sh.k * 2), "x16") &&
        Ok(cudaMalloc(&y, max_m * sh.n * sizeof(float)), "y") &&
        Ok(cudaMalloc(&glu_out, max_m * sh.n / 2 * sizeof(float)), "glu_out") &&
        Ok(cudaMalloc(&xn, max_m * sh.k * sizeof(float)), "xn") &&
        Ok(cudaMalloc(&norm_w, sh.k * sizeof(float)), "norm_w") &&
        Ok(cudaMemsetAsync(norm_w, 0, sh.k * sizeof(float), s), "memset") &&
        Ok(cudaMalloc(&ws, max_m * sh.k * 2), "workspace") &&
        // At most one partial per output: enough for this shape's own (add_sums below).
        Ok(cudaMalloc(&sums, max_m * std::max(parts, sh.n) * sizeof(double)), "sums") &&
        Ok(cudaMemsetAsync(sums, 0, max_m * std::max(parts, sh.n) * sizeof(double), s), "memset") &&
        Ok(cudaMemsetAsync(y, 0, max_m * sh.n * sizeof(float), s), "memset") &&
        Ok(helix::gpu_testing::LaunchFillBf16(w, wbytes / 2 * copies, 1, s), "fill") &&
        Ok(helix::gpu_testing::LaunchFillBf16(x16, max_m * sh.k, 2, s), "fill") &&
        Ok(cudaMemsetAsync(x, 0, max_m * sh.k * sizeof(float), s), "memset");
    for (int64_t m : {int64_t{1}, max_m}) {
      if (!ok) break;
      const auto params = [&](int call) {
        GemmParams p{};
        p.x = x;
        p.w = static_cast<const char*>(w) + (call % copies) * wbytes;
        p.y = y;
        p.m = m;
        p.n = sh.n;
        p.k = sh.k;
        p.w_dtype = DType::kBF16;
        return p;
      };
      const double cublas_us = TimeUs(
          s, [&](int c) { return kc::GemmCuda(cublas, params(c), ws, s); }, &ok);
      const double lowp_us = TimeUs(
          s,
          [&](int c) {
            GemmParams p = params(c);
            p.x_lowp = x16;
            return kc::GemmCuda(cublas, p, ws, s);
          },
          &ok);
      const double gemv_us = TimeUs(
          s, [&](int c) { return kc::GemvCuda(params(c), s); }, &ok);
      // The input's RMSNorm as its own kernel, then the GEMV, against the GEMV normalising x
      // itself (x is zeros: the norm's output is too, which does not change the work).
      helix::kernels::GemmFusion norm{};
      norm.norm_weight = norm_w;
      norm.norm_eps = 1e-5f;
      const bool norm_fits = kc::GemvFusionApplies(params(0), norm, false);
      const double split_norm_us =
          !norm_fits
              ? 0
              : TimeUs(
                    s,
                    [&](int c) {
                      const cudaError_t e = kc::RmsNormCuda(
                          helix::kernels::RmsNormParams{x, nullptr, norm_w, xn, m, sh.k, 1e-5f}, s);
                      GemmParams p = params(c);
                      p.x = xn;
                      return e != cudaSuccess ? e : kc::GemvCuda(p, s);
                    },
                    &ok);
      const double fused_norm_us =
          !norm_fits ? 0
                     : TimeUs(
                           s, [&](int c) { return kc::GemvCuda(params(c), s, norm); }, &ok);
      // The norm from partial sums of squares (any shape: no pass over x first).
      helix::kernels::GemmFusion sums_norm = norm;
      sums_norm.norm_sums_in = sums;
      sums_norm.norm_sum_parts = parts;
      const double sums_norm_us = TimeUs(
          s, [&](int c) { return kc::GemvCuda(params(c), s, sums_norm); }, &ok);
      // The residual add, without and with the partials for the next norm (y += x w^T).
      helix::kernels::GemmFusion add{};
      add.accumulate = true;
      const double add_us = TimeUs(
          s, [&](int c) { return kc::GemvCuda(params(c), s, add); }, &ok);
      helix::kernels::GemmFusion add_sums = add;
      add_sums.norm_sums_out = sums;
      const double add_sums_us = TimeUs(
          s, [&](int c) { return kc::GemvCuda(params(c), s, add_sums); }, &ok);
      // q|k|v: the GEMV then RoPE + the K/V write (one token a row, each into its own block of a
      // bf16 pool), against the GEMV doing both.
      double split_rope_us = 0, fused_rope_us = 0;
      if (sh.head_dim > 0) {
        void* pool = nullptr;
        int32_t* meta = nullptr;  // positions, blocks, slots: [3][max_m]
        float* q_out = nullptr;
        const helix::kernels::KvPoolView view{nullptr,     DType::kBF16, 1,
                                              sh.kv_heads, 16,           sh.head_dim};
        ok = ok && Ok(cudaMalloc(&pool, max_m * view.block_elems() * 2), "pool") &&
             Ok(cudaMalloc(&meta, 3 * max_m * sizeof(int32_t)), "meta") &&
             Ok(cudaMemsetAsync(meta, 0, 3 * max_m * sizeof(int32_t), s), "memset") &&
             Ok(cudaMalloc(&q_out, max_m * sh.q_heads * sh.head_dim * sizeof(float)), "q_out");
        if (ok) {
          const std::vector<int32_t> host_meta = {8191, 8191, 8191, 8191, 0, 1, 2, 3, 5, 5, 5, 5};
          ok = Ok(cudaMemcpy(meta, host_meta.data(), host_meta.size() * sizeof(int32_t),
                             cudaMemcpyHostToDevice),
                  "meta");
          const int64_t qd = sh.q_heads * sh.head_dim, kvd = sh.kv_heads * sh.head_dim;
          helix::kernels::RopeWriteKvParams rk{};
          rk.q = y;
          rk.k = y + qd;
          rk.v = y + qd + kvd;
          rk.row_stride = sh.n;
          rk.q_out = q_out;
          rk.positions = meta;
          rk.tokens = m;
          rk.num_q_heads = sh.q_heads;
          rk.rotary_dim = sh.head_dim;
          rk.theta = 500000.0f;
          rk.style = helix::kernels::RopeStyle::kHalf;
          rk.kv = view;
          rk.kv.base = pool;
          rk.layer = 0;
          rk.block = meta + max_m;
          rk.token_in_block = meta + 2 * max_m;
          split_rope_us = TimeUs(
              s,
              [&](int c) {
                const cudaError_t e = kc::GemvCuda(params(c), s);
                return e != cudaSuccess ? e : kc::RopeWriteKvCuda(rk, s);
              },
              &ok);
          fused_rope_us = TimeUs(
              s, [&](int c) { return kc::GemvRopeKvCuda(params(c), rk, s); }, &ok);
        }
        cudaFree(pool);
        cudaFree(meta);
        cudaFree(q_out);
      }
      // gate|up: the GEMV then the element-wise SiLU·mul, against the fused kernel.
      double split_glu_us = 0, fused_glu_us = 0;
      if (std::strstr(sh.name, "gate_up") != nullptr) {
        const auto act = [&] {
          helix::kernels::SiluMulParams a{};
          a.gate = y;
          a.up = y + sh.n / 2;
          a.out = glu_out;
          a.n = m * (sh.n / 2);
          a.cols = sh.n / 2;
          a.ld = sh.n;
          return a;
        };
        split_glu_us = TimeUs(
            s,
            [&](int c) {
              const cudaError_t e = kc::GemvCuda(params(c), s);
              return e != cudaSuccess ? e : kc::SiluMulCuda(act(), s);
            },
            &ok);
        fused_glu_us = TimeUs(
            s, [&](int c) { return kc::GemvSiluMulCuda(params(c), act(), s); }, &ok);
      }
      const double read_us = TimeUs(
          s,
          [&](int c) {
            return helix::gpu_testing::LaunchReadReduce(
                static_cast<const char*>(w) + (c % copies) * wbytes, wbytes, sink, s);
          },
          &ok);
      if (!ok) break;
      const double gb = static_cast<double>(wbytes) / 1e9;
      std::printf(
          "shape=%s pdl=%d m=%lld n=%lld k=%lld weight_mb=%.1f cublas_us=%.2f cublas_lowp_us=%.2f "
          "gemv_us=%.2f norm_then_gemv_us=%.2f gemv_norm_fused_us=%.2f read_us=%.2f "
          "gemv_gb_s=%.0f read_gb_s=%.0f gemv_vs_read=%.2f cublas_vs_read=%.2f "
          "gemv_speedup_vs_cublas=%.2f gemv_then_silu_us=%.2f gemv_silu_fused_us=%.2f "
          "gemv_sums_norm_us=%.2f gemv_add_us=%.2f gemv_add_sums_us=%.2f "
          "gemv_then_rope_us=%.2f gemv_rope_fused_us=%.2f\n",
          sh.name, pdl ? 1 : 0, static_cast<long long>(m), static_cast<long long>(sh.n),
          static_cast<long long>(sh.k), wbytes / 1e6, cublas_us, lowp_us, gemv_us, split_norm_us,
          fused_norm_us, read_us, gb / (gemv_us * 1e-6), gb / (read_us * 1e-6), read_us / gemv_us,
          read_us / cublas_us, cublas_us / gemv_us, split_glu_us, fused_glu_us, sums_norm_us,
          add_us, add_sums_us, split_rope_us, fused_rope_us);
    }
    cudaFree(w);
    cudaFree(x);
    cudaFree(x16);
    cudaFree(y);
    cudaFree(glu_out);
    cudaFree(xn);
    cudaFree(norm_w);
    cudaFree(ws);
    cudaFree(sums);
    if (!ok) return 1;
  }
  cublasDestroy(cublas);
  return 0;
}
