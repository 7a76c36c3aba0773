// Turns one row of logits into a token for one request: logit bias, penalties, temperature, top-k,
// top-p, min-p, then a draw from the request's own RNG. One Sampler per request;
// not thread-safe (the engine thread samples).
#pragma once

#include <cstdint>
#include <random>
#include <unordered_map>
#include <utility>
#include <vector>

#include "engine/common/status.h"
#include "engine/sampler/sampling_params.h"

namespace helix {

struct SampleResult {
  // Not ok when no token can be drawn: every logit NaN or -inf (a numerical blow-up in the
  // model); token is then -1.
  Status status;
  int32_t token = -1;
  float logprob = 0;                           // of the raw model distribution
  std::vector<std::pair<int32_t, float>> top;  // top-n (token, logprob), best first
};

// The error of a row with nothing to draw (every logit NaN or -inf), wherever it is found.
Status NothingToSample();

class Sampler {
 public:
  // `prompt` seeds the repetition penalty's token set.
  Sampler(const SamplingParams& params, const std::vector<int32_t>& prompt);

  // Samples from `logits` (vocab entries; modified in place as scratch). A NaN logit counts as
  // -inf; +inf logits share the whole probability among themselves.
  SampleResult Sample(float* logits, int64_t vocab);

  // Device sampling (the CUDA backend picks the token): possible when no bias or penalty
  // changes the logits and no logprobs are asked for. DrawForDevice makes the one uniform draw
  // Sample would make (none at temperature 0), so the request's random stream is the same either
  // way.
  bool DeviceEligible() const;
  double DrawForDevice();
  const SamplingParams& params() const { return p_; }
  // Records a generated token (for the penalties and min_tokens).
  void Accept(int32_t token);
  // The stop tokens min_tokens keeps from being sampled (sorted and unique): their logits are
  // -inf until min_tokens tokens have been accepted (the logprobs stay the model's).
  void BanUntilMinTokens(std::vector<int32_t> ids);

 private:
  SamplingParams p_;
  std::mt19937_64 rng_;
  std::vector<int32_t> seen_;                    // prompt ∪ output, for repetition penalty
  std::unordered_map<int32_t, int32_t> counts_;  // output token counts
  std::vector<std::pair<float, int32_t>> scratch_;
  std::vector<int32_t> min_tokens_ban_;
  int64_t accepted_ = 0;
  bool Banning() const { return accepted_ < p_.min_tokens && !min_tokens_ban_.empty(); }
};

}  // namespace helix
