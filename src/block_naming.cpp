#include "tensorstream/block_naming.hpp"

#include <algorithm>
#include <cctype>
#include <initializer_list>
#include <map>
#include <utility>

namespace tensorstream {
namespace {

bool all_digits(std::string_view s) noexcept {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) {
    return std::isdigit(static_cast<unsigned char>(c));
  });
}

}  // namespace

std::string block_name_for(std::string_view tensor_name) {
  std::size_t start = 0;
  while (true) {
    const auto dot = tensor_name.find('.', start);
    const auto component = tensor_name.substr(
        start, dot == std::string_view::npos ? std::string_view::npos : dot - start);
    if (dot == std::string_view::npos) break;  // the last component is the parameter name
    if (all_digits(component)) return std::string(tensor_name.substr(0, dot));
    start = dot + 1;
  }
  const auto last_dot = tensor_name.rfind('.');
  if (last_dot == std::string_view::npos) return std::string(tensor_name);
  return std::string(tensor_name.substr(0, last_dot));
}

bool natural_less(std::string_view a, std::string_view b) noexcept {
  std::size_t i = 0;
  std::size_t j = 0;
  auto is_digit = [](char c) { return std::isdigit(static_cast<unsigned char>(c)) != 0; };
  while (i < a.size() && j < b.size()) {
    if (is_digit(a[i]) && is_digit(b[j])) {
      std::size_t i_end = i;
      std::size_t j_end = j;
      while (i_end < a.size() && is_digit(a[i_end])) ++i_end;
      while (j_end < b.size() && is_digit(b[j_end])) ++j_end;
      // Compare numerically without overflow: strip leading zeros, then length, then digits.
      std::size_t i_nz = i;
      std::size_t j_nz = j;
      while (i_nz + 1 < i_end && a[i_nz] == '0') ++i_nz;
      while (j_nz + 1 < j_end && b[j_nz] == '0') ++j_nz;
      const auto na = a.substr(i_nz, i_end - i_nz);
      const auto nb = b.substr(j_nz, j_end - j_nz);
      if (na.size() != nb.size()) return na.size() < nb.size();
      if (na != nb) return na < nb;
      if ((i_end - i) != (j_end - j)) return (i_end - i) < (j_end - j);
      i = i_end;
      j = j_end;
    } else {
      if (a[i] != b[j]) return static_cast<unsigned char>(a[i]) < static_cast<unsigned char>(b[j]);
      ++i;
      ++j;
    }
  }
  return (a.size() - i) < (b.size() - j);
}

namespace {

bool has_numeric_component(std::string_view name) {
  std::size_t start = 0;
  while (start <= name.size()) {
    const auto dot = name.find('.', start);
    const auto end = dot == std::string_view::npos ? name.size() : dot;
    if (all_digits(name.substr(start, end - start))) return true;
    if (dot == std::string_view::npos) break;
    start = dot + 1;
  }
  return false;
}

bool has_component(std::string_view name, std::initializer_list<std::string_view> words) {
  std::size_t start = 0;
  while (start <= name.size()) {
    const auto dot = name.find('.', start);
    const auto end = dot == std::string_view::npos ? name.size() : dot;
    const auto component = name.substr(start, end - start);
    for (const auto word : words) {
      if (component == word) return true;
    }
    if (dot == std::string_view::npos) break;
    start = dot + 1;
  }
  return false;
}

// (stage, role): where a block runs in a transformer, from its name alone. Stages: input
// embeddings, encoder, undetermined, decoder, output head; roles inside a stage: layers,
// then the rest (final norms, poolers).
std::pair<int, int> execution_rank(std::string_view name) {
  if (has_component(name,
                    {"lm_head", "head", "cls", "classifier", "score", "qa_outputs", "embed_out"})) {
    return {4, 0};
  }
  if (name.find("embed") != std::string_view::npos ||
      has_component(name, {"wte", "wpe", "shared"})) {
    return {0, 0};
  }
  const int role = has_numeric_component(name) ? 0 : 1;
  if (name.find("encoder") != std::string_view::npos) return {1, role};
  if (name.find("decoder") != std::string_view::npos) return {3, role};
  return {2, role};
}

}  // namespace

std::vector<BlockGroup> group_into_blocks(const std::vector<std::string>& tensor_names) {
  std::map<std::string, std::vector<std::string>> groups;
  for (const auto& name : tensor_names) groups[block_name_for(name)].push_back(name);
  std::vector<BlockGroup> out;
  out.reserve(groups.size());
  for (auto& [name, tensors] : groups) {
    std::sort(tensors.begin(), tensors.end(), natural_less);
    out.push_back({name, std::move(tensors)});
  }
  std::sort(out.begin(), out.end(), [](const BlockGroup& a, const BlockGroup& b) {
    const auto ra = execution_rank(a.name);
    const auto rb = execution_rank(b.name);
    if (ra != rb) return ra < rb;
    return natural_less(a.name, b.name);
  });
  return out;
}

}  // namespace tensorstream
