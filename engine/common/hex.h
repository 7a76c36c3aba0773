#pragma once
// Bytes as lowercase hex text and back (binary values such as UCX addresses and rkeys passed
// through environment variables or files). Plain functions; thread-safe.

#include <string>

namespace helix {

inline std::string HexEncode(const void* p, size_t n) {
  static const char kHex[] = "0123456789abcdef";
  std::string s;
  s.reserve(2 * n);
  for (size_t i = 0; i < n; ++i) {
    const unsigned char c = static_cast<const unsigned char*>(p)[i];
    s += kHex[c >> 4];
    s += kHex[c & 15];
  }
  return s;
}

inline std::string HexEncode(const std::string& b) { return HexEncode(b.data(), b.size()); }

// The bytes of HexEncode's text (a trailing odd digit is ignored). REQUIRES: hex digits only.
inline std::string HexDecode(const std::string& h) {
  auto digit = [](char c) { return c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10; };
  std::string s;
  s.reserve(h.size() / 2);
  for (size_t i = 0; i + 1 < h.size(); i += 2) {
    s += static_cast<char>(digit(h[i]) << 4 | digit(h[i + 1]));
  }
  return s;
}

}  // namespace helix
