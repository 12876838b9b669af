// Task-parallel loop for the CPU kernels, in two forms:
//
//   parallel_tasks(ntasks, [&](TaskQueue& queue) { ...scratch...; for (int64_t t; (t = queue.next()) >= 0;) ... });
//     body(queue) runs once on each of at::parallel_for's threads (at most ntasks of them);
//     queue.next() hands out the task indices 0, 1, ..., ntasks - 1 one at a time from a
//     shared counter and returns -1 when none are left.
//   parallel_tasks(ntasks, [&](int64_t begin, int64_t end) { ... }, chunks_per_thread = 4);
//     body(begin, end) runs on consecutive chunks of the tasks, about chunks_per_thread
//     chunks per thread, pulled from a shared counter.
//
// Either way a thread that is descheduled (shared machines) or meets a slow task does not
// hold the others back, as a static split would. Which thread runs a task must never change
// a result: tasks write disjoint outputs, and any reduction is ordered by task index, never
// by thread. The counter hands out task indices only; no numerical result goes through it.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <type_traits>

namespace vitattn::cpu {

class TaskQueue {
 public:
  explicit TaskQueue(int64_t ntasks, int64_t chunk = 1) : ntasks_(ntasks), chunk_(chunk) {}
  int64_t next() {
    // atomic builtin rather than std::atomic: no std:: template instantiated per instruction set
    const int64_t t = __atomic_fetch_add(&next_, chunk_, __ATOMIC_RELAXED);
    return t < ntasks_ ? t : -1;
  }
  int64_t size() const { return ntasks_; }
  int64_t chunk() const { return chunk_; }

 private:
  const int64_t ntasks_;
  const int64_t chunk_;
  int64_t next_ = 0;
};

template <typename Body>
void parallel_tasks(int64_t ntasks, const Body& body, int64_t chunks_per_thread = 4) {
  if (ntasks <= 0) return;
  int64_t nthreads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (nthreads > ntasks) nthreads = ntasks;
  if constexpr (std::is_invocable_v<const Body&, TaskQueue&>) {
    TaskQueue queue(ntasks);
    if (nthreads <= 1) {
      body(queue);
      return;
    }
    at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) { body(queue); });
  } else {
    if (nthreads <= 1) {
      body(int64_t{0}, ntasks);
      return;
    }
    int64_t chunk = ntasks / (nthreads * (chunks_per_thread > 0 ? chunks_per_thread : 1));
    TaskQueue queue(ntasks, chunk > 0 ? chunk : 1);
    at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
      for (int64_t b; (b = queue.next()) >= 0;) body(b, b + queue.chunk() < ntasks ? b + queue.chunk() : ntasks);
    });
  }
}

}  // namespace vitattn::cpu
