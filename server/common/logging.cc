#include "server/common/logging.h"

#include <algorithm>

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "engine/common/log.h"

namespace helix::server {

Status SetUpLogging(const config::LoggingConfig& cfg, const std::string& name) {
  std::shared_ptr<spdlog::logger> logger;
  try {
    if (cfg.file.empty()) {
      logger = spdlog::stderr_color_mt(name);
    } else {
      logger = spdlog::basic_logger_mt(name, cfg.file);
    }
  } catch (const spdlog::spdlog_ex& e) {
    return InvalidArgument("config field 'logging.file' = \"" + cfg.file + "\": " + e.what());
  }
  logger->set_pattern(cfg.pattern);
  spdlog::level::level_enum level = spdlog::level::from_str(cfg.level);
  logger->set_level(level);
  logger->flush_on(spdlog::level::warn);
  spdlog::set_default_logger(logger);

  static const spdlog::level::level_enum kMap[] = {spdlog::level::trace, spdlog::level::debug,
                                                   spdlog::level::info,  spdlog::level::warn,
                                                   spdlog::level::err,   spdlog::level::off};
  SetLogSink([logger](LogLevel l,
                      std::string_view msg) { logger->log(kMap[static_cast<int>(l)], "{}", msg); },
             level == spdlog::level::off ? LogLevel::kOff
                                         : static_cast<LogLevel>(std::min<int>(level, 4)));
  return Status::Ok();
}

}  // namespace helix::server
