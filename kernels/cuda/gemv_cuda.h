// Decode-sized products with 16-bit weights without cuBLAS: y = x w^T (+ bias) for a few rows
// of x (GemmCpu's contract, kernels/gemm.h). x stays fp32 (no conversion kernel, and the
// numerics are the CPU's up to summation order), weights are read once with 16-byte loads, fp32
// accumulation; one warp per weight row (four for rows of 4096 weights or more), the bias added
// as the row's sum is written. Launched as programmatic dependents (HELIX_LAUNCH_PDL) that load
// their first weights before waiting for the kernel before them.
#ifndef HELIX_KERNELS_CUDA_GEMV_CUDA_H_
#define HELIX_KERNELS_CUDA_GEMV_CUDA_H_

#include <cuda_runtime.h>

#include "kernels/gemm.h"
#include "kernels/rope.h"
#include "kernels/silu_mul.h"

namespace helix::kernels::cuda {

// The most rows of x GemvCuda takes (each row of x is read from cache once per weight row).
constexpr int64_t kGemvMaxRows = 4;

// Whether GemvCuda takes p: fp16 or bf16 weights, 1 <= m <= kGemvMaxRows, 1 <= n <= 2^31 - 1,
// k >= 1 and a multiple of 8, x and w 16-byte aligned. p.x_lowp and p.same_x are not used.
bool GemvApplies(const GemmParams& p);

// Whether a decode backend should give a product of m rows of x and an n x k matrix of 16-bit
// weights to GemvCuda rather than cuBLAS (measured on an H100, docs/benchmarks.md: one row always;
// up to kGemvMaxRows rows only for matrices of at most 8 MiB, as the GEMV re-reads x per weight
// row and falls behind cuBLAS on larger ones).
bool GemvPreferred(int64_t m, int64_t n, int64_t k);

// The most floats of x (m * k) a GEMV with GemmFusion::norm_weight normalises into shared memory.
constexpr int64_t kGemvNormMaxFloats = 10240;

// Whether GemvCuda (silu_mul: GemvSiluMulCuda) takes fusion f with p: norm_weight with eps >= 0
// and either norm_sums_in (norm_sum_parts >= 1, norm_weight 16-byte aligned) or m * k <=
// kGemvNormMaxFloats; accumulate only without SiLU·mul and with y apart from x; norm_sums_out
// only without SiLU·mul, apart from norm_sums_in.
bool GemvFusionApplies(const GemmParams& p, const GemmFusion& f, bool silu_mul);

// The partial sums of squares per row of y that GemvCuda(p) writes with GemmFusion::
// norm_sums_out (one per thread block): the norm_sum_parts of the product that reads them.
int64_t GemvNormSumParts(const GemmParams& p);

// Whether folding the input's RMSNorm into this GEMV (silu_mul: GemvSiluMulCuda) beats a
// separate RmsNormCuda: every thread block normalises x itself, which pays off while thread blocks
// times k stays small, with one row (measured on an H100, gemv_bench, one row: SmolLM2-135M's
// q|k|v, gate|up and down took 5-37 % less time fused; Llama-3.2-1B's q|k|v, o, gate|up and
// down 7-19 % more, and SmolLM2's 49152-row classifier 31 % more; with four rows every shape
// took more).
bool GemvNormPreferred(const GemmParams& p, bool silu_mul);

// REQUIRES: GemvApplies(p) and GemvFusionApplies(p, f, false); device pointers. With
// f.norm_weight the products read RMSNorm(x) * norm_weight, bit for bit what RmsNormCuda (no
// residual) would have written, and write it nowhere; with f.norm_sums_in too, the norm's sums
// of squares are those partials' (x is not summed) and the rows' scales multiply the products
// (RMSNorm up to rounding); with f.accumulate y += the product; with f.norm_sums_out the sums
// of squares of y's rows as written, in GemvNormSumParts(p) partials per row.
cudaError_t GemvCuda(const GemmParams& p, cudaStream_t stream, const GemmFusion& f = {});

// Whether GemvRopeKvCuda takes (p, f, rk): GemvApplies(p) and GemvFusionApplies(p, f, false)
// without accumulate or norm_sums_out; p the packed q|k|v product (n = qd + 2 kvd) whose rows
// rk describes (q, k, v the slices of p.y, row_stride = n, tokens = m, q_out set and apart from
// y), full rotary (rotary_dim = head_dim, even), a K/V pool of f32, f16 or bf16, and the rotated
// rows' outputs (qd + kvd) a whole number of thread blocks (multiples of 8, or of 2 for k >= 4096).
bool GemvRopeKvApplies(const GemmParams& p, const GemmFusion& f, const RopeWriteKvParams& rk);

// GemvCuda(p, f) then RopeWriteKvCuda(rk) in one kernel, bit for bit (y, rk.q_out and the pool):
// each thread block computes whole rotation pairs of q and k (or rows of v) and rotates and
// stores them as it writes them. REQUIRES: GemvRopeKvApplies(p, f, rk); device pointers.
cudaError_t GemvRopeKvCuda(const GemmParams& p, const RopeWriteKvParams& rk, cudaStream_t stream,
                           const GemmFusion& f = {});

// Whether GemvSiluMulCuda takes (p, act): GemvApplies(p), p.n even, and act the SiluMul of the
// packed gate|up product p would write: act.gate == p.y, act.up == p.y + n/2, act.cols == n/2,
// act.ld == n, act.n == m * n/2, act.out outside p.y's rows.
bool GemvSiluMulApplies(const GemmParams& p, const SiluMulParams& act);

// GemvCuda(p) then SiluMul(act) in one kernel, bit for bit: out[r][j] = silu(g) * u of
// g = y[r][j], u = y[r][j + n/2] (and act.out_lowp when set). p.y is not written.
// REQUIRES: GemvSiluMulApplies(p, act) and GemvFusionApplies(p, f, true).
cudaError_t GemvSiluMulCuda(const GemmParams& p, const SiluMulParams& act, cudaStream_t stream,
                            const GemmFusion& f = {});

}  // namespace helix::kernels::cuda

#endif  // HELIX_KERNELS_CUDA_GEMV_CUDA_H_
