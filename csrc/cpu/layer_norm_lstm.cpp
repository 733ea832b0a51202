// One LayerNorm-LSTM layer (one direction) on CPU: `fastseq::layer_norm_lstm_forward` and
// `_backward`. The model is fastseq.reference.lstm.layer_norm_lstm_layer (haste's LayerNormLSTM):
//
//   pre = LN(x W_ih^T) ln_ih + LN(h_{t-1} W_hh^T) ln_hh + bias      (LN over the 4H features)
//   i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of pre's four blocks
//   c_t = f c_{t-1} + i g,     h_t = o tanh(LN(c_t) ln_c_weight + ln_c_bias)      (LN over H)
//
// A normalisation couples every column of a row, so a step cannot be split over hidden units the
// way the plain layer's is (csrc/cpu/lstm.cpp) without a barrier per normalisation. Rows (the
// sequences of the batch) never couple: each thread takes a block of rows and runs it through
// every step on its own, with no barrier at all. Per step that is the block's recurrent GEMM (on
// AVX-512 against W_hh packed once per call, csrc/cpu/packed_gemm_avx512.h; through ATen
// otherwise), then for each row the fused pointwise and LayerNorm math while the row is in L1.
//
// The input projection of all steps is one GEMM, normalised in place. The backward runs each
// row's cell and both LayerNorm backwards per step, then dh += dr W_hh for the block; afterwards,
// over all steps at once, the input LayerNorm's backward and the GEMMs for grad_x and the weight
// gradients.
//
// Saved for the backward, per step and row: the activated gates and the normalised projections
// x_hat and r_hat (4H each), the cell c_t and the state entering the step h_{t-1} (H each; kept
// transposed, (H, T, B)), and the statistics [1/std of x W_ih^T, 1/std of h W_hh^T, mean of c_t,
// 1/std of c_t].
//
// Padding (`lengths`) as in the plain layer: a padding step keeps h and c and outputs zeros. The
// state is carried in its own buffers here (never read back from y), so a reverse sequence
// shorter than T starts from h0 with no special case.
//
// The row math is written once over "lanes" (W columns at a time: GCC vector extensions for
// float, plain double for float64) and compiled under an AVX-512 target attribute where ATen
// reports AVX-512, as csrc/cpu/lstm.cpp does.

#include <cmath>
#include <cstring>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "lstm_cell_simd.h"
#include "lstm_common.h"
#include "linear.h"
#include "packed_gemm_avx512.h"

namespace fastseq::lstm {
namespace {

using at::Tensor;

constexpr const char* kOp = "layer_norm_lstm";
constexpr int64_t kStats = 4;  // per row: x rstd, r rstd, c mean, c rstd

#define FASTSEQ_INLINE __attribute__((always_inline)) inline

// ----------------------------------------------------------------------------------------------
// Lanes: how the row math reads, computes and writes kWidth columns at a time.

template <int W>
struct FloatLanes {
  using T = float;
  using V = typename cpu::simd::Vec<W>::f;
  static constexpr int kWidth = W;
  static FASTSEQ_INLINE V load(const float* p) { return cpu::simd::load<W>(p); }
  static FASTSEQ_INLINE void store(float* p, V v) { cpu::simd::store<W>(p, v); }
  static FASTSEQ_INLINE V splat(float x) { return cpu::simd::splat<W>(x); }
  static FASTSEQ_INLINE V sigmoid(V x) { return cpu::simd::sigmoid<W>(x); }
  static FASTSEQ_INLINE V tanh(V x) { return cpu::simd::tanh<W>(x); }
  static FASTSEQ_INLINE float sum(V v) {
    float s = 0.f;
    for (int i = 0; i < W; ++i) {
      s += v[i];
    }
    return s;
  }
};

struct DoubleLanes {
  using T = double;
  using V = double;
  static constexpr int kWidth = 1;
  static FASTSEQ_INLINE V load(const double* p) { return *p; }
  static FASTSEQ_INLINE void store(double* p, V v) { *p = v; }
  static FASTSEQ_INLINE V splat(double x) { return x; }
  static FASTSEQ_INLINE V sigmoid(V x) { return 1.0 / (1.0 + std::exp(-x)); }
  static FASTSEQ_INLINE V tanh(V x) { return std::tanh(x); }
  static FASTSEQ_INLINE double sum(V v) { return v; }
};

// ----------------------------------------------------------------------------------------------
// What the rows of a step read and write. Per-step buffers are (T, B, width); without saving,
// r and gates are (B, 4H) scratch reused every step.

template <typename T>
struct Norms {
  const T* ln_ih;   // (4H)
  const T* ln_hh;   // (4H)
  const T* bias;    // (4H), zeros when the layer has none; not read by the backward
  const T* ln_c_w;  // (H)
  const T* ln_c_b;  // (H)
  double eps;
};

template <typename T>
struct ForwardArgs {
  int64_t steps, B, H;
  const int64_t* lengths;
  bool save;
  Norms<T> norms;
  const T* x_hat;  // (T, B, 4H)
  T* r;            // h W_hh^T in, r_hat out
  T* gates;
  T* stats;        // (T, B, 4)
  T* cells;        // (T, B, H), when saving
  T* h;            // (B, H) state
  T* c;            // (B, H) state
  T* y;            // (T, B, H)

