// SentencePiece-style BPE with scores (GGUF tokenizer.ggml.model = llama: Llama 2, TinyLlama,
// Mistral v0.1): spaces as U+2581, merges by highest score, byte fallback to <0xXX> tokens.
#include <algorithm>
#include <array>
#include <queue>
#include <string>
#include <utility>

#include "engine/tokenizer/tokenizer_internal.h"
#include "engine/tokenizer/unicode.h"

namespace helix::tokenizer_internal {
namespace {

constexpr std::string_view kSpaceMarker = "\xE2\x96\x81";    // U+2581
constexpr std::string_view kUnknownText = " \xE2\x81\x87 ";  // " U+2047 ", as SentencePiece.

class SpmTokenizer final : public Tokenizer {
 public:
  SpmTokenizer(VocabData data, std::vector<int32_t> types)
      : data_(std::move(data)),
        types_(std::move(types)),
        // SentencePiece matches user-defined pieces in the text; control pieces never come from
        // text.
        special_(data_.tokens, types_, {kTokenUserDefined}),
        stop_ids_(StopIds(data_, types_)) {
    const int32_t n = vocab_size();
    byte_id_.fill(-1);
    bytes_.resize(n);
    for (int32_t id = 0; id < n; ++id) {
      const std::string& piece = data_.tokens[id];
      switch (types_[id]) {
        case kTokenNormal: {
          mergeable_.emplace(piece, id);  // On duplicates the lowest id wins.
          max_piece_len_ = std::max(max_piece_len_, piece.size());
          std::string& out = bytes_[id];
          for (size_t pos = 0; pos < piece.size();) {
            if (piece.compare(pos, kSpaceMarker.size(), kSpaceMarker) == 0) {
              out += ' ';
              pos += kSpaceMarker.size();
            } else {
              out += piece[pos++];
            }
          }
          break;
        }
        case kTokenUserDefined:
          mergeable_.emplace(piece, id);
          max_piece_len_ = std::max(max_piece_len_, piece.size());
          bytes_[id] = piece;
          break;
        case kTokenByte: {
          const int b = ParseBytePiece(piece);
          if (b >= 0) {
            if (byte_id_[b] < 0) byte_id_[b] = id;
            bytes_[id] = std::string(1, static_cast<char>(b));
          }
          break;
        }
        case kTokenUnknown:
          bytes_[id] = kUnknownText;
          break;
        default:  // Control and unused tokens decode to nothing.
          break;
      }
    }
  }

  std::vector<int32_t> Encode(std::string_view text, bool add_bos) const override {
    std::vector<int32_t> out;
    if (add_bos && data_.add_bos && data_.bos_id >= 0) out.push_back(data_.bos_id);
    std::vector<SpecialTokenMatcher::Fragment> fragments;
    special_.Split(text, &fragments);
    // As llama.cpp: the dummy prefix goes before the text and again after every matched token.
    bool after_special = true;
    std::string escaped;
    for (const auto& f : fragments) {
      if (f.id >= 0) {
        out.push_back(f.id);
        after_special = true;
        continue;
      }
      escaped.clear();
      if (data_.add_space_prefix && after_special) escaped = kSpaceMarker;
      for (char c : f.text) {
        if (c == ' ') {
          escaped += kSpaceMarker;
        } else {
          escaped += c;
        }
      }
      EncodeEscaped(escaped, &out);
      after_special = false;
    }
    return out;
  }

