// The host reader: a block's bytes come through host memory.
//
//   storage ──io::Backend──► host destination ──(a GPU: cuMemcpyHtoDAsync on the copy stream)──►
//   buffer
//
// The host destination is, in this order of preference:
//   - the RAM tier's entry for the block, when the tier holds it (no read at all) or admits
//     it (read into the entry, published, then copied out of it); only streamed blocks are
//     admitted: a resident block is read once into its buffer and stays there;
//   - on a GPU, one of the pinned staging buffers (one per fill worker);
//   - on the CPU, the buffer itself (no copy).
// On a GPU the copy out of a tier entry is asynchronous, so the entry stays pinned until the
// copy is over: a slot keeps it until its next fill; a resident buffer, which has no next
// fill, waits for its copy before the fill ends.
// read() is the one step that produces a block's bytes in host memory from storage: all the
// plain extents submitted at once to the backend, the decoded ones (a compressed store
// block's chunks) read and decoded piece by piece meanwhile by the decode pipeline
// (decode_pipeline.hpp: chunks decoded in parallel on its pool, straight into the
// destination), then each plain extent waited for within wait_timeout and checked
// (verify_checksums). Whatever the destination — the CPU buffer, a RAM-tier entry, a GPU's
// staging — it receives decoded bytes: the RAM tier holds decoded units (a hit costs a copy,
// not a decode; docs/architecture.md, "Compressed stores", gives the measurements), and a GPU
// gets one host-to-device copy of the decoded unit.
//
// Thread-safety: fill() runs on several fill workers at once (the backend, the RAM tier and
// the verifier are thread-safe; staging buffers are handed out under staging_mutex_).
// close() and the statistics are called under the engine's mutex, close() only once no fill
// runs.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "tensorstream/cache/block_cache.hpp"
#include "tensorstream/engine/detail/block_reader.hpp"
#include "tensorstream/engine/detail/decode_pipeline.hpp"
#include "tensorstream/engine/options.hpp"
#include "tensorstream/engine/trace.hpp"
#include "tensorstream/host_memory.hpp"
#include "tensorstream/io/backend.hpp"
#include "tensorstream/io/env.hpp"
#include "tensorstream/shim/cuda.hpp"

namespace tensorstream::engine::detail {

class HostReader final : public BlockReader {
 public:
  /// Makes a backend of options.backend (over `env`) and opens every file of `layout` with
  /// it; sets up the RAM tier when options.ram_cache_bytes > 0: one region (RegionAllocator)
  /// of ram_cache_bytes rounded down to kSlotAlignment, at most the bytes of all blocks,
  /// pinned on a GPU, taken now; and the decode pipeline when `layout` has decoded extents
  /// (options.decode_threads threads per piece, 0: one per core, at most 8).
  /// `device` and `copy_stream`: the GPU the buffers are on, or nullptr for the CPU. All
  /// references must outlive the reader. Throws what make_backend and Backend::open throw.
  HostReader(const Layout& layout, const EngineOptions& options, io::Env& env,
             const cuda::Device* device, const cuda::Stream* copy_stream, TraceLog& trace);

  void fill(const FillOrder& order, BlockBuffer& buffer, FillReport& report) override;

  /// Reads every extent of `block` into `dest` at its buffer offset (all submitted, then all
  /// waited for; the first error wins and the other reads are cancelled when their tickets
  /// go), decoding the decoded ones, checking them when verify_checksums is on. `dest` is
  /// kIoAlignment-aligned and holds the block's size in memory.
  void read(std::uint32_t block, std::span<std::byte> dest, bool demand, FillReport& report);

  /// A GPU: allocates `count` pinned staging buffers of `bytes` each (one per fill worker).
  void allocate_staging(unsigned count, std::uint64_t bytes);

  [[nodiscard]] const io::Backend& backend() const noexcept { return *backend_; }
  /// Threads that decode one piece of a compressed unit (0 when nothing is decoded).
  [[nodiscard]] unsigned decode_threads() const noexcept {
    return decode_ ? decode_->threads() : 0;
  }
  /// Zeros once closed.
  [[nodiscard]] io::IoStats io_stats() const;
  [[nodiscard]] cache::Stats ram_tier_stats() const;
  /// Frees the staging buffers and the RAM tier and closes the backend (no fill may run).
  void close();

 private:
  // A pinned host buffer that a fill reads into before the copy to the device.
  struct Staging {
    AlignedBuffer host;
    std::optional<cuda::Event> copied;  // recorded after the copy out of it
    bool busy = false;                  // guarded by staging_mutex_
  };
  Staging& take_staging();
  void give_back(Staging& staging);

  const Layout& layout_;
  const bool verify_;
  const std::chrono::milliseconds wait_timeout_;
  const cuda::Device* const device_;
  const cuda::StreamHandle copy_stream_;
  TraceLog& trace_;
  ExtentVerifier verifier_;
  std::shared_ptr<HostAllocator> allocator_;
  std::unique_ptr<io::Backend> backend_;
  std::vector<io::FileId> files_;  // per layout file
  std::unique_ptr<cache::BlockCache> cache_;
  std::unique_ptr<DecodePipeline> decode_;  // when the layout has decoded extents
  std::vector<Staging> staging_;            // sized once, before any fill
  std::mutex staging_mutex_;
  std::condition_variable staging_free_;
};

}  // namespace tensorstream::engine::detail
