// One LSTM layer (one direction) on CPU: `fastseq::lstm_layer_forward` and `_backward`.
//
// Forward: the input projection of every step is one GEMM, written straight into the (T, B, 4H)
// gates buffer with the bias folded in. Each step then adds h_{t-1} W_hh^T into its slice and
// runs a fused pointwise cell that turns the pre-activations into activations in place and writes
// c_t and m_t = o * tanh(c_t) (the step's output y_t, or with a projection the input of one more
// GEMM, y_t = m_t W_hr^T).
//
// Backward: through time in reverse processing order, a fused pointwise cell per step turns
// (dm, dc) into d pre (kept for all steps) and dc_{t-1}, and one GEMM gives dh_{t-1} = d pre W_hh.
// Whatever does not feed the recurrence (grad_x and the weight gradients) waits for the end,
// where it is a few large GEMMs over all steps at once, each left out when not asked for.
//
// The recurrent GEMMs are small (B rows) and run T times against the same weights, which a BLAS
// call would repack every time. For float32 on AVX2 they use W_hh packed once per call into
// 16-column panels and a register-tiled kernel (on AVX-512 one that takes four panels per pass,
// csrc/cpu/packed_gemm_avx512.h), and so does bfloat16 on AVX-512 BF16 with pairs of k per
// panel row (csrc/cpu/packed_gemm_bf16.h); in the forward the panels of the four gates of a block
// of 16 hidden units are adjacent, so one task computes that block's pre-activations and runs its
// cell while they are in L1, and a step is one parallel region. Other dtypes and CPUs, and work
// too small to repay the packing, take the same plan through ATen GEMMs. The whole-sequence
// GEMMs go through csrc/cpu/linear.h: unpacked AVX-512 kernels for small products (an LSTMCell
// step), oneDNN for the rest where torch carries it.
//
// The pointwise math is csrc/cpu/lstm_cell_simd.h compiled under function-level target
// attributes, 16 lanes for AVX-512 and 8 for AVX2: the extension is built for the baseline ISA,
// where at::vec::Vectorized falls back to one std::exp call per element, which would cost more
// than the GEMMs at small batch. The vector code runs at the level ATen reports, so
// ATEN_CPU_CAPABILITY=avx2 or =default selects the narrower or the portable path (for testing).
//
// Padding (`lengths`): step t is padding for sequence b when t >= lengths[b]; there the state is
// carried unchanged and y is zero, and in the backward d pre is zero while dh and dc pass through.
// The reverse direction walks t = T-1 .. 0, so each sequence starts at its own last valid step,
// where the state before it is h0 although the previous step's y (padding) is zero: h0 W_hh^T is
// added to that step's pre-activations up front, and the recurrence can always read h_{t-1}
// from y.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include "lstm_common.h"
#include "linear.h"
#include "packed_gemm_avx512.h"
#include "packed_gemm_bf16.h"
#include "lstm_cell_simd.h"
#include "parallel_steps.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTSEQ_LSTM_AVX2 1
#include <immintrin.h>
#endif

