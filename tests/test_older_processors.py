"""The kernels built for processors without AVX-512 (AVX2 only) and without AVX at all give
torch's products and transformers' decoding steps: the instructions this machine has are not
the only ones tested (the build targets the processor it runs on, -march=native)."""

from __future__ import annotations

import ctypes
import subprocess

import pytest
import torch
import torch.nn.functional as F
from test_decode_step import PROMPT, batch_logits, decode, plain, tiny

from glmrepl.engine.cpu import kernels as cpu_kernels
from glmrepl.engine.cpu.machine import compiler_command
from glmrepl.engine.quant import decode_step

# AVX2 and FMA without AVX-512; and x86-64's baseline, whose loops are the portable ones.
TARGETS = {"avx2": "-march=haswell", "portable": "-march=x86-64"}


@pytest.fixture(scope="module", params=sorted(TARGETS))
def older_kernels(request, tmp_path_factory):
    """The kernels' own source built for an older processor, declared as the loader declares it."""
    folder = tmp_path_factory.mktemp(request.param)
    source, built = folder / "kernels.cpp", folder / "kernels.so"
    source.write_text(cpu_kernels._SOURCE, encoding="utf-8")
    flags = [TARGETS[request.param] if flag == "-march=native" else flag for flag in cpu_kernels._FLAGS]
    subprocess.run([compiler_command(), *flags, str(source), "-o", str(built)], check=True, timeout=300)
    lib = ctypes.CDLL(str(built))
    cpu_kernels.declare(lib)
    return lib


@pytest.fixture
def use_older_kernels(older_kernels, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "library", lambda: older_kernels)
    return older_kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_float_products_equal_torchs(older_kernels, dtype, rows):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(70, 200, generator=generator).to(dtype)  # row and column counts off the tiles
    bias = torch.randn(70, generator=generator).to(dtype)
    x = torch.randn(rows, 200, generator=generator)
    product = cpu_kernels.float_gemv if rows == 1 else cpu_kernels.float_gemm
    ours = product(older_kernels, weight, x[0] if rows == 1 else x, bias, 2)
    theirs = F.linear(x, weight.float(), bias.float())
    assert torch.allclose(ours, theirs[0] if rows == 1 else theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [0, 32, 128])  # one scale a row (blocks of 128), or per group
def test_integer_products_equal_dequantized_products(older_kernels, bits, group):
    from rounding import activation_block, rounding_bound

    from glmrepl.engine.quant.layers import QuantizedLinear

    torch.manual_seed(bits + group)
    layer = QuantizedLinear.from_linear(torch.nn.Linear(512, 70, bias=False), bits, group)
    weight, x = layer.dequantized(torch.float32), torch.randn(512)
    product = cpu_kernels.int8_gemv if bits == 8 else cpu_kernels.int4_gemv
    scale = layer.weight_scale.float()  # float16 needs F16C, which x86-64 lacks (torch then computes)
    ours = product(older_kernels, layer.weight, x, scale, group or 512, 2)
    theirs = F.linear(x, weight)
    bound = rounding_bound(x, weight, activation_block(group, 512))
    assert ((ours - theirs).abs() <= bound + 1e-5 * theirs.abs() + 1e-5).all()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [0, 32])
def test_rows_dequantized_for_prompts_equal_torchs(older_kernels, bits, group):
    from glmrepl.engine.quant.layers import QuantizedLinear

    torch.manual_seed(bits + group)
    layer = QuantizedLinear.from_linear(torch.nn.Linear(96, 40, bias=False), bits, group)
    scale = layer.weight_scale.float()
    out = torch.full((13, 96), float("nan"))
    assert cpu_kernels.dequantize_rows(older_kernels, layer.weight, scale, bits, group or 96, 20, out, 2)
    assert torch.equal(out, layer.dequantized(torch.float32)[20:33])


@pytest.mark.parametrize("bits", [8, 4])
def test_prompts_of_per_row_layers_dequantize_without_vnni(use_older_kernels, bits):
    """The integer prompt kernel needs AVX512-VNNI: these builds decline it, and a per-row
    layer's prompt is the product of its dequantized rows, as before it existed."""
    from glmrepl.engine.quant.layers import QuantizedLinear

    torch.manual_seed(bits)
    layer = QuantizedLinear.from_linear(torch.nn.Linear(256, 40), bits, 0)
    x = torch.randn(6, 256)
    assert cpu_kernels.prompt_gemm(use_older_kernels, layer.weight, layer.weight_scale, bits, x, 2) is None
    assert torch.allclose(layer(x), F.linear(x, layer.dequantized(), layer.bias), atol=1e-5, rtol=0)


def test_fused_steps_equal_transformers_steps(use_older_kernels, steps_taken):
    model = tiny("qwen2")
    assert decode_step.enable(model)
    fused, _ = decode(model.forward)
    assert steps_taken["n"] == 10
    reference, _ = decode(plain(model))
    assert torch.allclose(fused, reference, atol=2e-5, rtol=0)


def test_fused_batch_steps_equal_transformers_steps(use_older_kernels, batch_steps_taken):
    model = tiny("llama")
    prompts = [PROMPT, [9, 8, 7], PROMPT[:3]]
    decode_step.enable(model)
    with decode_step.transformers_steps(model):
        reference_replies, reference = batch_logits(model, prompts)
    replies, fused = batch_logits(model, prompts)
    assert batch_steps_taken["n"] == len(fused)
    assert replies == reference_replies
    for ours, theirs in zip(fused, reference):
        assert torch.allclose(ours, theirs, atol=2e-5, rtol=0)
