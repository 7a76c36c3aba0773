#include "server/common/kv_proto.h"

#include <algorithm>

#include <initializer_list>
#include <optional>
#include <tuple>
#include <vector>

#include "engine/common/log.h"
#include "server/config/serving_config.h"

namespace helix::server {
namespace {

const char* ConfigName(kernels::DType t) {
  switch (t) {
    case kernels::DType::kF32:
      return "float32";
    case kernels::DType::kF16:
      return "float16";
    case kernels::DType::kBF16:
      return "bfloat16";
  }
  return "unknown";
}

}  // namespace

void ToProto(const transfer::KvLayout& l, v1::KvLayout* out) {
  out->set_version(l.version);
  out->set_dtype(ConfigName(l.dtype));
  out->set_tokens_per_block(l.tokens_per_block);
  out->set_num_layers(l.num_layers);
  out->set_num_kv_heads(l.num_kv_heads);
  out->set_head_dim(l.head_dim);
  out->set_num_planes(l.num_planes);
  out->set_block_bytes(l.block_bytes());
}

void ToProto(const transfer::KvSource& s, v1::KvHandle* out) {
  out->set_server_id(s.server_id);
  out->set_server_address(s.server_address);
  out->set_request_id(s.request_id);
  out->set_worker_address(s.worker_address);
  out->set_ucx_listener(s.listener_address);
  out->add_rkeys(s.rkey);
  for (uint64_t a : s.block_addresses) out->add_block_addresses(a);
  out->set_token_count(s.token_count);
  out->set_model_fingerprint(s.model_fingerprint);
  out->set_lease_token(s.lease_token);
  ToProto(s.layout, out->mutable_kv_layout());
  out->set_checksum(s.checksum);
}

std::string Clip(const std::string& s) {
  return s.size() <= 64 ? s : s.substr(0, 64) + "... (" + std::to_string(s.size()) + " bytes)";
}

Status CheckStops(const v1::GenerateRequest& r) {
  constexpr int kMaxStops = 256;
  constexpr size_t kMaxStopBytes = 64u << 10;
  constexpr int kMaxStopTokens = 1 << 16;
  size_t stop_bytes = 0;
  for (const std::string& s : r.stop()) stop_bytes += s.size();
  if (r.stop_size() > kMaxStops || stop_bytes > kMaxStopBytes) {
    return InvalidArgument("stop: " + std::to_string(r.stop_size()) + " strings of " +
                           std::to_string(stop_bytes) + " bytes; the limits are " +
                           std::to_string(kMaxStops) + " strings and " +
                           std::to_string(kMaxStopBytes) + " bytes");
  }
  if (r.stop_token_ids_size() > kMaxStopTokens) {
    return InvalidArgument("stop_token_ids has " + std::to_string(r.stop_token_ids_size()) +
                           " entries; the limit is " + std::to_string(kMaxStopTokens));
  }
  return Status::Ok();
}

StatusOr<transfer::KvSource> FromProto(const v1::KvHandle& h) {
  transfer::KvSource s;
  if (h.server_id().empty()) return InvalidArgument("kv_handle.server_id is empty");
  for (const auto& [field, value, limit] :
       {std::tuple<const char*, const std::string*, size_t>{"server_id", &h.server_id(),
                                                            kMaxIdBytes},
        {"server_address", &h.server_address(), kMaxIdBytes},
        {"request_id", &h.request_id(), kMaxIdBytes},
        {"lease_token", &h.lease_token(), kMaxIdBytes},
        {"model_fingerprint", &h.model_fingerprint(), kMaxIdBytes},
        {"ucx_listener", &h.ucx_listener(), kMaxIdBytes},
        {"worker_address", &h.worker_address(), size_t{1} << 16}}) {
    if (value->size() > limit) {
      return InvalidArgument("kv_handle." + std::string(field) + " is " +
                             std::to_string(value->size()) + " bytes; the limit is " +
                             std::to_string(limit));
    }
  }
  if (h.rkeys_size() != 1) {
    return InvalidArgument("kv_handle.rkeys has " + std::to_string(h.rkeys_size()) +
                           " entries; expected 1");
  }
  if (!h.has_kv_layout()) return InvalidArgument("kv_handle.kv_layout is missing");
  auto dtype = kernels::DTypeFromName(h.kv_layout().dtype());
  if (!dtype) {
    return InvalidArgument("kv_handle.kv_layout.dtype '" + h.kv_layout().dtype() +
                           "' is not float32, float16 or bfloat16");
  }
  s.server_id = h.server_id();
  s.server_address = h.server_address();
  s.request_id = h.request_id();
  s.worker_address = h.worker_address();
  s.listener_address = h.ucx_listener();
  s.rkey = h.rkeys(0);
  s.block_addresses.assign(h.block_addresses().begin(), h.block_addresses().end());
  s.token_count = h.token_count();
  s.model_fingerprint = h.model_fingerprint();
  s.lease_token = h.lease_token();
  s.layout.version = h.kv_layout().version();
  s.layout.dtype = *dtype;
  s.layout.tokens_per_block = h.kv_layout().tokens_per_block();
  s.layout.num_layers = h.kv_layout().num_layers();
  s.layout.num_kv_heads = h.kv_layout().num_kv_heads();
  s.layout.head_dim = h.kv_layout().head_dim();
  s.layout.num_planes = h.kv_layout().num_planes() == 0 ? 2 : h.kv_layout().num_planes();
  if (s.layout.num_planes != 1 && s.layout.num_planes != 2) {
    return InvalidArgument("kv_handle.kv_layout.num_planes " + std::to_string(s.layout.num_planes) +
                           ": expected 1 (MLA) or 2");
  }
  s.checksum = h.checksum();
  // Every extent positive and the block's size representable (the product wrapped: a layout of
  // 2^62-sized fields "matched" a block_bytes of 0).
  int64_t bytes = static_cast<int64_t>(kernels::DTypeSize(s.layout.dtype));
  const std::initializer_list<std::pair<const char*, int64_t>> extents = {
      {"tokens_per_block", s.layout.tokens_per_block},
      {"num_layers", s.layout.num_layers},
      {"num_kv_heads", s.layout.num_kv_heads},
      {"head_dim", s.layout.head_dim},
      {"num_planes", s.layout.num_planes}};
  for (const auto& [name, v] : extents) {
    if (v <= 0 || __builtin_mul_overflow(bytes, v, &bytes)) {
      return InvalidArgument("kv_handle.kv_layout." + std::string(name) + " " + std::to_string(v) +
                             " is out of range (each extent must be positive, and the block's "
                             "byte size must fit 64 bits)");
    }
  }
  if (h.kv_layout().block_bytes() != s.layout.block_bytes()) {
    return InvalidArgument("kv_handle.kv_layout.block_bytes " +
                           std::to_string(h.kv_layout().block_bytes()) + " does not match its " +
                           s.layout.ToString());
  }
  if (h.lease_token().empty()) {
    return InvalidArgument(
        "kv_handle.lease_token is empty (a context server gives one with "
        "every handle)");
  }
  return s;
}

ContextClient::~ContextClient() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  keep_cv_.notify_all();
  if (keeper_.joinable()) keeper_.join();
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_for(lock, std::max(release_timeout_, check_timeout_) + std::chrono::seconds(1),
               [&] { return in_flight_ == 0; });
}

