// The generation daemon's gRPC front: helix.v1.GenerationService over the callback API, the
// standard health service and reflection, in front of one Engine driven by its own thread.
// Thread-safety: gRPC threads call Submit/Cancel on the engine (both thread-safe) and hand
// each stream's events over through its reactor (one write in flight); the engine thread owns
// every request's state and calls the sinks.
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
#include "helix/v1/generation.grpc.pb.h"
#include "server/common/kv_proto.h"

namespace helix::server {

struct GenerationServiceOptions {
  std::string model_name;
  std::string kv_dtype;
  int64_t max_in_flight = 256;  // admitted + queued requests; beyond: RESOURCE_EXHAUSTED
  std::string api_key;          // non-empty: RPCs need "authorization: Bearer <api_key>"
  // How long asking a context server what it exports (to check a KV handle) may take.
  std::chrono::milliseconds kv_check_timeout{5000};
  // The context servers whose handles are taken (host:port); empty: any (see
  // CacheTransceiverConfig::allowed_context_servers).
  std::vector<std::string> allowed_context_servers;
  // With several ranks: an empty step goes to the workers when none went out for this long
  // (Engine::Heartbeat), so they notice a leader that is gone without closing its connections.
  std::chrono::milliseconds heartbeat{5000};
};

// Converts a request; errors name the field (INVALID_ARGUMENT) or what is not supported.
StatusOr<GenerateRequest> FromProto(const v1::GenerateRequest& r);
grpc::Status ToGrpc(const Status& s);

class GenerationService final : public v1::GenerationService::CallbackService {
 public:
  // `engine` is the leader's; the service runs it on its own thread until Stop().
  GenerationService(std::unique_ptr<Engine> engine, GenerationServiceOptions options);
  ~GenerationService() override;

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* ctx, const v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Cancel(grpc::CallbackServerContext* ctx,
                                   const v1::CancelRequest* request,
                                   v1::CancelResponse* response) override;
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* ctx,
                                          const v1::GetServerInfoRequest* request,
                                          v1::ServerInfo* response) override;

  // Refuses new requests from now on (UNAVAILABLE) and waits up to `drain` for the ones in
  // flight; the rest are cancelled. Then stops the engine thread (the engine is destroyed,
  // which shuts its worker ranks down).
  void Stop(std::chrono::milliseconds drain);
  // Health: whether the instance can serve (false once a rank was lost).
  bool healthy() const { return healthy_.load(); }
  // Why the instance cannot serve (ok while it can); any thread.
  Status instance_status() const { return engine_->broken(); }
  // Called with the new health whenever it changes (on the engine thread).
  void set_health_listener(std::function<void(bool)> f) { health_listener_ = std::move(f); }
  int64_t in_flight() const { return in_flight_.load(); }

 private:
  class Stream;
  // OK, or UNAUTHENTICATED when an API key is configured and the call does not carry it.
  grpc::Status CheckAuth(const grpc::CallbackServerContext* ctx) const;
  void Kick();
  void Loop();
  // Engine thread: follows the engine's broken() into healthy_ and the listener.
  void UpdateHealth();

  // Kick's state outlives the releaser, whose confirmations kick the engine thread.
  std::mutex mu_;
  std::condition_variable cv_;
  bool kicked_ = false;  // GUARDED_BY(mu_)
  bool stop_ = false;    // GUARDED_BY(mu_)
  // Releases, their confirmation, and the handle check against each server's export; outlives
  // the engine (declared before it).
  ContextClient context_;
  std::unique_ptr<Engine> engine_;
  const GenerationServiceOptions options_;
  const int64_t total_blocks_, block_bytes_, tokens_per_block_;
  std::atomic<int64_t> free_blocks_;
  std::atomic<int64_t> in_flight_{0};
  std::atomic<bool> accepting_{true};
  std::atomic<bool> healthy_{true};
  std::function<void(bool)> health_listener_;
  std::thread thread_;
};

}  // namespace helix::server
