#include "tensorstream/io/backend.hpp"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>

#include "tensorstream/io/detail/read_state.hpp"
#include "tensorstream/io/mmap_backend.hpp"
#include "tensorstream/io/pread_backend.hpp"
#include "tensorstream/io/uring_backend.hpp"

namespace tensorstream::io {

using tensorstream::detail::concat;

// ---- names and options ----------------------------------------------------------------------

std::string_view backend_name(BackendType type) noexcept {
  switch (type) {
    case BackendType::kAuto:
      return "auto";
    case BackendType::kPread:
      return "pread";
    case BackendType::kMmap:
      return "mmap";
    case BackendType::kIoUring:
      return "io_uring";
  }
  return "unknown";
}

std::optional<BackendType> parse_backend_type(std::string_view name) noexcept {
  for (auto type :
       {BackendType::kAuto, BackendType::kPread, BackendType::kMmap, BackendType::kIoUring}) {
    if (backend_name(type) == name) return type;
  }
  return std::nullopt;
}

IoOptions IoOptions::normalized() const {
  constexpr std::size_t kMiB = std::size_t{1} << 20;
  IoOptions out = *this;
  out.num_threads = std::clamp(num_threads, 1u, 64u);
  out.queue_depth = std::clamp(queue_depth, 1u, 1024u);
  out.request_size = std::clamp(request_size, 4 * kMiB, 16 * kMiB) / kIoAlignment * kIoAlignment;
  return out;
}

ReadPlan plan_read(std::uint64_t offset, std::uint64_t size, std::uint32_t alignment) {
  if (alignment == 0 || !std::has_single_bit(alignment)) {
    throw std::invalid_argument(
        concat("plan_read: alignment ", alignment, " is not a power of two"));
  }
  const std::uint64_t mask = alignment - 1;
  if (offset > std::numeric_limits<std::uint64_t>::max() - size - mask) {
    throw std::invalid_argument(
        concat("plan_read: range of ", size, " bytes at offset ", offset, " overflows"));
  }
  ReadPlan plan;
  plan.aligned_offset = offset & ~mask;
  plan.skip = offset - plan.aligned_offset;
  plan.aligned_size = size == 0 ? 0 : ((offset + size + mask) & ~mask) - plan.aligned_offset;
  return plan;
}

std::uint64_t required_capacity(std::uint64_t offset, std::uint64_t size) {
  return plan_read(offset, size).aligned_size;
}

// ---- tickets ----------------------------------------------------------------------------------

namespace {
[[noreturn]] void throw_invalid_ticket() {
  throw std::logic_error("ReadTicket: no read (default-constructed or moved-from ticket)");
}
}  // namespace

ReadTicket& ReadTicket::operator=(ReadTicket&& other) noexcept {
  if (this != &other) {
    release();
    state_ = std::move(other.state_);
  }
  return *this;
}

ReadTicket::~ReadTicket() { release(); }

void ReadTicket::release() noexcept {
  if (!state_) return;
  if (!state_->ready()) {
    // The destination may go away with the ticket: never let a request write into it later.
    state_->cancel();
    try {
      state_->wait();
    } catch (...) {  // the read's outcome has no taker
    }
  }
  state_.reset();
}

bool ReadTicket::ready() const noexcept { return state_ && state_->ready(); }

std::span<std::byte> ReadTicket::wait() const {
  if (!state_) throw_invalid_ticket();
  state_->wait();
  return data();
}

bool ReadTicket::wait_for(std::chrono::nanoseconds timeout) const {
  if (!state_) throw_invalid_ticket();
  return state_->wait_for(timeout);
}

bool ReadTicket::cancel() noexcept { return state_ && state_->cancel(); }

std::span<std::byte> ReadTicket::data() const {
  if (!state_) throw_invalid_ticket();
  if (state_->size() == 0) return {};
  return {state_->dest() + state_->plan().skip, static_cast<std::size_t>(state_->size())};
}

ReadPlan ReadTicket::plan() const {
  if (!state_) throw_invalid_ticket();
  return state_->plan();
}

// ---- detail: counters, files, read state --------------------------------------------------

namespace detail {

void Counters::io_begin() noexcept {
  std::lock_guard lock(busy_mutex_);
  if (active_++ == 0) since_ = Clock::now();
}

void Counters::io_end() noexcept {
  std::lock_guard lock(busy_mutex_);
  if (--active_ == 0) busy_ += Clock::now() - since_;
}

double Counters::busy_seconds() const {
  std::lock_guard lock(busy_mutex_);
  auto busy = busy_;
  if (active_ > 0) busy += Clock::now() - since_;
  return std::chrono::duration<double>(busy).count();
}

std::uint64_t current_size(const tensorstream::detail::FileDescriptor& fd) {
  struct stat st {};
  TS_SYSCALL_CHECK(::fstat(fd.get(), &st), "cannot stat '", fd.path().string(), "'");
  if (S_ISBLK(st.st_mode)) {
    std::uint64_t bytes = 0;
    TS_SYSCALL_CHECK(::ioctl(fd.get(), BLKGETSIZE64, &bytes), "cannot get the size of '",
                     fd.path().string(), "'");
    return bytes;
  }
  return static_cast<std::uint64_t>(st.st_size);
}

std::uint64_t OpenFile::readable_size(std::uint64_t end) {
  std::uint64_t known = size.load(std::memory_order_relaxed);
  if (end <= known) return known;
  known = current_size(fd);
  size.store(known, std::memory_order_relaxed);
  return known;
}

ReadState::ReadState(std::shared_ptr<OpenFile> file, std::uint64_t offset, std::uint64_t size,
                     ReadPlan plan, std::byte* dest, std::shared_ptr<Counters> counters,
                     std::weak_ptr<RequestQueue> queue,
                     std::function<void(std::exception_ptr)> on_complete)
    : file_(std::move(file)),
      offset_(offset),
      size_(size),
      plan_(plan),
      dest_(dest),
      counters_(std::move(counters)),
      queue_(std::move(queue)),
      on_complete_(std::move(on_complete)) {}

std::string ReadState::describe() const {
  return concat("read of ", size_, " bytes at offset ", offset_, " from '",
                file_ ? file_->path.string() : std::string("?"), "'");
}

void ReadState::start(std::uint32_t requests) noexcept {
  pending_.store(requests, std::memory_order_release);
  if (requests == 0) complete();
}

void ReadState::fail(std::exception_ptr error, bool cancelled) noexcept {
  std::lock_guard lock(mutex_);
  if (done_) return;
  if (!error_) {
    error_ = std::move(error);
    failure_ = tensorstream::detail::ErrorValue::of(error_);
    cancelled_ = cancelled;
  }
  stop_.store(true, std::memory_order_release);
}

void ReadState::finish_request() noexcept {
  if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) complete();
}

bool ReadState::cancel() noexcept {
  {
    std::lock_guard lock(mutex_);
    if (done_) return false;
    if (!error_) {
      try {
        error_ = make_cancelled(*this, "was cancelled");
      } catch (...) {  // building the message ran out of memory: still cancel
        error_ = std::current_exception();
      }
      failure_ = tensorstream::detail::ErrorValue::of(error_);
      cancelled_ = true;
    }
    stop_.store(true, std::memory_order_release);
  }
  if (auto queue = queue_.lock()) queue->purge(*this);
  return true;
}

void ReadState::complete() noexcept {
  std::exception_ptr error;
  {
    std::lock_guard lock(mutex_);
    error = error_;
    // Counted before anyone can see the read complete, so stats() after wait() agrees.
    auto& counter = !error       ? counters_->completed
                    : cancelled_ ? counters_->cancelled
                                 : counters_->failed;
    counter.fetch_add(1, std::memory_order_relaxed);
    // Let go of the file before the read is seen complete: once a closed file's last read
    // is waited for, its descriptors are gone.
    file_.reset();
    done_ = true;
    done_flag_.store(true, std::memory_order_release);
  }
  cv_.notify_all();
  if (on_complete_) {
    auto callback = std::move(on_complete_);
    try {
      callback(error);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "tensorstream: a read's completion callback threw: %s\n", e.what());
    } catch (...) {
      std::fprintf(stderr, "tensorstream: a read's completion callback threw\n");
    }
  }
}

