"""The load pipeline: validate -> place -> tokenizer -> weights -> prompt format.

Each step is a public function, so it can be tested and reused; the
ModelManager (manager.py) runs the pipeline in the background and swaps
models. Nothing here touches the currently loaded model.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..conversation import formats
from ..devices.modes import Placement, plan_placement, sizing_dtype, torch_dtype, weights_bytes_at
from ..errors import GlmreplError, Hint, LoadCancelled
from ..families import load_family
from ..request import LoadOptions
from .checkpoint import CheckpointInfo, inspect_checkpoint

# The name the load pipeline's callers know; the same type, not a copy of it.
LoadRequest = LoadOptions


@dataclass
class ModelInfo:
    name: str
    path: Path
    architecture: str
    family: str | None
    family_reason: str | None
    placement: Placement
    context_length: int | None
    param_count: int | None
    checkpoint_defaults: dict = field(default_factory=dict)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    prompt_format: Any
    info: ModelInfo
    native_format: Any = None  # a native family's own chat format, kept for /mode chat
    extra_stop_ids: list = field(default_factory=list)  # generation_config's eos ids
    request: LoadRequest | None = None  # how it was loaded: /device reuses the GPU choices
    adapter: Any = None  # the adapters.AttachedAdapter in use, if any


class LoadJob:
    """A load running in a background thread; the REPL shows ``status`` meanwhile."""

    def __init__(self, request: LoadRequest):
        self.request = request
        self.stage = "starting"
        self.fraction: float | None = None
        self.cancel_event = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.result: LoadedModel | None = None

    @property
    def status(self) -> str:
        percent = f" {self.fraction:.0%}" if self.fraction is not None else ""
        return f"loading {self.request.name}: {self.stage}{percent}"

    def cancel(self) -> None:
        self.cancel_event.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def check_cancelled(self) -> None:
        if self.cancel_event.is_set():
            raise LoadCancelled(f"loading {self.request.name} was cancelled")


def load_model(request: LoadRequest, job: LoadJob | None = None) -> LoadedModel:
    job = job or LoadJob(request)
    quiet_transformers()
    job.stage = "checking files"
    assert request.path is not None  # a request to load is made by for_model, which names the folder
    refuse_adapter_folder(request.path)
    info = inspect_checkpoint(request.path, trust_remote_code=request.trust_remote_code, family_override=request.family)
    placement = placement_for(request, info)
    job.check_cancelled()
    if info.family is not None:
        job.stage = "loading weights"
        with _weight_progress(job):
            parts = load_family(
                info.path,
                info.family,
                weight_files=info.weight_files,
                dtype=torch_dtype(placement.dtype),
                device_map=_family_device_map(placement),
                quantize=request.quantize,
            )
        model, tokenizer, native_format = parts.model, parts.tokenizer, parts.prompt_format
        placement.quant_bits = _quant_bits(model)
        finish_head(model, request, placement, None)
    else:
        job.stage = "loading tokenizer"
        tokenizer = load_tokenizer(info, request.trust_remote_code)
        job.check_cancelled()
        layout = stored_layout(info)
        if layout is not None:
            model = load_quantized_weights(info, placement, request, layout, job)
        else:
            if placement.mode == "sharded":
                placement.device_map = plan_generic_shards(info, placement, request.trust_remote_code)
            job.stage = "loading weights"
            with _weight_progress(job):
                model = load_weights(info, placement, request.trust_remote_code)
            if request.quantize:
                job.stage = f"quantizing to int{request.quantize}"
                quantize_loaded(model, request)
        placement.quant_bits = _quant_bits(model)
        finish_head(model, request, placement, info.dtype)
        native_format = None
    use_float_kernels(model)
    adapter = attach_requested_adapter(model, request, job)
    fuse_decode_steps(model)
    stop_ids = formats.eos_ids(getattr(model, "generation_config", None))  # e.g. Llama 3's <|eot_id|>
    prompt_format = choose_format(tokenizer, native_format, request.prompt_mode, stop_ids)
    placement.summary = describe_layout(model, placement)
    return LoadedModel(
        model, tokenizer, prompt_format, describe(request, info, placement), native_format, stop_ids, request, adapter
    )


def fuse_decode_steps(model: Any) -> None:
    from ..quant.decode_step import enable

    enable(model)


def finish_head(model: Any, request: LoadRequest, placement: Placement, stored_dtype: str | None) -> None:
    """A quantized model's float head on the CPU: int8 (a quantized folder's already is, from its
    stored rows), else with --float-head in the checkpoint's ``stored_dtype`` when that is 16-bit."""
    from ..quant.half_head import keep_head_stored
    from .quantize import quantize_head

    on_cpu = placement.device_map == "cpu"
    if request.float_head or not on_cpu or not quantize_head(model, torch_dtype(placement.dtype)):
        keep_head_stored(model, stored_dtype)


def use_float_kernels(model: Any) -> None:
    from ..cpu.float_linear import use_kernels  # torch is imported only once a model loads

    use_kernels(model)


def refuse_adapter_folder(path: Path) -> None:
    """An adapter is not a model: say how to use it instead of what files it lacks."""
    from .adapters import AdapterError, inspect_adapter, looks_like_adapter

    if looks_like_adapter(path):
        info = inspect_adapter(path)
        raise AdapterError(
            f"{path.name} is an adapter ({info.detail}) for {info.base or 'an unrecorded base'}: "
            f"load the base model with --adapter {path}, or /adapter {path} once it is loaded"
        )


def attach_requested_adapter(model: Any, request: LoadRequest, job: LoadJob):
    if request.adapter is None:
        return None
    from .adapters import attach_adapter

    job.stage = "applying the adapter"
    return attach_adapter(model, request.adapter, request.merge_adapter)


