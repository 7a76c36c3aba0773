// Host weights of a Llama-style model, row-major [out][in] (y = W·x). Loaders fill float32;
// the model may then convert the matrices to a 16-bit type once (ConvertTo). Immutable after
// that; safe to read from many threads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "engine/common/status.h"
#include "engine/model/model_config.h"
#include "kernels/dtype.h"

namespace helix {

// A [out][in] matrix in float32 (as loaded) or, after ConvertTo, float16 / bfloat16.
struct WeightMatrix {
  std::vector<float> f32;        // filled by the loaders; emptied by ConvertTo a 16-bit type
  std::vector<uint16_t> bits16;  // the 16-bit values after ConvertTo
  kernels::DType dtype = kernels::DType::kF32;

  const void* data() const {
    return dtype == kernels::DType::kF32 ? static_cast<const void*>(f32.data()) : bits16.data();
  }
  bool empty() const { return f32.empty() && bits16.empty(); }
  size_t size_bytes() const {
    return f32.size() * sizeof(float) + bits16.size() * sizeof(uint16_t);
  }
  // Rounds to `t` (nearest even) and frees the float32 copy. REQUIRES: dtype is kF32 or t.
  void ConvertTo(kernels::DType t);
};

struct LayerWeights {
  std::vector<float> attn_norm;   // [dim]
  WeightMatrix wq;                // [n_heads*head_dim][dim]
  WeightMatrix wk;                // [n_kv_heads*head_dim][dim]
  WeightMatrix wv;                // [n_kv_heads*head_dim][dim]
  std::vector<float> bq, bk, bv;  // biases (empty unless qkv_bias)
  WeightMatrix wo;                // [dim][n_heads*head_dim]
  std::vector<float> ffn_norm;    // [dim]
  WeightMatrix w1;                // gate [hidden][dim]
  WeightMatrix w2;                // down [dim][hidden]
  WeightMatrix w3;                // up   [hidden][dim]
  // In an MoE layer w1/w2/w3 are the shared experts (hidden = n_shared * moe_hidden; empty
  // when there are none).

  // MLA (DeepSeek). wq is q_proj when q_lora_rank is 0, else q_b_proj ([H * qk_head][q_lora]).
  WeightMatrix wq_a;             // q_a_proj [q_lora][dim]
  std::vector<float> q_a_norm;   // [q_lora]
  WeightMatrix wkv_a;            // kv_a_proj_with_mqa [kv_lora + rope][dim]
  std::vector<float> kv_a_norm;  // [kv_lora]
  std::vector<float> wkv_b;      // kv_b_proj as loaded [H * (nope + v)][kv_lora]; ShardWeights
                                 // splits it into wuk_t and wuv and empties it
  WeightMatrix wuk_t;            // per local query head W_UK^T: [q_heads][kv_lora][nope]
  WeightMatrix wuv;              // per combined head W_UV: [out_heads][v][kv_lora]

  // MoE: the gate (kept float32, as DeepSeek routes in fp32) and this rank's routed experts.
  struct Expert {
    WeightMatrix w1, w2, w3;  // [moe_hidden][dim], [dim][moe_hidden], [moe_hidden][dim]
  };
  std::vector<float> gate;       // [n_routed_experts][dim]
  std::vector<float> gate_bias;  // [n_routed_experts] e_score_correction_bias (noaux_tc)
  std::vector<Expert> experts;   // experts [expert_begin, expert_begin + experts.size())
  int64_t expert_begin = 0;
};

struct ModelWeights {
  std::vector<float> token_embedding;  // [vocab][dim]
  std::vector<LayerWeights> layers;
  std::vector<float> final_norm;  // [dim]
  // [vocab][dim]. Tied to the embedding: empty while float32 (the embedding is used), a
  // 16-bit copy of the embedding once converted (the gathers keep the float32 table).
  WeightMatrix classifier;

  const void* classifier_data() const {
    return classifier.empty() ? static_cast<const void*>(token_embedding.data())
                              : classifier.data();
  }
  kernels::DType classifier_dtype() const {
    return classifier.empty() ? kernels::DType::kF32 : classifier.dtype;
  }
  // Converts every matrix (and the classifier, copying a tied embedding) to `t`.
  void ConvertMatricesTo(kernels::DType t);
};

// The precision a checkpoint stores its matrices in, which weight dtype "auto" keeps: every
// matrix float32 -> float32; the non-float32 ones all float16 -> float16; anything else
// (bfloat16, quantised GGUF types) -> bfloat16.
class StoredPrecision {
 public:
  // `kind`: 32 for float32, 16 for float16, anything else for bf16 / quantised.
  void Add(int kind) { (kind == 32 ? any32_ : kind == 16 ? any16_ : other_) = true; }
  kernels::DType Resolve() const {
    if (other_) return kernels::DType::kBF16;
    return any16_ ? kernels::DType::kF16 : kernels::DType::kF32;
  }

 private:
  bool any32_ = false, any16_ = false, other_ = false;
};

// Whether this machine can hold `bytes` more of host memory (the loaders fill every weight as
// float32 before any conversion): ResourceExhausted naming `what`, the need and what is
// available (/proc/meminfo's MemAvailable + SwapFree) otherwise; Ok where that is unknown.
Status CheckHostMemoryFor(uint64_t bytes, const std::string& what);
// CheckHostMemoryFor's verdict for a machine with `available` bytes.
Status CheckHostMemoryFor(uint64_t bytes, const std::string& what, uint64_t available);

struct LoadedModel {
  ModelConfig config;
  ModelWeights weights;
  kernels::DType stored_dtype = kernels::DType::kF32;  // StoredPrecision of the checkpoint
};

}  // namespace helix
