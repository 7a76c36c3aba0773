// The engine on the CUDA backend against the engine on the CPU backend (the reference): on the
// real stories260K model (greedy and seeded sampling, KV dtypes, split-KV, CUDA graphs, Helix
// ranks sharing the device with collectives staged through host memory over Gloo, KV from a
// context server through pinned staging), on the tiny DeepSeek models (MLA + MoE) of the
// test_models fixture (tokens identical, logprobs close) and on its GGUF models (bf16 weights:
// within bf16 tolerance, the first divergent step reported).
//
// Compiled twice: as cuda_backend_emu_test with HELIX_CUDA_EMULATION (the kernels run on the
// host by tests/gpu/cuda_emu.h; no GPU needed, so CI runs it) and as cuda_backend_test on the
// real GPU (label gpu; skips when no CUDA device is visible). Helix worker ranks are this binary
// spawned again (CudaBackendWorker.Run), never forked: CUDA does not survive fork.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <random>
#include <string>
#include <vector>

#ifndef HELIX_CUDA_EMULATION
#include <cuda_runtime.h>
#else
#include <mutex>

#include "tests/gpu/cuda_emu.h"  // helix_emu::g_prefetch_hook
#endif

#include "engine/backend/cuda/cuda_backend.h"
#include "engine/engine.h"
#include "engine/engine_test_util.h"
#include "engine/parallel/launcher.h"
#include "engine/spawn_test_util.h"
#include "kernels/attention.h"
#include "kernels/dtype.h"
#include "kernels/gemm.h"

