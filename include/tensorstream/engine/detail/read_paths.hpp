// Which reader reads each block of an engine, decided once at construction with the reasons.
//
//   device "cpu"   choose_cpu_read_path(): in place (InPlaceReader) or through a backend
//                  (HostReader); the note says why
//   device GPU     a HostReader always (the backend's selection note says which backend), and
//                  GdsFiles per source file; a block whose extents all lie in files cuFile
//                  reads goes to the GdsReader, every other block to the HostReader
//   compressed     a unit with compressed chunks (decoded extents) is always the HostReader's:
//                  neither a window over the page cache nor cuFile can decode. The CPU then
//                  reads no unit in place (choose_cpu_read_path), a GPU sends those units
//                  through host memory; decode_note() and gds_reason() say so
//
// The engine asks reader(block) for every fill and never looks at which reader it got.
//
// Thread-safety: reader() and the readers' fills may be called from the fill workers at
// once; the rest is called under the engine's mutex (prepare() before any fill, close()
// after the last).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "tensorstream/engine/detail/block_reader.hpp"
#include "tensorstream/engine/detail/gds_reader.hpp"
#include "tensorstream/engine/detail/host_reader.hpp"
#include "tensorstream/engine/detail/in_place_reader.hpp"
#include "tensorstream/engine/detail/unit_places.hpp"
#include "tensorstream/engine/options.hpp"
#include "tensorstream/engine/stats.hpp"
#include "tensorstream/engine/trace.hpp"
#include "tensorstream/shim/cuda.hpp"

namespace tensorstream::engine::detail {

class ReadPaths {
 public:
  /// Builds the readers of `layout` for `device` (nullptr: the CPU; then `copy_stream` is
  /// null too; `cpu_path` is the CPU's choice when the caller made it already, else
  /// choose_cpu_read_path() makes it). References must
  /// outlive the object. Throws what the readers' constructors throw (a file that cannot be
  /// opened, gds=on where cuFile cannot read).
  ReadPaths(const Layout& layout, const EngineOptions& options, const cuda::Device* device,
            const cuda::Stream* copy_stream, TraceLog& trace,
            std::optional<CpuReadPath> cpu_path = std::nullopt);

  /// The reader of `block` (not after close()).
  [[nodiscard]] BlockReader& reader(std::uint32_t block) const noexcept {
    return *by_block_[block];
  }
  /// False when blocks are read in place: the buffers then need no memory of their own.
  [[nodiscard]] bool buffers_need_memory() const noexcept { return !in_place_; }

  /// Once the buffers exist: registers the arena with cuFile where blocks are read with GDS
  /// (optional), and gives a GPU's host path its staging (`fill_workers` buffers for the
  /// largest block read through host memory).
  void prepare(UnitPlaces& places, unsigned fill_workers);

  // ---- what EngineStats reports ----
  [[nodiscard]] const std::string& backend_name() const noexcept { return backend_name_; }
  [[nodiscard]] bool in_place() const noexcept { return in_place_; }
  [[nodiscard]] const std::string& backend_note() const noexcept { return backend_note_; }
  [[nodiscard]] const GdsFiles& gds() const noexcept { return *gds_; }
  /// Why files or blocks are not read with GPUDirect Storage: the files' reason, and the
  /// units kept off it because they are decoded.
  [[nodiscard]] std::string gds_reason() const;
  /// How compressed units are read (empty for an uncompressed source), with what `stats`
  /// measured so far: whether decoding holds the fills back.
  [[nodiscard]] std::string decode_note(const EngineStats& stats) const;
  /// Threads decoding one unit's chunks (0 when nothing is decoded); kept after close().
  [[nodiscard]] unsigned decode_threads() const noexcept { return decode_threads_; }
  /// Zeros when reading in place or closed.
  [[nodiscard]] io::IoStats io_stats() const;
  [[nodiscard]] cache::Stats ram_tier_stats() const;

  /// Frees staging and the RAM tier, closes the backend, the cuFile handles and the windows
  /// (no fill may run; the buffers are gone already). Names and outcomes stay for stats().
  void close();

 private:
  const cuda::Device* device_;
  const Layout& layout_;
  bool in_place_ = false;
  std::string backend_name_;
  std::string backend_note_;
  std::string decode_note_;  // the part decided at construction
  unsigned decode_threads_ = 0;
  std::size_t gds_decoded_ = 0;  // decoded units of files cuFile reads
  std::unique_ptr<InPlaceReader> in_place_reader_;
  std::unique_ptr<HostReader> host_reader_;
  std::optional<GdsFiles> gds_;  // set in the constructor, after the host path is open
  std::unique_ptr<GdsReader> gds_reader_;
  std::vector<BlockReader*> by_block_;
};

}  // namespace tensorstream::engine::detail
