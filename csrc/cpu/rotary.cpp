// Rotary positional embedding, CPU kernel of `fastseq::rotary_kernel`.
//
// One pass over the (b, n) token rows, parallel across rows. For each token the cos/sin row is
// turned once into per-pair coefficients (see `sine_coefficients`), which then serve every head of
// q and of k. Heads whose last dim is contiguous (input and output) take a vectorized path, and so
// do heads whose output alone is (gathered first); any other layout takes a scalar strided path. The op is memory bound: every element of q and k is
// read once and written once.
//
// The extension is compiled for the baseline ISA (x86-64: SSE2, no F16C), so on x86 the contiguous
// heads also have an AVX2 + F16C path, compiled with a target attribute and chosen at run time when
// PyTorch's own CPU capability is AVX2 or better (ATEN_CPU_CAPABILITY=default turns it off).

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <ATen/Version.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "rotary_args.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define FASTSEQ_AVX2_PATH 1
#define FASTSEQ_TARGET_AVX2 __attribute__((target("avx2,f16c")))
#endif

namespace fastseq::rotary {
namespace {

using at::vec::Vectorized;

// Rotation coefficients of one token's R/2 pairs: y1 = c1 x1 + a1 x2, y2 = c2 x2 + a2 x1.
template <typename acc_t>
struct Coeffs {
  const acc_t* c1;
  const acc_t* c2;
  const acc_t* a1;
  const acc_t* a2;
  int64_t pairs;
};

// Tokens per tile: the unit whose coefficients are computed once and then applied to every head.
constexpr int64_t kTileTokens = 16;

// The coefficients of a tile of tokens.
template <typename acc_t>
class CoeffTile {
 public:
  explicit CoeffTile(int64_t pairs) : pairs_(pairs), storage_(kTileTokens * 4 * pairs) {}

  template <typename table_t>
  void load(const Params& p, int64_t b, int64_t n, int64_t slot) {
    const int64_t pos = token_position(p, b, n);
    const auto* cos = static_cast<const table_t*>(p.cos) + b * p.cos_stride[0] + pos * p.cos_stride[1];
    const auto* sin = static_cast<const table_t*>(p.sin) + b * p.sin_stride[0] + pos * p.sin_stride[1];
    acc_t* c1 = storage_.data() + slot * 4 * pairs_;
    acc_t* c2 = c1 + pairs_;
    acc_t* a1 = c2 + pairs_;
    acc_t* a2 = a1 + pairs_;
    for (int64_t j = 0; j < pairs_; ++j) {
      int64_t w1, w2;
      table_columns(p, j, w1, w2);
      c1[j] = static_cast<acc_t>(cos[w1 * p.cos_stride[2]]);
      c2[j] = static_cast<acc_t>(cos[w2 * p.cos_stride[2]]);
      const auto s1 = static_cast<acc_t>(sin[w1 * p.sin_stride[2]]);
      const auto s2 = static_cast<acc_t>(sin[w2 * p.sin_stride[2]]);
      sine_coefficients(p.conjugate, s1, s2, a1[j], a2[j]);
    }
  }

  Coeffs<acc_t> operator[](int64_t slot) const {
    const acc_t* base = storage_.data() + slot * 4 * pairs_;
    return {base, base + pairs_, base + 2 * pairs_, base + 3 * pairs_, pairs_};
  }

 private:
  int64_t pairs_;
  std::vector<acc_t> storage_;
};

// Loads and stores 2 * Vectorized<acc_t>::size() elements of scalar_t as two acc_t vectors.
// Half/bfloat16 convert through a small buffer in plain loops, which the compiler vectorizes; on a
// baseline build this is faster than at::vec's generic load_to_float / convert_from_float.
template <typename scalar_t, typename acc_t>
struct VecIO {
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kWidth = 2 * Vec::size();

  static std::pair<Vec, Vec> load(const scalar_t* ptr) {
    if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
      __at_align__ acc_t buf[kWidth];
      for (int64_t i = 0; i < kWidth; ++i) {
        buf[i] = static_cast<acc_t>(ptr[i]);
      }
      return {Vec::loadu(buf), Vec::loadu(buf + Vec::size())};
    } else {
      return {Vec::loadu(ptr), Vec::loadu(ptr + Vec::size())};
    }
  }

