// LSTM recurrence, CUDA persistent kernels: `fastseq::lstm_recurrence_forward` and `_backward`.
//
// The input projection (one GEMM over all steps) and the weight gradients (GEMMs over all steps)
// stay with cuBLAS in fastseq/ops/lstm.py; what cannot be batched over time is the recurrence,
// and that is what these kernels run, the whole sequence in one launch.
//
// Each thread block owns U consecutive hidden units j0 .. j0+U-1 for all batch rows, for the whole
// sequence, and keeps the slice of W_hh it needs in shared memory across all steps: in the forward
// the 4U rows (gates i, f, g, o of its units), in the backward the U columns (dh_{t-1}[j] sums
// d pre over all 4H gate rows). Steps are separated by a grid-wide barrier (cooperative launch),
// so the grid is sized to fit on the device at once: about one block per SM.
//
// Inside a block, warp w takes batch rows w, w + warps, ...; its lanes stride over the reduction
// dimension with coalesced loads of h (or d pre) and conflict-free reads of the shared slice, and
// a butterfly reduction leaves every sum in every lane; lane u then runs the cell of unit j0 + u.
// A (batch, unit) pair is always handled by the same thread, so the carried state it reads back
// from global memory (cells, the dh/dc carries) was written by itself: no barrier needed for it.
// The cell math, the padding rule and the processing order are csrc/cuda/lstm_device.cuh.
//
// The tensor-core kernels of csrc/cuda/lstm_tensor_cores.cuh follow the same plan with the
// per-step product in warp MMAs, for half and bfloat16; which kind runs a call is chosen at the
// end of this file (kTensorCoresByDefault).

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>
#include <torch/library.h>

#include "cuda/lstm_device.cuh"
#include "cuda/lstm_plan.h"
#include "cuda/lstm_tensor_cores.cuh"
#include "cuda/persistent.cuh"

