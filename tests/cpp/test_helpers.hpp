// Helpers shared by the GoogleTest suites: temporary directories, random data, and an I/O
// environment that injects faults.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "tensorstream/codec.hpp"
#include "tensorstream/dtype.hpp"
#include "tensorstream/io/env.hpp"

/// Skips the current test where this build has no zstd (compressed stores are refused).
#define TS_SKIP_WITHOUT_ZSTD()                                                                  \
  do {                                                                                          \
    if (!::tensorstream::codec::available()) GTEST_SKIP() << ::tensorstream::codec::describe(); \
  } while (0)

namespace tensorstream::testing {

/// Every element type a store can hold, in DType order.
inline const std::vector<DType> kAllDTypes = {
    DType::kBool,          DType::kUInt8,          DType::kInt8,       DType::kInt16,
    DType::kUInt16,        DType::kInt32,          DType::kUInt32,     DType::kInt64,
    DType::kUInt64,        DType::kFloat16,        DType::kBFloat16,   DType::kFloat32,
    DType::kFloat64,       DType::kComplex32,      DType::kComplex64,  DType::kComplex128,
    DType::kFloat8E4M3FN,  DType::kFloat8E4M3FNUZ, DType::kFloat8E5M2, DType::kFloat8E5M2FNUZ,
    DType::kFloat8E8M0FNU, DType::kFloat4E2M1FNx2};

/// A fresh directory under the system temp dir, removed with its content on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  [[nodiscard]] const std::filesystem::path& path() const noexcept { return path_; }
  [[nodiscard]] std::filesystem::path operator/(const std::string& name) const {
    return path_ / name;
  }

 private:
  std::filesystem::path path_;
};

/// `n` bytes from a seeded generator.
std::vector<std::byte> random_bytes(std::size_t n, std::uint64_t seed);

/// `numel` elements of `dtype` that look like model weights: N(0, 0.02) rounded to the dtype
/// for floating types (bf16 by rounding float32, fp8 by truncating bf16-like bit patterns),
/// small integers for integer types, as raw little-endian bytes.
std::vector<std::byte> weight_bytes(DType dtype, std::size_t numel, std::uint64_t seed);

/// Whole content of a file.
std::vector<std::byte> read_file(const std::filesystem::path& path);

/// Replaces the content of a file.
void write_file(const std::filesystem::path& path, const std::vector<std::byte>& data);

/// Writes `dir/model.tstore`: `blocks` blocks "layers.N", each one uint8 tensor
/// "layers.N.w" of random bytes, sizes drawn from [min_size, max_size]; returns its path.
std::filesystem::path make_random_store(const std::filesystem::path& dir, int blocks,
                                        std::uint64_t min_size, std::uint64_t max_size,
                                        std::uint64_t seed);

// ---- fault injection -------------------------------------------------------------------------

/// Where a FaultInjectionEnv consults its rule.
enum class FaultPoint {
  kOpenDirect,  ///< before a file is opened with O_DIRECT (offset, size: 0)
  kRead,        ///< before each request of a backend (once per request, not per retry)
};

/// What the rule sees.
struct FaultContext {
  FaultPoint point = FaultPoint::kRead;
  std::uint32_t file = 0;               ///< the FileId's value (0 at kOpenDirect: not yet known)
  const std::filesystem::path* path{};  ///< never null
  std::uint64_t offset = 0;             ///< file offset of the request
  std::uint64_t size = 0;               ///< length of the request
  bool direct = false;                  ///< the request would start on the O_DIRECT descriptor
};

/// What the rule asks for; a default-constructed Fault changes nothing.
struct Fault {
  /// Non-zero: the request's first transfer fails with this errno (at kOpenDirect: the open
  /// fails with it, as open(2) would).
  int error = 0;
  /// The request sees the end of the file after this many bytes ("short read").
  std::optional<std::uint64_t> eof_after;
  /// The first transfer of the request returns at most this many bytes.
  std::optional<std::uint64_t> partial;
  /// The request starts this much later (cut short when the read is cancelled).
  std::chrono::nanoseconds delay{0};
};

/// An io::Env that asks `rule` before every O_DIRECT open and every request, and delivers the
/// Fault it answers; everything else goes to `target` (the system by default). The rule is
/// called from I/O threads at once: it must be thread-safe.
class FaultInjectionEnv final : public io::EnvWrapper {
 public:
  using Rule = std::function<Fault(const FaultContext&)>;
  explicit FaultInjectionEnv(Rule rule, io::Env& target = io::Env::posix());

  [[nodiscard]] tensorstream::detail::FileDescriptor open(const std::filesystem::path& path,
                                                          int flags) override;
  [[nodiscard]] io::ReadStep before_request(const io::RequestInfo& request) override;

 private:
  Rule rule_;
};

}  // namespace tensorstream::testing
