#include "tensorstream/engine/detail/in_place_reader.hpp"

#include <fcntl.h>

#include <algorithm>
#include <fstream>
#include <optional>

#include "tensorstream/errors.hpp"
#include "tensorstream/io/backend.hpp"

namespace tensorstream::engine::detail {

using tensorstream::detail::concat;

namespace {

// MemAvailable of /proc/meminfo: what the kernel estimates can be allocated without
// swapping, page cache that can be dropped included.
std::optional<std::uint64_t> mem_available_bytes() {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  std::uint64_t kib = 0;
  std::string unit;
  while (meminfo >> key >> kib) {
    std::getline(meminfo, unit);
    if (key == "MemAvailable:") return kib * 1024;
  }
  return std::nullopt;
}

}  // namespace

CpuReadPath choose_cpu_read_path_uncompressed(const EngineOptions& options, const Layout& layout) {
  using io::BackendType;
  if (options.backend != BackendType::kAuto && options.backend != BackendType::kMmap) return {};
  const auto unsupported = io::block_windows_unsupported_reason();
  if (!unsupported.empty()) return {false, unsupported};
  if (options.ram_cache_bytes > 0) {
    // The page cache would duplicate the tier: read into the tier instead.
    return {false, "a RAM tier is configured: blocks are copied into it"};
  }
  if (options.backend == BackendType::kMmap) return {true, ""};
  const std::uint64_t source_bytes = layout.bytes();
  const auto available = mem_available_bytes();
  if (!available) return {false, "auto: available memory unknown (no /proc/meminfo)"};
  // Three quarters: the rest of the process (activations, KV cache, resident weights) and
  // everything else on the machine keep room, so the source stays cached between passes.
  if (source_bytes > *available / 4 * 3) {
    return {false,
            concat("auto: the ", layout.kind, " (", source_bytes,
                   " bytes) is more than three quarters of the available memory (", *available,
                   " bytes): reading with O_DIRECT, not through the page cache")};
  }
  return {true,
          concat("auto: the ", layout.kind, " (", source_bytes, " bytes) fits in the page cache (",
                 *available, " bytes available): reading in place")};
}

CpuReadPath choose_cpu_read_path(const EngineOptions& options, const Layout& layout) {
  auto path = choose_cpu_read_path_uncompressed(options, layout);
  const auto decoded = layout.decoded_blocks();
  if (!path.in_place || decoded == 0) return path;
  if (options.backend == io::BackendType::kMmap) {
    return {false, concat("backend mmap cannot map ", decoded, " of the ", layout.blocks.size(),
                          " units in place: they hold compressed chunks, which are decoded into "
                          "their buffers (read through the mmap backend)")};
  }
  return {false, concat("auto: the ", layout.kind, " (", layout.bytes(),
                        " bytes decoded) fits in the page cache, but ", decoded, " of its ",
                        layout.blocks.size(),
                        " units hold compressed chunks, which cannot be read in place: "
                        "reading them with a backend and decoding them into their buffers")};
}

// One window per block, each extent's aligned read region mapped where the copying paths
// would have read it (see source_layout.hpp), so placements are the same on every path.
InPlaceReader::InPlaceReader(const Layout& layout, const EngineOptions& options, io::Env& env,
                             TraceLog& trace)
    : layout_(layout), verify_(options.verify_checksums), trace_(trace), verifier_(layout) {
  std::vector<std::uint64_t> sizes;
  for (const auto& f : layout_.files) {
    files_.push_back(env.open(f, O_RDONLY | O_CLOEXEC));
    sizes.push_back(files_.back().size());
  }
  windows_.reserve(layout_.blocks.size());
  for (const auto& info : layout_.blocks) {
    std::vector<io::WindowRegion> regions;
    for (const auto& e : info.extents) {
      const auto plan = io::plan_read(e.file_offset, e.length);
      regions.push_back(io::WindowRegion{files_[e.file].get(), &layout_.files[e.file],
                                         sizes[e.file], plan.aligned_offset, plan.aligned_size,
                                         e.buffer_offset});
    }
    windows_.emplace_back(std::max<std::uint64_t>(info.size, 1), regions);
  }
}

// Faults the block's pages in (storage → page cache → this process), then checks them like a
// read.
void InPlaceReader::fill(const FillOrder& order, BlockBuffer& /*buffer*/, FillReport& report) {
  const auto block = order.block;
  const auto& info = layout_.blocks[block];
  const auto& window = windows_[block];
  const std::int64_t start = now_ns();
  std::uint64_t from_storage = 0;
  try {
    from_storage = window.populate();
  } catch (const IoError& err) {
    throw IoError(concat("block '", info.name, "': ", err.what()), err.code());
  } catch (const FormatError& err) {
    throw FormatError(concat("block '", info.name, "': ", err.what()));
  }
  std::uint64_t bytes = 0;
  for (std::size_t i = 0; i < info.extents.size(); ++i) {
    const auto& e = info.extents[i];
    bytes += e.length;
    if (verify_) verifier_.check(block, i, {window.data() + e.buffer_offset + e.skip, e.length});
  }
  from_storage = std::min(from_storage, bytes);
  const auto end = now_ns();
  trace_.record({SpanKind::kRead, block, bytes, start, end});
  report.bytes_from_storage += from_storage;
  report.bytes_from_page_cache += bytes - from_storage;
  report.io_seconds += static_cast<double>(end - start) / 1e9;
  // The fill's "copy" is the mapping itself: an empty span keeps the trace's shape the same
  // on every path (read, then copy).
  const auto copied = now_ns();
  trace_.record({SpanKind::kCopy, block, info.size, copied, copied});
}

std::byte* InPlaceReader::host_bytes(std::uint32_t block,
                                     const BlockBuffer& /*buffer*/) const noexcept {
  return windows_[block].data();
}

void InPlaceReader::drop(std::uint32_t block) noexcept { windows_[block].drop(); }

void InPlaceReader::close() noexcept {
  windows_.clear();
  files_.clear();
}

}  // namespace tensorstream::engine::detail
