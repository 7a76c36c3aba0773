#include "engine/tokenizer/tokenizer.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

namespace helix {
namespace {

namespace fs = std::filesystem;

constexpr int32_t kVocab = 512;
constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD
constexpr std::string_view kEmoji = "\xF0\x9F\x98\x80";    // U+1F600, not in tok512

// Upstream publishes no token ids for tok512 (llama2.c's test.c checks the 32K Llama 2 vocab).
// The ids below were worked out from a dump of tok512 (ids 0..258 special and byte tokens, then
// every piece scored -(id - 259): merged pieces 259..409, single characters 410..511) and
// cross-checked against llama2.c's run.c encode() (commit 350e04f) on this file.
constexpr int32_t kSpace = 410;   // " "
constexpr int32_t kThe = 291;     // " The"
constexpr int32_t kLowerA = 412;  // "a"

int32_t ByteToken(unsigned char b) { return b + 3; }

bool Contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

std::string ModelPath() {
  const char* shared = std::getenv("HELIX_SHARED_DIR");
  return std::string(shared != nullptr ? shared : "../shared") + "/models/stories260K/tok512.bin";
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// A fresh directory under the system temp dir, removed with the object.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "helix_tok_XXXXXX").string();
    if (mkdtemp(tmpl.data()) != nullptr) path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }
  std::string Write(const std::string& name, const std::string& bytes) const {
    std::string file = (path_ / name).string();
    std::ofstream(file, std::ios::binary).write(bytes.data(), bytes.size());
    return file;
  }

 private:
  fs::path path_;
};

class Llama2cTokenizerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = ModelPath();
    if (!fs::exists(path_)) {
      GTEST_SKIP() << "stories260K tokenizer not found at " << path_
                   << " (set HELIX_SHARED_DIR to the shared/ folder)";
    }
    auto loaded = LoadLlama2cTokenizer(path_, kVocab);
    ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
    tok_ = std::move(loaded).value();
  }

  std::string path_;
  std::unique_ptr<Tokenizer> tok_;
};

TEST_F(Llama2cTokenizerTest, LoadsVocabulary) {
  EXPECT_EQ(tok_->vocab_size(), 512);
  EXPECT_EQ(tok_->bos_id(), 1);
  EXPECT_EQ(tok_->eos_id(), 2);
  EXPECT_EQ(tok_->stop_ids(), (std::vector<int32_t>{1, 2}));
  EXPECT_EQ(tok_->piece(0), "<unk>");
  EXPECT_EQ(tok_->piece(1), "\n<s>\n");
  EXPECT_EQ(tok_->piece(2), "\n</s>\n");
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    EXPECT_EQ(tok_->piece(ByteToken(b)), name);
  }
  EXPECT_EQ(tok_->piece(259), " t");
  EXPECT_EQ(tok_->piece(kThe), " The");
  EXPECT_EQ(tok_->piece(kSpace), " ");
  EXPECT_EQ(tok_->piece(511), "\xE2\x80\x8A");  // U+200A HAIR SPACE, the last entry.
  EXPECT_EQ(tok_->piece(-1), "");
  EXPECT_EQ(tok_->piece(512), "");
}

TEST_F(Llama2cTokenizerTest, EncodesKnownTexts) {
  EXPECT_EQ(tok_->Encode("Once upon a time", true), (std::vector<int32_t>{1, 403, 407, 261, 378}));
  // The opening of the upstream greedy story.
  EXPECT_EQ(tok_->Encode("Once upon a time, there was a little girl named Lily. She loved to "
                         "play outside in the park.",
                         true),
            (std::vector<int32_t>{1,   403, 407, 261, 378, 432, 383, 286, 261, 376, 298,
                                  315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410,
                                  408, 419, 292, 411, 322, 265, 282, 295, 433, 426}));
  EXPECT_EQ(tok_->Encode("Hello world", false),
            (std::vector<int32_t>{346, 306, 414, 263, 304, 341}));
  // Equal scores: the leftmost pair merges first ("ll" + "l", not "l" + "ll").
  EXPECT_EQ(tok_->Encode("xlll", true), (std::vector<int32_t>{1, kSpace, 444, 306, 421}));
  EXPECT_EQ(tok_->Encode("zooo", true), (std::vector<int32_t>{1, kSpace, 451, 347, 414}));
  // "\n" is not a piece: byte fallback.
  EXPECT_EQ(tok_->Encode("a\nb", true), (std::vector<int32_t>{1, 261, ByteToken('\n'), 430}));
}

