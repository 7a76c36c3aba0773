// End-to-end engine tests on the real stories260K model: the upstream greedy oracle, batch
// invariance under continuous batching, KV dtypes and block sizes, stop handling, bad input,
// and that the KV pool is whole after every scenario.
#include "engine/engine.h"
#include "engine/engine_test_util.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>

#include <unistd.h>

#include <gtest/gtest.h>

namespace helix {
namespace {

namespace fs = std::filesystem;

// llama2.c's run.c output for `run stories260K.bin -z tok512.bin -t 0 -n 200` (200 positions
// including BOS), as its test suite (test_all.py) expects it.
const char kOracle[] =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park. One day, she saw a big, red ball. She wanted to play with it, but it was too high.\n"
    "Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do. "
    "She said, \"I want to play with your ball, but I can't find it.\"\n"
    "Lily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what "
    "to do.\"\n"
    "Lily didn't want to help her mom, so she";

fs::path ModelDir() {
  const char* s = std::getenv("HELIX_SHARED_DIR");
  return fs::path(s ? s : "../shared") / "models" / "stories260K";
}

class EngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(ModelDir() / "stories260K.bin")) {
      GTEST_SKIP() << "stories260K not found under " << ModelDir()
                   << " (set HELIX_SHARED_DIR to the shared/ folder)";
    }
  }
  static EngineOptions Options() {
    EngineOptions o;
    o.model_path = (ModelDir() / "stories260K.bin").string();
    o.tokenizer_path = (ModelDir() / "tok512.bin").string();
    o.num_threads = 2;
    o.tokens_per_block = 32;
    o.kv_max_tokens = 16 * 512;
    o.max_batch_size = 16;
    return o;
  }
  static std::unique_ptr<Engine> Make(const EngineOptions& o) {
    auto e = Engine::Create(o);
    EXPECT_TRUE(e.ok()) << e.status().ToString();
    return e.ok() ? std::move(e).value() : nullptr;
  }
};

using Result = testing::RunResult;
using testing::RunAll;

GenerateRequest Greedy(std::string prompt, int max_tokens) {
  GenerateRequest r;
  r.prompt = std::move(prompt);
  r.max_tokens = max_tokens;
  r.sampling.temperature = 0;
  return r;
}

TEST_F(EngineTest, GreedyOracleMatchesUpstream) {
  auto e = Make(Options());
  ASSERT_NE(e, nullptr);
  auto r = RunAll(e.get(), {Greedy("", 255)});
  ASSERT_EQ(r[0].reason == FinishReason::kStop || r[0].reason == FinishReason::kLength, true);
  EXPECT_EQ(r[0].text.substr(0, sizeof(kOracle) - 1), kOracle) << "got: " << r[0].text;
  EXPECT_GE(r[0].completion_tokens, 199);
  EXPECT_EQ(e->kv_stats().free_blocks, e->kv_stats().total_blocks);
}

TEST_F(EngineTest, BlockSizesAndKvDtypes) {
  auto base = Make(Options());
  ASSERT_NE(base, nullptr);
  const auto ref = RunAll(base.get(), {Greedy("Once upon a time", 120)})[0];
  for (int64_t tpb : {1, 4, 5, 32}) {
    EngineOptions o = Options();
    o.tokens_per_block = tpb;
    auto e = Make(o);
    ASSERT_NE(e, nullptr);
    auto r = RunAll(e.get(), {Greedy("Once upon a time", 120)})[0];
    EXPECT_EQ(r.tokens, ref.tokens) << "tokens_per_block " << tpb;
    EXPECT_EQ(e->kv_stats().free_blocks, e->kv_stats().total_blocks);
  }
  // Half-precision KV changes rounding, not the model: the story must still start the same.
  for (auto dt : {kernels::DType::kF16, kernels::DType::kBF16}) {
    EngineOptions o = Options();
    o.kv_dtype = dt;
    auto e = Make(o);
    ASSERT_NE(e, nullptr);
    auto r = RunAll(e.get(), {Greedy("", 40)})[0];
    EXPECT_EQ(r.text.substr(0, 40), std::string(kOracle).substr(0, 40))
        << kernels::DTypeName(dt) << ": " << r.text;
  }
}

