#include "kernels/cuda/ops_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_util.cuh"

namespace helix::kernels::cuda {
namespace {

constexpr int kElemThreads = 256;

unsigned GridFor(int64_t n, int threads) {
#ifdef HELIX_CUDA_EMULATION
  constexpr int64_t kMaxGrid = 4;  // grid-stride loops: few emulated thread blocks suffice
#else
  constexpr int64_t kMaxGrid = 1 << 20;
#endif
  return static_cast<unsigned>(std::clamp<int64_t>((n + threads - 1) / threads, 1, kMaxGrid));
}

// Launches a grid-stride kernel over n elements with Params p (nothing when n <= 0).
template <typename P>
cudaError_t LaunchElementwise(void (*kernel)(P), int64_t n, const P& p, cudaStream_t stream) {
  if (n <= 0) {
    return cudaSuccess;
  }
  HELIX_LAUNCH_PDL(kernel, GridFor(n, kElemThreads), kElemThreads, 0, stream, p);
  HELIX_CUDA_CHECK_LAUNCH(stream);
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: one thread block per row.

// A row of up to blockDim.x * kRmsRegs floats is held in registers: all its loads are issued
// at once and it is read from memory once (a row is a few KB, so the kernel is bound by load
// latency, not bandwidth). Each thread sums its squares in the same order either way.
constexpr int kRmsRegs = 16;

__global__ void RmsNormKernel(const RmsNormParams p) {
  using Red = double[32];
  HELIX_STATIC_SMEM(Red, red);
  const int64_t r = blockIdx.x;
  const int64_t step = blockDim.x;
  const float* x = p.x + r * p.dim;
  float* res = p.residual != nullptr ? p.residual + r * p.dim : nullptr;
  float* out = p.out + r * p.dim;
  const int64_t lowp_row = r * p.dim;
  double s = 0.0;
  if (p.dim <= step * kRmsRegs) {
    // x, the residual and the norm weight are all loaded before any is used: one round trip to
    // memory before the reduction, not three in a row. The weight (never written by a kernel of
    // the step) even before PdlEnter, overlapping the kernel before this one.
    float vals[kRmsRegs], resv[kRmsRegs], wts[kRmsRegs];
#pragma unroll
    for (int j = 0; j < kRmsRegs; ++j) {
      const int64_t i = threadIdx.x + j * step;
      wts[j] = i < p.dim ? p.weight[i] : 0.0f;
    }
    PdlEnter();  // x and the residual only after this: see HELIX_LAUNCH_PDL
#pragma unroll
    for (int j = 0; j < kRmsRegs; ++j) {
      const int64_t i = threadIdx.x + j * step;
      vals[j] = i < p.dim ? x[i] : 0.0f;
      resv[j] = res != nullptr && i < p.dim ? res[i] : 0.0f;
    }
    if (res != nullptr) {
#pragma unroll
      for (int j = 0; j < kRmsRegs; ++j) {
        const int64_t i = threadIdx.x + j * step;
        if (i < p.dim) {
          vals[j] = resv[j] + vals[j];
          res[i] = vals[j];
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kRmsRegs; ++j) {
      if (threadIdx.x + j * step < p.dim) {
        s += static_cast<double>(vals[j]) * vals[j];
      }
    }
    s = BlockReduce(s, red, false);  // every thread's reads of x are done past its barrier
    const float inv =
        static_cast<float>(1.0 / sqrt(s / static_cast<double>(p.dim) + static_cast<double>(p.eps)));
#pragma unroll
    for (int j = 0; j < kRmsRegs; ++j) {
      const int64_t i = threadIdx.x + j * step;
      if (i < p.dim) {
        const float o = __fmul_rn(__fmul_rn(vals[j], inv), wts[j]);
        out[i] = o;
        if (p.out_lowp != nullptr) StoreLowpAt(p.out_lowp, p.out_lowp_dtype, lowp_row + i, o);
      }
    }
    return;
  }
  PdlEnter();  // see HELIX_LAUNCH_PDL
  for (int64_t i = threadIdx.x; i < p.dim; i += step) {
    float v = x[i];
    if (res != nullptr) {
      v = res[i] + v;
      res[i] = v;
    }
    s += static_cast<double>(v) * v;
  }
  s = BlockReduce(s, red, false);
  const float inv =
      static_cast<float>(1.0 / sqrt(s / static_cast<double>(p.dim) + static_cast<double>(p.eps)));
  const float* v = res != nullptr ? res : x;
  for (int64_t i = threadIdx.x; i < p.dim; i += step) {
    const float o = __fmul_rn(__fmul_rn(v[i], inv), p.weight[i]);
    out[i] = o;
    if (p.out_lowp != nullptr) StoreLowpAt(p.out_lowp, p.out_lowp_dtype, lowp_row + i, o);
  }
}

// ---------------------------------------------------------------------------------------------
// RoPE: one thread per (token, head, pair); the angle in double as on the CPU (each head's
// thread computes it again, in parallel: at decode a thread per pair alone left the heads'
// loads one after another on its path).

__global__ void RopeKernel(const RopeParams p) {
  PdlEnter();  // first: see HELIX_LAUNCH_PDL
  const int64_t half = p.rotary_dim / 2;
  const int64_t per_token = p.heads * half;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       idx < p.tokens * per_token; idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = idx / per_token;
    const int64_t h = (idx % per_token) / half;
    const int64_t i = idx % half;
    const double inv_freq =
        p.inv_freq != nullptr
            ? p.inv_freq[i]
            : pow(static_cast<double>(p.theta),
                  -2.0 * static_cast<double>(i) / static_cast<double>(p.rotary_dim));
    const double angle = static_cast<double>(p.positions[t]) * inv_freq;
    double sd, cd;
    sincos(angle, &sd, &cd);
    const float c = static_cast<float>(cd * static_cast<double>(p.mscale));
    const float s = static_cast<float>(sd * static_cast<double>(p.mscale));
    float* xh = p.x + (t * p.heads + h) * p.head_dim;
    const int64_t i0 = p.style == RopeStyle::kInterleaved ? 2 * i : i;
    const int64_t i1 = p.style == RopeStyle::kInterleaved ? 2 * i + 1 : i + half;
    const float a = xh[i0];
    const float b = xh[i1];
    xh[i0] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    xh[i1] = __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c));
  }
}

// ---------------------------------------------------------------------------------------------
// SiLU * mul, K/V write and embedding: element-wise, grid-stride.

__global__ void SiluMulKernel(const SiluMulParams p) {
  PdlEnter();  // first: see HELIX_LAUNCH_PDL
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < p.n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t in = p.cols > 0 ? i / p.cols * p.ld + i % p.cols : i;
    const float g = p.gate[in];
    const float o = SiluMulValue(g, p.up[in]);
    p.out[i] = o;
    if (p.out_lowp != nullptr) StoreLowpAt(p.out_lowp, p.out_lowp_dtype, i, o);
  }
}

__global__ void AddKernel(const AddParams p) {
  PdlEnter();  // first: see HELIX_LAUNCH_PDL
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < p.n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    p.x[i] += p.y[i];
  }
}

