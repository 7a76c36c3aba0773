// Helpers shared by the kernels/ unit tests (not part of the library): seeded random inputs
// and element-wise comparison with a relative + absolute bound. Not thread-safe (test-only).
#ifndef HELIX_KERNELS_TEST_UTIL_H_
#define HELIX_KERNELS_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace helix::kernels::testing {

inline std::vector<float> RandomVector(std::mt19937& rng, int64_t n, float lo = -1.0f,
                                       float hi = 1.0f) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) {
    x = dist(rng);
  }
  return v;
}

// Checks |got - want| <= atol + rtol * |want| element-wise, after checking that infinities
// and NaNs sit at the same places. Reports the first few mismatches.
inline void ExpectAllNear(const std::vector<double>& want, const float* got, double rtol,
                          double atol, const std::string& what) {
  int reported = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = got[i], w = want[i];
    bool ok;
    if (std::isnan(w) || std::isnan(g)) {
      ok = std::isnan(w) && std::isnan(g);
    } else if (std::isinf(w) || std::isinf(g)) {
      ok = w == g;
    } else {
      ok = std::abs(g - w) <= atol + rtol * std::abs(w);
    }
    if (!ok && reported++ < 5) {
      ADD_FAILURE() << what << ": element " << i << " got " << g << " want " << w;
    }
  }
}

// Sequences over a paged KV pool, as the attention kernels see them: per sequence its block
// table, each block's first global position and its length; per query token its sequence and
// position.
struct PagedSeqs {
  int64_t max_blocks = 1;
  std::vector<std::vector<int32_t>> tables, firsts;
  std::vector<int32_t> kv_lens, q_seq, q_pos;

  void AddSeq(std::vector<int32_t> table, std::vector<int32_t> first, int32_t kv_len) {
    max_blocks = std::max<int64_t>(max_blocks, static_cast<int64_t>(table.size()));
    tables.push_back(std::move(table));
    firsts.push_back(std::move(first));
    kv_lens.push_back(kv_len);
  }
  int64_t tokens() const { return static_cast<int64_t>(q_seq.size()); }
  // [sequences][max_blocks], padded with -1.
  std::vector<int32_t> Flat(const std::vector<std::vector<int32_t>>& v) const {
    std::vector<int32_t> flat(v.size() * max_blocks, -1);
    for (size_t s = 0; s < v.size(); ++s) {
      std::copy(v[s].begin(), v[s].end(), flat.begin() + s * max_blocks);
    }
    return flat;
  }
};

// A P (a PagedSeqs) holding sequences of the given lengths on shuffled blocks of a num_blocks
// pool, contiguous positions, and one decode query each (at position kv_len - 1).
template <typename P>
P DecodeSeqs(const std::vector<int32_t>& lens, int64_t tpb, int64_t num_blocks, std::mt19937& rng) {
  P pr;
  std::vector<int32_t> ids(num_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  size_t next = 0;
  for (size_t s = 0; s < lens.size(); ++s) {
    std::vector<int32_t> table, first;
    for (int64_t j = 0; j * tpb < lens[s]; ++j) {
      table.push_back(ids.at(next++));
      first.push_back(static_cast<int32_t>(j * tpb));
    }
    pr.AddSeq(table, first, lens[s]);
    pr.q_seq.push_back(static_cast<int32_t>(s));
    pr.q_pos.push_back(std::max(0, lens[s] - 1));
  }
  return pr;
}

// Appends a query token at each of positions[s]'s positions, for every sequence s in order.
inline void AppendQueries(const std::vector<std::vector<int32_t>>& positions,
                          std::vector<int32_t>* q_seq, std::vector<int32_t>* q_pos) {
  for (size_t s = 0; s < positions.size(); ++s) {
    for (int32_t pos : positions[s]) {
      q_seq->push_back(static_cast<int32_t>(s));
      q_pos->push_back(pos);
    }
  }
}

// Differential fuzz tests (random cases against a reference): HELIX_FUZZ_CASES cases (default
// `default_cases`) from seed HELIX_FUZZ_SEED (default 1), so that a failure's seed reruns alone
// with HELIX_FUZZ_SEED=<seed> HELIX_FUZZ_CASES=1.
struct FuzzRange {
  int64_t cases;
  uint32_t first_seed;
};
inline FuzzRange FuzzRangeFromEnv(int64_t default_cases) {
  const auto env = [](const char* name, int64_t fallback) {
    const char* v = std::getenv(name);
    return v == nullptr || *v == '\0' ? fallback : std::strtoll(v, nullptr, 10);
  };
  return {env("HELIX_FUZZ_CASES", default_cases), static_cast<uint32_t>(env("HELIX_FUZZ_SEED", 1))};
}
// One fuzz case's draws, from its seed.
struct Fuzz {
  explicit Fuzz(uint32_t seed) : rng(seed * 2654435761u) {}
  int Pick(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }  // [lo, hi]
  bool Chance(double p) { return std::bernoulli_distribution(p)(rng); }
  std::mt19937 rng;
};

}  // namespace helix::kernels::testing

#endif  // HELIX_KERNELS_TEST_UTIL_H_