namespace fastseq::lstm {
namespace {

using at::Tensor;

constexpr int64_t kFlopsPerCell = 40;  // pointwise cell, per hidden unit (transcendentals)

// ----------------------------------------------------------------------------------------------
// Pointwise cell, scalar: the portable path, the tail of the vector path, and the whole of double.
// A row's four gate blocks i, f, g, o lie `gs` (= H) apart; these cover columns [j, n).

template <typename T>
T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// g: pre-activations in, activations out.
template <typename scalar_t>
void forward_cells_scalar(scalar_t* g, const scalar_t* c_prev, scalar_t* c, scalar_t* m,
                          int64_t gs, int64_t n, int64_t j) {
  using acc_t = at::opmath_type<scalar_t>;
  for (; j < n; ++j) {
    const acc_t i = sigmoid(acc_t(g[j]));
    const acc_t f = sigmoid(acc_t(g[gs + j]));
    const acc_t gg = std::tanh(acc_t(g[2 * gs + j]));
    const acc_t o = sigmoid(acc_t(g[3 * gs + j]));
    const acc_t cn = f * acc_t(c_prev[j]) + i * gg;
    g[j] = i;
    g[gs + j] = f;
    g[2 * gs + j] = gg;
    g[3 * gs + j] = o;
    c[j] = cn;
    m[j] = o * std::tanh(cn);
  }
}

// One row of the backward cell, pointers at the row's first column. dm = dm_in (+ dm_add when
// given); with `consume`, dm_in (the dh carry) is zeroed once read, for the GEMM that follows to
// accumulate into.
template <typename scalar_t>
struct BackwardRow {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* gates;   // activations, gate blocks gs apart
  const scalar_t* c;       // c_t
  const scalar_t* c_prev;  // c_{t-1}
  scalar_t* dm_in;
  const scalar_t* dm_add;  // or null
  bool consume;
  acc_t* dc;               // dc_t in, dc_{t-1} out
  scalar_t* dpre;          // out, gate blocks gs apart
};

template <typename scalar_t>
void backward_cells_scalar(const BackwardRow<scalar_t>& r, int64_t gs, int64_t n, int64_t j) {
  using acc_t = at::opmath_type<scalar_t>;
  for (; j < n; ++j) {
    const acc_t i = r.gates[j], f = r.gates[gs + j], g = r.gates[2 * gs + j];
    const acc_t o = r.gates[3 * gs + j];
    const acc_t tc = std::tanh(acc_t(r.c[j]));
    acc_t dm = r.dm_in[j];
    if (r.dm_add != nullptr) {
      dm += acc_t(r.dm_add[j]);
    }
    if (r.consume) {
      r.dm_in[j] = scalar_t(0);
    }
    const acc_t dc = r.dc[j] + dm * o * (acc_t(1) - tc * tc);
    r.dpre[j] = dc * g * i * (acc_t(1) - i);
    r.dpre[gs + j] = dc * acc_t(r.c_prev[j]) * f * (acc_t(1) - f);
    r.dpre[2 * gs + j] = dc * i * (acc_t(1) - g * g);
    r.dpre[3 * gs + j] = dm * tc * o * (acc_t(1) - o);
    r.dc[j] = dc * f;
  }
}

// ----------------------------------------------------------------------------------------------
// AVX2 + FMA: the packed GEMM; the vector cell's entry points (AVX2 and AVX-512).

#ifdef FASTSEQ_LSTM_AVX2
#define FASTSEQ_AVX2 __attribute__((target("avx2,fma")))

namespace avx2 {

// C[0:MR, 0:16] += A[0:MR, 0:K] * P[0:K, 0:16], P one packed panel (16 floats per k). MR rows
// give 2 MR independent FMA chains; fewer than about 8 cannot hide the FMA latency, so with one
// or two rows k is split over KU accumulator sets.
template <int MR>
FASTSEQ_AVX2 void micro_kernel(int64_t K, const float* A, int64_t lda, const float* P, float* C,
                               int64_t ldc) {
  constexpr int KU = MR == 1 ? 4 : (MR == 2 ? 2 : 1);
  // C is read only after the k loop; in the forward it is the step's slice of the input
  // projection, long out of cache by now. Fetching it meanwhile hides the misses.
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm_prefetch(reinterpret_cast<const char*>(C + r * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(C + r * ldc + 15), _MM_HINT_T0);
  }
  __m256 acc[KU][MR][2];
#pragma GCC unroll 4
  for (int u = 0; u < KU; ++u) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      acc[u][r][0] = acc[u][r][1] = _mm256_setzero_ps();
    }
  }
  int64_t k = 0;
  for (; k + KU <= K; k += KU) {
#pragma GCC unroll 4
    for (int u = 0; u < KU; ++u) {
      const __m256 b0 = _mm256_loadu_ps(P + 16 * (k + u));
      const __m256 b1 = _mm256_loadu_ps(P + 16 * (k + u) + 8);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m256 a = _mm256_broadcast_ss(A + r * lda + k + u);
        acc[u][r][0] = _mm256_fmadd_ps(a, b0, acc[u][r][0]);
        acc[u][r][1] = _mm256_fmadd_ps(a, b1, acc[u][r][1]);
      }
    }
  }
  for (; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(P + 16 * k);
    const __m256 b1 = _mm256_loadu_ps(P + 16 * k + 8);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * lda + k);
      acc[0][r][0] = _mm256_fmadd_ps(a, b0, acc[0][r][0]);
      acc[0][r][1] = _mm256_fmadd_ps(a, b1, acc[0][r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    __m256 s0 = _mm256_loadu_ps(C + r * ldc);
    __m256 s1 = _mm256_loadu_ps(C + r * ldc + 8);
#pragma GCC unroll 4
    for (int u = 0; u < KU; ++u) {
      s0 = _mm256_add_ps(s0, acc[u][r][0]);
      s1 = _mm256_add_ps(s1, acc[u][r][1]);
    }
    _mm256_storeu_ps(C + r * ldc, s0);
    _mm256_storeu_ps(C + r * ldc + 8, s1);
  }
}

FASTSEQ_AVX2 void micro_kernel_rows(int64_t rows, int64_t K, const float* A, int64_t lda,
                                    const float* P, float* C, int64_t ldc) {
  switch (rows) {
    case 6: return micro_kernel<6>(K, A, lda, P, C, ldc);
    case 5: return micro_kernel<5>(K, A, lda, P, C, ldc);
    case 4: return micro_kernel<4>(K, A, lda, P, C, ldc);
    case 3: return micro_kernel<3>(K, A, lda, P, C, ldc);
    case 2: return micro_kernel<2>(K, A, lda, P, C, ldc);
    default: return micro_kernel<1>(K, A, lda, P, C, ldc);
  }
}

// C[0:M, 0:n] += A[0:M, 0:K] * P[0:K, 0:n] for one panel P (K x 16, columns past n zero). The
// rows stream past the panel 6 at a time, over K in blocks of 256 so that the panel's block
// (16 KiB) stays in L1 for all of them.
FASTSEQ_AVX2 void gemm_panel(int64_t M, int64_t K, const float* A, int64_t lda, const float* P,
                             float* C, int64_t ldc, int64_t n) {
  constexpr int64_t kRows = 6;
  constexpr int64_t kDepth = 256;
  for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
    const int64_t depth = std::min(kDepth, K - k0);
    const float* Pk = P + k0 * 16;
    for (int64_t m = 0; m < M; m += kRows) {
      const int64_t rows = std::min(kRows, M - m);
      const float* Am = A + m * lda + k0;
      if (n == 16) {
        micro_kernel_rows(rows, depth, Am, lda, Pk, C + m * ldc, ldc);
        continue;
      }
      // A ragged last panel: through a full-width tile, as C has no room past column n.
      alignas(32) float tile[kRows * 16] = {};
      for (int64_t r = 0; r < rows; ++r) {
        std::memcpy(tile + r * 16, C + (m + r) * ldc, n * sizeof(float));
      }
      micro_kernel_rows(rows, depth, Am, lda, Pk, tile, 16);
      for (int64_t r = 0; r < rows; ++r) {
        std::memcpy(C + (m + r) * ldc, tile + r * 16, n * sizeof(float));
      }
    }
  }
}

}  // namespace avx2


// The vector cell's entry points for one instruction set: csrc/cpu/lstm_cell_simd.h compiled for
// `isa_target`, `width` floats at a time. Each returns the column where it stopped.
#define FASTSEQ_LSTM_CELLS(ns, isa_target, width)                                                \
  namespace ns {                                                                                 \
  template <typename scalar_t>                                                                   \
  __attribute__((target(isa_target))) int64_t forward_cells(                                     \
      scalar_t* g, const scalar_t* c_prev, scalar_t* c, scalar_t* m, int64_t gs, int64_t n) {    \
    return cpu::simd::forward_cells<width>(g, c_prev, c, m, gs, n);                              \
  }                                                                                              \
  template <typename scalar_t>                                                                   \
  __attribute__((target(isa_target))) int64_t backward_cells(const BackwardRow<scalar_t>& r,     \
                                                             int64_t gs, int64_t n) {            \
    return cpu::simd::backward_cells<width>(r, gs, n);                                           \
  }                                                                                              \
  }

FASTSEQ_LSTM_CELLS(avx2_cells, "avx2,fma", 8)
FASTSEQ_LSTM_CELLS(avx512_cells, "avx512f,avx2,fma", 16)
#undef FASTSEQ_LSTM_CELLS
#endif  // FASTSEQ_LSTM_AVX2

template <typename scalar_t>
constexpr bool kVectorCell =
    std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>;

// The row's columns from j on.
template <typename scalar_t>
BackwardRow<scalar_t> columns_from(const BackwardRow<scalar_t>& r, int64_t j) {
  return {r.gates + j, r.c + j, r.c_prev + j, r.dm_in + j,
          r.dm_add == nullptr ? nullptr : r.dm_add + j, r.consume, r.dc + j, r.dpre + j};
}

// 16 columns at a time where the CPU has AVX-512, then 8 with AVX2, then one.
template <typename scalar_t>
void forward_cells(scalar_t* g, const scalar_t* c_prev, scalar_t* c, scalar_t* m, int64_t gs,
                   int64_t n) {
  int64_t j = 0;
#ifdef FASTSEQ_LSTM_AVX2
  if constexpr (kVectorCell<scalar_t>) {
    if (cpu_has_avx512()) {
      j = avx512_cells::forward_cells(g, c_prev, c, m, gs, n);
    }
    if (cpu_has_avx2()) {
      j += avx2_cells::forward_cells(g + j, c_prev + j, c + j, m + j, gs, n - j);
    }
  }
#endif
  forward_cells_scalar(g, c_prev, c, m, gs, n, j);
}

