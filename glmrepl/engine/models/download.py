"""Download exactly the files offline use needs, into a plain folder, with a manifest.

A repository on the hub often holds the same weights several times (safetensors,
PyTorch pickles, TensorFlow, Flax, ONNX, GGUF) next to READMEs and images.
:func:`select_files` picks what loading needs: the configs, every tokenizer
file, the weights in one format with their index and shards, and the
checkpoint's own Python code when it has ``auto_map``. :func:`download_checkpoint`
fetches them with huggingface_hub into real files (no symlinks into a cache),
so the folder can be copied to a machine without network, and writes
``glmrepl-manifest.json`` with each file's size and sha256 so that
:func:`manifest_problems` can tell, offline, whether the copy is complete.

This is the only module of glmrepl that may reach the network.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ...common.atomic import write_text_atomic
from ..errors import GlmreplError, first_line
from .catalog import default_models_dir

MANIFEST_NAME = "glmrepl-manifest.json"
MANIFEST_FORMAT = 1
WEIGHT_CHOICES = ("safetensors", "bin", "all")

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_SUFFIXES = (".model", ".tiktoken")  # sentencepiece and tiktoken vocabularies
CHAT_TEMPLATE_FOLDER = "additional_chat_templates/"

# The two formats transformers 5 loads, each as a single file or an index of shards.
LOADABLE_FORMATS = {
    "safetensors": ("model.safetensors", "model.safetensors.index.json", ".safetensors"),
    "bin": ("pytorch_model.bin", "pytorch_model.bin.index.json", ".bin"),
}
# Files that only duplicate the weights in another framework's format.
OTHER_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".h5",
    ".msgpack",
    ".onnx",
    ".onnx_data",
    ".gguf",
    ".pt",
    ".pth",
    ".ckpt",
    ".ot",
    ".tflite",
    ".mlmodel",
)
HF_LOCAL_METADATA = Path(".cache") / "huggingface"
HASH_CHUNK = 1024 * 1024


class DownloadError(GlmreplError):
    """A download could not be started or completed."""


@dataclass
class DownloadResult:
    repo_id: str
    revision: str  # the commit sha the files came from
    path: Path
    files: list[str]


# -- which files -----------------------------------------------------------------


def select_files(
    names, *, has_auto_map: bool = False, weights: str = "safetensors", shard_lists: dict[str, list[str]] | None = None
) -> list[str]:
    """The files of a repository that offline use needs, sorted.

    ``names`` are the repository's file paths; ``has_auto_map`` says whether
    its config points at its own code; ``shard_lists`` maps a weights index
    file to the shard names its ``weight_map`` lists (when known, only those
    shards are taken; otherwise every top-level file of that format).
    ``weights`` is "safetensors" (preferred, else .bin), "bin" (preferred,
    else safetensors) or "all" (every weights file, any format).
    """
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_CHOICES)}, not {weights!r}")
    names = sorted(set(names))
    top_level = [name for name in names if "/" not in name]
    chosen = {name for name in top_level if _is_config_or_tokenizer(name)}
    chosen.update(name for name in names if name.startswith(CHAT_TEMPLATE_FOLDER))
    if has_auto_map:
        chosen.update(name for name in top_level if name.endswith(".py"))
    if weights == "all":
        chosen.update(name for name in names if _is_weights_file(name))
    else:
        chosen.update(_weights_in_one_format(top_level, weights, shard_lists or {}))
    return sorted(chosen)


def _is_config_or_tokenizer(name: str) -> bool:
    return (
        name in CONFIG_FILES
        or name in TOKENIZER_FILES
        or name.startswith("vocab.")
        or name.endswith(TOKENIZER_SUFFIXES)
    )


def _is_weights_file(name: str) -> bool:
    base = PurePosixPath(name).name
    return base.endswith(OTHER_WEIGHT_SUFFIXES) or any(
        base.endswith(suffix + ".index.json") for suffix in OTHER_WEIGHT_SUFFIXES
    )


def _weights_in_one_format(top_level: list[str], preferred: str, shard_lists: dict[str, list[str]]) -> list[str]:
    order = ("safetensors", "bin") if preferred == "safetensors" else ("bin", "safetensors")
    for weights_format in order:
        single, index, suffix = LOADABLE_FORMATS[weights_format]
        if single in top_level:
            return [single]
        if index in top_level:
            shards = shard_lists.get(index)
            if shards is None:
                shards = [name for name in top_level if name.endswith(suffix)]
            return [index, *shards]
    return []


# -- downloading -------------------------------------------------------------------


def default_destination(repo_id: str, models_dir=None) -> Path:
    """Where a download goes without ``--to``: the models dir, under the repo's name."""
    return default_models_dir(models_dir) / repo_id.rsplit("/", 1)[-1]


