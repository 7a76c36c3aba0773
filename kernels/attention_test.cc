#include "kernels/attention.h"

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

using testing::ExpectAllNear;
using testing::RandomVector;

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

float ReadElem(const KvPoolView& v, int64_t off) {
  switch (v.dtype) {
    case DType::kF32:
      return static_cast<const float*>(v.base)[off];
    case DType::kF16:
      return HalfToFloat(static_cast<const uint16_t*>(v.base)[off]);
    case DType::kBF16:
      return Bf16ToFloat(static_cast<const uint16_t*>(v.base)[off]);
  }
  return 0;
}

// One rank's KV pool with owned storage.
struct Pool {
  std::vector<unsigned char> storage;
  KvPoolView view;

  Pool(DType dtype, int64_t layers, int64_t kv_heads, int64_t tpb, int64_t d, int64_t blocks)
      : view{nullptr, dtype, layers, kv_heads, tpb, d} {
    storage.resize(static_cast<size_t>(blocks * view.block_elems()) * DTypeSize(dtype));
    view.base = storage.data();
  }
  int64_t num_blocks() const {
    return static_cast<int64_t>(storage.size() / DTypeSize(view.dtype)) / view.block_elems();
  }
  // Element i of the pool = f, rounded to the dtype.
  void Set(int64_t i, float f) {
    switch (view.dtype) {
      case DType::kF32:
        static_cast<float*>(view.base)[i] = f;
        break;
      case DType::kF16:
        static_cast<uint16_t*>(view.base)[i] = FloatToHalf(f);
        break;
      case DType::kBF16:
        static_cast<uint16_t*>(view.base)[i] = FloatToBf16(f);
        break;
    }
  }
  // Fills every element with a random value (rounded to the dtype).
  void FillRandom(std::mt19937& rng) {
    std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
    const int64_t n = num_blocks() * view.block_elems();
    for (int64_t i = 0; i < n; ++i) {
      Set(i, dist(rng));
    }
  }
};

// Sequences and query tokens of one attention call, with its outputs.
struct Problem {
  int64_t num_q_heads = 0, num_kv_heads = 0, head_dim = 0, layer = 0;
  int64_t max_blocks = 1;
  std::vector<std::vector<int32_t>> tables, first_pos;  // per sequence
  std::vector<int32_t> kv_lens;
  std::vector<int32_t> q_seq, q_pos;
  std::vector<float> q;
  // Flattened [num_seqs][max_blocks].
  std::vector<int32_t> flat_tables, flat_first;

  void AddSeq(std::vector<int32_t> table, std::vector<int32_t> firsts, int32_t kv_len) {
    max_blocks = std::max<int64_t>(max_blocks, static_cast<int64_t>(table.size()));
    tables.push_back(std::move(table));
    first_pos.push_back(std::move(firsts));
    kv_lens.push_back(kv_len);
  }
  void AddQuery(int32_t seq, int32_t pos) {
    q_seq.push_back(seq);
    q_pos.push_back(pos);
  }
  int64_t num_q_tokens() const { return static_cast<int64_t>(q_seq.size()); }

  PagedAttentionParams Params(const KvPoolView& kv, float* out, float* lse, int64_t split) {
    const int64_t seqs = static_cast<int64_t>(tables.size());
    flat_tables.assign(seqs * max_blocks, -1);
    flat_first.assign(seqs * max_blocks, -1);
    for (int64_t s = 0; s < seqs; ++s) {
      std::copy(tables[s].begin(), tables[s].end(), flat_tables.begin() + s * max_blocks);
      std::copy(first_pos[s].begin(), first_pos[s].end(), flat_first.begin() + s * max_blocks);
    }
    return {.q = q.data(),
            .q_seq = q_seq.data(),
            .q_pos = q_pos.data(),
            .kv = kv,
            .layer = layer,
            .block_tables = flat_tables.data(),
            .block_first_pos = flat_first.data(),
            .kv_lens = kv_lens.data(),
            .max_blocks_per_seq = max_blocks,
            .num_seqs = seqs,
            .num_q_tokens = num_q_tokens(),
            .num_q_heads = num_q_heads,
            .num_kv_heads = num_kv_heads,
            .head_dim = head_dim,
            .scale = 1.0f / std::sqrt(static_cast<float>(head_dim)),
            .out = out,
            .lse = lse,
            .kv_split_tokens = split};
  }
};

