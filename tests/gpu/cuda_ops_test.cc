// Cross-backend op test (after llama.cpp's test-backend-ops): every CUDA op on random inputs
// with fixed seeds against the CPU reference in kernels/; inf/NaN positions must agree, then
// a per-dtype tolerance. Every test skips, saying why, where no CUDA device is visible.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "engine/model/gguf/dequant.h"
#include "engine/model/gguf/ggml_type.h"
#include "engine/sampler/sampler.h"
#include "kernels/attention.h"
#include "kernels/cuda/attention_cuda.h"
#include "kernels/cuda/dequant_cuda.h"
#include "kernels/cuda/gemm_cuda.h"
#include "kernels/cuda/gemv_cuda.h"
#include "kernels/cuda/mla_attention_cuda.h"
#include "kernels/cuda/ops_cuda.h"
#include "kernels/gemm.h"
#include "kernels/merge.h"
#include "kernels/mla_attention.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "kernels/silu_mul.h"
#include "kernels/test_util.h"
#include "tests/gpu/gpu_test_util.h"
#ifndef HELIX_CUDA_EMULATION
#include "kernels/cuda/cuda_check.h"
#include "tests/gpu/pdl_test_kernels.h"
#else
#include "tests/gpu/cuda_emu.h"  // helix_emu::PdlHook
#endif

namespace helix::kernels {
namespace {

using gpu_testing::DeviceBuffer;
using testing::DecodeSeqs;
using testing::ExpectAllNear;
using testing::PagedSeqs;
using testing::RandomVector;

constexpr float kInf = std::numeric_limits<float>::infinity();
// fp32 results computed from the same inputs in a different order.
constexpr double kF32Tol = 2e-5;

class CudaOpsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string why = gpu_testing::NoGpuReason();
    if (!why.empty()) {
      GTEST_SKIP() << why;
    }
  }
};

std::vector<double> ToDouble(const std::vector<float>& v) { return {v.begin(), v.end()}; }

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// A test of non-finite inputs asserts that its reference output holds NaN, +inf and -inf, so
// that ExpectAllNear's check of their positions (and of the infinities' signs) is not vacuous.
template <typename T>
void ExpectAllNonFiniteKinds(const std::vector<T>& want, const std::string& what) {
  int64_t nan = 0, pos_inf = 0, neg_inf = 0;
  for (T v : want) {
    nan += std::isnan(v) ? 1 : 0;
    pos_inf += v == std::numeric_limits<T>::infinity() ? 1 : 0;
    neg_inf += v == -std::numeric_limits<T>::infinity() ? 1 : 0;
  }
  EXPECT_GT(nan, 0) << what << ": the reference has no NaN";
  EXPECT_GT(pos_inf, 0) << what << ": the reference has no +inf";
  EXPECT_GT(neg_inf, 0) << what << ": the reference has no -inf";
}

// 16-bit values of dtype dt (kF16 or kBF16) as doubles: NaN stays NaN, infinities keep their sign.
std::vector<double> LowpValues(const std::vector<uint16_t>& v, DType dt) {
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    out[i] = dt == DType::kF16 ? HalfToFloat(v[i]) : Bf16ToFloat(v[i]);
  }
  return out;
}

// Two 16-bit copies compared as values (NaN payloads and signs may differ between a CPU and a
// GPU; positions may not): finite values within rtol, one unit of the type (bf16 ~1e-2 relative).
void ExpectLowpNear(const std::vector<uint16_t>& want, const std::vector<uint16_t>& got, DType dt,
                    double rtol, const std::string& what) {
  ASSERT_EQ(want.size(), got.size()) << what;
  const std::vector<double> g = LowpValues(got, dt);
  const std::vector<float> gf(g.begin(), g.end());
  ExpectAllNear(LowpValues(want, dt), gf.data(), rtol, kF32Tol, what);
}

// Cases the CPU emulation (cuda_ops_emu_test) cannot run, and why (the emulated attention is
// also checked by attention_emu_test).
#define SKIP_IF_EMULATED(why)          \
  if (gpu_testing::kEmulated) {        \
    GTEST_SKIP() << "emulation: " why; \
  }

// The device's compute capability major (the emulation's device is an sm_90 one: its
// kernels run every path an H100 runs), -1 when it cannot be asked.
int DeviceMajor() {
  if (gpu_testing::kEmulated) return 9;
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    return -1;
  }
  return major;
}

uint16_t ToStorage(DType t, float f) { return t == DType::kF16 ? FloatToHalf(f) : FloatToBf16(f); }

// n random values (RandomVector's draw) rounded to the 16-bit type dt.
std::vector<uint16_t> RandomLowp(std::mt19937& rng, int64_t n, DType dt) {
  const std::vector<float> w = RandomVector(rng, n);
  std::vector<uint16_t> w16(w.size());
  StoreLowp(w.data(), n, dt, w16.data());
  return w16;
}

// ---------------------------------------------------------------------------------------------
// Attention

// A KV pool on the host and its device copy.
struct Pool {
  std::vector<unsigned char> host;
  KvPoolView view;  // host view
  int64_t blocks;

  Pool(DType dtype, int64_t layers, int64_t kv_heads, int64_t tpb, int64_t d, int64_t n)
      : view{nullptr, dtype, layers, kv_heads, tpb, d}, blocks(n) {
    host.resize(static_cast<size_t>(n * view.block_elems()) * DTypeSize(dtype));
    view.base = host.data();
  }
  void Set(int64_t i, float f) {
    if (view.dtype == DType::kF32) {
      static_cast<float*>(view.base)[i] = f;
    } else {
      static_cast<uint16_t*>(view.base)[i] = ToStorage(view.dtype, f);
    }
  }
  void FillRandom(std::mt19937& rng) {
    std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
    for (int64_t i = 0; i < blocks * view.block_elems(); ++i) {
      Set(i, dist(rng));
    }
  }
};

struct Problem : PagedSeqs {
  int64_t num_q_heads = 0, num_kv_heads = 0, head_dim = 0, layer = 0;
  std::vector<float> q;
};

// Decode queries (one per sequence, at position kv_len - 1) over sequences on shuffled blocks.
Problem DecodeBatch(const std::vector<int32_t>& lens, int64_t tpb, int64_t num_blocks,
                    std::mt19937& rng) {
  return DecodeSeqs<Problem>(lens, tpb, num_blocks, rng);
}

// Puts NaN into every slot of the pool no query may read (past kv_len in a sequence's last
// block, and blocks no table uses), so a kernel that reads them is caught.
void PoisonUnusedSlots(const Problem& pr, Pool* pool) {
  const KvPoolView& v = pool->view;
  std::vector<bool> used(pool->blocks, false);
  for (size_t s = 0; s < pr.tables.size(); ++s) {
    for (size_t j = 0; j < pr.tables[s].size(); ++j) {
      used[pr.tables[s][j]] = true;
      const int64_t n_in = std::min<int64_t>(
          v.tokens_per_block, pr.kv_lens[s] - static_cast<int64_t>(j) * v.tokens_per_block);
      for (int64_t l = 0; l < v.num_layers; ++l) {
        for (int c = 0; c < 2; ++c) {
          for (int64_t h = 0; h < v.num_kv_heads; ++h) {
            for (int64_t t = n_in; t < v.tokens_per_block; ++t) {
              for (int64_t e = 0; e < v.head_dim; ++e) {
                pool->Set(KvOffset(v, pr.tables[s][j], l, c, h, t) + e, std::nanf(""));
              }
            }
          }
        }
      }
    }
  }
  for (int64_t b = 0; b < pool->blocks; ++b) {
    if (!used[b]) {
      for (int64_t i = 0; i < v.block_elems(); ++i) {
        pool->Set(b * v.block_elems() + i, std::nanf(""));
      }
    }
  }
}

struct AttnResult {
  std::vector<float> out, lse;
};

PagedAttentionParams MakeParams(const Problem& pr, const KvPoolView& kv, const int32_t* q_seq,
                                const int32_t* q_pos, const float* q, const int32_t* tables,
                                const int32_t* firsts, const int32_t* lens, float* out, float* lse,
                                int64_t split) {
  return {.q = q,
          .q_seq = q_seq,
          .q_pos = q_pos,
          .kv = kv,
          .layer = pr.layer,
          .block_tables = tables,
          .block_first_pos = firsts,
          .kv_lens = lens,
          .max_blocks_per_seq = pr.max_blocks,
          .num_seqs = static_cast<int64_t>(pr.tables.size()),
          .num_q_tokens = pr.tokens(),
          .num_q_heads = pr.num_q_heads,
          .num_kv_heads = pr.num_kv_heads,
          .head_dim = pr.head_dim,
          .scale = 1.0f / std::sqrt(static_cast<float>(pr.head_dim)),
          .out = out,
          .lse = lse,
          .kv_split_tokens = split};
}

AttnResult RunCpu(const Problem& pr, const KvPoolView& kv) {
  AttnResult r;
  r.out.assign(pr.tokens() * pr.num_q_heads * pr.head_dim, -777.0f);
  r.lse.assign(pr.tokens() * pr.num_q_heads, -777.0f);
  const std::vector<int32_t> tables = pr.Flat(pr.tables), firsts = pr.Flat(pr.firsts);
  ThreadPool threads(2);
  PagedAttentionCpu(MakeParams(pr, kv, pr.q_seq.data(), pr.q_pos.data(), pr.q.data(), tables.data(),
                               firsts.data(), pr.kv_lens.data(), r.out.data(), r.lse.data(), 0),
                    nullptr, &threads);
  return r;
}

// split: -1 = PagedAttentionCudaSplitTokens's choice, 0 = none, else kv_split_tokens.
AttnResult RunCuda(const Problem& pr, const Pool& pool, int64_t split, int64_t* used_split) {
  DeviceBuffer<unsigned char> d_pool(pool.host);
  KvPoolView kv = pool.view;
  kv.base = d_pool.get();
  DeviceBuffer<int32_t> q_seq(pr.q_seq), q_pos(pr.q_pos), tables(pr.Flat(pr.tables)),
      firsts(pr.Flat(pr.firsts)), lens(pr.kv_lens);
  DeviceBuffer<float> q(pr.q);
  DeviceBuffer<float> out(std::vector<float>(pr.tokens() * pr.num_q_heads * pr.head_dim, -777.0f));
  DeviceBuffer<float> lse(std::vector<float>(pr.tokens() * pr.num_q_heads, -777.0f));
  PagedAttentionParams p = MakeParams(pr, kv, q_seq.get(), q_pos.get(), q.get(), tables.get(),
                                      firsts.get(), lens.get(), out.get(), lse.get(), 0);
  p.kv_split_tokens = split >= 0 ? split : cuda::PagedAttentionCudaSplitTokens(p);
  if (used_split != nullptr) {
    *used_split = p.kv_split_tokens;
  }
  DeviceBuffer<unsigned char> ws(cuda::PagedAttentionCudaWorkspaceBytes(p));
  // A created stream: the split-KV merge is then a programmatic dependent launch.
  const gpu_testing::Stream stream;
  EXPECT_EQ(cuda::PagedAttentionCuda(p, ws.get(), stream.get()), cudaSuccess);
  stream.Sync();
  return {out.Download(), lse.Download()};
}

void ExpectSame(const AttnResult& want, const AttnResult& got, const std::string& what,
                double tol = kF32Tol) {
  ExpectAllNear(ToDouble(want.out), got.out.data(), tol, tol, what + " out");
  ExpectAllNear(ToDouble(want.lse), got.lse.data(), tol, tol, what + " lse");
}

std::string Name(DType dt, int64_t group, int64_t d, int64_t split) {
  return std::string(DTypeName(dt)) + " group=" + std::to_string(group) +
         " d=" + std::to_string(d) + " split=" + std::to_string(split);
}

// Decode queries of sequences of `lens` tokens over `pool` (filled with random KV first): all
// of its KV heads in layer 1, `group` query heads each; the slots past each sequence poisoned.
Problem PoisonedDecode(Pool* pool, const std::vector<int32_t>& lens, int64_t group,
                       std::mt19937& rng) {
  const KvPoolView& v = pool->view;
  pool->FillRandom(rng);
  Problem pr = DecodeBatch(lens, v.tokens_per_block, pool->blocks, rng);
  pr.num_kv_heads = v.num_kv_heads;
  pr.num_q_heads = v.num_kv_heads * group;
  pr.head_dim = v.head_dim;
  pr.layer = 1;
  pr.q = RandomVector(rng, pr.tokens() * pr.num_q_heads * v.head_dim);
  PoisonUnusedSlots(pr, pool);
  return pr;
}

// Lengths 1, tpb - 1, tpb, tpb + 1, 40 blocks - 3, 0 (a Helix rank holding nothing), 33: every
// dtype, GQA group 1..8, the fast head dims and odd ones, split-KV off, forced and automatic.
TEST_F(CudaOpsTest, AttentionDecodeBatch) {
  std::mt19937 rng(11);
  const int64_t tpb = 16;
  const std::vector<int32_t> lens = {1, 15, 16, 17, 40 * 16 - 3, 0, 33};
  for (DType dt : {DType::kF32, DType::kF16, DType::kBF16}) {
    for (int64_t group : {1, 3, 4, 8}) {
      for (int64_t d : {128, 64, 16, 8, 20}) {
        const int64_t kv_heads = 2;
        Pool pool(dt, 2, kv_heads, tpb, d, 52);
        const Problem pr = PoisonedDecode(&pool, lens, group, rng);
        const AttnResult want = RunCpu(pr, pool.view);
        for (int64_t split : {int64_t{0}, 2 * tpb, int64_t{-1}}) {
          const AttnResult got = RunCuda(pr, pool, split, nullptr);
          ExpectSame(want, got, Name(dt, group, d, split));
          for (int64_t h = 0; h < pr.num_q_heads; ++h) {  // the empty sequence (index 5)
            EXPECT_EQ(got.lse[5 * pr.num_q_heads + h], -kInf);
            for (int64_t e = 0; e < d; ++e) {
              EXPECT_EQ(got.out[(5 * pr.num_q_heads + h) * d + e], 0.0f);
            }
          }
        }
      }
    }
  }
}

// Groups above 8 run as sub-groups; large q makes the softmax peaky (the running max moves).
TEST_F(CudaOpsTest, AttentionLargeGroupsPeakyScores) {
  std::mt19937 rng(12);
  const int64_t tpb = 32;
  for (int64_t group : {5, 12, 16}) {
    for (float q_scale : {1.0f, 12.0f}) {
      for (int64_t d : {128, 24}) {
        Pool pool(DType::kBF16, 1, 2, tpb, d, 20);
        pool.FillRandom(rng);
        Problem pr = DecodeBatch({1, 200, 8 * 32 + 7}, tpb, 20, rng);
        pr.num_kv_heads = 2;
        pr.num_q_heads = 2 * group;
        pr.head_dim = d;
        pr.q = RandomVector(rng, pr.tokens() * pr.num_q_heads * d, -q_scale, q_scale);
        const AttnResult want = RunCpu(pr, pool.view);
        for (int64_t split : {int64_t{0}, int64_t{64}}) {
          // Scores of magnitude ~40: the fp32 rounding of the dot products is amplified by exp.
          ExpectSame(want, RunCuda(pr, pool, split, nullptr),
                     Name(DType::kBF16, group, d, split) + " q_scale=" + std::to_string(q_scale),
                     q_scale > 1.0f ? 5e-5 : kF32Tol);
        }
      }
    }
  }
}

// One sequence of L tokens queried by all of them (token i at position i: a causal prefill),
// its blocks among `pool_blocks`, random queries.
Problem CausalPrefill(int64_t L, int64_t tpb, int64_t pool_blocks, int64_t kv_heads,
                      int64_t q_heads, int64_t d, std::mt19937& rng) {
  Problem pr = DecodeBatch({static_cast<int32_t>(L)}, tpb, pool_blocks, rng);
  pr.q_seq.assign(L, 0);
  pr.q_pos.resize(L);
  std::iota(pr.q_pos.begin(), pr.q_pos.end(), 0);
  pr.num_kv_heads = kv_heads;
  pr.num_q_heads = q_heads;
  pr.head_dim = d;
  pr.q = RandomVector(rng, L * q_heads * d);
  return pr;
}

// Sequences of `lens` tokens among `pool_blocks` (tpb per block), sequence s queried at each of
// its positions from froms[s] on (a prompt chunk; its last alone: a decode token), 2 KV heads of
// `group` query heads each, random queries.
Problem PromptChunks(const std::vector<int32_t>& lens, const std::vector<int32_t>& froms,
                     int64_t tpb, int64_t pool_blocks, int64_t group, int64_t d,
                     std::mt19937& rng) {
  Problem pr = DecodeBatch(lens, tpb, pool_blocks, rng);
  pr.q_seq.clear();
  pr.q_pos.clear();
  for (int32_t s = 0; s < static_cast<int32_t>(lens.size()); ++s) {
    for (int32_t i = froms[s]; i < pr.kv_lens[s]; ++i) {
      pr.q_seq.push_back(s);
      pr.q_pos.push_back(i);
    }
  }
  pr.num_kv_heads = 2;
  pr.num_q_heads = 2 * group;
  pr.head_dim = d;
  pr.q = RandomVector(rng, pr.tokens() * 2 * group * d);
  return pr;
}

// A CP rank holding global blocks 1, 3, 5 of 16 tokens (the last partial; pool blocks 4, 0, 6),
// queried before them (nothing visible), inside a block (causal cut mid-block) and after: 2 KV
// heads, 4 query heads, random queries.
Problem ContextParallelRank(int64_t d, std::mt19937& rng) {
  Problem pr;
  pr.AddSeq({4, 0, 6}, {16, 48, 80}, 2 * 16 + 11);
  for (int32_t pos : {3, 15, 16, 20, 47, 50, 63, 64, 81, 90, 100, 5000}) {
    pr.q_seq.push_back(0);
    pr.q_pos.push_back(pos);
  }
  pr.num_kv_heads = 2;
  pr.num_q_heads = 4;
  pr.head_dim = d;
  pr.q = RandomVector(rng, pr.tokens() * 4 * d);
  return pr;
}

// Multi-token (prefill) queries through the same API: token i sees KV 0..i.
TEST_F(CudaOpsTest, AttentionCausalPrefill) {
  std::mt19937 rng(13);
  const int64_t tpb = 16, L = 16 * 5 + 5;
  for (DType dt : {DType::kF32, DType::kF16, DType::kBF16}) {
    for (int64_t d : {128, 64, 20}) {
      Pool pool(dt, 1, 2, tpb, d, 8);
      pool.FillRandom(rng);
      Problem pr = CausalPrefill(L, tpb, 8, 2, 4, d, rng);
      PoisonUnusedSlots(pr, &pool);
      const AttnResult want = RunCpu(pr, pool.view);
      for (int64_t split : {int64_t{0}, 2 * tpb}) {
        ExpectSame(want, RunCuda(pr, pool, split, nullptr), "prefill " + Name(dt, 2, d, split));
      }
    }
  }
}

// A CP rank holding global blocks 1, 3, 5 (the last partial): queries before (nothing
// visible), inside a block (causal cut mid-block) and after.
TEST_F(CudaOpsTest, AttentionContextParallelPositions) {
  std::mt19937 rng(14);
  const int64_t tpb = 16;
  for (int64_t d : {8, 128}) {
    Pool pool(DType::kF16, 1, 2, tpb, d, 7);
    pool.FillRandom(rng);
    const Problem pr = ContextParallelRank(d, rng);
    const AttnResult want = RunCpu(pr, pool.view);
    for (int64_t split : {0, 16, 32}) {
      const AttnResult got = RunCuda(pr, pool, split, nullptr);
      ExpectSame(want, got, "cp " + Name(DType::kF16, 2, d, split));
      for (int64_t i = 0; i < 2 * 4; ++i) {  // positions 3 and 15 see nothing
        EXPECT_EQ(got.lse[i], -kInf);
        for (int64_t e = 0; e < d; ++e) {
          EXPECT_EQ(got.out[i * d + e], 0.0f);
        }
      }
    }
  }
}

// A long single-sequence decode, where the automatic split-KV cuts the context into many
// chunks (the flash-decoding path the benchmark measures).
TEST_F(CudaOpsTest, AttentionLongContextAutoSplit) {
  std::mt19937 rng(15);
  const int64_t tpb = 32;
  for (int32_t len : {32 * 1024 - 5, 8 * 1024}) {
    const int64_t blocks = (len + tpb - 1) / tpb + 3;
    Pool pool(DType::kBF16, 1, 2, tpb, 128, blocks);
    pool.FillRandom(rng);
    Problem pr = DecodeBatch({len}, tpb, blocks, rng);
    pr.num_kv_heads = 2;
    pr.num_q_heads = 8;
    pr.head_dim = 128;
    pr.q = RandomVector(rng, 8 * 128, -3.0f, 3.0f);
    const AttnResult want = RunCpu(pr, pool.view);
    int64_t split = 0;
    const AttnResult got = RunCuda(pr, pool, -1, &split);
    EXPECT_GT(split, 0) << "a 1-sequence long decode should split";
    ExpectSame(want, got, "long len=" + std::to_string(len) + " split=" + std::to_string(split));
  }
}

// The TMA bulk-copy variant of the warp-pipelined kernel (PagedAttentionCudaTuning::bulk_copy,
// sm_90): decode with partial steps and an empty sequence, causal prefill (cuts inside a step)
// and a CP rank's positions, against the CPU; slots past each sequence are poisoned, so a copy
// that reads beyond the visible rows shows.
TEST_F(CudaOpsTest, AttentionBulkCopies) {
  const int major = DeviceMajor();
  ASSERT_GE(major, 0) << "cannot ask the device for its compute capability";
  if (major < 9) GTEST_SKIP() << "bulk copies need sm_90 (compute capability " << major << ")";
  struct Restore {
    ~Restore() { cuda::SetPagedAttentionCudaTuningForTesting({}); }
  } restore;
  cuda::SetPagedAttentionCudaTuningForTesting({.bulk_copy = true});
  std::mt19937 rng(16);
  const int64_t tpb = 16;
  for (DType dt : {DType::kF32, DType::kF16, DType::kBF16}) {
    for (int64_t group : {1, 4, 8}) {
      for (int64_t d : {128, 64}) {
        Pool pool(dt, 2, 2, tpb, d, 52);
        const Problem pr = PoisonedDecode(&pool, {1, 15, 16, 17, 40 * 16 - 3, 0, 33}, group, rng);
        const AttnResult want = RunCpu(pr, pool.view);
        for (int64_t split : {int64_t{0}, 2 * tpb, int64_t{-1}}) {
          ExpectSame(want, RunCuda(pr, pool, split, nullptr), "bulk " + Name(dt, group, d, split));
        }
      }
    }
  }
  const int64_t L = 16 * 5 + 5;
  Pool pool(DType::kBF16, 1, 2, tpb, 128, 8);
  pool.FillRandom(rng);
  Problem pr = CausalPrefill(L, tpb, 8, 2, 8, 128, rng);
  PoisonUnusedSlots(pr, &pool);
  const AttnResult want = RunCpu(pr, pool.view);
  ExpectSame(want, RunCuda(pr, pool, 0, nullptr), "bulk prefill");
  ExpectSame(want, RunCuda(pr, pool, 2 * tpb, nullptr), "bulk prefill split");
}