TEST_F(Llama2cTokenizerTest, DummyPrefixSpaceMergesWithTheFirstWord) {
  EXPECT_EQ(tok_->Encode("The", false), (std::vector<int32_t>{kThe}));
  EXPECT_EQ(tok_->Encode("The", true), (std::vector<int32_t>{1, kThe}));
  // A leading space of the text itself stays a separate token in front of the prefix merge.
  EXPECT_EQ(tok_->Encode(" The", true), (std::vector<int32_t>{1, kSpace, kThe}));
}

TEST_F(Llama2cTokenizerTest, EmptyText) {
  EXPECT_EQ(tok_->Encode("", true), (std::vector<int32_t>{1}));
  EXPECT_TRUE(tok_->Encode("", false).empty());
  EXPECT_EQ(tok_->Decode({}), "");
  EXPECT_EQ(tok_->Decode({1}), "");
}

TEST_F(Llama2cTokenizerTest, MissingCodePointsBecomeByteTokens) {
  // The emoji and the CJK character are not pieces: one token per UTF-8 byte (byte + 3).
  EXPECT_EQ(tok_->Encode(kEmoji, false),
            (std::vector<int32_t>{kSpace, 243, 162, 155, 131}));  // F0 9F 98 80
  EXPECT_EQ(tok_->Encode("\xE6\x97\xA5", false),                  // 日 = E6 97 A5
            (std::vector<int32_t>{kSpace, ByteToken(0xE6), ByteToken(0x97), ByteToken(0xA5)}));
  // "é" and "€" are pieces of tok512, so they stay whole.
  EXPECT_EQ(tok_->Encode("\xC3\xA9", false), (std::vector<int32_t>{kSpace, 485}));
  EXPECT_EQ(tok_->Encode("\xE2\x82\xAC", false), (std::vector<int32_t>{kSpace, 503}));
  // Bytes that are not UTF-8 at all still encode, as byte tokens.
  EXPECT_EQ(tok_->Encode("\xFF", false), (std::vector<int32_t>{kSpace, ByteToken(0xFF)}));
  EXPECT_EQ(
      tok_->Encode("Lily\xE2\x80\x99s caf\xC3\xA9 costs 5\xE2\x82\xAC \xF0\x9F\x98\x80", true),
      (std::vector<int32_t>{1,   317, 468, 419, 280, 412, 431, 485, 280, 414,
                            356, 419, 410, 480, 503, 410, 243, 162, 155, 131}));
}

TEST_F(Llama2cTokenizerTest, TokenBytesDropsTheLeadingSpaceOnlyAfterBos) {
  EXPECT_EQ(tok_->TokenBytes(kThe, 1), "The");
  EXPECT_EQ(tok_->TokenBytes(kThe, -1), " The");
  EXPECT_EQ(tok_->TokenBytes(kThe, 2), " The");
  EXPECT_EQ(tok_->TokenBytes(kThe, 317), " The");
  EXPECT_EQ(tok_->TokenBytes(kSpace, 1), "");
  EXPECT_EQ(tok_->TokenBytes(kSpace, 317), " ");
  // A byte token is its byte, even a space right after BOS.
  EXPECT_EQ(tok_->TokenBytes(ByteToken(' '), 1), " ");
  EXPECT_EQ(tok_->TokenBytes(ByteToken('\n'), -1), "\n");
  EXPECT_EQ(tok_->TokenBytes(ByteToken(0), -1), std::string(1, '\0'));
  EXPECT_EQ(tok_->TokenBytes(ByteToken(0xFF), -1), "\xFF");
  // Special tokens contribute nothing; ids outside the vocabulary neither.
  EXPECT_EQ(tok_->TokenBytes(1, -1), "");
  EXPECT_EQ(tok_->TokenBytes(2, 317), "");
  EXPECT_EQ(tok_->TokenBytes(-5, -1), "");
  EXPECT_EQ(tok_->TokenBytes(512, -1), "");
  EXPECT_EQ(tok_->Decode({1, 403, 407, 261, 378, 2}), "Once upon a time");
  EXPECT_EQ(tok_->Decode({403, 407}), " Once upon");
}

