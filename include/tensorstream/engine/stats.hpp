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

/// Whether one source file is read with GPUDirect Storage (meanings: for_each_field below).
struct GdsFileInfo {
  std::filesystem::path path;
  bool used = false;
  std::string reason;
};

/// Calls `visit(name, value, meaning)` for each field of `f`.
template <class Visit>
void for_each_field(const GdsFileInfo& f, Visit&& visit) {
  visit("path", f.path, "the source file");
  visit("used", f.used, "its blocks are read by cuFileRead into device memory");
  visit("reason", f.reason, "why not (empty when used)");
}

/// Counters since construction. Bytes are of block data. What each field means is written
/// once, in for_each_field() below, which every reader of the statistics goes through: the
/// dict of the Python binding (`_core.Engine.stats()`) and the statistics table of
/// docs/runtime-settings.md (`tensorstream settings --markdown`) are built from it.
struct EngineStats {
  std::uint64_t acquires = 0;
  std::uint64_t device_hits = 0;
  std::uint64_t device_misses = 0;
  std::uint64_t bytes_from_storage = 0;
  std::uint64_t bytes_from_ram_tier = 0;
  std::uint64_t bytes_to_device = 0;
  std::uint64_t fills = 0;
  std::uint64_t prefetches_issued = 0;
  std::uint64_t prefetches_used = 0;
  std::uint64_t prefetches_wasted = 0;
  std::uint64_t prefetches_cancelled = 0;
  std::uint64_t failures = 0;
  double stall_seconds = 0;
  double io_seconds = 0;
  double fill_seconds = 0;
  std::uint64_t device_bytes_in_use = 0;
  std::uint64_t device_bytes_peak = 0;
  std::uint64_t device_budget = 0;
  std::uint64_t arena_bytes = 0;
  std::uint64_t arena_bytes_in_use = 0;
  std::uint64_t arena_bytes_peak = 0;
  bool overlap = true;
  std::uint64_t row_reads = 0;
  std::uint64_t rows_read = 0;
  std::uint64_t bytes_of_rows = 0;
  cache::Stats ram_tier;
  io::IoStats io;
  std::string backend;
  bool in_place = false;
  std::string backend_note;
  std::uint64_t bytes_from_page_cache = 0;
  std::uint64_t compressed_units = 0;
  std::uint64_t bytes_read_compressed = 0;
  std::uint64_t bytes_decoded = 0;
  double decode_seconds = 0;
  unsigned decode_threads = 0;
  std::uint64_t decoded_copy_bytes = 0;
  double decoded_copy_seconds = 0;
  std::string decode_note;
  unsigned prefetch_depth = 0;
  bool order_learned = false;
  std::vector<double> block_load_seconds;
  std::vector<double> block_stall_seconds;
  std::vector<double> use_rates;
  GdsMode gds_mode = GdsMode::kAuto;
  std::uint64_t gds_files = 0;
  std::uint64_t gds_bytes = 0;
  std::string gds_reason;
  std::vector<GdsFileInfo> gds;
  std::uint64_t invariant_checks = 0;

  /// Effective storage bandwidth: bytes_from_storage / io_seconds (0 if nothing was read).
  [[nodiscard]] double storage_gbps() const noexcept {
    return io_seconds > 0 ? static_cast<double>(bytes_from_storage) / io_seconds / 1e9 : 0;
  }
};

