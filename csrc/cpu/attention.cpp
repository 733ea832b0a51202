// Attention with a small head dim on the CPU: `fastseq::attention_small_head_forward` and
// `_backward`.
//
// q (B, H, Lq, D), k and v (B, H, Lk, D), float32, D <= 16, no mask: the self-attention of a U-Net
// at a reduced width (64 channels in 8 heads: D = 8 over 1024 tokens) or of a small ViT. torch's
// CPU flash kernel runs it as GEMMs of depth D, which at D = 8 do little arithmetic per call and
// leave the exponentials unhidden: 15 ms forward for 16 heads of 1024 tokens on 2 Zen 4 cores,
// where the products are 0.5 GFLOP (2.7 ms at 200 GFLOP/s) and the exponentials 17 M.
//
// Here the keys lie in the lanes. Each head's K and V are packed transposed (DP rows of Lk
// floats, DP = D rounded up to 8 or 16, zero-padded), so a query row's scores for 16 keys are DP
// broadcast multiply-adds, and every lane keeps its own running sums over the keys it holds (keys
// j = lane mod 16): the only reductions across lanes are per row, not per block of keys.
//
// Forward, per query row: the scores (to a row buffer) and their maximum; then their
// exponentials, their sum and the weighted sum of the values, lane by lane; then one reduction
// per output column. Returns the output in q's layout and the log-sum-exp (B, H, Lq).
// Backward, per head (dK and dV sum over all query rows), per query row: the scores again,
// p = exp(s - lse), dp = dO V^T, ds = p (dp - delta) with delta = dO . O; dQ accumulates lane by
// lane, dK^T and dV^T (packed like K and V, in L1/L2) are updated block by block. Head dims up
// to 8 take two query rows per pass over the keys.
//
// Measured (2 Zen 4 cores, 16 heads of 1024 tokens, D = 8): forward 6.9 ms, backward 12.7 ms,
// against torch's flash kernel's 15.3 and 42.1 ms; at D = 16 (256 tokens) torch's is faster,
// and fastseq.ops.attention sends only D <= 8 here.
//
// CPUs without AVX-512 take the same plan in scalar code (correct, not fast: fastseq.ops.attention
// sends only AVX-512 CPUs here).

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "attention_exp.h"
#include "lstm_common.h"

namespace fastseq::attention_cpu {
namespace {

using at::Tensor;

constexpr int64_t kLanes = 16;
constexpr int64_t kMaxHeadDim = 16;
constexpr const char* kOp = "attention_small_head";

// One (b, h) of a (B, H, L, D) tensor: row i at base + i * row_stride, unit stride along D.
template <typename T>
struct Rows {
  T* base;
  int64_t row_stride;
  T* row(int64_t i) const { return base + i * row_stride; }
};

template <typename T>
Rows<T> head_rows(const Tensor& t, int64_t b, int64_t h) {
  return {const_cast<T*>(t.const_data_ptr<float>()) + b * t.stride(0) + h * t.stride(1),
          t.stride(2)};
}

int64_t padded_dim(int64_t D) {
  return D <= 8 ? 8 : kMaxHeadDim;
}

int64_t padded_keys(int64_t N) {
  return (N + kLanes - 1) / kLanes * kLanes;
}

// Floats between the packed rows of one d: the keys and one cache line more. Rows a multiple of
// 4 KiB apart (1024 keys) alias in the L1's store-to-load checks, and the backward's stores to
// dK^T would stall its loads of K^T: measured 10x slower.
int64_t row_stride(int64_t NP) {
  return NP + kLanes;
}

// dst (DP rows of ld floats) = the N x D rows of src transposed, zero elsewhere.
void pack_transposed(const Rows<const float>& src, int64_t N, int64_t D, int64_t DP, int64_t ld,
                     float* dst) {
  std::fill(dst, dst + DP * ld, 0.f);
  for (int64_t j = 0; j < N; ++j) {
    const float* row = src.row(j);
    for (int64_t d = 0; d < D; ++d) dst[d * ld + j] = row[d];
  }
}

// The inverse, into the N x D rows of dst.
void unpack_transposed(const float* src, int64_t N, int64_t D, int64_t ld, const Rows<float>& dst) {
  for (int64_t j = 0; j < N; ++j) {
    float* row = dst.row(j);
    for (int64_t d = 0; d < D; ++d) row[d] = src[d * ld + j];
  }
}

// A head's packed keys and values, and (backward) the gradients of both in the same layout:
// row d of K^T at kt + d * ld, keys 0 .. NP - 1 (zero past N).
struct Packed {
  int64_t N, NP, ld, D, DP;
  const float* kt;
  const float* vt;
  float* dkt = nullptr;
  float* dvt = nullptr;
};

// ----------------------------------------------------------------------------------------------
// Query rows. Head dims up to 8 take two rows at a time, which read each block of K^T and V^T
// (and in the backward update each block of dK^T and dV^T) once for both.

// A query row: its q times the scale, zero-padded; forward, where its output and log-sum-exp
// go; backward, its dO (zero-padded), log-sum-exp, delta = dO . O and where its dq goes.
struct QueryRow {
  float qs[kMaxHeadDim];
  float g[kMaxHeadDim];
  float lse, delta;
  float* out;
  float* lse_out;
};

constexpr int kMaxRows = 2;

void forward_row_scalar(const Packed& p, QueryRow& row, float* scores) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < p.N; ++j) {
    float s = 0.f;
    for (int64_t d = 0; d < p.D; ++d) s += row.qs[d] * p.kt[d * p.ld + j];
    scores[j] = s;
    top = std::max(top, s);
  }
  float acc[kMaxHeadDim] = {};
  float total = 0.f;
  for (int64_t j = 0; j < p.N; ++j) {
    const float e = std::exp(scores[j] - top);
    total += e;
    for (int64_t d = 0; d < p.D; ++d) acc[d] += e * p.vt[d * p.ld + j];
  }
  for (int64_t d = 0; d < p.D; ++d) row.out[d] = acc[d] / total;
  *row.lse_out = top + std::log(total);
}

