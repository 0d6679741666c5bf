// The I/O backends: how bytes get from a file into page-aligned host memory.
//
// A Backend reads ranges of files into caller-provided, page-aligned destinations,
// asynchronously: `submit` returns a ReadTicket at once, the read is split into requests of
// at most `IoOptions::request_size` bytes, and up to `IoOptions::queue_depth` of them are in
// flight at a time. Three implementations exist:
//
//   pread     a pool of `num_threads` workers issuing pread(2)          (pread_backend.hpp)
//   io_uring  one ring of `queue_depth` entries and one thread          (uring_backend.hpp)
//   mmap      copies out of a read-only shared mapping on a small pool  (mmap_backend.hpp)
//
// and `make_backend(BackendType::kAuto, ...)` picks the fastest one that works here.
// GPUDirect Storage, which reads straight into device memory, is not a backend: the engine
// drives cuFile itself (EngineOptions::gds, engine/engine.hpp) and uses a backend for the
// files cuFile does not read.
//
// ## The read contract: unaligned sources, no extra copy
//
// O_DIRECT transfers must start and end on the drive's logical block size, and land at an
// address aligned the same way. A store's blocks are 4096-aligned, but a safetensors tensor
// starts anywhere. Instead of reading into a bounce buffer and copying, every read is planned
// on 4096-byte boundaries:
//
//     ReadPlan p = plan_read(offset, size);       // aligned_offset <= offset,
//                                                 // aligned_size  >= size + skip
//     AlignedBuffer buf(p.aligned_size);          // or required_capacity(offset, size)
//     ReadTicket t = backend.submit(file, offset, size, buf.span());
//     std::span<std::byte> bytes = t.wait();      // == buf.span().subspan(p.skip, size)
//
// The destination's data() must be 4096-aligned and its size() at least `aligned_size`;
// the backend reads the aligned range [aligned_offset, aligned_offset + aligned_size) into
// it (clipped at the end of the file), so the requested bytes start at `dest.data() + skip`.
// Bytes of `dest` outside [skip, skip + size) are unspecified afterwards (the mmap backend,
// which gains nothing from over-reading, leaves them untouched). The plan depends only on
// (offset, size), never on the file or the backend, so callers can size their buffers
// before opening anything.
//
// ## Errors
//
// A failure of a read (EIO and other errors of the system call, a file that ends before
// offset + size, a cancelled read) is delivered to the waiter of that ticket: wait()
// rethrows it. Its message names the file, the offset and size of the read and of the
// failing request, and the cause. Mistakes of the caller (a misaligned or too small
// destination, an unknown FileId) throw std::invalid_argument from submit() itself.
// Nothing crashes and nothing hangs: the destructor of a backend cancels the reads that have
// not started, waits for those in flight, joins its threads and closes its descriptors.
//
// ## The environment
//
// A backend opens its files and runs each request through an io::Env (io/env.hpp):
// Env::posix(), the system itself, unless another is given. Tests give one that injects
// faults (an errno from open(O_DIRECT) or from a request, a short read, a partial first
// transfer, a delay); every backend then behaves exactly as when the system does that.
//
// Thread-safety: every member of Backend may be called from any number of threads at once.
// A ReadTicket is owned by one thread at a time (like std::future), but cancel() may race
// with the backend completing the read.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tensorstream/alignment.hpp"
#include "tensorstream/errors.hpp"
#include "tensorstream/host_memory.hpp"
#include "tensorstream/io/env.hpp"

namespace tensorstream::io {

namespace detail {
class ReadState;
class RequestQueue;
struct Counters;
struct OpenFile;
}  // namespace detail

// ---- backend kinds ------------------------------------------------------------------------

/// Which backend to use. The numeric values are not persisted; new kinds (GPUDirect
/// Storage) are appended.
enum class BackendType {
  kAuto,     ///< io_uring if compiled in and usable here, else pread
  kPread,    ///< thread pool + pread(2), O_DIRECT where possible
  kMmap,     ///< read-only shared mapping; reads are copies out of the page cache
  kIoUring,  ///< io_uring, O_DIRECT where possible
};

/// "auto", "pread", "mmap", "io_uring".
[[nodiscard]] std::string_view backend_name(BackendType type) noexcept;
/// Inverse of backend_name (exact, lower case); nullopt for anything else.
[[nodiscard]] std::optional<BackendType> parse_backend_type(std::string_view name) noexcept;

// ---- options --------------------------------------------------------------------------------

/// Tunables of a backend. `normalized()` is applied by every backend's constructor.
struct IoOptions {
  /// Worker threads of the pread and mmap backends (1–64). More threads keep more requests
  /// in flight on drives that need a deep queue, at the cost of stacks and wake-ups.
  unsigned num_threads = 4;
  /// Size of one request: reads are split at this granularity (clamped to 4–16 MiB, rounded
  /// down to a multiple of 4096). Larger requests mean fewer system calls; smaller ones let
  /// a demanded read overtake prefetches sooner.
  std::size_t request_size = std::size_t{8} << 20;
  /// Requests in flight per backend (1–1024). io_uring: the ring's depth; pread and mmap:
  /// also bounded by num_threads.
  unsigned queue_depth = 16;
  /// Try O_DIRECT (bypassing the page cache) where the file system supports it; reads fall
  /// back to buffered I/O per file, with the reason in stats(). Ignored by mmap.
  bool direct = true;

