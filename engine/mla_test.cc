// DeepSeek V2/V3 (MLA + MoE) on the tiny random-weight models tests/models/make_mla_models.py
// writes as Hugging Face safetensors:
// * single rank: every prompt position's logits within 1e-5 (relative to the row's largest
//   logit) of a naive float64 forward pass (K/V expanded from the latent, no absorption), both
//   as one prefill and token by token through the latent cache (absorbed decode), and the
//   greedy continuation equals the reference's (HELIX_MLA_DUMP_DIR=DIR writes the prefill
//   logits there as <model>_engine_logits.f32, for tests/gpu/deepseek_hf_check.py);
// * the latent cache holds kv_lora_rank + qk_rope_head_dim values per token and layer;
// * Helix: TP x CP ranks (forked processes) decode 128 greedy tokens identical to one rank,
//   logprobs within 1e-4, for a batch with prompts shorter than CP blocks and ones spanning
//   many blocks, requests joining mid-flight.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "engine/backend/cpu/cpu_backend.h"
#include "engine/engine.h"
#include "engine/engine_test_util.h"
#include "engine/model/llama_model.h"
#include "engine/model/model_loader.h"
#include "engine/parallel/launcher.h"

namespace helix {
namespace {

namespace fs = std::filesystem;

std::string ModelsDir() {
  const char* d = std::getenv("HELIX_TEST_MODELS_DIR");
  return d == nullptr ? "" : d;
}
std::string Tokenizer512() { return testing::SharedDir() + "/models/stories260K/tok512.bin"; }

std::vector<int32_t> ReadIds(const std::string& path) {
  std::ifstream in(path);
  std::vector<int32_t> ids;
  int32_t x;
  while (in >> x) ids.push_back(x);
  return ids;
}

std::vector<double> ReadF64(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<double> v(bytes.size() / sizeof(double));
  std::memcpy(v.data(), bytes.data(), v.size() * sizeof(double));
  return v;
}

class MlaTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (ModelsDir().empty() || !fs::exists(ModelsDir() + "/mla_prompt.txt")) {
      GTEST_FAIL() << "HELIX_TEST_MODELS_DIR does not hold the MLA test models; ctest runs "
                      "tests/models/make_test_models.py first (fixture test_models)";
    }
    if (!fs::exists(Tokenizer512())) GTEST_SKIP() << "no stories260K tokenizer";
  }
  std::string Model() const { return ModelsDir() + "/" + GetParam(); }
};

// Runs the prompt through a single-rank LlamaModel, either as one prefill or one token per
// Forward call (decode through the latent cache); returns [T][vocab] logits.
std::vector<float> SingleRankLogits(const std::string& model, const std::vector<int32_t>& prompt,
                                    bool token_by_token, int64_t* kv_bytes_per_token) {
  auto bundle = LoadModelBundle(model, Tokenizer512());
  EXPECT_TRUE(bundle.ok()) << bundle.status().ToString();
  if (!bundle.ok()) return {};
  const ModelConfig c = bundle->model->config;
  EXPECT_TRUE(c.mla());
  ShardWeights(c, parallel::HelixLayout{}, &bundle->model->weights);  // splits kv_b_proj
  const int64_t T = static_cast<int64_t>(prompt.size()), tpb = 4;
  const int64_t blocks = (T + tpb - 1) / tpb;
  kernels::KvPoolView kv{};
  kv.dtype = kernels::DType::kF32;
  kv.num_layers = c.n_layers;
  kv.num_kv_heads = 1;
  kv.tokens_per_block = tpb;
  kv.head_dim = c.head_dim;
  kv.num_planes = c.kv_planes();
  *kv_bytes_per_token = kv.block_elems() * 4 / tpb;
  std::vector<float> pool(static_cast<size_t>(blocks * kv.block_elems()));
  kv.base = pool.data();
  CpuBackend backend(2);
  LlamaModel m(std::move(bundle->model), &backend, kv);
  std::vector<float> all;
  const int64_t V = c.vocab_size;
  const auto run = [&](int64_t t0, int64_t t1) {
    ForwardBatch b;
    for (int64_t t = t0; t < t1; ++t) {
      b.tokens.push_back(prompt[t]);
      b.positions.push_back(static_cast<int32_t>(t));
      b.token_seq.push_back(0);
      b.kv_block.push_back(static_cast<int32_t>(t / tpb));
      b.kv_slot.push_back(static_cast<int32_t>(t % tpb));
      b.logits_rows.push_back(static_cast<int32_t>(t - t0));
    }
    b.num_seqs = 1;
    b.max_blocks = blocks;
    for (int64_t j = 0; j < blocks; ++j) {
      b.block_tables.push_back(static_cast<int32_t>(j));
      b.block_first_pos.push_back(static_cast<int32_t>(j * tpb));
    }
    b.kv_lens = {static_cast<int32_t>(t1)};
    std::vector<float> logits;
    ASSERT_TRUE(m.Forward(b, &logits).ok());
    ASSERT_EQ(static_cast<int64_t>(logits.size()), (t1 - t0) * V);
    all.insert(all.end(), logits.begin(), logits.end());
  };
  if (token_by_token) {
    for (int64_t t = 0; t < T; ++t) run(t, t + 1);
  } else {
    run(0, T);
  }
  return all;
}

