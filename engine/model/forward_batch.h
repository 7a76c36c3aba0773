// What one forward pass computes: the new tokens of every scheduled sequence, flattened,
// with where each token's K/V goes and each sequence's block table. Built by the engine
// thread each step; a plain value.
#pragma once

#include <cstdint>
#include <vector>

namespace helix {

struct ForwardBatch {
  // Per new token, T of them.
  std::vector<int32_t> tokens;     // [T] token ids
  std::vector<int32_t> positions;  // [T] global positions (RoPE, causal limit)
  std::vector<int32_t> token_seq;  // [T] index of the token's sequence in this batch
  std::vector<int32_t> kv_block;   // [T] block to write K/V to, -1 when another rank owns it
  std::vector<int32_t> kv_slot;    // [T] slot in that block
  // Per sequence, S of them; rows of max_blocks entries.
  int64_t num_seqs = 0;
  int64_t max_blocks = 0;
  std::vector<int32_t> block_tables;     // [S][max_blocks] local block ids
  std::vector<int32_t> block_first_pos;  // [S][max_blocks] global position of each block's token 0
  std::vector<int32_t> kv_lens;          // [S] local tokens after this step's writes
  // Token rows whose logits are wanted (the last new token of each sequence that samples).
  std::vector<int32_t> logits_rows;

  int64_t num_tokens() const { return static_cast<int64_t>(tokens.size()); }
};

}  // namespace helix
