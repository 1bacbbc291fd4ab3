"""Validate a checkpoint folder before loading it.

A load that fails half way, after seconds of reading weights, with a
traceback from deep inside transformers is the worst way to learn that a
download is incomplete. This module looks at a folder's files the cheap way
(directory listing, JSON files, safetensors headers, the first bytes of
pickles) and reports each problem as one line naming the file and the fix.
It never loads weights and never imports torch.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import math
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .. import families
from ..errors import CheckpointError
from ..families import FamilyMatch
from ..pickled import count_pickled_parameters
from .config_checks import config_value_problems, embedding_of, embedding_problem

LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"

# transformers' own order of preference for a folder's weights.
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

TENSORFLOW_FILES = ("tf_model.h5", "tf_model.h5.index.json")
FLAX_FILES = ("flax_model.msgpack", "flax_model.msgpack.index.json")

TOKENIZER_JSON_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json")
TOKENIZER_OTHER_FILES = ("vocab.json", "merges.txt", "vocab.txt")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
CONTEXT_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length")

# A tokenizer.json of a large vocabulary is several megabytes; parsing it
# fully would make listing many checkpoints slow, so big files get a cheaper
# test that still catches truncation.
FULL_JSON_PARSE_LIMIT = 2 * 1024 * 1024
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024

SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I8": "int8",
    "U8": "uint8",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}

REDOWNLOAD = "download it again"


@dataclass
class CheckpointInfo:
    """A folder that passed every check: what the loader and the UI need to know."""

    path: Path
    config: dict
    model_type: str
    architecture: str
    family: FamilyMatch | None
    weights_format: str  # "safetensors" or "bin"
    weight_files: list[Path]
    weight_bytes: int
    param_count: int | None  # from safetensors headers or the .bin's pickled shapes; None if unknown
    dtype: str | None
    has_chat_template: bool
    tokenizer_files: list[str]
    needs_remote_code: bool
    context_length: int | None


@dataclass
class CheckpointScan:
    """Everything learnt about a folder, usable or not, with every problem found."""

    path: Path
    problems: list[str] = field(default_factory=list)
    config: dict | None = None
    family: FamilyMatch | None = None
    needs_remote_code: bool = False
    tokenizer_files: list[str] = field(default_factory=list)
    has_chat_template: bool = False
    weights_format: str | None = None
    weight_files: list[Path] = field(default_factory=list)
    weight_bytes: int = 0
    param_count: int | None = None
    weights_dtype: str | None = None

    @property
    def ready(self) -> bool:
        return not self.problems

    @property
    def model_type(self) -> str | None:
        value = (self.config or {}).get("model_type")
        return value if isinstance(value, str) and value else None

    @property
    def architecture(self) -> str | None:
        architectures = (self.config or {}).get("architectures")
        if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
            return architectures[0]
        return self.model_type

    @property
    def dtype(self) -> str | None:
        config = self.config or {}
        value = config.get("dtype") or config.get("torch_dtype")
        return value if isinstance(value, str) else self.weights_dtype

    @property
    def context_length(self) -> int | None:
        config = self.config or {}
        # Multimodal configs keep the language model's numbers in text_config.
        for source in (config, config.get("text_config") or {}):
            for key in CONTEXT_LENGTH_KEYS:
                value = source.get(key) if isinstance(source, dict) else None
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
        return None

    def to_info(self) -> CheckpointInfo:
        if self.problems:
            raise CheckpointError(self.problems[0])
        return CheckpointInfo(
            path=self.path,
            config=self.config or {},
            model_type=self.model_type or "",
            architecture=self.architecture or "",
            family=self.family,
            weights_format=self.weights_format or "",
            weight_files=list(self.weight_files),
            weight_bytes=self.weight_bytes,
            param_count=self.param_count,
            dtype=self.dtype,
            has_chat_template=self.has_chat_template,
            tokenizer_files=list(self.tokenizer_files),
            needs_remote_code=self.needs_remote_code,
            context_length=self.context_length,
        )

    def add_problem(self, message: str) -> None:
        # Messages are shown as one line; a stray newline (from a path or an
        # exception text) would break the REPL's output and `glmrepl check`.
        self.problems.append(one_line(message))


def one_line(message: str) -> str:
    """The message with its line breaks turned into spaces."""
    return " ".join(message.splitlines())


def inspect_checkpoint(path, *, trust_remote_code: bool = False, family_override: str | None = None) -> CheckpointInfo:
    """Describe a loadable folder, or raise CheckpointError with its first problem."""
    return scan_checkpoint(path, trust_remote_code=trust_remote_code, family_override=family_override).to_info()


def find_problems(path, *, trust_remote_code: bool = False, family_override: str | None = None) -> list[str]:
    """Every problem of the folder, in the order a user should fix them (empty when fine)."""
    return scan_checkpoint(path, trust_remote_code=trust_remote_code, family_override=family_override).problems


def scan_checkpoint(path, *, trust_remote_code: bool = False, family_override: str | None = None) -> CheckpointScan:
    """Check a folder and gather what can be learnt about it, problems included."""
    scan = CheckpointScan(Path(path).expanduser())
    names = _list_folder(scan)
    if names is None:
        return scan
    _check_config(scan, trust_remote_code, family_override)
    _check_tokenizer(scan, names)
    _check_weights(scan, names)
    return scan


def transformers_knows(model_type: str) -> bool:
    """Whether the installed transformers has a config class for ``model_type``."""
    known = _config_names_from_file()
    if known:
        return model_type in known
    # transformers' files moved: ask its auto module (seconds, imports torch).
    return model_type in _config_names_from_import()


# -- the folder ----------------------------------------------------------------


def _list_folder(scan: CheckpointScan) -> set[str] | None:
    path = scan.path
    if not path.exists():
        scan.add_problem(
            f"{path} does not exist: check the path, or give the name of a checkpoint "
            "in the models directory or the Hugging Face cache"
        )
        return None
    if not path.is_dir():
        scan.add_problem(f"{path} is a file, not a folder: give the checkpoint folder that holds config.json")
        return None
    try:
        return {entry.name for entry in path.iterdir()}
    except OSError as error:
        scan.add_problem(f"{path} cannot be read ({error.strerror or error}): check its permissions")
        return None


# -- config.json ---------------------------------------------------------------


def _check_config(scan: CheckpointScan, trust_remote_code: bool, family_override: str | None) -> None:
    config_path = scan.path / "config.json"
    if not config_path.exists():
        scan.add_problem(
            f"{config_path} is missing: every checkpoint needs one; "
            "download config.json from the model's repository into the folder"
        )
        return
    config = _read_json(scan, config_path)
    if config is None:
        return
    if not isinstance(config, dict):
        scan.add_problem(f"{config_path} does not hold a JSON object: {REDOWNLOAD}")
        return
    scan.config = config
    for problem in config_value_problems(config, config_path):
        scan.add_problem(problem)
    model_type = scan.model_type
    if model_type is None:
        scan.add_problem(_no_model_type_message(config_path, config))
        return
    if not _detect_family(scan, config, family_override):
        _check_architecture(scan, config, model_type, config_path, trust_remote_code)


def _no_model_type_message(config_path: Path, config: dict) -> str:
    architectures = config.get("architectures")
    if architectures:
        return (
            f'{config_path} has no "model_type" (architectures: {architectures}): add the model type '
            f'of that architecture, e.g. "model_type": "llama", or {REDOWNLOAD}'
        )
    return (
        f'{config_path} has neither "model_type" nor "architectures", so it is not a transformers '
        f"model config: {REDOWNLOAD} from the model's repository"
    )


def _detect_family(scan: CheckpointScan, config: dict, family_override: str | None) -> bool:
    """Record a native family; False when the folder is an ordinary checkpoint."""
    try:
        scan.family = families.detect_family(scan.path, config, family_override)
    except CheckpointError as error:
        scan.add_problem(str(error))
        return True
    except ImportError as error:
        # A family whose detector is not installed (yet) is simply not detected.
        if not (error.name or "").startswith(f"{families.__name__}."):
            raise
    return scan.family is not None


def _check_architecture(
    scan: CheckpointScan, config: dict, model_type: str, config_path: Path, trust_remote_code: bool
) -> None:
    if transformers_knows(model_type):
        # With a known model type transformers uses its own class and ignores
        # any auto_map code, so there is nothing to trust.
        return
    if config.get("auto_map"):
        scan.needs_remote_code = True
        if not trust_remote_code:
            scan.add_problem(
                f"{config_path}: model type '{model_type}' is not built into transformers "
                f"{_transformers_version()} and the checkpoint ships its own Python code (auto_map): rerun with "
                "--trust-remote-code if you trust that code, or upgrade transformers (pip install -U transformers)"
            )
        return
    scan.add_problem(
        f"{config_path}: model type '{model_type}' is not known to transformers {_transformers_version()}: "
        'upgrade transformers (pip install -U transformers), or check "model_type" in config.json'
    )


@functools.lru_cache(maxsize=1)
def _config_names_from_file() -> frozenset[str]:
    # Importing transformers' auto module takes seconds and pulls in torch.
    # The table of model types is a generated file that imports nothing, so it
    # is run on its own; the few aliases the auto module adds on import
    # ("gpt-sw3", "mimi_encoder", ...) are read from its source without running it.
    try:
        transformers_spec = importlib.util.find_spec("transformers")
        # transformers is a dependency, installed as a package with a file.
        assert transformers_spec is not None and transformers_spec.origin is not None
        auto = Path(transformers_spec.origin).parent / "models" / "auto"
        module_spec = importlib.util.spec_from_file_location(
            "_glmrepl_transformers_auto_mappings", auto / "auto_mappings.py"
        )
        assert module_spec is not None and module_spec.loader is not None  # a .py path always has both
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return frozenset(module.CONFIG_MAPPING_NAMES) | _config_aliases(auto / "configuration_auto.py")
    except Exception:  # noqa: BLE001 - a changed layout only costs speed
        return frozenset()


def _config_aliases(source: Path) -> frozenset[str]:
    """Model types mapped to a config class name in dict literals of ``source``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Dict):
            names.update(
                key_text
                for key_text, value_text in zip(map(_str_constant, node.keys), map(_str_constant, node.values))
                if key_text is not None and value_text is not None and value_text.endswith("Config")
            )
    return frozenset(names)


