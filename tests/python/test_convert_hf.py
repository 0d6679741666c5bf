"""Converting real (randomly initialised) Hugging Face checkpoints, sharded, with the CLI."""

from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path

import pytest
import torch

import tensorstream as ts

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _save(model: torch.nn.Module, directory: Path) -> Path:
    kwargs = {"max_shard_size": "100KB"}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True
    model.save_pretrained(directory, **kwargs)
    shards = sorted(directory.glob("*.safetensors"))
    assert len(shards) >= 3, shards
    assert (directory / "model.safetensors.index.json").is_file()
    return directory


def _llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=1000,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


MODELS = {
    "llama": (_llama, "model.layers", "llama"),
    "gpt2": (_gpt2, "transformer.h", "gpt2"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    transformers.utils.logging.disable_progress_bar()
    out = {}
    for name, (build, _, _) in MODELS.items():
        model = build()
        out[name] = (model, _save(model, tmp_path_factory.mktemp(name)))
    return out


def _on_disk(checkpoint: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        part = safetensors_torch.load_file(str(shard))
        assert not set(part) & set(tensors)
        tensors.update(part)
    return tensors


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("runner", ["python", "native"])
def test_convert_cli(tmp_path, checkpoints, model_name, runner, request, bitwise_equal) -> None:
    run = request.getfixturevalue("run_cli" if runner == "python" else "run_native")
    model, checkpoint = checkpoints[model_name]
    _, layer_prefix, model_type = MODELS[model_name]
    result = run("convert", checkpoint, tmp_path)
    assert result.returncode == 0, result.stderr
    store = tmp_path / "model.tstore"
    assert str(store) in result.stdout

    truth = _on_disk(checkpoint)
    loaded = ts.load_from_ts(store)
    assert set(loaded) == set(truth)
    for name, expected in truth.items():
        bitwise_equal(loaded[name], expected, name)

    state = model.state_dict()
    common = set(state) & set(loaded)
    assert len(common) >= len(loaded) - 1
    for name in common:
        bitwise_equal(loaded[name], state[name], name)

    header = ts.read_ts_header(store)
    blocks = [b["name"] for b in header["blocks"]]
    for layer in range(2):
        assert f"{layer_prefix}.{layer}" in blocks
    assert header["metadata"]["config"]["model_type"] == model_type
    assert ts.verify_storage_integrity(store).ok


def test_convert_single_file_and_api(tmp_path, checkpoints, bitwise_equal) -> None:
    _, checkpoint = checkpoints["llama"]
    shard = sorted(checkpoint.glob("*.safetensors"))[0]
    calls: list[tuple[int, int]] = []
    summary = ts.convert_checkpoint(
        shard, tmp_path / "one.tstore", progress=lambda d, t: calls.append((d, t))
    )
    assert summary["path"] == str(tmp_path / "one.tstore")
    assert summary["seconds"] >= 0
    assert calls and calls[-1][0] == calls[-1][1]
    truth = safetensors_torch.load_file(str(shard))
    loaded = ts.load_from_ts(tmp_path / "one.tstore")
    assert summary["tensor_count"] == len(truth) == len(loaded)
    for name, expected in truth.items():
        bitwise_equal(loaded[name], expected, name)


def test_convert_cancelled(tmp_path, checkpoints) -> None:
    _, checkpoint = checkpoints["gpt2"]
    with pytest.raises(ts.OperationCancelled):
        ts.convert_checkpoint(checkpoint, tmp_path, progress=lambda done, total: False)
    assert os.listdir(tmp_path) == []


def test_convert_fingerprint_matches_save_to_ts(tmp_path, checkpoints) -> None:
    _, checkpoint = checkpoints["llama"]
    converted = ts.convert_checkpoint(checkpoint, tmp_path / "c.tstore")
    saved = ts.save_to_ts(_on_disk(checkpoint), tmp_path / "s.tstore")
    assert converted["fingerprint"] == saved["fingerprint"]


def test_verify_cli_names_damaged_block(tmp_path, checkpoints, run_cli, corrupt) -> None:
    _, checkpoint = checkpoints["llama"]
    store = tmp_path / "model.tstore"
    assert run_cli("convert", checkpoint, store).returncode == 0
    ok = run_cli("verify", store)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("OK")

    info = ts.read_ts_header(store)["tensors"]["model.layers.1.mlp.up_proj.weight"]
    corrupt(store, info["offset"] + info["nbytes"] // 2)
    bad = run_cli("verify", store)
    assert bad.returncode == 1
    assert re.search(r"BAD block \d+ 'model\.layers\.1'", bad.stdout), bad.stdout
    assert "model.layers.0" not in bad.stdout


def test_inspect_json_lists_every_tensor(tmp_path, checkpoints, run_cli) -> None:
    _, checkpoint = checkpoints["gpt2"]
    ts.convert_checkpoint(checkpoint, tmp_path)
    result = run_cli("inspect", tmp_path, "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    listed = {t["name"]: t for b in doc["blocks"] for t in b["tensors"]}
    truth = _on_disk(checkpoint)
    assert set(listed) == set(truth)
    for name, t in listed.items():
        assert t["shape"] == list(truth[name].shape)
        assert t["dtype"] == str(truth[name].dtype).split(".")[-1]
    assert doc["fingerprint"] == ts.read_ts_header(tmp_path)["fingerprint"]

    text = run_cli("inspect", tmp_path)
    assert text.returncode == 0
    assert "transformer.h.1" in text.stdout