  int64_t saved_row(int64_t t, int64_t b) const { return save ? t * B + b : b; }
};

template <typename T>
struct BackwardArgs {
  int64_t steps, B, H;
  const int64_t* lengths;
  bool reverse;
  Norms<T> norms;
  const T* gates;   // (T, B, 4H)
  const T* cells;   // (T, B, H)
  const T* r_hat;   // (T, B, 4H)
  const T* stats;   // (T, B, 4)
  const T* c0;      // (B, H)
  const T* grad_y;  // (T, B, H)
  T* dh;            // (B, H) carry
  T* dc;            // (B, H) carry
  T* dpre;          // (T, B, 4H) out
  T* dr;            // (T, B, 4H) out: d (h W_hh^T)
};

// A thread block's sums of the parameter gradients, and its scratch row.
template <typename T>
struct Accumulators {
  T* ln_hh;    // (4H)
  T* ln_c_w;   // (H)
  T* ln_c_b;   // (H)
  T* scratch;  // (2H): c_hat and d c_hat of the current row
};

struct Stats {
  double mean, rstd;
};

// ----------------------------------------------------------------------------------------------
// Column kernels: W = L::kWidth columns at a time over [j0, j1), a multiple of W.

template <class L>
struct Cols {
  using T = typename L::T;
  using V = typename L::V;

  static FASTSEQ_INLINE T sum(const T* v, int64_t j0, int64_t j1) {
    V s = L::splat(0);
    for (int64_t j = j0; j < j1; j += L::kWidth) {
      s += L::load(v + j);
    }
    return L::sum(s);
  }

  static FASTSEQ_INLINE T squared_deviation(const T* v, T mean, int64_t j0, int64_t j1) {
    V s = L::splat(0);
    for (int64_t j = j0; j < j1; j += L::kWidth) {
      const V d = L::load(v + j) - mean;
      s += d * d;
    }
    return L::sum(s);
  }

  static FASTSEQ_INLINE void normalize(T* v, T mean, T rstd, int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j += L::kWidth) {
      L::store(v + j, (L::load(v + j) - mean) * rstd);
    }
  }

  // r -> r_hat in place; the gates' pre-activations, their activations, and c = f c + i g.
  static FASTSEQ_INLINE void gates(const Norms<T>& p, const T* x_hat, T* r, T* g, T* c, Stats rs,
                                   int64_t H, int64_t j0, int64_t j1) {
    const T mean = rs.mean, rstd = rs.rstd;
    for (int64_t j = j0; j < j1; j += L::kWidth) {
      V pre[4];
      for (int q = 0; q < 4; ++q) {
        const int64_t o = q * H + j;
        const V r_hat = (L::load(r + o) - mean) * rstd;
        L::store(r + o, r_hat);
        pre[q] = L::load(x_hat + o) * L::load(p.ln_ih + o) + L::load(p.bias + o) +
                 r_hat * L::load(p.ln_hh + o);
      }
      const V i = L::sigmoid(pre[0]), f = L::sigmoid(pre[1]);
      const V gg = L::tanh(pre[2]), o = L::sigmoid(pre[3]);
      L::store(g + j, i);
      L::store(g + H + j, f);
      L::store(g + 2 * H + j, gg);
      L::store(g + 3 * H + j, o);
      L::store(c + j, f * L::load(c + j) + i * gg);
    }
  }

  // h = o tanh(LN(c) ln_c_w + ln_c_b), into the state and y.
  static FASTSEQ_INLINE void output(const Norms<T>& p, const T* g, const T* c, T* h, T* y,
                                    Stats cs, int64_t H, int64_t j0, int64_t j1) {
    const T mean = cs.mean, rstd = cs.rstd;
    for (int64_t j = j0; j < j1; j += L::kWidth) {
      const V cn = (L::load(c + j) - mean) * rstd * L::load(p.ln_c_w + j) + L::load(p.ln_c_b + j);
      const V out = L::load(g + 3 * H + j) * L::tanh(cn);
      L::store(h + j, out);
      L::store(y + j, out);
    }
  }

  // Backward of the output: dpre_o, and d c_hat (into scratch with c_hat) for the cell's
  // LayerNorm; returns its sums [sum d c_hat, sum d c_hat * c_hat] through s.
  static FASTSEQ_INLINE void output_grad(const Norms<T>& p, const T* g, const T* c, T* dh,
                                         const T* gy, T* dpre, Accumulators<T>& acc, Stats cs,
                                         int64_t H, int64_t j0, int64_t j1, T (&s)[2]) {
    const T mean = cs.mean, rstd = cs.rstd;
    V s0 = L::splat(0), s1 = L::splat(0);
    for (int64_t j = j0; j < j1; j += L::kWidth) {
      const V dh_t = L::load(dh + j) + L::load(gy + j);
      L::store(dh + j, L::splat(0));  // consumed: the GEMM accumulates the next carry here
      const V c_hat = (L::load(c + j) - mean) * rstd;
      const V w = L::load(p.ln_c_w + j);
      const V tc = L::tanh(c_hat * w + L::load(p.ln_c_b + j));
      const V o = L::load(g + 3 * H + j);
      L::store(dpre + 3 * H + j, dh_t * tc * (o * (T(1) - o)));
      const V dcn = dh_t * o * (T(1) - tc * tc);
      L::store(acc.ln_c_w + j, L::load(acc.ln_c_w + j) + dcn * c_hat);
      L::store(acc.ln_c_b + j, L::load(acc.ln_c_b + j) + dcn);
      const V dc_hat = dcn * w;
      L::store(acc.scratch + j, c_hat);
      L::store(acc.scratch + H + j, dc_hat);
      s0 += dc_hat;
      s1 += dc_hat * c_hat;
    }
    s[0] += L::sum(s0);
    s[1] += L::sum(s1);
  }

