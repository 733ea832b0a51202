// The LSTM cell's pointwise math on W floats at a time (W = 8 for AVX2, 16 for AVX-512), written
// once with GCC vector extensions.
//
// Everything here is always_inline and free of intrinsics: the caller's target attribute decides
// the instructions (csrc/cpu/lstm.cpp has one AVX2 and one AVX-512 entry point around each
// loop), so one body serves both widths. Math in float for float and bfloat16 storage. Each loop
// returns the column where it stopped; the scalar code does the rest.
#pragma once

#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>

namespace fastseq::cpu::simd {

#define FASTSEQ_SIMD_INLINE __attribute__((always_inline)) inline

template <int W>
struct Vec {
  typedef float f __attribute__((vector_size(4 * W)));
  typedef int32_t i __attribute__((vector_size(4 * W)));
  typedef uint32_t u __attribute__((vector_size(4 * W)));
  typedef uint16_t h __attribute__((vector_size(2 * W)));
};

template <int W>
FASTSEQ_SIMD_INLINE typename Vec<W>::f splat(float x) {
  return typename Vec<W>::f{} + x;
}

template <int W>
FASTSEQ_SIMD_INLINE typename Vec<W>::f load(const float* p) {
  typename Vec<W>::f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int W>
FASTSEQ_SIMD_INLINE typename Vec<W>::f load(const c10::BFloat16* p) {
  typename Vec<W>::h raw;
  std::memcpy(&raw, p, sizeof raw);
  return (typename Vec<W>::f)(__builtin_convertvector(raw, typename Vec<W>::u) << 16);
}

template <int W>
FASTSEQ_SIMD_INLINE void store(float* p, typename Vec<W>::f v) {
  std::memcpy(p, &v, sizeof v);
}

// Round to nearest even, as c10::BFloat16's constructor does; NaN stays NaN.
template <int W>
FASTSEQ_SIMD_INLINE void store(c10::BFloat16* p, typename Vec<W>::f v) {
  using U = typename Vec<W>::u;
  const U bits = (U)v;
  U rounded = (bits + (((bits >> 16) & 1u) + 0x7fffu)) >> 16;
  rounded = v != v ? U{} + 0x7fc0u : rounded;
  const typename Vec<W>::h packed = __builtin_convertvector(rounded, typename Vec<W>::h);
  std::memcpy(p, &packed, sizeof packed);
}

// exp(x) for |x| <= 87 (clamped there), Cephes' expf: x = n ln2 + r, exp(r) by a degree-6
// polynomial, 2^n by building the exponent bits. About 1 ulp. The clamp keeps 2^n normal, and
// the gate activations lose nothing by it.
template <int W>
FASTSEQ_SIMD_INLINE typename Vec<W>::f exp(typename Vec<W>::f x) {
  using F = typename Vec<W>::f;
  using I = typename Vec<W>::i;
  x = x < -87.f ? splat<W>(-87.f) : x;
  x = x > 87.f ? splat<W>(87.f) : x;
  // Adding and taking away 1.5 * 2^23 rounds to the nearest integer (|x log2 e| < 2^22).
  const F n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  F r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  F p = splat<W>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + (r + 1.f);
  const I e = (__builtin_convertvector(n, I) + 127) << 23;
  return p * (F)e;
}

template <int W>
FASTSEQ_SIMD_INLINE typename Vec<W>::f sigmoid(typename Vec<W>::f x) {
  return 1.f / (1.f + exp<W>(-x));
}

// Cephes' tanhf: an odd polynomial below |x| = 0.625, where (1 - e) / (1 + e) with
// e = exp(-2|x|) would cancel; that form above, where it is exact to about 2 ulp.
template <int W>
FASTSEQ_SIMD_INLINE typename Vec<W>::f tanh(typename Vec<W>::f x) {
  using F = typename Vec<W>::f;
  using I = typename Vec<W>::i;
  const I sign = (I)x & (int32_t)0x80000000u;
  const F ax = (F)((I)x & 0x7fffffff);
  const F z = x * x;
  F p = splat<W>(-5.70498872745e-3f);
  p = p * z + 2.06390887954e-2f;
  p = p * z + -5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z + -3.33332819422e-1f;
  const F small = (p * z) * x + x;
  const F e = exp<W>(ax * -2.f);
  const F big = (F)((I)((1.f - e) / (1.f + e)) | sign);
  return ax < 0.625f ? small : big;
}

// g: a row's four gate blocks (i, f, g, o, `gs` apart), pre-activations in, activations out;
// c = f c_prev + i g, m = o tanh(c). Columns [0, n - n % W).
template <int W, typename scalar_t>
FASTSEQ_SIMD_INLINE int64_t forward_cells(scalar_t* g, const scalar_t* c_prev, scalar_t* c,
                                          scalar_t* m, int64_t gs, int64_t n) {
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const auto i = sigmoid<W>(load<W>(g + j));
    const auto f = sigmoid<W>(load<W>(g + gs + j));
    const auto gg = tanh<W>(load<W>(g + 2 * gs + j));
    const auto o = sigmoid<W>(load<W>(g + 3 * gs + j));
    const auto cn = f * load<W>(c_prev + j) + i * gg;
    store<W>(g + j, i);
    store<W>(g + gs + j, f);
    store<W>(g + 2 * gs + j, gg);
    store<W>(g + 3 * gs + j, o);
    store<W>(c + j, cn);
    store<W>(m + j, o * tanh<W>(cn));
  }
  return j;
}

// One row of the backward cell (csrc/cpu/lstm.cpp's BackwardRow: gates, c, c_prev, dm_in,
// dm_add, consume, dc in float, dpre). Columns [0, n - n % W).
template <int W, typename Row>
FASTSEQ_SIMD_INLINE int64_t backward_cells(const Row& r, int64_t gs, int64_t n) {
  using F = typename Vec<W>::f;
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const F i = load<W>(r.gates + j);
    const F f = load<W>(r.gates + gs + j);
    const F g = load<W>(r.gates + 2 * gs + j);
    const F o = load<W>(r.gates + 3 * gs + j);
    const F tc = tanh<W>(load<W>(r.c + j));
    F dm = load<W>(r.dm_in + j);
    if (r.dm_add != nullptr) {
      dm = dm + load<W>(r.dm_add + j);
    }
    if (r.consume) {
      store<W>(r.dm_in + j, F{});
    }
    const F dm_o = dm * o;
    const F dc = dm_o * (1.f - tc * tc) + load<W>(r.dc + j);
    store<W>(r.dpre + j, (dc * g) * (i * (1.f - i)));
    store<W>(r.dpre + gs + j, (dc * load<W>(r.c_prev + j)) * (f * (1.f - f)));
    store<W>(r.dpre + 2 * gs + j, (dc * i) * (1.f - g * g));
    store<W>(r.dpre + 3 * gs + j, (dm_o * tc) * (1.f - o));
    store<W>(r.dc + j, dc * f);
  }
  return j;
}

#undef FASTSEQ_SIMD_INLINE

}  // namespace fastseq::cpu::simd
