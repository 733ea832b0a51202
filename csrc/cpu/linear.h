// `linear(a, w, bias)` = a w^T (+ bias) on the CPU, by size: small float32 products on AVX-512
// in csrc/cpu/small_gemm_avx512.h, larger ones through oneDNN where torch has it, the rest
// through ATen.
//
// ATen's fp32 `mm` goes to MKL, which on AMD CPUs runs its AVX2 code: about half of what the
// AVX-512 units give. torch carries oneDNN and exposes its matmul as the op
// `mkldnn::_linear_pointwise`, the one inductor's CPU fusions call; it takes strided operands,
// so transposed views cost no copy. Where the op is missing (a torch built without oneDNN) or
// oneDNN is switched off (`torch.backends.mkldnn.enabled = False`), ATen's GEMM does the work.
// A oneDNN call has a fixed cost before any arithmetic (finding its primitive), and both run small
// products slowly; the unpacked kernels run those with neither cost, up to kSmallUpTo
// multiply-adds.
#pragma once

#include <optional>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include "lstm_common.h"
#include "small_gemm_avx512.h"

namespace fastseq::cpu {

inline const std::optional<c10::OperatorHandle>& onednn_linear_op() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
  return op;
}

// Multiply-adds (M N K) up to which a product stays with the unpacked kernels, or where they
// cannot run, with ATen: 2^19, 1 MFLOP.
constexpr int64_t kSmallUpTo = int64_t(1) << 19;

// Whether an M x K by K x N product goes to the unpacked kernels (where they can run): a small
// one, or one of at most a tile's 4 rows, which reads W once (a decoding step's matrix-vector
// products) and is bound by memory, not by the blocking that a library's packing buys.
inline bool small_product(int64_t M, int64_t N, int64_t K) {
  return M * N * K <= kSmallUpTo || M <= 4;
}

// Rows up to which a product skips oneDNN for ATen's GEMM: a step of a few sequences (an LSTMCell
// call, a decoding step) reads W once, and oneDNN's fixed cost per call (it reorders W) is most of
// its time there.
constexpr int64_t kFewRows = 16;

// Depth up to which a product in the broadcast form (W^T's rows contiguous) goes to the unpacked
// kernels too: an outer product of a few rows (weight gradients of one decoding step) is bound by
// writing C, which that form writes once.
constexpr int64_t kOuterUpTo = 4;

// Whether a product in the broadcast form goes to the unpacked kernels: the callers that choose
// their operands' layout (the weight gradients) ask this first.
inline bool small_broadcast_product(int64_t M, int64_t N, int64_t K) {
  return small_product(M, N, K) || K <= kOuterUpTo;
}

// c = a w^T (+ bias) (+ c when `accumulate`) by the unpacked AVX-512 kernels, c (M, N) with
// unit column stride; false (c untouched) where they cannot take the operands: float32 on an
// AVX-512 CPU, w with unit stride along N (the broadcast form) or both with unit stride along K
// (the dot form).
inline bool small_linear_into(const at::Tensor& c, const at::Tensor& a, const at::Tensor& w,
                              const std::optional<at::Tensor>& bias = std::nullopt,
                              bool accumulate = false) {
#ifdef FASTSEQ_SMALL_GEMM_AVX512
  const int64_t M = a.size(0), K = a.size(1), N = w.size(0);
  const bool floats = a.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat &&
                      c.scalar_type() == at::kFloat &&
                      (!bias.has_value() || bias->scalar_type() == at::kFloat);
  const bool broadcast = w.stride(0) == 1 || N == 1;
  const bool dot = (a.stride(1) == 1 && w.stride(1) == 1) || K == 1;
  if (!floats || !lstm::cpu_has_avx512() || (!broadcast && !dot) ||
      (c.stride(1) != 1 && N > 1)) {
    return false;
  }
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const avx512::Output out{c.data_ptr<float>(), c.stride(0),
                           b.defined() ? b.const_data_ptr<float>() : nullptr, accumulate};
  const float* ap = a.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  // Columns in blocks of the tile's width, split between threads when there is enough work.
  const int64_t width = broadcast ? 64 : 4;
  const int64_t blocks = (N + width - 1) / width;
  at::parallel_for(0, blocks, lstm::grain_for(2 * M * K * width), [&](int64_t v0, int64_t v1) {
    const int64_t n0 = v0 * width, n1 = std::min(N, v1 * width);
    if (broadcast) {
      avx512::broadcast_gemm(M, K, ap, a.stride(0), a.stride(1), wp, w.stride(1), out, n0, n1);
    } else {
      avx512::dot_gemm(M, K, ap, a.stride(0), wp, w.stride(0), out, n0, n1);
    }
  });
  return true;
#else
  return false;
#endif
}

// out = a w^T, or out += a w^T when `accumulate`, for a product inside a loop (per step), where
// oneDNN's call cost would dominate: the unpacked kernels where they can take it, else ATen.
inline void linear_into(at::Tensor out, const at::Tensor& a, const at::Tensor& w,
                        bool accumulate = false) {
  if (small_linear_into(out, a, w, std::nullopt, accumulate)) {
    return;
  }
  if (accumulate) {
    out.addmm_(a, w.t());
  } else {
    at::mm_out(out, a, w.t());
  }
}

// a (M, K), w (N, K), bias (N) or none; any strides. Returns a new contiguous (M, N).
inline at::Tensor linear(const at::Tensor& a, const at::Tensor& w,
                         const std::optional<at::Tensor>& bias = std::nullopt) {
  const int64_t M = a.size(0), N = w.size(0), K = a.size(1);
  const bool small = w.stride(0) == 1 ? small_broadcast_product(M, N, K) : small_product(M, N, K);
  if (small) {
    at::Tensor c = at::empty({M, N}, a.options());
    if (small_linear_into(c, a, w, bias)) {
      return c;
    }
  }
  const auto& op = onednn_linear_op();
  if (small || M <= kFewRows || !op.has_value() || a.scalar_type() != at::kFloat ||
      !at::globalContext().userEnabledMkldnn()) {
    return bias.has_value() ? at::addmm(*bias, a, w.t()) : at::mm(a, w.t());
  }
  torch::jit::Stack stack{c10::IValue(a), c10::IValue(w), c10::IValue(bias),
                          c10::IValue(std::string("none")),
                          c10::IValue(c10::List<std::optional<c10::Scalar>>()), c10::IValue()};
  op->callBoxed(stack);
  return stack[0].toTensor().contiguous();  // a no-op unless `a` was strided
}

}  // namespace fastseq::cpu
