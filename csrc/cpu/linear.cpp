// `fastseq::linear` on the CPU: x (..., K) w^T (+ bias) through csrc/cpu/linear.h.
//
// The op exists for products of a few rows, a decoding step's matrix-vector products above all:
// there ATen's fp32 GEMM (MKL, or oneDNN with its fixed cost per call) reads W at a fraction of
// the memory bandwidth, while the unpacked AVX-512 kernels stream it at close to a copy's speed.
// Larger products go to oneDNN or ATen as linear.h decides.
//
// Its autograd is registered here, in C++, not in Python: a decoding step makes some thirty of
// these calls, and a Python autograd kernel would add a few microseconds to each, gradient or not.

#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "linear.h"

namespace fastseq::cpu {

at::Tensor linear_op(const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2 && x.size(-1) == weight.size(1),
              "fastseq.linear: x (..., K) and weight (N, K) must agree on K, got x ", x.sizes(),
              " and weight ", weight.sizes());
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = weight.size(0);
  const int64_t M = c10::multiply_integers(sizes.begin(), sizes.end() - 1);
  if (M == 0 || x.size(-1) == 0) {  // no rows, or an empty sum: the bias (or zeros) per row
    at::Tensor out = at::zeros(sizes, x.options());
    return bias.has_value() ? out.add_(*bias) : out;
  }
  const at::Tensor rows = x.reshape({M, x.size(-1)});
  // A few rows read W once per 4 of them, from cache after the first: still bound by streaming W.
  if (rows.size(0) <= kFewRows) {
    at::Tensor out = at::empty({rows.size(0), weight.size(0)}, x.options());
    if (small_linear_into(out, rows, weight, bias)) {
      return out.view(sizes);
    }
  }
  return fastseq::cpu::linear(rows, weight, bias).view(sizes);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The gradient of y = x w^T + b: dx = dy w, dw = dy^T x, db = the column sums of dy.
class LinearFunction : public torch::autograd::Function<LinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fastseq::linear", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                                 const std::optional<at::Tensor>&)>();
    ctx->save_for_backward({x, weight});
    ctx->saved_data["has_bias"] = bias.has_value();
    return op.call(x, weight, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor grad = grads[0].reshape({-1, grads[0].size(-1)});
    at::Tensor grad_x, grad_weight, grad_bias;
    if (ctx->needs_input_grad(0)) {
      grad_x = grads[0].matmul(weight);
    }
    if (ctx->needs_input_grad(1)) {
      grad_weight = grad.t().mm(x.reshape({-1, x.size(-1)}));
    }
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) {
      grad_bias = grad.sum(0);
    }
    return {grad_x, grad_weight, grad_bias};
  }
};

at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias) {
  return LinearFunction::apply(x, weight, bias);
}

}  // namespace

}  // namespace fastseq::cpu

TORCH_LIBRARY_IMPL(fastseq, CPU, m) {
  m.impl("linear", &fastseq::cpu::linear_op);
}

TORCH_LIBRARY_IMPL(fastseq, Autograd, m) {
  m.impl("linear", &fastseq::cpu::linear_autograd);
}
