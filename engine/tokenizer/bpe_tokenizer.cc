// Byte-level BPE (GPT-2 style; GGUF tokenizer.ggml.model = gpt2): special tokens, then the
// pre-tokenizer's chunks, each mapped through GPT-2's byte-to-unicode table and merged by rank.
#include <algorithm>
#include <array>
#include <cstring>
#include <mutex>
#include <queue>
#include <string>
#include <unordered_map>
#include <utility>

#include "engine/common/printable.h"
#include "engine/tokenizer/pre_tokenizer.h"
#include "engine/tokenizer/regex.h"
#include "engine/tokenizer/tokenizer_internal.h"
#include "engine/tokenizer/unicode.h"

namespace helix::tokenizer_internal {
namespace {

// GPT-2's bytes_to_unicode(): printable Latin-1 bytes stand for themselves, the other 68 bytes
// (controls, space, DEL, NBSP, soft hyphen) for U+0100 onwards in byte order, so that every byte
// is a visible character.
std::array<uint32_t, 256> ByteToUnicode() {
  std::array<uint32_t, 256> table{};
  uint32_t next = 256;
  for (uint32_t b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    table[b] = printable ? b : next++;
  }
  return table;
}

// Words longer than this are not cached (they rarely repeat, and would crowd the cache).
constexpr size_t kMaxCachedWordBytes = 128;
// The cache is dropped whole when it reaches this many words: a simple bound on its memory (a few
// MB), and the common words that make most of its hits come back within one prompt.
constexpr size_t kMaxCachedWords = size_t{1} << 16;

class BpeTokenizer final : public Tokenizer {
 public:
  BpeTokenizer(VocabData data, std::vector<int32_t> types, CompiledPreTokenizer pre,
               bool ignore_merges)
      : data_(std::move(data)),
        types_(std::move(types)),
        pre_(std::move(pre)),
        ignore_merges_(ignore_merges),
        special_(data_.tokens, types_, {kTokenControl, kTokenUserDefined, kTokenUnknown}),
        stop_ids_(StopIds(data_, types_)) {
    const int32_t n = vocab_size();
    const std::array<uint32_t, 256> byte_to_cp = ByteToUnicode();
    std::unordered_map<uint32_t, uint8_t> cp_to_byte;
    for (int b = 0; b < 256; ++b) {
      AppendUtf8(byte_to_cp[b], &byte_piece_[b]);
      cp_to_byte[byte_to_cp[b]] = static_cast<uint8_t>(b);
    }
    piece_to_id_.reserve(n);
    bytes_.resize(n);
    for (int32_t id = 0; id < n; ++id) {
      const std::string& piece = data_.tokens[id];
      if (IsSpecial(id)) {
        bytes_[id] = piece;  // Stored as plain text.
        continue;
      }
      if (types_[id] == kTokenUnused) continue;
      piece_to_id_.emplace(piece, id);  // On duplicates the lowest id wins.
      // Undo the byte mapping; a character outside the table (not expected) stays as it is.
      std::string& out = bytes_[id];
      for (size_t pos = 0; pos < piece.size();) {
        const Utf8Char c = DecodeUtf8(piece, pos);
        auto it = cp_to_byte.find(c.cp);
        if (it != cp_to_byte.end()) {
          out.push_back(static_cast<char>(it->second));
        } else {
          out.append(piece, pos, c.len);
        }
        pos += c.len;
      }
    }
    for (int b = 0; b < 256; ++b) {
      auto it = piece_to_id_.find(byte_piece_[b]);
      byte_id_[b] = it == piece_to_id_.end() ? -1 : it->second;
    }
  }

