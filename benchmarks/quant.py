"""int4 / int8 against float32 on the CPU: decode speed, first tokens, resident memory.

    python benchmarks/quant.py [--threads 2] [--repeats 5] [--layers 2 --hidden 4096 --ffn 13696 --vocab 4096] [--smoke]

Builds (once, into benchmarks/cache) a random-weight ChatGLM2 checkpoint with
ChatGLM2-6B's layer shapes but 2 layers and a 4096-token vocabulary (about
0.44B parameters), so the quantized layers dominate the bytes read per token
as in the real model. Then, each in a child process: one 4096x4096 layer for
one token under each CPU strategy; float32, int8 and int4 loaded side by side
and timed in turns through GenerationRun (medians); resident memory of each
variant alone; and the first int4 reply after a load with no compiler (the
torch path), with the kernels compiled during it, and with them cached.
``--smoke`` runs all of it on a one-layer checkpoint of a few MB (benchmarks/smoke.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import smoke

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "data" / "chatglm" / "chatglm2-tiny"
PROMPT_TOKENS, NEW_TOKENS = 64, 64
SHAPE = dict(layers=2, hidden=4096, ffn=13696, vocab=4096)
SMOKE_SHAPE = dict(layers=1, hidden=256, ffn=512, vocab=4096)
# The smoke run's layer timings: one round, and torch.compile only tracing (no inductor), whose
# first compile on a fresh machine takes about 25 s on two cores.
SMOKE_LAYER = dict(repeats=1, rounds=1, backend="eager")


def build_checkpoint(folder: Path, layers: int, hidden: int, ffn: int, vocab: int) -> int:
    """A ChatGLM2 folder with random float32 weights; returns the parameter count."""
    import shutil

    import torch
    from safetensors.torch import save_file

    heads, groups, head_dim = hidden // 128, 2, 128
    config = json.loads((TOKENIZER / "config.json").read_text(encoding="utf-8"))
    config.update(
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_layers=layers,
        num_attention_heads=heads,
        multi_query_group_num=groups,
        kv_channels=head_dim,
        padded_vocab_size=vocab,
        vocab_size=vocab,
        seq_length=2048,
        _name_or_path="chatglm2-bench",
    )
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, folder / name)
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.02

    qkv = heads * head_dim + 2 * groups * head_dim
    state = {
        "transformer.embedding.word_embeddings.weight": rand(vocab, hidden),
        "transformer.encoder.final_layernorm.weight": torch.ones(hidden),
        "transformer.output_layer.weight": rand(vocab, hidden),
    }
    for i in range(layers):
        prefix = f"transformer.encoder.layers.{i}."
        state.update(
            {
                prefix + "input_layernorm.weight": torch.ones(hidden),
                prefix + "post_attention_layernorm.weight": torch.ones(hidden),
                prefix + "self_attention.query_key_value.weight": rand(qkv, hidden),
                prefix + "self_attention.query_key_value.bias": rand(qkv),
                prefix + "self_attention.dense.weight": rand(hidden, heads * head_dim),
                prefix + "mlp.dense_h_to_4h.weight": rand(2 * ffn, hidden),
                prefix + "mlp.dense_4h_to_h.weight": rand(hidden, ffn),
            }
        )
    save_file(state, str(folder / "model.safetensors"))
    return sum(t.numel() for t in state.values())


def ensure_checkpoint(cache: Path, layers: int, hidden: int, ffn: int, vocab: int) -> tuple[Path, int]:
    """The benchmark folder, built once into the cache (a marker written last)."""
    folder = cache / f"chatglm2-h{hidden}-f{ffn}-l{layers}-v{vocab}"
    marker = folder / ".complete"
    if not marker.exists():
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        params = build_checkpoint(folder, layers, hidden, ffn, vocab)
        marker.write_text(str(params))
    return folder, int(marker.read_text())


def load(folder: Path, bits: int):
    """The checkpoint as ``glmrepl DIR [--quantize BITS]`` loads it on the CPU (the int8 head included)."""
    from glmrepl.engine.models.loading import LoadRequest, load_model

    return load_model(LoadRequest(path=folder, name=folder.name, mode="cpu", dtype="float32", quantize=bits or None))


def generation(parts, prompt_tokens: int, new_tokens: int) -> dict:
    """One greedy reply through glmrepl's streaming path (GenerationRun)."""
    from glmrepl.engine.generation.run import GenerationRun
    from glmrepl.engine.generation.scheduler import private_scheduler

    ids = [3 + (i * 7) % 400 for i in range(prompt_tokens)]  # ids every vocabulary here has
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    run = GenerationRun(parts.model, parts.tokenizer, ids, kwargs, [], scheduler=private_scheduler())
    for _ in run:
        pass
    return {
        "first_token_s": run.stats.first_token_s,
        "decode_tokens_per_s": run.stats.decode_tokens_per_s,
        "path": run.stats.path,
    }


