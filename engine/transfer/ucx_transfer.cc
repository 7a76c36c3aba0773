#include "engine/transfer/ucx_transfer.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <utility>

#include "engine/common/log.h"

namespace helix::transfer {

const char* JobStateName(JobState s) {
  switch (s) {
    case JobState::kInProgress:
      return "in progress";
    case JobState::kDone:
      return "done";
    case JobState::kFailed:
      return "failed";
    case JobState::kCancelled:
      return "cancelled";
  }
  return "?";
}

namespace {

constexpr int kMaxOutstandingPerJob = 64;
// A job past its deadline whose gets are still in flight closes its peer (failing every job
// from it) only once the peer has completed no get for this long, or for the job's whole
// timeout when that is shorter (but never less than kMinPeerStall): a peer that is only busy
// (a large pull beside a small one) is not stalled, and its other jobs go on.
constexpr std::chrono::milliseconds kPeerStall{1000};
constexpr std::chrono::milliseconds kMinPeerStall{100};
// While jobs are in flight, the progress thread keeps polling UCX for this long after its last
// completion before it sleeps on the event fd: during a pull a get completes every few hundred
// microseconds, and sleeping and waking between them held kv_transfer_bench (TCP on loopback) to
// 1.85 GB/s against 2.0 with this poll. It never spins with nothing in flight.
constexpr std::chrono::microseconds kBusyPoll{200};

bool Terminal(JobState s) { return s != JobState::kInProgress; }

// `host` and `port` as a socket address (the first getaddrinfo gives, of `family` unless
// AF_UNSPEC); `passive` for binding (an empty host is then every interface); `numeric`: an
// address only, never a name (no DNS).
StatusOr<sockaddr_storage> Resolve(const std::string& host, int port, bool passive, bool numeric,
                                   socklen_t* len, int family = AF_UNSPEC) {
  addrinfo hints{};
  hints.ai_family = family;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0) | (numeric ? AI_NUMERICHOST : 0);
  addrinfo* res = nullptr;
  const std::string service = std::to_string(port);
  const int rc = getaddrinfo(host.empty() ? nullptr : host.c_str(), service.c_str(), &hints, &res);
  if (rc != 0 || res == nullptr) {
    return InvalidArgument("cannot resolve '" + host + "': " + gai_strerror(rc));
  }
  sockaddr_storage out{};
  std::memcpy(&out, res->ai_addr, res->ai_addrlen);
  *len = res->ai_addrlen;
  freeaddrinfo(res);
  return out;
}

// "ip:port" or "[ip6]:port" as a socket address (numeric only: this runs on the progress
// thread, which must not wait for DNS).
StatusOr<sockaddr_storage> ResolveHostPort(const std::string& hp, socklen_t* len) {
  std::string host, port;
  if (!hp.empty() && hp[0] == '[') {
    const size_t close = hp.find(']');
    if (close == std::string::npos || close + 1 >= hp.size() || hp[close + 1] != ':') {
      return InvalidArgument("'" + hp + "' is not [host]:port");
    }
    host = hp.substr(1, close - 1);
    port = hp.substr(close + 2);
  } else {
    const size_t colon = hp.rfind(':');
    if (colon == std::string::npos || hp.find(':') != colon) {
      return InvalidArgument("'" + hp + "' is not host:port");
    }
    host = hp.substr(0, colon);
    port = hp.substr(colon + 1);
  }
  char* end = nullptr;
  const long n = port.empty() ? -1 : std::strtol(port.c_str(), &end, 10);
  if (host.empty() || n < 1 || n > 65535 || *end != '\0') {
    return InvalidArgument("'" + hp + "' is not host:port with a port in 1..65535");
  }
  return Resolve(host, static_cast<int>(n), /*passive=*/false, /*numeric=*/true, len);
}

}  // namespace

