"""int4 / int8 / bfloat16 against float32 and llama.cpp on the Qwen2-0.5B-shaped checkpoint.

    python benchmarks/quant_models.py [--threads 2] [--repeats 3] [--new-tokens 64] [--no-llamacpp] [--smoke]

The checkpoint (benchmarks/checkpoint.py, bfloat16 safetensors) is quantized
once into benchmarks/cache by ``glmrepl quantize``: int8 and int4 at their
default group sizes, each with the output head stored float (made int8 when it
loads on the CPU, the default) and with ``--head``. Then, each in a child
process: float32 and bfloat16 (the source at ``--dtype float32`` / ``bfloat16``)
and the four quantized folders loaded side by side by path, as ``glmrepl DST``
loads them, and decoded in turns through GenerationRun (medians; the machine's
other load hits every variant alike); and each variant alone in a fresh process
for its resident memory against the bytes of its parameters, and the load's
peak against where it settles. llama.cpp's float32 / bfloat16 / Q8_0 / Q4_0 of
the same checkpoint follow when its environment exists (benchmarks/llamacpp.py),
and glmrepl's speed over llama.cpp's, precision by precision.
Figures, not a test: nothing here fails on a slow machine. ``--smoke`` runs all of it on a
tiny checkpoint (benchmarks/smoke.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import smoke

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# label -> (bits, quantize the head too)
VARIANTS = {"int8": (8, False), "int4": (4, False), "int8 +head": (8, True), "int4 +head": (4, True)}
TARGETS = {"int8": 2.5, "int4": 3.0}
FLOAT_VARIANTS = ("float32", "bfloat16")
LLAMA_CPP_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "int8": "int8 (Q8_0)", "int4": "int4 (Q4_0)"}
GIB = 1 << 30


def quantized_folders(cache: Path, smoke_run: bool = False) -> tuple[Path, dict[str, Path]]:
    """The source checkpoint and its quantized copies, written on first use."""
    import checkpoint

    from glmrepl.engine.models.quantized_folder import quantize_checkpoint

    source = checkpoint.ensure_checkpoint(cache, smoke_run)
    folders = {}
    for label, (bits, head) in VARIANTS.items():
        folder = cache / f"{source.name}-int{bits}{'-head' if head else ''}"
        if not folder.exists():  # written atomically: a folder there is a whole one
            print(f"[quant_models] glmrepl quantize {source.name} -> {folder.name} ...", flush=True)
            quantize_checkpoint(source, folder, bits, include_head=head)
        folders[label] = folder
    return source, folders


def load(path: Path, dtype: str = "float32"):
    from glmrepl.engine.cpu.machine import release_thread_pool
    from glmrepl.engine.models.loading import LoadRequest, load_model

    loaded = load_model(LoadRequest(path=path, name=path.name, mode="cpu", dtype=dtype))
    # The REPL loads in a thread that ends, taking its OpenMP threads with it; loading here
    # keeps this thread's, and two pools on two cores slow every decode step (cpu.py).
    release_thread_pool()
    return loaded


def generation(loaded, ids: list[int], new_tokens: int) -> dict:
    import speed

    return speed.glmrepl_generation(loaded, ids, new_tokens)


def speed_child(paths: dict, threads: int, repeats: int, new_tokens: int) -> dict:
    """In a child: every variant loaded side by side, decoded in turns."""
    import speed

    from glmrepl.engine.cpu import kernels as cpu_kernels
    from glmrepl.engine.cpu import machine as cpu

    cpu.request_threads(threads)
    cpu.apply_threads()
    models = {label: load(Path(path), dtype) for label, (path, dtype) in paths.items()}
    built = cpu_kernels.wait_until_built() is not None
    ids = speed.prompt_ids(models["float32"].model.config.vocab_size)[:16]
    for loaded in models.values():  # warm-up: pages read in, thread pools built
        generation(loaded, ids, 4)
    runs: dict = {label: [] for label in models}
    prompts: dict = {label: [] for label in models}  # llama.cpp's prompt: the 64 ids, one new token
    long_ids = speed.prompt_ids(models["float32"].model.config.vocab_size)
    for _ in range(repeats):
        for label, loaded in models.items():
            runs[label].append(generation(loaded, ids, new_tokens))
            prompts[label].append(generation(loaded, long_ids, 1)["first_token_s"])
    return {
        "kernels_built": built,
        "threads": threads,
        "repeats": repeats,
        "new_tokens": new_tokens,
        "variants": {
            label: {
                "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in found),
                "first_token_s": statistics.median(prompts[label]),
                "runs": [round(r["decode_tokens_per_s"], 2) for r in found],
                "path": found[-1]["path"],
            }
            for label, found in runs.items()
        },
    }


def memory_child(path: str, dtype: str, threads: int) -> dict:
    """In a fresh child: resident memory growth of a load and a short reply, and its peak."""
    import gc
    import resource

    import transformers.modeling_utils  # noqa: F401  (the libraries a load imports are the baseline)

    import glmrepl.engine.models.quantized_folder  # noqa: F401
    from glmrepl.engine.cpu import machine as cpu
    from glmrepl.engine.cpu.machine import release_freed_memory
    from glmrepl.engine.devices.modes import resident_memory_bytes

    cpu.request_threads(threads)
    cpu.apply_threads()
    baseline = resident_memory_bytes() or 0
    loaded = load(Path(path), dtype)
    generation(loaded, [3, 4, 5, 6], 2)
    unique = {p.data_ptr(): p.numel() * p.element_size() for p in loaded.model.parameters()}
    grown = (resident_memory_bytes() or 0) - baseline
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline  # kilobytes on Linux
    # What the model itself holds: what dropping it (and nothing else) gives back. The growth
    # also holds fixed costs (the 151936-token tokenizer, the modules a load imports, thread
    # pools) that weigh more beside a smaller model.
    before_drop = resident_memory_bytes() or 0
    loaded.model = None
    gc.collect()
    release_freed_memory()
    held = before_drop - (resident_memory_bytes() or 0)
    return {
        "rss_growth_bytes": grown,
        "peak_growth_bytes": peak,
        "model_bytes": held,
        "parameter_bytes": sum(unique.values()),
    }


def child(*args: str) -> dict:
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"child {args[:1]} failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(lines[-1])


def measure(args) -> dict:
    source, folders = quantized_folders(args.cache, args.smoke)
    paths = {"float32": [str(source), "float32"], "bfloat16": [str(source), "bfloat16"]}
    paths |= {label: [str(folder), "float32"] for label, folder in folders.items()}
    results: dict = {"load_average_before": os.getloadavg()}
    print("[quant_models] decode, all variants in turns ...", flush=True)
    results["speed"] = child("--speed", json.dumps(paths), str(args.threads), str(args.repeats), str(args.new_tokens))
    print("[quant_models] resident memory, each alone ...", flush=True)
    results["memory"] = {label: child("--memory", *place, str(args.threads)) for label, place in paths.items()}
    results["load_average_after"] = os.getloadavg()
    if not args.no_llamacpp:
        import llamacpp

        figures = llamacpp.measure(args.cache, args.llama_python, args.threads, max(1, args.repeats), args.smoke)
        results["llama_cpp"] = figures
    return results


def table(results: dict) -> str:
    variants = results["speed"]["variants"]
    base = variants["float32"]["decode_tokens_per_s"]
    rows = [("variant", "decode tok/s", "vs float32", "target", "RSS held by the model / parameters", "decode path")]
    for label, figures in variants.items():
        memory = results["memory"][label]
        ratio = memory["model_bytes"] / memory["parameter_bytes"]
        target = TARGETS.get(label.split()[0]) if label not in FLOAT_VARIANTS else None
        rows.append(
            (
                label,
                f"{figures['decode_tokens_per_s']:.2f}",
                f"{figures['decode_tokens_per_s'] / base:.2f}x",
                f">= {target}x" if target else "",
                f"{memory['model_bytes'] / GIB:.2f} / {memory['parameter_bytes'] / GIB:.2f} GiB = {ratio:.2f}x"
                + ("" if label in FLOAT_VARIANTS else " (<= 1.2x)")
                + f"; load grew {memory['rss_growth_bytes'] / GIB:.2f}, peak {peak_ratio(memory):.2f}x of it",
                figures["path"],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    speed = results["speed"]
    lines.append(
        f"{speed['threads']} threads, {speed['new_tokens']} new tokens, median of {speed['repeats']}; "
        f"load average {results['load_average_before'][0]:.2f} before, {results['load_average_after'][0]:.2f} after"
    )
    if "llama_cpp" in results:
        import llamacpp

        lines.append(llamacpp.table(results["llama_cpp"]))
        lines += beside_llamacpp(variants, results["llama_cpp"])
    return "\n".join(lines)


def peak_ratio(memory: dict) -> float:
    """The load's peak growth over its settled growth (target <= 1.3 for quantized folders)."""
    return memory.get("peak_growth_bytes", 0) / max(1, memory["rss_growth_bytes"])


