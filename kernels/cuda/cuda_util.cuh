// Helpers shared by the kernels/cuda .cu files: element conversion, warp reductions (and the
// reduce-scatter), cp.async wrappers, and the host-side split-KV sizing for one wave.
// Header-only, internal to kernels/cuda.
#ifndef HELIX_KERNELS_CUDA_CUDA_UTIL_CUH_
#define HELIX_KERNELS_CUDA_CUDA_UTIL_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <type_traits>
#include <vector>

#include "kernels/attention.h"
#include "kernels/dtype.h"

namespace helix::kernels::cuda {

constexpr float kNegInf = -__builtin_huge_valf();
// The largest gridDim.x a launch takes (2^31 - 1). Launchers whose grid grows with a shape (rows,
// tokens, outputs) refuse larger shapes with cudaErrorInvalidValue: casting to unsigned would
// wrap above 2^32 into a smaller grid and silently wrong output.
constexpr int64_t kMaxGridX = 0x7fffffff;

__device__ inline float ToFloat(float x) { return x; }
__device__ inline float ToFloat(__half x) { return __half2float(x); }
__device__ inline float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }

// fp32 -> storage type, round to nearest even (NaN stays NaN, overflow gives inf).
template <typename T>
__device__ inline T FromFloat(float x);
template <>
__device__ inline float FromFloat<float>(float x) {
  return x;
}
template <>
__device__ inline __half FromFloat<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ inline __nv_bfloat16 FromFloat<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// KvOffset (kernels/attention.h) on the device: element offset from v.base of dim 0 of (block,
// layer, plane c, kv head, token within the block).
__device__ inline int64_t DevKvOffset(const KvPoolView& v, int64_t block, int64_t layer, int c,
                                      int64_t head, int64_t token) {
  const int64_t block_elems =
      v.num_layers * v.num_planes * v.num_kv_heads * v.tokens_per_block * v.head_dim;
  return block * block_elems +
         (((layer * v.num_planes + c) * v.num_kv_heads + head) * v.tokens_per_block + token) *
             v.head_dim;
}

// RoPE (RopeCpu's numerics): the cosine and sine of `position` times pair i's frequency
// theta^(-2i / rotary_dim), in double, rounded to float.
__device__ inline void RopeCosSin(float theta, int64_t rotary_dim, int64_t i, int64_t position,
                                  float* c, float* s) {
  const double inv_freq = pow(static_cast<double>(theta),
                              -2.0 * static_cast<double>(i) / static_cast<double>(rotary_dim));
  double sd, cd;
  sincos(static_cast<double>(position) * inv_freq, &sd, &cd);
  *c = static_cast<float>(cd);
  *s = static_cast<float>(sd);
}

// The rotated first (a' = a c - b s) or second (b' = a s + b c) element of the pair (a, b),
// rounded at each step the same way wherever it is computed.
__device__ inline float RopeRotate(float a, float b, float c, float s, bool second) {
  return second ? __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c))
                : __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
}

// Called by every kernel launched with HELIX_LAUNCH_PDL (cuda_check.h), first or after reading
// only memory the kernel just before it does not write (weights; the step's metadata, such as
// RoPE's positions and slots, uploaded before the step's first kernel; decode attention's
// settled KV rows: PagedAttentionParams::kv_settled_below_q): waits until the kernels before it in
// the stream have finished and their writes are visible, then lets the next kernel in the stream be
// launched (it waits the same way). No-ops in an ordinary launch, and compiled out before sm_90.
// (When a kernel starts, every kernel before the one just before it has ended: that one passed
// its own PdlEnter, which waits for them, before this kernel could start.)
__device__ inline void PdlEnter() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#elif defined(HELIX_CUDA_EMULATION)
  ::helix_emu::PdlWait();  // tests/gpu/cuda_emu.h: the tests' stand-in for the kernel before
#endif
}

// base[i] = v rounded to `dtype` (kF16 or kBF16, to nearest even): the optional 16-bit copy of
// an op's output for the GEMM that reads it (RmsNormParams::out_lowp).
__device__ inline void StoreLowpAt(void* base, DType dtype, int64_t i, float v) {
  if (dtype == DType::kF16) {
    static_cast<__half*>(base)[i] = FromFloat<__half>(v);
  } else {
    static_cast<__nv_bfloat16*>(base)[i] = FromFloat<__nv_bfloat16>(v);
  }
}

// SiLU(g) * u as SiluMulParams computes it (one expression, so the fused GEMV epilogue and the
// element-wise kernel agree bit for bit).
__device__ inline float SiluMulValue(float g, float u) { return g * u / (1.0f + expf(-g)); }

// Threads of RmsNormKernel's blocks, and of the GEMV's that fold a norm in: the two must be equal
// for the folded norm to sum its squares in the same order (gemv_cuda.cu asserts it).
constexpr int kNormBlockThreads = 256;

