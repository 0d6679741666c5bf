#include "tensorstream/io/pread_backend.hpp"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <string>

#include "tensorstream/errors.hpp"
#include "tensorstream/io/detail/posix_file.hpp"

namespace tensorstream::io {

using tensorstream::detail::concat;

namespace detail {
namespace {

// Direct-I/O alignment of an open file; offset == 0 means direct I/O is not supported and
// `note` says why.
struct DirectAlignment {
  std::uint32_t offset = kIoAlignment;
  std::uint32_t memory = kIoAlignment;
  std::string note;
};

std::uint32_t read_sysfs_block_size(const std::string& path) {
  std::ifstream in(path);
  std::uint32_t value = 0;
  if (in >> value) return value;
  return 0;
}

DirectAlignment query_direct_alignment(const tensorstream::detail::FileDescriptor& fd) {
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return {};
  DirectAlignment out;
  if (S_ISBLK(st.st_mode)) {
    int block = 0;
    if (::ioctl(fd.get(), BLKSSZGET, &block) == 0 && block > 0) {
      out.offset = out.memory = static_cast<std::uint32_t>(block);
    }
    return out;
  }
#if defined(STATX_DIOALIGN)
  // Linux ≥ 6.1 reports the exact requirement per file, and 0 where there is no direct I/O.
  struct statx sx {};
  if (::statx(fd.get(), "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx) == 0 &&
      (sx.stx_mask & STATX_DIOALIGN) != 0) {
    if (sx.stx_dio_offset_align == 0) {
      out.offset = 0;
      out.note =
          "the file system does not support O_DIRECT for this file (statx reports no "
          "direct-I/O alignment): using buffered reads";
      return out;
    }
    out.offset = sx.stx_dio_offset_align;
    out.memory = std::max<std::uint32_t>(sx.stx_dio_mem_align, 1);
    return out;
  }
#endif
  // Older kernels: the logical block size of the device holding the file (a partition's
  // queue/ lives in its parent disk's directory). File systems without a block device
  // (tmpfs, overlay, NFS) keep the 4096 default, which satisfies every drive in use.
  const std::string dev = concat("/sys/dev/block/", major(st.st_dev), ":", minor(st.st_dev));
  std::uint32_t block = read_sysfs_block_size(dev + "/queue/logical_block_size");
  if (block == 0) block = read_sysfs_block_size(dev + "/../queue/logical_block_size");
  if (block != 0) out.offset = out.memory = block;
  return out;
}

}  // namespace

std::shared_ptr<PosixFile> PosixFile::open(const std::filesystem::path& path,
                                           const IoOptions& options, Env& env) {
  auto file = std::make_shared<PosixFile>();
  file->path = path;
  file->fd = env.open(path, O_RDONLY);
  struct stat st {};
  TS_SYSCALL_CHECK(::fstat(file->fd.get(), &st), "cannot stat '", path.string(), "'");
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
    throw IoError(concat("cannot read '", path.string(), "': not a regular file or block device"),
                  S_ISDIR(st.st_mode) ? EISDIR : EINVAL);
  }
  file->size.store(current_size(file->fd), std::memory_order_relaxed);

  if (!options.direct) {
    file->note_ = "O_DIRECT disabled (IoOptions::direct is false)";
    return file;
  }
  const DirectAlignment align = query_direct_alignment(file->fd);
  if (align.offset == 0) {
    file->note_ = align.note;
    return file;
  }
  if (align.offset > kIoAlignment || align.memory > kIoAlignment) {
    file->note_ = concat("O_DIRECT needs an alignment of ", align.offset, " bytes (memory ",
                         align.memory, "), more than the ", kIoAlignment,
                         " the reads are planned on: using buffered reads");
    return file;
  }
  file->offset_align = align.offset;
  file->memory_align = align.memory;

