// Elman RNN recurrence, CUDA persistent kernels: `fastseq::rnn_recurrence_forward` and `_backward`.
//
// The LSTM's plan (csrc/cuda/lstm.cu) with one gate: the input projection and the weight gradients
// are cuBLAS GEMMs over all steps (fastseq/ops/rnn.py), and the recurrence runs in one cooperative
// launch. Each thread block owns U consecutive hidden units for all batch rows and the whole
// sequence, and keeps its slice of W_hh in shared memory across the steps: in the forward its U
// rows (h_t[j] = act(pre_x[j] + sum_k h_{t-1}[k] W_hh[j, k])), in the backward its U columns
// (dh_{t-1}[j] = sum_r d pre_t[r] W_hh[r, j]). Steps are separated by a grid-wide barrier.
//
// Inside a block, warp w takes batch rows w, w + warps, ...; its lanes stride over the reduction
// dimension, a butterfly reduction leaves every sum in every lane, and lane u finishes unit j0 + u.
// A (batch, unit) pair is always handled by the same thread, so the dh carry it reads back from
// global memory was written by itself.
//
// Padding (`lengths`): step t is padding for row b when t >= lengths[b]; there the state is carried
// unchanged, y and d pre are zero, and dh passes through. The reverse direction walks t = T-1 .. 0.
// Numerics: float math, h stored in the input dtype (as torch.nn.RNN), the dh carry in float32.

#include <cstdint>
#include <string>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>
#include <torch/library.h>

#include "cuda/lstm_plan.h"
#include "cuda/persistent.cuh"

