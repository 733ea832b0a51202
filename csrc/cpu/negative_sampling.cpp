// Word2vec's negative-sampling loss, CPU kernels of `fastseq::negative_sampling_forward` and
// `fastseq::negative_sampling_backward`.
//
// Example b has W input words (W = 1: skip-gram's centre word; W > 1: CBOW's context, averaged)
// and N targets: the true word first, then N - 1 sampled negatives. With h the mean of the input
// words' rows of `in_w` and s_j = h . out_w[target j], its loss is
//     softplus(-s_0) + sum_{j >= 1} softplus(s_j)      (= -log sigmoid(s_0) - sum log sigmoid(-s_j)).
// One pass per example gathers the rows, forms h, the N dot products and the loss, with no
// (B, N, D) gather materialised. With c_j = sigmoid(s_j) - [j = 0], the loss's derivative in s_j,
// the same pass also forms e = sum_j c_j out_w[target j] while the rows are in cache, so that the
// backward reads no table at all: with g the loss's gradient,
//     d out_w[target j] = g c_j h,   d in_w[input w] = g e / W,
// written as (B * N, D) and (B * W, D) blocks in the order of `targets` and `inputs`, from which
// the caller builds sparse (or dense) weight gradients. Examples are independent: parallel over b.

#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "lstm_common.h"
#include "small_gemm_avx512.h"

namespace fastseq::negative_sampling {
namespace {

using at::Tensor;
using at::vec::Vectorized;

template <typename T>
T dot_vec(const T* a, const T* b, int64_t n) {
  using Vec = Vectorized<T>;
  Vec acc(T(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    acc = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc);
  }
  T sum = at::vec::vec_reduce_all([](Vec x, Vec y) { return x + y; }, acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// y = alpha * x + (accumulate ? y : 0)
template <typename T>
void axpy_vec(T alpha, const T* x, T* y, int64_t n, bool accumulate) {
  using Vec = Vectorized<T>;
  const Vec a(alpha);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec scaled = a * Vec::loadu(x + i);
    (accumulate ? scaled + Vec::loadu(y + i) : scaled).store(y + i);
  }
  for (; i < n; ++i) y[i] = alpha * x[i] + (accumulate ? y[i] : T(0));
}

// The extension is built for the baseline x86-64 (SSE2), where at::vec runs 4 lanes at most:
// float32 on AVX-512 CPUs takes these, picked at run time.
#ifdef FASTSEQ_SMALL_GEMM_AVX512
#define FASTSEQ_NS_AVX512 __attribute__((target("avx512f,avx512vl,avx2,fma")))

FASTSEQ_NS_AVX512 float dot_avx512(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = cpu::avx512::lanes(n - i);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, a + i), _mm512_maskz_loadu_ps(mask, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

FASTSEQ_NS_AVX512 void axpy_avx512(float alpha, const float* x, float* y, int64_t n, bool accumulate) {
  const __m512 a = _mm512_set1_ps(alpha);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = cpu::avx512::lanes(n - i);
    const __m512 base = accumulate ? _mm512_maskz_loadu_ps(mask, y + i) : _mm512_setzero_ps();
    _mm512_mask_storeu_ps(y + i, mask, _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(mask, x + i), base));
  }
}

#undef FASTSEQ_NS_AVX512
#endif

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
#ifdef FASTSEQ_SMALL_GEMM_AVX512
  if constexpr (std::is_same_v<T, float>) {
    if (lstm::cpu_has_avx512()) {
      return dot_avx512(a, b, n);
    }
  }
#endif
  return dot_vec(a, b, n);
}

template <typename T>
void axpy(T alpha, const T* x, T* y, int64_t n, bool accumulate) {
#ifdef FASTSEQ_SMALL_GEMM_AVX512
  if constexpr (std::is_same_v<T, float>) {
    if (lstm::cpu_has_avx512()) {
      axpy_avx512(alpha, x, y, n, accumulate);
      return;
    }
  }
#endif
  axpy_vec(alpha, x, y, n, accumulate);
}

// The rows an example gathers sit at random places in tables larger than the caches: asking for the
// next examples' rows while this one computes hides most of their latency.
constexpr int64_t kPrefetchAhead = 2;

template <typename T>
void prefetch_rows(const T* table, int64_t stride, const int64_t* ids, int64_t count, int64_t dim) {
  for (int64_t i = 0; i < count; ++i) {
    const char* row = reinterpret_cast<const char*>(table + ids[i] * stride);
    for (int64_t byte = 0; byte < dim * static_cast<int64_t>(sizeof(T)); byte += 64) {
      __builtin_prefetch(row + byte);
    }
  }
}

// The loss term of score s (softplus(-s) for the true word, softplus(s) for a noise word) and its
// derivative c, from one exp: with t = e^-|s|, softplus(+-s) = max(+-s, 0) + log1p(t) and
// sigmoid(s) = 1 / (1 + t) for s >= 0, t / (1 + t) otherwise.
template <typename T>
void loss_and_slope(T s, bool positive, T& loss, T& slope) {
  const T t = std::exp(-std::abs(s));
  const T sig = s >= 0 ? T(1) / (T(1) + t) : t / (T(1) + t);
  loss = std::max(positive ? -s : s, T(0)) + std::log1p(t);
  slope = positive ? sig - T(1) : sig;
}

// Rows per parallel task: each example moves (W + N) rows of D values.
int64_t grain(int64_t rows_per_example, int64_t dim) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, rows_per_example * dim));
}