// NaN and infinities in q, K and V: NaN and each infinity (with its sign) at exactly the CPU's
// positions in out and lse, everything else within tolerance, on the fp32-math kernels (warp
// and generic paths) and the tensor-core ones, split or not. A NaN score (from q or K) makes
// the head's row and LSE NaN, also when only one split-KV chunk sees it (the merge must not
// take a NaN LSE for an empty part); a NaN or infinite V element only its own dimension; a
// score of +inf makes the row NaN and one of -inf drops its row (where it is the only one: out 0,
// lse -inf, as with nothing visible). In a causal prompt a NaN K row reaches only the queries at
// or after it.
TEST_F(CudaOpsTest, AttentionNonFiniteInputs) {
  struct Restore {
    ~Restore() { cuda::SetPagedAttentionCudaTuningForTesting({}); }
  } restore;
  const float nan = std::nanf(""), inf = kInf;
  const int64_t tpb = 16, kv_heads = 2;
  for (bool mma : {false, true}) {
    if (mma && DeviceMajor() < 8) {
      continue;  // mma.sync with bf16 needs sm_80
    }
    cuda::SetPagedAttentionCudaTuningForTesting({.tensor_cores = mma});
    std::mt19937 rng(19);
    for (DType dt : {DType::kF32, DType::kF16, DType::kBF16}) {
      for (int64_t group : {1, 4}) {
        for (int64_t d : {64, 20}) {
          Pool pool(dt, 1, kv_heads, tpb, d, 30);
          pool.FillRandom(rng);
          // Seven sequences of 40 tokens (blocks of 16 + 16 + 8) and one of 1, a decode query
          // each.
          Problem pr = DecodeBatch({40, 40, 40, 40, 40, 40, 40, 1}, tpb, 30, rng);
          pr.num_kv_heads = kv_heads;
          pr.num_q_heads = kv_heads * group;
          pr.head_dim = d;
          pr.layer = 0;
          pr.q = RandomVector(rng, pr.tokens() * pr.num_q_heads * d);
          PoisonUnusedSlots(pr, &pool);
          // Token i of sequence s, KV head h, plane c (0 = K, 1 = V), element e.
          const auto at = [&](int64_t s, int64_t i, int64_t h, int c, int64_t e) {
            return KvOffset(pool.view, pr.tables[s][i / tpb], 0, c, h, i % tpb) + e;
          };
          const int64_t hq = pr.num_q_heads;
          pool.Set(at(0, 5, 0, 0, 3), nan);       // a NaN score in the first chunk
          pool.Set(at(1, 37, 1, 1, 2), nan);      // a NaN V element in the last
          pr.q[(2 * hq + hq - 1) * d + 1] = nan;  // a NaN query
          pool.Set(at(3, 20, 0, 1, 4), inf);      // +inf in V
          pool.Set(at(3, 9, 0, 1, 5), -inf);      // -inf in V, another dimension
          // K element 0 infinite where every query of the group is positive: a score of -inf
          // (the row drops out) in sequence 4, +inf (the row is NaN) in sequence 5, and -inf in
          // the only row of sequence 7 (out 0, lse -inf, as with nothing visible).
          for (int64_t s : {4, 5, 7}) {
            for (int64_t g = 0; g < group; ++g) {
              pr.q[(s * hq + group + g) * d] = 0.5f;
            }
            pool.Set(at(s, s == 7 ? 0 : 12, 1, 0, 0), s == 5 ? inf : -inf);
          }
          // Sequence 6 stays finite.
          const AttnResult want = RunCpu(pr, pool.view);
          ASSERT_TRUE(std::isnan(want.lse[0]) && std::isnan(want.out[(1 * hq + hq - 1) * d + 2]) &&
                      std::isnan(want.lse[2 * hq + hq - 1]) && want.out[3 * hq * d + 4] == inf &&
                      want.out[3 * hq * d + 5] == -inf &&
                      std::isfinite(want.lse[4 * hq + hq - 1]) &&
                      std::isnan(want.lse[5 * hq + hq - 1]) && want.lse[7 * hq + hq - 1] == -inf &&
                      std::isfinite(want.lse[7 * hq]))
              << "the CPU reference";
          for (int64_t split : {int64_t{0}, tpb, int64_t{-1}}) {
            ExpectSame(want, RunCuda(pr, pool, split, nullptr),
                       std::string(mma ? "mma " : "") + "non-finite " + Name(dt, group, d, split));
          }
        }
      }
      // A causal prompt of 40 tokens, 8 query heads on 2 KV heads: NaN in K at token 30 (KV head
      // 1), +inf in V at token 12 (KV head 0, element 3), NaN in the query of token 7, head 0, and
      // -inf in K at token 0 (KV head 0, element 5, where every query of heads 0-3 is positive):
      // row 0 drops out, so token 0's heads 0-3 see nothing (out 0, lse -inf).
      const int64_t d = 64, L = 40;
      Pool pool(dt, 1, kv_heads, tpb, d, 8);
      pool.FillRandom(rng);
      Problem pr = CausalPrefill(L, tpb, 8, kv_heads, 4 * kv_heads, d, rng);
      PoisonUnusedSlots(pr, &pool);
      const int64_t hq = pr.num_q_heads;
      const auto at = [&](int64_t i, int64_t h, int c, int64_t e) {
        return KvOffset(pool.view, pr.tables[0][i / tpb], pr.layer, c, h, i % tpb) + e;
      };
      pool.Set(at(30, 1, 0, 9), nan);
      pr.q[(7 * hq) * d + 11] = nan;
      pool.Set(at(0, 0, 0, 5), -inf);
      for (int64_t t = 0; t < L; ++t) {
        for (int64_t h = 0; h < 4; ++h) {
          pr.q[(t * hq + h) * d + 5] = 0.5f;
        }
      }
      for (int64_t split : {int64_t{0}, tpb}) {
        // The tensor-core prefill kernel (mma, no split) multiplies a masked row's probability,
        // 0, by its V row (a tile is shared by queries on both sides of the causal cut), so a
        // non-finite V element reaches the queries before it there (documented in
        // attention_cuda.h): no V infinity for it.
        const bool v_inf = !(mma && split == 0);
        pool.Set(at(12, 0, 1, 3), v_inf ? inf : 0.25f);
        const AttnResult want = RunCpu(pr, pool.view);
        ASSERT_TRUE(std::isfinite(want.lse[29 * hq + 4]) && std::isnan(want.lse[30 * hq + 4]) &&
                    std::isfinite(want.out[(11 * hq) * d + 3]) &&
                    (!v_inf || want.out[(12 * hq) * d + 3] == inf) &&
                    std::isnan(want.lse[7 * hq]) && want.lse[0] == -inf &&
                    std::isfinite(want.lse[1 * hq]))
            << "the CPU reference";
        ExpectSame(want, RunCuda(pr, pool, split, nullptr),
                   std::string(mma ? "mma " : "") + "non-finite prefill " + Name(dt, 4, d, split));
      }
    }
  }
}

// The tensor-core variant of the warp-pipelined kernel (PagedAttentionCudaTuning::tensor_cores,
// sm_80+): the register layouts of ldmatrix and mma.sync it assumes are checked here, on the
// device, against the CPU at the fp32 kernel's tolerance (q and P go in as two 16-bit halves).
// Decode with every group size up to 8 and sub-groups above it, partial steps and an empty
// sequence, split-KV, peaky scores, a causal prefill and a CP rank's positions; slots past each
// sequence are poisoned.
TEST_F(CudaOpsTest, AttentionTensorCores) {
  SKIP_IF_EMULATED("72 s emulated; attention_emu_test runs the tensor-core kernels");
  const int major = DeviceMajor();
  ASSERT_GE(major, 0) << "cannot ask the device for its compute capability";
  if (major < 8)
    GTEST_SKIP() << "mma.sync with bf16 needs sm_80 (compute capability " << major << ")";
  struct Restore {
    ~Restore() { cuda::SetPagedAttentionCudaTuningForTesting({}); }
  } restore;
  std::mt19937 rng(17);
  const int64_t tpb = 16;
  for (int warps : {0, 8}) {
    cuda::SetPagedAttentionCudaTuningForTesting(
        {.warps_per_block = warps, .stages = warps == 8 ? 3 : 0, .tensor_cores = true});
    for (DType dt : {DType::kF16, DType::kBF16}) {
      for (int64_t group : {1, 3, 4, 8, 12}) {
        for (int64_t d : {128, 64}) {
          Pool pool(dt, 2, 2, tpb, d, 52);
          const Problem pr = PoisonedDecode(&pool, {1, 15, 16, 17, 40 * 16 - 3, 0, 33}, group, rng);
          PagedAttentionParams probe = MakeParams(pr, pool.view, nullptr, nullptr, nullptr, nullptr,
                                                  nullptr, nullptr, nullptr, nullptr, 0);
          ASSERT_STREQ(cuda::PagedAttentionCudaKernelName(probe), "mma");
          const AttnResult want = RunCpu(pr, pool.view);
          for (int64_t split : {int64_t{0}, 2 * tpb, int64_t{-1}}) {
            ExpectSame(want, RunCuda(pr, pool, split, nullptr),
                       "mma warps=" + std::to_string(warps) + " " + Name(dt, group, d, split));
          }
        }
      }
    }
  }
  cuda::SetPagedAttentionCudaTuningForTesting({.tensor_cores = true});
  for (float q_scale : {1.0f, 12.0f}) {
    Pool pool(DType::kBF16, 1, 2, 32, 128, 20);
    pool.FillRandom(rng);
    Problem pr = DecodeBatch({1, 200, 8 * 32 + 7}, 32, 20, rng);
    pr.num_kv_heads = 2;
    pr.num_q_heads = 8;
    pr.head_dim = 128;
    pr.q = RandomVector(rng, pr.tokens() * 8 * 128, -q_scale, q_scale);
    const AttnResult want = RunCpu(pr, pool.view);
    ExpectSame(want, RunCuda(pr, pool, 64, nullptr), "mma peaky q_scale=" + std::to_string(q_scale),
               q_scale > 1.0f ? 5e-5 : kF32Tol);
  }
  const int64_t L = 16 * 5 + 5;
  Pool pool(DType::kF16, 1, 2, tpb, 64, 8);
  pool.FillRandom(rng);
  Problem pr = CausalPrefill(L, tpb, 8, 2, 8, 64, rng);
  PoisonUnusedSlots(pr, &pool);
  const AttnResult want = RunCpu(pr, pool.view);
  ExpectSame(want, RunCuda(pr, pool, 0, nullptr), "mma prefill");
  ExpectSame(want, RunCuda(pr, pool, 2 * tpb, nullptr), "mma prefill split");
  // The prefill kernel (no split): a long prompt (many shared tiles, a causal cut in each block's
  // last ones), and chunks of three prompts in one call (queries from position 100 on; thread
  // blocks spanning two sequences), every dtype and head dim it takes.
  for (DType dt : {DType::kF16, DType::kBF16}) {
    for (int64_t d : {128, 64}) {
      const int64_t blocks = 1100 / 32 + 1 + 3 * (300 / 32 + 1) + 2;
      Pool big(dt, 1, 2, 32, d, blocks);
      big.FillRandom(rng);
      Problem one = CausalPrefill(1100, 32, blocks, 2, 8, d, rng);
      PoisonUnusedSlots(one, &big);
      PagedAttentionParams probe = MakeParams(one, big.view, nullptr, nullptr, nullptr, nullptr,
                                              nullptr, nullptr, nullptr, nullptr, 0);
      ASSERT_STREQ(cuda::PagedAttentionCudaKernelName(probe), "mma_prefill");
      ExpectSame(RunCpu(one, big.view), RunCuda(one, big, 0, nullptr),
                 "mma_prefill " + Name(dt, 4, d, 0));
      big.FillRandom(rng);  // no poison left from the first problem
      Problem chunks = PromptChunks({300, 257, 180}, {100, 100, 100}, 32, blocks, 3, d, rng);
      PoisonUnusedSlots(chunks, &big);
      ExpectSame(RunCpu(chunks, big.view), RunCuda(chunks, big, 0, nullptr),
                 "mma_prefill chunks " + Name(dt, 3, d, 0));
      // Decode tokens of long contexts batched with prompts (their shared thread blocks are left
      // to the warp kernel), groups of 1 (64 tokens a block) and 12.
      for (int64_t group : {1, 12}) {
        big.FillRandom(rng);
        Problem mixed =
            PromptChunks({700, 300, 600, 200}, {699, 0, 599, 100}, 32, blocks, group, d, rng);
        PoisonUnusedSlots(mixed, &big);
        ExpectSame(RunCpu(mixed, big.view), RunCuda(mixed, big, 0, nullptr),
                   "mma_prefill mixed " + Name(dt, group, d, 0));
      }
    }
  }
  Pool cp_pool(DType::kBF16, 1, 2, tpb, 128, 7);
  cp_pool.FillRandom(rng);
  const Problem cp = ContextParallelRank(128, rng);
  const AttnResult cp_want = RunCpu(cp, cp_pool.view);
  for (int64_t split : {0, 16, 32}) {
    ExpectSame(cp_want, RunCuda(cp, cp_pool, split, nullptr),
               "mma cp split=" + std::to_string(split));
  }
}

#ifndef HELIX_CUDA_EMULATION
// PagedAttentionParams::kv_settled_below_q on the device: decode attention issues its first KV
// copies before its launch wait, but reads q and each query's own K/V rows only after it. Here
// the kernel before it (LaunchDelayedCopies, a programmatic launch too) writes q and those rows
// 20 us after the attention may start, over NaN: a read before the wait would put NaN (or
// stale values) into the output. The result must equal an ordinary call's bit for bit (and
// the CPU's within tolerance), for the fp32 and tensor-core kernels, both head dims, split-KV
// off and automatic. attention_emu_test checks the same under the emulation (where every block
// runs before its kernel before "ends").
TEST_F(CudaOpsTest, AttentionEarlyKvWaitsForTheKernelBefore) {
  // Without programmatic launch (a GPU before sm_90, or the switch off) the attention would
  // start after the kernel before anyway: nothing to check.
  if (DeviceMajor() < 9 || !cuda::ProgrammaticLaunch()) {
    GTEST_SKIP() << "no programmatic dependent launch on this device or build";
  }
  struct Restore {
    ~Restore() { cuda::SetPagedAttentionCudaTuningForTesting({}); }
  } restore;
  std::mt19937 rng(19);
  const int64_t tpb = 16, kv_heads = 2, group = 4;
  for (bool mma : {false, true}) {
    if (mma && DeviceMajor() < 8) continue;
    cuda::SetPagedAttentionCudaTuningForTesting({.tensor_cores = mma});
    for (int64_t d : {64, 128}) {
      Pool pool(DType::kBF16, 2, kv_heads, tpb, d, 52);
      const Problem pr = PoisonedDecode(&pool, {1, 17, 40 * 16 - 3, 0, 33}, group, rng);
      const AttnResult want = RunCpu(pr, pool.view);
      for (int64_t split : {int64_t{0}, int64_t{-1}}) {
        const std::string what =
            std::string(mma ? "mma " : "fp32 ") + Name(DType::kBF16, group, d, split);
        const AttnResult plain = RunCuda(pr, pool, split, nullptr);
        // The device pool and q as the kernel before finds them: the query rows and q NaN.
        std::vector<unsigned char> host = pool.host;
        std::vector<std::pair<int64_t, int64_t>> rows;  // byte offset, bytes
        const int64_t row_bytes = d * 2;
        for (size_t s = 0; s < pr.kv_lens.size(); ++s) {
          const int32_t len = pr.kv_lens[s];
          if (len == 0) continue;
          const int32_t block = pr.tables[s][(len - 1) / tpb];
          for (int c = 0; c < 2; ++c) {
            for (int64_t h = 0; h < kv_heads; ++h) {
              const int64_t at = KvOffset(pool.view, block, pr.layer, c, h, (len - 1) % tpb) * 2;
              rows.emplace_back(at, row_bytes);
              std::fill_n(host.begin() + at, row_bytes, 0xff);
            }
          }
        }
        DeviceBuffer<unsigned char> d_pool(host), d_real(pool.host);
        DeviceBuffer<float> d_q(std::vector<float>(pr.q.size(), kNaN)), d_q_real(pr.q);
        std::vector<gpu_testing::CopyOp> ops = {
            {d_q.get(), d_q_real.get(), pr.q.size() * sizeof(float)}};
        for (const auto& [at, n] : rows) {
          ops.push_back({d_pool.get() + at, d_real.get() + at, static_cast<uint64_t>(n)});
        }
        DeviceBuffer<gpu_testing::CopyOp> d_ops(ops);
        KvPoolView kv = pool.view;
        kv.base = d_pool.get();
        DeviceBuffer<int32_t> q_seq(pr.q_seq), q_pos(pr.q_pos), tables(pr.Flat(pr.tables)),
            firsts(pr.Flat(pr.firsts)), lens(pr.kv_lens);
        DeviceBuffer<float> out(std::vector<float>(plain.out.size(), -777.0f));
        DeviceBuffer<float> lse(std::vector<float>(plain.lse.size(), -777.0f));
        PagedAttentionParams p =
            MakeParams(pr, kv, q_seq.get(), q_pos.get(), d_q.get(), tables.get(), firsts.get(),
                       lens.get(), out.get(), lse.get(), 0);
        p.kv_split_tokens = split >= 0 ? split : cuda::PagedAttentionCudaSplitTokens(p);
        p.kv_settled_below_q = true;
        DeviceBuffer<unsigned char> ws(cuda::PagedAttentionCudaWorkspaceBytes(p));
        const gpu_testing::Stream stream;
        ASSERT_EQ(gpu_testing::LaunchDelayedCopies(d_ops.get(), static_cast<int>(ops.size()), 20000,
                                                   stream.get()),
                  cudaSuccess);
        ASSERT_EQ(cuda::PagedAttentionCuda(p, ws.get(), stream.get()), cudaSuccess);
        stream.Sync();
        const AttnResult got{out.Download(), lse.Download()};
        ExpectSame(want, got, "early kv " + what);
        EXPECT_EQ(std::memcmp(got.out.data(), plain.out.data(), got.out.size() * sizeof(float)), 0)
            << what;
        EXPECT_EQ(std::memcmp(got.lse.data(), plain.lse.data(), got.lse.size() * sizeof(float)), 0)
            << what;
      }
    }
  }
}
#endif

// ---------------------------------------------------------------------------------------------
// Merge (split-KV second phase and the Helix combine)

TEST_F(CudaOpsTest, MergeStatesHelixLayout) {
  struct Restore {
    ~Restore() { cuda::SetPagedAttentionCudaTuningForTesting({}); }
  } restore;
  std::mt19937 rng(21);
  // Both kernels: the one-pass one (where a row's parts fit its threads: 64 at d = 128, 200 at
  // d = 40, 336 at d = 24, so 65 and 300 parts are on either side) and the two-pass one (always
  // with merge_two_pass). 300 parts: more than the two-pass kernel's shared-memory chunk of part
  // weights (256); d = 24 and 40: thread groups that do not fill the block; 1100: dimension
  // tiles; 30 and 7: no 16-byte loads.
  for (const bool two_pass : {false, true}) {
    cuda::SetPagedAttentionCudaTuningForTesting({.merge_two_pass = two_pass});
    for (int64_t parts : {1, 2, 3, 8, 64, 65, 300}) {
      for (int64_t d : {128, 8, 24, 40, 1100, 30, 7}) {
        const int64_t tokens = 5, heads = 4, rows = tokens * heads;
        std::vector<float> o = RandomVector(rng, parts * rows * d);
        std::vector<float> lse = RandomVector(rng, parts * rows, -20.0f, 20.0f);
        for (int64_t r = 0; r < rows; ++r) {
          if (r % 3 == 0) {  // an empty part: its O holds garbage that must not be read
            lse[(r % parts) * rows + r] = -kInf;
            std::fill_n(o.begin() + ((r % parts) * rows + r) * d, d, std::nanf(""));
          }
          if (r == 7 || r == 13) {  // all parts empty (13: but one, with a NaN LSE)
            for (int64_t i = 0; i < parts; ++i) {
              lse[i * rows + r] = -kInf;
            }
          }
          if (r == 11 || r == 13) {  // a part whose softmax saw a NaN: the row is NaN
            lse[((r + 1) % parts) * rows + r] = std::nanf("");
          }
          if (r == 17) {  // a NaN in one part's O: that dimension only
            o[((r + 1) % parts * rows + r) * d + d / 2] = std::nanf("");
          }
          if (r == 19) {  // a part whose weight underflows to 0, its O NaN: 0 x NaN is NaN
            lse[((r + 1) % parts) * rows + r] = -200.0f;
            std::fill_n(o.begin() + ((r + 1) % parts * rows + r) * d, d, std::nanf(""));
          }
        }
        std::vector<float> want_out(rows * d), want_lse(rows);
        MergeStatesCpu({.o = o.data(),
                        .lse = lse.data(),
                        .out = want_out.data(),
                        .out_lse = want_lse.data(),
                        .num_parts = parts,
                        .rows = rows,
                        .head_dim = d},
                       nullptr);
        DeviceBuffer<float> d_o(o), d_lse(lse), d_out(rows * d), d_out_lse(rows);
        ASSERT_EQ(cuda::MergeStatesCuda({.o = d_o.get(),
                                         .lse = d_lse.get(),
                                         .out = d_out.get(),
                                         .out_lse = d_out_lse.get(),
                                         .num_parts = parts,
                                         .rows = rows,
                                         .head_dim = d},
                                        nullptr),
                  cudaSuccess);
        const std::string what = "parts=" + std::to_string(parts) + " d=" + std::to_string(d) +
                                 (two_pass ? " two-pass" : "");
        const std::vector<float> got_out = d_out.Download(), got_lse = d_out_lse.Download();
        ExpectAllNear(ToDouble(want_out), got_out.data(), kF32Tol, kF32Tol, what + " out");
        ExpectAllNear(ToDouble(want_lse), got_lse.data(), kF32Tol, kF32Tol, what + " lse");
        EXPECT_EQ(got_lse[7], -kInf) << what;
        EXPECT_TRUE(std::isnan(got_lse[11]) && std::isnan(got_lse[13])) << what;
        EXPECT_TRUE(std::isfinite(got_lse[17]) && std::isfinite(got_lse[19])) << what;
        for (int64_t e = 0; e < d; ++e) {
          EXPECT_EQ(got_out[7 * d + e], 0.0f) << what;
          EXPECT_TRUE(std::isnan(got_out[11 * d + e]) && std::isnan(got_out[13 * d + e])) << what;
          EXPECT_EQ(std::isnan(got_out[17 * d + e]), e == d / 2) << what;
          EXPECT_TRUE(std::isnan(got_out[19 * d + e])) << what;
        }
      }
    }
  }
  // Head dim 0, a degenerate call: no crash (the one-pass kernel's sizing divides by head_dim /
  // 4), the LSEs still merged.
  cuda::SetPagedAttentionCudaTuningForTesting({});
  DeviceBuffer<float> o0(4), lse0(std::vector<float>{0.5f, 1.5f}), out0(4), out_lse0(1);
  ASSERT_EQ(cuda::MergeStatesCuda({.o = o0.get(),
                                   .lse = lse0.get(),
                                   .out = out0.get(),
                                   .out_lse = out_lse0.get(),
                                   .num_parts = 2,
                                   .rows = 1,
                                   .head_dim = 0},
                                  nullptr),
            cudaSuccess);
  EXPECT_NEAR(out_lse0.Download()[0], std::log(std::exp(0.5) + std::exp(1.5)), 1e-5);
}

