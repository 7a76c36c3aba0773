// Dense matrix multiply y = x * w^T (+ bias) for the CPU backend: projections and the LM head.
// Activations, bias and output are fp32; weights fp32, fp16 or bf16 (converted as they are
// loaded, fp32 accumulation). Stateless; thread-safe for distinct outputs (parallelism comes
// from the pool).
#ifndef HELIX_KERNELS_GEMM_H_
#define HELIX_KERNELS_GEMM_H_

#include <cstdint>

#include "kernels/dtype.h"
#include "kernels/thread_pool.h"

namespace helix::kernels {

struct GemmParams {
  const float* x;     // [m][k] activations, row-major
  const void* w;      // [n][k] weights of w_dtype, row-major (llama2.c / PyTorch [out][in])
  const float* bias;  // [n], or nullptr
  float* y;           // [m][n]; must not alias x, w or bias
  int64_t m, n, k;
  DType w_dtype = DType::kF32;
  // A hint: x, values included, is the x of the backend's previous Gemm (q/k/v or gate/up off
  // one normalised input), so a backend that converts x for 16-bit weights may reuse that
  // conversion. Ignored by GemmCpu.
  bool same_x = false;
  // x rounded to w_dtype ([m][k], to nearest even), when the op that made x wrote that too
  // (RmsNormParams::out_lowp, SiluMulParams::out_lowp): a backend that would round x for
  // 16-bit weights reads this instead. REQUIRES: it equals x so rounded, and w_dtype is its
  // type. Ignored for fp32 weights and by GemmCpu (which reads x).
  const void* x_lowp = nullptr;
};

// What a backend may fold into one decode product (Backend::GemmFused; the CUDA GEMV, kernels/
// cuda/gemv_cuda.h), with the separate ops it stands for.
struct GemmFusion {
  // The product's input is RmsNorm(x) * norm_weight ([k] floats, norm_eps): GemmParams::x holds
  // the rows before the norm, and the normalised rows are written nowhere (RmsNormParams without
  // residual, then the GEMM). nullptr: x as it is.
  const float* norm_weight = nullptr;
  float norm_eps = 0.0f;
  // y += x w^T (+ bias): the residual add after the product (Gemm into scratch, then Add).
  bool accumulate = false;
  // Not nullptr: the product also leaves, for the RMSNorm of the next product that reads its y,
  // partial sums of squares of y's rows as written (after the add): row r's at
  // norm_sums_out[r * parts ... r * parts + parts - 1], parts = the backend's count for this
  // product (CUDA: kernels::cuda::GemvNormSumParts). Their sum is the row's sum of squares.
  double* norm_sums_out = nullptr;
  // With norm_weight, not nullptr: the norm's sum of squares of each row of x is the sum of
  // norm_sum_parts partials there (a product's norm_sums_out over this x), instead of being
  // summed from x. The same RMSNorm up to rounding (the sums' order, and the norm's scale
  // applied to each output instead of to each input).
  const double* norm_sums_in = nullptr;
  int64_t norm_sum_parts = 0;
};

// Parallel over n; each weight row is read from memory once per call for all m rows, which
// is what makes decode (m = batch) run at weight-streaming bandwidth.
// pool may be nullptr (runs on the calling thread).
void GemmCpu(const GemmParams& p, ThreadPool* pool);

// `batch` GEMMs over strided views, y_b = x_b w_b^T for b < batch: x_b is m rows of k floats,
// row i at x + b * x_stride + i * ldx; w_b is [n][k] of w_dtype at w + b * w_stride elements;
// y_b is m rows of n floats, row i at y + b * y_stride + i * ldy (e.g. one GEMM per attention
// head over interleaved heads). No bias. REQUIRES: ldx >= k, ldy >= n; the y_b do not overlap
// each other or any x_b.
struct GemmBatchedParams {
  const float* x;
  int64_t ldx, x_stride;
  const void* w;
  int64_t w_stride;
  float* y;
  int64_t ldy, y_stride;
  int64_t m, n, k, batch;
  DType w_dtype = DType::kF32;
};
// Each entry as GemmCpu computes it (same sums): strided rows are gathered into contiguous
// scratch first.
void GemmBatchedCpu(const GemmBatchedParams& p, ThreadPool* pool);

}  // namespace helix::kernels

#endif  // HELIX_KERNELS_GEMM_H_
