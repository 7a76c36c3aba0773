// Element types of KV pools and weights, with portable scalar converters between fp32 and
// the 16-bit formats (IEEE binary16 and bfloat16). All functions are pure and thread-safe.
#ifndef HELIX_KERNELS_DTYPE_H_
#define HELIX_KERNELS_DTYPE_H_

#include <bit>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace helix::kernels {

enum class DType { kF32, kF16, kBF16 };

constexpr size_t DTypeSize(DType t) { return t == DType::kF32 ? 4 : 2; }

constexpr const char* DTypeName(DType t) {
  switch (t) {
    case DType::kF32:
      return "f32";
    case DType::kF16:
      return "f16";
    case DType::kBF16:
      return "bf16";
  }
  return "unknown";
}

// The config / CLI spelling ("float32", "float16", "bfloat16"); nullopt for anything else.
inline std::optional<DType> DTypeFromName(std::string_view name) {
  if (name == "float32") return DType::kF32;
  if (name == "float16") return DType::kF16;
  if (name == "bfloat16") return DType::kBF16;
  return std::nullopt;
}

// IEEE binary16 -> fp32; exact for every input (subnormals, inf, NaN payload kept).
inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    // Zero or subnormal: mant * 2^-24 is exact in fp32.
    const float mag = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -mag : mag;
  }
  if (exp == 31) {
    return std::bit_cast<float>(sign | 0x7f800000u | (mant << 13));
  }
  return std::bit_cast<float>(sign | ((exp + 112) << 23) | (mant << 13));
}

// fp32 -> IEEE binary16, round to nearest even; overflow gives inf, NaN stays NaN (quiet).
inline uint16_t FloatToHalf(float f) {
  const uint32_t bits = std::bit_cast<uint32_t>(f);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs >= 0x7f800000u) {  // inf or NaN
    if (abs == 0x7f800000u) {
      return static_cast<uint16_t>(sign | 0x7c00u);
    }
    return static_cast<uint16_t>(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));
  }
  // 65520 is the midpoint between the largest half (65504) and 2^16; the tie goes to the
  // even neighbour, which is inf.
  if (abs >= 0x477ff000u) {
    return static_cast<uint16_t>(sign | 0x7c00u);
  }
  if (abs < 0x38800000u) {  // below 2^-14: half subnormal or zero
    if (abs <= 0x33000000u) {
      return static_cast<uint16_t>(sign);  // <= 2^-25 rounds to 0
    }
    const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - (abs >> 23);  // value * 2^24 = mant >> shift
    uint32_t r = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) {
      ++r;  // may carry into the min normal
    }
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t h = (abs - (112u << 23)) >> 13;
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) {
    ++h;  // carry may bump the exponent
  }
  return static_cast<uint16_t>(sign | h);
}

// bfloat16 -> fp32 (exact).
inline float Bf16ToFloat(uint16_t b) {
  return std::bit_cast<float>(static_cast<uint32_t>(b) << 16);
}

// fp32 -> bfloat16, round to nearest even; NaN stays NaN (quiet).
inline uint16_t FloatToBf16(float f) {
  const uint32_t bits = std::bit_cast<uint32_t>(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    return static_cast<uint16_t>((bits >> 16) | 0x40u);
  }
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// out[i] = x[i] rounded to `dtype` (kF16 or kBF16; to nearest even) for i < n.
inline void StoreLowp(const float* x, int64_t n, DType dtype, uint16_t* out) {
  if (dtype == DType::kF16) {
    for (int64_t i = 0; i < n; ++i) out[i] = FloatToHalf(x[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = FloatToBf16(x[i]);
  }
}

}  // namespace helix::kernels

#endif  // HELIX_KERNELS_DTYPE_H_