namespace helix {
namespace {

namespace fs = std::filesystem;
using testing::RunAll;
using testing::RunResult;

constexpr int kSteps = 64;

std::string Shared() {
  const char* s = std::getenv("HELIX_SHARED_DIR");
  return s ? s : "../shared";
}
std::string ModelsDir() {
  const char* s = std::getenv("HELIX_TEST_MODELS_DIR");
  return s ? s : "";
}

bool HaveDevice() {
#ifdef HELIX_CUDA_EMULATION
  return true;
#else
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
#endif
}

struct Case {
  std::string name;
  kernels::DType kv_dtype;
  std::optional<kernels::DType> weight_dtype;  // nullopt: the checkpoint's float32
  int64_t tokens_per_block;
  int64_t split_tokens;  // CudaBackendOptions::attention_split_tokens
  int tp, cp;
  bool sampled = false;  // SampledBatch (seeded sampling, mostly on the device) instead of Batch
  bool graphs = false;   // EngineOptions::cuda_graphs (and no logprobs, so that steps qualify)
  bool gemv = false;     // CudaBackendOptions::decode_gemv
  bool split_argmax = false;  // CudaBackendOptions::split_argmax (the vocabulary's 512: 4 chunks)
  bool norm_sums = false;     // CudaBackendOptions::norm_sums
  bool gemv_rope = false;     // CudaBackendOptions::gemv_rope_kv
  // EngineOptions::kv_preemption with a pool too small for the batch: reservations grow (graph
  // buckets of growing block tables) and sequences are preempted and recomputed.
  bool preempt = false;
  // EngineOptions::device_collectives_for_testing: the ranks' collectives on device buffers
  // (NCCL's code paths: no host staging, the logits gathered and sampled on the device).
  bool device_comm = false;
};

const std::vector<Case>& StoriesCases() {
  static const std::vector<Case> cases = {
      {"f32", kernels::DType::kF32, std::nullopt, 32, 0, 1, 1},
      {"f32_sampled", kernels::DType::kF32, std::nullopt, 16, 0, 1, 1, true},
      {"f32_graphs", kernels::DType::kF32, std::nullopt, 8, 0, 1, 1, false, true},
      // The greedy argmax chunked over several thread blocks per row, eager and in graphs.
      {"f32_graphs_split_argmax", kernels::DType::kF32, std::nullopt, 8, 0, 1, 1, false, true,
       false, true},
      {"sampled_graphs", kernels::DType::kBF16, std::nullopt, 4, 8, 1, 1, true, true},
      {"bf16kv_tpb4_split8", kernels::DType::kBF16, std::nullopt, 4, 8, 1, 1},
      {"f32_cp2_tpb4", kernels::DType::kF32, std::nullopt, 4, 0, 1, 2},
      {"f16kv_tp2_cp2_tpb8", kernels::DType::kF16, std::nullopt, 8, 0, 2, 2},
      {"f32_graphs_preempt", kernels::DType::kF32, std::nullopt, 8, 0, 1, 1, false, true, false,
       false, false, false, true},
      {"f32_cp2_tpb4_preempt", kernels::DType::kF32, std::nullopt, 4, 0, 1, 2, false, false, false,
       false, false, false, true},
#ifdef HELIX_CUDA_EMULATION
      // Helix ranks as on several GPUs with NCCL (which a one-GPU machine cannot run): greedy
      // CP 2, and seeded sampling on TP 2 x CP 2 with bf16 KV and split-KV. Emulation only:
      // device_collectives_for_testing needs device memory the host can address.
      {"f32_cp2_tpb4_devcomm", kernels::DType::kF32, std::nullopt, 4, 0, 1, 2, false, false, false,
       false, false, false, false, true},
      {"sampled_tp2_cp2_devcomm", kernels::DType::kBF16, std::nullopt, 8, 8, 2, 2, true, false,
       false, false, false, false, false, true},
#endif
      // bf16 weights with the decode steps' GEMMs (up to 4 rows) as GemvCuda: one-row steps
      // (the last request alone) with the norms and residual adds folded in, two- and three-row
      // ones with the norms as kernels (on the GPU also inside a graph).
      {"bf16w_gemv", kernels::DType::kBF16, kernels::DType::kBF16, 8, 0, 1, 1, false, false, true},
      // The same with each norm after o_proj taken from the partial sums of squares o_proj
      // leaves (in steps of every row count: stories260K's down projection, k = 172, is no GEMV
      // shape, so the attention norms stay as they are), and RoPE and the K/V write in the
      // q|k|v GEMV's epilogue.
      {"bf16w_gemv_sums_rope", kernels::DType::kBF16, kernels::DType::kBF16, 8, 0, 1, 1, false,
       false, true, false, true, true},
#ifndef HELIX_CUDA_EMULATION
      {"bf16_weights", kernels::DType::kBF16, kernels::DType::kBF16, 16, 0, 1, 1},
      {"bf16w_gemv_graphs", kernels::DType::kBF16, kernels::DType::kBF16, 16, 0, 1, 1, false, true,
       true},
      // Both optional GEMV fusions captured and replayed (the partials' buffer and the fused
      // RoPE's pool writes inside graphs).
      {"bf16w_gemv_graphs_sums_rope", kernels::DType::kBF16, kernels::DType::kBF16, 16, 0, 1, 1,
       false, true, true, false, true, true},
#endif
  };
  return cases;
}

// The generation side of the disaggregated tests; with prompts of several blocks per rank.
const std::vector<Case>& DisaggCases() {
  static const std::vector<Case> cases = {
      {"f32_cp2_tpb4", kernels::DType::kF32, std::nullopt, 4, 0, 1, 2},
      {"f16kv_tp2_cp2_tpb2", kernels::DType::kF16, std::nullopt, 2, 0, 2, 2},
  };
  return cases;
}

EngineOptions Options(const Case& c) {
  EngineOptions o;
  o.model_path = Shared() + "/models/stories260K/stories260K.bin";
  o.tokenizer_path = Shared() + "/models/stories260K/tok512.bin";
  o.num_threads = 1;
  o.tokens_per_block = c.tokens_per_block;
  o.kv_dtype = c.kv_dtype;
  o.weight_dtype = c.weight_dtype;
  o.kv_max_tokens = 4 * 256;
  o.max_batch_size = 8;
  o.max_seq_len = 256;
  o.kv_transfer_timeout = std::chrono::milliseconds(20000);
  return o;
}

EngineOptions CudaOptions(const Case& c) {
  EngineOptions o = Options(c);
  o.tensor_parallel = c.tp;
  o.context_parallel = c.cp;
  o.cuda_graphs = c.graphs;
  o.kv_staging_tokens = 2 * c.tokens_per_block;  // a 2-slot ring when a rank pulls more blocks
  o.device_collectives_for_testing = c.device_comm;
  if (c.preempt) {
    o.kv_preemption = true;
    o.kv_max_tokens = 96;  // per rank: about one and a half of the batch's sequences
  }
  CudaBackendOptions bo;
  bo.attention_split_tokens = c.split_tokens;
  bo.decode_gemv = c.gemv;
  bo.split_argmax = c.split_argmax;
  bo.norm_sums = c.norm_sums;
  bo.gemv_rope_kv = c.gemv_rope;
  o.backend_factory = [bo]() { return CreateCudaBackend(bo); };
  return o;
}

// Records every backend o's factory makes in this process (the engine owns them: valid while it
// lives).
std::shared_ptr<std::vector<Backend*>> WatchBackends(EngineOptions* o) {
  auto seen = std::make_shared<std::vector<Backend*>>();
  o->backend_factory = [make = o->backend_factory, seen]() {
    StatusOr<std::unique_ptr<Backend>> b = make();
    if (b.ok()) seen->push_back(b->get());
    return b;
  };
  return seen;
}

// The GEMV kernels a bf16-weight model's decode steps ran: none without decode_gemv; with it at
// least each of `ran` (names as Backend::ops_queued counts them).
void ExpectGemvUse(const Backend& b, bool gemv, std::initializer_list<const char*> ran,
                   const std::string& what) {
  for (const char* op :
       {"GemvCuda", "GemvNormCuda", "GemvAddCuda", "GemvNormAddCuda", "GemvSiluMulCuda",
        "GemvNormSiluMulCuda", "GemvAddSumsCuda", "GemvSumsNormCuda", "GemvSumsNormSiluMulCuda",
        "GemvRopeKvCuda", "GemvNormRopeKvCuda", "GemvSumsNormRopeKvCuda"}) {
    if (!gemv) {
      EXPECT_EQ(b.ops_queued(op), 0) << what << ": " << op;
    }
  }
  if (gemv) {
    for (const char* op : ran) EXPECT_GT(b.ops_queued(op), 0) << what << ": " << op;
  }
}

EngineOptions MlaOptions(const std::string& model, int tp, int cp, bool cuda) {
  EngineOptions o;
  o.model_path = ModelsDir() + "/" + model;
  o.tokenizer_path = Shared() + "/models/stories260K/tok512.bin";
  o.num_threads = 1;
  o.tokens_per_block = 4;
  o.max_batch_size = 4;
  o.kv_max_tokens = 4 * 256;
  o.tensor_parallel = tp;
  o.context_parallel = cp;
  if (cuda) o.backend_factory = []() { return CreateCudaBackend(CudaBackendOptions{}); };
  return o;
}

// The options a spawned worker rank runs with: "stories/<case>" or "mla/<model>/<tp>/<cp>".
std::optional<EngineOptions> WorkerOptions(const std::string& id) {
  if (id.rfind("stories/", 0) == 0) {
    for (const auto* cases : {&StoriesCases(), &DisaggCases()}) {
      for (const Case& c : *cases) {
        if ("stories/" + c.name == id) return CudaOptions(c);
      }
    }
  }
  if (id.rfind("mla/", 0) == 0) {
    const std::string rest = id.substr(4);
    const size_t a = rest.find('/'), b = rest.rfind('/');
    if (a != std::string::npos && b != a) {
      return MlaOptions(rest.substr(0, a), std::stoi(rest.substr(a + 1, b - a - 1)),
                        std::stoi(rest.substr(b + 1)), true);
    }
  }
  return std::nullopt;
}

// Ranks 1..world-1 of the instance `id` whose leader listens on `port`, as new processes.
std::vector<pid_t> SpawnWorkers(const std::string& id, int world, int port) {
  std::vector<pid_t> pids;
  for (int r = 1; r < world; ++r) {
    const pid_t pid = testing::SpawnSelf(
        "CudaBackendWorker.Run",
        {"HELIX_CUDA_TEST_WORKER=" + id, "HELIX_CUDA_TEST_RANK=" + std::to_string(r),
         "HELIX_CUDA_TEST_PORT=" + std::to_string(port)});
    if (pid > 0) {
      pids.push_back(pid);
    } else {
      ADD_FAILURE() << "cannot spawn rank " << r;
    }
  }
  return pids;
}

// The other ranks of the instance `lead` describes (rank 0 is this process), spawned as
// worker `id` after picking the leader's port; none for a single rank.
std::vector<pid_t> StartWorkers(const std::string& id, EngineOptions* lead) {
  const int world = lead->tensor_parallel * lead->context_parallel;
  if (world == 1) return {};
  auto port = parallel::PickFreePort("127.0.0.1");
  if (!port.ok()) {
    ADD_FAILURE() << port.status().ToString();
    return {};
  }
  lead->leader_port = *port;
  return SpawnWorkers(id, world, *port);
}

// Why a test cannot run here ("" when it can): it is itself a spawned worker, `needed` is
// missing (`what` says what it is), or there is no device.
std::string Unready(const std::string& needed, const std::string& what) {
  if (std::getenv("HELIX_CUDA_TEST_WORKER") != nullptr) return "a worker rank";
  if (!fs::exists(needed)) return what + " not found (" + needed + ")";
  if (!HaveDevice()) return "no CUDA device visible";
  return "";
}

// Greedy requests with random prompts of the given lengths (ids in [lo, 511]), EOS ignored.
std::vector<GenerateRequest> RandomPrompts(uint32_t seed, const std::vector<int>& lens, int32_t lo,
                                           int32_t top_logprobs) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> id(lo, 511);
  std::vector<GenerateRequest> reqs;
  for (int len : lens) {
    GenerateRequest r;
    for (int i = 0; i < len; ++i) r.prompt_tokens.push_back(id(rng));
    r.max_tokens = kSteps;
    r.ignore_eos = true;
    r.sampling.temperature = 0;
    r.sampling.top_logprobs = top_logprobs;
    reqs.push_back(r);
  }
  return reqs;
}

// GemmParams::same_x: the backend reuses the previous GEMM's bf16 conversion of x only when it
// was a conversion of that same x. Each product is checked against GemmCpu.
TEST(CudaBackendGemm, SameXReusesOnlyItsOwnConversion) {
  if (!HaveDevice()) GTEST_SKIP() << "no CUDA device visible";
  auto be = CreateCudaBackend(CudaBackendOptions{});
  ASSERT_TRUE(be.ok()) << be.status().ToString();
  Backend& b = **be;
  const int64_t m = 3, k = 64, n1 = 40, n2 = 24;
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  const auto random = [&](int64_t n) {
    std::vector<float> v(n);
    for (float& x : v) x = dist(rng);
    return v;
  };
  const auto bf16 = [](const std::vector<float>& v) {
    std::vector<uint16_t> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = kernels::FloatToBf16(v[i]);
    return out;
  };
  const std::vector<float> x1 = random(m * k), x2 = random(m * k);
  const std::vector<uint16_t> w1 = bf16(random(n1 * k)), w2 = bf16(random(n2 * k));
  const auto upload = [&](const void* host, size_t bytes) {
    void* d = b.Alloc(bytes);
    b.CopyToDevice(d, host, bytes);
    return d;
  };
  const auto* dx1 = static_cast<const float*>(upload(x1.data(), x1.size() * 4));
  const auto* dx2 = static_cast<const float*>(upload(x2.data(), x2.size() * 4));
  const void* dw1 = upload(w1.data(), w1.size() * 2);
  const void* dw2 = upload(w2.data(), w2.size() * 2);
  auto* dy = static_cast<float*>(b.Alloc(m * n1 * 4));
  const auto want = [&](const std::vector<float>& x, const std::vector<uint16_t>& w, int64_t n) {
    std::vector<float> y(m * n);
    kernels::GemmCpu({x.data(), w.data(), nullptr, y.data(), m, n, k, kernels::DType::kBF16},
                     nullptr);
    return y;
  };
  const auto check = [&](const std::vector<float>& expect, int64_t n, const std::string& what) {
    std::vector<float> got(m * n);
    ASSERT_TRUE(b.CopyToHost(got.data(), dy, got.size() * 4).ok());
    for (size_t i = 0; i < got.size(); ++i) {
      // bf16 activations on the GPU, fp32 on the CPU: ~1e-2 relative of sums of 64 terms ~1.
      ASSERT_NEAR(got[i], expect[i], 5e-2) << what << " at " << i;
    }
  };
  const kernels::DType bf = kernels::DType::kBF16;
  // The same x: the second product reuses the first one's conversion.
  b.Gemm({dx1, dw1, nullptr, dy, m, n1, k, bf});
  b.Gemm({dx1, dw2, nullptr, dy, m, n2, k, bf, true});
  check(want(x1, w2, n2), n2, "same x");
  // Another x marked same_x: converted again (the pointers differ).
  b.Gemm({dx1, dw1, nullptr, dy, m, n1, k, bf});
  b.Gemm({dx2, dw2, nullptr, dy, m, n2, k, bf, true});
  check(want(x2, w2, n2), n2, "another x");
  // A product with n = 0 converts nothing: the next same_x GEMM of that x must convert it.
  b.Gemm({dx1, dw1, nullptr, dy, m, n1, k, bf});
  b.Gemm({dx2, dw1, nullptr, dy, m, 0, k, bf});
  b.Gemm({dx2, dw2, nullptr, dy, m, n2, k, bf, true});
  check(want(x2, w2, n2), n2, "after an empty product");
  for (const void* p : {static_cast<const void*>(dx1), static_cast<const void*>(dx2), dw1, dw2,
                        static_cast<const void*>(dy)}) {
    b.Free(const_cast<void*>(p));
  }
}

// CudaBackendOptions::l2_prefetch_bytes: decode attention's L2 prefetch hint is cut to the
// option (its first range first), each range to whole 16-byte units from its first 16-byte
// aligned byte, and dropped when the option is 0; the output is the same either way (on the
// GPU the bulk prefetches of the cut ranges really run). Under emulation the prefetched pieces
// are recorded and must cover exactly the cut ranges.
TEST(CudaBackendAttention, L2PrefetchHintCutToTheOption) {
  if (!HaveDevice()) GTEST_SKIP() << "no CUDA device visible";
  const int64_t d = 64, tpb = 16, len = 40, q_heads = 4, blocks = 3;
  const kernels::KvPoolView host_view{nullptr, kernels::DType::kBF16, 1, 1, tpb, d};
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<uint16_t> pool(blocks * host_view.block_elems());
  for (uint16_t& x : pool) x = kernels::FloatToBf16(dist(rng));
  std::vector<float> q(q_heads * d);
  for (float& x : q) x = dist(rng);
  const std::vector<int32_t> table = {2, 0, 1}, first = {0, 16, 32}, lens = {len}, seq = {0},
                             pos = {len - 1};
  kernels::PagedAttentionParams p{.q = q.data(),
                                  .q_seq = seq.data(),
                                  .q_pos = pos.data(),
                                  .kv = host_view,
                                  .layer = 0,
                                  .block_tables = table.data(),
                                  .block_first_pos = first.data(),
                                  .kv_lens = lens.data(),
                                  .max_blocks_per_seq = blocks,
                                  .num_seqs = 1,
                                  .num_q_tokens = 1,
                                  .num_q_heads = q_heads,
                                  .num_kv_heads = 1,
                                  .head_dim = d,
                                  .scale = 0.125f,
                                  .out = nullptr,
                                  .lse = nullptr,
                                  .kv_split_tokens = 0};
  std::vector<float> want(q_heads * d), want_lse(q_heads);
  p.kv.base = pool.data();
  p.out = want.data();
  p.lse = want_lse.data();
  kernels::PagedAttentionCpu(p, nullptr, nullptr);

#ifdef HELIX_CUDA_EMULATION
  std::vector<std::pair<uintptr_t, unsigned>> pieces;
  {
    std::lock_guard<std::mutex> lock(helix_emu::g_prefetch_mu);
    helix_emu::g_prefetch_hook = [&](const void* at, unsigned n) {
      pieces.emplace_back(reinterpret_cast<uintptr_t>(at), n);
    };
  }
  struct Unhook {
    ~Unhook() {
      std::lock_guard<std::mutex> lock(helix_emu::g_prefetch_mu);
      helix_emu::g_prefetch_hook = nullptr;
    }
  } unhook;
#endif
  for (const int64_t cap : {int64_t{0}, int64_t{10000}, int64_t{1} << 20}) {
    CudaBackendOptions bo;
    bo.l2_prefetch_bytes = cap;
    auto be = CreateCudaBackend(bo);
    ASSERT_TRUE(be.ok()) << be.status().ToString();
    Backend& b = **be;
    const auto upload = [&](const void* host, size_t bytes) {
      void* dev = b.Alloc(bytes);
      b.CopyToDevice(dev, host, bytes);
      return dev;
    };
    kernels::PagedAttentionParams dp = p;
    dp.kv.base = upload(pool.data(), pool.size() * 2);
    dp.q = static_cast<const float*>(upload(q.data(), q.size() * 4));
    dp.q_seq = static_cast<const int32_t*>(upload(seq.data(), 4));
    dp.q_pos = static_cast<const int32_t*>(upload(pos.data(), 4));
    dp.block_tables = static_cast<const int32_t*>(upload(table.data(), 12));
    dp.block_first_pos = static_cast<const int32_t*>(upload(first.data(), 12));
    dp.kv_lens = static_cast<const int32_t*>(upload(lens.data(), 4));
    dp.out = static_cast<float*>(b.Alloc(want.size() * 4));
    dp.lse = static_cast<float*>(b.Alloc(want_lse.size() * 4));
    // Ranges of a device buffer: 8000 bytes from byte 8 (not 16-byte aligned), 4096 from 8192.
    auto* buf = static_cast<unsigned char*>(b.Alloc(16384));
    dp.l2_prefetch[0] = buf + 8;
    dp.l2_prefetch_bytes[0] = 8000;
    dp.l2_prefetch[1] = buf + 8192;
    dp.l2_prefetch_bytes[1] = 4096;
    const size_t ws_bytes = b.PagedAttentionWorkspaceBytes(dp);
    void* ws = ws_bytes > 0 ? b.Alloc(ws_bytes) : nullptr;
    b.PagedAttention(dp, ws);
    std::vector<float> got(want.size());
    ASSERT_TRUE(b.CopyToHost(got.data(), dp.out, got.size() * 4).ok()) << "cap " << cap;
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_NEAR(got[i], want[i], 2e-5) << "cap " << cap << " at " << i;
    }
#ifdef HELIX_CUDA_EMULATION
    // Expected: from buf + 16, 8000 - 8 bytes cut to 7984 (and to the cap); then the rest of
    // the cap from buf + 8192.
    const auto at = reinterpret_cast<uintptr_t>(buf);
    const int64_t first_n = std::min<int64_t>(cap, 7992) / 16 * 16;
    const int64_t second_n = std::min<int64_t>(cap - first_n, 4096) / 16 * 16;
    std::sort(pieces.begin(), pieces.end());
    uintptr_t next = at + 16;
    int64_t seen[2] = {0, 0};
    for (const auto& [start, n] : pieces) {
      const int r = start >= at + 8192 ? 1 : 0;
      if (r == 1 && seen[1] == 0) next = at + 8192;
      EXPECT_EQ(start, next) << "cap " << cap << ": a gap or an overlap";
      next = start + n;
      seen[r] += n;
    }
    EXPECT_EQ(seen[0], first_n) << "cap " << cap;
    EXPECT_EQ(seen[1], second_n) << "cap " << cap;
    pieces.clear();
#endif
    for (const void* ptr :
         {static_cast<const void*>(dp.kv.base), static_cast<const void*>(dp.q),
          static_cast<const void*>(dp.q_seq), static_cast<const void*>(dp.q_pos),
          static_cast<const void*>(dp.block_tables), static_cast<const void*>(dp.block_first_pos),
          static_cast<const void*>(dp.kv_lens), static_cast<const void*>(dp.out),
          static_cast<const void*>(dp.lse), static_cast<const void*>(buf),
          static_cast<const void*>(ws)}) {
      if (ptr != nullptr) b.Free(const_cast<void*>(ptr));
    }
  }
}

