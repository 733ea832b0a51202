// Products too small for a library GEMM call to pay its way, float32 on AVX-512, unpacked:
// C (M x N) = A W^T (+ bias) (+ C) with the operands read where they lie.
//
// An LSTMCell step or one decoding step multiplies a few rows by the weights (8 x 128 by
// 128 x 512: half a million multiply-adds), where a library call's fixed cost (oneDNN's primitive
// lookup; MKL, which runs its AVX2 code on AMD CPUs) outweighs the arithmetic. Here there is no
// packing and no call overhead, at the cost of reading W from wherever it is, which at these
// sizes is L2.
//
// Two forms, by which operand runs along n in memory:
// * broadcast (W(n, k) at w[n + k ldw], unit stride along n: W^T's rows are contiguous, as for
//   d pre W_ih or d pre^T x): 16 columns of C per vector, each A(m, k) broadcast; a tile is 4
//   rows by 64 columns, 16 accumulators;
// * dot (A and W both row-major along k, as for x W_ih^T): 16 k per vector, a tile is 4 rows by
//   4 columns of C, 16 accumulators summed across their lanes at the end.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTSEQ_SMALL_GEMM_AVX512 1
#include <immintrin.h>

namespace fastseq::cpu::avx512 {

#define FASTSEQ_AVX512 __attribute__((target("avx512f,avx512vl,avx2,fma")))

// The first `n` of 16 lanes (n may exceed 16 or be negative).
FASTSEQ_AVX512 inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u);
}

// Where a product's output goes: C (row stride ldc), plus bias (N) when given, plus what C held
// when `accumulate`.
struct Output {
  float* c;
  int64_t ldc;
  const float* bias;
  bool accumulate;
};

// Broadcast form, one tile: C[0:MR, 0:64) of the columns that `mask` keeps, A(r, k) at
// a[r sam + k sak], W^T row k at w + k ldw.
template <int MR>
FASTSEQ_AVX512 void broadcast_tile(int64_t K, const float* a, int64_t sam, int64_t sak,
                                   const float* w, int64_t ldw, const Output& out,
                                   const __mmask16 (&mask)[4]) {
  __m512 acc[MR][4];
#pragma GCC unroll 4
  for (int v = 0; v < 4; ++v) {
    const __m512 bias =
        out.bias ? _mm512_maskz_loadu_ps(mask[v], out.bias + 16 * v) : _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const float* c = out.c + r * out.ldc + 16 * v;
      acc[r][v] = out.accumulate ? _mm512_add_ps(bias, _mm512_maskz_loadu_ps(mask[v], c)) : bias;
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[4];
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      b[v] = _mm512_maskz_loadu_ps(mask[v], w + k * ldw + 16 * v);
    }
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * sam + k * sak]);
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) {
        acc[r][v] = _mm512_fmadd_ps(x, b[v], acc[r][v]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      _mm512_mask_storeu_ps(out.c + r * out.ldc + 16 * v, mask[v], acc[r][v]);
    }
  }
}

// Broadcast form over rows [0, M) and columns [n0, n1) (n0 a multiple of 64).
FASTSEQ_AVX512 inline void broadcast_gemm(int64_t M, int64_t K, const float* a, int64_t sam,
                                          int64_t sak, const float* w, int64_t ldw,
                                          const Output& out, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += 64) {
    const __mmask16 mask[4] = {lanes(n1 - n), lanes(n1 - n - 16), lanes(n1 - n - 32),
                               lanes(n1 - n - 48)};
    for (int64_t m = 0; m < M; m += 4) {
      const float* a_m = a + m * sam;
      const Output tile{out.c + m * out.ldc + n, out.ldc, out.bias ? out.bias + n : nullptr,
                        out.accumulate};
      switch (std::min<int64_t>(4, M - m)) {
        case 4: broadcast_tile<4>(K, a_m, sam, sak, w + n, ldw, tile, mask); break;
        case 3: broadcast_tile<3>(K, a_m, sam, sak, w + n, ldw, tile, mask); break;
        case 2: broadcast_tile<2>(K, a_m, sam, sak, w + n, ldw, tile, mask); break;
        default: broadcast_tile<1>(K, a_m, sam, sak, w + n, ldw, tile, mask); break;
      }
    }
  }
}

