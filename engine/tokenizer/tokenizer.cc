#include "engine/tokenizer/tokenizer.h"

#include <algorithm>
#include <cstddef>

namespace helix {
namespace {

constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

}  // namespace

std::string Tokenizer::Decode(const std::vector<int32_t>& ids) const {
  std::string text;
  int32_t prev = -1;
  for (int32_t id : ids) {
    text += TokenBytes(id, prev);
    prev = id;
  }
  return text;
}

std::vector<int32_t> Tokenizer::stop_ids() const { return {eos_id()}; }

std::vector<int32_t> ControlTokensNamedBy(const Tokenizer& tokenizer,
                                          const std::vector<std::string>& texts) {
  std::vector<int32_t> out;
  for (const std::string& t : texts) {
    const std::vector<int32_t> ids = tokenizer.Encode(t, /*add_bos=*/false);
    if (ids.size() == 1 && tokenizer.is_control(ids[0]) &&
        std::find(out.begin(), out.end(), ids[0]) == out.end()) {
      out.push_back(ids[0]);
    }
  }
  return out;
}

std::string IncrementalDetokenizer::Push(int32_t id) {
  if (!skip_control_ || !tokenizer_.is_control(id)) {
    pending_ += tokenizer_.TokenBytes(id, prev_id_);
  }
  prev_id_ = id;
  return TakeComplete();
}

std::string IncrementalDetokenizer::Flush() {
  std::string out = TakeComplete();
  // Whatever is left is the start of a character that never finished: one maximal subpart.
  if (!pending_.empty()) out += kReplacementChar;
  pending_.clear();
  return out;
}

std::string IncrementalDetokenizer::TakeComplete() {
  const auto* p = reinterpret_cast<const unsigned char*>(pending_.data());
  const size_t n = pending_.size();
  std::string out;
  out.reserve(n);
  size_t i = 0;
  while (i < n) {
    const unsigned char lead = p[i];
    if (lead < 0x80) {
      out += static_cast<char>(lead);
      ++i;
      continue;
    }
    // Well-formed sequences per Unicode Table 3-7: the first continuation byte's range
    // depends on the lead (this excludes overlongs, surrogates and code points > U+10FFFF).
    int need;
    unsigned char first_lo = 0x80, first_hi = 0xBF;
    if (lead >= 0xC2 && lead <= 0xDF) {
      need = 1;
    } else if (lead == 0xE0) {
      need = 2;
      first_lo = 0xA0;
    } else if (lead == 0xED) {
      need = 2;
      first_hi = 0x9F;
    } else if (lead >= 0xE1 && lead <= 0xEF) {
      need = 2;
    } else if (lead == 0xF0) {
      need = 3;
      first_lo = 0x90;
    } else if (lead >= 0xF1 && lead <= 0xF3) {
      need = 3;
    } else if (lead == 0xF4) {
      need = 3;
      first_hi = 0x8F;
    } else {  // A stray continuation byte, C0, C1 or F5..FF: never valid.
      out += kReplacementChar;
      ++i;
      continue;
    }
    size_t j = i + 1;
    bool ill_formed = false;
    for (int k = 0; k < need && j < n; ++k, ++j) {
      const unsigned char lo = k == 0 ? first_lo : 0x80;
      const unsigned char hi = k == 0 ? first_hi : 0xBF;
      if (p[j] < lo || p[j] > hi) {
        ill_formed = true;
        break;
      }
    }
    if (ill_formed) {
      // [i, j) is the maximal subpart; the byte at j starts afresh.
      out += kReplacementChar;
      i = j;
      continue;
    }
    if (j - i < static_cast<size_t>(need) + 1) break;  // Incomplete so far: hold [i, n).
    out.append(pending_, i, j - i);
    i = j;
  }
  pending_.erase(0, i);
  return out;
}

}  // namespace helix
