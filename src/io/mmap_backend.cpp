#include "tensorstream/io/mmap_backend.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <stdexcept>

#include "tensorstream/errors.hpp"
#include "tensorstream/io/detail/read_state.hpp"

namespace tensorstream::io {

using tensorstream::detail::concat;

namespace {

struct MappedFile final : detail::OpenFile {
  ~MappedFile() override {
    if (map != nullptr && ::munmap(const_cast<std::byte*>(map), map_size) != 0) {
      std::fprintf(stderr, "tensorstream: munmap of '%s' failed: %s\n", path.c_str(),
                   std::strerror(errno));
    }
  }

  // Always the size now: touching the mapping past a truncated end raises SIGBUS.
  std::uint64_t readable_size(std::uint64_t /*end*/) override {
    return std::min<std::uint64_t>(detail::current_size(fd), map_size);
  }
  [[nodiscard]] std::string direct_note() const override {
    return "mmap reads through the page cache (O_DIRECT does not apply)";
  }

  const std::byte* map = nullptr;
  std::size_t map_size = 0;
};

void copy_request(Env* env, detail::Counters& counters, detail::RequestQueue& queue,
                  const detail::Request& request) {
  auto& file = static_cast<MappedFile&>(request.state->file());
  std::uint64_t limit = request.need;  // ReadStep::first_transfer does not apply to a copy
  if (env != nullptr) [[unlikely]] {
    const ReadStep step = detail::read_step(*env, request, false);
    if (step.delay.count() > 0 &&
        !queue.sleep_until(detail::Clock::now() + step.delay, *request.state)) {
      std::rethrow_exception(detail::make_cancelled(*request.state, "was interrupted"));
    }
    if (step.error != 0) {
      std::rethrow_exception(
          detail::make_read_error(request, request.offset, request.length, step.error));
    }
    if (step.end_after) limit = std::min(limit, std::max(*step.end_after, request.head));
  }
  counters.requests.fetch_add(1, std::memory_order_relaxed);

  // Only the requested bytes are copied: [offset + head, offset + need).
  const std::uint64_t begin = request.offset + request.head;
  std::uint64_t end = request.offset + limit;
  const std::uint64_t readable = file.readable_size(end);
  if (end > readable) end = std::max(begin, readable);  // truncated since submit
  if (end > begin) {
    const std::uint64_t page_begin = begin / kIoAlignment * kIoAlignment;
    // Read ahead the whole request at once rather than one fault at a time. Advisory:
    // a failure changes nothing.
    (void)::madvise(const_cast<std::byte*>(file.map + page_begin), end - page_begin, MADV_WILLNEED);
    std::memcpy(request.dest + request.head, file.map + begin, end - begin);
    counters.reads_buffered.fetch_add(1, std::memory_order_relaxed);
    counters.bytes_read.fetch_add(end - begin, std::memory_order_relaxed);
  }
  if (end - request.offset < request.need) {
    std::rethrow_exception(detail::make_eof_error(request, end - request.offset));
  }
}

}  // namespace

struct MmapBackend::Impl {
  explicit Impl(MmapBackend& owner)
      : pool(owner.queue(), owner.counters(),
             std::min(owner.options().num_threads, owner.options().queue_depth),
             [&owner](const detail::Request& request) {
               copy_request(owner.request_env(), owner.counters(), owner.queue(), request);
             }) {}

  detail::WorkerPool pool;
};

MmapBackend::MmapBackend(const IoOptions& options, Env& env)
    : Backend(options, env), impl_(std::make_unique<Impl>(*this)) {}

MmapBackend::~MmapBackend() {
  shut_down_queue();
  impl_.reset();  // joins the pool before the base class unmaps the files
}

FileId MmapBackend::open(const std::filesystem::path& path) {
  auto file = std::make_shared<MappedFile>();
  file->path = path;
  file->fd = env().open(path, O_RDONLY);
  struct stat st {};
  TS_SYSCALL_CHECK(::fstat(file->fd.get(), &st), "cannot stat '", path.string(), "'");
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
    throw IoError(concat("cannot map '", path.string(), "': not a regular file or block device"),
                  S_ISDIR(st.st_mode) ? EISDIR : EINVAL);
  }
  const std::uint64_t size = detail::current_size(file->fd);
  if (size > std::numeric_limits<std::size_t>::max()) {
    throw IoError(concat("cannot map '", path.string(), "': ", size, " bytes is too large"), EFBIG);
  }
  if (size > 0) {
    void* p =
        ::mmap(nullptr, static_cast<std::size_t>(size), PROT_READ, MAP_SHARED, file->fd.get(), 0);
    if (p == MAP_FAILED) {
      tensorstream::detail::throw_errno(
          concat("cannot map '", path.string(), "' (", size, " bytes)"));
    }
    file->map = static_cast<const std::byte*>(p);
    file->map_size = static_cast<std::size_t>(size);
  }
  file->size.store(size, std::memory_order_relaxed);
  return add_file(std::move(file));
}

std::span<const std::byte> MmapBackend::mapping(FileId file) const {
  const auto open_file = find(file);
  const auto& mapped = static_cast<const MappedFile&>(*open_file);
  return {mapped.map, mapped.map_size};
}

void MmapBackend::prefetch(FileId file, std::uint64_t offset, std::uint64_t size) const {
  const auto open_file = find(file);
  const auto& mapped = static_cast<const MappedFile&>(*open_file);
  if (offset >= mapped.map_size || size == 0) return;
  const std::uint64_t end = offset + std::min<std::uint64_t>(size, mapped.map_size - offset);
  const std::uint64_t page_begin = offset / kIoAlignment * kIoAlignment;
  TS_SYSCALL_CHECK(
      ::madvise(const_cast<std::byte*>(mapped.map + page_begin), end - page_begin, MADV_WILLNEED),
      "madvise(MADV_WILLNEED) of ", end - page_begin, " bytes at offset ", page_begin, " of '",
      mapped.path.string(), "' failed");
}

}  // namespace tensorstream::io