__global__ void ScatterAddRowsKernel(const ScatterAddRowsParams p) {
  PdlEnter();  // first: see HELIX_LAUNCH_PDL
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < p.n * p.dim;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = i / p.dim, d = i - j * p.dim;
    float* o = p.out + static_cast<int64_t>(p.rows[j]) * p.dim + d;
    *o = __fadd_rn(*o,
                   __fmul_rn(p.w[j], p.y[i]));  // (the CPU build may fuse it: one rounding apart)
  }
}

__global__ void GatherRowsKernel(const GatherRowsParams p) {
  PdlEnter();  // first: see HELIX_LAUNCH_PDL
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < p.num_rows * p.n; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / p.n, j = i - r * p.n;
    p.out[i] = p.in[static_cast<int64_t>(p.rows[r]) * p.stride + j];
  }
}

__global__ void PackCombineKernel(const PackCombineParams p) {
  PdlEnter();  // first: see HELIX_LAUNCH_PDL
  const int64_t d1 = p.dim + 1;
  const int64_t total = p.peers * p.tokens * p.heads_per_peer * d1;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i % d1;
    const int64_t row = i / d1;  // (c * tokens + t) * heads_per_peer + h
    const int64_t h = row % p.heads_per_peer;
    const int64_t ct = row / p.heads_per_peer;
    const int64_t t = ct % p.tokens, c = ct / p.tokens;
    const int64_t src = t * p.peers * p.heads_per_peer + c * p.heads_per_peer + h;
    p.send[i] = e < p.dim ? p.att[src * p.dim + e] : p.lse[src];
  }
}

__global__ void UnpackCombineKernel(const UnpackCombineParams p) {
  PdlEnter();  // first: see HELIX_LAUNCH_PDL
  const int64_t d1 = p.dim + 1;
  const int64_t total = p.peers * p.rows * d1;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i % d1, r = i / d1;  // r = peer * rows + row
    if (e < p.dim) {
      p.parts_o[r * p.dim + e] = p.recv[i];
    } else {
      p.parts_lse[r] = p.recv[i];
    }
  }
}

template <typename T>
__global__ void WriteKvKernel(const WriteKvBatchParams p) {
  PdlEnter();  // first: see HELIX_LAUNCH_PDL
  const int64_t d = p.kv.head_dim;
  const int64_t per_token = p.kv.num_planes * p.kv.num_kv_heads * d;  // one plane: K only
  T* base = static_cast<T*>(p.kv.base);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       idx < p.tokens * per_token; idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = idx / per_token;
    const int64_t rest = idx % per_token;
    const int c = static_cast<int>(rest / (p.kv.num_kv_heads * d));
    const int64_t he = rest % (p.kv.num_kv_heads * d);  // head * d + e
    const int32_t block = p.block[t];
    if (block < 0) {
      continue;
    }
    const int64_t off = DevKvOffset(p.kv, block, p.layer, c, he / d, p.token_in_block[t]) + he % d;
    base[off] = FromFloat<T>((c == 0 ? p.k : p.v)[t * p.kv.num_kv_heads * d + he]);
  }
}

