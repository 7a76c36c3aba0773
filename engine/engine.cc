#include "engine/engine.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include "engine/backend/cpu/cpu_backend.h"
#ifdef HELIX_HAVE_CUDA_BACKEND
#include "engine/backend/cuda/cuda_backend.h"
#endif
#ifdef HELIX_HAVE_NCCL
#include "engine/parallel/nccl_communicator.h"
#endif
#include "engine/common/log.h"
#include "engine/common/meminfo.h"
#include "engine/kv_cache/sequence_kv.h"
#include "engine/model/model_loader.h"
#include "engine/model/shard.h"
#include "engine/request/stop_matcher.h"
#include "engine/sampler/sampler.h"

namespace helix {

struct Engine::Sequence {
  GenerateRequest req;
  std::vector<int32_t> tokens;  // prompt followed by generated tokens
  int64_t prompt_len = 0;
  int64_t num_computed = 0;  // tokens whose K/V is in the cache
  int64_t generated = 0;
  int64_t reserve_tokens = 0;  // positions its KV can take: prompt + max_tokens - 1
  // kv_preemption: its reservation grows as it decodes, and it may be preempted (recompute).
  bool on_demand = false;
  bool preempted = false;          // has been preempted: its KV is recomputed here, never pulled
  int64_t reserved = 0;            // positions reserved now (leader)
  int64_t announced_reserved = 0;  // the reservation the workers were last told of
  uint64_t uid = 0;                // the sequence's id in step plans and every rank's kv_ map
  bool announced = false;          // the workers have been told to reserve its blocks
  std::unique_ptr<Sampler> sampler;
  std::unique_ptr<IncrementalDetokenizer> detok;
  StopMatcher stop;
  std::string stop_token_text;  // include_stop_str: the text of the stop token that ended it
  bool finished = false;
  // Disaggregated (req.kv_source): the pull's progress, leader only.
  bool transfer_cancel = false;  // stop the pull on every rank (client cancel or a failure)
  bool transfer_cancel_sent = false;
  bool cancelled_by_client = false;
  Status transfer_error;
  // Context server on a device backend, retain_kv: the export-buffer blocks reserved at
  // admission for its prompt's KV (handed to the lease, or returned when it is not retained).
  std::vector<int32_t> export_blocks;

  Sequence(GenerateRequest r, const Tokenizer& tok)
      : req(std::move(r)), stop(req.stop, req.include_stop_str) {
    // Generated text leaves control tokens out (<|im_end|> after ignore_eos, say), as vLLM's
    // default skip_special_tokens does.
    detok = std::make_unique<IncrementalDetokenizer>(
        tok, req.prompt_tokens.empty() ? -1 : req.prompt_tokens.back(), /*skip_control=*/true);
  }
};

namespace {

constexpr size_t kStagingGranule = 4u << 20;       // staging sizes round up to this
constexpr size_t kStagingCacheBytes = 1ull << 30;  // pinned staging kept for reuse, at most

// Bytes of memory the OS reports as available (MemAvailable), or 0 when unknown.
int64_t AvailableMemoryBytes() { return std::max<int64_t>(0, MemInfoBytes({"MemAvailable"})); }

// FNV-1a over the fields that decide what a token id means and how KV is laid out.
std::string Fingerprint(const ModelConfig& c, kernels::DType weights, kernels::DType kv,
                        const Tokenizer& tok) {
  uint64_t h = 1469598103934665603ull;
  const auto mix = [&h](std::string_view s) {
    for (unsigned char ch : s) {
      h ^= ch;
      h *= 1099511628211ull;
    }
    h ^= 0xff;  // field separator
    h *= 1099511628211ull;
  };
  mix(c.architecture);
  for (int64_t v : {c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim,
                    c.vocab_size, static_cast<int64_t>(c.rope_style), int64_t{c.qkv_bias}}) {
    mix(std::to_string(v));
  }
  mix(std::to_string(c.rope_theta));
  mix(std::to_string(c.norm_eps));
  if (c.mla() || c.n_routed_experts > 0) {
    for (int64_t v :
         {c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim,
          c.n_routed_experts, c.n_shared_experts, c.experts_per_token, c.moe_hidden_dim,
          c.first_k_dense_replace, c.moe_layer_freq, static_cast<int64_t>(c.topk_method),
          static_cast<int64_t>(c.scoring), c.n_group, c.topk_group, int64_t{c.norm_topk_prob},
          int64_t{c.yarn.enabled}}) {
      mix(std::to_string(v));
    }
    mix(std::to_string(c.routed_scaling_factor));
    mix(std::to_string(c.yarn.factor) + "/" + std::to_string(c.yarn.mscale) + "/" +
        std::to_string(c.yarn.mscale_all_dim));
  }
  mix(kernels::DTypeName(weights));
  mix(kernels::DTypeName(kv));
  for (int32_t i = 0; i < tok.vocab_size(); ++i) mix(tok.piece(i));
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

}  // namespace

StatusOr<std::unique_ptr<Engine>> Engine::Create(const EngineOptions& options) {
  std::unique_ptr<Engine> e(new Engine());
  RETURN_IF_ERROR(e->Init(options));
  return e;
}

Engine::~Engine() {
  // Tell the workers to exit; a broken instance has nobody left to tell.
  if (is_leader() && world_comm_ != nullptr && broken().ok()) {
    parallel::StepPlan plan;
    plan.shutdown = true;
    Status s = BroadcastPlan(&plan, options_.comm_timeout);
    if (!s.ok()) {
      HELIX_LOG(kWarn) << "engine: shutdown broadcast failed: " << s.ToString();
    }
  }
  if (backend_ != nullptr) {
    for (const StagingBuffer& b : staging_cache_) {
      backend_->UploadsDone(b.mark, /*wait=*/true);
      backend_->FreeHost(b.p);
    }
  }
}

namespace {

constexpr bool HaveNccl() {
#ifdef HELIX_HAVE_NCCL
  return true;
#else
  return false;
#endif
}

StatusOr<std::unique_ptr<Backend>> MakeBackend(const EngineOptions& o) {
  if (o.backend_factory) return o.backend_factory();
  if (o.backend == "cpu") return std::unique_ptr<Backend>(new CpuBackend(o.num_threads));
  if (o.backend == "cuda") {
#ifdef HELIX_HAVE_CUDA_BACKEND
    CudaBackendOptions c;
    c.device = o.cuda_device >= 0 ? o.cuda_device : o.rank;
    c.decode_gemv = o.cuda_decode_gemv;
    c.programmatic_launch = o.cuda_programmatic_launch;
    c.fold_norms = o.cuda_fold_norms;
    c.attention_tensor_cores = o.cuda_attention_tensor_cores;
    c.split_argmax = o.cuda_split_argmax;
    c.norm_sums = o.cuda_norm_sums;
    c.gemv_rope_kv = o.cuda_gemv_rope_kv;
    c.l2_prefetch_bytes = o.cuda_l2_prefetch_bytes;
    c.attention_early_kv = o.cuda_attention_early_kv;
    c.attention_min_chunk_tokens = o.cuda_attention_min_chunk_tokens;
    return CreateCudaBackend(c);
#else
    return Unimplemented(
        "backend \"cuda\": this build has no CUDA backend (no nvcc was found when it was "
        "configured, or HELIX_WITH_CUDA=OFF)");
#endif
  }
  return InvalidArgument("backend \"" + o.backend + "\": expected \"cpu\" or \"cuda\"");
}

// A retained request's lease secret: 128 random bits as 32 hex digits.
std::string NewLeaseToken() {
  std::random_device rd;
  std::string out;
  char buf[9];
  for (int i = 0; i < 4; ++i) {
    std::snprintf(buf, sizeof(buf), "%08x", static_cast<unsigned>(rd()));
    out += buf;
  }
  return out;
}

}  // namespace

Status Engine::Init(const EngineOptions& o) {
  options_ = o;
  if (o.tokens_per_block < 1) {
    return InvalidArgument("tokens_per_block = " + std::to_string(o.tokens_per_block) +
                           ": expected >= 1");
  }
  if (o.max_batch_size < 1 || o.max_num_tokens < 1 || o.max_seq_len < 0) {
    return InvalidArgument("max_batch_size and max_num_tokens must be >= 1, max_seq_len >= 0");
  }
  ASSIGN_OR_RETURN(ModelBundle bundle, LoadModelBundle(o.model_path, o.tokenizer_path));
  std::unique_ptr<LoadedModel> loaded = std::move(bundle.model);
  tokenizer_ = std::move(bundle.tokenizer);
  const ModelConfig cfg = loaded->config;
  RETURN_IF_ERROR(parallel::ValidateHelixLayout(cfg, o.tensor_parallel, o.context_parallel));
  if (o.rank < 0 || o.rank >= o.tensor_parallel * o.context_parallel) {
    return InvalidArgument("rank " + std::to_string(o.rank) + " is outside the instance's " +
                           std::to_string(o.tensor_parallel * o.context_parallel) + " ranks");
  }
  layout_ = parallel::HelixLayout::ForRank(o.rank, o.tensor_parallel, o.context_parallel);
  const ShardDims dims = ComputeShardDims(cfg, layout_);
  ShardWeights(cfg, layout_, &loaded->weights);
  const kernels::DType weight_dtype = o.weight_dtype.value_or(loaded->stored_dtype);
  loaded->weights.ConvertMatricesTo(weight_dtype);
  fingerprint_ = Fingerprint(cfg, weight_dtype, o.kv_dtype, *tokenizer_);
  default_stop_ids_ = tokenizer_->stop_ids();

  max_seq_len_ = o.max_seq_len == 0 ? cfg.max_seq_len : std::min(o.max_seq_len, cfg.max_seq_len);
  if (o.max_seq_len > cfg.max_seq_len) {
    HELIX_LOG(kWarn) << "max_seq_len " << o.max_seq_len << " exceeds the model's "
                     << cfg.max_seq_len << "; using " << max_seq_len_;
  }

  kernels::KvPoolView kv{};
  kv.dtype = o.kv_dtype;
  kv.num_layers = cfg.n_layers;
  kv.num_kv_heads = dims.kv_heads;
  kv.tokens_per_block = o.tokens_per_block;
  kv.head_dim = cfg.head_dim;
  kv.num_planes = cfg.kv_planes();
  const int64_t block_bytes =
      kv.block_elems() * static_cast<int64_t>(kernels::DTypeSize(o.kv_dtype));
  int64_t num_blocks = -1;
  if (o.kv_max_tokens) {
    num_blocks = (*o.kv_max_tokens + o.tokens_per_block - 1) / o.tokens_per_block;
  }
  ASSIGN_OR_RETURN(backend_, MakeBackend(o));
  if (o.kv_free_memory_fraction) {
    // Of the memory the pool lives in: the GPU's free memory less the weights about to be
    // uploaded, or the host's MemAvailable.
    int64_t avail = backend_->FreeMemoryBytes();
    if (avail >= 0) {
      avail -= LlamaModel::DeviceWeightBytes(loaded->weights);
      if (avail <= 0) {
        return ResourceExhausted(std::string("the ") + backend_->name() +
                                 " device has no memory left for a KV pool after the weights");
      }
    } else {
      avail = AvailableMemoryBytes();
      if (avail <= 0) return Internal("cannot read MemAvailable from /proc/meminfo");
    }
    int64_t n =
        static_cast<int64_t>(static_cast<double>(avail) * *o.kv_free_memory_fraction) / block_bytes;
    num_blocks = num_blocks < 0 ? n : std::min(num_blocks, n);
  }
  const bool pool_from_seq_len = num_blocks < 0;
  if (pool_from_seq_len) {
    num_blocks = (o.max_batch_size * max_seq_len_ + o.tokens_per_block - 1) / o.tokens_per_block;
  }
  BlockPool::Memory pool_memory;
  if (!backend_->host_memory()) {
    Backend* be = backend_.get();
    pool_memory.alloc = [be](size_t bytes) { return be->Alloc(bytes); };
    pool_memory.free = [be](void* p) { be->Free(p); };
    pool_memory.what = std::string(be->name()) + " device";
  }
  // The leader's admission decisions stand for every rank: all pools have its size.
  if (!layout_.single()) RETURN_IF_ERROR(ConnectRanks(&num_blocks));
  {
    auto pool = BlockPool::Create(num_blocks, block_bytes, std::move(pool_memory));
    if (!pool.ok() && pool_from_seq_len) {
      // Sized by default for max_batch_size sequences of max_seq_len: a model advertising a
      // huge context asks for far more than any machine has.
      return Status(pool.status().code(),
                    pool.status().message() + " (the default pool holds max_batch_size " +
                        std::to_string(o.max_batch_size) + " x max_seq_len " +
                        std::to_string(max_seq_len_) +
                        " tokens: set kv_cache_config.max_tokens or "
                        "kv_cache_config.free_memory_fraction, or a smaller max_seq_len)");
    }
    if (!pool.ok()) return pool.status();
    pool_ = std::move(*pool);
  }
  kv.base = pool_->base();
  kv_layout_.dtype = o.kv_dtype;
  kv_layout_.tokens_per_block = o.tokens_per_block;
  kv_layout_.num_layers = cfg.n_layers;
  kv_layout_.num_kv_heads = dims.kv_heads;
  kv_layout_.head_dim = cfg.head_dim;
  kv_layout_.num_planes = cfg.kv_planes();
  if (o.export_kv) {
    if (!layout_.single()) {
      return InvalidArgument("a context server (export_kv) runs one rank (TP = CP = 1), not " +
                             layout_.ToString());
    }
    // UCX reads host memory: a device pool is exported through a pinned buffer of its own.
    void* exported = pool_->base();
    uint64_t exported_bytes = static_cast<uint64_t>(num_blocks) * pool_->block_bytes();
    if (!backend_->host_memory()) {
      if (o.kv_export_buffer_tokens < 0) {
        return InvalidArgument("kv_export_buffer_tokens = " +
                               std::to_string(o.kv_export_buffer_tokens) + ": expected >= 0");
      }
      export_blocks_ =
          o.kv_export_buffer_tokens > 0 ? BlocksFor(o.kv_export_buffer_tokens) : num_blocks;
      exported_bytes = static_cast<uint64_t>(export_blocks_) * pool_->block_bytes();
      Backend* be = backend_.get();
      export_mirror_ = std::unique_ptr<void, std::function<void(void*)>>(
          be->AllocHost(exported_bytes), [be](void* p) { be->FreeHost(p); });
      if (export_mirror_ == nullptr) {
        return ResourceExhausted(
            "cannot allocate " + std::to_string(exported_bytes) +
            " bytes of pinned host memory for the KV export buffer (" +
            std::to_string(export_blocks_) +
            " blocks; cache_transceiver_config.max_tokens_in_buffer sets its size)");
      }
      for (int64_t b = export_blocks_ - 1; b >= 0; --b) {
        export_free_.push_back(static_cast<int32_t>(b));
      }
      export_free_count_ = export_blocks_;
      exported = export_mirror_.get();
      if (export_blocks_ * o.tokens_per_block < max_seq_len_) {
        HELIX_LOG(kWarn) << "engine: the KV export buffer holds "
                         << export_blocks_ * o.tokens_per_block << " tokens, less than max_seq_len "
                         << max_seq_len_
                         << ": longer prompts are refused (cache_transceiver_config."
                            "max_tokens_in_buffer)";
      }
    } else if (o.kv_export_buffer_tokens > 0) {
      HELIX_LOG(kWarn) << "engine: kv_export_buffer_tokens is ignored on the " << backend_->name()
                       << " backend: its KV pool is host memory, exported as it is";
    }
    ASSIGN_OR_RETURN(transfer_, transfer::UcxTransfer::Create("context server " + o.server_id,
                                                              exported, exported_bytes,
                                                              o.kv_listen_host, o.kv_listen_port));
    export_.server_id = o.server_id;
    export_.worker_address = transfer_->address();
    if (!o.kv_listen_host.empty()) {
      const std::string& host =
          o.kv_advertise_host.empty() ? o.kv_listen_host : o.kv_advertise_host;
      auto listener = transfer_->ListenerAddressFor(host);
      if (!listener.ok()) {
        return InvalidArgument("the host KV handles name for the UCX listener: " +
                               listener.status().message());
      }
      export_.listener_address = *listener;
    }
    export_.rkey = transfer_->rkey();
    export_.layout = kv_layout_;
    export_.region_base = reinterpret_cast<uint64_t>(exported);
    export_.region_bytes = exported_bytes;
  }

  HELIX_LOG(kInfo) << "engine: model " << o.model_path << " (" << ModelFormatName(bundle.format)
                   << ", " << cfg.architecture << ", " << cfg.n_layers << " layers, dim " << cfg.dim
                   << ", heads " << cfg.n_heads << "/" << cfg.n_kv_heads << " kv, vocab "
                   << cfg.vocab_size << ", weights " << kernels::DTypeName(weight_dtype)
                   << "), KV pool " << num_blocks << " blocks x " << o.tokens_per_block
                   << " tokens (" << (num_blocks * pool_->block_bytes()) / (1 << 20) << " MiB, "
                   << kernels::DTypeName(o.kv_dtype) << "), max_seq_len " << max_seq_len_
                   << ", backend " << backend_->name() << ", " << layout_.ToString();
  ParallelContext par;
  par.layout = layout_;
  par.world = nccl_world_     ? nccl_world_.get()
              : device_world_ ? device_world_.get()
                              : world_comm_.get();
  par.cp = nccl_cp_ ? nccl_cp_.get() : device_cp_ ? device_cp_.get() : cp_comm_.get();
  ASSIGN_OR_RETURN(model_, LlamaModel::Create(std::move(loaded), backend_.get(), kv, par));
  model_->set_use_graphs(o.cuda_graphs);
  return Status::Ok();
}

// Every rank must run the same model and layout, or their shards do not fit together and
// the text is wrong with no error (ranks are started separately under mpirun or srun, each
// from its own command line). Through the store, before any collective (a different world
// size would make Gloo fail with its own message): each rank posts what it runs, and
// compares it with the leader's; the leader compares every rank's.
StatusOr<std::string> LocalAddressToward(const std::string& host) {
  addrinfo hints{};
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* res = nullptr;
  if (int rc = getaddrinfo(host.c_str(), "9", &hints, &res); rc != 0 || res == nullptr) {
    return InvalidArgument("leader host '" + host + "': " + gai_strerror(rc));
  }
  std::string out;
  // A UDP "connect" sends nothing: it only picks the route, whose source address is ours.
  const int fd = socket(res->ai_family, SOCK_DGRAM, 0);
  sockaddr_storage me{};
  socklen_t len = sizeof(me);
  char buf[INET6_ADDRSTRLEN] = {};
  if (fd >= 0 && connect(fd, res->ai_addr, res->ai_addrlen) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&me), &len) == 0) {
    const void* a = me.ss_family == AF_INET6
                        ? static_cast<const void*>(&reinterpret_cast<sockaddr_in6*>(&me)->sin6_addr)
                        : static_cast<const void*>(&reinterpret_cast<sockaddr_in*>(&me)->sin_addr);
    if (inet_ntop(me.ss_family, a, buf, sizeof(buf)) != nullptr) out = buf;
  }
  const int err = errno;
  if (fd >= 0) close(fd);
  freeaddrinfo(res);
  if (out.empty()) {
    return Unavailable("no local address reaches the leader at '" + host +
                       "': " + std::strerror(err));
  }
  return out;
}

