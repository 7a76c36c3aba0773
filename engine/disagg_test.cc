// Disaggregated serving inside the engine: a context-server engine (export_kv) prefills and
// retains the KV, a generation engine (one rank, or a Helix group of forked ranks) pulls it
// over UCX and decodes; the tokens must equal aggregated decoding. Also for an MLA model
// (DeepSeek-V3-shaped, latent blocks) into a TP 2 x CP 2 group.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <thread>

#include "engine/engine.h"
#include "engine/engine_test_util.h"
#include "engine/parallel/launcher.h"

namespace helix {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

std::string Shared() { return testing::SharedDir(); }

EngineOptions Stories(int tp, int cp, int64_t tpb) {
  EngineOptions o;
  o.model_path = Shared() + "/models/stories260K/stories260K.bin";
  o.tokenizer_path = Shared() + "/models/stories260K/tok512.bin";
  o.num_threads = 1;
  o.tokens_per_block = tpb;
  o.max_batch_size = 16;
  o.kv_max_tokens = 16 * 512;
  o.tensor_parallel = tp;
  o.context_parallel = cp;
  o.comm_timeout = milliseconds(20000);
  o.kv_transfer_timeout = milliseconds(10000);
  return o;
}

// The tiny DeepSeek V3 model of the test_models fixture.
std::string MlaModel() {
  const char* models = std::getenv("HELIX_TEST_MODELS_DIR");
  return std::string(models != nullptr ? models : "") + "/deepseek_v3_tiny";
}

EngineOptions ContextOptions(int64_t tpb) {
  EngineOptions o = Stories(1, 1, tpb);
  o.export_kv = true;
  o.server_id = "ctx-test-" + std::to_string(getpid());
  return o;
}

std::vector<std::vector<int32_t>> Prompts(const Tokenizer& tok) {
  std::vector<std::vector<int32_t>> p;
  p.push_back(tok.Encode("", true));  // BOS alone: one token
  p.push_back(tok.Encode("The dog", true));
  p.push_back(tok.Encode("Lily and Ben went to the park. They saw a big red ball and", true));
  std::vector<int32_t> longp = tok.Encode("Once upon a time", true);
  while (longp.size() < 300) longp.push_back(longp[1 + longp.size() % 4]);
  p.push_back(longp);
  return p;
}

GenerateRequest Decode(const std::vector<int32_t>& prompt) {
  GenerateRequest r;
  r.prompt_tokens = prompt;
  r.max_tokens = 24;
  r.ignore_eos = true;
  r.sampling.temperature = 0;
  return r;
}

// Runs the prompts through ctx + gen (disaggregated) and through gen alone (aggregated).
void ExpectDisaggMatches(Engine* ctx, Engine* gen) {
  const auto prompts = Prompts(gen->tokenizer());
  std::vector<GenerateRequest> disagg, agg;
  int n = 0;
  for (const auto& p : prompts) {
    testing::Prefilled pf = testing::Prefill(ctx, p, "pf" + std::to_string(n++));
    ASSERT_GE(pf.first_token, 0);
    GenerateRequest r = Decode(p);
    r.kv_source = pf.source;
    r.first_token = pf.first_token;
    r.on_kv_done = [ctx, id = pf.source->request_id](const Status& s) {
      EXPECT_TRUE(s.ok()) << s.ToString();
      EXPECT_TRUE(ctx->ReleaseRetained(id));
    };
    disagg.push_back(r);
    agg.push_back(Decode(p));
  }
  const auto got = testing::RunAll(gen, disagg);
  const auto want = testing::RunAll(gen, agg);
  for (size_t i = 0; i < got.size(); ++i) {
    SCOPED_TRACE("prompt " + std::to_string(i) + " (" + std::to_string(prompts[i].size()) +
                 " tokens)");
    EXPECT_EQ(got[i].reason, FinishReason::kLength) << got[i].error.ToString();
    EXPECT_EQ(got[i].tokens, want[i].tokens);
    EXPECT_EQ(got[i].text, want[i].text);
  }
  ctx->ExpireLeases();
  EXPECT_EQ(ctx->kv_stats().free_blocks, ctx->kv_stats().total_blocks);
  EXPECT_EQ(ctx->disagg_stats().retained_requests, 0);
  EXPECT_EQ(gen->kv_stats().free_blocks, gen->kv_stats().total_blocks);
  EXPECT_EQ(gen->disagg_stats().transfers_done, prompts.size());
}

class DisaggTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(Shared() + "/models/stories260K/stories260K.bin")) {
      GTEST_SKIP() << "stories260K not found under " << Shared() << "/models (HELIX_SHARED_DIR)";
    }
    setenv("UCX_NET_DEVICES", "lo", 0);
  }
};

