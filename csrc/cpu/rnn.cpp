// One Elman RNN layer (one direction) on CPU: `fastseq::rnn_layer_forward` and `_backward`.
//
// h_t = act(x_t W_ih^T + bias + h_{t-1} W_hh^T), act = tanh or relu, bias = b_ih + b_hh.
//
// Rows. The kernels work on the steps' rows laid out as a PackedSequence lays them out: the
// sequences sorted by length, longest first, and step t holding the rows of the count(t) sequences
// still running, stacked step after step (`Rows`). Without lengths (or with every length T) that
// is x itself, (T B, I), and nothing is copied; with lengths, x is gathered into it once and the
// outputs scattered back, so that padding costs no arithmetic at all: the input projection and
// the weight gradients are GEMMs over the real rows only, and each step's recurrent GEMM over
// that step's rows. Since the running sequences of every step are a prefix of the sorted order,
// a step's rows continue the previous processed step's first rows; in the reverse direction the
// rows past those start at this step, from h0.
//
// Forward: the input projection of every step is one GEMM (csrc/cpu/linear.h), with the bias
// folded in, into the buffer that becomes the outputs. Each step then adds h_{t-1} W_hh^T into
// its rows and applies act in place. Backward through time (dpre_t = (dh + dy_t) act'(y_t),
// dh = dpre_t W_hh) needs only the outputs, which the forward returns anyway: nothing else is
// saved. grad_x and the weight gradients wait for the end, where each is one GEMM over every
// row, left out when not asked for.
//
// The recurrent GEMMs are small (a step's rows) and run T times against the same W_hh: float32
// on AVX-512 and bfloat16 on AVX-512 BF16 pack it once per call into 16-column panels
// (csrc/cpu/packed_gemm_avx512.h, packed_gemm_bf16.h) and run the whole sequence in one parallel
// region (csrc/cpu/parallel_steps.h), each thread keeping its column panels for every step: its
// columns' product, then their activation (forward) or the step's d pre (backward), while in L1.
// Other dtypes and CPUs take the same plan through csrc/cpu/linear.h's per-step GEMMs. The
// activation is csrc/cpu/lstm_cell_simd.h's tanh under function-level target attributes.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "linear.h"
#include "lstm_cell_simd.h"
#include "lstm_common.h"
#include "packed_gemm_avx512.h"
#include "packed_gemm_bf16.h"
#include "parallel_steps.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTSEQ_RNN_X86 1
#endif

namespace fastseq::rnn {
namespace {

using at::Tensor;
using lstm::grain_for;
using lstm::kPanel;
using lstm::panel_count;

constexpr const char* kOp = "rnn_layer";
constexpr int64_t kFlopsPerUnit = 20;  // the activation (or its derivative), per element

// ----------------------------------------------------------------------------------------------
// Rows.

struct Rows {
  int64_t T = 0, B = 0, total = 0;
  Tensor order;                 // (B,) int64: sorted position -> batch index; undefined: identity
  std::vector<int64_t> length;  // per sorted position (empty: all T)
  std::vector<int64_t> count;   // rows of step t
  std::vector<int64_t> offset;  // first row of step t

