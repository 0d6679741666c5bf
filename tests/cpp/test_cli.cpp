// The native command line: convert, inspect, verify, exit codes and messages.
#include <gtest/gtest.h>

#include <sstream>

#include "cli.hpp"
#include "tensorstream/codec.hpp"
#include "tensorstream/detail/endian.hpp"
#include "tensorstream/store.hpp"
#include "test_helpers.hpp"

namespace ts = tensorstream;
using ts::testing::TempDir;

namespace {

struct Result {
  int code;
  std::string out;
  std::string err;
};

Result run(std::vector<std::string> args) {
  std::ostringstream out;
  std::ostringstream err;
  const int code = ts::cli::run(args, out, err, /*interactive=*/false);
  return {code, out.str(), err.str()};
}

// A safetensors file with float32 tensors of the given names and element counts: random bytes,
// or weight-like values (which compress).
std::vector<std::byte> make_safetensors(const std::vector<std::pair<std::string, int>>& tensors,
                                        std::uint64_t seed, bool weights = false) {
  std::string header = "{\"__metadata__\":{\"format\":\"pt\"}";
  std::uint64_t offset = 0;
  for (const auto& [name, count] : tensors) {
    const auto end = offset + static_cast<std::uint64_t>(count) * 4;
    header += ",\"" + name + "\":{\"dtype\":\"F32\",\"shape\":[" + std::to_string(count) +
              "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(end) + "]}";
    offset = end;
  }
  header += "}";
  std::vector<std::byte> file(8);
  ts::detail::store_le<std::uint64_t>(file.data(), header.size());
  for (char c : header) file.push_back(static_cast<std::byte>(c));
  const auto data = weights ? ts::testing::weight_bytes(ts::DType::kFloat32, offset / 4, seed)
                            : ts::testing::random_bytes(offset, seed);
  file.insert(file.end(), data.begin(), data.end());
  return file;
}

}  // namespace

TEST(Cli, ConvertInspectVerify) {
  TempDir dir;
  const auto src = dir / "model.safetensors";
  ts::testing::write_file(src, make_safetensors({{"model.layers.1.w", 1000},
                                                 {"model.layers.0.w", 300},
                                                 {"model.layers.0.b", 7},
                                                 {"model.embed_tokens.weight", 2000},
                                                 {"lm_head.weight", 2000}},
                                                2));
  auto r = run({"convert", src.string(), (dir / "out.tstore").string()});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("4 blocks, 5 tensors"), std::string::npos) << r.out;

  const auto store = ts::Store::open(dir / "out.tstore");
  std::vector<std::string> blocks;
  for (const auto& b : store.blocks()) blocks.push_back(b.name);
  EXPECT_EQ(blocks, (std::vector<std::string>{"model.embed_tokens", "model.layers.0",
                                              "model.layers.1", "lm_head"}));
  EXPECT_NE(store.info().user_metadata.find("\"format\":\"pt\""), std::string::npos);

  r = run({"inspect", (dir / "out.tstore").string()});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("model.layers.0.b"), std::string::npos);
  EXPECT_NE(r.out.find("float32"), std::string::npos);
  r = run({"inspect", "--json", (dir / "out.tstore").string()});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out.front(), '{');
  EXPECT_NE(r.out.find("\"name\":\"model.layers.1.w\""), std::string::npos);

  r = run({"verify", (dir / "out.tstore").string()});
  EXPECT_EQ(r.code, 0) << r.out << r.err;
  EXPECT_EQ(r.out.rfind("OK ", 0), 0u) << r.out;

  // Damage one byte of block "model.layers.1": verify fails and names it.
  auto bytes = ts::testing::read_file(dir / "out.tstore");
  bytes[store.blocks()[2].offset + 5] ^= std::byte{1};
  ts::testing::write_file(dir / "out.tstore", bytes);
  r = run({"verify", (dir / "out.tstore").string()});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("BAD block 2 'model.layers.1'"), std::string::npos) << r.out;
}

TEST(Cli, DirectoryStorePath) {
  TempDir dir;
  const auto src = dir / "m.safetensors";
  ts::testing::write_file(src, make_safetensors({{"a.w", 10}}, 1));
  std::filesystem::create_directory(dir / "store");
  ASSERT_EQ(run({"convert", src.string(), (dir / "store").string()}).code, 0);
  EXPECT_TRUE(std::filesystem::exists(dir / "store" / "model.tstore"));
  EXPECT_EQ(run({"verify", (dir / "store").string()}).code, 0);
}

