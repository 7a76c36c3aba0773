// Chat templates the router can apply: the families the engine loads, recognised from the
// model's own Jinja template (GGUF tokenizer.chat_template / tokenizer_config.json) and
// rendered natively (there is no Jinja interpreter here). Pure functions; thread-safe.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "engine/common/status.h"
#include "engine/tokenizer/tokenizer.h"

namespace helix::router {

enum class ChatStyle {
  kNone,    // the model has no template (or one we do not recognise): chat is refused
  kChatML,  // <|im_start|>role\n...<|im_end|>\n  (SmolLM2, Qwen2)
  kLlama3,  // <|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>
  kLlama2,  // [INST] <<SYS>>...<</SYS>> ... [/INST]
};
const char* ChatStyleName(ChatStyle s);

struct ChatMessage {
  std::string role;  // system | user | assistant
  std::string content;
};

ChatStyle DetectChatStyle(std::string_view jinja_template);

// The system message a ChatML template writes when the conversation does not start with one
// (SmolLM2: "You are a helpful AI assistant named SmolLM, ..."; Qwen2: "You are a helpful
// assistant."), found as a literal '<|im_start|>system\n...<|im_end|>' string in the template;
// empty when it has none.
std::string DefaultSystemPrompt(std::string_view jinja_template);

// The prompt text for `messages`, ending with the assistant's turn opened, as the model's
// template renders it: ChatML with `default_system` first when the first message is not a
// system one; Llama 3 and Llama 2 with each message's content trimmed of surrounding white space
// (their templates' `| trim` / `.strip()`). The tokenizer adds BOS (Llama 2/3) when it
// encodes. INVALID_ARGUMENT for an unknown role, or a Llama 2 history whose turns do not
// alternate user/assistant.
StatusOr<std::string> RenderChat(ChatStyle style, const std::vector<ChatMessage>& messages,
                                 std::string_view default_system = {});

// RenderChat as the tokenizer must see it: text to encode, and the BOS / EOS tokens the
// template writes between Llama 2 exchanges (RenderChat shows them as <s> / </s>), which a
// SentencePiece tokenizer does not make from text.
struct ChatPiece {
  enum Kind { kText, kBos, kEos } kind = kText;
  std::string text;  // kText
};
StatusOr<std::vector<ChatPiece>> RenderChatPieces(ChatStyle style,
                                                  const std::vector<ChatMessage>& messages,
                                                  std::string_view default_system = {});
// The prompt's token ids: BOS first (when the tokenizer adds one), each text piece encoded
// after it, the BOS / EOS pieces as the tokenizer's ids.
std::vector<int32_t> EncodeChat(const Tokenizer& tok, const std::vector<ChatPiece>& pieces);

}  // namespace helix::router
