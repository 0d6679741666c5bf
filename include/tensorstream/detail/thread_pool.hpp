// A fixed set of long-lived threads that many callers share to run pieces of their work in
// parallel: a caller fans one job out to some of the threads, works on it itself too, and
// joins. (kvikio's detail/parallel_operation.hpp is the model: one pool, a read's requests
// fanned out to it and joined.)
//
//     pool.run(helpers, work);   // `work` runs on this thread and on up to `helpers` pool
//                                // threads at once; returns when every run has returned
//
// `work` is typically a loop that takes pieces from a shared counter until none is left, so
// it does not matter how many copies run: a helper that starts late finds nothing to do. A
// helper that has not started by the time the caller's own run returns is never started,
// so a busy pool never holds a caller up beyond the runs already in progress, and a caller
// always makes progress (it works itself) even when every thread is busy with other callers.
//
// Thread-safety: run() may be called from any number of threads at once. The destructor
// joins the threads; no run() may be in progress then.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace tensorstream::detail {

class ThreadPool {
 public:
  /// Starts `threads` threads (fewer if the system refuses some: the pool then has what it
  /// got, possibly none; run() still works, on the calling thread).
  explicit ThreadPool(unsigned threads);
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  ~ThreadPool();

  /// Threads in the pool.
  [[nodiscard]] unsigned size() const noexcept { return static_cast<unsigned>(threads_.size()); }

  /// Runs `work` on the calling thread and on up to `helpers` pool threads (at most size()),
  /// as described at the top of this file. `work` must not throw (an exception escaping a
  /// helper's run terminates the process; the caller's own run propagates it after the
  /// helpers have returned).
  void run(unsigned helpers, const std::function<void()>& work);

 private:
  struct Job;
  void serve() noexcept;

  std::mutex mutex_;
  std::condition_variable work_ready_;      // queue_ or stopping_ changed
  std::condition_variable job_done_;        // a helper finished a run
  std::deque<std::shared_ptr<Job>> queue_;  // one entry per helper asked for; guarded by mutex_
  bool stopping_ = false;                   // guarded by mutex_
  std::vector<std::thread> threads_;        // last: started once the rest is ready
};

}  // namespace tensorstream::detail
