// The in-place reader (device "cpu" only): a block's bytes are the page cache's pages, mapped.
//
//   storage ──page cache──► the block's window (io/block_window.hpp) ◄── the view points here
//
// Each block has a window laid out like its buffer: each extent's aligned read region is
// mapped at the extent's buffer offset, so placements are the same as on the copying paths.
// A fill is populate() of the window (reading from storage what the page cache lacks),
// checked like a read; host_bytes() is the window, not the slot's (absent) memory; dropping
// a block takes its pages out of the process (the page cache keeps them), which is what keeps
// the budget bounding the weight bytes mapped into the process.
//
// Whether an engine reads in place is decided by choose_cpu_read_path(), with the reason.
//
// Thread-safety: windows may be populated, dropped and read concurrently (BlockWindow); the
// verifier is thread-safe. Construction and close() are not concurrent with use.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tensorstream/detail/file.hpp"
#include "tensorstream/engine/detail/block_reader.hpp"
#include "tensorstream/engine/options.hpp"
#include "tensorstream/engine/trace.hpp"
#include "tensorstream/io/block_window.hpp"
#include "tensorstream/io/env.hpp"

namespace tensorstream::engine::detail {

/// How a CPU engine reads its blocks: in place through the page cache, or with a backend.
struct CpuReadPath {
  bool in_place = false;
  std::string note;  ///< why (for kAuto), or why kMmap could not read in place
};

/// The CPU's choice (engine.hpp, "In place"): kMmap reads in place where windows work and
/// there is no RAM tier; kAuto also needs the source to be at most three quarters of
/// MemAvailable (/proc/meminfo); other backends never read in place. A source with decoded
/// extents (compressed store blocks) is never read in place: a window maps stored bytes, and
/// decoding needs a buffer (the note says so).
[[nodiscard]] CpuReadPath choose_cpu_read_path(const EngineOptions& options, const Layout& layout);
/// The same as if no unit of `layout` had to be decoded: whether an uncompressed source of
/// its size would be read in place (the decoded copy's rule, decoded_copy.hpp).
[[nodiscard]] CpuReadPath choose_cpu_read_path_uncompressed(const EngineOptions& options,
                                                            const Layout& layout);

class InPlaceReader final : public BlockReader {
 public:
  /// Opens every file of `layout` through `env` and maps one window per block. Throws
  /// IoError naming the file when a file cannot be opened or mapped.
  InPlaceReader(const Layout& layout, const EngineOptions& options, io::Env& env, TraceLog& trace);

  void fill(const FillOrder& order, BlockBuffer& buffer, FillReport& report) override;
  [[nodiscard]] std::byte* host_bytes(std::uint32_t block,
                                      const BlockBuffer& buffer) const noexcept override;
  void drop(std::uint32_t block) noexcept override;

  /// Unmaps the windows and closes the files (no fill may run).
  void close() noexcept;

 private:
  const Layout& layout_;
  const bool verify_;
  TraceLog& trace_;
  ExtentVerifier verifier_;
  std::vector<tensorstream::detail::FileDescriptor> files_;  // per layout file, our own
  std::vector<io::BlockWindow> windows_;                     // per block
};

}  // namespace tensorstream::engine::detail