template <typename scalar_t>
void backward_cells(const BackwardRow<scalar_t>& r, int64_t gs, int64_t n) {
  int64_t j = 0;
#ifdef FASTSEQ_LSTM_AVX2
  if constexpr (kVectorCell<scalar_t>) {
    if (cpu_has_avx512()) {
      j = avx512_cells::backward_cells(r, gs, n);
    }
    if (cpu_has_avx2()) {
      j += avx2_cells::backward_cells(columns_from(r, j), gs, n - j);
    }
  }
#endif
  backward_cells_scalar(r, gs, n, j);
}

// ----------------------------------------------------------------------------------------------
// The cell over a block of rows and hidden units of one step, padding included.

// gates (B, 4H): pre-activations in, activations out; c_prev, c, m: (B, H). Padding rows carry
// c_prev over and get m = 0, so that y (or its projection) is zero there.
template <typename scalar_t>
struct ForwardStep {
  scalar_t* gates;
  const scalar_t* c_prev;
  scalar_t* c;
  scalar_t* m;
  const int64_t* lengths;
  int64_t t, H;
};

template <typename scalar_t>
void forward_rows(const ForwardStep<scalar_t>& s, int64_t b0, int64_t b1, int64_t j0,
                  int64_t j1) {
  const int64_t H = s.H;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t o = b * H + j0;
    if (is_active(s.lengths, b, s.t)) {
      forward_cells(s.gates + b * 4 * H + j0, s.c_prev + o, s.c + o, s.m + o, H, j1 - j0);
    } else {
      std::copy(s.c_prev + o, s.c_prev + o + (j1 - j0), s.c + o);
      std::fill_n(s.m + o, j1 - j0, scalar_t(0));
    }
  }
}

// dpre (B, 4H) is zero on padding rows, where dc and dm_in (the dh carry) pass through.
template <typename scalar_t>
struct BackwardStep {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* gates;
  const scalar_t* c;
  const scalar_t* c_prev;
  scalar_t* dm_in;         // (B, H)
  const scalar_t* dm_add;  // (B, H) or null
  bool consume;
  acc_t* dc;               // (B, H)
  scalar_t* dpre;          // (B, 4H)
  const int64_t* lengths;
  int64_t t, H;
};

template <typename scalar_t>
void backward_rows(const BackwardStep<scalar_t>& s, int64_t b0, int64_t b1, int64_t j0,
                   int64_t j1) {
  const int64_t H = s.H;
  for (int64_t b = b0; b < b1; ++b) {
    scalar_t* dpre = s.dpre + b * 4 * H + j0;
    if (!is_active(s.lengths, b, s.t)) {
      for (int64_t q = 0; q < 4; ++q) {
        std::fill_n(dpre + q * H, j1 - j0, scalar_t(0));
      }
      continue;
    }
    const int64_t o = b * H + j0;
    const BackwardRow<scalar_t> row{s.gates + b * 4 * H + j0, s.c + o, s.c_prev + o,
                                    s.dm_in + o, s.dm_add == nullptr ? nullptr : s.dm_add + o,
                                    s.consume, s.dc + o, dpre};
    backward_cells(row, H, j1 - j0);
  }
}

// Cell over all of a step, parallel over rows (the ATen path).
template <typename scalar_t>
void forward_cell_step(const ForwardStep<scalar_t>& s, int64_t B) {
  at::parallel_for(0, B, grain_for(s.H * kFlopsPerCell), [&](int64_t b0, int64_t b1) {
    forward_rows(s, b0, b1, 0, s.H);
  });
}

template <typename scalar_t>
void backward_cell_step(const BackwardStep<scalar_t>& s, int64_t B) {
  at::parallel_for(0, B, grain_for(s.H * kFlopsPerCell), [&](int64_t b0, int64_t b1) {
    backward_rows(s, b0, b1, 0, s.H);
  });
}

// ----------------------------------------------------------------------------------------------
// W_hh packed for the recurrent GEMMs: 16-column panels, 16 floats per k (float32, AVX2) or 16
// pairs of bfloat16 per pair of k (bfloat16, AVX-512 BF16: csrc/cpu/packed_gemm_bf16.h). x86-64
// only, as the kernels that read them.

#ifdef FASTSEQ_LSTM_AVX2

// Forward, B operand W_hh^T (P x 4H): panel (u, q) holds columns q H + [16 u, 16 u + 16), gate q
// of units block u, so one block's four gates are adjacent: (ceil(H/16), 4 P 16) floats. With
// `k_blocked` (AVX-512) the four panels of a block are interleaved every depth_for(4) rows
// (Panels::k_blocked), so that the step reads a block's weights as one stream.
Tensor pack_gate_panels(const Tensor& w_hh, int64_t H, int64_t P, bool k_blocked) {
  const int64_t kDepth = k_blocked ? cpu::avx512::depth_for(4) : std::max<int64_t>(P, 1);
  const int64_t NB = panel_count(H);
  Tensor packed = at::empty({NB, 4 * P * kPanel}, w_hh.options());
  float* dst = packed.data_ptr<float>();
  const float* src = w_hh.const_data_ptr<float>();
  at::parallel_for(0, NB, pack_grain(4 * P), [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t n = std::min(kPanel, H - u * kPanel);
      for (int64_t k0 = 0; k0 < P; k0 += kDepth) {
        const int64_t kd = std::min(kDepth, P - k0);
        for (int64_t q = 0; q < 4; ++q) {
          float* panel = dst + u * 4 * P * kPanel + (4 * k0 + q * kd) * kPanel;
          const float* rows = src + (q * H + u * kPanel) * P + k0;
          int64_t k = 0;
          if (cpu_has_avx512()) {
            for (; k + kPanel <= kd; k += kPanel) {
              cpu::avx512::transpose_16x16(rows + k, P, n, panel + k * kPanel);
            }
          }
          // Row-major over the destination; the 16 source rows are read in step.
          for (; k < kd; ++k) {
            for (int64_t col = 0; col < kPanel; ++col) {
              panel[k * kPanel + col] = col < n ? rows[col * P + k] : 0.0f;
            }
          }
        }
      }
    }
  });
  return packed;
}

// The bfloat16 B operand for the forward, in the gate order of pack_gate_panels (no blocks
// over k): panel (u, q) at (u * 4 + q) pair_rows(P) 32.
Tensor pack_gate_panels_bf16(const Tensor& w_hh, int64_t H, int64_t P) {
  namespace bf = cpu::avx512_bf16;
  const int64_t NB = panel_count(H), panel = bf::pair_rows(P) * bf::kPairRow;
  Tensor packed = at::empty({NB, 4 * panel}, w_hh.options());
  auto* dst = packed.data_ptr<at::BFloat16>();
  const auto* src = w_hh.const_data_ptr<at::BFloat16>();
  at::parallel_for(0, NB, pack_grain(2 * P), [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      for (int64_t q = 0; q < 4; ++q) {
        bf::pack_panel(src + (q * H + u * kPanel) * P, 1, P, P, std::min(kPanel, H - u * kPanel),
                       dst + (u * 4 + q) * panel);
      }
    }
  });
  return packed;
}

