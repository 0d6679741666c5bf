#include <gtest/gtest.h>

#include "tensorstream/block_naming.hpp"
#include "tensorstream/dtype.hpp"

namespace ts = tensorstream;

TEST(DType, NamesRoundTripAndSizes) {
  int known = 0;
  for (std::uint16_t raw = 0; raw < 64; ++raw) {
    if (!ts::dtype_is_valid(raw)) continue;
    ++known;
    const auto dtype = static_cast<ts::DType>(raw);
    EXPECT_GT(ts::dtype_size(dtype), 0u);
    EXPECT_EQ(ts::dtype_from_name(ts::dtype_name(dtype)), dtype);
    const auto st = ts::dtype_safetensors_name(dtype);
    if (!st.empty()) {
      EXPECT_EQ(ts::dtype_from_safetensors(st), dtype);
    }
  }
  EXPECT_EQ(known, 22);
  EXPECT_EQ(ts::dtype_size(ts::DType::kBFloat16), 2u);
  EXPECT_EQ(ts::dtype_size(ts::DType::kComplex128), 16u);
  EXPECT_EQ(ts::dtype_size(static_cast<ts::DType>(0)), 0u);
  EXPECT_FALSE(ts::dtype_from_name("float7").has_value());
  EXPECT_FALSE(ts::dtype_from_safetensors("").has_value());
}

TEST(BlockNaming, GroupsTransformerNames) {
  EXPECT_EQ(ts::block_name_for("model.layers.12.mlp.up_proj.weight"), "model.layers.12");
  EXPECT_EQ(ts::block_name_for("model.embed_tokens.weight"), "model.embed_tokens");
  EXPECT_EQ(ts::block_name_for("lm_head.weight"), "lm_head");
  EXPECT_EQ(ts::block_name_for("h.3.attn.c_attn.bias"), "h.3");
  EXPECT_EQ(ts::block_name_for("encoder.block.0.layer.1.DenseReluDense.wi.weight"),
            "encoder.block.0");
  EXPECT_EQ(ts::block_name_for("tensor"), "tensor");
  EXPECT_EQ(ts::block_name_for("a.7"), "a");  // a trailing number is the parameter itself
}

TEST(BlockNaming, NaturalOrderPutsLayersInExecutionOrder) {
  const auto groups =
      ts::group_into_blocks({"model.norm.weight", "model.layers.10.w", "model.layers.2.w",
                             "model.layers.2.b", "model.embed_tokens.weight", "model.layers.0.w"});
  std::vector<std::string> names;
  for (const auto& g : groups) names.push_back(g.name);
  EXPECT_EQ(names, (std::vector<std::string>{"model.embed_tokens", "model.layers.0",
                                             "model.layers.2", "model.layers.10", "model.norm"}));
  EXPECT_EQ(groups[2].tensors, (std::vector<std::string>{"model.layers.2.b", "model.layers.2.w"}));
  EXPECT_TRUE(ts::natural_less("x9", "x10"));
  EXPECT_FALSE(ts::natural_less("x10", "x9"));
  EXPECT_TRUE(ts::natural_less("x01", "x1") != ts::natural_less("x1", "x01"));
  EXPECT_FALSE(ts::natural_less("same", "same"));
}

namespace {
std::vector<std::string> block_order(const std::vector<std::string>& tensors) {
  std::vector<std::string> names;
  for (const auto& g : ts::group_into_blocks(tensors)) names.push_back(g.name);
  return names;
}
}  // namespace

TEST(BlockNaming, ExecutionOrderOfCommonArchitectures) {
  EXPECT_EQ(block_order({"lm_head.weight", "model.norm.weight", "model.layers.1.w",
                         "model.layers.0.w", "model.embed_tokens.weight"}),
            (std::vector<std::string>{"model.embed_tokens", "model.layers.0", "model.layers.1",
                                      "model.norm", "lm_head"}));
  EXPECT_EQ(block_order({"transformer.ln_f.weight", "transformer.wte.weight",
                         "transformer.h.0.attn.c_attn.weight", "transformer.wpe.weight"}),
            (std::vector<std::string>{"transformer.wpe", "transformer.wte", "transformer.h.0",
                                      "transformer.ln_f"}));
  EXPECT_EQ(block_order({"decoder.block.0.layer.0.w", "encoder.final_layer_norm.weight",
                         "shared.weight", "lm_head.weight", "encoder.block.0.layer.0.w",
                         "decoder.final_layer_norm.weight"}),
            (std::vector<std::string>{"shared", "encoder.block.0", "encoder.final_layer_norm",
                                      "decoder.block.0", "decoder.final_layer_norm", "lm_head"}));
  EXPECT_EQ(block_order({"gpt_neox.final_layer_norm.weight", "embed_out.weight",
                         "gpt_neox.layers.0.w", "gpt_neox.embed_in.weight"}),
            (std::vector<std::string>{"gpt_neox.embed_in", "gpt_neox.layers.0",
                                      "gpt_neox.final_layer_norm", "embed_out"}));
}
