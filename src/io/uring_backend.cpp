#include "tensorstream/io/uring_backend.hpp"

#include "tensorstream/errors.hpp"
#include "tensorstream/io/detail/posix_file.hpp"

#if defined(TS_HAVE_LIBURING)

#include <liburing.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>

namespace tensorstream::io {

using tensorstream::detail::concat;

namespace {

// user_data of the eventfd poll; requests use slot index + 1, liburing's own timeouts use
// LIBURING_UDATA_TIMEOUT (all ones).
constexpr std::uint64_t kWakeTag = ~std::uint64_t{0} - 1;

std::string init_failure(unsigned entries, int code) {
  return concat("io_uring unusable here: io_uring_queue_init(", entries,
                ") failed: ", std::strerror(code), " (errno ", code, ")");
}

}  // namespace

// Everything below runs on the ring thread, except the constructor and destructor.
struct UringBackend::Impl {
  struct Slot {
    detail::Request request;
    std::uint64_t done = 0;       // bytes of the request transferred
    std::uint64_t limit = 0;      // where the request sees the end of the file
    std::uint64_t first_cap = 0;  // cap of the first transfer (ReadStep::first_transfer)
    std::uint64_t asked = 0;      // length of the transfer in flight
    int injected = 0;             // errno the first transfer reports (ReadStep::error)
    bool first = true;
    bool direct = false;        // the transfer in flight uses the O_DIRECT descriptor
    bool asked_direct = false;  // the descriptor the environment was asked about
  };
  struct Delayed {
    detail::Clock::time_point due;
    detail::Request request;
    ReadStep step;
    bool asked_direct = false;
  };

  explicit Impl(UringBackend& owner)
      : env(owner.request_env()),
        counters(owner.counters()),
        queue(owner.queue()),
        depth(owner.options().queue_depth) {
    // Room for every read, the eventfd poll and liburing's timeout on old kernels.
    const unsigned entries = depth + 4;
    const int rc = ::io_uring_queue_init(entries, &ring, 0);
    if (rc < 0) throw Error(init_failure(entries, -rc));
    event_fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (event_fd == -1) {
      const int code = errno;
      ::io_uring_queue_exit(&ring);
      tensorstream::detail::throw_errno("io_uring backend: eventfd failed", code);
    }
    slots.resize(depth);
    for (unsigned i = depth; i-- > 0;) free_slots.push_back(i);
    queue.set_wake_hook([fd = event_fd] {
      const std::uint64_t one = 1;
      if (::write(fd, &one, sizeof one) < 0) {  // EAGAIN: a wake-up is pending anyway
      }
    });
    try {
      thread = std::thread([this] { run(); });
    } catch (...) {
      queue.shutdown();
      ::close(event_fd);
      ::io_uring_queue_exit(&ring);
      throw;
    }
  }

  // The owner shuts the queue down first; that wakes the thread, which waits for the reads
  // in flight (the kernel writes into their destinations until they complete) and exits.
  ~Impl() {
    queue.shutdown();
    thread.join();
    ::io_uring_queue_exit(&ring);
    ::close(event_fd);
  }

  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;

  [[nodiscard]] unsigned active() const noexcept {
    return depth - static_cast<unsigned>(free_slots.size());
  }

  io_uring_sqe* get_sqe() {
    io_uring_sqe* sqe = ::io_uring_get_sqe(&ring);
    while (sqe == nullptr) {  // cannot happen with the ring sized above; be safe anyway
      ::io_uring_submit(&ring);
      sqe = ::io_uring_get_sqe(&ring);
    }
    return sqe;
  }

  void arm_wake() {
    io_uring_sqe* sqe = get_sqe();
    ::io_uring_prep_poll_add(sqe, event_fd, POLLIN);
    sqe->user_data = kWakeTag;
  }

  void drain_wake() noexcept {
    std::uint64_t value = 0;
    if (::read(event_fd, &value, sizeof value) < 0) {  // EAGAIN: nothing pending
    }
  }

  // A request popped from the queue: ask the environment, then delay or start it.
  void admit(detail::Request request) {
    if (request.state->stopped()) {
      request.state->finish_request();
      return;
    }
    ReadStep step;
    bool asked_direct = false;
    if (env != nullptr) [[unlikely]] {
      auto& file = static_cast<detail::PosixFile&>(request.state->file());
      asked_direct = file.use_direct(request.offset, request.length, request.dest);
      try {
        step = detail::read_step(*env, request, asked_direct);
      } catch (...) {
        request.state->fail(std::current_exception());
        request.state->finish_request();
        return;
      }
      if (step.delay.count() > 0) {
        delayed.push_back(
            Delayed{detail::Clock::now() + step.delay, std::move(request), step, asked_direct});
        return;
      }
    }
    start(std::move(request), step, asked_direct);
  }

