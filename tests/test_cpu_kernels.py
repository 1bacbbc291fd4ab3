"""The fused int8/int4 CPU kernels: same results as dequantize-then-matmul, the reference
checkpoints' logits through them, and the torch path whenever they cannot be built or run."""

from __future__ import annotations

import pytest
from chatglm_reference import load_reference, reference_logits
from rounding import activation_block, rounding_bound


@pytest.fixture
def compiler(monkeypatch, tmp_path):
    """Set the C++ compiler (CXX, as torch.compile reads it) on an empty kernel cache."""
    from glmrepl.engine.cpu import kernels as cpu_kernels
    from glmrepl.engine.cpu import machine as cpu

    def use(command: str) -> None:
        monkeypatch.setenv("CXX", command)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        cpu.compiler_problem.cache_clear()
        cpu_kernels.reset()

    yield use
    cpu.compiler_problem.cache_clear()
    cpu_kernels.reset()


@pytest.fixture
def no_compiler(compiler):
    compiler("/nonexistent/bin/g++")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(300, 4096), (33, 70), (7, 18)])  # vector loops and their scalar tails
def test_fused_gemv_matches_dequantized_matmul(kernels, bits, shape):
    import torch
    from torch.nn import functional as F

    from glmrepl.engine.quant.layers import QuantizedLinear

    torch.manual_seed(bits)
    layer = QuantizedLinear.from_linear(torch.nn.Linear(shape[1], shape[0], bias=True), bits)
    x = torch.randn(1, 1, shape[1])
    weight = layer.dequantized()
    reference = F.linear(x, weight, layer.bias)
    output = layer(x)
    assert output.shape == reference.shape and output.dtype == torch.float32
    # A row as wide as a whole number of blocks runs the integer loops (activations rounded to
    # 16 bits a block); other rows the float loops.
    bound = rounding_bound(x, weight, activation_block(layer.group_size, shape[1]))
    assert ((output - reference).abs() <= bound + 1e-5 * reference.abs() + 1e-5).all()
    bf16 = QuantizedLinear.from_linear(torch.nn.Linear(shape[1], shape[0], bias=False).bfloat16(), bits)
    half_out = bf16(x.bfloat16())
    assert half_out.dtype == torch.bfloat16
    assert torch.allclose(half_out.float(), F.linear(x, bf16.dequantized(torch.float32)), atol=0.05, rtol=0.02)


def test_fused_gemv_refuses_a_wrong_input_size(kernels):
    import torch

    from glmrepl.engine.quant.layers import QuantizedLinear

    layer = QuantizedLinear.from_linear(torch.nn.Linear(64, 8), 8)
    with pytest.raises(RuntimeError, match="64"):
        layer(torch.randn(1, 1, 65))


@pytest.mark.parametrize("name", ["chatglm2-int4", "chatglm2-int8"])
def test_decoding_through_the_kernels_matches_reference_logits(kernels, name):
    """The last position computed as a decoding step (one token, the kernel) against the
    reference's whole-prompt logits."""
    import torch

    from glmrepl.engine.cpu import kernels as cpu_kernels

    model = load_reference(name).model
    reference = reference_logits(name)
    ids = reference["input_ids"]
    with torch.inference_mode():
        prefill = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], past_key_values=prefill.past_key_values, use_cache=True)
    assert cpu_kernels.status() == "fused kernels (compiled)"
    # The kernels round the activations to 16 bits a block (the prompt's blocks of 1024 values, the
    # step's of 128), each product off by up to about 3e-5 here (the bounds the tests below
    # check), and the twelve products leave the logits (up to about 2.8) within 2e-4 of the
    # reference's float products, their order unchanged.
    assert torch.allclose(prefill.logits[0], reference["logits"][0, :-1], atol=2e-4, rtol=0)
    assert torch.allclose(step.logits[0, -1], reference["logits"][0, -1], atol=2e-4, rtol=0)
    assert torch.equal(step.logits[0, -1].argsort()[-5:], reference["logits"][0, -1].argsort()[-5:])


def test_no_compiler_keeps_the_torch_path_and_says_why(no_compiler):
    import torch
    from torch.nn import functional as F

    from glmrepl.engine.cpu import kernels as cpu_kernels
    from glmrepl.engine.quant.layers import QuantizedLinear

    assert cpu_kernels.wait_until_built() is None
    assert "no C++ compiler" in cpu_kernels.status() and "/nonexistent/bin/g++" in cpu_kernels.status()
    layer = QuantizedLinear.from_linear(torch.nn.Linear(64, 40), 4)
    x = torch.randn(1, 1, 64)
    assert torch.allclose(layer(x), F.linear(x, layer.dequantized(), layer.bias), atol=1e-5)


