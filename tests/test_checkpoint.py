"""Checkpoint folder validation: one test per broken layout, and the facts of good ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from glmrepl.engine import families
from glmrepl.engine.errors import CheckpointError
from glmrepl.engine.families import FamilyMatch
from glmrepl.engine.models import checkpoint
from glmrepl.engine.models.checkpoint import find_problems, inspect_checkpoint, scan_checkpoint

LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    "size 1234567\n"
)


def problem_of(path: Path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as caught:
        inspect_checkpoint(path, **kwargs)
    return str(caught.value)


def assert_message(message: str, file_name: str, *fix_words: str) -> None:
    assert "\n" not in message, message
    assert file_name in message, message
    for word in fix_words:
        assert word in message, message


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


# -- good folders --------------------------------------------------------------


def test_gpt2_folder_is_described(gpt2_checkpoint):
    info = inspect_checkpoint(gpt2_checkpoint)
    assert info.path == gpt2_checkpoint
    assert info.model_type == "gpt2"
    assert info.architecture == "GPT2LMHeadModel"
    assert info.weights_format == "bin"
    assert info.weight_files == [gpt2_checkpoint / "pytorch_model.bin"]
    assert info.weight_bytes == (gpt2_checkpoint / "pytorch_model.bin").stat().st_size
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gpt2_checkpoint, local_files_only=True)
    assert info.param_count == model.num_parameters()  # read from the pickle's shapes, tied head once
    assert info.has_chat_template is False
    assert {"vocab.json", "merges.txt"} <= set(info.tokenizer_files)
    assert info.context_length == 256
    assert info.family is None
    assert info.needs_remote_code is False
    assert find_problems(gpt2_checkpoint) == []


def test_qwen_folder_is_described(qwen_checkpoint):
    from transformers import AutoModelForCausalLM

    info = inspect_checkpoint(qwen_checkpoint)
    assert info.model_type == "qwen2"
    assert info.architecture == "Qwen2ForCausalLM"
    assert info.weights_format == "safetensors"
    assert len(info.weight_files) >= 2
    assert all(f.suffix == ".safetensors" for f in info.weight_files)
    assert info.weight_bytes == sum(f.stat().st_size for f in info.weight_files)
    assert info.has_chat_template is True
    assert "tokenizer.json" in info.tokenizer_files
    assert info.context_length == 512
    assert info.dtype == "float32"
    model = AutoModelForCausalLM.from_pretrained(qwen_checkpoint, local_files_only=True)
    assert info.param_count == model.num_parameters()


def test_dtype_comes_from_safetensors_when_config_has_none(qwen_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(qwen_checkpoint)
    edit_config(folder, dtype=None, torch_dtype=None)
    assert inspect_checkpoint(folder).dtype == "float32"


def test_chat_template_file_counts(gpt2_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(gpt2_checkpoint)
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert inspect_checkpoint(folder).has_chat_template is True


def test_safetensors_preferred_over_bin(qwen_checkpoint, gpt2_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(qwen_checkpoint)
    (folder / "pytorch_model.bin").write_bytes((gpt2_checkpoint / "pytorch_model.bin").read_bytes())
    assert inspect_checkpoint(folder).weights_format == "safetensors"


def test_context_length_from_seq_length(gpt2_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(gpt2_checkpoint)
    edit_config(folder, n_positions=None, n_ctx=None, seq_length=2048)
    assert scan_checkpoint(folder).context_length == 2048


def test_checking_imports_neither_torch_nor_transformers(qwen_checkpoint):
    code = (
        "import sys; from glmrepl.engine.models.checkpoint import find_problems; "
        f"assert find_problems({str(qwen_checkpoint)!r}) == []; "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


# -- the folder and config.json ------------------------------------------------


def test_missing_path(tmp_path):
    assert_message(problem_of(tmp_path / "nowhere"), "nowhere", "does not exist")


def test_file_instead_of_folder(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"x")
    assert_message(problem_of(file), "model.safetensors", "not a folder", "config.json")


def test_missing_config(gpt2_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(gpt2_checkpoint)
    (folder / "config.json").unlink()
    assert_message(problem_of(folder), "config.json", "missing", "download")


def test_invalid_config_json_names_line_and_column(gpt2_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(gpt2_checkpoint)
    (folder / "config.json").write_text('{\n  "model_type": "gpt2",\n  "n_embd": 64\n  "n_layer": 2\n}')
    message = problem_of(folder)
    assert_message(message, "config.json", "not valid JSON", "line 4", "column 3")


def test_config_without_model_type(gpt2_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(gpt2_checkpoint)
    edit_config(folder, model_type=None)
    assert_message(problem_of(folder), "config.json", '"model_type"', "GPT2LMHeadModel")
    edit_config(folder, architectures=None)
    assert_message(problem_of(folder), "config.json", '"architectures"', "download")


def test_unknown_architecture_suggests_upgrade(gpt2_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(gpt2_checkpoint)
    edit_config(folder, model_type="frobnicator", architectures=["FrobnicatorForCausalLM"])
    assert_message(
        problem_of(folder), "config.json", "'frobnicator'", "not known to transformers", "pip install -U transformers"
    )


def test_custom_code_needs_trust_remote_code(gpt2_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(gpt2_checkpoint)
    edit_config(folder, model_type="frobnicator", auto_map={"AutoModelForCausalLM": "modeling_frob.FrobForCausalLM"})
    assert_message(problem_of(folder), "config.json", "auto_map", "--trust-remote-code")
    info = inspect_checkpoint(folder, trust_remote_code=True)
    assert info.needs_remote_code is True


def test_auto_map_on_a_known_model_type_is_fine(gpt2_checkpoint, copy_checkpoint):
    # transformers ignores the shipped code when it has the class itself.
    folder = copy_checkpoint(gpt2_checkpoint)
    edit_config(folder, auto_map={"AutoModelForCausalLM": "modeling_gpt2.GPT2LMHeadModel"})
    assert inspect_checkpoint(folder).needs_remote_code is False


def test_native_family_needs_no_remote_code(gpt2_checkpoint, copy_checkpoint, monkeypatch):
    folder = copy_checkpoint(gpt2_checkpoint)
    edit_config(folder, model_type="chatglm", auto_map={"AutoModel": "modeling_chatglm.ChatGLMModel"})
    match = FamilyMatch("chatglm2", "test")
    monkeypatch.setattr(families, "detect_family", lambda path, config, override=None: match)
    info = inspect_checkpoint(folder)
    assert info.family == match
    assert info.needs_remote_code is False


def test_family_override_is_passed_on(gpt2_checkpoint, monkeypatch):
    seen = []
    monkeypatch.setattr(families, "detect_family", lambda path, config, override=None: seen.append(override))
    inspect_checkpoint(gpt2_checkpoint, family_override="glm4")
    assert seen == ["glm4"]


def test_family_error_is_reported(gpt2_checkpoint, monkeypatch):
    def refuse(path, config, override=None):
        raise CheckpointError(f"{path}/config.json: a chatglm config of no known generation: use --family")

    monkeypatch.setattr(families, "detect_family", refuse)
    assert_message(problem_of(gpt2_checkpoint), "config.json", "--family")


def test_missing_family_detector_means_not_detected(gpt2_checkpoint, monkeypatch):
    def not_written_yet(path, config, override=None):
        raise ModuleNotFoundError("no module", name=f"{families.__name__}.chatglm")

    monkeypatch.setattr(families, "detect_family", not_written_yet)
    assert inspect_checkpoint(gpt2_checkpoint).family is None


# -- tokenizer files -----------------------------------------------------------


def test_no_tokenizer_files(gpt2_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(gpt2_checkpoint)
    (folder / "vocab.json").unlink()
    assert_message(problem_of(folder), str(folder), "no tokenizer files", "tokenizer.json")


def test_sentencepiece_or_wordpiece_files_count(gpt2_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(gpt2_checkpoint)
    (folder / "vocab.json").unlink()
    (folder / "ice_text.model").write_bytes(b"\x0a\x05piece")
    assert find_problems(folder) == []
    (folder / "ice_text.model").unlink()
    (folder / "vocab.txt").write_text("[PAD]\n")
    assert find_problems(folder) == []


@pytest.mark.parametrize(
    "name", ["tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json"]
)
def test_invalid_tokenizer_json(qwen_checkpoint, copy_checkpoint, name):
    folder = copy_checkpoint(qwen_checkpoint)
    (folder / name).write_text('{"eos_token": "<|im_end|>",')
    assert_message(problem_of(folder), name, "not valid JSON", "download")


def test_truncated_large_tokenizer_json(qwen_checkpoint, copy_checkpoint, monkeypatch):
    monkeypatch.setattr(checkpoint, "FULL_JSON_PARSE_LIMIT", 100)
    folder = copy_checkpoint(qwen_checkpoint)
    assert find_problems(folder) == []
    text = (folder / "tokenizer.json").read_text()
    (folder / "tokenizer.json").write_text(text[: len(text) // 2])
    assert_message(problem_of(folder), "tokenizer.json", "not valid JSON", "truncated")


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer.model"])
def test_lfs_pointer_tokenizer(qwen_checkpoint, copy_checkpoint, name):
    folder = copy_checkpoint(qwen_checkpoint)
    (folder / name).write_text(LFS_POINTER)
    assert_message(problem_of(folder), name, "git-LFS pointer", "git lfs pull")


# -- weights -------------------------------------------------------------------


def test_no_weights(gpt2_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(gpt2_checkpoint)
    (folder / "pytorch_model.bin").unlink()
    assert_message(problem_of(folder), str(folder), "no weights", "model.safetensors", "download")


def test_tensorflow_weights_only(gpt2_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(gpt2_checkpoint)
    (folder / "pytorch_model.bin").rename(folder / "tf_model.h5")
    assert_message(problem_of(folder), "tf_model.h5", "TensorFlow", "from_tf=True", "save_pretrained")


def test_flax_weights_only(gpt2_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(gpt2_checkpoint)
    (folder / "pytorch_model.bin").rename(folder / "flax_model.msgpack")
    assert_message(problem_of(folder), "flax_model.msgpack", "Flax", "from_flax=True")


def test_missing_shard(qwen_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(qwen_checkpoint)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    message = problem_of(folder)
    assert_message(
        message, shard.name, "listed in model.safetensors.index.json but missing", "the download is incomplete"
    )
    assert scan_checkpoint(folder).param_count is None


def test_lfs_pointer_weights(qwen_checkpoint, gpt2_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(qwen_checkpoint)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.write_text(LFS_POINTER)
    assert_message(problem_of(folder), shard.name, "git-LFS pointer", "git lfs pull", "download again")
    folder = copy_checkpoint(gpt2_checkpoint)
    (folder / "pytorch_model.bin").write_text(LFS_POINTER)
    assert_message(problem_of(folder), "pytorch_model.bin", "git-LFS pointer")


def test_truncated_safetensors(qwen_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(qwen_checkpoint)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    assert_message(problem_of(folder), shard.name, "truncated", "download it again")


def test_safetensors_cut_inside_its_header(qwen_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(qwen_checkpoint)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:50])
    assert_message(problem_of(folder), shard.name, "truncated")


def test_empty_safetensors(qwen_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(qwen_checkpoint)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"")
    assert_message(problem_of(folder), shard.name, "empty")


def test_empty_pytorch_bin(gpt2_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(gpt2_checkpoint)
    (folder / "pytorch_model.bin").write_bytes(b"")
    assert_message(problem_of(folder), "pytorch_model.bin", "empty", "download it again")


def test_garbage_pytorch_bin(gpt2_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(gpt2_checkpoint)
    (folder / "pytorch_model.bin").write_bytes(b"<html>Not Found</html>")
    assert_message(problem_of(folder), "pytorch_model.bin", "neither a zip archive nor a pickle")


def test_truncated_zip_pytorch_bin(gpt2_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(gpt2_checkpoint)
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    assert_message(problem_of(folder), "pytorch_model.bin", "truncated", "download it again")


def test_legacy_pickle_bin_is_accepted(gpt2_checkpoint, copy_checkpoint):
    import torch

    folder = copy_checkpoint(gpt2_checkpoint)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert find_problems(folder) == []


def test_invalid_index_json(qwen_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(qwen_checkpoint)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {')
    assert_message(problem_of(folder), "model.safetensors.index.json", "not valid JSON", "line 1")


def test_index_without_weight_map(qwen_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(qwen_checkpoint)
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    assert_message(problem_of(folder), "model.safetensors.index.json", "weight_map", "download it again")


def test_find_problems_lists_all_of_them(gpt2_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(gpt2_checkpoint)
    (folder / "config.json").unlink()
    (folder / "vocab.json").unlink()
    (folder / "pytorch_model.bin").unlink()
    problems = find_problems(folder)
    assert len(problems) == 3
    assert "config.json" in problems[0]
    assert "tokenizer" in problems[1]
    assert "no weights" in problems[2]
    assert str(CheckpointError(problems[0])) == problem_of(folder)
