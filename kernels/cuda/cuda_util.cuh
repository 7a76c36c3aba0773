// Device helpers shared by the kernels/cuda .cu files: element conversion, warp reductions
// and cp.async wrappers. Header-only, internal to kernels/cuda.
#ifndef HELIX_KERNELS_CUDA_CUDA_UTIL_CUH_
#define HELIX_KERNELS_CUDA_CUDA_UTIL_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace helix::kernels::cuda {

constexpr float kNegInf = -__builtin_huge_valf();

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
