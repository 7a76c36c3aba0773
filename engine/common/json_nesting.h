#pragma once
// A guard for JSON text read from files or clients before it is parsed: nlohmann::json builds
// a node per array or object and recurses per level, so deeply nested input ("[[[[...") costs
// tens of bytes of memory per input byte and a deep parse stack. Real configs, tokenizers,
// safetensors headers and API requests nest a handful of levels.

#include <cstddef>
#include <string_view>

namespace helix {

// The deepest nesting of arrays and objects in `text` (brackets inside strings do not count),
// stopping early once it passes `limit`: the result is then limit + 1. Malformed text gets a
// number too; the parser that follows reports what is wrong with it.
inline int JsonNestingDepth(std::string_view text, int limit) {
  int depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (const char c : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > deepest) {
        deepest = depth;
        if (deepest > limit) return deepest;
      }
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return deepest;
}

// Enough for any configuration, tokenizer or request this daemon reads.
constexpr int kMaxJsonNesting = 64;

}  // namespace helix
