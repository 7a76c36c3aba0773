// Where a rank sits in a Helix instance of N = TP x CP ranks (rank id = tp_rank * CP +
// cp_rank, CP fastest), which slice of each weight it holds, and the start-up checks on a
// model's head counts. Plain values and pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <utility>

#include "engine/common/status.h"
#include "engine/model/model_config.h"

namespace helix::parallel {

struct HelixLayout {
  int tp = 1, cp = 1;
  int tp_rank = 0, cp_rank = 0;

  int world() const { return tp * cp; }
  int rank() const { return tp_rank * cp + cp_rank; }
  bool single() const { return world() == 1; }
  static HelixLayout ForRank(int rank, int tp, int cp) { return {tp, cp, rank / cp, rank % cp}; }
  std::string ToString() const;
};

// [begin, end) of part i when n items are split into `parts` near-equal contiguous parts (the
// first n % parts get one more).
std::pair<int64_t, int64_t> SplitRange(int64_t n, int parts, int i);

// The Helix head split: query heads divisible by TP x CP (each rank combines H / N heads),
// KV heads divisible by TP (each TP shard holds whole KV heads); tp, cp >= 1. The message
// names the sizes and the rule that failed.
Status ValidateHelixLayout(const ModelConfig& c, int tp, int cp);

}  // namespace helix::parallel
