// Table-driven tests of config parsing and validation for the three roles, and a check that
// every file shipped in configs/ is valid.
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include <unistd.h>

#include <gtest/gtest.h>

#include "server/config/json_reader.h"
#include "server/config/router_config.h"
#include "server/config/serving_config.h"

namespace helix::config {
namespace {

namespace fs = std::filesystem;

class ConfigTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("helix_config_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
    std::ofstream(dir_ / "model.bin") << "weights";
    std::ofstream(dir_ / "tok.bin") << "tokenizer";
    // PEM-shaped (gRPC checks their contents when a server starts; Validate the markers).
    std::ofstream(dir_ / "cert.pem")
        << "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    std::ofstream(dir_ / "key.pem")
        << "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n";
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Writes `text` to a file and loads it for `role`.
  StatusOr<ServingConfig> Load(const std::string& text, Role role = Role::kGeneration) {
    fs::path p = dir_ / "cfg.json";
    std::ofstream(p) << text;
    return LoadServingConfig(p.string(), role);
  }
  fs::path dir_;
};

const char kMinimal[] = R"({"model": "model.bin"})";

TEST_F(ConfigTest, MinimalGenerationConfigGetsDefaults) {
  auto c = Load(kMinimal);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->model, (dir_ / "model.bin").string());  // resolved against the config's folder
  EXPECT_EQ(c->backend, "cpu");
  EXPECT_EQ(c->context_parallel_size, 1);
  EXPECT_EQ(c->kv_cache_config.tokens_per_block, 32);
  EXPECT_EQ(c->kv_cache_config.dtype, "float32");  // "auto" on the CPU
  ASSERT_TRUE(c->kv_cache_config.free_memory_fraction.has_value());
  EXPECT_DOUBLE_EQ(*c->kv_cache_config.free_memory_fraction, 0.9);
  EXPECT_EQ(c->server.host, "127.0.0.1");
  nlohmann::json j = c->ToJson();
  EXPECT_FALSE(j.contains("cp_config"));
  EXPECT_EQ(j["kv_cache_config"]["dtype"], "float32");
  EXPECT_FALSE(j.contains("kv_lease_ms"));
  EXPECT_EQ(j["scheduler_config"]["capacity_scheduler_policy"], "GUARANTEED_NO_EVICT");
  auto m = Load(R"({"model": "model.bin",
                    "scheduler_config": {"capacity_scheduler_policy": "MAX_UTILIZATION"}})");
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(m->scheduler_config.capacity_scheduler_policy, "MAX_UTILIZATION");
  EXPECT_EQ(m->ToJson()["scheduler_config"]["capacity_scheduler_policy"], "MAX_UTILIZATION");
}

// check-config's output reads back as the same config, for every role (a null cp_config was
// refused by the generation role and unknown to the context role).
TEST_F(ConfigTest, PrintedConfigReadsBack) {
  for (const auto& [role, text] :
       {std::pair{Role::kGeneration, std::string(kMinimal)},
        std::pair{Role::kGeneration,
                  std::string(R"({"model": "model.bin", "context_parallel_size": 2,
                                  "cp_config": {"cp_type": "HELIX"}})")},
        std::pair{Role::kContext,
                  std::string(R"({"model": "model.bin", "server": {"port": 50051}})")}}) {
    auto c = Load(text, role);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    const nlohmann::json printed = c->ToJson();
    auto again = Load(printed.dump(), role);
    ASSERT_TRUE(again.ok()) << again.status().ToString() << "\n" << printed.dump(2);
    EXPECT_EQ(again->ToJson(), printed);
  }
}

TEST_F(ConfigTest, HelixConfigFillsCpTokensPerBlock) {
  auto c = Load(R"({"model": "model.bin", "context_parallel_size": 4,
                    "cp_config": {"cp_type": "HELIX"},
                    "kv_cache_config": {"tokens_per_block": 16}, "backend": "cuda"})");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->cp_config->tokens_per_block, 16);
  EXPECT_EQ(c->kv_cache_config.dtype, "bfloat16");  // "auto" on CUDA
  EXPECT_EQ(c->ToJson()["cp_config"]["tokens_per_block"], 16);
}

