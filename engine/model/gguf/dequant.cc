#include "engine/model/gguf/dequant.h"

#include <cstring>

#include "kernels/dtype.h"

// Every element is computed with the same float32 operations, in the same order, as gguf-py
// (and ggml's reference code): products and sums are rounded one at a time. This file is built
// with -ffp-contract=off so the compiler does not fuse them into FMAs, which would change the
// last bit.

namespace helix::gguf {
namespace {

constexpr int kQK = 32;    // elements per block of the legacy formats
constexpr int kQKK = 256;  // elements per K-quant super-block

float Half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return kernels::HalfToFloat(h);
}

// Q8_0: fp16 d, int8 q[32]; y = d * q.
void BlockQ8_0(const uint8_t* b, float* y) {
  const float d = Half(b);
  const auto* q = reinterpret_cast<const int8_t*>(b + 2);
  for (int j = 0; j < kQK; ++j) y[j] = static_cast<float>(q[j]) * d;
}

// Q4_0: fp16 d, 16 bytes of nibbles: element j in the low nibble of byte j, element j + 16
// in its high nibble; y = d * (q - 8).
void BlockQ4_0(const uint8_t* b, float* y) {
  const float d = Half(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < kQK / 2; ++j) {
    y[j] = d * static_cast<float>((qs[j] & 0x0f) - 8);
    y[j + kQK / 2] = d * static_cast<float>((qs[j] >> 4) - 8);
  }
}

// Q4_1: fp16 d, fp16 m, nibbles as Q4_0; y = d * q + m.
void BlockQ4_1(const uint8_t* b, float* y) {
  const float d = Half(b);
  const float m = Half(b + 2);
  const uint8_t* qs = b + 4;
  for (int j = 0; j < kQK / 2; ++j) {
    y[j] = d * static_cast<float>(qs[j] & 0x0f) + m;
    y[j + kQK / 2] = d * static_cast<float>(qs[j] >> 4) + m;
  }
}

// Q4_K: fp16 d, fp16 dmin, 12 bytes of 6-bit (scale, min) pairs for the 8 sub-blocks of 32,
// then 128 bytes of nibbles. Sub-blocks 2c and 2c+1 share bytes [32c, 32c+32): low nibbles,
// then high nibbles. y = (d * scale) * q - (dmin * min).
//
// Scale bytes: for sub-block j < 4, scale = s[j] & 63 and min = s[j+4] & 63. For j >= 4 the
// low 4 bits sit in s[j+4] (scale low nibble, min high nibble) and the top 2 bits in the
// spare top bits of s[j-4] (scale) and s[j] (min).
void BlockQ4_K(const uint8_t* b, float* y) {
  const float d = Half(b);
  const float dmin = Half(b + 2);
  const uint8_t* s = b + 4;
  const uint8_t* qs = b + 16;
  for (int j = 0; j < 8; ++j) {
    int sc, mn;
    if (j < 4) {
      sc = s[j] & 63;
      mn = s[j + 4] & 63;
    } else {
      sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
      mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
    const float scale = d * static_cast<float>(sc);
    const float offset = dmin * static_cast<float>(mn);
    const uint8_t* q = qs + 32 * (j / 2);
    const int shift = (j % 2) * 4;
    for (int l = 0; l < 32; ++l) {
      y[32 * j + l] = scale * static_cast<float>((q[l] >> shift) & 0x0f) - offset;
    }
  }
}

// Q6_K: 128 bytes of low nibbles (ql), 64 bytes of high 2-bit pairs (qh), 16 int8 scales (one
// per 16 elements), fp16 d. Each half h of 128 elements uses ql[64h, 64h+64) and
// qh[32h, 32h+32): element 32k + l (k < 4, l < 32) takes the low (k < 2) or high nibble of
// ql[l + 32 (k % 2)] and bits 2k..2k+1 of qh[l]; q is that 6-bit value minus 32.
// y = (d * scale) * q.
void BlockQ6_K(const uint8_t* b, float* y) {
  const uint8_t* ql_all = b;
  const uint8_t* qh_all = b + 128;
  const auto* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = Half(b + 208);
  float scale[16];
  for (int i = 0; i < 16; ++i) scale[i] = d * static_cast<float>(sc[i]);
  for (int h = 0; h < 2; ++h) {
    const uint8_t* ql = ql_all + 64 * h;
    const uint8_t* qh = qh_all + 32 * h;
    float* yh = y + 128 * h;
    for (int k = 0; k < 4; ++k) {
      for (int l = 0; l < 32; ++l) {
        const uint8_t lo_byte = ql[l + 32 * (k % 2)];
        const int lo = k < 2 ? (lo_byte & 0x0f) : (lo_byte >> 4);
        const int hi = (qh[l] >> (2 * k)) & 3;
        const int e = 32 * k + l;
        yh[e] = scale[(128 * h + e) / 16] * static_cast<float>((lo | (hi << 4)) - 32);
      }
    }
  }
}

}  // namespace

bool CanDequantize(uint32_t type) {
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::kF32:
    case GgmlType::kF16:
    case GgmlType::kBF16:
    case GgmlType::kQ8_0:
    case GgmlType::kQ4_0:
    case GgmlType::kQ4_1:
    case GgmlType::kQ4_K:
    case GgmlType::kQ6_K:
      return true;
    default:
      return false;
  }
}

