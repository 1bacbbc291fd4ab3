"""Device modes: where a model's weights live and in which precision.

``cpu`` keeps float32, or bfloat16 when asked, or for ``auto`` when the
processor computes bfloat16 natively and the checkpoint is stored in 16 bits
and not quantized
(glmrepl.engine.cpu.machine); half precision matmuls are not implemented for CPU
tensors. ``gpu`` is float16 on one CUDA device (bfloat16
when the checkpoint is stored so and the GPU supports it). ``sharded`` splits
layers across GPUs with accelerate. ``auto`` picks for the machine, and says why.
"""

from __future__ import annotations

from typing import Any

from ...common.units import human_bytes
from ..errors import DeviceError, Hint, first_line
from ..status import Placement  # noqa: F401 (re-exported: the devices code makes and moves them)

MODES = ("cpu", "gpu", "sharded", "auto")
DTYPES = ("auto", "float32", "bfloat16", "float16")


# Headroom kept free on each GPU for activations and the KV cache.
GPU_HEADROOM = 0.9


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan_placement(
    mode: str,
    dtype: str = "auto",
    stored_dtype: str | None = None,
    gpu: int = 0,
    *,
    needed_bytes: int | None = None,
    gpus: list[int] | None = None,
    max_gpu_memory: str | None = None,
    offload: bool = False,
    quantized: bool = False,
) -> Placement:
    """Resolve a requested mode and dtype into a placement, or raise DeviceError.

    ``needed_bytes`` (the weights at the target precision) lets ``auto``
    choose and lets ``gpu`` refuse a model that cannot fit, with figures.
    """
    if mode not in MODES:
        raise DeviceError(f"unknown device mode {mode!r}: choose one of {', '.join(MODES)}")
    if dtype not in DTYPES:
        raise DeviceError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    count = cuda_device_count()
    if mode == "auto":
        mode, reason = _choose_mode(count, gpu, gpus, needed_bytes, max_gpu_memory)
        if count == 0 and not (_torch_has_cuda() or gpu or gpus or max_gpu_memory):
            reason = ""  # a CPU-only torch with no GPU option given: the CPU is no surprise, say nothing
        if mode == "cpu" and dtype == "float16":  # asked for the GPU's precision; the CPU's is the closest
            dtype, reason = "float32", "; ".join(filter(None, (reason, "float16 is GPU-only, so float32")))
    else:
        reason = ""
    if mode == "cpu":
        cpu_dtype, why = _cpu_dtype(dtype, stored_dtype, quantized)
        return Placement("cpu", cpu_dtype, "cpu", "; ".join(part for part in (reason, why) if part))
    if count == 0:
        raise DeviceError(f"{mode} mode needs a CUDA GPU and torch sees none on this machine", Hint("device", "cpu"))
    gpu_dtype = _gpu_dtype(dtype, stored_dtype)
    if mode == "gpu":
        _check_gpu_exists(gpu, count)
        _check_fits_one_gpu(gpu, needed_bytes, count)
        return Placement("gpu", gpu_dtype, f"cuda:{gpu}", reason)
    chosen = gpus if gpus is not None else list(range(count))
    for index in chosen:
        _check_gpu_exists(index, count)
    budgets = gpu_budgets(chosen, max_gpu_memory)
    return Placement("sharded", gpu_dtype, "plan", reason, budgets, offload)


def _torch_has_cuda() -> bool:
    """Whether this torch was built for a GPU (then finding none is worth saying)."""
    import torch

    return bool(torch.version.cuda or getattr(torch.version, "hip", None))


def _choose_mode(count: int, gpu: int, gpus, needed_bytes: int | None, max_gpu_memory) -> tuple[str, str]:
    if count == 0:
        return "cpu", "no CUDA device found"
    if needed_bytes is None:
        return "gpu", f"{count} CUDA device(s) found"
    one = gpu_budgets([gpu], max_gpu_memory)[gpu]
    if needed_bytes <= one:
        return "gpu", f"{human_bytes(needed_bytes)} fits on GPU {gpu} ({human_bytes(one)} usable)"
    every = gpu_budgets(gpus if gpus is not None else list(range(count)), max_gpu_memory)
    if needed_bytes <= sum(every.values()):
        return "sharded", f"{human_bytes(needed_bytes)} needs {len(every)} GPUs together"
    return "cpu", f"{human_bytes(needed_bytes)} does not fit the GPUs ({human_bytes(sum(every.values()))} usable)"


def _check_gpu_exists(index: int, count: int) -> None:
    if not 0 <= index < count:
        raise DeviceError(f"GPU {index} does not exist: this machine has {count} GPU(s) (0-{count - 1})")


def _check_fits_one_gpu(gpu: int, needed_bytes: int | None, count: int) -> None:
    if needed_bytes is None:
        return
    usable = gpu_budgets([gpu], None)[gpu]
    if needed_bytes <= usable:
        return
    total = sum(gpu_budgets(list(range(count)), None).values())
    hint = (
        Hint("device", "sharded", "{} across all GPUs would fit")
        if needed_bytes <= total
        else Hint("device", "cpu", "use {} (or sharded with offload)")
    )
    raise DeviceError(
        f"the model needs {human_bytes(needed_bytes)} but GPU {gpu} has {human_bytes(usable)} usable", hint
    )


