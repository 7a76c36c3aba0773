// Dequantisation of ggml tensor data (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) to fp32,
// following ggml's block layouts; results match gguf-py's dequantize bit for bit.
// Pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "engine/common/status.h"
#include "engine/model/gguf/ggml_type.h"

namespace helix::gguf {

// Whether Dequantize handles `type`.
bool CanDequantize(uint32_t type);

// Converts `n` elements of `type` stored in `data` to fp32 in out[0, n).
// Errors: Unimplemented for a type CanDequantize refuses (naming `what`, e.g. the tensor, and
// the type); InvalidArgument when n is not a whole number of blocks or data holds a different
// number of bytes than n elements need.
Status Dequantize(uint32_t type, std::span<const uint8_t> data, int64_t n, float* out,
                  const std::string& what);

}  // namespace helix::gguf
