// The `fastseq._C` extension: the schemas of every C++ op (`torch.ops.fastseq.*`), and a small
// Python module describing the build.
//
// Kernels register their implementations per backend next to their code: csrc/cpu/*.cpp with
// TORCH_LIBRARY_IMPL(fastseq, CPU, ...), csrc/cuda/*.cu with TORCH_LIBRARY_IMPL(fastseq, CUDA, ...).

#include <tuple>

#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "cuda/lstm_plan.h"

TORCH_LIBRARY(fastseq, m) {
  // Rotates q (B, N, Hq, D) and k (B, N, Hk, D) into q_out and k_out (which may be q and k: in
  // place) by the angles of each token's position; see csrc/rotary_args.h for the arguments.
  m.def(
      "rotary_kernel(Tensor(a!) q_out, Tensor(b!) k_out, Tensor q, Tensor k, Tensor cos, Tensor sin, "
      "Tensor? positions, int offset, int rotary_dim, bool interleaved, bool conjugate) -> ()");
  // One LSTM layer, one direction, over x (T, B, I) from (h0 (B, P), c0 (B, H)); bias = b_ih + b_hh,
  // w_hr (P, H) for projections, lengths (B,) for padded batches; see csrc/cpu/lstm.cpp. Returns
  // y, h_n, c_n and, when save_for_backward, the activated gates, the cells and (with w_hr) the
  // projection inputs that lstm_layer_backward takes. The backward leaves out grad_x, all the
  // weight gradients, or those of the initial state, when told they are not needed (None then),
  // and returns d pre (T, B, 4H) as well, from which a caller can form other weight gradients
  // (per sequence, under vmap).
  m.def(
      "lstm_layer_forward(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? bias, "
      "Tensor? w_hr, Tensor? lengths, bool reverse, bool save_for_backward) -> (Tensor y, Tensor h_n, "
      "Tensor c_n, Tensor gates, Tensor cells, Tensor hidden)");
  m.def(
      "lstm_layer_backward(Tensor grad_y, Tensor grad_h_n, Tensor grad_c_n, Tensor x, Tensor h0, "
      "Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor? lengths, bool reverse, Tensor gates, "
      "Tensor cells, Tensor hidden, Tensor y, bool has_bias, bool needs_grad_x, "
      "bool needs_grad_weights, bool needs_grad_state) -> (Tensor? grad_x, Tensor? grad_h0, "
      "Tensor? grad_c0, Tensor? grad_w_ih, Tensor? grad_w_hh, Tensor? grad_bias, Tensor? grad_w_hr, "
      "Tensor grad_pre)");
  // One LayerNorm-LSTM layer (see csrc/cpu/layer_norm_lstm.cpp): shapes as lstm_layer without
  // projection, plus the LayerNorm gains ln_ih and ln_hh (4H) and the cell's LayerNorm ln_c_weight,
  // ln_c_bias (H). With save_for_backward it also returns what layer_norm_lstm_backward takes,
  // which leaves out grad_x or the GEMMs of grad_w_ih and grad_w_hh when told (None then).
  m.def(
      "layer_norm_lstm_forward(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? bias, "
      "Tensor ln_ih, Tensor ln_hh, Tensor ln_c_weight, Tensor ln_c_bias, Tensor? lengths, bool reverse, "
      "float eps, bool save_for_backward) -> (Tensor y, Tensor h_n, Tensor c_n, Tensor gates, "
      "Tensor cells, Tensor h_in, Tensor x_hat, Tensor r_hat, Tensor stats)");
  m.def(
      "layer_norm_lstm_backward(Tensor grad_y, Tensor grad_h_n, Tensor grad_c_n, Tensor x, Tensor h0, "
      "Tensor c0, Tensor w_ih, Tensor w_hh, Tensor ln_ih, Tensor ln_hh, Tensor ln_c_weight, "
      "Tensor ln_c_bias, Tensor? lengths, bool reverse, float eps, bool has_bias, Tensor gates, "
      "Tensor cells, Tensor h_in, Tensor x_hat, Tensor r_hat, Tensor stats, bool needs_grad_x, "
      "bool needs_grad_weights) -> (Tensor? grad_x, Tensor grad_h0, Tensor grad_c0, "
      "Tensor? grad_w_ih, Tensor? grad_w_hh, Tensor? grad_bias, "
      "Tensor grad_ln_ih, Tensor grad_ln_hh, Tensor grad_ln_c_weight, Tensor grad_ln_c_bias)");
  // One Elman RNN layer, one direction (see csrc/cpu/rnn.cpp): x (T, B, I), h0 (B, H), w_ih (H, I),
  // w_hh (H, H), bias = b_ih + b_hh (H), lengths (B,) for padded batches, nonlinearity 'tanh' or
  // 'relu'. Returns y and h_n; the backward needs only y of what the forward computed, and leaves
  // out grad_x, the weight gradients, or that of h0, when told they are not needed (None then).
  m.def(
      "rnn_layer_forward(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? bias, "
      "Tensor? lengths, bool reverse, str nonlinearity) -> (Tensor y, Tensor h_n)");
  m.def(
      "rnn_layer_backward(Tensor grad_y, Tensor grad_h_n, Tensor x, Tensor h0, Tensor w_ih, "
      "Tensor w_hh, Tensor y, Tensor? lengths, bool reverse, str nonlinearity, bool has_bias, "
      "bool needs_grad_x, bool needs_grad_weights, bool needs_grad_state) -> (Tensor? grad_x, "
      "Tensor? grad_h0, Tensor? grad_w_ih, Tensor? grad_w_hh, Tensor? grad_bias)");
  // The recurrence of one LSTM layer without projection, in one persistent launch (CUDA only; see
  // csrc/cuda/lstm.cu): pre_x (T, B, 4H) = x W_ih^T + bias, h0 and c0 (B, H), w_hh (4H, H).
  // Returns y, h_n, c_n, the activated gates and the float32 cells; the backward returns d pre
  // (T, B, 4H) for the weight-gradient GEMMs, and the gradients of h0 and c0. `kernel` picks the
  // kind ("auto", "tensor_cores", "cuda_cores") and `units` > 0 the hidden units per block (CUDA
  // cores: 1, 2, 4 or 8; tensor cores: 4, 8 or 16 forward, 16 backward), for benchmarks that
  // compare them; the defaults choose.
  m.def(
      "lstm_recurrence_forward(Tensor pre_x, Tensor h0, Tensor c0, Tensor w_hh, Tensor? lengths, "
      "bool reverse, str kernel='auto', int units=0) -> (Tensor y, Tensor h_n, Tensor c_n, "
      "Tensor gates, Tensor cells)");
  m.def(
      "lstm_recurrence_backward(Tensor grad_y, Tensor grad_h_n, Tensor grad_c_n, Tensor c0, "
      "Tensor w_hh, Tensor? lengths, bool reverse, Tensor gates, Tensor cells, str kernel='auto', "
      "int units=0) -> (Tensor grad_pre, Tensor grad_h0, Tensor grad_c0)");
  // The recurrence of one Elman RNN layer in one persistent launch (CUDA only; see
  // csrc/cuda/rnn.cu): pre_x (T, B, H) = x W_ih^T + bias, h0 (B, H), w_hh (H, H). Returns y and
  // h_n; the backward returns d pre (T, B, H) for the weight-gradient GEMMs and the gradient of h0.
  m.def(
      "rnn_recurrence_forward(Tensor pre_x, Tensor h0, Tensor w_hh, Tensor? lengths, bool reverse, "
      "str nonlinearity) -> (Tensor y, Tensor h_n)");
  m.def(
      "rnn_recurrence_backward(Tensor grad_y, Tensor grad_h_n, Tensor w_hh, Tensor y, "
      "Tensor? lengths, bool reverse, str nonlinearity) -> (Tensor grad_pre, Tensor grad_h0)");
  // Attention of q (B, H, Lq, D) over caches (B, Hk, S, D): query row i of sequence b sees keys
  // n <= cache_lengths[b] - Lq + i; returns out (B, H, Lq, D) and lse (B, H, Lq); see
  // csrc/cpu/attention_decode.cpp.
  m.def("attention_decode_cpu(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_lengths, "
        "float scale) -> (Tensor out, Tensor lse)");
  // Unmasked attention of q (B, H, Lq, D) over k, v (B, H, Lk, D), float32, D <= 16, with keys in
  // the vector lanes (see csrc/cpu/attention.cpp): returns the output (q's layout) and the
  // log-sum-exp (B, H, Lq); the backward returns dq, dk, dv.
  m.def("attention_small_head_forward(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor out, "
        "Tensor lse)");
  m.def("attention_small_head_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // Writes k and v (B, Hk, L, D) into the caches (B, Hk, S, D) at each sequence's cache length.
  m.def("kv_cache_append_cpu(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, "
        "Tensor cache_lengths) -> ()");
  // x (..., K) weight^T (+ bias), weight (N, K): a linear layer, for products of a few rows (a
  // decoding step) that the unpacked CPU kernels run at the memory's speed; see csrc/cpu/linear.cpp.
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // Word2vec's negative-sampling loss (see csrc/cpu/negative_sampling.cpp): in_w (V, D), out_w
  // (V', D), inputs (B, W) ids averaged into h, targets (B, N) ids, the true word first. Returns the
  // per-example loss (B,), h (B, D), the loss's slopes in the scores (B, N) and the error vector
  // (B, D) that the backward takes; it returns the gradient rows of the inputs' in_w rows
  // (B * W, D) and of the targets' out_w rows (B * N, D).
  m.def(
      "negative_sampling_forward(Tensor in_w, Tensor out_w, Tensor inputs, Tensor targets) -> "
      "(Tensor loss, Tensor hidden, Tensor slopes, Tensor error)");
  m.def(
      "negative_sampling_backward(Tensor grad_loss, Tensor inputs, Tensor targets, Tensor hidden, "
      "Tensor slopes, Tensor error) -> (Tensor grad_in_rows, Tensor grad_out_rows)");
}

namespace {

bool cuda_built() {
#ifdef FASTSEQ_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastseq compiled kernels; importing this module registers torch.ops.fastseq.*";
  m.def("cuda_built", &cuda_built, "True when the extension was compiled with its CUDA kernels");
  m.def("lstm_persistent_units", &fastseq::lstm::plan_units, "Hidden units per block of the persistent "
        "LSTM kernels (hidden, element_size, sms, smem_per_block, smem_per_sm); 0 when they cannot run");
  m.def("rnn_persistent_units", &fastseq::lstm::plan_rnn_units, "Hidden units per block of the "
        "persistent Elman RNN kernels (hidden, element_size, sms, smem_per_block, smem_per_sm); 0 "
        "when they cannot run");
  m.def(
      "lstm_tensor_core_tiles",
      [](int64_t batch, int64_t cols, int64_t depth) {
        const auto p = fastseq::lstm::plan_tiles(batch, cols, depth);
        return std::make_tuple(p.rows, p.k_splits, p.shared_bytes());
      },
      "How the tensor-core LSTM kernels split a block's (batch x depth) by (depth x cols) product: "
      "(rows padded to 16, depth splits over warps, shared-memory bytes of the block)");
  m.def("openmp_threads", &at::get_num_threads, "Threads the CPU kernels run on (at::get_num_threads)");
}
