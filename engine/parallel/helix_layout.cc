#include "engine/parallel/helix_layout.h"

namespace helix::parallel {

std::string HelixLayout::ToString() const {
  return "rank " + std::to_string(rank()) + " of " + std::to_string(world()) + " (tp " +
         std::to_string(tp_rank) + "/" + std::to_string(tp) + ", cp " + std::to_string(cp_rank) +
         "/" + std::to_string(cp) + ")";
}

std::pair<int64_t, int64_t> SplitRange(int64_t n, int parts, int i) {
  const int64_t base = n / parts, extra = n % parts;
  const int64_t begin = i * base + std::min<int64_t>(i, extra);
  return {begin, begin + base + (i < extra ? 1 : 0)};
}

Status ValidateHelixLayout(const ModelConfig& c, int tp, int cp) {
  if (tp < 1 || cp < 1) {
    return InvalidArgument("tensor_parallel_size = " + std::to_string(tp) +
                           ", context_parallel_size = " + std::to_string(cp) +
                           ": both must be >= 1");
  }
  const int64_t n = static_cast<int64_t>(tp) * cp;
  if (c.n_heads % n != 0) {
    return InvalidArgument(
        "Helix head split: the model's " + std::to_string(c.n_heads) +
        " query heads are not divisible by tensor_parallel_size x context_parallel_size = " +
        std::to_string(tp) + " x " + std::to_string(cp) + " = " + std::to_string(n) +
        " (after the all-to-all every rank combines n_heads / (TP x CP) heads)");
  }
  if (!c.mla() && c.n_kv_heads % tp != 0) {  // MLA: every TP shard holds the one latent
    return InvalidArgument("Helix head split: the model's " + std::to_string(c.n_kv_heads) +
                           " KV heads are not divisible by tensor_parallel_size = " +
                           std::to_string(tp) + " (each TP shard holds whole KV heads)");
  }
  return Status::Ok();
}

}  // namespace helix::parallel
