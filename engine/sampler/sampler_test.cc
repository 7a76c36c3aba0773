#include "engine/sampler/sampler.h"

#include <cmath>
#include <limits>
#include <map>

#include <gtest/gtest.h>

namespace helix {
namespace {

std::vector<float> Logits() { return {1.0f, 3.0f, 2.0f, 3.0f, -1.0f}; }

int32_t SampleOnce(SamplingParams p, std::vector<float> logits = Logits()) {
  Sampler s(p, {});
  return s.Sample(logits.data(), static_cast<int64_t>(logits.size())).token;
}

TEST(SamplerTest, GreedyTakesArgmaxLowestIdOnTies) {
  SamplingParams p;
  p.temperature = 0;
  EXPECT_EQ(SampleOnce(p), 1);
}

TEST(SamplerTest, TopKOneIsGreedy) {
  SamplingParams p;
  p.top_k = 1;
  p.seed = 7;
  for (int i = 0; i < 20; ++i) {
    p.seed = i;
    EXPECT_EQ(SampleOnce(p), 1);
  }
}

TEST(SamplerTest, TopPAndMinPRestrictTheSupport) {
  SamplingParams p;
  p.top_p = 0.5f;  // tokens 1 and 3 carry ~0.33 each: the smallest prefix ≥ 0.5 is {1, 3}
  for (int i = 0; i < 200; ++i) {
    p.seed = i;
    int32_t t = SampleOnce(p);
    EXPECT_TRUE(t == 1 || t == 3) << t;
  }
  SamplingParams m;
  m.min_p = 0.5f;  // p(2)/p(1) = e^-1 < 0.5
  for (int i = 0; i < 200; ++i) {
    m.seed = i;
    int32_t t = SampleOnce(m);
    EXPECT_TRUE(t == 1 || t == 3) << t;
  }
}

TEST(SamplerTest, SameSeedSameTokensAndFrequenciesMatchSoftmax) {
  SamplingParams p;
  p.seed = 1234;
  Sampler a(p, {}), b(p, {});
  std::map<int32_t, int> counts;
  const int n = 20000;
  for (int i = 0; i < n; ++i) {
    auto la = Logits(), lb = Logits();
    int32_t ta = a.Sample(la.data(), 5).token;
    EXPECT_EQ(ta, b.Sample(lb.data(), 5).token);
    ++counts[ta];
  }
  const auto l = Logits();
  double z = 0;
  for (float x : l) z += std::exp(x);
  for (int t = 0; t < 5; ++t) {
    double expect = std::exp(l[t]) / z;
    EXPECT_NEAR(counts[t] / double(n), expect, 0.015) << "token " << t;
  }
}

TEST(SamplerTest, PenaltiesAndLogprobs) {
  SamplingParams p;
  p.temperature = 0;
  p.repetition_penalty = 10.0f;  // prompt token 1's logit 3 → 0.3
  Sampler s(p, {1});
  auto l = Logits();
  EXPECT_EQ(s.Sample(l.data(), 5).token, 3);

  SamplingParams f;
  f.temperature = 0;
  f.frequency_penalty = 1.5f;
  f.top_logprobs = 2;
  Sampler s2(f, {});
  s2.Accept(1);
  s2.Accept(3);
  l = Logits();
  SampleResult r = s2.Sample(l.data(), 5);
  EXPECT_EQ(r.token, 2);  // 1 and 3 drop to 1.5
  double z = 0;
  for (float x : Logits()) z += std::exp(x);
  EXPECT_NEAR(r.logprob, 2.0 - std::log(z), 1e-5);  // raw distribution
  ASSERT_EQ(r.top.size(), 2u);
  EXPECT_EQ(r.top[0].first, 1);
  EXPECT_EQ(r.top[1].first, 3);
}

TEST(SamplerTest, LogitBiasShiftsTheChoiceButNotTheLogprobs) {
  SamplingParams p;
  p.temperature = 0;
  p.top_logprobs = 1;
  p.logit_bias = {{0, 2.5f}, {1, -100.0f}};  // token 0: 1 → 3.5; token 1 banned
  Sampler s(p, {});
  EXPECT_FALSE(s.DeviceEligible());  // the device sampler does not apply a bias
  auto l = Logits();
  SampleResult r = s.Sample(l.data(), 5);
  EXPECT_EQ(r.token, 0);
  double z = 0;
  for (float x : Logits()) z += std::exp(x);
  EXPECT_NEAR(r.logprob, 1.0 - std::log(z), 1e-5);  // the model's own distribution
  ASSERT_EQ(r.top.size(), 1u);
  EXPECT_EQ(r.top[0].first, 1);

  // Sampled: a banned token never comes, a token lifted by 100 always does.
  SamplingParams q;
  q.logit_bias = {{1, -100.0f}, {3, -100.0f}};
  SamplingParams lift;
  lift.logit_bias = {{4, 100.0f}};
  for (int i = 0; i < 200; ++i) {
    q.seed = lift.seed = i;
    const int32_t t = SampleOnce(q);
    EXPECT_TRUE(t != 1 && t != 3) << t;
    EXPECT_EQ(SampleOnce(lift), 4);
  }
  // Applied before the repetition penalty (vLLM's order): token 4's -1 + 6 = 5 → 5 / 3 < 2,
  // so token 2 wins; the other order (-1 × 3 + 6 = 3) would pick token 4.
  SamplingParams order;
  order.temperature = 0;
  order.repetition_penalty = 3.0f;
  order.logit_bias = {{1, -1.5f}, {3, -1.5f}, {4, 6.0f}};  // tokens 1 and 3 → 1.5
  Sampler so(order, {4});
  l = Logits();
  EXPECT_EQ(so.Sample(l.data(), 5).token, 2);
}

TEST(SamplerTest, MinTokensBansStopTokensForTheFirstTokens) {
  SamplingParams p;
  p.temperature = 0;
  p.top_logprobs = 0;
  p.min_tokens = 2;
  Sampler s(p, {});
  s.BanUntilMinTokens({1, 3});  // the two largest logits
  for (int i = 0; i < 2; ++i) {
    EXPECT_FALSE(s.DeviceEligible());
    auto l = Logits();
    SampleResult r = s.Sample(l.data(), 5);
    EXPECT_EQ(r.token, 2);
    double z = 0;
    for (float x : Logits()) z += std::exp(x);
    EXPECT_NEAR(r.logprob, 2.0 - std::log(z), 1e-5);  // the model's own distribution
    s.Accept(r.token);
  }
  auto l = Logits();
  EXPECT_EQ(s.Sample(l.data(), 5).token, 1);  // the third token may stop
  SamplingParams d;
  d.min_tokens = 2;
  Sampler none(d, {});  // nothing to ban (ignore_eos, no stop ids): the device may sample
  EXPECT_TRUE(none.DeviceEligible());
}

TEST(SamplerTest, AllowedTokenIdsAreTheOnlyCandidates) {
  SamplingParams p;
  p.allowed_token_ids = {0, 4};  // the two smallest logits
  for (int i = 0; i < 100; ++i) {
    p.seed = i;
    const int32_t t = SampleOnce(p);
    EXPECT_TRUE(t == 0 || t == 4) << t;
  }
  p.temperature = 0;
  EXPECT_EQ(SampleOnce(p), 0);
  EXPECT_FALSE(Sampler(p, {}).DeviceEligible());
  p.allowed_token_ids = {4};
  EXPECT_EQ(SampleOnce(p), 4);
}

TEST(SamplerTest, NonFiniteLogits) {
  const float inf = std::numeric_limits<float>::infinity();
  // +inf tokens share the mass: sampled, greedy and with top-p, only they come.
  std::vector<float> two_inf(512, 1.0f);
  two_inf[42] = two_inf[300] = inf;
  SamplingParams p;
  p.top_logprobs = 1;
  for (int i = 0; i < 100; ++i) {
    p.seed = i;
    p.top_p = i % 2 ? 0.9f : 1.0f;
    Sampler s(p, {});
    std::vector<float> l = two_inf;
    SampleResult r = s.Sample(l.data(), 512);
    ASSERT_TRUE(r.status.ok());
    EXPECT_TRUE(r.token == 42 || r.token == 300) << r.token;
    EXPECT_NEAR(r.logprob, std::log(0.5), 1e-6);
  }
  p.temperature = 0;
  EXPECT_EQ(SampleOnce(p, two_inf), 42);
  // NaN is no candidate, greedy or sampled, even at index 0.
  std::vector<float> nan(512, 0.0f);
  for (int i = 0; i < 512; i += 2) nan[i] = NAN;
  nan[9] = 50.0f;
  EXPECT_EQ(SampleOnce(p, nan), 9);
  SamplingParams q;
  for (int i = 0; i < 100; ++i) {
    q.seed = i;
    EXPECT_EQ(SampleOnce(q, nan) % 2, 1);
  }
  // Nothing to draw from: a clear error instead of a made-up token.
  for (float fill : {NAN, -inf}) {
    for (float t : {0.0f, 1.0f}) {
      SamplingParams z;
      z.temperature = t;
      Sampler s(z, {});
      std::vector<float> l(64, fill);
      SampleResult r = s.Sample(l.data(), 64);
      EXPECT_FALSE(r.status.ok());
      EXPECT_NE(r.status.message().find("NaN or -inf"), std::string::npos);
      EXPECT_EQ(r.token, -1);
    }
  }
}

TEST(SamplingParamsTest, ValidationNamesTheField) {
  SamplingParams p;
  p.temperature = NAN;
  EXPECT_NE(p.Validate().message().find("temperature"), std::string::npos);
  p = {};
  p.temperature = -1;
  EXPECT_FALSE(p.Validate().ok());
  p = {};
  p.top_p = 0;
  EXPECT_NE(p.Validate().message().find("top_p"), std::string::npos);
  p = {};
  p.top_p = 1.5f;
  EXPECT_FALSE(p.Validate().ok());
  p = {};
  p.min_p = -0.1f;
  EXPECT_FALSE(p.Validate().ok());
  p = {};
  p.top_k = -2;
  EXPECT_FALSE(p.Validate().ok());
  p = {};
  p.logit_bias = {{3, 1.0f}, {2, 1.0f}};
  EXPECT_NE(p.Validate().message().find("sorted and unique"), std::string::npos);
  p.logit_bias = {{-1, 1.0f}};
  EXPECT_NE(p.Validate().message().find("logit_bias"), std::string::npos);
  p.logit_bias = {{2, 100.5f}};
  EXPECT_NE(p.Validate().message().find("[-100, 100]"), std::string::npos);
  p.logit_bias = {{2, NAN}};
  EXPECT_FALSE(p.Validate().ok());
  p.logit_bias.assign(SamplingParams::kMaxLogitBias + 1, {0, 0.0f});
  EXPECT_NE(p.Validate().message().find("at most"), std::string::npos);
  p = {};
  p.allowed_token_ids = {5, 5};
  EXPECT_NE(p.Validate().message().find("allowed_token_ids"), std::string::npos);
  p = {};
  p.min_tokens = -1;
  EXPECT_NE(p.Validate().message().find("min_tokens"), std::string::npos);
  p = {};
  p.logit_bias = {{2, -100.0f}, {7, 100.0f}};
  EXPECT_TRUE(p.Validate().ok());
}

}  // namespace
}  // namespace helix
