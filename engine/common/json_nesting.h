#pragma once
// A guard for JSON text read from files or clients before it is parsed: nlohmann::json builds
// a node per array or object and recurses per level, so deeply nested input ("[[[[...") costs
// tens of bytes of memory per input byte and a deep parse stack, and so do many small values
// ("[],[],[]...": about 22 bytes per input byte, and an allocation failing inside the parser
// aborts the process). Real configs, tokenizers, safetensors headers and API requests nest a
// handful of levels. Plain functions; thread-safe.

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "engine/common/status.h"

namespace helix {

// What the parser would build from `text`: its deepest nesting and its number of values
// (arrays, objects, strings including object keys, numbers, true/false/null), each of which
// becomes a node. One pass; stops early once the depth passes `depth_limit` or the values pass
// `value_limit` (the field that passed is then its limit + 1). Malformed text gets numbers too.
struct JsonTextShape {
  int depth = 0;
  uint64_t values = 0;
};
inline JsonTextShape JsonShape(std::string_view text, int depth_limit, uint64_t value_limit) {
  JsonTextShape s;
  int depth = 0;
  bool in_string = false, escaped = false;
  bool expect_value = true;  // after [ { , : or at the start: a literal starts a new value
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
    if (c == ' ' || c == '\n' || c == '\r' || c == '\t') continue;
    const bool starts = c == '"' || c == '[' || c == '{' ||
                        (expect_value && c != ']' && c != '}' && c != ',' && c != ':');
    if (starts && ++s.values > value_limit) return s;
    expect_value = c == '[' || c == '{' || c == ',' || c == ':';
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > s.depth) {
        s.depth = depth;
        if (s.depth > depth_limit) return s;
      }
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return s;
}

// The deepest nesting of arrays and objects in `text` (brackets inside strings do not count),
// stopping early once it passes `limit`: the result is then limit + 1. Malformed text gets a
// number too; the parser that follows reports what is wrong with it.
inline int JsonNestingDepth(std::string_view text, int limit) {
  return JsonShape(text, limit, UINT64_MAX).depth;
}

// Enough for any configuration, tokenizer or request this daemon reads.
constexpr int kMaxJsonNesting = 64;

// Far more values than any real file this daemon reads holds (a 151K-token tokenizer.json with
// 280K merges as pairs: about 1.2 million), and few enough that parsing them stays under about
// 1 GB.
constexpr uint64_t kMaxJsonFileValues = uint64_t{1} << 23;

// OK when `text` nests at most kMaxJsonNesting levels and holds at most `value_limit` values;
// else InvalidArgument naming `what` (the file) and the limit that was passed.
inline Status CheckJsonFileShape(std::string_view text, const std::string& what,
                                 uint64_t value_limit = kMaxJsonFileValues) {
  const JsonTextShape s = JsonShape(text, kMaxJsonNesting, value_limit);
  if (s.depth > kMaxJsonNesting) {
    return InvalidArgument(what + ": JSON nested deeper than " + std::to_string(kMaxJsonNesting) +
                           " levels");
  }
  if (s.values > value_limit) {
    return InvalidArgument(what + ": JSON holds more than " + std::to_string(value_limit) +
                           " values (arrays, objects, strings, numbers), far more than such a "
                           "file has; refused before parsing");
  }
  return Status::Ok();
}

}  // namespace helix
