#include "tensorstream/detail/error_value.hpp"

#include <stdexcept>

#include "tensorstream/errors.hpp"

namespace tensorstream::detail {

ErrorValue ErrorValue::capture() noexcept {
  try {
    try {
      throw;
    } catch (const Cancelled& e) {
      return {Kind::kCancelled, e.what(), 0};
    } catch (const ChecksumError& e) {
      return {Kind::kChecksum, e.what(), 0};
    } catch (const FormatError& e) {
      return {Kind::kFormat, e.what(), 0};
    } catch (const IoError& e) {
      return {Kind::kIo, e.what(), e.code()};
    } catch (const CudaError& e) {
      return {Kind::kCuda, e.what(), 0};
    } catch (const std::invalid_argument& e) {
      return {Kind::kArgument, e.what(), 0};
    } catch (const std::exception& e) {
      return {Kind::kError, e.what(), 0};
    } catch (...) {
      return {Kind::kError, "unknown error", 0};
    }
  } catch (...) {  // copying the message ran out of memory
    return {};
  }
}

ErrorValue ErrorValue::of(const std::exception_ptr& error) noexcept {
  try {
    std::rethrow_exception(error);
  } catch (...) {
    return capture();
  }
}

void ErrorValue::raise() const {
  switch (kind) {
    case Kind::kCancelled:
      throw Cancelled(message);
    case Kind::kChecksum:
      throw ChecksumError(message);
    case Kind::kFormat:
      throw FormatError(message);
    case Kind::kIo:
      throw IoError(message, code);
    case Kind::kCuda:
      throw CudaError(message);
    case Kind::kArgument:
      throw std::invalid_argument(message);
    case Kind::kError:
      break;
  }
  throw Error(message);
}

}  // namespace tensorstream::detail
