#include "tensorstream/errors.hpp"

#include <cerrno>
#include <cstring>

namespace tensorstream::detail {

void throw_errno(const std::string& what) { throw_errno(what, errno); }

void throw_errno(const std::string& what, int code) {
  throw IoError(what + ": " + std::strerror(code) + " (errno " + std::to_string(code) + ")", code);
}

}  // namespace tensorstream::detail
