// Forward pass of a Llama-family decoder (RMSNorm, RoPE, GQA attention over the paged KV
// cache, SwiGLU FFN) or a DeepSeek V2/V3 one (MLA attention over a latent KV cache in the
// absorbed form, MoE FFN) on one rank: the whole model, or one Helix rank's shard of it (see
// ../shared/DESIGN.md §3). Not thread-safe: the rank's engine thread runs it; scratch buffers
// are reused between steps.
#pragma once

#include <map>
#include <memory>
#include <string>
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

// How one logits row's token is picked on a device backend (Backend::SampleTokens).
struct DeviceSampleRow {
  bool on_device = false;  // false: the engine samples this row on the host from the logits
  float temperature = 0;   // 0: greedy
  int32_t top_k = 0;
  float top_p = 1.0f, min_p = 0.0f;
  double u = 0;  // the request's uniform draw (Sampler::DrawForDevice)
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
  int64_t graph_captures = 0, graph_replays = 0;  // decode steps captured / run as graphs
};

// A grow-only scratch array in a backend's memory (device memory, or with host = true the
// backend's staging host memory). Growing drops the contents; shrinking keeps the allocation.
template <typename T, bool kHost = false>
class BackendArray {
 public:
  BackendArray() = default;
  ~BackendArray() { Release(); }
  BackendArray(const BackendArray&) = delete;
  BackendArray& operator=(const BackendArray&) = delete;

  // `moves` (optional) is incremented whenever the array moves to new memory.
  void Bind(Backend* backend, uint64_t* moves = nullptr) {
    backend_ = backend;
    moves_ = moves;
  }
  // Growth at least doubles the capacity (for small arrays whose size creeps up with the
  // context, e.g. the block tables: each move drops every captured graph).
  void set_geometric() { geometric_ = true; }
  // Sets the size to n elements; ResourceExhausted naming the bytes when the backend is out
  // of memory.
  Status Resize(int64_t n) {
    if (n > cap_) {
      const int64_t cap = geometric_ ? std::max(n, 2 * cap_) : n;
      Release();
      const size_t bytes = static_cast<size_t>(cap) * sizeof(T);
      p_ = static_cast<T*>(kHost ? backend_->AllocHost(bytes) : backend_->Alloc(bytes));
      if (p_ == nullptr) {
        return ResourceExhausted(std::string(backend_->name()) + " backend: cannot allocate " +
                                 std::to_string(bytes) + " bytes of scratch memory");
      }
      cap_ = cap;
      if (moves_ != nullptr) ++*moves_;
    }
    n_ = n;
    return Status::Ok();
  }
  T* data() { return p_; }
  const T* data() const { return p_; }
  int64_t size() const { return n_; }

 private:
  void Release() {
    if (p_ == nullptr) return;
    if (kHost) {
      backend_->FreeHost(p_);
    } else {
      backend_->Free(p_);
    }
    p_ = nullptr;
    cap_ = n_ = 0;
  }
  Backend* backend_ = nullptr;
  uint64_t* moves_ = nullptr;
  T* p_ = nullptr;
  int64_t n_ = 0, cap_ = 0;
  bool geometric_ = false;
};

class LlamaModel {
 public:
  // `model` holds this rank's shard (ShardWeights already applied); `kv` describes the rank's
  // KV pool (its KV heads only), which the model writes to and attends over.
  // On a backend without host memory (CUDA) the weights are copied to it here (Create).
  static StatusOr<std::unique_ptr<LlamaModel>> Create(std::unique_ptr<LoadedModel> model,
                                                      Backend* backend, kernels::KvPoolView kv,
                                                      ParallelContext parallel = {});
  // REQUIRES: backend->host_memory() (the CPU backend); use Create otherwise.
  LlamaModel(std::unique_ptr<LoadedModel> model, Backend* backend, kernels::KvPoolView kv,
             ParallelContext parallel = {});
  ~LlamaModel();

  const ModelConfig& config() const { return model_->config; }

  // Bytes a device backend holds for these weights (what UploadWeights copies).
  static int64_t DeviceWeightBytes(const ModelWeights& w);

