#include "engine/model/gguf/gguf_loader.h"

#include <cmath>
#include <limits>
#include <new>
#include <sstream>
#include <utility>
#include <vector>

#include "engine/common/printable.h"
#include "engine/model/gguf/dequant.h"

namespace helix {
namespace {

using gguf::GgufFile;
using gguf::GgufTensorInfo;

// CreateTokenizer's limit: a larger vocabulary is refused before it is read.
constexpr uint64_t kMaxVocabTokens = uint64_t{1} << 24;

std::string ShapeString(const std::vector<int64_t>& ne) {
  std::string s = "[";
  for (size_t i = 0; i < ne.size(); ++i) s += (i > 0 ? ", " : "") + std::to_string(ne[i]);
  return s + "]";
}

// A tensor the model needs, with the shape it must have (innermost first) and where it goes.
struct Wanted {
  std::string name;
  std::vector<int64_t> ne;
  std::vector<float>* out;
};

// Checks presence, shape and type of `w` (nothing is allocated).
StatusOr<const GgufTensorInfo*> Check(const GgufFile& f, const Wanted& w) {
  const GgufTensorInfo* t = f.FindTensor(w.name);
  if (t == nullptr) {
    return InvalidArgument(f.path() + ": tensor '" + w.name + "' is missing (expected " +
                           ShapeString(w.ne) + ")");
  }
  if (t->ne != w.ne) {
    return InvalidArgument(f.path() + ": tensor '" + w.name + "' has shape " + t->ShapeString() +
                           ", expected " + ShapeString(w.ne));
  }
  if (!gguf::CanDequantize(t->type)) {
    return Unimplemented(f.path() + ": tensor '" + w.name + "' has ggml type " +
                         gguf::GgmlTypeName(t->type) +
                         ", which this build cannot dequantise (supported: F32, F16, BF16, "
                         "Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)");
  }
  return t;
}

// An integer hyper-parameter that must fit comfortably in int32 (ModelConfig::Validate checks
// the finer limits).
StatusOr<int64_t> GetDim(const GgufFile& f, const std::string& key) {
  ASSIGN_OR_RETURN(int64_t v, f.GetInt(key));
  if (v < 0 || v > std::numeric_limits<int32_t>::max()) {
    return InvalidArgument(f.path() + ": GGUF key '" + key + "' = " + std::to_string(v) +
                           " is out of range");
  }
  return v;
}

StatusOr<int64_t> GetDimOr(const GgufFile& f, const std::string& key, int64_t fallback) {
  if (f.FindKey(key) == nullptr) return fallback;
  return GetDim(f, key);
}

StatusOr<int32_t> GetTokenId(const GgufFile& f, const std::string& key) {
  if (f.FindKey(key) == nullptr) return -1;
  ASSIGN_OR_RETURN(int64_t v, f.GetInt(key));
  if (v < -1 || v > std::numeric_limits<int32_t>::max()) {
    return InvalidArgument(f.path() + ": GGUF key '" + key + "' = " + std::to_string(v) +
                           " is not a token id");
  }
  return static_cast<int32_t>(v);
}

Status ReadConfig(const GgufFile& f, const std::string& arch, ModelConfig* c) {
  const std::string& path = f.path();
  const std::string p = arch + ".";
  c->architecture = arch;
  ASSIGN_OR_RETURN(c->n_layers, GetDim(f, p + "block_count"));
  ASSIGN_OR_RETURN(c->dim, GetDim(f, p + "embedding_length"));
  ASSIGN_OR_RETURN(c->hidden_dim, GetDim(f, p + "feed_forward_length"));
  ASSIGN_OR_RETURN(c->n_heads, GetDim(f, p + "attention.head_count"));
  ASSIGN_OR_RETURN(c->n_kv_heads, GetDimOr(f, p + "attention.head_count_kv", c->n_heads));
  ASSIGN_OR_RETURN(c->max_seq_len, GetDim(f, p + "context_length"));
  if (c->n_heads == 0) return InvalidArgument(path + ": " + p + "attention.head_count is 0");
  ASSIGN_OR_RETURN(int64_t key_len, GetDimOr(f, p + "attention.key_length", c->dim / c->n_heads));
  ASSIGN_OR_RETURN(int64_t value_len, GetDimOr(f, p + "attention.value_length", key_len));
  if (key_len != value_len) {
    return Unimplemented(path + ": attention.key_length " + std::to_string(key_len) +
                         " differs from attention.value_length " + std::to_string(value_len));
  }
  c->head_dim = key_len;
  if (f.FindKey(p + "attention.key_length") == nullptr && c->dim % c->n_heads != 0) {
    return InvalidArgument(path + ": embedding_length " + std::to_string(c->dim) +
                           " is not a multiple of head_count " + std::to_string(c->n_heads));
  }
  ASSIGN_OR_RETURN(int64_t rot, GetDimOr(f, p + "rope.dimension_count", c->head_dim));
  if (rot != c->head_dim) {
    return Unimplemented(path + ": rope.dimension_count " + std::to_string(rot) +
                         " is not the head dimension " + std::to_string(c->head_dim) +
                         " (partial rotary embeddings are not supported)");
  }
  double theta = 10000.0;
  if (f.FindKey(p + "rope.freq_base") != nullptr) {
    ASSIGN_OR_RETURN(theta, f.GetFloat(p + "rope.freq_base"));
  }
  // The RoPE base: every frequency is a power of it, so 1 or less rotates nothing (yarn's
  // correction then divides by log 1 = 0).
  if (!(theta > 1) || !std::isfinite(theta)) {
    return InvalidArgument(path + ": " + p +
                           "rope.freq_base = " + (std::ostringstream() << theta).str() +
                           ": expected a finite value above 1");
  }
  c->rope_theta = static_cast<float>(theta);
  ASSIGN_OR_RETURN(double eps, f.GetFloat(p + "attention.layer_norm_rms_epsilon"));
  if (!(eps > 0 && eps < 1)) {
    return InvalidArgument(path + ": attention.layer_norm_rms_epsilon = " + std::to_string(eps) +
                           ": expected a small positive value");
  }
  c->norm_eps = static_cast<float>(eps);
  if (f.FindKey(p + "rope.scaling.type") != nullptr) {
    ASSIGN_OR_RETURN(std::string scaling, f.GetString(p + "rope.scaling.type"));
    if (scaling != "none") {
      return Unimplemented(path + ": RoPE scaling '" + Printable(scaling) + "' is not supported");
    }
  }
  if (f.FindKey(p + "expert_count") != nullptr) {
    ASSIGN_OR_RETURN(int64_t experts, f.GetInt(p + "expert_count"));
    if (experts > 0) {
      return Unimplemented(path + ": mixture-of-experts models (" + p + "expert_count " +
                           std::to_string(experts) + ") are not supported");
    }
  }
  if (f.FindTensor("rope_freqs.weight") != nullptr) {
    return Unimplemented(path +
                         ": tensor 'rope_freqs.weight' (Llama 3.1-style RoPE frequency factors) "
                         "is not supported");
  }
  c->rope_style = arch == "qwen2" ? kernels::RopeStyle::kHalf : kernels::RopeStyle::kInterleaved;

  const GgufTensorInfo* embd = f.FindTensor("token_embd.weight");
  if (embd == nullptr) return InvalidArgument(path + ": tensor 'token_embd.weight' is missing");
  if (embd->ne.size() != 2 || embd->ne[0] != c->dim) {
    return InvalidArgument(path + ": tensor 'token_embd.weight' has shape " + embd->ShapeString() +
                           ", expected [" + std::to_string(c->dim) + ", vocab]");
  }
  c->vocab_size = embd->ne[1];
  if (f.FindKey(p + "vocab_size") != nullptr) {
    ASSIGN_OR_RETURN(int64_t v, GetDim(f, p + "vocab_size"));
    if (v != c->vocab_size) {
      return InvalidArgument(path + ": " + p + "vocab_size = " + std::to_string(v) +
                             " but token_embd.weight has " + std::to_string(c->vocab_size) +
                             " rows");
    }
  }
  c->tied_embeddings = f.FindTensor("output.weight") == nullptr;
  // qwen2 always has q/k/v biases; a llama-architecture file may carry them too.
  c->qkv_bias = arch == "qwen2" || f.FindTensor("blk.0.attn_q.bias") != nullptr;
  return c->Validate().WithPrefix(path);
}

}  // namespace

namespace {

StatusOr<std::optional<VocabData>> ReadVocab(const GgufFile& f) {
  if (f.FindKey("tokenizer.ggml.model") == nullptr) return std::optional<VocabData>();
  VocabData v;
  ASSIGN_OR_RETURN(v.model, f.GetString("tokenizer.ggml.model"));
  if (f.FindKey("tokenizer.ggml.pre") != nullptr) {
    ASSIGN_OR_RETURN(v.pre, f.GetString("tokenizer.ggml.pre"));
  }
  // The per-token arrays' counts are compared with the token count before any of them is
  // read: one claiming billions of elements would otherwise be allocated first.
  const gguf::GgufKv* tokens = f.FindKey("tokenizer.ggml.tokens");
  const uint64_t n = tokens != nullptr ? tokens->array_count : 0;
  auto count_matches = [&](const char* key) -> Status {
    const gguf::GgufKv* kv = f.FindKey(key);
    if (kv == nullptr || kv->type != gguf::GgufValueType::kArray ||
        tokens->type != gguf::GgufValueType::kArray || kv->array_count == n) {
      return Status::Ok();  // a wrong type is named when the array is read
    }
    return InvalidArgument(f.path() + ": GGUF key '" + key + "' has " +
                           std::to_string(kv->array_count) +
                           " entries but tokenizer.ggml.tokens has " + std::to_string(n));
  };
  if (tokens != nullptr) {
    RETURN_IF_ERROR(count_matches("tokenizer.ggml.scores"));
    RETURN_IF_ERROR(count_matches("tokenizer.ggml.token_type"));
  }
  ASSIGN_OR_RETURN(v.tokens, f.GetStringArray("tokenizer.ggml.tokens", kMaxVocabTokens));
  if (f.FindKey("tokenizer.ggml.scores") != nullptr) {
    ASSIGN_OR_RETURN(v.scores, f.GetFloatArray("tokenizer.ggml.scores", n));
  }
  if (f.FindKey("tokenizer.ggml.token_type") != nullptr) {
    ASSIGN_OR_RETURN(std::vector<int64_t> types, f.GetIntArray("tokenizer.ggml.token_type", n));
    v.token_types.reserve(n);
    for (int64_t t : types) {
      if (t < std::numeric_limits<int32_t>::min() || t > std::numeric_limits<int32_t>::max()) {
        return InvalidArgument(f.path() + ": tokenizer.ggml.token_type holds " + std::to_string(t) +
                               ", not a token type");
      }
      v.token_types.push_back(static_cast<int32_t>(t));
    }
  }
  if (f.FindKey("tokenizer.ggml.merges") != nullptr) {
    ASSIGN_OR_RETURN(v.merges, f.GetStringArray("tokenizer.ggml.merges"));
  }
  ASSIGN_OR_RETURN(v.bos_id, GetTokenId(f, "tokenizer.ggml.bos_token_id"));
  ASSIGN_OR_RETURN(v.eos_id, GetTokenId(f, "tokenizer.ggml.eos_token_id"));
  ASSIGN_OR_RETURN(v.eot_id, GetTokenId(f, "tokenizer.ggml.eot_token_id"));
  ASSIGN_OR_RETURN(v.unk_id, GetTokenId(f, "tokenizer.ggml.unknown_token_id"));
  ASSIGN_OR_RETURN(v.pad_id, GetTokenId(f, "tokenizer.ggml.padding_token_id"));
  if (v.model == "gpt2") {
    v.add_space_prefix = false;
    v.add_bos =
        v.pre == "llama3" || v.pre == "llama-v3" || v.pre == "llama-bpe" || v.pre == "falcon3";
  }
  if (f.FindKey("tokenizer.ggml.add_bos_token") != nullptr) {
    ASSIGN_OR_RETURN(v.add_bos, f.GetBool("tokenizer.ggml.add_bos_token"));
  }
  if (f.FindKey("tokenizer.ggml.add_space_prefix") != nullptr) {
    ASSIGN_OR_RETURN(v.add_space_prefix, f.GetBool("tokenizer.ggml.add_space_prefix"));
  }
  if (f.FindKey("tokenizer.chat_template") != nullptr) {
    ASSIGN_OR_RETURN(v.chat_template, f.GetString("tokenizer.chat_template"));
  }
  return std::optional<VocabData>(std::move(v));
}

}  // namespace

StatusOr<std::optional<VocabData>> ReadGgufVocab(const GgufFile& f) {
  try {
    return ReadVocab(f);
  } catch (const std::bad_alloc&) {
    return ResourceExhausted(f.path() + ": out of host memory while reading the vocabulary");
  }
}

StatusOr<GgufModel> LoadGgufModel(const std::string& path) {
  ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> file, GgufFile::Open(path));
  const GgufFile& f = *file;
  ASSIGN_OR_RETURN(std::string arch, f.GetString("general.architecture"));
  if (arch != "llama" && arch != "qwen2") {
    return Unimplemented(path + ": GGUF architecture '" + Printable(arch) +
                         "' is not supported (supported: llama, qwen2)");
  }
  GgufModel result;
  result.model = std::make_unique<LoadedModel>();
  ModelConfig& c = result.model->config;
  RETURN_IF_ERROR(ReadConfig(f, arch, &c));