TEST_P(MlaTest, LogitsMatchTheFloat64ReferencePrefillAndDecode) {
  const std::vector<int32_t> prompt = ReadIds(ModelsDir() + "/mla_prompt.txt");
  const std::vector<double> want = ReadF64(ModelsDir() + "/" + GetParam() + "_logits.f64");
  ASSERT_FALSE(prompt.empty());
  for (bool decode : {false, true}) {
    SCOPED_TRACE(decode ? "token by token (absorbed decode)" : "one prefill");
    int64_t kv_bytes = 0;
    const std::vector<float> got = SingleRankLogits(Model(), prompt, decode, &kv_bytes);
    ASSERT_EQ(got.size(), want.size());
    const int64_t V = static_cast<int64_t>(want.size() / prompt.size());
    double worst = 0;
    for (size_t r = 0; r < prompt.size(); ++r) {
      double scale = 0;
      for (int64_t v = 0; v < V; ++v) scale = std::max(scale, std::abs(want[r * V + v]));
      for (int64_t v = 0; v < V; ++v) {
        worst = std::max(worst, std::abs(got[r * V + v] - want[r * V + v]) / scale);
      }
    }
    EXPECT_LE(worst, 1e-5);
    printf("%s %s: worst relative logit error %.3g\n", GetParam().c_str(),
           decode ? "decode" : "prefill", worst);
    // For tests/gpu/deepseek_hf_check.py --engine-logits: transformers against the engine.
    if (const char* dump = std::getenv("HELIX_MLA_DUMP_DIR"); dump != nullptr && !decode) {
      std::ofstream(std::string(dump) + "/" + GetParam() + "_engine_logits.f32", std::ios::binary)
          .write(reinterpret_cast<const char*>(got.data()),
                 static_cast<std::streamsize>(got.size() * sizeof(float)));
    }
  }
}

TEST_P(MlaTest, LatentCacheSizeAndGreedyContinuation) {
  EngineOptions o;
  o.model_path = Model();
  o.tokenizer_path = Tokenizer512();
  o.num_threads = 2;
  o.tokens_per_block = 4;
  o.kv_max_tokens = 1024;
  auto e = Engine::Create(o);
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  const ModelConfig& c = (*e)->model_config();
  // One latent (kv_lora_rank) + one rotary key (qk_rope_head_dim) per token and layer.
  EXPECT_EQ((*e)->kv_layout().block_bytes(),
            c.n_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * 4 * o.tokens_per_block);
  EXPECT_EQ((*e)->kv_layout().num_planes, 1);
  GenerateRequest r;
  r.prompt_tokens = ReadIds(ModelsDir() + "/mla_prompt.txt");
  const std::vector<int32_t> want = ReadIds(ModelsDir() + "/" + GetParam() + "_greedy.txt");
  ASSERT_FALSE(want.empty());
  r.max_tokens = static_cast<int32_t>(want.size());
  r.ignore_eos = true;
  r.sampling.temperature = 0;
  const auto got = testing::RunAll(e->get(), {r});
  EXPECT_EQ(got[0].tokens, want);
}

