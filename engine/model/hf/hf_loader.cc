#include "engine/model/hf/hf_loader.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <new>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <utility>
#include <vector>

#include "engine/common/json_nesting.h"
#include "engine/common/printable.h"
#include "engine/model/hf/safetensors.h"

namespace helix {
namespace {

namespace fs = std::filesystem;
using hf::SafetensorsFile;
using hf::SafetensorsTensor;
using nlohmann::json;

// config.json and the shard index are small; anything far larger is not one of them.
constexpr uintmax_t kMaxJsonBytes = 64 << 20;

StatusOr<json> ReadJson(const std::string& path) {
  std::error_code ec;
  const fs::file_status status = fs::status(path, ec);
  if (status.type() == fs::file_type::not_found) return NotFound("cannot open '" + path + "'");
  if (!ec && !fs::is_regular_file(status)) {  // a FIFO would block the read
    return InvalidArgument("'" + path + "' is not a regular file");
  }
  const uintmax_t size = fs::file_size(path, ec);
  if (ec) return NotFound("cannot open '" + path + "': " + ec.message());
  if (size > kMaxJsonBytes) {
    return InvalidArgument(path + ": " + std::to_string(size) +
                           " bytes is too large for a JSON "
                           "configuration file");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFound("cannot open '" + path + "'");
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  RETURN_IF_ERROR(CheckJsonFileShape(text, path));
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return InvalidArgument(path + ": not valid JSON");
  if (!j.is_object()) return InvalidArgument(path + ": expected a JSON object at the top level");
  return j;
}

// Typed access to config.json fields; errors name the file and the field.
class Config {
 public:
  Config(const json& j, std::string path) : j_(j), path_(std::move(path)) {}

  bool Has(const char* key) const { return j_.contains(key) && !j_[key].is_null(); }

  StatusOr<int64_t> Int(const char* key) const {
    if (!Has(key)) return InvalidArgument(path_ + ": field '" + key + "' is missing");
    const json& v = j_[key];
    if (!v.is_number_integer()) return Wrong(key, "an integer");
    // An unsigned value past INT64_MAX would read as a negative int64: test it unsigned.
    const bool in_range =
        v.is_number_unsigned()
            ? v.get<uint64_t>() <= std::numeric_limits<int32_t>::max()
            : v.get<int64_t>() >= 0 && v.get<int64_t>() <= std::numeric_limits<int32_t>::max();
    if (!in_range) {
      return InvalidArgument(path_ + ": field '" + key + "' = " + v.dump() + " is out of range");
    }
    return v.get<int64_t>();
  }
  StatusOr<int64_t> IntOr(const char* key, int64_t fallback) const {
    if (!Has(key)) return fallback;
    return Int(key);
  }
  StatusOr<double> Number(const char* key) const {
    if (!Has(key)) return InvalidArgument(path_ + ": field '" + key + "' is missing");
    if (!j_[key].is_number()) return Wrong(key, "a number");
    return j_[key].get<double>();
  }
  StatusOr<double> NumberOr(const char* key, double fallback) const {
    if (!Has(key)) return fallback;
    return Number(key);
  }
  StatusOr<bool> BoolOr(const char* key, bool fallback) const {
    if (!Has(key)) return fallback;
    if (!j_[key].is_boolean()) return Wrong(key, "true or false");
    return j_[key].get<bool>();
  }
  StatusOr<std::string> StringOr(const char* key, std::string fallback) const {
    if (!Has(key)) return fallback;
    if (!j_[key].is_string()) return Wrong(key, "a string");
    return j_[key].get<std::string>();
  }
  const json& raw(const char* key) const { return j_[key]; }
  const std::string& path() const { return path_; }

 private:
  Status Wrong(const char* key, const char* expected) const {
    return InvalidArgument(path_ + ": field '" + key + "' = " + Printable(j_[key].dump()) +
                           ": expected " + expected);
  }

  const json& j_;
  std::string path_;
};

// The fields every supported architecture reads alike: shapes, context, rope_theta, the RMSNorm
// eps (required unless eps_default is given), tied embeddings and the silu activation.
Status ReadSharedFields(const Config& j, std::optional<double> eps_default, ModelConfig* c) {
  const std::string& path = j.path();
  ASSIGN_OR_RETURN(c->dim, j.Int("hidden_size"));
  ASSIGN_OR_RETURN(c->hidden_dim, j.Int("intermediate_size"));
  ASSIGN_OR_RETURN(c->n_layers, j.Int("num_hidden_layers"));
  ASSIGN_OR_RETURN(c->n_heads, j.Int("num_attention_heads"));
  ASSIGN_OR_RETURN(c->vocab_size, j.Int("vocab_size"));
  ASSIGN_OR_RETURN(c->max_seq_len, j.Int("max_position_embeddings"));
  ASSIGN_OR_RETURN(double theta, j.NumberOr("rope_theta", 10000.0));
  // The RoPE base: every frequency is a power of it, so 1 or less rotates nothing (yarn's
  // correction then divides by log 1 = 0).
  if (!(theta > 1) || !std::isfinite(theta)) {
    return InvalidArgument(path +
                           ": field 'rope_theta' = " + (std::ostringstream() << theta).str() +
                           ": expected a finite value above 1");
  }
  c->rope_theta = static_cast<float>(theta);
  ASSIGN_OR_RETURN(double eps, eps_default ? j.NumberOr("rms_norm_eps", *eps_default)
                                           : j.Number("rms_norm_eps"));
  if (!(eps > 0 && eps < 1)) {
    return InvalidArgument(path + ": field 'rms_norm_eps' = " + std::to_string(eps) +
                           ": expected a small positive value");
  }
  c->norm_eps = static_cast<float>(eps);
  ASSIGN_OR_RETURN(c->tied_embeddings, j.BoolOr("tie_word_embeddings", false));
  ASSIGN_OR_RETURN(std::string act, j.StringOr("hidden_act", "silu"));
  if (act != "silu") {
    return Unimplemented(path + ": hidden_act '" + Printable(act) +
                         "' is not supported (only silu)");
  }
  return Status::Ok();
}

// rope_scaling's "rope_type" (or the older "type"), "?" when neither is a string.
std::string RopeScalingType(const json& rs) {
  std::string type = "?";
  if (rs.is_object()) {
    for (const char* k : {"rope_type", "type"}) {
      if (rs.contains(k) && rs[k].is_string()) type = rs[k].get<std::string>();
    }
  }
  return type;
}

// DeepSeek V2/V3: MLA attention, yarn RoPE, MoE. Fields and defaults as their config classes.
Status ReadDeepseekConfig(const Config& j, ModelConfig* c) {
  const std::string& path = j.path();
  const bool v3 = c->architecture == "deepseek_v3";
  c->attention = AttentionKind::kMla;
  RETURN_IF_ERROR(ReadSharedFields(j, 1e-6, c));
  ASSIGN_OR_RETURN(c->q_lora_rank, j.IntOr("q_lora_rank", 0));  // null: no q compression
  ASSIGN_OR_RETURN(c->kv_lora_rank, j.Int("kv_lora_rank"));
  ASSIGN_OR_RETURN(c->qk_nope_head_dim, j.Int("qk_nope_head_dim"));
  ASSIGN_OR_RETURN(c->qk_rope_head_dim, j.Int("qk_rope_head_dim"));
  ASSIGN_OR_RETURN(c->v_head_dim, j.Int("v_head_dim"));
  c->n_kv_heads = 1;
  c->head_dim = c->kv_lora_rank + c->qk_rope_head_dim;
  // DeepSeek rotates pairs (x[2i], x[2i+1]) of q_pe and k_pe: its code de-interleaves them
  // before rotate_half, the same permutation for q and k, so scores equal interleaved RoPE.
  c->rope_style = kernels::RopeStyle::kInterleaved;
  ASSIGN_OR_RETURN(bool interleave, j.BoolOr("rope_interleave", true));
  if (!interleave) {
    return Unimplemented(path + ": rope_interleave false is not supported for DeepSeek");
  }
  ASSIGN_OR_RETURN(bool attention_bias, j.BoolOr("attention_bias", false));
  if (attention_bias) return Unimplemented(path + ": attention_bias is not supported");
  if (j.Has("rope_scaling")) {
    const json& rs = j.raw("rope_scaling");
    if (!rs.is_object()) return InvalidArgument(path + ": rope_scaling must be an object");
    Config r(rs, path + ": rope_scaling");
    const std::string type = RopeScalingType(rs);
    if (type == "yarn") {
      YarnScaling& y = c->yarn;
      y.enabled = true;
      ASSIGN_OR_RETURN(y.factor, r.Number("factor"));
      ASSIGN_OR_RETURN(y.original_max_position_embeddings,
                       r.Int("original_max_position_embeddings"));
      ASSIGN_OR_RETURN(y.beta_fast, r.NumberOr("beta_fast", 32.0));
      ASSIGN_OR_RETURN(y.beta_slow, r.NumberOr("beta_slow", 1.0));
      ASSIGN_OR_RETURN(y.mscale, r.NumberOr("mscale", 1.0));
      ASSIGN_OR_RETURN(y.mscale_all_dim, r.NumberOr("mscale_all_dim", 0.0));
    } else if (type != "default") {
      return Unimplemented(path + ": rope_scaling " + Printable(rs.dump()) +
                           " is not supported (DeepSeek: yarn or none)");
    }
  }
  ASSIGN_OR_RETURN(c->n_routed_experts, j.IntOr("n_routed_experts", 0));
  if (c->n_routed_experts > 0) {
    ASSIGN_OR_RETURN(c->n_shared_experts, j.IntOr("n_shared_experts", 0));
    ASSIGN_OR_RETURN(c->experts_per_token, j.Int("num_experts_per_tok"));
    ASSIGN_OR_RETURN(c->moe_hidden_dim, j.Int("moe_intermediate_size"));
    ASSIGN_OR_RETURN(c->first_k_dense_replace, j.IntOr("first_k_dense_replace", 0));
    ASSIGN_OR_RETURN(c->moe_layer_freq, j.IntOr("moe_layer_freq", 1));
    ASSIGN_OR_RETURN(std::string topk, j.StringOr("topk_method", v3 ? "noaux_tc" : "greedy"));
    if (topk == "greedy") {
      c->topk_method = TopkMethod::kGreedy;
    } else if (topk == "group_limited_greedy") {
      c->topk_method = TopkMethod::kGroupLimitedGreedy;
    } else if (topk == "noaux_tc") {
      c->topk_method = TopkMethod::kNoauxTc;
    } else {
      return Unimplemented(path + ": topk_method '" + Printable(topk) +
                           "' is not supported (greedy, group_limited_greedy, noaux_tc)");
    }
    ASSIGN_OR_RETURN(std::string scoring, j.StringOr("scoring_func", v3 ? "sigmoid" : "softmax"));
    if (scoring == "softmax") {
      c->scoring = ScoringFunc::kSoftmax;
    } else if (scoring == "sigmoid") {
      c->scoring = ScoringFunc::kSigmoid;
    } else {
      return Unimplemented(path + ": scoring_func '" + Printable(scoring) +
                           "' is not supported (softmax, sigmoid)");
    }
    ASSIGN_OR_RETURN(c->n_group, j.IntOr("n_group", 1));
    ASSIGN_OR_RETURN(c->topk_group, j.IntOr("topk_group", 1));
    ASSIGN_OR_RETURN(c->norm_topk_prob, j.BoolOr("norm_topk_prob", false));
    ASSIGN_OR_RETURN(c->routed_scaling_factor, j.NumberOr("routed_scaling_factor", 1.0));
    c->scale_after_norm = v3;
  }
  return c->Validate().WithPrefix(path);
}

Status ReadConfig(const Config& j, ModelConfig* c) {
  const std::string& path = j.path();
  if (!j.Has("architectures") || !j.raw("architectures").is_array() ||
      j.raw("architectures").empty() || !j.raw("architectures")[0].is_string()) {
    return InvalidArgument(path +
                           ": field 'architectures' is missing (expected e.g. "
                           "[\"LlamaForCausalLM\"])");
  }
  const std::string arch = j.raw("architectures")[0].get<std::string>();
  if (arch == "LlamaForCausalLM") {
    c->architecture = "llama";
  } else if (arch == "Qwen2ForCausalLM") {
    c->architecture = "qwen2";
  } else if (arch == "DeepseekV2ForCausalLM" || arch == "DeepseekV3ForCausalLM") {
    c->architecture = arch == "DeepseekV2ForCausalLM" ? "deepseek_v2" : "deepseek_v3";
    return ReadDeepseekConfig(j, c);
  } else {
    return Unimplemented(path + ": architecture '" + Printable(arch) +
                         "' is not supported (supported: LlamaForCausalLM, Qwen2ForCausalLM, "
                         "DeepseekV2ForCausalLM, DeepseekV3ForCausalLM)");
  }
  const bool qwen2 = c->architecture == "qwen2";
  RETURN_IF_ERROR(ReadSharedFields(j, std::nullopt, c));
  ASSIGN_OR_RETURN(c->n_kv_heads, j.IntOr("num_key_value_heads", c->n_heads));
  if (c->n_heads == 0) return InvalidArgument(path + ": field 'num_attention_heads' is 0");
  if (!j.Has("head_dim") && c->dim % c->n_heads != 0) {
    return InvalidArgument(path + ": hidden_size " + std::to_string(c->dim) +
                           " is not a multiple of num_attention_heads " +
                           std::to_string(c->n_heads));
  }
  ASSIGN_OR_RETURN(c->head_dim, j.IntOr("head_dim", c->dim / c->n_heads));
  c->rope_style = kernels::RopeStyle::kHalf;
  if (j.Has("rope_scaling")) {
    const json& rs = j.raw("rope_scaling");
    if (RopeScalingType(rs) != "default") {
      return Unimplemented(path + ": rope_scaling " + Printable(rs.dump()) + " is not supported");
    }
  }
  if (j.Has("partial_rotary_factor")) {
    ASSIGN_OR_RETURN(double prf, j.Number("partial_rotary_factor"));
    if (prf != 1.0) {
      return Unimplemented(path + ": partial_rotary_factor " + std::to_string(prf) +
                           " is not supported");
    }
  }
  ASSIGN_OR_RETURN(bool sliding, j.BoolOr("use_sliding_window", false));
  if (sliding) return Unimplemented(path + ": sliding-window attention is not supported");
  ASSIGN_OR_RETURN(bool mlp_bias, j.BoolOr("mlp_bias", false));
  if (mlp_bias) return Unimplemented(path + ": mlp_bias is not supported");
  // Llama's attention_bias puts biases on q, k, v and o; Qwen2 has them on q, k, v only.
  ASSIGN_OR_RETURN(bool attention_bias, j.BoolOr("attention_bias", false));
  if (!qwen2 && attention_bias) {
    return Unimplemented(path +
                         ": attention_bias (which includes an o_proj bias) is not "
                         "supported for LlamaForCausalLM");
  }
  c->qkv_bias = qwen2;
  return c->Validate().WithPrefix(path);
}

// Where each tensor of the model lives: one file, or the shards an index names.
class TensorSource {
 public:
  size_t count() const { return where_.size(); }
  Status Open(const std::string& dir) {
    const std::string single = (fs::path(dir) / "model.safetensors").string();
    const std::string index = (fs::path(dir) / "model.safetensors.index.json").string();
    std::error_code ec;
    if (fs::exists(single, ec)) {
      ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> f, SafetensorsFile::Open(single));
      for (const SafetensorsTensor& t : f->tensors()) where_[t.name] = {f.get(), &t};
      files_.push_back(std::move(f));
      return Status::Ok();
    }
    if (!fs::exists(index, ec)) {
      std::string hint;
      if (fs::exists(fs::path(dir) / "pytorch_model.bin", ec)) {
        hint = " (pytorch_model.bin is not supported: convert it to safetensors)";
      }
      return NotFound(dir + ": no model.safetensors or model.safetensors.index.json" + hint);
    }
    ASSIGN_OR_RETURN(json j, ReadJson(index));
    if (!j.contains("weight_map") || !j["weight_map"].is_object()) {
      return InvalidArgument(index + ": field 'weight_map' is missing or not an object");
    }
    std::map<std::string, SafetensorsFile*> shards;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it.value().is_string()) {
        return InvalidArgument(index + ": weight_map entry '" + Printable(it.key()) +
                               "' is not a file name");
      }
      const std::string shard = it.value().get<std::string>();
      if (shard.empty() || shard.find('/') != std::string::npos || shard == "." || shard == "..") {
        return InvalidArgument(index + ": weight_map entry '" + Printable(it.key()) + "' names '" +
                               Printable(shard) + "', not a file in the model directory");
      }
      auto [pos, added] = shards.emplace(shard, nullptr);
      if (added) {
        ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> f,
                         SafetensorsFile::Open((fs::path(dir) / shard).string()));
        pos->second = f.get();
        files_.push_back(std::move(f));
      }
      const SafetensorsTensor* t = pos->second->Find(it.key());
      if (t == nullptr) {
        return DataLoss(index + ": tensor '" + Printable(it.key()) + "' is mapped to " +
                        Printable(shard) + ", which does not contain it");
      }
      where_[it.key()] = {pos->second, t};
    }
    return Status::Ok();
  }

  bool Has(const std::string& name) const { return where_.count(name) > 0; }

  // A tensor of a layer at or past n_layers (model.layers.N.*): the config describes fewer
  // layers than the checkpoint holds, and the extra ones would be silently dropped.
  Status CheckNoLayerBeyond(int64_t n_layers, const std::string& config_path) const {
    static const std::string kPrefix = "model.layers.";
    for (const auto& [name, where] : where_) {
      if (name.rfind(kPrefix, 0) != 0) continue;
      const size_t end = name.find('.', kPrefix.size());
      const std::string index = name.substr(kPrefix.size(), end - kPrefix.size());
      if (index.empty() || index.size() > 9 ||
          index.find_first_not_of("0123456789") != std::string::npos) {
        continue;
      }
      if (std::stoll(index) >= n_layers) {
        return InvalidArgument(where.first->path() + ": tensor '" + name + "' belongs to layer " +
                               index + ", but " + config_path + " describes " +
                               std::to_string(n_layers) +
                               " (num_hidden_layers, plus num_nextn_predict_layers)");
      }
    }
    return Status::Ok();
  }

  // Checks name's shape against `shape` (nothing is read).
  Status Check(const std::string& dir, const std::string& name,
               const std::vector<int64_t>& shape) const {
    auto it = where_.find(name);
    if (it == where_.end()) return InvalidArgument(dir + ": tensor '" + name + "' is missing");
    const SafetensorsTensor& t = *it->second.second;
    if (t.shape != shape) {
      SafetensorsTensor want;
      want.shape = shape;
      return InvalidArgument(it->second.first->path() + ": tensor '" + name + "' has shape " +
                             t.ShapeString() + ", expected " + want.ShapeString());
    }
    if (t.dtype != "F32" && t.dtype != "F16" && t.dtype != "BF16") {
      return Unimplemented(it->second.first->path() + ": tensor '" + name + "' has dtype " +
                           t.dtype + " (supported: F32, F16, BF16)");
    }
    return Status::Ok();
  }

  // REQUIRES: Check(name, ...) passed.
  const std::string& Dtype(const std::string& name) const { return where_.at(name).second->dtype; }

  // REQUIRES: Check(name, ...) passed.
  Status Read(const std::string& name, std::vector<float>* out) const {
    const auto& [file, t] = where_.at(name);
    try {
      out->resize(static_cast<size_t>(t->num_elements));
    } catch (const std::bad_alloc&) {
      return ResourceExhausted(file->path() + ": cannot allocate " +
                               std::to_string(t->num_elements * sizeof(float)) +
                               " bytes of host memory for tensor '" + name + "'");
    }
    return file->ReadFloat(*t, out->data());
  }

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, std::pair<const SafetensorsFile*, const SafetensorsTensor*>> where_;
};

}  // namespace