  bool identity() const { return !order.defined(); }
};

Rows make_rows(int64_t T, int64_t B, const int64_t* lengths) {
  Rows r;
  r.T = T;
  r.B = B;
  r.count.assign(T, B);
  const bool full =
      lengths == nullptr || std::all_of(lengths, lengths + B, [&](int64_t l) { return l == T; });
  if (!full) {
    r.order = at::empty({B}, at::kLong);
    int64_t* order = r.order.data_ptr<int64_t>();
    std::iota(order, order + B, int64_t(0));
    std::stable_sort(order, order + B, [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
    r.length.resize(B);
    std::vector<int64_t> ending(T + 1, 0);  // sequences of each length
    for (int64_t i = 0; i < B; ++i) {
      r.length[i] = lengths[order[i]];
      ending[r.length[i]] += 1;
    }
    for (int64_t t = T - 1, running = 0; t >= 0; --t) {  // count(t) = #{b : lengths[b] > t}
      running += ending[t + 1];
      r.count[t] = running;
    }
  }
  r.offset.resize(T);
  for (int64_t t = 0; t < T; ++t) {
    r.offset[t] = r.total;
    r.total += r.count[t];
  }
  return r;
}

// Processing step k: time t, its n rows, of which the first m continue the previous processed
// step (whose rows begin at `prev`) and the rest start from h0.
struct Step {
  int64_t t, n, m, prev;
};

Step step_at(const Rows& r, int64_t k, bool reverse) {
  const int64_t t = reverse ? r.T - 1 - k : k;
  if (k == 0) {
    return {t, r.count[t], 0, 0};
  }
  const int64_t tp = reverse ? t + 1 : t - 1;
  return {t, r.count[t], std::min(r.count[t], r.count[tp]), r.offset[tp]};
}

// A (T, B, F) tensor's rows in the rows layout, (total, F): a view without lengths.
template <typename scalar_t>
Tensor gather(const Tensor& src, const Rows& r) {
  const int64_t F = src.size(2);
  if (r.identity()) {
    return src.view({r.T * r.B, F});
  }
  Tensor out = at::empty({r.total, F}, src.options());
  const scalar_t* s = src.const_data_ptr<scalar_t>();
  scalar_t* d = out.data_ptr<scalar_t>();
  const int64_t* order = r.order.const_data_ptr<int64_t>();
  at::parallel_for(0, r.T, grain_for(r.B * F), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t i = 0; i < r.count[t]; ++i) {
        std::memcpy(d + (r.offset[t] + i) * F, s + (t * r.B + order[i]) * F, F * sizeof(scalar_t));
      }
    }
  });
  return out;
}

// The inverse: (total, F) rows back to (T, B, F), zeros on padding; a view without lengths.
template <typename scalar_t>
Tensor scatter(const Tensor& rows, const Rows& r) {
  const int64_t F = rows.size(1);
  if (r.identity()) {
    return rows.view({r.T, r.B, F});
  }
  // Each (t, b) row is written once: copied, or zeroed where step t is padding for sequence b.
  Tensor out = at::empty({r.T, r.B, F}, rows.options());
  const scalar_t* s = rows.const_data_ptr<scalar_t>();
  scalar_t* d = out.data_ptr<scalar_t>();
  const int64_t* order = r.order.const_data_ptr<int64_t>();
  at::parallel_for(0, r.T, grain_for(r.B * F), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t i = 0; i < r.count[t]; ++i) {
        std::memcpy(d + (t * r.B + order[i]) * F, s + (r.offset[t] + i) * F, F * sizeof(scalar_t));
      }
      for (int64_t i = r.count[t]; i < r.B; ++i) {
        std::memset(d + (t * r.B + order[i]) * F, 0, F * sizeof(scalar_t));
      }
    }
  });
  return out;
}

// A (B, F) state in sorted order, and back.
Tensor sorted(const Tensor& state, const Rows& r) {
  return r.identity() ? state : state.index_select(0, r.order);
}

Tensor unsorted(const Tensor& state, const Rows& r) {
  return r.identity() ? state : at::empty_like(state).index_copy_(0, r.order, state);
}

// Row i (in sorted order) of step t of a (T, B, F) tensor, read where it lies: the backward's
// reads of y and grad_y, without gathering them into the rows layout first (two copies that
// cost a tenth of the backward's time at T128 B32 H256).
template <typename scalar_t>
struct StepRows {
  const scalar_t* base;
  const int64_t* order;  // nullptr: identity
  int64_t B, F;

  StepRows(const Tensor& t, const Rows& r)
      : base(t.const_data_ptr<scalar_t>()),
        order(r.identity() ? nullptr : r.order.const_data_ptr<int64_t>()),
        B(r.B),
        F(t.size(2)) {}

  const scalar_t* at(int64_t t, int64_t i) const {
    return base + (t * B + (order == nullptr ? i : order[i])) * F;
  }
};

// ----------------------------------------------------------------------------------------------
// Activation, in place, and the backward's d pre: W lanes at a time (lstm_cell_simd.h) where the
// CPU has AVX-512 or AVX2, the rest one at a time. Math in float for float and bfloat16.

template <typename scalar_t>
constexpr bool kVector = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>;

#define FASTSEQ_RNN_INLINE __attribute__((always_inline)) inline

