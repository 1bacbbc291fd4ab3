"""glmrepl against raw transformers on a Qwen2-0.5B-shaped checkpoint: `make bench`.

Prints a table with the targets beside the figures and writes them as JSON
to benchmarks/results/<date>-<cpu|gpu>.json. See benchmarks/README.md.
``--smoke`` runs every part on a tiny checkpoint (benchmarks/smoke.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the helper modules beside this script

import checkpoint  # noqa: E402
import llamacpp  # noqa: E402
import machine  # noqa: E402
import quant  # noqa: E402
import report  # noqa: E402
import smoke  # noqa: E402
import speed  # noqa: E402
import switch  # noqa: E402
import terminal  # noqa: E402


@dataclass(frozen=True)
class Mode:
    mode: str  # glmrepl's device mode
    dtype: str
    device_map: str  # what raw from_pretrained is given for the same placement

    @property
    def label(self) -> str:
        return f"{self.mode} {self.dtype}"


CPU_MODES = (Mode("cpu", "float32", "cpu"), Mode("cpu", "bfloat16", "cpu"))
GPU_MODES = (Mode("gpu", "bfloat16", "cuda:0"), Mode("gpu", "float16", "cuda:0"))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per side for each timing (median taken)")
    parser.add_argument("--cache", type=Path, default=HERE / "cache", help="where the checkpoint is built")
    parser.add_argument("--results", type=Path, help="where the JSON goes (default benchmarks/results)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="generation figures only (no load, /device switch, memory or start-up timings)",
    )
    parser.add_argument("--threads", type=int, default=None, help="compute threads (default: physical cores)")
    parser.add_argument("--no-quant", action="store_true", help="skip the int8/int4 part (benchmarks/quant.py)")
    parser.add_argument(
        "--llama-python",
        type=Path,
        default=llamacpp.DEFAULT_ENV,
        help="a Python with llama-cpp-python for the optional llama.cpp comparison (skipped when absent)",
    )
    smoke.add_flag(parser)
    args = parser.parse_args()
    args.results = smoke.results_folder(args, HERE / "results")
    if args.smoke:
        args.repeats = smoke.REPEATS
    args.new_tokens = smoke.NEW_TOKENS if args.smoke else speed.NEW_TOKENS
    return args


def available_modes() -> tuple[Mode, ...]:
    import torch

    return CPU_MODES + GPU_MODES if torch.cuda.is_available() else CPU_MODES


def measure_mode(mode: Mode, model_path: Path, twin_path: Path, bandwidth: float, args: argparse.Namespace) -> dict:
    repeats = args.repeats
    print(f"[{mode.label}] generation ...", flush=True)
    figures = {"generation": generation_figures(mode, model_path, bandwidth, repeats, args.new_tokens)}
    if args.quick:
        return figures
    print(f"[{mode.label}] loading ...", flush=True)
    figures["load"] = speed.compare_load(model_path, mode.mode, mode.dtype, mode.device_map, repeats)
    print(f"[{mode.label}] /device switch ...", flush=True)
    figures["switch"] = switch.compare_switch(model_path, mode.mode, mode.dtype, repeats)
    print(f"[{mode.label}] memory over swaps ...", flush=True)
    figures["memory"] = memory_in_fresh_process(model_path, twin_path, mode)
    return figures


def generation_figures(mode: Mode, model_path: Path, bandwidth: float, repeats: int, new_tokens: int) -> dict:
    from glmrepl.engine.cpu.machine import release_thread_pool
    from glmrepl.engine.models.manager import LoadRequest, free_memory, load_model

    loaded = load_model(LoadRequest(path=model_path, name=model_path.name, mode=mode.mode, dtype=mode.dtype))
    release_thread_pool()  # as the REPL's loading thread, which ends (cpu.release_thread_pool)
    result = speed.compare_generation(loaded, repeats, new_tokens)
    weight_bytes = machine.weight_bytes_per_token(loaded.model)
    result["roof"] = {
        "bandwidth_bytes_per_s": bandwidth,
        "weight_bytes_per_token": weight_bytes,
        "ceiling_tokens_per_s": bandwidth / weight_bytes,
    }
    del loaded
    free_memory()
    return result


def memory_in_fresh_process(model_path: Path, twin_path: Path, mode: Mode) -> dict:
    """A new interpreter, so only what glmrepl itself keeps is counted."""
    script = HERE / "memory.py"
    output = subprocess.run(
        [sys.executable, str(script), str(model_path), str(twin_path), mode.dtype, mode.mode],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def write_results(results: dict, folder: Path, kind: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{datetime.date.today().isoformat()}-{kind}.json"
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return path


def main() -> int:
    args = parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # raw loads would draw bars; glmrepl's hook still runs without them
    results = measure(args)
    print()
    if args.smoke:
        print(smoke.NOTE)
    print(report.table(results))
    if "quantized" in results:
        print()
        print(quant.table(results["quantized"]))
    print()
    print(llamacpp.table(results["llama_cpp"]))
    kind = "gpu" if "gpu" in results["bandwidth_bytes_per_s"] else "cpu"
    results["load_average_after"] = os.getloadavg()
    print(f"\nwritten: {write_results(results, args.results, kind)}")
    if args.smoke:
        print(smoke.NOTE)
    return 0


def measure(args: argparse.Namespace) -> dict:
    model_path = checkpoint.ensure_checkpoint(args.cache, args.smoke)
    twin_path = checkpoint.ensure_twin(model_path)
    results = {
        "machine": machine.describe_machine(),
        "checkpoint": checkpoint.shape(args.smoke),
        # Other processes on the machine skew timings: the load average tells.
        "load_average_before": os.getloadavg(),
        "prompt_tokens": speed.PROMPT_TOKENS,
        "new_tokens": args.new_tokens,
        "modes": {},
    }
    from glmrepl.engine.cpu import machine as cpu

    cpu.request_threads(args.threads)
    results["threads"] = cpu.apply_threads()  # raw and glmrepl share the process, so the threads too
    if not args.quick:
        print("measuring start-up in a terminal ...", flush=True)
        startup_repeats = args.repeats if args.smoke else max(args.repeats, 5)
        results["startup"] = terminal.measure_startup(model_path, "float32", startup_repeats)
    results |= measure_modes(args, model_path, twin_path)
    if not args.no_quant:
        results["quantized"] = measure_quantized(args, results["threads"])
    print("llama.cpp on the same checkpoint (optional) ...", flush=True)
    results["llama_cpp"] = llamacpp.measure(args.cache, args.llama_python, results["threads"], args.repeats, args.smoke)
    return results


def measure_modes(args: argparse.Namespace, model_path: Path, twin_path: Path) -> dict:
    """Each device mode's figures, and the read bandwidth their roofs come from."""
    # A smoke run takes one mode: the others go through the same code.
    modes = available_modes()[:1] if args.smoke else available_modes()
    bandwidth = {"cpu": machine.read_bandwidth("cpu")}
    if any(mode.mode == "gpu" for mode in modes):
        bandwidth["gpu"] = machine.read_bandwidth("cuda:0")
    figures = {mode.label: measure_mode(mode, model_path, twin_path, bandwidth[mode.mode], args) for mode in modes}
    return {"bandwidth_bytes_per_s": bandwidth, "modes": figures}


def measure_quantized(args: argparse.Namespace, threads: int) -> dict:
    print("int8 / int4 against float32 on a ChatGLM2-6B-shaped checkpoint ...", flush=True)
    if args.smoke:
        return quant.measure(args.cache, **quant.SMOKE_SHAPE, threads=threads, repeats=args.repeats, smoke_run=True)
    return quant.measure(args.cache, **quant.SHAPE, threads=threads, repeats=max(args.repeats, 3))


if __name__ == "__main__":
    sys.exit(main())
