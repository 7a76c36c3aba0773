// Architecture description of a decoder-only transformer, filled by the loaders.
// A plain value; immutable once the model is loaded.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine/common/status.h"
#include "kernels/rope.h"

namespace helix {

// How attention is computed and what the KV cache holds.
enum class AttentionKind {
  kGqa,  // Llama/Qwen2: per-KV-head K and V (two planes)
  kMla,  // DeepSeek V2/V3 Multi-head Latent Attention: one latent c_kv + rotary k_pe per token
};

// DeepSeek's yarn RoPE scaling (rope_scaling.type "yarn").
struct YarnScaling {
  bool enabled = false;
  double factor = 1.0;
  int64_t original_max_position_embeddings = 0;
  double beta_fast = 32.0, beta_slow = 1.0;
  double mscale =
      1.0;  // cos/sin are scaled by mscale(factor, mscale) / mscale(factor, mscale_all_dim)
  double mscale_all_dim =
      0.0;  // 0 = unset; else the softmax scale is multiplied by mscale(factor, it)^2
};

// MoE routing (DeepSeek V2/V3 gate).
enum class TopkMethod { kGreedy, kGroupLimitedGreedy, kNoauxTc };
enum class ScoringFunc { kSoftmax, kSigmoid };

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

  // MLA (attention == kMla). The KV cache then has one plane and one "head" per token of
  // head_dim = kv_lora_rank + qk_rope_head_dim, and n_kv_heads = 1.
  AttentionKind attention = AttentionKind::kGqa;
  int64_t q_lora_rank = 0;  // 0: q_proj straight from the hidden state
  int64_t kv_lora_rank = 0, qk_nope_head_dim = 0, qk_rope_head_dim = 0, v_head_dim = 0;
  YarnScaling yarn;

  // MoE (n_routed_experts > 0): layer l is MoE when l >= first_k_dense_replace and
  // l % moe_layer_freq == 0; other layers use the dense FFN of hidden_dim.
  int64_t n_routed_experts = 0, n_shared_experts = 0, experts_per_token = 0;
  int64_t moe_hidden_dim = 0, first_k_dense_replace = 0, moe_layer_freq = 1;
  TopkMethod topk_method = TopkMethod::kGreedy;
  ScoringFunc scoring = ScoringFunc::kSoftmax;
  int64_t n_group = 1, topk_group = 1;
  bool norm_topk_prob = false;
  double routed_scaling_factor = 1.0;
  // DeepSeek V2 scales the routed weights only when they are not normalised; V3 always.
  bool scale_after_norm = true;

  bool mla() const { return attention == AttentionKind::kMla; }
  bool IsMoeLayer(int64_t l) const {
    return n_routed_experts > 0 && l >= first_k_dense_replace && l % moe_layer_freq == 0;
  }
  // KV planes per layer in a block: 2 (K, V) for GQA, 1 (the latent) for MLA.
  int64_t kv_planes() const { return mla() ? 1 : 2; }
  // MLA: width of one head's query/key, nope + rope.
  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  // The softmax scale of attention: 1/sqrt(head_dim), or for MLA 1/sqrt(qk_head_dim) times the
  // yarn mscale(factor, mscale_all_dim)^2.
  double SoftmaxScale() const;
  // RoPE inverse frequencies (rotary dim / 2 of them) and the cos/sin multiplier; plain
  // theta^(-2i/d) unless yarn is on.
  void RopeTables(std::vector<double>* inv_freq, double* mscale) const;

  // Checks that the shapes are consistent and positive; names the offending field.
  Status Validate() const;
  // Bytes of K and V for one token across all layers with `kv_heads` heads.
  int64_t KvBytesPerToken(int64_t kv_heads, int64_t dtype_bytes) const {
    return n_layers * kv_planes() * kv_heads * head_dim * dtype_bytes;
  }
};

}  // namespace helix
