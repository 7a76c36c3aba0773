// VocabData: a model's vocabulary as plain data (what a GGUF or a Hugging Face tokenizer.json
// holds), and the factory that turns it into a Tokenizer. Value type; the returned Tokenizer is
// immutable apart from an internal, mutex-guarded cache, and safe to share between threads.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "engine/common/status.h"
#include "engine/tokenizer/tokenizer.h"

namespace helix {

// GGUF token types (llama.cpp's llama_token_type); 0 (undefined) is treated as kNormal.
enum TokenType : int32_t {
  kTokenNormal = 1,
  kTokenUnknown = 2,
  kTokenControl = 3,
  kTokenUserDefined = 4,
  kTokenUnused = 5,
  kTokenByte = 6,
};

struct VocabData {
  // "llama": SentencePiece-style BPE with scores (GGUF tokenizer.ggml.model = llama).
  // "gpt2": byte-level BPE with merges (GGUF gpt2; HF tokenizer.json BPE with ByteLevel).
  std::string model;
  // gpt2 only: the pre-tokenizer, by GGUF tokenizer.ggml.pre name ("" = GPT-2's regex); see
  // PreTokenizerFromName and RegexesForPreTokenizerName for the names understood. With
  // pre_regexes set it only decides ignore_merges when that is not set (the Llama 3 names).
  std::string pre;
  // gpt2 only: whether a chunk that is itself a piece becomes that token without merging (HF's
  // model.ignore_merges, which LoadHfTokenizerJson sets); nullopt: as `pre` names (GGUF).
  std::optional<bool> ignore_merges;
  // gpt2 only: when not empty, the pre-tokenizer instead: Hugging Face Split regexes (behavior
  // Isolated) applied in order, each to every chunk the ones before it left (regex.h lists the
  // syntax understood). HF tokenizer.json files whose pre_tokenizer is not one of pre's kinds.
  std::vector<std::string> pre_regexes;
  // id -> piece as stored: GPT-2 byte-to-unicode mapped for gpt2 (special and user-defined
  // tokens as plain text), U+2581 for spaces and <0xXX> byte pieces for llama.
  std::vector<std::string> tokens;
  // llama: merge priority per token (higher merges first). May be empty for gpt2.
  std::vector<float> scores;
  // One TokenType per token, or empty: then bos/eos/eot/pad count as control tokens, unk as
  // unknown, <0xXX> pieces (llama) as bytes, and everything else as normal.
  std::vector<int32_t> token_types;
  // gpt2: "left right" pairs in rank order (first = merged first). A piece may itself contain
  // spaces: the split chosen is the first whose two sides are both in the vocabulary.
  std::vector<std::string> merges;
  int32_t bos_id = -1, eos_id = -1, eot_id = -1, unk_id = -1, pad_id = -1;  // -1 = none.
  bool add_bos = true;           // Encode(add_bos=true) prepends bos_id (if there is one).
  bool add_space_prefix = true;  // llama: SentencePiece's dummy-prefix space.
  std::string chat_template;     // Kept for the router; Tokenizer::chat_template().
};

// Builds the tokenizer for `data`.
//
// llama: spaces become U+2581 (after a dummy-prefix space with add_space_prefix: at the start,
// and after each user-defined token matched in the text); symbols merge by highest score, the
// leftmost first, into normal and user-defined pieces only; characters that no piece covers
// fall back to <0xXX> byte tokens (unk_id where those are missing). Control tokens never come
// out of text. Decoding maps U+2581 to a space and byte tokens to their byte; control tokens
// give "", unknown ones " \xE2\x81\x87 " (U+2047, as SentencePiece), and a leading space right
// after BOS is dropped when add_space_prefix is set. merges and pre are not used.
//
// gpt2: control, user-defined and unknown tokens written literally in the text are matched first
// (leftmost, longest) and emitted as their ids, as llama.cpp does with parse_special and HF does
// for added tokens. The rest is split by the pre-tokenizer; each chunk's bytes are mapped
// through GPT-2's byte-to-unicode table and merged by rank, lowest first (leftmost on ties),
// until no merge applies (with ignore_merges, or without it for the Llama 3 family of `pre`
// names, a chunk that is itself a piece is taken whole first: llama.cpp's and HF's ignore_merges).
// The pre_regexes of one Encode call share one backtracking budget (RegexBudget::ForChars of the
// text's bytes); once it is spent, the rest of the text stays in whole chunks, never an error.
// Decoding reverses the byte mapping; special tokens decode to their text.
//
// Both: stop_ids() is eos, eot and any control token spelled <|im_end|>, <|endoftext|>,
// <|eot_id|>, <|eom_id|>, <|end_of_text|>, <end_of_turn> or <|end|>.
//
// Errors: InvalidArgument naming the field (empty or inconsistent sizes, ids out of range, bad
// token types, NaN scores, unparsable merges, an unknown pre-tokenizer, a malformed pre_regexes
// pattern); Unimplemented for a model other than llama and gpt2, or a pre_regexes pattern using a
// construct the regex engine lacks.
StatusOr<std::unique_ptr<Tokenizer>> CreateTokenizer(VocabData data);

// Reads a Hugging Face tokenizer.json whose model is byte-level BPE (Llama 3, SmolLM2, Qwen2,
// GPT-2, DeepSeek LLM/V3): vocab, merges ("a b" strings or ["a", "b"] arrays), added_tokens
// (special ones become control tokens, the others user-defined), and the pre-tokenizer: a
// Sequence of Split (Regex or String pattern, Isolated, not inverted) and Digits steps, then
// ByteLevel (its own regex or none). Regexes that a hand-written kind implements set `pre`
// (llama-bpe, qwen2, smollm or gpt2); any others go to pre_regexes, compiled here to check them.
// model.ignore_merges (default false) sets ignore_merges.
// From tokenizer_config.json (path may be ""): bos_token,
// eos_token, pad_token, unk_token, add_bos_token and chat_template. Without add_bos_token, BOS is
// added when the post_processor's template starts with the BOS token.
// Errors: NotFound (missing file), InvalidArgument (not JSON, or fields of the wrong shape,
// named), Unimplemented (a model other than BPE, a BPE that is not byte-level, or a pre-tokenizer,
// Split regex construct or normalizer this module does not implement; a regex's error names it).
StatusOr<VocabData> LoadHfTokenizerJson(const std::string& tokenizer_json_path,
                                        const std::string& tokenizer_config_json_path);

}  // namespace helix