// Adds the row's terms to dK^T and dV^T and writes its dq = scale sum_j ds_j K_j.
void backward_row_scalar(const Packed& p, const QueryRow& row, float scale) {
  float acc[kMaxHeadDim] = {};
  for (int64_t j = 0; j < p.N; ++j) {
    float s = 0.f, dp = 0.f;
    for (int64_t d = 0; d < p.D; ++d) {
      s += row.qs[d] * p.kt[d * p.ld + j];
      dp += row.g[d] * p.vt[d * p.ld + j];
    }
    const float e = std::exp(s - row.lse), ds = e * (dp - row.delta);
    for (int64_t d = 0; d < p.D; ++d) {
      acc[d] += ds * p.kt[d * p.ld + j];
      p.dkt[d * p.ld + j] += ds * row.qs[d];
      p.dvt[d * p.ld + j] += e * row.g[d];
    }
  }
  for (int64_t d = 0; d < p.D; ++d) row.out[d] = scale * acc[d];
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTSEQ_ATTENTION_AVX512 __attribute__((target("avx512f,avx512dq,avx2,fma")))

// Lanes of the key block at j that hold keys (the last block is partial).
FASTSEQ_ATTENTION_AVX512 inline __mmask16 keys_at(int64_t j, int64_t N) {
  return N - j >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << (N - j)) - 1u);
}

// R rows' scores for keys j .. j + 15 (qs . K^T[:, j ..]) and, `with_dots`, their dO . V^T in
// `dots`: each block of K^T and V^T is loaded once for all rows.
template <int DP, int R>
FASTSEQ_ATTENTION_AVX512 inline void products_at(const Packed& p, const QueryRow* rows, int64_t j,
                                                 __m512 (&s)[R], __m512 (&dots)[R], bool with_dots) {
#pragma GCC unroll 2
  for (int r = 0; r < R; ++r) s[r] = dots[r] = _mm512_setzero_ps();
#pragma GCC unroll 16
  for (int d = 0; d < DP; ++d) {
    const __m512 k = _mm512_loadu_ps(p.kt + d * p.ld + j);
#pragma GCC unroll 2
    for (int r = 0; r < R; ++r) s[r] = _mm512_fmadd_ps(_mm512_set1_ps(rows[r].qs[d]), k, s[r]);
    if (with_dots) {
      const __m512 v = _mm512_loadu_ps(p.vt + d * p.ld + j);
#pragma GCC unroll 2
      for (int r = 0; r < R; ++r) dots[r] = _mm512_fmadd_ps(_mm512_set1_ps(rows[r].g[d]), v, dots[r]);
    }
  }
}

