"""ts.from_pretrained: a Hugging Face checkpoint streamed in place, bitwise; `tensorstream run`."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import tensorstream as ts

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

VOCAB = 96


def _llama_config(**overrides):
    values = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return transformers.LlamaConfig(**values)


def _configs():
    return {
        "llama": _llama_config(),
        "gpt2": transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=48,
            n_layer=4,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        ),
        "qwen2": transformers.Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{kind: (in-memory model, sharded checkpoint dir)}."""
    out = {}
    for kind, config in _configs().items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path, max_shard_size="60KB")
        assert (path / "model.safetensors.index.json").exists()
        assert len(list(path.glob("*.safetensors"))) >= 3, "the checkpoint must be sharded"
        out[kind] = (model, path)
    return out


def _minimum_budget(path, **config) -> int:
    with pytest.raises(ts.BudgetTooSmallError) as info:
        ts.from_pretrained(path, ts.Config(vram_budget_gb="1KB", **config))
    return info.value.minimum_budget


def _streamed(path, storage, extra: int = 4096, **config):
    budget = _minimum_budget(path, storage_path=storage, **config) + extra
    model = ts.from_pretrained(
        path, ts.Config(vram_budget_gb=f"{budget}B", storage_path=storage, **config)
    )
    return model, budget


def _inputs():
    torch.manual_seed(1)
    return torch.randint(1, VOCAB, (2, 7))


def _assert_same(reference, streamed, max_new_tokens: int = 6):
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(reference(x).logits, streamed(x).logits)
    prompt = x[:1]
    expected = reference.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False)
    got = streamed.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False)
    assert torch.equal(expected, got)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
def test_bitwise_logits_and_generate(checkpoints, tmp_path, kind):
    reference, path = checkpoints[kind]
    storage = tmp_path / "storage"
    model, budget = _streamed(path, storage)
    try:
        _assert_same(reference, model)
        stats = ts.get_model_statistics(model)
        assert stats["blocks"] >= 4
        assert stats["layers_offloaded"] >= stats["blocks"] // 2, stats
        assert stats["device_bytes_peak"] <= stats["device_budget"]
        assert stats["device_bytes_peak"] + stats["resident_param_bytes"] <= budget
        assert stats["bytes_from_storage"] + stats["bytes_from_page_cache"] > 0
        assert model.tensorstream.statistics()["store"] == str(path)
        # No store was written: the engine read the checkpoint in place.
        assert not list(tmp_path.glob("**/*.tstore"))
    finally:
        model.cleanup_tensorstream()
    assert model.tensorstream.closed


def test_tied_weights_stay_shared_and_lm_head_absent(checkpoints, tmp_path):
    _, path = checkpoints["gpt2"]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"], "GPT-2 saves its tied head once"
    model, _ = _streamed(path, tmp_path)
    try:
        assert model.lm_head.weight is model.transformer.wte.weight
        assert model.lm_head.weight.device.type == "cpu"
        assert all(p.device.type != "meta" for p in model.parameters())
        assert all(b.device.type != "meta" for b in model.buffers())
    finally:
        model.cleanup_tensorstream()


@pytest.mark.parametrize("prefetch", ["none", "next_layer", "adaptive"])
@pytest.mark.parametrize("ram_cache", [0, "256KB"])
def test_llama_prefetch_and_ram_tier(checkpoints, tmp_path, prefetch, ram_cache):
    reference, path = checkpoints["llama"]
    model, _ = _streamed(
        path, tmp_path, prefetch_strategy=prefetch, ram_cache_gb=ram_cache, verify_checksums=True
    )
    try:
        _assert_same(reference, model)
        stats = model.tensorstream.statistics()
        assert stats["device_bytes_peak"] <= stats["device_budget"]
        assert (
            stats["ram_tier"]["peak_bytes_in_use"]
            <= ts.Config(ram_cache_gb=ram_cache).ram_cache_bytes
        )
        assert stats["failures"] == 0
        if ram_cache:
            assert stats["bytes_from_ram_tier"] > 0
    finally:
        model.cleanup_tensorstream()
    assert not list(tmp_path.glob("**/*.tstore"))


