// `parallel_steps`: a recurrence whose every step is split over the same threads, in one
// parallel region with a barrier between steps.
//
// An LSTM step is small (tens of microseconds at batch 16), and a fork and join per step through
// at::parallel_for costs a few microseconds each time; a barrier in a region that lives for the
// whole sequence costs a fraction of that. Each thread keeps the same items every step, so what
// it wrote in one step is in its own cache for the next.
#pragma once

#include <algorithm>
#include <cstdint>

#include <ATen/Parallel.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastseq::cpu {

// for k in [0, steps): body(k, i0, i1) over a split of [0, items) among threads, every thread
// done with step k before any starts step k + 1. `grain`: the fewest items worth a thread.
// `body` must not throw (it runs inside an OpenMP region).
template <typename Body>
void parallel_steps(int64_t steps, int64_t items, int64_t grain, const Body& body) {
  int64_t threads = std::min<int64_t>(at::get_num_threads(),
                                      (items + std::max<int64_t>(grain, 1) - 1) /
                                          std::max<int64_t>(grain, 1));
  if (at::in_parallel_region()) {
    threads = 1;
  }
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(static_cast<int>(threads))
    {
      // The team may be smaller than asked for; the split follows the team it got.
      const int64_t team = omp_get_num_threads();
      const int64_t per = (items + team - 1) / team;
      const int64_t i0 = std::min(items, omp_get_thread_num() * per);
      const int64_t i1 = std::min(items, i0 + per);
      for (int64_t k = 0; k < steps; ++k) {
        if (i0 < i1) {
          body(k, i0, i1);
        }
#pragma omp barrier
      }
    }
    return;
  }
#endif
  for (int64_t k = 0; k < steps; ++k) {
    body(k, 0, items);
  }
}

}  // namespace fastseq::cpu