std::optional<int64_t> HfConfigVocabSize(const std::string& dir) {
  StatusOr<json> j = ReadJson((fs::path(dir) / "config.json").string());
  if (!j.ok() || !j->contains("vocab_size") || !(*j)["vocab_size"].is_number_integer()) {
    return std::nullopt;
  }
  return (*j)["vocab_size"].get<int64_t>();
}

StatusOr<HfModel> LoadHfModel(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return NotFound("'" + dir + "' is not a directory");
  const std::string config_path = (fs::path(dir) / "config.json").string();
  ASSIGN_OR_RETURN(json config_json, ReadJson(config_path));
  HfModel result;
  result.model = std::make_unique<LoadedModel>();
  ModelConfig& c = result.model->config;
  RETURN_IF_ERROR(ReadConfig(Config(config_json, config_path), &c));

  TensorSource src;
  RETURN_IF_ERROR(src.Open(dir));
  {
    // DeepSeek V3 checkpoints keep their multi-token-prediction layers after the model's own
    // (model.layers.61 of 61): present, and not used here.
    int64_t extra = 0;
    const auto mtp = config_json.find("num_nextn_predict_layers");
    if (mtp != config_json.end() && mtp->is_number_integer()) {
      extra = std::clamp<int64_t>(mtp->get<int64_t>(), 0, 64);
    }
    RETURN_IF_ERROR(src.CheckNoLayerBeyond(c.n_layers + extra, config_path));
  }
  if (!c.tied_embeddings && !src.Has("lm_head.weight")) {
    // A config that says outright that the output projection is its own tensor must have it;
    // one that does not say ties it to the embeddings (HF would start it from random weights).
    const auto tie = config_json.find("tie_word_embeddings");
    if (tie != config_json.end() && tie->is_boolean() && !tie->get<bool>()) {
      return InvalidArgument(dir + ": tensor 'lm_head.weight' is missing, and " + config_path +
                             " has tie_word_embeddings false");
    }
    c.tied_embeddings = true;
  }

  struct Wanted {
    std::string name;
    std::vector<int64_t> shape;
    std::vector<float>* out;
  };
  ModelWeights& w = result.model->weights;
  const int64_t D = c.dim, F = c.hidden_dim, V = c.vocab_size;
  const int64_t qd = c.n_heads * c.head_dim, kvd = c.n_kv_heads * c.head_dim;
  // Routed experts: three tensors each per MoE layer. A config promising more than the files
  // hold is refused before the tensor list is built (a 1 KB config.json could otherwise ask for
  // tens of millions of entries: gigabytes before the first "missing tensor").
  int64_t expert_tensors = 0;
  for (int64_t l = 0; l < c.n_layers && c.mla(); ++l) {
    if (c.IsMoeLayer(l)) expert_tensors += 3 * c.n_routed_experts;
  }
  if (expert_tensors > static_cast<int64_t>(src.count())) {
    return InvalidArgument(config_path + ": " + std::to_string(c.n_layers) + " layers with " +
                           std::to_string(c.n_routed_experts) + " routed experts need " +
                           std::to_string(expert_tensors) +
                           " expert tensors, but the checkpoint in " + dir + " holds " +
                           std::to_string(src.count()) + " tensors in all");
  }
  std::vector<Wanted> wanted;
  wanted.push_back({"model.embed_tokens.weight", {V, D}, &w.token_embedding});
  w.layers.resize(c.n_layers);
  for (int64_t l = 0; l < c.n_layers && c.mla(); ++l) {
    LayerWeights& lw = w.layers[l];
    const std::string p = "model.layers." + std::to_string(l) + ".";
    const std::string a = p + "self_attn.";
    const int64_t H = c.n_heads, R = c.kv_lora_rank, Q = c.q_lora_rank;
    wanted.push_back({p + "input_layernorm.weight", {D}, &lw.attn_norm});
    if (Q > 0) {
      wanted.push_back({a + "q_a_proj.weight", {Q, D}, &lw.wq_a.f32});
      wanted.push_back({a + "q_a_layernorm.weight", {Q}, &lw.q_a_norm});
      wanted.push_back({a + "q_b_proj.weight", {H * c.qk_head_dim(), Q}, &lw.wq.f32});
    } else {
      wanted.push_back({a + "q_proj.weight", {H * c.qk_head_dim(), D}, &lw.wq.f32});
    }
    wanted.push_back({a + "kv_a_proj_with_mqa.weight", {R + c.qk_rope_head_dim, D}, &lw.wkv_a.f32});
    wanted.push_back({a + "kv_a_layernorm.weight", {R}, &lw.kv_a_norm});
    wanted.push_back(
        {a + "kv_b_proj.weight", {H * (c.qk_nope_head_dim + c.v_head_dim), R}, &lw.wkv_b});
    wanted.push_back({a + "o_proj.weight", {D, H * c.v_head_dim}, &lw.wo.f32});
    wanted.push_back({p + "post_attention_layernorm.weight", {D}, &lw.ffn_norm});
    if (!c.IsMoeLayer(l)) {
      wanted.push_back({p + "mlp.gate_proj.weight", {F, D}, &lw.w1.f32});
      wanted.push_back({p + "mlp.down_proj.weight", {D, F}, &lw.w2.f32});
      wanted.push_back({p + "mlp.up_proj.weight", {F, D}, &lw.w3.f32});
      continue;
    }
    const int64_t E = c.n_routed_experts, M = c.moe_hidden_dim, S = c.n_shared_experts * M;
    wanted.push_back({p + "mlp.gate.weight", {E, D}, &lw.gate});
    if (c.topk_method == TopkMethod::kNoauxTc) {
      wanted.push_back({p + "mlp.gate.e_score_correction_bias", {E}, &lw.gate_bias});
    }
    lw.experts.resize(E);
    for (int64_t e = 0; e < E; ++e) {
      const std::string x = p + "mlp.experts." + std::to_string(e) + ".";
      wanted.push_back({x + "gate_proj.weight", {M, D}, &lw.experts[e].w1.f32});
      wanted.push_back({x + "down_proj.weight", {D, M}, &lw.experts[e].w2.f32});
      wanted.push_back({x + "up_proj.weight", {M, D}, &lw.experts[e].w3.f32});
    }
    if (S > 0) {
      const std::string x = p + "mlp.shared_experts.";
      wanted.push_back({x + "gate_proj.weight", {S, D}, &lw.w1.f32});
      wanted.push_back({x + "down_proj.weight", {D, S}, &lw.w2.f32});
      wanted.push_back({x + "up_proj.weight", {S, D}, &lw.w3.f32});
    }
  }
  for (int64_t l = 0; l < c.n_layers && !c.mla(); ++l) {
    LayerWeights& lw = w.layers[l];
    const std::string p = "model.layers." + std::to_string(l) + ".";
    wanted.push_back({p + "input_layernorm.weight", {D}, &lw.attn_norm});
    wanted.push_back({p + "self_attn.q_proj.weight", {qd, D}, &lw.wq.f32});
    wanted.push_back({p + "self_attn.k_proj.weight", {kvd, D}, &lw.wk.f32});
    wanted.push_back({p + "self_attn.v_proj.weight", {kvd, D}, &lw.wv.f32});
    if (c.qkv_bias) {
      wanted.push_back({p + "self_attn.q_proj.bias", {qd}, &lw.bq});
      wanted.push_back({p + "self_attn.k_proj.bias", {kvd}, &lw.bk});
      wanted.push_back({p + "self_attn.v_proj.bias", {kvd}, &lw.bv});
    }
    wanted.push_back({p + "self_attn.o_proj.weight", {D, qd}, &lw.wo.f32});
    wanted.push_back({p + "post_attention_layernorm.weight", {D}, &lw.ffn_norm});
    wanted.push_back({p + "mlp.gate_proj.weight", {F, D}, &lw.w1.f32});
    wanted.push_back({p + "mlp.down_proj.weight", {D, F}, &lw.w2.f32});
    wanted.push_back({p + "mlp.up_proj.weight", {F, D}, &lw.w3.f32});
  }
  wanted.push_back({"model.norm.weight", {D}, &w.final_norm});
  if (!c.tied_embeddings) wanted.push_back({"lm_head.weight", {V, D}, &w.classifier.f32});
  StoredPrecision precision;
  for (const Wanted& x : wanted) {
    RETURN_IF_ERROR(src.Check(dir, x.name, x.shape));
    if (x.shape.size() == 2) {
      const std::string& d = src.Dtype(x.name);
      precision.Add(d == "F32" ? 32 : d == "F16" ? 16 : 0);
    }
  }
  result.model->stored_dtype = precision.Resolve();
  uint64_t f32_bytes = 0;
  for (const Wanted& x : wanted) {
    uint64_t n = sizeof(float);
    for (int64_t d : x.shape) n *= static_cast<uint64_t>(d);  // checked shapes: no overflow
    f32_bytes += n;
  }
  RETURN_IF_ERROR(CheckHostMemoryFor(f32_bytes, dir));

  const fs::path tok_json = fs::path(dir) / "tokenizer.json";
  const fs::path tok_config = fs::path(dir) / "tokenizer_config.json";
  if (fs::exists(tok_json, ec)) {
    ASSIGN_OR_RETURN(result.vocab,
                     LoadHfTokenizerJson(tok_json.string(),
                                         fs::exists(tok_config, ec) ? tok_config.string() : ""));
  }
  for (const Wanted& x : wanted) RETURN_IF_ERROR(src.Read(x.name, x.out));
  return result;
}

}  // namespace helix
