#include "engine/parallel/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <cstring>
#include <thread>

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
    if (cudaMalloc(&scratch_, sizeof(float)) != cudaSuccess) {
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
    RETURN_IF_ERROR(WaitIssued("init", Clock::now() + timeout_));
    HELIX_LOG(kInfo) << "NCCL group " << name_ << ": rank " << rank_ << " of " << size_
                     << " joined (NCCL " << NCCL_MAJOR << "." << NCCL_MINOR << ")";
    return Status::Ok();
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  bool device_memory() const override { return true; }

  Status AllReduceSum(float* data, size_t n) override {
    return Run("all-reduce", timeout_,
               [&] { return ncclAllReduce(data, data, n, ncclFloat32, ncclSum, comm_, stream_); });
  }
  Status AllGather(const void* in, void* out, size_t bytes) override {
    return Run("all-gather", timeout_,
               [&] { return ncclAllGather(in, out, bytes, ncclInt8, comm_, stream_); });
  }
  Status AllToAll(const void* in, void* out, size_t bytes) override {
    return Run("all-to-all", timeout_, [&] {
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
  Status Broadcast(void* data, size_t bytes, int root) override {
    return Broadcast(data, bytes, root, timeout_);
  }
  Status Broadcast(void* data, size_t bytes, int root, std::chrono::milliseconds timeout) override {
    return Run("broadcast", timeout,
               [&] { return ncclBroadcast(data, data, bytes, ncclInt8, root, comm_, stream_); });
  }
  Status Barrier() override {
    return Run("barrier", timeout_, [&] {
      return ncclAllReduce(scratch_, scratch_, 1, ncclFloat32, ncclSum, comm_, stream_);
    });
  }

 private:
  // Queues one collective and waits until the stream has run it, or the deadline passes.
  template <typename F>
  Status Run(const char* what, std::chrono::milliseconds timeout, F&& issue) {
    RETURN_IF_ERROR(broken_);
    const Clock::time_point deadline = Clock::now() + timeout;
    const ncclResult_t r = issue();
    if (r != ncclSuccess && r != ncclInProgress) return Fail(what, r);
    RETURN_IF_ERROR(WaitIssued(what, deadline));
    for (int spins = 0;; ++spins) {
      const cudaError_t q = cudaStreamQuery(stream_);
      if (q == cudaSuccess) return Status::Ok();
      if (q != cudaErrorNotReady) {
        return Broken(std::string("NCCL group ") + name_ + ": " + what + ": CUDA error " +
                      cudaGetErrorName(q) + " (" + cudaGetErrorString(q) + ")");
      }
      ncclResult_t async = ncclSuccess;
      ncclCommGetAsyncError(comm_, &async);
      if (async != ncclSuccess && async != ncclInProgress) return Fail(what, async);
      if (Clock::now() > deadline) {
        return Broken(StatusCode::kDeadlineExceeded,
                      std::string("NCCL group ") + name_ + ": " + what + " did not finish within " +
                          std::to_string(timeout.count()) + " ms (a peer is gone or stalled)");
      }
      if (spins > 1000) std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
  // A non-blocking communicator may still be issuing the last call: wait for it.
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
  ncclComm_t comm_ = nullptr;
  float* scratch_ = nullptr;
  Status broken_;
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
