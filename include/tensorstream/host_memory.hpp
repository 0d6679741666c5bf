// Host memory: every buffer in host RAM that the engine reads into or copies from.
//
// Two shapes, one alignment (kIoAlignment, alignment.hpp):
//
//   AlignedBuffer   one move-only, kIoAlignment-aligned buffer: the destination of every read
//                   of the I/O backends (O_DIRECT needs the address aligned), a CPU slot, a
//                   staging buffer. Allocated once and never resized: the engine sizes its
//                   buffers for the largest block and reuses them (ARCHITECTURE.md, "Data
//                   path"). It allocates its own memory (an anonymous mapping) or adopts
//                   memory from elsewhere together with the deleter that gives it back.
//   HostAllocator   where many buffers of varying size come from (the RAM tier's entries,
//                   the engine's staging): PageAlignedAllocator (ordinary memory),
//                   PinnedHostAllocator (page-locked CUDA memory, so every host-to-device
//                   copy from it is a DMA and asynchronous) or RegionAllocator (ranges of
//                   one region allocated once: the RAM tier's entries, so that filling and
//                   evicting them never asks the system or the CUDA driver for memory).
//                   allocate_buffer() turns one allocation into an AlignedBuffer.
//
// Page-locked memory itself comes from the CUDA shim (cuda::PinnedHostBuffer, cuMemHostAlloc);
// PinnedHostAllocator is the one place that hands it out as host memory.
//
// The names io::AlignedBuffer, cache::HostAllocator, cache::PageAlignedAllocator and
// cache::default_host_allocator, under which these were first published, remain available
// (declared at the end of this file).
//
// Thread-safety: an AlignedBuffer is a value; distinct threads may read and write distinct
// bytes of one buffer concurrently (the backends do), but moving or destroying it while
// another thread uses it is a data race. Every HostAllocator is thread-safe.
#pragma once

#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string_view>

#include "tensorstream/alignment.hpp"
#include "tensorstream/range_allocator.hpp"
#include "tensorstream/shim/cuda.hpp"

namespace tensorstream {

// ---- one buffer ----------------------------------------------------------------------------

/// Move-only owner of `size()` bytes starting at a `kIoAlignment`-aligned address.
class AlignedBuffer {
 public:
  /// Gives back memory adopted with `adopt`; called exactly once, with the adopted pointer
  /// and size. Must not throw (a throwing deleter terminates the process).
  using Deleter = std::function<void(std::byte* data, std::size_t size)>;

  /// An empty buffer: data() is nullptr, size() is 0.
  AlignedBuffer() noexcept = default;

  /// Allocates `size` bytes (anonymous private mapping: page-aligned, zero-filled, faulted
  /// in on first touch, returned to the system on destruction; buffers of 2 MiB or more are
  /// advised MADV_HUGEPAGE). `size == 0` gives an empty buffer. Throws tensorstream::Error
  /// naming the size if the system refuses the memory.
  explicit AlignedBuffer(std::size_t size);

  /// Wraps `size` bytes at `data` allocated by someone else (e.g. cuMemHostAlloc); `deleter`
  /// is called on destruction. `data` must be `kIoAlignment`-aligned (std::invalid_argument
  /// otherwise, and `deleter` is then not called: the caller still owns the memory).
  /// A null `data` is accepted only with `size == 0`.
  [[nodiscard]] static AlignedBuffer adopt(std::byte* data, std::size_t size, Deleter deleter);

  AlignedBuffer(AlignedBuffer&& other) noexcept;
  AlignedBuffer& operator=(AlignedBuffer&& other) noexcept;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  ~AlignedBuffer();

  [[nodiscard]] std::byte* data() const noexcept { return data_; }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] bool empty() const noexcept { return size_ == 0; }
  [[nodiscard]] std::span<std::byte> span() const noexcept { return {data_, size_}; }
  /// True if the memory was adopted (it is then owned by the adopted deleter).
  [[nodiscard]] bool adopted() const noexcept { return static_cast<bool>(deleter_); }

  /// Frees the memory now; the buffer becomes empty.
  void reset() noexcept;

 private:
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
  Deleter deleter_;  // empty: data_ came from mmap in the allocating constructor
};

// ---- allocators ----------------------------------------------------------------------------

/// Where buffers of varying size come from. One allocation per buffer, of exactly the buffer's
/// size; the same size is passed back to deallocate().
///
/// Thread-safety: implementations must be thread-safe; callers (the RAM tier among them) call
/// them from any thread and without holding their own locks.
class HostAllocator {
 public:
  virtual ~HostAllocator() = default;

  /// Returns a buffer of at least `bytes` bytes (`bytes` > 0), or throws (std::bad_alloc, or
  /// CudaError for a pinned allocator). Never returns nullptr.
  [[nodiscard]] virtual void* allocate(std::size_t bytes) = 0;

  /// As allocate(), except that it returns nullptr instead of throwing when the memory is
  /// there but no single piece of it holds `bytes` (a sub-allocator's fragmentation): the
  /// caller may give something back and try again. The default calls allocate().
  [[nodiscard]] virtual void* try_allocate(std::size_t bytes) { return allocate(bytes); }

  /// Returns a buffer obtained from allocate(bytes) or try_allocate(bytes) of this allocator.
  virtual void deallocate(void* pointer, std::size_t bytes) noexcept = 0;

