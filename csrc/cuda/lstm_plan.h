// How the persistent LSTM kernels (csrc/cuda/lstm.cu) split the hidden units over thread blocks.
// Plain C++: the Python side asks the same question (through fastseq._C) before choosing the
// kernel, so that inputs it cannot take go to another backend instead of failing.
#pragma once

#include <algorithm>
#include <cstdint>

namespace fastseq::lstm {

// At most this many blocks of the persistent kernels share an SM: registers (up to 32 float
// accumulators a thread at 256 threads) allow two.
constexpr int64_t kMaxBlocksPerSM = 2;
constexpr int64_t kSharedReservedPerBlock = 1024;  // what the runtime keeps per block

// Hidden units per block (1, 2, 4 or 8) for which the block's slice of W_hh (4 U H elements)
// fits in shared memory and all ceil(H / U) blocks are resident at once; the smallest such U, as
// more blocks share the per-step work. 0 when none fits.
inline int plan_units(int64_t hidden, int64_t element_size, int64_t sms, int64_t smem_per_block,
                      int64_t smem_per_sm) {
  for (int units = 1; units <= 8; units *= 2) {
    const int64_t smem = 4 * units * hidden * element_size;
    if (smem > smem_per_block) return 0;
    const int64_t per_sm = std::min(kMaxBlocksPerSM, smem_per_sm / (smem + kSharedReservedPerBlock));
    if ((hidden + units - 1) / units <= per_sm * sms) return units;
  }
  return 0;
}

}  // namespace fastseq::lstm