// Uploads run on a stream of their own: FenceUploads must order the ops queued after it behind
// them (a device copy right after a large upload reads the uploaded bytes, not what was there),
// and UploadsDone must not say done before the bytes are on the device.
TEST(CudaBackendUploads, FenceOrdersLaterOpsBehindUploads) {
  if (!HaveDevice()) GTEST_SKIP() << "no CUDA device visible";
  auto be = CreateCudaBackend(CudaBackendOptions{});
  ASSERT_TRUE(be.ok()) << be.status().ToString();
  Backend& b = **be;
  constexpr size_t kWords = 64u << 20;  // 256 MiB: the upload takes milliseconds
  constexpr size_t kBytes = kWords * sizeof(uint32_t);
  auto* host = static_cast<uint32_t*>(b.AllocHost(kBytes));
  auto* back = static_cast<uint32_t*>(b.AllocHost(kBytes));
  void* up = b.Alloc(kBytes);
  void* copy = b.Alloc(kBytes);
  ASSERT_TRUE(host != nullptr && back != nullptr && up != nullptr && copy != nullptr);
  for (int round = 0; round < 3; ++round) {
    for (size_t i = 0; i < kWords; ++i) host[i] = static_cast<uint32_t>(i * 2654435761u) + round;
    b.Zero(up, kBytes);
    b.Zero(copy, kBytes);
    ASSERT_TRUE(b.Sync().ok());
    b.Upload(up, host, kBytes);
    const uint64_t mark = b.FenceUploads();
    b.CopyDevice(copy, up, kBytes);  // on the ops' stream: must see the upload
    ASSERT_TRUE(b.CopyToHost(back, copy, kBytes).ok());
    ASSERT_TRUE(b.UploadsDone(mark, /*wait=*/false));  // the ops waited for it
    size_t bad = 0;
    for (size_t i = 0; i < kWords; ++i) bad += back[i] != host[i];
    ASSERT_EQ(bad, 0u) << "round " << round << ": the copy ran before the upload it was fenced on";
  }
  // UploadsDone(wait) returns once the bytes are there: the host buffer may change after it.
  // Rewritten from the end (the copy's last bytes) so that an early return shows.
  for (size_t i = 0; i < kWords; ++i) host[i] = static_cast<uint32_t>(i * 2654435761u) + 7;
  b.Zero(up, kBytes);
  ASSERT_TRUE(b.Sync().ok());
  b.Upload(up, host, kBytes);
  ASSERT_TRUE(b.UploadsDone(b.FenceUploads(), /*wait=*/true));
  for (size_t i = kWords; i-- > 0;) host[i] = ~host[i];
  ASSERT_TRUE(b.CopyToHost(back, up, kBytes).ok());
  size_t changed = 0;
  for (size_t i = 0; i < kWords; ++i) {
    changed += back[i] != static_cast<uint32_t>(i * 2654435761u) + 7;
  }
  EXPECT_EQ(changed, 0u) << "UploadsDone(wait) returned before the upload had read its source";
  b.Free(up);
  b.Free(copy);
  b.FreeHost(host);
  b.FreeHost(back);
  EXPECT_TRUE(b.Sync().ok());
}

