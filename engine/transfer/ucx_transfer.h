// KV-cache transfer between servers over UCX one-sided gets (DESIGN.md §5).
//
// UcxTransfer owns one UCP context and worker and a progress thread that is the only thread to
// touch them (UCS_THREAD_MODE_SINGLE). Both sides use it:
//  * the context server maps its KV pool (Create's export_base) and publishes the rkey and a
//    UCX listener (listener_port(); also the worker address()); its progress thread accepts
//    the generation ranks' connections, closes those whose peer failed or left, and serves the
//    remote gets (UCX's TCP transport emulates RMA in software, so the target must progress);
//  * a generation rank starts pull jobs (StartPull): lists of (remote address, local address,
//    length) segments from one peer, fetched with non-blocking gets, a bounded number in
//    flight. Endpoints and unpacked rkeys are cached per peer.
// Endpoints connect to the peer's listener (client-server), or, for a job that names none, to
// its worker address. Prefer the listener: with UCX 1.13.1 (Debian 12), a puller that dies
// during its first handshake with a worker-address endpoint can abort the exporter on a UCX
// assertion (docs/architecture.md, Known problems); a listener's endpoints do not.
// Every job reaches a terminal state (done, failed, cancelled): a peer error fails the jobs on
// that peer; a job past its deadline force-closes its peer's endpoint, which completes every
// outstanding get with an error. Only in a terminal state have all of a job's gets ended, so
// only then may the caller reuse the destination memory.
// UCX aborts the process on a malformed worker address or rkey: callers must only pass bytes
// that a peer's address() / rkey() produced (the KV handle carries a checksum for that).
// Thread-safety: every public method is thread-safe.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/common/status.h"

namespace helix::transfer {

enum class JobState : uint8_t { kInProgress = 0, kDone = 1, kFailed = 2, kCancelled = 3 };
const char* JobStateName(JobState s);

struct Segment {
  uint64_t remote_addr;
  void* local;
  uint64_t bytes;
};

struct PullJob {
  std::string peer_key;        // identifies the peer (e.g. its server id); endpoints are cached
  std::string worker_address;  // the peer's UCX worker address
  // "ip:port" of the peer's UCX listener ("[ip6]:port"; numeric: pullers look up no names):
  // when set, the endpoint connects there (client-server) rather than to worker_address.
  std::string listener_address;
  std::string rkey;  // the peer's packed rkey covering every remote segment
  std::vector<Segment> segments;
  std::chrono::steady_clock::time_point deadline;
  // > 0: segments [g * n, g * n + n) form group g (the last one may be shorter), and
  // TakeDoneGroups reports each group once all its gets have succeeded, so the caller can use
  // that part of the destination while the rest is still in flight.
  size_t segments_per_group = 0;
  // With groups: > 0 bounds the groups in flight. Group g is fetched only once every group
  // before g - window_groups has been handed back with ReleaseGroups (so its destination can
  // be a ring of window_groups slots the caller empties as groups land). 0: no bound.
  size_t window_groups = 0;
};

struct TransferStats {
  uint64_t jobs_done = 0, jobs_failed = 0, jobs_cancelled = 0;
  uint64_t bytes_pulled = 0;
  uint64_t gets_posted = 0;  // one-sided gets handed to UCX (also those that completed at once)
  // The listener's side: connections accepted, and those closed since (their peer failed or
  // left; the rest are closed when the engine stops).
  uint64_t peers_accepted = 0, peers_closed = 0;
};

class UcxTransfer {
 public:
  // `name` is used in log lines and errors. With export_bytes > 0, [export_base, export_base +
  // export_bytes) is registered for remote reads (the context server's KV pool) and rkey()
  // is its packed remote key. With a listen_host (a name or address; "0.0.0.0" for every
  // IPv4 interface), a UCX listener is bound there on listen_port (0: one the kernel picks),
  // for peers to connect to (PullJob::listener_address).
  static StatusOr<std::unique_ptr<UcxTransfer>> Create(const std::string& name,
                                                       void* export_base = nullptr,
                                                       uint64_t export_bytes = 0,
                                                       const std::string& listen_host = "",
                                                       int listen_port = 0);
  ~UcxTransfer();
  UcxTransfer(const UcxTransfer&) = delete;
  UcxTransfer& operator=(const UcxTransfer&) = delete;

  // The worker's address, for peers to connect to.
  const std::string& address() const { return address_; }
  // The port of the listener (0 without one).
  int listener_port() const { return listener_port_; }
  // The listener's address for peers ("ip:port", "[ip6]:port"), as reached through `host` (a
  // name or address, resolved here, to an address of the listener's family): what
  // PullJob::listener_address takes, with no name left for a puller to look up.
  StatusOr<std::string> ListenerAddressFor(const std::string& host) const;
  // The packed rkey of the exported memory (empty without one).
  const std::string& rkey() const { return rkey_; }
  // The UCX transports the worker may use (for logs and benchmarks), e.g. "tcp".
  const std::string& transports() const { return transports_; }

  // Queues a job; returns its id (> 0). The job runs on the progress thread.
  uint64_t StartPull(PullJob job);
  // The job's state, and (failed) the reason. Unknown ids are kFailed "unknown job".
  JobState State(uint64_t id, std::string* error = nullptr) const;
  // Stops posting the job's remaining gets; it becomes kCancelled once the posted ones ended
  // (or kDone / kFailed if it finished first). Idempotent.
  void Cancel(uint64_t id);
  // The groups (PullJob::segments_per_group) of the job that completed since the last call,
  // each reported once; a done job has reported every group by the time State says kDone.
  std::vector<uint32_t> TakeDoneGroups(uint64_t id);
  // The caller is done with these groups' destinations (see PullJob::window_groups).
  void ReleaseGroups(uint64_t id, const std::vector<uint32_t>& groups);
  // Waits until the job is terminal or `timeout` passes; returns the state.
  JobState Wait(uint64_t id, std::chrono::milliseconds timeout) const;
  // Drops a terminal job's record. REQUIRES: the job is terminal.
  void Forget(uint64_t id);
  TransferStats stats() const;

 private:
  struct Impl;
  explicit UcxTransfer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  std::string address_, rkey_, transports_;
  int listener_port_ = 0, listener_family_ = 0;
};

}  // namespace helix::transfer
