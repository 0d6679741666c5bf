// Engine::Impl: the scheduler at the centre of the engine. It keeps acquire and release, the
// fill workers and their two job queues, close and the statistics, and delegates everything
// else:
//
//   source_layout.hpp   what to stream: files, blocks, extents, tensor placements
//   read_paths.hpp      which reader fills each block (host, in place, GDS), and why
//   slot_ring.hpp       where blocks live in device memory, what each place holds
//   device_buffers.hpp  the places' memory and their ready/done events
//   prefetcher.hpp      which blocks to fill ahead
//
// Which calls may block, and thread-safety (every public call of Engine is thread-safe):
//   acquire()     blocks while its block is not yet loaded, or while every slot stays held
//                 (each wait bounded by wait_timeout); never waits for a copy on the host
//   release()     does not block (on a GPU it records an event on the caller's stream)
//   prefetch()    does not block
//   close()       blocks until the fills in progress end (each bounded by wait_timeout) and
//                 the copy stream is idle; idempotent
//   stats(), trace_json(), block_count(), block_name(), tensors(), plan()  do not block on I/O
// A fill runs on a fill worker without mutex_ (reading, copying, waiting on events); it takes
// mutex_ only to publish its outcome.
//
// Locks. mutex_ guards the engine's mutable state (marked "guarded by mutex_" below). Members
// marked "immutable" are set in the constructor and only read afterwards. The readers guard
// their own shared state with internal locks, which may be taken while mutex_ is held
// (stats(), a slot's drop) but never take mutex_ themselves: the order is mutex_ first.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "tensorstream/engine/detail/prefetcher.hpp"
#include "tensorstream/engine/detail/read_paths.hpp"
#include "tensorstream/engine/detail/slot_ring.hpp"
#include "tensorstream/engine/engine.hpp"
#include "tensorstream/engine/trace.hpp"

namespace tensorstream::engine {

class Engine::Impl {
 public:
  /// Validates `options`, plans residency (BudgetTooSmall names the minimum), opens the
  /// source through its readers, allocates the buffers and starts the fill workers.
  Impl(Layout layout, EngineOptions options);
  ~Impl() { close(); }
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;

  BlockView acquire(std::uint32_t block, cuda::StreamHandle stream);
  void release(std::uint32_t block, cuda::StreamHandle stream);
  void prefetch(std::uint32_t block);
  void close();
  [[nodiscard]] EngineStats stats() const;
  [[nodiscard]] std::string trace_json() const;

  /// EngineOptions::check_invariants: whether the facade calls check_after().
  [[nodiscard]] bool checks_invariants() const noexcept { return options_.check_invariants; }
  /// Checks the engine's invariants (detail/invariants.hpp) after `call` of `block` and
  /// counts the check (stats().invariant_checks); throws Error naming the call, the block and
  /// the broken invariant. Takes mutex_; nothing once closed. Defined in invariants.cpp.
  void check_after(std::string_view call, std::uint32_t block);

  const Layout layout_;  // immutable
  ResidencyPlan plan_;   // immutable after the constructor

 private:
  /// A fill to run: which place, for which block, of which assignment.
  struct Job {
    std::size_t place = 0;
    std::uint32_t block = 0;
    std::uint64_t generation = 0;
    // Taken under mutex_ when the job starts, so the fill reads no shared state unlocked.
    bool demand = false;
    bool wait_for_release = false;
  };

  // All of these run with mutex_ held.
  void check_open() const;
  void assign(std::size_t place, std::uint32_t block);
  void schedule_fill(std::size_t place, std::uint32_t block, bool demand);
  std::optional<std::size_t> cancel_queued_prefetch();
  void prefetch_locked(std::uint32_t block);
  void prefetch_after(std::uint32_t block);
  [[nodiscard]] BlockView view_of(const detail::Slot& slot, std::uint32_t block) const;

  // The fill workers: take a job under mutex_, run it without.
  void worker_loop();
  void run_fill(const Job& job);

  const EngineOptions options_;               // immutable
  std::optional<cuda::Device> cuda_device_;   // immutable; unset on the CPU
  std::optional<cuda::Stream> copy_stream_;   // immutable; the fills' copies go here
  TraceLog trace_;                            // thread-safe
  std::optional<detail::ReadPaths> readers_;  // set in the constructor; fills use it
                                              // unlocked, close() and stats() under mutex_
  std::optional<detail::SlotRing> ring_;      // guarded by mutex_ (a place's memory: see
                                              // BlockBuffer); set in the constructor

  mutable std::mutex mutex_;
  std::condition_variable changed_;               // place states and pins changed; closing
  std::condition_variable jobs_ready_;            // a job was queued; closing
  std::deque<Job> demand_jobs_;                   // guarded by mutex_
  std::deque<Job> prefetch_jobs_;                 // guarded by mutex_
  bool closed_ = false;                           // guarded by mutex_
  std::optional<detail::Prefetcher> prefetcher_;  // guarded by mutex_
  std::vector<std::uint32_t> to_prefetch_;        // guarded by mutex_ (scratch of acquire)
  std::vector<std::int64_t> acquired_at_ns_;      // guarded by mutex_; per block
  EngineStats stats_;                             // guarded by mutex_
  std::vector<std::thread> workers_;              // started last; joined by close()
};

}  // namespace tensorstream::engine
