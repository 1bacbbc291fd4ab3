"""Float linears on the CPU: glmrepl's kernels against torch for one token and for a few.

    python benchmarks/kernel_speed.py [--threads 2] [--rounds 7] [--best] [--dtype float32] [--rows 1,2,4,8,16,32]
    python benchmarks/kernel_speed.py --batching [--requests 1,4,8] [--new-tokens 32]
    python benchmarks/kernel_speed.py --int [--threads 2] [--rounds 7] [--best]
    python benchmarks/kernel_speed.py --prompt [--rows 2,4,8,16,64,256] [--threads 2] [--rounds 7] [--best]

Layers: random weights of Qwen2-0.5B's linear shapes (q/o 896->896, k/v 896->128,
gate/up 896->4864, down 4864->896, lm_head 896->151936). For each shape and row count M
(one token of each of M concurrent requests, as a step of batched decoding feeds them),
the kernel glmrepl uses (``float_gemv`` at M=1, ``float_gemm`` above), then torch's path
(``F.linear``; for half types on a CPU without native bfloat16 also the widened product
that KernelLinear used for more than one row). Enough copies of each weight to outgrow
the processor's caches are used in turn, so the weights come from memory as in a decode
step of a whole model. Each figure is the median (--best: the fastest) of the rounds, in
milliseconds; a last table sums them over one decode step of the 0.5B model.

Batching: the benchmark checkpoint (benchmarks/checkpoint.py) loaded through glmrepl,
transformers' continuous batching with 1, 4 and 8 greedy requests of a short prompt each;
the aggregate tokens/s (all new tokens over the wall time, the short prefills included),
with the few-token kernel ("after") and with the kernel for single tokens only ("before").

Integer (--int): int8 and int4 products of one token, glmrepl's kernels, for the 0.5B
model's linears in groups of 32 columns (Q4_0's and Q8_0's blocks) and for a ChatGLM2-6B
layer's with one scale a row (THUDM's int4/int8 releases); beside each, the float32 kernel on
the same shape in the same run, and the bytes read per second.

Prompt (--prompt): M tokens through each ChatGLM2-6B layer with one scale a row, int8 and int4:
the integer prompt kernel (16-bit activations as two bytes, VNNI), the dequantized blocks of rows
that prompts and batched steps took before it (as they still do without VNNI), and torch's float32
``F.linear`` on the same shape.

Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPES = {  # name: (in_features, out_features)
    "q/o 896->896": (896, 896),
    "k/v 896->128": (896, 128),
    "gate/up 896->4864": (896, 4864),
    "down 4864->896": (4864, 896),
    "lm_head": (896, 151936),
}
LAYERS = 24
USES = {"q/o 896->896": 2 * LAYERS, "k/v 896->128": 2 * LAYERS, "gate/up 896->4864": 2 * LAYERS}
USES |= {"down 4864->896": LAYERS, "lm_head": 1}  # how often each shape runs in one decode step
MIN_OUTGROW_BYTES = 96 << 20


def outgrow_caches_bytes() -> int:
    """Bytes of weight copies that no cache holds: twice the largest cache (some server
    processors have hundreds of MB of L3), at least MIN_OUTGROW_BYTES."""
    largest = 0
    for size in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = size.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            largest = max(largest, int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return max(MIN_OUTGROW_BYTES, 2 * largest)


PROMPT_TOKENS = 16
CHATGLM2_LAYER = {  # name: (in_features, out_features), one layer of ChatGLM2-6B
    "query_key_value": (4096, 4608),
    "dense": (4096, 4096),
    "dense_h_to_4h": (4096, 27392),
    "dense_4h_to_h": (13696, 4096),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="compute threads (default 2)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per layer figure (median taken)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--rows", default="1,2,4,8,16,32", help="row counts M, comma-separated")
    parser.add_argument("--best", action="store_true", help="the best round, not the median (a busy machine)")
    parser.add_argument("--batching", action="store_true", help="time continuous batching instead of layers")
    parser.add_argument("--int", action="store_true", help="time the int8/int4 products instead")
    parser.add_argument("--prompt", action="store_true", help="time many tokens through per-row int8/int4 layers")
    parser.add_argument("--requests", default="1,4,8", help="concurrent requests, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--cache", type=Path, default=HERE / "cache", help="where the benchmark checkpoint is built")
    return parser.parse_args()


def round_ms(calls: list, rounds: int, best: bool) -> float:
    """The median (or best) time of one call, the calls (one per weight copy) taken in turn."""
    for call in calls[:2]:
        call()  # warm-up: the threads' first wake-up
    times = []
    for index in range(rounds):
        call = calls[index % len(calls)]
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * (min(times) if best else statistics.median(times))


def kernel_call(lib, weight, x):
    """The kernel glmrepl runs for x's rows, whatever its dispatch limit."""
    import torch

    from glmrepl.engine.cpu import kernels as cpu_kernels

    threads = torch.get_num_threads()
    product = cpu_kernels.float_gemv if x.numel() == weight.shape[1] else cpu_kernels.float_gemm
    return lambda: product(lib, weight, x, None, threads)