  static void store(scalar_t* ptr, const Vec& lo, const Vec& hi) {
    if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
      __at_align__ acc_t buf[kWidth];
      lo.store(buf);
      hi.store(buf + Vec::size());
      for (int64_t i = 0; i < kWidth; ++i) {
        ptr[i] = static_cast<scalar_t>(buf[i]);
      }
    } else {
      lo.store(ptr);
      hi.store(ptr + Vec::size());
    }
  }
};

// Pairs [first, pairs) of one head, any strides. In place (out == x) is safe: both elements of a
// pair are read before either is written.
template <typename scalar_t, typename acc_t>
void rotate_strided(const Params& p, const scalar_t* x, int64_t x_stride, scalar_t* out, int64_t out_stride,
                    const Coeffs<acc_t>& co, int64_t first) {
  for (int64_t j = first; j < co.pairs; ++j) {
    int64_t d1, d2;
    pair_columns(p, j, d1, d2);
    const auto x1 = static_cast<acc_t>(x[d1 * x_stride]);
    const auto x2 = static_cast<acc_t>(x[d2 * x_stride]);
    out[d1 * out_stride] = static_cast<scalar_t>(co.c1[j] * x1 + co.a1[j] * x2);
    out[d2 * out_stride] = static_cast<scalar_t>(co.c2[j] * x2 + co.a2[j] * x1);
  }
}

// NeoX pairs (j, j + R/2) of a contiguous head: both halves are contiguous runs.
template <typename scalar_t, typename acc_t>
void rotate_neox_vec(const Params& p, const scalar_t* x, scalar_t* out, const Coeffs<acc_t>& co) {
  using IO = VecIO<scalar_t, acc_t>;
  using Vec = typename IO::Vec;
  const int64_t half = co.pairs;
  int64_t j = 0;
  for (; j + IO::kWidth <= half; j += IO::kWidth) {
    const auto [x1_lo, x1_hi] = IO::load(x + j);
    const auto [x2_lo, x2_hi] = IO::load(x + half + j);
    const auto rotate = [&](int64_t i, const Vec& x1, const Vec& x2, Vec& y1, Vec& y2) {
      y1 = Vec::loadu(co.c1 + i) * x1 + Vec::loadu(co.a1 + i) * x2;
      y2 = Vec::loadu(co.c2 + i) * x2 + Vec::loadu(co.a2 + i) * x1;
    };
    Vec y1_lo, y1_hi, y2_lo, y2_hi;
    rotate(j, x1_lo, x2_lo, y1_lo, y2_lo);
    rotate(j + Vec::size(), x1_hi, x2_hi, y1_hi, y2_hi);
    IO::store(out + j, y1_lo, y1_hi);
    IO::store(out + half + j, y2_lo, y2_hi);
  }
  rotate_strided(p, x, 1, out, 1, co, j);
}

// GPT-J pairs (2j, 2j + 1) of a contiguous head: load a run, split even and odd columns.
template <typename scalar_t, typename acc_t>
void rotate_interleaved_vec(const Params& p, const scalar_t* x, scalar_t* out, const Coeffs<acc_t>& co) {
  using IO = VecIO<scalar_t, acc_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t kPairs = IO::kWidth / 2;
  int64_t j = 0;
  for (; j + kPairs <= co.pairs; j += kPairs) {
    const auto [lo, hi] = IO::load(x + 2 * j);
    const auto [x1, x2] = at::vec::deinterleave2(lo, hi);
    const Vec y1 = Vec::loadu(co.c1 + j) * x1 + Vec::loadu(co.a1 + j) * x2;
    const Vec y2 = Vec::loadu(co.c2 + j) * x2 + Vec::loadu(co.a2 + j) * x1;
    const auto [out_lo, out_hi] = at::vec::interleave2(y1, y2);
    IO::store(out + 2 * j, out_lo, out_hi);
  }
  rotate_strided(p, x, 1, out, 1, co, j);
}

#ifdef FASTSEQ_AVX2_PATH
namespace avx2 {

FASTSEQ_TARGET_AVX2 inline __m256 load8(const float* ptr) {
  return _mm256_loadu_ps(ptr);
}

FASTSEQ_TARGET_AVX2 inline __m256 load8(const c10::Half* ptr) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ptr)));
}

FASTSEQ_TARGET_AVX2 inline __m256 load8(const c10::BFloat16* ptr) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ptr)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

FASTSEQ_TARGET_AVX2 inline void store8(float* ptr, __m256 v) {
  _mm256_storeu_ps(ptr, v);
}

