// Rotary position embedding applied in place to queries or keys, for the CPU backend.
// Stateless; thread-safe for distinct x.
#ifndef HELIX_KERNELS_ROPE_H_
#define HELIX_KERNELS_ROPE_H_

#include <cstdint>

#include "kernels/thread_pool.h"

namespace helix::kernels {

enum class RopeStyle {
  kInterleaved,  // rotate pairs (x[2i], x[2i+1]): llama2.c and GGUF llama
  kHalf,         // rotate (x[i], x[i + rotary_dim/2]): Hugging Face, GGUF NEOX-style (qwen2)
};

struct RopeParams {
  float* x;                  // [tokens][heads][head_dim], rotated in place
  const int32_t* positions;  // [tokens] global positions
  int64_t tokens, heads, head_dim;
  int64_t rotary_dim;  // <= head_dim, even; the first rotary_dim dims rotate, the rest pass
  float theta;         // base, e.g. 10000
  RopeStyle style;
  // Optional: rotary_dim/2 inverse frequencies replacing theta^(-2i/rotary_dim) (yarn; in the
  // backend's memory space like x), and a factor applied to cos and sin (yarn's mscale).
  const double* inv_freq = nullptr;
  float mscale = 1.0f;
};

// Pair i (0 <= i < rotary_dim/2) rotates by pos * theta^(-2i/rotary_dim) (or inv_freq[i]); the
// angle and its sine/cosine are computed in double, so positions up to millions stay accurate.
// pool may be nullptr.
void RopeCpu(const RopeParams& p, ThreadPool* pool);

}  // namespace helix::kernels

#endif  // HELIX_KERNELS_ROPE_H_
