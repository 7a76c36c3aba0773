#include "engine/model/llama2c_loader.h"

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <new>

namespace helix {
namespace {

class Reader {
 public:
  Reader(std::ifstream& in, const std::string& path, uint64_t size)
      : in_(in), path_(path), size_(size) {}

  Status Floats(const char* what, int64_t count, std::vector<float>* out) {
    uint64_t bytes = static_cast<uint64_t>(count) * sizeof(float);
    if (pos_ + bytes > size_) {
      return DataLoss(path_ + ": truncated llama2.c checkpoint: tensor " + what + " needs " +
                      std::to_string(bytes) + " bytes at offset " + std::to_string(pos_) +
                      " but the file has " + std::to_string(size_) + " bytes");
    }
    try {
      out->resize(count);
    } catch (const std::bad_alloc&) {
      return ResourceExhausted(path_ + ": cannot allocate " + std::to_string(bytes) +
                               " bytes of host memory for tensor " + what);
    }
    in_.read(reinterpret_cast<char*>(out->data()), static_cast<std::streamsize>(bytes));
    if (!in_) return DataLoss(path_ + ": read error in tensor " + std::string(what));
    pos_ += bytes;
    return Status::Ok();
  }
  Status Skip(int64_t floats) {
    pos_ += static_cast<uint64_t>(floats) * sizeof(float);
    if (pos_ > size_) return DataLoss(path_ + ": truncated llama2.c checkpoint (RoPE tables)");
    in_.seekg(static_cast<std::streamoff>(pos_));
    return Status::Ok();
  }
  uint64_t pos() const { return pos_; }
  void set_pos(uint64_t p) { pos_ = p; }

 private:
  std::ifstream& in_;
  const std::string& path_;
  uint64_t size_;
  uint64_t pos_ = 0;
};

}  // namespace

StatusOr<std::unique_ptr<LoadedModel>> LoadLlama2cModel(const std::string& path) {
  std::error_code ec;
  uint64_t size = std::filesystem::file_size(path, ec);
  if (ec) return NotFound("cannot open model file '" + path + "': " + ec.message());
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFound("cannot open model file '" + path + "'");

  int32_t h[7];
  if (size < sizeof(h)) {
    return DataLoss(path + ": too short for a llama2.c header (" + std::to_string(size) +
                    " bytes, need 28)");
  }
  in.read(reinterpret_cast<char*>(h), sizeof(h));
  auto m = std::make_unique<LoadedModel>();
  ModelConfig& c = m->config;
  c.architecture = "llama";
  c.dim = h[0];
  c.hidden_dim = h[1];
  c.n_layers = h[2];
  c.n_heads = h[3];
  c.n_kv_heads = h[4];
  c.tied_embeddings = h[5] > 0;
  c.vocab_size = h[5] < 0 ? -static_cast<int64_t>(h[5]) : h[5];
  c.max_seq_len = h[6];
  // head_dim is derived: while dim is not known to be a multiple of n_heads a stand-in keeps
  // Validate from naming the head_dim it would give (0 when dim < n_heads); dim and n_heads
  // are named below.
  const bool divisible = c.n_heads > 0 && c.dim % c.n_heads == 0;
  c.head_dim = divisible ? c.dim / c.n_heads : 2;
  c.rope_style = kernels::RopeStyle::kInterleaved;
  c.rope_theta = 10000.0f;
  c.norm_eps = 1e-5f;
  Status st = c.Validate();
  if (!st.ok()) return st.WithPrefix(path + ": not a valid llama2.c checkpoint");
  if (!divisible) {
    return InvalidArgument(path + ": not a valid llama2.c checkpoint: dim " +
                           std::to_string(c.dim) + " is not a multiple of n_heads " +
                           std::to_string(c.n_heads));
  }

  // Check the size up front so a wrong file fails before anything large is allocated.
  const int64_t D = c.dim, L = c.n_layers, F = c.hidden_dim, hd = c.head_dim;
  const int64_t q_out = c.n_heads * hd, kv_out = c.n_kv_heads * hd;
  const int64_t per_layer = D + q_out * D + 2 * kv_out * D + D * q_out + D + 3 * F * D;
  const int64_t floats = c.vocab_size * D + L * per_layer + D + c.max_seq_len * hd +
                         (c.tied_embeddings ? 0 : c.vocab_size * D);
  const uint64_t expected = sizeof(h) + static_cast<uint64_t>(floats) * sizeof(float);
  if (size < expected) {
    return DataLoss(path + ": truncated llama2.c checkpoint: header describes " +
                    std::to_string(expected) + " bytes but the file has " + std::to_string(size));
  }
  // The header fixes the layout; bytes beyond it mean the header does not describe this file
  // (e.g. a damaged n_layers or vocab sign), which would load as a smaller, wrong model.
  if (size > expected) {
    return InvalidArgument(path + ": the llama2.c header describes " + std::to_string(expected) +
                           " bytes (" + std::to_string(L) + " layers, vocab " +
                           std::to_string(c.vocab_size) +
                           (c.tied_embeddings ? ", shared classifier" : ", own classifier") +
                           ") but the file has " + std::to_string(size));
  }

  RETURN_IF_ERROR(CheckHostMemoryFor(expected, path));
  Reader r(in, path, size);
  r.set_pos(sizeof(h));
  ModelWeights& w = m->weights;
  w.layers.resize(L);
  RETURN_IF_ERROR(r.Floats("token_embedding", c.vocab_size * D, &w.token_embedding));
  // llama2.c stores each tensor kind for all layers together.
  std::vector<float> all;
  auto split = [&](const char* what, int64_t per, auto field) {
    Status s = r.Floats(what, L * per, &all);
    if (!s.ok()) return s;
    for (int64_t l = 0; l < L; ++l) {
      std::vector<float>& dst = field(w.layers[l]);
      dst.assign(all.begin() + l * per, all.begin() + (l + 1) * per);
    }
    return Status::Ok();
  };
  using LW = LayerWeights;
  auto vec = [](std::vector<float> LW::*f) {
    return [f](LW& l) -> std::vector<float>& { return l.*f; };
  };
  auto mat = [](WeightMatrix LW::*f) {
    return [f](LW& l) -> std::vector<float>& { return (l.*f).f32; };
  };
  RETURN_IF_ERROR(split("rms_att", D, vec(&LW::attn_norm)));
  RETURN_IF_ERROR(split("wq", q_out * D, mat(&LW::wq)));
  RETURN_IF_ERROR(split("wk", kv_out * D, mat(&LW::wk)));
  RETURN_IF_ERROR(split("wv", kv_out * D, mat(&LW::wv)));
  RETURN_IF_ERROR(split("wo", D * q_out, mat(&LW::wo)));
  RETURN_IF_ERROR(split("rms_ffn", D, vec(&LW::ffn_norm)));
  RETURN_IF_ERROR(split("w1", F * D, mat(&LW::w1)));
  RETURN_IF_ERROR(split("w2", D * F, mat(&LW::w2)));
  RETURN_IF_ERROR(split("w3", F * D, mat(&LW::w3)));
  RETURN_IF_ERROR(r.Floats("rms_final", D, &w.final_norm));
  RETURN_IF_ERROR(r.Skip(c.max_seq_len * hd));  // legacy freq_cis_real + freq_cis_imag
  if (!c.tied_embeddings) RETURN_IF_ERROR(r.Floats("wcls", c.vocab_size * D, &w.classifier.f32));
  return m;
}

}  // namespace helix