void ReadState::wait() const {
  std::unique_lock lock(mutex_);
  cv_.wait(lock, [&] { return done_; });
  if (error_) failure_.raise();
}

bool ReadState::wait_for(std::chrono::nanoseconds timeout) const {
  std::unique_lock lock(mutex_);
  return cv_.wait_for(lock, timeout, [&] { return done_; });
}

// ---- detail: request queue and worker pool -------------------------------------------------

void RequestQueue::push(std::vector<Request>&& requests, Priority priority) {
  {
    std::lock_guard lock(mutex_);
    if (!stopping_) {
      auto& level = priority == Priority::kHigh ? high_ : normal_;
      for (auto& r : requests) level.push_back(std::move(r));
      if (wake_) wake_();
      cv_.notify_all();
      return;
    }
  }
  for (auto& r : requests) {
    r.state->fail(make_cancelled(*r.state, "was refused: the backend is shutting down"), true);
    r.state->finish_request();
  }
}

std::optional<Request> RequestQueue::pop() {
  std::unique_lock lock(mutex_);
  cv_.wait(lock, [&] { return stopping_ || !high_.empty() || !normal_.empty(); });
  if (stopping_) return std::nullopt;
  auto& level = high_.empty() ? normal_ : high_;
  Request r = std::move(level.front());
  level.pop_front();
  return r;
}

