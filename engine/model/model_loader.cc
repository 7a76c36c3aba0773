#include "engine/model/model_loader.h"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <new>
#include <optional>

#include "engine/model/gguf/gguf_file.h"
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
    // The vocabulary's own errors name its fields (VocabData.bos_id ...): say whose it is.
    auto made = CreateTokenizer(std::move(v));
    if (!made.ok()) return made.status().WithPrefix("tokenizer '" + path + "'");
    return made;
  }
  {
    std::ifstream in(path, std::ios::binary);
    char magic[4] = {};
    in.read(magic, 4);
    if (in.gcount() == 4 && std::memcmp(magic, "GGUF", 4) == 0) {
      return InvalidArgument("tokenizer '" + path +
                             "' is a GGUF model file: a GGUF model carries its own tokenizer; "
                             "give the file as the model and no tokenizer");
    }
  }
  return LoadLlama2cTokenizer(path, static_cast<int32_t>(model_vocab));
}

// A file that is recognisably something other than a llama2.c checkpoint: an error naming
// what it is and what to give instead. `head`: its first `n` bytes (up to 16).
Status NotAModel(const std::string& path, const unsigned char* head, size_t n) {
  const std::string what = "model '" + path + "' is ";
  uint64_t header_len = 0;
  if (n >= 9) std::memcpy(&header_len, head, 8);
  std::error_code ec;
  const uintmax_t size = fs::file_size(path, ec);
  if (n >= 9 && head[8] == '{' && !ec && header_len > 1 && header_len <= size - 8) {
    return InvalidArgument(what +
                           "a safetensors file: give the Hugging Face model's directory (with "
                           "config.json) instead");
  }
  size_t i = 0;
  while (i < n && (head[i] == ' ' || head[i] == '\n' || head[i] == '\r' || head[i] == '\t')) ++i;
  if (i + 1 < n && head[i] == '{' &&
      (head[i + 1] == '"' || head[i + 1] == '}' || head[i + 1] == ' ' || head[i + 1] == '\n')) {
    return InvalidArgument(what +
                           "a JSON file, not a model: give a .gguf file, a llama2.c checkpoint "
                           "or a Hugging Face model's directory");
  }
  if (n >= 4 && std::memcmp(head, "PK\x03\x04", 4) == 0) {
    return InvalidArgument(what +
                           "a zip archive (a PyTorch checkpoint?), which is not supported: "
                           "convert it to safetensors or GGUF");
  }
  if (n >= 3 && head[0] == 0x80 && head[1] >= 2 && head[1] <= 5 && head[2] != 0) {
    return InvalidArgument(what +
                           "a Python pickle (a PyTorch checkpoint?), which is not supported: "
                           "convert it to safetensors or GGUF");
  }
  return Status::Ok();
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
  unsigned char head[16] = {};
  in.read(reinterpret_cast<char*>(head), sizeof(head));
  const size_t got = static_cast<size_t>(in.gcount());
  if (got >= 4 && std::memcmp(head, "GGUF", 4) == 0) return ModelFormat::kGguf;
  // A llama2.c checkpoint has no magic: anything else would be read as one and refused for a
  // nonsense header. Files often given by mistake are named instead.
  if (Status s = NotAModel(model_path, head, got); !s.ok()) return s;
  return ModelFormat::kLlama2c;
}

