#include "engine/model/model_config.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <utility>

namespace helix {
namespace {

// Upper bound of yarn's factor, betas and mscales.
constexpr double kMaxYarnParameter = 65536;

// A double as %g writes it: 1e+300, not 301 digits.
std::string Num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

}  // namespace

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
  // Guard against absurd headers before anything is allocated from them, and before checks
  // of derived values, whose messages would mislead (an odd head_dim of a damaged dim).
  if (dim > (1 << 20) || hidden_dim > (1 << 22) || n_layers > 4096 || n_heads > 4096 ||
      vocab_size > (1 << 24) || head_dim > 4096) {
    return InvalidArgument("model shape is implausibly large (dim " + std::to_string(dim) +
                           ", hidden_dim " + std::to_string(hidden_dim) + ", layers " +
                           std::to_string(n_layers) + ", heads " + std::to_string(n_heads) +
                           ", head_dim " + std::to_string(head_dim) + ", vocab " +
                           std::to_string(vocab_size) + ")");
  }
  if (n_heads % n_kv_heads != 0) {
    return InvalidArgument("model n_heads = " + std::to_string(n_heads) +
                           " is not a multiple of n_kv_heads = " + std::to_string(n_kv_heads));
  }
  if (head_dim % 2 != 0) {
    return InvalidArgument("model head_dim = " + std::to_string(head_dim) +
                           ": RoPE needs an even head dimension");
  }
  // Stored as floats: a value checked as a double can still become inf or 0 here. The RoPE
  // base must exceed 1: every frequency is a power of it, and yarn divides by its log.
  if (!std::isfinite(rope_theta) || !(rope_theta > 1)) {
    return InvalidArgument("model rope_theta = " + Num(rope_theta) +
                           ": expected a finite value above 1 (as a 32-bit float)");
  }
  if (!std::isfinite(norm_eps) || norm_eps <= 0) {
    return InvalidArgument("model norm_eps = " + std::to_string(norm_eps) +
                           ": expected a finite positive value (as a 32-bit float)");
  }
  if (mla()) {
    RETURN_IF_ERROR(positive("kv_lora_rank", kv_lora_rank));
    RETURN_IF_ERROR(positive("qk_nope_head_dim", qk_nope_head_dim));
    RETURN_IF_ERROR(positive("qk_rope_head_dim", qk_rope_head_dim));
    RETURN_IF_ERROR(positive("v_head_dim", v_head_dim));
    if (q_lora_rank < 0) return InvalidArgument("model q_lora_rank is negative");
    if (qk_rope_head_dim % 2 != 0) {
      return InvalidArgument("model qk_rope_head_dim = " + std::to_string(qk_rope_head_dim) +
                             ": RoPE needs an even dimension");
    }
    if (n_kv_heads != 1 || head_dim != kv_lora_rank + qk_rope_head_dim) {
      return InvalidArgument(
          "MLA model: the latent cache is one head of kv_lora_rank + "
          "qk_rope_head_dim");
    }
    if (kv_lora_rank > 65536 || q_lora_rank > 65536 || qk_nope_head_dim > 4096 ||
        v_head_dim > 4096) {
      return InvalidArgument("model MLA shape is implausibly large");
    }
  }
  if (yarn.enabled) {
    if (!(yarn.factor >= 1.0) || yarn.original_max_position_embeddings <= 0 ||
        !(yarn.beta_fast > 0) || !(yarn.beta_slow > 0)) {
      return InvalidArgument(
          "model rope_scaling yarn: factor must be >= 1, original_max_position_embeddings, "
          "beta_fast and beta_slow positive");
    }
    // Real values: factor 4 to 40, betas 32 and 1, mscales 0.707 or 1. Far beyond, the tables
    // overflow (a mscale of 1e300 made every logit NaN at the first request).
    const std::pair<const char*, double> bounded[] = {{"factor", yarn.factor},
                                                      {"beta_fast", yarn.beta_fast},
                                                      {"beta_slow", yarn.beta_slow},
                                                      {"mscale", yarn.mscale},
                                                      {"mscale_all_dim", yarn.mscale_all_dim}};
    for (const auto& [name, v] : bounded) {
      if (!(v >= 0 && v <= kMaxYarnParameter)) {
        return InvalidArgument("model rope_scaling yarn: " + std::string(name) + " = " + Num(v) +
                               ": expected a value from 0 to " + Num(kMaxYarnParameter));
      }
    }
  }
  {
    // What the kernels get must be finite, whatever combination of values produced it.
    std::vector<double> inv_freq;
    double mscale = 0;
    RopeTables(&inv_freq, &mscale);
    const double softmax_scale = SoftmaxScale();
    bool finite = std::isfinite(mscale) && std::isfinite(softmax_scale) && softmax_scale > 0;
    for (double f : inv_freq) finite = finite && std::isfinite(f);
    if (!finite) {
      return InvalidArgument("model RoPE tables are not finite (rope_theta " + Num(rope_theta) +
                             ", rope_scaling yarn factor " + Num(yarn.factor) + ", mscale " +
                             Num(yarn.mscale) + ", mscale_all_dim " + Num(yarn.mscale_all_dim) +
                             ")");
    }
  }
  if (n_routed_experts > 0) {
    RETURN_IF_ERROR(positive("num_experts_per_tok", experts_per_token));
    RETURN_IF_ERROR(positive("moe_intermediate_size", moe_hidden_dim));
    RETURN_IF_ERROR(positive("moe_layer_freq", moe_layer_freq));
    RETURN_IF_ERROR(positive("n_group", n_group));
    RETURN_IF_ERROR(positive("topk_group", topk_group));
    if (n_routed_experts > 4096 || n_shared_experts > 64 || moe_hidden_dim > (1 << 20)) {
      return InvalidArgument("model MoE shape is implausibly large");
    }
    if (experts_per_token > n_routed_experts) {
      return InvalidArgument("model num_experts_per_tok = " + std::to_string(experts_per_token) +
                             " exceeds n_routed_experts = " + std::to_string(n_routed_experts));
    }
    if (n_shared_experts < 0) return InvalidArgument("model n_shared_experts is negative");
    if (topk_method != TopkMethod::kGreedy) {
      if (n_routed_experts % n_group != 0 || topk_group > n_group) {
        return InvalidArgument(
            "model MoE groups: n_routed_experts = " + std::to_string(n_routed_experts) +
            " must divide into n_group = " + std::to_string(n_group) +
            " groups and topk_group = " + std::to_string(topk_group) + " <= n_group");
      }
      if (experts_per_token > topk_group * (n_routed_experts / n_group)) {
        return InvalidArgument(
            "model MoE: num_experts_per_tok exceeds the experts of topk_group "
            "groups");
      }
      if (topk_method == TopkMethod::kNoauxTc && n_routed_experts / n_group < 2) {
        return InvalidArgument("model MoE noaux_tc: each group needs at least 2 experts");
      }
    }
  }
  return Status::Ok();
}

