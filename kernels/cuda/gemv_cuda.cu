#include "kernels/cuda/gemv_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_util.cuh"

namespace helix::kernels::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
static_assert(32 * kWarpsPerBlock == kNormBlockThreads,
              "a folded norm sums its squares as RmsNormKernel does only with its block size");
constexpr int kChunk = 8;               // weights per 16-byte load
constexpr int64_t kStep = 32 * kChunk;  // weights a warp reads per load
// 16-byte weight loads in flight per lane and row: 4 matched or beat 8 on every decode shape
// measured on an H100 (gemv_bench, docs/results/gpu-h100-2026-11-26b.md; 8 up to 14 % slower).
constexpr int kUnroll = 4;
// Rows of at least this many weights are split over kSplitWarps warps (each a quarter of the
// row, summed in a fixed order): a long row alone keeps too few bytes in flight per warp (the
// down projection's 8192 reached 0.80 of the read kernel's bandwidth, the 2048-wide ones ~1.0).
constexpr int64_t kSplitMinK = 4096;
constexpr int kSplitWarps = 4;

// How a GEMV applies the RMSNorm of its input (GemmFusion::norm_weight).
constexpr int kNormNone = 0;
constexpr int kNormSmem = 1;  // the block normalises x into shared memory first
constexpr int kNormSums = 2;  // from a producer's partial sums of squares (norm_sums_in)

// base[i] = v in the pool's type (FromFloat: round to nearest even).
__device__ inline void StorePool(void* base, DType dtype, int64_t i, float v) {
  if (dtype == DType::kF32) {
    static_cast<float*>(base)[i] = v;
  } else if (dtype == DType::kF16) {
    static_cast<__half*>(base)[i] = FromFloat<__half>(v);
  } else {
    static_cast<__nv_bfloat16*>(base)[i] = FromFloat<__nv_bfloat16>(v);
  }
}

// The fused RoPE + K/V write (kRope): the thread blocks of the rotated rows (q and k, the first
// qd + kvd outputs) each compute whole rotation pairs, RoPE's (e, e + d/2) or (2i, 2i + 1) of a
// head, a pair on consecutive row slots; the later blocks take the v rows in order.
__host__ __device__ inline int64_t RopeRotatedBlocks(const RopeWriteKvParams& rk,
                                                     int rows_per_block) {
  return (rk.num_q_heads + rk.kv.num_kv_heads) * rk.kv.head_dim / rows_per_block;
}

// The kRope epilogue of output row j (rotation pair `pair`, -1 for a v row; its pair's values in
// rope_vals at row slots slot & ~1 and slot | 1, token r's at [slot * M + r]; the pair's cosines
// and sines cs[r], sn[r]) for tokens r < m: RopeWriteKvKernel's work on this row's element, with
// the same expressions.
template <int M>
__device__ inline void RopeWriteRows(const RopeWriteKvParams& rk, int64_t j, int64_t pair, int slot,
                                     const float* rope_vals, const float* cs, const float* sn,
                                     int64_t m) {
  const int64_t d = rk.kv.head_dim;
  const int64_t hq = rk.num_q_heads;
  const int64_t hkv = rk.kv.num_kv_heads;
  const int64_t qd = hq * d, kvd = hkv * d;
  void* base = rk.kv.base;
  for (int r = 0; r < M && r < m; ++r) {
    const int32_t block = rk.block[r];
    const int32_t tok = rk.token_in_block[r];
    if (pair < 0) {  // a v row: into the pool's V plane
      const int64_t h = (j - qd - kvd) / d;
      if (block >= 0 && rk.kv.num_planes == 2) {
        StorePool(base, rk.kv.dtype, DevKvOffset(rk.kv, block, rk.layer, 1, h, tok) + j % d,
                  rope_vals[slot * M + r]);
      }
      continue;
    }
    const float c = cs[r];
    const float s = sn[r];
    const float a = rope_vals[(slot & ~1) * M + r];
    const float b = rope_vals[(slot | 1) * M + r];
    const float v = RopeRotate(a, b, c, s, (slot & 1) != 0);
    const int64_t h = j / d, e = j % d;
    if (h < hq) {
      rk.q_out[(r * hq + h) * d + e] = v;
    } else {
      rk.k[r * rk.row_stride + (h - hq) * d + e] = v;
      if (block >= 0) {
        StorePool(base, rk.kv.dtype, DevKvOffset(rk.kv, block, rk.layer, 0, h - hq, tok) + e, v);
      }
    }
  }
}

