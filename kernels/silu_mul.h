// Fused SwiGLU activation out = silu(gate) * up for the CPU backend.
// Stateless; thread-safe for distinct outputs.
#ifndef HELIX_KERNELS_SILU_MUL_H_
#define HELIX_KERNELS_SILU_MUL_H_

#include <cstdint>

#include "kernels/thread_pool.h"

namespace helix::kernels {

struct SiluMulParams {
  const float* gate;  // [n]
  const float* up;    // [n]
  float* out;         // [n]; may alias gate or up
  int64_t n;
};

// silu(x) = x / (1 + e^-x). pool may be nullptr.
void SiluMulCpu(const SiluMulParams& p, ThreadPool* pool);

}  // namespace helix::kernels

#endif  // HELIX_KERNELS_SILU_MUL_H_
