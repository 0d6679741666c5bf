// The engine's device buffers: the memory a block lives in on the device that computes with
// it — one buffer per resident block and one per streaming slot — and, on a GPU, the two
// events that order its use without host synchronisation:
//
//   ready  recorded on the copy stream after a fill's copy (or GDS read) into the buffer;
//          acquire() makes the consumer's stream wait on it
//   done   recorded on the consumer's stream by release(); the buffer's next fill waits on
//          it (on the copy stream, or on the host for a GDS read) before writing
//
// Memory comes from the engine (cuMemAlloc on a GPU; an AlignedBuffer on the CPU, faulted in
// at once for slots) or from the caller's MemoryProvider (EngineOptions::device_memory), and
// goes back when the buffer is destroyed. A buffer of a CPU engine that reads in place has no
// memory at all: its block's window is its memory (in_place_reader.hpp); its bytes still count
// against the budget.
//
// Thread-safety: a BlockBuffer is used by one fill at a time (the slot ring hands a buffer to
// one fill and waits for it to end) and by the consumers holding its block; the event calls
// are safe from any thread (CUDA events are). Construction and destruction are not concurrent
// with use.
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
#include "tensorstream/host_memory.hpp"
#include "tensorstream/shim/cuda.hpp"
#include "tensorstream/shim/cufile.hpp"

namespace tensorstream::engine::detail {

/// Device addresses from a MemoryProvider must be aligned to this (cuMemAlloc's guarantee,
/// which torch's allocator keeps).
inline constexpr std::uint64_t kDeviceAddressAlignment = 256;

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
  bool record_done(cuda::StreamHandle stream) const;
  /// Waits on the host for the consumer's release (when `wait_for_release`: done was
  /// recorded) and for the last copy into this buffer: a write from the host side (cuFile)
  /// may start after this.
  void wait_until_unused(bool wait_for_release) const;
  /// Records "ready" on `copy_stream` after the work queued there so far.
  void record_ready(cuda::StreamHandle copy_stream) const;
  /// Waits on the host until the last copy into this buffer ("ready") has finished; a no-op
  /// on the CPU, where copy_from_host is synchronous.
  void wait_for_copy() const;

  /// Puts `bytes` of host memory at `source` into the buffer. A GPU: on `copy_stream`, after
  /// the consumer's release when `wait_for_release`, asynchronously (`source` must stay
  /// valid until "ready", see keep_copy_source), then records "ready". The CPU: a memcpy,
  /// unless `source` is already the buffer's memory.
  void copy_from_host(const std::byte* source, std::size_t bytes, cuda::StreamHandle copy_stream,
                      bool wait_for_release);

  /// Keeps a RAM-tier entry that a copy into this buffer still reads from, until the next
  /// fill of the buffer (finish_previous_copy) or release_copy_source(). For slots only: a
  /// resident buffer has no next fill, so its source would stay pinned (use wait_for_copy).
  void keep_copy_source(std::optional<cache::BlockHandle> source) noexcept {
    copy_source_ = std::move(source);
  }
  /// If a copy source is kept: waits on the host until the copy is over and lets it go.
  void finish_previous_copy();
  void release_copy_source() noexcept { copy_source_.reset(); }

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
  std::optional<cuda::Event> ready_;
  std::optional<cuda::Event> done_;
  std::optional<cache::BlockHandle> copy_source_;
  // Declared after the memory, so the registration goes first.
  std::optional<cuda::CuFileBufferRegistration> cufile_registration_;
};

/// The engine's buffers for `plan`: one per resident block, in block order, then plan.slots
/// slots of plan.slot_size bytes; `sizes` are the blocks' sizes in memory. Without
/// `with_memory` (reading in place) the buffers have none. Throws std::invalid_argument for a
/// provider without both functions, then what BlockBuffer::allocate throws.
[[nodiscard]] std::vector<BlockBuffer> allocate_block_buffers(
    const ResidencyPlan& plan, const std::vector<std::uint64_t>& sizes, const cuda::Device* device,
    const std::optional<MemoryProvider>& provider, bool with_memory);

/// Bytes of the buffer for a resident block of `size` bytes (at least one kSlotAlignment).
[[nodiscard]] std::uint64_t resident_buffer_bytes(std::uint64_t size) noexcept;

}  // namespace tensorstream::engine::detail
