// ggml tensor element types as GGUF files number them, with their block geometry (how many
// elements a block holds and how many bytes it takes). Pure lookups; thread-safe.
#pragma once

#include <cstdint>
#include <string>

namespace helix::gguf {

// The values are the file format's (ggml's enum ggml_type); gaps are retired types.
enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kIQ2_XXS = 16,
  kIQ2_XS = 17,
  kIQ3_XXS = 18,
  kIQ1_S = 19,
  kIQ4_NL = 20,
  kIQ3_S = 21,
  kIQ2_S = 22,
  kIQ4_XS = 23,
  kI8 = 24,
  kI16 = 25,
  kI32 = 26,
  kI64 = 27,
  kF64 = 28,
  kIQ1_M = 29,
  kBF16 = 30,
  kTQ1_0 = 34,
  kTQ2_0 = 35,
  kMXFP4 = 39,
};

struct GgmlTypeInfo {
  const char* name;     // "Q4_K"
  int64_t block_size;   // elements per block
  int64_t block_bytes;  // bytes per block
};

// Geometry of `type`, or nullptr for a value this build does not know.
const GgmlTypeInfo* GetGgmlTypeInfo(uint32_t type);

// "Q4_K", or "type 99" for an unknown value.
std::string GgmlTypeName(uint32_t type);

}  // namespace helix::gguf
