#include <algorithm>
#include <vector>

#include "kernels/cpu_vec.h"
#include "kernels/gemm.h"

namespace helix::kernels {
namespace {

using vec::V8;

// Weight rows per tile (C) and x rows per micro-kernel call (R): 2 x 4 accumulators plus the
// loaded vectors fit the 16 AVX2 registers.
constexpr int kTileRows = 4;
constexpr int kXRows = 2;
// k is walked in panels so that a weight tile panel (4 x 512 floats = 8 KiB) stays in L1
// while every x row streams past it.
constexpr int64_t kPanel = 512;
constexpr int64_t kPrefetchBytes = 8192;

// acc[r][c] += dot(x[r][k0:k1], w[c][k0:k1]) for R x rows and C weight rows.
template <DType T, int R, int C>
inline void MicroKernel(const float* const* xr, const void* const* wr, int64_t k0, int64_t k1,
                        float out[R][C]) {
  V8 acc[R][C];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      acc[r][c] = vec::Zero();
    }
  }
  int64_t i = k0;
  // Weight rows are streamed from memory once per call: prefetch each row kPrefetchBytes ahead
  // (one line per 64 bytes of weights) so that several lines per row are in flight.
  constexpr int64_t kLine = 64 / static_cast<int64_t>(DTypeSize(T));  // elements per line
  for (; i + 8 <= k1; i += 8) {
    if (i % kLine == 0) {
      for (int c = 0; c < C; ++c) {
        __builtin_prefetch(static_cast<const char*>(wr[c]) +
                           (i * static_cast<int64_t>(DTypeSize(T))) + kPrefetchBytes);
      }
    }
    V8 wv[C];
    for (int c = 0; c < C; ++c) {
      wv[c] = vec::LoadAs<T>(wr[c], i);
    }
    for (int r = 0; r < R; ++r) {
      const V8 xv = vec::Load(xr[r] + i);
      for (int c = 0; c < C; ++c) {
        acc[r][c] = vec::Fma(xv, wv[c], acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      float s = vec::HorizontalSum(acc[r][c]);
      for (int64_t j = i; j < k1; ++j) {
        s += xr[r][j] * vec::LoadScalarAs<T>(wr[c], j);
      }
      out[r][c] = s;
    }
  }
}

// y[:, n0:n0+C] for all m rows.
template <DType T, int C>
void WeightTile(const GemmParams& p, int64_t n0) {
  const void* wr[C];
  for (int c = 0; c < C; ++c) {
    wr[c] = static_cast<const char*>(p.w) + (n0 + c) * p.k * static_cast<int64_t>(DTypeSize(T));
  }
  for (int64_t k0 = 0; k0 < p.k || k0 == 0; k0 += kPanel) {
    const int64_t k1 = std::min(p.k, k0 + kPanel);
    const bool first = k0 == 0;
    int64_t r = 0;
    for (; r + kXRows <= p.m; r += kXRows) {
      const float* xr[kXRows] = {p.x + r * p.k, p.x + (r + 1) * p.k};
      float out[kXRows][C];
      MicroKernel<T, kXRows, C>(xr, wr, k0, k1, out);
      for (int rr = 0; rr < kXRows; ++rr) {
        float* y = p.y + (r + rr) * p.n + n0;
        for (int c = 0; c < C; ++c) {
          const float init = first ? (p.bias ? p.bias[n0 + c] : 0.0f) : y[c];
          y[c] = init + out[rr][c];
        }
      }
    }
    for (; r < p.m; ++r) {
      const float* xr[1] = {p.x + r * p.k};
      float out[1][C];
      MicroKernel<T, 1, C>(xr, wr, k0, k1, out);
      float* y = p.y + r * p.n + n0;
      for (int c = 0; c < C; ++c) {
        const float init = first ? (p.bias ? p.bias[n0 + c] : 0.0f) : y[c];
        y[c] = init + out[0][c];
      }
    }
    if (p.k == 0) {
      break;
    }
  }
}

template <DType T>
void GemmTyped(const GemmParams& p, ThreadPool* pool) {
  const int64_t tiles = (p.n + kTileRows - 1) / kTileRows;
  // About 64K multiply-adds per chunk before it is worth waking another thread.
  const int64_t min_tiles =
      std::max<int64_t>(1, 65536 / std::max<int64_t>(1, p.m * p.k * kTileRows));
  ParallelForMin(pool, tiles, min_tiles, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      const int64_t n0 = t * kTileRows;
      switch (std::min<int64_t>(kTileRows, p.n - n0)) {
        case 4:
          WeightTile<T, 4>(p, n0);
          break;
        case 3:
          WeightTile<T, 3>(p, n0);
          break;
        case 2:
          WeightTile<T, 2>(p, n0);
          break;
        default:
          WeightTile<T, 1>(p, n0);
          break;
      }
    }
  });
}

}  // namespace

void GemmCpu(const GemmParams& p, ThreadPool* pool) {
  if (p.m <= 0 || p.n <= 0) {
    return;
  }
  switch (p.w_dtype) {
    case DType::kF32:
      GemmTyped<DType::kF32>(p, pool);
      break;
    case DType::kF16:
      GemmTyped<DType::kF16>(p, pool);
      break;
    case DType::kBF16:
      GemmTyped<DType::kBF16>(p, pool);
      break;
  }
}

void GemmBatchedCpu(const GemmBatchedParams& p, ThreadPool* pool) {
  if (p.m <= 0 || p.n <= 0 || p.batch <= 0) {
    return;
  }
  const size_t es = DTypeSize(p.w_dtype);
  std::vector<float> xs, ys;
  for (int64_t b = 0; b < p.batch; ++b) {
    const float* x = p.x + b * p.x_stride;
    float* y = p.y + b * p.y_stride;
    const void* w = static_cast<const char*>(p.w) + b * p.w_stride * static_cast<int64_t>(es);
    const bool dense_x = p.ldx == p.k, dense_y = p.ldy == p.n;
    if (!dense_x) {
      xs.resize(p.m * p.k);
      for (int64_t i = 0; i < p.m; ++i) {
        std::copy_n(x + i * p.ldx, p.k, xs.data() + i * p.k);
      }
    }
    if (!dense_y) ys.resize(p.m * p.n);
    GemmCpu(
        {dense_x ? x : xs.data(), w, nullptr, dense_y ? y : ys.data(), p.m, p.n, p.k, p.w_dtype},
        pool);
    if (!dense_y) {
      for (int64_t i = 0; i < p.m; ++i) std::copy_n(ys.data() + i * p.n, p.n, y + i * p.ldy);
    }
  }
}

}  // namespace helix::kernels
