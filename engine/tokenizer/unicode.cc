#include "engine/tokenizer/unicode.h"

#include <algorithm>
#include <array>

namespace helix {
namespace {

bool IsWhiteSpace(uint32_t cp) {
  // The White_Space property (PropList.txt); it has not changed since Unicode 6.
  if (cp <= 0x20) return cp == 0x20 || (cp >= 0x09 && cp <= 0x0D);
  switch (cp) {
    case 0x85:
    case 0xA0:
    case 0x1680:
    case 0x2028:
    case 0x2029:
    case 0x202F:
    case 0x205F:
    case 0x3000:
      return true;
    default:
      return cp >= 0x2000 && cp <= 0x200A;
  }
}

GeneralCategory LookUp(uint32_t cp) {
  using unicode_internal::CategoryRun;
  using unicode_internal::kCategoryRuns;
  using unicode_internal::kNumCategoryRuns;
  if (cp > 0x10FFFF) return GeneralCategory::kCn;
  const auto* it =
      std::upper_bound(kCategoryRuns, kCategoryRuns + kNumCategoryRuns, cp,
                       [](uint32_t value, const CategoryRun& r) { return value < r.first; });
  return (it - 1)->category;  // The first run starts at 0.
}

UnicodeClass ClassFromCategory(uint32_t cp, GeneralCategory cat) {
  if (IsWhiteSpace(cp)) return UnicodeClass::kWhitespace;
  if (cat >= GeneralCategory::kLu && cat <= GeneralCategory::kLo) return UnicodeClass::kLetter;
  if (cat >= GeneralCategory::kNd && cat <= GeneralCategory::kNo) return UnicodeClass::kNumber;
  return UnicodeClass::kOther;
}

// Latin-1 is most of what real prompts hold: answer it from tables.
const std::array<GeneralCategory, 256>& Latin1Categories() {
  static const std::array<GeneralCategory, 256> table = [] {
    std::array<GeneralCategory, 256> t{};
    for (uint32_t cp = 0; cp < 256; ++cp) t[cp] = LookUp(cp);
    return t;
  }();
  return table;
}

const std::array<UnicodeClass, 256>& Latin1Classes() {
  static const std::array<UnicodeClass, 256> table = [] {
    std::array<UnicodeClass, 256> t{};
    for (uint32_t cp = 0; cp < 256; ++cp) t[cp] = ClassFromCategory(cp, LookUp(cp));
    return t;
  }();
  return table;
}

}  // namespace

Utf8Char DecodeUtf8(std::string_view s, size_t pos) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data()) + pos;
  const size_t avail = s.size() - pos;
  const unsigned char lead = p[0];
  if (lead < 0x80) return {lead, 1};
  uint32_t need, cp;
  unsigned char lo = 0x80, hi = 0xBF;  // Range of the first continuation byte.
  if (lead >= 0xC2 && lead <= 0xDF) {
    need = 1;
    cp = lead & 0x1F;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    need = 2;
    cp = lead & 0x0F;
    if (lead == 0xE0) lo = 0xA0;
    if (lead == 0xED) hi = 0x9F;
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    need = 3;
    cp = lead & 0x07;
    if (lead == 0xF0) lo = 0x90;
    if (lead == 0xF4) hi = 0x8F;
  } else {
    return {kInvalidCodePoint, 1};
  }
  if (avail <= need) return {kInvalidCodePoint, 1};
  for (uint32_t k = 1; k <= need; ++k) {
    const unsigned char b = p[k];
    if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xBF)) return {kInvalidCodePoint, 1};
    cp = (cp << 6) | (b & 0x3F);
  }
  return {cp, need + 1};
}

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

UnicodeClass ClassOf(uint32_t cp) {
  if (cp < 256) return Latin1Classes()[cp];
  return ClassFromCategory(cp, LookUp(cp));
}

GeneralCategory CategoryOf(uint32_t cp) {
  if (cp < 256) return Latin1Categories()[cp];
  return LookUp(cp);
}

bool AnyCodePointIn(uint32_t first, uint32_t last, CategoryMask mask) {
  using unicode_internal::CategoryRun;
  using unicode_internal::kCategoryRuns;
  using unicode_internal::kNumCategoryRuns;
  if (first > last || first > 0x10FFFF) return false;
  const CategoryRun* end = kCategoryRuns + kNumCategoryRuns;
  const CategoryRun* it =
      std::upper_bound(kCategoryRuns, end, first,
                       [](uint32_t value, const CategoryRun& r) { return value < r.first; }) -
      1;
  for (; it != end && it->first <= last; ++it) {
    if (mask & MaskOf(it->category)) return true;
  }
  return false;
}

void DecodeAll(std::string_view s, std::vector<uint32_t>* cps, std::vector<uint32_t>* offsets) {
  cps->reserve(cps->size() + s.size());
  offsets->reserve(offsets->size() + s.size() + 1);
  for (size_t pos = 0; pos < s.size();) {
    const Utf8Char c = DecodeUtf8(s, pos);
    cps->push_back(c.cp);
    offsets->push_back(static_cast<uint32_t>(pos));
    pos += c.len;
  }
  offsets->push_back(static_cast<uint32_t>(s.size()));
}

}  // namespace helix
