// Checksums and fingerprints used by the store format.
//
// Blocks and tensors are checksummed with XXH3-64 (tens of GB/s per core, so verifying a
// read costs far less than the read). A store's model fingerprint is XXH3-128 over the
// tensors' names, dtypes, shapes and data checksums in name order, so it identifies the
// weights independently of how they are grouped into blocks or laid out on disk, and can be
// computed from tensors in memory without writing anything.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tensorstream/dtype.hpp"

namespace tensorstream {

/// XXH3-64 of `data` (seed 0).
[[nodiscard]] std::uint64_t checksum64(std::span<const std::byte> data) noexcept;

/// Incremental XXH3-64: update() with consecutive pieces gives checksum64 of the whole.
/// Not thread-safe.
class Checksum64 {
 public:
  Checksum64();
  ~Checksum64();
  Checksum64(Checksum64&&) noexcept;
  Checksum64& operator=(Checksum64&&) noexcept;
  Checksum64(const Checksum64&) = delete;
  Checksum64& operator=(const Checksum64&) = delete;

  void update(std::span<const std::byte> data) noexcept;
  /// Feeds `n` zero bytes (alignment padding) without the caller allocating them.
  void update_zeros(std::size_t n) noexcept;
  [[nodiscard]] std::uint64_t digest() const noexcept;
  void reset() noexcept;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

/// A 128-bit model fingerprint.
struct Fingerprint {
  std::uint64_t high = 0;
  std::uint64_t low = 0;

  /// 32 lowercase hex digits, high half first.
  [[nodiscard]] std::string hex() const;
  friend bool operator==(const Fingerprint&, const Fingerprint&) = default;
};

/// Computes a Fingerprint from tensors given in any order (they are sorted by name).
/// Not thread-safe.
class FingerprintBuilder {
 public:
  /// Adds one tensor: its name, dtype, shape and the checksum64 of its bytes.
  void add(std::string_view name, DType dtype, std::span<const std::int64_t> shape,
           std::uint64_t data_checksum);
  [[nodiscard]] Fingerprint finish() const;

 private:
  struct Entry {
    std::string name;
    std::string record;  // dtype, shape and checksum, encoded little-endian
  };
  std::vector<Entry> entries_;
};

}  // namespace tensorstream
