// Fused SwiGLU activation out = silu(gate) * up for the CPU backend.
// Stateless; thread-safe for distinct outputs.
#ifndef HELIX_KERNELS_SILU_MUL_H_
#define HELIX_KERNELS_SILU_MUL_H_

#include <cstdint>

#include "kernels/dtype.h"
#include "kernels/thread_pool.h"

namespace helix::kernels {

struct SiluMulParams {
  const float* gate;  // [n]
  const float* up;    // [n]
  float* out;         // [n]; may alias gate or up (not with cols > 0)
  int64_t n;
  // cols > 0: gate and up are rows of ld floats (element c of row r at r * ld + c, e.g. the
  // gate and up halves of one fused GEMM's [rows][2F] output), out is [n / cols][cols].
  // REQUIRES: n % cols == 0, ld >= cols.
  int64_t cols = 0, ld = 0;
  // Optional second output: out rounded to out_lowp_dtype (kF16 or kBF16, to nearest even),
  // [n], as RmsNormParams::out_lowp. nullptr = not written.
  void* out_lowp = nullptr;
  DType out_lowp_dtype = DType::kBF16;
};

// silu(x) = x / (1 + e^-x). pool may be nullptr.
void SiluMulCpu(const SiluMulParams& p, ThreadPool* pool);

}  // namespace helix::kernels

#endif  // HELIX_KERNELS_SILU_MUL_H_
