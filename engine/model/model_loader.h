// One entry point for every model format the engine reads: a llama2.c checkpoint (.bin, with a
// separate tokenizer file), a GGUF file (tokenizer embedded), or a Hugging Face directory
// (config.json + safetensors + tokenizer.json). Stateless functions; thread-safe.
#pragma once

#include <memory>
#include <string>

#include "engine/common/status.h"
#include "engine/model/weights.h"
#include "engine/tokenizer/tokenizer.h"

namespace helix {

enum class ModelFormat { kLlama2c, kGguf, kHuggingFace };
const char* ModelFormatName(ModelFormat f);

struct ModelBundle {
  ModelFormat format = ModelFormat::kLlama2c;
  std::unique_ptr<LoadedModel> model;
  std::unique_ptr<Tokenizer> tokenizer;
};

// The format of `model_path`: a directory is Hugging Face, a file starting with "GGUF" is GGUF,
// any other file llama2.c. NotFound when the path does not exist.
StatusOr<ModelFormat> DetectModelFormat(const std::string& model_path);

// Loads the weights and a tokenizer. `tokenizer_path` ("" = the model's own) overrides the
// model's vocabulary: a .json file is read as a Hugging Face tokenizer.json (with the
// tokenizer_config.json beside it, if any), anything else as a llama2.c tokenizer file. A
// llama2.c model has no vocabulary of its own and needs one. The tokenizer may have fewer
// tokens than the model's embedding (padded vocabularies) but never more.
StatusOr<ModelBundle> LoadModelBundle(const std::string& model_path,
                                      const std::string& tokenizer_path);

// The tokenizer LoadModelBundle would give, without reading the weights (a router needs only
// this): from tokenizer_path when given, else the one the model carries (GGUF metadata,
// tokenizer.json of a Hugging Face folder). A llama2.c checkpoint's header sizes its tokenizer.
StatusOr<std::unique_ptr<Tokenizer>> LoadModelTokenizer(const std::string& model_path,
                                                        const std::string& tokenizer_path);

}  // namespace helix
