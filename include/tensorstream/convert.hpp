// Converting safetensors checkpoints into a TensorStream store.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>

#include "tensorstream/errors.hpp"
#include "tensorstream/store.hpp"

namespace tensorstream {

/// Called during long work with bytes done and bytes in all; return false to cancel (the
/// operation then throws OperationCancelled and leaves no partial output).
using ProgressCallback = std::function<bool(std::uint64_t done, std::uint64_t total)>;

/// Thrown when a ProgressCallback asked to stop.
class OperationCancelled : public Error {
 public:
  using Error::Error;
};

struct ConvertOptions {
  WriterOptions writer;
  ProgressCallback progress;
};

/// Converts `source` (a .safetensors file, or a Hugging Face checkpoint directory with one or
/// more shards and their index) into the store `destination`. Tensors are grouped into
/// blocks with group_into_blocks(); the checkpoint's `config.json` (if any) and safetensors
/// metadata are kept in the store's user metadata. Memory use is bounded by a fixed-size
/// copy buffer, whatever the model size. Crash-safe like every StoreWriter.
WriteSummary convert_safetensors(const std::filesystem::path& source,
                                 const std::filesystem::path& destination,
                                 const ConvertOptions& options = {});

/// The store file a user-given path designates: `path` itself, or `path/model.tstore` when
/// `path` is a directory.
[[nodiscard]] std::filesystem::path resolve_store_path(const std::filesystem::path& path);

/// Default file name of a store inside a directory.
inline constexpr const char* kDefaultStoreFileName = "model.tstore";

}  // namespace tensorstream
