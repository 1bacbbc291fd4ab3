"""The float decode kernel: F.linear's results for one token, the same greedy replies as
plain transformers, the reference checkpoints' logits through it, and F.linear whenever
it cannot be built or run."""

from __future__ import annotations

import pytest
from chatglm_reference import DATA, load_reference, reference_logits


@pytest.fixture
def calls(monkeypatch):
    """Counts the kernels' calls, so a test knows a kernel (not F.linear) produced its figures:
    "n" the one-token kernel's, "rows" the few-token one's (a step of batched decoding)."""
    from glmrepl.engine.cpu import kernels as cpu_kernels

    counted = {"n": 0, "rows": 0}

    def counting(name, key):
        real = getattr(cpu_kernels, name)

        def counted_call(*args, **kwargs):
            counted[key] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(cpu_kernels, name, counted_call)

    counting("float_gemv", "n")
    counting("float_gemm", "rows")
    return counted


def _kernel_linear(rows: int, cols: int, bias: bool, dtype):
    import torch

    from glmrepl.engine.cpu.float_linear import use_kernels

    model = torch.nn.Sequential(torch.nn.Linear(cols, rows, bias=bias)).to(dtype)
    assert use_kernels(model) == 1
    return model[0]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(300, 4096), (33, 70), (7, 18)])  # vector loops and their scalar tails
def test_float32_matches_f_linear(kernels, calls, shape, bias):
    import torch
    from torch.nn import functional as F

    torch.manual_seed(shape[0])
    layer = _kernel_linear(*shape, bias, torch.float32)
    for x in (torch.randn(1, 1, shape[1]), torch.randn(shape[1])):
        output = layer(x)
        reference = F.linear(x, layer.weight, layer.bias)
        assert output.shape == reference.shape and output.dtype == torch.float32
        assert torch.allclose(output, reference, atol=1e-5, rtol=1e-5)
    assert calls["n"] == 2


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_half_types_round_like_f_linear(kernels, calls, dtype_name):
    """Accumulated in float32 and rounded once, as torch does: equal to F.linear but for a rare
    last-bit difference where the summation order tips a rounding."""
    import torch
    from torch.nn import functional as F

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(3)
    layer = _kernel_linear(896, 4864, True, dtype)
    x = torch.randn(1, 1, 4864, dtype=dtype)
    output, reference = layer(x), F.linear(x, layer.weight, layer.bias)
    assert output.dtype == dtype and calls["n"] == 1
    assert (output == reference).float().mean() > 0.98
    assert torch.allclose(output.float(), reference.float(), rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(300, 4096), (33, 70), (7, 18)])  # vector loops, tiles and their tails
def test_a_few_tokens_float32_match_f_linear(kernels, calls, shape, bias):
    """A step of batched decoding: one token per request, 2 to MAX_KERNEL_ROWS rows, flat
    (as continuous batching feeds them) or in a batch of sequences, each row as F.linear's."""
    import torch
    from torch.nn import functional as F

    from glmrepl.engine.cpu.float_linear import MAX_KERNEL_ROWS

    torch.manual_seed(shape[1])
    layer = _kernel_linear(*shape, bias, torch.float32)
    inputs = [torch.randn(1, m, shape[1]) for m in (2, 3, 5, 8, 13, MAX_KERNEL_ROWS)]
    inputs += [torch.randn(7, shape[1]), torch.randn(3, 2, shape[1])]
    for x in inputs:
        output = layer(x)
        reference = F.linear(x, layer.weight, layer.bias)
        assert output.shape == reference.shape and output.dtype == torch.float32
        assert torch.allclose(output, reference, atol=1e-5, rtol=1e-5)
    assert calls["rows"] == len(inputs) and calls["n"] == 0


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("rows", [2, 7, 16])
def test_a_few_tokens_in_half_types_round_like_f_linear(kernels, calls, dtype_name, rows):
    import torch
    from torch.nn import functional as F

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(rows)
    layer = _kernel_linear(897, 4867, True, dtype)  # odd sizes: the tiles' row tail, the scalar column tail
    x = torch.randn(1, rows, 4867, dtype=dtype)
    output, reference = layer(x), F.linear(x, layer.weight, layer.bias)
    assert output.dtype == dtype and output.shape == reference.shape and calls["rows"] == 1
    assert (output == reference).float().mean() > 0.98
    assert torch.allclose(output.float(), reference.float(), rtol=2**-7, atol=1e-3)