def stored_layout(info: CheckpointInfo):
    """The layout of a checkpoint ``glmrepl quantize`` wrote, or None for any other."""
    from .quantized_folder import read_layout

    return read_layout(info.path)


def load_quantized_weights(info: CheckpointInfo, placement: Placement, request: LoadRequest, layout, job: LoadJob):
    from .quantized_folder import load_quantized

    job.stage = f"loading int{layout.bits} weights"
    return load_quantized(info, placement, request, layout)


def quantize_loaded(model: Any, request: LoadRequest) -> None:
    from .quantize import quantize_model

    assert request.quantize is not None  # called only when --quantize was given
    quantize_model(model, request.quantize, request.group_size)


def _quant_bits(model: Any) -> int:
    from ..quant.layers import model_bits  # torch is imported only once a model loads

    return model_bits(model)


def placement_for(request: LoadRequest, info: CheckpointInfo) -> Placement:
    """The placement for a load, sized from the checkpoint's headers (nothing loaded yet)."""
    needed = weights_bytes_at(
        info.param_count, info.weight_bytes, info.dtype, sizing_dtype(request.mode, request.dtype)
    )
    return plan_placement(
        request.mode,
        request.dtype,
        info.dtype,
        request.gpu,
        needed_bytes=needed,
        gpus=request.gpus,
        max_gpu_memory=request.max_gpu_memory,
        offload=request.offload,
        quantized=bool(request.quantize)
        or stored_layout(info) is not None
        or bool(info.config.get("quantization_bit")),
    )


def plan_generic_shards(info: CheckpointInfo, placement: Placement, trust_remote_code: bool) -> dict:
    """Plan the split on an empty (meta-device) copy of the model, before any weight is read."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..devices.placement import plan_shards

    config = AutoConfig.from_pretrained(str(info.path), local_files_only=True, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    empty.tie_weights()  # a tied head shares the embeddings' tensor: plan it once
    return plan_shards(empty, placement.budgets, torch_dtype(placement.dtype), placement.offload).device_map


def _family_device_map(placement: Placement):
    """Native families build their own empty model; the sharded plan is made on it."""
    if placement.mode != "sharded":
        return placement.device_map

    def plan(empty_model):
        from ..devices.placement import plan_shards

        placement.device_map = plan_shards(
            empty_model, placement.budgets, torch_dtype(placement.dtype), placement.offload
        ).device_map
        return placement.device_map

    return plan


def describe_layout(model: Any, placement: Placement) -> str:
    if placement.mode == "sharded":
        from ..devices.placement import summarize

        return summarize(model, placement.device_map)
    return f"{placement.device_map}: all layers"


def quiet_transformers() -> None:
    """Keep transformers' advice (aimed at library users) off the chat screen.

    Its warnings would be printed over the prompt from a background thread;
    glmrepl reports what matters itself (context budget, load errors).
    """
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def load_tokenizer(info: CheckpointInfo, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(info.path), local_files_only=True, trust_remote_code=trust_remote_code)


def load_weights(info: CheckpointInfo, placement: Placement, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(info.path),
        dtype=torch_dtype(placement.dtype),
        device_map=placement.device_map,
        local_files_only=True,
        trust_remote_code=trust_remote_code,
        use_safetensors=info.weights_format == "safetensors",
    )
    model.eval()
    return model


def describe(request: LoadRequest, info: CheckpointInfo, placement: Placement) -> ModelInfo:
    family = info.family
    return ModelInfo(
        name=request.name,
        path=info.path,
        architecture=info.architecture,
        family=family.family if family else None,
        family_reason=family.reason if family else None,
        placement=placement,
        context_length=info.context_length,
        param_count=info.param_count,
        checkpoint_defaults=read_generation_defaults(info.path),
    )


def read_generation_defaults(path: Path) -> dict:
    """Sampling values the checkpoint's authors recommend (generation_config.json), if any."""
    try:
        data = json.loads((Path(path) / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    keys = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
    return {k: data[k] for k in keys if k in data and data[k] is not None}


def choose_format(tokenizer: Any, native_format: Any, mode: str | None, extra_stop_ids: list[int] | None = None):
    """The prompt format for a chat/complete choice (None: the checkpoint's natural one)."""
    if mode == "complete":
        return formats.CompletionFormat(tokenizer, extra_stop_ids)
    if native_format is not None:
        return native_format
    if mode == "chat" and not getattr(tokenizer, "chat_template", None):
        raise GlmreplError(
            "this checkpoint has no chat template, so it can only continue text", Hint("mode", "complete")
        )
    return formats.format_for(tokenizer, mode, extra_stop_ids)


class _weight_progress:
    """Report weight-loading progress on the job, and stop the load on cancel.

    transformers reports its loading loops through a tqdm hook; wrapping the
    iterable lets us update the job and raise LoadCancelled between tensors.
    """

    def __init__(self, job: LoadJob):
        self.job = job

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._previous = hf_logging.set_tqdm_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.set_tqdm_hook(self._previous)
        self.job.fraction = None

    def _hook(self, factory, args, kwargs):
        iterable = args[0] if args else kwargs.get("iterable")
        total = kwargs.get("total") or (len(iterable) if hasattr(iterable, "__len__") else None)
        return _ProgressIterable(iterable, total, self.job)


class _ProgressIterable:
    def __init__(self, iterable, total, job: LoadJob):
        self.iterable, self.total, self.job, self.count = iterable, total, job, 0

    def __iter__(self):
        for item in self.iterable if self.iterable is not None else ():
            self.job.check_cancelled()
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.count += n
        if self.total:
            self.job.fraction = min(1.0, self.count / self.total)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __getattr__(self, name):  # close(), set_postfix(), refresh() ...: nothing to do
        return lambda *args, **kwargs: None
