// Helix across real processes (fork): a TP x CP instance decodes the same tokens as the
// single-rank engine with logprobs within 1e-4, for batches with short and long prompts and
// requests joining mid-flight; a 20K-token prompt on CP = 4; a rank killed mid-decode fails the
// requests with a clear error in bounded time; a rank that never joins fails start-up; bad head
// splits are refused. Every test forks its worker ranks before it creates any thread.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "engine/engine_test_util.h"
#include "engine/parallel/launcher.h"

namespace helix {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

std::string Shared() { return testing::SharedDir(); }

EngineOptions StoriesOptions(int tp, int cp, int64_t tpb) {
  EngineOptions o;
  o.model_path = Shared() + "/models/stories260K/stories260K.bin";
  o.tokenizer_path = Shared() + "/models/stories260K/tok512.bin";
  o.num_threads = 1;  // one thread per rank: no thread exists when the test forks
  o.tokens_per_block = tpb;
  o.max_batch_size = 16;
  o.kv_max_tokens = 16 * 512;
  o.tensor_parallel = tp;
  o.context_parallel = cp;
  o.comm_timeout = std::chrono::milliseconds(20000);
  return o;
}

using testing::ForkWorkers;
using testing::Reap;

using Result = testing::RunResult;

// RunAll, killing `victim` before step `kill_at` (-1: never).
std::vector<Result> RunAll(Engine* e, std::vector<GenerateRequest> reqs, std::vector<int> join_at,
                           int kill_at = -1, pid_t victim = 0) {
  return testing::RunAll(e, std::move(reqs), std::move(join_at), [&](int step) {
    if (step == kill_at) kill(victim, SIGKILL);
  });
}

std::vector<GenerateRequest> Batch(const Tokenizer& tok) {
  const char* prompts[] = {"",
                           "Once",
                           "The dog",
                           "Lily and Ben went to the park",
                           "Tim",
                           "A cat",
                           "One day, a little bird flew over the big tree and saw",
                           "Sue"};
  const int lens[] = {40, 25, 60, 30, 12, 50, 35, 20};
  std::vector<GenerateRequest> reqs;
  for (int i = 0; i < 8; ++i) {
    GenerateRequest r;
    r.prompt_tokens = tok.Encode(prompts[i], true);
    r.max_tokens = lens[i];
    r.sampling.temperature = 0;
    r.sampling.top_logprobs = 5;
    r.ignore_eos = true;
    reqs.push_back(r);
  }
  return reqs;
}

void ExpectSameDecoding(const std::vector<Result>& got, const std::vector<Result>& want,
                        double tol) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    SCOPED_TRACE("request " + std::to_string(i));
    EXPECT_EQ(got[i].reason, want[i].reason) << got[i].error.ToString();
    EXPECT_EQ(got[i].tokens, want[i].tokens);
    double worst = 0;
    for (size_t t = 0; t < std::min(got[i].top_logprobs.size(), want[i].top_logprobs.size()); ++t) {
      ASSERT_EQ(got[i].top_logprobs[t].size(), want[i].top_logprobs[t].size());
      for (size_t k = 0; k < got[i].top_logprobs[t].size(); ++k) {
        if (got[i].top_logprobs[t][k].first != want[i].top_logprobs[t][k].first)
          continue;  // near-tie reorder
        worst = std::max(worst, std::abs(static_cast<double>(got[i].top_logprobs[t][k].second) -
                                         want[i].top_logprobs[t][k].second));
      }
    }
    EXPECT_LT(worst, tol);
  }
}

class HelixTest : public ::testing::TestWithParam<std::tuple<int, int, int>> {
 protected:
  void SetUp() override {
    if (!fs::exists(Shared() + "/models/stories260K/stories260K.bin")) {
      GTEST_SKIP() << "stories260K not found under " << Shared() << "/models (HELIX_SHARED_DIR)";
    }
  }
};

