// GGUF / ggml tensor dequantisation on the GPU for the types the loader supports (F32, F16,
// BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K), bit-identical to engine/model/gguf/dequant.h (the
// same float32 operations in the same order, no FMA contraction). Stateless; thread-safe.
#ifndef HELIX_KERNELS_CUDA_DEQUANT_CUDA_H_
#define HELIX_KERNELS_CUDA_DEQUANT_CUDA_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/dtype.h"

namespace helix::kernels::cuda {

struct DequantParams {
  uint32_t ggml_type;  // the file's type number (engine/model/gguf/ggml_type.h)
  const void* data;    // the tensor's blocks, as stored in the file
  int64_t n;           // elements: a whole number of the type's blocks
  void* out;           // [n] of out_dtype: the fp32 value, rounded to nearest even for 16-bit
  DType out_dtype = DType::kF32;
};

// Whether DequantizeCuda handles the type.
bool CanDequantizeCuda(uint32_t ggml_type);

// REQUIRES: device pointers; n a whole number of blocks. Returns cudaErrorInvalidValue for a
// type CanDequantizeCuda refuses or an n that is not a whole number of blocks.
cudaError_t DequantizeCuda(const DequantParams& p, cudaStream_t stream);

}  // namespace helix::kernels::cuda

#endif  // HELIX_KERNELS_CUDA_DEQUANT_CUDA_H_
