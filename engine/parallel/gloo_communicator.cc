#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/alltoall.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/common/error.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/prefix_store.h>
#include <gloo/transport/tcp/device.h>

#include <csignal>
#include <cstring>
#include <exception>
#include <mutex>
#include <vector>

#include "engine/parallel/communicator.h"
#include "engine/parallel/tcp_store.h"

namespace helix::parallel {
namespace {

class GlooCommunicator final : public Communicator {
 public:
  GlooCommunicator(std::shared_ptr<gloo::rendezvous::Context> ctx, std::string name,
                   std::chrono::milliseconds timeout)
      : ctx_(std::move(ctx)), name_(std::move(name)), timeout_(timeout) {}

  int rank() const override { return ctx_->rank; }
  int size() const override { return ctx_->size; }

  // Small buffers (decode steps' rows) go to every rank in one all-to-all and each rank sums
  // the copies in rank order: one exchange instead of the ring's 2 (size - 1) steps, each a
  // round trip through Gloo's transport thread (on 2 cores: stories260K decoding on 2 CPU
  // ranks took 27 ms a token with the ring, 8 with this). Every rank adds the same values in
  // the same order, so all hold the same bits, as with the ring.
  Status AllReduceSum(float* data, size_t n) override {
    if (size() == 1 || n == 0) return broken_;
    const size_t ranks = static_cast<size_t>(size());
    if (n * ranks <= kDirectFloats) {
      return Run("all-reduce", [&] {
        recv_.resize(n * ranks);
        GatherCopies(data, recv_.data(), n * sizeof(float));
        for (size_t i = 0; i < n; ++i) {
          float acc = recv_[i];
          for (size_t r = 1; r < ranks; ++r) acc += recv_[r * n + i];
          data[i] = acc;
        }
      });
    }
    return Run("all-reduce", [&] {
      gloo::AllreduceOptions o(ctx_);
      o.setOutput(data, n);
      o.setReduceFunction(
          static_cast<void (*)(void*, const void*, const void*, size_t)>(&gloo::sum<float>));
      o.setTag(NextTag());
      o.setTimeout(timeout_);
      gloo::allreduce(o);
    });
  }

  // Small ones as one all-to-all of the input's copies too (Gloo's all-gather is a ring of
  // size - 1 steps).
  Status AllGather(const void* in, void* out, size_t bytes) override {
    const size_t ranks = static_cast<size_t>(size());
    if (ranks > 2 && bytes > 0 && bytes * ranks <= kDirectFloats * sizeof(float)) {
      return Run("all-gather", [&] { GatherCopies(in, out, bytes); });
    }
    return Run("all-gather", [&] {
      gloo::AllgatherOptions o(ctx_);
      o.setInput(const_cast<char*>(static_cast<const char*>(in)), bytes);
      o.setOutput(static_cast<char*>(out), bytes * static_cast<size_t>(size()));
      o.setTag(NextTag());
      o.setTimeout(timeout_);
      gloo::allgather(o);
    });
  }

  Status AllToAll(const void* in, void* out, size_t bytes) override {
    if (size() == 1) {
      std::memcpy(out, in, bytes);
      return Status::Ok();
    }
    return Run("all-to-all", [&] {
      gloo::AlltoallOptions o(ctx_);
      o.setInput(const_cast<char*>(static_cast<const char*>(in)), bytes * size());
      o.setOutput(static_cast<char*>(out), bytes * static_cast<size_t>(size()));
      o.setTag(NextTag());
      o.setTimeout(timeout_);
      gloo::alltoall(o);
    });
  }

  Status Broadcast(void* data, size_t bytes, int root) override {
    return Broadcast(data, bytes, root, timeout_);
  }

  Status Broadcast(void* data, size_t bytes, int root, std::chrono::milliseconds timeout) override {
    return Run(
        "broadcast",
        [&] {
          gloo::BroadcastOptions o(ctx_);
          o.setOutput(static_cast<char*>(data), bytes);
          o.setRoot(root);
          o.setTag(NextTag());
          o.setTimeout(timeout);
          gloo::broadcast(o);
        },
        timeout);
  }