struct UcxTransfer::Impl {
  struct Record {
    JobState state = JobState::kInProgress;
    std::string error;
    std::vector<uint32_t> done_groups;  // completed, not yet taken
  };
  struct Peer {
    std::string worker_address, listener_address;
    ucp_ep_h ep = nullptr;
    std::string rkey_bytes;
    ucp_rkey_h rkey = nullptr;
    bool failed = false;
    // A listener's endpoint until its connection is made (its flush completed): no rkey is
    // unpacked and no get posted before then.
    bool connecting = false;
    uint64_t serial = 0;  // tells this endpoint from a later one of the same key
    std::string error;
    std::chrono::steady_clock::time_point last_progress;  // created, connected, or a get done
  };
  struct ConnCtx {
    Impl* impl;
    std::string key;
    uint64_t serial;
  };
  struct Active {
    uint64_t id = 0;
    PullJob job;
    std::chrono::steady_clock::duration stall;  // the peer silence that closes it when late
    size_t next = 0;
    int outstanding = 0;
    bool cancel = false;
    bool failed = false;
    std::string error;
    uint64_t bytes = 0;
    std::vector<uint32_t> group_left;   // per group: gets not yet succeeded
    std::vector<bool> released;         // per group: handed back (window_groups)
    size_t low = 0;                     // the first group not handed back
    std::vector<uint32_t> done_groups;  // completed since the last flush into the record
  };
  struct OpCtx {
    Impl* impl;
    uint64_t job;
    uint64_t bytes;
    size_t segment;
  };

  std::string name;
  ucp_context_h ctx = nullptr;
  ucp_worker_h worker = nullptr;
  ucp_mem_h memh = nullptr;
  ucp_listener_h listener = nullptr;
  int ucx_fd = -1;
  int wake_fd = -1;
  std::thread thread;
  std::atomic<bool> stop{false};

  mutable std::mutex mu;
  mutable std::condition_variable cv;
  // Queued jobs, with their timeout (the deadline as seen when queued).
  std::deque<std::tuple<uint64_t, PullJob, std::chrono::steady_clock::duration>>
      starts;                                                        // GUARDED_BY(mu)
  std::vector<uint64_t> cancels;                                     // GUARDED_BY(mu)
  std::vector<std::pair<uint64_t, std::vector<uint32_t>>> releases;  // GUARDED_BY(mu)
  std::unordered_map<uint64_t, Record> records;                      // GUARDED_BY(mu)
  uint64_t next_id = 1;                                              // GUARDED_BY(mu)
  TransferStats stats;                                               // GUARDED_BY(mu)

  // Progress thread only.
  std::unordered_map<std::string, Peer> peers;
  uint64_t next_serial = 0;
  std::unordered_map<uint64_t, Active> active;
  // The listener's endpoints (accepted connections), and whether their peer failed.
  std::vector<std::pair<ucp_ep_h, bool>> served;

  ~Impl() {
    if (listener != nullptr) ucp_listener_destroy(listener);
    if (memh != nullptr) ucp_mem_unmap(ctx, memh);
    if (worker != nullptr) ucp_worker_destroy(worker);
    if (ctx != nullptr) ucp_cleanup(ctx);
    if (wake_fd >= 0) close(wake_fd);
  }

  void Wake() {
    const uint64_t one = 1;
    [[maybe_unused]] ssize_t n = write(wake_fd, &one, sizeof(one));
  }

  // Publishes the groups completed since the last call (progress thread).
  void FlushGroups(Active& a) {
    if (a.done_groups.empty()) return;
    std::lock_guard<std::mutex> lock(mu);
    auto& out = records[a.id].done_groups;
    out.insert(out.end(), a.done_groups.begin(), a.done_groups.end());
    a.done_groups.clear();
  }