template <int DP, int R>
FASTSEQ_ATTENTION_AVX512 void forward_rows_avx512(const Packed& p, QueryRow* rows, float* scores) {
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 top[R], s[R], unused[R];
#pragma GCC unroll 2
  for (int r = 0; r < R; ++r) top[r] = minus_inf;
  for (int64_t j = 0; j < p.NP; j += kLanes) {
    products_at<DP, R>(p, rows, j, s, unused, false);
    const __mmask16 valid = keys_at(j, p.N);
#pragma GCC unroll 2
    for (int r = 0; r < R; ++r) {
      s[r] = _mm512_mask_blend_ps(valid, minus_inf, s[r]);
      _mm512_storeu_ps(scores + r * p.ld + j, s[r]);
      top[r] = _mm512_max_ps(top[r], s[r]);
    }
  }
  __m512 shift[R], total[R], acc[R][DP];
#pragma GCC unroll 2
  for (int r = 0; r < R; ++r) {
    shift[r] = _mm512_set1_ps(_mm512_reduce_max_ps(top[r]));
    total[r] = _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int d = 0; d < DP; ++d) acc[r][d] = _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < p.NP; j += kLanes) {
    __m512 e[R];
#pragma GCC unroll 2
    for (int r = 0; r < R; ++r) {
      // The padding lanes' scores are -inf: their exponentials are 0.
      e[r] = cpu::avx512::exp_softmax(_mm512_sub_ps(_mm512_loadu_ps(scores + r * p.ld + j), shift[r]));
      total[r] = _mm512_add_ps(total[r], e[r]);
    }
#pragma GCC unroll 16
    for (int d = 0; d < DP; ++d) {
      const __m512 v = _mm512_loadu_ps(p.vt + d * p.ld + j);
#pragma GCC unroll 2
      for (int r = 0; r < R; ++r) acc[r][d] = _mm512_fmadd_ps(e[r], v, acc[r][d]);
    }
  }
#pragma GCC unroll 2
  for (int r = 0; r < R; ++r) {
    const float sum = _mm512_reduce_add_ps(total[r]);
    for (int64_t d = 0; d < p.D; ++d) rows[r].out[d] = _mm512_reduce_add_ps(acc[r][d]) / sum;
    *rows[r].lse_out = _mm512_cvtss_f32(shift[r]) + std::log(sum);
  }
}

template <int DP, int R>
FASTSEQ_ATTENTION_AVX512 void backward_rows_avx512(const Packed& p, const QueryRow* rows,
                                                   float scale) {
  __m512 shift[R], minus_delta[R], acc[R][DP];
#pragma GCC unroll 2
  for (int r = 0; r < R; ++r) {
    shift[r] = _mm512_set1_ps(rows[r].lse);
    minus_delta[r] = _mm512_set1_ps(-rows[r].delta);
#pragma GCC unroll 16
    for (int d = 0; d < DP; ++d) acc[r][d] = _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < p.NP; j += kLanes) {
    __m512 s[R], dp[R], e[R], ds[R];
    products_at<DP, R>(p, rows, j, s, dp, true);
    const __mmask16 valid = keys_at(j, p.N);
#pragma GCC unroll 2
    for (int r = 0; r < R; ++r) {
      // Padding lanes: K^T and V^T are zero there, so their scores are 0, not -inf: masked.
      e[r] = _mm512_maskz_mov_ps(valid, cpu::avx512::exp_softmax(_mm512_sub_ps(s[r], shift[r])));
      ds[r] = _mm512_mul_ps(e[r], _mm512_add_ps(dp[r], minus_delta[r]));
    }
#pragma GCC unroll 16
    for (int d = 0; d < DP; ++d) {
      const int64_t at = d * p.ld + j;
      const __m512 k = _mm512_loadu_ps(p.kt + at);
      __m512 dk = _mm512_loadu_ps(p.dkt + at), dv = _mm512_loadu_ps(p.dvt + at);
#pragma GCC unroll 2
      for (int r = 0; r < R; ++r) {
        acc[r][d] = _mm512_fmadd_ps(ds[r], k, acc[r][d]);
        dk = _mm512_fmadd_ps(ds[r], _mm512_set1_ps(rows[r].qs[d]), dk);
        dv = _mm512_fmadd_ps(e[r], _mm512_set1_ps(rows[r].g[d]), dv);
      }
      _mm512_storeu_ps(p.dkt + at, dk);
      _mm512_storeu_ps(p.dvt + at, dv);
    }
  }
#pragma GCC unroll 2
  for (int r = 0; r < R; ++r) {
    for (int64_t d = 0; d < p.D; ++d) rows[r].out[d] = scale * _mm512_reduce_add_ps(acc[r][d]);
  }
}
#endif