  // Runs the batch on this rank; every rank of the instance must run the same batch (its own
  // kv_block / block tables) in lockstep. Fills *logits with [logits_rows.size()][vocab] floats
  // (logits may be nullptr where the caller needs none: a worker rank, whose leader samples).
  // Errors come from the collectives (a dead or stalled peer) and from the backend (a CUDA
  // error, out of device memory).
  //
  // Device sampling: with `sample_rows` (one per logits row) and `tokens`, a device backend on
  // one rank, or on ranks whose collectives take device buffers (NCCL: the logits are gathered
  // on the device), picks the tokens of the rows marked on_device itself; (*tokens)[r] is that
  // token or -1 (the host samples the row), and *logits is filled only when some row is left to
  // the host. Anywhere else (CPU backend, Gloo between device ranks) *tokens is all -1 and
  // *logits is filled.
  Status Forward(const ForwardBatch& batch, std::vector<float>* logits,
                 const std::vector<DeviceSampleRow>* sample_rows = nullptr,
                 std::vector<int32_t>* tokens = nullptr);

  // Decode steps as graphs (Backend::SupportsGraphs, one rank, no MoE layer, every row sampled on
  // the device): each (batch, block-table width) bucket runs eagerly once, is captured the
  // second time and replayed after; batches are padded to the bucket (a power of two). A failed
  // capture turns graphs off for good (logged) and the step runs eagerly.
  void set_use_graphs(bool on) { use_graphs_ = on; }

  const ForwardTimings& timings() const { return timings_; }
  void ResetTimings() { timings_ = {}; }

 private:
  // att_ [T][q_heads][dim] + lse_ -> att_ [T][out_heads][dim]: all-to-all inside the CP group
  // and the exact (O, LSE) merge. dim = head_dim (GQA) or kv_lora_rank (MLA, latent space).
  Status CombineAttention(int64_t T, int64_t dim);
  // Copies every tensor the forward pass reads to backend memory (device_), and the MLA RoPE
  // table; no-op on a host-memory backend.
  Status UploadWeights();
  // The backend copy of a host tensor (itself on a host-memory backend).
  const void* Dev(const void* host) const;
  const float* Dev(const std::vector<float>& v) const {
    return v.empty() ? nullptr : static_cast<const float*>(Dev(v.data()));
  }
  const void* Dev(const WeightMatrix& m) const { return Dev(m.data()); }
  // The batch's index arrays in backend memory (meta_), one copy on a device backend.
  struct BatchMeta {
    const int32_t *tokens, *positions, *token_seq, *kv_block, *kv_slot;
    const int32_t *block_tables, *block_first_pos, *kv_lens, *logits_rows;
  };
  // copy = false leaves the copy to CopyBatch (inside a graph).
  StatusOr<BatchMeta> UploadBatch(const ForwardBatch& b, bool copy);
  void CopyBatch();
  // Embedding through the final norm of the rows that sample (xb_ [R][dim]).
  Status RunLayers(const ForwardBatch& b, const BatchMeta& m);
  // Device sampling in pieces: the inputs into pinned staging (host), the queued copy + kernels +
  // copy back (false when the backend does not sample), the tokens of the first n of R rows
  // after a wait.
  Status PackSample(const std::vector<DeviceSampleRow>& rows, int64_t R);
  bool SampleQueued(const float* logits, int64_t R, int64_t V, bool greedy, bool sampled);
  void ReadSample(const std::vector<DeviceSampleRow>& rows, int64_t R, int64_t n,
                  std::vector<int32_t>* tokens) const;
  bool GraphEligible(const ForwardBatch& b, const std::vector<DeviceSampleRow>* rows,
                     const std::vector<int32_t>* tokens) const;
  Status ForwardGraph(const ForwardBatch& b, const std::vector<DeviceSampleRow>& rows,
                      std::vector<int32_t>* tokens);
  // MLA attention of layer l: xb_ (normed hidden) -> xb_ = this rank's o_proj partial.
  // Adds its time to timings_.
  Status MlaAttention(const ForwardBatch& b, const BatchMeta& m, int64_t l);
  // MoE FFN of layer l: xb_ (normed hidden) -> xb_ = this rank's partial (its experts and its
  // slice of the shared experts). The routing runs on the host (a device backend copies the
  // gate's logits back: one wait per MoE layer).
  Status MoeFfn(int64_t l, int64_t T);
  // The sum over the world of each rank's `n` floats at p (backend memory), in place; staged
  // through host memory on a device backend (Gloo works on host buffers).
  Status AllReduceSum(float* p, int64_t n);
  // The first failure of the collectives queued on the stream (NCCL queues them and returns);
  // call after waiting for the stream.
  Status CollectivesOk();
  // Device sampling of `logits` [R][V] (backend memory) into *tokens; returns whether some row
  // still needs the logits on the host.
  StatusOr<bool> SampleOnDevice(const std::vector<DeviceSampleRow>& rows, const float* logits,
                                int64_t R, int64_t V, std::vector<int32_t>* tokens);