// The Helix combine end to end as engine/model/llama_model.cc CombineAttention runs it: each of
// `peers` ranks packs its partial attention of all heads (PackCombineCuda), the all-to-all gives
// rank r chunk r of every rank's send buffer, UnpackCombineCuda splits it into (O, LSE) parts
// in the [peers][tokens][heads][dim] layout and MergeStatesCuda merges them; against the CPU
// backend's PackCombine / UnpackCombine (engine/backend/cpu/cpu_backend.cc, as loops here: the
// test does not link the engine) and MergeStatesCpu. One rank holds no KV (all LSEs -inf, its O
// garbage), O holds NaN and infinities.
TEST_F(CudaOpsTest, HelixCombinePackUnpackMerge) {
  std::mt19937 rng(65);
  struct Shape {
    int64_t tokens, peers, hp, dim;
  };
  for (Shape sh : {Shape{1, 2, 1, 8}, Shape{5, 2, 3, 64}, Shape{3, 4, 2, 1}, Shape{2, 3, 4, 33},
                   Shape{1, 1, 2, 16}}) {
    const int64_t T = sh.tokens, cp = sh.peers, hp = sh.hp, d = sh.dim;
    const int64_t heads = cp * hp, chunk = T * hp * (d + 1), rows = T * hp;
    const std::string what = "tokens=" + std::to_string(T) + " peers=" + std::to_string(cp) +
                             " hp=" + std::to_string(hp) + " dim=" + std::to_string(d);
    std::vector<std::vector<float>> att(cp), lse(cp), send(cp);
    std::vector<DeviceBuffer<float>> d_send;
    for (int64_t i = 0; i < cp; ++i) {
      att[i] = RandomVector(rng, T * heads * d);
      lse[i] = RandomVector(rng, T * heads, -5.0f, 5.0f);
      if (cp > 1 && i == 1) {  // a rank with no tokens of these sequences: nothing to merge
        std::fill(lse[i].begin(), lse[i].end(), -kInf);
        std::fill(att[i].begin(), att[i].end(), kNaN);
      }
      if (i == 0) {
        att[i][d - 1] = kInf;                 // token 0, head 0 (peer 0's)
        att[i][(T * heads - 1) * d] = -kInf;  // the last token's last head (peer cp - 1's)
        att[i][heads * d / 2] = kNaN;
      }
      send[i].assign(cp * chunk, 0.0f);
      for (int64_t c = 0; c < cp; ++c) {
        for (int64_t t = 0; t < T; ++t) {
          for (int64_t h = 0; h < hp; ++h) {
            const int64_t src = (t * cp + c) * hp + h;
            float* dst = send[i].data() + ((c * T + t) * hp + h) * (d + 1);
            std::copy_n(att[i].data() + src * d, d, dst);
            dst[d] = lse[i][src];
          }
        }
      }
      DeviceBuffer<float> d_att(att[i]), d_lse(lse[i]);
      d_send.emplace_back(std::vector<float>(cp * chunk, 12345.0f));
      ASSERT_EQ(cuda::PackCombineCuda({.att = d_att.get(),
                                       .lse = d_lse.get(),
                                       .send = d_send.back().get(),
                                       .tokens = T,
                                       .peers = cp,
                                       .heads_per_peer = hp,
                                       .dim = d},
                                      nullptr),
                cudaSuccess);
      ExpectAllNear(ToDouble(send[i]), d_send.back().Download().data(), 0, 0,
                    what + " pack of rank " + std::to_string(i));
    }
    for (int64_t r = 0; r < cp; ++r) {
      // The all-to-all: recv[i] = rank i's chunk r (the CPU's packs, and the GPU's).
      std::vector<float> recv(cp * chunk), got_recv(cp * chunk);
      for (int64_t i = 0; i < cp; ++i) {
        const std::vector<float> got_send = d_send[i].Download();
        std::copy_n(send[i].begin() + r * chunk, chunk, recv.begin() + i * chunk);
        std::copy_n(got_send.begin() + r * chunk, chunk, got_recv.begin() + i * chunk);
      }
      std::vector<float> parts_o(cp * rows * d), parts_lse(cp * rows);
      for (int64_t j = 0; j < cp * rows; ++j) {
        std::copy_n(recv.data() + j * (d + 1), d, parts_o.data() + j * d);
        parts_lse[j] = recv[j * (d + 1) + d];
      }
      std::vector<float> want_out(rows * d), want_lse(rows);
      MergeStatesCpu({.o = parts_o.data(),
                      .lse = parts_lse.data(),
                      .out = want_out.data(),
                      .out_lse = want_lse.data(),
                      .num_parts = cp,
                      .rows = rows,
                      .head_dim = d},
                     nullptr);
      DeviceBuffer<float> d_recv(got_recv), d_parts_o(std::vector<float>(cp * rows * d, 7.0f)),
          d_parts_lse(std::vector<float>(cp * rows, 7.0f)), d_out(rows * d), d_out_lse(rows);
      ASSERT_EQ(cuda::UnpackCombineCuda({.recv = d_recv.get(),
                                         .parts_o = d_parts_o.get(),
                                         .parts_lse = d_parts_lse.get(),
                                         .peers = cp,
                                         .rows = rows,
                                         .dim = d},
                                        nullptr),
                cudaSuccess);
      const std::string wr = what + " rank " + std::to_string(r);
      ExpectAllNear(ToDouble(parts_o), d_parts_o.Download().data(), 0, 0, wr + " unpack o");
      ExpectAllNear(ToDouble(parts_lse), d_parts_lse.Download().data(), 0, 0, wr + " unpack lse");
      ASSERT_EQ(cuda::MergeStatesCuda({.o = d_parts_o.get(),
                                       .lse = d_parts_lse.get(),
                                       .out = d_out.get(),
                                       .out_lse = d_out_lse.get(),
                                       .num_parts = cp,
                                       .rows = rows,
                                       .head_dim = d},
                                      nullptr),
                cudaSuccess);
      ExpectAllNear(ToDouble(want_out), d_out.Download().data(), kF32Tol, kF32Tol, wr + " out");
      ExpectAllNear(ToDouble(want_lse), d_out_lse.Download().data(), kF32Tol, kF32Tol, wr + " lse");
    }
  }
  // No tokens on this step: nothing packed or unpacked, nothing read.
  EXPECT_EQ(cuda::PackCombineCuda({nullptr, nullptr, nullptr, 0, 2, 3, 8}, nullptr), cudaSuccess);
  EXPECT_EQ(cuda::UnpackCombineCuda({nullptr, nullptr, nullptr, 2, 0, 8}, nullptr), cudaSuccess);
}

// The residual add x += y (CpuBackend::Add): exact, NaN and infinities included (inf + -inf is
// NaN); lengths 1, a partial last thread block, several grid strides, and 0 (a no-op).
TEST_F(CudaOpsTest, AddMatchesCpu) {
  std::mt19937 rng(66);
  for (int64_t n : {1, 300, 100003}) {
    std::vector<float> x = RandomVector(rng, n, -1e3f, 1e3f);
    std::vector<float> y = RandomVector(rng, n, -1e3f, 1e3f);
    x[0] = n > 1 ? kNaN : x[0];
    if (n > 5) {
      y[1] = kNaN;
      x[2] = kInf;
      y[3] = -kInf;
      x[4] = kInf;
      y[4] = -kInf;
      x[n - 1] = -kInf;
      y[n - 1] = -kInf;
    }
    DeviceBuffer<float> d_x(x), d_y(y);
    for (int64_t i = 0; i < n; ++i) x[i] += y[i];
    ASSERT_EQ(cuda::AddCuda({d_x.get(), d_y.get(), n}, nullptr), cudaSuccess);
    const std::string what = "add n=" + std::to_string(n);
    if (n > 5) ExpectAllNonFiniteKinds(x, what);
    ExpectAllNear(ToDouble(x), d_x.Download().data(), 0, 0, what);
  }
  EXPECT_EQ(cuda::AddCuda({nullptr, nullptr, 0}, nullptr), cudaSuccess);
}

// out[r] = in[rows[r]][0..n) (CpuBackend::GatherRows): rows repeated and out of order, n below
// the stride, one row, NaN and infinities copied as they are; zero rows or columns: a no-op.
TEST_F(CudaOpsTest, GatherRowsMatchesCpu) {
  std::mt19937 rng(67);
  const int64_t in_rows = 10, stride = 37;
  std::vector<float> in = RandomVector(rng, in_rows * stride);
  in[9 * stride + 0] = kNaN;
  in[4 * stride + 29] = kInf;
  in[0 * stride + 5] = -kInf;
  in[4 * stride + 30] = kNaN;  // past n: never read
  for (const std::vector<int32_t>& rows :
       {std::vector<int32_t>{9, 0, 4, 4, 7}, std::vector<int32_t>{3}}) {
    for (int64_t n : {30, 1}) {
      const int64_t num_rows = static_cast<int64_t>(rows.size());
      std::vector<float> want(num_rows * n);
      for (int64_t r = 0; r < num_rows; ++r) {
        std::copy_n(in.data() + rows[r] * stride, n, want.data() + r * n);
      }
      DeviceBuffer<float> d_in(in), d_out(num_rows * n);
      DeviceBuffer<int32_t> d_rows(rows);
      ASSERT_EQ(cuda::GatherRowsCuda({d_in.get(), stride, d_rows.get(), num_rows, n, d_out.get()},
                                     nullptr),
                cudaSuccess);
      const std::string what =
          "gather rows=" + std::to_string(num_rows) + " n=" + std::to_string(n);
      if (num_rows == 5 && n == 30) ExpectAllNonFiniteKinds(want, what);
      ExpectAllNear(ToDouble(want), d_out.Download().data(), 0, 0, what);
    }
  }
  EXPECT_EQ(cuda::GatherRowsCuda({nullptr, stride, nullptr, 0, 30, nullptr}, nullptr), cudaSuccess);
  EXPECT_EQ(cuda::GatherRowsCuda({nullptr, stride, nullptr, 5, 0, nullptr}, nullptr), cudaSuccess);
}

// out[rows[j]] += w[j] * y[j] (CpuBackend::ScatterAddRows, an MoE expert's weighted output into
// its tokens' rows): distinct rows out of order, rows no expert token maps to untouched, NaN and
// infinities in y, w and out (a zero weight times inf is NaN); n = 0 a no-op. Up to one rounding
// (the CPU build may fuse the multiply-add).
TEST_F(CudaOpsTest, ScatterAddRowsMatchesCpu) {
  std::mt19937 rng(68);
  const int64_t out_rows = 12;
  for (int64_t n : {1, 5, 12}) {
    for (int64_t dim : {1, 64, 300}) {
      std::vector<int32_t> rows(out_rows);
      std::iota(rows.begin(), rows.end(), 0);
      std::shuffle(rows.begin(), rows.end(), rng);
      rows.resize(n);
      std::vector<float> y = RandomVector(rng, n * dim, -4.0f, 4.0f);
      std::vector<float> w = RandomVector(rng, n, 0.0f, 1.0f);
      std::vector<float> out = RandomVector(rng, out_rows * dim);
      y[0] = kInf;
      y[n * dim - 1] = kNaN;
      if (n > 1) {
        w[1] = 0.0f;
        y[1 * dim] = -kInf;  // 0 * -inf: NaN
        out[rows[0] * dim + dim - 1] = -kInf;
      }
      out[rows[n - 1] * dim] = -kInf;
      DeviceBuffer<float> d_y(y), d_w(w), d_out(out);
      DeviceBuffer<int32_t> d_rows(rows);
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t e = 0; e < dim; ++e) out[rows[j] * dim + e] += w[j] * y[j * dim + e];
      }
      ASSERT_EQ(cuda::ScatterAddRowsCuda({d_y.get(), d_rows.get(), d_w.get(), n, dim, d_out.get()},
                                         nullptr),
                cudaSuccess);
      const std::string what = "scatter n=" + std::to_string(n) + " dim=" + std::to_string(dim);
      if (n > 1 && dim > 1) ExpectAllNonFiniteKinds(out, what);
      ExpectAllNear(ToDouble(out), d_out.Download().data(), kF32Tol, kF32Tol, what);
    }
  }
  EXPECT_EQ(cuda::ScatterAddRowsCuda({nullptr, nullptr, nullptr, 0, 64, nullptr}, nullptr),
            cudaSuccess);
}

// ---------------------------------------------------------------------------------------------
// RMSNorm, RoPE, SiLU*mul

// `lowp` holds exactly `out` rounded to `dtype` (an op's out_lowp copy).
void ExpectRoundedCopy(const std::vector<float>& out, DType dtype,
                       const std::vector<uint16_t>& lowp, const std::string& what) {
  std::vector<uint16_t> want(out.size());
  StoreLowp(out.data(), static_cast<int64_t>(out.size()), dtype, want.data());
  ASSERT_EQ(lowp.size(), want.size()) << what;
  int64_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (lowp[i] != want[i] && bad++ < 3) {
      ADD_FAILURE() << what << ": 16-bit copy [" << i << "] = 0x" << std::hex << lowp[i]
                    << ", want 0x" << want[i] << std::dec << " (" << out[i] << " as "
                    << DTypeName(dtype) << ")";
    }
  }
  EXPECT_EQ(bad, 0) << what;
}

// RMSNorm of rows x dim floats x (mode 0: into out; 1: res0 added to x first, the sum left in
// the residual; 2: in place) with its 16-bit copy in `lowp`, on the CPU and on the device.
struct RmsNormRun {
  std::vector<float> want, res, got, got_res;  // outputs (x itself in mode 2) and residual sums
  std::vector<uint16_t> want_lowp, got_lowp;
};
RmsNormRun RmsNormCpuAndCuda(const std::vector<float>& x, const std::vector<float>& w,
                             const std::vector<float>& res0, int64_t rows, int64_t dim, int mode,
                             DType lowp) {
  RmsNormRun r;
  r.res = res0;
  r.want = x;  // mode 2 normalises it in place; otherwise overwritten below
  std::vector<float> x_cpu = x;
  r.want_lowp.resize(rows * dim);
  RmsNormCpu({.x = x_cpu.data(),
              .residual = mode == 1 ? r.res.data() : nullptr,
              .weight = w.data(),
              .out = mode == 2 ? x_cpu.data() : r.want.data(),
              .rows = rows,
              .dim = dim,
              .eps = 1e-5f,
              .out_lowp = r.want_lowp.data(),
              .out_lowp_dtype = lowp},
             nullptr);
  if (mode == 2) r.want = x_cpu;
  DeviceBuffer<float> d_x(x), d_w(w), d_res(res0), d_out(rows * dim);
  DeviceBuffer<uint16_t> d_lowp(rows * dim);
  EXPECT_EQ(cuda::RmsNormCuda({.x = d_x.get(),
                               .residual = mode == 1 ? d_res.get() : nullptr,
                               .weight = d_w.get(),
                               .out = mode == 2 ? d_x.get() : d_out.get(),
                               .rows = rows,
                               .dim = dim,
                               .eps = 1e-5f,
                               .out_lowp = d_lowp.get(),
                               .out_lowp_dtype = lowp},
                              nullptr),
            cudaSuccess);
  r.got = mode == 2 ? d_x.Download() : d_out.Download();
  r.got_res = d_res.Download();
  r.got_lowp = d_lowp.Download();
  return r;
}

TEST_F(CudaOpsTest, RmsNormPlainResidualAndInPlace) {
  std::mt19937 rng(31);
  for (int64_t rows : {1, 7}) {
    for (int64_t dim : {8, 1000, 4096, 5000}) {  // 5000: more than the kernel keeps in registers
      for (int mode = 0; mode < 3; ++mode) {     // 0 plain, 1 fused residual, 2 out aliases x
        const std::vector<float> x = RandomVector(rng, rows * dim, -3.0f, 3.0f);
        const std::vector<float> w = RandomVector(rng, dim);
        const std::vector<float> res0 = RandomVector(rng, rows * dim);
        // The 16-bit copy of the output for the next GEMM (out_lowp), in both types.
        const DType lowp = (mode + dim) % 2 == 0 ? DType::kBF16 : DType::kF16;
        const RmsNormRun r = RmsNormCpuAndCuda(x, w, res0, rows, dim, mode, lowp);
        const std::string what = "rows=" + std::to_string(rows) + " dim=" + std::to_string(dim) +
                                 " mode=" + std::to_string(mode);
        ExpectAllNear(ToDouble(r.want), r.got.data(), kF32Tol, kF32Tol, what);
        ExpectRoundedCopy(r.want, lowp, r.want_lowp, what + " cpu");
        ExpectRoundedCopy(r.got, lowp, r.got_lowp, what);
        if (mode == 1) {
          ExpectAllNear(ToDouble(r.res), r.got_res.data(), 0, 0, what + " residual");
        }
      }
    }
  }
}

// RoPE with p's shape at `positions`: RopeCpu in place on *x, RopeCuda on a device copy of the
// same input; returns the device's result.
std::vector<float> RopeCpuAndCuda(RopeParams p, const std::vector<int32_t>& positions,
                                  std::vector<float>* x) {
  DeviceBuffer<float> d_x(*x);
  DeviceBuffer<int32_t> d_pos(positions);
  p.x = x->data();
  p.positions = positions.data();
  RopeCpu(p, nullptr);
  p.x = d_x.get();
  p.positions = d_pos.get();
  EXPECT_EQ(cuda::RopeCuda(p, nullptr), cudaSuccess);
  return d_x.Download();
}

TEST_F(CudaOpsTest, RopeBothStyles) {
  std::mt19937 rng(32);
  const std::vector<int32_t> positions = {0, 1, 7, 4095, 500000, 1000000, 123457};
  struct Shape {
    int64_t heads, head_dim, rotary_dim;
  };
  for (RopeStyle style : {RopeStyle::kInterleaved, RopeStyle::kHalf}) {
    for (Shape sh : {Shape{3, 16, 16}, Shape{2, 64, 32}, Shape{32, 128, 128}, Shape{1, 10, 6},
                     Shape{2, 256, 200}}) {
      for (float theta : {10000.0f, 1000000.0f}) {
        const int64_t tokens = static_cast<int64_t>(positions.size());
        std::vector<float> x = RandomVector(rng, tokens * sh.heads * sh.head_dim);
        const std::vector<float> got = RopeCpuAndCuda({.x = nullptr,  // (set by RopeCpuAndCuda)
                                                       .positions = nullptr,
                                                       .tokens = tokens,
                                                       .heads = sh.heads,
                                                       .head_dim = sh.head_dim,
                                                       .rotary_dim = sh.rotary_dim,
                                                       .theta = theta,
                                                       .style = style},
                                                      positions, &x);
        ExpectAllNear(ToDouble(x), got.data(), kF32Tol, kF32Tol,
                      std::string(style == RopeStyle::kHalf ? "half" : "interleaved") + " d=" +
                          std::to_string(sh.head_dim) + " rot=" + std::to_string(sh.rotary_dim));
      }
    }
  }
}

// DeepSeek's yarn: an explicit frequency table and an mscale on cos/sin, at a row stride wider
// than the rotated part (q_pe after q_nope in each head).
TEST_F(CudaOpsTest, RopeYarnTableAndMscale) {
  std::mt19937 rng(35);
  const std::vector<int32_t> positions = {0, 3, 1023, 4095, 70000};
  std::vector<double> inv_freq(8);
  for (size_t i = 0; i < inv_freq.size(); ++i) inv_freq[i] = std::pow(10000.0, -0.25 * i) / 3.0;
  const int64_t tokens = static_cast<int64_t>(positions.size()), heads = 4, stride = 48;
  std::vector<float> x = RandomVector(rng, tokens * heads * stride);
  DeviceBuffer<float> d_x(x);
  DeviceBuffer<int32_t> d_pos(positions);
  DeviceBuffer<double> d_freq(inv_freq);
  RopeParams p{.x = x.data() + 32,
               .positions = positions.data(),
               .tokens = tokens,
               .heads = heads,
               .head_dim = stride,
               .rotary_dim = 16,
               .theta = 10000.0f,
               .style = RopeStyle::kInterleaved,
               .inv_freq = inv_freq.data(),
               .mscale = 1.0249f};
  RopeCpu(p, nullptr);
  p.x = d_x.get() + 32;
  p.positions = d_pos.get();
  p.inv_freq = d_freq.get();
  ASSERT_EQ(cuda::RopeCuda(p, nullptr), cudaSuccess);
  ExpectAllNear(ToDouble(x), d_x.Download().data(), kF32Tol, kF32Tol, "yarn rope");
}

TEST_F(CudaOpsTest, SiluMul) {
  std::mt19937 rng(33);
  for (int64_t n : {1, 1000, 100003}) {
    const std::vector<float> g = RandomVector(rng, n, -12.0f, 12.0f);
    const std::vector<float> u = RandomVector(rng, n, -3.0f, 3.0f);
    std::vector<float> want(n);
    SiluMulCpu({.gate = g.data(), .up = u.data(), .out = want.data(), .n = n}, nullptr);
    DeviceBuffer<float> d_g(g), d_u(u);
    DeviceBuffer<uint16_t> d_lowp(n);
    const DType lowp = n % 2 == 0 ? DType::kBF16 : DType::kF16;
    // In place on gate, as the CPU contract allows.
    ASSERT_EQ(cuda::SiluMulCuda({.gate = d_g.get(),
                                 .up = d_u.get(),
                                 .out = d_g.get(),
                                 .n = n,
                                 .out_lowp = d_lowp.get(),
                                 .out_lowp_dtype = lowp},
                                nullptr),
              cudaSuccess);
    const std::vector<float> got = d_g.Download();
    ExpectAllNear(ToDouble(want), got.data(), kF32Tol, kF32Tol, "n=" + std::to_string(n));
    ExpectRoundedCopy(got, lowp, d_lowp.Download(), "n=" + std::to_string(n));
  }
  // Rows of a fused gate|up GEMM output ([rows][2 * cols]) into [rows][cols].
  const int64_t rows = 7, cols = 333;
  const std::vector<float> h13 = RandomVector(rng, rows * 2 * cols, -8.0f, 8.0f);
  std::vector<float> want(rows * cols);
  std::vector<uint16_t> want_lowp(rows * cols);
  SiluMulCpu({.gate = h13.data(),
              .up = h13.data() + cols,
              .out = want.data(),
              .n = rows * cols,
              .cols = cols,
              .ld = 2 * cols,
              .out_lowp = want_lowp.data()},
             nullptr);
  ExpectRoundedCopy(want, DType::kBF16, want_lowp, "strided rows cpu");
  DeviceBuffer<float> d_h13(h13), d_out(rows * cols);
  DeviceBuffer<uint16_t> d_lowp(rows * cols);
  ASSERT_EQ(cuda::SiluMulCuda({.gate = d_h13.get(),
                               .up = d_h13.get() + cols,
                               .out = d_out.get(),
                               .n = rows * cols,
                               .cols = cols,
                               .ld = 2 * cols,
                               .out_lowp = d_lowp.get()},
                              nullptr),
            cudaSuccess);
  const std::vector<float> got = d_out.Download();
  ExpectAllNear(ToDouble(want), got.data(), kF32Tol, kF32Tol, "strided rows");
  ExpectRoundedCopy(got, DType::kBF16, d_lowp.Download(), "strided rows");
}