TEST_F(EngineTest, BatchInvarianceWithRequestsJoiningMidFlight) {
  const std::vector<std::string> prompts = {
      "",          "Once",         "The dog",           "Lily and Ben went to the park",
      "A big red", "Tom was sad.", "She saw a cat. It", "One day, a little bird"};
  std::vector<GenerateRequest> reqs;
  for (size_t i = 0; i < prompts.size(); ++i) {
    GenerateRequest r = Greedy(prompts[i], 30 + static_cast<int>(i) * 9);
    if (i % 2 == 1) {  // sampled requests too: same seed → same tokens in any batch
      r.sampling.temperature = 0.8f;
      r.sampling.top_p = 0.9f;
      r.sampling.seed = 100 + i;
    }
    reqs.push_back(r);
  }
  std::vector<Result> alone;
  for (const auto& r : reqs) {
    auto e = Make(Options());
    ASSERT_NE(e, nullptr);
    alone.push_back(RunAll(e.get(), {r})[0]);
  }
  auto e = Make(Options());
  ASSERT_NE(e, nullptr);
  auto together = RunAll(e.get(), reqs, {0, 0, 0, 3, 5, 5, 11, 20});
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ(together[i].tokens, alone[i].tokens) << "request " << i;
    EXPECT_EQ(together[i].text, alone[i].text) << "request " << i;
  }
  EXPECT_EQ(e->kv_stats().free_blocks, e->kv_stats().total_blocks);
}

TEST_F(EngineTest, WaitsForBlocksWhenThePoolIsFull) {
  EngineOptions o = Options();
  o.kv_max_tokens = 128;  // room for two 64-token requests at a time
  o.tokens_per_block = 16;
  auto e = Make(o);
  ASSERT_NE(e, nullptr);
  std::vector<GenerateRequest> reqs;
  for (int i = 0; i < 5; ++i) reqs.push_back(Greedy("Once upon a time", 58));
  auto r = RunAll(e.get(), reqs);
  for (const auto& x : r) {
    EXPECT_EQ(x.reason, FinishReason::kLength);
    EXPECT_EQ(x.tokens, r[0].tokens);
  }
  EXPECT_EQ(e->kv_stats().free_blocks, e->kv_stats().total_blocks);
}

