// The alignments of TensorStream, one named constant per meaning, each defined here once.
//
// They are all 4096 today, for one reason: O_DIRECT transfers must start, end and land on the
// drive's logical block size, which is at most 4096 on every drive in use (and 4096 is the
// page size of the machines the engine runs on). The other two follow from it, and say so:
//
//   kIoAlignment     offsets, lengths and destination addresses of reads (io::plan_read),
//                    the address of every host buffer (AlignedBuffer), where each extent of a
//                    block starts in its buffer, the page granularity of in-place windows
//   kBlockAlignment  the store format: where blocks start in a store file (default and
//                    minimum of StoreWriter's block_alignment), so a block is one direct read
//   kSlotAlignment   device buffers (resident buffers, streaming slots, RAM-tier entries, staging)
//                    are sized in multiples of it, so a block's aligned read always fits its
//                    buffer; the residency plan and the budgets count sizes rounded up to it
//                    (Python's estimate reads it as _core.SLOT_ALIGNMENT)
//
// Thread-safety: constants and a pure function.
#pragma once

#include <cstdint>

namespace tensorstream {

/// Alignment of direct I/O: reads are planned on it, host buffers start on it.
inline constexpr std::uint32_t kIoAlignment = 4096;

/// Alignment of block extents in a store file (persisted: docs/store-format.md). A store block
/// must be readable with O_DIRECT without over-reading a neighbour.
inline constexpr std::uint32_t kBlockAlignment = kIoAlignment;
static_assert(kBlockAlignment == 4096, "the store format fixes the minimum block alignment");

/// Granularity of the sizes of device buffers (and of everything the budgets count).
inline constexpr std::uint64_t kSlotAlignment = kIoAlignment;

/// `n` rounded up to a multiple of `alignment` (a power of two). No overflow check: callers
/// round sizes that are far below 2^64.
[[nodiscard]] constexpr std::uint64_t align_up(std::uint64_t n, std::uint64_t alignment) noexcept {
  return (n + alignment - 1) & ~(alignment - 1);
}

}  // namespace tensorstream
