"""offload() at any budget the physics allows: for each architecture (tiny random-weight models
built from configs, no downloads), at 40%, 25% and 10% of the model's bytes and at the reported
minimum, the outputs (logits or hidden states, greedy generate) are bitwise those of the
in-memory model, the device bytes never exceed the budget, and one byte below the minimum is
refused with that figure. A budget below the minimum (10% of a model whose largest tensor is
larger than that) is refused the same way. CPU device."""

from __future__ import annotations

import copy
import warnings

import pytest

import tensorstream as ts
from tensorstream.config import Config
from tensorstream.offload import get_model_statistics, offload

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 128
FRACTIONS = (0.40, 0.25, 0.10)


def _decoder(config_cls, model_cls, **extra):
    base = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
    )
    base.update(extra)
    return lambda: model_cls(config_cls(**base))


T = transformers
ARCHS = {
    "llama": _decoder(T.LlamaConfig, T.LlamaForCausalLM),
    "llama_tied": _decoder(T.LlamaConfig, T.LlamaForCausalLM, tie_word_embeddings=True),
    "mistral": _decoder(T.MistralConfig, T.MistralForCausalLM, sliding_window=8),
    "qwen2": _decoder(T.Qwen2Config, T.Qwen2ForCausalLM, tie_word_embeddings=True),
    "qwen3": _decoder(T.Qwen3Config, T.Qwen3ForCausalLM, head_dim=16),
    "phi3": _decoder(T.Phi3Config, T.Phi3ForCausalLM, pad_token_id=0),
    "gemma2": _decoder(T.Gemma2Config, T.Gemma2ForCausalLM, head_dim=16, sliding_window=8),
    "mixtral": _decoder(
        T.MixtralConfig, T.MixtralForCausalLM, num_local_experts=4, num_experts_per_tok=2
    ),
    "falcon": lambda: T.FalconForCausalLM(
        T.FalconConfig(
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            vocab_size=VOCAB,
            new_decoder_architecture=True,
            num_kv_heads=2,
        )
    ),  # fmt: skip
    "gptj": lambda: T.GPTJForCausalLM(
        T.GPTJConfig(
            n_embd=64, n_layer=3, n_head=4, vocab_size=VOCAB, n_positions=128, rotary_dim=8
        )
    ),
    "bloom": lambda: T.BloomForCausalLM(
        T.BloomConfig(hidden_size=64, n_layer=3, n_head=4, vocab_size=VOCAB)
    ),
    "gpt2": lambda: T.GPT2LMHeadModel(
        T.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=VOCAB, n_positions=128)
    ),
    "opt": lambda: T.OPTForCausalLM(
        T.OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=128,
            word_embed_proj_dim=64,
        )
    ),  # fmt: skip
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(
        T.GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=128,
        )
    ),  # fmt: skip
}

# A sentence encoder shaped like MiniLM: a large vocabulary, small layers (the word
# embedding is most of the model).
ENCODER_VOCAB = 4096


def _minilm():
    return T.BertModel(
        T.BertConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=ENCODER_VOCAB, max_position_embeddings=64,
        )
    )  # fmt: skip


def _build(make):
    torch.manual_seed(0)
    return make().eval()


