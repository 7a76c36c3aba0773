// Host weights of a Llama-style model in float32, row-major [out][in] (y = W·x).
// Immutable after loading; safe to read from many threads.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/model/model_config.h"

namespace helix {

struct LayerWeights {
  std::vector<float> attn_norm;   // [dim]
  std::vector<float> wq;          // [n_heads*head_dim][dim]
  std::vector<float> wk;          // [n_kv_heads*head_dim][dim]
  std::vector<float> wv;          // [n_kv_heads*head_dim][dim]
  std::vector<float> bq, bk, bv;  // biases (empty unless qkv_bias)
  std::vector<float> wo;          // [dim][n_heads*head_dim]
  std::vector<float> ffn_norm;    // [dim]
  std::vector<float> w1;          // gate [hidden][dim]
  std::vector<float> w2;          // down [dim][hidden]
  std::vector<float> w3;          // up   [hidden][dim]
};

struct ModelWeights {
  std::vector<float> token_embedding;  // [vocab][dim]
  std::vector<LayerWeights> layers;
  std::vector<float> final_norm;  // [dim]
  std::vector<float> classifier;  // [vocab][dim]; empty when tied to the embedding

  const float* classifier_data() const {
    return classifier.empty() ? token_embedding.data() : classifier.data();
  }
};

struct LoadedModel {
  ModelConfig config;
  ModelWeights weights;
};

}  // namespace helix
