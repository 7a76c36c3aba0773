// The llama2.c tokenizer format (karpathy/llama2.c, tokenizer.py's export): a SentencePiece
// BPE vocabulary flattened to (score, bytes) pairs. Encoding follows run.c's encode().
#include <array>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <queue>
#include <string>
#include <unordered_map>
#include <utility>

#include "engine/tokenizer/tokenizer.h"

namespace helix {
namespace {

constexpr int32_t kBosId = 1;
constexpr int32_t kEosId = 2;
// Far above any real vocabulary (Llama 3 has 128K, Gemma 256K), far below what would make
// the checks on the file size overflow.
constexpr int32_t kMaxVocabSize = 1 << 24;
// Tokenizer files are a few MB at most; refuse to slurp something that clearly is not one.
constexpr uintmax_t kMaxFileBytes = uintmax_t{1} << 30;

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};

// Parses "<0xXX>" (upper- or lower-case hex); returns -1 for anything else.
int ParseBytePiece(std::string_view piece) {
  if (piece.size() != 6 || piece.substr(0, 3) != "<0x" || piece[5] != '>') return -1;
  int value = 0;
  for (char c : piece.substr(3, 2)) {
    int digit;
    if (c >= '0' && c <= '9') {
      digit = c - '0';
    } else if (c >= 'A' && c <= 'F') {
      digit = c - 'A' + 10;
    } else if (c >= 'a' && c <= 'f') {
      digit = c - 'a' + 10;
    } else {
      return -1;
    }
    value = value * 16 + digit;
  }
  return value;
}

class Llama2cTokenizer final : public Tokenizer {
 public:
  Llama2cTokenizer(std::vector<std::string> pieces, std::vector<float> scores)
      : pieces_(std::move(pieces)), scores_(std::move(scores)) {
    const int32_t n = static_cast<int32_t>(pieces_.size());
    piece_to_id_.reserve(pieces_.size());
    bytes_.resize(pieces_.size());
    is_byte_token_.assign(pieces_.size(), false);
    for (int32_t id = 0; id < n; ++id) {
      piece_to_id_.emplace(pieces_[id], id);  // On duplicates the lowest id wins.
      const int byte = ParseBytePiece(pieces_[id]);
      if (byte >= 0) {
        bytes_[id] = std::string(1, static_cast<char>(byte));
        is_byte_token_[id] = true;
      } else if (id != kBosId && id != kEosId) {
        bytes_[id] = pieces_[id];
      }
    }
    // Byte fallback: llama2.c assumes id = byte + 3; looking the pieces up gives the same ids
    // for a standard file and stays correct for one without byte tokens (<unk>, id 0).
    for (int b = 0; b < 256; ++b) {
      static constexpr char kHex[] = "0123456789ABCDEF";
      const std::string name = {'<', '0', 'x', kHex[b >> 4], kHex[b & 15], '>'};
      byte_to_id_[b] = Lookup(name).value_or(0);
    }
    dummy_prefix_id_ = Lookup(" ").value_or(byte_to_id_[' ']);
  }

  std::vector<int32_t> Encode(std::string_view text, bool add_bos) const override;

  std::string TokenBytes(int32_t id, int32_t prev_id) const override {
    if (id < 0 || id >= vocab_size()) return "";
    const std::string& bytes = bytes_[id];
    // SentencePiece drops the dummy-prefix space at the start of the text (llama2.c PR #89).
    if (prev_id == kBosId && !is_byte_token_[id] && !bytes.empty() && bytes[0] == ' ') {
      return bytes.substr(1);
    }
    return bytes;
  }

  int32_t vocab_size() const override { return static_cast<int32_t>(pieces_.size()); }
  int32_t bos_id() const override { return kBosId; }
  int32_t eos_id() const override { return kEosId; }
  std::vector<int32_t> stop_ids() const override { return {kBosId, kEosId}; }

  std::string_view piece(int32_t id) const override {
    if (id < 0 || id >= vocab_size()) return {};
    return pieces_[id];
  }

