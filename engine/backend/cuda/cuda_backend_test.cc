// The engine on the CUDA backend against the engine on the CPU backend (the reference), on the
// real stories260K model: greedy tokens identical and logprobs close, one rank and Helix ranks
// sharing the device (collectives staged through host memory over Gloo).
//
// Compiled twice: as cuda_backend_emu_test with HELIX_CUDA_EMULATION (kernels run on host
// threads by tests/gpu/cuda_emu.h; no GPU needed, so CI runs it) and as cuda_backend_test on
// the real GPU (label gpu; skips when no CUDA device is visible).
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#ifndef HELIX_CUDA_EMULATION
#include <cuda_runtime.h>
#endif

#include "engine/backend/cuda/cuda_backend.h"
#include "engine/engine.h"
#include "engine/engine_test_util.h"
#include "engine/parallel/launcher.h"
#include "engine/transfer/kv_handle.h"

namespace helix {
namespace {

namespace fs = std::filesystem;
using testing::RunAll;
using testing::RunResult;

std::string Shared() {
  const char* s = std::getenv("HELIX_SHARED_DIR");
  return s ? s : "../shared";
}

struct Case {
  std::string name;
  kernels::DType kv_dtype;
  std::optional<kernels::DType> weight_dtype;  // nullopt: the checkpoint's float32
  int64_t tokens_per_block;
  int64_t split_tokens;  // CudaBackendOptions::attention_split_tokens
  int tp, cp;
};

EngineOptions Options(const Case& c) {
  EngineOptions o;
  o.model_path = Shared() + "/models/stories260K/stories260K.bin";
  o.tokenizer_path = Shared() + "/models/stories260K/tok512.bin";
  o.num_threads = 1;
  o.tokens_per_block = c.tokens_per_block;
  o.kv_dtype = c.kv_dtype;
  o.weight_dtype = c.weight_dtype;
  o.kv_max_tokens = 4 * 256;
  o.max_batch_size = 4;
  o.max_seq_len = 256;
  return o;
}

EngineOptions CudaOptions(const Case& c) {
  EngineOptions o = Options(c);
  o.tensor_parallel = c.tp;
  o.context_parallel = c.cp;
  CudaBackendOptions bo;
  bo.attention_split_tokens = c.split_tokens;
  o.backend_factory = [bo]() { return CreateCudaBackend(bo); };
  return o;
}

// Prompts of different lengths (one shorter than a block at the small block sizes, one
// spanning several), greedy, with the sampled token's logprob and the top 3.
std::vector<GenerateRequest> Batch(int max_tokens) {
  std::vector<GenerateRequest> reqs;
  for (const char* p :
       {"Once upon a time", "Lily", "The little dog ran to the park and saw a big"}) {
    GenerateRequest r;
    r.prompt = p;
    r.max_tokens = max_tokens;
    r.sampling.temperature = 0;
    r.sampling.top_logprobs = 3;
    reqs.push_back(r);
  }
  return reqs;
}

void ExpectSame(const std::vector<RunResult>& got, const std::vector<RunResult>& want, double tol) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_TRUE(got[i].error.ok()) << got[i].error.ToString();
    EXPECT_EQ(got[i].tokens, want[i].tokens)
        << "request " << i << ": \"" << got[i].text << "\" vs the CPU's \"" << want[i].text << "\"";
    EXPECT_EQ(got[i].text, want[i].text);
    if (tol < 0) continue;
    double worst = 0;
    const size_t n = std::min(got[i].top_logprobs.size(), want[i].top_logprobs.size());
    for (size_t t = 0; t < n; ++t) {
      ASSERT_EQ(got[i].top_logprobs[t].size(), want[i].top_logprobs[t].size());
      for (size_t k = 0; k < got[i].top_logprobs[t].size(); ++k) {
        EXPECT_EQ(got[i].top_logprobs[t][k].first, want[i].top_logprobs[t][k].first)
            << "request " << i << " step " << t;
        worst = std::max<double>(
            worst, std::fabs(got[i].top_logprobs[t][k].second - want[i].top_logprobs[t][k].second));
      }
    }
    EXPECT_LT(worst, tol) << "request " << i;
  }
}

class CudaBackendTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    if (!fs::exists(Shared() + "/models/stories260K/stories260K.bin")) {
      GTEST_SKIP() << "stories260K not found under " << Shared() << "/models (HELIX_SHARED_DIR)";
    }
#ifndef HELIX_CUDA_EMULATION
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
      GTEST_SKIP() << "no CUDA device visible";
    }
#endif
  }
};

using CudaBackendDisaggTest = CudaBackendTest;

#ifdef HELIX_CUDA_EMULATION
constexpr int kSteps = 12;  // emulated kernels are slow: a few thousand host threads per step
#else
constexpr int kSteps = 64;
#endif

TEST_P(CudaBackendTest, SameGreedyTokensAsCpu) {
  const Case c = GetParam();
  const std::vector<int> join_at = {0, 0, 3};  // the third joins mid-flight
  std::vector<RunResult> got;
  const EngineOptions co = CudaOptions(c);
  std::vector<pid_t> workers;
  EngineOptions lead = co;
  if (c.tp * c.cp > 1) {
    auto port = parallel::PickFreePort("127.0.0.1");
    ASSERT_TRUE(port.ok());
    lead.leader_port = *port;
    workers = testing::ForkWorkers(lead);
  }
  {
    auto e = Engine::Create(lead);
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    got = RunAll(e->get(), Batch(kSteps), join_at);
    EXPECT_EQ((*e)->kv_stats().free_blocks, (*e)->kv_stats().total_blocks);
  }
  for (int code : testing::Reap(workers, std::chrono::milliseconds(30000))) EXPECT_EQ(code, 0);

  auto cpu = Engine::Create(Options(c));
  ASSERT_TRUE(cpu.ok()) << cpu.status().ToString();
  const std::vector<RunResult> want = RunAll(cpu->get(), Batch(kSteps), join_at);
  const bool exact = c.kv_dtype == kernels::DType::kF32 && !c.weight_dtype;
  ExpectSame(got, want, exact ? 1e-4 : 2e-2);
}

