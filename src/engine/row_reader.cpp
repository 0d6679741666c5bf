#include "tensorstream/engine/detail/row_reader.hpp"

#include <fcntl.h>

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
  const auto& file = files_[tensor.file];
  for (std::size_t i = 0; i < rows.size();) {
    std::size_t j = i + 1;
    while (j < rows.size() && rows[j] == rows[j - 1] + 1) ++j;  // one read for a run
    const auto offset = tensor.file_offset + static_cast<std::uint64_t>(rows[i]) * row;
    std::span<std::byte> out(dest + i * row, (j - i) * row);
    try {
      file.pread_exact(out, offset);
    } catch (const IoError& e) {
      throw IoError(concat("rows of tensor '", tensor.name, "' of block '",
                           layout_.blocks[block].name, "': ", e.what()),
                    e.code());
    } catch (const FormatError& e) {
      throw FormatError(concat("rows of tensor '", tensor.name, "' of block '",
                               layout_.blocks[block].name, "': ", e.what()));
    }
    i = j;
  }
}

}  // namespace tensorstream::engine::detail
