// A generation request as the engine receives it, and the events it streams back.
// GenerateRequest is a plain value handed to the engine; TokenEvent is delivered to the
// request's sink on the engine thread (the sink must not block for long).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "engine/common/status.h"
#include "engine/sampler/sampling_params.h"

namespace helix {

enum class FinishReason { kNone, kStop, kLength, kCancelled, kError };
std::string_view FinishReasonName(FinishReason r);  // "stop", "length", "cancelled", "error"

struct TokenEvent {
  std::string request_id;
  int32_t token = -1;  // -1 on a final event that carries no token
  std::string text;    // UTF-8 text delta (complete characters only)
  float logprob = 0;   // when requested
  std::vector<std::pair<int32_t, float>> top_logprobs;
  bool finished = false;
  FinishReason finish_reason = FinishReason::kNone;
  Status error;               // set when finish_reason == kError
  int64_t prompt_tokens = 0;  // usage, on the final event
  int64_t completion_tokens = 0;
};

using TokenSink = std::function<void(const TokenEvent&)>;

struct GenerateRequest {
  std::string id;                      // empty: the engine assigns one
  std::string prompt;                  // text, used when prompt_tokens is empty
  std::vector<int32_t> prompt_tokens;  // token ids (take precedence over text)
  bool add_bos = true;                 // prepend BOS when encoding text
  SamplingParams sampling;
  int32_t max_tokens = 16;
  std::vector<int32_t> stop_token_ids;  // in addition to the tokenizer's stop ids
  std::vector<std::string> stop;        // stop strings (excluded from the output text)
  bool ignore_eos = false;              // do not stop on the tokenizer's stop ids
  TokenSink sink;
};

}  // namespace helix