def test_rotary_buffers_are_recomputed(checkpoints, tmp_path):
    reference, path = checkpoints["llama"]
    model, _ = _streamed(path, tmp_path)
    try:
        assert torch.equal(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    finally:
        model.cleanup_tensorstream()


def test_optimize_memory_usage_restarts_the_checkpoint_engine(checkpoints, tmp_path):
    reference, path = checkpoints["llama"]
    model, budget = _streamed(path, tmp_path)
    try:
        stats = ts.optimize_memory_usage(model, 4.0)
        assert stats["budget"] == budget * 4
        _assert_same(reference, model, max_new_tokens=3)
    finally:
        model.cleanup_tensorstream()


def test_budget_too_small_names_the_minimum(checkpoints, tmp_path):
    _, path = checkpoints["llama"]
    minimum = _minimum_budget(path, storage_path=tmp_path)
    model = ts.from_pretrained(path, ts.Config(vram_budget_gb=f"{minimum}B", storage_path=tmp_path))
    model.cleanup_tensorstream()


def test_bad_inputs_are_named(checkpoints, tmp_path):
    _, path = checkpoints["llama"]
    config = ts.Config(vram_budget_gb="1MB", storage_path=tmp_path / "s")
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        ts.from_pretrained(missing, config)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        ts.from_pretrained(empty, config)
    (empty / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="safetensors"):
        ts.from_pretrained(empty, config)

    # A checkpoint lacking one parameter: the error names the directory and the tensor.
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    tensors = {}
    for file in path.glob("*.safetensors"):
        tensors.update(load_file(file))
    for name in ("model.layers.2.mlp.up_proj.weight", "model.norm.weight"):
        partial = {k: v for k, v in tensors.items() if k != name}
        save_file(partial, broken / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ValueError, match=f"{broken}.*{name}|{name}.*{broken}") as info:
            ts.from_pretrained(broken, config)
        assert str(broken) in str(info.value) and name in str(info.value)


def test_bad_checkpoints_raise_the_readers_error_naming_the_file(checkpoints, tmp_path):
    _, path = checkpoints["llama"]
    config = ts.Config(vram_budget_gb="1MB", storage_path=tmp_path / "s")
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    shard = sorted(broken.glob("*.safetensors"))[1]
    good = shard.read_bytes()

    # A corrupt header: its JSON does not parse.
    n = int.from_bytes(good[:8], "little")
    shard.write_bytes(good[:8] + b"[" + b" " * (n - 1) + good[8 + n :])
    with pytest.raises(ts.FormatError, match=f"{shard}: .*JSON"):
        ts.from_pretrained(broken, config)

    # A tensor whose bytes run past the end of the file.
    shard.write_bytes(good[:-1])
    with pytest.raises(ts.FormatError, match=f"{shard}: file truncated: tensor '.*'"):
        ts.from_pretrained(broken, config)

    # A shard listed in the index that does not exist.
    shard.unlink()
    with pytest.raises(ts.StoreIOError) as info:
        ts.from_pretrained(broken, config)
    assert info.value.errno == 2
    assert f"model.safetensors.index.json: shard '{shard.name}' listed in the index" in str(
        info.value
    )
    assert str(shard) in str(info.value)


_WITHOUT_PIP_SAFETENSORS = textwrap.dedent(
    """
    import sys
    import torch, transformers
    import tensorstream as ts

    path, storage, budget = sys.argv[1], sys.argv[2], sys.argv[3]
    cfg = transformers.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        transformers.AutoModelForCausalLM.from_config(cfg)  # imports the architecture's code
    # From here on the pip package cannot be imported; tensorstream reads with its own reader.
    for name in [m for m in sys.modules if m == "safetensors" or m.startswith("safetensors.")]:
        del sys.modules[name]
    sys.modules["safetensors"] = None
    x = torch.tensor([[5, 17, 42, 8]])
    for dtype in (None, "bfloat16"):
        config = ts.Config(vram_budget_gb=budget, storage_path=storage, dtype=dtype)
        model = ts.from_pretrained(path, config)
        with torch.no_grad():
            out = model.generate(x, max_new_tokens=4, do_sample=False)
        assert dtype is not None or model.tensorstream.statistics()["layers_offloaded"] >= 2
        print(dtype, ",".join(map(str, out[0].tolist())))
        model.cleanup_tensorstream()
    """
)


def test_the_package_reads_checkpoints_without_the_pip_safetensors(checkpoints, tmp_path):
    reference, path = checkpoints["llama"]
    x = torch.tensor([[5, 17, 42, 8]])
    expected = {"None": reference.generate(x, max_new_tokens=4, do_sample=False)}
    bf16 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    expected["bfloat16"] = bf16.generate(x, max_new_tokens=4, do_sample=False)
    budget = f"{_minimum_budget(path, storage_path=tmp_path / 's') + 4096}B"
    script = _WITHOUT_PIP_SAFETENSORS
    result = subprocess.run(
        [sys.executable, "-c", script, str(path), str(tmp_path / "s"), budget],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    got = dict(line.split(" ", 1) for line in result.stdout.strip().splitlines())
    assert set(got) == set(expected)
    for dtype, ids in expected.items():
        assert got[dtype] == ",".join(map(str, ids[0].tolist())), dtype
    assert list((tmp_path / "s").glob("pretrained-*.tstore")), "the bfloat16 run converted"


def test_cli_run_prints_the_greedy_tokens(checkpoints, tmp_path):
    reference, path = checkpoints["llama"]
    prompt = [5, 17, 42, 8]
    expected = reference.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False)
    expected_ids = expected[0, len(prompt) :].tolist()
    budget = _minimum_budget(path, storage_path=tmp_path) + 4096
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tensorstream",
            "run",
            str(path),
            "--prompt-ids",
            ",".join(map(str, prompt)),
            "--max-new-tokens",
            "5",
            "--vram-budget",
            f"{budget}B",
            "--ram-cache",
            "128KB",
            "--storage-path",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("generated token ids:"))
    assert [int(t) for t in line.split(":", 1)[1].split(",")] == expected_ids
    assert "blocks streamed / resident" in result.stdout
    assert not list(tmp_path.glob("**/*.tstore"))


