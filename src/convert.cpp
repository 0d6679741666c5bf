#include "tensorstream/convert.hpp"

#include <fcntl.h>

#include <fstream>
#include <sstream>
#include <unordered_map>

#include "tensorstream/block_naming.hpp"
#include "tensorstream/detail/json.hpp"
#include "tensorstream/detail/json_writer.hpp"
#include "tensorstream/errors.hpp"
#include "tensorstream/safetensors.hpp"

namespace tensorstream {
namespace {

// Copy granularity: big enough for full-speed sequential reads, small enough to keep the
// converter's memory flat.
constexpr std::size_t kCopyChunk = 16u << 20;

std::string read_text_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// {"format": "tensorstream", "source": ..., "safetensors_metadata": {...}, "config": {...}}
std::string make_user_metadata(const std::filesystem::path& source,
                               const SafetensorsCheckpoint& checkpoint) {
  std::string out = "{\"format\":\"tensorstream\",\"source\":";
  out += detail::json::quote(source.string());
  out += ",\"safetensors_metadata\":{";
  bool first = true;
  for (const auto& [key, value] : checkpoint.files().front().header().metadata) {
    if (!first) out += ",";
    out += detail::json::quote(key);
    out += ":";
    out += detail::json::quote(value);
    first = false;
  }
  out += "}";
  const auto dir = std::filesystem::is_directory(source) ? source : source.parent_path();
  const auto config_path = dir / "config.json";
  if (std::filesystem::is_regular_file(config_path)) {
    std::string config = read_text_file(config_path);
    // Embedded verbatim only if it is valid JSON, so the store's metadata stays parseable.
    try {
      (void)detail::json::parse(config, config_path.string());
      out += ",\"config\":" + config;
    } catch (const FormatError&) {
    }
  }
  out += "}";
  return out;
}

}  // namespace

std::filesystem::path resolve_store_path(const std::filesystem::path& path) {
  if (std::filesystem::is_directory(path)) return path / kDefaultStoreFileName;
  return path;
}

WriteSummary convert_safetensors(const std::filesystem::path& source,
                                 const std::filesystem::path& destination,
                                 const ConvertOptions& options) {
  const auto checkpoint = SafetensorsCheckpoint::open(source);
  std::vector<std::string> names;
  names.reserve(checkpoint.entries().size());
  for (const auto& entry : checkpoint.entries()) names.push_back(entry.tensor->name);

  StoreWriter writer(resolve_store_path(destination), options.writer);
  writer.set_user_metadata(make_user_metadata(source, checkpoint));
  const std::uint64_t total = checkpoint.total_bytes();
  std::uint64_t done = 0;
  // Own descriptors so tensors can be copied in bounded pieces at any offset.
  std::vector<detail::FileDescriptor> files;
  for (const auto& file : checkpoint.files()) files.emplace_back(file.path(), O_RDONLY);
  std::vector<std::byte> chunk;
  for (const auto& group : group_into_blocks(names)) {
    writer.begin_block(group.name);
    for (const auto& name : group.tensors) {
      const auto* entry = checkpoint.find(name);
      const auto& tensor = *entry->tensor;
      writer.begin_tensor(tensor.name, tensor.dtype, tensor.shape);
      for (std::uint64_t at = 0; at < tensor.nbytes; at += chunk.size()) {
        chunk.resize(std::min<std::uint64_t>(kCopyChunk, tensor.nbytes - at));
        files[entry->file].pread_exact(chunk, tensor.offset + at);
        writer.append(chunk);
        done += chunk.size();
        if (options.progress && !options.progress(done, total)) {
          throw OperationCancelled(
              detail::concat("conversion of '", source.string(), "' cancelled"));
        }
      }
      writer.end_tensor();
    }
    writer.end_block();
  }
  return writer.commit();
}

}  // namespace tensorstream
