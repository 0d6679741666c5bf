#include "tensorstream/engine/detail/prefetcher.hpp"

#include <algorithm>
#include <cmath>
#include <utility>

namespace tensorstream::engine::detail {

Prefetcher::Prefetcher(PrefetchStrategy strategy, std::optional<unsigned> fixed_depth,
                       std::vector<bool> resident, std::uint32_t max_depth,
                       std::vector<double> use_rate)
    : strategy_(strategy),
      fixed_depth_(fixed_depth),
      resident_(std::move(resident)),
      max_depth_(max_depth),
      order_position_(resident_.size(), -1),
      every_pass_(static_cast<std::uint32_t>(resident_.size())) {
  for (std::size_t b = 0; b < use_rate.size() && b < resident_.size(); ++b) {
    if (use_rate[b] >= 1) continue;
    if (routed_.empty()) routed_.resize(resident_.size());
    routed_[b].routed = true;
    routed_[b].prior = use_rate[b];
    --every_pass_;
  }
}

void Prefetcher::record_acquire(std::uint32_t block) {
  if (routed(block)) {
    auto& r = routed_[block];
    r.asked_in = -1;
    r.anchor = pass_marker_ < 0 ? -1 : static_cast<std::int64_t>(last_every_pass_);
    if (r.used_in != passes_ || r.score == 0) {  // each pass counts once
      r.score = r.score * std::pow(kRateDecay, static_cast<double>(passes_ - r.updated)) + 1;
      r.updated = passes_;
      r.used_in = passes_;
    }
    return;
  }
  if (pass_marker_ < 0) pass_marker_ = block;
  if (static_cast<std::int64_t>(block) == pass_marker_) ++passes_;
  last_every_pass_ = block;
  if (order_learned_ || strategy_ != PrefetchStrategy::kAdaptive) return;
  if (order_position_[block] >= 0) {
    order_learned_ = true;  // the first block seen again: one full pass recorded
  } else {
    order_position_[block] = static_cast<std::int64_t>(order_.size());
    order_.push_back(block);
  }
}

void Prefetcher::record_prefetch(std::uint32_t block) {
  if (routed(block)) routed_[block].asked_in = static_cast<std::int64_t>(passes_);
}

double Prefetcher::use_rate(std::uint32_t block) const noexcept {
  if (!routed(block)) return 1.0;
  const auto& r = routed_[block];
  const double t = static_cast<double>(passes_);
  const double score = r.score * std::pow(kRateDecay, t - static_cast<double>(r.updated));
  const double passes = (1 - std::pow(kRateDecay, t)) / (1 - kRateDecay);
  // The prior weighs as one pass: the first passes do not swing the rate to 0 or 1.
  return std::clamp((score + r.prior) / (passes + 1), 1e-9, 1.0);
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
    if (routed(cursor)) continue;  // the caller prefetches the ones its router picks
    out.push_back(cursor);
    if (!resident_[cursor]) ++streamed;
  }
}

std::uint64_t Prefetcher::pass_length() const noexcept {
  return order_learned_ ? order_.size() : std::max<std::uint32_t>(every_pass_, 1);
}

std::uint64_t Prefetcher::between(std::uint32_t from, std::uint32_t to) const noexcept {
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

std::uint64_t Prefetcher::distance(std::uint32_t from, std::uint32_t to) const noexcept {
  if (!routed(to)) return between(from, to);
  const auto& r = routed_[to];
  const auto anchor = static_cast<std::uint32_t>(r.anchor);
  if (r.asked_in >= 0 && passes_ <= static_cast<std::uint64_t>(r.asked_in) + 1) {
    // Expected in this pass: at its place in the pass, or now where that is here or unknown.
    return r.anchor < 0 || anchor == from ? 1 : between(from, anchor);
  }
  const auto pass = static_cast<double>(pass_length());
  const double rate = use_rate(to);
  const double here = r.anchor < 0 ? pass : static_cast<double>(between(from, anchor));
  const double expected = here + pass * (1 - rate) / rate;
  return static_cast<std::uint64_t>(std::clamp(expected, 1.0, 1e18));
}

}  // namespace tensorstream::engine::detail
