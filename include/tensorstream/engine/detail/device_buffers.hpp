// The engine's device buffers: the memory a unit lives in on the device that computes with
// it — one buffer per resident unit, and one arena that streamed units get places in
// (arena.hpp), each place a view of the arena's memory — and, on a GPU, the events that
// order its use without host synchronisation:
//
//   ready   recorded on the copy stream after a fill's copy (or GDS read) into the buffer;
//           every acquire() makes its consumer's stream wait on it
//   done    recorded on each consumer's stream by its release() (one event per release since
//           the last fill: several threads on several streams may hold a unit); the buffer's
//           next fill waits for all of them before writing
//   fences  events a place inherits from the units it displaced (their ready and done
//           events) and the arena's handover event (torch's stream when it handed the memory
//           over: kernels still queued there may read memory it recycled): the place's first
//           fill waits for them too, so no write overtakes a read of the same bytes
//
// A place also inherits the RAM-tier entries that displaced units' copies were still reading
// from, and lets them go once those copies are over (finish_previous_copy).
//
// Memory comes from the engine (cuMemAlloc on a GPU; an AlignedBuffer on the CPU, faulted in
// at once for the arena) or from the caller's MemoryProvider (EngineOptions::device_memory),
// and goes back when the owning buffer is destroyed. Views own nothing. A buffer of a CPU
// engine that reads in place has no memory at all: its unit's window is its memory
// (in_place_reader.hpp); its bytes still count against the budget.
//
// Thread-safety: a BlockBuffer is used by one fill at a time (the engine hands a buffer to
// one fill and no consumer holds it meanwhile) and by the consumers holding its unit;
// record_done() runs under the engine's mutex. Construction and destruction are not
// concurrent with use.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "tensorstream/cache/block_cache.hpp"
#include "tensorstream/engine/options.hpp"
#include "tensorstream/engine/residency.hpp"
#include "tensorstream/engine/source_layout.hpp"
#include "tensorstream/host_memory.hpp"
#include "tensorstream/shim/cuda.hpp"
#include "tensorstream/shim/cufile.hpp"

namespace tensorstream::engine::detail {

/// Device addresses from a MemoryProvider must be aligned to this (cuMemAlloc's guarantee,
/// which torch's allocator keeps).
inline constexpr std::uint64_t kDeviceAddressAlignment = 256;

using SharedEvent = std::shared_ptr<const cuda::Event>;

class BlockBuffer {
 public:
  /// A buffer without memory (reading in place) of `bytes` counted bytes.
  explicit BlockBuffer(std::uint64_t bytes = 0, bool resident = false) noexcept
      : size_(bytes), resident_(resident) {}
  BlockBuffer(BlockBuffer&&) noexcept = default;
  BlockBuffer& operator=(BlockBuffer&&) = delete;
  BlockBuffer(const BlockBuffer&) = delete;
  BlockBuffer& operator=(const BlockBuffer&) = delete;
  ~BlockBuffer() = default;

  /// Allocates `bytes` for `device` (nullptr: the CPU), from `provider` when set. A CPU slot
  /// (`resident` false) is faulted in now, so the first fill does not pay for it. Throws
  /// Error for a provider returning null, std::invalid_argument for a misaligned device
  /// address, CudaError / Error when memory or events cannot be had.
  [[nodiscard]] static BlockBuffer allocate(const cuda::Device* device,
                                            const std::optional<MemoryProvider>& provider,
                                            std::uint64_t bytes, bool resident);
  /// `bytes` of `parent`'s memory at `offset` (a place in the arena): owns nothing, has events
  /// of its own (a GPU). Without memory in `parent`, a buffer without memory.
  [[nodiscard]] static BlockBuffer view(const BlockBuffer& parent, std::uint64_t offset,
                                        std::uint64_t bytes);
  /// Takes over what `displaced` (a view whose bytes this one now covers) leaves: its events
  /// become fences of this buffer's next fill, its copy source is kept until that fill.
  void inherit(BlockBuffer&& displaced);
  /// Adds `event` to the fences of the next fill (the arena's handover).
  void add_fence(SharedEvent event);

