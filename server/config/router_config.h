// Option struct for the router (helix-router), in the spirit of trtllm-serve's disaggregated
// config: context and generation server pools, each with a routing policy. Plain values.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/common/status.h"
#include "server/config/serving_config.h"

namespace helix::config {

inline constexpr int64_t kMaxInflightRequests = int64_t{1} << 20;

struct ServerPoolConfig {
  std::vector<std::string> urls;            // "host:port" of each server's gRPC endpoint
  std::string router_type = "round_robin";  // round_robin | load_balancing
};

struct RouterConfig {
  // OpenAI-compatible HTTP front (127.0.0.1:8000 by default).
  ServerEndpoint server = [] {
    ServerEndpoint e;
    e.port = 8000;
    return e;
  }();
  int grpc_port = 0;  // gRPC front; 0 = off
  std::string model;  // tokenizer source: model file or HF directory
  std::optional<std::string> tokenizer;
  std::string served_model_name;  // name in /v1/models; default: model file stem
  // Chat template override: "chatml", "llama3", "llama2", or Jinja source to recognise;
  // empty = the model's own (GGUF tokenizer.chat_template / tokenizer_config.json).
  std::string chat_template;
  ServerPoolConfig context_servers;
  ServerPoolConfig generation_servers;
  int64_t max_local_prefill_length = 0;  // conditional_disagg; 0 = always disaggregate
  int64_t max_retries = 1;
  int64_t request_timeout_ms = 600000;
  int64_t health_check_interval_ms = 1000;
  int64_t max_inflight_requests = 256;
  int64_t max_request_bytes = 1 << 20;
  std::optional<std::string> api_key;
  // Browser origins ("https://host[:port]", or "*" for any) whose pages may call the HTTP
  // front (CORS: preflight OPTIONS answered, Access-Control-Allow-Origin on responses). Empty:
  // no CORS headers (vLLM allows every origin by default; here it is opt-in).
  std::vector<std::string> cors_allowed_origins;
  LoggingConfig logging;

  Status Validate();
  nlohmann::json ToJson() const;
};

StatusOr<RouterConfig> ParseRouterConfig(const nlohmann::json& j, const std::string& base_dir);
StatusOr<RouterConfig> LoadRouterConfig(const std::string& path);

}  // namespace helix::config
