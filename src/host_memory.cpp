#include "tensorstream/host_memory.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <optional>
#include <stdexcept>
#include <utility>

#include "tensorstream/errors.hpp"

namespace tensorstream {

// ---- AlignedBuffer -------------------------------------------------------------------------

AlignedBuffer::AlignedBuffer(std::size_t size) {
  if (size == 0) return;
  // mmap rather than posix_memalign: the pages go back to the system on free (staging
  // slots are large and few) and the address is always page-aligned.
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    const int code = errno;
    throw Error(detail::concat("cannot allocate ", size, " bytes of page-aligned memory: ",
                               std::strerror(code), " (errno ", code, ")"));
  }
#ifdef MADV_HUGEPAGE
  // Large buffers backed by huge pages are physically contiguous in 2 MiB pieces, so the
  // block layer can issue multi-MiB requests into them (measured: ~2x faster O_DIRECT reads
  // on a virtio disk, docs/benchmarks.md). Advice only: ignored where THP is off.
  if (size >= (std::size_t{2} << 20)) (void)::madvise(p, size, MADV_HUGEPAGE);
#endif
  data_ = static_cast<std::byte*>(p);
  size_ = size;
}

AlignedBuffer AlignedBuffer::adopt(std::byte* data, std::size_t size, Deleter deleter) {
  if (data == nullptr && size != 0) {
    throw std::invalid_argument("AlignedBuffer::adopt: null pointer with a non-zero size");
  }
  if (reinterpret_cast<std::uintptr_t>(data) % kIoAlignment != 0) {
    throw std::invalid_argument(detail::concat("AlignedBuffer::adopt: address ",
                                               static_cast<const void*>(data),
                                               " is not aligned to ", kIoAlignment, " bytes"));
  }
  AlignedBuffer out;
  out.data_ = data;
  out.size_ = size;
  out.deleter_ = deleter ? std::move(deleter) : Deleter([](std::byte*, std::size_t) {});
  return out;
}

AlignedBuffer::AlignedBuffer(AlignedBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      deleter_(std::exchange(other.deleter_, nullptr)) {}

AlignedBuffer& AlignedBuffer::operator=(AlignedBuffer&& other) noexcept {
  if (this != &other) {
    reset();
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    deleter_ = std::exchange(other.deleter_, nullptr);
  }
  return *this;
}

AlignedBuffer::~AlignedBuffer() { reset(); }

void AlignedBuffer::reset() noexcept {
  std::byte* data = std::exchange(data_, nullptr);
  const std::size_t size = std::exchange(size_, 0);
  Deleter deleter = std::exchange(deleter_, nullptr);
  if (deleter) {
    deleter(data, size);
  } else if (data != nullptr && ::munmap(data, size) != 0) {
    std::fprintf(stderr, "tensorstream: munmap of a %zu-byte buffer failed: %s\n", size,
                 std::strerror(errno));
  }
}

// ---- allocators ----------------------------------------------------------------------------

std::size_t PageAlignedAllocator::alignment() noexcept {
  static const std::size_t page = [] {
    const long size = ::sysconf(_SC_PAGESIZE);
    // The system page size; where sysconf cannot tell, the I/O alignment is a safe guess.
    return size > 0 ? static_cast<std::size_t>(size) : std::size_t{kIoAlignment};
  }();
  return page;
}

void* PageAlignedAllocator::allocate(std::size_t bytes) {
  const std::size_t page = alignment();
  if (bytes == 0 || bytes > std::numeric_limits<std::size_t>::max() - (page - 1)) {
    throw std::bad_alloc();
  }
  // aligned_alloc wants a size that is a multiple of the alignment.
  const std::size_t rounded = (bytes + page - 1) / page * page;
  void* pointer = std::aligned_alloc(page, rounded);
  if (pointer == nullptr) throw std::bad_alloc();
  return pointer;
}

void PageAlignedAllocator::deallocate(void* pointer, std::size_t /*bytes*/) noexcept {
  std::free(pointer);
}

std::shared_ptr<HostAllocator> default_host_allocator() {
  static const auto allocator = std::make_shared<PageAlignedAllocator>();
  return allocator;
}

void* PinnedHostAllocator::allocate(std::size_t bytes) {
  cuda::PinnedHostBuffer buffer(device_, bytes);
  void* p = buffer.data();
  std::lock_guard lock(mutex_);
  buffers_.emplace(p, std::move(buffer));
  return p;
}

void PinnedHostAllocator::deallocate(void* pointer, std::size_t /*bytes*/) noexcept {
  std::lock_guard lock(mutex_);
  buffers_.erase(pointer);
}

namespace {
std::size_t checked_region_alignment(std::size_t alignment) {
  TS_EXPECT(alignment > 0 && alignment % kIoAlignment == 0, std::invalid_argument,
            "RegionAllocator: alignment ", alignment, " is not a positive multiple of ",
            kIoAlignment);
  return alignment;
}
}  // namespace

RegionAllocator::RegionAllocator(AlignedBuffer region, std::size_t alignment)
    : region_(std::move(region)),
      alignment_(checked_region_alignment(alignment)),
      ranges_(region_.size(), alignment_) {
  capacity_ = static_cast<std::size_t>(ranges_.capacity());
}

void* RegionAllocator::try_allocate(std::size_t bytes) {
  if (bytes == 0) throw std::bad_alloc();
  std::optional<std::uint64_t> offset;
  {
    const std::lock_guard lock(mutex_);
    offset = ranges_.allocate(bytes);
  }
  return offset ? region_.data() + *offset : nullptr;
}

void* RegionAllocator::allocate(std::size_t bytes) {
  void* pointer = try_allocate(bytes);
  if (pointer == nullptr) throw std::bad_alloc();
  return pointer;
}

void RegionAllocator::deallocate(void* pointer, std::size_t bytes) noexcept {
  const auto* p = static_cast<const std::byte*>(pointer);
  const auto* base = region_.data();
  if (p < base || p >= base + capacity_) {
    std::fprintf(stderr, "tensorstream: RegionAllocator::deallocate of %p, outside the region\n",
                 pointer);
    return;
  }
  try {
    const std::lock_guard lock(mutex_);
    ranges_.deallocate(static_cast<std::uint64_t>(p - base), bytes);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tensorstream: %s\n", e.what());
  }
}

std::size_t RegionAllocator::allocated_bytes() const {
  const std::lock_guard lock(mutex_);
  return static_cast<std::size_t>(ranges_.allocated_bytes());
}

std::size_t RegionAllocator::largest_free_range() const {
  const std::lock_guard lock(mutex_);
  return static_cast<std::size_t>(ranges_.largest_free_range());
}

AlignedBuffer allocate_buffer(const std::shared_ptr<HostAllocator>& allocator, std::size_t bytes) {
  void* p = allocator->allocate(bytes);
  try {
    return AlignedBuffer::adopt(
        static_cast<std::byte*>(p), bytes,
        [allocator](std::byte* data, std::size_t size) { allocator->deallocate(data, size); });
  } catch (...) {
    allocator->deallocate(p, bytes);  // misaligned: adopt took nothing
    throw;
  }
}

}  // namespace tensorstream