struct BadCase {
  const char* name;
  Role role;
  std::string json;
  std::vector<std::string> expect;  // substrings the error message must contain
};

class BadConfigTest : public ConfigTest, public ::testing::WithParamInterface<BadCase> {};

TEST_P(BadConfigTest, RejectedWithAClearMessage) {
  const BadCase& bc = GetParam();
  auto c = Load(bc.json, bc.role);
  ASSERT_FALSE(c.ok()) << "accepted: " << bc.json;
  EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument) << c.status().ToString();
  for (const auto& s : bc.expect) {
    EXPECT_NE(c.status().message().find(s), std::string::npos)
        << "message lacks \"" << s << "\": " << c.status().message();
  }
}

const Role G = Role::kGeneration;
const Role C = Role::kContext;

INSTANTIATE_TEST_SUITE_P(
    Cases, BadConfigTest,
    ::testing::Values(
        BadCase{"UnknownTopLevelKey",
                G,
                R"({"model": "model.bin", "modle": "x"})",
                {"unknown config field 'modle'"}},
        BadCase{"UnknownNestedKey",
                G,
                R"({"model": "model.bin", "kv_cache_config": {"token_per_block": 8}})",
                {"unknown config field 'kv_cache_config.token_per_block'"}},
        BadCase{"TlsCertWithoutKey",
                G,
                R"({"model": "model.bin", "server": {"tls_cert_file": "model.bin"}})",
                {"'server.tls_cert_file' and 'server.tls_key_file' go together"}},
        BadCase{"TlsKeyFileMissing",
                G,
                R"({"model": "model.bin",
                    "server": {"tls_cert_file": "model.bin", "tls_key_file": "nope.pem"}})",
                {"'server.tls_key_file'", "no such file"}},
        BadCase{"TlsCertNotPem",
                G,
                R"({"model": "model.bin",
                    "server": {"tls_cert_file": "model.bin", "tls_key_file": "key.pem"}})",
                {"'server.tls_cert_file'", "not a PEM certificate"}},
        BadCase{"TlsKeyNotPem",
                C,
                R"({"model": "model.bin",
                    "server": {"port": 5000, "tls_cert_file": "cert.pem", "tls_key_file": "cert.pem"}})",
                {"'server.tls_key_file'", "not a PEM private key", "PRIVATE KEY-----"}},
        BadCase{"EmptyApiKey",
                G,
                R"({"model": "model.bin", "server": {"api_key": ""}})",
                {"'server.api_key' must not be empty"}},
        BadCase{"WrongTypeString",
                G,
                R"({"model": "model.bin", "context_parallel_size": "2"})",
                {"context_parallel_size", "expected an integer", "string \"2\""}},
        BadCase{"WrongTypeFloat",
                G,
                R"({"model": "model.bin", "max_batch_size": 1.5})",
                {"max_batch_size", "expected an integer", "number 1.5"}},
        BadCase{"WrongTypeObject",
                G,
                R"({"model": "model.bin", "kv_cache_config": 32})",
                {"kv_cache_config", "expected an object"}},
        BadCase{"RootNotObject", G, R"([1, 2])", {"expected an object", "array"}},
        // The parser would keep the last silently.
        BadCase{"DuplicateKey",
                G,
                R"({"model": "model.bin", "max_batch_size": 4, "max_batch_size": 8})",
                {"key 'max_batch_size' appears twice"}},
        BadCase{"DuplicateNestedKey",
                G,
                R"({"model": "model.bin",
                    "kv_cache_config": {"tokens_per_block": 16, "tokens_per_block": 32}})",
                {"key 'tokens_per_block' appears twice"}},
        BadCase{"AllowListEntryNotHostPort",
                G,
                R"({"model": "model.bin",
                    "cache_transceiver_config": {"allowed_context_servers": ["ctx1", "h:1"]}})",
                {"'cache_transceiver_config.allowed_context_servers[0]' = \"ctx1\"", "host:port"}},
        // As the router checks its own server lists (port range, no URL scheme).
        BadCase{"AllowListEntryPortOutOfRange",
                G,
                R"({"model": "model.bin",
                    "cache_transceiver_config": {"allowed_context_servers": ["h:99999"]}})",
                {"allowed_context_servers[0]' = \"h:99999\"", "1..65535"}},
        BadCase{"AllowListEntryUrl",
                G,
                R"({"model": "model.bin",
                    "cache_transceiver_config": {"allowed_context_servers": ["http://h:1"]}})",
                {"allowed_context_servers[0]'", "drop \"http://\""}},
        BadCase{"AllowListOnAContextServer",
                C,
                R"({"model": "model.bin", "server": {"port": 9},
                    "cache_transceiver_config": {"allowed_context_servers": ["h:1"]}})",
                {"allowed_context_servers"}},
        BadCase{"NcclOnTheCpu",
                G,
                R"({"model": "model.bin", "collectives": "nccl"})",
                {"'collectives' = \"nccl\" needs 'backend' = \"cuda\"", "\"cpu\""}},
        BadCase{"CpTypeNotHelix",
                G,
                R"({"model": "model.bin", "context_parallel_size": 2,
                    "cp_config": {"cp_type": "ULYSSES"}})",
                {"cp_config.cp_type", "ULYSSES", "HELIX"}},
        BadCase{"UnknownCapacitySchedulerPolicy",
                G,
                R"({"model": "model.bin",
                    "scheduler_config": {"capacity_scheduler_policy": "STATIC_BATCH"}})",
                {"scheduler_config.capacity_scheduler_policy", "STATIC_BATCH is not supported",
                 "GUARANTEED_NO_EVICT", "MAX_UTILIZATION"}},
        BadCase{"SchedulerConfigOnAContextServer",
                C,
                R"({"model": "model.bin", "server": {"port": 9},
                    "scheduler_config": {"capacity_scheduler_policy": "MAX_UTILIZATION"}})",
                {"scheduler_config"}},
        BadCase{"CpWithoutCpConfig",
                G,
                R"({"model": "model.bin", "context_parallel_size": 2})",
                {"context_parallel_size", "cp_config", "HELIX"}},
        BadCase{"TokensPerBlockMismatch",
                G,
                R"({"model": "model.bin", "context_parallel_size": 2,
                    "cp_config": {"cp_type": "HELIX", "tokens_per_block": 16},
                    "kv_cache_config": {"tokens_per_block": 32}})",
                {"cp_config.tokens_per_block' = 16", "kv_cache_config.tokens_per_block' = 32",
                 "must be equal"}},
        BadCase{"ZeroTp",
                G,
                R"({"model": "model.bin", "tensor_parallel_size": 0})",
                {"tensor_parallel_size", "= 0", "positive"}},
        BadCase{"NegativeCp",
                G,
                R"({"model": "model.bin", "context_parallel_size": -1})",
                {"context_parallel_size", "= -1", "positive"}},
        BadCase{"ZeroTokensPerBlock",
                G,
                R"({"model": "model.bin", "kv_cache_config": {"tokens_per_block": 0}})",
                {"kv_cache_config.tokens_per_block", "positive"}},
        BadCase{"ZeroCpTokensPerBlock",
                G,
                R"({"model": "model.bin", "cp_config": {"cp_type": "HELIX",
                    "tokens_per_block": 0}})",
                {"cp_config.tokens_per_block", "positive"}},
        BadCase{"ZeroMaxTokens",
                G,
                R"({"model": "model.bin", "kv_cache_config": {"max_tokens": 0}})",
                {"kv_cache_config.max_tokens", "positive"}},
        BadCase{"ZeroBatch",
                G,
                R"({"model": "model.bin", "max_batch_size": 0})",
                {"max_batch_size", "positive"}},
        BadCase{"ZeroNumTokens",
                G,
                R"({"model": "model.bin", "max_num_tokens": 0})",
                {"max_num_tokens", "positive"}},
        BadCase{"NegativeSeqLen",
                G,
                R"({"model": "model.bin", "max_seq_len": -5})",
                {"max_seq_len", "-5"}},
        BadCase{"BadFraction",
                G,
                R"({"model": "model.bin", "kv_cache_config": {"free_memory_fraction": 1.5}})",
                {"free_memory_fraction", "1.5", "(0, 1]"}},
        BadCase{"BadKvDtype",
                G,
                R"({"model": "model.bin", "kv_cache_config": {"dtype": "int8"}})",
                {"kv_cache_config.dtype", "int8"}},
        BadCase{"BadBackend",
                G,
                R"({"model": "model.bin", "backend": "tpu"})",
                {"backend", "tpu", "\"cpu\" or \"cuda\""}},
        BadCase{"BadCollectives",
                G,
                R"({"model": "model.bin", "collectives": "mpi"})",
                {"collectives", "mpi", "\"nccl\""}},
        BadCase{"CudaGraphsNotBool",
                G,
                R"({"model": "model.bin", "cuda_graphs": "yes"})",
                {"cuda_graphs"}},
        BadCase{"BadPort",
                G,
                R"({"model": "model.bin", "server": {"port": 70000}})",
                {"server.port", "70000"}},
        BadCase{"BadTransceiver",
                G,
                R"({"model": "model.bin", "cache_transceiver_config": {"backend": "NIXL"}})",
                {"cache_transceiver_config.backend", "NIXL", "UCX"}},
        BadCase{"BadTransferTimeout",
                G,
                R"({"model": "model.bin",
                    "cache_transceiver_config": {"kv_transfer_timeout_ms": 0}})",
                {"kv_transfer_timeout_ms", "positive"}},
        BadCase{"BadLogLevel",
                G,
                R"({"model": "model.bin", "logging": {"level": "verbose"}})",
                {"logging.level", "verbose"}},
        BadCase{"MissingModelKey", G, R"({"backend": "cpu"})", {"'model' is required"}},
        BadCase{"MissingModelFile",
                G,
                R"({"model": "nowhere/missing.bin"})",
                {"model", "missing.bin", "no such file"}},
        BadCase{"MissingTokenizerFile",
                G,
                R"({"model": "model.bin", "tokenizer": "nope.bin"})",
                {"tokenizer", "nope.bin", "no such file"}},
        BadCase{"TruncatedJson",
                G,
                "{\"model\": \"model.bin\",\n  \"backend\": \"cp",
                {"cfg.json:2:", "invalid JSON"}},
        BadCase{"TrailingComma",
                G,
                "{\n  \"model\": \"model.bin\",\n}\n",
                {"cfg.json:3:1", "invalid JSON"}},
        BadCase{"EmptyFile", G, "", {"cfg.json:1:1", "invalid JSON"}},
        BadCase{"ContextServerWithCp",
                C,
                R"({"model": "model.bin", "context_parallel_size": 2})",
                {"context_parallel_size", "context server"}},
        BadCase{"ContextServerCpConfigUnknown",
                C,
                R"({"model": "model.bin", "cp_config": {"cp_type": "HELIX"}})",
                {"unknown config field 'cp_config'"}},
        BadCase{"ContextServerBadLease",
                C,
                R"({"model": "model.bin", "kv_lease_ms": 0})",
                {"kv_lease_ms", "positive"}},
        BadCase{"ContextServerBadListenerPort",
                C,
                R"({"model": "model.bin",
                    "cache_transceiver_config": {"ucx_listener_port": 65536}})",
                {"cache_transceiver_config.ucx_listener_port' = 65536", "1..65535"}},
        BadCase{"GenerationServerHasNoListener",
                G,
                R"({"model": "model.bin",
                    "cache_transceiver_config": {"ucx_listener_port": 5000}})",
                {"unknown config field 'cache_transceiver_config.ucx_listener_port'"}},
        BadCase{"ContextServerBadBufferTokens",
                C,
                R"({"model": "model.bin",
                    "cache_transceiver_config": {"max_tokens_in_buffer": 0}})",
                {"cache_transceiver_config.max_tokens_in_buffer", "positive"}},
        // Upper bounds: values the engine would overflow on or truncate to int.
        BadCase{"HugeTokensPerBlock",
                G,
                R"({"model": "model.bin",
                    "kv_cache_config": {"tokens_per_block": 4611686018427387904}})",
                {"'kv_cache_config.tokens_per_block' = 4611686018427387904", "at most 65536"}},
        BadCase{"HugeCpTokensPerBlock",
                G,
                R"({"model": "model.bin", "context_parallel_size": 2,
                    "cp_config": {"cp_type": "HELIX", "tokens_per_block": 131072}})",
                {"'cp_config.tokens_per_block' = 131072", "at most 65536"}},
        BadCase{"HugeTp",
                G,
                R"({"model": "model.bin", "tensor_parallel_size": 4294967297})",
                {"'tensor_parallel_size' = 4294967297", "at most 1024"}},
        BadCase{"HugeCp",
                G,
                R"({"model": "model.bin", "context_parallel_size": 4294967298,
                    "cp_config": {"cp_type": "HELIX"}})",
                {"'context_parallel_size' = 4294967298", "at most 1024"}},
        BadCase{"HugeNumThreads",
                G,
                R"({"model": "model.bin", "num_threads": 100000})",
                {"'num_threads' = 100000", "at most 4096"}},
        BadCase{"HugeBatch",
                G,
                R"({"model": "model.bin", "max_batch_size": 1099511627776})",
                {"'max_batch_size' = 1099511627776", "at most 1048576"}},
        BadCase{"HugeNumTokens",
                G,
                R"({"model": "model.bin", "max_num_tokens": 4294967296})",
                {"'max_num_tokens' = 4294967296", "at most 2147483647"}},
        BadCase{"HugeSeqLen",
                G,
                R"({"model": "model.bin", "max_seq_len": 4294967296})",
                {"'max_seq_len' = 4294967296", "at most 2147483647"}},
        BadCase{
            "HugeTransferTimeout",
            G,
            R"({"model": "model.bin",
                    "cache_transceiver_config": {"kv_transfer_timeout_ms": 4611686018427387904}})",
            {"'cache_transceiver_config.kv_transfer_timeout_ms' = 4611686018427387904", "30 days"}},
        BadCase{"ContextServerHugeLease",
                C,
                R"({"model": "model.bin", "kv_lease_ms": 4611686018427387904})",
                {"'kv_lease_ms' = 4611686018427387904", "30 days"}},
        // Integers in [2^63, 2^64) are stored unsigned by the JSON parser; they must be named as
        // written, not wrapped to negative values.
        BadCase{"UnsignedIntNotWrapped",
                G,
                R"({"model": "model.bin", "num_threads": 18446744073709551615})",
                {"num_threads", "signed 64-bit", "got number 18446744073709551615"}},
        BadCase{"UnsignedInt64NotWrapped",
                G,
                R"({"model": "model.bin", "max_batch_size": 9223372036854775808})",
                {"max_batch_size", "signed 64-bit", "got number 9223372036854775808"}},
        BadCase{"UnsignedOptionalIntNotWrapped",
                G,
                R"({"model": "model.bin",
                    "kv_cache_config": {"max_tokens": 18446744073709551615}})",
                {"kv_cache_config.max_tokens", "signed 64-bit", "got number 18446744073709551615"}},
        BadCase{"ContextServerPortZero",
                C,
                R"({"model": "model.bin", "server": {"port": 0}})",
                {"'server.port' = 0", "a context server needs a fixed port"}},
        BadCase{"GenerationServerHasNoLease",
                G,
                R"({"model": "model.bin", "kv_lease_ms": 5})",
                {"unknown config field 'kv_lease_ms'"}}),
    [](const ::testing::TestParamInfo<BadCase>& info) { return info.param.name; });