void ExpectRoundTrip(const Tokenizer& tok, const std::string& text) {
  EXPECT_EQ(tok.Decode(tok.Encode(text, true)), text);
  // Without BOS nothing strips the dummy-prefix space.
  EXPECT_EQ(tok.Decode(tok.Encode(text, false)), text.empty() ? "" : " " + text);
}

TEST_F(Llama2cTokenizerTest, RoundTripsStoryText) {
  ExpectRoundTrip(*tok_,
                  "Once upon a time, there was a little girl named Lily. She loved to play "
                  "outside in the park. One day, she saw a big, red ball.\nLily's mom said, "
                  "\"Lily, let's go to the park.\" Lily was sad and didn't know what to do.");
  ExpectRoundTrip(*tok_, "  two leading spaces, trailing space ");
  ExpectRoundTrip(*tok_, "Tabs\tand\r\nCRLF and a NUL: " + std::string(1, '\0') + "!");
}

TEST_F(Llama2cTokenizerTest, RoundTripsMultiByteText) {
  ExpectRoundTrip(
      *tok_,
      "\xE2\x80\x9CHi,\xE2\x80\x9D said Zo\xC3\xAB \xE2\x80\x94 caf\xC3\xA9 \xE2\x82\xAC"
      "5");
  ExpectRoundTrip(*tok_,
                  std::string("\xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E ") + std::string(kEmoji));
  ExpectRoundTrip(*tok_, "\xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD");  // Thumbs up + skin tone.
  ExpectRoundTrip(*tok_, "not UTF-8: \xFF\xFE \xC3 \x80\x80\x80\x80\x80 \xE2\x80");
}

TEST_F(Llama2cTokenizerTest, RoundTripsRandomStrings) {
  std::mt19937 rng(20240601);
  std::vector<std::string> alphabet;
  for (char c = ' '; c <= '~'; ++c) alphabet.emplace_back(1, c);
  for (const char* s : {"\n", "\xC3\xA9", "\xC3\xB1", "\xE2\x82\xAC", "\xE2\x80\x99",
                        "\xE6\x97\xA5", "\xF0\x9F\x98\x80", " the", " Once", "ing"}) {
    alphabet.emplace_back(s);
  }
  for (int iter = 0; iter < 200; ++iter) {
    std::string text;
    const int len = static_cast<int>(rng() % 64);
    for (int i = 0; i < len; ++i) text += alphabet[rng() % alphabet.size()];
    SCOPED_TRACE("text: " + text);
    const std::vector<int32_t> ids = tok_->Encode(text, true);
    ASSERT_EQ(tok_->Decode(ids), text);
    // Streaming gives the same text, since it is valid UTF-8.
    IncrementalDetokenizer detok(*tok_);
    std::string streamed;
    for (int32_t id : ids) streamed += detok.Push(id);
    streamed += detok.Flush();
    ASSERT_EQ(streamed, text);
  }
}

TEST_F(Llama2cTokenizerTest, EncodesALongPromptQuickly) {
  std::string text;
  while (text.size() < 10000) {
    text += "Once upon a time, there was a little girl named Lily. \xF0\x9F\x98\x80 She said, ";
  }
  text.resize(10000);
  const auto start = std::chrono::steady_clock::now();
  const std::vector<int32_t> ids = tok_->Encode(text, true);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(seconds, 1.0);
  EXPECT_LT(ids.size(), text.size() / 2);  // Merges happened.
  // The cut may split the emoji: compare bytes, not UTF-8.
  EXPECT_EQ(tok_->Decode(ids), text);
}

