#include <functional>
#include <memory>
#include <utility>

#include "engine/parallel/communicator.h"

namespace helix::parallel {
namespace {

// Every collective of `inner` after `before`; device_memory() true (see the header).
class DeviceMemoryView final : public Communicator {
 public:
  DeviceMemoryView(Communicator* inner, std::function<Status()> before)
      : inner_(inner), before_(std::move(before)) {}
  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  bool device_memory() const override { return true; }
  Status Check() override { return inner_->Check(); }
  Status AllReduceSum(float* data, size_t n) override {
    RETURN_IF_ERROR(before_());
    return inner_->AllReduceSum(data, n);
  }
  Status AllGather(const void* in, void* out, size_t bytes) override {
    RETURN_IF_ERROR(before_());
    return inner_->AllGather(in, out, bytes);
  }
  Status AllToAll(const void* in, void* out, size_t bytes) override {
    RETURN_IF_ERROR(before_());
    return inner_->AllToAll(in, out, bytes);
  }
  Status Broadcast(void* data, size_t bytes, int root) override {
    RETURN_IF_ERROR(before_());
    return inner_->Broadcast(data, bytes, root);
  }
  Status Barrier() override {
    RETURN_IF_ERROR(before_());
    return inner_->Barrier();
  }
  Status Broadcast(void* data, size_t bytes, int root, std::chrono::milliseconds timeout) override {
    RETURN_IF_ERROR(before_());
    return inner_->Broadcast(data, bytes, root, timeout);
  }

 private:
  Communicator* inner_;
  std::function<Status()> before_;
};

}  // namespace

std::unique_ptr<Communicator> DeviceMemoryViewForTesting(Communicator* inner,
                                                         std::function<Status()> before) {
  return std::make_unique<DeviceMemoryView>(inner, std::move(before));
}

}  // namespace helix::parallel
