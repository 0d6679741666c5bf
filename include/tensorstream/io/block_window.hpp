// A block's bytes read in place through the page cache: the zero-copy path for the CPU.
//
// A BlockWindow reserves one range of address space laid out like the block's buffer and
// maps each of the block's file ranges (MAP_PRIVATE | MAP_FIXED) at its place in it. The
// tensors of the block are then readable where the engine's placements say, with no copy:
// the pages are the kernel's page cache. The mapping is private and writable so that a write
// into a weight copies that page (the file never changes) instead of crashing; drop()
// discards such copies.
//
//     reserved range:  [ region 0 (file A, offset a) | region 1 (file B, offset b) | ... ]
//
// Each region starts at a 4096-aligned offset of the window and maps the file from a
// 4096-aligned offset (the engine's read plan, io::plan_read, gives exactly that), so a
// safetensors tensor that starts anywhere in its file lands at the same offset as on the
// copying paths. The window is placed so that its largest region's addresses agree with its
// file offsets modulo 2 MiB: the kernel can then map large page-cache folios with one entry
// per 2 MiB, which makes populate() and drop() cheaper. Pages of a region past the end of its file
// are left unmapped (PROT_NONE): touching them would raise SIGBUS, and no tensor lies there.
//
// Residency in memory is explicit. populate() faults every page of the window in
// (MADV_POPULATE_READ, reading from storage what the page cache lacks) and reports how many
// bytes were not cached before; drop() unmaps the pages from this process again
// (MADV_DONTNEED: the page cache keeps them, the process's RSS no longer does). Between the
// two, the block's bytes are held in this process; outside them, they are not — which is
// what lets the engine keep its budget with windows as with slots.
//
// Truncation: a file truncated behind the engine's back would make a mapped access raise
// SIGBUS. populate() checks each file's size (fstat) first and throws FormatError naming
// the file instead; a truncation racing with compute cannot be caught without a signal
// handler, which a library must not install (store files are immutable once committed).
//
// Thread-safety: populate() and drop() may run concurrently with each other and with reads
// of the window (a dropped page is faulted back in from the page cache on access: never
// wrong bytes, only slower). Construction and destruction are not concurrent with use.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

namespace tensorstream::io {

/// One mapped region of a window.
struct WindowRegion {
  int fd = -1;                          ///< open descriptor of the file (not owned)
  const std::filesystem::path* path{};  ///< for messages; never null
  std::uint64_t file_size = 0;          ///< size of the file when it was opened
  std::uint64_t file_offset = 0;        ///< 4096-aligned start in the file
  std::uint64_t length = 0;             ///< bytes of the region (a multiple of 4096)
  std::uint64_t window_offset = 0;      ///< 4096-aligned start in the window
};

/// Why windows cannot work on this system ("" when they can): they need 4096-byte pages.
[[nodiscard]] std::string block_windows_unsupported_reason();

class BlockWindow {
 public:
  BlockWindow() noexcept = default;
  /// Reserves `size` bytes of address space (rounded up to 4096) and maps `regions` into it.
  /// Throws std::invalid_argument for a misaligned or out-of-range region and IoError
  /// (naming the file) when mmap fails.
  BlockWindow(std::uint64_t size, std::span<const WindowRegion> regions);
  ~BlockWindow();
  BlockWindow(BlockWindow&& other) noexcept;
  BlockWindow& operator=(BlockWindow&& other) noexcept;
  BlockWindow(const BlockWindow&) = delete;
  BlockWindow& operator=(const BlockWindow&) = delete;

  [[nodiscard]] std::byte* data() const noexcept { return base_; }
  [[nodiscard]] std::uint64_t size() const noexcept { return size_; }

  /// Faults every mapped page in; returns the bytes that were not in the page cache before
  /// (read from storage now). Throws FormatError if a file is shorter than at open, IoError
  /// if the kernel fails to read a page (the error names the file and offset).
  std::uint64_t populate() const;
  /// Takes the window's pages out of this process (they stay in the page cache).
  void drop() const noexcept;
  /// Bytes of the window's mapped regions (what populate() makes resident).
  [[nodiscard]] std::uint64_t mapped_bytes() const noexcept;

 private:
  void reset() noexcept;

  std::byte* reserved_ = nullptr;  // the whole reservation (2 MiB more than the window)
  std::uint64_t reserved_size_ = 0;
  std::byte* base_ = nullptr;
  std::uint64_t size_ = 0;             // window bytes (multiple of 4096)
  std::vector<WindowRegion> regions_;  // lengths clipped to the file
};

}  // namespace tensorstream::io