// MAX_UTILIZATION (kv_preemption): requests are admitted with their prompt's blocks and grow;
// when the pool runs out the newest is preempted and recomputed later. Every request still
// gets exactly the tokens and text it gets alone (greedy, seeded sampling, penalties, stop
// strings, min_tokens, logprobs), a preempted request can be cancelled while it waits, and
// the pool is whole at the end.
TEST_F(EngineTest, PreemptionByRecomputeKeepsEveryRequestsOutput) {
  EngineOptions o = Options();
  o.kv_max_tokens = 128;  // 8 blocks of 16: two or three requests grow into each other
  o.tokens_per_block = 16;
  o.kv_preemption = true;
  std::vector<GenerateRequest> reqs;
  const std::vector<std::string> prompts = {"Once upon a time", "The dog", "Lily and Ben went",
                                            "A big red", "Tom was sad."};
  for (size_t i = 0; i < prompts.size(); ++i) {
    GenerateRequest r = Greedy(prompts[i], 90 + static_cast<int>(i) * 5);
    r.ignore_eos = true;
    if (i % 2 == 1) {
      r.sampling.temperature = 0.9f;
      r.sampling.top_k = 40;
      r.sampling.seed = 7 + i;
      r.sampling.frequency_penalty = 0.5f;
    }
    if (i == 2) r.sampling.top_logprobs = 3;
    if (i == 3) {
      r.stop = {"and the"};
      r.sampling.min_tokens = 12;
    }
    reqs.push_back(r);
  }
  std::vector<Result> alone;
  {
    auto e = Make(o);
    ASSERT_NE(e, nullptr);
    for (const auto& r : reqs) alone.push_back(RunAll(e.get(), {r})[0]);
    EXPECT_EQ(e->kv_stats().preemptions, 0u);  // one at a time: nothing to preempt
  }
  auto e = Make(o);
  ASSERT_NE(e, nullptr);
  auto together = RunAll(e.get(), reqs, {0, 0, 1, 2, 9});
  EXPECT_GE(e->kv_stats().preemptions, 3u);
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_TRUE(together[i].error.ok()) << i << ": " << together[i].error.ToString();
    EXPECT_EQ(together[i].tokens, alone[i].tokens) << "request " << i;
    EXPECT_EQ(together[i].text, alone[i].text) << "request " << i;
    EXPECT_EQ(together[i].reason, alone[i].reason) << "request " << i;
    EXPECT_EQ(together[i].completion_tokens, alone[i].completion_tokens) << "request " << i;
    ASSERT_EQ(together[i].top_logprobs.size(), alone[i].top_logprobs.size());
    // The same candidates; the values within float rounding (a batch's classifier rows).
    for (size_t t = 0; t < alone[i].top_logprobs.size(); ++t) {
      const auto& x = together[i].top_logprobs[t];
      const auto& y = alone[i].top_logprobs[t];
      ASSERT_EQ(x.size(), y.size());
      for (size_t c = 0; c < x.size(); ++c) {
        EXPECT_EQ(x[c].first, y[c].first) << i << " token " << t;
        EXPECT_NEAR(x[c].second, y[c].second, 1e-4) << i << " token " << t;
      }
    }
  }
  EXPECT_EQ(e->kv_stats().free_blocks, e->kv_stats().total_blocks);

  // A request preempted while it waits is cancelled: it ends, the others are unharmed.
  const uint64_t before = e->kv_stats().preemptions;
  std::vector<GenerateRequest> two = {reqs[0], reqs[2]};
  two[1].id = "preempted-then-cancelled";
  bool cancelled = false;
  auto r = RunAll(e.get(), two, {}, [&](int) {
    if (!cancelled && e->kv_stats().preemptions > before) {
      e->Cancel("preempted-then-cancelled");
      cancelled = true;
    }
  });
  ASSERT_TRUE(cancelled);
  EXPECT_EQ(r[1].reason, FinishReason::kCancelled);
  EXPECT_EQ(r[0].tokens, alone[0].tokens);
  EXPECT_EQ(e->kv_stats().free_blocks, e->kv_stats().total_blocks);
}

// With full reservations, requests whose max_tokens is large run one at a time even when they
// stop early; MAX_UTILIZATION runs them together, in fewer steps, with the same output.
TEST_F(EngineTest, PreemptionAdmitsRequestsFullReservationWouldHold) {
  EngineOptions o = Options();
  o.kv_max_tokens = 128;
  o.tokens_per_block = 16;
  std::vector<GenerateRequest> reqs;
  for (int i = 0; i < 4; ++i) {
    GenerateRequest r = Greedy("Once upon a time", 100);  // reserves 100+ positions
    r.stop = {"park"};                                    // ... and stops after ~20 tokens
    reqs.push_back(r);
  }
  auto steps = [&](bool preempt, std::vector<Result>* out) {
    EngineOptions p = o;
    p.kv_preemption = preempt;
    auto e = Make(p);
    EXPECT_NE(e, nullptr);
    int n = 0;
    *out = RunAll(e.get(), reqs, {}, [&](int) { ++n; });
    EXPECT_EQ(e->kv_stats().free_blocks, e->kv_stats().total_blocks);
    EXPECT_EQ(e->kv_stats().preemptions, 0u);
    return n;
  };
  std::vector<Result> guaranteed, utilised;
  const int slow = steps(false, &guaranteed);
  const int fast = steps(true, &utilised);
  EXPECT_LT(fast * 3, slow) << "MAX_UTILIZATION " << fast << " steps, GUARANTEED_NO_EVICT " << slow;
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ(utilised[i].reason, FinishReason::kStop);
    EXPECT_EQ(utilised[i].text, guaranteed[i].text);
  }
}