// NaN, +inf and -inf in x, the residual and the weight, on the register path (dim <= 4096) and
// the looping one: an infinite row's scale is 0 (its finite entries become 0, its infinite ones
// NaN), a NaN row is NaN, an infinite weight makes its column infinite (NaN in rows scaled by
// 0). The output, the residual sum and the 16-bit copy all as the CPU's.
TEST_F(CudaOpsTest, RmsNormNonFiniteInputs) {
  std::mt19937 rng(61);
  const int64_t rows = 5;
  for (int64_t dim : {8, 1000, 5000}) {
    for (int mode = 0; mode < 3; ++mode) {  // 0 plain, 1 fused residual, 2 out aliases x
      std::vector<float> x = RandomVector(rng, rows * dim, -3.0f, 3.0f);
      std::vector<float> w = RandomVector(rng, dim);
      std::vector<float> res0 = RandomVector(rng, rows * dim);
      x[0 * dim + 1] = kNaN;
      x[1 * dim + dim - 1] = kInf;  // the last element: the threads' partial last round
      x[2 * dim + 2] = -kInf;
      x[2 * dim + dim / 2] = kInf;
      x[3 * dim + dim - 2] = 2.0f;  // rows 3 and 4: finite, so weight dim - 2 gives +inf, -inf
      x[4 * dim + dim - 2] = -1.5f;
      w[dim - 2] = kInf;
      w[3] = kNaN;
      if (mode == 1) {                    // rows 3 and 4 stay finite
        res0[1 * dim + dim - 1] = -kInf;  // -inf + inf: a NaN in the sum
        res0[2 * dim + 5] = kNaN;
        res0[0 * dim + 4] = kInf;
      }
      const DType lowp = (mode + dim) % 2 == 0 ? DType::kBF16 : DType::kF16;
      const RmsNormRun r = RmsNormCpuAndCuda(x, w, res0, rows, dim, mode, lowp);
      const std::string what =
          "non-finite dim=" + std::to_string(dim) + " mode=" + std::to_string(mode);
      ExpectAllNonFiniteKinds(r.want, what);
      ExpectAllNear(ToDouble(r.want), r.got.data(), kF32Tol, kF32Tol, what);
      // The GPU's 16-bit copy is its fp32 output rounded, and near the CPU's.
      std::vector<uint16_t> got_rounded(r.got.size());
      StoreLowp(r.got.data(), static_cast<int64_t>(r.got.size()), lowp, got_rounded.data());
      ExpectLowpNear(got_rounded, r.got_lowp, lowp, 0, what + " 16-bit copy");
      ExpectLowpNear(r.want_lowp, r.got_lowp, lowp, lowp == DType::kBF16 ? 1e-2 : 1e-3,
                     what + " 16-bit copy vs cpu");
      if (mode == 1) {
        ExpectAllNear(ToDouble(r.res), r.got_res.data(), 0, 0, what + " residual");
      }
    }
  }
}

// x of `tokens` tokens of `heads` heads of 16 (12 rotated, 4 passed through) with NaN, +inf and
// -inf in rotated pairs (one or both elements) and in the passed-through dims.
std::vector<float> RopeNonFiniteX(std::mt19937& rng, int64_t tokens, int64_t heads) {
  std::vector<float> x = RandomVector(rng, tokens * heads * 16);
  for (int64_t t = 0; t < tokens; ++t) {
    float* xh = x.data() + (t * heads + heads - 1) * 16;  // the last head; the others finite
    xh[0] = kInf;
    xh[2] = -kInf;
    xh[3] = kInf;
    xh[6] = -kInf;
    xh[9] = kNaN;
    xh[13] = -kInf;
    xh[15] = kInf;
  }
  return x;
}

// Non-finite values through RoPE, both styles: at position 0 (sin = 0) an infinite element makes
// its partner NaN; elsewhere infinities keep or swap sign with cos and sin; passed-through dims
// stay as they are.
TEST_F(CudaOpsTest, RopeNonFiniteInputs) {
  std::mt19937 rng(62);
  const std::vector<int32_t> positions = {0, 1, 4095, 123457};
  const int64_t tokens = static_cast<int64_t>(positions.size()), heads = 3;
  for (RopeStyle style : {RopeStyle::kInterleaved, RopeStyle::kHalf}) {
    std::vector<float> x = RopeNonFiniteX(rng, tokens, heads);
    const std::vector<float> got = RopeCpuAndCuda({.x = nullptr,  // (set by RopeCpuAndCuda)
                                                   .positions = nullptr,
                                                   .tokens = tokens,
                                                   .heads = heads,
                                                   .head_dim = 16,
                                                   .rotary_dim = 12,
                                                   .theta = 10000.0f,
                                                   .style = style},
                                                  positions, &x);
    const std::string what = style == RopeStyle::kHalf ? "half" : "interleaved";
    ExpectAllNonFiniteKinds(x, what);
    ExpectAllNear(ToDouble(x), got.data(), kF32Tol, kF32Tol, what);
  }
}

// One token, and none: zero tokens is a no-op that reads nothing (no positions, x untouched).
TEST_F(CudaOpsTest, RopeOneTokenAndNone) {
  std::mt19937 rng(63);
  for (RopeStyle style : {RopeStyle::kInterleaved, RopeStyle::kHalf}) {
    const std::vector<int32_t> positions = {77777};
    std::vector<float> x = RandomVector(rng, 4 * 64);
    const std::vector<float> x0 = x;
    DeviceBuffer<float> d_x(x);
    DeviceBuffer<int32_t> d_pos(positions);
    RopeParams p{.x = x.data(),
                 .positions = positions.data(),
                 .tokens = 1,
                 .heads = 4,
                 .head_dim = 64,
                 .rotary_dim = 64,
                 .theta = 500000.0f,
                 .style = style};
    RopeCpu(p, nullptr);
    EXPECT_NE(x, x0);
    p.x = d_x.get();
    p.positions = d_pos.get();
    ASSERT_EQ(cuda::RopeCuda(p, nullptr), cudaSuccess);
    const std::vector<float> got = d_x.Download();
    ExpectAllNear(ToDouble(x), got.data(), kF32Tol, kF32Tol, "one token");
    p.tokens = 0;
    p.positions = nullptr;
    ASSERT_EQ(cuda::RopeCuda(p, nullptr), cudaSuccess);
    EXPECT_EQ(d_x.Download(), got) << "zero tokens";
  }
}

// SiLU·mul of NaN, +inf and -inf in gate and up, on the CPU's 8-wide path (the first 32) and
// its scalar tail (the last 6).
TEST_F(CudaOpsTest, SiluMulNonFiniteInputs) {
  std::mt19937 rng(64);
  const int64_t n = 38;
  std::vector<float> g = RandomVector(rng, n, -4.0f, 4.0f);
  std::vector<float> u = RandomVector(rng, n, -3.0f, 3.0f);
  for (int64_t base : {0, 32}) {
    g[base + 0] = kNaN;
    u[base + 1] = kNaN;
    g[base + 2] = kInf;
    u[base + 2] = 2.0f;  // +inf
    g[base + 3] = kInf;
    u[base + 3] = -0.5f;  // -inf
    g[base + 4] = 1.5f;
    u[base + 4] = -kInf;  // -inf
  }
  g[10] = kInf;
  u[10] = 0.0f;  // inf * 0: NaN
  g[11] = 0.0f;
  u[11] = kInf;  // NaN
  g[12] = 2.0f;
  u[12] = kInf;
  // A -inf gate: -inf / (1 + e^inf) = NaN on the 8-wide path (vec::Exp overflows to +inf as
  // std::exp does) and in the scalar tail.
  g[5] = -kInf;
  u[5] = 1.0f;
  g[37] = -kInf;
  u[37] = 1.0f;
  std::vector<float> want(n);
  std::vector<uint16_t> want_lowp(n);
  SiluMulCpu({.gate = g.data(),
              .up = u.data(),
              .out = want.data(),
              .n = n,
              .out_lowp = want_lowp.data(),
              .out_lowp_dtype = DType::kF16},
             nullptr);
  ExpectAllNonFiniteKinds(want, "silu");
  DeviceBuffer<float> d_g(g), d_u(u), d_out(n);
  DeviceBuffer<uint16_t> d_lowp(n);
  ASSERT_EQ(cuda::SiluMulCuda({.gate = d_g.get(),
                               .up = d_u.get(),
                               .out = d_out.get(),
                               .n = n,
                               .out_lowp = d_lowp.get(),
                               .out_lowp_dtype = DType::kF16},
                              nullptr),
            cudaSuccess);
  const std::vector<float> got = d_out.Download();
  ExpectAllNear(ToDouble(want), got.data(), kF32Tol, kF32Tol, "silu");
  ExpectLowpNear(want_lowp, d_lowp.Download(), DType::kF16, 1e-3, "silu 16-bit copy");
}

// ---------------------------------------------------------------------------------------------
// K/V write and embedding: exact (conversions round to nearest even on both backends).

// Pool contents as floats (NaN stays NaN) for an exact comparison.
std::vector<double> PoolValues(const KvPoolView& v, const unsigned char* bytes, int64_t blocks) {
  std::vector<double> out(blocks * v.block_elems());
  for (size_t i = 0; i < out.size(); ++i) {
    uint16_t h;
    switch (v.dtype) {
      case DType::kF32:
        out[i] = reinterpret_cast<const float*>(bytes)[i];
        break;
      case DType::kF16:
        std::memcpy(&h, bytes + 2 * i, 2);
        out[i] = HalfToFloat(h);
        break;
      case DType::kBF16:
        std::memcpy(&h, bytes + 2 * i, 2);
        out[i] = Bf16ToFloat(h);
        break;
    }
  }
  return out;
}

TEST_F(CudaOpsTest, WriteKvBatchAndSingle) {
  std::mt19937 rng(34);
  for (DType dt : {DType::kF32, DType::kF16, DType::kBF16}) {
    Pool pool(dt, 3, 2, 4, 8, 5);
    pool.FillRandom(rng);
    const int64_t tokens = 6, hd = 2 * 8;
    std::vector<float> k = RandomVector(rng, tokens * hd, -2.0f, 2.0f);
    std::vector<float> v = RandomVector(rng, tokens * hd, -2.0f, 2.0f);
    // Values that exercise the rounding: half overflow / tie, subnormals, NaN, inf.
    k[0] = 65520.0f;
    k[1] = 65519.0f;
    k[2] = 1e-7f;
    k[3] = std::nanf("");
    k[4] = -kInf;
    k[5] = 1.00048828125f;  // half tie
    v[0] = 3.0e38f;
    const std::vector<int32_t> block = {3, 0, -1, 4, 3, 1};  // -1: not this rank's token
    const std::vector<int32_t> slot = {1, 3, 0, 0, 2, 1};
    const int64_t layer = 2;
    DeviceBuffer<unsigned char> d_pool(pool.host);
    KvPoolView dv = pool.view;
    dv.base = d_pool.get();
    DeviceBuffer<float> d_k(k), d_v(v);
    DeviceBuffer<int32_t> d_block(block), d_slot(slot);
    ASSERT_EQ(cuda::WriteKvBatchCuda({.kv = dv,
                                      .layer = layer,
                                      .k = d_k.get(),
                                      .v = d_v.get(),
                                      .block = d_block.get(),
                                      .token_in_block = d_slot.get(),
                                      .tokens = tokens - 1},
                                     nullptr),
              cudaSuccess);
    // The last token through the single-token launcher.
    ASSERT_EQ(cuda::WriteKvCuda(dv, block[5], layer, slot[5], d_k.get() + 5 * hd,
                                d_v.get() + 5 * hd, nullptr),
              cudaSuccess);
    for (int64_t t = 0; t < tokens; ++t) {
      if (block[t] >= 0) {
        WriteKv(pool.view, block[t], layer, slot[t], k.data() + t * hd, v.data() + t * hd);
      }
    }
    const std::vector<unsigned char> got = d_pool.Download();
    const std::vector<double> got_v = PoolValues(pool.view, got.data(), pool.blocks);
    const std::vector<float> got_f(got_v.begin(), got_v.end());
    ExpectAllNear(PoolValues(pool.view, pool.host.data(), pool.blocks), got_f.data(), 0, 0,
                  DTypeName(dt));
  }
}

// Rows of an f32, f16 or bf16 table as fp32, NaN and infinities included; ids outside
// [0, vocab) give zeros.
TEST_F(CudaOpsTest, EmbeddingGather) {
  std::mt19937 rng(35);
  const int64_t vocab = 50, dim = 24;
  const std::vector<int32_t> ids = {0, 49, 7, 7, -1, 50, 13};
  for (DType dt : {DType::kF32, DType::kF16, DType::kBF16}) {
    std::vector<float> table = RandomVector(rng, vocab * dim);
    table[7 * dim + 3] = kNaN;  // gathered twice
    table[49 * dim + dim - 1] = kInf;
    table[13 * dim] = -kInf;
    table[20 * dim + 1] = kNaN;  // not gathered
    std::vector<unsigned char> bytes(vocab * dim * DTypeSize(dt));
    std::vector<float> want(ids.size() * dim, 0.0f);
    for (int64_t i = 0; i < vocab * dim; ++i) {
      if (dt == DType::kF32) {
        std::memcpy(bytes.data() + 4 * i, &table[i], 4);
      } else {
        const uint16_t h = ToStorage(dt, table[i]);
        std::memcpy(bytes.data() + 2 * i, &h, 2);
      }
    }
    for (size_t i = 0; i < ids.size(); ++i) {
      if (ids[i] < 0 || ids[i] >= vocab) {
        continue;
      }
      for (int64_t e = 0; e < dim; ++e) {
        const int64_t off = ids[i] * dim + e;
        uint16_t h;
        if (dt == DType::kF32) {
          want[i * dim + e] = table[off];
        } else {
          std::memcpy(&h, bytes.data() + 2 * off, 2);
          want[i * dim + e] = dt == DType::kF16 ? HalfToFloat(h) : Bf16ToFloat(h);
        }
      }
    }
    DeviceBuffer<unsigned char> d_table(bytes);
    DeviceBuffer<int32_t> d_ids(ids);
    DeviceBuffer<float> d_out(ids.size() * dim);
    ASSERT_EQ(cuda::EmbeddingCuda({.table = d_table.get(),
                                   .dtype = dt,
                                   .ids = d_ids.get(),
                                   .out = d_out.get(),
                                   .n = static_cast<int64_t>(ids.size()),
                                   .dim = dim,
                                   .vocab = vocab},
                                  nullptr),
              cudaSuccess);
    ExpectAllNonFiniteKinds(want, DTypeName(dt));
    ExpectAllNear(ToDouble(want), d_out.Download().data(), 0, 0, DTypeName(dt));
  }
}

// ---------------------------------------------------------------------------------------------
// Token selection, against engine/sampler itself.

TEST_F(CudaOpsTest, ArgmaxMatchesGreedySampler) {
  std::mt19937 rng(36);
  std::vector<std::vector<float>> rows;
  for (int64_t vocab : {1, 7, 32000, 151936}) {
    rows.push_back(RandomVector(rng, vocab, -10.0f, 10.0f));
  }
  std::vector<float> ties = RandomVector(rng, 5000);
  for (float& x : ties) {
    x = std::round(x * 2.0f);  // many equal maxima: the lowest id wins
  }
  rows.push_back(ties);
  std::vector<float> nan0 = RandomVector(rng, 100);
  nan0[0] = std::nanf("");  // NaN is never the largest, at index 0 too
  rows.push_back(nan0);
  std::vector<float> no_token(64, std::nanf(""));  // nothing but NaN and -inf: no token
  no_token[10] = -kInf;
  rows.push_back(no_token);
  std::vector<float> nan_mid = RandomVector(rng, 100);
  nan_mid[40] = std::nanf("");
  nan_mid[60] = 5.0f;
  rows.push_back(nan_mid);
  rows.push_back(std::vector<float>(300, -kInf));
  std::vector<float> late = std::vector<float>(2000, -1.0f);
  late[1999] = kInf;
  rows.push_back(late);
  std::vector<float> odd = RandomVector(rng, 1001);  // no 16-byte loads
  odd[1000] = 9.0f;
  rows.push_back(odd);
  rows.push_back(RandomVector(rng, 1001));
  // Chunked rows' edge cases: a NaN at index 0 of a long row, equal maxima in different chunks,
  // a long all -inf row, the winner in the short last chunk, and no 16-byte loads.
  std::vector<float> nan0_long = RandomVector(rng, 20000);
  nan0_long[0] = std::nanf("");
  rows.push_back(nan0_long);
  std::vector<float> tie_chunks(20000, 1.0f);
  tie_chunks[19999] = 3.0f;
  tie_chunks[7001] = 3.0f;
  rows.push_back(tie_chunks);
  rows.push_back(std::vector<float>(9000, -kInf));
  std::vector<float> last_chunk = RandomVector(rng, 128 * 32 + 8);
  last_chunk[128 * 32 + 7] = 11.0f;
  rows.push_back(last_chunk);
  std::vector<float> odd_long = RandomVector(rng, 10001);
  odd_long[5003] = 12.0f;
  rows.push_back(odd_long);
  for (bool chunked : {false, true}) {
    for (size_t r = 0; r < rows.size(); ++r) {
      SamplingParams sp;
      sp.temperature = 0;
      std::vector<float> copy = rows[r];
      const SampleResult host =
          Sampler(sp, {}).Sample(copy.data(), static_cast<int64_t>(copy.size()));
      const int32_t want = host.status.ok() ? host.token : cuda::kArgmaxNoToken;
      DeviceBuffer<float> d_logits(rows[r]);
      DeviceBuffer<int32_t> d_out(1);
      cuda::ArgmaxParams p{.logits = d_logits.get(),
                           .out = d_out.get(),
                           .rows = 1,
                           .vocab = static_cast<int64_t>(rows[r].size())};
      DeviceBuffer<unsigned char> ws(cuda::ArgmaxCudaWorkspaceBytes(p));
      if (chunked) {
        p.workspace = ws.get();
        EXPECT_EQ(ws.size() > 0, rows[r].size() > 128) << "row " << r << " is chunked";
      }
      ASSERT_EQ(cuda::ArgmaxCuda(p, nullptr), cudaSuccess);
      EXPECT_EQ(d_out.Download()[0], want) << "row " << r << (chunked ? " chunked" : "");
    }
    // Several rows in one launch; row r of the first `vocab` has its maximum at r (every
    // position of every chunk, its first and last included, wins once).
    const int64_t vocab = 300, n = vocab + 5;
    std::vector<float> batch = RandomVector(rng, vocab * n);
    for (int64_t r = 0; r < vocab; ++r) {
      batch[r * vocab + r] = 2.0f;
    }
    DeviceBuffer<float> d_batch(batch);
    DeviceBuffer<int32_t> d_out(n);
    cuda::ArgmaxParams p{.logits = d_batch.get(), .out = d_out.get(), .rows = n, .vocab = vocab};
    DeviceBuffer<unsigned char> ws(cuda::ArgmaxCudaWorkspaceBytes(p));
    if (chunked) {
      p.workspace = ws.get();
    }
    ASSERT_EQ(cuda::ArgmaxCuda(p, nullptr), cudaSuccess);
    const std::vector<int32_t> got = d_out.Download();
    for (int64_t r = 0; r < n; ++r) {
      EXPECT_EQ(got[r],
                std::max_element(batch.begin() + r * vocab, batch.begin() + (r + 1) * vocab) -
                    (batch.begin() + r * vocab))
          << "batch row " << r << (chunked ? " chunked" : "");
    }
  }
}

// SampleCuda over the rows of `logits` (each `vocab` long) with each row's knobs and draw u;
// *out gets the tokens it picked.
void SampleRows(const std::vector<float>& logits, int64_t vocab, const std::vector<float>& temp,
                const std::vector<int32_t>& top_k, const std::vector<float>& top_p,
                const std::vector<float>& min_p, const std::vector<double>& u,
                std::vector<int32_t>* out) {
  const int64_t rows = static_cast<int64_t>(temp.size());
  DeviceBuffer<float> d_logits(logits), d_t(temp), d_p(top_p), d_m(min_p);
  DeviceBuffer<int32_t> d_k(top_k), d_out(rows);
  DeviceBuffer<double> d_u(u);
  ASSERT_EQ(cuda::SampleCuda({.logits = d_logits.get(),
                              .temperature = d_t.get(),
                              .top_k = d_k.get(),
                              .top_p = d_p.get(),
                              .min_p = d_m.get(),
                              .u = d_u.get(),
                              .out = d_out.get(),
                              .rows = rows,
                              .vocab = vocab},
                             nullptr),
            cudaSuccess);
  *out = d_out.Download();
}

TEST_F(CudaOpsTest, SampleMatchesSamplerGivenItsDraw) {
  std::mt19937 rng(37);
  struct Knobs {
    float temperature;
    int32_t top_k;
    float top_p, min_p;
  };
  const std::vector<Knobs> knobs = {{1.0f, 0, 1.0f, 0.0f},    {0.7f, 40, 1.0f, 0.0f},
                                    {1.0f, 0, 0.9f, 0.0f},    {1.5f, 50, 0.5f, 0.0f},
                                    {1.0f, 0, 1.0f, 0.05f},   {0.8f, 1, 1.0f, 0.0f},
                                    {1.0f, 999, 0.95f, 0.02f}};
  int mismatches = 0, total = 0;
  for (int64_t vocab : {1000, 32000}) {
    for (bool tied : {false, true}) {
      for (const Knobs& kn : knobs) {
        for (uint64_t seed = 1; seed <= 6; ++seed) {
          std::vector<float> logits = RandomVector(rng, vocab, -8.0f, 8.0f);
          if (tied) {
            for (float& x : logits) {
              x = std::round(x);  // long runs of equal scores: ties cut by id
            }
          }
          SamplingParams sp;
          sp.temperature = kn.temperature;
          sp.top_k = kn.top_k;
          sp.top_p = kn.top_p;
          sp.min_p = kn.min_p;
          sp.seed = seed;
          std::vector<float> copy = logits;
          const int32_t want = Sampler(sp, {}).Sample(copy.data(), vocab).token;
          // The sampler's one draw from its generator.
          std::mt19937_64 gen(seed);
          const double u = std::uniform_real_distribution<double>(0.0, 1.0)(gen);
          std::vector<int32_t> picked;
          ASSERT_NO_FATAL_FAILURE(SampleRows(logits, vocab, {kn.temperature}, {kn.top_k},
                                             {kn.top_p}, {kn.min_p}, {u}, &picked));
          const int32_t got = picked[0];
          ++total;
          if (got != want) {
            ++mismatches;
            ADD_FAILURE() << "vocab=" << vocab << " tied=" << tied << " T=" << kn.temperature
                          << " top_k=" << kn.top_k << " top_p=" << kn.top_p << " min_p=" << kn.min_p
                          << " seed=" << seed << ": got " << got << " want " << want;
          }
        }
      }
    }
  }
  EXPECT_EQ(mismatches, 0) << "of " << total;
}

// Non-finite logits as the sampler takes them: NaN is no candidate, +inf logits share the
// mass, and a row with nothing else gives no token.
TEST_F(CudaOpsTest, SampleTakesNonFiniteLogitsAsTheSamplerDoes) {
  std::mt19937 rng(39);
  const int64_t vocab = 3000;
  std::vector<std::vector<float>> rows;
  std::vector<float> nan = RandomVector(rng, vocab, -8.0f, 8.0f);
  for (int64_t i = 0; i < vocab; i += 3) nan[i] = std::nanf("");
  rows.push_back(nan);
  std::vector<float> two_inf = RandomVector(rng, vocab, -8.0f, 8.0f);
  two_inf[17] = two_inf[2500] = kInf;
  two_inf[40] = std::nanf("");
  rows.push_back(two_inf);
  std::vector<float> none(vocab, -kInf);
  none[5] = std::nanf("");
  rows.push_back(none);
  std::vector<float> twenty_inf = RandomVector(rng, vocab, -8.0f, 8.0f);
  for (int i = 0; i < 20; ++i) twenty_inf[i * 100] = kInf;  // top_p 0.5: exactly 10 of them
  rows.push_back(twenty_inf);
  for (size_t r = 0; r < rows.size(); ++r) {
    for (uint64_t seed = 1; seed <= 8; ++seed) {
      for (float min_p : {0.0f, 0.1f}) {
        SamplingParams sp;
        sp.seed = seed;
        sp.min_p = min_p;
        sp.top_p = seed % 2 ? 0.9f : (seed % 4 ? 0.5f : 1.0f);
        std::vector<float> copy = rows[r];
        const SampleResult host = Sampler(sp, {}).Sample(copy.data(), vocab);
        const int32_t want = host.status.ok() ? host.token : cuda::kArgmaxNoToken;
        std::mt19937_64 gen(seed);
        const double u = std::uniform_real_distribution<double>(0.0, 1.0)(gen);
        std::vector<int32_t> picked;
        ASSERT_NO_FATAL_FAILURE(
            SampleRows(rows[r], vocab, {1.0f}, {0}, {sp.top_p}, {min_p}, {u}, &picked));
        EXPECT_EQ(picked[0], want) << "row " << r << " seed " << seed << " min_p " << min_p;
      }
    }
  }
}