void check(const Tensor& in_w, const Tensor& out_w, const Tensor& inputs, const Tensor& targets) {
  TORCH_CHECK(in_w.dim() == 2 && out_w.dim() == 2 && in_w.size(1) == out_w.size(1),
              "negative_sampling: in_w and out_w must be (V, D) with one D");
  TORCH_CHECK(in_w.stride(1) == 1 && out_w.stride(1) == 1, "negative_sampling: weight rows must be contiguous");
  TORCH_CHECK(inputs.dim() == 2 && targets.dim() == 2 && inputs.size(0) == targets.size(0),
              "negative_sampling: inputs (B, W) and targets (B, N) must share B");
  TORCH_CHECK(inputs.scalar_type() == at::kLong && targets.scalar_type() == at::kLong,
              "negative_sampling: ids must be int64");
}

std::tuple<Tensor, Tensor, Tensor, Tensor> forward(const Tensor& in_w, const Tensor& out_w, const Tensor& inputs_,
                                                   const Tensor& targets_) {
  check(in_w, out_w, inputs_, targets_);
  const Tensor inputs = inputs_.contiguous(), targets = targets_.contiguous();
  const int64_t batch = inputs.size(0), words = inputs.size(1), count = targets.size(1), dim = in_w.size(1);
  Tensor loss = at::empty({batch}, in_w.options());
  Tensor hidden = at::empty({batch, dim}, in_w.options());
  Tensor slopes = at::empty({batch, count}, in_w.options());
  Tensor error = at::empty({batch, dim}, in_w.options());
  AT_DISPATCH_FLOATING_TYPES(in_w.scalar_type(), "negative_sampling_forward", [&] {
    const auto* in_rows = in_w.const_data_ptr<scalar_t>();
    const auto* out_rows = out_w.const_data_ptr<scalar_t>();
    const int64_t in_stride = in_w.stride(0), out_stride = out_w.stride(0);
    const auto* input_ids = inputs.const_data_ptr<int64_t>();
    const auto* target_ids = targets.const_data_ptr<int64_t>();
    auto* loss_out = loss.data_ptr<scalar_t>();
    auto* hidden_out = hidden.data_ptr<scalar_t>();
    auto* slope_out = slopes.data_ptr<scalar_t>();
    auto* error_out = error.data_ptr<scalar_t>();
    const scalar_t mean = scalar_t(1) / static_cast<scalar_t>(std::max<int64_t>(words, 1));
    at::parallel_for(0, batch, grain(words + count, dim), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        if (b + kPrefetchAhead < end) {
          const int64_t ahead = b + kPrefetchAhead;
          prefetch_rows(in_rows, in_stride, input_ids + ahead * words, words, dim);
          prefetch_rows(out_rows, out_stride, target_ids + ahead * count, count, dim);
        }
        scalar_t* h = hidden_out + b * dim;
        for (int64_t w = 0; w < words; ++w) {
          axpy(mean, in_rows + input_ids[b * words + w] * in_stride, h, dim, w > 0);
        }
        scalar_t* e = error_out + b * dim;
        scalar_t total = 0;
        for (int64_t j = 0; j < count; ++j) {
          const scalar_t* u = out_rows + target_ids[b * count + j] * out_stride;
          scalar_t term, slope;
          loss_and_slope(dot(h, u, dim), j == 0, term, slope);
          total += term;
          slope_out[b * count + j] = slope;
          axpy(slope, u, e, dim, j > 0);
        }
        loss_out[b] = total;
      }
    });
  });
  return {loss, hidden, slopes, error};
}

std::tuple<Tensor, Tensor> backward(const Tensor& grad_loss_, const Tensor& inputs, const Tensor& targets,
                                    const Tensor& hidden_, const Tensor& slopes_, const Tensor& error_) {
  const Tensor grad_loss = grad_loss_.contiguous(), hidden = hidden_.contiguous();
  const Tensor slopes = slopes_.contiguous(), error = error_.contiguous();
  const int64_t batch = inputs.size(0), words = inputs.size(1), count = targets.size(1), dim = hidden.size(1);
  Tensor grad_in_rows = at::empty({batch * words, dim}, hidden.options());
  Tensor grad_out_rows = at::empty({batch * count, dim}, hidden.options());
  AT_DISPATCH_FLOATING_TYPES(hidden.scalar_type(), "negative_sampling_backward", [&] {
    const auto* go = grad_loss.const_data_ptr<scalar_t>();
    const auto* h_all = hidden.const_data_ptr<scalar_t>();
    const auto* c_all = slopes.const_data_ptr<scalar_t>();
    const auto* e_all = error.const_data_ptr<scalar_t>();
    auto* d_in = grad_in_rows.data_ptr<scalar_t>();
    auto* d_out = grad_out_rows.data_ptr<scalar_t>();
    const scalar_t mean = scalar_t(1) / static_cast<scalar_t>(std::max<int64_t>(words, 1));
    at::parallel_for(0, batch, grain(words + count, dim), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t j = 0; j < count; ++j) {
          axpy(go[b] * c_all[b * count + j], h_all + b * dim, d_out + (b * count + j) * dim, dim, false);
        }
        for (int64_t w = 0; w < words; ++w) {
          axpy(go[b] * mean, e_all + b * dim, d_in + (b * words + w) * dim, dim, false);
        }
      }
    });
  });
  return {grad_in_rows, grad_out_rows};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseq, CPU, m) {
  m.impl("negative_sampling_forward", &forward);
  m.impl("negative_sampling_backward", &backward);
}

}  // namespace fastseq::negative_sampling
