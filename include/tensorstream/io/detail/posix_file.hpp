// A file read with pread or io_uring: a buffered descriptor, and an O_DIRECT one beside it
// when the file system accepts it. Not part of the public API.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>

#include "tensorstream/detail/file.hpp"
#include "tensorstream/io/backend.hpp"
#include "tensorstream/io/detail/read_state.hpp"

namespace tensorstream::io::detail {

struct PosixFile final : OpenFile {
  /// Opens `path` through `env` buffered, then with O_DIRECT if `options.direct` and the file
  /// system allows it (recording why not otherwise). Throws IoError if the buffered open fails.
  static std::shared_ptr<PosixFile> open(const std::filesystem::path& path,
                                         const IoOptions& options, Env& env);

  /// True if a transfer of `length` bytes at `offset` into `dest` may use the O_DIRECT
  /// descriptor: direct I/O is on for this file and all three are aligned to its
  /// requirements.
  [[nodiscard]] bool use_direct(std::uint64_t offset, std::uint64_t length,
                                const std::byte* dest) const noexcept;
  /// Turns direct I/O off for this file (after the file system refused a direct read).
  void disable_direct(std::string why) noexcept;

  [[nodiscard]] bool direct() const noexcept override {
    return direct_ok.load(std::memory_order_acquire);
  }
  [[nodiscard]] std::string direct_note() const override;

  tensorstream::detail::FileDescriptor direct_fd;  ///< O_DIRECT; invalid when not usable
  std::uint32_t offset_align = kIoAlignment;       ///< direct I/O offset/length alignment
  std::uint32_t memory_align = kIoAlignment;       ///< direct I/O buffer alignment
  std::atomic<bool> direct_ok{false};

 private:
  mutable std::mutex note_mutex_;
  std::string note_;
};

/// Reads one request with pread(2), retrying EINTR/EAGAIN and short transfers, falling back
/// to the buffered descriptor when a direct read fails with EINVAL. Throws the read's error.
/// `env`: consulted before the request (nullptr: the system, nothing to ask); `queue` serves
/// the interruptible sleep of a delay it asks for.
void pread_request(Env* env, Counters& counters, RequestQueue& queue, const Request& request);

}  // namespace tensorstream::io::detail