namespace {

// DeepSeek's yarn helpers (their modeling code's yarn_get_mscale / find_correction_dim).
double YarnMscale(double scale, double mscale) {
  return scale <= 1.0 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
}
double CorrectionDim(double rotations, int64_t dim, double base, double max_pos) {
  return (static_cast<double>(dim) * std::log(max_pos / (rotations * 2.0 * M_PI))) /
         (2.0 * std::log(base));
}

}  // namespace

double ModelConfig::SoftmaxScale() const {
  if (!mla()) return 1.0 / std::sqrt(static_cast<double>(head_dim));
  double scale = 1.0 / std::sqrt(static_cast<double>(qk_head_dim()));
  if (yarn.enabled && yarn.mscale_all_dim != 0.0) {
    const double m = YarnMscale(yarn.factor, yarn.mscale_all_dim);
    scale *= m * m;
  }
  return scale;
}

void ModelConfig::RopeTables(std::vector<double>* inv_freq, double* mscale) const {
  const int64_t dim = mla() ? qk_rope_head_dim : head_dim;
  const int64_t half = dim / 2;
  inv_freq->resize(static_cast<size_t>(half));
  *mscale = 1.0;
  for (int64_t i = 0; i < half; ++i) {
    (*inv_freq)[i] = std::pow(static_cast<double>(rope_theta),
                              -2.0 * static_cast<double>(i) / static_cast<double>(dim));
  }
  if (!yarn.enabled) return;
  const double base = rope_theta, orig = static_cast<double>(yarn.original_max_position_embeddings);
  double low = std::floor(CorrectionDim(yarn.beta_fast, dim, base, orig));
  double high = std::ceil(CorrectionDim(yarn.beta_slow, dim, base, orig));
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(dim - 1));
  if (low == high) high += 0.001;
  for (int64_t i = 0; i < half; ++i) {
    const double extra = (*inv_freq)[i], inter = extra / yarn.factor;
    const double ramp = std::clamp((static_cast<double>(i) - low) / (high - low), 0.0, 1.0);
    const double extra_weight = 1.0 - ramp;  // low-index (high-frequency) pairs keep extra
    (*inv_freq)[i] = inter * (1.0 - extra_weight) + extra * extra_weight;
  }
  *mscale = YarnMscale(yarn.factor, yarn.mscale) /
            (yarn.mscale_all_dim != 0.0 ? YarnMscale(yarn.factor, yarn.mscale_all_dim) : 1.0);
}

}  // namespace helix
