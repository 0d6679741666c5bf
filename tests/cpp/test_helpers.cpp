#include "test_helpers.hpp"

#include <fcntl.h>
#include <stdlib.h>

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
