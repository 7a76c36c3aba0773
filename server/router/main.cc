// helix-router: the OpenAI-compatible front door. `helix-router --config FILE` runs it;
// `helix-router check-config FILE` validates a config.
#include <iostream>
#include <string>

#include <CLI/CLI.hpp>

#include "helix/version.h"
#include "server/common/cli.h"
#include "server/common/logging.h"
#include "server/config/router_config.h"

int main(int argc, char** argv) {
  using helix::server::kExitFailure;
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
  if (!helix::server::SetUpLogging(cfg->logging, "router").ok()) return kExitFailure;
  std::cerr << "helix-router: the HTTP/gRPC router is not part of this build yet (config "
            << config_path << " is valid)\n";
  return kExitFailure;
}