  // dc += the cell LayerNorm's backward; dpre of i, f, g; the carry dc f.
  static FASTSEQ_INLINE void gates_grad(const T* g, const T* c_prev, T* dc, T* dpre,
                                        const Accumulators<T>& acc, T rstd, T m0, T m1, int64_t H,
                                        int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j += L::kWidth) {
      const V c_hat = L::load(acc.scratch + j);
      const V dc_t =
          L::load(dc + j) + (L::load(acc.scratch + H + j) - m0 - c_hat * m1) * rstd;
      const V i = L::load(g + j), f = L::load(g + H + j), gg = L::load(g + 2 * H + j);
      L::store(dpre + j, dc_t * gg * (i * (T(1) - i)));
      L::store(dpre + H + j, dc_t * L::load(c_prev + j) * (f * (T(1) - f)));
      L::store(dpre + 2 * H + j, dc_t * i * (T(1) - gg * gg));
      L::store(dc + j, dc_t * f);
    }
  }

  // A LayerNorm's backward, first pass: y = LN(v) gain got gradient d; adds d x_hat to the
  // gain's gradient and returns [sum d gain, sum d gain x_hat] through s.
  static FASTSEQ_INLINE void norm_grad_sums(const T* d, const T* x_hat, const T* gain,
                                            T* gain_grad, int64_t j0, int64_t j1, T (&s)[2]) {
    V s0 = L::splat(0), s1 = L::splat(0);
    for (int64_t j = j0; j < j1; j += L::kWidth) {
      const V dj = L::load(d + j), xj = L::load(x_hat + j);
      const V dg = dj * L::load(gain + j);
      L::store(gain_grad + j, L::load(gain_grad + j) + dj * xj);
      s0 += dg;
      s1 += dg * xj;
    }
    s[0] += L::sum(s0);
    s[1] += L::sum(s1);
  }

  // Second pass: dv = rstd (d gain - m0 - x_hat m1), m the means of the first pass's sums (dv
  // may be d).
  static FASTSEQ_INLINE void norm_grad(const T* d, const T* x_hat, const T* gain, T* dv, T rstd,
                                       T m0, T m1, int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j += L::kWidth) {
      const V dg = L::load(d + j) * L::load(gain + j);
      L::store(dv + j, (dg - m0 - L::load(x_hat + j) * m1) * rstd);
    }
  }
};

// ----------------------------------------------------------------------------------------------
// Row math: L's columns, then LT's (one wide) for the ragged rest.

template <class L>
int64_t body_end(int64_t n) {
  return n - n % L::kWidth;
}

template <class L, class LT>
FASTSEQ_INLINE Stats row_stats(const typename L::T* v, int64_t n, double eps) {
  const int64_t m = body_end<L>(n);
  using T = typename L::T;
  const T mean = (Cols<L>::sum(v, 0, m) + Cols<LT>::sum(v, m, n)) / T(n);
  const T var = (Cols<L>::squared_deviation(v, mean, 0, m) +
                 Cols<LT>::squared_deviation(v, mean, m, n)) / T(n);
  return {mean, 1.0 / std::sqrt(double(var) + eps)};
}

// Rows [r0, r1) of the input projection (rows, 4H): normalised in place, their 1/std into
// stats[row * 4].
template <class L, class LT>
FASTSEQ_INLINE void input_norm_rows(typename L::T* q, typename L::T* stats, int64_t G,
                                    double eps, int64_t r0, int64_t r1) {
  const int64_t m = body_end<L>(G);
  for (int64_t row = r0; row < r1; ++row) {
    typename L::T* v = q + row * G;
    const Stats s = row_stats<L, LT>(v, G, eps);
    Cols<L>::normalize(v, s.mean, s.rstd, 0, m);
    Cols<LT>::normalize(v, s.mean, s.rstd, m, G);
    stats[row * kStats] = s.rstd;
  }
}

