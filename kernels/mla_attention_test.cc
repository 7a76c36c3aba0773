#include "kernels/mla_attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/merge.h"
#include "kernels/test_util.h"

namespace helix::kernels {
namespace {

using testing::DecodeSeqs;
using testing::ExpectAllNear;
using testing::PagedSeqs;
using testing::RandomVector;

constexpr double kNegInf = -std::numeric_limits<double>::infinity();
// fp32 accumulation against the float64 reference (the pool values are exact in both).
constexpr double kRtol = 1e-5;
constexpr double kAtol = 1e-6;

// One rank's MLA pool (one plane, one "head" of latent + rope dims) with owned storage.
struct Pool {
  std::vector<unsigned char> storage;
  KvPoolView view;

  Pool(DType dtype, int64_t layers, int64_t tpb, int64_t dk, int64_t blocks)
      : view{.base = nullptr,
             .dtype = dtype,
             .num_layers = layers,
             .num_kv_heads = 1,
             .tokens_per_block = tpb,
             .head_dim = dk,
             .num_planes = 1} {
    storage.resize(static_cast<size_t>(blocks * view.block_elems()) * DTypeSize(dtype));
    view.base = storage.data();
  }
  int64_t num_blocks() const {
    return static_cast<int64_t>(storage.size() / DTypeSize(view.dtype)) / view.block_elems();
  }
  // Random rows written through WriteKv (rounded to the pool dtype).
  void FillRandom(std::mt19937& rng) {
    for (int64_t b = 0; b < num_blocks(); ++b) {
      for (int64_t l = 0; l < view.num_layers; ++l) {
        for (int64_t t = 0; t < view.tokens_per_block; ++t) {
          const std::vector<float> row = RandomVector(rng, view.head_dim);
          WriteKv(view, b, l, t, row.data(), nullptr);
        }
      }
    }
  }
  double Get(int64_t off) const {
    switch (view.dtype) {
      case DType::kF32:
        return static_cast<const float*>(view.base)[off];
      case DType::kF16:
        return HalfToFloat(static_cast<const uint16_t*>(view.base)[off]);
      case DType::kBF16:
        return Bf16ToFloat(static_cast<const uint16_t*>(view.base)[off]);
    }
    return 0;
  }
};

// Sequences and query tokens of one call.
struct Problem : PagedSeqs {
  int64_t heads = 8, latent = 64, rope = 16, layer = 1;
  float scale = 0.0f;  // 0: 1 / sqrt(latent + rope)
  std::vector<float> q;

