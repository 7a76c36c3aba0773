#include "server/router/chat_template.h"

namespace helix::router {

const char* ChatStyleName(ChatStyle s) {
  switch (s) {
    case ChatStyle::kNone:
      return "none";
    case ChatStyle::kChatML:
      return "chatml";
    case ChatStyle::kLlama3:
      return "llama3";
    case ChatStyle::kLlama2:
      return "llama2";
  }
  return "?";
}

ChatStyle DetectChatStyle(std::string_view t) {
  if (t.find("<|im_start|>") != std::string_view::npos) return ChatStyle::kChatML;
  if (t.find("<|start_header_id|>") != std::string_view::npos) return ChatStyle::kLlama3;
  if (t.find("[INST]") != std::string_view::npos) return ChatStyle::kLlama2;
  return ChatStyle::kNone;
}

StatusOr<std::string> RenderChat(ChatStyle style, const std::vector<ChatMessage>& messages) {
  if (messages.empty()) return InvalidArgument("messages: at least one message is required");
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string& r = messages[i].role;
    if (r != "system" && r != "user" && r != "assistant") {
      return InvalidArgument("messages[" + std::to_string(i) + "].role '" + r +
                             "': expected system, user or assistant");
    }
  }
  std::string out;
  switch (style) {
    case ChatStyle::kNone:
      return InvalidArgument(
          "this model has no chat template the server knows; use /v1/completions");
    case ChatStyle::kChatML:
      for (const ChatMessage& m : messages) {
        out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
      }
      out += "<|im_start|>assistant\n";
      return out;
    case ChatStyle::kLlama3:
      for (const ChatMessage& m : messages) {
        out += "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n" + m.content + "<|eot_id|>";
      }
      out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
      return out;
    case ChatStyle::kLlama2: {
      // Llama 2: an optional system prompt folded into the first user turn; user and
      // assistant turns alternate, each exchange closed by </s><s> (written as text here only
      // between exchanges: the tokenizer's BOS opens the first).
      size_t i = 0;
      std::string system;
      if (messages[0].role == "system") {
        system = "<<SYS>>\n" + messages[0].content + "\n<</SYS>>\n\n";
        i = 1;
      }
      bool first = true;
      for (; i < messages.size(); i += 2) {
        if (messages[i].role != "user") {
          return InvalidArgument("messages[" + std::to_string(i) +
                                 "]: Llama 2 chat expects user/assistant turns to alternate");
        }
        if (!first) out += "<s>";
        out += "[INST] " + (first ? system : std::string()) + messages[i].content + " [/INST]";
        first = false;
        if (i + 1 < messages.size()) {
          if (messages[i + 1].role != "assistant") {
            return InvalidArgument("messages[" + std::to_string(i + 1) +
                                   "]: Llama 2 chat expects user/assistant turns to alternate");
          }
          out += " " + messages[i + 1].content + " </s>";
        }
      }
      if (messages.back().role != "user") {
        return InvalidArgument("the last message must be the user's for a Llama 2 chat");
      }
      return out;
    }
  }
  return InvalidArgument("unknown chat style");
}

}  // namespace helix::router