TEST_F(DisaggTest, OneRankMatchesAggregated) {
  for (int64_t tpb : {4, 32}) {
    SCOPED_TRACE("tokens_per_block " + std::to_string(tpb));
    auto ctx = Engine::Create(ContextOptions(tpb));
    ASSERT_TRUE(ctx.ok()) << ctx.status().ToString();
    auto gen = Engine::Create(Stories(1, 1, tpb));
    ASSERT_TRUE(gen.ok());
    ExpectDisaggMatches(ctx->get(), gen->get());
  }
}

// MAX_UTILIZATION on the generation side: pulled requests are admitted with their prompt's
// blocks, and one preempted after its pull is recomputed here (never pulled again): the tokens
// are still the aggregated ones, every pull counted done once, both pools whole.
TEST_F(DisaggTest, PulledRequestsPreemptedAreRecomputedHere) {
  auto ctx = Engine::Create(ContextOptions(16));
  ASSERT_TRUE(ctx.ok()) << ctx.status().ToString();
  EngineOptions o = Stories(1, 1, 16);
  o.kv_max_tokens = 400;  // 25 blocks: the prompts' 22 blocks fit, their decoding does not
  o.kv_preemption = true;
  auto gen = Engine::Create(o);
  ASSERT_TRUE(gen.ok()) << gen.status().ToString();
  ExpectDisaggMatches(ctx->get(), gen->get());
  EXPECT_GE((*gen)->kv_stats().preemptions, 1u);
}

// A seeded request samples the same tokens whether its first token came from a context server
// or not: the context server's sample took the seed's first draw, and the generation server
// goes on from the second (it drew the first again, shifting every later token).
TEST_F(DisaggTest, SeededSamplingMatchesAggregated) {
  auto ctx = Engine::Create(ContextOptions(32));
  ASSERT_TRUE(ctx.ok()) << ctx.status().ToString();
  auto gen = Engine::Create(Stories(1, 1, 32));
  ASSERT_TRUE(gen.ok());
  const auto prompt = (*gen)->tokenizer().Encode("Once upon a time", true);
  for (uint64_t seed : {1, 7, 42}) {
    SCOPED_TRACE("seed " + std::to_string(seed));
    SamplingParams sp;
    sp.temperature = 1.0f;
    sp.seed = seed;
    testing::Prefilled pf = testing::Prefill(ctx->get(), prompt, "s" + std::to_string(seed), &sp);
    ASSERT_GE(pf.first_token, 0);
    GenerateRequest d = Decode(prompt);
    d.sampling = sp;
    d.kv_source = pf.source;
    d.first_token = pf.first_token;
    d.on_kv_done = [c = ctx->get(), id = pf.source->request_id](const Status&) {
      c->ReleaseRetained(id);
    };
    GenerateRequest a = Decode(prompt);
    a.sampling = sp;
    const auto got = testing::RunAll(gen->get(), {d});
    const auto want = testing::RunAll(gen->get(), {a});
    EXPECT_EQ(got[0].reason, FinishReason::kLength) << got[0].error.ToString();
    EXPECT_EQ(got[0].tokens, want[0].tokens);
  }
}

