#include "tensorstream/engine/engine.hpp"

#include <algorithm>
#include <chrono>
#include <utility>

#include "tensorstream/engine/detail/engine_impl.hpp"
#include "tensorstream/errors.hpp"

namespace tensorstream::engine {

using Clock = std::chrono::steady_clock;
using detail::Slot;
using detail::SlotState;
using tensorstream::detail::concat;

namespace {

constexpr unsigned kFillWorkers = 2;

double seconds_since(std::int64_t start_ns) {
  return static_cast<double>(now_ns() - start_ns) / 1e9;
}

// The caller mistakes refused before any file or device is touched; returns the device's
// ordinal (-1: the CPU).
int validated_device(const EngineOptions& options) {
  TS_EXPECT(options.slots >= 2, std::invalid_argument, "slots must be at least 2, got ",
            options.slots);
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

std::vector<std::uint64_t> block_sizes(const Layout& layout) {
  std::vector<std::uint64_t> sizes;
  sizes.reserve(layout.blocks.size());
  for (const auto& b : layout.blocks) sizes.push_back(b.size);
  return sizes;
}

}  // namespace

// ---- construction ----------------------------------------------------------------------------

Engine::Impl::Impl(Layout layout, EngineOptions options)
    : layout_(std::move(layout)), options_(std::move(options)), trace_(options_.trace_capacity) {
  const int ordinal = validated_device(options_);
  const auto sizes = block_sizes(layout_);
  try {
    plan_ = plan_residency(sizes, options_.device_budget, options_.slots);
  } catch (const BudgetTooSmall& e) {
    throw BudgetTooSmall(concat(layout_.kind, " '", layout_.source.string(), "' on ",
                                options_.device, ": ", e.what()),
                         e.minimum_budget());
  }
  if (ordinal >= 0) {
    cuda_device_.emplace(ordinal);
    copy_stream_.emplace(*cuda_device_);
  }
  const cuda::Device* device = cuda_device_ ? &*cuda_device_ : nullptr;
  readers_.emplace(layout_, options_, device, copy_stream_ ? &*copy_stream_ : nullptr, trace_);
  ring_.emplace(plan_, detail::allocate_block_buffers(plan_, sizes, device, options_.device_memory,
                                                      readers_->buffers_need_memory()));
  const auto largest = sizes.empty() ? 0 : *std::max_element(sizes.begin(), sizes.end());
  readers_->prepare(*ring_, largest, kFillWorkers);
  prefetcher_.emplace(options_.prefetch, options_.prefetch_depth, plan_.resident, plan_.slots);

  const auto n = layout_.blocks.size();
  acquired_at_ns_.assign(n, 0);
  stats_.block_load_seconds.assign(n, 0.0);
  stats_.device_bytes_in_use = ring_->bytes();
  stats_.device_bytes_peak = stats_.device_bytes_in_use;
  stats_.device_budget = options_.device_budget;
  stats_.gds_mode = options_.gds;
  stats_.gds_files = readers_->gds().used_files();
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

BlockView Engine::Impl::view_of(const Slot& slot, std::uint32_t block) const {
  BlockView view;
  view.block = block;
  view.size = layout_.blocks[block].size;
  view.resident = slot.resident;
  view.host = readers_->reader(block).host_bytes(block, slot.memory);
  view.device = slot.memory.device_ptr();
  return view;
}

void Engine::Impl::assign(std::size_t place, std::uint32_t block) {
  const auto previous = ring_->assign(place, block);
  if (previous.prefetch_wasted) ++stats_.prefetches_wasted;
  // The slot's old block leaves device memory (reading in place: the process's memory).
  if (previous.displaced) readers_->reader(*previous.displaced).drop(*previous.displaced);
}

// A demand found no free slot: take one whose prefetch has not started yet (the newest, as
// it is needed last). Its job is dropped; a read in flight is never interrupted.
std::optional<std::size_t> Engine::Impl::cancel_queued_prefetch() {
  for (auto it = prefetch_jobs_.rbegin(); it != prefetch_jobs_.rend(); ++it) {
    Slot& s = (*ring_)[it->place];
    if (s.resident || s.pins > 0 || s.generation != it->generation) continue;
    const auto place = it->place;
    prefetch_jobs_.erase(std::next(it).base());
    ++stats_.prefetches_cancelled;
    s.prefetched_unused = false;  // not wasted: it was never read
    s.state = SlotState::kEmpty;
    return place;
  }
  return std::nullopt;
}

void Engine::Impl::schedule_fill(std::size_t place, std::uint32_t block, bool demand) {
  Slot& s = (*ring_)[place];
  s.state = SlotState::kFilling;
  s.demanded = demand;
  (demand ? demand_jobs_ : prefetch_jobs_).push_back({place, block, s.generation});
  jobs_ready_.notify_one();
}

void Engine::Impl::prefetch_locked(std::uint32_t block) {
  if (ring_->find(block)) return;  // present or on its way
  auto place = ring_->resident_place(block);
  if (!place) place = ring_->pick_slot(/*for_demand=*/false);
  if (!place) return;
  assign(*place, block);
  (*ring_)[*place].prefetched_unused = true;
  ++stats_.prefetches_issued;
  schedule_fill(*place, block, false);
}

void Engine::Impl::prefetch_after(std::uint32_t block) {
  prefetcher_->next_blocks(block, to_prefetch_);
  for (const auto b : to_prefetch_) prefetch_locked(b);
}

// ---- the consumer's calls ----------------------------------------------------------------------

BlockView Engine::Impl::acquire(std::uint32_t block, cuda::StreamHandle stream) {
  std::unique_lock lock(mutex_);
  check_open();
  TS_EXPECT(block < layout_.blocks.size(), std::out_of_range, "block ", block, " out of range (",
            layout_.blocks.size(), " blocks in '", layout_.source.string(), "')");
  ++stats_.acquires;
  prefetcher_->record_acquire(block);
  const auto deadline = Clock::now() + options_.wait_timeout;
  const std::int64_t start = now_ns();
  bool waited = false;
  std::size_t place = 0;
  while (true) {
    if (!ring_->find(block)) {
      auto target = ring_->resident_place(block);
      if (!target) target = ring_->pick_slot(/*for_demand=*/true);
      if (!target) target = cancel_queued_prefetch();
      if (!target) {
        waited = true;
        if (changed_.wait_until(lock, deadline) == std::cv_status::timeout) {
          throw Error(concat("acquire of block '", layout_.blocks[block].name, "' timed out: all ",
                             plan_.slots, " streaming slots stay held; release blocks first"));
        }
        check_open();
        continue;
      }
      assign(*target, block);
      schedule_fill(*target, block, /*demand=*/true);
    }
    place = *ring_->find(block);
    Slot& s = (*ring_)[place];
    if (s.state == SlotState::kFilling && !s.demanded) {
      // A prefetch in the queue becomes a demand: move it ahead of other prefetches.
      for (auto it = prefetch_jobs_.begin(); it != prefetch_jobs_.end(); ++it) {
        if (it->place == place && it->generation == s.generation) {
          demand_jobs_.push_back(*it);
          prefetch_jobs_.erase(it);
          break;
        }
      }
      s.demanded = true;
    }
    ++s.pins;
    while (s.state == SlotState::kFilling) {
      waited = true;
      if (changed_.wait_until(lock, deadline) == std::cv_status::timeout) {
        --s.pins;
        changed_.notify_all();
        throw Error(concat("block '", layout_.blocks[block].name, "' of '", layout_.source.string(),
                           "' was not loaded within ", options_.wait_timeout.count(), " ms"));
      }
    }
    if (closed_) {
      --s.pins;
      check_open();
    }
    if (s.state == SlotState::kFailed) {
      const detail::FillError error = *s.error;
      --s.pins;
      // Forget the failed fill so that the next acquire reads the block again.
      if (!s.resident) readers_->reader(block).drop(block);
      ring_->forget(place, block);
      changed_.notify_all();
      error.raise();
    }
    if (s.state == SlotState::kReady && s.block == static_cast<std::int64_t>(block)) break;
    --s.pins;  // the place was reassigned while we waited; start over
  }
  Slot& s = (*ring_)[place];
  if (s.prefetched_unused) {
    s.prefetched_unused = false;
    ++stats_.prefetches_used;
  }
  if (waited) {
    ++stats_.device_misses;
    const auto end = now_ns();
    stats_.stall_seconds += static_cast<double>(end - start) / 1e9;
    trace_.record({SpanKind::kStall, block, 0, start, end});
  } else {
    ++stats_.device_hits;
  }
  acquired_at_ns_[block] = now_ns();
  const BlockView view = view_of(s, block);
  s.memory.make_wait_for_ready(stream);
  prefetch_after(block);
  return view;
}

void Engine::Impl::release(std::uint32_t block, cuda::StreamHandle stream) {
  std::lock_guard lock(mutex_);
  TS_EXPECT(block < layout_.blocks.size(), std::out_of_range, "block ", block, " out of range");
  const auto place = ring_ ? ring_->find(block) : std::nullopt;
  TS_EXPECT(place && (*ring_)[*place].pins > 0, std::logic_error, "release of block '",
            layout_.blocks[block].name, "' that is not acquired");
  Slot& s = (*ring_)[*place];
  --s.pins;
  const auto now = now_ns();
  s.last_release_ns = now;
  if (!s.resident && acquired_at_ns_[block] > 0) {
    prefetcher_->record_compute(static_cast<double>(now - acquired_at_ns_[block]) / 1e9);
    trace_.record({SpanKind::kCompute, block, 0, acquired_at_ns_[block], now});
  }
  if (s.memory.record_done(stream)) s.done_recorded = true;
  changed_.notify_all();
}

void Engine::Impl::prefetch(std::uint32_t block) {
  std::lock_guard lock(mutex_);
  check_open();
  TS_EXPECT(block < layout_.blocks.size(), std::out_of_range, "block ", block, " out of range");
  prefetch_locked(block);
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
      const Slot& s = (*ring_)[job.place];
      if (s.generation != job.generation) continue;  // cancelled
      job.demand = s.demanded;
      job.wait_for_release = s.done_recorded;
    }
    run_fill(job);
  }
}

void Engine::Impl::run_fill(const Job& job) {
  const std::int64_t start = now_ns();
  // The place's memory belongs to this fill until it publishes (places never move).
  Slot& slot = (*ring_)[job.place];
  std::optional<detail::FillError> error;
  detail::FillReport report;
  try {
    slot.memory.finish_previous_copy();
    readers_->reader(job.block).fill(detail::FillOrder{job.block, job.demand, job.wait_for_release},
                                     slot.memory, report);
  } catch (...) {
    error = detail::FillError::capture();
  }
  std::lock_guard lock(mutex_);
  stats_.bytes_from_storage += report.bytes_from_storage;
  stats_.bytes_from_page_cache += report.bytes_from_page_cache;
  stats_.bytes_from_ram_tier += report.bytes_from_ram_tier;
  stats_.gds_bytes += report.gds_bytes;
  stats_.io_seconds += report.io_seconds;
  const double seconds = seconds_since(start);
  if (slot.generation != job.generation) return;  // reassigned meanwhile
  const auto& info = layout_.blocks[job.block];
  if (error) {
    slot.state = SlotState::kFailed;
    slot.error = std::move(error);
    ++stats_.failures;
  } else {
    slot.state = SlotState::kReady;
    ++stats_.fills;
    stats_.bytes_to_device += info.size;
    stats_.fill_seconds += seconds;
    stats_.block_load_seconds[job.block] = seconds;
    if (!slot.resident) prefetcher_->record_fill(seconds);
  }
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
        (*ring_)[job.place].state = SlotState::kFailed;
        (*ring_)[job.place].error =
            detail::FillError{detail::FillError::Kind::kError, "engine closed", 0};
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
  if (ring_) {
    for (std::size_t p = 0; p < ring_->size(); ++p) (*ring_)[p].memory.release_copy_source();
  }
  ring_.reset();
  stats_.device_bytes_in_use = 0;
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
  out.gds_reason = readers_->gds().reason();
  out.gds = readers_->gds().outcome();
  out.order_learned = prefetcher_->order_learned();
  out.prefetch_depth = prefetcher_->depth();
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
