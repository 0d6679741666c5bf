#include "tensorstream/engine/detail/read_paths.hpp"

#include <algorithm>

#include "tensorstream/errors.hpp"

namespace tensorstream::engine::detail {

using tensorstream::detail::concat;

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
    if (!gds_->covers(layout.blocks[b])) {
      const auto& block = layout.blocks[b];
      if (block.decoded() && gds_->used_files() > 0 &&
          std::all_of(block.extents.begin(), block.extents.end(),
                      [&](const Extent& e) { return gds_->outcome()[e.file].used; })) {
        ++gds_decoded_;
      }
      continue;
    }
    if (!gds_reader_) {
      gds_reader_ = std::make_unique<GdsReader>(layout, options, *gds_, *copy_stream, trace);
    }
    by_block_[b] = gds_reader_.get();
  }
  if (const auto decoded = layout.decoded_blocks(); decoded > 0) {
    decode_threads_ = host_reader_->decode_threads();
    std::string into = "their buffers";
    if (options.ram_cache_bytes > 0) into = "the RAM tier's entries, which hold them decoded,";
    if (device != nullptr && options.ram_cache_bytes == 0) {
      into = "pinned staging, then copied to the device once";
    }
    decode_note_ =
        concat(decoded, " of ", layout.blocks.size(), " units hold compressed chunks: read with ",
               backend_name_, " and decoded on ", decode_threads_, " threads straight into ", into);
    if (device == nullptr && !backend_note_.empty()) {
      decode_note_ += concat("; ", backend_note_);
    }
    if (gds_decoded_ > 0) {
      decode_note_ += concat("; not with GPUDirect Storage (cuFile cannot decode): ", gds_decoded_,
                             " units go through host memory");
    }
  }
}

std::string ReadPaths::gds_reason() const {
  std::string reason = gds_->reason();
  if (gds_decoded_ > 0) {
    reason += concat(reason.empty() ? "" : "; ", gds_decoded_,
                     " units hold compressed chunks, which are decoded in host memory: read "
                     "through it, not with GPUDirect Storage");
  }
  return reason;
}

std::string ReadPaths::decode_note(const EngineStats& stats) const {
  if (decode_note_.empty()) return {};
  std::string note = decode_note_;
  // Where decoding, not storage, is what the fills wait for, say so with the two rates.
  if (stats.bytes_decoded > 0 && stats.decode_seconds > 0 && stats.io_seconds > 0 &&
      stats.decode_seconds > stats.io_seconds) {
    const double decode_gbps =
        static_cast<double>(stats.bytes_decoded) / stats.decode_seconds / 1e9;
    const double read_gbps = static_cast<double>(stats.bytes_from_storage) / stats.io_seconds / 1e9;
    note += concat("; the fills spent longer decoding (", decode_gbps,
                   " GB/s of decoded bytes) than waiting for storage (", read_gbps,
                   " GB/s of stored bytes): the decoder, not the storage, holds them back");
  }
  return note;
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
