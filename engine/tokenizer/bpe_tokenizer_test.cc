// Tests of the byte-level BPE tokenizer (VocabData model "gpt2"), the pre-tokenizers, the Unicode
// classes and LoadHfTokenizerJson, DeepSeek's tokenizer.json files included.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/tokenizer/pre_tokenizer.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/tokenizer/tokenizer_internal.h"
#include "engine/tokenizer/unicode.h"
#include "engine/tokenizer/vocab_data.h"

namespace helix {
namespace {

namespace fs = std::filesystem;
using Ids = std::vector<int32_t>;
using Chunks = std::vector<std::string_view>;

// ---------------------------------------------------------------------------------------------
// Helpers

// GPT-2's byte -> character table, written out here independently of bpe_tokenizer.cc: the
// printable Latin-1 bytes map to themselves, the rest to U+0100.. in byte order.
std::string MappedByte(unsigned char b) {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    uint32_t next = 0x100;
    for (int i = 0; i < 256; ++i) {
      const bool keep = (i >= 0x21 && i <= 0x7E) || (i >= 0xA1 && i <= 0xAC) || i >= 0xAE;
      t[i] = keep ? i : next++;
    }
    return t;
  }();
  std::string out;
  AppendUtf8(table[b], &out);
  return out;
}

std::string Mapped(std::string_view text) {
  std::string out;
  for (unsigned char b : text) out += MappedByte(b);
  return out;
}

// A byte-level vocabulary: ids 0..255 are the bytes (in byte order), then `extra` pieces given
// as raw text (mapped here), then `specials` as control tokens.
VocabData ByteLevelVocab(const std::vector<std::string>& extra,
                         const std::vector<std::string>& merges_raw,
                         const std::vector<std::string>& specials = {}) {
  VocabData d;
  d.model = "gpt2";
  d.pre = "gpt2";
  d.add_bos = false;
  for (int b = 0; b < 256; ++b) d.tokens.push_back(MappedByte(static_cast<unsigned char>(b)));
  for (const auto& e : extra) d.tokens.push_back(Mapped(e));
  d.token_types.assign(d.tokens.size(), kTokenNormal);
  for (const auto& s : specials) {
    d.tokens.push_back(s);
    d.token_types.push_back(kTokenControl);
  }
  for (const auto& m : merges_raw) {  // "left right" in raw text; a space inside is written ' '.
    const size_t sp = m.find('|');
    d.merges.push_back(Mapped(m.substr(0, sp)) + " " + Mapped(m.substr(sp + 1)));
  }
  return d;
}

std::unique_ptr<Tokenizer> MustCreate(VocabData d) {
  auto t = CreateTokenizer(std::move(d));
  EXPECT_TRUE(t.ok()) << t.status().ToString();
  return t.ok() ? std::move(t).value() : nullptr;
}

std::string SourceDir() {
  const char* env = std::getenv("HELIX_SOURCE_DIR");
  if (env != nullptr) return env;
  return fs::path(__FILE__).parent_path().parent_path().parent_path().string();
}

std::string TinyLlama3Dir() { return SourceDir() + "/engine/tokenizer/testdata/tiny_llama3"; }

// A fresh directory under the system temp dir, removed with the object.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "helix_bpe_XXXXXX").string();
    if (mkdtemp(tmpl.data()) != nullptr) path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) fs::remove_all(path_, ec);
  }
  std::string Write(const std::string& name, const std::string& content) const {
    const std::string p = (path_ / name).string();
    std::ofstream(p, std::ios::binary) << content;
    return p;
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

// Random text over ASCII, Latin-1, Greek, Cyrillic, CJK, emoji, whitespace and digits.
std::string RandomText(std::mt19937& rng, int max_chars) {
  // clang-format off
  static const std::vector<std::string> kPool = {
      "a", "b", "z", "Q", " ", " ", "  ", "\n", "\r\n", "\t", "0", "7", "'s", "'LL", ".", ",", "!",
      "\"", "é", "ß", "Ω", "ж", "日", "本", "ア", "한", "ب", "क", "ि", "😀", "👍🏽", "²",
      "\xC2\xA0", "\xE3\x80\x80", "<|im_start|>", "<|im_end|>"};
  // clang-format on
  std::uniform_int_distribution<int> len(0, max_chars);
  std::uniform_int_distribution<size_t> pick(0, kPool.size() - 1);
  std::string s;
  for (int n = len(rng); n > 0; --n) s += kPool[pick(rng)];
  return s;
}

// ---------------------------------------------------------------------------------------------
// Unicode classes and UTF-8

TEST(UnicodeTest, ClassesOfScripts) {
  // a é Ω ж 日 ア 한 ب ש क ʰ (Lm), and one from CJK Extension B.
  for (uint32_t cp :
       {0x61, 0xE9, 0x3A9, 0x436, 0x65E5, 0x30A2, 0xD55C, 0x628, 0x5E9, 0x915, 0x2B0, 0x20000}) {
    EXPECT_EQ(ClassOf(cp), UnicodeClass::kLetter) << "U+" << std::hex << cp;
  }
  // 7 ² ٣ Ⅻ ５ and a mathematical digit.
  for (uint32_t cp : {0x37, 0xB2, 0x663, 0x216B, 0xFF15, 0x1D7CE}) {
    EXPECT_EQ(ClassOf(cp), UnicodeClass::kNumber) << "U+" << std::hex << cp;
  }
  // Space, newline, NEL, NBSP, ideographic space, line separator.
  for (uint32_t cp : {0x20, 0x0A, 0x85, 0xA0, 0x3000, 0x2028}) {
    EXPECT_EQ(ClassOf(cp), UnicodeClass::kWhitespace) << "U+" << std::hex << cp;
  }
  // ZWSP, ी (Mc), combining acute, 、, 😀, _, an ill-formed byte, an unassigned code point.
  for (uint32_t cp :
       {0x200Bu, 0x940u, 0x301u, 0x3001u, 0x1F600u, 0x5Fu, kInvalidCodePoint, 0x10FFFFu}) {
    EXPECT_EQ(ClassOf(cp), UnicodeClass::kOther) << "U+" << std::hex << cp;
  }
}

TEST(UnicodeTest, DecodeRejectsIllFormed) {
  struct Case {
    std::string bytes;
    uint32_t cp, len;
  };
  const Case cases[] = {
      {"A", 'A', 1},
      {"\xC3\xA9", 0xE9, 2},
      {"\xE6\x97\xA5", 0x65E5, 3},
      {"\xF0\x9F\x98\x80", 0x1F600, 4},
      {"\xC0\x80", kInvalidCodePoint, 1},          // Overlong.
      {"\xED\xA0\x80", kInvalidCodePoint, 1},      // Surrogate.
      {"\xF4\x90\x80\x80", kInvalidCodePoint, 1},  // Past U+10FFFF.
      {"\xE6\x97", kInvalidCodePoint, 1},          // Truncated.
      {"\x80", kInvalidCodePoint, 1},
  };
  for (const Case& c : cases) {
    const Utf8Char got = DecodeUtf8(c.bytes, 0);
    EXPECT_EQ(got.cp, c.cp) << testing::PrintToString(c.bytes);
    EXPECT_EQ(got.len, c.len) << testing::PrintToString(c.bytes);
  }
  std::string s;
  for (uint32_t cp : {0x41u, 0x7FFu, 0x800u, 0xFFFFu, 0x10000u, 0x10FFFFu}) {
    s.clear();
    AppendUtf8(cp, &s);
    EXPECT_EQ(DecodeUtf8(s, 0).cp, cp);
    EXPECT_EQ(DecodeUtf8(s, 0).len, s.size());
  }
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenizers. Expected chunks come from Hugging Face tokenizers 0.23.3's Split(Regex(...),
// "isolated") with the same regexes (and Digits(individual_digits) first for smollm).

struct SplitCase {
  std::string text;
  std::vector<std::string> chunks;
};

void ExpectSplits(PreTokenizer kind, const std::vector<SplitCase>& cases) {
  for (const auto& c : cases) {
    const Chunks got = PreTokenize(kind, c.text);
    EXPECT_EQ(std::vector<std::string>(got.begin(), got.end()), c.chunks)
        << "text: " << testing::PrintToString(c.text);
  }
}

TEST(PreTokenizerTest, Gpt2) {
  ExpectSplits(PreTokenizer::kGpt2,
               {
                   {"  hello", {" ", " hello"}},
                   {"hello   world", {"hello", "  ", " world"}},
                   {"a\n\nb", {"a", "\n", "\n", "b"}},
                   {"I'm", {"I", "'m"}},
                   {"abc123456", {"abc", "123456"}},
                   {"é日本", {"é日本"}},
                   {"don'T stop", {"don", "'", "T", " stop"}},
                   {"x  \n y", {"x", "  \n", " y"}},
                   {"\t\tfoo", {"\t", "\t", "foo"}},
                   {"12,345.67", {"12", ",", "345", ".", "67"}},
                   {"(hello) ok!!\n\n", {"(", "hello", ")", " ok", "!!", "\n\n"}},
                   {"trailing  ", {"trailing", "  "}},
                   {"日本語、テキスト", {"日本語", "、", "テキスト"}},
                   {"", {}},
               });
}

TEST(PreTokenizerTest, Llama3) {
  ExpectSplits(PreTokenizer::kLlama3, {
                                          {"  hello", {" ", " hello"}},
                                          {"hello   world", {"hello", "  ", " world"}},
                                          {"a\n\nb", {"a", "\n\n", "b"}},
                                          {"I'm", {"I", "'m"}},
                                          {"abc123456", {"abc", "123", "456"}},
                                          {"é日本", {"é日本"}},
                                          {"don'T stop", {"don", "'T", " stop"}},
                                          {"x  \n y", {"x", "  \n", " y"}},
                                          {"\t\tfoo", {"\t", "\tfoo"}},
                                          {"12,345.67", {"12", ",", "345", ".", "67"}},
                                          {"(hello) ok!!\n\n", {"(hello", ")", " ok", "!!\n\n"}},
                                          {"I'M fine", {"I", "'M", " fine"}},
                                          {"trailing  ", {"trailing", "  "}},
                                          {"日本語、テキスト", {"日本語", "、テキスト"}},
                                      });
}

TEST(PreTokenizerTest, Qwen2) {
  ExpectSplits(PreTokenizer::kQwen2,
               {
                   {"a\n\nb", {"a", "\n\n", "b"}},
                   {"abc123456", {"abc", "1", "2", "3", "4", "5", "6"}},
                   {"don'T stop", {"don", "'T", " stop"}},
                   {"\t\tfoo", {"\t", "\tfoo"}},
                   {"12,345.67", {"1", "2", ",", "3", "4", "5", ".", "6", "7"}},
                   {"(hello) ok!!\n\n", {"(hello", ")", " ok", "!!\n\n"}},
               });
}

TEST(PreTokenizerTest, SmolLm) {
  ExpectSplits(PreTokenizer::kSmolLm,
               {
                   {"  hello", {" ", " hello"}},
                   {"a\n\nb", {"a", "\n", "\n", "b"}},
                   {"abc123456", {"abc", "1", "2", "3", "4", "5", "6"}},
                   {"é日本", {"é日本"}},
                   {"12,345.67", {"1", "2", ",", "3", "4", "5", ".", "6", "7"}},
                   {"(hello) ok!!\n\n", {"(", "hello", ")", " ok", "!!", "\n\n"}},
                   // The space before a digit is a chunk of its own: the lookahead stops there.
                   {"world! 123", {"world", "!", " ", "1", "2", "3"}},
               });
}

TEST(PreTokenizerTest, ChunksCoverTheTextExactly) {
  std::mt19937 rng(11);
  for (PreTokenizer kind :
       {PreTokenizer::kGpt2, PreTokenizer::kLlama3, PreTokenizer::kQwen2, PreTokenizer::kSmolLm}) {
    for (int i = 0; i < 100; ++i) {
      std::string text = RandomText(rng, 30);
      if (i % 10 == 0) text += "\xFF\xC3";  // Ill-formed bytes too.
      std::string joined;
      for (std::string_view c : PreTokenize(kind, text)) {
        EXPECT_FALSE(c.empty());
        joined += c;
      }
      EXPECT_EQ(joined, text);
    }
  }
}

TEST(PreTokenizerTest, Names) {
  EXPECT_EQ(PreTokenizerFromName(""), PreTokenizer::kGpt2);
  EXPECT_EQ(PreTokenizerFromName("default"), PreTokenizer::kGpt2);
  EXPECT_EQ(PreTokenizerFromName("llama-bpe"), PreTokenizer::kLlama3);
  EXPECT_EQ(PreTokenizerFromName("qwen2"), PreTokenizer::kQwen2);
  EXPECT_EQ(PreTokenizerFromName("smollm"), PreTokenizer::kSmolLm);
  EXPECT_EQ(PreTokenizerFromName("no-such-thing"), std::nullopt);
  EXPECT_TRUE(PreTokenizerIgnoresMerges("llama-bpe"));
  EXPECT_FALSE(PreTokenizerIgnoresMerges("qwen2"));
}

// ---------------------------------------------------------------------------------------------
// BPE merging with vocabularies built here

constexpr int32_t kFirstExtra = 256;

TEST(BpeTokenizerTest, MergesApplyInRankOrder) {
  // Pieces: ab (256), bc (257). "abc" ends as [ab, c] or [a, bc] depending on which merge ranks
  // first, whatever their order in the vocabulary.
  const std::vector<std::string> extra = {"ab", "bc"};
  auto ab_first = MustCreate(ByteLevelVocab(extra, {"a|b", "b|c"}));
  auto bc_first = MustCreate(ByteLevelVocab(extra, {"b|c", "a|b"}));
  ASSERT_TRUE(ab_first && bc_first);
  EXPECT_EQ(ab_first->Encode("abc", false), (Ids{kFirstExtra, 'c'}));
  EXPECT_EQ(bc_first->Encode("abc", false), (Ids{'a', kFirstExtra + 1}));
}

TEST(BpeTokenizerTest, MergesChainAndTiesGoLeftmost) {
  // aa (256), aaa (257) from "aa a", aaaa (258) from "aa aa".
  auto tok = MustCreate(ByteLevelVocab({"aa", "aaa", "aaaa"}, {"a|a", "aa|aa", "aa|a"}));
  ASSERT_TRUE(tok);
  EXPECT_EQ(tok->Encode("a", false), (Ids{'a'}));
  EXPECT_EQ(tok->Encode("aaa", false), (Ids{257}));   // aa+a, the leftmost pair first.
  EXPECT_EQ(tok->Encode("aaaa", false), (Ids{258}));  // aa aa, then aa+aa beats aa+a.
  EXPECT_EQ(tok->Encode("aaaaa", false), (Ids{258, 'a'}));
  // A long run merges in O(n log n): 20000 a's become 5000 aaaa's.
  const Ids long_run = tok->Encode(std::string(20000, 'a'), false);
  EXPECT_EQ(long_run, Ids(5000, 258));
}

TEST(BpeTokenizerTest, MergesStayWithinChunks) {
  // "a " is a piece with a merge, but "a the" splits as "a" + " the": it never forms.
  auto tok = MustCreate(ByteLevelVocab({" t", "a ", "he", " the"}, {" |t", "a| ", "h|e", " t|he"}));
  ASSERT_TRUE(tok);
  EXPECT_EQ(tok->Encode("the", false), (Ids{'t', kFirstExtra + 2}));
  EXPECT_EQ(tok->Encode(" the", false), (Ids{kFirstExtra + 3}));
  EXPECT_EQ(tok->Encode("a the", false), (Ids{'a', kFirstExtra + 3}));
}

TEST(BpeTokenizerTest, EveryByteEncodesAndDecodes) {
  auto tok = MustCreate(ByteLevelVocab({}, {}));
  ASSERT_TRUE(tok);
  std::string all;
  for (int b = 0; b < 256; ++b) all.push_back(static_cast<char>(b));
  const Ids ids = tok->Encode(all, false);
  ASSERT_EQ(ids.size(), 256u);
  for (int b = 0; b < 256; ++b) EXPECT_EQ(ids[b], b);
  EXPECT_EQ(tok->Decode(ids), all);
  EXPECT_EQ(tok->piece(' '), "\xC4\xA0");   // Ġ
  EXPECT_EQ(tok->piece('\n'), "\xC4\x8A");  // Ċ
  EXPECT_EQ(tok->TokenBytes(' ', -1), " ");
}

TEST(BpeTokenizerTest, MissingBytesBecomeUnkOrVanish) {
  VocabData d;
  d.model = "gpt2";
  d.tokens = {"a", "b", "<unk>"};
  d.token_types = {kTokenNormal, kTokenNormal, kTokenUnknown};
  auto without_unk = MustCreate(d);
  d.unk_id = 2;
  auto with_unk = MustCreate(d);
  ASSERT_TRUE(without_unk && with_unk);
  EXPECT_EQ(without_unk->Encode("axb", false), (Ids{0, 1}));
  EXPECT_EQ(with_unk->Encode("axb", false), (Ids{0, 2, 1}));
}

TEST(BpeTokenizerTest, SpecialTokensMatchFirst) {
  auto tok = MustCreate(ByteLevelVocab({"<|", "im"}, {"<||", "i|m"},
                                       {"<|im_start|>", "<|im_end|>", "<|im_start|>x"}));
  ASSERT_TRUE(tok);
  const int32_t start = 258, end = 259, start_x = 260;
  EXPECT_EQ(tok->Encode("<|im_start|>user\nHi<|im_end|>", false),
            (Ids{start, 'u', 's', 'e', 'r', '\n', 'H', 'i', end}));
  // Adjacent, inside a word, and the longest at a position wins.
  EXPECT_EQ(tok->Encode("a<|im_end|><|im_end|>b", false), (Ids{'a', end, end, 'b'}));
  EXPECT_EQ(tok->Encode("<|im_start|>x", false), (Ids{start_x}));
  // A partial special token is ordinary text.
  EXPECT_EQ(tok->Encode("<|im_sta", false), (Ids{256, 257, '_', 's', 't', 'a'}));
  // Special tokens decode to their text.
  EXPECT_EQ(tok->Decode(tok->Encode("<|im_start|>hi<|im_end|>", false)),
            "<|im_start|>hi<|im_end|>");
  EXPECT_EQ(tok->stop_ids(), (Ids{end}));  // No eos given: <|im_end|> by its name.
}

// Each position compared every special token with its first byte, the sum of their lengths:
// thousands of them sharing a prefix took seconds per kilobyte of prompt. The leftmost-longest
// choice is unchanged (SpecialTokenMatcherTest below).
TEST(BpeTokenizerTest, ManySpecialTokensSharingAPrefixEncodeFast) {
  const int kTokens = 6000;  // "ab", "aab", ..., a^5999 b
  std::vector<std::string> specials;
  for (int k = 1; k < kTokens; ++k) specials.push_back(std::string(k, 'a') + "b");
  auto tok = MustCreate(ByteLevelVocab({}, {}, specials));
  ASSERT_TRUE(tok);
  const std::string text = std::string(12000, 'a') + "b";
  const auto t0 = std::chrono::steady_clock::now();
  const Ids ids = tok->Encode(text, false);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_LT(seconds, 2.0);
  // The longest special token that fits the end, after plain a's.
  Ids want(12000 - (kTokens - 1), 'a');
  want.push_back(256 + kTokens - 2);
  EXPECT_EQ(ids, want);
}

TEST(BpeTokenizerTest, OneRegexBudgetAcrossSpecialTokens) {
  // The fragments between special tokens share the text's backtracking budget: (?:a|a)*b tries
  // about 2^14 ways per start on a run of 12 a's, little for one fragment but far more than a
  // 100 KB text's budget over all of them. Once it is spent, the later fragments stay whole (and
  // merge into aa's) instead of each starting a budget afresh.
  VocabData d = ByteLevelVocab({"aa"}, {"a|a"}, {"<s>"});
  d.pre_regexes = {"(?:a|a)*b|a"};
  auto tok = MustCreate(std::move(d));
  ASSERT_TRUE(tok);
  const int32_t aa = kFirstExtra, s = kFirstExtra + 1;
  const std::string unit = std::string(12, 'a') + "<s>";
  std::string text;
  while (text.size() < 100000) text += unit;
  const Ids ids = tok->Encode(text, false);
  ASSERT_GE(ids.size(), 13u);
  Ids first(12, 'a');
  first.push_back(s);
  EXPECT_EQ(Ids(ids.begin(), ids.begin() + 13), first);
  EXPECT_EQ(Ids(ids.end() - 7, ids.end()), (Ids{aa, aa, aa, aa, aa, aa, s}));
  // 13 ids a unit when split, 7 when whole: most stay whole.
  EXPECT_LT(ids.size(), text.size() / unit.size() * 8);
  EXPECT_EQ(tok->Decode(ids), text);
}

TEST(BpeTokenizerTest, BosAndStopIds) {
  VocabData d = ByteLevelVocab({}, {}, {"<s>", "</s>", "<|eot|>", "<|endoftext|>"});
  d.bos_id = 256;
  d.eos_id = 257;
  d.eot_id = 258;
  d.add_bos = true;
  auto tok = MustCreate(d);
  ASSERT_TRUE(tok);
  EXPECT_EQ(tok->Encode("", true), (Ids{256}));
  EXPECT_EQ(tok->Encode("", false), (Ids{}));
  EXPECT_EQ(tok->Encode("a", true), (Ids{256, 'a'}));
  EXPECT_EQ(tok->bos_id(), 256);
  EXPECT_EQ(tok->eos_id(), 257);
  EXPECT_EQ(tok->stop_ids(), (Ids{257, 258, 259}));
  d.add_bos = false;
  tok = MustCreate(d);
  ASSERT_TRUE(tok);
  EXPECT_EQ(tok->Encode("a", true), (Ids{'a'}));
}

TEST(BpeTokenizerTest, RandomRoundTrips) {
  VocabData d =
      ByteLevelVocab({" t", "he", " the", "in", "日本"}, {" |t", "h|e", " t|he", "i|n", "日|本"},
                     {"<|im_start|>", "<|im_end|>"});
  std::mt19937 rng(20240601);
  for (const char* pre : {"gpt2", "llama-bpe", "qwen2", "smollm"}) {
    d.pre = pre;
    auto tok = MustCreate(d);
    ASSERT_TRUE(tok);
    for (int i = 0; i < 200; ++i) {
      const std::string text = RandomText(rng, 40);
      const Ids ids = tok->Encode(text, false);
      ASSERT_EQ(tok->Decode(ids), text) << pre << ": " << testing::PrintToString(text);
      IncrementalDetokenizer detok(*tok);
      std::string streamed;
      for (int32_t id : ids) streamed += detok.Push(id);
      streamed += detok.Flush();
      EXPECT_EQ(streamed, text) << pre;
    }
  }
}

// Generated text skips control tokens (skip_control), but not user-defined ones; by default the
// stream is Decode's.
TEST(BpeTokenizerTest, DetokenizerCanSkipControlTokens) {
  VocabData d = ByteLevelVocab({}, {}, {"<|im_start|>", "<|im_end|>"});
  d.tokens.push_back("<tool>");
  d.token_types.push_back(kTokenUserDefined);
  auto tok = MustCreate(d);
  ASSERT_TRUE(tok);
  const Ids ids = tok->Encode("a<|im_end|>b<tool>c<|im_start|>", false);
  ASSERT_EQ(tok->Decode(ids), "a<|im_end|>b<tool>c<|im_start|>");
  for (const bool skip : {false, true}) {
    IncrementalDetokenizer detok(*tok, -1, skip);
    std::string out;
    for (int32_t id : ids) out += detok.Push(id);
    out += detok.Flush();
    EXPECT_EQ(out, skip ? "ab<tool>c" : "a<|im_end|>b<tool>c<|im_start|>");
  }
  EXPECT_TRUE(tok->is_control(tok->Encode("<|im_end|>", false)[0]));
  EXPECT_FALSE(tok->is_control(tok->Encode("<tool>", false)[0]));
  EXPECT_FALSE(tok->is_control('a'));
}

// A stop string that is exactly one control token's text names that token.
TEST(BpeTokenizerTest, StopStringsNamingControlTokens) {
  auto tok = MustCreate(ByteLevelVocab({}, {}, {"<|im_start|>", "<|im_end|>"}));
  ASSERT_TRUE(tok);
  const int32_t end = tok->Encode("<|im_end|>", false)[0];
  EXPECT_EQ(ControlTokensNamedBy(*tok, {"x", "<|im_end|>", "<|im_end|>x", "<|im_end|>"}),
            (Ids{end}));
  EXPECT_EQ(ControlTokensNamedBy(*tok, {"<|im_start|>", "a"}),
            (Ids{tok->Encode("<|im_start|>", false)[0]}));
  EXPECT_TRUE(ControlTokensNamedBy(*tok, {"<|im_end", ""}).empty());
}

TEST(BpeTokenizerTest, ConcurrentEncodesAgree) {
  auto tok = MustCreate(ByteLevelVocab({" t", "he", " the"}, {" |t", "h|e", " t|he"}));
  ASSERT_TRUE(tok);
  std::mt19937 rng(5);
  std::vector<std::string> texts;
  for (int i = 0; i < 50; ++i) texts.push_back(RandomText(rng, 60));
  std::vector<Ids> expected;
  for (const auto& t : texts) expected.push_back(tok->Encode(t, false));
  std::vector<std::thread> threads;
  std::vector<int> mismatches(4, 0);
  for (int k = 0; k < 4; ++k) {
    threads.emplace_back([&, k] {
      for (int round = 0; round < 20; ++round) {
        for (size_t i = 0; i < texts.size(); ++i) {
          if (tok->Encode(texts[i], false) != expected[i]) ++mismatches[k];
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(mismatches, std::vector<int>(4, 0));
}

TEST(BpeTokenizerTest, MergeWithSpaceInsidePiece) {
  // Pieces may hold spaces outside byte-level vocabularies; a merge splits at the first space
  // whose two sides are both pieces, and one with no such split is skipped.
  VocabData d;
  d.model = "gpt2";
  d.tokens = {"a", "b", "c", " b", "a b", "a bc"};
  d.merges = {"a  b", "a b c", "x y z"};
  auto tok = CreateTokenizer(d);
  EXPECT_TRUE(tok.ok()) << tok.status().ToString();
}

TEST(CreateTokenizerTest, RejectsBadDataNamingTheField) {
  const VocabData good = ByteLevelVocab({"ab"}, {"a|b"});
  ASSERT_TRUE(CreateTokenizer(good).ok());
  struct Case {
    std::function<void(VocabData&)> mutate;
    StatusCode code;
    std::string needle;
  };
  const Case cases[] = {
      {[](VocabData& d) { d.model = ""; }, StatusCode::kInvalidArgument, "VocabData.model"},
      {[](VocabData& d) { d.model = "bert"; }, StatusCode::kUnimplemented, "bert"},
      {[](VocabData& d) { d.tokens.clear(); }, StatusCode::kInvalidArgument, "VocabData.tokens"},
      {[](VocabData& d) { d.scores = {1.0f}; }, StatusCode::kInvalidArgument, "VocabData.scores"},
      {[](VocabData& d) { d.token_types.pop_back(); }, StatusCode::kInvalidArgument,
       "VocabData.token_types"},
      {[](VocabData& d) { d.token_types[3] = 9; }, StatusCode::kInvalidArgument, "token_types[3]"},
      {[](VocabData& d) { d.bos_id = 257; }, StatusCode::kInvalidArgument, "VocabData.bos_id"},
      {[](VocabData& d) { d.eos_id = -2; }, StatusCode::kInvalidArgument, "VocabData.eos_id"},
      {[](VocabData& d) { d.merges.push_back("ab"); }, StatusCode::kInvalidArgument,
       "VocabData.merges[1]"},
      {[](VocabData& d) { d.merges.push_back("a "); }, StatusCode::kInvalidArgument,
       "VocabData.merges[1]"},
      {[](VocabData& d) { d.pre = "klingon"; }, StatusCode::kInvalidArgument, "VocabData.pre"},
      {[](VocabData& d) {
         d.pre_regexes = {"a", "(?<=b)c"};
       },
       StatusCode::kUnimplemented, "VocabData.pre_regexes[1] \"(?<=b)c\""},
      {[](VocabData& d) { d.pre_regexes = {"[b-a]"}; }, StatusCode::kInvalidArgument,
       "VocabData.pre_regexes[0]"},
  };
  for (const Case& c : cases) {
    VocabData d = good;
    c.mutate(d);
    auto t = CreateTokenizer(std::move(d));
    ASSERT_FALSE(t.ok()) << c.needle;
    EXPECT_EQ(t.status().code(), c.code) << t.status().ToString();
    EXPECT_NE(t.status().message().find(c.needle), std::string::npos) << t.status().ToString();
  }
  // Merges whose pieces are not in the vocabulary cannot apply: skipped, not an error.
  VocabData d = good;
  d.merges.push_back("x y");
  EXPECT_TRUE(CreateTokenizer(d).ok());
  // The regex-engine names and regex lists are accepted.
  for (const char* name : {"deepseek-v3", "deepseek-llm", "deepseek-coder"}) {
    VocabData named = good;
    named.pre = name;
    EXPECT_TRUE(CreateTokenizer(named).ok()) << name;
  }
  VocabData regexes = good;
  regexes.pre_regexes = {R"(\p{N}{1,3})", R"(\s+|\S+)"};
  auto tok = CreateTokenizer(regexes);
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  EXPECT_EQ((*tok)->Encode("ab ab1234", false),
            (Ids{kFirstExtra, ' ', kFirstExtra, '1', '2', '3', '4'}));
}

// The matcher against the plain definition: at each position the longest matched piece there
// (the lowest id among identical ones), else one byte of ordinary text.
TEST(SpecialTokenMatcherTest, LeftmostLongestLikeThePlainDefinition) {
  using tokenizer_internal::SpecialTokenMatcher;
  std::mt19937 rng(7);
  const std::string alphabet = "ab<|\xC3";
  auto random_text = [&](int max_len) {
    std::string t(rng() % (max_len + 1), ' ');
    for (char& c : t) c = alphabet[rng() % alphabet.size()];
    return t;
  };
  for (int round = 0; round < 200; ++round) {
    std::vector<std::string> tokens;
    std::vector<int32_t> types;
    const int n = 1 + static_cast<int>(rng() % 30);
    for (int i = 0; i < n; ++i) {
      // Repeats, prefixes of one another, and empty pieces.
      tokens.push_back(i > 0 && rng() % 5 == 0 ? tokens[rng() % i] : random_text(5));
      types.push_back(static_cast<int32_t>(
          std::array{kTokenNormal, kTokenControl, kTokenUserDefined}[rng() % 3]));
    }
    const SpecialTokenMatcher matcher(tokens, types, {kTokenControl, kTokenUserDefined});
    for (int t = 0; t < 20; ++t) {
      const std::string text = random_text(40);
      std::vector<SpecialTokenMatcher::Fragment> got;
      matcher.Split(text, &got);
      std::vector<std::pair<std::string, int32_t>> want;
      std::string plain;
      for (size_t i = 0; i < text.size();) {
        int32_t best = -1;
        for (int32_t id = 0; id < n; ++id) {
          const std::string& p = tokens[id];
          if (types[id] == kTokenNormal || p.empty() || text.compare(i, p.size(), p) != 0) continue;
          if (best < 0 || p.size() > tokens[best].size()) best = id;
        }
        if (best < 0) {
          plain += text[i++];
          continue;
        }
        if (!plain.empty()) want.emplace_back(std::move(plain), -1);
        plain.clear();
        want.emplace_back(tokens[best], best);
        i += tokens[best].size();
      }
      if (!plain.empty()) want.emplace_back(plain, -1);
      std::vector<std::pair<std::string, int32_t>> got_pairs;
      for (const auto& f : got) got_pairs.emplace_back(std::string(f.text), f.id);
      ASSERT_EQ(got_pairs, want) << "round " << round << ", text " << text;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// LoadHfTokenizerJson

constexpr char kByteLevelPreTokenizer[] =
    R"({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})";

// Llama 3's Split regex as a tokenizer.json holds it (JSON-escaped).
constexpr char kLlama3RegexJson[] =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}|)"
    R"( ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+)";

std::string Llama3PreTokenizerJson() {
  return R"({"type": "Sequence", "pretokenizers": [
      {"type": "Split", "pattern": {"Regex": ")" +
         std::string(kLlama3RegexJson) + R"("}, "behavior": "Isolated"},
      {"type": "ByteLevel", "add_prefix_space": false, "use_regex": false}]})";
}

// A hand-written tokenizer.json: GPT-2 style, merges in both of the forms HF writes.
std::string SmallTokenizerJson(const std::string& pre_tokenizer = kByteLevelPreTokenizer) {
  return R"({
  "version": "1.0",
  "added_tokens": [
    {"id": 5, "content": "<|im_start|>", "special": true, "normalized": false},
    {"id": 6, "content": "<|im_end|>", "special": true, "normalized": false},
    {"id": 7, "content": "<tool>", "special": false, "normalized": false}
  ],
  "normalizer": null,
  "pre_tokenizer": )" +
         pre_tokenizer + R"(,
  "post_processor": {"type": "ByteLevel"},
  "decoder": {"type": "ByteLevel"},
  "model": {"type": "BPE", "unk_token": null, "byte_fallback": false,
            "vocab": {"a": 0, "b": 1, "ab": 2, "\u0120": 3, "\u0120ab": 4, "<|im_start|>": 5,
                      "<|im_end|>": 6, "<tool>": 7},
            "merges": ["a b", ["\u0120", "ab"]]}
})";
}

constexpr char kSmallConfigJson[] = R"({
  "bos_token": "<|im_start|>",
  "eos_token": {"__type": "AddedToken", "content": "<|im_end|>"},
  "add_bos_token": false,
  "chat_template": "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
})";