  void Finish(Active& a) {
    FlushGroups(a);
    JobState st = a.failed                          ? JobState::kFailed
                  : a.next == a.job.segments.size() ? JobState::kDone
                                                    : JobState::kCancelled;
    if (a.cancel && st == JobState::kFailed) st = JobState::kCancelled;
    HELIX_LOG(kDebug) << name << ": job " << a.id << " from '" << a.job.peer_key << "' "
                      << JobStateName(st) << ": " << a.job.segments.size() << " segments, "
                      << a.bytes << " bytes" << (a.error.empty() ? "" : ", " + a.error);
    {
      std::lock_guard<std::mutex> lock(mu);
      Record& r = records[a.id];
      r.state = st;
      r.error = a.error;
      if (st == JobState::kDone) ++stats.jobs_done;
      if (st == JobState::kFailed) ++stats.jobs_failed;
      if (st == JobState::kCancelled) ++stats.jobs_cancelled;
      stats.bytes_pulled += a.bytes;
    }
    cv.notify_all();
  }

  static void OnGet(void* request, ucs_status_t status, void* user_data) {
    auto* op = static_cast<OpCtx*>(user_data);
    op->impl->Completed(op->job, op->segment, op->bytes, status);
    delete op;
    ucp_request_free(request);
  }

  // A peer connected to the listener (progress thread, in ucp_worker_progress).
  static void OnConnRequest(ucp_conn_request_h req, void* arg) {
    auto* self = static_cast<Impl*>(arg);
    if (self->stop.load()) {
      ucp_listener_reject(self->listener, req);
      return;
    }
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                    UCP_EP_PARAM_FIELD_ERR_HANDLER;
    ep.conn_request = req;
    ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    ep.err_handler.cb = &Impl::OnServedError;
    ep.err_handler.arg = self;
    ucp_ep_h h = nullptr;
    const ucs_status_t st = ucp_ep_create(self->worker, &ep, &h);
    if (st != UCS_OK) {
      HELIX_LOG(kWarn) << self->name
                       << ": cannot accept a UCX connection: " << ucs_status_string(st);
      return;
    }
    self->served.emplace_back(h, false);
    std::lock_guard<std::mutex> lock(self->mu);
    ++self->stats.peers_accepted;
  }

  // An accepted connection's peer failed or left: the loop closes the endpoint.
  static void OnServedError(void* arg, ucp_ep_h ep, ucs_status_t status) {
    auto* self = static_cast<Impl*>(arg);
    for (auto& [h, failed] : self->served) {
      if (h == ep && !failed) {
        failed = true;
        HELIX_LOG(kDebug) << self->name
                          << ": a connected peer went away: " << ucs_status_string(status);
      }
    }
  }

  // Closes the listener's endpoints whose peer failed (all of them with `all`).
  void CloseServed(bool all) {
    std::vector<ucp_ep_h> closing;
    for (auto it = served.begin(); it != served.end();) {
      if (all || it->second) {
        closing.push_back(it->first);
        it = served.erase(it);
      } else {
        ++it;
      }
    }
    for (ucp_ep_h ep : closing) ForceClose(ep);
    if (!closing.empty()) {
      std::lock_guard<std::mutex> lock(mu);
      stats.peers_closed += closing.size();
    }
  }

  // Closes an endpoint at once (its outstanding operations end with errors); returns when done.
  void ForceClose(ucp_ep_h ep) {
    ucp_request_param_t prm{};
    prm.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    prm.flags = UCP_EP_CLOSE_FLAG_FORCE;
    ucs_status_ptr_t req = ucp_ep_close_nbx(ep, &prm);
    if (UCS_PTR_IS_PTR(req)) {
      while (ucp_request_check_status(req) == UCS_INPROGRESS) ucp_worker_progress(worker);
      ucp_request_free(req);
    }
  }

  // The connect flush of a listener's endpoint ended: its lanes exist (or it failed).
  static void OnConnected(void* request, ucs_status_t status, void* user_data) {
    auto* c = static_cast<ConnCtx*>(user_data);
    auto it = c->impl->peers.find(c->key);
    if (it != c->impl->peers.end() && it->second.serial == c->serial) {
      Peer& p = it->second;
      p.connecting = false;
      p.last_progress = std::chrono::steady_clock::now();
      if (status != UCS_OK && !p.failed) {
        p.failed = true;
        p.error = "cannot connect to " + p.listener_address + ": " + ucs_status_string(status);
      }
    }
    delete c;
    ucp_request_free(request);
  }

