// Collectives between the ranks of one generation instance (or a sub-group of them, e.g. one
// CP group). One interface, implemented over Gloo (TCP, host buffers) and NCCL (GPU buffers,
// nccl_communicator.h). Every call
// is bounded by the communicator's timeout: a timeout or a dead peer returns an error (and
// leaves the communicator unusable), never hangs. A device communicator (NCCL) may only queue
// a collective on the GPU stream and return: its result is there once the stream has run it,
// and after waiting for the stream the caller must ask Check() whether it succeeded.
// Thread-safety: one thread (the rank's engine thread) drives a communicator.
#pragma once

#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/common/status.h"

namespace helix::parallel {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // True when the buffers of the collectives are device memory (NCCL), false for host memory
  // (Gloo).
  virtual bool device_memory() const { return false; }
  // The first failure of a collective that was queued and returned Ok (device communicators;
  // host ones finish each call before returning, so Ok). Ask after waiting for the stream.
  virtual Status Check() { return Status::Ok(); }

  // In place: data[0, n) becomes the element-wise sum over ranks (identical on every rank).
  virtual Status AllReduceSum(float* data, size_t n) = 0;
  // out = concatenation over ranks of each rank's `bytes` from in (out holds size() * bytes).
  virtual Status AllGather(const void* in, void* out, size_t bytes) = 0;
  // in holds size() chunks of `bytes`; chunk j goes to rank j, and out's chunk i comes from
  // rank i.
  virtual Status AllToAll(const void* in, void* out, size_t bytes) = 0;
  // data[0, bytes) of `root` is copied to every rank.
  virtual Status Broadcast(void* data, size_t bytes, int root) = 0;
  virtual Status Barrier() = 0;
  // As Broadcast, with its own timeout (e.g. a worker idling for the next step plan).
  virtual Status Broadcast(void* data, size_t bytes, int root,
                           std::chrono::milliseconds timeout) = 0;
};

class TcpStore;

struct GlooOptions {
  std::string host = "127.0.0.1";  // this rank's address for the TCP pairs
  std::chrono::milliseconds timeout{30000};
};

// Joins the group `prefix` of `ranks` (global rank ids, sorted; this process is
// ranks[my_index]) through the store: every member must call this with the same prefix and
// ranks. Errors name the group and what failed (e.g. a peer that never joined).
StatusOr<std::unique_ptr<Communicator>> CreateGlooCommunicator(TcpStore* store,
                                                               const std::string& prefix,
                                                               int my_index, int group_size,
                                                               const GlooOptions& options);

// Tests: `inner` (a communicator of host buffers) presented as a device one (device_memory()
// true), for a device backend whose device pointers are host pointers: the CPU emulation of
// CUDA. The model then runs its NCCL code paths (collectives on device buffers, no host
// staging, the logits gathered and sampled on the device) without NCCL and without a GPU.
// `before` runs ahead of every collective (the backend's Sync: a device collective follows
// the kernels queued before it). inner must outlive the view.
std::unique_ptr<Communicator> DeviceMemoryViewForTesting(Communicator* inner,
                                                         std::function<Status()> before);

}  // namespace helix::parallel