  int code = 0;
  try {
    file->direct_fd = env.open(path, O_RDONLY | O_DIRECT);
  } catch (const IoError& e) {
    code = e.code();
  }
  if (code != 0) {
    file->note_ = code == EINVAL ? std::string(
                                       "O_DIRECT refused by the file system (EINVAL): falling "
                                       "back to buffered reads")
                                 : concat("open with O_DIRECT failed: ", std::strerror(code),
                                          " (errno ", code, "): falling back to buffered reads");
    return file;
  }
  file->direct_ok.store(true, std::memory_order_release);
  return file;
}

bool PosixFile::use_direct(std::uint64_t offset, std::uint64_t length,
                           const std::byte* dest) const noexcept {
  return direct_ok.load(std::memory_order_acquire) && offset % offset_align == 0 &&
         length % offset_align == 0 && reinterpret_cast<std::uintptr_t>(dest) % memory_align == 0;
}

void PosixFile::disable_direct(std::string why) noexcept {
  std::lock_guard lock(note_mutex_);
  if (!direct_ok.exchange(false, std::memory_order_acq_rel)) return;  // first reason wins
  note_ = std::move(why);
}

std::string PosixFile::direct_note() const {
  std::lock_guard lock(note_mutex_);
  return note_;
}

void pread_request(Env* env, Counters& counters, RequestQueue& queue, const Request& request) {
  auto& file = static_cast<PosixFile&>(request.state->file());
  std::uint64_t limit = request.length;  // where this request sees the end of the file
  std::uint64_t first_cap = request.length;
  int injected = 0;           // errno the first transfer reports instead of reading
  bool asked_direct = false;  // the descriptor the environment was asked about
  if (env != nullptr) [[unlikely]] {
    asked_direct = file.use_direct(request.offset, request.length, request.dest);
    const ReadStep step = read_step(*env, request, asked_direct);
    if (step.delay.count() > 0 && !queue.sleep_until(Clock::now() + step.delay, *request.state)) {
      // Cancelled (the read already holds its error) or the backend is being destroyed.
      std::rethrow_exception(make_cancelled(*request.state, "was interrupted"));
    }
    injected = step.error;
    if (step.end_after) limit = std::min(limit, *step.end_after);
    if (step.first_transfer) first_cap = std::max<std::uint64_t>(*step.first_transfer, 1);
  }
  counters.requests.fetch_add(1, std::memory_order_relaxed);

  std::uint64_t done = 0;
  bool first = true;
  while (done < limit) {
    const std::uint64_t at = request.offset + done;
    std::byte* const out = request.dest + done;
    std::uint64_t length = limit - done;
    if (first) length = std::min(length, first_cap);
    const bool injecting = first && injected != 0;
    // An injected error belongs to the descriptor it was asked for, even if another request
    // has turned direct I/O off for the file since.
    const bool direct = injecting ? asked_direct : file.use_direct(at, length, out);
    ssize_t n;
    int code = 0;
    if (injecting) {
      n = -1;
      code = injected;
    } else {
      n = ::pread(direct ? file.direct_fd.get() : file.fd.get(), out, length,
                  static_cast<off_t>(at));
      if (n == -1) code = errno;
    }
    first = false;
    (direct ? counters.reads_direct : counters.reads_buffered)
        .fetch_add(1, std::memory_order_relaxed);
    if (n == -1) {
      if (code == EINTR || code == EAGAIN) continue;
      if (code == EINVAL && direct) {
        file.disable_direct(
            concat("O_DIRECT read refused by the file system (EINVAL) at "
                   "offset ",
                   at, ": falling back to buffered reads"));
        continue;
      }
      std::rethrow_exception(make_read_error(request, at, length, code));
    }
    if (n == 0) break;  // end of file
    done += static_cast<std::uint64_t>(n);
    counters.bytes_read.fetch_add(static_cast<std::uint64_t>(n), std::memory_order_relaxed);
    // A short transfer once the needed bytes are in: the file ends in the alignment padding.
    if (static_cast<std::uint64_t>(n) < length && done >= request.need) break;
  }
  if (done < request.need) std::rethrow_exception(make_eof_error(request, done));
}

}  // namespace detail

struct PreadBackend::Impl {
  explicit Impl(PreadBackend& owner)
      : pool(owner.queue(), owner.counters(),
             std::min(owner.options().num_threads, owner.options().queue_depth),
             [&owner](const detail::Request& request) {
               detail::pread_request(owner.request_env(), owner.counters(), owner.queue(), request);
             }) {}

  detail::WorkerPool pool;
};

PreadBackend::PreadBackend(const IoOptions& options, Env& env)
    : Backend(options, env), impl_(std::make_unique<Impl>(*this)) {}

PreadBackend::~PreadBackend() {
  shut_down_queue();
  impl_.reset();  // joins the workers before the base class closes the files
}

FileId PreadBackend::open(const std::filesystem::path& path) {
  return add_file(detail::PosixFile::open(path, options(), env()));
}

}  // namespace tensorstream::io