  /// A copy with every field clamped into its documented range.
  [[nodiscard]] IoOptions normalized() const;
};

// ---- the read contract ----------------------------------------------------------------------

/// How a read of (offset, size) is laid out on aligned boundaries.
struct ReadPlan {
  std::uint64_t aligned_offset = 0;  ///< offset rounded down to the alignment
  std::uint64_t aligned_size = 0;    ///< (offset + size) rounded up, minus aligned_offset
  std::uint64_t skip = 0;            ///< offset - aligned_offset: where the bytes start in dest
  friend bool operator==(const ReadPlan&, const ReadPlan&) = default;
};

/// Plans a read of `size` bytes at `offset` on `alignment` boundaries (a power of two; every
/// backend plans on kIoAlignment, see the read contract above).
/// A zero-byte read plans to nothing: {offset rounded down, 0, skip}. Throws
/// std::invalid_argument if `alignment` is not a power of two or offset + size overflows.
[[nodiscard]] ReadPlan plan_read(std::uint64_t offset, std::uint64_t size,
                                 std::uint32_t alignment = kIoAlignment);

/// Bytes a destination needs for submit(…, offset, size, …): plan_read(offset, size)
/// .aligned_size.
[[nodiscard]] std::uint64_t required_capacity(std::uint64_t offset, std::uint64_t size);

// ---- tickets ----------------------------------------------------------------------------

/// Thrown by ReadTicket::wait() for a read that was cancelled (or dropped because its
/// backend was destroyed) before it completed (errors.hpp).
using tensorstream::Cancelled;

/// Identifies a file opened on one backend. Ids are never reused by a backend.
enum class FileId : std::uint32_t {};

/// Priority of a read. A demanded read (kHigh) overtakes every queued prefetch (kNormal);
/// within one level, requests start in submission order.
enum class Priority { kNormal, kHigh };

/// Per-read options of submit().
struct SubmitOptions {
  Priority priority = Priority::kNormal;
  /// Called once when the read has completed (nullptr: success), on an I/O thread of the
  /// backend — or inside submit() for a read that completes at once, inside cancel() when
  /// the cancel completes it, inside the backend's destructor for a dropped read. Must be quick and
  /// must not wait on tickets of the same backend. An exception it throws is reported on stderr and
  /// otherwise ignored.
  std::function<void(std::exception_ptr)> on_complete;
};

/// The pending result of one submit(). Move-only.
///
/// Lifetime: the destination passed to submit() must stay valid until the read is complete
/// (ready() is true or wait() has returned or thrown). Destroying (or assigning over) a
/// ticket whose read is still running cancels it and waits for its requests in flight,
/// so the destination is never written after its ticket is gone.
class ReadTicket {
 public:
  ReadTicket() noexcept = default;
  ReadTicket(ReadTicket&& other) noexcept = default;
  ReadTicket& operator=(ReadTicket&& other) noexcept;
  ReadTicket(const ReadTicket&) = delete;
  ReadTicket& operator=(const ReadTicket&) = delete;
  ~ReadTicket();

  /// False for a default-constructed or moved-from ticket (every other member then throws
  /// std::logic_error, except ready() and cancel(), which return false).
  [[nodiscard]] bool valid() const noexcept { return state_ != nullptr; }

  /// True once the read has completed, successfully or not.
  [[nodiscard]] bool ready() const noexcept;

  /// Blocks until the read completes; returns the requested bytes (dest.data() + skip,
  /// size bytes) or rethrows the read's error (IoError, FormatError, Cancelled). May be
  /// called again: it returns or throws the same.
  std::span<std::byte> wait() const;

