// The engine's options (engine.hpp explains what each one changes in the data path).
//
// Every field has its default in place: these in-class initialisers (and IoOptions's) are the
// one place a default is written. The settings table (settings.hpp) reads them from a
// value-initialised EngineOptions, and everything else (the Python binding's options dict,
// tensorstream.Config, docs/runtime-settings.md) reads the table. A new scalar option: its
// field and default here, then one row in src/settings.cpp (settings.hpp, "Adding a
// setting"); a structural one (not a scalar, like device_memory and env) is listed in
// structural_options() instead.
//
// Thread-safety: values; the name/parse functions are pure.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "tensorstream/cache/block_cache.hpp"
#include "tensorstream/io/backend.hpp"
#include "tensorstream/io/env.hpp"
#include "tensorstream/shim/cuda.hpp"

namespace tensorstream::engine {

enum class PrefetchStrategy { kNone, kNextLayer, kAdaptive };

/// "none", "next_layer", "adaptive"; parse throws std::invalid_argument naming the value.
[[nodiscard]] std::string_view prefetch_strategy_name(PrefetchStrategy strategy) noexcept;
[[nodiscard]] PrefetchStrategy parse_prefetch_strategy(std::string_view name);

/// Memory for the engine's device buffers supplied by the caller (e.g. taken from torch's
/// caching allocator, so one allocator sees all device memory). `allocate(bytes)` returns an
/// address: a host pointer (device "cpu"; kIoAlignment-aligned) or a CUDA device pointer
/// (256-aligned), valid until `release(address, bytes)`, which the engine calls from close().
struct MemoryProvider {
  std::function<std::uint64_t(std::size_t bytes)> allocate;
  std::function<void(std::uint64_t address, std::size_t bytes)> release;
};

/// Whether blocks are read with GPUDirect Storage (engine.hpp, "GPUDirect Storage").
enum class GdsMode {
  kAuto,  ///< use it for every file where it works; the host path elsewhere, with the reason
  kOn,    ///< use it for every file, or throw from the constructor saying why it cannot
  kOff,   ///< never (libcufile is not even loaded)
};

/// "auto", "on", "off"; parse throws std::invalid_argument naming the value.
[[nodiscard]] std::string_view gds_mode_name(GdsMode mode) noexcept;
[[nodiscard]] GdsMode parse_gds_mode(std::string_view name);

/// How the compressed units of a store are read (engine.hpp, "Compressed stores").
enum class CompressedReads {
  kAuto,         ///< a decoded copy where decoding on every fill would be slower, else kDecode
  kDecode,       ///< decode each fill's chunks on the fill path
  kDecodedCopy,  ///< decode every compressed unit once into a temporary uncompressed copy
};

/// "auto", "decode", "decoded_copy"; parse throws std::invalid_argument naming the value.
[[nodiscard]] std::string_view compressed_reads_name(CompressedReads mode) noexcept;
[[nodiscard]] CompressedReads parse_compressed_reads(std::string_view name);

struct EngineOptions {
  /// "cpu" or "cuda:N" (also "cuda" for device 0).
  std::string device = "cpu";
  /// Hard cap on bytes of weights held in device memory (resident units + the streaming
  /// arena).
  std::uint64_t device_budget = 0;
  /// Pinned-RAM tier between storage and device (0: none).
  std::uint64_t ram_cache_bytes = 0;
  cache::Policy cache_policy = cache::Policy::kAuto;
  /// Device "cpu": kMmap reads in place (engine.hpp, "In place"); kAuto reads in place when
  /// ram_cache_bytes is 0 and the source is at most 3/4 of MemAvailable, else as below.
  /// Elsewhere kAuto is io_uring where usable, else pread (both with O_DIRECT).
  io::BackendType backend = io::BackendType::kAuto;
  io::IoOptions io;
  /// How the engine reaches the operating system (opening files, running requests): the
  /// system itself by default. Must outlive the engine. Tests wrap it to inject faults.
  io::Env* env = &io::Env::posix();
  PrefetchStrategy prefetch = PrefetchStrategy::kAdaptive;
  /// Blocks to prefetch ahead; nullopt: chosen from measured I/O vs compute time.
  std::optional<unsigned> prefetch_depth;
  /// The arena the plan aims for, in largest streamed units (≥ 1): with 2 a unit loads while
  /// another computes; more allow deeper prefetch at the cost of budget that could hold
  /// resident units. A budget too small for it gets fewer, down to 1 (no overlap; said in
  /// EngineStats::overlap).
  unsigned slots = 2;
  /// Check every block read against the store's checksum. Checking happens in host memory,
  /// so it keeps blocks off the GPUDirect Storage path. For a compressed block: each chunk's
  /// stored checksum before it is decoded, then the decoded bytes' (the block's raw_checksum,
  /// or each tensor's).
  bool verify_checksums = false;
  /// Threads that decode the chunks of a compressed unit at once, the fill worker included
  /// (a pool shared by the fill workers); 0: one per core, at most 8. Fewer leave cores to
  /// the computation (on the CPU the same cores run the model), more decode a unit sooner.
  unsigned decode_threads = 0;
  /// Compressed units: decoded on every fill (kDecode), or decoded once at construction into
  /// a temporary, unlinked uncompressed copy beside the store that is then streamed as an
  /// uncompressed source (kDecodedCopy: costs the decoded bytes in disk space and their
  /// decoding at start). kAuto makes the copy where decoding on every fill would be slower
  /// than reading decoded bytes: on the CPU when an uncompressed store would be read in place
  /// from the page cache, and elsewhere when the storage, measured at construction, reads
  /// faster than the decoder decodes (engine.hpp, "Compressed stores").
  CompressedReads compressed_reads = CompressedReads::kAuto;
  /// GPUDirect Storage: kAuto (default) reads straight into device memory wherever cuFile
  /// works with the nvidia-fs kernel module, and falls back per file; kOn insists (the
  /// constructor throws if it cannot, and a CPU device is std::invalid_argument); kOff never
  /// touches cuFile. No GDS on the CPU in kAuto and kOff.
  GdsMode gds = GdsMode::kAuto;
  /// Upper bound on any wait inside the engine (a block that takes longer fails with an
  /// Error saying so, instead of hanging).
  std::chrono::milliseconds wait_timeout{120'000};
  /// Where resident buffers and slots come from; unset: the engine allocates them itself.
  std::optional<MemoryProvider> device_memory;
  /// Spans kept in the trace ring.
  std::size_t trace_capacity = 1u << 16;
  /// After every acquire, release and prefetch, check the engine's invariants and throw
  /// Error naming the call and the broken one (engine/detail/invariants.hpp). One pass over
  /// the places per call: for debugging (Python: Config.debug_mode).
  bool check_invariants = false;
  /// Per unit (empty: defaults), what the residency plan counts beyond its size
  /// (residency.hpp, UnitDemand): the bytes that must be in the arena at once while the unit
  /// is used (0: its size), and whether it is used by parts (rows) and so made resident last.
  std::vector<std::uint64_t> unit_needs;
  std::vector<bool> unit_partial;
  /// Per unit (empty: all 1), the share of passes expected to use it, in (0, 1]. Below 1 the
  /// unit is routed — an expert, used when its router picks it: it is kept out of the learned
  /// order and the prefetch walk (the caller prefetches it), its actual rate is learned from
  /// its acquires, and its cached place is ranked by that rate (engine/detail/prefetcher.hpp);
  /// the residency plan makes every-pass units resident before it (residency.hpp).
  std::vector<double> unit_use_rate;
  /// A GPU with device_memory: the stream on which the memory's previous owner (torch's
  /// caching allocator: the stream that was current when it allocated) may still have work
  /// reading it. The first fill of any byte waits for that work. nullptr: the legacy stream.
  cuda::StreamHandle memory_stream = nullptr;
};

namespace detail {
/// The device ordinal of `device`: -1 for "cpu", N for "cuda:N" (0 for "cuda"). Throws
/// std::invalid_argument naming the value for anything else.
[[nodiscard]] int parse_device(const std::string& device);
}  // namespace detail

}  // namespace tensorstream::engine
