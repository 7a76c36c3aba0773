#include "engine/model/model_config.h"

namespace helix {

Status ModelConfig::Validate() const {
  auto positive = [](const char* f, int64_t v) -> Status {
    if (v > 0) return Status::Ok();
    return InvalidArgument(std::string("model ") + f + " = " + std::to_string(v) +
                           ": expected a positive value");
  };
  RETURN_IF_ERROR(positive("dim", dim));
  RETURN_IF_ERROR(positive("hidden_dim", hidden_dim));
  RETURN_IF_ERROR(positive("n_layers", n_layers));
  RETURN_IF_ERROR(positive("n_heads", n_heads));
  RETURN_IF_ERROR(positive("n_kv_heads", n_kv_heads));
  RETURN_IF_ERROR(positive("head_dim", head_dim));
  RETURN_IF_ERROR(positive("vocab_size", vocab_size));
  RETURN_IF_ERROR(positive("max_seq_len", max_seq_len));
  if (n_heads % n_kv_heads != 0) {
    return InvalidArgument("model n_heads = " + std::to_string(n_heads) +
                           " is not a multiple of n_kv_heads = " + std::to_string(n_kv_heads));
  }
  if (head_dim % 2 != 0) {
    return InvalidArgument("model head_dim = " + std::to_string(head_dim) +
                           ": RoPE needs an even head dimension");
  }
  // Guard against absurd headers before anything is allocated from them.
  if (dim > (1 << 20) || hidden_dim > (1 << 22) || n_layers > 4096 || n_heads > 4096 ||
      vocab_size > (1 << 24) || head_dim > 4096) {
    return InvalidArgument("model shape is implausibly large (dim " + std::to_string(dim) +
                           ", layers " + std::to_string(n_layers) + ", vocab " +
                           std::to_string(vocab_size) + ")");
  }
  return Status::Ok();
}

}  // namespace helix