// A request takes the KV of its prompt and of every generated token but the last: one that
// exactly fills the pool that way runs (it was refused as "can never fit", a block short).
TEST_F(EngineTest, RequestFillingThePoolExactlyRuns) {
  EngineOptions o = Options();
  o.kv_max_tokens = 64;
  o.tokens_per_block = 16;  // 4 blocks
  auto e = Make(o);
  ASSERT_NE(e, nullptr);
  GenerateRequest r = Greedy("Once upon a time", 8);
  const int64_t prompt =
      static_cast<int64_t>(e->tokenizer().Encode("Once upon a time", true).size());
  r.max_tokens = static_cast<int32_t>(64 - prompt + 1);
  r.ignore_eos = true;
  auto out = RunAll(e.get(), {r});
  EXPECT_TRUE(out[0].error.ok()) << out[0].error.ToString();
  EXPECT_EQ(out[0].reason, FinishReason::kLength);
  EXPECT_EQ(out[0].completion_tokens, r.max_tokens);
  EXPECT_EQ(e->kv_stats().free_blocks, e->kv_stats().total_blocks);
  r.max_tokens += 1;  // one position more than the pool
  auto refused = e->Submit(r);
  EXPECT_EQ(refused.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("can never fit"), std::string::npos)
      << refused.status().ToString();
}

