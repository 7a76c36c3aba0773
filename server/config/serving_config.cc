#include "server/config/serving_config.h"

#include <filesystem>
#include <fstream>
#include <optional>

#include "server/config/json_reader.h"

namespace helix::config {
namespace {

namespace fs = std::filesystem;

std::string Quote(const std::string& s) { return nlohmann::json(s).dump(); }

Status Positive(const std::string& field, int64_t v) {
  if (v >= 1) return Status::Ok();
  return InvalidArgument("config field '" + field + "' = " + std::to_string(v) +
                         ": expected a positive integer");
}

Status PositiveAtMost(const std::string& field, int64_t v, int64_t max, const std::string& unit) {
  RETURN_IF_ERROR(Positive(field, v));
  return ValidateAtMost(field, v, max, unit);
}

Status PathExists(const char* field, const std::string& path, bool allow_dir) {
  std::error_code ec;
  auto st = fs::status(path, ec);
  if (ec || !fs::exists(st)) {
    return InvalidArgument("config field '" + std::string(field) + "' = " + Quote(path) +
                           ": no such file" + (allow_dir ? " or directory" : ""));
  }
  if (!allow_dir && fs::is_directory(st)) {
    return InvalidArgument("config field '" + std::string(field) + "' = " + Quote(path) +
                           ": expected a file, found a directory");
  }
  return Status::Ok();
}

}  // namespace

std::string ResolvePath(const std::string& base_dir, const std::string& path) {
  if (path.empty() || base_dir.empty()) return path;
  fs::path p(path);
  if (p.is_absolute()) return path;
  return (fs::path(base_dir) / p).lexically_normal().string();
}

void ReadLogging(JsonReader& r, LoggingConfig* out) {
  r.Object("logging", [&](JsonReader& l) {
    l.String("level", &out->level);
    l.String("pattern", &out->pattern);
    l.String("file", &out->file);
  });
}

Status ValidateLogging(const LoggingConfig& c) {
  static const char* kLevels[] = {"trace", "debug", "info", "warn", "error", "off"};
  for (const char* l : kLevels) {
    if (c.level == l) return Status::Ok();
  }
  return InvalidArgument("config field 'logging.level' = " + Quote(c.level) +
                         ": expected one of trace, debug, info, warn, error, off");
}

Status ValidateAtMost(const std::string& field, int64_t v, int64_t max, const std::string& unit) {
  if (v <= max) return Status::Ok();
  return InvalidArgument("config field '" + field + "' = " + std::to_string(v) +
                         ": expected at most " + std::to_string(max) + " " + unit);
}

Status ValidateDurationMs(const std::string& field, int64_t v) {
  RETURN_IF_ERROR(Positive(field, v));
  return ValidateAtMost(field, v, kMaxDurationMs, "ms (30 days)");
}

nlohmann::json LoggingToJson(const LoggingConfig& c) {
  return {{"level", c.level}, {"pattern", c.pattern}, {"file", c.file}};
}

Status ServingConfig::Validate() {
  const bool gen = role == Role::kGeneration;
  if (model.empty()) return InvalidArgument("config field 'model' is required but missing");
  RETURN_IF_ERROR(PathExists("model", model, /*allow_dir=*/true));
  if (tokenizer) RETURN_IF_ERROR(PathExists("tokenizer", *tokenizer, /*allow_dir=*/true));
  if (backend != "cpu" && backend != "cuda") {
    return InvalidArgument("config field 'backend' = " + Quote(backend) +
                           ": expected \"cpu\" or \"cuda\"");
  }
  if (collectives != "auto" && collectives != "nccl" && collectives != "gloo") {
    return InvalidArgument("config field 'collectives' = " + Quote(collectives) +
                           ": expected \"auto\", \"nccl\" or \"gloo\"");
  }
  if (collectives == "nccl" && backend != "cuda") {
    return InvalidArgument(
        "config field 'collectives' = \"nccl\" needs 'backend' = \"cuda\" "
        "(NCCL runs between GPUs); backend is " +
        Quote(backend));
  }
  if (num_threads < 0) {
    return InvalidArgument("config field 'num_threads' = " + std::to_string(num_threads) +
                           ": expected 0 (all cores) or a positive thread count");
  }
  RETURN_IF_ERROR(ValidateAtMost("num_threads", num_threads, kMaxNumThreads, "threads"));
  // Both are narrowed to int for the engine; the bound keeps that exact.
  RETURN_IF_ERROR(
      PositiveAtMost("tensor_parallel_size", tensor_parallel_size, kMaxParallelSize, "ranks"));
  RETURN_IF_ERROR(
      PositiveAtMost("context_parallel_size", context_parallel_size, kMaxParallelSize, "ranks"));
  if (!gen && context_parallel_size != 1) {
    return InvalidArgument(
        "config field 'context_parallel_size' = " + std::to_string(context_parallel_size) +
        ": a context server runs with context_parallel_size 1 (Helix "
        "shards the KV cache on generation servers only)");
  }
  {
    const std::string& p = scheduler_config.capacity_scheduler_policy;
    if (p != "GUARANTEED_NO_EVICT" && p != "MAX_UTILIZATION") {
      return InvalidArgument(
          "config field 'scheduler_config.capacity_scheduler_policy' = " + Quote(p) +
          ": expected \"GUARANTEED_NO_EVICT\" (reserve each request's whole KV at admission) "
          "or \"MAX_UTILIZATION\" (grow it as it decodes, preempting by recompute)" +
          (p == "STATIC_BATCH" ? "; STATIC_BATCH is not supported" : ""));
    }
  }
  if (!gen && tensor_parallel_size != 1) {
    return InvalidArgument(
        "config field 'tensor_parallel_size' = " + std::to_string(tensor_parallel_size) +
        ": context servers support tensor_parallel_size 1 only so far");
  }

  RETURN_IF_ERROR(PositiveAtMost("kv_cache_config.tokens_per_block",
                                 kv_cache_config.tokens_per_block, kMaxTokensPerBlock,
                                 "tokens per block"));
  if (kv_cache_config.max_tokens) {
    RETURN_IF_ERROR(Positive("kv_cache_config.max_tokens", *kv_cache_config.max_tokens));
  }
  if (kv_cache_config.free_memory_fraction) {
    double f = *kv_cache_config.free_memory_fraction;
    if (!(f > 0.0 && f <= 1.0)) {
      return InvalidArgument("config field 'kv_cache_config.free_memory_fraction' = " +
                             nlohmann::json(f).dump() + ": expected a fraction in (0, 1]");
    }
  }
  const std::string& d = kv_cache_config.dtype;
  if (d != "auto" && d != "float32" && d != "float16" && d != "bfloat16") {
    return InvalidArgument("config field 'kv_cache_config.dtype' = " + Quote(d) +
                           ": expected \"auto\", \"float32\", \"float16\" or \"bfloat16\"");
  }
  if (d == "auto") kv_cache_config.dtype = backend == "cpu" ? "float32" : "bfloat16";
  if (!kv_cache_config.max_tokens && !kv_cache_config.free_memory_fraction) {
    kv_cache_config.free_memory_fraction = 0.9;
  }

  if (cp_config) {
    if (cp_config->cp_type != "HELIX") {
      return InvalidArgument("config field 'cp_config.cp_type' = " + Quote(cp_config->cp_type) +
                             ": expected \"HELIX\" (the only context-parallel type Helix "
                             "implements)");
    }
    if (cp_config->tokens_per_block) {
      RETURN_IF_ERROR(PositiveAtMost("cp_config.tokens_per_block", *cp_config->tokens_per_block,
                                     kMaxTokensPerBlock, "tokens per block"));
      if (*cp_config->tokens_per_block != kv_cache_config.tokens_per_block) {
        return InvalidArgument(
            "config fields 'cp_config.tokens_per_block' = " +
            std::to_string(*cp_config->tokens_per_block) +
            " and 'kv_cache_config.tokens_per_block' = " +
            std::to_string(kv_cache_config.tokens_per_block) +
            " must be equal (Helix places KV blocks on ranks in units of tokens_per_block)");
      }
    } else {
      cp_config->tokens_per_block = kv_cache_config.tokens_per_block;
    }
  } else if (context_parallel_size > 1) {
    return InvalidArgument(
        "config field 'context_parallel_size' = " + std::to_string(context_parallel_size) +
        ": context parallelism needs \"cp_config\": {\"cp_type\": \"HELIX\"}");
  }

  RETURN_IF_ERROR(PositiveAtMost("max_batch_size", max_batch_size, kMaxBatchSize, "requests"));
  RETURN_IF_ERROR(PositiveAtMost("max_num_tokens", max_num_tokens, kMaxTokenCount, "tokens"));
  if (max_seq_len < 0) {
    return InvalidArgument("config field 'max_seq_len' = " + std::to_string(max_seq_len) +
                           ": expected 0 (the model's maximum) or a positive length");
  }
  RETURN_IF_ERROR(ValidateAtMost("max_seq_len", max_seq_len, kMaxTokenCount, "tokens"));
  if (server.host.empty()) return InvalidArgument("config field 'server.host' must not be empty");
  if (server.port < 0 || server.port > 65535) {
    return InvalidArgument("config field 'server.port' = " + std::to_string(server.port) +
                           ": expected 0 (any free port) to 65535");
  }
  if (!gen && server.port == 0) {
    return InvalidArgument(
        "config field 'server.port' = 0: a context server needs a fixed port (its address goes "
        "into the KV handles it hands out); expected 1 to 65535");
  }
  if (server.tls_cert_file.has_value() != server.tls_key_file.has_value()) {
    return InvalidArgument(
        "config fields 'server.tls_cert_file' and 'server.tls_key_file' go together: give both "
        "(TLS) or neither");
  }
  // gRPC reads them only when the server starts listening, after the model has loaded, and
  // then says only "Invalid cert chain file": a missing file, or one that is not PEM, is named
  // here (every file is looked for before any is read).
  struct TlsFile {
    const char* field;
    const std::optional<std::string>& path;
    const char* marker;  // ends its PEM "-----BEGIN ..." line
    const char* kind;
  };
  const TlsFile tls_files[] = {
      {"server.tls_cert_file", server.tls_cert_file, "CERTIFICATE-----", "certificate"},
      {"server.tls_key_file", server.tls_key_file, "PRIVATE KEY-----", "private key"}};
  for (const TlsFile& f : tls_files) {
    if (f.path && !std::filesystem::is_regular_file(*f.path)) {
      return InvalidArgument(std::string("config field '") + f.field + "' = " + Quote(*f.path) +
                             ": no such file");
    }
  }
  for (const TlsFile& f : tls_files) {
    if (!f.path) continue;
    std::ifstream in(*f.path, std::ios::binary);
    std::string text(size_t{1} << 20, '\0');
    in.read(text.data(), static_cast<std::streamsize>(text.size()));
    if (in.bad() || (!in.eof() && !in.good())) {
      return InvalidArgument(std::string("config field '") + f.field + "' = " + Quote(*f.path) +
                             ": cannot be read");
    }
    text.resize(static_cast<size_t>(in.gcount()));
    const size_t begin = text.find("-----BEGIN ");
    if (begin == std::string::npos || text.find(f.marker, begin) == std::string::npos) {
      return InvalidArgument(std::string("config field '") + f.field + "' = " + Quote(*f.path) +
                             ": not a PEM " + f.kind + " (no '-----BEGIN " + f.marker +
                             "' line in its first MiB)");
    }
  }
  if (server.api_key && server.api_key->empty()) {
    return InvalidArgument("config field 'server.api_key' must not be empty (omit it instead)");
  }
  if (cache_transceiver_config.backend != "UCX") {
    return InvalidArgument("config field 'cache_transceiver_config.backend' = " +
                           Quote(cache_transceiver_config.backend) + ": expected \"UCX\"");
  }
  RETURN_IF_ERROR(ValidateDurationMs("cache_transceiver_config.kv_transfer_timeout_ms",
                                     cache_transceiver_config.kv_transfer_timeout_ms));
  if (!gen) RETURN_IF_ERROR(ValidateDurationMs("kv_lease_ms", kv_lease_ms));
  if (cache_transceiver_config.max_tokens_in_buffer) {
    RETURN_IF_ERROR(Positive("cache_transceiver_config.max_tokens_in_buffer",
                             *cache_transceiver_config.max_tokens_in_buffer));
  }
  if (cache_transceiver_config.ucx_listener_port < 0 ||
      cache_transceiver_config.ucx_listener_port > 65535) {
    return InvalidArgument("config field 'cache_transceiver_config.ucx_listener_port' = " +
                           std::to_string(cache_transceiver_config.ucx_listener_port) +
                           ": expected 1..65535, or 0 for a free port");
  }
  const auto& allowed = cache_transceiver_config.allowed_context_servers;
  for (size_t i = 0; i < allowed.size(); ++i) {
    RETURN_IF_ERROR(ValidateHostPort(
        "cache_transceiver_config.allowed_context_servers[" + std::to_string(i) + "]", allowed[i]));
  }
  return ValidateLogging(logging);
}

nlohmann::json ServingConfig::ToJson() const {
  nlohmann::json j;
  j["model"] = model;
  j["tokenizer"] = tokenizer ? nlohmann::json(*tokenizer) : nlohmann::json(nullptr);
  j["backend"] = backend;
  j["num_threads"] = num_threads;
  j["collectives"] = collectives;
  j["cuda_graphs"] = cuda_graphs;
  j["tensor_parallel_size"] = tensor_parallel_size;
  j["context_parallel_size"] = context_parallel_size;
  if (cp_config) {  // absent otherwise: null is not a valid cp_config (the output reads back)
    j["cp_config"] = {{"cp_type", cp_config->cp_type},
                      {"tokens_per_block",
                       cp_config->tokens_per_block.value_or(kv_cache_config.tokens_per_block)}};
  }
  auto opt_int = [](const std::optional<int64_t>& v) {
    return v ? nlohmann::json(*v) : nlohmann::json(nullptr);
  };
  j["kv_cache_config"] = {
      {"tokens_per_block", kv_cache_config.tokens_per_block},
      {"max_tokens", opt_int(kv_cache_config.max_tokens)},
      {"free_memory_fraction", kv_cache_config.free_memory_fraction
                                   ? nlohmann::json(*kv_cache_config.free_memory_fraction)
                                   : nlohmann::json(nullptr)},
      {"dtype", kv_cache_config.dtype}};
  j["max_batch_size"] = max_batch_size;
  j["max_num_tokens"] = max_num_tokens;
  j["max_seq_len"] = max_seq_len;
  if (role == Role::kGeneration) {
    j["scheduler_config"] = {
        {"capacity_scheduler_policy", scheduler_config.capacity_scheduler_policy}};
  }
  j["server"] = {{"host", server.host}, {"port", server.port}};
  if (server.tls_cert_file) j["server"]["tls_cert_file"] = *server.tls_cert_file;
  if (server.tls_key_file) j["server"]["tls_key_file"] = *server.tls_key_file;
  if (server.api_key) j["server"]["api_key"] = "<set>";  // never printed
  j["cache_transceiver_config"] = {
      {"backend", cache_transceiver_config.backend},
      {"kv_transfer_timeout_ms", cache_transceiver_config.kv_transfer_timeout_ms}};
  if (role == Role::kContext) {
    j["cache_transceiver_config"]["ucx_listener_port"] = cache_transceiver_config.ucx_listener_port;
  }
  if (!cache_transceiver_config.allowed_context_servers.empty()) {
    j["cache_transceiver_config"]["allowed_context_servers"] =
        cache_transceiver_config.allowed_context_servers;
  }
  if (cache_transceiver_config.max_tokens_in_buffer) {
    j["cache_transceiver_config"]["max_tokens_in_buffer"] =
        *cache_transceiver_config.max_tokens_in_buffer;
  }
  if (role == Role::kContext) j["kv_lease_ms"] = kv_lease_ms;
  j["logging"] = LoggingToJson(logging);
  return j;
}

StatusOr<ServingConfig> ParseServingConfig(const nlohmann::json& j, Role role,
                                           const std::string& base_dir) {
  ServingConfig c;
  c.role = role;
  JsonReader r(j, "");
  r.Require("model");
  r.String("model", &c.model);
  r.OptionalString("tokenizer", &c.tokenizer);
  r.String("backend", &c.backend);
  r.Int("num_threads", &c.num_threads);
  r.String("collectives", &c.collectives);
  r.Bool("cuda_graphs", &c.cuda_graphs);
  r.Int("tensor_parallel_size", &c.tensor_parallel_size);
  r.Int("context_parallel_size", &c.context_parallel_size);
  if (role == Role::kGeneration) {
    r.Object("cp_config", [&](JsonReader& o) {
      CpConfig cp;
      o.String("cp_type", &cp.cp_type);
      o.OptionalInt("tokens_per_block", &cp.tokens_per_block);
      c.cp_config = cp;
    });
  }
  r.Object("kv_cache_config", [&](JsonReader& o) {
    o.Int("tokens_per_block", &c.kv_cache_config.tokens_per_block);
    o.OptionalInt("max_tokens", &c.kv_cache_config.max_tokens);
    o.OptionalDouble("free_memory_fraction", &c.kv_cache_config.free_memory_fraction);
    o.String("dtype", &c.kv_cache_config.dtype);
  });
  r.Int("max_batch_size", &c.max_batch_size);
  r.Int("max_num_tokens", &c.max_num_tokens);
  r.Int("max_seq_len", &c.max_seq_len);
  if (role == Role::kGeneration) {
    r.Object("scheduler_config", [&](JsonReader& o) {
      o.String("capacity_scheduler_policy", &c.scheduler_config.capacity_scheduler_policy);
    });
  }
  r.Object("server", [&](JsonReader& o) {
    o.String("host", &c.server.host);
    o.Int("port", &c.server.port);
    o.OptionalString("tls_cert_file", &c.server.tls_cert_file);
    o.OptionalString("tls_key_file", &c.server.tls_key_file);
    o.OptionalString("api_key", &c.server.api_key);
  });
  r.Object("cache_transceiver_config", [&](JsonReader& o) {
    o.String("backend", &c.cache_transceiver_config.backend);
    o.Int("kv_transfer_timeout_ms", &c.cache_transceiver_config.kv_transfer_timeout_ms);
    o.OptionalInt("max_tokens_in_buffer", &c.cache_transceiver_config.max_tokens_in_buffer);
    if (role == Role::kGeneration) {
      o.StringList("allowed_context_servers", &c.cache_transceiver_config.allowed_context_servers);
    } else {
      o.Int("ucx_listener_port", &c.cache_transceiver_config.ucx_listener_port);
    }
  });
  if (role == Role::kContext) r.Int("kv_lease_ms", &c.kv_lease_ms);
  ReadLogging(r, &c.logging);
  RETURN_IF_ERROR(r.Finish());

  c.model = ResolvePath(base_dir, c.model);
  if (c.tokenizer) c.tokenizer = ResolvePath(base_dir, *c.tokenizer);
  c.logging.file = ResolvePath(base_dir, c.logging.file);
  if (c.server.tls_cert_file)
    c.server.tls_cert_file = ResolvePath(base_dir, *c.server.tls_cert_file);
  if (c.server.tls_key_file) c.server.tls_key_file = ResolvePath(base_dir, *c.server.tls_key_file);
  RETURN_IF_ERROR(c.Validate());
  return c;
}

StatusOr<ServingConfig> LoadServingConfig(const std::string& path, Role role) {
  ASSIGN_OR_RETURN(nlohmann::json j, ReadJsonFile(path));
  std::string base = fs::absolute(fs::path(path)).parent_path().string();
  auto c = ParseServingConfig(j, role, base);
  if (!c.ok()) return c.status().WithPrefix(path);
  return c;
}

}  // namespace helix::config
