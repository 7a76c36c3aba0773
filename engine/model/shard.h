// Cuts a whole model's float32 weights down to one Helix rank's slices (before any 16-bit
// conversion). Pure function of its inputs; thread-safe.
#pragma once

#include "engine/model/weights.h"
#include "engine/parallel/helix_layout.h"

namespace helix {

// Sizes of what a rank holds and computes.
struct ShardDims {
  int64_t q_heads;             // H / TP: query heads projected and attended locally
  int64_t kv_heads;            // K / TP
  int64_t head_begin;          // first of the H / N heads this rank combines and projects with Wo
  int64_t out_heads;           // H / N
  int64_t ffn_begin, ffn_end;  // rows of gate/up, columns of down (dense FFN layers)
  int64_t vocab_begin, vocab_end;  // classifier rows
  // MoE layers: the shared experts' slice (like the dense FFN) and this rank's routed experts
  // (expert parallelism: every rank holds whole experts [expert_begin, expert_end)).
  int64_t shared_begin, shared_end;
  int64_t expert_begin, expert_end;
};
ShardDims ComputeShardDims(const ModelConfig& c, const parallel::HelixLayout& l);

// In place: wq/wk/wv (and biases) keep this TP shard's heads; wo keeps the columns of heads
// [head_begin, head_begin + out_heads); w1/w3 keep rows, w2 columns, of the FFN slice; the
// classifier keeps its vocab rows (a tied one becomes a copy of the embedding's rows). The
// embedding and the norms stay whole. MLA: q_proj/q_b_proj keep the TP shard's heads, the
// latent projections (q_a, kv_a) stay whole (every rank of a CP group computes the latent it
// may own), kv_b_proj becomes wuk_t (the TP shard's heads, transposed for the absorption) and
// wuv (the combined heads). MoE: the shared experts are sliced like the FFN, the routed experts
// are dealt out whole, the gate stays whole. REQUIRES: ValidateHelixLayout passed; matrices
// float32. Runs on a single rank too (the MLA split).
void ShardWeights(const ModelConfig& c, const parallel::HelixLayout& l, ModelWeights* w);

}  // namespace helix
