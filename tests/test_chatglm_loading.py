"""Loading ChatGLM checkpoints: no checkpoint code, device maps, shards, clear errors."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from glmrepl.engine.errors import CheckpointError, ModelLoadError
from glmrepl.engine.families import FamilyMatch, detect_family, load_family
from glmrepl.engine.families.chatglm import weights
from glmrepl.engine.models.checkpoint import scan_checkpoint

DATA = Path(__file__).parent / "data" / "chatglm"
TRAP = 'raise RuntimeError("checkpoint code was executed")\n'


def load(folder: Path, device_map="cpu", family: str | None = None):
    import torch

    match = FamilyMatch(family, "test") if family else detect_family(folder, read_config(folder))
    return load_family(
        folder, match, weight_files=scan_checkpoint(folder).weight_files, dtype=torch.float32, device_map=device_map
    )


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def write_config(folder: Path, **changes) -> None:
    (folder / "config.json").write_text(json.dumps({**read_config(folder), **changes}), encoding="utf-8")


def assert_reference_logits(parts, family: str) -> None:
    import torch
    from safetensors.torch import load_file

    reference = load_file(str(DATA / f"{family}-tiny.logits.safetensors"))
    with torch.inference_mode():
        logits = parts.model(input_ids=reference["input_ids"]).logits
    assert torch.allclose(logits, reference["logits"], atol=1e-4, rtol=0)


@pytest.fixture
def copy_of(tmp_path):
    def make(family: str) -> Path:
        return Path(shutil.copytree(DATA / f"{family}-tiny", tmp_path / f"{family}-tiny"))

    return make


@pytest.mark.parametrize("family", ["chatglm1", "chatglm2", "chatglm3"])
def test_checkpoint_python_files_are_never_executed(copy_of, family):
    folder = copy_of(family)
    for name in ("modeling_chatglm.py", "tokenization_chatglm.py", "configuration_chatglm.py", "quantization.py"):
        (folder / name).write_text(TRAP + ("ROLES = ['<|user|>']\n" if family == "chatglm3" else ""))
    parts = load(folder)
    assert not any(name.endswith("_chatglm") for name in sys.modules)
    assert_reference_logits(parts, family)


def test_device_map_dict_places_every_module(copy_of):
    folder = copy_of("chatglm1")
    device_map = {
        "transformer.word_embeddings": "cpu",
        "transformer.layers.0": "cpu",
        "transformer.layers.1": "cpu",
        "transformer.final_layernorm": "cpu",
        "lm_head": "cpu",
    }
    parts = load(folder, device_map=device_map)
    assert {parameter.device.type for parameter in parts.model.parameters()} == {"cpu"}
    assert not any(parameter.is_meta for parameter in parts.model.parameters())
    assert_reference_logits(parts, "chatglm1")


def test_device_map_dict_for_the_native_glm_model():
    parts = load(
        DATA / "chatglm2-tiny",
        device_map={"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "lm_head": "cpu"},
    )
    assert_reference_logits(parts, "chatglm2")


def test_auto_device_map_on_this_machine():
    assert_reference_logits(load(DATA / "chatglm3-tiny", device_map="auto"), "chatglm3")


def test_device_for_picks_the_most_specific_entry():
    device_map = weights.resolve_device_map(
        None, {"": "cpu", "model.layers.1": 0, "model.layers.10": "cuda:1"}, dtype=None
    )
    assert weights.device_for("model.layers.1.mlp.down_proj.weight", device_map) == "cuda:0"
    assert weights.device_for("model.layers.10.mlp.down_proj.weight", device_map) == "cuda:1"
    assert weights.device_for("model.layers.2.mlp.down_proj.weight", device_map) == "cpu"
    assert weights.resolve_device_map(None, "cuda:0", dtype=None) == {"": "cuda:0"}
    assert weights.resolve_device_map(None, {"a": "cpu:0", "b": "cpu"}, dtype=None) == {"a": "cpu", "b": "cpu"}
    with pytest.raises(ModelLoadError):
        weights.device_for("lm_head.weight", {"model": "cpu"})
    with pytest.raises(ModelLoadError, match="disk"):
        weights.resolve_device_map(None, {"": "disk"}, dtype=None)


def shard_in_two(folder: Path) -> dict[str, list[str]]:
    """Split model.safetensors into two shards and an index; return {shard: its tensor names}."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, shard_names in halves.items():
        save_file({name: tensors[name] for name in shard_names}, str(folder / shard))
    write_index(folder, halves)
    return halves


