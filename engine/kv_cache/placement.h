// The Helix placement rule: global position p lies in global block p / tokens_per_block,
// owned by CP rank (block mod cp_size). Pure functions; thread-safe.
#pragma once

#include <cstdint>

namespace helix {

inline int64_t GlobalBlock(int64_t pos, int64_t tokens_per_block) { return pos / tokens_per_block; }

inline int OwnerRank(int64_t pos, int64_t tokens_per_block, int cp_size) {
  return static_cast<int>(GlobalBlock(pos, tokens_per_block) % cp_size);
}

// Number of global blocks among the first `num_tokens` positions that `cp_rank` owns.
inline int64_t LocalBlockCount(int64_t num_tokens, int64_t tokens_per_block, int cp_size,
                               int cp_rank) {
  int64_t blocks = (num_tokens + tokens_per_block - 1) / tokens_per_block;
  if (blocks <= cp_rank) return 0;
  return (blocks - cp_rank + cp_size - 1) / cp_size;
}

// Number of the first `num_tokens` positions that `cp_rank` holds.
inline int64_t LocalTokenCount(int64_t num_tokens, int64_t tokens_per_block, int cp_size,
                               int cp_rank) {
  int64_t full_blocks = num_tokens / tokens_per_block;
  int64_t n = (full_blocks / cp_size) * tokens_per_block;
  int64_t rem_blocks = full_blocks % cp_size;
  if (cp_rank < rem_blocks) n += tokens_per_block;
  if (full_blocks % cp_size == cp_rank) n += num_tokens % tokens_per_block;
  return n;
}

}  // namespace helix