TEST_F(ConfigTest, MaxTokensInBuffer) {
  auto c = Load(R"({"model": "model.bin", "kv_lease_ms": 1000,
                    "cache_transceiver_config": {"max_tokens_in_buffer": 65536}})",
                Role::kContext);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->cache_transceiver_config.max_tokens_in_buffer, 65536);
  EXPECT_EQ(c->ToJson()["cache_transceiver_config"]["max_tokens_in_buffer"], 65536);
  auto g = Load(R"({"model": "model.bin",
                    "cache_transceiver_config": {"max_tokens_in_buffer": 4096}})");
  ASSERT_TRUE(g.ok()) << g.status().ToString();  // a generation rank's staging
  EXPECT_EQ(g->cache_transceiver_config.max_tokens_in_buffer, 4096);
  auto d = Load(kMinimal, Role::kContext);
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_FALSE(d->cache_transceiver_config.max_tokens_in_buffer.has_value());
  EXPECT_FALSE(d->ToJson()["cache_transceiver_config"].contains("max_tokens_in_buffer"));
}

TEST_F(ConfigTest, UcxListenerPort) {
  auto c = Load(R"({"model": "model.bin",
                    "cache_transceiver_config": {"ucx_listener_port": 50061}})",
                Role::kContext);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->cache_transceiver_config.ucx_listener_port, 50061);
  EXPECT_EQ(c->ToJson()["cache_transceiver_config"]["ucx_listener_port"], 50061);
  auto d = Load(kMinimal, Role::kContext);
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(d->cache_transceiver_config.ucx_listener_port, 0);  // a free port
}

