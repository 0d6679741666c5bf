#include "tensorstream/dtype.hpp"

#include <array>

namespace tensorstream {
namespace {

struct DTypeInfo {
  DType dtype;
  std::size_t size;
  std::string_view name;
  std::string_view safetensors;  // "" where safetensors has no such type
};

constexpr std::array<DTypeInfo, 22> kDTypes{{
    {DType::kBool, 1, "bool", "BOOL"},
    {DType::kUInt8, 1, "uint8", "U8"},
    {DType::kInt8, 1, "int8", "I8"},
    {DType::kInt16, 2, "int16", "I16"},
    {DType::kUInt16, 2, "uint16", "U16"},
    {DType::kInt32, 4, "int32", "I32"},
    {DType::kUInt32, 4, "uint32", "U32"},
    {DType::kInt64, 8, "int64", "I64"},
    {DType::kUInt64, 8, "uint64", "U64"},
    {DType::kFloat16, 2, "float16", "F16"},
    {DType::kBFloat16, 2, "bfloat16", "BF16"},
    {DType::kFloat32, 4, "float32", "F32"},
    {DType::kFloat64, 8, "float64", "F64"},
    {DType::kComplex32, 4, "complex32", ""},
    {DType::kComplex64, 8, "complex64", "C64"},
    {DType::kComplex128, 16, "complex128", ""},
    {DType::kFloat8E4M3FN, 1, "float8_e4m3fn", "F8_E4M3"},
    {DType::kFloat8E4M3FNUZ, 1, "float8_e4m3fnuz", ""},
    {DType::kFloat8E5M2, 1, "float8_e5m2", "F8_E5M2"},
    {DType::kFloat8E5M2FNUZ, 1, "float8_e5m2fnuz", ""},
    {DType::kFloat8E8M0FNU, 1, "float8_e8m0fnu", "F8_E8M0"},
    {DType::kFloat4E2M1FNx2, 1, "float4_e2m1fn_x2", ""},
}};

const DTypeInfo* find(DType dtype) noexcept {
  for (const auto& info : kDTypes) {
    if (info.dtype == dtype) return &info;
  }
  return nullptr;
}

}  // namespace

std::size_t dtype_size(DType dtype) noexcept {
  const auto* info = find(dtype);
  return info ? info->size : 0;
}

std::string_view dtype_name(DType dtype) noexcept {
  const auto* info = find(dtype);
  return info ? info->name : std::string_view{};
}

std::optional<DType> dtype_from_name(std::string_view name) noexcept {
  for (const auto& info : kDTypes) {
    if (info.name == name) return info.dtype;
  }
  return std::nullopt;
}

bool dtype_is_valid(std::uint16_t raw) noexcept { return find(static_cast<DType>(raw)) != nullptr; }

std::optional<DType> dtype_from_safetensors(std::string_view name) noexcept {
  if (name.empty()) return std::nullopt;
  for (const auto& info : kDTypes) {
    if (info.safetensors == name) return info.dtype;
  }
  return std::nullopt;
}

std::string_view dtype_safetensors_name(DType dtype) noexcept {
  const auto* info = find(dtype);
  return info ? info->safetensors : std::string_view{};
}

}  // namespace tensorstream