// confirm_kv: a pull that landed decodes only once the context server confirms it still
// held the KV. A lease that ran out before the pull let another prompt's prefill take the
// blocks; the request then fails instead of decoding the other prompt's KV.
TEST_F(DisaggTest, ExpiredLeaseFailsThePullInsteadOfDecodingReusedBlocks) {
  EngineOptions co = ContextOptions(32);
  co.kv_max_tokens = 32;  // one block: a later prefill must reuse the expired one's
  co.kv_lease = milliseconds(50);
  auto ctx = Engine::Create(co);
  ASSERT_TRUE(ctx.ok()) << ctx.status().ToString();
  auto gen = Engine::Create(Stories(1, 1, 32));
  ASSERT_TRUE(gen.ok());
  Engine* c = ctx->get();
  const Tokenizer& tok = (*gen)->tokenizer();
  const std::vector<int32_t> cat = tok.Encode("The cat sat on the mat", true);
  const std::vector<int32_t> dog = tok.Encode("Once upon a time there was a big dog", true);
  auto confirm = [c](const std::string& id) {
    return [c, id](std::function<void(const Status&)> verdict) {
      verdict(c->ReleaseRetained(id) ? Status::Ok()
                                     : DeadlineExceeded("lease of " + id + " ran out"));
    };
  };
  // Confirmed in time: decodes as aggregated.
  testing::Prefilled live = testing::Prefill(c, cat, "live");
  GenerateRequest ok = Decode(cat);
  ok.kv_source = live.source;
  ok.first_token = live.first_token;
  ok.confirm_kv = confirm("live");
  const auto got = testing::RunAll(gen->get(), {ok, Decode(cat)});
  EXPECT_EQ(got[0].reason, FinishReason::kLength) << got[0].error.ToString();
  EXPECT_EQ(got[0].tokens, got[1].tokens);
  c->ExpireLeases();
  ASSERT_EQ(c->kv_stats().free_blocks, c->kv_stats().total_blocks);

  // The lease runs out, the dog prompt's prefill takes the block, then the pull happens.
  testing::Prefilled stale = testing::Prefill(c, cat, "stale");
  std::this_thread::sleep_for(milliseconds(120));
  c->ExpireLeases();
  testing::Prefilled other = testing::Prefill(c, dog, "other");
  ASSERT_EQ(other.source->block_addresses, stale.source->block_addresses);
  GenerateRequest late = Decode(cat);
  late.kv_source = stale.source;
  late.first_token = stale.first_token;
  late.confirm_kv = confirm("stale");
  const auto failed = testing::RunAll(gen->get(), {late});
  EXPECT_EQ(failed[0].reason, FinishReason::kError);
  EXPECT_NE(failed[0].error.message().find("ran out"), std::string::npos)
      << failed[0].error.ToString();
  EXPECT_LE(failed[0].tokens.size(), 1u);  // the context server's token, nothing decoded
  // The refused pull counts as failed, not done.
  EXPECT_EQ((*gen)->disagg_stats().transfers_done, 1u);
  EXPECT_EQ((*gen)->disagg_stats().transfers_failed, 1u);
  EXPECT_TRUE(c->ReleaseRetained("other"));
  c->ExpireLeases();
  EXPECT_EQ(c->kv_stats().free_blocks, c->kv_stats().total_blocks);
  EXPECT_EQ((*gen)->kv_stats().free_blocks, (*gen)->kv_stats().total_blocks);
}

