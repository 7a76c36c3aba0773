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

namespace {

// Jinja's `trim`: white space off both ends.
std::string Trim(const std::string& s) {
  const char* ws = " \t\n\r\f\v";
  const size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(ws) - b + 1);
}

// The value of a Jinja string literal's body (the escapes \n \t \\ \' \").
std::string Unescape(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '\\' || i + 1 == s.size()) {
      out += s[i];
      continue;
    }
    const char c = s[++i];
    out += c == 'n' ? '\n' : c == 't' ? '\t' : c;
  }
  return out;
}

}  // namespace

std::string DefaultSystemPrompt(std::string_view t) {
  const std::string_view open = "<|im_start|>system", close = "<|im_end|>";
  for (size_t at = t.find(open); at != std::string_view::npos; at = t.find(open, at + 1)) {
    size_t body = at + open.size();
    if (t.substr(body, 2) == "\\n") {
      body += 2;
    } else if (t.substr(body, 1) == "\n") {
      body += 1;
    } else {
      continue;
    }
    const size_t end = t.find(close, body);
    if (end == std::string_view::npos) break;
    const std::string_view text = t.substr(body, end - body);
    // Inside one string literal: no quote, no expression (`'\n' + messages[0]['content']`).
    if (text.empty() || text.find_first_of("'\"{}") != std::string_view::npos) continue;
    return Unescape(text);
  }
  return "";
}

std::vector<int32_t> EncodeChat(const Tokenizer& tok, const std::vector<ChatPiece>& pieces) {
  std::vector<int32_t> ids;
  bool first = true;
  for (const ChatPiece& p : pieces) {
    if (p.kind == ChatPiece::kText) {
      const std::vector<int32_t> t = tok.Encode(p.text, /*add_bos=*/first);
      ids.insert(ids.end(), t.begin(), t.end());
    } else if (const int32_t id = p.kind == ChatPiece::kBos ? tok.bos_id() : tok.eos_id();
               id >= 0) {
      ids.push_back(id);
    }
    first = false;
  }
  return ids;
}

StatusOr<std::string> RenderChat(ChatStyle style, const std::vector<ChatMessage>& messages,
                                 std::string_view default_system) {
  auto pieces = RenderChatPieces(style, messages, default_system);
  if (!pieces.ok()) return pieces.status();
  std::string out;
  for (const ChatPiece& p : *pieces) {
    out += p.kind == ChatPiece::kBos ? "<s>" : p.kind == ChatPiece::kEos ? "</s>" : p.text;
  }
  return out;
}

StatusOr<std::vector<ChatPiece>> RenderChatPieces(ChatStyle style,
                                                  const std::vector<ChatMessage>& messages,
                                                  std::string_view default_system) {
  if (messages.empty()) return InvalidArgument("messages: at least one message is required");
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string& r = messages[i].role;
    if (r != "system" && r != "user" && r != "assistant") {
      return InvalidArgument("messages[" + std::to_string(i) + "].role '" + r +
                             "': expected system, user or assistant");
    }
  }
  std::string out;
  std::vector<ChatPiece> pieces;
  // Ends the text piece being written (`out`); returns the pieces so far.
  auto text = [&]() -> std::vector<ChatPiece>& {
    pieces.push_back({ChatPiece::kText, std::move(out)});
    out.clear();
    return pieces;
  };
  switch (style) {
    case ChatStyle::kNone:
      return InvalidArgument(
          "this model has no chat template the server knows; use /v1/completions");
    case ChatStyle::kChatML:
      if (!default_system.empty() && messages[0].role != "system") {
        out += "<|im_start|>system\n" + std::string(default_system) + "<|im_end|>\n";
      }
      for (const ChatMessage& m : messages) {
        out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
      }
      out += "<|im_start|>assistant\n";
      return std::move(text());
    case ChatStyle::kLlama3:
      for (const ChatMessage& m : messages) {
        out += "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n" + Trim(m.content) +
               "<|eot_id|>";
      }
      out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
      return std::move(text());
    case ChatStyle::kLlama2: {
      // Llama 2: an optional system prompt folded into the first user turn; user and
      // assistant turns alternate, each answered exchange closed by the EOS token and the next
      // opened by the BOS token (as tokens: a SentencePiece tokenizer never makes control
      // tokens from text; the tokenizer's own BOS opens the first).
      size_t i = 0;
      std::string system;
      if (messages[0].role == "system") {
        system = "<<SYS>>\n" + Trim(messages[0].content) + "\n<</SYS>>\n\n";
        i = 1;
      }
      bool first = true;
      for (; i < messages.size(); i += 2) {
        if (messages[i].role != "user") {
          return InvalidArgument("messages[" + std::to_string(i) +
                                 "]: Llama 2 chat expects user/assistant turns to alternate");
        }
        if (!first) pieces.push_back({ChatPiece::kBos, {}});
        out +=
            "[INST] " + (first ? system : std::string()) + Trim(messages[i].content) + " [/INST]";
        first = false;
        if (i + 1 < messages.size()) {
          if (messages[i + 1].role != "assistant") {
            return InvalidArgument("messages[" + std::to_string(i + 1) +
                                   "]: Llama 2 chat expects user/assistant turns to alternate");
          }
          out += ' ';
          out += Trim(messages[i + 1].content);
          out += ' ';
          text();
          pieces.push_back({ChatPiece::kEos, {}});
        }
      }
      if (messages.back().role != "user") {
        return InvalidArgument("the last message must be the user's for a Llama 2 chat");
      }
      return std::move(text());
    }
  }
  return InvalidArgument("unknown chat style");
}

}  // namespace helix::router