  static void OnPeerError(void* arg, ucp_ep_h ep, ucs_status_t status) {
    auto* self = static_cast<Impl*>(arg);
    for (auto& [key, p] : self->peers) {
      if (p.ep == ep && !p.failed) {
        p.failed = true;
        p.error = std::string("peer error: ") + ucs_status_string(status);
      }
    }
  }

  void Completed(uint64_t job, size_t segment, uint64_t bytes, ucs_status_t status) {
    auto it = active.find(job);
    if (it == active.end()) return;
    Active& a = it->second;
    --a.outstanding;
    if (status == UCS_OK) {
      if (auto p = peers.find(a.job.peer_key); p != peers.end()) {
        p->second.last_progress = std::chrono::steady_clock::now();
      }
      SegmentDone(a, segment, bytes);
    } else if (!a.failed) {
      a.failed = true;
      if (a.error.empty()) a.error = std::string("get failed: ") + ucs_status_string(status);
    }
  }

  void SegmentDone(Active& a, size_t segment, uint64_t bytes) {
    a.bytes += bytes;
    if (a.group_left.empty()) return;
    const size_t g = segment / a.job.segments_per_group;
    if (--a.group_left[g] == 0) a.done_groups.push_back(static_cast<uint32_t>(g));
  }

  // Connects to (or reuses) the job's peer; nullptr and *error on failure.
  Peer* GetPeer(const PullJob& job, std::string* error) {
    auto it = peers.find(job.peer_key);
    if (it != peers.end() && !it->second.failed &&
        (it->second.worker_address != job.worker_address ||
         it->second.listener_address != job.listener_address)) {
      ClosePeer(job.peer_key, "the peer's address changed");
      it = peers.end();
    }
    if (it != peers.end() && it->second.failed) {
      *error = it->second.error;
      return nullptr;
    }
    if (it == peers.end()) {
      Peer p;
      p.worker_address = job.worker_address;
      p.listener_address = job.listener_address;
      p.last_progress = std::chrono::steady_clock::now();
      ucp_ep_params_t ep{};
      ep.field_mask = UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
      ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
      ep.err_handler.cb = &Impl::OnPeerError;
      ep.err_handler.arg = this;
      sockaddr_storage sa{};
      if (!p.listener_address.empty()) {
        socklen_t len = 0;
        auto r = ResolveHostPort(p.listener_address, &len);
        if (!r.ok()) {
          *error = "the peer's UCX listener: " + r.status().message();
          return nullptr;
        }
        sa = *r;
        ep.field_mask |= UCP_EP_PARAM_FIELD_SOCK_ADDR | UCP_EP_PARAM_FIELD_FLAGS;
        ep.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
        ep.sockaddr.addr = reinterpret_cast<const sockaddr*>(&sa);
        ep.sockaddr.addrlen = len;
      } else {
        ep.field_mask |= UCP_EP_PARAM_FIELD_REMOTE_ADDRESS;
        ep.address = reinterpret_cast<const ucp_address_t*>(p.worker_address.data());
      }
      ucs_status_t st = ucp_ep_create(worker, &ep, &p.ep);
      if (st != UCS_OK) {
        *error = std::string("cannot connect") +
                 (p.listener_address.empty() ? "" : " to " + p.listener_address) + ": " +
                 ucs_status_string(st);
        return nullptr;
      }
      p.serial = ++next_serial;
      if (!p.listener_address.empty()) {
        // A client-server endpoint gets its lanes only once the connection is made: an rkey
        // unpacked before then reaches no memory domain, and every get on it would be
        // emulated in software even where the transport has RDMA. A flush completes once the
        // lanes exist (it waits on the endpoint's wireup).
        p.connecting = true;
        auto* c = new ConnCtx{this, job.peer_key, p.serial};
        ucp_request_param_t prm{};
        prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
        prm.cb.send = &Impl::OnConnected;
        prm.user_data = c;
        ucs_status_ptr_t req = ucp_ep_flush_nbx(p.ep, &prm);
        if (!UCS_PTR_IS_PTR(req)) {
          delete c;
          p.connecting = false;
          if (UCS_PTR_IS_ERR(req)) {
            p.failed = true;
            p.error = "cannot connect to " + p.listener_address + ": " +
                      ucs_status_string(UCS_PTR_STATUS(req));
          }
        }
      }
      it = peers.emplace(job.peer_key, std::move(p)).first;
      if (it->second.failed) {  // closed by the loop's sweep of failed peers
        *error = it->second.error;
        return nullptr;
      }
    }
    Peer& p = it->second;
    if (p.rkey_bytes != job.rkey) {  // unpacked by Post, once connected
      if (p.rkey != nullptr) ucp_rkey_destroy(p.rkey);
      p.rkey = nullptr;
      p.rkey_bytes = job.rkey;
    }
    return &p;
  }

