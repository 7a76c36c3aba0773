// The CUDA attention and merge kernels of kernels/cuda/attention_cuda.cu compiled as C++ and
// run by the CPU emulation of tests/gpu/cuda_emu.h (host threads as CUDA threads), against
// PagedAttentionCpu: checks the kernels' indexing, pipeline stages, shuffles and barriers on
// machines without a GPU. Slow per element, so the problems are small.
#define HELIX_CUDA_EMULATION 1
#include "tests/gpu/cuda_emu.h"
// clang-format off
#include "kernels/cuda/attention_cuda.cu"
// clang-format on

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/attention.h"
#include "kernels/test_util.h"

namespace helix::kernels {
namespace {

using testing::AppendQueries;
using testing::ExpectAllNear;
using testing::Fuzz;
using testing::FuzzRange;
using testing::FuzzRangeFromEnv;
using testing::RandomVector;

struct Case {
  DType dtype;
  int64_t group, d, tpb, split;
  std::vector<int32_t> lens;  // one decode query per sequence, or with prefill a query at every
  bool prefill = false;       // position from prefill_from (or the last, if smaller) of every
  int32_t prefill_from = 0;   // sequence: a causal (chunked) prefill
  std::vector<int32_t> froms = {};  // with prefill: prefill_from of each sequence, if given
  // Optional, for RandomCasesAgainstCpu: KV heads; a context-parallel placement (this rank holds
  // blocks cp_rank, cp_rank + cp, ... of each sequence: block j's first global position is
  // (j * cp + cp_rank) * tpb); explicit query positions per sequence (global, ascending; they
  // replace the decode / prefill queries above when given); the softmax scale's factor over
  // 1 / sqrt(d).
  int64_t kv_heads = 2, cp = 1, cp_rank = 0;
  std::vector<std::vector<int32_t>> q_positions = {};
  float scale_mul = 1.0f;
};

// PagedAttentionParams::l2_prefetch of every RunCase call (none unless a test sets it).
struct PrefetchRanges {
  const void* at[2] = {nullptr, nullptr};
  int64_t bytes[2] = {0, 0};
};
PrefetchRanges g_prefetch;

// With g_pdl.on, RunCase's CUDA call runs under the emulator's programmatic-launch hook as in a
// decode step: until a thread block reaches PdlEnter, q and the K and V rows at every query
// token's own position (what the kernels before the attention write) hold NaN; they get their
// values there. g_pdl.early sets PagedAttentionParams::kv_settled_below_q; the call leaves the
// cp.async copies issued before PdlEnter and its results in g_pdl.
struct PdlRun {
  bool on = false;
  bool early = false;
  int64_t copies = 0;
  std::vector<float> out, lse;
};
PdlRun g_pdl;

// Puts the kernel tuning and g_pdl back to their defaults when a test ends.
struct ResetTuningAndPdl {
  ~ResetTuningAndPdl() {
    cuda::SetPagedAttentionCudaTuningForTesting({});
    g_pdl = {};
  }
};

void Store(DType t, void* base, int64_t i, float f) {
  if (t == DType::kF32) {
    static_cast<float*>(base)[i] = f;
  } else {
    static_cast<uint16_t*>(base)[i] = t == DType::kF16 ? FloatToHalf(f) : FloatToBf16(f);
  }
}

// kernel: the PagedAttentionCudaKernelName the case must run, or nullptr for any.
void RunCase(const Case& c, uint32_t seed, const char* kernel = nullptr) {
  std::mt19937 rng(seed);
  const int64_t kv_heads = c.kv_heads, layers = 2, layer = 1;
  const int64_t q_heads = kv_heads * c.group;
  int64_t max_blocks = 1, total_blocks = 0;
  for (int32_t len : c.lens) {
    max_blocks = std::max<int64_t>(max_blocks, (len + c.tpb - 1) / c.tpb);
    total_blocks += (len + c.tpb - 1) / c.tpb;
  }
  total_blocks += 2;
  KvPoolView view{nullptr, c.dtype, layers, kv_heads, c.tpb, c.d};
  std::vector<unsigned char> pool(total_blocks * view.block_elems() * DTypeSize(c.dtype));
  view.base = pool.data();
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  for (int64_t i = 0; i < total_blocks * view.block_elems(); ++i) {
    Store(c.dtype, view.base, i, dist(rng));
  }
  std::vector<int32_t> ids(total_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  const int64_t seqs = static_cast<int64_t>(c.lens.size());
  std::vector<int32_t> tables(seqs * max_blocks, -1), firsts(seqs * max_blocks, -1);
  size_t next = 0;
  for (int64_t s = 0; s < seqs; ++s) {
    for (int64_t j = 0; j * c.tpb < c.lens[s]; ++j) {
      tables[s * max_blocks + j] = ids[next++];
      firsts[s * max_blocks + j] = static_cast<int32_t>((j * c.cp + c.cp_rank) * c.tpb);
    }
  }
  std::vector<int32_t> q_seq, q_pos;
  if (!c.q_positions.empty()) {
    AppendQueries(c.q_positions, &q_seq, &q_pos);
  } else if (c.prefill) {
    for (int64_t s = 0; s < seqs; ++s) {
      const int32_t from = c.froms.empty() ? c.prefill_from : c.froms[s];
      for (int32_t i = std::min(from, std::max(0, c.lens[s] - 1)); i < c.lens[s]; ++i) {
        q_seq.push_back(static_cast<int32_t>(s));
        q_pos.push_back(i);
      }
    }
  } else {
    for (int64_t s = 0; s < seqs; ++s) {
      q_seq.push_back(static_cast<int32_t>(s));
      q_pos.push_back(std::max(0, c.lens[s] - 1));
    }
  }
  const int64_t tokens = static_cast<int64_t>(q_seq.size());
  const std::vector<float> q = RandomVector(rng, tokens * q_heads * c.d);
  PagedAttentionParams p{.q = q.data(),
                         .q_seq = q_seq.data(),
                         .q_pos = q_pos.data(),
                         .kv = view,
                         .layer = layer,
                         .block_tables = tables.data(),
                         .block_first_pos = firsts.data(),
                         .kv_lens = c.lens.data(),
                         .max_blocks_per_seq = max_blocks,
                         .num_seqs = seqs,
                         .num_q_tokens = tokens,
                         .num_q_heads = q_heads,
                         .num_kv_heads = kv_heads,
                         .head_dim = c.d,
                         .scale = c.scale_mul / std::sqrt(static_cast<float>(c.d)),
                         .out = nullptr,
                         .lse = nullptr,
                         .kv_split_tokens = 0};
  std::vector<float> want_out(tokens * q_heads * c.d), want_lse(tokens * q_heads);
  p.out = want_out.data();
  p.lse = want_lse.data();
  PagedAttentionCpu(p, nullptr, nullptr);

  std::vector<float> out(want_out.size(), -777.0f), lse(want_lse.size(), -777.0f);
  p.out = out.data();
  p.lse = lse.data();
  p.kv_split_tokens = c.split;
  for (int r = 0; r < 2; ++r) {
    p.l2_prefetch[r] = g_prefetch.at[r];
    p.l2_prefetch_bytes[r] = g_prefetch.bytes[r];
  }
  if (kernel != nullptr) {
    ASSERT_STREQ(cuda::PagedAttentionCudaKernelName(p), kernel);
  }
  std::vector<float> q_dev = q;  // what the kernels see (g_pdl may poison it)
  p.q = q_dev.data();
  helix_emu::PdlHook hook;
  struct Unhook {
    ~Unhook() { helix_emu::g_pdl_hook = nullptr; }
  } unhook;
  std::vector<std::pair<int64_t, std::vector<unsigned char>>> own_rows;  // byte offset, bytes
  if (g_pdl.on) {
    p.kv_settled_below_q = g_pdl.early;
    const int64_t row_bytes = c.d * static_cast<int64_t>(DTypeSize(c.dtype));
    for (int64_t t = 0; t < tokens; ++t) {
      const int32_t s = q_seq[t], pos = q_pos[t];
      if (pos >= c.lens[s]) continue;  // an empty sequence's query has no row
      const int32_t block = tables[s * max_blocks + pos / c.tpb];
      for (int kvc = 0; kvc < 2; ++kvc) {
        for (int64_t h = 0; h < kv_heads; ++h) {
          const int64_t at = KvOffset(view, block, layer, kvc, h, pos % c.tpb) * DTypeSize(c.dtype);
          own_rows.emplace_back(
              at, std::vector<unsigned char>(pool.begin() + at, pool.begin() + at + row_bytes));
        }
      }
    }
    hook.before_block = [&] {  // 0xff bytes: NaN in f32, f16 and bf16
      std::fill(q_dev.begin(), q_dev.end(), std::nanf(""));
      for (const auto& [at, bytes] : own_rows) {
        std::fill_n(pool.begin() + at, bytes.size(), 0xff);
      }
    };
    hook.at_wait = [&] {
      q_dev = q;
      for (const auto& [at, bytes] : own_rows) {
        std::copy(bytes.begin(), bytes.end(), pool.begin() + at);
      }
    };
    helix_emu::g_pdl_hook = &hook;
  }
  std::vector<float> ws(cuda::PagedAttentionCudaWorkspaceBytes(p) / sizeof(float) + 1);
  ASSERT_EQ(cuda::PagedAttentionCuda(p, ws.data(), nullptr), cudaSuccess);
  helix_emu::g_pdl_hook = nullptr;
  if (g_pdl.on) {
    g_pdl.copies = hook.copies;
    g_pdl.out = out;
    g_pdl.lse = lse;
  }
  std::string what = std::string(DTypeName(c.dtype)) + " group=" + std::to_string(c.group) +
                     " d=" + std::to_string(c.d) + " tpb=" + std::to_string(c.tpb) +
                     " split=" + std::to_string(c.split) + (c.prefill ? " prefill" : "");
  if (c.kv_heads != 2 || c.cp != 1 || !c.q_positions.empty() || c.scale_mul != 1.0f) {
    what += " kv_heads=" + std::to_string(c.kv_heads) + " cp=" + std::to_string(c.cp) + "/" +
            std::to_string(c.cp_rank) + " scale_mul=" + std::to_string(c.scale_mul) + " lens=";
    for (int32_t len : c.lens) what += std::to_string(len) + ",";
    what += " q_pos=";
    for (int32_t pos : q_pos) what += std::to_string(pos) + ",";
  }
  ExpectAllNear(std::vector<double>(want_out.begin(), want_out.end()), out.data(), 2e-5, 2e-5,
                what + " out");
  ExpectAllNear(std::vector<double>(want_lse.begin(), want_lse.end()), lse.data(), 2e-5, 2e-5,
                what + " lse");
}

TEST(AttentionEmuTest, FastPathDecode) {
  // Lengths 1, a partial block, 0 (a rank holding nothing), several tiles.
  const std::vector<int32_t> lens = {1, 37, 0, 130};
  // Every dtype with every group size; head dim and split-KV alternate so that each dtype
  // and each group size meets both head dims and both split settings (12 of the 36
  // combinations: the emulation is slow on CI's two cores).
  uint32_t seed = 1;
  const DType dtypes[] = {DType::kBF16, DType::kF32, DType::kF16};
  const int64_t groups[] = {4, 3, 8, 2};
  for (int t = 0; t < 3; ++t) {
    for (int g = 0; g < 4; ++g) {
      const int64_t d = (g + t) % 2 == 0 ? 128 : 64;
      const int64_t split = (g / 2 + t) % 2 == 0 ? 0 : 64;
      RunCase({dtypes[t], groups[g], d, 16, split, lens}, seed++);
    }
  }
}

TEST(AttentionEmuTest, OddBlockSizesSubGroupsAndPrefill) {
  RunCase({DType::kBF16, 12, 128, 5, 0, {1, 23, 71}}, 100);    // tokens per block not /32
  RunCase({DType::kBF16, 4, 128, 64, 128, {1, 200, 0}}, 101);  // blocks longer than a tile
  RunCase({DType::kF16, 2, 64, 16, 0, {45}, true}, 102);       // causal prefill
  RunCase({DType::kF32, 4, 20, 16, 32, {1, 37, 0, 70}}, 103);  // generic path, split
  RunCase({DType::kBF16, 8, 16, 4, 0, {9, 3}, true}, 104);     // generic path, prefill
}

// The warp-pipelined kernel with 1, 4 and 8 warps per thread block (some warps get no rows)
// and ring depths 2 to 4, with the L2 bulk prefetch on, and with TMA bulk copies.
TEST(AttentionEmuTest, WarpCountsAndLegacyKernel) {
  struct Restore {
    ~Restore() { cuda::SetPagedAttentionCudaTuningForTesting({}); }
  } restore;
  for (int warps : {1, 4, 8}) {
    cuda::SetPagedAttentionCudaTuningForTesting({.warps_per_block = warps,
                                                 .stages = warps == 1   ? 2
                                                           : warps == 4 ? 4
                                                                        : 3});
    RunCase({DType::kBF16, 4, 128, 16, 0, {1, 37, 0, 130}}, 200 + warps);
    RunCase({DType::kF16, 8, 64, 5, 64, {3, 71}}, 210 + warps);
    RunCase({DType::kF32, 3, 128, 16, 0, {45}, true}, 220 + warps);
  }
  cuda::SetPagedAttentionCudaTuningForTesting({.prefetch_steps = 3});
  RunCase({DType::kBF16, 4, 128, 16, 64, {1, 37, 0, 130}}, 225);
  // TMA bulk copies per warp step: partial steps, causal cuts inside a step (prefill), groups
  // of 8, 2-deep rings, and a block size that keeps the cp.async path.
  cuda::SetPagedAttentionCudaTuningForTesting({.bulk_copy = true});
  RunCase({DType::kBF16, 4, 128, 16, 64, {1, 37, 0, 130}}, 226);
  RunCase({DType::kF16, 8, 64, 8, 0, {3, 71}}, 227);
  RunCase({DType::kF32, 3, 128, 16, 0, {45}, true}, 228);
  RunCase({DType::kBF16, 4, 128, 5, 0, {1, 23}}, 229);
  cuda::SetPagedAttentionCudaTuningForTesting(
      {.warps_per_block = 1, .stages = 2, .bulk_copy = true});
  RunCase({DType::kBF16, 4, 128, 8, 0, {1, 37, 0, 130}}, 230);
}

// PagedAttentionParams::kv_settled_below_q: the warp-pipelined kernels (fp32 and tensor-core
// math, 1 to 8 warps, split or not) issue their first KV copies before PdlEnter, yet read q and
// each query's own row only after it (RunCase's hook makes them NaN until then), and give the
// same bits as without it. Prefill calls, block sizes that split a warp step, the generic and
// TMA paths keep every read after PdlEnter. Every call is also checked against the CPU.
TEST(AttentionEmuTest, EarlyKvBeforeTheWait) {
  const ResetTuningAndPdl reset;
  const auto both = [](const Case& c, uint32_t seed, bool expect_early) {
    SCOPED_TRACE("seed " + std::to_string(seed));
    g_pdl = PdlRun{};
    g_pdl.on = true;
    RunCase(c, seed);
    const PdlRun late = g_pdl;
    EXPECT_EQ(late.copies, 0);
    g_pdl.early = true;
    RunCase(c, seed);
    if (expect_early) {
      EXPECT_GT(g_pdl.copies, 0);
    } else {
      EXPECT_EQ(g_pdl.copies, 0);
    }
    EXPECT_EQ(g_pdl.out, late.out);
    EXPECT_EQ(g_pdl.lse, late.lse);
  };
  both({DType::kBF16, 4, 128, 16, 0, {1, 37, 0, 130}}, 400, true);
  both({DType::kF16, 8, 64, 16, 64, {1, 37, 0, 130}}, 401, true);
  both({DType::kF32, 3, 64, 8, 32, {45, 9}}, 402, true);
  both({DType::kBF16, 4, 128, 5, 0, {1, 23}}, 403, false);     // a step across blocks
  both({DType::kBF16, 2, 64, 16, 0, {45}, true}, 404, false);  // prefill
  both({DType::kF32, 4, 20, 16, 0, {1, 37}}, 405, false);      // generic path
  cuda::SetPagedAttentionCudaTuningForTesting({.tensor_cores = true});
  both({DType::kBF16, 4, 128, 16, 0, {1, 37, 0, 130}}, 406, true);
  both({DType::kF16, 12, 128, 16, 32, {3, 45}}, 407, true);
  both({DType::kBF16, 4, 64, 16, 0, {9, 20}, true}, 408, false);  // the prefill kernel
  cuda::SetPagedAttentionCudaTuningForTesting({.warps_per_block = 1, .stages = 2});
  both({DType::kBF16, 4, 64, 16, 0, {1, 37, 0, 130}}, 409, true);
  cuda::SetPagedAttentionCudaTuningForTesting({.bulk_copy = true});
  both({DType::kBF16, 4, 128, 16, 64, {1, 37, 0, 130}}, 410, false);
}

// The tensor-core (mma.sync) variant of the warp-pipelined kernel: both 16-bit KV types and head
// dims, groups of 1 to 8 and 12 (two thread blocks, 8 + 4 heads), block sizes that put a step in
// one block or across blocks, split-KV, a causal prefill (cuts inside a step), an empty
// sequence, 1 to 8 warps and ring depths 2 to 4. Its q.k and P.V keep about fp32 accuracy (q and
// P as two 16-bit halves each), so the tolerance is the fp32 kernel's. f32 KV keeps the fp32
// kernel.
TEST(AttentionEmuTest, TensorCoreKernel) {
  struct Restore {
    ~Restore() { cuda::SetPagedAttentionCudaTuningForTesting({}); }
  } restore;
  cuda::SetPagedAttentionCudaTuningForTesting({.tensor_cores = true});
  RunCase({DType::kBF16, 4, 128, 16, 0, {1, 37, 0, 130}}, 300, "mma");
  RunCase({DType::kF16, 8, 64, 16, 64, {1, 37, 0, 130}}, 301, "mma");
  RunCase({DType::kBF16, 3, 64, 5, 0, {1, 23, 71}}, 302, "mma");
  RunCase({DType::kF16, 12, 128, 16, 32, {3, 45}}, 303, "mma");
  RunCase({DType::kBF16, 2, 128, 16, 16, {45}, true}, 304, "mma");  // split: not the prefill one
  RunCase({DType::kBF16, 1, 64, 64, 128, {1, 200, 0}}, 305, "mma");
  RunCase({DType::kF32, 4, 128, 16, 0, {1, 37}}, 306, "warp");
  cuda::SetPagedAttentionCudaTuningForTesting(
      {.warps_per_block = 1, .stages = 2, .tensor_cores = true});
  RunCase({DType::kF16, 4, 128, 8, 0, {1, 37, 0, 130}}, 307, "mma");
  cuda::SetPagedAttentionCudaTuningForTesting(
      {.warps_per_block = 8, .stages = 4, .tensor_cores = true});
  RunCase({DType::kBF16, 6, 64, 16, 64, {3, 71, 130}}, 308, "mma");
}

// The tensor-core prefill kernel (the KV shared by a thread block's query tokens): group sizes
// whose query rows do and do not fill a thread block's 64 evenly, both 16-bit types and head
// dims, tiles past the last query's position, partial tiles and blocks, tokens per block not a
// multiple of the tile; thread blocks spanning sequences (one pass each), a chunk of a prefill
// (queries from position 40 on, earlier KV only read), an empty sequence and one-token ones, and
// decode tokens batched with prompts.
// With split-KV the call keeps the decode kernel.
TEST(AttentionEmuTest, TensorCorePrefill) {
  struct Restore {
    ~Restore() { cuda::SetPagedAttentionCudaTuningForTesting({}); }
  } restore;
  cuda::SetPagedAttentionCudaTuningForTesting({.tensor_cores = true});
  RunCase({DType::kBF16, 4, 128, 16, 0, {45}, true}, 320, "mma_prefill");
  RunCase({DType::kF16, 3, 64, 5, 0, {37}, true}, 321, "mma_prefill");
  RunCase({DType::kBF16, 1, 64, 32, 0, {70}, true}, 322, "mma_prefill");
  RunCase({DType::kF16, 12, 128, 8, 0, {21}, true}, 323, "mma_prefill");
  RunCase({DType::kBF16, 2, 64, 16, 0, {45, 1, 0, 30, 2}, true}, 326, "mma_prefill");
  RunCase({DType::kF16, 8, 128, 16, 0, {70, 50, 1}, true, 40}, 327, "mma_prefill");
  // Decode tokens of long contexts batched around a prompt: the thread blocks they share with
  // other sequences are left to the warp kernel.
  RunCase({DType::kBF16, 4, 64, 16, 0, {300, 90, 200, 5, 150}, true, 0, {1000, 0, 1000, 1000, 120}},
          328, "mma_prefill");
  RunCase({DType::kBF16, 4, 64, 16, 32, {45}, true}, 324, "mma");
  RunCase({DType::kF32, 4, 64, 16, 0, {45}, true}, 325, "warp");
}

// The L2 prefetch hint (PagedAttentionParams::l2_prefetch): the warp-pipelined kernel's thread
// blocks, together, prefetch both ranges exactly once, in pieces cp.async.bulk.prefetch takes
// (the emulated instruction aborts on any other), whatever the grid (2 to 16 thread blocks here,
// shares of one piece and of several, a range of one 16-byte unit); the output is unchanged;
// the generic kernel ignores the ranges; ranges breaking the rules are refused.
TEST(AttentionEmuTest, L2PrefetchCoversItsRangesOnce) {
  struct Restore {
    ~Restore() {
      cuda::SetPagedAttentionCudaTuningForTesting({});
      g_prefetch = {};
      std::lock_guard<std::mutex> lock(helix_emu::g_prefetch_mu);
      helix_emu::g_prefetch_hook = nullptr;
    }
  } restore;
  std::vector<std::pair<uintptr_t, unsigned>> pieces;
  {
    std::lock_guard<std::mutex> lock(helix_emu::g_prefetch_mu);
    helix_emu::g_prefetch_hook = [&](const void* at, unsigned n) {
      pieces.emplace_back(reinterpret_cast<uintptr_t>(at), n);
    };
  }
  // 16-byte aligned storage: a range of 5 MiB + 48 bytes (several 1 MiB pieces per block when
  // the grid is small) and others of 16 and 40,016 bytes.
  std::vector<uint4> big((5 << 20) / 16 + 3), small(40016 / 16);
  const auto check = [&](const std::string& what, int64_t n0, int64_t n1) {
    std::sort(pieces.begin(), pieces.end());
    int64_t covered[2] = {0, 0};
    uintptr_t end[2] = {reinterpret_cast<uintptr_t>(big.data()),
                        reinterpret_cast<uintptr_t>(small.data())};
    for (const auto& [at, n] : pieces) {
      int r = -1;
      for (int i = 0; i < 2; ++i) {
        const auto lo = reinterpret_cast<uintptr_t>(i == 0 ? big.data() : small.data());
        if (at >= lo && at + n <= lo + static_cast<uintptr_t>(i == 0 ? n0 : n1)) {
          r = i;
        }
      }
      ASSERT_GE(r, 0) << what << ": a piece outside the ranges";
      EXPECT_EQ(at, end[r]) << what << ": a gap or an overlap in range " << r;
      end[r] = at + n;
      covered[r] += n;
    }
    EXPECT_EQ(covered[0], n0) << what;
    EXPECT_EQ(covered[1], n1) << what;
    pieces.clear();
  };
  struct Sizes {
    int64_t n0, n1;
  };
  const Sizes sizes[] = {{(5 << 20) + 48, 40016}, {16, 0}, {0, 40016}, {4096 * 3, 16}};
  int seed = 400;
  for (const Sizes& z : sizes) {
    g_prefetch = {{big.data(), small.data()}, {z.n0, z.n1}};
    const std::string what = std::to_string(z.n0) + " + " + std::to_string(z.n1) + " bytes";
    RunCase({DType::kBF16, 4, 128, 16, 0, {1, 37}}, seed++, "warp");  // 2 x 2 thread blocks
    check(what + ", 4 blocks", z.n0, z.n1);
    RunCase({DType::kF16, 8, 64, 16, 32, {1, 37, 0, 130}}, seed++, "warp");  // split: 40 blocks
    check(what + ", split", z.n0, z.n1);
  }
  cuda::SetPagedAttentionCudaTuningForTesting({.tensor_cores = true});
  g_prefetch = {{big.data(), small.data()}, {(5 << 20) + 48, 40016}};
  RunCase({DType::kBF16, 4, 64, 16, 64, {1, 200, 0}}, seed++, "mma");
  check("mma", (5 << 20) + 48, 40016);
  RunCase({DType::kBF16, 4, 64, 16, 0, {45}, true}, seed++, "mma_prefill");
  EXPECT_TRUE(pieces.empty()) << "the prefill kernel prefetched";
  cuda::SetPagedAttentionCudaTuningForTesting({});
  RunCase({DType::kF32, 4, 20, 16, 32, {1, 37, 0, 70}}, seed++, "generic");
  EXPECT_TRUE(pieces.empty()) << "the generic kernel prefetched";
  g_prefetch = {};

  // Refused: a start not 16-byte aligned, a length not a multiple of 16, a length without a
  // start, a negative length.
  const std::vector<float> q(4 * 128, 0.5f);
  std::vector<float> out(4 * 128), lse(4);
  std::vector<uint16_t> pool(4 * 128 * 16 * 2);
  const std::vector<int32_t> table = {0}, first = {0}, len = {3}, seq = {0}, pos = {2};
  PagedAttentionParams p{.q = q.data(),
                         .q_seq = seq.data(),
                         .q_pos = pos.data(),
                         .kv = {pool.data(), DType::kBF16, 1, 1, 16, 128},
                         .layer = 0,
                         .block_tables = table.data(),
                         .block_first_pos = first.data(),
                         .kv_lens = len.data(),
                         .max_blocks_per_seq = 1,
                         .num_seqs = 1,
                         .num_q_tokens = 1,
                         .num_q_heads = 4,
                         .num_kv_heads = 1,
                         .head_dim = 128,
                         .scale = 0.1f,
                         .out = out.data(),
                         .lse = lse.data(),
                         .kv_split_tokens = 0};
  ASSERT_EQ(cuda::PagedAttentionCuda(p, nullptr, nullptr), cudaSuccess);
  const auto* base = reinterpret_cast<const unsigned char*>(big.data());
  const struct {
    const void* at;
    int64_t n;
  } bad[] = {{base + 8, 64}, {base, 40}, {nullptr, 64}, {base, -16}};
  for (const auto& b : bad) {
    for (int r = 0; r < 2; ++r) {
      PagedAttentionParams pb = p;
      pb.l2_prefetch[r] = b.at;
      pb.l2_prefetch_bytes[r] = b.n;
      EXPECT_EQ(cuda::PagedAttentionCuda(pb, nullptr, nullptr), cudaErrorInvalidValue)
          << "range " << r << ": " << b.n << " bytes at offset "
          << (b.at == nullptr ? -1 : static_cast<const unsigned char*>(b.at) - base);
    }
  }
  EXPECT_TRUE(pieces.empty());
}

// PagedAttentionCudaSplitTokens' min_chunk_tokens (CudaBackendOptions::
// attention_min_chunk_tokens): the one-wave split never cuts chunks shorter than the caller asks
// (the emulated device is an H100: 132 SMs), and asks for none when a chunk would hold it all.
TEST(AttentionEmuTest, SplitHonoursTheCallersShortestChunk) {
  PagedAttentionParams p{};
  p.kv = {nullptr, DType::kBF16, 1, 2, 16, 128};
  p.max_blocks_per_seq = 256;  // 4096 tokens
  p.num_seqs = 1;
  p.num_q_tokens = 1;
  p.num_q_heads = 8;
  p.num_kv_heads = 2;
  p.head_dim = 128;
  EXPECT_EQ(cuda::PagedAttentionCudaSplitTokens(p), 128);  // the default shortest chunk
  EXPECT_EQ(cuda::PagedAttentionCudaSplitTokens(p, 512), 512);
  EXPECT_EQ(cuda::PagedAttentionCudaSplitTokens(p, 500), 512);  // whole blocks
  EXPECT_EQ(cuda::PagedAttentionCudaSplitTokens(p, 4096), 0);   // one chunk: no split
  p.max_blocks_per_seq = 4096;  // 64K tokens: the wave, not the shortest chunk, decides
  EXPECT_EQ(cuda::PagedAttentionCudaSplitTokens(p, 512), cuda::PagedAttentionCudaSplitTokens(p));
}

// Random shapes and settings against the CPU kernel (a differential fuzz): every dtype, head
// dims of the warp-pipelined and generic paths, groups 1-12 (and 16, 24: several thread blocks
// per group), 1-3 KV heads, block sizes that do and do not fit a warp step, empty, one-token and
// partial sequences, context-parallel block placements with queries before, inside and after a
// rank's blocks, decode, prefill and arbitrary query positions, split-KV or not, larger softmax
// scales, and random kernel tuning (warps, ring depth, L2 prefetch distance, tensor cores, TMA
// bulk copies, two-pass merge); a quarter of the decode cases also run with the early KV copies
// under the programmatic-launch hook (on shapes where that path applies: it must issue copies
// before the wait) and must give the same bits as without. HELIX_FUZZ_CASES
// (default 40) cases from seed HELIX_FUZZ_SEED (default 1): a failure names its seed, and
// HELIX_FUZZ_SEED=<seed> HELIX_FUZZ_CASES=1 reruns it alone.
TEST(AttentionEmuTest, RandomCasesAgainstCpu) {
  const ResetTuningAndPdl reset;
  const FuzzRange range = FuzzRangeFromEnv(40);
  for (int64_t i = 0; i < range.cases; ++i) {
    const uint32_t seed = range.first_seed + static_cast<uint32_t>(i);
    Fuzz fz(seed);
    Case c{};
    const DType dtypes[] = {DType::kF32, DType::kF16, DType::kBF16};
    c.dtype = dtypes[fz.Pick(0, 2)];
    const int64_t generic_dims[] = {8, 16, 20, 32, 40, 96, 256};
    c.d = fz.Chance(0.8) ? (fz.Chance(0.5) ? 64 : 128) : generic_dims[fz.Pick(0, 6)];
    c.group = fz.Chance(0.9) ? fz.Pick(1, 12) : (fz.Chance(0.5) ? 16 : 24);
    c.kv_heads = fz.Pick(1, 3);
    const int64_t tpbs[] = {1, 2, 3, 5, 7, 8, 16, 16, 32, 64};
    c.tpb = tpbs[fz.Pick(0, 9)];
    const int seqs = fz.Pick(1, 4);
    for (int s = 0; s < seqs; ++s) {
      const int kind = fz.Pick(0, 5);
      c.lens.push_back(kind == 0   ? 0
                       : kind == 1 ? 1
                       : kind <= 3 ? fz.Pick(1, static_cast<int>(3 * c.tpb))
                                   : fz.Pick(1, 300));
    }
    if (fz.Chance(0.3)) {
      c.cp = fz.Pick(2, 4);
      c.cp_rank = fz.Pick(0, static_cast<int>(c.cp) - 1);
    }
    const int mode = c.cp > 1 ? 2 : fz.Pick(0, 2);  // 0 decode, 1 prefill, 2 explicit positions
    if (mode == 1) {
      c.prefill = true;
      for (int s = 0; s < seqs; ++s) c.froms.push_back(fz.Pick(0, std::max(0, c.lens[s] - 1)));
    } else if (mode == 2) {
      for (int s = 0; s < seqs; ++s) {
        const int64_t blocks = (c.lens[s] + c.tpb - 1) / c.tpb;
        const int end = static_cast<int>((std::max<int64_t>(blocks - 1, 0) * c.cp + c.cp_rank + 2) *
                                         c.tpb);  // a block past the rank's last
        std::vector<int32_t> pos;
        for (int n = fz.Pick(1, 3); n > 0; --n) pos.push_back(fz.Pick(0, end));
        std::sort(pos.begin(), pos.end());
        pos.erase(std::unique(pos.begin(), pos.end()), pos.end());
        c.q_positions.push_back(pos);
      }
    }
    c.split = fz.Chance(0.5) ? 0 : c.tpb * fz.Pick(1, 6);
    c.scale_mul = fz.Chance(0.8) ? 1.0f : (fz.Chance(0.5) ? 4.0f : 8.0f);
    cuda::PagedAttentionCudaTuning t{};
    t.warps_per_block = fz.Chance(0.5) ? 0 : fz.Pick(1, 8);
    t.stages = fz.Chance(0.5) ? 0 : fz.Pick(2, 4);
    t.prefetch_steps = fz.Chance(0.85) ? 0 : fz.Pick(1, 3);
    t.tensor_cores = fz.Chance(0.4);
    t.bulk_copy = fz.Chance(0.15);
    t.merge_two_pass = fz.Chance(0.3);
    // A quarter of the decode cases compare the early KV copies with the late ones, on shapes
    // where the early path applies.
    const bool early_kv = mode == 0 && fz.Chance(0.25);
    if (early_kv) {
      c.tpb = int64_t{8} << fz.Pick(0, 2);
      if (c.d != 64 && c.d != 128) c.d = 64;
      if (c.split != 0) c.split = c.tpb * fz.Pick(1, 6);
      t.bulk_copy = false;
    }
    cuda::SetPagedAttentionCudaTuningForTesting(t);
    SCOPED_TRACE("fuzz seed " + std::to_string(seed) + " (warps " +
                 std::to_string(t.warps_per_block) + ", stages " + std::to_string(t.stages) +
                 ", prefetch " + std::to_string(t.prefetch_steps) + ", tensor cores " +
                 std::to_string(t.tensor_cores) + ", bulk " + std::to_string(t.bulk_copy) +
                 ", two-pass merge " + std::to_string(t.merge_two_pass) + ")");
    if (early_kv) {
      g_pdl = PdlRun{};
      g_pdl.on = true;
      RunCase(c, seed);
      const PdlRun late = g_pdl;
      EXPECT_EQ(late.copies, 0);
      g_pdl.early = true;
      RunCase(c, seed);
      // The early path runs (block sizes a multiple of a warp step, head dims 64 / 128, no bulk
      // copies): a sequence with a row below its query's has copies before the wait. (Without
      // one there may be zero-filling copies of rows past the sequence, which read nothing.)
      if (std::any_of(c.lens.begin(), c.lens.end(), [](int32_t n) { return n >= 2; })) {
        EXPECT_GT(g_pdl.copies, 0) << "no copy before the wait";
      }
      EXPECT_EQ(g_pdl.out, late.out);
      EXPECT_EQ(g_pdl.lse, late.lse);
      g_pdl = {};
    } else {
      RunCase(c, seed);
    }
    if (HasFailure()) {
      break;  // the first failing seed is the one to rerun
    }
  }
}

}  // namespace
}  // namespace helix::kernels