std::shared_ptr<v1::ContextService::Stub> ContextClient::BeginCall(const std::string& address) {
  constexpr size_t kMaxServers = 256;
  std::lock_guard<std::mutex> lock(mu_);
  if (stubs_.size() >= kMaxServers && stubs_.count(address) == 0) {
    auto oldest = stubs_.begin();
    for (auto it = stubs_.begin(); it != stubs_.end(); ++it) {
      if (it->second.last_use < oldest->second.last_use) oldest = it;
    }
    exports_.erase(oldest->first);
    lease_ms_.erase(oldest->first);
    stubs_.erase(oldest);
  }
  CachedStub& c = stubs_[address];
  if (c.stub == nullptr) {
    c.stub = v1::ContextService::NewStub(
        grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  }
  c.last_use = ++uses_;
  ++in_flight_;
  return c.stub;
}

void ContextClient::EndCall() {
  std::lock_guard<std::mutex> lock(mu_);
  --in_flight_;
  cv_.notify_all();
}

void ContextClient::CheckExport(const transfer::KvSource& s,
                                std::function<void(const Status&)> done) {
  if (s.server_address.empty()) {
    return done(InvalidArgument("the KV handle names no context server (server_address)"));
  }
  std::optional<transfer::KvExportInfo> known;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = exports_.find(s.server_address);
    if (it != exports_.end() && it->second.server_id == s.server_id) known = it->second;
  }
  if (known) return done(transfer::CheckAgainstExport(s, *known));
  std::shared_ptr<v1::ContextService::Stub> stub = BeginCall(s.server_address);
  struct Call {
    std::shared_ptr<v1::ContextService::Stub> stub;  // alive until the call ends
    grpc::ClientContext ctx;
    v1::GetKvExportRequest req;
    v1::KvExport resp;
    transfer::KvSource src;
    std::function<void(const Status&)> done;
  };
  auto call = std::make_shared<Call>();
  call->stub = stub;
  call->ctx.set_deadline(std::chrono::system_clock::now() + check_timeout_);
  call->src = s;
  call->done = std::move(done);
  stub->async()->GetKvExport(&call->ctx, &call->req, &call->resp, [this, call](grpc::Status st) {
    Status verdict;
    if (!st.ok()) {
      verdict = Aborted("KV transfer from context server '" + call->src.server_id +
                        "' failed: cannot ask " + call->src.server_address +
                        " what it exports, to check the KV handle: " + st.error_message());
    } else {
      transfer::KvExportInfo e;
      e.server_id = call->resp.server_id();
      e.worker_address = call->resp.worker_address();
      e.listener_address = call->resp.ucx_listener();
      e.rkey = call->resp.rkey();
      e.region_base = call->resp.region_base();
      e.region_bytes = call->resp.region_bytes();
      e.block_bytes = call->resp.block_bytes();
      {
        std::lock_guard<std::mutex> lock(mu_);
        exports_[call->src.server_address] = e;
      }
      verdict = transfer::CheckAgainstExport(call->src, e);
    }
    call->done(verdict);
    EndCall();
  });
}

