#include "engine/sampler/sampling_params.h"

#include <cmath>
#include <sstream>
#include <string>

namespace helix {
namespace {
Status Bad(const char* field, double v, const char* expected) {
  std::ostringstream m;
  m << field << " = " << v << ": expected " << expected;
  return InvalidArgument(m.str());
}
}  // namespace

Status SamplingParams::Validate() const {
  if (!std::isfinite(temperature) || temperature < 0) {
    return Bad("temperature", temperature, "a finite value >= 0");
  }
  if (top_k < 0) return Bad("top_k", top_k, "0 (off) or a positive count");
  if (!(top_p > 0 && top_p <= 1)) return Bad("top_p", top_p, "a value in (0, 1]");
  if (!(min_p >= 0 && min_p <= 1)) return Bad("min_p", min_p, "a value in [0, 1]");
  if (!(repetition_penalty > 0) || !std::isfinite(repetition_penalty)) {
    return Bad("repetition_penalty", repetition_penalty, "a finite value > 0");
  }
  if (!(presence_penalty >= -2 && presence_penalty <= 2)) {
    return Bad("presence_penalty", presence_penalty, "a value in [-2, 2]");
  }
  if (!(frequency_penalty >= -2 && frequency_penalty <= 2)) {
    return Bad("frequency_penalty", frequency_penalty, "a value in [-2, 2]");
  }
  if (top_logprobs < -1 || top_logprobs > 20) {
    return Bad("top_logprobs", top_logprobs, "-1 (none) or 0..20");
  }
  if (min_tokens < 0) return Bad("min_tokens", min_tokens, "a count >= 0");
  if (allowed_token_ids.size() > kMaxLogitBias) {
    return InvalidArgument("allowed_token_ids has " + std::to_string(allowed_token_ids.size()) +
                           " ids: at most " + std::to_string(kMaxLogitBias));
  }
  for (size_t i = 0; i < allowed_token_ids.size(); ++i) {
    if (allowed_token_ids[i] < 0 || (i > 0 && allowed_token_ids[i] <= allowed_token_ids[i - 1])) {
      return InvalidArgument("allowed_token_ids must be sorted, unique and >= 0 (id " +
                             std::to_string(allowed_token_ids[i]) + ")");
    }
  }
  if (logit_bias.size() > kMaxLogitBias) {
    return InvalidArgument("logit_bias has " + std::to_string(logit_bias.size()) +
                           " entries: at most " + std::to_string(kMaxLogitBias));
  }
  for (size_t i = 0; i < logit_bias.size(); ++i) {
    const auto& [id, bias] = logit_bias[i];
    if (id < 0) {
      return InvalidArgument("logit_bias: token id " + std::to_string(id) + " is negative");
    }
    if (i > 0 && id <= logit_bias[i - 1].first) {
      return InvalidArgument("logit_bias: token ids must be sorted and unique (id " +
                             std::to_string(id) + ")");
    }
    if (!(bias >= -100 && bias <= 100)) {
      std::ostringstream m;
      m << "logit_bias[" << id << "] = " << bias << ": expected a value in [-100, 100]";
      return InvalidArgument(m.str());
    }
  }
  return Status::Ok();
}

}  // namespace helix
