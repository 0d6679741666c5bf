// Move-only RAII wrappers for POSIX files, and full-length read/write helpers that retry on
// EINTR and short transfers. Every failure throws IoError naming the path.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>

namespace tensorstream::detail {

/// An open file descriptor, closed on destruction. Not thread-safe to move while in use;
/// concurrent pread/pwrite on one instance are safe (they do not share a file position).
class FileDescriptor {
 public:
  FileDescriptor() noexcept = default;
  /// Opens `path` with open(2) `flags`/`mode`; throws IoError naming the path on failure.
  FileDescriptor(const std::filesystem::path& path, int flags, unsigned mode = 0644);
  FileDescriptor(FileDescriptor&& other) noexcept;
  FileDescriptor& operator=(FileDescriptor&& other) noexcept;
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  ~FileDescriptor();

  [[nodiscard]] int get() const noexcept { return fd_; }
  [[nodiscard]] bool valid() const noexcept { return fd_ >= 0; }
  [[nodiscard]] const std::filesystem::path& path() const noexcept { return path_; }

  /// Size of the file in bytes (fstat).
  [[nodiscard]] std::uint64_t size() const;

  /// Reads exactly `out.size()` bytes at `offset`; throws IoError on error and FormatError
  /// ("unexpected end of file") if the file ends first.
  void pread_exact(std::span<std::byte> out, std::uint64_t offset) const;

  /// Writes all of `data` at `offset`.
  void pwrite_all(std::span<const std::byte> data, std::uint64_t offset) const;

  /// Sets the file's length (ftruncate(2)).
  void truncate(std::uint64_t size) const;

  /// fsync(2).
  void sync() const;

  /// Closes now, reporting a close error as IoError (the destructor only logs it).
  void close();

  /// Gives up ownership: returns the descriptor (-1 if none), which the caller must close.
  [[nodiscard]] int release() noexcept;

 private:
  int fd_ = -1;
  std::filesystem::path path_;
};

/// fsyncs the directory `dir` so that a rename or unlink inside it is durable.
void sync_directory(const std::filesystem::path& dir);

}  // namespace tensorstream::detail
