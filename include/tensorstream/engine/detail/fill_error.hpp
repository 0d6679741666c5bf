// A fill's failure, kept as data (detail/error_value.hpp): every waiter of the unit gets a
// fresh exception of the same type and message (a fill runs on a fill worker; its waiters
// are the threads in acquire()).
#pragma once

#include "tensorstream/detail/error_value.hpp"

namespace tensorstream::engine::detail {

using FillError = tensorstream::detail::ErrorValue;

}  // namespace tensorstream::engine::detail
