"""Generation and load timings, raw transformers beside glmrepl, on one model object.

Raw and glmrepl runs alternate, so drift (thermal, page cache, other load on
the machine) hits both sides alike; each figure is the median of the repeats.
"""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

PROMPT_TOKENS = 64
NEW_TOKENS = 128
PROMPT_SEED = 7
LONG_PROMPT_TOKENS = 1024


def prompt_ids(vocab_size: int) -> list[int]:
    import torch

    generator = torch.Generator().manual_seed(PROMPT_SEED)
    return torch.randint(3, vocab_size, (PROMPT_TOKENS,), generator=generator).tolist()


def greedy_kwargs(new_tokens: int = NEW_TOKENS) -> dict:
    # No min_new_tokens: its processors scan the whole vocabulary for stop ids at every token
    # (about 2.5 ms a token on two cores), which a chat never pays. The rates are per token
    # made, so a reply that stops early still counts right.
    return dict(max_new_tokens=new_tokens, do_sample=False)


class _TimestampStreamer:
    """Notes when each new token arrives: the least a caller can do to see tokens."""

    def __init__(self):
        self.times: list[float] = []
        self.saw_prompt = False

    def put(self, value) -> None:
        if self.saw_prompt:
            self.times.append(time.perf_counter())
        self.saw_prompt = True

    def end(self) -> None:
        pass


def raw_generation(model, ids: list[int], stop_ids: list[int], new_tokens: int = NEW_TOKENS) -> dict:
    """Plain transformers on the same model object: glmrepl's kernel linears are made plain
    ``nn.Linear`` again and its fused decoding step is off for the run (the same parameters,
    nothing copied)."""
    from glmrepl.engine.cpu.float_linear import restore_linears, use_kernels
    from glmrepl.engine.quant.decode_step import transformers_steps

    restore_linears(model)
    try:
        with transformers_steps(model):
            return _plain_generation(model, ids, stop_ids, new_tokens)
    finally:
        use_kernels(model)


def _plain_generation(model, ids: list[int], stop_ids: list[int], new_tokens: int) -> dict:
    import torch

    from glmrepl.engine.cpu.machine import release_thread_pool

    started = time.perf_counter()
    input_ids = torch.tensor([ids], dtype=torch.long, device=model.device)
    streamer = _TimestampStreamer()
    with torch.inference_mode():
        model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            streamer=streamer,
            eos_token_id=stop_ids,
            pad_token_id=stop_ids[0],
            **greedy_kwargs(new_tokens),
        )
    # This thread's OpenMP threads go, as glmrepl's generation thread's do after a reply:
    # the side measured next must not find a second pool (cpu.release_thread_pool).
    release_thread_pool()
    first, last = streamer.times[0], streamer.times[-1]
    return {
        "first_token_s": first - started,
        "decode_tokens_per_s": (len(streamer.times) - 1) / (last - first),
        "new_tokens": len(streamer.times),
    }


def long_prompt_ids(vocab_size: int, length: int = LONG_PROMPT_TOKENS) -> list[int]:
    import torch

    generator = torch.Generator().manual_seed(PROMPT_SEED + 1)
    return torch.randint(3, vocab_size, (length,), generator=generator).tolist()


def glmrepl_generation(loaded, ids: list[int], new_tokens: int = NEW_TOKENS) -> dict:
    from glmrepl.engine.generation.run import GenerationRun
    from glmrepl.engine.generation.scheduler import private_scheduler

    run = GenerationRun(
        loaded.model,
        loaded.tokenizer,
        ids,
        greedy_kwargs(new_tokens),
        loaded.prompt_format.stop_token_ids,
        scheduler=private_scheduler(),
    )
    for _delta in run:  # the REPL prints these; consuming them is the work it does
        pass
    return {
        "first_token_s": run.stats.first_token_s,
        "decode_tokens_per_s": run.stats.decode_tokens_per_s,
        "new_tokens": run.stats.new_tokens,
        "path": run.stats.path,
    }


def compare_generation(loaded, repeats: int, new_tokens: int = NEW_TOKENS) -> dict:
    """Decode speed and time to first token, raw vs glmrepl, alternating."""
    ids = prompt_ids(loaded.model.config.vocab_size)
    stop_ids = loaded.prompt_format.stop_token_ids
    # Warm-up of both sides: kernels chosen, weights paged in, and the compute
    # thread pool of glmrepl's generation thread built, as in a running REPL.
    raw_generation(loaded.model, ids, stop_ids, new_tokens=8)
    glmrepl_generation(loaded, ids, new_tokens=8)
    raw, ours = [], []
    for _ in range(repeats):
        raw.append(raw_generation(loaded.model, ids, stop_ids, new_tokens))
        ours.append(glmrepl_generation(loaded, ids, new_tokens))
    long_ids = long_prompt_ids(loaded.model.config.vocab_size)
    raw_long, ours_long = [], []
    for _ in range(repeats):  # time to first token of a long prompt: prefill dominates
        raw_long.append(raw_generation(loaded.model, long_ids, stop_ids, new_tokens=2)["first_token_s"])
        ours_long.append(glmrepl_generation(loaded, long_ids, new_tokens=2)["first_token_s"])
    return {
        "raw": _medians(raw),
        "glmrepl": _medians(ours),
        "repeats": repeats,
        "path": ours[-1]["path"],
        "first_token_s_1024": {"raw": statistics.median(raw_long), "glmrepl": statistics.median(ours_long)},
    }


def _medians(runs: list[dict]) -> dict:
    """Medians, and the best run: on a busy machine the best is closest to the code's own cost."""
    medians = {key: statistics.median(run[key] for run in runs) for key in runs[0] if key != "path"}
    best = {
        "best_first_token_s": min(run["first_token_s"] for run in runs),
        "best_decode_tokens_per_s": max(run["decode_tokens_per_s"] for run in runs),
    }
    return medians | best | {"runs": runs}


def raw_load(path: Path, dtype, device_map: str) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map=device_map, local_files_only=True)
    model.eval()
    # A chat needs the tokenizer as well; glmrepl's loader reads both.
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    elapsed = time.perf_counter() - started
    del model, tokenizer
    _free()
    return elapsed


def glmrepl_load(path: Path, mode: str, dtype_name: str) -> float:
    from glmrepl.engine.models.manager import LoadRequest, load_model

    started = time.perf_counter()
    loaded = load_model(LoadRequest(path=path, name=path.name, mode=mode, dtype=dtype_name))
    elapsed = time.perf_counter() - started
    del loaded
    _free()
    return elapsed


def compare_load(path: Path, mode: str, dtype_name: str, device_map: str, repeats: int) -> dict:
    """Load time, raw vs glmrepl; a warm-up load first so both read from the page cache."""
    from glmrepl.engine.devices.modes import torch_dtype

    dtype = torch_dtype(dtype_name)
    raw_load(path, dtype, device_map)
    raw, ours = [], []
    for _ in range(repeats):
        raw.append(raw_load(path, dtype, device_map))
        ours.append(glmrepl_load(path, mode, dtype_name))
    return {
        "raw_s": statistics.median(raw),
        "glmrepl_s": statistics.median(ours),
        "raw_runs": raw,
        "glmrepl_runs": ours,
        "repeats": repeats,
    }


def _free() -> None:
    """Drop the model just timed before the next load, on the GPU too."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