def torch_calls(weight, x) -> dict:
    """torch's paths for the same product: F.linear, and the widened one where KernelLinear used it."""
    from torch.nn import functional as F

    from glmrepl.engine.cpu import float_linear

    calls = {"F.linear": lambda: F.linear(x, weight)}
    if weight.dtype in float_linear._HALF_TYPES and float_linear._widen_half_prompts():
        calls["widened"] = lambda: float_linear.widened_product(x, weight, None)
    return calls


def time_layers(args) -> None:
    import torch

    from glmrepl.engine.cpu import kernels as cpu_kernels
    from glmrepl.engine.cpu.float_linear import MAX_KERNEL_ROWS

    lib = cpu_kernels.wait_until_built()
    if lib is None:
        raise SystemExit(f"no kernels: {cpu_kernels.status()}")
    dtype = getattr(torch, args.dtype)
    statistic = "best" if args.best else "median"
    print(
        f"{args.dtype}, {args.threads} threads, {statistic} of {args.rounds} (ms); the kernel up to M={MAX_KERNEL_ROWS}"
    )
    counts = [int(part) for part in args.rows.split(",")]
    figures = {name: layer_figures(lib, name, dtype, counts, args) for name in SHAPES}
    print(f"a decode step of the 0.5B model (each layer's linears x {LAYERS} + lm_head):")
    for m in counts:
        step = {path: sum(USES[name] * figures[name][m][path] for name in SHAPES) for path in figures["lm_head"][m]}
        print(f"M={m:<3}" + "".join(f"   {path} {ms:8.1f}" for path, ms in step.items()))