  // Parses the merges into the pair table; called once after construction.
  Status BuildMerges() {
    merges_.reserve(data_.merges.size());
    for (size_t rank = 0; rank < data_.merges.size(); ++rank) {
      const std::string& m = data_.merges[rank];
      // Split at the first space whose two sides are both pieces; a merge whose pieces are not
      // in the vocabulary cannot apply and is skipped (llama.cpp does likewise).
      bool parsed = false;
      for (size_t sp = m.find(' ', 1); sp != std::string::npos && sp + 1 < m.size();
           sp = m.find(' ', sp + 1)) {
        parsed = true;
        const std::string_view left(m.data(), sp), right(m.data() + sp + 1, m.size() - sp - 1);
        auto l = piece_to_id_.find(left), r = piece_to_id_.find(right);
        if (l == piece_to_id_.end() || r == piece_to_id_.end()) continue;
        std::string joined(left);
        joined.append(right);
        auto j = piece_to_id_.find(joined);
        if (j != piece_to_id_.end()) {
          merges_.emplace(PairKey(l->second, r->second),
                          Merge{static_cast<int32_t>(rank), j->second});
        }
        break;
      }
      if (!parsed) {
        return InvalidArgument("VocabData.merges[" + std::to_string(rank) + "] \"" + Printable(m) +
                               "\" is not two pieces separated by a space");
      }
    }
    std::vector<std::string>().swap(data_.merges);  // The pair table holds all that is needed.
    return Status::Ok();
  }

  std::vector<int32_t> Encode(std::string_view text, bool add_bos) const override {
    std::vector<int32_t> out;
    if (add_bos && data_.add_bos && data_.bos_id >= 0) out.push_back(data_.bos_id);
    std::vector<SpecialTokenMatcher::Fragment> fragments;
    special_.Split(text, &fragments);
    // One backtracking budget for the whole text, however many special tokens cut it (a byte
    // count bounds the character count).
    RegexBudget budget = RegexBudget::ForChars(text.size());
    for (const auto& f : fragments) {
      if (f.id >= 0) {
        out.push_back(f.id);
        continue;
      }
      for (std::string_view chunk : pre_.Split(f.text, &budget)) EncodeChunk(chunk, &out);
    }
    return out;
  }

  std::string TokenBytes(int32_t id, int32_t /*prev_id*/) const override {
    if (id < 0 || id >= vocab_size()) return "";
    return bytes_[id];
  }

  int32_t vocab_size() const override { return static_cast<int32_t>(data_.tokens.size()); }
  int32_t bos_id() const override { return data_.bos_id; }
  int32_t eos_id() const override { return data_.eos_id; }
  std::vector<int32_t> stop_ids() const override { return stop_ids_; }
  std::string_view piece(int32_t id) const override {
    if (id < 0 || id >= vocab_size()) return {};
    return data_.tokens[id];
  }
  std::string_view chat_template() const override { return data_.chat_template; }
  bool is_control(int32_t id) const override {
    return id >= 0 && id < vocab_size() && types_[id] == kTokenControl;
  }

 private:
  struct Merge {
    int32_t rank;
    int32_t merged;
  };
  static uint64_t PairKey(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) |
           static_cast<uint32_t>(right);
  }
  bool IsSpecial(int32_t id) const {
    const int32_t t = types_[id];
    return t == kTokenControl || t == kTokenUserDefined || t == kTokenUnknown;
  }

  void EncodeChunk(std::string_view chunk, std::vector<int32_t>* out) const {
    const bool cacheable = chunk.size() <= kMaxCachedWordBytes;
    if (cacheable) {
      std::lock_guard<std::mutex> lock(cache_mu_);
      auto it = cache_.find(chunk);
      if (it != cache_.end()) {
        out->insert(out->end(), it->second.begin(), it->second.end());
        return;
      }
    }
    std::vector<int32_t> ids = MergeChunk(chunk);
    out->insert(out->end(), ids.begin(), ids.end());
    if (cacheable) {
      std::lock_guard<std::mutex> lock(cache_mu_);
      if (cache_.size() >= kMaxCachedWords) cache_.clear();
      cache_.emplace(std::string(chunk), std::move(ids));
    }
  }

