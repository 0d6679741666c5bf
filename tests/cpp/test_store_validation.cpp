// Every validation rule of the store reader, each triggered by a crafted bad file. The
// crafted files have their checksums recomputed, so each test reaches the rule it names
// instead of stopping at a checksum mismatch.
#include <gtest/gtest.h>

#include <limits>

#include "tensorstream/detail/endian.hpp"
#include "tensorstream/detail/store_format.hpp"
#include "tensorstream/errors.hpp"
#include "tensorstream/store.hpp"
#include "test_helpers.hpp"

namespace ts = tensorstream;
namespace detail = tensorstream::detail;
using ts::testing::read_file;
using ts::testing::TempDir;
using ts::testing::write_file;

namespace {

class StoreValidation : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = dir_ / "model.tstore";
    ts::StoreWriter writer(path_);
    for (int b = 0; b < 2; ++b) {
      writer.begin_block("layers." + std::to_string(b));
      for (int t = 0; t < 2; ++t) {
        const auto data = ts::testing::random_bytes(4 * 300, static_cast<std::uint64_t>(b * 2 + t));
        writer.add_tensor("layers." + std::to_string(b) + ".w" + std::to_string(t),
                          ts::DType::kFloat32, std::vector<std::int64_t>{30, 10}, data);
      }
      writer.end_block();
    }
    writer.commit();
    bytes_ = read_file(path_);
    sb_ = detail::decode_superblock(bytes_, bytes_.size(), "x");
  }

  std::byte* metadata() { return bytes_.data() + sb_.metadata_offset; }
  std::byte* block_record(std::size_t i) { return metadata() + i * detail::kBlockRecordSize; }
  std::byte* tensor_record(std::size_t i) {
    return metadata() + sb_.block_count * detail::kBlockRecordSize + i * detail::kTensorRecordSize;
  }

  // Re-encodes the superblock from sb_ (recomputing the metadata checksum first) and writes
  // the file.
  void reseal_and_write() {
    sb_.metadata_checksum = ts::checksum64(std::span<const std::byte>(
        bytes_.data() + std::min<std::uint64_t>(sb_.metadata_offset, bytes_.size()),
        std::min<std::uint64_t>(
            sb_.metadata_size,
            bytes_.size() - std::min<std::uint64_t>(sb_.metadata_offset, bytes_.size()))));
    const auto encoded = detail::encode_superblock(sb_);
    std::copy(encoded.begin(), encoded.end(), bytes_.begin());
    write_file(path_, bytes_);
  }

  // Opening must fail with FormatError whose message names the file and contains `field`.
  void expect_rejected(const std::string& field) {
    try {
      (void)ts::Store::open(path_);
      FAIL() << "store with a bad '" << field << "' was accepted";
    } catch (const ts::FormatError& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find(path_.string()), std::string::npos) << what;
      EXPECT_NE(what.find(field), std::string::npos) << what;
    }
  }

  TempDir dir_;
  std::filesystem::path path_;
  std::vector<std::byte> bytes_;
  detail::Superblock sb_;
};

}  // namespace

TEST_F(StoreValidation, ValidStoreOpens) { EXPECT_EQ(ts::Store::open(path_).blocks().size(), 2u); }

TEST_F(StoreValidation, TruncatedFile) {
  bytes_.resize(bytes_.size() - 100);
  write_file(path_, bytes_);
  expect_rejected("file_size");
}

TEST_F(StoreValidation, FileSmallerThanSuperblock) {
  bytes_.resize(100);
  write_file(path_, bytes_);
  expect_rejected("smaller than the 4096-byte superblock");
}

TEST_F(StoreValidation, EmptyFile) {
  bytes_.clear();
  write_file(path_, bytes_);
  expect_rejected("superblock");
}

TEST_F(StoreValidation, AppendedGarbage) {
  bytes_.resize(bytes_.size() + 10, std::byte{0x55});
  write_file(path_, bytes_);
  expect_rejected("file_size");
}

TEST_F(StoreValidation, BadMagic) {
  bytes_[1] = std::byte{'X'};
  write_file(path_, bytes_);
  expect_rejected("bad magic");
}

TEST_F(StoreValidation, CorruptSuperblockFailsItsChecksum) {
  bytes_[24] ^= std::byte{1};  // block_count, without resealing
  write_file(path_, bytes_);
  expect_rejected("superblock_checksum");
}

TEST_F(StoreValidation, UnsupportedVersion) {
  sb_.version_major = 2;
  reseal_and_write();
  expect_rejected("version");
}

TEST_F(StoreValidation, UnknownFlags) {
  sb_.flags = 4;
  reseal_and_write();
  expect_rejected("flags");
}

TEST_F(StoreValidation, BadAlignment) {
  sb_.tensor_alignment = 100;
  reseal_and_write();
  expect_rejected("tensor_alignment");
}

TEST_F(StoreValidation, HeaderLargerThanFile) {
  sb_.metadata_size = bytes_.size() * 4;
  reseal_and_write();
  expect_rejected("metadata_size");
}

TEST_F(StoreValidation, OverflowingMetadataOffset) {
  sb_.metadata_offset = std::numeric_limits<std::uint64_t>::max() - 10;
  reseal_and_write();
  expect_rejected("data_size");
}

TEST_F(StoreValidation, CountsInconsistentWithMetadataSize) {
  sb_.tensor_count += 1000;
  reseal_and_write();
  expect_rejected("metadata_size");
}

TEST_F(StoreValidation, CorruptMetadataFailsItsChecksum) {
  tensor_record(0)[0] ^= std::byte{1};
  write_file(path_, bytes_);  // not resealed
  expect_rejected("metadata_checksum");
}