def layer_figures(lib, name: str, dtype, counts: list[int], args) -> dict:
    """{M: {path: ms}} for one shape, printed as they come."""
    import torch

    cols, rows = SHAPES[name]
    copies = max(1, outgrow_caches_bytes() // (rows * cols * dtype.itemsize))
    weights = [(torch.randn(rows, cols) / cols**0.5).to(dtype) for _ in range(copies)]
    figures = {}
    for m in counts:
        x = torch.randn(1, m, cols).to(dtype)
        paths = {"kernel": [kernel_call(lib, weight, x) for weight in weights]}
        for weight in weights:
            for path, call in torch_calls(weight, x).items():
                paths.setdefault(path, []).append(call)
        figures[m] = {path: round_ms(calls, args.rounds, args.best) for path, calls in paths.items()}
        kernel = figures[m]["kernel"]
        others = "".join(
            f"   {path} {ms:8.3f} ({ms / kernel:.2f}x)" for path, ms in figures[m].items() if path != "kernel"
        )
        print(f"{name:<22} M={m:<3} kernel {kernel:8.3f}{others}", flush=True)
    return figures


def time_integer(args) -> None:
    from glmrepl.engine.cpu import kernels as cpu_kernels

    lib = cpu_kernels.wait_until_built()
    if lib is None:
        raise SystemExit(f"no kernels: {cpu_kernels.status()}")
    print(f"one token, {args.threads} threads, {'best' if args.best else 'median'} of {args.rounds} (ms)")
    small = {name: shape for name, shape in SHAPES.items() if name != "lm_head"}
    for title, shapes, group in (
        ("0.5B, groups of 32", small, 32),
        ("ChatGLM2-6B, one scale a row", CHATGLM2_LAYER, 0),
    ):
        print(title)
        for name, (cols, rows) in shapes.items():
            float_ms = integer_ms(lib, rows, cols, 32, 0, args)
            line = f"  {name:<22} float32 {float_ms:7.3f}"
            for bits in (8, 4):
                ms = integer_ms(lib, rows, cols, bits, group, args)
                read = rows * cols * bits / 8 / (ms / 1000) / 1e9
                line += f"   int{bits} {ms:7.3f} ({float_ms / ms:4.2f}x, {read:4.1f} GB/s)"
            print(line, flush=True)


def integer_ms(lib, rows: int, cols: int, bits: int, group: int, args) -> float:
    """One token through glmrepl's kernel for a weight of this shape (bits 32: float32)."""
    import torch

    from glmrepl.engine.cpu import kernels as cpu_kernels
    from glmrepl.engine.quant.layers import QuantizedLinear

    copies = max(2, outgrow_caches_bytes() * 8 // (rows * cols * bits))
    x, threads = torch.randn(cols), torch.get_num_threads()
    calls = []
    for _ in range(copies):
        linear = torch.nn.Linear(cols, rows, bias=False)
        if bits == 32:
            calls.append(functools.partial(cpu_kernels.float_gemv, lib, linear.weight.detach(), x, None, threads))
            continue
        layer = QuantizedLinear.from_linear(linear, bits, group)
        product = cpu_kernels.int8_gemv if bits == 8 else cpu_kernels.int4_gemv
        calls.append(functools.partial(product, lib, layer.weight, x, layer.weight_scale, group or cols, threads))
    return round_ms(calls, args.rounds, args.best)


def time_prompts(args) -> None:
    import torch

    from glmrepl.engine.cpu import kernels as cpu_kernels

    lib = cpu_kernels.wait_until_built()
    if lib is None:
        raise SystemExit(f"no kernels: {cpu_kernels.status()}")
    print(f"M tokens, {args.threads} threads, {'best' if args.best else 'median'} of {args.rounds} (ms)")
    for name, (cols, rows) in CHATGLM2_LAYER.items():
        weight = torch.randn(rows, cols)
        for count in (int(m) for m in args.rows.split(",")):
            x = torch.randn(count, cols)
            float_ms = round_ms([functools.partial(torch.nn.functional.linear, x, weight)], args.rounds, args.best)
            line = f"  {name:<22} M={count:<4} float32 {float_ms:8.2f}"
            for bits in (8, 4):
                integer, blocks = prompt_ms(lib, weight, x, bits, args)
                line += f"   int{bits} {integer:8.2f} ({float_ms / integer:4.2f}x; dequantized {blocks:8.2f})"
            print(line, flush=True)


def prompt_ms(lib, weight, x, bits: int, args) -> tuple[float, float]:
    """x through a per-row int8/int4 copy of weight: the prompt kernel, then the dequantized blocks."""
    import torch

    from glmrepl.engine.cpu import kernels as cpu_kernels
    from glmrepl.engine.quant import layers

    packed, scale = layers.quantize_weight(weight, bits)
    scale, threads = scale.half(), torch.get_num_threads()  # the released checkpoints' scale type
    block = max(1, layers._CPU_BLOCK_VALUES // weight.shape[1])
    kernel = [lambda: cpu_kernels.prompt_gemm(lib, packed, scale, bits, x, threads)]
    blocks = [lambda: layers._kernel_blocks(lib, x, packed, scale, bits, weight.shape[1], block)]
    return round_ms(kernel, args.rounds, args.best), round_ms(blocks, args.rounds, args.best)


def time_batching(args) -> None:
    import torch
    from checkpoint import ensure_checkpoint
    from transformers import ContinuousBatchingConfig, GenerationConfig

    from glmrepl.engine.backend import LocalBackend
    from glmrepl.engine.cpu import float_linear
    from glmrepl.engine.cpu import kernels as cpu_kernels
    from glmrepl.engine.models.loading import LoadOptions

    backend = LocalBackend()
    folder = ensure_checkpoint(args.cache)
    backend.load_and_wait(LoadOptions(mode="cpu", dtype=args.dtype).for_model(folder, "bench"))
    cpu_kernels.wait_until_built()
    model = backend.manager.current.model
    vocab = model.config.vocab_size
    settings = GenerationConfig(
        do_sample=True, temperature=0.999, top_k=vocab, top_p=0.9999, eos_token_id=-1, pad_token_id=0
    )
    batching = ContinuousBatchingConfig(num_blocks=16, page_size=128, max_batch_tokens=512, per_request_processors=True)
    generator = torch.Generator().manual_seed(0)
    print(f"{args.dtype}, {args.threads} threads, {PROMPT_TOKENS}-token prompts, {args.new_tokens} new tokens each")
    for requests in [int(part) for part in args.requests.split(",")]:
        prompts = [torch.randint(3, vocab, (PROMPT_TOKENS,), generator=generator).tolist() for _ in range(requests)]
        figures = {}
        for label, limit in (("before", 1), ("after", float_linear.MAX_KERNEL_ROWS)):
            original, float_linear.MAX_KERNEL_ROWS = float_linear.MAX_KERNEL_ROWS, limit
            try:
                figures[label] = batched_rate(model, settings, batching, prompts, args.new_tokens)
            finally:
                float_linear.MAX_KERNEL_ROWS = original
        print(
            f"{requests} requests: before {figures['before']:6.2f} tokens/s   after {figures['after']:6.2f} tokens/s"
            f"   ({figures['after'] / figures['before']:.2f}x)",
            flush=True,
        )


def batched_rate(model, settings, batching, prompts: list, new_tokens: int) -> float:
    """All requests' new tokens over the wall time of one continuous-batching run."""
    manager = model.init_continuous_batching(generation_config=settings, continuous_batching_config=batching)
    manager.start()
    try:
        start = time.perf_counter()
        for ids in prompts:  # top_k=1: greedy; eos -1: every request runs to new_tokens
            manager.add_request(ids, max_new_tokens=new_tokens, eos_token_id=[-1], top_k=1)
        produced = sum(len(manager.get_result(timeout=600).generated_tokens) for _ in prompts)
        return produced / (time.perf_counter() - start)
    finally:
        manager.stop(block=True, timeout=5)


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        if args.batching:
            time_batching(args)
        elif args.int:
            time_integer(args)
        elif args.prompt:
            time_prompts(args)
        else:
            time_layers(args)


if __name__ == "__main__":
    main()