 private:
  std::optional<int32_t> Lookup(std::string_view s) const {
    auto it = piece_to_id_.find(s);
    if (it == piece_to_id_.end()) return std::nullopt;
    return it->second;
  }

  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::vector<std::string> bytes_;  // What each token decodes to ("" for BOS/EOS).
  std::vector<bool> is_byte_token_;
  std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>> piece_to_id_;
  std::array<int32_t, 256> byte_to_id_{};
  int32_t dummy_prefix_id_ = 0;
};

std::vector<int32_t> Llama2cTokenizer::Encode(std::string_view text, bool add_bos) const {
  std::vector<int32_t> out;
  if (add_bos) out.push_back(kBosId);
  if (text.empty()) return out;

  // One symbol per UTF-8 code point (a lead byte plus up to three continuation bytes, as
  // run.c groups them; stray bytes form their own group), or its bytes if not in the vocab.
  std::vector<int32_t> ids;
  ids.reserve(text.size() + 1);
  ids.push_back(dummy_prefix_id_);
  for (size_t i = 0; i < text.size();) {
    size_t len = 1;
    while (len < 4 && i + len < text.size() &&
           (static_cast<unsigned char>(text[i + len]) & 0xC0) == 0x80) {
      ++len;
    }
    const std::string_view unit = text.substr(i, len);
    if (auto id = Lookup(unit)) {
      ids.push_back(*id);
    } else {
      for (char c : unit) ids.push_back(byte_to_id_[static_cast<unsigned char>(c)]);
    }
    i += len;
  }

  // run.c merges, until none is left, the adjacent pair whose concatenated pieces form the
  // highest-scoring vocabulary entry, the leftmost on ties. Same result in O(n log n): a heap of
  // candidate pairs over a linked list of symbols. A merged symbol keeps its left position, so
  // the position order is the sequence order, and a candidate is stale once either side's id
  // changed or the two stopped being neighbours.
  struct Candidate {
    float score;
    int32_t left, right;  // Positions in ids.
    int32_t left_id, right_id, merged_id;
  };
  auto lower_priority = [](const Candidate& a, const Candidate& b) {
    if (a.score != b.score) return a.score < b.score;
    return a.left > b.left;
  };
  std::priority_queue<Candidate, std::vector<Candidate>, decltype(lower_priority)> heap(
      lower_priority);
  const int32_t n = static_cast<int32_t>(ids.size());
  std::vector<int32_t> next(n), prev(n);
  for (int32_t i = 0; i < n; ++i) {
    next[i] = i + 1;
    prev[i] = i - 1;
  }
  std::string concat;
  auto consider = [&](int32_t left, int32_t right) {
    concat.assign(pieces_[ids[left]]);
    concat.append(pieces_[ids[right]]);
    if (auto merged = Lookup(concat)) {
      heap.push({scores_[*merged], left, right, ids[left], ids[right], *merged});
    }
  };
  for (int32_t i = 0; i + 1 < n; ++i) consider(i, i + 1);
  while (!heap.empty()) {
    const Candidate c = heap.top();
    heap.pop();
    if (next[c.left] != c.right || ids[c.left] != c.left_id || ids[c.right] != c.right_id) {
      continue;
    }
    ids[c.left] = c.merged_id;
    ids[c.right] = -1;
    next[c.left] = next[c.right];
    if (next[c.left] < n) prev[next[c.left]] = c.left;
    if (prev[c.left] >= 0) consider(prev[c.left], c.left);
    if (next[c.left] < n) consider(c.left, next[c.left]);
  }
  for (int32_t i = 0; i < n; i = next[i]) out.push_back(ids[i]);  // Position 0 never merges away.
  return out;
}

// Reads from an in-memory copy of the file with bounds checks.
class Reader {
 public:
  explicit Reader(std::string_view data) : data_(data) {}
  size_t remaining() const { return data_.size() - pos_; }
  size_t pos() const { return pos_; }
  template <typename T>
  bool Read(T* value) {
    if (remaining() < sizeof(T)) return false;
    std::memcpy(value, data_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return true;
  }
  bool ReadBytes(size_t n, std::string* out) {
    if (remaining() < n) return false;
    out->assign(data_.data() + pos_, n);
    pos_ += n;
    return true;
  }

 private:
  std::string_view data_;
  size_t pos_ = 0;
};

}  // namespace

StatusOr<std::unique_ptr<Tokenizer>> LoadLlama2cTokenizer(const std::string& path,
                                                          int32_t vocab_size) {
  static_assert(sizeof(float) == 4 && sizeof(int32_t) == 4);
  const std::string where = "llama2.c tokenizer " + path;
  if (vocab_size < 3 || vocab_size > kMaxVocabSize) {
    return InvalidArgument(where + ": vocab_size " + std::to_string(vocab_size) +
                           " out of range; expected 3.." + std::to_string(kMaxVocabSize));
  }

  std::error_code ec;
  const std::filesystem::file_status st = std::filesystem::status(path, ec);
  if (st.type() == std::filesystem::file_type::not_found) {
    return NotFound(where + ": no such file");
  }
  if (ec) return Unavailable(where + ": cannot stat: " + ec.message());
  if (!std::filesystem::is_regular_file(st)) {
    return InvalidArgument(where + ": not a regular file");
  }
  const uintmax_t size = std::filesystem::file_size(path, ec);
  if (ec) return Unavailable(where + ": cannot get the size: " + ec.message());
  if (size > kMaxFileBytes) {
    return InvalidArgument(where + ": " + std::to_string(size) +
                           " bytes is too large for a tokenizer file");
  }
  // Every token takes at least 8 bytes (score + length): reject a too-short file before
  // allocating anything per token.
  if (size < 4 + uint64_t{8} * static_cast<uint64_t>(vocab_size)) {
    return DataLoss(where + ": truncated: " + std::to_string(size) + " bytes cannot hold " +
                    std::to_string(vocab_size) + " tokens");
  }
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    const int err = errno;
    return Status(err == EACCES ? StatusCode::kPermissionDenied : StatusCode::kUnavailable,
                  where + ": cannot open: " + std::strerror(err));
  }
  std::string data(static_cast<size_t>(size), '\0');
  if (!file.read(data.data(), static_cast<std::streamsize>(size))) {
    return DataLoss(where + ": read failed (file changed while loading?)");
  }