  // Everything the model needs, checked before any of it is allocated.
  ModelWeights& w = result.model->weights;
  const int64_t D = c.dim, F = c.hidden_dim, V = c.vocab_size;
  const int64_t qd = c.n_heads * c.head_dim, kvd = c.n_kv_heads * c.head_dim;
  std::vector<Wanted> wanted;
  wanted.push_back({"token_embd.weight", {D, V}, &w.token_embedding});
  w.layers.resize(c.n_layers);
  for (int64_t l = 0; l < c.n_layers; ++l) {
    LayerWeights& lw = w.layers[l];
    const std::string b = "blk." + std::to_string(l) + ".";
    wanted.push_back({b + "attn_norm.weight", {D}, &lw.attn_norm});
    wanted.push_back({b + "attn_q.weight", {D, qd}, &lw.wq.f32});
    wanted.push_back({b + "attn_k.weight", {D, kvd}, &lw.wk.f32});
    wanted.push_back({b + "attn_v.weight", {D, kvd}, &lw.wv.f32});
    if (c.qkv_bias) {
      wanted.push_back({b + "attn_q.bias", {qd}, &lw.bq});
      wanted.push_back({b + "attn_k.bias", {kvd}, &lw.bk});
      wanted.push_back({b + "attn_v.bias", {kvd}, &lw.bv});
    }
    if (f.FindTensor(b + "attn_output.bias") != nullptr) {
      return Unimplemented(path + ": tensor '" + b +
                           "attn_output.bias' (an output-projection bias) is not supported");
    }
    wanted.push_back({b + "attn_output.weight", {qd, D}, &lw.wo.f32});
    wanted.push_back({b + "ffn_norm.weight", {D}, &lw.ffn_norm});
    wanted.push_back({b + "ffn_gate.weight", {D, F}, &lw.w1.f32});
    wanted.push_back({b + "ffn_down.weight", {F, D}, &lw.w2.f32});
    wanted.push_back({b + "ffn_up.weight", {D, F}, &lw.w3.f32});
  }
  // A tensor of a layer at or past block_count: the header describes fewer layers than the
  // file holds, and the extra ones would be silently dropped.
  for (const gguf::GgufTensorInfo& t : f.tensors()) {
    if (t.name.rfind("blk.", 0) != 0) continue;
    const size_t end = t.name.find('.', 4);
    const std::string index = t.name.substr(4, end == std::string::npos ? end : end - 4);
    if (index.empty() || index.size() > 9 ||
        index.find_first_not_of("0123456789") != std::string::npos) {
      continue;
    }
    if (std::stoll(index) >= c.n_layers) {
      return InvalidArgument(path + ": tensor '" + Printable(t.name) + "' belongs to layer " +
                             index + ", but the metadata's " + arch + ".block_count is " +
                             std::to_string(c.n_layers));
    }
  }
  wanted.push_back({"output_norm.weight", {D}, &w.final_norm});
  if (!c.tied_embeddings) wanted.push_back({"output.weight", {D, V}, &w.classifier.f32});