// The bfloat16 B operand of dh += dpre W_hh: W_hh (4H x P) as panels of 16 columns.
Tensor pack_column_panels_bf16(const Tensor& w_hh, int64_t K, int64_t N) {
  namespace bf = cpu::avx512_bf16;
  const int64_t NP = panel_count(N), panel = bf::pair_rows(K) * bf::kPairRow;
  Tensor packed = at::empty({NP, panel}, w_hh.options());
  auto* dst = packed.data_ptr<at::BFloat16>();
  const auto* src = w_hh.const_data_ptr<at::BFloat16>();
  at::parallel_for(0, NP, pack_grain(K / 2), [&](int64_t v0, int64_t v1) {
    for (int64_t v = v0; v < v1; ++v) {
      bf::pack_panel(src + v * kPanel, N, 1, K, std::min(kPanel, N - v * kPanel),
                     dst + v * panel);
    }
  });
  return packed;
}

#endif  // FASTSEQ_LSTM_AVX2

// Whether the recurrent GEMMs run on packed W_hh: float32 on AVX2 and bfloat16 on AVX-512 BF16
// (ATen GEMMs otherwise). Packing reads and writes W_hh once more, which pays back only when the
// packed copy is read again: over several steps of a few rows. A single step (an LSTMCell call, a
// decoding step) reads W_hh once whatever its batch, so packing it is pure cost there.
// bfloat16 takes the same threshold.
template <typename scalar_t>
bool use_packed(const Sizes& s) {
#ifdef FASTSEQ_LSTM_AVX2
  const bool isa = (std::is_same_v<scalar_t, float> && cpu_has_avx2()) ||
                   (std::is_same_v<scalar_t, at::BFloat16> && cpu_has_avx512_bf16());
  return isa && s.T > 1 && s.T * s.B >= kMinRowsToPack;
#else
  return false;
#endif
}

// W_hh packed for the forward's GEMM, or undefined where the ATen GEMMs run.
template <typename scalar_t>
Tensor pack_forward_weights(const Tensor& w_hh, const Sizes& s) {
#ifdef FASTSEQ_LSTM_AVX2
  if (use_packed<scalar_t>(s)) {
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      return pack_gate_panels_bf16(w_hh, s.H, s.P);
    } else if constexpr (std::is_same_v<scalar_t, float>) {
      return pack_gate_panels(w_hh, s.H, s.P, cpu_has_avx512());
    }
  }
#endif
  return Tensor();
}

// W_hh packed for the backward's dh GEMM, or undefined where the ATen GEMMs run.
template <typename scalar_t>
Tensor pack_backward_weights(const Tensor& w_hh, const Sizes& s) {
#ifdef FASTSEQ_LSTM_AVX2
  if (use_packed<scalar_t>(s)) {
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      return pack_column_panels_bf16(w_hh, 4 * s.H, s.P);
    } else if constexpr (std::is_same_v<scalar_t, float>) {
      return pack_column_panels(w_hh, 4 * s.H, s.P);
    }
  }
#endif
  return Tensor();
}

// dh[:, cols of panels v0..v1) += dpre (B x 4H) W_hh, W_hh from pack_backward_weights.
void packed_grad_h(const float* dpre, const float* packed, float* dh, int64_t B, int64_t K,
                   int64_t P, int64_t v0, int64_t v1) {
#ifdef FASTSEQ_LSTM_AVX2
  if (cpu_has_avx512()) {
    return cpu::avx512::gemm_column_panels(B, K, dpre, K, packed, dh, P, P, v0, v1);
  }
  for (int64_t v = v0; v < v1; ++v) {
    avx2::gemm_panel(B, K, dpre, K, packed + v * K * kPanel, dh + v * kPanel, P,
                     std::min(kPanel, P - v * kPanel));
  }
#endif
}

void packed_grad_h(const at::BFloat16* dpre, const at::BFloat16* packed, at::BFloat16* dh,
                   int64_t B, int64_t K, int64_t P, int64_t v0, int64_t v1) {
#ifdef FASTSEQ_LSTM_AVX2
  TORCH_INTERNAL_ASSERT_DEBUG_ONLY(cpu_has_avx512_bf16());
  cpu::avx512_bf16::gemm_column_panels(B, K, dpre, K, packed, dh, P, P, v0, v1);
#endif
}

// ----------------------------------------------------------------------------------------------
// Argument checks.

// Shapes common to forward and backward, checked against x, the weights and the initial state.
Sizes check_layer(const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
                  const Tensor& w_hh, const std::optional<Tensor>& w_hr) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
              "lstm_layer: x must be float32, float64 or bfloat16, got ", dtype);
  TORCH_CHECK(!w_hr.has_value() || w_hr->dim() == 2, "lstm_layer: w_hr must be (P, H), got ",
              w_hr->sizes());
  const Sizes s = check_layer_tensors("lstm_layer", x, h0, c0, w_ih, w_hh,
                                      w_hr.has_value() ? w_hr->size(0) : 0);
  if (w_hr.has_value()) {
    check_tensor("lstm_layer", *w_hr, "w_hr", {s.P, s.H}, dtype);
  }
  return s;
}

// ----------------------------------------------------------------------------------------------
// Forward.

// A reverse sequence shorter than T starts at step lengths[b] - 1 from h0, but the recurrence
// reads the previous step's y there, which is padding (zero): add h0 W_hh^T to that step's
// pre-activations instead.
template <typename scalar_t>
void add_reverse_start_state(const Sizes& s, const Tensor& gates, const Tensor& h0,
                             const Tensor& w_hh, const int64_t* lengths) {
  const bool any = std::any_of(lengths, lengths + s.B, [&](int64_t l) { return l > 0 && l < s.T; });
  if (!any) {
    return;
  }
  const Tensor start = at::mm(h0, w_hh.t());
  const scalar_t* src = start.const_data_ptr<scalar_t>();
  scalar_t* dst = gates.data_ptr<scalar_t>();
  for (int64_t b = 0; b < s.B; ++b) {
    if (lengths[b] > 0 && lengths[b] < s.T) {
      scalar_t* row = dst + ((lengths[b] - 1) * s.B + b) * 4 * s.H;
      for (int64_t j = 0; j < 4 * s.H; ++j) {
        row[j] += src[b * 4 * s.H + j];
      }
    }
  }
}

// h_n: the output of each sequence's last processed valid step, or h0 for empty sequences.
template <typename scalar_t>
Tensor final_hidden(const Sizes& s, const Tensor& y, const Tensor& h0, const int64_t* lengths,
                    bool reverse) {
  if (lengths == nullptr) {
    return s.T == 0 ? h0.clone() : y.select(0, reverse ? 0 : s.T - 1).clone();
  }
  Tensor h_n = at::empty_like(h0);
  for (int64_t b = 0; b < s.B; ++b) {
    const scalar_t* src = lengths[b] == 0
                              ? h0.const_data_ptr<scalar_t>() + b * s.P
                              : y.const_data_ptr<scalar_t>() +
                                    ((reverse ? 0 : lengths[b] - 1) * s.B + b) * s.P;
    std::memcpy(h_n.data_ptr<scalar_t>() + b * s.P, src, s.P * sizeof(scalar_t));
  }
  return h_n;
}

