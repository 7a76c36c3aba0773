// Pre-tokenizers of byte-level BPE vocabularies: split text into the chunks that BPE merges stay
// within. Hand-written matchers for the regexes of GPT-2, Llama 3, Qwen 2 and SmolLM; any other
// list of Hugging Face Split regexes (DeepSeek's, ...) runs on the regex engine of regex.h.
// Stateless or immutable once built; thread-safe.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "engine/common/status.h"
#include "engine/tokenizer/regex.h"

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
// mean kGpt2), or nullopt for a name without a hand-written matcher.
std::optional<PreTokenizer> PreTokenizerFromName(std::string_view name);

// A name PreTokenizerFromName maps to `kind`: gpt2, llama-bpe, qwen2 or smollm.
std::string_view PreTokenizerName(PreTokenizer kind);

// The Split regexes (behavior Isolated, applied in order) that `kind` implements, as tokenizer.json
// files spell them; kSmolLm's first, \p{N}, stands for Digits(individual_digits=true).
std::vector<std::string> PreTokenizerRegexes(PreTokenizer kind);

// The kind whose regexes are exactly `regexes`, if any.
std::optional<PreTokenizer> PreTokenizerForRegexes(const std::vector<std::string>& regexes);

// The Split regexes of a tokenizer.ggml.pre name that has no hand-written matcher and runs on the
// regex engine: deepseek-v3, deepseek-llm and deepseek-coder (llama.cpp's lists); else nullopt.
std::optional<std::vector<std::string>> RegexesForPreTokenizerName(std::string_view name);

// True for the names whose models llama.cpp encodes with ignore_merges (a chunk that is itself a
// vocabulary entry becomes that token without merging): the Llama 3 family.
bool PreTokenizerIgnoresMerges(std::string_view name);

// The chunks of `text` in order; they are non-empty and concatenate to `text`. Ill-formed UTF-8
// bytes count as punctuation (neither letter, number nor space), one character per byte.
std::vector<std::string_view> PreTokenize(PreTokenizer kind, std::string_view text);

// Hugging Face's Split pre-tokenizers with behavior Isolated, in sequence: each regex cuts every
// chunk the previous ones left into its matches and the stretches between them, the chunk standing
// for the whole subject (anchors and lookahead see nothing beyond it).
class RegexPreTokenizer {
 public:
  // Errors: a pattern's compile error (InvalidArgument or Unimplemented) naming it.
  static StatusOr<RegexPreTokenizer> Create(const std::vector<std::string>& patterns);

  // The chunks of `text` in order; non-empty and concatenating to `text`. All the regexes, on all
  // the chunks, spend one backtracking budget: `budget` (which a caller may share between the
  // fragments of one text), else RegexBudget::ForChars(the characters of text). Should a search
  // run out (of steps or stack), the rest of its chunk stays whole, and so does every later chunk
  // once the steps are spent, as HF's Split leaves a chunk when Oniguruma's retry limit ends the
  // matching: never an error, never more than the budget's steps.
  std::vector<std::string_view> Split(std::string_view text, RegexBudget* budget = nullptr) const;

 private:
  std::vector<Regex> regexes_;
};

// What splits a byte-level BPE vocabulary's text (VocabData's pre and pre_regexes): a hand-written
// kind when the regexes are one's (they are faster), else the regexes on the regex engine.
class CompiledPreTokenizer {
 public:
  // `regexes` when not empty, else the regexes or kind of the tokenizer.ggml.pre name `name`.
  // Errors: InvalidArgument for an unknown name; a regex's compile error, naming it.
  static StatusOr<CompiledPreTokenizer> Create(std::string_view name,
                                               const std::vector<std::string>& regexes);

  // As RegexPreTokenizer::Split; the hand-written kinds take linear time and no budget.
  std::vector<std::string_view> Split(std::string_view text, RegexBudget* budget = nullptr) const;

  // The hand-written kind in use, or nullopt when the regex engine runs.
  std::optional<PreTokenizer> kind() const { return kind_; }

 private:
  std::optional<PreTokenizer> kind_;
  std::optional<RegexPreTokenizer> regexes_;
};

}  // namespace helix
