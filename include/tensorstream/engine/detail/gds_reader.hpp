// The GPUDirect Storage reader: cuFile reads a block's extents straight into GPU memory.
//
//   storage ──cuFileRead (O_DIRECT handle)──► the GPU buffer
//
// Two pieces. GdsFiles makes the decision, once per engine and per source file, in the shape
// of kvikio's compat-mode manager: the fast path, or the fallback recorded with why
// (engine.hpp, "GPUDirect Storage", gives the rules). GdsReader fills the blocks whose every
// extent lies in a file GdsFiles took: it waits on the host until the buffer is no longer in
// use (the consumer's release, the last copy into it), splits each extent's aligned read
// region (clipped at the end of the file) into requests of IoOptions::request_size, runs them
// on a thread pool shared by all its fills (up to IoOptions::num_threads at once for one
// fill, the fill worker included), and records the buffer's "ready" event on the copy stream.
// Each region lands at the same buffer offset as on the host path, so placements agree.
//
// Thread-safety: GdsFiles is immutable after construction (close() aside, called when no fill
// runs); cuFile handles may be read concurrently. GdsReader::fill may run on several fill
// workers at once.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "tensorstream/detail/thread_pool.hpp"
#include "tensorstream/engine/detail/block_reader.hpp"
#include "tensorstream/engine/options.hpp"
#include "tensorstream/engine/stats.hpp"
#include "tensorstream/engine/trace.hpp"
#include "tensorstream/io/env.hpp"
#include "tensorstream/shim/cuda.hpp"
#include "tensorstream/shim/cufile.hpp"

namespace tensorstream::engine::detail {

class GdsFiles {
 public:
  /// Decides for every file of `layout`. `device`: the engine's GPU, or nullptr for the CPU.
  /// A cause that keeps every file off GDS (a CPU device, gds=off, a RAM tier,
  /// verify_checksums, io.direct off, libcufile missing, no nvidia-fs for kAuto, the driver
  /// not opening) is checked first, without touching cuFile where it is not needed;
  /// otherwise each file is opened through `env` with O_DIRECT and registered. With gds=on
  /// every failure throws: CudaError, or IoError (with its errno) when a file cannot be
  /// opened or read that way, naming the file.
  GdsFiles(const Layout& layout, const EngineOptions& options, io::Env& env,
           const cuda::Device* device);

  /// Each file was tried, every extent of `block` is in a file cuFile reads, and the block
  /// needs no repacking (source_layout.hpp: cuFile writes the read layout as it is) and no
  /// decoding (compressed chunks are decoded in host memory).
  [[nodiscard]] bool covers(const BlockLayout& block) const noexcept;
  /// The registered handle of file `file` (it must be used).
  [[nodiscard]] const cuda::CuFileHandle& handle(std::uint32_t file) const {
    return *handles_[file];
  }

  /// For EngineStats: each file's outcome, how many are used, and one line of causes (each
  /// once; empty when every file is used).
  [[nodiscard]] const std::vector<GdsFileInfo>& outcome() const noexcept { return info_; }
  [[nodiscard]] std::uint64_t used_files() const noexcept { return used_files_; }
  [[nodiscard]] const std::string& reason() const noexcept { return reason_; }

  /// Deregisters and closes the files (no read may run); the outcome stays.
  void close() noexcept { handles_.clear(); }

 private:
  std::vector<std::optional<cuda::CuFileHandle>> handles_;  // per file; unset: host path
  std::vector<GdsFileInfo> info_;
  std::uint64_t used_files_ = 0;
  std::string reason_;
  bool per_file_ = false;  // no common cause: each file was tried
};

class GdsReader final : public BlockReader {
 public:
  /// Reads with the handles of `files` (which must outlive the reader) on `device`,
  /// recording "ready" on `copy_stream`.
  GdsReader(const Layout& layout, const EngineOptions& options, const GdsFiles& files,
            const cuda::Stream& copy_stream, TraceLog& trace);

  void fill(const FillOrder& order, BlockBuffer& buffer, FillReport& report) override;

 private:
  void read(std::uint32_t block, const BlockBuffer& buffer, FillReport& report);

  const Layout& layout_;
  const GdsFiles& files_;
  const cuda::Stream& copy_stream_;
  TraceLog& trace_;
  const std::chrono::milliseconds wait_timeout_;
  const std::uint64_t request_size_;
  const unsigned threads_;  // per fill, the fill worker included
  tensorstream::detail::ThreadPool pool_;
};

}  // namespace tensorstream::engine::detail
