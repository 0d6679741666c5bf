// Where units live in device memory: resident units in buffers of their own, streamed units
// in places of the arena (arena.hpp), each place a view of the arena's memory; and what each
// unit holds.
//
// Every unit has its scheduling state:
//
//   kAbsent ──fill scheduled──► kFilling ──fill done──► kReady
//                                   │                     (acquire / release pin and unpin it)
//                                   └──fill failed──► kFailed ──next acquire──► forgotten, kAbsent
//
// A resident unit always has its buffer; a streamed unit gets a place by take() — displacing
// the units the arena chose — and keeps it until it is displaced in turn or forgotten. A
// unit's `generation` changes whenever it is given a place or forgotten, so a fill that
// finishes for a unit that was displaced meanwhile is recognised and ignored.
//
// What the arena may displace follows each unit's state (arena_state()): pinned while held or
// filling, "prefetched" while filled ahead and not acquired, cached otherwise. Memory is
// reused safely: a place inherits the events and copy sources of whatever it covers
// (BlockBuffer::inherit) — displaced units, and the leftovers of forgotten ones — so its
// first fill waits for every earlier use of those bytes.
//
// Rows (Engine::acquire_rows) are transient places with ids of their own (kRowsBase and up),
// cached once released (the first to be displaced: nothing asks for them again).
//
// Thread-safety: none; the engine's mutex guards every call. A unit's memory is used by the
// fill that owns it without that lock (see BlockBuffer); places never move while filled.
#pragma once

#include <cstddef>
#include <cstdint>
#include <list>
#include <map>
#include <optional>
#include <vector>

#include "tensorstream/engine/detail/arena.hpp"
#include "tensorstream/engine/detail/device_buffers.hpp"
#include "tensorstream/engine/detail/fill_error.hpp"
#include "tensorstream/engine/residency.hpp"

namespace tensorstream::engine::detail {

enum class UnitState { kAbsent, kFilling, kReady, kFailed };

/// One unit's state and memory.
struct Unit {
  UnitState state = UnitState::kAbsent;
  std::optional<FillError> error;  ///< kFailed: why
  int pins = 0;                    ///< acquires not yet released
  bool resident = false;
  bool prefetched_unused = false;  ///< filled by a prefetch, not acquired since
  bool demanded = false;           ///< its fill was asked for by an acquire
  std::uint64_t generation = 0;    ///< changes whenever it is placed or forgotten
  std::int64_t last_release_ns = 0;
  /// Resident: its buffer (always). Streamed: its place while it has one.
  std::optional<BlockBuffer> memory;
};

/// Ids of rows places in the arena (below: units).
inline constexpr std::uint32_t kRowsBase = 0x80000000u;

class UnitPlaces {
 public:
  /// Places for units under `plan`: resident buffers of `bytes[u]` for the resident ones, an
  /// arena of plan.arena_bytes for the rest (`bytes[u]` each, `needs[u]` held together; see
  /// residency.hpp). Memory as BlockBuffer::allocate gives it (none when `with_memory` is
  /// false: reading in place). On a GPU, `memory_stream` is where the memory's previous user
  /// (torch's allocator) queued its work: an event recorded there fences every first fill.
  /// Throws std::invalid_argument for a provider without both functions, then what
  /// BlockBuffer::allocate throws.
  UnitPlaces(const ResidencyPlan& plan, std::vector<std::uint64_t> bytes,
             std::vector<std::uint64_t> needs, const cuda::Device* device,
             const std::optional<MemoryProvider>& provider, bool with_memory,
             cuda::StreamHandle memory_stream);

