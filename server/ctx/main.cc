// helix-ctx: the context (prefill) server. Subcommands: serve, check-config.
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <iostream>
#include <string>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <CLI/CLI.hpp>

#include "engine/common/log.h"
#include "engine/engine.h"
#include "helix/version.h"
#include "server/common/cli.h"
#include "server/common/logging.h"
#include "server/common/serve_setup.h"
#include "server/ctx/context_service.h"

namespace {

using helix::server::kExitFailure;
using helix::server::kExitOk;
using helix::server::kExitUsage;

int RunServe(const std::string& config_path, int64_t drain_ms) {
  auto cfg = helix::config::LoadServingConfig(config_path, helix::config::Role::kContext);
  if (!cfg.ok()) {
    std::cerr << "invalid config: " << cfg.status().message() << "\n";
    return kExitUsage;
  }
  if (helix::Status st = helix::server::SetUpLogging(cfg->logging, "ctx"); !st.ok()) {
    std::cerr << "helix-ctx serve: logging: " << st.message() << "\n";
    return kExitFailure;
  }
  if (cfg->tensor_parallel_size != 1 || cfg->context_parallel_size != 1) {
    std::cerr << "helix-ctx serve: a context server runs one rank (tensor_parallel_size = "
                 "context_parallel_size = 1); got TP "
              << cfg->tensor_parallel_size << ", CP " << cfg->context_parallel_size << "\n";
    return kExitUsage;
  }
  // The gRPC port is known only once bound: bind first, then start the engine, whose handles
  // carry this address.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);

  helix::EngineOptions o = helix::server::EngineOptionsFromConfig(*cfg);
  o.export_kv = true;
  o.kv_lease = std::chrono::milliseconds(cfg->kv_lease_ms);
  o.kv_export_buffer_tokens = cfg->cache_transceiver_config.max_tokens_in_buffer.value_or(0);
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  o.server_id = std::string("ctx-") + host + "-" + std::to_string(getpid()) + "-" +
                std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count());

