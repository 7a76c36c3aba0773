// Command-line pieces shared by helix-gen, helix-ctx and helix-router.
// Stateless; call from main only.
#pragma once

#include <string>

#include "server/config/serving_config.h"

namespace helix::server {

// Exit codes shared by every binary.
inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;  // runtime failure
inline constexpr int kExitUsage = 2;    // bad flags or config

enum class ConfigKind { kGeneration, kContext, kRouter };

// Validates the config at `path` and prints it resolved (defaults filled in) as JSON on
// stdout; on error prints the message on stderr. Returns kExitOk or kExitUsage.
int CheckConfigCommand(const std::string& path, ConfigKind kind);

}  // namespace helix::server