std::optional<Request> RequestQueue::try_pop() {
  std::lock_guard lock(mutex_);
  if (stopping_ || (high_.empty() && normal_.empty())) return std::nullopt;
  auto& level = high_.empty() ? normal_ : high_;
  Request r = std::move(level.front());
  level.pop_front();
  return r;
}

void RequestQueue::purge(const ReadState& state) noexcept {
  std::vector<Request> dropped;
  {
    std::lock_guard lock(mutex_);
    for (auto* level : {&high_, &normal_}) {
      auto keep = level->begin();
      for (auto it = level->begin(); it != level->end(); ++it) {
        if (it->state.get() == &state) {
          dropped.push_back(std::move(*it));
        } else {
          if (keep != it) *keep = std::move(*it);
          ++keep;
        }
      }
      level->erase(keep, level->end());
    }
    if (!stopping_ && wake_) wake_();
    cv_.notify_all();
  }
  for (auto& r : dropped) r.state->finish_request();
}

void RequestQueue::shutdown() noexcept {
  std::deque<Request> dropped;
  {
    std::lock_guard lock(mutex_);
    if (stopping_) return;
    stopping_ = true;
    dropped = std::move(high_);
    for (auto& r : normal_) dropped.push_back(std::move(r));
    high_.clear();
    normal_.clear();
    if (wake_) wake_();
    wake_ = nullptr;
    cv_.notify_all();
  }
  for (auto& r : dropped) {
    r.state->fail(make_cancelled(*r.state, "was dropped: the backend was destroyed"), true);
    r.state->finish_request();
  }
}

bool RequestQueue::stopping() const noexcept {
  std::lock_guard lock(mutex_);
  return stopping_;
}

bool RequestQueue::sleep_until(Clock::time_point deadline, const ReadState& state) {
  std::unique_lock lock(mutex_);
  return !cv_.wait_until(lock, deadline, [&] { return stopping_ || state.stopped(); });
}

void RequestQueue::set_wake_hook(std::function<void()> hook) {
  std::lock_guard lock(mutex_);
  if (!stopping_) wake_ = std::move(hook);
}

WorkerPool::WorkerPool(RequestQueue& queue, Counters& counters, unsigned threads, Execute execute)
    : queue_(queue), counters_(counters), execute_(std::move(execute)) {
  try {
    threads_.reserve(threads);
    for (unsigned i = 0; i < threads; ++i) threads_.emplace_back([this] { run(); });
  } catch (...) {
    stop();
    throw;
  }
}

WorkerPool::~WorkerPool() { stop(); }

void WorkerPool::stop() noexcept {
  queue_.shutdown();
  for (auto& t : threads_) {
    if (t.joinable()) t.join();
  }
  threads_.clear();
}

void WorkerPool::run() noexcept {
  while (auto request = queue_.pop()) {
    ReadState& state = *request->state;
    if (!state.stopped()) {
      counters_.io_begin();
      try {
        execute_(*request);
      } catch (...) {
        state.fail(std::current_exception());
      }
      counters_.io_end();
    }
    state.finish_request();
  }
}

