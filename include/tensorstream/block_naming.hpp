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

/// Groups `tensor_names` into blocks with block_name_for, in the order a transformer most
/// likely runs them, judged from names alone: input embeddings ("embed", "wte", "wpe",
/// "shared"), then encoder blocks, then other layers, then decoder blocks (in each: numbered
/// layers in natural order, then the rest such as final norms), then output heads
/// ("lm_head", "classifier", ...). Tensors inside a block are in natural order. Engines that
/// see the real execution order (the adaptive prefetcher) do not depend on this.
[[nodiscard]] std::vector<BlockGroup> group_into_blocks(
    const std::vector<std::string>& tensor_names);

}  // namespace tensorstream
