// Internals shared by the I/O backends: the state behind a ReadTicket, the requests a read
// is split into, the two-level request queue, the worker pool of the pread and mmap
// backends, and the counters behind IoStats. Not part of the public API.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "tensorstream/detail/error_value.hpp"
#include "tensorstream/detail/file.hpp"
#include "tensorstream/io/backend.hpp"

namespace tensorstream::io::detail {

using Clock = std::chrono::steady_clock;

/// The counters behind IoStats. Shared (shared_ptr) with every ReadState so that a ticket
/// completed after its backend is gone still has somewhere to count.
struct Counters {
  std::atomic<std::uint64_t> bytes_read{0};
  std::atomic<std::uint64_t> requests{0};
  std::atomic<std::uint64_t> reads_direct{0};
  std::atomic<std::uint64_t> reads_buffered{0};
  std::atomic<std::uint64_t> submitted{0};
  std::atomic<std::uint64_t> completed{0};
  std::atomic<std::uint64_t> failed{0};
  std::atomic<std::uint64_t> cancelled{0};

  /// A request starts / ends executing (busy time is wall time with at least one running).
  void io_begin() noexcept;
  void io_end() noexcept;
  [[nodiscard]] double busy_seconds() const;

 private:
  mutable std::mutex busy_mutex_;
  unsigned active_ = 0;
  Clock::time_point since_{};
  Clock::duration busy_{};
};

/// A file opened by a backend. Subclasses add descriptors or a mapping.
struct OpenFile {
  OpenFile() = default;
  OpenFile(const OpenFile&) = delete;
  OpenFile& operator=(const OpenFile&) = delete;
  virtual ~OpenFile() = default;

  /// Size readable for a read ending at `end`: the cached size if `end` fits in it, else
  /// the size now (the file may have grown). Throws IoError if fstat fails.
  virtual std::uint64_t readable_size(std::uint64_t end);
  [[nodiscard]] virtual bool direct() const noexcept { return false; }
  [[nodiscard]] virtual std::string direct_note() const { return {}; }

  std::uint32_t id = 0;
  std::filesystem::path path;
  tensorstream::detail::FileDescriptor fd;  ///< buffered, read-only
  std::atomic<std::uint64_t> size{0};
};

/// Size of the open file `fd` now (regular file: st_size; block device: BLKGETSIZE64).
std::uint64_t current_size(const tensorstream::detail::FileDescriptor& fd);

/// The shared state of one submitted read: what the ticket waits on.
class ReadState {
 public:
  ReadState(std::shared_ptr<OpenFile> file, std::uint64_t offset, std::uint64_t size, ReadPlan plan,
            std::byte* dest, std::shared_ptr<Counters> counters, std::weak_ptr<RequestQueue> queue,
            std::function<void(std::exception_ptr)> on_complete);
  ReadState(const ReadState&) = delete;
  ReadState& operator=(const ReadState&) = delete;

  /// The file; valid until the read completes (requests use it while they run).
  [[nodiscard]] OpenFile& file() const noexcept { return *file_; }
  [[nodiscard]] std::uint64_t offset() const noexcept { return offset_; }
  [[nodiscard]] std::uint64_t size() const noexcept { return size_; }
  [[nodiscard]] const ReadPlan& plan() const noexcept { return plan_; }
  [[nodiscard]] std::byte* dest() const noexcept { return dest_; }

  /// True once the read failed or was cancelled: requests not started must be dropped.
  [[nodiscard]] bool stopped() const noexcept { return stop_.load(std::memory_order_acquire); }

  /// Sets the number of requests (before they are queued); 0 completes the read now.
  void start(std::uint32_t requests) noexcept;
  /// Records `error` unless an error is already recorded (the first one wins) and stops
  /// the requests not started. `cancelled` marks a Cancelled error for the counters.
  void fail(std::exception_ptr error, bool cancelled = false) noexcept;
  /// One request is over (done, failed or dropped); the last one completes the read.
  void finish_request() noexcept;
  /// See ReadTicket::cancel.
  bool cancel() noexcept;

  [[nodiscard]] bool ready() const noexcept { return done_flag_.load(std::memory_order_acquire); }
  /// Blocks until complete; throws a fresh exception of the error's type and message (each
  /// waiter its own: an exception object caught in two threads at once is a data race in
  /// the C++ runtime, which updates the object's handler count unsynchronised).
  void wait() const;
  [[nodiscard]] bool wait_for(std::chrono::nanoseconds timeout) const;

