"""A quantized model's output head in int8 on the CPU: the default (``--float-head`` keeps it float).

Once the decoder's linears are int4, the float head is most of what a token reads: Qwen2-0.5B's
tied 151936 x 896 head is 272 MB in bfloat16 against about 200 MB for all 24 int4 layers. As
llama.cpp's Q4_0 files keep theirs in 8 bits (Q8_0), the head is quantized here to int8 in
groups of 32 columns when the model loads, a block of rows at a time (no float32 copy of the
whole head is made). A tied embedding table then reads its rows from the same bytes, dequantizing
only the rows looked up, and the 16-bit table is freed: the vocabulary is held once, in 8 bits.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .layers import QuantizedLinear, quantize_weight, scaled

HEAD_BITS = 8
HEAD_GROUP = 32
_ROWS_AT_ONCE = 1024  # rows quantized together: a few MB of float32 temporaries at a time


class Int8Embedding(nn.Module):
    """Embeddings looked up in an int8 head's rows: each row looked up times its group scales."""

    head: QuantizedLinear

    def __init__(self, head: QuantizedLinear, dtype: torch.dtype, padding_idx: int | None):
        super().__init__()
        # The head owns the tensors; a plain attribute keeps them out of this module's parameters.
        object.__setattr__(self, "head", head)
        self.dtype, self.padding_idx = dtype, padding_idx
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    @property
    def weight(self) -> torch.Tensor:
        """An empty tensor of the rows' device and type, for code that asks the embeddings where
        inputs go and what type the model computes in (the values live in the head)."""
        return torch.empty(0, dtype=self.dtype, device=self.head.weight.device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = ids.reshape(-1)
        values = self.head.weight[rows].to(self.dtype)
        rows_scale = self.head.weight_scale[rows].to(self.dtype)
        return scaled(values, rows_scale, HEAD_GROUP).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of the int8 head"


def quantized_head(weight: Any) -> QuantizedLinear:
    """An int8 head of a float [vocabulary, hidden] weight, quantized a block of rows at a time:
    a tensor, or anything with its ``shape`` whose ``weight[a:b]`` gives those rows (a table
    still in its file, models/tensor_file.py)."""
    rows, columns = weight.shape
    layer = QuantizedLinear(columns, rows, HEAD_BITS, bias=False, dtype=torch.float32, group_size=HEAD_GROUP)
    packed = torch.empty(rows, columns, dtype=torch.int8)
    scale = torch.empty(rows, columns // HEAD_GROUP, dtype=layer.weight_scale.dtype)
    for start in range(0, rows, _ROWS_AT_ONCE):
        block = slice(start, start + _ROWS_AT_ONCE)
        packed[block], scale[block] = quantize_weight(weight[block].float(), HEAD_BITS, HEAD_GROUP)
    layer.weight.data, layer.weight_scale.data = packed, scale
    return layer
