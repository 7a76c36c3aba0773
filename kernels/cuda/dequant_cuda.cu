#include "kernels/cuda/dequant_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_util.cuh"

namespace helix::kernels::cuda {
namespace {

// ggml type numbers (engine/model/gguf/ggml_type.h) and their block geometry.
enum : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ8_0 = 8,
  kQ4_K = 12,
  kQ6_K = 14,
  kBF16 = 30,
};

struct Geometry {
  int64_t block_size, block_bytes;
};

bool GetGeometry(uint32_t t, Geometry* g) {
  switch (t) {
    case kF32:
      *g = {1, 4};
      return true;
    case kF16:
    case kBF16:
      *g = {1, 2};
      return true;
    case kQ8_0:
      *g = {32, 34};
      return true;
    case kQ4_0:
      *g = {32, 18};
      return true;
    case kQ4_1:
      *g = {32, 20};
      return true;
    case kQ4_K:
      *g = {256, 144};
      return true;
    case kQ6_K:
      *g = {256, 210};
      return true;
    default:
      return false;
  }
}

__device__ inline float HalfAt(const uint8_t* p) {
  __half_raw h;
  h.x = static_cast<unsigned short>(p[0] | (p[1] << 8));
  return __half2float(__half(h));
}

// Element j of the block at b; products and sums rounded one at a time, as gguf-py does.
__device__ inline float DequantElem(uint32_t type, const uint8_t* b, int j) {
  switch (type) {
    case kF32: {
      const uint32_t u = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<uint32_t>(b[3]) << 24);
      return __uint_as_float(u);
    }
    case kF16:
      return HalfAt(b);
    case kBF16:
      return __uint_as_float(static_cast<uint32_t>(b[0] | (b[1] << 8)) << 16);
    case kQ8_0: {
      const float d = HalfAt(b);
      return __fmul_rn(static_cast<float>(static_cast<int8_t>(b[2 + j])), d);
    }
    case kQ4_0: {
      const float d = HalfAt(b);
      const uint8_t q = b[2 + (j & 15)];
      const int v = (j < 16 ? (q & 0x0f) : (q >> 4)) - 8;
      return __fmul_rn(d, static_cast<float>(v));
    }
    case kQ4_1: {
      const float d = HalfAt(b);
      const float m = HalfAt(b + 2);
      const uint8_t q = b[4 + (j & 15)];
      const int v = j < 16 ? (q & 0x0f) : (q >> 4);
      return __fadd_rn(__fmul_rn(d, static_cast<float>(v)), m);
    }
    case kQ4_K: {
      const float d = HalfAt(b);
      const float dmin = HalfAt(b + 2);
      const uint8_t* s = b + 4;
      const int sb = j / 32;
      const int l = j % 32;
      int sc, mn;
      if (sb < 4) {
        sc = s[sb] & 63;
        mn = s[sb + 4] & 63;
      } else {
        sc = (s[sb + 4] & 0x0f) | ((s[sb - 4] >> 6) << 4);
        mn = (s[sb + 4] >> 4) | ((s[sb] >> 6) << 4);
      }
      const float scale = __fmul_rn(d, static_cast<float>(sc));
      const float offset = __fmul_rn(dmin, static_cast<float>(mn));
      const uint8_t q = b[16 + 32 * (sb / 2) + l];
      const int v = (q >> ((sb % 2) * 4)) & 0x0f;
      return __fsub_rn(__fmul_rn(scale, static_cast<float>(v)), offset);
    }
    case kQ6_K: {
      const int h = j / 128;
      const int e = j % 128;
      const int k = e / 32;
      const int l = e % 32;
      const uint8_t lo_byte = b[64 * h + l + 32 * (k % 2)];
      const int lo = k < 2 ? (lo_byte & 0x0f) : (lo_byte >> 4);
      const int hi = (b[128 + 32 * h + l] >> (2 * k)) & 3;
      const float d = HalfAt(b + 208);
      const float scale = __fmul_rn(d, static_cast<float>(static_cast<int8_t>(b[192 + j / 16])));
      return __fmul_rn(scale, static_cast<float>((lo | (hi << 4)) - 32));
    }
    default:
      return 0.0f;
  }
}

template <typename T>
__global__ void DequantKernel(uint32_t type, const uint8_t* data, int64_t n, int block_size,
                              int block_bytes, T* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t blk = i / block_size;
    const int j = static_cast<int>(i % block_size);
    // Whole-element types: the "block" is the element itself.
    const uint8_t* b = data + blk * block_bytes;
    out[i] = FromFloat<T>(DequantElem(type, b, j));
  }
}

}  // namespace

bool CanDequantizeCuda(uint32_t ggml_type) {
  Geometry g;
  return GetGeometry(ggml_type, &g);
}

cudaError_t DequantizeCuda(const DequantParams& p, cudaStream_t stream) {
  Geometry g;
  if (!GetGeometry(p.ggml_type, &g) || p.n < 0 || p.n % g.block_size != 0) {
    return cudaErrorInvalidValue;
  }
  if (p.n == 0) {
    return cudaSuccess;
  }
  constexpr int kThreads = 256;
#ifdef HELIX_CUDA_EMULATION
  constexpr int64_t kMaxGrid = 4;  // grid-stride loop: few emulated thread blocks suffice
#else
  constexpr int64_t kMaxGrid = 1 << 20;
#endif
  const unsigned grid =
      static_cast<unsigned>(std::clamp<int64_t>((p.n + kThreads - 1) / kThreads, 1, kMaxGrid));
  const auto* data = static_cast<const uint8_t*>(p.data);
  const int bs = static_cast<int>(g.block_size);
  const int bb = static_cast<int>(g.block_bytes);
  switch (p.out_dtype) {
    case DType::kF32:
      HELIX_LAUNCH(DequantKernel<float>, grid, kThreads, 0, stream, p.ggml_type, data, p.n, bs, bb,
                   static_cast<float*>(p.out));
      break;
    case DType::kF16:
      HELIX_LAUNCH(DequantKernel<__half>, grid, kThreads, 0, stream, p.ggml_type, data, p.n, bs, bb,
                   static_cast<__half*>(p.out));
      break;
    case DType::kBF16:
      HELIX_LAUNCH(DequantKernel<__nv_bfloat16>, grid, kThreads, 0, stream, p.ggml_type, data, p.n,
                   bs, bb, static_cast<__nv_bfloat16*>(p.out));
      break;
  }
  HELIX_CUDA_CHECK_LAUNCH(stream);
  return cudaSuccess;
}

}  // namespace helix::kernels::cuda
