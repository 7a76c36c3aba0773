// Loader for GGUF models of the `llama` and `qwen2` architectures: hyper-parameters from the
// {arch}.* keys, weights dequantised to fp32 [out][in], and the vocabulary as VocabData.
// Stateless functions; thread-safe.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "engine/common/status.h"
#include "engine/model/gguf/gguf_file.h"
#include "engine/model/weights.h"
#include "engine/tokenizer/vocab_data.h"

namespace helix {

struct GgufModel {
  std::unique_ptr<LoadedModel> model;
  // From the tokenizer.ggml.* keys; nullopt when the file has no tokenizer.ggml.model.
  // vocab->tokens.size() may differ from model->config.vocab_size (padded embeddings).
  std::optional<VocabData> vocab;
};

// Reads `path` whole. `llama` weights are in the converter's permuted Q/K layout, so RoPE is
// RopeStyle::kInterleaved; `qwen2` is not permuted and uses kHalf (NEOX) and q/k/v biases. An
// absent output.weight means the classifier is tied to token_embd.
// Errors name the path and the key or tensor: NotFound (no file, a required key missing),
// InvalidArgument (bad values, a missing tensor or one of the wrong shape), Unimplemented (an
// architecture other than llama and qwen2, a tensor type Dequantize does not handle, RoPE
// scaling, partial rotary dims, experts), DataLoss (truncated or corrupt file).
StatusOr<GgufModel> LoadGgufModel(const std::string& path);

// The vocabulary in `file`'s tokenizer.ggml.* and tokenizer.chat_template keys; nullopt when it
// has no tokenizer.ggml.model. Missing add_bos_token / add_space_prefix default as llama.cpp
// does: true for the `llama` (SentencePiece) model; for `gpt2`, add_space_prefix false and
// add_bos true only for the Llama-3 pre-tokenizers (llama3, llama-v3, llama-bpe, falcon3).
StatusOr<std::optional<VocabData>> ReadGgufVocab(const gguf::GgufFile& file);

}  // namespace helix