  ASSIGN_OR_RETURN(result.vocab, ReadGgufVocab(f));
  std::vector<const GgufTensorInfo*> infos;
  infos.reserve(wanted.size());
  StoredPrecision precision;
  for (const Wanted& x : wanted) {
    ASSIGN_OR_RETURN(const GgufTensorInfo* t, Check(f, x));
    infos.push_back(t);
    if (t->ne.size() == 2) {
      const auto type = static_cast<gguf::GgmlType>(t->type);
      precision.Add(type == gguf::GgmlType::kF32 ? 32 : type == gguf::GgmlType::kF16 ? 16 : 0);
    }
  }
  result.model->stored_dtype = precision.Resolve();
  uint64_t f32_bytes = 0;
  for (const GgufTensorInfo* t : infos) {
    const uint64_t n = static_cast<uint64_t>(t->num_elements) * sizeof(float);
    f32_bytes = n > UINT64_MAX - f32_bytes ? UINT64_MAX : f32_bytes + n;
  }
  RETURN_IF_ERROR(CheckHostMemoryFor(f32_bytes, path));
  for (size_t i = 0; i < wanted.size(); ++i) {
    const GgufTensorInfo& t = *infos[i];
    try {
      wanted[i].out->resize(static_cast<size_t>(t.num_elements));
    } catch (const std::bad_alloc&) {
      return ResourceExhausted(path + ": cannot allocate " +
                               std::to_string(t.num_elements * sizeof(float)) +
                               " bytes of host memory for tensor '" + t.name + "'");
    }
    RETURN_IF_ERROR(gguf::Dequantize(t.type, f.TensorData(t), t.num_elements, wanted[i].out->data(),
                                     path + ": tensor '" + t.name + "'"));
  }
  return result;
}

}  // namespace helix
