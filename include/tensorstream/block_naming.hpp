// Grouping tensors into blocks by name, for checkpoints that carry no module structure.
//
// The rule follows how transformer checkpoints name parameters: the block of a tensor is the
// prefix of its name up to and including the first all-digit path component
// ("model.layers.12.mlp.up_proj.weight" -> "model.layers.12"); a tensor with no such
// component belongs to its module ("model.embed_tokens.weight" -> "model.embed_tokens",
// "lm_head.weight" -> "lm_head"); a name without dots is its own block.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace tensorstream {

/// The block name of tensor `tensor_name` (see the rule above).
[[nodiscard]] std::string block_name_for(std::string_view tensor_name);

/// Orders names so that embedded numbers compare numerically ("layers.2" < "layers.10").
[[nodiscard]] bool natural_less(std::string_view a, std::string_view b) noexcept;

/// One block and the names of its tensors.
struct BlockGroup {
  std::string name;
  std::vector<std::string> tensors;
};

/// Groups `tensor_names` into blocks with block_name_for; blocks and the tensors inside
/// each are in natural order (embeddings, then layers 0, 1, ..., then the head: the order
/// in which a transformer runs them, for common naming schemes).
[[nodiscard]] std::vector<BlockGroup> group_into_blocks(const std::vector<std::string>& tensor_names);

}  // namespace tensorstream