  /// Waits at most `timeout`; true if the read has completed (wait() then returns at once).
  [[nodiscard]] bool wait_for(std::chrono::nanoseconds timeout) const;

  /// Cancels the read if it has not completed: requests not yet started are dropped,
  /// requests in flight finish (their bytes are unspecified) and wait() throws Cancelled
  /// (or the read's own error, if one came first). Returns false, changing nothing, if the
  /// read had already completed. Does not block.
  bool cancel() noexcept;

  /// The requested bytes inside the destination (valid to read after a successful wait()).
  [[nodiscard]] std::span<std::byte> data() const;
  /// The read's layout in the destination.
  [[nodiscard]] ReadPlan plan() const;

 private:
  friend class Backend;
  explicit ReadTicket(std::shared_ptr<detail::ReadState> state) noexcept
      : state_(std::move(state)) {}
  void release() noexcept;

  std::shared_ptr<detail::ReadState> state_;
};

// ---- statistics ---------------------------------------------------------------------------

/// One open file as seen by a backend (meanings: for_each_field below).
struct FileIoInfo {
  FileId id{};
  std::filesystem::path path;
  std::uint64_t size = 0;
  bool direct = false;
  std::string direct_note;
};

/// Calls `visit(name, value, meaning)` for each field of `f` (the id as its number).
template <class Visit>
void for_each_field(const FileIoInfo& f, Visit&& visit) {
  visit("id", static_cast<std::uint32_t>(f.id), "the file's id on its backend");
  visit("path", f.path, "the file");
  visit("size", f.size, "its size when it was opened (or last seen growing)");
  visit("direct", f.direct, "reads of this file may use O_DIRECT (aligned requests do)");
  visit("direct_note", f.direct_note,
        "why O_DIRECT is not in use (empty when it is), e.g. \"O_DIRECT refused by the file "
        "system (EINVAL): falling back to buffered reads\"");
}

/// Counters of a backend since its creation (a consistent-enough snapshot: each field is
/// read atomically, the set is not). Meanings: for_each_field below, their one description.
struct IoStats {
  std::uint64_t bytes_read = 0;
  std::uint64_t requests = 0;
  std::uint64_t reads_direct = 0;
  std::uint64_t reads_buffered = 0;
  std::uint64_t submitted = 0;
  std::uint64_t completed = 0;
  std::uint64_t failed = 0;
  std::uint64_t cancelled = 0;
  double busy_seconds = 0;
  std::vector<FileIoInfo> files;
};

/// Calls `visit(name, value, meaning)` for each field of `s`.
template <class Visit>
void for_each_field(const IoStats& s, Visit&& visit) {
  visit("bytes_read", s.bytes_read, "bytes moved into destinations (alignment over-read included)");
  visit("requests", s.requests, "requests executed (each at most request_size)");
  visit("reads_direct", s.reads_direct, "read operations on O_DIRECT descriptors");
  visit("reads_buffered", s.reads_buffered,
        "read operations through the page cache (mmap: copies)");
  visit("submitted", s.submitted, "tickets returned by submit()");
  visit("completed", s.completed, "tickets completed successfully");
  visit("failed", s.failed, "tickets completed with an error other than Cancelled");
  visit("cancelled", s.cancelled, "tickets completed with Cancelled");
  visit("busy_seconds", s.busy_seconds,
        "wall time during which at least one request was executing: bytes_read / busy_seconds "
        "is the throughput the backend achieved while it had work");
  visit("files", s.files, "files open now, by id");
}

// ---- the backend --------------------------------------------------------------------------

/// Abstract I/O backend (see the top of this file). Thread-safe.
class Backend {
 public:
  Backend(const Backend&) = delete;
  Backend& operator=(const Backend&) = delete;
  virtual ~Backend();

  [[nodiscard]] virtual BackendType type() const noexcept = 0;
  /// "pread", "mmap" or "io_uring".
  [[nodiscard]] std::string_view name() const noexcept { return backend_name(type()); }
  /// The options in force (normalized).
  [[nodiscard]] const IoOptions& options() const noexcept { return options_; }
  /// Why make_backend chose this backend, e.g. "io_uring unusable (...): using pread";
  /// empty for a backend constructed directly or requested by name.
  [[nodiscard]] const std::string& selection_note() const noexcept { return selection_note_; }
  /// The environment the backend opens files and runs requests in.
  [[nodiscard]] Env& env() const noexcept { return env_; }

