#include "tensorstream/engine/detail/decode_pipeline.hpp"

#include <algorithm>
#include <atomic>
#include <functional>
#include <thread>

#include "tensorstream/alignment.hpp"
#include "tensorstream/codec.hpp"
#include "tensorstream/errors.hpp"

namespace tensorstream::engine::detail {

using Clock = std::chrono::steady_clock;
using tensorstream::detail::concat;

unsigned decode_threads_for(const EngineOptions& options) noexcept {
  if (options.decode_threads > 0) return options.decode_threads;
  return std::clamp(std::thread::hardware_concurrency(), 1u, 8u);
}

DecodePipeline::DecodePipeline(const Layout& layout, io::Backend& backend,
                               std::span<const io::FileId> files, unsigned threads, bool verify,
                               ExtentVerifier& verifier, TraceLog& trace)
    : layout_(layout),
      backend_(backend),
      files_(files),
      verify_(verify),
      verifier_(verifier),
      trace_(trace),
      pool_(std::max(threads, 1u) - 1) {
  pieces_.resize(layout.blocks.size());
  std::uint64_t largest = 0;
  for (std::size_t b = 0; b < layout.blocks.size(); ++b) {
    const auto& extents = layout.blocks[b].extents;
    for (std::size_t i = 0; i < extents.size(); ++i) {
      const auto& e = extents[i];
      if (!e.decode) continue;
      const auto& home = layout.compressed[e.decode->block];
      const auto range =
          codec::chunks_covering(home.chunks, e.decode->raw_offset, e.decode->raw_length);
      const auto raw_end = e.decode->raw_offset + e.decode->raw_length;
      for (std::size_t c = range.first; c < range.first + range.count;) {
        Piece piece;
        piece.extent = i;
        piece.stored_begin = home.chunks[c].stored_offset;
        piece.raw_begin = std::max(home.chunks[c].raw_offset, e.decode->raw_offset);
        // At least one chunk; then more while the piece stays within kPieceBytes.
        do {
          piece.stored_end = home.chunks[c].stored_offset + home.chunks[c].stored_size;
          piece.raw_end = std::min(home.chunks[c].raw_offset + home.chunks[c].raw_size, raw_end);
          ++c;
        } while (c < range.first + range.count &&
                 home.chunks[c].stored_offset + home.chunks[c].stored_size - piece.stored_begin <=
                     kPieceBytes);
        largest = std::max(largest, io::required_capacity(home.file_offset + piece.stored_begin,
                                                          piece.stored_end - piece.stored_begin));
        pieces_[b].push_back(piece);
      }
    }
  }
  piece_capacity_ = align_up(largest, kIoAlignment);
}

DecodePipeline::Scratch& DecodePipeline::take_scratch() {
  std::lock_guard lock(scratch_mutex_);
  for (auto& s : scratch_) {
    if (!s->busy) {
      s->busy = true;
      return *s;
    }
  }
  // One set per fill running at once (the engine's fill workers): made on first need.
  auto s = std::make_unique<Scratch>();
  for (unsigned i = 0; i < kDepth; ++i) {
    s->buffers.emplace_back(static_cast<std::size_t>(piece_capacity_));
  }
  s->busy = true;
  scratch_.push_back(std::move(s));
  return *scratch_.back();
}

void DecodePipeline::give_back(Scratch& scratch) noexcept {
  std::lock_guard lock(scratch_mutex_);
  scratch.busy = false;
}

void DecodePipeline::decode_piece(std::uint32_t block, const Piece& piece,
                                  std::span<const std::byte> stored,
                                  std::span<std::byte> dest) const {
  const auto& e = layout_.blocks[block].extents[piece.extent];
  const auto& home = layout_.compressed[e.decode->block];
  codec::BlockDecode job;
  const auto file = layout_.files[home.file].string();
  job.file = file;
  job.block_name = home.name;
  job.block = home.index;
  job.chunks = home.chunks;
  job.stored = stored;
  job.stored_offset = piece.stored_begin;
  job.raw = dest.subspan(e.buffer_offset + e.skip + (piece.raw_begin - e.decode->raw_offset),
                         piece.raw_end - piece.raw_begin);
  job.raw_offset = piece.raw_begin;
  // Always: a chunk's checksum costs about a tenth of its decoding, and damage in its raw
  // zstd blocks would otherwise decode into wrong numbers.
  job.verify = true;
  // The piece's chunks at once: the pool's threads and this one take them from a counter.
  const ParallelFor parallel = [this](std::size_t n, const std::function<void(std::size_t)>& task) {
    std::atomic<std::size_t> next{0};
    const std::function<void()> work = [&] {
      for (std::size_t i = next++; i < n; i = next++) task(i);
    };
    pool_.run(static_cast<unsigned>(std::min<std::size_t>(n - 1, pool_.size())), work);
  };
  codec::decode_block(job, pool_.size() > 0 ? parallel : ParallelFor{});
}

void DecodePipeline::run(std::uint32_t block, std::span<std::byte> dest, bool demand,
                         Clock::time_point deadline, std::chrono::milliseconds timeout,
                         FillReport& report) {
  const auto& pieces = pieces_[block];
  if (pieces.empty()) return;
  const auto& extents = layout_.blocks[block].extents;
  Scratch& scratch = take_scratch();
  struct Returned {
    DecodePipeline& pipeline;
    Scratch& scratch;
    ~Returned() { pipeline.give_back(scratch); }
  } returned{*this, scratch};
  // Declared after the scratch is held: a ticket still reading into it is cancelled and
  // waited for before the scratch is given back.
  std::vector<io::ReadTicket> tickets(kDepth);
  const auto priority = demand ? io::Priority::kHigh : io::Priority::kNormal;
  auto submit = [&](std::size_t p) {
    const auto& piece = pieces[p];
    const auto& e = extents[piece.extent];
    const auto& home = layout_.compressed[e.decode->block];
    io::SubmitOptions options;
    options.priority = priority;
    tickets[p % kDepth] = backend_.submit(files_[home.file], home.file_offset + piece.stored_begin,
                                          piece.stored_end - piece.stored_begin,
                                          scratch.buffers[p % kDepth].span(), std::move(options));
  };
  for (std::size_t p = 0; p < std::min<std::size_t>(kDepth, pieces.size()); ++p) submit(p);
  std::int64_t decode_ns = 0;
  for (std::size_t p = 0; p < pieces.size(); ++p) {
    const auto& piece = pieces[p];
    auto& ticket = tickets[p % kDepth];
    const auto where = [&] { return describe_extent(layout_, block, piece.extent); };
    std::span<std::byte> stored;
    try {
      const auto left = deadline - Clock::now();
      if (!ticket.wait_for(std::max<Clock::duration>(left, Clock::duration::zero()))) {
        ticket.cancel();
        throw Error(concat("read of ", where(), " did not finish within ", timeout.count(), " ms"));
      }
      stored = ticket.wait();
    } catch (const IoError& err) {
      throw IoError(concat("read of ", where(), " failed: ", err.what()), err.code());
    } catch (const FormatError& err) {
      throw FormatError(concat("read of ", where(), " failed: ", err.what()));
    } catch (const io::Cancelled& err) {
      throw Error(concat("read of ", where(), " failed: ", err.what()));
    }
    report.bytes_from_storage += stored.size();
    report.compressed_bytes_read += stored.size();
    const std::int64_t decode_start = now_ns();
    decode_piece(block, piece, stored, dest);
    const std::int64_t decode_end = now_ns();
    decode_ns += decode_end - decode_start;
    report.bytes_decoded += piece.raw_end - piece.raw_begin;
    trace_.record(
        {SpanKind::kDecode, block, piece.raw_end - piece.raw_begin, decode_start, decode_end});
    // Its buffer takes the next piece not yet read.
    if (p + kDepth < pieces.size()) submit(p + kDepth);
    const bool last_of_extent = p + 1 == pieces.size() || pieces[p + 1].extent != piece.extent;
    if (verify_ && last_of_extent) {
      const auto& e = extents[piece.extent];
      verifier_.check(block, piece.extent,
                      dest.subspan(e.buffer_offset + e.skip, e.decode->raw_length));
    }
  }
  report.decode_seconds += static_cast<double>(decode_ns) / 1e9;
}

void DecodePipeline::close() noexcept {
  std::lock_guard lock(scratch_mutex_);
  scratch_.clear();
}

}  // namespace tensorstream::engine::detail
