#include "tensorstream/safetensors.hpp"

#include <gtest/gtest.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "tensorstream/errors.hpp"
#include "test_helpers.hpp"

namespace tensorstream {
namespace {

namespace fs = std::filesystem;
using testing::random_bytes;
using testing::TempDir;
using testing::write_file;

std::vector<std::byte> to_bytes(std::string_view text) {
  std::vector<std::byte> out(text.size());
  if (!text.empty()) std::memcpy(out.data(), text.data(), text.size());
  return out;
}

void append(std::vector<std::byte>& out, const std::vector<std::byte>& more) {
  out.insert(out.end(), more.begin(), more.end());
}

std::vector<std::byte> le64(std::uint64_t value) {
  std::vector<std::byte> out(8);
  for (int i = 0; i < 8; ++i) out[i] = static_cast<std::byte>((value >> (8 * i)) & 0xff);
  return out;
}

// A file image: the 8-byte length (of `header` unless `length` is given), header, data.
std::vector<std::byte> image(std::string_view header, const std::vector<std::byte>& data = {},
                             std::optional<std::uint64_t> length = std::nullopt) {
  std::vector<std::byte> out = le64(length.value_or(header.size()));
  append(out, to_bytes(header));
  append(out, data);
  return out;
}

std::string shape_json(const std::vector<std::int64_t>& shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(shape[i]);
  }
  return out + "]";
}

// Builds a well-formed safetensors file the way the reference writer lays it out: tensors
// packed in insertion order, header padded with spaces to a multiple of 8.
class FileBuilder {
 public:
  struct Tensor {
    std::string name;
    std::string dtype;
    std::vector<std::int64_t> shape;
    std::vector<std::byte> data;
    std::uint64_t begin = 0;
  };

  FileBuilder& add(std::string name, std::string dtype, std::vector<std::int64_t> shape,
                   std::size_t element_size) {
    std::uint64_t count = 1;
    for (auto d : shape) count *= static_cast<std::uint64_t>(d);
    Tensor t{std::move(name), std::move(dtype), std::move(shape),
             random_bytes(count * element_size, seed_++), data_.size()};
    append(data_, t.data);
    tensors_.push_back(std::move(t));
    return *this;
  }
  FileBuilder& metadata(std::string key, std::string value) {
    metadata_.emplace_back(std::move(key), std::move(value));
    return *this;
  }

  [[nodiscard]] std::string header(bool pad = true) const {
    std::string json = "{";
    if (!metadata_.empty()) {
      json += "\"__metadata__\":{";
      for (std::size_t i = 0; i < metadata_.size(); ++i) {
        json += (i ? "," : "") + ("\"" + metadata_[i].first + "\":\"" + metadata_[i].second + "\"");
      }
      json += "}";
    }
    for (const Tensor& t : tensors_) {
      if (json.size() > 1) json += ",";
      json += "\"" + t.name + "\":{\"dtype\":\"" + t.dtype + "\",\"shape\":" + shape_json(t.shape) +
              ",\"data_offsets\":[" + std::to_string(t.begin) + "," +
              std::to_string(t.begin + t.data.size()) + "]}";
    }
    json += "}";
    if (pad) json.append((8 - json.size() % 8) % 8, ' ');
    return json;
  }
  [[nodiscard]] std::vector<std::byte> bytes(bool pad = true) const {
    return image(header(pad), data_);
  }
  void write(const fs::path& path, bool pad = true) const { write_file(path, bytes(pad)); }

  [[nodiscard]] const std::vector<Tensor>& tensors() const { return tensors_; }
  [[nodiscard]] const std::vector<std::byte>& data() const { return data_; }