// A captured decode step samples every row both ways: rows with temperature 0 (greedy, and the
// graph's padding) are skipped with -1, and the rows around them still sample as alone.
TEST_F(CudaOpsTest, SampleSkipsGreedyRows) {
  std::mt19937 rng(41);
  const int64_t vocab = 5000, rows = 4;
  const std::vector<float> logits = RandomVector(rng, vocab * rows, -8.0f, 8.0f);
  const std::vector<float> temps = {0.9f, 0.0f, 1.2f, 0.0f};
  const std::vector<double> us = {0.25, 0.5, 0.75, 0.1};
  std::vector<int32_t> want(rows, -1);
  for (int64_t r = 0; r < rows; ++r) {
    if (temps[r] == 0.0f) continue;
    std::vector<int32_t> alone;
    ASSERT_NO_FATAL_FAILURE(
        SampleRows(std::vector<float>(logits.begin() + r * vocab, logits.begin() + (r + 1) * vocab),
                   vocab, {temps[r]}, {0}, {1.0f}, {0.0f}, {us[r]}, &alone));
    want[r] = alone[0];
    ASSERT_GE(want[r], 0);
  }
  std::vector<int32_t> got;
  ASSERT_NO_FATAL_FAILURE(SampleRows(logits, vocab, temps, std::vector<int32_t>(rows, 0),
                                     std::vector<float>(rows, 1.0f), std::vector<float>(rows, 0.0f),
                                     us, &got));
  EXPECT_EQ(got, want);
}

// ---------------------------------------------------------------------------------------------
// Decode GEMV (16-bit weights, fp32 x, no cuBLAS): GemmCpu's products up to summation order.

TEST_F(CudaOpsTest, GemvMatchesGemmCpu) {
  std::mt19937 rng(43);
  struct Shape {
    int64_t m, n, k;
  };
  for (DType dt : {DType::kBF16, DType::kF16}) {
    // k: one chunk, whole unrolled steps, and partial ones (1032 = 4 * 256 + 8, 2056).
    // k >= 4096: four warps per row (a partial last round at 8200).
    for (Shape sh : {Shape{1, 1, 8}, Shape{1, 37, 256}, Shape{2, 100, 1032}, Shape{3, 64, 4096},
                     Shape{4, 9, 2056}, Shape{1, 13, 8200}}) {
      for (bool bias : {false, true}) {
        const std::vector<float> x = RandomVector(rng, sh.m * sh.k);
        const std::vector<uint16_t> w16 = RandomLowp(rng, sh.n * sh.k, dt);
        const std::vector<float> b = RandomVector(rng, sh.n);
        std::vector<float> want(sh.m * sh.n);
        GemmParams p{.x = x.data(),
                     .w = w16.data(),
                     .bias = bias ? b.data() : nullptr,
                     .y = want.data(),
                     .m = sh.m,
                     .n = sh.n,
                     .k = sh.k,
                     .w_dtype = dt};
        GemmCpu(p, nullptr);
        DeviceBuffer<float> d_x(x), d_b(b), d_y(std::vector<float>(sh.m * sh.n, NAN));
        DeviceBuffer<uint16_t> d_w(w16);
        p.x = d_x.get();
        p.w = d_w.get();
        p.bias = bias ? d_b.get() : nullptr;
        p.y = d_y.get();
        const std::string what = std::string(DTypeName(dt)) + " m=" + std::to_string(sh.m) +
                                 " n=" + std::to_string(sh.n) + " k=" + std::to_string(sh.k) +
                                 (bias ? " bias" : "");
        ASSERT_TRUE(cuda::GemvApplies(p)) << what;
        ASSERT_EQ(cuda::GemvCuda(p, nullptr), cudaSuccess) << what;
        const std::vector<float> got = d_y.Download();
        ExpectAllNear(ToDouble(want), got.data(), 1e-4, 1e-4, what);
        // Fused residual add: y += the product, bit for bit the product then the add.
        const std::vector<float> r = RandomVector(rng, sh.m * sh.n);
        std::vector<float> want_acc(r.size());
        for (size_t i = 0; i < r.size(); ++i) want_acc[i] = r[i] + got[i];
        DeviceBuffer<float> d_acc(r);
        GemmParams pa = p;
        pa.y = d_acc.get();
        GemmFusion acc;
        acc.accumulate = true;
        ASSERT_TRUE(cuda::GemvFusionApplies(pa, acc, false)) << what;
        ASSERT_EQ(cuda::GemvCuda(pa, nullptr, acc), cudaSuccess) << what;
        EXPECT_EQ(std::memcmp(d_acc.Download().data(), want_acc.data(), r.size() * sizeof(float)),
                  0)
            << what << " accumulate";
        // Fused RMSNorm of x: bit for bit RmsNormCuda into scratch, then the GEMV of that.
        const std::vector<float> g = RandomVector(rng, sh.k);
        DeviceBuffer<float> d_g(g), d_xn(sh.m * sh.k), d_yn(std::vector<float>(sh.m * sh.n, NAN));
        GemmFusion norm;
        norm.norm_weight = d_g.get();
        norm.norm_eps = 1e-5f;
        if (sh.m * sh.k > cuda::kGemvNormMaxFloats) {
          EXPECT_FALSE(cuda::GemvFusionApplies(p, norm, false)) << what;
          EXPECT_EQ(cuda::GemvCuda(p, nullptr, norm), cudaErrorInvalidValue) << what;
          continue;
        }
        ASSERT_EQ(cuda::RmsNormCuda({d_x.get(), nullptr, d_g.get(), d_xn.get(), sh.m, sh.k, 1e-5f},
                                    nullptr),
                  cudaSuccess);
        GemmParams pn = p;
        pn.x = d_xn.get();
        ASSERT_EQ(cuda::GemvCuda(pn, nullptr), cudaSuccess) << what;
        const std::vector<float> want_norm = d_y.Download();
        pn.x = d_x.get();
        pn.y = d_yn.get();
        ASSERT_TRUE(cuda::GemvFusionApplies(pn, norm, false)) << what;
        ASSERT_EQ(cuda::GemvCuda(pn, nullptr, norm), cudaSuccess) << what;
        EXPECT_EQ(
            std::memcmp(d_yn.Download().data(), want_norm.data(), want_norm.size() * sizeof(float)),
            0)
            << what << " norm";
      }
    }
  }
  // What it does not take: more rows, fp32 weights, k not a multiple of 8, unaligned x.
  DeviceBuffer<float> d_x(64 * 16);
  DeviceBuffer<uint16_t> d_w(64 * 16);
  GemmParams p{.x = d_x.get(),
               .w = d_w.get(),
               .bias = nullptr,
               .y = nullptr,
               .m = 1,
               .n = 16,
               .k = 64,
               .w_dtype = DType::kBF16};
  EXPECT_TRUE(cuda::GemvApplies(p));
  GemmParams q = p;
  q.m = cuda::kGemvMaxRows + 1;
  EXPECT_FALSE(cuda::GemvApplies(q));
  q = p;
  q.w_dtype = DType::kF32;
  EXPECT_FALSE(cuda::GemvApplies(q));
  q = p;
  q.k = 60;
  EXPECT_FALSE(cuda::GemvApplies(q));
  q = p;
  q.x = d_x.get() + 1;
  EXPECT_FALSE(cuda::GemvApplies(q));
  EXPECT_EQ(cuda::GemvCuda(q, nullptr), cudaErrorInvalidValue);
  // The norm is folded in where thread blocks x k stay small (SmolLM2-135M's products), not on
  // Llama-3.2-1B's.
  const auto shape = [&](int64_t n, int64_t k) {
    GemmParams s = p;
    s.n = n;
    s.k = k;
    return s;
  };
  EXPECT_TRUE(cuda::GemvNormPreferred(shape(960, 576), false));
  EXPECT_TRUE(cuda::GemvNormPreferred(shape(2 * 1536, 576), true));
  EXPECT_TRUE(cuda::GemvNormPreferred(shape(576, 1536), false));
  EXPECT_FALSE(cuda::GemvNormPreferred(shape(3072, 2048), false));
  EXPECT_FALSE(cuda::GemvNormPreferred(shape(2 * 8192, 2048), true));
  EXPECT_FALSE(cuda::GemvNormPreferred(shape(49152, 576), false));
  GemmParams rows4 = shape(960, 576);  // one row only
  rows4.m = 4;
  EXPECT_FALSE(cuda::GemvNormPreferred(rows4, false));
  // A residual add into x itself, or with SiLU·mul, is refused.
  GemmFusion acc;
  acc.accumulate = true;
  q = p;
  q.y = d_x.get();
  EXPECT_FALSE(cuda::GemvFusionApplies(q, acc, false));
  q.y = d_x.get() + 64 * 8;
  EXPECT_TRUE(cuda::GemvFusionApplies(q, acc, false));
  EXPECT_FALSE(cuda::GemvFusionApplies(q, acc, true));
  // Where a backend prefers it to cuBLAS: one row always; a few rows on small matrices only.
  EXPECT_TRUE(cuda::GemvPreferred(1, 128256, 2048));
  EXPECT_TRUE(cuda::GemvPreferred(4, 2048, 2048));
  EXPECT_FALSE(cuda::GemvPreferred(4, 3072, 2048));
  EXPECT_FALSE(cuda::GemvPreferred(4, 16384, 2048));
  EXPECT_FALSE(cuda::GemvPreferred(cuda::kGemvMaxRows + 1, 16, 64));
  EXPECT_FALSE(cuda::GemvPreferred(0, 16, 64));
}

// NaN, +inf and -inf in x, the weights (as 16-bit values), the bias and the residual: they
// propagate through the products as GemmCpu's do (inf - inf is NaN), plain, with the residual
// add, and with the RMSNorm folded in (an infinity in its weight; against RmsNormCpu then
// GemmCpu). Batch 1, 2 and 4; one warp per weight row and four (k >= 4096).
TEST_F(CudaOpsTest, GemvNonFiniteInputs) {
  std::mt19937 rng(69);
  struct Shape {
    int64_t m, n, k;
  };
  for (DType dt : {DType::kBF16, DType::kF16}) {
    for (Shape sh : {Shape{1, 7, 1032}, Shape{2, 16, 256}, Shape{4, 9, 4104}}) {
      const int64_t m = sh.m, n = sh.n, k = sh.k;
      std::vector<float> x = RandomVector(rng, m * k);
      std::vector<float> w = RandomVector(rng, n * k);
      std::vector<float> b = RandomVector(rng, n);
      x[3] = kInf;  // row 0: +-inf in every column, NaN where weight 5 is infinite too
      x[5] = 1.0f;
      if (m > 1) x[(m - 1) * k + k / 2] = kNaN;  // the last row: all NaN
      if (m > 2) x[1 * k + k - 1] = -kInf;
      w[(n - 1) * k + 5] = kInf;  // the last column
      w[1 * k + 7] = kNaN;        // column 1: all NaN
      w[2 * k + k - 2] = -kInf;   // column 2
      b[n / 2] = -kInf;
      std::vector<uint16_t> w16(n * k);
      StoreLowp(w.data(), n * k, dt, w16.data());
      const std::string what = std::string("non-finite ") + DTypeName(dt) +
                               " m=" + std::to_string(m) + " n=" + std::to_string(n) +
                               " k=" + std::to_string(k);
      std::vector<float> want(m * n);
      GemmParams p{.x = x.data(),
                   .w = w16.data(),
                   .bias = b.data(),
                   .y = want.data(),
                   .m = m,
                   .n = n,
                   .k = k,
                   .w_dtype = dt};
      GemmCpu(p, nullptr);
      ExpectAllNonFiniteKinds(want, what);
      DeviceBuffer<float> d_x(x), d_b(b), d_y(std::vector<float>(m * n, 3.0f));
      DeviceBuffer<uint16_t> d_w(w16);
      p.x = d_x.get();
      p.w = d_w.get();
      p.bias = d_b.get();
      p.y = d_y.get();
      ASSERT_TRUE(cuda::GemvApplies(p)) << what;
      ASSERT_EQ(cuda::GemvCuda(p, nullptr), cudaSuccess) << what;
      ExpectAllNear(ToDouble(want), d_y.Download().data(), 1e-4, 1e-4, what);
      // The residual add: y = r + the product (CpuBackend's Gemm then Add), r with an infinity.
      std::vector<float> r = RandomVector(rng, m * n);
      r[0] = -kInf;
      DeviceBuffer<float> d_acc(r);
      for (int64_t i = 0; i < m * n; ++i) r[i] += want[i];
      GemmParams pa = p;
      pa.y = d_acc.get();
      GemmFusion acc;
      acc.accumulate = true;
      ASSERT_TRUE(cuda::GemvFusionApplies(pa, acc, false)) << what;
      ASSERT_EQ(cuda::GemvCuda(pa, nullptr, acc), cudaSuccess) << what;
      ExpectAllNear(ToDouble(r), d_acc.Download().data(), 1e-4, 1e-4, what + " accumulate");
      // The folded RMSNorm (x summed by the GEMV), on finite rows (a row with a NaN or an
      // infinity normalises to NaN throughout) with an infinity in the norm weight.
      if (m * k > cuda::kGemvNormMaxFloats) continue;
      const std::vector<float> xf = RandomVector(rng, m * k);
      std::vector<float> g = RandomVector(rng, k);
      g[k - 2] = kInf;
      std::vector<float> xn(m * k), want_norm(m * n);
      RmsNormCpu({xf.data(), nullptr, g.data(), xn.data(), m, k, 1e-5f}, nullptr);
      GemmParams pc = p;
      pc.x = xn.data();
      pc.w = w16.data();
      pc.bias = b.data();
      pc.y = want_norm.data();
      GemmCpu(pc, nullptr);
      DeviceBuffer<float> d_xf(xf), d_g(g), d_yn(std::vector<float>(m * n, 3.0f));
      GemmFusion norm;
      norm.norm_weight = d_g.get();
      norm.norm_eps = 1e-5f;
      GemmParams pn = p;
      pn.x = d_xf.get();
      pn.y = d_yn.get();
      ASSERT_TRUE(cuda::GemvFusionApplies(pn, norm, false)) << what;
      ASSERT_EQ(cuda::GemvCuda(pn, nullptr, norm), cudaSuccess) << what;
      ExpectAllNear(ToDouble(want_norm), d_yn.Download().data(), 1e-4, 1e-4, what + " norm");
    }
  }
}

// The packed gate|up GEMV with SiLU·mul in its epilogue: GemvCuda then SiluMulCuda, bit for bit
// (both outputs), and GemmCpu then SiluMulCpu up to summation order.
// Programmatic dependent launch on a created stream: a chain of kernels, each reading what the
// one before wrote (norm, GEMV with the norm folded in, GEMV adding into the stream, SiLU·mul),
// gives bit for bit the results of ordinary launches. A kernel that touched memory before
// waiting for the one before it would read stale values here. Only a GPU shows anything: the
// emulation has no programmatic launch.
TEST_F(CudaOpsTest, ProgrammaticLaunchChainMatchesOrdinary) {
  SKIP_IF_EMULATED("no programmatic launch to check");
  std::mt19937 rng(53);
  constexpr int64_t kD = 1024, kF = 2048;
  const auto bf16 = [&](int64_t n) { return RandomLowp(rng, n, DType::kBF16); };
  const std::vector<float> x0 = RandomVector(rng, kD), g = RandomVector(rng, kD);
  DeviceBuffer<uint16_t> d_wa(bf16(kD * kD)), d_wb(bf16(kF * kD)), d_wc(bf16(kD * kF / 2));
  DeviceBuffer<float> d_g(g);
  const auto run = [&](bool pdl) {
    cuda::SetProgrammaticLaunch(pdl);
    gpu_testing::Stream stream;
    DeviceBuffer<float> x(x0), xn(kD), a(kD), h(kF), hs(kF / 2);
    for (int i = 0; i < 20; ++i) {
      // xn = RMSNorm(x) g; a = Wa xn; h = Wb RMSNorm(a) g; hs = SiLU(h_0) h_1; x += Wc hs.
      EXPECT_EQ(
          cuda::RmsNormCuda({x.get(), nullptr, d_g.get(), xn.get(), 1, kD, 1e-5f}, stream.get()),
          cudaSuccess);
      EXPECT_EQ(cuda::GemvCuda({xn.get(), d_wa.get(), nullptr, a.get(), 1, kD, kD, DType::kBF16},
                               stream.get()),
                cudaSuccess);
      GemmFusion norm;
      norm.norm_weight = d_g.get();
      norm.norm_eps = 1e-5f;
      EXPECT_EQ(cuda::GemvCuda({a.get(), d_wb.get(), nullptr, h.get(), 1, kF, kD, DType::kBF16},
                               stream.get(), norm),
                cudaSuccess);
      EXPECT_EQ(cuda::SiluMulCuda({h.get(), h.get() + kF / 2, hs.get(), kF / 2}, stream.get()),
                cudaSuccess);
      GemmFusion add;
      add.accumulate = true;
      EXPECT_EQ(
          cuda::GemvCuda({hs.get(), d_wc.get(), nullptr, x.get(), 1, kD, kF / 2, DType::kBF16},
                         stream.get(), add),
          cudaSuccess);
    }
    stream.Sync();
    return x.Download();
  };
  const std::vector<float> ordinary = run(false);
  const std::vector<float> programmatic = run(true);
  cuda::SetProgrammaticLaunch(true);
  EXPECT_EQ(std::memcmp(ordinary.data(), programmatic.data(), ordinary.size() * sizeof(float)), 0);
}

TEST_F(CudaOpsTest, GemvSiluMulEqualsGemvThenSiluMul) {
  std::mt19937 rng(47);
  struct Shape {
    int64_t m, f, k;  // n = 2f
  };
  for (DType dt : {DType::kBF16, DType::kF16}) {
    for (Shape sh : {Shape{1, 1, 8}, Shape{1, 37, 1032}, Shape{2, 100, 256}, Shape{4, 9, 2056},
                     Shape{2, 5, 4104}}) {
      for (bool bias : {false, true}) {
        const int64_t n = 2 * sh.f;
        const std::vector<float> x = RandomVector(rng, sh.m * sh.k);
        const std::vector<uint16_t> w16 = RandomLowp(rng, n * sh.k, dt);
        const std::vector<float> b = RandomVector(rng, n);
        // The CPU reference: GemmCpu, then SiluMulCpu over the halves of each row.
        std::vector<float> y(sh.m * n), want(sh.m * sh.f);
        GemmParams p{.x = x.data(),
                     .w = w16.data(),
                     .bias = bias ? b.data() : nullptr,
                     .y = y.data(),
                     .m = sh.m,
                     .n = n,
                     .k = sh.k,
                     .w_dtype = dt};
        GemmCpu(p, nullptr);
        SiluMulParams act{y.data(), y.data() + sh.f, want.data(), sh.m * sh.f, sh.f, n};
        SiluMulCpu(act, nullptr);

        DeviceBuffer<float> d_x(x), d_b(b), d_y(std::vector<float>(sh.m * n, NAN));
        DeviceBuffer<float> d_split(std::vector<float>(sh.m * sh.f, NAN));
        DeviceBuffer<float> d_fused(std::vector<float>(sh.m * sh.f, NAN));
        DeviceBuffer<uint16_t> d_w(w16), d_split16(sh.m * sh.f), d_fused16(sh.m * sh.f);
        p.x = d_x.get();
        p.w = d_w.get();
        p.bias = bias ? d_b.get() : nullptr;
        p.y = d_y.get();
        act.gate = d_y.get();
        act.up = d_y.get() + sh.f;
        act.out = d_split.get();
        act.out_lowp = d_split16.get();
        act.out_lowp_dtype = dt;
        const std::string what = std::string(DTypeName(dt)) + " m=" + std::to_string(sh.m) +
                                 " f=" + std::to_string(sh.f) + " k=" + std::to_string(sh.k) +
                                 (bias ? " bias" : "");
        ASSERT_EQ(cuda::GemvCuda(p, nullptr), cudaSuccess) << what;
        ASSERT_EQ(cuda::SiluMulCuda(act, nullptr), cudaSuccess) << what;
        const std::vector<float> split = d_split.Download();
        const std::vector<uint16_t> split16 = d_split16.Download();
        ExpectAllNear(ToDouble(want), split.data(), 1e-4, 1e-4, what);
        act.out = d_fused.get();
        act.out_lowp = d_fused16.get();
        ASSERT_TRUE(cuda::GemvSiluMulApplies(p, act)) << what;
        ASSERT_EQ(cuda::GemvSiluMulCuda(p, act, nullptr), cudaSuccess) << what;
        EXPECT_EQ(
            std::memcmp(d_fused.Download().data(), split.data(), split.size() * sizeof(float)), 0)
            << what;
        EXPECT_EQ(d_fused16.Download(), split16) << what;
        // With the input's RMSNorm fused too: bit for bit RmsNormCuda, then the fused kernel.
        const std::vector<float> g = RandomVector(rng, sh.k);
        DeviceBuffer<float> d_g(g), d_xn(sh.m * sh.k);
        ASSERT_EQ(cuda::RmsNormCuda({d_x.get(), nullptr, d_g.get(), d_xn.get(), sh.m, sh.k, 1e-6f},
                                    nullptr),
                  cudaSuccess);
        GemmParams pn = p;
        pn.x = d_xn.get();
        ASSERT_EQ(cuda::GemvSiluMulCuda(pn, act, nullptr), cudaSuccess) << what;
        const std::vector<float> want_norm = d_fused.Download();
        const std::vector<uint16_t> want_norm16 = d_fused16.Download();
        ASSERT_EQ(cuda::GemvSiluMulCuda(p, act, nullptr), cudaSuccess) << what;  // other values
        GemmFusion norm;
        norm.norm_weight = d_g.get();
        norm.norm_eps = 1e-6f;
        ASSERT_EQ(cuda::GemvSiluMulCuda(p, act, nullptr, norm), cudaSuccess) << what;
        EXPECT_EQ(std::memcmp(d_fused.Download().data(), want_norm.data(),
                              want_norm.size() * sizeof(float)),
                  0)
            << what << " norm";
        EXPECT_EQ(d_fused16.Download(), want_norm16) << what << " norm";
      }
    }
  }
  // What it does not take: a SiluMul that is not the packed product's own.
  DeviceBuffer<float> d_x(64), d_y(2 * 16), d_out(16);
  DeviceBuffer<uint16_t> d_w(32 * 64);
  GemmParams p{.x = d_x.get(),
               .w = d_w.get(),
               .bias = nullptr,
               .y = d_y.get(),
               .m = 1,
               .n = 32,
               .k = 64,
               .w_dtype = DType::kBF16};
  const SiluMulParams act{d_y.get(), d_y.get() + 16, d_out.get(), 16, 16, 32};
  EXPECT_TRUE(cuda::GemvSiluMulApplies(p, act));
  SiluMulParams bad = act;
  bad.up = d_y.get() + 8;
  EXPECT_FALSE(cuda::GemvSiluMulApplies(p, bad));
  bad = act;
  bad.cols = 0;
  EXPECT_FALSE(cuda::GemvSiluMulApplies(p, bad));
  bad = act;
  bad.out = d_y.get();  // the output inside the product's rows
  EXPECT_FALSE(cuda::GemvSiluMulApplies(p, bad));
  EXPECT_EQ(cuda::GemvSiluMulCuda(p, bad, nullptr), cudaErrorInvalidValue);
  GemmParams odd = p;
  odd.n = 31;
  EXPECT_FALSE(cuda::GemvSiluMulApplies(odd, act));
}

