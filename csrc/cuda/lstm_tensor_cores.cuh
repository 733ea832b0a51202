// The persistent LSTM recurrence on tensor cores (half and bfloat16), forward and backward.
//
// The same plan as the CUDA-core kernels of csrc/cuda/lstm.cu: one cooperative launch for the
// whole sequence, each block owning a few hidden units and their slice of W_hh in shared memory,
// a grid-wide barrier per step. What changes is the per-step product: the block's (B x K) by
// (K x N) slice is done in 16 x 16 x 16 warp MMAs (wmma) into float, not as per-lane dot products
// with a butterfly reduction each.
//
// - Forward: the block owns U = 4 NT units, so its 4U gate columns (i, f, g, o of each unit) are
//   NT tiles of 16; the product is h_{t-1} (B x H) by its W_hh rows, transposed.
// - Backward: the block owns 16 units (one tile of columns of dh_{t-1} = d pre_t W_hh); the
//   product's depth is all 4H gate rows.
//
// MMA operands have no ragged edge: h (forward) and d pre (backward) are also kept in zero-padded
// double buffers of B rounded up to 16 rows and H rounded up to 16 columns (per gate in the
// backward), written by the cells of each step and read by every block in the next; the shared
// slices of W_hh are zero-padded the same way. When the tiles are few, a tile's depth is split
// over warps too, and the cells sum the warps' partial products from shared memory.
#pragma once

#include <algorithm>
#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "cuda/lstm_device.cuh"

namespace fastseq::lstm::tensor_cores {

namespace cg = cooperative_groups;
namespace wmma = nvcuda::wmma;

// The MMA element type of a storage type (the same 16 bits).
template <typename scalar_t>
struct Element;
template <>
struct Element<c10::Half> {
  using type = __half;
};
template <>
struct Element<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// partial[split] (rows x cols, row-major float) = A[:, the split's depth] B[the split's depth, :]
// for this warp's items. A (rows x depth) row-major with leading dimension lda; B (depth x cols)
// column-major, column n at b + n ldb.
template <typename T>
__device__ void warp_products(const TilePlan& p, const T* a, int64_t lda, const T* b, int64_t ldb,
                              float* partial, int warp) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // never launched there (lstm.cu checks the device), but compiled for any arch list
#else
  const int64_t col_tiles = p.cols / kTile, k_tiles = p.depth / kTile;
  for (int64_t item = warp; item < p.tiles() * p.k_splits; item += kWarps) {
    const int64_t tile = item / p.k_splits, split = item % p.k_splits;
    const int64_t m0 = tile / col_tiles * kTile, n0 = tile % col_tiles * kTile;
    const int64_t k_end = (split + 1) * k_tiles / p.k_splits;
    wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> even, odd;
    wmma::fill_fragment(even, 0.f);
    wmma::fill_fragment(odd, 0.f);
    // kBatch k-tiles' operands are loaded before any of their MMAs, so that their loads (A from
    // L2) overlap; the MMAs alternate between two accumulators.
    constexpr int kBatch = 4;
    for (int64_t k0 = split * k_tiles / p.k_splits; k0 < k_end; k0 += kBatch) {
      wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, wmma::row_major> fa[kBatch];
      wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::col_major> fb[kBatch];
#pragma unroll
      for (int q = 0; q < kBatch; ++q) {
        if (k0 + q < k_end) {
          wmma::load_matrix_sync(fa[q], a + m0 * lda + (k0 + q) * kTile, lda);
          wmma::load_matrix_sync(fb[q], b + n0 * ldb + (k0 + q) * kTile, ldb);
        }
      }
#pragma unroll
      for (int q = 0; q < kBatch; ++q) {
        auto& acc = q % 2 == 0 ? even : odd;
        if (k0 + q < k_end) wmma::mma_sync(acc, fa[q], fb[q], acc);
      }
    }
#pragma unroll
    for (int e = 0; e < even.num_elements; ++e) even.x[e] += odd.x[e];
    wmma::store_matrix_sync(partial + (split * p.rows + m0) * p.cols + n0, even, p.cols,
                            wmma::mem_row_major);
  }
#endif
}

