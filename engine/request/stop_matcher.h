// Streams a request's text while watching for stop strings: text that could still be the
// start of a stop string is held back; once a stop string appears, the text before it is
// released and the rest dropped (OpenAI semantics). One per request; not thread-safe.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace helix {

class StopMatcher {
 public:
  // `include_stop`: the stop string that ends the text is kept in it (vLLM's
  // include_stop_str_in_output); else the text ends before it.
  explicit StopMatcher(std::vector<std::string> stops, bool include_stop = false);
  // Adds complete UTF-8 text; returns what may be emitted now. Sets *stopped when a stop
  // string completed (nothing more should be generated).
  std::string Push(std::string_view text, bool* stopped);
  // At the end without a stop: whatever is still held back.
  std::string Flush();
  // Text that is not matched (vLLM's first min_tokens tokens); returns what may be emitted now.
  // A possible stop-string start is held back as Push does: a stop string that starts in it
  // and completes in text pushed later still cuts it, as vLLM has it. Before any Push.
  std::string PassThrough(std::string_view text);

 private:
  std::vector<std::string> stops_;
  // Emits held_ but the longest suffix that may start a stop string.
  std::string Release();

  bool include_stop_;
  std::string held_;      // text that may start a stop string, not emitted yet
  size_t unmatched_ = 0;  // held_'s first bytes came through PassThrough: no stop ends in them
};

}  // namespace helix