// Unit block u of one step on packed weights: the four gates' pre-activations of units
// [16 u, 16 u + 16) for all rows, then their cell while they are hot.
void forward_block(const ForwardStep<at::BFloat16>& cell, const at::BFloat16* h_prev,
                   const at::BFloat16* w, int64_t B, int64_t P, int64_t u) {
#ifdef FASTSEQ_LSTM_AVX2
  TORCH_INTERNAL_ASSERT_DEBUG_ONLY(cpu_has_avx512_bf16());
  namespace bf = cpu::avx512_bf16;
  const int64_t H = cell.H, panel = bf::pair_rows(P) * bf::kPairRow;
  const int64_t j0 = u * kPanel, n = std::min(kPanel, H - j0);
  const bf::Panels gates{w + u * 4 * panel, panel, cell.gates + j0, H, 4 * H, n};
  bf::gemm_panels(B, P, h_prev, P, gates, 4);
  forward_rows(cell, 0, B, j0, j0 + n);
#endif
}

void forward_block(const ForwardStep<float>& cell, const float* h_prev, const float* w, int64_t B,
                   int64_t P, int64_t u) {
#ifdef FASTSEQ_LSTM_AVX2
  const int64_t H = cell.H;
  const int64_t j0 = u * kPanel, n = std::min(kPanel, H - j0);
  if (cpu_has_avx512()) {
    const cpu::avx512::Panels gates{w + u * 4 * P * kPanel, P * kPanel, cell.gates + j0, H, 4 * H,
                                    n, /*k_blocked=*/true};
    cpu::avx512::gemm_panels(B, P, h_prev, P, gates, 4);
  } else {
    for (int64_t q = 0; q < 4; ++q) {
      avx2::gemm_panel(B, P, h_prev, P, w + (u * 4 + q) * P * kPanel, cell.gates + q * H + j0,
                       4 * H, n);
    }
  }
  forward_rows(cell, 0, B, j0, j0 + n);
#endif
}

int64_t forward_block_grain(int64_t B, int64_t P) {
  return grain_for(B * kPanel * (8 * P + kFlopsPerCell));
}

template <typename scalar_t>
void forward_step_packed(const ForwardStep<scalar_t>& cell, const scalar_t* h_prev,
                         const Tensor& packed, int64_t B, int64_t P) {
  const scalar_t* w = packed.const_data_ptr<scalar_t>();
  at::parallel_for(0, panel_count(cell.H), forward_block_grain(B, P), [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      forward_block(cell, h_prev, w, B, P, u);
    }
  });
}

// The pre-activations of processing steps [k0, k1): gates of time t at gates + (t - t0) B 4H.
template <typename scalar_t>
struct StepChunk {
  int64_t k0, k1;
  Tensor gates;  // (k1 - k0, B, 4H)
  int64_t t0;    // the chunk's first time index
};

// Steps [k0, k1) without a projection on packed weights, in one parallel region: a thread keeps
// its unit blocks for every step. y_t is h_t; c alternates between two buffers unless every step
// is saved.
template <typename scalar_t>
void forward_loop_packed(const Sizes& s, const StepChunk<scalar_t>& chunk, const scalar_t* h0,
                         const scalar_t* c0, scalar_t* cells, scalar_t* y, const Tensor& packed,
                         const int64_t* lengths, bool reverse, bool save) {
  const scalar_t* w = packed.const_data_ptr<scalar_t>();
  scalar_t* gates = chunk.gates.template data_ptr<scalar_t>();
  auto time = [&](int64_t k) { return reverse ? s.T - 1 - k : k; };
  auto cell_slot = [&](int64_t k) { return cells + (save ? time(k) : k % 2) * s.B * s.H; };
  cpu::parallel_steps(chunk.k1 - chunk.k0, panel_count(s.H), forward_block_grain(s.B, s.P),
                      [&](int64_t i, int64_t u0, int64_t u1) {
    const int64_t k = chunk.k0 + i;
    const int64_t t = time(k);
    const scalar_t* h_prev = k == 0 ? h0 : y + time(k - 1) * s.B * s.P;
    const ForwardStep<scalar_t> cell{gates + (t - chunk.t0) * s.B * 4 * s.H,
                                  k == 0 ? c0 : cell_slot(k - 1), cell_slot(k),
                                  y + t * s.B * s.P, lengths, t, s.H};
    for (int64_t u = u0; u < u1; ++u) {
      forward_block(cell, h_prev, w, s.B, s.P, u);
    }
  });
}

// Whether scalar_t has packed kernels (where the CPU has them too: use_packed).
template <typename scalar_t>
constexpr bool has_packed_kernels() {
  return std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16>;
}

// One step: gates_t += h_prev W_hh^T, then the cell; on packed weights when given.
template <typename scalar_t>
void forward_step(const ForwardStep<scalar_t>& cell, const Tensor& g_t, const Tensor& h_prev,
                  const Tensor& w_hh, const Tensor& w_packed) {
  const int64_t B = h_prev.size(0);
  if constexpr (has_packed_kernels<scalar_t>()) {
    if (w_packed.defined()) {
      return forward_step_packed(cell, h_prev.const_data_ptr<scalar_t>(), w_packed, B,
                                 h_prev.size(1));
    }
  }
  cpu::linear_into(g_t, h_prev, w_hh, /*accumulate=*/true);
  forward_cell_step(cell, B);
}

// Processing steps per input-projection chunk. Saving for the backward needs every step's
// gates, so it takes them all at once; inference keeps none, so it projects a chunk of steps at a
// time into a buffer of about 4 MiB: its memory stays small however long the sequence (and a
// buffer under glibc's mmap threshold is reused, where a fresh one of 32 MiB or more would be
// page-faulted in on every call). A reverse pass with lengths adds h0 W_hh^T at scattered steps
// and takes all of them at once too.
int64_t steps_per_chunk(const Sizes& s, size_t element_size, bool save, bool reverse,
                        const int64_t* lengths) {
  if (save || (reverse && lengths != nullptr)) {
    return std::max<int64_t>(s.T, 1);
  }
  const int64_t step_bytes = std::max<int64_t>(s.B * 4 * s.H * element_size, 1);
  return std::max<int64_t>(1, (int64_t(4) << 20) / step_bytes);
}

// Steps [k0, k1) with their pre-activations (each step turns its slice into activations in place).
template <typename scalar_t>
StepChunk<scalar_t> project_chunk(const Sizes& s, const Tensor& x, const Tensor& w_ih,
                                  const std::optional<Tensor>& bias, bool reverse, int64_t k0,
                                  int64_t k1) {
  const int64_t t0 = reverse ? s.T - k1 : k0;
  const Tensor x_chunk = x.narrow(0, t0, k1 - k0).view({(k1 - k0) * s.B, s.I});
  return {k0, k1, cpu::linear(x_chunk, w_ih, bias).view({k1 - k0, s.B, 4 * s.H}), t0};
}

