// A fill's failure, kept as data: every waiter of the block gets a fresh exception of the
// same type and message, so no exception object is ever shared between threads (a fill runs on
// a fill worker; its waiters are the threads in acquire()).
//
// Thread-safety: a value.
#pragma once

#include <string>

namespace tensorstream::engine::detail {

struct FillError {
  enum class Kind { kError, kIo, kFormat, kChecksum, kCuda, kArgument } kind = Kind::kError;
  std::string message;
  int code = 0;  ///< errno of an IoError

  /// The exception being handled (call inside a catch block), as data.
  [[nodiscard]] static FillError capture();
  /// Throws a new exception of the captured type: ChecksumError, FormatError, IoError (with
  /// its errno), CudaError, std::invalid_argument, or Error.
  [[noreturn]] void raise() const;
};

}  // namespace tensorstream::engine::detail