def test_dtype_converts_the_streamed_weights_through_a_reused_store(checkpoints, tmp_path):
    reference, path = checkpoints["llama"]  # float32 on disk
    expected = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    storage = tmp_path / "store"
    model, budget = _streamed(path, storage, dtype="bfloat16")
    try:
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        stats = ts.get_model_statistics(model)
        assert stats["layers_offloaded"] >= 2
        (store,) = storage.glob("pretrained-*.tstore")
        assert stats["store"] == str(store)
        header = ts.read_ts_header(store)
        assert {t["dtype"] for t in header["tensors"].values()} == {"bfloat16"}
        _assert_same(expected, model)
        assert stats["device_bytes_peak"] + stats["resident_param_bytes"] <= budget
    finally:
        model.cleanup_tensorstream()
    mtime = store.stat().st_mtime_ns
    again = ts.from_pretrained(
        path, ts.Config(vram_budget_gb=f"{budget}B", storage_path=storage, dtype="bfloat16")
    )
    try:
        assert store.stat().st_mtime_ns == mtime, "the converted store was rewritten"
        _assert_same(expected, again)
    finally:
        again.cleanup_tensorstream()
    # Without a dtype nothing is converted or written.
    plain, _ = _streamed(path, tmp_path / "plain")
    plain.cleanup_tensorstream()
    assert not list((tmp_path / "plain").glob("*.tstore"))


