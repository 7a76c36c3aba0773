#include <algorithm>
#include <array>
#include <cmath>
#include <string>

#include "engine/common/printable.h"
#include "engine/tokenizer/pre_tokenizer.h"
#include "engine/tokenizer/regex.h"
#include "engine/tokenizer/tokenizer_internal.h"
#include "engine/tokenizer/vocab_data.h"

namespace helix {
namespace tokenizer_internal {

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

std::vector<int32_t> ResolveTokenTypes(const VocabData& data) {
  const size_t n = data.tokens.size();
  std::vector<int32_t> types(n, kTokenNormal);
  if (!data.token_types.empty()) {
    for (size_t i = 0; i < n; ++i) {
      types[i] = data.token_types[i] == 0 ? kTokenNormal : data.token_types[i];
    }
    return types;
  }
  if (data.model == "llama") {
    for (size_t i = 0; i < n; ++i) {
      if (ParseBytePiece(data.tokens[i]) >= 0) types[i] = kTokenByte;
    }
  }
  for (int32_t id : {data.bos_id, data.eos_id, data.eot_id, data.pad_id}) {
    if (id >= 0) types[id] = kTokenControl;
  }
  if (data.unk_id >= 0) types[data.unk_id] = kTokenUnknown;
  return types;
}

std::vector<int32_t> StopIds(const VocabData& data, const std::vector<int32_t>& types) {
  // End-of-turn markers of common chat formats: ChatML, GPT-2/StarCoder/Qwen, Llama 3, Gemma,
  // Phi-3. Only control tokens count, so ordinary text that happens to match is left alone.
  static constexpr std::array<std::string_view, 7> kEndOfTurn = {
      "<|im_end|>",      "<|endoftext|>", "<|eot_id|>", "<|eom_id|>",
      "<|end_of_text|>", "<end_of_turn>", "<|end|>"};
  std::vector<int32_t> ids;
  auto add = [&](int32_t id) {
    if (id >= 0 && std::find(ids.begin(), ids.end(), id) == ids.end()) ids.push_back(id);
  };
  add(data.eos_id);
  add(data.eot_id);
  for (size_t i = 0; i < data.tokens.size(); ++i) {
    if (types[i] != kTokenControl) continue;
    if (std::find(kEndOfTurn.begin(), kEndOfTurn.end(), data.tokens[i]) != kEndOfTurn.end()) {
      add(static_cast<int32_t>(i));
    }
  }
  return ids;
}

SpecialTokenMatcher::SpecialTokenMatcher(const std::vector<std::string>& tokens,
                                         const std::vector<int32_t>& types,
                                         std::initializer_list<int32_t> matched_types)
    : nodes_(1), root_next_(256, -1) {
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i].empty()) continue;
    if (std::find(matched_types.begin(), matched_types.end(), types[i]) == matched_types.end()) {
      continue;
    }
    int32_t node = 0;
    for (const char ch : tokens[i]) {
      const auto b = static_cast<unsigned char>(ch);
      int32_t child = -1;
      if (node == 0) {
        child = root_next_[b];
      } else {
        for (const auto& [byte, n] : nodes_[node].next) {
          if (byte == b) child = n;
        }
      }
      if (child < 0) {
        child = static_cast<int32_t>(nodes_.size());
        nodes_.emplace_back();
        if (node == 0) {
          root_next_[b] = child;
        } else {
          nodes_[node].next.emplace_back(b, child);
        }
      }
      node = child;
    }
    // Ids come in order: among identical pieces the lowest wins.
    if (nodes_[node].id < 0) nodes_[node].id = static_cast<int32_t>(i);
    empty_ = false;
  }
}

void SpecialTokenMatcher::Split(std::string_view text, std::vector<Fragment>* out) const {
  if (empty_) {
    if (!text.empty()) out->push_back({text, -1});
    return;
  }
  size_t start = 0;  // Of the ordinary text not yet emitted.
  for (size_t i = 0; i < text.size();) {
    // The longest piece starting at i: the deepest node with an id along the text's path.
    int32_t found = -1;
    size_t found_len = 0;
    int32_t node = root_next_[static_cast<unsigned char>(text[i])];
    for (size_t j = i + 1; node >= 0; ++j) {
      if (nodes_[node].id >= 0) {
        found = nodes_[node].id;
        found_len = j - i;
      }
      if (j == text.size()) break;
      const auto b = static_cast<unsigned char>(text[j]);
      int32_t child = -1;
      for (const auto& [byte, n] : nodes_[node].next) {
        if (byte == b) {
          child = n;
          break;
        }
      }
      node = child;
    }
    if (found < 0) {
      ++i;
      continue;
    }
    if (i > start) out->push_back({text.substr(start, i - start), -1});
    out->push_back({text.substr(i, found_len), found});
    i += found_len;
    start = i;
  }
  if (start < text.size()) out->push_back({text.substr(start), -1});
}

}  // namespace tokenizer_internal