ReadStep read_step(Env& env, const Request& request, bool direct) {
  const OpenFile& file = request.state->file();
  RequestInfo info;
  info.file = file.id;
  info.path = &file.path;
  info.offset = request.offset;
  info.size = request.length;
  info.direct = direct;
  return env.before_request(info);
}

std::exception_ptr make_read_error(const Request& request, std::uint64_t at, std::uint64_t length,
                                   int code) {
  return std::make_exception_ptr(
      IoError(concat(request.state->describe(), " failed: transfer of ", length,
                     " bytes at offset ", at, " (request of ", request.length, " bytes at offset ",
                     request.offset, "): ", std::strerror(code), " (errno ", code, ")"),
              code));
}

std::exception_ptr make_eof_error(const Request& request, std::uint64_t got) {
  return std::make_exception_ptr(FormatError(
      concat(request.state->describe(), " failed: unexpected end of file at offset ",
             request.offset + got, " (request of ", request.length, " bytes at offset ",
             request.offset, ": got ", got, " of the ", request.need, " bytes it needs)")));
}

std::exception_ptr make_cancelled(const ReadState& state, const char* why) {
  return std::make_exception_ptr(Cancelled(concat(state.describe(), " ", why)));
}

}  // namespace detail

// ---- the backend base ---------------------------------------------------------------------

Backend::Backend(const IoOptions& options, Env& env)
    : options_(options.normalized()),
      env_(env),
      request_env_(env.shapes_requests() ? &env : nullptr),
      counters_(std::make_shared<detail::Counters>()),
      queue_(std::make_shared<detail::RequestQueue>()) {}

Backend::~Backend() { queue_->shutdown(); }

void Backend::shut_down_queue() noexcept { queue_->shutdown(); }

FileId Backend::add_file(std::shared_ptr<detail::OpenFile> file) {
  std::lock_guard lock(files_mutex_);
  const std::uint32_t id = next_id_++;
  file->id = id;
  files_.emplace(id, std::move(file));
  return FileId{id};
}

std::shared_ptr<detail::OpenFile> Backend::find(FileId file) const {
  std::lock_guard lock(files_mutex_);
  const auto it = files_.find(static_cast<std::uint32_t>(file));
  if (it == files_.end()) {
    throw std::invalid_argument(
        concat(name(), " backend: unknown FileId ", static_cast<std::uint32_t>(file)));
  }
  return it->second;
}

void Backend::close(FileId file) {
  std::shared_ptr<detail::OpenFile> closing;  // released outside the lock
  std::lock_guard lock(files_mutex_);
  const auto it = files_.find(static_cast<std::uint32_t>(file));
  if (it == files_.end()) {
    throw std::invalid_argument(
        concat(name(), " backend: close of unknown FileId ", static_cast<std::uint32_t>(file)));
  }
  closing = std::move(it->second);
  files_.erase(it);
}

std::uint64_t Backend::file_size(FileId file) const {
  return find(file)->size.load(std::memory_order_relaxed);
}

