#include "engine/tokenizer/pre_tokenizer.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <iterator>
#include <string>

#include "engine/tokenizer/unicode.h"

namespace helix {
namespace {

// The regexes of the hand-written kinds, as tokenizer.json files hold them (after unescaping).
constexpr std::string_view kGpt2Regex =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr std::string_view kLlama3Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|)"
    R"( ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr std::string_view kQwen2Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|)"
    R"( ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
// HF's Digits(individual_digits=true) as a Split: every \p{N} character on its own.
constexpr std::string_view kDigitRegex = R"(\p{N})";

// DeepSeek V3 (and R1): numbers in threes, runs of CJK ideographs and kana
// (一-龥 ぀-ゟ ゠-ヿ), then words, punctuation runs and whitespace.
constexpr std::string_view kDeepSeekV3Regexes[] = {
    R"(\p{N}{1,3})",
    R"([\x{4E00}-\x{9FA5}\x{3040}-\x{309F}\x{30A0}-\x{30FF}]+)",
    R"re([!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+|)re"
    R"re( ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)re",
};

// CJK ideographs and Hangul of DeepSeek LLM and DeepSeek Coder (一-龥 ࠀ-一 가-퟿).
constexpr std::string_view kDeepSeekCjkRegex =
    R"([\x{4E00}-\x{9FA5}\x{0800}-\x{4E00}\x{AC00}-\x{D7FF}]+)";

// DeepSeek LLM, as llama.cpp runs it: the second regex is a list of cased-letter ranges, written
// with escapes because several of its characters (U+1F7D, U+1FBE, U+1FD3, U+1FDB, U+2126,
// U+212A) are Unicode normalisation singletons that an editor could silently replace.
constexpr std::string_view kDeepSeekLlmRegexes[] = {
    R"([\r\n])",
    R"(\s?[A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF})"
    R"(\x{1C4}-\x{293}\x{295}-\x{2AF}\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D})"
    R"(\x{37F}\x{386}\x{388}-\x{38A}\x{38C}\x{38E}-\x{3A1}\x{3A3}-\x{3F5})"
    R"(\x{3F7}-\x{481}\x{48A}-\x{52F}\x{531}-\x{556}\x{10A0}-\x{10C5}\x{13A0}-\x{13F5})"
    R"(\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}\x{1CBD}-\x{1CBF}\x{1D00}-\x{1D2B})"
    R"(\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D})"
    R"(\x{1F20}-\x{1F45}\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}\x{1F5D})"
    R"(\x{1F5F}-\x{1F7D}\x{1F80}-\x{1FB4}\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4})"
    R"(\x{1FC6}-\x{1FCC}\x{1FD0}-\x{1FD3}\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC})"
    R"(\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}\x{2102}\x{2107}\x{210A}-\x{2113}\x{2115})"
    R"(\x{2119}-\x{211D}\x{2124}\x{2126}\x{2128}\x{212A}-\x{212D}\x{212F}-\x{2134})"
    R"(\x{2139}\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184})"
    R"(\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3})"
    R"(\x{A640}-\x{A66D}\x{A680}-\x{A69B}\x{A722}-\x{A76F}\x{A771}-\x{A787})"
    R"(\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}\x{FB00}-\x{FB06}\x{FB13}-\x{FB17})"
    R"(\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}\x{10400}-\x{1044F}\x{104B0}-\x{104D3})"
    R"(\x{104D8}-\x{104FB}\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}\x{118A0}-\x{118DF})"
    R"(\x{1E900}-\x{1E943}]+)",
    // ASCII and full-width punctuation, quotation marks ‘-‟, and 　、。.
    R"(\s?[!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3000}-\x{3002}]+)",
    R"(\s+$)",
    kDeepSeekCjkRegex,
    R"(\p{N}+)",
};

constexpr std::string_view kDeepSeekCoderRegexes[] = {
    R"([\r\n])", R"(\s?\p{L}+)", R"(\s?\p{P}+)", kDeepSeekCjkRegex, R"(\p{N})",
};

using C = UnicodeClass;

// The decoded characters of one text: code point, class and byte offset of each.
struct Chars {
  std::vector<uint32_t> cp;
  std::vector<C> cls;
  std::vector<uint32_t> offset;  // size() + 1 entries; the last is the text's length.

