// The single-rank engine: owns the model, the KV block pool, the scheduler state and every
// request. Submit/Cancel are thread-safe (they queue work); Step and everything else run on
// the one engine thread, which also calls the request sinks.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "engine/backend/backend.h"
#include "engine/common/status.h"
#include "engine/kv_cache/block_pool.h"
#include "engine/kv_cache/sequence_kv.h"
#include "engine/model/llama_model.h"
#include "engine/parallel/communicator.h"
#include "engine/parallel/step_plan.h"
#include "engine/parallel/tcp_store.h"
#include "engine/request/request.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/transfer/kv_handle.h"
#include "engine/transfer/ucx_transfer.h"
#include "kernels/dtype.h"

namespace helix {

struct EngineOptions {
  std::string model_path;
  std::string tokenizer_path;  // llama2.c models need one
  int num_threads = 0;         // CPU backend; 0 = all cores
  // "cpu" or "cuda" (a CUDA build only). The CUDA backend runs rank r on device cuda_device,
  // or r modulo the visible devices when cuda_device < 0 (ranks share a GPU when there are
  // fewer GPUs than ranks; their collectives go through Gloo on the host).
  std::string backend = "cpu";
  int cuda_device = -1;
  // The model's collectives between ranks of the cuda backend: "nccl" (device buffers; one GPU
  // per rank), "gloo" (staged through host memory; ranks may share a GPU) or "auto" (nccl when
  // this build has NCCL and no two ranks share a GPU, by host name and GPU UUID). The CPU
  // backend always uses Gloo.
  std::string collectives = "auto";
  // Tests on the CPU emulation of CUDA (a device backend whose memory the host can address,
  // Backend::host_addressable): the model's collectives take device buffers as NCCL's do
  // (parallel::DeviceMemoryViewForTesting over the Gloo communicators), so the NCCL code paths
  // (no host staging, logits gathered and sampled on the device) run without NCCL or a GPU.
  // Several ranks only (one has no collectives); refused on any other backend.
  bool device_collectives_for_testing = false;
  // The cuda backend on one rank: run decode steps as CUDA graphs (LlamaModel::set_use_graphs).
  // On by default since they passed the engine tests on an H100 and ran faster there.
  bool cuda_graphs = true;
  // The cuda backend: decode GEMMs with 16-bit weights as a GEMV kernel instead of cuBLAS, and
  // the gate|up GEMM fused with its SiLU·mul (CudaBackendOptions::decode_gemv; on by default
  // since it ran faster on an H100; decode_bench --gemv 0 measures without it).
  bool cuda_decode_gemv = true;
  // The cuda backend: programmatic dependent launch of the decode-step kernels
  // (CudaBackendOptions::programmatic_launch; decode_bench --pdl 0 measures without it).
  bool cuda_programmatic_launch = true;
  // The cuda backend: fold RMSNorms (and the residual adds before them) into the decode GEMV
  // where that pays (CudaBackendOptions::fold_norms; decode_bench --fold 0 measures without).
  bool cuda_fold_norms = true;
  // The cuda backend: decode attention's math on the tensor cores for 16-bit KV
  // (CudaBackendOptions::attention_tensor_cores; decode_bench --attn-mma 0 measures without).
  bool cuda_attention_tensor_cores = true;
  // The cuda backend: greedy argmax chunked over several thread blocks per row
  // (CudaBackendOptions::split_argmax; decode_bench --split-argmax 1). Off by default.
  bool cuda_split_argmax = false;
  // The cuda backend: each RMSNorm taken from partial sums of squares left by the product
  // before it (CudaBackendOptions::norm_sums; decode_bench --norm-sums 1). Off by default.
  bool cuda_norm_sums = false;
  // The cuda backend: RoPE and the K/V write in the q|k|v GEMV's epilogue
  // (CudaBackendOptions::gemv_rope_kv; decode_bench --gemv-rope 1). Off by default.
  bool cuda_gemv_rope_kv = false;
  // The cuda backend: bytes of the next products' weights decode attention prefetches into L2
  // (CudaBackendOptions::l2_prefetch_bytes; decode_bench --l2-prefetch-mb N). 0 (off) by default.
  int64_t cuda_l2_prefetch_bytes = 0;
  // The cuda backend: decode attention's first KV copies issued before it waits for the kernel
  // before it (CudaBackendOptions::attention_early_kv; decode_bench --attn-early-kv 1). Off by
  // default.
  bool cuda_attention_early_kv = false;
  // The cuda backend: the shortest split-KV chunk of decode attention, in tokens
  // (CudaBackendOptions::attention_min_chunk_tokens; decode_bench --attn-min-chunk N); 0: 128.
  int64_t cuda_attention_min_chunk_tokens = 0;
  // Tests: builds the backend instead of `backend` (e.g. the CUDA backend on the emulator).
  std::function<StatusOr<std::unique_ptr<Backend>>()> backend_factory;
  int64_t tokens_per_block = 32;
  kernels::DType kv_dtype = kernels::DType::kF32;
  // Precision of the weight matrices in memory (norms, biases and the embedding gather stay
  // float32); nullopt ("auto") keeps the checkpoint's (LoadedModel::stored_dtype).
  std::optional<kernels::DType> weight_dtype;
  std::optional<int64_t> kv_max_tokens;           // pool size in tokens
  std::optional<double> kv_free_memory_fraction;  // of available memory; smaller one wins
  int64_t max_batch_size = 64;
  int64_t max_num_tokens = 8192;  // tokens in one forward pass
  // How admission reserves KV (TensorRT-LLM's capacity_scheduler_policy). false
  // (GUARANTEED_NO_EVICT): every block a request can need (prompt + max_tokens - 1) at
  // admission, so nothing is ever preempted. true (MAX_UTILIZATION): a request is admitted with
  // its prompt's blocks and takes more as it decodes; when the pool runs out, the most recently
  // admitted such request gives its blocks back and waits at the head of the queue, and its
  // KV is recomputed (its prompt and the tokens it generated, in one prefill) when it is
  // admitted again, as vLLM's preemption by recompute does. Requests whose recompute would not
  // fit one forward pass (prompt + max_tokens - 1 > max_num_tokens) and retained context-server
  // requests still reserve everything at admission.
  bool kv_preemption = false;
  int64_t max_seq_len = 0;  // 0 = the model's maximum