  int64_t dk() const { return latent + rope; }
  float Scale() const { return scale != 0.0f ? scale : 1.0f / std::sqrt(static_cast<float>(dk())); }
  void RandomQ(std::mt19937& rng, float amplitude = 1.0f) {
    q = RandomVector(rng, tokens() * heads * dk(), -amplitude, amplitude);
  }
};

// Sequences of the given lengths on shuffled blocks of the pool, contiguous positions, one
// decode query each (at kv_len - 1).
Problem DecodeBatch(const std::vector<int32_t>& lens, int64_t tpb, int64_t pool_blocks,
                    std::mt19937& rng) {
  return DecodeSeqs<Problem>(lens, tpb, pool_blocks, rng);
}

struct Result {
  std::vector<float> out, lse;
};

// MlaAttentionCpu; threads 0 = no pool.
Result RunMla(const Problem& pr, const KvPoolView& kv, int64_t split, int threads) {
  Result r;
  r.out.assign(pr.tokens() * pr.heads * pr.latent, -777.0f);
  r.lse.assign(pr.tokens() * pr.heads, -777.0f);
  const std::vector<int32_t> tables = pr.Flat(pr.tables), firsts = pr.Flat(pr.firsts);
  MlaAttentionParams p{.q = pr.q.data(),
                       .q_seq = pr.q_seq.data(),
                       .q_pos = pr.q_pos.data(),
                       .kv = kv,
                       .layer = pr.layer,
                       .block_tables = tables.data(),
                       .block_first_pos = firsts.data(),
                       .kv_lens = pr.kv_lens.data(),
                       .max_blocks_per_seq = pr.max_blocks,
                       .num_seqs = static_cast<int64_t>(pr.tables.size()),
                       .num_q_tokens = pr.tokens(),
                       .num_heads = pr.heads,
                       .latent_dim = pr.latent,
                       .rope_dim = pr.rope,
                       .scale = pr.Scale(),
                       .out = r.out.data(),
                       .lse = r.lse.data(),
                       .kv_split_tokens = split};
  std::vector<float> ws(MlaAttentionWorkspaceBytes(p) / sizeof(float));
  if (split > 0 && pr.max_blocks * kv.tokens_per_block > split) {
    EXPECT_GT(ws.size(), 0u) << "split " << split << " should use a workspace";
  }
  if (threads > 0) {
    ThreadPool pool(threads);
    MlaAttentionCpu(p, ws.empty() ? nullptr : ws.data(), &pool);
  } else {
    MlaAttentionCpu(p, ws.empty() ? nullptr : ws.data(), nullptr);
  }
  return r;
}

// Float64 attention straight from the definition: scores over latent + rope, values = latent.
struct Reference {
  std::vector<double> out, lse;
};

Reference RunReference(const Problem& pr, const Pool& pool) {
  const KvPoolView& v = pool.view;
  const int64_t tpb = v.tokens_per_block, dk = pr.dk();
  Reference ref;
  ref.out.assign(pr.tokens() * pr.heads * pr.latent, 0.0);
  ref.lse.assign(pr.tokens() * pr.heads, kNegInf);
  for (int64_t t = 0; t < pr.tokens(); ++t) {
    const int64_t s = pr.q_seq[t];
    std::vector<int64_t> offs;  // visible rows
    for (size_t j = 0; j < pr.tables[s].size(); ++j) {
      for (int64_t r = 0; r < tpb && static_cast<int64_t>(j) * tpb + r < pr.kv_lens[s]; ++r) {
        if (pr.firsts[s][j] + r <= pr.q_pos[t]) {
          offs.push_back(KvOffset(v, pr.tables[s][j], pr.layer, 0, 0, r));
        }
      }
    }
    if (offs.empty()) {
      continue;
    }
    for (int64_t h = 0; h < pr.heads; ++h) {
      const float* q = pr.q.data() + (t * pr.heads + h) * dk;
      std::vector<double> sc(offs.size());
      double mx = kNegInf;
      for (size_t i = 0; i < offs.size(); ++i) {
        double dot = 0;
        for (int64_t e = 0; e < dk; ++e) {
          dot += static_cast<double>(q[e]) * pool.Get(offs[i] + e);
        }
        sc[i] = dot * pr.Scale();
        mx = std::max(mx, sc[i]);
      }
      double sum = 0;
      for (double& x : sc) {
        x = std::exp(x - mx);
        sum += x;
      }
      double* o = ref.out.data() + (t * pr.heads + h) * pr.latent;
      for (size_t i = 0; i < offs.size(); ++i) {
        for (int64_t e = 0; e < pr.latent; ++e) {
          o[e] += sc[i] / sum * pool.Get(offs[i] + e);
        }
      }
      ref.lse[t * pr.heads + h] = mx + std::log(sum);
    }
  }
  return ref;
}

void ExpectMatchesReference(const Problem& pr, const Pool& pool, const Result& got,
                            const std::string& what) {
  const Reference want = RunReference(pr, pool);
  ExpectAllNear(want.out, got.out.data(), kRtol, kAtol, what + " out");
  ExpectAllNear(want.lse, got.lse.data(), kRtol, kAtol, what + " lse");
}

std::string Name(DType dt, int64_t tpb, int64_t split) {
  return std::string(DTypeName(dt)) + " tpb=" + std::to_string(tpb) +
         " split=" + std::to_string(split);
}

// Every pool dtype and block size 1, 4, 16, over a batch of decode queries with lengths 1, a
// partial last block, 0 (a Helix rank holding nothing of the sequence) and several tiles.
TEST(MlaAttentionTest, DecodeBatchMatchesReference) {
  std::mt19937 rng(1);
  const std::vector<int32_t> lens = {1, 37, 0, 61, 5};
  for (DType dt : {DType::kF32, DType::kF16, DType::kBF16}) {
    for (int64_t tpb : {1, 4, 16}) {
      int64_t blocks = 4;
      for (int32_t len : lens) {
        blocks += (len + tpb - 1) / tpb;
      }
      Pool pool(dt, 2, tpb, 64 + 16, blocks);
      pool.FillRandom(rng);
      Problem pr = DecodeBatch(lens, tpb, blocks, rng);
      pr.RandomQ(rng, 2.0f);
      for (int64_t split : {int64_t{0}, 2 * tpb}) {
        const Result got = RunMla(pr, pool.view, split, 2);
        ExpectMatchesReference(pr, pool, got, Name(dt, tpb, split));
        for (int64_t h = 0; h < pr.heads; ++h) {  // the empty sequence (index 2)
          EXPECT_EQ(got.lse[2 * pr.heads + h], -std::numeric_limits<float>::infinity());
          for (int64_t e = 0; e < pr.latent; ++e) {
            EXPECT_EQ(got.out[(2 * pr.heads + h) * pr.latent + e], 0.0f);
          }
        }
      }
    }
  }
}

// DeepSeek V2/V3 per-rank shape: 16 heads, latent 512, rope 64, bf16 pool, scale with the
// yarn mscale folded in, batch of two.
TEST(MlaAttentionTest, DeepSeekShape) {
  std::mt19937 rng(2);
  const int64_t tpb = 16;
  Pool pool(DType::kBF16, 1, tpb, 512 + 64, 40);
  pool.FillRandom(rng);
  Problem pr = DecodeBatch({300, 129}, tpb, 40, rng);
  pr.heads = 16;
  pr.latent = 512;
  pr.rope = 64;
  pr.layer = 0;
  pr.scale = 0.1352f;  // (128 + 64)^-0.5 * 1.3^2: a DeepSeek-V3 mscale
  pr.RandomQ(rng, 1.0f);
  for (int64_t split : {int64_t{0}, int64_t{64}}) {
    ExpectMatchesReference(pr, pool, RunMla(pr, pool.view, split, 2),
                           Name(DType::kBF16, tpb, split));
  }
}

// Head counts that are not a multiple of the register blocks (and above 128, which takes two
// head groups), latent and row dims that are not a multiple of 8, and peaky scores (a running max
// that moves between tiles).
TEST(MlaAttentionTest, OddShapesAndPeakyScores) {
  std::mt19937 rng(3);
  struct Shape {
    int64_t heads, latent, rope;
  };
  for (const Shape& sh : {Shape{3, 20, 5}, Shape{5, 64, 16}, Shape{130, 24, 8}, Shape{1, 13, 4}}) {
    for (float amp : {1.0f, 8.0f}) {
      const int64_t tpb = 4;
      Pool pool(DType::kF32, 1, tpb, sh.latent + sh.rope, 40);
      pool.FillRandom(rng);
      Problem pr = DecodeBatch({70, 3, 53}, tpb, 40, rng);
      pr.heads = sh.heads;
      pr.latent = sh.latent;
      pr.rope = sh.rope;
      pr.layer = 0;
      pr.RandomQ(rng, amp);
      const std::string what = "heads=" + std::to_string(sh.heads) +
                               " latent=" + std::to_string(sh.latent) +
                               " amp=" + std::to_string(amp);
      // Scores of magnitude ~20 amplify the fp32 rounding of the dot products through exp.
      const Reference want = RunReference(pr, pool);
      for (int threads : {0, 3}) {
        const Result got = RunMla(pr, pool.view, 0, threads);
        const double tol = amp > 1.0f ? 5e-5 : kRtol;
        ExpectAllNear(want.out, got.out.data(), tol, kAtol, what + " out");
        ExpectAllNear(want.lse, got.lse.data(), tol, kAtol, what + " lse");
      }
    }
  }
}

// Prefill through the same API: the query tokens of one sequence at positions 0..L-1, each
// seeing the KV up to its own position (the causal cut falls inside blocks).
TEST(MlaAttentionTest, CausalPrefillQueries) {
  std::mt19937 rng(4);
  for (int64_t tpb : {1, 4, 16}) {
    const int32_t len = 45;
    const int64_t blocks = (len + tpb - 1) / tpb + 2;
    Pool pool(DType::kF16, 2, tpb, 64 + 16, blocks);
    pool.FillRandom(rng);
    Problem pr = DecodeBatch({len}, tpb, blocks, rng);
    pr.q_seq.assign(len, 0);
    pr.q_pos.resize(len);
    std::iota(pr.q_pos.begin(), pr.q_pos.end(), 0);
    pr.RandomQ(rng, 2.0f);
    for (int64_t split : {int64_t{0}, 2 * tpb}) {
      ExpectMatchesReference(pr, pool, RunMla(pr, pool.view, split, 2),
                             "prefill " + Name(DType::kF16, tpb, split));
    }
  }
}

// Helix context parallelism places global block g of a sequence on rank g mod CP, so rank r
// holds global blocks r, r + CP, ... with block_first_pos jumping by CP * tpb. Each rank's
// result is checked against the reference, then the ranks' (O, LSE) merged with
// MergeStatesCpu must equal attention over the whole sequence on one rank.
TEST(MlaAttentionTest, ContextParallelRanksMergeToFullAttention) {
  std::mt19937 rng(5);
  const int64_t cp = 3, tpb = 4;
  const int32_t global_len = 98;  // 25 global blocks, the last holding 2 tokens
  const int64_t global_blocks = (global_len + tpb - 1) / tpb;
  for (DType dt : {DType::kBF16, DType::kF32}) {
    // One pool holding the whole sequence; each rank's table names its share of its blocks.
    Pool pool(dt, 1, tpb, 64 + 16, global_blocks + 3);
    pool.FillRandom(rng);
    std::vector<int32_t> ids(global_blocks + 3);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    // Decode at the end, and queries cutting through blocks held by different ranks (position
    // 2 sees nothing on ranks 1 and 2).
    const std::vector<int32_t> positions = {97, 2, 5, 50, 51, 60, 96};
    std::vector<float> q = RandomVector(rng, positions.size() * 8 * 80, -2.0f, 2.0f);

    Problem full;
    {
      std::vector<int32_t> table(ids.begin(), ids.begin() + global_blocks), first;
      for (int64_t g = 0; g < global_blocks; ++g) {
        first.push_back(static_cast<int32_t>(g * tpb));
      }
      full.AddSeq(table, first, global_len);
    }
    full.layer = 0;
    full.q_seq.assign(positions.size(), 0);
    full.q_pos = positions;
    full.q = q;
    const Result want = RunMla(full, pool.view, 0, 2);
    ExpectMatchesReference(full, pool, want, std::string("full ") + DTypeName(dt));

    const int64_t rows = full.tokens() * full.heads;
    std::vector<float> parts_o, parts_lse;
    for (int64_t r = 0; r < cp; ++r) {
      Problem rank = full;
      rank.tables.clear();
      rank.firsts.clear();
      rank.kv_lens.clear();
      rank.max_blocks = 1;
      std::vector<int32_t> table, first;
      int32_t held = 0;
      for (int64_t g = r; g < global_blocks; g += cp) {
        table.push_back(ids[g]);
        first.push_back(static_cast<int32_t>(g * tpb));
        held += static_cast<int32_t>(std::min<int64_t>(tpb, global_len - g * tpb));
      }
      rank.AddSeq(table, first, held);
      for (int64_t split : {int64_t{0}, int64_t{8}}) {
        const Result got = RunMla(rank, pool.view, split, 2);
        ExpectMatchesReference(rank, pool, got,
                               "cp rank " + std::to_string(r) + " " + Name(dt, tpb, split));
        if (split == 0) {
          parts_o.insert(parts_o.end(), got.out.begin(), got.out.end());
          parts_lse.insert(parts_lse.end(), got.lse.begin(), got.lse.end());
        }
      }
    }
    std::vector<float> merged(rows * full.latent), merged_lse(rows);
    MergeStatesCpu({.o = parts_o.data(),
                    .lse = parts_lse.data(),
                    .out = merged.data(),
                    .out_lse = merged_lse.data(),
                    .num_parts = cp,
                    .rows = rows,
                    .head_dim = full.latent},
                   nullptr);
    ExpectAllNear(std::vector<double>(want.out.begin(), want.out.end()), merged.data(), kRtol,
                  kAtol, "cp merged out");
    ExpectAllNear(std::vector<double>(want.lse.begin(), want.lse.end()), merged_lse.data(), kRtol,
                  kAtol, "cp merged lse");
  }
}

// Split-KV (chunks computed separately, merged) agrees with the unsplit kernel to 1e-6, and
// the bits do not depend on the thread count.
TEST(MlaAttentionTest, SplitKvEqualsUnsplitAndThreadCountDoesNotChangeBits) {
  std::mt19937 rng(6);
  const int64_t tpb = 8;
  Pool pool(DType::kBF16, 1, tpb, 64 + 16, 80);
  pool.FillRandom(rng);
  Problem pr = DecodeBatch({1, 200, 0, 333, 17}, tpb, 80, rng);
  pr.layer = 0;
  pr.RandomQ(rng, 2.0f);
  const Result base = RunMla(pr, pool.view, 0, 0);
  ExpectMatchesReference(pr, pool, base, "unsplit");
  for (int64_t split : {tpb, 3 * tpb, 5 * tpb, 64 * tpb}) {
    const Result one = RunMla(pr, pool.view, split, 0);
    ExpectAllNear(std::vector<double>(base.out.begin(), base.out.end()), one.out.data(), 1e-6, 1e-6,
                  "split=" + std::to_string(split) + " out");
    ExpectAllNear(std::vector<double>(base.lse.begin(), base.lse.end()), one.lse.data(), 1e-6, 1e-6,
                  "split=" + std::to_string(split) + " lse");
    for (int threads : {1, 2, 3, 7}) {
      const Result many = RunMla(pr, pool.view, split, threads);
      EXPECT_EQ(std::memcmp(one.out.data(), many.out.data(), one.out.size() * sizeof(float)), 0)
          << "split " << split << " threads " << threads;
      EXPECT_EQ(std::memcmp(one.lse.data(), many.lse.data(), one.lse.size() * sizeof(float)), 0)
          << "split " << split << " threads " << threads;
    }
  }
  // Head groups: one query token and no split, so 7 threads cut the 8 heads into groups.
  Problem one_tok = pr;
  one_tok.q_seq = {3};
  one_tok.q_pos = {332};
  one_tok.q.resize(pr.heads * pr.dk());
  const Result a = RunMla(one_tok, pool.view, 0, 0), b = RunMla(one_tok, pool.view, 0, 7);
  EXPECT_EQ(std::memcmp(a.out.data(), b.out.data(), a.out.size() * sizeof(float)), 0);
  EXPECT_EQ(std::memcmp(a.lse.data(), b.lse.data(), a.lse.size() * sizeof(float)), 0);
}

// A NaN score (here a NaN query element of one head) makes that head's row and LSE NaN, split or
// not (a merge must not take a chunk's NaN LSE for an empty part); the other heads are unharmed.
TEST(MlaAttentionTest, NanScoreMakesTheRowNan) {
  std::mt19937 rng(8);
  const int64_t tpb = 8;
  Pool pool(DType::kBF16, 1, tpb, 64 + 16, 20);
  pool.FillRandom(rng);
  Problem pr = DecodeBatch({100}, tpb, 20, rng);
  pr.layer = 0;
  pr.RandomQ(rng);
  pr.q[3 * pr.dk() + 70] = std::numeric_limits<float>::quiet_NaN();  // head 3, a rope element
  const Result base = RunMla(pr, pool.view, 0, 0);
  for (int64_t split : {int64_t{0}, 3 * tpb}) {
    const Result r = RunMla(pr, pool.view, split, 2);
    for (int64_t h = 0; h < pr.heads; ++h) {
      EXPECT_EQ(std::isnan(r.lse[h]), h == 3) << "split " << split << " head " << h;
      for (int64_t e = 0; e < pr.latent; ++e) {
        EXPECT_EQ(std::isnan(r.out[h * pr.latent + e]), h == 3)
            << "split " << split << " head " << h << " dim " << e;
      }
    }
    ExpectAllNear(std::vector<double>(base.out.begin(), base.out.end()), r.out.data(), 1e-6, 1e-6,
                  "split=" + std::to_string(split) + " out");
  }
}

// A rank holding nothing for any sequence: out 0, lse -inf; lse may be nullptr.
TEST(MlaAttentionTest, NoVisibleKv) {
  std::mt19937 rng(7);
  Pool pool(DType::kF16, 1, 4, 64 + 16, 4);
  pool.FillRandom(rng);
  Problem pr;
  pr.layer = 0;
  pr.AddSeq({}, {}, 0);
  pr.AddSeq({1, 3}, {16, 24}, 8);  // blocks at positions 16.. and a query before them
  pr.q_seq = {0, 1};
  pr.q_pos = {0, 10};
  pr.RandomQ(rng);
  for (int64_t split : {0, 4}) {
    const Result got = RunMla(pr, pool.view, split, 2);
    for (float x : got.out) {
      EXPECT_EQ(x, 0.0f);
    }
    for (float x : got.lse) {
      EXPECT_EQ(x, -std::numeric_limits<float>::infinity());
    }
  }
  const std::vector<int32_t> tables = pr.Flat(pr.tables), firsts = pr.Flat(pr.firsts);
  std::vector<float> out(pr.tokens() * pr.heads * pr.latent, -1.0f);
  MlaAttentionCpu({.q = pr.q.data(),
                   .q_seq = pr.q_seq.data(),
                   .q_pos = pr.q_pos.data(),
                   .kv = pool.view,
                   .layer = 0,
                   .block_tables = tables.data(),
                   .block_first_pos = firsts.data(),
                   .kv_lens = pr.kv_lens.data(),
                   .max_blocks_per_seq = pr.max_blocks,
                   .num_seqs = 2,
                   .num_q_tokens = 2,
                   .num_heads = pr.heads,
                   .latent_dim = pr.latent,
                   .rope_dim = pr.rope,
                   .scale = pr.Scale(),
                   .out = out.data(),
                   .lse = nullptr,
                   .kv_split_tokens = 0},
                  nullptr, nullptr);
  for (float x : out) {
    EXPECT_EQ(x, 0.0f);
  }
}

}  // namespace
}  // namespace helix::kernels
