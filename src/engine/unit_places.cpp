#include "tensorstream/engine/detail/unit_places.hpp"

#include <stdexcept>
#include <utility>

#include "tensorstream/errors.hpp"

namespace tensorstream::engine::detail {

UnitPlaces::UnitPlaces(const ResidencyPlan& plan, std::vector<std::uint64_t> bytes,
                       std::vector<std::uint64_t> needs, const cuda::Device* device,
                       const std::optional<MemoryProvider>& provider, bool with_memory,
                       cuda::StreamHandle memory_stream)
    : units_(bytes.size()),
      bytes_(std::move(bytes)),
      needs_(std::move(needs)),
      arena_(plan.arena_bytes, kSlotAlignment) {
  TS_EXPECT(!provider || (provider->allocate && provider->release), std::invalid_argument,
            "device_memory needs both allocate and release");
  const auto make = [&](std::uint64_t size, bool resident) {
    return with_memory ? BlockBuffer::allocate(device, provider, size, resident)
                       : BlockBuffer(size, resident);
  };
  for (std::size_t u = 0; u < units_.size(); ++u) {
    if (!plan.resident[u]) continue;
    units_[u].resident = true;
    const auto size = resident_buffer_bytes(bytes_[u]);
    units_[u].memory.emplace(make(size, true));
    resident_bytes_ += size;
  }
  arena_memory_.emplace(arena_.capacity() > 0 ? make(arena_.capacity(), false) : BlockBuffer(0));
  if (device != nullptr && with_memory) {
    // Whatever the memory's previous owner queued on its stream runs before this event: the
    // first write into any of it waits for it.
    auto handover = std::make_shared<cuda::Event>(*device, cuda::EventKind::kHostWait);
    handover->record(memory_stream);
    handover_ = std::move(handover);
    for (auto& u : units_) {
      if (u.memory) u.memory->add_fence(handover_);
    }
  }
}

Arena::State UnitPlaces::arena_state(const Unit& unit) noexcept {
  if (unit.state == UnitState::kFilling || unit.pins > 0) return Arena::State::kPinned;
  if (unit.state == UnitState::kReady && unit.prefetched_unused) return Arena::State::kPrefetched;
  return Arena::State::kCached;
}

void UnitPlaces::sync(std::uint32_t unit) {
  if (!units_[unit].resident && arena_.contains(unit)) {
    arena_.set_state(unit, arena_state(units_[unit]));
  }
}

std::optional<Arena::Place> UnitPlaces::find(std::uint32_t unit, bool demand,
                                             Arena::Distance distance,
                                             const Arena::Rank& rank) const {
  return arena_.find(bytes_[unit], demand, distance, rank, needs_[unit]);
}

BlockBuffer UnitPlaces::make_view(std::uint64_t offset, std::uint64_t bytes) {
  auto view = BlockBuffer::view(*arena_memory_, offset, arena_.footprint(bytes));
  view.add_fence(handover_);
  // Leftovers of forgotten places under the new one.
  for (auto it = orphans_.begin(); it != orphans_.end();) {
    const bool overlaps =
        it->offset < offset + arena_.footprint(bytes) && offset < it->offset + it->size;
    if (overlaps) {
      view.inherit(std::move(it->memory));
      it = orphans_.erase(it);
    } else {
      ++it;
    }
  }
  return view;
}

void UnitPlaces::leave(std::uint32_t id, std::uint64_t offset, std::uint64_t size,
                       std::optional<BlockBuffer> memory) {
  arena_.erase(id);
  if (memory) orphans_.push_back(Orphan{offset, size, std::move(*memory)});
}

std::vector<UnitPlaces::Displaced> UnitPlaces::evict(const std::vector<std::uint32_t>& ids,
                                                     std::vector<BlockBuffer>& left) {
  std::vector<Displaced> out;
  for (const auto id : ids) {
    arena_.erase(id);
    if (id >= kRowsBase) {
      const auto it = rows_.find(id);
      if (it != rows_.end()) {
        left.push_back(std::move(it->second));
        rows_.erase(it);
      }
      continue;
    }
    auto& d = units_[id];
    out.push_back(Displaced{id, d.prefetched_unused});
    if (d.memory) left.push_back(std::move(*d.memory));
    d.memory.reset();
    d.state = UnitState::kAbsent;
    d.error.reset();
    d.prefetched_unused = false;
    d.demanded = false;
    ++d.generation;
  }
  return out;
}

std::vector<UnitPlaces::Displaced> UnitPlaces::take(std::uint32_t unit, const Arena::Place& where) {
  TS_EXPECT(!units_[unit].resident && !arena_.contains(unit), std::logic_error, "unit ", unit,
            " cannot take a place");
  std::vector<BlockBuffer> left;
  auto out = evict(where.displaced, left);
  auto& u = units_[unit];
  u.memory.emplace(make_view(where.offset, bytes_[unit]));
  for (auto& l : left) u.memory->inherit(std::move(l));
  arena_.insert(unit, where.offset, bytes_[unit], Arena::State::kPinned);
  u.state = UnitState::kAbsent;
  u.error.reset();
  u.prefetched_unused = false;
  u.demanded = false;
  ++u.generation;
  return out;
}

void UnitPlaces::forget(std::uint32_t unit) {
  auto& u = units_[unit];
  u.state = UnitState::kAbsent;
  u.error.reset();
  u.prefetched_unused = false;
  u.demanded = false;
  ++u.generation;
  if (u.resident || !arena_.contains(unit)) return;
  const auto entry = arena_.entry(unit);
  leave(unit, entry.offset, entry.size, std::move(u.memory));
  u.memory.reset();
}

std::optional<Arena::Place> UnitPlaces::find_rows(std::uint64_t bytes,
                                                  const Arena::Rank& rank) const {
  return arena_.find(bytes, /*demand=*/true, 0, rank);
}

std::vector<UnitPlaces::Displaced> UnitPlaces::take_rows(std::uint32_t id, std::uint64_t bytes,
                                                         const Arena::Place& where) {
  std::vector<BlockBuffer> left;
  auto out = evict(where.displaced, left);
  auto view = make_view(where.offset, bytes);
  for (auto& l : left) view.inherit(std::move(l));
  arena_.insert(id, where.offset, bytes, Arena::State::kPinned);
  rows_.emplace(id, std::move(view));
  return out;
}

BlockBuffer* UnitPlaces::rows(std::uint32_t id) noexcept {
  const auto it = rows_.find(id);
  return it == rows_.end() ? nullptr : &it->second;
}

void UnitPlaces::release_rows(std::uint32_t id) {
  if (arena_.contains(id)) arena_.set_state(id, Arena::State::kCached);
}

void UnitPlaces::forget_rows(std::uint32_t id) {
  const auto it = rows_.find(id);
  if (it == rows_.end()) return;
  const auto entry = arena_.entry(id);
  leave(id, entry.offset, entry.size, std::move(it->second));
  rows_.erase(it);
}

void UnitPlaces::release_copy_sources() noexcept {
  for (auto& u : units_) {
    if (u.memory) u.memory->release_copy_source();
  }
  for (auto& [id, r] : rows_) r.release_copy_source();
  for (auto& o : orphans_) o.memory.release_copy_source();
}

}  // namespace tensorstream::engine::detail
