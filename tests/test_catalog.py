"""Finding local checkpoints: the models directory and the Hugging Face cache."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from glmrepl.engine.errors import CheckpointError
from glmrepl.engine.models import catalog
from glmrepl.engine.models.catalog import (
    HF_CACHE,
    MODELS_DIR,
    default_models_dir,
    find_checkpoints,
    hf_cache_dir,
    resolve_model,
)


@pytest.fixture(autouse=True)
def empty_hf_cache(tmp_path, monkeypatch) -> Path:
    """Each test starts with its own (not yet created) Hugging Face cache."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def models_dir(tmp_path, gpt2_checkpoint, qwen_checkpoint) -> Path:
    """tiny-gpt2, acme/tiny-qwen, a broken folder, and some things that are not checkpoints."""
    root = tmp_path / "models"
    root.mkdir()
    shutil.copytree(gpt2_checkpoint, root / "tiny-gpt2")
    shutil.copytree(qwen_checkpoint, root / "acme" / "tiny-qwen")
    broken = shutil.copytree(gpt2_checkpoint, root / "broken")
    (broken / "pytorch_model.bin").unlink()
    (root / "notes").mkdir()
    (root / "README.txt").write_text("not a checkpoint")
    (root / ".hidden").mkdir()
    shutil.copy(gpt2_checkpoint / "config.json", root / ".hidden" / "config.json")
    (root / "dangling").symlink_to(tmp_path / "nowhere")
    return root


