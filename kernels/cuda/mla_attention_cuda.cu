#include "kernels/cuda/mla_attention_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

#include "kernels/cuda/attention_cuda.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_util.cuh"

namespace helix::kernels::cuda {
namespace {

// One thread block: 8 warps serve kHeads heads over tiles of kRows cached rows.
//  * copy: 8 threads per row issue its 16-byte cp.async chunks (one block-table lookup each);
//  * scores: warp w takes heads 4 (w % 4) .. + 3 and rows 16 (w / 4) .. + 15; every lane holds
//    q for its 4 heads over a contiguous slice of 2 kMaxPairs dims of the row in registers, so
//    a row is read from shared memory once per head quad and the partial dot products of 8
//    rows x 4 heads are summed across the lanes by one reduce-scatter (31 shuffles);
//  * softmax: warp w takes heads 2w, 2w + 1, lane = row;
//  * values: thread (head_half, q4) accumulates heads 8 head_half .. + 7 over latent dims
//    4 q4 .. + 3.
// Per cached row and head the work is latent + rope + latent FMAs (about 15 per byte of bf16
// KV at 16 heads, against ~10 FMAs per byte of HBM bandwidth on an H100), so the kernel is
// bound by fp32 FMA throughput, not by HBM, from ~16 heads up; tensor cores (bf16 or 3xTF32
// mma) would be the next step for 64-128 heads per rank.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kHeads = 16;
constexpr int kRows = 32;  // a tile; equal to the warp size (softmax: a row per lane)
constexpr int kMaxPairs = 9;
constexpr int kMaxDk = 64 * kMaxPairs;  // 576 = DeepSeek's 512 + 64
constexpr int kMaxLatent = 4 * (kThreads / 2);
constexpr int kCopyThreadsPerRow = kThreads / kRows;
// Split-KV chunks are never shorter than this many tokens (per-chunk start-up cost).
constexpr int64_t kMinChunkTokens = 256;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
static_assert(kWarps == 8 && kHeads == 16 && kRows == 32, "the warp roles assume these");

struct MlaArgs {
  const float* q;
  const int32_t* q_seq;
  const int32_t* q_pos;
  const void* kv;
  int64_t block_elems;  // elements per pool block
  int64_t layer_off;    // element offset of (layer, token 0) within a block
  const int32_t* tables;
  const int32_t* first_pos;
  const int32_t* kv_lens;
  int64_t max_blocks;
  int64_t rows;  // num_q_tokens * num_heads
  int tpb, num_heads, head_groups;
  int dk;      // latent + rope
  int dkp;     // dk rounded up to a multiple of 64 (two elements per lane): the smem row
  int latent;  // <= kMaxLatent
  int blocks_per_chunk;
  int parts;  // chunks per sequence; > 1 writes the workspace
  int stages;
  int vec16;  // rows are 16-byte aligned: cp.async; else element copies
  float scale;
  float* out;
  float* lse;
  float* ws_o;    // [parts][rows][latent] when parts > 1
  float* ws_lse;  // [parts][rows]
};

int64_t HeadGroups(const MlaAttentionParams& p) { return (p.num_heads + kHeads - 1) / kHeads; }

// Two consecutive elements (the first at an even index) as floats.
template <typename T>
__device__ inline float2 LoadPair(const T* p);
template <>
__device__ inline float2 LoadPair<float>(const float* p) {
  return *reinterpret_cast<const float2*>(p);
}
template <>
__device__ inline float2 LoadPair<__nv_bfloat16>(const __nv_bfloat16* p) {
  const uint32_t w = *reinterpret_cast<const uint32_t*>(p);
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}
template <>
__device__ inline float2 LoadPair<__half>(const __half* p) {
  const uint32_t w = *reinterpret_cast<const uint32_t*>(p);
  __half_raw lo, hi;
  lo.x = static_cast<unsigned short>(w & 0xffffu);
  hi.x = static_cast<unsigned short>(w >> 16);
  return make_float2(__half2float(__half(lo)), __half2float(__half(hi)));
}

// Four consecutive elements (the first at a multiple of 4) as floats.
template <typename T>
__device__ inline void LoadQuad(const T* p, float* f) {
  if constexpr (sizeof(T) == 4) {
    const float4 x = *reinterpret_cast<const float4*>(p);
    f[0] = x.x;
    f[1] = x.y;
    f[2] = x.z;
    f[3] = x.w;
  } else {
    const float2 a = LoadPair<T>(p);
    const float2 b = LoadPair<T>(p + 2);
    f[0] = a.x;
    f[1] = a.y;
    f[2] = b.x;
    f[3] = b.y;
  }
}

size_t SmemBytes(int stages, int dkp, size_t elem) {
  return static_cast<size_t>(stages) * kRows * dkp * elem +
         (2 * kRows * kHeads + 2 * kHeads) * sizeof(float) + stages * kRows * sizeof(int);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) MlaAttentionKernel(const MlaArgs a) {
  HELIX_DYNAMIC_SMEM(smem);
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int dkp = a.dkp;
  T* ring = reinterpret_cast<T*>(smem);  // [stages][kRows][dkp]
  float* s_s = reinterpret_cast<float*>(smem + static_cast<size_t>(a.stages) * kRows * dkp *
                                                   sizeof(T));  // [kRows][kHeads] scores
  float* s_p = s_s + kRows * kHeads;                            // [kRows][kHeads] probabilities
  float* s_alpha = s_p + kRows * kHeads;                        // [kHeads]
  float* s_l = s_alpha + kHeads;                                // [kHeads]
  int* s_vis = reinterpret_cast<int*>(s_l + kHeads);            // [stages][kRows]

  // The item: query token t, heads [h0, h0 + G), local tokens [tok_begin, tok_end).
  const int hg = static_cast<int>(blockIdx.x % static_cast<unsigned>(a.head_groups));
  const int t = static_cast<int>(blockIdx.x / static_cast<unsigned>(a.head_groups));
  const int c = static_cast<int>(blockIdx.y);
  const int h0 = hg * kHeads;
  const int G = a.num_heads - h0 < kHeads ? a.num_heads - h0 : kHeads;
  const int seq = a.q_seq[t];
  const int64_t pos = a.q_pos[t];
  const int64_t kv_len = a.kv_lens[seq];
  const int32_t* table = a.tables + seq * a.max_blocks;
  const int32_t* first = a.first_pos + seq * a.max_blocks;
  const int64_t chunk_tokens = static_cast<int64_t>(a.blocks_per_chunk) * a.tpb;
  const int64_t tok_begin = static_cast<int64_t>(c) * chunk_tokens;
  const int64_t tok_end = kv_len < tok_begin + chunk_tokens ? kv_len : tok_begin + chunk_tokens;
  const int n_tok = tok_end > tok_begin ? static_cast<int>(tok_end - tok_begin) : 0;
  const int n_tiles = (n_tok + kRows - 1) / kRows;
  const T* kv = static_cast<const T*>(a.kv);

  // Padding columns [dk, dkp) of every stage: the copies never write them and the score step
  // multiplies them by q = 0, so they must hold finite values.
  const int pad = dkp - a.dk;
  for (int i = tid; i < a.stages * kRows * pad; i += kThreads) {
    ring[(i / pad) * dkp + a.dk + i % pad] = FromFloat<T>(0.0f);
  }

  const int copy_row = tid / kCopyThreadsPerRow;
  const int copy_sub = tid % kCopyThreadsPerRow;
  // Tile `tile` into ring slot `stage`: rows past the chunk or not visible to the query
  // (causal cut on the global position) are zero-filled and flagged invisible.
  auto issue = [&](int tile, int stage) {
    const int64_t i = tok_begin + static_cast<int64_t>(tile) * kRows + copy_row;
    int64_t off = -1;
    if (i < tok_end) {
      const int64_t j = i / a.tpb;
      const int64_t tb = i - j * a.tpb;
      if (static_cast<int64_t>(first[j]) + tb <= pos) {
        off = static_cast<int64_t>(table[j]) * a.block_elems + a.layer_off + tb * a.dk;
      }
    }
    if (copy_sub == 0) {
      s_vis[stage * kRows + copy_row] = off >= 0 ? 1 : 0;
    }
    T* dst = ring + (static_cast<size_t>(stage) * kRows + copy_row) * dkp;
    if (a.vec16) {
      constexpr int kVec = 16 / static_cast<int>(sizeof(T));
      const int chunks = a.dk / kVec;
      for (int ch = copy_sub; ch < chunks; ch += kCopyThreadsPerRow) {
        CpAsync16(dst + ch * kVec, off >= 0 ? kv + off + ch * kVec : kv, off >= 0);
      }
    } else {
      for (int e = copy_sub; e < a.dk; e += kCopyThreadsPerRow) {
        dst[e] = off >= 0 ? kv[off + e] : FromFloat<T>(0.0f);
      }
    }
  };

  // Score step: this lane's slice of q for its 4 heads, pre-scaled into log2 units.
  const int hq = warp & 3;
  const int rh = warp >> 2;
  const int npairs = dkp / 64;
  const float qscale = a.scale * kLog2e;
  float q[4][2 * kMaxPairs];
#pragma unroll
  for (int h = 0; h < 4; ++h) {
    const int head = 4 * hq + h;
    const float* src = a.q + (static_cast<int64_t>(t) * a.num_heads + h0 + head) * a.dk;
#pragma unroll
    for (int i = 0; i < 2 * kMaxPairs; ++i) {
      const int e = lane * 2 * npairs + i;
      q[h][i] = i < 2 * npairs && head < G && e < a.dk ? src[e] * qscale : 0.0f;
    }
  }
  // Value step: heads 8 head_half .. + 7, latent dims 4 q4 .. + 3.
  const int head_half = tid >> 7;
  const int q4 = tid & 127;
  const bool has_dims = 4 * q4 < a.latent;
  float acc[8][4];
#pragma unroll
  for (int h = 0; h < 8; ++h) {
#pragma unroll
    for (int d = 0; d < 4; ++d) {
      acc[h][d] = 0.0f;
    }
  }
  // Softmax state of heads 2 warp + j, the same in every lane of the warp.
  float m_run[2] = {kNegInf, kNegInf};
  float l_run[2] = {0.0f, 0.0f};

  for (int s = 0; s < a.stages - 1; ++s) {
    if (s < n_tiles) {
      issue(s, s);
    }
    CpAsyncCommit();
  }
  int stage = 0;
  for (int k = 0; k < n_tiles; ++k) {
    if (a.stages == 3) {  // tile k's group is complete once stages - 2 are left in flight
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncthreads();  // tile k is visible to all; every thread is done with tile k - 1's slot
    const int nk = k + a.stages - 1;
    if (nk < n_tiles) {
      issue(nk, nk % a.stages);
    }
    CpAsyncCommit();
    const int rows_here = n_tok - k * kRows < kRows ? n_tok - k * kRows : kRows;
    const T* tile = ring + static_cast<size_t>(stage) * kRows * dkp;

    for (int b = 0; b < 2; ++b) {
      const int r0 = rh * 16 + b * 8;
      if (r0 >= rows_here) {
        break;  // uniform in the warp
      }
      float v[32];
#pragma unroll
      for (int r = 0; r < 8; ++r) {
        const T* row = tile + static_cast<size_t>(r0 + r) * dkp + lane * 2 * npairs;
        float s4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int i = 0; i < kMaxPairs; ++i) {
          if (i < npairs) {
            const float2 k2 = LoadPair<T>(row + 2 * i);
#pragma unroll
            for (int h = 0; h < 4; ++h) {
              s4[h] = fmaf(q[h][2 * i], k2.x, s4[h]);
              s4[h] = fmaf(q[h][2 * i + 1], k2.y, s4[h]);
            }
          }
        }
#pragma unroll
        for (int h = 0; h < 4; ++h) {
          v[r * 4 + h] = s4[h];
        }
      }
      ReduceScatterN<32, 32, 32>(v, lane);
      const int idx = ScatterBase<32, 32>(lane);
      s_s[(r0 + idx / 4) * kHeads + 4 * hq + idx % 4] = v[0];
    }
    __syncthreads();

    {
      const bool vis = s_vis[stage * kRows + lane] != 0;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int h = 2 * warp + j;
        const float x = vis ? s_s[lane * kHeads + h] : kNegInf;
        const float m_new = fmaxf(m_run[j], WarpMax(x));
        const float pr = x == kNegInf ? 0.0f : exp2f(x - m_new);
        const float alpha = m_run[j] == kNegInf ? 0.0f : exp2f(m_run[j] - m_new);
        l_run[j] = l_run[j] * alpha + WarpSum(pr);
        m_run[j] = m_new;
        s_p[lane * kHeads + h] = pr;
        if (lane == 0) {
          s_alpha[h] = alpha;
        }
      }
    }
    __syncthreads();

    if (has_dims) {
      const float4 a0 = *reinterpret_cast<const float4*>(s_alpha + 8 * head_half);
      const float4 a1 = *reinterpret_cast<const float4*>(s_alpha + 8 * head_half + 4);
      const float al[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
#pragma unroll
      for (int h = 0; h < 8; ++h) {
#pragma unroll
        for (int d = 0; d < 4; ++d) {
          acc[h][d] *= al[h];
        }
      }
      for (int r = 0; r < rows_here; ++r) {
        float vv[4];
        LoadQuad<T>(tile + static_cast<size_t>(r) * dkp + 4 * q4, vv);
        const float4 p0 = *reinterpret_cast<const float4*>(s_p + r * kHeads + 8 * head_half);
        const float4 p1 = *reinterpret_cast<const float4*>(s_p + r * kHeads + 8 * head_half + 4);
        const float pr[8] = {p0.x, p0.y, p0.z, p0.w, p1.x, p1.y, p1.z, p1.w};
#pragma unroll
        for (int h = 0; h < 8; ++h) {
#pragma unroll
          for (int d = 0; d < 4; ++d) {
            acc[h][d] = fmaf(pr[h], vv[d], acc[h][d]);
          }
        }
      }
    }
    stage = stage + 1 == a.stages ? 0 : stage + 1;
  }
  CpAsyncWait<0>();

  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int h = 2 * warp + j;
      s_l[h] = l_run[j];
      if (h < G) {
        const int64_t row = static_cast<int64_t>(t) * a.num_heads + h0 + h;
        // l_run: 0 when nothing was visible, NaN after a NaN score (the row and LSE NaN too).
        const float v = l_run[j] != 0.0f ? __fmul_rn(m_run[j], kLn2) + logf(l_run[j]) : kNegInf;
        if (a.parts > 1) {
          a.ws_lse[static_cast<int64_t>(c) * a.rows + row] = v;
        } else if (a.lse != nullptr) {
          a.lse[row] = v;
        }
      }
    }
  }
  __syncthreads();
  if (has_dims) {
#pragma unroll
    for (int h = 0; h < 8; ++h) {
      const int head = 8 * head_half + h;
      if (head < G) {
        const float l = s_l[head];
        const float inv = l != 0.0f ? 1.0f / l : 0.0f;
        const int64_t row = static_cast<int64_t>(t) * a.num_heads + h0 + head;
        float* dst = a.parts > 1 ? a.ws_o + (static_cast<int64_t>(c) * a.rows + row) * a.latent
                                 : a.out + row * a.latent;
#pragma unroll
        for (int d = 0; d < 4; ++d) {
          if (4 * q4 + d < a.latent) {
            dst[4 * q4 + d] = acc[h][d] * inv;
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

using KernelFn = void (*)(MlaArgs);

struct Choice {
  KernelFn fn;
  size_t smem;
  int stages;
  size_t elem;
};

int PaddedDk(const MlaAttentionParams& p) {
  return static_cast<int>((p.latent_dim + p.rope_dim + 63) / 64 * 64);
}

// Three ring slots of 16-bit rows (36 KiB each at dk 576), two of f32 rows.
Choice ChooseKernel(DType t, int dkp) {
  switch (t) {
    case DType::kF32:
      return {&MlaAttentionKernel<float>, SmemBytes(2, dkp, 4), 2, 4};
    case DType::kF16:
      return {&MlaAttentionKernel<__half>, SmemBytes(3, dkp, 2), 3, 2};
    case DType::kBF16:
      return {&MlaAttentionKernel<__nv_bfloat16>, SmemBytes(3, dkp, 2), 3, 2};
  }
  return {nullptr, 0, 0, 0};
}

// Above 48 KiB of dynamic shared memory needs an opt-in per kernel and device; done once per
// (device, kernel) with the largest size it can ask for, so that later calls (e.g. while a
// stream is captured into a CUDA graph) make no runtime call besides the launch.
cudaError_t PrepareKernel(const Choice& ch) {
#ifdef HELIX_CUDA_EMULATION
  return cudaSuccess;
#endif
  size_t max_smem = SmemBytes(ch.stages, kMaxDk, ch.elem);
  if (ch.smem <= 48 * 1024) {
    return cudaSuccess;
  }
  int device = 0;
  HELIX_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  // GPUs with a smaller opt-in limit (about 99 KiB on sm_86/89) get what they allow; a shape
  // that needs more then fails at launch with a clear error instead of every shape failing here.
  int optin = 0;
  HELIX_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  max_smem = std::min(max_smem, static_cast<size_t>(optin));
  static std::mutex mu;
  static std::vector<std::pair<int, KernelFn>> done;
  std::lock_guard<std::mutex> lock(mu);
  if (std::find(done.begin(), done.end(), std::make_pair(device, ch.fn)) != done.end()) {
    return cudaSuccess;
  }
  HELIX_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(reinterpret_cast<const void*>(ch.fn),
                                                  cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                  static_cast<int>(max_smem)));
  done.emplace_back(device, ch.fn);
  return cudaSuccess;
}

bool ShapeSupported(const MlaAttentionParams& p) {
  return p.kv.num_planes == 1 && p.kv.num_kv_heads == 1 &&
         p.kv.head_dim == p.latent_dim + p.rope_dim && p.latent_dim > 0 &&
         p.latent_dim <= kMaxLatent && p.rope_dim >= 0 && p.latent_dim + p.rope_dim <= kMaxDk;
}

}  // namespace

int64_t MlaAttentionCudaSplitTokens(const MlaAttentionParams& p) {
  const int64_t tpb = p.kv.tokens_per_block;
  if (p.num_q_tokens <= 0 || p.num_heads <= 0 || tpb <= 0 || p.max_blocks_per_seq <= 0 ||
      !ShapeSupported(p)) {
    return 0;
  }
  int device = 0;
  int sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();  // not left for the next launch check to report
    return 0;
  }
  const Choice ch = ChooseKernel(p.kv.dtype, PaddedDk(p));
  const int per_sm = CachedBlocksPerSm(device, reinterpret_cast<const void*>(ch.fn), kThreads,
                                       ch.smem, [&] { return PrepareKernel(ch); });
  return SplitTokensForOneWave(static_cast<int64_t>(sms) * std::max(1, per_sm),
                               p.num_q_tokens * HeadGroups(p), p.max_blocks_per_seq, tpb,
                               kMinChunkTokens);
}

size_t MlaAttentionCudaWorkspaceBytes(const MlaAttentionParams& p) {
  const int64_t parts = SplitKvParts(p);
  if (parts <= 1) {
    return 0;
  }
  const int64_t rows = p.num_q_tokens * p.num_heads;
  return static_cast<size_t>(parts * rows * (p.latent_dim + 1)) * sizeof(float);
}

cudaError_t MlaAttentionCuda(const MlaAttentionParams& p, void* workspace, cudaStream_t stream) {
  if (p.num_q_tokens <= 0 || p.num_heads <= 0) {
    return cudaSuccess;
  }
  if (!ShapeSupported(p) || p.kv.tokens_per_block <= 0) {
    return cudaErrorInvalidValue;
  }
  const int64_t parts = SplitKvParts(p);
  const int64_t head_groups = HeadGroups(p);
  // Grid limits: parts (use a larger kv_split_tokens), and tokens x heads, which bounds the
  // kernel's tokens x head groups and the merge's rows.
  if (parts > 65535 || p.num_q_tokens > kMaxGridX / p.num_heads) {
    return cudaErrorInvalidValue;
  }
  const int64_t rows = p.num_q_tokens * p.num_heads;
  const int dkp = PaddedDk(p);
  const Choice ch = ChooseKernel(p.kv.dtype, dkp);
  MlaArgs a;
  a.q = p.q;
  a.q_seq = p.q_seq;
  a.q_pos = p.q_pos;
  a.kv = p.kv.base;
  a.block_elems = p.kv.block_elems();
  a.layer_off = KvOffset(p.kv, 0, p.layer, 0, 0, 0);
  a.tables = p.block_tables;
  a.first_pos = p.block_first_pos;
  a.kv_lens = p.kv_lens;
  a.max_blocks = p.max_blocks_per_seq;
  a.rows = rows;
  a.tpb = static_cast<int>(p.kv.tokens_per_block);
  a.num_heads = static_cast<int>(p.num_heads);
  a.head_groups = static_cast<int>(head_groups);
  a.dk = static_cast<int>(p.latent_dim + p.rope_dim);
  a.dkp = dkp;
  a.latent = static_cast<int>(p.latent_dim);
  a.blocks_per_chunk = static_cast<int>(parts > 1 ? SplitKvBlocksPerChunk(p)
                                                  : std::max<int64_t>(1, p.max_blocks_per_seq));
  a.parts = static_cast<int>(parts);
  a.stages = ch.stages;
  // Every row starts dk elements after the previous one (blocks and layers are whole rows).
  a.vec16 = (static_cast<size_t>(a.dk) * ch.elem) % 16 == 0 &&
            reinterpret_cast<uintptr_t>(p.kv.base) % 16 == 0;
  a.scale = p.scale;
  a.out = p.out;
  a.lse = p.lse;
  a.ws_o = parts > 1 ? static_cast<float*>(workspace) : nullptr;
  a.ws_lse = parts > 1 ? a.ws_o + parts * rows * p.latent_dim : nullptr;

  HELIX_CUDA_RETURN_IF_ERROR(PrepareKernel(ch));
  const dim3 grid(static_cast<unsigned>(p.num_q_tokens * head_groups),
                  static_cast<unsigned>(parts));
  HELIX_LAUNCH(ch.fn, grid, kThreads, ch.smem, stream, a);
  HELIX_CUDA_CHECK_LAUNCH(stream);
  if (parts > 1) {
    return MergeStatesCuda({.o = a.ws_o,
                            .lse = a.ws_lse,
                            .out = p.out,
                            .out_lse = p.lse,
                            .num_parts = parts,
                            .rows = rows,
                            .head_dim = p.latent_dim},
                           stream);
  }
  return cudaSuccess;
}

}  // namespace helix::kernels::cuda
