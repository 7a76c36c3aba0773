// Rotary position embedding applied in place to queries or keys, for the CPU backend.
// Stateless; thread-safe for distinct x.
#ifndef HELIX_KERNELS_ROPE_H_
#define HELIX_KERNELS_ROPE_H_

#include <cstdint>

#include "kernels/attention.h"
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

// The decode step's RoPE and K/V write in one launch: q and k rotated in place (RopeCuda
// semantics, global positions), then each token's rotated K and its V stored into its block
// slot (WriteKvBatchCuda semantics; block < 0: rotated but not stored on this rank).
struct RopeWriteKvParams {
  float* q;        // [tokens][num_q_heads][kv.head_dim], rotated in place
  float* k;        // [tokens][kv.num_kv_heads][kv.head_dim], rotated in place
  const float* v;  // [tokens][kv.num_kv_heads][kv.head_dim]
  // row_stride > 0: token t's q, k and v start at t * row_stride floats from q, k and v (the
  // slices of one fused q/k/v GEMM's [tokens][q + k + v] output).
  int64_t row_stride = 0;
  // Not nullptr: the rotated q goes here ([tokens][num_q_heads][kv.head_dim], contiguous)
  // instead of in place.
  float* q_out = nullptr;
  const int32_t* positions;  // [tokens] global positions
  int64_t tokens, num_q_heads;
  int64_t rotary_dim;  // <= head_dim, even
  float theta;
  RopeStyle style;
  KvPoolView kv;  // kv.base in the backend's memory
  int64_t layer;
  const int32_t* block;           // [tokens] physical block, < 0: not stored here
  const int32_t* token_in_block;  // [tokens]
  // (The CUDA kernel reads positions, block and token_in_block before it waits for the kernel
  // before it in the stream: that kernel must not write them. The engine uploads them before
  // the step's first kernel.)
};

}  // namespace helix::kernels

#endif  // HELIX_KERNELS_ROPE_H_
