#include "tensorstream/engine/detail/row_reader.hpp"

#include <fcntl.h>

#include <algorithm>

#include "tensorstream/codec.hpp"
#include "tensorstream/errors.hpp"

namespace tensorstream::engine::detail {

using tensorstream::detail::concat;

RowReader::RowReader(const Layout& layout, io::Env& env) : layout_(layout) {
  for (const auto& f : layout_.files) files_.push_back(env.open(f, O_RDONLY | O_CLOEXEC));
}

std::uint64_t RowReader::row_bytes(const TensorPlacement& tensor) {
  TS_EXPECT(!tensor.shape.empty() && tensor.shape.front() > 0, std::invalid_argument, "tensor '",
            tensor.name, "' has no rows to read (shape of rank ", tensor.shape.size(), ")");
  return tensor.nbytes / static_cast<std::uint64_t>(tensor.shape.front());
}

void RowReader::read(std::uint32_t block, const TensorPlacement& tensor,
                     std::span<const std::int64_t> rows, std::byte* dest) const {
  const auto row = row_bytes(tensor);
  const auto count = tensor.shape.front();
  for (const auto r : rows) {
    TS_EXPECT(r >= 0 && r < count, std::invalid_argument, "row ", r, " of tensor '", tensor.name,
              "' is out of range (", count, " rows)");
  }
  // Whichever way the rows are read, an error names the tensor and its block.
  const auto context = [&] {
    return concat("rows of tensor '", tensor.name, "' of block '", layout_.blocks[block].name,
                  "': ");
  };
  try {
    if (tensor.compressed) {
      read_decoded(tensor, rows, dest);
      return;
    }
    const auto& file = files_[tensor.file];
    for (std::size_t i = 0; i < rows.size();) {
      std::size_t j = i + 1;
      while (j < rows.size() && rows[j] == rows[j - 1] + 1) ++j;  // one read for a run
      const auto offset = tensor.file_offset + static_cast<std::uint64_t>(rows[i]) * row;
      file.pread_exact(std::span<std::byte>(dest + i * row, (j - i) * row), offset);
      i = j;
    }
  } catch (const ChecksumError& e) {
    throw ChecksumError(context() + e.what());
  } catch (const IoError& e) {
    throw IoError(context() + e.what(), e.code());
  } catch (const FormatError& e) {
    throw FormatError(context() + e.what());
  }
}

// Each chunk holding part of a row is read and decoded once (the part of it the rows span),
// then the rows' parts are copied out: rows of one chunk share its read and its decode.
void RowReader::read_decoded(const TensorPlacement& tensor, std::span<const std::int64_t> rows,
                             std::byte* dest) const {
  const auto row = row_bytes(tensor);
  const auto& home = layout_.compressed[*tensor.compressed];
  struct Part {
    std::size_t chunk;
    std::uint64_t raw;  // in the block's decoded bytes
    std::uint64_t bytes;
    std::byte* out;
  };
  std::vector<Part> parts;
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const auto raw = tensor.raw_offset + static_cast<std::uint64_t>(rows[i]) * row;
    const auto range = codec::chunks_covering(home.chunks, raw, row);
    for (std::size_t c = range.first; c < range.first + range.count; ++c) {
      const auto& chunk = home.chunks[c];
      const auto begin = std::max(raw, chunk.raw_offset);
      const auto end = std::min(raw + row, chunk.raw_offset + chunk.raw_size);
      parts.push_back(Part{c, begin, end - begin, dest + i * row + (begin - raw)});
    }
  }
  std::sort(parts.begin(), parts.end(), [](const Part& a, const Part& b) {
    return a.chunk != b.chunk ? a.chunk < b.chunk : a.raw < b.raw;
  });
  const auto& file = files_[home.file];
  const auto path = layout_.files[home.file].string();
  auto& decoder = codec::ChunkDecoder::for_this_thread();
  std::vector<std::byte> stored;
  std::vector<std::byte> decoded;
  for (std::size_t p = 0; p < parts.size();) {
    std::size_t q = p;
    std::uint64_t lo = parts[p].raw;
    std::uint64_t hi = parts[p].raw + parts[p].bytes;
    while (q < parts.size() && parts[q].chunk == parts[p].chunk) {
      lo = std::min(lo, parts[q].raw);
      hi = std::max(hi, parts[q].raw + parts[q].bytes);
      ++q;
    }
    const auto& chunk = home.chunks[parts[p].chunk];
    stored.resize(chunk.stored_size);
    file.pread_exact(stored, home.file_offset + chunk.stored_offset);
    decoded.resize(static_cast<std::size_t>(hi - lo));
    // The stored checksum always, as the decode pipeline does (decode_pipeline.hpp).
    decoder.decode(chunk, stored, lo - chunk.raw_offset, decoded, /*verify=*/true,
                   codec::ChunkLocation{path, home.name, home.index, parts[p].chunk});
    for (; p < q; ++p) {
      std::copy_n(decoded.data() + (parts[p].raw - lo), parts[p].bytes, parts[p].out);
    }
  }
}

}  // namespace tensorstream::engine::detail
