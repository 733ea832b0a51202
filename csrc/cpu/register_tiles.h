// How the packed GEMMs (csrc/cpu/packed_gemm_avx512.h, packed_gemm_bf16.h) cut the rows of A into
// register tiles and the columns of B into groups of panels, and the switch from a tile's
// run-time shape to its kernel's template arguments.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace fastseq::cpu {

constexpr int64_t kMaxTileRows = 6;

// tile(m, rows) for consecutive tiles covering rows [0, M), at most kMaxTileRows each and as even
// as they can be (8 rows: 4 + 4, not 6 + 2): a tile of one or two rows has too few accumulators
// to hide the FMA latency.
template <typename Tile>
inline void for_each_row_tile(int64_t M, const Tile& tile) {
  const int64_t tiles = (M + kMaxTileRows - 1) / kMaxTileRows;
  for (int64_t index = 0, m = 0; index < tiles; ++index) {
    const int64_t left = tiles - index;
    const int64_t rows = (M - m + left - 1) / left;
    tile(m, rows);
    m += rows;
  }
}

// group(v, np) over the 16-column panels [v0, v1) of an N-column B: up to four full panels per
// group (one pass over A for all of them), a ragged last panel (its own mask) alone.
template <typename Group>
inline void for_each_panel_group(int64_t N, int64_t v0, int64_t v1, const Group& group) {
  const int64_t full = N / 16;
  for (int64_t v = v0; v < v1;) {
    const int np = v < full ? static_cast<int>(std::min<int64_t>({4, v1 - v, full - v})) : 1;
    group(v, np);
    v += np;
  }
}

template <int N>
using Int = std::integral_constant<int, N>;

// kernel(Int<rows>, Int<np>) for rows in [1, 6] and np in [1, 4].
template <typename Kernel>
inline void with_tile_shape(int64_t rows, int np, const Kernel& kernel) {
  auto with_rows = [&](auto panels) {
    switch (rows) {
      case 6: return kernel(Int<6>{}, panels);
      case 5: return kernel(Int<5>{}, panels);
      case 4: return kernel(Int<4>{}, panels);
      case 3: return kernel(Int<3>{}, panels);
      case 2: return kernel(Int<2>{}, panels);
      default: return kernel(Int<1>{}, panels);
    }
  };
  switch (np) {
    case 4: return with_rows(Int<4>{});
    case 3: return with_rows(Int<3>{});
    case 2: return with_rows(Int<2>{});
    default: return with_rows(Int<1>{});
  }
}

}  // namespace fastseq::cpu