  void start(detail::Request request, const ReadStep& step, bool asked_direct) {
    const std::uint32_t index = free_slots.back();
    free_slots.pop_back();
    Slot& slot = slots[index];
    slot = Slot{};
    slot.limit = request.length;
    slot.first_cap = request.length;
    slot.request = std::move(request);
    slot.injected = step.error;
    slot.asked_direct = asked_direct;
    if (step.end_after) slot.limit = std::min(slot.limit, *step.end_after);
    if (step.first_transfer) slot.first_cap = std::max<std::uint64_t>(*step.first_transfer, 1);
    counters.requests.fetch_add(1, std::memory_order_relaxed);
    counters.io_begin();
    if (slot.limit == 0) {
      handle(index, 0);
      return;
    }
    issue(index);
  }

  // Prepares the transfer of the rest of the slot's request.
  void issue(std::uint32_t index) {
    Slot& slot = slots[index];
    const detail::Request& request = slot.request;
    auto& file = static_cast<detail::PosixFile&>(request.state->file());
    const std::uint64_t at = request.offset + slot.done;
    std::byte* const out = request.dest + slot.done;
    std::uint64_t length = slot.limit - slot.done;
    if (slot.first) length = std::min(length, slot.first_cap);
    slot.asked = length;
    // An injected error belongs to the descriptor it was asked for, even if another request
    // has turned direct I/O off for the file since.
    slot.direct =
        slot.first && slot.injected != 0 ? slot.asked_direct : file.use_direct(at, length, out);
    (slot.direct ? counters.reads_direct : counters.reads_buffered)
        .fetch_add(1, std::memory_order_relaxed);
    if (slot.first && slot.injected != 0) {
      slot.first = false;
      handle(index, -std::exchange(slot.injected, 0));
      return;
    }
    slot.first = false;
    io_uring_sqe* sqe = get_sqe();
    ::io_uring_prep_read(sqe, slot.direct ? file.direct_fd.get() : file.fd.get(), out,
                         static_cast<unsigned>(length), at);
    sqe->user_data = index + 1;
  }

  // The outcome `res` (bytes, or -errno) of the slot's transfer.
  void handle(std::uint32_t index, int res) {
    Slot& slot = slots[index];
    const detail::Request& request = slot.request;
    const std::uint64_t at = request.offset + slot.done;
    if (res < 0) {
      const int code = -res;
      if (!stopping && (code == EAGAIN || code == EINTR)) {
        issue(index);
        return;
      }
      if (code == EINVAL && slot.direct) {
        static_cast<detail::PosixFile&>(request.state->file())
            .disable_direct(concat("O_DIRECT read refused by the file system (EINVAL) at "
                                   "offset ",
                                   at, ": falling back to buffered reads"));
        if (!stopping) {
          issue(index);
          return;
        }
      }
      finish(index, stopping ? detail::make_cancelled(*request.state,
                                                      "was interrupted: the backend was destroyed")
                             : detail::make_read_error(request, at, slot.asked, code));
      return;
    }
    const auto got = static_cast<std::uint64_t>(res);
    slot.done += got;
    counters.bytes_read.fetch_add(got, std::memory_order_relaxed);
    const bool at_end = got == 0 || (got < slot.asked && slot.done >= request.need);
    if (at_end || slot.done >= slot.limit) {
      finish(index,
             slot.done < request.need ? detail::make_eof_error(request, slot.done) : nullptr);
      return;
    }
    // A short transfer: resubmit the rest, unless nobody wants it any more.
    if (stopping) {
      finish(index,
             detail::make_cancelled(*request.state, "was interrupted: the backend was destroyed"));
    } else if (request.state->stopped()) {
      finish(index, nullptr);
    } else {
      issue(index);
    }
  }

  void finish(std::uint32_t index, std::exception_ptr error) noexcept {
    Slot& slot = slots[index];
    auto state = std::move(slot.request.state);
    slot = Slot{};
    free_slots.push_back(index);
    counters.io_end();
    if (error) state->fail(std::move(error));
    state->finish_request();
  }

  void submit_prepared() noexcept {
    int rc;
    do {
      rc = ::io_uring_submit(&ring);
    } while (rc == -EINTR);
    // -EAGAIN/-EBUSY: the kernel is short of resources; the entries stay queued and go out
    // on the next round, after completions have freed some.
    if (rc < 0 && rc != -EAGAIN && rc != -EBUSY) {
      std::fprintf(stderr, "tensorstream: io_uring_submit failed: %s\n", std::strerror(-rc));
    }
  }