Status Engine::AgreeOnConfig() {
  const EngineOptions& o = options_;
  const std::vector<std::pair<std::string, std::string>> mine = {
      {"model fingerprint", fingerprint_},
      {"tensor_parallel_size x context_parallel_size",
       std::to_string(layout_.tp) + " x " + std::to_string(layout_.cp)},
      {"tokens_per_block", std::to_string(o.tokens_per_block)},
      {"kv dtype", kernels::DTypeName(o.kv_dtype)},
      {"max_seq_len", std::to_string(max_seq_len_)},
      {"backend", backend_->name()},
      {"worker_idle_timeout (ms)", std::to_string(o.worker_idle_timeout.count())},
  };
  std::string desc;
  for (const auto& [k, v] : mine) desc += k + "=" + v + "\n";
  RETURN_IF_ERROR(store_->Set("config/" + std::to_string(layout_.rank()), desc));
  auto differs = [&](const std::string& other, int other_rank) -> Status {
    if (other == desc) return Status::Ok();
    std::string what;
    size_t at = 0;
    for (const auto& [k, v] : mine) {
      const size_t end = other.find('\n', at);
      const std::string line = other.substr(at, end == std::string::npos ? end : end - at);
      at = end == std::string::npos ? other.size() : end + 1;
      if (line != k + "=" + v) {
        what = k + ": rank " + std::to_string(other_rank) + " has " +
               (line.rfind(k + "=", 0) == 0 ? line.substr(k.size() + 1) : line) + ", rank " +
               std::to_string(layout_.rank()) + " has " + v;
        break;
      }
    }
    return FailedPrecondition("the ranks of this instance do not run the same configuration (" +
                              what + "); start every rank with the same model and config");
  };
  if (is_leader()) {
    for (int r = 1; r < layout_.world(); ++r) {
      auto other = store_->Get("config/" + std::to_string(r), o.comm_timeout);
      if (!other.ok()) {
        return Unavailable("rank " + std::to_string(r) + " of the instance could not connect to " +
                           "the leader within " + std::to_string(o.comm_timeout.count()) +
                           " ms: " + other.status().message());
      }
      RETURN_IF_ERROR(differs(*other, r));
    }
  } else {
    ASSIGN_OR_RETURN(std::string leader, store_->Get("config/0", o.comm_timeout));
    RETURN_IF_ERROR(differs(leader, 0));
  }
  return Status::Ok();
}

