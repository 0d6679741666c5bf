// Helpers shared by the GoogleTest suites: temporary directories, random data.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "tensorstream/dtype.hpp"

namespace tensorstream::testing {

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

}  // namespace tensorstream::testing