// p[j] = act(p[j]) for j in [0, n - n % W); returns where it stopped.
template <int W, typename scalar_t>
FASTSEQ_RNN_INLINE int64_t activate_lanes(scalar_t* p, int64_t n, bool relu) {
  namespace simd = cpu::simd;
  using F = typename simd::Vec<W>::f;
  int64_t j = 0;
  if (relu) {
    for (; j + W <= n; j += W) {
      const F v = simd::load<W>(p + j);
      simd::store<W>(p + j, v < 0.f ? F{} : v);  // NaN stays NaN, as torch.relu
    }
  } else {
    for (; j + W <= n; j += W) {
      simd::store<W>(p + j, simd::tanh<W>(simd::load<W>(p + j)));
    }
  }
  return j;
}

// dpre[j] = (dh[j] + dy[j]) act'(y[j]), act' from the output: 1 - y^2 (tanh), y > 0 (relu); and
// dh[j] = 0, for the GEMM that follows to accumulate into.
template <int W, typename scalar_t>
FASTSEQ_RNN_INLINE int64_t grad_pre_lanes(const scalar_t* y, const scalar_t* dy, scalar_t* dh,
                                          scalar_t* dpre, int64_t n, bool relu) {
  namespace simd = cpu::simd;
  using F = typename simd::Vec<W>::f;
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const F v = simd::load<W>(y + j);
    const F g = simd::load<W>(dh + j) + simd::load<W>(dy + j);
    simd::store<W>(dpre + j, relu ? (v > 0.f ? g : F{}) : g * (1.f - v * v));
    simd::store<W>(dh + j, F{});
  }
  return j;
}

#ifdef FASTSEQ_RNN_X86
#define FASTSEQ_RNN_LANES(ns, isa_target, width)                                                 \
  namespace ns {                                                                                 \
  template <typename scalar_t>                                                                   \
  __attribute__((target(isa_target))) int64_t activate(scalar_t* p, int64_t n, bool relu) {      \
    return activate_lanes<width>(p, n, relu);                                                    \
  }                                                                                              \
  template <typename scalar_t>                                                                   \
  __attribute__((target(isa_target))) int64_t grad_pre(const scalar_t* y, const scalar_t* dy,    \
                                                       scalar_t* dh, scalar_t* dpre, int64_t n,  \
                                                       bool relu) {                              \
    return grad_pre_lanes<width>(y, dy, dh, dpre, n, relu);                                      \
  }                                                                                              \
  }

FASTSEQ_RNN_LANES(avx2_lanes, "avx2,fma", 8)
FASTSEQ_RNN_LANES(avx512_lanes, "avx512f,avx2,fma", 16)
#undef FASTSEQ_RNN_LANES
#endif

template <typename scalar_t>
void activate(scalar_t* p, int64_t n, bool relu) {
  int64_t j = 0;
#ifdef FASTSEQ_RNN_X86
  if constexpr (kVector<scalar_t>) {
    if (lstm::cpu_has_avx512()) {
      j = avx512_lanes::activate(p, n, relu);
    }
    if (lstm::cpu_has_avx2()) {
      j += avx2_lanes::activate(p + j, n - j, relu);
    }
  }
#endif
  using acc_t = at::opmath_type<scalar_t>;
  for (; j < n; ++j) {
    const acc_t v = p[j];
    p[j] = relu ? (v < acc_t(0) ? acc_t(0) : v) : std::tanh(v);
  }
}

template <typename scalar_t>
void grad_pre(const scalar_t* y, const scalar_t* dy, scalar_t* dh, scalar_t* dpre, int64_t n,
              bool relu) {
  int64_t j = 0;
#ifdef FASTSEQ_RNN_X86
  if constexpr (kVector<scalar_t>) {
    if (lstm::cpu_has_avx512()) {
      j = avx512_lanes::grad_pre(y, dy, dh, dpre, n, relu);
    }
    if (lstm::cpu_has_avx2()) {
      j += avx2_lanes::grad_pre(y + j, dy + j, dh + j, dpre + j, n - j, relu);
    }
  }
#endif
  using acc_t = at::opmath_type<scalar_t>;
  for (; j < n; ++j) {
    const acc_t v = y[j];
    const acc_t g = acc_t(dh[j]) + acc_t(dy[j]);
    dpre[j] = relu ? (v > acc_t(0) ? g : acc_t(0)) : g * (acc_t(1) - v * v);
    dh[j] = scalar_t(0);
  }
}

// ----------------------------------------------------------------------------------------------
// W_hh packed for the recurrent GEMMs: float32 on AVX-512 (16-column panels of K rows,
// lstm::pack_column_panels) and bfloat16 on AVX-512 BF16 (pairs of k per panel row). Packing reads
// and writes W_hh once more, which pays back over several steps only.