def _ids(vocab=VOCAB, shape=(2, 7), seed=1):
    return torch.randint(2, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _base_config(tmp_path) -> Config:
    return Config(storage_path=tmp_path, min_layer_size=1 << 14, verify_checksums=True)


def _budgets(model, config) -> tuple[int, list[int]]:
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    minimum = ts.estimate_model_memory(model, config)["minimum_budget"]
    return minimum, [int(total * f) for f in FRACTIONS] + [minimum]


def _check_budget_kept(model, budget: int) -> dict:
    stats = get_model_statistics(model)
    peak = stats["device_bytes_peak"] + stats["resident_param_bytes"] + stats["placeholder_bytes"]
    assert peak <= budget, f"device bytes {peak} exceed the budget {budget}"
    assert stats["device_bytes_peak"] <= stats["device_budget"]
    return stats


def _refused_below(make, config, minimum: int) -> None:
    with pytest.raises(ts.BudgetTooSmallError) as info:
        offload(_build(make), config.replace(vram_budget_gb=f"{minimum - 1}B"))
    assert info.value.minimum_budget == minimum


def _offload_at(make, config, budget: int, minimum: int):
    """The model offloaded under ``budget``, or None when it is below the minimum (then
    refused with the minimum)."""
    model = _build(make)
    if budget < minimum:
        with pytest.raises(ts.BudgetTooSmallError) as info:
            offload(model, config.replace(vram_budget_gb=f"{budget}B"))
        assert info.value.minimum_budget == minimum
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no overlap at the smallest budgets
        offload(model, config.replace(vram_budget_gb=f"{budget}B"))
    return model


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_causal_lm_bitwise_at_every_budget(tmp_path, arch):
    make = ARCHS[arch]
    reference = _build(make)
    config = _base_config(tmp_path)
    ids = _ids()
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref_logits = reference(ids).logits.clone()
        ref_tokens = reference.generate(
            ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0
        )
    minimum, budgets = _budgets(reference, config)
    tiers = set()
    for budget in budgets:
        model = _offload_at(make, config, budget, minimum)
        if model is None:
            continue
        with torch.no_grad():
            logits = model(ids).logits
            tokens = model.generate(
                ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0
            )
        assert torch.equal(logits, ref_logits), f"{arch} at {budget} bytes: logits differ"
        assert torch.equal(tokens, ref_tokens), f"{arch} at {budget} bytes: tokens differ"
        stats = _check_budget_kept(model, budget)
        tiers.add(stats["unit_tier"])
        if budget == minimum:
            assert stats["layers_offloaded"] >= 1
        model.cleanup_tensorstream()
    _refused_below(make, config, minimum)
    # The smallest budgets cut the model finer than whole layers.
    assert tiers - {"blocks"}, f"{arch}: every budget ran whole blocks ({tiers})"


def test_minilm_style_encoder_bitwise_at_every_budget(tmp_path):
    """A large-vocabulary encoder: the word embedding is most of the model, and it streams by
    rows, so even 10% of the model runs."""
    reference = _build(_minilm)
    config = _base_config(tmp_path)
    ids = _ids(ENCODER_VOCAB)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        ref = reference(ids, attention_mask=mask).last_hidden_state.clone()
    minimum, budgets = _budgets(reference, config)
    total = sum(p.numel() * p.element_size() for p in reference.parameters())
    assert minimum < 0.10 * total, "the table by rows and small units fit 10% of the model"
    for budget in budgets:
        model = _offload_at(_minilm, config, budget, minimum)
        with torch.no_grad():
            out = model(ids, attention_mask=mask).last_hidden_state
        assert torch.equal(out, ref), f"at {budget} bytes: hidden states differ"
        stats = _check_budget_kept(model, budget)
        if budget <= 0.25 * total:
            assert stats["units_by_rows"] >= 1
            assert stats["rows_read"] > 0
        model.cleanup_tensorstream()
    _refused_below(_minilm, config, minimum)


def test_embedding_rows_read_only_the_rows_asked_for(tmp_path):
    """A streamed table reads the distinct rows a forward looks up -- counted in bytes -- and
    the lookup equals the whole table's."""
    reference = _build(_minilm)
    config = _base_config(tmp_path)
    minimum, _ = _budgets(reference, config)
    model = _offload_at(_minilm, config, minimum, minimum)
    runtime = model.tensorstream
    table = next(b for b in runtime._blocks if b.rows and b.name.endswith("word_embeddings"))
    assert not runtime.unit_resident(table.index)
    ids = torch.tensor([[5, 9, 5, 4000, 9, 17]])
    before = get_model_statistics(model)
    with torch.no_grad():
        out = model.embeddings.word_embeddings(ids)
    after = get_model_statistics(model)
    row_bytes = 64 * 4
    assert after["rows_read"] - before["rows_read"] == 4  # 5, 9, 17, 4000
    assert after["bytes_of_rows"] - before["bytes_of_rows"] == 4 * row_bytes
    # Whole-table reads would be 4096 rows: none happened for this lookup.
    assert after["bytes_from_storage"] - before["bytes_from_storage"] < 4096 * row_bytes
    expected = torch.nn.functional.embedding(ids, reference.embeddings.word_embeddings.weight)
    assert torch.equal(out, expected)
    # An id out of range is an error naming the table, not a wrong row.
    with pytest.raises(IndexError, match="word_embeddings"), torch.no_grad():
        model.embeddings.word_embeddings(torch.tensor([[ENCODER_VOCAB]]))
    with torch.no_grad():  # and the table still works afterwards
        assert torch.equal(model.embeddings.word_embeddings(ids), expected)
    model.cleanup_tensorstream()
    assert (
        model.embeddings.word_embeddings.padding_idx
        == reference.embeddings.word_embeddings.padding_idx
    )


def test_tied_weights_stream_as_one_unit_at_small_budgets(tmp_path):
    """At the smallest budgets a tied table (embedding = lm_head) streams: one stored copy,
    acquired by both modules; outputs unchanged."""
    make = ARCHS["llama_tied"]
    reference = _build(make)
    config = _base_config(tmp_path)
    minimum, _ = _budgets(reference, config)
    model = _offload_at(make, config, minimum, minimum)
    stats = get_model_statistics(model)
    assert stats["unit_tier"] == "all"
    assert stats["resident_param_bytes"] == 0
    tied = [b for b in model.tensorstream._blocks if b.name.endswith("embed_tokens.weight")]
    assert len(tied) == 1
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    model.cleanup_tensorstream()


def test_estimate_sizes_equal_the_engines_for_every_tier(tmp_path):
    """The estimate's unit sizes (computed without a store) are those the engine lays out from
    the written store, tier by tier."""
    from tensorstream import _core
    from tensorstream._analysis import TIERS, partition, store_blocks
    from tensorstream._sources import StoreSource

    model = _build(ARCHS["qwen2"])
    config = _base_config(tmp_path)
    estimate = ts.estimate_model_memory(model, config)
    source = StoreSource.of_blocks(tmp_path, store_blocks(model, config.min_layer_size))
    for tier, summary in zip(range(len(TIERS)), estimate["tiers"], strict=True):
        part = partition(model, config.min_layer_size, tier)
        sizes = _core.unit_sizes(str(source.path), part.groups, False, False)
        assert summary["units"] == len(sizes)
        assert summary["largest_unit_bytes"] == max(sizes)


def test_units_are_read_in_place_concurrently_from_threads(tmp_path):
    """Forwards in several threads over a finely cut model: each thread acquires and releases
    the units it runs; the results equal the in-memory model's."""
    import threading

    make = ARCHS["llama"]
    reference = _build(make)
    config = _base_config(tmp_path)
    minimum, _ = _budgets(reference, config)
    model = _offload_at(make, config, minimum, minimum)
    inputs = [_ids(seed=s) for s in range(4)]
    with torch.no_grad():
        expected = [reference(x).logits for x in inputs]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            with torch.no_grad():
                results[i] = model(inputs[i]).logits
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, e in enumerate(expected):
        assert torch.equal(results[i], e)
    _check_budget_kept(model, minimum)
    model.cleanup_tensorstream()


def test_copy_is_untouched(tmp_path):
    make = ARCHS["gpt2"]
    reference = _build(make)
    clone = copy.deepcopy(reference)
    config = _base_config(tmp_path)
    minimum, _ = _budgets(reference, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        offload(clone, config.replace(vram_budget_gb=f"{minimum}B"))
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(clone(ids).logits, reference(ids).logits)
    clone.cleanup_tensorstream()


def test_no_overlap_is_warned_and_reported(tmp_path):
    """At the minimum a unit cannot load while another computes: offload() warns, naming the
    budget that would overlap, and the statistics say so; with room for two units they
    overlap."""
    make = ARCHS["llama"]
    reference = _build(make)
    config = _base_config(tmp_path)
    estimate = ts.estimate_model_memory(reference, config)
    minimum, overlap = estimate["minimum_budget"], estimate["overlap_budget"]
    assert minimum < overlap
    model = _build(make)
    with pytest.warns(RuntimeWarning, match="no overlap") as record:
        offload(model, config.replace(vram_budget_gb=f"{minimum}B"))
    assert f"{overlap:,}" in str(record[0].message)
    assert get_model_statistics(model)["overlap"] is False
    model.cleanup_tensorstream()
    model = _build(make)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        offload(model, config.replace(vram_budget_gb=f"{overlap}B"))
    assert get_model_statistics(model)["overlap"] is True
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    model.cleanup_tensorstream()