// Thread blocks of the GEMV of p: one per kWarpsPerBlock / S outputs.
int64_t GemvBlocks(const GemmParams& p, bool silu_mul) {
  const int64_t outs = silu_mul ? p.n / 2 : p.n;
  const int64_t rows_per_block = kWarpsPerBlock / (p.k >= kSplitMinK ? kSplitWarps : 1);
  return (outs + rows_per_block - 1) / rows_per_block;
}

// Round `k0` of a warp's weights: chunk u of row q at k0 + u * S * kStep (zeros past k).
template <typename W, int R, int U, int S>
__device__ inline void LoadRound(uint4 (&raw)[R][U], const W* const (&w)[R], int64_t k0,
                                 int64_t k) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t kk = k0 + u * S * kStep;
#pragma unroll
    for (int q = 0; q < R; ++q) {
      raw[q][u] = kk < k ? *reinterpret_cast<const uint4*>(w[q] + kk) : make_uint4(0, 0, 0, 0);
    }
  }
}

// S warps per output j (S = 1, or kSplitWarps for long rows). Plain: y[r][j] = x[r] . w[j]
// (+ bias[j]) for r < m <= M (f.accumulate: y[r][j] += that). kGlu: the warps also read weight
// row j + n/2 and write out[r][j] = silu(y[r][j]) * y[r][j + n/2] (SiluMulValue) instead. Lane l
// of slice s reads the 16-byte chunks c = 32 s + l, c + 32 S, c + 64 S, ... of each of its rows
// (kUnroll of them per row issued together) and the same eight floats of each row of x (from
// cache: x is small and every warp reads it). A row's sum is the same sequence of FMAs, warp
// reductions and (S > 1) slice sum whatever kGlu is, so the fused result equals GEMV then
// SiLU·mul bit for bit. kNorm: the thread block first writes RMSNorm(x) * f.norm_weight into
// shared memory exactly as RmsNormKernel computes it (same 256 threads, same sums), and the
// products read that: bit for bit RmsNormCuda then the GEMV. kNormSums: the norm's sum of squares
// of row r comes from f.norm_sum_parts partials (a producer's f.norm_sums_out), each thread summing
// its share as soon as the kernel may read them and the block combining them after the products,
// which read x * norm_weight; the row's scale multiplies each output (the same RMSNorm up to
// rounding, and no block-wide step before the products). f.norm_sums_out (not kGlu): the block
// also writes the sum of squares of the values it wrote to y, row r's at
// norm_sums_out[r * gridDim.x + blockIdx.x]. Every sum is in double and in a fixed order, so
// runs repeat bit for bit. kRope (not kGlu; p is the packed q|k|v product that rk describes, see
// GemvRopeKvApplies): row slots are mapped to outputs as RopeRotatedBlocks says, and after y is
// written each rotated row's pair meets in shared memory and the epilogue does what
// RopeWriteKvKernel does with it (same expressions: bit for bit): the rotated q into rk.q_out,
// the rotated k over y, and k and v into the token's pool slot.
// Weights are never written by a kernel of the step, so each warp's first round of them is
// loaded before PdlEnter: under HELIX_LAUNCH_PDL those loads overlap the kernel before it.
template <typename W, int M, bool kGlu, int S, int kNorm, bool kRope>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    GemvKernel(const GemmParams p, const SiluMulParams act, const GemmFusion f,
               const RopeWriteKvParams rk) {
  static_assert(!(kRope && kGlu));
  constexpr int U = kUnroll;
  constexpr int R = kGlu ? 2 : 1;  // weight rows per warp
  constexpr int kRowsPerBlock = kWarpsPerBlock / S;
  using Parts = float[kWarpsPerBlock * R * M];  // S > 1: each warp's sums
  HELIX_STATIC_SMEM(Parts, parts);
  using Squares = double[kWarpsPerBlock * M];  // each warp's part of the sums of squares
  HELIX_STATIC_SMEM(Squares, squares);
  using RopeVals = float[kRowsPerBlock * M];  // kRope: each row slot's y, for its pair
  HELIX_STATIC_SMEM(RopeVals, rope_vals);
  const int64_t outs = kGlu ? p.n / 2 : p.n;
  const int warp = static_cast<int>(threadIdx.x / 32);
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int slice = warp % S;
  const int row_slot = warp / S;
  int64_t j = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + row_slot;
  [[maybe_unused]] int64_t pair =
      -1;  // kRope: the rotation pair of a rotated row (its index within the head)
  if constexpr (kRope) {
    const int64_t d = rk.kv.head_dim;
    const int64_t rotated_blocks = RopeRotatedBlocks(rk, kRowsPerBlock);
    if (blockIdx.x < rotated_blocks) {
      const int64_t g = static_cast<int64_t>(blockIdx.x) * (kRowsPerBlock / 2) + row_slot / 2;
      const int64_t head = g / (d / 2);
      pair = g % (d / 2);
      j = head * d + (rk.style == RopeStyle::kInterleaved ? 2 * pair + (row_slot & 1)
                                                          : pair + (row_slot & 1) * (d / 2));
    } else {
      j = (rk.num_q_heads + rk.kv.num_kv_heads) * d +
          (static_cast<int64_t>(blockIdx.x) - rotated_blocks) * kRowsPerBlock + row_slot;
    }
  }
  const bool active = j < outs;
  const W* w[R];
#pragma unroll
  for (int q = 0; q < R; ++q) {
    w[q] = static_cast<const W*>(p.w) + (active ? j + q * outs : 0) * p.k;
  }
  const int64_t k_first = (static_cast<int64_t>(slice) * 32 + lane) * kChunk;
  constexpr int64_t kRound = static_cast<int64_t>(U) * S * kStep;  // k advanced per round
  uint4 raw[R][U];
  if (active) {
    LoadRound<W, R, U, S>(raw, w, k_first, p.k);
  }
  // kRope: the angles of this row's pair, lane r computing token r's (while the first weights
  // are in flight and the kernel before may still run: the positions are the step's metadata,
  // uploaded before its first kernel), then every lane holding all of them.
  [[maybe_unused]] float rope_c[M], rope_s[M];
  if constexpr (kRope) {
    float c = 1.0f, sn = 0.0f;
    if (pair >= 0 && lane < p.m) {
      RopeCosSin(rk.theta, rk.rotary_dim, pair, rk.positions[lane], &c, &sn);
    }
#pragma unroll
    for (int r = 0; r < M; ++r) {
      rope_c[r] = __shfl_sync(0xffffffffu, c, r);
      rope_s[r] = __shfl_sync(0xffffffffu, sn, r);
    }
  }
  PdlEnter();  // x (and y) only after this: see HELIX_LAUNCH_PDL
  const float* x = p.x;
  double norm_ss[M];  // kNormSums: this thread's share of each row's sum of squares
#pragma unroll
  for (int r = 0; r < M; ++r) {
    norm_ss[r] = 0.0;
    if constexpr (kNorm == kNormSums) {
      if (r < p.m) {
        const double* in = f.norm_sums_in + r * f.norm_sum_parts;
        for (int64_t i = threadIdx.x; i < f.norm_sum_parts; i += blockDim.x) {
          norm_ss[r] += in[i];
        }
      }
    }
  }
  if constexpr (kNorm == kNormSmem) {
    using Red = double[32];
    HELIX_STATIC_SMEM(Red, red);
    HELIX_DYNAMIC_SMEM(smem);
    float* xs = reinterpret_cast<float*>(smem);  // [m][k], the normalised rows
    for (int r = 0; r < M && r < p.m; ++r) {
      const float* xr = p.x + r * p.k;
      double ss = 0.0;
      for (int64_t i = threadIdx.x; i < p.k; i += blockDim.x) {
        ss += static_cast<double>(xr[i]) * xr[i];
      }
      ss = BlockReduce(ss, red, false);
      const float inv = static_cast<float>(
          1.0 / sqrt(ss / static_cast<double>(p.k) + static_cast<double>(f.norm_eps)));
      for (int64_t i = threadIdx.x; i < p.k; i += blockDim.x) {
        xs[r * p.k + i] = __fmul_rn(__fmul_rn(xr[i], inv), f.norm_weight[i]);
      }
    }
    __syncthreads();
    x = xs;
  }
  float acc[R][M];
#pragma unroll
  for (int q = 0; q < R; ++q) {
#pragma unroll
    for (int r = 0; r < M; ++r) {
      acc[q][r] = 0.0f;
    }
  }
  for (int64_t k0 = k_first; active && k0 < p.k; k0 += kRound) {
    if (k0 != k_first) {
      LoadRound<W, R, U, S>(raw, w, k0, p.k);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k = k0 + u * S * kStep;
      if (k >= p.k) {
        break;
      }
      float wf[R][kChunk];
#pragma unroll
      for (int q = 0; q < R; ++q) {
        ChunkToFloats<W>(raw[q][u], wf[q]);
      }
      float4 na, nb;  // kNormSums: the norm's weights of these eight inputs
      if constexpr (kNorm == kNormSums) {
        na = reinterpret_cast<const float4*>(f.norm_weight + k)[0];
        nb = reinterpret_cast<const float4*>(f.norm_weight + k)[1];
      }
#pragma unroll
      for (int r = 0; r < M; ++r) {
        if (r < p.m) {
          const float4* xr = reinterpret_cast<const float4*>(x + r * p.k + k);
          float4 a = xr[0];
          float4 b = xr[1];
          if constexpr (kNorm == kNormSums) {
            a = make_float4(__fmul_rn(a.x, na.x), __fmul_rn(a.y, na.y), __fmul_rn(a.z, na.z),
                            __fmul_rn(a.w, na.w));
            b = make_float4(__fmul_rn(b.x, nb.x), __fmul_rn(b.y, nb.y), __fmul_rn(b.z, nb.z),
                            __fmul_rn(b.w, nb.w));
          }
#pragma unroll
          for (int q = 0; q < R; ++q) {
            float s = acc[q][r];
            s = fmaf(a.x, wf[q][0], s);
            s = fmaf(a.y, wf[q][1], s);
            s = fmaf(a.z, wf[q][2], s);
            s = fmaf(a.w, wf[q][3], s);
            s = fmaf(b.x, wf[q][4], s);
            s = fmaf(b.y, wf[q][5], s);
            s = fmaf(b.z, wf[q][6], s);
            s = fmaf(b.w, wf[q][7], s);
            acc[q][r] = s;
          }
        }
      }
    }
  }
#pragma unroll
  for (int q = 0; q < R; ++q) {
#pragma unroll
    for (int r = 0; r < M; ++r) {
#pragma unroll
      for (int off = 16; off > 0; off /= 2) {
        acc[q][r] += __shfl_xor_sync(0xffffffffu, acc[q][r], off);
      }
    }
  }
  if constexpr (kNorm == kNormSums) {
    // The block's sum of each row's partials (warps in order), then its scale on the sums.
#pragma unroll
    for (int r = 0; r < M; ++r) {
#pragma unroll
      for (int off = 16; off > 0; off /= 2) {
        norm_ss[r] += __shfl_xor_sync(0xffffffffu, norm_ss[r], off);
      }
      if (lane == 0) {
        squares[warp * M + r] = norm_ss[r];
      }
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < M; ++r) {
      double ss = 0.0;
      for (int w2 = 0; w2 < kWarpsPerBlock; ++w2) {
        ss += squares[w2 * M + r];
      }
      const float inv = static_cast<float>(
          1.0 / sqrt(ss / static_cast<double>(p.k) + static_cast<double>(f.norm_eps)));
#pragma unroll
      for (int q = 0; q < R; ++q) {
        acc[q][r] = __fmul_rn(acc[q][r], inv);
      }
    }
    __syncthreads();  // squares is reused below
  }
  if constexpr (S > 1) {
    if (lane == 0) {
#pragma unroll
      for (int q = 0; q < R; ++q) {
#pragma unroll
        for (int r = 0; r < M; ++r) {
          parts[(warp * R + q) * M + r] = acc[q][r];
        }
      }
    }
    __syncthreads();
    if (slice == 0 && lane == 0) {
#pragma unroll
      for (int q = 0; q < R; ++q) {
#pragma unroll
        for (int r = 0; r < M; ++r) {
          float t = parts[(warp * R + q) * M + r];
          for (int o = 1; o < S; ++o) {
            t += parts[((warp + o) * R + q) * M + r];
          }
          acc[q][r] = t;
        }
      }
    }
  }
  // Row r's square of the value this warp wrote (lane 0 of slice 0 of an active warp; else 0).
  double written_sq[M];
#pragma unroll
  for (int r = 0; r < M; ++r) {
    written_sq[r] = 0.0;
  }
  const bool writes = active && slice == 0 && lane == 0;
#pragma unroll
  for (int r = 0; r < M; ++r) {
    if (!writes || r >= p.m) {
      break;
    }
    float s[R];
#pragma unroll
    for (int q = 0; q < R; ++q) {
      s[q] = p.bias != nullptr ? acc[q][r] + p.bias[j + q * outs] : acc[q][r];
    }
    if constexpr (kGlu) {
      const float o = SiluMulValue(s[0], s[1]);
      act.out[r * outs + j] = o;
      if (act.out_lowp != nullptr) {
        StoreLowpAt(act.out_lowp, act.out_lowp_dtype, r * outs + j, o);
      }
    } else {
      float* y = p.y + r * p.n + j;
      const float v = f.accumulate ? *y + s[0] : s[0];
      *y = v;
      written_sq[r] = static_cast<double>(v) * v;
      if constexpr (kRope) {
        rope_vals[row_slot * M + r] = v;
      }
    }
  }
  if constexpr (kRope) {
    __syncthreads();
    if (writes) {
      RopeWriteRows<M>(rk, j, pair, row_slot, rope_vals, rope_c, rope_s, p.m);
    }
  }
  if (kGlu || f.norm_sums_out == nullptr) {
    return;
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < M; ++r) {
      squares[warp * M + r] = written_sq[r];
    }
  }
  __syncthreads();
  if (threadIdx.x < M && static_cast<int64_t>(threadIdx.x) < p.m) {
    double t = 0.0;
    for (int w2 = 0; w2 < kWarpsPerBlock; ++w2) {
      t += squares[w2 * M + threadIdx.x];
    }
    f.norm_sums_out[threadIdx.x * gridDim.x + blockIdx.x] = t;
  }
}

