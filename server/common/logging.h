// Sets up spdlog for a Helix process from LoggingConfig and routes engine/ log lines into it.
// Call once at start-up, before other threads start.
#pragma once

#include <string>

#include "engine/common/status.h"
#include "server/config/serving_config.h"

namespace helix::server {

// `name` is the logger name shown in each line ("gen", "ctx", "router", "gen.r1").
Status SetUpLogging(const config::LoggingConfig& cfg, const std::string& name);

}  // namespace helix::server
