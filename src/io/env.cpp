#include "tensorstream/io/env.hpp"

namespace tensorstream::io {

Env& Env::posix() noexcept {
  static Env env;  // stateless: using it during exit is harmless
  return env;
}

tensorstream::detail::FileDescriptor Env::open(const std::filesystem::path& path, int flags) {
  return tensorstream::detail::FileDescriptor(path, flags);
}

ReadStep Env::before_request(const RequestInfo& /*request*/) { return {}; }

}  // namespace tensorstream::io
