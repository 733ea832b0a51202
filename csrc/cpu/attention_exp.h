// e^x on AVX-512 for the exponents of a softmax (x <= 0, shifted by the row's maximum): what the
// CPU attention kernels (csrc/cpu/attention_decode.cpp, attention.cpp) share.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

namespace fastseq::cpu::avx512 {

// e^x, 16 lanes at a time, for the x <= 0 of a softmax: x = n ln 2 + r with |r| <= ln(2) / 2
// (ln 2 in two parts, so that n ln 2 is exact), e^r by its Taylor polynomial to r^7 (relative
// error below 2e-7), times 2^n.
__attribute__((target("avx512f,avx2,fma"))) inline __m512 exp_softmax(__m512 x) {
  // e^-104 is 0 in float32. vmaxps returns its second operand when either is NaN: a NaN
  // exponent stays NaN (and so does the row it is in), as in torch.
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693145751953125f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(-1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  for (const float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) {
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  }
  return _mm512_scalef_ps(p, n);
}

}  // namespace fastseq::cpu::avx512

#endif
