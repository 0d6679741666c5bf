// Where blocks live in device memory: the places (resident buffers and the ring of streaming
// slots), what each holds, and which one a block that is not present may take.
//
// Every place has its memory (device_buffers.hpp) and its scheduling state:
//
//   kEmpty ──fill scheduled──► kFilling ──fill done──► kReady
//                                  │                     (acquire / release pin and unpin it)
//                                  └──fill failed──► kFailed ──next acquire──► forgotten, kEmpty
//
// A resident block always has its own place; a streamed block is given a slot by pick_slot()
// and keeps it until another block takes the slot. A place's `generation` changes on every
// assignment, so a fill that finishes for a place given to another block meanwhile is
// recognised and ignored.
//
// Today this is a fixed ring of equal slots, sized by the residency plan. It is the one piece
// that knows that: a device memory manager with variable-size places in one arena can replace
// it behind the same calls (find, resident_place, pick_slot, assign, forget).
//
// Thread-safety: none; the engine's mutex guards the ring and every place's state. A place's
// memory is used by the fill that owns it without that lock (see BlockBuffer).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "tensorstream/engine/detail/device_buffers.hpp"
#include "tensorstream/engine/detail/fill_error.hpp"
#include "tensorstream/engine/residency.hpp"

namespace tensorstream::engine::detail {

enum class SlotState { kEmpty, kFilling, kReady, kFailed };

/// One place: a resident block's buffer or a streaming slot.
struct Slot {
  explicit Slot(BlockBuffer buffer, bool is_resident) noexcept
      : memory(std::move(buffer)), resident(is_resident) {}

  BlockBuffer memory;
  std::int64_t block = -1;  ///< the block it holds (or is being filled with); -1: none
  SlotState state = SlotState::kEmpty;
  std::optional<FillError> error;  ///< kFailed: why
  int pins = 0;                    ///< acquires not yet released
  bool resident = false;
  bool prefetched_unused = false;  ///< filled by a prefetch, not acquired since
  bool demanded = false;           ///< its fill was asked for by an acquire
  bool done_recorded = false;      ///< a release recorded "done": the next fill waits for it
  std::uint64_t generation = 0;    ///< changes on every assign()
  std::int64_t last_release_ns = 0;
};

class SlotRing {
 public:
  /// `buffers` as allocate_block_buffers(plan, ...) returns them: the resident blocks' (in
  /// block order), then the slots.
  SlotRing(const ResidencyPlan& plan, std::vector<BlockBuffer> buffers);

  [[nodiscard]] std::size_t size() const noexcept { return places_.size(); }
  [[nodiscard]] Slot& operator[](std::size_t place) noexcept { return places_[place]; }
  [[nodiscard]] const Slot& operator[](std::size_t place) const noexcept { return places_[place]; }

  /// The place holding `block` (ready, filling or failed), if any.
  [[nodiscard]] std::optional<std::size_t> find(std::uint32_t block) const noexcept;
  /// The place reserved for `block` if it is resident.
  [[nodiscard]] std::optional<std::size_t> resident_place(std::uint32_t block) const noexcept;
  [[nodiscard]] bool is_resident(std::uint32_t block) const noexcept {
    return resident_place_[block] >= 0;
  }

  /// A slot that may take a new block: empty (or failed) first, then one holding a block
  /// that is neither held, nor being filled, nor — unless `for_demand` — prefetched and
  /// still unused; least recently released first within a rank. None if every slot is busy.
  [[nodiscard]] std::optional<std::size_t> pick_slot(bool for_demand) const;

  /// What assign() took away from the place.
  struct Previous {
    bool prefetch_wasted = false;            ///< it held a prefetch that was never used
    std::optional<std::uint32_t> displaced;  ///< a streamed block that leaves device memory
  };
  /// Gives `place` to `block` (state kEmpty, a new generation). The caller drops the
  /// displaced block's bytes (its reader knows how).
  Previous assign(std::size_t place, std::uint32_t block);
  /// `block`, held by `place` in kFailed, is forgotten: the place is empty and the block is
  /// read again by its next acquire.
  void forget(std::size_t place, std::uint32_t block);

  /// Streaming slot indices (for registration with cuFile).
  [[nodiscard]] const std::vector<std::size_t>& slots() const noexcept { return slots_; }
  /// Memory of every place, in use now.
  [[nodiscard]] std::uint64_t bytes() const noexcept;

 private:
  std::vector<Slot> places_;                  // resident buffers, then slots
  std::vector<std::int64_t> place_of_block_;  // -1: not in device memory
  std::vector<std::int64_t> resident_place_;  // per block: its resident place or -1
  std::vector<std::size_t> slots_;            // indices of slot places
};

}  // namespace tensorstream::engine::detail