Status Engine::ConnectRanks(int64_t* num_blocks) {
  const EngineOptions& o = options_;
  if (is_leader()) {
    if (o.store_server) {
      store_server_ = o.store_server;
    } else {
      ASSIGN_OR_RETURN(store_server_, parallel::TcpStoreServer::Start(o.leader_host, o.leader_port,
                                                                      o.group_token));
    }
  }
  const int port = store_server_ ? store_server_->port() : o.leader_port;
  ASSIGN_OR_RETURN(store_,
                   parallel::TcpStore::Connect(o.leader_host, port, o.comm_timeout, o.group_token));
  RETURN_IF_ERROR(AgreeOnConfig());
  parallel::GlooOptions g;
  if (o.bind_host.empty()) {
    ASSIGN_OR_RETURN(g.host, LocalAddressToward(o.leader_host));
  } else {
    g.host = o.bind_host;
  }
  g.timeout = o.comm_timeout;
  ASSIGN_OR_RETURN(world_comm_, parallel::CreateGlooCommunicator(
                                    store_.get(), "world", layout_.rank(), layout_.world(), g));
  ASSIGN_OR_RETURN(cp_comm_, parallel::CreateGlooCommunicator(
                                 store_.get(), "cp" + std::to_string(layout_.tp_rank),
                                 layout_.cp_rank, layout_.cp, g));
  // The model's collectives: Gloo (host buffers) unless the ranks run on distinct GPUs.
  if (o.collectives != "auto" && o.collectives != "gloo" && o.collectives != "nccl") {
    return InvalidArgument("collectives \"" + o.collectives +
                           "\": expected \"auto\", \"gloo\" or \"nccl\"");
  }
  if (o.collectives == "nccl" && (backend_->host_memory() || !HaveNccl())) {
    return Unimplemented(std::string("collectives \"nccl\" need the cuda backend and a build "
                                     "with NCCL; backend is ") +
                         backend_->name() + (HaveNccl() ? "" : ", and this build has no NCCL"));
  }
  // NCCL needs one GPU per rank: every rank's device identity, compared on the leader (all
  // ranks run the same backend, so all gather or none).
  constexpr size_t kIdBytes = 128;
  std::string ids;
  if (!backend_->host_memory()) {
    std::string my_id = backend_->DeviceId();
    my_id.resize(kIdBytes, '\0');
    ids.assign(kIdBytes * layout_.world(), '\0');
    RETURN_IF_ERROR(world_comm_->AllGather(my_id.data(), ids.data(), kIdBytes));
  }
  int64_t use_nccl = 0;
  if (is_leader() && !backend_->host_memory() && HaveNccl() && o.collectives != "gloo") {
    std::string shared;
    for (int a = 0; a < layout_.world() && shared.empty(); ++a) {
      for (int b = a + 1; b < layout_.world(); ++b) {
        if (ids.compare(a * kIdBytes, kIdBytes, ids, b * kIdBytes, kIdBytes) == 0) {
          shared = "ranks " + std::to_string(a) + " and " + std::to_string(b) + " share " +
                   std::string(ids.c_str() + a * kIdBytes);
          break;
        }
      }
    }
    if (!shared.empty() && o.collectives == "nccl") {
      return FailedPrecondition(
          "collectives \"nccl\" need one GPU per rank (NCCL refuses two "
          "ranks on one GPU): " +
          shared);
    }
    use_nccl = shared.empty();
  }
  // One broadcast settles the pool size (the leader's) and the collectives for every rank.
  int64_t settle[2] = {*num_blocks, use_nccl};
  RETURN_IF_ERROR(world_comm_->Broadcast(settle, sizeof(settle), 0));
  *num_blocks = settle[0];
  if (settle[1] != 0) {
#ifdef HELIX_HAVE_NCCL
    RETURN_IF_ERROR(backend_->Activate());
    parallel::NcclOptions no;
    no.timeout = o.comm_timeout;
    no.stream = backend_->native_stream();
    ASSIGN_OR_RETURN(nccl_world_,
                     parallel::CreateNcclCommunicator(store_.get(), "nccl_world", layout_.rank(),
                                                      layout_.world(), no));
    ASSIGN_OR_RETURN(nccl_cp_, parallel::CreateNcclCommunicator(
                                   store_.get(), "nccl_cp" + std::to_string(layout_.tp_rank),
                                   layout_.cp_rank, layout_.cp, no));
#else
    return Unimplemented("the leader chose NCCL collectives but this rank's build has no NCCL");
#endif
  }
  if (o.device_collectives_for_testing) {
    if (backend_->host_memory() || !backend_->host_addressable()) {
      return InvalidArgument(
          std::string("device_collectives_for_testing needs a device backend whose memory the "
                      "host can address (the CPU emulation of CUDA); backend is ") +
          backend_->name());
    }
    if (!nccl_world_) {
      const auto sync = [b = backend_.get()] { return b->Sync(); };
      device_world_ = parallel::DeviceMemoryViewForTesting(world_comm_.get(), sync);
      device_cp_ = parallel::DeviceMemoryViewForTesting(cp_comm_.get(), sync);
    }
  }
  HELIX_LOG(kInfo) << "engine: " << layout_.ToString() << " joined the instance (model collectives "
                   << (nccl_world_     ? "NCCL"
                       : device_world_ ? "Gloo on device buffers (test)"
                                       : "Gloo")
                   << ")";
  return Status::Ok();
}

Status Engine::BroadcastPlan(parallel::StepPlan* plan, std::chrono::milliseconds timeout) {
  std::string bytes;
  uint64_t size = 0;
  if (is_leader()) {
    bytes = parallel::EncodeStepPlan(*plan);
    size = bytes.size();
    last_plan_ = std::chrono::steady_clock::now();
  }
  RETURN_IF_ERROR(world_comm_->Broadcast(&size, sizeof(size), 0, timeout));
  bytes.resize(size);
  RETURN_IF_ERROR(world_comm_->Broadcast(bytes.data(), size, 0));
  if (!is_leader()) {
    ASSIGN_OR_RETURN(*plan, parallel::DecodeStepPlan(bytes));
  }
  return Status::Ok();
}

Status Engine::ExecutePlan(const parallel::StepPlan& plan) {
  // The leader freed its own blocks already (Finish, Preempt): a uid it released may even be
  // admitted again by now, with blocks of this step.
  for (uint64_t uid : is_leader() ? std::vector<uint64_t>() : plan.released) {
    DropPull(uid);
    auto it = kv_.find(uid);
    if (it == kv_.end()) continue;  // the leader freed its own blocks at Finish
    it->second.Release(pool_.get());
    kv_.erase(it);
  }
  for (const parallel::PlanTransfer& t : plan.transfers) RETURN_IF_ERROR(StartTransfer(t));
  for (uint64_t uid : plan.transfer_cancels) {
    auto it = pulls_.find(uid);
    if (it != pulls_.end() && it->second.job != 0) transfer_->Cancel(it->second.job);
  }
  if (plan.seqs.empty()) return Status::Ok();
  ForwardBatch b;
  b.num_seqs = static_cast<int64_t>(plan.seqs.size());
  std::vector<SequenceKv*> seqs;
  for (const parallel::PlanSeq& ps : plan.seqs) {
    auto it = kv_.find(ps.uid);
    if (it == kv_.end()) {
      // A worker's share of any sequence never exceeds the leader's (CP rank 0 owns global
      // block 0), and every pool has the leader's size: this cannot fail unless the ranks'
      // states diverged.
      SequenceKv kv(options_.tokens_per_block, layout_.cp, layout_.cp_rank);
      if (ps.reserve_tokens <= 0 || !kv.Reserve(pool_.get(), ps.reserve_tokens)) {
        return Internal(layout_.ToString() + ": cannot reserve " +
                        std::to_string(ps.reserve_tokens) + " positions for sequence " +
                        std::to_string(ps.uid) + " (ranks out of step)");
      }
      it = kv_.emplace(ps.uid, std::move(kv)).first;
    } else if (ps.reserve_tokens > 0 && !it->second.Reserve(pool_.get(), ps.reserve_tokens)) {
      // A grown reservation (kv_preemption): the same argument holds.
      return Internal(layout_.ToString() + ": cannot grow sequence " + std::to_string(ps.uid) +
                      " to " + std::to_string(ps.reserve_tokens) +
                      " positions (ranks out of step)");
    }
    seqs.push_back(&it->second);
    b.max_blocks = std::max<int64_t>(b.max_blocks, it->second.blocks().size());
  }
  b.block_tables.assign(b.num_seqs * b.max_blocks, 0);
  b.block_first_pos.assign(b.num_seqs * b.max_blocks, 0);
  for (int64_t i = 0; i < b.num_seqs; ++i) {
    const parallel::PlanSeq& ps = plan.seqs[i];
    SequenceKv& kv = *seqs[i];
    for (size_t j = 0; j < ps.tokens.size(); ++j) {
      const int64_t p = ps.first_pos + static_cast<int64_t>(j);
      int32_t block = -1, slot = -1;
      if (kv.Owns(p)) std::tie(block, slot) = kv.Append(p);
      b.tokens.push_back(ps.tokens[j]);
      b.positions.push_back(static_cast<int32_t>(p));
      b.token_seq.push_back(static_cast<int32_t>(i));
      b.kv_block.push_back(block);
      b.kv_slot.push_back(slot);
    }
    b.logits_rows.push_back(static_cast<int32_t>(b.tokens.size() - 1));
    b.kv_lens.push_back(static_cast<int32_t>(kv.local_tokens()));
    std::copy(kv.blocks().begin(), kv.blocks().end(), b.block_tables.begin() + i * b.max_blocks);
    std::copy(kv.block_first_pos().begin(), kv.block_first_pos().end(),
              b.block_first_pos.begin() + i * b.max_blocks);
  }
  device_tokens_.clear();
  if (device_rows_.size() != b.logits_rows.size()) device_rows_.clear();  // workers: none
  // Workers need no logits (the leader samples).
  return model_->Forward(b, is_leader() ? &logits_ : nullptr,
                         device_rows_.empty() ? nullptr : &device_rows_, &device_tokens_);
}

Status Engine::Heartbeat(std::chrono::milliseconds interval) {
  if (!is_leader() || layout_.single() || world_comm_ == nullptr) return Status::Ok();
  if (Status b = broken(); !b.ok()) return b;
  if (std::chrono::steady_clock::now() - last_plan_ < interval) return Status::Ok();
  parallel::StepPlan plan;  // empty: the workers execute nothing
  const Status st = BroadcastPlan(&plan, options_.comm_timeout);
  if (!st.ok()) BreakInstance(st, "a worker rank did not take the idle heartbeat");
  return st;
}

void Engine::BreakInstance(const Status& error, const char* what) {
  {
    std::lock_guard<std::mutex> lock(inbox_mu_);
    broken_ = error;
  }
  HELIX_LOG(kError) << "engine: " << what << ": " << error.ToString();
  AbortAll(error);
}

