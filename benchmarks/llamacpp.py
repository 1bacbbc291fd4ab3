"""llama.cpp on the benchmark checkpoint, at the precisions glmrepl offers: an optional comparison.

    python benchmarks/llamacpp.py [--llama-python PATH] [--threads 2] [--repeats 3] [--smoke]

llama.cpp is what CPU users pick instead of transformers, so `make bench` shows its decode speed
beside glmrepl's when it is installed: never a dependency of glmrepl, it lives in the benchmark's
own environment (default benchmarks/cache/llama-env, made by `make bench-env`:
benchmarks/llama_env.py), and the comparison is skipped when that is absent.

The Qwen2-0.5B-shaped checkpoint (benchmarks/checkpoint.py) is written once as a float32 GGUF
file by ``write_gguf`` (this process: torch reads the safetensors, the ``gguf`` package writes),
then llama.cpp's own quantizer makes the bfloat16, Q8_0 and Q4_0 files. Each is timed in the
llama environment (``_child``): the same 64 prompt ids, 128 greedy new tokens, decode tokens/s
from the first to the last new token, as benchmarks/speed.py measures glmrepl. ``--smoke`` does the
same on the smoke run's tiny checkpoint (benchmarks/smoke.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import smoke

HERE = Path(__file__).resolve().parent
DEFAULT_ENV = HERE / "cache" / "llama-env" / "bin" / "python"
# llama.cpp's file types (llama.h's LLAMA_FTYPE_*), made from the float32 file by its quantizer.
FILE_TYPES = {"float32": None, "bfloat16": 32, "int8 (Q8_0)": 7, "int4 (Q4_0)": 2}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-python", type=Path, default=DEFAULT_ENV, help="a Python with llama-cpp-python")
    parser.add_argument("--cache", type=Path, default=HERE / "cache")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    smoke.add_flag(parser)
    return parser.parse_args()


def available(python: Path) -> str | None:
    """None when llama-cpp-python imports in that environment, else why not."""
    if not python.exists():
        return f"no llama.cpp environment at {python}"
    probe = subprocess.run([str(python), "-c", "import llama_cpp, gguf"], capture_output=True, text=True)
    return None if probe.returncode == 0 else (probe.stderr.strip().splitlines() or ["import failed"])[-1]


def measure(cache: Path, python: Path, threads: int, repeats: int, smoke_run: bool = False) -> dict:
    """Decode figures per precision, or {"skipped": why}."""
    problem = available(python)
    if problem:
        return {"skipped": problem}
    import checkpoint
    import speed

    float_file = ensure_float_file(cache, python, smoke_run)
    ids = speed.prompt_ids(checkpoint.shape(smoke_run)["vocab_size"])
    new_tokens = smoke.NEW_TOKENS if smoke_run else speed.NEW_TOKENS
    request = {"threads": threads, "repeats": repeats, "ids": ids, "new_tokens": new_tokens, "files": {}}
    stem = float_file.name.removesuffix("-f32.gguf")
    for label, file_type in FILE_TYPES.items():
        request["files"][label] = [str(float_file), file_type, str(cache / f"{stem}-{file_type}.gguf")]
    output = subprocess.run(
        [str(python), __file__, "--child"], input=json.dumps(request), capture_output=True, text=True, check=True
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def ensure_float_file(cache: Path, python: Path, smoke_run: bool = False) -> Path:
    """The checkpoint's float32 GGUF file, written once by the llama environment (it has ``gguf``)."""
    import checkpoint

    folder = checkpoint.ensure_checkpoint(cache, smoke_run)
    float_file = cache / f"{folder.name}-f32.gguf"
    if not float_file.exists():
        subprocess.run([str(python), __file__, "--write", str(folder), str(float_file)], check=True)
    return float_file


def write_gguf(folder: Path, target: Path) -> None:
    """The checkpoint as a float32 GGUF file for llama.cpp's qwen2 architecture."""
    import gguf

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    writer = gguf.GGUFWriter(str(target) + ".part", "qwen2")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config.get("rope_parameters", config).get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_vocabulary(writer, folder, config)
    for name, array in _tensors(folder):
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(str(target) + ".part", target)


