// helix-ctx: the context (prefill) server. Subcommands: serve, check-config.
#include <iostream>
#include <string>

#include <CLI/CLI.hpp>

#include "helix/version.h"
#include "server/common/cli.h"
#include "server/common/logging.h"

int main(int argc, char** argv) {
  using helix::server::kExitFailure;
  using helix::server::kExitUsage;
  CLI::App app{
      "helix-ctx: Helix context server (prefill; hands the KV cache to generation "
      "servers over UCX)"};
  app.set_version_flag("--version", std::string("helix-ctx ") + helix::kVersion);
  app.require_subcommand(1);
  std::string serve_config, check_path;
  auto* serve = app.add_subcommand("serve", "Run the context server daemon");
  serve->add_option("--config", serve_config, "JSON config file")->required();
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
  auto cfg = helix::config::LoadServingConfig(serve_config, helix::config::Role::kContext);
  if (!cfg.ok()) {
    std::cerr << "invalid config: " << cfg.status().message() << "\n";
    return kExitUsage;
  }
  if (!helix::server::SetUpLogging(cfg->logging, "ctx").ok()) return kExitFailure;
  std::cerr << "helix-ctx serve: the context service (prefill + UCX KV hand-off) is not part of "
               "this build yet (config "
            << serve_config << " is valid)\n";
  return kExitFailure;
}