namespace fastseq::rnn {
namespace {

namespace cg = cooperative_groups;
using lstm::kMaxBlocksPerSM;
using lstm::kThreads;
using lstm::kWarps;
using persistent::pick;
using persistent::warp_row_products;

constexpr const char* kOp = "fastseq rnn_recurrence";

struct Recurrence {
  int64_t steps, batch, hidden;
  bool reverse, relu;
  const int64_t* lengths;  // (B,) or nullptr
};

__device__ __forceinline__ bool is_active(const Recurrence& r, int64_t b, int64_t t) {
  return r.lengths == nullptr || t < r.lengths[b];
}

// The t of the i-th step in processing order.
__device__ __forceinline__ int64_t step_at(const Recurrence& r, int64_t i) {
  return r.reverse ? r.steps - 1 - i : i;
}

template <typename scalar_t>
struct ForwardArgs {
  Recurrence r;
  const scalar_t* pre_x;  // (T, B, H): x W_ih^T + bias
  const scalar_t* h0;     // (B, H)
  const scalar_t* w_hh;   // (H, H)
  scalar_t* y;            // (T, B, H)
  scalar_t* h_buf;        // h before / after the current step: two planes (B, H)
  scalar_t* h_n;          // (B, H), written by the last step
};

template <typename scalar_t>
struct BackwardArgs {
  Recurrence r;
  const scalar_t* grad_y;  // (T, B, H)
  const scalar_t* y;       // (T, B, H)
  const scalar_t* w_hh;    // (H, H)
  scalar_t* grad_pre;      // (T, B, H)
  float* dh;               // (B, H): dh carried into the current step, grad_h_n at first
};

template <typename scalar_t, int U>
__global__ void __launch_bounds__(kThreads, kMaxBlocksPerSM) forward_kernel(ForwardArgs<scalar_t> a) {
  extern __shared__ unsigned char smem_bytes[];
  auto* w = reinterpret_cast<scalar_t*>(smem_bytes);  // (U, H): W_hh[j0 + u, :] as row u
  const Recurrence& r = a.r;
  const int64_t H = r.hidden, B = r.batch;
  const int64_t j0 = int64_t(blockIdx.x) * U;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  for (int64_t idx = threadIdx.x; idx < U * H; idx += kThreads) {
    const int64_t u = idx / H, k = idx % H;
    w[idx] = j0 + u < H ? a.w_hh[(j0 + u) * H + k] : scalar_t(0);
  }
  for (int64_t idx = int64_t(blockIdx.x) * kThreads + threadIdx.x; idx < B * H;
       idx += int64_t(gridDim.x) * kThreads) {
    a.h_buf[idx] = a.h0[idx];
  }
  cg::grid_group grid = cg::this_grid();
  grid.sync();

  const int64_t j = j0 + lane;
  const bool owner = lane < U && j < H;
  for (int64_t i = 0; i < r.steps; ++i) {
    const int64_t t = step_at(r, i);
    const scalar_t* h_in = a.h_buf + (i % 2) * B * H;
    scalar_t* h_out = a.h_buf + ((i + 1) % 2) * B * H;
    for (int64_t b = warp; b < B; b += kWarps) {
      const int64_t row = t * B + b;
      // Issued before the product so that its latency hides behind it.
      const float pre_x = owner ? static_cast<float>(a.pre_x[row * H + j]) : 0.f;
      float acc[U];
      warp_row_products(h_in + b * H, w, H, lane, acc);
      if (!owner) continue;
      const bool active = is_active(r, b, t);
      scalar_t h = h_in[b * H + j];
      if (active) {
        const float pre = pick(acc, lane) + pre_x;
        h = static_cast<scalar_t>(r.relu ? (pre < 0.f ? 0.f : pre) : tanhf(pre));
      }
      h_out[b * H + j] = h;
      a.y[row * H + j] = active ? h : scalar_t(0.f);
      if (i == r.steps - 1) a.h_n[b * H + j] = h;
    }
    grid.sync();
  }
}

// dh[b, j] = sum_r d pre_s[b, r] W_hh[r, j] where step s (processed just after the current one in
// the forward) is real for row b; left as it is where s was padding.
template <typename scalar_t, int U>
__device__ void carry_dh(const BackwardArgs<scalar_t>& a, const scalar_t* w, int64_t s, int64_t b,
                         int lane, int64_t j, bool owner) {
  const Recurrence& r = a.r;
  const int64_t H = r.hidden, B = r.batch;
  float acc[U];
  warp_row_products(a.grad_pre + (s * B + b) * H, w, H, lane, acc);
  if (owner && is_active(r, b, s)) a.dh[b * H + j] = pick(acc, lane);
}

template <typename scalar_t, int U>
__global__ void __launch_bounds__(kThreads, kMaxBlocksPerSM) backward_kernel(BackwardArgs<scalar_t> a) {
  extern __shared__ unsigned char smem_bytes[];
  auto* w = reinterpret_cast<scalar_t*>(smem_bytes);  // (U, H): W_hh[:, j0 + u] as row u
  const Recurrence& r = a.r;
  const int64_t H = r.hidden, B = r.batch;
  const int64_t j0 = int64_t(blockIdx.x) * U;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  for (int64_t idx = threadIdx.x; idx < U * H; idx += kThreads) {
    const int64_t u = idx / H, k = idx % H;
    w[idx] = j0 + u < H ? a.w_hh[k * H + j0 + u] : scalar_t(0);
  }
  __syncthreads();

  const int64_t j = j0 + lane;
  const bool owner = lane < U && j < H;
  cg::grid_group grid = cg::this_grid();
  // Backward visits the steps in the reverse of the forward's processing order: i = T-1 .. 0.
  for (int64_t i = r.steps - 1; i >= 0; --i) {
    const int64_t t = step_at(r, i);
    for (int64_t b = warp; b < B; b += kWarps) {
      if (i < r.steps - 1) carry_dh<scalar_t, U>(a, w, step_at(r, i + 1), b, lane, j, owner);
      if (!owner) continue;
      const int64_t at = (t * B + b) * H + j;
      float dpre = 0.f;
      if (is_active(r, b, t)) {
        const float g = a.dh[b * H + j] + static_cast<float>(a.grad_y[at]);
        const float y = static_cast<float>(a.y[at]);
        dpre = r.relu ? (y > 0.f ? g : 0.f) : g * (1.f - y * y);
      }
      a.grad_pre[at] = static_cast<scalar_t>(dpre);
    }
    grid.sync();
  }
  for (int64_t b = warp; b < B && r.steps > 0; b += kWarps) {
    carry_dh<scalar_t, U>(a, w, step_at(r, 0), b, lane, j, owner);  // dh0
  }
}

// ---------------------------------------------------------------------------------------------
// Launch.

template <typename Args>
void launch(void (*kernel)(Args), Args args, int64_t hidden, int units, size_t smem) {
  persistent::launch(kOp, kernel, args, hidden, units, smem);
}

bool is_relu(c10::string_view nonlinearity) {
  TORCH_CHECK(nonlinearity == "tanh" || nonlinearity == "relu", kOp,
              ": nonlinearity must be 'tanh' or 'relu', got '", std::string(nonlinearity), "'");
  return nonlinearity == "relu";
}

// A (B, H) state like the rows of a (T, B, H) sequence, on its device and in its dtype.
bool state_like(const at::Tensor& state, const at::Tensor& sequence) {
  return state.dim() == 2 && state.size(0) == sequence.size(1) &&
         state.size(1) == sequence.size(2) && state.is_contiguous() &&
         state.scalar_type() == sequence.scalar_type() && state.device() == sequence.device();
}

// w_hh (H, H) and lengths (B,) for a (T, B, H) sequence on its device.
void check_weights(const at::Tensor& w_hh, const at::Tensor& sequence,
                   const std::optional<at::Tensor>& lengths) {
  const int64_t H = sequence.size(2);
  TORCH_CHECK(w_hh.is_contiguous() && w_hh.dim() == 2 && w_hh.size(0) == H && w_hh.size(1) == H &&
                  w_hh.scalar_type() == sequence.scalar_type() &&
                  w_hh.device() == sequence.device(),
              kOp, ": w_hh must be contiguous (H, H) with H = ", H, " on the sequence's device and "
              "in its dtype, got ", w_hh.sizes());
  TORCH_CHECK(!lengths || (lengths->scalar_type() == at::kLong && lengths->is_contiguous() &&
                           lengths->numel() == sequence.size(1) &&
                           lengths->device() == sequence.device()),
              kOp, ": lengths must be B = ", sequence.size(1), " contiguous int64 on the sequence's "
              "device");
}

int plan_or_fail(int64_t hidden, const at::Tensor& like) {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const int units = lstm::plan_rnn_units(hidden, like.element_size(), prop->multiProcessorCount,
                                         prop->sharedMemPerBlockOptin,
                                         prop->sharedMemPerMultiprocessor);
  TORCH_CHECK(units > 0, kOp, ": hidden size ", hidden,
              " does not fit on chip for the persistent kernel");
  return units;
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& pre_x, const at::Tensor& h0,
                                           const at::Tensor& w_hh,
                                           const std::optional<at::Tensor>& lengths, bool reverse,
                                           c10::string_view nonlinearity) {
  const bool relu = is_relu(nonlinearity);
  TORCH_CHECK(pre_x.dim() == 3 && pre_x.is_contiguous() && pre_x.is_cuda() &&
                  state_like(h0, pre_x),
              kOp, ": pre_x (T, B, H) and h0 (B, H), contiguous, of one dtype on one GPU");
  const int64_t T = pre_x.size(0), B = pre_x.size(1), H = pre_x.size(2);
  check_weights(w_hh, pre_x, lengths);
  c10::cuda::CUDAGuard guard(pre_x.device());
  auto y = at::empty({T, B, H}, pre_x.options());
  if (T == 0 || B == 0 || H == 0) return {y, h0.clone()};  // no grid to launch
  auto h_n = at::empty({B, H}, pre_x.options());
  const auto h_buf = at::empty({2, B, H}, pre_x.options());
  const Recurrence r{T, B, H, reverse, relu, lengths ? lengths->data_ptr<int64_t>() : nullptr};
  const int units = plan_or_fail(H, pre_x);
  FASTSEQ_DISPATCH_PERSISTENT_TYPES(pre_x.scalar_type(), "rnn_forward", [&] {
    const ForwardArgs<scalar_t> io{r, pre_x.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(),
                                   w_hh.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                   h_buf.data_ptr<scalar_t>(), h_n.data_ptr<scalar_t>()};
    const size_t smem = size_t(units) * H * sizeof(scalar_t);
    persistent::with_units<32>(kOp, units, [&](auto u) {
      launch(forward_kernel<scalar_t, decltype(u)::value>, io, H, units, smem);
    });
  });
  return {y, h_n};
}

std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_y, const at::Tensor& grad_h_n,
                                            const at::Tensor& w_hh, const at::Tensor& y,
                                            const std::optional<at::Tensor>& lengths, bool reverse,
                                            c10::string_view nonlinearity) {
  const bool relu = is_relu(nonlinearity);
  TORCH_CHECK(y.dim() == 3 && y.is_contiguous() && y.is_cuda() && grad_y.is_contiguous() &&
                  grad_y.sizes() == y.sizes() && grad_y.scalar_type() == y.scalar_type() &&
                  grad_y.device() == y.device() && state_like(grad_h_n, y),
              kOp, ": grad_y and y (T, B, H), grad_h_n (B, H), contiguous, of one dtype on one GPU");
  const int64_t T = y.size(0), B = y.size(1), H = y.size(2);
  check_weights(w_hh, y, lengths);
  c10::cuda::CUDAGuard guard(y.device());
  auto grad_pre = at::empty({T, B, H}, y.options());
  auto dh = grad_h_n.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
  if (T > 0 && B > 0 && H > 0) {
    const Recurrence r{T, B, H, reverse, relu, lengths ? lengths->data_ptr<int64_t>() : nullptr};
    const int units = plan_or_fail(H, y);
    FASTSEQ_DISPATCH_PERSISTENT_TYPES(y.scalar_type(), "rnn_backward", [&] {
      const BackwardArgs<scalar_t> io{r, grad_y.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                      w_hh.data_ptr<scalar_t>(), grad_pre.data_ptr<scalar_t>(),
                                      dh.data_ptr<float>()};
      const size_t smem = size_t(units) * H * sizeof(scalar_t);
      persistent::with_units<32>(kOp, units, [&](auto u) {
        launch(backward_kernel<scalar_t, decltype(u)::value>, io, H, units, smem);
      });
    });
  }
  return {grad_pre, dh.to(grad_h_n.scalar_type())};
}

}  // namespace
}  // namespace fastseq::rnn

TORCH_LIBRARY_IMPL(fastseq, CUDA, m) {
  m.impl("rnn_recurrence_forward", &fastseq::rnn::forward);
  m.impl("rnn_recurrence_backward", &fastseq::rnn::backward);
}