def test_a_compiler_that_fails_keeps_the_torch_path(compiler, tmp_path):
    """A compiler that answers --version but cannot build (a broken install)."""
    from glmrepl.engine.cpu import kernels as cpu_kernels

    broken = tmp_path / "g++"
    broken.write_text(
        "#!/bin/sh\n[ \"$1\" = --version ] && echo 'g++ 0.0' && exit 0\n"
        "echo 'cc1plus: fatal error: omp.h missing' >&2\nexit 1\n"
    )
    broken.chmod(0o755)
    compiler(str(broken))
    assert cpu_kernels.wait_until_built() is None
    assert cpu_kernels.status() == "torch ops (kernel build failed: cc1plus: fatal error: omp.h missing)"


def test_the_library_is_built_once_and_reused(compiler):
    from glmrepl.engine.cpu import kernels as cpu_kernels

    compiler("g++")
    assert cpu_kernels.wait_until_built() is not None
    built = list(cpu_kernels.cache_folder().glob("quant-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    cpu_kernels.reset()
    assert cpu_kernels.wait_until_built() is not None
    assert [p.stat().st_mtime_ns for p in cpu_kernels.cache_folder().glob("quant-*.so")] == [stamp]


def test_a_kernel_failing_at_run_time_falls_back_without_losing_the_reply(kernels, monkeypatch):
    import torch

    from glmrepl.engine.cpu import kernels as cpu_kernels
    from glmrepl.engine.generation.run import GenerationRun
    from glmrepl.engine.generation.scheduler import private_scheduler

    parts = load_reference("chatglm2-int8")
    ids = reference_logits("chatglm2-int8")["input_ids"][0].tolist()
    expected_run = GenerationRun(
        parts.model, parts.tokenizer, ids, {"max_new_tokens": 6, "do_sample": False}, [], scheduler=private_scheduler()
    )
    expected_text = "".join(expected_run)

    def broken(*args, **kwargs):
        raise OSError("illegal instruction")

    monkeypatch.setattr(cpu_kernels, "int8_gemv", broken)
    run = GenerationRun(
        parts.model, parts.tokenizer, ids, {"max_new_tokens": 6, "do_sample": False}, [], scheduler=private_scheduler()
    )
    assert "".join(run) == expected_text and run.stats.new_tokens == 6
    assert "fused kernel failed: illegal instruction" in cpu_kernels.status()
    assert torch.get_num_threads() >= 1


def test_the_load_report_note_names_the_reason_only_when_the_kernels_cannot_run(kernels, compiler):
    import torch

    from glmrepl.engine.cpu import kernels as cpu_kernels
    from glmrepl.engine.quant import layers as quant
    from glmrepl.engine.quant.layers import QuantizedLinear

    model = torch.nn.Sequential(QuantizedLinear.from_linear(torch.nn.Linear(16, 4), 4))
    assert quant.fallback_note(model) is None and quant.decode_path(model) == "int4 fused kernels (compiled)"
    assert quant.fallback_note(torch.nn.Sequential(torch.nn.Linear(4, 4))) is None  # nothing quantized
    compiler("/nonexistent/bin/g++")
    assert cpu_kernels.library() is None  # the probe answers at once: no waiting on a thread
    assert quant.fallback_note(model) == (
        "int4 layers decode with torch ops, slower: no C++ compiler: /nonexistent/bin/g++ not found"
    )


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group, columns", [(0, 96), (0, 80), (32, 96), (64, 192)])  # 32-value steps, a tail
def test_rows_dequantized_for_prompts_equal_the_layout(kernels, bits, group, columns):
    import torch

    from glmrepl.engine.cpu import kernels as cpu_kernels
    from glmrepl.engine.quant.layers import QuantizedLinear

    torch.manual_seed(bits + columns)
    layer = QuantizedLinear.from_linear(torch.nn.Linear(columns, 40, bias=False), bits, group)
    out = torch.full((13, columns), float("nan"))
    lib = cpu_kernels.library()
    assert cpu_kernels.dequantize_rows(lib, layer.weight, layer.weight_scale, bits, group or columns, 20, out, 2)
    assert torch.equal(out, layer.dequantized(torch.float32)[20:33])


def rounded_to_16_bits(x, block: int):
    """x as the prompt kernel reads it: each block of ``block`` values rounded to 16-bit steps of
    its largest magnitude / 32767, ties to even."""
    import torch

    out = torch.empty_like(x)
    for start in range(0, x.shape[-1], block):
        part = x[..., start : start + block]
        largest = part.abs().amax(-1, keepdim=True)
        step = torch.where(largest > 0, largest / 32767, 1.0)
        out[..., start : start + block] = torch.round(part / step) * torch.where(largest > 0, step, 0.0)
    return out


# Token counts around the kernel's 4-token tiles, row counts around its 4-row tiles and 32-row
# panels, widths of one 128-value chunk, part of a 1024-value block, and a block and a tail.
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("tokens, rows, columns", [(2, 4, 128), (5, 33, 512), (9, 70, 1664), (67, 6, 2048)])
@pytest.mark.parametrize("scale_dtype", ["float32", "float16", "bfloat16"])
def test_the_prompt_kernel_multiplies_16_bit_activations_exactly(kernels, bits, tokens, rows, columns, scale_dtype):
    """The integer prompt kernel (two byte passes per 16-bit activation) equals the float
    product of the rounded activations, to float32's own rounding; against the unrounded
    activations it stays within the rounding's bound."""
    import torch
    from rounding import rounding_bound

    from glmrepl.engine.cpu import kernels as cpu_kernels
    from glmrepl.engine.cpu.machine import cpu_flags
    from glmrepl.engine.quant.layers import QuantizedLinear, dequantize

    if "avx512_vnni" not in cpu_flags().split():
        pytest.skip("the prompt kernel needs AVX512-VNNI; elsewhere prompts dequantize")
    torch.manual_seed(tokens * rows + bits)
    layer = QuantizedLinear.from_linear(torch.nn.Linear(columns, rows, bias=False), bits, 0)
    scale = layer.weight_scale.to(getattr(torch, scale_dtype))
    x = torch.randn(tokens, columns) * torch.rand(tokens, 1) * 10
    x[0, :128] = 0  # a block of zeros has scale 0
    x[-1, 3] = 300.0  # an outlier sets its own block's step only
    weight = dequantize(layer.weight, scale, bits, torch.float32)
    out = cpu_kernels.prompt_gemm(cpu_kernels.library(), layer.weight, scale, bits, x, 2)
    exact = torch.nn.functional.linear(rounded_to_16_bits(x, 1024).double(), weight.double())
    assert (out - exact).abs().max() <= 1e-5 * exact.abs().max()
    float_product = torch.nn.functional.linear(x.double(), weight.double())
    assert ((out - float_product).abs() <= rounding_bound(x, weight, 1024) + 1e-5 * exact.abs().max()).all()


def test_prompts_of_per_row_layers_take_the_prompt_kernel(kernels, monkeypatch):
    """A per-row layer's prompt goes through the integer kernel; a group-wise one's, and any
    the kernel declines, dequantize as before."""
    import torch

    from glmrepl.engine.cpu import kernels as cpu_kernels
    from glmrepl.engine.quant.layers import QuantizedLinear

    calls = []
    real = cpu_kernels.prompt_gemm
    monkeypatch.setattr(cpu_kernels, "prompt_gemm", lambda *args: calls.append(args[3]) or real(*args))
    x = torch.randn(7, 256)
    for group in (0, 64):
        layer = QuantizedLinear.from_linear(torch.nn.Linear(256, 12), 4, group)
        assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.dequantized(), layer.bias), atol=2e-3)
    assert calls == [4]  # the group-wise layer never asks it


def test_a_prompt_kernel_failing_at_run_time_dequantizes_instead(kernels, monkeypatch):
    import torch

    from glmrepl.engine.cpu import kernels as cpu_kernels
    from glmrepl.engine.quant.layers import QuantizedLinear

    def broken(*args, **kwargs):
        raise OSError("illegal instruction")

    monkeypatch.setattr(cpu_kernels, "prompt_gemm", broken)
    layer = QuantizedLinear.from_linear(torch.nn.Linear(256, 12), 8, 0)
    x = torch.randn(5, 256)
    assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.dequantized(), layer.bias), atol=1e-5)
    assert "prompt kernel failed: illegal instruction" in cpu_kernels.status()