TEST(HfTokenizerJsonTest, LoadsVocabMergesAddedTokensAndConfig) {
  TempDir dir;
  const std::string json = dir.Write("tokenizer.json", SmallTokenizerJson());
  const std::string config = dir.Write("tokenizer_config.json", kSmallConfigJson);
  auto data = LoadHfTokenizerJson(json, config);
  ASSERT_TRUE(data.ok()) << data.status().ToString();
  EXPECT_EQ(data->model, "gpt2");
  EXPECT_EQ(data->pre, "gpt2");
  ASSERT_EQ(data->tokens.size(), 8u);
  EXPECT_EQ(data->merges, (std::vector<std::string>{"a b", "\xC4\xA0 ab"}));
  EXPECT_EQ(data->token_types[5], kTokenControl);
  EXPECT_EQ(data->token_types[7], kTokenUserDefined);
  EXPECT_EQ(data->token_types[2], kTokenNormal);
  EXPECT_EQ(data->bos_id, 5);
  EXPECT_EQ(data->eos_id, 6);
  EXPECT_FALSE(data->add_bos);
  auto tok = CreateTokenizer(*data);
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  EXPECT_EQ((*tok)->Encode("<|im_start|>ab ab<tool><|im_end|>", true), (Ids{5, 2, 4, 7, 6}));
  EXPECT_EQ((*tok)->Decode({5, 2, 4, 7, 6}), "<|im_start|>ab ab<tool><|im_end|>");
  EXPECT_EQ((*tok)->chat_template(),
            "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}");
  EXPECT_EQ((*tok)->stop_ids(), (Ids{6}));

  // Without a config: no BOS/EOS, no template.
  auto bare = LoadHfTokenizerJson(json, "");
  ASSERT_TRUE(bare.ok()) << bare.status().ToString();
  EXPECT_EQ(bare->bos_id, -1);
  EXPECT_EQ(bare->eos_id, -1);
  EXPECT_EQ(bare->chat_template, "");
}

