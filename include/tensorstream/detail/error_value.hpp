// An exception kept as data: whoever needs it later (every waiter of a failed fill or read)
// gets a fresh exception of the same type and message, so no exception object is ever caught
// in two threads at once — the C++ runtime updates a caught object's handler count without
// synchronisation, a data race when two threads catch the same one.
//
// Thread-safety: a value.
#pragma once

#include <exception>
#include <string>

namespace tensorstream::detail {

struct ErrorValue {
  enum class Kind {
    kError,
    kIo,
    kFormat,
    kChecksum,
    kCuda,
    kArgument,
    kCancelled
  } kind = Kind::kError;
  std::string message;
  int code = 0;  ///< errno of an IoError

  /// The exception being handled (call inside a catch block), as data.
  [[nodiscard]] static ErrorValue capture() noexcept;
  /// `error` (non-null) as data. Rethrows it once, in the calling thread: call it where the
  /// exception is not shared yet.
  [[nodiscard]] static ErrorValue of(const std::exception_ptr& error) noexcept;
  /// Throws a new exception of the captured type: ChecksumError, FormatError, IoError (with
  /// its errno), CudaError, Cancelled, std::invalid_argument, or Error.
  [[noreturn]] void raise() const;
};

}  // namespace tensorstream::detail
