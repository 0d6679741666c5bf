#include "tensorstream/checksum.hpp"

#define XXH_INLINE_ALL
#include <xxhash.h>

#include <algorithm>
#include <cstdio>

#include "tensorstream/detail/endian.hpp"

namespace tensorstream {

std::uint64_t checksum64(std::span<const std::byte> data) noexcept {
  return XXH3_64bits(data.data(), data.size());
}

struct Checksum64::State {
  XXH3_state_t xxh;
};

Checksum64::Checksum64() : state_(std::make_unique<State>()) { reset(); }
Checksum64::~Checksum64() = default;
Checksum64::Checksum64(Checksum64&&) noexcept = default;
Checksum64& Checksum64::operator=(Checksum64&&) noexcept = default;

void Checksum64::update(std::span<const std::byte> data) noexcept {
  XXH3_64bits_update(&state_->xxh, data.data(), data.size());
}

void Checksum64::update_zeros(std::size_t n) noexcept {
  static constexpr std::array<std::byte, 4096> kZeros{};
  while (n > 0) {
    const std::size_t step = std::min(n, kZeros.size());
    XXH3_64bits_update(&state_->xxh, kZeros.data(), step);
    n -= step;
  }
}

std::uint64_t Checksum64::digest() const noexcept { return XXH3_64bits_digest(&state_->xxh); }

void Checksum64::reset() noexcept { XXH3_64bits_reset(&state_->xxh); }

std::string Fingerprint::hex() const {
  char buf[33];
  std::snprintf(buf, sizeof buf, "%016llx%016llx", static_cast<unsigned long long>(high),
                static_cast<unsigned long long>(low));
  return buf;
}

void FingerprintBuilder::add(std::string_view name, DType dtype,
                             std::span<const std::int64_t> shape, std::uint64_t data_checksum) {
  std::string record;
  detail::append_le<std::uint16_t>(record, static_cast<std::uint16_t>(dtype));
  detail::append_le<std::uint32_t>(record, static_cast<std::uint32_t>(shape.size()));
  for (const auto dim : shape) detail::append_le<std::int64_t>(record, dim);
  detail::append_le<std::uint64_t>(record, data_checksum);
  entries_.push_back({std::string(name), std::move(record)});
}

Fingerprint FingerprintBuilder::finish() const {
  std::vector<const Entry*> sorted;
  sorted.reserve(entries_.size());
  for (const auto& e : entries_) sorted.push_back(&e);
  std::sort(sorted.begin(), sorted.end(),
            [](const Entry* a, const Entry* b) { return a->name < b->name; });
  XXH3_state_t state;
  XXH3_128bits_reset(&state);
  for (const Entry* e : sorted) {
    std::string len;
    detail::append_le<std::uint32_t>(len, static_cast<std::uint32_t>(e->name.size()));
    XXH3_128bits_update(&state, len.data(), len.size());
    XXH3_128bits_update(&state, e->name.data(), e->name.size());
    XXH3_128bits_update(&state, e->record.data(), e->record.size());
  }
  const XXH128_hash_t h = XXH3_128bits_digest(&state);
  return Fingerprint{h.high64, h.low64};
}

}  // namespace tensorstream