// check_kv_source: asked once a request is admitted, before any rank pulls; a refusal fails
// the request with its reason, and its handle goes back (on_kv_done) without a pull.
TEST_F(DisaggTest, SourceCheckRunsBeforeThePull) {
  auto ctx = Engine::Create(ContextOptions(32));
  ASSERT_TRUE(ctx.ok()) << ctx.status().ToString();
  auto gen = Engine::Create(Stories(1, 1, 32));
  ASSERT_TRUE(gen.ok());
  Engine* c = ctx->get();
  Engine* g = gen->get();
  const auto prompts = Prompts(g->tokenizer());
  std::vector<GenerateRequest> reqs;
  std::vector<int> kv_done(2, 0);
  std::vector<std::thread> answering;
  for (int i = 0; i < 2; ++i) {
    const std::string id = "chk" + std::to_string(i);
    testing::Prefilled pf = testing::Prefill(c, prompts[2], id);
    GenerateRequest r = Decode(prompts[2]);
    r.kv_source = pf.source;
    r.first_token = pf.first_token;
    r.check_kv_source = [i, &answering](std::function<void(const Status&)> verdict) {
      // Answered from another thread, as a gRPC callback would.
      answering.emplace_back([i, verdict] {
        verdict(i == 0 ? Status::Ok() : InvalidArgument("not a handle this server gave out"));
      });
    };
    r.on_kv_done = [&kv_done, c, i, id](const Status&) {
      ++kv_done[i];
      c->ReleaseRetained(id);
    };
    reqs.push_back(r);
  }
  reqs.push_back(Decode(prompts[2]));
  const auto got = testing::RunAll(g, reqs);
  for (std::thread& t : answering) t.join();
  EXPECT_EQ(got[0].reason, FinishReason::kLength) << got[0].error.ToString();
  EXPECT_EQ(got[0].tokens, got[2].tokens);
  EXPECT_EQ(got[1].reason, FinishReason::kError);
  EXPECT_NE(got[1].error.message().find("not a handle"), std::string::npos);
  EXPECT_EQ(got[1].tokens.size(), 1u);  // the context server's token only
  EXPECT_EQ(kv_done, (std::vector<int>{1, 1}));
  EXPECT_EQ(g->disagg_stats().transfers_done, 1u);
  EXPECT_EQ(g->disagg_stats().transfers_failed, 1u);
  c->ExpireLeases();
  EXPECT_EQ(c->kv_stats().free_blocks, c->kv_stats().total_blocks);
  EXPECT_EQ(g->kv_stats().free_blocks, g->kv_stats().total_blocks);
}

// A request pulling its KV counts against max_batch_size; one cancelled while it waits for
// a batch slot hands the context server its KV back at once (on_kv_done), not at the lease.
TEST_F(DisaggTest, WaitingPullsCountInTheBatchAndReleaseWhenCancelled) {
  auto ctx = Engine::Create(ContextOptions(32));
  ASSERT_TRUE(ctx.ok()) << ctx.status().ToString();
  EngineOptions go = Stories(1, 1, 32);
  go.max_batch_size = 1;
  auto gen = Engine::Create(go);
  ASSERT_TRUE(gen.ok());
  Engine* c = ctx->get();
  Engine* g = gen->get();
  const auto prompts = Prompts(g->tokenizer());
  std::vector<std::string> events;  // "<id> first" / "<id> end", in order
  std::vector<Status> kv_done(3);
  std::vector<bool> kv_done_called(3, false);
  for (int i = 0; i < 3; ++i) {
    const std::string id = "w" + std::to_string(i);
    testing::Prefilled pf = testing::Prefill(c, prompts[1 + i % 2], id);
    GenerateRequest r = Decode(prompts[1 + i % 2]);
    r.id = id;
    r.kv_source = pf.source;
    r.first_token = pf.first_token;
    r.on_kv_done = [&, c, i, id](const Status& s) {
      kv_done[i] = s;
      kv_done_called[i] = true;
      c->ReleaseRetained(id);
    };
    r.sink = [&events, id](const TokenEvent& ev) {
      if (ev.finished) {
        events.push_back(id + " end");
      } else if (ev.token >= 0 && (events.empty() || events.back() != id + " tok")) {
        events.push_back(id + " tok");
      }
    };
    ASSERT_TRUE(g->Submit(r).ok());
  }
  g->Step();
  g->Cancel("w2");  // still waiting for the batch slot
  while (g->HasWork()) g->Step();
  // w1's first token (emitted when it is admitted to pull) comes after w0 ended; w2 never ran.
  auto at = [&](const std::string& e) {
    return std::find(events.begin(), events.end(), e) - events.begin();
  };
  ASSERT_LT(at("w1 tok"), static_cast<long>(events.size())) << ::testing::PrintToString(events);
  EXPECT_GT(at("w1 tok"), at("w0 end")) << ::testing::PrintToString(events);
  EXPECT_EQ(at("w2 tok"), static_cast<long>(events.size())) << ::testing::PrintToString(events);
  EXPECT_LT(at("w2 end"), static_cast<long>(events.size()));
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(kv_done_called[i]) << i;
  EXPECT_TRUE(kv_done[0].ok());
  EXPECT_TRUE(kv_done[1].ok());
  EXPECT_EQ(kv_done[2].code(), StatusCode::kCancelled);
  EXPECT_EQ(c->disagg_stats().retained_requests, 0);
  c->ExpireLeases();
  EXPECT_EQ(c->kv_stats().free_blocks, c->kv_stats().total_blocks);
  EXPECT_EQ(g->kv_stats().free_blocks, g->kv_stats().total_blocks);
}