// A worker rank (runs only when spawned by SpawnWorkers): exits 0 after a clean shutdown.
TEST(CudaBackendWorker, Run) {
  const char* id = std::getenv("HELIX_CUDA_TEST_WORKER");
  if (id == nullptr) GTEST_SKIP() << "only as a rank spawned by the tests below";
  std::optional<EngineOptions> o = WorkerOptions(id);
  int code = 2;
  if (o) {
    o->rank = std::atoi(std::getenv("HELIX_CUDA_TEST_RANK"));
    o->leader_port = std::atoi(std::getenv("HELIX_CUDA_TEST_PORT"));
    auto e = Engine::Create(*o);
    if (e.ok()) {
      const Status s = (*e)->RunWorker();
      if (!s.ok()) std::fprintf(stderr, "worker %s: %s\n", id, s.ToString().c_str());
      code = s.ok() ? 0 : 3;
    } else {
      std::fprintf(stderr, "worker %s: %s\n", id, e.status().ToString().c_str());
    }
  }
  std::fflush(stderr);
  _exit(code);
}

// Prompts of different lengths (one shorter than a block at the small block sizes, one
// spanning several), greedy; with the sampled token's logprob and the top 3 unless graphs are
// tested (a row with logprobs is sampled on the host, so its step does not run as a graph).
std::vector<GenerateRequest> Batch(int max_tokens, bool logprobs) {
  std::vector<GenerateRequest> reqs;
  for (const char* p :
       {"Once upon a time", "Lily", "The little dog ran to the park and saw a big"}) {
    GenerateRequest r;
    r.prompt = p;
    r.max_tokens = max_tokens;
    r.sampling.temperature = 0;
    r.sampling.top_logprobs = logprobs ? 3 : -1;
    reqs.push_back(r);
  }
  return reqs;
}

