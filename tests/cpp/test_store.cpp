// Round trips through StoreWriter / Store: bytes, layout, checksums, fingerprint, API misuse.
#include <gtest/gtest.h>

#include <filesystem>
#include <map>
#include <random>

#include "tensorstream/checksum.hpp"
#include "tensorstream/errors.hpp"
#include "tensorstream/store.hpp"
#include "test_helpers.hpp"

namespace ts = tensorstream;
using ts::testing::kAllDTypes;
using ts::testing::random_bytes;
using ts::testing::TempDir;

namespace {

struct Expected {
  ts::DType dtype;
  std::vector<std::int64_t> shape;
  std::vector<std::byte> data;
};

std::uint64_t numel(const std::vector<std::int64_t>& shape) {
  std::uint64_t n = 1;
  for (auto d : shape) n *= static_cast<std::uint64_t>(d);
  return n;
}

// Reads every block and checks each tensor's bytes, dtype, shape and alignment.
void expect_store_holds(const std::filesystem::path& path,
                        const std::map<std::string, Expected>& expected) {
  const auto store = ts::Store::open(path);
  ASSERT_EQ(store.tensors().size(), expected.size());
  for (std::size_t b = 0; b < store.blocks().size(); ++b) {
    const auto& block = store.blocks()[b];
    EXPECT_EQ(block.offset % ts::kBlockAlignment, 0u) << block.name;
    std::vector<std::byte> buffer(block.raw_size);
    store.read_block(b, buffer, /*verify=*/true);
    for (const auto& t : store.block_tensors(b)) {
      SCOPED_TRACE(t.name);
      EXPECT_EQ(t.offset_in_block % ts::kTensorAlignment, 0u);
      EXPECT_EQ((block.offset + t.offset_in_block) % ts::kTensorAlignment, 0u);
      const auto it = expected.find(t.name);
      ASSERT_NE(it, expected.end());
      EXPECT_EQ(t.dtype, it->second.dtype);
      EXPECT_EQ(t.shape, it->second.shape);
      ASSERT_EQ(t.nbytes, it->second.data.size());
      EXPECT_TRUE(std::equal(it->second.data.begin(), it->second.data.end(),
                             buffer.begin() + static_cast<std::ptrdiff_t>(t.offset_in_block)));
      EXPECT_EQ(t.checksum, ts::checksum64(it->second.data));
    }
  }
  EXPECT_TRUE(store.verify().empty());
}

}  // namespace

TEST(Store, RoundTripsEveryDTypeBitwise) {
  TempDir dir;
  std::map<std::string, Expected> expected;
  std::mt19937_64 rng(7);
  {
    ts::StoreWriter writer(dir / "all.tstore");
    int block = 0;
    for (const auto dtype : kAllDTypes) {
      writer.begin_block("block" + std::to_string(block++));
      // Odd sizes so that tensors do not fall on alignment boundaries by themselves.
      const std::vector<std::vector<std::int64_t>> shapes = {
          {}, {0}, {static_cast<std::int64_t>(1 + rng() % 37)}, {3, 5, 7}, {2, 1, 129}};
      int i = 0;
      for (const auto& shape : shapes) {
        const std::string name = std::string(ts::dtype_name(dtype)) + "." + std::to_string(i++);
        Expected e{dtype, shape, random_bytes(numel(shape) * ts::dtype_size(dtype), rng())};
        writer.add_tensor(name, dtype, shape, e.data);
        expected.emplace(name, std::move(e));
      }
      writer.end_block();
    }
    const auto summary = writer.commit();
    EXPECT_EQ(summary.block_count, kAllDTypes.size());
    EXPECT_EQ(summary.tensor_count, expected.size());
  }
  expect_store_holds(dir / "all.tstore", expected);
}