  explicit Chars(std::string_view text) {
    DecodeAll(text, &cp, &offset);
    cls.reserve(cp.size());
    for (uint32_t c : cp) cls.push_back(ClassOf(c));
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

std::string_view PreTokenizerName(PreTokenizer kind) {
  switch (kind) {
    case PreTokenizer::kLlama3:
      return "llama-bpe";
    case PreTokenizer::kQwen2:
      return "qwen2";
    case PreTokenizer::kSmolLm:
      return "smollm";
    default:
      return "gpt2";
  }
}

std::vector<std::string> PreTokenizerRegexes(PreTokenizer kind) {
  switch (kind) {
    case PreTokenizer::kLlama3:
      return {std::string(kLlama3Regex)};
    case PreTokenizer::kQwen2:
      return {std::string(kQwen2Regex)};
    case PreTokenizer::kSmolLm:
      return {std::string(kDigitRegex), std::string(kGpt2Regex)};
    default:
      return {std::string(kGpt2Regex)};
  }
}

std::optional<PreTokenizer> PreTokenizerForRegexes(const std::vector<std::string>& regexes) {
  for (PreTokenizer kind :
       {PreTokenizer::kGpt2, PreTokenizer::kLlama3, PreTokenizer::kQwen2, PreTokenizer::kSmolLm}) {
    if (PreTokenizerRegexes(kind) == regexes) return kind;
  }
  return std::nullopt;
}

std::optional<std::vector<std::string>> RegexesForPreTokenizerName(std::string_view name) {
  const auto list = [](const auto& regexes) {
    return std::vector<std::string>(std::begin(regexes), std::end(regexes));
  };
  if (name == "deepseek-v3") return list(kDeepSeekV3Regexes);
  if (name == "deepseek-llm") return list(kDeepSeekLlmRegexes);
  if (name == "deepseek-coder") return list(kDeepSeekCoderRegexes);
  return std::nullopt;
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

StatusOr<RegexPreTokenizer> RegexPreTokenizer::Create(const std::vector<std::string>& patterns) {
  RegexPreTokenizer pre;
  for (const std::string& p : patterns) {
    StatusOr<Regex> re = Regex::Compile(p);
    if (!re.ok()) return re.status().WithPrefix("regex \"" + p + "\"");
    pre.regexes_.push_back(std::move(re).value());
  }
  return pre;
}

std::vector<std::string_view> RegexPreTokenizer::Split(std::string_view text,
                                                       RegexBudget* budget) const {
  const RegexInput in(text);
  RegexBudget own = RegexBudget::ForChars(in.size());
  if (budget == nullptr) budget = &own;
  std::vector<CharSpan> spans, next;
  if (in.size() > 0) spans.push_back({0, in.size()});
  for (const Regex& re : regexes_) {
    next.clear();
    next.reserve(spans.size() * 2);
    // Out of budget, the rest of a span stays one chunk (documented); nothing else to do.
    (void)re.SplitEach(in, spans, &next, budget);
    spans.swap(next);
  }
  std::vector<std::string_view> out;
  out.reserve(spans.size());
  for (const CharSpan& s : spans) {
    out.push_back(text.substr(in.offset(s.begin), in.offset(s.end) - in.offset(s.begin)));
  }
  return out;
}

StatusOr<CompiledPreTokenizer> CompiledPreTokenizer::Create(
    std::string_view name, const std::vector<std::string>& regexes) {
  CompiledPreTokenizer pre;
  std::vector<std::string> patterns = regexes;
  if (patterns.empty()) {
    pre.kind_ = PreTokenizerFromName(name);
    if (pre.kind_) return pre;
    std::optional<std::vector<std::string>> named = RegexesForPreTokenizerName(name);
    if (!named) {
      return InvalidArgument("pre-tokenizer \"" + std::string(name) +
                             "\" is not known (e.g. gpt2, llama-bpe, qwen2, smollm, deepseek-v3)");
    }
    patterns = std::move(*named);
  }
  pre.kind_ = PreTokenizerForRegexes(patterns);
  if (pre.kind_) return pre;
  ASSIGN_OR_RETURN(RegexPreTokenizer compiled, RegexPreTokenizer::Create(patterns));
  pre.regexes_ = std::move(compiled);
  return pre;
}

std::vector<std::string_view> CompiledPreTokenizer::Split(std::string_view text,
                                                          RegexBudget* budget) const {
  if (kind_) return PreTokenize(*kind_, text);
  return regexes_->Split(text, budget);
}

}  // namespace helix
