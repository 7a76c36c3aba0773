// Architecture description of a decoder-only transformer, filled by the loaders.
// A plain value; immutable once the model is loaded.
#pragma once

#include <cstdint>
#include <string>

#include "engine/common/status.h"
#include "kernels/rope.h"

namespace helix {

struct ModelConfig {
  std::string architecture;  // "llama" (llama2.c / GGUF llama / HF Llama), "qwen2", ...
  int64_t dim = 0;           // hidden size D
  int64_t hidden_dim = 0;    // FFN intermediate size
  int64_t n_layers = 0;
  int64_t n_heads = 0;     // query heads H
  int64_t n_kv_heads = 0;  // KV heads (GQA)
  int64_t head_dim = 0;
  int64_t vocab_size = 0;
  int64_t max_seq_len = 0;  // the model's maximum context
  float rope_theta = 10000.0f;
  kernels::RopeStyle rope_style = kernels::RopeStyle::kInterleaved;
  float norm_eps = 1e-5f;
  bool tied_embeddings = true;  // classifier shares the token embedding
  bool qkv_bias = false;        // Qwen2 has biases on q, k, v

  // Checks that the shapes are consistent and positive; names the offending field.
  Status Validate() const;
  // Bytes of K and V for one token across all layers with `kv_heads` heads.
  int64_t KvBytesPerToken(int64_t kv_heads, int64_t dtype_bytes) const {
    return n_layers * 2 * kv_heads * head_dim * dtype_bytes;
  }
};

}  // namespace helix
