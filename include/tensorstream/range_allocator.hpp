// Ranges of one region: which parts of [0, capacity) are taken, which are free.
//
// The RAM tier takes its memory from the system once (RegionAllocator, host_memory.hpp: its
// capacity, CUDA-pinned on a GPU) and hands every entry a range of it, so that filling and
// evicting entries never calls cuMemHostAlloc / cuMemFreeHost (the latter synchronises the
// device: an eviction would stall the compute). RangeAllocator is the bookkeeping of those
// ranges, offsets only — it touches no memory, so it is tested on its own.
//
//   - Every offset and every size is a multiple of `alignment` (a request is rounded up; the
//     capacity is rounded down).
//   - allocate() takes the *best fit*: the smallest free range that holds the request (the
//     lowest offset among equals), from its start. A transformer's streamed blocks are mostly
//     of one size, so a freed entry is exactly the hole the next one fills.
//   - deallocate() gives a range back and merges it with free neighbours, so free ranges never
//     touch: after everything is freed there is one free range, the whole capacity.
//   - allocate() fails (nullopt) when no single free range holds the request even though the
//     free bytes would (fragmentation); the caller frees something and tries again, or does
//     without. It never hands out more than the capacity, and never overlapping ranges.
//
// Cost: O(log n) per call, n the number of free plus taken ranges (a few hundred entries).
//
// Thread-safety: none. The owner serialises every call (RegionAllocator holds a mutex).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <utility>

#include "tensorstream/alignment.hpp"

namespace tensorstream {

class RangeAllocator {
 public:
  /// Ranges of [0, capacity rounded down to `alignment`), all free. Throws
  /// std::invalid_argument if `alignment` is 0.
  explicit RangeAllocator(std::uint64_t capacity, std::uint64_t alignment = kSlotAlignment);

  RangeAllocator(const RangeAllocator&) = delete;
  RangeAllocator& operator=(const RangeAllocator&) = delete;
  RangeAllocator(RangeAllocator&&) noexcept = default;
  RangeAllocator& operator=(RangeAllocator&&) noexcept = default;
  ~RangeAllocator() = default;

  /// The offset of a free range of rounded(bytes) bytes, now taken; nullopt if no free range
  /// holds it (or it exceeds the capacity). Throws std::invalid_argument if `bytes` is 0.
  [[nodiscard]] std::optional<std::uint64_t> allocate(std::uint64_t bytes);

  /// Gives back the range allocate(bytes) returned at `offset`. Throws std::invalid_argument,
  /// changing nothing, if no range was taken at `offset` or it was taken with another size
  /// (a double free, a wrong size).
  void deallocate(std::uint64_t offset, std::uint64_t bytes);

  /// `bytes` rounded up to the alignment: what an allocation of `bytes` takes. Saturates at
  /// the largest multiple of the alignment instead of wrapping.
  [[nodiscard]] std::uint64_t rounded(std::uint64_t bytes) const noexcept;

  [[nodiscard]] std::uint64_t capacity() const noexcept { return capacity_; }
  [[nodiscard]] std::uint64_t alignment() const noexcept { return alignment_; }
  /// Bytes taken (sum of the rounded sizes of the live allocations).
  [[nodiscard]] std::uint64_t allocated_bytes() const noexcept { return allocated_; }
  [[nodiscard]] std::uint64_t free_bytes() const noexcept { return capacity_ - allocated_; }
  /// The largest request that allocate() would place now.
  [[nodiscard]] std::uint64_t largest_free_range() const noexcept;
  /// Number of free ranges (1 when nothing is taken and the capacity is not 0).
  [[nodiscard]] std::size_t free_ranges() const noexcept { return free_by_offset_.size(); }
  /// Number of live allocations.
  [[nodiscard]] std::size_t allocations() const noexcept { return taken_.size(); }

 private:
  void add_free(std::uint64_t offset, std::uint64_t size);
  void remove_free(std::map<std::uint64_t, std::uint64_t>::iterator it);

  std::uint64_t alignment_;
  std::uint64_t capacity_;
  std::uint64_t allocated_ = 0;
  std::map<std::uint64_t, std::uint64_t> free_by_offset_;           // offset -> size; never touch
  std::set<std::pair<std::uint64_t, std::uint64_t>> free_by_size_;  // (size, offset)
  std::map<std::uint64_t, std::uint64_t> taken_;                    // offset -> rounded size
};

}  // namespace tensorstream