ReadTicket Backend::submit(FileId file, std::uint64_t offset, std::uint64_t size,
                           std::span<std::byte> dest, SubmitOptions options) {
  const ReadPlan plan = plan_read(offset, size);
  if (size > 0) {
    if (reinterpret_cast<std::uintptr_t>(dest.data()) % kIoAlignment != 0) {
      throw std::invalid_argument(concat(name(), " backend: the destination of a read of ", size,
                                         " bytes at offset ", offset, " is not aligned to ",
                                         kIoAlignment, " bytes (use an AlignedBuffer)"));
    }
    if (dest.size() < plan.aligned_size) {
      throw std::invalid_argument(
          concat(name(), " backend: a destination of ", dest.size(),
                 " bytes is too small for a read of ", size, " bytes at offset ", offset,
                 ": it needs required_capacity() = ", plan.aligned_size, " bytes"));
    }
  }
  auto open_file = find(file);
  const std::uint64_t end = offset + size;
  auto state =
      std::make_shared<detail::ReadState>(open_file, offset, size, plan, dest.data(), counters_,
                                          queue_, std::move(options.on_complete));
  counters_->submitted.fetch_add(1, std::memory_order_relaxed);
  if (size == 0) {
    state->start(0);
    return ReadTicket(std::move(state));
  }
  try {
    const std::uint64_t readable = open_file->readable_size(end);
    if (end > readable) {
      throw FormatError(concat(state->describe(), " failed: unexpected end of file: the range ",
                               "ends at ", end, ", past the end of the file (", readable,
                               " bytes)"));
    }
  } catch (...) {
    state->fail(std::current_exception());
    state->start(0);
    return ReadTicket(std::move(state));
  }

  const std::uint64_t step = options_.request_size;
  const std::uint64_t wanted_end = plan.skip + size;  // relative to aligned_offset
  std::vector<detail::Request> requests;
  requests.reserve(static_cast<std::size_t>((plan.aligned_size + step - 1) / step));
  for (std::uint64_t at = 0; at < plan.aligned_size; at += step) {
    detail::Request r;
    r.state = state;
    r.offset = plan.aligned_offset + at;
    r.length = std::min(step, plan.aligned_size - at);
    r.head = at == 0 ? plan.skip : 0;
    r.need = std::min(r.length, wanted_end - at);
    r.dest = dest.data() + at;
    requests.push_back(std::move(r));
  }
  state->start(static_cast<std::uint32_t>(requests.size()));
  queue_->push(std::move(requests), options.priority);
  return ReadTicket(std::move(state));
}

std::span<std::byte> Backend::read(FileId file, std::uint64_t offset, std::uint64_t size,
                                   std::span<std::byte> dest, SubmitOptions options) {
  return submit(file, offset, size, dest, std::move(options)).wait();
}

IoStats Backend::stats() const {
  IoStats out;
  const auto& c = *counters_;
  out.bytes_read = c.bytes_read.load(std::memory_order_relaxed);
  out.requests = c.requests.load(std::memory_order_relaxed);
  out.reads_direct = c.reads_direct.load(std::memory_order_relaxed);
  out.reads_buffered = c.reads_buffered.load(std::memory_order_relaxed);
  out.submitted = c.submitted.load(std::memory_order_relaxed);
  out.completed = c.completed.load(std::memory_order_relaxed);
  out.failed = c.failed.load(std::memory_order_relaxed);
  out.cancelled = c.cancelled.load(std::memory_order_relaxed);
  out.busy_seconds = c.busy_seconds();
  std::vector<std::shared_ptr<detail::OpenFile>> files;
  {
    std::lock_guard lock(files_mutex_);
    files.reserve(files_.size());
    for (const auto& [id, file] : files_) files.push_back(file);
  }
  std::sort(files.begin(), files.end(), [](const auto& a, const auto& b) { return a->id < b->id; });
  for (const auto& f : files) {
    out.files.push_back(FileIoInfo{FileId{f->id}, f->path, f->size.load(std::memory_order_relaxed),
                                   f->direct(), f->direct_note()});
  }
  return out;
}

// ---- factory and probes ---------------------------------------------------------------------

std::unique_ptr<Backend> make_backend(BackendType type, const IoOptions& options, Env& env) {
  switch (type) {
    case BackendType::kPread:
      return std::make_unique<PreadBackend>(options, env);
    case BackendType::kMmap:
      return std::make_unique<MmapBackend>(options, env);
    case BackendType::kIoUring:
      return std::make_unique<UringBackend>(options, env);
    case BackendType::kAuto: {
      std::string why;
      if (!UringBackend::compiled_in()) {
        why = "io_uring not compiled in (liburing was not found at build time)";
      } else {
        try {
          auto backend = std::make_unique<UringBackend>(options, env);
          backend->selection_note_ = "auto: io_uring is compiled in and usable here";
          return backend;
        } catch (const std::exception& e) {
          why = e.what();
        }
      }
      auto backend = std::make_unique<PreadBackend>(options, env);
      backend->selection_note_ = concat("auto: ", why, "; using pread");
      return backend;
    }
  }
  throw std::invalid_argument(
      concat("make_backend: unknown backend type ", static_cast<int>(type)));
}

