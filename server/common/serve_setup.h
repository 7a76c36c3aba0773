// What every gRPC server role (generation, context, router) sets up the same way: engine
// options from a serving config, server credentials from its endpoint, and the bearer-token
// check of an API key. Stateless functions; thread-safe.
#pragma once

#include <map>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "engine/engine.h"
#include "server/config/serving_config.h"

namespace helix::server {

// The engine options a serving config implies (model, tokenizer, threads, KV cache, batch
// limits, TP × CP, transfer timeout); the caller adds what is role-specific.
EngineOptions EngineOptionsFromConfig(const config::ServingConfig& cfg);
// "host:port", with an IPv6 literal host in brackets ("[::1]:50051"), as gRPC takes it.
std::string JoinHostPort(const std::string& host, int port);

// TLS credentials when the endpoint has a certificate and key, else insecure ones.
std::shared_ptr<grpc::ServerCredentials> ServerCredentialsFor(const config::ServerEndpoint& e);

// OK when `api_key` is empty or the call carries "authorization: Bearer <api_key>", else
// UNAUTHENTICATED.
grpc::Status CheckBearer(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata,
                         const std::string& api_key);

}  // namespace helix::server