template <typename scalar_t>
bool use_packed(const Rows& r) {
#ifdef FASTSEQ_RNN_X86
  const bool isa = (std::is_same_v<scalar_t, float> && lstm::cpu_has_avx512()) ||
                   (std::is_same_v<scalar_t, at::BFloat16> && lstm::cpu_has_avx512_bf16());
  return isa && r.T > 1 && r.total >= lstm::kMinRowsToPack;
#else
  return false;
#endif
}

// The B operand (K x N) of C += A B packed, from w_hh (H x H): W_hh^T (the forward's
// h W_hh^T) when `transposed`, else W_hh (the backward's dpre W_hh).
template <typename scalar_t>
Tensor pack_weights(const Tensor& w_hh, bool transposed) {
  const int64_t H = w_hh.size(0);
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
#ifdef FASTSEQ_PACKED_GEMM_BF16
    namespace bf = cpu::avx512_bf16;
    const int64_t NP = panel_count(H), panel = bf::pair_rows(H) * bf::kPairRow;
    Tensor packed = at::empty({NP, panel}, w_hh.options());
    auto* dst = packed.data_ptr<at::BFloat16>();
    const auto* src = w_hh.const_data_ptr<at::BFloat16>();
    // Element (k, c) of the operand: W_hh[c, k] transposed, W_hh[k, c] else.
    const int64_t k_stride = transposed ? 1 : H, c_stride = transposed ? H : 1;
    at::parallel_for(0, NP, lstm::pack_grain(H / 2), [&](int64_t v0, int64_t v1) {
      for (int64_t v = v0; v < v1; ++v) {
        bf::pack_panel(src + v * kPanel * c_stride, k_stride, c_stride, H,
                       std::min(kPanel, H - v * kPanel), dst + v * panel);
      }
    });
    return packed;
#endif
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    return lstm::pack_column_panels(transposed ? w_hh.t().contiguous() : w_hh, H, H);
  }
  TORCH_INTERNAL_ASSERT(false, "rnn_layer: no packed kernels for this dtype");
  return Tensor();
}

// C[0:M, cols of panels v0..v1) += A (M x H) B, B from pack_weights (N = K = H).
void packed_gemm(int64_t M, int64_t H, const float* A, const float* packed, float* C, int64_t v0,
                 int64_t v1) {
#ifdef FASTSEQ_PACKED_GEMM_AVX512
  cpu::avx512::gemm_column_panels(M, H, A, H, packed, C, H, H, v0, v1);
#endif
}

void packed_gemm(int64_t M, int64_t H, const at::BFloat16* A, const at::BFloat16* packed,
                 at::BFloat16* C, int64_t v0, int64_t v1) {
#ifdef FASTSEQ_PACKED_GEMM_BF16
  cpu::avx512_bf16::gemm_column_panels(M, H, A, H, packed, C, H, H, v0, v1);
#endif
}

template <typename scalar_t>
constexpr bool has_packed_kernels() {
  return std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16>;
}

// A task of a step: the rows times about 16 columns (one panel) of a product of depth H.
int64_t step_grain(int64_t rows, int64_t H) {
  return grain_for(std::max<int64_t>(rows, 1) * kPanel * (2 * H + kFlopsPerUnit));
}

// ----------------------------------------------------------------------------------------------
// Argument checks.

lstm::Sizes check_layer(const Tensor& x, const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16, kOp,
              ": x must be float32, float64 or bfloat16, got ", dtype);
  TORCH_CHECK(x.dim() == 3, kOp, ": x must be (T, B, I), got ", x.sizes());
  TORCH_CHECK(w_ih.dim() == 2, kOp, ": w_ih must be (H, I), got ", w_ih.sizes());
  const int64_t H = w_ih.size(0);
  const lstm::Sizes s{x.size(0), x.size(1), x.size(2), H, H};
  lstm::check_tensor(kOp, x, "x", {s.T, s.B, s.I}, dtype);
  lstm::check_tensor(kOp, h0, "h0", {s.B, H}, dtype);
  lstm::check_tensor(kOp, w_ih, "w_ih", {H, s.I}, dtype);
  lstm::check_tensor(kOp, w_hh, "w_hh", {H, H}, dtype);
  return s;
}

