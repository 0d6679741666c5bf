#include "tensorstream/range_allocator.hpp"

#include <iterator>
#include <limits>
#include <stdexcept>

#include "tensorstream/errors.hpp"

namespace tensorstream {

RangeAllocator::RangeAllocator(std::uint64_t capacity, std::uint64_t alignment)
    : alignment_(alignment), capacity_(0) {
  TS_EXPECT(alignment > 0, std::invalid_argument, "RangeAllocator: alignment must be > 0");
  capacity_ = capacity / alignment_ * alignment_;
  if (capacity_ > 0) add_free(0, capacity_);
}

std::uint64_t RangeAllocator::rounded(std::uint64_t bytes) const noexcept {
  const std::uint64_t top = std::numeric_limits<std::uint64_t>::max() / alignment_ * alignment_;
  if (bytes > top) return top;
  const std::uint64_t remainder = bytes % alignment_;
  return remainder == 0 ? bytes : bytes + (alignment_ - remainder);
}

std::uint64_t RangeAllocator::largest_free_range() const noexcept {
  return free_by_size_.empty() ? 0 : free_by_size_.rbegin()->first;
}

void RangeAllocator::add_free(std::uint64_t offset, std::uint64_t size) {
  free_by_offset_.emplace(offset, size);
  free_by_size_.emplace(size, offset);
}

void RangeAllocator::remove_free(std::map<std::uint64_t, std::uint64_t>::iterator it) {
  free_by_size_.erase({it->second, it->first});
  free_by_offset_.erase(it);
}

std::optional<std::uint64_t> RangeAllocator::allocate(std::uint64_t bytes) {
  TS_EXPECT(bytes > 0, std::invalid_argument, "RangeAllocator::allocate: size 0");
  const std::uint64_t size = rounded(bytes);
  if (size > capacity_ - allocated_) return std::nullopt;
  const auto fit = free_by_size_.lower_bound({size, 0});
  if (fit == free_by_size_.end()) return std::nullopt;
  const auto [hole, offset] = *fit;
  remove_free(free_by_offset_.find(offset));
  if (hole > size) add_free(offset + size, hole - size);
  taken_.emplace(offset, size);
  allocated_ += size;
  return offset;
}

void RangeAllocator::deallocate(std::uint64_t offset, std::uint64_t bytes) {
  const auto it = taken_.find(offset);
  TS_EXPECT(it != taken_.end(), std::invalid_argument, "RangeAllocator::deallocate: offset ",
            offset, " is not allocated");
  const std::uint64_t size = rounded(bytes);
  TS_EXPECT(it->second == size, std::invalid_argument, "RangeAllocator::deallocate: offset ",
            offset, " was allocated with ", it->second, " bytes, not ", size);
  taken_.erase(it);
  allocated_ -= size;

  // Merge with the free neighbours, so that free ranges never touch.
  std::uint64_t start = offset;
  std::uint64_t length = size;
  auto next = free_by_offset_.lower_bound(offset);
  if (next != free_by_offset_.begin()) {
    const auto previous = std::prev(next);
    if (previous->first + previous->second == start) {
      start = previous->first;
      length += previous->second;
      remove_free(previous);
    }
  }
  if (next != free_by_offset_.end() && next->first == offset + size) {
    length += next->second;
    remove_free(next);
  }
  add_free(start, length);
}

}  // namespace tensorstream
