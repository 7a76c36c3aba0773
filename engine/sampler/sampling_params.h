// Per-request sampling parameters (the knobs vLLM / OpenAI expose) and their validation.
// A plain value.
#pragma once

#include <cstdint>
#include <optional>

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

  // Names the field and value that is out of range.
  Status Validate() const;
};

}  // namespace helix