template <typename T>
__global__ void EmbeddingKernel(const EmbeddingParams p) {
  PdlEnter();  // first: see HELIX_LAUNCH_PDL
  const T* table = static_cast<const T*>(p.table);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < p.n * p.dim;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / p.dim;
    const int64_t id = p.ids[i];
    p.out[idx] = id >= 0 && id < p.vocab ? ToFloat(table[id * p.dim + idx % p.dim]) : 0.0f;
  }
}

// Fused RoPE + K/V write: one thread per (token, head row, dim e), the head rows being the q
// heads then the k heads. The owner of a rotary pair (its first element) rotates the pair in its
// row (and for a k row stores the rotated pair); a k row's pass-through dims store k as is;
// every k row's thread stores its v element. What an element needs from the step's metadata
// (positions, block, token_in_block: uploaded before the step's first kernel, never a kernel's
// output) and its pair's angles come first (RopePlan), for the thread's first element before
// PdlEnter, overlapping the kernel before (which writes q, k and v).
struct RopePlan {
  int64_t t, r, e;
  int64_t i, partner;  // pair index and the pair's second element; -1: not a pair's owner
  int32_t block, slot;
  float c, s;  // the pair's cosine and sine (owners only)
};

__device__ inline RopePlan PlanRope(const RopeWriteKvParams& p, int64_t idx) {
  const int64_t d = p.kv.head_dim;
  const int64_t rows = p.num_q_heads + p.kv.num_kv_heads;
  RopePlan pl;
  pl.t = idx / (rows * d);
  pl.r = (idx / d) % rows;
  pl.e = idx % d;
  pl.block = p.block[pl.t];
  pl.slot = p.token_in_block[pl.t];
  pl.i = -1;
  pl.partner = -1;
  if (p.style == RopeStyle::kInterleaved) {
    if (pl.e < p.rotary_dim && pl.e % 2 == 0) {
      pl.i = pl.e / 2;
      pl.partner = pl.e + 1;
    }
  } else if (pl.e < p.rotary_dim / 2) {
    pl.i = pl.e;
    pl.partner = pl.e + p.rotary_dim / 2;
  }
  pl.c = 1.0f;
  pl.s = 0.0f;
  if (pl.i >= 0) {
    RopeCosSin(p.theta, p.rotary_dim, pl.i, p.positions[pl.t], &pl.c, &pl.s);
  }
  return pl;
}

template <typename T>
__global__ void RopeWriteKvKernel(const RopeWriteKvParams p) {
  const int64_t d = p.kv.head_dim;
  const int64_t hq = p.num_q_heads;
  const int64_t hkv = p.kv.num_kv_heads;
  const int64_t n = p.tokens * (hq + hkv) * d;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  RopePlan pl{};
  if (first < n) {
    pl = PlanRope(p, first);
  }
  PdlEnter();  // q, k and v only after this: see HELIX_LAUNCH_PDL
  T* base = static_cast<T*>(p.kv.base);
  for (int64_t idx = first; idx < n; idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (idx != first) {
      pl = PlanRope(p, idx);
    }
    const int64_t t = pl.t, e = pl.e, i = pl.i, partner = pl.partner;
    const int32_t block = pl.block, slot = pl.slot;
    const bool is_k = pl.r >= hq;
    const int64_t h = is_k ? pl.r - hq : pl.r;
    const int64_t kv_row = p.row_stride > 0 ? t * p.row_stride + h * d : (t * hkv + h) * d;
    float* x =
        is_k ? p.k + kv_row : p.q + (p.row_stride > 0 ? t * p.row_stride : t * hq * d) + h * d;
    // Where this row's rotated values go: x itself, or for q the separate contiguous q_out.
    float* y = !is_k && p.q_out != nullptr ? p.q_out + (t * hq + h) * d : x;
    if (i >= 0) {
      const float a = x[e];
      const float b = x[partner];
      const float ra = RopeRotate(a, b, pl.c, pl.s, false);
      const float rb = RopeRotate(a, b, pl.c, pl.s, true);
      y[e] = ra;
      y[partner] = rb;
      if (is_k && block >= 0) {
        const int64_t off = DevKvOffset(p.kv, block, p.layer, 0, h, slot);
        base[off + e] = FromFloat<T>(ra);
        base[off + partner] = FromFloat<T>(rb);
      }
    } else if (e >= p.rotary_dim) {  // pass-through dims
      if (is_k && block >= 0) {
        base[DevKvOffset(p.kv, block, p.layer, 0, h, slot) + e] = FromFloat<T>(x[e]);
      } else if (y != x) {
        y[e] = x[e];
      }
    }
    if (is_k && block >= 0 && p.kv.num_planes == 2) {  // a one-plane (MLA) pool has no V
      base[DevKvOffset(p.kv, block, p.layer, 1, h, slot) + e] = FromFloat<T>(p.v[kv_row + e]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Greedy argmax: one thread block per row; (value desc, id asc) with NaN never better.

constexpr int kRowThreads = 1024;

__device__ inline bool Better(float v, int i, float bv, int bi) {
  return v > bv || (v == bv && i < bi);
}

// The best (value, id) of row[begin, end) in this thread (bv, bi updated): 16-byte loads when
// vec4 (row 16-byte aligned, begin and end multiples of 4), several in flight per thread (the
// order of the scan does not matter: Better is a total order). NaN never wins.
__device__ inline void ArgmaxScan(const float* row, int64_t begin, int64_t end, bool vec4,
                                  float& bv, int& bi) {
  const auto consider = [&](float v, int i) {
    if (!isnan(v) && Better(v, i, bv, bi)) {
      bv = v;
      bi = i;
    }
  };
  if (vec4) {
    const float4* row4 = reinterpret_cast<const float4*>(row);
#pragma unroll 4
    for (int64_t j = begin / 4 + threadIdx.x; j < end / 4; j += blockDim.x) {
      const float4 x = row4[j];
      const int i = static_cast<int>(4 * j);
      consider(x.x, i);
      consider(x.y, i + 1);
      consider(x.z, i + 2);
      consider(x.w, i + 3);
    }
  } else {
#pragma unroll 4
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      consider(row[i], static_cast<int>(i));
    }
  }
}

// The block's best (value, id), in thread 0 (bv, bi); every thread calls it.
__device__ inline void ArgmaxBlockReduce(float& bv, int& bi) {
  using Vals = float[32];
  using Ids = int[32];
  HELIX_STATIC_SMEM(Vals, s_v);
  HELIX_STATIC_SMEM(Ids, s_i);
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (Better(ov, oi, bv, bi)) {
      bv = ov;
      bi = oi;
    }
  }
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) {
    s_v[warp] = bv;
    s_i[warp] = bi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) {
      if (Better(s_v[w], s_i[w], bv, bi)) {
        bv = s_v[w];
        bi = s_i[w];
      }
    }
  }
}