INSTANTIATE_TEST_SUITE_P(
    Stories, CudaBackendTest,
    ::testing::Values(Case{"f32", kernels::DType::kF32, std::nullopt, 32, 0, 1, 1},
                      Case{"bf16kv_tpb4_split8", kernels::DType::kBF16, std::nullopt, 4, 8, 1, 1},
                      Case{"f32_cp2_tpb4", kernels::DType::kF32, std::nullopt, 4, 0, 1, 2},
                      Case{"f16kv_tp2_cp2_tpb8", kernels::DType::kF16, std::nullopt, 8, 0, 2, 2}
#ifndef HELIX_CUDA_EMULATION
                      ,
                      Case{"bf16_weights", kernels::DType::kBF16, kernels::DType::kBF16, 16, 0, 1,
                           1}
#endif
                      ),
    [](const auto& info) { return info.param.name; });

// Disaggregated on the CUDA backend: a context engine on it exports its device blocks through
// a pinned mirror, a CP 2 generation group on it pulls them into pinned staging and copies them
// to its device blocks; the tokens equal the CPU engine's aggregated decoding.
TEST_P(CudaBackendDisaggTest, ContextToCpTwoGroupMatchesCpu) {
  setenv("UCX_NET_DEVICES", "lo", 0);
  const Case c = GetParam();
  EngineOptions go = CudaOptions(c);
  go.kv_transfer_timeout = std::chrono::milliseconds(20000);
  auto port = parallel::PickFreePort("127.0.0.1");
  ASSERT_TRUE(port.ok());
  go.leader_port = *port;
  // Workers first: UCX state does not survive fork.
  const std::vector<pid_t> workers = testing::ForkWorkers(go);
  std::vector<RunResult> got;
  std::vector<GenerateRequest> reqs = Batch(kSteps);
  {
    auto gen = Engine::Create(go);
    ASSERT_TRUE(gen.ok()) << gen.status().ToString();
    Case cc = c;
    cc.tp = cc.cp = 1;
    EngineOptions co = CudaOptions(cc);
    co.export_kv = true;
    co.server_id = "cuda-ctx-" + std::to_string(getpid());
    auto ctx = Engine::Create(co);
    ASSERT_TRUE(ctx.ok()) << ctx.status().ToString();
    for (size_t i = 0; i < reqs.size(); ++i) {
      // Prefill on the context engine: one token, KV retained.
      GenerateRequest p;
      p.id = "pf" + std::to_string(i);
      p.prompt_tokens = (*gen)->tokenizer().Encode(reqs[i].prompt, true);
      p.max_tokens = 1;
      p.ignore_eos = true;
      p.retain_kv = true;
      p.sampling.temperature = 0;
      int32_t first = -1;
      std::vector<uint64_t> blocks;
      p.sink = [&](const TokenEvent& ev) {
        if (ev.token >= 0) first = ev.token;
        if (ev.finished) blocks = ev.kv_block_addresses;
      };
      ASSERT_TRUE((*ctx)->Submit(p).ok());
      while ((*ctx)->HasWork()) (*ctx)->Step();
      ASSERT_GE(first, 0);
      const KvExport* ex = (*ctx)->kv_export();
      ASSERT_NE(ex, nullptr);
      auto src = std::make_shared<transfer::KvSource>();
      src->server_id = ex->server_id;
      src->server_address = "in-process";
      src->request_id = p.id;
      src->worker_address = ex->worker_address;
      src->rkey = ex->rkey;
      src->block_addresses = blocks;
      src->token_count = static_cast<int64_t>(p.prompt_tokens.size());
      src->layout = ex->layout;
      src->model_fingerprint = (*ctx)->model_fingerprint();
      src->checksum = transfer::HandleChecksum(*src);
      reqs[i].prompt_tokens = p.prompt_tokens;
      reqs[i].kv_source = src;
      reqs[i].first_token = first;
      reqs[i].on_kv_done = [e = ctx->get(), id = p.id](const Status& s) {
        EXPECT_TRUE(s.ok()) << s.ToString();
        EXPECT_TRUE(e->ReleaseRetained(id));
      };
    }
    got = RunAll(gen->get(), reqs);
    EXPECT_EQ((*gen)->disagg_stats().transfers_done, reqs.size());
    EXPECT_EQ((*gen)->kv_stats().free_blocks, (*gen)->kv_stats().total_blocks);
    (*ctx)->ExpireLeases();
    EXPECT_EQ((*ctx)->kv_stats().free_blocks, (*ctx)->kv_stats().total_blocks);
  }
  for (int code : testing::Reap(workers, std::chrono::milliseconds(30000))) EXPECT_EQ(code, 0);

  auto cpu = Engine::Create(Options(c));
  ASSERT_TRUE(cpu.ok()) << cpu.status().ToString();
  const std::vector<RunResult> want = RunAll(cpu->get(), Batch(kSteps));
  ExpectSame(got, want, -1);  // the first token's logprobs stay on the context server
}

INSTANTIATE_TEST_SUITE_P(Stories, CudaBackendDisaggTest,
                         ::testing::Values(Case{"f32_cp2_tpb4", kernels::DType::kF32, std::nullopt,
                                                4, 0, 1, 2}),
                         [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace helix