  Reader reader(data);
  int32_t max_token_length = 0;
  if (!reader.Read(&max_token_length)) return DataLoss(where + ": truncated header");
  if (max_token_length < 0) {
    return DataLoss(where + ": negative max_token_length " + std::to_string(max_token_length));
  }

  std::vector<std::string> pieces(vocab_size);
  std::vector<float> scores(vocab_size);
  for (int32_t i = 0; i < vocab_size; ++i) {
    const auto token = [i] { return "token " + std::to_string(i); };
    int32_t len = 0;
    if (!reader.Read(&scores[i]) || !reader.Read(&len)) {
      return DataLoss(where + ": truncated at " + token() + " (offset " +
                      std::to_string(reader.pos()) + ")");
    }
    if (std::isnan(scores[i])) return DataLoss(where + ": " + token() + " has a NaN score");
    if (len < 0) {
      return DataLoss(where + ": " + token() + " has negative length " + std::to_string(len));
    }
    if (static_cast<size_t>(len) > reader.remaining()) {
      return DataLoss(where + ": " + token() + " has length " + std::to_string(len) + " but only " +
                      std::to_string(reader.remaining()) + " bytes remain (truncated file?)");
    }
    (void)reader.ReadBytes(static_cast<size_t>(len), &pieces[i]);
  }
  if (reader.remaining() != 0) {
    return InvalidArgument(where + ": " + std::to_string(reader.remaining()) +
                           " bytes left after token " + std::to_string(vocab_size - 1) +
                           "; does vocab_size " + std::to_string(vocab_size) + " match the model?");
  }
  return std::unique_ptr<Tokenizer>(
      std::make_unique<Llama2cTokenizer>(std::move(pieces), std::move(scores)));
}

}  // namespace helix
