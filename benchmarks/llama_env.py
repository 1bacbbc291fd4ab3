"""Make llama.cpp's benchmark environment once: `make bench-env`.

    python benchmarks/llama_env.py [--cache DIR] [--jobs N]

`make bench` puts llama.cpp beside glmrepl at every precision (benchmarks/llamacpp.py). This
builds what it runs, at one pinned release, on this machine and for it (native instructions):

- ``benchmarks/cache/llama-env``: a Python environment with llama-cpp-python built from its
  source distribution, and the ``gguf`` writer; the benchmarks time llama.cpp through it;
- ``benchmarks/cache/llama.cpp-<version>/build/bin``: llama.cpp's own ``llama-bench`` and
  ``llama-quantize`` from the same source distribution (cmake and ninja), for timing by hand
  (``llama-bench -m FILE -p 0 -n 128 -t 2``).

Only the package registries are used (pip). The ggml AMX backend is left out of both builds:
on AMX processors it crashed on Q8_0 and Q4_0 prompt batches; without it those use AVX-512.
Nothing here is a dependency of glmrepl.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
VERSION = "0.3.36"  # llama-cpp-python, and the llama.cpp it vendors
GGUF = "gguf==0.19.0"
NUMPY = "numpy==2.4.6"
CMAKE_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DGGML_AMX_TILE=OFF",
    "-DGGML_AMX_INT8=OFF",
    "-DGGML_AMX_BF16=OFF",
    "-DLLAMA_CURL=OFF",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=HERE / "cache")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    return parser.parse_args()


def run(command: list[str], **kwargs) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, **kwargs)


def python_environment(cache: Path, jobs: int) -> Path:
    """The llama environment's Python, with llama-cpp-python built here (once)."""
    env = cache / "llama-env"
    python = env / "bin" / "python"
    probe = [str(python), "-c", f"import llama_cpp, gguf; assert llama_cpp.__version__ == '{VERSION}'"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        print(f"llama environment ready: {env}")
        return python
    run([sys.executable, "-m", "venv", "--clear", str(env)])
    run([str(python), "-m", "pip", "install", "--quiet", NUMPY, GGUF])
    build = {**os.environ, "CMAKE_ARGS": " ".join(CMAKE_OPTIONS[1:]), "CMAKE_BUILD_PARALLEL_LEVEL": str(jobs)}
    run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-binary",
            "llama-cpp-python",
            f"llama-cpp-python=={VERSION}",
        ],
        env=build,
    )
    return python


def tools(cache: Path, jobs: int) -> Path:
    """llama-bench and llama-quantize built from the same source distribution (once)."""
    root = cache / f"llama.cpp-{VERSION}"
    binaries = root / "build" / "bin"
    if (binaries / "llama-bench").exists() and (binaries / "llama-quantize").exists():
        print(f"llama.cpp tools ready: {binaries}")
        return binaries
    downloads = cache / "llama-downloads"
    archive = downloads / f"llama_cpp_python-{VERSION}.tar.gz"
    if not archive.exists():
        run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             "-d", str(downloads), f"llama-cpp-python=={VERSION}"])  # fmt: skip
    unpacked = downloads / f"llama_cpp_python-{VERSION}"
    if not unpacked.exists():
        with tarfile.open(archive) as sdist:
            sdist.extractall(downloads, filter="data")
    source = unpacked / "vendor" / "llama.cpp"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(source, root)
    switches = ["-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"]
    run(["cmake", "-S", str(root), "-B", str(root / "build"), "-G", "Ninja", *CMAKE_OPTIONS, *switches])
    run(["cmake", "--build", str(root / "build"), "--target", "llama-bench", "llama-quantize", "-j", str(jobs)])
    return binaries


def main() -> int:
    args = parse_args()
    missing = [tool for tool in ("cmake", "ninja") if shutil.which(tool) is None]
    if missing:
        print(f"llama.cpp's build needs {' and '.join(missing)} (e.g. apt install cmake ninja-build)", file=sys.stderr)
        return 1
    args.cache.mkdir(parents=True, exist_ok=True)
    try:
        binaries = tools(args.cache, args.jobs)
        python_environment(args.cache, args.jobs)
    except subprocess.CalledProcessError as error:
        print(f"the llama.cpp build failed: {error}", file=sys.stderr)
        return 1
    print(f"ready: `make bench` times llama.cpp beside glmrepl; by hand: {binaries}/llama-bench")
    return 0


if __name__ == "__main__":
    sys.exit(main())
