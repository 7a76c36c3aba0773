// A rank's KV block pool: one allocation made at start-up, handed out as block ids.
// Not thread-safe: owned and used by the engine thread only.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/common/status.h"

namespace helix {

// Where a pool's memory comes from: host memory by default (64-byte aligned; pages are
// committed on first use), or e.g. a device backend's Alloc/Free ("what" names it in errors).
struct BlockPoolMemory {
  std::function<void*(size_t)> alloc;  // nullptr on failure; at least 64-byte aligned
  std::function<void(void*)> free;
  std::string what = "host";
};

class BlockPool {
 public:
  using Memory = BlockPoolMemory;
  // Reserves num_blocks × block_bytes, blocks back to back (block b at base + b ×
  // block_bytes, the stride the kernels address the pool with: no per-block padding).
  static StatusOr<std::unique_ptr<BlockPool>> Create(int64_t num_blocks, int64_t block_bytes,
                                                     Memory memory = {});
  ~BlockPool();
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;

  int64_t num_blocks() const { return num_blocks_; }
  int64_t num_free() const { return static_cast<int64_t>(free_.size()); }
  int64_t block_bytes() const { return block_bytes_; }
  void* base() const { return base_; }

  // Appends n block ids to *out and returns true, or changes nothing and returns false.
  bool Allocate(int64_t n, std::vector<int32_t>* out);
  // Returns blocks to the pool. Freeing a block that is not allocated is a bug: it is
  // reported and ignored so the pool stays consistent.
  void Free(const std::vector<int32_t>& blocks);

 private:
  BlockPool(void* base, int64_t num_blocks, int64_t block_bytes, std::function<void(void*)> free);

  void* base_;
  std::function<void(void*)> free_memory_;
  int64_t num_blocks_;
  int64_t block_bytes_;
  std::vector<int32_t> free_;    // stack of free ids
  std::vector<uint8_t> in_use_;  // per block
};

}  // namespace helix