def gpu_budgets(gpus: list[int], max_gpu_memory: str | None) -> dict[int, int]:
    """Bytes each GPU may hold: the user's --max-gpu-memory, else most of what is free now."""
    from .placement import parse_gpu_memory

    try:
        given = parse_gpu_memory(max_gpu_memory, gpus)
    except ValueError as error:
        raise DeviceError(str(error)) from None
    if given is not None:
        return {gpu: given.get(gpu, 0) for gpu in gpus}
    import torch

    return {gpu: int(torch.cuda.mem_get_info(gpu)[0] * GPU_HEADROOM) for gpu in gpus}


def sizing_dtype(mode: str, dtype: str) -> str:
    """The precision to size a model for before its placement is resolved."""
    if dtype in ("float32", "bfloat16", "float16"):
        return dtype
    return "float32" if mode == "cpu" else "float16"


def weights_bytes_at(param_count: int | None, weight_bytes: int, stored_dtype: str | None, dtype: str) -> int:
    """What the weights will take at ``dtype`` (from the parameter count when known)."""
    size = {"float32": 4, "bfloat16": 2, "float16": 2}
    if param_count:
        return param_count * size.get(dtype, 4)
    return int(weight_bytes * size.get(dtype, 4) / size.get(stored_dtype or "float32", 4))


def _cpu_dtype(dtype: str, stored_dtype: str | None, quantized: bool = False) -> tuple[str, str]:
    """(dtype, why it was chosen: only for auto)."""
    if dtype == "float16":
        raise DeviceError(
            "float16 is not supported on CPU (half-precision matmuls are GPU-only): use float32 or bfloat16"
        )
    if dtype != "auto":
        return dtype, ""
    if quantized:  # the weights are int8/int4 whatever the dtype: it is the activations' type
        return "float32", "float32: the weights are quantized, and their kernels decode whole layers in float32"
    if stored_dtype is None:  # nothing known of the checkpoint: float32, nothing worth saying
        return "float32", ""
    from ..cpu.machine import auto_dtype

    chosen, why = auto_dtype(stored_dtype)
    return chosen, f"{chosen}: {why}"


def _gpu_dtype(dtype: str, stored_dtype: str | None) -> str:
    if dtype != "auto":
        return dtype
    import torch

    if stored_dtype == "bfloat16" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float16"


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resident_memory_bytes() -> int | None:
    """This process's resident set size now (not the peak), where the OS tells it."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            pages = int(statm.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def memory_report(model: Any = None) -> list[tuple[str, str]]:
    """(device, figures) lines for /device: the model's weights on each device, the process's
    resident memory, each GPU's allocated/free memory."""
    lines = []
    weights = weights_by_device(model) if model is not None else {}
    rss = resident_memory_bytes()
    if rss is not None or "cpu" in weights:
        held = f"weights {human_bytes(weights['cpu'])}" if "cpu" in weights else None
        whole = f"the process {human_bytes(rss)} resident" if rss is not None else None
        lines.append(("cpu", "; ".join(filter(None, (held, whole)))))
    import sys

    torch = sys.modules.get("torch")  # only report GPUs once torch is in use anyway
    if torch is not None and torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            used = torch.cuda.memory_allocated(index)
            held = f"weights {human_bytes(weights[f'cuda:{index}'])}; " if f"cuda:{index}" in weights else ""
            lines.append(
                (
                    f"cuda:{index}",
                    f"{held}{human_bytes(used)} allocated, {human_bytes(free)} free of {human_bytes(total)}",
                )
            )
    return lines


def weights_by_device(model: Any) -> dict[str, int]:
    """Bytes of the model's parameters and buffers on each device ("cpu", "cuda:0"...)."""
    totals: dict[str, int] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        device = str(tensor.device) if tensor.device.type != "cuda" else f"cuda:{tensor.device.index or 0}"
        totals[device] = totals.get(device, 0) + tensor.numel() * tensor.element_size()
    return totals


def place_model(model: Any, placement: Placement) -> None:
    """Put an in-memory model where ``placement`` says, without reading the disk.

    Leaving a sharded placement first removes accelerate's hooks so the model
    is one plain module again; entering one plans the split on the model's
    real sizes and dispatches it.
    """
    _undispatch(model)
    if placement.mode != "sharded":
        model.to(device=placement.device_map, dtype=torch_dtype(placement.dtype))
        placement.summary = f"{placement.device_map}: all layers"
        return
    from accelerate import dispatch_model

    from .placement import plan_shards, summarize

    model.to(dtype=torch_dtype(placement.dtype))
    plan = plan_shards(model, placement.budgets, torch_dtype(placement.dtype), placement.offload)
    placement.device_map = plan.device_map
    dispatch_model(model, device_map=plan.device_map, main_device=f"cuda:{next(iter(placement.budgets))}")
    placement.summary = summarize(model, plan.device_map)


def _undispatch(model: Any) -> None:
    if getattr(model, "hf_device_map", None) is None:
        return
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(model, recurse=True)
    model.hf_device_map = None


def move_model(model: Any, before: Placement, after: Placement) -> None:
    """Move in memory; on any failure (out of memory above all) go back to ``before``."""
    try:
        place_model(model, after)
    except Exception as error:
        try:
            place_model(model, before)
        finally:
            _release_cuda_cache()
        if isinstance(error, DeviceError):
            raise
        reason = "out of memory" if type(error).__name__ == "OutOfMemoryError" else first_line(error)
        raise DeviceError(
            f"could not move the model to {after.describe()} ({reason}); it stays on {before.describe()}"
        ) from None


def _release_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