TEST(HfTokenizerJsonTest, ChatTemplateList) {
  TempDir dir;
  const std::string json = dir.Write("tokenizer.json", SmallTokenizerJson());
  const std::string config =
      dir.Write("tokenizer_config.json",
                R"({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default",
          "template": "D"}]})");
  auto data = LoadHfTokenizerJson(json, config);
  ASSERT_TRUE(data.ok()) << data.status().ToString();
  EXPECT_EQ(data->chat_template, "D");
}

std::string Replace(std::string s, const std::string& from, const std::string& to) {
  const size_t pos = s.find(from);
  EXPECT_NE(pos, std::string::npos) << from;
  if (pos != std::string::npos) s.replace(pos, from.size(), to);
  return s;
}

TEST(HfTokenizerJsonTest, Errors) {
  TempDir dir;
  const std::string good = SmallTokenizerJson();
  const std::string config = dir.Write("config.json", kSmallConfigJson);
  auto load = [&](const std::string& json_text, const std::string& config_path = "") {
    return LoadHfTokenizerJson(dir.Write("t.json", json_text), config_path);
  };
  EXPECT_EQ(LoadHfTokenizerJson((dir.path() / "missing.json").string(), "").status().code(),
            StatusCode::kNotFound);
  EXPECT_EQ(
      LoadHfTokenizerJson(dir.Write("ok.json", good), (dir.path() / "missing_config.json").string())
          .status()
          .code(),
      StatusCode::kNotFound);
  EXPECT_EQ(load("{not json").status().code(), StatusCode::kInvalidArgument);

  auto word_piece = load(Replace(good, R"("type": "BPE")", R"("type": "WordPiece")"));
  EXPECT_EQ(word_piece.status().code(), StatusCode::kUnimplemented);
  EXPECT_NE(word_piece.status().message().find("WordPiece"), std::string::npos);

  auto bad_merge = load(Replace(good, R"(["\u0120", "ab"])", R"(["\u0120"])"));
  EXPECT_EQ(bad_merge.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad_merge.status().message().find("model.merges[1]"), std::string::npos)
      << bad_merge.status().ToString();

  // A string merge without a separator parses here and is refused by CreateTokenizer.
  auto joined = load(Replace(good, R"("a b")", R"("ab")"));
  ASSERT_TRUE(joined.ok()) << joined.status().ToString();
  auto tok = CreateTokenizer(*joined);
  EXPECT_EQ(tok.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(tok.status().message().find("VocabData.merges[0]"), std::string::npos);

  auto bad_id = load(Replace(good, R"("ab": 2)", R"("ab": "two")"));
  EXPECT_EQ(bad_id.status().code(), StatusCode::kInvalidArgument);
  auto huge_id = load(Replace(good, R"("ab": 2)", R"("ab": 99999999999)"));
  EXPECT_EQ(huge_id.status().code(), StatusCode::kInvalidArgument);
  auto dup_id = load(Replace(good, R"("ab": 2)", R"("ab": 1)"));
  EXPECT_EQ(dup_id.status().code(), StatusCode::kInvalidArgument);

  // Any Split regex is read; one the engine cannot run is refused, naming the pattern.
  auto other_regex = load(SmallTokenizerJson(R"({"type": "Sequence", "pretokenizers": [
      {"type": "Split", "pattern": {"Regex": "\\w+"}, "behavior": "Isolated"},
      {"type": "ByteLevel", "use_regex": false}]})"));
  ASSERT_TRUE(other_regex.ok()) << other_regex.status().ToString();
  EXPECT_EQ(other_regex->pre_regexes, (std::vector<std::string>{"\\w+"}));
  auto lookbehind = load(SmallTokenizerJson(R"({"type": "Sequence", "pretokenizers": [
      {"type": "Split", "pattern": {"Regex": "\\p{N}"}, "behavior": "Isolated"},
      {"type": "Split", "pattern": {"Regex": "(?<=a)b|c"}, "behavior": "Isolated"},
      {"type": "ByteLevel", "use_regex": false}]})"));
  EXPECT_EQ(lookbehind.status().code(), StatusCode::kUnimplemented)
      << lookbehind.status().ToString();
  EXPECT_NE(lookbehind.status().message().find("Split regex \"(?<=a)b|c\""), std::string::npos)
      << lookbehind.status().ToString();
  EXPECT_NE(lookbehind.status().message().find("lookbehind"), std::string::npos);
  // Sequences nested past any real tokenizer's depth are refused (memory grew with the square
  // of the depth); 16 levels still load.
  auto nested_to = [](int depth) {
    std::string s = R"({"type": "ByteLevel"})";
    for (int i = 0; i < depth; ++i) s = R"({"type": "Sequence", "pretokenizers": [)" + s + "]}";
    return SmallTokenizerJson(s);
  };
  auto deep_ok = load(nested_to(16));
  EXPECT_TRUE(deep_ok.ok()) << deep_ok.status().ToString();
  auto deep = load(nested_to(20));
  EXPECT_EQ(deep.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(deep.status().message().find("nested deeper than 16"), std::string::npos)
      << deep.status().ToString();
  // A few tokens with a huge id would allocate a table of millions of empty entries (1.5 GB
  // from an 8.7 KB file): sparse ids are refused.
  std::string sparse = SmallTokenizerJson();
  const std::string tool = R"("<tool>": 7})";
  ASSERT_NE(sparse.find(tool), std::string::npos);
  sparse.replace(sparse.find(tool), tool.size(), R"("<tool>": 7, "zz": 16777215})");
  auto sparse_ids = load(sparse);
  EXPECT_EQ(sparse_ids.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(sparse_ids.status().message().find("token ids are sparse: 9 tokens but the largest "
                                               "id is 16777215"),
            std::string::npos)
      << sparse_ids.status().ToString();
  // Far deeper JSON is refused before it is parsed (the parser's memory grows with it).
  auto deeper = load(nested_to(2000));
  EXPECT_EQ(deeper.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(deeper.status().message().find("JSON nested deeper than 64 levels"), std::string::npos)
      << deeper.status().ToString();
  auto merged = load(SmallTokenizerJson(R"({"type": "Sequence", "pretokenizers": [
      {"type": "Split", "pattern": {"Regex": "a"}, "behavior": "MergedWithPrevious"},
      {"type": "ByteLevel", "use_regex": false}]})"));
  EXPECT_EQ(merged.status().code(), StatusCode::kUnimplemented);
  EXPECT_NE(merged.status().message().find("MergedWithPrevious"), std::string::npos)
      << merged.status().ToString();
  auto after_byte_level = load(SmallTokenizerJson(R"({"type": "Sequence", "pretokenizers": [
      {"type": "ByteLevel", "use_regex": false},
      {"type": "Split", "pattern": {"Regex": "a"}, "behavior": "Isolated"}]})"));
  EXPECT_EQ(after_byte_level.status().code(), StatusCode::kUnimplemented);
  EXPECT_NE(after_byte_level.status().message().find("after ByteLevel"), std::string::npos)
      << after_byte_level.status().ToString();
  // A String pattern matches literally; Digits is \p{N} (one at a time) or \p{N}+.
  auto literal = load(SmallTokenizerJson(R"({"type": "Sequence", "pretokenizers": [
      {"type": "Split", "pattern": {"String": "a.b"}, "behavior": "Isolated"},
      {"type": "Digits", "individual_digits": false},
      {"type": "ByteLevel", "use_regex": true}]})"));
  ASSERT_TRUE(literal.ok()) << literal.status().ToString();
  EXPECT_EQ(literal->pre, "");
  ASSERT_EQ(literal->pre_regexes.size(), 3u);
  EXPECT_EQ(literal->pre_regexes[0], "a\\.b");
  EXPECT_EQ(literal->pre_regexes[1], "\\p{N}+");
  auto smollm = load(SmallTokenizerJson(R"({"type": "Sequence", "pretokenizers": [
      {"type": "Digits", "individual_digits": true}, {"type": "ByteLevel"}]})"));
  ASSERT_TRUE(smollm.ok()) << smollm.status().ToString();
  EXPECT_EQ(smollm->pre, "smollm");
  EXPECT_TRUE(smollm->pre_regexes.empty());
  auto not_byte_level = load(SmallTokenizerJson(R"({"type": "Metaspace"})"));
  EXPECT_EQ(not_byte_level.status().code(), StatusCode::kUnimplemented);
  // Llama 3's form of the same thing is understood (the regex as JSON-escaped in the file).
  auto llama3 = load(SmallTokenizerJson(Llama3PreTokenizerJson()));
  ASSERT_TRUE(llama3.ok()) << llama3.status().ToString();
  EXPECT_EQ(llama3->pre, "llama-bpe");
  // A Sequence entry that is not a pre-tokenizer object is an error naming it, not skipped.
  auto null_step = load(SmallTokenizerJson(R"({"type": "Sequence", "pretokenizers": [
      {"type": "Split", "pattern": {"Regex": "\\p{N}"}, "behavior": "Isolated"}, null,
      {"type": "ByteLevel", "use_regex": false}]})"));
  EXPECT_EQ(null_step.status().code(), StatusCode::kInvalidArgument)
      << null_step.status().ToString();
  EXPECT_NE(null_step.status().message().find("pre_tokenizer.pretokenizers[1] is not an object"),
            std::string::npos)
      << null_step.status().ToString();
  auto nested = load(SmallTokenizerJson(R"({"type": "Sequence", "pretokenizers": [
      {"type": "Sequence", "pretokenizers": [{"type": "ByteLevel"}, 7]}]})"));
  EXPECT_EQ(nested.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(nested.status().message().find("pre_tokenizer.pretokenizers[0].pretokenizers[1]"),
            std::string::npos)
      << nested.status().ToString();
  auto no_list = load(SmallTokenizerJson(R"({"type": "Sequence"})"));
  EXPECT_EQ(no_list.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(no_list.status().message().find("pre_tokenizer.pretokenizers is not an array"),
            std::string::npos)
      << no_list.status().ToString();

  auto spm_style = load(Replace(good, R"("byte_fallback": false)", R"("byte_fallback": true)"));
  EXPECT_EQ(spm_style.status().code(), StatusCode::kUnimplemented);

  const std::string bad_config = dir.Write("bad_config.json", R"({"eos_token": "<|not_there|>"})");
  auto unknown_eos = LoadHfTokenizerJson(dir.Write("ok.json", good), bad_config);
  EXPECT_EQ(unknown_eos.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(unknown_eos.status().message().find("eos_token"), std::string::npos);
}

// Errors quote what the file holds: an unsigned id past INT64_MAX as itself (it read as -1),
// control bytes escaped, a 200 KB pattern cut; a file far past any real tokenizer is refused
// unread.
TEST(HfTokenizerJsonTest, ErrorsQuoteTheValueAndFilesAreBounded) {
  TempDir dir;
  const std::string good = SmallTokenizerJson();
  auto load = [&](const std::string& json_text) {
    return LoadHfTokenizerJson(dir.Write("t.json", json_text), "");
  };
  auto huge_id = load(Replace(good, R"("ab": 2)", R"("ab": 18446744073709551615)"));
  EXPECT_EQ(huge_id.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(huge_id.status().message().find(
                "model.vocab[\"ab\"] has id 18446744073709551615 out of range"),
            std::string::npos)
      << huge_id.status().ToString();
  auto huge_added = load(Replace(good, R"({"id": 7,)", R"({"id": 18446744073709551615,)"));
  EXPECT_EQ(huge_added.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(huge_added.status().message().find("added_tokens id 18446744073709551615 out of range"),
            std::string::npos)
      << huge_added.status().ToString();

  auto control = load(SmallTokenizerJson(R"({"type": "By\u0000te\u001bLevel"})"));
  EXPECT_EQ(control.status().code(), StatusCode::kUnimplemented);
  EXPECT_NE(control.status().message().find("pre_tokenizer type By\\x00te\\x1bLevel is not"),
            std::string::npos)
      << control.status().ToString();
  const std::string pattern = "(" + std::string(200000, 'a');  // unbalanced
  auto long_regex = load(SmallTokenizerJson(
      R"({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": ")" +
      pattern + R"("}, "behavior": "Isolated"}, {"type": "ByteLevel", "use_regex": false}]})"));
  EXPECT_EQ(long_regex.status().code(), StatusCode::kInvalidArgument)
      << long_regex.status().ToString().substr(0, 300);
  EXPECT_LT(long_regex.status().message().size(), 1000u);
  EXPECT_NE(long_regex.status().message().find("Split regex \"(aaaa"), std::string::npos)
      << long_regex.status().ToString().substr(0, 300);
  EXPECT_NE(long_regex.status().message().find("...(200001 bytes)"), std::string::npos)
      << long_regex.status().ToString().substr(0, 300);

  // Real tokenizer.json files are 7 to 35 MB; this one is 300 MB (of a hole: no disk space).
  const std::string big = dir.Write("big.json", "{");
  fs::resize_file(big, uint64_t{300} << 20);
  auto too_big = LoadHfTokenizerJson(big, "");
  EXPECT_EQ(too_big.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(too_big.status().message().find("314572800 bytes is too large (at most 268435456)"),
            std::string::npos)
      << too_big.status().ToString();
}

// A tokenizer.json whose vocabulary holds "abc" while its merges make [a, bc] of it; `fields`
// goes into the model object (e.g. "ignore_merges": true,).
std::string AbcTokenizerJson(const std::string& fields,
                             const std::string& pre_tokenizer = kByteLevelPreTokenizer) {
  return R"({"added_tokens": [], "normalizer": null, "pre_tokenizer": )" + pre_tokenizer +
         R"(, "model": {"type": "BPE", )" + fields +
         R"( "vocab": {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "abc": 5},
             "merges": ["b c", "a b"]}})";
}