TEST_F(StoreValidation, OverflowingBlockOffset) {
  detail::store_le<std::uint64_t>(block_record(0),
                                  std::numeric_limits<std::uint64_t>::max() & ~4095ull);
  reseal_and_write();
  expect_rejected("blocks[0].stored_size");
}

TEST_F(StoreValidation, BlockPastDataRegion) {
  detail::store_le<std::uint64_t>(block_record(1) + 8, sb_.data_size);   // stored_size
  detail::store_le<std::uint64_t>(block_record(1) + 16, sb_.data_size);  // raw_size
  reseal_and_write();
  expect_rejected("blocks[1].stored_size");
}

TEST_F(StoreValidation, MisalignedBlock) {
  const auto offset = detail::load_le<std::uint64_t>(block_record(1));
  detail::store_le<std::uint64_t>(block_record(1), offset + 512);
  reseal_and_write();
  expect_rejected("blocks[1].offset");
}

TEST_F(StoreValidation, OverlappingExtents) {
  const auto offset0 = detail::load_le<std::uint64_t>(block_record(0));
  detail::store_le<std::uint64_t>(block_record(1), offset0);
  reseal_and_write();
  expect_rejected("overlaps");
}

TEST_F(StoreValidation, UnknownCodec) {
  detail::store_le<std::uint16_t>(block_record(0) + 56, 77);
  reseal_and_write();
  expect_rejected("blocks[0].codec");
}

TEST_F(StoreValidation, BlockNameOutsideStringTable) {
  detail::store_le<std::uint32_t>(block_record(0) + 48, 0xfffffff0u);
  reseal_and_write();
  expect_rejected("blocks[0].name");
}

TEST_F(StoreValidation, DuplicateTensorName) {
  // Point tensor 1's name at tensor 0's name.
  std::copy(tensor_record(0) + 32, tensor_record(0) + 40, tensor_record(1) + 32);
  reseal_and_write();
  expect_rejected("duplicate tensor name");
}

TEST_F(StoreValidation, DTypeSizeMismatch) {
  detail::store_le<std::uint64_t>(tensor_record(1) + 8, 4 * 300 - 4);  // nbytes
  reseal_and_write();
  expect_rejected("tensors[1].nbytes");
}

TEST_F(StoreValidation, ShapeProductOverflows) {
  // Two dims of 2^40 overflow a 64-bit byte count for float32.
  const auto dims_index = detail::load_le<std::uint64_t>(tensor_record(0) + 24);
  std::byte* dims = metadata() + sb_.block_count * detail::kBlockRecordSize +
                    sb_.tensor_count * detail::kTensorRecordSize;
  detail::store_le<std::uint64_t>(dims + dims_index * 8, 1ull << 40);
  detail::store_le<std::uint64_t>(dims + (dims_index + 1) * 8, 1ull << 40);
  reseal_and_write();
  expect_rejected("overflowing size");
}

TEST_F(StoreValidation, NegativeDimension) {
  const auto dims_index = detail::load_le<std::uint64_t>(tensor_record(0) + 24);
  std::byte* dims = metadata() + sb_.block_count * detail::kBlockRecordSize +
                    sb_.tensor_count * detail::kTensorRecordSize;
  detail::store_le<std::int64_t>(dims + dims_index * 8, -30);
  reseal_and_write();
  expect_rejected("negative dimension");
}

TEST_F(StoreValidation, UnknownDType) {
  detail::store_le<std::uint16_t>(tensor_record(0) + 44, 999);
  reseal_and_write();
  expect_rejected("tensors[0].dtype");
}

TEST_F(StoreValidation, MisalignedTensor) {
  detail::store_le<std::uint64_t>(tensor_record(1), 1300);
  reseal_and_write();
  expect_rejected("tensors[1].offset_in_block");
}

TEST_F(StoreValidation, TensorPastEndOfBlock) {
  detail::store_le<std::uint64_t>(tensor_record(1), 1u << 20);
  reseal_and_write();
  expect_rejected("extends past the end of block");
}

TEST_F(StoreValidation, OverlappingTensors) {
  detail::store_le<std::uint64_t>(tensor_record(1), 0);
  reseal_and_write();
  expect_rejected("overlaps the tensor before it");
}

TEST_F(StoreValidation, TensorInWrongBlock) {
  detail::store_le<std::uint32_t>(tensor_record(0) + 40, 1);
  reseal_and_write();
  expect_rejected("tensors[0].block");
}

TEST_F(StoreValidation, ExcessiveRank) {
  detail::store_le<std::uint16_t>(tensor_record(0) + 46, 200);
  reseal_and_write();
  expect_rejected("tensors[0].ndim");
}

TEST_F(StoreValidation, CorruptBlockDataIsDetectedAndNamed) {
  const auto offset = detail::load_le<std::uint64_t>(block_record(1));
  bytes_[offset + 17] ^= std::byte{0x40};
  write_file(path_, bytes_);
  const auto store = ts::Store::open(path_);  // metadata intact: opens
  std::vector<std::byte> buffer(store.blocks()[1].raw_size);
  try {
    store.read_block(1, buffer, /*verify=*/true);
    FAIL() << "corrupt block read without error";
  } catch (const ts::ChecksumError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(path_.string()), std::string::npos) << what;
    EXPECT_NE(what.find("layers.1"), std::string::npos) << what;
    EXPECT_NE(what.find("offset " + std::to_string(offset)), std::string::npos) << what;
  }
  store.read_block(0, std::span<std::byte>(buffer.data(), store.blocks()[0].raw_size), true);
  const auto problems = store.verify();
  ASSERT_EQ(problems.size(), 1u);
  EXPECT_EQ(problems[0].block, 1u);
}