TEST_F(ConfigTest, MissingConfigFileIsNotFound) {
  auto c = LoadServingConfig((dir_ / "absent.json").string(), Role::kGeneration);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kNotFound);
  EXPECT_NE(c.status().message().find("absent.json"), std::string::npos);
}

StatusOr<RouterConfig> LoadRouter(const fs::path& dir, const std::string& text) {
  fs::path p = dir / "router.json";
  std::ofstream(p) << text;
  return LoadRouterConfig(p.string());
}

TEST_F(ConfigTest, RouterConfig) {
  auto ok = LoadRouter(dir_, R"({"model": "model.bin",
      "generation_servers": {"urls": ["127.0.0.1:50052"]}})");
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  EXPECT_EQ(ok->served_model_name, "model");
  EXPECT_EQ(ok->generation_servers.router_type, "round_robin");
  EXPECT_TRUE(ok->context_servers.urls.empty());

  struct Case {
    std::string json;
    std::string expect;
  };
  const std::vector<Case> bad = {
      {R"({"model": "model.bin"})", "'generation_servers' is required"},
      {R"({"model": "model.bin", "generation_servers": {"urls": []}})",
       "generation_servers.urls' must list"},
      {R"({"model": "model.bin", "generation_servers": {"urls": ["localhost"]}})",
       "generation_servers.urls[0]' = \"localhost\""},
      {R"({"model": "model.bin", "generation_servers": {"urls": ["h:1"],
           "router": {"type": "random"}}})",
       "generation_servers.router.type' = \"random\""},
      {R"({"model": "model.bin", "generation_servers": {"urls": ["h:1"]},
           "context_servers": {"urls": ["h:0"]}})",
       "context_servers.urls[0]'"},
      {R"({"model": "model.bin", "generation_servers": {"urls": ["h:1"]}, "max_retries": -1})",
       "max_retries"},
      {R"({"model": "model.bin", "generation_servers": {"urls": ["h:1"]}, "api_key": ""})",
       "api_key"},
      {R"({"model": "model.bin", "generation_servers": {"urls": ["h:1"]}, "hostname": "x"})",
       "unknown config field 'hostname'"},
      {R"({"model": "model.bin", "generation_servers": {"urls": ["h:1"]},
           "server": {"port": 8000}, "grpc_port": 8000})",
       "is also 'server.port'"},
  };
  for (const auto& b : bad) {
    auto c = LoadRouter(dir_, b.json);
    ASSERT_FALSE(c.ok()) << "accepted: " << b.json;
    EXPECT_NE(c.status().message().find(b.expect), std::string::npos)
        << "message lacks \"" << b.expect << "\": " << c.status().message();
  }
}

