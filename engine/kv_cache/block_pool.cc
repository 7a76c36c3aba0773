#include "engine/kv_cache/block_pool.h"

#include <cstdlib>
#include <limits>

#include "engine/common/log.h"

namespace helix {

StatusOr<std::unique_ptr<BlockPool>> BlockPool::Create(int64_t num_blocks, int64_t block_bytes,
                                                       Memory memory) {
  if (num_blocks <= 0 || block_bytes <= 0) {
    return InvalidArgument("KV block pool needs a positive size (blocks " +
                           std::to_string(num_blocks) + ", bytes per block " +
                           std::to_string(block_bytes) + ")");
  }
  if (num_blocks > std::numeric_limits<int32_t>::max()) {
    return InvalidArgument("KV block pool of " + std::to_string(num_blocks) +
                           " blocks exceeds the 2^31 block-id limit");
  }
  // No padding between blocks: the kernels and the KV transfer address block b at b ×
  // block_bytes. Only the total is rounded up (aligned_alloc wants a multiple of 64).
  const int64_t aligned_block = block_bytes;
  if (aligned_block > (std::numeric_limits<int64_t>::max() - 63) / num_blocks) {
    return InvalidArgument("KV block pool size overflows");
  }
  const size_t total = static_cast<size_t>((aligned_block * num_blocks + 63) / 64 * 64);
  if (!memory.alloc) {
    memory.alloc = [](size_t bytes) { return std::aligned_alloc(64, bytes); };
    memory.free = [](void* p) { std::free(p); };
  }
  void* base = memory.alloc(total);
  if (!base) {
    return ResourceExhausted("cannot allocate the KV block pool in " + memory.what +
                             " memory: " + std::to_string(num_blocks) + " blocks × " +
                             std::to_string(aligned_block) + " bytes");
  }
  return std::unique_ptr<BlockPool>(
      new BlockPool(base, num_blocks, aligned_block, std::move(memory.free)));
}

BlockPool::BlockPool(void* base, int64_t num_blocks, int64_t block_bytes,
                     std::function<void(void*)> free)
    : base_(base),
      free_memory_(std::move(free)),
      num_blocks_(num_blocks),
      block_bytes_(block_bytes),
      in_use_(num_blocks, 0) {
  free_.reserve(num_blocks);
  // Hand out low ids first.
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

BlockPool::~BlockPool() { free_memory_(base_); }

bool BlockPool::Allocate(int64_t n, std::vector<int32_t>* out) {
  if (n < 0 || n > num_free()) return false;
  for (int64_t i = 0; i < n; ++i) {
    int32_t b = free_.back();
    free_.pop_back();
    in_use_[b] = 1;
    out->push_back(b);
  }
  return true;
}

void BlockPool::Free(const std::vector<int32_t>& blocks) {
  for (int32_t b : blocks) {
    if (b < 0 || b >= num_blocks_ || !in_use_[b]) {
      HELIX_LOG(kError) << "KV block pool: freeing block " << b << " that is not allocated";
      continue;
    }
    in_use_[b] = 0;
    free_.push_back(b);
  }
}

}  // namespace helix
