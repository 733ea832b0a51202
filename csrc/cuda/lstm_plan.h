// How the persistent LSTM and RNN kernels (csrc/cuda/lstm.cu, rnn.cu) split the hidden units over
// thread blocks, and how the tensor-core kernels (csrc/cuda/lstm_tensor_cores.cuh) split a block's
// product over its warps. Plain C++: the Python side asks the same question (through fastseq._C) before
// choosing the kernel, so that inputs it cannot take go to another backend instead of failing,
// and the CPU tests check the plans.
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef __CUDACC__
#define FASTSEQ_HOST_DEVICE __host__ __device__
#else
#define FASTSEQ_HOST_DEVICE
#endif

namespace fastseq::lstm {

constexpr int kThreads = 256;  // per block, in every persistent kernel
constexpr int kWarps = kThreads / 32;

// At most this many blocks of the persistent kernels share an SM: registers (up to 32 float
// accumulators a thread at 256 threads) allow two.
constexpr int64_t kMaxBlocksPerSM = 2;
constexpr int64_t kSharedReservedPerBlock = 1024;  // what the runtime keeps per block

// Whether the CUDA-core kernels' ceil(H / units) blocks, each holding `gates` units H elements of
// W_hh in shared memory (4 gates for the LSTM, 1 for the Elman RNN), are all resident at once.
inline bool units_fit(int64_t units, int64_t hidden, int64_t element_size, int64_t sms,
                      int64_t smem_per_block, int64_t smem_per_sm, int64_t gates = 4) {
  const int64_t smem = gates * units * hidden * element_size;
  if (smem > smem_per_block) return false;
  const int64_t per_sm = std::min(kMaxBlocksPerSM, smem_per_sm / (smem + kSharedReservedPerBlock));
  return (hidden + units - 1) / units <= per_sm * sms;
}

// Hidden units per block (a power of two up to `max_units`) for which the block's slice of W_hh
// (gates U H elements) fits in shared memory and all ceil(H / U) blocks are resident at once; the
// smallest such U, as more blocks share the per-step work. 0 when none fits. A thread keeps
// gates U float accumulators: max_units 8 for the LSTM, 32 for the RNN.
inline int plan_units_of(int64_t gates, int max_units, int64_t hidden, int64_t element_size,
                         int64_t sms, int64_t smem_per_block, int64_t smem_per_sm) {
  for (int units = 1; units <= max_units; units *= 2) {
    if (gates * units * hidden * element_size > smem_per_block) return 0;
    if (units_fit(units, hidden, element_size, sms, smem_per_block, smem_per_sm, gates)) {
      return units;
    }
  }
  return 0;
}

// The LSTM's plan: 4 gates, up to 8 units a block.
inline int plan_units(int64_t hidden, int64_t element_size, int64_t sms, int64_t smem_per_block,
                      int64_t smem_per_sm) {
  return plan_units_of(4, 8, hidden, element_size, sms, smem_per_block, smem_per_sm);
}

// The Elman RNN's plan (csrc/cuda/rnn.cu): 1 gate, up to 32 units a block (one per lane).
inline int plan_rnn_units(int64_t hidden, int64_t element_size, int64_t sms,
                          int64_t smem_per_block, int64_t smem_per_sm) {
  return plan_units_of(1, 32, hidden, element_size, sms, smem_per_block, smem_per_sm);
}

// ---------------------------------------------------------------------------------------------
// Tensor cores: a block's per-step product (rows x depth) by (depth x cols), all multiples of
// 16, in 16 x 16 tiles; each tile's depth is split `k_splits` ways so that all warps have work
// when tiles are few. Warp w takes work items w, w + warps, ... (item = tile k_splits + split).

constexpr int64_t kTile = 16;

inline FASTSEQ_HOST_DEVICE int64_t round_up(int64_t n, int64_t multiple) {
  return (n + multiple - 1) / multiple * multiple;
}

struct TilePlan {
  int64_t rows, cols, depth, k_splits;

  FASTSEQ_HOST_DEVICE int64_t tiles() const { return rows / kTile * (cols / kTile); }
  // The block's slice of W_hh (depth x cols, 16-bit) in shared memory; a multiple of 512 bytes,
  // so that the partial products after it stay aligned for the MMA stores.
  FASTSEQ_HOST_DEVICE int64_t weight_bytes() const { return cols * depth * 2; }
  // The partial products (float), one (rows x cols) plane per split.
  FASTSEQ_HOST_DEVICE int64_t partial_bytes() const {
    return k_splits * rows * cols * int64_t(sizeof(float));
  }
  FASTSEQ_HOST_DEVICE int64_t shared_bytes() const { return weight_bytes() + partial_bytes(); }
};

// `batch` rows rounded up to a tile; `cols` and `depth` must be multiples of 16.
inline TilePlan plan_tiles(int64_t batch, int64_t cols, int64_t depth) {
  TilePlan p{round_up(batch, kTile), cols, depth, 1};
  p.k_splits = std::max<int64_t>(1, std::min<int64_t>(kWarps / p.tiles(), depth / kTile));
  return p;
}

}  // namespace fastseq::lstm
