// Option structs for the two model-serving roles (generation server, context server),
// parsed once from JSON, validated, and printable in resolved form. Plain values; not shared.
// Field names follow TensorRT-LLM's LLM API where one exists.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "engine/common/status.h"

namespace helix::config {

enum class Role { kGeneration, kContext };

// Upper bounds Validate() enforces, so that no accepted value overflows the engine's arithmetic
// (block bytes, std::chrono deadlines) or is truncated where it is narrowed to int.
inline constexpr int64_t kMaxTokensPerBlock = 65536;
inline constexpr int64_t kMaxParallelSize = 1024;  // tensor_parallel_size, context_parallel_size
inline constexpr int64_t kMaxNumThreads = 4096;
inline constexpr int64_t kMaxBatchSize = int64_t{1} << 20;
inline constexpr int64_t kMaxTokenCount = 2147483647;  // max_num_tokens, max_seq_len: int32
inline constexpr int64_t kMaxDurationMs = int64_t{30} * 24 * 3600 * 1000;  // 30 days, any *_ms

struct CpConfig {
  std::string cp_type = "HELIX";
  std::optional<int64_t> tokens_per_block;  // defaults to kv_cache_config.tokens_per_block
};

struct KvCacheConfig {
  int64_t tokens_per_block = 32;
  std::optional<int64_t> max_tokens;           // per rank; with free_memory_fraction: the smaller
  std::optional<double> free_memory_fraction;  // of the memory left after weights, (0, 1]
  std::string dtype = "auto";                  // auto | float32 | float16 | bfloat16
};

// TensorRT-LLM's scheduler_config. GUARANTEED_NO_EVICT reserves each request's whole KV
// (prompt + max_tokens) at admission; MAX_UTILIZATION admits with the prompt's blocks, grows
// as it decodes and preempts (recomputes) the newest requests when the pool runs out, as vLLM
// does (EngineOptions::kv_preemption).
struct SchedulerConfig {
  std::string capacity_scheduler_policy = "GUARANTEED_NO_EVICT";
};

struct ServerEndpoint {
  std::string host = "127.0.0.1";
  int port = 50051;
  // TLS: PEM certificate chain and private key files, both or neither.
  std::optional<std::string> tls_cert_file, tls_key_file;
  // When set, every service RPC must carry "authorization: Bearer <api_key>" (health is open).
  std::optional<std::string> api_key;
};

struct CacheTransceiverConfig {
  std::string backend = "UCX";
  int64_t kv_transfer_timeout_ms = 30000;
  // On a device backend, pinned host memory in tokens (UCX reads and writes host memory). A
  // context server: the retained KV it hands out from (unset: as many tokens as the KV pool).
  // A generation rank: the staging one pull goes through, as a ring of blocks (unset: 256 MiB).
  std::optional<int64_t> max_tokens_in_buffer;
  // A generation server: the context servers (host:port) whose KV handles it takes. A handle
  // naming another address is refused before the server is contacted (its rkey and worker
  // address reach UCX, which aborts on bad ones). Empty: any address a handle names (trust the
  // clients: use server.api_key).
  std::vector<std::string> allowed_context_servers;
  // A context server: the port of its UCX listener, where generation ranks connect to pull
  // (bound on server.host; 0: one the kernel picks, named in the handles).
  int ucx_listener_port = 0;
};

struct LoggingConfig {
  std::string level = "info";  // trace | debug | info | warn | error | off
  std::string pattern = "%Y-%m-%dT%H:%M:%S.%e %^%l%$ [%n] %v";
  std::string file;  // empty: stderr
};

struct ServingConfig {
  Role role = Role::kGeneration;
  std::string model;  // file (.bin/.gguf) or Hugging Face directory
  std::optional<std::string> tokenizer;
  std::string backend = "cpu";  // cpu | cuda
  int num_threads = 0;          // CPU backend threads per rank; 0 = all cores
  // cuda backend: "auto" | "nccl" | "gloo" (EngineOptions::collectives) and CUDA graphs of the
  // decode step on one rank (EngineOptions::cuda_graphs).
  std::string collectives = "auto";
  bool cuda_graphs = true;
  int64_t tensor_parallel_size = 1;
  int64_t context_parallel_size = 1;
  std::optional<CpConfig> cp_config;
  KvCacheConfig kv_cache_config;
  int64_t max_batch_size = 64;
  int64_t max_num_tokens = 8192;
  int64_t max_seq_len = 0;           // 0 = the model's own maximum
  SchedulerConfig scheduler_config;  // generation servers
  ServerEndpoint server;
  CacheTransceiverConfig cache_transceiver_config;
  int64_t kv_lease_ms = 30000;  // context server: free un-pulled KV after this long
  LoggingConfig logging;

  // Checks values and cross-field rules; fills derived defaults (cp_config.tokens_per_block,
  // kv dtype "auto", free_memory_fraction). Relative paths are left as they are.
  Status Validate();
  nlohmann::json ToJson() const;
};

// Parses a config document for `role`. Paths (model, tokenizer, logging.file) are resolved
// against `base_dir` when relative. Returns the validated config or an error naming the field.
StatusOr<ServingConfig> ParseServingConfig(const nlohmann::json& j, Role role,
                                           const std::string& base_dir);
// Reads, parses and validates a config file; relative paths are taken from the file's folder.
StatusOr<ServingConfig> LoadServingConfig(const std::string& path, Role role);

// Shared pieces, also used by the router config.
void ReadLogging(class JsonReader& r, LoggingConfig* out);
Status ValidateLogging(const LoggingConfig& c);
// A duration field in milliseconds: 1..kMaxDurationMs, the error naming `field`.
Status ValidateDurationMs(const std::string& field, int64_t v);
// Refuses v > max: "config field '<field>' = <v>: expected at most <max> <unit>".
Status ValidateAtMost(const std::string& field, int64_t v, int64_t max, const std::string& unit);
nlohmann::json LoggingToJson(const LoggingConfig& c);
std::string ResolvePath(const std::string& base_dir, const std::string& path);

}  // namespace helix::config
