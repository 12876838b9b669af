// Per-thread scratch memory for the CPU kernels' packs and tiles, kept between calls: a fresh
// allocation per call would page-fault its way through the same few hundred KiB every time.
// Each thread (at::parallel_for's pool, or the caller) owns one block that grows to the
// largest request seen and is reused. A kernel takes it once per task chunk; nothing else
// may take it on that thread until the kernel is done with it.
//
// Include only from *_kernels.cpp files (compiled once per instruction set).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>

#ifndef CPU_CAPABILITY
#error "workspace.h is for the per-instruction-set kernel files (*_kernels.cpp)"
#endif

namespace vitattn::cpu::CPU_CAPABILITY {

inline constexpr size_t kScratchAlign = 64;

inline void* thread_scratch(size_t bytes) {
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  thread_local std::unique_ptr<void, Free> block;
  thread_local size_t capacity = 0;
  if (bytes > capacity) {
    block.reset();
    capacity = 0;
    const size_t size = (bytes + kScratchAlign - 1) / kScratchAlign * kScratchAlign;
    void* p = std::aligned_alloc(kScratchAlign, size);
    if (p == nullptr) throw std::bad_alloc();
    block.reset(p);
    capacity = size;
  }
  return block.get();
}

// K arrays of T with the given element counts, each 64-byte aligned, carved out of the
// calling thread's scratch block. Contents are unspecified.
template <typename T, size_t K>
inline std::array<T*, K> thread_buffers(const std::array<int64_t, K>& counts) {
  auto padded = [](int64_t c) {
    return (static_cast<size_t>(c) * sizeof(T) + kScratchAlign - 1) / kScratchAlign * kScratchAlign;
  };
  size_t total = 0;
  for (int64_t c : counts) total += padded(c);
  char* base = static_cast<char*>(thread_scratch(total));
  std::array<T*, K> out{};
  size_t off = 0;
  for (size_t i = 0; i < K; ++i) {
    out[i] = reinterpret_cast<T*>(base + off);
    off += padded(counts[i]);
  }
  return out;
}

}  // namespace vitattn::cpu::CPU_CAPABILITY