  // Helix: this process is rank `rank` of tensor_parallel x context_parallel ranks. Every rank
  // creates an Engine with the same options but `rank`; rank 0 (the leader) schedules,
  // samples and serves the rendezvous store at leader_host:leader_port, the others call
  // RunWorker. KV pool sizes are per rank (max_tokens), and the leader's count is used by all.
  int tensor_parallel = 1;
  int context_parallel = 1;
  int rank = 0;
  std::string leader_host = "127.0.0.1";
  int leader_port = 0;
  // The leader's rendezvous store when it already listens (a leader that spawns its ranks
  // starts it first, so they never find the port unbound); null = the leader starts one.
  std::shared_ptr<parallel::TcpStoreServer> store_server;
  std::string group_token;  // every rank's, checked by the store (RankAssignment::group_token)
  // This rank's address for the Gloo pairs; empty: the local address that reaches the leader
  // (127.0.0.1 for a leader on loopback), so ranks on several hosts find each other.
  std::string bind_host;
  std::chrono::milliseconds comm_timeout{30000};  // rendezvous and every collective
  // How long a worker rank waits for the leader's next step. A leader that serves (helix-gen
  // serve) sends an empty one while idle (Heartbeat), so its workers set this short and notice a
  // leader whose host vanished without closing the connections.
  std::chrono::milliseconds worker_idle_timeout{std::chrono::hours(24)};

