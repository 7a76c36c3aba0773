#include "server/router/chat_template.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>

namespace helix::router {
namespace {

TEST(ChatTemplateTest, RecognisesTheFamilies) {
  EXPECT_EQ(DetectChatStyle("{% for message in messages %}{{'<|im_start|>' + message['role']"),
            ChatStyle::kChatML);
  EXPECT_EQ(DetectChatStyle("{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>' }}"),
            ChatStyle::kLlama3);
  EXPECT_EQ(DetectChatStyle("{{ bos_token + '[INST] ' + content + ' [/INST]' }}"),
            ChatStyle::kLlama2);
  EXPECT_EQ(DetectChatStyle(""), ChatStyle::kNone);
  EXPECT_EQ(DetectChatStyle("{% for m in messages %}{{ m['content'] }}{% endfor %}"),
            ChatStyle::kNone);
}

TEST(ChatTemplateTest, RendersEachFamily) {
  const std::vector<ChatMessage> m = {{"system", "Be brief."}, {"user", "Hi"}};
  EXPECT_EQ(*RenderChat(ChatStyle::kChatML, m),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\n");
  EXPECT_EQ(*RenderChat(ChatStyle::kLlama3, m),
            "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  EXPECT_EQ(*RenderChat(ChatStyle::kLlama2, m),
            "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]");
  EXPECT_EQ(*RenderChat(ChatStyle::kLlama2, {{"user", "a"}, {"assistant", "b"}, {"user", "c"}}),
            "[INST] a [/INST] b </s><s>[INST] c [/INST]");
}

TEST(ChatTemplateTest, ChatMLDefaultSystemMessage) {
  // SmolLM2's template (as in its GGUF), Qwen2's, a Qwen2.5-style one whose first
  // '<|im_start|>system' is followed by an expression, and plain ChatML.
  const std::string smol =
      "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
      "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
      "Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
      "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}";
  EXPECT_EQ(DefaultSystemPrompt(smol),
            "You are a helpful AI assistant named SmolLM, trained by Hugging Face");
  EXPECT_EQ(DefaultSystemPrompt("{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>"
                                "\n' }}"),
            "You are a helpful assistant.");
  EXPECT_EQ(DefaultSystemPrompt("{{- '<|im_start|>system\\n' + messages[0]['content'] + "
                                "'<|im_end|>' }}{%- else %}{{- '<|im_start|>system\\nYou are "
                                "Qwen.<|im_end|>\\n' }}"),
            "You are Qwen.");
  EXPECT_EQ(DefaultSystemPrompt("{{'<|im_start|>' + message['role'] + '\\n'}}"), "");
  EXPECT_EQ(DefaultSystemPrompt(""), "");
  // Written only when the conversation does not open with a system message.
  EXPECT_EQ(*RenderChat(ChatStyle::kChatML, {{"user", "Hi"}}, "Be kind."),
            "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\n");
  EXPECT_EQ(*RenderChat(ChatStyle::kChatML, {{"system", "Be brief."}, {"user", "Hi"}}, "Be kind."),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\n");
}

TEST(ChatTemplateTest, LlamaTemplatesTrimContent) {
  const std::vector<ChatMessage> m = {{"system", " Be brief.\n"}, {"user", "\n Hi  "}};
  EXPECT_EQ(*RenderChat(ChatStyle::kLlama3, m),
            "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  EXPECT_EQ(*RenderChat(ChatStyle::kLlama2, m),
            "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]");
  // ChatML keeps content as given.
  EXPECT_EQ(*RenderChat(ChatStyle::kChatML, {{"user", " x "}}),
            "<|im_start|>user\n x <|im_end|>\n<|im_start|>assistant\n");
}

// Llama 2's </s><s> between exchanges are the tokenizer's EOS and BOS ids, not text (a
// SentencePiece tokenizer never makes control tokens from text).
TEST(ChatTemplateTest, Llama2ExchangesAreSeparatedByEosBosTokens) {
  const std::vector<ChatMessage> m = {{"user", "a"}, {"assistant", "b"}, {"user", "c"}};
  auto pieces = RenderChatPieces(ChatStyle::kLlama2, m);
  ASSERT_TRUE(pieces.ok());
  ASSERT_EQ(pieces->size(), 4u);
  EXPECT_EQ((*pieces)[0].text, "[INST] a [/INST] b ");
  EXPECT_EQ((*pieces)[1].kind, ChatPiece::kEos);
  EXPECT_EQ((*pieces)[2].kind, ChatPiece::kBos);
  EXPECT_EQ((*pieces)[3].text, "[INST] c [/INST]");
  const char* shared = std::getenv("HELIX_SHARED_DIR");
  const std::string path =
      std::string(shared ? shared : "../shared") + "/models/stories260K/tok512.bin";
  if (!std::filesystem::exists(path)) GTEST_SKIP() << path << " not found (HELIX_SHARED_DIR)";
  auto tok = LoadLlama2cTokenizer(path, 512);
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  std::vector<int32_t> want = (*tok)->Encode("[INST] a [/INST] b ", true);
  want.push_back((*tok)->eos_id());
  want.push_back((*tok)->bos_id());
  const std::vector<int32_t> rest = (*tok)->Encode("[INST] c [/INST]", false);
  want.insert(want.end(), rest.begin(), rest.end());
  EXPECT_EQ(EncodeChat(**tok, *pieces), want);
  // Single-piece styles encode as their text does.
  auto chatml = RenderChatPieces(ChatStyle::kChatML, {{"user", "Hi"}});
  ASSERT_TRUE(chatml.ok());
  EXPECT_EQ(EncodeChat(**tok, *chatml),
            (*tok)->Encode(*RenderChat(ChatStyle::kChatML, {{"user", "Hi"}}), true));
}

TEST(ChatTemplateTest, RefusesWhatItCannotRender) {
  EXPECT_FALSE(RenderChat(ChatStyle::kNone, {{"user", "x"}}).ok());
  EXPECT_FALSE(RenderChat(ChatStyle::kChatML, {}).ok());
  auto bad = RenderChat(ChatStyle::kChatML, {{"robot", "x"}});
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("messages[0].role 'robot'"), std::string::npos);
  EXPECT_FALSE(RenderChat(ChatStyle::kLlama2, {{"user", "a"}, {"user", "b"}}).ok());
}

}  // namespace
}  // namespace helix::router