namespace {

// Far above any real vocabulary (Gemma has 256K), far below int32 overflow.
constexpr size_t kMaxVocabSize = size_t{1} << 24;

Status Validate(const VocabData& d) {
  if (d.model.empty()) {
    return InvalidArgument("VocabData.model is empty; expected \"llama\" or \"gpt2\"");
  }
  if (d.model != "llama" && d.model != "gpt2") {
    return Unimplemented("VocabData.model \"" + Printable(d.model) +
                         "\" is not supported; expected \"llama\" or \"gpt2\"");
  }
  const size_t n = d.tokens.size();
  if (n == 0) return InvalidArgument("VocabData.tokens is empty");
  if (n > kMaxVocabSize) {
    return InvalidArgument("VocabData.tokens has " + std::to_string(n) + " entries; at most " +
                           std::to_string(kMaxVocabSize) + " are supported");
  }
  if (d.model == "llama" && d.scores.size() != n) {
    return InvalidArgument("VocabData.scores has " + std::to_string(d.scores.size()) +
                           " entries; the llama model needs one per token (" + std::to_string(n) +
                           ")");
  }
  if (!d.scores.empty() && d.scores.size() != n) {
    return InvalidArgument("VocabData.scores has " + std::to_string(d.scores.size()) +
                           " entries; expected 0 or one per token (" + std::to_string(n) + ")");
  }
  for (size_t i = 0; i < d.scores.size(); ++i) {
    if (std::isnan(d.scores[i])) {
      return InvalidArgument("VocabData.scores[" + std::to_string(i) + "] is NaN");
    }
  }
  if (!d.token_types.empty() && d.token_types.size() != n) {
    return InvalidArgument("VocabData.token_types has " + std::to_string(d.token_types.size()) +
                           " entries; expected 0 or one per token (" + std::to_string(n) + ")");
  }
  for (size_t i = 0; i < d.token_types.size(); ++i) {
    if (d.token_types[i] < 0 || d.token_types[i] > kTokenByte) {
      return InvalidArgument("VocabData.token_types[" + std::to_string(i) + "] is " +
                             std::to_string(d.token_types[i]) + "; expected 0..6");
    }
  }
  const std::pair<const char*, int32_t> ids[] = {{"bos_id", d.bos_id},
                                                 {"eos_id", d.eos_id},
                                                 {"eot_id", d.eot_id},
                                                 {"unk_id", d.unk_id},
                                                 {"pad_id", d.pad_id}};
  for (const auto& [name, id] : ids) {
    if (id < -1 || id >= static_cast<int64_t>(n)) {
      return InvalidArgument("VocabData." + std::string(name) + " is " + std::to_string(id) +
                             "; expected -1 (none) or 0.." + std::to_string(n - 1));
    }
  }
  if (d.model == "gpt2") {
    if (!PreTokenizerFromName(d.pre) && !RegexesForPreTokenizerName(d.pre)) {
      return InvalidArgument(
          "VocabData.pre \"" + Printable(d.pre) +
          "\" is not a known pre-tokenizer (e.g. gpt2, llama-bpe, qwen2, smollm, "
          "deepseek-v3)");
    }
    for (size_t i = 0; i < d.pre_regexes.size(); ++i) {
      StatusOr<Regex> re = Regex::Compile(d.pre_regexes[i]);
      if (!re.ok()) {
        return re.status().WithPrefix("VocabData.pre_regexes[" + std::to_string(i) + "] \"" +
                                      Printable(d.pre_regexes[i]) + "\"");
      }
    }
  }
  return Status::Ok();
}

}  // namespace

StatusOr<std::unique_ptr<Tokenizer>> CreateTokenizer(VocabData data) {
  RETURN_IF_ERROR(Validate(data));
  if (data.model == "llama") return tokenizer_internal::NewSpmTokenizer(std::move(data));
  return tokenizer_internal::NewBpeTokenizer(std::move(data));
}

}  // namespace helix
