"""File selection, downloads from a local stand-in hub, resuming, the manifest, loading offline."""

import errno
import hashlib
import json
import socket

import pytest
from hubserver import LocalHub, build_test_repos

from glmrepl.cli.main import main
from glmrepl.engine.models.download import MANIFEST_NAME, DownloadError, download_checkpoint, select_files

TOKENIZER_AND_CONFIG = ["config.json", "generation_config.json", "merges.txt", "tokenizer_config.json", "vocab.json"]


# -- selection (pure) ------------------------------------------------------------


def test_safetensors_preferred_and_other_frameworks_skipped():
    names = [
        "config.json",
        "model.safetensors",
        "pytorch_model.bin",
        "tf_model.h5",
        "flax_model.msgpack",
        "onnx/model.onnx",
        "model.gguf",
        "README.md",
        "tokenizer.json",
        ".gitattributes",
    ]
    assert select_files(names) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert select_files(names, weights="bin") == ["config.json", "pytorch_model.bin", "tokenizer.json"]


def test_all_weights_takes_every_format():
    names = ["config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5", "onnx/model.onnx", "README.md"]
    assert select_files(names, weights="all") == [
        "config.json",
        "model.safetensors",
        "onnx/model.onnx",
        "pytorch_model.bin",
        "tf_model.h5",
    ]


def test_bin_used_when_there_is_no_safetensors():
    assert select_files(["config.json", "pytorch_model.bin", "tf_model.h5"]) == ["config.json", "pytorch_model.bin"]


def test_sharded_weights_take_the_index_and_only_its_shards():
    names = [
        "config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "consolidated.safetensors",
    ]
    shards = {"model.safetensors.index.json": ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]}
    assert select_files(names, shard_lists=shards) == sorted(set(names) - {"consolidated.safetensors"})
    # Without the index's content, every top-level file of the format is taken.
    assert "consolidated.safetensors" in select_files(names)


def test_every_tokenizer_file_kind_is_taken():
    tokenizer = [
        "tokenizer.json",
        "tokenizer.model",
        "ice_text.model",
        "qwen.tiktoken",
        "vocab.txt",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
        "additional_chat_templates/tool.jinja",
    ]
    names = tokenizer + ["config.json", "model.safetensors", "preview.png", "LICENSE"]
    assert select_files(names) == sorted(tokenizer + ["config.json", "model.safetensors"])


def test_python_files_only_with_auto_map():
    names = ["config.json", "model.safetensors", "modeling_chatglm.py", "tokenization_chatglm.py", "tools/x.py"]
    assert select_files(names) == ["config.json", "model.safetensors"]
    assert select_files(names, has_auto_map=True) == [
        "config.json",
        "model.safetensors",
        "modeling_chatglm.py",
        "tokenization_chatglm.py",
    ]


def test_unknown_weights_choice_is_refused():
    with pytest.raises(ValueError):
        select_files(["config.json"], weights="gguf")


# -- downloads from the local hub --------------------------------------------------


@pytest.fixture(scope="module")
def hub_repos(gpt2_checkpoint, qwen_checkpoint):
    return build_test_repos(gpt2_checkpoint, qwen_checkpoint)


@pytest.fixture
def hub(hub_repos, monkeypatch):
    with LocalHub(hub_repos) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        yield server


def files_in(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def test_download_gets_exactly_the_needed_files_as_real_files(hub, tmp_path, capsys):
    dest = tmp_path / "multi"
    assert main(["download", "tiny/multi-format", "--to", str(dest)]) == 0
    assert files_in(dest) == sorted(TOKENIZER_AND_CONFIG + ["model.safetensors", MANIFEST_NAME])
    assert not any(path.is_symlink() for path in dest.iterdir())
    out = capsys.readouterr().out
    assert "downloaded 6 files of tiny/multi-format" in out and out.strip().endswith("ready")


def test_manifest_records_revision_sizes_and_hashes(hub, tmp_path):
    result = download_checkpoint("tiny/multi-format", tmp_path / "m")
    repo = hub.repos["tiny/multi-format"]
    manifest = json.loads((tmp_path / "m" / MANIFEST_NAME).read_text())
    assert manifest["repo_id"] == "tiny/multi-format" and manifest["revision"] == repo.sha == result.revision
    assert sorted(manifest["files"]) == result.files
    for name, entry in manifest["files"].items():
        assert entry == {"size": len(repo.files[name]), "sha256": hashlib.sha256(repo.files[name]).hexdigest()}


def test_bin_weights_on_request(hub, tmp_path):
    result = download_checkpoint("tiny/multi-format", tmp_path / "b", weights="bin")
    assert "pytorch_model.bin" in result.files and "model.safetensors" not in result.files


def test_custom_code_comes_with_its_python_files(hub, tmp_path):
    result = download_checkpoint("tiny/custom-code", tmp_path / "c")
    assert result.files == sorted(
        TOKENIZER_AND_CONFIG + ["configuration_tiny.py", "modeling_tiny.py", "pytorch_model.bin"]
    )


def test_sharded_download_takes_the_indexed_shards_only(hub, tmp_path):
    result = download_checkpoint("tiny/sharded", tmp_path / "s")
    shards = sorted(
        set(json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())["weight_map"].values())
    )
    assert len(shards) > 1
    assert [name for name in result.files if name.endswith(".safetensors")] == shards
    assert not any(name.endswith(".bin") or name.startswith("scripts/") for name in result.files)


