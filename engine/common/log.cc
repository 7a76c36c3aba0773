#include "engine/common/log.h"

#include <atomic>
#include <cstdio>

namespace helix {
namespace {
LogSink& Sink() {
  static LogSink sink;
  return sink;
}
std::atomic<int> g_min_level{static_cast<int>(LogLevel::kInfo)};
constexpr const char* kNames[] = {"trace", "debug", "info", "warn", "error", "off"};
}  // namespace

void SetLogSink(LogSink sink, LogLevel min_level) {
  Sink() = std::move(sink);
  g_min_level.store(static_cast<int>(min_level));
}

LogLevel MinLogLevel() { return static_cast<LogLevel>(g_min_level.load()); }

bool LogEnabled(LogLevel level) {
  return level != LogLevel::kOff && static_cast<int>(level) >= g_min_level.load();
}

void Log(LogLevel level, std::string_view message) {
  if (!LogEnabled(level)) return;
  if (Sink()) {
    Sink()(level, message);
    return;
  }
  std::fprintf(stderr, "[%s] %.*s\n", kNames[static_cast<int>(level)],
               static_cast<int>(message.size()), message.data());
}

}  // namespace helix
