// The mmap backend: each file is mapped read-only (MAP_SHARED) at open; a read copies from
// the mapping into the destination.
//
// Copies run on a pool of min(num_threads, queue_depth) threads, one request (≤ request_size)
// at a time, in priority order like the pread backend, so reads are asynchronous,
// cancellable and parallel (several page-cache misses are served at once). Only the
// requested bytes are copied, to dest.data() + skip; the alignment padding of the read
// contract is left untouched. Before each copy the range is advised MADV_WILLNEED so the
// kernel reads ahead the whole request rather than faulting page by page.
//
// `mapping()` gives zero-copy CPU access to the whole file; `prefetch()` asks the kernel to
// bring a range into the page cache.
//
// Truncation: touching a mapped page beyond the end of a file raises SIGBUS. The backend
// checks the file's current size (fstat) at submit and again before each copy, and fails
// reads beyond it with FormatError instead of touching the mapping. A file truncated by
// another process *during* a copy can still raise SIGBUS: that race cannot be closed without
// a process-wide signal handler, which a library must not install. Store files are
// immutable once committed, so this only matters for files modified behind the engine's back.
// A file that grows after open is seen at its size at open.
//
// Thread-safe, like every Backend. O_DIRECT does not apply: IoStats counts copies as
// buffered reads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>

#include "tensorstream/io/backend.hpp"

namespace tensorstream::io {

class MmapBackend final : public Backend {
 public:
  explicit MmapBackend(const IoOptions& options = {}, Env& env = Env::posix());
  /// Cancels queued reads, waits for copies in flight, joins the pool, unmaps the files.
  ~MmapBackend() override;

  [[nodiscard]] BackendType type() const noexcept override { return BackendType::kMmap; }
  /// Opens and maps `path` (an empty file has an empty mapping). Throws IoError.
  FileId open(const std::filesystem::path& path) override;

  /// The whole file as mapped at open. Valid until close(file) or the backend's
  /// destruction; reading it after the file was truncated raises SIGBUS (see above).
  /// Throws std::invalid_argument for an unknown id.
  [[nodiscard]] std::span<const std::byte> mapping(FileId file) const;

  /// madvise(MADV_WILLNEED) on the pages of [offset, offset + size), clipped to the
  /// mapping: starts reading them into the page cache and returns at once.
  void prefetch(FileId file, std::uint64_t offset, std::uint64_t size) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tensorstream::io
