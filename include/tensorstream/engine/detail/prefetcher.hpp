// Which blocks to prefetch next: the engine's prefetch strategies, as a small pure class.
//
// The engine tells the prefetcher what it observes — each acquire, how long a streamed
// block was held (compute) and how long a streamed block's fill took — and, after each
// acquire, asks it for the blocks to prefetch. The prefetcher owns no locks, no memory of
// the engine's and no clock: it only learns and answers.
//
//   kNone       nothing
//   kNextLayer  the blocks after the current one in source order, cyclically
//   kAdaptive   records the order of acquires until the first block repeats (one pass), then
//               walks that order; before that, as kNextLayer
//
// How far ahead: `depth()` streamed blocks, at most `max_depth` (what the arena can hold
// beside the block being computed, from the plan); a fixed depth is clamped to that.
// Otherwise the depth is ceil(fill time / compute time) (moving averages, α = 0.2) — enough
// blocks in flight that a block's fill finishes while the ones before it compute — at least 1
// and at most max_depth (max_depth until both times are known). The engine stops earlier when
// the arena has no room left for the next one. The walk also passes over resident blocks
// (they cost nothing once loaded) without counting them.
//
// How soon: distance() says how many acquires away a block's next use is (along the learned
// order, else the source order; the block just used comes back last, after a full pass). The
// arena ranks what it may displace by it.
//
// Thread-safety: none; the engine calls it under its mutex.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "tensorstream/engine/options.hpp"

namespace tensorstream::engine::detail {

class Prefetcher {
 public:
  /// `resident[b]`: block b stays in device memory (the walk does not count it);
  /// `max_depth`: streamed blocks that may be in flight at once (0 when nothing streams).
  Prefetcher(PrefetchStrategy strategy, std::optional<unsigned> fixed_depth,
             std::vector<bool> resident, std::uint32_t max_depth);

  /// An acquire of `block` (kAdaptive learns the order from these).
  void record_acquire(std::uint32_t block);
  /// A streamed block was held for `seconds` (acquire to release).
  void record_compute(double seconds);
  /// A streamed block's fill took `seconds`.
  void record_fill(double seconds);

  /// Streamed blocks to keep in flight ahead of the one being computed.
  [[nodiscard]] unsigned depth() const noexcept;
  /// kAdaptive: one full pass has been recorded.
  [[nodiscard]] bool order_learned() const noexcept { return order_learned_; }
  /// Acquires from `from` to the next use of `to`: 1 for the block after `from`, a full pass
  /// for `from` itself; along the learned order where both are in it, else the source order.
  [[nodiscard]] std::uint64_t distance(std::uint32_t from, std::uint32_t to) const noexcept;

  /// Replaces `out` with the blocks to prefetch after an acquire of `block`, nearest first:
  /// resident ones on the way included, until depth() streamed ones are listed or the walk
  /// comes back to `block`. Empty for kNone.
  void next_blocks(std::uint32_t block, std::vector<std::uint32_t>& out) const;

 private:
  PrefetchStrategy strategy_;
  std::optional<unsigned> fixed_depth_;
  std::vector<bool> resident_;
  std::uint32_t max_depth_;
  // kAdaptive: the order of acquires of the first pass, and each block's position in it.
  std::vector<std::uint32_t> order_;
  std::vector<std::int64_t> order_position_;  // -1: not in the order
  bool order_learned_ = false;
  double compute_ema_ = 0;  // seconds a streamed block is held
  double fill_ema_ = 0;     // seconds a streamed block's fill takes
};

}  // namespace tensorstream::engine::detail
