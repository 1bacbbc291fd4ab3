"""Shared fixtures: tiny real checkpoints and an isolated, offline environment.

The environment is set up in ``pytest_configure``, before any test module is
imported, because huggingface_hub and transformers read these variables once
at import time. The user's real caches, history and models are never touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

_ISOLATED_VARIABLES = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_TOKEN", "GLMREPL_MODELS")
_sandbox: Path | None = None


def pytest_configure(config):
    global _sandbox
    _sandbox = Path(tempfile.mkdtemp(prefix="glmrepl-tests-"))
    for variable in _ISOLATED_VARIABLES:
        os.environ.pop(variable, None)
    os.environ.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HOME": str(_sandbox / "hf"),
            "XDG_DATA_HOME": str(_sandbox / "data"),
            "XDG_CONFIG_HOME": str(_sandbox / "config"),
            "XDG_CACHE_HOME": str(_sandbox / "cache"),
            "XDG_STATE_HOME": str(_sandbox / "state"),
        }
    )
    # A suite started in the background (`make test &`, nohup) inherits SIGINT ignored, and so
    # would every glmrepl it starts: the tests that press Ctrl-C need what a terminal gives.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_unconfigure(config):
    if _sandbox is not None:
        shutil.rmtree(_sandbox, ignore_errors=True)


# The slow layers, by module: `pytest -m "not (pty or server or browser or cli)"` leaves them
# out (the inner loop); `make test` runs everything.
LAYERS = {
    "test_cli": "cli",
    "test_tiny": "cli",
    "test_e2e_pty": "pty",
    "test_connect_pty": "pty",
    "test_web_page": "browser",
    "test_server": "server",
    "test_server_cache_namespaces": "server",
    "test_server_chatglm3_tools": "server",
    "test_server_concurrency": "server",
    "test_server_connections": "server",
    "test_server_hardening": "server",
    "test_server_robustness": "server",
    "test_server_tools": "server",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        layer = LAYERS.get(item.module.__name__.rpartition(".")[2]) if item.module else None
        if layer:
            item.add_marker(getattr(pytest.mark, layer))
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch  # only when gpu tests were collected: it takes seconds

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture
def cpu_only_machine(monkeypatch):
    """What this process's torch sees is a machine without CUDA, whatever it has (tests of the
    CPU-only wording; a subprocess gets CUDA_VISIBLE_DEVICES="" instead)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture(scope="session")
def isolated_home() -> Path:
    """The temporary folder holding this session's HF_HOME and XDG directories."""
    assert _sandbox is not None
    return _sandbox


@pytest.fixture(scope="session")
def gpt2_checkpoint(tmp_path_factory) -> Path:
    """A tiny GPT-2 base LM (pytorch_model.bin, vocab.json + merges.txt). Read-only: copy to break it."""
    from glmrepl.tiny import build_gpt2

    return build_gpt2(tmp_path_factory.mktemp("checkpoints") / "tiny-gpt2")


@pytest.fixture(scope="session")
def qwen_checkpoint(tmp_path_factory) -> Path:
    """A tiny Qwen2 chat model (tokenizer.json, ChatML, sharded safetensors). Read-only: copy to break it."""
    from glmrepl.tiny import build_qwen2_chat

    return build_qwen2_chat(tmp_path_factory.mktemp("checkpoints") / "tiny-qwen2-chat")


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> Path:
    """A tiny Llama trained on a small grammar (see trained.py): its perplexity means something. Read-only."""
    from trained import build_trained

    return build_trained(tmp_path_factory.mktemp("checkpoints") / "tiny-llama-trained")


@pytest.fixture
def copy_checkpoint(tmp_path):
    """``copy_checkpoint(src, name=None) -> Path``: a private copy of a checkpoint folder to modify."""

    def copy(src: Path, name: str | None = None) -> Path:
        dest = tmp_path / (name or Path(src).name)
        counter = 1
        while dest.exists():
            counter += 1
            dest = tmp_path / f"{name or Path(src).name}-{counter}"
        return Path(shutil.copytree(src, dest))

    return copy


@pytest.fixture
def unwritable_dir(tmp_path) -> Path:
    """A directory nothing can be created in: read-only, or (for root, whom modes do not stop) a regular file."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    if not os.access(folder, os.W_OK):
        yield folder
        folder.chmod(0o700)
        return
    folder.rmdir()
    folder.write_text("a file where a directory should be\n")
    yield folder


@pytest.fixture
def kernels():
    """glmrepl's CPU kernels, built fresh (a failed build fails the test: CI has a compiler)."""
    from glmrepl.engine.cpu import kernels as cpu_kernels

    cpu_kernels.reset()
    lib = cpu_kernels.wait_until_built()
    if lib is None:
        pytest.fail(f"the kernels did not build with the compiler present: {cpu_kernels.status()}")
    yield lib
    cpu_kernels.reset()


# -- the fused decoding steps (decode_step.py): how many steps took them ------------------------


@pytest.fixture
def steps_taken(monkeypatch):
    """How many steps went through the fused path."""
    count = {"n": 0}
    from glmrepl.engine.quant.decode_step import DecodePlan

    real = DecodePlan.step

    def counted(self, ids, cache):
        count["n"] += 1
        return real(self, ids, cache)

    monkeypatch.setattr(DecodePlan, "step", counted)
    return count


@pytest.fixture
def batch_steps_taken(monkeypatch):
    """How many batched steps went through the fused layers."""
    count = {"n": 0}
    from glmrepl.engine.quant.decode_step import DecodePlan

    real = DecodePlan.batch_step

    def counted(self, ids, kwargs, views):
        count["n"] += 1
        return real(self, ids, kwargs, views)

    monkeypatch.setattr(DecodePlan, "batch_step", counted)
    return count