  // Force-closes a peer's endpoint: its outstanding gets complete with errors. Blocks (on
  // this thread) until the close is done.
  void ClosePeer(const std::string& key, std::string why) {
    auto it = peers.find(key);
    if (it == peers.end()) return;
    Peer& p = it->second;
    for (auto& [id, a] : active) {
      if (a.job.peer_key == key && !a.failed) {
        a.failed = true;
        a.error = why;
      }
    }
    if (p.rkey != nullptr) ucp_rkey_destroy(p.rkey);
    const ucp_ep_h ep = p.ep;
    peers.erase(it);
    if (ep != nullptr) ForceClose(ep);
    // Drain completions of the gets the close cancelled.
    while (ucp_worker_progress(worker) != 0) {
    }
  }

  void Post(Active& a) {
    if (a.cancel || a.failed) return;
    auto pit = peers.find(a.job.peer_key);
    if (pit == peers.end() || pit->second.failed || pit->second.connecting) return;
    Peer& p = pit->second;
    if (p.rkey == nullptr) {
      const ucs_status_t st = ucp_ep_rkey_unpack(p.ep, p.rkey_bytes.data(), &p.rkey);
      if (st != UCS_OK) {
        p.rkey = nullptr;
        a.failed = true;
        a.error = std::string("cannot unpack the peer's rkey: ") + ucs_status_string(st);
        return;
      }
    }
    const size_t first = a.next;
    while (a.outstanding < kMaxOutstandingPerJob && a.next < a.job.segments.size()) {
      if (a.job.window_groups > 0 &&
          a.next / a.job.segments_per_group >= a.low + a.job.window_groups) {
        break;  // its slot is still the caller's: wait for ReleaseGroups
      }
      const Segment& s = a.job.segments[a.next];
      auto* op = new OpCtx{this, a.id, s.bytes, a.next};
      ucp_request_param_t prm{};
      prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
      prm.cb.send = &Impl::OnGet;
      prm.user_data = op;
      ucs_status_ptr_t req = ucp_get_nbx(p.ep, s.local, s.bytes, s.remote_addr, p.rkey, &prm);
      ++a.next;
      if (req == nullptr) {
        SegmentDone(a, op->segment, s.bytes);
        delete op;
      } else if (UCS_PTR_IS_ERR(req)) {
        delete op;
        a.failed = true;
        a.error = std::string("get failed: ") + ucs_status_string(UCS_PTR_STATUS(req));
        break;
      } else {
        ++a.outstanding;
      }
    }
    if (a.next > first) {
      std::lock_guard<std::mutex> lock(mu);
      stats.gets_posted += a.next - first;
    }
  }

