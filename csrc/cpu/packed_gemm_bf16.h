// The LSTM's recurrent GEMM in bfloat16 on AVX-512 BF16: C_p += A B_p for up to four packed
// 16-column panels B_p at once, sums in float32.
//
// VDPBF16PS multiplies pairs of bfloat16 and adds both products to a float32 lane, so a panel
// stores its K rows two at a time: pair row kp holds (B[2 kp, c], B[2 kp + 1, c]) for the 16
// columns c, 32 bfloat16 in one zmm, with zeros past K and past the panel's n real columns. A row
// of A gives the matching pair as one broadcast 32-bit lane; at an odd K the last pair is
// (A[K-1], 0), never a read past the row. That is twice the products per instruction of float32
// FMA on half the bytes of weights. C (bfloat16) is read once, added to in float32 and rounded
// once per call, as a bfloat16 GEMM with float32 accumulation rounds its output.
//
// The loop structure is csrc/cpu/packed_gemm_avx512.h's (rows in tiles of at most 6,
// accumulators split over k where a tile has few), without its blocks over k.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>

#include "register_tiles.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTSEQ_PACKED_GEMM_BF16 1
#include <immintrin.h>

namespace fastseq::cpu::avx512_bf16 {

#define FASTSEQ_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))

using bf16 = c10::BFloat16;

// bfloat16 per pair row of a panel: 16 columns of 2.
constexpr int64_t kPairRow = 32;

inline int64_t pair_rows(int64_t K) {
  return (K + 1) / 2;
}

// Panel p at P + p * p_stride (bfloat16), K rows as pair_rows(K) pair rows; its C block at
// C + p * c_stride (row stride ldc), of which the first n columns are written.
struct Panels {
  const bf16* P;
  int64_t p_stride;
  bf16* C;
  int64_t c_stride;
  int64_t ldc;
  int64_t n;
};

// Packs one panel: element (k, c) of the B operand is src[k * k_stride + c * c_stride], for
// k < K and c < n; zero elsewhere. dst holds pair_rows(K) * kPairRow bfloat16.
inline void pack_panel(const bf16* src, int64_t k_stride, int64_t c_stride, int64_t K, int64_t n,
                       bf16* dst) {
  const int64_t KP = pair_rows(K);
  std::fill_n(dst, KP * kPairRow, bf16(0.0f));
  for (int64_t c = 0; c < n; ++c) {
    for (int64_t k = 0; k < K; ++k) {
      dst[(k / 2) * kPairRow + 2 * c + (k % 2)] = src[k * k_stride + c * c_stride];
    }
  }
}

// The pair (a[0], a[1]) as a 32-bit lane, or (a[0], 0) when only one is there.
FASTSEQ_BF16 inline __m512bh broadcast_pair(const bf16* a, bool whole) {
  uint32_t bits = 0;
  std::memcpy(&bits, a, whole ? 4 : 2);
  return (__m512bh)_mm512_set1_epi32(static_cast<int>(bits));
}

// acc[r][p] += A[r, 2 kp : 2 kp + 2] . B_p[pair row kp] for one pair row.
template <int MR, int NP>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma"), always_inline)) inline void
dot_step(__m512 (&acc)[MR][NP], const bf16* A, int64_t lda, const Panels& w, int64_t kp,
         bool whole) {
  __m512bh b[NP];
#pragma GCC unroll 4
  for (int p = 0; p < NP; ++p) {
    b[p] = (__m512bh)_mm512_loadu_si512(w.P + p * w.p_stride + kPairRow * kp);
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const __m512bh a = broadcast_pair(A + r * lda + 2 * kp, whole);
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) {
      acc[r][p] = _mm512_dpbf16_ps(acc[r][p], a, b[p]);
    }
  }
}

// C_p[0:MR, 0:n] += A[0:MR, 0:K] B_p[0:K, 0:16] for p < NP.
template <int MR, int NP>
FASTSEQ_BF16 void micro_kernel(int64_t K, const bf16* A, int64_t lda, const Panels& w) {
  constexpr int kTiles = MR * NP;
  constexpr int KU = std::min(4, (12 + kTiles - 1) / kTiles);
  const __mmask16 mask = static_cast<__mmask16>((1u << w.n) - 1u);
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
  const int64_t whole_pairs = K / 2;
  int64_t kp = 0;
  for (; kp + KU <= whole_pairs; kp += KU) {
#pragma GCC unroll 4
    for (int u = 0; u < KU; ++u) {
      dot_step<MR, NP>(acc[u], A, lda, w, kp + u, true);
    }
  }
  for (; kp < whole_pairs; ++kp) {
    dot_step<MR, NP>(acc[0], A, lda, w, kp, true);
  }
  if (K % 2 != 0) {
    dot_step<MR, NP>(acc[0], A, lda, w, whole_pairs, false);
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) {
      bf16* c = w.C + p * w.c_stride + r * w.ldc;
      const __m256i old = _mm256_maskz_loadu_epi16(mask, c);
      __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(old), 16));
#pragma GCC unroll 4
      for (int u = 0; u < KU; ++u) {
        s = _mm512_add_ps(s, acc[u][r][p]);
      }
      _mm256_mask_storeu_epi16(c, mask, (__m256i)_mm512_cvtneps_pbh(s));
    }
  }
}

// C_p[0:M, 0:n] += A[0:M, 0:K] B_p for `np` <= 4 panels, rows in tiles (for_each_row_tile).
// Each tile runs over the whole of K, so that C is rounded to bfloat16 once: at the
// batch sizes where the recurrence is the bottleneck there are one to three tiles, and the
// panels (32 KiB each per 1024 rows of k) come from L2 after the first.
FASTSEQ_BF16 inline void gemm_panels(int64_t M, int64_t K, const bf16* A, int64_t lda,
                                     const Panels& w, int np) {
  for_each_row_tile(M, [&](int64_t m, int64_t rows) {
    Panels tile = w;
    tile.C = w.C + m * w.ldc;
    with_tile_shape(rows, np, [&](auto r, auto p) {
      micro_kernel<decltype(r)::value, decltype(p)::value>(K, A + m * lda, lda, tile);
    });
  });
}

// C[0:M, cols of panels v0..v1) += A (M x K) B, B (K x N) packed panel by panel with pack_panel
// (pair_rows(K) * kPairRow apart), C with row stride ldc. Four full panels per pass; a ragged last
// panel (its own mask) alone.
FASTSEQ_BF16 inline void gemm_column_panels(int64_t M, int64_t K, const bf16* A, int64_t lda,
                                            const bf16* packed, bf16* C, int64_t ldc, int64_t N,
                                            int64_t v0, int64_t v1) {
  constexpr int64_t kWidth = 16;
  const int64_t panel = pair_rows(K) * kPairRow;
  for_each_panel_group(N, v0, v1, [&](int64_t v, int np) {
    const Panels panels{packed + v * panel, panel, C + v * kWidth, kWidth, ldc,
                        std::min(kWidth, N - v * kWidth)};
    gemm_panels(M, K, A, lda, panels, np);
  });
}

#undef FASTSEQ_BF16

}  // namespace fastseq::cpu::avx512_bf16
#endif
