// The streaming engine: moves blocks of a store into the memory of the device that computes
// with them, ahead of when they are needed, within hard budgets.
//
// Reading the headers in order follows a block from its file to a parameter's view:
//
//   store file / checkpoint  store.hpp, safetensors.hpp       the bytes on disk
//   source layout            engine/source_layout.hpp         blocks → extents → placements
//   reader                   engine/detail/block_reader.hpp   extents → a block's buffer
//                            (host_reader, in_place_reader, gds_reader; read_paths chooses)
//   place                    engine/residency.hpp             which units stay, how big the arena
//                            engine/detail/arena.hpp          variable-size places in the arena
//                            engine/detail/unit_places.hpp    what each unit holds, where
//                            engine/detail/device_buffers.hpp their memory and events
//   view                     BlockView below, TensorPlacement each tensor's offset in it
// and engine/detail/engine_impl.hpp schedules it all (acquire, release, fill workers).
//
// Units. What the engine loads and releases as one is a unit: a block of the store by default,
// or a caller-given group of tensors (from_store / from_safetensors with groups) — a decoder
// layer, one module's weights, one expert. Engine::block_* and "block" below mean units.
//
// Data path. A unit is read by an I/O backend (io/backend.hpp) into host memory — straight
// into its device memory when the device is the CPU, into a pinned staging buffer or a
// RAM-tier entry otherwise — and, on a GPU, copied to its device memory on the engine's copy
// stream. Units the residency plan (residency.hpp) keeps resident are loaded once and stay;
// the others get places in one arena of the rest of the budget (detail/arena.hpp), as many
// at once as their bytes allow: prefetching runs as far ahead as the arena has room. Below
// the budget that holds two of the largest streamed units the engine still runs, one unit
// at a time, and says so (EngineStats::overlap).
//
// Rows. acquire_rows() reads only some rows (first-dimension slices) of one tensor of a unit
// into a place of the arena — the rows of an embedding that a forward looks up — instead of
// the whole unit: on the CPU with pread through the page cache, on a GPU gathered into pinned
// staging and copied once.
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
// Each file is opened for cuFile through EngineOptions::env (io/env.hpp) with O_DIRECT, like the
// backends' direct descriptors, so an environment that refuses the open sends that file to the
// host path on any file system.
// Blocks that must pass through host memory never use GDS: with a RAM tier
// (ram_cache_bytes > 0) the tier is filled from host reads; with verify_checksums the bytes
// are checked in host memory; with IoOptions::direct off the page cache is wanted, which
// cuFile bypasses. kAuto then uses the host path and says why; kOn refuses these
// combinations (std::invalid_argument).
//
// Compressed stores. A store written with compression (format 1.1, codec.hpp) streams like
// any other: placements and buffers are those of the uncompressed store. Each fill of a unit
// with compressed chunks reads only their stored bytes (for a unit covering part of a block,
// only the chunks covering its tensors) and decodes them on its way into host memory —
// straight into the CPU buffer, the RAM-tier entry or a GPU's pinned staging, chunks in
// parallel on a pool shared by the fill workers (EngineOptions::decode_threads), overlapping
// the unit's next reads, other units' fills and the computation (detail/decode_pipeline.hpp).
// Chunk checksums are always checked; damaged, truncated or undecodable chunks reach the
// waiter as ChecksumError / FormatError naming the file, the block and the chunk. The RAM
// tier holds decoded units, so a hit costs no decoding. Neither reading in place nor
// GPUDirect Storage can decode: such units take the host path, and stats().backend_note,
// gds_reason and decode_note say so. Where decoding on every fill would be slower than
// reading decoded bytes — on the CPU when an uncompressed store would be mapped in place
// from the page cache, elsewhere when the storage measured at start reads faster than the
// decoder decodes — the engine declines to decode on the critical path: it decodes every
// compressed unit once into a temporary, unlinked copy and streams that
// (EngineOptions::compressed_reads, detail/decoded_copy.hpp); decode_note gives the rule and
// the rates, decoded_copy_bytes the copy.
//
// Failures. An I/O error, short read, checksum mismatch (with verify_checksums) or CUDA error
// of a fill is delivered to whoever acquires that block, as an exception naming the file,
// block, offset and cause; the failed block can be acquired again (it is re-read). No wait
// is unbounded: `wait_timeout` bounds every wait, and close() cancels pending work.
//
// Debugging. With EngineOptions::check_invariants, every acquire(), release() and prefetch()
// (returning or throwing) is followed by a check of the engine's invariants
// (engine/detail/invariants.hpp: device bytes within the budget, pins never negative, each
// place holding the block it is recorded for, resident blocks in their own places, counters
// consistent); a broken one throws Error naming the call, the block and the invariant.
//
// Sources. An engine streams either a TensorStream store (Engine(store_path, options)) or a
// Hugging Face safetensors checkpoint read in place, without conversion
// (Engine::from_safetensors): a `.safetensors` file, a checkpoint directory (shards + index)
// or an index file. Inside the engine both are a source layout (source_layout.hpp): a list of
// files and a list of blocks, each block a list of extents {file, file offset, length, offset
// in the block's buffer}, with each extent's aligned read region at a 4096-aligned offset of
// the buffer so a tensor keeps in memory the alignment it has in its file; tensors() says
// where each tensor of a block lies in its buffer, whatever the source. verify_checksums: a
// safetensors file stores no checksum; the engine then takes the XXH3-64 of each extent on its
// first read and checks later reads against it (it catches a file changed or corrupted
// between reads, not a bad first read).
//
// Thread-safety: every public member is thread-safe. Several threads may hold different (or
// the same) blocks at once, up to the number of slots for streamed blocks. acquire() may block
// (bounded by wait_timeout), close() waits for the fills in flight; nothing else blocks on
// I/O (engine/detail/engine_impl.hpp lists each call).
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "tensorstream/engine/options.hpp"
#include "tensorstream/engine/residency.hpp"
#include "tensorstream/engine/source_layout.hpp"
#include "tensorstream/engine/stats.hpp"
#include "tensorstream/shim/cuda.hpp"

