#include "tensorstream/safetensors.hpp"

#include <fcntl.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <limits>
#include <stdexcept>
#include <system_error>
#include <unordered_map>

#include "tensorstream/detail/json.hpp"
#include "tensorstream/errors.hpp"

namespace tensorstream {
namespace {

using detail::concat;
namespace json = detail::json;

constexpr std::uint64_t kLengthPrefixSize = 8;
constexpr std::string_view kMetadataKey = "__metadata__";
constexpr std::string_view kIndexSuffix = ".safetensors.index.json";
constexpr std::string_view kShardSuffix = ".safetensors";
constexpr std::string_view kPreferredIndex = "model.safetensors.index.json";

// Defined by the safetensors format but not storable here; named so the error says
// "unsupported" rather than "unknown".
constexpr std::array<std::string_view, 3> kUnsupportedDTypes{"F4", "F6_E2M3", "F6_E3M2"};

std::string format_shape(const std::vector<std::int64_t>& shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i != 0) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

bool ends_with(std::string_view text, std::string_view suffix) {
  return text.size() >= suffix.size() && text.substr(text.size() - suffix.size()) == suffix;
}

const json::Integer* as_unsigned(const json::Value& value) {
  const auto* integer = std::get_if<json::Integer>(&value.data);
  return integer != nullptr && !integer->negative ? integer : nullptr;
}

struct ParsedTensor {
  SafetensorsTensor tensor;
  std::uint64_t begin = 0;
  std::uint64_t end = 0;
};

ParsedTensor parse_tensor(const std::string& name, const json::Value& entry,
                          std::string_view source) {
  const auto where = [&] { return concat(source, ": tensor '", name, "': "); };
  const auto* members = std::get_if<json::Object>(&entry.data);
  TS_EXPECT(members != nullptr, FormatError, where(), "entry is not a JSON object");
  for (const auto& [key, value] : *members) {
    TS_EXPECT(key == "dtype" || key == "shape" || key == "data_offsets", FormatError, where(),
              "unknown key '", key, "' (expected dtype, shape, data_offsets)");
  }
  const json::Value* dtype_value = entry.find("dtype");
  const json::Value* shape_value = entry.find("shape");
  const json::Value* offsets_value = entry.find("data_offsets");
  TS_EXPECT(dtype_value != nullptr, FormatError, where(), "missing key 'dtype'");
  TS_EXPECT(shape_value != nullptr, FormatError, where(), "missing key 'shape'");
  TS_EXPECT(offsets_value != nullptr, FormatError, where(), "missing key 'data_offsets'");

  ParsedTensor parsed;
  parsed.tensor.name = name;

  const auto* dtype_name = std::get_if<std::string>(&dtype_value->data);
  TS_EXPECT(dtype_name != nullptr, FormatError, where(), "dtype is not a string");
  const auto dtype = dtype_from_safetensors(*dtype_name);
  if (!dtype) {
    const bool defined = std::find(kUnsupportedDTypes.begin(), kUnsupportedDTypes.end(),
                                   *dtype_name) != kUnsupportedDTypes.end();
    throw FormatError(
        concat(where(), defined ? "unsupported" : "unknown", " dtype '", *dtype_name, "'"));
  }
  parsed.tensor.dtype = *dtype;

  const auto* dims = std::get_if<json::Array>(&shape_value->data);
  TS_EXPECT(dims != nullptr, FormatError, where(), "shape is not an array");
  parsed.tensor.shape.reserve(dims->size());
  std::uint64_t elements = 1;
  bool overflow = false;
  for (std::size_t i = 0; i < dims->size(); ++i) {
    const json::Integer* dim = as_unsigned((*dims)[i]);
    TS_EXPECT(dim != nullptr, FormatError, where(), "shape[", i, "] is not a non-negative integer");
    TS_EXPECT(
        dim->magnitude <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()),
        FormatError, where(), "shape[", i, "] = ", dim->magnitude, " is out of the int64 range");
    parsed.tensor.shape.push_back(static_cast<std::int64_t>(dim->magnitude));
    // As in the reference implementation, the product is checked step by step.
    overflow = overflow || __builtin_mul_overflow(elements, dim->magnitude, &elements);
  }
  const std::uint64_t element_size = dtype_size(*dtype);
  std::uint64_t nbytes = 0;
  overflow = overflow || __builtin_mul_overflow(elements, element_size, &nbytes);
  TS_EXPECT(!overflow, FormatError, where(), "dtype ", *dtype_name, " × shape ",
            format_shape(parsed.tensor.shape), " overflows a 64-bit byte count");
  parsed.tensor.nbytes = nbytes;