  // Disaggregated serving (DESIGN.md §5). A context server (export_kv; one rank) registers
  // its pool for UCX reads and keeps each retain_kv request's blocks after it ends, until
  // ReleaseRetained or until kv_lease passes.
  bool export_kv = false;
  std::string server_id;  // the context server's KvSource::server_id
  std::chrono::milliseconds kv_lease{30000};
  // The context server's UCX listener, where generation ranks connect to pull: bound on
  // kv_listen_host (a name or address; "0.0.0.0" for every interface) and kv_listen_port (0: a
  // free one), named in handles by the address kv_advertise_host (empty: kv_listen_host)
  // resolves to in the listener's family, and that port. An empty kv_listen_host: no
  // listener, and ranks connect to the worker address (which UCX 1.13.1 cannot survive a rank
  // dying on in its first handshake: docs/architecture.md, Known problems).
  std::string kv_listen_host = "127.0.0.1";
  std::string kv_advertise_host;
  int kv_listen_port = 0;
  // A context server on a device backend hands retained KV out of pinned host memory (UCX
  // reads host memory): tokens it holds, rounded up to blocks; 0 = as many as the KV pool.
  // A retained request's device blocks are freed as soon as they are copied there.
  int64_t kv_export_buffer_tokens = 0;
  // Generation side on a device backend: the pinned staging one pull goes through, in tokens
  // per rank (rounded up to blocks; a ring when the rank's share is larger: a block's slot is
  // fetched into again once its upload is done); 0 = 256 MiB worth.
  int64_t kv_staging_tokens = 0;
  // Generation side: each rank's deadline for pulling one request's KV.
  std::chrono::milliseconds kv_transfer_timeout{30000};
};

// What a context server publishes for its pool.
// The local address this host uses to reach `host` (a rank's address for the others, when
// not set: ranks on one host get 127.0.0.1 for a leader on loopback).
StatusOr<std::string> LocalAddressToward(const std::string& host);

struct KvExport {
  std::string server_id, worker_address, rkey;
  std::string listener_address;  // host:port of the UCX listener (generation ranks connect here)
  transfer::KvLayout layout;
  uint64_t region_base = 0, region_bytes = 0;  // the exported memory (blocks from its start)
};

struct DisaggStats {
  int64_t retained_requests = 0;  // context server: handles not yet released
  uint64_t leases_expired = 0;
  // Context server on a device backend: the export buffer's blocks (0 without one).
  int64_t export_blocks_total = 0, export_blocks_free = 0;
  int64_t ucx_connections = 0;  // context server: open connections to its UCX listener
  int64_t transferring = 0;     // generation side: requests whose KV is being pulled
  uint64_t transfers_done = 0, transfers_failed = 0, transfers_cancelled = 0;
};

// Requests by state (vLLM's num_requests_running / num_requests_waiting): running = in the
// forward batch; waiting = submitted and not in it yet (queued for admission, or admitted and
// waiting for their KV: pulled from a context server, its checks or confirmation).
struct RequestCounts {
  int64_t running = 0;
  int64_t waiting = 0;
};

struct KvStats {
  int64_t total_blocks = 0;
  int64_t free_blocks = 0;
  int64_t block_bytes = 0;
  int64_t tokens_per_block = 0;
  uint64_t preemptions = 0;  // requests preempted (kv_preemption), since start
};

class Engine {
 public:
  static StatusOr<std::unique_ptr<Engine>> Create(const EngineOptions& options);
  ~Engine();

  const ModelConfig& model_config() const { return model_->config(); }
  // The forward pass's time split and graph counters on this rank (engine thread).
  const ForwardTimings& model_timings() const { return model_->timings(); }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  int64_t max_seq_len() const { return max_seq_len_; }
  // Requests preempted so far (kv_preemption); any thread.
  uint64_t preemptions() const { return preemptions_.load(); }
  bool kv_preemption() const { return options_.kv_preemption; }
  int64_t max_num_tokens() const { return options_.max_num_tokens; }
  // Hex digest (FNV-1a 64) of what two servers must share to exchange KV and tokens: the
  // architecture and shapes, weight and KV dtypes, and the tokenizer's vocabulary.
  const std::string& model_fingerprint() const { return fingerprint_; }

  // Thread-safe. Validates the request (bad input and requests that can never fit are
  // refused here with INVALID_ARGUMENT) and queues it. Returns the request id.
  StatusOr<std::string> Submit(GenerateRequest request);
  // Thread-safe. The request ends with finish reason "cancelled" at the next step.
  void Cancel(const std::string& request_id);

  // Engine thread: one scheduling step (admit, forward, sample, emit). Returns whether any
  // work was done.
  bool Step();
  // Engine thread: true while requests are queued or running, or a verdict (check_kv_source,
  // confirm_kv) has arrived. Not while requests only wait for verdicts: a caller that waits
  // for those may sleep until it is woken (the verdict callbacks' owner wakes it).
  bool HasWork();
  // Engine thread: requests waiting for a check_kv_source or confirm_kv verdict.
  bool AwaitingVerdicts() const { return !checking_.empty() || !confirming_.empty(); }
  // Leader, engine thread: broadcasts an empty step when no step went out for `interval`, so
  // that the worker ranks' wait for the next one (worker_idle_timeout) stays bounded while the
  // leader idles. A failure (a rank gone) breaks the instance as a failed step does, and is
  // returned. Does nothing on a single rank or a broken instance.
  Status Heartbeat(std::chrono::milliseconds interval);
  // Engine thread: fails every queued and running request with `error` (e.g. shutdown).
  void AbortAll(const Status& error);
  // Engine thread, when no Step will run any more (a server's loop has ended): AbortAll, and
  // every later Submit is refused with `error`, so that a request a server admitted just before
  // it stopped is answered at once instead of waiting for a step that never comes.
  void Close(const Status& error);
  // Engine thread (or before it runs): free_blocks reads the pool the engine thread changes.
  KvStats kv_stats() const;