def _str_constant(node: ast.expr | None) -> str | None:
    """The text of a string literal node; None for any other node."""
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


@functools.lru_cache(maxsize=1)
def _config_names_from_import() -> frozenset[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return frozenset(CONFIG_MAPPING_NAMES)


def _transformers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return "(not installed)"


# -- tokenizer -----------------------------------------------------------------


def _check_tokenizer(scan: CheckpointScan, names: set[str]) -> None:
    sentencepiece = sorted(n for n in names if n.endswith(".model") or n.endswith(".tiktoken"))
    scan.tokenizer_files = sorted(
        [n for n in TOKENIZER_JSON_FILES + TOKENIZER_OTHER_FILES if n in names] + sentencepiece
    )
    for name in TOKENIZER_JSON_FILES:
        if name in names:
            _read_json(scan, scan.path / name, check_only=True)
    for name in sentencepiece:
        _check_not_lfs_pointer(scan, scan.path / name)
    has_tokenizer = (
        "tokenizer.json" in names or {"vocab.json", "merges.txt"} <= names or "vocab.txt" in names or sentencepiece
    )
    if not has_tokenizer:
        scan.add_problem(
            f"{scan.path} has no tokenizer files: download tokenizer.json (or vocab.json and merges.txt, "
            "or the sentencepiece tokenizer.model) from the model's repository into the folder"
        )
    scan.has_chat_template = _has_chat_template(scan.path, names)


def _has_chat_template(path: Path, names: set[str]) -> bool:
    if any(name in names for name in CHAT_TEMPLATE_FILES):
        return True
    if "tokenizer_config.json" not in names:
        return False
    try:
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("chat_template"))


