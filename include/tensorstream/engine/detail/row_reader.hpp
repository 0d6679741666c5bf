// The rows of one tensor, read without the rest of it (Engine::acquire_rows): the rows of an
// embedding that a forward looks up.
//
// A row is a slice of the tensor's first dimension: row_bytes = nbytes / shape[0]. Rows are
// read with pread(2) through the page cache (each file opened once, without O_DIRECT, through
// the engine's Env): an embedding lookup touches a few scattered rows, which the page cache
// serves from memory when they were read before and from the drive at page granularity when
// not. Rows asked for one after the other are read with one call.
//
// Rows of a tensor of a compressed store block are decoded: each chunk that holds some of the
// rows asked for is read (its stored bytes, with pread), its stored checksum checked (always,
// as the decode pipeline does), and decoded once, however many of the rows it holds, and the
// rows are copied out of it. An embedding lookup of n tokens therefore costs at most n chunk
// decodes (1 MiB each with the writer's default chunks), fewer when rows share chunks.
//
// Thread-safety: read() may run on several threads at once (pread shares no file position).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "tensorstream/detail/file.hpp"
#include "tensorstream/engine/source_layout.hpp"
#include "tensorstream/io/env.hpp"

namespace tensorstream::engine::detail {

class RowReader {
 public:
  /// Opens every file of `layout` through `env` (read only). `layout` must outlive the reader.
  /// Throws IoError naming a file that cannot be opened.
  RowReader(const Layout& layout, io::Env& env);

  /// Bytes of one row of `tensor`; std::invalid_argument naming it for a tensor without rows
  /// (a scalar, an empty first dimension).
  [[nodiscard]] static std::uint64_t row_bytes(const TensorPlacement& tensor);

  /// Reads `rows` of `tensor` of unit `block` (each in [0, shape[0]), else
  /// std::invalid_argument naming it) into `dest`, row i at i × row_bytes. Throws IoError /
  /// FormatError naming the unit, the tensor, the file and the offset (and, decoding, the
  /// store block and the chunk; ChecksumError for a damaged chunk when verifying).
  void read(std::uint32_t block, const TensorPlacement& tensor, std::span<const std::int64_t> rows,
            std::byte* dest) const;

 private:
  void read_decoded(const TensorPlacement& tensor, std::span<const std::int64_t> rows,
                    std::byte* dest) const;

  const Layout& layout_;
  std::vector<tensorstream::detail::FileDescriptor> files_;
};

}  // namespace tensorstream::engine::detail
