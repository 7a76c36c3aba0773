// Tests of the regex engine (regex.h), the Split pre-tokenizers built on it, and the agreement of
// the hand-written pre-tokenizers with it. Expected pieces in testdata/regex_cases.json come from
// Hugging Face tokenizers 0.23.3 (Oniguruma), written by testdata/make_deepseek_cases.py.
#include "engine/tokenizer/regex.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/tokenizer/pre_tokenizer.h"
#include "engine/tokenizer/unicode.h"

namespace helix {
namespace {

namespace fs = std::filesystem;
using Strings = std::vector<std::string>;

std::string SourceDir() {
  const char* env = std::getenv("HELIX_SOURCE_DIR");
  if (env != nullptr) return env;
  return fs::path(__FILE__).parent_path().parent_path().parent_path().string();
}

Regex MustCompile(std::string_view pattern) {
  StatusOr<Regex> re = Regex::Compile(pattern);
  EXPECT_TRUE(re.ok()) << pattern << ": " << re.status().ToString();
  if (!re.ok()) return Regex::Compile("(?!)").value();
  return std::move(re).value();
}

std::string Text(const RegexInput& in, CharSpan s) {
  return std::string(in.text().substr(in.offset(s.begin), in.offset(s.end) - in.offset(s.begin)));
}

// The pieces of Split(pattern, Isolated) over the whole text.
Strings Pieces(const Regex& re, std::string_view text) {
  const RegexInput in(text);
  std::vector<CharSpan> spans;
  const Status st = re.SplitIsolated(in, {0, in.size()}, &spans);
  EXPECT_TRUE(st.ok()) << st.ToString();
  Strings out;
  for (CharSpan s : spans) out.push_back(Text(in, s));
  return out;
}

Strings Pieces(std::string_view pattern, std::string_view text) {
  return Pieces(MustCompile(pattern), text);
}

// The non-empty matches, as HF's Split iterates them.
Strings Matches(std::string_view pattern, std::string_view text) {
  const Regex re = MustCompile(pattern);
  const RegexInput in(text);
  std::vector<CharSpan> spans;
  EXPECT_TRUE(re.FindAll(in, {0, in.size()}, &spans).ok());
  Strings out;
  for (CharSpan s : spans) {
    if (s.begin < s.end) out.push_back(Text(in, s));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Against Oniguruma (HF tokenizers)

TEST(RegexTest, MatchesHuggingFaceSplit) {
  const std::string path = SourceDir() + "/engine/tokenizer/testdata/regex_cases.json";
  std::ifstream file(path);
  if (!file) GTEST_SKIP() << path << " not found (set HELIX_SOURCE_DIR)";
  std::stringstream buffer;
  buffer << file.rdbuf();
  const nlohmann::json root = nlohmann::json::parse(buffer.str());
  int checked = 0;
  for (const nlohmann::json& c : root.at("cases")) {
    const std::string pattern = c.at("pattern").get<std::string>();
    const std::string text = c.at("text").get<std::string>();
    SCOPED_TRACE("pattern " + testing::PrintToString(pattern) + " text " +
                 testing::PrintToString(text));
    StatusOr<Regex> re = Regex::Compile(pattern);
    ASSERT_TRUE(re.ok()) << re.status().ToString();
    Strings want_pieces, want_matches;
    for (const nlohmann::json& p : c.at("pieces")) {
      want_pieces.push_back(p.at(0).get<std::string>());
      if (p.at(1).get<bool>()) want_matches.push_back(p.at(0).get<std::string>());
    }
    EXPECT_EQ(Pieces(*re, text), want_pieces);
    EXPECT_EQ(Matches(pattern, text), want_matches);
    ++checked;
  }
  EXPECT_GE(checked, 150);
}

// ---------------------------------------------------------------------------------------------
// Semantics, by hand

TEST(RegexTest, AlternativesInOrderWithBacktracking) {
  EXPECT_EQ(Matches("a|ab", "ab"), (Strings{"a"}));
  EXPECT_EQ(Matches("ab|a", "ab"), (Strings{"ab"}));
  EXPECT_EQ(Matches("a*ab", "aaab"), (Strings{"aaab"}));  // a* gives back two a's.
  EXPECT_EQ(Matches("(a|ab)(c|bcd)", "abcd"), (Strings{"abcd"}));
  EXPECT_EQ(Matches("a+?", "aaa"), (Strings{"a", "a", "a"}));
  EXPECT_EQ(Matches("a*+a", "aaa"), (Strings{}));  // Possessive: never gives back.
  EXPECT_EQ(Matches("(?>ab|a)c", "ac abc"), (Strings{"ac", "abc"}));
}

TEST(RegexTest, CountedRepetition) {
  EXPECT_EQ(Pieces(R"(\p{N}{1,3})", "1234567x89"), (Strings{"123", "456", "7", "x", "89"}));
  EXPECT_EQ(Matches("a{2}", "aaaaa"), (Strings{"aa", "aa"}));
  EXPECT_EQ(Matches("a{2,}", "a aaa"), (Strings{"aaa"}));
  EXPECT_EQ(Matches("a{,2}", "aaa"), (Strings{"aa", "a"}));
  EXPECT_EQ(Matches("a{1,3}+", "aaaaaaa"), (Strings{"aaaaaaa"}));  // (a{1,3})+ in Ruby syntax.
  EXPECT_EQ(Matches("a{2", "a{2"), (Strings{"a{2"}));              // Not an interval: literal.
}

TEST(RegexTest, LookaheadKeepsTheLastSpaceForTheNextWord) {
  const char* gpt2_ws = R"(\s+(?!\S)|\s+)";
  EXPECT_EQ(Pieces(gpt2_ws, "a   b"), (Strings{"a", "  ", " ", "b"}));
  EXPECT_EQ(Pieces(gpt2_ws, "a   "), (Strings{"a", "   "}));  // The end is not \S.
  EXPECT_EQ(Matches("a(?=b)", "ab ac"), (Strings{"a"}));
  EXPECT_EQ(Matches("a(?!b)", "ab ac"), (Strings{"a"}));
}

TEST(RegexTest, WindowIsTheWholeSubject) {
  // In a Sequence, each Split sees one chunk: anchors and lookahead stop at its edges.
  const Regex re = MustCompile(R"(\s+(?!\S)|^x|y$)");
  const RegexInput in("x  y  zx");
  std::vector<CharSpan> spans;
  ASSERT_TRUE(re.SplitIsolated(in, {1, 4}, &spans).ok());  // "  y"
  EXPECT_EQ(spans, (std::vector<CharSpan>{{1, 2}, {2, 3}, {3, 4}}));
  auto m = re.Search(in, {7, 8}, 7);  // "x", at the window's start.
  ASSERT_TRUE(m.ok());
  ASSERT_TRUE(m->has_value());
  EXPECT_EQ(**m, (CharSpan{7, 8}));
  auto space = re.Search(in, {4, 7}, 4);  // "  z": one space is left for the z.
  ASSERT_TRUE(space.ok());
  ASSERT_TRUE(space->has_value());
  EXPECT_EQ(**space, (CharSpan{4, 5}));
}

TEST(RegexTest, Classes) {
  EXPECT_EQ(Matches("[a-c]+", "abcdcba"), (Strings{"abc", "cba"}));
  EXPECT_EQ(Matches("[^a-c]+", "abxyc"), (Strings{"xy"}));
  EXPECT_EQ(Matches("[一-龥\u3040-ゟ゠-ヿ]+", "日本語のテキスト、한국어"),
            (Strings{"日本語のテキスト"}));
  EXPECT_EQ(Matches(R"([!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+)", "x!abc [def \\g"),
            (Strings{"!abc", "[def", "\\g"}));
  EXPECT_EQ(Matches(R"([\p{L}\p{M}]+)", "e\u0301t\u00e9 1"), (Strings{"e\u0301t\u00e9"}));
  EXPECT_EQ(Matches(R"([^\s\p{L}\p{N}]+)", "a, b!? 1€"), (Strings{",", "!?", "€"}));
  EXPECT_EQ(Matches(R"([\S\d]+)", "a1 2"), (Strings{"a1", "2"}));
  EXPECT_EQ(Matches(R"(\P{L}+)", "ab12 c"), (Strings{"12 "}));
  EXPECT_EQ(Matches(".+", "a\nb\r"), (Strings{"a", "b\r"}));
}

TEST(RegexTest, CaseInsensitiveGroups) {
  EXPECT_EQ(Matches("(?i:'s|'t|'re)", "'S 'Re 'rE 'ſ 'x"), (Strings{"'S", "'Re", "'rE", "'ſ"}));
  EXPECT_EQ(Matches("x(?i)ab|cd", "xAB cd xcD"), (Strings{"xAB", "xcD"}));  // Rest of the group.
  EXPECT_EQ(Matches("(?i:a(?-i:b)c)", "ABC AbC aBc"), (Strings{"AbC"}));
  EXPECT_EQ(Matches("(?i)[a-z]+", "ABCſK\u212A"), (Strings{"ABCſK\u212A"}));
  EXPECT_EQ(Matches(R"((?i)\p{Lu}+)", "ABcd"), (Strings{"AB"}));  // A bare property keeps case.
}

TEST(RegexTest, EmptyMatchesSplitBetweenCharacters) {
  EXPECT_EQ(Pieces("x*", "abx"), (Strings{"a", "b", "x"}));
  EXPECT_EQ(Pieces("(?:)", "ab"), (Strings{"a", "b"}));
  EXPECT_EQ(Pieces("(a|)+c", "aac"), (Strings{"aac"}));  // An empty iteration ends the loop.
  EXPECT_EQ(Pieces("(?:a?)*x", "aax"), (Strings{"aax"}));
  EXPECT_EQ(Pieces("x", ""), (Strings{}));
}

TEST(RegexTest, IllFormedInputIsUnassignedCharacters) {
  // Each bad byte is one character that only negations and `.` match.
  EXPECT_EQ(Matches(R"([^\s\p{L}\p{N}]+)", "a\xFF\xC3 b"), (Strings{"\xFF\xC3"}));
  EXPECT_EQ(Matches(R"(\p{L}+)", "a\xFF"), (Strings{"a"}));
  EXPECT_EQ(Matches(".", "\xE6\x97"), (Strings{"\xE6", "\x97"}));
  EXPECT_EQ(Pieces(R"(\p{N}{1,3})",
                   "1\x80"
                   "2"),
            (Strings{"1", "\x80", "2"}));
}

TEST(RegexTest, UnicodeClassesAgreeWithTheTables) {
  const Regex s = MustCompile(R"(\s)"), l = MustCompile(R"(\p{L})"), n = MustCompile(R"(\p{N})");
  std::string text;
  for (uint32_t cp = 0; cp <= 0x10FFFF; cp += (cp < 0x3400 ? 1 : 7)) {
    if (cp >= 0xD800 && cp <= 0xDFFF) continue;
    text.clear();
    AppendUtf8(cp, &text);
    const RegexInput in(text);
    const auto is = [&](const Regex& re) { return re.Search(in, {0, 1}, 0)->has_value(); };
    const UnicodeClass cls = ClassOf(cp);
    ASSERT_EQ(is(s), cls == UnicodeClass::kWhitespace) << "U+" << std::hex << cp;
    ASSERT_EQ(is(l), cls == UnicodeClass::kLetter) << "U+" << std::hex << cp;
    ASSERT_EQ(is(n), cls == UnicodeClass::kNumber) << "U+" << std::hex << cp;
  }
  EXPECT_EQ(CategoryOf(0x41), GeneralCategory::kLu);
  EXPECT_EQ(CategoryOf(0x301), GeneralCategory::kMn);
  EXPECT_EQ(CategoryOf(0x20AC), GeneralCategory::kSc);
  EXPECT_EQ(CategoryOf(0x3001), GeneralCategory::kPo);
  EXPECT_EQ(CategoryOf(0x378), GeneralCategory::kCn);
  EXPECT_EQ(CategoryOf(kInvalidCodePoint), GeneralCategory::kCn);
  EXPECT_TRUE(AnyCodePointIn(0x370, 0x3FF, MaskOf(GeneralCategory::kLu)));
  EXPECT_FALSE(AnyCodePointIn(0x4E00, 0x9FA5, MaskOf(GeneralCategory::kLu, GeneralCategory::kLt)));
}

// ---------------------------------------------------------------------------------------------
// Errors

void ExpectError(std::string_view pattern, StatusCode code, std::string_view names) {
  StatusOr<Regex> re = Regex::Compile(pattern);
  ASSERT_FALSE(re.ok()) << pattern;
  EXPECT_EQ(re.status().code(), code) << pattern << ": " << re.status().ToString();
  EXPECT_NE(re.status().message().find(names), std::string::npos)
      << pattern << ": " << re.status().ToString();
  EXPECT_NE(re.status().message().find("offset"), std::string::npos) << re.status().ToString();
}

TEST(RegexTest, UnsupportedConstructsAreNamed) {
  ExpectError("(?<=a)b", StatusCode::kUnimplemented, "lookbehind");
  ExpectError("(?<!a)b", StatusCode::kUnimplemented, "lookbehind");
  ExpectError(R"((a)\1)", StatusCode::kUnimplemented, "backreference");
  ExpectError(R"(\p{Han}+)", StatusCode::kUnimplemented, "\\p{Han}");
  ExpectError(R"(\p{Alpha})", StatusCode::kUnimplemented, "property");
  ExpectError(R"(\pL)", StatusCode::kUnimplemented, "without braces");
  ExpectError("(?m).", StatusCode::kUnimplemented, "option 'm'");
  ExpectError("[[:alpha:]]", StatusCode::kUnimplemented, "POSIX bracket");
  ExpectError("[a-z&&[^b]]", StatusCode::kUnimplemented, "intersection");
  ExpectError("[a[b]]", StatusCode::kUnimplemented, "nested character class");
  ExpectError("(?i)é", StatusCode::kUnimplemented, "U+00E9");
  ExpectError("(?i)[à-ÿ]", StatusCode::kUnimplemented, "U+00E0");
  ExpectError("(?i:ss)", StatusCode::kUnimplemented, "\"ss\"");
  ExpectError(R"((?i)[^\p{Ll}])", StatusCode::kUnimplemented, "cased-letter property");
  ExpectError(R"(\G)", StatusCode::kUnimplemented, "\\G");
  ExpectError(R"(\K)", StatusCode::kUnimplemented, "\\K");
  ExpectError(R"(\R)", StatusCode::kUnimplemented, "\\R");
  ExpectError(R"(\X)", StatusCode::kUnimplemented, "\\X");
  ExpectError("a{1001}", StatusCode::kUnimplemented, "above 1000");
  ExpectError("(?~abc)", StatusCode::kUnimplemented, "absent");
}

TEST(RegexTest, MalformedPatterns) {
  ExpectError("(ab", StatusCode::kInvalidArgument, "unmatched (");
  ExpectError("ab)", StatusCode::kInvalidArgument, "unmatched )");
  ExpectError("a|*", StatusCode::kInvalidArgument, "target of repeat");
  ExpectError("{2}", StatusCode::kInvalidArgument, "target of repeat");
  ExpectError("[b-a]", StatusCode::kInvalidArgument, "empty range");
  ExpectError("[abc", StatusCode::kInvalidArgument, "char-class");
  ExpectError("a{3,1}", StatusCode::kInvalidArgument, "n > m");
  ExpectError("(?)", StatusCode::kInvalidArgument, "empty group option");
  ExpectError("a\\", StatusCode::kInvalidArgument, "escape");
  ExpectError("\xFF", StatusCode::kInvalidArgument, "UTF-8");
  ExpectError(R"(\u12)", StatusCode::kInvalidArgument, "four hex digits");
  ExpectError(R"(\x{110000})", StatusCode::kInvalidArgument, "code point");
}

TEST(RegexTest, BacktrackingBudgetEndsInAnErrorNotAHang) {
  // (a|a)* tries 2^n ways before giving up on the missing b.
  const Regex re = MustCompile("(?:a|a)*b");
  const std::string text(60, 'a');
  const RegexInput in(text);
  const auto t0 = std::chrono::steady_clock::now();
  auto m = re.Search(in, {0, in.size()}, 0);
  EXPECT_EQ(m.status().code(), StatusCode::kResourceExhausted) << m.status().ToString();
  EXPECT_NE(m.status().message().find("budget"), std::string::npos);
  std::vector<CharSpan> spans = {{99, 99}};
  const Status st = re.SplitIsolated(in, {0, in.size()}, &spans);
  EXPECT_EQ(st.code(), StatusCode::kResourceExhausted);
  // The rest of the window stays one piece.
  EXPECT_EQ(spans, (std::vector<CharSpan>{{99, 99}, {0, in.size()}}));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_LT(seconds, 5.0);
  // A pre-tokenizer keeps going without an error; the budget is the text's, shared by its
  // regexes, so once it is spent the later regexes leave their chunks whole too.
  auto pre = RegexPreTokenizer::Create({"(?:a|a)*b", "x"});
  ASSERT_TRUE(pre.ok());
  EXPECT_EQ(pre->Split(text + "x"), (std::vector<std::string_view>{text + "x"}));
}

TEST(RegexTest, OneBudgetForAllTheWindowsOfAText) {
  // Each window of 12 a's costs (?:a|a)*b about 2^14 tries per start, well within a budget of its
  // own, but the windows of a 100 KB text together take far more than the text's budget. Once it
  // is spent, the later windows stay whole instead of each starting a budget afresh.
  constexpr size_t kRun = 12;
  const std::string unit = std::string(kRun, 'a') + "\n";
  std::string text;
  while (text.size() < 100000) text += unit;
  const size_t units = text.size() / unit.size();
  auto pre = RegexPreTokenizer::Create({"\n", "(?:a|a)*b|a"});
  ASSERT_TRUE(pre.ok()) << pre.status().ToString();
  RegexBudget budget = RegexBudget::ForChars(text.size());
  const std::vector<std::string_view> chunks = pre->Split(text, &budget);
  EXPECT_EQ(budget.steps_left, 0u);
  std::string joined;
  for (std::string_view c : chunks) joined += c;
  ASSERT_EQ(joined, text);
  // The first windows are split into single a's, the last stays whole; far fewer chunks than the
  // kRun + 1 per unit that splitting every window would give.
  ASSERT_GE(chunks.size(), kRun + 1);
  EXPECT_EQ(chunks.front(), "a");
  EXPECT_EQ(chunks[kRun], "\n");
  EXPECT_EQ(chunks[chunks.size() - 2], std::string(kRun, 'a'));
  EXPECT_LT(chunks.size(), units * (kRun + 1) / 2);
  // Without a budget given, Split makes the same one for the text.
  EXPECT_EQ(pre->Split(text), chunks);
}

TEST(RegexTest, TrailingSpaceRunsAreLinear) {
  // DeepSeek LLM's \s+$ on windows of spaces before a digit (what [\r\n] leaves): each start
  // would take the run and give it all back, quadratic in the run; a greedy run remembers the
  // ends from which the rest already failed.
  const std::string unit = std::string(1000, ' ') + "1\n";
  std::string text;
  for (int i = 0; i < 150; ++i) text += unit;
  auto pre = CompiledPreTokenizer::Create("deepseek-llm", {});
  ASSERT_TRUE(pre.ok()) << pre.status().ToString();
  RegexBudget budget = RegexBudget::ForChars(text.size());
  const uint64_t steps = budget.steps_left;
  const std::vector<std::string_view> chunks = pre->Split(text, &budget);
  ASSERT_EQ(chunks.size(), 3u * 150);
  for (size_t i = 0; i < chunks.size(); i += 3) {
    ASSERT_EQ(chunks[i], std::string(1000, ' ')) << i;
    ASSERT_EQ(chunks[i + 1], "1") << i;
    ASSERT_EQ(chunks[i + 2], "\n") << i;
  }
  EXPECT_LT(steps - budget.steps_left, 64 * text.size());
}

TEST(RegexTest, RunsTakeOneBacktrackingFrame) {
  // A quantifier over one character or class takes one frame for its run, not one per
  // character; a loop that needs a frame per character gives up past kMaxFrames, as when the
  // steps run out, instead of growing without bound.
  const size_t n = RegexBudget::kMaxFrames + 40000;
  const std::string spaces(n, ' '), as(n, 'a');
  const RegexInput in_spaces(spaces), in_as(as);
  for (const char* pattern :
       {R"(\s+)", R"(\s*\S?)", R"( {2,}+)", R"(\s+?$)", R"([\p{L}\s]+(?!\S))"}) {
    const Regex re = MustCompile(pattern);
    RegexBudget budget = RegexBudget::ForChars(n);
    std::vector<CharSpan> spans;
    const Status st = re.SplitIsolated(in_spaces, {0, n}, &spans, &budget);
    EXPECT_TRUE(st.ok()) << pattern << ": " << st.ToString();
    EXPECT_EQ(spans, (std::vector<CharSpan>{{0, n}})) << pattern;
    EXPECT_LE(budget.peak_frames, 2u) << pattern;
  }
  const Regex loop = MustCompile("(?:a|b)+");
  std::vector<CharSpan> spans;
  const Status st = loop.SplitIsolated(in_as, {0, n}, &spans);
  EXPECT_EQ(st.code(), StatusCode::kResourceExhausted) << st.ToString();
  EXPECT_NE(st.message().find("frames"), std::string::npos) << st.ToString();
  EXPECT_EQ(spans, (std::vector<CharSpan>{{0, n}}));  // The window stays whole.
}

TEST(RegexTest, NestingCountsQuantifiers) {
  // Groups and quantifiers share the nesting limit, each quantifier one level, so the syntax
  // tree (and the recursion over it, compiling and matching) stays shallow.
  std::string braces = "a";
  for (int i = 0; i < 100; ++i) braces += "{1}";
  EXPECT_TRUE(Regex::Compile(braces).ok());
  ExpectError(braces + "{1}", StatusCode::kUnimplemented, "nesting");
  std::string deep = "a";
  for (int i = 0; i < 100000; ++i) deep += "{1}";
  ExpectError(deep, StatusCode::kUnimplemented, "nesting");
  std::string possessive = "a";
  for (int i = 0; i < 21000; ++i) possessive += "*+";
  ExpectError(possessive, StatusCode::kUnimplemented, "nesting");
  // 50 quantified groups are 100 levels; 51 are too many.
  const auto groups = [](int n) {
    std::string p;
    for (int i = 0; i < n; ++i) p += "(?:";
    p += "a";
    for (int i = 0; i < n; ++i) p += ")?";
    return p;
  };
  EXPECT_EQ(Matches(groups(50), "aa"), (Strings{"a", "a"}));
  ExpectError(groups(51), StatusCode::kUnimplemented, "nesting");
  // A pre-tokenizer's error names the pattern.
  auto pre = RegexPreTokenizer::Create({"x", braces + "{1}"});
  EXPECT_EQ(pre.status().code(), StatusCode::kUnimplemented);
  EXPECT_NE(pre.status().message().find("regex \"a{1}{1}"), std::string::npos)
      << pre.status().ToString();
}

TEST(RegexTest, LongInputsStayLinear) {
  // Real patterns take a few steps per character: 200k characters fit the budget.
  std::string text;
  for (int i = 0; i < 20000; ++i) text += i % 3 ? "word  \t" : "12345 \r\n";
  text += std::string(50000, ' ');
  auto pre = CompiledPreTokenizer::Create("deepseek-v3", {});
  ASSERT_TRUE(pre.ok()) << pre.status().ToString();
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<std::string_view> chunks = pre->Split(text);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::string joined;
  for (std::string_view c : chunks) joined += c;
  EXPECT_EQ(joined, text);
  EXPECT_GT(chunks.size(), 40000u);
  EXPECT_EQ(chunks.back(), "  \t" + std::string(50000, ' '));
  EXPECT_LT(seconds, 2.0);
}

TEST(RegexTest, RandomPatternsCompileOrFailCleanly) {
  // Whatever the pattern, Compile returns, and a compiled one splits any text into pieces that
  // cover it, within the budget.
  static const std::vector<std::string> kAtoms = {
      "a",   "b",   "(",      ")",      "[",       "]",   "^",   "$",   "*",    "+",
      "?",   "{",   "}",      "{2}",    "{1,3}",   "|",   "-",   ".",   ",",    "\\",
      "\\s", "\\S", "\\p{L}", "\\P{N}", "(?:",     "(?=", "(?!", "(?>", "(?i)", "(?i:",
      "1",   " ",   "é",      "\\b",    "\\x{41}", "[^",  "\\w"};
  static const std::vector<std::string> kTexts = {
      "", "ab", "a b", "aaab\nba", "A1 é,b\r\n", std::string(40, 'a') + "c"};
  std::mt19937 rng(9);
  std::uniform_int_distribution<size_t> pick(0, kAtoms.size() - 1), len(1, 10);
  int compiled = 0;
  for (int i = 0; i < 3000; ++i) {
    std::string pattern;
    for (size_t n = len(rng); n > 0; --n) pattern += kAtoms[pick(rng)];
    StatusOr<Regex> re = Regex::Compile(pattern);
    if (!re.ok()) {
      EXPECT_TRUE(re.status().code() == StatusCode::kInvalidArgument ||
                  re.status().code() == StatusCode::kUnimplemented)
          << pattern << ": " << re.status().ToString();
      continue;
    }
    ++compiled;
    for (const std::string& text : kTexts) {
      const RegexInput in(text);
      std::vector<CharSpan> spans;
      const Status st = re->SplitIsolated(in, {0, in.size()}, &spans);
      EXPECT_TRUE(st.ok() || st.code() == StatusCode::kResourceExhausted) << st.ToString();
      size_t at = 0;
      for (const CharSpan& s : spans) {
        ASSERT_EQ(s.begin, at) << pattern;
        ASSERT_LT(s.begin, s.end) << pattern;
        at = s.end;
      }
      ASSERT_EQ(at, in.size()) << pattern;
    }
  }
  EXPECT_GT(compiled, 300);
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenizers

TEST(RegexPreTokenizerTest, SequenceSplitsEachChunkAgain) {
  auto pre = RegexPreTokenizer::Create({R"(\p{N}{1,3})", R"(\s+(?!\S)|\s+|[^\s]+)"});
  ASSERT_TRUE(pre.ok()) << pre.status().ToString();
  EXPECT_EQ(pre->Split("ab 12345  cd"),
            (std::vector<std::string_view>{"ab", " ", "123", "45", " ", " ", "cd"}));
  EXPECT_TRUE(pre->Split("").empty());
  auto bad = RegexPreTokenizer::Create({"a", "(?<=x)"});
  EXPECT_EQ(bad.status().code(), StatusCode::kUnimplemented);
  EXPECT_NE(bad.status().message().find("(?<=x)"), std::string::npos) << bad.status().ToString();
}

TEST(RegexPreTokenizerTest, NamesAndKinds) {
  for (const char* name : {"deepseek-v3", "deepseek-llm", "deepseek-coder"}) {
    auto regexes = RegexesForPreTokenizerName(name);
    ASSERT_TRUE(regexes.has_value()) << name;
    auto pre = CompiledPreTokenizer::Create(name, {});
    ASSERT_TRUE(pre.ok()) << name << ": " << pre.status().ToString();
    EXPECT_FALSE(pre->kind().has_value());
  }
  EXPECT_EQ(RegexesForPreTokenizerName("deepseek-v3")->size(), 3u);
  EXPECT_EQ(RegexesForPreTokenizerName("deepseek-llm")->size(), 6u);
  EXPECT_FALSE(RegexesForPreTokenizerName("llama-bpe").has_value());
  for (PreTokenizer kind :
       {PreTokenizer::kGpt2, PreTokenizer::kLlama3, PreTokenizer::kQwen2, PreTokenizer::kSmolLm}) {
    EXPECT_EQ(PreTokenizerForRegexes(PreTokenizerRegexes(kind)), kind);
    EXPECT_EQ(PreTokenizerFromName(PreTokenizerName(kind)), kind);
    // Given as regexes, the hand-written matcher runs.
    auto pre = CompiledPreTokenizer::Create("", PreTokenizerRegexes(kind));
    ASSERT_TRUE(pre.ok());
    EXPECT_EQ(pre->kind(), kind);
  }
  EXPECT_EQ(CompiledPreTokenizer::Create("no-such-pre", {}).status().code(),
            StatusCode::kInvalidArgument);
}

// Random text over the characters the pre-tokenizer regexes tell apart, ill-formed bytes included.
std::string RandomText(std::mt19937& rng, int max_chars) {
  // clang-format off
  static const std::vector<std::string> kPool = {
      "a", "b", "Z", "s", " ", " ", "  ", "\n", "\r\n", "\r", "\t", "0", "7", "42", "'", "'s", "'LL",
      "'T", "'ſ", "ſ", "K", ".", ",", "!", "?", "\"", "-", "_", "é", "ß", "Ω", "ж", "日", "本", "一",
      "あ", "ア", "한", "ب", "क", "ि", "\u0301", "😀", "👍🏽", "²", "Ⅻ", "٣", "€", "©", "、",
      "\xC2\xA0", "\xE3\x80\x80", "\xE2\x80\xA8", "\x85", "\xFF", "\xC3", "\xE6\x97"};
  // clang-format on
  std::uniform_int_distribution<int> len(0, max_chars);
  std::uniform_int_distribution<size_t> pick(0, kPool.size() - 1);
  std::string s;
  for (int n = len(rng); n > 0; --n) s += kPool[pick(rng)];
  return s;
}

TEST(RegexPreTokenizerTest, HandWrittenMatchersAgreeWithTheirRegexes) {
  std::mt19937 rng(5);
  for (PreTokenizer kind :
       {PreTokenizer::kGpt2, PreTokenizer::kLlama3, PreTokenizer::kQwen2, PreTokenizer::kSmolLm}) {
    auto regex = RegexPreTokenizer::Create(PreTokenizerRegexes(kind));
    ASSERT_TRUE(regex.ok()) << regex.status().ToString();
    for (int i = 0; i < 3000; ++i) {
      const std::string text = RandomText(rng, 24);
      ASSERT_EQ(PreTokenize(kind, text), regex->Split(text))
          << PreTokenizerName(kind) << " text " << testing::PrintToString(text);
    }
  }
}

}  // namespace
}  // namespace helix