template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> forward_impl(
    const Sizes& s, const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
    const Tensor& w_hh, const std::optional<Tensor>& bias, const std::optional<Tensor>& w_hr,
    const int64_t* lengths, bool reverse, bool save) {
  const auto opts = x.options();
  const bool proj = w_hr.has_value();
  Tensor y = at::empty({s.T, s.B, s.P}, opts);
  // Without saving, c alternates between two buffers and m (projection input) reuses one.
  Tensor cells = at::empty({save ? s.T : 2, s.B, s.H}, opts);
  Tensor hidden = proj ? at::empty({save ? s.T : 1, s.B, s.H}, opts) : at::empty({0}, opts);
  const Tensor w_packed = pack_forward_weights<scalar_t>(w_hh, s);
  Tensor h_prev = h0;
  Tensor c_prev = c0;
  Tensor gates;  // with save: every step's
  const int64_t chunk_steps = steps_per_chunk(s, x.element_size(), save, reverse, lengths);
  for (int64_t k0 = 0; k0 < s.T; k0 += chunk_steps) {
    const auto chunk =
        project_chunk<scalar_t>(s, x, w_ih, bias, reverse, k0, std::min(s.T, k0 + chunk_steps));
    gates = chunk.gates;
    if (reverse && lengths != nullptr) {
      add_reverse_start_state<scalar_t>(s, gates, h0, w_hh, lengths);  // the one chunk
    }
    if constexpr (has_packed_kernels<scalar_t>()) {
      if (!proj && w_packed.defined()) {
        forward_loop_packed(s, chunk, h0.const_data_ptr<scalar_t>(),
                            c0.const_data_ptr<scalar_t>(), cells.data_ptr<scalar_t>(),
                            y.data_ptr<scalar_t>(), w_packed, lengths, reverse, save);
        continue;
      }
    }
    for (int64_t k = chunk.k0; k < chunk.k1; ++k) {
      const int64_t t = reverse ? s.T - 1 - k : k;
      const Tensor g_t = gates.select(0, t - chunk.t0);
      const Tensor c_t = cells.select(0, save ? t : k % 2);
      Tensor y_t = y.select(0, t);
      const Tensor m_t = proj ? hidden.select(0, save ? t : 0) : y_t;
      const ForwardStep<scalar_t> cell{g_t.data_ptr<scalar_t>(),
                                       c_prev.const_data_ptr<scalar_t>(), c_t.data_ptr<scalar_t>(),
                                       m_t.data_ptr<scalar_t>(), lengths, t, s.H};
      forward_step(cell, g_t, h_prev, w_hh, w_packed);
      if (proj) {
        cpu::linear_into(y_t, m_t, *w_hr);
      }
      h_prev = y_t;
      c_prev = c_t;
    }
  }
  if (s.T > 0) {  // c of the last processed step
    c_prev = cells.select(0, save ? (reverse ? 0 : s.T - 1) : (s.T - 1) % 2);
  }
  Tensor h_n = final_hidden<scalar_t>(s, y, h0, lengths, reverse);
  Tensor c_n = c_prev.clone();
  if (!save) {
    return {y, h_n, c_n, at::empty({0}, opts), at::empty({0}, opts), at::empty({0}, opts)};
  }
  if (!gates.defined()) {  // T = 0
    gates = at::empty({0, s.B, 4 * s.H}, opts);
  }
  return {y, h_n, c_n, gates, cells, hidden};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_forward(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& bias, const std::optional<Tensor>& w_hr,
    const std::optional<Tensor>& lengths, bool reverse, bool save_for_backward) {
  // The GEMMs inside are implementation detail: keep autograd (and its per-call cost) out of
  // them however the op is called.
  at::AutoDispatchBelowADInplaceOrView guard;
  const Sizes s = check_layer(x, h0, c0, w_ih, w_hh, w_hr);
  if (bias.has_value()) {
    check_tensor("lstm_layer", *bias, "bias", {4 * s.H}, x.scalar_type());
  }
  const int64_t* len = check_lengths("lstm_layer", lengths, s);
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "lstm_layer_forward", [&] {
    out = forward_impl<scalar_t>(s, x, h0, c0, w_ih, w_hh, bias, w_hr, len, reverse,
                                 save_for_backward);
  });
  return out;
}

// ----------------------------------------------------------------------------------------------
// Backward.

// The operand of the weight gradients, transposed: columns (t, b) of [x_t | h_prev]^T (I + P
// rows), which times d pre gives [grad_w_ih | grad_w_hh]; its rows run along (t, b), as d pre's
// columns do, the layout oneDNN's matmul takes without a reorder (backward_impl picks the
// product). No ones row for grad_bias: an odd row count costs the GEMM more than a column sum of
// d pre takes. h_prev is the
// previous processed step's y, or h0 at each sequence's first processed step; on padding rows
// (d pre = 0) any finite value does. `by_rows` gives it untransposed instead, (T B, I + P): the
// small products' layout (cpu::linear's broadcast form reads a column block of it in place).
template <typename scalar_t>
Tensor weight_grad_operand(const Sizes& s, const Tensor& x, const Tensor& y, const Tensor& h0,
                           const int64_t* lengths, bool reverse, bool by_rows) {
  const int64_t width = s.I + s.P;
  const int64_t cols = s.T * s.B;
  Tensor out = by_rows ? at::empty({cols, width}, x.options())
                       : at::empty({width, cols}, x.options());
  scalar_t* dst = out.data_ptr<scalar_t>();
  const scalar_t* xs = x.const_data_ptr<scalar_t>();
  const scalar_t* ys = y.const_data_ptr<scalar_t>();
  const scalar_t* h0s = h0.const_data_ptr<scalar_t>();
  at::parallel_for(0, s.T, grain_for(s.B * width), [&](int64_t t0, int64_t t1) {
    std::vector<const scalar_t*> h_prev(s.B);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t t_prev = reverse ? t + 1 : t - 1;
      for (int64_t b = 0; b < s.B; ++b) {
        const bool first = t_prev < 0 || t_prev >= s.T ||
                           (reverse && lengths != nullptr && t_prev >= lengths[b]);
        h_prev[b] = first ? h0s + b * s.P : ys + (t_prev * s.B + b) * s.P;
      }
      const scalar_t* x_t = xs + t * s.B * s.I;
      if (by_rows) {
        for (int64_t b = 0; b < s.B; ++b) {
          scalar_t* row = dst + (t * s.B + b) * width;
          std::copy_n(x_t + b * s.I, s.I, row);
          std::copy_n(h_prev[b], s.P, row + s.I);
        }
        continue;
      }
      // For each feature the B entries of a step are adjacent in the output.
      scalar_t* col = dst + t * s.B;
      for (int64_t c = 0; c < s.I; ++c) {
        for (int64_t b = 0; b < s.B; ++b) {
          col[c * cols + b] = x_t[b * s.I + c];
        }
      }
      for (int64_t c = 0; c < s.P; ++c) {
        for (int64_t b = 0; b < s.B; ++b) {
          col[(s.I + c) * cols + b] = h_prev[b][c];
        }
      }
    }
  });
  return out;
}

