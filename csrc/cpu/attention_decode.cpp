// Attention of a few new query rows over a KV cache on the CPU: `fastseq::attention_decode_cpu`.
//
// q (B, H, Lq, D) against k_cache and v_cache (B, Hk, S, D), H a multiple of Hk (grouped-query
// heads read their group's cache rows as they lie, never repeated); query row i of sequence b sees
// the keys n <= cache_lengths[b] - Lq + i (the Lq new tokens are the cache's last ones). Returns
// the output (B, H, Lq, D) in q's dtype and the log-sum-exp (B, H, Lq), float32 (float64 for
// float64 inputs); a row that sees no key gets zeros and -inf.
//
// A decoding step's attention is small (one row per head against a few hundred keys), so what
// costs is everything around the arithmetic: masks over the padding, copies that drop it, a
// library call's setup. Here each query row reads exactly the keys it sees, where they lie, in
// two passes (scores and their maximum; then the exponentials, their sum and the weighted sum of
// the values), with one thread per group of rows once there is enough work to split. float32 on
// AVX-512 takes four keys' scores at a time and vectorised exponentials.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "lstm_common.h"
#include "attention_exp.h"
#include "small_gemm_avx512.h"

namespace fastseq::decode {

// Multiply-adds per thread below which the rows are not split between threads.
constexpr int64_t kMinParallelWork = int64_t(1) << 16;

template <typename T, typename A>
A dot(const A* q, const T* k, int64_t D) {
  A sum = 0;
  for (int64_t d = 0; d < D; ++d) {
    sum += q[d] * static_cast<A>(k[d]);
  }
  return sum;
}

template <typename T, typename A>
void axpy(A p, const T* v, A* acc, int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    acc[d] += p * static_cast<A>(v[d]);
  }
}


// Where one query row reads and writes. `scores` holds S values, `qs` and `acc` D each.
template <typename T, typename A>
struct Row {
  const T* q;
  const T* k;
  const T* v;
  int64_t k_stride, v_stride;  // between consecutive keys / values
  int64_t visible;             // keys 0 .. visible - 1
  T* out;
  A* lse;
};

#ifdef FASTSEQ_SMALL_GEMM_AVX512
#define FASTSEQ_DECODE_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma")))

// One float32 query row (qs already scaled): the scores of four keys at a time (four
// accumulators, summed across their lanes together), their exponentials 16 at a time, then the
// weighted sum of the values one 16-wide column block at a time, held in a register over all keys.
FASTSEQ_DECODE_AVX512 void attend_avx512(const Row<float, float>& row, int64_t D, const float* qs,
                                         float* scores) {
  const int64_t n_keys = row.visible;
  int64_t j = 0;
  for (; j + 4 <= n_keys; j += 4) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 mask = cpu::avx512::lanes(D - d);
      const __m512 q = _mm512_maskz_loadu_ps(mask, qs + d);
      for (int i = 0; i < 4; ++i) {
        acc[i] = _mm512_fmadd_ps(q, _mm512_maskz_loadu_ps(mask, row.k + (j + i) * row.k_stride + d), acc[i]);
      }
    }
    _mm_storeu_ps(scores + j, cpu::avx512::sum_lanes(acc[0], acc[1], acc[2], acc[3]));
  }
  for (; j < n_keys; ++j) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 mask = cpu::avx512::lanes(D - d);
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, qs + d),
                            _mm512_maskz_loadu_ps(mask, row.k + j * row.k_stride + d), acc);
    }
    scores[j] = _mm512_reduce_add_ps(acc);
  }
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (j = 0; j < n_keys; j += 16) {
    top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, cpu::avx512::lanes(n_keys - j), scores + j));
  }
  const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 total = _mm512_setzero_ps();
  for (j = 0; j < n_keys; j += 16) {
    const __mmask16 mask = cpu::avx512::lanes(n_keys - j);
    const __m512 p = cpu::avx512::exp_softmax(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, scores + j), shift));
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(mask, p));
    _mm512_mask_storeu_ps(scores + j, mask, p);
  }
  const float sum = _mm512_reduce_add_ps(total);
  const __m512 inverse = _mm512_set1_ps(1.0f / sum);
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 mask = cpu::avx512::lanes(D - d);
    __m512 acc = _mm512_setzero_ps();
    for (j = 0; j < n_keys; ++j) {
      acc = _mm512_fmadd_ps(_mm512_set1_ps(scores[j]),
                            _mm512_maskz_loadu_ps(mask, row.v + j * row.v_stride + d), acc);
    }
    _mm512_mask_storeu_ps(row.out + d, mask, _mm512_mul_ps(acc, inverse));
  }
  *row.lse = _mm512_reduce_max_ps(top) + std::log(sum);
}