 private:
  std::vector<Tensor> tensors_;
  std::vector<std::pair<std::string, std::string>> metadata_;
  std::vector<std::byte> data_;
  std::uint64_t seed_ = 1;
};

// Runs `f`, expecting exception E whose message contains every one of `needles`.
template <typename E>
void expect_error(const std::function<void()>& f, const std::vector<std::string>& needles) {
  try {
    f();
  } catch (const E& e) {
    const std::string message = e.what();
    for (const auto& needle : needles) {
      EXPECT_NE(message.find(needle), std::string::npos)
          << "message: " << message << "\nmissing: " << needle;
    }
    return;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
    return;
  }
  ADD_FAILURE() << "no exception; expected one naming " << ::testing::PrintToString(needles);
}

class Safetensors : public ::testing::Test {
 protected:
  // Writes `bytes` to a file and expects SafetensorsFile::open to reject it with a message
  // naming the file and each of `needles`.
  void expect_rejected(const std::vector<std::byte>& bytes, std::vector<std::string> needles) {
    const fs::path path = dir_ / "bad.safetensors";
    write_file(path, bytes);
    needles.insert(needles.begin(), path.string() + ": ");
    expect_error<FormatError>([&] { (void)SafetensorsFile::open(path); }, needles);
  }
  // One F32 [2] tensor 'w' (8 bytes) with the given offsets, and `data_size` bytes of data.
  void expect_rejected_tensor(const std::string& entry, std::size_t data_size,
                              std::vector<std::string> needles) {
    expect_rejected(image("{\"w\":" + entry + "}", random_bytes(data_size, 3)), needles);
  }