  std::vector<int32_t> MergeChunk(std::string_view chunk) const {
    if (ignore_merges_) {
      std::string mapped;
      for (unsigned char b : chunk) mapped += byte_piece_[b];
      auto it = piece_to_id_.find(mapped);
      if (it != piece_to_id_.end()) return {it->second};
    }
    // One symbol per byte, merged as a linked list; a heap of candidate merges ordered by rank,
    // then position. A merged symbol keeps its left position, so position order is text order;
    // a candidate is stale once either side's id changed or they stopped being neighbours.
    const int32_t n = static_cast<int32_t>(chunk.size());
    std::vector<int32_t> ids(n), next(n), prev(n);
    for (int32_t i = 0; i < n; ++i) {
      ids[i] = byte_id_[static_cast<unsigned char>(chunk[i])];
      next[i] = i + 1;
      prev[i] = i - 1;
    }
    struct Candidate {
      int32_t rank, left, right, left_id, right_id, merged;
    };
    auto later = [](const Candidate& a, const Candidate& b) {
      return a.rank != b.rank ? a.rank > b.rank : a.left > b.left;
    };
    std::priority_queue<Candidate, std::vector<Candidate>, decltype(later)> heap(later);
    auto consider = [&](int32_t left, int32_t right) {
      if (ids[left] < 0 || ids[right] < 0) return;
      auto it = merges_.find(PairKey(ids[left], ids[right]));
      if (it == merges_.end()) return;
      heap.push({it->second.rank, left, right, ids[left], ids[right], it->second.merged});
    };
    for (int32_t i = 0; i + 1 < n; ++i) consider(i, i + 1);
    while (!heap.empty()) {
      const Candidate c = heap.top();
      heap.pop();
      if (next[c.left] != c.right || ids[c.left] != c.left_id || ids[c.right] != c.right_id) {
        continue;
      }
      ids[c.left] = c.merged;
      ids[c.right] = -1;  // Dead: no candidate starting or ending here is valid any more.
      next[c.left] = next[c.right];
      if (next[c.left] < n) prev[next[c.left]] = c.left;
      if (prev[c.left] >= 0) consider(prev[c.left], c.left);
      if (next[c.left] < n) consider(c.left, next[c.left]);
    }
    std::vector<int32_t> result;
    for (int32_t i = 0; i < n; i = next[i]) {  // Position 0 is never merged away.
      if (ids[i] >= 0) {
        result.push_back(ids[i]);
      } else if (data_.unk_id >= 0) {  // A byte the vocabulary lacks.
        result.push_back(data_.unk_id);
      }
    }
    return result;
  }

  VocabData data_;  // merges emptied once parsed.
  const std::vector<int32_t> types_;
  const CompiledPreTokenizer pre_;
  const bool ignore_merges_;
  const SpecialTokenMatcher special_;
  const std::vector<int32_t> stop_ids_;
  PieceMap piece_to_id_;                     // Normal pieces (byte-mapped form).
  std::vector<std::string> bytes_;           // What each token decodes to.
  std::array<std::string, 256> byte_piece_;  // Byte -> its mapped character, UTF-8.
  std::array<int32_t, 256> byte_id_{};       // Byte -> token of its mapped character, or -1.
  std::unordered_map<uint64_t, Merge> merges_;

  mutable std::mutex cache_mu_;
  // Chunk bytes -> ids.
  mutable std::unordered_map<std::string, std::vector<int32_t>, StringHash, std::equal_to<>>
      cache_;  // GUARDED_BY(cache_mu_)
};

}  // namespace

StatusOr<std::unique_ptr<Tokenizer>> NewBpeTokenizer(VocabData data) {
  std::vector<int32_t> types = ResolveTokenTypes(data);
  ASSIGN_OR_RETURN(CompiledPreTokenizer pre,
                   CompiledPreTokenizer::Create(data.pre, data.pre_regexes));
  // A tokenizer.json says (model.ignore_merges); a GGUF vocabulary goes by its pre name.
  const bool ignore_merges = data.ignore_merges.value_or(PreTokenizerIgnoresMerges(data.pre));
  auto tok = std::make_unique<BpeTokenizer>(std::move(data), std::move(types), std::move(pre),
                                            ignore_merges);
  RETURN_IF_ERROR(tok->BuildMerges());
  return std::unique_ptr<Tokenizer>(std::move(tok));
}

}  // namespace helix::tokenizer_internal
