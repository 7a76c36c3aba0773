#include "engine/request/stop_matcher.h"

#include <algorithm>

namespace helix {

StopMatcher::StopMatcher(std::vector<std::string> stops, bool include_stop)
    : stops_(std::move(stops)), include_stop_(include_stop) {
  stops_.erase(std::remove(stops_.begin(), stops_.end(), std::string()), stops_.end());
}

std::string StopMatcher::Release() {
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
  const size_t end = held_.size() - keep;
  std::string out = held_.substr(0, end);
  held_.erase(0, end);
  unmatched_ -= std::min(unmatched_, end);
  return out;
}

std::string StopMatcher::PassThrough(std::string_view text) {
  if (stops_.empty()) return std::string(text);
  held_.append(text);
  unmatched_ = held_.size();
  return Release();
}

std::string StopMatcher::Push(std::string_view text, bool* stopped) {
  *stopped = false;
  held_.append(text);
  if (stops_.empty()) return std::move(held_);
  // Earliest complete stop string (the first listed of those found there) that ends past the
  // passed-through text.
  size_t cut = std::string::npos, cut_len = 0;
  for (const auto& s : stops_) {
    const size_t from = unmatched_ >= s.size() ? unmatched_ - s.size() + 1 : 0;
    const size_t at = held_.find(s, from);
    if (at < cut) {
      cut = at;
      cut_len = s.size();
    }
  }
  if (cut != std::string::npos) {
    *stopped = true;
    std::string out = held_.substr(0, include_stop_ ? cut + cut_len : cut);
    held_.clear();
    unmatched_ = 0;
    return out;
  }
  return Release();
}

std::string StopMatcher::Flush() {
  unmatched_ = 0;
  return std::move(held_);
}

}  // namespace helix
