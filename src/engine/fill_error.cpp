#include "tensorstream/engine/detail/fill_error.hpp"

#include <exception>
#include <stdexcept>

#include "tensorstream/errors.hpp"

namespace tensorstream::engine::detail {

FillError FillError::capture() {
  try {
    throw;
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
}

void FillError::raise() const {
  switch (kind) {
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

}  // namespace tensorstream::engine::detail