  TempDir dir_;
};

void expect_round_trip(const SafetensorsFile& file, const FileBuilder& built) {
  ASSERT_EQ(file.tensors().size(), built.tensors().size());
  for (const auto& expected : built.tensors()) {
    const SafetensorsTensor* tensor = file.find(expected.name);
    ASSERT_NE(tensor, nullptr) << expected.name;
    EXPECT_EQ(tensor->name, expected.name);
    EXPECT_EQ(dtype_safetensors_name(tensor->dtype), expected.dtype);
    EXPECT_EQ(tensor->shape, expected.shape);
    EXPECT_EQ(tensor->nbytes, expected.data.size());
    EXPECT_EQ(tensor->offset, file.header().data_offset + expected.begin);
    std::vector<std::byte> out(tensor->nbytes);
    file.read(*tensor, out);
    EXPECT_EQ(out, expected.data) << expected.name;
  }
}

TEST_F(Safetensors, RoundTripEveryDType) {
  FileBuilder builder;
  int count = 0;
  for (std::uint16_t raw = 0; raw < 64; ++raw) {
    if (!dtype_is_valid(raw)) continue;
    const auto dtype = static_cast<DType>(raw);
    const std::string_view name = dtype_safetensors_name(dtype);
    if (name.empty()) continue;
    ASSERT_EQ(dtype_from_safetensors(name), dtype);
    builder.add("layer." + std::string(name) + ".weight", std::string(name), {3, 5},
                dtype_size(dtype));
    ++count;
  }
  EXPECT_GE(count, 15);
  builder.add("scalar", "F32", {}, 4).add("empty", "F16", {0, 7}, 2).add("tail", "BF16", {9}, 2);
  builder.metadata("format", "pt").metadata("note", "round trip");
  const fs::path path = dir_ / "model.safetensors";
  builder.write(path);

  const SafetensorsFile file = SafetensorsFile::open(path);
  EXPECT_EQ(file.path(), path);
  EXPECT_EQ(file.file_size(), builder.bytes().size());
  EXPECT_EQ(file.header().header_size, builder.header().size());
  EXPECT_EQ(file.header().data_offset, 8 + builder.header().size());
  EXPECT_GE(file.fd(), 0);
  expect_round_trip(file, builder);
  const auto expected_metadata =
      std::vector<std::pair<std::string, std::string>>{{"format", "pt"}, {"note", "round trip"}};
  EXPECT_EQ(file.header().metadata, expected_metadata);
  EXPECT_EQ(file.find("scalar")->nbytes, 4u);
  EXPECT_TRUE(file.find("scalar")->shape.empty());
  EXPECT_EQ(file.find("empty")->nbytes, 0u);
  EXPECT_EQ(file.find("missing"), nullptr);
  for (std::size_t i = 1; i < file.tensors().size(); ++i) {
    EXPECT_EQ(file.tensors()[i].offset,
              file.tensors()[i - 1].offset + file.tensors()[i - 1].nbytes);
  }
}

TEST_F(Safetensors, HeaderPaddingWithSpacesAndNoPadding) {
  FileBuilder builder;
  builder.add("a", "F32", {3}, 4).add("b", "I64", {2, 2}, 8);
  ASSERT_NE(builder.header(false).size() % 8, 0u);  // the padded layout really pads
  builder.write(dir_ / "padded.safetensors", true);
  builder.write(dir_ / "unpadded.safetensors", false);
  const auto padded = SafetensorsFile::open(dir_ / "padded.safetensors");
  EXPECT_EQ(padded.header().data_offset % 8, 0u);
  expect_round_trip(padded, builder);
  expect_round_trip(SafetensorsFile::open(dir_ / "unpadded.safetensors"), builder);
  // Any JSON whitespace around the object is accepted, NUL padding is not.
  write_file(dir_ / "ws.safetensors", image("\n\t{} \r\n"));
  EXPECT_TRUE(SafetensorsFile::open(dir_ / "ws.safetensors").tensors().empty());
  expect_rejected(image(std::string_view("{}\0\0\0\0\0\0", 8)), {"invalid JSON at byte 2"});
}

TEST_F(Safetensors, OutOfOrderOffsetsThatTileAreSorted) {
  const auto data = random_bytes(24, 9);
  write_file(dir_ / "m.safetensors",
             image(R"({"c":{"dtype":"U8","shape":[8],"data_offsets":[16,24]},)"
                   R"("z0":{"dtype":"U8","shape":[0],"data_offsets":[8,8]},)"
                   R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                   R"("b":{"dtype":"I16","shape":[2,2],"data_offsets":[8,16]}})",
                   data));
  const auto file = SafetensorsFile::open(dir_ / "m.safetensors");
  std::vector<std::string> names;
  for (const auto& t : file.tensors()) names.push_back(t.name);
  EXPECT_EQ(names, (std::vector<std::string>{"a", "z0", "b", "c"}));
  std::vector<std::byte> out(8);
  file.read(*file.find("b"), out);
  EXPECT_EQ(out, std::vector<std::byte>(data.begin() + 8, data.begin() + 16));
}

TEST_F(Safetensors, ZeroTensors) {
  write_file(dir_ / "empty.safetensors", image("{}"));
  EXPECT_TRUE(SafetensorsFile::open(dir_ / "empty.safetensors").tensors().empty());
  write_file(dir_ / "meta.safetensors", image(R"({"__metadata__":{"k":"v"}})"));
  const auto meta = SafetensorsFile::open(dir_ / "meta.safetensors");
  EXPECT_TRUE(meta.tensors().empty());
  ASSERT_EQ(meta.header().metadata.size(), 1u);
  EXPECT_EQ(meta.header().metadata[0].second, "v");
  expect_rejected(image("{}", random_bytes(5, 1)),
                  {"header lists no tensor but the data section holds 5 bytes"});
}

TEST_F(Safetensors, NullMetadataIsNone) {
  write_file(dir_ / "m.safetensors", image(R"({"__metadata__":null})"));
  EXPECT_TRUE(SafetensorsFile::open(dir_ / "m.safetensors").header().metadata.empty());
}

TEST_F(Safetensors, ReadChecksTheBuffer) {
  FileBuilder builder;
  builder.add("w", "F32", {4}, 4);
  builder.write(dir_ / "a.safetensors");
  const auto file = SafetensorsFile::open(dir_ / "a.safetensors");
  std::vector<std::byte> small(15);
  expect_error<std::invalid_argument>([&] { file.read(*file.find("w"), small); },
                                      {"a.safetensors", "tensor 'w'", "15 bytes", "16"});
  SafetensorsTensor foreign = *file.find("w");
  foreign.offset = file.file_size() - 8;
  std::vector<std::byte> out(16);
  expect_error<std::invalid_argument>([&] { file.read(foreign, out); },
                                      {"tensor 'w'", "outside this file's data section"});
}

TEST_F(Safetensors, RejectsHeaderLengthOverCap) {
  expect_rejected(image("{}", {}, kSafetensorsMaxHeaderSize + 1),
                  {"header length 100000001 exceeds the limit of 100000000 bytes"});
  expect_rejected(image("{}", {}, ~std::uint64_t{0}), {"exceeds the limit"});
}

TEST_F(Safetensors, RejectsHeaderLengthOverFileSize) {
  expect_rejected(image("{}", {}, 1000), {"header length 1000 exceeds the file size 10"});
  expect_rejected(image("{}", {}, 3), {"header length 3 exceeds the file size 10 (8 + 3 > 10)"});
  expect_rejected(to_bytes("abc"), {"file of 3 bytes is too short"});
  // The pure parser checks the same rule.
  expect_error<FormatError>(
      [] { (void)parse_safetensors_header(std::as_bytes(std::span("{}", 2)), 9, "src"); },
      {"src: header length 2 exceeds the file size 9"});
}

TEST_F(Safetensors, RejectsTruncatedData) {
  FileBuilder builder;
  builder.add("a", "F32", {2}, 4).add("model.w", "F64", {2}, 8);
  auto bytes = builder.bytes();
  bytes.resize(bytes.size() - 3);
  expect_rejected(
      bytes, {"file truncated: tensor 'model.w' ends at byte 24", "which holds only 21 bytes"});
}

TEST_F(Safetensors, RejectsTrailingBytes) {
  FileBuilder builder;
  builder.add("a", "F32", {2}, 4).add("model.w", "F64", {2}, 8);
  auto bytes = builder.bytes();
  append(bytes, random_bytes(4, 2));
  expect_rejected(bytes, {"4 trailing bytes after the last tensor 'model.w'"});
}

TEST_F(Safetensors, RejectsGap) {
  expect_rejected(image(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                        R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                        random_bytes(12, 1)),
                  {"tensor 'b' [8, 12] leaves a gap after tensor 'a' [0, 4]"});
  expect_rejected(
      image(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", random_bytes(8, 1)),
      {"tensor 'a' [4, 8]", "gap of 4 unused bytes"});
}

TEST_F(Safetensors, RejectsOverlap) {
  expect_rejected(image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                        R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                        random_bytes(12, 1)),
                  {"tensor 'b' [4, 12] overlaps tensor 'a' [0, 8]"});
  // Two tensors on the same bytes.
  expect_rejected(image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                        R"("b":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}})",
                        random_bytes(8, 1)),
                  {"tensor 'b' [0, 8] overlaps tensor 'a' [0, 8]"});
}

