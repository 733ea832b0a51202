// What the CPU LSTM layers share (csrc/cpu/lstm.cpp and csrc/cpu/layer_norm_lstm.cpp): sizes and
// argument checks, padding, the CPU's vector level, and W packed into 16-column panels for the
// recurrent GEMMs (csrc/cpu/packed_gemm_avx512.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

namespace fastseq::lstm {

// Below about this much work a parallel region costs more (fork and join, a few microseconds
// with 2 threads) than it saves.
constexpr int64_t kMinParallelFlops = 1 << 18;

inline int64_t grain_for(int64_t flops_per_item) {
  return std::max<int64_t>(1, kMinParallelFlops / std::max<int64_t>(flops_per_item, 1));
}

// Rows of the recurrent GEMM over the whole sequence (T B) from which packing W_hh once pays for
// itself; below, the GEMMs read it where it lies (csrc/cpu/linear.h).
constexpr int64_t kMinRowsToPack = 4;

// Step t is padding for sequence b when t >= lengths[b] (never without lengths).
inline bool is_active(const int64_t* lengths, int64_t b, int64_t t) {
  return lengths == nullptr || t < lengths[b];
}

// ATen's AVX2 level or better; ATEN_CPU_CAPABILITY=default selects the portable code (tests).
inline bool cpu_has_avx2() {
  static const bool has = [] {
    const std::string cap = at::get_cpu_capability();
    return cap == "AVX2" || cap == "AVX512";
  }();
  return has;
}

// ATen's AVX512 level (avx512f, bw, vl, dq); ATEN_CPU_CAPABILITY=avx2 keeps the AVX2 kernels.
inline bool cpu_has_avx512() {
  static const bool has = at::get_cpu_capability() == "AVX512";
  return has;
}

// AVX-512 with its bfloat16 dot products (VDPBF16PS), under the same ATen level.
inline bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

// ----------------------------------------------------------------------------------------------
// Packing: K rows of 16 floats per panel.

constexpr int64_t kPanel = 16;

inline int64_t panel_count(int64_t n) {
  return (n + kPanel - 1) / kPanel;
}

// Panels of `rows` rows per packing task: at least 64 KiB each, as a fork costs a few
// microseconds, about what copying that much takes.
inline int64_t pack_grain(int64_t rows) {
  return std::max<int64_t>(1, (int64_t(64) << 10) / (std::max<int64_t>(rows, 1) * kPanel * 4));
}

// B operand w (K x N, row-major, float32) as panels: panel v holds columns [16 v, 16 v + 16),
// zero past N. Shape (ceil(N/16), K, 16).
inline at::Tensor pack_column_panels(const at::Tensor& w, int64_t K, int64_t N) {
  const int64_t NP = panel_count(N);
  at::Tensor packed = at::empty({NP, K, kPanel}, w.options());
  float* dst = packed.data_ptr<float>();
  const float* src = w.const_data_ptr<float>();
  at::parallel_for(0, NP, pack_grain(K), [&](int64_t v0, int64_t v1) {
    for (int64_t v = v0; v < v1; ++v) {
      const int64_t n = std::min(kPanel, N - v * kPanel);
      for (int64_t k = 0; k < K; ++k) {
        float* row = dst + (v * K + k) * kPanel;
        if (n == kPanel) {  // a constant size, which the compiler inlines: no call per row
          std::memcpy(row, src + k * N + v * kPanel, kPanel * sizeof(float));
        } else {
          std::memcpy(row, src + k * N + v * kPanel, n * sizeof(float));
          std::fill(row + n, row + kPanel, 0.0f);
        }
      }
    }
  });
  return packed;
}

// ----------------------------------------------------------------------------------------------
// Argument checks; `op` names the op in the message.

struct Sizes {
  int64_t T, B, I, H, P;
};

inline void check_tensor(const char* op, const at::Tensor& t, const char* name,
                         at::IntArrayRef sizes, at::ScalarType dtype) {
  TORCH_CHECK(t.sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype,
              " (that of x), got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// The tensors every LSTM layer takes, checked against x (dtype, shape, device, layout): x (T, B, I),
// h0 (B, P), c0 (B, H), w_ih (4H, I), w_hh (4H, P), where P = proj_size, or H when it is 0.
inline Sizes check_layer_tensors(const char* op, const at::Tensor& x, const at::Tensor& h0,
                                 const at::Tensor& c0, const at::Tensor& w_ih,
                                 const at::Tensor& w_hh, int64_t proj_size = 0) {
  TORCH_CHECK(x.dim() == 3, op, ": x must be (T, B, I), got ", x.sizes());
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % 4 == 0, op, ": w_ih must be (4H, I), got ",
              w_ih.sizes());
  const int64_t H = w_ih.size(0) / 4;
  const Sizes s{x.size(0), x.size(1), x.size(2), H, proj_size > 0 ? proj_size : H};
  const auto dtype = x.scalar_type();
  check_tensor(op, x, "x", {s.T, s.B, s.I}, dtype);
  check_tensor(op, h0, "h0", {s.B, s.P}, dtype);
  check_tensor(op, c0, "c0", {s.B, s.H}, dtype);
  check_tensor(op, w_ih, "w_ih", {4 * s.H, s.I}, dtype);
  check_tensor(op, w_hh, "w_hh", {4 * s.H, s.P}, dtype);
  return s;
}

// The lengths as a pointer (null when not given), after checking them against batch and steps.
inline const int64_t* check_lengths(const char* op, const std::optional<at::Tensor>& lengths,
                                    const Sizes& s) {
  if (!lengths.has_value() || !lengths->defined()) {
    return nullptr;
  }
  TORCH_CHECK(lengths->scalar_type() == at::kLong, op, ": lengths must be int64, got ",
              lengths->scalar_type());
  check_tensor(op, *lengths, "lengths", {s.B}, at::kLong);
  const int64_t* len = lengths->const_data_ptr<int64_t>();
  for (int64_t b = 0; b < s.B; ++b) {
    TORCH_CHECK(len[b] >= 0 && len[b] <= s.T, op, ": lengths[", b, "] = ", len[b],
                " is outside [0, ", s.T, "]");
  }
  return len;
}

}  // namespace fastseq::lstm