// Seeded sampling on the device (temperature with top-k / top-p / min-p, and a greedy row);
// unless graphs are tested also a row with logprobs and one with a repetition penalty, which
// the host samples.
std::vector<GenerateRequest> SampledBatch(int max_tokens, bool host_rows) {
  std::vector<GenerateRequest> reqs(host_rows ? 5 : 3);
  const char* prompts[] = {"Once upon a time", "Lily",
                           "The little dog ran to the park and saw a big", "Tom had a red ball",
                           "One day"};
  for (size_t i = 0; i < reqs.size(); ++i) {
    reqs[i].prompt = prompts[i];
    reqs[i].max_tokens = max_tokens;
    reqs[i].sampling.seed = 100 + i;
  }
  reqs[0].sampling.temperature = 0.8f;
  reqs[0].sampling.top_k = 40;
  reqs[0].sampling.top_p = 0.9f;
  reqs[1].sampling.temperature = 1.0f;
  reqs[1].sampling.min_p = 0.05f;
  reqs[2].sampling.temperature = 0;  // greedy on the device
  if (host_rows) {
    reqs[3].sampling.temperature = 0.7f;
    reqs[3].sampling.top_logprobs = 2;
    reqs[4].sampling.temperature = 0.9f;
    reqs[4].sampling.repetition_penalty = 1.3f;
  }
  return reqs;
}

std::vector<GenerateRequest> BatchFor(const Case& c) {
  // (Greedy with device collectives: no logprobs, so that its rows are picked on the device;
  // the sampled batch has rows for the device and, unless graphs are tested, for the host.)
  return c.sampled ? SampledBatch(kSteps, !c.graphs) : Batch(kSteps, !c.graphs && !c.device_comm);
}

// With bf16 weights the GPU rounds a GEMM's activations to bf16 (cuBLAS takes both inputs in one
// type) while the CPU keeps them in fp32, so greedy decoding may part at a near-tie. Each request
// is compared up to its first divergent step (printed): the sampled token's logprob within tol
// where the request asked for logprobs (with ranks > 1, the `ranks` largest logprobs, by rank),
// and at the divergent step a near tie (ExpectWithinBf16 below).
void ExpectWithinBf16(const std::string& label, const std::vector<RunResult>& got,
                      const std::vector<RunResult>& want, double tol, size_t ranks = 1) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_TRUE(got[i].error.ok()) << got[i].error.ToString();
    ASSERT_EQ(got[i].tokens.size(), want[i].tokens.size());
    size_t first_diff = got[i].tokens.size();
    double worst = 0;
    for (size_t t = 0; t < got[i].tokens.size(); ++t) {
      if (t < got[i].top_logprobs.size() && t < want[i].top_logprobs.size()) {
        // The first entry of top_logprobs is the top-1: the greedy token.
        const size_t n =
            std::min({ranks, got[i].top_logprobs[t].size(), want[i].top_logprobs[t].size()});
        for (size_t k = 0; k < n; ++k) {
          const double d =
              std::fabs(got[i].top_logprobs[t][k].second - want[i].top_logprobs[t][k].second);
          worst = std::isfinite(d) ? std::max(worst, d) : INFINITY;  // a NaN fails too
        }
      }
      if (got[i].tokens[t] != want[i].tokens[t]) {
        first_diff = t;
        // Tokens may part only at a near tie: the token chosen here is among the CPU's top
        // logprobs at this step, within tol of the CPU's own choice (checked where the request
        // asked for more than one).
        if (t < want[i].top_logprobs.size() && want[i].top_logprobs[t].size() > 1) {
          const auto& top = want[i].top_logprobs[t];
          double gap = INFINITY;
          for (const auto& [id, lp] : top) {
            if (id == got[i].tokens[t]) gap = top[0].second - lp;
          }
          EXPECT_LT(gap, tol) << "request " << i << " step " << t << ": token " << got[i].tokens[t]
                              << " where the CPU chose " << top[0].first
                              << (std::isinf(gap) ? ", not among its top logprobs" : "");
        }
        break;
      }
    }
    std::printf("%s request %zu: %s; worst top-%zu logprob difference %.2e before it\n",
                label.c_str(), i,
                first_diff == got[i].tokens.size()
                    ? "greedy tokens identical for every step"
                    : ("first divergent step " + std::to_string(first_diff)).c_str(),
                ranks, worst);
    EXPECT_LT(worst, tol) << "request " << i;
  }
}

// Tokens and text equal; with tol >= 0 also the top logprobs (ids equal, values within tol).
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
    const std::string why =
        Unready(Shared() + "/models/stories260K/stories260K.bin", "stories260K (HELIX_SHARED_DIR)");
    if (!why.empty()) GTEST_SKIP() << why;
  }
};