// Rows [b0, b1) of step t, after the GEMM has put h W_hh^T into their rows of r.
template <class L, class LT>
FASTSEQ_INLINE void forward_rows(const ForwardArgs<typename L::T>& a, int64_t t, int64_t b0,
                                 int64_t b1) {
  using T = typename L::T;
  const int64_t H = a.H, G = 4 * H, mh = body_end<L>(H);
  for (int64_t b = b0; b < b1; ++b) {
    T* c = a.c + b * H;
    T* y = a.y + (t * a.B + b) * H;
    if (is_active(a.lengths, b, t)) {
      T* r = a.r + a.saved_row(t, b) * G;
      T* g = a.gates + a.saved_row(t, b) * G;
      T* st = a.stats + (t * a.B + b) * kStats;
      const T* x_hat = a.x_hat + (t * a.B + b) * G;
      const Stats rs = row_stats<L, LT>(r, G, a.norms.eps);
      Cols<L>::gates(a.norms, x_hat, r, g, c, rs, H, 0, mh);
      Cols<LT>::gates(a.norms, x_hat, r, g, c, rs, H, mh, H);
      const Stats cs = row_stats<L, LT>(c, H, a.norms.eps);
      Cols<L>::output(a.norms, g, c, a.h + b * H, y, cs, H, 0, mh);
      Cols<LT>::output(a.norms, g, c, a.h + b * H, y, cs, H, mh, H);
      st[1] = rs.rstd;
      st[2] = cs.mean;
      st[3] = cs.rstd;
    } else {
      std::fill_n(y, H, T(0));
      // Never read by the backward; zeros keep the op's outputs a function of its inputs.
      std::fill_n(a.gates + a.saved_row(t, b) * G, G, T(0));
      std::fill_n(a.stats + (t * a.B + b) * kStats + 1, kStats - 1, T(0));
    }
    if (a.save) {
      std::memcpy(a.cells + (t * a.B + b) * H, c, H * sizeof(T));
    }
  }
}

// Rows [b0, b1) of processing step k (time t): d pre and d r of the step; the carries dh (zeroed
// on active rows, for the GEMM that follows) and dc. Padding rows get zeros and pass the carries.
template <class L, class LT>
FASTSEQ_INLINE void backward_rows(const BackwardArgs<typename L::T>& a, Accumulators<typename L::T>& acc,
                                  int64_t k, int64_t b0, int64_t b1) {
  using T = typename L::T;
  const int64_t H = a.H, G = 4 * H, B = a.B;
  const int64_t mh = body_end<L>(H), mg = body_end<L>(G);
  const int64_t t = a.reverse ? a.steps - 1 - k : k;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t row = t * B + b;
    T* dpre = a.dpre + row * G;
    T* dr = a.dr + row * G;
    if (!is_active(a.lengths, b, t)) {
      std::fill_n(dpre, G, T(0));
      std::fill_n(dr, G, T(0));
      continue;
    }
    const T* g = a.gates + row * G;
    const T* c = a.cells + row * H;
    const T* c_prev = k == 0 ? a.c0 + b * H
                             : a.cells + ((a.reverse ? t + 1 : t - 1) * B + b) * H;
    const T* st = a.stats + row * kStats;
    const Stats cs{st[2], st[3]};
    T* dh = a.dh + b * H;
    T* dc = a.dc + b * H;
    T s[2] = {0, 0};
    Cols<L>::output_grad(a.norms, g, c, dh, a.grad_y + row * H, dpre, acc, cs, H, 0, mh, s);
    Cols<LT>::output_grad(a.norms, g, c, dh, a.grad_y + row * H, dpre, acc, cs, H, mh, H, s);
    Cols<L>::gates_grad(g, c_prev, dc, dpre, acc, st[3], s[0] / H, s[1] / H, H, 0, mh);
    Cols<LT>::gates_grad(g, c_prev, dc, dpre, acc, st[3], s[0] / H, s[1] / H, H, mh, H);
    const T* r_hat = a.r_hat + row * G;
    T n[2] = {0, 0};
    Cols<L>::norm_grad_sums(dpre, r_hat, a.norms.ln_hh, acc.ln_hh, 0, mg, n);
    Cols<LT>::norm_grad_sums(dpre, r_hat, a.norms.ln_hh, acc.ln_hh, mg, G, n);
    Cols<L>::norm_grad(dpre, r_hat, a.norms.ln_hh, dr, st[1], n[0] / G, n[1] / G, 0, mg);
    Cols<LT>::norm_grad(dpre, r_hat, a.norms.ln_hh, dr, st[1], n[0] / G, n[1] / G, mg, G);
  }
}

// Rows [r0, r1) of all steps (row = t B + b), in place: d pre in, d (x W_ih^T) out (the input
// LayerNorm's backward); adds d pre x_hat to ln_ih_grad. Padding rows get zeros without reading
// x_hat, which with eps = 0 is not finite on a constant (say zero-padded) row.
template <class L, class LT>
FASTSEQ_INLINE void input_norm_grad_rows(typename L::T* dpre, const typename L::T* x_hat,
                                         const typename L::T* stats, const typename L::T* ln_ih,
                                         typename L::T* ln_ih_grad, const int64_t* lengths,
                                         int64_t B, int64_t G, int64_t r0, int64_t r1) {
  using T = typename L::T;
  const int64_t mg = body_end<L>(G);
  for (int64_t row = r0; row < r1; ++row) {
    T* d = dpre + row * G;
    if (!is_active(lengths, row % B, row / B)) {
      std::fill_n(d, G, T(0));
      continue;
    }
    const T* xh = x_hat + row * G;
    T n[2] = {0, 0};
    Cols<L>::norm_grad_sums(d, xh, ln_ih, ln_ih_grad, 0, mg, n);
    Cols<LT>::norm_grad_sums(d, xh, ln_ih, ln_ih_grad, mg, G, n);
    const T rstd = stats[row * kStats];
    Cols<L>::norm_grad(d, xh, ln_ih, d, rstd, n[0] / G, n[1] / G, 0, mg);
    Cols<LT>::norm_grad(d, xh, ln_ih, d, rstd, n[0] / G, n[1] / G, mg, G);
  }
}

