#include "tensorstream/detail/file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <utility>

#include "tensorstream/errors.hpp"

namespace tensorstream::detail {

FileDescriptor::FileDescriptor(const std::filesystem::path& path, int flags, unsigned mode)
    : path_(path) {
  do {
    fd_ = ::open(path.c_str(), flags | O_CLOEXEC, mode);
  } while (fd_ == -1 && errno == EINTR);
  if (fd_ == -1) throw_errno(concat("cannot open '", path.string(), "'"));
}

FileDescriptor::FileDescriptor(FileDescriptor&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)), path_(std::move(other.path_)) {}

FileDescriptor& FileDescriptor::operator=(FileDescriptor&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = std::exchange(other.fd_, -1);
    path_ = std::move(other.path_);
  }
  return *this;
}

int FileDescriptor::release() noexcept { return std::exchange(fd_, -1); }

FileDescriptor::~FileDescriptor() {
  // Destructors never throw; a failing close of a read-only descriptor loses nothing, and
  // writers call close() explicitly to see the error.
  if (fd_ >= 0 && ::close(fd_) != 0) {
    std::fprintf(stderr, "tensorstream: close('%s') failed: %s\n", path_.c_str(),
                 std::strerror(errno));
  }
}

std::uint64_t FileDescriptor::size() const {
  struct stat st {};
  TS_SYSCALL_CHECK(::fstat(fd_, &st), "cannot stat '", path_.string(), "'");
  return static_cast<std::uint64_t>(st.st_size);
}

void FileDescriptor::pread_exact(std::span<std::byte> out, std::uint64_t offset) const {
  std::size_t done = 0;
  while (done < out.size()) {
    const ssize_t n =
        ::pread(fd_, out.data() + done, out.size() - done, static_cast<off_t>(offset + done));
    if (n == -1) {
      if (errno == EINTR) continue;
      throw_errno(concat("read of ", out.size(), " bytes at offset ", offset, " from '",
                         path_.string(), "' failed"));
    }
    if (n == 0) {
      throw FormatError(concat("'", path_.string(), "': unexpected end of file reading ",
                               out.size(), " bytes at offset ", offset, " (got ", done, ")"));
    }
    done += static_cast<std::size_t>(n);
  }
}

void FileDescriptor::pwrite_all(std::span<const std::byte> data, std::uint64_t offset) const {
  std::size_t done = 0;
  while (done < data.size()) {
    const ssize_t n =
        ::pwrite(fd_, data.data() + done, data.size() - done, static_cast<off_t>(offset + done));
    if (n == -1) {
      if (errno == EINTR) continue;
      throw_errno(concat("write of ", data.size(), " bytes at offset ", offset, " to '",
                         path_.string(), "' failed"));
    }
    done += static_cast<std::size_t>(n);
  }
}

void FileDescriptor::truncate(std::uint64_t size) const {
  TS_SYSCALL_CHECK(::ftruncate(fd_, static_cast<off_t>(size)), "cannot set the length of '",
                   path_.string(), "' to ", size);
}

void FileDescriptor::sync() const {
  TS_SYSCALL_CHECK(::fsync(fd_), "fsync of '", path_.string(), "' failed");
}

void FileDescriptor::close() {
  if (fd_ < 0) return;
  const int fd = std::exchange(fd_, -1);
  TS_SYSCALL_CHECK(::close(fd), "close of '", path_.string(), "' failed");
}

void sync_directory(const std::filesystem::path& dir) {
  FileDescriptor fd(dir.empty() ? std::filesystem::path(".") : dir, O_RDONLY | O_DIRECTORY);
  fd.sync();
}

}  // namespace tensorstream::detail