def beside_llamacpp(variants: dict, figures: dict) -> list[str]:
    """glmrepl's decode speed over llama.cpp's, precision by precision, from the same run."""
    if "results" not in figures:
        return []
    lines = ["glmrepl / llama.cpp decode (targets: >= 1.0 int4, int8, float32; >= 0.95 bfloat16):"]
    for ours, theirs in LLAMA_CPP_NAMES.items():
        found = figures["results"].get(theirs, {})
        if ours in variants and "decode_tokens_per_s" in found:
            rate = variants[ours]["decode_tokens_per_s"]
            lines.append(
                f"  {ours:<9} {rate:6.2f} / {found['decode_tokens_per_s']:6.2f} = {rate / found['decode_tokens_per_s']:.2f}"
            )
    lines.append("glmrepl / llama.cpp prompt speed, first token of the same 64 ids (target: >= 1.0):")
    for ours, theirs in LLAMA_CPP_NAMES.items():
        found = figures["results"].get(theirs, {})
        if "first_token_s" in variants.get(ours, {}) and "first_token_s" in found:
            mine, other = variants[ours]["first_token_s"], found["first_token_s"]
            lines.append(f"  {ours:<9} {mine:6.3f} s / {other:6.3f} s: {other / mine:.2f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--cache", type=Path, default=HERE / "cache")
    parser.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp's figures")
    parser.add_argument("--llama-python", type=Path, default=HERE / "cache" / "llama-env" / "bin" / "python")
    smoke.add_flag(parser)
    if sys.argv[1:2] == ["--speed"]:
        paths, threads, repeats, new_tokens = sys.argv[2:6]
        print(json.dumps(speed_child(json.loads(paths), int(threads), int(repeats), int(new_tokens))))
        return
    if sys.argv[1:2] == ["--memory"]:
        print(json.dumps(memory_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
        return
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.new_tokens = smoke.REPEATS, smoke.NEW_TOKENS
    results = measure(args)
    print(table(results))
    if args.smoke:
        print(smoke.NOTE)
    print(json.dumps(results))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    main()
