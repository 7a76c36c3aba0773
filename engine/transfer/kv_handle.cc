#include "engine/transfer/kv_handle.h"

#include <cstring>

namespace helix::transfer {
namespace {

struct Fnv {
  uint64_t h = 1469598103934665603ULL;
  void Bytes(const void* p, size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (size_t i = 0; i < n; ++i) {
      h ^= b[i];
      h *= 1099511628211ULL;
    }
  }
  void Str(const std::string& s) {
    U64(s.size());
    Bytes(s.data(), s.size());
  }
  void U64(uint64_t v) { Bytes(&v, sizeof(v)); }
};

void PutU64(std::string* out, uint64_t v) { out->append(reinterpret_cast<const char*>(&v), 8); }
void PutStr(std::string* out, const std::string& s) {
  PutU64(out, s.size());
  out->append(s);
}

class Reader {
 public:
  explicit Reader(const std::string& s) : s_(s) {}
  bool U64(uint64_t* v) {
    if (pos_ + 8 > s_.size()) return false;
    std::memcpy(v, s_.data() + pos_, 8);
    pos_ += 8;
    return true;
  }
  bool I64(int64_t* v) {
    uint64_t u;
    if (!U64(&u)) return false;
    *v = static_cast<int64_t>(u);
    return true;
  }
  bool Str(std::string* out) {
    uint64_t n;
    if (!U64(&n) || n > s_.size() - pos_) return false;
    out->assign(s_, pos_, n);
    pos_ += n;
    return true;
  }
  bool done() const { return pos_ == s_.size(); }
  size_t left() const { return s_.size() - pos_; }