def test_prompts_and_other_inputs_keep_f_linear(kernels, calls):
    import torch

    from glmrepl.engine.cpu.float_linear import MAX_KERNEL_ROWS

    layer = _kernel_linear(16, 32, True, torch.float32)
    assert layer(torch.randn(1, MAX_KERNEL_ROWS, 32)).shape == (1, MAX_KERNEL_ROWS, 16)
    assert calls["rows"] == 1
    prompt = torch.randn(1, MAX_KERNEL_ROWS + 1, 32)  # a prompt: a float matmul
    assert torch.equal(layer(prompt), torch.nn.functional.linear(prompt, layer.weight, layer.bias))
    for rows in (1, 4):
        with pytest.raises(RuntimeError):
            layer(torch.randn(1, rows, 32, dtype=torch.float64))  # F.linear's own error, as before
        x = torch.randn(1, rows, 32, requires_grad=True)
        layer(x).sum().backward()  # autograd still works
        assert x.grad is not None
    with pytest.raises(RuntimeError):
        layer(torch.randn(1, 4, 31))  # the wrong width: F.linear's error, not the kernel's
    assert calls["n"] == 0 and calls["rows"] == 1


@pytest.mark.parametrize("fixture", ["qwen_checkpoint", "chatglm3-tiny", "glm4-tiny"])
def test_greedy_replies_equal_plain_transformers(kernels, calls, request, fixture):
    """The same model, the same prompt: the kernels' greedy ids are plain nn.Linear's."""
    import torch

    from glmrepl.engine.cpu.float_linear import restore_linears, use_kernels
    from glmrepl.engine.models.loading import LoadOptions, load_model
    from glmrepl.engine.quant.decode_step import transformers_steps
    from glmrepl.engine.quant.layers import decode_path

    folder = request.getfixturevalue(fixture) if fixture.endswith("_checkpoint") else DATA / fixture
    loaded = load_model(LoadOptions(mode="cpu").for_model(folder, "tiny"))
    model = loaded.model
    assert decode_path(model).startswith("float32 fused kernels (compiled)")
    ids = torch.tensor([loaded.tokenizer.encode("the kernels must not change a reply")])
    settings = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    with torch.inference_mode():
        fast = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings)
        assert calls["n"] > 0
        restore_linears(model)
        with transformers_steps(model):  # plain transformers: no fused layers either
            assert decode_path(model) == "eager"
            plain = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings)
    assert fast.tolist() == plain.tolist()
    assert use_kernels(model) > 0


def test_continuous_batching_replies_equal_generate_alone(kernels, calls, qwen_checkpoint):
    """Several requests decoded together (transformers' continuous batching: one flat row per
    request and step, through the few-token kernel) get the greedy ids each gets alone."""
    import torch
    from transformers import ContinuousBatchingConfig, GenerationConfig

    from glmrepl.engine.backend import LocalBackend
    from glmrepl.engine.models.loading import LoadOptions

    backend = LocalBackend()
    backend.load_and_wait(LoadOptions(mode="cpu", dtype="float32").for_model(qwen_checkpoint, "tiny"))
    model, tokenizer = backend.manager.current.model, backend.manager.current.tokenizer
    prompts = ["hello there", "the kernels must not change a reply", "a b c d e f g", "two plus two is"]
    new_tokens = 20
    vocab = model.config.vocab_size
    settings = GenerationConfig(
        do_sample=True, temperature=0.999, top_k=vocab, top_p=0.9999, eos_token_id=-1, pad_token_id=0
    )
    batching = ContinuousBatchingConfig(num_blocks=8, page_size=128, max_batch_tokens=512, per_request_processors=True)
    manager = model.init_continuous_batching(generation_config=settings, continuous_batching_config=batching)
    manager.start()
    try:
        requests = {}
        for prompt in prompts:  # top_k=1: greedy; eos -1: every reply runs to new_tokens
            ids = tokenizer.encode(prompt)
            requests[manager.add_request(ids, max_new_tokens=new_tokens, eos_token_id=[-1], top_k=1)] = ids
        batched = {}
        for _ in prompts:
            result = manager.get_result(timeout=120)
            batched[result.request_id] = list(result.generated_tokens)
    finally:
        manager.stop(block=True, timeout=5)
    assert calls["rows"] > 0
    greedy = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    for request_id, ids in requests.items():
        x = torch.tensor([ids])
        with torch.inference_mode():
            alone = model.generate(input_ids=x, attention_mask=torch.ones_like(x), **greedy)
        assert batched[request_id] == alone[0, x.shape[1] :].tolist()


@pytest.mark.parametrize("name", ["chatglm2", "chatglm3", "glm4", "chatglm2-32k", "chatglm3-32k"])
def test_decoding_through_the_kernel_matches_reference_logits(kernels, calls, name):
    """Every position computed as a decoding step (one token, the kernel) against the
    reference's whole-prompt logits."""
    import torch

    from glmrepl.engine.cpu.float_linear import use_kernels

    model = load_reference(name).model
    assert use_kernels(model) > 0
    reference = reference_logits(name)
    ids = reference["input_ids"]
    with torch.inference_mode():
        past = model(input_ids=ids[:, :1], use_cache=True).past_key_values
        for position in range(1, ids.shape[1]):
            step = model(input_ids=ids[:, position : position + 1], past_key_values=past, use_cache=True)
            past = step.past_key_values
            assert torch.allclose(step.logits[0, -1], reference["logits"][0, position], atol=1e-4, rtol=0)
    assert calls["n"] > 0