template <typename W, bool kGlu, int S, int kNorm, bool kRope = false>
cudaError_t LaunchRows(const GemmParams& p, const SiluMulParams& act, const GemmFusion& f,
                       const RopeWriteKvParams& rk, cudaStream_t stream) {
  const int64_t outs = kGlu ? p.n / 2 : p.n;
  constexpr int64_t kRowsPerBlock = kWarpsPerBlock / S;
  const int64_t kv_rows = rk.kv.num_kv_heads * rk.kv.head_dim;  // kRope: the v rows after them
  const unsigned grid = static_cast<unsigned>(
      kRope ? RopeRotatedBlocks(rk, kRowsPerBlock) + (kv_rows + kRowsPerBlock - 1) / kRowsPerBlock
            : (outs + kRowsPerBlock - 1) / kRowsPerBlock);
  const unsigned block = 32 * kWarpsPerBlock;
  const size_t smem = kNorm == kNormSmem ? static_cast<size_t>(p.m * p.k) * sizeof(float) : 0;
  if (p.m == 1) {
    HELIX_LAUNCH_PDL((GemvKernel<W, 1, kGlu, S, kNorm, kRope>), grid, block, smem, stream, p, act,
                     f, rk);
  } else if (p.m == 2) {
    HELIX_LAUNCH_PDL((GemvKernel<W, 2, kGlu, S, kNorm, kRope>), grid, block, smem, stream, p, act,
                     f, rk);
  } else {
    HELIX_LAUNCH_PDL((GemvKernel<W, 4, kGlu, S, kNorm, kRope>), grid, block, smem, stream, p, act,
                     f, rk);
  }
  HELIX_CUDA_CHECK_LAUNCH(stream);
  return cudaSuccess;
}