def write_index(folder: Path, shards: dict[str, list[str]], name: str = "model.safetensors.index.json") -> None:
    weight_map = {tensor: shard for shard, tensors in shards.items() for tensor in tensors}
    (folder / name).write_text(json.dumps({"weight_map": weight_map}), encoding="utf-8")


def test_sharded_safetensors_checkpoint(copy_of):
    folder = copy_of("chatglm3")
    shard_in_two(folder)
    assert_reference_logits(load(folder), "chatglm3")


def test_sharded_pickle_checkpoint(copy_of):
    import torch

    folder = copy_of("chatglm2")
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    (folder / "pytorch_model.bin").unlink()
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for shard, shard_names in halves.items():
        torch.save({name: state[name] for name in shard_names}, folder / shard)
    write_index(folder, halves, "pytorch_model.bin.index.json")
    files = scan_checkpoint(folder).weight_files
    assert files == [folder / shard for shard in halves]
    assert weights.iter_checkpoint_tensors(files)[1] == len(state)  # the progress total, read from no tensor
    assert_reference_logits(load(folder), "chatglm2")


def test_missing_weight_is_named(copy_of):
    from safetensors.torch import load_file, save_file

    folder = copy_of("chatglm3")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.down_proj.weight"):
        load(folder)


def test_missing_output_layer_shares_the_embeddings(copy_of):
    import torch

    folder = copy_of("chatglm1")
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    del state["lm_head.weight"]  # the fixture stores a copy of the embeddings
    torch.save(state, folder / "pytorch_model.bin")
    assert_reference_logits(load(folder), "chatglm1")


def test_legacy_pickle_without_zip_container_loads(copy_of):
    import torch

    folder = copy_of("chatglm2")
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert_reference_logits(load(folder), "chatglm2")


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_code_is_refused(copy_of, tmp_path):
    import torch

    folder = copy_of("chatglm2")
    marker = tmp_path / "code-ran"
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["extra"] = _RunsCodeWhenUnpickled(marker)
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="more than tensors"):
        load(folder)
    assert not marker.exists()


@pytest.mark.parametrize(
    "family,changes,named",
    [
        ("chatglm2", {"quantization_bit": 4}, "quantization_bit=4"),
        ("chatglm2", {"pre_seq_len": 128}, "pre_seq_len=128"),
        ("chatglm3", {"rmsnorm": False}, "rmsnorm=False"),
        ("chatglm1", {"quantization_bit": 8}, "quantization_bit=8"),
    ],
)
def test_unsupported_settings_are_named(copy_of, family, changes, named):
    folder = copy_of(family)
    write_config(folder, **changes)
    with pytest.raises(CheckpointError, match=named):
        load(folder)


def test_glm4_override_needs_a_tiktoken_vocabulary(copy_of):
    with pytest.raises(CheckpointError, match="tiktoken"):
        load(copy_of("chatglm3"), family="glm4")


def test_model_moves_to_another_dtype_and_still_generates():
    import torch

    parts = load(DATA / "chatglm1-tiny")
    parts.model.to(dtype=torch.bfloat16)
    with torch.inference_mode():
        output = parts.model.generate(torch.tensor([[439, 5, 8]]), do_sample=False, max_new_tokens=4)
    assert output.shape == (1, 7)


def test_the_loader_reads_the_weights_the_validator_checked(copy_of, monkeypatch):
    """The index rewritten between validation and loading (a download still running, an edit):
    the load pipeline reads the shards that were checked, not the new index."""
    from glmrepl.engine.models import loading

    folder = copy_of("chatglm3")
    first_shard, first_names = next(iter(shard_in_two(folder).items()))
    validate = loading.inspect_checkpoint

    def validate_then_change(*args, **kwargs):
        info = validate(*args, **kwargs)
        write_index(folder, {first_shard: first_names})  # the index now names half of the weights
        return info

    monkeypatch.setattr(loading, "inspect_checkpoint", validate_then_change)
    loaded = loading.load_model(loading.LoadOptions(path=folder, name="c3", mode="cpu", dtype="float32"))
    assert json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].keys() == set(first_names)
    assert_reference_logits(loaded, "chatglm3")