TEST_F(EngineTest, StopStringsStopTokensAndCancel) {
  auto e = Make(Options());
  ASSERT_NE(e, nullptr);
  GenerateRequest s = Greedy("", 100);
  s.stop = {"park"};
  GenerateRequest t = Greedy("", 100);
  const int32_t lily = e->tokenizer().Encode("Lily", false).back();
  t.stop_token_ids = {lily};
  t.sampling.top_logprobs = 2;
  GenerateRequest c = Greedy("", 200);
  c.id = "to-cancel";
  GenerateRequest kept = s;  // vLLM's include_stop_str_in_output
  kept.include_stop_str = true;
  GenerateRequest kept_token = t;  // ... keeps a stop token's text too
  kept_token.include_stop_str = true;
  auto r = RunAll(e.get(), {s, t, kept, kept_token});
  EXPECT_EQ(r[0].reason, FinishReason::kStop);
  EXPECT_EQ(r[0].text,
            "Once upon a time, there was a little girl named Lily. She loved to play outside in "
            "the ");
  EXPECT_EQ(r[2].reason, FinishReason::kStop);
  EXPECT_EQ(r[2].text, r[0].text + "park");
  EXPECT_EQ(r[3].reason, FinishReason::kStop);
  EXPECT_EQ(r[3].text, r[1].text + " Lily");
  // min_tokens: stop strings are matched from the token after the first min_tokens on, and one
  // may start in their text (vLLM's rule). "park" completes at token k: "the park" straddles
  // tokens k - 1 and k.
  const size_t k = r[0].tokens.size();
  GenerateRequest straddle = Greedy("", 100);
  straddle.stop = {"the park"};
  straddle.sampling.min_tokens = static_cast<int32_t>(k - 1);
  GenerateRequest inside = straddle;  // the whole stop string within the first min_tokens
  inside.sampling.min_tokens = static_cast<int32_t>(k);
  auto m = RunAll(e.get(), {straddle, inside});
  EXPECT_EQ(m[0].reason, FinishReason::kStop);
  EXPECT_EQ(m[0].tokens.size(), k);
  // The text ends before the stop string, as without min_tokens: its start was held back.
  ASSERT_EQ(r[0].text.substr(r[0].text.size() - 4), "the ");
  EXPECT_EQ(m[0].text, r[0].text.substr(0, r[0].text.size() - 4));
  EXPECT_GT(m[1].tokens.size(), k);
  EXPECT_EQ(m[1].text.rfind(r[0].text + "park", 0), 0u) << m[1].text;
  EXPECT_EQ(r[1].reason, FinishReason::kStop);
  // The stop token counts in completion_tokens, and the final event carries it with its
  // logprobs (greedy: it is the top candidate), but not its text.
  ASSERT_FALSE(r[1].tokens.empty());
  EXPECT_EQ(r[1].tokens.back(), lily);
  // A long list of duplicate stop tokens is the same list (kept sorted and unique).
  GenerateRequest dup = t;
  dup.stop_token_ids.assign(100000, lily);
  EXPECT_EQ(RunAll(e.get(), {dup})[0].tokens, r[1].tokens);
  EXPECT_EQ(static_cast<int64_t>(r[1].tokens.size()), r[1].completion_tokens);
  ASSERT_EQ(r[1].top_logprobs.back().size(), 2u);
  EXPECT_EQ(r[1].top_logprobs.back()[0].first, lily);
  EXPECT_EQ(r[1].text, "Once upon a time, there was a little girl named");  // "▁Lily" left out

  // A cancel for an id that is not live is dropped: it does not end a request submitted with
  // that id later (it waited in the cancel set and did).
  e->Cancel("to-cancel");
  {
    GenerateRequest later = c;
    later.max_tokens = 5;
    EXPECT_EQ(RunAll(e.get(), {later})[0].reason, FinishReason::kLength);
  }
  Result cancelled;
  c.sink = [&](const TokenEvent& ev) {
    if (ev.token >= 0) cancelled.tokens.push_back(ev.token);
    if (ev.finished) cancelled.reason = ev.finish_reason;
  };
  ASSERT_TRUE(e->Submit(c).ok());
  for (int i = 0; i < 5; ++i) e->Step();
  e->Cancel("to-cancel");
  while (e->HasWork()) e->Step();
  EXPECT_EQ(cancelled.reason, FinishReason::kCancelled);
  EXPECT_LT(cancelled.tokens.size(), 10u);
  EXPECT_EQ(e->kv_stats().free_blocks, e->kv_stats().total_blocks);

  // A cancel that arrives while the request's last token is emitted (a server thread) finds it
  // live, but the request ends in that step anyway: the cancel must not wait for the next
  // request with that id, submitted as soon as the client saw the end.
  Result again;
  GenerateRequest last = c;
  last.max_tokens = 2;
  last.ignore_eos = true;
  int events = 0;
  last.sink = [&](const TokenEvent& ev) {
    if (!ev.finished && ++events == 2) e->Cancel("to-cancel");  // the last token
    if (!ev.finished) return;
    EXPECT_EQ(ev.finish_reason, FinishReason::kLength);
    GenerateRequest next = c;
    next.max_tokens = 4;
    next.sink = [&](const TokenEvent& ev2) {
      if (ev2.token >= 0) again.tokens.push_back(ev2.token);
      if (ev2.finished) again.reason = ev2.finish_reason;
    };
    EXPECT_TRUE(e->Submit(next).ok());
  };
  ASSERT_TRUE(e->Submit(last).ok());
  while (e->HasWork()) e->Step();
  EXPECT_EQ(again.reason, FinishReason::kLength);
  EXPECT_EQ(again.tokens.size(), 4u);
}