uint64_t ContextClient::KeepLease(const std::string& address, v1::ReleaseRequest lease,
                                  int64_t lease_ms) {
  std::lock_guard<std::mutex> lock(mu_);
  const Clock::time_point now = Clock::now();
  auto known = lease_ms_.find(address);
  // The handle's hint is outside its checksum: bounded as a config's durations are.
  lease_ms = std::min(lease_ms, config::kMaxDurationMs);
  if (lease_ms <= 0 && known != lease_ms_.end()) lease_ms = known->second;
  const auto first = lease_ms > 0 ? std::chrono::milliseconds(std::max<int64_t>(1, lease_ms / 2))
                                  : std::chrono::milliseconds(250);
  const uint64_t id = next_kept_++;
  kept_[id] = Kept{address, std::move(lease), now, now + first};
  if (!keeper_.joinable()) keeper_ = std::thread([this] { KeepLoop(); });
  keep_cv_.notify_all();
  return id;
}

void ContextClient::DropLease(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  kept_.erase(id);
}

void ContextClient::KeepLoop() {
  constexpr auto kMaxKeep = std::chrono::hours(1);
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    const Clock::time_point now = Clock::now();
    Clock::time_point wake = now + std::chrono::seconds(1);
    std::vector<std::tuple<uint64_t, std::string, v1::ReleaseRequest>> due;
    for (auto it = kept_.begin(); it != kept_.end();) {
      Kept& k = it->second;
      if (now - k.since > kMaxKeep) {
        HELIX_LOG(kWarn) << "kept the KV lease of " << k.lease.request_id() << " on " << k.address
                         << " for an hour; no longer renewing it";
        it = kept_.erase(it);
        continue;
      }
      if (!k.renewing && k.next <= now) {
        k.renewing = true;
        due.emplace_back(it->first, k.address, k.lease);
      } else if (!k.renewing) {
        wake = std::min(wake, k.next);
      }
      ++it;
    }
    lock.unlock();
    for (const auto& [id, address, lease] : due) Renew(id, address, lease);
    lock.lock();
    if (stopping_) break;
    // Woken early by a new lease or an answer (which sets that lease's next renewal).
    keep_cv_.wait_until(lock, wake);
  }
}