// A Helix group (TP 2 x CP 2: each rank pulls the blocks it owns, and only its 2 of the 4 KV
// heads). Workers are forked before anything in this process starts UCX (whose state does
// not survive fork).
TEST_F(DisaggTest, HelixGroupPullsItsBlocksAndHeadSlices) {
  EngineOptions o = Stories(2, 2, 4);
  auto port = parallel::PickFreePort("127.0.0.1");
  ASSERT_TRUE(port.ok());
  o.leader_port = *port;
  ASSERT_EQ(testing::ThreadsOnceSettled(), 1) << "workers are forked from here";
  std::vector<pid_t> pids;
  for (int r = 1; r < 4; ++r) {
    const pid_t pid = fork();
    if (pid == 0) {
      o.rank = r;
      auto e = Engine::Create(o);
      if (!e.ok()) _exit(2);
      _exit((*e)->RunWorker().ok() ? 0 : 3);
    }
    pids.push_back(pid);
  }
  {
    auto gen = Engine::Create(o);
    ASSERT_TRUE(gen.ok()) << gen.status().ToString();
    auto ctx = Engine::Create(ContextOptions(4));
    ASSERT_TRUE(ctx.ok()) << ctx.status().ToString();
    ExpectDisaggMatches(ctx->get(), gen->get());
  }
  for (pid_t pid : pids) {
    int st = 0;
    const auto deadline = Clock::now() + milliseconds(20000);
    while (waitpid(pid, &st, WNOHANG) == 0 && Clock::now() < deadline) usleep(10000);
    if (Clock::now() >= deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &st, 0);
    }
    EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0);
  }
}

// DeepSeek V3 (MLA): the context server's latent blocks scattered over a TP 2 x CP 2 group;
// each rank pulls the whole latent of the blocks it owns (TP does not split the latent).
TEST_F(DisaggTest, MlaLatentBlocksIntoTpTwoCpTwoGroup) {
  const std::string mla = MlaModel();
  ASSERT_TRUE(fs::exists(mla + "/config.json"))
      << mla << " (HELIX_TEST_MODELS_DIR: the ctest fixture test_models)";
  EngineOptions o = Stories(2, 2, 4);
  o.model_path = mla;
  auto port = parallel::PickFreePort("127.0.0.1");
  ASSERT_TRUE(port.ok());
  o.leader_port = *port;
  const std::vector<pid_t> pids = testing::ForkWorkers(o);
  {
    auto gen = Engine::Create(o);
    ASSERT_TRUE(gen.ok()) << gen.status().ToString();
    EngineOptions c = ContextOptions(4);
    c.model_path = mla;
    auto ctx = Engine::Create(c);
    ASSERT_TRUE(ctx.ok()) << ctx.status().ToString();
    EXPECT_EQ((*ctx)->kv_layout().num_planes, 1);
    ExpectDisaggMatches(ctx->get(), gen->get());
  }
  for (int code : testing::Reap(pids, milliseconds(20000))) EXPECT_EQ(code, 0);
}