TEST_F(ConfigTest, PemTlsFilesAreAccepted) {
  auto c = Load(R"({"model": "model.bin",
                    "server": {"tls_cert_file": "cert.pem", "tls_key_file": "key.pem"}})");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(*c->server.tls_key_file, (dir_ / "key.pem").string());
}

TEST_F(ConfigTest, GenerationServerPortZeroIsAllowed) {
  auto c = Load(R"({"model": "model.bin", "server": {"port": 0}})");
  ASSERT_TRUE(c.ok()) << c.status().ToString();  // any free port; the router is told the address
  EXPECT_EQ(c->server.port, 0);
}

TEST_F(ConfigTest, BoundsAreInclusive) {
  auto c = Load(R"({"model": "model.bin", "tensor_parallel_size": 1024, "num_threads": 4096,
                    "kv_cache_config": {"tokens_per_block": 65536},
                    "max_batch_size": 1048576, "max_num_tokens": 2147483647,
                    "max_seq_len": 2147483647,
                    "cache_transceiver_config": {"kv_transfer_timeout_ms": 2592000000}})");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->kv_cache_config.tokens_per_block, 65536);
  EXPECT_EQ(c->cache_transceiver_config.kv_transfer_timeout_ms, 2592000000);
  auto x = Load(R"({"model": "model.bin", "kv_lease_ms": 2592000000})", Role::kContext);
  ASSERT_TRUE(x.ok()) << x.status().ToString();
  auto r = LoadRouter(dir_, R"({"model": "model.bin",
      "generation_servers": {"urls": ["[::1]:65535"]}, "request_timeout_ms": 2592000000,
      "health_check_interval_ms": 2592000000, "max_inflight_requests": 1048576})");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
}