// Close (a server's loop has ended): a running and a queued request end with its status, and
// a request submitted afterwards is refused with it at once (before, it would have waited for a
// step that never came); the pool is whole.
TEST_F(EngineTest, CloseEndsEveryRequestAndRefusesLaterOnes) {
  auto e = Make(Options());
  ASSERT_NE(e, nullptr);
  Status ended[2];
  int finished = 0;
  for (int i = 0; i < 2; ++i) {
    GenerateRequest r = Greedy("Once upon a time", 50);
    r.sink = [&, i](const TokenEvent& ev) {
      if (!ev.finished) return;
      ++finished;
      ended[i] = ev.error;
    };
    ASSERT_TRUE(e->Submit(r).ok());
    if (i == 0) {
      for (int s = 0; s < 3; ++s) e->Step();  // the first runs; the second stays queued
    }
  }
  e->Close(Unavailable("the server is shutting down"));
  EXPECT_EQ(finished, 2);
  for (const Status& st : ended) {
    EXPECT_EQ(st.code(), StatusCode::kUnavailable) << st.ToString();
    EXPECT_EQ(st.message(), "the server is shutting down");
  }
  const StatusOr<std::string> later = e->Submit(Greedy("Lily", 5));
  ASSERT_FALSE(later.ok());
  EXPECT_EQ(later.status().code(), StatusCode::kUnavailable);
  EXPECT_FALSE(e->HasWork());
  EXPECT_EQ(e->kv_stats().free_blocks, e->kv_stats().total_blocks);
}

// request_counts: submitted requests wait, one batch slot runs one of them, and all are gone
// once they finish (or are aborted by Close).
TEST_F(EngineTest, RequestCountsFollowTheQueues) {
  EngineOptions o = Options();
  o.max_batch_size = 1;
  auto e = Make(o);
  ASSERT_NE(e, nullptr);
  const auto counts = [&] {
    const RequestCounts n = e->request_counts();
    return std::make_pair(n.running, n.waiting);
  };
  EXPECT_EQ(counts(), std::make_pair(int64_t{0}, int64_t{0}));
  int finished = 0;
  for (int i = 0; i < 3; ++i) {
    GenerateRequest r = Greedy("Once upon a time", 4);
    r.sink = [&](const TokenEvent& ev) { finished += ev.finished; };
    ASSERT_TRUE(e->Submit(r).ok());
  }
  EXPECT_EQ(counts(), std::make_pair(int64_t{0}, int64_t{3}));  // in the inbox
  e->Step();
  EXPECT_EQ(counts(), std::make_pair(int64_t{1}, int64_t{2}));
  for (int i = 0; i < 100 && finished < 2; ++i) e->Step();
  ASSERT_EQ(finished, 2);
  e->Step();  // admits the third
  EXPECT_EQ(counts(), std::make_pair(int64_t{1}, int64_t{0}));
  for (int i = 0; i < 100 && e->Step(); ++i) {
  }
  EXPECT_EQ(finished, 3);
  EXPECT_EQ(counts(), std::make_pair(int64_t{0}, int64_t{0}));
  ASSERT_TRUE(e->Submit(Greedy("Lily", 50)).ok());
  ASSERT_TRUE(e->Submit(Greedy("Lily", 50)).ok());
  e->Step();
  EXPECT_EQ(counts(), std::make_pair(int64_t{1}, int64_t{1}));
  e->Close(Unavailable("stopping"));
  EXPECT_EQ(counts(), std::make_pair(int64_t{0}, int64_t{0}));
}

