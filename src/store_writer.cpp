#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <thread>

#include "tensorstream/codec.hpp"
#include "tensorstream/detail/chunk_encoder_pool.hpp"
#include "tensorstream/detail/store_format.hpp"
#include "tensorstream/errors.hpp"
#include "tensorstream/store.hpp"
#include "tensorstream/store_maintenance.hpp"

namespace tensorstream {
namespace {

// Writes are gathered into runs of this size: large enough that pwrite overhead vanishes,
// small enough that converting a model never holds much more than one run in RAM.
constexpr std::size_t kWriteBufferSize = 8u << 20;

bool is_power_of_two(std::uint64_t v) noexcept { return v != 0 && (v & (v - 1)) == 0; }

}  // namespace

StoreWriter::StoreWriter(std::filesystem::path destination, WriterOptions options)
    : destination_(std::move(destination)), options_(options) {
  TS_EXPECT(!destination_.filename().empty(), std::invalid_argument, "store path '",
            destination_.string(), "' has no file name");
  TS_EXPECT(is_power_of_two(options_.block_alignment) &&
                options_.block_alignment >= kBlockAlignment &&
                options_.block_alignment <= (1u << 30),
            std::invalid_argument, "block_alignment ", options_.block_alignment,
            " must be a power of two between 4096 and 2^30");
  TS_EXPECT(is_power_of_two(options_.tensor_alignment) &&
                options_.tensor_alignment >= kTensorAlignment &&
                options_.tensor_alignment <= options_.block_alignment,
            std::invalid_argument, "tensor_alignment ", options_.tensor_alignment,
            " must be a power of two between 256 and block_alignment");
  const auto& compression = options_.compression;
  if (compression.enabled) {
    TS_EXPECT(compression.level >= codec::kMinLevel && compression.level <= codec::kMaxLevel,
              std::invalid_argument, "compression level ", compression.level,
              " must be between 1 and 9");
    TS_EXPECT(compression.chunk_size >= codec::kMinChunkSize &&
                  compression.chunk_size <= codec::kMaxChunkSize &&
                  compression.chunk_size % 4096 == 0,
              std::invalid_argument, "compression chunk_size ", compression.chunk_size,
              " must be a multiple of 4096 between 64 KiB and 16 MiB");
    TS_EXPECT(codec::available(), Error, "cannot write compressed store '", destination_.string(),
              "': ", codec::describe());
  }
  if (std::filesystem::is_directory(destination_)) {
    throw std::invalid_argument(detail::concat("store path '", destination_.string(),
                                               "' is a directory; give a file name"));
  }
  temp_path_ = detail::temp_path_for(destination_);
  try {
    fd_ = detail::FileDescriptor(temp_path_, O_WRONLY | O_CREAT | O_EXCL, 0644);
  } catch (const IoError& e) {
    // Name what the user asked for first; the temporary is an implementation detail.
    throw IoError(detail::concat("cannot create store '", destination_.string(), "': ", e.what()),
                  e.code());
  }
  buffer_.reserve(kWriteBufferSize);
  if (compression.enabled) {
    unsigned threads = compression.threads;
    if (threads == 0) threads = std::clamp(std::thread::hardware_concurrency(), 1u, 8u);
    // One thread means encoding inline; more means workers beside the caller's thread.
    encoder_ =
        std::make_unique<detail::ChunkEncoderPool>(compression.level, threads == 1 ? 0 : threads);
    max_pending_ = 2 * static_cast<std::size_t>(threads);
  }
  // The superblock region stays zero (an invalid magic) until commit() writes it last.
  position_ = options_.block_alignment;
  buffer_offset_ = position_;
}

StoreWriter::~StoreWriter() {
  if (!finished_) abort();
}

void StoreWriter::require(bool condition, std::string_view what) const {
  TS_EXPECT(condition, std::invalid_argument, "StoreWriter for '", destination_.string(),
            "': ", what);
}

void StoreWriter::stage(std::string_view name) const {
  if (stage_hook) stage_hook(name);
}

void StoreWriter::flush() {
  if (buffer_.empty()) return;
  fd_.pwrite_all(buffer_, buffer_offset_);
  buffer_offset_ += buffer_.size();
  buffer_.clear();
}

void StoreWriter::write_bytes(std::span<const std::byte> data) {
  if (buffer_.size() + data.size() > kWriteBufferSize) flush();
  if (data.size() >= kWriteBufferSize) {
    fd_.pwrite_all(data, buffer_offset_);
    buffer_offset_ += data.size();
  } else {
    buffer_.insert(buffer_.end(), data.begin(), data.end());
  }
  position_ += data.size();
}

void StoreWriter::write_zeros(std::uint64_t n) {
  static constexpr std::array<std::byte, 4096> kZeros{};
  while (n > 0) {
    const auto step = std::min<std::uint64_t>(n, kZeros.size());
    write_bytes(std::span<const std::byte>(kZeros.data(), step));
    n -= step;
  }
}

void StoreWriter::begin_block(std::string_view name) {
  require(!finished_, "already committed or aborted");
  require(!open_block_, "begin_block() while a block is open");
  require(!name.empty(), "empty block name");
  for (const auto& b : blocks_) {
    require(b.name != name, detail::concat("duplicate block name '", name, "'"));
  }
  std::uint64_t start = 0;
  require(detail::align_up(position_, options_.block_alignment, start), "file too large");
  write_zeros(start - position_);
  open_block_ = BlockInfo{};
  open_block_->name = std::string(name);
  open_block_->offset = position_;
  open_block_->first_tensor = static_cast<std::uint32_t>(tensors_.size());
  open_block_->first_chunk = static_cast<std::uint32_t>(chunks_.size());
  block_checksum_.reset();
  raw_checksum_.reset();
  block_raw_ = 0;
  chunk_raw_offset_ = 0;
  chunk_width_ = 1;
}

void StoreWriter::add_raw(std::span<const std::byte> data) {
  block_raw_ += data.size();
  if (!encoder_) {
    block_checksum_.update(data);
    write_bytes(data);
    return;
  }
  raw_checksum_.update(data);
  const std::size_t chunk_size = options_.compression.chunk_size;
  while (!data.empty()) {
    // A full chunk is cut only when more bytes come, so that a tensor's trailing padding
    // joins its last chunk whenever that chunk has room.
    if (chunk_.size() == chunk_size) cut_chunk();
    const auto n = std::min<std::size_t>(chunk_size - chunk_.size(), data.size());
    chunk_.insert(chunk_.end(), data.begin(), data.begin() + static_cast<std::ptrdiff_t>(n));
    data = data.subspan(n);
  }
}

void StoreWriter::add_raw_zeros(std::uint64_t n) {
  static constexpr std::array<std::byte, 4096> kZeros{};
  while (n > 0) {
    const auto step = std::min<std::uint64_t>(n, kZeros.size());
    add_raw(std::span<const std::byte>(kZeros.data(), step));
    n -= step;
  }
}

void StoreWriter::cut_chunk() {
  if (chunk_.empty()) return;
  if (encoder_->pending() >= max_pending_) write_chunks(max_pending_ - 1);
  const auto size = chunk_.size();
  ChunkInfo info;
  info.raw_offset = chunk_raw_offset_;
  info.raw_size = static_cast<std::uint32_t>(size);
  chunks_.push_back(info);  // stored fields are filled in by write_chunks()
  chunk_raw_offset_ += size;
  encoder_->submit(std::move(chunk_), chunk_width_);
  if (!spare_.empty()) {
    chunk_ = std::move(spare_.back());
    spare_.pop_back();
  } else {
    chunk_ = std::vector<std::byte>();
  }
  chunk_.clear();
  chunk_.reserve(options_.compression.chunk_size);
}

void StoreWriter::write_chunks(std::size_t keep) {
  while (encoder_->pending() > keep) {
    auto result = encoder_->take();
    // The oldest pending chunk is the first of chunks_ whose stored fields are not set yet.
    ChunkInfo& info = chunks_[chunks_.size() - encoder_->pending() - 1];
    const auto stored = result.stored();
    info.stored_offset = position_ - open_block_->offset;
    info.stored_size = static_cast<std::uint32_t>(stored.size());
    info.checksum = result.checksum;
    info.codec = result.codec;
    info.plane_width = result.plane_width;
    info.level = result.level;
    block_checksum_.update(stored);
    write_bytes(stored);
    result.raw.clear();
    if (spare_.size() < 2) spare_.push_back(std::move(result.raw));
  }
}

void StoreWriter::begin_tensor(std::string_view name, DType dtype,
                               std::span<const std::int64_t> shape) {
  require(open_block_.has_value(), "begin_tensor() outside a block");
  require(!open_tensor_, "begin_tensor() while a tensor is open");
  require(!name.empty(), "empty tensor name");
  require(dtype_size(dtype) != 0,
          detail::concat("tensor '", name, "': unknown dtype ", static_cast<int>(dtype)));
  require(shape.size() <= kMaxTensorRank,
          detail::concat("tensor '", name, "': rank ", shape.size(), " exceeds ", kMaxTensorRank));
  for (const auto& t : tensors_) {
    require(t.name != name, detail::concat("duplicate tensor name '", name, "'"));
  }
  std::uint64_t nbytes = 0;
  require(detail::tensor_nbytes(dtype, shape, nbytes),
          detail::concat("tensor '", name, "': negative dimension or size overflow"));
  std::uint64_t start = 0;
  require(detail::align_up(block_raw_, options_.tensor_alignment, start), "block too large");
  add_raw_zeros(start - block_raw_);
  if (encoder_) {
    cut_chunk();  // a chunk never holds bytes of two tensors
    chunk_width_ = codec::plane_width(dtype);
  }

  open_tensor_.emplace();
  open_tensor_->written = 0;
  TensorInfo& info = open_tensor_->info;
  info.name = std::string(name);
  info.dtype = dtype;
  info.shape.assign(shape.begin(), shape.end());
  info.block = static_cast<std::uint32_t>(blocks_.size());
  info.offset_in_block = block_raw_;
  info.nbytes = nbytes;
}

void StoreWriter::append(std::span<const std::byte> data) {
  require(open_tensor_.has_value(), "append() outside a tensor");
  auto& t = *open_tensor_;
  require(data.size() <= t.info.nbytes - t.written,
          detail::concat("tensor '", t.info.name, "': ", t.written + data.size(),
                         " bytes appended but dtype × shape is ", t.info.nbytes));
  t.checksum.update(data);
  add_raw(data);
  t.written += data.size();
}

void StoreWriter::end_tensor() {
  require(open_tensor_.has_value(), "end_tensor() outside a tensor");
  auto& t = *open_tensor_;
  require(t.written == t.info.nbytes,
          detail::concat("tensor '", t.info.name, "': ", t.written,
                         " bytes appended but dtype × shape is ", t.info.nbytes));
  t.info.checksum = t.checksum.digest();
  tensors_.push_back(std::move(t.info));
  open_tensor_.reset();
}

void StoreWriter::add_tensor(std::string_view name, DType dtype,
                             std::span<const std::int64_t> shape, std::span<const std::byte> data) {
  begin_tensor(name, dtype, shape);
  append(data);
  end_tensor();
}

void StoreWriter::end_block() {
  require(open_block_.has_value(), "end_block() outside a block");
  require(!open_tensor_, "end_block() while a tensor is open");
  BlockInfo& b = *open_block_;
  if (encoder_) {
    cut_chunk();
    write_chunks(0);
  }
  b.raw_size = block_raw_;
  b.stored_size = position_ - b.offset;
  b.checksum = block_checksum_.digest();
  b.raw_checksum = encoder_ ? raw_checksum_.digest() : b.checksum;
  b.chunk_count = static_cast<std::uint32_t>(chunks_.size() - b.first_chunk);
  const bool any_compressed =
      std::any_of(chunks_.begin() + b.first_chunk, chunks_.end(),
                  [](const ChunkInfo& c) { return c.codec != ChunkCodec::kRaw; });
  if (any_compressed) {
    b.codec = Codec::kChunked;
  } else {
    // Raw chunks lie back to back, so the stored bytes are the raw bytes: a plain block.
    chunks_.resize(b.first_chunk);
    b.chunk_count = 0;
    b.codec = Codec::kNone;
  }
  b.tensor_count = static_cast<std::uint32_t>(tensors_.size() - b.first_tensor);
  blocks_.push_back(std::move(b));
  open_block_.reset();
  stage("block_written");
}

void StoreWriter::set_user_metadata(std::string text) { user_metadata_ = std::move(text); }

WriteSummary StoreWriter::commit() {
  require(!finished_, "already committed or aborted");
  require(!open_block_, "commit() while a block is open");

  detail::Superblock sb;
  sb.version_major = kStoreVersionMajor;
  sb.version_minor = chunks_.empty() ? kStoreVersionMinorUncompressed : kStoreVersionMinor;
  sb.block_alignment = options_.block_alignment;
  sb.tensor_alignment = options_.tensor_alignment;
  sb.data_offset = options_.block_alignment;
  std::uint64_t metadata_offset = 0;
  require(detail::align_up(position_, options_.block_alignment, metadata_offset), "file too large");
  write_zeros(metadata_offset - position_);
  sb.metadata_offset = metadata_offset;
  sb.data_size = metadata_offset - sb.data_offset;

  FingerprintBuilder fingerprint;
  for (const auto& t : tensors_) fingerprint.add(t.name, t.dtype, t.shape, t.checksum);
  sb.fingerprint = fingerprint.finish();

  const auto metadata = detail::encode_metadata(blocks_, tensors_, chunks_, user_metadata_, sb);
  TS_EXPECT(metadata.size() <= kMaxMetadataSize, std::invalid_argument, "store '",
            destination_.string(), "': metadata of ", metadata.size(),
            " bytes exceeds the format limit");
  write_bytes(metadata);
  flush();
  sb.file_size = position_;
  // Trailing zero padding may never have been written out; make the length exact.
  fd_.truncate(sb.file_size);
  stage("metadata_written");

  // The superblock goes last: until it is written the temporary has no valid magic.
  fd_.pwrite_all(detail::encode_superblock(sb), 0);
  stage("superblock_written");
  if (options_.durable) fd_.sync();
  fd_.close();
  stage("synced");
  if (::rename(temp_path_.c_str(), destination_.c_str()) != 0) {
    detail::throw_errno(detail::concat("cannot rename '", temp_path_.string(), "' to '",
                                       destination_.string(), "'"));
  }
  finished_ = true;
  stage("renamed");
  if (options_.durable) detail::sync_directory(destination_.parent_path());
  return WriteSummary{sb.file_size, sb.block_count, sb.tensor_count, sb.fingerprint};
}

void StoreWriter::abort() noexcept {
  if (finished_) return;
  finished_ = true;
  try {
    fd_.close();
  } catch (const std::exception&) {
    // The temporary is being discarded; a failed close loses nothing.
  }
  if (::unlink(temp_path_.c_str()) != 0 && errno != ENOENT) {
    std::fprintf(stderr, "tensorstream: cannot remove '%s': %s\n", temp_path_.c_str(),
                 std::strerror(errno));
  }
}

}  // namespace tensorstream