// Each case: a router config text and the substrings its error must contain.
void ExpectRouterRefused(const fs::path& dir,
                         const std::vector<std::pair<std::string, std::vector<std::string>>>& bad) {
  for (const auto& [json, expect] : bad) {
    StatusOr<RouterConfig> c = InvalidArgument("not run");
    ASSERT_NO_THROW(c = LoadRouter(dir, json)) << json;
    ASSERT_FALSE(c.ok()) << "accepted: " << json;
    EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument) << c.status().ToString();
    for (const auto& s : expect) {
      EXPECT_NE(c.status().message().find(s), std::string::npos)
          << "message lacks \"" << s << "\": " << c.status().message();
    }
  }
}

TEST_F(ConfigTest, RouterRefusesPortOutOfRange) {
  ExpectRouterRefused(dir_,
                      {{R"({"model": "model.bin",
                  "generation_servers": {"urls": ["127.0.0.1:99999999999999999999999"]}})",
                        {"'generation_servers.urls[0]' = \"127.0.0.1:99999999999999999999999\"",
                         "port in 1..65535"}},
                       {R"({"model": "model.bin", "generation_servers": {"urls": ["h:1"]},
                  "context_servers": {"urls": ["h:2", "h:65536"]}})",
                        {"'context_servers.urls[1]' = \"h:65536\"", "port in 1..65535"}}});
}