// The sum (is_max: the maximum) of v over the thread block, every thread getting the result:
// warp shuffles, then the warps' values in order from smem32 (32 slots). Same order on every
// call, so two kernels reducing the same per-thread values get the same bits.
template <typename T>
__device__ inline T BlockReduce(T v, T* smem32, bool is_max) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) {
    const T other = __shfl_xor_sync(0xffffffffu, v, o);
    v = is_max ? (other > v ? other : v) : v + other;
  }
  __syncthreads();  // smem32 may still be read by a previous reduction
  if (lane == 0) {
    smem32[warp] = v;
  }
  __syncthreads();
  T r = smem32[0];
  for (int w = 1; w < warps; ++w) {
    r = is_max ? (smem32[w] > r ? smem32[w] : r) : r + smem32[w];
  }
  return r;
}

// The 16 bytes of `raw` as 16 / sizeof(T) floats (little-endian element order).
template <typename T>
__device__ inline void ChunkToFloats(const uint4& raw, float* f);
template <>
__device__ inline void ChunkToFloats<float>(const uint4& raw, float* f) {
  f[0] = __uint_as_float(raw.x);
  f[1] = __uint_as_float(raw.y);
  f[2] = __uint_as_float(raw.z);
  f[3] = __uint_as_float(raw.w);
}
template <>
__device__ inline void ChunkToFloats<__half>(const uint4& raw, float* f) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half_raw lo, hi;
    lo.x = static_cast<unsigned short>(w[i] & 0xffffu);
    hi.x = static_cast<unsigned short>(w[i] >> 16);
    f[2 * i] = __half2float(__half(lo));
    f[2 * i + 1] = __half2float(__half(hi));
  }
}
template <>
__device__ inline void ChunkToFloats<__nv_bfloat16>(const uint4& raw, float* f) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

// Host: thread blocks of kernel `fn` per SM at (threads, smem) on `device`, asked once per
// (device, kernel, threads, smem): every layer of every eager step asks for its split.
// `prepare()` (the kernel's shared-memory opt-in) runs before the first ask. 1 when it cannot be
// asked (the error is cleared, not left for the next launch check). One cache per call site.
template <typename Prepare>
int CachedBlocksPerSm(int device, const void* fn, int threads, size_t smem, Prepare&& prepare) {
  struct Known {
    int device;
    const void* fn;
    int threads;
    size_t smem;
    int per_sm;
  };
  static std::mutex mu;
  static std::vector<Known> known;
  std::lock_guard<std::mutex> lock(mu);
  for (const Known& k : known) {
    if (k.device == device && k.fn == fn && k.threads == threads && k.smem == smem) {
      return k.per_sm;
    }
  }
  int per_sm = 1;
  if (prepare() != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, threads, smem) != cudaSuccess) {
    cudaGetLastError();
    return 1;
  }
  known.push_back({device, fn, threads, smem, per_sm});
  return per_sm;
}

// Host: the kv_split_tokens that cuts every sequence into enough chunks for `items` thread
// blocks per chunk (query tokens x head units) to fill `slots` resident blocks in one wave,
// with chunks of at least min_chunk_tokens; 0 (no split) when the batch alone fills the wave
// or one chunk would hold the longest sequence.
inline int64_t SplitTokensForOneWave(int64_t slots, int64_t items, int64_t max_blocks,
                                     int64_t tokens_per_block, int64_t min_chunk_tokens) {
  const int64_t want = slots / items;  // chunks per sequence that fill one wave
  if (want <= 1) {
    return 0;
  }
  const int64_t min_blocks =
      std::max<int64_t>(1, (min_chunk_tokens + tokens_per_block - 1) / tokens_per_block);
  const int64_t bpc = std::max(min_blocks, (max_blocks + want - 1) / want);
  if (bpc >= max_blocks) {
    return 0;
  }
  return bpc * tokens_per_block;
}

// Two 16-bit values as one 32-bit register of an mma fragment: `lo` in the low half (the element
// of the lower column / k index), `hi` in the high half.
template <typename T>
__device__ inline uint32_t PackPair(T lo, T hi) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>);
  using Raw = std::conditional_t<std::is_same_v<T, __half>, __half_raw, __nv_bfloat16_raw>;
  const Raw l = lo;
  const Raw h = hi;
  return static_cast<uint32_t>(l.x) | (static_cast<uint32_t>(h.x) << 16);
}

__device__ inline float WarpMax(float x) {
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  }
  return x;
}

__device__ inline float WarpSum(float x) {
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) {
    x += __shfl_xor_sync(0xffffffffu, x, o);
  }
  return x;
}

// Sums the N values v[] of each lane over aligned groups of L lanes, leaving the totals
// scattered: by halving exchanges (N - 1 shuffles when N <= L) while values remain, then a
// plain tree. Afterwards lane l holds max(1, N / L) consecutive totals starting at index
// ScatterBase<N, L>(l) in v[0...]; when N < L, L / N lanes hold each (replicas differ in their
// low bits).
template <int N, int L, int M>
__device__ inline void ReduceScatterN(float (&v)[M], int lane) {
  if constexpr (L > 1) {
    constexpr int off = L / 2;
    if constexpr (N > 1) {
      constexpr int half = N / 2;
      const bool up = (lane & off) != 0;
#pragma unroll
      for (int i = 0; i < half; ++i) {
        const float send = up ? v[i] : v[i + half];
        const float keep = up ? v[i + half] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, off);
      }
      ReduceScatterN<half, off, M>(v, lane);
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], off);
      ReduceScatterN<1, off, M>(v, lane);
    }
  }
}

