"""`glmrepl check` on every way a folder breaks, and `glmrepl list` over a models dir and an HF cache."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hubserver import LocalHub, build_test_repos

from glmrepl.cli.main import main
from glmrepl.engine.models.download import MANIFEST_NAME, download_checkpoint


@pytest.fixture(scope="module")
def downloaded(gpt2_checkpoint, qwen_checkpoint, tmp_path_factory):
    """Folders downloaded once from the local hub (with manifests). Read-only: copy to break them."""
    root = tmp_path_factory.mktemp("downloaded")
    with LocalHub(build_test_repos(gpt2_checkpoint, qwen_checkpoint)) as hub, pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_ENDPOINT", hub.url)
        patch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        return {name: download_checkpoint(f"tiny/{name}", root / name).path for name in ("sharded", "multi-format")}


def check(folder, capsys) -> tuple[int, list[str]]:
    status = main(["check", str(folder)])
    return status, capsys.readouterr().out.strip().splitlines()


def first_shard(folder: Path) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / sorted(set(index["weight_map"].values()))[0]


def test_a_complete_download_is_ready(downloaded, capsys):
    assert check(downloaded["sharded"], capsys) == (0, ["ready"])


def test_missing_shard(downloaded, copy_checkpoint, capsys):
    folder = copy_checkpoint(downloaded["sharded"])
    shard = first_shard(folder)
    shard.unlink()
    status, lines = check(folder, capsys)
    assert status == 1
    assert any(f"{shard} is missing (listed in {MANIFEST_NAME})" in line for line in lines)
    assert any("listed in model.safetensors.index.json but missing" in line for line in lines)


def test_truncated_file(downloaded, copy_checkpoint, capsys):
    folder = copy_checkpoint(downloaded["sharded"])
    shard = first_shard(folder)
    shard.write_bytes(shard.read_bytes()[:-100])
    status, lines = check(folder, capsys)
    assert status == 1
    assert any("the manifest says" in line for line in lines)
    assert any("truncated" in line for line in lines)


def test_lfs_pointer(downloaded, copy_checkpoint, capsys):
    folder = copy_checkpoint(downloaded["sharded"])
    (folder / "tokenizer.json").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 123\n"
    )
    status, lines = check(folder, capsys)
    assert status == 1 and any("git-LFS pointer" in line for line in lines)


def test_hash_mismatch_only_the_manifest_can_see(downloaded, copy_checkpoint, capsys):
    folder = copy_checkpoint(downloaded["sharded"])
    config = folder / "tokenizer_config.json"
    text = config.read_text()
    assert '"errors": "replace"' in text
    config.write_text(text.replace('"errors": "replace"', '"errors": "REPLACE"'))  # same size, still valid
    status, lines = check(folder, capsys)
    assert (status, lines) == (
        1,
        [f"{config} does not match the sha256 in {MANIFEST_NAME}: the file is damaged; download it again"],
    )


def test_bad_config_json(downloaded, copy_checkpoint, capsys):
    folder = copy_checkpoint(downloaded["sharded"])
    (folder / "config.json").write_text('{"model_type": "qwen2",')
    status, lines = check(folder, capsys)
    assert status == 1 and any("config.json is not valid JSON" in line for line in lines)


def test_without_a_manifest_the_structural_checks_still_run(downloaded, copy_checkpoint, capsys):
    folder = copy_checkpoint(downloaded["multi-format"])
    (folder / MANIFEST_NAME).unlink()
    assert check(folder, capsys) == (0, ["ready"])
    (folder / "model.safetensors").write_bytes(b"\x08")
    status, lines = check(folder, capsys)
    assert status == 1 and "model.safetensors is truncated" in lines[0]


def test_unreadable_manifest_and_missing_folder(downloaded, copy_checkpoint, capsys, tmp_path):
    folder = copy_checkpoint(downloaded["multi-format"])
    (folder / MANIFEST_NAME).write_text("{not json")
    status, lines = check(folder, capsys)
    assert status == 1 and MANIFEST_NAME in lines[0]
    assert check(tmp_path / "nowhere", capsys)[0] == 1


# -- list --------------------------------------------------------------------------


def fake_hf_cache(cache: Path, repo_id: str, source: Path) -> Path:
    """The hub cache layout: blobs, a snapshot of symlinks to them, and refs/main."""
    commit = "a" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in source.iterdir():
        if file.is_file():
            blob = repo / "blobs" / f"blob-{file.name}"
            shutil.copyfile(file, blob)
            (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_list_shows_models_dir_and_cache_with_their_state(downloaded, gpt2_checkpoint, tmp_path, monkeypatch, capsys):
    models = tmp_path / "models"
    shutil.copytree(downloaded["sharded"], models / "sharded")
    broken = Path(shutil.copytree(downloaded["multi-format"], models / "org" / "broken"))
    (broken / "model.safetensors").unlink()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    snapshot = fake_hf_cache(tmp_path / "hf-cache", "someone/tiny-gpt2", gpt2_checkpoint)

    assert main(["list", "--models-dir", str(models)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "ARCHITECTURE", "PARAMS", "DTYPE", "SIZE", "STATUS", "PATH"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"sharded", "org/broken", "someone/tiny-gpt2"}
    assert "Qwen2ForCausalLM" in rows["sharded"] and "float32" in rows["sharded"]
    assert " ready " in rows["sharded"] and rows["sharded"].endswith(str(models / "sharded"))
    assert "K " in rows["sharded"]  # parameter count from the safetensors headers
    assert "not ready:" in rows["org/broken"] and "no weights" in rows["org/broken"]
    assert " ready " in rows["someone/tiny-gpt2"] and rows["someone/tiny-gpt2"].endswith(str(snapshot))


def test_list_with_nothing_to_show(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert main(["list", "--models-dir", str(tmp_path / "none")]) == 0
    assert "no checkpoints in" in capsys.readouterr().out


def test_tool_commands_do_not_import_torch(downloaded):
    code = (
        "import sys; from glmrepl.cli.main import main; status = main(['check', sys.argv[1]]); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'; "
        "sys.exit(status)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(downloaded["sharded"])], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ready"


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["download"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["download", "x/y", "--weights", "gguf"])
    assert exit_info.value.code == 2


def write_config_toml(monkeypatch, tmp_path, text: str) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    (tmp_path / "xdg-config" / "glmrepl").mkdir(parents=True)
    (tmp_path / "xdg-config" / "glmrepl" / "config.toml").write_text(text, encoding="utf-8")


def test_list_reads_the_models_dir_from_config_toml(gpt2_checkpoint, tmp_path, monkeypatch, capsys):
    models = tmp_path / "configured"
    shutil.copytree(gpt2_checkpoint, models / "from-config")
    write_config_toml(monkeypatch, tmp_path, f'[model]\nmodels_dir = "{models}"\n')
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert main(["list"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == ["from-config"]
    # The command line still wins over the file.
    assert main(["list", "--models-dir", str(tmp_path / "none")]) == 0
    assert "no checkpoints in" in capsys.readouterr().out


def test_list_keeps_the_status_short_and_points_at_check(downloaded, tmp_path, monkeypatch, capsys):
    models = tmp_path / "models"
    broken = Path(shutil.copytree(downloaded["multi-format"], models / "broken"))
    (broken / "model.safetensors").unlink()
    config = json.loads((broken / "config.json").read_text())
    shutil.copytree(downloaded["multi-format"], models / "future")
    (models / "future" / "config.json").write_text(json.dumps({**config, "model_type": "gpt9000"}))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert main(["list", "--models-dir", str(models)]) == 0
    captured = capsys.readouterr()
    rows = {line.split()[0]: line for line in captured.out.splitlines()[1:]}
    assert _status(rows["broken"]) == "not ready: has no weights"
    assert _status(rows["future"]) == (
        "not ready: config.json: model type 'gpt9000' is not known to transformers " + _transformers_version()
    )
    assert all(len(row.rsplit(str(models), 1)[0]) < 150 for row in rows.values())  # before the PATH column
    assert "glmrepl check PATH" in captured.err


def _status(row: str) -> str:
    """The STATUS cell: the text after the size column, up to the padding before the path."""
    return re.search(r"  ((?:not )?ready.*?)\s{2,}/", row)[1]


def _transformers_version() -> str:
    from importlib.metadata import version

    return version("transformers")


def test_list_judges_an_unknown_model_type_without_importing_transformers(downloaded, tmp_path):
    models = tmp_path / "models"
    for model_type in ("gpt9000", "gpt-sw3"):  # gpt-sw3: an alias transformers adds on import
        folder = Path(shutil.copytree(downloaded["multi-format"], models / model_type))
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    code = (
        "import sys; from glmrepl.cli.main import main; status = main(['list', '--models-dir', sys.argv[1]]); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'; "
        "sys.exit(status)"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    result = subprocess.run(
        [sys.executable, "-c", code, str(models)], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert " ready " in rows["gpt-sw3"] and "not ready: config.json: model type 'gpt9000'" in rows["gpt9000"]


def test_list_names_the_precision_of_quantized_checkpoints(tmp_path, monkeypatch, capsys):
    data = Path(__file__).parent / "data" / "chatglm"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert main(["list", "--models-dir", str(data)]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["chatglm2-int4-tiny"][3] == "int4" and rows["chatglm2-int8-tiny"][3] == "int8"
    assert rows["chatglm1-tiny"][3] != "int4"