TEST_F(Llama2cTokenizerTest, IncrementalDetokenizerHoldsAnEmojiUntilComplete) {
  IncrementalDetokenizer detok(*tok_);
  EXPECT_EQ(detok.Push(1), "");
  EXPECT_EQ(detok.Push(kThe), "The");
  EXPECT_EQ(detok.Push(ByteToken(0xF0)), "");
  EXPECT_EQ(detok.Push(ByteToken(0x9F)), "");
  EXPECT_EQ(detok.Push(ByteToken(0x98)), "");
  EXPECT_EQ(detok.Push(ByteToken(0x80)), kEmoji);
  EXPECT_EQ(detok.Push(kThe), " The");
  EXPECT_EQ(detok.Flush(), "");
}

TEST_F(Llama2cTokenizerTest, IncrementalDetokenizerReplacesInvalidBytes) {
  IncrementalDetokenizer detok(*tok_);
  EXPECT_EQ(detok.Push(ByteToken(0xFF)), kReplacement);
  EXPECT_EQ(detok.Push(kLowerA), "a");
  EXPECT_EQ(detok.Push(ByteToken(0xE2)), "");
  EXPECT_EQ(detok.Push(kLowerA), std::string(kReplacement) + "a");
  // An incomplete character at the end comes out of Flush as one U+FFFD.
  EXPECT_EQ(detok.Push(ByteToken(0xE2)), "");
  EXPECT_EQ(detok.Push(ByteToken(0x82)), "");
  EXPECT_EQ(detok.Flush(), kReplacement);
  EXPECT_EQ(detok.Flush(), "");
  EXPECT_EQ(detok.Push(kLowerA), "a");
}

bool IsCompleteUtf8(const std::string& bytes);

TEST_F(Llama2cTokenizerTest, IncrementalDetokenizerMatchesDecode) {
  const std::string text = "Lily\xE2\x80\x99s caf\xC3\xA9 \xE6\x97\xA5\xE6\x9C\xAC " +
                           std::string(kEmoji) + std::string(kEmoji) + " costs 5\xE2\x82\xAC.";
  const std::vector<int32_t> ids = tok_->Encode(text, true);
  IncrementalDetokenizer detok(*tok_);
  std::string streamed;
  for (int32_t id : ids) {
    const std::string part = detok.Push(id);
    EXPECT_TRUE(IsCompleteUtf8(part)) << "token " << id;
    streamed += part;
  }
  streamed += detok.Flush();
  EXPECT_EQ(streamed, tok_->Decode(ids));
  EXPECT_EQ(streamed, text);
}

// Decodes every id as the byte of the same value (ids 0..255), to drive IncrementalDetokenizer
// through byte sequences without a model file.
class ByteTokenizer final : public Tokenizer {
 public:
  std::vector<int32_t> Encode(std::string_view text, bool add_bos) const override {
    std::vector<int32_t> ids;
    if (add_bos) ids.push_back(bos_id());
    for (char c : text) ids.push_back(static_cast<unsigned char>(c));
    return ids;
  }
  std::string TokenBytes(int32_t id, int32_t) const override {
    return id >= 0 && id < 256 ? std::string(1, static_cast<char>(id)) : "";
  }
  int32_t vocab_size() const override { return 257; }
  int32_t bos_id() const override { return 256; }
  int32_t eos_id() const override { return 256; }
  std::string_view piece(int32_t) const override { return ""; }
};

// Streams `bytes` one byte per Push and returns (what each Push returned, the Flush).
std::vector<std::string> Stream(const std::string& bytes) {
  ByteTokenizer tok;
  IncrementalDetokenizer detok(tok);
  std::vector<std::string> out;
  for (int32_t id : tok.Encode(bytes, false)) out.push_back(detok.Push(id));
  out.push_back(detok.Flush());
  return out;
}

std::string Concat(const std::vector<std::string>& parts) {
  std::string s;
  for (const auto& p : parts) s += p;
  return s;
}