TEST_F(Safetensors, RejectsBeginAfterEnd) {
  expect_rejected_tensor(R"({"dtype":"F32","shape":[0],"data_offsets":[8,4]})", 8,
                         {"tensor 'w': data_offsets [8, 4]: begin is after end"});
}

TEST_F(Safetensors, RejectsSizeMismatch) {
  expect_rejected(image(R"({"model.layers.0.mlp.up_proj.weight":)"
                        R"({"dtype":"F32","shape":[5,6],"data_offsets":[0,100]}})",
                        random_bytes(100, 1)),
                  {"tensor 'model.layers.0.mlp.up_proj.weight': data_offsets [0, 100] hold "
                   "100 bytes but dtype F32 × shape [5, 6] needs 120"});
}

TEST_F(Safetensors, RejectsByteCountOverflow) {
  expect_rejected_tensor(R"({"dtype":"F64","shape":[4611686018427387904,8],"data_offsets":[0,8]})",
                         8, {"tensor 'w': dtype F64 × shape [4611686018427387904, 8] overflows"});
  // prod(shape) fits but × dtype size does not.
  expect_rejected_tensor(R"({"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,8]})", 8,
                         {"tensor 'w'", "overflows a 64-bit byte count"});
  expect_rejected_tensor(R"({"dtype":"U8","shape":[9223372036854775808],"data_offsets":[0,8]})", 8,
                         {"tensor 'w': shape[0] = 9223372036854775808 is out of the int64 range"});
}