TEST(HfTokenizerJsonTest, IgnoreMergesFromTheFile) {
  TempDir dir;
  const auto encode = [&](const std::string& json_text, const std::string& text) -> Ids {
    auto data = LoadHfTokenizerJson(dir.Write("t.json", json_text), "");
    EXPECT_TRUE(data.ok()) << data.status().ToString();
    if (!data.ok()) return {};
    auto tok = CreateTokenizer(*data);
    EXPECT_TRUE(tok.ok()) << tok.status().ToString();
    return tok.ok() ? (*tok)->Encode(text, false) : Ids{};
  };
  const std::string on = R"("ignore_merges": true,)", off = R"("ignore_merges": false,)";
  // With ignore_merges a chunk that is a piece is that token; the others still merge.
  EXPECT_EQ(encode(AbcTokenizerJson(on), "abc"), (Ids{5}));
  EXPECT_EQ(encode(AbcTokenizerJson(on), "abcb"), (Ids{0, 4, 1}));
  EXPECT_EQ(encode(AbcTokenizerJson(off), "abc"), (Ids{0, 4}));
  EXPECT_EQ(encode(AbcTokenizerJson(""), "abc"), (Ids{0, 4}));  // Absent: false, as in HF.
  // The file decides, not the pre-tokenizer that Llama 3's regex maps to (llama-bpe).
  EXPECT_EQ(encode(AbcTokenizerJson(off, Llama3PreTokenizerJson()), "abc"), (Ids{0, 4}));
  EXPECT_EQ(encode(AbcTokenizerJson(on, Llama3PreTokenizerJson()), "abc"), (Ids{5}));
  auto loaded = LoadHfTokenizerJson(dir.Write("t.json", AbcTokenizerJson(on)), "");
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  EXPECT_EQ(loaded->ignore_merges, std::optional<bool>(true));
  auto bad =
      LoadHfTokenizerJson(dir.Write("t.json", AbcTokenizerJson(R"("ignore_merges": 1,)")), "");
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("model.ignore_merges"), std::string::npos)
      << bad.status().ToString();
}