Status Engine::RunWorker() {
  if (is_leader()) return FailedPrecondition("RunWorker is for ranks other than 0");
  for (;;) {
    parallel::StepPlan plan;
    if (Status st = BroadcastPlan(&plan, options_.worker_idle_timeout); !st.ok()) {
      return Unavailable("waiting for the leader's next step (worker_idle_timeout " +
                         std::to_string(options_.worker_idle_timeout.count()) +
                         " ms) failed: " + st.ToString());
    }
    if (plan.shutdown) return Status::Ok();
    RETURN_IF_ERROR(ExecutePlan(plan));
    if (!plan.transfer_polls.empty()) {
      std::vector<uint8_t> all;
      std::string error;
      RETURN_IF_ERROR(GatherTransferStates(plan.transfer_polls, &all, &error));
    }
  }
}

void Engine::DropPull(uint64_t uid) {
  auto it = pulls_.find(uid);
  if (it == pulls_.end()) return;
  Pull& pull = it->second;
  bool in_flight = false;
  if (pull.job != 0 && pull.staging != nullptr &&
      transfer_->State(pull.job) == transfer::JobState::kInProgress) {
    // UCX may still write into the staging: stop the job and wait for its gets to end.
    transfer_->Cancel(pull.job);
    in_flight = transfer_->Wait(pull.job, options_.kv_transfer_timeout + std::chrono::seconds(5)) ==
                transfer::JobState::kInProgress;
  }
  if (pull.job != 0 && !in_flight) transfer_->Forget(pull.job);
  if (pull.staging != nullptr) {
    // Uploads may still be writing the blocks, which the caller frees next: the ops queued from
    // now on (a later owner's KV writes) wait for them.
    const uint64_t mark = pull.uploaded > 0 ? backend_->FenceUploads() : 0;
    if (in_flight) {
      // Never free memory a get may still write: leak it (and the job's record) instead.
      HELIX_LOG(kError) << "engine: the KV pull of sequence " << uid
                        << " did not end after its cancel; leaving its staging allocated";
    } else {
      ReleaseStaging(pull.staging, pull.staging_bytes, mark);
    }
  }
  pulls_.erase(it);
}

std::string Engine::UploadStagedKv(Pull* pull, bool done) {
  auto* dev = static_cast<uint8_t*>(pool_->base());
  const auto* stage = static_cast<const uint8_t*>(pull->staging);
  const int64_t bb = pool_->block_bytes();
  std::vector<uint32_t> now;
  for (uint32_t g : transfer_->TakeDoneGroups(pull->job)) {
    if (g >= pull->staged_blocks.size()) {  // one group per staged block: cannot happen
      return "the transfer reported group " + std::to_string(g) + " of a pull of " +
             std::to_string(pull->staged_blocks.size()) + " blocks";
    }
    backend_->Upload(dev + pull->staged_blocks[g],
                     stage + static_cast<int64_t>(g % pull->ring) * bb, static_cast<size_t>(bb));
    ++pull->uploaded;
    now.push_back(g);
  }
  if (pull->ring < pull->staged_blocks.size()) {
    // A ring: the slots whose uploads have finished are fetched into again.
    if (!now.empty()) pull->uploading.emplace_back(backend_->MarkUploads(), std::move(now));
    std::vector<uint32_t> free_slots;
    while (!pull->uploading.empty() &&
           backend_->UploadsDone(pull->uploading.front().first, /*wait=*/false)) {
      const std::vector<uint32_t>& g = pull->uploading.front().second;
      free_slots.insert(free_slots.end(), g.begin(), g.end());
      pull->uploading.pop_front();
    }
    transfer_->ReleaseGroups(pull->job, free_slots);
  }
  Status s = backend_->Activate();  // the first error of the uploads, if any
  if (!done) return s.ok() ? "" : "copying the pulled KV to the device: " + s.message();
  if (s.ok() && pull->uploaded != pull->staged_blocks.size()) {
    s = Internal("the pull ended with " + std::to_string(pull->uploaded) + " of " +
                 std::to_string(pull->staged_blocks.size()) + " blocks uploaded");
  }
  ReleaseStaging(pull->staging, pull->staging_bytes, backend_->FenceUploads());
  pull->staging = nullptr;
  pull->staged_blocks.clear();
  return s.ok() ? "" : "copying the pulled KV to the device: " + s.message();
}

void* Engine::AcquireStaging(size_t bytes, size_t* got) {
  // The smallest reusable buffer that is large enough.
  size_t best = staging_cache_.size();
  for (size_t i = 0; i < staging_cache_.size(); ++i) {
    const StagingBuffer& b = staging_cache_[i];
    if (b.bytes >= bytes &&
        (best == staging_cache_.size() || b.bytes < staging_cache_[best].bytes) &&
        backend_->UploadsDone(b.mark, /*wait=*/false)) {
      best = i;
    }
  }
  if (best < staging_cache_.size()) {
    const StagingBuffer b = staging_cache_[best];
    staging_cache_.erase(staging_cache_.begin() + static_cast<std::ptrdiff_t>(best));
    *got = b.bytes;
    return b.p;
  }
  const size_t size = (bytes + kStagingGranule - 1) / kStagingGranule * kStagingGranule;
  void* p = backend_->AllocHost(size);
  if (p == nullptr && !staging_cache_.empty()) {  // make room, then try again
    TrimStaging(0);
    p = backend_->AllocHost(size);
  }
  *got = p != nullptr ? size : 0;
  return p;
}

void Engine::ReleaseStaging(void* p, size_t bytes, uint64_t mark) {
  staging_cache_.push_back({p, bytes, mark});
  TrimStaging(kStagingCacheBytes);
}

void Engine::TrimStaging(size_t keep_bytes) {
  size_t total = 0;
  for (const StagingBuffer& b : staging_cache_) total += b.bytes;
  for (auto it = staging_cache_.begin(); it != staging_cache_.end() && total > keep_bytes;) {
    if (backend_->UploadsDone(it->mark, /*wait=*/false)) {
      total -= it->bytes;
      backend_->FreeHost(it->p);
      it = staging_cache_.erase(it);
    } else {
      ++it;
    }
  }
}

Status Engine::StartTransfer(const parallel::PlanTransfer& t) {
  auto it = kv_.find(t.uid);
  if (it == kv_.end()) {
    SequenceKv kv(options_.tokens_per_block, layout_.cp, layout_.cp_rank);
    if (t.reserve_tokens <= 0 || !kv.Reserve(pool_.get(), t.reserve_tokens)) {
      return Internal(layout_.ToString() + ": cannot reserve " + std::to_string(t.reserve_tokens) +
                      " positions for transferred sequence " + std::to_string(t.uid) +
                      " (ranks out of step)");
    }
    it = kv_.emplace(t.uid, std::move(kv)).first;
  }
  SequenceKv& kv = it->second;
  Pull& pull = pulls_[t.uid];
  auto src = transfer::DecodeKvSource(t.source);
  if (!src.ok()) {
    pull.error = src.status().message();
    return Status::Ok();
  }
  for (int64_t p = 0; p < src->token_count; ++p) {
    if (kv.Owns(p)) kv.Append(p);
  }
  const transfer::KvLayout& L = kv_layout_;
  const int64_t es = static_cast<int64_t>(kernels::DTypeSize(L.dtype));
  const int64_t head_bytes = L.tokens_per_block * L.head_dim * es;
  const int64_t src_heads = src->layout.num_kv_heads, h0 = layout_.tp_rank * L.num_kv_heads;
  transfer::PullJob job;
  job.peer_key = src->server_id;
  job.worker_address = src->worker_address;
  job.listener_address = src->listener_address;
  job.rkey = src->rkey;
  job.deadline = std::chrono::steady_clock::now() + options_.kv_transfer_timeout;
  auto* base = static_cast<uint8_t*>(pool_->base());
  const int64_t nblocks = static_cast<int64_t>(src->block_addresses.size());
  const int64_t bb = pool_->block_bytes();
  if (!backend_->host_memory() && nblocks > layout_.cp_rank) {
    // Pinned staging for the blocks this rank owns, each uploaded to the device when its gets
    // are done; a ring of slots when they are more than kv_staging_tokens.
    const int64_t owned = (nblocks - layout_.cp_rank + layout_.cp - 1) / layout_.cp;
    const int64_t cap = options_.kv_staging_tokens > 0
                            ? BlocksFor(options_.kv_staging_tokens)
                            : std::max<int64_t>(1, (int64_t{256} << 20) / bb);
    pull.ring = static_cast<size_t>(std::min(owned, cap));
    pull.staging = AcquireStaging(pull.ring * static_cast<size_t>(bb), &pull.staging_bytes);
    if (pull.staging == nullptr) {
      pull.error = "cannot allocate " + std::to_string(pull.ring * bb) +
                   " bytes of pinned host memory to stage the KV transfer";
      return Status::Ok();
    }
    base = static_cast<uint8_t*>(pull.staging);
    // One group of gets per block: 1 segment, or one per (layer, plane) when TP differs.
    job.segments_per_group =
        src_heads == L.num_kv_heads ? 1 : static_cast<size_t>(L.num_layers * L.num_planes);
    job.window_groups = static_cast<int64_t>(pull.ring) < owned ? pull.ring : 0;
  }
  for (int64_t g = layout_.cp_rank; g < nblocks; g += layout_.cp) {
    const int64_t block_off = static_cast<int64_t>(kv.blocks()[g / layout_.cp]) * bb;
    uint8_t* dst = base + block_off;
    if (pull.staging != nullptr) {
      dst = base + static_cast<int64_t>(pull.staged_blocks.size() % pull.ring) * bb;
      pull.staged_blocks.push_back(block_off);
    }
    const uint64_t remote = src->block_addresses[g];
    if (src_heads == L.num_kv_heads) {
      job.segments.push_back({remote, dst, static_cast<uint64_t>(bb)});
      continue;
    }
    // TP differs between the two sides: this rank's KV-head slice of each (layer, K/V).
    for (int64_t lc = 0; lc < L.num_layers * L.num_planes; ++lc) {
      job.segments.push_back({remote + static_cast<uint64_t>((lc * src_heads + h0) * head_bytes),
                              dst + lc * L.num_kv_heads * head_bytes,
                              static_cast<uint64_t>(L.num_kv_heads * head_bytes)});
    }
  }
  if (job.segments.empty()) return Status::Ok();  // this rank owns none of the prompt's blocks
  if (transfer_ == nullptr) {
    auto created = transfer::UcxTransfer::Create(layout_.ToString());
    if (!created.ok()) {
      pull.error = created.status().message();
      return Status::Ok();
    }
    transfer_ = std::move(*created);
  }
  pull.job = transfer_->StartPull(std::move(job));
  return Status::Ok();
}

