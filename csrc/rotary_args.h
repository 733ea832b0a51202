// Arguments of the fused rotary kernels (CPU and CUDA), and the per-pair math both share.
//
// `make_params` checks the tensors of one `fastseq::rotary_kernel` call and flattens them into
// `Params`: raw pointers and element strides, a plain struct that a CUDA kernel takes by value.
// Only what is cheap is checked (shapes, dtypes, devices, output overlap, and positions held on
// the CPU); positions on a GPU are trusted: the Python side checks that every position lies
// inside the cos/sin table (except while torch.compile traces it, which cannot sync).
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

namespace fastseq::rotary {

// Where token (b, n) sits in the cos/sin table.
enum class PositionMode : int32_t {
  kOffset = 0,    // offset + n
  kPerBatch = 1,  // offset + positions[b] + n  (positions: (B,), e.g. KV-cache lengths)
  kIds = 2,       // positions[b, n]            (positions: (B, N) position ids)
};

// One rotated operand (q or k): input and output views (B, N, H, D), strides in elements.
struct Operand {
  const void* x;
  void* out;
  int64_t heads;
  int64_t x_stride[4];
  int64_t out_stride[4];
  bool inplace;  // out is x: the columns past the rotary dim are left untouched
};

struct Params {
  Operand q, k;
  int64_t batch, seqlen, head_dim, rotary_dim;
  // Tables (Bc, S, W); the batch stride is 0 when Bc == 1.
  const void* cos;
  const void* sin;
  int64_t cos_stride[3];
  int64_t sin_stride[3];
  bool half_table;  // W == R/2: one angle per pair; else W == R: one value per column
  const void* positions;
  bool positions_int64;
  int64_t positions_stride[2];
  PositionMode mode;
  int64_t offset;
  bool interleaved;  // GPT-J pairs (2j, 2j+1); NeoX pairs (j, j + R/2) otherwise
  bool conjugate;    // the inverse (transposed) rotation: the backward
};

C10_HOST_DEVICE inline int64_t token_position(const Params& p, int64_t b, int64_t n) {
  if (p.mode == PositionMode::kOffset) {
    return p.offset + n;
  }
  const int64_t i = b * p.positions_stride[0] + (p.mode == PositionMode::kIds ? n * p.positions_stride[1] : 0);
  const int64_t pos = p.positions_int64 ? static_cast<const int64_t*>(p.positions)[i]
                                        : static_cast<const int32_t*>(p.positions)[i];
  return p.mode == PositionMode::kIds ? pos : p.offset + pos + n;
}

// Columns of pair j in a head.
C10_HOST_DEVICE inline void pair_columns(const Params& p, int64_t j, int64_t& d1, int64_t& d2) {
  d1 = p.interleaved ? 2 * j : j;
  d2 = p.interleaved ? 2 * j + 1 : j + p.rotary_dim / 2;
}

// Columns of pair j's angles in a table row: a half table holds one angle per pair, a full table
// (Hugging Face layout) one value per rotated column.
C10_HOST_DEVICE inline void table_columns(const Params& p, int64_t j, int64_t& w1, int64_t& w2) {
  if (p.half_table) {
    w1 = w2 = j;
  } else {
    pair_columns(p, j, w1, w2);
  }
}

// Rotation of one pair written as y1 = c1 x1 + a1 x2, y2 = c2 x2 + a2 x1, with the signs of the
// sines folded into a1, a2. Forward: y1 = c1 x1 - s1 x2, y2 = c2 x2 + s2 x1. Conjugate (the
// transpose of the forward's 2x2 matrix [[c1, -s1], [s2, c2]]): y1 = c1 x1 + s2 x2,
// y2 = c2 x2 - s1 x1.
template <typename T>
C10_HOST_DEVICE inline void sine_coefficients(bool conjugate, T s1, T s2, T& a1, T& a2) {
  a1 = conjugate ? s2 : -s1;
  a2 = conjugate ? -s1 : s2;
}

inline void fill_strides(const at::Tensor& t, int64_t* strides) {
  for (int64_t i = 0; i < t.dim(); ++i) {
    strides[i] = t.stride(i);
  }
}

inline Operand make_operand(const at::Tensor& out, const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 4, "rotary_kernel: ", name, " must be 4-D (B, N, H, D), got ", x.dim(), "-D");
  TORCH_CHECK(out.sizes() == x.sizes(), "rotary_kernel: ", name, "_out shape ", out.sizes(),
              " differs from ", name, " shape ", x.sizes());
  Operand op{};
  op.x = x.const_data_ptr();
  op.out = out.mutable_data_ptr();
  op.heads = x.size(2);
  fill_strides(x, op.x_stride);
  fill_strides(out, op.out_stride);
  op.inplace = out.numel() > 0 && out.const_data_ptr() == x.const_data_ptr();
  if (op.inplace) {
    TORCH_CHECK(out.strides() == x.strides(), "rotary_kernel: in-place ", name,
                "_out must have the strides of ", name);
  }
  if (out.numel() > 0) {
    // Each output element is written by one thread: outputs must not overlap themselves or their
    // input (other than being the same tensor).
    at::assert_no_internal_overlap(out);
    at::assert_no_partial_overlap(out, x);
  }
  return op;
}

