// The streaming engine: moves blocks of a store into the memory of the device that computes
// with them, ahead of when they are needed, within hard budgets.
//
// Data path. A block is read by an I/O backend (io/backend.hpp) into host memory — straight
// into its device slot when the device is the CPU, into a pinned staging buffer or a RAM-tier
// entry otherwise — and, on a GPU, copied to its device slot on the engine's copy stream.
// Blocks the residency plan (residency.hpp) keeps resident are loaded once and stay; the
// others share a ring of slots.
//
// In place (device "cpu" only). With backend kMmap — or kAuto when there is no RAM tier and
// the source is at most three quarters of the memory the kernel reports available — a block is not
// copied at all: its file ranges are mapped into a window laid out like its buffer
// (io/block_window.hpp), a fill faults the window's pages in from the page cache (reading
// from storage what is not cached), and the view points into the window. A slot then holds
// no memory of its own: "filling" a slot populates the window of its block, and taking the
// slot for another block unmaps the old block's pages from the process (MADV_DONTNEED; the
// page cache keeps them). The budget therefore bounds the weight bytes mapped into the
// process exactly as it bounds slot memory; the page cache is the kernel's reclaimable
// memory, shared with every process, and is what serves repeated passes. stats().backend,
// .in_place and .backend_note say which path was taken and why.
//
// Synchronisation. acquire(block, stream) returns once the block's bytes are on their way
// and, on a GPU, makes `stream` wait (on the device) for the copy's "ready" event: the host
// does not wait for the copy. release(block, stream) records a "done" event on `stream`; the
// slot's next fill waits for it on the copy stream. In the steady state, with prefetching
// ahead of compute, acquire() finds the block's read finished and returns without blocking.
//
// Scheduling. A demanded block (acquire) is read at high priority, ahead of prefetches.
// Prefetch strategies: kNone; kNextLayer (the next blocks in store order, cyclically);
// kAdaptive (learns the order of acquires during the first pass, then prefetches along it,
// as deep as measured I/O time vs compute time requires, within the slots available).
// A prefetch never displaces a block that is held or that was prefetched and not used yet.
//
// GPUDirect Storage. On a CUDA device, a block can also be read by cuFile (shim/cufile.hpp)
// straight into its device slot, with no pinned staging and no host-to-device copy:
//
//     store file ──cuFileRead (O_DIRECT handle)──► device slot / resident buffer
//
// EngineOptions::gds chooses: kOff never loads libcufile; kAuto opens the cuFile driver and
// registers each source file (opened with O_DIRECT) and, per file, falls back to the host path
// when that fails, recording why (EngineStats::gds); kOn throws from the constructor, naming
// the file and the cause, when any file cannot be read that way. kAuto also requires the
// nvidia-fs kernel module: without it cuFile runs in "compatibility mode", reading through its
// own small bounce buffers, which is no faster than the host path; kOn uses it regardless. A GDS
// fill runs on a fill worker: it waits on the host (cuEventSynchronize) for the slot's "done" event
// — the consumer's release — then issues cuFileRead requests of IoOptions::request_size, up to
// IoOptions::num_threads at a time, each landing at the same buffer offset the host path
// uses (a safetensors extent's whole aligned region, clipped at the end of the file), then
// records the slot's "ready" event on the copy stream. acquire() and release() do not change.
// IoOptions::fault_injector, when set, is consulted at FaultPoint::kOpenDirect before each file
// is opened for cuFile too, so tests can make registration fail on any file system.
// Blocks that must pass through host memory never use GDS: with a RAM tier
// (ram_cache_bytes > 0) the tier is filled from host reads; with verify_checksums the bytes
// are checked in host memory; with IoOptions::direct off the page cache is wanted, which
// cuFile bypasses. kAuto then uses the host path and says why; kOn refuses these
// combinations (std::invalid_argument).
//
// Failures. An I/O error, short read, checksum mismatch (with verify_checksums) or CUDA error
// of a fill is delivered to whoever acquires that block, as an exception naming the file,
// block, offset and cause; the failed block can be acquired again (it is re-read). No wait
// is unbounded: `wait_timeout` bounds every wait, and close() cancels pending work.
//
// Sources. An engine streams either a TensorStream store (Engine(store_path, options)) or a
// Hugging Face safetensors checkpoint read in place, without conversion
// (Engine::from_safetensors): a `.safetensors` file, a checkpoint directory (shards + index)
// or an index file. Inside the engine both are a list of files and a list of blocks, each
// block a list of extents {file, file offset, length, offset in the block's buffer}; tensors()
// says where each tensor of a block lies in its buffer, whatever the source.
//
// Safetensors layout. The tensors of a block are taken in file order; runs of tensors that
// are contiguous in one file form one extent (one read). Each extent is read with O_DIRECT
// straight into the block's buffer: its aligned read region [start, start + aligned_size)
// (io::plan_read) starts at a 4096-aligned offset of the buffer just past the previous
// extent's region — regions never overlap, so the concurrent reads of a block never clobber
// each other — and its bytes land at start + skip, where skip = file offset % 4096. So a
// tensor is aligned in memory exactly as it is in its file, and a block's size in memory
// (what the residency plan, slots and BlockView::size count) is the sum of its extents'
// aligned regions. verify_checksums: a safetensors file stores no checksum; the engine then
// takes the XXH3-64 of each extent on its first read and checks later reads against it
// (it catches a file changed or corrupted between reads, not a bad first read).
//
// Thread-safety: every public member is thread-safe. Several threads may hold different (or
// the same) blocks at once, up to the number of slots for streamed blocks.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "tensorstream/cache/block_cache.hpp"
#include "tensorstream/dtype.hpp"
#include "tensorstream/engine/residency.hpp"
#include "tensorstream/io/backend.hpp"
#include "tensorstream/shim/cuda.hpp"

