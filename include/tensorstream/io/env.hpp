// The operating-system operations of TensorStream's readers, behind one interface.
//
// An Env is what the I/O backends (io/backend.hpp) and the engine's readers use to reach the
// system: opening a file (buffered, or with O_DIRECT) and running one request of a read.
// Env::posix() is the system itself and the default everywhere; it costs nothing per
// request (backends see shapes_requests() == false and never call before_request()). Other
// environments wrap it (EnvWrapper forwards every call to a target) and change what they
// need — the test suites' FaultInjectionEnv (tests/cpp/test_helpers.hpp) makes chosen opens
// and requests fail, stop early or run late, so every error path can be reached on any file
// system without a hook in the production options (as leveldb's Env / EnvWrapper and its
// fault-injection test do).
//
// Where the environment is passed: make_backend(type, options, env) and the backends'
// constructors; EngineOptions::env for an engine (its backend, its in-place windows and its
// GPUDirect Storage files). The Env must outlive everything it was passed to.
//
// Thread-safety: every member of an Env may be called from any number of threads at once
// (backends call before_request() on their I/O threads); implementations must allow that.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <optional>

#include "tensorstream/detail/file.hpp"

namespace tensorstream::io {

/// One request of a backend, as the environment sees it just before the request starts.
struct RequestInfo {
  std::uint32_t file = 0;               ///< the FileId's value
  const std::filesystem::path* path{};  ///< never null
  std::uint64_t offset = 0;             ///< file offset of the request (aligned)
  std::uint64_t size = 0;               ///< length of the request
  bool direct = false;                  ///< the request would start on the O_DIRECT descriptor
};

/// How one request meets the system. A default-constructed ReadStep is "as the system
/// does"; every other value describes what a slower or failing system would do, and the
/// backends then behave exactly as they do when the system itself does that.
struct ReadStep {
  /// The request starts this much later (slow I/O). The wait is cut short when the read is
  /// cancelled or the backend destroyed (the read then fails with Cancelled).
  std::chrono::nanoseconds delay{0};
  /// Non-zero: the request's first transfer fails with this errno, as if the system call
  /// had returned it (EINTR and EAGAIN are retried; EINVAL on a direct transfer falls back to
  /// buffered reads; anything else fails the read).
  int error = 0;
  /// The request sees the end of the file after this many of its bytes ("short read").
  std::optional<std::uint64_t> end_after;
  /// The request's first transfer returns at most this many bytes; a correct backend resumes
  /// with the rest. Copies (the mmap backend) ignore it.
  std::optional<std::uint64_t> first_transfer;
};

class Env {
 public:
  Env() = default;
  Env(const Env&) = delete;
  Env& operator=(const Env&) = delete;
  virtual ~Env() = default;

  /// The system itself: open(2), and requests run as issued. Process-wide and never
  /// destroyed.
  [[nodiscard]] static Env& posix() noexcept;

  /// Opens `path` with open(2) `flags` (O_CLOEXEC is always added; EINTR is retried).
  /// Throws IoError naming the path, with the errno as its code.
  [[nodiscard]] virtual tensorstream::detail::FileDescriptor open(const std::filesystem::path& path,
                                                                  int flags);

  /// Consulted once per request of a backend (not per retry or resumed transfer), on an I/O
  /// thread, before the request starts. The system's answer is ReadStep{}.
  [[nodiscard]] virtual ReadStep before_request(const RequestInfo& request);

  /// False when before_request() always answers ReadStep{}, so that backends may skip it:
  /// the system (posix()). Every EnvWrapper answers true.
  [[nodiscard]] virtual bool shapes_requests() const noexcept { return false; }
};

/// An Env that forwards every call to `target()`; derive from it and override what changes.
class EnvWrapper : public Env {
 public:
  explicit EnvWrapper(Env& target) noexcept : target_(target) {}

  [[nodiscard]] Env& target() const noexcept { return target_; }

  [[nodiscard]] tensorstream::detail::FileDescriptor open(const std::filesystem::path& path,
                                                          int flags) override {
    return target_.open(path, flags);
  }
  [[nodiscard]] ReadStep before_request(const RequestInfo& request) override {
    return target_.before_request(request);
  }
  [[nodiscard]] bool shapes_requests() const noexcept override { return true; }

 private:
  Env& target_;
};

}  // namespace tensorstream::io
