#include "tensorstream/engine/trace.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "tensorstream/detail/json_writer.hpp"

namespace tensorstream::engine {

std::string_view span_kind_name(SpanKind kind) noexcept {
  switch (kind) {
    case SpanKind::kRead:
      return "read";
    case SpanKind::kCopy:
      return "copy";
    case SpanKind::kStall:
      return "stall";
    case SpanKind::kCompute:
      return "compute";
    case SpanKind::kEvict:
      return "evict";
    case SpanKind::kGdsRead:
      return "gds read";
    case SpanKind::kDecode:
      return "decode";
  }
  return "unknown";
}

std::int64_t now_ns() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

TraceLog::TraceLog(std::size_t capacity) : capacity_(std::max<std::size_t>(capacity, 1)) {
  ring_.reserve(std::min<std::size_t>(capacity_, 4096));
}

void TraceLog::record(const TraceSpan& span) {
  std::lock_guard lock(mutex_);
  if (ring_.size() < capacity_) {
    ring_.push_back(span);
    return;
  }
  ring_[next_] = span;
  next_ = (next_ + 1) % capacity_;
  ++dropped_;
}

std::vector<TraceSpan> TraceLog::snapshot() const {
  std::lock_guard lock(mutex_);
  std::vector<TraceSpan> out;
  out.reserve(ring_.size());
  // Once full, the oldest span sits at next_.
  for (std::size_t i = 0; i < ring_.size(); ++i) out.push_back(ring_[(next_ + i) % ring_.size()]);
  return out;
}

std::uint64_t TraceLog::dropped() const {
  std::lock_guard lock(mutex_);
  return dropped_;
}

void TraceLog::clear() {
  std::lock_guard lock(mutex_);
  ring_.clear();
  next_ = 0;
  dropped_ = 0;
}

std::string TraceLog::to_chrome_json(
    const std::function<std::string(std::uint32_t)>& block_name) const {
  const auto spans = snapshot();
  std::int64_t origin = 0;
  if (!spans.empty()) {
    origin = std::min_element(spans.begin(), spans.end(), [](const auto& a, const auto& b) {
               return a.start_ns < b.start_ns;
             })->start_ns;
  }
  std::string out = "{\"displayTimeUnit\":\"ms\",\"traceEvents\":[";
  // One named track per kind.
  for (int k = 0; k <= static_cast<int>(SpanKind::kDecode); ++k) {
    const auto name = span_kind_name(static_cast<SpanKind>(k));
    out += (k ? "," : "");
    out += "{\"ph\":\"M\",\"name\":\"thread_name\",\"pid\":1,\"tid\":" + std::to_string(k) +
           ",\"args\":{\"name\":" + detail::json::quote(name) + "}}";
  }
  char number[64];
  for (const auto& s : spans) {
    const std::string name = block_name ? block_name(s.block) : "block " + std::to_string(s.block);
    out += ",{\"ph\":\"X\",\"pid\":1,\"tid\":";
    out += std::to_string(static_cast<int>(s.kind));
    out += ",\"cat\":";
    out += detail::json::quote(span_kind_name(s.kind));
    out += ",\"name\":";
    out += detail::json::quote(name);
    std::snprintf(number, sizeof number, ",\"ts\":%.3f,\"dur\":%.3f",
                  static_cast<double>(s.start_ns - origin) / 1e3,
                  static_cast<double>(std::max<std::int64_t>(s.end_ns - s.start_ns, 0)) / 1e3);
    out += number;
    out += ",\"args\":{\"block\":" + std::to_string(s.block) +
           ",\"bytes\":" + std::to_string(s.bytes) + "}}";
  }
  out += "]}";
  return out;
}

}  // namespace tensorstream::engine
