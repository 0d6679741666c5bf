#include "test_helpers.hpp"

#include <stdlib.h>

#include <fstream>
#include <stdexcept>

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

}  // namespace tensorstream::testing