  const auto* offsets = std::get_if<json::Array>(&offsets_value->data);
  const json::Integer* begin = nullptr;
  const json::Integer* end = nullptr;
  if (offsets != nullptr && offsets->size() == 2) {
    begin = as_unsigned((*offsets)[0]);
    end = as_unsigned((*offsets)[1]);
  }
  TS_EXPECT(begin != nullptr && end != nullptr, FormatError, where(),
            "data_offsets is not an array of 2 non-negative integers");
  parsed.begin = begin->magnitude;
  parsed.end = end->magnitude;
  TS_EXPECT(parsed.begin <= parsed.end, FormatError, where(), "data_offsets [", parsed.begin, ", ",
            parsed.end, "]: begin is after end");
  TS_EXPECT(parsed.end - parsed.begin == nbytes, FormatError, where(), "data_offsets [",
            parsed.begin, ", ", parsed.end, "] hold ", parsed.end - parsed.begin,
            " bytes but dtype ", *dtype_name, " × shape ", format_shape(parsed.tensor.shape),
            " needs ", nbytes);
  return parsed;
}

std::vector<std::pair<std::string, std::string>> parse_metadata(const json::Value& value,
                                                                std::string_view source) {
  std::vector<std::pair<std::string, std::string>> metadata;
  // The reference implementation reads the field as an Option, so null means "none".
  if (std::holds_alternative<std::nullptr_t>(value.data)) return metadata;
  const auto* members = std::get_if<json::Object>(&value.data);
  TS_EXPECT(members != nullptr, FormatError, source, ": ", kMetadataKey, " is not a JSON object");
  metadata.reserve(members->size());
  for (const auto& [key, field] : *members) {
    const auto* text = std::get_if<std::string>(&field.data);
    TS_EXPECT(text != nullptr, FormatError, source, ": ", kMetadataKey, " field '", key,
              "': value is not a string");
    metadata.emplace_back(key, *text);
  }
  return metadata;
}

std::vector<std::size_t> sorted_by_name(std::size_t count, const auto& name_of) {
  std::vector<std::size_t> order(count);
  for (std::size_t i = 0; i < count; ++i) order[i] = i;
  std::sort(order.begin(), order.end(),
            [&](std::size_t a, std::size_t b) { return name_of(a) < name_of(b); });
  return order;
}

template <typename T>
const T* find_by_name(const std::vector<std::size_t>& by_name, const std::vector<T>& items,
                      std::string_view name, const auto& name_of) {
  const auto it = std::lower_bound(
      by_name.begin(), by_name.end(), name,
      [&](std::size_t index, std::string_view key) { return name_of(items[index]) < key; });
  if (it == by_name.end() || name_of(items[*it]) != name) return nullptr;
  return &items[*it];
}

std::string read_small_file(const std::filesystem::path& path) {
  detail::FileDescriptor fd(path, O_RDONLY);
  const std::uint64_t size = fd.size();
  TS_EXPECT(size <= kSafetensorsMaxHeaderSize, FormatError, path.string(), ": file of ", size,
            " bytes exceeds the limit of ", kSafetensorsMaxHeaderSize, " bytes for an index");
  std::string text(static_cast<std::size_t>(size), '\0');
  fd.pread_exact(std::as_writable_bytes(std::span<char>(text)), 0);
  return text;
}

// An index's shard names are joined to its directory: only plain file names may stay there.
bool is_plain_file_name(std::string_view name) {
  return !name.empty() && name != "." && name != ".." &&
         name.find_first_of(std::string_view("/\0", 2)) == std::string_view::npos;
}

std::vector<SafetensorsFile> open_indexed(const std::filesystem::path& index_path) {
  const std::string index_name = index_path.string();
  const json::Value root = json::parse(read_small_file(index_path), index_name);
  TS_EXPECT(root.is_object(), FormatError, index_name, ": index is not a JSON object");
  const json::Value* weight_map_value = root.find("weight_map");
  TS_EXPECT(weight_map_value != nullptr, FormatError, index_name, ": missing key 'weight_map'");
  const auto* weight_map = std::get_if<json::Object>(&weight_map_value->data);
  TS_EXPECT(weight_map != nullptr, FormatError, index_name, ": weight_map is not a JSON object");
  TS_EXPECT(!weight_map->empty(), FormatError, index_name, ": weight_map lists no tensor");

  std::unordered_map<std::string_view, std::string_view> shard_of;
  std::vector<std::string_view> shard_names;
  shard_of.reserve(weight_map->size());
  for (const auto& [tensor, shard_value] : *weight_map) {
    const auto* shard = std::get_if<std::string>(&shard_value.data);
    TS_EXPECT(shard != nullptr, FormatError, index_name, ": weight_map: tensor '", tensor,
              "': shard name is not a string");
    TS_EXPECT(is_plain_file_name(*shard), FormatError, index_name, ": weight_map: tensor '", tensor,
              "': shard '", *shard, "' is not a plain file name");
    shard_of.emplace(tensor, *shard);  // keys are unique: the parser rejects duplicates
    shard_names.push_back(*shard);
  }
  std::sort(shard_names.begin(), shard_names.end());
  shard_names.erase(std::unique(shard_names.begin(), shard_names.end()), shard_names.end());

  const std::filesystem::path directory = index_path.parent_path();
  std::vector<SafetensorsFile> files;
  files.reserve(shard_names.size());
  for (const std::string_view shard : shard_names) {
    try {
      files.push_back(SafetensorsFile::open(directory / std::string(shard)));
    } catch (const IoError& e) {
      // The shard's path alone does not say why it was wanted: name the index that lists it.
      throw IoError(concat(index_name, ": shard '", shard, "' listed in the index: ", e.what()),
                    e.code());
    }
  }

  for (const auto& [tensor, shard_value] : *weight_map) {
    const auto& shard = std::get<std::string>(shard_value.data);
    const auto position = std::lower_bound(shard_names.begin(), shard_names.end(), shard);
    const SafetensorsFile& file = files[static_cast<std::size_t>(position - shard_names.begin())];
    TS_EXPECT(file.find(tensor) != nullptr, FormatError, index_name, ": tensor '", tensor,
              "' is listed in shard '", shard, "', which does not hold it");
  }
  for (std::size_t i = 0; i < files.size(); ++i) {
    for (const SafetensorsTensor& tensor : files[i].tensors()) {
      const auto listed = shard_of.find(tensor.name);
      TS_EXPECT(listed != shard_of.end(), FormatError, files[i].path().string(), ": tensor '",
                tensor.name, "' is not listed in index ", index_name);
      TS_EXPECT(listed->second == shard_names[i], FormatError, files[i].path().string(),
                ": tensor '", tensor.name, "' is also held here, but index ", index_name,
                " places it in shard '", listed->second, "'");
    }
  }
  return files;
}

std::vector<SafetensorsFile> open_directory(const std::filesystem::path& directory) {
  std::vector<std::string> indexes;
  std::vector<std::string> shards;
  std::error_code error;
  for (std::filesystem::directory_iterator it(directory, error), end; !error && it != end;
       it.increment(error)) {
    // is_regular_file follows symbolic links, as in a Hugging Face cache snapshot.
    std::error_code type_error;
    if (!it->is_regular_file(type_error)) continue;
    std::string name = it->path().filename().string();
    if (ends_with(name, kIndexSuffix)) {
      indexes.push_back(std::move(name));
    } else if (ends_with(name, kShardSuffix)) {
      shards.push_back(std::move(name));
    }
  }
  if (error) detail::throw_errno(concat("cannot list '", directory.string(), "'"), error.value());

  if (!indexes.empty()) {
    std::sort(indexes.begin(), indexes.end());
    const bool has_preferred =
        std::find(indexes.begin(), indexes.end(), kPreferredIndex) != indexes.end();
    if (!has_preferred && indexes.size() > 1) {
      std::string names;
      for (const auto& name : indexes) names += (names.empty() ? "" : ", ") + name;
      throw FormatError(concat(directory.string(), ": several index files (", names,
                               ") and none is ", kPreferredIndex,
                               "; pass the path of the index to use"));
    }
    return open_indexed(directory / (has_preferred ? std::string(kPreferredIndex) : indexes[0]));
  }

  TS_EXPECT(!shards.empty(), FormatError, directory.string(), ": no *", kShardSuffix,
            " file and no *", kIndexSuffix, " file in the directory");
  std::sort(shards.begin(), shards.end());
  std::vector<SafetensorsFile> files;
  files.reserve(shards.size());
  for (const auto& shard : shards) files.push_back(SafetensorsFile::open(directory / shard));
  return files;
}

}  // namespace

