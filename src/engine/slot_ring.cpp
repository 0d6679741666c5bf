#include "tensorstream/engine/detail/slot_ring.hpp"

#include <utility>

namespace tensorstream::engine::detail {

SlotRing::SlotRing(const ResidencyPlan& plan, std::vector<BlockBuffer> buffers)
    : place_of_block_(plan.resident.size(), -1), resident_place_(plan.resident.size(), -1) {
  places_.reserve(buffers.size());
  std::size_t next = 0;
  for (std::size_t b = 0; b < plan.resident.size(); ++b) {
    if (!plan.resident[b]) continue;
    resident_place_[b] = static_cast<std::int64_t>(places_.size());
    places_.emplace_back(std::move(buffers[next++]), true);
  }
  while (next < buffers.size()) {
    slots_.push_back(places_.size());
    places_.emplace_back(std::move(buffers[next++]), false);
  }
}

std::optional<std::size_t> SlotRing::find(std::uint32_t block) const noexcept {
  const auto place = place_of_block_[block];
  if (place < 0) return std::nullopt;
  return static_cast<std::size_t>(place);
}

std::optional<std::size_t> SlotRing::resident_place(std::uint32_t block) const noexcept {
  const auto place = resident_place_[block];
  if (place < 0) return std::nullopt;
  return static_cast<std::size_t>(place);
}

std::optional<std::size_t> SlotRing::pick_slot(bool for_demand) const {
  std::optional<std::size_t> best;
  std::int64_t best_time = 0;
  int best_rank = 3;
  for (const auto s : slots_) {
    const Slot& b = places_[s];
    if (b.pins > 0 || b.state == SlotState::kFilling) continue;
    int rank = 2;
    if (b.block < 0 || b.state == SlotState::kEmpty || b.state == SlotState::kFailed) {
      rank = 0;
    } else if (!b.prefetched_unused) {
      rank = 1;
    } else if (!for_demand) {
      continue;
    }
    if (rank < best_rank || (rank == best_rank && b.last_release_ns < best_time)) {
      best = s;
      best_rank = rank;
      best_time = b.last_release_ns;
    }
  }
  return best;
}

SlotRing::Previous SlotRing::assign(std::size_t place, std::uint32_t block) {
  Slot& b = places_[place];
  Previous previous;
  if (b.block >= 0) {
    const auto old = static_cast<std::size_t>(b.block);
    if (place_of_block_[old] == static_cast<std::int64_t>(place)) place_of_block_[old] = -1;
    if (!b.resident && b.block != static_cast<std::int64_t>(block)) {
      previous.displaced = static_cast<std::uint32_t>(b.block);
    }
  }
  previous.prefetch_wasted = b.prefetched_unused;
  b.block = block;
  b.state = SlotState::kEmpty;
  b.error.reset();
  b.prefetched_unused = false;
  b.demanded = false;
  ++b.generation;
  place_of_block_[block] = static_cast<std::int64_t>(place);
  return previous;
}

void SlotRing::forget(std::size_t place, std::uint32_t block) {
  Slot& b = places_[place];
  place_of_block_[block] = -1;
  b.block = -1;
  b.state = SlotState::kEmpty;
  b.error.reset();
}

std::uint64_t SlotRing::bytes() const noexcept {
  std::uint64_t total = 0;
  for (const auto& p : places_) total += p.memory.size();
  return total;
}

}  // namespace tensorstream::engine::detail
