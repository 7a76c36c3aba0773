// Tokenizer: text <-> token ids for one model's vocabulary, plus UTF-8-safe streaming decode.
// Thread-safety: a loaded Tokenizer is immutable and safe to share between threads;
// an IncrementalDetokenizer holds one stream's state and belongs to that stream alone.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "engine/common/status.h"

namespace helix {

// The interface every vocabulary format implements: llama2.c here, GGUF SentencePiece and
// byte-level BPE and HF tokenizer.json through vocab_data.h. Ids are in [0, vocab_size()).
class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Token ids for `text` (raw bytes, normally UTF-8; invalid UTF-8 is still encoded, never
  // rejected). With add_bos the result starts with bos_id(). Empty text gives [] or [bos_id()].
  virtual std::vector<int32_t> Encode(std::string_view text, bool add_bos) const = 0;

  // The raw bytes token `id` contributes to the text when it follows `prev_id` (-1 at the
  // start of a sequence). Control tokens (BOS, EOS) contribute nothing in SentencePiece-style
  // vocabularies (llama2.c, GGUF llama) and their text in byte-level BPE ones (GGUF gpt2, HF
  // tokenizer.json), where chat templates write them into prompts; an id outside the vocabulary
  // gives "". The bytes may be part of a multi-byte UTF-8 character.
  virtual std::string TokenBytes(int32_t id, int32_t prev_id) const = 0;

  // The concatenated TokenBytes of `ids` (the first with prev_id -1). Not necessarily UTF-8.
  std::string Decode(const std::vector<int32_t>& ids) const;

  virtual int32_t vocab_size() const = 0;
  virtual int32_t bos_id() const = 0;
  virtual int32_t eos_id() const = 0;
  // Tokens that end generation unless the request says otherwise. Default: {eos_id()}.
  virtual std::vector<int32_t> stop_ids() const;

  // The vocabulary entry as stored (e.g. "<0x0A>", " the"), for debugging and logprobs;
  // "" for an id outside the vocabulary. The view lives as long as the Tokenizer.
  virtual std::string_view piece(int32_t id) const = 0;

  // The model's chat template (Jinja source from GGUF tokenizer.chat_template or
  // tokenizer_config.json), "" when it has none. The view lives as long as the Tokenizer.
  virtual std::string_view chat_template() const { return {}; }

  // Whether `id` is a control (special) token with text of its own, e.g. <|im_end|> in a
  // byte-level BPE vocabulary. Generated text leaves those out (vLLM's skip_special_tokens,
  // its default); SentencePiece-style control tokens contribute no text anyway.
  virtual bool is_control(int32_t) const { return false; }
};

// Loads a llama2.c tokenizer file (int32 max_token_length, then per token: float32 score,
// int32 length, bytes). The file does not record its size, so `vocab_size` comes from the
// model header; the file must hold exactly that many tokens. BOS = 1, EOS = 2, and
// stop_ids() is {1, 2}: the llama2.c stories models end a story by emitting BOS.
// Errors: NotFound (no such file), DataLoss (truncated or malformed, naming the token index),
// InvalidArgument (bad vocab_size, or bytes left over after the last token).
StatusOr<std::unique_ptr<Tokenizer>> LoadLlama2cTokenizer(const std::string& path,
                                                          int32_t vocab_size);

// The control tokens (Tokenizer::is_control) whose whole text is one of `texts`, e.g. the id of
// <|im_end|> for a stop string "<|im_end|>" (generated text leaves control tokens out, so such
// a stop string must stop at the token instead). In the order of `texts`, without repeats.
std::vector<int32_t> ControlTokensNamedBy(const Tokenizer& tokenizer,
                                          const std::vector<std::string>& texts);

// Turns a stream of token ids into text one token at a time without ever splitting a UTF-8
// character: Push returns only complete characters and holds back the bytes of one that is
// still incomplete. An ill-formed sequence becomes U+FFFD (one per maximal ill-formed
// subpart, as WHATWG/Unicode recommend) instead of being held forever. The concatenation of
// every Push and a final Flush equals tokenizer.Decode(ids) whenever that is valid UTF-8.
// REQUIRES: `tokenizer` outlives this object.
class IncrementalDetokenizer {
 public:
  // `prev_id` is the token before the first one pushed (the prompt's last token, e.g. BOS),
  // which decides e.g. whether a leading space is dropped; -1 at the very start.
  // `skip_control`: control tokens (Tokenizer::is_control) add no text, as generated text
  // should read (vLLM's skip_special_tokens); the concatenation below then leaves them out.
  explicit IncrementalDetokenizer(const Tokenizer& tokenizer, int32_t prev_id = -1,
                                  bool skip_control = false)
      : tokenizer_(tokenizer), prev_id_(prev_id), skip_control_(skip_control) {}

  // Appends token `id` and returns the text that is now complete (possibly "").
  std::string Push(int32_t id);
  // Returns whatever is still held back: an incomplete character becomes U+FFFD. The stream
  // may continue afterwards (the previous token is remembered).
  std::string Flush();

 private:
  // Moves the complete (or definitely ill-formed) prefix of pending_ into the result.
  std::string TakeComplete();

  const Tokenizer& tokenizer_;
  int32_t prev_id_ = -1;
  bool skip_control_ = false;
  std::string pending_;  // Bytes of an incomplete UTF-8 character, at most 3.
};

}  // namespace helix
