// The router's gRPC front: helix.v1.GenerationService with the generation server's semantics
// (text or token-id prompts, streamed tokens with UTF-8-safe text, Cancel, GetServerInfo),
// routed through the Router. Uses gRPC's synchronous API: each Generate runs on its own
// server thread, which the Router blocks while it streams. Thread-safe.
#pragma once

#include <mutex>
#include <string>
#include <unordered_set>

#include "helix/v1/generation.grpc.pb.h"
#include "server/router/router.h"

namespace helix::router {

// "rt-<16 random hex digits>-": the prefix of the request ids a router process assigns.
std::string NewIdPrefix();

class RouterGrpcService final : public v1::GenerationService::Service {
 public:
  explicit RouterGrpcService(Router* router, std::string api_key = "")
      : router_(router), api_key_(std::move(api_key)) {}

  grpc::Status Generate(grpc::ServerContext* ctx, const v1::GenerateRequest* request,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override;
  grpc::Status Cancel(grpc::ServerContext* ctx, const v1::CancelRequest* request,
                      v1::CancelResponse* response) override;
  grpc::Status GetServerInfo(grpc::ServerContext* ctx, const v1::GetServerInfoRequest* request,
                             v1::ServerInfo* response) override;

 private:
  grpc::Status CheckAuth(const grpc::ServerContext* ctx) const;

  Router* router_;
  std::string api_key_;
  std::mutex mu_;
  std::unordered_set<std::string> active_, cancelled_;  // GUARDED_BY(mu_)
  uint64_t next_id_ = 0;                                // GUARDED_BY(mu_)
  const std::string id_prefix_ = NewIdPrefix();         // "rt-<random>-"
};

}  // namespace helix::router
