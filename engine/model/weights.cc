#include "engine/model/weights.h"

#include <sstream>

#include "engine/common/meminfo.h"

namespace helix {

void WeightMatrix::ConvertTo(kernels::DType t) {
  if (t == dtype) return;
  bits16.resize(f32.size());
  for (size_t i = 0; i < f32.size(); ++i) {
    bits16[i] =
        t == kernels::DType::kF16 ? kernels::FloatToHalf(f32[i]) : kernels::FloatToBf16(f32[i]);
  }
  std::vector<float>().swap(f32);
  dtype = t;
}

void ModelWeights::ConvertMatricesTo(kernels::DType t) {
  if (t == kernels::DType::kF32) return;
  for (LayerWeights& l : layers) {
    for (WeightMatrix* m :
         {&l.wq, &l.wk, &l.wv, &l.wo, &l.w1, &l.w2, &l.w3, &l.wq_a, &l.wkv_a, &l.wuk_t, &l.wuv}) {
      m->ConvertTo(t);
    }
    for (LayerWeights::Expert& e : l.experts) {
      for (WeightMatrix* m : {&e.w1, &e.w2, &e.w3}) m->ConvertTo(t);
    }
  }
  if (classifier.empty()) classifier.f32 = token_embedding;  // tied: the GEMM reads a copy
  classifier.ConvertTo(t);
}

namespace {

std::string GiB(uint64_t bytes) {
  std::ostringstream o;
  o.precision(3);
  o << static_cast<double>(bytes) / (1u << 30) << " GiB";
  return o.str();
}

}  // namespace

Status CheckHostMemoryFor(uint64_t bytes, const std::string& what, uint64_t available) {
  if (bytes <= available) return Status::Ok();
  return ResourceExhausted(what + " needs " + GiB(bytes) +
                           " of host memory (its weights as float32, before any conversion), "
                           "but only " +
                           GiB(available) + " is available (MemAvailable + SwapFree)");
}

Status CheckHostMemoryFor(uint64_t bytes, const std::string& what) {
  const int64_t available = MemInfoBytes({"MemAvailable", "SwapFree"});
  return available < 0 ? Status::Ok()
                       : CheckHostMemoryFor(bytes, what, static_cast<uint64_t>(available));
}

}  // namespace helix
