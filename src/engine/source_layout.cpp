#include "tensorstream/engine/source_layout.hpp"

#include <algorithm>
#include <set>

#include "tensorstream/alignment.hpp"
#include "tensorstream/block_naming.hpp"
#include "tensorstream/errors.hpp"
#include "tensorstream/io/backend.hpp"
#include "tensorstream/safetensors.hpp"
#include "tensorstream/store.hpp"

namespace tensorstream::engine {

std::uint64_t Layout::bytes() const noexcept {
  std::uint64_t total = 0;
  for (const auto& b : blocks) total += b.size;
  return total;
}

BlockLayout layout_of_tensors(std::string name, std::span<const SourceTensor> tensors,
                              std::uint64_t max_gap) {
  // Read order: file, then offset; tensors contiguous in a file share one extent.
  std::vector<std::size_t> order(tensors.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return std::pair(tensors[a].file, tensors[a].file_offset) <
           std::pair(tensors[b].file, tensors[b].file_offset);
  });
  BlockLayout block;
  block.name = std::move(name);
  std::vector<std::uint64_t> offset_of(tensors.size(), 0);
  std::vector<std::size_t> run;  // indices into tensors of the current extent
  auto flush = [&] {
    if (run.empty()) return;
    const auto& first = tensors[run.front()];
    const auto& last = tensors[run.back()];
    Extent extent;
    extent.file = first.file;
    extent.file_offset = first.file_offset;
    extent.length = last.file_offset + last.nbytes - extent.file_offset;
    const auto read = io::plan_read(extent.file_offset, extent.length);
    extent.buffer_offset = block.size;  // aligned: the sum of aligned region sizes
    extent.skip = read.skip;
    extent.label = first.name;
    if (run.size() > 1) extent.label += detail::concat(" .. ", last.name);
    for (const auto i : run) {
      offset_of[i] =
          extent.buffer_offset + extent.skip + tensors[i].file_offset - extent.file_offset;
    }
    block.size += read.aligned_size;
    if (extent.length > 0) block.extents.push_back(std::move(extent));
    run.clear();
  };
  for (const auto i : order) {
    if (!run.empty()) {
      const auto& prev = tensors[run.back()];
      const auto end = prev.file_offset + prev.nbytes;
      const bool contiguous = prev.file == tensors[i].file && end <= tensors[i].file_offset &&
                              tensors[i].file_offset - end <= max_gap;
      if (!contiguous) flush();
    }
    run.push_back(i);
  }
  flush();
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    block.tensors.push_back(
        TensorPlacement{t.name, t.dtype, t.shape, offset_of[i], t.nbytes, t.file, t.file_offset});
  }
  return block;
}

bool pack_for_device(BlockLayout& block) {
  const bool aligned = std::all_of(block.tensors.begin(), block.tensors.end(), [](const auto& t) {
    return t.offset % kTensorPlacementAlignment == 0;
  });
  if (aligned || !block.copies.empty()) return false;
  // In read order (offsets ascending), so a move inside one buffer never overwrites a tensor
  // not yet moved: each packed offset is at most its read offset.
  std::vector<std::size_t> order(block.tensors.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return block.tensors[a].offset < block.tensors[b].offset;
  });
  std::uint64_t end = 0;
  for (const auto i : order) {
    auto& t = block.tensors[i];
    const auto to = align_up(end, kTensorPlacementAlignment);
    if (t.nbytes > 0) block.copies.push_back(CopyRange{t.offset, to, t.nbytes});
    t.offset = to;
    end = to + t.nbytes;
  }
  block.packed_size = std::max<std::uint64_t>(end, 1);
  return true;
}

namespace {

// Caller-given groups, checked: every block named once and non-empty, every tensor known
// (`find` returns nullptr for an unknown one) and in at most one block.
template <typename Find>
void check_groups(const TensorGroups& groups, const std::string& source, Find find) {
  std::set<std::string, std::less<>> block_names;
  std::set<std::string, std::less<>> seen;
  for (const auto& [name, tensor_names] : groups) {
    TS_EXPECT(!tensor_names.empty(), std::invalid_argument, "block '", name, "' lists no tensor");
    TS_EXPECT(block_names.insert(name).second, std::invalid_argument, "block '", name,
              "' is given twice");
    for (const auto& t : tensor_names) {
      TS_EXPECT(find(t), std::invalid_argument, "block '", name, "' lists tensor '", t, "', which ",
                source, " does not hold");
      TS_EXPECT(seen.insert(t).second, std::invalid_argument, "tensor '", t,
                "' is listed in two blocks (the second: '", name, "')");
    }
  }
}

}  // namespace