// True when `bytes` is valid UTF-8 that ends on a character boundary.
bool IsCompleteUtf8(const std::string& bytes) {
  const std::vector<std::string> parts = Stream(bytes);
  return parts.back().empty() && Concat(parts) == bytes;
}

TEST(IncrementalDetokenizerTest, UsesTheBaseInterfaceOnly) {
  ByteTokenizer tok;
  EXPECT_EQ(tok.stop_ids(), (std::vector<int32_t>{256}));
  EXPECT_EQ(tok.Decode(tok.Encode("abc", true)), "abc");
}

TEST(IncrementalDetokenizerTest, EmitsEachCharacterWhenItCompletes) {
  EXPECT_EQ(Stream("a\xC3\xA9"), (std::vector<std::string>{"a", "", "\xC3\xA9", ""}));
  EXPECT_EQ(Stream(std::string(kEmoji)),
            (std::vector<std::string>{"", "", "", std::string(kEmoji), ""}));
  EXPECT_EQ(Stream("\xE2\x82\xAC"), (std::vector<std::string>{"", "", "\xE2\x82\xAC", ""}));
  // The largest code point, U+10FFFF.
  EXPECT_EQ(Concat(Stream("\xF4\x8F\xBF\xBF")), "\xF4\x8F\xBF\xBF");
}

TEST(IncrementalDetokenizerTest, ReplacesEachMaximalIllFormedSubpart) {
  const std::string r(kReplacement);
  EXPECT_EQ(Stream("\xFF"), (std::vector<std::string>{r, ""}));
  EXPECT_EQ(Stream("\xE2"
                   "a"),
            (std::vector<std::string>{"", r + "a", ""}));
  EXPECT_EQ(Concat(Stream("\x80")), r);                          // Stray continuation byte.
  EXPECT_EQ(Concat(Stream("\xC0\xAF")), r + r);                  // Overlong "/".
  EXPECT_EQ(Concat(Stream("\xE0\x80\xAF")), r + r + r);          // Overlong, 3 bytes.
  EXPECT_EQ(Concat(Stream("\xED\xA0\x80")), r + r + r);          // Surrogate U+D800.
  EXPECT_EQ(Concat(Stream("\xF4\x90\x80\x80")), r + r + r + r);  // Above U+10FFFF.
  EXPECT_EQ(Concat(Stream("\xF0\x9F\x98"
                          "a")),
            r + "a");                            // Truncated emoji, then ASCII.
  EXPECT_EQ(Concat(Stream("\xF0\x9F\x98")), r);  // Truncated at the end: Flush.
  EXPECT_EQ(Concat(Stream("\xE2\xE2\x82\xAC")), r + "\xE2\x82\xAC");
}

TEST(IncrementalDetokenizerTest, ConcatenationEqualsDecodeForRandomValidText) {
  std::mt19937 rng(7);
  const std::vector<std::string> chars = {
      "a",           " ", "\n", "\xC3\xA9", "\xE2\x82\xAC", std::string(kEmoji), "\xF4\x8F\xBF\xBF",
      "\xEF\xBF\xBD"};
  for (int iter = 0; iter < 100; ++iter) {
    std::string text;
    for (int i = static_cast<int>(rng() % 30); i > 0; --i) text += chars[rng() % chars.size()];
    ASSERT_EQ(Concat(Stream(text)), text);
  }
}

// Loader errors: every malformed file gives a clear non-OK Status naming the file.
class LoaderErrorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(dir_.path().empty()) << "could not create a temp dir";
    original_ = ReadFile(ModelPath());
    if (original_.empty()) {
      GTEST_SKIP() << "stories260K tokenizer not found at " << ModelPath()
                   << " (set HELIX_SHARED_DIR to the shared/ folder)";
    }
  }

  // Offset of token `index`'s score field in the original file.
  size_t TokenOffset(int index) const {
    size_t off = 4;
    for (int i = 0; i < index; ++i) {
      int32_t len;
      std::memcpy(&len, original_.data() + off + 4, 4);
      off += 8 + len;
    }
    return off;
  }

  TempDir dir_;
  std::string original_;
};

