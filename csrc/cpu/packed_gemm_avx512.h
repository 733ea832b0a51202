// The LSTM's recurrent GEMM on AVX-512: C_p += A B_p for up to four packed 16-column panels B_p
// at once, float32.
//
// The panels are the layout csrc/cpu/lstm.cpp packs W_hh into: K rows of 16 floats, one zmm per
// k. Doing several panels in one pass (the forward's four gates of a block of units, or four
// column blocks of dh in the backward) reads each element of A once per pass instead of once per
// panel, which at the LSTM's few rows (the batch) is what bounds an AVX2 kernel. Columns of the
// last panel past `n` are zero in the packing; C is read and written under a mask there, as it
// has no room past column n.
#pragma once

#include <algorithm>
#include <cstdint>

#include "register_tiles.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTSEQ_PACKED_GEMM_AVX512 1
#include <immintrin.h>

namespace fastseq::cpu::avx512 {

#define FASTSEQ_AVX512 __attribute__((target("avx512f,avx2,fma")))

// Where the panels and their outputs are: panel p at P + p * p_stride, its C block at
// C + p * c_stride (row stride ldc); only the first n columns of each C block are written.
// `k_blocked`: the np panels are stored block by block of depth_for(np) rows instead (rows
// [k0, k0 + kd) of panel p at P + 16 (k0 np + p kd)), so that one pass reads one contiguous
// stream; such panels must be read with the np they were packed for.
struct Panels {
  const float* P;
  int64_t p_stride;
  float* C;
  int64_t c_stride;
  int64_t ldc;
  int64_t n;
  bool k_blocked = false;
};

// Rows of k per pass over the panels: np panels of this many rows make 256 KiB, which stays in L2
// for the row tiles after the first. Deeper passes write C less often than 32 KiB blocks kept in
// L1 would (128 rows of four panels), which is worth more than L1's latency here.
constexpr int64_t depth_for(int np) {
  return 4096 / np;
}

// acc[r][p] += A[r, k] B_p[k, :] for one k.
template <int MR, int NP>
__attribute__((target("avx512f,avx2,fma"), always_inline)) inline void fma_step(
    __m512 (&acc)[MR][NP], const float* A, int64_t lda, const Panels& w, int64_t k) {
  __m512 b[NP];
#pragma GCC unroll 4
  for (int p = 0; p < NP; ++p) {
    b[p] = _mm512_loadu_ps(w.P + p * w.p_stride + 16 * k);
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const __m512 a = _mm512_set1_ps(A[r * lda + k]);
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) {
      acc[r][p] = _mm512_fmadd_ps(a, b[p], acc[r][p]);
    }
  }
}

// dst[k * 16 + c] = src[c * lds + k] for k, c < 16, and 0 for rows c >= n: a 16 x 16 block of a
// row-major matrix transposed into 16 rows of a panel (how W_hh's rows become panel columns). In
// registers: 16 loads, four rounds of shuffles, 16 stores, where an element-wise copy makes 256
// scalar loads and stores.
FASTSEQ_AVX512 inline void transpose_16x16(const float* src, int64_t lds, int64_t n, float* dst) {
  __m512 r[16], t[16];
#pragma GCC unroll 16
  for (int c = 0; c < 16; ++c) {
    r[c] = c < n ? _mm512_loadu_ps(src + c * lds) : _mm512_setzero_ps();
  }
  // Pairs of rows interleaved (t), then pairs of pairs: r[4 i + j] then holds, in 128-bit lane L,
  // element 4 L + j of rows 4 i .. 4 i + 3.
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  // Then the lanes: output row 4 L + j gathers lane L of r[j], r[4 + j], r[8 + j], r[12 + j].
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const __m512 lo01 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x44);   // lanes 0, 1 of both
    const __m512 lo23 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xEE);   // lanes 2, 3
    const __m512 hi01 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x44);
    const __m512 hi23 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xEE);
    _mm512_storeu_ps(dst + (0 + j) * 16, _mm512_shuffle_f32x4(lo01, hi01, 0x88));
    _mm512_storeu_ps(dst + (4 + j) * 16, _mm512_shuffle_f32x4(lo01, hi01, 0xDD));
    _mm512_storeu_ps(dst + (8 + j) * 16, _mm512_shuffle_f32x4(lo23, hi23, 0x88));
    _mm512_storeu_ps(dst + (12 + j) * 16, _mm512_shuffle_f32x4(lo23, hi23, 0xDD));
  }
}