  // Context server: frees a retained request's blocks (at the next step). Thread-safe; false
  // when the id is not retained (never was, already released, or its lease expired).
  bool ReleaseRetained(const std::string& request_id);
  // ReleaseRetained for a caller in another process (a Release RPC): frees the KV only when
  // `lease_token` is the lease's secret (TokenEvent::kv_lease_token, a random 128-bit value in
  // the handle) and `block_addresses` are its blocks, so that knowing or guessing a request id
  // is not enough to free someone else's KV, or to have it read through a handle that names
  // that id beside other blocks. NotFound when the id holds no KV (never did, released, or
  // expired); PermissionDenied naming what does not match (nothing is freed then).
  Status ReleaseLease(const std::string& request_id, const std::string& lease_token,
                      const std::vector<uint64_t>& block_addresses);
  // Restarts the lease (kv_lease from now) for a caller that shows what ReleaseLease needs;
  // the same errors, and nothing is freed. Thread-safe.
  Status RenewLease(const std::string& request_id, const std::string& lease_token,
                    const std::vector<uint64_t>& block_addresses);
  // Engine thread: frees retained KV whose lease has passed. Step calls it; an idle server's
  // loop calls it too.
  void ExpireLeases();
  // Context server: its pool's UCX identity; nullptr unless export_kv.
  const KvExport* kv_export() const { return export_.worker_address.empty() ? nullptr : &export_; }
  // This rank's pool layout (its KV heads).
  const transfer::KvLayout& kv_layout() const { return kv_layout_; }
  DisaggStats disagg_stats() const;
  // Any thread: as of the engine thread's last step (or abort), plus requests submitted since.
  RequestCounts request_counts() const;

  // Workers (rank > 0): run the steps the leader broadcasts until it shuts the instance down
  // (Ok) or a collective fails (the error).
  Status RunWorker();
  bool is_leader() const { return layout_.rank() == 0; }
  const parallel::HelixLayout& layout() const { return layout_; }
  // Thread-safe. Set once a collective failed: the instance is unusable and refuses new
  // requests.
  Status broken() const {
    std::lock_guard<std::mutex> lock(inbox_mu_);
    return broken_;
  }

 private:
  struct Sequence;
  Engine() = default;
  Status Init(const EngineOptions& options);
  void DrainInbox();
  void Admit();
  // Calls the request's on_kv_done once (later calls do nothing).
  static void ReportKvDone(Sequence* s, const Status& outcome);
  Status AgreeOnConfig();
  // Ends a request: frees its blocks and sends the final event. `flush_text` releases text
  // still held back (on stop token or length; not after a stop string or a cancel).
  // `stop_token`: the stop token that ended it, which the final event carries (id and
  // logprobs; no text), as it counts in completion_tokens.
  void Finish(Sequence* s, FinishReason reason, Status error = Status::Ok(),
              bool flush_text = false, const struct SampleResult* stop_token = nullptr);
  void EmitToken(Sequence* s, int32_t token, const struct SampleResult& sample);
  Status ConnectRanks(int64_t* num_blocks);
  // Every rank: frees, reserves and runs one step of the plan; fills logits_ (all ranks).
  Status ExecutePlan(const parallel::StepPlan& plan);
  Status BroadcastPlan(parallel::StepPlan* plan, std::chrono::milliseconds timeout);
  // Marks the instance broken by `error` (a collective failed: a rank is gone), logs `what`,
  // and fails every request with it.
  void BreakInstance(const Status& error, const char* what);
  std::chrono::steady_clock::time_point last_plan_ = std::chrono::steady_clock::now();  // leader
  // Every rank: reserves a transferred sequence's blocks and starts pulling the owned ones.
  // Errors only when the ranks are out of step; a pull that cannot start is a failed pull.
  Status StartTransfer(const parallel::PlanTransfer& t);
  // Every rank: forgets its pull of `uid` (terminal by then).
  void DropPull(uint64_t uid);
  // Every rank: the local state of each polled transfer (transfer::JobState as a byte).
  std::vector<uint8_t> PollTransfers(const std::vector<uint64_t>& uids, std::string* first_error);
  // Every rank: all ranks' states of `uids`, rank-major (a collective on multi-rank instances).
  Status GatherTransferStates(const std::vector<uint64_t>& uids, std::vector<uint8_t>* all,
                              std::string* local_error);
  // Leader: acts on the transfers' states gathered from every rank.
  void ProcessTransferStates(const std::vector<uint64_t>& uids, const std::vector<uint8_t>& all,
                             const std::string& local_error);
  // Keeps a finished context request's blocks under a lease and puts their addresses (as UCX
  // exports them) in *ev; an error leaves nothing retained.
  Status Retain(Sequence* s, struct TokenEvent* ev);
  Status CheckKvSource(const GenerateRequest& r, int64_t prompt_len);