struct Result {
  std::vector<float> out, lse;
};

Result RunAttention(Problem& pr, const KvPoolView& kv, int64_t split, ThreadPool* pool) {
  Result r;
  r.out.assign(pr.num_q_tokens() * pr.num_q_heads * pr.head_dim, -777.0f);
  r.lse.assign(pr.num_q_tokens() * pr.num_q_heads, -777.0f);
  const PagedAttentionParams p = pr.Params(kv, r.out.data(), r.lse.data(), split);
  // Exactly sized, so ASan catches any write past the workspace.
  std::vector<unsigned char> ws(PagedAttentionWorkspaceBytes(p));
  PagedAttentionCpu(p, ws.empty() ? nullptr : ws.data(), pool);
  return r;
}

// Float64 attention reading the same (rounded) pool values the kernel reads.
void Reference(const Problem& pr, const KvPoolView& kv, std::vector<double>* out,
               std::vector<double>* lse) {
  const int64_t d = pr.head_dim, hq = pr.num_q_heads, group = pr.num_q_heads / pr.num_kv_heads;
  const int64_t tpb = kv.tokens_per_block;
  const double scale = 1.0f / std::sqrt(static_cast<float>(d));
  out->assign(pr.num_q_tokens() * hq * d, 0.0);
  lse->assign(pr.num_q_tokens() * hq, kNegInf);
  for (int64_t t = 0; t < pr.num_q_tokens(); ++t) {
    const int64_t s = pr.q_seq[t];
    for (int64_t qh = 0; qh < hq; ++qh) {
      const int64_t kvh = qh / group;
      const float* q = pr.q.data() + (t * hq + qh) * d;
      std::vector<double> scores;
      std::vector<int64_t> v_offs;
      for (size_t j = 0; j * tpb < static_cast<size_t>(pr.kv_lens[s]); ++j) {
        const int64_t n_in = std::min<int64_t>(tpb, pr.kv_lens[s] - j * tpb);
        for (int64_t i = 0; i < n_in; ++i) {
          if (pr.first_pos[s][j] + i > pr.q_pos[t]) {
            continue;
          }
          const int64_t k_off = KvOffset(kv, pr.tables[s][j], pr.layer, 0, kvh, i);
          double dot = 0;
          for (int64_t e = 0; e < d; ++e) {
            dot += static_cast<double>(q[e]) * ReadElem(kv, k_off + e);
          }
          if (dot * scale == kNegInf) {
            continue;  // a score of -inf (an infinite K element) drops its row, as a mask does
          }
          scores.push_back(dot * scale);
          v_offs.push_back(KvOffset(kv, pr.tables[s][j], pr.layer, 1, kvh, i));
        }
      }
      if (scores.empty()) {
        continue;
      }
      const double mx = *std::max_element(scores.begin(), scores.end());
      double sum = 0;
      for (double x : scores) {
        sum += std::exp(x - mx);
      }
      double* o = out->data() + (t * hq + qh) * d;
      for (size_t i = 0; i < scores.size(); ++i) {
        const double w = std::exp(scores[i] - mx) / sum;
        for (int64_t e = 0; e < d; ++e) {
          o[e] += w * ReadElem(kv, v_offs[i] + e);
        }
      }
      (*lse)[t * hq + qh] = mx + std::log(sum);
    }
  }
}

void ExpectMatchesReference(const Problem& pr, const KvPoolView& kv, const Result& r,
                            const std::string& what) {
  std::vector<double> want_out, want_lse;
  Reference(pr, kv, &want_out, &want_lse);
  ExpectAllNear(want_out, r.out.data(), 1e-5, 1e-5, what + " out");
  ExpectAllNear(want_lse, r.lse.data(), 1e-5, 1e-5, what + " lse");
}