def test_default_destination_is_the_models_dir(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("GLMREPL_MODELS", str(tmp_path / "models"))
    result = download_checkpoint("tiny/custom-code")
    assert result.path == tmp_path / "models" / "custom-code"


def test_a_connection_dropped_mid_file_is_resumed_with_a_range_request(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    # The client keeps what it received in whole chunks (10 MB normally): small chunks let a tiny file resume.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 256)
    hub.drop_next_get_after["model.safetensors"] = 1024
    download_checkpoint("tiny/multi-format", tmp_path / "r")
    gets = hub.file_gets("model.safetensors")
    assert len(gets) == 2 and gets[1].range == "bytes=1024-"
    assert main(["check", str(tmp_path / "r")]) == 0


def test_an_interrupted_download_finishes_on_the_second_run(hub, tmp_path, capsys):
    dest = tmp_path / "i"
    hub.failing.add("pytorch_model.bin")
    assert main(["download", "tiny/custom-code", "--to", str(dest)]) == 1
    assert "error: downloading tiny/custom-code failed" in capsys.readouterr().err
    assert not (dest / MANIFEST_NAME).exists()
    fetched_before = {r.path for r in hub.requests if r.method == "GET" and "/resolve/" in r.path}
    hub.failing.clear()
    hub.requests.clear()
    assert main(["download", "tiny/custom-code", "--to", str(dest)]) == 0
    fetched_again = {r.path for r in hub.requests if r.method == "GET" and "/resolve/" in r.path}
    assert [path.rsplit("/", 1)[-1] for path in fetched_again] == ["pytorch_model.bin"]
    assert fetched_before - {p for p in fetched_before if p.endswith("pytorch_model.bin")}
    assert main(["check", str(dest)]) == 0


def test_unknown_repo_and_revision_are_one_line_errors(hub, tmp_path):
    with pytest.raises(DownloadError, match="not found"):
        download_checkpoint("tiny/nothing", tmp_path / "x")
    with pytest.raises(DownloadError, match="no revision 'v9'"):
        download_checkpoint("tiny/sharded", tmp_path / "y", revision="v9")


def test_downloaded_folder_loads_and_chats_with_the_network_blocked(hub, tmp_path, monkeypatch):
    from support import loaded_app

    result = download_checkpoint("tiny/sharded", tmp_path / "chat")

    def refuse(*args, **kwargs):
        raise OSError("network blocked in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    app = loaded_app(result.path)
    app.session.add_user("hello")
    assert "".join(app.plan_reply())


# -- failures are one line, exit 1, and keep what arrived ----------------------------


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_an_unreachable_endpoint_is_one_line(tmp_path, monkeypatch, capsys):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert main(["download", "tiny/sharded", "--to", str(tmp_path / "u")]) == 1
    lines = _error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot reach http://127.0.0.1:{port}: ")


def test_no_network_is_one_line(hub, tmp_path, monkeypatch, capsys):
    def unreachable(*args, **kwargs):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(socket.socket, "connect", unreachable)
    assert main(["download", "tiny/sharded", "--to", str(tmp_path / "n")]) == 1
    lines = _error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot reach {hub.url}: ")
    assert "unreachable" in lines[0]


@pytest.mark.parametrize("repo_id", ["bad repo!!", "a/b/c", "../escape"])
def test_an_invalid_repo_id_is_one_line_and_asks_nothing(hub, tmp_path, capsys, repo_id):
    assert main(["download", repo_id, "--to", str(tmp_path / "v")]) == 1
    assert _error_lines(capsys) == [
        f"error: not a repository id: {repo_id!r} (expected NAME or ORG/NAME, letters, digits, '-', '_' and '.')"
    ]
    assert not hub.requests and not (tmp_path / "v").exists()


def test_a_connection_lost_for_good_keeps_the_finished_files_for_the_rerun(hub, tmp_path, capsys):
    dest = tmp_path / "p"
    hub.always_drop_after["model.safetensors"] = 0  # the client's own retries all fail
    assert main(["download", "tiny/multi-format", "--to", str(dest)]) == 1
    errors = [line for line in _error_lines(capsys) if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot reach {hub.url}: ")
    assert (dest / "config.json").is_file() and not (dest / MANIFEST_NAME).exists()
    hub.always_drop_after.clear()
    hub.requests.clear()
    assert main(["download", "tiny/multi-format", "--to", str(dest)]) == 0
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub.requests if r.method == "GET" and "/resolve/" in r.path}
    assert fetched == {"model.safetensors"}
