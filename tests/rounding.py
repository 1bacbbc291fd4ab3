"""How far the integer kernels may be from a float product: their activations are rounded to
16 bits a block (int_kernels.cpp), each value by at most 1/65534 of its block's largest."""

from __future__ import annotations

# How far a quantized ChatGLM fixture's logits (up to about 3) may be from float products of the
# same dequantized weights once the integer kernels run: their activations are rounded to 16
# bits a block (the prompt's blocks of 1024 values, a decoding step's of 128), about 1e-4 here.
INTEGER_KERNEL_ATOL = 2e-4


def activation_block(group: int, columns: int) -> int:
    """The kernels' activation block: the group when it is 32, 64 or 128 columns, else (one
    group a row) the widest of those that divides the row; 0 for the float loops."""
    if group in (32, 64, 128):
        return group if columns % group == 0 else 0
    if 0 < group < columns:
        return 0
    return next((block for block in (128, 64, 32) if columns % block == 0), 0)


def rounding_bound(x, weight, block: int):
    """The largest error of ``x @ weight.T`` from rounding x to 16 bits in blocks of ``block``
    columns (any x shape; the result has the product's shape)."""
    import torch

    columns = weight.shape[1]
    flat = x.reshape(-1, columns).abs()
    if block == 0:
        return torch.zeros(*x.shape[:-1], weight.shape[0])
    column_blocks = torch.arange(columns) // block
    largest = torch.zeros(flat.shape[0], int(column_blocks.max()) + 1).index_reduce_(1, column_blocks, flat, "amax")
    step = largest[:, column_blocks] / 65534
    return (step @ weight.abs().T).reshape(*x.shape[:-1], weight.shape[0])
