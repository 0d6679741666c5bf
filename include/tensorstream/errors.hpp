// Exception types of the TensorStream engine, and the macros that raise them.
//
// Every failure reaches the caller as an exception whose message names the file (and, where
// there is one, the block, tensor or header field) and the cause. Mistakes of the caller (a
// bad argument) are `std::invalid_argument`; everything else derives from `Error`.
//
// Messages are only built when a check fails: the macros below evaluate their message
// arguments lazily, so checks are cheap on the hot path.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace tensorstream {

/// Base class of every TensorStream failure that is not a caller's bad argument.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A file (store or safetensors) whose content breaks the format: a bad magic, a header field
/// out of range, overlapping extents, a size that does not match dtype × shape, ...
class FormatError : public Error {
 public:
  using Error::Error;
};

/// Data whose checksum does not match the one recorded in the store.
class ChecksumError : public FormatError {
 public:
  using FormatError::FormatError;
};

/// A system call failed (open, pread, pwrite, fsync, rename, ...). `code()` is the errno.
class IoError : public Error {
 public:
  IoError(const std::string& what, int code) : Error(what), code_(code) {}
  [[nodiscard]] int code() const noexcept { return code_; }

 private:
  int code_;
};

/// An operation that was cancelled before it completed: a read cancelled (or dropped because
/// its backend was destroyed), io::ReadTicket::wait() throws it.
class Cancelled : public Error {
 public:
  using Error::Error;
};

/// The CUDA driver (or cuFile) reported an error, or is needed but not usable.
class CudaError : public Error {
 public:
  using Error::Error;
};

namespace detail {

/// Concatenates any streamable values into one string; used to build messages on failure.
template <typename... Args>
[[nodiscard]] std::string concat(Args&&... args) {
  std::ostringstream out;
  (out << ... << std::forward<Args>(args));
  return out.str();
}

/// Throws IoError for `what` with the current errno and its description.
[[noreturn]] void throw_errno(const std::string& what);
[[noreturn]] void throw_errno(const std::string& what, int code);

}  // namespace detail
}  // namespace tensorstream

/// Throws `ExceptionType(concat(message parts...))` unless `condition` holds.
#define TS_EXPECT(condition, ExceptionType, ...)                        \
  do {                                                                  \
    if (!(condition)) [[unlikely]] {                                    \
      throw ExceptionType(::tensorstream::detail::concat(__VA_ARGS__)); \
    }                                                                   \
  } while (0)

/// For a system call returning -1 on failure: throws IoError naming `what` and errno.
#define TS_SYSCALL_CHECK(call, ...)                                                     \
  do {                                                                                  \
    if ((call) == -1) [[unlikely]] {                                                    \
      ::tensorstream::detail::throw_errno(::tensorstream::detail::concat(__VA_ARGS__)); \
    }                                                                                   \
  } while (0)