struct BackwardInputs {
  const Tensor& grad_y;
  const Tensor& grad_h_n;
  const Tensor& grad_c_n;
  const Tensor& x;
  const Tensor& h0;
  const Tensor& c0;
  const Tensor& w_ih;
  const Tensor& w_hh;
  const std::optional<Tensor>& w_hr;
  const Tensor& gates;
  const Tensor& cells;
  const Tensor& hidden;
  const Tensor& y;
};

// Which gradients the caller wants. grad_x and the weight gradients are each a GEMM over every
// step; the initial state's costs the last step's dh GEMM (a zero initial state that needs no
// gradient is common, and at T = 1 that GEMM is a quarter of the backward's arithmetic).
struct Wanted {
  bool x;
  bool weights;  // w_ih, w_hh, bias, w_hr
  bool state;    // h0, c0
};

// The state the backward carries through time.
template <typename scalar_t>
struct BackwardState {
  using acc_t = at::opmath_type<scalar_t>;
  Tensor dpre;    // (T, B, 4H), every step
  Tensor dh;      // (B, P)
  Tensor dc;      // (B, H), in acc_t
  Tensor dh_all;  // (T, B, P), with a projection: dh_t of active rows, for grad_w_hr
  Tensor dm;      // (B, H), with a projection
};

template <typename scalar_t>
BackwardStep<scalar_t> backward_cell_args(const Sizes& s, const BackwardInputs& in,
                                          BackwardState<scalar_t>& st, const int64_t* lengths,
                                          bool reverse, int64_t k) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t t = reverse ? s.T - 1 - k : k;
  const Tensor& c_prev = k == 0 ? in.c0 : in.cells.select(0, reverse ? t + 1 : t - 1);
  const bool proj = in.w_hr.has_value();
  const int64_t step = t * s.B;
  return BackwardStep<scalar_t>{
      in.gates.const_data_ptr<scalar_t>() + step * 4 * s.H,
      in.cells.const_data_ptr<scalar_t>() + step * s.H,
      c_prev.const_data_ptr<scalar_t>(),
      proj ? st.dm.template data_ptr<scalar_t>() : st.dh.template data_ptr<scalar_t>(),
      proj ? nullptr : in.grad_y.const_data_ptr<scalar_t>() + step * s.P,
      /*consume=*/!proj,
      st.dc.template data_ptr<acc_t>(),
      st.dpre.template data_ptr<scalar_t>() + step * 4 * s.H,
      lengths,
      t,
      s.H};
}

// Projection backward, before the GEMM dm = dh_t W_hr: dh_t = dh + grad_y[t] on active rows
// (zero on padding rows, which do not touch W_hr), and the carry dh restarts from zero there.
template <typename scalar_t>
void projection_grad_step(const Tensor& dh_t, const Tensor& dh, const Tensor& grad_y_t,
                          const int64_t* lengths, int64_t t) {
  const int64_t P = dh.size(1);
  auto* out = dh_t.data_ptr<scalar_t>();
  auto* carry = dh.data_ptr<scalar_t>();
  const auto* gy = grad_y_t.const_data_ptr<scalar_t>();
  for (int64_t b = 0; b < dh.size(0); ++b) {
    scalar_t* o = out + b * P;
    if (!is_active(lengths, b, t)) {
      std::fill_n(o, P, scalar_t(0));
      continue;
    }
    scalar_t* d = carry + b * P;
    const scalar_t* g = gy + b * P;
    for (int64_t j = 0; j < P; ++j) {
      o[j] = d[j] + g[j];
      d[j] = scalar_t(0);
    }
  }
}

// Without a projection on packed weights the two halves of consecutive steps fuse: a thread
// owning units [16 u, 16 u + 16) first finishes dh for those units from the previous step's dpre
// (the GEMM's columns are the units, as P = H), then runs their cell. One parallel region for
// the whole sequence, a barrier per step.
template <typename scalar_t>
void backward_loop_packed(const Sizes& s, const BackwardInputs& in, BackwardState<scalar_t>& st,
                          const int64_t* lengths, bool reverse, Wanted wanted) {
  const bool last_gemm = wanted.state && s.T > 0;  // dh of the initial state
  const Tensor packed =
      s.T > 1 || last_gemm ? pack_backward_weights<scalar_t>(in.w_hh, s) : Tensor();
  const scalar_t* w = packed.defined() ? packed.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* dh = st.dh.template data_ptr<scalar_t>();
  std::vector<BackwardStep<scalar_t>> steps;  // in processing order (reverse of k)
  steps.reserve(s.T);
  for (int64_t k = s.T - 1; k >= 0; --k) {
    steps.push_back(backward_cell_args(s, in, st, lengths, reverse, k));
  }
  const int64_t grain = grain_for(s.B * kPanel * (8 * s.H + kFlopsPerCell));
  cpu::parallel_steps(s.T, panel_count(s.H), grain, [&](int64_t i, int64_t u0, int64_t u1) {
    if (i > 0) {
      packed_grad_h(steps[i - 1].dpre, w, dh, s.B, 4 * s.H, s.P, u0, u1);
    }
    backward_rows(steps[i], 0, s.B, u0 * kPanel, std::min(u1 * kPanel, s.H));
  });
  if (last_gemm) {
    at::parallel_for(0, panel_count(s.P), grain_for(s.B * kPanel * 8 * s.H),
                     [&](int64_t v0, int64_t v1) {
                       packed_grad_h(steps.back().dpre, w, dh, s.B, 4 * s.H, s.P, v0, v1);
                     });
  }
}

// dh += dpre_t W_hh over the whole step; on packed weights when given. Active rows of dh were
// zeroed by the cell (or the projection step); padding rows keep their carry.
template <typename scalar_t>
void grad_h_step(const Sizes& s, const Tensor& dh, const Tensor& dpre_t, const Tensor& w_hh,
                 const Tensor& w_packed) {
  if constexpr (has_packed_kernels<scalar_t>()) {
    if (w_packed.defined()) {
      at::parallel_for(0, panel_count(s.P), grain_for(s.B * kPanel * 8 * s.H),
                       [&](int64_t v0, int64_t v1) {
                         packed_grad_h(dpre_t.const_data_ptr<scalar_t>(),
                                       w_packed.const_data_ptr<scalar_t>(),
                                       dh.data_ptr<scalar_t>(), s.B, 4 * s.H, s.P, v0, v1);
                       });
      return;
    }
  }
  cpu::linear_into(dh, dpre_t, w_hh.t(), /*accumulate=*/true);
}

