#include "engine/tokenizer/pre_tokenizer.h"

#include <algorithm>
#include <array>
#include <cstdint>

#include "engine/tokenizer/unicode.h"

namespace helix {
namespace {

using C = UnicodeClass;

// The decoded characters of one text: code point, class and byte offset of each.
struct Chars {
  std::vector<uint32_t> cp;
  std::vector<C> cls;
  std::vector<uint32_t> offset;  // size() + 1 entries; the last is the text's length.

  explicit Chars(std::string_view text) {
    cp.reserve(text.size());
    cls.reserve(text.size());
    offset.reserve(text.size() + 1);
    for (size_t pos = 0; pos < text.size();) {
      const Utf8Char c = DecodeUtf8(text, pos);
      cp.push_back(c.cp);
      cls.push_back(ClassOf(c.cp));
      offset.push_back(static_cast<uint32_t>(pos));
      pos += c.len;
    }
    offset.push_back(static_cast<uint32_t>(text.size()));
  }
  size_t size() const { return cp.size(); }
};

bool IsNewline(uint32_t cp) { return cp == '\r' || cp == '\n'; }

// Length of 's|'t|'re|'ve|'m|'ll|'d at i (0 if none). With ignore_case, letters match as under
// (?i): ASCII case plus U+017F (long s), which Unicode case folding maps to 's'.
size_t MatchContraction(const Chars& c, size_t i, size_t end, bool ignore_case) {
  if (c.cp[i] != '\'' || i + 1 >= end) return 0;
  auto is = [&](size_t k, char lower) {
    if (k >= end) return false;
    const uint32_t cp = c.cp[k];
    if (cp == static_cast<uint32_t>(lower)) return true;
    if (!ignore_case) return false;
    if (cp == static_cast<uint32_t>(lower - 'a' + 'A')) return true;
    return lower == 's' && cp == 0x17F;
  };
  if (is(i + 1, 's') || is(i + 1, 't') || is(i + 1, 'm') || is(i + 1, 'd')) return 2;
  if ((is(i + 1, 'r') && is(i + 2, 'e')) || (is(i + 1, 'v') && is(i + 2, 'e')) ||
      (is(i + 1, 'l') && is(i + 2, 'l'))) {
    return 3;
  }
  return 0;
}

size_t RunOf(const Chars& c, size_t j, size_t end, C cls) {
  while (j < end && c.cls[j] == cls) ++j;
  return j;
}

// \s*[\r\n]+ (only when with_newlines), then \s+(?!\S), then \s+, at a whitespace character i.
size_t MatchWhitespace(const Chars& c, size_t i, size_t end, bool with_newlines) {
  const size_t j = RunOf(c, i, end, C::kWhitespace);
  if (with_newlines) {
    // \s* backs off until [\r\n]+ can match: the match ends after the run's last newline.
    for (size_t k = j; k > i; --k) {
      if (IsNewline(c.cp[k - 1])) return k;
    }
  }
  // \s+(?!\S) takes the whole run at the end of the text, else the run less its last character
  // (whitespace, so the lookahead holds); a single space before a non-space is left to \s+.
  if (j == end || j - i == 1) return j;
  return j - 1;
}

// The end of the GPT-2 regex's match starting at i.
size_t MatchGpt2(const Chars& c, size_t i, size_t end) {
  if (const size_t n = MatchContraction(c, i, end, /*ignore_case=*/false)) return i + n;
  // ` ?\p{L}+`, ` ?\p{N}+` and ` ?[^\s\p{L}\p{N}]+` are one run of a single non-space class.
  const size_t s = (c.cp[i] == ' ' && i + 1 < end && c.cls[i + 1] != C::kWhitespace) ? i + 1 : i;
  if (c.cls[s] != C::kWhitespace) return RunOf(c, s + 1, end, c.cls[s]);
  return MatchWhitespace(c, i, end, /*with_newlines=*/false);
}

// The end of the Llama 3 (max_digits 3) or Qwen 2 (max_digits 1) regex's match starting at i.
size_t MatchLlama3(const Chars& c, size_t i, size_t end, size_t max_digits) {
  if (const size_t n = MatchContraction(c, i, end, /*ignore_case=*/true)) return i + n;
  const C cls = c.cls[i];
  // [^\r\n\p{L}\p{N}]?\p{L}+
  if (cls == C::kLetter) return RunOf(c, i + 1, end, C::kLetter);
  if (cls != C::kNumber && !IsNewline(c.cp[i]) && i + 1 < end && c.cls[i + 1] == C::kLetter) {
    return RunOf(c, i + 2, end, C::kLetter);
  }
  // \p{N}{1,max_digits}
  if (cls == C::kNumber) {
    size_t j = i + 1;
    while (j < end && j - i < max_digits && c.cls[j] == C::kNumber) ++j;
    return j;
  }
  // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
  const size_t s = (c.cp[i] == ' ' && i + 1 < end && c.cls[i + 1] == C::kOther) ? i + 1 : i;
  if (c.cls[s] == C::kOther) {
    size_t j = RunOf(c, s + 1, end, C::kOther);
    while (j < end && IsNewline(c.cp[j])) ++j;
    return j;
  }
  return MatchWhitespace(c, i, end, /*with_newlines=*/true);
}

void Split(PreTokenizer kind, const Chars& c, size_t begin, size_t end,
           std::vector<std::pair<size_t, size_t>>* out) {
  for (size_t i = begin; i < end;) {
    size_t j;
    switch (kind) {
      case PreTokenizer::kLlama3:
        j = MatchLlama3(c, i, end, 3);
        break;
      case PreTokenizer::kQwen2:
        j = MatchLlama3(c, i, end, 1);
        break;
      default:
        j = MatchGpt2(c, i, end);
        break;
    }
    out->emplace_back(i, j);
    i = j;
  }
}

struct NamedKind {
  std::string_view name;
  PreTokenizer kind;
};

// llama.cpp's tokenizer.ggml.pre names (llama-vocab.cpp) grouped by the regexes they use.
constexpr std::array kNames = {
    NamedKind{"", PreTokenizer::kGpt2},
    NamedKind{"default", PreTokenizer::kGpt2},
    NamedKind{"gpt2", PreTokenizer::kGpt2},
    NamedKind{"gpt-2", PreTokenizer::kGpt2},
    NamedKind{"phi-2", PreTokenizer::kGpt2},
    NamedKind{"mpt", PreTokenizer::kGpt2},
    NamedKind{"olmo", PreTokenizer::kGpt2},
    NamedKind{"jais", PreTokenizer::kGpt2},
    NamedKind{"roberta-bpe", PreTokenizer::kGpt2},
    NamedKind{"llama3", PreTokenizer::kLlama3},
    NamedKind{"llama-v3", PreTokenizer::kLlama3},
    NamedKind{"llama-bpe", PreTokenizer::kLlama3},
    NamedKind{"falcon3", PreTokenizer::kLlama3},
    NamedKind{"pixtral", PreTokenizer::kLlama3},
    NamedKind{"dbrx", PreTokenizer::kLlama3},
    NamedKind{"smaug-bpe", PreTokenizer::kLlama3},
    NamedKind{"chatglm-bpe", PreTokenizer::kLlama3},
    NamedKind{"glm4", PreTokenizer::kLlama3},
    NamedKind{"qwen2", PreTokenizer::kQwen2},
    NamedKind{"deepseek-r1-qwen", PreTokenizer::kQwen2},
    NamedKind{"stablelm2", PreTokenizer::kQwen2},
    NamedKind{"megrez", PreTokenizer::kQwen2},
    NamedKind{"smollm", PreTokenizer::kSmolLm},
    NamedKind{"starcoder", PreTokenizer::kSmolLm},
    NamedKind{"refact", PreTokenizer::kSmolLm},
    NamedKind{"command-r", PreTokenizer::kSmolLm},
    NamedKind{"codeshell", PreTokenizer::kSmolLm},
    NamedKind{"exaone", PreTokenizer::kSmolLm},
};

}  // namespace

std::optional<PreTokenizer> PreTokenizerFromName(std::string_view name) {
  for (const NamedKind& n : kNames) {
    if (n.name == name) return n.kind;
  }
  return std::nullopt;
}

bool PreTokenizerIgnoresMerges(std::string_view name) {
  return name == "llama3" || name == "llama-v3" || name == "llama-bpe" || name == "falcon3" ||
         name == "pixtral";
}

std::vector<std::string_view> PreTokenize(PreTokenizer kind, std::string_view text) {
  const Chars c(text);
  std::vector<std::pair<size_t, size_t>> spans;
  spans.reserve(c.size() / 4 + 1);
  if (kind == PreTokenizer::kSmolLm) {
    // Digits stand alone, and the GPT-2 regex runs within each stretch between them, so its
    // lookahead never sees past the next digit.
    size_t start = 0;
    for (size_t i = 0; i <= c.size(); ++i) {
      if (i < c.size() && c.cls[i] != C::kNumber) continue;
      Split(PreTokenizer::kGpt2, c, start, i, &spans);
      if (i < c.size()) spans.emplace_back(i, i + 1);
      start = i + 1;
    }
  } else {
    Split(kind, c, 0, c.size(), &spans);
  }
  std::vector<std::string_view> out;
  out.reserve(spans.size());
  for (const auto& [b, e] : spans) {
    out.push_back(text.substr(c.offset[b], c.offset[e] - c.offset[b]));
  }
  return out;
}

}  // namespace helix
