#include "server/common/serve_setup.h"

#include <fstream>
#include <iterator>

namespace helix::server {

EngineOptions EngineOptionsFromConfig(const config::ServingConfig& cfg) {
  EngineOptions o;
  o.model_path = cfg.model;
  o.tokenizer_path = cfg.tokenizer.value_or("");
  o.num_threads = cfg.num_threads;
  o.backend = cfg.backend;
  o.collectives = cfg.collectives;
  o.cuda_graphs = cfg.cuda_graphs;
  o.tokens_per_block = cfg.kv_cache_config.tokens_per_block;
  o.kv_dtype = kernels::DTypeFromName(cfg.kv_cache_config.dtype).value_or(kernels::DType::kF32);
  o.kv_max_tokens = cfg.kv_cache_config.max_tokens;
  o.kv_free_memory_fraction = cfg.kv_cache_config.free_memory_fraction;
  o.max_batch_size = cfg.max_batch_size;
  o.max_num_tokens = cfg.max_num_tokens;
  o.max_seq_len = cfg.max_seq_len;
  o.kv_preemption = cfg.scheduler_config.capacity_scheduler_policy == "MAX_UTILIZATION";
  o.tensor_parallel = static_cast<int>(cfg.tensor_parallel_size);
  o.context_parallel = static_cast<int>(cfg.context_parallel_size);
  o.kv_staging_tokens = cfg.cache_transceiver_config.max_tokens_in_buffer.value_or(0);
  o.kv_transfer_timeout =
      std::chrono::milliseconds(cfg.cache_transceiver_config.kv_transfer_timeout_ms);
  return o;
}

std::shared_ptr<grpc::ServerCredentials> ServerCredentialsFor(const config::ServerEndpoint& e) {
  if (!e.tls_cert_file) return grpc::InsecureServerCredentials();
  const auto read = [](const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  };
  grpc::SslServerCredentialsOptions ssl;
  ssl.pem_key_cert_pairs.push_back({read(*e.tls_key_file), read(*e.tls_cert_file)});
  return grpc::SslServerCredentials(ssl);
}

grpc::Status CheckBearer(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata,
                         const std::string& api_key) {
  if (api_key.empty()) return grpc::Status::OK;
  const auto it = metadata.find("authorization");
  if (it != metadata.end() &&
      std::string(it->second.data(), it->second.size()) == "Bearer " + api_key) {
    return grpc::Status::OK;
  }
  return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                      "missing or wrong \"authorization: Bearer <api key>\" metadata");
}

std::string JoinHostPort(const std::string& host, int port) {
  const bool bare_v6 = host.find(':') != std::string::npos && host.front() != '[';
  return (bare_v6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

}  // namespace helix::server