  void wait_for_completion() noexcept {
    io_uring_cqe* cqe = nullptr;
    if (!delayed.empty()) {
      const auto due =
          std::min_element(delayed.begin(), delayed.end(), [](const Delayed& a, const Delayed& b) {
            return a.due < b.due;
          })->due;
      const auto wait = std::max(due - detail::Clock::now(), detail::Clock::duration::zero());
      const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(wait).count();
      __kernel_timespec ts{};
      ts.tv_sec = ns / 1'000'000'000;
      ts.tv_nsec = ns % 1'000'000'000;
      ::io_uring_wait_cqe_timeout(&ring, &cqe, &ts);  // -ETIME: a delay is due
    } else {
      ::io_uring_wait_cqe(&ring, &cqe);  // -EINTR: go round again
    }
  }

  void reap() {
    io_uring_cqe* cqe = nullptr;
    while (::io_uring_peek_cqe(&ring, &cqe) == 0) {
      const std::uint64_t tag = cqe->user_data;
      const int res = cqe->res;
      ::io_uring_cqe_seen(&ring, cqe);
      if (tag == kWakeTag) {
        drain_wake();
        if (!stopping) arm_wake();
      } else if (tag == LIBURING_UDATA_TIMEOUT || tag == 0 || tag > depth) {
        // liburing's internal timeout on kernels without IORING_FEAT_EXT_ARG
      } else {
        handle(static_cast<std::uint32_t>(tag - 1), res);
      }
    }
  }

  void run() noexcept {
    arm_wake();
    for (;;) {
      stopping = queue.stopping();
      const auto now = detail::Clock::now();
      for (std::size_t k = 0; k < delayed.size();) {
        Delayed& d = delayed[k];
        if (stopping || d.request.state->stopped()) {
          if (stopping) {
            d.request.state->fail(
                detail::make_cancelled(*d.request.state, "was dropped: the backend was destroyed"),
                true);
          }
          d.request.state->finish_request();
        } else if (d.due <= now) {
          Delayed due = std::move(d);
          delayed.erase(delayed.begin() + static_cast<std::ptrdiff_t>(k));
          start(std::move(due.request), due.step, due.asked_direct);
          continue;
        } else {
          ++k;
          continue;
        }
        delayed.erase(delayed.begin() + static_cast<std::ptrdiff_t>(k));
      }
      if (!stopping) {
        // Delayed requests hold their place in the queue depth: they are slow I/O.
        while (active() + delayed.size() < depth) {
          auto request = queue.try_pop();
          if (!request) break;
          admit(std::move(*request));
        }
      }
      if (stopping && active() == 0) break;
      submit_prepared();
      wait_for_completion();
      reap();
    }
  }

  Env* const env;  // nullptr: the system, nothing to ask before a request
  detail::Counters& counters;
  detail::RequestQueue& queue;
  const unsigned depth;
  io_uring ring{};
  int event_fd = -1;
  std::vector<Slot> slots;
  std::vector<std::uint32_t> free_slots;
  std::vector<Delayed> delayed;
  bool stopping = false;
  std::thread thread;  // last: started once everything above is ready
};

UringBackend::UringBackend(const IoOptions& options, Env& env)
    : Backend(options, env), impl_(std::make_unique<Impl>(*this)) {}

UringBackend::~UringBackend() {
  shut_down_queue();
  impl_.reset();
}

FileId UringBackend::open(const std::filesystem::path& path) {
  return add_file(detail::PosixFile::open(path, options(), env()));
}

bool UringBackend::compiled_in() noexcept { return true; }

std::optional<std::string> UringBackend::unavailable_reason() noexcept {
  try {
    io_uring ring{};
    const int rc = ::io_uring_queue_init(8, &ring, 0);
    if (rc < 0) return init_failure(8, -rc);
    ::io_uring_queue_exit(&ring);
    return std::nullopt;
  } catch (...) {
    return std::string("io_uring probe failed");
  }
}

}  // namespace tensorstream::io

#else  // !TS_HAVE_LIBURING

namespace tensorstream::io {

namespace {
constexpr const char* kNotCompiledIn =
    "io_uring backend not compiled in (liburing was not found at build time)";
}

struct UringBackend::Impl {};

UringBackend::UringBackend(const IoOptions& options, Env& env) : Backend(options, env) {
  throw Error(kNotCompiledIn);
}

UringBackend::~UringBackend() = default;

FileId UringBackend::open(const std::filesystem::path& /*path*/) { throw Error(kNotCompiledIn); }

bool UringBackend::compiled_in() noexcept { return false; }

std::optional<std::string> UringBackend::unavailable_reason() noexcept {
  return std::string(kNotCompiledIn);
}

}  // namespace tensorstream::io

#endif  // TS_HAVE_LIBURING