TEST_F(EngineTest, BadRequestsAreRefusedWithoutHarm) {
  auto e = Make(Options());
  ASSERT_NE(e, nullptr);
  struct Case {
    GenerateRequest r;
    std::string expect;
  };
  std::vector<Case> cases;
  {
    GenerateRequest r = Greedy("", 10);
    r.add_bos = false;
    cases.push_back({r, "prompt is empty"});
  }
  {
    GenerateRequest r = Greedy("", 10);
    r.prompt_tokens = {1, 600};
    cases.push_back({r, "outside the vocabulary"});
  }
  {
    GenerateRequest r = Greedy("Hi", 600);
    cases.push_back({r, "exceeds max_seq_len"});
  }
  {
    GenerateRequest r = Greedy("Hi", 0);
    cases.push_back({r, "max_tokens"});
  }
  {
    GenerateRequest r = Greedy("Hi", 5);
    r.sampling.temperature = -1;
    cases.push_back({r, "temperature"});
  }
  {
    GenerateRequest r = Greedy("Hi", 5);
    r.sampling.top_p = 0;
    cases.push_back({r, "top_p"});
  }
  {
    GenerateRequest r = Greedy("Hi", 5);
    r.sampling.logit_bias = {{3, 1.0f}, {512, -100.0f}};
    cases.push_back({r, "logit_bias: token id 512 is outside the vocabulary"});
  }
  {
    GenerateRequest r = Greedy("Hi", 5);
    r.sampling.allowed_token_ids = {3, 600};
    cases.push_back({r, "allowed_token_ids: token id 600 is outside the vocabulary"});
  }
  {
    // min_tokens would ban every token (was a 500: "no token can be sampled").
    GenerateRequest r = Greedy("Hi", 5);
    r.sampling.min_tokens = 1;
    for (int32_t t = 0; t < 512; ++t) {
      if (t != 2) r.stop_token_ids.push_back(t);  // EOS (2) joins them unless ignore_eos
    }
    cases.push_back({r, "stop_token_ids (with EOS unless ignore_eos) name every token"});
  }
  for (auto& c : cases) {
    auto id = e->Submit(c.r);
    ASSERT_FALSE(id.ok()) << c.expect;
    EXPECT_EQ(id.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(id.status().message().find(c.expect), std::string::npos) << id.status().message();
  }
  // A request that can never fit in the pool.
  EngineOptions small = Options();
  small.kv_max_tokens = 64;
  auto e2 = Make(small);
  ASSERT_NE(e2, nullptr);
  auto id = e2->Submit(Greedy("Once", 200));
  ASSERT_FALSE(id.ok());
  EXPECT_NE(id.status().message().find("never fit"), std::string::npos);
  // The engine still serves good requests afterwards.
  auto r = RunAll(e.get(), {Greedy("", 20)});
  EXPECT_EQ(r[0].text.substr(0, 20), std::string(kOracle).substr(0, 20));
}

// Cancel names one request: a second request with the id of one still running is refused
// (not left to be cancelled with it), and an id is free again once its request ended.
TEST_F(EngineTest, IdsOfRunningRequestsAreUnique) {
  auto e = Make(Options());
  ASSERT_NE(e, nullptr);
  GenerateRequest a = Greedy("", 50);
  a.id = "dup";
  Result ra;
  a.sink = [&](const TokenEvent& ev) {
    if (ev.token >= 0) ra.tokens.push_back(ev.token);
    if (ev.finished) ra.reason = ev.finish_reason;
  };
  ASSERT_TRUE(e->Submit(a).ok());
  e->Step();
  GenerateRequest b = Greedy("", 5);
  b.id = "dup";
  auto refused = e->Submit(b);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), StatusCode::kAlreadyExists);
  EXPECT_NE(refused.status().message().find("'dup'"), std::string::npos);
  // The engine's own ids skip any a client already uses.
  GenerateRequest c = Greedy("", 5);
  c.id = "req-0";
  ASSERT_TRUE(e->Submit(c).ok());
  auto own = e->Submit(Greedy("", 5));
  ASSERT_TRUE(own.ok());
  EXPECT_NE(*own, "req-0");
  while (e->HasWork()) e->Step();
  EXPECT_EQ(ra.reason, FinishReason::kLength);
  EXPECT_EQ(ra.tokens.size(), 50u);
  auto again = e->Submit(b);  // "dup" has ended
  EXPECT_TRUE(again.ok()) << again.status().ToString();
  while (e->HasWork()) e->Step();
  EXPECT_EQ(e->kv_stats().free_blocks, e->kv_stats().total_blocks);
}