// A block whose size is not a multiple of 64 bytes (bf16 latent, 3 tokens per block: 1440
// bytes): the pool keeps blocks back to back, at the stride the kernels and the handles use.
TEST_F(DisaggTest, BlocksOfAnyByteSizeTransfer) {
  const std::string mla = MlaModel();
  ASSERT_TRUE(fs::exists(mla + "/config.json"))
      << mla << " (HELIX_TEST_MODELS_DIR: the ctest fixture test_models)";
  EngineOptions g = Stories(1, 1, 3);
  g.model_path = mla;
  g.kv_dtype = kernels::DType::kBF16;
  EngineOptions c = ContextOptions(3);
  c.model_path = mla;
  c.kv_dtype = kernels::DType::kBF16;
  auto ctx = Engine::Create(c);
  ASSERT_TRUE(ctx.ok()) << ctx.status().ToString();
  ASSERT_NE((*ctx)->kv_layout().block_bytes() % 64, 0) << "the case needs an unaligned block size";
  auto gen = Engine::Create(g);
  ASSERT_TRUE(gen.ok()) << gen.status().ToString();
  ExpectDisaggMatches(ctx->get(), gen->get());
}

TEST_F(DisaggTest, UnpulledKvIsFreedWhenItsLeaseExpires) {
  EngineOptions o = ContextOptions(4);
  o.kv_lease = milliseconds(200);
  auto ctx = Engine::Create(o);
  ASSERT_TRUE(ctx.ok());
  testing::Prefilled pf =
      testing::Prefill(ctx->get(), (*ctx)->tokenizer().Encode("The dog", true), "never");
  EXPECT_FALSE(pf.source->block_addresses.empty());
  EXPECT_EQ((*ctx)->disagg_stats().retained_requests, 1);
  EXPECT_LT((*ctx)->kv_stats().free_blocks, (*ctx)->kv_stats().total_blocks);
  std::this_thread::sleep_for(milliseconds(300));
  (*ctx)->ExpireLeases();
  EXPECT_EQ((*ctx)->kv_stats().free_blocks, (*ctx)->kv_stats().total_blocks);
  EXPECT_EQ((*ctx)->disagg_stats().leases_expired, 1u);
  EXPECT_FALSE((*ctx)->ReleaseRetained("never"));
}