// Sum over the splits of entry (row, col) of the partial products.
__device__ __forceinline__ float sum_partials(const TilePlan& p, const float* partial, int64_t row,
                                              int64_t col) {
  float sum = 0.f;
  for (int64_t split = 0; split < p.k_splits; ++split) {
    sum += partial[(split * p.rows + row) * p.cols + col];
  }
  return sum;
}

// Fill both (rows x cols) planes of a padded double buffer: `src` (n_rows x n_cols, row-major) in
// the first plane, zero elsewhere; grid-strided, before the first grid barrier.
template <typename scalar_t>
__device__ void fill_padded(scalar_t* buf, int64_t rows, int64_t cols, const scalar_t* src,
                            int64_t n_rows, int64_t n_cols) {
  for (int64_t idx = int64_t(blockIdx.x) * kThreads + threadIdx.x; idx < 2 * rows * cols;
       idx += int64_t(gridDim.x) * kThreads) {
    const int64_t plane = idx / (rows * cols), m = idx / cols % rows, k = idx % cols;
    buf[idx] = plane == 0 && src != nullptr && m < n_rows && k < n_cols ? src[m * n_cols + k]
                                                                        : scalar_t(0.f);
  }
}

// The forward's arguments: h_buf is (2, plan.rows, plan.depth), zero-padded.
template <typename scalar_t>
struct Forward {
  ForwardArgs<scalar_t> io;
  TilePlan plan;   // rows: B padded; cols: 4U; depth: H padded
  int64_t units;   // U
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) forward_kernel(Forward<scalar_t> args) {
  using T = typename Element<scalar_t>::type;
  extern __shared__ __align__(128) unsigned char smem_bytes[];
  const ForwardArgs<scalar_t>& a = args.io;
  const Recurrence& r = a.r;
  const TilePlan& p = args.plan;
  const int64_t H = r.hidden, B = r.batch, U = args.units, K = p.depth;
  // Column n = gate U + u of the block's product is W_hh row gate H + j0 + u: (4U, K), i.e. B
  // column-major.
  auto* w = reinterpret_cast<scalar_t*>(smem_bytes);
  auto* partial = reinterpret_cast<float*>(smem_bytes + p.weight_bytes());
  const int64_t j0 = int64_t(blockIdx.x) * U;
  const int warp = threadIdx.x / 32;

  for (int64_t idx = threadIdx.x; idx < p.cols * K; idx += kThreads) {
    const int64_t n = idx / K, k = idx % K, gate = n / U, j = j0 + n % U;
    w[idx] = j < H && k < H ? a.w_hh[(gate * H + j) * H + k] : scalar_t(0.f);
  }
  fill_padded(a.h_buf, p.rows, K, a.h0, B, H);
  cg::grid_group grid = cg::this_grid();
  grid.sync();

  for (int64_t i = 0; i < r.steps; ++i) {
    const scalar_t* h_in = a.h_buf + (i % 2) * p.rows * K;
    scalar_t* h_out = a.h_buf + ((i + 1) % 2) * p.rows * K;
    // This thread's first (row, unit): its loads go out before the product.
    const int64_t b_first = threadIdx.x / U, j_first = j0 + threadIdx.x % U;
    ForwardUnitInputs first{};
    if (b_first < B && j_first < H) first = load_forward_unit(a, i, b_first, j_first);
    warp_products(p, reinterpret_cast<const T*>(h_in), K, reinterpret_cast<const T*>(w), K,
                  partial, warp);
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < B * U; idx += kThreads) {
      const int64_t b = idx / U, u = idx % U, j = j0 + u;
      if (j >= H) continue;
      float recurrent[4];
#pragma unroll
      for (int gate = 0; gate < 4; ++gate) recurrent[gate] = sum_partials(p, partial, b, gate * U + u);
      const ForwardUnitInputs in = idx == threadIdx.x ? first : load_forward_unit(a, i, b, j);
      forward_unit(a, i, b, j, in, recurrent, h_in + b * K, h_out + b * K);
    }
    grid.sync();
  }
}

// The backward's block owns this many units: one tile of dh's columns.
constexpr int64_t kBackwardUnits = kTile;

