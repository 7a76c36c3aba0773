// Loader for Hugging Face model directories (config.json + model.safetensors, or shards named
// by model.safetensors.index.json) of LlamaForCausalLM and Qwen2ForCausalLM; weights become
// fp32 [out][in]. Stateless functions; thread-safe.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "engine/common/status.h"
#include "engine/model/weights.h"
#include "engine/tokenizer/vocab_data.h"

namespace helix {

struct HfModel {
  std::unique_ptr<LoadedModel> model;
  // From tokenizer.json (with tokenizer_config.json when present) through
  // LoadHfTokenizerJson; nullopt when the directory has no tokenizer.json.
  std::optional<VocabData> vocab;
};

// Reads the directory `dir`. Weights keep Hugging Face's layout, so RoPE is
// RopeStyle::kHalf (rotate-half) with no permutation; Qwen2 has q/k/v biases. lm_head.weight
// absent, or tie_word_embeddings true, means the classifier is tied to the embedding.
// Safetensors dtypes F32, F16 and BF16 are converted to fp32.
// Errors name the file and the field or tensor: NotFound (no directory, no config.json, no
// weights file, a missing shard), InvalidArgument (config.json not JSON, a field missing or of
// the wrong type or value, a tensor missing or of the wrong shape), Unimplemented (another
// architecture, RoPE scaling, sliding-window attention, output/MLP biases, other dtypes or
// activations), DataLoss (truncated files); and LoadHfTokenizerJson's errors for the tokenizer.
StatusOr<HfModel> LoadHfModel(const std::string& dir);
// config.json's vocab_size, read as LoadHfModel reads the file (no weights); nullopt when the
// file or the field cannot be read (LoadHfModel reports why).
std::optional<int64_t> HfConfigVocabSize(const std::string& dir);

}  // namespace helix
