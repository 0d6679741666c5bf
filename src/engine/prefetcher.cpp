#include "tensorstream/engine/detail/prefetcher.hpp"

#include <algorithm>
#include <cmath>
#include <utility>

namespace tensorstream::engine::detail {

Prefetcher::Prefetcher(PrefetchStrategy strategy, std::optional<unsigned> fixed_depth,
                       std::vector<bool> resident, std::uint32_t max_depth)
    : strategy_(strategy),
      fixed_depth_(fixed_depth),
      resident_(std::move(resident)),
      max_depth_(max_depth),
      order_position_(resident_.size(), -1) {}

void Prefetcher::record_acquire(std::uint32_t block) {
  if (order_learned_ || strategy_ != PrefetchStrategy::kAdaptive) return;
  if (order_position_[block] >= 0) {
    order_learned_ = true;  // the first block seen again: one full pass recorded
  } else {
    order_position_[block] = static_cast<std::int64_t>(order_.size());
    order_.push_back(block);
  }
}

void Prefetcher::record_compute(double seconds) {
  compute_ema_ = compute_ema_ == 0 ? seconds : 0.8 * compute_ema_ + 0.2 * seconds;
}

void Prefetcher::record_fill(double seconds) {
  fill_ema_ = fill_ema_ == 0 ? seconds : 0.8 * fill_ema_ + 0.2 * seconds;
}

unsigned Prefetcher::depth() const noexcept {
  const unsigned max_depth = max_depth_;
  if (fixed_depth_) return std::min(*fixed_depth_, max_depth);
  if (compute_ema_ <= 0 || fill_ema_ <= 0) return max_depth;
  const auto wanted = static_cast<unsigned>(std::ceil(fill_ema_ / compute_ema_));
  return std::clamp(wanted, 1u, std::max(max_depth, 1u));
}

void Prefetcher::next_blocks(std::uint32_t block, std::vector<std::uint32_t>& out) const {
  out.clear();
  if (strategy_ == PrefetchStrategy::kNone) return;
  const auto n = static_cast<std::uint32_t>(resident_.size());
  const unsigned wanted = depth();
  const bool along_order =
      strategy_ == PrefetchStrategy::kAdaptive && order_learned_ && order_position_[block] >= 0;
  std::uint32_t cursor = block;
  unsigned streamed = 0;
  for (std::uint32_t step = 0; step < n && streamed < wanted; ++step) {
    if (along_order) {
      const auto pos = static_cast<std::size_t>(order_position_[cursor]);
      cursor = order_[(pos + 1) % order_.size()];
    } else {
      cursor = (cursor + 1) % n;
    }
    if (cursor == block) break;
    out.push_back(cursor);
    if (!resident_[cursor]) ++streamed;
  }
}

}  // namespace tensorstream::engine::detail

namespace tensorstream::engine::detail {

std::uint64_t Prefetcher::distance(std::uint32_t from, std::uint32_t to) const noexcept {
  const auto n = static_cast<std::uint64_t>(resident_.size());
  if (order_learned_ && order_position_[from] >= 0 && order_position_[to] >= 0) {
    const auto length = static_cast<std::int64_t>(order_.size());
    const auto d = (order_position_[to] - order_position_[from] + length) % length;
    return d == 0 ? static_cast<std::uint64_t>(length) : static_cast<std::uint64_t>(d);
  }
  if (n == 0) return 0;
  const auto d = (static_cast<std::uint64_t>(to) + n - from) % n;
  return d == 0 ? n : d;
}

}  // namespace tensorstream::engine::detail
