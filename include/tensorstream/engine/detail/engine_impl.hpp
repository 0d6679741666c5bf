// Engine::Impl: the scheduler at the centre of the engine. It keeps acquire and release, the
// fill workers and their two job queues, close and the statistics, and delegates everything
// else:
//
//   source_layout.hpp   what to stream: files, blocks, extents, tensor placements
//   decoded_copy.hpp    compressed units decoded once into a temporary copy, where that pays
//   read_paths.hpp      which reader fills each unit (host, in place, GDS), and why
//   unit_places.hpp     where units live in device memory (resident buffers, arena places)
//   device_buffers.hpp  their memory and ready/done events
//   prefetcher.hpp      which units to fill ahead, and how soon each is needed again
//   row_reader.hpp      the rows of a tensor (acquire_rows)
//
// Which calls may block, and thread-safety (every public call of Engine is thread-safe):
//   acquire()     blocks while its unit is not yet loaded, or while the arena has no room
//                 that is not held (each wait bounded by wait_timeout); never waits for a
//                 copy on the host
//   acquire_rows() blocks while the rows are read (and waits for room like acquire())
//   release_rows() does not block
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

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "tensorstream/engine/detail/decoded_copy.hpp"
#include "tensorstream/engine/detail/prefetcher.hpp"
#include "tensorstream/engine/detail/read_paths.hpp"
#include "tensorstream/engine/detail/row_reader.hpp"
#include "tensorstream/engine/detail/unit_places.hpp"
#include "tensorstream/engine/engine.hpp"
#include "tensorstream/engine/trace.hpp"
#include "tensorstream/host_memory.hpp"

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
  RowsView acquire_rows(std::uint32_t block, std::uint32_t tensor,
                        std::span<const std::int64_t> rows, cuda::StreamHandle stream);
  void release_rows(std::uint64_t handle, cuda::StreamHandle stream);
  [[nodiscard]] std::uint64_t max_rows(std::uint32_t block, std::uint32_t tensor) const;
  void close();
  [[nodiscard]] EngineStats stats() const;
  [[nodiscard]] std::string trace_json() const;

  /// EngineOptions::check_invariants: whether the facade calls check_after().
  [[nodiscard]] bool checks_invariants() const noexcept { return options_.check_invariants; }
  /// Checks the engine's invariants (detail/invariants.hpp) after `call` of `block` and
  /// counts the check (stats().invariant_checks); throws Error naming the call, the block and
  /// the broken invariant. Takes mutex_; nothing once closed. Defined in invariants.cpp.
  void check_after(std::string_view call, std::uint32_t block);

  using Clock = std::chrono::steady_clock;

  Layout layout_;       // immutable after the constructor (packed for the device there)
  ResidencyPlan plan_;  // immutable after the constructor

 private:
  /// A fill to run: which unit, of which placement.
  struct Job {
    std::uint32_t block = 0;
    std::uint64_t generation = 0;
    // Taken under mutex_ when the job starts, so the fill reads no shared state unlocked.
    bool demand = false;
  };

  // All of these run with mutex_ held.
  void check_open() const;
  [[nodiscard]] detail::Arena::Rank rank() const;
  /// Gives streamed `block` a place (displacing what the arena chose); false if none now.
  bool place(std::uint32_t block, bool demand);
  void dropped(const std::vector<detail::UnitPlaces::Displaced>& displaced);
  void schedule_fill(std::uint32_t block, bool demand);
  /// Drops every queued prefetch that has not started (their places free up); how many.
  std::size_t cancel_queued_prefetches();
  /// Waits on changed_ until `deadline`; false at the deadline.
  bool wait_for_room(std::unique_lock<std::mutex>& lock, Clock::time_point deadline);
  /// False if `block` could not be prefetched for want of room (the walk stops there).
  bool prefetch_locked(std::uint32_t block);
  void prefetch_after(std::uint32_t block);
  void note_arena_use();
  [[nodiscard]] std::string held_units() const;
  [[nodiscard]] BlockView view_of(const detail::Unit& unit, std::uint32_t block) const;

  // The fill workers: take a job under mutex_, run it without.
  void worker_loop();
  void run_fill(const Job& job);

  const EngineOptions options_;                      // immutable
  std::optional<cuda::Device> cuda_device_;          // immutable; unset on the CPU
  std::optional<cuda::Stream> copy_stream_;          // immutable; the fills' copies go here
  TraceLog trace_;                                   // thread-safe
  std::size_t compressed_units_ = 0;                 // immutable: units with compressed chunks
  std::string compressed_note_;                      // immutable: how they are read, and why
  std::optional<detail::DecodedCopy> decoded_copy_;  // immutable; outlives the readers
  std::optional<detail::ReadPaths> readers_;         // set in the constructor; fills use it
                                                     // unlocked, close() and stats() under mutex_
  std::optional<detail::UnitPlaces> places_;         // guarded by mutex_ (a unit's memory: see
                                                     // BlockBuffer); set in the constructor
  std::optional<detail::RowReader> rows_reader_;     // immutable after the constructor;
                                                     // thread-safe

  mutable std::mutex mutex_;
  std::condition_variable changed_;               // place states and pins changed; closing
  std::condition_variable jobs_ready_;            // a job was queued; closing
  std::deque<Job> demand_jobs_;                   // guarded by mutex_
  std::deque<Job> prefetch_jobs_;                 // guarded by mutex_
  bool closed_ = false;                           // guarded by mutex_
  std::optional<detail::Prefetcher> prefetcher_;  // guarded by mutex_
  std::vector<std::uint32_t> to_prefetch_;        // guarded by mutex_ (scratch of acquire)
  std::vector<std::int64_t> acquired_at_ns_;      // guarded by mutex_; per block
  std::uint32_t current_ = 0;                     // guarded by mutex_: the last acquired
  std::uint32_t next_rows_ = detail::kRowsBase;   // guarded by mutex_: ids of rows places
  EngineStats stats_;                             // guarded by mutex_
  // Rows read in place have memory of their own (the arena is only counted there).
  std::map<std::uint32_t, AlignedBuffer> rows_memory_;  // guarded by mutex_
  // A GPU: the pinned buffer rows are gathered in, and the event of its last copy out.
  std::mutex rows_staging_mutex_;
  AlignedBuffer rows_staging_;              // guarded by rows_staging_mutex_
  std::optional<cuda::Event> rows_copied_;  // guarded by rows_staging_mutex_
  std::vector<std::thread> workers_;        // started last; joined by close()
};

}  // namespace tensorstream::engine