  EngineOptions options_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<BlockPool> pool_;
  // A context server on a device backend: pinned host memory registered with UCX (the export
  // buffer, kv_export_buffer_tokens); a retained request's blocks are copied into free blocks
  // of it for the generation ranks to read, and its device blocks are freed.
  std::unique_ptr<void, std::function<void(void*)>> export_mirror_;
  // Blocks `tokens` positions fill (a prompt's KV, its export-buffer room).
  int64_t BlocksFor(int64_t tokens) const {
    return (tokens + options_.tokens_per_block - 1) / options_.tokens_per_block;
  }
  std::vector<int32_t> export_free_;           // free blocks of the export buffer (engine thread)
  std::atomic<int64_t> export_free_count_{0};  // its size, for disagg_stats on other threads
  // The engine thread's queues' sizes (PublishCounts; DrainInbox adds what it moves into
  // waiting_), for request_counts on other threads. GUARDED_BY(inbox_mu_)
  int64_t running_count_ = 0, waiting_count_ = 0;
  void PublishCounts();
  int64_t export_blocks_ = 0;
  std::unique_ptr<LlamaModel> model_;
  int64_t max_seq_len_ = 0;
  std::string fingerprint_;
  std::vector<int32_t> default_stop_ids_;

  mutable std::mutex inbox_mu_;
  std::vector<std::unique_ptr<Sequence>> inbox_;  // GUARDED_BY(inbox_mu_)
  std::unordered_set<std::string> cancels_;       // GUARDED_BY(inbox_mu_)
  // Ids of the submitted requests not finished yet: Cancel names one request.
  std::unordered_set<std::string> live_ids_;  // GUARDED_BY(inbox_mu_)
  uint64_t next_id_ = 0;                      // GUARDED_BY(inbox_mu_)

  parallel::HelixLayout layout_;
  std::shared_ptr<parallel::TcpStoreServer> store_server_;  // leader of a multi-rank instance
  std::unique_ptr<parallel::TcpStore> store_;
  std::unique_ptr<parallel::Communicator> world_comm_, cp_comm_;
  // The model's collectives over NCCL (device buffers) when the ranks use it; the Gloo ones
  // above still carry the step plans.
  std::unique_ptr<parallel::Communicator> nccl_world_, nccl_cp_;
  // device_collectives_for_testing: the Gloo ones above as device communicators.
  std::unique_ptr<parallel::Communicator> device_world_, device_cp_;
  std::unordered_map<uint64_t, SequenceKv> kv_;  // this rank's blocks of each sequence
  std::vector<uint64_t> pending_release_;        // leader: freed here, announced next step
  uint64_t next_uid_ = 1;
  Status broken_;  // GUARDED_BY(inbox_mu_)
  Status closed_;  // GUARDED_BY(inbox_mu_): Close's error, refusing every later Submit

  std::deque<std::unique_ptr<Sequence>> waiting_;
  std::vector<std::unique_ptr<Sequence>> running_;
  std::vector<std::unique_ptr<Sequence>> transferring_;  // leader: KV being pulled
  std::vector<std::unique_ptr<Sequence>> confirming_;    // leader: pulled, awaiting confirm_kv
  std::vector<std::unique_ptr<Sequence>> checking_;  // leader: admitted, awaiting check_kv_source
  // check_kv_source / confirm_kv verdicts (uid, outcome), taken by the engine thread; shared
  // with the verdict callbacks, which may run after the engine is gone. (A uid is in at most one
  // of checking_ and confirming_.)
  struct KvVerdicts {
    std::mutex mu;
    std::vector<std::pair<uint64_t, Status>> list;  // GUARDED_BY(mu)
  };
  std::shared_ptr<KvVerdicts> kv_verdicts_ = std::make_shared<KvVerdicts>();
  void TakeKvVerdicts();
  bool HasKvVerdicts() const;
  std::vector<float> logits_;
  std::vector<DeviceSampleRow> device_rows_;  // leader, single-rank device backend: per row
  std::vector<int32_t> device_tokens_;        // the tokens the backend picked (-1: host samples)