TEST_F(Safetensors, RejectsBadShape) {
  expect_rejected_tensor(R"({"dtype":"F32","shape":[2,-1],"data_offsets":[0,8]})", 8,
                         {"tensor 'w': shape[1] is not a non-negative integer"});
  expect_rejected_tensor(R"({"dtype":"F32","shape":[2.0],"data_offsets":[0,8]})", 8,
                         {"tensor 'w': shape[0] is not a non-negative integer"});
  expect_rejected_tensor(R"({"dtype":"F32","shape":2,"data_offsets":[0,8]})", 8,
                         {"tensor 'w': shape is not an array"});
}

TEST_F(Safetensors, RejectsBadDataOffsets) {
  for (const char* offsets : {"[0]", "[0,8,8]", "[0,-8]", "[0,8.0]", "{}", "\"0,8\""}) {
    expect_rejected_tensor(
        std::string(R"({"dtype":"F32","shape":[2],"data_offsets":)") + offsets + "}", 8,
        {"tensor 'w': data_offsets is not an array of 2 non-negative integers"});
  }
}

TEST_F(Safetensors, RejectsUnknownDType) {
  expect_rejected_tensor(R"({"dtype":"F128","shape":[2],"data_offsets":[0,8]})", 8,
                         {"tensor 'w': unknown dtype 'F128'"});
  expect_rejected_tensor(R"({"dtype":"f32","shape":[2],"data_offsets":[0,8]})", 8,
                         {"tensor 'w': unknown dtype 'f32'"});
  expect_rejected_tensor(R"({"dtype":"F4","shape":[16],"data_offsets":[0,8]})", 8,
                         {"tensor 'w': unsupported dtype 'F4'"});
  expect_rejected_tensor(R"({"dtype":4,"shape":[2],"data_offsets":[0,8]})", 8,
                         {"tensor 'w': dtype is not a string"});
}

TEST_F(Safetensors, RejectsUnknownKey) {
  expect_rejected_tensor(R"({"dtype":"F32","shape":[2],"data_offsets":[0,8],"offset":0})", 8,
                         {"tensor 'w': unknown key 'offset'"});
}

TEST_F(Safetensors, RejectsMissingKey) {
  expect_rejected_tensor(R"({"dtype":"F32","data_offsets":[0,8]})", 8,
                         {"tensor 'w': missing key 'shape'"});
  expect_rejected_tensor(R"({"shape":[2],"data_offsets":[0,8]})", 8,
                         {"tensor 'w': missing key 'dtype'"});
  expect_rejected_tensor(R"({"dtype":"F32","shape":[2]})", 8,
                         {"tensor 'w': missing key 'data_offsets'"});
  expect_rejected_tensor("[1]", 8, {"tensor 'w': entry is not a JSON object"});
}

TEST_F(Safetensors, RejectsBadMetadata) {
  expect_rejected(image(R"({"__metadata__":{"format":"pt","epoch":3}})"),
                  {"__metadata__ field 'epoch': value is not a string"});
  expect_rejected(image(R"({"__metadata__":["pt"]})"), {"__metadata__ is not a JSON object"});
}

