// Internal to kernels/: an 8-lane fp32 vector used by the CPU kernels, backed by AVX2/FMA/F16C
// where the build targets them (x86-64-v3) and by plain arrays elsewhere. Pure, thread-safe.
#ifndef HELIX_KERNELS_CPU_VEC_H_
#define HELIX_KERNELS_CPU_VEC_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "kernels/dtype.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define HELIX_KERNELS_AVX2 1
#include <immintrin.h>
#endif

namespace helix::kernels::vec {

#if HELIX_KERNELS_AVX2

struct V8 {
  __m256 v;
};

inline V8 Zero() { return {_mm256_setzero_ps()}; }
inline V8 Set1(float x) { return {_mm256_set1_ps(x)}; }
inline V8 Load(const float* p) { return {_mm256_loadu_ps(p)}; }
inline void Store(float* p, V8 a) { _mm256_storeu_ps(p, a.v); }
inline V8 Add(V8 a, V8 b) { return {_mm256_add_ps(a.v, b.v)}; }
inline V8 Sub(V8 a, V8 b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline V8 Mul(V8 a, V8 b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline V8 Div(V8 a, V8 b) { return {_mm256_div_ps(a.v, b.v)}; }
inline V8 Max(V8 a, V8 b) { return {_mm256_max_ps(a.v, b.v)}; }
// a * b + c
inline V8 Fma(V8 a, V8 b, V8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }

inline V8 LoadF16(const uint16_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
inline V8 LoadBf16(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
}

inline float HorizontalSum(V8 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float HorizontalMax(V8 a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Lane g of the result is the sum of the 8 lanes of a[g].
inline V8 ReduceLanes8(const V8 a[8]) {
  const __m256 t0 = _mm256_hadd_ps(a[0].v, a[1].v);
  const __m256 t1 = _mm256_hadd_ps(a[2].v, a[3].v);
  const __m256 t2 = _mm256_hadd_ps(a[4].v, a[5].v);
  const __m256 t3 = _mm256_hadd_ps(a[6].v, a[7].v);
  const __m256 u0 = _mm256_hadd_ps(t0, t1);  // [a0..a3 low halves | a0..a3 high halves]
  const __m256 u1 = _mm256_hadd_ps(t2, t3);
  return {
      _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31))};
}

// e^x to about 2 ulp. Inputs below -87.3 (including -inf) give 0; inputs from 88.7228 on
// (+inf included) give +inf, as std::exp does; those in between are clamped to 88.37 (e^88.37
// ~ 2.4e38, up to 41 % low), which callers only reach through silu of huge negatives.
inline V8 Exp(V8 a) {
  const __m256 lo = _mm256_set1_ps(-87.3365478515625f);
  // Operand order makes a NaN input come through as NaN.
  const __m256 x = _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), _mm256_max_ps(lo, a.v));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln2 in two steps so r keeps full precision.
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  // Taylor series of e^r to degree 7; |r| <= ln2/2 keeps the remainder below 1e-8.
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  // From the first float past ln(FLT_MAX) on e^a is +inf, as std::exp gives it (the clamp
  // above would leave 2.4e38: SiLU's -inf / (1 + e^inf) would come out -inf here and NaN in the
  // scalar tail).
  const __m256 over = _mm256_cmp_ps(a.v, _mm256_set1_ps(88.72283935546875f), _CMP_GE_OQ);
  return {_mm256_blendv_ps(_mm256_andnot_ps(_mm256_cmp_ps(a.v, lo, _CMP_LT_OQ), result),
                           _mm256_set1_ps(INFINITY), over)};
}

#else  // Portable fallback: the same operations lane by lane.

struct V8 {
  float f[8];
};

#define HELIX_V8_MAP(expr)      \
  V8 r;                         \
  for (int i = 0; i < 8; ++i) { \
    r.f[i] = (expr);            \
  }                             \
  return r

inline V8 Zero() { HELIX_V8_MAP(0.0f); }
inline V8 Set1(float x) { HELIX_V8_MAP(x); }
inline V8 Load(const float* p) { HELIX_V8_MAP(p[i]); }
inline void Store(float* p, V8 a) {
  for (int i = 0; i < 8; ++i) p[i] = a.f[i];
}
inline V8 Add(V8 a, V8 b) { HELIX_V8_MAP(a.f[i] + b.f[i]); }
inline V8 Sub(V8 a, V8 b) { HELIX_V8_MAP(a.f[i] - b.f[i]); }
inline V8 Mul(V8 a, V8 b) { HELIX_V8_MAP(a.f[i] * b.f[i]); }
inline V8 Div(V8 a, V8 b) { HELIX_V8_MAP(a.f[i] / b.f[i]); }
inline V8 Max(V8 a, V8 b) { HELIX_V8_MAP(a.f[i] > b.f[i] ? a.f[i] : b.f[i]); }
inline V8 Fma(V8 a, V8 b, V8 c) { HELIX_V8_MAP(std::fma(a.f[i], b.f[i], c.f[i])); }
inline V8 LoadF16(const uint16_t* p) { HELIX_V8_MAP(HalfToFloat(p[i])); }
inline V8 LoadBf16(const uint16_t* p) { HELIX_V8_MAP(Bf16ToFloat(p[i])); }
inline V8 Exp(V8 a) { HELIX_V8_MAP(std::exp(a.f[i])); }
inline float HorizontalSum(V8 a) {
  return ((a.f[0] + a.f[4]) + (a.f[2] + a.f[6])) + ((a.f[1] + a.f[5]) + (a.f[3] + a.f[7]));
}
inline float HorizontalMax(V8 a) {
  float m = a.f[0];
  for (int i = 1; i < 8; ++i) m = a.f[i] > m ? a.f[i] : m;
  return m;
}
inline V8 ReduceLanes8(const V8 a[8]) { HELIX_V8_MAP(HorizontalSum(a[i])); }

#undef HELIX_V8_MAP

#endif  // HELIX_KERNELS_AVX2

// Loads 8 consecutive elements of type T starting at element idx of base, as fp32.
template <DType T>
inline V8 LoadAs(const void* base, int64_t idx) {
  if constexpr (T == DType::kF32) {
    return Load(static_cast<const float*>(base) + idx);
  } else if constexpr (T == DType::kF16) {
    return LoadF16(static_cast<const uint16_t*>(base) + idx);
  } else {
    return LoadBf16(static_cast<const uint16_t*>(base) + idx);
  }
}

template <DType T>
inline float LoadScalarAs(const void* base, int64_t idx) {
  if constexpr (T == DType::kF32) {
    return static_cast<const float*>(base)[idx];
  } else if constexpr (T == DType::kF16) {
    return HalfToFloat(static_cast<const uint16_t*>(base)[idx]);
  } else {
    return Bf16ToFloat(static_cast<const uint16_t*>(base)[idx]);
  }
}

// One online-softmax step of the CPU attention kernels over a tile's scores s[0, nt) (s holds
// whole vectors: the padding up to them is set to -inf here, so exp gives it 0): the scores
// become exp(s - max), the running max *m and sum *l move on, and the factor that rescales the
// output accumulated so far is returned (0 while *m is still -inf). Scores of -inf (an infinite K
// element) drop their row like masked ones, also where they are all the tile has; a NaN score
// makes *l NaN.
inline float OnlineSoftmaxTile(float* s, int64_t nt, float* m, float* l) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t nv = (nt + 7) / 8;  // vectors of scores
  for (int64_t r = nt; r < nv * 8; ++r) {
    s[r] = kNegInf;
  }
  V8 mx = Load(s);
  for (int64_t v = 1; v < nv; ++v) {
    mx = Max(mx, Load(s + 8 * v));
  }
  const float m_new = std::max(*m, HorizontalMax(mx));
  const float alpha = *m == kNegInf ? 0.0f : std::exp(*m - m_new);
  const V8 mv = Set1(m_new == kNegInf ? 0.0f : m_new);  // all -inf: exp(-inf - 0) = 0, not NaN
  V8 sum = Zero();
  for (int64_t v = 0; v < nv; ++v) {
    const V8 pr = Exp(Sub(Load(s + 8 * v), mv));
    Store(s + 8 * v, pr);
    sum = Add(sum, pr);
  }
  *l = *l * alpha + HorizontalSum(sum);
  *m = m_new;
  return alpha;
}

}  // namespace helix::kernels::vec

#endif  // HELIX_KERNELS_CPU_VEC_H_