SafetensorsHeader parse_safetensors_header(std::span<const std::byte> json_bytes,
                                           std::uint64_t file_size, std::string_view source) {
  SafetensorsHeader header;
  header.header_size = json_bytes.size();
  TS_EXPECT(header.header_size <= kSafetensorsMaxHeaderSize, FormatError, source,
            ": header length ", header.header_size, " exceeds the limit of ",
            kSafetensorsMaxHeaderSize, " bytes");
  header.data_offset = kLengthPrefixSize + header.header_size;
  TS_EXPECT(header.data_offset <= file_size, FormatError, source, ": header length ",
            header.header_size, " exceeds the file size ", file_size, " (", kLengthPrefixSize,
            " + ", header.header_size, " > ", file_size, ")");
  const std::uint64_t data_size = file_size - header.data_offset;

  const std::string_view text(reinterpret_cast<const char*>(json_bytes.data()), json_bytes.size());
  const json::Value root = json::parse(text, source);
  const auto* members = std::get_if<json::Object>(&root.data);
  TS_EXPECT(members != nullptr, FormatError, source, ": header is not a JSON object");

  std::vector<ParsedTensor> parsed;
  parsed.reserve(members->size());
  for (const auto& [name, value] : *members) {
    if (name == kMetadataKey) {
      header.metadata = parse_metadata(value, source);
    } else {
      parsed.push_back(parse_tensor(name, value, source));
    }
  }

  // Zero-size tensors may share an offset with a neighbour: (begin, end) order keeps them
  // in front of it, and the stable sort keeps file order among equals.
  std::stable_sort(parsed.begin(), parsed.end(), [](const ParsedTensor& a, const ParsedTensor& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  std::uint64_t expected = 0;
  for (std::size_t i = 0; i < parsed.size(); ++i) {
    const ParsedTensor& t = parsed[i];
    if (t.begin != expected) {
      const auto describe = [](const ParsedTensor& p) {
        return concat("'", p.tensor.name, "' [", p.begin, ", ", p.end, "]");
      };
      if (i == 0) {
        throw FormatError(concat(source, ": tensor ", describe(t),
                                 ": the data section starts with a gap of ", t.begin,
                                 " unused bytes (the first tensor must begin at 0)"));
      }
      throw FormatError(concat(source, ": tensor ", describe(t),
                               t.begin > expected ? " leaves a gap after" : " overlaps", " tensor ",
                               describe(parsed[i - 1]), "; tensors must tile the data section"));
    }
    expected = t.end;
  }
  if (expected != data_size) {
    if (parsed.empty()) {
      throw FormatError(concat(source, ": header lists no tensor but the data section holds ",
                               data_size, " bytes"));
    }
    const std::string& last = parsed.back().tensor.name;
    if (expected < data_size) {
      throw FormatError(concat(
          source, ": ", data_size - expected, " trailing bytes after the last tensor '", last,
          "' (the data section holds ", data_size, " bytes, the tensors ", expected, ")"));
    }
    throw FormatError(concat(source, ": file truncated: tensor '", last, "' ends at byte ",
                             expected, " of the data section, which holds only ", data_size,
                             " bytes"));
  }

  header.tensors.reserve(parsed.size());
  for (ParsedTensor& t : parsed) {
    t.tensor.offset = header.data_offset + t.begin;  // t.end <= data_size: cannot overflow
    header.tensors.push_back(std::move(t.tensor));
  }
  return header;
}

SafetensorsFile::SafetensorsFile(detail::FileDescriptor fd, std::uint64_t file_size,
                                 SafetensorsHeader header)
    : fd_(std::move(fd)), file_size_(file_size), header_(std::move(header)) {
  by_name_ = sorted_by_name(header_.tensors.size(), [this](std::size_t i) -> std::string_view {
    return header_.tensors[i].name;
  });
}

SafetensorsFile SafetensorsFile::open(const std::filesystem::path& path) {
  detail::FileDescriptor fd(path, O_RDONLY);
  const std::string source = path.string();
  const std::uint64_t file_size = fd.size();
  TS_EXPECT(file_size >= kLengthPrefixSize, FormatError, source, ": file of ", file_size,
            " bytes is too short for the ", kLengthPrefixSize, "-byte header length");
  std::array<std::byte, kLengthPrefixSize> prefix{};
  fd.pread_exact(prefix, 0);
  std::uint64_t header_size = 0;
  for (std::size_t i = 0; i < prefix.size(); ++i) {
    header_size |= static_cast<std::uint64_t>(prefix[i]) << (8 * i);
  }
  TS_EXPECT(header_size <= kSafetensorsMaxHeaderSize, FormatError, source, ": header length ",
            header_size, " exceeds the limit of ", kSafetensorsMaxHeaderSize, " bytes");
  TS_EXPECT(header_size <= file_size - kLengthPrefixSize, FormatError, source, ": header length ",
            header_size, " exceeds the file size ", file_size, " (", kLengthPrefixSize, " + ",
            header_size, " > ", file_size, ")");
  std::vector<std::byte> json_bytes(static_cast<std::size_t>(header_size));
  fd.pread_exact(json_bytes, kLengthPrefixSize);
  SafetensorsHeader header = parse_safetensors_header(json_bytes, file_size, source);
  return SafetensorsFile(std::move(fd), file_size, std::move(header));
}

const SafetensorsTensor* SafetensorsFile::find(std::string_view name) const noexcept {
  return find_by_name(by_name_, header_.tensors, name,
                      [](const SafetensorsTensor& t) -> std::string_view { return t.name; });
}

void SafetensorsFile::read(const SafetensorsTensor& tensor, std::span<std::byte> out) const {
  if (out.size() != tensor.nbytes) {
    throw std::invalid_argument(concat(path().string(), ": tensor '", tensor.name,
                                       "': output buffer holds ", out.size(),
                                       " bytes but the tensor has ", tensor.nbytes));
  }
  // A tensor of another file must not read past this one's data section.
  if (tensor.offset < header_.data_offset || tensor.offset > file_size_ ||
      tensor.nbytes > file_size_ - tensor.offset) {
    throw std::invalid_argument(concat(path().string(), ": tensor '", tensor.name, "': bytes [",
                                       tensor.offset, ", +", tensor.nbytes,
                                       ") are outside this file's data section"));
  }
  fd_.pread_exact(out, tensor.offset);
}

SafetensorsCheckpoint SafetensorsCheckpoint::open(const std::filesystem::path& path) {
  std::error_code error;
  const auto status = std::filesystem::status(path, error);
  if (error) detail::throw_errno(concat("cannot open '", path.string(), "'"), error.value());

  SafetensorsCheckpoint checkpoint;
  if (std::filesystem::is_directory(status)) {
    checkpoint.files_ = open_directory(path);
  } else if (!std::filesystem::is_regular_file(status)) {
    throw FormatError(concat(path.string(), ": not a regular file or directory"));
  } else if (ends_with(path.filename().string(), kIndexSuffix)) {
    checkpoint.files_ = open_indexed(path);
  } else {
    checkpoint.files_.push_back(SafetensorsFile::open(path));
  }

  for (std::size_t f = 0; f < checkpoint.files_.size(); ++f) {
    for (const SafetensorsTensor& tensor : checkpoint.files_[f].tensors()) {
      checkpoint.entries_.push_back(Entry{f, &tensor});
    }
  }
  const auto& entries = checkpoint.entries_;
  checkpoint.by_name_ = sorted_by_name(
      entries.size(), [&](std::size_t i) -> std::string_view { return entries[i].tensor->name; });
  for (std::size_t i = 1; i < checkpoint.by_name_.size(); ++i) {
    const Entry& previous = entries[checkpoint.by_name_[i - 1]];
    const Entry& current = entries[checkpoint.by_name_[i]];
    if (previous.tensor->name == current.tensor->name) {
      // A file never holds a name twice (duplicate JSON keys are rejected).
      const auto [first, second] = std::minmax(previous.file, current.file);
      throw FormatError(concat("tensor '", current.tensor->name, "' is in both ",
                               checkpoint.files_[first].path().string(), " and ",
                               checkpoint.files_[second].path().string()));
    }
  }
  return checkpoint;
}

const SafetensorsCheckpoint::Entry* SafetensorsCheckpoint::find(
    std::string_view name) const noexcept {
  return find_by_name(by_name_, entries_, name,
                      [](const Entry& e) -> std::string_view { return e.tensor->name; });
}

std::uint64_t SafetensorsCheckpoint::total_bytes() const noexcept {
  std::uint64_t total = 0;
  for (const Entry& entry : entries_) total += entry.tensor->nbytes;
  return total;
}

}  // namespace tensorstream
