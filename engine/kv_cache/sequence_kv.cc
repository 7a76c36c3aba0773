#include "engine/kv_cache/sequence_kv.h"

#include <cassert>

namespace helix {

bool SequenceKv::Reserve(BlockPool* pool, int64_t num_tokens) {
  const int64_t have = static_cast<int64_t>(blocks_.size());
  const int64_t need = BlocksNeeded(num_tokens);
  if (need <= have) return true;
  if (!pool->Allocate(need - have, &blocks_)) return false;
  for (int64_t j = have; j < need; ++j) {
    // Local block j is global block cp_rank + j·cp_size.
    first_pos_.push_back(static_cast<int32_t>((cp_rank_ + j * cp_size_) * tokens_per_block_));
  }
  return true;
}

void SequenceKv::Release(BlockPool* pool) {
  pool->Free(blocks_);
  blocks_.clear();
  first_pos_.clear();
  local_tokens_ = 0;
}

// pos is checked in debug builds only.
std::pair<int32_t, int32_t> SequenceKv::Append([[maybe_unused]] int64_t pos) {
  assert(Owns(pos));
  const int64_t j = local_tokens_ / tokens_per_block_;
  const int64_t slot = local_tokens_ % tokens_per_block_;
  assert(j < static_cast<int64_t>(blocks_.size()));
  assert(first_pos_[j] + slot == pos);
  ++local_tokens_;
  return {blocks_[j], static_cast<int32_t>(slot)};
}

}  // namespace helix
