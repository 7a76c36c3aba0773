// Conversions between the engine's KV hand-off values (engine/transfer/kv_handle.h) and the
// helix.v1 messages, and the generation side's release of handles on context servers.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "engine/transfer/kv_handle.h"
#include "helix/v1/context.grpc.pb.h"

namespace helix::server {

// A client-given identifier or address (a request id, a handle's server id and address) is at
// most this long: longer ones are refused before anything keeps, repeats or contacts them.
constexpr size_t kMaxIdBytes = 256;
// `s` cut to at most 64 bytes, for an error message.
std::string Clip(const std::string& s);
// A request's stop strings (at most 256, 64 KiB in all) and stop_token_ids (at most 65536):
// they are matched at every token, by the generation servers and by the router's gRPC front.
Status CheckStops(const v1::GenerateRequest& r);

void ToProto(const transfer::KvLayout& l, v1::KvLayout* out);
void ToProto(const transfer::KvSource& s, v1::KvHandle* out);
// INVALID_ARGUMENT naming the field when the handle is incomplete.
StatusOr<transfer::KvSource> FromProto(const v1::KvHandle& h);
// The Release of a handle's KV: its request id, lease token and block addresses.
v1::ReleaseRequest ReleaseRequestFor(const v1::KvHandle& h);

// A generation server's calls to the context servers whose KV it pulls, asynchronous, over one
// cached channel per server (at most 256 servers: handles name the address, so without
// cache_transceiver_config.allowed_context_servers a client could grow the table). Thread-safe;
// the destructor waits (bounded) for the calls in flight.
class ContextClient {
 public:
  // release_timeout bounds Release and Confirm; check_timeout bounds CheckExport's question.
  explicit ContextClient(
      std::chrono::milliseconds release_timeout = std::chrono::milliseconds(5000),
      std::chrono::milliseconds check_timeout = std::chrono::milliseconds(5000))
      : release_timeout_(release_timeout), check_timeout_(check_timeout) {}
  ~ContextClient();
  // Frees a handle's KV on its context server; a failure is logged and counted (the lease
  // frees it anyway).
  void Release(const std::string& address, v1::ReleaseRequest release);
  // Release that tells whether the context server still held the KV: `verdict` gets Ok, or
  // the error that must fail the request (NOT_FOUND: its lease expired, so the blocks may have
  // been reused while they were read; the server unreachable: it cannot be told). Called on a
  // gRPC thread.
  void Confirm(const std::string& address, v1::ReleaseRequest release,
               std::function<void(const Status&)> verdict);
  // Checks `s` against the export of the server at s.server_address (GetKvExport, asked once
  // per server, and again when a handle names another instance: the server restarted), and
  // calls `done` (at once, or on a gRPC thread): InvalidArgument / FailedPrecondition naming
  // what does not match, Unavailable when the server cannot be asked.
  void CheckExport(const transfer::KvSource& s, std::function<void(const Status&)> done);
  // Keeps a handle's lease from running out while its request waits here: a context server's
  // lease runs from the prefill, and a request queued here for longer would find its KV freed
  // when it is pulled. Renews it (RenewLease) at half the lease: the first time after half of
  // `lease_ms` (the handle's), or of the lease last heard from that server, or after 250 ms;
  // until DropLease (or for at most an hour). Returns the id DropLease takes. A handle the
  // server no longer holds is given up.
  uint64_t KeepLease(const std::string& address, v1::ReleaseRequest lease, int64_t lease_ms = 0);
  void DropLease(uint64_t id);
  uint64_t failures() const { return failures_.load(); }
  uint64_t renewals() const { return renewals_.load(); }

 private:
  // The server's stub with a call counted in flight (EndCall when it completes). At most
  // kMaxServers stubs are kept: past that the least recently used is dropped (a call still
  // using it holds it), so handles naming many addresses cannot lock real servers out.
  std::shared_ptr<v1::ContextService::Stub> BeginCall(const std::string& address);
  void EndCall();
  // KeepLease's thread: renews the leases that are due.
  void KeepLoop();
  void Renew(uint64_t id, const std::string& address, const v1::ReleaseRequest& lease);

  std::chrono::milliseconds release_timeout_, check_timeout_;
  std::mutex mu_;
  std::condition_variable cv_;
  struct CachedStub {
    std::shared_ptr<v1::ContextService::Stub> stub;
    uint64_t last_use = 0;
  };
  std::map<std::string, CachedStub> stubs_;                // GUARDED_BY(mu_)
  uint64_t uses_ = 0;                                      // GUARDED_BY(mu_)
  std::map<std::string, transfer::KvExportInfo> exports_;  // GUARDED_BY(mu_), by address
  int in_flight_ = 0;                                      // GUARDED_BY(mu_)
  std::atomic<uint64_t> failures_{0};
  using Clock = std::chrono::steady_clock;
  struct Kept {
    std::string address;
    v1::ReleaseRequest lease;
    Clock::time_point since, next;
    bool renewing = false;  // a RenewLease in flight
  };
  std::map<uint64_t, Kept> kept_;            // GUARDED_BY(mu_)
  std::map<std::string, int64_t> lease_ms_;  // GUARDED_BY(mu_): by address, as last answered
  uint64_t next_kept_ = 0;                   // GUARDED_BY(mu_)
  bool stopping_ = false;                    // GUARDED_BY(mu_)
  std::condition_variable keep_cv_;
  std::thread keeper_;  // started by the first KeepLease
  std::atomic<uint64_t> renewals_{0};
};

}  // namespace helix::server