def download_checkpoint(
    repo_id: str, dest=None, *, revision: str | None = None, weights: str = "safetensors", models_dir=None
) -> DownloadResult:
    """Download what offline use of ``repo_id`` needs into ``dest`` and write its manifest.

    Files already complete in ``dest`` from the same commit are not fetched
    again, so rerunning an interrupted download finishes it.
    """
    with _hub_errors_as_download_errors(repo_id, revision):
        _check_repo_id(repo_id)
    dest = Path(dest).expanduser() if dest else default_destination(repo_id, models_dir)
    with _network_allowed(), _hub_errors_as_download_errors(repo_id, revision):
        commit, names = _repo_files(repo_id, revision)
        first = [name for name in names if name in _METADATA_NEEDED_FIRST]
        _fetch(repo_id, commit, first, dest)
        selected = select_files(
            names, has_auto_map=_has_auto_map(dest), weights=weights, shard_lists=_shard_lists(dest, names)
        )
        _fetch(repo_id, commit, selected, dest)
    missing = [name for name in selected if not (dest / name).is_file()]
    if missing:
        raise DownloadError(f"{dest}: {', '.join(missing[:3])} did not arrive; run the download again")
    write_manifest(dest, repo_id, commit, selected)
    # The hub client's bookkeeping only matters to a rerun of an unfinished
    # download; a finished folder should hold nothing but the checkpoint.
    shutil.rmtree(dest / HF_LOCAL_METADATA, ignore_errors=True)
    _remove_if_empty(dest / HF_LOCAL_METADATA.parent)
    return DownloadResult(repo_id, commit, dest, selected)


# Read before choosing: auto_map lives in the configs, shard names in the indexes.
_METADATA_NEEDED_FIRST = ("config.json", "tokenizer_config.json", *(index for _, index, _ in LOADABLE_FORMATS.values()))


def _endpoint() -> str | None:
    # Read now rather than at import, so that HF_ENDPOINT set by the caller counts.
    value = os.environ.get("HF_ENDPOINT")
    return value.rstrip("/") if value else None


@contextlib.contextmanager
def _network_allowed():
    """Lift glmrepl's offline default for the duration of a download.

    huggingface_hub reads HF_HUB_OFFLINE once, at import, into its constants
    module and refuses every request while it is set; only that constant counts.
    """
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's network errors (huggingface_hub moved from httpx to httpx2)."""
    import importlib

    found = []
    for module in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _endpoint_shown() -> str:
    from huggingface_hub import constants

    return _endpoint() or constants.ENDPOINT