TEST_F(Safetensors, RejectsNonObjectHeader) {
  expect_rejected(image("[]"), {"header is not a JSON object"});
  expect_rejected(image("\"x\""), {"header is not a JSON object"});
  expect_rejected(image(""), {"invalid JSON at byte 0"});
  expect_rejected(image("{\"a\":"), {"invalid JSON at byte 5"});
}

TEST_F(Safetensors, RejectsDuplicateTensorNames) {
  expect_rejected(image(R"({"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                        R"("w":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})",
                        random_bytes(8, 1)),
                  {"invalid JSON at byte 53", "duplicate object key \"w\""});
}

TEST_F(Safetensors, ParseHeaderIsPure) {
  const std::string json = R"({"x":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]}})";
  const auto header = parse_safetensors_header(std::as_bytes(std::span(json.data(), json.size())),
                                               8 + json.size() + 12, "mem");
  ASSERT_EQ(header.tensors.size(), 1u);
  EXPECT_EQ(header.tensors[0].dtype, DType::kBFloat16);
  EXPECT_EQ(header.tensors[0].offset, 8 + json.size());
  EXPECT_EQ(header.tensors[0].nbytes, 12u);
  EXPECT_EQ(header.tensors[0].shape, (std::vector<std::int64_t>{2, 3}));
}

// ---- checkpoints -------------------------------------------------------------------------

