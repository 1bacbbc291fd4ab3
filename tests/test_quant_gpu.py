"""int4 / int8 on a CUDA GPU, with and without cpm_kernels (skipped without CUDA)."""

from __future__ import annotations

import warnings

import pytest
from chatglm_reference import as_messages, expected, reference_logits
from chatglm_reference import load_reference as load
from test_quant import QUANTIZED

pytestmark = pytest.mark.gpu


@pytest.fixture(params=["torch", "cpm_kernels"])
def kernel(request, monkeypatch):
    from glmrepl.engine.quant import layers as quant

    quant.reset_kernels()
    if request.param == "torch":

        def missing():
            raise ImportError("cpm_kernels left out for this test")

        monkeypatch.setattr(quant, "CpmDequantizer", missing)
    else:
        pytest.importorskip("cpm_kernels")
    yield request.param
    quant.reset_kernels()


@pytest.mark.parametrize("bits", [4, 8])
def test_gpu_dequantize_is_bit_exact(kernel, bits):
    import torch

    from glmrepl.engine.quant import layers as quant

    weight = torch.randn(300, 128)
    packed, scale = quant.quantize_weight(weight, bits)
    packed, scale = packed.cuda(), scale.half().cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a kernel that fails would warn: that is a failure here
        found = quant.gpu_dequantize(packed, scale, bits, torch.float16)
    assert torch.equal(found, quant.dequantize(packed, scale, bits, torch.float16))
    if kernel == "cpm_kernels":
        assert quant._kernels() is not None


@pytest.mark.parametrize("name", QUANTIZED)
def test_gpu_float32_matches_reference_logits(kernel, name):
    import torch

    reference = reference_logits(name)
    model = load(name, device_map="cuda:0").model
    with torch.inference_mode():
        logits = model(input_ids=reference["input_ids"].cuda()).logits.cpu()
    assert torch.allclose(logits, reference["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", QUANTIZED)
def test_gpu_float16_replies(kernel, name):
    import torch

    parts = load(name, device_map="cuda:0", dtype=torch.float16)
    reference = reference_logits(name)
    with torch.inference_mode():
        logits = parts.model(input_ids=reference["input_ids"].cuda()).logits.float().cpu()
    assert torch.allclose(logits, reference["logits"], atol=2e-2, rtol=0)
    case = expected(name)["cases"][0]
    prompt = parts.prompt_format.build(as_messages(case))
    with torch.inference_mode():
        output = parts.model.generate(torch.tensor([prompt]).cuda(), do_sample=False, max_new_tokens=8)
    assert output.shape[1] > len(prompt)


def test_gpu_quantize_in_place_and_on_load_agree(kernel):
    import torch

    from glmrepl.engine.families.chatglm.quantized import quantize_in_place

    on_load = load("chatglm2", quantize=4, device_map="cuda:0").model
    in_place = load("chatglm2", device_map="cuda:0").model
    quantize_in_place(in_place, 4)
    ids = reference_logits("chatglm2-int4")["input_ids"].cuda()
    with torch.inference_mode():
        assert torch.allclose(on_load(input_ids=ids).logits, in_place(input_ids=ids).logits, atol=1e-5)


def test_sharded_quantized_layers_split_across_devices():
    """Quantized blocks placed like any other block (cpu + gpu here, so one GPU is enough)."""
    import torch

    device_map = {
        "model.embed_tokens": "cuda:0",
        "model.layers.0": "cuda:0",
        "model.layers.1": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cuda:0",
        "lm_head": "cpu",
    }
    parts = load("chatglm2-int4", device_map=device_map)
    reference = reference_logits("chatglm2-int4")
    with torch.inference_mode():
        logits = parts.model(input_ids=reference["input_ids"].cuda()).logits.cpu()
    assert torch.allclose(logits, reference["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_gpu_group_wise_layer_matches_the_cpu(bits):
    import torch

    from glmrepl.engine.quant.layers import QuantizedLinear

    torch.manual_seed(bits)
    layer = QuantizedLinear.from_linear(torch.nn.Linear(256, 96), bits, 32)
    x = torch.randn(2, 3, 256)
    expected = layer(x)
    found = layer.cuda()(x.cuda()).cpu()
    assert torch.allclose(found, expected, atol=1e-4, rtol=1e-4)


def test_gpu_loads_a_quantized_folder(qwen_checkpoint, tmp_path):
    import torch

    from glmrepl.engine.models.loading import LoadRequest, load_model
    from glmrepl.engine.models.quantized_folder import quantize_checkpoint

    quantize_checkpoint(qwen_checkpoint, tmp_path / "int4", 4)
    loaded = load_model(LoadRequest(path=tmp_path / "int4", name="int4", mode="gpu", dtype="float32"))
    ids = torch.tensor([[3, 10, 20, 30]])
    cpu = load_model(LoadRequest(path=tmp_path / "int4", name="int4", mode="cpu", dtype="float32"))
    with torch.inference_mode():
        found = loaded.model(ids.cuda()).logits.cpu()
        assert torch.allclose(found, cpu.model(ids).logits, atol=1e-3, rtol=0)