TEST_P(CudaBackendTest, SameTokensAsCpu) {
  const Case c = GetParam();
  const std::vector<int> join_at = {0, 0, 3};  // the third joins mid-flight
  std::vector<RunResult> got;
  EngineOptions lead = CudaOptions(c);
  const std::vector<pid_t> workers = StartWorkers("stories/" + c.name, &lead);
  const auto backends = WatchBackends(&lead);
  {
    auto e = Engine::Create(lead);
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    got = RunAll(e->get(), BatchFor(c), join_at);
    EXPECT_EQ((*e)->kv_stats().free_blocks, (*e)->kv_stats().total_blocks);
    EXPECT_EQ((*e)->kv_stats().preemptions > 0, c.preempt) << (*e)->kv_stats().preemptions;
    if (c.graphs && !c.sampled && c.tp * c.cp == 1) {
      // Greedy steps without logprobs (graphs) pick on the device: the greedy argmax took the
      // chunked kernels exactly when asked.
      ASSERT_EQ(backends->size(), 1u);
      const Backend& b = *backends->front();
      EXPECT_EQ(b.ops_queued("ArgmaxChunkedCuda") > 0, c.split_argmax) << c.name;
      EXPECT_EQ(b.ops_queued("ArgmaxCuda") > 0, !c.split_argmax) << c.name;
    }
    if (c.device_comm) {
      // The leader picked the tokens on the device from the logits gathered there.
      ASSERT_GE(backends->size(), 1u);
      const char* op = c.sampled ? "SampleCuda" : "ArgmaxCuda";
      EXPECT_GT(backends->front()->ops_queued(op), 0) << c.name << ": " << op;
    }
    if (c.weight_dtype == kernels::DType::kBF16) {
      // The decode GEMMs took the GEMV (and gate|up its fused SiLU·mul) exactly when asked.
      ASSERT_EQ(backends->size(), 1u);
      // One row: q|k|v and gate|up with their norms folded in, o_proj adding into the stream
      // (stories260K's down projection, k = 172, is no GEMV shape); more rows: the norms as
      // kernels, gate|up with SiLU·mul; the classifier plain.
      const Backend& b = *backends->front();
      if (c.norm_sums) {
        // o_proj leaves the partials in every step, and gate|up always takes its norm from
        // them (no RMSNorm kernel and no norm summed by the GEMV for it); with gemv_rope the
        // first layer's q|k|v (its norm folded in) also rotates and writes the K/V.
        ExpectGemvUse(b, c.gemv,
                      {c.gemv_rope ? "GemvNormRopeKvCuda" : "GemvNormCuda", "GemvAddSumsCuda",
                       "GemvSumsNormSiluMulCuda"},
                      c.name);
        EXPECT_EQ(b.ops_queued("GemvNormRopeKvCuda") > 0, c.gemv_rope) << c.name;
        // The later layers' q|k|v (after a norm kernel) rotate and write the K/V themselves too.
        EXPECT_EQ(b.ops_queued("GemvRopeKvCuda") > 0, c.gemv_rope) << c.name;
        EXPECT_GT(b.ops_queued("GemvCuda"), 0) << c.name;  // the classifier
        if (c.gemv_rope) {
          EXPECT_EQ(b.ops_queued("GemvNormCuda"), 0) << c.name;
        }
        EXPECT_EQ(b.ops_queued("GemvAddCuda"), 0) << c.name;
        EXPECT_EQ(b.ops_queued("GemvNormSiluMulCuda"), 0) << c.name;
        EXPECT_EQ(b.ops_queued("GemvSiluMulCuda"), 0) << c.name;
      } else {
        ExpectGemvUse(
            b, c.gemv,
            {"GemvCuda", "GemvNormCuda", "GemvAddCuda", "GemvNormSiluMulCuda", "GemvSiluMulCuda"},
            c.name);
        EXPECT_EQ(b.ops_queued("GemvAddSumsCuda"), 0) << c.name;
        EXPECT_EQ(b.ops_queued("GemvRopeKvCuda"), 0) << c.name;
      }
    }
    if (c.graphs) {
      // Every bucket runs once eagerly, then as a captured graph: most steps are replays.
      const ForwardTimings& t = (*e)->model_timings();
      EXPECT_GE(t.graph_captures, 1);
      EXPECT_GE(t.graph_replays, kSteps / 2) << "of " << t.calls << " steps";
    }
  }
  for (int code : testing::Reap(workers, std::chrono::milliseconds(30000))) EXPECT_EQ(code, 0);

  auto cpu = Engine::Create(Options(c));
  ASSERT_TRUE(cpu.ok()) << cpu.status().ToString();
  std::vector<GenerateRequest> cpu_reqs = BatchFor(c);
  if (c.weight_dtype == kernels::DType::kBF16) {
    // The CPU's top logprobs even where the GPU run asks for none (graphs): a divergent step
    // must still be a near tie (ExpectWithinBf16).
    for (GenerateRequest& r : cpu_reqs) r.sampling.top_logprobs = 3;
  }
  const std::vector<RunResult> want = RunAll(cpu->get(), cpu_reqs, join_at);
  if (c.weight_dtype == kernels::DType::kBF16) {
    ExpectWithinBf16(c.name, got, want, 5e-2);
    return;
  }
  const bool exact = c.kv_dtype == kernels::DType::kF32 && !c.weight_dtype;
  ExpectSame(got, want, exact ? 1e-4 : 2e-2);
}

INSTANTIATE_TEST_SUITE_P(Stories, CudaBackendTest, ::testing::ValuesIn(StoriesCases()),
                         [](const auto& info) { return info.param.name; });

// Disaggregated on the CUDA backend: a context engine on it (TP = CP = 1) exports its device
// blocks through a pinned mirror, a CP 2 generation group on it pulls them into pinned staging
// and uploads each block as its gets finish; the tokens equal the CPU engine's aggregated
// decoding. With TP 2 on the generation side each block arrives as one get per (layer, plane).
class CudaBackendDisaggTest : public CudaBackendTest {};

TEST_P(CudaBackendDisaggTest, ContextServerIntoCpTwoGroupMatchesCpu) {
  setenv("UCX_NET_DEVICES", "lo", 0);
  const Case c = GetParam();
  EngineOptions go = CudaOptions(c);
  const std::vector<pid_t> workers = StartWorkers("stories/" + c.name, &go);
  std::vector<RunResult> got;
  std::vector<GenerateRequest> reqs = Batch(kSteps, false);
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
      const std::string id = "pf" + std::to_string(i);
      reqs[i].prompt_tokens = (*gen)->tokenizer().Encode(reqs[i].prompt, true);
      const testing::Prefilled pf = testing::Prefill(ctx->get(), reqs[i].prompt_tokens, id);
      ASSERT_GE(pf.first_token, 0);
      reqs[i].kv_source = pf.source;
      reqs[i].first_token = pf.first_token;
      reqs[i].on_kv_done = [e = ctx->get(), id](const Status& s) {
        EXPECT_TRUE(s.ok()) << s.ToString();
        EXPECT_TRUE(e->ReleaseRetained(id));
      };
    }
    got = RunAll(gen->get(), reqs);
    EXPECT_EQ((*gen)->disagg_stats().transfers_done, reqs.size());
    EXPECT_EQ((*gen)->kv_stats().free_blocks, (*gen)->kv_stats().total_blocks);
    (*ctx)->ExpireLeases();
    EXPECT_EQ((*ctx)->kv_stats().free_blocks, (*ctx)->kv_stats().total_blocks);
    EXPECT_EQ((*ctx)->disagg_stats().export_blocks_free,
              (*ctx)->disagg_stats().export_blocks_total);
  }
  for (int code : testing::Reap(workers, std::chrono::milliseconds(30000))) EXPECT_EQ(code, 0);

  auto cpu = Engine::Create(Options(c));
  ASSERT_TRUE(cpu.ok()) << cpu.status().ToString();
  const std::vector<RunResult> want = RunAll(cpu->get(), Batch(kSteps, false));
  ExpectSame(got, want, -1);  // the first token's logprobs stay on the context server
}

INSTANTIATE_TEST_SUITE_P(Stories, CudaBackendDisaggTest, ::testing::ValuesIn(DisaggCases()),
                         [](const auto& info) { return info.param.name; });

