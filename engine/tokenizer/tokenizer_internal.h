// Pieces shared by the vocabulary-based tokenizers (spm_tokenizer.cc, bpe_tokenizer.cc); not for
// use outside engine/tokenizer/. Immutable once built; thread-safe.
#pragma once

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "engine/common/status.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/tokenizer/vocab_data.h"

namespace helix::tokenizer_internal {

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using PieceMap = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

// Parses "<0xXX>" (either case of hex digits); -1 for anything else.
int ParseBytePiece(std::string_view piece);

// data.token_types with the defaults of VocabData filled in (one entry per token; 0 -> normal).
// REQUIRES: data was validated by CreateTokenizer.
std::vector<int32_t> ResolveTokenTypes(const VocabData& data);

// eos, eot and the control tokens whose text marks the end of a turn, without duplicates.
std::vector<int32_t> StopIds(const VocabData& data, const std::vector<int32_t>& types);

// Finds tokens written literally in a text, leftmost first and longest at a position (the
// lowest id among identical pieces). Each position costs at most the longest piece's length.
class SpecialTokenMatcher {
 public:
  // `tokens` and `types` as in VocabData; the tokens whose type is in `matched_types` (and
  // whose piece is not empty) are looked for.
  SpecialTokenMatcher(const std::vector<std::string>& tokens, const std::vector<int32_t>& types,
                      std::initializer_list<int32_t> matched_types);

  struct Fragment {
    std::string_view text;
    int32_t id;  // The special token, or -1 for ordinary text.
  };
  // Appends `text` cut into ordinary text and special tokens, in order.
  void Split(std::string_view text, std::vector<Fragment>* out) const;

 private:
  // A trie of the pieces. Comparing every piece that shares a position's first byte cost the
  // sum of their lengths there: quadratic with many pieces sharing prefixes.
  struct Node {
    int32_t id = -1;                                      // the piece ending here, or -1
    std::vector<std::pair<unsigned char, int32_t>> next;  // (byte, node), few per node
  };
  std::vector<Node> nodes_;         // nodes_[0] is the root
  std::vector<int32_t> root_next_;  // the root's children by byte (256 entries, -1: none)
  bool empty_ = true;
};

// REQUIRES: data validated by CreateTokenizer, data.model == "llama".
StatusOr<std::unique_ptr<Tokenizer>> NewSpmTokenizer(VocabData data);
// REQUIRES: data validated by CreateTokenizer, data.model == "gpt2".
StatusOr<std::unique_ptr<Tokenizer>> NewBpeTokenizer(VocabData data);

}  // namespace helix::tokenizer_internal
