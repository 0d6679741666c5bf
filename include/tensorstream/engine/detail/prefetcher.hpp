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
// Routed units. A unit whose use rate (EngineOptions::unit_use_rate) is below 1 — an expert
// of a mixture-of-experts layer — is used in some passes only, as its router decides. It is
// kept out of the order and out of the walk (replaying the experts of the first pass would
// prefetch experts the current tokens do not use); the caller prefetches it. Its rate is
// learned instead: a pass starts at each acquire of the first every-pass unit acquired, and
// the rate is the decayed share of passes that used the unit (each pass weighs kRateDecay of
// the one after it, so about the last 1 / (1 - kRateDecay) passes count), smoothed towards
// the caller's prior. Its distance is an expectation: the distance to where in the pass it
// was last used (the every-pass unit acquired before it), plus a pass for each pass expected
// to go by without it, pass · (1 − rate) / rate. A frequently routed expert therefore ranks
// near and stays in the arena; a rarely routed one ranks far and is displaced first (rather
// than in the order of last use). One the caller prefetched and has not used yet is expected
// in this pass, at its place in it (now, where that is the current one or not known yet),
// until the pass after next.
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
  /// A pass's weight relative to the pass after it, in a routed unit's learned rate.
  static constexpr double kRateDecay = 0.95;

  /// `resident[b]`: block b stays in device memory (the walk does not count it);
  /// `max_depth`: streamed blocks that may be in flight at once (0 when nothing streams);
  /// `use_rate[b]` (empty: all 1): the caller's expected share of passes that use block b,
  /// in (0, 1]; below 1 the block is routed (see the top of this file).
  Prefetcher(PrefetchStrategy strategy, std::optional<unsigned> fixed_depth,
             std::vector<bool> resident, std::uint32_t max_depth,
             std::vector<double> use_rate = {});

  /// An acquire of `block` (kAdaptive learns the order from these, a routed block's rate too).
  void record_acquire(std::uint32_t block);
  /// The caller asked for `block` to be prefetched (a routed block is then needed soon).
  void record_prefetch(std::uint32_t block);
  /// `block` is routed: used in some passes only.
  [[nodiscard]] bool routed(std::uint32_t block) const noexcept {
    return block < routed_.size() && routed_[block].routed;
  }
  /// The share of recent passes that used `block`, as learned (1 for every-pass blocks).
  [[nodiscard]] double use_rate(std::uint32_t block) const noexcept;
  /// A streamed block was held for `seconds` (acquire to release).
  void record_compute(double seconds);
  /// A streamed block's fill took `seconds`.
  void record_fill(double seconds);

  /// Streamed blocks to keep in flight ahead of the one being computed.
  [[nodiscard]] unsigned depth() const noexcept;
  /// kAdaptive: one full pass has been recorded.
  [[nodiscard]] bool order_learned() const noexcept { return order_learned_; }
  /// Acquires from `from` (an every-pass block) to the next use of `to`: 1 for the block after
  /// `from`, a full pass for `from` itself; along the learned order where both are in it, else
  /// the source order. For a routed `to`, the expectation above.
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

  // What is learned of a routed block (see the top of this file).
  struct Routed {
    bool routed = false;
    double prior = 1;            // the caller's expected rate
    double score = 0;            // decayed count of passes that used it, as of pass `updated`
    std::uint64_t updated = 0;   // the pass of `score`
    std::uint64_t used_in = 0;   // the last pass that used it (0: none yet)
    std::int64_t asked_in = -1;  // the pass in which the caller prefetched it, unused since
    std::int64_t anchor = -1;    // the every-pass block acquired before its last use
  };
  [[nodiscard]] std::uint64_t between(std::uint32_t from, std::uint32_t to) const noexcept;
  [[nodiscard]] std::uint64_t pass_length() const noexcept;
  std::vector<Routed> routed_;     // per block (empty when none is routed)
  std::uint32_t every_pass_ = 0;   // blocks not routed
  std::int64_t pass_marker_ = -1;  // the first every-pass block acquired: each acquire, a pass
  std::uint64_t passes_ = 0;
  std::uint32_t last_every_pass_ = 0;  // the every-pass block acquired last
};

}  // namespace tensorstream::engine::detail