  [[nodiscard]] std::size_t size() const noexcept { return units_.size(); }
  [[nodiscard]] Unit& operator[](std::uint32_t unit) noexcept { return units_[unit]; }
  [[nodiscard]] const Unit& operator[](std::uint32_t unit) const noexcept { return units_[unit]; }
  [[nodiscard]] bool is_resident(std::uint32_t unit) const noexcept {
    return units_[unit].resident;
  }
  /// Bytes `unit` occupies in device memory.
  [[nodiscard]] std::uint64_t bytes(std::uint32_t unit) const noexcept { return bytes_[unit]; }
  [[nodiscard]] const Arena& arena() const noexcept { return arena_; }
  /// The arena's memory (for registration with cuFile).
  [[nodiscard]] BlockBuffer& arena_memory() noexcept { return *arena_memory_; }
  /// Device memory of every buffer: the resident ones plus the arena.
  [[nodiscard]] std::uint64_t device_bytes() const noexcept {
    return resident_bytes_ + arena_.capacity();
  }

  /// How the arena may treat `unit` now, from its state (see the top of this file).
  [[nodiscard]] static Arena::State arena_state(const Unit& unit) noexcept;
  /// Tells the arena the state of streamed `unit` after a change.
  void sync(std::uint32_t unit);

  /// Where streamed `unit` could go now (Arena::find with its bytes and need).
  [[nodiscard]] std::optional<Arena::Place> find(std::uint32_t unit, bool demand,
                                                 Arena::Distance distance,
                                                 const Arena::Rank& rank) const;

  /// What take() did to a unit it displaced.
  struct Displaced {
    std::uint32_t unit = 0;
    bool prefetch_wasted = false;  ///< it held a prefetch that was never used
  };
  /// Gives streamed `unit` (kAbsent) the place `where` (from find()): the units there leave
  /// (kAbsent, a new generation; rows places are gone), and the new place inherits what they
  /// leave. `unit` then has a new generation and its memory; its state is the caller's to set.
  /// Returns the displaced units (rows excluded): the caller drops them from their readers.
  std::vector<Displaced> take(std::uint32_t unit, const Arena::Place& where);
  /// `unit` loses its contents (a failed fill, a cancelled prefetch): kAbsent, a new
  /// generation; a streamed unit leaves the arena, its place's leftovers kept for the next
  /// user of those bytes.
  void forget(std::uint32_t unit);

  /// Where a rows place of `bytes` could go now (a demand).
  [[nodiscard]] std::optional<Arena::Place> find_rows(std::uint64_t bytes,
                                                      const Arena::Rank& rank) const;
  /// A rows place `id` of `bytes` at `where`, pinned (rows(id) is its memory). Returns the
  /// units displaced, as take() does.
  std::vector<Displaced> take_rows(std::uint32_t id, std::uint64_t bytes,
                                   const Arena::Place& where);
  [[nodiscard]] BlockBuffer* rows(std::uint32_t id) noexcept;
  /// A rows place is released: cached, the first to be displaced.
  void release_rows(std::uint32_t id);
  /// A rows place whose read failed: gone, its leftovers kept.
  void forget_rows(std::uint32_t id);

  /// Lets go of every copy source kept (close(), after the copy stream is idle).
  void release_copy_sources() noexcept;

 private:
  BlockBuffer make_view(std::uint64_t offset, std::uint64_t bytes);
  std::vector<Displaced> evict(const std::vector<std::uint32_t>& ids,
                               std::vector<BlockBuffer>& left);
  void leave(std::uint32_t id, std::uint64_t offset, std::uint64_t size,
             std::optional<BlockBuffer> memory);

  std::vector<Unit> units_;
  std::vector<std::uint64_t> bytes_;
  std::vector<std::uint64_t> needs_;
  std::uint64_t resident_bytes_ = 0;
  Arena arena_;
  std::optional<BlockBuffer> arena_memory_;  // set in the constructor
  SharedEvent handover_;
  std::map<std::uint32_t, BlockBuffer> rows_;
  // Leftovers (events, copy sources) of places that were forgotten, by [offset, offset+size).
  struct Orphan {
    std::uint64_t offset;
    std::uint64_t size;
    BlockBuffer memory;
  };
  std::list<Orphan> orphans_;
};

}  // namespace tensorstream::engine::detail
