// How a block's bytes get into the buffer a block lives in: one interface, three readers.
//
//   host       host_reader.hpp      an I/O backend reads the extents into host memory (the
//                                   CPU slot itself, a RAM-tier entry, or pinned staging that
//                                   is then copied to the GPU slot on the copy stream)
//   in place   in_place_reader.hpp  the CPU only: the block's window over the page cache is
//                                   faulted in; the slot "holds" the window, nothing is copied
//   GDS        gds_reader.hpp       cuFile reads the extents straight into GPU memory
//
// An engine builds its readers once (read_paths.hpp decides which and records why) and asks,
// for each fill, the reader of that block to fill() the block's buffer. That is all a reader
// does: it knows how to get a block's bytes into a buffer (and, in place, what dropping a block
// from a slot means); it knows nothing of slots, pins, queues or prefetching.
//
// Thread-safety: fill() may run for different blocks on several fill workers at once, and
// drop() and host_bytes() from the thread holding the engine's mutex meanwhile; each
// reader guards what it shares.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <span>
#include <vector>

#include "tensorstream/engine/detail/device_buffers.hpp"
#include "tensorstream/engine/source_layout.hpp"

namespace tensorstream::engine::detail {

/// One fill, as the engine asks for it (taken under its lock when the fill starts).
struct FillOrder {
  std::uint32_t block = 0;
  bool demand = false;  ///< an acquire waits for it: read at high priority
};

/// What a fill moved, for the engine's statistics. Filled in as the fill goes, and counted by
/// the engine whether or not the fill then fails.
struct FillReport {
  std::uint64_t bytes_from_storage = 0;
  std::uint64_t bytes_from_page_cache = 0;  ///< in place: found in the page cache
  std::uint64_t bytes_from_ram_tier = 0;
  std::uint64_t gds_bytes = 0;
  /// Stored bytes of compressed chunks read (also in bytes_from_storage).
  std::uint64_t compressed_bytes_read = 0;
  std::uint64_t bytes_decoded = 0;  ///< raw bytes those chunks decoded into
  double io_seconds = 0;            ///< waiting for storage (decoding excluded)
  double decode_seconds = 0;        ///< the fill worker's time in the decoder
};

class BlockReader {
 public:
  BlockReader() = default;
  BlockReader(const BlockReader&) = delete;
  BlockReader& operator=(const BlockReader&) = delete;
  virtual ~BlockReader() = default;

  /// Brings `order.block`'s bytes into `buffer`: when this returns they are there (the CPU),
  /// or their copy into it is ordered before its "ready" event (a GPU). Throws what the read
  /// throws (IoError, FormatError, ChecksumError, CudaError, Error for a timeout), its message
  /// naming the block, the file and the offset.
  virtual void fill(const FillOrder& order, BlockBuffer& buffer, FillReport& report) = 0;

  /// The CPU: where `block`'s bytes are while `buffer` holds it (the buffer's memory, unless
  /// the reader keeps them elsewhere). nullptr on a GPU.
  [[nodiscard]] virtual std::byte* host_bytes(std::uint32_t /*block*/,
                                              const BlockBuffer& buffer) const noexcept {
    return buffer.host();
  }

  /// `block` leaves the streaming slot that held it (given to another block, or its fill
  /// failed). Nothing to do unless the reader keeps the bytes outside the buffer.
  virtual void drop(std::uint32_t /*block*/) noexcept {}
};

/// Checks bytes read against the source's checksums (verify_checksums): the stored XXH3-64
/// of an extent (a store), or, where the source stores none (safetensors), the checksum of
/// the extent's first read, so a file changed or corrupted between reads is caught.
/// Thread-safe.
class ExtentVerifier {
 public:
  explicit ExtentVerifier(const Layout& layout);
  /// Throws ChecksumError naming the extent when `data` is not what it should be.
  void check(std::uint32_t block, std::size_t extent, std::span<const std::byte> data);

 private:
  const Layout& layout_;
  std::mutex mutex_;
  std::vector<std::vector<std::optional<std::uint64_t>>> first_;  // guarded by mutex_
};

}  // namespace tensorstream::engine::detail