  std::unique_ptr<LoadedModel> model_;
  Backend* backend_;
  kernels::KvPoolView kv_;
  ParallelContext par_;
  ShardDims dims_;
  ForwardTimings timings_;
  bool host_;  // backend_->host_memory()
  // Graphs: per (batch bucket, block-table width) bucket; scratch_moves_ counts reallocations of
  // the scratch arrays (a graph captured before one is stale).
  struct GraphState {
    bool warmed = false;
    int graph = -1;
    uint64_t moves = 0;
  };
  bool use_graphs_ = false, graph_failed_ = false;
  std::map<std::pair<int64_t, int64_t>, GraphState> graphs_;
  uint64_t scratch_moves_ = 0;
  ForwardBatch padded_;
  std::vector<DeviceSampleRow> padded_rows_;
  std::map<const void*, void*> device_;  // host tensor -> its backend copy (device backends)
  std::vector<void*> allocs_;            // the backend allocations behind device_
  // Per layer: wq, wk, wv (w1, w3) are back to back in one allocation, so one GEMM computes
  // q|k|v (gate|up) per token (device backends with the fused RoPE + K/V write).
  std::vector<char> packed_qkv_, packed_ffn_;
  // The backend runs RoPE and the K/V write as one op for this model's layout (and packs).
  bool rope_kv_fused_ = false;
  BackendArray<float> qkv_, h13_;
  // 16-bit copies of GEMM inputs, written by the op that makes the input (RMSNorm into
  // xb_lowp_, SiLU·mul into h1_lowp_) for the GEMMs with 16-bit weights that read it, which
  // then convert nothing (device backends: lowp_inputs_).
  bool lowp_inputs_ = false;
  BackendArray<uint16_t> xb_lowp_, h1_lowp_;
  // Partial sums of squares of x_'s rows, left by the product that added into it for the norm
  // of the product that reads it next (Backend::NormSumParts; [rows][parts]).
  BackendArray<double> norm_sums_;
  // The 16-bit type the GEMMs of `rows` rows reading layer l's attention (FFN) input, the
  // down projection's, or the classifier's take their input in when it is written beside it;
  // kF32 = not written (fp32 weights, a host backend, mixed types, MLA or MoE layers, or a
  // backend that would not read it for so many rows: Backend::GemmReadsLowpX).
  kernels::DType AttnInputLowp(int64_t l, int64_t rows) const;
  kernels::DType FfnInputLowp(int64_t l, int64_t rows) const;
  kernels::DType DownInputLowp(int64_t l, int64_t rows) const;
  kernels::DType ClassifierInputLowp(int64_t rows) const;
  // `lowp` where a backend GEMM of `rows` rows of k reads a 16-bit x of that type, else kF32.
  kernels::DType LowpIfRead(kernels::DType lowp, int64_t rows, int64_t k) const;
  // The classifier GEMM of the final norm's rows xb_ [rows][dim] into out [rows][n] (this
  // rank's n vocabulary rows), reading the norm's 16-bit copy where it wrote one.
  void ClassifierGemm(float* out, int64_t rows, int64_t n);
  // Scratch in backend memory, grown as needed.
  BackendArray<float> x_, xb_, q_, k_, v_, att_, lse_, h1_, h3_, rows_, parts_o_, parts_lse_;
  BackendArray<float> logits_dev_, send_, recv_;
  BackendArray<float> full_logits_;  // device collectives: the gathered logits [R][V]
  BackendArray<uint8_t> workspace_;
  BackendArray<int32_t> meta_;
  int64_t meta_elems_ = 0;
  BackendArray<uint8_t> sample_dev_;
  BackendArray<uint8_t, true> sample_host_;
  // Host scratch: collectives' buffers, and the staging of a device backend.
  BackendArray<int32_t, true> meta_host_;
  BackendArray<float, true> stage_a_, stage_b_;
  std::vector<float> local_logits_, gathered_;
  // MLA / MoE.
  std::vector<double> inv_freq_;       // RoPE table (yarn), host
  BackendArray<double> inv_freq_dev_;  // the same in backend memory
  double rope_mscale_ = 1.0;
  BackendArray<float> cq_, kva_, ckv_, qfull_, ov_;
  BackendArray<float> gate_logits_, moe_out_, xe_, ye_, he1_, he3_;
  BackendArray<int32_t> expert_dev_;         // the routed pairs' rows, then their weights
  BackendArray<int32_t, true> expert_host_;  // (the weights as float bits)
  std::vector<float> gate_host_, route_w_;
  std::vector<int32_t> route_e_, expert_start_, expert_fill_;
};

}  // namespace helix