bool is_relu(const std::string& nonlinearity) {
  TORCH_CHECK(nonlinearity == "tanh" || nonlinearity == "relu", kOp,
              ": nonlinearity must be 'tanh' or 'relu', got '", nonlinearity, "'");
  return nonlinearity == "relu";
}

// ----------------------------------------------------------------------------------------------
// Forward.

// The recurrence over out (total, H): each step's rows hold x W_ih^T + bias on entry and the
// outputs on return. h0s: h0 in sorted order.
template <typename scalar_t>
void forward_loop(const Rows& r, const Tensor& out, const Tensor& h0s, const Tensor& w_hh,
                  bool reverse, bool relu) {
  const int64_t H = w_hh.size(0);
  scalar_t* o = out.data_ptr<scalar_t>();
  const scalar_t* h0 = h0s.const_data_ptr<scalar_t>();
  if constexpr (has_packed_kernels<scalar_t>()) {
    if (use_packed<scalar_t>(r)) {
      const Tensor packed = pack_weights<scalar_t>(w_hh, /*transposed=*/true);
      const scalar_t* w = packed.const_data_ptr<scalar_t>();
      cpu::parallel_steps(r.T, panel_count(H), step_grain(r.B, H),
                          [&](int64_t k, int64_t v0, int64_t v1) {
        const Step st = step_at(r, k, reverse);
        scalar_t* c = o + r.offset[st.t] * H;
        if (st.m > 0) {
          packed_gemm(st.m, H, o + st.prev * H, w, c, v0, v1);
        }
        if (st.n > st.m) {
          packed_gemm(st.n - st.m, H, h0 + st.m * H, w, c + st.m * H, v0, v1);
        }
        const int64_t j0 = v0 * kPanel, j1 = std::min(v1 * kPanel, H);
        for (int64_t i = 0; i < st.n; ++i) {
          activate(c + i * H + j0, j1 - j0, relu);
        }
      });
      return;
    }
  }
  for (int64_t k = 0; k < r.T; ++k) {
    const Step st = step_at(r, k, reverse);
    const Tensor c = out.narrow(0, r.offset[st.t], st.n);
    if (st.m > 0) {
      cpu::linear_into(c.narrow(0, 0, st.m), out.narrow(0, st.prev, st.m), w_hh, true);
    }
    if (st.n > st.m) {
      cpu::linear_into(c.narrow(0, st.m, st.n - st.m), h0s.narrow(0, st.m, st.n - st.m), w_hh,
                       true);
    }
    scalar_t* p = c.data_ptr<scalar_t>();
    at::parallel_for(0, st.n, grain_for(H * kFlopsPerUnit), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        activate(p + i * H, H, relu);
      }
    });
  }
}

// h_n: each sequence's output at its last processed step, or h0 for an empty one.
template <typename scalar_t>
Tensor final_hidden(const Rows& r, const Tensor& out, const Tensor& h0, bool reverse) {
  const int64_t H = h0.size(1);
  if (r.T == 0) {
    return h0.clone();
  }
  if (r.identity()) {
    return out.narrow(0, reverse ? 0 : (r.T - 1) * r.B, r.B).clone();
  }
  Tensor h_n = at::empty_like(h0);
  const int64_t* order = r.order.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < r.B; ++i) {
    const int64_t len = r.length[i];
    const scalar_t* src =
        len == 0 ? h0.const_data_ptr<scalar_t>() + order[i] * H
                 : out.const_data_ptr<scalar_t>() + (reverse ? i : r.offset[len - 1] + i) * H;
    std::memcpy(h_n.data_ptr<scalar_t>() + order[i] * H, src, H * sizeof(scalar_t));
  }
  return h_n;
}

template <typename scalar_t>
std::tuple<Tensor, Tensor> forward_impl(const Rows& r, const Tensor& x, const Tensor& h0,
                                        const Tensor& w_ih, const Tensor& w_hh,
                                        const std::optional<Tensor>& bias, bool reverse,
                                        bool relu) {
  const Tensor out = cpu::linear(gather<scalar_t>(x, r), w_ih, bias);  // (total, H)
  forward_loop<scalar_t>(r, out, sorted(h0, r), w_hh, reverse, relu);
  return {scatter<scalar_t>(out, r), final_hidden<scalar_t>(r, out, h0, reverse)};
}