  void Loop() {
    std::chrono::steady_clock::time_point last_busy;  // the last progress UCX reported
    while (true) {
      std::deque<std::tuple<uint64_t, PullJob, std::chrono::steady_clock::duration>> new_jobs;
      std::vector<uint64_t> new_cancels;
      std::vector<std::pair<uint64_t, std::vector<uint32_t>>> new_releases;
      {
        std::lock_guard<std::mutex> lock(mu);
        new_jobs.swap(starts);
        new_cancels.swap(cancels);
        new_releases.swap(releases);
      }
      const bool stopping = stop.load();
      for (auto& [id, job, timeout] : new_jobs) {
        Active a;
        a.id = id;
        a.job = std::move(job);
        a.stall =
            std::clamp<std::chrono::steady_clock::duration>(timeout, kMinPeerStall, kPeerStall);
        if (const size_t per = a.job.segments_per_group; per > 0) {
          const size_t n = a.job.segments.size();
          a.group_left.assign((n + per - 1) / per, static_cast<uint32_t>(per));
          if (n % per != 0) a.group_left.back() = static_cast<uint32_t>(n % per);
          a.released.assign(a.group_left.size(), false);
        } else {
          a.job.window_groups = 0;  // a window needs groups
        }
        std::string error;
        if (stopping) {
          a.failed = true;
          a.error = "the transfer engine is shutting down";
        } else if (GetPeer(a.job, &error) == nullptr) {
          a.failed = true;
          a.error = error;
        }
        active.emplace(id, std::move(a));
      }
      for (uint64_t id : new_cancels) {
        if (auto it = active.find(id); it != active.end()) it->second.cancel = true;
      }
      for (auto& [id, groups] : new_releases) {
        auto it = active.find(id);
        if (it == active.end()) continue;
        Active& a = it->second;
        for (uint32_t g : groups) {
          if (g < a.released.size()) a.released[g] = true;
        }
        while (a.low < a.released.size() && a.released[a.low]) ++a.low;
      }
      if (stopping) {
        std::vector<std::string> keys;
        for (auto& [key, p] : peers) keys.push_back(key);
        for (const std::string& key : keys) ClosePeer(key, "the transfer engine is shutting down");
        if (listener != nullptr) {
          ucp_listener_destroy(listener);
          listener = nullptr;
        }
        CloseServed(/*all=*/true);
      }
      CloseServed(/*all=*/false);
      // Peers that reported an error: fail their jobs and drop the endpoint.
      std::vector<std::string> broken;
      for (auto& [key, p] : peers) {
        if (p.failed) broken.push_back(key);
      }
      for (const std::string& key : broken) ClosePeer(key, peers[key].error);
      // Deadlines: a job past its deadline fails and posts no more gets. The gets it has in
      // flight still write into its destination, so it ends when they have: at once from a
      // peer that is making progress (its other jobs go on), or by closing a peer that has
      // gone silent (which ends every job from it).
      auto silent_peers = [&] {
        const auto now = std::chrono::steady_clock::now();
        std::vector<std::string> keys;
        for (auto& [id, a] : active) {
          if (now <= a.job.deadline) continue;
          if (!a.failed) {
            a.failed = true;
            a.error = "timed out (kv_transfer_timeout_ms)";
          }
          auto p = peers.find(a.job.peer_key);
          // A peer whose gets have stalled, or whose connection has not come (closed so that
          // the next job connects afresh).
          if (p != peers.end() && (a.outstanding > 0 || p->second.connecting) &&
              now - p->second.last_progress > a.stall) {
            keys.push_back(a.job.peer_key);
          }
        }
        return keys;
      };
      std::vector<std::string> late = silent_peers();
      if (!late.empty()) {
        // Completions that arrived while this thread was not running count first.
        while (ucp_worker_progress(worker) != 0) {
        }
        late = silent_peers();
      }
      for (const std::string& key : late) {
        ClosePeer(key, "the peer stalled: a transfer from it passed its deadline");
      }
      for (auto& [id, a] : active) Post(a);
      const unsigned progressed = ucp_worker_progress(worker);
      for (auto it = active.begin(); it != active.end();) {
        Active& a = it->second;
        if (a.outstanding == 0 && (a.cancel || a.failed || a.next == a.job.segments.size())) {
          Finish(a);
          it = active.erase(it);
        } else {
          FlushGroups(a);
          ++it;
        }
      }
      if (stopping && active.empty()) return;
      const auto now = std::chrono::steady_clock::now();
      if (progressed != 0) {
        last_busy = now;
        continue;
      }
      if (!active.empty() && now - last_busy < kBusyPoll) continue;
      // Nothing happened: sleep until UCX or a caller has something (a short nap while jobs
      // are in flight, since some transports signal completions only to polling).
      if (ucp_worker_arm(worker) == UCS_OK) {
        pollfd fds[2] = {{ucx_fd, POLLIN, 0}, {wake_fd, POLLIN, 0}};
        poll(fds, 2, active.empty() ? 100 : 1);
        if (fds[1].revents & POLLIN) {
          uint64_t v;
          [[maybe_unused]] ssize_t n = read(wake_fd, &v, sizeof(v));
        }
      }
    }
  }
};