template <typename W, bool kGlu, int kNorm, bool kRope>
cudaError_t LaunchSplit(const GemmParams& p, const SiluMulParams& act, const GemmFusion& f,
                        const RopeWriteKvParams& rk, cudaStream_t stream) {
  return p.k >= kSplitMinK ? LaunchRows<W, kGlu, kSplitWarps, kNorm, kRope>(p, act, f, rk, stream)
                           : LaunchRows<W, kGlu, 1, kNorm, kRope>(p, act, f, rk, stream);
}

template <bool kGlu, bool kRope = false>
cudaError_t Launch(const GemmParams& p, const SiluMulParams& act, const GemmFusion& f,
                   cudaStream_t stream, const RopeWriteKvParams& rk = {}) {
  const bool bf16 = p.w_dtype == DType::kBF16;
  if (f.norm_weight != nullptr && f.norm_sums_in != nullptr) {
    return bf16 ? LaunchSplit<__nv_bfloat16, kGlu, kNormSums, kRope>(p, act, f, rk, stream)
                : LaunchSplit<__half, kGlu, kNormSums, kRope>(p, act, f, rk, stream);
  }
  if (f.norm_weight != nullptr) {
    return bf16 ? LaunchSplit<__nv_bfloat16, kGlu, kNormSmem, kRope>(p, act, f, rk, stream)
                : LaunchSplit<__half, kGlu, kNormSmem, kRope>(p, act, f, rk, stream);
  }
  return bf16 ? LaunchSplit<__nv_bfloat16, kGlu, kNormNone, kRope>(p, act, f, rk, stream)
              : LaunchSplit<__half, kGlu, kNormNone, kRope>(p, act, f, rk, stream);
}

}  // namespace