template <int N, int L>
__device__ inline int ScatterBase(int lane) {
  if constexpr (L > 1 && N > 1) {
    return ((lane & (L / 2)) != 0 ? N / 2 : 0) + ScatterBase<N / 2, L / 2>(lane);
  } else {
    return 0;
  }
}

#ifndef HELIX_CUDA_EMULATION

// 16-byte global -> shared copy that bypasses L1; with valid == false nothing is read and the
// destination is zero-filled.
__device__ inline void CpAsync16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(src_size)
               : "memory");
}

// Asks the L2 to fetch [gmem, gmem + bytes) (sm_90 bulk prefetch; a hint, nothing waits).
// REQUIRES: gmem 16-byte aligned, bytes a multiple of 16.
__device__ inline void BulkPrefetchL2(const void* gmem, unsigned bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(gmem), "r"(bytes) : "memory");
#endif
}

// Bulk copies (sm_90 TMA, one dimension) completing on an mbarrier in shared memory. The
// barrier is initialised once with the number of arrivals per phase (MbarInit, then
// FenceMbarInit before the async proxy may use it); each phase, one thread announces the
// bytes to expect and arrives (MbarArriveExpectTx), then issues the copies (BulkCopyG2S);
// waiters spin on the phase's parity (MbarWait). Before an async copy overwrites shared
// memory that threads have read or written, FenceProxyAsync orders those accesses first.
// Compiled out below sm_90: callers select them only on such devices.
__device__ inline unsigned SmemAddr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ inline void MbarInit(uint64_t* bar, unsigned arrivals) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(SmemAddr(bar)), "r"(arrivals)
               : "memory");
#elif defined(__CUDA_ARCH__)
  __trap();  // selected only on sm_90+ devices with code built for them
#endif
}
__device__ inline void FenceMbarInit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
__device__ inline void FenceProxyAsync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
__device__ inline void MbarArriveExpectTx(uint64_t* bar, unsigned bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(SmemAddr(bar)),
               "r"(bytes)
               : "memory");
#elif defined(__CUDA_ARCH__)
  __trap();  // selected only on sm_90+ devices with code built for them
#endif
}
// REQUIRES: smem and gmem 16-byte aligned, bytes a multiple of 16.
__device__ inline void BulkCopyG2S(void* smem, const void* gmem, unsigned bytes, uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::
          "r"(SmemAddr(smem)),
      "l"(gmem), "r"(bytes), "r"(SmemAddr(bar))
      : "memory");
#elif defined(__CUDA_ARCH__)
  __trap();  // selected only on sm_90+ devices with code built for them
#endif
}
__device__ inline void MbarWait(uint64_t* bar, unsigned parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(SmemAddr(bar)),
      "r"(parity)
      : "memory");
#elif defined(__CUDA_ARCH__)
  __trap();  // selected only on sm_90+ devices with code built for them
#endif
}

// Warp-collective tensor-core pieces (every lane of the warp calls them together). LdMatrixX4:
// four 8x8 matrices of 16-bit elements from shared memory; lanes 8i..8i+7 give the addresses of
// matrix i's rows 0..7 (16 bytes each, 16-byte aligned), and lane l gets in r[i] row l / 4,
// columns 2 (l % 4) and 2 (l % 4) + 1 of matrix i (kTrans: of its transpose, i.e. rows 2 (l % 4)
// and 2 (l % 4) + 1 of column l / 4). sm_75+.
template <bool kTrans>
__device__ inline void LdMatrixX4(uint32_t (&r)[4], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(SmemAddr(row))
                 : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(SmemAddr(row))
                 : "memory");
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // selected only on sm_80+ devices with code built for them
#endif
}

// c += A B on the tensor cores, fp32 accumulation, A 16 x K row-major and B K x 8 column-major in
// T (half or bf16). Lane l, with g = l / 4 and t = l % 4, holds: c = C[g][2t, 2t+1],
// C[g+8][2t, 2t+1]. K = 16: a = A[g][2t..], A[g+8][2t..], A[g][2t+8..], A[g+8][2t+8..] (pairs);
// b = B[2t..][g], B[2t+8..][g]. K = 8: a = A[g][2t..], A[g+8][2t..]; b = B[2t..][g]. sm_80+.
template <typename T>
__device__ inline void MmaK16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // selected only on sm_80+ devices with code built for them
#endif
}
template <typename T>
__device__ inline void MmaK8(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(b));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(b));
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // selected only on sm_80+ devices with code built for them
#endif
}

__device__ inline void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ inline void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Dynamic shared memory of a kernel, and a statically sized shared variable of type T.
#define HELIX_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define HELIX_STATIC_SMEM(T, name) __shared__ T name

#endif  // HELIX_CUDA_EMULATION (tests/gpu/cuda_emu.h defines these for the CPU emulation)

}  // namespace helix::kernels::cuda

#endif  // HELIX_KERNELS_CUDA_CUDA_UTIL_CUH_