// The RMSNorm handed from product to product (GemmFusion::norm_sums_out / norm_sums_in): a GEMV
// adding into the residual stream also leaves its rows' sums of squares in partials, and the
// next GEMV (plain and with SiLU·mul) normalises its x from those instead of summing x. The
// producer's y is bit for bit the one without the partials, the partials add up to y's sums of
// squares, the consumer matches RmsNormCuda then the GEMV up to rounding, and both repeat bit
// for bit.
TEST_F(CudaOpsTest, GemvNormSumsHandOff) {
  std::mt19937 rng(53);
  struct Shape {
    int64_t m, d, kp, n2;  // rows; residual width d; producer's k; consumer's n (SiLU: 2 n2)
  };
  // Producer k >= 4096 and consumer k = d >= 4096 take four warps per row; d = 1032 and 4104
  // leave a partial last thread block; m * d above kGemvNormMaxFloats (4 x 4104) is fine here.
  for (DType dt : {DType::kBF16, DType::kF16}) {
    for (Shape sh : {Shape{1, 8, 8, 3}, Shape{1, 256, 8200, 37}, Shape{3, 1032, 64, 100},
                     Shape{4, 4104, 1032, 9}}) {
      const std::string what = std::string(DTypeName(dt)) + " m=" + std::to_string(sh.m) +
                               " d=" + std::to_string(sh.d) + " kp=" + std::to_string(sh.kp) +
                               " n2=" + std::to_string(sh.n2);
      const std::vector<float> h = RandomVector(rng, sh.m * sh.kp);
      const std::vector<uint16_t> wp = RandomLowp(rng, sh.d * sh.kp, dt);
      const std::vector<float> resid = RandomVector(rng, sh.m * sh.d);
      const std::vector<uint16_t> wc = RandomLowp(rng, 2 * sh.n2 * sh.d, dt);
      const std::vector<float> bc = RandomVector(rng, 2 * sh.n2);
      const std::vector<float> g = RandomVector(rng, sh.d);
      DeviceBuffer<float> d_h(h), d_g(g), d_bc(bc);
      DeviceBuffer<uint16_t> d_wp(wp), d_wc(wc);
      // Producer: x += h wp^T, with and without the partials.
      GemmParams pp{.x = d_h.get(),
                    .w = d_wp.get(),
                    .bias = nullptr,
                    .y = nullptr,
                    .m = sh.m,
                    .n = sh.d,
                    .k = sh.kp,
                    .w_dtype = dt};
      const int64_t parts = cuda::GemvNormSumParts(pp);
      ASSERT_GE(parts, 1) << what;
      DeviceBuffer<float> d_plain(resid), d_x(resid);
      DeviceBuffer<double> d_sums(std::vector<double>(sh.m * parts, NAN));
      GemmFusion add;
      add.accumulate = true;
      pp.y = d_plain.get();
      ASSERT_EQ(cuda::GemvCuda(pp, nullptr, add), cudaSuccess) << what;
      GemmFusion add_sums = add;
      add_sums.norm_sums_out = d_sums.get();
      pp.y = d_x.get();
      ASSERT_TRUE(cuda::GemvFusionApplies(pp, add_sums, false)) << what;
      ASSERT_EQ(cuda::GemvCuda(pp, nullptr, add_sums), cudaSuccess) << what;
      const std::vector<float> x = d_x.Download();
      ASSERT_EQ(std::memcmp(x.data(), d_plain.Download().data(), x.size() * sizeof(float)), 0)
          << what << " producer's y";
      const std::vector<double> sums = d_sums.Download();
      for (int64_t r = 0; r < sh.m; ++r) {
        double want = 0.0, got = 0.0;
        for (int64_t i = 0; i < sh.d; ++i)
          want += static_cast<double>(x[r * sh.d + i]) * x[r * sh.d + i];
        for (int64_t b = 0; b < parts; ++b) got += sums[r * parts + b];
        EXPECT_NEAR(got, want, 1e-12 * want) << what << " row " << r;
      }
      // Without the residual add the partials are those of the product itself.
      DeviceBuffer<float> d_only(sh.m * sh.d);
      DeviceBuffer<double> d_sums2(std::vector<double>(sh.m * parts, NAN));
      GemmFusion only;
      only.norm_sums_out = d_sums2.get();
      GemmParams po = pp;
      po.y = d_only.get();
      ASSERT_EQ(cuda::GemvCuda(po, nullptr, only), cudaSuccess) << what;
      {
        const std::vector<float> y = d_only.Download();
        const std::vector<double> s2 = d_sums2.Download();
        for (int64_t r = 0; r < sh.m; ++r) {
          double want = 0.0, got = 0.0;
          for (int64_t i = 0; i < sh.d; ++i)
            want += static_cast<double>(y[r * sh.d + i]) * y[r * sh.d + i];
          for (int64_t b = 0; b < parts; ++b) got += s2[r * parts + b];
          EXPECT_NEAR(got, want, 1e-12 * want) << what << " row " << r << " no add";
        }
      }
      // Consumers of x: the CPU's RMSNorm then GemmCpu (with its bias), against the GEMV taking
      // the norm from the partials; plain (n = 2 n2) and with SiLU·mul (n2 outputs).
      std::vector<float> xn(x.size());
      RmsNormCpu({x.data(), nullptr, g.data(), xn.data(), sh.m, sh.d, 1e-5f}, nullptr);
      std::vector<float> want_y(sh.m * 2 * sh.n2), want_act(sh.m * sh.n2);
      GemmCpu({xn.data(), wc.data(), bc.data(), want_y.data(), sh.m, 2 * sh.n2, sh.d, dt}, nullptr);
      SiluMulCpu(
          {want_y.data(), want_y.data() + sh.n2, want_act.data(), sh.m * sh.n2, sh.n2, 2 * sh.n2},
          nullptr);
      GemmFusion norm;
      norm.norm_weight = d_g.get();
      norm.norm_eps = 1e-5f;
      norm.norm_sums_in = d_sums.get();
      norm.norm_sum_parts = parts;
      GemmParams pc{.x = d_x.get(),
                    .w = d_wc.get(),
                    .bias = d_bc.get(),
                    .y = nullptr,
                    .m = sh.m,
                    .n = 2 * sh.n2,
                    .k = sh.d,
                    .w_dtype = dt};
      DeviceBuffer<float> d_y(std::vector<float>(sh.m * 2 * sh.n2, NAN));
      pc.y = d_y.get();
      ASSERT_TRUE(cuda::GemvFusionApplies(pc, norm, false)) << what;
      ASSERT_EQ(cuda::GemvCuda(pc, nullptr, norm), cudaSuccess) << what;
      const std::vector<float> got_y = d_y.Download();
      ExpectAllNear(ToDouble(want_y), got_y.data(), 1e-4, 1e-4, what + " consumer");
      ASSERT_EQ(cuda::GemvCuda(pc, nullptr, norm), cudaSuccess) << what;
      EXPECT_EQ(std::memcmp(d_y.Download().data(), got_y.data(), got_y.size() * sizeof(float)), 0)
          << what << " consumer repeats";
      DeviceBuffer<float> d_act(std::vector<float>(sh.m * sh.n2, NAN));
      const SiluMulParams act{d_y.get(), d_y.get() + sh.n2, d_act.get(), sh.m * sh.n2,
                              sh.n2,     2 * sh.n2};
      ASSERT_TRUE(cuda::GemvFusionApplies(pc, norm, true)) << what;
      ASSERT_EQ(cuda::GemvSiluMulCuda(pc, act, nullptr, norm), cudaSuccess) << what;
      ExpectAllNear(ToDouble(want_act), d_act.Download().data(), 1e-4, 1e-4,
                    what + " SiLU consumer");
      // The scale comes from the partials, not from x: halving them moves every output.
      std::vector<double> half = sums;
      for (double& v : half) v *= 0.25;
      DeviceBuffer<double> d_quarter(half);
      GemmFusion wrong = norm;
      wrong.norm_sums_in = d_quarter.get();
      ASSERT_EQ(cuda::GemvCuda(pc, nullptr, wrong), cudaSuccess) << what;
      const std::vector<float> doubled = d_y.Download();
      for (int64_t r = 0; r < sh.m; ++r) {
        for (int64_t j = 0; j < 2 * sh.n2; ++j) {
          const int64_t i = r * 2 * sh.n2 + j;
          EXPECT_NEAR(doubled[i] - bc[j], 2.0 * (got_y[i] - bc[j]),
                      1e-4 * (1.0 + std::fabs(got_y[i])))
              << what << " quarter sums " << i;
        }
      }
    }
  }
  // What it does not take: partials without a norm weight, no parts, an unaligned norm weight,
  // partials out of a SiLU·mul, and partials written over the ones being read.
  DeviceBuffer<float> d_x(4 * 64), d_y(4 * 64), d_g(65);
  DeviceBuffer<uint16_t> d_w(64 * 64);
  DeviceBuffer<double> d_s(64);
  GemmParams p{.x = d_x.get(),
               .w = d_w.get(),
               .bias = nullptr,
               .y = d_y.get(),
               .m = 1,
               .n = 64,
               .k = 64,
               .w_dtype = DType::kBF16};
  GemmFusion in;
  in.norm_weight = d_g.get();
  in.norm_eps = 1e-5f;
  in.norm_sums_in = d_s.get();
  in.norm_sum_parts = 8;
  EXPECT_TRUE(cuda::GemvFusionApplies(p, in, false));
  GemmFusion bad = in;
  bad.norm_weight = nullptr;
  EXPECT_FALSE(cuda::GemvFusionApplies(p, bad, false));
  bad = in;
  bad.norm_sum_parts = 0;
  EXPECT_FALSE(cuda::GemvFusionApplies(p, bad, false));
  bad = in;
  bad.norm_weight = d_g.get() + 1;
  EXPECT_FALSE(cuda::GemvFusionApplies(p, bad, false));
  EXPECT_EQ(cuda::GemvCuda(p, nullptr, bad), cudaErrorInvalidValue);
  GemmFusion out;
  out.norm_sums_out = d_s.get();
  EXPECT_TRUE(cuda::GemvFusionApplies(p, out, false));
  EXPECT_FALSE(cuda::GemvFusionApplies(p, out, true));
  GemmFusion both = in;
  both.norm_sums_out = d_s.get() + 4;  // overlaps the 8 read
  EXPECT_FALSE(cuda::GemvFusionApplies(p, both, false));
  both.norm_sums_out = d_s.get() + 8;
  EXPECT_TRUE(cuda::GemvFusionApplies(p, both, false));
  GemmFusion over = out;  // partials written over y or x, or read from y
  over.norm_sums_out = reinterpret_cast<double*>(d_y.get());
  EXPECT_FALSE(cuda::GemvFusionApplies(p, over, false));
  over.norm_sums_out = reinterpret_cast<double*>(d_x.get());
  EXPECT_FALSE(cuda::GemvFusionApplies(p, over, false));
  GemmFusion in_y = in;
  in_y.norm_sums_in = reinterpret_cast<const double*>(d_y.get());
  EXPECT_FALSE(cuda::GemvFusionApplies(p, in_y, false));
  EXPECT_EQ(cuda::GemvNormSumParts(p), 8);  // 64 outputs, 8 a thread block
}