namespace tensorstream::engine {

/// Where an acquired block lives: a host pointer (device "cpu") or a device address.
struct BlockView {
  std::uint32_t block = 0;
  std::byte* host = nullptr;   ///< device "cpu": the block's bytes
  cuda::DevicePtr device = 0;  ///< device "cuda:N": the block's bytes
  std::uint64_t size = 0;
  bool resident = false;
};

/// Rows of one tensor gathered by acquire_rows(): `rows` rows of `row_bytes`, one after the
/// other, at a host pointer (device "cpu") or a device address, 256-byte aligned.
struct RowsView {
  std::uint64_t handle = 0;  ///< for release_rows()
  std::byte* host = nullptr;
  cuda::DevicePtr device = 0;
  std::uint64_t rows = 0;
  std::uint64_t row_bytes = 0;
};

class Engine {
 public:
  /// Opens `store_path`, plans residency under `options.device_budget` (throws
  /// BudgetTooSmall naming the minimum) and allocates its memory (never more than the plan).
  Engine(const std::filesystem::path& store_path, EngineOptions options);
  /// The same with units of the caller's `groups` (unit name -> tensor names, any of the
  /// store's; tensors in no group are not streamed), or the store's blocks when empty.
  /// Throws std::invalid_argument for bad groups, as from_safetensors.
  static Engine from_store(const std::filesystem::path& store_path, EngineOptions options,
                           const TensorGroups& groups = {});
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

  /// Reads rows `rows` (first-dimension indices, each in range) of tensor `tensor` of
  /// `block` into a place of the arena and pins it until release_rows(); on a GPU `stream`
  /// waits for the copy. A resident block's rows are read the same way (the caller may use
  /// its whole view instead). At most max_rows() rows at once (std::invalid_argument beyond,
  /// and for a row out of range or a tensor without rows). Blocks until the rows are read.
  RowsView acquire_rows(std::uint32_t block, std::uint32_t tensor,
                        std::span<const std::int64_t> rows, cuda::StreamHandle stream = nullptr);
  /// Unpins rows acquired with acquire_rows(); on a GPU records on `stream` what the place's
  /// next user waits for. std::logic_error for an unknown handle.
  void release_rows(std::uint64_t handle, cuda::StreamHandle stream = nullptr);
  /// Rows of that tensor that fit the arena at once (0 when nothing streams: the arena is
  /// empty).
  [[nodiscard]] std::uint64_t max_rows(std::uint32_t block, std::uint32_t tensor) const;

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