  // Disaggregation.
  transfer::KvLayout kv_layout_;
  KvExport export_;
  std::unique_ptr<transfer::UcxTransfer> transfer_;  // created on first use (or export)
  struct Pull {
    uint64_t job = 0;   // 0: could not start (error)
    std::string error;  // why it could not start
    // A device backend: UCX writes into pinned host staging (no CUDA transports in Debian's
    // UCX); block i of the staging goes to pool byte offset staged_blocks[i]. Each block is
    // uploaded (Backend::Upload, beside the decode steps) as soon as its gets are done.
    void* staging = nullptr;
    size_t staging_bytes = 0;
    std::vector<int64_t> staged_blocks;
    size_t ring = 0;      // staging slots: block i goes through slot i % ring
    size_t uploaded = 0;  // staged blocks queued for upload so far
    // With fewer slots than blocks: uploads in flight (their mark, their blocks), whose slots
    // go back to the transfer (UcxTransfer::ReleaseGroups) once UploadsDone says so.
    std::deque<std::pair<uint64_t, std::vector<uint32_t>>> uploading;
    std::string copy_error;       // the copy to the device failed
    bool copy_cancelled = false;  // and the pull was cancelled for it
  };
  std::unordered_map<uint64_t, Pull> pulls_;  // this rank's pull of each transferred sequence
  // Uploads the pull's staged blocks whose gets are done; when the pull is `done`, fences the
  // uploads (the decode steps read the blocks after them) and gives the staging back. "" or
  // the error.
  std::string UploadStagedKv(Pull* pull, bool done);
  // Pinned staging buffers kept for reuse (pinning memory is slow, and freeing it waits for the
  // device): a buffer is reusable once the uploads up to its mark are done.
  struct StagingBuffer {
    void* p;
    size_t bytes;
    uint64_t mark;
  };
  std::vector<StagingBuffer> staging_cache_;
  void* AcquireStaging(size_t bytes, size_t* got);
  void ReleaseStaging(void* p, size_t bytes, uint64_t mark);
  // Frees reusable buffers while the cache holds more than `keep_bytes`.
  void TrimStaging(size_t keep_bytes);
  struct Retained {
    uint64_t uid;
    std::vector<int32_t> export_blocks;  // in the export buffer (device backend)
  };
  std::unordered_map<std::string, Retained> retained_;  // context server, engine thread
  // Returns a retained request's export-buffer blocks and device blocks to their pools.
  void FreeRetained(Retained& r);
  struct Lease {
    std::string token;
    std::vector<uint64_t> block_addresses;
    std::chrono::steady_clock::time_point expiry;  // RenewLease moves it
  };
  // The lease of `request_id` when `lease_token` and `block_addresses` are its own; else the
  // error ReleaseLease / RenewLease answer. REQUIRES inbox_mu_.
  StatusOr<Lease*> CheckLeaseLocked(const std::string& request_id, const std::string& lease_token,
                                    const std::vector<uint64_t>& block_addresses);
  std::unordered_map<std::string, Lease> retained_ids_;  // GUARDED_BY(inbox_mu_)
  std::vector<std::string> releases_;                    // GUARDED_BY(inbox_mu_)
  std::unordered_map<std::string, Status> pairing_;      // GUARDED_BY(inbox_mu_): per server
  uint64_t leases_expired_ = 0;                          // GUARDED_BY(inbox_mu_)
  uint64_t transfers_done_ = 0, transfers_failed_ = 0, transfers_cancelled_ = 0;  // ditto
  std::atomic<uint64_t> preemptions_{0};
  // kv_preemption: grows each running sequence's reservation to the positions this step
  // writes, preempting the most recently admitted preemptible sequences when the pool is short.
  // Returns whether any was preempted.
  bool GrowReservations();
  void Preempt(size_t running_index);
};

}  // namespace helix
