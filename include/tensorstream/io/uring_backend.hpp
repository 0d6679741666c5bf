// The io_uring backend: one ring of queue_depth entries driven by one thread.
//
// submit() queues requests (priority order as in the pread backend) and wakes the ring
// thread through an eventfd; the thread keeps up to queue_depth reads in flight, resubmits
// the rest of a short transfer, retries -EAGAIN/-EINTR, and delivers each read's outcome
// to its ticket. O_DIRECT is used as in the pread backend (same descriptors, same
// alignment rule, same fallback to buffered reads on EINVAL).
//
// Availability: compiled in when liburing was found at build time (TS_HAVE_LIBURING); usable
// when io_uring_queue_init succeeds at run time — it fails with ENOSYS on kernels without
// io_uring, and with EPERM or ENOMEM in containers that forbid it (seccomp, the
// kernel.io_uring_disabled sysctl, memlock limits on old kernels).
//
// Thread-safe, like every Backend.
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <string>

#include "tensorstream/io/backend.hpp"

namespace tensorstream::io {

class UringBackend final : public Backend {
 public:
  /// Sets up the ring and its thread. Throws Error naming the reason if io_uring is not
  /// compiled in or not usable here.
  explicit UringBackend(const IoOptions& options = {}, Env& env = Env::posix());
  /// Cancels queued reads, waits for the reads in flight, stops the thread, tears down the
  /// ring and closes the files.
  ~UringBackend() override;

  [[nodiscard]] BackendType type() const noexcept override { return BackendType::kIoUring; }
  FileId open(const std::filesystem::path& path) override;

  /// True if this build includes the io_uring backend.
  [[nodiscard]] static bool compiled_in() noexcept;
  /// nullopt if a ring can be set up here; else why not. Never throws.
  [[nodiscard]] static std::optional<std::string> unavailable_reason() noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tensorstream::io