// A context server on a device backend hands retained KV out of a bounded pinned buffer: the
// device blocks are free as soon as a request is retained; a request whose prompt does not fit
// in the free part waits (its room is reserved at admission, so the hand-off never fails after
// the prefill) and runs once a lease is released; one larger than the whole buffer is refused
// at once, naming the setting; nothing leaks.
TEST_F(CudaBackendTest, ExportBufferBoundsRetainedKv) {
  setenv("UCX_NET_DEVICES", "lo", 0);
  Case c = DisaggCases()[0];  // f32, 4 tokens per block
  c.tp = c.cp = 1;
  EngineOptions co = CudaOptions(c);
  co.export_kv = true;
  co.server_id = "cuda-ctx-buffer-" + std::to_string(getpid());
  co.kv_export_buffer_tokens = 14;  // 4 blocks
  auto ctx = Engine::Create(co);
  ASSERT_TRUE(ctx.ok()) << ctx.status().ToString();
  Engine& e = **ctx;
  EXPECT_EQ(e.disagg_stats().export_blocks_total, 4);
  std::map<std::string, TokenEvent> done;
  // Submits `tokens` prompt tokens with retain_kv; the finish event lands in done[id].
  auto submit = [&](const std::string& id, int tokens) {
    GenerateRequest p;
    p.id = id;
    for (int i = 0; i < tokens; ++i) p.prompt_tokens.push_back(10 + i);
    p.max_tokens = 1;
    p.ignore_eos = true;
    p.retain_kv = true;
    p.sampling.temperature = 0;
    p.sink = [&done, id](const TokenEvent& ev) {
      if (ev.finished) done[id] = ev;
    };
    return e.Submit(p);
  };
  auto steps = [&](int n) {
    for (int i = 0; i < n; ++i) e.Step();
  };
  ASSERT_TRUE(submit("a", 10).ok());  // 3 blocks
  steps(5);
  ASSERT_EQ(done.count("a"), 1u);
  ASSERT_TRUE(done["a"].error.ok()) << done["a"].error.ToString();
  EXPECT_EQ(done["a"].kv_block_addresses.size(), 3u);
  EXPECT_EQ(e.kv_stats().free_blocks, e.kv_stats().total_blocks);  // device blocks freed
  EXPECT_EQ(e.disagg_stats().export_blocks_free, 1);
  const StatusOr<std::string> again = submit("a", 4);  // its id holds retained KV
  ASSERT_FALSE(again.ok());
  EXPECT_NE(again.status().message().find("unique ids"), std::string::npos)
      << again.status().ToString();
  ASSERT_TRUE(submit("b", 9).ok());  // 3 blocks, 1 free: waits
  steps(5);
  EXPECT_EQ(done.count("b"), 0u) << "b ran without room to hand its KV off";
  EXPECT_EQ(e.kv_stats().free_blocks, e.kv_stats().total_blocks);
  EXPECT_EQ(e.disagg_stats().export_blocks_free, 1);
  // Larger than the whole buffer: refused now.
  const StatusOr<std::string> big = submit("big", 17);  // 5 blocks
  ASSERT_FALSE(big.ok());
  EXPECT_NE(big.status().message().find("max_tokens_in_buffer"), std::string::npos)
      << big.status().ToString();
  EXPECT_TRUE(e.ReleaseRetained("a"));
  steps(5);  // the release frees a's blocks, then b runs
  ASSERT_EQ(done.count("b"), 1u);
  ASSERT_TRUE(done["b"].error.ok()) << done["b"].error.ToString();
  EXPECT_EQ(done["b"].kv_block_addresses.size(), 3u);
  EXPECT_EQ(e.disagg_stats().export_blocks_free, 1);
  // A request that fails before its hand-off gives its reserved room back.
  GenerateRequest bad;
  bad.id = "cancelled";
  for (int i = 0; i < 4; ++i) bad.prompt_tokens.push_back(10 + i);
  bad.max_tokens = 3;
  bad.ignore_eos = true;
  bad.retain_kv = true;
  ASSERT_TRUE(e.Submit(bad).ok());
  steps(1);  // admitted: its block is reserved, one token out
  EXPECT_EQ(e.disagg_stats().export_blocks_free, 0);
  e.Cancel("cancelled");
  steps(2);
  EXPECT_EQ(e.disagg_stats().export_blocks_free, 1);
  EXPECT_TRUE(e.ReleaseRetained("b"));
  steps(2);
  EXPECT_EQ(e.disagg_stats().export_blocks_free, 4);
  EXPECT_EQ(e.kv_stats().free_blocks, e.kv_stats().total_blocks);
  EXPECT_EQ(e.disagg_stats().retained_requests, 0);
}

// DeepSeek (MLA + MoE) tiny models from the test_models fixture on the CUDA backend: the latent
// cache, absorbed decode with the yarn RoPE table on the device, the combine in the latent space
// and the MoE (routing on the host, experts on the device) give the CPU engine's tokens.
class CudaBackendMlaTest : public ::testing::TestWithParam<std::tuple<std::string, int, int>> {
 protected:
  void SetUp() override {
    const std::string why = Unready(ModelsDir() + "/deepseek_v3_tiny/config.json",
                                    "the DeepSeek test models (HELIX_TEST_MODELS_DIR)");
    if (!why.empty()) GTEST_SKIP() << why;
  }
};

TEST_P(CudaBackendMlaTest, SameTokensAsCpu) {
  const auto [model, tp, cp] = GetParam();
  const std::vector<GenerateRequest> reqs = RandomPrompts(3, {1, 6, 21}, 1, 3);
  EngineOptions co = MlaOptions(model, tp, cp, true);
  const std::vector<pid_t> workers =
      StartWorkers("mla/" + model + "/" + std::to_string(tp) + "/" + std::to_string(cp), &co);
  std::vector<RunResult> got;
  {
    auto e = Engine::Create(co);
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    got = RunAll(e->get(), reqs);
  }
  for (int code : testing::Reap(workers, std::chrono::milliseconds(30000))) EXPECT_EQ(code, 0);
  auto cpu = Engine::Create(MlaOptions(model, 1, 1, false));
  ASSERT_TRUE(cpu.ok()) << cpu.status().ToString();
  ExpectSame(got, RunAll(cpu->get(), reqs), 1e-4);
}

INSTANTIATE_TEST_SUITE_P(DeepSeek, CudaBackendMlaTest,
                         ::testing::Values(std::make_tuple("deepseek_v3_tiny", 1, 1),
                                           std::make_tuple("deepseek_v2_tiny", 2, 2)),
                         [](const auto& info) {
                           return std::get<0>(info.param) + "_tp" +
                                  std::to_string(std::get<1>(info.param)) + "_cp" +
                                  std::to_string(std::get<2>(info.param));
                         });

// The GGUF models of the test_models fixture (BF16 weights as stored, Q8_0 dequantized to bf16,
// and Qwen2 in F32, whose q/k/v biases are packed with the weights on the GPU) on the CUDA
// backend: greedy decoding agrees with the CPU engine within bf16 tolerance. On a
// GPU the bf16 GEMMs also round the activations to bf16 (the CPU keeps them in fp32), so a near
// tie may flip a token: the test reports the first step where the tokens differ and checks the
// logprobs of every step up to it (after it the two continue from different text).
class CudaBackendGgufTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    const std::string why = Unready(ModelsDir() + "/" + GetParam().substr(0, GetParam().find(':')),
                                    GetParam() + " (HELIX_TEST_MODELS_DIR)");
    if (!why.empty()) GTEST_SKIP() << why;
  }
};