// The backward's arguments, and the double buffer of d pre that every block reads.
template <typename scalar_t>
struct Backward {
  BackwardArgs<scalar_t> io;
  TilePlan plan;       // rows: B padded; cols: 16 units; depth: 4 Hp (Hp: H padded)
  scalar_t* dpre_buf;  // (2, rows, depth): gate q of unit j at column q Hp + j, zero-padded
};

// dh[b, j0 + u] = the block's product of the d pre in `dpre_in` (its padded layout), for the rows
// where step `s` (the one that d pre belongs to) was active; elsewhere dh passes through.
template <typename scalar_t>
__device__ void carry_dh(const Backward<scalar_t>& args, const scalar_t* w,
                         const scalar_t* dpre_in, float* partial, int64_t s, int64_t j0) {
  using T = typename Element<scalar_t>::type;
  const BackwardArgs<scalar_t>& a = args.io;
  const TilePlan& p = args.plan;
  const int64_t H = a.r.hidden;
  warp_products(p, reinterpret_cast<const T*>(dpre_in), p.depth, reinterpret_cast<const T*>(w),
                p.depth, partial, threadIdx.x / 32);
  __syncthreads();
  for (int64_t idx = threadIdx.x; idx < a.r.batch * kBackwardUnits; idx += kThreads) {
    const int64_t b = idx / kBackwardUnits, u = idx % kBackwardUnits, j = j0 + u;
    if (j < H && is_active(a.r, b, s)) a.dh[b * H + j] = sum_partials(p, partial, b, u);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) backward_kernel(Backward<scalar_t> args) {
  extern __shared__ __align__(128) unsigned char smem_bytes[];
  const BackwardArgs<scalar_t>& a = args.io;
  const Recurrence& r = a.r;
  const TilePlan& p = args.plan;
  const int64_t H = r.hidden, B = r.batch, K = p.depth, Hp = K / 4;
  // Column u of the block's product: W_hh[q H + jj, j0 + u] at row q Hp + jj, i.e. B column-major.
  auto* w = reinterpret_cast<scalar_t*>(smem_bytes);
  auto* partial = reinterpret_cast<float*>(smem_bytes + p.weight_bytes());
  const int64_t j0 = int64_t(blockIdx.x) * kBackwardUnits;

  for (int64_t idx = threadIdx.x; idx < kBackwardUnits * K; idx += kThreads) {
    const int64_t u = idx / K, k = idx % K, q = k / Hp, jj = k % Hp, j = j0 + u;
    w[idx] = j < H && jj < H ? a.w_hh[(q * H + jj) * H + j] : scalar_t(0.f);
  }
  fill_padded<scalar_t>(args.dpre_buf, p.rows, K, nullptr, 0, 0);
  cg::grid_group grid = cg::this_grid();
  grid.sync();

  // Backward visits the steps in the reverse of the forward's processing order: i = T-1 .. 0.
  for (int64_t i = r.steps - 1; i >= 0; --i) {
    scalar_t* dpre_out = args.dpre_buf + (i % 2) * p.rows * K;
    // This thread's first (row, unit): its loads go out before the product.
    const int64_t b_first = threadIdx.x / kBackwardUnits;
    const int64_t j_first = j0 + threadIdx.x % kBackwardUnits;
    BackwardUnitInputs first{};
    if (b_first < B && j_first < H) first = load_backward_unit(a, i, b_first, j_first);
    if (i < r.steps - 1) {
      carry_dh(args, w, args.dpre_buf + ((i + 1) % 2) * p.rows * K, partial, step_at(r, i + 1), j0);
    }
    for (int64_t idx = threadIdx.x; idx < B * kBackwardUnits; idx += kThreads) {
      const int64_t b = idx / kBackwardUnits, j = j0 + idx % kBackwardUnits;
      if (j >= H) continue;
      const BackwardUnitInputs in = idx == threadIdx.x ? first : load_backward_unit(a, i, b, j);
      backward_unit(a, i, b, j, in, dpre_out + b * K + j, Hp);
    }
    grid.sync();
  }
  if (r.steps > 0) carry_dh(args, w, args.dpre_buf, partial, step_at(r, 0), j0);  // dh0 (i = 0: plane 0)
}

}  // namespace fastseq::lstm::tensor_cores