TEST_P(HelixTest, SameTokensAndLogprobsAsOneRank) {
  const auto [tp, cp, tpb] = GetParam();
  EngineOptions o = StoriesOptions(tp, cp, tpb);
  auto port = parallel::PickFreePort("127.0.0.1");
  ASSERT_TRUE(port.ok());
  o.leader_port = *port;
  const std::vector<pid_t> workers = ForkWorkers(o);
  std::vector<Result> helix;
  {
    auto e = Engine::Create(o);
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    helix = RunAll(e->get(), Batch((*e)->tokenizer()), {0, 0, 0, 3, 3, 7, 20, 21});
    EXPECT_EQ((*e)->kv_stats().free_blocks, (*e)->kv_stats().total_blocks);
  }  // the leader's destructor shuts the workers down
  for (int code : Reap(workers, std::chrono::milliseconds(20000))) EXPECT_EQ(code, 0);

  auto single = Engine::Create(StoriesOptions(1, 1, tpb));
  ASSERT_TRUE(single.ok());
  const std::vector<Result> want =
      RunAll(single->get(), Batch((*single)->tokenizer()), {0, 0, 0, 3, 3, 7, 20, 21});
  ExpectSameDecoding(helix, want, 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Layouts, HelixTest,
                         ::testing::Values(std::make_tuple(1, 2, 5), std::make_tuple(1, 4, 1),
                                           std::make_tuple(2, 2, 4), std::make_tuple(1, 8, 32),
                                           std::make_tuple(2, 1, 4)),
                         [](const auto& info) {
                           return "tp" + std::to_string(std::get<0>(info.param)) + "_cp" +
                                  std::to_string(std::get<1>(info.param)) + "_tpb" +
                                  std::to_string(std::get<2>(info.param));
                         });

// MAX_UTILIZATION on a Helix instance: the leader grows each sequence's reservation step by
// step (the workers follow the plan's grown reservations) and preempts when its pool is short;
// the preempted sequences are freed on every rank and recomputed, and the decoding is still
// the one-rank engine's with whole pools.
TEST(HelixPreemptionTest, GrownAndPreemptedSequencesDecodeAsOneRank) {
  if (!fs::exists(Shared() + "/models/stories260K/stories260K.bin")) GTEST_SKIP() << "no model";
  for (auto [tp, cp] : {std::pair{1, 2}, std::pair{2, 2}}) {
    SCOPED_TRACE("tp " + std::to_string(tp) + " cp " + std::to_string(cp));
    EngineOptions o = StoriesOptions(tp, cp, 4);
    o.kv_max_tokens = 64;  // 16 blocks a rank: room for about two of the batch's sequences
    o.kv_preemption = true;
    auto port = parallel::PickFreePort("127.0.0.1");
    ASSERT_TRUE(port.ok());
    o.leader_port = *port;
    const std::vector<pid_t> workers = ForkWorkers(o);
    std::vector<Result> helix;
    uint64_t preemptions = 0;
    {
      auto e = Engine::Create(o);
      ASSERT_TRUE(e.ok()) << e.status().ToString();
      helix = RunAll(e->get(), Batch((*e)->tokenizer()), {0, 0, 0, 3, 3, 7, 20, 21});
      preemptions = (*e)->kv_stats().preemptions;
      EXPECT_EQ((*e)->kv_stats().free_blocks, (*e)->kv_stats().total_blocks);
    }
    for (int code : Reap(workers, std::chrono::milliseconds(20000))) EXPECT_EQ(code, 0);
    EXPECT_GE(preemptions, 2u);
    auto single = Engine::Create(StoriesOptions(1, 1, 4));
    ASSERT_TRUE(single.ok());
    ExpectSameDecoding(
        helix, RunAll(single->get(), Batch((*single)->tokenizer()), {0, 0, 0, 3, 3, 7, 20, 21}),
        1e-4);
  }
}

TEST(HelixLongContextTest, TwentyThousandTokenPromptOnFourCpRanks) {
  const char* dir = std::getenv("HELIX_TEST_MODELS_DIR");
  ASSERT_NE(dir, nullptr) << "HELIX_TEST_MODELS_DIR (ctest fixture test_models) is not set";
  EngineOptions o;
  o.model_path = std::string(dir) + "/long.bin";
  o.tokenizer_path = Shared() + "/models/stories260K/tok512.bin";
  o.num_threads = 1;
  o.tokens_per_block = 32;
  o.max_batch_size = 1;
  o.max_num_tokens = 20100;
  o.kv_max_tokens = 20480;
  o.comm_timeout = std::chrono::milliseconds(120000);
  GenerateRequest r;
  srand(7);
  for (int i = 0; i < 20000; ++i) r.prompt_tokens.push_back(3 + rand() % 500);
  r.max_tokens = 4;
  r.sampling.temperature = 0;
  r.sampling.top_logprobs = 5;
  r.ignore_eos = true;

  EngineOptions h = o;
  h.context_parallel = 4;
  auto port = parallel::PickFreePort("127.0.0.1");
  ASSERT_TRUE(port.ok());
  h.leader_port = *port;
  const std::vector<pid_t> workers = ForkWorkers(h);
  std::vector<Result> helix;
  {
    auto e = Engine::Create(h);
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    helix = RunAll(e->get(), {r}, {});
  }
  for (int code : Reap(workers, std::chrono::milliseconds(30000))) EXPECT_EQ(code, 0);
  auto single = Engine::Create(o);
  ASSERT_TRUE(single.ok()) << single.status().ToString();
  ExpectSameDecoding(helix, RunAll(single->get(), {r}, {}), 1e-3);
}

TEST(HelixFaultTest, KilledRankFailsRequestsWithinTheTimeout) {
  if (!fs::exists(Shared() + "/models/stories260K/stories260K.bin")) GTEST_SKIP() << "no model";
  EngineOptions o = StoriesOptions(1, 2, 4);
  o.comm_timeout = std::chrono::milliseconds(3000);
  auto port = parallel::PickFreePort("127.0.0.1");
  ASSERT_TRUE(port.ok());
  o.leader_port = *port;
  const std::vector<pid_t> workers = ForkWorkers(o);
  auto e = Engine::Create(o);
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  std::vector<GenerateRequest> reqs = Batch((*e)->tokenizer());
  for (auto& r : reqs) r.max_tokens = 200;
  const auto t0 = Clock::now();
  const std::vector<Result> got = RunAll(e->get(), reqs, {}, 10, workers[0]);
  EXPECT_LT(Clock::now() - t0, std::chrono::milliseconds(15000));
  for (const Result& r : got) {
    EXPECT_EQ(r.reason, FinishReason::kError);
    EXPECT_NE(r.error.message().find("failed"), std::string::npos) << r.error.ToString();
    EXPECT_LT(r.tokens.size(), 200u);
  }
  EXPECT_FALSE((*e)->broken().ok());
  EXPECT_EQ((*e)->Submit(reqs[0]).status().code(), StatusCode::kUnavailable);
  EXPECT_EQ((*e)->kv_stats().free_blocks, (*e)->kv_stats().total_blocks);
  const std::vector<int> codes = Reap(workers, std::chrono::milliseconds(5000));
  EXPECT_EQ(codes[0], 128 + SIGKILL);
}

TEST(HelixFaultTest, RankThatNeverJoinsFailsStartUp) {
  if (!fs::exists(Shared() + "/models/stories260K/stories260K.bin")) GTEST_SKIP() << "no model";
  EngineOptions o = StoriesOptions(1, 2, 4);
  o.comm_timeout = std::chrono::milliseconds(1500);
  const auto t0 = Clock::now();
  auto e = Engine::Create(o);  // rank 1 is never started
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.status().message().find("could not connect"), std::string::npos)
      << e.status().ToString();
  EXPECT_LT(Clock::now() - t0, std::chrono::milliseconds(10000));
}

