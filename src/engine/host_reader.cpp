#include "tensorstream/engine/detail/host_reader.hpp"

#include <algorithm>
#include <chrono>

#include "tensorstream/alignment.hpp"
#include "tensorstream/errors.hpp"

namespace tensorstream::engine::detail {

using Clock = std::chrono::steady_clock;
using tensorstream::detail::concat;

HostReader::HostReader(const Layout& layout, const EngineOptions& options, io::Env& env,
                       const cuda::Device* device, const cuda::Stream* copy_stream, TraceLog& trace)
    : layout_(layout),
      verify_(options.verify_checksums),
      wait_timeout_(options.wait_timeout),
      device_(device),
      copy_stream_(copy_stream != nullptr ? copy_stream->handle() : nullptr),
      trace_(trace),
      verifier_(layout),
      allocator_(device != nullptr ? std::make_shared<PinnedHostAllocator>(*device)
                                   : default_host_allocator()) {
  // kMmap on a CPU that cannot read in place still reads (copies) through the mapping.
  backend_ = io::make_backend(options.backend, options.io, env);
  for (const auto& f : layout_.files) files_.push_back(backend_->open(f));
  if (options.ram_cache_bytes > 0) {
    // One region for the whole tier, taken now: no allocation (and, pinned, no
    // cuMemFreeHost, which synchronises the device) per entry. Never more than every block
    // once, so a tier sized for a larger model does not pin memory that it cannot use.
    std::uint64_t all_blocks = 0;
    for (const auto& b : layout_.blocks) all_blocks += resident_buffer_bytes(b.size);
    const std::uint64_t capacity =
        std::min(options.ram_cache_bytes / kSlotAlignment * kSlotAlignment, all_blocks);
    std::shared_ptr<HostAllocator> entries = default_host_allocator();
    if (capacity > 0) {
      auto region = device != nullptr ? allocate_buffer(allocator_, capacity)
                                      : AlignedBuffer(static_cast<std::size_t>(capacity));
      entries = std::make_shared<RegionAllocator>(std::move(region), kSlotAlignment);
    }
    cache_ =
        std::make_unique<cache::BlockCache>(capacity, options.cache_policy, std::move(entries));
  }
  if (layout_.decoded_blocks() > 0) {
    decode_ = std::make_unique<DecodePipeline>(
        layout_, *backend_, files_, decode_threads_for(options), verify_, verifier_, trace_);
  }
}

void HostReader::allocate_staging(unsigned count, std::uint64_t bytes) {
  for (unsigned w = 0; w < count; ++w) {
    Staging s;
    s.host = allocate_buffer(allocator_, static_cast<std::size_t>(bytes));
    s.copied.emplace(*device_);
    staging_.push_back(std::move(s));
  }
}

HostReader::Staging& HostReader::take_staging() {
  std::unique_lock lock(staging_mutex_);
  while (true) {
    for (auto& s : staging_) {
      if (!s.busy) {
        s.busy = true;
        return s;
      }
    }
    staging_free_.wait(lock);  // one staging buffer per worker: never waits long
  }
}

void HostReader::give_back(Staging& staging) {
  std::lock_guard lock(staging_mutex_);
  staging.busy = false;
  staging_free_.notify_one();
}

void HostReader::fill(const FillOrder& order, BlockBuffer& buffer, FillReport& report) {
  const auto& info = layout_.blocks[order.block];
  const cache::BlockKey key{0, order.block};
  Staging* staging = nullptr;
  struct StagingGuard {
    HostReader& reader;
    Staging*& staging;
    ~StagingGuard() {
      if (staging != nullptr) reader.give_back(*staging);
    }
  } guard{*this, staging};

  // A resident block is read once and stays in its buffer: the tier does not admit it (its
  // room is for streamed blocks), and a lookup, which would count a miss, is only made if
  // the tier holds it (contains() is no access).
  const bool resident = buffer.resident();
  std::optional<cache::BlockHandle> source_pin;
  const std::byte* source = nullptr;
  if (cache_ && (!resident || cache_->contains(key))) source_pin = cache_->lookup(key);
  if (source_pin) {
    source = source_pin->data();
    report.bytes_from_ram_tier += info.size;
  } else {
    std::span<std::byte> dest;
    std::optional<cache::BlockHandle> filler;
    if (cache_ && !resident) filler = cache_->insert(key, resident_buffer_bytes(info.size));
    if (filler) {
      dest = filler->mutable_bytes();
    } else if (device_ != nullptr) {
      staging = &take_staging();
      if (staging->copied) staging->copied->synchronize();  // its last copy has finished
      dest = staging->host.span();
    } else {
      dest = buffer.host_span();
    }
    read(order.block, dest, order.demand, report);
    source = dest.data();
    if (filler) {
      filler->publish();
      source_pin = std::move(filler);
    }
  }
  const std::int64_t copy_start = now_ns();
  buffer.copy_from_host(source, static_cast<std::size_t>(info.size), info.copies, copy_stream_);
  if (staging != nullptr) staging->copied->record(copy_stream_);
  trace_.record({SpanKind::kCopy, order.block, info.size, copy_start, now_ns()});
  if (device_ == nullptr) return;  // the copy is done; the tier entry's pin goes now
  if (resident) {
    // No next fill would let the pin go: wait for the copy (once per resident block).
    if (source_pin) buffer.wait_for_copy();
  } else {
    // The copy may still run: keep its source pinned until the buffer's next fill.
    buffer.keep_copy_source(std::move(source_pin));
  }
}

void HostReader::read(std::uint32_t block, std::span<std::byte> dest, bool demand,
                      FillReport& report) {
  const auto& info = layout_.blocks[block];
  const std::int64_t start = now_ns();
  const double decode_before = report.decode_seconds;
  const std::uint64_t compressed_before = report.compressed_bytes_read;
  const auto deadline = Clock::now() + wait_timeout_;
  std::vector<io::ReadTicket> tickets(info.extents.size());
  std::uint64_t bytes = 0;
  bool decoded = false;
  for (std::size_t i = 0; i < info.extents.size(); ++i) {
    const auto& e = info.extents[i];
    if (e.decode) {
      decoded = true;
      continue;
    }
    io::SubmitOptions submit;
    submit.priority = demand ? io::Priority::kHigh : io::Priority::kNormal;
    tickets[i] = backend_->submit(files_[e.file], e.file_offset, e.length,
                                  dest.subspan(e.buffer_offset), std::move(submit));
    bytes += e.length;
  }
  // While the plain extents are read, the decoded ones are read and decoded piece by piece.
  if (decoded) decode_->run(block, dest, demand, deadline, wait_timeout_, report);
  for (std::size_t i = 0; i < tickets.size(); ++i) {
    if (!tickets[i].valid()) continue;
    const auto& e = info.extents[i];
    const auto where = [&] { return describe_extent(layout_, block, i); };
    std::span<std::byte> data;
    try {
      const auto left = deadline - Clock::now();
      if (!tickets[i].wait_for(std::max<Clock::duration>(left, Clock::duration::zero()))) {
        tickets[i].cancel();
        throw Error(
            concat("read of ", where(), " did not finish within ", wait_timeout_.count(), " ms"));
      }
      data = tickets[i].wait();
    } catch (const IoError& err) {
      if (e.label.empty()) throw;
      throw IoError(concat("read of ", where(), " failed: ", err.what()), err.code());
    } catch (const FormatError& err) {
      if (e.label.empty()) throw;
      throw FormatError(concat("read of ", where(), " failed: ", err.what()));
    } catch (const io::Cancelled& err) {
      if (e.label.empty()) throw;
      throw Error(concat("read of ", where(), " failed: ", err.what()));
    }
    if (verify_) verifier_.check(block, i, data);
  }
  const auto end = now_ns();
  trace_.record({SpanKind::kRead, block, bytes + report.compressed_bytes_read - compressed_before,
                 start, end});
  report.bytes_from_storage += bytes;
  // The time decoding is the decoder's; the rest of the read waited for storage.
  report.io_seconds +=
      static_cast<double>(end - start) / 1e9 - (report.decode_seconds - decode_before);
}

io::IoStats HostReader::io_stats() const { return backend_ ? backend_->stats() : io::IoStats{}; }

cache::Stats HostReader::ram_tier_stats() const {
  return cache_ ? cache_->stats() : cache::Stats{};
}

void HostReader::close() {
  decode_.reset();  // its pool's threads go with it
  staging_.clear();
  cache_.reset();
  backend_.reset();
}

}  // namespace tensorstream::engine::detail
