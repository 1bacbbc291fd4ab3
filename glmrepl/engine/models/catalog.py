"""Find the checkpoints already on this machine.

Two places are searched: the models directory (folders holding a
config.json, directly or one level deeper as ``org/name``) and the local
Hugging Face cache, read with huggingface_hub's own cache scanner so that its
layout (refs, snapshots, blobs) is never guessed here. Nothing is loaded:
each folder is described by :mod:`.checkpoint`'s quick checks.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from ...common.paths import data_dir
from ..errors import CheckpointError
from .checkpoint import one_line, scan_checkpoint

MODELS_DIR = "models dir"
HF_CACHE = "hf cache"
BESIDE_LOADED = "beside the loaded model"


@dataclass(frozen=True)
class CatalogEntry:
    """One local checkpoint as the ``/model`` listing shows it."""

    name: str  # relative to the models dir ("name" or "org/name"), or the cache's repo id
    path: Path
    source: str  # MODELS_DIR or HF_CACHE
    architecture: str | None
    family: str | None
    size_bytes: int
    param_count: int | None
    ready: bool
    problem: str | None
    dtype: str | None = None
    adapter_base: str | None = None  # an adapter folder: the base model it was trained on ("?" if unrecorded)


LISTING_COLUMNS = ("name", "architecture", "params", "dtype", "size", "status")


def listing_cells(entry: CatalogEntry) -> list[str]:
    """One entry as the listings show it (`glmrepl list` and /model read the same cells)."""
    from ...common.units import human_bytes, human_count

    if entry.adapter_base is not None:
        return [
            entry.name,
            entry.architecture or "adapter",
            "-",
            "-",
            human_bytes(entry.size_bytes),
            f"adapter for {entry.adapter_base}",
        ]
    return [
        entry.name,
        entry.family or entry.architecture or "?",
        human_count(entry.param_count),
        entry.dtype or "-",
        human_bytes(entry.size_bytes),
        "ready" if entry.ready else f"not ready: {short_problem(entry.problem or '', entry.path)}",
    ]


def short_problem(problem: str, folder: Path) -> str:
    """What is wrong, without the folder's path or the fix (`glmrepl check` gives both).

    Problems read "PATH/FILE: what is wrong: how to fix it" or "PATH what is
    wrong: how to fix it"; a listing row has room for the file and the fault.
    """
    text = problem
    for prefix in (f"{folder}{os.sep}", f"{folder} ", str(folder)):
        if text.startswith(prefix):
            text = text[len(prefix) :]
            break
    head, _, rest = text.partition(": ")
    if rest and " " not in head:  # "config.json: model type 'x' is not known: upgrade ..."
        return f"{head}: {rest.partition(': ')[0]}"
    return head


def listing_dtype(config: dict | None, stored_dtype: str | None) -> str | None:
    """The precision the weights are stored in: int4/int8 for quantized checkpoints."""
    config = config or {}
    bits = config.get("quantization_bit")  # ChatGLM's own quantized releases
    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict):  # `glmrepl quantize` folders record theirs apart
        quantization = config.get("glmrepl_quantization")
    if not bits and isinstance(quantization, dict):  # GPTQ, AWQ, bitsandbytes, glmrepl
        bits = quantization.get("bits") or (
            4 if quantization.get("load_in_4bit") else 8 if quantization.get("load_in_8bit") else None
        )
    if isinstance(bits, int) and not isinstance(bits, bool) and bits > 0:
        return f"int{bits}"
    return stored_dtype


def default_models_dir(cli_value: str | os.PathLike | None = None) -> Path:
    """``--models-dir``, else ``$GLMREPL_MODELS``, else ``$XDG_DATA_HOME/glmrepl/models``."""
    if cli_value:
        return Path(cli_value).expanduser()
    if os.environ.get("GLMREPL_MODELS"):
        return Path(os.environ["GLMREPL_MODELS"]).expanduser()
    return data_dir() / "models"


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now rather than at import."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.path.expandvars(os.environ[variable])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    cache_home = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache_home).expanduser() / "huggingface" / "hub"


def find_checkpoints(
    models_dir: Path | None = None, *, trust_remote_code: bool = False, beside: Path | None = None
) -> list[CatalogEntry]:
    """Every checkpoint in the models dir (None: the default one) and the HF cache, sorted by name.

    ``beside``: a checkpoint folder (the loaded one) whose sibling folders are
    listed too, named by their path so that ``/model NAME`` finds them.
    """
    located = _located_checkpoints(default_models_dir(models_dir))
    if beside is not None:
        located += _siblings(Path(beside), {_resolved(path) for _, path, _ in located})
    entries = [_describe(name, path, source, trust_remote_code) for name, path, source in located]
    return sorted(entries, key=lambda entry: (entry.name.lower(), entry.source))


def resolve_model(name_or_path: str, models_dir: Path | None = None) -> Path:
    """The folder for a path, a models-dir name, or a cached repo id (``org/name`` or a unique ``name``)."""
    as_path = Path(name_or_path).expanduser()
    if as_path.is_dir():
        return as_path
    if _looks_like_a_path(name_or_path):
        what = "is a file, not a folder" if as_path.exists() else "does not exist"
        raise CheckpointError(f"{as_path} {what}: give the checkpoint folder that holds config.json")
    root = default_models_dir(models_dir)
    in_models_dir = _models_dir_folder(root, name_or_path)
    if in_models_dir is not None:
        return in_models_dir
    located = _located_checkpoints(root)
    exact = [path for name, path, _ in located if name == name_or_path]
    if exact:
        return exact[0]
    by_short_name = [(name, path) for name, path, _ in located if name.rsplit("/", 1)[-1] == name_or_path]
    if len(by_short_name) == 1:
        return by_short_name[0][1]
    if by_short_name:
        choices = ", ".join(sorted(name for name, _ in by_short_name))
        raise CheckpointError(f"'{name_or_path}' matches several checkpoints ({choices}): give the full name")
    raise CheckpointError(_not_found_message(name_or_path, root, [name for name, _, _ in located]))


def _not_found_message(wanted: str, root: Path, known: list[str]) -> str:
    where = f"looked in {root} and the Hugging Face cache"
    suggestion = _closest_name(wanted, known)
    if suggestion:
        return f"no checkpoint named '{wanted}' ({where}); did you mean '{suggestion}'?"
    return f"no checkpoint named '{wanted}' ({where}): give a folder path, or put the checkpoint folder in {root}"


def _closest_name(wanted: str, known: list[str]) -> str | None:
    matches = difflib.get_close_matches(wanted, known, n=1, cutoff=0.6)
    if matches:
        return matches[0]
    # "llama" should find "meta/llama-tiny": compare with the part after the org too.
    short_names = {name.rsplit("/", 1)[-1]: name for name in known}
    matches = difflib.get_close_matches(wanted.rsplit("/", 1)[-1], list(short_names), n=1, cutoff=0.6)
    return short_names[matches[0]] if matches else None


# -- where checkpoints live ----------------------------------------------------


def _located_checkpoints(root: Path) -> list[tuple[str, Path, str]]:
    models = [(name, path, MODELS_DIR) for name, path in _models_dir_checkpoints(root)]
    cached = [(name, path, HF_CACHE) for name, path in _hf_cache_checkpoints()]
    return models + cached


def _siblings(folder: Path, known: set[Path]) -> list[tuple[str, Path, str]]:
    """The checkpoint folders next to ``folder`` (itself included) not listed already."""
    return [
        (_shown_path(child), child, BESIDE_LOADED)
        for child in _subfolders(folder.parent)
        if _has_config(child) and _resolved(child) not in known
    ]


def _shown_path(path: Path) -> str:
    """A path a user can type back: relative to the current folder when inside it, else with ~."""
    absolute = Path(os.path.abspath(path))
    for base, shown in ((Path.cwd(), "."), (Path.home(), "~")):
        if absolute.is_relative_to(base) and absolute != base:
            return f"{shown}/{absolute.relative_to(base)}"
    return str(absolute)


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError:
        return path


def _models_dir_checkpoints(root: Path) -> list[tuple[str, Path]]:
    found = []
    for child in _subfolders(root):
        if _has_config(child):
            found.append((child.name, child))
            continue
        inside = [(f"{child.name}/{g.name}", g) for g in _subfolders(child) if _has_config(g)]
        if not inside and _holds_files(child):
            inside = [(child.name, child)]  # a download without its config.json: listed as not ready, not hidden
        found.extend(inside)
    return found


def _holds_files(folder: Path) -> bool:
    try:
        return any(entry.is_file() and not entry.name.startswith(".") for entry in folder.iterdir())
    except OSError:
        return False


def _looks_like_a_path(name: str) -> bool:
    return name.startswith(("/", "~", "./", "../")) or os.path.isabs(name) or name in (".", "..")


def _models_dir_folder(root: Path, name: str) -> Path | None:
    """A folder of the models dir called ``name``, unless it is only an ``org`` folder of checkpoints."""
    if ".." in Path(name).parts:
        return None
    candidate = root / name
    if not candidate.is_dir():
        return None
    if _has_config(candidate) or not any(_has_config(sub) for sub in _subfolders(candidate)):
        return candidate
    return None


def _hf_cache_checkpoints() -> list[tuple[str, Path]]:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir(hf_cache_dir())
    except (CacheNotFound, OSError, ValueError):
        # No cache (or an unusable one) simply means no cached checkpoints.
        return []
    found = []
    for repo in cache.repos:
        if repo.repo_type != "model" or not repo.revisions:
            continue
        snapshot = Path(_preferred_revision(repo.revisions).snapshot_path)
        if _has_config(snapshot):
            found.append((repo.repo_id, snapshot))
    return found


def _preferred_revision(revisions):
    on_main = [revision for revision in revisions if "main" in revision.refs]
    if on_main:
        return on_main[0]
    return max(revisions, key=lambda revision: revision.last_modified)


def _subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(child for child in folder.iterdir() if not child.name.startswith(".") and child.is_dir())
    except OSError:
        # A missing or unreadable folder holds no checkpoints we can use.
        return []


def _has_config(folder: Path) -> bool:
    """A checkpoint's config.json, or a PEFT adapter's adapter_config.json."""
    try:
        return (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()
    except OSError:
        return False


# -- describing one checkpoint -------------------------------------------------


def _describe(name: str, path: Path, source: str, trust_remote_code: bool) -> CatalogEntry:
    from .adapters import looks_like_adapter

    if looks_like_adapter(path):
        return _describe_adapter(name, path, source)
    try:
        scan = scan_checkpoint(path, trust_remote_code=trust_remote_code)
    except Exception as error:  # noqa: BLE001 - one odd folder must not hide the others
        return CatalogEntry(
            name,
            path,
            source,
            None,
            None,
            _folder_bytes(path),
            None,
            False,
            one_line(f"{path} could not be checked ({type(error).__name__}: {error})"),
        )
    return CatalogEntry(
        name=name,
        path=path,
        source=source,
        architecture=scan.architecture,
        family=scan.family.family if scan.family else None,
        size_bytes=scan.weight_bytes if scan.weight_files else _folder_bytes(path),
        param_count=scan.param_count,
        ready=scan.ready,
        problem=scan.problems[0] if scan.problems else None,
        dtype=listing_dtype(scan.config, scan.dtype),
    )


def _describe_adapter(name: str, path: Path, source: str) -> CatalogEntry:
    from .adapters import AdapterError, inspect_adapter

    try:
        info = inspect_adapter(path)
    except AdapterError as error:
        return CatalogEntry(name, path, source, "adapter", None, _folder_bytes(path), None, False, str(error))
    kind = "LoRA adapter" if info.kind == "lora" else "P-tuning v2 adapter"
    return CatalogEntry(
        name, path, source, kind, None, _folder_bytes(path), None, True, None, adapter_base=info.base or "?"
    )


def _folder_bytes(path: Path) -> int:
    total = 0
    try:
        for child in path.iterdir():
            if child.is_file():  # follows the cache's symlinks to the blobs
                total += child.stat().st_size
    except OSError:
        pass
    return total