  Status Barrier() override {
    return Run("barrier", [&] {
      gloo::BarrierOptions o(ctx_);
      o.setTag(NextTag());
      o.setTimeout(timeout_);
      gloo::barrier(o);
    });
  }

 private:
  uint32_t NextTag() { return tag_++; }

  // The one-exchange gather: `bytes` of `in` to every rank in one all-to-all of its copies, rank
  // r's into out[r * bytes]. Throws as Gloo does (inside Run).
  void GatherCopies(const void* in, void* out, size_t bytes) {
    const size_t ranks = static_cast<size_t>(size());
    copies_.resize(bytes * ranks);
    for (size_t r = 0; r < ranks; ++r) std::memcpy(copies_.data() + r * bytes, in, bytes);
    gloo::AlltoallOptions o(ctx_);
    o.setInput(copies_.data(), bytes * ranks);
    o.setOutput(static_cast<char*>(out), bytes * ranks);
    o.setTag(NextTag());
    o.setTimeout(timeout_);
    gloo::alltoall(o);
  }

  // `timeout`: the call's own, when not the communicator's (for the error message).
  template <typename F>
  Status Run(const char* what, F&& f, std::chrono::milliseconds timeout = {}) {
    if (!broken_.ok()) return broken_;
    try {
      f();
      return Status::Ok();
    } catch (const std::exception& e) {
      // Gloo's pairs are unusable after an error: every later call fails fast with it.
      broken_ = Unavailable(name_ + ": " + what + " failed on rank " + std::to_string(rank()) +
                            " of " + std::to_string(size()) + " (a peer died or timed out after " +
                            std::to_string((timeout.count() > 0 ? timeout : timeout_).count()) +
                            " ms): " + e.what());
      return broken_;
    }
  }

  std::shared_ptr<gloo::rendezvous::Context> ctx_;
  std::string name_;
  std::chrono::milliseconds timeout_;
  uint32_t tag_ = 0;
  Status broken_;
  // The one-exchange paths of AllReduceSum and AllGather: up to this many floats over all ranks
  // (256 KiB), and their buffers (kept between calls).
  static constexpr size_t kDirectFloats = size_t{1} << 16;
  std::vector<char> copies_;  // GatherCopies' copies of its input
  std::vector<float> recv_;   // AllReduceSum's gathered rows
};

// Gloo's TCP transport writes to its sockets without MSG_NOSIGNAL, so a peer that dies mid-step
// would kill this process with SIGPIPE instead of turning into an error on the next collective.
// Ignore SIGPIPE process-wide (unless the embedding program installed its own handler): every
// write then fails with EPIPE, which Gloo reports as an exception.
void IgnoreSigpipeOnce() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction old {};
    if (sigaction(SIGPIPE, nullptr, &old) == 0 && old.sa_handler == SIG_DFL) {
      struct sigaction ign {};
      ign.sa_handler = SIG_IGN;
      sigemptyset(&ign.sa_mask);
      sigaction(SIGPIPE, &ign, nullptr);
    }
  });
}

}  // namespace

StatusOr<std::unique_ptr<Communicator>> CreateGlooCommunicator(TcpStore* store,
                                                               const std::string& prefix,
                                                               int my_index, int group_size,
                                                               const GlooOptions& options) {
  IgnoreSigpipeOnce();
  try {
    gloo::transport::tcp::attr attr;
    attr.hostname = options.host;
    auto device = gloo::transport::tcp::CreateDevice(attr);
    auto ctx = std::make_shared<gloo::rendezvous::Context>(my_index, group_size);
    ctx->setTimeout(options.timeout);
    gloo::rendezvous::PrefixStore prefixed(prefix, *store);
    ctx->connectFullMesh(prefixed, device);
    return std::unique_ptr<Communicator>(std::make_unique<GlooCommunicator>(
        std::move(ctx), "group '" + prefix + "'", options.timeout));
  } catch (const std::exception& e) {
    return Unavailable("group '" + prefix + "': rank " + std::to_string(my_index) + " of " +
                       std::to_string(group_size) + " could not connect to its peers within " +
                       std::to_string(options.timeout.count()) + " ms: " + e.what());
  }
}

}  // namespace helix::parallel
