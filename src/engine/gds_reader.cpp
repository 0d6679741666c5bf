#include "tensorstream/engine/detail/gds_reader.hpp"

#include <fcntl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <exception>
#include <mutex>

#include "tensorstream/errors.hpp"
#include "tensorstream/io/backend.hpp"

namespace tensorstream::engine::detail {

using Clock = std::chrono::steady_clock;
using tensorstream::detail::concat;

namespace {

// The cause that keeps every file off GDS, or "" when each file must be tried.
std::string common_cause(const EngineOptions& options, const cuda::Device* device) {
  const GdsMode mode = options.gds;
  if (device == nullptr) {
    return concat("device '", options.device, "': GPUDirect Storage reads into GPU memory only");
  }
  if (mode == GdsMode::kOff) return "gds is off";  // and libcufile is never loaded
  if (options.ram_cache_bytes > 0) {
    return "a RAM tier is configured (ram_cache_bytes > 0): blocks are read into it";
  }
  if (options.verify_checksums) {
    return "verify_checksums is on: blocks are checked in host memory, so they are read there";
  }
  if (!options.io.direct) {
    return "io.direct is off: reads go through the page cache, which cuFile bypasses";
  }
  auto status = cuda::cufile_status();  // loads the library, does not open the driver
  if (!status.library_loaded) return status.reason;
  if (mode == GdsMode::kAuto && !status.nvidia_fs) {
    // Without the kernel module cuFile reads through its own small bounce buffers
    // ("compatibility mode"): slower than the host path's large requests in flight.
    return "the nvidia-fs kernel module is not loaded (no /proc/driver/nvidia-fs): cuFile would "
           "run in compatibility mode, no faster than the host path (gds=on uses it anyway)";
  }
  status = cuda::cufile_open_driver(*device);
  return status.driver_opened ? std::string() : status.reason;
}

}  // namespace

GdsFiles::GdsFiles(const Layout& layout, const EngineOptions& options, io::Env& env,
                   const cuda::Device* device) {
  const GdsMode mode = options.gds;
  handles_.resize(layout.files.size());
  const std::string common = common_cause(options, device);
  if (!common.empty()) {
    // gds=on with a CPU device or a conflicting option was refused before; this is cuFile.
    TS_EXPECT(mode != GdsMode::kOn || device == nullptr, CudaError,
              "gds=on: GPUDirect Storage cannot read '", layout.files.front().string(),
              "' (nor any file of ", layout.kind, " '", layout.source.string(), "'): ", common);
    for (const auto& f : layout.files) info_.push_back(GdsFileInfo{f, false, common});
    reason_ = common;
    return;
  }
  per_file_ = true;
  std::vector<std::string> failures;
  for (std::size_t i = 0; i < layout.files.size(); ++i) {
    const auto& path = layout.files[i];
    GdsFileInfo info{path, false, {}};
    try {
      tensorstream::detail::FileDescriptor file;
      try {
        file = env.open(path, O_RDONLY | O_DIRECT);
      } catch (const IoError& e) {
        tensorstream::detail::throw_errno(
            concat("cannot open '", path.string(), "' with O_DIRECT for GPUDirect Storage"),
            e.code());
      }
      handles_[i].emplace(*device, std::move(file));
      info.used = true;
    } catch (const IoError& e) {
      if (mode == GdsMode::kOn) {
        throw IoError(
            concat("gds=on: GPUDirect Storage cannot read '", path.string(), "': ", e.what()),
            e.code());
      }
      info.reason = e.what();
    } catch (const std::exception& e) {
      TS_EXPECT(mode != GdsMode::kOn, CudaError, "gds=on: GPUDirect Storage cannot read '",
                path.string(), "': ", e.what());
      info.reason = e.what();
    }
    if (info.used) {
      ++used_files_;
    } else {
      failures.push_back(info.reason);
    }
    info_.push_back(std::move(info));
  }
  // One line: the causes, each once (a checkpoint's shards on tmpfs all fail alike).
  std::sort(failures.begin(), failures.end());
  failures.erase(std::unique(failures.begin(), failures.end()), failures.end());
  for (const auto& f : failures) reason_ += (reason_.empty() ? "" : "; ") + f;
}

bool GdsFiles::covers(const BlockLayout& block) const noexcept {
  // A repacked block moves its tensors while copying, which cuFile's straight write cannot.
  // A compressed block's chunks are decoded in host memory.
  return per_file_ && block.copies.empty() && !block.decoded() &&
         std::all_of(block.extents.begin(), block.extents.end(),
                     [&](const Extent& e) { return handles_[e.file].has_value(); });
}

GdsReader::GdsReader(const Layout& layout, const EngineOptions& options, const GdsFiles& files,
                     const cuda::Stream& copy_stream, TraceLog& trace)
    : layout_(layout),
      files_(files),
      copy_stream_(copy_stream),
      trace_(trace),
      wait_timeout_(options.wait_timeout),
      request_size_(options.io.normalized().request_size),
      threads_(options.io.normalized().num_threads),
      pool_(threads_ - 1) {}

void GdsReader::fill(const FillOrder& order, BlockBuffer& buffer, FillReport& report) {
  // cuFileRead writes the buffer from the host side, so its previous users must be done
  // with it first: the consumer that released it and the last copy into it. Waiting on
  // the host is fine here, on a fill worker.
  buffer.wait_until_unused();
  read(order.block, buffer, report);
  buffer.record_ready(copy_stream_.handle());
}

// Each extent's aligned read region (the one the host path reads, clipped at the end of the
// file) goes straight into the buffer at its offset. cuFileRead is synchronous, so when this
// returns the bytes are in device memory.
void GdsReader::read(std::uint32_t block, const BlockBuffer& buffer, FillReport& report) {
  const auto& info = layout_.blocks[block];
  const std::int64_t start = now_ns();
  const auto deadline = Clock::now() + wait_timeout_;
  struct Request {
    std::size_t extent;
    std::uint64_t file_offset;
    std::uint64_t size;
    std::uint64_t buffer_offset;
  };
  std::vector<Request> requests;
  std::uint64_t bytes = 0;
  // cuFileRead writes device memory unchecked: every region must fit the buffer.
  const std::uint64_t capacity = buffer.size();
  for (std::size_t i = 0; i < info.extents.size(); ++i) {
    const auto& e = info.extents[i];
    const auto& handle = files_.handle(e.file);
    TS_EXPECT(e.file_offset + e.length <= handle.size(), FormatError, "read of ",
              describe_extent(layout_, block, i), " failed: the file ends at byte ", handle.size());
    const auto plan = io::plan_read(e.file_offset, e.length);
    const auto end = std::min(plan.aligned_offset + plan.aligned_size, handle.size());
    TS_EXPECT(e.buffer_offset + (end - plan.aligned_offset) <= capacity, Error, "read of ",
              describe_extent(layout_, block, i), ": its read region does not fit the block's ",
              capacity, "-byte buffer");
    for (auto offset = plan.aligned_offset; offset < end; offset += request_size_) {
      requests.push_back(Request{i, offset, std::min<std::uint64_t>(request_size_, end - offset),
                                 e.buffer_offset + (offset - plan.aligned_offset)});
    }
    bytes += e.length;
  }
  std::atomic<std::size_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  std::exception_ptr first_error;
  const auto fail = [&](std::exception_ptr error) {
    std::lock_guard lock(error_mutex);
    if (!first_error) first_error = std::move(error);
    failed = true;
  };
  const std::function<void()> work = [&] {
    while (!failed) {
      const std::size_t k = next++;
      if (k >= requests.size()) return;
      const auto& r = requests[k];
      const auto& e = info.extents[r.extent];
      const auto& handle = files_.handle(e.file);
      try {
        // A request not started by the deadline is not started at all (one in flight
        // cannot be interrupted).
        TS_EXPECT(Clock::now() < deadline, Error, "read of ",
                  describe_extent(layout_, block, r.extent),
                  " with GPUDirect Storage did not finish within ", wait_timeout_.count(), " ms");
        for (std::uint64_t done = 0; done < r.size;) {
          const auto n = handle.read(buffer.device_ptr(), static_cast<std::size_t>(r.size - done),
                                     r.file_offset + done, r.buffer_offset + done);
          // cuFile may stop early; nothing at all means the file has become shorter.
          TS_EXPECT(n > 0, FormatError, "read of ", describe_extent(layout_, block, r.extent),
                    " with GPUDirect Storage failed: '", handle.path().string(), "' ended at byte ",
                    r.file_offset + done, " (truncated since it was opened?)");
          done += n;
        }
      } catch (const IoError& err) {
        fail(std::make_exception_ptr(
            IoError(concat("read of ", describe_extent(layout_, block, r.extent),
                           " with GPUDirect Storage failed: ", err.what()),
                    err.code())));
      } catch (...) {
        fail(std::current_exception());
      }
    }
  };
  // Up to threads_ at once for this block: this fill worker and threads_ - 1 of the pool.
  const auto wanted = std::min<std::size_t>(threads_, requests.size());
  pool_.run(wanted > 0 ? static_cast<unsigned>(wanted - 1) : 0, work);
  if (first_error) std::rethrow_exception(first_error);
  const auto end = now_ns();
  trace_.record({SpanKind::kGdsRead, block, bytes, start, end});
  report.bytes_from_storage += bytes;
  report.gds_bytes += bytes;
  report.io_seconds += static_cast<double>(end - start) / 1e9;
}

}  // namespace tensorstream::engine::detail
