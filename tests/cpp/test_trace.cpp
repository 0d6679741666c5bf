// The bounded trace log and its Chrome trace export.
#include <gtest/gtest.h>

#include <thread>

#include "tensorstream/detail/json.hpp"
#include "tensorstream/engine/trace.hpp"

namespace eng = tensorstream::engine;
namespace json = tensorstream::detail::json;

TEST(Trace, KeepsTheNewestSpansWithinCapacity) {
  eng::TraceLog log(100);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&log, t] {
      for (int i = 0; i < 1000; ++i) {
        const auto start = eng::now_ns();
        log.record({eng::SpanKind::kRead, static_cast<std::uint32_t>(t), 4096, start, start + 10});
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(log.snapshot().size(), 100u);
  EXPECT_EQ(log.dropped(), 4000u - 100u);
  log.clear();
  EXPECT_TRUE(log.snapshot().empty());
  EXPECT_EQ(log.dropped(), 0u);
}

TEST(Trace, SnapshotIsOldestFirstAfterWrapping) {
  eng::TraceLog log(3);
  for (std::uint32_t i = 0; i < 5; ++i) log.record({eng::SpanKind::kCopy, i, 1, i, i + 1});
  const auto spans = log.snapshot();
  ASSERT_EQ(spans.size(), 3u);
  EXPECT_EQ(spans[0].block, 2u);
  EXPECT_EQ(spans[2].block, 4u);
}

TEST(Trace, ExportsValidChromeTraceJson) {
  eng::TraceLog log;
  log.record({eng::SpanKind::kRead, 0, 1 << 20, 1'000'000, 3'000'000});
  log.record({eng::SpanKind::kCopy, 0, 1 << 20, 3'000'000, 3'500'000});
  log.record({eng::SpanKind::kStall, 1, 0, 2'000'000, 3'500'000});
  const auto text =
      log.to_chrome_json([](std::uint32_t b) { return "layers." + std::to_string(b); });
  const auto doc = json::parse(text, "trace");
  const auto* events = doc.find("traceEvents");
  ASSERT_NE(events, nullptr);
  const auto& list = std::get<json::Array>(events->data);
  int complete = 0;
  for (const auto& e : list) {
    const auto& ph = std::get<std::string>(e.find("ph")->data);
    if (ph != "X") continue;
    ++complete;
    EXPECT_NE(e.find("ts"), nullptr);
    EXPECT_NE(e.find("dur"), nullptr);
  }
  EXPECT_EQ(complete, 3);
  EXPECT_NE(text.find("\"name\":\"layers.1\""), std::string::npos);
  EXPECT_NE(text.find("\"ts\":0.000,\"dur\":2000.000"), std::string::npos) << text;
}