#ifdef FASTSEQ_ATTENTION_AVX512
// run(DP, R, first) over n <= kMaxRows rows, DP and R as std::integral_constant: head dims up to
// 8 two rows at a time, wider ones one row at a time.
template <typename Run>
void by_row_groups(const Packed& p, int n, Run&& run) {
  using Wide = std::integral_constant<int, kMaxHeadDim>;
  using Narrow = std::integral_constant<int, 8>;
  using One = std::integral_constant<int, 1>;
  if (p.DP == kMaxHeadDim) {
    for (int r = 0; r < n; ++r) run(Wide{}, One{}, r);
  } else if (n == 2) {
    run(Narrow{}, std::integral_constant<int, 2>{}, 0);
  } else {
    run(Narrow{}, One{}, 0);
  }
}
#endif

// n <= kMaxRows rows; `scores`: n rows of ld floats.
void forward_rows(const Packed& p, QueryRow* rows, int n, float* scores) {
#ifdef FASTSEQ_ATTENTION_AVX512
  if (lstm::cpu_has_avx512()) {
    return by_row_groups(p, n, [&](auto dp, auto r, int first) {
      forward_rows_avx512<decltype(dp)::value, decltype(r)::value>(p, rows + first, scores);
    });
  }
#endif
  for (int r = 0; r < n; ++r) forward_row_scalar(p, rows[r], scores);
}

void backward_rows(const Packed& p, const QueryRow* rows, int n, float scale) {
#ifdef FASTSEQ_ATTENTION_AVX512
  if (lstm::cpu_has_avx512()) {
    return by_row_groups(p, n, [&](auto dp, auto r, int first) {
      backward_rows_avx512<decltype(dp)::value, decltype(r)::value>(p, rows + first, scale);
    });
  }
#endif
  for (int r = 0; r < n; ++r) backward_row_scalar(p, rows[r], scale);
}

// ----------------------------------------------------------------------------------------------
// The ops.

void check_qkv(const Tensor& q, const Tensor& k, const Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, kOp,
              ": q, k and v must be (B, H, L, D), got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  for (const Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), kOp,
                ": q, k and v must be float32 CPU tensors, got ", t->scalar_type(), " on ",
                t->device());
    TORCH_CHECK(t->size(3) <= 1 || t->stride(3) == 1, kOp, ": the head dim must be dense");
  }
  const int64_t D = q.size(3);
  TORCH_CHECK(D >= 1 && D <= kMaxHeadDim, kOp, ": head dim must be 1..", kMaxHeadDim, ", got ", D);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == q.size(1) &&
                  k.size(3) == D,
              kOp, ": k and v must be (B, H, Lk, D) with q's B, H and D, got ", k.sizes(), ", ",
              v.sizes(), " for q ", q.sizes());
}

// K^T and V^T of head (b, h), packed into `buffer` (resized to fit).
Packed pack_head(const Tensor& k, const Tensor& v, int64_t b, int64_t h, std::vector<float>& buffer,
                 bool with_grads) {
  Packed p;
  p.N = k.size(2), p.NP = padded_keys(p.N), p.ld = row_stride(p.NP), p.D = k.size(3);
  p.DP = padded_dim(p.D);
  const int64_t plane = p.DP * p.ld;
  buffer.resize(plane * (with_grads ? 4 : 2));
  pack_transposed(head_rows<const float>(k, b, h), p.N, p.D, p.DP, p.ld, buffer.data());
  pack_transposed(head_rows<const float>(v, b, h), p.N, p.D, p.DP, p.ld, buffer.data() + plane);
  p.kt = buffer.data(), p.vt = buffer.data() + plane;
  if (with_grads) {
    p.dkt = buffer.data() + 2 * plane, p.dvt = buffer.data() + 3 * plane;
    std::fill(p.dkt, p.dkt + 2 * plane, 0.f);
  }
  return p;
}

// q's row i of head (b, h) times scale, zero-padded to kMaxHeadDim.
void scaled_row(const Rows<const float>& q, int64_t i, int64_t D, float scale, float* out) {
  std::fill(out, out + kMaxHeadDim, 0.f);
  for (int64_t d = 0; d < D; ++d) out[d] = q.row(i)[d] * scale;
}

