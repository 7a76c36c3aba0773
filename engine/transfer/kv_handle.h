// What a generation instance needs to pull a prefilled request's KV from a context server
// (DESIGN.md §5), independent of the wire format (server/ converts to and from the proto).
// Plain values and pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "engine/common/status.h"
#include "kernels/dtype.h"

namespace helix::transfer {

// Bumped whenever the block byte layout changes.
inline constexpr int kKvLayoutVersion = 1;

// A KV pool's block layout: a block holds tokens_per_block tokens of every layer, in the
// element order [layer][k=0 / v=1][kv_head][token][head_dim] (kernels::KvPoolView).
struct KvLayout {
  int version = kKvLayoutVersion;
  kernels::DType dtype = kernels::DType::kF32;
  int64_t tokens_per_block = 0;
  int64_t num_layers = 0;
  int64_t num_kv_heads = 0;  // heads in this pool (all of the model's on a TP = 1 server)
  int64_t head_dim = 0;
  int64_t num_planes = 2;  // 2: K and V (GQA); 1: the MLA latent

  int64_t block_bytes() const {
    return num_layers * num_planes * num_kv_heads * tokens_per_block * head_dim *
           static_cast<int64_t>(kernels::DTypeSize(dtype));
  }
  std::string ToString() const;
};

// One prefilled request held by a context server.
struct KvSource {
  std::string server_id;       // the context server instance (unique per process start)
  std::string server_address;  // its gRPC address (host:port), where Release goes
  std::string request_id;      // the request's id on the context server
  std::string worker_address;  // UCX worker address
  // The context server's UCX listener, "host:port" ("[v6]:port"); where generation ranks
  // connect (empty: to the worker address).
  std::string listener_address;
  std::string rkey;                       // packed rkey of the context server's pool
  std::vector<uint64_t> block_addresses;  // remote address of each prompt block, in order
  int64_t token_count = 0;                // prompt tokens whose KV the blocks hold
  KvLayout layout;
  std::string model_fingerprint;
  // The lease's secret (random, per handle): a Release must show it, with the block addresses,
  // for the context server to free or confirm the KV (Engine::ReleaseLease).
  std::string lease_token;
  uint64_t checksum = 0;  // HandleChecksum of the fields above
};

// FNV-1a 64 over every field of the handle but `checksum`: UCX aborts on a malformed worker
// address or rkey, so a handle is used only when its checksum matches.
uint64_t HandleChecksum(const KvSource& s);

// What a context server exports, the same for every handle it gives out (the generation
// server asks it for this rather than trusting a client's handle).
struct KvExportInfo {
  std::string server_id, worker_address, listener_address, rkey;
  uint64_t region_base = 0, region_bytes = 0;
  int64_t block_bytes = 0;
};

// Whether `s` refers to `e`'s export: the same instance, UCX addresses and rkey, and every
// block address a whole block inside the exported region, on a block boundary. The checksum
// catches damage, not a client that recomputes it; UCX aborts on a malformed rkey, and reads
// whatever address it is given.
Status CheckAgainstExport(const KvSource& s, const KvExportInfo& e);

// Compact binary form of a KvSource (for step plans between ranks of one instance).
std::string EncodeKvSource(const KvSource& s);
StatusOr<KvSource> DecodeKvSource(const std::string& bytes);

// Whether a generation instance with `model_fingerprint`, pool layout `local` (its per-rank
// KV heads) and `tp` tensor-parallel ranks can take KV from `s`. Errors name the mismatch.
Status CheckCompatible(const KvSource& s, const std::string& model_fingerprint,
                       const KvLayout& local, int64_t tp);

}  // namespace helix::transfer