  /// Allocations take a multiple of this many bytes (a request is rounded up to it); the RAM
  /// tier charges each entry its size rounded up to it. 1 unless an allocator says otherwise.
  [[nodiscard]] virtual std::size_t granularity() const noexcept { return 1; }

  /// A short name for logs and stats ("page-aligned", "cuda-pinned", ...).
  [[nodiscard]] virtual std::string_view name() const noexcept { return "host"; }
};

/// Ordinary host memory aligned to the page size (so O_DIRECT reads may land in it and a
/// later cuMemHostRegister would cover whole pages). Sizes are rounded up to whole pages.
class PageAlignedAllocator final : public HostAllocator {
 public:
  [[nodiscard]] void* allocate(std::size_t bytes) override;
  void deallocate(void* pointer, std::size_t bytes) noexcept override;
  [[nodiscard]] std::string_view name() const noexcept override { return "page-aligned"; }
  /// The alignment (and rounding) used: the system page size.
  [[nodiscard]] static std::size_t alignment() noexcept;
};

/// A process-wide PageAlignedAllocator, used where no allocator is given.
[[nodiscard]] std::shared_ptr<HostAllocator> default_host_allocator();

/// Page-locked host memory of `device` (cuMemHostAlloc, portable; page-aligned), for the RAM
/// tier and staging when the engine streams to a GPU. Must not outlive `device`.
class PinnedHostAllocator final : public HostAllocator {
 public:
  explicit PinnedHostAllocator(const cuda::Device& device) noexcept : device_(device) {}
  [[nodiscard]] void* allocate(std::size_t bytes) override;
  void deallocate(void* pointer, std::size_t bytes) noexcept override;
  [[nodiscard]] std::string_view name() const noexcept override { return "cuda-pinned"; }

 private:
  const cuda::Device& device_;
  std::mutex mutex_;
  std::map<void*, cuda::PinnedHostBuffer> buffers_;  // guarded by mutex_
};

/// Ranges of one region of host memory, allocated once: the RAM tier's memory. Entries come
/// and go as ranges of the region (RangeAllocator: best fit, coalescing, kSlotAlignment by
/// default), so allocate() and deallocate() never call the system or the CUDA driver — with
/// a pinned region, no cuMemHostAlloc per entry and no cuMemFreeHost, which synchronises the
/// device, on an eviction. The region is the caller's choice: an AlignedBuffer(capacity) on
/// the CPU (page-aligned, faulted in as entries are first filled), allocate_buffer of a
/// PinnedHostAllocator on a GPU (cuMemHostAlloc'd memory is not charged to RLIMIT_MEMLOCK,
/// so one large region is fine in containers).
///
/// Every allocation is `alignment`-aligned (the region is page-aligned and offsets are
/// multiples of `alignment`). allocate() throws std::bad_alloc and try_allocate() returns
/// nullptr when no free range holds the request; the two never hand out more than the
/// region or overlapping memory. Thread-safe (mutex_ guards ranges_).
class RegionAllocator final : public HostAllocator {
 public:
  /// Takes `region` (its size rounded down to `alignment` is what is handed out). Throws
  /// std::invalid_argument if `alignment` is 0 or not a multiple of kIoAlignment.
  explicit RegionAllocator(AlignedBuffer region, std::size_t alignment = kSlotAlignment);

  [[nodiscard]] void* allocate(std::size_t bytes) override;
  [[nodiscard]] void* try_allocate(std::size_t bytes) override;
  /// A pointer or size that allocate() did not return is reported on stderr and ignored.
  void deallocate(void* pointer, std::size_t bytes) noexcept override;
  [[nodiscard]] std::size_t granularity() const noexcept override { return alignment_; }
  [[nodiscard]] std::string_view name() const noexcept override { return "region"; }

  /// The bytes handed out at most (the region's size rounded down to the alignment).
  [[nodiscard]] std::size_t capacity() const noexcept { return capacity_; }
  /// A snapshot of the bookkeeping: bytes taken, the largest request that would fit now.
  [[nodiscard]] std::size_t allocated_bytes() const;
  [[nodiscard]] std::size_t largest_free_range() const;
  /// The region's memory (for tests: every allocation lies inside it).
  [[nodiscard]] const std::byte* base() const noexcept { return region_.data(); }

 private:
  AlignedBuffer region_;
  std::size_t alignment_;
  std::size_t capacity_ = 0;
  mutable std::mutex mutex_;
  RangeAllocator ranges_;  // guarded by mutex_
};

/// One allocation of `bytes` from `allocator`, owned as an AlignedBuffer (given back to the
/// allocator, which the buffer keeps alive, on destruction). The allocation must be
/// kIoAlignment-aligned (both allocators above are).
[[nodiscard]] AlignedBuffer allocate_buffer(const std::shared_ptr<HostAllocator>& allocator,
                                            std::size_t bytes);

// ---- the names of the first releases -------------------------------------------------------

namespace io {
using tensorstream::AlignedBuffer;
}  // namespace io

namespace cache {
using tensorstream::default_host_allocator;
using tensorstream::HostAllocator;
using tensorstream::PageAlignedAllocator;
}  // namespace cache

}  // namespace tensorstream