UcxTransfer::UcxTransfer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

UcxTransfer::~UcxTransfer() {
  if (impl_->thread.joinable()) {
    impl_->stop = true;
    impl_->Wake();
    impl_->thread.join();
  }
}

StatusOr<std::unique_ptr<UcxTransfer>> UcxTransfer::Create(const std::string& name,
                                                           void* export_base, uint64_t export_bytes,
                                                           const std::string& listen_host,
                                                           int listen_port) {
  auto impl = std::make_unique<Impl>();
  impl->name = name;
  auto fail = [&](const char* what, ucs_status_t st) {
    return Unavailable(name + ": UCX " + what + " failed: " + ucs_status_string(st));
  };
  ucp_config_t* config = nullptr;
  ucs_status_t st = ucp_config_read(nullptr, nullptr, &config);
  if (st != UCS_OK) return fail("config", st);
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_RMA | UCP_FEATURE_WAKEUP;
  st = ucp_init(&params, config, &impl->ctx);
  ucp_config_release(config);
  if (st != UCS_OK) return fail("init", st);
  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SINGLE;
  st = ucp_worker_create(impl->ctx, &wp, &impl->worker);
  if (st != UCS_OK) return fail("worker", st);
  st = ucp_worker_get_efd(impl->worker, &impl->ucx_fd);
  if (st != UCS_OK) return fail("event fd", st);
  impl->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (impl->wake_fd < 0) return Internal(name + ": eventfd failed");

  std::unique_ptr<UcxTransfer> t(new UcxTransfer(std::move(impl)));
  Impl& m = *t->impl_;
  ucp_address_t* addr = nullptr;
  size_t addr_len = 0;
  st = ucp_worker_get_address(m.worker, &addr, &addr_len);
  if (st != UCS_OK) return fail("worker address", st);
  t->address_.assign(reinterpret_cast<const char*>(addr), addr_len);
  ucp_worker_release_address(m.worker, addr);

  if (export_bytes > 0) {
    ucp_mem_map_params_t mp{};
    mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
    mp.address = export_base;
    mp.length = export_bytes;
    st = ucp_mem_map(m.ctx, &mp, &m.memh);
    if (st != UCS_OK) return fail("mem_map of the KV pool", st);
    void* rkey = nullptr;
    size_t rkey_len = 0;
    st = ucp_rkey_pack(m.ctx, m.memh, &rkey, &rkey_len);
    if (st != UCS_OK) return fail("rkey_pack", st);
    t->rkey_.assign(static_cast<const char*>(rkey), rkey_len);
    ucp_rkey_buffer_release(rkey);
  }
  if (!listen_host.empty()) {
    if (listen_port < 0 || listen_port > 65535) {
      return InvalidArgument(name + ": UCX listener port " + std::to_string(listen_port) +
                             " is not in 0..65535");
    }
    socklen_t len = 0;
    auto sa = Resolve(listen_host, listen_port, /*passive=*/true, /*numeric=*/false, &len);
    if (!sa.ok()) {
      return InvalidArgument(name + ": the UCX listener's host: " + sa.status().message());
    }
    ucp_listener_params_t lp{};
    lp.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
    lp.sockaddr.addr = reinterpret_cast<const sockaddr*>(&*sa);
    lp.sockaddr.addrlen = len;
    lp.conn_handler.cb = &Impl::OnConnRequest;
    lp.conn_handler.arg = &m;
    st = ucp_listener_create(m.worker, &lp, &m.listener);
    if (st != UCS_OK) {
      return Unavailable(name + ": cannot listen for UCX connections on " + listen_host + ":" +
                         std::to_string(listen_port) + ": " + ucs_status_string(st));
    }
    ucp_listener_attr_t la{};
    la.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
    st = ucp_listener_query(m.listener, &la);
    if (st != UCS_OK) return fail("listener query", st);
    const auto& bound = la.sockaddr;
    t->listener_family_ = bound.ss_family;
    t->listener_port_ = bound.ss_family == AF_INET6
                            ? ntohs(reinterpret_cast<const sockaddr_in6*>(&bound)->sin6_port)
                            : ntohs(reinterpret_cast<const sockaddr_in*>(&bound)->sin_port);
  }
  const char* tls = std::getenv("UCX_TLS");
  t->transports_ = tls != nullptr ? tls : "UCX default";
  m.thread = std::thread([&m] { m.Loop(); });
  return t;
}

