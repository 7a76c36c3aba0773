#pragma once
// What /proc/meminfo reports.

#include <cstdint>
#include <fstream>
#include <initializer_list>
#include <string>
#include <string_view>

namespace helix {

// The sum, in bytes, of the /proc/meminfo fields named (without the colon, e.g.
// {"MemAvailable", "SwapFree"}); -1 when none of them can be read.
inline int64_t MemInfoBytes(std::initializer_list<std::string_view> fields) {
  std::ifstream in("/proc/meminfo");
  std::string key, rest;
  int64_t kib = 0, sum = 0;
  bool found = false;
  while (in >> key >> kib) {
    std::getline(in, rest);  // the unit, when there is one
    if (!key.empty() && key.back() == ':') key.pop_back();
    for (std::string_view f : fields) {
      if (key == f) {
        sum += kib * 1024;
        found = true;
      }
    }
  }
  return found ? sum : -1;
}

}  // namespace helix