FASTSEQ_TARGET_AVX2 inline void store8(c10::Half* ptr, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(ptr), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

// Rounds as c10::BFloat16 does, bit for bit: to nearest even, any NaN to 0x7FC0.
FASTSEQ_TARGET_AVX2 inline void store8(c10::BFloat16* ptr, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
  // packus narrows within each 128-bit lane: gather the two low quadwords.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(ptr), _mm256_castsi256_si128(packed));
}

// c * x + a * partner. No FMA, so that every path rounds as the reference does.
FASTSEQ_TARGET_AVX2 inline __m256 rotate(const float* c, __m256 x, const float* a, __m256 partner) {
  return _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(c), x), _mm256_mul_ps(_mm256_loadu_ps(a), partner));
}

// Quadwords (0, 2, 1, 3): undoes the per-lane order of shuffle_ps.
FASTSEQ_TARGET_AVX2 inline __m256 order_quadwords(__m256 v) {
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v), 0xD8));
}

template <typename scalar_t>
FASTSEQ_TARGET_AVX2 void rotate_neox(const Params& p, const scalar_t* x, scalar_t* out, const Coeffs<float>& co) {
  const int64_t half = co.pairs;
  int64_t j = 0;
  for (; j + 8 <= half; j += 8) {
    const __m256 x1 = load8(x + j);
    const __m256 x2 = load8(x + half + j);
    store8(out + j, rotate(co.c1 + j, x1, co.a1 + j, x2));
    store8(out + half + j, rotate(co.c2 + j, x2, co.a2 + j, x1));
  }
  rotate_strided(p, x, 1, out, 1, co, j);
}

template <typename scalar_t>
FASTSEQ_TARGET_AVX2 void rotate_interleaved(const Params& p, const scalar_t* x, scalar_t* out,
                                            const Coeffs<float>& co) {
  int64_t j = 0;
  for (; j + 8 <= co.pairs; j += 8) {
    const __m256 lo = load8(x + 2 * j);  // pairs j .. j+3
    const __m256 hi = load8(x + 2 * j + 8);  // pairs j+4 .. j+7
    const __m256 x1 = order_quadwords(_mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0)));
    const __m256 x2 = order_quadwords(_mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1)));
    const __m256 y1 = rotate(co.c1 + j, x1, co.a1 + j, x2);
    const __m256 y2 = rotate(co.c2 + j, x2, co.a2 + j, x1);
    const __m256 first = _mm256_unpacklo_ps(y1, y2);  // pairs j, j+1 | j+4, j+5
    const __m256 second = _mm256_unpackhi_ps(y1, y2);  // pairs j+2, j+3 | j+6, j+7
    store8(out + 2 * j, _mm256_permute2f128_ps(first, second, 0x20));
    store8(out + 2 * j + 8, _mm256_permute2f128_ps(first, second, 0x31));
  }
  rotate_strided(p, x, 1, out, 1, co, j);
}

}  // namespace avx2
#endif  // FASTSEQ_AVX2_PATH

bool use_avx2() {
#ifdef FASTSEQ_AVX2_PATH
  static const bool available = at::get_cpu_capability() != "DEFAULT" && __builtin_cpu_supports("avx2") &&
                                __builtin_cpu_supports("f16c");
  return available;
#else
  return false;
#endif
}

// One head whose last dim is contiguous in x and out.
template <typename scalar_t, typename acc_t>
void rotate_contiguous(const Params& p, const scalar_t* x, scalar_t* out, const Coeffs<acc_t>& co, bool avx2) {
#ifdef FASTSEQ_AVX2_PATH
  if constexpr (std::is_same_v<acc_t, float>) {
    if (avx2) {
      p.interleaved ? avx2::rotate_interleaved(p, x, out, co) : avx2::rotate_neox(p, x, out, co);
      return;
    }
  }
#endif
  p.interleaved ? rotate_interleaved_vec(p, x, out, co) : rotate_neox_vec(p, x, out, co);
}

// Columns [R, D) pass through; an in-place head already holds them.
template <typename scalar_t>
void copy_tail(const Params& p, const scalar_t* x, int64_t x_stride, scalar_t* out, int64_t out_stride) {
  if (x_stride == 1 && out_stride == 1) {
    std::copy(x + p.rotary_dim, x + p.head_dim, out + p.rotary_dim);
    return;
  }
  for (int64_t d = p.rotary_dim; d < p.head_dim; ++d) {
    out[d * out_stride] = x[d * x_stride];
  }
}

