#include "kernels/cuda/gemv_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_util.cuh"

namespace helix::kernels::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kChunk = 8;               // weights per 16-byte load
constexpr int64_t kStep = 32 * kChunk;  // weights a warp reads per load

// One warp per output j. Plain: y[r][j] = x[r] . w[j] (+ bias[j]) for r < m <= M. kGlu: the
// warp also reads weight row j + n/2 and writes out[r][j] = silu(y[r][j]) * y[r][j + n/2]
// (SiluMulValue) instead. Lane l reads the 16-byte chunks l, l + 32, ... of each of its rows
// (U of them per row issued together) and the same eight floats of each row of x (from cache:
// x is small and every warp reads it). A row's sum is the same sequence of FMAs and the same
// warp reduction whatever U and kGlu are, so the fused result equals GEMV then SiLU·mul.
template <typename W, int M, int U, bool kGlu>
__global__ void GemvKernel(const GemmParams p, const SiluMulParams act) {
  PdlEnter();                      // first: see HELIX_LAUNCH_PDL
  constexpr int R = kGlu ? 2 : 1;  // weight rows per warp
  const int64_t outs = kGlu ? p.n / 2 : p.n;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (j >= outs) {
    return;
  }
  const W* __restrict__ w[R];
#pragma unroll
  for (int q = 0; q < R; ++q) {
    w[q] = static_cast<const W*>(p.w) + (j + q * outs) * p.k;
  }
  float acc[R][M];
#pragma unroll
  for (int q = 0; q < R; ++q) {
#pragma unroll
    for (int r = 0; r < M; ++r) {
      acc[q][r] = 0.0f;
    }
  }
  for (int64_t k0 = lane * kChunk; k0 < p.k; k0 += U * kStep) {
    uint4 raw[R][U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k = k0 + u * kStep;
#pragma unroll
      for (int q = 0; q < R; ++q) {
        raw[q][u] = k < p.k ? *reinterpret_cast<const uint4*>(w[q] + k) : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k = k0 + u * kStep;
      if (k >= p.k) {
        break;
      }
      float wf[R][kChunk];
#pragma unroll
      for (int q = 0; q < R; ++q) {
        ChunkToFloats<W>(raw[q][u], wf[q]);
      }
#pragma unroll
      for (int r = 0; r < M; ++r) {
        if (r < p.m) {
          const float4* xr = reinterpret_cast<const float4*>(p.x + r * p.k + k);
          const float4 a = xr[0];
          const float4 b = xr[1];
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
  for (int r = 0; r < M; ++r) {
    float s[R];
#pragma unroll
    for (int q = 0; q < R; ++q) {
      s[q] = acc[q][r];
#pragma unroll
      for (int off = 16; off > 0; off /= 2) {
        s[q] += __shfl_xor_sync(0xffffffffu, s[q], off);
      }
      if (p.bias != nullptr) {
        s[q] += p.bias[j + q * outs];
      }
    }
    if (lane == 0 && r < p.m) {
      if constexpr (kGlu) {
        const float o = SiluMulValue(s[0], s[1]);
        act.out[r * outs + j] = o;
        if (act.out_lowp != nullptr) {
          StoreLowpAt(act.out_lowp, act.out_lowp_dtype, r * outs + j, o);
        }
      } else {
        p.y[r * p.n + j] = s[0];
      }
    }
  }
}

template <typename W, int U, bool kGlu>
cudaError_t LaunchRows(const GemmParams& p, const SiluMulParams& act, cudaStream_t stream) {
  const int64_t outs = kGlu ? p.n / 2 : p.n;
  const unsigned grid = static_cast<unsigned>((outs + kWarpsPerBlock - 1) / kWarpsPerBlock);
  const unsigned block = 32 * kWarpsPerBlock;
  if (p.m == 1) {
    HELIX_LAUNCH_PDL((GemvKernel<W, 1, U, kGlu>), grid, block, 0, stream, p, act);
  } else if (p.m == 2) {
    HELIX_LAUNCH_PDL((GemvKernel<W, 2, U, kGlu>), grid, block, 0, stream, p, act);
  } else {
    HELIX_LAUNCH_PDL((GemvKernel<W, 4, U, kGlu>), grid, block, 0, stream, p, act);
  }
  HELIX_CUDA_CHECK_LAUNCH(stream);
  return cudaSuccess;
}

template <bool kGlu>
cudaError_t Launch(const GemmParams& p, const SiluMulParams& act, cudaStream_t stream, int unroll) {
  if (unroll == 0) {
    // A lane's share of a short row in one round of loads; long rows (the down projection's)
    // keep more bytes in flight per warp too, as their warps are few.
    unroll = 8;
  }
  if (unroll != 4 && unroll != 8) {
    return cudaErrorInvalidValue;
  }
  const bool bf16 = p.w_dtype == DType::kBF16;
  if (unroll == 4) {
    return bf16 ? LaunchRows<__nv_bfloat16, 4, kGlu>(p, act, stream)
                : LaunchRows<__half, 4, kGlu>(p, act, stream);
  }
  return bf16 ? LaunchRows<__nv_bfloat16, 8, kGlu>(p, act, stream)
              : LaunchRows<__half, 8, kGlu>(p, act, stream);
}

}  // namespace

bool GemvApplies(const GemmParams& p) {
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  return (p.w_dtype == DType::kBF16 || p.w_dtype == DType::kF16) && p.m >= 1 &&
         p.m <= kGemvMaxRows && p.n >= 1 && p.k >= 1 && p.k % kChunk == 0 && aligned(p.x) &&
         aligned(p.w);
}

bool GemvPreferred(int64_t m, int64_t n, int64_t k) {
  // gemv_bench on the H100 (docs/results/gpu-h100-2026-11-26b.md): with one row the GEMV beats
  // cuBLAS on every decode shape measured; with four rows only on matrices up to Llama-3.2-1B's
  // q|k|v (12 MiB), and it loses by up to 1.6x on its gate|up and the classifier.
  constexpr int64_t kSmallBytes = int64_t{16} << 20;
  return m == 1 || (m >= 1 && m <= kGemvMaxRows && n * k * 2 <= kSmallBytes);
}

cudaError_t GemvCuda(const GemmParams& p, cudaStream_t stream, int unroll) {
  if (!GemvApplies(p)) {
    return cudaErrorInvalidValue;
  }
  return Launch<false>(p, SiluMulParams{}, stream, unroll);
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
                            int unroll) {
  if (!GemvSiluMulApplies(p, act)) {
    return cudaErrorInvalidValue;
  }
  return Launch<true>(p, act, stream, unroll);
}

}  // namespace helix::kernels::cuda
