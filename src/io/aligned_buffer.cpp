#include "tensorstream/io/aligned_buffer.hpp"

#include <sys/mman.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <utility>

#include "tensorstream/errors.hpp"

namespace tensorstream::io {

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
  if (reinterpret_cast<std::uintptr_t>(data) % kPageSize != 0) {
    throw std::invalid_argument(detail::concat("AlignedBuffer::adopt: address ",
                                               static_cast<const void*>(data),
                                               " is not aligned to ", kPageSize, " bytes"));
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

}  // namespace tensorstream::io
