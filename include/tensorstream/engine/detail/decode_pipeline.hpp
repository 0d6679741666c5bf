// The decode pipeline: how the host reader gets the decoded extents of a unit (the chunks of
// a compressed store block, source_layout.hpp) into the unit's host destination — the CPU
// buffer (an arena place or a resident buffer), a RAM-tier entry, or a GPU's pinned staging.
//
//   storage ──io::Backend──► scratch piece (stored bytes) ──decode, on the pool──► destination
//
// Each decoded extent's chunks are cut into pieces: runs of consecutive chunks of at most
// kPieceBytes stored bytes (one chunk at least). Up to kDepth pieces of a fill are read at
// once, into scratch buffers of that fill, and each piece is decoded as soon as its read has
// completed — its chunks at once on the pool's threads and the fill worker — while the next
// pieces are being read; its buffer then takes the next piece. So a unit's decoding overlaps
// its own reading (and, through prefetching, the computation), the destination is written
// once, straight from the stored bytes, and the memory held is kDepth pieces per fill
// whatever the unit's size. A piece's read is one backend request range: a demanded unit's
// pieces are read at high priority, ahead of prefetches, as plain reads are.
//
// Chunks stored raw (ChunkCodec::kRaw, those that did not shrink) are copied, not decoded;
// a unit that covers part of a block reads and decodes only the chunks covering its tensors
// (the extent's stored range was computed by chunks_covering).
//
// Checks. Each chunk's stored checksum (XXH3-64) is checked before it is decoded, always:
// damage in a chunk's raw zstd blocks (the mantissa planes, stored as they are) would
// otherwise decode into wrong numbers, and the check costs about a tenth of the decoding
// (XXH3 at ~15 GB/s over stored bytes 1/1.46 of the decoded ones, against decoding at
// ~1.9 GB/s of bf16 per core, both on the 2-vCPU VM of docs/benchmarks.md). A
// damaged chunk is a ChecksumError naming the file, the store block and the chunk; a frame
// that does not parse or does not decode to exactly its size (the checksum matching) a
// FormatError naming them. With verify_checksums, the extent's decoded bytes are also checked
// against the block's raw_checksum or its tensors' checksums (ExtentVerifier).
//
// Thread-safety: run() may be called from several fill workers at once (each takes a scratch
// set of its own, under scratch_mutex_; the backend, the pool and the verifier are
// thread-safe).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "tensorstream/detail/thread_pool.hpp"
#include "tensorstream/engine/detail/block_reader.hpp"
#include "tensorstream/engine/options.hpp"
#include "tensorstream/engine/source_layout.hpp"
#include "tensorstream/engine/trace.hpp"
#include "tensorstream/host_memory.hpp"
#include "tensorstream/io/backend.hpp"
#include "tensorstream/store.hpp"

namespace tensorstream::engine::detail {

/// Threads that decode a unit's chunks at once under `options`: decode_threads, or for 0 one
/// per core, at most 8.
[[nodiscard]] unsigned decode_threads_for(const EngineOptions& options) noexcept;

class DecodePipeline {
 public:
  /// Stored bytes of one piece at most (unless one chunk is larger).
  static constexpr std::uint64_t kPieceBytes = std::uint64_t{4} << 20;
  /// Pieces of one fill read at once.
  static constexpr unsigned kDepth = 4;

  /// Decodes the extents of `layout` read by `backend` through `files` (per layout file),
  /// with `threads` threads per piece (the caller's included; ≥ 1), checking the decoded
  /// bytes when `verify`.
  /// References must outlive the pipeline.
  DecodePipeline(const Layout& layout, io::Backend& backend, std::span<const io::FileId> files,
                 unsigned threads, bool verify, ExtentVerifier& verifier, TraceLog& trace);

  /// Threads that decode one piece's chunks (the calling fill worker included).
  [[nodiscard]] unsigned threads() const noexcept { return pool_.size() + 1; }

  /// Reads and decodes every decoded extent of unit `block` into `dest` (its host
  /// destination, holding the unit's buffer), before `deadline`. Throws what a read throws
  /// (naming the unit, the extent and the file), FormatError / ChecksumError from decoding
  /// (naming the file, the store block and the chunk), ChecksumError from verification, and
  /// Error for a read that does not finish in time. Counts into `report` as it goes: stored
  /// bytes read (bytes_from_storage and compressed_bytes_read), bytes decoded, decode seconds
  /// (this thread's time in the decoder; the rest of the call is waiting for reads, which the
  /// caller counts as I/O time).
  void run(std::uint32_t block, std::span<std::byte> dest, bool demand,
           std::chrono::steady_clock::time_point deadline, std::chrono::milliseconds timeout,
           FillReport& report);

  /// Frees the scratch buffers (no run() may be in progress).
  void close() noexcept;

 private:
  // The stored bytes of one run of chunks of a decoded extent.
  struct Piece {
    std::size_t extent = 0;          // index into the unit's extents
    std::uint64_t stored_begin = 0;  // from the compressed block's file_offset
    std::uint64_t stored_end = 0;
    std::uint64_t raw_begin = 0;  // raw bytes of the block the piece's chunks hold,
    std::uint64_t raw_end = 0;    // clipped to the extent's
  };
  // kDepth buffers of one fill.
  struct Scratch {
    std::vector<AlignedBuffer> buffers;
    bool busy = false;  // guarded by scratch_mutex_
  };
  Scratch& take_scratch();
  void give_back(Scratch& scratch) noexcept;
  void decode_piece(std::uint32_t block, const Piece& piece, std::span<const std::byte> stored,
                    std::span<std::byte> dest) const;

  const Layout& layout_;
  io::Backend& backend_;
  std::span<const io::FileId> files_;
  const bool verify_;
  ExtentVerifier& verifier_;
  TraceLog& trace_;
  std::vector<std::vector<Piece>> pieces_;  // per unit; immutable after the constructor
  std::uint64_t piece_capacity_ = 0;        // bytes of a scratch buffer
  mutable tensorstream::detail::ThreadPool pool_;
  std::mutex scratch_mutex_;
  std::vector<std::unique_ptr<Scratch>> scratch_;  // guarded by scratch_mutex_; grows to the
                                                   // number of fills at once
};

}  // namespace tensorstream::engine::detail
