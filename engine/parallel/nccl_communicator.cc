#include "engine/parallel/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "engine/common/log.h"

namespace helix::parallel {
namespace {

using Clock = std::chrono::steady_clock;

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(std::string name, int rank, int size, const NcclOptions& o)
      : name_(std::move(name)),
        rank_(rank),
        size_(size),
        timeout_(o.timeout),
        stream_(static_cast<cudaStream_t>(o.stream)) {}

  ~NcclCommunicator() override {
    if (watchdog_.joinable()) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        stop_ = true;
      }
      cv_.notify_all();
      watchdog_.join();
    }
    if (comm_ != nullptr) {
      // Finalize flushes and may wait on the peers: bounded by the timeout, then abort.
      const ncclResult_t fin = broken_.ok() ? ncclCommFinalize(comm_) : ncclInternalError;
      bool clean = fin == ncclSuccess || fin == ncclInProgress;
      const Clock::time_point deadline = Clock::now() + timeout_;
      while (clean) {
        ncclResult_t async = ncclSuccess;
        if (ncclCommGetAsyncError(comm_, &async) != ncclSuccess) clean = false;
        if (async == ncclSuccess) break;
        if (async != ncclInProgress || Clock::now() > deadline) clean = false;
        std::this_thread::sleep_for(std::chrono::microseconds(100));
      }
      if (clean) {
        ncclCommDestroy(comm_);
      } else {
        ncclCommAbort(comm_);
      }
    }
    for (const Pending& p : pending_) {
      cudaEventDestroy(p.start);
      cudaEventDestroy(p.done);
    }
    for (cudaEvent_t e : spare_events_) cudaEventDestroy(e);
    if (scratch_ != nullptr) cudaFree(scratch_);
  }

  Status Init(TcpStore* store) {
    ncclUniqueId id;
    const std::string key = name_ + "/nccl_unique_id";
    if (rank_ == 0) {
      RETURN_IF_ERROR(Check(ncclGetUniqueId(&id), "ncclGetUniqueId"));
      RETURN_IF_ERROR(store->Set(key, std::string(id.internal, sizeof(id.internal))));
    } else {
      ASSIGN_OR_RETURN(std::string bytes, store->Get(key, timeout_));
      if (bytes.size() != sizeof(id.internal)) {
        return Internal("NCCL group " + name_ + ": the unique id in the store has " +
                        std::to_string(bytes.size()) + " bytes, expected " +
                        std::to_string(sizeof(id.internal)));
      }
      std::memcpy(id.internal, bytes.data(), sizeof(id.internal));
    }
    if (cudaGetDevice(&device_) != cudaSuccess ||
        cudaMalloc(&scratch_, sizeof(float)) != cudaSuccess) {
      cudaGetLastError();
      return ResourceExhausted("NCCL group " + name_ + ": cannot allocate 4 bytes on the GPU");
    }
    // Non-blocking, so that a peer that never joins is a timeout and not a hang.
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    const ncclResult_t r = ncclCommInitRankConfig(&comm_, size_, id, rank_, &config);
    if (r != ncclSuccess && r != ncclInProgress) {
      comm_ = nullptr;
      return Check(r, "ncclCommInitRankConfig");
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      RETURN_IF_ERROR(WaitIssued("init", Clock::now() + timeout_));
    }
    watchdog_ = std::thread([this] { Watch(); });
    HELIX_LOG(kInfo) << "NCCL group " << name_ << ": rank " << rank_ << " of " << size_
                     << " joined (NCCL " << NCCL_MAJOR << "." << NCCL_MINOR << ")";
    return Status::Ok();
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  bool device_memory() const override { return true; }
  Status Check() override {
    std::lock_guard<std::mutex> lock(mu_);
    if (broken_.ok() && comm_ != nullptr) {
      // An error NCCL noted while or after the last kernel ended (the watchdog only asks while
      // collectives are in flight).
      ncclResult_t async = ncclSuccess;
      const ncclResult_t r = ncclCommGetAsyncError(comm_, &async);
      if (r != ncclSuccess) return Fail("check", r);
      if (async != ncclSuccess && async != ncclInProgress) return Fail("a collective", async);
    }
    return broken_;
  }

  // The model's collectives are only queued on the stream: the watchdog thread bounds them.
  Status AllReduceSum(float* data, size_t n) override {
    return Queue("all-reduce", timeout_, [&] {
      return ncclAllReduce(data, data, n, ncclFloat32, ncclSum, comm_, stream_);
    });
  }
  Status AllGather(const void* in, void* out, size_t bytes) override {
    return Queue("all-gather", timeout_,
                 [&] { return ncclAllGather(in, out, bytes, ncclInt8, comm_, stream_); });
  }
  Status AllToAll(const void* in, void* out, size_t bytes) override {
    return Queue("all-to-all", timeout_, [&] {
      ncclResult_t r = ncclGroupStart();
      if (r != ncclSuccess) return r;
      for (int j = 0; j < size_; ++j) {
        r = ncclSend(static_cast<const char*>(in) + j * bytes, bytes, ncclInt8, j, comm_, stream_);
        if (r != ncclSuccess && r != ncclInProgress) break;
        r = ncclRecv(static_cast<char*>(out) + j * bytes, bytes, ncclInt8, j, comm_, stream_);
        if (r != ncclSuccess && r != ncclInProgress) break;
      }
      const ncclResult_t end = ncclGroupEnd();
      return r != ncclSuccess && r != ncclInProgress ? r : end;
    });
  }
  // Broadcast and Barrier are not on the decode path: they wait until the stream has run them.
  Status Broadcast(void* data, size_t bytes, int root) override {
    return Broadcast(data, bytes, root, timeout_);
  }
  Status Broadcast(void* data, size_t bytes, int root, std::chrono::milliseconds timeout) override {
    RETURN_IF_ERROR(Queue("broadcast", timeout, [&] {
      return ncclBroadcast(data, data, bytes, ncclInt8, root, comm_, stream_);
    }));
    return WaitStream("broadcast", timeout);
  }
  Status Barrier() override {
    RETURN_IF_ERROR(Queue("barrier", timeout_, [&] {
      return ncclAllReduce(scratch_, scratch_, 1, ncclFloat32, ncclSum, comm_, stream_);
    }));
    return WaitStream("barrier", timeout_);
  }

 private:
  // A queued collective the watchdog follows: `start` and `done` are recorded on the stream
  // before and after it. Its timeout runs from when the watchdog sees it started (the work
  // queued ahead of it on the stream, another group's collectives included, is not its own);
  // until then `backstop` bounds it.
  struct Pending {
    cudaEvent_t start, done;
    std::chrono::milliseconds timeout;
    Clock::time_point backstop;
    std::optional<Clock::time_point> started;
    const char* what;
  };

  // Queues one collective on the stream and returns without waiting for the GPU. A
  // non-blocking communicator may take a moment to issue it (host side; bounded by the
  // deadline). Outside a graph capture, events around it go to the watchdog, which aborts
  // the communicator when the collective fails or outlives the deadline; the caller learns of
  // that from Check() after its next wait on the stream (the abort ends the stalled kernels).
  template <typename F>
  Status Queue(const char* what, std::chrono::milliseconds timeout, F&& issue) {
    std::lock_guard<std::mutex> lock(mu_);
    RETURN_IF_ERROR(broken_);
    const Clock::time_point now = Clock::now();
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream_, &capture) != cudaSuccess) cudaGetLastError();
    const bool watched = capture == cudaStreamCaptureStatusNone;  // else part of a graph
    Pending p{nullptr, nullptr, timeout, now + 2 * timeout, std::nullopt, what};
    // Until the watchdog owns them, the events go back to the spares on every early return.
    struct Spare {
      Pending& p;
      std::vector<cudaEvent_t>& spares;
      bool keep = false;
      ~Spare() {
        for (cudaEvent_t e : {p.start, p.done}) {
          if (!keep && e != nullptr) spares.push_back(e);
        }
      }
    } spare{p, spare_events_};
    if (watched) {
      p.start = NewEvent();
      p.done = NewEvent();
      if (p.start == nullptr || p.done == nullptr) {
        return Broken(std::string("NCCL group ") + name_ + ": " + what +
                      ": cudaEventCreate failed");
      }
      if (const cudaError_t e = cudaEventRecord(p.start, stream_); e != cudaSuccess) {
        return Broken(std::string("NCCL group ") + name_ + ": " + what +
                      ": cudaEventRecord: " + cudaGetErrorName(e));
      }
    }
    const ncclResult_t r = issue();
    if (r != ncclSuccess && r != ncclInProgress) return Fail(what, r);
    RETURN_IF_ERROR(WaitIssued(what, now + timeout));
    if (!watched) return Status::Ok();
    if (const cudaError_t e = cudaEventRecord(p.done, stream_); e != cudaSuccess) {
      return Broken(std::string("NCCL group ") + name_ + ": " + what +
                    ": cudaEventRecord: " + cudaGetErrorName(e));
    }
    spare.keep = true;
    pending_.push_back(p);
    if (pending_.size() == 1) cv_.notify_all();
    return Status::Ok();
  }
  // A spare event or a new one; nullptr when none can be made. REQUIRES mu_.
  cudaEvent_t NewEvent() {
    cudaEvent_t e = nullptr;
    if (!spare_events_.empty()) {
      e = spare_events_.back();
      spare_events_.pop_back();
    } else if (cudaEventCreateWithFlags(&e, cudaEventDisableTiming) != cudaSuccess) {
      cudaGetLastError();
      e = nullptr;
    }
    return e;
  }

  // Waits until the stream has run everything queued on it (and so this communicator's
  // collectives), or the watchdog has given up on them.
  Status WaitStream(const char* what, std::chrono::milliseconds timeout) {
    // The watchdog's abort ends a stalled collective first; this deadline is a backstop.
    const Clock::time_point deadline = Clock::now() + 2 * timeout + std::chrono::seconds(5);
    for (int spins = 0;; ++spins) {
      RETURN_IF_ERROR(Check());
      const cudaError_t q = cudaStreamQuery(stream_);
      if (q == cudaSuccess) return Check();
      if (q != cudaErrorNotReady || Clock::now() > deadline) {
        std::lock_guard<std::mutex> lock(mu_);
        if (q != cudaErrorNotReady) {
          return Broken(std::string("NCCL group ") + name_ + ": " + what + ": CUDA error " +
                        cudaGetErrorName(q) + " (" + cudaGetErrorString(q) + ")");
        }
        return Broken(StatusCode::kDeadlineExceeded, std::string("NCCL group ") + name_ + ": " +
                                                         what + ": the stream did not finish");
      }
      if (spins > 1000) std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

  // The watchdog: retires finished collectives, and aborts the communicator when NCCL reports
  // an error or the oldest unfinished one is past its deadline.
  void Watch() {
    cudaSetDevice(device_);  // events are queried on the communicator's device
    std::unique_lock<std::mutex> lock(mu_);
    while (!stop_) {
      if (pending_.empty() || !broken_.ok()) {
        cv_.wait(lock, [&] { return stop_ || (!pending_.empty() && broken_.ok()); });
        continue;
      }
      while (!pending_.empty()) {
        Pending& front = pending_.front();
        const Clock::time_point now = Clock::now();
        cudaError_t q = cudaSuccess;
        if (!front.started) {
          q = cudaEventQuery(front.start);
          if (q == cudaSuccess) front.started = now;
        }
        if (q == cudaSuccess) q = cudaEventQuery(front.done);
        if (q == cudaErrorNotReady) break;
        if (q != cudaSuccess) {
          (void)Broken(std::string("NCCL group ") + name_ + ": " + front.what + ": CUDA error " +
                       cudaGetErrorName(q) + " (" + cudaGetErrorString(q) + ")");
          break;
        }
        spare_events_.push_back(front.start);
        spare_events_.push_back(front.done);
        pending_.pop_front();
      }
      if (!pending_.empty() && broken_.ok()) {
        ncclResult_t async = ncclSuccess;
        ncclCommGetAsyncError(comm_, &async);
        const Pending& oldest = pending_.front();
        const Clock::time_point deadline =
            oldest.started ? *oldest.started + oldest.timeout : oldest.backstop;
        if (async != ncclSuccess && async != ncclInProgress) {
          (void)Fail(oldest.what, async);
        } else if (Clock::now() > deadline) {
          const std::string ms = std::to_string(oldest.timeout.count());
          (void)Broken(StatusCode::kDeadlineExceeded,
                       std::string("NCCL group ") + name_ + ": " + oldest.what +
                           (oldest.started ? " did not finish within " + ms +
                                                 " ms of starting (a peer is gone or stalled)"
                                           : " did not start within twice " + ms +
                                                 " ms (the work queued before it is stalled)"));
        }
      }
      // Short naps while collectives are in flight: a step's all run within milliseconds.
      cv_.wait_for(lock, std::chrono::microseconds(200));
    }
  }

  // A non-blocking communicator may still be issuing the last call: wait for it. REQUIRES mu_.
  Status WaitIssued(const char* what, Clock::time_point deadline) {
    for (;;) {
      ncclResult_t async = ncclSuccess;
      const ncclResult_t r = ncclCommGetAsyncError(comm_, &async);
      if (r != ncclSuccess) return Fail(what, r);
      if (async == ncclSuccess) return Status::Ok();
      if (async != ncclInProgress) return Fail(what, async);
      if (Clock::now() > deadline) {
        return Broken(StatusCode::kDeadlineExceeded, std::string("NCCL group ") + name_ + ": " +
                                                         what +
                                                         " timed out (a peer never joined "
                                                         "or is stalled)");
      }
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
  Status Check(ncclResult_t r, const char* what) {
    if (r == ncclSuccess) return Status::Ok();
    return Internal(std::string("NCCL group ") + name_ + ": " + what +
                    " failed: " + ncclGetErrorString(r));
  }
  // REQUIRES mu_ (as Broken).
  Status Fail(const char* what, ncclResult_t r) {
    std::string detail = ncclGetErrorString(r);
    if (comm_ != nullptr) {
      const char* last = ncclGetLastError(comm_);
      if (last != nullptr && last[0] != '\0') detail += std::string(": ") + last;
    }
    return Broken(StatusCode::kUnavailable,
                  std::string("NCCL group ") + name_ + ": " + what + " failed: " + detail);
  }
  Status Broken(std::string message) { return Broken(StatusCode::kInternal, std::move(message)); }
  // The first failure: kept, logged, and the communicator aborted (its kernels still queued
  // or running end, so a wait on the stream returns). REQUIRES mu_.
  Status Broken(StatusCode code, std::string message) {
    if (broken_.ok()) {
      broken_ = Status(code, message);
      HELIX_LOG(kError) << message;
      if (comm_ != nullptr) ncclCommAbort(comm_);
      comm_ = nullptr;
    }
    return broken_;
  }

  std::string name_;
  int rank_, size_;
  std::chrono::milliseconds timeout_;
  cudaStream_t stream_;
  int device_ = 0;
  float* scratch_ = nullptr;

  std::mutex mu_;  // the communicator, between the caller's thread and the watchdog
  std::condition_variable cv_;
  ncclComm_t comm_ = nullptr;              // GUARDED_BY(mu_)
  Status broken_;                          // GUARDED_BY(mu_)
  std::deque<Pending> pending_;            // GUARDED_BY(mu_), in stream order
  std::vector<cudaEvent_t> spare_events_;  // GUARDED_BY(mu_)
  bool stop_ = false;                      // GUARDED_BY(mu_)
  std::thread watchdog_;
};

}  // namespace

StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(TcpStore* store,
                                                               const std::string& prefix,
                                                               int my_index, int group_size,
                                                               const NcclOptions& options) {
  auto c = std::make_unique<NcclCommunicator>(prefix, my_index, group_size, options);
  RETURN_IF_ERROR(c->Init(store));
  return std::unique_ptr<Communicator>(std::move(c));
}

}  // namespace helix::parallel
