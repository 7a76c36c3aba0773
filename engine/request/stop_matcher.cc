#include "engine/request/stop_matcher.h"

#include <algorithm>

namespace helix {

StopMatcher::StopMatcher(std::vector<std::string> stops, bool include_stop)
    : stops_(std::move(stops)), include_stop_(include_stop) {
  stops_.erase(std::remove(stops_.begin(), stops_.end(), std::string()), stops_.end());
  for (const auto& s : stops_) max_stop_ = std::max(max_stop_, s.size());
}

void StopMatcher::PassThrough(std::string_view text) {
  if (stops_.empty()) return;
  held_.append(text);
  emitted_ += text.size();
  // A stop string that completes later can start at most max_stop_ - 1 bytes back.
  if (held_.size() > max_stop_ - 1) {
    const size_t drop = held_.size() - (max_stop_ - 1);
    held_.erase(0, drop);
    emitted_ -= std::min(emitted_, drop);
  }
}

std::string StopMatcher::Push(std::string_view text, bool* stopped) {
  *stopped = false;
  held_.append(text);
  if (stops_.empty()) return std::move(held_);
  // The part of held_ not emitted yet: from emitted_ on (held_'s start may be text already
  // emitted, kept for stop strings that start in it).
  auto unsent = [&](size_t end) {
    return end > emitted_ ? held_.substr(emitted_, end - emitted_) : std::string();
  };
  // Earliest complete stop string that ends in the new text (the first listed of those found
  // there).
  size_t cut = std::string::npos, cut_len = 0;
  for (const auto& s : stops_) {
    const size_t from = emitted_ >= s.size() ? emitted_ - s.size() + 1 : 0;
    const size_t at = held_.find(s, from);
    if (at < cut) {
      cut = at;
      cut_len = s.size();
    }
  }
  if (cut != std::string::npos) {
    *stopped = true;
    std::string out = unsent(include_stop_ ? cut + cut_len : cut);
    held_.clear();
    emitted_ = 0;
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
  const size_t end = held_.size() - keep;
  std::string out = unsent(end);
  held_.erase(0, end);
  emitted_ -= std::min(emitted_, end);
  return out;
}

std::string StopMatcher::Flush() {
  std::string out = emitted_ < held_.size() ? held_.substr(emitted_) : std::string();
  held_.clear();
  emitted_ = 0;
  return out;
}

}  // namespace helix
