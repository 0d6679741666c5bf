// Streams every block of a store through the Engine, as an inference loop would, and
// prints the bandwidth and the engine's statistics. Uses only the public C++ API.
//
//   example_stream_store STORE [--device cpu|cuda:N] [--budget-mb MB] [--passes N]
//
// The budget defaults to the smallest one that works: two streaming slots of the largest
// block (engine::minimum_budget).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

#include "tensorstream/engine/engine.hpp"
#include "tensorstream/engine/residency.hpp"
#include "tensorstream/store.hpp"

namespace ts = tensorstream;

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s STORE [--device cpu|cuda:N] [--budget-mb MB] [--passes N]\n",
                 argv[0]);
    return 2;
  }
  ts::engine::EngineOptions options;  // device "cpu", no RAM tier, adaptive prefetch
  std::uint64_t budget_mb = 0;
  int passes = 3;
  for (int i = 2; i < argc; i += 2) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) {
      std::fprintf(stderr, "%s needs a value\n", flag.c_str());
      return 2;
    }
    if (flag == "--device") {
      options.device = argv[i + 1];
    } else if (flag == "--budget-mb") {
      budget_mb = std::strtoull(argv[i + 1], nullptr, 10);
    } else if (flag == "--passes") {
      passes = std::max(1, std::atoi(argv[i + 1]));
    } else {
      std::fprintf(stderr, "unknown option %s\n", flag.c_str());
      return 2;
    }
  }
  try {
    const auto store = ts::Store::open(argv[1]);
    std::vector<std::uint64_t> sizes;
    for (const auto& block : store.blocks()) sizes.push_back(block.raw_size);
    options.device_budget = budget_mb > 0 ? budget_mb << 20 : ts::engine::minimum_budget(sizes);

    ts::engine::Engine engine(store.path(), options);
    const auto start = std::chrono::steady_clock::now();
    std::uint64_t bytes = 0;
    for (int pass = 0; pass < passes; ++pass) {
      for (std::uint32_t b = 0; b < engine.block_count(); ++b) {
        const auto view = engine.acquire(b);  // a model would compute with view here
        bytes += view.size;
        engine.release(b);
      }
    }
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const auto s = engine.stats();
    std::printf("streamed %zu blocks x %d passes to %s: %.3f GB in %.3f s = %.2f GB/s\n",
                engine.block_count(), passes, options.device.c_str(),
                static_cast<double>(bytes) / 1e9, seconds,
                static_cast<double>(bytes) / seconds / 1e9);
    std::printf("budget %.1f MiB (arena %.1f MiB, %zu resident blocks), peak %.1f MiB\n",
                static_cast<double>(options.device_budget) / (1 << 20),
                static_cast<double>(engine.plan().arena_bytes) / (1 << 20),
                static_cast<std::size_t>(
                    std::count(engine.plan().resident.begin(), engine.plan().resident.end(), true)),
                static_cast<double>(s.device_bytes_peak) / (1 << 20));
    std::printf(
        "acquires %llu, hits %llu, misses %llu, stall %.3f s, from storage %.3f GB "
        "(%.2f GB/s while reading)\n",
        static_cast<unsigned long long>(s.acquires), static_cast<unsigned long long>(s.device_hits),
        static_cast<unsigned long long>(s.device_misses), s.stall_seconds,
        static_cast<double>(s.bytes_from_storage) / 1e9, s.storage_gbps());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