TEST_P(CudaBackendGgufTest, GreedyWithinBf16Tolerance) {
  const std::string model = GetParam().substr(0, GetParam().find(':'));
  const bool cublas = GetParam().find(":cublas") != std::string::npos;
  // ":fp32attn": attention's math on the CUDA cores (attention_tensor_cores off); otherwise the
  // default, the tensor cores (these models' head dim is 64, their KV bf16).
  const bool mma = GetParam().find(":fp32attn") == std::string::npos;
  // ":sums": CudaBackendOptions::norm_sums (each norm after the first from the partial sums of
  // squares of the product before it).
  const bool sums = GetParam().find(":sums") != std::string::npos;
  // ":rope": CudaBackendOptions::gemv_rope_kv (RoPE and the K/V write in the q|k|v GEMV).
  const bool rope = GetParam().find(":rope") != std::string::npos;
  // ":l2pf": CudaBackendOptions::l2_prefetch_bytes (decode attention prefetching the weights of
  // the products after it into L2; under emulation the prefetches are counted).
  const bool l2pf = GetParam().find(":l2pf") != std::string::npos;
  // ":ekv": CudaBackendOptions::attention_early_kv (decode attention's first KV copies before it
  // waits for the kernel before it; under emulation the copies before the wait are counted).
  const bool ekv = GetParam().find(":ekv") != std::string::npos;
  EngineOptions o;
  o.model_path = ModelsDir() + "/" + model;
  if (model.rfind("qwen2", 0) == 0) {
    o.tokenizer_path = Shared() + "/models/stories260K/tok512.bin";  // it carries none
  }
  o.num_threads = 1;
  o.tokens_per_block = 8;
  o.max_batch_size = 4;
  o.kv_max_tokens = 4 * 128;
  o.kv_dtype = kernels::DType::kBF16;
  // Qwen2 in F32: its top-1 is near certain (logprob ~0), so its 3 largest logprobs are compared,
  // within 1e-2 (fp32 weights; a missing q/k/v bias moves them by 15-24).
  const bool f32 = model.find("F32") != std::string::npos;
  // Three top logprobs each, so that a divergent step can be checked for a near tie.
  const std::vector<GenerateRequest> reqs = RandomPrompts(5, {2, 17}, 3, 3);
  auto cpu = Engine::Create(o);
  ASSERT_TRUE(cpu.ok()) << cpu.status().ToString();
  const std::vector<RunResult> want = RunAll(cpu->get(), reqs);
  // The default backend options (decode GEMMs as GemvCuda); ":cublas" with decode_gemv off,
  // so that cuBLAS reading the norms' and SiLU·mul's 16-bit copies decodes too (the Q8_0 model:
  // its weights are bf16 on the device, so it is the BF16 case's other path).
  CudaBackendOptions bo;
  bo.decode_gemv = !cublas;
  bo.attention_tensor_cores = mma;
  bo.norm_sums = sums;
  bo.gemv_rope_kv = rope;
  bo.l2_prefetch_bytes = l2pf ? int64_t{1} << 20 : 0;
  bo.attention_early_kv = ekv;
  o.backend_factory = [bo]() { return CreateCudaBackend(bo); };
  const auto backends = WatchBackends(&o);
  auto gpu = Engine::Create(o);
  ASSERT_TRUE(gpu.ok()) << gpu.status().ToString();
#ifdef HELIX_CUDA_EMULATION
  int64_t prefetched = 0;
  {
    std::lock_guard<std::mutex> lock(helix_emu::g_prefetch_mu);
    helix_emu::g_prefetch_hook = [&](const void*, unsigned n) { prefetched += n; };
  }
  helix_emu::PdlHook pdl;  // counts only: PdlEnter stays a no-op
  helix_emu::g_pdl_hook = &pdl;
#endif
  const std::vector<RunResult> got = RunAll(gpu->get(), reqs);
#ifdef HELIX_CUDA_EMULATION
  {
    std::lock_guard<std::mutex> lock(helix_emu::g_prefetch_mu);
    helix_emu::g_prefetch_hook = nullptr;
  }
  helix_emu::g_pdl_hook = nullptr;
  // Only decode attention with the option copies anything before its PdlEnter.
  if (ekv) {
    EXPECT_GT(pdl.copies.load(), 0);
  } else {
    EXPECT_EQ(pdl.copies.load(), 0);
  }
  // Each decode attention call prefetches its layer's Wo and gate|up: 128 KiB + 512 KiB here.
  if (l2pf) {
    EXPECT_GT(prefetched, 0);
    EXPECT_EQ(prefetched % (640 << 10), 0) << prefetched;
  } else {
    EXPECT_EQ(prefetched, 0);
  }
#endif
  if (model.find("BF16") != std::string::npos) {
    ASSERT_EQ(backends->size(), 1u);
    // Its steps have 2-5 rows: the GEMV without folded norms (small matrices) or cuBLAS; with
    // ":sums" the norms of up to 4 rows come with the products adding into the stream (o_proj
    // and the down projection), the first layer's excepted.
    if (sums && rope) {
      ExpectGemvUse(*backends->front(), true,
                    {"GemvAddSumsCuda", "GemvSumsNormRopeKvCuda", "GemvSumsNormSiluMulCuda"},
                    GetParam());
      EXPECT_EQ(backends->front()->ops_queued("GemvSumsNormCuda"), 0);
    } else if (sums) {
      ExpectGemvUse(*backends->front(), true,
                    {"GemvAddSumsCuda", "GemvSumsNormCuda", "GemvSumsNormSiluMulCuda"}, GetParam());
    } else {
      ExpectGemvUse(*backends->front(), !cublas, {"GemvCuda", "GemvSiluMulCuda"}, GetParam());
      EXPECT_EQ(backends->front()->ops_queued("GemvAddSumsCuda"), 0);
    }
  }
  // Attention on the tensor cores, decode and prefill, exactly when asked.
  ASSERT_EQ(backends->size(), 1u);
  const Backend& b = *backends->front();
  for (const char* op : {"PagedAttentionCudaMma", "PagedAttentionCudaMmaPrefill"}) {
    if (mma) {
      EXPECT_GT(b.ops_queued(op), 0) << op;
    } else {
      EXPECT_EQ(b.ops_queued(op), 0) << op;
    }
  }
  if (mma) {
    EXPECT_EQ(b.ops_queued("PagedAttentionCuda"), 0);
  } else {
    EXPECT_GT(b.ops_queued("PagedAttentionCuda"), 0);
  }
  for (const RunResult& r : got) {
    ASSERT_EQ(r.top_logprobs.size(), r.tokens.size()) << "every step has its logprobs";
  }
  ExpectWithinBf16(GetParam(), got, want, f32 ? 1e-2 : 5e-2, f32 ? 3 : 1);
}

INSTANTIATE_TEST_SUITE_P(Gguf, CudaBackendGgufTest,
                         ::testing::Values("llama_BF16.gguf", "llama_BF16.gguf:sums:rope:ekv",
                                           "llama_BF16.gguf:l2pf", "llama_Q8_0.gguf:cublas",
                                           "qwen2_F32.gguf",  // q/k/v biases
                                           "llama_Q8_0.gguf:cublas:fp32attn"),
                         [](const auto& info) {
                           std::string n = info.param;
                           for (char& ch : n) {
                             if (ch == '.' || ch == ':') ch = '_';
                           }
                           return n;
                         });

}  // namespace
}  // namespace helix
