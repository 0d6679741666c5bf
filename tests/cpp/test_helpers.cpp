#include "test_helpers.hpp"

#include <fcntl.h>
#include <stdlib.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <utility>

#include "tensorstream/errors.hpp"
#include "tensorstream/store.hpp"

namespace tensorstream::testing {

TempDir::TempDir() {
  std::string pattern = (std::filesystem::temp_directory_path() / "tstest-XXXXXX").string();
  if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
  path_ = pattern;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::vector<std::byte> random_bytes(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::byte> out(n);
  for (auto& b : out) b = static_cast<std::byte>(rng() & 0xff);
  return out;
}

namespace {

std::uint16_t to_bf16(float f) {
  std::uint32_t u = 0;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<std::uint16_t>(u >> 16);
}

// IEEE half from float (round to nearest even; weights here are far from overflow).
std::uint16_t to_fp16(float f) {
  std::uint32_t u = 0;
  std::memcpy(&u, &f, 4);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  const int exponent = static_cast<int>((u >> 23) & 0xff) - 127 + 15;
  std::uint32_t mantissa = u & 0x7fffffu;
  if (exponent <= 0) {  // subnormal or zero
    if (exponent < -10) return static_cast<std::uint16_t>(sign);
    mantissa |= 0x800000u;
    const int shift = 14 - exponent;
    std::uint32_t half = mantissa >> shift;
    const std::uint32_t rest = mantissa & ((1u << shift) - 1);
    if (rest > (1u << (shift - 1)) || (rest == (1u << (shift - 1)) && (half & 1u))) ++half;
    return static_cast<std::uint16_t>(sign | half);
  }
  std::uint32_t half = (static_cast<std::uint32_t>(exponent) << 10) | (mantissa >> 13);
  const std::uint32_t rest = mantissa & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;
  return static_cast<std::uint16_t>(sign | half);
}

template <typename T>
void put(std::vector<std::byte>& out, std::size_t i, T v) {
  std::memcpy(out.data() + i * sizeof(T), &v, sizeof(T));
}

}  // namespace

std::vector<std::byte> weight_bytes(DType dtype, std::size_t numel, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  const auto size = dtype_size(dtype);
  std::vector<std::byte> out(numel * size);
  // Complex types hold two real components per element.
  const bool complex =
      dtype == DType::kComplex32 || dtype == DType::kComplex64 || dtype == DType::kComplex128;
  const std::size_t values = complex ? 2 * numel : numel;
  for (std::size_t i = 0; i < values; ++i) {
    const float w = normal(rng);
    switch (dtype) {
      case DType::kBFloat16:
        put(out, i, to_bf16(w));
        break;
      case DType::kFloat16:
      case DType::kComplex32:
        put(out, i, to_fp16(w));
        break;
      case DType::kFloat32:
      case DType::kComplex64:
        put(out, i, w);
        break;
      case DType::kFloat64:
      case DType::kComplex128:
        put(out, i, static_cast<double>(w));
        break;
      case DType::kBool:
        put(out, i, static_cast<std::uint8_t>(w > 0.03f));
        break;
      case DType::kFloat8E4M3FN:
      case DType::kFloat8E4M3FNUZ:
      case DType::kFloat8E5M2:
      case DType::kFloat8E5M2FNUZ:
      case DType::kFloat8E8M0FNU:
      case DType::kFloat4E2M1FNx2:
        // The high byte of a bf16: sign, exponent and one mantissa bit, like an fp8 weight.
        put(out, i, static_cast<std::uint8_t>(to_bf16(w) >> 8));
        break;
      default: {
        // Integer types: quantised weights, |q| mostly below 8.
        const auto q = static_cast<std::int64_t>(std::lround(w * 200.0f));
        const auto bytes = static_cast<std::uint64_t>(q);
        std::memcpy(out.data() + i * size, &bytes, size);  // little-endian truncation
      }
    }
  }
  return out;
}

std::vector<std::byte> read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path.string());
  in.seekg(0, std::ios::end);
  std::vector<std::byte> data(static_cast<std::size_t>(in.tellg()));
  in.seekg(0);
  in.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(data.size()));
  return data;
}

void write_file(const std::filesystem::path& path, const std::vector<std::byte>& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
  if (!out) throw std::runtime_error("cannot write " + path.string());
}

std::filesystem::path make_random_store(const std::filesystem::path& dir, int blocks,
                                        std::uint64_t min_size, std::uint64_t max_size,
                                        std::uint64_t seed) {
  const auto path = dir / "model.tstore";
  std::mt19937_64 rng(seed);
  StoreWriter writer(path, WriterOptions{4096, 256, false});
  for (int b = 0; b < blocks; ++b) {
    const auto name = "layers." + std::to_string(b);
    writer.begin_block(name);
    const auto size = min_size + rng() % (max_size - min_size + 1);
    const auto data = random_bytes(size, rng());
    writer.add_tensor(name + ".w", DType::kUInt8,
                      std::vector<std::int64_t>{static_cast<std::int64_t>(size)}, data);
    writer.end_block();
  }
  writer.commit();
  return path;
}

FaultInjectionEnv::FaultInjectionEnv(Rule rule, io::Env& target)
    : io::EnvWrapper(target), rule_(std::move(rule)) {}

tensorstream::detail::FileDescriptor FaultInjectionEnv::open(const std::filesystem::path& path,
                                                             int flags) {
  if ((flags & O_DIRECT) != 0) {
    FaultContext context;
    context.point = FaultPoint::kOpenDirect;
    context.path = &path;
    context.direct = true;
    if (const int code = rule_(context).error; code != 0) {
      tensorstream::detail::throw_errno(
          tensorstream::detail::concat("cannot open '", path.string(), "'"), code);
    }
  }
  return target().open(path, flags);
}

io::ReadStep FaultInjectionEnv::before_request(const io::RequestInfo& request) {
  FaultContext context;
  context.point = FaultPoint::kRead;
  context.file = request.file;
  context.path = request.path;
  context.offset = request.offset;
  context.size = request.size;
  context.direct = request.direct;
  const Fault fault = rule_(context);
  io::ReadStep step = target().before_request(request);
  step.delay += fault.delay;
  if (fault.error != 0) step.error = fault.error;
  if (fault.eof_after) step.end_after = fault.eof_after;
  if (fault.partial) step.first_transfer = fault.partial;
  return step;
}

}  // namespace tensorstream::testing
