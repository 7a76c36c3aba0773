// Conversions between the engine's KV hand-off values (engine/transfer/kv_handle.h) and the
// helix.v1 messages, and the generation side's release of handles on context servers.
#pragma once

#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include <grpcpp/grpcpp.h>

#include "engine/transfer/kv_handle.h"
#include "helix/v1/context.grpc.pb.h"

namespace helix::server {

void ToProto(const transfer::KvLayout& l, v1::KvLayout* out);
void ToProto(const transfer::KvSource& s, v1::KvHandle* out);
// INVALID_ARGUMENT naming the field when the handle is incomplete.
StatusOr<transfer::KvSource> FromProto(const v1::KvHandle& h);

// Sends Release for handles whose KV has been pulled (or given up), asynchronously, one
// cached channel per context server. Thread-safe. The destructor waits (bounded) for calls in
// flight.
// The exports of the context servers a generation server pulls from, asked once per server
// (again when a handle names another instance: the server restarted) and kept. Thread-safe.
class KvExportCache {
 public:
  explicit KvExportCache(std::chrono::milliseconds timeout = std::chrono::milliseconds(5000))
      : timeout_(timeout) {}
  ~KvExportCache();  // waits for the questions in flight
  // Checks `s` against the export of the server at s.server_address, asking the server when it
  // is not known yet, and calls `done` (at once, or on a gRPC thread within the timeout):
  // InvalidArgument / FailedPrecondition naming what does not match, Unavailable when the
  // server cannot be asked.
  void CheckAsync(const transfer::KvSource& s, std::function<void(const Status&)> done);

 private:
  std::chrono::milliseconds timeout_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, transfer::KvExportInfo> known_;  // GUARDED_BY(mu_), by address
  std::map<std::string, std::unique_ptr<v1::ContextService::Stub>> stubs_;  // GUARDED_BY(mu_)
  int in_flight_ = 0;                                                       // GUARDED_BY(mu_)
};

class ContextReleaser {
 public:
  explicit ContextReleaser(std::chrono::milliseconds timeout = std::chrono::milliseconds(5000))
      : timeout_(timeout) {}
  ~ContextReleaser();
  void Release(const std::string& address, const std::string& request_id);
  // Release that tells whether the context server still held the KV: `verdict` gets Ok, or
  // the error that must fail the request (NOT_FOUND: its lease expired, so the blocks may have
  // been reused while they were read; the server unreachable: it cannot be told). Called on a
  // gRPC thread.
  void Confirm(const std::string& address, const std::string& request_id,
               std::function<void(const Status&)> verdict);
  uint64_t failures() const { return failures_.load(); }

 private:
  std::chrono::milliseconds timeout_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, std::unique_ptr<v1::ContextService::Stub>> stubs_;  // GUARDED_BY(mu_)
  int in_flight_ = 0;                                                       // GUARDED_BY(mu_)
  std::atomic<uint64_t> failures_{0};
};

}  // namespace helix::server
