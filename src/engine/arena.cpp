#include "tensorstream/engine/detail/arena.hpp"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace tensorstream::engine::detail {
namespace {

struct Slot {
  const Arena::Entry* entry;
  bool displaceable;
  Arena::Distance distance;
  [[nodiscard]] std::uint64_t end() const { return entry->offset + entry->size; }
};

// How good a window is: displaced units needed as late as possible, then as few bytes
// displaced as possible, then the lowest offset.
struct Score {
  Arena::Distance soonest = Arena::kUnknown;
  std::uint64_t bytes = 0;
  std::uint64_t offset = 0;
  [[nodiscard]] bool better_than(const Score& o) const {
    if (soonest != o.soonest) return soonest > o.soonest;
    if (bytes != o.bytes) return bytes < o.bytes;
    return offset < o.offset;
  }
};

}  // namespace

Arena::Arena(std::uint64_t capacity, std::uint64_t alignment)
    : capacity_(alignment == 0 ? capacity : capacity / alignment * alignment),
      alignment_(alignment == 0 ? 1 : alignment) {
  if ((alignment_ & (alignment_ - 1)) != 0) {
    throw std::invalid_argument("arena alignment " + std::to_string(alignment) +
                                " is not a power of two");
  }
}

std::uint64_t Arena::footprint(std::uint64_t bytes) const noexcept {
  const auto units = bytes / alignment_ + (bytes % alignment_ != 0 ? 1 : 0);
  return std::max<std::uint64_t>(units, 1) * alignment_;
}

std::optional<Arena::Place> Arena::find(std::uint64_t bytes, bool demand, Distance distance,
                                        const Rank& rank, std::uint64_t together) const {
  const auto need = footprint(bytes);
  if (need > capacity_) return std::nullopt;
  const bool edges_only = together > need;
  std::vector<Slot> slots;
  slots.reserve(by_offset_.size());
  for (const auto& [offset, e] : by_offset_) {
    bool movable = false;
    Distance d = 0;
    if (e.state != State::kPinned) {
      d = rank ? rank(e.unit) : kUnknown;
      movable = demand || (e.state == State::kCached && d > distance);
    }
    slots.push_back(Slot{&e, movable, d});
  }

  std::optional<Score> best;
  std::vector<std::uint32_t> best_displaced;
  // Scores the window [start, start + need) of a free run whose displaceable units are
  // slots[first, last).
  const auto consider = [&](std::uint64_t start, std::size_t first, std::size_t last) {
    Score score;
    score.offset = start;
    const auto end = start + need;
    // Units of the run are sorted and disjoint: those overlapping the window are contiguous
    // (found by bisection: an arena caching many experts holds thousands of units).
    const auto begin = slots.begin() + static_cast<std::ptrdiff_t>(first);
    const auto stop = slots.begin() + static_cast<std::ptrdiff_t>(last);
    auto i = static_cast<std::size_t>(
        std::partition_point(begin, stop, [&](const Slot& s) { return s.end() <= start; }) -
        slots.begin());
    std::size_t j = i;
    for (; j < last && slots[j].entry->offset < end; ++j) {
      score.soonest = std::min(score.soonest, slots[j].distance);
      score.bytes += slots[j].entry->size;
    }
    if (best && !score.better_than(*best)) return;
    best = score;
    best_displaced.clear();
    for (std::size_t k = i; k < j; ++k) best_displaced.push_back(slots[k].entry->unit);
  };
  const auto run = [&](std::uint64_t begin, std::uint64_t end, std::size_t first,
                       std::size_t last) {
    if (end < begin || end - begin < need) return;
    consider(begin, first, last);
    consider(end - need, first, last);
    if (edges_only) return;  // more units come beside this one (see the header)
    // Windows that start or end where a unit starts or ends: the only places where what a
    // window displaces changes.
    for (std::size_t k = first; k < last; ++k) {
      for (const auto start : {slots[k].entry->offset, slots[k].end()}) {
        if (start + need <= end) consider(start, first, last);
        if (start >= begin + need) consider(start - need, first, last);
      }
    }
  };
  std::uint64_t begin = 0;
  std::size_t first = 0;
  for (std::size_t k = 0; k < slots.size(); ++k) {
    if (slots[k].displaceable) continue;
    run(begin, slots[k].entry->offset, first, k);
    begin = slots[k].end();
    first = k + 1;
  }
  run(begin, capacity_, first, slots.size());
  if (!best) return std::nullopt;
  return Place{best->offset, std::move(best_displaced)};
}

void Arena::insert(std::uint32_t unit, std::uint64_t offset, std::uint64_t bytes, State state) {
  const auto need = footprint(bytes);
  if (by_unit_.count(unit) != 0) {
    throw std::logic_error("arena: unit " + std::to_string(unit) + " is already placed");
  }
  if (offset % alignment_ != 0 || offset > capacity_ || need > capacity_ - offset) {
    throw std::logic_error("arena: place [" + std::to_string(offset) + ", +" +
                           std::to_string(need) + ") is misaligned or outside the " +
                           std::to_string(capacity_) + "-byte arena");
  }
  auto next = by_offset_.lower_bound(offset);
  if (next != by_offset_.end() && next->first < offset + need) {
    throw std::logic_error("arena: place of unit " + std::to_string(unit) + " overlaps unit " +
                           std::to_string(next->second.unit));
  }
  if (next != by_offset_.begin()) {
    const auto& prev = std::prev(next)->second;
    if (prev.offset + prev.size > offset) {
      throw std::logic_error("arena: place of unit " + std::to_string(unit) + " overlaps unit " +
                             std::to_string(prev.unit));
    }
  }
  by_offset_.emplace(offset, Entry{unit, offset, need, state});
  by_unit_.emplace(unit, offset);
  used_ += need;
}

void Arena::erase(std::uint32_t unit) noexcept {
  const auto it = by_unit_.find(unit);
  if (it == by_unit_.end()) return;
  const auto entry = by_offset_.find(it->second);
  used_ -= entry->second.size;
  by_offset_.erase(entry);
  by_unit_.erase(it);
}

void Arena::set_state(std::uint32_t unit, State state) {
  const auto it = by_unit_.find(unit);
  if (it == by_unit_.end()) {
    throw std::logic_error("arena: unit " + std::to_string(unit) + " is not placed");
  }
  by_offset_.at(it->second).state = state;
}

bool Arena::contains(std::uint32_t unit) const noexcept { return by_unit_.count(unit) != 0; }

const Arena::Entry& Arena::entry(std::uint32_t unit) const {
  const auto it = by_unit_.find(unit);
  if (it == by_unit_.end()) {
    throw std::logic_error("arena: unit " + std::to_string(unit) + " is not placed");
  }
  return by_offset_.at(it->second);
}

std::vector<Arena::Entry> Arena::entries() const {
  std::vector<Arena::Entry> out;
  out.reserve(by_offset_.size());
  for (const auto& [offset, e] : by_offset_) out.push_back(e);
  return out;
}

}  // namespace tensorstream::engine::detail