 private:
  const std::string& s_;
  size_t pos_ = 0;
};

}  // namespace

std::string EncodeKvSource(const KvSource& s) {
  std::string out;
  for (const std::string* f :
       {&s.server_id, &s.server_address, &s.request_id, &s.worker_address, &s.listener_address,
        &s.rkey, &s.model_fingerprint, &s.lease_token}) {
    PutStr(&out, *f);
  }
  PutU64(&out, s.block_addresses.size());
  for (uint64_t a : s.block_addresses) PutU64(&out, a);
  for (int64_t v :
       {s.token_count, static_cast<int64_t>(s.layout.version), static_cast<int64_t>(s.layout.dtype),
        s.layout.tokens_per_block, s.layout.num_layers, s.layout.num_kv_heads, s.layout.head_dim,
        s.layout.num_planes}) {
    PutU64(&out, static_cast<uint64_t>(v));
  }
  PutU64(&out, s.checksum);
  return out;
}

StatusOr<KvSource> DecodeKvSource(const std::string& bytes) {
  KvSource s;
  Reader r(bytes);
  const Status bad =
      DataLoss("KV source of " + std::to_string(bytes.size()) + " bytes is malformed");
  for (std::string* f : {&s.server_id, &s.server_address, &s.request_id, &s.worker_address,
                         &s.listener_address, &s.rkey, &s.model_fingerprint, &s.lease_token}) {
    if (!r.Str(f)) return bad;
  }
  uint64_t n = 0;
  if (!r.U64(&n) || n > r.left() / 8) return bad;
  s.block_addresses.resize(n);
  for (uint64_t& a : s.block_addresses) r.U64(&a);
  int64_t version = 0, dtype = 0;
  if (!r.I64(&s.token_count) || !r.I64(&version) || !r.I64(&dtype) ||
      !r.I64(&s.layout.tokens_per_block) || !r.I64(&s.layout.num_layers) ||
      !r.I64(&s.layout.num_kv_heads) || !r.I64(&s.layout.head_dim) ||
      !r.I64(&s.layout.num_planes) || !r.U64(&s.checksum) || !r.done() || dtype < 0 || dtype > 2) {
    return bad;
  }
  s.layout.version = static_cast<int>(version);
  s.layout.dtype = static_cast<kernels::DType>(dtype);
  return s;
}

std::string KvLayout::ToString() const {
  return "layout v" + std::to_string(version) + " " + kernels::DTypeName(dtype) + ", " +
         std::to_string(tokens_per_block) + " tokens/block, " + std::to_string(num_layers) +
         " layers, " +
         (num_planes == 1
              ? "MLA latent of " + std::to_string(head_dim)
              : std::to_string(num_kv_heads) + " KV heads x " + std::to_string(head_dim));
}

uint64_t HandleChecksum(const KvSource& s) {
  Fnv f;
  f.Str(s.server_id);
  f.Str(s.server_address);
  f.Str(s.request_id);
  f.Str(s.worker_address);
  f.Str(s.rkey);
  f.U64(s.block_addresses.size());
  for (uint64_t a : s.block_addresses) f.U64(a);
  f.U64(static_cast<uint64_t>(s.token_count));
  f.U64(static_cast<uint64_t>(s.layout.version));
  f.U64(static_cast<uint64_t>(s.layout.dtype));
  f.U64(static_cast<uint64_t>(s.layout.tokens_per_block));
  f.U64(static_cast<uint64_t>(s.layout.num_layers));
  f.U64(static_cast<uint64_t>(s.layout.num_kv_heads));
  f.U64(static_cast<uint64_t>(s.layout.head_dim));
  if (s.layout.num_planes != 2) f.U64(static_cast<uint64_t>(s.layout.num_planes));
  f.Str(s.model_fingerprint);
  f.Str(s.lease_token);
  if (!s.listener_address.empty()) f.Str(s.listener_address);
  return f.h;
}

Status CheckAgainstExport(const KvSource& s, const KvExportInfo& e) {
  const std::string who = "KV handle of request '" + s.request_id + "' (context server " +
                          (s.server_address.empty() ? s.server_id : s.server_address) + ")";
  if (s.server_id != e.server_id) {
    return FailedPrecondition(who + " is from instance '" + s.server_id +
                              "', but that server now runs instance '" + e.server_id +
                              "' (restarted?): its KV is gone");
  }
  if (s.worker_address != e.worker_address || s.rkey != e.rkey) {
    return InvalidArgument(who + ": its UCX worker address or rkey is not what the server exports");
  }
  if (s.listener_address != e.listener_address) {
    return InvalidArgument(who + ": its UCX listener '" + s.listener_address +
                           "' is not the server's ('" + e.listener_address + "')");
  }
  const uint64_t bb = static_cast<uint64_t>(s.layout.block_bytes());
  if (e.block_bytes <= 0 || bb != static_cast<uint64_t>(e.block_bytes)) {
    return InvalidArgument(who + ": blocks of " + std::to_string(bb) +
                           " bytes, but the server's are " + std::to_string(e.block_bytes));
  }
  for (size_t i = 0; i < s.block_addresses.size(); ++i) {
    const uint64_t a = s.block_addresses[i];
    const bool inside = a >= e.region_base && a - e.region_base <= e.region_bytes &&
                        e.region_bytes - (a - e.region_base) >= bb && (a - e.region_base) % bb == 0;
    if (!inside) {
      return InvalidArgument(who + ": block " + std::to_string(i) +
                             " is not a block of the server's exported KV");
    }
  }
  return Status::Ok();
}

Status CheckCompatible(const KvSource& s, const std::string& model_fingerprint,
                       const KvLayout& local, int64_t tp) {
  const std::string from = "KV handle from context server '" + s.server_id + "': ";
  if (s.layout.version != local.version) {
    return FailedPrecondition(from + "KV layout version " + std::to_string(s.layout.version) +
                              ", this server speaks version " + std::to_string(local.version));
  }
  if (s.model_fingerprint != model_fingerprint) {
    return FailedPrecondition(from + "model fingerprint " + s.model_fingerprint +
                              " differs from this server's " + model_fingerprint +
                              " (another model, dtype or tokenizer)");
  }
  if (s.layout.dtype != local.dtype) {
    return FailedPrecondition(from + "KV dtype " + kernels::DTypeName(s.layout.dtype) +
                              ", this server's is " + kernels::DTypeName(local.dtype));
  }
  if (s.layout.tokens_per_block != local.tokens_per_block) {
    return FailedPrecondition(from + "tokens_per_block " +
                              std::to_string(s.layout.tokens_per_block) + ", this server's is " +
                              std::to_string(local.tokens_per_block));
  }
  // MLA's one latent "head" is whole on every TP shard; GQA heads are split over TP.
  const int64_t want_heads = local.num_planes == 1 ? local.num_kv_heads : local.num_kv_heads * tp;
  if (s.layout.num_layers != local.num_layers || s.layout.head_dim != local.head_dim ||
      s.layout.num_planes != local.num_planes || s.layout.num_kv_heads != want_heads) {
    return FailedPrecondition(from + s.layout.ToString() + " does not match this server's " +
                              local.ToString() + " x TP " + std::to_string(tp));
  }
  const int64_t blocks =
      (s.token_count + s.layout.tokens_per_block - 1) / s.layout.tokens_per_block;
  if (s.token_count < 1 || static_cast<int64_t>(s.block_addresses.size()) != blocks) {
    return InvalidArgument(from + std::to_string(s.block_addresses.size()) +
                           " block addresses for " + std::to_string(s.token_count) +
                           " tokens (expected " + std::to_string(blocks) + ")");
  }
  if (s.worker_address.empty() || s.rkey.empty()) {
    return InvalidArgument(from + "no UCX worker address or rkey");
  }
  if (HandleChecksum(s) != s.checksum) {
    return InvalidArgument(from + "checksum mismatch: the handle was altered or truncated");
  }
  return Status::Ok();
}

}  // namespace helix::transfer
