// Chunk compression on worker threads, for StoreWriter: chunks are submitted in store order
// and their encodings taken back in the same order, so the writer lays them out
// sequentially while several are being compressed at once.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

#include "tensorstream/codec.hpp"

namespace tensorstream::detail {

/// Encodes chunks with codec::ChunkEncoder on `threads` workers (0: on the caller's thread,
/// inside submit()). The owner bounds memory by taking results before submitting more (each
/// submitted chunk holds its raw bytes and its encoding until taken).
///
/// Thread-safety: submit(), pending(), take() and the destructor are called by one owner
/// thread. `mutex_` guards `queue_`, `stop_` and the `done`/result fields of every Job;
/// `jobs_` (the submission order) is touched by the owner only.
class ChunkEncoderPool {
 public:
  /// One encoded chunk.
  struct Result {
    ChunkCodec codec = ChunkCodec::kRaw;
    std::uint8_t plane_width = 1;
    std::uint8_t level = 0;
    std::uint64_t checksum = 0;      ///< XXH3-64 of stored()
    std::vector<std::byte> raw;      ///< the chunk's raw bytes (the buffer given to submit)
    std::vector<std::byte> encoded;  ///< the compressed bytes (empty for a raw chunk)
    [[nodiscard]] std::span<const std::byte> stored() const noexcept {
      return codec == ChunkCodec::kRaw ? std::span<const std::byte>(raw)
                                       : std::span<const std::byte>(encoded);
    }
  };

  /// Throws as codec::ChunkEncoder's constructor does (bad level, build without zstd).
  ChunkEncoderPool(int level, unsigned threads);
  /// Stops the workers; results not taken are dropped.
  ~ChunkEncoderPool();
  ChunkEncoderPool(const ChunkEncoderPool&) = delete;
  ChunkEncoderPool& operator=(const ChunkEncoderPool&) = delete;

  /// Queues `raw` (1..kMaxChunkRawSize bytes of elements `plane_width` wide) for encoding.
  void submit(std::vector<std::byte> raw, unsigned plane_width);
  /// Chunks submitted and not yet taken.
  [[nodiscard]] std::size_t pending() const noexcept { return jobs_.size(); }
  /// The oldest chunk not yet taken, waiting for its encoding; rethrows its encoding error.
  /// std::logic_error when nothing is pending.
  Result take();

 private:
  struct Job {
    unsigned plane_width = 1;
    bool done = false;
    std::exception_ptr error;
    Result result;
  };

  static void encode(codec::ChunkEncoder& encoder, Job& job);
  void work();

  int level_;
  std::unique_ptr<codec::ChunkEncoder> inline_encoder_;  // when there are no workers
  std::deque<std::shared_ptr<Job>> jobs_;                // submission order (owner only)
  std::mutex mutex_;
  std::condition_variable work_ready_;
  std::condition_variable job_done_;
  std::deque<std::shared_ptr<Job>> queue_;  // waiting for a worker
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace tensorstream::detail