def alternating_speed(folder: str, threads: int, repeats: int) -> dict:
    """Run in a child process: float32, int8 and int4 loaded side by side, timed in turns."""
    import statistics

    from glmrepl.engine.cpu import kernels as cpu_kernels
    from glmrepl.engine.cpu import machine as cpu

    cpu.request_threads(threads)
    cpu.apply_threads()
    models = {bits: load(Path(folder), bits) for bits in (0, 8, 4)}
    kernels = cpu_kernels.wait_until_built() is not None
    runs: dict = {bits: [] for bits in models}
    for parts in models.values():  # warm-up: pages read in, thread pools built
        generation(parts, PROMPT_TOKENS, 4)
    for _ in range(repeats):
        for bits, parts in models.items():
            runs[bits].append(generation(parts, PROMPT_TOKENS, NEW_TOKENS))
    long_prompt = {
        bits: [generation(parts, 1024, 2)["first_token_s"] for _ in range(max(1, repeats // 2))]
        for bits, parts in models.items()
    }
    result = {"kernels_built": kernels, "threads": threads, "repeats": repeats}
    for bits, measured in runs.items():
        result[f"int{bits}" if bits else "float32"] = {
            "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in measured),
            "first_token_s_64": statistics.median(r["first_token_s"] for r in measured),
            "first_token_s_1024": statistics.median(long_prompt[bits]),
            "path": measured[-1]["path"],
            "runs": [r["decode_tokens_per_s"] for r in measured],
        }
    return result


def resident(folder: str, bits: int, threads: int) -> dict:
    """Run in a child process: resident memory after loading and one short reply."""
    # The baseline holds the libraries a load brings in (torch, transformers, the loader):
    # about 0.1 GiB that does not grow with the model.
    import transformers.modeling_utils  # noqa: F401

    from glmrepl.engine.cpu import machine as cpu
    from glmrepl.engine.devices.modes import resident_memory_bytes
    from glmrepl.engine.families.chatglm import load as _loader  # noqa: F401

    cpu.use_one_heap()  # as glmrepl's entry points do
    cpu.request_threads(threads)
    baseline = resident_memory_bytes()
    parts = load(Path(folder), bits)
    generation(parts, PROMPT_TOKENS, 4)
    packed = sum(p.numel() * p.element_size() for p in parts.model.parameters())
    return {"bits": bits, "rss_bytes": resident_memory_bytes(), "baseline_bytes": baseline, "parameter_bytes": packed}


def first_reply(folder: str, bits: int, threads: int) -> dict:
    """Run in a child process: load, then the first reply, as a user sees them."""
    from glmrepl.engine.cpu import machine as cpu

    cpu.request_threads(threads)
    started = time.perf_counter()
    parts = load(Path(folder), bits)
    loaded = time.perf_counter()
    reply = generation(parts, PROMPT_TOKENS, NEW_TOKENS)
    first = time.perf_counter() - loaded
    again = time.perf_counter()
    generation(parts, PROMPT_TOKENS, NEW_TOKENS)  # the same reply again: a warm one, the yardstick
    warm = time.perf_counter() - again
    return {"load_s": loaded - started, "first_reply_s": first, "warm_reply_s": warm, "path": reply["path"]}


def layer_strategies(
    threads: int, size: int = 4096, repeats: int = 20, rounds: int = 7, backend: str = "inductor"
) -> list[dict]:
    """ms per call of one size x size layer for one token, CPU strategies side by side."""
    import torch
    from torch.nn import functional as F

    from glmrepl.engine.cpu import kernels as cpu_kernels
    from glmrepl.engine.quant import layers as quant

    torch.set_num_threads(threads)
    cpu_kernels.wait_until_built()
    weight = torch.randn(size, size)
    x = torch.randn(1, 1, size)
    packed8, scale8 = quant.quantize_weight(weight, 8)
    packed4, scale4 = quant.quantize_weight(weight, 4)
    even, odd = x[0, 0, 0::2].contiguous(), x[0, 0, 1::2].contiguous()
    compiled8 = torch.compile(lambda v, w, s: (w.float() * v).sum(-1) * s, dynamic=False, backend=backend)
    compiled4 = torch.compile(
        lambda e, o, w, s: ((w >> 4).float() * e + ((w << 4) >> 4).float() * o).sum(-1) * s,
        dynamic=False,
        backend=backend,
    )
    strategies = {
        "float32 F.linear": lambda: F.linear(x, weight),
        "int8 blocked dequantize + matmul": lambda: quant.blocked_linear(x, packed8, scale8, 8),
        "int8 torch.compile (w.float() * x).sum": lambda: compiled8(x[0, 0], packed8, scale8),
        "int8 fused kernel (glmrepl)": lambda: quant.cpu_linear(x, packed8, scale8, 8),
        "int4 blocked dequantize + matmul": lambda: quant.blocked_linear(x, packed4, scale4, 4),
        "int4 torch.compile nibbles * even/odd x": lambda: compiled4(even, odd, packed4, scale4),
        "int4 fused kernel (glmrepl)": lambda: quant.cpu_linear(x, packed4, scale4, 4),
    }
    times: dict = {name: [] for name in strategies}
    with torch.inference_mode():
        for run in strategies.values():
            run()
            run()
        for _ in range(rounds):  # in turns, so load from other processes hits every strategy
            for name, run in strategies.items():
                times[name].append(_timed(run, repeats))
    return [{"strategy": name, "ms_per_call": round(min(found) * 1e3, 3)} for name, found in times.items()]


def _timed(run, repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - started) / repeats


def child(*args: str, env: dict | None = None) -> dict:
    import os

    result = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, **(env or {}))
    )
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"child {args} failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(lines[-1])


def measure(
    cache: Path, layers: int, hidden: int, ffn: int, vocab: int, threads: int, repeats: int, smoke_run: bool = False
) -> dict:
    import os

    folder, params = ensure_checkpoint(cache, layers, hidden, ffn, vocab)
    results = {
        "checkpoint": {"layers": layers, "hidden": hidden, "ffn": ffn, "vocab": vocab, "parameters": params},
        "threads": threads,
        "load_average_before": os.getloadavg(),
    }
    print("[quant] one 4096x4096 layer ...", flush=True)
    results["layer_4096"] = child("--layer", "--threads", str(threads), *(["--smoke"] if smoke_run else []))
    print("[quant] decode, float32 / int8 / int4 in turns ...", flush=True)
    results["speed"] = child("--speed", str(folder), "--threads", str(threads), "--repeats", str(repeats))
    print("[quant] resident memory ...", flush=True)
    results["memory"] = [child("--resident", f"{folder}:{bits}", "--threads", str(threads)) for bits in (0, 8, 4)]
    print(
        "[quant] first reply after load (int4): no compiler (the torch path), kernels cold, kernels cached ...",
        flush=True,
    )
    rounds = 1 if smoke_run else max(2, repeats // 2)
    results["first_reply_int4"] = first_replies(folder, threads, rounds, smoke_run)
    results["load_average_after"] = os.getloadavg()
    return results


def first_replies(folder: Path, threads: int, rounds: int, smoke_run: bool = False) -> dict:
    """The first int4 reply after a load, each side in a fresh child, the sides in turns."""
    import statistics

    with tempfile.TemporaryDirectory(prefix="glmrepl-kernel-cache-") as scratch:
        sides = {
            "no compiler": {"CXX": "/nonexistent/g++"},
            "kernels built during it": None,
            # A smoke run fills no cache of its own (a child and a build, about 10 s on two
            # cores): its children before these, waiting for the kernels, built them into the usual one.
            "kernels cached": {} if smoke_run else {"XDG_CACHE_HOME": scratch},
        }
        if not smoke_run:
            child("--first-reply", f"{folder}:4", "--threads", str(threads), env=sides["kernels cached"])  # fills it
        runs: dict = {side: [] for side in sides}
        for _ in range(rounds):
            for side, env in sides.items():
                if env is None:
                    env = {"XDG_CACHE_HOME": tempfile.mkdtemp(dir=scratch)}
                runs[side].append(child("--first-reply", f"{folder}:4", "--threads", str(threads), env=env))
    return {
        side: {
            "first_reply_s": statistics.median(r["first_reply_s"] for r in found),
            "warm_reply_s": statistics.median(r["warm_reply_s"] for r in found),
            "load_s": statistics.median(r["load_s"] for r in found),
            "path": found[-1]["path"],
        }
        for side, found in runs.items()
    }


def table(results: dict) -> str:
    speed, memory = results["speed"], {m["bits"]: m for m in results["memory"]}
    base = speed["float32"]
    rows = [("measure", "float32", "int8", "int4", "target")]
    rows.append(("decode tok/s", *(f"{speed[k]['decode_tokens_per_s']:.2f}" for k in ("float32", "int8", "int4")), ""))
    rows.append(
        (
            "  vs float32",
            "1.00",
            f"{speed['int8']['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x",
            f"{speed['int4']['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x",
            "int8 >= 3.5x, int4 >= 3x",
        )
    )
    for prompt in (64, 1024):
        rows.append(
            (
                f"first token s ({prompt}-token prompt)",
                *(f"{speed[k][f'first_token_s_{prompt}']:.3f}" for k in ("float32", "int8", "int4")),
                "",
            )
        )
    rows.append(("RSS over baseline / parameter bytes", *(_memory_cell(memory[b]) for b in (0, 8, 4)), "<= 1.2x"))
    rows.append(("path", *(speed[k]["path"] for k in ("float32", "int8", "int4")), ""))
    for side, figures in results["first_reply_int4"].items():
        rows.append(
            (
                f"int4 first reply after load s: {side}",
                "",
                "",
                f"{figures['first_reply_s']:.2f} (warm {figures['warm_reply_s']:.2f})",
                figures["path"],
            )
        )
    for layer in results["layer_4096"]:
        rows.append((f"4096x4096, 1 token: {layer['strategy']}", "", "", f"{layer['ms_per_call']:.2f} ms", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


GIB = 1 << 30


def _memory_cell(figures: dict) -> str:
    grown = figures["rss_bytes"] - figures["baseline_bytes"]
    return f"{grown / GIB:.2f} / {figures['parameter_bytes'] / GIB:.2f} GiB = {grown / figures['parameter_bytes']:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=SHAPE["layers"])
    parser.add_argument("--hidden", type=int, default=SHAPE["hidden"])
    parser.add_argument("--ffn", type=int, default=SHAPE["ffn"])
    parser.add_argument("--vocab", type=int, default=SHAPE["vocab"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / "cache")
    smoke.add_flag(parser)
    # In the child processes:
    parser.add_argument("--layer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--speed", help=argparse.SUPPRESS)
    parser.add_argument("--resident", help=argparse.SUPPRESS)
    parser.add_argument("--first-reply", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.layer:
        print(json.dumps(layer_strategies(args.threads, **(SMOKE_LAYER if args.smoke else {}))))
    elif args.speed:
        print(json.dumps(alternating_speed(args.speed, args.threads, args.repeats)))
    elif args.resident or args.first_reply:
        folder, bits = (args.resident or args.first_reply).rsplit(":", 1)
        measure_child = resident if args.resident else first_reply
        print(json.dumps(measure_child(folder, int(bits), args.threads)))
    else:
        run(args)


def run(args: argparse.Namespace) -> None:
    """The whole benchmark, as `python benchmarks/quant.py` runs it."""
    if args.smoke:
        shape, repeats = SMOKE_SHAPE, smoke.REPEATS
    else:
        shape, repeats = dict(layers=args.layers, hidden=args.hidden, ffn=args.ffn, vocab=args.vocab), args.repeats
    results = measure(args.cache, **shape, threads=args.threads, repeats=repeats, smoke_run=args.smoke)
    print(table(results))
    if args.smoke:
        print(smoke.NOTE)
    print(json.dumps(results))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
