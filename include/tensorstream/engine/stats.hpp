// What an engine reports: Engine::stats() (engine.hpp).
//
// Thread-safety: values.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "tensorstream/cache/block_cache.hpp"
#include "tensorstream/engine/options.hpp"
#include "tensorstream/io/backend.hpp"

namespace tensorstream::engine {

/// Whether one source file is read with GPUDirect Storage.
struct GdsFileInfo {
  std::filesystem::path path;
  bool used = false;   ///< its blocks are read by cuFileRead into device memory
  std::string reason;  ///< why not (empty when used)
};

/// Counters since construction. Bytes are of block data.
struct EngineStats {
  std::uint64_t acquires = 0;
  std::uint64_t device_hits = 0;    ///< acquires that found the block ready (no wait)
  std::uint64_t device_misses = 0;  ///< acquires that waited for the block
  std::uint64_t bytes_from_storage = 0;
  std::uint64_t bytes_from_ram_tier = 0;
  std::uint64_t bytes_to_device = 0;  ///< bytes moved into device slots / resident buffers
  std::uint64_t fills = 0;
  std::uint64_t prefetches_issued = 0;
  std::uint64_t prefetches_used = 0;       ///< prefetched blocks later acquired
  std::uint64_t prefetches_wasted = 0;     ///< prefetched blocks evicted before use
  std::uint64_t prefetches_cancelled = 0;  ///< queued prefetches dropped for a demand
  std::uint64_t failures = 0;              ///< fills that ended in an error
  double stall_seconds = 0;                ///< time acquire() waited for blocks
  double io_seconds = 0;                   ///< summed time of storage reads
  double fill_seconds = 0;                 ///< summed time of fills (read + copy)
  std::uint64_t device_bytes_in_use = 0;   ///< resident buffers + the arena, allocated
  std::uint64_t device_bytes_peak = 0;
  std::uint64_t device_budget = 0;
  /// The streaming arena: its size, the bytes of the units placed in it now and at most, and
  /// whether it holds two of the largest streamed units (false: every load is waited for;
  /// the budget is below what overlapping loads with compute takes).
  std::uint64_t arena_bytes = 0;
  std::uint64_t arena_bytes_in_use = 0;
  std::uint64_t arena_bytes_peak = 0;
  bool overlap = true;
  /// Rows read by acquire_rows (embeddings streamed by rows): calls, rows and bytes.
  std::uint64_t row_reads = 0;
  std::uint64_t rows_read = 0;
  std::uint64_t bytes_of_rows = 0;
  cache::Stats ram_tier;  ///< zeros when there is no RAM tier
  io::IoStats io;         ///< zeros when blocks are read in place (no backend)
  /// How blocks are read: "pread", "io_uring" or "mmap" (with in_place: mapped, no copy).
  std::string backend;
  bool in_place = false;
  /// Why this path was chosen for backend kAuto (or why kMmap could not read in place).
  std::string backend_note;
  /// In place: bytes of fills found in the page cache (the rest is in bytes_from_storage).
  std::uint64_t bytes_from_page_cache = 0;
  unsigned prefetch_depth = 0;             ///< depth in use now
  bool order_learned = false;              ///< kAdaptive: the cyclic order is known
  std::vector<double> block_load_seconds;  ///< per block: last fill time (0: never filled)
  /// GPUDirect Storage: the mode asked for, the files read with it, the bytes cuFileRead moved
  /// into device memory (also counted in bytes_from_storage and bytes_to_device), and why
  /// files are not read with it: `gds_reason` is empty when every file is, else one line
  /// (the common cause, or the files and their causes); `gds` gives each file's outcome.
  GdsMode gds_mode = GdsMode::kAuto;
  std::uint64_t gds_files = 0;
  std::uint64_t gds_bytes = 0;
  std::string gds_reason;
  std::vector<GdsFileInfo> gds;
  /// Effective storage bandwidth: bytes_from_storage / io_seconds (0 if nothing was read).
  [[nodiscard]] double storage_gbps() const noexcept {
    return io_seconds > 0 ? static_cast<double>(bytes_from_storage) / io_seconds / 1e9 : 0;
  }
};

}  // namespace tensorstream::engine
