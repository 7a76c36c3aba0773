// The context server's gRPC front: helix.v1.ContextService over the callback API in front of
// one single-rank Engine that exports its KV pool over UCX (DESIGN.md §5). Prefill runs the
// prompt, samples the first token and answers with a KV handle; the blocks stay until Release
// or until their lease expires. Thread-safety: gRPC threads only submit to the (thread-safe)
// engine; the engine thread (Loop) steps it, expires leases and answers Prefill calls.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "engine/engine.h"
#include "helix/v1/context.grpc.pb.h"

namespace helix::server {

struct ContextServiceOptions {
  std::string model_name;
  std::string kv_dtype;
  std::string address;          // host:port generation servers send Release to
  int64_t max_in_flight = 256;  // prefills queued or running; beyond: RESOURCE_EXHAUSTED
  int64_t lease_ms = 30000;     // reported with each handle
  std::string api_key;          // non-empty: Prefill/GetServerInfo need the bearer token
};

class ContextService final : public v1::ContextService::CallbackService {
 public:
  ContextService(std::unique_ptr<Engine> engine, ContextServiceOptions options);
  ~ContextService() override;

  grpc::ServerUnaryReactor* Prefill(grpc::CallbackServerContext* ctx,
                                    const v1::PrefillRequest* request,
                                    v1::PrefillResponse* response) override;
  grpc::ServerUnaryReactor* Release(grpc::CallbackServerContext* ctx,
                                    const v1::ReleaseRequest* request,
                                    v1::ReleaseResponse* response) override;
  grpc::ServerUnaryReactor* RenewLease(grpc::CallbackServerContext* ctx,
                                       const v1::ReleaseRequest* request,
                                       v1::RenewLeaseResponse* response) override;
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* ctx,
                                          const v1::GetServerInfoRequest* request,
                                          v1::ServerInfo* response) override;
  grpc::ServerUnaryReactor* GetKvExport(grpc::CallbackServerContext* ctx,
                                        const v1::GetKvExportRequest* request,
                                        v1::KvExport* response) override;

  // Refuses new prefills, waits up to `drain` for those in flight, then stops the engine.
  void Stop(std::chrono::milliseconds drain);

 private:
  class PrefillReactor;
  grpc::Status CheckAuth(const grpc::CallbackServerContext* ctx) const;
  void Kick();
  void Loop();

  std::unique_ptr<Engine> engine_;
  const ContextServiceOptions options_;
  std::atomic<int64_t> in_flight_{0};
  std::atomic<int64_t> free_blocks_;
  // The pool's fixed shape, read once: kv_stats() reads the pool, which the engine thread
  // changes, so other threads must not call it.
  const KvStats kv_shape_;
  std::atomic<bool> accepting_{true};
  std::atomic<uint64_t> next_id_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  bool kicked_ = false;  // GUARDED_BY(mu_)
  bool stop_ = false;    // GUARDED_BY(mu_)
  std::thread thread_;
};

}  // namespace helix::server
