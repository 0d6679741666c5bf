// The pread backend: a pool of worker threads issuing pread(2), O_DIRECT where possible.
//
// Each open file has a buffered descriptor and, where the file system accepts O_DIRECT, a
// direct one beside it. A request uses the direct descriptor when its offset, length and
// destination are aligned to the file's direct-I/O alignment (statx STATX_DIOALIGN, the
// device's logical block size from BLKSSZGET or sysfs, else 4096) — which every request of
// a planned read is, except the tail of a file that does not end on a block — and the
// buffered one otherwise. If open(O_DIRECT) fails (e.g. EINVAL on a file system without
// direct I/O) or a direct read fails with EINVAL, the file falls back to buffered reads and
// IoStats::files says why.
//
// Up to min(num_threads, queue_depth) requests run at once; queued requests start in
// priority order (kHigh first), FIFO within a level.
//
// Thread-safe, like every Backend.
#pragma once

#include <filesystem>
#include <memory>

#include "tensorstream/io/backend.hpp"

namespace tensorstream::io {

class PreadBackend final : public Backend {
 public:
  explicit PreadBackend(const IoOptions& options = {}, Env& env = Env::posix());
  /// Cancels queued reads, waits for those in flight, joins the workers, closes the files.
  ~PreadBackend() override;

  [[nodiscard]] BackendType type() const noexcept override { return BackendType::kPread; }
  FileId open(const std::filesystem::path& path) override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tensorstream::io
