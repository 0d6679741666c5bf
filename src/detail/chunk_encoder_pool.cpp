#include "tensorstream/detail/chunk_encoder_pool.hpp"

#include <stdexcept>

#include "tensorstream/checksum.hpp"

namespace tensorstream::detail {

ChunkEncoderPool::ChunkEncoderPool(int level, unsigned threads) : level_(level) {
  // Constructing one encoder here validates the level and zstd before any thread starts.
  inline_encoder_ = std::make_unique<codec::ChunkEncoder>(level);
  if (threads == 0) return;
  inline_encoder_.reset();
  workers_.reserve(threads);
  try {
    for (unsigned i = 0; i < threads; ++i) workers_.emplace_back([this] { work(); });
  } catch (...) {
    {
      std::lock_guard lock(mutex_);
      stop_ = true;
    }
    work_ready_.notify_all();
    for (auto& t : workers_) t.join();
    throw;
  }
}

ChunkEncoderPool::~ChunkEncoderPool() {
  {
    std::lock_guard lock(mutex_);
    stop_ = true;
  }
  work_ready_.notify_all();
  for (auto& t : workers_) t.join();
}

void ChunkEncoderPool::encode(codec::ChunkEncoder& encoder, Job& job) {
  Result& r = job.result;
  const auto encoded = encoder.encode(r.raw, job.plane_width);
  r.codec = encoded.codec;
  r.plane_width = encoded.plane_width;
  r.level = encoded.level;
  if (encoded.codec != ChunkCodec::kRaw)
    r.encoded.assign(encoded.bytes.begin(), encoded.bytes.end());
  r.checksum = checksum64(r.stored());
}

void ChunkEncoderPool::work() {
  // Each worker owns an encoder (a zstd context and its scratch buffers).
  std::unique_ptr<codec::ChunkEncoder> encoder;
  std::exception_ptr setup_error;
  try {
    encoder = std::make_unique<codec::ChunkEncoder>(level_);
  } catch (...) {
    setup_error = std::current_exception();
  }
  for (;;) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock lock(mutex_);
      work_ready_.wait(lock, [this] { return stop_ || !queue_.empty(); });
      if (stop_) return;
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    std::exception_ptr error = setup_error;
    if (!error) {
      try {
        encode(*encoder, *job);
      } catch (...) {
        error = std::current_exception();
      }
    }
    {
      std::lock_guard lock(mutex_);
      job->error = error;
      job->done = true;
    }
    job_done_.notify_all();
  }
}

void ChunkEncoderPool::submit(std::vector<std::byte> raw, unsigned plane_width) {
  auto job = std::make_shared<Job>();
  job->plane_width = plane_width;
  job->result.raw = std::move(raw);
  jobs_.push_back(job);
  if (inline_encoder_) {
    try {
      encode(*inline_encoder_, *job);
    } catch (...) {
      job->error = std::current_exception();
    }
    job->done = true;
    return;
  }
  {
    std::lock_guard lock(mutex_);
    queue_.push_back(std::move(job));
  }
  work_ready_.notify_one();
}

ChunkEncoderPool::Result ChunkEncoderPool::take() {
  if (jobs_.empty()) throw std::logic_error("ChunkEncoderPool::take() with nothing pending");
  std::shared_ptr<Job> job = std::move(jobs_.front());
  jobs_.pop_front();
  {
    std::unique_lock lock(mutex_);
    job_done_.wait(lock, [&] { return job->done; });
  }
  if (job->error) std::rethrow_exception(job->error);
  return std::move(job->result);
}

}  // namespace tensorstream::detail
