// Element types of stored tensors.
//
// The numeric values of `DType` are part of the on-disk store format (docs/store-format.md):
// never renumber, only append. Names follow torch (`torch.bfloat16` -> "bfloat16") so the
// Python side maps dtypes by name without a table of its own numbers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace tensorstream {

enum class DType : std::uint16_t {
  kBool = 1,
  kUInt8 = 2,
  kInt8 = 3,
  kInt16 = 4,
  kUInt16 = 5,
  kInt32 = 6,
  kUInt32 = 7,
  kInt64 = 8,
  kUInt64 = 9,
  kFloat16 = 10,
  kBFloat16 = 11,
  kFloat32 = 12,
  kFloat64 = 13,
  kComplex32 = 14,  // torch.complex32 (chalf): two float16
  kComplex64 = 15,
  kComplex128 = 16,
  kFloat8E4M3FN = 17,
  kFloat8E4M3FNUZ = 18,
  kFloat8E5M2 = 19,
  kFloat8E5M2FNUZ = 20,
  kFloat8E8M0FNU = 21,
  kFloat4E2M1FNx2 = 22,  // two 4-bit values packed per byte; shape counts bytes, as in torch
};

/// Size in bytes of one element (for kFloat4E2M1FNx2: of one packed pair).
/// Returns 0 for a value that is not a known DType.
[[nodiscard]] std::size_t dtype_size(DType dtype) noexcept;

/// torch-style name ("float32", "bfloat16", "float8_e4m3fn", ...), or "" if unknown.
[[nodiscard]] std::string_view dtype_name(DType dtype) noexcept;

/// Inverse of dtype_name.
[[nodiscard]] std::optional<DType> dtype_from_name(std::string_view name) noexcept;

/// True if `raw` is the numeric value of a known DType (used to validate stored fields).
[[nodiscard]] bool dtype_is_valid(std::uint16_t raw) noexcept;

/// Maps a safetensors dtype string ("F32", "BF16", "F8_E4M3", ...) to a DType; nullopt for
/// strings safetensors defines but TensorStream cannot store (sub-byte types other than
/// float4 pairs) and for unknown strings.
[[nodiscard]] std::optional<DType> dtype_from_safetensors(std::string_view name) noexcept;

/// The safetensors dtype string for `dtype`, or "" where safetensors has none.
[[nodiscard]] std::string_view dtype_safetensors_name(DType dtype) noexcept;

}  // namespace tensorstream
