// A minimal logging facade for engine/, which links no logging library: the server
// installs a sink (spdlog) at start-up; until then lines go to stderr.
// Thread-safe: SetLogSink must be called before other threads log; Log may be called from any.
#pragma once

#include <functional>
#include <sstream>
#include <string>
#include <string_view>

namespace helix {

enum class LogLevel { kTrace = 0, kDebug, kInfo, kWarn, kError, kOff };

using LogSink = std::function<void(LogLevel, std::string_view)>;

void SetLogSink(LogSink sink, LogLevel min_level);
LogLevel MinLogLevel();
bool LogEnabled(LogLevel level);
void Log(LogLevel level, std::string_view message);

}  // namespace helix

// HELIX_LOG(kInfo) << "request " << id << " done";  builds the line only when enabled.
#define HELIX_LOG(level)                                \
  if (!::helix::LogEnabled(::helix::LogLevel::level)) { \
  } else                                                \
    ::helix::internal::LogLine(::helix::LogLevel::level).stream()

namespace helix::internal {
class LogLine {
 public:
  explicit LogLine(LogLevel level) : level_(level) {}
  ~LogLine() { Log(level_, stream_.str()); }
  std::ostringstream& stream() { return stream_; }

 private:
  LogLevel level_;
  std::ostringstream stream_;
};
}  // namespace helix::internal
