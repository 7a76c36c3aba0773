// One sequence's KV on one rank: the local blocks it owns under the placement rule, the
// global position of each block's first token, and how many tokens this rank holds.
// Not thread-safe: owned by the engine thread.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/kv_cache/block_pool.h"
#include "engine/kv_cache/placement.h"

namespace helix {

class SequenceKv {
 public:
  SequenceKv(int64_t tokens_per_block, int cp_size, int cp_rank)
      : tokens_per_block_(tokens_per_block), cp_size_(cp_size), cp_rank_(cp_rank) {}

  // Blocks this rank needs for a sequence of `num_tokens` tokens.
  int64_t BlocksNeeded(int64_t num_tokens) const {
    return LocalBlockCount(num_tokens, tokens_per_block_, cp_size_, cp_rank_);
  }
  // Takes blocks from the pool so that positions [0, num_tokens) fit; all or nothing.
  bool Reserve(BlockPool* pool, int64_t num_tokens);
  // Returns every block to the pool; the sequence is empty afterwards.
  void Release(BlockPool* pool);

  bool Owns(int64_t pos) const { return OwnerRank(pos, tokens_per_block_, cp_size_) == cp_rank_; }
  // Records the token at global position `pos` (owned here, positions appended in order) and
  // returns its (block id, slot in block). REQUIRES: Owns(pos), blocks reserved.
  std::pair<int32_t, int32_t> Append(int64_t pos);

  int64_t local_tokens() const { return local_tokens_; }
  const std::vector<int32_t>& blocks() const { return blocks_; }
  // Global position of token 0 of each reserved block, in the same order as blocks().
  const std::vector<int32_t>& block_first_pos() const { return first_pos_; }

 private:
  int64_t tokens_per_block_;
  int cp_size_;
  int cp_rank_;
  std::vector<int32_t> blocks_;
  std::vector<int32_t> first_pos_;
  int64_t local_tokens_ = 0;
};

}  // namespace helix