  std::string TokenBytes(int32_t id, int32_t prev_id) const override {
    if (id < 0 || id >= vocab_size()) return "";
    const std::string& bytes = bytes_[id];
    // SentencePiece drops the dummy-prefix space at the start of the text.
    if (data_.add_space_prefix && prev_id >= 0 && prev_id == data_.bos_id &&
        types_[id] == kTokenNormal && !bytes.empty() && bytes[0] == ' ') {
      return bytes.substr(1);
    }
    return bytes;
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

 private:
  int32_t Lookup(std::string_view s) const {
    auto it = mergeable_.find(s);
    return it == mergeable_.end() ? -1 : it->second;
  }

  // SentencePiece BPE over one fragment: one symbol per character, then, until none is left,
  // merge the adjacent pair whose concatenation is the highest-scoring piece (leftmost on ties).
  // A heap of candidates over a linked list; a symbol keeps its start when it absorbs its right
  // neighbour (which is left with length 0), so a candidate is stale once its left symbol is
  // gone, the pair stopped being neighbours, or either side grew.
  void EncodeEscaped(std::string_view text, std::vector<int32_t>* out) const {
    std::vector<int32_t> start, len, id;
    start.reserve(text.size());
    for (size_t pos = 0; pos < text.size();) {
      const uint32_t l = DecodeUtf8(text, pos).len;
      start.push_back(static_cast<int32_t>(pos));
      len.push_back(static_cast<int32_t>(l));
      id.push_back(Lookup(text.substr(pos, l)));
      pos += l;
    }
    const int32_t n = static_cast<int32_t>(start.size());
    std::vector<int32_t> next(n), prev(n);
    for (int32_t i = 0; i < n; ++i) {
      next[i] = i + 1;
      prev[i] = i - 1;
    }
    struct Candidate {
      float score;
      int32_t left, right, size, merged;
    };
    auto lower_priority = [](const Candidate& a, const Candidate& b) {
      return a.score != b.score ? a.score < b.score : a.left > b.left;
    };
    std::priority_queue<Candidate, std::vector<Candidate>, decltype(lower_priority)> heap(
        lower_priority);
    auto consider = [&](int32_t left, int32_t right) {
      const int32_t size = len[left] + len[right];
      if (static_cast<size_t>(size) > max_piece_len_) return;
      const int32_t merged = Lookup(text.substr(start[left], size));
      if (merged >= 0) heap.push({data_.scores[merged], left, right, size, merged});
    };
    for (int32_t i = 0; i + 1 < n; ++i) consider(i, i + 1);
    while (!heap.empty()) {
      const Candidate c = heap.top();
      heap.pop();
      if (len[c.left] == 0 || next[c.left] != c.right || len[c.left] + len[c.right] != c.size) {
        continue;
      }
      len[c.left] = c.size;
      len[c.right] = 0;  // Dead: every candidate that involves it fails the size check.
      id[c.left] = c.merged;
      next[c.left] = next[c.right];
      if (next[c.left] < n) prev[next[c.left]] = c.left;
      if (prev[c.left] >= 0) consider(prev[c.left], c.left);
      if (next[c.left] < n) consider(c.left, next[c.left]);
    }
    for (int32_t i = 0; i < n; i = next[i]) {
      if (id[i] >= 0) {
        out->push_back(id[i]);
        continue;
      }
      // A character no piece covers (merged symbols always are pieces): its byte tokens, or
      // one unk_id when the vocabulary lacks some of them.
      bool have_bytes = true;
      for (int32_t k = 0; k < len[i]; ++k) {
        have_bytes = have_bytes && byte_id_[static_cast<unsigned char>(text[start[i] + k])] >= 0;
      }
      if (have_bytes) {
        for (int32_t k = 0; k < len[i]; ++k) {
          out->push_back(byte_id_[static_cast<unsigned char>(text[start[i] + k])]);
        }
      } else if (data_.unk_id >= 0) {
        out->push_back(data_.unk_id);
      }
    }
  }

  const VocabData data_;
  const std::vector<int32_t> types_;
  const SpecialTokenMatcher special_;
  const std::vector<int32_t> stop_ids_;
  PieceMap mergeable_;  // Normal and user-defined pieces: what merging may produce.
  size_t max_piece_len_ = 0;
  std::array<int32_t, 256> byte_id_;  // Byte -> its <0xXX> token, or -1.
  std::vector<std::string> bytes_;    // What each token decodes to.
};

}  // namespace

StatusOr<std::unique_ptr<Tokenizer>> NewSpmTokenizer(VocabData data) {
  std::vector<int32_t> types = ResolveTokenTypes(data);
  return std::unique_ptr<Tokenizer>(
      std::make_unique<SpmTokenizer>(std::move(data), std::move(types)));
}

}  // namespace helix::tokenizer_internal