namespace {

// A temporary file in `dir`, removed on destruction.
class ProbeFile {
 public:
  ProbeFile(const std::filesystem::path& dir, std::size_t size) {
    std::string pattern = (dir / ".tensorstream-probe-XXXXXX").string();
    const int fd = ::mkstemp(pattern.data());
    if (fd == -1) {
      tensorstream::detail::throw_errno(
          concat("cannot create a probe file in '", dir.string(), "'"));
    }
    path_ = pattern;
    ::close(fd);
    content_.resize(size);
    for (std::size_t i = 0; i < size; ++i) {
      content_[i] = static_cast<std::byte>((i * 131 + 7) & 0xff);
    }
    tensorstream::detail::FileDescriptor out(path_, O_WRONLY | O_TRUNC);
    out.pwrite_all(content_, 0);
    out.sync();  // O_DIRECT reads then see the data on the device, not only in the cache
  }
  ~ProbeFile() {
    std::error_code ec;
    std::filesystem::remove(path_, ec);
  }
  ProbeFile(const ProbeFile&) = delete;
  ProbeFile& operator=(const ProbeFile&) = delete;
  [[nodiscard]] const std::filesystem::path& path() const noexcept { return path_; }
  [[nodiscard]] const std::vector<std::byte>& content() const noexcept { return content_; }

 private:
  std::filesystem::path path_;
  std::vector<std::byte> content_;
};

}  // namespace

std::optional<std::string> probe_direct_io(const std::filesystem::path& dir) {
  try {
    ProbeFile file(dir, 2 * kIoAlignment);
    const int fd = ::open(file.path().c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
    if (fd == -1) {
      const int code = errno;
      return concat("open with O_DIRECT failed on '", dir.string(), "': ", std::strerror(code),
                    " (errno ", code, ")");
    }
    AlignedBuffer buffer(kIoAlignment);
    ssize_t n;
    do {
      n = ::pread(fd, buffer.data(), kIoAlignment, static_cast<off_t>(kIoAlignment));
    } while (n == -1 && errno == EINTR);
    const int code = errno;
    ::close(fd);
    if (n == -1) {
      return concat("an O_DIRECT read failed on '", dir.string(), "': ", std::strerror(code),
                    " (errno ", code, ")");
    }
    if (n != static_cast<ssize_t>(kIoAlignment) ||
        std::memcmp(buffer.data(), file.content().data() + kIoAlignment, kIoAlignment) != 0) {
      return concat("an O_DIRECT read on '", dir.string(), "' returned wrong data");
    }
    return std::nullopt;
  } catch (const std::exception& e) {
    return std::string(e.what());
  }
}

std::vector<BackendProbe> probe_backends(const std::filesystem::path& dir) {
  std::vector<BackendProbe> out;
  const auto direct_problem = probe_direct_io(dir);
  for (auto type : {BackendType::kPread, BackendType::kMmap, BackendType::kIoUring}) {
    BackendProbe probe;
    probe.type = type;
    try {
      // An odd size and an unaligned range exercise both the direct and the buffered path.
      ProbeFile file(dir, 3 * kIoAlignment + 123);
      auto backend = make_backend(type, IoOptions{});
      const FileId id = backend->open(file.path());
      const std::uint64_t offset = 100;
      const std::uint64_t size = file.content().size() - offset;
      AlignedBuffer buffer(required_capacity(offset, size));
      const auto bytes = backend->read(id, offset, size, buffer.span());
      if (std::memcmp(bytes.data(), file.content().data() + offset, size) != 0) {
        probe.detail = "read back wrong data";
      } else {
        const auto stats = backend->stats();
        probe.usable = true;
        probe.direct = !stats.files.empty() && stats.files.front().direct && stats.reads_direct > 0;
        if (type == BackendType::kMmap) {
          probe.detail = "ok (mmap reads through the page cache; O_DIRECT does not apply)";
        } else if (probe.direct) {
          probe.detail = "ok";
        } else if (!stats.files.empty() && !stats.files.front().direct_note.empty()) {
          probe.detail = "ok, without O_DIRECT: " + stats.files.front().direct_note;
        } else {
          probe.detail =
              "ok, without O_DIRECT: " + direct_problem.value_or("no direct read was made");
        }
      }
      backend->close(id);
    } catch (const std::exception& e) {
      probe.detail = e.what();
    }
    out.push_back(std::move(probe));
  }
  return out;
}

}  // namespace tensorstream::io