  /// Bytes of the buffer (counted against the budget whether or not it has memory).
  [[nodiscard]] std::uint64_t size() const noexcept { return size_; }
  /// A resident block's buffer (filled once, kept for the engine's life), not a slot.
  [[nodiscard]] bool resident() const noexcept { return resident_; }
  /// Device "cpu": the buffer's bytes (nullptr without memory or on a GPU).
  [[nodiscard]] std::byte* host() const noexcept { return host_.data(); }
  [[nodiscard]] std::span<std::byte> host_span() const noexcept { return host_.span(); }
  /// A GPU: the buffer's device address (0 on the CPU).
  [[nodiscard]] cuda::DevicePtr device_ptr() const noexcept { return dev_ptr_; }

  // ---- ordering (no-ops on the CPU) --------------------------------------------------------

  /// Makes `stream` wait on the device for the last fill into this buffer (acquire).
  void make_wait_for_ready(cuda::StreamHandle stream) const;
  /// Records "done" on `stream` (release); false on the CPU, where there is nothing to record.
  bool record_done(cuda::StreamHandle stream);
  /// Waits on the host for every consumer's release since the last fill, the fences and the
  /// last copy into this buffer: a write from the host side (cuFile) may start after this.
  void wait_until_unused();
  /// Makes `copy_stream` wait for every release since the last fill and the fences (a write
  /// queued there afterwards is ordered after them); they are then forgotten.
  void order_after_uses(cuda::StreamHandle copy_stream);
  /// Records "ready" on `copy_stream` after the work queued there so far.
  void record_ready(cuda::StreamHandle copy_stream);
  /// Waits on the host until the last copy into this buffer ("ready") has finished; a no-op
  /// on the CPU, where copy_from_host is synchronous.
  void wait_for_copy() const;

  /// Puts the block read at host memory `source` into the buffer: `bytes` as they are, or,
  /// with `copies` (a repacked block, source_layout.hpp), each range moved to its place. A
  /// GPU: on `copy_stream`, after order_after_uses, asynchronously (`source` must stay valid
  /// until "ready", see keep_copy_source), then records "ready". The CPU: memcpy, or memmove
  /// inside the buffer when `source` is its own memory (the moves go down, in order).
  void copy_from_host(const std::byte* source, std::size_t bytes, std::span<const CopyRange> copies,
                      cuda::StreamHandle copy_stream);

  /// Keeps a RAM-tier entry that a copy into this buffer still reads from, until the next
  /// fill of the buffer (finish_previous_copy) or release_copy_source(). For slots only: a
  /// resident buffer has no next fill, so its source would stay pinned (use wait_for_copy).
  void keep_copy_source(std::optional<cache::BlockHandle> source) noexcept {
    copy_source_ = std::move(source);
  }
  /// If a copy source is kept: waits on the host until the copy is over and lets it go.
  void finish_previous_copy();
  void release_copy_source() noexcept {
    copy_source_.reset();
    inherited_sources_.clear();
  }

  /// Registers the buffer with cuFile (cuFileBufRegister) for DMA straight into it. Optional
  /// for reads; throws CudaError where registration fails (out of BAR1 space, unsupported).
  void register_with_cufile();

 private:
  std::uint64_t size_ = 0;
  bool resident_ = false;
  const cuda::Device* device_ = nullptr;
  AlignedBuffer host_;                     // the CPU: the bytes (owned or provided)
  cuda::DevicePtr dev_ptr_ = 0;            // a GPU: the bytes
  std::optional<cuda::DeviceBuffer> dev_;  // a GPU: owned memory (unset if provided)
  std::shared_ptr<void> provided_;         // a GPU: gives provided memory back when reset
  std::shared_ptr<cuda::Event> ready_;
  bool ready_recorded_ = false;
  std::vector<std::shared_ptr<cuda::Event>> done_;  // done_[0, done_count_) are recorded
  std::size_t done_count_ = 0;
  std::vector<SharedEvent> fences_;
  std::optional<cache::BlockHandle> copy_source_;
  std::vector<cache::BlockHandle> inherited_sources_;
  // Declared after the memory, so the registration goes first.
  std::optional<cuda::CuFileBufferRegistration> cufile_registration_;
};

/// Bytes of the buffer for a resident unit of `size` bytes (at least one kSlotAlignment).
[[nodiscard]] std::uint64_t resident_buffer_bytes(std::uint64_t size) noexcept;

}  // namespace tensorstream::engine::detail
