// Rotary positional embedding, CUDA kernel of `fastseq::rotary_kernel`.
//
// A memory-bound elementwise kernel. Each thread block owns a group of consecutive (b, n) tokens
// and its threads walk the group's work items: (token, head of q then of k, unit), where a unit is
// one rotated pair or, out of place, one pass-through column. Consecutive threads take consecutive
// pairs of a head, so NeoX loads are coalesced. Math in opmath (float for half/bfloat16), int64
// index math throughout.

#include <algorithm>
#include <cstdint>
#include <limits>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "rotary_args.h"

namespace fastseq::rotary {
namespace {

constexpr int kThreads = 256;
// Work items per thread in a block, so that small heads still give each block enough work.
constexpr int64_t kItemsPerThread = 4;

// Units of one head: its R/2 pairs, then (out of place only) its D - R pass-through columns.
C10_HOST_DEVICE inline int64_t units_per_head(const Params& p, const Operand& op) {
  return p.rotary_dim / 2 + (op.inplace ? 0 : p.head_dim - p.rotary_dim);
}

C10_HOST_DEVICE inline int64_t items_per_token(const Params& p) {
  return p.q.heads * units_per_head(p, p.q) + p.k.heads * units_per_head(p, p.k);
}

template <typename scalar_t, typename table_t>
__device__ void rotate_unit(const Params& p, const Operand& op, int64_t b, int64_t n, int64_t item) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t units = units_per_head(p, op);
  const int64_t h = item / units;
  const int64_t u = item % units;
  const int64_t* xs = op.x_stride;
  const int64_t* os = op.out_stride;
  const auto* x = static_cast<const scalar_t*>(op.x) + b * xs[0] + n * xs[1] + h * xs[2];
  auto* out = static_cast<scalar_t*>(op.out) + b * os[0] + n * os[1] + h * os[2];

  const int64_t half = p.rotary_dim / 2;
  if (u >= half) {
    const int64_t d = p.rotary_dim + (u - half);
    out[d * os[3]] = x[d * xs[3]];
    return;
  }

  const int64_t pos = token_position(p, b, n);
  const auto* cos = static_cast<const table_t*>(p.cos) + b * p.cos_stride[0] + pos * p.cos_stride[1];
  const auto* sin = static_cast<const table_t*>(p.sin) + b * p.sin_stride[0] + pos * p.sin_stride[1];
  int64_t w1, w2, d1, d2;
  table_columns(p, u, w1, w2);
  pair_columns(p, u, d1, d2);
  const auto c1 = static_cast<acc_t>(cos[w1 * p.cos_stride[2]]);
  const auto c2 = static_cast<acc_t>(cos[w2 * p.cos_stride[2]]);
  acc_t a1, a2;
  sine_coefficients(p.conjugate, static_cast<acc_t>(sin[w1 * p.sin_stride[2]]),
                    static_cast<acc_t>(sin[w2 * p.sin_stride[2]]), a1, a2);
  const auto x1 = static_cast<acc_t>(x[d1 * xs[3]]);
  const auto x2 = static_cast<acc_t>(x[d2 * xs[3]]);
  out[d1 * os[3]] = static_cast<scalar_t>(c1 * x1 + a1 * x2);
  out[d2 * os[3]] = static_cast<scalar_t>(c2 * x2 + a2 * x1);
}

template <typename scalar_t, typename table_t>
__global__ void __launch_bounds__(kThreads) rotary_cuda_kernel(const Params p, int64_t tokens_per_block) {
  const int64_t q_items = p.q.heads * units_per_head(p, p.q);
  const int64_t per_token = items_per_token(p);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * tokens_per_block;
  const int64_t left = p.batch * p.seqlen - first;
  const int64_t tokens = left < tokens_per_block ? left : tokens_per_block;
  for (int64_t i = threadIdx.x; i < tokens * per_token; i += blockDim.x) {
    const int64_t t = first + i / per_token;
    const int64_t item = i % per_token;
    const int64_t b = t / p.seqlen;
    const int64_t n = t % p.seqlen;
    if (item < q_items) {
      rotate_unit<scalar_t, table_t>(p, p.q, b, n, item);
    } else {
      rotate_unit<scalar_t, table_t>(p, p.k, b, n, item - q_items);
    }
  }
}

template <typename scalar_t, typename table_t>
void launch(const Params& p) {
  const int64_t tokens = p.batch * p.seqlen;
  const int64_t per_token = items_per_token(p);
  if (tokens == 0 || per_token == 0) {
    return;
  }
  const int64_t tokens_per_block = std::max<int64_t>(1, kThreads * kItemsPerThread / per_token);
  const int64_t blocks = (tokens + tokens_per_block - 1) / tokens_per_block;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "rotary_kernel: too many tokens (", tokens, ")");
  rotary_cuda_kernel<scalar_t, table_t>
      <<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(p, tokens_per_block);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void rotary_kernel_cuda(const at::Tensor& q_out, const at::Tensor& k_out, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& cos, const at::Tensor& sin, const std::optional<at::Tensor>& positions,
                        int64_t offset, int64_t rotary_dim, bool interleaved, bool conjugate) {
  TORCH_CHECK(q.device().is_cuda(), "rotary_kernel (CUDA): q must be a CUDA tensor");
  const Params p = make_params(q_out, k_out, q, k, cos, sin, positions, offset, rotary_dim, interleaved, conjugate);
  const c10::cuda::CUDAGuard device_guard(q.device());
  const bool float_table = cos.scalar_type() == at::kFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rotary_kernel_cuda", [&] {
    if (float_table) {
      launch<scalar_t, float>(p);
    } else {
      launch<scalar_t, scalar_t>(p);
    }
  });
}

}  // namespace
}  // namespace fastseq::rotary

TORCH_LIBRARY_IMPL(fastseq, CUDA, m) {
  m.impl("rotary_kernel", &fastseq::rotary::rotary_kernel_cuda);
}