# -- weights -------------------------------------------------------------------


# The weights a loader reads, first present wins: safetensors before pickles,
# a single file before an index.
WEIGHT_PREFERENCE = (
    ("safetensors", SAFETENSORS_FILE),
    ("safetensors", SAFETENSORS_INDEX),
    ("bin", BIN_FILE),
    ("bin", BIN_INDEX),
)


def preferred_weights(names: set[str]) -> tuple[str, str] | None:
    """(format, file name) of the weights to load among a folder's file names, or None."""
    return next(((fmt, name) for fmt, name in WEIGHT_PREFERENCE if name in names), None)


def _check_weights(scan: CheckpointScan, names: set[str]) -> None:
    path = scan.path
    chosen = preferred_weights(names)
    if chosen and chosen[1].endswith(".index.json"):
        _check_sharded(scan, chosen[0], path / chosen[1])
    elif chosen:
        _check_weight_files(scan, chosen[0], [path / chosen[1]])
    elif any(name in names for name in TENSORFLOW_FILES):
        scan.add_problem(
            f"{path / TENSORFLOW_FILES[0]} holds TensorFlow weights only, which transformers 5 cannot load: "
            "convert them once on a machine with TensorFlow and transformers 4 with "
            "`AutoModelForCausalLM.from_pretrained(path, from_tf=True).save_pretrained(path)`, "
            "or download the PyTorch/safetensors weights"
        )
    elif any(name in names for name in FLAX_FILES):
        scan.add_problem(
            f"{path / FLAX_FILES[0]} holds Flax weights only, which transformers 5 cannot load: "
            "convert them once on a machine with JAX and transformers 4 with "
            "`AutoModelForCausalLM.from_pretrained(path, from_flax=True).save_pretrained(path)`, "
            "or download the PyTorch/safetensors weights"
        )
    else:
        scan.add_problem(
            f"{path} has no weights: download {SAFETENSORS_FILE} (or {SAFETENSORS_INDEX} and its shards, "
            f"or {BIN_FILE}) from the model's repository into the folder"
        )


