#include "tensorstream/detail/thread_pool.hpp"

#include <algorithm>
#include <exception>
#include <system_error>

namespace tensorstream::detail {

struct ThreadPool::Job {
  const std::function<void()>* work = nullptr;
  unsigned running = 0;  // helper runs in progress
  bool closed = false;   // the caller's run returned: start no more helpers
};

ThreadPool::ThreadPool(unsigned threads) {
  threads_.reserve(threads);
  for (unsigned i = 0; i < threads; ++i) {
    try {
      threads_.emplace_back([this] { serve(); });
    } catch (const std::system_error&) {
      break;  // fewer threads than asked: callers do more of their work themselves
    }
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  work_ready_.notify_all();
  for (auto& t : threads_) t.join();
}

void ThreadPool::serve() noexcept {
  std::unique_lock lock(mutex_);
  while (true) {
    work_ready_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
    if (stopping_) return;
    const auto job = std::move(queue_.front());
    queue_.pop_front();
    if (job->closed) continue;
    ++job->running;
    lock.unlock();
    (*job->work)();  // noexcept by contract: an exception here terminates
    lock.lock();
    if (--job->running == 0) job_done_.notify_all();
  }
}

void ThreadPool::run(unsigned helpers, const std::function<void()>& work) {
  helpers = std::min(helpers, size());
  if (helpers == 0) {
    work();
    return;
  }
  const auto job = std::make_shared<Job>();
  job->work = &work;
  {
    std::lock_guard lock(mutex_);
    for (unsigned i = 0; i < helpers; ++i) queue_.push_back(job);
  }
  if (helpers == 1) {
    work_ready_.notify_one();
  } else {
    work_ready_.notify_all();
  }
  std::exception_ptr error;
  try {
    work();
  } catch (...) {
    error = std::current_exception();
  }
  std::unique_lock lock(mutex_);
  job->closed = true;
  // Helpers not started yet never will be: take them out of the queue.
  queue_.erase(std::remove(queue_.begin(), queue_.end(), job), queue_.end());
  job_done_.wait(lock, [&] { return job->running == 0; });
  lock.unlock();
  if (error) std::rethrow_exception(error);
}

}  // namespace tensorstream::detail
