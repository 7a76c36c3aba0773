#include "engine/transfer/ucx_transfer.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
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

bool Terminal(JobState s) { return s != JobState::kInProgress; }

}  // namespace

struct UcxTransfer::Impl {
  struct Record {
    JobState state = JobState::kInProgress;
    std::string error;
    std::vector<uint32_t> done_groups;  // completed, not yet taken
  };
  struct Peer {
    std::string worker_address;
    ucp_ep_h ep = nullptr;
    std::string rkey_bytes;
    ucp_rkey_h rkey = nullptr;
    bool failed = false;
    std::string error;
    std::chrono::steady_clock::time_point last_progress;  // connected, or its last get done
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
  std::unordered_map<uint64_t, Active> active;

  ~Impl() {
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
        it->second.worker_address != job.worker_address) {
      ClosePeer(job.peer_key, "the peer's worker address changed");
      it = peers.end();
    }
    if (it != peers.end() && it->second.failed) {
      *error = it->second.error;
      return nullptr;
    }
    if (it == peers.end()) {
      Peer p;
      p.worker_address = job.worker_address;
      p.last_progress = std::chrono::steady_clock::now();
      ucp_ep_params_t ep{};
      ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                      UCP_EP_PARAM_FIELD_ERR_HANDLER;
      ep.address = reinterpret_cast<const ucp_address_t*>(p.worker_address.data());
      ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
      ep.err_handler.cb = &Impl::OnPeerError;
      ep.err_handler.arg = this;
      ucs_status_t st = ucp_ep_create(worker, &ep, &p.ep);
      if (st != UCS_OK) {
        *error = std::string("cannot connect: ") + ucs_status_string(st);
        return nullptr;
      }
      it = peers.emplace(job.peer_key, std::move(p)).first;
    }
    Peer& p = it->second;
    if (p.rkey == nullptr || p.rkey_bytes != job.rkey) {
      if (p.rkey != nullptr) ucp_rkey_destroy(p.rkey);
      p.rkey = nullptr;
      p.rkey_bytes = job.rkey;
      ucs_status_t st = ucp_ep_rkey_unpack(p.ep, p.rkey_bytes.data(), &p.rkey);
      if (st != UCS_OK) {
        *error = std::string("cannot unpack the peer's rkey: ") + ucs_status_string(st);
        return nullptr;
      }
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
    if (p.ep != nullptr) {
      ucp_request_param_t prm{};
      prm.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      prm.flags = UCP_EP_CLOSE_FLAG_FORCE;
      ucs_status_ptr_t req = ucp_ep_close_nbx(p.ep, &prm);
      if (UCS_PTR_IS_PTR(req)) {
        while (ucp_request_check_status(req) == UCS_INPROGRESS) ucp_worker_progress(worker);
        ucp_request_free(req);
      }
    }
    peers.erase(it);
    // Drain completions of the gets the close cancelled.
    while (ucp_worker_progress(worker) != 0) {
    }
  }

  void Post(Active& a) {
    if (a.cancel || a.failed) return;
    auto pit = peers.find(a.job.peer_key);
    if (pit == peers.end() || pit->second.failed) return;
    Peer& p = pit->second;
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
      }
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
          if (a.outstanding == 0) continue;
          auto p = peers.find(a.job.peer_key);
          if (p != peers.end() && now - p->second.last_progress > a.stall) {
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
      if (progressed != 0) continue;
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
                                                           void* export_base,
                                                           uint64_t export_bytes) {
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
  const char* tls = std::getenv("UCX_TLS");
  t->transports_ = tls != nullptr ? tls : "UCX default";
  m.thread = std::thread([&m] { m.Loop(); });
  return t;
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
