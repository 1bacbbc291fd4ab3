"""Decoding one token of a Llama-style model on the CPU with one C++ call per layer.

transformers' decoder layer is some thirty torch operations around its seven products,
each a few microseconds of dispatch on vectors of a few thousand values. Once the
products are int4 that overhead was a third of a 0.5B model's step on two cores (and
the gap between glmrepl and llama.cpp). ``decode_layer.cpp`` runs a whole layer for one
token; this module decides when it may, and keeps transformers' cache as it would be.

It takes a step only when transformers would compute exactly that step the plain way:
one new token of one sequence, positions following the cache, a DynamicCache of full
attention layers, float32 activations on the CPU, and layers of the known shape
(Llama, Qwen2, Mistral: RMSNorm, rotary attention with grouped key/value heads, a SiLU
gate) whose linears are float, int8 or int4 layers glmrepl's kernels read. Anything else
(a prompt, an adapter, hooks, a sliding window reached, output of attentions) goes
through transformers' forward unchanged. The cache keeps transformers' layout: each
layer's keys and values are views of a buffer with room for the next positions, so
everything that reads, crops, copies or extends the cache sees plain tensors.

A step of transformers' continuous batch (``batch_step``) runs fused the same way when it
holds at most MAX_ROWS tokens (each sequence's next one, or a few of a prompt's) and the
layers' linears are float: ``glm_decode_rows`` computes every row of a layer in one call,
writes their keys and values into the paged cache's slots and reads each row's own slots
back for its attention. Around products of a few rows, transformers' eager operations and
the paged cache's gather were a third of such a step (benchmarks/README.md, Serving).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..cpu import kernels as cpu_kernels
from ..cpu.float_linear import KernelLinear
from .layers import QuantizedLinear

ARCHITECTURES = {"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"}
LAYERS = {"LlamaDecoderLayer", "Qwen2DecoderLayer", "MistralDecoderLayer"}
NORMS = {"LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm"}
# Room added to a layer's cache buffer when it fills: a copy of the cache every this many tokens.
GROWTH = 256
# The most tokens a step of the batch computes fused: up to about this many the few-token
# kernel reads the weights once and beats the matrix product (more: transformers' forward).
MAX_ROWS = 32
_TYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class _Linear(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int32),
        ("w_type", ctypes.c_int32),
        ("s_type", ctypes.c_int32),
        ("unused", ctypes.c_int32),
        ("weight", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("rows", ctypes.c_int64),
        ("stored", ctypes.c_int64),
        ("group", ctypes.c_int64),
    ]


_PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


class _Layer(ctypes.Structure):
    _fields_ = [(name, _Linear) for name in _PROJECTIONS] + [  # type: ignore[assignment]
        ("norm_in", ctypes.c_void_p),
        ("norm_post", ctypes.c_void_p),
        ("eps_in", ctypes.c_float),
        ("eps_post", ctypes.c_float),
        ("scaling", ctypes.c_float),
        ("unused", ctypes.c_float),
        ("hidden", ctypes.c_int64),
        ("heads", ctypes.c_int64),
        ("kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("intermediate", ctypes.c_int64),
    ]


class Unsupported(Exception):
    """The model (as it is now) is not one the fused step computes."""


def enable(model: nn.Module) -> bool:
    """Let single-token CPU steps of this model run fused; False when its kind cannot.

    The plan is made at the first step and dropped by ``forget`` whenever the model changes."""
    if type(model).__name__ not in ARCHITECTURES or "forward" in vars(model):
        return False
    original = type(model).forward.__get__(model)

    @functools.wraps(type(model).forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        output = _fused_step(model, args, kwargs)
        return output if output is not None else original(*args, **kwargs)

    model.forward = forward
    return True


@contextlib.contextmanager
def transformers_steps(model: nn.Module) -> Iterator[None]:
    """Every step through transformers' own forward meanwhile (benchmarks' raw side, tests)."""
    fused = vars(model).pop("forward", None)
    try:
        yield
    finally:
        if fused is not None:
            model.forward = fused


def forget(model: Any) -> None:
    """The model is about to change (new layers, an adapter, another device): plan again."""
    if isinstance(model, nn.Module):
        vars(model).pop("_glmrepl_decode_plan", None)


def _fused_step(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    ids = kwargs.get("input_ids")
    if args or ids is None or not _plain_step(kwargs) or torch.is_grad_enabled():
        return None
    if "read_index" in kwargs:  # a step of transformers' continuous batch
        plan = _plan_for(model) if ids.dim() == 2 and 0 < ids.shape[1] <= MAX_ROWS else None
        views = plan.batch_views(cache, kwargs) if plan is not None else None
        return plan.batch_step(ids, kwargs, views) if plan is not None and views is not None else None
    if ids.shape != (1, 1):
        return None
    plan = _plan_for(model)
    if plan is None or not plan.accepts(cache, kwargs):
        return None
    return plan.step(ids, cache)


def _plain_step(kwargs: dict) -> bool:
    """No inputs, outputs or options the fused step does not give."""
    unusual = ("inputs_embeds", "labels", "output_attentions", "output_hidden_states", "token_type_ids")
    return not any(kwargs.get(key) is not None and kwargs.get(key) is not False for key in unusual)


def _plan_for(model: nn.Module) -> DecodePlan | None:
    plan: Any = vars(model).get("_glmrepl_decode_plan")
    if plan is None:
        try:
            plan = DecodePlan(model)
        except Unsupported:
            plan = False
        vars(model)["_glmrepl_decode_plan"] = plan  # (False: asked once per change, not per token)
    return plan or None


class DecodePlan:
    """The layers' tensors as the C++ step reads them (references kept, so pointers stay valid)."""

    def __init__(self, model: Any):
        body: Any = getattr(model, "model", None)
        layers = list(getattr(body, "layers", ()))
        if not layers or getattr(model.config, "hidden_act", None) != "silu" or _has_hooks(model):
            raise Unsupported
        self.model, self.body = model, body
        self.layers = [self._layer(layer) for layer in layers]
        self.windows = [_window(layer.self_attn, model.config) for layer in layers]
        self.kv_shape = (int(self.layers[0][0].kv_heads), int(self.layers[0][0].head_dim))
        # Batched steps multiply few rows by float weights only (the int kernels read one token).
        self.batchable = all(getattr(struct, name).kind == 0 for struct, _ in self.layers for name in _PROJECTIONS)

    def _layer(self, layer: Any) -> tuple[_Layer, list]:
        attn: Any
        mlp: Any
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if type(layer).__name__ not in LAYERS or attn is None or mlp is None:
            raise Unsupported
        keep: list = []
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        if any(type(n).__name__ not in NORMS or not _float32_cpu(n.weight) for n in norms):
            raise Unsupported
        modules = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        linears = [_linear(module, keep) for module in modules]
        config = attn.config
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, attn.head_dim
        if heads % kv_heads or head_dim % 2 or attn.q_proj.out_features != heads * head_dim:
            raise Unsupported
        keep += norms
        struct = _Layer(
            *linears,
            norm_in=norms[0].weight.data_ptr(),
            norm_post=norms[1].weight.data_ptr(),
            eps_in=norms[0].variance_epsilon,
            eps_post=norms[1].variance_epsilon,
            scaling=attn.scaling,
            hidden=config.hidden_size,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate=mlp.gate_proj.out_features,
        )
        return struct, keep

    def accepts(self, cache: Any, kwargs: dict) -> bool:
        """A DynamicCache of full-attention layers, the step at the next position."""
        from transformers.cache_utils import DynamicCache, DynamicLayer

        if type(cache) is not DynamicCache or len(cache.layers) != len(self.layers):
            return False
        layers: Any = cache.layers
        if any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
            return False
        first = layers[0].keys
        if first.dtype != torch.float32 or first.dim() != 4 or tuple(first.shape[1::2]) != self.kv_shape:
            return False
        length = first.shape[-2]
        if length == 0 or any(window is not None and length + 1 > window for window in self.windows):
            return False
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if mask is not None and (mask.shape != (1, length + 1) or not bool(mask.all())):
            return False  # padding or a mask of another shape: transformers' own path
        return positions is None or (positions.numel() == 1 and int(positions) == length)

    def step(self, ids: torch.Tensor, cache: Any) -> Any:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        lib = cpu_kernels.library()
        x = self.body.embed_tokens(ids)
        if lib is None or x.dtype != torch.float32 or x.device.type != "cpu":
            return None
        x = x.contiguous()
        length = cache.layers[0].keys.shape[-2]
        cos, sin = (t.contiguous() for t in self.body.rotary_emb(x, torch.tensor([[length]])))
        threads = torch.get_num_threads()
        for (struct, _), layer in zip(self.layers, cache.layers):
            keys, values, capacity = self._room(layer, length)
            failed = lib.glm_decode_layer(
                ctypes.addressof(struct), x.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                keys.data_ptr(), values.data_ptr(), capacity, length, threads,
            )  # fmt: skip
            if failed:
                raise Unsupported("a kernel could not read a layer's types")
            layer.keys, layer.values = keys[:, :, : length + 1], values[:, :, : length + 1]
        logits = self.model.lm_head(self.body.norm(x))
        return CausalLMOutputWithPast(logits=logits, cache=cache)

    def batch_views(self, cache: Any, kwargs: dict) -> list[tuple[torch.Tensor, torch.Tensor, int]] | None:
        """Each layer's keys, values and index list in the batch's paged cache, when the step is
        one the fused layers compute: all layers attend fully, the cache holds float32 values
        of the plan's shape. None otherwise."""
        if not self.batchable or any(window is not None for window in self.windows):
            return None
        if type(cache).__name__ != "PagedAttentionCache" or kwargs.get("block_table") is not None:
            return None
        queries, lengths = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
        if queries is None or not isinstance(lengths, dict) or set(lengths) != {"full_attention"}:
            return None
        views = []
        for index in range(len(self.layers)):
            allocator = cache.layer_to_allocator[index]
            keys, values = getattr(allocator, "_kv_token_views", {}).get(index, (None, None))
            if allocator.layer_type != "full_attention" or keys is None or not _float32_cpu(keys):
                return None
            if not _float32_cpu(values) or tuple(keys.shape[1:]) != self.kv_shape:
                return None
            views.append((keys, values, allocator.index))
        return views

    def batch_step(self, ids: torch.Tensor, kwargs: dict, views: list) -> Any:
        """A step of the batch (each sequence's next token, or some of a prompt's): the layers
        in C++, the cache written in place."""
        from transformers.modeling_outputs import CausalLMOutputWithPast

        lib = cpu_kernels.library()
        x = self.body.embed_tokens(ids)
        if lib is None or x.dtype != torch.float32 or x.device.type != "cpu":
            return None
        x = x.contiguous()
        rows = ids.shape[1]
        cos, sin = (t.contiguous() for t in self.body.rotary_emb(x, kwargs["position_ids"]))
        writes = [index.to(torch.int64).contiguous() for index in kwargs["write_index"]]
        # No read list when no sequence has a cached position (whole prompts): they read what they write.
        reads = [
            read.to(torch.int64).contiguous() if read.numel() else write
            for read, write in zip(kwargs["read_index"], writes)
        ]
        begins, ends = _read_ranges(kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]["full_attention"])
        mismatched = begins.numel() != rows or any(write.numel() != rows for write in writes)
        if mismatched or any(int(ends.max()) > read.numel() for read in reads):
            return None  # not the layout this step was written for: transformers' forward
        threads = torch.get_num_threads()
        for (struct, _), (keys, values, slot) in zip(self.layers, views):
            read = reads[slot]
            failed = lib.glm_decode_rows(
                ctypes.addressof(struct), x.data_ptr(), rows, cos.data_ptr(), sin.data_ptr(), keys.data_ptr(),
                values.data_ptr(), writes[slot].data_ptr(), read.data_ptr(), begins.data_ptr(), ends.data_ptr(),
                threads,
            )  # fmt: skip
            if failed:
                raise Unsupported("a kernel could not read a layer's types")
        hidden = self.body.norm(x)
        keep = kwargs.get("logits_to_keep")
        if isinstance(keep, torch.Tensor):
            hidden = hidden[:, keep]
        return CausalLMOutputWithPast(logits=self.model.lm_head(hidden))

    def _room(self, layer: Any, length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The layer's buffers with room for position ``length``, made from its tensors if need be."""
        buffers = getattr(layer, "_glmrepl_buffers", None)
        if buffers is not None:
            keys, values = buffers
            if (
                keys.shape[2] > length
                and layer.keys.data_ptr() == keys.data_ptr()
                and layer.values.data_ptr() == values.data_ptr()
                and layer.keys.shape[2] == length
            ):
                return keys, values, keys.shape[2]
        capacity = length + GROWTH
        keys = layer.keys.new_empty(1, self.kv_shape[0], capacity, self.kv_shape[1])
        values = torch.empty_like(keys)
        keys[:, :, :length] = layer.keys
        values[:, :, :length] = layer.values
        layer._glmrepl_buffers = (keys, values)
        return keys, values, capacity


def _read_ranges(queries: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each token of the step reads in the step's list of cache slots: sequence s has
    tokens queries[s]..queries[s+1] and slots lengths[s]..lengths[s+1] (its cached positions,
    then its new ones), and a token attends to the slots up to its own."""
    queries, lengths = queries.to(torch.int64), lengths.to(torch.int64)
    new = queries[1:] - queries[:-1]
    sequence = torch.repeat_interleave(torch.arange(new.numel()), new)
    within = torch.arange(int(queries[-1])) - queries[sequence]
    begins = lengths[sequence].contiguous()
    ends = (lengths[sequence + 1] - new[sequence] + within + 1).contiguous()
    return begins, ends


def _linear(module: Any, keep: list) -> _Linear:
    """A projection as the C++ step reads it; Unsupported for any other kind of layer."""
    bias = getattr(module, "bias", None)
    if bias is not None and not _float32_cpu(bias):
        raise Unsupported
    keep.append(module)
    bias_pointer = bias.data_ptr() if bias is not None else None
    weight = module.weight
    if weight.device.type != "cpu" or not weight.is_contiguous():
        raise Unsupported
    if type(module) is QuantizedLinear:
        scale = module.weight_scale
        if scale.dtype not in _TYPE_CODES or not scale.is_contiguous():
            raise Unsupported
        kind = 1 if module.bits == 8 else 2
        group = module.group_size or module.in_features
        return _Linear(kind, 0, _TYPE_CODES[scale.dtype], 0, weight.data_ptr(), scale.data_ptr(), bias_pointer,
                       module.out_features, weight.shape[1], group)  # fmt: skip
    if type(module) in (nn.Linear, KernelLinear) and weight.dtype in _TYPE_CODES:
        return _Linear(0, _TYPE_CODES[weight.dtype], 0, 0, weight.data_ptr(), None, bias_pointer,
                       weight.shape[0], weight.shape[1], 0)  # fmt: skip
    raise Unsupported


def _window(attention: Any, config: Any) -> int | None:
    """The positions a layer attends to: Qwen2 says per layer, Mistral in its config (all layers)."""
    if hasattr(attention, "sliding_window"):
        return attention.sliding_window
    return getattr(config, "sliding_window", None)


def _float32_cpu(tensor: torch.Tensor) -> bool:
    return tensor.dtype == torch.float32 and tensor.device.type == "cpu" and tensor.is_contiguous()


def _has_hooks(model: nn.Module) -> bool:
    """accelerate's offloading hooks, PEFT's wrappers or a user's hooks: their forward is the truth."""
    return any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") for m in model.modules())