namespace tensorstream::engine {

enum class PrefetchStrategy { kNone, kNextLayer, kAdaptive };

/// "none", "next_layer", "adaptive"; parse throws std::invalid_argument naming the value.
[[nodiscard]] std::string_view prefetch_strategy_name(PrefetchStrategy strategy) noexcept;
[[nodiscard]] PrefetchStrategy parse_prefetch_strategy(std::string_view name);

/// Memory for the engine's device buffers supplied by the caller (e.g. taken from torch's
/// caching allocator, so one allocator sees all device memory). `allocate(bytes)` returns an
/// address: a host pointer (device "cpu"; 4096-aligned) or a CUDA device pointer (256-aligned),
/// valid until `release(address, bytes)`, which the engine calls from close().
struct MemoryProvider {
  std::function<std::uint64_t(std::size_t bytes)> allocate;
  std::function<void(std::uint64_t address, std::size_t bytes)> release;
};

/// Whether blocks are read with GPUDirect Storage (see the top of this file).
enum class GdsMode {
  kAuto,  ///< use it for every file where it works; the host path elsewhere, with the reason
  kOn,    ///< use it for every file, or throw from the constructor saying why it cannot
  kOff,   ///< never (libcufile is not even loaded)
};

/// "auto", "on", "off"; parse throws std::invalid_argument naming the value.
[[nodiscard]] std::string_view gds_mode_name(GdsMode mode) noexcept;
[[nodiscard]] GdsMode parse_gds_mode(std::string_view name);

struct EngineOptions {
  /// "cpu" or "cuda:N" (also "cuda" for device 0).
  std::string device = "cpu";
  /// Hard cap on bytes of weights held in device memory (resident blocks + streaming slots).
  std::uint64_t device_budget = 0;
  /// Pinned-RAM tier between storage and device (0: none).
  std::uint64_t ram_cache_bytes = 0;
  cache::Policy cache_policy = cache::Policy::kAuto;
  /// Device "cpu": kMmap reads in place (see the top of this file); kAuto reads in place when
  /// ram_cache_bytes is 0 and the source is at most 3/4 of MemAvailable, else as below.
  /// Elsewhere kAuto is io_uring where usable, else pread (both with O_DIRECT).
  io::BackendType backend = io::BackendType::kAuto;
  io::IoOptions io;
  PrefetchStrategy prefetch = PrefetchStrategy::kAdaptive;
  /// Blocks to prefetch ahead; nullopt: chosen from measured I/O vs compute time.
  std::optional<unsigned> prefetch_depth;
  /// Streaming slots in the ring (≥ 2); more allow deeper prefetch at the cost of budget.
  unsigned slots = 2;
  /// Check every block read against the store's checksum. Checking happens in host memory,
  /// so it keeps blocks off the GPUDirect Storage path.
  bool verify_checksums = false;
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
};

/// Where an acquired block lives: a host pointer (device "cpu") or a device address.
struct BlockView {
  std::uint32_t block = 0;
  std::byte* host = nullptr;   ///< device "cpu": the block's bytes
  cuda::DevicePtr device = 0;  ///< device "cuda:N": the block's bytes
  std::uint64_t size = 0;
  bool resident = false;
};

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
  std::uint64_t device_bytes_in_use = 0;   ///< resident buffers + slots allocated
  std::uint64_t device_bytes_peak = 0;
  std::uint64_t device_budget = 0;
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

/// Where one tensor of a block lies in the block's buffer (BlockView::host / device).
struct TensorPlacement {
  std::string name;
  DType dtype{};
  std::vector<std::int64_t> shape;
  std::uint64_t offset = 0;  ///< byte offset in the block's buffer
  std::uint64_t nbytes = 0;
};

/// Blocks given by the caller: block name -> names of its tensors, in the order blocks run.
using TensorGroups = std::vector<std::pair<std::string, std::vector<std::string>>>;

class Engine {
 public:
  /// Opens `store_path`, plans residency under `options.device_budget` (throws
  /// BudgetTooSmall naming the minimum) and allocates the slots (never more than the plan).
  Engine(const std::filesystem::path& store_path, EngineOptions options);
  /// Streams the safetensors checkpoint at `path` (a `.safetensors` file, a Hugging Face
  /// checkpoint directory or an index file; see SafetensorsCheckpoint) in place. Blocks:
  /// `groups` (block name -> tensor names; tensors listed in no group are not streamed), or,
  /// when empty, group_into_blocks over every tensor's name. Throws FormatError / IoError for
  /// a bad checkpoint, std::invalid_argument for bad groups (unknown or repeated tensor,
  /// repeated or empty block), BudgetTooSmall as the constructor does.
  static Engine from_safetensors(const std::filesystem::path& path, EngineOptions options,
                                 const TensorGroups& groups = {});
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;
  /// A moved-from Engine may only be destroyed or assigned to.
  Engine(Engine&&) noexcept;
  Engine& operator=(Engine&&) noexcept;