Status Dequantize(uint32_t type, std::span<const uint8_t> data, int64_t n, float* out,
                  const std::string& what) {
  const GgmlTypeInfo* info = GetGgmlTypeInfo(type);
  if (info == nullptr || !CanDequantize(type)) {
    return Unimplemented(what + ": ggml type " + GgmlTypeName(type) +
                         " is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, "
                         "Q4_K, Q6_K)");
  }
  if (n < 0 || n % info->block_size != 0) {
    return InvalidArgument(what + ": " + std::to_string(n) + " elements of " + info->name +
                           " are not a whole number of " + std::to_string(info->block_size) +
                           "-element blocks");
  }
  const int64_t blocks = n / info->block_size;
  if (static_cast<uint64_t>(blocks) * static_cast<uint64_t>(info->block_bytes) != data.size()) {
    return InvalidArgument(what + ": " + std::to_string(n) + " elements of " + info->name +
                           " need " + std::to_string(blocks * info->block_bytes) + " bytes, got " +
                           std::to_string(data.size()));
  }
  const uint8_t* p = data.data();
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::kF32:
      if (n > 0) std::memcpy(out, p, static_cast<size_t>(n) * 4);
      break;
    case GgmlType::kF16:
      for (int64_t i = 0; i < n; ++i) out[i] = Half(p + 2 * i);
      break;
    case GgmlType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, p + 2 * i, 2);
        out[i] = kernels::Bf16ToFloat(v);
      }
      break;
    case GgmlType::kQ8_0:
      for (int64_t i = 0; i < blocks; ++i) BlockQ8_0(p + 34 * i, out + kQK * i);
      break;
    case GgmlType::kQ4_0:
      for (int64_t i = 0; i < blocks; ++i) BlockQ4_0(p + 18 * i, out + kQK * i);
      break;
    case GgmlType::kQ4_1:
      for (int64_t i = 0; i < blocks; ++i) BlockQ4_1(p + 20 * i, out + kQK * i);
      break;
    case GgmlType::kQ4_K:
      for (int64_t i = 0; i < blocks; ++i) BlockQ4_K(p + 144 * i, out + kQKK * i);
      break;
    case GgmlType::kQ6_K:
      for (int64_t i = 0; i < blocks; ++i) BlockQ6_K(p + 210 * i, out + kQKK * i);
      break;
    default:
      break;  // refused above
  }
  return Status::Ok();
}

}  // namespace helix::gguf
