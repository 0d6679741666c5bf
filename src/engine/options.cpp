#include "tensorstream/engine/options.hpp"

#include <algorithm>
#include <cctype>
#include <stdexcept>

#include "tensorstream/errors.hpp"

namespace tensorstream::engine {

using tensorstream::detail::concat;

std::string_view prefetch_strategy_name(PrefetchStrategy strategy) noexcept {
  switch (strategy) {
    case PrefetchStrategy::kNone:
      return "none";
    case PrefetchStrategy::kNextLayer:
      return "next_layer";
    case PrefetchStrategy::kAdaptive:
      return "adaptive";
  }
  return "";
}

PrefetchStrategy parse_prefetch_strategy(std::string_view name) {
  for (const auto s :
       {PrefetchStrategy::kNone, PrefetchStrategy::kNextLayer, PrefetchStrategy::kAdaptive}) {
    if (prefetch_strategy_name(s) == name) return s;
  }
  throw std::invalid_argument(
      concat("prefetch strategy '", name, "' is not one of none, next_layer, adaptive"));
}

std::string_view gds_mode_name(GdsMode mode) noexcept {
  switch (mode) {
    case GdsMode::kAuto:
      return "auto";
    case GdsMode::kOn:
      return "on";
    case GdsMode::kOff:
      return "off";
  }
  return "";
}

GdsMode parse_gds_mode(std::string_view name) {
  for (const auto m : {GdsMode::kAuto, GdsMode::kOn, GdsMode::kOff}) {
    if (gds_mode_name(m) == name) return m;
  }
  throw std::invalid_argument(concat("gds mode '", name, "' is not one of auto, on, off"));
}

std::string_view compressed_reads_name(CompressedReads mode) noexcept {
  switch (mode) {
    case CompressedReads::kAuto:
      return "auto";
    case CompressedReads::kDecode:
      return "decode";
    case CompressedReads::kDecodedCopy:
      return "decoded_copy";
  }
  return "";
}

CompressedReads parse_compressed_reads(std::string_view name) {
  for (const auto m :
       {CompressedReads::kAuto, CompressedReads::kDecode, CompressedReads::kDecodedCopy}) {
    if (compressed_reads_name(m) == name) return m;
  }
  throw std::invalid_argument(
      concat("compressed_reads '", name, "' is not one of auto, decode, decoded_copy"));
}

namespace detail {

int parse_device(const std::string& device) {
  if (device == "cpu") return -1;
  if (device == "cuda") return 0;
  if (device.rfind("cuda:", 0) == 0) {
    const auto rest = device.substr(5);
    if (!rest.empty() && std::all_of(rest.begin(), rest.end(), ::isdigit) && rest.size() < 6) {
      return std::stoi(rest);
    }
  }
  throw std::invalid_argument(concat("device '", device, "' is not 'cpu', 'cuda' or 'cuda:N'"));
}

}  // namespace detail

}  // namespace tensorstream::engine