// The row functions for one instruction set and dtype, as a table.
template <typename T>
struct RowKernels {
  void (*input_norm)(T*, T*, int64_t, double, int64_t, int64_t);
  void (*forward)(const ForwardArgs<T>&, int64_t, int64_t, int64_t);
  void (*backward)(const BackwardArgs<T>&, Accumulators<T>&, int64_t, int64_t, int64_t);
  void (*input_norm_grad)(T*, const T*, const T*, const T*, T*, const int64_t*, int64_t, int64_t,
                          int64_t, int64_t);
};

#define FASTSEQ_LN_LSTM_ROWS(ns, attributes, L, LT)                                              \
  namespace ns {                                                                                 \
  using T = L::T;                                                                                \
  attributes void input_norm(T* q, T* stats, int64_t G, double eps, int64_t r0, int64_t r1) {    \
    input_norm_rows<L, LT>(q, stats, G, eps, r0, r1);                                            \
  }                                                                                              \
  attributes void forward(const ForwardArgs<T>& a, int64_t t, int64_t b0, int64_t b1) {          \
    forward_rows<L, LT>(a, t, b0, b1);                                                           \
  }                                                                                              \
  attributes void backward(const BackwardArgs<T>& a, Accumulators<T>& acc, int64_t k,            \
                           int64_t b0, int64_t b1) {                                             \
    backward_rows<L, LT>(a, acc, k, b0, b1);                                                     \
  }                                                                                              \
  attributes void input_norm_grad(T* dpre, const T* x_hat, const T* stats, const T* ln_ih,       \
                                  T* ln_ih_grad, const int64_t* lengths, int64_t B, int64_t G,   \
                                  int64_t r0, int64_t r1) {                                      \
    input_norm_grad_rows<L, LT>(dpre, x_hat, stats, ln_ih, ln_ih_grad, lengths, B, G, r0, r1);   \
  }                                                                                              \
  RowKernels<T> kernels() {                                                                      \
    return {&input_norm, &forward, &backward, &input_norm_grad};                                 \
  }                                                                                              \
  }

// Four lanes on the baseline ISA (SSE2 on x86-64); sixteen under AVX-512.
FASTSEQ_LN_LSTM_ROWS(baseline_rows, , FloatLanes<4>, FloatLanes<1>)
FASTSEQ_LN_LSTM_ROWS(double_rows, , DoubleLanes, DoubleLanes)
#ifdef FASTSEQ_PACKED_GEMM_AVX512
FASTSEQ_LN_LSTM_ROWS(avx512_rows, __attribute__((target("avx512f,avx2,fma"))), FloatLanes<16>,
                     FloatLanes<1>)
#endif
#undef FASTSEQ_LN_LSTM_ROWS

template <typename T>
RowKernels<T> row_kernels() {
  if constexpr (std::is_same_v<T, double>) {
    return double_rows::kernels();
  } else {
#ifdef FASTSEQ_PACKED_GEMM_AVX512
    if (cpu_has_avx512()) {
      return avx512_rows::kernels();
    }
#endif
    return baseline_rows::kernels();
  }
}

// ----------------------------------------------------------------------------------------------
// The recurrent GEMMs of a block of rows: C[rows] (+)= A[rows] W, W (K x N) given as a transposed
// view or packed (float32 on AVX-512, when the sequence has kMinRowsToPack rows or more).

struct RowBlockGemm {
  Tensor w;       // (K, N), any strides
  Tensor packed;  // pack_column_panels(w), or undefined
  int64_t K, N;

  static RowBlockGemm make(const Tensor& w, int64_t sequence_rows) {
    RowBlockGemm gemm{w, Tensor(), w.size(0), w.size(1)};
#ifdef FASTSEQ_PACKED_GEMM_AVX512
    if (w.scalar_type() == at::kFloat && cpu_has_avx512() && sequence_rows >= kMinRowsToPack) {
      gemm.packed = pack_column_panels(w.contiguous(), gemm.K, gemm.N);
    }
#endif
    return gemm;
  }

  // c (rows x N) += a (rows x K) W, both row-major at the pointers; `overwrite` sets c instead.
  // Pointers, not tensors: this runs once per step and thread, and only the ATen path needs
  // tensors (views made here).
  template <typename T>
  void run(const T* a, T* c, int64_t rows, bool overwrite) const {
    if (rows <= 0) {
      return;
    }
#ifdef FASTSEQ_PACKED_GEMM_AVX512
    if constexpr (std::is_same_v<T, float>) {
      if (packed.defined()) {
        if (overwrite) {
          std::fill_n(c, rows * N, 0.f);
        }
        cpu::avx512::gemm_column_panels(rows, K, a, K, packed.const_data_ptr<float>(), c, N, N, 0,
                                        panel_count(N));
        return;
      }
    }
#endif
    const Tensor a_rows = at::from_blob(const_cast<T*>(a), {rows, K}, w.options());
    cpu::linear_into(at::from_blob(c, {rows, N}, w.options()), a_rows, w.t(), !overwrite);
  }
};

