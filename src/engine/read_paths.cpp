#include "tensorstream/engine/detail/read_paths.hpp"

#include <algorithm>

namespace tensorstream::engine::detail {

ReadPaths::ReadPaths(const Layout& layout, const EngineOptions& options, const cuda::Device* device,
                     const cuda::Stream* copy_stream, TraceLog& trace,
                     std::optional<CpuReadPath> cpu_path)
    : device_(device), layout_(layout) {
  io::Env& env = options.env != nullptr ? *options.env : io::Env::posix();
  if (device == nullptr) {
    auto path = cpu_path ? std::move(*cpu_path) : choose_cpu_read_path(options, layout);
    in_place_ = path.in_place;
    backend_note_ = std::move(path.note);
  }
  if (in_place_) {
    in_place_reader_ = std::make_unique<InPlaceReader>(layout, options, env, trace);
    backend_name_ = "mmap";
  } else {
    host_reader_ = std::make_unique<HostReader>(layout, options, env, device, copy_stream, trace);
    const auto& backend = host_reader_->backend();
    backend_name_ = backend.name();
    if (backend_note_.empty()) {
      backend_note_ = backend.selection_note();
    } else if (!backend.selection_note().empty()) {
      backend_note_ += "; " + backend.selection_note();
    }
  }
  gds_.emplace(layout, options, env, device);
  BlockReader* host = in_place_ ? static_cast<BlockReader*>(in_place_reader_.get())
                                : static_cast<BlockReader*>(host_reader_.get());
  by_block_.assign(layout.blocks.size(), host);
  for (std::size_t b = 0; b < layout.blocks.size(); ++b) {
    if (!gds_->covers(layout.blocks[b])) continue;
    if (!gds_reader_) {
      gds_reader_ = std::make_unique<GdsReader>(layout, options, *gds_, *copy_stream, trace);
    }
    by_block_[b] = gds_reader_.get();
  }
}

void ReadPaths::prepare(UnitPlaces& places, unsigned fill_workers) {
  if (gds_reader_ && places.arena().capacity() > 0) {
    // The arena is read into again and again: registered, cuFile DMAs straight into it
    // instead of through its own bounce buffers. Optional: reads work without it.
    try {
      places.arena_memory().register_with_cufile();
    } catch (const std::exception&) {
      // out of BAR1 space or not supported
    }
  }
  std::uint64_t largest = 0;
  for (std::size_t b = 0; b < by_block_.size(); ++b) {
    if (by_block_[b] != gds_reader_.get()) largest = std::max(largest, layout_.blocks[b].size);
  }
  if (device_ != nullptr && largest > 0) {
    // Staging for reads that do not go into a RAM-tier entry: one per fill worker.
    host_reader_->allocate_staging(fill_workers, resident_buffer_bytes(largest));
  }
}

io::IoStats ReadPaths::io_stats() const {
  return host_reader_ ? host_reader_->io_stats() : io::IoStats{};
}

cache::Stats ReadPaths::ram_tier_stats() const {
  return host_reader_ ? host_reader_->ram_tier_stats() : cache::Stats{};
}

void ReadPaths::close() {
  by_block_.clear();
  if (host_reader_) host_reader_->close();
  gds_reader_.reset();  // its pool's threads go with it
  if (gds_) gds_->close();
  if (in_place_reader_) in_place_reader_->close();
}

}  // namespace tensorstream::engine::detail
