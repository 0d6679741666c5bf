// AlignedBuffer, the destination of every read of the I/O backends, is host memory: it is
// defined, with the allocators, in host_memory.hpp. This header is kept so that code
// including it keeps compiling; include host_memory.hpp in new code.
#pragma once

#include "tensorstream/host_memory.hpp"
