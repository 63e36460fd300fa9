#pragma once
// Grain sizes for at::parallel_for. It hands [0, n) to a thread team whenever n > grain; waking the
// team costs microseconds, and on an oversubscribed host (a 2-core VM running other work) an
// OpenMP barrier can wait milliseconds for a descheduled thread. A call whose whole work is small
// must therefore stay on the calling thread, as torch's own kernels do with their GRAIN_SIZE.
#include <algorithm>
#include <cstdint>

namespace maskattn {

// Elements of work below which splitting across threads costs more than it saves (torch's
// at::internal::GRAIN_SIZE).
constexpr int64_t kParallelGrainWork = 32768;

// The grain for items that each cost about `work_per_item` elements of work.
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kParallelGrainWork / std::max<int64_t>(1, work_per_item));
}

// The same for `items` items that cost `total_work` elements together (uneven items: the mean).
inline int64_t grain_for(int64_t total_work, int64_t items) {
  return grain_for(items > 0 ? total_work / items : total_work);
}

}  // namespace maskattn
