// A generation request as the engine receives it, and the events it streams back.
// GenerateRequest is a plain value handed to the engine; TokenEvent is delivered to the
// request's sink on the engine thread (the sink must not block for long).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "engine/common/status.h"
#include "engine/sampler/sampling_params.h"

namespace helix {
namespace transfer {
struct KvSource;
}

enum class FinishReason { kNone, kStop, kLength, kCancelled, kError };
std::string_view FinishReasonName(FinishReason r);  // "stop", "length", "cancelled", "error"

struct TokenEvent {
  std::string request_id;
  // -1 on a final event that carries no token. The final event of a request ended by a stop
  // token (EOS, stop_token_ids) carries that token's id and logprobs but not its text.
  int32_t token = -1;
  std::string text;   // UTF-8 text delta (complete characters only)
  float logprob = 0;  // when requested
  std::vector<std::pair<int32_t, float>> top_logprobs;
  bool finished = false;
  FinishReason finish_reason = FinishReason::kNone;
  Status error;               // set when finish_reason == kError
  int64_t prompt_tokens = 0;  // usage, on the final event
  int64_t completion_tokens = 0;
  // Final event of a retain_kv request that ended normally: the remote-readable address of
  // each block holding the prompt's KV, in order (held until Engine::ReleaseRetained), and the
  // lease's secret (a release from another process must show it: Engine::ReleaseLease).
  std::vector<uint64_t> kv_block_addresses;
  std::string kv_lease_token;
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
  std::vector<std::string> stop;        // stop strings (excluded from the output text, unless
  bool include_stop_str = false;        // this: vLLM's include_stop_str_in_output)
  bool ignore_eos = false;              // do not stop on the tokenizer's stop ids
  TokenSink sink;

  // Context server (EngineOptions::export_kv): keep the prompt's KV after the request ends.
  bool retain_kv = false;
  // Generation side, disaggregated: the prompt's KV is pulled from a context server instead of
  // computed. prompt_tokens must hold the prompt, first_token the token the context server
  // sampled (it is emitted first, then decoding continues from it).
  std::shared_ptr<const transfer::KvSource> kv_source;
  int32_t first_token = -1;
  // Called once on the engine thread when no rank touches kv_source's blocks any more (Ok
  // when the KV arrived, else why not): the handle may then be released on the context server.
  std::function<void(const Status&)> on_kv_done;
  // Optional: asked on the engine thread when the request is admitted, before any rank pulls:
  // calls `verdict` (on any thread) with Ok when kv_source may be pulled (e.g. it matches what
  // its context server exports), else with the error that fails the request.
  std::function<void(std::function<void(const Status&)> verdict)> check_kv_source;
  // Optional: asked on the engine thread once the KV has landed on every rank, before the
  // request decodes from it, instead of on_kv_done(Ok). It releases the KV on the context
  // server and calls `verdict` (on any thread) with Ok if the server still held it then, so
  // that no other prompt's KV could have overwritten the blocks while they were read (a lease
  // that expired before or during the pull), else with the error that fails the request.
  std::function<void(std::function<void(const Status&)> verdict)> confirm_kv;
};

}  // namespace helix