// One head of one token. A head whose output is contiguous but whose input is not (a gradient
// expanded from a scalar has stride 0) is gathered into `row` (head_dim elements) first: a scalar
// gather and the vector path cost a fraction of the scalar strided path.
template <typename scalar_t, typename acc_t>
void rotate_row(const Params& p, const Operand& op, int64_t t, int64_t h, const Coeffs<acc_t>& co, bool avx2,
                scalar_t* row) {
  const int64_t b = t / p.seqlen;
  const int64_t n = t % p.seqlen;
  const int64_t* os = op.out_stride;
  const auto* x = static_cast<const scalar_t*>(op.x) + b * op.x_stride[0] + n * op.x_stride[1] + h * op.x_stride[2];
  auto* out = static_cast<scalar_t*>(op.out) + b * os[0] + n * os[1] + h * os[2];
  int64_t x_stride = op.x_stride[3];
  if (x_stride != 1 && os[3] == 1 && !op.inplace) {
    for (int64_t d = 0; d < p.head_dim; ++d) {
      row[d] = x[d * x_stride];
    }
    x = row;
    x_stride = 1;
  }
  if (x_stride == 1 && os[3] == 1) {
    rotate_contiguous(p, x, out, co, avx2);
  } else {
    rotate_strided(p, x, x_stride, out, os[3], co, 0);
  }
  if (!op.inplace && p.rotary_dim < p.head_dim) {
    copy_tail(p, x, x_stride, out, os[3]);
  }
}

// Every head of one operand for the tokens [first, first + count) of a tile. The loops follow the
// operand's memory order: a (B, H, N, D) tensor viewed as (B, N, H, D) runs down each head's
// consecutive rows, instead of striding across H far-apart rows per token.
template <typename scalar_t, typename acc_t>
void rotate_tile(const Params& p, const Operand& op, int64_t first, int64_t count, const CoeffTile<acc_t>& tile,
                 bool avx2, scalar_t* row) {
  if (op.x_stride[2] > op.x_stride[1]) {
    for (int64_t h = 0; h < op.heads; ++h) {
      for (int64_t i = 0; i < count; ++i) {
        rotate_row<scalar_t>(p, op, first + i, h, tile[i], avx2, row);
      }
    }
  } else {
    for (int64_t i = 0; i < count; ++i) {
      for (int64_t h = 0; h < op.heads; ++h) {
        rotate_row<scalar_t>(p, op, first + i, h, tile[i], avx2, row);
      }
    }
  }
}

template <typename scalar_t, typename table_t>
void rotary_cpu(const Params& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tokens = p.batch * p.seqlen;
  const int64_t per_token = (p.q.heads + p.k.heads) * p.head_dim;
  if (tokens == 0 || per_token == 0) {
    return;
  }
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / per_token);
  const bool avx2 = use_avx2();
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    CoeffTile<acc_t> tile(p.rotary_dim / 2);
    std::vector<scalar_t> row(p.head_dim);
    for (int64_t first = begin; first < end; first += kTileTokens) {
      const int64_t count = std::min(kTileTokens, end - first);
      for (int64_t i = 0; i < count; ++i) {
        tile.template load<table_t>(p, (first + i) / p.seqlen, (first + i) % p.seqlen, i);
      }
      rotate_tile<scalar_t>(p, p.q, first, count, tile, avx2, row.data());
      rotate_tile<scalar_t>(p, p.k, first, count, tile, avx2, row.data());
    }
  });
}

void rotary_kernel_cpu(const at::Tensor& q_out, const at::Tensor& k_out, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& cos, const at::Tensor& sin, const std::optional<at::Tensor>& positions,
                       int64_t offset, int64_t rotary_dim, bool interleaved, bool conjugate) {
  TORCH_CHECK(q.device().is_cpu(), "rotary_kernel (CPU): q must be a CPU tensor");
  const Params p = make_params(q_out, k_out, q, k, cos, sin, positions, offset, rotary_dim, interleaved, conjugate);
  const bool float_table = cos.scalar_type() == at::kFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rotary_kernel_cpu", [&] {
    if (float_table) {
      rotary_cpu<scalar_t, float>(p);
    } else {
      rotary_cpu<scalar_t, scalar_t>(p);
    }
  });
}

}  // namespace
}  // namespace fastseq::rotary

TORCH_LIBRARY_IMPL(fastseq, CPU, m) {
  m.impl("rotary_kernel", &fastseq::rotary::rotary_kernel_cpu);
}