TEST(Store, RandomLayoutsRoundTrip) {
  std::mt19937_64 rng(42);
  for (int round = 0; round < 20; ++round) {
    TempDir dir;
    std::map<std::string, Expected> expected;
    ts::WriterOptions options;
    options.tensor_alignment = 256u << (rng() % 3);
    options.block_alignment = 4096u << (rng() % 2);
    options.durable = false;
    ts::StoreWriter writer(dir / "r.tstore", options);
    const int blocks = static_cast<int>(rng() % 6);
    for (int b = 0; b < blocks; ++b) {
      writer.begin_block("layers." + std::to_string(b));
      const int tensors = static_cast<int>(rng() % 5);
      for (int t = 0; t < tensors; ++t) {
        const auto dtype = kAllDTypes[rng() % kAllDTypes.size()];
        std::vector<std::int64_t> shape{static_cast<std::int64_t>(rng() % 300),
                                        static_cast<std::int64_t>(1 + rng() % 9)};
        const std::string name = "layers." + std::to_string(b) + ".w" + std::to_string(t);
        Expected e{dtype, shape, random_bytes(numel(shape) * ts::dtype_size(dtype), rng())};
        // Stream in random pieces: the result must not depend on how data was appended.
        writer.begin_tensor(name, dtype, shape);
        std::size_t at = 0;
        while (at < e.data.size()) {
          const std::size_t n = std::min<std::size_t>(e.data.size() - at, 1 + rng() % 1000);
          writer.append(std::span<const std::byte>(e.data).subspan(at, n));
          at += n;
        }
        writer.end_tensor();
        expected.emplace(name, std::move(e));
      }
      writer.end_block();
    }
    writer.commit();
    const auto store = ts::Store::open(dir / "r.tstore");
    EXPECT_EQ(store.info().tensor_alignment, options.tensor_alignment);
    for (const auto& t : store.tensors())
      EXPECT_EQ(t.offset_in_block % options.tensor_alignment, 0u);
    expect_store_holds(dir / "r.tstore", expected);
  }
}

TEST(Store, LargeTensorsBypassTheWriteBuffer) {
  TempDir dir;
  std::map<std::string, Expected> expected;
  ts::StoreWriter writer(dir / "big.tstore");
  writer.begin_block("big");
  Expected e{ts::DType::kFloat32, {3, 1000001}, random_bytes(3 * 1000001 * 4, 3)};
  writer.add_tensor("big.w", e.dtype, e.shape, e.data);
  Expected small{ts::DType::kInt8, {5}, random_bytes(5, 4)};
  writer.add_tensor("big.b", small.dtype, small.shape, small.data);
  writer.end_block();
  writer.commit();
  expected.emplace("big.w", std::move(e));
  expected.emplace("big.b", std::move(small));
  expect_store_holds(dir / "big.tstore", expected);
}

TEST(Store, EmptyStoreOpens) {
  TempDir dir;
  ts::StoreWriter writer(dir / "empty.tstore");
  writer.commit();
  const auto store = ts::Store::open(dir / "empty.tstore");
  EXPECT_TRUE(store.blocks().empty());
  EXPECT_TRUE(store.tensors().empty());
  EXPECT_EQ(store.max_block_size(), 0u);
}

TEST(Store, UserMetadataAndLookups) {
  TempDir dir;
  const auto data = random_bytes(64, 1);
  ts::StoreWriter writer(dir / "m.tstore");
  writer.set_user_metadata(R"({"config": {"hidden_size": 16}})");
  writer.begin_block("a");
  writer.add_tensor("a.w", ts::DType::kFloat32, std::vector<std::int64_t>{16}, data);
  writer.end_block();
  writer.commit();
  const auto store = ts::Store::open(dir / "m.tstore");
  EXPECT_EQ(store.info().user_metadata, R"({"config": {"hidden_size": 16}})");
  EXPECT_EQ(store.find_block("a"), 0u);
  EXPECT_EQ(store.find_tensor("a.w"), 0u);
  EXPECT_FALSE(store.find_tensor("nope").has_value());
  EXPECT_EQ(store.info().version_major, ts::kStoreVersionMajor);
}

TEST(Store, FingerprintIgnoresBlockGroupingButSeesData) {
  TempDir dir;
  const auto w = random_bytes(400, 1);
  const auto b = random_bytes(40, 2);
  auto write = [&](const std::string& file, bool one_block, std::byte flip) {
    ts::StoreWriter writer(dir / file);
    writer.begin_block("x");
    writer.add_tensor("x.w", ts::DType::kFloat32, std::vector<std::int64_t>{10, 10}, w);
    if (!one_block) {
      writer.end_block();
      writer.begin_block("y");
    }
    auto b2 = b;
    b2[0] ^= flip;
    writer.add_tensor("x.b", ts::DType::kFloat32, std::vector<std::int64_t>{10}, b2);
    writer.end_block();
    return writer.commit().fingerprint;
  };
  const auto one = write("one.tstore", true, std::byte{0});
  const auto two = write("two.tstore", false, std::byte{0});
  const auto changed = write("changed.tstore", true, std::byte{1});
  EXPECT_EQ(one, two);
  EXPECT_NE(one, changed);
  EXPECT_EQ(ts::Store::open(dir / "one.tstore").info().fingerprint, one);

  // The same fingerprint can be computed from tensors in memory, without a store.
  ts::FingerprintBuilder builder;
  builder.add("x.b", ts::DType::kFloat32, std::vector<std::int64_t>{10}, ts::checksum64(b));
  builder.add("x.w", ts::DType::kFloat32, std::vector<std::int64_t>{10, 10}, ts::checksum64(w));
  EXPECT_EQ(builder.finish(), one);
  EXPECT_EQ(one.hex().size(), 32u);
}