  /// Opens `path` for reading (the same path may be opened several times, giving distinct
  /// ids). Throws IoError naming the path.
  virtual FileId open(const std::filesystem::path& path) = 0;
  /// Forgets `file`; reads in flight on it complete normally (the descriptors are closed
  /// when the last one ends). Throws std::invalid_argument for an unknown id.
  void close(FileId file);
  /// Size of `file` when it was opened (or last seen growing).
  [[nodiscard]] std::uint64_t file_size(FileId file) const;

  /// Starts reading `size` bytes at `offset` of `file` into `dest` (see the read contract:
  /// dest.data() 4096-aligned, dest.size() ≥ required_capacity(offset, size); a zero-byte
  /// read accepts any dest) and returns at once. A range past the end of the file gives a
  /// ticket that fails with FormatError. Throws std::invalid_argument for caller mistakes.
  [[nodiscard]] ReadTicket submit(FileId file, std::uint64_t offset, std::uint64_t size,
                                  std::span<std::byte> dest, SubmitOptions options = {});

  /// Blocking convenience: submit(...).wait().
  std::span<std::byte> read(FileId file, std::uint64_t offset, std::uint64_t size,
                            std::span<std::byte> dest, SubmitOptions options = {});

  /// Counters and the per-file O_DIRECT status.
  [[nodiscard]] IoStats stats() const;

 protected:
  Backend(const IoOptions& options, Env& env);

  /// Registers an opened file and returns its new id (sets file->id).
  FileId add_file(std::shared_ptr<detail::OpenFile> file);
  /// Stops the request queue: queued requests are dropped (their tickets fail with
  /// Cancelled) and later submits fail the same way. Derived destructors call this first,
  /// then join their threads.
  void shut_down_queue() noexcept;

  /// The queue from which the derived backend takes requests.
  [[nodiscard]] detail::RequestQueue& queue() const noexcept { return *queue_; }
  [[nodiscard]] detail::Counters& counters() const noexcept { return *counters_; }
  /// The open file `file`; throws std::invalid_argument for an unknown id.
  [[nodiscard]] std::shared_ptr<detail::OpenFile> find(FileId file) const;
  /// The environment to consult before each request, or nullptr when it never changes one
  /// (Env::shapes_requests() is false: the system itself), so the hot path skips it.
  [[nodiscard]] Env* request_env() const noexcept { return request_env_; }

 private:
  friend std::unique_ptr<Backend> make_backend(BackendType, const IoOptions&, Env&);

  IoOptions options_;
  Env& env_;
  Env* const request_env_;
  std::string selection_note_;
  std::shared_ptr<detail::Counters> counters_;
  std::shared_ptr<detail::RequestQueue> queue_;
  mutable std::mutex files_mutex_;
  std::unordered_map<std::uint32_t, std::shared_ptr<detail::OpenFile>> files_;
  std::uint32_t next_id_ = 1;
};

/// Creates a backend working in `env` (which must outlive it). kAuto: io_uring when compiled
/// in and io_uring_queue_init works here (it fails with ENOSYS on old kernels and EPERM/ENOMEM
/// in restricted containers), else pread; the reason is in selection_note(). kIoUring when it
/// is not compiled in or not usable: throws Error naming the reason. Throws
/// std::invalid_argument for a bad type.
[[nodiscard]] std::unique_ptr<Backend> make_backend(BackendType type, const IoOptions& options = {},
                                                    Env& env = Env::posix());

/// Whether O_DIRECT reads work on the file system of `dir`: nullopt if they do, else why not
/// (tries a small temporary file in `dir`, removed afterwards).
[[nodiscard]] std::optional<std::string> probe_direct_io(const std::filesystem::path& dir);

/// Outcome of probing one backend (for the `doctor` command).
struct BackendProbe {
  BackendType type = BackendType::kPread;
  bool usable = false;  ///< it was created and read a test file in `dir` exactly
  bool direct = false;  ///< it used O_DIRECT for that file
  /// Why it is not usable, or why O_DIRECT is not in use; "ok" when both are fine.
  std::string detail;
};

/// Probes pread, mmap and io_uring (in that order) by reading a temporary file written in
/// `dir` (which must exist and be writable; the file is removed). Never throws for a
/// backend that does not work: that is reported.
[[nodiscard]] std::vector<BackendProbe> probe_backends(const std::filesystem::path& dir);

}  // namespace tensorstream::io