namespace {

Status NeedsTokenizerFile(const std::string& model_path) {
  return InvalidArgument("model '" + model_path +
                         "' is a llama2.c checkpoint, which needs a tokenizer file "
                         "(--tokenizer / \"tokenizer\")");
}

Status TooManyTokens(uint64_t tokens, const std::string& model_path, int64_t model_vocab) {
  return InvalidArgument("tokenizer has " + std::to_string(tokens) + " tokens but model '" +
                         model_path + "' has only " + std::to_string(model_vocab) +
                         " embedding rows");
}

// The tokenizer of a model: tokenizer_path when given, else the model's own `vocab`; refused
// when it has more tokens than the model's `model_vocab` embedding rows (0: unknown).
StatusOr<std::unique_ptr<Tokenizer>> ChooseTokenizer(const std::string& model_path,
                                                     ModelFormat format,
                                                     const std::string& tokenizer_path,
                                                     std::optional<VocabData> vocab,
                                                     int64_t model_vocab) {
  std::unique_ptr<Tokenizer> tok;
  if (!tokenizer_path.empty()) {
    ASSIGN_OR_RETURN(tok, LoadTokenizerFile(tokenizer_path, model_vocab));
  } else if (vocab) {
    // Checked before the tokenizer's tables are built from it.
    if (model_vocab > 0 && static_cast<int64_t>(vocab->tokens.size()) > model_vocab) {
      return TooManyTokens(vocab->tokens.size(), model_path, model_vocab);
    }
    // The vocabulary's own errors name its fields (VocabData.bos_id ...): say whose it is.
    auto made = CreateTokenizer(std::move(*vocab));
    if (!made.ok()) {
      return made.status().WithPrefix(
          "model '" + model_path + "': its tokenizer (" +
          (format == ModelFormat::kGguf ? "the GGUF tokenizer.ggml.* keys" : "tokenizer.json") +
          ")");
    }
    tok = std::move(*made);
  } else {
    return InvalidArgument("model '" + model_path + "' (" + ModelFormatName(format) +
                           ") carries no tokenizer; give one with --tokenizer / \"tokenizer\"");
  }
  if (model_vocab > 0 && tok->vocab_size() > model_vocab) {
    return TooManyTokens(tok->vocab_size(), model_path, model_vocab);
  }
  return tok;
}

StatusOr<ModelBundle> LoadBundle(const std::string& model_path, const std::string& tokenizer_path) {
  ModelBundle b;
  ASSIGN_OR_RETURN(b.format, DetectModelFormat(model_path));
  std::optional<VocabData> vocab;
  switch (b.format) {
    case ModelFormat::kLlama2c: {
      ASSIGN_OR_RETURN(b.model, LoadLlama2cModel(model_path));
      if (tokenizer_path.empty()) return NeedsTokenizerFile(model_path);
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
  ASSIGN_OR_RETURN(b.tokenizer, ChooseTokenizer(model_path, b.format, tokenizer_path,
                                                std::move(vocab), b.model->config.vocab_size));
  return b;
}

StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizerOnly(const std::string& model_path,
                                                       const std::string& tokenizer_path) {
  ASSIGN_OR_RETURN(ModelFormat format, DetectModelFormat(model_path));
  int64_t model_vocab = 0;  // embedding rows, where they can be read without the weights
  std::optional<VocabData> vocab;
  switch (format) {
    case ModelFormat::kLlama2c: {
      if (tokenizer_path.empty()) return NeedsTokenizerFile(model_path);
      std::ifstream in(model_path, std::ios::binary);
      int32_t h[7] = {};
      in.read(reinterpret_cast<char*>(h), sizeof(h));
      if (!in) return DataLoss(model_path + ": shorter than a llama2.c header");
      model_vocab = h[5] < 0 ? -static_cast<int64_t>(h[5]) : h[5];
      if (model_vocab <= 0 || model_vocab > (1 << 24)) {
        return InvalidArgument(model_path + ": llama2.c vocab_size " + std::to_string(model_vocab) +
                               " is out of range");
      }
      break;
    }
    case ModelFormat::kGguf: {
      ASSIGN_OR_RETURN(std::unique_ptr<gguf::GgufFile> file, gguf::GgufFile::Open(model_path));
      if (const gguf::GgufTensorInfo* t = file->FindTensor("token_embd.weight");
          t != nullptr && t->ne.size() == 2) {
        model_vocab = t->ne[1];
      }
      ASSIGN_OR_RETURN(vocab, ReadGgufVocab(*file));
      break;
    }
    case ModelFormat::kHuggingFace: {
      std::error_code ec;
      const fs::path json = fs::path(model_path) / "tokenizer.json";
      const fs::path config = fs::path(model_path) / "tokenizer_config.json";
      // Only the vocabulary size (the router loads no weights); unknown when config.json
      // cannot be read, which the generation servers' own loading reports.
      model_vocab = HfConfigVocabSize(model_path).value_or(0);
      if (tokenizer_path.empty() && fs::exists(json, ec)) {
        ASSIGN_OR_RETURN(
            vocab, LoadHfTokenizerJson(json.string(),
                                       fs::exists(config, ec) ? config.string() : std::string()));
      }
      break;
    }
  }
  return ChooseTokenizer(model_path, format, tokenizer_path, std::move(vocab), model_vocab);
}

Status OutOfMemory(const std::string& model_path) {
  return ResourceExhausted("model '" + model_path + "': out of host memory while loading");
}

}  // namespace

// The loaders check sizes before allocating from them; an allocation that fails all the same
// (a machine short of memory) is an error, not an abort.
StatusOr<ModelBundle> LoadModelBundle(const std::string& model_path,
                                      const std::string& tokenizer_path) {
  try {
    return LoadBundle(model_path, tokenizer_path);
  } catch (const std::bad_alloc&) {
    return OutOfMemory(model_path);
  }
}

StatusOr<std::unique_ptr<Tokenizer>> LoadModelTokenizer(const std::string& model_path,
                                                        const std::string& tokenizer_path) {
  try {
    return LoadTokenizerOnly(model_path, tokenizer_path);
  } catch (const std::bad_alloc&) {
    return OutOfMemory(model_path);
  }
}

}  // namespace helix
