"""ModelManager: load, swap, move and free models; loads run in the background.

Every change to the model (a move, quantize, adapter, format change or swap)
passes through the manager's ``gate``: the scheduler that owns the model
(generation/scheduler.py) runs it as a task on its model thread once the
running replies end, so weights never change under one; a manager no scheduler
serves (``glmrepl quantize``) changes one thing at a time.

The steps of a load live in loading.py. A load never disturbs the current
model unless memory forces it (see the swap policy below): it is built beside
it and swapped in only when complete, so a failed or cancelled load keeps the
old one.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from ..cpu.machine import release_freed_memory
from ..devices.modes import Placement, move_model, plan_placement, sizing_dtype, weights_bytes_at
from ..errors import DeviceError, GlmreplError, Hint, LoadCancelled, ModelLoadError, first_line
from ..protocols import ModelGate
from .checkpoint import inspect_checkpoint
from .loading import LoadedModel, LoadJob, LoadOptions, LoadRequest, ModelInfo, choose_format, load_model  # noqa: F401 (re-exported)

T = TypeVar("T")


class SerialGate:
    """Changes one at a time, for a manager that no scheduler serves."""

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def change(self, work: Callable[[], T], on_wait: Callable[[int], None] | None = None) -> T:
        with self._lock:
            return work()


class ModelManager:
    def __init__(self) -> None:
        self.current: LoadedModel | None = None
        self.job: LoadJob | None = None
        # What belongs to the model as it is (caches, a batch) goes through these on every change.
        self.change_hooks: list[Callable[[], None]] = []
        # Who lets a change happen: the scheduler once a backend serves this manager.
        self.gate: ModelGate = SerialGate()
        self.serial = 0  # counts installed models, so front ends notice a swap
        self._lock = threading.Lock()

    def _change(self, work: Callable[[], T], on_wait: Callable[[int], None] | None = None) -> T:
        """Run a change to the model where its owner runs it (the scheduler's model thread, once
        the running replies end); what belongs to the old state goes first."""

        def change() -> T:
            self._model_changing()
            return work()

        return self.gate.change(change, on_wait)

    def _model_changing(self) -> None:
        if self.current is not None:
            forget_decode_plan(self.current.model)
        for hook in self.change_hooks:
            hook()

    # -- loading -------------------------------------------------------------
    def start_load(self, request: LoadRequest) -> LoadJob:
        """Begin loading in the background; the current model stays usable meanwhile."""
        with self._lock:
            if self.job is not None and not self.job.done.is_set():
                raise GlmreplError(f"already {self.job.status}; wait or press Ctrl-C to cancel it")
            job = self.job = LoadJob(request)
        threading.Thread(target=self._run_job, args=(job,), name="glmrepl-load", daemon=True).start()
        return job

    def load(self, request: LoadRequest) -> LoadedModel:
        """Load synchronously (non-interactive use); raises GlmreplError subclasses."""
        job = self.start_load(request)
        job.wait()
        if job.error:
            raise job.error
        assert self.current is not None  # a load that ended without an error installed its model
        return self.current

    def _run_job(self, job: LoadJob) -> None:
        unloaded = None
        try:
            unloaded = self._make_room(job)
            loaded = load_model(job.request, job)
            job.check_cancelled()
            self._install(loaded)
            job.result = loaded
        except BaseException as error:  # handed to whoever waits on the job
            job.error = error if isinstance(error, GlmreplError) else _as_load_error(error, job.request)
            if unloaded is not None:
                self._restore(unloaded, job)
        finally:
            job.stage = "done"
            job.done.set()
            if job.error:
                free_memory()

    def _make_room(self, job: LoadJob) -> LoadRequest | None:
        """Swap policy: keep the current model while the new one loads when both fit
        (so a failed load changes nothing); otherwise unload it first, and reload it
        if the new load fails. Returns the request to reload with, if it was unloaded."""
        current = self.current
        if current is None or current.request is None:
            return None
        if fits_beside(current, job.request):
            return None
        job.stage = f"unloading {current.info.name} to make room"
        self.unload()
        return current.request

    def _restore(self, request: LoadRequest, job: LoadJob) -> None:
        job.stage = f"reloading {request.name}"
        try:
            self._install(load_model(request))
        except BaseException:  # the user is told no model is loaded; the conversation stays
            self.unload()

    def _install(self, loaded: LoadedModel | None) -> None:
        def install() -> None:
            with self._lock:
                self.current = loaded  # the old model's last reference goes here
                self.serial += 1

        self._change(install)
        free_memory()

    def unload(self) -> None:
        if self.job is not None and self.job.result is self.current:  # the finished load would keep it alive
            self.job.result = None
        self._install(None)

    def reload(self, request: LoadRequest, job: LoadJob | None = None) -> LoadedModel:
        """Load ``request`` on this thread and install it, with no load job for front ends to report
        (a model given back after a comparison made room for another, see generation/comparing.py)."""
        try:
            loaded = load_model(request, job)
        except BaseException as error:
            raise error if isinstance(error, GlmreplError) else _as_load_error(error, request) from None
        self._install(loaded)
        return loaded

    # -- changes to the loaded model -----------------------------------------
    def set_prompt_mode(self, mode: str | None) -> str:
        """Switch between the checkpoint's chat format and plain completion."""

        def choose() -> str:
            loaded = self._require_model()
            loaded.prompt_format = choose_format(loaded.tokenizer, loaded.native_format, mode, loaded.extra_stop_ids)
            if loaded.request is not None:  # a reload brings the same mode back
                loaded.request = replace(loaded.request, prompt_mode=mode)
            return loaded.prompt_format.name

        return self._change(choose)

    def move(
        self, mode: str, dtype: str = "auto", gpu: int | None = None, on_wait: Callable[[int], None] | None = None
    ) -> Placement:
        """Move the loaded model to another placement without reading the disk again.

        The GPU defaults to the one the model was loaded for (``--gpu N``).
        The old placement's memory is given back (hooks removed, caches
        emptied); if the move fails the model returns to where it was.
        """

        def move() -> Placement:
            loaded = self._require_model()
            before = loaded.info.placement
            request = loaded.request or LoadOptions()
            chosen_gpu = request.gpu if gpu is None else gpu
            after = plan_placement(
                mode,
                dtype,
                before.dtype,
                chosen_gpu,
                needed_bytes=_needed_bytes(loaded.model, dtype, mode),
                gpus=request.gpus,
                max_gpu_memory=request.max_gpu_memory,
                offload=request.offload,
            )
            after.quant_bits = before.quant_bits
            move_model(loaded.model, before, after)
            loaded.info.placement = after
            if loaded.request is not None:  # a reload after a failed swap comes back here
                loaded.request = replace(loaded.request, mode=after.mode, dtype=dtype, gpu=chosen_gpu)
            return after

        after = self._change(move, on_wait)
        free_memory()
        return after

    def quantize(
        self, bits: int, on_wait: Callable[[int], None] | None = None, group_size: int | None = None
    ) -> Placement:
        """Quantize the loaded model's linears in place (as ChatGLM's ``model.quantize(bits)``;
        group-wise scales for other models, see quantize_models)."""
        from .quantize import quantize_model, quantize_refusal

        refused = self._quantize_refusal(bits, quantize_refusal)
        if refused is not None:  # said before the model changes: its caches stay
            raise refused

        def quantize() -> Placement:
            loaded = self._require_model()
            refused = self._quantize_refusal(bits, quantize_refusal)
            if refused is not None:
                raise refused
            float_before = not loaded.info.placement.quant_bits
            quantize_model(loaded.model, bits, group_size)
            loaded.info.placement.quant_bits = bits
            if loaded.request is not None and float_before:  # a reload quantizes it the same way
                loaded.request = replace(loaded.request, quantize=bits, group_size=group_size)
            return loaded.info.placement

        placement = self._change(quantize, on_wait)
        free_memory()
        return placement

    def _quantize_refusal(self, bits: int, refusal: Callable[[Any, int], GlmreplError | None]) -> GlmreplError | None:
        loaded = self._require_model()
        if loaded.adapter and loaded.adapter.info.kind == "lora" and not loaded.adapter.merged:
            return GlmreplError("a LoRA adapter is on the layers: take it off, quantize, then put it on again")
        return refusal(loaded.model, bits)

    def set_adapter(self, path, merge: bool = False, on_wait: Callable[[int], None] | None = None):
        """Put an adapter on the loaded model (``path`` None: take it off); the model stays as it
        was when the adapter does not fit. Waits for running replies. Returns the adapter now in use, or None."""
        from .adapters import swap_adapter

        def swap():
            loaded = self._require_model()
            loaded.adapter = swap_adapter(loaded.model, loaded.adapter, path, merge)
            if loaded.request is not None:  # a reload (after a failed swap) brings the same adapter back
                loaded.request = replace(
                    loaded.request,
                    adapter=loaded.adapter.info.path if loaded.adapter else None,
                    merge_adapter=bool(loaded.adapter and loaded.adapter.merged),
                )
            return loaded.adapter

        return self._change(swap, on_wait)

    def _require_model(self) -> LoadedModel:
        if self.current is None:
            raise GlmreplError("no model is loaded", Hint("model", sentence="choose one with {}"))
        return self.current