// A DeepSeek directory with config.json edited by `edit`: LoadModelBundle's error message.
std::string LoadError(const std::string& model, const std::string& name,
                      const std::function<void(std::string*)>& edit) {
  const fs::path dir = fs::temp_directory_path() / ("mla_bad_" + name + std::to_string(getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  fs::copy(fs::path(model) / "model.safetensors", dir / "model.safetensors");
  std::ifstream in(fs::path(model) / "config.json");
  std::string cfg((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  edit(&cfg);
  std::ofstream(dir / "config.json") << cfg;
  auto b = LoadModelBundle(dir.string(), Tokenizer512());
  fs::remove_all(dir);
  return b.ok() ? "loaded" : b.status().ToString();
}

void Replace(std::string* s, const std::string& from, const std::string& to) {
  const size_t at = s->find(from);
  ASSERT_NE(at, std::string::npos) << from;
  s->replace(at, from.size(), to);
}

TEST(MlaConfigTest, BadConfigsAreRefusedNamingTheField) {
  const auto Model = [] { return ModelsDir() + "/deepseek_v3_tiny"; };
  ASSERT_TRUE(fs::exists(Model() + "/config.json")) << "HELIX_TEST_MODELS_DIR lacks the models";
  EXPECT_NE(
      LoadError(Model(), "topk", [](std::string* c) { Replace(c, "\"noaux_tc\"", "\"weird\""); })
          .find("topk_method 'weird' is not supported"),
      std::string::npos);
  EXPECT_NE(
      LoadError(Model(), "scoring", [](std::string* c) { Replace(c, "\"sigmoid\"", "\"relu\""); })
          .find("scoring_func 'relu'"),
      std::string::npos);
  // A latent rank that does not match the tensors: the tensor and both shapes are named.
  EXPECT_NE(
      LoadError(Model(), "rank",
                [](std::string* c) { Replace(c, "\"kv_lora_rank\": 64", "\"kv_lora_rank\": 48"); })
          .find("kv_a_proj_with_mqa.weight' has shape"),
      std::string::npos);
  EXPECT_NE(LoadError(Model(), "missing",
                      [](std::string* c) {
                        Replace(c, "\"qk_rope_head_dim\": 16", "\"qk_rope_headdim\": 16");
                      })
                .find("'qk_rope_head_dim' is missing"),
            std::string::npos);
  EXPECT_NE(
      LoadError(Model(), "rope", [](std::string* c) { Replace(c, "\"yarn\"", "\"dynamic\""); })
          .find("rope_scaling"),
      std::string::npos);
}

INSTANTIATE_TEST_SUITE_P(Models, MlaTest,
                         ::testing::Values("deepseek_v3_tiny", "deepseek_v2_tiny"));

// ---- Helix -------------------------------------------------------------------------------

EngineOptions MlaOptions(const std::string& model, int tp, int cp, int64_t tpb) {
  EngineOptions o;
  o.model_path = ModelsDir() + "/" + model;
  o.tokenizer_path = Tokenizer512();
  o.num_threads = 1;  // no thread exists when the test forks
  o.tokens_per_block = tpb;
  o.max_batch_size = 8;
  o.kv_max_tokens = 8 * 512;
  o.tensor_parallel = tp;
  o.context_parallel = cp;
  o.comm_timeout = std::chrono::milliseconds(30000);
  return o;
}

// Prompts from 1 token (shorter than any CP group's blocks) to 150 (many blocks on every
// rank), 128 greedy tokens each, with top-5 logprobs; ids fixed by seed.
std::vector<GenerateRequest> MlaBatch() {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> id(1, 511);
  std::vector<GenerateRequest> reqs;
  for (int len : {1, 3, 9, 40, 150}) {
    GenerateRequest r;
    for (int i = 0; i < len; ++i) r.prompt_tokens.push_back(id(rng));
    r.max_tokens = 128;
    r.ignore_eos = true;
    r.sampling.temperature = 0;
    r.sampling.top_logprobs = 5;
    reqs.push_back(r);
  }
  return reqs;
}

using Layout = std::tuple<std::string, int, int, int>;  // model, tp, cp, tokens_per_block

class MlaHelixTest : public ::testing::TestWithParam<Layout> {
 protected:
  void SetUp() override {
    if (ModelsDir().empty() || !fs::exists(ModelsDir() + "/mla_prompt.txt")) {
      GTEST_FAIL() << "HELIX_TEST_MODELS_DIR does not hold the MLA test models";
    }
    if (!fs::exists(Tokenizer512())) GTEST_SKIP() << "no stories260K tokenizer";
  }
};

TEST_P(MlaHelixTest, SameTokensAndLogprobsAsOneRank) {
  const auto& [model, tp, cp, tpb] = GetParam();
  const std::vector<int> join_at = {0, 0, 0, 5, 9};
  EngineOptions o = MlaOptions(model, tp, cp, tpb);
  auto port = parallel::PickFreePort("127.0.0.1");
  ASSERT_TRUE(port.ok());
  o.leader_port = *port;
  const std::vector<pid_t> workers = testing::ForkWorkers(o);
  std::vector<testing::RunResult> helix;
  {
    auto e = Engine::Create(o);
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    helix = testing::RunAll(e->get(), MlaBatch(), join_at);
    EXPECT_EQ((*e)->kv_stats().free_blocks, (*e)->kv_stats().total_blocks);
  }
  for (int code : testing::Reap(workers, std::chrono::milliseconds(30000))) EXPECT_EQ(code, 0);

  auto single = Engine::Create(MlaOptions(model, 1, 1, tpb));
  ASSERT_TRUE(single.ok()) << single.status().ToString();
  const auto want = testing::RunAll(single->get(), MlaBatch(), join_at);
  ASSERT_EQ(helix.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    SCOPED_TRACE("request " + std::to_string(i));
    EXPECT_EQ(helix[i].reason, FinishReason::kLength) << helix[i].error.ToString();
    ASSERT_EQ(want[i].tokens.size(), 128u);
    EXPECT_EQ(helix[i].tokens, want[i].tokens);
    double worst = 0;
    for (size_t t = 0; t < std::min(helix[i].top_logprobs.size(), want[i].top_logprobs.size());
         ++t) {
      const auto& g = helix[i].top_logprobs[t];
      const auto& w = want[i].top_logprobs[t];
      for (size_t k = 0; k < std::min(g.size(), w.size()); ++k) {
        if (g[k].first != w[k].first) continue;  // a near-tie reordered
        worst = std::max(worst, static_cast<double>(std::abs(g[k].second - w[k].second)));
      }
    }
    EXPECT_LT(worst, 1e-4);
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, MlaHelixTest,
                         ::testing::Values(Layout{"deepseek_v3_tiny", 1, 2, 4},
                                           Layout{"deepseek_v3_tiny", 1, 4, 2},
                                           Layout{"deepseek_v3_tiny", 2, 1, 8},
                                           Layout{"deepseek_v3_tiny", 2, 2, 3},
                                           Layout{"deepseek_v2_tiny", 2, 2, 1}),
                         [](const auto& info) {
                           return std::get<0>(info.param).substr(0, 11) + "_tp" +
                                  std::to_string(std::get<1>(info.param)) + "_cp" +
                                  std::to_string(std::get<2>(info.param)) + "_tpb" +
                                  std::to_string(std::get<3>(info.param));
                         });

}  // namespace
}  // namespace helix