// Rows of k the weight stream is prefetched ahead (a cache line per row and panel).
constexpr int64_t kAhead = 32;

// C_p[0:MR, 0:n] += A[0:MR, 0:K] B_p[0:K, 0:16] for p < NP. MR NP accumulators; with fewer than
// about 8 the FMA latency shows, so small tiles split k over KU accumulator sets.
template <int MR, int NP>
FASTSEQ_AVX512 void micro_kernel(int64_t K, const float* A, int64_t lda, const Panels& w) {
  constexpr int kTiles = MR * NP;
  constexpr int KU = std::min(4, (8 + kTiles - 1) / kTiles);
  const __mmask16 mask = static_cast<__mmask16>((1u << w.n) - 1u);
  // C is read only after the k loop; in the forward it is the step's slice of the input
  // projection, long out of cache by now. Fetching it meanwhile hides the misses.
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) {
      _mm_prefetch(reinterpret_cast<const char*>(w.C + p * w.c_stride + r * w.ldc), _MM_HINT_T0);
    }
  }
  __m512 acc[KU][MR][NP];
#pragma GCC unroll 4
  for (int u = 0; u < KU; ++u) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) {
        acc[u][r][p] = _mm512_setzero_ps();
      }
    }
  }
  int64_t k = 0;
  for (; k + KU <= K; k += KU) {
#pragma GCC unroll 4
    for (int u = 0; u < KU; ++u) {
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) {
        // Near the end this points past the panels: an integer, as a prefetch never faults.
        const uintptr_t ahead = reinterpret_cast<uintptr_t>(w.P + p * w.p_stride + 16 * (k + u)) +
                                sizeof(float) * 16 * kAhead;
        _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
      }
      fma_step<MR, NP>(acc[u], A, lda, w, k + u);
    }
  }
  for (; k < K; ++k) {
    fma_step<MR, NP>(acc[0], A, lda, w, k);
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) {
      float* c = w.C + p * w.c_stride + r * w.ldc;
      __m512 s = _mm512_maskz_loadu_ps(mask, c);
#pragma GCC unroll 4
      for (int u = 0; u < KU; ++u) {
        s = _mm512_add_ps(s, acc[u][r][p]);
      }
      _mm512_mask_storeu_ps(c, mask, s);
    }
  }
}

// C_p[0:M, 0:n] += A[0:M, 0:K] B_p for `np` <= 4 panels. Rows stream past the panels in tiles
// (for_each_row_tile), over k in blocks of depth_for(np) rows, whose panels stay in L2 for all of
// them.
FASTSEQ_AVX512 inline void gemm_panels(int64_t M, int64_t K, const float* A, int64_t lda,
                                       const Panels& w, int np) {
  const int64_t depth = depth_for(np);
  for (int64_t k0 = 0; k0 < K; k0 += depth) {
    const int64_t kd = std::min(depth, K - k0);
    Panels block = w;
    block.P = w.k_blocked ? w.P + 16 * k0 * np : w.P + 16 * k0;
    block.p_stride = w.k_blocked ? 16 * kd : w.p_stride;
    for_each_row_tile(M, [&](int64_t m, int64_t rows) {
      Panels tile = block;
      tile.C = w.C + m * w.ldc;
      with_tile_shape(rows, np, [&](auto r, auto p) {
        micro_kernel<decltype(r)::value, decltype(p)::value>(kd, A + m * lda + k0, lda, tile);
      });
    });
  }
}

// C[0:M, cols of panels v0..v1) += A (M x K) B, B (K x N) packed into 16-column panels of K rows
// (lstm::pack_column_panels), C with row stride ldc. Four full panels per pass; a ragged last
// panel (its own mask) alone.
FASTSEQ_AVX512 inline void gemm_column_panels(int64_t M, int64_t K, const float* A, int64_t lda,
                                              const float* packed, float* C, int64_t ldc,
                                              int64_t N, int64_t v0, int64_t v1) {
  constexpr int64_t kWidth = 16;
  for_each_panel_group(N, v0, v1, [&](int64_t v, int np) {
    const Panels panels{packed + v * K * kWidth, K * kWidth, C + v * kWidth, kWidth, ldc,
                        std::min(kWidth, N - v * kWidth)};
    gemm_panels(M, K, A, lda, panels, np);
  });
}

#undef FASTSEQ_AVX512

}  // namespace fastseq::cpu::avx512
#endif
