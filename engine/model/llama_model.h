// Forward pass of a Llama-family decoder (RMSNorm, RoPE, GQA attention over the paged KV
// cache, SwiGLU FFN) or a DeepSeek V2/V3 one (MLA attention over a latent KV cache in the
// absorbed form, MoE FFN) on one rank: the whole model, or one Helix rank's shard of it (see
// ../shared/DESIGN.md §3). Not thread-safe: the rank's engine thread runs it; scratch buffers
// are reused between steps.
#pragma once

#include <memory>
#include <vector>

#include "engine/backend/backend.h"
#include "engine/common/status.h"
#include "engine/model/forward_batch.h"
#include "engine/model/shard.h"
#include "engine/model/weights.h"
#include "engine/parallel/communicator.h"
#include "engine/parallel/helix_layout.h"

namespace helix {

// A rank's place in a Helix instance and its communicators (not owned). Single rank: the
// defaults, no communicators.
struct ParallelContext {
  parallel::HelixLayout layout;
  parallel::Communicator* world = nullptr;  // all N ranks: all-reduces, logits gather
  parallel::Communicator* cp = nullptr;     // this rank's CP group: the attention all-to-all
  // Benchmarks only: a barrier before each collective, timed as `wait`, so that a collective's
  // time is its own and not the wait for a slower peer.
  bool barrier_before_collectives = false;
};

// Wall time spent in each part of Forward, summed over calls (seconds).
struct ForwardTimings {
  double gemm = 0;        // projections and FFN (SiLU·mul included)
  double attention = 0;   // paged attention over this rank's KV
  double combine = 0;     // CP all-to-all + (O, LSE) merge
  double all_reduce = 0;  // the two row-parallel all-reduces per layer
  double logits = 0;      // final norm, classifier, vocab gather
  double other = 0;       // embedding, norms, RoPE, KV writes, residual adds
  double wait = 0;        // with ParallelContext::barrier_before_collectives: skew between ranks
  int64_t calls = 0;
};

class LlamaModel {
 public:
  // `model` holds this rank's shard (ShardWeights already applied); `kv` describes the rank's
  // KV pool (its KV heads only), which the model writes to and attends over.
  LlamaModel(std::unique_ptr<LoadedModel> model, Backend* backend, kernels::KvPoolView kv,
             ParallelContext parallel = {});

  const ModelConfig& config() const { return model_->config; }

  // Runs the batch on this rank; every rank of the instance must run the same batch (its own
  // kv_block / block tables) in lockstep. Fills *logits with [logits_rows.size()][vocab] floats
  // on every rank. Errors come only from the collectives (a dead or stalled peer).
  Status Forward(const ForwardBatch& batch, std::vector<float>* logits);

  const ForwardTimings& timings() const { return timings_; }
  void ResetTimings() { timings_ = {}; }

 private:
  // att_ [T][q_heads][dim] + lse_ -> att_ [T][out_heads][dim]: all-to-all inside the CP group
  // and the exact (O, LSE) merge. dim = head_dim (GQA) or kv_lora_rank (MLA, latent space).
  Status CombineAttention(int64_t T, int64_t dim);
  // MLA attention of layer l: xb_ (normed hidden) -> xb_ = this rank's o_proj partial.
  // Adds its time to timings_.
  Status MlaAttention(const ForwardBatch& b, int64_t l);
  // MoE FFN of layer l: xb_ (normed hidden) -> xb_ = this rank's partial (its experts and its
  // slice of the shared experts).
  void MoeFfn(int64_t l, int64_t T);

  std::unique_ptr<LoadedModel> model_;
  Backend* backend_;
  kernels::KvPoolView kv_;
  ParallelContext par_;
  ShardDims dims_;
  ForwardTimings timings_;
  // Scratch, grown as needed.
  std::vector<float> x_, xb_, q_, k_, v_, att_, lse_, h1_, h3_, rows_;
  std::vector<float> send_, recv_, parts_o_, parts_lse_, local_logits_, gathered_;
  std::vector<uint8_t> workspace_;
  // MLA / MoE.
  std::vector<double> inv_freq_;  // RoPE table (yarn)
  double rope_mscale_ = 1.0;
  std::vector<float> cq_, kva_, ckv_, qfull_, tmp_a_, tmp_b_, ov_;
  std::vector<float> gate_logits_, route_w_, moe_out_, xe_, ye_, he1_, he3_;
  std::vector<int32_t> route_e_, expert_start_, expert_fill_, expert_rows_;
  std::vector<float> expert_w_;
};

}  // namespace helix
