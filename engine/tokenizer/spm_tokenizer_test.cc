// Tests of the SentencePiece-style tokenizer (VocabData model "llama").
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "engine/tokenizer/tokenizer.h"
#include "engine/tokenizer/vocab_data.h"

namespace helix {
namespace {

using Ids = std::vector<int32_t>;

constexpr char kSpace[] = "\xE2\x96\x81";  // U+2581

std::string Hex(int b) {
  static constexpr char kDigits[] = "0123456789ABCDEF";
  return std::string("<0x") + kDigits[b >> 4] + kDigits[b & 15] + ">";
}

// <unk> <s> </s>, the 256 byte tokens (ids 3..258), then `pieces` (scores given) from id 259.
VocabData SmallVocab(const std::vector<std::pair<std::string, float>>& pieces,
                     bool with_bytes = true) {
  VocabData d;
  d.model = "llama";
  d.tokens = {"<unk>", "<s>", "</s>"};
  d.scores = {0, 0, 0};
  d.token_types = {kTokenUnknown, kTokenControl, kTokenControl};
  for (int b = 0; b < 256; ++b) {
    d.tokens.push_back(with_bytes ? Hex(b) : "<unused" + std::to_string(b) + ">");
    d.scores.push_back(0);
    d.token_types.push_back(with_bytes ? kTokenByte : kTokenUnused);
  }
  for (const auto& [piece, score] : pieces) {
    std::string p;
    for (char c : piece) p += c == ' ' ? std::string(kSpace) : std::string(1, c);
    d.tokens.push_back(p);
    d.scores.push_back(score);
    d.token_types.push_back(kTokenNormal);
  }
  d.unk_id = 0;
  d.bos_id = 1;
  d.eos_id = 2;
  return d;
}

constexpr int32_t kFirst = 259;
int32_t Byte(unsigned char b) { return 3 + b; }

std::unique_ptr<Tokenizer> MustCreate(VocabData d) {
  auto t = CreateTokenizer(std::move(d));
  EXPECT_TRUE(t.ok()) << t.status().ToString();
  return t.ok() ? std::move(t).value() : nullptr;
}

// Pieces (ids from 259): " " h e l o " h" "he" "ll" "llo" "hello" " hello" "lo"
const std::vector<std::pair<std::string, float>> kHelloPieces = {
    {" ", -1},  {"h", -2},  {"e", -3},   {"l", -4},      {"o", -5},       {" h", -6},
    {"he", -7}, {"ll", -8}, {"llo", -9}, {"hello", -10}, {" hello", -11}, {"lo", -12}};
enum : int32_t { kSp = kFirst, kH, kE, kL, kO, kSpH, kHe, kLl, kLlo, kHello, kSpHello, kLo };

TEST(SpmTokenizerTest, MergesByScoreWithDummyPrefix) {
  auto tok = MustCreate(SmallVocab(kHelloPieces));
  ASSERT_TRUE(tok);
  // "▁hello": ▁h (-6) beats he (-7) and ll (-8); then ll, then llo. Neither "▁he" nor "ello"
  // is a piece, so " hello" is never reached.
  EXPECT_EQ(tok->Encode("hello", false), (Ids{kSpH, kE, kLlo}));
  EXPECT_EQ(tok->Encode("hello", true), (Ids{1, kSpH, kE, kLlo}));
  EXPECT_EQ(tok->Encode("", true), (Ids{1}));
  EXPECT_EQ(tok->Encode("", false), (Ids{}));
  // Spaces are U+2581 inside the text too.
  EXPECT_EQ(tok->Encode("lo lo", false), (Ids{kSp, kLo, kSp, kLo}));

  // With "he" scored above "▁h", the merge order and so the result change.
  auto he_first = SmallVocab(kHelloPieces);
  he_first.scores[kHe] = 0;
  he_first.tokens.push_back(std::string(kSpace) + "he");  // 271
  he_first.scores.push_back(-0.5f);
  he_first.token_types.push_back(kTokenNormal);
  tok = MustCreate(he_first);
  ASSERT_TRUE(tok);
  // he, ▁he, ll, llo, then ▁he+llo = ▁hello.
  EXPECT_EQ(tok->Encode("hello", false), (Ids{kSpHello}));
}

TEST(SpmTokenizerTest, AddSpacePrefixOff) {
  auto d = SmallVocab(kHelloPieces);
  d.add_space_prefix = false;
  auto tok = MustCreate(d);
  ASSERT_TRUE(tok);
  // he, ll, llo, then he+llo = hello.
  EXPECT_EQ(tok->Encode("hello", false), (Ids{kHello}));
  EXPECT_EQ(tok->Encode(" hello", false), (Ids{kSpH, kE, kLlo}));
  EXPECT_EQ(tok->Decode(tok->Encode("hello", true)), "hello");
}

TEST(SpmTokenizerTest, ByteFallback) {
  auto tok = MustCreate(SmallVocab(kHelloPieces));
  ASSERT_TRUE(tok);
  // é (C3 A9) and 😀 (F0 9F 98 80) are not pieces; \n neither.
  EXPECT_EQ(tok->Encode("hé\n", false), (Ids{kSpH, Byte(0xC3), Byte(0xA9), Byte('\n')}));
  EXPECT_EQ(tok->Encode("\xF0\x9F\x98\x80", false),
            (Ids{kSp, Byte(0xF0), Byte(0x9F), Byte(0x98), Byte(0x80)}));
  // Ill-formed UTF-8 falls back byte by byte as well.
  EXPECT_EQ(tok->Encode("\xFFo", false), (Ids{kSp, Byte(0xFF), kO}));
  // Without byte tokens, an uncovered character is one <unk>.
  auto no_bytes = MustCreate(SmallVocab(kHelloPieces, /*with_bytes=*/false));
  ASSERT_TRUE(no_bytes);
  EXPECT_EQ(no_bytes->Encode("hé", false), (Ids{kSpH, 0}));
}

TEST(SpmTokenizerTest, ControlTokensNeverComeFromText) {
  // Pieces 259..: < s > <s (and " " at 263). The only "<s>" is the control token (id 1): the
  // text stays in pieces.
  auto tok = MustCreate(SmallVocab({{"<", -1}, {"s", -2}, {">", -3}, {"<s", -4}, {" ", -5}}));
  ASSERT_TRUE(tok);
  EXPECT_EQ(tok->Encode("<s>", false), (Ids{kFirst + 4, kFirst + 3, kFirst + 2}));
  EXPECT_EQ(tok->Encode("</s>", true),
            (Ids{1, kFirst + 4, kFirst, Byte('/'), kFirst + 1, kFirst + 2}));
  EXPECT_EQ(tok->Decode(tok->Encode("<s></s>", true)), "<s></s>");
}

TEST(SpmTokenizerTest, UserDefinedTokensMatchInText) {
  auto d = SmallVocab(kHelloPieces);
  d.tokens.push_back("<tool>");  // 271
  d.scores.push_back(0);
  d.token_types.push_back(kTokenUserDefined);
  auto tok = MustCreate(d);
  ASSERT_TRUE(tok);
  // As llama.cpp (and HF's legacy Llama tokenizer): the dummy prefix comes again after it.
  EXPECT_EQ(tok->Encode("lo<tool>lo", false), (Ids{kSp, kLo, 271, kSp, kLo}));
  EXPECT_EQ(tok->Encode("<tool>", false), (Ids{271}));
  EXPECT_EQ(tok->Decode({271}), "<tool>");
}

TEST(SpmTokenizerTest, Decoding) {
  auto tok = MustCreate(SmallVocab(kHelloPieces));
  ASSERT_TRUE(tok);
  // The dummy-prefix space is dropped right after BOS only.
  EXPECT_EQ(tok->Decode({1, kSpHello, kSpHello}), "hello hello");
  EXPECT_EQ(tok->Decode({kSpHello}), " hello");
  EXPECT_EQ(tok->TokenBytes(kSpH, 1), "h");
  EXPECT_EQ(tok->TokenBytes(kSpH, kO), " h");
  // Control tokens decode to nothing, byte tokens to their byte, unknown to " ⁇ ".
  EXPECT_EQ(tok->Decode({1, kH, 2}), "h");
  EXPECT_EQ(tok->Decode({Byte(0xC3), Byte(0xA9)}), "\xC3\xA9");
  EXPECT_EQ(tok->TokenBytes(0, -1), " \xE2\x81\x87 ");
  EXPECT_EQ(tok->TokenBytes(100000, -1), "");
  EXPECT_EQ(tok->piece(kSpH), std::string(kSpace) + "h");
  EXPECT_EQ(tok->stop_ids(), (Ids{2}));
  // A byte token right after BOS keeps its space.
  EXPECT_EQ(tok->Decode({1, Byte(' '), kH}), " h");
}

TEST(SpmTokenizerTest, RandomRoundTrips) {
  auto tok = MustCreate(SmallVocab(kHelloPieces));
  ASSERT_TRUE(tok);
  static const std::vector<std::string> kPool = {"h", "e", "l",    "o", " ", "  ", "\n",      "\t",
                                                 "x", "é", "日本", "😀", "ж", "0",  "\xC2\xA0"};
  std::mt19937 rng(77);
  std::uniform_int_distribution<size_t> pick(0, kPool.size() - 1);
  for (int i = 0; i < 200; ++i) {
    std::string text;
    for (int n = rng() % 30; n > 0; --n) text += kPool[pick(rng)];
    const Ids ids = tok->Encode(text, true);
    EXPECT_EQ(tok->Decode(ids), text) << testing::PrintToString(text);
    IncrementalDetokenizer detok(*tok);
    std::string streamed;
    for (int32_t id : ids) streamed += detok.Push(id);
    streamed += detok.Flush();
    EXPECT_EQ(streamed, text);
  }
}

TEST(SpmTokenizerTest, Validation) {
  auto d = SmallVocab(kHelloPieces);
  d.scores.pop_back();
  auto t = CreateTokenizer(d);
  EXPECT_EQ(t.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(t.status().message().find("VocabData.scores"), std::string::npos);
  d = SmallVocab(kHelloPieces);
  d.scores[5] = std::nanf("");
  t = CreateTokenizer(d);
  EXPECT_EQ(t.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(t.status().message().find("scores[5]"), std::string::npos);
  d = SmallVocab(kHelloPieces);
  d.unk_id = static_cast<int32_t>(d.tokens.size());
  EXPECT_EQ(CreateTokenizer(d).status().code(), StatusCode::kInvalidArgument);
  // token_types may be left out: byte tokens are found by their spelling.
  d = SmallVocab(kHelloPieces);
  d.token_types.clear();
  auto tok = MustCreate(d);
  ASSERT_TRUE(tok);
  EXPECT_EQ(tok->Encode("hé", true), (Ids{1, kSpH, Byte(0xC3), Byte(0xA9)}));
  EXPECT_EQ(tok->Decode({1, kSpH}), "h");
}

// A SentencePiece BPE model (byte_fallback, identity normalization, no extra-whitespace removal,
// as Llama 2's) trained by Google's sentencepiece 0.2.3 on testdata/make_tiny_vocabs.py's corpus:
// <unk> <s> </s> <tool>(user-defined) <0x00>..<0xFF>, then these 70 pieces scored -(id - 260).
// The expected ids are sentencepiece's encode(text).
const char* const kTrainedPieces[] = {
    "▁t", "he", "▁a", "en",  "in",   "▁the",   "nd", "▁and", "er", "▁to", "▁s", "ken", "▁in", "ex",
    "re", "▁T", "▁b", "ext", "▁The", "▁token", "de", "▁",    "e",  "t",   "n",  "a",   "o",   "s",
    "i",  "r",  "l",  "d",   "h",    ".",      "k",  "g",    "w",  "0",   "b",  "p",   "u",   "x",
    ",",  "T",  "c",  "m",   "f",    "'",      "1",  "2",    "4",  "v",   "\t", "(",   ")",   "3",
    "H",  "y",  "z",  "!",   "5",    ":",      ";",  "A",    "I",  "N",   "[",  "]",   "j",   "q"};

TEST(SpmTokenizerTest, TrainedModelMatchesSentencePiece) {
  VocabData d;
  d.model = "llama";
  d.tokens = {"<unk>", "<s>", "</s>", "<tool>"};
  d.token_types = {kTokenUnknown, kTokenControl, kTokenControl, kTokenUserDefined};
  for (int b = 0; b < 256; ++b) {
    d.tokens.push_back(Hex(b));
    d.token_types.push_back(kTokenByte);
  }
  d.scores.assign(d.tokens.size(), 0);
  for (const char* p : kTrainedPieces) {
    d.scores.push_back(-static_cast<float>(d.tokens.size() - 260));
    d.tokens.push_back(p);
    d.token_types.push_back(kTokenNormal);
  }
  ASSERT_EQ(d.tokens.size(), 330u);
  d.unk_id = 0;
  d.bos_id = 1;
  d.eos_id = 2;
  auto tok = MustCreate(d);
  ASSERT_TRUE(tok);
  const std::pair<std::string, Ids> cases[] = {
      {"Hello world", {281, 316, 282, 290, 290, 286, 281, 296, 286, 289, 290, 291}},
      {"the dog sleeps", {265, 281, 291, 286, 295, 270, 290, 282, 282, 299, 287}},
      {"tokens into text", {279, 287, 272, 283, 286, 260, 277}},
      {"école 東京", {281, 199, 173, 304, 286, 290, 282, 281, 234, 161, 181, 232, 190, 176}},
      {"  two spaces", {281, 281, 260, 296, 286, 270, 299, 285, 304, 282, 287}},
      {"x\ny", {281, 301, 14, 317}},
      {"42 ü", {281, 310, 309, 281, 199, 192}},
      {"a <s> b", {262, 281, 64, 287, 66, 276}},
      {"Москва", {281, 212, 160, 212, 194, 213, 133, 212, 190, 212, 182, 212, 180}},
  };
  for (const auto& [text, ids] : cases) {
    EXPECT_EQ(tok->Encode(text, false), ids) << text;
    EXPECT_EQ(tok->Decode(tok->Encode(text, true)), text);
  }
}

}  // namespace
}  // namespace helix