/// Calls `visit(name, value, meaning)` for every field of `s`, and for the derived
/// `storage_gbps`, in a fixed order. A value is the field itself, except `gds_mode`, given by
/// its name (a std::string_view). Nested values — cache::Stats, io::IoStats, and the
/// GdsFileInfo of the `gds` vector — have their own for_each_field (argument-dependent
/// lookup finds it). A new statistic: its field above, one `visit` line here.
template <class Visit>
void for_each_field(const EngineStats& s, Visit&& visit) {
  visit("acquires", s.acquires, "acquire() calls");
  visit("device_hits", s.device_hits, "acquires that found the block ready (no wait)");
  visit("device_misses", s.device_misses, "acquires that waited for the block");
  visit("bytes_from_storage", s.bytes_from_storage,
        "bytes of fills read from storage (in place: the part not found in the page cache)");
  visit("bytes_from_ram_tier", s.bytes_from_ram_tier, "bytes of fills served by the RAM tier");
  visit("bytes_to_device", s.bytes_to_device, "bytes moved into the arena and resident buffers");
  visit("fills", s.fills, "fills that succeeded");
  visit("prefetches_issued", s.prefetches_issued, "fills started ahead of an acquire");
  visit("prefetches_used", s.prefetches_used, "prefetched blocks later acquired");
  visit("prefetches_wasted", s.prefetches_wasted, "prefetched blocks evicted before use");
  visit("prefetches_cancelled", s.prefetches_cancelled, "queued prefetches dropped for a demand");
  visit("failures", s.failures, "fills that ended in an error");
  visit("stall_seconds", s.stall_seconds, "time acquire() waited for blocks");
  visit("io_seconds", s.io_seconds, "summed time of storage reads");
  visit("fill_seconds", s.fill_seconds, "summed time of fills (read + copy)");
  visit("storage_gbps", s.storage_gbps(),
        "effective storage bandwidth: bytes_from_storage / io_seconds, in GB/s (0 if nothing "
        "was read)");
  visit("device_bytes_in_use", s.device_bytes_in_use, "resident buffers + slots allocated");
  visit("device_bytes_peak", s.device_bytes_peak, "the highest device_bytes_in_use");
  visit("device_budget", s.device_budget, "the budget the engine runs under");
  visit("arena_bytes", s.arena_bytes,
        "the streaming arena: the budget left beside the resident units (0: nothing streams)");
  visit("arena_bytes_in_use", s.arena_bytes_in_use, "bytes of the units placed in the arena now");
  visit("arena_bytes_peak", s.arena_bytes_peak, "most bytes placed in the arena at once");
  visit("overlap", s.overlap,
        "the arena holds two of the largest streamed units, so a load runs while another unit "
        "computes; false below that budget: every load is waited for");
  visit("row_reads", s.row_reads, "acquire_rows() calls (embeddings streamed by rows)");
  visit("rows_read", s.rows_read, "rows those calls read");
  visit("bytes_of_rows", s.bytes_of_rows, "bytes of those rows: all that was read of the tables");
  visit("prefetch_depth", s.prefetch_depth, "prefetch depth in use now");
  visit("order_learned", s.order_learned, "`adaptive`: the cyclic order of acquires is known");
  visit("block_load_seconds", s.block_load_seconds,
        "per block: the time of its last fill (0: never filled)");
  visit("block_stall_seconds", s.block_stall_seconds,
        "per block: the time acquires of it waited, in all");
  visit("use_rates", s.use_rates,
        "per block: the share of recent passes that used it, as learned for routed units "
        "(options `unit_use_rate` < 1: experts); 1 for the others");
  visit("backend", s.backend,
        "how blocks are read: `pread`, `io_uring` or `mmap` (with in_place: mapped, no copy)");
  visit("in_place", s.in_place, "blocks are read in place (device `cpu`: windows, no copy)");
  visit("backend_note", s.backend_note,
        "why this path was chosen for backend `auto` (or why `mmap` could not read in place)");
  visit("gds_mode", gds_mode_name(s.gds_mode), "GPUDirect Storage: the mode asked for");
  visit("gds_files", s.gds_files, "files read with GPUDirect Storage");
  visit("gds_bytes", s.gds_bytes,
        "bytes cuFileRead moved into device memory (also counted in bytes_from_storage and "
        "bytes_to_device)");
  visit("gds_reason", s.gds_reason,
        "why files are not read with GPUDirect Storage: empty when every file is, else one line "
        "(the common cause, or the files and their causes)");
  visit("gds", s.gds, "each file's GPUDirect Storage outcome");
  visit("bytes_from_page_cache", s.bytes_from_page_cache,
        "in place: bytes of fills found in the page cache (the rest is in bytes_from_storage)");
  visit("compressed_units", s.compressed_units,
        "units with compressed chunks to decode (0 for an uncompressed source)");
  visit("bytes_read_compressed", s.bytes_read_compressed,
        "stored bytes of compressed chunks read from storage (also in bytes_from_storage)");
  visit("bytes_decoded", s.bytes_decoded,
        "bytes those chunks decoded into (bytes_decoded / bytes_read_compressed: the ratio "
        "of what was read)");
  visit("decode_seconds", s.decode_seconds,
        "summed time fills spent decoding (overlapping their reads; not in io_seconds)");
  visit("decode_threads", s.decode_threads,
        "threads that decode one unit's chunks at once (0: nothing to decode)");
  visit("decoded_copy_bytes", s.decoded_copy_bytes,
        "the temporary decoded copy the compressed units were decoded into once, at start "
        "(`compressed_reads`), in bytes; 0: none, they are decoded on the fills");
  visit("decoded_copy_seconds", s.decoded_copy_seconds,
        "the time it took to make the decoded copy (reading, decoding, writing)");
  visit("decode_note", s.decode_note,
        "how compressed units are read and why: decoded on the fills (and why not in place or "
        "with GPUDirect Storage, or that decoding holds the fills back) or once into a decoded "
        "copy (the rule of `compressed_reads` that chose it, with the rates measured); empty for "
        "an uncompressed source");
  visit("ram_tier", s.ram_tier, "the RAM tier (zeros when there is none)");
  visit("io", s.io, "the I/O backend (zeros when blocks are read in place: no backend)");
  visit("invariant_checks", s.invariant_checks,
        "invariant checks run (`check_invariants`; 0 when off)");
}

}  // namespace tensorstream::engine
