#include "engine/parallel/step_plan.h"

#include <cstring>

namespace helix::parallel {
namespace {

template <typename T>
void Put(std::string* out, T v) {
  out->append(reinterpret_cast<const char*>(&v), sizeof(T));
}

class Reader {
 public:
  explicit Reader(const std::string& s) : s_(s) {}
  template <typename T>
  bool Get(T* v) {
    if (pos_ + sizeof(T) > s_.size()) return false;
    std::memcpy(v, s_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return true;
  }
  size_t left() const { return s_.size() - pos_; }

 private:
  const std::string& s_;
  size_t pos_ = 0;
};

}  // namespace

std::string EncodeStepPlan(const StepPlan& p) {
  std::string out;
  Put<uint8_t>(&out, p.shutdown ? 1 : 0);
  Put<uint32_t>(&out, static_cast<uint32_t>(p.released.size()));
  for (uint64_t id : p.released) Put(&out, id);
  Put<uint32_t>(&out, static_cast<uint32_t>(p.transfers.size()));
  for (const PlanTransfer& t : p.transfers) {
    Put(&out, t.uid);
    Put(&out, t.reserve_tokens);
    Put<uint32_t>(&out, static_cast<uint32_t>(t.source.size()));
    out.append(t.source);
  }
  for (const auto* ids : {&p.transfer_cancels, &p.transfer_polls}) {
    Put<uint32_t>(&out, static_cast<uint32_t>(ids->size()));
    for (uint64_t id : *ids) Put(&out, id);
  }
  Put<uint32_t>(&out, static_cast<uint32_t>(p.seqs.size()));
  for (const PlanSeq& s : p.seqs) {
    Put(&out, s.uid);
    Put(&out, s.reserve_tokens);
    Put(&out, s.first_pos);
    Put<uint32_t>(&out, static_cast<uint32_t>(s.tokens.size()));
    out.append(reinterpret_cast<const char*>(s.tokens.data()), s.tokens.size() * sizeof(int32_t));
  }
  return out;
}

StatusOr<StepPlan> DecodeStepPlan(const std::string& bytes) {
  Reader r(bytes);
  StepPlan p;
  uint8_t shutdown = 0;
  uint32_t n = 0;
  const Status bad =
      DataLoss("step plan of " + std::to_string(bytes.size()) + " bytes is malformed");
  if (!r.Get(&shutdown) || !r.Get(&n) || n > r.left() / 8) return bad;
  p.shutdown = shutdown != 0;
  p.released.resize(n);
  for (uint64_t& id : p.released) r.Get(&id);
  if (!r.Get(&n) || n > r.left() / 16) return bad;
  p.transfers.resize(n);
  for (PlanTransfer& t : p.transfers) {
    uint32_t len = 0;
    if (!r.Get(&t.uid) || !r.Get(&t.reserve_tokens) || !r.Get(&len) || len > r.left()) return bad;
    t.source.resize(len);
    for (char& c : t.source) r.Get(&c);
  }
  for (auto* ids : {&p.transfer_cancels, &p.transfer_polls}) {
    if (!r.Get(&n) || n > r.left() / 8) return bad;
    ids->resize(n);
    for (uint64_t& id : *ids) r.Get(&id);
  }
  if (!r.Get(&n) || n > r.left() / 20) return bad;
  p.seqs.resize(n);
  for (PlanSeq& s : p.seqs) {
    uint32_t t = 0;
    if (!r.Get(&s.uid) || !r.Get(&s.reserve_tokens) || !r.Get(&s.first_pos) || !r.Get(&t) ||
        t > r.left() / 4) {
      return bad;
    }
    s.tokens.resize(t);
    for (int32_t& tok : s.tokens) r.Get(&tok);
  }
  if (r.left() != 0) return bad;
  return p;
}

}  // namespace helix::parallel