// A byte-level BPE with Llama 3's pre-tokenizer, ignore_merges and BOS template, trained and
// saved by Hugging Face tokenizers 0.23.3 (testdata/make_tiny_vocabs.py); the expected ids are
// that library's encode(text) (add_special_tokens=True).
TEST(HfTokenizerJsonTest, TinyLlama3MatchesHuggingFace) {
  const std::string dir = TinyLlama3Dir();
  if (!fs::exists(dir + "/tokenizer.json")) {
    GTEST_SKIP() << "testdata not found at " << dir << " (set HELIX_SOURCE_DIR)";
  }
  auto data = LoadHfTokenizerJson(dir + "/tokenizer.json", dir + "/tokenizer_config.json");
  ASSERT_TRUE(data.ok()) << data.status().ToString();
  EXPECT_EQ(data->pre, "llama-bpe");
  EXPECT_TRUE(data->add_bos);  // From the post_processor's template.
  EXPECT_EQ(data->bos_id, 0);
  EXPECT_EQ(data->eos_id, 1);
  EXPECT_EQ(data->eot_id, 2);
  auto tok = CreateTokenizer(*data);
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  const std::pair<std::string, Ids> cases[] = {
      {"Hello world!", {0, 348, 299, 317, 78, 70, 3}},
      {"The quick brown fox.",
       {0, 276, 223, 83, 87, 75, 310, 273, 84, 81, 89, 80, 288, 81, 90, 16}},
      {"they'RE here, I'll go",
       {0, 86, 261, 91, 9, 52, 39, 223, 261, 279, 14, 223, 43, 354, 332, 81}},
      {"12345 and 3.14", {0, 361, 21, 364, 270, 223, 21, 16, 362}},
      {"  two  spaces\n\nnew paragraph", {0,   223, 259, 89, 81,  223, 268, 82, 67,  69, 271,
                                          201, 201, 315, 89, 223, 82,  377, 73, 285, 82, 74}},
      {"école à Tokyo 東京", {0,  130, 105, 292, 294, 289, 257, 223, 54,  81,
                              77, 91,  81,  223, 165, 254, 112, 163, 121, 108}},
      {"emoji 😀!", {0, 71, 79, 81, 76, 75, 223, 175, 256, 249, 225, 3}},
      {"<|begin_of_text|>hi<|eot_id|>", {0, 0, 74, 75, 2}},
      {"call <tool> now", {0, 69, 67, 278, 223, 380, 223, 80, 81, 89}},
      {"tokenizers tokenize", {0, 295, 272, 75, 92, 266, 85, 280, 75, 92, 71}},
  };
  for (const auto& [text, ids] : cases) {
    EXPECT_EQ((*tok)->Encode(text, true), ids) << text;
    EXPECT_EQ((*tok)->Decode(ids), "<|begin_of_text|>" + text);
  }
  EXPECT_EQ((*tok)->stop_ids(), (Ids{1, 2}));
  EXPECT_EQ((*tok)->chat_template(),
            "{% for m in messages %}{{ m['content'] }}<|eot_id|>{% endfor %}");
}