// Splits [0, n) into `blocks` contiguous blocks; block i is [start(i), start(i + 1)).
struct Blocks {
  int64_t n, blocks;
  static Blocks over(int64_t n) {
    return {n, std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n))};
  }
  int64_t start(int64_t i) const { return n * i / blocks; }
};

// ----------------------------------------------------------------------------------------------
// Argument checks.

struct LayerNorms {
  const Tensor& ln_ih;
  const Tensor& ln_hh;
  const Tensor& ln_c_w;
  const Tensor& ln_c_b;
};

Sizes check_layer(const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
                  const Tensor& w_hh, const std::optional<Tensor>& bias, const LayerNorms& ln,
                  double eps) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, kOp,
              ": x must be float32 or float64, got ", dtype);
  TORCH_CHECK(eps >= 0 && std::isfinite(eps), kOp, ": eps must be finite and >= 0, got ", eps);
  const Sizes s = check_layer_tensors(kOp, x, h0, c0, w_ih, w_hh);
  if (bias.has_value()) {
    check_tensor(kOp, *bias, "bias", {4 * s.H}, dtype);
  }
  check_tensor(kOp, ln.ln_ih, "ln_ih", {4 * s.H}, dtype);
  check_tensor(kOp, ln.ln_hh, "ln_hh", {4 * s.H}, dtype);
  check_tensor(kOp, ln.ln_c_w, "ln_c_weight", {s.H}, dtype);
  check_tensor(kOp, ln.ln_c_b, "ln_c_bias", {s.H}, dtype);
  return s;
}

template <typename T>
Norms<T> norms_of(const LayerNorms& ln, const T* bias, double eps) {
  return {ln.ln_ih.const_data_ptr<T>(), ln.ln_hh.const_data_ptr<T>(), bias,
          ln.ln_c_w.const_data_ptr<T>(), ln.ln_c_b.const_data_ptr<T>(), eps};
}

Tensor bias_or_zeros(const std::optional<Tensor>& bias, const Sizes& s, const Tensor& x) {
  return bias.has_value() ? *bias : at::zeros({4 * s.H}, x.options());
}

// ----------------------------------------------------------------------------------------------
// Forward.

using ForwardOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                              Tensor>;

// h_in (H, T, B) [:, t, b0:b1] = h[b0:b1, :]: the state entering step t, kept transposed for the
// weight-gradient GEMM (csrc/cpu/linear.h takes its first operand without a reorder only
// when it is row-major).
template <typename T>
void save_state_transposed(const T* h, T* h_in, const Sizes& s, int64_t t, int64_t b0, int64_t b1) {
  for (int64_t j = 0; j < s.H; ++j) {
    T* col = h_in + (j * s.T + t) * s.B;
    for (int64_t b = b0; b < b1; ++b) {
      col[b] = h[b * s.H + j];
    }
  }
}

template <typename T>
ForwardOut forward_impl(const Sizes& s, const Tensor& x, const Tensor& h0, const Tensor& c0,
                        const Tensor& w_ih, const Tensor& w_hh, const Tensor& bias,
                        const LayerNorms& ln, double eps, const int64_t* lengths, bool reverse,
                        bool save) {
  const auto opts = x.options();
  const int64_t G = 4 * s.H, rows = s.T * s.B;
  const RowKernels<T> kernels = row_kernels<T>();
  // x W_ih^T for all steps, normalised in place into x_hat.
  Tensor x_hat = cpu::linear(x.view({rows, s.I}), w_ih).view({s.T, s.B, G});
  Tensor stats = at::empty({s.T, s.B, kStats}, opts);
  at::parallel_for(0, rows, grain_for(G * 8), [&](int64_t r0, int64_t r1) {
    kernels.input_norm(x_hat.data_ptr<T>(), stats.data_ptr<T>(), G, eps, r0, r1);
  });

  Tensor y = at::empty({s.T, s.B, s.H}, opts);
  Tensor h = h0.clone(), c = c0.clone();
  const int64_t saved = save ? s.T : 1;
  Tensor r = at::empty({saved, s.B, G}, opts);
  Tensor gates = at::empty({saved, s.B, G}, opts);
  Tensor cells = save ? at::empty({s.T, s.B, s.H}, opts) : at::empty({0}, opts);
  Tensor h_in = save ? at::empty({s.H, s.T, s.B}, opts) : at::empty({0}, opts);
  const ForwardArgs<T> args{s.T, s.B, s.H, lengths, save, norms_of<T>(ln, bias.const_data_ptr<T>(), eps),
                            x_hat.const_data_ptr<T>(), r.data_ptr<T>(), gates.data_ptr<T>(),
                            stats.data_ptr<T>(), save ? cells.data_ptr<T>() : nullptr,
                            h.data_ptr<T>(), c.data_ptr<T>(), y.data_ptr<T>()};
  const RowBlockGemm gemm = RowBlockGemm::make(w_hh.t(), rows);
  const Blocks blocks = Blocks::over(s.B);
  at::parallel_for(0, blocks.blocks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b0 = blocks.start(i), b1 = blocks.start(i + 1);
      for (int64_t k = 0; k < s.T; ++k) {
        const int64_t t = reverse ? s.T - 1 - k : k;
        if (save) {
          save_state_transposed(h.const_data_ptr<T>(), h_in.data_ptr<T>(), s, t, b0, b1);
        }
        gemm.run(h.const_data_ptr<T>() + b0 * s.H,
                 r.data_ptr<T>() + ((save ? t : 0) * s.B + b0) * G, b1 - b0, /*overwrite=*/true);
        kernels.forward(args, t, b0, b1);
      }
    }
  });
  if (!save) {
    auto none = [&] { return at::empty({0}, opts); };  // distinct tensors: outputs never alias
    return {y, h, c, none(), none(), none(), none(), none(), none()};
  }
  return {y, h, c, gates, cells, h_in, x_hat, r, stats};
}