// The token of a row whose best is (bv, bi): none when nothing but NaN (bi unset) and -inf.
__device__ inline int ArgmaxToken(float bv, int bi) {
  return bi == INT_MAX || !(bv > kNegInf) ? kArgmaxNoToken : bi;
}

bool ArgmaxVec4(const ArgmaxParams& p) {
  return p.vocab % 4 == 0 && reinterpret_cast<uintptr_t>(p.logits) % 16 == 0;
}

__global__ void __launch_bounds__(kRowThreads) ArgmaxKernel(const ArgmaxParams p, bool vec4) {
  PdlEnter();  // first: see HELIX_LAUNCH_PDL
  const float* row = p.logits + blockIdx.x * p.vocab;
  float bv = kNegInf;
  int bi = INT_MAX;
  ArgmaxScan(row, 0, p.vocab, vec4, bv, bi);
  ArgmaxBlockReduce(bv, bi);
  if (threadIdx.x == 0) {
    p.out[blockIdx.x] = ArgmaxToken(bv, bi);
  }
}

// The chunked argmax: thread block (c, r) writes the best (value, id) of chunk c of row r
// (`chunk` logits, a multiple of 4) to the workspace, [rows][chunks] values then ids;
// ArgmaxChunksKernel picks among them per row.
constexpr int kArgmaxChunkThreads = 256;

// A row of `vocab` logits in at most kArgmaxMaxChunks chunks of at least kArgmaxMinChunk, each
// `len` long (a multiple of 4; the last may be shorter).
struct ArgmaxChunking {
  int64_t len, count;
};
ArgmaxChunking ArgmaxChunks(int64_t vocab) {
  const int64_t most = std::max<int64_t>(
      1, std::min(kArgmaxMaxChunks, (vocab + kArgmaxMinChunk - 1) / kArgmaxMinChunk));
  const int64_t len = ((vocab + most - 1) / most + 3) / 4 * 4;
  return {len, (vocab + len - 1) / len};
}

// The workspace's chunk winners: values [rows][chunks], then ids [rows][chunks].
__device__ inline float* ArgmaxWsValues(const ArgmaxParams& p, int chunks, int64_t r) {
  return static_cast<float*>(p.workspace) + r * chunks;
}
__device__ inline int* ArgmaxWsIds(const ArgmaxParams& p, int chunks, int64_t r) {
  return static_cast<int*>(p.workspace) + (p.rows + r) * chunks;
}

__global__ void __launch_bounds__(kArgmaxChunkThreads)
    ArgmaxChunkKernel(const ArgmaxParams p, bool vec4, int chunks, int64_t chunk) {
  PdlEnter();  // first: see HELIX_LAUNCH_PDL
  const int64_t r = blockIdx.y;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t end = begin + chunk < p.vocab ? begin + chunk : p.vocab;
  float bv = kNegInf;
  int bi = INT_MAX;
  ArgmaxScan(p.logits + r * p.vocab, begin, end, vec4, bv, bi);
  ArgmaxBlockReduce(bv, bi);
  if (threadIdx.x == 0) {
    ArgmaxWsValues(p, chunks, r)[blockIdx.x] = bv;
    ArgmaxWsIds(p, chunks, r)[blockIdx.x] = bi;
  }
}