// Allocates `lens` sequences (one decode query each at kv_len - 1, or none when empty) on
// shuffled physical blocks of a pool, blocks contiguous in global positions.
Problem DecodeBatch(const std::vector<int32_t>& lens, int64_t tpb, int64_t num_blocks,
                    std::mt19937& rng) {
  Problem pr;
  std::vector<int32_t> ids(num_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  size_t next = 0;
  for (size_t s = 0; s < lens.size(); ++s) {
    std::vector<int32_t> table, firsts;
    for (int64_t j = 0; j * tpb < lens[s]; ++j) {
      table.push_back(ids.at(next++));
      firsts.push_back(static_cast<int32_t>(j * tpb));
    }
    pr.AddSeq(table, firsts, lens[s]);
    pr.AddQuery(static_cast<int32_t>(s), std::max(0, lens[s] - 1));
  }
  return pr;
}

std::string Name(DType dt, int64_t group, int64_t d) {
  return std::string(DTypeName(dt)) + " group=" + std::to_string(group) + " d=" + std::to_string(d);
}

TEST(AttentionTest, WriteKvUsesTheDocumentedLayout) {
  Pool pool(DType::kF16, 3, 2, 4, 8, 5);
  const std::vector<float> k = {1, 2, 3, 4, 5, 6, 7, 8, -1, -2, -3, -4, -5, -6, -7, -8};
  std::vector<float> v(16);
  for (int i = 0; i < 16; ++i) {
    v[i] = 0.5f * i;
  }
  WriteKv(pool.view, 3, 2, 1, k.data(), v.data());
  const int64_t be = 3 * 2 * 2 * 4 * 8;
  EXPECT_EQ(pool.view.block_elems(), be);
  for (int c = 0; c < 2; ++c) {
    for (int h = 0; h < 2; ++h) {
      const int64_t off = KvOffset(pool.view, 3, 2, c, h, 1);
      EXPECT_EQ(off, 3 * be + (((2 * 2 + c) * 2 + h) * 4 + 1) * 8);
      for (int e = 0; e < 8; ++e) {
        EXPECT_EQ(ReadElem(pool.view, off + e), (c == 0 ? k : v)[h * 8 + e]);
      }
    }
  }
}

// Batch of decode queries over sequences of lengths 1, tpb - 1, tpb, tpb + 1, 40 blocks and
// 0, for every KV dtype, GQA group size and head dim.
TEST(AttentionTest, DecodeBatchMatchesReference) {
  ThreadPool threads(3);
  std::mt19937 rng(1);
  const int64_t tpb = 16;
  const std::vector<int32_t> lens = {1, 15, 16, 17, 40 * 16 - 3, 0, 33};
  for (DType dt : {DType::kF32, DType::kF16, DType::kBF16}) {
    for (int64_t group : {1, 2, 4}) {
      for (int64_t d : {8, 64, 20, 4}) {
        const int64_t kv_heads = 2;
        Pool pool(dt, 2, kv_heads, tpb, d, 50);
        pool.FillRandom(rng);
        Problem pr = DecodeBatch(lens, tpb, 50, rng);
        pr.num_kv_heads = kv_heads;
        pr.num_q_heads = kv_heads * group;
        pr.head_dim = d;
        pr.layer = 1;
        pr.q = RandomVector(rng, pr.num_q_tokens() * pr.num_q_heads * d);
        const Result r = RunAttention(pr, pool.view, 0, &threads);
        ExpectMatchesReference(pr, pool.view, r, Name(dt, group, d));
        // The empty sequence (index 5): zeros and -inf, no NaN.
        for (int64_t h = 0; h < pr.num_q_heads; ++h) {
          EXPECT_EQ(r.lse[5 * pr.num_q_heads + h], -std::numeric_limits<float>::infinity());
          for (int64_t e = 0; e < d; ++e) {
            EXPECT_EQ(r.out[(5 * pr.num_q_heads + h) * d + e], 0.0f);
          }
        }
        // Same bits on one thread: the work split does not change the arithmetic.
        const Result r1 = RunAttention(pr, pool.view, 0, nullptr);
        EXPECT_EQ(r.out, r1.out) << Name(dt, group, d);
        EXPECT_EQ(r.lse, r1.lse) << Name(dt, group, d);
      }
    }
  }
}

TEST(AttentionTest, LargeGroupsAndPeakyScores) {
  // Groups above 8 query heads are processed in sub-groups; large q makes the softmax peaky so
  // the running max changes between tiles.
  ThreadPool threads(2);
  std::mt19937 rng(2);
  const int64_t tpb = 64;
  for (int64_t group : {5, 8, 12, 16}) {
    for (float q_scale : {1.0f, 12.0f}) {
      Pool pool(DType::kF32, 1, 2, tpb, 64, 16);
      pool.FillRandom(rng);
      Problem pr = DecodeBatch({1, 200, 8 * 64}, tpb, 16, rng);
      pr.num_kv_heads = 2;
      pr.num_q_heads = 2 * group;
      pr.head_dim = 64;
      pr.q = RandomVector(rng, pr.num_q_tokens() * 2 * group * 64, -q_scale, q_scale);
      const Result r = RunAttention(pr, pool.view, 0, &threads);
      ExpectMatchesReference(pr, pool.view, r, "group=" + std::to_string(group));
    }
  }
}

TEST(AttentionTest, ThreadCountDoesNotChangeBits) {
  // One decode token: the work is cut across KV heads, differently for each pool size.
  std::mt19937 rng(7);
  const int64_t tpb = 16;
  Pool pool(DType::kBF16, 1, 6, tpb, 32, 12);
  pool.FillRandom(rng);
  Problem pr = DecodeBatch({11 * 16 - 5}, tpb, 12, rng);
  pr.num_kv_heads = 6;
  pr.num_q_heads = 12;
  pr.head_dim = 32;
  pr.q = RandomVector(rng, 12 * 32);
  const Result want = RunAttention(pr, pool.view, 0, nullptr);
  ExpectMatchesReference(pr, pool.view, want, "one thread");
  for (int threads : {2, 3, 4, 8}) {
    ThreadPool tp(threads);
    for (int64_t split : {int64_t{0}, 2 * tpb}) {
      const Result r = RunAttention(pr, pool.view, split, &tp);
      if (split == 0) {
        EXPECT_EQ(r.out, want.out) << threads;
        EXPECT_EQ(r.lse, want.lse) << threads;
      } else {
        ExpectMatchesReference(pr, pool.view, r, "split threads=" + std::to_string(threads));
      }
    }
  }
}

TEST(AttentionTest, CausalPrefillQuery) {
  // q tokens at positions 0..L-1 of one sequence: token i sees KV 0..i.
  ThreadPool threads(3);
  std::mt19937 rng(3);
  const int64_t tpb = 16, L = 16 * 3 + 5;
  for (DType dt : {DType::kF32, DType::kBF16}) {
    Pool pool(dt, 1, 2, tpb, 64, 6);
    pool.FillRandom(rng);
    Problem pr = DecodeBatch({static_cast<int32_t>(L)}, tpb, 6, rng);
    pr.q_seq.clear();
    pr.q_pos.clear();
    for (int32_t i = 0; i < L; ++i) {
      pr.AddQuery(0, i);
    }
    pr.num_kv_heads = 2;
    pr.num_q_heads = 4;
    pr.head_dim = 64;
    pr.q = RandomVector(rng, L * 4 * 64);
    const Result r = RunAttention(pr, pool.view, 0, &threads);
    ExpectMatchesReference(pr, pool.view, r, std::string("prefill ") + DTypeName(dt));
    // Token 0 sees exactly one KV token: its output is that V row.
    const KvPoolView& kv = pool.view;
    for (int64_t e = 0; e < 64; ++e) {
      EXPECT_NEAR(r.out[e], ReadElem(kv, KvOffset(kv, pr.tables[0][0], 0, 1, 0, 0) + e), 1e-6);
    }
    // Split-KV over a causal multi-token query gives the same result.
    const Result rs = RunAttention(pr, pool.view, 2 * tpb, &threads);
    ExpectAllNear(std::vector<double>(r.out.begin(), r.out.end()), rs.out.data(), 1e-5, 1e-5,
                  "split prefill out");
    ExpectAllNear(std::vector<double>(r.lse.begin(), r.lse.end()), rs.lse.data(), 1e-5, 1e-5,
                  "split prefill lse");
  }
}

TEST(AttentionTest, ContextParallelBlockPositions) {
  // A rank holding global blocks 1, 3, 5 of a sequence (tpb 16; the last one partial): the
  // positions of its tokens are 16..31, 48..63, 80..90. Queries before, inside and after.
  std::mt19937 rng(4);
  const int64_t tpb = 16;
  Pool pool(DType::kF16, 1, 2, tpb, 8, 7);
  pool.FillRandom(rng);
  Problem pr;
  pr.AddSeq({4, 0, 6}, {16, 48, 80}, 2 * 16 + 11);
  for (int32_t pos : {3, 15, 16, 20, 47, 50, 63, 64, 81, 90, 100, 5000}) {
    pr.AddQuery(0, pos);
  }
  pr.num_kv_heads = 2;
  pr.num_q_heads = 4;
  pr.head_dim = 8;
  pr.q = RandomVector(rng, pr.num_q_tokens() * 4 * 8);
  ThreadPool threads(2);
  for (int64_t split : {0, 16, 32}) {
    const Result r = RunAttention(pr, pool.view, split, &threads);
    ExpectMatchesReference(pr, pool.view, r, "cp split=" + std::to_string(split));
    // Positions 3 and 15 see none of this rank's tokens.
    for (int64_t i = 0; i < 2 * 4; ++i) {
      EXPECT_EQ(r.lse[i], -std::numeric_limits<float>::infinity());
      for (int64_t e = 0; e < 8; ++e) {
        EXPECT_EQ(r.out[i * 8 + e], 0.0f);
      }
    }
  }
}

TEST(AttentionTest, SplitKvEqualsUnsplit) {
  ThreadPool threads(3);
  std::mt19937 rng(5);
  const int64_t tpb = 16;
  for (DType dt : {DType::kF32, DType::kF16}) {
    for (int64_t group : {1, 4}) {
      Pool pool(dt, 1, 2, tpb, 64, 60);
      pool.FillRandom(rng);
      Problem pr = DecodeBatch({1, 16, 17, 40 * 16, 0, 100}, tpb, 60, rng);
      pr.num_kv_heads = 2;
      pr.num_q_heads = 2 * group;
      pr.head_dim = 64;
      pr.q = RandomVector(rng, pr.num_q_tokens() * pr.num_q_heads * 64);
      const Result whole = RunAttention(pr, pool.view, 0, &threads);
      const std::vector<double> whole_out(whole.out.begin(), whole.out.end());
      const std::vector<double> whole_lse(whole.lse.begin(), whole.lse.end());
      for (int64_t split : {2 * tpb, tpb, 7 * tpb}) {
        const PagedAttentionParams p = pr.Params(pool.view, nullptr, nullptr, split);
        EXPECT_GT(PagedAttentionWorkspaceBytes(p), 0u);
        const Result r = RunAttention(pr, pool.view, split, &threads);
        const std::string what = Name(dt, group, 64) + " split=" + std::to_string(split);
        ExpectAllNear(whole_out, r.out.data(), 1e-5, 1e-5, what + " out");
        ExpectAllNear(whole_lse, r.lse.data(), 1e-5, 1e-5, what + " lse");
        ExpectMatchesReference(pr, pool.view, r, what);
      }
      const PagedAttentionParams p = pr.Params(pool.view, nullptr, nullptr, 0);
      EXPECT_EQ(PagedAttentionWorkspaceBytes(p), 0u);
    }
  }
}

// NaN and infinities in q, K and V: the positions of NaN and of each infinity (with its sign)
// in out and lse are the float64 reference's, whatever the split, and everything else is near
// it. A NaN score (from q or K) makes the head's whole row NaN and its LSE NaN, also with
// split-KV, where only one chunk sees it; a NaN or infinite V element only its own dimension;
// a score of +inf makes the row NaN (inf - inf) and one of -inf drops its row.
TEST(AttentionTest, NonFiniteInputsPropagate) {
  ThreadPool threads(3);
  std::mt19937 rng(6);
  const int64_t tpb = 16, kv_heads = 2;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  for (DType dt : {DType::kF32, DType::kF16, DType::kBF16}) {
    for (int64_t group : {1, 4}) {
      for (int64_t d : {64, 20}) {
        Pool pool(dt, 1, kv_heads, tpb, d, 30);
        pool.FillRandom(rng);
        // Seven sequences of 40 tokens (blocks 16 + 16 + 8) and one of 1, a decode query each.
        Problem pr = DecodeBatch({40, 40, 40, 40, 40, 40, 40, 1}, tpb, 30, rng);
        pr.num_kv_heads = kv_heads;
        pr.num_q_heads = kv_heads * group;
        pr.head_dim = d;
        pr.q = RandomVector(rng, pr.num_q_tokens() * pr.num_q_heads * d);
        // Token i of sequence s, KV head h, plane c (0 = K, 1 = V), element e.
        const auto kv_at = [&](int64_t s, int64_t i, int64_t h, int c, int64_t e) {
          return KvOffset(pool.view, pr.tables[s][i / tpb], 0, c, h, i % tpb) + e;
        };
        pool.Set(kv_at(0, 5, 0, 0, 3), nan);   // a NaN score, first chunk
        pool.Set(kv_at(1, 37, 1, 1, 2), nan);  // a NaN V element, last chunk
        pr.q[(2 * pr.num_q_heads + pr.num_q_heads - 1) * d + 1] = nan;  // a NaN query
        pool.Set(kv_at(3, 20, 0, 1, 4), inf);                           // +inf in V
        pool.Set(kv_at(3, 9, 0, 1, 5), -inf);  // -inf in V, another dimension
        // K element 0 infinite with every query of the group positive there: a score of -inf
        // (the row drops out) in sequence 4, +inf (the row is NaN) in sequence 5, and -inf in the
        // only row of sequence 7 (nothing left: out 0, lse -inf, as with nothing visible).
        for (int64_t s : {4, 5, 7}) {
          for (int64_t g = 0; g < group; ++g) {
            pr.q[(s * pr.num_q_heads + group + g) * d] = 0.5f;
          }
          pool.Set(kv_at(s, s == 7 ? 0 : 12, 1, 0, 0), s == 5 ? inf : -inf);
        }
        // Sequence 6 stays finite: its rows must be unharmed.
        for (int64_t split : {int64_t{0}, tpb, 2 * tpb}) {
          const Result r = RunAttention(pr, pool.view, split, &threads);
          ExpectMatchesReference(pr, pool.view, r,
                                 Name(dt, group, d) + " split=" + std::to_string(split));
          // The reference itself has them where described above.
          const int64_t hq = pr.num_q_heads;
          EXPECT_TRUE(std::isnan(r.lse[0 * hq]));
          EXPECT_TRUE(std::isnan(r.out[(0 * hq) * d + 7]));
          EXPECT_TRUE(std::isnan(r.out[(1 * hq + hq - 1) * d + 2]));
          EXPECT_TRUE(std::isfinite(r.out[(1 * hq + hq - 1) * d + 3]));
          EXPECT_TRUE(std::isfinite(r.lse[1 * hq + hq - 1]));
          EXPECT_TRUE(std::isnan(r.lse[2 * hq + hq - 1]));
          EXPECT_EQ(r.out[(3 * hq) * d + 4], inf);
          EXPECT_EQ(r.out[(3 * hq) * d + 5], -inf);
          EXPECT_TRUE(std::isfinite(r.lse[4 * hq + hq - 1]));
          EXPECT_TRUE(std::isnan(r.lse[5 * hq + hq - 1]));
          EXPECT_EQ(r.lse[7 * hq + hq - 1], -inf);
          EXPECT_EQ(r.out[(7 * hq + hq - 1) * d], 0.0f);
          EXPECT_TRUE(std::isfinite(r.lse[7 * hq]));
        }
      }
    }
  }
}

// Shards one sequence over `cp` simulated ranks by the placement rule (global block g on rank
// g mod cp), runs attention on each and merges with MergeStatesCpu; the result must equal
// attention over the whole sequence on one rank.
void CheckContextParallelMerge(int64_t cp, int64_t len, DType dt, std::mt19937& rng) {
  const int64_t tpb = 8, kv_heads = 2, group = 2, d = 16;
  const int64_t hq = kv_heads * group;
  const int64_t global_blocks = (len + tpb - 1) / tpb;
  const std::vector<float> k = RandomVector(rng, std::max<int64_t>(len, 1) * kv_heads * d);
  const std::vector<float> v = RandomVector(rng, std::max<int64_t>(len, 1) * kv_heads * d);
  // Queries: decode at the end plus earlier causal positions (some see no token of a rank).
  std::vector<int32_t> positions = {static_cast<int32_t>(std::max<int64_t>(len - 1, 0))};
  for (int32_t p : {0, 3, 9, 20, 37}) {
    if (p < len - 1) {
      positions.push_back(p);
    }
  }
  const std::vector<float> q = RandomVector(rng, static_cast<int64_t>(positions.size()) * hq * d);

  auto build = [&](int64_t rank, int64_t ranks, Pool* pool, Problem* pr) {
    std::vector<int32_t> table, firsts;
    int32_t kv_len = 0;
    int32_t next_block = static_cast<int32_t>(pool->num_blocks()) - 1;  // fill from the top
    for (int64_t g = 0; g < global_blocks; ++g) {
      if (g % ranks != rank) {
        continue;
      }
      const int32_t phys = next_block--;
      table.push_back(phys);
      firsts.push_back(static_cast<int32_t>(g * tpb));
      const int64_t n = std::min(tpb, len - g * tpb);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t gp = g * tpb + i;
        WriteKv(pool->view, phys, 0, i, k.data() + gp * kv_heads * d, v.data() + gp * kv_heads * d);
      }
      kv_len += static_cast<int32_t>(n);
    }
    pr->AddSeq(table, firsts, kv_len);
    for (int32_t p : positions) {
      pr->AddQuery(0, p);
    }
    pr->num_kv_heads = kv_heads;
    pr->num_q_heads = hq;
    pr->head_dim = d;
    pr->q = q;
  };

  ThreadPool threads(2);
  Pool full_pool(dt, 1, kv_heads, tpb, d, global_blocks + 1);
  Problem full;
  build(0, 1, &full_pool, &full);
  const Result want = RunAttention(full, full_pool.view, 0, &threads);
  ExpectMatchesReference(full, full_pool.view, want, "full");

  const int64_t rows = static_cast<int64_t>(positions.size()) * hq;
  std::vector<float> parts_o, parts_lse;
  for (int64_t r = 0; r < cp; ++r) {
    Pool pool(dt, 1, kv_heads, tpb, d, global_blocks + 2);
    Problem pr;
    build(r, cp, &pool, &pr);
    const Result part = RunAttention(pr, pool.view, 0, &threads);
    ExpectMatchesReference(pr, pool.view, part, "rank " + std::to_string(r));
    parts_o.insert(parts_o.end(), part.out.begin(), part.out.end());
    parts_lse.insert(parts_lse.end(), part.lse.begin(), part.lse.end());
  }
  std::vector<float> out(rows * d), lse(rows);
  MergeStatesCpu({parts_o.data(), parts_lse.data(), out.data(), lse.data(), cp, rows, d}, &threads);
  const std::string what =
      "cp=" + std::to_string(cp) + " len=" + std::to_string(len) + " " + DTypeName(dt);
  ExpectAllNear(std::vector<double>(want.out.begin(), want.out.end()), out.data(), 1e-5, 1e-5,
                what + " out");
  ExpectAllNear(std::vector<double>(want.lse.begin(), want.lse.end()), lse.data(), 1e-5, 1e-5,
                what + " lse");
}

TEST(AttentionTest, ContextParallelRanksMergeToFullAttention) {
  std::mt19937 rng(6);
  for (DType dt : {DType::kF32, DType::kBF16}) {
    CheckContextParallelMerge(2, 8 * 7 + 5, dt, rng);
    CheckContextParallelMerge(2, 8 * 10, dt, rng);
    CheckContextParallelMerge(2, 5, dt, rng);  // rank 1 holds nothing
    CheckContextParallelMerge(4, 8 * 13 + 1, dt, rng);
  }
}

}  // namespace
}  // namespace helix::kernels