Layout layout_of_store(const std::filesystem::path& path, const TensorGroups& groups) {
  const auto store = Store::open(path);
  Layout layout;
  layout.source = store.path();
  layout.kind = "store";
  layout.files.push_back(store.path());
  if (groups.empty()) {
    for (std::size_t i = 0; i < store.blocks().size(); ++i) {
      const auto& info = store.blocks()[i];
      BlockLayout block;
      block.name = info.name;
      block.size = info.raw_size;
      block.extents.push_back(
          Extent{0, info.offset, info.stored_size, 0, 0, {}, info.checksum, {}});
      for (const auto& t : store.block_tensors(i)) {
        block.tensors.push_back(TensorPlacement{t.name, t.dtype, t.shape, t.offset_in_block,
                                                t.nbytes, 0, info.offset + t.offset_in_block});
      }
      layout.blocks.push_back(std::move(block));
    }
    return layout;
  }
  const auto where = detail::concat("store '", store.path().string(), "'");
  check_groups(groups, where,
               [&](const std::string& t) { return store.find_tensor(t).has_value(); });
  for (const auto& [name, tensor_names] : groups) {
    std::vector<SourceTensor> tensors;
    std::vector<const TensorInfo*> infos;
    for (const auto& t : tensor_names) {
      const auto& info = store.tensors()[*store.find_tensor(t)];
      const auto& home = store.blocks()[info.block];
      tensors.push_back(SourceTensor{info.name, info.dtype, info.shape, 0,
                                     home.offset + info.offset_in_block, info.nbytes});
      infos.push_back(&info);
    }
    // Tensors of one store block are tensor_alignment apart at most: one read across them.
    auto block = layout_of_tensors(name, tensors, store.info().tensor_alignment);
    for (auto& e : block.extents) {
      for (std::size_t i = 0; i < tensors.size(); ++i) {
        const auto& t = tensors[i];
        if (t.file_offset >= e.file_offset &&
            t.file_offset + t.nbytes <= e.file_offset + e.length) {
          e.tensor_checksums.push_back(
              TensorChecksum{t.name, t.file_offset - e.file_offset, t.nbytes, infos[i]->checksum});
        }
      }
    }
    layout.blocks.push_back(std::move(block));
  }
  return layout;
}

Layout layout_of_safetensors(const std::filesystem::path& path, const TensorGroups& given) {
  const auto checkpoint = SafetensorsCheckpoint::open(path);
  Layout layout;
  layout.source = path;
  layout.kind = "checkpoint";
  for (const auto& f : checkpoint.files()) layout.files.push_back(f.path());
  TS_EXPECT(!checkpoint.entries().empty(), FormatError, "safetensors checkpoint '", path.string(),
            "' holds no tensor");
  TensorGroups groups = given;
  if (groups.empty()) {
    std::vector<std::string> names;
    for (const auto& e : checkpoint.entries()) names.push_back(e.tensor->name);
    for (auto& g : group_into_blocks(names)) groups.emplace_back(g.name, std::move(g.tensors));
  }
  check_groups(groups, detail::concat("checkpoint '", path.string(), "'"),
               [&](const std::string& t) { return checkpoint.find(t) != nullptr; });
  for (const auto& [name, tensor_names] : groups) {
    std::vector<SourceTensor> tensors;
    for (const auto& t : tensor_names) {
      const auto* entry = checkpoint.find(t);
      const auto& tensor = *entry->tensor;
      tensors.push_back(SourceTensor{tensor.name, tensor.dtype, tensor.shape,
                                     static_cast<std::uint32_t>(entry->file), tensor.offset,
                                     tensor.nbytes});
    }
    layout.blocks.push_back(layout_of_tensors(name, tensors));
  }
  return layout;
}

std::string describe_extent(const Layout& layout, std::uint32_t block, std::size_t extent) {
  const auto& info = layout.blocks[block];
  const auto& e = info.extents[extent];
  const auto& file = layout.files[e.file];
  return e.label.empty()
             ? detail::concat("block '", info.name, "' (", e.length, " bytes at offset ",
                              e.file_offset, " of '", file.string(), "')")
             : detail::concat("block '", info.name, "', tensor '", e.label, "' (", e.length,
                              " bytes at offset ", e.file_offset, " of '", file.string(), "')");
}

}  // namespace tensorstream::engine