TEST(LoaderTest, MissingFile) {
  TempDir dir;
  const std::string path = (dir.path() / "does_not_exist.bin").string();
  auto result = LoadLlama2cTokenizer(path, kVocab);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), StatusCode::kNotFound);
  EXPECT_TRUE(Contains(result.status().message(), path)) << result.status().message();
}

TEST(LoaderTest, Directory) {
  TempDir dir;
  auto result = LoadLlama2cTokenizer(dir.path().string(), kVocab);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), StatusCode::kInvalidArgument);
}

TEST_F(LoaderErrorTest, TruncatedFile) {
  const size_t size = original_.size();
  for (size_t cut : {size_t{0}, size_t{2}, size_t{4}, size_t{6}, size_t{12}, size_t{4100},
                     TokenOffset(300) + 2, TokenOffset(400) + 9, TokenOffset(511) + 8, size - 1}) {
    SCOPED_TRACE("cut at " + std::to_string(cut));
    const std::string path = dir_.Write("truncated.bin", original_.substr(0, cut));
    auto result = LoadLlama2cTokenizer(path, kVocab);
    ASSERT_FALSE(result.ok());
    EXPECT_EQ(result.status().code(), StatusCode::kDataLoss) << result.status().ToString();
    EXPECT_TRUE(Contains(result.status().message(), path)) << result.status().message();
  }
  // A cut inside the token area names the token.
  const std::string path = dir_.Write("truncated.bin", original_.substr(0, TokenOffset(511) + 8));
  auto result = LoadLlama2cTokenizer(path, kVocab);
  ASSERT_FALSE(result.ok());
  EXPECT_TRUE(Contains(result.status().message(), "token 511")) << result.status().message();
}

TEST_F(LoaderErrorTest, NegativeOrAbsurdLength) {
  for (int32_t bad_len : {-5, INT32_MIN, INT32_MAX, 1 << 20}) {
    SCOPED_TRACE("length " + std::to_string(bad_len));
    std::string bytes = original_;
    std::memcpy(bytes.data() + TokenOffset(5) + 4, &bad_len, 4);
    const std::string path = dir_.Write("bad_length.bin", bytes);
    auto result = LoadLlama2cTokenizer(path, kVocab);
    ASSERT_FALSE(result.ok());
    EXPECT_EQ(result.status().code(), StatusCode::kDataLoss);
    EXPECT_TRUE(Contains(result.status().message(), "token 5")) << result.status().message();
    EXPECT_TRUE(Contains(result.status().message(), path)) << result.status().message();
  }
  std::string bytes = original_;
  const int32_t negative = -1;
  std::memcpy(bytes.data(), &negative, 4);  // max_token_length
  auto result = LoadLlama2cTokenizer(dir_.Write("bad_max.bin", bytes), kVocab);
  EXPECT_FALSE(result.ok());
}

TEST_F(LoaderErrorTest, VocabSizeMismatch) {
  const std::string path = dir_.Write("copy.bin", original_);
  ASSERT_TRUE(LoadLlama2cTokenizer(path, kVocab).ok());
  auto fewer = LoadLlama2cTokenizer(path, kVocab - 1);  // Bytes left over.
  ASSERT_FALSE(fewer.ok());
  EXPECT_EQ(fewer.status().code(), StatusCode::kInvalidArgument);
  auto more = LoadLlama2cTokenizer(path, kVocab + 1);  // Runs off the end.
  ASSERT_FALSE(more.ok());
  EXPECT_EQ(more.status().code(), StatusCode::kDataLoss);
  for (int32_t bad : {0, -1, 2, INT32_MAX, 1 << 30}) {
    auto result = LoadLlama2cTokenizer(path, bad);
    ASSERT_FALSE(result.ok()) << bad;
    EXPECT_EQ(result.status().code(), StatusCode::kInvalidArgument) << bad;
  }
}

}  // namespace
}  // namespace helix