__global__ void __launch_bounds__(kArgmaxChunkThreads)
    ArgmaxChunksKernel(const ArgmaxParams p, int chunks) {
  PdlEnter();  // first: see HELIX_LAUNCH_PDL
  const int64_t r = blockIdx.x;
  const float* vals = ArgmaxWsValues(p, chunks, r);
  const int* ids = ArgmaxWsIds(p, chunks, r);
  float bv = kNegInf;
  int bi = INT_MAX;
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
    if (Better(vals[c], ids[c], bv, bi)) {  // never NaN: a chunk's winner is a number or none
      bv = vals[c];
      bi = ids[c];
    }
  }
  ArgmaxBlockReduce(bv, bi);
  if (threadIdx.x == 0) {
    p.out[r] = ArgmaxToken(bv, bi);
  }
}

// ---------------------------------------------------------------------------------------------
// Sampling: one thread block per row. The sorted candidate order (score desc, id asc) is
// never materialised: each cut (top-k, top-p, the draw) is found by a radix descent over the
// scores' order-preserving bit patterns (4 passes of 8 bits, histograms of counts and
// probability mass in shared memory), then among the tied scores by id.

// Order-preserving map of a float to uint32 (larger float -> larger key); -0 as +0.
__device__ inline uint32_t OrderKey(float f) {
  const uint32_t b = __float_as_uint(f == 0.0f ? 0.0f : f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ inline float KeyToFloat(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

struct Cut {  // candidates: key > key, or key == key and id <= id
  bool on;
  uint32_t key;
  int id;
  __device__ bool Keeps(uint32_t k, int i) const { return !on || k > key || (k == key && i <= id); }
};

struct SampleRow {
  const float* logits;
  int64_t vocab;
  float temp;
  bool inf_only = false;  // some score is +inf: those share the mass (score 0), the rest none
  double top;             // max score
  Cut top_k, top_p;
  double min_p;  // 0 = off

  // As engine/sampler takes non-finite logits: NaN is no candidate (-inf), and +inf ones
  // share the whole mass.
  __device__ float Score(int64_t i) const {
    const float s = logits[i] / temp;
    if (isnan(s)) return kNegInf;
    if (inf_only) return s == -kNegInf ? 0.0f : kNegInf;
    return s;
  }
  __device__ double Prob(float s) const { return exp(static_cast<double>(s) - top); }
  // level 0: every token; 1: after top-k; 2: after top-p; 3: after min-p.
  __device__ bool In(int level, uint32_t k, int i, double prob) const {
    return (level < 1 || top_k.Keeps(k, i)) && (level < 2 || top_p.Keeps(k, i)) &&
           (level < 3 || min_p <= 0.0 || prob >= min_p);
  }
};

struct SampleShared {
  double hist[256];
  int count[256];
  double red_d[32];
  int scan[32];
  uint32_t prefix;
  double above;
  int found;
};

// Sum of the probabilities of the level's candidates.
__device__ double LevelMass(const SampleRow& row, int level, SampleShared* sh) {
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < row.vocab; i += blockDim.x) {
    const float sc = row.Score(i);
    const double pr = row.Prob(sc);
    if (row.In(level, OrderKey(sc), static_cast<int>(i), pr)) {
      s += pr;
    }
  }
  return BlockReduce(s, sh->red_d, false);
}

// The id of the n-th (1-based, in id order) candidate of `level` whose key is `key`.
__device__ int NthTied(const SampleRow& row, int level, uint32_t key, int n, SampleShared* sh) {
  const int64_t chunk = (row.vocab + blockDim.x - 1) / blockDim.x;
  const int64_t b = threadIdx.x * chunk;
  const int64_t e = min(row.vocab, b + chunk);
  int c = 0;
  for (int64_t i = b; i < e; ++i) {
    const float sc = row.Score(i);
    c += OrderKey(sc) == key && row.In(level, key, static_cast<int>(i), row.Prob(sc));
  }
  // Exclusive scan of the counts over the block.
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  int incl = c;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) {
      incl += y;
    }
  }
  __syncthreads();
  if (lane == 31) {
    sh->scan[warp] = incl;
  }
  if (threadIdx.x == 0) {
    sh->found = -1;
  }
  __syncthreads();
  int before = incl - c;
  for (int w = 0; w < warp; ++w) {
    before += sh->scan[w];
  }
  if (n > before && n <= before + c) {
    int seen = before;
    for (int64_t i = b; i < e; ++i) {
      const float sc = row.Score(i);
      if (OrderKey(sc) == key && row.In(level, key, static_cast<int>(i), row.Prob(sc)) &&
          ++seen == n) {
        sh->found = static_cast<int>(i);
        break;
      }
    }
  }
  __syncthreads();
  return sh->found;
}