// A ~40 KB prompt of random text joined by `filler` encodes in well under a second (no
// quadratic step) to at least 10K tokens and decodes back, after `bos`.
void ExpectLongPromptEncodesFast(const Tokenizer& tok, const std::string& filler,
                                 const std::string& bos) {
  std::mt19937 rng(3);
  std::string text;
  while (text.size() < 40000) text += RandomText(rng, 20) + filler;
  const auto t0 = std::chrono::steady_clock::now();
  const Ids ids = tok.Encode(text, true);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_GE(ids.size(), 10000u);
  EXPECT_LT(seconds, 1.0) << ids.size() << " tokens";
  EXPECT_EQ(tok.Decode(ids), bos + text);
}

TEST(HfTokenizerJsonTest, LongPromptEncodesFast) {
  const std::string dir = TinyLlama3Dir();
  if (!fs::exists(dir + "/tokenizer.json")) {
    GTEST_SKIP() << "testdata not found at " << dir << " (set HELIX_SOURCE_DIR)";
  }
  auto data = LoadHfTokenizerJson(dir + "/tokenizer.json", dir + "/tokenizer_config.json");
  ASSERT_TRUE(data.ok()) << data.status().ToString();
  auto tok = CreateTokenizer(*data);
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  ExpectLongPromptEncodesFast(**tok, " the tokens ", "<|begin_of_text|>");
}

