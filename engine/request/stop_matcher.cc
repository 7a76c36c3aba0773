#include "engine/request/stop_matcher.h"

#include <algorithm>

namespace helix {

StopMatcher::StopMatcher(std::vector<std::string> stops, bool include_stop)
    : stops_(std::move(stops)), include_stop_(include_stop) {
  stops_.erase(std::remove(stops_.begin(), stops_.end(), std::string()), stops_.end());
}

std::string StopMatcher::Push(std::string_view text, bool* stopped) {
  *stopped = false;
  held_.append(text);
  if (stops_.empty()) return std::move(held_);
  // Earliest complete stop string (the first listed of those found there).
  size_t cut = std::string::npos, cut_len = 0;
  for (const auto& s : stops_) {
    const size_t at = held_.find(s);
    if (at < cut) {
      cut = at;
      cut_len = s.size();
    }
  }
  if (cut != std::string::npos) {
    *stopped = true;
    std::string out = held_.substr(0, include_stop_ ? cut + cut_len : cut);
    held_.clear();
    return out;
  }
  // Hold back the longest suffix that is a proper prefix of some stop string.
  size_t keep = 0;
  for (const auto& s : stops_) {
    for (size_t n = std::min(s.size() - 1, held_.size()); n > keep; --n) {
      if (held_.compare(held_.size() - n, n, s, 0, n) == 0) {
        keep = n;
        break;
      }
    }
  }
  std::string out = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return out;
}

std::string StopMatcher::Flush() { return std::move(held_); }

}  // namespace helix