bool GemvApplies(const GemmParams& p) {
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  return (p.w_dtype == DType::kBF16 || p.w_dtype == DType::kF16) && p.m >= 1 &&
         p.m <= kGemvMaxRows && p.n >= 1 && p.n <= kMaxGridX && p.k >= 1 && p.k % kChunk == 0 &&
         aligned(p.x) && aligned(p.w);
}

bool GemvPreferred(int64_t m, int64_t n, int64_t k) {
  // gemv_bench on the H100 (docs/results/gpu-h100-2026-11-26b.md): with one row the GEMV beats
  // cuBLAS on every decode shape measured; with four rows only on matrices up to Llama-3.2-1B's
  // o (8 MiB; its q|k|v, 12 MiB, took 12.1 us against cuBLAS's 9.1 on the norm's 16-bit copy),
  // and it loses by up to 1.6x on its gate|up and the classifier.
  constexpr int64_t kSmallBytes = int64_t{8} << 20;
  return m == 1 || (m >= 1 && m <= kGemvMaxRows && n * k * 2 <= kSmallBytes);
}

int64_t GemvNormSumParts(const GemmParams& p) { return GemvBlocks(p, false); }

// Whether the byte ranges [a, a + a_bytes) and [b, b + b_bytes) do not meet.
bool Apart(const void* a, size_t a_bytes, const void* b, size_t b_bytes) {
  const uintptr_t x = reinterpret_cast<uintptr_t>(a), y = reinterpret_cast<uintptr_t>(b);
  return x + a_bytes <= y || y + b_bytes <= x;
}