def test_no_compiler_keeps_f_linear_and_the_load_report_says_why(monkeypatch, tmp_path, qwen_checkpoint):
    from glmrepl.engine.cpu import kernels as cpu_kernels
    from glmrepl.engine.cpu import machine as cpu
    from glmrepl.engine.generation.run import GenerationRun
    from glmrepl.engine.generation.scheduler import private_scheduler
    from glmrepl.engine.models.loading import LoadOptions, load_model
    from glmrepl.engine.quant.layers import decode_path, fallback_note

    monkeypatch.setenv("CXX", "/nonexistent/bin/g++")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cpu.compiler_problem.cache_clear()
    cpu_kernels.reset()
    try:
        loaded = load_model(LoadOptions(mode="cpu").for_model(qwen_checkpoint, "tiny"))
        assert decode_path(loaded.model) == "float32 torch ops (no C++ compiler: /nonexistent/bin/g++ not found)"
        assert fallback_note(loaded.model) == (
            "float32 layers decode with torch ops, slower: no C++ compiler: /nonexistent/bin/g++ not found"
        )
        ids = loaded.tokenizer.encode("hello")
        run = GenerationRun(
            loaded.model,
            loaded.tokenizer,
            ids,
            {"max_new_tokens": 5, "min_new_tokens": 5},
            [],
            scheduler=private_scheduler(),
        )
        "".join(run)
        assert run.stats.new_tokens == 5 and "torch ops" in run.stats.path
    finally:
        cpu.compiler_problem.cache_clear()
        cpu_kernels.reset()


def test_a_kernel_failing_mid_reply_falls_back_without_losing_it(kernels, monkeypatch):
    from glmrepl.engine.cpu import kernels as cpu_kernels
    from glmrepl.engine.cpu.float_linear import use_kernels
    from glmrepl.engine.generation.run import GenerationRun
    from glmrepl.engine.generation.scheduler import private_scheduler

    parts = load_reference("chatglm3")
    use_kernels(parts.model)
    ids = reference_logits("chatglm3")["input_ids"][0].tolist()
    settings = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    expected_text = "".join(
        GenerationRun(parts.model, parts.tokenizer, ids, settings, [], scheduler=private_scheduler())
    )
    real, count = cpu_kernels.float_gemv, {"n": 0}

    def fails_later(*args, **kwargs):  # the first steps run, then the library breaks
        count["n"] += 1
        if count["n"] > 10:
            raise OSError("illegal instruction")
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu_kernels, "float_gemv", fails_later)
    run = GenerationRun(parts.model, parts.tokenizer, ids, settings, [], scheduler=private_scheduler())
    assert "".join(run) == expected_text and run.stats.new_tokens == 6
    assert run.stats.path == "float32 torch ops (fused kernel failed: illegal instruction)"


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_half_prompts_widen_blocks_to_float32(monkeypatch, dtype_name):
    """A prompt with half-precision weights, on a CPU without native bfloat16: float32 products a
    block of rows at a time (several blocks here), rounded once, as torch's own matmul rounds."""
    import torch
    from torch.nn import functional as F

    from glmrepl.engine.cpu import float_linear

    monkeypatch.setattr(float_linear, "_PROMPT_BLOCK_VALUES", 64 * 70)  # 64 rows a block: 5 blocks
    monkeypatch.setattr(float_linear, "_widen_half_prompts", lambda: True)
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(5)
    layer = _kernel_linear(300, 70, True, dtype)
    x = torch.randn(2, 9, 70, dtype=dtype)
    widened = []
    real = float_linear.widened_product
    monkeypatch.setattr(float_linear, "widened_product", lambda *args: widened.append(1) or real(*args))
    output = layer(x)
    expected = F.linear(x.float(), layer.weight.float(), layer.bias.float()).to(dtype)
    assert widened and output.dtype == dtype and output.shape == (2, 9, 300)
    assert (output == expected).float().mean() > 0.99
    assert torch.allclose(output.float(), expected.float(), rtol=2**-7, atol=1e-3)
    assert torch.allclose(output.float(), F.linear(x, layer.weight, layer.bias).float(), rtol=2**-7, atol=1e-2)
    monkeypatch.setattr(float_linear, "_widen_half_prompts", lambda: False)  # a CPU with native bfloat16
    widened.clear()
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias)) and not widened


def test_a_one_shot_reply_leaves_the_kernels_built_for_the_next_run(qwen_checkpoint, tmp_path):
    """The build runs in the background; a process that exits first waits for it, so the
    library is cached once and the next run decodes through it from its first token."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "glmrepl", str(qwen_checkpoint), "-p", "hi", "--max-new-tokens", "2"]
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=300)
    assert list((tmp_path / "cache" / "glmrepl" / "kernels").glob("quant-*.so"))