# A new model may load beside the current one when it takes at most this share
# of the memory available now (the rest is for activations and the allocator).


ROOM_FACTOR = 0.8


def fits_beside(current: LoadedModel, request: LoadRequest) -> bool:
    """The swap policy's test: the other model's weights in ``ROOM_FACTOR`` of the memory free now
    (unknown: assumed to fit)."""
    needed = estimated_bytes(request)
    return needed is None or needed <= available_bytes(current.info.placement) * ROOM_FACTOR


def estimated_bytes(request: LoadRequest) -> int | None:
    """Bytes the request's weights will take, from headers only; None when unknown."""
    try:
        info = inspect_checkpoint(
            request.path, trust_remote_code=request.trust_remote_code, family_override=request.family
        )
    except GlmreplError:
        return None  # the load itself will report the problem, with the old model untouched
    return weights_bytes_at(info.param_count, info.weight_bytes, info.dtype, sizing_dtype(request.mode, request.dtype))


def available_bytes(placement: Placement) -> int:
    """Memory free for a second model where this one lives: RAM, or the GPUs' free memory."""
    if placement.mode == "cpu":
        return memory_available_bytes()
    import torch

    gpus = placement.budgets or {int(str(placement.device_map).split(":")[-1]): 0}
    return sum(torch.cuda.mem_get_info(gpu)[0] for gpu in gpus)


