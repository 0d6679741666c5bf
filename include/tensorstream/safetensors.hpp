// Reading Hugging Face safetensors files and sharded checkpoints, as a streaming source.
//
// A safetensors file is: an 8-byte little-endian header length N, N bytes of JSON, then the
// data section. The JSON maps tensor names to {"dtype", "shape", "data_offsets": [begin,
// end]} (offsets relative to the data section) plus an optional "__metadata__" object of
// string values. Validation follows the reference implementation: N is capped, the JSON is
// strict, every tensor's byte count equals prod(shape) × dtype size (checked arithmetic),
// the tensors sorted by offset tile the data section exactly — no gap, no overlap, no
// trailing bytes.
//
// Thread-safety: parsed objects are immutable; SafetensorsFile::read may be called from
// several threads at once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tensorstream/detail/file.hpp"
#include "tensorstream/dtype.hpp"

namespace tensorstream {

/// Largest accepted JSON header, as in the reference implementation (100 MB).
inline constexpr std::uint64_t kSafetensorsMaxHeaderSize = 100'000'000;

/// One tensor of a safetensors file.
struct SafetensorsTensor {
  std::string name;
  DType dtype{};
  std::vector<std::int64_t> shape;
  std::uint64_t offset = 0;  ///< absolute offset of the first byte in the file
  std::uint64_t nbytes = 0;  ///< size in bytes (prod(shape) × dtype size)
};

/// The validated header of one safetensors file.
struct SafetensorsHeader {
  std::uint64_t header_size = 0;           ///< N: length of the JSON header in bytes
  std::uint64_t data_offset = 0;           ///< 8 + N: where the data section starts
  std::vector<SafetensorsTensor> tensors;  ///< sorted by offset
  std::vector<std::pair<std::string, std::string>> metadata;  ///< "__metadata__", in file order
};

/// Parses and validates the JSON header `json` (the N bytes after the length prefix) of a
/// file of `file_size` bytes. `source` names the file in error messages. Throws FormatError
/// naming the source, the tensor and the rule broken. Pure function: no I/O (fuzzed).
[[nodiscard]] SafetensorsHeader parse_safetensors_header(std::span<const std::byte> json,
                                                         std::uint64_t file_size,
                                                         std::string_view source);

/// An open, validated safetensors file.
class SafetensorsFile {
 public:
  /// Opens and validates `path`; throws IoError / FormatError naming the path.
  static SafetensorsFile open(const std::filesystem::path& path);

  [[nodiscard]] const std::filesystem::path& path() const noexcept { return fd_.path(); }
  [[nodiscard]] const SafetensorsHeader& header() const noexcept { return header_; }
  [[nodiscard]] const std::vector<SafetensorsTensor>& tensors() const noexcept {
    return header_.tensors;
  }
  [[nodiscard]] std::uint64_t file_size() const noexcept { return file_size_; }
  [[nodiscard]] int fd() const noexcept { return fd_.get(); }

  /// The tensor called `name`, or nullptr.
  [[nodiscard]] const SafetensorsTensor* find(std::string_view name) const noexcept;

  /// Reads the bytes of `tensor` (which must belong to this file) into `out`, whose size
  /// must equal tensor.nbytes (std::invalid_argument otherwise).
  void read(const SafetensorsTensor& tensor, std::span<std::byte> out) const;

 private:
  SafetensorsFile(detail::FileDescriptor fd, std::uint64_t file_size, SafetensorsHeader header);

  detail::FileDescriptor fd_;
  std::uint64_t file_size_ = 0;
  SafetensorsHeader header_;
  std::vector<std::size_t> by_name_;  // indices into header_.tensors, sorted by name
};

/// A checkpoint made of one or more safetensors files: a single `.safetensors` file, or a
/// Hugging Face checkpoint directory holding `model.safetensors` or shards listed in
/// `model.safetensors.index.json` (any `*.safetensors.index.json`; without an index, every
/// `*.safetensors` file of the directory, in name order), or the path of an index file
/// itself (to choose one where a directory holds several).
class SafetensorsCheckpoint {
 public:
  // Move-only (it owns the files' descriptors); entries stay valid across moves.
  SafetensorsCheckpoint(SafetensorsCheckpoint&&) noexcept = default;
  SafetensorsCheckpoint& operator=(SafetensorsCheckpoint&&) noexcept = default;
  SafetensorsCheckpoint(const SafetensorsCheckpoint&) = delete;
  SafetensorsCheckpoint& operator=(const SafetensorsCheckpoint&) = delete;
  ~SafetensorsCheckpoint() = default;

  /// Opens every file of the checkpoint. With an index, checks that each tensor it lists is
  /// in the shard it names and that no shard holds a tensor the index does not list. A
  /// tensor name present in two files is an error. Throws FormatError / IoError naming the
  /// file and tensor; a shard the index lists that cannot be opened (missing, unreadable) is
  /// an IoError naming the index, the shard and the cause.
  static SafetensorsCheckpoint open(const std::filesystem::path& path);

  /// One tensor and the file that holds it.
  struct Entry {
    std::size_t file = 0;               ///< index into files()
    const SafetensorsTensor* tensor{};  ///< owned by files()[file]
  };

  [[nodiscard]] const std::vector<SafetensorsFile>& files() const noexcept { return files_; }
  /// Every tensor, in file order then offset order (the order that reads sequentially).
  [[nodiscard]] const std::vector<Entry>& entries() const noexcept { return entries_; }
  /// The entry for `name`, or nullptr.
  [[nodiscard]] const Entry* find(std::string_view name) const noexcept;
  /// Sum of all tensors' bytes.
  [[nodiscard]] std::uint64_t total_bytes() const noexcept;

 private:
  SafetensorsCheckpoint() = default;

  std::vector<SafetensorsFile> files_;
  std::vector<Entry> entries_;
  std::vector<std::size_t> by_name_;  // indices into entries_, sorted by tensor name
};

}  // namespace tensorstream
