"""int4 / int8 layers: the layout bit for bit, the reference quantized checkpoints, quantizing
float checkpoints on load and in place, and the errors."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
from chatglm_reference import (
    DATA,
    assert_logits_match,
    assert_matches_case,
    expected,
    load_reference,
    reference_cases,
    reference_logits,
)
from rounding import INTEGER_KERNEL_ATOL

QUANTIZED = ("chatglm2-int4", "chatglm2-int8")
load = load_reference


@pytest.fixture(scope="module")
def loaded():
    return {name: load(name) for name in QUANTIZED}


# -- the layout -----------------------------------------------------------------


def test_int4_dequantizes_hand_built_bytes():
    import torch

    from glmrepl.engine.quant.layers import dequantize, unpacked_values

    # high nibble first: 0x7F = (7, -1), 0x80 = (-8, 0), 0x08 = (0, -8), 0xF7 = (-1, 7)
    packed = torch.tensor([[0x7F, 0x80 - 256], [0x08, 0xF7 - 256]], dtype=torch.int8)
    assert unpacked_values(packed, 4).tolist() == [[7, -1, -8, 0], [0, -8, -1, 7]]
    scale = torch.tensor([0.5, 2.0])
    assert dequantize(packed, scale, 4).tolist() == [[3.5, -0.5, -4.0, 0.0], [0.0, -16.0, -2.0, 14.0]]


def test_int8_dequantizes_hand_built_bytes():
    import torch

    from glmrepl.engine.quant.layers import dequantize

    packed = torch.tensor([[-128, 127, 0, -1]], dtype=torch.int8)
    assert dequantize(packed, torch.tensor([0.25]), 8).tolist() == [[-32.0, 31.75, 0.0, -0.25]]


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_round_trips_the_layout(bits):
    import torch

    from glmrepl.engine.quant.layers import dequantize, quantize_weight, unpacked_values

    limit = 2 ** (bits - 1) - 1
    values = torch.randint(-limit, limit + 1, (6, 16), dtype=torch.int8)
    values[:, 0] = limit  # the row maximum fixes the scale
    scale = torch.rand(6) + 0.5
    packed, found = quantize_weight(values.float() * scale[:, None], bits)
    assert torch.equal(unpacked_values(packed, bits), values)
    assert torch.allclose(found, scale)
    assert torch.allclose(dequantize(packed, found, bits), values.float() * scale[:, None])


def test_quantized_linear_matches_dequantized_matmul():
    import torch

    from glmrepl.engine.quant.layers import QuantizedLinear

    torch.manual_seed(0)
    for bits in (4, 8):
        linear = torch.nn.Linear(64, 3000, bias=True)  # more rows than one CPU block
        layer = QuantizedLinear.from_linear(linear, bits)
        x = torch.randn(2, 5, 64)
        reference = torch.nn.functional.linear(x, layer.dequantized(), layer.bias)
        assert torch.allclose(layer(x), reference, atol=1e-5, rtol=1e-5)
        assert layer.weight.dtype == torch.int8 and layer.weight.shape == (3000, 64 * bits // 8)


# -- the reference quantized checkpoints --------------------------------------------


@pytest.mark.parametrize("name,index", reference_cases(QUANTIZED))
def test_prompt_greedy_and_decoded(loaded, name, index):
    assert_matches_case(loaded[name], expected(name)["cases"][index])


@pytest.mark.parametrize("name", QUANTIZED)
def test_logits_match_reference(loaded, name):
    assert_logits_match(loaded[name], name, atol=INTEGER_KERNEL_ATOL)


@pytest.mark.parametrize("name", QUANTIZED)
def test_layers_stay_quantized_in_memory(loaded, name):
    import torch

    from glmrepl.engine.quant.layers import QuantizedLinear, model_bits

    model = loaded[name].model
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 2 * 6 and all(m.weight.dtype == torch.int8 for m in layers)
    assert model_bits(model) == int(name[-1])


# -- quantizing float checkpoints -----------------------------------------------------


def quantized_state(model) -> dict:
    from glmrepl.engine.quant.layers import QuantizedLinear

    return {name: (m.weight, m.weight_scale) for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_on_load_equals_the_quantized_checkpoint(loaded, bits):
    import torch

    name = f"chatglm2-int{bits}"
    parts = load("chatglm2", quantize=bits)
    ours, theirs = quantized_state(parts.model), quantized_state(loaded[name].model)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key][0], theirs[key][0]), key
        assert torch.equal(ours[key][1], theirs[key][1]), key
    reference = reference_logits(name)
    with torch.inference_mode():
        logits = parts.model(input_ids=reference["input_ids"]).logits
    assert torch.allclose(logits, reference["logits"], atol=INTEGER_KERNEL_ATOL, rtol=0)


def test_quantize_in_place_equals_the_quantized_checkpoint(loaded):
    import torch

    from glmrepl.engine.families.chatglm.quantized import quantize_in_place

    model = load("chatglm2").model
    assert quantize_in_place(model, 4) == 2 * 6
    theirs = quantized_state(loaded["chatglm2-int4"].model)
    for key, (weight, scale) in quantized_state(model).items():
        assert torch.equal(weight, theirs[key][0]) and torch.equal(scale, theirs[key][1]), key
    assert quantize_in_place(model, 4) == 0  # already done: nothing to do


@pytest.mark.parametrize("family", ["chatglm1", "chatglm3"])
def test_quantize_other_generations_on_load(family):
    """ChatGLM-6B's and ChatGLM3's layers quantize too, and compute what the float model
    computes with the dequantized weights in place of its own."""
    import torch

    from glmrepl.engine.quant.layers import QuantizedLinear

    quantized = load(family, quantize=4).model
    float_model = load(family).model
    for name, module in quantized.named_modules():
        if isinstance(module, QuantizedLinear):
            float_model.get_submodule(name).weight.data = module.dequantized()
    ids = reference_logits(family)["input_ids"]
    with torch.inference_mode():
        expected = float_model(input_ids=ids).logits
        assert torch.allclose(quantized(input_ids=ids).logits, expected, atol=INTEGER_KERNEL_ATOL, rtol=0)


@pytest.mark.parametrize("family", ["chatglm1", "chatglm2", "chatglm3", "glm4"])
@pytest.mark.parametrize("bits", [4, 8])
def test_a_decoding_step_through_the_kernels_of_every_generation(kernels, family, bits):
    """One token decoded by the integer kernels (activations rounded to 16 bits a block) against
    the float model with the dequantized weights in place, every ChatGLM generation."""
    import torch

    from glmrepl.engine.cpu import kernels as cpu_kernels
    from glmrepl.engine.quant.layers import QuantizedLinear

    quantized = load(family, quantize=bits).model
    float_model = load(family).model
    for name, module in quantized.named_modules():
        if isinstance(module, QuantizedLinear):
            float_model.get_submodule(name).weight.data = module.dequantized()
    ids = reference_logits(family)["input_ids"]
    runs = []
    with torch.inference_mode():
        for model in (quantized, float_model):  # the prompt, then three steps of one token each
            settings = {"max_new_tokens": 4, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
            runs.append(model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings))
    ours, theirs = runs
    assert cpu_kernels.status() == "fused kernels (compiled)"
    assert torch.equal(ours.sequences, theirs.sequences)
    # The prompt's logits and each step's are within 5e-4 of the logits' scale (the activations'
    # 16-bit rounding, carried through the layers: up to 3e-4 on these fixtures).
    for step, (mine, reference) in enumerate(zip(ours.logits, theirs.logits)):
        assert (mine - reference).abs().max() <= 5e-4 * reference.abs().max(), step


def test_chatglm1_quantized_checkpoint_round_trip(tmp_path):
    """A ChatGLM-6B int4 folder in the released layout loads with the same layers."""
    import torch

    parts = load("chatglm1", quantize=4)
    folder = tmp_path / "chatglm1-int4"
    shutil.copytree(DATA / "chatglm1-tiny", folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["quantization_bit"] = 4
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "pytorch_model.bin").unlink(missing_ok=True)
    for stale in folder.glob("*.safetensors"):
        stale.unlink()
    state = {name: tensor for name, tensor in parts.model.state_dict().items()}
    torch.save(state, folder / "pytorch_model.bin")
    reloaded = load(folder)
    ids = reference_logits("chatglm1")["input_ids"]
    with torch.inference_mode():
        assert torch.equal(reloaded.model(input_ids=ids).logits, parts.model(input_ids=ids).logits)


# -- errors -----------------------------------------------------------------------------


def test_quantized_weight_shape_not_matching_config(tmp_path):
    from glmrepl.engine.errors import CheckpointError

    folder = Path(shutil.copytree(DATA / "chatglm2-int4-tiny", tmp_path / "chatglm2-int4-tiny"))
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["quantization_bit"] = 8  # int4 bytes read as int8: half the columns
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(CheckpointError) as error:
        load(folder)
    message = str(error.value)
    assert "\n" not in message and "chatglm2-int4-tiny" in message and "shape" in message


def test_quantize_cannot_requantize_a_quantized_checkpoint():
    from glmrepl.engine.quant.layers import QuantizeError

    with pytest.raises(QuantizeError, match="already quantized to int4"):
        load("chatglm2-int4", quantize=8)


def test_quantize_on_load_takes_other_architectures_too(gpt2_checkpoint):
    from glmrepl.engine.models.manager import LoadRequest, load_model
    from glmrepl.engine.quant.layers import QuantizedLinear

    loaded = load_model(LoadRequest(path=gpt2_checkpoint, name="tiny-gpt2", mode="cpu", quantize=4))
    layers = [m for m in loaded.model.modules() if isinstance(m, QuantizedLinear) and m.bits == 4]
    assert len(layers) == 8 and all(m.group_size == 32 for m in layers)  # GPT-2's Conv1D projections
    assert loaded.info.placement.describe() == "cpu float32 int4"


def test_a_tied_head_in_int8_is_also_the_embedding_table(gpt2_checkpoint):
    import torch

    from glmrepl.engine.models.manager import LoadRequest, load_model
    from glmrepl.engine.quant.int8_head import Int8Embedding
    from glmrepl.engine.quant.layers import QuantizedLinear, dequantize

    int8 = load_model(LoadRequest(path=gpt2_checkpoint, name="tiny-gpt2", mode="cpu", quantize=4))
    float_head = load_model(LoadRequest(path=gpt2_checkpoint, name="f", mode="cpu", quantize=4, float_head=True))
    head, embeddings = int8.model.get_output_embeddings(), int8.model.get_input_embeddings()
    assert isinstance(head, QuantizedLinear) and isinstance(embeddings, Int8Embedding) and embeddings.head is head
    vocab, hidden = head.out_features, head.in_features
    assert not any(p.is_floating_point() and p.shape == (vocab, hidden) for p in int8.model.parameters())
    rows = dequantize(head.weight, head.weight_scale, 8, torch.float32, 32)
    ids = torch.tensor([[3, 10, 20], [4, 4, 0]])
    assert torch.equal(embeddings(ids), rows[ids])
    table = float_head.model.get_input_embeddings().weight
    half_step = head.weight_scale.float().repeat_interleave(32, dim=1) / 2
    assert ((rows - table).abs() <= half_step + 1e-6).all()  # each value the nearest step of its group
    with torch.no_grad():
        ours, theirs = int8.model(ids).logits, float_head.model(ids).logits
    assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=0.05)
    assert int8.model.config.tie_word_embeddings is False  # transformers will not tie them back


def test_manager_quantize_in_place_and_describe():
    from glmrepl.engine.models.manager import LoadRequest, ModelManager

    manager = ModelManager()
    manager.load(LoadRequest(path=DATA / "chatglm2-tiny", name="chatglm2-tiny", mode="cpu"))
    assert manager.current.info.placement.describe() == "cpu float32"
    assert manager.quantize(4).describe() == "cpu float32 int4"
    manager.load(LoadRequest(path=DATA / "chatglm2-tiny", name="chatglm2-tiny", mode="cpu", quantize=8))
    assert manager.current.info.placement.describe() == "cpu float32 int8"


def test_cpm_kernels_failure_warns_once_and_falls_back(monkeypatch):
    import torch

    from glmrepl.engine.quant import layers as quant

    class Broken:
        calls = 0

        def dequantize(self, packed, scale, bits):
            Broken.calls += 1
            raise RuntimeError("CUDA Runtime Error: Library cudart is not initialized\nmore")

    quant.reset_kernels()
    monkeypatch.setattr(quant, "CpmDequantizer", Broken)
    packed = torch.tensor([[0x7F]], dtype=torch.int8)
    scale = torch.tensor([1.0], dtype=torch.float16)
    with pytest.warns(RuntimeWarning, match="cpm_kernels failed .*cudart is not initialized.*torch") as caught:
        first = quant.gpu_dequantize(packed, scale, 4, torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = quant.gpu_dequantize(packed, scale, 4, torch.float16)
    assert len(caught) == 1 and Broken.calls == 1
    assert first.tolist() == second.tolist() == [[7.0, -1.0]]
    quant.reset_kernels()


def test_cpm_kernels_import_failure_warns_and_missing_is_silent(monkeypatch):
    import torch

    from glmrepl.engine.quant import layers as quant

    def broken():
        raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version")

    def missing():
        raise ImportError("No module named 'cpm_kernels'")

    packed, scale = torch.tensor([[1, -2]], dtype=torch.int8), torch.tensor([2.0], dtype=torch.float16)
    quant.reset_kernels()
    monkeypatch.setattr(quant, "CpmDequantizer", broken)
    with pytest.warns(RuntimeWarning, match="driver version is insufficient"):
        assert quant.gpu_dequantize(packed, scale, 8, torch.float16).tolist() == [[2.0, -4.0]]
    quant.reset_kernels()
    monkeypatch.setattr(quant, "CpmDequantizer", missing)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert quant.gpu_dequantize(packed, scale, 8, torch.float16).tolist() == [[2.0, -4.0]]
    quant.reset_kernels()