// A temperature too small to divide by (logits / 1e-40 overflow) samples greedily.
TEST_F(EngineTest, TinyTemperatureIsGreedy) {
  auto e = Make(Options());
  ASSERT_NE(e, nullptr);
  GenerateRequest greedy = Greedy("", 30);
  GenerateRequest tiny = Greedy("", 30);
  tiny.sampling.temperature = 1e-40f;
  tiny.sampling.seed = 7;
  auto r = RunAll(e.get(), {greedy, tiny});
  EXPECT_EQ(r[1].tokens, r[0].tokens);
  EXPECT_EQ(r[1].text, r[0].text);
}

// A rank's own address for the Gloo pairs: the one its host reaches the leader from.
TEST(LocalAddressTest, TowardTheLeader) {
  auto loop = LocalAddressToward("127.0.0.1");
  ASSERT_TRUE(loop.ok()) << loop.status().ToString();
  EXPECT_EQ(*loop, "127.0.0.1");
  auto bad = LocalAddressToward("no-such-host.invalid");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("no-such-host.invalid"), std::string::npos);
}

TEST(EngineLoadTest, LoaderErrorsAreClear) {
  fs::path dir = fs::temp_directory_path() / ("helix_engine_test_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  EngineOptions o;
  o.tokenizer_path = (ModelDir() / "tok512.bin").string();
  o.model_path = (dir / "missing.bin").string();
  auto e = Engine::Create(o);
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.status().message().find("missing.bin"), std::string::npos);

  if (fs::exists(ModelDir() / "stories260K.bin")) {
    // Truncated copies of the real checkpoint: header only, and cut mid-tensor.
    std::ifstream in(ModelDir() / "stories260K.bin", std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    for (size_t cut : {size_t{10}, size_t{28}, size_t{5000}, bytes.size() - 100}) {
      fs::path p = dir / "trunc.bin";
      std::ofstream(p, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(cut));
      o.model_path = p.string();
      auto t = Engine::Create(o);
      ASSERT_FALSE(t.ok()) << "cut at " << cut;
      EXPECT_NE(t.status().message().find("trunc.bin"), std::string::npos) << t.status().message();
    }
  }
  // An absurd header (negative layer count).
  {
    fs::path p = dir / "bad.bin";
    int32_t h[7] = {64, 172, -5, 8, 4, 512, 512};
    std::ofstream(p, std::ios::binary).write(reinterpret_cast<char*>(h), sizeof(h));
    o.model_path = p.string();
    auto t = Engine::Create(o);
    ASSERT_FALSE(t.ok());
    EXPECT_NE(t.status().message().find("n_layers"), std::string::npos) << t.status().message();
  }
  // A damaged dim: named as implausibly large, not as the odd head_dim derived from it.
  {
    fs::path p = dir / "huge.bin";
    int32_t h[7] = {2147483647, 172, 5, 8, 4, 512, 512};
    std::ofstream(p, std::ios::binary).write(reinterpret_cast<char*>(h), sizeof(h));
    o.model_path = p.string();
    auto t = Engine::Create(o);
    ASSERT_FALSE(t.ok());
    EXPECT_NE(t.status().message().find("implausibly large (dim 2147483647"), std::string::npos)
        << t.status().message();
  }
  // GGUF magic and nothing after it: read as GGUF, refused as truncated.
  {
    fs::path p = dir / "model.gguf";
    std::ofstream(p, std::ios::binary) << "GGUF\x03\x00\x00\x00";
    o.model_path = p.string();
    auto t = Engine::Create(o);
    ASSERT_FALSE(t.ok());
    EXPECT_NE(t.status().message().find("model.gguf"), std::string::npos) << t.status().message();
  }
  fs::remove_all(dir);
}

}  // namespace
}  // namespace helix