  // Handles carry the addresses generation servers call back (the gRPC one for the export check
  // and release, the UCX listener's to pull): a wildcard listen address names no host, so this
  // host's name goes there instead.
  std::string advertised = cfg->server.host;
  if (advertised == "0.0.0.0" || advertised == "::" || advertised == "[::]") {
    // gethostname's, above, when it resolves (else the wildcard, which reaches this host from
    // itself only).
    addrinfo* res = nullptr;
    if (host[0] != '\0' && getaddrinfo(host, nullptr, nullptr, &res) == 0) advertised = host;
    if (res != nullptr) freeaddrinfo(res);
    if (advertised == cfg->server.host) {
      HELIX_LOG(kWarn) << "ctx: server.host " << advertised << " is a wildcard and this host's "
                       << "name does not resolve: KV handles name " << advertised
                       << ", which only this host can reach";
    }
  }
  // The UCX listener binds where the gRPC server does, on a port the kernel picks.
  auto unbracket = [](const std::string& h) {
    return h.size() > 2 && h.front() == '[' && h.back() == ']' ? h.substr(1, h.size() - 2) : h;
  };
  o.kv_listen_host = unbracket(cfg->server.host);
  o.kv_advertise_host = unbracket(advertised);
  o.kv_listen_port = cfg->cache_transceiver_config.ucx_listener_port;
  if (o.kv_listen_host.find(':') != std::string::npos) {
    // Debian 12's UCX 1.13.1 cannot complete a client-server connection over IPv6 with TCP
    // lanes (the context server's connect back to the rank is refused), so an IPv6 context
    // server exports its worker address only.
    HELIX_LOG(kWarn) << "ctx: server.host " << cfg->server.host
                     << " is IPv6: no UCX listener; generation ranks connect to the worker "
                        "address, and with UCX 1.13.1 one that dies in its first handshake can "
                        "abort this server (docs/architecture.md, Known problems)";
    o.kv_listen_host.clear();
  }
  std::shared_ptr<grpc::ServerCredentials> creds = helix::server::ServerCredentialsFor(cfg->server);
  auto engine = helix::Engine::Create(o);
  if (!engine.ok()) {
    std::cerr << "helix-ctx serve: " << engine.status().ToString() << "\n";
    return kExitFailure;
  }
  helix::server::ContextServiceOptions so;
  so.model_name = std::filesystem::path(cfg->model).filename().string();
  so.kv_dtype = cfg->kv_cache_config.dtype;
  so.max_in_flight = 4 * cfg->max_batch_size;
  so.api_key = cfg->server.api_key.value_or("");
  so.lease_ms = cfg->kv_lease_ms;
  const std::string listen = helix::server::JoinHostPort(cfg->server.host, cfg->server.port);
  so.address = helix::server::JoinHostPort(advertised, cfg->server.port);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int bound_port = 0;
  // gRPC turns SO_REUSEPORT on by default: a second server on a taken port would share it.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.AddListeningPort(listen, creds, &bound_port);
  builder.SetMaxReceiveMessageSize(64 << 20);
  builder.SetMaxSendMessageSize(64 << 20);
  if (cfg->server.port == 0) {
    std::cerr << "helix-ctx serve: server.port must be set (handles carry the address)\n";
    return kExitUsage;
  }
  std::string ucx_listener = (*engine)->kv_export()->listener_address;
  if (ucx_listener.empty()) ucx_listener = "none";
  auto service = std::make_unique<helix::server::ContextService>(std::move(*engine), so);
  builder.RegisterService(service.get());
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || bound_port == 0) {
    std::cerr << "helix-ctx serve: cannot listen on " << listen
              << (cfg->server.tls_cert_file ? " (or gRPC refused the TLS certificate or key: "
                                              "see its error above)"
                                            : "")
              << "\n";
    service->Stop(std::chrono::milliseconds(0));
    return kExitFailure;
  }
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  health->SetServingStatus(true);
  HELIX_LOG(kInfo) << "ctx: serving helix.v1.ContextService on " << so.address << " (server id "
                   << o.server_id << ", KV lease " << cfg->kv_lease_ms << " ms, UCX listener "
                   << ucx_listener << ")";
  std::cerr << "helix-ctx serve: listening on " << listen
            << (listen == so.address ? "" : " (handles name " + so.address + ")") << std::endl;
  int sig = 0;
  sigwait(&sigs, &sig);
  HELIX_LOG(kInfo) << "ctx: signal " << sig << ": draining for up to " << drain_ms << " ms";
  health->SetServingStatus(false);
  service->Stop(std::chrono::milliseconds(drain_ms));
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  server->Wait();
  service.reset();
  return kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "helix-ctx: Helix context server (prefill; hands the KV cache to generation "
      "servers over UCX)"};
  app.set_version_flag("--version", std::string("helix-ctx ") + helix::kVersion);
  app.require_subcommand(1);
  std::string serve_config, check_path;
  int64_t drain_ms = 10000;
  auto* serve = app.add_subcommand("serve", "Run the context server daemon");
  serve->add_option("--config", serve_config, "JSON config file")->required();
  serve
      ->add_option("--drain-ms", drain_ms,
                   "On SIGTERM/SIGINT, how long in-flight prefills and the handles already "
                   "given out may finish")
      ->check(CLI::Range(int64_t{0}, int64_t{86400000}))
      ->capture_default_str();
  auto* check = app.add_subcommand(
      "check-config", "Validate a config and print it resolved (defaults filled in) as JSON");
  check->add_option("file", check_path, "JSON config file")->required();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : kExitUsage;
  }
  if (*check)
    return helix::server::CheckConfigCommand(check_path, helix::server::ConfigKind::kContext);
  (void)serve;
  return RunServe(serve_config, drain_ms);
}
