// A page-aligned host buffer: the destination of every read of the I/O backends.
//
// O_DIRECT (and, later, cuFile and cuMemHostRegister) need the destination address aligned
// to the logical block size of the drive, at most 4096 bytes on every drive in use. An
// AlignedBuffer is allocated once, page-aligned, and never resized: the engine sizes its
// staging slots for the largest block and reuses them (see ARCHITECTURE.md, "Data path").
//
// Pinning is not done here. A CUDA-pinned allocator plugs in through `AlignedBuffer::adopt`,
// which wraps memory allocated elsewhere (cuMemHostAlloc, or a region registered with
// cuMemHostRegister) together with the deleter that gives it back; everything that takes an
// AlignedBuffer then works unchanged on pinned memory.
//
// Thread-safety: an AlignedBuffer is a value; distinct threads may read and write distinct
// bytes of one buffer concurrently (the backends do), but moving or destroying it while
// another thread uses it is a data race.
#pragma once

#include <cstddef>
#include <functional>
#include <span>

namespace tensorstream::io {

/// Alignment of every AlignedBuffer's data() and of every O_DIRECT transfer the backends
/// plan: the page size, which is also the largest logical block size of common drives.
inline constexpr std::size_t kPageSize = 4096;

/// Move-only owner of `size()` bytes starting at a `kPageSize`-aligned address.
class AlignedBuffer {
 public:
  /// Gives back memory adopted with `adopt`; called exactly once, with the adopted pointer
  /// and size. Must not throw (a throwing deleter terminates the process).
  using Deleter = std::function<void(std::byte* data, std::size_t size)>;

  /// An empty buffer: data() is nullptr, size() is 0.
  AlignedBuffer() noexcept = default;

  /// Allocates `size` bytes (anonymous private mapping: page-aligned, zero-filled, faulted
  /// in on first touch, returned to the system on destruction). `size == 0` gives an empty
  /// buffer. Throws tensorstream::Error naming the size if the system refuses the memory.
  explicit AlignedBuffer(std::size_t size);

  /// Wraps `size` bytes at `data` allocated by someone else (e.g. cuMemHostAlloc); `deleter`
  /// is called on destruction. `data` must be `kPageSize`-aligned (std::invalid_argument
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

}  // namespace tensorstream::io