def memory_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux); elsewhere assume there is room."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 62


def _needed_bytes(model: Any, dtype: str, mode: str) -> int:
    """Bytes after a move: float tensors at the target width, quantized ones as they are."""
    width = weights_bytes_at(1, 0, None, sizing_dtype(mode, dtype))
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * (width if t.is_floating_point() else t.element_size()) for t in tensors)


def free_memory() -> None:
    """Return freed tensors' memory: collect cycles, trim the C heap, release CUDA's cache."""
    gc.collect()
    release_freed_memory()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _as_load_error(error: BaseException, request: LoadRequest) -> GlmreplError:
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return DeviceError(
            f"out of memory loading {request.name} in {request.mode} mode",
            Hint("device", "cpu", "try {} or a smaller dtype"),
        )
    if isinstance(error, KeyboardInterrupt):
        return LoadCancelled(f"loading {request.name} was cancelled")
    if "ignore_mismatched_sizes" in str(error):  # transformers' words point at a report it logged
        return ModelLoadError(
            f"could not load {request.name}: a tensor in the weights has another shape than config.json "
            "makes it: config.json is for another model or size; download it again"
        )
    return ModelLoadError(f"could not load {request.name}: {first_line(error)}")


def forget_decode_plan(model: Any) -> None:
    """The fused decode step planned for the model's layers as they were (decode_step)."""
    from ..quant.decode_step import forget

    forget(model)