  /// Makes `block` available and pins it until release(). On a GPU, `stream` (a CUstream;
  /// nullptr = legacy default stream) waits on the device for the block's copy. Blocks the
  /// calling thread only while the block's read has not finished (counted as stall).
  BlockView acquire(std::uint32_t block, cuda::StreamHandle stream = nullptr);
  /// Unpins `block`; on a GPU records on `stream` the event its slot's next fill waits for.
  void release(std::uint32_t block, cuda::StreamHandle stream = nullptr);
  /// Hints that `block` will be needed soon (no effect for resident or present blocks).
  void prefetch(std::uint32_t block);

  /// Cancels pending work, waits for fills in flight, frees every buffer; later calls throw
  /// Error("engine is closed"). Idempotent; the destructor calls it.
  void close();

  [[nodiscard]] std::size_t block_count() const noexcept;
  /// Name of `block` (std::out_of_range if there is no such block).
  [[nodiscard]] const std::string& block_name(std::uint32_t block) const;
  /// The tensors of `block` and where each lies in its buffer (std::out_of_range if there is
  /// no such block). For a store: its tensors at their offset_in_block.
  [[nodiscard]] std::vector<TensorPlacement> tensors(std::uint32_t block) const;
  [[nodiscard]] const ResidencyPlan& plan() const noexcept;
  [[nodiscard]] EngineStats stats() const;
  /// Chrome/Perfetto trace JSON of reads, copies and stalls.
  [[nodiscard]] std::string trace_json() const;

 private:
  class Impl;
  explicit Engine(std::unique_ptr<Impl> impl) noexcept;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tensorstream::engine
