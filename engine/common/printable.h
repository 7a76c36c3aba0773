#pragma once
// Text from a file or a client quoted in an error message: control bytes escaped and long
// values cut, so a message stays one readable line (a key of NULs, a 200 KB regex). A plain
// function; thread-safe.

#include <cstddef>
#include <string>
#include <string_view>

namespace helix {

// `s` with bytes below 0x20 and 0x7f written as \n, \t or \xNN; cut after
// about `max_bytes` bytes (at a UTF-8 character boundary) with "...(N bytes)" appended.
inline std::string Printable(std::string_view s, size_t max_bytes = 120) {
  size_t keep = s.size();
  if (keep > max_bytes) {
    keep = max_bytes;
    while (keep > 0 && (static_cast<unsigned char>(s[keep]) & 0xC0) == 0x80) --keep;
  }
  static const char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(keep + 16);
  for (size_t i = 0; i < keep; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c == 0x7f) {
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    } else {
      out += static_cast<char>(c);
    }
  }
  if (keep < s.size()) out += "...(" + std::to_string(s.size()) + " bytes)";
  return out;
}

}  // namespace helix