def _check_sharded(scan: CheckpointScan, weights_format: str, index_path: Path) -> None:
    index = _read_json(scan, index_path)
    if index is None:
        return
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        scan.add_problem(f'{index_path} has no "weight_map" listing the shards: {REDOWNLOAD}')
        return
    shards = [scan.path / name for name in sorted(set(map(str, weight_map.values())))]
    missing = [shard for shard in shards if not shard.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        scan.add_problem(
            f"{missing[0]}{more} listed in {index_path.name} but missing: the download is "
            "incomplete; download the missing shards again"
        )
    _check_weight_files(scan, weights_format, [shard for shard in shards if shard not in missing], complete=not missing)


def _check_weight_files(scan: CheckpointScan, weights_format: str, files: list[Path], complete: bool = True) -> None:
    scan.weights_format = weights_format
    scan.weight_files = files
    problems_before = len(scan.problems)
    params = 0
    for file in files:
        try:
            scan.weight_bytes += file.stat().st_size
        except OSError:
            pass
        if weights_format == "safetensors":
            params += _check_safetensors(scan, file)
        else:
            _check_pickle(scan, file)
            params += count_pickled_parameters(file) or 0
    if complete and len(scan.problems) == problems_before and params:
        scan.param_count = params


def _check_safetensors(scan: CheckpointScan, file: Path) -> int:
    """Validate one safetensors file from its header; return its parameter count."""
    size, head = _size_and_head(scan, file)
    if head is None or _is_lfs_pointer(scan, file, head):
        return 0
    if size < 8:
        scan.add_problem(f"{file} is {'empty' if size == 0 else 'truncated'}: {REDOWNLOAD}")
        return 0
    header = _safetensors_header(scan, file, size)
    if header is None:
        return 0
    tensors = [t for key, t in header.items() if key != "__metadata__" and isinstance(t, dict)]
    try:
        data_end = max((int(t["data_offsets"][1]) for t in tensors), default=0)
        params = sum(math.prod(int(d) for d in t["shape"]) for t in tensors)
    except (KeyError, IndexError, TypeError, ValueError):
        scan.add_problem(f"{file} has a malformed safetensors header: the file is corrupt; {REDOWNLOAD}")
        return 0
    header_length = int.from_bytes(head[:8], "little")
    expected = 8 + header_length + data_end
    if expected != size:
        scan.add_problem(
            f"{file} is {size} bytes but its header describes {expected}: the file is "
            f"{'truncated' if size < expected else 'corrupt'}; {REDOWNLOAD}"
        )
        return 0
    if tensors and scan.weights_dtype is None:
        scan.weights_dtype = SAFETENSORS_DTYPES.get(str(tensors[0].get("dtype")))
    embedding = embedding_of(header)
    if embedding is not None and scan.config is not None:
        mismatch = embedding_problem(scan.config, scan.path / "config.json", file, *embedding)
        if mismatch:
            scan.add_problem(mismatch)
    return params


def _safetensors_header(scan: CheckpointScan, file: Path, size: int) -> dict | None:
    try:
        with open(file, "rb") as stream:
            (header_length,) = struct.unpack("<Q", stream.read(8))
            if header_length > min(size - 8, MAX_SAFETENSORS_HEADER):
                scan.add_problem(
                    f"{file} is truncated or not a safetensors file "
                    f"(header of {header_length} bytes in a file of {size}): {REDOWNLOAD}"
                )
                return None
            header = json.loads(stream.read(header_length))
    except (OSError, struct.error, ValueError) as error:
        scan.add_problem(f"{file} has an unreadable safetensors header ({error}): the file is corrupt; {REDOWNLOAD}")
        return None
    if not isinstance(header, dict):
        scan.add_problem(f"{file} has a malformed safetensors header: the file is corrupt; {REDOWNLOAD}")
        return None
    return header


def _check_pickle(scan: CheckpointScan, file: Path) -> None:
    size, head = _size_and_head(scan, file)
    if head is None or _is_lfs_pointer(scan, file, head):
        return
    if size == 0:
        scan.add_problem(f"{file} is empty: the download failed; {REDOWNLOAD}")
    elif head.startswith(b"PK\x03\x04"):
        # torch.save writes a zip archive whose directory sits at the end, so
        # a truncated download loses it.
        if not zipfile.is_zipfile(file):
            scan.add_problem(f"{file} is a damaged zip archive (probably truncated): {REDOWNLOAD}")
    elif not head.startswith(b"\x80"):  # pickle protocol 2 and later begin with PROTO
        scan.add_problem(f"{file} is neither a zip archive nor a pickle, so it is not PyTorch weights: {REDOWNLOAD}")


# -- small file helpers --------------------------------------------------------


def _size_and_head(scan: CheckpointScan, file: Path) -> tuple[int, bytes | None]:
    try:
        with open(file, "rb") as stream:
            head = stream.read(len(LFS_POINTER_PREFIX))
        return file.stat().st_size, head
    except OSError as error:
        scan.add_problem(f"{file} cannot be read ({error.strerror or error}): check its permissions, or {REDOWNLOAD}")
        return 0, None


def _is_lfs_pointer(scan: CheckpointScan, file: Path, head: bytes) -> bool:
    if not head.startswith(LFS_POINTER_PREFIX):
        return False
    scan.add_problem(
        f"{file} is a git-LFS pointer, not the real file (cloned without git-lfs): "
        "run `git lfs pull` in the folder, or download again"
    )
    return True


def _check_not_lfs_pointer(scan: CheckpointScan, file: Path) -> None:
    _, head = _size_and_head(scan, file)
    if head is not None:
        _is_lfs_pointer(scan, file, head)


def _read_json(scan: CheckpointScan, file: Path, check_only: bool = False):
    """Parse a JSON file, recording a problem and returning None when it is unusable."""
    size, head = _size_and_head(scan, file)
    if head is None or _is_lfs_pointer(scan, file, head):
        return None
    try:
        with open(file, "rb") as stream:
            if check_only and size > FULL_JSON_PARSE_LIMIT:
                return _looks_like_complete_json(scan, file, stream, size)
            return json.loads(stream.read().decode("utf-8"))
    except UnicodeDecodeError:
        scan.add_problem(f"{file} is not UTF-8 text, so it is not valid JSON: fix it or {REDOWNLOAD}")
    except json.JSONDecodeError as error:
        scan.add_problem(
            f"{file} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}): fix it or {REDOWNLOAD}"
        )
    except OSError as error:
        scan.add_problem(f"{file} cannot be read ({error.strerror or error}): check its permissions, or {REDOWNLOAD}")
    return None


def _looks_like_complete_json(scan: CheckpointScan, file: Path, stream, size: int):
    start = stream.read(64).lstrip()
    stream.seek(max(0, size - 64))
    end = stream.read().rstrip()
    if start.startswith(b"{") and end.endswith(b"}"):
        return {}
    scan.add_problem(
        f"{file} is not valid JSON (it does not start with '{{' and end with '}}', "
        f"so it is probably truncated): {REDOWNLOAD}"
    )
    return None