TEST(Store, WriterRejectsMisuse) {
  TempDir dir;
  const auto data = random_bytes(16, 1);
  ts::StoreWriter writer(dir / "x.tstore");
  const std::vector<std::int64_t> shape{4};
  EXPECT_THROW(writer.add_tensor("t", ts::DType::kFloat32, shape, data), std::invalid_argument);
  writer.begin_block("b");
  EXPECT_THROW(writer.begin_block("c"), std::invalid_argument);
  EXPECT_THROW(writer.add_tensor("t", ts::DType::kFloat64, shape, data), std::invalid_argument)
      << "16 bytes for 4 float64 must be refused";
  writer.abort();
  ts::StoreWriter w2(dir / "y.tstore");
  w2.begin_block("b");
  w2.add_tensor("t", ts::DType::kFloat32, shape, data);
  EXPECT_THROW(w2.add_tensor("t", ts::DType::kFloat32, shape, data), std::invalid_argument);
  EXPECT_THROW(w2.add_tensor("u", static_cast<ts::DType>(999), shape, data), std::invalid_argument);
  const std::vector<std::int64_t> negative{-1};
  EXPECT_THROW(w2.begin_tensor("v", ts::DType::kFloat32, negative), std::invalid_argument);
  EXPECT_THROW(w2.commit(), std::invalid_argument) << "commit with an open block";
  w2.end_block();
  EXPECT_THROW(w2.begin_block("b"), std::invalid_argument) << "duplicate block name";
  try {
    ts::StoreWriter bad(dir / "z.tstore", ts::WriterOptions{1000, 256, true});
    FAIL() << "alignment 1000 accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("block_alignment"), std::string::npos);
  }
}

TEST(Store, UncommittedWriterLeavesNothing) {
  TempDir dir;
  const auto data = random_bytes(1000, 1);
  std::filesystem::path temp;
  {
    ts::StoreWriter writer(dir / "gone.tstore");
    temp = writer.temp_path();
    writer.begin_block("b");
    writer.add_tensor("t", ts::DType::kUInt8, std::vector<std::int64_t>{1000}, data);
    writer.end_block();
    EXPECT_TRUE(std::filesystem::exists(temp));
  }
  EXPECT_FALSE(std::filesystem::exists(temp));
  EXPECT_FALSE(std::filesystem::exists(dir / "gone.tstore"));
  EXPECT_TRUE(std::filesystem::is_empty(dir.path()));
}

TEST(Store, CommitReplacesThePreviousStore) {
  TempDir dir;
  auto write = [&](std::uint64_t seed) {
    ts::StoreWriter writer(dir / "s.tstore");
    writer.begin_block("b");
    writer.add_tensor("t", ts::DType::kUInt8, std::vector<std::int64_t>{100},
                      random_bytes(100, seed));
    writer.end_block();
    return writer.commit().fingerprint;
  };
  write(1);
  const auto second = write(2);
  EXPECT_EQ(ts::Store::open(dir / "s.tstore").info().fingerprint, second);
}

TEST(Store, ReadBlockChecksArguments) {
  TempDir dir;
  ts::StoreWriter writer(dir / "s.tstore");
  writer.begin_block("b");
  writer.add_tensor("t", ts::DType::kUInt8, std::vector<std::int64_t>{100}, random_bytes(100, 1));
  writer.end_block();
  writer.commit();
  const auto store = ts::Store::open(dir / "s.tstore");
  std::vector<std::byte> small(10);
  EXPECT_THROW(store.read_block(0, small, true), std::invalid_argument);
  EXPECT_THROW(store.read_block(1, small, true), std::out_of_range);
}

TEST(Store, OpenNamesMissingFile) {
  TempDir dir;
  try {
    (void)ts::Store::open(dir / "missing.tstore");
    FAIL();
  } catch (const ts::IoError& e) {
    EXPECT_NE(std::string(e.what()).find("missing.tstore"), std::string::npos);
    EXPECT_EQ(e.code(), ENOENT);
  }
}
