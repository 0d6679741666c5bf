#include "tensorstream/engine/engine.hpp"

#include <algorithm>
#include <chrono>
#include <utility>

#include "tensorstream/engine/detail/engine_impl.hpp"
#include "tensorstream/errors.hpp"

namespace tensorstream::engine {

using tensorstream::detail::concat;

namespace {

constexpr unsigned kFillWorkers = 2;
// Pinned staging for rows on a GPU: rows are gathered into it, then copied in one go.
constexpr std::uint64_t kRowsStagingBytes = std::uint64_t{16} << 20;

double seconds_since(std::int64_t start_ns) {
  return static_cast<double>(now_ns() - start_ns) / 1e9;
}

// The caller mistakes refused before any file or device is touched; returns the device's
// ordinal (-1: the CPU).
int validated_device(const EngineOptions& options, std::size_t units) {
  TS_EXPECT(options.slots >= 1, std::invalid_argument, "slots must be at least 1, got ",
            options.slots);
  TS_EXPECT(options.unit_needs.empty() || options.unit_needs.size() == units, std::invalid_argument,
            "unit_needs gives ", options.unit_needs.size(), " values for ", units, " units");
  TS_EXPECT(options.unit_partial.empty() || options.unit_partial.size() == units,
            std::invalid_argument, "unit_partial gives ", options.unit_partial.size(),
            " values for ", units, " units");
  TS_EXPECT(options.unit_use_rate.empty() || options.unit_use_rate.size() == units,
            std::invalid_argument, "unit_use_rate gives ", options.unit_use_rate.size(),
            " values for ", units, " units");
  for (std::size_t u = 0; u < options.unit_use_rate.size(); ++u) {
    const double rate = options.unit_use_rate[u];
    TS_EXPECT(rate > 0 && rate <= 1, std::invalid_argument, "unit_use_rate of unit ", u, " is ",
              rate, ": a share of passes must be in (0, 1]");
  }
  const int device_ordinal = detail::parse_device(options.device);
  if (options.gds == GdsMode::kOn) {
    TS_EXPECT(device_ordinal >= 0, std::invalid_argument, "gds=on needs a CUDA device, but ",
              "device is '", options.device,
              "': GPUDirect Storage reads into GPU memory only (use gds=auto or gds=off)");
    TS_EXPECT(options.ram_cache_bytes == 0, std::invalid_argument,
              "gds=on cannot be combined with a RAM tier (ram_cache_bytes = ",
              options.ram_cache_bytes, "): the tier is filled by reads into host memory");
    TS_EXPECT(!options.verify_checksums, std::invalid_argument,
              "gds=on cannot be combined with verify_checksums: blocks are checked in host "
              "memory, so they are read there");
    TS_EXPECT(options.io.direct, std::invalid_argument,
              "gds=on cannot be combined with io.direct = false: cuFile reads bypass the page "
              "cache");
  }
  return device_ordinal;
}

}  // namespace

// ---- construction ----------------------------------------------------------------------------

Engine::Impl::Impl(Layout layout, EngineOptions options)
    : layout_(std::move(layout)), options_(std::move(options)), trace_(options_.trace_capacity) {
  const auto n = layout_.blocks.size();
  const int ordinal = validated_device(options_, n);
  if (ordinal >= 0) {
    cuda_device_.emplace(ordinal);
    copy_stream_.emplace(*cuda_device_);
  }
  // Compressed units: decoded on the fills, or once into a decoded copy (decoded_copy.hpp).
  compressed_units_ = layout_.decoded_blocks();
  if (compressed_units_ > 0) {
    io::Env& env = options_.env != nullptr ? *options_.env : io::Env::posix();
    auto choice = detail::choose_compressed_reads(layout_, options_,
                                                  cuda_device_ ? &*cuda_device_ : nullptr, env);
    compressed_note_ = std::move(choice.note);
    if (choice.copy) {
      try {
        decoded_copy_.emplace(layout_, options_, env);
        compressed_note_ +=
            concat(": the ", compressed_units_, " units with compressed chunks were decoded once (",
                   decoded_copy_->seconds(), " s on ", decoded_copy_->threads(),
                   " threads) into a temporary decoded copy of ", decoded_copy_->bytes(),
                   " bytes (unlinked, in '", decoded_copy_->directory().string(),
                   "'), which is streamed as an uncompressed source");
      } catch (const std::exception& e) {
        compressed_note_ += concat(", but the decoded copy could not be made (", e.what(),
                                   "): decoding on every fill");
      }
    }
  }
  detail::CpuReadPath cpu_path;
  if (!cuda_device_) cpu_path = detail::choose_cpu_read_path(options_, layout_);
  // Where a copy puts the bytes in their place anyway (a GPU's host path, a CPU buffer read
  // into), misaligned tensors are moved to aligned offsets on the way (source_layout.hpp).
  if (cuda_device_ || !cpu_path.in_place) {
    for (auto& b : layout_.blocks) pack_for_device(b);
  }
  // A CPU buffer is read into (the read layout); a GPU's holds the packed one.
  std::vector<std::uint64_t> bytes;
  std::vector<UnitDemand> demands;
  std::vector<std::uint64_t> together;
  for (std::size_t u = 0; u < n; ++u) {
    const auto& b = layout_.blocks[u];
    bytes.push_back(cuda_device_ ? b.memory_size() : b.size);
    const auto need = options_.unit_needs.empty() ? 0 : options_.unit_needs[u];
    const bool partial = !options_.unit_partial.empty() && options_.unit_partial[u];
    const double rate = options_.unit_use_rate.empty() ? 1.0 : options_.unit_use_rate[u];
    demands.push_back(UnitDemand{bytes.back(), need, partial, rate});
    together.push_back(need > bytes.back() ? need : 0);
  }
  try {
    plan_ = plan_residency(demands, options_.device_budget, options_.slots);
  } catch (const BudgetTooSmall& e) {
    throw BudgetTooSmall(concat(layout_.kind, " '", layout_.source.string(), "' on ",
                                options_.device, ": ", e.what()),
                         e.minimum_budget());
  }
  const cuda::Device* device = cuda_device_ ? &*cuda_device_ : nullptr;
  readers_.emplace(layout_, options_, device, copy_stream_ ? &*copy_stream_ : nullptr, trace_,
                   std::move(cpu_path));
  places_.emplace(plan_, std::move(bytes), std::move(together), device, options_.device_memory,
                  readers_->buffers_need_memory(), options_.memory_stream);
  readers_->prepare(*places_, kFillWorkers);
  rows_reader_.emplace(layout_, options_.env != nullptr ? *options_.env : io::Env::posix());
  // As many units in flight as the arena holds beside the one computing.
  std::uint32_t max_depth = 0;
  if (plan_.largest_need > 0) {
    const auto fit = plan_.arena_bytes / plan_.largest_need;
    max_depth = static_cast<std::uint32_t>(std::max<std::uint64_t>(fit, 2) - 1);
  }
  prefetcher_.emplace(options_.prefetch, options_.prefetch_depth, plan_.resident, max_depth,
                      options_.unit_use_rate);

  acquired_at_ns_.assign(n, 0);
  stats_.block_load_seconds.assign(n, 0.0);
  stats_.block_stall_seconds.assign(n, 0.0);
  stats_.device_bytes_in_use = places_->device_bytes();
  stats_.device_bytes_peak = stats_.device_bytes_in_use;
  stats_.device_budget = options_.device_budget;
  stats_.arena_bytes = plan_.arena_bytes;
  stats_.overlap = plan_.largest_need == 0 || plan_.overlap;
  stats_.gds_mode = options_.gds;
  stats_.gds_files = readers_->gds().used_files();
  stats_.compressed_units = compressed_units_;
  if (decoded_copy_) {
    stats_.decoded_copy_bytes = decoded_copy_->bytes();
    stats_.decoded_copy_seconds = decoded_copy_->seconds();
  }
  try {
    for (unsigned w = 0; w < kFillWorkers; ++w) workers_.emplace_back([this] { worker_loop(); });
  } catch (...) {
    close();  // joins the workers that did start
    throw;
  }
}

void Engine::Impl::check_open() const {
  if (closed_) throw Error(concat("engine for '", layout_.source.string(), "' is closed"));
}

// ---- places and jobs (mutex_ held) -----------------------------------------------------------

BlockView Engine::Impl::view_of(const detail::Unit& unit, std::uint32_t block) const {
  BlockView view;
  view.block = block;
  view.size = places_->bytes(block);
  view.resident = unit.resident;
  view.host = readers_->reader(block).host_bytes(block, *unit.memory);
  view.device = unit.memory->device_ptr();
  return view;
}

detail::Arena::Rank Engine::Impl::rank() const {
  return [this](std::uint32_t id) -> detail::Arena::Distance {
    if (id >= detail::kRowsBase) return detail::Arena::kUnknown;  // never asked for again
    return prefetcher_->distance(current_, id);
  };
}

void Engine::Impl::dropped(const std::vector<detail::UnitPlaces::Displaced>& displaced) {
  for (const auto& d : displaced) {
    if (d.prefetch_wasted) ++stats_.prefetches_wasted;
    // Reading in place: the unit's pages leave the process (the page cache keeps them).
    readers_->reader(d.unit).drop(d.unit);
  }
}

bool Engine::Impl::place(std::uint32_t block, bool demand) {
  const auto distance = demand ? 0 : prefetcher_->distance(current_, block);
  const auto where = places_->find(block, demand, distance, rank());
  if (!where) return false;
  dropped(places_->take(block, *where));
  note_arena_use();
  return true;
}

void Engine::Impl::note_arena_use() {
  stats_.arena_bytes_in_use = places_->arena().used();
  stats_.arena_bytes_peak = std::max(stats_.arena_bytes_peak, stats_.arena_bytes_in_use);
}

std::size_t Engine::Impl::cancel_queued_prefetches() {
  std::size_t cancelled = 0;
  for (auto it = prefetch_jobs_.begin(); it != prefetch_jobs_.end();) {
    auto& u = (*places_)[it->block];
    if (!u.resident && u.pins == 0 && u.generation == it->generation &&
        u.state == detail::UnitState::kFilling) {
      places_->forget(it->block);  // not wasted: it was never read
      ++stats_.prefetches_cancelled;
      ++cancelled;
      it = prefetch_jobs_.erase(it);
    } else {
      ++it;
    }
  }
  note_arena_use();
  return cancelled;
}

bool Engine::Impl::wait_for_room(std::unique_lock<std::mutex>& lock, Clock::time_point deadline) {
  return changed_.wait_until(lock, deadline) != std::cv_status::timeout;
}

std::string Engine::Impl::held_units() const {
  std::string out;
  std::size_t listed = 0;
  std::size_t held = 0;
  for (std::uint32_t u = 0; u < places_->size(); ++u) {
    if ((*places_)[u].pins == 0 || places_->is_resident(u)) continue;
    ++held;
    if (listed < 4) {
      out += (listed++ == 0 ? "'" : ", '") + layout_.blocks[u].name + "'";
    }
  }
  if (held > listed) out += concat(" and ", held - listed, " more");
  return held == 0 ? std::string("none (units are being filled)") : out;
}

void Engine::Impl::schedule_fill(std::uint32_t block, bool demand) {
  auto& u = (*places_)[block];
  u.state = detail::UnitState::kFilling;
  u.demanded = demand;
  places_->sync(block);
  (demand ? demand_jobs_ : prefetch_jobs_).push_back({block, u.generation});
  jobs_ready_.notify_one();
}

bool Engine::Impl::prefetch_locked(std::uint32_t block) {
  auto& u = (*places_)[block];
  if (u.state != detail::UnitState::kAbsent) return true;  // present or on its way
  if (!u.resident) {
    if (places_->arena().footprint(places_->bytes(block)) > places_->arena().capacity()) {
      return false;
    }
    if (!place(block, false)) return false;  // no room without displacing what comes sooner
  }
  u.prefetched_unused = true;
  ++stats_.prefetches_issued;
  schedule_fill(block, false);
  return true;
}

void Engine::Impl::prefetch_after(std::uint32_t block) {
  prefetcher_->next_blocks(block, to_prefetch_);
  for (const auto b : to_prefetch_) {
    if (!prefetch_locked(b)) break;
  }
}

// ---- the consumer's calls ----------------------------------------------------------------------

BlockView Engine::Impl::acquire(std::uint32_t block, cuda::StreamHandle stream) {
  std::unique_lock lock(mutex_);
  check_open();
  TS_EXPECT(block < layout_.blocks.size(), std::out_of_range, "block ", block, " out of range (",
            layout_.blocks.size(), " blocks in '", layout_.source.string(), "')");
  ++stats_.acquires;
  prefetcher_->record_acquire(block);
  const bool routed = prefetcher_->routed(block);
  if (!routed) current_ = block;  // distances are measured from where the pass is
  const auto deadline = Clock::now() + options_.wait_timeout;
  const std::int64_t start = now_ns();
  bool waited = false;
  auto& u = (*places_)[block];
  while (true) {
    if (u.state == detail::UnitState::kAbsent) {
      if (!u.resident) {
        const auto need = places_->arena().footprint(places_->bytes(block));
        TS_EXPECT(need <= places_->arena().capacity(), Error, "block '", layout_.blocks[block].name,
                  "' needs ", need, " bytes of device memory at once, but the streaming arena ",
                  "holds ", places_->arena().capacity(), " (read it by rows, or give a larger ",
                  "budget)");
        const bool placed =
            place(block, true) || (cancel_queued_prefetches() > 0 && place(block, true));
        if (!placed) {
          waited = true;
          if (!wait_for_room(lock, deadline)) {
            throw Error(concat("acquire of block '", layout_.blocks[block].name,
                               "' timed out: the streaming arena (", places_->arena().capacity(),
                               " bytes) has no room that is not held; held: ", held_units(),
                               "; release blocks first"));
          }
          check_open();
          continue;
        }
      }
      schedule_fill(block, /*demand=*/true);
    }
    if (u.state == detail::UnitState::kFilling && !u.demanded) {
      // A prefetch in the queue becomes a demand: move it ahead of other prefetches.
      for (auto it = prefetch_jobs_.begin(); it != prefetch_jobs_.end(); ++it) {
        if (it->block == block && it->generation == u.generation) {
          demand_jobs_.push_back(*it);
          prefetch_jobs_.erase(it);
          break;
        }
      }
      u.demanded = true;
    }
    ++u.pins;
    places_->sync(block);
    const auto generation = u.generation;
    while (u.state == detail::UnitState::kFilling) {
      waited = true;
      if (changed_.wait_until(lock, deadline) == std::cv_status::timeout) {
        --u.pins;
        places_->sync(block);
        changed_.notify_all();
        throw Error(concat("block '", layout_.blocks[block].name, "' of '", layout_.source.string(),
                           "' was not loaded within ", options_.wait_timeout.count(), " ms"));
      }
    }
    if (closed_) {
      --u.pins;
      check_open();
    }
    if (u.state == detail::UnitState::kFailed) {
      const detail::FillError error = *u.error;
      --u.pins;
      // Forget the failed fill so that the next acquire reads the block again.
      if (!u.resident) readers_->reader(block).drop(block);
      places_->forget(block);
      note_arena_use();
      changed_.notify_all();
      error.raise();
    }
    if (u.state == detail::UnitState::kReady && u.generation == generation) break;
    --u.pins;  // the unit lost its place while we waited; start over
    places_->sync(block);
  }
  if (u.prefetched_unused) {
    u.prefetched_unused = false;
    ++stats_.prefetches_used;
  }
  if (waited) {
    ++stats_.device_misses;
    const auto end = now_ns();
    stats_.stall_seconds += static_cast<double>(end - start) / 1e9;
    stats_.block_stall_seconds[block] += static_cast<double>(end - start) / 1e9;
    trace_.record({SpanKind::kStall, block, 0, start, end});
  } else {
    ++stats_.device_hits;
  }
  acquired_at_ns_[block] = now_ns();
  const BlockView view = view_of(u, block);
  // Every acquirer's stream waits for the fill, not only the first one's.
  u.memory->make_wait_for_ready(stream);
  prefetch_after(routed ? current_ : block);
  return view;
}

void Engine::Impl::release(std::uint32_t block, cuda::StreamHandle stream) {
  std::lock_guard lock(mutex_);
  TS_EXPECT(block < layout_.blocks.size(), std::out_of_range, "block ", block, " out of range");
  TS_EXPECT(places_ && (*places_)[block].pins > 0 && (*places_)[block].memory, std::logic_error,
            "release of block '", layout_.blocks[block].name, "' that is not acquired");
  auto& u = (*places_)[block];
  --u.pins;
  const auto now = now_ns();
  u.last_release_ns = now;
  if (!u.resident && acquired_at_ns_[block] > 0) {
    prefetcher_->record_compute(static_cast<double>(now - acquired_at_ns_[block]) / 1e9);
    trace_.record({SpanKind::kCompute, block, 0, acquired_at_ns_[block], now});
  }
  // Each holder's stream: the next fill of these bytes waits for all of them.
  u.memory->record_done(stream);
  places_->sync(block);
  changed_.notify_all();
}

void Engine::Impl::prefetch(std::uint32_t block) {
  std::lock_guard lock(mutex_);
  check_open();
  TS_EXPECT(block < layout_.blocks.size(), std::out_of_range, "block ", block, " out of range");
  prefetcher_->record_prefetch(block);
  prefetch_locked(block);
}

// ---- rows --------------------------------------------------------------------------------------

std::uint64_t Engine::Impl::max_rows(std::uint32_t block, std::uint32_t tensor) const {
  TS_EXPECT(block < layout_.blocks.size() && tensor < layout_.blocks[block].tensors.size(),
            std::out_of_range, "tensor ", tensor, " of block ", block, " out of range");
  const auto row = detail::RowReader::row_bytes(layout_.blocks[block].tensors[tensor]);
  return row == 0 ? 0 : plan_.arena_bytes / row;
}

RowsView Engine::Impl::acquire_rows(std::uint32_t block, std::uint32_t tensor,
                                    std::span<const std::int64_t> rows, cuda::StreamHandle stream) {
  TS_EXPECT(block < layout_.blocks.size() && tensor < layout_.blocks[block].tensors.size(),
            std::out_of_range, "tensor ", tensor, " of block ", block, " out of range");
  const auto& t = layout_.blocks[block].tensors[tensor];
  const auto row = detail::RowReader::row_bytes(t);
  TS_EXPECT(!rows.empty(), std::invalid_argument, "no rows of tensor '", t.name, "' asked for");
  const std::uint64_t bytes = rows.size() * row;
  const std::int64_t start = now_ns();
  std::uint32_t id = 0;
  detail::BlockBuffer* memory = nullptr;
  {
    std::unique_lock lock(mutex_);
    check_open();
    const auto capacity = places_->arena().capacity();
    TS_EXPECT(places_->arena().footprint(bytes) <= capacity, std::invalid_argument, rows.size(),
              " rows of tensor '", t.name, "' (", bytes, " bytes) do not fit the streaming arena (",
              capacity, " bytes): at most ", capacity / std::max<std::uint64_t>(row, 1),
              " at once");
    id = next_rows_++;
    if (next_rows_ == 0) next_rows_ = detail::kRowsBase;
    const auto deadline = Clock::now() + options_.wait_timeout;
    while (true) {
      auto where = places_->find_rows(bytes, rank());
      if (!where && cancel_queued_prefetches() > 0) where = places_->find_rows(bytes, rank());
      if (where) {
        dropped(places_->take_rows(id, bytes, *where));
        note_arena_use();
        break;
      }
      if (!wait_for_room(lock, deadline)) {
        throw Error(concat("rows of tensor '", t.name, "' timed out: the streaming arena (",
                           capacity, " bytes) has no room that is not held; held: ", held_units()));
      }
      check_open();
    }
    memory = places_->rows(id);
  }
  RowsView view;
  view.handle = id;
  view.rows = rows.size();
  view.row_bytes = row;
  try {
    if (cuda_device_) {
      std::lock_guard staging_lock(rows_staging_mutex_);
      if (!rows_staging_.data()) {
        rows_staging_ = allocate_buffer(std::make_shared<PinnedHostAllocator>(*cuda_device_),
                                        static_cast<std::size_t>(kRowsStagingBytes));
        rows_copied_.emplace(*cuda_device_);
      }
      const auto per_chunk = std::max<std::uint64_t>(kRowsStagingBytes / row, 1);
      TS_EXPECT(row <= kRowsStagingBytes, std::invalid_argument, "a row of tensor '", t.name, "' (",
                row, " bytes) is larger than the rows staging buffer");
      memory->order_after_uses(copy_stream_->handle());
      for (std::size_t i = 0; i < rows.size(); i += per_chunk) {
        const auto count = std::min<std::uint64_t>(per_chunk, rows.size() - i);
        rows_copied_->synchronize();  // the last copy out of the staging buffer is over
        rows_reader_->read(block, t, rows.subspan(i, count), rows_staging_.data());
        cuda::memcpy_htod_async(*cuda_device_, memory->device_ptr() + i * row, rows_staging_.data(),
                                static_cast<std::size_t>(count * row), copy_stream_->handle());
        rows_copied_->record(copy_stream_->handle());
      }
      memory->record_ready(copy_stream_->handle());
      memory->make_wait_for_ready(stream);
      view.device = memory->device_ptr();
    } else {
      std::byte* dest = memory->host();
      if (dest == nullptr) {
        // Reading in place, the arena is only counted: the rows get memory of their own.
        AlignedBuffer own(static_cast<std::size_t>(bytes));
        dest = own.data();
        std::lock_guard lock(mutex_);
        rows_memory_.emplace(id, std::move(own));
      }
      rows_reader_->read(block, t, rows, dest);
      view.host = dest;
    }
  } catch (...) {
    std::lock_guard lock(mutex_);
    places_->forget_rows(id);
    rows_memory_.erase(id);
    note_arena_use();
    changed_.notify_all();
    throw;
  }
  std::lock_guard lock(mutex_);
  ++stats_.row_reads;
  stats_.rows_read += rows.size();
  stats_.bytes_of_rows += bytes;
  trace_.record({SpanKind::kRead, block, bytes, start, now_ns()});
  return view;
}

void Engine::Impl::release_rows(std::uint64_t handle, cuda::StreamHandle stream) {
  std::lock_guard lock(mutex_);
  const auto id = static_cast<std::uint32_t>(handle);
  auto* memory =
      places_ && handle >= detail::kRowsBase && handle <= 0xFFFFFFFFu ? places_->rows(id) : nullptr;
  TS_EXPECT(memory != nullptr, std::logic_error, "release of rows ", handle,
            " that are not acquired");
  memory->record_done(stream);
  places_->release_rows(id);
  rows_memory_.erase(id);
  changed_.notify_all();
}

// ---- the fill workers --------------------------------------------------------------------------

void Engine::Impl::worker_loop() {
  while (true) {
    Job job{};
    {
      std::unique_lock lock(mutex_);
      jobs_ready_.wait(lock,
                       [&] { return closed_ || !demand_jobs_.empty() || !prefetch_jobs_.empty(); });
      if (closed_) return;
      auto& queue = demand_jobs_.empty() ? prefetch_jobs_ : demand_jobs_;
      job = queue.front();
      queue.pop_front();
      const auto& u = (*places_)[job.block];
      if (u.generation != job.generation || u.state != detail::UnitState::kFilling) continue;
      job.demand = u.demanded;
    }
    run_fill(job);
  }
}

void Engine::Impl::run_fill(const Job& job) {
  const std::int64_t start = now_ns();
  // The unit's memory belongs to this fill until it publishes: a unit being filled is never
  // displaced, and a job that started is never cancelled.
  detail::BlockBuffer* memory = nullptr;
  {
    std::lock_guard lock(mutex_);
    memory = &*(*places_)[job.block].memory;
  }
  std::optional<detail::FillError> error;
  detail::FillReport report;
  try {
    memory->finish_previous_copy();
    readers_->reader(job.block).fill(detail::FillOrder{job.block, job.demand}, *memory, report);
  } catch (...) {
    error = detail::FillError::capture();
  }
  std::lock_guard lock(mutex_);
  stats_.bytes_from_storage += report.bytes_from_storage;
  stats_.bytes_from_page_cache += report.bytes_from_page_cache;
  stats_.bytes_from_ram_tier += report.bytes_from_ram_tier;
  stats_.gds_bytes += report.gds_bytes;
  stats_.bytes_read_compressed += report.compressed_bytes_read;
  stats_.bytes_decoded += report.bytes_decoded;
  stats_.decode_seconds += report.decode_seconds;
  stats_.io_seconds += report.io_seconds;
  const double seconds = seconds_since(start);
  auto& u = (*places_)[job.block];
  if (u.generation != job.generation) return;  // cannot happen; kept as a guard
  if (error) {
    u.state = detail::UnitState::kFailed;
    u.error = std::move(error);
    ++stats_.failures;
  } else {
    u.state = detail::UnitState::kReady;
    ++stats_.fills;
    stats_.bytes_to_device += places_->bytes(job.block);
    stats_.fill_seconds += seconds;
    stats_.block_load_seconds[job.block] = seconds;
    if (!u.resident) prefetcher_->record_fill(seconds);
  }
  places_->sync(job.block);
  changed_.notify_all();
}

// ---- closing and statistics --------------------------------------------------------------------

void Engine::Impl::close() {
  {
    std::lock_guard lock(mutex_);
    if (closed_) return;
    closed_ = true;
    for (auto* queue : {&demand_jobs_, &prefetch_jobs_}) {
      for (const auto& job : *queue) {
        auto& u = (*places_)[job.block];
        if (u.generation != job.generation) continue;
        u.state = detail::UnitState::kFailed;
        u.error = detail::FillError{detail::FillError::Kind::kError, "engine closed", 0};
      }
      queue->clear();
    }
  }
  jobs_ready_.notify_all();
  changed_.notify_all();
  for (auto& w : workers_) w.join();
  workers_.clear();
  if (copy_stream_) {
    try {
      copy_stream_->synchronize();
    } catch (const std::exception&) {
    }
  }
  std::lock_guard lock(mutex_);
  if (places_) places_->release_copy_sources();
  places_.reset();
  rows_memory_.clear();
  rows_staging_ = AlignedBuffer();
  rows_copied_.reset();
  rows_reader_.reset();
  stats_.device_bytes_in_use = 0;
  stats_.arena_bytes_in_use = 0;
  if (readers_) readers_->close();
}

EngineStats Engine::Impl::stats() const {
  std::lock_guard lock(mutex_);
  EngineStats out = stats_;
  out.ram_tier = readers_->ram_tier_stats();
  out.io = readers_->io_stats();
  out.backend = readers_->backend_name();
  out.in_place = readers_->in_place();
  out.backend_note = readers_->backend_note();
  out.gds_reason = readers_->gds_reason();
  // How compressed units are read: decoded on the fills (the readers say how), or the copy.
  out.decode_note = readers_->decode_note(out);
  if (!compressed_note_.empty()) {
    out.decode_note += (out.decode_note.empty() ? "" : "; ") + compressed_note_;
  }
  out.decode_threads = decoded_copy_ ? decoded_copy_->threads() : readers_->decode_threads();
  out.gds = readers_->gds().outcome();
  out.order_learned = prefetcher_->order_learned();
  out.prefetch_depth = prefetcher_->depth();
  out.use_rates.resize(layout_.blocks.size());
  for (std::uint32_t b = 0; b < out.use_rates.size(); ++b) {
    out.use_rates[b] = prefetcher_->use_rate(b);
  }
  return out;
}

std::string Engine::Impl::trace_json() const {
  return trace_.to_chrome_json([this](std::uint32_t b) {
    return b < layout_.blocks.size() ? layout_.blocks[b].name : std::to_string(b);
  });
}

// ---- the facade --------------------------------------------------------------------------------

Engine::Engine(const std::filesystem::path& store_path, EngineOptions options)
    : impl_(std::make_unique<Impl>(layout_of_store(store_path), std::move(options))) {}
Engine Engine::from_store(const std::filesystem::path& store_path, EngineOptions options,
                          const TensorGroups& groups) {
  return Engine(std::make_unique<Impl>(layout_of_store(store_path, groups), std::move(options)));
}
Engine::Engine(std::unique_ptr<Impl> impl) noexcept : impl_(std::move(impl)) {}
Engine Engine::from_safetensors(const std::filesystem::path& path, EngineOptions options,
                                const TensorGroups& groups) {
  return Engine(std::make_unique<Impl>(layout_of_safetensors(path, groups), std::move(options)));
}
Engine::~Engine() = default;
Engine::Engine(Engine&&) noexcept = default;
Engine& Engine::operator=(Engine&&) noexcept = default;
// With check_invariants, each call is followed by the check, also when it fails (a failure
// path is where bookkeeping goes wrong); a broken invariant replaces the call's own error.
BlockView Engine::acquire(std::uint32_t block, cuda::StreamHandle stream) {
  if (!impl_->checks_invariants()) return impl_->acquire(block, stream);
  BlockView view;
  try {
    view = impl_->acquire(block, stream);
  } catch (...) {
    impl_->check_after("acquire", block);
    throw;
  }
  impl_->check_after("acquire", block);
  return view;
}
void Engine::release(std::uint32_t block, cuda::StreamHandle stream) {
  if (!impl_->checks_invariants()) return impl_->release(block, stream);
  try {
    impl_->release(block, stream);
  } catch (...) {
    impl_->check_after("release", block);
    throw;
  }
  impl_->check_after("release", block);
}
void Engine::prefetch(std::uint32_t block) {
  if (!impl_->checks_invariants()) return impl_->prefetch(block);
  try {
    impl_->prefetch(block);
  } catch (...) {
    impl_->check_after("prefetch", block);
    throw;
  }
  impl_->check_after("prefetch", block);
}
RowsView Engine::acquire_rows(std::uint32_t block, std::uint32_t tensor,
                              std::span<const std::int64_t> rows, cuda::StreamHandle stream) {
  return impl_->acquire_rows(block, tensor, rows, stream);
}
void Engine::release_rows(std::uint64_t handle, cuda::StreamHandle stream) {
  impl_->release_rows(handle, stream);
}
std::uint64_t Engine::max_rows(std::uint32_t block, std::uint32_t tensor) const {
  return impl_->max_rows(block, tensor);
}
void Engine::close() { impl_->close(); }
std::size_t Engine::block_count() const noexcept { return impl_->layout_.blocks.size(); }
const std::string& Engine::block_name(std::uint32_t block) const {
  TS_EXPECT(block < impl_->layout_.blocks.size(), std::out_of_range, "block ", block,
            " out of range");
  return impl_->layout_.blocks[block].name;
}
std::vector<TensorPlacement> Engine::tensors(std::uint32_t block) const {
  TS_EXPECT(block < impl_->layout_.blocks.size(), std::out_of_range, "block ", block,
            " out of range");
  return impl_->layout_.blocks[block].tensors;
}
const ResidencyPlan& Engine::plan() const noexcept { return impl_->plan_; }
EngineStats Engine::stats() const { return impl_->stats(); }
std::string Engine::trace_json() const { return impl_->trace_json(); }

}  // namespace tensorstream::engine
