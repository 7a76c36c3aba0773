// Multi-head Latent Attention (DeepSeek V2/V3) decode attention in the absorbed form, over a
// one-plane paged KV pool whose single "head" per token is [c_kv (latent_dim) | k_pe
// (rope_dim)]. Every query head attends to the same latent cache (MQA-like): scores are
// q_lat . c_kv + q_pe . k_pe, values are c_kv, so each head's output stays in the latent
// space (the caller applies W_UV afterwards). Returns O and LSE so partial results merge
// exactly with MergeStatesCpu (split-KV inside a rank, the Helix combine across ranks).
// Stateless; the pool is only read.
#ifndef HELIX_KERNELS_MLA_ATTENTION_H_
#define HELIX_KERNELS_MLA_ATTENTION_H_

#include <cstddef>
#include <cstdint>

#include "kernels/attention.h"
#include "kernels/thread_pool.h"

namespace helix::kernels {

struct MlaAttentionParams {
  const float* q;        // [num_q_tokens][num_heads][latent_dim + rope_dim]: per head the
                         // absorbed query q_lat = W_UK^T q_nope, then the rotated q_pe
  const int32_t* q_seq;  // [num_q_tokens] sequence of each query token
  const int32_t* q_pos;  // [num_q_tokens] global position (causal: sees KV positions <= q_pos)
  KvPoolView kv;         // num_planes == 1, num_kv_heads == 1, head_dim == latent_dim + rope_dim
  int64_t layer;
  const int32_t* block_tables;     // [num_seqs][max_blocks_per_seq] local block ids, in order
  const int32_t* block_first_pos;  // [num_seqs][max_blocks_per_seq] global position of token 0
  const int32_t* kv_lens;          // [num_seqs] tokens this rank holds for the sequence
  int64_t max_blocks_per_seq, num_seqs, num_q_tokens, num_heads, latent_dim, rope_dim;
  float scale;  // softmax scale (DeepSeek: (qk_nope + qk_rope)^-0.5, times yarn mscale^2)
  float* out;   // [num_q_tokens][num_heads][latent_dim]
  float* lse;   // [num_q_tokens][num_heads]; -inf where no KV is visible. May be nullptr.
  int64_t kv_split_tokens;  // 0 = no split; else chunks of this many tokens (a multiple of
                            // tokens_per_block), computed separately and merged
};

// Workspace MlaAttentionCpu needs for p: 0 without split-KV, else the per-chunk partial
// outputs [chunks][num_q_tokens * num_heads][latent_dim] then LSEs [chunks][...], fp32 (chunks =
// ceil(max_blocks_per_seq / blocks per chunk)).
size_t MlaAttentionWorkspaceBytes(const MlaAttentionParams& p);

// Online softmax in fp32 (the cache converted from the pool dtype). Each cached token is read
// once per (query token, chunk) and scored against all num_heads heads (once per group of up
// to 128 heads; heads are cut into more groups only when there are fewer than two (query
// token, chunk) items per thread). A query token that sees no KV gets out = 0, lse = -inf; a NaN
// score makes the head's row and lse NaN (as PagedAttentionCpu, split or not). The
// result does not depend on the thread count.
// REQUIRES: kv.num_planes == 1, kv.num_kv_heads == 1, kv.head_dim == latent_dim + rope_dim
//   <= 15360 (rows are converted to fp32 a tile at a time in stack buffers); kv_lens[s] <=
//   max_blocks_per_seq * tokens_per_block; workspace holds MlaAttentionWorkspaceBytes(p) bytes,
//   float-aligned (nullptr when 0);
//   out/lse do not alias q or the pool. pool may be nullptr. Allocates nothing.
void MlaAttentionCpu(const MlaAttentionParams& p, void* workspace, ThreadPool* pool);

}  // namespace helix::kernels

#endif  // HELIX_KERNELS_MLA_ATTENTION_H_