std::tuple<Tensor, Tensor> rnn_layer_forward(const Tensor& x, const Tensor& h0, const Tensor& w_ih,
                                             const Tensor& w_hh, const std::optional<Tensor>& bias,
                                             const std::optional<Tensor>& lengths, bool reverse,
                                             const std::string& nonlinearity) {
  // The GEMMs inside are implementation detail: keep autograd out of them.
  at::AutoDispatchBelowADInplaceOrView guard;
  const bool relu = is_relu(nonlinearity);
  const lstm::Sizes s = check_layer(x, h0, w_ih, w_hh);
  if (bias.has_value()) {
    lstm::check_tensor(kOp, *bias, "bias", {s.H}, x.scalar_type());
  }
  const Rows r = make_rows(s.T, s.B, lstm::check_lengths(kOp, lengths, s));
  std::tuple<Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rnn_layer_forward", [&] {
    out = forward_impl<scalar_t>(r, x, h0, w_ih, w_hh, bias, reverse, relu);
  });
  return out;
}

// ----------------------------------------------------------------------------------------------
// Backward.

// Through time in reverse processing order: dpre (total, H) of every row; dh (B, H) in sorted
// order holds grad_h_n on entry and the gradient of h0 on return (rows of the first step's GEMM
// only when `state`: without, the GEMMs leave out the rows that start from h0).
template <typename scalar_t>
void backward_loop(const Rows& r, const StepRows<scalar_t>& y, const StepRows<scalar_t>& dy,
                   const Tensor& dh, const Tensor& dpre, const Tensor& w_hh, bool reverse, bool relu,
                   bool state) {
  const int64_t H = w_hh.size(0);
  scalar_t* d = dh.data_ptr<scalar_t>();
  scalar_t* dp = dpre.data_ptr<scalar_t>();
  // Rows of step k's dh GEMM: the continuing ones, and with `state` those from h0 too.
  auto gemm_rows = [&](const Step& st) { return state ? st.n : st.m; };
  auto cell = [&](const Step& st, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    const int64_t base = r.offset[st.t] * H;
    for (int64_t i = i0; i < i1; ++i) {
      grad_pre(y.at(st.t, i) + j0, dy.at(st.t, i) + j0, d + i * H + j0, dp + base + i * H + j0,
               j1 - j0, relu);
    }
  };
  if constexpr (has_packed_kernels<scalar_t>()) {
    if (use_packed<scalar_t>(r)) {
      const Tensor packed = pack_weights<scalar_t>(w_hh, /*transposed=*/false);
      const scalar_t* w = packed.const_data_ptr<scalar_t>();
      auto gemm = [&](const Step& st, int64_t v0, int64_t v1) {
        const int64_t rows = gemm_rows(st);
        if (rows > 0) {
          packed_gemm(rows, H, dp + r.offset[st.t] * H, w, d, v0, v1);
        }
      };
      // Backward step i is processing step k = T - 1 - i: first the previous one's dh GEMM for
      // this thread's columns (all of its d pre is done: a barrier lies between), then this
      // step's d pre for the same columns.
      cpu::parallel_steps(r.T, panel_count(H), step_grain(r.B, H),
                          [&](int64_t i, int64_t v0, int64_t v1) {
        if (i > 0) {
          gemm(step_at(r, r.T - i, reverse), v0, v1);
        }
        const Step st = step_at(r, r.T - 1 - i, reverse);
        cell(st, 0, st.n, v0 * kPanel, std::min(v1 * kPanel, H));
      });
      if (r.T > 0) {
        const Step first = step_at(r, 0, reverse);
        at::parallel_for(0, panel_count(H), step_grain(gemm_rows(first), H),
                         [&](int64_t v0, int64_t v1) { gemm(first, v0, v1); });
      }
      return;
    }
  }
  for (int64_t k = r.T - 1; k >= 0; --k) {
    const Step st = step_at(r, k, reverse);
    at::parallel_for(0, st.n, grain_for(H * kFlopsPerUnit), [&](int64_t i0, int64_t i1) {
      cell(st, i0, i1, 0, H);
    });
    const int64_t rows = gemm_rows(st);
    if (rows > 0) {
      cpu::linear_into(dh.narrow(0, 0, rows), dpre.narrow(0, r.offset[st.t], rows), w_hh.t(),
                       /*accumulate=*/true);
    }
  }
}