// The lane sums of four vectors, in order.
FASTSEQ_AVX512 inline __m128 sum_lanes(__m512 p, __m512 q, __m512 r, __m512 s) {
  // Per 128-bit lane: [p0 + p2, q0 + q2, p1 + p3, q1 + q3], the same of r and s, then the four
  // sums of that lane; then the four lanes added.
  const __m512 pq = _mm512_add_ps(_mm512_unpacklo_ps(p, q), _mm512_unpackhi_ps(p, q));
  const __m512 rs = _mm512_add_ps(_mm512_unpacklo_ps(r, s), _mm512_unpackhi_ps(r, s));
  const __m512 all = _mm512_add_ps(_mm512_shuffle_ps(pq, rs, _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_ps(pq, rs, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 half = _mm256_add_ps(
      _mm512_castps512_ps256(all),
      _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(all), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

// Dot form, one tile: C[0:MR, 0:nc) for nc <= 4 columns, A rows at a (lda), W rows at w (ldw).
template <int MR>
FASTSEQ_AVX512 void dot_tile(int64_t K, const float* a, int64_t lda, const float* w, int64_t ldw,
                             int64_t nc, const Output& out) {
  const float* rows[4];
  for (int j = 0; j < 4; ++j) {
    rows[j] = w + std::min<int64_t>(j, nc - 1) * ldw;  // past nc: a real row, never stored
  }
  __m512 acc[MR][4];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      acc[r][j] = _mm512_setzero_ps();
    }
  }
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = lanes(K - k);
    __m512 b[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      b[j] = _mm512_maskz_loadu_ps(mask, rows[j] + k);
    }
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const __m512 x = _mm512_maskz_loadu_ps(mask, a + r * lda + k);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        acc[r][j] = _mm512_fmadd_ps(x, b[j], acc[r][j]);
      }
    }
  }
  const __mmask8 store = static_cast<__mmask8>((1u << nc) - 1u);
  const __m128 bias = out.bias ? _mm_maskz_loadu_ps(store, out.bias) : _mm_setzero_ps();
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) {
    float* c = out.c + r * out.ldc;
    __m128 sums = _mm_add_ps(sum_lanes(acc[r][0], acc[r][1], acc[r][2], acc[r][3]), bias);
    if (out.accumulate) {
      sums = _mm_add_ps(sums, _mm_maskz_loadu_ps(store, c));
    }
    _mm_mask_storeu_ps(c, store, sums);
  }
}

// Dot form over rows [0, M) and columns [n0, n1).
FASTSEQ_AVX512 inline void dot_gemm(int64_t M, int64_t K, const float* a, int64_t lda,
                                    const float* w, int64_t ldw, const Output& out, int64_t n0,
                                    int64_t n1) {
  for (int64_t n = n0; n < n1; n += 4) {
    const int64_t nc = std::min<int64_t>(4, n1 - n);
    for (int64_t m = 0; m < M; m += 4) {
      const float* a_m = a + m * lda;
      const Output tile{out.c + m * out.ldc + n, out.ldc, out.bias ? out.bias + n : nullptr,
                        out.accumulate};
      switch (std::min<int64_t>(4, M - m)) {
        case 4: dot_tile<4>(K, a_m, lda, w + n * ldw, ldw, nc, tile); break;
        case 3: dot_tile<3>(K, a_m, lda, w + n * ldw, ldw, nc, tile); break;
        case 2: dot_tile<2>(K, a_m, lda, w + n * ldw, ldw, nc, tile); break;
        default: dot_tile<1>(K, a_m, lda, w + n * ldw, ldw, nc, tile); break;
      }
    }
  }
}

#undef FASTSEQ_AVX512

}  // namespace fastseq::cpu::avx512
#endif