// Shapes whose grid would pass 2^31 - 1 thread blocks (a launch's limit; a cast to unsigned would
// wrap above 2^32 into a smaller grid) are refused with cudaErrorInvalidValue before anything is
// launched or read (the pointers here are null): decode attention (tokens x query heads), the
// merge, RMSNorm, argmax and sampling (rows), MLA attention (tokens x heads), the GEMV (outputs;
// 2^31 - 1 of them still apply), and on a GPU cuBLAS's int dimensions.
TEST_F(CudaOpsTest, ShapesBeyondTheGridLimitAreRefused) {
  constexpr int64_t kOver = int64_t{1} << 31;
  PagedAttentionParams ap{};
  ap.kv = {nullptr, DType::kBF16, 1, 8, 16, 128};
  ap.num_seqs = 1;
  ap.max_blocks_per_seq = 1;
  ap.num_q_heads = 8;
  ap.num_kv_heads = 8;
  ap.head_dim = 128;
  ap.scale = 0.1f;
  for (int64_t tokens : {kOver / 8, kOver / 4 + 3}) {
    ap.num_q_tokens = tokens;
    EXPECT_EQ(cuda::PagedAttentionCuda(ap, nullptr, nullptr), cudaErrorInvalidValue) << tokens;
  }
  EXPECT_EQ(cuda::MergeStatesCuda({nullptr, nullptr, nullptr, nullptr, 2, kOver, 128}, nullptr),
            cudaErrorInvalidValue);
  MlaAttentionParams mp{};
  mp.kv = {nullptr, DType::kBF16, 1, 1, 16, 576, 1};
  mp.num_seqs = 1;
  mp.max_blocks_per_seq = 1;
  mp.num_heads = 16;  // one head group: the merge's rows, not the kernel's grid, pass the limit
  mp.latent_dim = 512;
  mp.rope_dim = 64;
  mp.scale = 0.1f;
  mp.num_q_tokens = kOver / 16;
  EXPECT_EQ(cuda::MlaAttentionCuda(mp, nullptr, nullptr), cudaErrorInvalidValue);
  RmsNormParams rp{};
  rp.rows = kOver;
  rp.dim = 64;
  rp.eps = 1e-5f;
  EXPECT_EQ(cuda::RmsNormCuda(rp, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(cuda::ArgmaxCuda({nullptr, nullptr, kOver, 1000}, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(
      cuda::SampleCuda({nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, kOver, 1000},
                       nullptr),
      cudaErrorInvalidValue);
  DeviceBuffer<float> x(64);
  DeviceBuffer<uint16_t> w(64);
  GemmParams gp{.x = x.get(),
                .w = w.get(),
                .bias = nullptr,
                .y = nullptr,
                .m = 1,
                .n = kOver,
                .k = 64,
                .w_dtype = DType::kBF16};
  EXPECT_FALSE(cuda::GemvApplies(gp));
  EXPECT_EQ(cuda::GemvCuda(gp, nullptr), cudaErrorInvalidValue);
  gp.n = kOver - 1;
  EXPECT_TRUE(cuda::GemvApplies(gp));
#ifndef HELIX_CUDA_EMULATION  // cuBLAS has no emulation
  cublasHandle_t handle;
  ASSERT_EQ(cublasCreate(&handle), CUBLAS_STATUS_SUCCESS);
  gp.n = kOver;
  EXPECT_EQ(cuda::GemmCuda(handle, gp, nullptr, nullptr), cudaErrorInvalidValue);
  GemmBatchedParams bp{};
  bp.m = 1;
  bp.n = 64;
  bp.k = 64;
  bp.batch = 1;
  bp.ldx = 64;
  bp.ldy = kOver;
  EXPECT_EQ(cuda::GemmBatchedCuda(handle, bp, nullptr, nullptr), cudaErrorInvalidValue);
  cublasDestroy(handle);
#endif
}

// ---------------------------------------------------------------------------------------------
// GEMM through cuBLAS

#ifndef HELIX_CUDA_EMULATION  // cuBLAS has no emulation
// Weights as stored for `dt`: fp32 bytes, or each value rounded to the 16-bit type.
std::vector<unsigned char> StoreWeights(DType dt, const std::vector<float>& w) {
  std::vector<unsigned char> wb(w.size() * DTypeSize(dt));
  for (size_t i = 0; i < w.size(); ++i) {
    if (dt == DType::kF32) {
      std::memcpy(wb.data() + 4 * i, &w[i], 4);
    } else {
      const uint16_t h = ToStorage(dt, w[i]);
      std::memcpy(wb.data() + 2 * i, &h, 2);
    }
  }
  return wb;
}

// GEMM results against the CPU's: tolerance relative to the finite outputs' RMS. fp32 sums in
// another order; 16-bit weights also see activations rounded to the weight type.
void ExpectGemmNear(DType dt, const std::vector<float>& want, const float* got,
                    const std::string& what) {
  double rms = 0;
  size_t finite = 0;
  for (float v : want) {
    if (std::isfinite(v)) {  // NaN and infinities are compared by position
      rms += static_cast<double>(v) * v;
      ++finite;
    }
  }
  rms = std::sqrt(rms / std::max<size_t>(1, finite)) + 1e-30;
  const double tol = dt == DType::kF32 ? 1e-5 : (dt == DType::kBF16 ? 1.5e-2 : 3e-3);
  ExpectAllNear(ToDouble(want), got, tol, tol * rms, what);
}

TEST_F(CudaOpsTest, GemmAllWeightTypes) {
  std::mt19937 rng(38);
  cublasHandle_t handle;
  ASSERT_EQ(cublasCreate(&handle), CUBLAS_STATUS_SUCCESS);
  struct Shape {
    int64_t m, n, k;
  };
  for (DType dt : {DType::kF32, DType::kF16, DType::kBF16}) {
    for (Shape sh : {Shape{1, 64, 256}, Shape{3, 1000, 4096}, Shape{16, 288, 768}, Shape{2, 5, 0},
                     Shape{7, 33, 17}}) {
      for (bool bias : {false, true}) {
        const std::vector<float> x = RandomVector(rng, sh.m * sh.k);
        const std::vector<float> w = RandomVector(rng, sh.n * sh.k);
        const std::vector<float> b = RandomVector(rng, sh.n);
        const std::vector<unsigned char> wb = StoreWeights(dt, w);
        GemmParams p{.x = x.data(),
                     .w = wb.data(),
                     .bias = bias ? b.data() : nullptr,
                     .y = nullptr,
                     .m = sh.m,
                     .n = sh.n,
                     .k = sh.k,
                     .w_dtype = dt};
        std::vector<float> want(sh.m * sh.n);
        p.y = want.data();
        GemmCpu(p, nullptr);
        DeviceBuffer<float> d_x(x), d_b(b), d_y(sh.m * sh.n);
        DeviceBuffer<unsigned char> d_w(wb);
        p.x = d_x.get();
        p.w = d_w.get();
        p.bias = bias ? d_b.get() : nullptr;
        p.y = d_y.get();
        DeviceBuffer<unsigned char> ws(cuda::GemmCudaWorkspaceBytes(p));
        ASSERT_EQ(cuda::GemmCuda(handle, p, ws.get(), nullptr), cudaSuccess);
        const std::string what = std::string(DTypeName(dt)) + " m=" + std::to_string(sh.m) +
                                 " n=" + std::to_string(sh.n) + " k=" + std::to_string(sh.k) +
                                 (bias ? " bias" : "");
        const std::vector<float> y1 = d_y.Download();
        ExpectGemmNear(dt, want, y1.data(), what);
        if (dt != DType::kF32) {
          // x given already rounded (GemmParams::x_lowp, as RMSNorm writes it): the same
          // product, with no workspace and x itself unreadable (NaNs).
          std::vector<uint16_t> x16(x.size());
          StoreLowp(x.data(), static_cast<int64_t>(x.size()), dt, x16.data());
          DeviceBuffer<uint16_t> d_x16(x16);
          DeviceBuffer<float> d_nan(std::vector<float>(x.size(), NAN)), d_y3(sh.m * sh.n);
          GemmParams p3 = p;
          p3.x = d_nan.get();
          p3.x_lowp = d_x16.get();
          p3.y = d_y3.get();
          EXPECT_EQ(cuda::GemmCudaWorkspaceBytes(p3), 0u);
          ASSERT_EQ(cuda::GemmCuda(handle, p3, nullptr, nullptr), cudaSuccess);
          EXPECT_EQ(d_y3.Download(), y1) << what << " (x_lowp)";
        }
        // A second GEMM off the same x reusing the first one's conversion in the workspace (the
        // backend's same_x): x itself is wiped first, so only the converted copy can be read.
        const std::vector<float> w2 = RandomVector(rng, sh.n * sh.k);
        const std::vector<unsigned char> wb2 = StoreWeights(dt, w2);
        GemmParams p2 = p;
        p2.x = x.data();
        p2.w = wb2.data();
        p2.bias = nullptr;
        std::vector<float> want2(sh.m * sh.n);
        p2.y = want2.data();
        GemmCpu(p2, nullptr);
        DeviceBuffer<unsigned char> d_w2(wb2);
        p2.x = d_x.get();
        p2.w = d_w2.get();
        p2.y = d_y.get();
        if (dt != DType::kF32 && sh.k > 0) {
          ASSERT_EQ(cudaMemset(d_x.get(), 0xff, x.size() * sizeof(float)), cudaSuccess);  // NaNs
        }
        ASSERT_EQ(cuda::GemmCuda(handle, p2, ws.get(), nullptr, dt != DType::kF32), cudaSuccess);
        ExpectGemmNear(dt, want2, d_y.Download().data(), what + " (x converted once)");
      }
    }
  }
  cublasDestroy(handle);
}

// Strided batched GEMM as the MLA absorption uses it: one GEMM per head over interleaved heads
// (x rows of heads * k floats, y rows of heads * n floats).
TEST_F(CudaOpsTest, GemmBatchedStridedHeads) {
  std::mt19937 rng(41);
  cublasHandle_t handle;
  ASSERT_EQ(cublasCreate(&handle), CUBLAS_STATUS_SUCCESS);
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (int64_t m : {1, 5}) {
      const int64_t heads = 3, k = 40, n = 24, pad = 8;  // x rows carry an extra tail
      const int64_t ldx = heads * k + pad, ldy = heads * n;
      const std::vector<float> x = RandomVector(rng, m * ldx);
      const std::vector<float> w = RandomVector(rng, heads * n * k);
      const std::vector<unsigned char> wb = StoreWeights(dt, w);
      GemmBatchedParams p{x.data(), ldx, k, wb.data(), n * k, nullptr, ldy, n, m, n, k, heads, dt};
      std::vector<float> want(m * ldy);
      p.y = want.data();
      GemmBatchedCpu(p, nullptr);
      DeviceBuffer<float> d_x(x), d_y(m * ldy);
      DeviceBuffer<unsigned char> d_w(wb);
      p.x = d_x.get();
      p.w = d_w.get();
      p.y = d_y.get();
      DeviceBuffer<unsigned char> ws(cuda::GemmBatchedCudaWorkspaceBytes(p));
      ASSERT_EQ(cuda::GemmBatchedCuda(handle, p, ws.get(), nullptr), cudaSuccess);
      ExpectGemmNear(dt, want, d_y.Download().data(),
                     std::string("batched ") + DTypeName(dt) + " m=" + std::to_string(m));
    }
  }
  cublasDestroy(handle);
}
// NaN, +inf and -inf in x and in the weights of every type (16-bit weights see x rounded to
// their type, which keeps NaN and infinities): positions and signs as GemmCpu's.
TEST_F(CudaOpsTest, GemmNonFiniteInputs) {
  std::mt19937 rng(70);
  cublasHandle_t handle;
  ASSERT_EQ(cublasCreate(&handle), CUBLAS_STATUS_SUCCESS);
  const int64_t m = 3, n = 40, k = 64;
  for (DType dt : {DType::kF32, DType::kF16, DType::kBF16}) {
    std::vector<float> x = RandomVector(rng, m * k);
    std::vector<float> w = RandomVector(rng, n * k);
    x[3] = kInf;
    x[5] = 1.0f;
    x[2 * k + k / 2] = kNaN;
    x[1 * k + k - 1] = -kInf;
    w[(n - 1) * k + 5] = kInf;
    w[1 * k + 7] = kNaN;
    w[2 * k + k - 2] = -kInf;
    const std::vector<unsigned char> wb = StoreWeights(dt, w);
    std::vector<float> want(m * n);
    GemmParams p{.x = x.data(),
                 .w = wb.data(),
                 .bias = nullptr,
                 .y = want.data(),
                 .m = m,
                 .n = n,
                 .k = k,
                 .w_dtype = dt};
    GemmCpu(p, nullptr);
    const std::string what = std::string("non-finite ") + DTypeName(dt);
    ExpectAllNonFiniteKinds(want, what);
    DeviceBuffer<float> d_x(x), d_y(m * n);
    DeviceBuffer<unsigned char> d_w(wb);
    p.x = d_x.get();
    p.w = d_w.get();
    p.y = d_y.get();
    DeviceBuffer<unsigned char> ws(cuda::GemmCudaWorkspaceBytes(p));
    ASSERT_EQ(cuda::GemmCuda(handle, p, ws.get(), nullptr), cudaSuccess);
    ExpectGemmNear(dt, want, d_y.Download().data(), what);
  }
  cublasDestroy(handle);
}

#endif

// ---------------------------------------------------------------------------------------------
// GGUF dequantisation: bit-identical to engine/model/gguf's CPU dequantiser on random bytes
// (which include NaN / inf / subnormal scales and values).

TEST_F(CudaOpsTest, DequantizeMatchesGgufCpu) {
  std::mt19937 rng(39);
  using gguf::GgmlType;
  for (GgmlType t : {GgmlType::kF32, GgmlType::kF16, GgmlType::kBF16, GgmlType::kQ8_0,
                     GgmlType::kQ4_0, GgmlType::kQ4_1, GgmlType::kQ4_K, GgmlType::kQ6_K}) {
    const uint32_t type = static_cast<uint32_t>(t);
    const gguf::GgmlTypeInfo* info = gguf::GetGgmlTypeInfo(type);
    ASSERT_NE(info, nullptr);
    ASSERT_TRUE(cuda::CanDequantizeCuda(type)) << info->name;
    const int64_t blocks = 333;
    const int64_t n = blocks * info->block_size;
    std::vector<uint8_t> bytes(blocks * info->block_bytes);
    for (uint8_t& b : bytes) {
      b = static_cast<uint8_t>(rng());
    }
    std::vector<float> want(n);
    ASSERT_TRUE(gguf::Dequantize(type, bytes, n, want.data(), "test").ok()) << info->name;
    DeviceBuffer<uint8_t> d_bytes(bytes);
    DeviceBuffer<float> d_out(n);
    DeviceBuffer<uint16_t> d_out16(n);
    ASSERT_EQ(cuda::DequantizeCuda(
                  {.ggml_type = type, .data = d_bytes.get(), .n = n, .out = d_out.get()}, nullptr),
              cudaSuccess);
    ExpectAllNear(ToDouble(want), d_out.Download().data(), 0, 0, info->name);
    // bf16 output: the fp32 value rounded to nearest even.
    ASSERT_EQ(cuda::DequantizeCuda({.ggml_type = type,
                                    .data = d_bytes.get(),
                                    .n = n,
                                    .out = d_out16.get(),
                                    .out_dtype = DType::kBF16},
                                   nullptr),
              cudaSuccess);
    const std::vector<uint16_t> got16 = d_out16.Download();
    std::vector<double> want16(n);
    std::vector<float> got16f(n);
    for (int64_t i = 0; i < n; ++i) {
      want16[i] = Bf16ToFloat(FloatToBf16(want[i]));
      got16f[i] = Bf16ToFloat(got16[i]);
    }
    ExpectAllNear(want16, got16f.data(), 0, 0, std::string(info->name) + " to bf16");
  }
  // A length that is not a whole number of blocks is refused.
  EXPECT_EQ(cuda::DequantizeCuda({.ggml_type = static_cast<uint32_t>(GgmlType::kQ4_K),
                                  .data = nullptr,
                                  .n = 100,
                                  .out = nullptr},
                                 nullptr),
            cudaErrorInvalidValue);
}

// The fused decode-step RoPE + K/V write equals RopeCpu on q and k, then WriteKv.
// The CPU backend's Rope, Rope and WriteKvBatch, RopeWriteKvCuda's reference: q and k rotated
// in place, k and v of each token with block[t] >= 0 stored in layer 1 of `view`.
void RopeWriteKvCpu(const KvPoolView& view, const std::vector<int32_t>& positions,
                    const std::vector<int32_t>& block, const std::vector<int32_t>& slot,
                    std::vector<float>* q, std::vector<float>* k, const std::vector<float>& v,
                    int64_t q_heads, int64_t rotary_dim, float theta, RopeStyle style) {
  const int64_t tokens = static_cast<int64_t>(positions.size());
  for (auto [x, heads] : {std::pair{q, q_heads}, std::pair{k, view.num_kv_heads}}) {
    RopeCpu({.x = x->data(),
             .positions = positions.data(),
             .tokens = tokens,
             .heads = heads,
             .head_dim = view.head_dim,
             .rotary_dim = rotary_dim,
             .theta = theta,
             .style = style},
            nullptr);
  }
  const int64_t hd = view.num_kv_heads * view.head_dim;
  for (int64_t t = 0; t < tokens; ++t) {
    if (block[t] >= 0) WriteKv(view, block[t], 1, slot[t], k->data() + t * hd, v.data() + t * hd);
  }
}

// The device pool `got` against the reference `pool`: the same rounded values, except where k's
// rotation differs in its last bits (then the stored value is within one unit of the pool
// type). Returns the reference's values.
std::vector<double> ExpectPoolNear(const Pool& pool, const std::vector<unsigned char>& got,
                                   const std::string& what) {
  const std::vector<double> want = PoolValues(pool.view, pool.host.data(), pool.blocks);
  const std::vector<double> got_v = PoolValues(pool.view, got.data(), pool.blocks);
  const std::vector<float> got_f(got_v.begin(), got_v.end());
  ExpectAllNear(want, got_f.data(), pool.view.dtype == DType::kF32 ? kF32Tol : 8e-3, kF32Tol,
                what + " pool");
  return want;
}

TEST_F(CudaOpsTest, RopeWriteKvFused) {
  std::mt19937 rng(40);
  struct Shape {
    int64_t q_heads, kv_heads, head_dim, rotary_dim;
  };
  for (RopeStyle style : {RopeStyle::kInterleaved, RopeStyle::kHalf}) {
    for (Shape sh : {Shape{8, 2, 16, 16}, Shape{32, 8, 128, 128}, Shape{4, 2, 64, 32}}) {
      for (DType dt : {DType::kF32, DType::kBF16}) {
        for (bool packed : {false, true}) {
          const int64_t tokens = 5, tpb = 4;
          Pool pool(dt, 2, sh.kv_heads, tpb, sh.head_dim, 6);
          pool.FillRandom(rng);
          const std::vector<int32_t> positions = {0, 17, 4096, 999999, 3};
          const std::vector<int32_t> block = {2, 5, -1, 0, 2};
          const std::vector<int32_t> slot = {0, 3, 1, 2, 3};
          std::vector<float> q = RandomVector(rng, tokens * sh.q_heads * sh.head_dim);
          std::vector<float> k = RandomVector(rng, tokens * sh.kv_heads * sh.head_dim);
          const std::vector<float> v = RandomVector(rng, tokens * sh.kv_heads * sh.head_dim);
          // packed: q, k and v as the rows of one fused GEMM's output [tokens][q | k | v], the
          // rotated q written to a separate contiguous array.
          const int64_t qn = sh.q_heads * sh.head_dim, kn = sh.kv_heads * sh.head_dim;
          const int64_t row = qn + 2 * kn;
          std::vector<float> qkv(tokens * row);
          for (int64_t t = 0; t < tokens; ++t) {
            std::copy_n(q.begin() + t * qn, qn, qkv.begin() + t * row);
            std::copy_n(k.begin() + t * kn, kn, qkv.begin() + t * row + qn);
            std::copy_n(v.begin() + t * kn, kn, qkv.begin() + t * row + qn + kn);
          }
          DeviceBuffer<float> d_q(q), d_k(k), d_v(v), d_qkv(qkv), d_q_out(q.size());
          DeviceBuffer<int32_t> d_pos(positions), d_block(block), d_slot(slot);
          DeviceBuffer<unsigned char> d_pool(pool.host);
          KvPoolView dv = pool.view;
          dv.base = d_pool.get();
          const float theta = 10000.0f;
          ASSERT_EQ(cuda::RopeWriteKvCuda({.q = packed ? d_qkv.get() : d_q.get(),
                                           .k = packed ? d_qkv.get() + qn : d_k.get(),
                                           .v = packed ? d_qkv.get() + qn + kn : d_v.get(),
                                           .row_stride = packed ? row : 0,
                                           .q_out = packed ? d_q_out.get() : nullptr,
                                           .positions = d_pos.get(),
                                           .tokens = tokens,
                                           .num_q_heads = sh.q_heads,
                                           .rotary_dim = sh.rotary_dim,
                                           .theta = theta,
                                           .style = style,
                                           .kv = dv,
                                           .layer = 1,
                                           .block = d_block.get(),
                                           .token_in_block = d_slot.get()},
                                          nullptr),
                    cudaSuccess);
          RopeWriteKvCpu(pool.view, positions, block, slot, &q, &k, v, sh.q_heads, sh.rotary_dim,
                         theta, style);
          const std::string what =
              std::string(style == RopeStyle::kHalf ? "half " : "interleaved ") + DTypeName(dt) +
              " d=" + std::to_string(sh.head_dim) + (packed ? " packed" : "");
          ExpectAllNear(ToDouble(q), (packed ? d_q_out : d_q).Download().data(), kF32Tol, kF32Tol,
                        what + " q");
          if (packed) {
            const std::vector<float> got_qkv = d_qkv.Download();
            std::vector<float> got_k(k.size());
            for (int64_t t = 0; t < tokens; ++t) {
              std::copy_n(got_qkv.begin() + t * row + qn, kn, got_k.begin() + t * kn);
            }
            ExpectAllNear(ToDouble(k), got_k.data(), kF32Tol, kF32Tol, what + " k");
          } else {
            ExpectAllNear(ToDouble(k), d_k.Download().data(), kF32Tol, kF32Tol, what + " k");
          }
          ExpectPoolNear(pool, d_pool.Download(), what);
        }
      }
    }
  }
}

#ifdef HELIX_CUDA_EMULATION
// A byte range of "device" memory (host memory under the emulation).
struct Bytes {
  void* at;
  size_t n;
};
template <typename T>
Bytes BytesOf(DeviceBuffer<T>& b) {
  return {b.get(), b.size() * sizeof(T)};
}

// Runs `op` twice (`reset` first each time), plainly and under the emulator's PdlHook with
// `inputs` (what the kernels before it write) poisoned from each thread block's start until its
// wait (0xff bytes: NaN in f32, f64, f16 and bf16), and expects `outputs` to hold the same bytes
// both times. What earlier thread blocks left in an input is kept (each block's wait restores
// its own snapshot), so inputs the kernel also writes (a residual, y += W x, k rotated in
// place) work too.
void ExpectSameWithInputsPoisonedUntilTheWait(const std::string& what,
                                              const std::vector<Bytes>& inputs,
                                              const std::vector<Bytes>& outputs,
                                              const std::function<cudaError_t()>& op,
                                              const std::function<void()>& reset) {
  struct Unhook {
    ~Unhook() { helix_emu::g_pdl_hook = nullptr; }
  } unhook;
  reset();
  ASSERT_EQ(op(), cudaSuccess) << what;
  std::vector<std::vector<unsigned char>> plain;
  for (const Bytes& out : outputs) {
    const auto* b = static_cast<const unsigned char*>(out.at);
    plain.emplace_back(b, b + out.n);
  }
  reset();
  std::vector<std::vector<unsigned char>> saved(inputs.size());
  helix_emu::PdlHook hook;
  hook.before_block = [&] {
    for (size_t i = 0; i < inputs.size(); ++i) {
      const auto* b = static_cast<const unsigned char*>(inputs[i].at);
      saved[i].assign(b, b + inputs[i].n);
      std::memset(inputs[i].at, 0xff, inputs[i].n);
    }
  };
  hook.at_wait = [&] {
    for (size_t i = 0; i < inputs.size(); ++i) {
      std::memcpy(inputs[i].at, saved[i].data(), inputs[i].n);
    }
  };
  helix_emu::g_pdl_hook = &hook;
  const cudaError_t err = op();
  helix_emu::g_pdl_hook = nullptr;
  ASSERT_EQ(err, cudaSuccess) << what;
  for (size_t i = 0; i < outputs.size(); ++i) {
    EXPECT_EQ(std::memcmp(plain[i].data(), outputs[i].at, outputs[i].n), 0)
        << what << ": output " << i << " differs with its inputs NaN until the launch wait";
  }
}

// Every kernel of the decode step launched as a programmatic dependent reads what the kernels
// before it wrote only after its launch wait (PdlEnter): under the emulator's PdlHook its
// inputs of that kind are NaN until each thread block's wait (weights, norm weights and the
// step's metadata keep their values), and its results must equal an ordinary call's bit for
// bit. RMSNorm (with a residual), SiLU·mul, the GEMV (plain, norm folded, with SiLU·mul), the
// split-KV merge (one and two passes), the argmax (one thread block a row, and chunked). Inputs
// a kernel also writes (a residual it adds into, y += W x) are poisoned with what earlier thread
// blocks left in them kept: each block's wait restores that block's snapshot.
TEST_F(CudaOpsTest, StepKernelsReadTheKernelBeforesOutputOnlyAfterTheWait) {
  struct Restore {
    ~Restore() { cuda::SetPagedAttentionCudaTuningForTesting({}); }
  } restore;
  std::mt19937 rng(43);
  const auto check = ExpectSameWithInputsPoisonedUntilTheWait;
  {  // RMSNorm with a residual (residual += x, then the norm of it); out_lowp too.
    const int64_t rows = 3, dim = 300;
    const std::vector<float> x0 = RandomVector(rng, rows * dim), r0 = RandomVector(rng, rows * dim);
    DeviceBuffer<float> x(x0), res(r0), w(RandomVector(rng, dim)), out(rows * dim);
    DeviceBuffer<uint16_t> lowp(rows * dim);
    check(
        "rmsnorm", {BytesOf(x), BytesOf(res)}, {BytesOf(res), BytesOf(out)},
        [&] {
          return cuda::RmsNormCuda({.x = x.get(),
                                    .residual = res.get(),
                                    .weight = w.get(),
                                    .out = out.get(),
                                    .rows = rows,
                                    .dim = dim,
                                    .eps = 1e-5f,
                                    .out_lowp = lowp.get()},
                                   nullptr);
        },
        [&] { std::copy(r0.begin(), r0.end(), res.get()); });
  }
  {  // SiLU·mul over the gate and up halves of a [rows][2F] product.
    const int64_t rows = 2, f = 200;
    DeviceBuffer<float> gu(RandomVector(rng, rows * 2 * f)), out(rows * f);
    check(
        "silu_mul", {BytesOf(gu)}, {BytesOf(out)},
        [&] {
          return cuda::SiluMulCuda({.gate = gu.get(),
                                    .up = gu.get() + f,
                                    .out = out.get(),
                                    .n = rows * f,
                                    .cols = f,
                                    .ld = 2 * f},
                                   nullptr);
        },
        [] {});
  }
  {  // The GEMV: plain, with the norm folded in, and with SiLU·mul (bf16 weights).
    const int64_t m = 2, n = 48, k = 256;
    DeviceBuffer<float> x(RandomVector(rng, m * k)), g(RandomVector(rng, k)), y(m * n),
        h(m * n / 2);
    DeviceBuffer<uint16_t> w(RandomLowp(rng, n * k, DType::kBF16));
    const GemmParams p{.x = x.get(),
                       .w = w.get(),
                       .bias = nullptr,
                       .y = y.get(),
                       .m = m,
                       .n = n,
                       .k = k,
                       .w_dtype = DType::kBF16};
    check(
        "gemv", {BytesOf(x)}, {BytesOf(y)}, [&] { return cuda::GemvCuda(p, nullptr); }, [] {});
    // y += W x, leaving each row's sum of squares in partials (the residual stream's product).
    const std::vector<float> y0 = RandomVector(rng, m * n);
    DeviceBuffer<double> sums(m * cuda::GemvNormSumParts(p));
    ASSERT_GT(sums.size(), 0u);
    GemmFusion add;
    add.accumulate = true;
    add.norm_sums_out = sums.get();
    check(
        "gemv add sums", {BytesOf(x), BytesOf(y)}, {BytesOf(y), BytesOf(sums)},
        [&] { return cuda::GemvCuda(p, nullptr, add); },
        [&] { std::copy(y0.begin(), y0.end(), y.get()); });
    GemmFusion norm;
    norm.norm_weight = g.get();
    norm.norm_eps = 1e-5f;
    check(
        "gemv norm", {BytesOf(x)}, {BytesOf(y)}, [&] { return cuda::GemvCuda(p, nullptr, norm); },
        [] {});
    check(
        "gemv silu_mul", {BytesOf(x)}, {BytesOf(h)},
        [&] {
          return cuda::GemvSiluMulCuda(p,
                                       {.gate = y.get(),
                                        .up = y.get() + n / 2,
                                        .out = h.get(),
                                        .n = m * n / 2,
                                        .cols = n / 2,
                                        .ld = n},
                                       nullptr);
        },
        [] {});
  }
  for (const bool two_pass : {false, true}) {  // the split-KV merge / Helix combine
    cuda::SetPagedAttentionCudaTuningForTesting({.merge_two_pass = two_pass});
    const int64_t parts = 5, rows = 6, d = 64;
    DeviceBuffer<float> o(RandomVector(rng, parts * rows * d)),
        lse(RandomVector(rng, parts * rows, -5.0f, 5.0f)), out(rows * d), out_lse(rows);
    check(
        two_pass ? "merge two-pass" : "merge one-pass", {BytesOf(o), BytesOf(lse)},
        {BytesOf(out), BytesOf(out_lse)},
        [&] {
          return cuda::MergeStatesCuda({.o = o.get(),
                                        .lse = lse.get(),
                                        .out = out.get(),
                                        .out_lse = out_lse.get(),
                                        .num_parts = parts,
                                        .rows = rows,
                                        .head_dim = d},
                                       nullptr);
        },
        [] {});
  }
  cuda::SetPagedAttentionCudaTuningForTesting({});
  for (const bool chunked : {false, true}) {  // the greedy argmax
    const int64_t rows = 2, vocab = 4096;
    DeviceBuffer<float> logits(RandomVector(rng, rows * vocab));
    DeviceBuffer<int32_t> out(rows);
    cuda::ArgmaxParams ap{.logits = logits.get(), .out = out.get(), .rows = rows, .vocab = vocab};
    DeviceBuffer<unsigned char> ws(cuda::ArgmaxCudaWorkspaceBytes(ap) + 4);
    if (chunked) ap.workspace = ws.get();
    check(
        chunked ? "argmax chunked" : "argmax", {BytesOf(logits)}, {BytesOf(out)},
        [&] { return cuda::ArgmaxCuda(ap, nullptr); }, [] {});
  }
}
#endif

#ifdef HELIX_CUDA_EMULATION
// RopeWriteKvCuda computes its angles (and reads the step's positions and slots) before its
// launch wait, but reads q, k and v, the kernel before's output, only after it: under the
// emulator's PdlHook they hold NaN until the thread block reaches PdlEnter, and the results must
// equal an ordinary call's bit for bit. The device run with a real kernel before is
// ProgrammaticLaunchChainMatchesOrdinary's kind of check; this one sees every read.
TEST_F(CudaOpsTest, RopeWriteKvReadsItsInputsOnlyAfterTheWait) {
  std::mt19937 rng(41);
  const int64_t tokens = 2, q_heads = 4, kv_heads = 2, d = 16, tpb = 4;
  const int64_t qn = q_heads * d, kn = kv_heads * d, row = qn + 2 * kn;
  ASSERT_LE(tokens * (q_heads + kv_heads) * d, 256) << "one thread block";
  for (RopeStyle style : {RopeStyle::kInterleaved, RopeStyle::kHalf}) {
    Pool pool(DType::kBF16, 2, kv_heads, tpb, d, 4);
    pool.FillRandom(rng);
    const std::vector<float> qkv = RandomVector(rng, tokens * row);
    const std::vector<int32_t> positions = {5, 77}, block = {1, 3}, slot = {2, 0};
    DeviceBuffer<float> d_qkv(qkv), d_q_out(tokens * qn);
    DeviceBuffer<int32_t> d_pos(positions), d_block(block), d_slot(slot);
    DeviceBuffer<unsigned char> d_pool(pool.host);
    KvPoolView dv = pool.view;
    dv.base = d_pool.get();
    ExpectSameWithInputsPoisonedUntilTheWait(
        style == RopeStyle::kHalf ? "rope half" : "rope interleaved", {BytesOf(d_qkv)},
        {BytesOf(d_qkv), BytesOf(d_q_out), BytesOf(d_pool)},
        [&] {
          return cuda::RopeWriteKvCuda({.q = d_qkv.get(),
                                        .k = d_qkv.get() + qn,
                                        .v = d_qkv.get() + qn + kn,
                                        .row_stride = row,
                                        .q_out = d_q_out.get(),
                                        .positions = d_pos.get(),
                                        .tokens = tokens,
                                        .num_q_heads = q_heads,
                                        .rotary_dim = d,
                                        .theta = 10000.0f,
                                        .style = style,
                                        .kv = dv,
                                        .layer = 1,
                                        .block = d_block.get(),
                                        .token_in_block = d_slot.get()},
                                       nullptr);
        },
        [&] {  // k is rotated in place, and the pool written
          std::copy(qkv.begin(), qkv.end(), d_qkv.get());
          std::copy(pool.host.begin(), pool.host.end(), d_pool.get());
        });
    for (float x : d_q_out.Download()) ASSERT_TRUE(std::isfinite(x));
  }
}
#endif

// RopeWriteKvCuda against RopeCpu on q and k then WriteKv (the CPU backend's Rope, Rope and
// WriteKvBatch), in place on separate q, k and v, with a 4-token-per-block pool of dt;
// block[t] < 0: not stored. non_finite: the inputs hold NaN and infinities, and so must the
// reference's q, k and pool.
void ExpectRopeWriteKvMatchesCpu(DType dt, RopeStyle style, const std::vector<int32_t>& positions,
                                 const std::vector<int32_t>& block,
                                 const std::vector<int32_t>& slot, std::vector<float> q,
                                 std::vector<float> k, const std::vector<float>& v, int64_t q_heads,
                                 int64_t kv_heads, int64_t head_dim, int64_t rotary_dim,
                                 bool non_finite, std::mt19937& rng, const std::string& what) {
  const int64_t tokens = static_cast<int64_t>(positions.size());
  Pool pool(dt, 2, kv_heads, 4, head_dim, 6);
  pool.FillRandom(rng);
  DeviceBuffer<float> d_q(q), d_k(k), d_v(v);
  DeviceBuffer<int32_t> d_pos(positions), d_block(block), d_slot(slot);
  DeviceBuffer<unsigned char> d_pool(pool.host);
  KvPoolView dv = pool.view;
  dv.base = d_pool.get();
  const float theta = 10000.0f;
  ASSERT_EQ(cuda::RopeWriteKvCuda({.q = d_q.get(),
                                   .k = d_k.get(),
                                   .v = d_v.get(),
                                   .positions = d_pos.get(),
                                   .tokens = tokens,
                                   .num_q_heads = q_heads,
                                   .rotary_dim = rotary_dim,
                                   .theta = theta,
                                   .style = style,
                                   .kv = dv,
                                   .layer = 1,
                                   .block = d_block.get(),
                                   .token_in_block = d_slot.get()},
                                  nullptr),
            cudaSuccess)
      << what;
  RopeWriteKvCpu(pool.view, positions, block, slot, &q, &k, v, q_heads, rotary_dim, theta, style);
  ExpectAllNear(ToDouble(q), d_q.Download().data(), kF32Tol, kF32Tol, what + " q");
  ExpectAllNear(ToDouble(k), d_k.Download().data(), kF32Tol, kF32Tol, what + " k");
  const std::vector<unsigned char> got = d_pool.Download();
  const std::vector<double> want_pool = ExpectPoolNear(pool, got, what);
  if (tokens == 0) {
    EXPECT_EQ(got, pool.host) << what << ": zero tokens wrote the pool";
  }
  if (non_finite) {
    ExpectAllNonFiniteKinds(q, what + " q");
    ExpectAllNonFiniteKinds(k, what + " k");
    ExpectAllNonFiniteKinds(want_pool, what + " pool");
  }
}

// The fused RoPE + K/V write with NaN, +inf and -inf in q, k (rotated and passed-through dims,
// position 0 where sin = 0 turns an infinity's partner into NaN) and v; one token; no tokens
// (a no-op that reads nothing). Both styles, an f32, an f16 and a bf16 pool.
TEST_F(CudaOpsTest, RopeWriteKvNonFiniteOneTokenAndNone) {
  std::mt19937 rng(71);
  const int64_t q_heads = 3, kv_heads = 2;  // head_dim 16, 12 of them rotated
  for (RopeStyle style : {RopeStyle::kInterleaved, RopeStyle::kHalf}) {
    for (DType dt : {DType::kF32, DType::kF16, DType::kBF16}) {
      const std::string name =
          std::string(style == RopeStyle::kHalf ? "half " : "interleaved ") + DTypeName(dt);
      const std::vector<int32_t> positions = {0, 1, 4095, 77};
      const std::vector<float> q = RopeNonFiniteX(rng, 4, q_heads);
      const std::vector<float> k = RopeNonFiniteX(rng, 4, kv_heads);
      std::vector<float> v = RandomVector(rng, 4 * kv_heads * 16);
      v[3] = kNaN;
      v[16 + 4] = kInf;
      v[4 * kv_heads * 16 - 1] = -kInf;
      ExpectRopeWriteKvMatchesCpu(dt, style, positions, {2, 5, -1, 0}, {0, 3, 1, 2}, q, k, v,
                                  q_heads, kv_heads, 16, 12, true, rng, name + " non-finite");
      ExpectRopeWriteKvMatchesCpu(dt, style, {31337}, {4}, {1}, RandomVector(rng, 8 * 64),
                                  RandomVector(rng, 2 * 64), RandomVector(rng, 2 * 64), 8, 2, 64,
                                  64, false, rng, name + " one token");
      ExpectRopeWriteKvMatchesCpu(dt, style, {}, {}, {}, {}, {}, {}, 8, 2, 64, 64, false, rng,
                                  name + " no tokens");
    }
  }
}

// One case of GemvRopeKvEqualsGemvThenRopeWriteKv / GemvRopeKvRandomShapes: the fused GEMV +
// RoPE + K/V write of m tokens (positions, blocks and slots: the first m of those given) against
// GemvCuda then RopeWriteKvCuda, bit for bit. norm_mode 0: no norm, 1: the norm summed by the
// GEMV (with a bias), 2: the norm from 3 partial sums.
struct GemvRopeShape {
  int64_t hq, hkv, d, k, m;
};
void ExpectGemvRopeKvSameAsUnfused(const GemvRopeShape& sh, RopeStyle style, DType kv,
                                   int norm_mode, const std::vector<int32_t>& positions,
                                   const std::vector<int32_t>& block,
                                   const std::vector<int32_t>& slot, std::mt19937& rng) {
  using ::testing::Test;
  const int64_t qd = sh.hq * sh.d, kvd = sh.hkv * sh.d, n = qd + 2 * kvd;
  const bool bias = norm_mode == 1;
  const DType wt = kv == DType::kF16 ? DType::kF16 : DType::kBF16;
  const std::string what = std::string(style == RopeStyle::kHalf ? "half " : "interleaved ") +
                           DTypeName(kv) + " hq=" + std::to_string(sh.hq) +
                           " d=" + std::to_string(sh.d) + " k=" + std::to_string(sh.k) +
                           " m=" + std::to_string(sh.m) + " norm=" + std::to_string(norm_mode);
  const std::vector<float> x = RandomVector(rng, sh.m * sh.k);
  const std::vector<uint16_t> w = RandomLowp(rng, n * sh.k, wt);
  const std::vector<float> b = RandomVector(rng, n);
  const std::vector<float> g = RandomVector(rng, sh.k);
  std::vector<double> sums(sh.m * 3);
  for (double& v : sums) v = 0.5 + std::uniform_real_distribution<double>(0, 1)(rng);
  Pool pool(kv, 2, sh.hkv, 4, sh.d, 6);
  pool.FillRandom(rng);
  DeviceBuffer<float> d_x(x), d_b(b), d_g(g);
  DeviceBuffer<uint16_t> d_w(w);
  DeviceBuffer<double> d_sums(sums);
  DeviceBuffer<int32_t> d_pos(std::vector<int32_t>(positions.begin(), positions.begin() + sh.m)),
      d_block(std::vector<int32_t>(block.begin(), block.begin() + sh.m)),
      d_slot(std::vector<int32_t>(slot.begin(), slot.begin() + sh.m));
  GemmFusion f;
  if (norm_mode > 0) {
    f.norm_weight = d_g.get();
    f.norm_eps = 1e-5f;
  }
  if (norm_mode == 2) {
    f.norm_sums_in = d_sums.get();
    f.norm_sum_parts = 3;
  }
  // Reference and fused runs, each on its own y, q_out and copy of the pool.
  struct Out {
    DeviceBuffer<float> y, q_out;
    DeviceBuffer<unsigned char> pool;
  };
  const auto run = [&](bool fused, Out* o) {
    GemmParams p{.x = d_x.get(),
                 .w = d_w.get(),
                 .bias = bias ? d_b.get() : nullptr,
                 .y = o->y.get(),
                 .m = sh.m,
                 .n = n,
                 .k = sh.k,
                 .w_dtype = wt};
    KvPoolView view = pool.view;
    view.base = o->pool.get();
    const RopeWriteKvParams rk{.q = o->y.get(),
                               .k = o->y.get() + qd,
                               .v = o->y.get() + qd + kvd,
                               .row_stride = n,
                               .q_out = o->q_out.get(),
                               .positions = d_pos.get(),
                               .tokens = sh.m,
                               .num_q_heads = sh.hq,
                               .rotary_dim = sh.d,
                               .theta = 500000.0f,
                               .style = style,
                               .kv = view,
                               .layer = 1,
                               .block = d_block.get(),
                               .token_in_block = d_slot.get()};
    if (fused) {
      ASSERT_TRUE(cuda::GemvRopeKvApplies(p, f, rk)) << what;
      ASSERT_EQ(cuda::GemvRopeKvCuda(p, rk, nullptr, f), cudaSuccess) << what;
    } else {
      ASSERT_EQ(cuda::GemvCuda(p, nullptr, f), cudaSuccess) << what;
      ASSERT_EQ(cuda::RopeWriteKvCuda(rk, nullptr), cudaSuccess) << what;
    }
  };
  Out want{DeviceBuffer<float>(std::vector<float>(sh.m * n, NAN)),
           DeviceBuffer<float>(std::vector<float>(sh.m * qd, NAN)),
           DeviceBuffer<unsigned char>(pool.host)};
  Out got{DeviceBuffer<float>(std::vector<float>(sh.m * n, NAN)),
          DeviceBuffer<float>(std::vector<float>(sh.m * qd, NAN)),
          DeviceBuffer<unsigned char>(pool.host)};
  ASSERT_NO_FATAL_FAILURE(run(false, &want));
#ifdef HELIX_CUDA_EMULATION
  // The fused kernel reads its weights and the positions before its launch wait, x and
  // the norm's partial sums (the kernels before's output) only after it: under the
  // emulator's PdlHook they are NaN until each thread block's wait, and nothing changes.
  ExpectSameWithInputsPoisonedUntilTheWait(
      what + " fused", {BytesOf(d_x), BytesOf(d_sums)}, {BytesOf(got.y), BytesOf(got.pool)},
      [&] {
        run(true, &got);
        return Test::HasFatalFailure() ? cudaErrorUnknown : cudaSuccess;
      },
      [&] {
        std::fill_n(got.y.get(), got.y.size(), NAN);
        std::fill_n(got.q_out.get(), got.q_out.size(), NAN);
        std::copy(pool.host.begin(), pool.host.end(), got.pool.get());
      });
#else
  ASSERT_NO_FATAL_FAILURE(run(true, &got));
#endif
  const std::vector<float> wy = want.y.Download(), gy = got.y.Download();
  const std::vector<float> wq = want.q_out.Download(), gq = got.q_out.Download();
  EXPECT_EQ(std::memcmp(wy.data(), gy.data(), wy.size() * sizeof(float)), 0) << what << " y";
  EXPECT_EQ(std::memcmp(wq.data(), gq.data(), wq.size() * sizeof(float)), 0) << what << " q_out";
  EXPECT_EQ(want.pool.Download(), got.pool.Download()) << what << " pool";
  // The pool did change (the stored tokens' K and V), so the comparison means something.
  if (std::any_of(block.begin(), block.begin() + sh.m, [](int32_t b) { return b >= 0; })) {
    EXPECT_NE(got.pool.Download(), pool.host) << what;
  }
}

// The packed q|k|v GEMV with RoPE and the K/V write in its epilogue (GemvRopeKvCuda): bit for bit
// GemvCuda (with the same fusion: none, the norm summed by the GEMV, the norm from partial sums)
// then RopeWriteKvCuda, in y (q as the GEMV wrote it, k rotated, v), q_out and the pool, for
// both styles, every pool type, 1-4 tokens (one not stored on this rank) and k >= 4096 (two
// rows a thread block: one pair).
TEST_F(CudaOpsTest, GemvRopeKvEqualsGemvThenRopeWriteKv) {
  std::mt19937 rng(59);
  const std::vector<int32_t> positions = {7, 4096, 0, 999999};
  const std::vector<int32_t> block = {2, -1, 0, 5};
  const std::vector<int32_t> slot = {0, 1, 3, 2};
  for (RopeStyle style : {RopeStyle::kHalf, RopeStyle::kInterleaved}) {
    // 5 + 1 heads of 12 dims: thread blocks whose pairs span heads and the q/k boundary, and a
    // last thread block of v rows only partly used.
    for (GemvRopeShape sh : {GemvRopeShape{4, 2, 64, 256, 1}, GemvRopeShape{8, 4, 8, 64, 4},
                             GemvRopeShape{5, 1, 12, 64, 2}, GemvRopeShape{2, 1, 128, 4104, 3}}) {
      for (DType kv : {DType::kF32, DType::kF16, DType::kBF16}) {
        for (int norm_mode : {0, 1, 2}) {
          if (norm_mode == 1 && sh.m * sh.k > cuda::kGemvNormMaxFloats) continue;  // no room
          ExpectGemvRopeKvSameAsUnfused(sh, style, kv, norm_mode, positions, block, slot, rng);
        }
      }
    }
  }
  // What it does not take.
  DeviceBuffer<float> d_x(64), d_y(4 * 96), d_q(4 * 64);
  DeviceBuffer<uint16_t> d_w(96 * 64);
  DeviceBuffer<int32_t> d_i(4);
  DeviceBuffer<unsigned char> d_pool(64);
  const GemmParams p{.x = d_x.get(),
                     .w = d_w.get(),
                     .bias = nullptr,
                     .y = d_y.get(),
                     .m = 1,
                     .n = 96,
                     .k = 64,
                     .w_dtype = DType::kBF16};
  RopeWriteKvParams rk{.q = d_y.get(),
                       .k = d_y.get() + 64,
                       .v = d_y.get() + 80,
                       .row_stride = 96,
                       .q_out = d_q.get(),
                       .positions = d_i.get(),
                       .tokens = 1,
                       .num_q_heads = 4,
                       .rotary_dim = 16,
                       .theta = 10000.0f,
                       .style = RopeStyle::kHalf,
                       .kv = {d_pool.get(), DType::kBF16, 1, 1, 4, 16},
                       .layer = 0,
                       .block = d_i.get(),
                       .token_in_block = d_i.get()};
  EXPECT_TRUE(cuda::GemvRopeKvApplies(p, {}, rk));
  RopeWriteKvParams bad = rk;
  bad.rotary_dim = 8;  // partial rotary
  EXPECT_FALSE(cuda::GemvRopeKvApplies(p, {}, bad));
  bad = rk;
  bad.q_out = nullptr;
  EXPECT_FALSE(cuda::GemvRopeKvApplies(p, {}, bad));
  bad = rk;
  bad.tokens = 2;
  EXPECT_FALSE(cuda::GemvRopeKvApplies(p, {}, bad));
  bad = rk;
  bad.k = d_y.get() + 60;  // not the product's k slice
  EXPECT_FALSE(cuda::GemvRopeKvApplies(p, {}, bad));
  bad = rk;
  bad.q_out = d_y.get() + 32;  // inside y
  EXPECT_FALSE(cuda::GemvRopeKvApplies(p, {}, bad));
  EXPECT_EQ(cuda::GemvRopeKvCuda(p, bad, nullptr), cudaErrorInvalidValue);
  bad = rk;
  bad.q_out = d_x.get();  // over x, which other thread blocks still read
  EXPECT_FALSE(cuda::GemvRopeKvApplies(p, {}, bad));
  GemmFusion acc;
  acc.accumulate = true;
  EXPECT_FALSE(cuda::GemvRopeKvApplies(p, acc, rk));
  // q and k rows not a whole number of thread blocks (4 + 2 heads of 2 dims: 12 rows).
  GemmParams small = p;
  small.n = 16;
  RopeWriteKvParams tiny = rk;
  tiny.kv.head_dim = 2;
  tiny.kv.num_kv_heads = 2;
  tiny.rotary_dim = 2;
  tiny.row_stride = 16;
  tiny.k = d_y.get() + 8;
  tiny.v = d_y.get() + 12;
  EXPECT_FALSE(cuda::GemvRopeKvApplies(small, {}, tiny));
}

// Random shapes for the fused q|k|v GEMV + RoPE + K/V write, against the unfused kernels bit for
// bit (a differential fuzz): 1-12 query heads, 1-4 KV heads, even head dims 2-128, k from 8 to
// 8200 (four warps a row from 4096), 1-4 tokens at random positions (some not stored on this
// rank), both styles, every pool type, every norm mode. Shapes the fused kernel does not take
// (its thread blocks hold whole rotation pairs: q and k rows a multiple of its rows per block)
// are drawn again. HELIX_FUZZ_CASES (default 4) cases from seed HELIX_FUZZ_SEED (default 1).
TEST_F(CudaOpsTest, GemvRopeKvRandomShapes) {
  const testing::FuzzRange range = testing::FuzzRangeFromEnv(4);
  for (int64_t i = 0; i < range.cases; ++i) {
    const uint32_t seed = range.first_seed + static_cast<uint32_t>(i);
    testing::Fuzz fz(seed);
    GemvRopeShape sh{};
    do {
      sh.hq = fz.Pick(1, 12);
      sh.hkv = fz.Pick(1, 4);
      sh.d = 2 * fz.Pick(1, 64);
      sh.k = fz.Pick(0, 3) == 0 ? 8 * fz.Pick(512, 1025) : 8 * fz.Pick(1, 130);
      sh.m = fz.Pick(1, 4);
    } while ((sh.hq + sh.hkv) * sh.d % (sh.k >= 4096 ? 2 : 8) != 0 ||
             (sh.k >= 4096 && (sh.hq + 2 * sh.hkv) * sh.d > 1024));  // emulation time
    std::vector<int32_t> positions, block, slot;
    for (int64_t t = 0; t < sh.m; ++t) {
      positions.push_back(t == 0 ? 0 : fz.Pick(1, 1000000));
      // Distinct slots of the pool's 6 blocks of 4 tokens, or -1 (not stored here).
      block.push_back(fz.Pick(0, 4) == 0 ? -1 : static_cast<int32_t>(t));
      slot.push_back(fz.Pick(0, 3));
    }
    const RopeStyle style = fz.Pick(0, 1) == 0 ? RopeStyle::kHalf : RopeStyle::kInterleaved;
    const DType dtypes[] = {DType::kF32, DType::kF16, DType::kBF16};
    const DType kv = dtypes[fz.Pick(0, 2)];
    int norm_mode = fz.Pick(0, 2);
    if (norm_mode == 1 && sh.m * sh.k > cuda::kGemvNormMaxFloats) norm_mode = 2;
    SCOPED_TRACE("fuzz seed " + std::to_string(seed) + ": hq " + std::to_string(sh.hq) + ", hkv " +
                 std::to_string(sh.hkv) + ", d " + std::to_string(sh.d) + ", k " +
                 std::to_string(sh.k) + ", m " + std::to_string(sh.m));
    ExpectGemvRopeKvSameAsUnfused(sh, style, kv, norm_mode, positions, block, slot, fz.rng);
    if (HasFailure()) break;  // the first failing seed is the one to rerun
  }
}

// ---------------------------------------------------------------------------------------------
// MLA attention (DeepSeek absorbed form, one-plane pool)

// DeepSeek rows (latent 512 + rope 64) in every pool dtype; 16 heads and 40 (head groups of 16,
// the last partial); decode lengths 1, a partial block, 0 (a rank holding nothing) and longer
// ones; split-KV off, forced and automatic, which must split a 16K-token single-sequence
// decode. Pool slots no query may read hold NaN.
TEST_F(CudaOpsTest, MlaAttentionDeepSeekShapes) {
  std::mt19937 rng(41);
  const int64_t tpb = 64, latent = 512, rope = 64, dk = latent + rope;
  struct Shape {
    DType dt;
    int64_t heads;
    std::vector<int32_t> lens;
  };
  for (const Shape& sh :
       {Shape{DType::kBF16, 16, {1, 63, 0, 1000}}, Shape{DType::kF16, 40, {65, 300}},
        Shape{DType::kF32, 16, {129, 7}}, Shape{DType::kBF16, 16, {16384 - 5}}}) {
    int64_t blocks = 2;
    for (int32_t len : sh.lens) {
      blocks += (len + tpb - 1) / tpb;
    }
    KvPoolView view{.base = nullptr,
                    .dtype = sh.dt,
                    .num_layers = 1,
                    .num_kv_heads = 1,
                    .tokens_per_block = tpb,
                    .head_dim = dk,
                    .num_planes = 1};
    std::vector<unsigned char> host(blocks * view.block_elems() * DTypeSize(sh.dt));
    view.base = host.data();
    const auto set = [&](int64_t i, float f) {
      if (sh.dt == DType::kF32) {
        static_cast<float*>(view.base)[i] = f;
      } else {
        static_cast<uint16_t*>(view.base)[i] = ToStorage(sh.dt, f);
      }
    };
    for (int64_t i = 0; i < blocks * view.block_elems(); ++i) {
      set(i, std::nanf(""));
    }
    Problem pr = DecodeBatch(sh.lens, tpb, blocks, rng);
    std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
    for (size_t s = 0; s < pr.tables.size(); ++s) {
      for (int64_t t = 0; t < pr.kv_lens[s]; ++t) {
        for (int64_t e = 0; e < dk; ++e) {
          set(KvOffset(view, pr.tables[s][t / tpb], 0, 0, 0, t % tpb) + e, dist(rng));
        }
      }
    }
    pr.q = RandomVector(rng, pr.tokens() * sh.heads * dk);
    const std::vector<int32_t> tables = pr.Flat(pr.tables), firsts = pr.Flat(pr.firsts);
    MlaAttentionParams p{.q = pr.q.data(),
                         .q_seq = pr.q_seq.data(),
                         .q_pos = pr.q_pos.data(),
                         .kv = view,
                         .layer = 0,
                         .block_tables = tables.data(),
                         .block_first_pos = firsts.data(),
                         .kv_lens = pr.kv_lens.data(),
                         .max_blocks_per_seq = pr.max_blocks,
                         .num_seqs = static_cast<int64_t>(pr.tables.size()),
                         .num_q_tokens = pr.tokens(),
                         .num_heads = sh.heads,
                         .latent_dim = latent,
                         .rope_dim = rope,
                         .scale = 0.1352f,
                         .out = nullptr,
                         .lse = nullptr,
                         .kv_split_tokens = 0};
    AttnResult want;
    want.out.assign(pr.tokens() * sh.heads * latent, -777.0f);
    want.lse.assign(pr.tokens() * sh.heads, -777.0f);
    p.out = want.out.data();
    p.lse = want.lse.data();
    ThreadPool threads(2);
    MlaAttentionCpu(p, nullptr, &threads);

    DeviceBuffer<unsigned char> d_pool(host);
    DeviceBuffer<int32_t> d_q_seq(pr.q_seq), d_q_pos(pr.q_pos), d_tables(tables), d_firsts(firsts),
        d_lens(pr.kv_lens);
    DeviceBuffer<float> d_q(pr.q);
    p.kv.base = d_pool.get();
    p.q = d_q.get();
    p.q_seq = d_q_seq.get();
    p.q_pos = d_q_pos.get();
    p.block_tables = d_tables.get();
    p.block_first_pos = d_firsts.get();
    p.kv_lens = d_lens.get();
    const int64_t auto_split = cuda::MlaAttentionCudaSplitTokens(p);
    if (sh.lens.size() == 1) {
      EXPECT_GT(auto_split, 0) << "a 1-sequence long decode should split";
    }
    for (int64_t split : {int64_t{0}, 2 * tpb, auto_split}) {
      DeviceBuffer<float> d_out(std::vector<float>(want.out.size(), -777.0f));
      DeviceBuffer<float> d_lse(std::vector<float>(want.lse.size(), -777.0f));
      p.out = d_out.get();
      p.lse = d_lse.get();
      p.kv_split_tokens = split;
      DeviceBuffer<unsigned char> ws(cuda::MlaAttentionCudaWorkspaceBytes(p));
      const gpu_testing::Stream stream;
      ASSERT_EQ(cuda::MlaAttentionCuda(p, ws.get(), stream.get()), cudaSuccess);
      stream.Sync();
      const AttnResult got{d_out.Download(), d_lse.Download()};
      const std::string what = std::string("mla ") + DTypeName(sh.dt) +
                               " heads=" + std::to_string(sh.heads) +
                               " split=" + std::to_string(split);
      ExpectSame(want, got, what);
      if (sh.lens.size() == 4) {  // the empty sequence (index 2)
        for (int64_t i = 2 * sh.heads; i < 3 * sh.heads; ++i) {
          EXPECT_EQ(got.lse[i], -kInf) << what;
          for (int64_t e = 0; e < latent; ++e) {
            EXPECT_EQ(got.out[i * latent + e], 0.0f) << what;
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace helix::kernels
