// The CUDA MLA kernel of kernels/cuda/mla_attention_cuda.cu compiled as C++ and run by the CPU
// emulation of tests/gpu/cuda_emu.h (host threads as CUDA threads), against MlaAttentionCpu:
// checks the kernel's tiling, cp.async ring, reduce-scatter, barriers and split-KV merge on
// machines without a GPU. Every emulated thread block is 256 host threads, so the problems are
// small (a few tiles each).
#define HELIX_CUDA_EMULATION 1
#include "tests/gpu/cuda_emu.h"
// clang-format off
#include "kernels/cuda/mla_attention_cuda.cu"
// clang-format on

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/mla_attention.h"
#include "kernels/test_util.h"

namespace helix::kernels {
namespace {

using testing::AppendQueries;
using testing::ExpectAllNear;
using testing::Fuzz;
using testing::FuzzRange;
using testing::FuzzRangeFromEnv;
using testing::RandomVector;

void Store(DType t, void* base, int64_t i, float f) {
  if (t == DType::kF32) {
    static_cast<float*>(base)[i] = f;
  } else {
    static_cast<uint16_t*>(base)[i] = t == DType::kF16 ? FloatToHalf(f) : FloatToBf16(f);
  }
}

struct Case {
  DType dtype;
  int64_t heads, latent, rope, tpb, split;
  std::vector<int32_t> lens;  // one decode query per sequence, unless
  bool prefill = false;       // queries at every position of sequence 0
  int64_t cp = 1;             // > 1: the sequences' blocks are those of CP rank 1 of cp
  bool nan_q = false;         // a NaN in the query of token 0, head 1: its row and LSE NaN
  // For RandomCasesAgainstCpu: the CP rank whose blocks these are (with cp > 1; default 1), and
  // explicit global query positions per sequence (ascending), replacing the queries above.
  int64_t cp_rank = 1;
  std::vector<std::vector<int32_t>> q_positions = {};
};

void RunCase(const Case& c, uint32_t seed) {
  std::mt19937 rng(seed);
  const int64_t dk = c.latent + c.rope, layers = 2, layer = 1;
  const int64_t seqs = static_cast<int64_t>(c.lens.size());
  int64_t max_blocks = 1, total_blocks = 2;
  for (int32_t len : c.lens) {
    max_blocks = std::max<int64_t>(max_blocks, (len + c.tpb - 1) / c.tpb);
    total_blocks += (len + c.tpb - 1) / c.tpb;
  }
  KvPoolView view{.base = nullptr,
                  .dtype = c.dtype,
                  .num_layers = layers,
                  .num_kv_heads = 1,
                  .tokens_per_block = c.tpb,
                  .head_dim = dk,
                  .num_planes = 1};
  std::vector<unsigned char> pool(total_blocks * view.block_elems() * DTypeSize(c.dtype));
  view.base = pool.data();
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  for (int64_t i = 0; i < total_blocks * view.block_elems(); ++i) {
    Store(c.dtype, view.base, i, dist(rng));
  }
  std::vector<int32_t> ids(total_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  // Local block j holds global block j (cp == 1) or cp j + cp_rank (rank cp_rank of cp).
  std::vector<int32_t> tables(seqs * max_blocks, -1), firsts(seqs * max_blocks, -1);
  size_t next = 0;
  for (int64_t s = 0; s < seqs; ++s) {
    for (int64_t j = 0; j * c.tpb < c.lens[s]; ++j) {
      tables[s * max_blocks + j] = ids[next++];
      firsts[s * max_blocks + j] =
          static_cast<int32_t>((c.cp > 1 ? c.cp * j + c.cp_rank : j) * c.tpb);
    }
  }
  std::vector<int32_t> q_seq, q_pos;
  const int64_t span = c.cp * c.lens[0];  // global positions sequence 0 covers, about
  if (!c.q_positions.empty()) {
    AppendQueries(c.q_positions, &q_seq, &q_pos);
  } else if (c.prefill) {
    for (int64_t i = 0; i<span; i += c.cp> 1 ? 7 : 1) {
      q_seq.push_back(0);
      q_pos.push_back(static_cast<int32_t>(i));
    }
  } else {
    for (int64_t s = 0; s < seqs; ++s) {
      q_seq.push_back(static_cast<int32_t>(s));
      q_pos.push_back(c.cp > 1 ? static_cast<int32_t>(c.cp * c.lens[s] + c.tpb)
                               : std::max<int32_t>(0, c.lens[s] - 1));
    }
  }
  const int64_t tokens = static_cast<int64_t>(q_seq.size());
  std::vector<float> q = RandomVector(rng, tokens * c.heads * dk, -2.0f, 2.0f);
  if (c.nan_q) {
    q[1 * dk + 5] = std::numeric_limits<float>::quiet_NaN();
  }
  MlaAttentionParams p{.q = q.data(),
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
                       .num_heads = c.heads,
                       .latent_dim = c.latent,
                       .rope_dim = c.rope,
                       .scale = 1.0f / std::sqrt(static_cast<float>(dk)),
                       .out = nullptr,
                       .lse = nullptr,
                       .kv_split_tokens = 0};
  std::vector<float> want_out(tokens * c.heads * c.latent), want_lse(tokens * c.heads);
  p.out = want_out.data();
  p.lse = want_lse.data();
  MlaAttentionCpu(p, nullptr, nullptr);

  std::vector<float> out(want_out.size(), -777.0f), lse(want_lse.size(), -777.0f);
  p.out = out.data();
  p.lse = lse.data();
  p.kv_split_tokens = c.split;
  std::vector<float> ws(cuda::MlaAttentionCudaWorkspaceBytes(p) / sizeof(float) + 1);
  ASSERT_EQ(cuda::MlaAttentionCuda(p, ws.data(), nullptr), cudaSuccess);
  const std::string what = std::string(DTypeName(c.dtype)) + " heads=" + std::to_string(c.heads) +
                           " latent=" + std::to_string(c.latent) +
                           " rope=" + std::to_string(c.rope) + " tpb=" + std::to_string(c.tpb) +
                           " split=" + std::to_string(c.split) + (c.prefill ? " prefill" : "") +
                           " cp=" + std::to_string(c.cp) + (c.nan_q ? " nan_q" : "");
  std::string positions;
  for (int64_t t = 0; t < tokens; ++t) {
    positions += std::to_string(q_seq[t]) + ":" + std::to_string(q_pos[t]) + " ";
  }
  SCOPED_TRACE("cp rank " + std::to_string(c.cp_rank) + ", queries (sequence:position) " +
               positions);
  if (c.nan_q) {
    ASSERT_TRUE(std::isnan(want_lse[1]) && std::isfinite(want_lse[0])) << "the CPU reference";
  }
  ExpectAllNear(std::vector<double>(want_out.begin(), want_out.end()), out.data(), 2e-5, 2e-5,
                what + " out");
  ExpectAllNear(std::vector<double>(want_lse.begin(), want_lse.end()), lse.data(), 2e-5, 2e-5,
                what + " lse");
}

// Small latent 64 + rope 16 (rows padded to 128 in shared memory), 8 heads (half a head
// group), lengths 1, a partial block, 0 (a rank holding nothing) and several tiles; split-KV
// off and on; every pool dtype.
TEST(MlaAttentionEmuTest, DecodeBatchAllDtypes) {
  uint32_t seed = 1;
  for (DType dt : {DType::kBF16, DType::kF16, DType::kF32}) {
    for (int64_t split : {0, 32}) {
      RunCase({dt, 8, 64, 16, 16, split, {1, 37, 0, 70}}, seed++);
    }
  }
}

// The DeepSeek row (latent 512 + rope 64, 16 heads), split into chunks of 48 tokens (tiles
// cut across blocks of 16).
TEST(MlaAttentionEmuTest, DeepSeekShapeSplit) {
  RunCase({DType::kBF16, 16, 512, 64, 16, 48, {75}}, 10);
}

// Two head groups (the second partial), rows that are not 16-byte multiples (element copies),
// a latent dim that is not a multiple of 4, odd block sizes; causal prefill; blocks placed as
// on Helix CP rank 1 of 3 (queries before, inside and after them).
TEST(MlaAttentionEmuTest, HeadGroupsOddRowsPrefillAndContextParallel) {
  RunCase({DType::kBF16, 20, 64, 8, 5, 0, {23, 9}}, 20);
  RunCase({DType::kF16, 8, 61, 7, 4, 8, {30, 6}}, 21);
  RunCase({DType::kF32, 4, 64, 16, 16, 0, {21}, true}, 22);
  RunCase({DType::kBF16, 8, 64, 16, 4, 12, {26}, true, 3}, 23);
}

// A NaN in one head's query: that head's row and LSE NaN on the GPU as on the CPU, also with
// split-KV (every chunk's LSE NaN: the merge must not take them for empty parts).
TEST(MlaAttentionEmuTest, NanQueryMakesItsRowNan) {
  for (int64_t split : {0, 32}) {
    Case c{DType::kBF16, 8, 64, 16, 16, split, {100, 37}};
    c.nan_q = true;
    RunCase(c, 30);
  }
}

// Random shapes against the CPU kernel (a differential fuzz, as AttentionEmuTest's): every
// dtype, 1-40 heads (partial head groups), latent and rope dims with and without 16-byte rows,
// block sizes from 1, empty, one-token and partial sequences, context-parallel placements with
// queries before, inside and after a rank's blocks, several queries per sequence (prefill
// shaped), split-KV or not. HELIX_FUZZ_CASES (default 12) cases from seed HELIX_FUZZ_SEED
// (default 1); a failure names its seed.
TEST(MlaAttentionEmuTest, RandomCasesAgainstCpu) {
  const FuzzRange range = FuzzRangeFromEnv(12);
  for (int64_t i = 0; i < range.cases; ++i) {
    const uint32_t seed = range.first_seed + static_cast<uint32_t>(i);
    Fuzz fz(seed);
    Case c{};
    const DType dtypes[] = {DType::kF32, DType::kF16, DType::kBF16};
    c.dtype = dtypes[fz.Pick(0, 2)];
    c.heads = fz.Chance(0.7) ? fz.Pick(1, 16) : fz.Pick(17, 40);
    const int64_t latents[] = {16, 61, 64, 128, 512};
    const int64_t ropes[] = {1, 7, 8, 16, 64};
    c.latent = latents[fz.Pick(0, 4)];
    c.rope = ropes[fz.Pick(0, 4)];
    const int64_t tpbs[] = {1, 3, 4, 5, 16, 32};
    c.tpb = tpbs[fz.Pick(0, 5)];
    const int seqs = fz.Pick(1, 3);
    for (int s = 0; s < seqs; ++s) {
      const int kind = fz.Pick(0, 4);
      c.lens.push_back(kind == 0 ? 0 : kind == 1 ? 1 : fz.Pick(1, kind == 2 ? 40 : 300));
    }
    if (fz.Chance(0.4)) {
      c.cp = fz.Pick(2, 4);
      c.cp_rank = fz.Pick(0, static_cast<int>(c.cp) - 1);
    }
    for (int s = 0; s < seqs; ++s) {
      const int64_t blocks = (c.lens[s] + c.tpb - 1) / c.tpb;
      const int end = static_cast<int>(
          (std::max<int64_t>(blocks - 1, 0) * c.cp + (c.cp > 1 ? c.cp_rank : 0) + 2) * c.tpb);
      std::vector<int32_t> pos;
      // Half the sequences have a decode query past the rank's blocks (it sees them all).
      if (fz.Chance(0.5)) pos.push_back(end);
      for (int n = fz.Chance(0.7) ? 1 : fz.Pick(2, 4); n > 0; --n) pos.push_back(fz.Pick(0, end));
      std::sort(pos.begin(), pos.end());
      pos.erase(std::unique(pos.begin(), pos.end()), pos.end());
      c.q_positions.push_back(pos);
    }
    c.split = fz.Chance(0.5) ? 0 : c.tpb * fz.Pick(1, 16);
    SCOPED_TRACE("fuzz seed " + std::to_string(seed));
    RunCase(c, seed);
    if (HasFailure()) {
      break;  // the first failing seed is the one to rerun
    }
  }
}

}  // namespace
}  // namespace helix::kernels
