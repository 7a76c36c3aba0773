// Paged decode/prefill attention over a rank's KV pool, returning each query head's output
// and log-sum-exp so partial results merge exactly (MergeStatesCpu). Stateless; the pool is
// only read (WriteKv writes one token slot), so calls are thread-safe for distinct outputs.
#ifndef HELIX_KERNELS_ATTENTION_H_
#define HELIX_KERNELS_ATTENTION_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "kernels/dtype.h"
#include "kernels/thread_pool.h"

namespace helix::kernels {

// Non-owning view of one rank's KV pool. A block holds tokens_per_block tokens for all layers
// and this rank's KV heads; within a block the element order is
// [layer][plane: k=0 / v=1][kv_head][token][head_dim], so one head's tokens in a block are
// contiguous. GQA pools have two planes (K and V); an MLA pool has one (the latent c_kv followed
// by the rotary k_pe, one "head" of kv_lora_rank + qk_rope_head_dim; see mla_attention.h).
struct KvPoolView {
  void* base;  // the pool: [num_blocks][block_elems()] elements of dtype
  DType dtype;
  int64_t num_layers, num_kv_heads, tokens_per_block, head_dim;
  int64_t num_planes = 2;  // 2: K and V; 1: MLA latent

  int64_t block_elems() const {
    return num_layers * num_planes * num_kv_heads * tokens_per_block * head_dim;
  }
};

// Element (not byte) offset from view.base of dim 0 of (block, layer, c: 0 = K / 1 = V, kv
// head, token within the block).
inline int64_t KvOffset(const KvPoolView& view, int64_t block, int64_t layer, int c, int64_t head,
                        int64_t token) {
  return block * view.block_elems() +
         (((layer * view.num_planes + c) * view.num_kv_heads + head) * view.tokens_per_block +
          token) *
             view.head_dim;
}

// Stores one token's K and V for all of the view's KV heads, converted (round to nearest
// even) to the pool dtype. A one-plane (MLA) view stores k only; v is ignored (may be nullptr).
void WriteKv(const KvPoolView& view, int64_t block, int64_t layer, int64_t token_in_block,
             const float* k,   // [num_kv_heads][head_dim]
             const float* v);  // [num_kv_heads][head_dim]

struct PagedAttentionParams {
  const float* q;        // [num_q_tokens][num_q_heads][head_dim]
  const int32_t* q_seq;  // [num_q_tokens] index of the sequence each query token belongs to
  const int32_t* q_pos;  // [num_q_tokens] global position of each query token: it sees the KV
                         // tokens with global position <= q_pos (causal)
  KvPoolView kv;
  int64_t layer;
  const int32_t* block_tables;     // [num_seqs][max_blocks_per_seq] this rank's physical block
                                   // ids of each sequence, in order
  const int32_t* block_first_pos;  // [num_seqs][max_blocks_per_seq] global position of token 0
                                   // of each of those blocks (not contiguous under CP)
  const int32_t* kv_lens;  // [num_seqs] tokens this rank holds for the sequence; block j holds
                           // min(tokens_per_block, kv_len - j * tokens_per_block) tokens
  int64_t max_blocks_per_seq, num_seqs, num_q_tokens, num_q_heads, num_kv_heads, head_dim;
  float scale;  // softmax scale, usually 1/sqrt(head_dim)
  float* out;   // [num_q_tokens][num_q_heads][head_dim]
  float* lse;   // [num_q_tokens][num_q_heads] natural log of sum exp(scale q.k) over the
                // visible tokens; -inf where none is visible. May be nullptr.
  int64_t kv_split_tokens;  // 0 = no split; else each sequence's blocks are cut into chunks of
                            // this many tokens (a multiple of tokens_per_block), each chunk's
                            // (O, LSE) is computed separately and MergeStatesCpu merges them
  // A hint, not read by the attention: up to two byte ranges that the kernels after it read
  // (the next products' weights), which the CUDA decode kernel (head dims 64 / 128) has the L2
  // prefetch while it runs; nothing may write them during the step. Each start 16-byte
  // aligned, each length a multiple of 16 (0: none). The CPU kernel ignores them.
  const void* l2_prefetch[2] = {nullptr, nullptr};
  int64_t l2_prefetch_bytes[2] = {0, 0};
  // A promise, for a GPU kernel launched as a programmatic dependent of the kernel before it
  // (which may still be running when this one starts): the KV rows at global positions below
  // each query token's own, q_seq, q_pos, the block tables, block_first_pos and kv_lens were
  // all written before that kernel began (e.g. by earlier decode steps and the step's uploads);
  // only q and the query tokens' own K/V rows may be its output. The CUDA decode kernel (head
  // dims 64 / 128, one query token per sequence) then starts copying those rows before it waits
  // for that kernel. The CPU kernel ignores it.
  bool kv_settled_below_q = false;
};

// Split-KV chunking, shared by every attention kernel (CPU and CUDA, GQA and MLA: P is
// PagedAttentionParams or MlaAttentionParams) so that workspaces and merges agree: blocks per
// chunk (0 when kv_split_tokens is 0: no split) and chunks per sequence (1 without a split).
template <typename P>
int64_t SplitKvBlocksPerChunk(const P& p) {
  if (p.kv_split_tokens <= 0) {
    return 0;
  }
  return std::max<int64_t>(1, p.kv_split_tokens / p.kv.tokens_per_block);
}
template <typename P>
int64_t SplitKvParts(const P& p) {
  const int64_t bpc = SplitKvBlocksPerChunk(p);
  if (bpc == 0) {
    return 1;
  }
  return std::max<int64_t>(1, (p.max_blocks_per_seq + bpc - 1) / bpc);
}

// Workspace PagedAttentionCpu needs for p: 0 without split-KV, else the per-chunk partial
// outputs and LSEs (ceil(max_blocks_per_seq / blocks per chunk) chunks of every output row).
size_t PagedAttentionWorkspaceBytes(const PagedAttentionParams& p);

// Online-softmax attention in fp32 (K and V converted from the pool dtype). Query head qh
// reads KV head qh / (num_q_heads / num_kv_heads); the query heads of a GQA group (up to 8 at
// a time) share each K/V read. A query token that sees no KV gets out = 0, lse = -inf.
// Non-finite inputs propagate as IEEE arithmetic has them (the CUDA kernels give the same
// positions): a NaN score (a NaN in q or in a visible K row) or a score of +inf makes the
// head's whole row and its lse NaN, split or not (MergeStatesCpu keeps a chunk's NaN); a
// score of -inf drops its row, as a mask does (all dropped: out 0, lse -inf); a NaN or infinite
// visible V element reaches only its own dimension of the output. Rows a query cannot see are
// never read.
// Work items are (query token, KV chunk, set of KV heads), each walking its blocks in order
// and all its heads per block; KV-head sets are cut only as far as needed to give every
// thread work, and the result does not depend on the thread count.
// REQUIRES: num_q_heads % num_kv_heads == 0 and num_q_heads / num_kv_heads <= 256;
//   num_kv_heads == kv.num_kv_heads; head_dim == kv.head_dim; kv_lens[s] <=
//   max_blocks_per_seq * tokens_per_block; workspace holds PagedAttentionWorkspaceBytes(p)
//   bytes, float-aligned (may be nullptr when that is 0); out/lse do not alias q or the pool.
// pool may be nullptr (runs on the calling thread). Allocates nothing.
void PagedAttentionCpu(const PagedAttentionParams& p, void* workspace, ThreadPool* pool);

}  // namespace helix::kernels

#endif  // HELIX_KERNELS_ATTENTION_H_
