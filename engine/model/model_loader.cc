#include "engine/model/model_loader.h"

#include <cstring>
#include <filesystem>
#include <fstream>

#include "engine/model/gguf/gguf_loader.h"
#include "engine/model/hf/hf_loader.h"
#include "engine/model/llama2c_loader.h"
#include "engine/tokenizer/vocab_data.h"

namespace helix {
namespace {

namespace fs = std::filesystem;

StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizerFile(const std::string& path,
                                                       int64_t model_vocab) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) return NotFound("cannot open tokenizer file '" + path + "'");
  if (fs::path(path).extension() == ".json") {
    const fs::path config = fs::path(path).parent_path() / "tokenizer_config.json";
    ASSIGN_OR_RETURN(VocabData v,
                     LoadHfTokenizerJson(
                         path, fs::is_regular_file(config, ec) ? config.string() : std::string()));
    return CreateTokenizer(std::move(v));
  }
  return LoadLlama2cTokenizer(path, static_cast<int32_t>(model_vocab));
}

}  // namespace

const char* ModelFormatName(ModelFormat f) {
  switch (f) {
    case ModelFormat::kLlama2c:
      return "llama2.c";
    case ModelFormat::kGguf:
      return "gguf";
    case ModelFormat::kHuggingFace:
      return "huggingface";
  }
  return "?";
}

StatusOr<ModelFormat> DetectModelFormat(const std::string& model_path) {
  std::error_code ec;
  if (fs::is_directory(model_path, ec)) return ModelFormat::kHuggingFace;
  if (fs::exists(model_path, ec) && !fs::is_regular_file(model_path, ec)) {
    // Opening a FIFO would wait for a writer forever.
    return InvalidArgument("model '" + model_path + "' is not a regular file or a directory");
  }
  std::ifstream in(model_path, std::ios::binary);
  if (!in) return NotFound("cannot open model file '" + model_path + "'");
  char magic[4] = {};
  in.read(magic, 4);
  if (in.gcount() == 4 && std::memcmp(magic, "GGUF", 4) == 0) return ModelFormat::kGguf;
  return ModelFormat::kLlama2c;
}

StatusOr<ModelBundle> LoadModelBundle(const std::string& model_path,
                                      const std::string& tokenizer_path) {
  ModelBundle b;
  ASSIGN_OR_RETURN(b.format, DetectModelFormat(model_path));
  std::optional<VocabData> vocab;
  switch (b.format) {
    case ModelFormat::kLlama2c: {
      ASSIGN_OR_RETURN(b.model, LoadLlama2cModel(model_path));
      if (tokenizer_path.empty()) {
        return InvalidArgument("model '" + model_path +
                               "' is a llama2.c checkpoint, which needs a tokenizer file "
                               "(--tokenizer / \"tokenizer\")");
      }
      break;
    }
    case ModelFormat::kGguf: {
      ASSIGN_OR_RETURN(GgufModel m, LoadGgufModel(model_path));
      b.model = std::move(m.model);
      vocab = std::move(m.vocab);
      break;
    }
    case ModelFormat::kHuggingFace: {
      ASSIGN_OR_RETURN(HfModel m, LoadHfModel(model_path));
      b.model = std::move(m.model);
      vocab = std::move(m.vocab);
      break;
    }
  }
  const int64_t model_vocab = b.model->config.vocab_size;
  if (!tokenizer_path.empty()) {
    ASSIGN_OR_RETURN(b.tokenizer, LoadTokenizerFile(tokenizer_path, model_vocab));
  } else if (vocab) {
    ASSIGN_OR_RETURN(b.tokenizer, CreateTokenizer(std::move(*vocab)));
  } else {
    return InvalidArgument("model '" + model_path + "' (" + ModelFormatName(b.format) +
                           ") carries no tokenizer; give one with --tokenizer / \"tokenizer\"");
  }
  if (b.tokenizer->vocab_size() > model_vocab) {
    return InvalidArgument("tokenizer has " + std::to_string(b.tokenizer->vocab_size()) +
                           " tokens but model '" + model_path + "' has only " +
                           std::to_string(model_vocab) + " embedding rows");
  }
  return b;
}

}  // namespace helix