// ---------------------------------------------------------------------------------------------
// DeepSeek pre-tokenizers against Hugging Face tokenizers 0.23.3. testdata/make_deepseek_cases.py
// trained the tiny byte-level BPE in tiny_deepseek_v3 (DeepSeek V3's pre_tokenizer, special
// tokens and BOS template; tiny_deepseek_llm is the same model with DeepSeek LLM's) and wrote
// deepseek_cases.json: per text, HF's pre-tokenizer chunks and encode() ids under each
// pre-tokenizer (deepseek_*_gguf are llama.cpp's regex lists for those GGUF names), and the
// chunks of the GPT-2, Llama 3, Qwen 2 and SmolLM pre-tokenizers.

struct HfCase {
  std::string text;
  std::map<std::string, std::vector<std::string>> chunks;  // By pre-tokenizer.
  std::map<std::string, Ids> ids;
};

std::vector<HfCase> LoadDeepSeekCases() {
  const std::string path = SourceDir() + "/engine/tokenizer/testdata/deepseek_cases.json";
  std::ifstream file(path);
  std::stringstream buffer;
  buffer << file.rdbuf();
  std::vector<HfCase> cases;
  if (!file) return cases;
  const nlohmann::json root = nlohmann::json::parse(buffer.str());
  for (const nlohmann::json& c : root.at("cases")) {
    HfCase hc;
    hc.text = c.at("text").get<std::string>();
    for (auto it = c.begin(); it != c.end(); ++it) {
      if (it.key() == "text") continue;
      hc.chunks[it.key()] = it.value().at("chunks").get<std::vector<std::string>>();
      if (it.value().contains("ids")) hc.ids[it.key()] = it.value().at("ids").get<Ids>();
    }
    cases.push_back(std::move(hc));
  }
  return cases;
}

std::vector<std::string> Strings(const std::vector<std::string_view>& views) {
  return std::vector<std::string>(views.begin(), views.end());
}

class DeepSeekTest : public testing::Test {
 protected:
  void SetUp() override {
    cases_ = LoadDeepSeekCases();
    if (cases_.empty()) GTEST_SKIP() << "testdata not found under " << SourceDir();
    ASSERT_GE(cases_.size(), 200u);
  }

  VocabData Load(const std::string& name) {
    const std::string dir = SourceDir() + "/engine/tokenizer/testdata/" + name;
    // Both directories hold the same model; the V3 one has the tokenizer_config.json.
    auto data = LoadHfTokenizerJson(dir + "/tokenizer.json",
                                    SourceDir() +
                                        "/engine/tokenizer/testdata/tiny_deepseek_v3/"
                                        "tokenizer_config.json");
    EXPECT_TRUE(data.ok()) << data.status().ToString();
    return data.ok() ? std::move(data).value() : VocabData{};
  }

  // Every case's chunks and ids under `key` equal HF's. Returns the number of cases checked.
  int ExpectMatchesHf(const VocabData& data, const std::string& key) {
    auto pre = CompiledPreTokenizer::Create(data.pre, data.pre_regexes);
    EXPECT_TRUE(pre.ok()) << pre.status().ToString();
    auto tok = CreateTokenizer(data);
    EXPECT_TRUE(tok.ok()) << tok.status().ToString();
    if (!pre.ok() || !tok.ok()) return 0;
    int checked = 0;
    for (const HfCase& c : cases_) {
      EXPECT_EQ(Strings(pre->Split(c.text)), c.chunks.at(key))
          << key << " text " << testing::PrintToString(c.text);
      EXPECT_EQ((*tok)->Encode(c.text, true), c.ids.at(key))
          << key << " text " << testing::PrintToString(c.text);
      ++checked;
    }
    return checked;
  }

  std::vector<HfCase> cases_;
};

TEST_F(DeepSeekTest, V3TokenizerJsonMatchesHuggingFace) {
  const VocabData data = Load("tiny_deepseek_v3");
  EXPECT_EQ(data.pre, "");
  ASSERT_EQ(data.pre_regexes.size(), 3u);
  EXPECT_EQ(data.pre_regexes[0], R"(\p{N}{1,3})");
  EXPECT_TRUE(data.add_bos);
  EXPECT_EQ(data.bos_id, 0);
  EXPECT_EQ(data.eos_id, 1);
  EXPECT_EQ(ExpectMatchesHf(data, "deepseek_v3"), static_cast<int>(cases_.size()));
}

TEST_F(DeepSeekTest, LlmTokenizerJsonMatchesHuggingFace) {
  // DeepSeek LLM: five Splits, then Digits(individual_digits).
  const VocabData data = Load("tiny_deepseek_llm");
  ASSERT_EQ(data.pre_regexes.size(), 6u);
  EXPECT_EQ(data.pre_regexes[5], R"(\p{N})");
  EXPECT_EQ(ExpectMatchesHf(data, "deepseek_llm_json"), static_cast<int>(cases_.size()));
}

TEST_F(DeepSeekTest, GgufNamesMatchHuggingFace) {
  // A GGUF vocabulary names its pre-tokenizer; the regexes come from the name.
  VocabData data = Load("tiny_deepseek_v3");
  data.pre_regexes.clear();
  for (const auto& [name, key] : {std::pair<std::string, std::string>{"deepseek-v3", "deepseek_v3"},
                                  {"deepseek-llm", "deepseek_llm_gguf"},
                                  {"deepseek-coder", "deepseek_coder_gguf"}}) {
    data.pre = name;
    EXPECT_EQ(ExpectMatchesHf(data, key), static_cast<int>(cases_.size())) << name;
  }
}

TEST_F(DeepSeekTest, HandWrittenPreTokenizersMatchHuggingFace) {
  // The same texts through the GPT-2, Llama 3, Qwen 2 and SmolLM splits: the hand-written
  // matchers and the regex engine running their regexes both give HF's chunks.
  const std::pair<PreTokenizer, std::string> kinds[] = {{PreTokenizer::kGpt2, "gpt2"},
                                                        {PreTokenizer::kLlama3, "llama3"},
                                                        {PreTokenizer::kQwen2, "qwen2"},
                                                        {PreTokenizer::kSmolLm, "smollm"}};
  for (const auto& [kind, key] : kinds) {
    auto regex = RegexPreTokenizer::Create(PreTokenizerRegexes(kind));
    ASSERT_TRUE(regex.ok()) << regex.status().ToString();
    for (const HfCase& c : cases_) {
      EXPECT_EQ(Strings(PreTokenize(kind, c.text)), c.chunks.at(key))
          << key << " text " << testing::PrintToString(c.text);
      EXPECT_EQ(Strings(regex->Split(c.text)), c.chunks.at(key))
          << key << " (regex engine) text " << testing::PrintToString(c.text);
    }
  }
}

