// Forward pass of a Llama-family decoder (RMSNorm, RoPE, GQA attention over the paged KV
// cache, SwiGLU FFN) on one rank with the whole model. Not thread-safe: the engine thread
// runs it; scratch buffers are reused between steps.
#pragma once

#include <memory>
#include <vector>

#include "engine/backend/backend.h"
#include "engine/common/status.h"
#include "engine/model/forward_batch.h"
#include "engine/model/weights.h"

namespace helix {

class LlamaModel {
 public:
  // `kv` describes the KV pool the model writes to and attends over.
  LlamaModel(std::unique_ptr<LoadedModel> model, Backend* backend, kernels::KvPoolView kv);

  const ModelConfig& config() const { return model_->config; }
  // Runs the batch; fills *logits with [logits_rows.size()][vocab] floats.
  void Forward(const ForwardBatch& batch, std::vector<float>* logits);

 private:
  std::unique_ptr<LoadedModel> model_;
  Backend* backend_;
  kernels::KvPoolView kv_;
  // Scratch, grown as needed.
  std::vector<float> x_, xb_, q_, k_, v_, att_, lse_, h1_, h3_, rows_;
  std::vector<uint8_t> workspace_;
};

}  // namespace helix