#undef FASTSEQ_DECODE_AVX512
#endif

template <typename T, typename A>
void attend(const Row<T, A>& row, int64_t D, A scale, A* qs, A* scores, A* acc) {
  if (row.visible <= 0) {
    std::fill(row.out, row.out + D, T(0));
    *row.lse = -std::numeric_limits<A>::infinity();
    return;
  }
  for (int64_t d = 0; d < D; ++d) {
    qs[d] = static_cast<A>(row.q[d]) * scale;
  }
#ifdef FASTSEQ_SMALL_GEMM_AVX512
  if constexpr (std::is_same_v<T, float>) {
    if (lstm::cpu_has_avx512()) {
      attend_avx512(row, D, qs, scores);
      return;
    }
  }
#endif
  A top = -std::numeric_limits<A>::infinity();
  for (int64_t n = 0; n < row.visible; ++n) {
    scores[n] = dot<T, A>(qs, row.k + n * row.k_stride, D);
    top = std::max(top, scores[n]);
  }
  std::fill(acc, acc + D, A(0));
  A total = 0;
  for (int64_t n = 0; n < row.visible; ++n) {
    const A p = std::exp(scores[n] - top);
    total += p;
    axpy<T, A>(p, row.v + n * row.v_stride, acc, D);
  }
  for (int64_t d = 0; d < D; ++d) {
    row.out[d] = static_cast<T>(acc[d] / total);
  }
  *row.lse = top + std::log(total);
}

std::tuple<at::Tensor, at::Tensor> attention_decode_cpu(const at::Tensor& q_in, const at::Tensor& k_cache,
                                                        const at::Tensor& v_cache,
                                                        const at::Tensor& cache_lengths, double scale) {
  TORCH_CHECK(q_in.dim() == 4 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "attention_decode_cpu: q (B, H, Lq, D) and caches (B, Hk, S, D) expected, got q ",
              q_in.sizes(), ", k_cache ", k_cache.sizes(), ", v_cache ", v_cache.sizes());
  const int64_t B = q_in.size(0), H = q_in.size(1), Lq = q_in.size(2), D = q_in.size(3);
  const int64_t Hk = k_cache.size(1), S = k_cache.size(2);
  TORCH_CHECK(k_cache.size(0) == B && k_cache.size(3) == D && Hk > 0 && H % Hk == 0,
              "attention_decode_cpu: caches ", k_cache.sizes(), " do not fit q ", q_in.sizes());
  TORCH_CHECK(k_cache.scalar_type() == q_in.scalar_type() && v_cache.scalar_type() == q_in.scalar_type(),
              "attention_decode_cpu: q, k_cache and v_cache must share a dtype");
  TORCH_CHECK(cache_lengths.dim() == 1 && cache_lengths.size(0) == B,
              "attention_decode_cpu: cache_lengths must be (B,), got ", cache_lengths.sizes());
  const at::Tensor q = q_in.contiguous();
  const at::Tensor k = k_cache.stride(3) == 1 ? k_cache : k_cache.contiguous();
  const at::Tensor v = v_cache.stride(3) == 1 ? v_cache : v_cache.contiguous();
  const at::Tensor lengths = cache_lengths.to(at::kLong).contiguous();
  at::Tensor out = at::empty({B, H, Lq, D}, q.options());
  const auto lse_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor lse = at::empty({B, H, Lq}, q.options().dtype(lse_type));
  const int64_t rows = B * H * Lq;
  if (rows == 0) {
    return {out, lse};
  }
  const int64_t group = H / Hk;
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_decode_cpu", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    const T* qp = q.const_data_ptr<T>();
    const T* kp = k.const_data_ptr<T>();
    const T* vp = v.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    A* lp = lse.mutable_data_ptr<A>();
    const int64_t work_per_row = 2 * std::max<int64_t>(S, 1) * std::max<int64_t>(D, 1);
    const int64_t grain = std::max<int64_t>(1, kMinParallelWork / work_per_row);
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      std::vector<A> buffer(2 * D + S);
      A* qs = buffer.data();
      A* acc = qs + D;
      A* scores = acc + D;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / (H * Lq), h = (r / Lq) % H, i = r % Lq, hk = h / group;
        const int64_t visible = std::clamp<int64_t>(len[b] - Lq + i + 1, 0, S);
        const Row<T, A> row{qp + r * D,
                            kp + b * k.stride(0) + hk * k.stride(1),
                            vp + b * v.stride(0) + hk * v.stride(1),
                            k.stride(2), v.stride(2), visible, op + r * D, lp + r};
        attend<T, A>(row, D, static_cast<A>(scale), qs, scores, acc);
      }
    });
  });
  return {out, lse};
}

