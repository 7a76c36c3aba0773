// Pre-tokenizers of byte-level BPE vocabularies: split text into the chunks that BPE merges stay
// within, as the regexes of GPT-2, Llama 3, Qwen 2 and SmolLM do. Stateless; thread-safe.
#pragma once

#include <optional>
#include <string_view>
#include <vector>

namespace helix {

// Each kind is a hand-written matcher equivalent to the regex (leftmost match, alternatives in
// order, greedy with backtracking) over the classes of unicode.h; no regex engine is involved.
enum class PreTokenizer {
  // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  kGpt2,
  // (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
  // \s*[\r\n]+|\s+(?!\S)|\s+
  kLlama3,
  // As kLlama3 with \p{N} instead of \p{N}{1,3}: one digit per chunk.
  kQwen2,
  // Every \p{N} character on its own, then kGpt2 within the text between them (HF's
  // Digits(individual_digits) + ByteLevel; llama.cpp's smollm/starcoder/refact/command-r).
  kSmolLm,
};

// The pre-tokenizer for a GGUF `tokenizer.ggml.pre` name (llama.cpp's names; "" and "default"
// mean kGpt2), or nullopt for a name this module does not know.
std::optional<PreTokenizer> PreTokenizerFromName(std::string_view name);

// True for the names whose models llama.cpp encodes with ignore_merges (a chunk that is itself a
// vocabulary entry becomes that token without merging): the Llama 3 family.
bool PreTokenizerIgnoresMerges(std::string_view name);

// The chunks of `text` in order; they are non-empty and concatenate to `text`. Ill-formed UTF-8
// bytes count as punctuation (neither letter, number nor space), one character per byte.
std::vector<std::string_view> PreTokenize(PreTokenizer kind, std::string_view text);

}  // namespace helix
