// A bounded log of timed spans (I/O reads, host-to-device copies, compute stalls), exportable
// as Chrome/Perfetto trace JSON ("Trace Event Format"; open in ui.perfetto.dev or
// chrome://tracing).
//
// The log is a ring: when full, the oldest spans are overwritten and counted as dropped, so
// a long run costs bounded memory. Recording is one short critical section.
//
// Thread-safety: every member is thread-safe.
#pragma once

#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

namespace tensorstream::engine {

enum class SpanKind : std::uint8_t {
  kRead = 0,     ///< storage → host memory
  kCopy = 1,     ///< host → device copy
  kStall = 2,    ///< the consumer waited for a block
  kCompute = 3,  ///< the consumer held a block (acquire → release)
  kEvict = 4,    ///< a block left a tier
  kGdsRead = 5,  ///< storage → device memory with GPUDirect Storage (cuFileRead)
  kDecode = 6,   ///< a compressed unit's chunks decoded into host memory (bytes: decoded)
};

/// Name of a kind as shown in traces ("read", "copy", ..., "gds read").
[[nodiscard]] std::string_view span_kind_name(SpanKind kind) noexcept;

struct TraceSpan {
  SpanKind kind = SpanKind::kRead;
  std::uint32_t block = 0;
  std::uint64_t bytes = 0;
  std::int64_t start_ns = 0;  ///< steady-clock nanoseconds (now_ns())
  std::int64_t end_ns = 0;
};

/// Steady-clock time in nanoseconds, the time base of every span.
[[nodiscard]] std::int64_t now_ns() noexcept;

class TraceLog {
 public:
  /// Keeps at most `capacity` spans (≥ 1).
  explicit TraceLog(std::size_t capacity = 1u << 16);

  void record(const TraceSpan& span);
  /// The spans kept, oldest first.
  [[nodiscard]] std::vector<TraceSpan> snapshot() const;
  /// Spans overwritten because the log was full.
  [[nodiscard]] std::uint64_t dropped() const;
  [[nodiscard]] std::size_t capacity() const noexcept { return capacity_; }
  void clear();

  /// Chrome trace JSON: one complete ("X") event per span, a track per kind, times in
  /// microseconds from the first span. `block_name` names blocks (index → name).
  [[nodiscard]] std::string to_chrome_json(
      const std::function<std::string(std::uint32_t)>& block_name = {}) const;

 private:
  const std::size_t capacity_;
  mutable std::mutex mutex_;
  std::vector<TraceSpan> ring_;
  std::size_t next_ = 0;  // where the next span goes once the ring is full
  std::uint64_t dropped_ = 0;
};

}  // namespace tensorstream::engine