// The state before each row's step, (total, H): the previous processed step's output of the
// same row, or h0 for a row's first step. The operand of grad_w_hh.
template <typename scalar_t>
Tensor previous_rows(const Rows& r, const StepRows<scalar_t>& y, const Tensor& h0s, bool reverse) {
  const int64_t H = h0s.size(1);
  Tensor out = at::empty({r.total, H}, h0s.options());
  const scalar_t* h0 = h0s.const_data_ptr<scalar_t>();
  scalar_t* d = out.data_ptr<scalar_t>();
  at::parallel_for(0, r.T, grain_for(r.B * H), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const Step st = step_at(r, k, reverse);
      scalar_t* dst = d + r.offset[st.t] * H;
      const int64_t t_prev = reverse ? st.t + 1 : st.t - 1;
      for (int64_t i = 0; i < st.m; ++i) {
        std::memcpy(dst + i * H, y.at(t_prev, i), H * sizeof(scalar_t));
      }
      std::memcpy(dst + st.m * H, h0 + st.m * H, (st.n - st.m) * H * sizeof(scalar_t));
    }
  });
  return out;
}

using Grads = std::tuple<std::optional<Tensor>, std::optional<Tensor>, std::optional<Tensor>,
                         std::optional<Tensor>, std::optional<Tensor>>;

struct Wanted {
  bool x, weights, state;
};

template <typename scalar_t>
Grads backward_impl(const Rows& r, const Tensor& grad_y, const Tensor& grad_h_n, const Tensor& x,
                    const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh, const Tensor& y,
                    bool reverse, bool relu, bool has_bias, Wanted wanted) {
  const int64_t H = w_hh.size(0);
  const StepRows<scalar_t> y_at(y, r);
  const Tensor dpre = at::empty({r.total, H}, y.options());
  Tensor dh = r.identity() ? grad_h_n.clone() : sorted(grad_h_n, r);
  backward_loop<scalar_t>(r, y_at, StepRows<scalar_t>(grad_y, r), dh, dpre, w_hh, reverse, relu,
                          wanted.state);
  Grads grads;
  if (wanted.state) {
    std::get<1>(grads) = unsorted(dh, r);
  }
  if (wanted.x) {
    std::get<0>(grads) = scatter<scalar_t>(cpu::linear(dpre, w_ih.t()), r);
  }
  if (wanted.weights) {
    // (H, total) by (total, F), both operands read in place: ATen's GEMM takes d pre^T as a
    // transposed operand, where the linear form would copy the (F, total) transpose of the rows
    // first (a strided copy that cost as much as the product).
    const Tensor dpre_t = dpre.t();
    std::get<2>(grads) = at::mm(dpre_t, gather<scalar_t>(x, r));
    std::get<3>(grads) = at::mm(dpre_t, previous_rows<scalar_t>(r, y_at, sorted(h0, r), reverse));
    if (has_bias) {
      std::get<4>(grads) = dpre.sum(0);
    }
  }
  return grads;
}

Grads rnn_layer_backward(const Tensor& grad_y, const Tensor& grad_h_n, const Tensor& x,
                         const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh, const Tensor& y,
                         const std::optional<Tensor>& lengths, bool reverse,
                         const std::string& nonlinearity, bool has_bias, bool needs_grad_x,
                         bool needs_grad_weights, bool needs_grad_state) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const bool relu = is_relu(nonlinearity);
  const lstm::Sizes s = check_layer(x, h0, w_ih, w_hh);
  const auto dtype = x.scalar_type();
  lstm::check_tensor(kOp, grad_y, "grad_y", {s.T, s.B, s.H}, dtype);
  lstm::check_tensor(kOp, grad_h_n, "grad_h_n", {s.B, s.H}, dtype);
  lstm::check_tensor(kOp, y, "y", {s.T, s.B, s.H}, dtype);
  const Rows r = make_rows(s.T, s.B, lstm::check_lengths(kOp, lengths, s));
  Grads out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "rnn_layer_backward", [&] {
    out = backward_impl<scalar_t>(r, grad_y, grad_h_n, x, h0, w_ih, w_hh, y, reverse, relu,
                                  has_bias, Wanted{needs_grad_x, needs_grad_weights,
                                                   needs_grad_state});
  });
  return out;
}

}  // namespace
}  // namespace fastseq::rnn

TORCH_LIBRARY_IMPL(fastseq, CPU, m) {
  m.impl("rnn_layer_forward", &fastseq::rnn::rnn_layer_forward);
  m.impl("rnn_layer_backward", &fastseq::rnn::rnn_layer_backward);
}