void ContextClient::Renew(uint64_t id, const std::string& address,
                          const v1::ReleaseRequest& lease) {
  std::shared_ptr<v1::ContextService::Stub> stub = BeginCall(address);
  struct Call {
    std::shared_ptr<v1::ContextService::Stub> stub;  // alive until the call ends
    grpc::ClientContext ctx;
    v1::ReleaseRequest req;
    v1::RenewLeaseResponse resp;
  };
  auto call = std::make_shared<Call>();
  call->stub = stub;
  call->req = lease;
  call->ctx.set_deadline(std::chrono::system_clock::now() + release_timeout_);
  stub->async()->RenewLease(
      &call->ctx, &call->req, &call->resp, [this, call, id, address](grpc::Status st) {
        {
          std::lock_guard<std::mutex> lock(mu_);
          const Clock::time_point now = Clock::now();
          if (st.ok()) {
            ++renewals_;
            lease_ms_[address] = call->resp.lease_ms();
          }
          auto it = kept_.find(id);
          if (it != kept_.end()) {
            Kept& k = it->second;
            k.renewing = false;
            const grpc::StatusCode code = st.error_code();
            if (st.ok()) {
              k.next =
                  now + std::chrono::milliseconds(std::max<int64_t>(1, call->resp.lease_ms() / 2));
            } else if (code == grpc::StatusCode::NOT_FOUND ||
                       code == grpc::StatusCode::PERMISSION_DENIED ||
                       code == grpc::StatusCode::INVALID_ARGUMENT ||
                       code == grpc::StatusCode::UNIMPLEMENTED) {
              // Gone (its pull will say so), or a server without renewals: nothing to keep.
              HELIX_LOG(kWarn) << "cannot renew the KV lease of " << call->req.request_id()
                               << " on context server " << address << ": " << st.error_message();
              kept_.erase(it);
            } else {  // unreachable for now: tried again shortly
              k.next = now + std::chrono::milliseconds(250);
            }
          }
        }
        keep_cv_.notify_all();
        EndCall();
      });
}

v1::ReleaseRequest ReleaseRequestFor(const v1::KvHandle& h) {
  v1::ReleaseRequest r;
  r.set_request_id(h.request_id());
  r.set_lease_token(h.lease_token());
  *r.mutable_block_addresses() = h.block_addresses();
  return r;
}

void ContextClient::Release(const std::string& address, v1::ReleaseRequest release) {
  Confirm(address, std::move(release), nullptr);
}

void ContextClient::Confirm(const std::string& address, v1::ReleaseRequest release,
                            std::function<void(const Status&)> verdict) {
  const std::string request_id = release.request_id();
  if (address.empty()) {
    if (verdict) verdict(InvalidArgument("the KV handle names no context server to confirm with"));
    return;
  }
  std::shared_ptr<v1::ContextService::Stub> stub = BeginCall(address);
  struct Call {
    std::shared_ptr<v1::ContextService::Stub> stub;  // alive until the call ends
    grpc::ClientContext ctx;
    v1::ReleaseRequest req;
    v1::ReleaseResponse resp;
  };
  auto call = std::make_shared<Call>();
  call->stub = stub;
  call->req = std::move(release);
  call->ctx.set_deadline(std::chrono::system_clock::now() + release_timeout_);
  stub->async()->Release(
      &call->ctx, &call->req, &call->resp,
      [this, call, address, request_id, verdict = std::move(verdict)](grpc::Status st) {
        if (!st.ok() && st.error_code() != grpc::StatusCode::NOT_FOUND) {
          ++failures_;
          HELIX_LOG(kWarn) << "release of " << request_id << " on context server " << address
                           << " failed: " << st.error_message() << " (its lease frees the KV)";
        }
        if (verdict) {
          if (st.ok()) {
            verdict(Status::Ok());
          } else if (st.error_code() == grpc::StatusCode::PERMISSION_DENIED) {
            verdict(PermissionDenied("context server " + address +
                                     " refused the KV handle of "
                                     "request '" +
                                     request_id + "': " + st.error_message() +
                                     "; the request is not decoded from it"));
          } else if (st.error_code() == grpc::StatusCode::NOT_FOUND) {
            verdict(DeadlineExceeded(
                "the KV of request '" + request_id + "' was no longer held by context server " +
                address +
                " once pulled (released already, by an earlier request with the same handle, "
                "or its lease, kv_lease_ms, ran out first): the blocks may have been reused "
                "while they were read, so the request is not decoded from them"));
          } else {
            verdict(Aborted("could not confirm with context server " + address +
                            " that it still held the KV of request '" + request_id +
                            "' after the pull: " + st.error_message()));
          }
        }
        EndCall();
      });
}

}  // namespace helix::server
