"""int4 / int8 against float: resident memory and decode speed of a ChatGLM2-shaped model.

    python benchmarks/quant.py [--layers 10] [--hidden 2048] [--threads N] [--device cpu|cuda:0]

Builds a random-weight checkpoint of about 0.5B parameters in the ChatGLM2
layout (a temporary folder), then loads it once per variant in a fresh
process (so resident memory is that variant's own) through glmrepl's native
loader: float, int8 (--quantize 8) and int4 (--quantize 4). Also times one
4096x4096 layer for the CPU dequantization strategies quant.py chose between.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "data" / "chatglm" / "chatglm2-tiny"
PROMPT_TOKENS, NEW_TOKENS = 16, 32


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


def measure_variant(folder: str, bits: int, device: str, threads: int) -> dict:
    """Run in a child process: load, then time greedy decoding."""
    import torch

    from glmrepl.engine.devices import resident_memory_bytes
    from glmrepl.engine.families import detect_family, load_family

    torch.set_num_threads(threads)
    path = Path(folder)
    match = detect_family(path, json.loads((path / "config.json").read_text(encoding="utf-8")))
    dtype = torch.float32 if device == "cpu" else torch.float16
    started = time.perf_counter()
    model = load_family(
        path, match, weight_files=[path / "model.safetensors"], dtype=dtype, device_map=device, quantize=bits or None
    ).model
    load_s = time.perf_counter() - started
    ids = torch.randint(3, 400, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(7)).to(device)
    kwargs = dict(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    with torch.inference_mode():
        model.generate(ids, do_sample=False, max_new_tokens=2)  # warm-up
        _sync(device)
        prefill = time.perf_counter()
        model.generate(ids, do_sample=False, max_new_tokens=1, min_new_tokens=1)
        _sync(device)
        prefill_s = time.perf_counter() - prefill
        started = time.perf_counter()
        model.generate(ids, **kwargs)
        _sync(device)
        total_s = time.perf_counter() - started
    decode_s = max(total_s - prefill_s, 1e-9)
    import resource

    result = {
        "bits": bits,
        "load_s": round(load_s, 2),
        "rss_bytes": resident_memory_bytes(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "decode_tokens_per_s": round((NEW_TOKENS - 1) / decode_s, 2),
    }
    if device != "cpu":
        result["gpu_allocated_bytes"] = torch.cuda.memory_allocated()
    return result


def _sync(device: str) -> None:
    import torch

    if device != "cpu":
        torch.cuda.synchronize()


def layer_strategies(threads: int, size: int = 4096, repeats: int = 20) -> list[dict]:
    """ms per call of one size x size int4 layer (decode: 1 token), CPU strategies side by side."""
    import torch
    from torch.nn import functional as F

    from glmrepl.engine import quant

    torch.set_num_threads(threads)
    packed, scale = quant.quantize_weight(torch.randn(size, size), 4)
    cached = quant.dequantize(packed, scale, 4)
    x = torch.randn(1, 1, size)
    strategies = {
        "float32 cached (float memory)": lambda: F.linear(x, cached),
        "dequantize whole matrix per call": lambda: F.linear(x, quant.dequantize(packed, scale, 4)),
        "blocked per call (glmrepl)": lambda: quant.cpu_linear(x, packed, scale, 4),
    }
    rows = []
    with torch.inference_mode():
        for name, run in strategies.items():
            run()
            best = min(_timed(run, repeats) for _ in range(5))
            rows.append({"strategy": name, "ms_per_call": round(best * 1e3, 2)})
    return rows


def _timed(run, repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5504)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # "folder:bits", in the child process
    args = parser.parse_args()
    if args.variant:
        folder, bits = args.variant.rsplit(":", 1)
        print(json.dumps(measure_variant(folder, int(bits), args.device, args.threads)))
        return
    print(json.dumps({"layer_int4_4096": layer_strategies(args.threads)}))
    with tempfile.TemporaryDirectory(prefix="glmrepl-quant-bench-") as tmp:
        folder = Path(tmp) / "chatglm2-bench"
        params = build_checkpoint(folder, args.layers, args.hidden, args.ffn, args.vocab)
        print(json.dumps({"parameters": params, "device": args.device, "threads": args.threads}))
        for bits in (0, 8, 4):
            child = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--variant",
                    f"{folder}:{bits}",
                    "--device",
                    args.device,
                    "--threads",
                    str(args.threads),
                ],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            print(child.stdout.strip() or child.stderr.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