ForwardOut layer_norm_lstm_forward(const Tensor& x, const Tensor& h0, const Tensor& c0,
                                   const Tensor& w_ih, const Tensor& w_hh,
                                   const std::optional<Tensor>& bias, const Tensor& ln_ih,
                                   const Tensor& ln_hh, const Tensor& ln_c_weight,
                                   const Tensor& ln_c_bias, const std::optional<Tensor>& lengths,
                                   bool reverse, double eps, bool save_for_backward) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const LayerNorms ln{ln_ih, ln_hh, ln_c_weight, ln_c_bias};
  const Sizes s = check_layer(x, h0, c0, w_ih, w_hh, bias, ln, eps);
  const int64_t* len = check_lengths(kOp, lengths, s);
  ForwardOut out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "layer_norm_lstm_forward", [&] {
    out = forward_impl<scalar_t>(s, x, h0, c0, w_ih, w_hh, bias_or_zeros(bias, s, x), ln, eps, len,
                                 reverse, save_for_backward);
  });
  return out;
}

// ----------------------------------------------------------------------------------------------
// Backward.

using Grads = std::tuple<std::optional<Tensor>, Tensor, Tensor, std::optional<Tensor>,
                         std::optional<Tensor>, std::optional<Tensor>, Tensor, Tensor, Tensor,
                         Tensor>;

struct Saved {
  const Tensor& gates;
  const Tensor& cells;
  const Tensor& h_in;
  const Tensor& x_hat;
  const Tensor& r_hat;
  const Tensor& stats;
};

template <typename T>
Grads backward_impl(const Sizes& s, const Tensor& grad_y, const Tensor& grad_h_n,
                    const Tensor& grad_c_n, const Tensor& x, const Tensor& c0, const Tensor& w_ih,
                    const Tensor& w_hh, const LayerNorms& ln, double eps, const int64_t* lengths,
                    bool reverse, bool has_bias, const Saved& sv, bool needs_grad_x,
                    bool needs_grad_weights) {
  const auto opts = x.options();
  const int64_t G = 4 * s.H, rows = s.T * s.B;
  const RowKernels<T> kernels = row_kernels<T>();
  Tensor dh = grad_h_n.clone(), dc = grad_c_n.clone();
  Tensor dpre = at::empty({s.T, s.B, G}, opts);
  Tensor dr = at::empty({s.T, s.B, G}, opts);
  const BackwardArgs<T> args{s.T, s.B, s.H, lengths, reverse, norms_of<T>(ln, nullptr, eps),
                             sv.gates.const_data_ptr<T>(), sv.cells.const_data_ptr<T>(),
                             sv.r_hat.const_data_ptr<T>(), sv.stats.const_data_ptr<T>(),
                             c0.const_data_ptr<T>(), grad_y.const_data_ptr<T>(), dh.data_ptr<T>(),
                             dc.data_ptr<T>(), dpre.data_ptr<T>(), dr.data_ptr<T>()};
  const RowBlockGemm gemm = RowBlockGemm::make(w_hh, rows);
  const Blocks blocks = Blocks::over(s.B);
  // Per block: the gradients of ln_hh (4H), ln_c_weight and ln_c_bias (H each), and scratch (2H).
  Tensor sums = at::zeros({blocks.blocks, G + 4 * s.H}, opts);
  at::parallel_for(0, blocks.blocks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b0 = blocks.start(i), b1 = blocks.start(i + 1);
      T* own = sums.data_ptr<T>() + i * (G + 4 * s.H);
      Accumulators<T> acc{own, own + G, own + G + s.H, own + G + 2 * s.H};
      for (int64_t k = s.T - 1; k >= 0; --k) {
        kernels.backward(args, acc, k, b0, b1);
        const int64_t t = reverse ? s.T - 1 - k : k;
        gemm.run(dr.const_data_ptr<T>() + (t * s.B + b0) * G, dh.data_ptr<T>() + b0 * s.H,
                 b1 - b0, /*overwrite=*/false);
      }
    }
  });
  const Tensor block_sums = sums.sum(0);

  // The bias gradient (ATen's blocked sum: a running float32 sum over T B rows would drift),
  // then the input LayerNorm over all steps at once (d pre becomes d (x W_ih^T) in place), then
  // the GEMMs.
  std::optional<Tensor> grad_bias;
  if (has_bias) {
    grad_bias = dpre.view({rows, G}).sum(0);
  }
  const Blocks row_blocks = Blocks::over(rows);
  Tensor ln_ih_sums = at::zeros({row_blocks.blocks, G}, opts);
  at::parallel_for(0, row_blocks.blocks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      kernels.input_norm_grad(dpre.data_ptr<T>(), sv.x_hat.const_data_ptr<T>(),
                              sv.stats.const_data_ptr<T>(), ln.ln_ih.const_data_ptr<T>(),
                              ln_ih_sums.data_ptr<T>() + i * G, lengths, s.B, G,
                              row_blocks.start(i), row_blocks.start(i + 1));
    }
  });
  const Tensor dq = dpre.view({rows, G});
  std::optional<Tensor> grad_x, grad_w_ih, grad_w_hh;  // the GEMMs, each only when wanted
  if (needs_grad_x) {
    grad_x = cpu::linear(dq, w_ih.t()).view({s.T, s.B, s.I});
  }
  if (needs_grad_weights) {
    const Tensor h_in = sv.h_in.view({s.H, rows});
    if (cpu::small_broadcast_product(G, std::max(s.I, s.H), rows)) {
      // Small (a decoding step): straight into the (4H x I) and (4H x H) layouts, d q^T and
      // d r^T read in place by the broadcast form, the few rows of h made row-major.
      grad_w_ih = cpu::linear(dq.t(), x.view({rows, s.I}).t());
      grad_w_hh = cpu::linear(dr.view({rows, G}).t(), h_in.t().contiguous().t());
    } else {
      // Transposed products (I x 4H and H x 4H) so that the first operand is row-major; the
      // second is taken as a transposed view, which oneDNN reads in place.
      const Tensor x_t = x.view({rows, s.I}).t().contiguous();
      grad_w_ih = cpu::linear(x_t, dq.t()).t().contiguous();
      grad_w_hh = cpu::linear(h_in, dr.view({rows, G}).t()).t().contiguous();
    }
  }
  return {grad_x,
          dh,
          dc,
          grad_w_ih,
          grad_w_hh,
          grad_bias,
          ln_ih_sums.sum(0),
          block_sums.narrow(0, 0, G).clone(),
          block_sums.narrow(0, G, s.H).clone(),
          block_sums.narrow(0, G + s.H, s.H).clone()};
}

