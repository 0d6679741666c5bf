// The decoded copy: the compressed units of a store decoded once, when the engine starts,
// into a temporary uncompressed file that the engine then streams like any uncompressed
// source — where decoding on every fill would be slower than reading decoded bytes.
//
//   store ──pread──► stored chunks ──decode (pool)──► pwrite ──► temporary file (unlinked)
//
// Why. Decoding costs CPU time on every fill; reading decoded bytes costs none. Where the
// storage delivers bytes faster than the decoder produces them — the page cache above all,
// from which an uncompressed store is mapped in place without a copy (in_place_reader.hpp) —
// streaming the compressed units would be slower than streaming an uncompressed store. The
// engine then declines to decode on the critical path: it decodes once, at construction, and
// streams the copy (in place on the CPU, GPUDirect Storage on a GPU, O_DIRECT elsewhere).
// choose_compressed_reads() decides (EngineOptions::compressed_reads) and says why; the
// engine's statistics carry the reason (decode_note) and the copy (decoded_copy_bytes).
//
// The copy. Each decoded extent of each unit gets a region of the file laid out as the
// extent's read region (4096-aligned, its raw bytes at the same `skip`), so the rewritten
// extent — file: the copy, nothing to decode — lands in the unit's buffer exactly where the
// decoded one did: placements do not change. Its checksums (the block's raw_checksum, the
// tensors' checksums) are over decoded bytes, so verify_checksums checks the copy against the
// store. While the copy is made, every chunk's stored checksum and every extent's decoded
// checksum are checked: it holds the store's bytes, or it is not made. The file is created
// with O_TMPFILE in the store's directory — no name, so a crash leaves nothing behind — and
// its space reserved with fallocate before anything is written, so a full disk fails cleanly
// (the engine then decodes on its fills and says why). Readers open it as /proc/self/fd/N;
// it lives as long as the DecodedCopy.
//
// Thread-safety: construction only (the pool it decodes on is its own); afterwards a value.
#pragma once

#include <cstdint>
#include <string>

#include "tensorstream/detail/file.hpp"
#include "tensorstream/engine/options.hpp"
#include "tensorstream/engine/source_layout.hpp"
#include "tensorstream/io/env.hpp"
#include "tensorstream/shim/cuda.hpp"

namespace tensorstream::engine::detail {

/// Whether to make a decoded copy of a source's compressed units, and why.
struct CompressedReadChoice {
  bool copy = false;
  std::string note;
};

/// Stored bytes of compressed chunks below which kAuto does not measure (it decodes on the
/// fills: a copy's start-up cost and disk space do not pay, and tests stay deterministic).
inline constexpr std::uint64_t kMeasureFromBytes = std::uint64_t{256} << 20;
/// Stored bytes read and decoded to measure the storage against the decoder.
inline constexpr std::uint64_t kMeasureSampleBytes = std::uint64_t{64} << 20;

/// The decision for `layout` (which has decoded extents) under options.compressed_reads on
/// `device` (nullptr: the CPU): kDecode and kDecodedCopy as they say; kAuto a copy when
///   - on the CPU, an uncompressed source of this size would be read in place from the page
///     cache (choose_cpu_read_path_uncompressed), which no decoding can match; else
///   - the compressed chunks hold at least kMeasureFromBytes, and the storage, measured now
///     through a backend of options.backend on a sample of kMeasureSampleBytes, reads stored
///     bytes faster than decode_threads_for(options) threads decode them (a copy read at R
///     decoded bytes per second then beats decoding on fills, which delivers at most D).
/// Never throws: a measurement that fails means decoding on fills, with the reason.
[[nodiscard]] CompressedReadChoice choose_compressed_reads(const Layout& layout,
                                                           const EngineOptions& options,
                                                           const cuda::Device* device,
                                                           io::Env& env);

class DecodedCopy {
 public:
  /// Decodes every decoded extent of `layout` into a new temporary file in the directory of
  /// the store, on decode_threads_for(options) threads, then rewrites those extents (and the
  /// placements of their tensors) as plain extents of that file, appended to layout.files.
  /// Throws IoError (the file cannot be created or its space reserved: ENOSPC), FormatError /
  /// ChecksumError (a chunk of the store is damaged, named); `layout` is unchanged then.
  DecodedCopy(Layout& layout, const EngineOptions& options, io::Env& env);

  /// Bytes of the copy (the decoded units' regions).
  [[nodiscard]] std::uint64_t bytes() const noexcept { return bytes_; }
  /// Wall time it took to make (reading, decoding, writing).
  [[nodiscard]] double seconds() const noexcept { return seconds_; }
  [[nodiscard]] unsigned threads() const noexcept { return threads_; }
  /// Where it lives (its directory) and how readers open it.
  [[nodiscard]] const std::filesystem::path& directory() const noexcept { return directory_; }
  [[nodiscard]] const std::filesystem::path& path() const noexcept { return path_; }

 private:
  tensorstream::detail::FileDescriptor file_;
  std::filesystem::path directory_;
  std::filesystem::path path_;
  std::uint64_t bytes_ = 0;
  double seconds_ = 0;
  unsigned threads_ = 0;
};

}  // namespace tensorstream::engine::detail