bool GemvFusionApplies(const GemmParams& p, const GemmFusion& f, bool silu_mul) {
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const size_t x_bytes = static_cast<size_t>(p.m * p.k) * sizeof(float);
  const size_t y_bytes = static_cast<size_t>(p.m * p.n) * sizeof(float);
  if (f.norm_sums_in != nullptr) {
    // The products read norm_weight 16 bytes at a time.
    if (f.norm_weight == nullptr || f.norm_eps < 0.0f || f.norm_sum_parts < 1 ||
        !aligned(f.norm_weight)) {
      return false;
    }
    // Read by every thread block while others write y.
    const size_t in_bytes = static_cast<size_t>(p.m * f.norm_sum_parts) * sizeof(double);
    if (!silu_mul && p.y != nullptr && !Apart(f.norm_sums_in, in_bytes, p.y, y_bytes)) {
      return false;
    }
  } else if (f.norm_weight != nullptr && (f.norm_eps < 0.0f || p.m < 1 || p.m > kGemvMaxRows ||
                                          p.k < 1 || p.m * p.k > kGemvNormMaxFloats)) {
    return false;
  }
  if (f.norm_sums_out != nullptr) {
    if (silu_mul || p.y == nullptr) return false;
    // One block's writes must not meet another's reads (x, y, the partials read).
    const size_t out_bytes = static_cast<size_t>(p.m * GemvNormSumParts(p)) * sizeof(double);
    if (!Apart(f.norm_sums_out, out_bytes, p.x, x_bytes) ||
        !Apart(f.norm_sums_out, out_bytes, p.y, y_bytes)) {
      return false;
    }
    if (f.norm_sums_in != nullptr &&
        !Apart(f.norm_sums_out, out_bytes, f.norm_sums_in,
               static_cast<size_t>(p.m * f.norm_sum_parts) * sizeof(double))) {
      return false;
    }
  }
  if (f.accumulate) {
    // y is read and written by the warp that sums it; x must not be y.
    const bool apart = p.y + p.m * p.n <= p.x || p.y >= p.x + p.m * p.k;
    return !silu_mul && p.y != nullptr && apart;
  }
  return true;
}