std::vector<uint8_t> Engine::PollTransfers(const std::vector<uint64_t>& uids,
                                           std::string* first_error) {
  std::vector<uint8_t> out;
  for (uint64_t uid : uids) {
    transfer::JobState st = transfer::JobState::kFailed;
    std::string error = "no transfer on this rank";
    auto it = pulls_.find(uid);
    if (it != pulls_.end()) {
      if (it->second.job == 0) {
        error = it->second.error;
        st = error.empty() ? transfer::JobState::kDone : transfer::JobState::kFailed;
      } else {
        st = transfer_->State(it->second.job, &error);
        if (it->second.staging != nullptr && it->second.copy_error.empty() &&
            (st == transfer::JobState::kInProgress || st == transfer::JobState::kDone)) {
          it->second.copy_error = UploadStagedKv(&it->second, st == transfer::JobState::kDone);
        }
        if (!it->second.copy_error.empty()) {
          if (st == transfer::JobState::kInProgress) {
            // No use pulling the rest: the pull ends at once (its gets land in this rank's
            // staging, never in the pool), and is reported with the copy's error, not the
            // transfer timeout it would otherwise run into.
            if (!it->second.copy_cancelled) transfer_->Cancel(it->second.job);
            it->second.copy_cancelled = true;
          } else {
            st = transfer::JobState::kFailed;
            error = it->second.copy_error;
          }
        }
      }
    }
    if (st == transfer::JobState::kFailed && first_error->empty()) *first_error = error;
    out.push_back(static_cast<uint8_t>(st));
  }
  return out;
}

Status Engine::GatherTransferStates(const std::vector<uint64_t>& uids, std::vector<uint8_t>* all,
                                    std::string* local_error) {
  std::vector<uint8_t> mine = PollTransfers(uids, local_error);
  if (layout_.single()) {
    *all = std::move(mine);
    return Status::Ok();
  }
  all->assign(mine.size() * layout_.world(), 0);
  return world_comm_->AllGather(mine.data(), all->data(), mine.size());
}

Status Engine::CheckKvSource(const GenerateRequest& r, int64_t prompt_len) {
  const transfer::KvSource& src = *r.kv_source;
  if (r.first_token < 0 || r.first_token >= model_config().vocab_size) {
    return InvalidArgument("first_token = " + std::to_string(r.first_token) +
                           ": a request with a KV handle needs the context server's first token "
                           "(in [0, " +
                           std::to_string(model_config().vocab_size) + "))");
  }
  if (src.token_count != prompt_len) {
    return InvalidArgument("the KV handle holds " + std::to_string(src.token_count) +
                           " tokens but the prompt has " + std::to_string(prompt_len));
  }
  Status st = transfer::CheckCompatible(src, fingerprint_, kv_layout_, layout_.tp);
  // Pairing (model, dtype, layout) is judged once per context server and logged once; the
  // per-handle checks (block count, checksum) run every time.
  std::lock_guard<std::mutex> lock(inbox_mu_);
  constexpr size_t kMaxPairings = 1024;  // handles may name any number of server ids
  if (pairing_.size() < kMaxPairings && pairing_.emplace(src.server_id, st).second) {
    if (st.ok()) {
      HELIX_LOG(kInfo) << "engine: paired with context server '" << src.server_id << "' ("
                       << src.layout.ToString() << ")";
    } else if (st.code() == StatusCode::kFailedPrecondition) {
      HELIX_LOG(kWarn) << "engine: refusing context server '" << src.server_id
                       << "': " << st.message();
    }
  }
  return st;
}

