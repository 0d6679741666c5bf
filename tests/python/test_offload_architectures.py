"""offload() across transformer architectures: tiny random-weight models built from configs (no
downloads) give bitwise the outputs of the in-memory model at budgets that make most layers
stream, with every prefetch strategy. CPU device."""

from __future__ import annotations

import copy

import pytest

import tensorstream as ts
from tensorstream.config import Config
from tensorstream.offload import get_model_statistics, offload

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 512


def _mistral():
    return transformers.MistralForCausalLM(
        transformers.MistralConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=128,
            sliding_window=8,
        )
    )


def _qwen2():
    return transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=128,
            tie_word_embeddings=True,
        )
    )


def _opt():
    return transformers.OPTForCausalLM(
        transformers.OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=128,
            word_embed_proj_dim=64,
        )
    )


def _neox():
    return transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=128,
        )
    )


def _bert():
    return transformers.BertModel(
        transformers.BertConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=128,
        )
    )


def _t5():
    return transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            d_model=64,
            d_ff=128,
            d_kv=16,
            num_layers=3,
            num_decoder_layers=3,
            num_heads=4,
            vocab_size=VOCAB,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


CAUSAL = {"mistral": _mistral, "qwen2": _qwen2, "opt": _opt, "gpt_neox": _neox}
STRATEGIES = ["none", "next_layer", "adaptive"]
MIN_LAYER = 1 << 14


def _build(make):
    torch.manual_seed(0)
    return make().eval()


def _config(tmp_path, model, strategy) -> Config:
    """The smallest budget that works plus one layer: most layers must stream."""
    config = Config(
        storage_path=tmp_path,
        min_layer_size=MIN_LAYER,
        prefetch_strategy=strategy,
        verify_checksums=True,
    )
    estimate = ts.estimate_model_memory(model, config)
    budget = estimate["minimum_budget"] + estimate["largest_block_bytes"]
    return config.replace(vram_budget_gb=f"{budget}B")


def _ids(shape=(2, 7), seed=1):
    return torch.randint(2, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("arch", sorted(CAUSAL))
def test_causal_lm_streams_bitwise(tmp_path, arch, strategy):
    model = _build(CAUSAL[arch])
    ids = _ids()
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref_logits = model(ids).logits.clone()
        ref_tokens = model.generate(
            ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0
        )
    offload(model, _config(tmp_path, model, strategy))
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(
            ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0
        )
    assert torch.equal(logits, ref_logits), f"{arch}: logits differ bitwise"
    assert torch.equal(tokens, ref_tokens), f"{arch}: greedy tokens differ"
    stats = get_model_statistics(model)
    assert stats["layers_offloaded"] >= 2, "most layers must stream"
    model.cleanup_tensorstream()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bert_encoder_streams_bitwise(tmp_path, strategy):
    model = _build(_bert)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).last_hidden_state.clone()
    offload(model, _config(tmp_path, model, strategy))
    with torch.no_grad():
        out = model(ids, attention_mask=mask).last_hidden_state
        again = model(ids, attention_mask=mask).last_hidden_state
    assert torch.equal(out, ref) and torch.equal(again, ref)
    assert get_model_statistics(model)["layers_offloaded"] >= 2
    model.cleanup_tensorstream()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_t5_encoder_decoder_streams_bitwise(tmp_path, strategy):
    model = _build(_t5)
    ids = _ids((2, 9))
    labels = _ids((2, 5), seed=2)
    with torch.no_grad():
        ref_logits = model(input_ids=ids, labels=labels).logits.clone()
        ref_tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
    offload(model, _config(tmp_path, model, strategy))
    with torch.no_grad():
        logits = model(input_ids=ids, labels=labels).logits
        tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(logits, ref_logits), "T5 logits differ bitwise"
    assert torch.equal(tokens, ref_tokens), "T5 greedy tokens differ"
    assert get_model_statistics(model)["layers_offloaded"] >= 3
    model.cleanup_tensorstream()


def test_albert_layer_called_many_times_per_forward(tmp_path):
    """ALBERT runs one shared layer num_hidden_layers times per forward: its streamed modules
    are acquired and released once per call, and give the in-memory result."""
    model = _build(
        lambda: transformers.AlbertModel(
            transformers.AlbertConfig(
                vocab_size=VOCAB,
                embedding_size=32,
                hidden_size=64,
                intermediate_size=256,
                num_hidden_layers=4,
                num_attention_heads=4,
            )
        )
    )
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).last_hidden_state.clone()
    offload(model, _config(tmp_path, model, "adaptive"))
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, ref)
    stats = get_model_statistics(model)
    assert stats["layers_offloaded"] >= 4
    model.cleanup_tensorstream()


def test_reference_copy_is_untouched_by_offload(tmp_path):
    """Offloading a deep copy leaves the original model's weights in place (no shared storage)."""
    model = _build(_t5)
    clone = copy.deepcopy(model)
    offload(clone, _config(tmp_path, clone, "adaptive"))
    ids = _ids((1, 6))
    with torch.no_grad():
        a = model.generate(ids, max_new_tokens=4, do_sample=False)
        b = clone.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b)