// The first candidate of `level` in sorted order at which the cumulative weight (count, or
// probability when use_prob) reaches target (>= target, or > target when strict); when none
// does (target beyond the total), the last candidate. Returns its key and id.
__device__ Cut SelectCut(const SampleRow& row, int level, bool use_prob, double target, bool strict,
                         SampleShared* sh) {
  if (threadIdx.x == 0) {
    sh->prefix = 0;
    sh->above = 0.0;
  }
  int tied = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) {
      sh->hist[b] = 0.0;
      sh->count[b] = 0;
    }
    __syncthreads();
    const uint32_t prefix = sh->prefix;
    const uint32_t mask = shift == 24 ? 0u : (0xffffffffu << (shift + 8));
    for (int64_t i = threadIdx.x; i < row.vocab; i += blockDim.x) {
      const float sc = row.Score(i);
      const uint32_t k = OrderKey(sc);
      if ((k & mask) != prefix) {
        continue;
      }
      const double pr = row.Prob(sc);
      if (!row.In(level, k, static_cast<int>(i), pr)) {
        continue;
      }
      const int bin = (k >> shift) & 255;
      atomicAdd(&sh->hist[bin], use_prob ? pr : 1.0);
      atomicAdd(&sh->count[bin], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      double acc = sh->above;
      int chosen = -1, last = -1;
      double acc_last = acc;
      for (int b = 255; b >= 0; --b) {
        // Bins without weight can never be where the cumulative weight crosses the target
        // (it was below it before them), nor the fallback's last candidate.
        if (sh->count[b] == 0 || sh->hist[b] <= 0.0) {
          continue;
        }
        const double next = acc + sh->hist[b];
        if (strict ? next > target : next >= target) {
          chosen = b;
          break;
        }
        last = b;
        acc_last = acc;
        acc = next;
      }
      if (chosen < 0) {  // past the total (rounding): the last candidate with weight
        chosen = last;
        acc = acc_last;
      }
      sh->above = acc;
      sh->prefix = prefix | (static_cast<uint32_t>(chosen < 0 ? 0 : chosen) << shift);
      sh->scan[0] = chosen < 0 ? 0 : sh->count[chosen];
    }
    __syncthreads();
    tied = sh->scan[0];
  }
  const uint32_t key = sh->prefix;
  const double above = sh->above;
  __syncthreads();
  // How many of the tied candidates (equal weight each) are needed.
  const double w = use_prob ? row.Prob(KeyToFloat(key)) : 1.0;
  const double need = w > 0.0 ? (target - above) / w : static_cast<double>(tied);
  double n_d = strict ? floor(need) + 1.0 : ceil(need);
  n_d = fmin(fmax(n_d, 1.0), static_cast<double>(max(tied, 1)));
  const int n = static_cast<int>(n_d);
  Cut cut;
  cut.on = true;
  cut.key = key;
  cut.id = NthTied(row, level, key, n, sh);
  return cut;
}

__global__ void __launch_bounds__(kRowThreads) SampleKernel(const SampleParams p) {
  PdlEnter();  // first: see HELIX_LAUNCH_PDL
  HELIX_STATIC_SMEM(SampleShared, sh);
  const int64_t r = blockIdx.x;
  SampleRow row;
  row.logits = p.logits + r * p.vocab;
  row.vocab = p.vocab;
  row.temp = p.temperature[r];
  if (!(row.temp > 0.0f)) {  // a greedy row (its token comes from the argmax): not sampled
    if (threadIdx.x == 0) {
      p.out[r] = -1;
    }
    return;
  }
  row.top_k.on = false;
  row.top_p.on = false;
  row.min_p = 0.0;
  float mx = kNegInf;
  for (int64_t i = threadIdx.x; i < p.vocab; i += blockDim.x) {
    mx = fmaxf(mx, row.Score(i));
  }
  using RedF = float[32];
  HELIX_STATIC_SMEM(RedF, red_f);
  row.top = BlockReduce(mx, red_f, true);
  if (!(row.top > kNegInf)) {  // nothing but NaN and -inf: no token (the request fails)
    if (threadIdx.x == 0) {
      p.out[r] = kArgmaxNoToken;
    }
    return;
  }
  if (row.top == -kNegInf) {
    row.inf_only = true;
    row.top = 0.0;
  }

  const int k = p.top_k[r];
  if (k > 0 && k < p.vocab) {
    row.top_k = SelectCut(row, 0, false, static_cast<double>(k), false, &sh);
  }
  const float top_p = p.top_p[r];
  if (top_p < 1.0f) {
    const double total = LevelMass(row, 1, &sh);
    row.top_p = SelectCut(row, 1, true, static_cast<double>(top_p) * total, false, &sh);
  }
  row.min_p = p.min_p[r];
  const double kept = LevelMass(row, 3, &sh);
  const Cut pick = SelectCut(row, 3, true, p.u[r] * kept, true, &sh);
  if (threadIdx.x == 0) {
    p.out[r] = pick.id;
  }
}

}  // namespace

namespace {
std::atomic<bool> g_programmatic_launch{true};

// Whether this binary's kernels wait in PdlEnter on the current device: they were compiled, or
// JIT-compiled from PTX, for sm_90 or later (PdlEnter is compiled out below that, and a
// programmatic launch without the wait would race). RmsNormKernel stands for them all: the
// library has one architecture list.
bool PdlCompiled() {
#ifdef HELIX_CUDA_EMULATION
  return true;
#else
  static const bool compiled = [] {
    cudaFuncAttributes a{};
    if (cudaFuncGetAttributes(&a, RmsNormKernel) != cudaSuccess) {
      (void)cudaGetLastError();
      return false;
    }
    return a.ptxVersion >= 90;
  }();
  return compiled;
#endif
}
}  // namespace