def _add_vocabulary(writer, folder: Path, config: dict) -> None:
    """The byte-level BPE vocabulary (ids only are fed, but llama.cpp loads one)."""
    tokenizer = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    by_id = {index: piece for piece, index in tokenizer["model"]["vocab"].items()}
    special = {added["id"] for added in tokenizer.get("added_tokens", [])}
    pieces = [by_id.get(index, f"[PAD{index}]") for index in range(config["vocab_size"])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(pieces)
    writer.add_token_types([3 if index in special else 1 for index in range(len(pieces))])  # 3: control
    merges = tokenizer["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])


def _tensors(folder: Path):
    """(llama.cpp name, float32 array) for every weight; the output layer is the tied embedding."""
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for file in sorted(folder.glob("*.safetensors")):
        for name, array in _read_safetensors(file):
            if name == "model.embed_tokens.weight":
                yield "token_embd.weight", array
            elif name == "model.norm.weight":
                yield "output_norm.weight", array
            elif name.startswith("model.layers."):
                _, _, layer, rest = name.split(".", 3)
                module, _, kind = rest.rpartition(".")
                yield f"blk.{layer}.{names[module]}.{kind}", array


def _read_safetensors(file: Path):
    """(name, float32 array) from a safetensors file, read directly: numpy has no bfloat16, and
    the llama environment needs no safetensors package for this. The format is an 8-byte
    header length, a JSON header of dtypes, shapes and byte offsets, then the data."""
    import numpy as np

    data = np.memmap(file, dtype=np.uint8, mode="r")
    length = int(data[:8].view(np.uint64)[0])
    header = json.loads(bytes(data[8 : 8 + length]))
    header.pop("__metadata__", None)
    for name, entry in header.items():
        start, end = (8 + length + offset for offset in entry["data_offsets"])
        raw = data[start:end]
        if entry["dtype"] == "BF16":  # the top half of a float32
            array = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            array = raw.view({"F32": np.float32, "F16": np.float16}[entry["dtype"]]).astype(np.float32)
        yield name, array.reshape(entry["shape"])


def _child() -> None:
    """In the llama environment: quantize where needed, then time each file."""
    import statistics
    import time

    import llama_cpp

    request = json.loads(sys.stdin.read())
    results = {}
    for label, (float_file, file_type, target) in request["files"].items():
        path = float_file if file_type is None else target
        if file_type is not None and not Path(target).exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = file_type
            params.nthread = request["threads"]
            if llama_cpp.llama_model_quantize(float_file.encode(), (target + ".part").encode(), params) != 0:
                results[label] = {"error": "llama.cpp's quantizer failed"}
                continue
            os.replace(target + ".part", target)
        model = llama_cpp.Llama(
            model_path=path, n_ctx=512, n_threads=request["threads"], n_threads_batch=request["threads"], verbose=False
        )
        runs = []
        for _ in range(request["repeats"] + 1):  # the first is a warm-up (weights paged in)
            model.reset()
            started, times = time.perf_counter(), []
            for _token in model.generate(request["ids"], top_k=1, temp=0.0, reset=True):
                times.append(time.perf_counter())
                if len(times) == request["new_tokens"]:
                    break
            runs.append({"first_token_s": times[0] - started, "decode": (len(times) - 1) / (times[-1] - times[0])})
        runs = runs[1:]
        results[label] = {
            "decode_tokens_per_s": statistics.median(r["decode"] for r in runs),
            "first_token_s": statistics.median(r["first_token_s"] for r in runs),
            "file_bytes": os.path.getsize(path),
        }
        del model
    print(json.dumps({"llama_cpp": llama_cpp.__version__, "threads": request["threads"], "results": results}))


def table(figures: dict) -> str:
    if "skipped" in figures:
        return f"llama.cpp comparison skipped: {figures['skipped']}"
    lines = [f"llama.cpp {figures['llama_cpp']} ({figures['threads']} threads), same checkpoint and prompt:"]
    for label, result in figures["results"].items():
        if "error" in result:
            lines.append(f"  {label:<12} {result['error']}")
            continue
        lines.append(
            f"  {label:<12} decode {result['decode_tokens_per_s']:6.2f} tok/s   "
            f"first token {result['first_token_s']:.3f} s   file {result['file_bytes'] / 2**30:.2f} GiB"
        )
    return "\n".join(lines)


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        _child()
        return 0
    if sys.argv[1:2] == ["--write"]:
        write_gguf(Path(sys.argv[2]), Path(sys.argv[3]))
        return 0
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    args = parse_args()
    repeats = smoke.REPEATS if args.smoke else args.repeats
    print(table(measure(args.cache, args.llama_python, args.threads, repeats, args.smoke)))
    if args.smoke:
        print(smoke.NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