// Writes k and v (B, Hk, L, D) into the caches (B, Hk, S, D) at positions cache_lengths[b] ..
// cache_lengths[b] + L - 1 of each sequence b, in place: a row copy each, where a scatter through
// ATen would first build its index tensor (and, traced, copy the whole cache).
void kv_cache_append_cpu(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor& cache_lengths) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k.dim() == 4 &&
                  k.sizes() == v.sizes() && k.size(0) == k_cache.size(0) &&
                  k.size(1) == k_cache.size(1) && k.size(3) == k_cache.size(3),
              "kv_cache_append_cpu: k and v (B, Hk, L, D) must fit the caches (B, Hk, S, D), got k ",
              k.sizes(), " and caches ", k_cache.sizes());
  const int64_t B = k.size(0), Hk = k.size(1), L = k.size(2), D = k.size(3), S = k_cache.size(2);
  const at::Tensor lengths = cache_lengths.to(at::kLong).contiguous();
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(len[b] >= 0 && len[b] + L <= S, "kv_cache_append_cpu: appending ", L,
                " tokens at position ", len[b], " overflows the cache of ", S, " positions");
  }
  for (const at::Tensor* cache : {&k_cache, &v_cache}) {
    TORCH_CHECK(cache->stride(3) == 1 || D == 1, "kv_cache_append_cpu: caches need unit stride along D");
  }
  const at::Tensor ks = k.to(k_cache.scalar_type()), vs = v.to(v_cache.scalar_type());
  const int64_t row_bytes = D * k_cache.element_size();
  auto* kc = static_cast<char*>(k_cache.data_ptr());
  auto* vc = static_cast<char*>(v_cache.data_ptr());
  const auto* kn = static_cast<const char*>(ks.const_data_ptr());
  const auto* vn = static_cast<const char*>(vs.const_data_ptr());
  const int64_t e = k_cache.element_size();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < Hk; ++h) {
      for (int64_t i = 0; i < L; ++i) {
        const int64_t slot = len[b] + i;
        const auto at_slot = [&](const at::Tensor& t) {
          return (b * t.stride(0) + h * t.stride(1) + slot * t.stride(2)) * e;
        };
        const auto at_new = [&](const at::Tensor& t) {
          return (b * t.stride(0) + h * t.stride(1) + i * t.stride(2)) * e;
        };
        if (ks.stride(3) == 1 && vs.stride(3) == 1) {
          std::memcpy(kc + at_slot(k_cache), kn + at_new(ks), row_bytes);
          std::memcpy(vc + at_slot(v_cache), vn + at_new(vs), row_bytes);
        } else {
          k_cache[b][h][slot].copy_(ks[b][h][i]);
          v_cache[b][h][slot].copy_(vs[b][h][i]);
        }
      }
    }
  }
}

}  // namespace fastseq::decode

TORCH_LIBRARY_IMPL(fastseq, CPU, m) {
  m.impl("attention_decode_cpu", &fastseq::decode::attention_decode_cpu);
  m.impl("kv_cache_append_cpu", &fastseq::decode::kv_cache_append_cpu);
}