  /// "read of N bytes at offset X from 'path'" (while the file is known).
  [[nodiscard]] std::string describe() const;

 private:
  void complete() noexcept;

  std::shared_ptr<OpenFile> file_;  // released on completion so fds close promptly
  const std::uint64_t offset_;
  const std::uint64_t size_;
  const ReadPlan plan_;
  std::byte* const dest_;
  const std::shared_ptr<Counters> counters_;
  const std::weak_ptr<RequestQueue> queue_;
  std::function<void(std::exception_ptr)> on_complete_;

  std::atomic<bool> stop_{false};
  std::atomic<std::uint32_t> pending_{0};
  std::atomic<bool> done_flag_{false};
  mutable std::mutex mutex_;
  mutable std::condition_variable cv_;
  bool done_ = false;
  bool cancelled_ = false;
  std::exception_ptr error_;  // handed to on_complete only
  // The error as data, captured when it is recorded (by the one thread that recorded it).
  tensorstream::detail::ErrorValue failure_;
};

/// One piece of a read: at most request_size bytes, on aligned boundaries.
struct Request {
  std::shared_ptr<ReadState> state;
  std::uint64_t offset = 0;   ///< file offset of the piece (aligned)
  std::uint64_t length = 0;   ///< bytes to transfer (aligned)
  std::uint64_t head = 0;     ///< leading bytes that were not requested (first piece: skip)
  std::uint64_t need = 0;     ///< bytes from the start that must arrive (≤ length)
  std::byte* dest = nullptr;  ///< where byte 0 of the piece goes
};

/// Pending requests in two FIFO levels (kHigh before kNormal). Thread-safe.
class RequestQueue {
 public:
  /// Queues `requests` (of reads that are not stopped) at `priority`. After shutdown the
  /// requests are dropped and their reads fail with Cancelled.
  void push(std::vector<Request>&& requests, Priority priority);
  /// Blocks until a request is available (nullopt once shut down).
  std::optional<Request> pop();
  /// A request if one is queued, else nullopt.
  std::optional<Request> try_pop();
  /// Drops the queued requests of `state` (cancelled) and wakes sleepers.
  void purge(const ReadState& state) noexcept;
  /// Drops everything queued (reads fail with Cancelled), refuses further pushes and wakes
  /// everyone. Idempotent.
  void shutdown() noexcept;
  [[nodiscard]] bool stopping() const noexcept;
  /// Sleeps until `deadline`; returns false early if `state` stops or the queue shuts down.
  bool sleep_until(Clock::time_point deadline, const ReadState& state);
  /// Called (under the queue's lock, so it must be quick and must not call back) after
  /// each push and purge and at shutdown; never after shutdown. For the io_uring thread.
  void set_wake_hook(std::function<void()> hook);

 private:
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<Request> high_;
  std::deque<Request> normal_;
  bool stopping_ = false;
  std::function<void()> wake_;
};

/// Threads that take requests from a queue and execute them (pread and mmap backends).
class WorkerPool {
 public:
  /// Executes one request (whose read is not stopped); throws to fail the read.
  using Execute = std::function<void(const Request&)>;

  WorkerPool(RequestQueue& queue, Counters& counters, unsigned threads, Execute execute);
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;
  /// Shuts the queue down and joins the workers (each finishes its current request).
  ~WorkerPool();

 private:
  void run() noexcept;
  void stop() noexcept;

  RequestQueue& queue_;
  Counters& counters_;
  Execute execute_;
  std::vector<std::thread> threads_;
};

/// What `env` says about `request` before it starts (`direct`: it would start on the
/// O_DIRECT descriptor).
ReadStep read_step(Env& env, const Request& request, bool direct);

/// IoError for `request` failing with `code` on the transfer at `at` of `length` bytes.
std::exception_ptr make_read_error(const Request& request, std::uint64_t at, std::uint64_t length,
                                   int code);
/// FormatError: the file ended after `got` bytes of `request` (which needed `need`).
std::exception_ptr make_eof_error(const Request& request, std::uint64_t got);
/// Cancelled for `state` with `why` ("was cancelled", "the backend was destroyed", ...).
std::exception_ptr make_cancelled(const ReadState& state, const char* why);

}  // namespace tensorstream::io::detail