TEST_F(DisaggTest, IncompatibleOrAlteredHandlesAreRefused) {
  auto ctx = Engine::Create(ContextOptions(4));
  ASSERT_TRUE(ctx.ok());
  auto gen = Engine::Create(Stories(1, 1, 8));  // tokens_per_block differs
  ASSERT_TRUE(gen.ok());
  const auto prompt = (*ctx)->tokenizer().Encode("The dog", true);
  testing::Prefilled pf = testing::Prefill(ctx->get(), prompt, "a");
  GenerateRequest r = Decode(prompt);
  r.kv_source = pf.source;
  r.first_token = pf.first_token;
  auto id = (*gen)->Submit(r);
  ASSERT_FALSE(id.ok());
  EXPECT_EQ(id.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(id.status().message().find("tokens_per_block 4"), std::string::npos)
      << id.status().ToString();

  auto gen4 = Engine::Create(Stories(1, 1, 4));
  ASSERT_TRUE(gen4.ok());
  auto altered = std::make_shared<transfer::KvSource>(*pf.source);
  altered->block_addresses[0] += 64;
  r.kv_source = altered;
  id = (*gen4)->Submit(r);
  ASSERT_FALSE(id.ok());
  EXPECT_NE(id.status().message().find("checksum"), std::string::npos) << id.status().ToString();
  r.kv_source = pf.source;
  r.prompt_tokens.push_back(5);
  id = (*gen4)->Submit(r);
  ASSERT_FALSE(id.ok());
  EXPECT_NE(id.status().message().find("holds " + std::to_string(prompt.size()) + " tokens"),
            std::string::npos)
      << id.status().ToString();
  EXPECT_TRUE((*ctx)->ReleaseRetained("a"));
}

// A context server that dies after prefill: the pull fails with a clear error, the request
// ends, and every block on the generation side is free again.
TEST_F(DisaggTest, DeadContextServerFailsOnlyItsRequest) {
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  const pid_t child = fork();
  if (child == 0) {
    close(fds[0]);
    // The child re-creates the context engine in a fresh image (exec) so UCX starts clean.
    setenv("HELIX_DISAGG_TEST_CTX_FD", std::to_string(fds[1]).c_str(), 1);
    execl("/proc/self/exe", "disagg_test_ctx", nullptr);
    _exit(127);
  }
  close(fds[1]);
  std::string bytes;
  char buf[4096];
  for (ssize_t n; (n = read(fds[0], buf, sizeof(buf))) > 0;) bytes.append(buf, n);
  close(fds[0]);
  // Dead before anything is checked: a failed assert below must not leave it running.
  kill(child, SIGKILL);
  waitpid(child, nullptr, 0);
  ASSERT_GE(bytes.size(), 4u) << "the context child did not start";
  auto src = transfer::DecodeKvSource(bytes.substr(4));
  ASSERT_TRUE(src.ok()) << "the context child did not start";
  int32_t first = 0;
  memcpy(&first, bytes.data(), 4);

  auto gen = Engine::Create(Stories(1, 1, 4));
  ASSERT_TRUE(gen.ok());
  auto prompt = (*gen)->tokenizer().Encode("The dog", true);
  GenerateRequest dead = Decode(prompt);
  dead.kv_source = std::make_shared<transfer::KvSource>(*src);
  dead.first_token = first;
  Status done_status;
  dead.on_kv_done = [&](const Status& s) { done_status = s; };
  const auto t0 = Clock::now();
  const auto got = testing::RunAll(gen->get(), {dead, Decode(prompt)});
  EXPECT_LT(Clock::now() - t0, milliseconds(9000));
  EXPECT_EQ(got[0].reason, FinishReason::kError);
  EXPECT_NE(got[0].error.message().find("KV transfer from context server"), std::string::npos)
      << got[0].error.ToString();
  EXPECT_FALSE(done_status.ok());
  EXPECT_EQ(got[1].reason, FinishReason::kLength);  // the other request is untouched
  EXPECT_EQ(got[1].tokens.size(), 24u);
  EXPECT_EQ((*gen)->kv_stats().free_blocks, (*gen)->kv_stats().total_blocks);
}

// The context child of DeadContextServerFailsOnlyItsRequest: prefills, writes the first token
// and the encoded handle to the pipe, and waits to be killed.
[[maybe_unused]] const bool kIsContextChild = [] {
  const char* fd_env = std::getenv("HELIX_DISAGG_TEST_CTX_FD");
  if (fd_env == nullptr) return false;
  const int fd = std::atoi(fd_env);
  auto ctx = Engine::Create(ContextOptions(4));
  if (!ctx.ok()) _exit(2);
  testing::Prefilled pf =
      testing::Prefill(ctx->get(), (*ctx)->tokenizer().Encode("The dog", true), "doomed");
  std::string out(reinterpret_cast<const char*>(&pf.first_token), 4);
  out += transfer::EncodeKvSource(*pf.source);
  if (write(fd, out.data(), out.size()) != static_cast<ssize_t>(out.size())) _exit(3);
  close(fd);
  for (;;) pause();
}();

}  // namespace
}  // namespace helix