StatusOr<std::string> Engine::Submit(GenerateRequest r) {
  RETURN_IF_ERROR(r.sampling.Validate());
  // Below this a temperature is greedy (vLLM's rule): logits / 1e-40 overflow to inf, and a
  // softmax over infinities is NaN.
  constexpr float kGreedyBelow = 1e-5f;
  if (r.sampling.temperature < kGreedyBelow) r.sampling.temperature = 0;
  if (r.max_tokens < 1) {
    return InvalidArgument("max_tokens = " + std::to_string(r.max_tokens) + ": expected >= 1");
  }
  const int64_t vocab = model_config().vocab_size;
  if (r.prompt_tokens.empty()) {
    r.prompt_tokens = tokenizer_->Encode(r.prompt, r.add_bos);
    if (r.prompt_tokens.empty()) {
      return InvalidArgument("prompt is empty (give text, token ids, or add_bos)");
    }
  }
  for (size_t i = 0; i < r.prompt_tokens.size(); ++i) {
    if (r.prompt_tokens[i] < 0 || r.prompt_tokens[i] >= vocab) {
      return InvalidArgument("prompt token " + std::to_string(i) + " = " +
                             std::to_string(r.prompt_tokens[i]) +
                             " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
    }
  }
  for (int32_t t : r.stop_token_ids) {
    if (t < 0 || t >= vocab) {
      return InvalidArgument("stop token id " + std::to_string(t) + " is outside the vocabulary");
    }
  }
  if (!r.sampling.allowed_token_ids.empty() && r.sampling.allowed_token_ids.back() >= vocab) {
    return InvalidArgument("allowed_token_ids: token id " +
                           std::to_string(r.sampling.allowed_token_ids.back()) +
                           " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
  }
  if (!r.sampling.logit_bias.empty() && r.sampling.logit_bias.back().first >= vocab) {
    return InvalidArgument("logit_bias: token id " +
                           std::to_string(r.sampling.logit_bias.back().first) +
                           " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
  }
  // Generated text leaves control tokens out, so a stop string that is one control token's
  // text (stop: ["<|im_end|>"]) could never match it: it stops at that token instead.
  for (int32_t id : ControlTokensNamedBy(tokenizer(), r.stop)) r.stop_token_ids.push_back(id);
  // Sorted and unique: every generated token is looked up in it (a list of millions of
  // duplicates, scanned per token, slowed every request on the engine thread).
  std::sort(r.stop_token_ids.begin(), r.stop_token_ids.end());
  r.stop_token_ids.erase(std::unique(r.stop_token_ids.begin(), r.stop_token_ids.end()),
                         r.stop_token_ids.end());
  const int64_t prompt_len = static_cast<int64_t>(r.prompt_tokens.size());
  if (r.kv_source != nullptr) {
    RETURN_IF_ERROR(CheckKvSource(r, prompt_len));
  } else if (r.first_token >= 0) {
    return InvalidArgument("first_token is only meaningful with a KV handle");
  }
  if (r.retain_kv && options_.export_kv == false) {
    return FailedPrecondition("retain_kv needs a context server engine (export_kv)");
  }
  if (r.retain_kv && !r.id.empty()) {
    std::lock_guard<std::mutex> lock(inbox_mu_);
    if (retained_ids_.count(r.id) != 0) {
      return InvalidArgument("request id " + r.id +
                             " already holds retained KV; retained requests need unique ids");
    }
  }
  if (r.retain_kv && export_mirror_ != nullptr && BlocksFor(prompt_len) > export_blocks_) {
    return InvalidArgument(  // can never fit: not a retry-later
        "the prompt's KV needs " + std::to_string(BlocksFor(prompt_len)) +
        " blocks of the KV export buffer, which holds " + std::to_string(export_blocks_) +
        " (cache_transceiver_config.max_tokens_in_buffer sets its size)");
  }
  if (prompt_len + r.max_tokens > max_seq_len_) {
    return InvalidArgument("prompt (" + std::to_string(prompt_len) + " tokens) + max_tokens (" +
                           std::to_string(r.max_tokens) + ") exceeds max_seq_len " +
                           std::to_string(max_seq_len_));
  }
  if (prompt_len > options_.max_num_tokens && r.kv_source == nullptr) {
    return InvalidArgument("prompt (" + std::to_string(prompt_len) +
                           " tokens) exceeds max_num_tokens " +
                           std::to_string(options_.max_num_tokens) + " (no chunked prefill)");
  }
  if (Status b = broken(); !b.ok()) {
    return Unavailable("the Helix instance is down after a failed collective: " + b.message());
  }
  auto seq = std::make_unique<Sequence>(std::move(r), *tokenizer_);
  seq->prompt_len = prompt_len;
  seq->tokens = seq->req.prompt_tokens;
  // Positions whose KV is written: the prompt's and every generated token's but the last
  // (which ends the request before it is fed back).
  seq->reserve_tokens = prompt_len + seq->req.max_tokens - 1;
  // This rank is CP rank 0, whose share of any sequence is the largest.
  const int64_t need = SequenceKv(options_.tokens_per_block, layout_.cp, layout_.cp_rank)
                           .BlocksNeeded(seq->reserve_tokens);
  // Preemptible when its recompute (every position it can hold, in one prefill) fits a pass.
  seq->on_demand = options_.kv_preemption && !seq->req.retain_kv &&
                   seq->reserve_tokens <= options_.max_num_tokens;
  if (need > pool_->num_blocks()) {
    return InvalidArgument("request needs " + std::to_string(need) +
                           " KV blocks per rank but the pool has only " +
                           std::to_string(pool_->num_blocks()) + ": it can never fit");
  }
  seq->sampler = std::make_unique<Sampler>(seq->req.sampling, seq->tokens);
  if (seq->req.sampling.min_tokens > 0) {
    std::vector<int32_t> stops = seq->req.stop_token_ids;  // sorted, unique
    if (!seq->req.ignore_eos) {
      stops.insert(stops.end(), default_stop_ids_.begin(), default_stop_ids_.end());
      std::sort(stops.begin(), stops.end());
      stops.erase(std::unique(stops.begin(), stops.end()), stops.end());
    }
    const auto& allowed = seq->req.sampling.allowed_token_ids;
    if (!allowed.empty() &&
        std::includes(stops.begin(), stops.end(), allowed.begin(), allowed.end())) {
      return InvalidArgument(
          "allowed_token_ids holds only stop tokens (EOS, stop_token_ids), which min_tokens "
          "bans from the first tokens: nothing could be sampled");
    }
    const int64_t vocab = model_config().vocab_size;
    if (allowed.empty() && std::count_if(stops.begin(), stops.end(),
                                         [&](int32_t t) { return t >= 0 && t < vocab; }) >= vocab) {
      return InvalidArgument(
          "stop_token_ids (with EOS unless ignore_eos) name every token of the vocabulary, and "
          "min_tokens bans them from the first tokens: nothing could be sampled");
    }
    seq->sampler->BanUntilMinTokens(std::move(stops));
  }
  std::lock_guard<std::mutex> lock(inbox_mu_);
  if (!closed_.ok()) return closed_;  // no step will run it
  if (seq->req.id.empty()) {
    do {
      seq->req.id = "req-" + std::to_string(next_id_++);
    } while (live_ids_.count(seq->req.id) != 0);
  } else if (live_ids_.count(seq->req.id) != 0) {
    return AlreadyExists("request id '" + seq->req.id +
                         "' is already in flight: ids of running requests must be unique");
  }
  live_ids_.insert(seq->req.id);
  seq->uid = next_uid_++;
  std::string id = seq->req.id;
  inbox_.push_back(std::move(seq));
  return id;
}

void Engine::Cancel(const std::string& request_id) {
  std::lock_guard<std::mutex> lock(inbox_mu_);
  // Only a request that is live now: a cancel for an unknown or finished id would otherwise
  // wait in cancels_ and end the next request submitted with that id.
  if (live_ids_.count(request_id) != 0) cancels_.insert(request_id);
}

bool Engine::HasWork() {
  std::lock_guard<std::mutex> lock(inbox_mu_);
  return !inbox_.empty() || !waiting_.empty() || !running_.empty() || !cancels_.empty() ||
         !transferring_.empty() || !releases_.empty() || HasKvVerdicts();
}

KvStats Engine::kv_stats() const {
  return {pool_->num_blocks(), pool_->num_free(), pool_->block_bytes(), options_.tokens_per_block,
          preemptions_.load()};
}

void Engine::DrainInbox() {
  std::unordered_set<std::string> cancels;
  {
    std::lock_guard<std::mutex> lock(inbox_mu_);
    // Still counted while they wait in waiting_ (the step publishes its counts at its end).
    waiting_count_ += static_cast<int64_t>(inbox_.size());
    for (auto& s : inbox_) waiting_.push_back(std::move(s));
    inbox_.clear();
    cancels.swap(cancels_);
  }
  if (cancels.empty()) return;
  for (auto& s : running_) {
    if (cancels.count(s->req.id)) Finish(s.get(), FinishReason::kCancelled);
  }
  for (auto& s : waiting_) {
    if (cancels.count(s->req.id)) Finish(s.get(), FinishReason::kCancelled);
  }
  // A pull is stopped on every rank first; the request ends once no rank touches its blocks.
  for (auto& s : transferring_) {
    if (cancels.count(s->req.id)) {
      s->transfer_cancel = true;
      s->cancelled_by_client = true;
    }
  }
  for (auto& s : confirming_) {  // pulled: no rank reads the source any more
    if (cancels.count(s->req.id)) Finish(s.get(), FinishReason::kCancelled);
  }
  for (auto& s : checking_) {  // no rank has started pulling
    if (cancels.count(s->req.id)) {
      {
        std::lock_guard<std::mutex> lock(inbox_mu_);
        ++transfers_cancelled_;
      }
      Finish(s.get(), FinishReason::kCancelled);
    }
  }
  auto done = [](const std::unique_ptr<Sequence>& s) { return s->finished; };
  running_.erase(std::remove_if(running_.begin(), running_.end(), done), running_.end());
  waiting_.erase(std::remove_if(waiting_.begin(), waiting_.end(), done), waiting_.end());
  confirming_.erase(std::remove_if(confirming_.begin(), confirming_.end(), done),
                    confirming_.end());
  checking_.erase(std::remove_if(checking_.begin(), checking_.end(), done), checking_.end());
}

bool Engine::HasKvVerdicts() const {
  std::lock_guard<std::mutex> lock(kv_verdicts_->mu);
  return !kv_verdicts_->list.empty();
}

void Engine::TakeKvVerdicts() {
  std::vector<std::pair<uint64_t, Status>> verdicts;
  {
    std::lock_guard<std::mutex> lock(kv_verdicts_->mu);
    verdicts.swap(kv_verdicts_->list);
  }
  for (auto& [uid, outcome] : verdicts) {
    auto ck = std::find_if(checking_.begin(), checking_.end(),
                           [&](const auto& s) { return s->uid == uid; });
    if (ck != checking_.end()) {
      std::unique_ptr<Sequence> owned = std::move(*ck);
      checking_.erase(ck);
      if (outcome.ok()) {
        transferring_.push_back(std::move(owned));
      } else {
        HELIX_LOG(kWarn) << "engine: request " << owned->req.id << ": " << outcome.message();
        {
          std::lock_guard<std::mutex> lock(inbox_mu_);
          ++transfers_failed_;
        }
        Finish(owned.get(), FinishReason::kError, outcome);
      }
      continue;
    }
    auto it = std::find_if(confirming_.begin(), confirming_.end(),
                           [&](const auto& s) { return s->uid == uid; });
    if (it == confirming_.end()) continue;  // cancelled meanwhile
    std::unique_ptr<Sequence> owned = std::move(*it);
    confirming_.erase(it);
    if (outcome.ok()) {
      running_.push_back(std::move(owned));
    } else {
      HELIX_LOG(kWarn) << "engine: request " << owned->req.id << ": " << outcome.message();
      {
        // The pull landed (counted done) but its KV was no longer the handle's: a failure.
        std::lock_guard<std::mutex> lock(inbox_mu_);
        --transfers_done_;
        ++transfers_failed_;
      }
      Finish(owned.get(), FinishReason::kError, outcome);
    }
  }
}

void Engine::Admit() {
  int64_t budget = options_.max_num_tokens - static_cast<int64_t>(running_.size());
  // A request pulling its KV joins the batch when the pull lands: it counts already.
  while (!waiting_.empty() &&
         static_cast<int64_t>(running_.size() + transferring_.size() + checking_.size() +
                              confirming_.size()) < options_.max_batch_size) {
    Sequence* s = waiting_.front().get();
    const bool pulled = s->req.kv_source != nullptr && !s->preempted;
    // The tokens its first pass computes: the prompt, or after a preemption every token so far.
    const int64_t pass_tokens = static_cast<int64_t>(s->tokens.size());
    if (!pulled && pass_tokens > budget) break;  // next step
    // A retained prompt's room in the export buffer is reserved now, so that its hand-off
    // cannot fail after the prefill: the request waits while leases hold the buffer.
    const int64_t export_need =
        s->req.retain_kv && export_mirror_ != nullptr ? BlocksFor(s->prompt_len) : 0;
    if (static_cast<int64_t>(export_free_.size()) < export_need) break;  // wait for releases
    // Reserve the whole request up front (no preemption is ever needed), or with
    // kv_preemption what its first pass writes and the position of the token that pass
    // samples (for a pulled prompt: the context server's token, fed back first), leaving a
    // block of room for each running preemptible sequence's next token.
    SequenceKv kv(options_.tokens_per_block, layout_.cp, layout_.cp_rank);
    const int64_t reserve =
        s->on_demand ? std::min(pass_tokens + 1, s->reserve_tokens) : s->reserve_tokens;
    if (s->on_demand) {
      const int64_t room = std::count_if(running_.begin(), running_.end(),
                                         [](const auto& r) { return r->on_demand; });
      if (pool_->num_free() - kv.BlocksNeeded(reserve) < room) break;  // wait for blocks
    }
    if (!kv.Reserve(pool_.get(), reserve)) break;  // wait for blocks
    s->reserved = reserve;
    kv_.emplace(s->uid, std::move(kv));
    for (int64_t j = 0; j < export_need; ++j) {
      s->export_blocks.push_back(export_free_.back());
      export_free_.pop_back();
    }
    if (export_need > 0) export_free_count_ = static_cast<int64_t>(export_free_.size());
    if (pulled) {
      // The context server's token streams first; decoding continues once the KV is here.
      std::unique_ptr<Sequence> owned = std::move(waiting_.front());
      waiting_.pop_front();
      SampleResult first;
      first.token = s->req.first_token;
      // The context server sampled it with the request's first random draw: this server's
      // sampler goes on from the second, so a seeded request gets the tokens it would get
      // from one server (no draw at temperature 0, as in Sample).
      (void)s->sampler->DrawForDevice();
      EmitToken(s, first.token, first);
      if (s->finished) {
        // Nothing to pull: Finish reported it.
      } else if (s->req.check_kv_source) {
        // Pulled once the source is known good.
        auto check = std::move(s->req.check_kv_source);
        s->req.check_kv_source = nullptr;
        checking_.push_back(std::move(owned));
        check([box = kv_verdicts_, uid = s->uid](const Status& v) {
          std::lock_guard<std::mutex> lock(box->mu);
          box->list.emplace_back(uid, v);
        });
      } else {
        transferring_.push_back(std::move(owned));
      }
      continue;
    }
    budget -= pass_tokens;
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
  }
}

bool Engine::GrowReservations() {
  bool preempted = false;
  for (size_t i = 0; i < running_.size();) {
    Sequence* s = running_[i].get();
    // Positions [0, tokens) hold KV once this step has run.
    const int64_t need = static_cast<int64_t>(s->tokens.size());
    if (!s->on_demand || s->reserved >= need) {
      ++i;
      continue;
    }
    SequenceKv& kv = kv_.at(s->uid);
    bool self = false;
    while (!kv.Reserve(pool_.get(), need)) {
      // The most recently submitted preemptible sequence gives its blocks back (this one, when
      // it is that one: it then waits until blocks are free), as vLLM preempts the latest
      // arrival; not the last to join the batch, which may be a pull that just landed.
      size_t v = i;
      for (size_t k = 0; k < running_.size(); ++k) {
        if (running_[k]->on_demand && running_[k]->uid > running_[v]->uid) v = k;
      }
      self = v == i;
      Preempt(v);
      preempted = true;
      if (self) break;
      if (v < i) --i;  // s moved up one place
    }
    if (self) continue;  // running_[i] is the next sequence now
    s->reserved = need;
    ++i;
  }
  return preempted;
}

void Engine::Preempt(size_t running_index) {
  std::unique_ptr<Sequence> owned = std::move(running_[running_index]);
  running_.erase(running_.begin() + static_cast<std::ptrdiff_t>(running_index));
  Sequence* s = owned.get();
  auto it = kv_.find(s->uid);
  if (it != kv_.end()) {
    it->second.Release(pool_.get());
    kv_.erase(it);
  }
  if (s->announced) pending_release_.push_back(s->uid);  // the workers free theirs next step
  s->announced = false;
  s->announced_reserved = 0;
  s->reserved = 0;
  s->num_computed = 0;  // prompt and generated tokens are computed again
  s->preempted = true;
  const uint64_t n = ++preemptions_;
  // A warning for the first and every 50th (vLLM's cadence), the rest at debug level.
  std::ostringstream line;
  line << "engine: request " << s->req.id << " preempted (recompute) after " << s->generated
       << " tokens: not enough KV blocks (capacity_scheduler_policy MAX_UTILIZATION); " << n
       << " preemptions so far";
  if (n % 50 == 1) {
    HELIX_LOG(kWarn) << line.str();
  } else {
    HELIX_LOG(kDebug) << line.str();
  }
  // Ahead of every request not yet admitted; preempted ones in the order they came (uid).
  auto pos = std::find_if(waiting_.begin(), waiting_.end(),
                          [&](const auto& w) { return !w->preempted || w->uid > s->uid; });
  waiting_.insert(pos, std::move(owned));
}

void Engine::Finish(Sequence* s, FinishReason reason, Status error, bool flush_text,
                    const SampleResult* stop_token) {
  if (s->finished) return;
  s->finished = true;
  TokenEvent ev;
  bool retain = s->req.retain_kv && error.ok() &&
                (reason == FinishReason::kLength || reason == FinishReason::kStop);
  if (retain) {
    if (Status st = Retain(s, &ev); !st.ok()) {
      retain = false;
      reason = FinishReason::kError;
      error = st;
    }
  }
  if (!retain && !s->export_blocks.empty()) {  // its export-buffer room goes back
    export_free_.insert(export_free_.end(), s->export_blocks.begin(), s->export_blocks.end());
    export_free_count_ = static_cast<int64_t>(export_free_.size());
    s->export_blocks.clear();
  }
  if (retain) {
    // kept under a lease
  } else if (auto it = kv_.find(s->uid); it != kv_.end()) {
    DropPull(s->uid);
    it->second.Release(pool_.get());
    kv_.erase(it);
    if (s->announced) pending_release_.push_back(s->uid);
  }
  ev.request_id = s->req.id;
  ev.finished = true;
  ev.finish_reason = reason;
  ev.error = std::move(error);
  if (stop_token != nullptr && reason == FinishReason::kStop) {
    ev.token = stop_token->token;
    ev.logprob = stop_token->logprob;
    ev.top_logprobs = stop_token->top;
  }
  if (flush_text) {
    // Held-back text (an incomplete character, a possible stop-string prefix) is released;
    // a stop string that completes only now still cuts it.
    bool stopped = false;
    ev.text = s->stop.Push(s->stop_token_text + s->detok->Flush(), &stopped);
    if (!stopped) ev.text += s->stop.Flush();
  }
  ev.prompt_tokens = s->prompt_len;
  ev.completion_tokens = s->generated;
  // A request that ends before pulling its KV (cancelled or refused while it waited, or done
  // with the context server's token) hands the context server its blocks back now, not at the
  // lease's end. A pull in progress ends on every rank before its request is finished
  // (PollTransfers, AbortAll), so this is safe then too.
  ReportKvDone(s, !ev.error.ok()                       ? ev.error
                  : reason == FinishReason::kCancelled ? Cancelled("the request was cancelled")
                                                       : Status::Ok());
  {
    std::lock_guard<std::mutex> lock(inbox_mu_);
    live_ids_.erase(s->req.id);
    // A cancel that came while the request ended in this step is moot; left queued, it would
    // end the next request submitted with this id.
    cancels_.erase(s->req.id);
  }
  if (s->req.sink) s->req.sink(ev);
}

void Engine::ReportKvDone(Sequence* s, const Status& outcome) {
  std::function<void(const Status&)> done = std::move(s->req.on_kv_done);
  s->req.on_kv_done = nullptr;
  if (done) done(outcome);
}

void Engine::EmitToken(Sequence* s, int32_t token, const SampleResult& sample) {
  s->sampler->Accept(token);
  s->tokens.push_back(token);
  ++s->generated;
  const bool stop_token =
      (!s->req.ignore_eos &&
       std::count(default_stop_ids_.begin(), default_stop_ids_.end(), token)) ||
      std::binary_search(s->req.stop_token_ids.begin(), s->req.stop_token_ids.end(), token);
  if (stop_token) {
    SampleResult stop = sample;
    stop.token = token;
    // vLLM's include_stop_str_in_output keeps the stop token's text too (none for EOS).
    if (s->req.include_stop_str) s->stop_token_text = s->detok->Push(token);
    Finish(s, FinishReason::kStop, Status::Ok(), /*flush_text=*/true, &stop);
    return;
  }
  TokenEvent ev;
  ev.request_id = s->req.id;
  ev.token = token;
  ev.logprob = sample.logprob;
  ev.top_logprobs = sample.top;
  bool stopped = false;
  // Stop strings are matched from the token after the first min_tokens on; one may start in
  // their text (vLLM's rule).
  if (s->generated <= s->req.sampling.min_tokens) {
    ev.text = s->stop.PassThrough(s->detok->Push(token));
  } else {
    ev.text = s->stop.Push(s->detok->Push(token), &stopped);
  }
  if (s->req.sink) s->req.sink(ev);
  if (stopped) {
    Finish(s, FinishReason::kStop);
  } else if (s->generated >= s->req.max_tokens ||
             static_cast<int64_t>(s->tokens.size()) >= max_seq_len_) {
    Finish(s, FinishReason::kLength, Status::Ok(), /*flush_text=*/true);
  }
}

bool Engine::Step() {
  // Whichever way the step ends, the counts other threads read are this step's.
  struct Publish {
    Engine* e;
    ~Publish() { e->PublishCounts(); }
  } publish{this};
  DrainInbox();
  TakeKvVerdicts();
  ExpireLeases();
  // Running sequences take the blocks this step writes first; new requests are admitted only
  // in a step that preempted none (they would take the blocks just freed).
  if (!GrowReservations()) Admit();
  if (running_.empty() && transferring_.empty()) return false;
  const bool only_polling = running_.empty();

  // One forward pass over every running sequence's uncomputed tokens, on every rank.
  parallel::StepPlan plan;
  plan.released.swap(pending_release_);
  for (const auto& sp : running_) {
    Sequence* s = sp.get();
    parallel::PlanSeq ps;
    ps.uid = s->uid;
    // The reservation on its first step, and again whenever it grew (kv_preemption).
    ps.reserve_tokens = !s->announced || s->reserved > s->announced_reserved
                            ? static_cast<int32_t>(s->reserved)
                            : 0;
    s->announced = true;
    s->announced_reserved = s->reserved;
    ps.first_pos = static_cast<int32_t>(s->num_computed);
    ps.tokens.assign(s->tokens.begin() + s->num_computed, s->tokens.end());
    s->num_computed = static_cast<int64_t>(s->tokens.size());
    plan.seqs.push_back(std::move(ps));
  }
  for (const auto& sp : transferring_) {
    Sequence* s = sp.get();
    if (!s->announced) {
      parallel::PlanTransfer t;
      t.uid = s->uid;
      t.reserve_tokens = static_cast<int32_t>(s->reserved);
      t.source = transfer::EncodeKvSource(*s->req.kv_source);
      plan.transfers.push_back(std::move(t));
      s->announced = true;
      s->announced_reserved = s->reserved;
    }
    if (s->transfer_cancel && !s->transfer_cancel_sent) {
      plan.transfer_cancels.push_back(s->uid);
      s->transfer_cancel_sent = true;
    }
    plan.transfer_polls.push_back(s->uid);
  }
  // A device backend picks the tokens of the rows that need no penalty or logprobs itself (one
  // draw per sampled row from the request's RNG, as Sample would make): on one rank, or where
  // the ranks gather the logits on the device (NCCL).
  device_rows_.clear();
  const bool device_gather = nccl_world_ != nullptr || device_world_ != nullptr;
  if ((layout_.single() || device_gather) && !backend_->host_memory()) {
    for (const auto& sp : running_) {
      Sampler* sm = sp->sampler.get();
      DeviceSampleRow row;
      if (sm->DeviceEligible()) {
        const SamplingParams& sp_params = sm->params();
        row.on_device = true;
        row.temperature = sp_params.temperature;
        row.top_k = sp_params.top_k;
        row.top_p = sp_params.top_p;
        row.min_p = sp_params.min_p;
        row.u = sm->DrawForDevice();
      }
      device_rows_.push_back(row);
    }
  }
  Status st = layout_.single() ? Status::Ok() : BroadcastPlan(&plan, options_.comm_timeout);
  if (st.ok()) st = ExecutePlan(plan);
  std::vector<uint8_t> states;
  std::string local_error;
  if (st.ok() && !plan.transfer_polls.empty()) {
    st = GatherTransferStates(plan.transfer_polls, &states, &local_error);
  }
  if (!st.ok()) {
    BreakInstance(st, "step failed, failing every request");
    return true;
  }
  const int64_t num_seqs = static_cast<int64_t>(running_.size());
  const int64_t vocab = model_config().vocab_size;
  for (int64_t i = 0; i < num_seqs; ++i) {
    Sequence* s = running_[i].get();
    SampleResult r;
    if (i < static_cast<int64_t>(device_tokens_.size()) && device_tokens_[i] >= 0 &&
        device_tokens_[i] < vocab) {
      r.token = device_tokens_[i];
    } else if (i < static_cast<int64_t>(device_tokens_.size()) &&
               device_tokens_[i] == Backend::kNoToken) {
      // The device found nothing to pick (its logits are not on the host): as Sample says.
      Finish(s, FinishReason::kError, NothingToSample());
      continue;
    } else {
      r = s->sampler->Sample(logits_.data() + i * vocab, vocab);
      if (!r.status.ok()) {  // this request alone ends, with the reason
        Finish(s, FinishReason::kError, r.status);
        continue;
      }
    }
    EmitToken(s, r.token, r);
  }
  running_.erase(std::remove_if(running_.begin(), running_.end(),
                                [](const std::unique_ptr<Sequence>& s) { return s->finished; }),
                 running_.end());
  if (!plan.transfer_polls.empty()) {
    ProcessTransferStates(plan.transfer_polls, states, local_error);
  }
  // Nothing but pulls in flight: do not spin the ranks through empty steps.
  if (only_polling) std::this_thread::sleep_for(std::chrono::microseconds(200));
  return true;
}

void Engine::ProcessTransferStates(const std::vector<uint64_t>& uids,
                                   const std::vector<uint8_t>& all,
                                   const std::string& local_error) {
  const size_t n = uids.size();
  const int ranks = static_cast<int>(all.size() / std::max<size_t>(n, 1));
  for (size_t i = 0; i < n; ++i) {
    auto it = std::find_if(transferring_.begin(), transferring_.end(),
                           [&](const auto& s) { return s->uid == uids[i]; });
    if (it == transferring_.end()) continue;
    Sequence* s = it->get();
    bool in_progress = false;
    int bad_rank = -1;
    for (int r = 0; r < ranks; ++r) {
      const auto st = static_cast<transfer::JobState>(all[r * n + i]);
      if (st == transfer::JobState::kInProgress) in_progress = true;
      if ((st == transfer::JobState::kFailed || st == transfer::JobState::kCancelled) &&
          bad_rank < 0) {
        bad_rank = r;
      }
    }
    if (bad_rank >= 0 && !s->transfer_cancel) {
      s->transfer_cancel = true;  // the other ranks stop at the next step
    }
    if (bad_rank >= 0 && s->transfer_error.ok() && !s->cancelled_by_client) {
      const auto leader = static_cast<transfer::JobState>(all[i]);
      const bool leader_failed =
          leader == transfer::JobState::kFailed || leader == transfer::JobState::kCancelled;
      const std::string detail =
          leader_failed && !local_error.empty()
              ? local_error
              : "rank " + std::to_string(bad_rank) + " of the instance could not pull its blocks";
      // ABORTED, not UNAVAILABLE: the context server (or the way to it) failed, not this
      // server, which a router must not take out of its pool for it.
      s->transfer_error = Aborted("KV transfer from context server '" +
                                  s->req.kv_source->server_id + "' failed: " + detail);
    }
    if (in_progress) continue;
    // Every rank is done with the blocks.
    std::unique_ptr<Sequence> owned = std::move(*it);
    transferring_.erase(it);
    DropPull(s->uid);
    {
      std::lock_guard<std::mutex> lock(inbox_mu_);
      if (s->cancelled_by_client) {
        ++transfers_cancelled_;
      } else if (bad_rank >= 0) {
        ++transfers_failed_;
      } else {
        ++transfers_done_;
      }
    }
    if (s->cancelled_by_client) {
      Finish(s, FinishReason::kCancelled);
    } else if (bad_rank >= 0) {
      HELIX_LOG(kWarn) << "engine: request " << s->req.id << ": " << s->transfer_error.message();
      Finish(s, FinishReason::kError, s->transfer_error);
    } else {
      s->num_computed = s->prompt_len;
      HELIX_LOG(kDebug) << "engine: request " << s->req.id << ": KV of " << s->prompt_len
                        << " tokens pulled from context server '" << s->req.kv_source->server_id
                        << "'";
      if (s->req.confirm_kv) {
        // Decodes once the source confirms it still held the KV after the pull.
        s->req.on_kv_done = nullptr;  // the confirmation releases it
        auto confirm = std::move(s->req.confirm_kv);
        s->req.confirm_kv = nullptr;
        confirming_.push_back(std::move(owned));
        confirm([box = kv_verdicts_, uid = s->uid](const Status& v) {
          std::lock_guard<std::mutex> lock(box->mu);
          box->list.emplace_back(uid, v);
        });
      } else {
        ReportKvDone(s, Status::Ok());
        running_.push_back(std::move(owned));
      }
    }
  }
}

Status Engine::Retain(Sequence* s, TokenEvent* ev) {
  auto it = kv_.find(s->uid);
  if (it == kv_.end()) {
    return Internal("request " + s->req.id + " has no KV to retain");
  }
  if (retained_.count(s->req.id) != 0) {
    // Two requests with one id (the engine does not make ids unique): the earlier handle may
    // be being pulled, so it stays and this one fails (its blocks go back).
    return FailedPrecondition("request id " + s->req.id +
                              " already holds retained KV; retained requests need unique ids");
  }
  const int64_t blocks = BlocksFor(s->prompt_len);
  auto* base = static_cast<uint8_t*>(pool_->base());
  const int64_t bb = pool_->block_bytes();
  Retained kept{s->uid, {}};
  if (export_mirror_ != nullptr) {
    // Device pool: the blocks go to the export-buffer blocks reserved at admission (pinned
    // memory UCX reads); the device blocks are freed once they are copied (what Retain keeps
    // out of kv_ the caller does not release).
    if (static_cast<int64_t>(s->export_blocks.size()) != blocks) {
      return Internal("request " + s->req.id + " reserved " +
                      std::to_string(s->export_blocks.size()) + " export-buffer blocks for " +
                      std::to_string(blocks));
    }
    auto* mirror = static_cast<uint8_t*>(export_mirror_.get());
    Status st = backend_->Activate();
    for (int64_t j = 0; j < blocks; ++j) {
      backend_->CopyToHostAsync(mirror + static_cast<int64_t>(s->export_blocks[j]) * bb,
                                base + static_cast<int64_t>(it->second.blocks()[j]) * bb,
                                static_cast<size_t>(bb));
    }
    if (st.ok()) st = backend_->Sync();
    if (!st.ok()) {
      ev->kv_block_addresses.clear();
      return Internal("copying the KV of request " + s->req.id +
                      " to the export buffer failed: " + st.message());
    }
    kept.export_blocks = std::move(s->export_blocks);
    s->export_blocks.clear();
    for (int32_t e : kept.export_blocks) {
      ev->kv_block_addresses.push_back(
          reinterpret_cast<uint64_t>(mirror + static_cast<int64_t>(e) * bb));
    }
    it->second.Release(pool_.get());
    kv_.erase(it);
  } else {
    for (int64_t j = 0; j < blocks; ++j) {
      ev->kv_block_addresses.push_back(
          reinterpret_cast<uint64_t>(base + static_cast<int64_t>(it->second.blocks()[j]) * bb));
    }
  }
  retained_[s->req.id] = std::move(kept);
  ev->kv_lease_token = NewLeaseToken();
  std::lock_guard<std::mutex> lock(inbox_mu_);
  retained_ids_[s->req.id] = Lease{ev->kv_lease_token, ev->kv_block_addresses,
                                   std::chrono::steady_clock::now() + options_.kv_lease};
  return Status::Ok();
}

void Engine::FreeRetained(Retained& r) {
  export_free_.insert(export_free_.end(), r.export_blocks.begin(), r.export_blocks.end());
  export_free_count_ = static_cast<int64_t>(export_free_.size());
  r.export_blocks.clear();
  if (auto it = kv_.find(r.uid); it != kv_.end()) {
    it->second.Release(pool_.get());
    kv_.erase(it);
  }
}

bool Engine::ReleaseRetained(const std::string& request_id) {
  std::lock_guard<std::mutex> lock(inbox_mu_);
  if (retained_ids_.erase(request_id) == 0) return false;
  releases_.push_back(request_id);
  return true;
}

StatusOr<Engine::Lease*> Engine::CheckLeaseLocked(const std::string& request_id,
                                                  const std::string& lease_token,
                                                  const std::vector<uint64_t>& block_addresses) {
  auto it = retained_ids_.find(request_id);
  if (it == retained_ids_.end()) {
    return NotFound("request_id '" + request_id +
                    "' holds no KV here (released, expired, or unknown)");
  }
  Lease& l = it->second;
  // Compared in time independent of where they differ (the token is a secret).
  unsigned diff = l.token.size() == lease_token.size() ? 0u : 1u;
  for (size_t i = 0; i < l.token.size(); ++i) {
    diff |= static_cast<unsigned char>(l.token[i]) ^
            static_cast<unsigned char>(i < lease_token.size() ? lease_token[i] : 0);
  }
  if (diff != 0 || l.token.empty()) {
    return PermissionDenied("the lease token does not match the one request '" + request_id +
                            "' was given; its KV stays held");
  }
  if (block_addresses != l.block_addresses) {
    return PermissionDenied("the block addresses are not the ones request '" + request_id +
                            "' holds (" + std::to_string(block_addresses.size()) + " given, " +
                            std::to_string(l.block_addresses.size()) + " held); its KV stays held");
  }
  return &l;
}

Status Engine::ReleaseLease(const std::string& request_id, const std::string& lease_token,
                            const std::vector<uint64_t>& block_addresses) {
  std::lock_guard<std::mutex> lock(inbox_mu_);
  RETURN_IF_ERROR(CheckLeaseLocked(request_id, lease_token, block_addresses).status());
  retained_ids_.erase(request_id);
  releases_.push_back(request_id);
  return Status::Ok();
}

Status Engine::RenewLease(const std::string& request_id, const std::string& lease_token,
                          const std::vector<uint64_t>& block_addresses) {
  std::lock_guard<std::mutex> lock(inbox_mu_);
  StatusOr<Lease*> l = CheckLeaseLocked(request_id, lease_token, block_addresses);
  RETURN_IF_ERROR(l.status());
  (*l)->expiry = std::chrono::steady_clock::now() + options_.kv_lease;
  return Status::Ok();
}

void Engine::ExpireLeases() {
  if (!options_.export_kv) return;  // only a context engine retains KV
  std::vector<std::string> released;
  {
    std::lock_guard<std::mutex> lock(inbox_mu_);
    released.swap(releases_);
  }
  for (const std::string& id : released) {
    if (auto it = retained_.find(id); it != retained_.end()) {
      FreeRetained(it->second);
      retained_.erase(it);
    }
  }
  const auto now = std::chrono::steady_clock::now();
  // The expiry is read and the lease dropped under one lock, so a renewal either lands before
  // (and the KV stays) or finds the lease gone (NOT_FOUND), never a lease freed after an OK.
  std::lock_guard<std::mutex> lock(inbox_mu_);
  for (auto it = retained_.begin(); it != retained_.end();) {
    auto lease = retained_ids_.find(it->first);
    // No lease: released since the swap above, freed at the next call.
    if (lease == retained_ids_.end() || now < lease->second.expiry) {
      ++it;
      continue;
    }
    HELIX_LOG(kWarn) << "engine: KV lease of request " << it->first << " expired after "
                     << options_.kv_lease.count() << " ms without a release or renewal; freeing "
                     << "its blocks";
    FreeRetained(it->second);
    retained_ids_.erase(lease);
    ++leases_expired_;
    it = retained_.erase(it);
  }
}

DisaggStats Engine::disagg_stats() const {
  DisaggStats d;
  if (kv_export() != nullptr) {  // set at Create, with transfer_ (a generation engine makes
                                 // its transfer_ later, on the engine thread)
    const transfer::TransferStats t = transfer_->stats();
    d.ucx_connections = static_cast<int64_t>(t.peers_accepted - t.peers_closed);
  }
  std::lock_guard<std::mutex> lock(inbox_mu_);
  d.retained_requests = static_cast<int64_t>(retained_ids_.size());
  d.leases_expired = leases_expired_;
  d.export_blocks_total = export_blocks_;
  d.export_blocks_free = export_free_count_;
  d.transfers_done = transfers_done_;
  d.transfers_failed = transfers_failed_;
  d.transfers_cancelled = transfers_cancelled_;
  return d;
}

void Engine::Close(const Status& error) {
  {
    std::lock_guard<std::mutex> lock(inbox_mu_);
    if (closed_.ok()) closed_ = error.ok() ? Unavailable("the engine is closed") : error;
  }
  AbortAll(error);  // with the inbox: every request submitted before the flag
}

void Engine::AbortAll(const Status& error) {
  DrainInbox();
  // This rank's own pulls must end before their blocks can be reused.
  for (auto& s : transferring_) {
    auto it = pulls_.find(s->uid);
    if (it != pulls_.end() && it->second.job != 0) {
      transfer_->Cancel(it->second.job);
      transfer_->Wait(it->second.job, options_.kv_transfer_timeout + std::chrono::seconds(5));
    }
    Finish(s.get(), FinishReason::kError, error);
  }
  transferring_.clear();
  for (auto& s : confirming_) Finish(s.get(), FinishReason::kError, error);
  confirming_.clear();
  for (auto& s : checking_) Finish(s.get(), FinishReason::kError, error);
  checking_.clear();
  for (auto& s : running_) Finish(s.get(), FinishReason::kError, error);
  for (auto& s : waiting_) Finish(s.get(), FinishReason::kError, error);
  running_.clear();
  waiting_.clear();
  PublishCounts();
}

void Engine::PublishCounts() {
  std::lock_guard<std::mutex> lock(inbox_mu_);  // the pair changes at once for request_counts
  running_count_ = static_cast<int64_t>(running_.size());
  waiting_count_ = static_cast<int64_t>(waiting_.size() + transferring_.size() + checking_.size() +
                                        confirming_.size());
}

RequestCounts Engine::request_counts() const {
  std::lock_guard<std::mutex> lock(inbox_mu_);
  return {running_count_, waiting_count_ + static_cast<int64_t>(inbox_.size())};
}

}  // namespace helix
