#include "tensorstream/io/block_window.hpp"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <utility>
#include <vector>

#include "tensorstream/alignment.hpp"
#include "tensorstream/errors.hpp"

// Linux 5.14; older headers lack the constant, older kernels answer EINVAL (then pages are
// touched one by one instead).
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif

namespace tensorstream::io {
namespace {

// Windows map the regions the read plan makes: kIoAlignment-aligned, which must be the page
// size for mmap to place them.
constexpr std::uint64_t kPage = kIoAlignment;
// The kernel maps a large page-cache folio with one PMD entry (2 MiB) when the virtual
// address and the file offset agree modulo 2 MiB; otherwise with 512 PTEs per 2 MiB, which
// makes populate() and drop() costlier.
constexpr std::uint64_t kHugePage = std::uint64_t{2} << 20;

std::uint64_t round_up(std::uint64_t n) { return align_up(n, kPage); }

// Counts the bytes of [addr, addr + length) that are not in the page cache. Where mincore
// refuses to tell (a file the process may not write, see mincore(2)), it reports pages not
// mapped here as absent: the count is then an upper bound.
std::uint64_t absent_bytes(std::byte* addr, std::uint64_t length) {
  std::vector<unsigned char> resident(length / kPage);
  if (resident.empty() || ::mincore(addr, length, resident.data()) != 0) return length;
  std::uint64_t absent = 0;
  for (const auto r : resident) absent += (r & 1) ? 0 : kPage;
  return absent;
}

}  // namespace

std::string block_windows_unsupported_reason() {
  const long page = ::sysconf(_SC_PAGESIZE);
  if (page != static_cast<long>(kPage)) {
    return detail::concat("the system's page size is ", page, " bytes; reading in place needs ",
                          kPage, "-byte pages");
  }
  return {};
}

BlockWindow::BlockWindow(std::uint64_t size, std::span<const WindowRegion> regions)
    : size_(round_up(std::max<std::uint64_t>(size, 1))) {
  const auto unsupported = block_windows_unsupported_reason();
  TS_EXPECT(unsupported.empty(), std::invalid_argument, unsupported);
  // Place the window so that its largest region is congruent with its file offset modulo
  // 2 MiB: reserve 2 MiB more than needed and start inside.
  std::uint64_t residue = 0;
  std::uint64_t largest = 0;
  for (const auto& region : regions) {
    if (region.length > largest) {
      largest = region.length;
      residue = (region.file_offset - region.window_offset) % kHugePage;
    }
  }
  reserved_size_ = size_ + kHugePage;
  void* reserved = ::mmap(nullptr, reserved_size_, PROT_NONE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (reserved == MAP_FAILED) {
    const int err = errno;
    throw IoError(detail::concat("reserving ", reserved_size_,
                                 " bytes of address space failed: ", std::strerror(err)),
                  err);
  }
  reserved_ = static_cast<std::byte*>(reserved);
  const auto start = reinterpret_cast<std::uintptr_t>(reserved);
  base_ = reserved_ + (residue + kHugePage - start % kHugePage) % kHugePage;
  try {
    for (auto region : regions) {
      TS_EXPECT(region.path != nullptr && region.fd >= 0, std::invalid_argument,
                "window region without a file");
      TS_EXPECT(region.file_offset % kPage == 0 && region.window_offset % kPage == 0,
                std::invalid_argument, "window region of '", region.path->string(), "' is not ",
                kPage, "-aligned (file offset ", region.file_offset, ", window offset ",
                region.window_offset, ")");
      TS_EXPECT(region.window_offset <= size_ && region.length <= size_ - region.window_offset,
                std::invalid_argument, "window region of '", region.path->string(),
                "' does not fit the window (", region.length, " bytes at ", region.window_offset,
                " of ", size_, ")");
      // Map only the pages that hold file bytes: a page wholly past the end raises SIGBUS.
      if (region.file_offset >= region.file_size) continue;
      region.length = std::min(region.length, round_up(region.file_size - region.file_offset));
      if (region.length == 0) continue;
      // Private and writable: a stray write into a weight (torch allows in-place ops on any
      // tensor) changes a private copy of that page, never the file, and does not crash.
      void* at = ::mmap(base_ + region.window_offset, region.length, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_FIXED, region.fd, static_cast<off_t>(region.file_offset));
      if (at == MAP_FAILED) {
        const int err = errno;
        throw IoError(
            detail::concat("mapping ", region.length, " bytes at offset ", region.file_offset,
                           " of '", region.path->string(), "' failed: ", std::strerror(err)),
            err);
      }
      // Asks the kernel to read cold pages of this mapping into 2 MiB folios (mapped by one
      // PMD entry here, see kHugePage). Advice only: refused or ignored without THP.
      (void)::madvise(at, region.length, MADV_HUGEPAGE);
      regions_.push_back(region);
    }
  } catch (...) {
    reset();
    throw;
  }
}

BlockWindow::~BlockWindow() { reset(); }

BlockWindow::BlockWindow(BlockWindow&& other) noexcept
    : reserved_(std::exchange(other.reserved_, nullptr)),
      reserved_size_(std::exchange(other.reserved_size_, 0)),
      base_(std::exchange(other.base_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      regions_(std::move(other.regions_)) {}

BlockWindow& BlockWindow::operator=(BlockWindow&& other) noexcept {
  if (this != &other) {
    reset();
    reserved_ = std::exchange(other.reserved_, nullptr);
    reserved_size_ = std::exchange(other.reserved_size_, 0);
    base_ = std::exchange(other.base_, nullptr);
    size_ = std::exchange(other.size_, 0);
    regions_ = std::move(other.regions_);
  }
  return *this;
}

void BlockWindow::reset() noexcept {
  if (reserved_ != nullptr && ::munmap(reserved_, reserved_size_) != 0) {
    std::fprintf(stderr, "tensorstream: munmap of a block window failed: %s\n",
                 std::strerror(errno));
  }
  reserved_ = nullptr;
  reserved_size_ = 0;
  base_ = nullptr;
  size_ = 0;
  regions_.clear();
}

std::uint64_t BlockWindow::mapped_bytes() const noexcept {
  std::uint64_t n = 0;
  for (const auto& r : regions_) n += r.length;
  return n;
}

std::uint64_t BlockWindow::populate() const {
  std::uint64_t from_storage = 0;
  for (const auto& r : regions_) {
    struct stat st {};
    if (::fstat(r.fd, &st) != 0) {
      const int err = errno;
      throw IoError(
          detail::concat("fstat of '", r.path->string(), "' failed: ", std::strerror(err)), err);
    }
    // The region's bytes must all still be in the file (the mapping's last page may be
    // partial: it ends where the file ended at open).
    const auto needed = std::min(r.file_size, r.file_offset + r.length);
    TS_EXPECT(static_cast<std::uint64_t>(st.st_size) >= needed, FormatError, "'", r.path->string(),
              "' shrank to ", st.st_size, " bytes since it was opened (", r.file_size, " bytes; ",
              needed, " needed here); it was modified while in use");
    std::byte* addr = base_ + r.window_offset;
    from_storage += absent_bytes(addr, r.length);
    if (::madvise(addr, r.length, MADV_POPULATE_READ) == 0) continue;
    const int err = errno;
    if (err != EINVAL) {
      throw IoError(
          detail::concat("reading ", r.length, " bytes at offset ", r.file_offset, " of '",
                         r.path->string(), "' into memory failed: ", std::strerror(err)),
          err);
    }
    // A kernel before 5.14: fault the pages in by reading one byte of each.
    volatile std::byte sink{};
    for (std::uint64_t off = 0; off < r.length; off += kPage) sink = addr[off];
    (void)sink;
  }
  return from_storage;
}

void BlockWindow::drop() const noexcept {
  for (const auto& r : regions_) (void)::madvise(base_ + r.window_offset, r.length, MADV_DONTNEED);
}

}  // namespace tensorstream::io