namespace fastseq::lstm {
namespace {

namespace cg = cooperative_groups;
using persistent::all_resident;
using persistent::attributes_of;
using persistent::pick;
using persistent::warp_row_products;

constexpr const char* kOp = "fastseq lstm_recurrence";

template <typename Args>
void launch(void (*kernel)(Args), Args args, int64_t hidden, int units, size_t smem) {
  persistent::launch(kOp, kernel, args, hidden, units, smem);
}

template <typename scalar_t, int U>
__global__ void __launch_bounds__(kThreads) forward_kernel(ForwardArgs<scalar_t> a) {
  extern __shared__ unsigned char smem_bytes[];
  auto* w = reinterpret_cast<scalar_t*>(smem_bytes);  // (4U, H): row gate * U + u
  const Recurrence& r = a.r;
  const int64_t H = r.hidden, B = r.batch;
  const int64_t j0 = int64_t(blockIdx.x) * U;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  for (int64_t idx = threadIdx.x; idx < 4 * U * H; idx += kThreads) {
    const int64_t row = idx / H, k = idx % H, gate = row / U, j = j0 + row % U;
    w[idx] = j < H ? a.w_hh[(gate * H + j) * H + k] : scalar_t(0);
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
    const scalar_t* h_in = a.h_buf + (i % 2) * B * H;
    scalar_t* h_out = a.h_buf + ((i + 1) % 2) * B * H;
    for (int64_t b = warp; b < B; b += kWarps) {
      float acc[4 * U];
      warp_row_products(h_in + b * H, w, H, lane, acc);
      if (!owner) continue;
      float recurrent[4];
#pragma unroll
      for (int gate = 0; gate < 4; ++gate) recurrent[gate] = pick(acc, gate * U + lane);
      forward_unit(a, i, b, j, load_forward_unit(a, i, b, j), recurrent, h_in + b * H,
                   h_out + b * H);
    }
    grid.sync();
  }
}

// dh_{t}[b, j] = sum_r d pre_{t+1}[b, r] W_hh[r, j] for the step processed just before (s), or the
// carried dh when s was padding for row b. Writes it to the dh carry.
template <typename scalar_t, int U>
__device__ void carry_dh(const BackwardArgs<scalar_t>& a, const scalar_t* w, int64_t s, int64_t b,
                         int lane, int64_t j, bool owner) {
  const Recurrence& r = a.r;
  const int64_t H = r.hidden, B = r.batch;
  float acc[U];
  warp_row_products(a.grad_pre + (s * B + b) * 4 * H, w, 4 * H, lane, acc);
  if (owner && is_active(r, b, s)) a.dh[b * H + j] = pick(acc, lane);
}

template <typename scalar_t, int U>
__global__ void __launch_bounds__(kThreads) backward_kernel(BackwardArgs<scalar_t> a) {
  extern __shared__ unsigned char smem_bytes[];
  auto* w = reinterpret_cast<scalar_t*>(smem_bytes);  // (U, 4H): W_hh[:, j0 + u] as row u
  const Recurrence& r = a.r;
  const int64_t H = r.hidden, B = r.batch;
  const int64_t j0 = int64_t(blockIdx.x) * U;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  for (int64_t idx = threadIdx.x; idx < U * 4 * H; idx += kThreads) {
    const int64_t u = idx / (4 * H), k = idx % (4 * H);
    w[idx] = j0 + u < H ? a.w_hh[k * H + j0 + u] : scalar_t(0);
  }
  __syncthreads();

  const int64_t j = j0 + lane;
  const bool owner = lane < U && j < H;
  cg::grid_group grid = cg::this_grid();
  // Backward visits the steps in the reverse of the forward's processing order: i = T-1 .. 0.
  for (int64_t i = r.steps - 1; i >= 0; --i) {
    for (int64_t b = warp; b < B; b += kWarps) {
      if (i < r.steps - 1) carry_dh<scalar_t, U>(a, w, step_at(r, i + 1), b, lane, j, owner);
      if (owner) {
        backward_unit(a, i, b, j, load_backward_unit(a, i, b, j), static_cast<scalar_t*>(nullptr),
                      0);
      }
    }
    grid.sync();
  }
  for (int64_t b = warp; b < B && r.steps > 0; b += kWarps) {
    carry_dh<scalar_t, U>(a, w, step_at(r, 0), b, lane, j, owner);  // dh0
  }
}

// ---------------------------------------------------------------------------------------------
// Launch: pick U, check the whole grid can be resident, launch cooperatively.

void check_inputs(const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
                  const std::optional<at::Tensor>& lengths) {
  TORCH_CHECK(h0.is_contiguous() && c0.is_contiguous() && w_hh.is_contiguous(),
              "fastseq lstm_recurrence: h0, c0 and w_hh must be contiguous");
  TORCH_CHECK(w_hh.size(0) == 4 * w_hh.size(1) && h0.size(1) == w_hh.size(1),
              "fastseq lstm_recurrence: w_hh must be (4H, H) with H = h0.size(1) (no projection)");
  TORCH_CHECK(!lengths || (lengths->scalar_type() == at::kLong && lengths->is_cuda()),
              "fastseq lstm_recurrence: lengths must be int64 on the GPU");
}

int plan_or_fail(int64_t hidden, const at::Tensor& like) {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const int units = plan_units(hidden, like.element_size(), prop->multiProcessorCount,
                               prop->sharedMemPerBlockOptin, prop->sharedMemPerMultiprocessor);
  TORCH_CHECK(units > 0, "fastseq lstm_recurrence: hidden size ", hidden,
              " does not fit on chip for the persistent kernel");
  return units;
}

// ---------------------------------------------------------------------------------------------
// Which kernel runs a call. Half and bfloat16 can run on tensor cores
// (csrc/cuda/lstm_tensor_cores.cuh) wherever their slices and partial products fit on chip with
// every block resident; float32 only on the CUDA-core kernels above. A call may force a kind and
// a block size (`kernel`, `units`: what the lstm_recurrence benchmark compares).

// Whether 'auto' takes the tensor-core kernels where they can run. Off until they have passed the
// GPU tests and beaten the CUDA-core kernels in the lstm_recurrence suite; until then they run
// only when asked for.
constexpr bool kTensorCoresByDefault = false;

template <typename scalar_t>
constexpr bool has_tensor_core_kernels() {
  return std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>;
}

enum class Pass { kForward, kBackward };

struct KernelChoice {
  enum class Kind { kAuto, kTensorCores, kCudaCores } kind;
  int64_t units;  // 0: the plan's
};

// The choice a call asks for, its `units` checked against what that kind and pass take.
KernelChoice parse_choice(c10::string_view kernel, int64_t units, Pass pass) {
  using Kind = KernelChoice::Kind;
  const char* op = pass == Pass::kForward ? "fastseq lstm_recurrence_forward"
                                          : "fastseq lstm_recurrence_backward";
  if (kernel == "auto") {
    TORCH_CHECK(units == 0, op, ": units per block need kernel='tensor_cores' or 'cuda_cores', "
                "got units=", units);
    return {Kind::kAuto, 0};
  }
  if (kernel == "tensor_cores") {
    const bool valid = pass == Pass::kForward
                           ? units == 0 || units == 4 || units == 8 || units == 16
                           : units == 0 || units == tensor_cores::kBackwardUnits;
    TORCH_CHECK(valid, op, ": on tensor cores units must be ",
                pass == Pass::kForward ? "0 (the plan's), 4, 8 or 16" : "0 or 16", ", got ",
                units);
    return {Kind::kTensorCores, units};
  }
  if (kernel == "cuda_cores") {
    TORCH_CHECK(units == 0 || units == 1 || units == 2 || units == 4 || units == 8, op,
                ": on CUDA cores units must be 0 (the plan's), 1, 2, 4 or 8, got ", units);
    return {Kind::kCudaCores, units};
  }
  TORCH_CHECK(false, op, ": kernel must be 'auto', 'tensor_cores' or 'cuda_cores', got '", kernel,
              "'");
}

// Whether this device runs the tensor-core kernels of `dtype`: half or bfloat16, sm_80 or newer,
// and the kernel compiled for it with its MMAs (a build whose arch list stops below sm_80 JITs
// their PTX with the MMAs compiled out). Asked once per kernel and device.
bool tensor_cores_run(at::ScalarType dtype) {
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  if (at::cuda::getCurrentDeviceProperties()->major < 8) return false;
  const void* kernel =
      dtype == at::kHalf ? reinterpret_cast<const void*>(tensor_cores::forward_kernel<at::Half>)
                         : reinterpret_cast<const void*>(tensor_cores::forward_kernel<at::BFloat16>);
  return attributes_of(kernel).ptxVersion >= 80;
}

// A forced tensor-core call on a dtype or device that has none raises (before the early return
// of an empty call too, so that the same call never passes on one input and fails on another).
void check_choice_runs(const KernelChoice& choice, at::ScalarType dtype) {
  TORCH_CHECK(choice.kind != KernelChoice::Kind::kTensorCores || tensor_cores_run(dtype),
              "fastseq lstm_recurrence: kernel='tensor_cores' takes half or bfloat16 on sm_80 or "
              "newer, in a build with sm_80 or newer in its arch list; got ", dtype);
}

// Units per block of the forward on tensor cores: `asked`, or the fewest of 4, 8, 16 (one, two or
// four tiles of gate columns) with which every block is resident; 0 when none is.
template <typename scalar_t>
int forward_tensor_core_units(const Recurrence& r, int64_t asked) {
  const auto kernel = reinterpret_cast<const void*>(tensor_cores::forward_kernel<scalar_t>);
  for (int units = 4; units <= 16; units *= 2) {
    if (asked != 0 && units != asked) continue;
    const TilePlan plan = plan_tiles(r.batch, 4 * units, round_up(r.hidden, kTile));
    if (all_resident(kernel, plan.shared_bytes(), (r.hidden + units - 1) / units)) return units;
  }
  return 0;
}

// The backward on tensor cores has 16 units per block: whether every block is resident.
template <typename scalar_t>
bool backward_fits_tensor_cores(const Recurrence& r) {
  constexpr int64_t units = tensor_cores::kBackwardUnits;
  const TilePlan plan = plan_tiles(r.batch, units, 4 * round_up(r.hidden, kTile));
  return all_resident(reinterpret_cast<const void*>(tensor_cores::backward_kernel<scalar_t>),
                      plan.shared_bytes(), (r.hidden + units - 1) / units);
}

// Whether the tensor-core kernels are a candidate for the call: forced, or 'auto' with
// kTensorCoresByDefault where they run.
bool considers_tensor_cores(const KernelChoice& choice, at::ScalarType dtype) {
  return choice.kind == KernelChoice::Kind::kTensorCores ||
         (choice.kind == KernelChoice::Kind::kAuto && kTensorCoresByDefault &&
          tensor_cores_run(dtype));
}

// Whether a candidate call runs on tensor cores: where `fits`; a forced call that does not fit
// raises.
bool takes_tensor_cores(const KernelChoice& choice, at::ScalarType dtype, bool fits) {
  if (choice.kind == KernelChoice::Kind::kTensorCores) {
    TORCH_CHECK(fits, "fastseq lstm_recurrence: on tensor cores, ",
                choice.units == 0 ? std::string("no block size") :
                                    "units=" + std::to_string(choice.units),
                " keeps every block resident (shared memory, registers) for this batch and "
                "hidden size");
    return true;
  }
  return considers_tensor_cores(choice, dtype) && fits;
}

template <typename scalar_t>
void forward_on_tensor_cores(ForwardArgs<scalar_t> io, const at::TensorOptions& options,
                             int units) {
  const Recurrence& r = io.r;
  const TilePlan plan = plan_tiles(r.batch, 4 * units, round_up(r.hidden, kTile));
  const auto h_buf = at::empty({2, plan.rows, plan.depth}, options);  // padded
  io.h_buf = h_buf.data_ptr<scalar_t>();
  launch(tensor_cores::forward_kernel<scalar_t>, tensor_cores::Forward<scalar_t>{io, plan, units},
         r.hidden, units, plan.shared_bytes());
}

template <typename scalar_t>
void backward_on_tensor_cores(const BackwardArgs<scalar_t>& io, const at::TensorOptions& options) {
  const Recurrence& r = io.r;
  const int units = tensor_cores::kBackwardUnits;
  const TilePlan plan = plan_tiles(r.batch, units, 4 * round_up(r.hidden, kTile));
  const auto dpre_buf = at::empty({2, plan.rows, plan.depth}, options);
  launch(tensor_cores::backward_kernel<scalar_t>,
         tensor_cores::Backward<scalar_t>{io, plan, dpre_buf.data_ptr<scalar_t>()}, r.hidden,
         units, plan.shared_bytes());
}

// Units per block of the CUDA-core kernels: `asked`, checked to keep every block resident, or
// the plan's.
int cuda_core_units(int64_t hidden, const at::Tensor& like, int64_t asked) {
  if (asked == 0) return plan_or_fail(hidden, like);
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(units_fit(asked, hidden, like.element_size(), prop->multiProcessorCount,
                        prop->sharedMemPerBlockOptin, prop->sharedMemPerMultiprocessor),
              "fastseq lstm_recurrence: on CUDA cores, units=", asked, " does not keep every "
              "block resident (shared memory, blocks per SM) for hidden size ", hidden);
  return static_cast<int>(asked);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& pre_x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& lengths, bool reverse, c10::string_view kernel,
    int64_t units) {
  const KernelChoice choice = parse_choice(kernel, units, Pass::kForward);
  check_inputs(h0, c0, w_hh, lengths);
  TORCH_CHECK(pre_x.is_contiguous() && pre_x.dim() == 3, "fastseq lstm_recurrence: pre_x (T, B, 4H)");
  c10::cuda::CUDAGuard guard(pre_x.device());
  check_choice_runs(choice, pre_x.scalar_type());
  const int64_t T = pre_x.size(0), B = pre_x.size(1), H = h0.size(1);
  auto y = at::empty({T, B, H}, pre_x.options());
  auto gates = at::empty({T, B, 4 * H}, pre_x.options());
  auto cells = at::empty({T, B, H}, pre_x.options().dtype(at::kFloat));
  if (T == 0 || B == 0) return {y, h0.clone(), c0.clone(), gates, cells};
  // The kernel's last step writes h_n and c_n: no copies after it (a launch each on the GPU).
  auto h_n = at::empty({B, H}, pre_x.options());
  auto c_n = at::empty({B, H}, c0.options());
  const Recurrence r{T, B, H, reverse, lengths ? lengths->data_ptr<int64_t>() : nullptr};
  FASTSEQ_DISPATCH_PERSISTENT_TYPES(pre_x.scalar_type(), "lstm_forward", [&] {
    ForwardArgs<scalar_t> io{r, pre_x.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(),
                             c0.data_ptr<scalar_t>(), w_hh.data_ptr<scalar_t>(),
                             y.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(),
                             cells.data_ptr<float>(), /*h_buf=*/nullptr,
                             h_n.data_ptr<scalar_t>(), c_n.data_ptr<scalar_t>()};
    if constexpr (has_tensor_core_kernels<scalar_t>()) {
      const int tc_units = considers_tensor_cores(choice, pre_x.scalar_type())
                               ? forward_tensor_core_units<scalar_t>(r, choice.units)
                               : 0;
      if (takes_tensor_cores(choice, pre_x.scalar_type(), tc_units > 0)) {
        return forward_on_tensor_cores(io, pre_x.options(), tc_units);
      }
    }
    const int cc_units = cuda_core_units(H, pre_x, choice.units);
    const auto h_buf = at::empty({2, B, H}, pre_x.options());
    io.h_buf = h_buf.data_ptr<scalar_t>();
    const size_t smem = size_t(4) * cc_units * H * sizeof(scalar_t);
    persistent::with_units<8>(kOp, cc_units, [&](auto u) {
      launch(forward_kernel<scalar_t, decltype(u)::value>, io, H, cc_units, smem);
    });
  });
  return {y, h_n, c_n, gates, cells};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& c0, const at::Tensor& w_hh, const std::optional<at::Tensor>& lengths,
    bool reverse, const at::Tensor& gates, const at::Tensor& cells, c10::string_view kernel,
    int64_t units) {
  const KernelChoice choice = parse_choice(kernel, units, Pass::kBackward);
  check_inputs(grad_h_n, c0, w_hh, lengths);
  TORCH_CHECK(grad_y.is_contiguous() && grad_c_n.is_contiguous() && gates.is_contiguous() &&
                  cells.is_contiguous() && cells.scalar_type() == at::kFloat,
              "fastseq lstm_recurrence_backward: grad_y, grad_c_n, gates and float32 cells, "
              "contiguous");
  c10::cuda::CUDAGuard guard(grad_y.device());
  check_choice_runs(choice, gates.scalar_type());
  const int64_t T = grad_y.size(0), B = grad_y.size(1), H = c0.size(1);
  auto grad_pre = at::empty({T, B, 4 * H}, gates.options());
  auto dh = grad_h_n.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
  auto dc = grad_c_n.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
  if (T > 0 && B > 0) {
    const Recurrence r{T, B, H, reverse, lengths ? lengths->data_ptr<int64_t>() : nullptr};
    FASTSEQ_DISPATCH_PERSISTENT_TYPES(gates.scalar_type(), "lstm_backward", [&] {
      const BackwardArgs<scalar_t> io{r, grad_y.data_ptr<scalar_t>(), c0.data_ptr<scalar_t>(),
                                      w_hh.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(),
                                      cells.data_ptr<float>(), grad_pre.data_ptr<scalar_t>(),
                                      dh.data_ptr<float>(), dc.data_ptr<float>()};
      if constexpr (has_tensor_core_kernels<scalar_t>()) {
        const bool fits = considers_tensor_cores(choice, gates.scalar_type()) &&
                          backward_fits_tensor_cores<scalar_t>(r);
        if (takes_tensor_cores(choice, gates.scalar_type(), fits)) {
          return backward_on_tensor_cores(io, gates.options());
        }
      }
      const int cc_units = cuda_core_units(H, gates, choice.units);
      const size_t smem = size_t(4) * cc_units * H * sizeof(scalar_t);
      persistent::with_units<8>(kOp, cc_units, [&](auto u) {
        launch(backward_kernel<scalar_t, decltype(u)::value>, io, H, cc_units, smem);
      });
    });
  }
  return {grad_pre, dh.to(grad_h_n.scalar_type()), dc.to(grad_c_n.scalar_type())};
}

}  // namespace
}  // namespace fastseq::lstm

TORCH_LIBRARY_IMPL(fastseq, CUDA, m) {
  m.impl("lstm_recurrence_forward", &fastseq::lstm::forward);
  m.impl("lstm_recurrence_backward", &fastseq::lstm::backward);
}