TEST_F(DeepSeekTest, LongPromptEncodesFast) {
  auto tok = CreateTokenizer(Load("tiny_deepseek_v3"));
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  ExpectLongPromptEncodesFast(**tok, " the tokens 12345 ", "<｜begin▁of▁sentence｜>");
}

// ---------------------------------------------------------------------------------------------
// The real SmolLM2-135M-Instruct vocabulary (GGUF; not in CI). Expected ids come from Hugging
// Face tokenizers 0.23.3: a BPE built from this file's tokens and merges, with SmolLM2's
// pre-tokenizer (Digits(individual_digits) + ByteLevel) and its control tokens as special added
// tokens; encode(text, add_special_tokens=False).

// Just enough of GGUF (v2/v3) to read the tokenizer metadata.
class GgufMetadata {
 public:
  bool Read(const std::string& path) {
    in_.open(path, std::ios::binary);
    char magic[4];
    if (!in_.read(magic, 4) || std::string(magic, 4) != "GGUF") return false;
    const uint32_t version = Get<uint32_t>();
    if (version < 2) return false;
    Get<uint64_t>();  // Tensor count.
    const uint64_t n_kv = Get<uint64_t>();
    for (uint64_t i = 0; i < n_kv && ok_; ++i) {
      const std::string key = Str();
      const uint32_t type = Get<uint32_t>();
      Value(key, type);
    }
    return ok_;
  }
  std::map<std::string, std::string> strings;
  std::map<std::string, int64_t> ints;
  std::map<std::string, std::vector<std::string>> string_arrays;
  std::map<std::string, std::vector<int64_t>> int_arrays;

 private:
  template <typename T>
  T Get() {
    T v{};
    ok_ = ok_ && static_cast<bool>(in_.read(reinterpret_cast<char*>(&v), sizeof(v)));
    return v;
  }
  std::string Str() {
    const uint64_t n = Get<uint64_t>();
    if (!ok_ || n > (uint64_t{1} << 28)) {
      ok_ = false;
      return {};
    }
    std::string s(n, '\0');
    ok_ = ok_ && static_cast<bool>(in_.read(s.data(), static_cast<std::streamsize>(n)));
    return s;
  }
  // Reads a scalar of `type`: integers and bools as int64, strings; floats skipped.
  bool Scalar(uint32_t type, int64_t* i, std::string* s) {
    switch (type) {
      case 0:
        *i = Get<uint8_t>();
        return true;
      case 1:
        *i = Get<int8_t>();
        return true;
      case 2:
        *i = Get<uint16_t>();
        return true;
      case 3:
        *i = Get<int16_t>();
        return true;
      case 4:
        *i = Get<uint32_t>();
        return true;
      case 5:
        *i = Get<int32_t>();
        return true;
      case 6:
        Get<float>();
        return false;
      case 7:
        *i = Get<uint8_t>();
        return true;
      case 8:
        *s = Str();
        return true;
      case 10:
        *i = static_cast<int64_t>(Get<uint64_t>());
        return true;
      case 11:
        *i = Get<int64_t>();
        return true;
      case 12:
        Get<double>();
        return false;
      default:
        ok_ = false;
        return false;
    }
  }
  void Value(const std::string& key, uint32_t type) {
    int64_t i = 0;
    std::string s;
    if (type == 9) {
      const uint32_t elem = Get<uint32_t>();
      const uint64_t n = Get<uint64_t>();
      if (elem == 9 || n > (uint64_t{1} << 26)) {
        ok_ = false;
        return;
      }
      for (uint64_t k = 0; k < n && ok_; ++k) {
        if (!Scalar(elem, &i, &s)) continue;
        if (elem == 8) {
          string_arrays[key].push_back(std::move(s));
        } else {
          int_arrays[key].push_back(i);
        }
      }
      return;
    }
    if (!Scalar(type, &i, &s)) return;
    if (type == 8) {
      strings[key] = std::move(s);
    } else {
      ints[key] = i;
    }
  }

  std::ifstream in_;
  bool ok_ = true;
};

class SmolLm2Test : public testing::Test {
 protected:
  static std::string Path() {
    const char* home = std::getenv("HOME");
    return std::string(home != nullptr ? home : "/root") +
           "/.cache/helix/models/SmolLM2-135M-Instruct.Q4_1.gguf";
  }
  void SetUp() override {
    if (!fs::exists(Path())) {
      GTEST_SKIP() << "SmolLM2-135M-Instruct GGUF not found at " << Path()
                   << " (a local-only check against Hugging Face tokenizers' ids)";
    }
    GgufMetadata meta;
    ASSERT_TRUE(meta.Read(Path())) << "cannot parse " << Path();
    VocabData d;
    d.model = meta.strings["tokenizer.ggml.model"];
    d.pre = meta.strings["tokenizer.ggml.pre"];
    d.tokens = meta.string_arrays["tokenizer.ggml.tokens"];
    d.merges = meta.string_arrays["tokenizer.ggml.merges"];
    for (int64_t t : meta.int_arrays["tokenizer.ggml.token_type"]) d.token_types.push_back(t);
    d.bos_id = meta.ints.at("tokenizer.ggml.bos_token_id");
    d.eos_id = meta.ints.at("tokenizer.ggml.eos_token_id");
    d.unk_id = meta.ints.at("tokenizer.ggml.unknown_token_id");
    d.pad_id = meta.ints.at("tokenizer.ggml.padding_token_id");
    d.add_bos = meta.ints.at("tokenizer.ggml.add_bos_token") != 0;
    d.chat_template = meta.strings["tokenizer.chat_template"];
    ASSERT_EQ(d.model, "gpt2");
    ASSERT_EQ(d.pre, "smollm");
    auto tok = CreateTokenizer(std::move(d));
    ASSERT_TRUE(tok.ok()) << tok.status().ToString();
    tok_ = std::move(tok).value();
  }
  std::unique_ptr<Tokenizer> tok_;
};

TEST_F(SmolLm2Test, MatchesHuggingFaceTokenizers) {
  const std::pair<std::string, Ids> cases[] = {
      {"Hello, world!", {19556, 28, 905, 17}},
      {"12345", {33, 34, 35, 36, 37}},
      {"don't", {12420, 982}},
      {"I'm sure they'LL say we've won", {57, 5248, 2090, 502, 23, 16421, 1643, 392, 3543, 3763}},
      {"hello   world", {28120, 256, 905}},
      {"a\n\nb", {81, 198, 198, 82}},
      {"  leading and trailing  ", {216, 2899, 284, 35079, 256}},
      {"<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
       {1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198}},
      {"Café déjà vu, naïve façade",
       {51, 1939, 2756, 32564, 90, 16739, 386, 101, 28, 15486, 46494, 40852}},
      {"日本語のテキストです。",
       {23274, 115, 40993, 179, 120, 248, 26453, 11100, 224, 10391, 251, 10391, 134, 11100, 226,
        7365, 117, 39958, 19076}},
      {"Привет, мир!", {155, 249, 46879, 16464, 32547, 28, 41337, 7872, 9175, 17}},
      {"emoji 😀👍🏽!", {391, 33777, 40303, 218, 10813, 235, 231, 10813, 233, 138, 17}},
      {"tabs\tand\r\nCRLF", {100, 7366, 197, 397, 201, 198, 9088, 60, 54}},
      {"x=3.14159; y=-2e10", {104, 45, 35, 30, 33, 36, 33, 37, 41, 43, 329, 15196, 34, 85, 33, 32}},
  };
  for (const auto& [text, ids] : cases) {
    EXPECT_EQ(tok_->Encode(text, true), ids) << text;  // add_bos_token is false in this GGUF.
    EXPECT_EQ(tok_->Decode(ids), text);
  }
  EXPECT_EQ(tok_->vocab_size(), 49152);
  EXPECT_EQ(tok_->bos_id(), 1);
  EXPECT_EQ(tok_->eos_id(), 2);
  EXPECT_EQ(tok_->stop_ids(), (Ids{2, 0}));  // <|im_end|>, <|endoftext|>
  EXPECT_EQ(tok_->chat_template().substr(0, 30), "{% for message in messages %}{");
}

TEST_F(SmolLm2Test, TenThousandTokenPromptUnderASecond) {
  std::mt19937 rng(99);
  static const char* kWords[] = {"the",     "model",   "server",  "tokens", "Hugging", "Face",
                                 "streams", "answer",  "quickly", "don't",  "12",      "2024",
                                 "naïve",   "日本",    "\n",      "  ",     "(",       ")",
                                 "!",       "request", "latency", "batch"};
  std::uniform_int_distribution<size_t> pick(0, std::size(kWords) - 1);
  std::string text;
  while (text.size() < 60000) {
    text += kWords[pick(rng)];
    text += ' ';
    if (rng() % 7 == 0) text += std::to_string(rng() % 100000);  // Some words never repeat.
  }
  const auto t0 = std::chrono::steady_clock::now();
  const Ids ids = tok_->Encode(text, false);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_GE(ids.size(), 10000u);
  EXPECT_LT(seconds, 1.0) << ids.size() << " tokens";
  EXPECT_EQ(tok_->Decode(ids), text);
}

}  // namespace
}  // namespace helix
