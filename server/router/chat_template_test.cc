#include "server/router/chat_template.h"

#include <gtest/gtest.h>

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
