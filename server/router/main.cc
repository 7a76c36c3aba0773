// helix-router: the OpenAI-compatible front door. `helix-router --config FILE` runs it;
// `helix-router check-config FILE` validates a config.
#include <pthread.h>
#include <signal.h>

#include <filesystem>
#include <iostream>
#include <string>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <CLI/CLI.hpp>

#include "engine/common/log.h"
#include "engine/model/model_loader.h"
#include "helix/version.h"
#include "server/common/cli.h"
#include "server/common/logging.h"
#include "server/common/serve_setup.h"
#include "server/config/router_config.h"
#include "server/router/grpc_front.h"
#include "server/router/openai_http.h"
#include "server/router/router.h"

int main(int argc, char** argv) {
  using helix::server::kExitFailure;
  using helix::server::kExitOk;
  using helix::server::kExitUsage;
  CLI::App app{"helix-router: OpenAI-compatible router pairing context and generation servers"};
  app.set_version_flag("--version", std::string("helix-router ") + helix::kVersion);
  std::string config_path, check_path;
  app.add_option("--config", config_path, "JSON config file");
  auto* check = app.add_subcommand(
      "check-config", "Validate a config and print it resolved (defaults filled in) as JSON");
  check->add_option("file", check_path, "JSON config file")->required();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : kExitUsage;
  }
  if (*check)
    return helix::server::CheckConfigCommand(check_path, helix::server::ConfigKind::kRouter);
  if (config_path.empty()) {
    std::cerr << "helix-router: --config FILE is required (or: helix-router check-config FILE)\n";
    return kExitUsage;
  }
  auto cfg = helix::config::LoadRouterConfig(config_path);
  if (!cfg.ok()) {
    std::cerr << "invalid config: " << cfg.status().message() << "\n";
    return kExitUsage;
  }
  if (helix::Status st = helix::server::SetUpLogging(cfg->logging, "router"); !st.ok()) {
    std::cerr << "helix-router: logging: " << st.message() << "\n";
    return kExitFailure;
  }
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  signal(SIGPIPE, SIG_IGN);  // a client that hangs up mid-stream is an error, not our death

  // The router owns tokenisation: it loads the model's tokenizer (and chat template), not its
  // weights.
  auto tokenizer = helix::LoadModelTokenizer(cfg->model, cfg->tokenizer.value_or(""));
  if (!tokenizer.ok()) {
    std::cerr << "helix-router: " << tokenizer.status().ToString() << "\n";
    return kExitFailure;
  }
  if (cfg->served_model_name.empty()) {
    cfg->served_model_name = std::filesystem::path(cfg->model).stem().string();
  }
  helix::router::Router router(*cfg, std::move(*tokenizer));
  HELIX_LOG(kInfo) << "router: model '" << router.model_name() << "', chat template "
                   << helix::router::ChatStyleName(router.chat_style())
                   << (router.chat_default_system().empty() ? ""
                                                            : " (with its default system message)")
                   << ", " << cfg->context_servers.urls.size() << " context and "
                   << cfg->generation_servers.urls.size() << " generation server(s)";
  helix::router::OpenAiHttp http(&router, *cfg);
  auto port = http.Start();
  if (!port.ok()) {
    std::cerr << "helix-router: " << port.status().message() << "\n";
    return kExitFailure;
  }
  std::unique_ptr<grpc::Server> grpc_server;
  helix::router::RouterGrpcService grpc_service(&router, cfg->api_key.value_or(""));
  int grpc_port = 0;
  if (cfg->grpc_port > 0) {
    grpc::EnableDefaultHealthCheckService(true);
    grpc::reflection::InitProtoReflectionServerBuilderPlugin();
    grpc::ServerBuilder b;
    // gRPC turns SO_REUSEPORT on by default: a second server on a taken port would share it.
    b.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
    b.AddListeningPort(helix::server::JoinHostPort(cfg->server.host, cfg->grpc_port),
                       grpc::InsecureServerCredentials(), &grpc_port);
    b.RegisterService(&grpc_service);
    grpc_server = b.BuildAndStart();
    if (grpc_server == nullptr || grpc_port == 0) {
      std::cerr << "helix-router: cannot listen for gRPC on port " << cfg->grpc_port << "\n";
      return kExitFailure;
    }
    grpc_server->GetHealthCheckService()->SetServingStatus(true);
  }
  std::cerr << "helix-router: listening on http://"
            << helix::server::JoinHostPort(cfg->server.host, *port)
            << (grpc_port > 0 ? " and gRPC :" + std::to_string(grpc_port) : "") << std::endl;
  int sig = 0;
  sigwait(&sigs, &sig);
  HELIX_LOG(kInfo) << "router: signal " << sig << ", stopping";
  http.Stop();
  if (grpc_server) {
    grpc_server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  }
  return kExitOk;
}