Grads layer_norm_lstm_backward(const Tensor& grad_y, const Tensor& grad_h_n,
                               const Tensor& grad_c_n, const Tensor& x, const Tensor& h0,
                               const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
                               const Tensor& ln_ih, const Tensor& ln_hh,
                               const Tensor& ln_c_weight, const Tensor& ln_c_bias,
                               const std::optional<Tensor>& lengths, bool reverse, double eps,
                               bool has_bias, const Tensor& gates, const Tensor& cells,
                               const Tensor& h_in, const Tensor& x_hat, const Tensor& r_hat,
                               const Tensor& stats, bool needs_grad_x,
                               bool needs_grad_weights) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const LayerNorms ln{ln_ih, ln_hh, ln_c_weight, ln_c_bias};
  const Sizes s = check_layer(x, h0, c0, w_ih, w_hh, std::nullopt, ln, eps);
  const auto dtype = x.scalar_type();
  check_tensor(kOp, grad_y, "grad_y", {s.T, s.B, s.H}, dtype);
  check_tensor(kOp, grad_h_n, "grad_h_n", {s.B, s.H}, dtype);
  check_tensor(kOp, grad_c_n, "grad_c_n", {s.B, s.H}, dtype);
  check_tensor(kOp, gates, "gates", {s.T, s.B, 4 * s.H}, dtype);
  check_tensor(kOp, cells, "cells", {s.T, s.B, s.H}, dtype);
  check_tensor(kOp, h_in, "h_in", {s.H, s.T, s.B}, dtype);
  check_tensor(kOp, x_hat, "x_hat", {s.T, s.B, 4 * s.H}, dtype);
  check_tensor(kOp, r_hat, "r_hat", {s.T, s.B, 4 * s.H}, dtype);
  check_tensor(kOp, stats, "stats", {s.T, s.B, kStats}, dtype);
  const int64_t* len = check_lengths(kOp, lengths, s);
  const Saved saved{gates, cells, h_in, x_hat, r_hat, stats};
  Grads out;
  AT_DISPATCH_FLOATING_TYPES(dtype, "layer_norm_lstm_backward", [&] {
    out = backward_impl<scalar_t>(s, grad_y, grad_h_n, grad_c_n, x, c0, w_ih, w_hh, ln, eps, len,
                                  reverse, has_bias, saved, needs_grad_x, needs_grad_weights);
  });
  return out;
}

}  // namespace
}  // namespace fastseq::lstm

TORCH_LIBRARY_IMPL(fastseq, CPU, m) {
  m.impl("layer_norm_lstm_forward", &fastseq::lstm::layer_norm_lstm_forward);
  m.impl("layer_norm_lstm_backward", &fastseq::lstm::layer_norm_lstm_backward);
}