StatusOr<std::string> UcxTransfer::ListenerAddressFor(const std::string& host) const {
  if (listener_port_ == 0) return FailedPrecondition("no UCX listener");
  socklen_t len = 0;
  auto sa =
      Resolve(host, listener_port_, /*passive=*/false, /*numeric=*/false, &len, listener_family_);
  if (!sa.ok()) {
    return InvalidArgument("'" + host + "' has no " +
                           (listener_family_ == AF_INET6 ? "IPv6" : "IPv4") +
                           " address (the family of the UCX listener): " + sa.status().message());
  }
  char ip[NI_MAXHOST] = {0};
  const int rc = getnameinfo(reinterpret_cast<const sockaddr*>(&*sa), len, ip, sizeof(ip), nullptr,
                             0, NI_NUMERICHOST);
  if (rc != 0) return InvalidArgument("'" + host + "': " + gai_strerror(rc));
  const std::string a = ip;
  return (a.find(':') != std::string::npos ? "[" + a + "]" : a) + ":" +
         std::to_string(listener_port_);
}

uint64_t UcxTransfer::StartPull(PullJob job) {
  uint64_t id;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    id = impl_->next_id++;
    impl_->records[id] = {};
    const auto timeout = job.deadline - std::chrono::steady_clock::now();
    impl_->starts.emplace_back(id, std::move(job), timeout);
  }
  impl_->Wake();
  return id;
}

JobState UcxTransfer::State(uint64_t id, std::string* error) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto it = impl_->records.find(id);
  if (it == impl_->records.end()) {
    if (error) *error = "unknown job";
    return JobState::kFailed;
  }
  if (error) *error = it->second.error;
  return it->second.state;
}

void UcxTransfer::Cancel(uint64_t id) {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->cancels.push_back(id);
  }
  impl_->Wake();
}

std::vector<uint32_t> UcxTransfer::TakeDoneGroups(uint64_t id) {
  std::vector<uint32_t> out;
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto it = impl_->records.find(id);
  if (it != impl_->records.end()) out.swap(it->second.done_groups);
  return out;
}

void UcxTransfer::ReleaseGroups(uint64_t id, const std::vector<uint32_t>& groups) {
  if (groups.empty()) return;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->releases.emplace_back(id, groups);
  }
  impl_->Wake();
}

JobState UcxTransfer::Wait(uint64_t id, std::chrono::milliseconds timeout) const {
  std::unique_lock<std::mutex> lock(impl_->mu);
  impl_->cv.wait_for(lock, timeout, [&] {
    auto it = impl_->records.find(id);
    return it == impl_->records.end() || Terminal(it->second.state);
  });
  auto it = impl_->records.find(id);
  return it == impl_->records.end() ? JobState::kFailed : it->second.state;
}

void UcxTransfer::Forget(uint64_t id) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto it = impl_->records.find(id);
  if (it != impl_->records.end() && Terminal(it->second.state)) impl_->records.erase(it);
}

TransferStats UcxTransfer::stats() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->stats;
}

}  // namespace helix::transfer
