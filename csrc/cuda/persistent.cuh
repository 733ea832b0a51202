// What the persistent recurrence kernels share (csrc/cuda/lstm.cu, csrc/cuda/rnn.cu): warp
// reductions, and the cooperative launch of a grid that must be resident all at once (each step
// ends at a grid-wide barrier), with the driver's answers about a kernel cached per device.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "cuda/lstm_plan.h"

// float, half and bfloat16 (the kernels' float math gains nothing for double).
#define FASTSEQ_DISPATCH_PERSISTENT_TYPES(TYPE, NAME, ...)                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)              \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                        \
                             AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace fastseq::persistent {

using lstm::kThreads;

// Every lane ends with the warp's sum of each acc[n].
template <int N>
__device__ __forceinline__ void warp_sum_all(float (&acc)[N]) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
#pragma unroll
    for (int n = 0; n < N; ++n) acc[n] += __shfl_xor_sync(0xffffffffu, acc[n], offset);
  }
}

// acc[u] for lane u, without dynamic register indexing.
template <int N>
__device__ __forceinline__ float pick(const float (&acc)[N], int index) {
  float v = 0.f;
#pragma unroll
  for (int n = 0; n < N; ++n) v = (n == index) ? acc[n] : v;
  return v;
}

// acc[n] = sum over k < K of x[k] w[n K + k], for n < N, in every lane of the warp: the lanes
// stride over k (coalesced reads of x, conflict-free reads of the shared rows w), then the
// butterfly sums. The per-step product of the persistent kernels.
template <int N, typename scalar_t>
__device__ __forceinline__ void warp_row_products(const scalar_t* x, const scalar_t* w, int64_t K,
                                                  int lane, float (&acc)[N]) {
#pragma unroll
  for (int n = 0; n < N; ++n) acc[n] = 0.f;
  for (int64_t k = lane; k < K; k += 32) {
    const float xk = static_cast<float>(x[k]);
#pragma unroll
    for (int n = 0; n < N; ++n) acc[n] += static_cast<float>(w[n * K + k]) * xk;
  }
  warp_sum_all(acc);
}

// The dynamic shared memory a block of a kernel can have: the device's opt-in maximum less the
// kernel's static shared memory.
inline int max_dynamic_shared(const cudaFuncAttributes& attributes) {
  return static_cast<int>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin -
                          attributes.sharedSizeBytes);
}

// The attributes of `kernel` on the current device, asked of the driver once per (kernel,
// device) rather than at every launch (a one-step layer call would otherwise pay driver calls
// beside its one launch). The first question also lifts the kernel's dynamic shared-memory limit
// to the device's opt-in maximum, so that it covers every size asked later.
inline const cudaFuncAttributes& attributes_of(const void* kernel) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, cudaFuncAttributes> known;
  const auto key = std::make_pair(kernel, int(c10::cuda::current_device()));
  std::lock_guard<std::mutex> lock(mutex);
  if (const auto it = known.find(key); it != known.end()) return it->second;
  cudaFuncAttributes attributes{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      max_dynamic_shared(attributes)));
  return known.emplace(key, attributes).first->second;  // map nodes stay put: the reference holds
}

// Blocks of `kernel` with `smem` bytes of dynamic shared memory that fit on one SM of the current
// device, asked once per (kernel, device, smem).
inline int resident_blocks_per_sm(const void* kernel, size_t smem) {
  const cudaFuncAttributes& attributes = attributes_of(kernel);
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, size_t>, int> known;
  const auto key = std::make_tuple(kernel, int(c10::cuda::current_device()), smem);
  std::lock_guard<std::mutex> lock(mutex);
  if (const auto it = known.find(key); it != known.end()) return it->second;
  int per_sm = 0;
  if (smem <= size_t(max_dynamic_shared(attributes))) {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  }
  known.emplace(key, per_sm);
  return per_sm;
}

// Whether `blocks` blocks of `kernel` with `smem` bytes of dynamic shared memory can all be
// resident at once, as a cooperative launch needs.
inline bool all_resident(const void* kernel, size_t smem, int64_t blocks) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return blocks <= int64_t(resident_blocks_per_sm(kernel, smem)) * sms;
}

// Launches `kernel` cooperatively over ceil(hidden / units) blocks of kThreads threads; `op` names
// the caller in the error raised when they cannot all be resident.
template <typename Args>
void launch(const char* op, void (*kernel)(Args), Args args, int64_t hidden, int units,
            size_t smem) {
  const int per_sm = resident_blocks_per_sm(reinterpret_cast<const void*>(kernel), smem);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = (hidden + units - 1) / units;
  TORCH_CHECK(blocks <= int64_t(per_sm) * sms, op, ": ", blocks, " blocks of ", units,
              " hidden units cannot all be resident (", per_sm, " per SM x ", sms,
              " SMs); the op's backend choice should have taken another backend");
  void* params[] = {&args};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel), dim3(blocks),
                                             dim3(kThreads), params, smem,
                                             at::cuda::getCurrentCUDAStream()));
}


// f(std::integral_constant<int, U>{}) for `units` = U, a power of two up to kMax: the kernels take
// their units per block as a template argument (their accumulators are register arrays).
template <int kMax, int U = 1, typename F>
void with_units(const char* op, int units, F&& f) {
  if (units == U) {
    f(std::integral_constant<int, U>{});
  } else if constexpr (U < kMax) {
    with_units<kMax, 2 * U>(op, units, std::forward<F>(f));
  } else {
    TORCH_CHECK(false, op, ": bad unit count ", units);
  }
}

}  // namespace fastseq::persistent