void SetProgrammaticLaunch(bool on) {
  g_programmatic_launch.store(on);
  if (on) (void)PdlCompiled();  // decided now, outside any stream capture
}
bool ProgrammaticLaunch() {
  return g_programmatic_launch.load(std::memory_order_relaxed) && PdlCompiled();
}

cudaError_t RmsNormCuda(const RmsNormParams& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.dim <= 0) {
    return cudaSuccess;
  }
  if (p.rows > kMaxGridX) {
    return cudaErrorInvalidValue;
  }
  HELIX_LAUNCH_PDL(RmsNormKernel, static_cast<unsigned>(p.rows), kNormBlockThreads, 0, stream, p);
  HELIX_CUDA_CHECK_LAUNCH(stream);
  return cudaSuccess;
}

cudaError_t RopeCuda(const RopeParams& p, cudaStream_t stream) {
  if (p.tokens <= 0 || p.heads <= 0 || p.rotary_dim < 2) {
    return cudaSuccess;
  }
  const int64_t n = p.tokens * p.heads * (p.rotary_dim / 2);
  HELIX_LAUNCH_PDL(RopeKernel, GridFor(n, kElemThreads), kElemThreads, 0, stream, p);
  HELIX_CUDA_CHECK_LAUNCH(stream);
  return cudaSuccess;
}

cudaError_t SiluMulCuda(const SiluMulParams& p, cudaStream_t stream) {
  return LaunchElementwise(SiluMulKernel, p.n, p, stream);
}

cudaError_t AddCuda(const AddParams& p, cudaStream_t stream) {
  return LaunchElementwise(AddKernel, p.n, p, stream);
}

cudaError_t ScatterAddRowsCuda(const ScatterAddRowsParams& p, cudaStream_t stream) {
  return LaunchElementwise(ScatterAddRowsKernel, p.n <= 0 || p.dim <= 0 ? 0 : p.n * p.dim, p,
                           stream);
}

cudaError_t GatherRowsCuda(const GatherRowsParams& p, cudaStream_t stream) {
  return LaunchElementwise(GatherRowsKernel, p.num_rows <= 0 || p.n <= 0 ? 0 : p.num_rows * p.n, p,
                           stream);
}

cudaError_t PackCombineCuda(const PackCombineParams& p, cudaStream_t stream) {
  return LaunchElementwise(PackCombineKernel, p.peers * p.tokens * p.heads_per_peer * (p.dim + 1),
                           p, stream);
}

cudaError_t UnpackCombineCuda(const UnpackCombineParams& p, cudaStream_t stream) {
  return LaunchElementwise(UnpackCombineKernel, p.peers * p.rows * (p.dim + 1), p, stream);
}

cudaError_t WriteKvBatchCuda(const WriteKvBatchParams& p, cudaStream_t stream) {
  const int64_t n = p.tokens * p.kv.num_planes * p.kv.num_kv_heads * p.kv.head_dim;
  if (n <= 0) {
    return cudaSuccess;
  }
  const unsigned grid = GridFor(n, kElemThreads);
  switch (p.kv.dtype) {
    case DType::kF32:
      HELIX_LAUNCH_PDL(WriteKvKernel<float>, grid, kElemThreads, 0, stream, p);
      break;
    case DType::kF16:
      HELIX_LAUNCH_PDL(WriteKvKernel<__half>, grid, kElemThreads, 0, stream, p);
      break;
    case DType::kBF16:
      HELIX_LAUNCH_PDL(WriteKvKernel<__nv_bfloat16>, grid, kElemThreads, 0, stream, p);
      break;
  }
  HELIX_CUDA_CHECK_LAUNCH(stream);
  return cudaSuccess;
}

namespace {

// One token's block and slot as a kernel argument (no device copy of the indices).
template <typename T>
__global__ void WriteKvOneKernel(const KvPoolView kv, int64_t block, int64_t layer, int64_t slot,
                                 const float* k, const float* v) {
  PdlEnter();  // first: see HELIX_LAUNCH_PDL
  const int64_t hd = kv.num_kv_heads * kv.head_dim;
  T* base = static_cast<T*>(kv.base);
  const int64_t n = kv.num_planes * hd;  // a one-plane (MLA) pool has no V
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(idx / hd);
    const int64_t he = idx % hd;
    const int64_t off = DevKvOffset(kv, block, layer, c, he / kv.head_dim, slot) + he % kv.head_dim;
    base[off] = FromFloat<T>((c == 0 ? k : v)[he]);
  }
}

}  // namespace