inline Params make_params(const at::Tensor& q_out, const at::Tensor& k_out, const at::Tensor& q,
                          const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                          const std::optional<at::Tensor>& positions, int64_t offset,
                          int64_t rotary_dim, bool interleaved, bool conjugate) {
  Params p{};
  p.q = make_operand(q_out, q, "q");
  p.k = make_operand(k_out, k, "k");
  p.batch = q.size(0);
  p.seqlen = q.size(1);
  p.head_dim = q.size(3);
  TORCH_CHECK(k.size(0) == p.batch && k.size(1) == p.seqlen && k.size(3) == p.head_dim,
              "rotary_kernel: k ", k.sizes(), " and q ", q.sizes(), " must agree in B, N and D");
  const auto device = q.device();
  const auto dtype = q.scalar_type();
  for (const at::Tensor* t : {&k, &q_out, &k_out}) {
    TORCH_CHECK(t->scalar_type() == dtype, "rotary_kernel: q, k and the outputs must share one dtype");
    TORCH_CHECK(t->device() == device, "rotary_kernel: q, k and the outputs must be on one device");
  }

  TORCH_CHECK(rotary_dim >= 2 && rotary_dim % 2 == 0 && rotary_dim <= p.head_dim,
              "rotary_kernel: rotary_dim must be even with 2 <= rotary_dim <= D = ", p.head_dim,
              ", got ", rotary_dim);
  p.rotary_dim = rotary_dim;

  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes(),
              "rotary_kernel: cos and sin must be (Bc, S, W) of one shape, got ", cos.sizes(), " and ",
              sin.sizes());
  TORCH_CHECK(cos.scalar_type() == sin.scalar_type() &&
                  (cos.scalar_type() == at::kFloat || cos.scalar_type() == dtype),
              "rotary_kernel: cos and sin must share a dtype, float32 or q's dtype");
  TORCH_CHECK(cos.device() == device && sin.device() == device,
              "rotary_kernel: cos and sin must be on q's device");
  TORCH_CHECK(cos.size(0) == 1 || cos.size(0) == p.batch, "rotary_kernel: cos batch dim must be 1 or B = ",
              p.batch, ", got ", cos.size(0));
  const int64_t width = cos.size(2);
  TORCH_CHECK(width == rotary_dim || 2 * width == rotary_dim, "rotary_kernel: cos last dim must be R/2 or R (R = ",
              rotary_dim, "), got ", width);
  p.half_table = 2 * width == rotary_dim;
  p.cos = cos.const_data_ptr();
  p.sin = sin.const_data_ptr();
  fill_strides(cos, p.cos_stride);
  fill_strides(sin, p.sin_stride);
  if (cos.size(0) == 1) {
    p.cos_stride[0] = p.sin_stride[0] = 0;
  }

  TORCH_CHECK(offset >= 0, "rotary_kernel: offset must be >= 0, got ", offset);
  p.offset = offset;
  p.mode = PositionMode::kOffset;
  if (positions.has_value() && positions->defined()) {
    const at::Tensor& pos = *positions;
    TORCH_CHECK(pos.scalar_type() == at::kInt || pos.scalar_type() == at::kLong,
                "rotary_kernel: positions must be int32 or int64, got ", pos.scalar_type());
    TORCH_CHECK(pos.device() == device, "rotary_kernel: positions must be on q's device");
    TORCH_CHECK((pos.dim() == 1 && pos.size(0) == p.batch) ||
                    (pos.dim() == 2 && pos.size(0) == p.batch && pos.size(1) == p.seqlen),
                "rotary_kernel: positions must be (B,) or (B, N) = (", p.batch, ", ", p.seqlen, "), got ",
                pos.sizes());
    if (pos.device().is_cpu() && pos.numel() > 0 && p.seqlen > 0) {
      // A position outside the table would read past it. Row b of per-batch offsets covers
      // offset + pos[b] .. offset + pos[b] + seqlen - 1; ids cover pos[b, n] alone. The bounds are
      // moved to the constant side, so that no sum involving a caller's value can wrap around.
      const at::Tensor wide = pos.to(at::kLong);
      const int64_t low = wide.min().item<int64_t>();
      const int64_t high = wide.max().item<int64_t>();
      const int64_t table = cos.size(1);
      const int64_t span = pos.dim() == 1 ? p.seqlen : 1;
      const int64_t base = pos.dim() == 1 ? offset : 0;
      const bool fits = base <= table - span && low >= -base && high <= table - span - base;
      TORCH_CHECK(fits, "rotary_kernel: positions span ", low, "..", high, " (offset ", base, ", ", span,
                  " tokens each), past the cos/sin table of ", table, " positions");
    }
    p.mode = pos.dim() == 1 ? PositionMode::kPerBatch : PositionMode::kIds;
    p.positions = pos.const_data_ptr();
    p.positions_int64 = pos.scalar_type() == at::kLong;
    fill_strides(pos, p.positions_stride);
  } else {
    TORCH_CHECK(p.batch * p.seqlen == 0 || offset <= cos.size(1) - p.seqlen, "rotary_kernel: offset ", offset,
                " and ", p.seqlen, " tokens reach past the cos/sin table of ", cos.size(1), " positions");
  }
  p.interleaved = interleaved;
  p.conjugate = conjugate;
  return p;
}

}  // namespace fastseq::rotary