bool GemvNormPreferred(const GemmParams& p, bool silu_mul) {
  // gemv_bench (docs/results/gpu-h100-2026-11-26b.md): fused faster at thread blocks x k of
  // 69K-221K (SmolLM2 q|k|v, down, gate|up), slower from 524K (Llama-3.2-1B o) up.
  // With 4 rows folding lost on every shape measured (SmolLM2's q|k|v, gate|up and down took
  // 43-62 % more time): one row only.
  constexpr int64_t kMaxBlocksTimesK = int64_t{1} << 18;
  if (p.m != 1) return false;
  return GemvBlocks(p, silu_mul) * p.k <= kMaxBlocksTimesK;
}

cudaError_t GemvCuda(const GemmParams& p, cudaStream_t stream, const GemmFusion& f) {
  if (!GemvApplies(p) || !GemvFusionApplies(p, f, false)) {
    return cudaErrorInvalidValue;
  }
  return Launch<false>(p, SiluMulParams{}, f, stream);
}

bool GemvRopeKvApplies(const GemmParams& p, const GemmFusion& f, const RopeWriteKvParams& rk) {
  if (!GemvApplies(p) || !GemvFusionApplies(p, f, false) || f.accumulate ||
      f.norm_sums_out != nullptr) {
    return false;
  }
  const int64_t d = rk.kv.head_dim;
  const int64_t qd = rk.num_q_heads * d, kvd = rk.kv.num_kv_heads * d;
  const int64_t rows_per_block = kWarpsPerBlock / (p.k >= kSplitMinK ? kSplitWarps : 1);
  const bool dtype_ok =
      rk.kv.dtype == DType::kF32 || rk.kv.dtype == DType::kF16 || rk.kv.dtype == DType::kBF16;
  // Blocks write y (k rotated in place), q_out and the pool while others still read x.
  const size_t x_bytes = static_cast<size_t>(p.m * p.k) * sizeof(float);
  const size_t y_bytes = static_cast<size_t>(p.m * p.n) * sizeof(float);
  const size_t q_bytes = static_cast<size_t>(p.m * qd) * sizeof(float);
  const bool q_out_apart = rk.q_out != nullptr && Apart(rk.q_out, q_bytes, p.y, y_bytes) &&
                           Apart(rk.q_out, q_bytes, p.x, x_bytes) &&
                           Apart(p.y, y_bytes, p.x, x_bytes);
  return d >= 2 && d % 2 == 0 && rk.num_q_heads >= 1 && rk.kv.num_kv_heads >= 1 &&
         rk.rotary_dim == d && p.n == qd + 2 * kvd && (qd + kvd) % rows_per_block == 0 &&
         rk.tokens == p.m && rk.row_stride == p.n && rk.q == p.y && rk.k == p.y + qd &&
         rk.v == p.y + qd + kvd && q_out_apart && rk.kv.num_planes == 2 && dtype_ok &&
         rk.kv.base != nullptr && rk.positions != nullptr && rk.block != nullptr &&
         rk.token_in_block != nullptr &&
         (rk.style == RopeStyle::kInterleaved || rk.style == RopeStyle::kHalf);
}

cudaError_t GemvRopeKvCuda(const GemmParams& p, const RopeWriteKvParams& rk, cudaStream_t stream,
                           const GemmFusion& f) {
  if (!GemvRopeKvApplies(p, f, rk)) {
    return cudaErrorInvalidValue;
  }
  return Launch<false, true>(p, SiluMulParams{}, f, stream, rk);
}

bool GemvSiluMulApplies(const GemmParams& p, const SiluMulParams& act) {
  if (!GemvApplies(p) || p.n % 2 != 0 || act.out == nullptr || p.y == nullptr) {
    return false;
  }
  const int64_t half = p.n / 2;
  const float* out = act.out;
  const bool apart = out + p.m * half <= p.y || out >= p.y + p.m * p.n;
  return act.gate == p.y && act.up == p.y + half && act.cols == half && act.ld == p.n &&
         act.n == p.m * half && apart;
}

cudaError_t GemvSiluMulCuda(const GemmParams& p, const SiluMulParams& act, cudaStream_t stream,
                            const GemmFusion& f) {
  if (!GemvSiluMulApplies(p, act) || !GemvFusionApplies(p, f, true)) {
    return cudaErrorInvalidValue;
  }
  return Launch<true>(p, act, f, stream);
}

}  // namespace helix::kernels::cuda