cudaError_t WriteKvCuda(const KvPoolView& view, int64_t block, int64_t layer,
                        int64_t token_in_block, const float* k, const float* v,
                        cudaStream_t stream) {
  const int64_t n = view.num_planes * view.num_kv_heads * view.head_dim;
  if (n <= 0) {
    return cudaSuccess;
  }
  const unsigned grid = GridFor(n, kElemThreads);
  switch (view.dtype) {
    case DType::kF32:
      HELIX_LAUNCH_PDL(WriteKvOneKernel<float>, grid, kElemThreads, 0, stream, view, block, layer,
                       token_in_block, k, v);
      break;
    case DType::kF16:
      HELIX_LAUNCH_PDL(WriteKvOneKernel<__half>, grid, kElemThreads, 0, stream, view, block, layer,
                       token_in_block, k, v);
      break;
    case DType::kBF16:
      HELIX_LAUNCH_PDL(WriteKvOneKernel<__nv_bfloat16>, grid, kElemThreads, 0, stream, view, block,
                       layer, token_in_block, k, v);
      break;
  }
  HELIX_CUDA_CHECK_LAUNCH(stream);
  return cudaSuccess;
}

cudaError_t RopeWriteKvCuda(const RopeWriteKvParams& p, cudaStream_t stream) {
  const int64_t n = p.tokens * (p.num_q_heads + p.kv.num_kv_heads) * p.kv.head_dim;
  if (n <= 0 || p.rotary_dim < 0 || p.rotary_dim % 2 != 0 || p.rotary_dim > p.kv.head_dim) {
    return n <= 0 ? cudaSuccess : cudaErrorInvalidValue;
  }
  const unsigned grid = GridFor(n, kElemThreads);
  switch (p.kv.dtype) {
    case DType::kF32:
      HELIX_LAUNCH_PDL(RopeWriteKvKernel<float>, grid, kElemThreads, 0, stream, p);
      break;
    case DType::kF16:
      HELIX_LAUNCH_PDL(RopeWriteKvKernel<__half>, grid, kElemThreads, 0, stream, p);
      break;
    case DType::kBF16:
      HELIX_LAUNCH_PDL(RopeWriteKvKernel<__nv_bfloat16>, grid, kElemThreads, 0, stream, p);
      break;
  }
  HELIX_CUDA_CHECK_LAUNCH(stream);
  return cudaSuccess;
}

cudaError_t EmbeddingCuda(const EmbeddingParams& p, cudaStream_t stream) {
  const int64_t n = p.n * p.dim;
  if (n <= 0) {
    return cudaSuccess;
  }
  const unsigned grid = GridFor(n, kElemThreads);
  switch (p.dtype) {
    case DType::kF32:
      HELIX_LAUNCH_PDL(EmbeddingKernel<float>, grid, kElemThreads, 0, stream, p);
      break;
    case DType::kF16:
      HELIX_LAUNCH_PDL(EmbeddingKernel<__half>, grid, kElemThreads, 0, stream, p);
      break;
    case DType::kBF16:
      HELIX_LAUNCH_PDL(EmbeddingKernel<__nv_bfloat16>, grid, kElemThreads, 0, stream, p);
      break;
  }
  HELIX_CUDA_CHECK_LAUNCH(stream);
  return cudaSuccess;
}

size_t ArgmaxCudaWorkspaceBytes(const ArgmaxParams& p) {
  if (p.rows <= 0 || p.vocab <= 0) {
    return 0;
  }
  const int64_t chunks = ArgmaxChunks(p.vocab).count;
  if (chunks <= 1) {
    return 0;
  }
  return static_cast<size_t>(p.rows * chunks) * (sizeof(float) + sizeof(int));
}

cudaError_t ArgmaxCuda(const ArgmaxParams& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.vocab <= 0) {
    return cudaSuccess;
  }
  if (p.vocab > INT_MAX || p.rows > kMaxGridX) {
    return cudaErrorInvalidValue;
  }
  const bool vec4 = ArgmaxVec4(p);
  const ArgmaxChunking ch = ArgmaxChunks(p.vocab);
  if (p.workspace == nullptr || ch.count <= 1) {
    HELIX_LAUNCH_PDL(ArgmaxKernel, static_cast<unsigned>(p.rows), kRowThreads, 0, stream, p, vec4);
    HELIX_CUDA_CHECK_LAUNCH(stream);
    return cudaSuccess;
  }
  if (p.rows > 65535) {
    return cudaErrorInvalidValue;  // grid.y
  }
  const int c = static_cast<int>(ch.count);
  const dim3 grid(static_cast<unsigned>(ch.count), static_cast<unsigned>(p.rows));
  HELIX_LAUNCH_PDL(ArgmaxChunkKernel, grid, kArgmaxChunkThreads, 0, stream, p, vec4, c, ch.len);
  HELIX_CUDA_CHECK_LAUNCH(stream);
  HELIX_LAUNCH_PDL(ArgmaxChunksKernel, static_cast<unsigned>(p.rows), kArgmaxChunkThreads, 0,
                   stream, p, c);
  HELIX_CUDA_CHECK_LAUNCH(stream);
  return cudaSuccess;
}

cudaError_t SampleCuda(const SampleParams& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.vocab <= 0) {
    return cudaSuccess;
  }
  if (p.vocab > INT_MAX || p.rows > kMaxGridX) {
    return cudaErrorInvalidValue;
  }
  HELIX_LAUNCH_PDL(SampleKernel, static_cast<unsigned>(p.rows), kRowThreads, 0, stream, p);
  HELIX_CUDA_CHECK_LAUNCH(stream);
  return cudaSuccess;
}

}  // namespace helix::kernels::cuda
