// What both kinds of persistent LSTM kernel share (csrc/cuda/lstm.cu: CUDA cores, any float
// type; csrc/cuda/lstm_tensor_cores.cuh: tensor cores, half and bfloat16): the recurrence's
// description, the padding rule and the cell's pointwise math, forward and backward.
//
// Numerics follow the Python-driven loop of the other backends: float math, the cell state
// carried in float32, h and the activated gates stored in the input dtype.
#pragma once

#include <cstdint>

#include "cuda/lstm_plan.h"

namespace fastseq::lstm {

struct Recurrence {
  int64_t steps, batch, hidden;
  bool reverse;
  const int64_t* lengths;  // (B,) or nullptr
};

// The tensors of a layer's forward recurrence and backward, as the kernels take them.
template <typename scalar_t>
struct ForwardArgs {
  Recurrence r;
  const scalar_t* pre_x;  // (T, B, 4H): x W_ih^T + bias
  const scalar_t* h0;     // (B, H)
  const scalar_t* c0;     // (B, H)
  const scalar_t* w_hh;   // (4H, H)
  scalar_t* y;            // (T, B, H)
  scalar_t* gates;        // (T, B, 4H), activated
  float* cells;           // (T, B, H)
  scalar_t* h_buf;        // h before / after the current step: two planes (B, H), or padded
  scalar_t* h_n;          // (B, H): the state after the last step, written by its last step
  scalar_t* c_n;          // (B, H), in the input dtype
};

template <typename scalar_t>
struct BackwardArgs {
  Recurrence r;
  const scalar_t* grad_y;  // (T, B, H)
  const scalar_t* c0;      // (B, H)
  const scalar_t* w_hh;    // (4H, H)
  const scalar_t* gates;   // (T, B, 4H), activated
  const float* cells;      // (T, B, H)
  scalar_t* grad_pre;      // (T, B, 4H)
  float* dh;               // (B, H): dh carried into the current step, grad_h_n at first
  float* dc;               // (B, H): dc carried, grad_c_n at first
};

// Padding (`lengths`): step t is padding for row b when t >= lengths[b]; there the state is
// carried unchanged, y is zero, d pre is zero and dh / dc pass through.
__device__ __forceinline__ bool is_active(const Recurrence& r, int64_t b, int64_t t) {
  return r.lengths == nullptr || t < r.lengths[b];
}

// The t of the i-th step in processing order. The reverse direction walks t = T-1 .. 0, so a
// sequence's padding comes first and its state is still (h0, c0) when its last valid step starts.
__device__ __forceinline__ int64_t step_at(const Recurrence& r, int64_t i) {
  return r.reverse ? r.steps - 1 - i : i;
}

__device__ __forceinline__ float sigmoidf(float x) {
  return 1.f / (1.f + __expf(-x));
}

// The forward cell of one (row, unit): pre-activations z (i, f, g, o) in, activations out in z;
// returns c, with h = o tanh(c) in *h.
__device__ __forceinline__ float cell_forward(float (&z)[4], float c_prev, float* h) {
#pragma unroll
  for (int gate = 0; gate < 4; ++gate) z[gate] = gate == 2 ? tanhf(z[gate]) : sigmoidf(z[gate]);
  const float c = z[1] * c_prev + z[0] * z[2];
  *h = z[3] * tanhf(c);
  return c;
}

// The backward cell of one (row, unit): activated gates g, the cell c and the one before it, dh
// (carry plus grad_y) and the carried dc; writes d pre (i, f, g, o) and returns dc for the step
// before.
__device__ __forceinline__ float cell_backward(const float (&g)[4], float c, float c_prev,
                                               float dh, float dc_carry, float (&dpre)[4]) {
  const float tanh_c = tanhf(c);
  const float dc = dc_carry + dh * g[3] * (1.f - tanh_c * tanh_c);
  dpre[0] = dc * g[2] * g[0] * (1.f - g[0]);
  dpre[1] = dc * c_prev * g[1] * (1.f - g[1]);
  dpre[2] = dc * g[0] * (1.f - g[2] * g[2]);
  dpre[3] = dh * tanh_c * g[3] * (1.f - g[3]);
  return dc * g[1];
}

// The four gate values (i, f, g, o) of unit j in one row of a (.., 4H) tensor, as float.
template <typename scalar_t>
__device__ __forceinline__ void load_gates(const scalar_t* row, int64_t H, int64_t j,
                                           float (&out)[4]) {
#pragma unroll
  for (int gate = 0; gate < 4; ++gate) out[gate] = static_cast<float>(row[gate * H + j]);
}

// The cell of row b, unit j before the i-th processed step: c0 at the first, else the previous
// step's saved cell.
template <typename scalar_t>
__device__ __forceinline__ float cell_before(const Recurrence& r, const scalar_t* c0,
                                             const float* cells, int64_t i, int64_t b, int64_t j) {
  const int64_t H = r.hidden;
  return i == 0 ? static_cast<float>(c0[b * H + j])
                : cells[(step_at(r, i - 1) * r.batch + b) * H + j];
}

// What unit j of row b reads in the forward's i-th step besides the recurrent term: its input
// projection (gate q in pre[q]) and the cell before the step. Loaded apart from the step's math
// so that a kernel can issue the loads before the step's product and hide their latency.
struct ForwardUnitInputs {
  float pre[4];
  float c_prev;
};

template <typename scalar_t>
__device__ __forceinline__ ForwardUnitInputs load_forward_unit(const ForwardArgs<scalar_t>& a,
                                                               int64_t i, int64_t b, int64_t j) {
  const Recurrence& r = a.r;
  const int64_t H = r.hidden, row = step_at(r, i) * r.batch + b;
  ForwardUnitInputs in;
  load_gates(a.pre_x + row * 4 * H, H, j, in.pre);
  in.c_prev = cell_before(r, a.c0, a.cells, i, b, j);
  return in;
}

// Unit j of row b in the forward's i-th step. recurrent[q]: gate q's term of h_{t-1} W_hh^T;
// h_prev / h_next: the row's h before and after the step in the recurrence's buffers. Writes the
// activated gates, the cell, h (y, the next buffer; h_n and c_n at the last step). A padding step
// carries h and c over and writes zero gates and y.
template <typename scalar_t>
__device__ __forceinline__ void forward_unit(const ForwardArgs<scalar_t>& a, int64_t i, int64_t b,
                                             int64_t j, const ForwardUnitInputs& in,
                                             const float (&recurrent)[4], const scalar_t* h_prev,
                                             scalar_t* h_next) {
  const Recurrence& r = a.r;
  const int64_t H = r.hidden, t = step_at(r, i), row = t * r.batch + b;
  const bool active = is_active(r, b, t);
  float z[4] = {};
  float c = in.c_prev;
  scalar_t h = h_prev[j];
  if (active) {
#pragma unroll
    for (int gate = 0; gate < 4; ++gate) z[gate] = recurrent[gate] + in.pre[gate];
    float h_value;
    c = cell_forward(z, in.c_prev, &h_value);
    h = static_cast<scalar_t>(h_value);
  }
#pragma unroll
  for (int gate = 0; gate < 4; ++gate) a.gates[row * 4 * H + gate * H + j] = static_cast<scalar_t>(z[gate]);
  a.cells[row * H + j] = c;
  h_next[j] = h;
  a.y[row * H + j] = active ? h : scalar_t(0.f);
  if (i == r.steps - 1) {
    a.h_n[b * H + j] = h;
    a.c_n[b * H + j] = static_cast<scalar_t>(c);
  }
}

// What unit j of row b reads in the backward's i-th step besides the carries: its activated gates
// (gate q in g[q]), its cell and the one before, and grad_y; loaded apart as in the forward.
struct BackwardUnitInputs {
  float g[4];
  float c, c_prev, grad_y;
};

template <typename scalar_t>
__device__ __forceinline__ BackwardUnitInputs load_backward_unit(const BackwardArgs<scalar_t>& a,
                                                                 int64_t i, int64_t b, int64_t j) {
  const Recurrence& r = a.r;
  const int64_t H = r.hidden, row = step_at(r, i) * r.batch + b;
  BackwardUnitInputs in;
  load_gates(a.gates + row * 4 * H, H, j, in.g);
  in.c = a.cells[row * H + j];
  in.c_prev = cell_before(r, a.c0, a.cells, i, b, j);
  in.grad_y = static_cast<float>(a.grad_y[row * H + j]);
  return in;
}

// Unit j of row b in the backward's i-th step (in the forward's processing order): d pre (to
// grad_pre, and gate q at dpre_copy[q copy_stride] when given) from its inputs and dh = the carry
// plus grad_y; then the carries dh and dc for the step before. A padding step writes zero d pre
// and leaves the carries as they are.
template <typename scalar_t>
__device__ __forceinline__ void backward_unit(const BackwardArgs<scalar_t>& a, int64_t i,
                                              int64_t b, int64_t j, const BackwardUnitInputs& in,
                                              scalar_t* dpre_copy, int64_t copy_stride) {
  const Recurrence& r = a.r;
  const int64_t H = r.hidden, t = step_at(r, i), row = t * r.batch + b;
  float d[4] = {};
  if (is_active(r, b, t)) {
    const float dh = a.dh[b * H + j] + in.grad_y;
    a.dc[b * H + j] = cell_backward(in.g, in.c, in.c_prev, dh, a.dc[b * H + j], d);
    a.dh[b * H + j] = dh;  // read back only if the next step is padding (then it passes through)
  }
#pragma unroll
  for (int gate = 0; gate < 4; ++gate) {
    const scalar_t value = static_cast<scalar_t>(d[gate]);
    a.grad_pre[row * 4 * H + gate * H + j] = value;
    if (dpre_copy != nullptr) dpre_copy[gate * copy_stride] = value;
  }
}

}  // namespace fastseq::lstm