TEST_F(ConfigTest, RouterRefusesUrlsWithAScheme) {
  ExpectRouterRefused(
      dir_,
      {{R"({"model": "model.bin", "generation_servers": {"urls": ["http://127.0.0.1:50052"]}})",
        {"'generation_servers.urls[0]' = \"http://127.0.0.1:50052\"", "host:port", "gRPC target",
         "\"http://\""}},
       {R"({"model": "model.bin", "generation_servers": {"urls": ["h:1"]},
                  "context_servers": {"urls": ["grpc://ctx:50051"]}})",
        {"'context_servers.urls[0]' = \"grpc://ctx:50051\"", "host:port", "\"grpc://\""}}});
}

TEST_F(ConfigTest, RouterCorsOrigins) {
  auto ok = LoadRouter(dir_, R"({"model": "model.bin", "generation_servers": {"urls": ["h:1"]},
      "cors_allowed_origins": ["*", "https://ui.example:8443", "http://localhost:3000"]})");
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  EXPECT_EQ(ok->cors_allowed_origins.size(), 3u);
  EXPECT_EQ(ok->ToJson()["cors_allowed_origins"][1], "https://ui.example:8443");
  for (const char* bad :
       {"https://ui.example/", "ftp://x", "ui.example", "https://", "", "http://a b",
        "https://UI.example", "https://ui.example:443", "http://ui.example:80"}) {
    ExpectRouterRefused(
        dir_, {{std::string(R"({"model": "model.bin", "generation_servers": {"urls": ["h:1"]},
                  "cors_allowed_origins": [")") +
                    bad + R"("]})",
                {"'cors_allowed_origins[0]'", "no path"}}});
  }
  ExpectRouterRefused(dir_, {{R"({"model": "model.bin", "generation_servers": {"urls": ["h:1"]},
                  "cors_allowed_origins": "*"})",
                              {"cors_allowed_origins"}}});
}