// The general loop: [projection,] cell, then dh += dpre_t W_hh, each over the whole step.
template <typename scalar_t>
void backward_loop(const Sizes& s, const BackwardInputs& in, BackwardState<scalar_t>& st,
                   const int64_t* lengths, bool reverse, Wanted wanted) {
  const bool proj = in.w_hr.has_value();
  const Tensor w_packed = s.T > 1 || wanted.state ? pack_backward_weights<scalar_t>(in.w_hh, s)
                                                  : Tensor();
  for (int64_t k = s.T - 1; k >= 0; --k) {
    const int64_t t = reverse ? s.T - 1 - k : k;
    if (proj) {
      const Tensor dh_t = st.dh_all.select(0, t);
      projection_grad_step<scalar_t>(dh_t, st.dh, in.grad_y.select(0, t), lengths, t);
      cpu::linear_into(st.dm, dh_t, in.w_hr->t());
    }
    backward_cell_step(backward_cell_args(s, in, st, lengths, reverse, k), s.B);
    if (k > 0 || wanted.state) {
      grad_h_step<scalar_t>(s, st.dh, st.dpre.select(0, t), in.w_hh, w_packed);
    }
  }
}

// grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr (None where not wanted),
// and d pre (T, B, 4H).
using Grads = std::tuple<std::optional<Tensor>, std::optional<Tensor>, std::optional<Tensor>,
                         std::optional<Tensor>, std::optional<Tensor>, std::optional<Tensor>,
                         std::optional<Tensor>, Tensor>;

template <typename scalar_t>
Grads backward_impl(const Sizes& s, const BackwardInputs& in, const int64_t* lengths,
                    bool reverse, bool has_bias, Wanted wanted) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto opts = in.x.options();
  const bool proj = in.w_hr.has_value();
  BackwardState<scalar_t> st;
  st.dpre = at::empty({s.T, s.B, 4 * s.H}, opts);
  st.dh = in.grad_h_n.clone();
  st.dc = in.grad_c_n.to(c10::CppTypeToScalarType<acc_t>::value, /*non_blocking=*/false,
                         /*copy=*/true);
  if (proj) {
    st.dh_all = at::empty({s.T, s.B, s.P}, opts);
    st.dm = at::empty({s.B, s.H}, opts);
  }
  if constexpr (has_packed_kernels<scalar_t>()) {
    if (!proj && use_packed<scalar_t>(s)) {
      backward_loop_packed(s, in, st, lengths, reverse, wanted);
    } else {
      backward_loop(s, in, st, lengths, reverse, wanted);
    }
  } else {
    backward_loop(s, in, st, lengths, reverse, wanted);
  }
  Grads grads;
  std::get<7>(grads) = st.dpre;
  if (wanted.state) {
    std::get<1>(grads) = st.dh;
    std::get<2>(grads) = std::is_same_v<acc_t, scalar_t> ? st.dc : st.dc.to(in.x.scalar_type());
  }
  const Tensor dpre2d = st.dpre.view({s.T * s.B, 4 * s.H});
  if (wanted.x) {
    std::get<0>(grads) = cpu::linear(dpre2d, in.w_ih.t()).view({s.T, s.B, s.I});
  }
  if (!wanted.weights) {
    return grads;
  }
  // [grad_w_ih | grad_w_hh] (4H x (I + P)), a product over the T B rows (t, b). Small products
  // and outer products of a few rows (an LSTMCell step, a decoding step) read d pre^T and column
  // blocks of the operand in place (cpu::linear's broadcast form). Larger ones go to
  // oneDNN, which reads both operands of its transpose, operand dpre, without a reorder, but that
  // result must then be transposed by copying, 4H (I + P) elements. In the result's own layout
  // the copy is of d pre instead, transposed once (4H T B elements), and each gradient is then its
  // own product with a row block of operand, no copy after: that costs less while T B < I + P.
  const bool small = cpu::small_broadcast_product(4 * s.H, std::max(s.I, s.P), s.T * s.B);
  const Tensor operand =
      weight_grad_operand<scalar_t>(s, in.x, in.y, in.h0, lengths, reverse, small);
  if (small) {
    std::get<3>(grads) = cpu::linear(dpre2d.t(), operand.narrow(1, 0, s.I).t());
    std::get<4>(grads) = cpu::linear(dpre2d.t(), operand.narrow(1, s.I, s.P).t());
  } else if (s.T * s.B < s.I + s.P) {
    const Tensor dpre_t = dpre2d.t().contiguous();  // (4H, T B)
    std::get<3>(grads) = cpu::linear(dpre_t, operand.narrow(0, 0, s.I));
    std::get<4>(grads) = cpu::linear(dpre_t, operand.narrow(0, s.I, s.P));
  } else {
    const Tensor grad_w = cpu::linear(operand, dpre2d.t()).t();
    // Copies, never views: with I, P or 4H of 1 a slice is contiguous already, and returned
    // gradients must not share memory.
    std::get<3>(grads) = grad_w.narrow(1, 0, s.I).clone(at::MemoryFormat::Contiguous);
    std::get<4>(grads) = grad_w.narrow(1, s.I, s.P).clone(at::MemoryFormat::Contiguous);
  }
  if (has_bias) {
    std::get<5>(grads) = dpre2d.sum(0);
  }
  if (proj) {
    std::get<6>(grads) = cpu::linear(st.dh_all.view({s.T * s.B, s.P}).t(),
                                     in.hidden.view({s.T * s.B, s.H}).t());
  }
  return grads;
}

Grads lstm_layer_backward(const Tensor& grad_y, const Tensor& grad_h_n, const Tensor& grad_c_n,
                          const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
                          const Tensor& w_hh, const std::optional<Tensor>& w_hr,
                          const std::optional<Tensor>& lengths, bool reverse, const Tensor& gates,
                          const Tensor& cells, const Tensor& hidden, const Tensor& y,
                          bool has_bias, bool needs_grad_x, bool needs_grad_weights,
                          bool needs_grad_state) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const Sizes s = check_layer(x, h0, c0, w_ih, w_hh, w_hr);
  const auto dtype = x.scalar_type();
  check_tensor("lstm_layer", grad_y, "grad_y", {s.T, s.B, s.P}, dtype);
  check_tensor("lstm_layer", grad_h_n, "grad_h_n", {s.B, s.P}, dtype);
  check_tensor("lstm_layer", grad_c_n, "grad_c_n", {s.B, s.H}, dtype);
  check_tensor("lstm_layer", gates, "gates", {s.T, s.B, 4 * s.H}, dtype);
  check_tensor("lstm_layer", cells, "cells", {s.T, s.B, s.H}, dtype);
  if (w_hr.has_value()) {
    check_tensor("lstm_layer", hidden, "hidden", {s.T, s.B, s.H}, dtype);
  }
  check_tensor("lstm_layer", y, "y", {s.T, s.B, s.P}, dtype);
  const int64_t* len = check_lengths("lstm_layer", lengths, s);
  const BackwardInputs in{grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr,
                          gates, cells, hidden, y};
  Grads out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "lstm_layer_backward", [&] {
    out = backward_impl<scalar_t>(s, in, len, reverse, has_bias,
                                  Wanted{needs_grad_x, needs_grad_weights, needs_grad_state});
  });
  return out;
}

}  // namespace
}  // namespace fastseq::lstm

TORCH_LIBRARY_IMPL(fastseq, CPU, m) {
  m.impl("lstm_layer_forward", &fastseq::lstm::lstm_layer_forward);
  m.impl("lstm_layer_backward", &fastseq::lstm::lstm_layer_backward);
}