class Checkpoint : public ::testing::Test {
 protected:
  // Three shards of two tensors each; returns name -> builder tensor.
  void write_shards() {
    const char* names[] = {"model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                           "model-00003-of-00003.safetensors"};
    for (int s = 0; s < 3; ++s) {
      FileBuilder builder;
      const std::string layer = "model.layers." + std::to_string(s);
      builder.add(layer + ".mlp.weight", "BF16", {4, 8}, 2).add(layer + ".norm", "F32", {8}, 4);
      builder.write(dir_ / names[s]);
      for (const auto& t : builder.tensors()) {
        expected_[t.name] = t.data;
        shard_of_[t.name] = names[s];
      }
    }
  }
  void write_index(const std::map<std::string, std::string>& weight_map,
                   const std::string& name = "model.safetensors.index.json") {
    std::string json = R"({"metadata":{"total_size":0},"weight_map":{)";
    bool first = true;
    for (const auto& [tensor, shard] : weight_map) {
      json += (first ? "\"" : ",\"") + tensor + "\":\"" + shard + "\"";
      first = false;
    }
    json += "}}";
    write_file(dir_ / name, to_bytes(json));
  }
  void expect_rejected(const fs::path& path, const std::vector<std::string>& needles) {
    expect_error<FormatError>([&] { (void)SafetensorsCheckpoint::open(path); }, needles);
  }

  TempDir dir_;
  std::map<std::string, std::vector<std::byte>> expected_;
  std::map<std::string, std::string> shard_of_;
};

TEST_F(Checkpoint, ShardedWithIndex) {
  write_shards();
  write_index(shard_of_);
  // A stray file the index does not name is not part of the checkpoint.
  FileBuilder stray;
  stray.add("model.layers.0.norm", "F32", {8}, 4);
  stray.write(dir_ / "consolidated.safetensors");

  for (const fs::path& path : {dir_.path(), dir_ / "model.safetensors.index.json"}) {
    const auto ckpt = SafetensorsCheckpoint::open(path);
    ASSERT_EQ(ckpt.files().size(), 3u);
    EXPECT_EQ(ckpt.files()[0].path().filename(), "model-00001-of-00003.safetensors");
    EXPECT_EQ(ckpt.files()[2].path().filename(), "model-00003-of-00003.safetensors");
    ASSERT_EQ(ckpt.entries().size(), 6u);
    std::uint64_t total = 0;
    for (std::size_t i = 0; i < ckpt.entries().size(); ++i) {
      const auto& entry = ckpt.entries()[i];
      EXPECT_EQ(entry.file, i / 2);  // file order, then offset order
      if (i % 2 == 1) {
        EXPECT_GT(entry.tensor->offset, ckpt.entries()[i - 1].tensor->offset);
      }
      total += entry.tensor->nbytes;
    }
    EXPECT_EQ(ckpt.total_bytes(), total);
    EXPECT_EQ(total, 3u * (64 + 32));
    for (const auto& [name, data] : expected_) {
      const auto* entry = ckpt.find(name);
      ASSERT_NE(entry, nullptr) << name;
      EXPECT_EQ(entry->tensor->name, name);
      EXPECT_EQ(ckpt.files()[entry->file].path().filename(), shard_of_[name]);
      std::vector<std::byte> out(entry->tensor->nbytes);
      ckpt.files()[entry->file].read(*entry->tensor, out);
      EXPECT_EQ(out, data) << name;
    }
    EXPECT_EQ(ckpt.find("model.layers.9.norm"), nullptr);
  }
}

TEST_F(Checkpoint, SingleFileAndDirectoryWithoutIndex) {
  FileBuilder a;
  a.add("x", "F32", {2}, 4);
  a.write(dir_ / "b.safetensors");
  FileBuilder b;
  b.add("y", "I8", {3}, 1).add("z", "U8", {1}, 1);
  b.write(dir_ / "a.safetensors");
  write_file(dir_ / "README.md", to_bytes("not a tensor file"));

  const auto single = SafetensorsCheckpoint::open(dir_ / "b.safetensors");
  ASSERT_EQ(single.files().size(), 1u);
  ASSERT_EQ(single.entries().size(), 1u);
  EXPECT_EQ(single.find("x")->tensor->nbytes, 8u);

  const auto all = SafetensorsCheckpoint::open(dir_.path());
  ASSERT_EQ(all.files().size(), 2u);
  EXPECT_EQ(all.files()[0].path().filename(), "a.safetensors");  // name order
  std::vector<std::string> names;
  for (const auto& e : all.entries()) names.push_back(e.tensor->name);
  EXPECT_EQ(names, (std::vector<std::string>{"y", "z", "x"}));
  EXPECT_EQ(all.find("x")->file, 1u);
  EXPECT_EQ(all.total_bytes(), 12u);
}

TEST_F(Checkpoint, IndexListsTensorTheShardLacks) {
  write_shards();
  auto weight_map = shard_of_;
  weight_map["model.layers.7.attn.weight"] = "model-00002-of-00003.safetensors";
  write_index(weight_map);
  expect_rejected(dir_.path(),
                  {"model.safetensors.index.json", "tensor 'model.layers.7.attn.weight'",
                   "listed in shard 'model-00002-of-00003.safetensors'", "does not hold it"});
}

TEST_F(Checkpoint, ShardHoldsUnlistedTensor) {
  write_shards();
  auto weight_map = shard_of_;
  weight_map.erase("model.layers.1.norm");
  write_index(weight_map);
  expect_rejected(dir_.path(), {"model-00002-of-00003.safetensors: tensor 'model.layers.1.norm'",
                                "is not listed in index", "model.safetensors.index.json"});
}

TEST_F(Checkpoint, IndexedTensorInTwoShards) {
  write_shards();
  FileBuilder extra;
  extra.add("other", "U8", {3}, 1).add("model.layers.0.norm", "F32", {8}, 4);
  extra.write(dir_ / "model-extra.safetensors");
  auto weight_map = shard_of_;
  weight_map["other"] = "model-extra.safetensors";
  write_index(weight_map);
  expect_rejected(dir_.path(), {"model-extra.safetensors: tensor 'model.layers.0.norm'",
                                "places it in shard 'model-00001-of-00003.safetensors'"});
}

TEST_F(Checkpoint, SameTensorInTwoFilesWithoutIndex) {
  FileBuilder a;
  a.add("shared", "F32", {2}, 4);
  a.write(dir_ / "one.safetensors");
  FileBuilder b;
  b.add("other", "F32", {2}, 4).add("shared", "F16", {2}, 2);
  b.write(dir_ / "two.safetensors");
  expect_rejected(dir_.path(),
                  {"tensor 'shared' is in both", "one.safetensors and ", "two.safetensors"});
}

TEST_F(Checkpoint, IndexShardOutsideDirectory) {
  write_shards();
  auto weight_map = shard_of_;
  weight_map["model.layers.0.norm"] = "../x.safetensors";
  write_index(weight_map);
  expect_rejected(dir_.path(), {"model.safetensors.index.json", "tensor 'model.layers.0.norm'",
                                "shard '../x.safetensors' is not a plain file name"});
  weight_map["model.layers.0.norm"] = "..";
  write_index(weight_map);
  expect_rejected(dir_.path(), {"shard '..' is not a plain file name"});
}

TEST_F(Checkpoint, BadIndexDocuments) {
  write_file(dir_ / "model.safetensors.index.json", to_bytes(R"({"metadata":{}})"));
  expect_rejected(dir_.path(), {"model.safetensors.index.json: missing key 'weight_map'"});
  write_file(dir_ / "model.safetensors.index.json", to_bytes(R"({"weight_map":[]})"));
  expect_rejected(dir_.path(), {"weight_map is not a JSON object"});
  write_file(dir_ / "model.safetensors.index.json", to_bytes(R"({"weight_map":{}})"));
  expect_rejected(dir_.path(), {"weight_map lists no tensor"});
  write_file(dir_ / "model.safetensors.index.json", to_bytes(R"({"weight_map":{"a":1}})"));
  expect_rejected(dir_.path(), {"tensor 'a': shard name is not a string"});
  write_file(dir_ / "model.safetensors.index.json", to_bytes(R"({"weight_map":{"a":"x"}})"));
  expect_error<IoError>([&] { (void)SafetensorsCheckpoint::open(dir_.path()); },
                        {"cannot open", "x"});
  write_file(dir_ / "model.safetensors.index.json", to_bytes("{"));
  expect_rejected(dir_.path(), {"model.safetensors.index.json: invalid JSON at byte 1"});
}

TEST_F(Checkpoint, MissingShardNamesTheIndex) {
  write_shards();
  auto weight_map = shard_of_;
  weight_map["model.layers.0.norm"] = "model-00004-of-00003.safetensors";
  write_index(weight_map);
  try {
    (void)SafetensorsCheckpoint::open(dir_.path());
    FAIL() << "a missing shard was not reported";
  } catch (const IoError& e) {
    EXPECT_EQ(e.code(), ENOENT);
    const std::string message = e.what();
    const std::vector<std::string> needles{
        "model.safetensors.index.json: shard 'model-00004-of-00003.safetensors' listed in the "
        "index",
        "cannot open", (dir_ / "model-00004-of-00003.safetensors").string()};
    for (const auto& needle : needles) {
      EXPECT_NE(message.find(needle), std::string::npos) << message << "\nmissing: " << needle;
    }
  }
}

TEST_F(Checkpoint, ChoosesAmongIndexes) {
  write_shards();
  write_index(shard_of_, "a.safetensors.index.json");
  write_index(shard_of_, "b.safetensors.index.json");
  expect_rejected(dir_.path(), {"several index files (a.safetensors.index.json, "
                                "b.safetensors.index.json)"});
  EXPECT_EQ(SafetensorsCheckpoint::open(dir_ / "b.safetensors.index.json").entries().size(), 6u);
  write_index(shard_of_);
  EXPECT_EQ(SafetensorsCheckpoint::open(dir_.path()).entries().size(), 6u);
}

TEST_F(Checkpoint, EmptyOrMissing) {
  expect_rejected(dir_.path(), {dir_.path().string() + ": no *.safetensors file"});
  expect_error<IoError>([&] { (void)SafetensorsCheckpoint::open(dir_ / "nope"); },
                        {"cannot open", "nope"});
}

}  // namespace
}  // namespace tensorstream
