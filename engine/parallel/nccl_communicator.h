// Communicator over NCCL: the collectives of the model's forward pass between GPU ranks, on
// device buffers, queued on the CUDA backend's stream. NCCL's unique id travels through the
// instance's rendezvous store. The model's collectives (all-reduce, all-gather, all-to-all)
// are only queued: the step waits for the GPU once, for its sampled tokens. A watchdog thread
// per communicator follows the queued collectives (an event after each) and aborts the
// communicator when NCCL reports an error or one outlives the timeout, which ends its kernels,
// so the caller's wait on the stream returns and Check() names the failure: never a hang.
// Broadcast and Barrier wait until the stream has run them. NCCL refuses two ranks on one GPU:
// ranks sharing a GPU use Gloo with host staging instead (Engine's `collectives` option). Built
// when NCCL is found (HELIX_HAVE_NCCL). Thread-safety: one thread drives a communicator.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "engine/common/status.h"
#include "engine/parallel/communicator.h"
#include "engine/parallel/tcp_store.h"

namespace helix::parallel {

struct NcclOptions {
  std::chrono::milliseconds timeout{30000};  // init and every collective
  void* stream = nullptr;                    // the cudaStream_t to queue on (nullptr: legacy)
};

// Joins the group `prefix` (every member calls this with the same prefix and size; the
// member with index 0 makes the unique id) on the calling thread's current CUDA device.
StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(TcpStore* store,
                                                               const std::string& prefix,
                                                               int my_index, int group_size,
                                                               const NcclOptions& options);

}  // namespace helix::parallel
