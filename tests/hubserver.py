"""A tiny stand-in for the Hugging Face hub on 127.0.0.1, for download tests.

It implements only what huggingface_hub's ``snapshot_download`` calls:

- ``GET /api/models/{repo}[/revision/{rev}]``: repo info with ``sha`` and ``siblings``;
- ``GET /api/models/{repo}/tree/{rev}``: the file listing (one page);
- ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``: the file, with ``ETag``,
  ``X-Repo-Commit``, ``Content-Length`` and ``Range`` support.

Errors carry the ``X-Error-Code`` header the client turns into typed errors.
Tests can make a file's next GET stop after some bytes (the connection is
dropped mid-body) to exercise resuming, and read the request log.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class HubRepo:
    files: dict[str, bytes]
    sha: str = ""

    def __post_init__(self):
        if not self.sha:
            digest = hashlib.sha1()
            for name in sorted(self.files):
                digest.update(name.encode() + b"\0" + self.files[name])
            self.sha = digest.hexdigest()

    @classmethod
    def from_folder(cls, folder: Path, extra: dict[str, bytes] | None = None) -> HubRepo:
        files = {
            str(path.relative_to(folder)): path.read_bytes()
            for path in sorted(Path(folder).rglob("*"))
            if path.is_file()
        }
        files.update(extra or {})
        return cls(files)


@dataclass
class Request:
    method: str
    path: str
    range: str | None


@dataclass
class LocalHub:
    repos: dict[str, HubRepo]
    requests: list[Request] = field(default_factory=list)
    # file name -> bytes to send before dropping the connection, for its next GET only
    drop_next_get_after: dict[str, int] = field(default_factory=dict)
    # file names answered with a 500 on every GET, until removed
    failing: set[str] = field(default_factory=set)
    # file name -> bytes to send before dropping the connection, on every GET until removed
    always_drop_after: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> LocalHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def file_gets(self, name: str) -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and r.path.endswith("/" + name)]

    def take_drop(self, name: str) -> int | None:
        with self._lock:
            once = self.drop_next_get_after.pop(name, None)
            return once if once is not None else self.always_drop_after.get(name)


_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


def _handler_for(hub: LocalHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output clean
            pass

        def do_HEAD(self):
            self._route(head=True)

        def do_GET(self):
            self._route(head=False)

        def _route(self, head: bool):
            path = unquote(urlsplit(self.path).path)
            hub.requests.append(Request(self.command, path, self.headers.get("Range")))
            for pattern, answer in ((_TREE, self._tree), (_INFO, self._info), (_RESOLVE, self._resolve)):
                match = pattern.match(path)
                if match:
                    repo = hub.repos.get(match["repo"])
                    if repo is None:
                        return self._error(404, "RepoNotFound", head)
                    if match["rev"] not in (None, "main", repo.sha):
                        return self._error(404, "RevisionNotFound", head)
                    return answer(repo, match, head)
            return self._error(404, "RepoNotFound", head)

        def _info(self, repo: HubRepo, match, head):
            self._json(
                {
                    "id": match["repo"],
                    "sha": repo.sha,
                    "private": False,
                    "siblings": [{"rfilename": name} for name in sorted(repo.files)],
                },
                head,
            )

        def _tree(self, repo: HubRepo, match, head):
            self._json(
                [
                    {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in sorted(repo.files.items())
                ],
                head,
            )

        def _resolve(self, repo: HubRepo, match, head):
            name = match["file"]
            data = repo.files.get(name)
            if data is None:
                return self._error(404, "EntryNotFound", head, commit=repo.sha)
            if not head and name in hub.failing:
                return self._error(500, None, head)
            start = _range_start(self.headers.get("Range"))
            status = 206 if start else 200
            body = data[start:]
            self.send_response(status)
            self.send_header("X-Repo-Commit", repo.sha)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(body)))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if head:
                return
            drop_after = hub.take_drop(name)
            if drop_after is not None:
                self.wfile.write(body[:drop_after])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        def _json(self, payload, head: bool):
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _error(self, status: int, code: str | None, head: bool, commit: str | None = None):
            body = json.dumps({"error": code or "server error"}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

    return Handler


def _range_start(header: str | None) -> int:
    match = re.fullmatch(r"bytes=(\d+)-", header or "")
    return int(match[1]) if match else 0


# -- the repositories the tests serve ------------------------------------------------

CUSTOM_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_tiny.TinyConfig",
    "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM",
}


def build_test_repos(gpt2_folder: Path, qwen_folder: Path) -> dict[str, HubRepo]:
    """Three repositories made from the tiny checkpoints, each with files a download must skip."""
    return {
        "tiny/multi-format": _multi_format(gpt2_folder),
        "tiny/custom-code": _custom_code(gpt2_folder),
        "tiny/sharded": _sharded(qwen_folder),
    }


def _multi_format(gpt2_folder: Path) -> HubRepo:
    # The same weights as safetensors, PyTorch, TensorFlow, Flax and ONNX, as many hub repos hold them.
    return HubRepo.from_folder(
        gpt2_folder,
        {
            "model.safetensors": _safetensors_from_bin(gpt2_folder / "pytorch_model.bin"),
            "tf_model.h5": b"\x89HDF\r\n\x1a\n fake tensorflow weights",
            "flax_model.msgpack": b"fake flax weights",
            "onnx/model.onnx": b"fake onnx graph",
            "README.md": b"# tiny multi-format\n",
            ".gitattributes": b"*.bin filter=lfs\n",
        },
    )


def _custom_code(gpt2_folder: Path) -> HubRepo:
    config = json.loads((gpt2_folder / "config.json").read_text())
    config["auto_map"] = CUSTOM_CODE_AUTO_MAP
    return HubRepo.from_folder(
        gpt2_folder,
        {
            "config.json": json.dumps(config, indent=2).encode(),
            "configuration_tiny.py": b"# the checkpoint's own config class\n",
            "modeling_tiny.py": b"# the checkpoint's own model class\n",
            "README.md": b"# tiny custom code\n",
        },
    )


def _sharded(qwen_folder: Path) -> HubRepo:
    bin_index = {
        "metadata": {},
        "weight_map": {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"},
    }
    return HubRepo.from_folder(
        qwen_folder,
        {
            # A consolidated copy next to the shards, as some releases have: not in the index, not needed.
            "consolidated.safetensors": b"duplicate weights",
            "pytorch_model.bin.index.json": json.dumps(bin_index).encode(),
            "pytorch_model-00001-of-00002.bin": b"fake shard 1",
            "pytorch_model-00002-of-00002.bin": b"fake shard 2",
            "scripts/convert.py": b"print('not needed')\n",
        },
    )


def _safetensors_from_bin(bin_file: Path) -> bytes:
    import torch
    from safetensors.torch import save

    state = torch.load(bin_file, map_location="cpu", weights_only=True)
    # Tied tensors share storage, which safetensors refuses; copies are fine here.
    return save({name: tensor.clone().contiguous() for name, tensor in state.items()})
