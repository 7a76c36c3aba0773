#include "server/common/cli.h"

#include <iostream>

#include "server/config/router_config.h"

namespace helix::server {

int CheckConfigCommand(const std::string& path, ConfigKind kind) {
  nlohmann::json resolved;
  Status st;
  if (kind == ConfigKind::kRouter) {
    auto c = config::LoadRouterConfig(path);
    st = c.status();
    if (c.ok()) resolved = c->ToJson();
  } else {
    auto c = config::LoadServingConfig(
        path, kind == ConfigKind::kGeneration ? config::Role::kGeneration : config::Role::kContext);
    st = c.status();
    if (c.ok()) resolved = c->ToJson();
  }
  if (!st.ok()) {
    std::cerr << "invalid config: " << st.message() << "\n";
    return kExitUsage;
  }
  std::cout << resolved.dump(2) << "\n";
  return kExitOk;
}

}  // namespace helix::server