def add_cached_repo(cache: Path, repo_id: str, source: Path, commit: str, ref: str | None = "main") -> Path:
    """Lay a checkpoint out the way huggingface_hub does: blobs, a snapshot of symlinks, refs."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in sorted(source.iterdir()):
        blob = repo / "blobs" / f"{commit[:8]}-{file.name}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


# -- where to look -------------------------------------------------------------


def test_models_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("GLMREPL_MODELS", str(tmp_path / "from-env"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_models_dir(str(tmp_path / "from-cli")) == tmp_path / "from-cli"
    assert default_models_dir() == tmp_path / "from-env"
    monkeypatch.delenv("GLMREPL_MODELS")
    assert default_models_dir() == tmp_path / "xdg" / "glmrepl" / "models"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_models_dir() == tmp_path / "home" / ".local" / "share" / "glmrepl" / "models"


def test_relative_xdg_directories_are_ignored(tmp_path, monkeypatch):
    """The XDG spec: a relative path in an XDG variable is invalid and must be ignored."""
    from glmrepl.common.paths import config_dir, data_dir
    from glmrepl.repl.config import history_file

    monkeypatch.delenv("GLMREPL_MODELS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_DATA_HOME", "relative/data")
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/config")
    data = tmp_path / "home" / ".local" / "share" / "glmrepl"
    assert default_models_dir() == data / "models"
    assert (data_dir(), history_file()) == (data, data / "history")
    assert config_dir() == tmp_path / "home" / ".config" / "glmrepl"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "absolute"))
    assert data_dir() == tmp_path / "absolute" / "glmrepl"
    assert default_models_dir() == tmp_path / "absolute" / "glmrepl" / "models"


def test_hf_cache_location_follows_the_environment(tmp_path, monkeypatch):
    assert hf_cache_dir() == tmp_path / "hf-cache"
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    assert hf_cache_dir() == tmp_path / "hf-home" / "hub"


# -- listing -------------------------------------------------------------------


def test_models_dir_listing(models_dir):
    entries = find_checkpoints(models_dir)
    assert [e.name for e in entries] == ["acme/tiny-qwen", "broken", "tiny-gpt2"]
    assert {e.source for e in entries} == {MODELS_DIR}
    qwen, broken, gpt2 = entries
    assert qwen.path == models_dir / "acme" / "tiny-qwen"
    assert qwen.ready and qwen.problem is None
    assert qwen.architecture == "Qwen2ForCausalLM"
    assert qwen.param_count and qwen.param_count > 0
    assert qwen.size_bytes == sum(f.stat().st_size for f in qwen.path.glob("*.safetensors"))
    assert gpt2.ready and gpt2.architecture == "GPT2LMHeadModel" and gpt2.param_count > 0
    assert broken.ready is False
    assert "no weights" in broken.problem and "\n" not in broken.problem
    assert broken.size_bytes > 0


def test_a_download_without_its_config_is_listed_as_not_ready_and_empty_folders_are_not(models_dir):
    half = models_dir / "half-downloaded"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    (models_dir / "empty").mkdir()
    (models_dir / "acme" / "notes.txt").write_text("an org folder holding a file stays an org folder")
    entries = {e.name: e for e in find_checkpoints(models_dir)}
    assert set(entries) == {"acme/tiny-qwen", "broken", "tiny-gpt2", "half-downloaded"}
    assert not entries["half-downloaded"].ready and "config.json" in entries["half-downloaded"].problem


def test_default_models_dir_is_used(models_dir, monkeypatch):
    monkeypatch.setenv("GLMREPL_MODELS", str(models_dir))
    assert len(find_checkpoints(None)) == 3


def test_missing_models_dir_and_cache_give_nothing(tmp_path):
    assert find_checkpoints(tmp_path / "no-such-dir") == []


def test_a_folder_that_cannot_be_checked_is_listed_not_fatal(models_dir, monkeypatch):
    real_scan = catalog.scan_checkpoint

    def flaky_scan(path, **kwargs):
        if path.name == "tiny-gpt2":
            raise RuntimeError("disk on fire\nsecond line")
        return real_scan(path, **kwargs)

    monkeypatch.setattr(catalog, "scan_checkpoint", flaky_scan)
    entries = {e.name: e for e in find_checkpoints(models_dir)}
    assert entries["tiny-gpt2"].ready is False
    assert "disk on fire" in entries["tiny-gpt2"].problem and "\n" not in entries["tiny-gpt2"].problem
    assert entries["acme/tiny-qwen"].ready


def test_hf_cache_is_listed(tmp_path, empty_hf_cache, qwen_checkpoint):
    snapshot = add_cached_repo(empty_hf_cache, "acme/cached-qwen", qwen_checkpoint, "a" * 40)
    entries = find_checkpoints(tmp_path / "no-models")
    assert [(e.name, e.source, e.path, e.ready) for e in entries] == [("acme/cached-qwen", HF_CACHE, snapshot, True)]
    assert entries[0].size_bytes == sum(f.stat().st_size for f in snapshot.glob("*.safetensors"))


def test_hf_cache_prefers_main_then_newest(tmp_path, empty_hf_cache, qwen_checkpoint, gpt2_checkpoint):
    old = add_cached_repo(empty_hf_cache, "acme/on-main", qwen_checkpoint, "1" * 40)
    add_cached_repo(empty_hf_cache, "acme/on-main", gpt2_checkpoint, "2" * 40, ref="other")
    os.utime(old / "config.json", (1, 1), follow_symlinks=True)
    assert resolve_model("acme/on-main", tmp_path) == old
    add_cached_repo(empty_hf_cache, "acme/no-ref", qwen_checkpoint, "3" * 40, ref=None)
    newest = add_cached_repo(empty_hf_cache, "acme/no-ref", gpt2_checkpoint, "4" * 40, ref=None)
    for file in (empty_hf_cache / "models--acme--no-ref" / "snapshots" / ("3" * 40)).iterdir():
        os.utime(file, (1, 1), follow_symlinks=True)
    assert resolve_model("acme/no-ref", tmp_path) == newest


# -- resolving a name ----------------------------------------------------------


def test_resolve_a_path(gpt2_checkpoint, tmp_path):
    assert resolve_model(str(gpt2_checkpoint), tmp_path) == gpt2_checkpoint


def test_resolve_names_in_the_models_dir(models_dir):
    assert resolve_model("tiny-gpt2", models_dir) == models_dir / "tiny-gpt2"
    assert resolve_model("acme/tiny-qwen", models_dir) == models_dir / "acme" / "tiny-qwen"
    assert resolve_model("tiny-qwen", models_dir) == models_dir / "acme" / "tiny-qwen"
    # A broken folder still resolves, so the load reports its actual problem.
    assert resolve_model("broken", models_dir) == models_dir / "broken"


def test_resolve_cached_repo_by_id_and_by_name(tmp_path, empty_hf_cache, qwen_checkpoint):
    snapshot = add_cached_repo(empty_hf_cache, "acme/cached-qwen", qwen_checkpoint, "b" * 40)
    assert resolve_model("acme/cached-qwen", tmp_path / "no-models") == snapshot
    assert resolve_model("cached-qwen", tmp_path / "no-models") == snapshot


def test_models_dir_wins_over_the_cache(models_dir, empty_hf_cache, gpt2_checkpoint):
    add_cached_repo(empty_hf_cache, "acme/tiny-qwen", gpt2_checkpoint, "c" * 40)
    assert resolve_model("acme/tiny-qwen", models_dir) == models_dir / "acme" / "tiny-qwen"
    names = [(e.name, e.source) for e in find_checkpoints(models_dir)]
    assert ("acme/tiny-qwen", MODELS_DIR) in names and ("acme/tiny-qwen", HF_CACHE) in names


def test_ambiguous_short_name(models_dir, empty_hf_cache, gpt2_checkpoint):
    add_cached_repo(empty_hf_cache, "other/tiny-qwen", gpt2_checkpoint, "d" * 40)
    with pytest.raises(CheckpointError, match="acme/tiny-qwen, other/tiny-qwen"):
        resolve_model("tiny-qwen", models_dir)


def test_unknown_name_suggests_the_closest(models_dir):
    with pytest.raises(CheckpointError) as caught:
        resolve_model("tiny-gtp2", models_dir)
    message = str(caught.value)
    assert message == (
        f"no checkpoint named 'tiny-gtp2' (looked in {models_dir} and the Hugging Face cache); "
        "did you mean 'tiny-gpt2'?"
    )


def test_unknown_short_name_suggests_the_full_name(models_dir):
    with pytest.raises(CheckpointError, match="did you mean 'acme/tiny-qwen'"):
        resolve_model("tiny-qwn", models_dir)


def test_unknown_name_without_suggestion_says_where_to_put_it(tmp_path):
    with pytest.raises(CheckpointError) as caught:
        resolve_model("zzz", tmp_path / "models")
    message = str(caught.value)
    assert "no checkpoint named 'zzz'" in message and str(tmp_path / "models") in message
    assert "\n" not in message


def test_resolving_a_file_says_it_is_not_a_folder(tmp_path):
    file = tmp_path / "weights.bin"
    file.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a folder"):
        resolve_model(str(file), tmp_path / "models")


def test_a_missing_path_is_not_looked_up_as_a_name(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_model(str(tmp_path / "gone"), tmp_path / "models")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_model("./gone-too", tmp_path / "models")
