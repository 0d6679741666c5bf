#include "tensorstream/engine/detail/decoded_copy.hpp"

#include <fcntl.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <functional>
#include <ios>
#include <memory>

#include "tensorstream/checksum.hpp"
#include "tensorstream/codec.hpp"
#include "tensorstream/detail/thread_pool.hpp"
#include "tensorstream/engine/detail/decode_pipeline.hpp"
#include "tensorstream/engine/detail/in_place_reader.hpp"
#include "tensorstream/errors.hpp"
#include "tensorstream/host_memory.hpp"
#include "tensorstream/io/backend.hpp"

namespace tensorstream::engine::detail {

using Clock = std::chrono::steady_clock;
using tensorstream::detail::concat;

namespace {

// Stored bytes read and decoded at once while the copy is made.
constexpr std::uint64_t kCopyPieceBytes = std::uint64_t{16} << 20;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// A ParallelFor on `pool` and the calling thread (sequential without helpers).
ParallelFor parallel_on(tensorstream::detail::ThreadPool& pool) {
  if (pool.size() == 0) return {};
  return [&pool](std::size_t n, const std::function<void(std::size_t)>& task) {
    std::atomic<std::size_t> next{0};
    const std::function<void()> work = [&] {
      for (std::size_t i = next++; i < n; i = next++) task(i);
    };
    pool.run(static_cast<unsigned>(std::min<std::size_t>(n - 1, pool.size())), work);
  };
}

std::uint64_t compressed_stored_bytes(const Layout& layout) {
  std::uint64_t total = 0;
  for (const auto& b : layout.blocks) {
    for (const auto& e : b.extents) total += e.decode ? e.length : 0;
  }
  return total;
}

struct Rates {
  double read_gbps = 0;    // stored bytes per second
  double decode_gbps = 0;  // decoded bytes per second
  std::uint64_t sample = 0;
};

// Reads kMeasureSampleBytes of stored chunks of the largest compressed block through a
// backend of the engine's kind, then decodes them (the best of two runs, into memory touched
// beforehand) on the engine's decode threads.
Rates measure(const Layout& layout, const EngineOptions& options, io::Env& env, unsigned threads) {
  const auto& home =
      *std::max_element(layout.compressed.begin(), layout.compressed.end(),
                        [](const CompressedBlock& a, const CompressedBlock& b) {
                          return a.chunks.back().stored_offset + a.chunks.back().stored_size <
                                 b.chunks.back().stored_offset + b.chunks.back().stored_size;
                        });
  // Chunks from a quarter of the way in, up to the sample's size.
  std::size_t first = home.chunks.size() / 4;
  std::size_t last = first;
  while (last < home.chunks.size() && home.chunks[last].stored_offset +
                                              home.chunks[last].stored_size -
                                              home.chunks[first].stored_offset <=
                                          kMeasureSampleBytes) {
    ++last;
  }
  last = std::max(last, first + 1);
  const auto stored_begin = home.chunks[first].stored_offset;
  const auto stored_end = home.chunks[last - 1].stored_offset + home.chunks[last - 1].stored_size;
  const auto raw_begin = home.chunks[first].raw_offset;
  const auto raw_end = home.chunks[last - 1].raw_offset + home.chunks[last - 1].raw_size;

  const auto type =
      options.backend == io::BackendType::kMmap ? io::BackendType::kPread : options.backend;
  auto backend = io::make_backend(type, options.io, env);
  const auto file = backend->open(layout.files[home.file]);
  const auto offset = home.file_offset + stored_begin;
  AlignedBuffer stored(
      static_cast<std::size_t>(io::required_capacity(offset, stored_end - stored_begin)));
  const auto read_start = Clock::now();
  const auto data = backend->read(file, offset, stored_end - stored_begin, stored.span());
  const double read_s = seconds_since(read_start);

  std::vector<std::byte> raw(static_cast<std::size_t>(raw_end - raw_begin));
  std::memset(raw.data(), 0, raw.size());  // page faults are not the decoder's time
  codec::BlockDecode job;
  const auto path = layout.files[home.file].string();
  job.file = path;
  job.block_name = home.name;
  job.block = home.index;
  job.chunks = home.chunks;
  job.stored = data;
  job.stored_offset = stored_begin;
  job.raw = raw;
  job.raw_offset = raw_begin;
  job.verify = true;  // as the fills do
  tensorstream::detail::ThreadPool pool(threads - 1);
  double decode_s = 0;
  for (int run = 0; run < 2; ++run) {
    const auto start = Clock::now();
    codec::decode_block(job, parallel_on(pool));
    const double s = seconds_since(start);
    decode_s = run == 0 ? s : std::min(decode_s, s);
  }
  Rates rates;
  rates.sample = stored_end - stored_begin;
  rates.read_gbps = read_s > 0 ? static_cast<double>(rates.sample) / read_s / 1e9 : 0;
  rates.decode_gbps = decode_s > 0 ? static_cast<double>(raw_end - raw_begin) / decode_s / 1e9 : 0;
  return rates;
}

}  // namespace

CompressedReadChoice choose_compressed_reads(const Layout& layout, const EngineOptions& options,
                                             const cuda::Device* device, io::Env& env) {
  switch (options.compressed_reads) {
    case CompressedReads::kDecode:
      return {false, "compressed_reads = decode: decoding on every fill"};
    case CompressedReads::kDecodedCopy:
      return {true, "compressed_reads = decoded_copy"};
    case CompressedReads::kAuto:
      break;
  }
  if (device == nullptr) {
    const auto uncompressed = choose_cpu_read_path_uncompressed(options, layout);
    if (uncompressed.in_place) {
      return {true, concat("compressed_reads = auto: uncompressed, this store (", layout.bytes(),
                           " bytes decoded) would be read in place from the page cache, which "
                           "decoding on every fill cannot match")};
    }
  }
  const auto stored = compressed_stored_bytes(layout);
  if (stored < kMeasureFromBytes) {
    return {false, concat("compressed_reads = auto: ", stored,
                          " stored bytes of compressed chunks, too few for a decoded copy to "
                          "pay: decoding on every fill")};
  }
  const unsigned threads = decode_threads_for(options);
  Rates rates;
  try {
    rates = measure(layout, options, env, threads);
  } catch (const std::exception& e) {
    return {false, concat("compressed_reads = auto: measuring the storage failed (", e.what(),
                          "): decoding on every fill")};
  }
  const auto measured = concat(
      "measured at start on ", rates.sample, " stored bytes: the storage reads ", rates.read_gbps,
      " GB/s of stored bytes, ", threads, " threads decode ", rates.decode_gbps, " GB/s");
  if (rates.decode_gbps < rates.read_gbps) {
    return {true, concat("compressed_reads = auto: ", measured,
                         ": decoding on every fill would be slower than reading a decoded copy")};
  }
  return {false, concat("compressed_reads = auto: ", measured,
                        ": decoding on every fill is faster than reading a decoded copy")};
}

DecodedCopy::DecodedCopy(Layout& layout, const EngineOptions& options, io::Env& env)
    : threads_(decode_threads_for(options)) {
  const auto start = Clock::now();
  TS_EXPECT(!layout.compressed.empty(), std::invalid_argument, layout.kind, " '",
            layout.source.string(), "' has no compressed block to copy");
  directory_ = layout.files[layout.compressed.front().file].parent_path();
  if (directory_.empty()) directory_ = ".";
  file_ = env.open(directory_, O_TMPFILE | O_RDWR);
  path_ = concat("/proc/self/fd/", file_.get());
  TS_EXPECT(std::filesystem::exists(path_), Error, "the decoded copy cannot be reopened as '",
            path_.string(), "' (no /proc?)");

  // Where each decoded extent goes: its read region, 4096-aligned, one after the other.
  struct Target {
    std::uint32_t block;
    std::size_t extent;
    std::uint64_t region;  // offset of its region in the copy
  };
  std::vector<Target> targets;
  std::uint64_t total = 0;
  for (std::uint32_t b = 0; b < layout.blocks.size(); ++b) {
    const auto& extents = layout.blocks[b].extents;
    for (std::size_t i = 0; i < extents.size(); ++i) {
      const auto& e = extents[i];
      if (!e.decode) continue;
      targets.push_back({b, i, total});
      total += io::plan_read(e.skip, e.decode->raw_length).aligned_size;
    }
  }
  if (::fallocate(file_.get(), 0, 0, static_cast<off_t>(total)) != 0) {
    const int code = errno;
    if (code != EOPNOTSUPP) {
      tensorstream::detail::throw_errno(
          concat("cannot reserve ", total, " bytes for a decoded copy of '", layout.source.string(),
                 "' in '", directory_.string(), "'"),
          code);
    }
    file_.truncate(total);
  }

  std::vector<tensorstream::detail::FileDescriptor> stores;
  for (const auto& f : layout.files) stores.push_back(env.open(f, O_RDONLY));
  tensorstream::detail::ThreadPool pool(threads_ - 1);
  const auto parallel = parallel_on(pool);
  std::vector<std::byte> stored;
  std::vector<std::byte> raw;
  for (const auto& target : targets) {
    const auto& e = layout.blocks[target.block].extents[target.extent];
    const auto& d = *e.decode;
    const auto& home = layout.compressed[d.block];
    const auto range = codec::chunks_covering(home.chunks, d.raw_offset, d.raw_length);
    // The extent's checksums over decoded bytes, fed piece by piece.
    Checksum64 whole;
    std::vector<Checksum64> tensors(e.tensor_checksums.size());
    const auto file = layout.files[home.file].string();
    for (std::size_t c = range.first; c < range.first + range.count;) {
      std::size_t end = c + 1;
      while (end < range.first + range.count && home.chunks[end].stored_offset +
                                                        home.chunks[end].stored_size -
                                                        home.chunks[c].stored_offset <=
                                                    kCopyPieceBytes) {
        ++end;
      }
      const auto stored_begin = home.chunks[c].stored_offset;
      const auto stored_end = home.chunks[end - 1].stored_offset + home.chunks[end - 1].stored_size;
      const auto raw_begin = std::max(home.chunks[c].raw_offset, d.raw_offset);
      const auto raw_end = std::min(home.chunks[end - 1].raw_offset + home.chunks[end - 1].raw_size,
                                    d.raw_offset + d.raw_length);
      stored.resize(static_cast<std::size_t>(stored_end - stored_begin));
      stores[home.file].pread_exact(stored, home.file_offset + stored_begin);
      raw.resize(static_cast<std::size_t>(raw_end - raw_begin));
      codec::BlockDecode job;
      job.file = file;
      job.block_name = home.name;
      job.block = home.index;
      job.chunks = home.chunks;
      job.stored = stored;
      job.stored_offset = stored_begin;
      job.raw = raw;
      job.raw_offset = raw_begin;
      job.verify = true;
      codec::decode_block(job, parallel);
      // Offsets from the extent's first raw byte.
      const auto at = raw_begin - d.raw_offset;
      if (e.checksum) whole.update(raw);
      for (std::size_t t = 0; t < tensors.size(); ++t) {
        const auto& tc = e.tensor_checksums[t];
        const auto lo = std::max(at, tc.offset);
        const auto hi = std::min(at + raw.size(), tc.offset + tc.nbytes);
        if (lo < hi) {
          tensors[t].update(std::span<const std::byte>(raw).subspan(lo - at, hi - lo));
        }
      }
      file_.pwrite_all(raw, target.region + e.skip + at);
      c = end;
    }
    if (e.checksum) {
      const auto actual = whole.digest();
      TS_EXPECT(actual == *e.checksum, ChecksumError, "checksum mismatch in ",
                describe_extent(layout, target.block, target.extent), " after decoding: stored ",
                std::hex, *e.checksum, ", computed ", actual);
    }
    for (std::size_t t = 0; t < tensors.size(); ++t) {
      const auto& tc = e.tensor_checksums[t];
      const auto actual = tensors[t].digest();
      TS_EXPECT(actual == tc.checksum, ChecksumError, "checksum mismatch in tensor '", tc.name,
                "' of ", describe_extent(layout, target.block, target.extent),
                " after decoding: stored ", std::hex, tc.checksum, ", computed ", actual);
    }
  }

  // Everything is there: the extents and placements now read the copy.
  const auto copy = static_cast<std::uint32_t>(layout.files.size());
  layout.files.push_back(path_);
  for (const auto& target : targets) {
    auto& block = layout.blocks[target.block];
    auto& e = block.extents[target.extent];
    const auto& d = *e.decode;
    const auto data = target.region + e.skip;  // where its first raw byte is in the copy
    for (auto& p : block.tensors) {
      if (p.compressed && *p.compressed == d.block && p.raw_offset >= d.raw_offset &&
          p.raw_offset + p.nbytes <= d.raw_offset + d.raw_length) {
        p.file = copy;
        p.file_offset = data + (p.raw_offset - d.raw_offset);
        p.compressed.reset();
        p.raw_offset = 0;
      }
    }
    e.file = copy;
    e.file_offset = data;
    e.length = d.raw_length;
    e.decode.reset();
  }
  layout.compressed.clear();
  bytes_ = total;
  seconds_ = seconds_since(start);
}

}  // namespace tensorstream::engine::detail