std::tuple<Tensor, Tensor> forward(const Tensor& q, const Tensor& k, const Tensor& v, double scale) {
  check_qkv(q, k, v);
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), N = k.size(2);
  Tensor out = at::empty_like(q);
  Tensor lse = at::empty({B, H, Lq}, q.options());
  if (out.numel() == 0) return {out, lse};
  if (N == 0) return {out.zero_(), lse.fill_(-std::numeric_limits<float>::infinity())};
  // Enough tasks for every thread: heads, each split into chunks of query rows (each task packs
  // its head's keys, a copy of Lk D floats, small beside its Lk D rows-worth of products).
  const int64_t heads = B * H;
  const int64_t chunks = std::min<int64_t>(
      Lq, std::max<int64_t>(1, (4 * at::get_num_threads() + heads - 1) / heads));
  const int64_t rows_per_chunk = (Lq + chunks - 1) / chunks;
  const float s = static_cast<float>(scale);
  at::parallel_for(0, heads * chunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buffer, scores(kMaxRows * row_stride(padded_keys(N)));
    QueryRow rows[kMaxRows];
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / chunks / H, h = task / chunks % H, c = task % chunks;
      const Packed p = pack_head(k, v, b, h, buffer, /*with_grads=*/false);
      const Rows<const float> qr = head_rows<const float>(q, b, h);
      const Rows<float> o = head_rows<float>(out, b, h);
      float* l = lse.data_ptr<float>() + (b * H + h) * Lq;
      const int64_t end = std::min(Lq, (c + 1) * rows_per_chunk);
      for (int64_t i = c * rows_per_chunk; i < end; i += kMaxRows) {
        const int n = static_cast<int>(std::min<int64_t>(kMaxRows, end - i));
        for (int r = 0; r < n; ++r) {
          scaled_row(qr, i + r, D, s, rows[r].qs);
          rows[r].out = o.row(i + r), rows[r].lse_out = l + i + r;
        }
        forward_rows(p, rows, n, scores.data());
      }
    }
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& grad_out, const Tensor& q,
                                            const Tensor& k, const Tensor& v, const Tensor& out,
                                            const Tensor& lse, double scale) {
  check_qkv(q, k, v);
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), N = k.size(2);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() &&
                  grad_out.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat &&
                  (D <= 1 || (grad_out.stride(3) == 1 && out.stride(3) == 1)),
              kOp, ": grad_out and out must be float32 like q, dense along D");
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({B, H, Lq}) && lse.is_contiguous() &&
                  lse.scalar_type() == at::kFloat,
              kOp, ": lse must be contiguous float32 (B, H, Lq)");
  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (q.numel() == 0 || N == 0) return {dq.zero_(), dk.zero_(), dv.zero_()};
  const float s = static_cast<float>(scale);
  // One task per head: dK and dV sum over all of its query rows.
  at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buffer;
    QueryRow rows[kMaxRows];
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / H, h = task % H;
      const Packed p = pack_head(k, v, b, h, buffer, /*with_grads=*/true);
      const Rows<const float> qr = head_rows<const float>(q, b, h);
      const Rows<const float> gr = head_rows<const float>(grad_out, b, h);
      const Rows<const float> outr = head_rows<const float>(out, b, h);
      const Rows<float> dqr = head_rows<float>(dq, b, h);
      const float* l = lse.const_data_ptr<float>() + task * Lq;
      for (int64_t i = 0; i < Lq; i += kMaxRows) {
        const int n = static_cast<int>(std::min<int64_t>(kMaxRows, Lq - i));
        for (int r = 0; r < n; ++r) {
          QueryRow& row = rows[r];
          scaled_row(qr, i + r, D, s, row.qs);
          scaled_row(gr, i + r, D, 1.f, row.g);
          row.delta = 0.f;
          for (int64_t d = 0; d < D; ++d) row.delta += row.g[d] * outr.row(i + r)[d];
          row.lse = l[i + r], row.out = dqr.row(i + r);
        }
        backward_rows(p, rows, n, s);
      }
      unpack_transposed(p.dkt, N, D, p.ld, head_rows<float>(dk, b, h));
      unpack_transposed(p.dvt, N, D, p.ld, head_rows<float>(dv, b, h));
    }
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace fastseq::attention_cpu

TORCH_LIBRARY_IMPL(fastseq, CPU, m) {
  m.impl("attention_small_head_forward", &fastseq::attention_cpu::forward);
  m.impl("attention_small_head_backward", &fastseq::attention_cpu::backward);
}