TEST(Cli, ErrorsAndUsage) {
  TempDir dir;
  auto r = run({});
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("usage"), std::string::npos);
  EXPECT_EQ(run({"frobnicate"}).code, 2);
  EXPECT_EQ(run({"convert", "only-one"}).code, 2);
  r = run({"convert", (dir / "missing.safetensors").string(), (dir / "o.tstore").string()});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("missing.safetensors"), std::string::npos) << r.err;
  EXPECT_FALSE(std::filesystem::exists(dir / "o.tstore"));
  ts::testing::write_file(dir / "junk.tstore", ts::testing::random_bytes(5000, 9));
  r = run({"verify", (dir / "junk.tstore").string()});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("bad magic"), std::string::npos) << r.err;
  EXPECT_EQ(run({"version"}).code, 0);
  EXPECT_EQ(run({"doctor"}).code, 0);
}

TEST(Cli, ConvertCompressInspectVerify) {
  if (!ts::codec::available()) GTEST_SKIP() << ts::codec::describe();
  TempDir dir;
  const auto src = dir / "model.safetensors";
  ts::testing::write_file(src, make_safetensors({{"model.layers.0.w", 400000},
                                                 {"model.layers.0.b", 7},
                                                 {"model.layers.1.w", 400000},
                                                 {"lm_head.weight", 2000}},
                                                5, /*weights=*/true));
  const auto out = (dir / "c.tstore").string();
  auto r = run({"convert", "--compress=2", src.string(), out});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("(level 2, "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("x smaller than"), std::string::npos) << r.out;
  const auto store = ts::Store::open(out, ts::OpenOptions{true});
  ASSERT_EQ(store.blocks()[0].name, "model.layers.0");
  ASSERT_EQ(store.blocks()[0].codec, ts::Codec::kChunked);
  for (const auto& c : store.chunks()) {
    EXPECT_EQ(c.level, c.codec == ts::ChunkCodec::kRaw ? 0 : 2);
  }

  r = run({"inspect", out});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("format       1.1"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("compression  1.1"), std::string::npos) << r.out;  // ~1.18x for fp32
  EXPECT_NE(r.out.find("blocks compressed"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(" chunks"), std::string::npos) << r.out;
  r = run({"inspect", "--json", out});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("\"codec\":\"chunked\",\"ratio\":1.1"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"compressed_blocks\":2"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"level\":2"), std::string::npos) << r.out;

  r = run({"verify", out});
  EXPECT_EQ(r.code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("stored and decoded checksums"), std::string::npos) << r.out;

  // Damage one byte inside the second chunk of block 1: verify fails and names the chunk.
  const auto& block = store.blocks()[1];
  const auto& chunk = store.block_chunks(1)[1];
  auto bytes = ts::testing::read_file(out);
  bytes[block.offset + chunk.stored_offset + chunk.stored_size / 2] ^= std::byte{4};
  ts::testing::write_file(out, bytes);
  r = run({"verify", out});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("BAD block 1 'model.layers.1'"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("chunk 1"), std::string::npos) << r.out;

  // --compress alone is level 3; bad levels and options are usage errors.
  ASSERT_EQ(run({"convert", "--compress", src.string(), (dir / "d.tstore").string()}).code, 0);
  int level = 0;
  const auto default_level = ts::Store::open(dir / "d.tstore", ts::OpenOptions{true});
  for (const auto& c : default_level.chunks()) {
    level = std::max<int>(level, c.level);
  }
  EXPECT_EQ(level, 3);
  r = run({"convert", "--compress=0", src.string(), (dir / "e.tstore").string()});
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("--compress"), std::string::npos) << r.err;
  EXPECT_EQ(run({"convert", "--compress=x", src.string(), (dir / "e.tstore").string()}).code, 2);
  EXPECT_EQ(run({"convert", "--frobnicate", src.string(), (dir / "e.tstore").string()}).code, 2);
  EXPECT_FALSE(std::filesystem::exists(dir / "e.tstore"));

  // bench-codec measures the store's tensors (decoding them first) beside plain zstd.
  r = run({"bench-codec", (dir / "d.tstore").string(), "--levels", "1,3", "--threads", "1,2",
           "--max-mib", "1", "--repeat", "1", "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("\"dtype\":\"float32\""), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"plain_ratio\""), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"decode_gbps_per_thread\":{\"1\":"), std::string::npos) << r.out;
  EXPECT_EQ(run({"bench-codec"}).code, 2);
}
