#include "server/config/router_config.h"

#include <algorithm>
#include <charconv>
#include <filesystem>
#include <system_error>

#include "server/config/json_reader.h"

namespace helix::config {
namespace {

namespace fs = std::filesystem;

Status ValidatePool(const std::string& name, const ServerPoolConfig& p, bool may_be_empty) {
  if (p.urls.empty() && !may_be_empty) {
    return InvalidArgument("config field '" + name + ".urls' must list at least one server");
  }
  for (size_t i = 0; i < p.urls.size(); ++i) {
    RETURN_IF_ERROR(ValidateHostPort(name + ".urls[" + std::to_string(i) + "]", p.urls[i]));
  }
  if (p.router_type != "round_robin" && p.router_type != "load_balancing") {
    return InvalidArgument("config field '" + name +
                           ".router.type' = " + nlohmann::json(p.router_type).dump() +
                           ": expected \"round_robin\" or \"load_balancing\"");
  }
  return Status::Ok();
}

void ReadPool(JsonReader& r, const char* key, ServerPoolConfig* out) {
  r.Object(key, [&](JsonReader& o) {
    o.StringList("urls", &out->urls);
    o.Object("router", [&](JsonReader& rt) { rt.String("type", &out->router_type); });
  });
}

nlohmann::json PoolToJson(const ServerPoolConfig& p) {
  return {{"urls", p.urls}, {"router", {{"type", p.router_type}}}};
}

}  // namespace

Status RouterConfig::Validate() {
  if (server.host.empty()) return InvalidArgument("config field 'server.host' must not be empty");
  if (server.port < 0 || server.port > 65535) {
    return InvalidArgument("config field 'server.port' = " + std::to_string(server.port) +
                           ": expected 0 (any free port) to 65535");
  }
  if (grpc_port < 0 || grpc_port > 65535) {
    return InvalidArgument("config field 'grpc_port' = " + std::to_string(grpc_port) +
                           ": expected 0 (off) to 65535");
  }
  if (grpc_port != 0 && grpc_port == server.port) {
    return InvalidArgument("config field 'grpc_port' = " + std::to_string(grpc_port) +
                           " is also 'server.port': the HTTP and gRPC fronts need a port each");
  }
  if (model.empty()) return InvalidArgument("config field 'model' is required but missing");
  if (!fs::exists(model)) {
    return InvalidArgument("config field 'model' = " + nlohmann::json(model).dump() +
                           ": no such file or directory");
  }
  if (tokenizer && !fs::exists(*tokenizer)) {
    return InvalidArgument("config field 'tokenizer' = " + nlohmann::json(*tokenizer).dump() +
                           ": no such file or directory");
  }
  if (served_model_name.empty()) served_model_name = fs::path(model).stem().string();
  if (!chat_template.empty() && chat_template != "chatml" && chat_template != "llama3" &&
      chat_template != "llama2" && chat_template.find("{%") == std::string::npos &&
      chat_template.find("{{") == std::string::npos) {
    return InvalidArgument(
        "config field 'chat_template' = " + nlohmann::json(chat_template).dump() +
        ": expected chatml, llama3, llama2 or a Jinja template");
  }
  // Context servers are optional: without them every request runs aggregated.
  RETURN_IF_ERROR(ValidatePool("context_servers", context_servers, /*may_be_empty=*/true));
  RETURN_IF_ERROR(ValidatePool("generation_servers", generation_servers, false));
  auto non_negative = [](const char* f, int64_t v) -> Status {
    if (v >= 0) return Status::Ok();
    return InvalidArgument("config field '" + std::string(f) + "' = " + std::to_string(v) +
                           ": expected a non-negative integer");
  };
  auto positive = [](const char* f, int64_t v) -> Status {
    if (v >= 1) return Status::Ok();
    return InvalidArgument("config field '" + std::string(f) + "' = " + std::to_string(v) +
                           ": expected a positive integer");
  };
  RETURN_IF_ERROR(
      non_negative("conditional_disagg.max_local_prefill_length", max_local_prefill_length));
  RETURN_IF_ERROR(non_negative("max_retries", max_retries));
  RETURN_IF_ERROR(ValidateDurationMs("request_timeout_ms", request_timeout_ms));
  RETURN_IF_ERROR(ValidateDurationMs("health_check_interval_ms", health_check_interval_ms));
  RETURN_IF_ERROR(positive("max_inflight_requests", max_inflight_requests));
  // The HTTP front sizes its thread pool from it (narrowed to int).
  RETURN_IF_ERROR(ValidateAtMost("max_inflight_requests", max_inflight_requests,
                                 kMaxInflightRequests, "requests"));
  RETURN_IF_ERROR(positive("max_request_bytes", max_request_bytes));
  if (api_key && api_key->empty()) {
    return InvalidArgument("config field 'api_key' must not be empty (omit it or use null)");
  }
  for (size_t i = 0; i < cors_allowed_origins.size(); ++i) {
    const std::string& o = cors_allowed_origins[i];
    const size_t scheme = o.rfind("http://", 0) == 0 ? 7 : o.rfind("https://", 0) == 0 ? 8 : 0;
    // An origin is a scheme and a host with an optional port: no path, not even "/"; as browsers
    // send it, in lowercase and without a default port.
    const bool origin =
        scheme > 0 && o.size() > scheme && o.find_first_of("/?#@ ", scheme) == std::string::npos &&
        std::none_of(o.begin(), o.end(), [](char ch) { return ch >= 'A' && ch <= 'Z'; }) &&
        !(scheme == 7 && o.size() > 3 && o.compare(o.size() - 3, 3, ":80") == 0) &&
        !(scheme == 8 && o.size() > 4 && o.compare(o.size() - 4, 4, ":443") == 0);
    if (o != "*" && !origin) {
      return InvalidArgument("config field 'cors_allowed_origins[" + std::to_string(i) + "]' = \"" +
                             o +
                             "\": expected \"*\" or an origin such as \"https://host:port\" "
                             "(scheme and host in lowercase, no path, no default port)");
    }
  }
  return ValidateLogging(logging);
}

nlohmann::json RouterConfig::ToJson() const {
  nlohmann::json j;
  j["server"] = {{"host", server.host}, {"port", server.port}};
  j["grpc_port"] = grpc_port;
  j["model"] = model;
  j["tokenizer"] = tokenizer ? nlohmann::json(*tokenizer) : nlohmann::json(nullptr);
  j["served_model_name"] = served_model_name;
  j["chat_template"] = chat_template;
  j["context_servers"] = PoolToJson(context_servers);
  j["generation_servers"] = PoolToJson(generation_servers);
  j["conditional_disagg"] = {{"max_local_prefill_length", max_local_prefill_length}};
  j["max_retries"] = max_retries;
  j["request_timeout_ms"] = request_timeout_ms;
  j["health_check_interval_ms"] = health_check_interval_ms;
  j["max_inflight_requests"] = max_inflight_requests;
  j["max_request_bytes"] = max_request_bytes;
  j["api_key"] = api_key ? nlohmann::json("<set>") : nlohmann::json(nullptr);
  j["cors_allowed_origins"] = cors_allowed_origins;
  j["logging"] = LoggingToJson(logging);
  return j;
}

StatusOr<RouterConfig> ParseRouterConfig(const nlohmann::json& j, const std::string& base_dir) {
  RouterConfig c;
  JsonReader r(j, "");
  r.Object("server", [&](JsonReader& o) {
    o.String("host", &c.server.host);
    o.Int("port", &c.server.port);
  });
  r.Int("grpc_port", &c.grpc_port);
  r.Require("model");
  r.String("model", &c.model);
  r.OptionalString("tokenizer", &c.tokenizer);
  r.String("served_model_name", &c.served_model_name);
  r.String("chat_template", &c.chat_template);
  ReadPool(r, "context_servers", &c.context_servers);
  r.Require("generation_servers");
  ReadPool(r, "generation_servers", &c.generation_servers);
  r.Object("conditional_disagg",
           [&](JsonReader& o) { o.Int("max_local_prefill_length", &c.max_local_prefill_length); });
  r.Int("max_retries", &c.max_retries);
  r.Int("request_timeout_ms", &c.request_timeout_ms);
  r.Int("health_check_interval_ms", &c.health_check_interval_ms);
  r.Int("max_inflight_requests", &c.max_inflight_requests);
  r.Int("max_request_bytes", &c.max_request_bytes);
  r.OptionalString("api_key", &c.api_key);
  r.StringList("cors_allowed_origins", &c.cors_allowed_origins);
  ReadLogging(r, &c.logging);
  RETURN_IF_ERROR(r.Finish());
  c.model = ResolvePath(base_dir, c.model);
  if (c.tokenizer) c.tokenizer = ResolvePath(base_dir, *c.tokenizer);
  c.logging.file = ResolvePath(base_dir, c.logging.file);
  RETURN_IF_ERROR(c.Validate());
  return c;
}

StatusOr<RouterConfig> LoadRouterConfig(const std::string& path) {
  ASSIGN_OR_RETURN(nlohmann::json j, ReadJsonFile(path));
  std::string base = fs::absolute(fs::path(path)).parent_path().string();
  auto c = ParseRouterConfig(j, base);
  if (!c.ok()) return c.status().WithPrefix(path);
  return c;
}

}  // namespace helix::config
