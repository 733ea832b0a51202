// `linear(a, w, bias)` = a w^T (+ bias) for CPU float32 through oneDNN, where torch has it.
//
// ATen's fp32 `mm` goes to MKL, which on AMD CPUs runs its AVX2 code: about half of what the
// AVX-512 units give (measured on a Zen 5 EPYC: 200 GFLOP/s for mm, 450 through oneDNN on the
// same product). torch carries oneDNN and exposes its matmul as the op
// `mkldnn::_linear_pointwise`, the one inductor's CPU fusions call; it takes strided operands,
// so transposed views cost no copy. Where the op is missing (a torch built without oneDNN) or
// oneDNN is switched off (`torch.backends.mkldnn.enabled = False`), ATen's GEMM does the work.
// So it does for small products: a oneDNN call costs about 11 us before any arithmetic (finding
// its primitive), ATen's about 1; they cross near 1 MFLOP (same machine: 1 x 32 by 32 x 128,
// 13 against 2 us; 8 x 128 by 128 x 512, 17 against 11; 4 x 256 by 256 x 1024, 26 against 42;
// 2 x 256 by 256 x 1024, 26 against 28).
#pragma once

#include <optional>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

namespace fastseq::cpu {

inline const std::optional<c10::OperatorHandle>& onednn_linear_op() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
  return op;
}

// Multiply-adds (M N K) up to which a product stays with ATen: 2^19, 1 MFLOP.
constexpr int64_t kAtenUpTo = int64_t(1) << 19;

// a (M, K), w (N, K), bias (N) or none; any strides. Returns a new contiguous (M, N).
inline at::Tensor linear(const at::Tensor& a, const at::Tensor& w,
                         const std::optional<at::Tensor>& bias = std::nullopt) {
  const auto& op = onednn_linear_op();
  const bool onednn = op.has_value() && a.scalar_type() == at::kFloat &&
                      at::globalContext().userEnabledMkldnn() && a.numel() > 0 && w.numel() > 0 &&
                      a.numel() * w.size(0) > kAtenUpTo;
  if (!onednn) {
    return bias.has_value() ? at::addmm(*bias, a, w.t()) : at::mm(a, w.t());
  }
  torch::jit::Stack stack{c10::IValue(a), c10::IValue(w), c10::IValue(bias),
                          c10::IValue(std::string("none")),
                          c10::IValue(c10::List<std::optional<c10::Scalar>>()), c10::IValue()};
  op->callBoxed(stack);
  return stack[0].toTensor().contiguous();  // a no-op unless `a` was strided
}

}  // namespace fastseq::cpu
