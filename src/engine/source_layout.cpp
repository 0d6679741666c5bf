#include "tensorstream/engine/source_layout.hpp"

#include <algorithm>
#include <set>

#include "tensorstream/alignment.hpp"
#include "tensorstream/block_naming.hpp"
#include "tensorstream/codec.hpp"
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

bool BlockLayout::decoded() const noexcept {
  return std::any_of(extents.begin(), extents.end(),
                     [](const Extent& e) { return e.decode.has_value(); });
}

std::size_t Layout::decoded_blocks() const noexcept {
  return static_cast<std::size_t>(std::count_if(blocks.begin(), blocks.end(),
                                                [](const BlockLayout& b) { return b.decoded(); }));
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
    TensorPlacement p;
    p.name = t.name;
    p.dtype = t.dtype;
    p.shape = t.shape;
    p.offset = offset_of[i];
    p.nbytes = t.nbytes;
    p.file = t.file;
    p.file_offset = t.file_offset;
    block.tensors.push_back(std::move(p));
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

std::string concat_tensor(const std::string& label) {
  return detail::concat(", tensor '", label, "'");
}

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
  // Compressed blocks are decoded by the readers (the extents say how): open to decode.
  const auto store = Store::open(path, OpenOptions{.decode_compressed = true});
  Layout layout;
  layout.source = store.path();
  layout.kind = "store";
  layout.files.push_back(store.path());
  // Layout::compressed index of compressed store block `b`, added on first use.
  std::vector<std::optional<std::uint32_t>> compressed_of(store.blocks().size());
  auto compressed_index = [&](std::uint32_t b) {
    if (!compressed_of[b]) {
      const auto& info = store.blocks()[b];
      const auto chunks = store.block_chunks(b);
      compressed_of[b] = static_cast<std::uint32_t>(layout.compressed.size());
      layout.compressed.push_back(CompressedBlock{
          info.name, b, 0, info.offset, info.raw_size, {chunks.begin(), chunks.end()}});
    }
    return *compressed_of[b];
  };
  if (groups.empty()) {
    for (std::size_t i = 0; i < store.blocks().size(); ++i) {
      const auto& info = store.blocks()[i];
      BlockLayout block;
      block.name = info.name;
      block.size = info.raw_size;
      Extent extent;
      extent.file_offset = info.offset;
      extent.length = info.stored_size;
      std::optional<std::uint32_t> compressed;
      if (info.codec == Codec::kChunked) {
        compressed = compressed_index(static_cast<std::uint32_t>(i));
        extent.checksum = info.raw_checksum;  // verified on the decoded bytes
        extent.decode = ExtentDecode{*compressed, 0, info.raw_size, 0};
      } else {
        extent.checksum = info.checksum;
      }
      block.extents.push_back(std::move(extent));
      for (const auto& t : store.block_tensors(i)) {
        TensorPlacement p;
        p.name = t.name;
        p.dtype = t.dtype;
        p.shape = t.shape;
        p.offset = t.offset_in_block;
        p.nbytes = t.nbytes;
        p.file_offset = compressed ? info.offset : info.offset + t.offset_in_block;
        p.compressed = compressed;
        p.raw_offset = compressed ? t.offset_in_block : 0;
        block.tensors.push_back(std::move(p));
      }
      layout.blocks.push_back(std::move(block));
    }
    return layout;
  }
  const auto where = detail::concat("store '", store.path().string(), "'");
  check_groups(groups, where,
               [&](const std::string& t) { return store.find_tensor(t).has_value(); });
  // A tensor of a compressed block is laid out at its raw position, home.offset +
  // offset_in_block, in a file of its own (1 + its Layout::compressed index) so that only the
  // tensors of one compressed block share an extent; its extents are then rewritten to read
  // the covering chunks of the real file and decode them.
  for (const auto& [name, tensor_names] : groups) {
    std::vector<SourceTensor> tensors;
    std::vector<const TensorInfo*> infos;
    for (const auto& t : tensor_names) {
      const auto& info = store.tensors()[*store.find_tensor(t)];
      const auto& home = store.blocks()[info.block];
      const std::uint32_t file =
          home.codec == Codec::kChunked ? 1 + compressed_index(info.block) : 0;
      tensors.push_back(SourceTensor{info.name, info.dtype, info.shape, file,
                                     home.offset + info.offset_in_block, info.nbytes});
      infos.push_back(&info);
    }
    // Tensors of one store block are tensor_alignment apart at most: one read across them.
    auto block = layout_of_tensors(name, tensors, store.info().tensor_alignment);
    for (auto& e : block.extents) {
      for (std::size_t i = 0; i < tensors.size(); ++i) {
        const auto& t = tensors[i];
        if (t.file == e.file && t.file_offset >= e.file_offset &&
            t.file_offset + t.nbytes <= e.file_offset + e.length) {
          e.tensor_checksums.push_back(
              TensorChecksum{t.name, t.file_offset - e.file_offset, t.nbytes, infos[i]->checksum});
        }
      }
      if (e.file == 0) continue;
      const auto c = e.file - 1;
      const auto& home = layout.compressed[c];
      const auto raw_offset = e.file_offset - home.file_offset;
      const auto range = codec::chunks_covering(home.chunks, raw_offset, e.length);
      e.decode = ExtentDecode{c, raw_offset, e.length, range.stored_begin};
      e.file = home.file;
      e.file_offset = home.file_offset + range.stored_begin;
      e.length = range.stored_end - range.stored_begin;
    }
    for (auto& p : block.tensors) {
      if (p.file == 0) continue;
      const auto c = p.file - 1;
      const auto& home = layout.compressed[c];
      p.compressed = c;
      p.raw_offset = p.file_offset - home.file_offset;
      p.file = home.file;
      p.file_offset = home.file_offset;
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
  if (e.decode) {
    const auto& home = layout.compressed[e.decode->block];
    return detail::concat("block '", info.name, "'",
                          e.label.empty() ? std::string() : concat_tensor(e.label), " (",
                          e.decode->raw_length, " bytes decoded from ", e.length,
                          " stored bytes at offset ", e.file_offset, " of '", file.string(),
                          "', compressed store block '", home.name, "', blocks[", home.index, "])");
  }
  return e.label.empty()
             ? detail::concat("block '", info.name, "' (", e.length, " bytes at offset ",
                              e.file_offset, " of '", file.string(), "')")
             : detail::concat("block '", info.name, "', tensor '", e.label, "' (", e.length,
                              " bytes at offset ", e.file_offset, " of '", file.string(), "')");
}

}  // namespace tensorstream::engine