TEST_F(ConfigTest, RouterBoundsDurationsAndInflight) {
  ExpectRouterRefused(dir_,
                      {{R"({"model": "model.bin", "generation_servers": {"urls": ["h:1"]},
            "request_timeout_ms": 4611686018427387904})",
                        {"'request_timeout_ms' = 4611686018427387904", "30 days"}},
                       {R"({"model": "model.bin", "generation_servers": {"urls": ["h:1"]},
            "health_check_interval_ms": 2592000001})",
                        {"'health_check_interval_ms' = 2592000001", "30 days"}},
                       {R"({"model": "model.bin", "generation_servers": {"urls": ["h:1"]},
            "max_inflight_requests": 9223372036854775807})",
                        {"'max_inflight_requests' = 9223372036854775807", "at most 1048576"}}});
}

// Every shipped config must validate (its role is named by its file name).
TEST(ShippedConfigs, AllValid) {
  const char* src = std::getenv("HELIX_SOURCE_DIR");
  ASSERT_NE(src, nullptr) << "HELIX_SOURCE_DIR is not set (ctest sets it)";
  fs::path shared = fs::path(src) / ".." / "shared" / "models" / "stories260K";
  if (!fs::exists(shared)) GTEST_SKIP() << "shared models not found at " << shared;
  int n = 0;
  for (const auto& e : fs::directory_iterator(fs::path(src) / "configs")) {
    if (e.path().extension() != ".json") continue;
    std::string name = e.path().filename().string();
    Status st;
    if (name.rfind("router", 0) == 0) {
      st = LoadRouterConfig(e.path().string()).status();
    } else if (name.rfind("ctx", 0) == 0) {
      st = LoadServingConfig(e.path().string(), Role::kContext).status();
    } else if (name.rfind("gen", 0) == 0) {
      st = LoadServingConfig(e.path().string(), Role::kGeneration).status();
    } else {
      ADD_FAILURE() << name << ": config names start with gen, ctx or router";
      continue;
    }
    EXPECT_TRUE(st.ok()) << name << ": " << st.ToString();
    ++n;
  }
  EXPECT_GE(n, 3);
}

}  // namespace
}  // namespace helix::config