// Ranks started separately (mpirun, srun) from different configs: refused by name at start-up
// (a rank with another tokens_per_block placed its blocks differently and the text was wrong).
TEST(HelixFaultTest, RanksWithDifferentConfigsAreRefused) {
  if (!fs::exists(Shared() + "/models/stories260K/stories260K.bin")) GTEST_SKIP() << "no model";
  EngineOptions o = StoriesOptions(1, 2, 8);
  o.comm_timeout = std::chrono::milliseconds(5000);
  auto port = parallel::PickFreePort("127.0.0.1");
  ASSERT_TRUE(port.ok());
  o.leader_port = *port;
  EngineOptions other = o;
  other.tokens_per_block = 16;
  const std::vector<pid_t> workers = ForkWorkers(other);
  auto e = Engine::Create(o);
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(e.status().message().find("tokens_per_block: rank 1 has 16, rank 0 has 8"),
            std::string::npos)
      << e.status().ToString();
  const std::vector<int> codes = Reap(workers, std::chrono::milliseconds(10000));
  ASSERT_EQ(codes.size(), 1u);
  EXPECT_NE(codes[0], 0);  // the worker refused too
}

TEST(HelixLayoutTest, BadHeadSplitsAreRefused) {
  if (!fs::exists(Shared() + "/models/stories260K/stories260K.bin")) GTEST_SKIP() << "no model";
  for (auto [tp, cp, says] : {std::tuple{1, 3, "8 query heads are not divisible"},
                              std::tuple{8, 1, "4 KV heads are not divisible"},
                              std::tuple{4, 4, "query heads are not divisible"}}) {
    auto e = Engine::Create(StoriesOptions(tp, cp, 4));
    ASSERT_FALSE(e.ok());
    EXPECT_EQ(e.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(e.status().message().find(says), std::string::npos) << e.status().ToString();
  }
}

}  // namespace
}  // namespace helix