def _word_tokenizer():
    """A real fast tokenizer over the test vocabulary: "w0" .. "w95", split on whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0")


def test_cli_run_with_a_tokenizer_prints_the_text(checkpoints, tmp_path):
    reference, path = checkpoints["llama"]
    model_dir = tmp_path / "model"
    shutil.copytree(path, model_dir)
    tokenizer = _word_tokenizer()
    tokenizer.save_pretrained(model_dir)
    prompt = "w5 w17 w42 w8"
    ids = tokenizer(prompt)["input_ids"]
    assert ids == [5, 17, 42, 8]
    expected = reference.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)
    expected_text = tokenizer.decode(expected[0].tolist(), skip_special_tokens=True)
    budget = _minimum_budget(path, storage_path=tmp_path) + 4096
    result = subprocess.run(
        [sys.executable, "-m", "tensorstream", "run", str(model_dir), "--prompt", prompt]
        + ["--max-new-tokens", "5", "--vram-budget", f"{budget}B"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == expected_text
    assert expected_text.startswith(prompt) and len(expected_text.split()) == 4 + 5
    assert "blocks streamed / resident" in result.stdout


def test_cli_run_refuses_text_without_tokenizer(checkpoints):
    _, path = checkpoints["llama"]
    result = subprocess.run(
        [sys.executable, "-m", "tensorstream", "run", str(path), "--prompt", "hi"]
        + ["--vram-budget", "1MB"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "tokenizer" in result.stderr


_MEASURE = textwrap.dedent(
    """
    import gc, json, sys
    import torch, transformers
    import tensorstream as ts
    from tensorstream import pretrained  # noqa: F401 - imports counted before the baseline

    path, budget = sys.argv[1], sys.argv[2]
    # Warm the imports of the architecture (code, not weights) before the baseline.
    cfg = transformers.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        transformers.AutoModelForCausalLM.from_config(cfg)
    gc.collect()

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    baseline = status("VmRSS")
    model = ts.from_pretrained(path, ts.Config(vram_budget_gb=budget, storage_path=sys.argv[3]))
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    stats = model.tensorstream.statistics()
    growth = status("VmHWM") - baseline
    print(json.dumps({"growth": growth, "offloaded": stats["layers_offloaded"]}))
    model.cleanup_tensorstream()
    """
)


def test_memory_peak_stays_far_below_the_model_size(tmp_path):
    config = _llama_config(
        vocab_size=1000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=10,
        num_attention_heads=12,
        num_key_value_heads=12,
    )
    path = tmp_path / "big"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(path, max_shard_size="100MB")
    del model
    gc.collect()
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert size >= 200e6
    minimum = _minimum_budget(path, storage_path=tmp_path / "s")
    budget = minimum + (1 << 20)
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path), f"{budget}B", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["offloaded"] >= 8
    print(f"peak RSS growth {measured['growth']:,} bytes for a {size:,}-byte checkpoint")
    assert measured["growth"] < size / 3, (measured, size, budget)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_any_budget_streams_the_checkpoint_bitwise(checkpoints, tmp_path, kind):
    """At 40%, 25% and 10% of the checkpoint's bytes and at the minimum, the model streams
    from the checkpoint in place -- cut into finer units as the budget shrinks, its embedding
    read by rows -- with bitwise outputs; below the minimum it is refused with that figure."""
    import warnings

    reference, path = checkpoints[kind]
    total = sum(p.numel() * p.element_size() for p in reference.parameters())
    minimum = _minimum_budget(path, storage_path=tmp_path)
    tiers = set()
    for budget in [int(total * f) for f in (0.40, 0.25, 0.10)] + [minimum]:
        config = ts.Config(vram_budget_gb=f"{budget}B", storage_path=tmp_path)
        if budget < minimum:
            with pytest.raises(ts.BudgetTooSmallError) as info:
                ts.from_pretrained(path, config)
            assert info.value.minimum_budget == minimum
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            model = ts.from_pretrained(path, config)
        try:
            _assert_same(reference, model)
            stats = ts.get_model_statistics(model)
            peak = stats["device_bytes_peak"] + stats["resident_param_bytes"]
            assert peak + stats["placeholder_bytes"] <= budget
            tiers.add(stats["unit_tier"])
        finally:
            model.cleanup_tensorstream()
    assert tiers - {"blocks"}, tiers
    with pytest.raises(ts.BudgetTooSmallError) as info:
        ts.from_pretrained(path, ts.Config(vram_budget_gb=f"{minimum - 1}B", storage_path=tmp_path))
    assert info.value.minimum_budget == minimum
    assert not list(tmp_path.glob("**/*.tstore")), "streamed in place: no store written"
