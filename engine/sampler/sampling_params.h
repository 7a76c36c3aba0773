// Per-request sampling parameters (the knobs vLLM / OpenAI expose) and their validation.
// A plain value.
#pragma once

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "engine/common/status.h"

namespace helix {

struct SamplingParams {
  float temperature = 1.0f;         // 0 = greedy (argmax; ties → lowest id)
  int32_t top_k = 0;                // 0 = off
  float top_p = 1.0f;               // (0, 1]
  float min_p = 0.0f;               // [0, 1]
  float repetition_penalty = 1.0f;  // > 0; applies to prompt and output tokens
  float presence_penalty = 0.0f;    // [-2, 2]; output tokens
  float frequency_penalty = 0.0f;   // [-2, 2]; output tokens
  std::optional<uint64_t> seed;     // same seed → same tokens, whatever the batch
  int32_t top_logprobs = -1;        // -1: no logprobs; n ≥ 0: sampled token's + top n
  // vLLM's min_tokens: the first min_tokens tokens are never a stop token (EOS, stop_token_ids;
  // Sampler::BanUntilMinTokens), and stop strings are matched from the next token on (one may
  // start in the first tokens' text).
  int32_t min_tokens = 0;
  // (token id, bias) added to the logits before the penalties; ids sorted and unique, each bias
  // in [-100, 100]. Ids are checked against the vocabulary where the request is submitted.
  std::vector<std::pair<int32_t, float>> logit_bias;
  // vLLM's allowed_token_ids: when not empty, only these ids can be sampled (sorted, unique;
  // checked against the vocabulary where the request is submitted).
  std::vector<int32_t> allowed_token_ids;
  static constexpr size_t kMaxLogitBias = 65536;

  // Names the field and value that is out of range.
  Status Validate() const;
};

}  // namespace helix