@contextlib.contextmanager
def _hub_errors_as_download_errors(repo_id: str, revision: str | None):
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except HFValidationError:
        raise DownloadError(
            f"not a repository id: {repo_id!r} (expected NAME or ORG/NAME, letters, digits, '-', '_' and '.')"
        ) from None
    except _transport_errors() as error:
        raise DownloadError(
            f"cannot reach {_endpoint_shown()}: {first_line(error)} (check the network "
            "or HF_ENDPOINT; run the same command again: the files that arrived are kept)"
        ) from None
    except GatedRepoError:
        raise DownloadError(
            f"{repo_id} is gated: accept its terms on the hub and log in (`hf auth login` or HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise DownloadError(
            f"repository {repo_id} not found (or private: log in with `hf auth login` or set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise DownloadError(f"{repo_id} has no revision {revision!r}: check the branch, tag or commit") from None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as error:
        raise DownloadError(
            f"downloading {repo_id} failed ({first_line(error)}): check the network "
            "and run the same command again to resume"
        ) from None


def _repo_files(repo_id: str, revision: str | None) -> tuple[str, list[str]]:
    from huggingface_hub import HfApi

    info = HfApi(endpoint=_endpoint()).model_info(repo_id, revision=revision)
    assert info.sha is not None  # the hub names the commit of every revision it resolves
    return info.sha, [sibling.rfilename for sibling in info.siblings or []]


def _fetch(repo_id: str, commit: str, names: list[str], dest: Path) -> None:
    from huggingface_hub import snapshot_download

    if not names:
        return
    # allow_patterns are fnmatch patterns; escaping makes each one an exact name.
    snapshot_download(
        repo_id,
        revision=commit,
        allow_patterns=[glob.escape(name) for name in names],
        local_dir=dest,
        endpoint=_endpoint(),
    )


def _has_auto_map(dest: Path) -> bool:
    # ChatGLM-style repositories point at their tokenizer code from tokenizer_config.json too.
    return any(
        isinstance(data, dict) and bool(data.get("auto_map"))
        for data in (_json_or_none(dest / "config.json"), _json_or_none(dest / "tokenizer_config.json"))
    )


def _shard_lists(dest: Path, names: list[str]) -> dict[str, list[str]]:
    lists = {}
    for _, index, _ in LOADABLE_FORMATS.values():
        data = _json_or_none(dest / index) if index in names else None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if isinstance(weight_map, dict):
            lists[index] = sorted({str(shard) for shard in weight_map.values()})
    return lists


def _json_or_none(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


# -- the manifest --------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def write_manifest(folder: Path, repo_id: str, revision: str, names: list[str]) -> Path:
    """Record each file's size and sha256, so a copy can be verified without network."""
    files = {
        name: {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)} for name in sorted(names)
    }
    manifest = {"format": MANIFEST_FORMAT, "repo_id": repo_id, "revision": revision, "files": files}
    return write_text_atomic(folder / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest, None when it has none; ValueError when it is unreadable."""
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} cannot be read ({error})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(f'{path} has no "files" table')
    return manifest


_SHA256 = re.compile(r"[0-9a-f]{64}")


def manifest_problems(folder) -> list[str]:
    """One line per file that is missing, or differs in size or sha256 from the manifest."""
    folder = Path(folder).expanduser()
    try:
        manifest = read_manifest(folder)
    except ValueError as error:
        return [f"{error}: download the checkpoint again to rewrite it"]
    if manifest is None:
        return []
    return [
        problem
        for name, expected in sorted(manifest["files"].items())
        if (problem := _file_problem(folder, name, expected))
    ]


def _file_problem(folder: Path, name: str, expected) -> str | None:
    path = folder / name
    if not isinstance(expected, dict) or not _SHA256.fullmatch(str(expected.get("sha256", ""))):
        return f"{MANIFEST_NAME} has a malformed entry for {name}: download the checkpoint again"
    if not path.is_file():
        return f"{path} is missing (listed in {MANIFEST_NAME}): download it again"
    size = path.stat().st_size
    if size != expected.get("size"):
        return (
            f"{path} is {size} bytes, the manifest says {expected.get('size')}: the file is damaged; download it again"
        )
    if file_sha256(path) != expected["sha256"]:
        return f"{path} does not match the sha256 in {MANIFEST_NAME}: the file is damaged; download it again"
    return None
